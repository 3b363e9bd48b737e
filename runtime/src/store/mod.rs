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
//!
//! # Layout and dependencies
//!
//! This module may depend on the delta format ([`crate::format`]), rebuilding ([`crate::apply`]),
//! ONNX weights ([`crate::onnx`]), fingerprints and signatures ([`crate::sign`]), `serde_json`
//! and `std`; nothing else in the crate depends on it. With the `tract` and `images` features it
//! also holds the activation self-test, which uses the tract adapter, [`crate::card`] and
//! [`crate::frame`].
//!
//! - `io`: the storage layer ([`StoreIo`], [`Staged`]): atomic writes, fault injection, the lock.
//! - `state`: what `store.json`, `state.json` and the journal record.
//! - `verify`: checks of a delta against the store (signature, base binding, sequence, fingerprint).
//! - `operations`: `init`, `install`, `activate`, `rollback`, `remove`, `resolve`.
//! - `selftest` (features `tract` and `images`): the activation self-test (`SelfTest`).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

use ed25519_dalek::VerifyingKey;

use crate::fingerprint::{parse_hex32, Fingerprint};

mod io;
mod operations;
#[cfg(all(feature = "tract", feature = "images"))]
mod selftest;
mod state;
mod verify;

#[cfg(test)]
mod tests;

pub use io::{Fault, Staged, StoreIo, StoreLock};
pub use operations::{InstallOutcome, Resolved};
#[cfg(all(feature = "tract", feature = "images"))]
pub use selftest::{goldens_for, test_patterns, SelfTest, SelfTestError};
pub use state::{BaseRecord, Config, Outcome, Slot, State};
pub use verify::{Checked, Installed};

use verify::key_from_hex;

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
        source: std::io::Error,
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

fn io_err<'a>(
    path: &'a Path,
    action: &'static str,
) -> impl FnOnce(std::io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        path: path.to_owned(),
        action,
        source,
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

/// A file name of the variants folder: `NAME.SEQ.bdelta` (temp files and others are not).
fn variant_file_name(file_name: &str) -> Option<(&str, u64)> {
    if file_name.starts_with('.') {
        return None;
    }
    let (name, seq) = file_name.strip_suffix(".bdelta")?.rsplit_once('.')?;
    Some((name, seq.parse().ok()?))
}

impl Store {
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
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

    /// Path of an installed variant file.
    pub fn variant_path(&self, name: &str, sequence: u64) -> PathBuf {
        self.dir
            .join(VARIANTS_DIR)
            .join(format!("{name}.{sequence}.bdelta"))
    }

    /// The files of the variants folder as (name, sequence, path), unverified.
    pub(super) fn variant_files(&self) -> Result<Vec<(String, u64, PathBuf)>, StoreError> {
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
}
