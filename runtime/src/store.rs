//! The variant store on a device: a base model, installed deltas, and which one is active.
//!
//! A store is a directory on the device's own storage:
//!
//! ```text
//! DIR/store.json               base file + fingerprint, model card, trusted public keys (written once)
//! DIR/base.onnx                the base model, copied in by `init`
//! DIR/model-card.json          the model card, when one was given
//! DIR/state.json               active and previous variant, highest sequence seen per name
//! DIR/journal.jsonl            one line per install/activate/rollback/remove attempt, with its result
//! DIR/variants/NAME.SEQ.bdelta installed deltas, as received (signed envelope or plain delta)
//! DIR/lock                     flock(2) taken by every operation that writes
//! ```
//!
//! Guarantees (the README's "Field installs" section):
//! - Every write is temp file + fsync + rename + directory fsync ([`StoreIo::write_atomic`]); a
//!   crash at any step leaves the previous file in place. Stray temp files are ignored and
//!   cleaned up by the next writing operation.
//! - `install` reads the source once into memory (never mapped: a card can be pulled), checks the
//!   copy completely (signature when keys are trusted, structure, checksums, base binding, the
//!   rebuilt weights' fingerprint, no sequence downgrade), writes it under a new name, and reads
//!   it back before recording it. The active variant's file is never overwritten.
//! - The active pointer lives in `state.json` and moves in one atomic rename, after the caller's
//!   self-test of the new variant passed.
//! - [`Store::resolve`] re-verifies the active variant on every load and falls back to the
//!   previous one, then to the base, saying why.

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::vec::Vec;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::apply::{rebuild_with, ApplyError};
use crate::fingerprint::{hex, parse_hex32, Fingerprint};
use crate::format::{is_valid_variant_name, DeltaFile};
use crate::onnx::OnnxWeights;
use crate::sign;

/// Store configuration file name.
pub const STORE_FILE: &str = "store.json";
/// State file name (active pointer).
pub const STATE_FILE: &str = "state.json";
/// The base model inside the store.
pub const BASE_FILE: &str = "base.onnx";
/// The model card inside the store.
pub const CARD_FILE: &str = "model-card.json";
/// Folder of installed deltas.
pub const VARIANTS_DIR: &str = "variants";
/// Journal of operations and their results (JSON Lines).
pub const JOURNAL_FILE: &str = "journal.jsonl";
/// The journal is moved to `journal.old.jsonl` when it grows past this.
pub const JOURNAL_MAX_BYTES: u64 = 256 << 10;
/// Lock file taken by writing operations.
pub const LOCK_FILE: &str = "lock";
/// Version of `store.json` and `state.json`.
pub const STORE_FORMAT: u32 = 1;
/// A delta larger than the base by more than this is refused before it is read.
pub const DELTA_SLACK_BYTES: u64 = 16 << 20;

/// What `store.json` records (written once by [`Store::init`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// [`STORE_FORMAT`].
    pub format: u32,
    /// The base model.
    pub base: BaseRecord,
    /// The model card's file name in the store, if any.
    pub card: Option<String>,
    /// Trusted ed25519 public keys, lowercase hex. When not empty, only deltas signed by one of
    /// them install.
    pub trusted_keys: Vec<String>,
}

/// The base model as recorded at `init`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseRecord {
    /// File name in the store.
    pub file: String,
    /// BLAKE3 fingerprint of its weights, lowercase hex.
    pub fingerprint: String,
    /// File length in bytes.
    pub bytes: u64,
}

/// One installed variant the state points to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    /// Variant name.
    pub name: String,
    /// Sequence number.
    pub sequence: u64,
    /// Fingerprint of its rebuilt weights, lowercase hex.
    pub fingerprint: String,
}

/// The outcome of a writing operation, as appended to the journal.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// `install`, `activate`, `rollback` or `remove`.
    pub action: String,
    /// Whether it succeeded.
    pub ok: bool,
    /// What happened.
    pub message: String,
    /// Seconds since the Unix epoch by the device clock (may be wrong: field devices often
    /// have no real-time clock).
    pub unix_time: u64,
    /// Who asked for it when not a person at the command line, e.g. `mender artifact NAME`
    /// ([`Store::set_origin`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// What `state.json` records.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// [`STORE_FORMAT`].
    pub format: u32,
    /// The active variant; `None` runs the base.
    pub active: Option<Slot>,
    /// The variant active before it (target of `rollback`).
    pub previous: Option<Slot>,
    /// Highest sequence number ever installed per variant name (no downgrade, no replay).
    pub high_water: BTreeMap<String, u64>,
}

/// Why a store operation failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// Reading or writing a file failed.
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        action: &'static str,
        /// The error.
        source: io::Error,
    },
    /// The directory is not a usable store.
    NotAStore {
        /// The store directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// A delta (or the base) was refused; nothing was changed.
    Refused {
        /// The file.
        path: PathBuf,
        /// Why, with expected/found values.
        reason: String,
    },
    /// The request cannot be carried out (unknown variant, removing the active one, ...).
    Invalid(String),
    /// The candidate failed its trial load or self-test; the active variant did not change.
    SelfTest {
        /// The variant.
        name: String,
        /// Why.
        reason: String,
    },
    /// Another process holds the store's lock.
    Busy(PathBuf),
}

