//! Checks of a delta against the store: the signature (when keys are trusted), structure and
//! checksums, the binding to the store's base, the file name's name and sequence, and the
//! recorded fingerprint. Nothing here writes.

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

use ed25519_dalek::VerifyingKey;

use super::{io_err, Slot, Store, StoreError, DELTA_SLACK_BYTES};
use crate::apply::{rebuild_with, ApplyError};
use crate::fingerprint::{hex, parse_hex32, Fingerprint};
use crate::format::{is_valid_variant_name, DeltaFile};
use crate::onnx::OnnxWeights;
use crate::sign;

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

    /// The slot that records this delta in the state.
    pub fn slot(&self) -> Slot {
        Slot {
            name: self.name.clone(),
            sequence: self.sequence,
            fingerprint: hex(&self.fingerprint),
        }
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

/// A trusted key as `store.json` records it: 64 hex digits.
pub(super) fn key_from_hex(h: &str) -> Option<VerifyingKey> {
    parse_hex32(h.trim()).and_then(|b| VerifyingKey::from_bytes(&b).ok())
}

impl Store {
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

    /// Every installed variant file, sorted by name then sequence, each re-verified.
    pub fn installed(&self) -> Result<Vec<Installed>, StoreError> {
        Ok(self
            .variant_files()?
            .into_iter()
            .map(|(name, sequence, path)| self.check_file(name, sequence, path))
            .collect())
    }

    /// Reads and verifies one file of the variants folder against its file name.
    pub(super) fn check_file(&self, name: String, sequence: u64, path: PathBuf) -> Installed {
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
            Some(c) => Ok((c.slot(), c)),
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

    /// The full check against the base (whose fingerprint `read_base` checks): the delta must
    /// name exactly the base's tensors, and the rebuilt weights must hash to the manifest's
    /// result fingerprint. Rebuilds in memory, hashing only; `source` names the file in messages.
    pub(super) fn check_rebuild(&self, source: &Path, checked: &Checked) -> Result<(), StoreError> {
        let refused = |reason: String| StoreError::Refused {
            path: source.to_owned(),
            reason,
        };
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
        Ok(())
    }

    /// No downgrade or replay: the sequence must exceed every one seen for this name (in the
    /// state's high-water marks and in the variants folder). `Ok(true)` when this very file is
    /// already installed at the highest sequence (installing it again changes nothing).
    pub(super) fn check_sequence(
        &self,
        source: &Path,
        checked: &Checked,
    ) -> Result<bool, StoreError> {
        let refused = |reason: String| StoreError::Refused {
            path: source.to_owned(),
            reason,
        };
        let (name, sequence) = (&checked.name, checked.sequence);
        let highest_file = self
            .variant_files()?
            .into_iter()
            .filter(|(n, _, _)| n == name)
            .map(|(_, seq, _)| seq)
            .max();
        let high = self.state.high_water.get(name).copied().max(highest_file);
        let Some(high) = high else {
            return Ok(false);
        };
        if sequence == high {
            let dst = self.variant_path(name, sequence);
            if fs::read(&dst).ok().as_deref() == Some(&checked.bytes[..]) {
                return Ok(true);
            }
            return Err(refused(format!(
                "variant {name:?} sequence {sequence} is already installed with other content; expected a sequence above {high}"
            )));
        }
        if sequence < high {
            return Err(refused(format!(
                "downgrade: variant {name:?} expected a sequence above {high}, found {sequence}"
            )));
        }
        Ok(false)
    }
}

fn error_index(e: &crate::FormatError) -> usize {
    e.tensor_index().map_or(usize::MAX, |i| i as usize)
}
