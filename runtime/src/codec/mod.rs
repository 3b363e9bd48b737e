//! Codecs: the codec id table here, and one file per codec with its payload layout, its decoder
//! and its encoder.
//!
//! Each codec file ([`raw`] for `raw-f32` and `raw-f16`, `sign`, `sign_groups`, `q8_groups`,
//! `sign_planes`, `sparse_signs`) holds, in this order: the payload layout (the entry fields it
//! uses, the payload length they imply, the split of a payload and the value checks on it,
//! `docs/FORMAT.md` §8), ONE decoder over a payload [`Cursor`] (`docs/FORMAT.md` §9), and the
//! encoder (needs `alloc`). `rounding` chooses the bits of the sign codecs by their effect on a
//! layer's outputs.
//!
//! This file is the codec id table: [`Codec`] (ids and names), the per-codec payload enums
//! [`Payload`] (borrowed, what a decoder reads) and `Encoded` (owned, what an encoder writes), and
//! the one `match` per operation that sends each codec to its file. Everything else goes through
//! these: the format's entry checks and payload split ([`crate::format`]), reconstruction
//! ([`crate::compose`]) and the streaming decoder ([`crate::stream`]). A new codec touches its
//! own file, this table and `docs/FORMAT.md`.
//!
//! May depend on: `core`, `half`, `bytemuck`, [`crate::format`] (entry constants, [`Scales`],
//! errors), [`crate::pack`], [`crate::kernels`]; the encoders also on `alloc` and
//! [`crate::compose`] (its chunk length). No I/O: a decoder reads payload bytes from a
//! [`Cursor`] (a slice in [`crate::compose`], a forward-only reader in [`crate::stream`]).
//! Decoders are `no_std` and allocation-free.
//!
//! Encoders take differences in f64 (`fine - base` of two f32 is exact there), accumulate
//! statistics in f64 and round once to the stored scale type.

#[cfg(feature = "alloc")]
use alloc::vec::Vec;

#[cfg(feature = "alloc")]
use half::f16;

use crate::error::FormatError;
use crate::format::entry::{check_scale, scale_size};
#[cfg(feature = "alloc")]
use crate::format::OwnedScales;
use crate::format::Scales;

mod q8_groups;
mod raw;
#[cfg(feature = "std")]
mod rounding;
mod sign;
mod sign_groups;
mod sign_planes;
mod sparse_signs;

#[cfg(feature = "alloc")]
pub use q8_groups::q8_groups;
#[cfg(feature = "alloc")]
pub use raw::{raw_f16, raw_f32};
#[cfg(feature = "std")]
pub use rounding::{round_signs_to_outputs, OutputRounding, OUTPUT_ROUNDING_DAMP};
#[cfg(feature = "alloc")]
pub use sign::{sign_tensor, sign_tensor_scaled};
#[cfg(feature = "alloc")]
pub use sign_groups::{sign_groups, sign_groups_scaled};
#[cfg(feature = "alloc")]
pub use sign_planes::{sign_planes, sign_planes_multiplied, sign_planes_scaled, PLANE_FIT_ROUNDS};
#[cfg(test)]
pub(crate) use sparse_signs::random_entries;
pub use sparse_signs::{max_entries, MAX_SPARSE_ENTRIES, SPARSE_BLOCK};
#[cfg(feature = "alloc")]
pub use sparse_signs::{sparse_signs, SPARSE_FIT_ROUNDS};

/// How one tensor is stored. The reconstruction rules are in `docs/FORMAT.md`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Codec {
    /// The tensor equals the base: no payload.
    Unchanged = 0,
    /// Full replacement, little-endian f32 values.
    RawF32 = 1,
    /// Full replacement, little-endian IEEE f16 values.
    RawF16 = 2,
    /// The seed recipe: one sign bit per element, one f32 scale per tensor (in the entry).
    Sign = 3,
    /// One sign bit per element, one scale per group (f16 or f32, in the payload).
    SignGroups = 4,
    /// 8-bit symmetric delta per element, one scale per group.
    Q8Groups = 5,
    /// `k` sign bit-planes (residual signs), each with one scale per group: the delta is
    /// `sum_j (±scale_{j,g})`. `k` is `payload length / plane length`, in
    /// [`MIN_PLANES`](crate::format::MIN_PLANES)`..=`[`MAX_PLANES`](crate::format::MAX_PLANES).
    SignPlanes = 6,
    /// Per block of [`SPARSE_BLOCK`] elements, its `m` largest changes (index, level 1 or 2,
    /// sign; one byte each), one scale per group: the delta of a listed element is
    /// `±level·scale_g`, of the others 0. `m` is `body length / blocks`, in
    /// `1..=`[`max_entries`]`(n)`.
    SparseSigns = 7,
}