impl StoreError {
    /// Whether the error is a refusal of bad input (as opposed to an I/O or usage error).
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Refused { .. } | Self::SelfTest { .. })
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io {
                path,
                action,
                source,
            } => write!(f, "{}: cannot {action}: {source}", path.display()),
            Self::NotAStore { dir, reason } => {
                write!(f, "{}: not a usable store: {reason}", dir.display())
            }
            Self::Refused { path, reason } => write!(f, "{}: refused: {reason}", path.display()),
            Self::Invalid(m) => f.write_str(m),
            Self::SelfTest { name, reason } => write!(
                f,
                "variant {name:?} failed its self-test, the active variant is unchanged: {reason}"
            ),
            Self::Busy(p) => write!(
                f,
                "{}: the store is busy (another install or activation is running)",
                p.display()
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

/// A storage failure to inject, for tests of crash safety.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Storage step `k` (0-based) fails with an I/O error; later steps work again (the caller's
    /// clean-up runs).
    Fail(usize),
    /// The process "dies" at storage step `k`: a write at that step leaves half its bytes, and
    /// no later step reaches the disk (no clean-up either).
    Crash(usize),
}

/// The storage layer every store write goes through: counts steps and can inject a [`Fault`].
///
/// Steps are: create+write a temp file, fsync it, rename it, fsync the directory, remove a file.
#[derive(Debug, Default)]
pub struct StoreIo {
    fault: Option<Fault>,
    steps: AtomicUsize,
}

impl StoreIo {
    /// Real storage, no faults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Storage that injects `fault`.
    pub fn with_fault(fault: Fault) -> Self {
        Self {
            fault: Some(fault),
            steps: AtomicUsize::new(0),
        }
    }

    /// How many storage steps ran (or were attempted).
    pub fn steps(&self) -> usize {
        self.steps.load(Ordering::SeqCst)
    }

    fn crashed(&self) -> bool {
        matches!(self.fault, Some(Fault::Crash(k)) if self.steps() > k)
    }

    /// Counts a step; `Err` when a fault fires here. `partial` is set when a crash happens at
    /// this step (a write then leaves half of its bytes).
    fn step(&self, what: &str, path: &Path) -> io::Result<bool> {
        let k = self.steps.fetch_add(1, Ordering::SeqCst);
        let fired = |kind| {
            io::Error::other(format!(
                "injected {kind} at storage step {k} ({what} {})",
                path.display()
            ))
        };
        match self.fault {
            Some(Fault::Fail(n)) if n == k => Err(fired("failure")),
            Some(Fault::Crash(n)) if n == k => Ok(true),
            Some(Fault::Crash(n)) if k > n => Err(fired("crash")),
            _ => Ok(false),
        }
    }

    /// Writes `bytes` to `path` via `.NAME.tmp` in the same folder, fsync, rename, folder fsync.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> io::Result<()> {
        self.write_atomic_with(path, |f, partial| {
            if partial {
                f.write_all(&bytes[..bytes.len() / 2])?;
                return Err(io::Error::other("injected crash while writing"));
            }
            f.write_all(bytes)
        })
    }

    /// Copies `src` to `path` atomically, streaming (for large base models).
    pub fn copy_atomic(&self, src: &Path, path: &Path) -> io::Result<()> {
        self.write_atomic_with(path, |f, partial| {
            let mut r = File::open(src)?;
            if partial {
                let len = r.metadata()?.len();
                io::copy(&mut Read::by_ref(&mut r).take(len / 2), f)?;
                return Err(io::Error::other("injected crash while writing"));
            }
            io::copy(&mut r, f).map(drop)
        })
    }

    fn write_atomic_with(
        &self,
        path: &Path,
        fill: impl FnOnce(&mut File, bool) -> io::Result<()>,
    ) -> io::Result<()> {
        let dir = parent(path);
        let tmp = temp_path(path);
        let res = (|| {
            let partial = self.step("write", &tmp)?;
            let mut f = File::create(&tmp)?;
            fill(&mut f, partial)?;
            if self.step("fsync", &tmp)? {
                return Err(io::Error::other("injected crash before fsync"));
            }
            f.sync_all()?;
            drop(f);
            if self.step("rename", path)? {
                return Err(io::Error::other("injected crash before rename"));
            }
            fs::rename(&tmp, path)?;
            self.sync_dir(dir)
        })();
        if res.is_err() && !self.crashed() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Removes `path` and fsyncs its folder.
    pub fn remove(&self, path: &Path) -> io::Result<()> {
        if self.step("remove", path)? {
            return Err(io::Error::other("injected crash before remove"));
        }
        fs::remove_file(path)?;
        self.sync_dir(parent(path))
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        if self.step("fsync dir", dir)? {
            return Err(io::Error::other("injected crash before directory fsync"));
        }
        File::open(dir)?.sync_all()
    }
}

fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    parent(path).join(format!(".{name}.tmp"))
}

