//! One tensor-table entry: its 44-byte layout, the checks on it, and the split of its payload.
//!
//! This is the only place the entry's byte layout and the per-entry rules of `docs/FORMAT.md`
//! (§5 and §8) are written down. The reader, the streaming decoder and the writers all go
//! through [`RawEntry`] and [`RawEntry::check`], so a writer cannot produce an entry the reader
//! refuses.

use super::{
    Codec, DType, ENTRY_LEN, FLAG_SCALES_F16, MAX_ELEMENTS, MAX_NAME_LEN, MAX_RANK, MAX_SCALE,
};
use crate::codec::Fields;
pub use crate::codec::{plane_byte, Payload};
use crate::error::{Cap, FormatError};

/// Byte offsets of the fields of one 44-byte table entry (`docs/FORMAT.md` §5), little-endian.
pub mod field {
    /// u64: payload offset, relative to `payload_offset`.
    pub const OFFSET: usize = 0;
    /// u64: payload length.
    pub const LEN: usize = 8;
    /// u32: offset of the name in the names area.
    pub const NAME_OFF: usize = 16;
    /// u16: name length.
    pub const NAME_LEN: usize = 20;
    /// u8: codec id.
    pub const CODEC: usize = 22;
    /// u8: dtype id.
    pub const DTYPE: usize = 23;
    /// u32: index of the first dimension in the dims area.
    pub const DIMS_START: usize = 24;
    /// u8: rank.
    pub const RANK: usize = 28;
    /// u8: flags.
    pub const FLAGS: usize = 29;
    /// u16: reserved, zero.
    pub const RESERVED: usize = 30;
    /// u32: scale-group count.
    pub const GROUPS: usize = 32;
    /// f32: per-tensor scale.
    pub const SCALE: usize = 36;
    /// u32: CRC32 of the payload.
    pub const CRC: usize = 40;
}

/// Reads `N` little-endian bytes at `at` (the callers index inside fixed-size arrays).
pub(crate) fn le<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

/// The fields of one table entry as stored, before any check.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct RawEntry {
    pub(crate) offset: u64,
    pub(crate) len: u64,
    pub(crate) name_off: u32,
    pub(crate) name_len: u16,
    pub(crate) codec: u8,
    pub(crate) dtype: u8,
    pub(crate) dims_start: u32,
    pub(crate) rank: u8,
    pub(crate) flags: u8,
    pub(crate) reserved: u16,
    pub(crate) groups: u32,
    pub(crate) scale: f32,
    pub(crate) crc: u32,
}

impl RawEntry {
    /// Decodes the entry layout.
    pub(crate) fn from_bytes(e: &[u8; ENTRY_LEN]) -> Self {
        use field::*;
        Self {
            offset: u64::from_le_bytes(le(e, OFFSET)),
            len: u64::from_le_bytes(le(e, LEN)),
            name_off: u32::from_le_bytes(le(e, NAME_OFF)),
            name_len: u16::from_le_bytes(le(e, NAME_LEN)),
            codec: e[CODEC],
            dtype: e[DTYPE],
            dims_start: u32::from_le_bytes(le(e, DIMS_START)),
            rank: e[RANK],
            flags: e[FLAGS],
            reserved: u16::from_le_bytes(le(e, RESERVED)),
            groups: u32::from_le_bytes(le(e, GROUPS)),
            scale: f32::from_le_bytes(le(e, SCALE)),
            crc: u32::from_le_bytes(le(e, CRC)),
        }
    }

    /// Encodes the entry layout.
    #[cfg(feature = "alloc")]
    pub(crate) fn to_bytes(self) -> [u8; ENTRY_LEN] {
        use field::*;
        let mut e = [0u8; ENTRY_LEN];
        let mut put = |at: usize, v: &[u8]| e[at..at + v.len()].copy_from_slice(v);
        put(OFFSET, &self.offset.to_le_bytes());
        put(LEN, &self.len.to_le_bytes());
        put(NAME_OFF, &self.name_off.to_le_bytes());
        put(NAME_LEN, &self.name_len.to_le_bytes());
        put(CODEC, &[self.codec]);
        put(DTYPE, &[self.dtype]);
        put(DIMS_START, &self.dims_start.to_le_bytes());
        put(RANK, &[self.rank]);
        put(FLAGS, &[self.flags]);
        put(RESERVED, &self.reserved.to_le_bytes());
        put(GROUPS, &self.groups.to_le_bytes());
        put(SCALE, &self.scale.to_le_bytes());
        put(CRC, &self.crc.to_le_bytes());
        e
    }