impl Codec {
    /// The codec for an id, or `None` for an id this build does not know.
    pub const fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::Unchanged,
            1 => Self::RawF32,
            2 => Self::RawF16,
            3 => Self::Sign,
            4 => Self::SignGroups,
            5 => Self::Q8Groups,
            6 => Self::SignPlanes,
            7 => Self::SparseSigns,
            _ => return None,
        })
    }

    /// Short lowercase name used by the CLI and the docs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Unchanged => "unchanged",
            Self::RawF32 => "raw-f32",
            Self::RawF16 => "raw-f16",
            Self::Sign => "sign",
            Self::SignGroups => "sign-groups",
            Self::Q8Groups => "q8-groups",
            Self::SignPlanes => "sign-planes",
            Self::SparseSigns => "sparse-signs",
        }
    }

    /// True when the codec stores group scales in its payload (the entry's `groups` counts them
    /// and `FLAG_SCALES_F16` chooses their type).
    pub const fn has_group_scales(self) -> bool {
        matches!(
            self,
            Self::SignGroups | Self::Q8Groups | Self::SignPlanes | Self::SparseSigns
        )
    }

    /// The type of the scales a tensor of this codec stores, given its entry `flags`: `"f32"` or
    /// `"f16"`, `None` for a codec without scales.
    pub const fn scale_type(self, flags: u8) -> Option<&'static str> {
        if self.has_group_scales() {
            Some(if flags & crate::format::FLAG_SCALES_F16 != 0 {
                "f16"
            } else {
                "f32"
            })
        } else if matches!(self, Self::Sign) {
            // The seed recipe's one scale is the entry's f32 `scale` field.
            Some("f32")
        } else {
            None
        }
    }

    /// The codec's layout: its rules on the entry fields and the payload length they imply.
    fn layout(self) -> &'static Layout {
        match self {
            Self::Unchanged => &UNCHANGED,
            Self::RawF32 => &raw::F32,
            Self::RawF16 => &raw::F16,
            Self::Sign => &sign::LAYOUT,
            Self::SignGroups => &sign_groups::LAYOUT,
            Self::Q8Groups => &q8_groups::LAYOUT,
            Self::SignPlanes => &sign_planes::LAYOUT,
            Self::SparseSigns => &sparse_signs::LAYOUT,
        }
    }

    /// Checks the entry fields this codec gives a meaning to (groups, flags, scale) and returns
    /// the payload length they imply (`docs/FORMAT.md` §5 and §8). For `sign-planes` the plane
    /// count, for `sparse-signs` the entries per block, comes from the stored length: the
    /// result is `f.len` when it is a whole number of planes (of blocks times a valid count),
    /// else the nearest valid length.
    pub(crate) fn expected_len(self, f: &Fields) -> Result<u64, FormatError> {
        (self.layout().expected_len)(f)
    }

    /// Number of sign-bit planes (0 for codecs without sign bits).
    pub(crate) fn planes(self, f: &Fields) -> usize {
        (self.layout().planes)(f)
    }

    /// Entries per block (`sparse-signs`; 0 for the other codecs).
    pub(crate) fn per_block(self, f: &Fields) -> usize {
        match self {
            Self::SparseSigns => sparse_signs::entries(f),
            _ => 0,
        }
    }

    /// What the decoder of an entry with fields `f` needs besides the body, `scales` its group
    /// scales.
    pub(crate) fn params<'s>(self, f: &Fields, scales: Scales<'s>) -> Params<'s> {
        Params {
            index: f.index,
            n: f.numel,
            scale: f.scale,
            planes: self.planes(f),
            per_block: self.per_block(f),
            scales,
        }
    }

    /// Bytes of group scales at the start of the payload.
    pub(crate) fn scale_bytes(self, f: &Fields) -> u64 {
        if self.has_group_scales() {
            u64::from(f.groups) * scale_size(f.flags) * self.planes(f).max(1) as u64
        } else {
            0
        }
    }

    /// Splits a payload of an entry whose fields passed [`Codec::expected_len`]; the values are
    /// not checked (see [`Payload::check`]). A payload that does not fit the fields (only
    /// possible for a caller-edited entry) is `BadGroups`.
    pub(crate) fn split<'p>(self, f: &Fields, bytes: &'p [u8]) -> Result<Payload<'p>, FormatError> {
        let planes = self.planes(f);
        let bad = FormatError::BadGroups {
            index: f.index,
            found: f.groups,
        };
        let (scales, body) = usize::try_from(self.scale_bytes(f))
            .ok()
            .and_then(|at| bytes.split_at_checked(at))
            .ok_or(bad)?;
        let scales = Scales::new(f.flags, scales);
        Ok(match self {
            Self::Unchanged => Payload::Unchanged,
            Self::RawF32 => Payload::RawF32(body),
            Self::RawF16 => Payload::RawF16(body),
            Self::Sign => Payload::Sign {
                scale: f.scale,
                bits: body,
            },
            Self::SignGroups => Payload::SignGroups { scales, bits: body },
            Self::Q8Groups => Payload::Q8Groups { scales, q: body },
            Self::SignPlanes => {
                let rows = usize::try_from(f.numel.div_ceil(8)).map_err(|_| bad)?;
                if planes == 0 || Some(body.len()) != rows.checked_mul(planes) {
                    return Err(bad);
                }
                Payload::SignPlanes {
                    planes,
                    scales,
                    bits: body,
                }
            }
            Self::SparseSigns => {
                let per_block = self.per_block(f);
                if !sparse_signs::fits(f.numel, per_block, body.len()) {
                    return Err(bad);
                }
                Payload::SparseSigns {
                    per_block,
                    scales,
                    entries: body,
                }
            }
        })
    }

    /// Adds this codec's contribution to the elements `lo..lo + out.len()` of an `n`-element
    /// tensor (`docs/FORMAT.md` §9), reading the payload body from `cur`; value errors met on
    /// the way go to [`Cursor::flag`].
    pub(crate) fn decode<C: Cursor>(
        self,
        p: &Params<'_>,
        cur: &mut C,
        lo: u64,
        out: &mut [f32],
        t: &Term<'_>,
    ) -> Result<(), C::Error> {
        let span = Span {
            p,
            lo,
            out,
            alpha: t.alpha,
        };
        match self {
            Self::Unchanged => Ok(()),
            Self::RawF32 => raw::decode(4, span, t, cur),
            Self::RawF16 => raw::decode(2, span, t, cur),
            Self::Sign => sign::decode(span, cur),
            Self::SignGroups => sign_groups::decode(span, cur),
            Self::Q8Groups => q8_groups::decode(span, cur),
            Self::SignPlanes => sign_planes::decode(span, cur),
            Self::SparseSigns => sparse_signs::decode(span, cur),
        }
    }

    /// The value checks on the body bytes `bytes`, which start at byte `at` of the body: sign
    /// padding bits (where `bytes` hold the last row), no `-128`, sparse indices (`bytes` are
    /// whole blocks).
    pub(crate) fn check_body(
        self,
        p: &Params<'_>,
        at: u64,
        bytes: &[u8],
    ) -> Result<(), FormatError> {
        match self {
            Self::Unchanged | Self::RawF32 | Self::RawF16 => Ok(()),
            Self::Sign | Self::SignGroups | Self::SignPlanes => sign::check_rows(p, at, bytes),
            Self::Q8Groups => q8_groups::check(p, bytes),
            Self::SparseSigns => sparse_signs::check(p, at / p.per_block.max(1) as u64, bytes),
        }
    }

    /// True when the payload holds replacement values rather than a difference (the raw codecs):
    /// the first delta at alpha 1 then sets the values without reading the base.
    pub(crate) const fn replaces(self) -> bool {
        matches!(self, Self::RawF32 | Self::RawF16)
    }
}

