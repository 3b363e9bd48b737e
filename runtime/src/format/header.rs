//! The fixed 64-byte header.

use super::{HEADER_LEN, MAGIC, MAX_ALIGN, VERSION};
use crate::error::FormatError;

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

pub(crate) fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
pub(crate) fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Header {
    /// Reads and checks the header: length, magic, checksum, version, reserved fields, alignment.
    /// Layout consistency against the file is checked by [`super::DeltaFile::parse`].
    pub fn parse(bytes: &[u8]) -> Result<Self, FormatError> {
        let b = match bytes.get(..HEADER_LEN) {
            Some(b) => b,
            None => return Err(FormatError::HeaderTruncated { found: bytes.len() }),
        };
        if b[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let stored = u32_at(b, 60);
        let computed = crc32fast::hash(&b[..60]);
        if stored != computed {
            return Err(FormatError::HeaderChecksum {
                expected: stored,
                found: computed,
            });
        }
        let version = u16_at(b, 8);
        if version != VERSION {
            return Err(FormatError::UnsupportedVersion { found: version });
        }
        for off in [10usize, 52, 56] {
            let nonzero = if off == 10 {
                u16_at(b, off) != 0
            } else {
                u32_at(b, off) != 0
            };
            if nonzero {
                return Err(FormatError::ReservedNotZero { offset: off as u64 });
            }
        }
        let alignment = u32_at(b, 12);
        if !alignment.is_power_of_two() || alignment > MAX_ALIGN {
            return Err(FormatError::BadAlignment { found: alignment });
        }
        Ok(Self {
            version,
            alignment,
            manifest_len: u32_at(b, 16),
            tensor_count: u32_at(b, 20),
            dims_count: u32_at(b, 24),
            names_len: u32_at(b, 28),
            payload_offset: u64_at(b, 32),
            file_len: u64_at(b, 40),
            meta_crc: u32_at(b, 48),
        })
    }

    /// Encodes the header, computing its checksum.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.alignment.to_le_bytes());
        b[16..20].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[20..24].copy_from_slice(&self.tensor_count.to_le_bytes());
        b[24..28].copy_from_slice(&self.dims_count.to_le_bytes());
        b[28..32].copy_from_slice(&self.names_len.to_le_bytes());
        b[32..40].copy_from_slice(&self.payload_offset.to_le_bytes());
        b[40..48].copy_from_slice(&self.file_len.to_le_bytes());
        b[48..52].copy_from_slice(&self.meta_crc.to_le_bytes());
        let crc = crc32fast::hash(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }
}
