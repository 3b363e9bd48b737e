//! Encoders: from a base and a fine-tuned tensor to one codec's payload (needs `alloc`).
//!
//! Differences are taken in f64 (`fine - base` of two f32 is exact there), statistics are
//! accumulated in f64 and rounded once to the stored scale type. Reconstruction is in
//! [`crate::compose`]; the rules both sides follow are in `docs/FORMAT.md`.

use alloc::vec;
use alloc::vec::Vec;

use half::f16;

use crate::format::{Encoded, OwnedScales};

/// Smallest positive normal f16: scales below it (or above f16::MAX) are stored as f32.
const F16_MIN_NORMAL: f64 = 6.103_515_625e-5;

fn deltas<'a>(base: &'a [f32], fine: &'a [f32]) -> impl Iterator<Item = f64> + 'a {
    base.iter()
        .zip(fine)
        .map(|(&b, &f)| f64::from(f) - f64::from(b))
}

fn pack(base: &[f32], fine: &[f32]) -> Vec<u8> {
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
pub fn sign_tensor(base: &[f32], fine: &[f32]) -> Encoded {
    // x * 1.0 == x exactly, so this is the unscaled rule.
    sign_tensor_scaled(base, fine, 1.0)
}

/// [`sign_tensor`] with the scale multiplied by `multiplier` (in f64, before the one rounding to
/// f32): a scale fitted to the model's outputs rather than to the weights (see
/// [`crate::calibrate`]).
pub fn sign_tensor_scaled(base: &[f32], fine: &[f32], multiplier: f64) -> Encoded {
    let n = base.len().max(1) as f64;
    let scale = (multiplier * (deltas(base, fine).map(f64::abs).sum::<f64>() / n)) as f32;
    Encoded::Sign {
        scale,
        bits: pack(base, fine),
    }
}

fn scales_from(values: Vec<f64>, allow_f16: bool) -> OwnedScales {
    let f16_ok = allow_f16
        && values
            .iter()
            .all(|&v| v == 0.0 || (F16_MIN_NORMAL..=f64::from(f16::MAX.to_f32())).contains(&v));
    if f16_ok {
        // Through f32, so every platform (F16C, FP16, software) rounds the same way.
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

fn scale_values(s: &OwnedScales) -> Vec<f32> {
    match s {
        OwnedScales::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        OwnedScales::F32(v) => v.clone(),
    }
}

/// Sign bits with one scale (mean |d| of the group) per group of `n / groups` elements.
/// Scales are f16 when `f16_scales` and every scale is representable as a normal f16.
///
/// # Panics
/// When `groups` is 0 or does not divide the length.
pub fn sign_groups(base: &[f32], fine: &[f32], groups: usize, f16_scales: bool) -> Encoded {
    // x * 1.0 == x exactly, so this is the unscaled rule.
    sign_groups_scaled(base, fine, groups, f16_scales, 1.0)
}

/// [`sign_groups`] with every group scale multiplied by `multiplier` (in f64, before rounding to
/// the stored type).
///
/// # Panics
/// When `groups` is 0 or does not divide the length.
pub fn sign_groups_scaled(
    base: &[f32],
    fine: &[f32],
    groups: usize,
    f16_scales: bool,
    multiplier: f64,
) -> Encoded {
    assert!(
        groups > 0 && base.len().is_multiple_of(groups),
        "groups must divide the tensor length"
    );
    let g = base.len() / groups;
    let means = (0..groups)
        .map(|k| {
            multiplier
                * (deltas(&base[k * g..(k + 1) * g], &fine[k * g..(k + 1) * g])
                    .map(f64::abs)
                    .sum::<f64>()
                    / g as f64)
        })
        .collect();
    Encoded::SignGroups {
        scales: scales_from(means, f16_scales),
        bits: pack(base, fine),
    }
}

/// 8-bit symmetric deltas: per group, `scale = max |d| / 127` (rounded to the stored type),
/// `q = round(d / scale)` clamped to -127..=127 (0 where the scale is 0).
///
/// # Panics
/// When `groups` is 0 or does not divide the length.
pub fn q8_groups(base: &[f32], fine: &[f32], groups: usize, f16_scales: bool) -> Encoded {
    assert!(
        groups > 0 && base.len().is_multiple_of(groups),
        "groups must divide the tensor length"
    );
    let g = base.len() / groups;
    let maxes = (0..groups)
        .map(|k| {
            deltas(&base[k * g..(k + 1) * g], &fine[k * g..(k + 1) * g])
                .map(f64::abs)
                .fold(0.0, f64::max)
                / 127.0
        })
        .collect();
    let scales = scales_from(maxes, f16_scales);
    let sv = scale_values(&scales);
    let q = deltas(base, fine)
        .enumerate()
        .map(|(i, d)| {
            let s = f64::from(sv[i / g]);
            if s == 0.0 {
                0
            } else {
                (d / s).round().clamp(-127.0, 127.0) as i8
            }
        })
        .collect();
    Encoded::Q8Groups { scales, q }
}

/// Full replacement as f32.
pub fn raw_f32(fine: &[f32]) -> Encoded {
    Encoded::RawF32(fine.to_vec())
}

/// Full replacement rounded to f16.
pub fn raw_f16(fine: &[f32]) -> Encoded {
    Encoded::RawF16(fine.iter().map(|&x| f16::from_f32(x)).collect())
}

/// Most Lloyd rounds of [`sign_planes_scaled`] (it stops earlier when no bit changes).
pub const PLANE_FIT_ROUNDS: usize = 16;

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
    use crate::format::{plane_byte, MAX_PLANES, MIN_PLANES};
    assert!(
        groups > 0 && base.len().is_multiple_of(groups),
        "groups must divide the tensor length"
    );
    assert!(
        (MIN_PLANES..=MAX_PLANES).contains(&planes),
        "planes must be in {MIN_PLANES}..={MAX_PLANES}"
    );
    let n = base.len();
    let g = n / groups;
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
            scales[j * groups + k] = multiplier * sj;
        }
        for (e, &b) in signs.iter().enumerate() {
            let i = k * g + e;
            for j in 0..planes {
                bits[plane_byte(planes, i, j)] |= ((b >> j) & 1) << (i % 8);
            }
        }
    }
    Encoded::SignPlanes {
        planes,
        scales: scales_from(scales, f16_scales),
        bits,
    }
}

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