/// The entry fields a codec's layout reads.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fields {
    /// Index in the table (for errors).
    pub(crate) index: u32,
    /// Element count (at most `2^40`).
    pub(crate) numel: u64,
    /// Scale-group count.
    pub(crate) groups: u32,
    /// Entry flags.
    pub(crate) flags: u8,
    /// Per-tensor scale.
    pub(crate) scale: f32,
    /// Stored payload length.
    pub(crate) len: u64,
}

/// One codec's layout rules, as functions of the entry fields.
pub(crate) struct Layout {
    /// See [`Codec::expected_len`].
    pub(crate) expected_len: fn(&Fields) -> Result<u64, FormatError>,
    /// See [`Codec::planes`].
    pub(crate) planes: fn(&Fields) -> usize,
}

/// `unchanged`: no payload, no groups, no scale.
const UNCHANGED: Layout = Layout {
    expected_len: |f| no_groups(f).map(|()| 0),
    planes: |_| 0,
};

/// The field rule of codecs without groups or scale: `groups`, `flags` and `scale` are zero.
pub(crate) fn no_groups(f: &Fields) -> Result<(), FormatError> {
    if f.groups != 0 || f.flags != 0 || f.scale.to_bits() != 0 {
        return Err(FormatError::FieldNotZero { index: f.index });
    }
    Ok(())
}

