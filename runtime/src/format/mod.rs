//! Delta format v1 (`.bdelta`): layout constants, codecs, the fixed header and the manifest.
//!
//! The normative description is `docs/FORMAT.md`. Parsing ([`DeltaFile::parse`]) is a pure
//! function over a byte slice: it never allocates and never panics, whatever the input.
//!
//! May depend on: `core`, `crc32fast`, `half`, `postcard`/`serde` (the manifest), [`crate::error`],
//! [`crate::codec`] (the codec id table and each codec's payload layout), and `alloc` for the
//! writer. No I/O: callers fetch and store bytes.
//!
//! One place for each rule: `entry.rs` ([`entry_field`]) holds the 44-byte entry layout and every
//! per-entry check, `header.rs` ([`header_field`]) the 64-byte header layout; the reader, the
//! streaming decoder and the writers ([`DeltaWriter`], [`write_delta`]) all go through them.
//!
//! ```text
//! [0, 64)                 fixed header (little-endian), CRC32 over bytes 0..60 at 60
//! [64, +manifest_len)     manifest, postcard
//! [.., +44*tensors)       tensor table, 44-byte entries sorted by name
//! [.., +4*dims)           dimensions, u32 each
//! [.., +names_len)        tensor names, UTF-8
//! zero padding            up to payload_offset (a multiple of the alignment)
//! payloads                one per tensor in table order, each at the next aligned offset
//! ```

pub(crate) mod entry;
mod header;
mod manifest;
mod reader;
#[cfg(feature = "alloc")]
mod writer;

pub use entry::{
    field as entry_field, is_valid_tensor_name, plane_byte, Payload, Scales, TensorEntry,
};
pub use header::field as header_field;
pub use header::Header;
pub use manifest::Manifest;
pub use reader::DeltaFile;
pub(crate) use reader::Tables;
#[cfg(feature = "alloc")]
pub use writer::{
    write_delta, DeltaWriter, Encoded, OwnedScales, TensorRecord, TensorShape, WriteError,
};

/// File magic: the first 8 bytes of every delta.
pub const MAGIC: [u8; 8] = *b"BITDELTA";
/// The format version this build reads and writes.
pub const VERSION: u16 = 1;
/// Length of the fixed header.
pub const HEADER_LEN: usize = 64;
/// Length of one tensor-table entry.
pub const ENTRY_LEN: usize = 44;
/// Largest manifest.
pub const MAX_MANIFEST_LEN: u32 = 1 << 20;
/// Largest tensor count.
pub const MAX_TENSORS: u32 = 1 << 20;
/// Largest rank of one tensor.
pub const MAX_RANK: u8 = 8;
/// Largest name area.
pub const MAX_NAMES_LEN: u32 = 64 << 20;
/// Largest tensor name.
pub const MAX_NAME_LEN: u16 = 4096;
/// Largest element count of one tensor (2^40).
pub const MAX_ELEMENTS: u64 = 1 << 40;
/// Largest payload alignment.
pub const MAX_ALIGN: u32 = 4096;
/// Largest variant name in the manifest.
pub const MAX_VARIANT_NAME: usize = 64;
/// Largest absolute scale accepted (anything larger is refused as absurd).
pub const MAX_SCALE: f32 = 1.0e6;
/// Default payload alignment written by [`write_delta`].
pub const DEFAULT_ALIGN: u32 = 8;

/// Fewest sign planes of a `sign-planes` payload (one plane is `sign-groups`).
pub const MIN_PLANES: usize = 2;
/// Most sign planes of a `sign-planes` payload.
pub const MAX_PLANES: usize = 8;

/// Entry flag: group scales are stored as IEEE f16 (otherwise f32).
pub const FLAG_SCALES_F16: u8 = 1;

pub use crate::codec::Codec;

/// Element type of the base tensor a delta entry applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    /// IEEE f32.
    F32 = 1,
    /// IEEE f16.
    F16 = 2,
}

impl DType {
    /// The dtype for an id, or `None`.
    pub const fn from_id(id: u8) -> Option<Self> {
        match id {
            1 => Some(Self::F32),
            2 => Some(Self::F16),
            _ => None,
        }
    }
    /// Bytes per element.
    pub const fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }
    /// Lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
        }
    }
    /// Rounds `values` to what a tensor of this dtype holds (f16: to nearest, ties to even),
    /// with the CPU's half-float conversions where it has them.
    pub fn round(self, values: &mut [f32]) {
        if self == Self::F16 {
            use half::slice::HalfFloatSliceExt;
            let mut h = [half::f16::ZERO; 1024];
            for chunk in values.chunks_mut(h.len()) {
                let h = &mut h[..chunk.len()];
                h.convert_from_f32_slice(chunk);
                h.convert_to_f32_slice(chunk);
            }
        }
    }
}

/// True when `name` is a valid variant name: 1..=64 characters of `[A-Za-z0-9._-]`, not `.` or `..`.
pub fn is_valid_variant_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_VARIANT_NAME
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests;
