//! Fingerprints: BLAKE3 over tensor names, dtypes, shapes and bytes.
//!
//! A fingerprint binds a delta to the exact base it was made against, and lets a device check
//! that its rebuilt weights are the ones the producer saw. Tensors are fed in ascending byte order
//! of their names; each contributes `u32 name length, name, u8 dtype id, u8 rank, u64 dims...,
//! u64 byte length, bytes` (little-endian), after the domain string `bitdelta-fingerprint-v1` and one NUL byte.

use crate::format::DType;

/// A 32-byte BLAKE3 fingerprint.
pub type Fingerprint = [u8; 32];

/// Incremental fingerprint of a tensor set.
#[derive(Clone, Debug)]
pub struct Fingerprinter(blake3::Hasher);

impl Default for Fingerprinter {
    fn default() -> Self {
        Self::new()
    }
}

impl Fingerprinter {
    /// Starts a fingerprint.
    pub fn new() -> Self {
        let mut h = blake3::Hasher::new();
        h.update(b"bitdelta-fingerprint-v1\0");
        Self(h)
    }
    /// Adds one tensor. Callers add tensors in ascending byte order of their names.
    pub fn add(&mut self, name: &str, dtype: DType, dims: &[u64], data: &[u8]) {
        self.begin(name, dtype, dims, data.len() as u64);
        self.update(data);
    }
    /// Starts one tensor of `len` bytes, to be given in pieces with [`Fingerprinter::update`]
    /// (the same fingerprint as one [`Fingerprinter::add`]).
    pub fn begin(&mut self, name: &str, dtype: DType, dims: &[u64], len: u64) {
        let h = &mut self.0;
        h.update(&(name.len() as u32).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&[dtype as u8, dims.len() as u8]);
        for d in dims {
            h.update(&d.to_le_bytes());
        }
        h.update(&len.to_le_bytes());
    }
    /// The next bytes of the tensor started by [`Fingerprinter::begin`].
    pub fn update(&mut self, data: &[u8]) {
        // Large tensors are hashed on every core (BLAKE3's tree; the same fingerprint).
        #[cfg(feature = "apply")]
        if data.len() >= 1 << 20 {
            self.0.update_rayon(data);
            return;
        }
        self.0.update(data);
    }
    /// The fingerprint.
    pub fn finish(&self) -> Fingerprint {
        *self.0.finalize().as_bytes()
    }
}

/// Lowercase hex of bytes (fingerprints, keys).
#[cfg(feature = "alloc")]
pub fn hex(bytes: &[u8]) -> alloc::string::String {
    base16ct::lower::encode_string(bytes)
}

/// Parses exactly 64 hex digits (either case) into 32 bytes.
pub fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    match base16ct::mixed::decode(s, &mut out) {
        Ok(b) if b.len() == 32 => Some(out),
        _ => None,
    }
}

/// Lowercase hex of a fingerprint's first `n` bytes.
pub fn short_hex(fp: &Fingerprint, n: usize) -> heapless::String<64> {
    let mut buf = [0u8; 64];
    let hex =
        base16ct::lower::encode_str(&fp[..n.min(32)], &mut buf).expect("64 bytes hold 32 in hex");
    let mut s = heapless::String::new();
    s.push_str(hex).expect("at most 64 digits");
    s
}
