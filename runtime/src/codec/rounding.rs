//! Output-aware rounding of the sign codecs (GPTQ with the codec's own levels).

use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;

use super::sign_planes::sort_levels;
use super::{deltas, f16_scale, widen};
use crate::format::{Encoded, OwnedScales};

/// Relative damping of [`OutputRounding`]: `H + DAMP * mean(diag H) * I`.
///
/// GPTQ uses 0.01. The inputs of a few calibration images make a noisy `H`, and rounding that
/// fits it closely fits those images: on the field family (100 frames) 0.1 lowered the mean KL
/// divergence from the fine-tune on the test frames by a quarter (night, 1 bit/param: 0.097 to
/// 0.070; fog: 0.0056 to 0.0038), and it lowered it on the species family at five of six budgets.
pub const OUTPUT_ROUNDING_DAMP: f64 = 0.1;

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
    /// Per block: the unit lower-triangular `L` of `H⁻¹ = L D Lᵀ`, transposed (`Lᵀ`, `cols ×
    /// cols` row-major). Row `i` of `Lᵀ` right of the diagonal (column `i` of `L` below it) is
    /// how the error at column `i` spreads to the columns after it (the upper Cholesky factor's
    /// row `i` over its diagonal: the `D` cancels); held as a row so that it is read in order.
    factors: Vec<Vec<f64>>,
    /// Per block: the damped `H` the factors come from (for refitting scales to the bits).
    hessians: Vec<Vec<f64>>,
    /// Per block: the upper triangular `U` of the damped `H = U Uᵀ` on and above the diagonal,
    /// and `Uᵀ` below it (row `i` left of the diagonal is column `i` of `U` above it), so that
    /// both of [`Self::solve_rows`]'s triangular solves read rows in order.
    uppers: Vec<Vec<f64>>,
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
        let mut damped = Vec::with_capacity(hessians.len());
        let mut uppers = Vec::with_capacity(hessians.len());
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
            let mut u = cholesky_upper(&h, cols)?;
            factors.push(ldl_rows_of_upper(&u, cols));
            for i in 0..cols {
                for m in 0..i {
                    u[i * cols + m] = u[m * cols + i];
                }
            }
            uppers.push(u);
            damped.push(h);
        }
        Some(Self {
            cols,
            factors,
            hessians: damped,
            uppers,
        })
    }

    /// Columns of the tensor (inputs per output).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Replaces each row `y` of `rows` (`cols` values each) with `y H⁻¹`, `H` the damped
    /// matrix of block `block` (two triangular solves with its Cholesky factor `H = U Uᵀ`).
    /// Each row's result is the same whatever other rows it comes with. `false`, with `rows`
    /// unchanged, when there is no such block or the rows do not fit.
    pub fn solve_rows(&self, block: usize, rows: &mut [f64]) -> bool {
        let k = self.cols;
        let Some(u) = self.uppers.get(block) else {
            return false;
        };
        if !rows.len().is_multiple_of(k) {
            return false;
        }
        // H e = y (H symmetric): U z = y (from the last), then Uᵀ e = z (from the first), in
        // place; a block of rows at a time, each row of `U` read once per block.
        for ys in rows.chunks_mut(ROW_BLOCK * k) {
            for i in (0..k).rev() {
                let (tail, pivot) = (&u[i * k + i + 1..(i + 1) * k], u[i * k + i]);
                for y in ys.chunks_exact_mut(k) {
                    y[i] = (y[i] - dot(tail, &y[i + 1..])) / pivot;
                }
            }
            for i in 0..k {
                let (head, pivot) = (&u[i * k..i * k + i], u[i * k + i]);
                for y in ys.chunks_exact_mut(k) {
                    let s: f64 = head.iter().zip(&y[..i]).map(|(a, b)| a * b).sum();
                    y[i] = (y[i] - s) / pivot;
                }
            }
        }
        true
    }
}

/// Rows rounded together by [`round_signs_to_outputs`] and refitted together by
/// `refit_sign_scales`: each row of a `cols × cols` matrix they read is read once per this many
/// rows (from cache for the others).
const ROW_BLOCK: usize = 16;

