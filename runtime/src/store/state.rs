//! What the store records on disk: `store.json` ([`Config`]), `state.json` ([`State`]) and the
//! journal of operations ([`Outcome`], one JSON line each).

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::string::{String, ToString};
use std::vec::Vec;

use serde::{Deserialize, Serialize};

use super::{io_err, Store, StoreError, JOURNAL_FILE, JOURNAL_MAX_BYTES, STATE_FILE, STORE_FORMAT};

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

impl Store {
    /// Writes `next` as `state.json` (atomically) and keeps it as the current state.
    pub(super) fn write_state(&mut self, mut next: State) -> Result<(), StoreError> {
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
    pub(super) fn record(&mut self, action: &str, res: &Result<String, &StoreError>) {
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
}

/// Pretty JSON with a final newline, as the store's files are written.
pub(super) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("store records serialize");
    out.push(b'\n');
    out
}
