//! The fixed 64-byte header.

use super::entry::le;
use super::{HEADER_LEN, MAGIC, MAX_ALIGN, VERSION};
use crate::error::FormatError;

/// Byte offsets of the fields of the fixed header (`docs/FORMAT.md` §3), little-endian.
pub mod field {
    /// `[u8; 8]`: the magic.
    pub const MAGIC: usize = 0;
    /// u16: format version.
    pub const VERSION: usize = 8;
    /// u16: reserved, zero.
    pub const RESERVED0: usize = 10;
    /// u32: payload alignment.
    pub const ALIGNMENT: usize = 12;
    /// u32: manifest length.
    pub const MANIFEST_LEN: usize = 16;
    /// u32: tensor count.
    pub const TENSORS: usize = 20;
    /// u32: dims count.
    pub const DIMS: usize = 24;
    /// u32: names length.
    pub const NAMES_LEN: usize = 28;
    /// u64: payload offset.
    pub const PAYLOAD_OFFSET: usize = 32;
    /// u64: file length.
    pub const FILE_LEN: usize = 40;
    /// u32: CRC32 of the meta region.
    pub const META_CRC: usize = 48;
    /// u32: reserved, zero.
    pub const RESERVED1: usize = 52;
    /// u32: reserved, zero.
    pub const RESERVED2: usize = 56;
    /// u32: CRC32 of bytes `[0, CRC)`.
    pub const CRC: usize = 60;
}

/// The fixed header of a delta file, as read (before layout checks) or to be written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Format version.
    pub version: u16,
    /// Payload alignment (power of two).
    pub alignment: u32,
    /// Manifest length in bytes.
    pub manifest_len: u32,
    /// Number of tensor-table entries.
    pub tensor_count: u32,
    /// Number of u32 dimension entries.
    pub dims_count: u32,
    /// Length of the name area.
    pub names_len: u32,
    /// Absolute offset of the first payload byte.
    pub payload_offset: u64,
    /// Total file length.
    pub file_len: u64,
    /// CRC32 over `[HEADER_LEN, payload_offset)`.
    pub meta_crc: u32,
}

impl Header {
    /// Reads and checks the header: length, magic, checksum, version, reserved fields, alignment.
    /// Layout consistency against the file is checked by [`super::DeltaFile::parse`].
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let b = match bytes.get(..HEADER_LEN) {
            Some(b) => b,
            None => return Err(FormatError::HeaderTruncated { found: bytes.len() }),
        };
        let u16_at = |o| u16::from_le_bytes(le(b, o));
        let u32_at = |o| u32::from_le_bytes(le(b, o));
        let u64_at = |o| u64::from_le_bytes(le(b, o));
        if b[field::MAGIC..field::MAGIC + 8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = u32_at(field::CRC);
        let computed = crc32fast::hash(&b[..field::CRC]);
        if stored != computed {
            return Err(FormatError::HeaderChecksum {
                expected: stored,
                found: computed,
            });
        }
        let version = u16_at(field::VERSION);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        for (off, nonzero) in [
            (field::RESERVED0, u16_at(field::RESERVED0) != 0),
            (field::RESERVED1, u32_at(field::RESERVED1) != 0),
            (field::RESERVED2, u32_at(field::RESERVED2) != 0),
        ] {
            if nonzero {
                return Err(FormatError::ReservedNotZero { offset: off as u64 });
            }
        }
        let alignment = u32_at(field::ALIGNMENT);
        if !alignment.is_power_of_two() || alignment > MAX_ALIGN {
            return Err(FormatError::BadAlignment { found: alignment });
        }
        Ok(Self {
            version,
            alignment,
            manifest_len: u32_at(field::MANIFEST_LEN),
            tensor_count: u32_at(field::TENSORS),
            dims_count: u32_at(field::DIMS),
            names_len: u32_at(field::NAMES_LEN),
            payload_offset: u64_at(field::PAYLOAD_OFFSET),
            file_len: u64_at(field::FILE_LEN),
            meta_crc: u32_at(field::META_CRC),
        })
    }

    /// Encodes the header, computing its checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        let mut put = |at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(field::MAGIC, &MAGIC);
        put(field::VERSION, &self.version.to_le_bytes());
        put(field::ALIGNMENT, &self.alignment.to_le_bytes());
        put(field::MANIFEST_LEN, &self.manifest_len.to_le_bytes());
        put(field::TENSORS, &self.tensor_count.to_le_bytes());
        put(field::DIMS, &self.dims_count.to_le_bytes());
        put(field::NAMES_LEN, &self.names_len.to_le_bytes());
        put(field::PAYLOAD_OFFSET, &self.payload_offset.to_le_bytes());
        put(field::FILE_LEN, &self.file_len.to_le_bytes());
        put(field::META_CRC, &self.meta_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..field::CRC]);
        b[field::CRC..].copy_from_slice(&crc.to_le_bytes());
        b
    }
}