/// `c += alpha a b` for row-major matrices given as (values, row stride): `a` is `m × k`, `b`
/// is `k × n` and `c` is `m × n`; one matrix product (matrixmultiply's kernels). Panics when a
/// slice is too short for its matrix.
#[allow(unsafe_code)]
fn add_product(
    alpha: f64,
    [m, k, n]: [usize; 3],
    a: (&[f64], usize),
    b: (&[f64], usize),
    c: (&mut [f64], usize),
) {
    if m == 0 || k == 0 || n == 0 {
        return;
    }
    let fits = |len: usize, rows: usize, cols: usize, stride: usize| {
        cols <= stride && len >= (rows - 1) * stride + cols
    };
    assert!(fits(a.0.len(), m, k, a.1) && fits(b.0.len(), k, n, b.1) && fits(c.0.len(), m, n, c.1));
    // SAFETY: by the assert, every element the product reads or writes lies in its slice; `c`
    // is borrowed mutably, so it overlaps neither `a` nor `b`.
    unsafe {
        matrixmultiply::dgemm(
            m,
            k,
            n,
            alpha,
            a.0.as_ptr(),
            a.1 as isize,
            1,
            b.0.as_ptr(),
            b.1 as isize,
            1,
            1.0,
            c.0.as_mut_ptr(),
            c.1 as isize,
            1,
        );
    }
}

/// Columns whose rounding errors [`round_signs_to_outputs`] moves onto the later columns in one
/// matrix product.
const COLUMN_BLOCK: usize = 64;

/// The blocks of at most [`ROW_BLOCK`] of `rows` rows, none across a multiple of `per_block`
/// (the rows of one matrix of an [`OutputRounding`]).
fn row_blocks(rows: usize, per_block: usize) -> impl Iterator<Item = Range<usize>> {
    let mut end = 0;
    core::iter::from_fn(move || {
        let first = end;
        end = (first + ROW_BLOCK)
            .min(rows)
            .min((first / per_block + 1) * per_block);
        (first < rows).then_some(first..end)
    })
}

/// `Σ a_i b_i` with four running sums (so that it vectorises).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut acc = [0f64; 4];
    let (ca, cb) = (a.chunks_exact(4), b.chunks_exact(4));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..4 {
            acc[l] += x[l] * y[l];
        }
    }
    (acc[0] + acc[1]) + (acc[2] + acc[3]) + tail
}

/// The upper triangular `U` of `H = U Uᵀ` (`h` symmetric positive definite, `k × k`,
/// row-major; row `i` of the result holds `U_ij` for `j >= i`), taken from the last column.
/// `None` when a pivot is not positive.
fn cholesky_upper(h: &[f64], k: usize) -> Option<Vec<f64>> {
    let mut u = vec![0f64; k * k];
    for j in (0..k).rev() {
        let tail = j + 1..k;
        let ujj2 = h[j * k + j] - dot(&u[j * k..][tail.clone()], &u[j * k..][tail.clone()]);
        if !ujj2.is_finite() || ujj2 <= 0.0 {
            return None;
        }
        let ujj = ujj2.sqrt();
        u[j * k + j] = ujj;
        let (above, from_j) = u.split_at_mut(j * k);
        let uj = &from_j[tail.clone()];
        for i in 0..j {
            above[i * k + j] = (h[i * k + j] - dot(&above[i * k..][tail.clone()], uj)) / ujj;
        }
    }
    Some(u)
}

/// The rows of `Lᵀ` for the unit lower-triangular `L` of `H⁻¹ = L D Lᵀ` (`h` symmetric positive
/// definite, `k × k`, row-major), without forming `H⁻¹`: with `H = U Uᵀ` (`U` upper triangular,
/// Cholesky from the last column), `H⁻¹ = U⁻ᵀ U⁻¹`, so `L = U⁻ᵀ diag(U)` and `Lᵀ = diag(U) U⁻¹`.
/// `None` when a pivot is not positive.
#[cfg(test)]
pub(super) fn inverse_ldl_rows(h: &[f64], k: usize) -> Option<Vec<f64>> {
    cholesky_upper(h, k).map(|u| ldl_rows_of_upper(&u, k))
}