/// A verified delta read from the store (or from a card, before install).
#[derive(Clone, Debug)]
pub struct Checked {
    /// The file as stored (envelope included when signed).
    pub bytes: Vec<u8>,
    /// Offset of the delta inside `bytes` (0 when unsigned).
    pub payload_start: usize,
    /// Variant name.
    pub name: String,
    /// Sequence number.
    pub sequence: u64,
    /// Fingerprint of the rebuilt weights (from the manifest).
    pub fingerprint: Fingerprint,
    /// Key id of the signer, when signed.
    pub signed_by: Option<String>,
}

impl Checked {
    /// The delta itself (without a signature envelope).
    pub fn delta(&self) -> &[u8] {
        &self.bytes[self.payload_start..]
    }
}

/// An installed variant file, as found on disk.
#[derive(Clone, Debug)]
pub struct Installed {
    /// The file.
    pub path: PathBuf,
    /// Name and sequence from the file name.
    pub name: String,
    /// Sequence from the file name.
    pub sequence: u64,
    /// File length.
    pub bytes: u64,
    /// The verified delta, or why it failed verification.
    pub check: Result<Checked, String>,
}

/// What [`Store::resolve`] decided to run.
#[derive(Debug)]
pub struct Resolved {
    /// The variant to run (`None`: the base), verified.
    pub variant: Option<(Slot, Checked)>,
    /// Problems met on the way (a corrupt active variant, ...), for status and logs.
    pub problems: Vec<String>,
}

impl Resolved {
    /// Name of what runs (`"base"` for the base).
    pub fn running(&self) -> &str {
        self.variant
            .as_ref()
            .map(|(s, _)| s.name.as_str())
            .unwrap_or("base")
    }
}

/// What [`Store::install`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InstallOutcome {
    /// Newly installed.
    Installed(Slot),
    /// The same file was already installed; nothing changed.
    AlreadyInstalled(Slot),
}

impl InstallOutcome {
    /// The installed variant.
    pub fn slot(&self) -> &Slot {
        match self {
            Self::Installed(s) | Self::AlreadyInstalled(s) => s,
        }
    }
}

/// An open store.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    config: Config,
    /// `config.base.fingerprint`, parsed.
    base_fp: Fingerprint,
    state: State,
    keys: Vec<VerifyingKey>,
    io: StoreIo,
    origin: Option<String>,
}

/// An exclusive lock on a store, released on drop (and by the kernel if the process dies).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

#[allow(unsafe_code)]
fn try_flock(file: &File) -> io::Result<bool> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: flock on a valid, owned file descriptor; no memory is passed.
    let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r == 0 {
        Ok(true)
    } else {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            Ok(false)
        } else {
            Err(e)
        }
    }
}

/// A trusted key as `store.json` records it: 64 hex digits.
fn key_from_hex(h: &str) -> Option<VerifyingKey> {
    parse_hex32(h.trim()).and_then(|b| VerifyingKey::from_bytes(&b).ok())
}

/// A file name of the variants folder: `NAME.SEQ.bdelta` (temp files and others are not).
fn variant_file_name(file_name: &str) -> Option<(&str, u64)> {
    if file_name.starts_with('.') {
        return None;
    }
    let (name, seq) = file_name.strip_suffix(".bdelta")?.rsplit_once('.')?;
    Some((name, seq.parse().ok()?))
}

impl Store {
    /// Creates a store in `dir` (created if missing, must not hold a store yet): copies the base
    /// model (and card, and `extras`: files the card refers to, as (source, path relative to the
    /// store)) in, records the base fingerprint and the trusted keys.
    pub fn init(
        dir: &Path,
        base: &Path,
        card: Option<&Path>,
        extras: &[(PathBuf, PathBuf)],
        trusted: &[VerifyingKey],
        io: StoreIo,
    ) -> Result<Self, StoreError> {
        fs::create_dir_all(dir.join(VARIANTS_DIR)).map_err(io_err(dir, "create the folder"))?;
        let _lock = Self::lock_dir(dir)?;
        if dir.join(STORE_FILE).exists() {
            return Err(StoreError::Invalid(format!(
                "{}: already holds a store (found {STORE_FILE})",
                dir.display()
            )));
        }
        let bytes = fs::read(base).map_err(io_err(base, "read"))?;
        let weights = OnnxWeights::scan(&bytes).map_err(|e| StoreError::Refused {
            path: base.to_owned(),
            reason: e.to_string(),
        })?;
        let fingerprint = weights.fingerprint(&bytes);
        let len = bytes.len() as u64;
        drop(bytes);
        let base_dst = dir.join(BASE_FILE);
        io.copy_atomic(base, &base_dst)
            .map_err(io_err(&base_dst, "write"))?;
        // Verify the copy: what was written is what was checked.
        let copied = fs::read(&base_dst).map_err(io_err(&base_dst, "read back"))?;
        let check = OnnxWeights::scan(&copied)
            .map(|w| w.fingerprint(&copied))
            .ok();
        if check != Some(fingerprint) {
            return Err(StoreError::Refused {
                path: base_dst,
                reason: "the copy does not read back as written (storage fault?)".into(),
            });
        }
        drop(copied);
        let card_name = match card {
            Some(c) => {
                let dst = dir.join(CARD_FILE);
                io.copy_atomic(c, &dst).map_err(io_err(&dst, "write"))?;
                Some(CARD_FILE.to_string())
            }
            None => None,
        };
        for (src, rel) in extras {
            let dst = dir.join(rel);
            fs::create_dir_all(parent(&dst)).map_err(io_err(&dst, "create the folder of"))?;
            io.copy_atomic(src, &dst)
                .map_err(io_err(src, "copy into the store"))?;
        }
        let config = Config {
            format: STORE_FORMAT,
            base: BaseRecord {
                file: BASE_FILE.into(),
                fingerprint: hex(&fingerprint),
                bytes: len,
            },
            card: card_name,
            trusted_keys: trusted.iter().map(|k| hex(k.as_bytes())).collect(),
        };
        let state = State {
            format: STORE_FORMAT,
            ..State::default()
        };
        let state_path = dir.join(STATE_FILE);
        io.write_atomic(&state_path, &to_json(&state))
            .map_err(io_err(&state_path, "write"))?;
        // store.json last: a store exists only once everything it names is on disk.
        let cfg_path = dir.join(STORE_FILE);
        io.write_atomic(&cfg_path, &to_json(&config))
            .map_err(io_err(&cfg_path, "write"))?;
        Ok(Self {
            dir: dir.to_owned(),
            keys: trusted.to_vec(),
            base_fp: fingerprint,
            config,
            state,
            io,
            origin: None,
        })
    }