    /// Checks everything about entry `index` that does not depend on other entries, and resolves
    /// its name and dims in the `names` and `dims` areas. `entry_off` is the entry's absolute
    /// offset in the file (for error offsets); its payload must lie inside `file_len` bytes.
    ///
    /// The returned entry has no payload bytes.
    pub(crate) fn check<'a>(
        &self,
        index: u32,
        entry_off: u64,
        names: &'a [u8],
        dims: &'a [u8],
        payload_offset: u64,
        file_len: u64,
    ) -> Result<TensorEntry<'a>, FormatError> {
        let i = index;
        if self.reserved != 0 {
            return Err(FormatError::ReservedNotZero {
                offset: entry_off + field::RESERVED as u64,
            });
        }
        let name_len = self.name_len;
        Cap::NameLen.check(name_len.into(), MAX_NAME_LEN.into())?;
        let name_off = self.name_off as usize;
        let name = name_off
            .checked_add(name_len as usize)
            .and_then(|end| names.get(name_off..end))
            .and_then(|b| core::str::from_utf8(b).ok())
            .filter(|s| is_valid_tensor_name(s))
            .ok_or(FormatError::BadTensorName { index: i })?;
        let codec = Codec::from_id(self.codec).ok_or(FormatError::UnknownCodec {
            index: i,
            found: self.codec,
        })?;
        let dtype = DType::from_id(self.dtype).ok_or(FormatError::UnknownDType {
            index: i,
            found: self.dtype,
        })?;
        let rank = self.rank;
        Cap::Rank.check(rank.into(), MAX_RANK.into())?;
        let dims = (self.dims_start as usize)
            .checked_mul(4)
            .and_then(|s| Some((s, s.checked_add(rank as usize * 4)?)))
            .and_then(|(s, end)| dims.get(s..end))
            .ok_or(FormatError::DimsOutOfBounds { index: i })?;
        let mut numel = 1u64;
        for c in dims.chunks_exact(4) {
            let d = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if d == 0 {
                return Err(FormatError::ZeroDim { index: i });
            }
            numel = numel.saturating_mul(d.into());
        }
        Cap::Elements.check(numel, MAX_ELEMENTS)?;
        let (flags, groups, scale, len) = (self.flags, self.groups, self.scale, self.len);
        if flags & !FLAG_SCALES_F16 != 0 {
            return Err(FormatError::ReservedNotZero {
                offset: entry_off + field::FLAGS as u64,
            });
        }
        let f = Fields {
            index: i,
            numel,
            groups,
            flags,
            scale,
            len,
        };
        let expected_len = codec.expected_len(&f)?;
        if len != expected_len {
            return Err(FormatError::PayloadLength {
                index: i,
                expected: expected_len,
                found: len,
            });
        }
        let start = payload_offset
            .checked_add(self.offset)
            .ok_or(FormatError::SizeOverflow)?;
        let end = start.checked_add(len).ok_or(FormatError::SizeOverflow)?;
        // `start <= end` always holds here, so this is "the payload lies inside the file".
        if end > file_len {
            return Err(FormatError::PayloadOffset {
                index: i,
                expected: 0,
                found: self.offset,
            });
        }
        Ok(TensorEntry {
            index: i,
            name,
            codec,
            dtype,
            flags,
            groups,
            scale,
            crc: self.crc,
            offset: start,
            dims,
            len,
            payload: &[],
        })
    }
}

/// The tensor-name rule (`docs/FORMAT.md` §6): 1 to [`MAX_NAME_LEN`] bytes of UTF-8 without
/// control characters.
pub fn is_valid_tensor_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= usize::from(MAX_NAME_LEN)
        && !name.chars().any(char::is_control)
}

/// Bytes per group scale for the entry flags.
pub(crate) const fn scale_size(flags: u8) -> u64 {
    if flags & FLAG_SCALES_F16 != 0 {
        2
    } else {
        4
    }
}

/// The scale rule of `docs/FORMAT.md` §8: finite, `>= 0`, `<= MAX_SCALE`.
pub(crate) fn check_scale(s: f32, index: u32, group: u32) -> Result<(), FormatError> {
    if s.is_finite() && (0.0..=MAX_SCALE).contains(&s) {
        Ok(())
    } else {
        Err(FormatError::BadScale { index, group })
    }
}

