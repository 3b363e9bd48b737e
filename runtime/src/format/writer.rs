//! Writing a delta file (needs `alloc`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::{
    is_valid_variant_name, Codec, DType, Header, Manifest, ENTRY_LEN, FLAG_SCALES_F16, HEADER_LEN,
    MAX_ALIGN, MAX_RANK, VERSION,
};

/// Group scales to be written.
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedScales {
    /// Stored as IEEE f16.
    F16(Vec<half::f16>),
    /// Stored as f32.
    F32(Vec<f32>),
}

impl OwnedScales {
    /// Number of scales.
    pub fn len(&self) -> usize {
        match self {
            Self::F16(v) => v.len(),
            Self::F32(v) => v.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn is_f16(&self) -> bool {
        matches!(self, Self::F16(_))
    }
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::F16(v) => v
                .iter()
                .for_each(|s| out.extend_from_slice(&s.to_le_bytes())),
            Self::F32(v) => v
                .iter()
                .for_each(|s| out.extend_from_slice(&s.to_le_bytes())),
        }
    }
}

/// An encoded tensor payload.
#[derive(Clone, Debug, PartialEq)]
pub enum Encoded {
    /// Equal to the base.
    Unchanged,
    /// Replacement values.
    RawF32(Vec<f32>),
    /// Replacement values as f16.
    RawF16(Vec<half::f16>),
    /// Sign bits with one f32 scale.
    Sign {
        /// Scale.
        scale: f32,
        /// Packed sign bits.
        bits: Vec<u8>,
    },
    /// Sign bits with group scales.
    SignGroups {
        /// Scales.
        scales: OwnedScales,
        /// Packed sign bits.
        bits: Vec<u8>,
    },
    /// 8-bit deltas with group scales.
    Q8Groups {
        /// Scales.
        scales: OwnedScales,
        /// Values in -127..=127.
        q: Vec<i8>,
    },
    /// Sign bit-planes with group scales per plane (layout of [`super::Payload::SignPlanes`]).
    SignPlanes {
        /// Number of planes `k`, in [`super::MIN_PLANES`]`..=`[`super::MAX_PLANES`].
        planes: usize,
        /// `k * G` scales, plane after plane.
        scales: OwnedScales,
        /// `k * ceil(n/8)` bytes of sign bits, interleaved by byte ([`super::plane_byte`]).
        bits: Vec<u8>,
    },
}

impl Encoded {
    /// The codec of this payload.
    pub fn codec(&self) -> Codec {
        match self {
            Self::Unchanged => Codec::Unchanged,
            Self::RawF32(_) => Codec::RawF32,
            Self::RawF16(_) => Codec::RawF16,
            Self::Sign { .. } => Codec::Sign,
            Self::SignGroups { .. } => Codec::SignGroups,
            Self::Q8Groups { .. } => Codec::Q8Groups,
            Self::SignPlanes { .. } => Codec::SignPlanes,
        }
    }
    /// Scale-group count `G` as stored in the entry (0 for codecs without group scales).
    pub fn groups(&self) -> usize {
        match self {
            Self::Sign { .. } => 1,
            Self::SignGroups { scales, .. } | Self::Q8Groups { scales, .. } => scales.len(),
            Self::SignPlanes { planes, scales, .. } => scales.len() / (*planes).max(1),
            _ => 0,
        }
    }
    /// Payload length in bytes.
    pub fn payload_len(&self) -> usize {
        match self {
            Self::Unchanged => 0,
            Self::RawF32(v) => v.len() * 4,
            Self::RawF16(v) => v.len() * 2,
            Self::Sign { bits, .. } => bits.len(),
            Self::SignGroups { scales, bits } => {
                scales.len() * if scales.is_f16() { 2 } else { 4 } + bits.len()
            }
            Self::Q8Groups { scales, q } => {
                scales.len() * if scales.is_f16() { 2 } else { 4 } + q.len()
            }
            Self::SignPlanes { scales, bits, .. } => {
                scales.len() * if scales.is_f16() { 2 } else { 4 } + bits.len()
            }
        }
    }
    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::Unchanged => {}
            Self::RawF32(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Self::RawF16(v) => v
                .iter()
                .for_each(|x| out.extend_from_slice(&x.to_le_bytes())),
            Self::Sign { bits, .. } => out.extend_from_slice(bits),
            Self::SignGroups { scales, bits } | Self::SignPlanes { scales, bits, .. } => {
                scales.write(out);
                out.extend_from_slice(bits);
            }
            Self::Q8Groups { scales, q } => {
                scales.write(out);
                out.extend(q.iter().map(|&v| v as u8));
            }
        }
    }
}

