//! The `sign-planes` codec: `k` residual sign bit-planes, each with one scale per group.
//!
//! Layout (`docs/FORMAT.md` §8): `k` tables of `G` scales (f16 or f32, per `FLAG_SCALES_F16`;
//! scale `j * G + g` is plane `j`'s scale of group `g`), then `k * ceil(n/8)` bytes of sign bits
//! interleaved by byte ([`plane_byte`]). `k` is the payload length over the length of one plane
//! (its scales and its bits), in [`MIN_PLANES`]`..=`[`MAX_PLANES`]. Element `i` of group `g` is
//! `base + sum_j alpha * (±scale_{j,g})`, plane after plane.

#[cfg(feature = "alloc")]
use alloc::vec;
#[cfg(feature = "alloc")]
use alloc::vec::Vec;

use super::sign::add_planes;
#[cfg(feature = "alloc")]
use super::{deltas, group_len, plane_byte, scales_from, Encoded};
use super::{group_scales, Cursor, Fields, Layout, Span};
use crate::format::{MAX_PLANES, MIN_PLANES};

/// `sign-planes`: a whole number of planes in [`MIN_PLANES`]`..=`[`MAX_PLANES`]; the expected
/// length is the stored one when it is, else the nearest valid one.
pub(super) const LAYOUT: Layout = Layout {
    expected_len: |f| {
        let plane = group_scales(f)? + f.numel.div_ceil(8);
        Ok(planes_for_len(f.len, plane).map_or_else(|expected| expected, |_| f.len))
    },
    planes: |f| planes(f),
};

/// The plane count of an entry whose length passed the layout check (0 on overflow).
fn planes(f: &Fields) -> usize {
    u64::from(f.groups)
        .checked_mul(crate::format::entry::scale_size(f.flags))
        .and_then(|s| s.checked_add(f.numel.div_ceil(8)))
        .map_or(0, |plane| (f.len / plane.max(1)) as usize)
}

/// The plane count of a payload of `len` bytes, or the length expected (the nearest valid
/// one) when `len` is not a whole number of planes in [`MIN_PLANES`]`..=`[`MAX_PLANES`].
fn planes_for_len(len: u64, plane: u64) -> Result<usize, u64> {
    let k = len / plane.max(1);
    let valid = (MIN_PLANES as u64..=MAX_PLANES as u64).contains(&k);
    if valid && k * plane == len {
        Ok(k as usize)
    } else {
        Err(k.clamp(MIN_PLANES as u64, MAX_PLANES as u64) * plane)
    }
}

/// The `sign-planes` decoder: for every element of group `g`, `alpha * scale_{j,g}` of each
/// plane `j` in turn.
pub(super) fn decode<C: Cursor>(s: Span<'_>, cur: &mut C) -> Result<(), C::Error> {
    let (scales, alpha) = (s.p.scales, s.alpha);
    let groups = scales.len() / s.p.planes.max(1);
    add_planes(s, cur, |j, g| alpha * scales.get(j * groups + g as usize))
}

/// Most Lloyd rounds of [`sign_planes_scaled`] (it stops earlier when no bit changes).
#[cfg(feature = "alloc")]
pub const PLANE_FIT_ROUNDS: usize = 16;

#[cfg(feature = "alloc")]
/// `planes` sign bit-planes (residual signs) with one scale per group and plane: the delta of
/// each element is approximated by `sum_j (±s_{j,g})`. Scales are f16 when `f16_scales` and
/// every scale is representable as a normal f16 (or 0).
///
/// The fit starts from residual signs (plane 1 = `sign(d)` with scale mean |d|, plane `j` =
/// `sign(r)` of the residual `r` left by the planes before it, with scale mean |r|), then runs
/// Lloyd rounds per group: the least-squares scales for the current bits, then for every
/// element the nearest of the `2^planes` levels `sum_j (±s_j)`, until no bit changes (at most
/// [`PLANE_FIT_ROUNDS`]). Each round can only lower the squared error. Planes are stored
/// largest scale first.
///
/// # Panics
/// When `groups` is 0 or does not divide the length, or `planes` is outside
/// [`MIN_PLANES`](crate::format::MIN_PLANES)`..=`[`MAX_PLANES`](crate::format::MAX_PLANES).
pub fn sign_planes(
    base: &[f32],
    fine: &[f32],
    groups: usize,
    planes: usize,
    f16_scales: bool,
) -> Encoded {
    // x * 1.0 == x exactly, so this is the unscaled rule.
    sign_planes_scaled(base, fine, groups, planes, f16_scales, 1.0)
}