/// [`inverse_ldl_rows`] from the upper triangular `U` of `H = U Uᵀ` ([`cholesky_upper`]).
fn ldl_rows_of_upper(u: &[f64], k: usize) -> Vec<f64> {
    // V = U⁻¹ (upper), row by row from the last: V_i = (e_i − Σ_{m>i} U_im V_m) / U_ii; then
    // row i of Lᵀ is U_ii V_i = e_i − Σ_{m>i} U_im V_m.
    let mut v = vec![0f64; k * k];
    let mut lt = vec![0f64; k * k];
    let mut row = vec![0f64; k];
    for i in (0..k).rev() {
        row.fill(0.0);
        row[i] = 1.0;
        for m in i + 1..k {
            let f = u[i * k + m];
            if f != 0.0 {
                for (r, &x) in row[m..].iter_mut().zip(&v[m * k + m..(m + 1) * k]) {
                    *r -= f * x;
                }
            }
        }
        let uii = u[i * k + i];
        for (o, &r) in v[i * k + i..(i + 1) * k].iter_mut().zip(&row[i..]) {
            *o = r / uii;
        }
        lt[i * k + i..(i + 1) * k].copy_from_slice(&row[i..]);
    }
    lt
}

/// Re-chooses the sign bits of a `sign`, `sign-groups` or `sign-planes` payload with output-aware
/// rounding ([`OutputRounding`]) instead of element by element, on the payload's own levels. A
/// one-plane payload (`sign`, `sign-groups`) then refits each group's scale to the bits chosen:
/// the scale with the least output error for them (a `sign-planes` payload keeps its scales).
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
    // Rows are independent: a block of them goes column by column, so that each row of the
    // factor is read once per block (a row's own arithmetic is the same as alone). Within a
    // block of COLUMN_BLOCK columns the errors move on one column at a time; at its end, all of
    // them move onto the columns after it at once, as one matrix product (GPTQ's lazy batch).
    let mut w = vec![0f64; ROW_BLOCK * cols];
    // Per row of the block, the errors of the current column block.
    let mut errors = vec![0f64; ROW_BLOCK * COLUMN_BLOCK];
    for Range { start: first, end } in row_blocks(rows, per_block) {
        let lt = &r.factors[first / per_block];
        let w = &mut w[..(end - first) * cols];
        for (wr, row) in w.chunks_exact_mut(cols).zip(first..end) {
            for (o, d) in wr.iter_mut().zip(deltas(
                &base[row * cols..][..cols],
                &fine[row * cols..][..cols],
            )) {
                *o = d;
            }
        }
        for start in (0..cols).step_by(COLUMN_BLOCK) {
            let stop = (start + COLUMN_BLOCK).min(cols);
            for i in start..stop {
                let l = &lt[i * cols + i + 1..i * cols + stop];
                for ((wr, es), row) in w
                    .chunks_exact_mut(cols)
                    .zip(errors.chunks_exact_mut(COLUMN_BLOCK))
                    .zip(first..end)
                {
                    let lv = &levels[row * cols / gsize];
                    let x = wr[i];
                    // Nearest level; a tie goes to the larger one.
                    let hi = lv.partition_point(|v| v.0 < x).min(lv.len() - 1);
                    let (q, code) = if hi > 0 && x - lv[hi - 1].0 < lv[hi].0 - x {
                        lv[hi - 1]
                    } else {
                        lv[hi]
                    };
                    let e = x - q;
                    es[i - start] = e;
                    let at = row * cols + i;
                    // One plane (`sign`, `sign-groups`) is plain packing: plane_byte(1, i, 0) =
                    // i / 8.
                    for j in 0..planes {
                        bits[plane_byte(planes, at, j)] |= (code >> j & 1) << (at % 8);
                    }
                    for (wj, &lji) in wr[i + 1..stop].iter_mut().zip(l) {
                        *wj -= e * lji;
                    }
                }
            }
            if stop < cols {
                // The block's errors onto the columns after it: w[.., stop..] -= errors ·
                // Lᵀ[start..stop, stop..].
                add_product(
                    -1.0,
                    [end - first, stop - start, cols - stop],
                    (&errors, COLUMN_BLOCK),
                    (&lt[start * cols + stop..], cols),
                    (&mut w[stop..], cols),
                );
            }
        }
    }
    if planes == 1 {
        refit_sign_scales(enc, base, fine, r, per_block, gsize);
    }
    true
}