/// One tensor to write.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRecord {
    /// Name (as in the base model).
    pub name: String,
    /// Base dtype.
    pub dtype: DType,
    /// Dimensions.
    pub dims: Vec<u32>,
    /// Encoded payload.
    pub encoded: Encoded,
}

/// Why a delta could not be written.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteError {
    /// The variant name is not valid.
    BadVariantName,
    /// Two tensors have the same name.
    DuplicateName(String),
    /// A tensor's payload does not fit its shape.
    Inconsistent(String),
    /// The alignment is not a power of two in `1..=4096`.
    BadAlignment(u32),
    /// Too large for the format.
    TooLarge,
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadVariantName => write!(
                f,
                "bad variant name: expected 1 to 64 characters from [A-Za-z0-9._-]"
            ),
            Self::DuplicateName(n) => write!(f, "duplicate tensor name {n:?}"),
            Self::Inconsistent(n) => {
                write!(f, "tensor {n:?}: payload does not fit its shape, or a scale/value/name is out of range")
            }
            Self::BadAlignment(a) => write!(
                f,
                "bad alignment {a}: expected a power of two from 1 to 4096"
            ),
            Self::TooLarge => write!(f, "delta too large for format version 1"),
        }
    }
}

impl core::error::Error for WriteError {}

/// The padding bits after element `n` of every plane's last byte are clear.
fn planes_padding_clear(bits: &[u8], planes: usize, n: u64) -> bool {
    let row = n.div_ceil(8) as usize;
    let used = ((n - 1) % 8 + 1) as usize;
    bits.get((row - 1) * planes..).is_some_and(|last| {
        last.iter()
            .all(|&b| crate::pack::padding_bits_clear(&[b], used))
    })
}

