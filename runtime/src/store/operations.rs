//! What changes a store: `init`, `install`, `activate`, `rollback`, `remove`, and `resolve`
//! (which only reads, but decides what runs). Every writing operation takes the lock, re-reads
//! the state, and appends its outcome to the journal.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

use ed25519_dalek::VerifyingKey;

use super::io::parent;
use super::state::to_json;
use super::{
    io_err, BaseRecord, Checked, Config, Slot, State, Store, StoreError, StoreIo, BASE_FILE,
    CARD_FILE, STATE_FILE, STORE_FILE, STORE_FORMAT, VARIANTS_DIR,
};
use crate::fingerprint::hex;
use crate::onnx::OnnxWeights;

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
        self.check_rebuild(source, &checked)?;
        let slot = checked.slot();
        let dst = self.variant_path(&slot.name, slot.sequence);
        if self.check_sequence(source, &checked)? {
            self.bump_high_water(&slot)?;
            return Ok(InstallOutcome::AlreadyInstalled(slot));
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

    /// Trial-loads the newest `name` (or the base for `"base"`) through `self_test`, then moves
    /// the active pointer; on failure the active variant is unchanged.
    pub fn activate(
        &mut self,
        name: &str,
        self_test: impl FnOnce(Option<&Checked>) -> Result<(), String>,
    ) -> Result<Option<Slot>, StoreError> {
        self.move_active("activate", "activated", |s| {
            s.activate_locked(name, self_test)
        })
    }

    /// Runs `op` (which moves the active pointer) under the lock and journals where the pointer
    /// went: "`verb` NAME sequence N", or "`verb` the base model".
    fn move_active(
        &mut self,
        action: &str,
        verb: &str,
        op: impl FnOnce(&mut Self) -> Result<Option<Slot>, StoreError>,
    ) -> Result<Option<Slot>, StoreError> {
        let _lock = self.begin()?;
        let res = op(self);
        let msg = res.as_ref().map(|s| match s {
            Some(s) => format!("{verb} {:?} sequence {}", s.name, s.sequence),
            None => format!("{verb} the base model"),
        });
        self.record(action, &msg);
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
        self.move_active("rollback", "rolled back to", |s| {
            s.rollback_locked(self_test)
        })
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
