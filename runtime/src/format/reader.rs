//! Parsing and checking a delta from a byte slice, without allocation.

use super::header::{u16_at, u32_at, u64_at};
use super::{
    is_valid_variant_name, Codec, DType, Header, Manifest, ENTRY_LEN, FLAG_SCALES_F16, HEADER_LEN,
    MAX_ELEMENTS, MAX_MANIFEST_LEN, MAX_NAMES_LEN, MAX_NAME_LEN, MAX_PLANES, MAX_RANK, MAX_SCALE,
    MAX_TENSORS, MIN_PLANES,
};
use crate::error::{Cap, Field, FormatError};

/// A parsed delta file borrowing its bytes. Construction checks the whole structure.
#[derive(Clone, Debug)]
pub struct DeltaFile<'a> {
    bytes: &'a [u8],
    header: Header,
    manifest: Manifest<'a>,
    table: &'a [u8],
    dims: &'a [u8],
    names: &'a [u8],
}

/// Group scales of a payload, borrowed from the file.
#[derive(Clone, Copy, Debug)]
pub enum Scales<'a> {
    /// Little-endian IEEE f16 scales.
    F16(&'a [u8]),
    /// Little-endian f32 scales.
    F32(&'a [u8]),
}

impl Scales<'_> {
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

/// Length of one plane of a `sign-planes` payload (its scales and its sign bits), the unit its
/// payload length is a multiple of. `None` on overflow.
pub(crate) fn plane_len(numel: u64, groups: u32, flags: u8) -> Option<u64> {
    let ss: u64 = if flags & FLAG_SCALES_F16 != 0 { 2 } else { 4 };
    u64::from(groups)
        .checked_mul(ss)?
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
    /// Payload length in bytes (equal to `payload.len()` for entries of a [`DeltaFile`]).
    len: u64,
    /// Empty for entries decoded from the meta region alone ([`TensorEntry::decode`]).
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
    /// Length of the sign-bit section (0 for codecs without signs).
    pub fn sign_bytes(&self) -> u64 {
        match self.codec {
            Codec::Sign | Codec::SignGroups => self.numel().div_ceil(8),
            Codec::SignPlanes => self.planes() as u64 * self.numel().div_ceil(8),
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
        let found = crc32fast::hash(self.payload);
        if found != self.crc {
            return Err(FormatError::PayloadChecksum {
                index: self.index,
                expected: self.crc,
                found,
            });
        }
        let n = self.numel() as usize;
        let ss = if self.flags & FLAG_SCALES_F16 != 0 {
            2
        } else {
            4
        };
        let split_scales = |p: &'a [u8], planes: usize| {
            // Entries from `DeltaFile` always fit; a caller-edited entry gets an error, not a panic.
            let (s, rest) = (self.groups as usize)
                .checked_mul(planes)
                .and_then(|c| c.checked_mul(ss))
                .and_then(|at| p.split_at_checked(at))
                .ok_or(FormatError::BadGroups {
                    index: self.index,
                    found: self.groups,
                })?;
            let scales = if ss == 2 {
                Scales::F16(s)
            } else {
                Scales::F32(s)
            };
            for g in 0..scales.len() {
                check_scale(scales.get(g), self.index, g as u32)?;
            }
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
            Codec::RawF32 => Payload::RawF32(self.payload),
            Codec::RawF16 => Payload::RawF16(self.payload),
            Codec::Sign => {
                check_scale(self.scale, self.index, 0)?;
                check_bits(self.payload)?;
                Payload::Sign {
                    scale: self.scale,
                    bits: self.payload,
                }
            }
            Codec::SignGroups => {
                let (scales, bits) = split_scales(self.payload, 1)?;
                check_bits(bits)?;
                Payload::SignGroups { scales, bits }
            }
            Codec::Q8Groups => {
                let (scales, q) = split_scales(self.payload, 1)?;
                if q.contains(&0x80) {
                    return Err(FormatError::Q8OutOfRange { index: self.index });
                }
                Payload::Q8Groups { scales, q }
            }
            Codec::SignPlanes => {
                let planes = self.planes();
                let (scales, bits) = split_scales(self.payload, planes)?;
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

impl<'a> TensorEntry<'a> {
    /// The scale rule of `docs/FORMAT.md` §8 (finite, `>= 0`, `<= MAX_SCALE`), shared with the
    /// streaming decoder so both refuse exactly the same scales.
    pub(crate) fn check_scale(s: f32, index: u32, group: u32) -> Result<(), FormatError> {
        check_scale(s, index, group)
    }

    /// Payload length in bytes, as stored in the table.
    pub(crate) fn payload_len(&self) -> u64 {
        self.len
    }

    /// Decodes entry `i` from the meta region `[HEADER_LEN, payload_offset)` alone, with every
    /// check [`DeltaFile::parse`] makes on one entry; the payload must lie inside `file_len` bytes.
    ///
    /// The returned entry has no payload bytes ([`TensorEntry::payload_bytes`] is empty): only its
    /// metadata is meaningful. Used by the streaming decoder, after [`DeltaFile::check_meta`].
    pub(crate) fn decode(
        header: &Header,
        meta: &'a [u8],
        file_len: u64,
        i: u32,
    ) -> Result<Self, FormatError> {
        Tables::split(header, meta, file_len)?.entry(i)
    }
}

fn check_scale(s: f32, index: u32, group: u32) -> Result<(), FormatError> {
    if s.is_finite() && (0.0..=MAX_SCALE).contains(&s) {
        Ok(())
    } else {
        Err(FormatError::BadScale { index, group })
    }
}

const fn align_up(x: u64, a: u64) -> Option<u64> {
    match x.checked_add(a - 1) {
        Some(v) => Some(v & !(a - 1)),
        None => None,
    }
}

fn cap(cap: Cap, found: u64, max: u64) -> Result<(), FormatError> {
    if found > max {
        Err(FormatError::CapExceeded { cap, found, max })
    } else {
        Ok(())
    }
}

impl Header {
    /// The checks on the header that need the file length but no other byte: the caps on the
    /// four counts, `file_len`, and `payload_offset` (the layout, and inside the file).
    ///
    /// Run after [`Header::parse`]; shared by [`DeltaFile::parse`] and the streaming decoder.
    pub(crate) fn check_layout(&self, file_len: u64) -> Result<(), FormatError> {
        cap(
            Cap::ManifestLen,
            self.manifest_len.into(),
            MAX_MANIFEST_LEN.into(),
        )?;
        cap(Cap::Tensors, self.tensor_count.into(), MAX_TENSORS.into())?;
        cap(
            Cap::Dims,
            self.dims_count.into(),
            u64::from(MAX_TENSORS) * u64::from(MAX_RANK),
        )?;
        cap(Cap::NamesLen, self.names_len.into(), MAX_NAMES_LEN.into())?;
        if self.file_len != file_len {
            return Err(FormatError::LengthMismatch {
                field: Field::FileLen,
                expected: file_len,
                found: self.file_len,
            });
        }
        let meta_end = self.meta_end();
        let align = u64::from(self.alignment);
        let payload_offset = align_up(meta_end, align).ok_or(FormatError::SizeOverflow)?;
        if self.payload_offset != payload_offset {
            return Err(FormatError::LengthMismatch {
                field: Field::PayloadOffset,
                expected: payload_offset,
                found: self.payload_offset,
            });
        }
        if payload_offset > file_len {
            return Err(FormatError::LengthMismatch {
                field: Field::FileLen,
                expected: payload_offset,
                found: file_len,
            });
        }
        Ok(())
    }

    /// End of the names area. Four u32 counts times small factors: this sum cannot overflow u64.
    fn meta_end(&self) -> u64 {
        HEADER_LEN as u64
            + u64::from(self.manifest_len)
            + u64::from(self.tensor_count) * ENTRY_LEN as u64
            + u64::from(self.dims_count) * 4
            + u64::from(self.names_len)
    }
}

/// The tensor table, dims and names areas of the meta region, with what is needed to decode and
/// check entries without the payload bytes.
#[derive(Clone, Copy, Debug)]
struct Tables<'a> {
    header: Header,
    file_len: u64,
    table: &'a [u8],
    dims: &'a [u8],
    names: &'a [u8],
}

impl<'a> Tables<'a> {
    /// Splits the meta region `[HEADER_LEN, payload_offset)` by the header counts; returns the
    /// manifest bytes, the tables and the padding after the names area.
    fn split_meta(
        header: &Header,
        meta: &'a [u8],
        file_len: u64,
    ) -> Result<(&'a [u8], Self, &'a [u8]), FormatError> {
        let take = |rest: &'a [u8], n: u64| {
            usize::try_from(n)
                .ok()
                .and_then(|n| rest.split_at_checked(n))
                .ok_or(FormatError::SizeOverflow)
        };
        let (manifest, rest) = take(meta, header.manifest_len.into())?;
        let (table, rest) = take(rest, u64::from(header.tensor_count) * ENTRY_LEN as u64)?;
        let (dims, rest) = take(rest, u64::from(header.dims_count) * 4)?;
        let (names, padding) = take(rest, header.names_len.into())?;
        let tables = Self {
            header: *header,
            file_len,
            table,
            dims,
            names,
        };
        Ok((manifest, tables, padding))
    }

    fn split(header: &Header, meta: &'a [u8], file_len: u64) -> Result<Self, FormatError> {
        Self::split_meta(header, meta, file_len).map(|(_, t, _)| t)
    }

    /// Walks the table once: names sorted and valid, dims in bounds, codecs known, payload
    /// lengths exact, payloads tiling `[payload_offset, file_len)`, and the element counts
    /// summing to `params`. `gap(from, to)` checks the padding bytes `[from, to)` before each
    /// payload, when the caller has them.
    fn check(
        &self,
        params_expected: u64,
        mut gap: impl FnMut(u64, u64) -> Result<(), FormatError>,
    ) -> Result<(), FormatError> {
        let align = u64::from(self.header.alignment);
        let base = self.header.payload_offset;
        let mut cursor = 0u64; // relative to payload_offset
        let mut prev: Option<&str> = None;
        let mut params = 0u64;
        for i in 0..self.header.tensor_count {
            let e = self.entry(i)?;
            if let Some(p) = prev {
                if p.as_bytes() >= e.name.as_bytes() {
                    return Err(FormatError::NamesNotSorted { index: i });
                }
            }
            prev = Some(e.name);
            let rel = e.offset - base;
            let expected = align_up(cursor, align).ok_or(FormatError::SizeOverflow)?;
            if rel != expected {
                return Err(FormatError::PayloadOffset {
                    index: i,
                    expected,
                    found: rel,
                });
            }
            gap(base + cursor, base + rel)?;
            cursor = rel + e.len;
            params = params
                .checked_add(e.numel())
                .ok_or(FormatError::SizeOverflow)?;
        }
        let total = self.file_len - base;
        if cursor != total {
            return Err(FormatError::LengthMismatch {
                field: Field::FileLen,
                expected: base + cursor,
                found: base + total,
            });
        }
        if params != params_expected {
            return Err(FormatError::ManifestInvalid);
        }
        Ok(())
    }

    /// Decodes entry `i`, checking everything that does not depend on other entries. The entry
    /// has no payload bytes; its payload is checked to lie inside `file_len`.
    fn entry(&self, i: u32) -> Result<TensorEntry<'a>, FormatError> {
        let at = i as usize * ENTRY_LEN;
        let e = at
            .checked_add(ENTRY_LEN)
            .and_then(|end| self.table.get(at..end))
            .ok_or(FormatError::SizeOverflow)?;
        let entry_off = (HEADER_LEN + self.header.manifest_len as usize + at) as u64;
        let offset_rel = u64_at(e, 0);
        let len = u64_at(e, 8);
        let name_off = u32_at(e, 16) as usize;
        let name_len = u16_at(e, 20);
        let codec_id = e[22];
        let dtype_id = e[23];
        let dims_start = u32_at(e, 24) as usize;
        let rank = e[28];
        let flags = e[29];
        let groups = u32_at(e, 32);
        let scale = f32::from_le_bytes([e[36], e[37], e[38], e[39]]);
        let crc = u32_at(e, 40);
        if u16_at(e, 30) != 0 {
            return Err(FormatError::ReservedNotZero {
                offset: entry_off + 30,
            });
        }
        if name_len > MAX_NAME_LEN {
            return Err(FormatError::CapExceeded {
                cap: Cap::NameLen,
                found: name_len.into(),
                max: MAX_NAME_LEN.into(),
            });
        }
        if name_len == 0 {
            return Err(FormatError::BadTensorName { index: i });
        }
        let name = name_off
            .checked_add(name_len as usize)
            .and_then(|end| self.names.get(name_off..end))
            .and_then(|b| core::str::from_utf8(b).ok())
            .filter(|s| !s.chars().any(char::is_control))
            .ok_or(FormatError::BadTensorName { index: i })?;
        let codec = Codec::from_id(codec_id).ok_or(FormatError::UnknownCodec {
            index: i,
            found: codec_id,
        })?;
        let dtype = DType::from_id(dtype_id).ok_or(FormatError::UnknownDType {
            index: i,
            found: dtype_id,
        })?;
        if rank > MAX_RANK {
            return Err(FormatError::CapExceeded {
                cap: Cap::Rank,
                found: rank.into(),
                max: MAX_RANK.into(),
            });
        }
        let dims = dims_start
            .checked_mul(4)
            .and_then(|s| Some((s, s.checked_add(rank as usize * 4)?)))
            .and_then(|(s, end)| self.dims.get(s..end))
            .ok_or(FormatError::DimsOutOfBounds { index: i })?;
        let mut numel = 1u64;
        for c in dims.chunks_exact(4) {
            let d = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            if d == 0 {
                return Err(FormatError::ZeroDim { index: i });
            }
            numel = numel.saturating_mul(d.into());
        }
        cap(Cap::Elements, numel, MAX_ELEMENTS)?;
        if flags & !FLAG_SCALES_F16 != 0 {
            return Err(FormatError::ReservedNotZero {
                offset: entry_off + 29,
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
        let ss: u64 = if flags & FLAG_SCALES_F16 != 0 { 2 } else { 4 };
        let expected_len = match codec {
            Codec::Unchanged => 0,
            Codec::RawF32 => numel * 4,
            Codec::RawF16 => numel * 2,
            Codec::Sign => numel.div_ceil(8),
            Codec::SignGroups => u64::from(groups) * ss + numel.div_ceil(8),
            Codec::Q8Groups => u64::from(groups) * ss + numel,
            Codec::SignPlanes => {
                // `groups <= 2^32` and `numel <= 2^40`: no overflow.
                let plane = u64::from(groups) * ss + numel.div_ceil(8);
                match planes_for_len(len, plane) {
                    Ok(_) => len,
                    Err(expected) => expected,
                }
            }
        };
        if len != expected_len {
            return Err(FormatError::PayloadLength {
                index: i,
                expected: expected_len,
                found: len,
            });
        }
        let base = self.header.payload_offset;
        let start = base
            .checked_add(offset_rel)
            .ok_or(FormatError::SizeOverflow)?;
        let end = start.checked_add(len).ok_or(FormatError::SizeOverflow)?;
        // `start <= end` always holds here, so this is "the payload lies inside the file".
        if end > self.file_len {
            return Err(FormatError::PayloadOffset {
                index: i,
                expected: 0,
                found: offset_rel,
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
            crc,
            offset: start,
            dims,
            len,
            payload: &[],
        })
    }
}

impl<'a> DeltaFile<'a> {
    /// Parses and checks the structure of a whole delta file: header, caps, layout, manifest,
    /// tensor table, names and the tiling of payloads. Payload checksums are checked per tensor by
    /// [`TensorEntry::payload`], or all at once by [`DeltaFile::verify_payloads`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let header = Header::parse(bytes)?;
        let file_len = bytes.len() as u64;
        header.check_layout(file_len)?;
        let meta = bytes
            .get(HEADER_LEN..header.payload_offset as usize)
            .ok_or(FormatError::SizeOverflow)?;
        let (manifest, tables) = Self::check_meta_region(&header, meta, file_len)?;
        tables.check(manifest.params, |from, to| {
            let gap = bytes.get(from as usize..to as usize).unwrap_or(&[]);
            match gap.iter().position(|&b| b != 0) {
                Some(p) => Err(FormatError::PaddingNotZero {
                    offset: from + p as u64,
                }),
                None => Ok(()),
            }
        })?;
        Ok(Self {
            bytes,
            header,
            manifest,
            table: tables.table,
            dims: tables.dims,
            names: tables.names,
        })
    }

    /// Checks the meta region `meta` = bytes `[HEADER_LEN, payload_offset)` of a file of
    /// `file_len` bytes whose `header` passed [`Header::parse`] and [`Header::check_layout`]:
    /// everything [`DeltaFile::parse`] checks except the padding between payloads (which needs
    /// the payload area). Returns the manifest. Used by the streaming decoder.
    pub(crate) fn check_meta(
        header: &Header,
        meta: &'a [u8],
        file_len: u64,
    ) -> Result<Manifest<'a>, FormatError> {
        let (manifest, tables) = Self::check_meta_region(header, meta, file_len)?;
        tables.check(manifest.params, |_, _| Ok(()))?;
        Ok(manifest)
    }

    /// Meta CRC, padding after the names, manifest and variant name.
    fn check_meta_region(
        header: &Header,
        meta: &'a [u8],
        file_len: u64,
    ) -> Result<(Manifest<'a>, Tables<'a>), FormatError> {
        let found = crc32fast::hash(meta);
        if found != header.meta_crc {
            return Err(FormatError::MetaChecksum {
                expected: header.meta_crc,
                found,
            });
        }
        let (manifest_b, tables, padding) = Tables::split_meta(header, meta, file_len)?;
        if let Some(p) = padding.iter().position(|&b| b != 0) {
            return Err(FormatError::PaddingNotZero {
                offset: header.meta_end() + p as u64,
            });
        }
        let manifest = match postcard::take_from_bytes::<Manifest<'a>>(manifest_b) {
            Ok((m, [])) => m,
            _ => return Err(FormatError::ManifestInvalid),
        };
        if !is_valid_variant_name(manifest.name) {
            return Err(FormatError::BadVariantName);
        }
        Ok((manifest, tables))
    }

    fn tables(&self) -> Tables<'a> {
        Tables {
            header: self.header,
            file_len: self.bytes.len() as u64,
            table: self.table,
            dims: self.dims,
            names: self.names,
        }
    }

    /// Decodes entry `i` with its payload bytes.
    fn entry_unchecked(&self, i: u32) -> Result<TensorEntry<'a>, FormatError> {
        let mut e = self.tables().entry(i)?;
        // `Tables::entry` checked that the payload lies inside the file.
        e.payload = usize::try_from(e.offset)
            .ok()
            .zip(usize::try_from(e.offset + e.len).ok())
            .and_then(|(s, end)| self.bytes.get(s..end))
            .ok_or(FormatError::SizeOverflow)?;
        Ok(e)
    }

    /// The header.
    pub fn header(&self) -> &Header {
        &self.header
    }
    /// The manifest.
    pub fn manifest(&self) -> &Manifest<'a> {
        &self.manifest
    }
    /// The whole file.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.header.tensor_count as usize
    }
    /// True when the delta has no tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Entry `i`, or `None` past the end.
    pub fn tensor(&self, i: usize) -> Option<TensorEntry<'a>> {
        let i = u32::try_from(i)
            .ok()
            .filter(|&i| i < self.header.tensor_count)?;
        // parse() checked every entry, so this cannot fail.
        self.entry_unchecked(i).ok()
    }
    /// All entries in table (name) order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorEntry<'a>> + '_ {
        (0..self.len()).filter_map(|i| self.tensor(i))
    }
    /// The entry named `name` (binary search: names are sorted).
    pub fn find(&self, name: &str) -> Option<TensorEntry<'a>> {
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.tensor(mid)?;
            match e.name.as_bytes().cmp(name.as_bytes()) {
                core::cmp::Ordering::Less => lo = mid + 1,
                core::cmp::Ordering::Greater => hi = mid,
                core::cmp::Ordering::Equal => return Some(e),
            }
        }
        None
    }
    /// Total number of parameters covered by the table.
    pub fn params(&self) -> u64 {
        self.tensors().map(|e| e.numel()).sum()
    }
    /// Checks every payload (checksums, scales, padding bits, ranges).
    pub fn verify_payloads(&self) -> Result<(), FormatError> {
        for e in self.tensors() {
            e.payload()?;
        }
        Ok(())
    }
}
