//! The manifest: what the delta is, and which base it binds to.

use serde::{Deserialize, Serialize};

/// Manifest of a delta (postcard-encoded, borrowed from the file bytes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest<'a> {
    /// Variant name: 1..=64 characters of `[A-Za-z0-9._-]`.
    pub name: &'a str,
    /// Free text.
    pub description: &'a str,
    /// Labels when they differ from the base's, one per line; empty when the base's apply.
    pub labels: &'a str,
    /// Producing tool and version, e.g. `bitdelta 0.1.0`.
    pub tool: &'a str,
    /// Sequence number of this variant (installs refuse to go backwards).
    pub sequence: u64,
    /// Number of parameters (elements) the delta covers.
    pub params: u64,
    /// BLAKE3 fingerprint of the base weights (see [`crate::fingerprint`]).
    pub base_fingerprint: [u8; 32],
    /// BLAKE3 fingerprint of the reconstructed weights (this delta alone, alpha 1).
    pub result_fingerprint: [u8; 32],
}

impl<'a> Manifest<'a> {
    /// The labels, one per line, or an empty iterator when the base's labels apply.
    pub fn labels(&self) -> impl Iterator<Item = &'a str> {
        let l: &'a str = self.labels;
        l.split('\n').filter(|s| !s.is_empty())
    }
}