/// Sorts `(level, plane bits)` by level; equal levels (a zero scale) put the most `+` bits first,
/// so that the nearest-level search (the first level `>= x`, on a tie between two levels the
/// larger) maps a zero delta to all `+`, as `sign` does.
fn sort_levels(levels: &mut [(f64, u8)]) {
    // `==` so that -0.0 and +0.0 (sums of zero scales) count as equal; levels are finite.
    levels.sort_by(|a, b| {
        if a.0 == b.0 {
            b.1.cmp(&a.1)
        } else {
            a.0.total_cmp(&b.0)
        }
    });
}

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

/// Relative damping of [`OutputRounding`]: `H + DAMP * mean(diag H) * I` (as in GPTQ).
pub const OUTPUT_ROUNDING_DAMP: f64 = 0.01;

/// Output-aware rounding for the sign codecs: GPTQ (Frantar et al., 2022, "GPTQ: Accurate
/// Post-Training Quantization for Generative Pre-trained Transformers") with a codec's own levels
/// in place of a uniform grid.
///
/// A weight tensor seen as `rows × cols` (output channels × the inputs each one multiplies: the
/// input channels of a 1x1 convolution, `in/group × kh × kw` patch values of any convolution, the
/// features of a fully connected layer) changes its outputs by `(Ŵ − W) x`. With `H = E[x xᵀ]`
/// measured on calibration inputs, the expected squared output error of one row is
/// `e H eᵀ` for the row's weight error `e`. GPTQ chooses the row's values column by column, each
/// the nearest level, and moves the error it just made onto the columns not yet chosen, in the
/// proportions that minimise `e H eᵀ` (the rows of the Cholesky factor of `H⁻¹`). Nothing changes
/// for decoders: the payload is an ordinary one, only its bits are chosen differently.
///
/// Built from one `H` per block of rows (one per convolution group; rows are split evenly).
#[derive(Clone, Debug)]
pub struct OutputRounding {
    cols: usize,
    /// Per block: the unit lower-triangular `L` of `H⁻¹ = L D Lᵀ`, `cols × cols` row-major.
    /// Column `i` of `L` below the diagonal is how the error at column `i` spreads to the columns
    /// after it (the upper Cholesky factor's row `i` over its diagonal: the `D` cancels).
    factors: Vec<Vec<f64>>,
}