#[cfg(feature = "alloc")]
/// [`sign_planes`] with every scale multiplied by `multiplier` (in f64, after the fit and before
/// rounding to the stored type); the bits are those of the fit.
///
/// # Panics
/// As [`sign_planes`].
pub fn sign_planes_scaled(
    base: &[f32],
    fine: &[f32],
    groups: usize,
    planes: usize,
    f16_scales: bool,
    multiplier: f64,
) -> Encoded {
    let mut one = sign_planes_multiplied(base, fine, groups, planes, f16_scales, &[multiplier]);
    one.pop().expect("one multiplier")
}

#[cfg(feature = "alloc")]
/// [`sign_planes_scaled`] at each of `multipliers`, from one fit: the same encodings as one call
/// per multiplier.
///
/// # Panics
/// As [`sign_planes`].
pub fn sign_planes_multiplied(
    base: &[f32],
    fine: &[f32],
    groups: usize,
    planes: usize,
    f16_scales: bool,
    multipliers: &[f64],
) -> Vec<Encoded> {
    let g = group_len(base.len(), groups);
    assert!(
        (MIN_PLANES..=MAX_PLANES).contains(&planes),
        "planes must be in {MIN_PLANES}..={MAX_PLANES}"
    );
    let n = base.len();
    let rows = n.div_ceil(8);
    let mut bits = vec![0u8; planes * rows];
    let mut scales = vec![0f64; planes * groups];
    let mut d = vec![0f64; g];
    let mut signs = vec![0u8; g]; // bit j = plane j's sign bit
    for k in 0..groups {
        for (o, v) in d
            .iter_mut()
            .zip(deltas(&base[k * g..(k + 1) * g], &fine[k * g..(k + 1) * g]))
        {
            *o = v;
        }
        let s = fit_planes(&d, planes, &mut signs);
        for (j, &sj) in s.iter().enumerate() {
            scales[j * groups + k] = sj;
        }
        for (e, &b) in signs.iter().enumerate() {
            let i = k * g + e;
            for j in 0..planes {
                bits[plane_byte(planes, i, j)] |= ((b >> j) & 1) << (i % 8);
            }
        }
    }
    multipliers
        .iter()
        .map(|&m| Encoded::SignPlanes {
            planes,
            scales: scales_from(scales.iter().map(|&s| m * s).collect(), f16_scales),
            bits: bits.clone(),
        })
        .collect()
}

