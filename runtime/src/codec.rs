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
        for (o, v) in d.iter_mut().zip(deltas(&base[k * g..(k + 1) * g], &fine[k * g..(k + 1) * g]))
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
        let mut levels: Vec<(f64, u8)> =
            (0..1usize << planes).map(|c| (level(&s, c), c as u8)).collect();
        levels.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
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
    Some((0..planes).map(|r| m[r * w + planes] / m[r * w + r]).collect())
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
            let damp = OUTPUT_ROUNDING_DAMP
                * (0..cols).map(|i| h[i * cols + i]).sum::<f64>()
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
        let dj = a[j * k + j] - (0..j).map(|p| l[j * k + p] * l[j * k + p] * d[p]).sum::<f64>();
        if !(dj > 0.0) || !dj.is_finite() {
            return None;
        }
        d[j] = dj;
        l[j * k + j] = 1.0;
        for i in j + 1..k {
            let s = a[i * k + j] - (0..j).map(|p| l[i * k + p] * l[j * k + p] * d[p]).sum::<f64>();
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
            l.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            l
        })
        .collect();
    bits.fill(0);
    let mut w = vec![0f64; cols];
    for row in 0..rows {
        let l = &r.factors[row / per_block];
        let lv = &levels[row * cols / gsize];
        for (o, d) in w
            .iter_mut()
            .zip(deltas(&base[row * cols..][..cols], &fine[row * cols..][..cols]))
        {
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
            for j in 0..planes {
                let byte = if planes == 1 {
                    at / 8
                } else {
                    plane_byte(planes, at, j)
                };
                bits[byte] |= (code >> j & 1) << (at % 8);
            }
        }
    }
    true
}

fn widen(s: &OwnedScales) -> Vec<f64> {
    scale_values(s).into_iter().map(f64::from).collect()
}