/// The field rule of codecs with group scales: no per-tensor scale, `groups` divides the
/// element count. Returns the bytes of one table of group scales.
pub(crate) fn group_scales(f: &Fields) -> Result<u64, FormatError> {
    if f.scale.to_bits() != 0 {
        return Err(FormatError::FieldNotZero { index: f.index });
    }
    if f.groups == 0 || !f.numel.is_multiple_of(u64::from(f.groups)) {
        return Err(FormatError::BadGroups {
            index: f.index,
            found: f.groups,
        });
    }
    // `groups <= 2^32`: no overflow.
    Ok(u64::from(f.groups) * scale_size(f.flags))
}

/// The payload of one tensor, split by codec. Obtained from
/// [`TensorEntry::payload`](crate::format::TensorEntry::payload).
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
        /// Number of planes `k`, in [`MIN_PLANES`](crate::format::MIN_PLANES)`..=`
        /// [`MAX_PLANES`](crate::format::MAX_PLANES).
        planes: usize,
        /// `k * G` scales, plane after plane: scale `j * G + g` is plane `j`'s scale of group `g`.
        scales: Scales<'a>,
        /// `k * ceil(n/8)` bytes, interleaved by byte: byte `r * k + j` holds the bits of
        /// elements `8r .. 8r + 8` in plane `j` (see [`plane_byte`]).
        bits: &'a [u8],
    },
    /// The largest changes of each block of [`SPARSE_BLOCK`] elements, one scale per group.
    SparseSigns {
        /// Entries per block `m`, in `1..=`[`max_entries`]`(n)`.
        per_block: usize,
        /// One scale per group.
        scales: Scales<'a>,
        /// `ceil(n/64) * m` entry bytes, block after block: bits 0-5 the index in the block
        /// (strictly increasing), bit 6 level 2 (else 1), bit 7 negative.
        entries: &'a [u8],
    },
}

impl<'a> Payload<'a> {
    /// The codec, what its decoder needs besides the body, and the body (the payload after its
    /// group scales) of an `n`-element tensor.
    pub(crate) fn parts(&self, index: u32, n: u64) -> (Codec, Params<'a>, &'a [u8]) {
        let none = Scales::F32(&[]);
        let mut per_block = 0;
        let (codec, scale, planes, scales, body) = match *self {
            Self::Unchanged => (Codec::Unchanged, 0.0, 0, none, &[][..]),
            Self::RawF32(b) => (Codec::RawF32, 0.0, 0, none, b),
            Self::RawF16(b) => (Codec::RawF16, 0.0, 0, none, b),
            Self::Sign { scale, bits } => (Codec::Sign, scale, 1, none, bits),
            Self::SignGroups { scales, bits } => (Codec::SignGroups, 0.0, 1, scales, bits),
            Self::Q8Groups { scales, q } => (Codec::Q8Groups, 0.0, 0, scales, q),
            Self::SignPlanes {
                planes,
                scales,
                bits,
            } => (Codec::SignPlanes, 0.0, planes, scales, bits),
            Self::SparseSigns {
                per_block: m,
                scales,
                entries,
            } => {
                per_block = m;
                (Codec::SparseSigns, 0.0, 0, scales, entries)
            }
        };
        let p = Params {
            index,
            n,
            scale,
            planes,
            per_block,
            scales,
        };
        (codec, p, body)
    }