/// With the bits chosen, each group's scale of a one-plane payload (`sign`, `sign-groups`) set
/// to the one with the least output error for them: over the group's rows `r` (signs `b_r`,
/// deltas `d_r`), `s = Σ b_r H d_rᵀ / Σ b_r H b_rᵀ`. A scale whose refit is not a positive value
/// the payload can store (f16: a normal one) stays as it was.
fn refit_sign_scales(
    enc: &mut Encoded,
    base: &[f32],
    fine: &[f32],
    r: &OutputRounding,
    per_block: usize,
    gsize: usize,
) {
    let cols = r.cols;
    let bits = match enc {
        Encoded::Sign { bits, .. } | Encoded::SignGroups { bits, .. } => &bits[..],
        _ => return,
    };
    let groups = base.len() / gsize;
    let mut num = vec![0f64; groups];
    let mut den = vec![0f64; groups];
    // A block of rows at a time, `H` read once per block.
    let block = ROW_BLOCK * cols;
    let (mut b, mut hb, mut d) = (vec![0f64; block], vec![0f64; block], vec![0f64; block]);
    let rows = base.len() / cols;
    for Range { start: first, end } in row_blocks(rows, per_block) {
        let h = &r.hessians[first / per_block];
        let n = (end - first) * cols;
        let (b, hb, d) = (&mut b[..n], &mut hb[..n], &mut d[..n]);
        for (k, o) in b.iter_mut().enumerate() {
            let at = first * cols + k;
            *o = if bits[at / 8] >> (at % 8) & 1 == 1 {
                1.0
            } else {
                -1.0
            };
        }
        for (o, v) in d.iter_mut().zip(deltas(
            &base[first * cols..end * cols],
            &fine[first * cols..end * cols],
        )) {
            *o = v;
        }
        // H is symmetric: each row of `hb` is `b H`.
        hb.fill(0.0);
        add_product(
            1.0,
            [end - first, cols, cols],
            (b, cols),
            (h, cols),
            (hb, cols),
        );
        for (((br, hbr), dr), row) in b
            .chunks_exact(cols)
            .zip(hb.chunks_exact(cols))
            .zip(d.chunks_exact(cols))
            .zip(first..end)
        {
            let g = row * cols / gsize;
            num[g] += dot(hbr, dr);
            den[g] += dot(hbr, br);
        }
    }
    // The refit of group `g`, when it is a positive value.
    let fit = |g: usize| Some(num[g] / den[g]).filter(|s| s.is_finite() && *s > 0.0);
    let fit_f32 = |g: usize| fit(g).map(|s| s as f32).filter(|s| s.is_finite());
    match enc {
        Encoded::Sign { scale, .. } => {
            if let Some(s) = fit_f32(0) {
                *scale = s;
            }
        }
        Encoded::SignGroups {
            scales: OwnedScales::F32(v),
            ..
        } => {
            for (g, x) in v.iter_mut().enumerate() {
                if let Some(s) = fit_f32(g) {
                    *x = s;
                }
            }
        }
        Encoded::SignGroups {
            scales: OwnedScales::F16(v),
            ..
        } => {
            for (g, x) in v.iter_mut().enumerate() {
                if let Some(s) = fit(g).and_then(f16_scale) {
                    *x = s;
                }
            }
        }
        _ => {}
    }
}