impl OutputRounding {
    /// From the second moments `H` (`cols × cols`, row-major, symmetric) of the inputs of each
    /// block of rows. A zero diagonal entry (an input that is always 0) is set to 1, then every
    /// `H` is damped by [`OUTPUT_ROUNDING_DAMP`] times its mean diagonal. `None` when there is no
    /// block, a matrix has the wrong size or a non-finite value, or one is not positive definite
    /// after damping.
    pub fn new(cols: usize, hessians: &[Vec<f64>]) -> Option<Self> {
        if cols == 0 || hessians.is_empty() {
            return None;
        }
        let mut factors = Vec::with_capacity(hessians.len());
        for h in hessians {
            if h.len() != cols * cols || h.iter().any(|x| !x.is_finite()) {
                return None;
            }
            let mut h = h.clone();
            for i in 0..cols {
                if h[i * cols + i] <= 0.0 {
                    h[i * cols + i] = 1.0;
                }
            }
            let damp = OUTPUT_ROUNDING_DAMP * (0..cols).map(|i| h[i * cols + i]).sum::<f64>()
                / cols as f64;
            for i in 0..cols {
                h[i * cols + i] += damp;
            }
            factors.push(ldl_unit_lower(&invert(&h, cols)?, cols)?);
        }
        Some(Self { cols, factors })
    }