    /// The element count of the payload for an `n`-element tensor, or `None` when its sign bits
    /// are not `ceil(n/8)` bytes per plane (its sparse entries not a valid count per block).
    pub(crate) fn elems(&self, n: usize) -> Option<usize> {
        let (codec, p, body) = self.parts(0, n as u64);
        Some(match codec {
            Codec::Unchanged => n,
            Codec::RawF32 => body.len() / 4,
            Codec::RawF16 => body.len() / 2,
            Codec::Q8Groups => body.len(),
            Codec::Sign | Codec::SignGroups | Codec::SignPlanes => {
                if p.planes == 0 || Some(body.len()) != n.div_ceil(8).checked_mul(p.planes) {
                    return None;
                }
                n
            }
            Codec::SparseSigns => {
                if !sparse_signs::fits(n as u64, p.per_block, body.len()) {
                    return None;
                }
                n
            }
        })
    }

    /// Scale groups of the payload (1 for codecs without group scales), or `None` when its scale
    /// table is not a whole number of groups per plane.
    pub(crate) fn groups(&self) -> Option<usize> {
        let (codec, p, _) = self.parts(0, 0);
        let per_plane = p.planes.max(1);
        if !codec.has_group_scales() {
            Some(1)
        } else if p.scales.len().is_multiple_of(per_plane) {
            Some(p.scales.len() / per_plane)
        } else {
            None
        }
    }

    /// The same payload, owned: what [`write_delta`](crate::format::write_delta) takes to write
    /// these bytes again (needs `alloc`).
    #[cfg(feature = "alloc")]
    pub fn to_encoded(&self) -> Encoded {
        let f32s = |b: &[u8]| -> Vec<f32> {
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect()
        };
        let f16s = |b: &[u8]| -> Vec<f16> {
            b.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect()
        };
        let owned = |s: Scales<'_>| match s {
            Scales::F16(b) => OwnedScales::F16(f16s(b)),
            Scales::F32(b) => OwnedScales::F32(f32s(b)),
        };
        match *self {
            Self::Unchanged => Encoded::Unchanged,
            Self::RawF32(b) => Encoded::RawF32(f32s(b)),
            Self::RawF16(b) => Encoded::RawF16(f16s(b)),
            Self::Sign { scale, bits } => Encoded::Sign {
                scale,
                bits: bits.to_vec(),
            },
            Self::SignGroups { scales, bits } => Encoded::SignGroups {
                scales: owned(scales),
                bits: bits.to_vec(),
            },
            Self::Q8Groups { scales, q } => Encoded::Q8Groups {
                scales: owned(scales),
                q: q.iter().map(|&b| b as i8).collect(),
            },
            Self::SignPlanes {
                planes,
                scales,
                bits,
            } => Encoded::SignPlanes {
                planes,
                scales: owned(scales),
                bits: bits.to_vec(),
            },
            Self::SparseSigns {
                scales, entries, ..
            } => Encoded::SparseSigns {
                scales: owned(scales),
                entries: entries.to_vec(),
            },
        }
    }

    /// The value checks of `docs/FORMAT.md` §8 on the payload of entry `index` of `n` elements:
    /// the scales, then the body (sign padding bits, no `-128`, sparse indices).
    pub(crate) fn check(&self, index: u32, n: u64) -> Result<(), FormatError> {
        let (codec, p, body) = self.parts(index, n);
        p.check_scales()?;
        codec.check_body(&p, 0, body)
    }
}

/// Index, in the interleaved bits of a `sign-planes` payload with `planes` planes, of the byte
/// that holds element `i`'s bit of plane `j` (at bit `i % 8`).
pub const fn plane_byte(planes: usize, i: usize, j: usize) -> usize {
    (i / 8) * planes + j
}

/// What a decoder needs besides the payload body.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Params<'a> {
    /// Index in the table (for errors).
    pub(crate) index: u32,
    /// Element count of the tensor.
    pub(crate) n: u64,
    /// Per-tensor scale (`sign`), else 0.
    pub(crate) scale: f32,
    /// Sign-bit planes (0 for codecs without sign bits).
    pub(crate) planes: usize,
    /// Entries per block (`sparse-signs`), else 0.
    pub(crate) per_block: usize,
    /// Group scales (empty for codecs without them).
    pub(crate) scales: Scales<'a>,
}