    /// Opens the store in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, StoreIo::new())
    }

    /// Opens the store in `dir`, writing through `io`.
    pub fn open_with(dir: &Path, io: StoreIo) -> Result<Self, StoreError> {
        let not_store = |reason: String| StoreError::NotAStore {
            dir: dir.to_owned(),
            reason,
        };
        let cfg_path = dir.join(STORE_FILE);
        let text = match fs::read(&cfg_path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(not_store(format!(
                    "expected {STORE_FILE}, found none (create one with `bitdelta store init`)"
                )))
            }
            Err(e) => return Err(io_err(&cfg_path, "read")(e)),
        };
        let config: Config =
            serde_json::from_slice(&text).map_err(|e| not_store(format!("{STORE_FILE}: {e}")))?;
        if config.format != STORE_FORMAT {
            return Err(not_store(format!(
                "{STORE_FILE}: expected format {STORE_FORMAT}, found {}",
                config.format
            )));
        }
        let base_fp = parse_hex32(&config.base.fingerprint).ok_or_else(|| {
            not_store(format!(
                "{STORE_FILE}: base.fingerprint: expected 64 hex digits, found {:?}",
                config.base.fingerprint
            ))
        })?;
        let mut keys = Vec::new();
        for k in &config.trusted_keys {
            keys.push(
                key_from_hex(k)
                    .ok_or_else(|| not_store(format!("{STORE_FILE}: bad trusted key {k:?}")))?,
            );
        }
        let state_path = dir.join(STATE_FILE);
        let state: State = match fs::read(&state_path) {
            Ok(t) => {
                serde_json::from_slice(&t).map_err(|e| not_store(format!("{STATE_FILE}: {e}")))?
            }
            Err(e) => return Err(io_err(&state_path, "read")(e)),
        };
        Ok(Self {
            dir: dir.to_owned(),
            config,
            base_fp,
            state,
            keys,
            io,
            origin: None,
        })
    }

    fn lock_dir(dir: &Path) -> Result<StoreLock, StoreError> {
        let path = dir.join(LOCK_FILE);
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path, "open the lock file"))?;
        if try_flock(&file).map_err(io_err(&path, "lock"))? {
            Ok(StoreLock { _file: file })
        } else {
            Err(StoreError::Busy(dir.to_owned()))
        }
    }

    /// Takes the store's exclusive lock, re-reads the state and removes stray temp files.
    fn begin(&mut self) -> Result<StoreLock, StoreError> {
        let lock = Self::lock_dir(&self.dir)?;
        let state_path = self.dir.join(STATE_FILE);
        let text = fs::read(&state_path).map_err(io_err(&state_path, "read"))?;
        self.state = serde_json::from_slice(&text).map_err(|e| StoreError::NotAStore {
            dir: self.dir.clone(),
            reason: format!("{STATE_FILE}: {e}"),
        })?;
        for d in [self.dir.clone(), self.dir.join(VARIANTS_DIR)] {
            if let Ok(entries) = fs::read_dir(&d) {
                for e in entries.flatten() {
                    let n = e.file_name().to_string_lossy().into_owned();
                    if n.starts_with('.') && n.ends_with(".tmp") {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(lock)
    }

    /// The store directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `store.json`.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// `state.json` as last read or written.
    pub fn state(&self) -> &State {
        &self.state
    }

    /// The storage layer (its step count, for tests).
    pub fn io(&self) -> &StoreIo {
        &self.io
    }

    /// The trusted keys.
    pub fn trusted_keys(&self) -> &[VerifyingKey] {
        &self.keys
    }

    /// The base model's path.
    pub fn base_path(&self) -> PathBuf {
        self.dir.join(&self.config.base.file)
    }

    /// The model card's path, when the store has one.
    pub fn card_path(&self) -> Option<PathBuf> {
        self.config.card.as_ref().map(|c| self.dir.join(c))
    }

    /// The base fingerprint recorded at `init`, as bytes.
    pub fn base_fingerprint(&self) -> Fingerprint {
        self.base_fp
    }

    /// Reads the base, checks its fingerprint against `store.json`, returns bytes and weights.
    pub fn read_base(&self) -> Result<(Vec<u8>, OnnxWeights), StoreError> {
        let path = self.base_path();
        let bytes = fs::read(&path).map_err(io_err(&path, "read"))?;
        let weights = OnnxWeights::scan(&bytes).map_err(|e| StoreError::Refused {
            path: path.clone(),
            reason: format!("the store's base model is corrupt: {e}"),
        })?;
        let found = weights.fingerprint(&bytes);
        if found != self.base_fingerprint() {
            return Err(StoreError::Refused {
                path,
                reason: format!(
                    "the store's base model is corrupt: expected fingerprint {}, found {}",
                    &self.config.base.fingerprint[..16],
                    &hex(&found)[..16]
                ),
            });
        }
        Ok((bytes, weights))
    }

    /// Path of an installed variant file.
    pub fn variant_path(&self, name: &str, sequence: u64) -> PathBuf {
        self.dir
            .join(VARIANTS_DIR)
            .join(format!("{name}.{sequence}.bdelta"))
    }

    /// Checks delta bytes as the store would: the signature first when keys are trusted (nothing
    /// else is parsed before it), then structure, checksums, and binding to the store's base
    /// fingerprint. `path` names the file in messages.
    pub fn check_bytes(&self, path: &Path, bytes: Vec<u8>) -> Result<Checked, StoreError> {
        let refused = |reason: String| StoreError::Refused {
            path: path.to_owned(),
            reason,
        };
        let (payload_start, signed_by) = if !self.keys.is_empty() {
            let s = sign::verify(&bytes, &self.keys).map_err(|e| {
                refused(format!(
                    "signature check against the store's trusted keys failed: {e}"
                ))
            })?;
            (bytes.len() - s.payload.len(), Some(sign::key_id(&s.key)))
        } else if sign::is_signed(&bytes) {
            let s = sign::open(&bytes).map_err(|e| refused(e.to_string()))?;
            (bytes.len() - s.payload.len(), Some(sign::key_id(&s.key)))
        } else {
            (0, None)
        };
        let delta = &bytes[payload_start..];
        let file = DeltaFile::parse(delta).map_err(|e| refused(e.to_string()))?;
        file.verify_payloads().map_err(|e| {
            let t = file
                .tensor(error_index(&e))
                .map(|t| format!(" (tensor {:?})", t.name))
                .unwrap_or_default();
            refused(format!("{e}{t}"))
        })?;
        let m = file.manifest();
        if !is_valid_variant_name(m.name) {
            return Err(refused(format!("bad variant name {:?}", m.name)));
        }
        let base_fp = self.base_fingerprint();
        if m.base_fingerprint != base_fp {
            return Err(refused(format!(
                "made for another base model: expected base fingerprint {}, found {}",
                &self.config.base.fingerprint[..16],
                &hex(&m.base_fingerprint)[..16]
            )));
        }
        let (name, sequence, fingerprint) = (m.name.to_string(), m.sequence, m.result_fingerprint);
        Ok(Checked {
            bytes,
            payload_start,
            name,
            sequence,
            fingerprint,
            signed_by,
        })
    }

    /// Reads a file with a size cap (the base size plus [`DELTA_SLACK_BYTES`]): never mapped.
    pub fn read_capped(&self, path: &Path) -> Result<Vec<u8>, StoreError> {
        let cap = self.config.base.bytes + DELTA_SLACK_BYTES;
        let mut f = File::open(path).map_err(io_err(path, "open"))?;
        let len = f.metadata().map_err(io_err(path, "read"))?.len();
        if len > cap {
            return Err(StoreError::Refused {
                path: path.to_owned(),
                reason: format!(
                    "too large for a delta of this base: expected at most {cap} bytes, found {len}"
                ),
            });
        }
        let mut bytes = Vec::with_capacity(len as usize);
        Read::by_ref(&mut f)
            .take(cap + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err(path, "read"))?;
        if bytes.len() as u64 > cap {
            return Err(StoreError::Refused {
                path: path.to_owned(),
                reason: format!("grew while being read: expected at most {cap} bytes"),
            });
        }
        Ok(bytes)
    }

    /// The files of the variants folder as (name, sequence, path), unverified.
    fn variant_files(&self) -> Result<Vec<(String, u64, PathBuf)>, StoreError> {
        let dir = self.dir.join(VARIANTS_DIR);
        let mut out = Vec::new();
        for e in fs::read_dir(&dir).map_err(io_err(&dir, "list"))? {
            let e = e.map_err(io_err(&dir, "list"))?;
            if let Some((name, seq)) = variant_file_name(&e.file_name().to_string_lossy()) {
                out.push((name.to_string(), seq, e.path()));
            }
        }
        out.sort();
        Ok(out)
    }

    /// Every installed variant file, sorted by name then sequence, each re-verified.
    pub fn installed(&self) -> Result<Vec<Installed>, StoreError> {
        Ok(self
            .variant_files()?
            .into_iter()
            .map(|(name, sequence, path)| self.check_file(name, sequence, path))
            .collect())
    }

    /// Reads and verifies one file of the variants folder against its file name.
    fn check_file(&self, name: String, sequence: u64, path: PathBuf) -> Installed {
        let bytes = fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let check = self
            .read_capped(&path)
            .and_then(|b| self.check_bytes(&path, b))
            .and_then(|c| {
                if c.name != name || c.sequence != sequence {
                    Err(StoreError::Refused {
                        path: path.clone(),
                        reason: format!(
                            "expected variant {name:?} sequence {sequence}, found {:?} sequence {}",
                            c.name, c.sequence
                        ),
                    })
                } else {
                    Ok(c)
                }
            })
            .map_err(|e| e.to_string());
        Installed {
            path,
            name,
            sequence,
            bytes,
            check,
        }
    }

    /// Installs the delta at `source` (e.g. on an SD card). See the module docs for the checks.
    pub fn install(&mut self, source: &Path) -> Result<InstallOutcome, StoreError> {
        let _lock = self.begin()?;
        let res = self.install_locked(source);
        self.record(
            "install",
            &res.as_ref().map(|o| describe_install(o, source)),
        );
        res
    }

    fn install_locked(&mut self, source: &Path) -> Result<InstallOutcome, StoreError> {
        let bytes = self.read_capped(source)?;
        let checked = self.check_bytes(source, bytes)?;
        let refused = |reason: String| StoreError::Refused {
            path: source.to_owned(),
            reason,
        };
        // Full check against the base (its fingerprint was just checked by `read_base`): exact
        // tensor set, and the rebuilt weights must hash to the manifest's result fingerprint.
        let (base, weights) = self.read_base()?;
        let file = DeltaFile::parse(checked.delta()).map_err(|e| refused(e.to_string()))?;
        let found = rebuild_with(
            &base,
            &weights,
            &self.base_fp,
            &[(&file, 1.0)],
            true,
            |_, _| {},
        )
        .map_err(|e| refused(e.to_string()))?
        .expect("hashing was asked for");
        if found != checked.fingerprint {
            let e = ApplyError::ResultMismatch {
                expected: checked.fingerprint,
                found,
            };
            return Err(refused(e.to_string()));
        }
        drop(base);
        let slot = Slot {
            name: checked.name.clone(),
            sequence: checked.sequence,
            fingerprint: hex(&checked.fingerprint),
        };
        // No downgrade or replay: the sequence must exceed every one seen for this name.
        let highest_file = self
            .variant_files()?
            .into_iter()
            .filter(|(name, _, _)| *name == slot.name)
            .map(|(_, seq, _)| seq)
            .max();
        let high = self
            .state
            .high_water
            .get(&slot.name)
            .copied()
            .max(highest_file);
        let dst = self.variant_path(&slot.name, slot.sequence);
        if let Some(high) = high {
            if slot.sequence == high {
                if fs::read(&dst).ok().as_deref() == Some(&checked.bytes[..]) {
                    self.bump_high_water(&slot)?;
                    return Ok(InstallOutcome::AlreadyInstalled(slot));
                }
                return Err(refused(format!(
                    "variant {:?} sequence {} is already installed with other content; expected a sequence above {high}",
                    slot.name, slot.sequence
                )));
            }
            if slot.sequence < high {
                return Err(refused(format!(
                    "downgrade: variant {:?} expected a sequence above {high}, found {}",
                    slot.name, slot.sequence
                )));
            }
        }
        self.io
            .write_atomic(&dst, &checked.bytes)
            .map_err(io_err(&dst, "write"))?;
        // Read back what reached the storage.
        let back = fs::read(&dst).map_err(io_err(&dst, "read back"))?;
        if back != checked.bytes {
            let _ = self.io.remove(&dst);
            return Err(StoreError::Io {
                path: dst,
                action: "verify the written copy",
                source: io::Error::other("the copy does not read back as written"),
            });
        }
        self.bump_high_water(&slot)?;
        self.collect_garbage(&slot.name)?;
        Ok(InstallOutcome::Installed(slot))
    }

    fn bump_high_water(&mut self, slot: &Slot) -> Result<(), StoreError> {
        let cur = self.state.high_water.get(&slot.name).copied();
        if cur.is_some_and(|c| c >= slot.sequence) {
            return Ok(());
        }
        let mut next = self.state.clone();
        next.high_water.insert(slot.name.clone(), slot.sequence);
        self.write_state(next)
    }

    /// Removes older files of `name` that neither the active nor the previous slot uses.
    fn collect_garbage(&mut self, name: &str) -> Result<(), StoreError> {
        let keep = |seq: u64| {
            [&self.state.active, &self.state.previous].iter().any(|s| {
                s.as_ref()
                    .is_some_and(|s| s.name == name && s.sequence == seq)
            })
        };
        let newest = self.state.high_water.get(name).copied();
        let doomed: Vec<PathBuf> = self
            .variant_files()?
            .into_iter()
            .filter(|(vn, seq, _)| vn == name && Some(*seq) != newest && !keep(*seq))
            .map(|(_, _, path)| path)
            .collect();
        for p in doomed {
            self.io.remove(&p).map_err(io_err(&p, "remove"))?;
        }
        Ok(())
    }

    fn write_state(&mut self, mut next: State) -> Result<(), StoreError> {
        next.format = STORE_FORMAT;
        let path = self.dir.join(STATE_FILE);
        self.io
            .write_atomic(&path, &to_json(&next))
            .map_err(io_err(&path, "write"))?;
        self.state = next;
        Ok(())
    }

    /// Appends the outcome to the journal (best effort: the operation's own result stands; a
    /// failed operation changes nothing else).
    fn record(&mut self, action: &str, res: &Result<String, &StoreError>) {
        if self.io.crashed() {
            return;
        }
        let outcome = Outcome {
            action: action.into(),
            ok: res.is_ok(),
            message: match res {
                Ok(m) => m.clone(),
                Err(e) => e.to_string(),
            },
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            origin: self.origin.clone(),
        };
        let path = self.dir.join(JOURNAL_FILE);
        if fs::metadata(&path).is_ok_and(|m| m.len() > JOURNAL_MAX_BYTES) {
            let _ = fs::rename(&path, self.dir.join("journal.old.jsonl"));
        }
        let mut line = serde_json::to_vec(&outcome).expect("outcomes serialize");
        line.push(b'\n');
        if let Ok(mut f) = fs::OpenOptions::new().create(true).append(true).open(&path) {
            let _ = f.write_all(&line).and_then(|()| f.sync_data());
        }
    }

    /// Names who asks for the following operations in their journal entries (e.g. `mender
    /// artifact NAME` when an update manager drives the store).
    pub fn set_origin(&mut self, origin: Option<String>) {
        self.origin = origin;
    }

    /// The newest journal entry whose origin starts with `prefix` and whose action is `action`
    /// (any action when `None`).
    pub fn last_from(&self, prefix: &str, action: Option<&str>) -> Option<Outcome> {
        self.journal(usize::MAX).into_iter().rev().find(|o| {
            o.origin.as_deref().is_some_and(|g| g.starts_with(prefix))
                && action.is_none_or(|a| o.action == a)
        })
    }

    /// The last `n` journal entries, oldest first.
    pub fn journal(&self, n: usize) -> Vec<Outcome> {
        let text = fs::read_to_string(self.dir.join(JOURNAL_FILE)).unwrap_or_default();
        let all: Vec<Outcome> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        all[all.len().saturating_sub(n)..].to_vec()
    }

    /// The newest installed, verified file of `name`.
    pub fn newest(&self, name: &str) -> Result<(Slot, Checked), StoreError> {
        let mut found = None;
        let mut problem = None;
        for (n, sequence, path) in self.variant_files()? {
            if n != name {
                continue;
            }
            match self.check_file(n, sequence, path).check {
                Ok(c) => found = Some(c),
                Err(e) => problem = Some(e),
            }
        }
        match found {
            Some(c) => Ok((
                Slot {
                    name: c.name.clone(),
                    sequence: c.sequence,
                    fingerprint: hex(&c.fingerprint),
                },
                c,
            )),
            None => Err(match problem {
                Some(p) => StoreError::Invalid(format!("variant {name:?} cannot be used: {p}")),
                None => StoreError::Invalid(format!(
                    "variant {name:?} is not installed in {}",
                    self.dir.display()
                )),
            }),
        }
    }

    /// Loads a slot's file and re-verifies it (signature, checksums, binding, identity).
    pub fn load_slot(&self, slot: &Slot) -> Result<Checked, StoreError> {
        let path = self.variant_path(&slot.name, slot.sequence);
        let c = self.read_capped(&path)?;
        let c = self.check_bytes(&path, c)?;
        if c.name != slot.name
            || c.sequence != slot.sequence
            || hex(&c.fingerprint) != slot.fingerprint
        {
            return Err(StoreError::Refused {
                path,
                reason: format!(
                    "expected variant {:?} sequence {} fingerprint {}, found {:?} sequence {} fingerprint {}",
                    slot.name,
                    slot.sequence,
                    &slot.fingerprint[..16.min(slot.fingerprint.len())],
                    c.name,
                    c.sequence,
                    &hex(&c.fingerprint)[..16]
                ),
            });
        }
        Ok(c)
    }

    /// Trial-loads the newest `name` (or the base for `"base"`) through `self_test`, then moves
    /// the active pointer; on failure the active variant is unchanged.
    pub fn activate(
        &mut self,
        name: &str,
        self_test: impl FnOnce(Option<&Checked>) -> Result<(), String>,
    ) -> Result<Option<Slot>, StoreError> {
        let _lock = self.begin()?;
        let res = self.activate_locked(name, self_test);
        let msg = res.as_ref().map(|s| match s {
            Some(s) => format!("activated {:?} sequence {}", s.name, s.sequence),
            None => "activated the base model".to_string(),
        });
        self.record("activate", &msg);
        res
    }

    fn activate_locked(
        &mut self,
        name: &str,
        self_test: impl FnOnce(Option<&Checked>) -> Result<(), String>,
    ) -> Result<Option<Slot>, StoreError> {
        let target = if name == "base" {
            None
        } else {
            Some(self.newest(name)?)
        };
        self_test(target.as_ref().map(|(_, c)| c)).map_err(|reason| StoreError::SelfTest {
            name: name.into(),
            reason,
        })?;
        let slot = target.map(|(s, _)| s);
        if self.state.active == slot {
            return Ok(slot);
        }
        let mut next = self.state.clone();
        next.previous = next.active.take();
        next.active = slot.clone();
        self.write_state(next)?;
        Ok(slot)
    }

    /// Makes the previous variant active again (the base when there is none), after it passed
    /// `self_test`.
    pub fn rollback(
        &mut self,
        self_test: impl FnOnce(Option<&Checked>) -> Result<(), String>,
    ) -> Result<Option<Slot>, StoreError> {
        let _lock = self.begin()?;
        let res = self.rollback_locked(self_test);
        let msg = res.as_ref().map(|s| match s {
            Some(s) => format!("rolled back to {:?} sequence {}", s.name, s.sequence),
            None => "rolled back to the base model".to_string(),
        });
        self.record("rollback", &msg);
        res
    }

    fn rollback_locked(
        &mut self,
        self_test: impl FnOnce(Option<&Checked>) -> Result<(), String>,
    ) -> Result<Option<Slot>, StoreError> {
        if self.state.active.is_none() && self.state.previous.is_none() {
            return Err(StoreError::Invalid(
                "nothing to roll back: the base model is active and there is no previous variant"
                    .into(),
            ));
        }
        let target = self.state.previous.clone();
        let checked = target.as_ref().map(|s| self.load_slot(s)).transpose()?;
        let name = target
            .as_ref()
            .map_or("base", |s| s.name.as_str())
            .to_string();
        self_test(checked.as_ref()).map_err(|reason| StoreError::SelfTest { name, reason })?;
        let mut next = self.state.clone();
        next.previous = next.active.take();
        next.active = target.clone();
        self.write_state(next)?;
        Ok(target)
    }

    /// Removes every file of variant `name`. The active variant cannot be removed.
    pub fn remove(&mut self, name: &str) -> Result<usize, StoreError> {
        let _lock = self.begin()?;
        let res = self.remove_locked(name);
        let msg = res
            .as_ref()
            .map(|n| format!("removed {name:?} ({n} file(s))"));
        self.record("remove", &msg);
        res
    }

    fn remove_locked(&mut self, name: &str) -> Result<usize, StoreError> {
        if self.state.active.as_ref().is_some_and(|s| s.name == name) {
            return Err(StoreError::Invalid(format!(
                "variant {name:?} is active: activate another variant or roll back first"
            )));
        }
        let files: Vec<PathBuf> = self
            .variant_files()?
            .into_iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, _, path)| path)
            .collect();
        if files.is_empty() {
            return Err(StoreError::Invalid(format!(
                "variant {name:?} is not installed in {}",
                self.dir.display()
            )));
        }
        if self.state.previous.as_ref().is_some_and(|s| s.name == name) {
            let mut next = self.state.clone();
            next.previous = None;
            self.write_state(next)?;
        }
        for p in &files {
            self.io.remove(p).map_err(io_err(p, "remove"))?;
        }
        Ok(files.len())
    }

    /// What to run now: the active variant if it still verifies, else the previous one, else the
    /// base; `problems` says what was skipped and why.
    pub fn resolve(&self) -> Resolved {
        let mut problems = Vec::new();
        for (role, slot) in [
            ("active", &self.state.active),
            ("previous", &self.state.previous),
        ] {
            let Some(slot) = slot else {
                if role == "active" {
                    return Resolved {
                        variant: None,
                        problems,
                    };
                }
                continue;
            };
            match self.load_slot(slot) {
                Ok(c) => {
                    return Resolved {
                        variant: Some((slot.clone(), c)),
                        problems,
                    }
                }
                Err(e) => problems.push(format!(
                    "{role} variant {:?} (sequence {}) cannot be used: {e}",
                    slot.name, slot.sequence
                )),
            }
        }
        problems.push("running the base model instead".into());
        Resolved {
            variant: None,
            problems,
        }
    }
}

fn error_index(e: &crate::FormatError) -> usize {
    use crate::FormatError as F;
    match *e {
        F::PayloadChecksum { index, .. }
        | F::PayloadLength { index, .. }
        | F::PayloadOffset { index, .. }
        | F::SignPaddingNotZero { index }
        | F::Q8OutOfRange { index }
        | F::BadScale { index, .. } => index as usize,
        _ => usize::MAX,
    }
}

fn describe_install(o: &InstallOutcome, source: &Path) -> String {
    match o {
        InstallOutcome::Installed(s) => format!(
            "installed {:?} sequence {} from {}",
            s.name,
            s.sequence,
            source.display()
        ),
        InstallOutcome::AlreadyInstalled(s) => format!(
            "{:?} sequence {} from {} was already installed",
            s.name,
            s.sequence,
            source.display()
        ),
    }
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("store records serialize");
    out.push(b'\n');
    out
}
