//! One tensor-table entry: its 44-byte layout, the checks on it, and the split of its payload.
//!
//! This is the only place the entry's byte layout and the per-entry rules of `docs/FORMAT.md`
//! (§5 and §8) are written down. The reader, the streaming decoder and the writers all go
//! through [`RawEntry`] and [`RawEntry::check`], so a writer cannot produce an entry the reader
//! refuses.

use super::{
    Codec, DType, ENTRY_LEN, FLAG_SCALES_F16, MAX_ELEMENTS, MAX_NAME_LEN, MAX_PLANES, MAX_RANK,
    MAX_SCALE, MIN_PLANES,
};
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
        if name_len > MAX_NAME_LEN {
            return Err(FormatError::CapExceeded {
                cap: Cap::NameLen,
                found: name_len.into(),
                max: MAX_NAME_LEN.into(),
            });
        }
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
        if rank > MAX_RANK {
            return Err(FormatError::CapExceeded {
                cap: Cap::Rank,
                found: rank.into(),
                max: MAX_RANK.into(),
            });
        }
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
        if numel > MAX_ELEMENTS {
            return Err(FormatError::CapExceeded {
                cap: Cap::Elements,
                found: numel,
                max: MAX_ELEMENTS,
            });
        }
        let (flags, groups, scale, len) = (self.flags, self.groups, self.scale, self.len);
        if flags & !FLAG_SCALES_F16 != 0 {
            return Err(FormatError::ReservedNotZero {
                offset: entry_off + field::FLAGS as u64,
            });
        }
        let has_groups = matches!(
            codec,
            Codec::SignGroups | Codec::Q8Groups | Codec::SignPlanes
        );
        if !has_groups && (groups != 0 || flags != 0) && codec != Codec::Sign {
            return Err(FormatError::FieldNotZero { index: i });
        }
        if codec == Codec::Sign && (groups != 1 || flags != 0) {
            return Err(FormatError::BadGroups {
                index: i,
                found: groups,
            });
        }
        if codec != Codec::Sign && scale.to_bits() != 0 {
            return Err(FormatError::FieldNotZero { index: i });
        }
        if has_groups && (groups == 0 || !numel.is_multiple_of(u64::from(groups))) {
            return Err(FormatError::BadGroups {
                index: i,
                found: groups,
            });
        }
        let expected_len = payload_len(codec, numel, groups, flags, len);
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

/// The payload length the entry fields imply (`docs/FORMAT.md` §8). For `sign-planes` the plane
/// count comes from the stored length `len`: the result is `len` when it is a whole number of
/// planes in [`MIN_PLANES`]`..=`[`MAX_PLANES`], else the nearest valid length.
///
/// `groups <= 2^32` and `numel <= 2^40` (checked before): no overflow.
fn payload_len(codec: Codec, numel: u64, groups: u32, flags: u8, len: u64) -> u64 {
    let scales = u64::from(groups) * scale_size(flags);
    match codec {
        Codec::Unchanged => 0,
        Codec::RawF32 => numel * 4,
        Codec::RawF16 => numel * 2,
        Codec::Sign => numel.div_ceil(8),
        Codec::SignGroups => scales + numel.div_ceil(8),
        Codec::Q8Groups => scales + numel,
        Codec::SignPlanes => match planes_for_len(len, scales + numel.div_ceil(8)) {
            Ok(_) => len,
            Err(expected) => expected,
        },
    }
}

/// Length of one plane of a `sign-planes` payload (its scales and its sign bits), the unit its
/// payload length is a multiple of. `None` on overflow.
pub(crate) fn plane_len(numel: u64, groups: u32, flags: u8) -> Option<u64> {
    u64::from(groups)
        .checked_mul(scale_size(flags))?
        .checked_add(numel.div_ceil(8))
}