impl Params<'_> {
    /// Elements per scale group (`n` without group scales).
    pub(crate) fn group_len(&self) -> u64 {
        let groups = (self.scales.len() / self.planes.max(1)) as u64;
        self.n.checked_div(groups).unwrap_or(self.n)
    }

    /// The scale rule of `docs/FORMAT.md` §8 on the per-tensor scale (zero for every codec but
    /// `sign`, which the entry check guarantees) and on every group scale.
    pub(crate) fn check_scales(&self) -> Result<(), FormatError> {
        check_scale(self.scale, self.index, 0)?;
        self.scales.check(self.index)
    }
}

/// Reads base values: `base(first element, values)`.
pub(crate) type BaseReader<'t> = &'t dyn Fn(u64, &mut [f32]);

/// How a decoded delta meets the values already in the output.
pub(crate) struct Term<'t> {
    /// The delta's weight.
    pub(crate) alpha: f32,
    /// For codecs that [replace](Codec::replaces): `None` to set the values, or the base reader
    /// (`base(first element, values)`) to add `alpha * (value - base)`.
    pub(crate) base: Option<BaseReader<'t>>,
}

/// Payload bytes, read by a decoder in order.
///
/// A decoder reads the body from its start (byte 0 after the group scales) to its end, in
/// increasing order; a read may start again at most [`MAX_REREAD`] bytes before the end of the
/// previous one (the row a span boundary shares: the sign bits of a byte, the entries of a
/// sparse block) and is at most [`Cursor::WINDOW`] bytes long. A slice cursor accepts any read.
pub(crate) trait Cursor {
    /// A failed read.
    type Error;
    /// The longest read.
    const WINDOW: usize;
    /// The body bytes `at..at + len`.
    fn read(&mut self, at: u64, len: usize) -> Result<&[u8], Self::Error>;
    /// Reports a value error in the bytes read (the first one counts).
    fn flag(&mut self, e: FormatError);
}

/// The most bytes a decoder reads again ([`Cursor`]): one row of the codec with the longest, a
/// row of [`MAX_PLANES`](crate::format::MAX_PLANES) interleaved sign bytes or a block of
/// [`MAX_SPARSE_ENTRIES`] sparse entries.
pub(crate) const MAX_REREAD: usize = if crate::format::MAX_PLANES > MAX_SPARSE_ENTRIES {
    crate::format::MAX_PLANES
} else {
    MAX_SPARSE_ENTRIES
};

/// A cursor over a payload body in memory (value errors are dropped: the caller checked or
/// does not need them).
pub(crate) struct SliceCursor<'a> {
    bytes: &'a [u8],
}

impl<'a> SliceCursor<'a> {
    /// A cursor over `bytes`.
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Self { bytes }
    }
}

/// A read outside the payload (a payload that does not fit its tensor).
#[derive(Clone, Copy, Debug)]
pub(crate) struct OutOfBounds;

impl Cursor for SliceCursor<'_> {
    type Error = OutOfBounds;
    const WINDOW: usize = usize::MAX / 16;
    fn read(&mut self, at: u64, len: usize) -> Result<&[u8], OutOfBounds> {
        usize::try_from(at)
            .ok()
            .and_then(|a| self.bytes.get(a..a.checked_add(len)?))
            .ok_or(OutOfBounds)
    }
    fn flag(&mut self, _: FormatError) {}
}

/// One decoder call: add a delta's contribution to the elements `lo..lo + out.len()` of a tensor.
pub(crate) struct Span<'s> {
    /// What the decoder needs besides the body.
    pub(crate) p: &'s Params<'s>,
    /// The tensor element `out[0]` stands for.
    pub(crate) lo: u64,
    /// The values to add to.
    pub(crate) out: &'s mut [f32],
    /// The delta's weight.
    pub(crate) alpha: f32,
}

impl Span<'_> {
    /// Calls `f(g, a, b, values)` for each segment `a..b` of the span that lies in one group `g`
    /// (of `group` elements) and spans at most `most` elements, `values` its part of `out`.
    pub(crate) fn segments<E>(
        &mut self,
        group: u64,
        most: u64,
        mut f: impl FnMut(u64, u64, u64, &mut [f32]) -> Result<(), E>,
    ) -> Result<(), E> {
        let (lo, end) = (self.lo, self.lo + self.out.len() as u64);
        let mut a = lo;
        while a < end {
            let g = a / group;
            let b = end.min((g + 1) * group).min(a.saturating_add(most));
            f(g, a, b, &mut self.out[(a - lo) as usize..(b - lo) as usize])?;
            a = b;
        }
        Ok(())
    }
}