/// Writes a complete delta file. Tensors are sorted by name; `manifest.params` is filled in.
/// The output parses with [`super::DeltaFile::parse`].
pub fn write_delta(
    manifest: &Manifest<'_>,
    tensors: &mut [TensorRecord],
    alignment: u32,
) -> Result<Vec<u8>, WriteError> {
    if !is_valid_variant_name(manifest.name) {
        return Err(WriteError::BadVariantName);
    }
    if !alignment.is_power_of_two() || alignment > MAX_ALIGN {
        return Err(WriteError::BadAlignment(alignment));
    }
    tensors.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    for w in tensors.windows(2) {
        if w[0].name == w[1].name {
            return Err(WriteError::DuplicateName(w[1].name.clone()));
        }
    }
    let mut params = 0u64;
    for t in tensors.iter() {
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(u64::from(d)));
        let Some(n) = n.filter(|&n| n <= super::MAX_ELEMENTS) else {
            return Err(WriteError::TooLarge);
        };
        let ok = t.dims.len() <= MAX_RANK as usize
            && t.dims.iter().all(|&d| d > 0)
            && match &t.encoded {
                Encoded::Unchanged => true,
                Encoded::RawF32(v) => v.len() as u64 == n,
                Encoded::RawF16(v) => v.len() as u64 == n,
                Encoded::Sign { bits, .. } => bits.len() as u64 == n.div_ceil(8),
                Encoded::SignGroups { scales, bits } => {
                    !scales.is_empty()
                        && n.is_multiple_of(scales.len() as u64)
                        && bits.len() as u64 == n.div_ceil(8)
                }
                Encoded::Q8Groups { scales, q } => {
                    !scales.is_empty()
                        && n.is_multiple_of(scales.len() as u64)
                        && q.len() as u64 == n
                }
                Encoded::SignPlanes {
                    planes,
                    scales,
                    bits,
                } => {
                    let k = *planes as u64;
                    let g = t.encoded.groups() as u64;
                    (super::MIN_PLANES..=super::MAX_PLANES).contains(planes)
                        && g > 0
                        && scales.len() as u64 == k * g
                        && n.is_multiple_of(g)
                        && u32::try_from(g).is_ok()
                        && bits.len() as u64 == k * n.div_ceil(8)
                        && planes_padding_clear(bits, *planes, n)
                }
            };
        let scale_ok = |v: f32| v.is_finite() && (0.0..=super::MAX_SCALE).contains(&v);
        let scales_ok = match &t.encoded {
            Encoded::Sign { scale, .. } => scale_ok(*scale),
            Encoded::SignGroups { scales, .. }
            | Encoded::Q8Groups { scales, .. }
            | Encoded::SignPlanes { scales, .. } => match scales {
                OwnedScales::F16(v) => v.iter().all(|s| scale_ok(s.to_f32())),
                OwnedScales::F32(v) => v.iter().all(|&s| scale_ok(s)),
            },
            _ => true,
        };
        let q_ok = !matches!(&t.encoded, Encoded::Q8Groups { q, .. } if q.contains(&i8::MIN));
        if !ok
            || !scales_ok
            || !q_ok
            || t.name.is_empty()
            || t.name.len() > usize::from(super::MAX_NAME_LEN)
        {
            return Err(WriteError::Inconsistent(t.name.clone()));
        }
        params += n;
    }
    let manifest = Manifest {
        params,
        ..manifest.clone()
    };
    let manifest_b = postcard::to_allocvec(&manifest).map_err(|_| WriteError::TooLarge)?;

    let a = alignment as usize;
    let mut payloads = Vec::new();
    let mut table = Vec::with_capacity(tensors.len() * ENTRY_LEN);
    let mut dims = Vec::new();
    let mut names = Vec::new();
    let mut dims_count = 0u32;
    for t in tensors.iter() {
        payloads.resize(payloads.len().div_ceil(a) * a, 0);
        let off = payloads.len();
        t.encoded.write(&mut payloads);
        let len = payloads.len() - off;
        let (groups, scale, flags) = match &t.encoded {
            Encoded::Sign { scale, .. } => (1u32, *scale, 0u8),
            Encoded::SignGroups { scales, .. }
            | Encoded::Q8Groups { scales, .. }
            | Encoded::SignPlanes { scales, .. } => (
                // Checked above to fit a u32.
                t.encoded.groups() as u32,
                0.0,
                if scales.is_f16() { FLAG_SCALES_F16 } else { 0 },
            ),
            _ => (0, 0.0, 0),
        };
        let name_len = u16::try_from(t.name.len()).map_err(|_| WriteError::TooLarge)?;
        table.extend_from_slice(&(off as u64).to_le_bytes());
        table.extend_from_slice(&(len as u64).to_le_bytes());
        table.extend_from_slice(&(names.len() as u32).to_le_bytes());
        table.extend_from_slice(&name_len.to_le_bytes());
        table.push(t.encoded.codec() as u8);
        table.push(t.dtype as u8);
        table.extend_from_slice(&dims_count.to_le_bytes());
        table.push(t.dims.len() as u8);
        table.push(flags);
        table.extend_from_slice(&0u16.to_le_bytes());
        table.extend_from_slice(&groups.to_le_bytes());
        table.extend_from_slice(&scale.to_le_bytes());
        table.extend_from_slice(&crc32fast::hash(&payloads[off..]).to_le_bytes());
        names.extend_from_slice(t.name.as_bytes());
        for &d in &t.dims {
            dims.extend_from_slice(&d.to_le_bytes());
        }
        dims_count += t.dims.len() as u32;
    }
    let meta_end = (HEADER_LEN + manifest_b.len() + table.len() + dims.len() + names.len()) as u64;
    let payload_offset = meta_end.div_ceil(a as u64) * a as u64;
    let file_len = payload_offset + payloads.len() as u64;
    let mut out = Vec::with_capacity(usize::try_from(file_len).map_err(|_| WriteError::TooLarge)?);
    out.resize(HEADER_LEN, 0);
    out.extend_from_slice(&manifest_b);
    out.extend_from_slice(&table);
    out.extend_from_slice(&dims);
    out.extend_from_slice(&names);
    out.resize(payload_offset as usize, 0);
    let meta_crc = crc32fast::hash(&out[HEADER_LEN..]);
    out.extend_from_slice(&payloads);
    debug_assert_eq!(out.len() as u64, file_len);
    let header = Header {
        version: VERSION,
        alignment,
        manifest_len: u32::try_from(manifest_b.len()).map_err(|_| WriteError::TooLarge)?,
        tensor_count: u32::try_from(tensors.len()).map_err(|_| WriteError::TooLarge)?,
        dims_count,
        names_len: u32::try_from(names.len()).map_err(|_| WriteError::TooLarge)?,
        payload_offset,
        file_len,
        meta_crc,
    };
    out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
    Ok(out)
}
