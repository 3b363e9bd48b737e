//! The `sign` codec: one sign bit per element, one f32 scale per tensor; and the sign-bit walk
//! the `sign-groups` and `sign-planes` decoders share.
//!
//! Layout (`docs/FORMAT.md` §8): `ceil(n/8)` bytes of sign bits (bit `i % 8` of byte `i / 8`,
//! 1 = `+`, padding bits zero); `groups` is 1, the scale is the entry's `scale` field. Element
//! `i` is `base + alpha * (±scale)`.

#[cfg(feature = "alloc")]
use alloc::vec;
#[cfg(feature = "alloc")]
use alloc::vec::Vec;

#[cfg(feature = "alloc")]
use super::{deltas, Encoded};
use super::{plane_byte, read_checked, Cursor, Layout, Params, Span};
use crate::error::FormatError;
use crate::format::MIN_PLANES;
use crate::kernels;

/// `sign`: `ceil(n/8)` bytes; `groups` is 1 and there are no flags.
pub(super) const LAYOUT: Layout = Layout {
    expected_len: |f| {
        if f.groups != 1 || f.flags != 0 {
            return Err(FormatError::BadGroups {
                index: f.index,
                found: f.groups,
            });
        }
        Ok(f.numel.div_ceil(8))
    },
    planes: |_| 1,
};

/// Rows of one plane gathered on the stack by [`add_planes`] (with two planes or more).
const PLANE_ROWS: usize = crate::stream::IO_BUF / MIN_PLANES;

/// The padding-bit rule on sign bits of `p.planes` interleaved planes: `bytes` are whole rows
/// (one byte per plane) starting at byte `at` of the bits; when they hold the last row, its
/// bits past element `n - 1` must be zero in every plane.
pub(super) fn check_rows(p: &Params<'_>, at: u64, bytes: &[u8]) -> Result<(), FormatError> {
    let k = p.planes.max(1);
    let rows = (bytes.len() / k) as u64;
    let used = ((p.n.max(1) - 1) % 8 + 1) as usize;
    let last_row = at / k as u64 + rows == p.n.div_ceil(8);
    if rows > 0
        && last_row
        && !bytes[bytes.len() - k..]
            .iter()
            .all(|&b| crate::pack::padding_bits_clear(&[b], used))
    {
        return Err(FormatError::SignPaddingNotZero { index: p.index });
    }
    Ok(())
}

/// Adds `±scale(j, g)` for every element of the span and every plane `j` (plane by plane, in
/// order), `g` the element's group: the decoder of the three sign codecs. Reads whole rows of
/// `p.planes` interleaved bytes, a segment at a time (one group, at most one window).
pub(super) fn add_planes<C: Cursor>(
    mut s: Span<'_>,
    cur: &mut C,
    scale: impl Fn(usize, u64) -> f32,
) -> Result<(), C::Error> {
    let p = s.p;
    let k = p.planes.max(1);
    let rows_most = if k == 1 {
        C::WINDOW
    } else {
        (C::WINDOW / k).min(PLANE_ROWS)
    };
    // A segment of `most` elements starting anywhere in a byte spans at most `rows_most` rows.
    let most = (rows_most as u64 - 1).saturating_mul(8);
    let mut plane = [0u8; PLANE_ROWS];
    s.segments(p.group_len(), most, |g, a, b, seg| {
        let (r0, offset) = (a / 8, (a % 8) as usize);
        let rows = ((b - 1) / 8 + 1 - r0) as usize;
        let at = r0 * k as u64;
        read_checked(
            cur,
            at,
            rows * k,
            |bytes| check_rows(p, at, bytes),
            |bytes| {
                if k == 1 {
                    return kernels::add_signs(seg, bytes, offset, scale(0, g));
                }
                for j in 0..k {
                    for (r, x) in plane[..rows].iter_mut().enumerate() {
                        *x = bytes[plane_byte(k, 8 * r, j)];
                    }
                    kernels::add_signs(seg, &plane[..rows], offset, scale(j, g));
                }
            },
        )
    })
}

/// The `sign` decoder: `alpha * scale` for every element.
pub(super) fn decode<C: Cursor>(s: Span<'_>, cur: &mut C) -> Result<(), C::Error> {
    let v = s.alpha * s.p.scale;
    add_planes(s, cur, |_, _| v)
}

/// `sign(fine - base)` packed (sign(0) is +1), chunk by chunk.
#[cfg(feature = "alloc")]
pub(super) fn pack(base: &[f32], fine: &[f32]) -> Vec<u8> {
    let mut bits = vec![0u8; crate::pack::packed_len(base.len())];
    let mut d = vec![0f32; base.len().min(crate::compose::CHUNK)];
    // pack_signs takes f32 deltas; the sign of the f32 difference equals the exact one.
    for (k, (b, f)) in base
        .chunks(crate::compose::CHUNK)
        .zip(fine.chunks(crate::compose::CHUNK))
        .enumerate()
    {
        let d = &mut d[..b.len()];
        for ((o, &x), &y) in d.iter_mut().zip(b).zip(f) {
            *o = y - x;
        }
        let at = k * crate::compose::CHUNK / 8;
        crate::pack::pack_signs(d, &mut bits[at..at + crate::pack::packed_len(d.len())]);
    }
    bits
}

/// The seed recipe (ZIP-0427, BitDelta): `sign(fine - base)` with `scale = mean |fine - base|`,
/// the mean taken in f64 and rounded once to f32. sign(0) is +1.
#[cfg(feature = "alloc")]
pub fn sign_tensor(base: &[f32], fine: &[f32]) -> Encoded {
    // x * 1.0 == x exactly, so this is the unscaled rule.
    sign_tensor_scaled(base, fine, 1.0)
}

/// [`sign_tensor`] with the scale multiplied by `multiplier` (in f64, before the one rounding to
/// f32): a scale fitted to the model's outputs rather than to the weights (see
/// [`crate::calibrate`]).
#[cfg(feature = "alloc")]
pub fn sign_tensor_scaled(base: &[f32], fine: &[f32], multiplier: f64) -> Encoded {
    let n = base.len().max(1) as f64;
    let scale = (multiplier * (deltas(base, fine).map(f64::abs).sum::<f64>() / n)) as f32;
    Encoded::Sign {
        scale,
        bits: pack(base, fine),
    }
}