/// Group scales of a payload, borrowed from the file.
#[derive(Clone, Copy, Debug)]
pub enum Scales<'a> {
    /// Little-endian IEEE f16 scales.
    F16(&'a [u8]),
    /// Little-endian f32 scales.
    F32(&'a [u8]),
}

impl<'a> Scales<'a> {
    /// The scales of `bytes`, stored as the entry `flags` say.
    pub(crate) fn new(flags: u8, bytes: &'a [u8]) -> Self {
        if scale_size(flags) == 2 {
            Self::F16(bytes)
        } else {
            Self::F32(bytes)
        }
    }
    /// Number of scales.
    pub fn len(&self) -> usize {
        match self {
            Self::F16(b) => b.len() / 2,
            Self::F32(b) => b.len() / 4,
        }
    }
    /// True when there is no scale.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Scale of group `g` widened to f32.
    ///
    /// # Panics
    /// When `g >= self.len()`.
    pub fn get(&self, g: usize) -> f32 {
        match self {
            Self::F16(b) => half::f16::from_le_bytes([b[2 * g], b[2 * g + 1]]).to_f32(),
            Self::F32(b) => {
                f32::from_le_bytes([b[4 * g], b[4 * g + 1], b[4 * g + 2], b[4 * g + 3]])
            }
        }
    }
    /// Checks every scale with the rule of `docs/FORMAT.md` §8.
    pub(crate) fn check(&self, index: u32) -> Result<(), FormatError> {
        (0..self.len()).try_for_each(|g| check_scale(self.get(g), index, g as u32))
    }
}

/// One entry of the tensor table.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorEntry<'a> {
    /// Index in the table.
    pub index: u32,
    /// Tensor name.
    pub name: &'a str,
    /// Codec.
    pub codec: Codec,
    /// Dtype of the base tensor.
    pub dtype: DType,
    /// Entry flags (`FLAG_SCALES_F16`).
    pub flags: u8,
    /// Scale-group count (0 for codecs without groups).
    pub groups: u32,
    /// Per-tensor scale (the `sign` codec), else 0.
    pub scale: f32,
    /// Stored CRC32 of the payload.
    pub crc: u32,
    /// Absolute offset of the payload in the file.
    pub offset: u64,
    /// Payload length in bytes, as stored in the table.
    pub len: u64,
    dims: &'a [u8],
    /// Empty for entries decoded from the meta region alone.
    payload: &'a [u8],
}

impl<'a> TensorEntry<'a> {
    /// Rank.
    pub fn rank(&self) -> usize {
        self.dims.len() / 4
    }
    /// Dimensions, outermost first.
    pub fn dims(&self) -> impl Iterator<Item = u32> + 'a {
        self.dims
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
    }
    /// Number of elements (checked at parse time to fit the caps).
    pub fn numel(&self) -> u64 {
        self.dims().fold(1u64, |a, d| a * d as u64)
    }
    /// Raw payload bytes (not yet checksummed).
    pub fn payload_bytes(&self) -> &'a [u8] {
        self.payload
    }
    /// The same entry over its payload bytes (`bytes.len()` is the entry's payload length).
    pub(crate) fn with_payload(self, bytes: &'a [u8]) -> Self {
        debug_assert_eq!(bytes.len() as u64, self.len);
        Self {
            payload: bytes,
            ..self
        }
    }
    /// Length of the sign-bit section (0 for codecs without signs).
    pub fn sign_bytes(&self) -> u64 {
        self.planes() as u64 * self.numel().div_ceil(8)
    }
    /// The entry fields a codec's layout reads.
    fn fields(&self) -> Fields {
        Fields {
            index: self.index,
            numel: self.numel(),
            groups: self.groups,
            flags: self.flags,
            scale: self.scale,
            len: self.len,
        }
    }
    /// What this entry's decoder needs besides the body, `scales` its group scales.
    pub(crate) fn params<'s>(&self, scales: &'s [u8]) -> crate::codec::Params<'s> {
        self.codec.params(
            &self.fields(),
            crate::format::Scales::new(self.flags, scales),
        )
    }
    /// Bytes of group scales at the start of the payload (`planes` tables for `sign-planes`).
    pub(crate) fn scale_bytes(&self) -> u64 {
        self.codec.scale_bytes(&self.fields())
    }
    /// Number of sign planes: `k` for `sign-planes` (payload length / plane length), 1 for
    /// `sign` and `sign-groups`, 0 for the other codecs.
    pub fn planes(&self) -> usize {
        self.codec.planes(&self.fields())
    }

    /// Checks the payload (CRC32, scales, sign padding bits, 8-bit range, sparse indices) and
    /// splits it.
    pub fn payload(&self) -> Result<Payload<'a>, FormatError> {
        self.split_payload(self.payload)
    }

    /// Checks `bytes` as this entry's payload (CRC32, scales, sign padding bits, 8-bit range,
    /// sparse indices) and splits it.
    pub(crate) fn split_payload<'p>(&self, bytes: &'p [u8]) -> Result<Payload<'p>, FormatError> {
        let found = crc32fast::hash(bytes);
        if found != self.crc {
            return Err(FormatError::PayloadChecksum {
                index: self.index,
                expected: self.crc,
                found,
            });
        }
        let payload = self.codec.split(&self.fields(), bytes)?;
        payload.check(self.index, self.numel())?;
        Ok(payload)
    }
}