/// The plane count of a `sign-planes` payload of `len` bytes, or the length expected (the
/// nearest valid one) when `len` is not a whole number of planes in
/// [`MIN_PLANES`]`..=`[`MAX_PLANES`].
pub(crate) fn planes_for_len(len: u64, plane: u64) -> Result<usize, u64> {
    let k = len / plane.max(1);
    let valid = (MIN_PLANES as u64..=MAX_PLANES as u64).contains(&k);
    if valid && k * plane == len {
        Ok(k as usize)
    } else {
        Err(k.clamp(MIN_PLANES as u64, MAX_PLANES as u64) * plane)
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

/// The payload of one tensor, split by codec. Obtained from [`TensorEntry::payload`].
#[derive(Clone, Copy, Debug)]
pub enum Payload<'a> {
    /// No change.
    Unchanged,
    /// Replacement values, f32 little-endian.
    RawF32(&'a [u8]),
    /// Replacement values, f16 little-endian.
    RawF16(&'a [u8]),
    /// Sign bits with one scale per tensor.
    Sign {
        /// The scale.
        scale: f32,
        /// `ceil(n/8)` bytes of sign bits.
        bits: &'a [u8],
    },
    /// Sign bits with one scale per group.
    SignGroups {
        /// One scale per group.
        scales: Scales<'a>,
        /// `ceil(n/8)` bytes of sign bits.
        bits: &'a [u8],
    },
    /// 8-bit deltas with one scale per group.
    Q8Groups {
        /// One scale per group.
        scales: Scales<'a>,
        /// `n` signed bytes.
        q: &'a [u8],
    },
    /// `planes` sign bit-planes, each with one scale per group.
    SignPlanes {
        /// Number of planes `k`, in [`MIN_PLANES`]`..=`[`MAX_PLANES`].
        planes: usize,
        /// `k * G` scales, plane after plane: scale `j * G + g` is plane `j`'s scale of group `g`.
        scales: Scales<'a>,
        /// `k * ceil(n/8)` bytes, interleaved by byte: byte `r * k + j` holds the bits of
        /// elements `8r .. 8r + 8` in plane `j` (see [`plane_byte`]).
        bits: &'a [u8],
    },
}

/// Index, in the interleaved bits of a `sign-planes` payload with `planes` planes, of the byte
/// that holds element `i`'s bit of plane `j` (at bit `i % 8`).
pub const fn plane_byte(planes: usize, i: usize, j: usize) -> usize {
    (i / 8) * planes + j
}

/// One entry of the tensor table.
#[derive(Clone, Copy, Debug)]
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
    dims: &'a [u8],
    /// Payload length in bytes (equal to `payload.len()` for entries of a [`super::DeltaFile`]).
    len: u64,
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
    /// Payload length in bytes, as stored in the table.
    pub(crate) fn payload_len(&self) -> u64 {
        self.len
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
    /// Bytes of group scales at the start of the payload (`planes` tables for `sign-planes`).
    pub(crate) fn scale_bytes(&self) -> u64 {
        match self.codec {
            Codec::SignGroups | Codec::Q8Groups => u64::from(self.groups) * scale_size(self.flags),
            Codec::SignPlanes => {
                u64::from(self.groups) * scale_size(self.flags) * self.planes() as u64
            }
            _ => 0,
        }
    }
    /// Number of sign planes: `k` for `sign-planes` (payload length / plane length), 1 for
    /// `sign` and `sign-groups`, 0 for the other codecs.
    pub fn planes(&self) -> usize {
        match self.codec {
            Codec::Sign | Codec::SignGroups => 1,
            // Entries are checked at parse time, so the length is a whole number of planes.
            Codec::SignPlanes => plane_len(self.numel(), self.groups, self.flags)
                .map_or(0, |p| (self.len / p.max(1)) as usize),
            _ => 0,
        }
    }

    /// Checks the payload (CRC32, scales, sign padding bits, 8-bit range) and splits it.
    pub fn payload(&self) -> Result<Payload<'a>, FormatError> {
        self.split_payload(self.payload)
    }

    /// Checks `bytes` as this entry's payload (CRC32, scales, sign padding bits, 8-bit range)
    /// and splits it.
    pub(crate) fn split_payload<'p>(&self, bytes: &'p [u8]) -> Result<Payload<'p>, FormatError> {
        let found = crc32fast::hash(bytes);
        if found != self.crc {
            return Err(FormatError::PayloadChecksum {
                index: self.index,
                expected: self.crc,
                found,
            });
        }
        let n = self.numel() as usize;
        let split_scales = |p: &'p [u8], planes: usize| {
            // Entries from `DeltaFile` always fit; a caller-edited entry gets an error, not a panic.
            let (s, rest) = (self.groups as usize)
                .checked_mul(planes)
                .and_then(|c| c.checked_mul(scale_size(self.flags) as usize))
                .and_then(|at| p.split_at_checked(at))
                .ok_or(FormatError::BadGroups {
                    index: self.index,
                    found: self.groups,
                })?;
            let scales = Scales::new(self.flags, s);
            scales.check(self.index)?;
            Ok::<_, FormatError>((scales, rest))
        };
        let check_bits = |bits: &[u8]| {
            if crate::pack::padding_bits_clear(bits, n) {
                Ok(())
            } else {
                Err(FormatError::SignPaddingNotZero { index: self.index })
            }
        };
        Ok(match self.codec {
            Codec::Unchanged => Payload::Unchanged,
            Codec::RawF32 => Payload::RawF32(bytes),
            Codec::RawF16 => Payload::RawF16(bytes),
            Codec::Sign => {
                check_scale(self.scale, self.index, 0)?;
                check_bits(bytes)?;
                Payload::Sign {
                    scale: self.scale,
                    bits: bytes,
                }
            }
            Codec::SignGroups => {
                let (scales, bits) = split_scales(bytes, 1)?;
                check_bits(bits)?;
                Payload::SignGroups { scales, bits }
            }
            Codec::Q8Groups => {
                let (scales, q) = split_scales(bytes, 1)?;
                if q.contains(&0x80) {
                    return Err(FormatError::Q8OutOfRange { index: self.index });
                }
                Payload::Q8Groups { scales, q }
            }
            Codec::SignPlanes => {
                let planes = self.planes();
                let (scales, bits) = split_scales(bytes, planes)?;
                let row = n.div_ceil(8);
                if planes == 0 || bits.len() != planes * row {
                    return Err(FormatError::BadGroups {
                        index: self.index,
                        found: self.groups,
                    });
                }
                // The last row holds the last byte of every plane.
                let last = &bits[(row - 1) * planes..];
                if !last
                    .iter()
                    .all(|&b| crate::pack::padding_bits_clear(&[b], (n - 1) % 8 + 1))
                {
                    return Err(FormatError::SignPaddingNotZero { index: self.index });
                }
                Payload::SignPlanes {
                    planes,
                    scales,
                    bits,
                }
            }
        })
    }
}
