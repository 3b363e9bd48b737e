//! Output-aware rounding of the sign codecs (GPTQ with the codec's own levels).

use alloc::vec;
use alloc::vec::Vec;

use super::sign_planes::sort_levels;
use super::{deltas, widen};
use crate::format::Encoded;

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
    /// Per block: the unit lower-triangular `L` of `H⁻¹ = L D Lᵀ`, transposed (`Lᵀ`, `cols ×
    /// cols` row-major). Row `i` of `Lᵀ` right of the diagonal (column `i` of `L` below it) is
    /// how the error at column `i` spreads to the columns after it (the upper Cholesky factor's
    /// row `i` over its diagonal: the `D` cancels); held as a row so that it is read in order.
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
            let l = ldl_unit_lower(&invert(&h, cols)?, cols)?;
            factors.push(
                (0..cols * cols)
                    .map(|k| l[(k % cols) * cols + k / cols])
                    .collect(),
            );
        }
        Some(Self { cols, factors })
    }

    /// Columns of the tensor (inputs per output).
    pub fn cols(&self) -> usize {
        self.cols
    }
}

/// Inverse of a `k × k` matrix (Gauss-Jordan with partial pivoting), `None` when singular.
pub(super) fn invert(a: &[f64], k: usize) -> Option<Vec<f64>> {
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
        let lt = &r.factors[row / per_block];
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
            for (wj, &lji) in w[i + 1..]
                .iter_mut()
                .zip(&lt[i * cols + i + 1..(i + 1) * cols])
            {
                *wj -= e * lji;
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