/// Reads `len` body bytes at `at` from `cur`, checks them with `check` (a failure goes to
/// [`Cursor::flag`]) and hands them to `apply`.
pub(crate) fn read_checked<C: Cursor>(
    cur: &mut C,
    at: u64,
    len: usize,
    check: impl FnOnce(&[u8]) -> Result<(), FormatError>,
    apply: impl FnOnce(&[u8]),
) -> Result<(), C::Error> {
    let bytes = cur.read(at, len)?;
    let checked = check(bytes);
    apply(bytes);
    if let Err(e) = checked {
        cur.flag(e);
    }
    Ok(())
}

/// An encoded tensor payload (needs `alloc`).
#[cfg(feature = "alloc")]
#[derive(Clone, Debug, PartialEq)]
pub enum Encoded {
    /// Equal to the base.
    Unchanged,
    /// Replacement values.
    RawF32(Vec<f32>),
    /// Replacement values as f16.
    RawF16(Vec<f16>),
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
    /// Sign bit-planes with group scales per plane (layout of [`Payload::SignPlanes`]).
    SignPlanes {
        /// Number of planes `k`, in [`MIN_PLANES`](crate::format::MIN_PLANES)`..=`
        /// [`MAX_PLANES`](crate::format::MAX_PLANES).
        planes: usize,
        /// `k * G` scales, plane after plane.
        scales: OwnedScales,
        /// `k * ceil(n/8)` bytes of sign bits, interleaved by byte ([`plane_byte`]).
        bits: Vec<u8>,
    },
    /// The largest changes of each block with group scales (layout of
    /// [`Payload::SparseSigns`]; the entries per block are `entries.len() / ceil(n/64)`).
    SparseSigns {
        /// One scale per group.
        scales: OwnedScales,
        /// `ceil(n/64) * m` entry bytes, block after block.
        entries: Vec<u8>,
    },
}

#[cfg(feature = "alloc")]
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
            Self::SparseSigns { .. } => Codec::SparseSigns,
        }
    }

    /// The group scales, the sign-bit planes (0 without sign bits), the per-tensor scale and the
    /// other payload bytes (values, sign bits).
    fn parts(&self) -> (Option<&OwnedScales>, usize, f32, usize) {
        match self {
            Self::Unchanged => (None, 0, 0.0, 0),
            Self::RawF32(v) => (None, 0, 0.0, v.len() * 4),
            Self::RawF16(v) => (None, 0, 0.0, v.len() * 2),
            Self::Sign { scale, bits } => (None, 1, *scale, bits.len()),
            Self::SignGroups { scales, bits } => (Some(scales), 1, 0.0, bits.len()),
            Self::Q8Groups { scales, q } => (Some(scales), 0, 0.0, q.len()),
            Self::SignPlanes {
                planes,
                scales,
                bits,
            } => (Some(scales), *planes, 0.0, bits.len()),
            Self::SparseSigns { scales, entries } => (Some(scales), 0, 0.0, entries.len()),
        }
    }

    /// Scale-group count `G` as stored in the entry (0 for codecs without group scales).
    pub fn groups(&self) -> usize {
        match self.parts() {
            (Some(s), planes, ..) => s.len() / planes.max(1),
            // `sign`: one scale for the whole tensor.
            (None, 1, ..) => 1,
            _ => 0,
        }
    }

    /// Number of sign-bit planes, as [`TensorEntry::planes`](crate::format::TensorEntry::planes)
    /// reads it back.
    pub(crate) fn planes(&self) -> usize {
        self.parts().1
    }

    /// The per-tensor scale field of the entry (`sign`), else 0.
    pub(crate) fn scale(&self) -> f32 {
        self.parts().2
    }

    /// The entry flags (`FLAG_SCALES_F16` for f16 group scales).
    pub(crate) fn flags(&self) -> u8 {
        match self.parts().0 {
            Some(s) if s.is_f16() => crate::format::FLAG_SCALES_F16,
            _ => 0,
        }
    }

    /// Payload length in bytes.
    pub fn payload_len(&self) -> usize {
        let (scales, _, _, body) = self.parts();
        scales.map_or(0, OwnedScales::byte_len) + body
    }

    /// Appends the payload bytes (`docs/FORMAT.md` §8) to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        if let Some(s) = self.parts().0 {
            s.write(out);
        }
        match self {
            Self::Unchanged => {}
            Self::RawF32(v) => raw::write(v, out),
            Self::RawF16(v) => raw::write(v, out),
            Self::Sign { bits, .. } | Self::SignGroups { bits, .. } => {
                out.extend_from_slice(bits);
            }
            Self::SignPlanes { bits, .. } => out.extend_from_slice(bits),
            Self::SparseSigns { entries, .. } => out.extend_from_slice(entries),
            Self::Q8Groups { q, .. } => out.extend_from_slice(bytemuck::cast_slice(q)),
        }
    }

    /// The reader's view of this payload for an `n`-element tensor, its bytes written to `buf`
    /// (values not checked), or `None` when the payload does not fit the tensor.
    pub fn payload<'b>(&self, n: usize, buf: &'b mut Vec<u8>) -> Option<Payload<'b>> {
        buf.clear();
        self.write(buf);
        let f = Fields {
            index: 0,
            numel: n as u64,
            groups: u32::try_from(self.groups()).ok()?,
            flags: self.flags(),
            scale: self.scale(),
            len: buf.len() as u64,
        };
        self.codec().split(&f, buf).ok()
    }
}