    /// Columns of the tensor (inputs per output).
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Inverse of a `k × k` matrix (Gauss-Jordan with partial pivoting), `None` when singular.
fn invert(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let w = 2 * k;
    let mut m = vec![0f64; k * w];
    for r in 0..k {
        m[r * w..r * w + k].copy_from_slice(&a[r * k..(r + 1) * k]);
        m[r * w + k + r] = 1.0;
    }
    for c in 0..k {
        let p = (c..k).max_by(|&x, &y| m[x * w + c].abs().total_cmp(&m[y * w + c].abs()))?;
        let pivot = m[p * w + c];
        if pivot == 0.0 || !pivot.is_finite() {
            return None;
        }
        if p != c {
            for j in 0..w {
                m.swap(c * w + j, p * w + j);
            }
        }
        for j in 0..w {
            m[c * w + j] /= pivot;
        }
        for r in 0..k {
            let f = m[r * w + c];
            if r != c && f != 0.0 {
                for j in 0..w {
                    m[r * w + j] -= f * m[c * w + j];
                }
            }
        }
    }
    Some((0..k * k).map(|i| m[(i / k) * w + k + i % k]).collect())
}

/// The unit lower-triangular `L` of `a = L D Lᵀ` (`a` symmetric positive definite, `k × k`),
/// `None` when a pivot `D_j` is not positive.
fn ldl_unit_lower(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut l = vec![0f64; k * k];
    let mut d = vec![0f64; k];
    for j in 0..k {
        let dj = a[j * k + j]
            - (0..j)
                .map(|p| l[j * k + p] * l[j * k + p] * d[p])
                .sum::<f64>();
        if !dj.is_finite() || dj <= 0.0 {
            return None;
        }
        d[j] = dj;
        l[j * k + j] = 1.0;
        for i in j + 1..k {
            let s = a[i * k + j]
                - (0..j)
                    .map(|p| l[i * k + p] * l[j * k + p] * d[p])
                    .sum::<f64>();
            l[i * k + j] = s / dj;
        }
    }
    Some(l)
}

/// Re-chooses the sign bits of a `sign`, `sign-groups` or `sign-planes` payload, keeping its
/// scales, with output-aware rounding ([`OutputRounding`]) instead of element by element.
///
/// The tensor is read as `n / r.cols()` rows of `r.cols()` elements. Returns `false` and leaves
/// `enc` unchanged for another codec, or when the rows do not fit: `cols` must divide `n`, the
/// blocks of `r` must divide the rows, and each row must lie in one scale group.
pub fn round_signs_to_outputs(
    enc: &mut Encoded,
    base: &[f32],
    fine: &[f32],
    r: &OutputRounding,
) -> bool {
    use crate::format::plane_byte;
    let n = base.len();
    let cols = r.cols;
    if n == 0 || fine.len() != n || !n.is_multiple_of(cols) {
        return false;
    }
    let rows = n / cols;
    if !rows.is_multiple_of(r.factors.len()) {
        return false;
    }
    let per_block = rows / r.factors.len();
    // Scales as (planes, groups, value of scale j of group g) and where each bit goes.
    let (planes, scales, bits): (usize, Vec<f64>, &mut Vec<u8>) = match enc {
        Encoded::Sign { scale, bits } => (1, vec![f64::from(*scale)], bits),
        Encoded::SignGroups { scales, bits } => (1, widen(scales), bits),
        Encoded::SignPlanes {
            planes,
            scales,
            bits,
        } => (*planes, widen(scales), bits),
        _ => return false,
    };
    let groups = scales.len() / planes;
    if groups == 0 || !n.is_multiple_of(groups) || !(n / groups).is_multiple_of(cols) {
        return false;
    }
    let gsize = n / groups;
    // Every group's levels, sorted, with their plane bits (bit j = plane j is `+`).
    let levels: Vec<Vec<(f64, u8)>> = (0..groups)
        .map(|g| {
            let mut l: Vec<(f64, u8)> = (0..1usize << planes)
                .map(|c| {
                    let v = (0..planes)
                        .map(|j| {
                            let s = scales[j * groups + g];
                            if c >> j & 1 == 1 {
                                s
                            } else {
                                -s
                            }
                        })
                        .sum();
                    (v, c as u8)
                })
                .collect();
            sort_levels(&mut l);
            l
        })
        .collect();
    bits.fill(0);
    let mut w = vec![0f64; cols];
    for row in 0..rows {
        let l = &r.factors[row / per_block];
        let lv = &levels[row * cols / gsize];
        for (o, d) in w.iter_mut().zip(deltas(
            &base[row * cols..][..cols],
            &fine[row * cols..][..cols],
        )) {
            *o = d;
        }
        for i in 0..cols {
            let x = w[i];
            // Nearest level; a tie goes to the larger one.
            let hi = lv.partition_point(|v| v.0 < x).min(lv.len() - 1);
            let (q, code) = if hi > 0 && x - lv[hi - 1].0 < lv[hi].0 - x {
                lv[hi - 1]
            } else {
                lv[hi]
            };
            let e = x - q;
            for (j, wj) in w.iter_mut().enumerate().skip(i + 1) {
                *wj -= e * l[j * cols + i];
            }
            let at = row * cols + i;
            // One plane (`sign`, `sign-groups`) is plain packing: plane_byte(1, i, 0) = i / 8.
            for j in 0..planes {
                bits[plane_byte(planes, at, j)] |= (code >> j & 1) << (at % 8);
            }
        }
    }
    true
}

fn widen(s: &OwnedScales) -> Vec<f64> {
    scale_values(s).into_iter().map(f64::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compose::{self, Base};
    use crate::format::{write_delta, DType, DeltaFile, Manifest, TensorRecord, DEFAULT_ALIGN};
    use proptest::prelude::*;

    struct Rng(u64);
    impl Rng {
        fn unit(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % 2_000_001) as f64 / 1_000_000.0 - 1.0
        }
        /// Heavy-tailed, like fine-tuning deltas.
        fn delta(&mut self) -> f32 {
            let u = self.unit();
            (u * u * u * 0.05) as f32
        }
    }

    fn pair(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let mut r = Rng(seed | 1);
        let base: Vec<f32> = (0..n).map(|_| r.unit() as f32).collect();
        let fine = base.iter().map(|&b| b + r.delta()).collect();
        (base, fine)
    }

    /// Writes `enc` as the one tensor of a delta, parses it back and rebuilds it on `base`
    /// through `compose::reconstruct` (the path a device uses).
    fn rebuild(base: &[f32], enc: &Encoded) -> Vec<f32> {
        let manifest = Manifest {
            name: "t",
            description: "",
            labels: "",
            tool: "test",
            sequence: 0,
            params: 0,
            base_fingerprint: [0; 32],
            result_fingerprint: [0; 32],
        };
        let mut recs = [TensorRecord {
            name: "w".into(),
            dtype: DType::F32,
            dims: vec![base.len() as u32],
            encoded: enc.clone(),
        }];
        let file = write_delta(&manifest, &mut recs, DEFAULT_ALIGN).expect("encoders write");
        let f = DeltaFile::parse(&file).expect("parses");
        let p = f.tensor(0).unwrap().payload().expect("payload checks pass");
        let mut out = vec![0f32; base.len()];
        compose::reconstruct(Base::F32(base), &[(p, 1.0)], &mut out).unwrap();
        out
    }

    fn sq_err(fine: &[f32], rec: &[f32]) -> f64 {
        fine.iter()
            .zip(rec)
            .map(|(&f, &r)| (f64::from(f) - f64::from(r)).powi(2))
            .sum()
    }

    /// Residual signs (plane `j` = sign of what the planes before left, scale = its mean
    /// magnitude), written independently of the encoder, in f64: the fit's starting point.
    fn residual_signs(base: &[f32], fine: &[f32], groups: usize, planes: usize) -> Vec<f64> {
        let g = base.len() / groups;
        let mut out = Vec::new();
        for k in 0..groups {
            let mut r: Vec<f64> = (k * g..(k + 1) * g)
                .map(|i| f64::from(fine[i]) - f64::from(base[i]))
                .collect();
            let d = r.clone();
            for _ in 0..planes {
                let s = r.iter().map(|x| x.abs()).sum::<f64>() / g as f64;
                r.iter_mut()
                    .for_each(|x| *x -= if *x < 0.0 { -s } else { s });
            }
            out.extend(d.iter().zip(&r).map(|(d, r)| d - r));
        }
        out
    }

    #[test]
    fn planes_fit_never_worse_than_residual_signs() {
        for (n, groups) in [(1, 1), (9, 1), (64, 8), (1000, 10), (4800, 48)] {
            for planes in 2..=4 {
                let (base, fine) = pair(n, (n * planes) as u64);
                let enc = sign_planes(&base, &fine, groups, planes, false);
                let got = sq_err(&fine, &rebuild(&base, &enc));
                let greedy: f64 = residual_signs(&base, &fine, groups, planes)
                    .iter()
                    .zip(base.iter().zip(&fine))
                    .map(|(q, (&b, &f))| (f64::from(f) - f64::from(b) - q).powi(2))
                    .sum();
                // f32 scales and f32 reconstruction: a relative slack for rounding only.
                assert!(
                    got <= greedy * (1.0 + 1e-5) + 1e-12,
                    "n {n} groups {groups} planes {planes}: {got} > {greedy}"
                );
                // More planes, less error; and better than one sign plane.
                let one = sq_err(
                    &fine,
                    &rebuild(&base, &sign_groups(&base, &fine, groups, false)),
                );
                assert!(got < one || one == 0.0, "{got} vs {one}");
            }
        }
    }

    #[test]
    fn four_levels_are_found_exactly() {
        // Deltas drawn from ±0.5 ± 0.125 (per group, scaled): two planes represent them exactly.
        let n = 240;
        let mut r = Rng(7);
        let base: Vec<f32> = (0..n).map(|_| r.unit() as f32).collect();
        let fine: Vec<f32> = (0..n)
            .map(|i| {
                let g = (i / 60) as f32 + 1.0;
                let a = if r.unit() < 0.0 { -0.5 } else { 0.5 };
                let b = if r.unit() < 0.0 { -0.125 } else { 0.125 };
                base[i] + g * (a + b)
            })
            .collect();
        let enc = sign_planes(&base, &fine, 4, 2, false);
        let rec = rebuild(&base, &enc);
        for (i, (&f, &x)) in fine.iter().zip(&rec).enumerate() {
            assert!((f - x).abs() <= 2e-6, "element {i}: {f} vs {x}");
        }
        let Encoded::SignPlanes { scales, .. } = enc else {
            unreachable!()
        };
        // Largest plane first: plane 0 holds 0.5 * g, plane 1 0.125 * g.
        let OwnedScales::F32(s) = scales else {
            unreachable!()
        };
        for g in 0..4 {
            let m = g as f32 + 1.0;
            assert!((s[g] - 0.5 * m).abs() < 1e-5 && (s[4 + g] - 0.125 * m).abs() < 1e-5);
        }
    }

    #[test]
    fn planes_layout_and_ties() {
        // A zero delta: every bit `+` (as in `sign`), zero scales, padding bits clear.
        let base = [0.5f32; 13];
        let enc = sign_planes(&base, &base, 1, 3, true);
        assert_eq!(
            enc,
            Encoded::SignPlanes {
                planes: 3,
                scales: OwnedScales::F16(vec![f16::ZERO; 3]),
                bits: vec![0xff, 0xff, 0xff, 0x1f, 0x1f, 0x1f],
            }
        );
        assert_eq!(rebuild(&base, &enc), base);
        // Multiplier 1 is the plain fit; another one scales every scale, bits unchanged.
        let (base, fine) = pair(96, 3);
        let plain = sign_planes(&base, &fine, 8, 2, false);
        assert_eq!(sign_planes_scaled(&base, &fine, 8, 2, false, 1.0), plain);
        let (
            Encoded::SignPlanes {
                scales: OwnedScales::F32(a),
                bits: ba,
                ..
            },
            Encoded::SignPlanes {
                scales: OwnedScales::F32(b),
                bits: bb,
                ..
            },
        ) = (plain, sign_planes_scaled(&base, &fine, 8, 2, false, 1.5))
        else {
            unreachable!()
        };
        assert_eq!(ba, bb);
        for (x, y) in a.iter().zip(&b) {
            assert!((f64::from(*y) - 1.5 * f64::from(*x)).abs() <= 1e-6 * f64::from(*y));
        }
    }

    #[test]
    fn format_md_example() {
        // docs/FORMAT.md §8, "Sign planes": levels ±0.5 ± 0.125.
        let fine = [
            0.625f32, 0.375, -0.375, -0.625, 0.625, 0.625, 0.625, 0.625, -0.625, 0.375,
        ];
        let base = [0f32; 10];
        let enc = sign_planes(&base, &fine, 1, 2, true);
        assert_eq!(
            enc,
            Encoded::SignPlanes {
                planes: 2,
                scales: OwnedScales::F16(vec![f16::from_f32(0.5), f16::from_f32(0.125)]),
                bits: vec![0xf3, 0xf5, 0x02, 0x00],
            }
        );
        assert_eq!(enc.payload_len(), 8);
        assert_eq!(rebuild(&base, &enc), fine);
    }

    // -----------------------------------------------------------------------------------------
    // Output-aware rounding

    /// `rows × cols` weights multiplying inputs with correlated features; their `H`.
    fn layer(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f64>) {
        let (base, fine) = pair(rows * cols, seed);
        let mut r = Rng(seed ^ 0x55);
        let samples = 4 * cols;
        let mut h = vec![0f64; cols * cols];
        for _ in 0..samples {
            let common = r.unit();
            let x: Vec<f64> = (0..cols)
                .map(|c| r.unit() + common * (c % 3) as f64)
                .collect();
            for a in 0..cols {
                for b in 0..cols {
                    h[a * cols + b] += x[a] * x[b] / samples as f64;
                }
            }
        }
        (base, fine, h)
    }

    /// `sum over rows of e H eᵀ`, e = the rebuilt row minus the fine-tuned row.
    fn output_err(base: &[f32], fine: &[f32], enc: &Encoded, h: &[f64], cols: usize) -> f64 {
        let rec = rebuild(base, enc);
        let e: Vec<f64> = rec
            .iter()
            .zip(fine)
            .map(|(&r, &f)| f64::from(r) - f64::from(f))
            .collect();
        e.chunks(cols)
            .map(|row| {
                (0..cols)
                    .map(|a| {
                        (0..cols)
                            .map(|b| row[a] * h[a * cols + b] * row[b])
                            .sum::<f64>()
                    })
                    .sum::<f64>()
            })
            .sum()
    }

    /// GPTQ as optimal brain quantization states it, independently of the `L D Lᵀ` shortcut:
    /// keep `H⁻¹` of the columns not yet chosen; column `i` takes a level `q_i`, its error
    /// `(w_i − q_i) / H⁻¹_ii · H⁻¹_i·` moves onto the rest, and `i` leaves `H⁻¹`. Returns, per
    /// column, how much farther `q[i]` (the codec's choice) is from the updated `w_i` than the
    /// nearest level: 0 up to rounding when the codec followed the same path.
    fn obq_excess(d: &[f64], q: &[f64], levels: &[f64], h: &[f64], cols: usize) -> Vec<f64> {
        let mut h = h.to_vec();
        for i in 0..cols {
            if h[i * cols + i] <= 0.0 {
                h[i * cols + i] = 1.0;
            }
        }
        let damp =
            OUTPUT_ROUNDING_DAMP * (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
        (0..cols).for_each(|i| h[i * cols + i] += damp);
        let mut hinv = invert(&h, cols).unwrap();
        let mut w = d.to_vec();
        let mut excess = vec![0f64; cols];
        for i in 0..cols {
            let x = w[i];
            let nearest = levels
                .iter()
                .map(|l| (x - l).abs())
                .fold(f64::INFINITY, f64::min);
            excess[i] = (x - q[i]).abs() - nearest;
            let err = (x - q[i]) / hinv[i * cols + i];
            for j in i + 1..cols {
                w[j] -= err * hinv[i * cols + j];
            }
            let (row, p) = (hinv[i * cols..(i + 1) * cols].to_vec(), hinv[i * cols + i]);
            let col: Vec<f64> = (0..cols).map(|a| hinv[a * cols + i]).collect();
            for a in 0..cols {
                for b in 0..cols {
                    hinv[a * cols + b] -= col[a] * row[b] / p;
                }
            }
        }
        excess
    }

    #[test]
    fn output_rounding_matches_optimal_brain_quantization() {
        let (rows, cols) = (6, 12);
        let (base, fine, h) = layer(rows, cols, 11);
        let r = OutputRounding::new(cols, std::slice::from_ref(&h)).unwrap();
        let mut enc = sign_planes(&base, &fine, rows, 2, false);
        assert!(round_signs_to_outputs(&mut enc, &base, &fine, &r));
        let Encoded::SignPlanes {
            scales: OwnedScales::F32(s),
            bits,
            ..
        } = &enc
        else {
            unreachable!()
        };
        for row in 0..rows {
            let (s0, s1) = (f64::from(s[row]), f64::from(s[rows + row]));
            let levels = [-s0 - s1, -s0 + s1, s0 - s1, s0 + s1];
            let d: Vec<f64> = (row * cols..(row + 1) * cols)
                .map(|i| f64::from(fine[i]) - f64::from(base[i]))
                .collect();
            // The codec's levels, read from its bits (plane j of element i: byte (i/8)*2 + j).
            let q: Vec<f64> = (row * cols..(row + 1) * cols)
                .map(|i| {
                    let sign = |j: usize| {
                        if bits[(i / 8) * 2 + j] >> (i % 8) & 1 == 1 {
                            1.0
                        } else {
                            -1.0
                        }
                    };
                    sign(0) * s0 + sign(1) * s1
                })
                .collect();
            for (c, e) in obq_excess(&d, &q, &levels, &h, cols).iter().enumerate() {
                assert!(
                    *e < 1e-9,
                    "row {row} col {c}: {e} farther than the nearest level"
                );
            }
            // And the path is not the plain one (the error did move).
            let plain: Vec<f64> = d
                .iter()
                .map(|&x| {
                    levels
                        .iter()
                        .copied()
                        .min_by(|a, b| (x - a).abs().total_cmp(&(x - b).abs()))
                        .unwrap()
                })
                .collect();
            assert_ne!(q, plain, "row {row}");
        }
    }

    #[test]
    fn output_rounding_lowers_the_output_error() {
        let (rows, cols) = (16, 24);
        let (base, fine, h) = layer(rows, cols, 5);
        let r = OutputRounding::new(cols, std::slice::from_ref(&h)).unwrap();
        let encoders: [(&str, Encoded); 4] = [
            ("sign", sign_tensor(&base, &fine)),
            ("sign-groups", sign_groups(&base, &fine, rows, true)),
            ("sign-planes 2", sign_planes(&base, &fine, rows, 2, true)),
            ("sign-planes 3", sign_planes(&base, &fine, 1, 3, false)),
        ];
        for (name, plain) in encoders {
            let mut rounded = plain.clone();
            assert!(round_signs_to_outputs(&mut rounded, &base, &fine, &r));
            let (p, q) = (
                output_err(&base, &fine, &plain, &h, cols),
                output_err(&base, &fine, &rounded, &h, cols),
            );
            assert!(q < 0.8 * p, "{name}: {q} not below {p}");
        }
    }

    #[test]
    fn output_rounding_with_uncorrelated_inputs_is_nearest() {
        // H = I: no error moves to other columns, so each element takes its nearest level,
        // which is what the plain encoders do.
        let (rows, cols) = (4, 10);
        let (base, fine) = pair(rows * cols, 9);
        let identity: Vec<f64> = (0..cols * cols)
            .map(|i| if i % (cols + 1) == 0 { 1.0 } else { 0.0 })
            .collect();
        // Two blocks of rows (a grouped convolution) with the same H.
        let r = OutputRounding::new(cols, &[identity.clone(), identity]).unwrap();
        for plain in [
            sign_tensor(&base, &fine),
            sign_groups(&base, &fine, rows, true),
            sign_planes(&base, &fine, rows, 3, false),
        ] {
            let mut rounded = plain.clone();
            assert!(round_signs_to_outputs(&mut rounded, &base, &fine, &r));
            assert_eq!(rounded, plain);
        }
    }

    #[test]
    fn output_rounding_refuses_what_does_not_fit() {
        let (base, fine) = pair(24, 1);
        let h = |k: usize| {
            vec![(0..k * k)
                .map(|i| f64::from(u8::from(i % (k + 1) == 0)))
                .collect()]
        };
        let r5 = OutputRounding::new(5, &h(5)).unwrap();
        let r6 = OutputRounding::new(6, &h(6)).unwrap();
        let r6x3 =
            OutputRounding::new(6, &[h(6)[0].clone(), h(6)[0].clone(), h(6)[0].clone()]).unwrap();
        for (mut enc, r) in [
            (sign_tensor(&base, &fine), &r5),           // 5 does not divide 24
            (sign_groups(&base, &fine, 8, false), &r6), // groups of 3 split rows of 6
            (sign_planes(&base, &fine, 1, 2, true), &r6x3), // 3 blocks for 4 rows
            (q8_groups(&base, &fine, 4, true), &r6),    // not a sign codec
            (Encoded::Unchanged, &r6),
        ] {
            let before = enc.clone();
            assert!(!round_signs_to_outputs(&mut enc, &base, &fine, r));
            assert_eq!(enc, before);
        }
        assert!(OutputRounding::new(0, &[]).is_none());
        assert!(OutputRounding::new(2, &[]).is_none());
        assert!(OutputRounding::new(2, &[vec![1.0; 3]]).is_none());
        assert!(OutputRounding::new(2, &[vec![1.0, f64::NAN, f64::NAN, 1.0]]).is_none());
        // Not positive definite even after damping.
        assert!(OutputRounding::new(2, &[vec![1.0, 5.0, 5.0, 1.0]]).is_none());
        // An input that is always 0 is fine.
        assert!(OutputRounding::new(2, &[vec![0.0, 0.0, 0.0, 2.0]]).is_some());
    }

    proptest! {
        #[test]
        fn sign_planes_encode_valid_payloads(
            rows in 1usize..20,
            cols in 1usize..40,
            planes in 2usize..=8,
            per_channel in any::<bool>(),
            f16 in any::<bool>(),
            m in prop::sample::select(vec![1.0f64, 1.25, 1.5]),
            seed in any::<u64>(),
        ) {
            let (base, fine) = pair(rows * cols, seed);
            let groups = if per_channel { rows } else { 1 };
            let enc = sign_planes_scaled(&base, &fine, groups, planes, f16, m);
            prop_assert_eq!(enc.groups(), groups);
            // Writes, parses and rebuilds (the payload checks pass), within the levels' reach.
            let rec = rebuild(&base, &enc);
            let max = |v: &[f32]| v.iter().fold(0f32, |a, &x| a.max(x.abs()));
            let d: Vec<f32> = fine.iter().zip(&base).map(|(f, b)| f - b).collect();
            let r: Vec<f32> = rec.iter().zip(&base).map(|(x, b)| x - b).collect();
            prop_assert!(max(&r) <= m as f32 * 2.0 * max(&d) + 1e-6);
            let Encoded::SignPlanes { scales, planes: k, .. } = &enc else { unreachable!() };
            prop_assert_eq!(*k, planes);
            prop_assert!(scale_values(scales).iter().all(|x| x.is_finite() && *x >= 0.0));
        }
    }
}