#[cfg(feature = "alloc")]
/// Fits `planes` sign planes to one group's deltas `d`: returns the scales (largest first, all
/// `>= 0`) and sets bit `j` of `signs[i]` to element `i`'s sign in plane `j` (1 = `+`).
fn fit_planes(d: &[f64], planes: usize, signs: &mut [u8]) -> Vec<f64> {
    let n = d.len().max(1) as f64;
    // Residual signs: sign(0) is +1, as in `sign`.
    let mut s = vec![0f64; planes];
    let mut r: Vec<f64> = d.to_vec();
    signs.fill(0);
    for (j, sj) in s.iter_mut().enumerate() {
        *sj = r.iter().map(|x| x.abs()).sum::<f64>() / n;
        for (x, b) in r.iter_mut().zip(signs.iter_mut()) {
            if *x < 0.0 {
                *x += *sj;
            } else {
                *b |= 1 << j;
                *x -= *sj;
            }
        }
    }
    let level = |s: &[f64], c: usize| -> f64 {
        s.iter()
            .enumerate()
            .map(|(j, &sj)| if c >> j & 1 == 1 { sj } else { -sj })
            .sum()
    };
    for _ in 0..PLANE_FIT_ROUNDS {
        // Least squares: (B^T B) s = B^T d, with B the ±1 matrix of the current bits.
        if let Some(ls) = least_squares(d, signs, planes) {
            s = ls;
        }
        // Negative scales flip their plane; then largest first. Neither changes the levels.
        for (j, sj) in s.iter_mut().enumerate() {
            if *sj < 0.0 {
                *sj = -*sj;
                signs.iter_mut().for_each(|b| *b ^= 1 << j);
            }
        }
        let mut order: Vec<usize> = (0..planes).collect();
        order.sort_by(|&a, &b| s[b].total_cmp(&s[a]));
        s = order.iter().map(|&j| s[j]).collect();
        for b in signs.iter_mut() {
            let old = *b;
            *b = order
                .iter()
                .enumerate()
                .fold(0, |acc, (to, &from)| acc | ((old >> from) & 1) << to);
        }
        // Nearest level; a tie goes to the larger level (so 0 maps to +, as in `sign`).
        let mut levels: Vec<(f64, u8)> = (0..1usize << planes)
            .map(|c| (level(&s, c), c as u8))
            .collect();
        sort_levels(&mut levels);
        let mut changed = false;
        for (&x, b) in d.iter().zip(signs.iter_mut()) {
            let hi = levels.partition_point(|l| l.0 < x).min(levels.len() - 1);
            let best = if hi > 0 && x - levels[hi - 1].0 < levels[hi].0 - x {
                levels[hi - 1].1
            } else {
                levels[hi].1
            };
            changed |= best != *b;
            *b = best;
        }
        if !changed {
            break;
        }
    }
    s
}

#[cfg(feature = "alloc")]
/// Sorts `(level, plane bits)` by level; equal levels (a zero scale) put the most `+` bits first,
/// so that the nearest-level search (the first level `>= x`, on a tie between two levels the
/// larger) maps a zero delta to all `+`, as `sign` does.
pub(super) fn sort_levels(levels: &mut [(f64, u8)]) {
    // `==` so that -0.0 and +0.0 (sums of zero scales) count as equal; levels are finite.
    levels.sort_by(|a, b| {
        if a.0 == b.0 {
            b.1.cmp(&a.1)
        } else {
            a.0.total_cmp(&b.0)
        }
    });
}

#[cfg(feature = "alloc")]
/// The least-squares scales for fixed sign planes (Gaussian elimination with partial pivoting in
/// f64), or `None` when the planes are linearly dependent on this group.
fn least_squares(d: &[f64], signs: &[u8], planes: usize) -> Option<Vec<f64>> {
    let sgn = |b: u8, j: usize| if b >> j & 1 == 1 { 1.0 } else { -1.0 };
    // Augmented normal equations, planes x (planes + 1).
    let w = planes + 1;
    let mut m = vec![0f64; planes * w];
    for (&x, &b) in d.iter().zip(signs) {
        for r in 0..planes {
            let br = sgn(b, r);
            for c in 0..planes {
                m[r * w + c] += br * sgn(b, c);
            }
            m[r * w + planes] += br * x;
        }
    }
    for c in 0..planes {
        let p = (c..planes).max_by(|&a, &b| m[a * w + c].abs().total_cmp(&m[b * w + c].abs()))?;
        // The entries of B^T B are integers: a pivot this small means a singular system.
        if m[p * w + c].abs() < 1e-9 {
            return None;
        }
        for k in 0..w {
            m.swap(c * w + k, p * w + k);
        }
        for r in 0..planes {
            if r != c {
                let f = m[r * w + c] / m[c * w + c];
                for k in c..w {
                    m[r * w + k] -= f * m[c * w + k];
                }
            }
        }
    }
    Some(
        (0..planes)
            .map(|r| m[r * w + planes] / m[r * w + r])
            .collect(),
    )
}