/// Smallest positive normal f16: scales below it (or above f16::MAX) are stored as f32.
#[cfg(feature = "alloc")]
const F16_MIN_NORMAL: f64 = 6.103_515_625e-5;

/// Elements per group of `groups` equal groups of `n` elements.
///
/// # Panics
/// When `groups` is 0 or does not divide `n`.
#[cfg(feature = "alloc")]
fn group_len(n: usize, groups: usize) -> usize {
    assert!(
        groups > 0 && n.is_multiple_of(groups),
        "groups must divide the tensor length"
    );
    n / groups
}

#[cfg(feature = "alloc")]
fn deltas<'a>(base: &'a [f32], fine: &'a [f32]) -> impl Iterator<Item = f64> + 'a {
    base.iter()
        .zip(fine)
        .map(|(&b, &f)| f64::from(f) - f64::from(b))
}

/// Groups `0..groups` of `g` elements of `base` and `fine`.
#[cfg(feature = "alloc")]
fn group_pairs<'a>(
    base: &'a [f32],
    fine: &'a [f32],
    groups: usize,
    g: usize,
) -> impl Iterator<Item = (&'a [f32], &'a [f32])> + 'a {
    (0..groups).map(move |k| (&base[k * g..(k + 1) * g], &fine[k * g..(k + 1) * g]))
}

/// The mean `|fine - base|` of each group, times `multiplier` (in f64).
#[cfg(feature = "alloc")]
fn group_means(base: &[f32], fine: &[f32], groups: usize, multiplier: f64) -> Vec<f64> {
    let g = group_len(base.len(), groups);
    group_pairs(base, fine, groups, g)
        .map(|(b, f)| multiplier * (deltas(b, f).map(f64::abs).sum::<f64>() / g as f64))
        .collect()
}

#[cfg(feature = "alloc")]
fn scales_from(values: Vec<f64>, allow_f16: bool) -> OwnedScales {
    let f16_ok = allow_f16 && values.iter().all(|&v| v == 0.0 || f16_scale(v).is_some());
    if f16_ok {
        OwnedScales::F16(
            values
                .into_iter()
                .map(|v| f16::from_f32(v as f32))
                .collect(),
        )
    } else {
        OwnedScales::F32(values.into_iter().map(|v| v as f32).collect())
    }
}

#[cfg(feature = "alloc")]
/// `v` as a stored f16 scale when it is a normal f16 value (rounded through f32, so every platform
/// (F16C, FP16, software) rounds the same way), else `None`.
fn f16_scale(v: f64) -> Option<f16> {
    (F16_MIN_NORMAL..=f64::from(f16::MAX.to_f32()))
        .contains(&v)
        .then(|| f16::from_f32(v as f32))
}

#[cfg(feature = "alloc")]
fn scale_values(s: &OwnedScales) -> Vec<f32> {
    match s {
        OwnedScales::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        OwnedScales::F32(v) => v.clone(),
    }
}

#[cfg(feature = "std")]
fn widen(s: &OwnedScales) -> Vec<f64> {
    scale_values(s).into_iter().map(f64::from).collect()
}

#[cfg(all(test, feature = "alloc"))]
mod tests;
