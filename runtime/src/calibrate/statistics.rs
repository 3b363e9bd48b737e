//! Statistics of the layers' inputs: the second moments `E[x xᵀ]` of what every convolution and
//! fully connected weight multiplies, measured in the fine-tuned model on the calibration images,
//! for output-aware rounding ([`codec::OutputRounding`]).

use std::collections::BTreeMap;
use std::ops::Range;
use std::string::String;
use std::vec;
use std::vec::Vec;

use super::Images;
use crate::codec;
use crate::onnx::OnnxWeights;
use tract_onnx::prelude::tract_ndarray::linalg::general_mat_mul;
use tract_onnx::prelude::tract_ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};
use tract_onnx::prelude::*;

/// Images per run of the probe model that exposes the layers' inputs.
const PROBE_BATCH: usize = 50;

/// How a weight multiplies its input: `x Wᵀ` (fully connected) or a 2-D convolution.
#[derive(Clone, Debug)]
pub(super) struct WeightUse {
    pub(super) weight: String,
    pub(super) input: String,
    pub(super) conv: Option<ConvShape>,
    /// The bias added to the outputs (a float initializer that only this node uses).
    pub(super) bias: Option<String>,
}

/// A 2-D convolution's geometry (weight `[co, cig, kh, kw]`, `group` groups).
#[derive(Clone, Copy, Debug)]
pub(super) struct ConvShape {
    pub(super) group: usize,
    pub(super) cig: usize,
    pub(super) kernel: [usize; 2],
    pub(super) stride: [usize; 2],
    pub(super) dilation: [usize; 2],
    /// Top, left, bottom, right.
    pub(super) pads: [usize; 4],
}

impl ConvShape {
    pub(super) fn cols(&self) -> usize {
        self.cig * self.kernel[0] * self.kernel[1]
    }
}

/// The weights that exactly one `Conv` (2-D, explicit padding) or `Gemm` (`transA = 0`,
/// `transB = 1`) node multiplies with its first input, and with nothing else.
pub(super) fn weight_uses(
    graph: &tract_onnx::pb::GraphProto,
    weights: &OnnxWeights,
) -> Vec<WeightUse> {
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for node in &graph.node {
        for i in &node.input {
            *count.entry(i.as_str()).or_default() += 1;
        }
    }
    let attr = |node: &tract_onnx::pb::NodeProto, name: &str| {
        node.attribute.iter().find(|a| a.name == name).cloned()
    };
    let ints = |node: &tract_onnx::pb::NodeProto, name: &str, default: &[usize]| {
        attr(node, name).map_or(Some(default.to_vec()), |a| {
            a.ints.iter().map(|&v| usize::try_from(v).ok()).collect()
        })
    };
    let mut out = Vec::new();
    for node in &graph.node {
        let (Some(x), Some(w)) = (node.input.first(), node.input.get(1)) else {
            continue;
        };
        let Some(init) = weights.get(w) else { continue };
        if count.get(w.as_str()) != Some(&1) {
            continue;
        }
        let conv = match node.op_type.as_str() {
            "Conv" if init.dims.len() == 4 => {
                let auto_pad = attr(node, "auto_pad").map(|a| a.s).unwrap_or_default();
                if !(auto_pad.is_empty() || auto_pad == b"NOTSET") {
                    continue;
                }
                let group = attr(node, "group").map_or(1, |a| a.i);
                let (Some(stride), Some(dilation), Some(pads)) = (
                    ints(node, "strides", &[1, 1]),
                    ints(node, "dilations", &[1, 1]),
                    ints(node, "pads", &[0, 0, 0, 0]),
                ) else {
                    continue;
                };
                let Ok(group) = usize::try_from(group) else {
                    continue;
                };
                if stride.len() != 2 || dilation.len() != 2 || pads.len() != 4 || group == 0 {
                    continue;
                }
                let d: Vec<usize> = init.dims.iter().map(|&v| v as usize).collect();
                if !d[0].is_multiple_of(group) || stride.contains(&0) || dilation.contains(&0) {
                    continue;
                }
                Some(ConvShape {
                    group,
                    cig: d[1],
                    kernel: [d[2], d[3]],
                    stride: [stride[0], stride[1]],
                    dilation: [dilation[0], dilation[1]],
                    pads: [pads[0], pads[1], pads[2], pads[3]],
                })
            }
            "Gemm" if init.dims.len() == 2 => {
                let flag = |name| attr(node, name).map_or(0, |a| a.i);
                if flag("transA") != 0 || flag("transB") != 1 {
                    continue;
                }
                None
            }
            _ => continue,
        };
        let bias = node
            .input
            .get(2)
            .filter(|b| weights.get(b).is_some() && count.get(b.as_str()) == Some(&1))
            .cloned();
        out.push(WeightUse {
            weight: w.clone(),
            input: x.clone(),
            conv,
            bias,
        });
    }
    out
}

#[cfg(test)]
/// Adds the patches of `a` (`[n, c, h, w]`, row-major) that convolution `s` multiplies to the
/// upper triangles of `h` (one `cols × cols` matrix per group).
pub(super) fn add_patches(s: &ConvShape, a: &[f32], shape: &[usize], h: &mut [Vec<f64>]) {
    let [n, c, ih, iw] = [shape[0], shape[1], shape[2], shape[3]];
    let ([kh, kw], [sy, sx], [dy, dx]) = (s.kernel, s.stride, s.dilation);
    let (span_y, span_x) = (dy * (kh - 1) + 1, dx * (kw - 1) + 1);
    let (py, px) = (ih + s.pads[0] + s.pads[2], iw + s.pads[1] + s.pads[3]);
    if c != s.cig * s.group || py < span_y || px < span_x {
        return;
    }
    let (oh, ow) = ((py - span_y) / sy + 1, (px - span_x) / sx + 1);
    let cols = s.cols();
    let mut p = vec![0f64; cols];
    for img in 0..n {
        for (gi, hg) in h.iter_mut().enumerate() {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ci in 0..s.cig {
                        let plane = &a[((img * c) + gi * s.cig + ci) * ih * iw..][..ih * iw];
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let y = (oy * sy + ky * dy).checked_sub(s.pads[0]);
                                let x = (ox * sx + kx * dx).checked_sub(s.pads[1]);
                                p[(ci * kh + ky) * kw + kx] = match (y, x) {
                                    (Some(y), Some(x)) if y < ih && x < iw => {
                                        f64::from(plane[y * iw + x])
                                    }
                                    _ => 0.0,
                                };
                            }
                        }
                    }
                    add_outer(hg, &p);
                }
            }
        }
    }
}

#[cfg(test)]
/// Copies the upper triangle of the `k × k` matrix `h` onto its lower one.
pub(super) fn mirror(h: &mut [f64], k: usize) {
    for r in 0..k {
        for c in 0..r {
            h[r * k + c] = h[c * k + r];
        }
    }
}

#[cfg(test)]
/// `h += p pᵀ`, upper triangle only.
fn add_outer(h: &mut [f64], p: &[f64]) {
    let k = p.len();
    for (r, &pr) in p.iter().enumerate() {
        if pr != 0.0 {
            for (hc, &pc) in h[r * k + r..(r + 1) * k].iter_mut().zip(&p[r..]) {
                *hc += pr * pc;
            }
        }
    }
}

/// What one layer's weight multiplies in the fine-tuned model on the calibration images: the
/// sums of `x xᵀ` over every input vector (a convolution's patches, a fully connected layer's
/// rows), one symmetric `cols × cols` matrix per group of rows.
#[derive(Clone, Debug)]
pub(super) struct LayerInputs {
    pub(super) cols: usize,
    pub(super) h: Vec<Vec<f64>>,
    /// The mean input vector of each group.
    pub(super) mean: Vec<Vec<f64>>,
    /// Input vectors summed (per group).
    pub(super) vectors: f64,
    /// The bias added to the layer's outputs, if it is a tensor of its own.
    pub(super) bias: Option<String>,
    /// The same layer's inputs in the fine-tune, when these are another model's
    /// ([`paired_inputs`]).
    pub(super) paired: Option<Paired>,
}

/// A layer's inputs in the fine-tune `y`, beside its inputs `x` in another model on the same
/// images: per group `Σ y xᵀ` and the mean of `y`.
#[derive(Clone, Debug)]
pub(super) struct Paired {
    pub(super) cross: Vec<Vec<f64>>,
    pub(super) mean: Vec<Vec<f64>>,
}

impl LayerInputs {
    /// The layer's summed squared output error for the weight error `e` (the tensor's rows of
    /// `cols` elements, the groups' rows one after the other): `Σ_r e_r H_g(r) e_rᵀ`. `None` when
    /// `e` does not fit the groups.
    pub(super) fn output_error(&self, e: &[f64]) -> Option<f64> {
        let (cols, groups) = (self.cols, self.h.len());
        if cols == 0 || !e.len().is_multiple_of(cols * groups) {
            return None;
        }
        let per = e.len() / cols / groups;
        let mut total = 0.0;
        for (h, eg) in self.h.iter().zip(e.chunks_exact(per * cols)) {
            let eg = ArrayView2::from_shape((per, cols), eg).ok()?;
            let h = ArrayView2::from_shape((cols, cols), h).ok()?;
            total += (&eg.dot(&h) * &eg).sum();
        }
        Some(total)
    }

    /// Output-aware rounding from these inputs.
    pub(super) fn rounding(&self) -> Option<codec::OutputRounding> {
        codec::OutputRounding::new(self.cols, &self.h)
    }

    /// The same layer once its bias absorbs the mean of every output error (bias correction):
    /// the second moments about the mean, `H - N μ μᵀ`, with `N` the input vectors summed (and,
    /// paired, `Σ y xᵀ - N μ_y μᵀ`).
    pub(super) fn centered(&self) -> Self {
        let count = self.vectors;
        let cols = self.cols;
        let center = |m: &[Vec<f64>], left: &[Vec<f64>], right: &[Vec<f64>]| -> Vec<Vec<f64>> {
            m.iter()
                .zip(left.iter().zip(right))
                .map(|(h, (l, r))| {
                    let mut c = h.clone();
                    for (row, &lr) in c.chunks_exact_mut(cols).zip(l) {
                        for (x, &rc) in row.iter_mut().zip(r) {
                            *x -= count * lr * rc;
                        }
                    }
                    c
                })
                .collect()
        };
        Self {
            cols,
            h: center(&self.h, &self.mean, &self.mean),
            mean: self.mean.clone(),
            vectors: self.vectors,
            bias: self.bias.clone(),
            paired: self.paired.as_ref().map(|p| Paired {
                cross: center(&p.cross, &p.mean, &self.mean),
                mean: p.mean.clone(),
            }),
        }
    }

    /// For paired inputs (`x` here, `y` in the fine-tune): the weights `W` (rows of `cols`, the
    /// groups' rows one after the other) that best give the fine-tune's outputs `W_f y` from
    /// these inputs, `W = W_f + W_f (Σ y xᵀ - Σ x xᵀ) (Σ x xᵀ)⁻¹` with `Σ x xᵀ` damped as in
    /// `rounding` (which must come from these sums). The error of any `Ŵ` is then
    /// `(Ŵ - W) H (Ŵ - W)ᵀ` up to a constant, so rounding to `W` with `H` corrects what the
    /// layers before left. The rows are solved on up to `threads` threads (each row's result is
    /// the same). `None` when not paired or the shapes do not fit.
    pub(super) fn fine_outputs_target(
        &self,
        fine: &[f32],
        rounding: &codec::OutputRounding,
        threads: usize,
    ) -> Option<Vec<f32>> {
        let p = self.paired.as_ref()?;
        let (cols, groups) = (self.cols, self.h.len());
        if cols == 0 || !fine.len().is_multiple_of(cols * groups) || rounding.cols() != cols {
            return None;
        }
        let per = fine.len() / cols / groups;
        let mut out = Vec::with_capacity(fine.len());
        for (g, (h, cross)) in self.h.iter().zip(&p.cross).enumerate() {
            let w: Vec<f64> = fine[g * per * cols..(g + 1) * per * cols]
                .iter()
                .map(|&v| f64::from(v))
                .collect();
            let w = ArrayView2::from_shape((per, cols), &w[..]).ok()?;
            let m: Vec<f64> = cross.iter().zip(h).map(|(c, h)| c - h).collect();
            let m = ArrayView2::from_shape((cols, cols), &m[..]).ok()?;
            let mut shift = w.dot(&m);
            let rows = shift.as_slice_mut()?;
            let chunk = per.div_ceil(threads.max(1)).max(1) * cols;
            let solved = std::thread::scope(|s| {
                let mut parts = rows.chunks_mut(chunk);
                let first = parts.next();
                let others: Vec<_> = parts
                    .map(|part| s.spawn(move || rounding.solve_rows(g, part)))
                    .collect();
                let ok = first.is_none_or(|part| rounding.solve_rows(g, part));
                others.into_iter().all(|h| h.join().unwrap_or(false)) && ok
            });
            if !solved {
                return None;
            }
            out.extend(w.iter().zip(rows.iter()).map(|(&a, &b)| (a + b) as f32));
        }
        out.iter().all(|x| x.is_finite()).then_some(out)
    }
}

/// Running sums of one layer's input vectors, per group: `Σ x xᵀ`, `Σ x` and their count; when
/// paired with the same layer's inputs in a second model (`x` from the model being encoded, `y`
/// from the fine-tune on the same images), also `Σ y xᵀ` and `Σ y`. The products gather in f32
/// over at most [`PATCH_ROWS`] vectors, then go into the f64 sums ([`Sums::finish`] adds the
/// last ones).
#[derive(Clone, Debug, Default)]
pub(super) struct Sums {
    pub(super) h: Vec<Vec<f64>>,
    pub(super) sum: Vec<Vec<f64>>,
    pub(super) vectors: f64,
    /// Per group `Σ y xᵀ` (row-major, `y` along the rows); empty when not paired.
    pub(super) cross: Vec<Vec<f64>>,
    /// Per group `Σ y`; empty when not paired.
    pub(super) sum_paired: Vec<Vec<f64>>,
    /// Per group: `Σ x xᵀ` and `Σ y xᵀ` (f32) of the vectors not yet in the f64 sums, and their
    /// count.
    pending: Vec<(Vec<f32>, Vec<f32>, usize)>,
    /// With 2 or more, a large paired product runs `Σ y xᵀ` on a second thread, beside `Σ x xᵀ`.
    threads: usize,
}

impl Sums {
    pub(super) fn new(groups: usize, cols: usize) -> Self {
        Self {
            h: vec![vec![0f64; cols * cols]; groups],
            sum: vec![vec![0f64; cols]; groups],
            vectors: 0.0,
            cross: Vec::new(),
            sum_paired: Vec::new(),
            pending: vec![(Vec::new(), Vec::new(), 0); groups],
            threads: 1,
        }
    }

    /// These sums with `threads` threads for a large paired product (the sums do not depend on
    /// it).
    pub(super) fn with_threads(self, threads: usize) -> Self {
        Self { threads, ..self }
    }

    /// The sums of consecutive groups, `parts[0]`'s first, as one: the sums of a grouped layer
    /// whose groups were summed apart (each in image order, so the sums are the same as when
    /// summed together).
    pub(super) fn concat(parts: Vec<Sums>) -> Sums {
        let mut out = Sums {
            vectors: parts.first().map_or(0.0, |p| p.vectors),
            threads: 1,
            ..Sums::default()
        };
        for p in parts {
            out.h.extend(p.h);
            out.sum.extend(p.sum);
            out.cross.extend(p.cross);
            out.sum_paired.extend(p.sum_paired);
            out.pending.extend(p.pending);
        }
        out
    }

    /// Sums that also take each vector's pair ([`Sums::add_pairs`]).
    pub(super) fn paired(groups: usize, cols: usize) -> Self {
        Self {
            cross: vec![vec![0f64; cols * cols]; groups],
            sum_paired: vec![vec![0f64; cols]; groups],
            ..Self::new(groups, cols)
        }
    }

    /// Adds the rows of `cols` values in `x[0]` to group `g` (paired with the rows of `x[1]`).
    fn add(&mut self, g: usize, x: &[&[f32]], cols: usize) {
        let views: Option<Vec<ArrayView2<'_, f32>>> = x
            .iter()
            .map(|x| ArrayView2::from_shape((x.len() / cols, cols), x).ok())
            .collect();
        if let Some(v) = views {
            let t: Vec<ArrayView2<'_, f32>> = v.iter().map(|v| v.t()).collect();
            self.add_pairs(g, &t);
        }
    }

    /// Adds the columns of `xt[0]` (one input vector per column) to group `g`; when paired,
    /// `xt[1]` holds their pairs, column by column.
    fn add_pairs(&mut self, g: usize, xt: &[ArrayView2<'_, f32>]) {
        let Some(x) = xt.first() else { return };
        let (cols, n) = x.dim();
        let paired = !self.cross.is_empty();
        if self.h[g].len() != cols * cols
            || n == 0
            || (paired && xt.get(1).is_none_or(|y| y.dim() != (cols, n)))
        {
            return;
        }
        let (acc, cross, count) = &mut self.pending[g];
        if acc.is_empty() {
            *acc = vec![0f32; cols * cols];
        }
        let own = |acc: &mut [f32], sum: &mut [f64]| {
            let mut m = ArrayViewMut2::from_shape((cols, cols), acc).expect("cols x cols");
            general_mat_mul(1.0, x, &x.t(), 1.0, &mut m);
            add_row_sums(sum, x);
        };
        if paired {
            let y = &xt[1];
            if cross.is_empty() {
                *cross = vec![0f32; cols * cols];
            }
            let pair = |cross: &mut [f32], sum: &mut [f64]| {
                let mut m = ArrayViewMut2::from_shape((cols, cols), cross).expect("cols x cols");
                general_mat_mul(1.0, y, &x.t(), 1.0, &mut m);
                add_row_sums(sum, y);
            };
            let (sum, sum_paired) = (&mut self.sum[g], &mut self.sum_paired[g]);
            if self.threads > 1 && cols * cols * n >= SPLIT_PRODUCT {
                std::thread::scope(|s| {
                    s.spawn(|| pair(cross, sum_paired));
                    own(acc, sum);
                });
            } else {
                pair(cross, sum_paired);
                own(acc, sum);
            }
        } else {
            own(acc, &mut self.sum[g]);
        }
        *count += n;
        if g == 0 {
            self.vectors += n as f64;
        }
        if *count >= PATCH_ROWS {
            self.flush(g);
        }
    }

    fn flush(&mut self, g: usize) {
        let (acc, cross, count) = &mut self.pending[g];
        for (o, v) in self.h[g].iter_mut().zip(acc.iter_mut()) {
            *o += f64::from(*v);
            *v = 0.0;
        }
        if let Some(c) = self.cross.get_mut(g) {
            for (o, v) in c.iter_mut().zip(cross.iter_mut()) {
                *o += f64::from(*v);
                *v = 0.0;
            }
        }
        *count = 0;
    }

    /// Adds the vectors still pending to the f64 sums and frees their f32 sums.
    pub(super) fn finish(&mut self) {
        for g in 0..self.pending.len() {
            if self.pending[g].2 > 0 {
                self.flush(g);
            }
            self.pending[g].0 = Vec::new();
            self.pending[g].1 = Vec::new();
        }
    }
}

/// Multiply-adds of one product `Σ x xᵀ` from which [`Sums::add_pairs`] runs the paired one on
/// a thread of its own (when it may use two).
const SPLIT_PRODUCT: usize = 1 << 20;

/// `out[r] += Σ_j x[r, j]` (each row summed in f64 from its first column to its last), a few
/// rows at a time: each row's sum is a chain of dependent additions, and the rows' chains
/// interleaved keep the adder busy.
fn add_row_sums(out: &mut [f64], x: &ArrayView2<'_, f32>) {
    const LANES: usize = 8;
    let n = x.ncols();
    let rows = out.len().min(x.nrows());
    let mut first = 0;
    for o in out[..rows].chunks_mut(LANES) {
        let views: Vec<_> = (first..first + o.len()).map(|r| x.row(r)).collect();
        let slices: Option<Vec<&[f32]>> = views.iter().map(|v| v.as_slice()).collect();
        let mut acc = [-0.0f64; LANES];
        match slices.as_deref() {
            Some(&[a, b, c, d, e, f, g, h]) => {
                let rows = [a, b, c, d, e, f, g, h].map(|r| &r[..n]);
                for j in 0..n {
                    for (s, r) in acc.iter_mut().zip(&rows) {
                        *s += f64::from(r[j]);
                    }
                }
            }
            _ => {
                for j in 0..n {
                    for (s, row) in acc.iter_mut().zip(&views) {
                        *s += f64::from(row[j]);
                    }
                }
            }
        }
        for (o, a) in o.iter_mut().zip(acc) {
            *o += a;
        }
        first += o.len();
    }
}

/// Patch rows gathered at a time for one product `Xᵀ X`.
const PATCH_ROWS: usize = 4096;

/// Output positions of one image summed per convolution: a larger output is sampled on a regular
/// stride (every `ceil(positions / IMAGE_POSITIONS)`-th position). A layer's inputs have at
/// most a few hundred values per position, so a hundred images of this many positions still
/// give their second moments hundreds of samples per value, while the patches of the first,
/// largest layers of a 224-px model (12,544 positions) cost no more than those after them.
pub(super) const IMAGE_POSITIONS: usize = 1024;

/// [`add_patches`] through matrix products, on at most [`IMAGE_POSITIONS`] positions of each
/// image: the patches of each image and group are the columns of a matrix `Xᵀ`, and `Xᵀ X` is
/// added to the group's sums ([`Sums`]).
#[cfg(test)]
pub(super) fn add_patches_fast(s: &ConvShape, a: &[f32], shape: &[usize], sums: &mut Sums) {
    add_patch_pairs(s, &[a], shape, 0..s.group, sums);
}

/// [`add_patches_fast`] on the activations `a[0]`, paired position by position with those of
/// `a[1]` (the same layer's input in another model, of the same shape) when `sums` is paired.
/// Only the groups `groups` of the convolution are summed, group `g` into group
/// `g - groups.start` of `sums`.
fn add_patch_pairs(
    s: &ConvShape,
    a: &[&[f32]],
    shape: &[usize],
    groups: Range<usize>,
    sums: &mut Sums,
) {
    let [n, c, ih, iw] = [shape[0], shape[1], shape[2], shape[3]];
    let ([kh, kw], [sy, sx], [dy, dx]) = (s.kernel, s.stride, s.dilation);
    let (span_y, span_x) = (dy * (kh - 1) + 1, dx * (kw - 1) + 1);
    let (py, px) = (ih + s.pads[0] + s.pads[2], iw + s.pads[1] + s.pads[3]);
    let len = n * c * ih * iw;
    if c != s.cig * s.group
        || py < span_y
        || px < span_x
        || a.iter().any(|a| a.len() < len)
        || groups.end > s.group
    {
        return;
    }
    let (oh, ow) = ((py - span_y) / sy + 1, (px - span_x) / sx + 1);
    let cols = s.cols();
    // Every `step`-th output position of each image, at most IMAGE_POSITIONS of them.
    let step = (oh * ow).div_ceil(IMAGE_POSITIONS);
    let per_image = (oh * ow).div_ceil(step);
    if s.kernel == [1, 1] && s.stride == [1, 1] && s.pads == [0; 4] {
        // The patches are the columns of each group's `[cig, h * w]` plane: no gathering.
        let hw = ih * iw;
        for img in 0..n {
            for gi in groups.clone() {
                let at = (img * c + gi * s.cig) * hw;
                let shape = (s.cig, per_image).strides((hw, step));
                let views: Option<Vec<ArrayView2<'_, f32>>> = a
                    .iter()
                    .map(|a| ArrayView2::from_shape(shape, &a[at..]).ok())
                    .collect();
                if let Some(v) = views {
                    sums.add_pairs(gi - groups.start, &v);
                }
            }
        }
        return;
    }
    // One image and group at a time: `Xᵀ`, one row per patch value (input channel and tap), one
    // column per position (at most IMAGE_POSITIONS). Without sampling, a tap's values along an
    // output row are the input row read from one offset on the horizontal stride.
    let mut xt = vec![vec![0f32; cols * per_image]; a.len()];
    let (pt, pl) = (s.pads[0], s.pads[1]);
    // The sampled output positions' top-left input corner (before padding), when sampled.
    let sampled: Vec<(usize, usize)> = if step > 1 {
        (0..per_image)
            .map(|r| {
                let k = r * step;
                ((k / ow) * sy, (k % ow) * sx)
            })
            .collect()
    } else {
        Vec::new()
    };
    for img in 0..n {
        for gi in groups.clone() {
            for (xt, a) in xt.iter_mut().zip(a) {
                for ci in 0..s.cig {
                    let plane = &a[((img * c) + gi * s.cig + ci) * ih * iw..][..ih * iw];
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let row =
                                &mut xt[((ci * kh + ky) * kw + kx) * per_image..][..per_image];
                            if step == 1 {
                                // Output columns whose input column is inside: ox*sx + kx*dx -
                                // pl in 0..iw.
                                let off = kx * dx;
                                let lo = pl.saturating_sub(off).div_ceil(sx).min(ow);
                                let hi = (iw + pl)
                                    .checked_sub(off)
                                    .map_or(0, |e| e.div_ceil(sx))
                                    .clamp(lo, ow);
                                for (oy, out) in row.chunks_exact_mut(ow).enumerate() {
                                    let y = (oy * sy + ky * dy).checked_sub(pt).filter(|&y| y < ih);
                                    let Some(y) = y else {
                                        out.fill(0.0);
                                        continue;
                                    };
                                    out[..lo].fill(0.0);
                                    out[hi..].fill(0.0);
                                    if lo < hi {
                                        let first = lo * sx + off - pl;
                                        let src = &plane[y * iw + first..];
                                        if sx == 1 {
                                            out[lo..hi].copy_from_slice(&src[..hi - lo]);
                                        } else {
                                            let src = src.iter().step_by(sx);
                                            for (o, &v) in out[lo..hi].iter_mut().zip(src) {
                                                *o = v;
                                            }
                                        }
                                    }
                                }
                            } else {
                                let (oy_k, ox_k) = (ky * dy, kx * dx);
                                for (o, &(y0, x0)) in row.iter_mut().zip(&sampled) {
                                    let y = (y0 + oy_k).checked_sub(pt);
                                    let xx = (x0 + ox_k).checked_sub(pl);
                                    *o = match (y, xx) {
                                        (Some(y), Some(xx)) if y < ih && xx < iw => {
                                            plane[y * iw + xx]
                                        }
                                        _ => 0.0,
                                    };
                                }
                            }
                        }
                    }
                }
            }
            let views: Option<Vec<ArrayView2<'_, f32>>> = xt
                .iter()
                .map(|x| ArrayView2::from_shape((cols, per_image), &x[..]).ok())
                .collect();
            if let Some(v) = views {
                sums.add_pairs(gi - groups.start, &v);
            }
        }
    }
}

/// The inputs of every weight [`weight_uses`] finds, in the fine-tuned model on all the
/// calibration images: the images run a few at a time (so that the layers' activations stay
/// small for large images), and the layers' sums are shared out among `threads` threads (each
/// layer summed by one thread in image order: the result does not depend on `threads`).
/// `progress(done, total)` reports each batch. Empty when the probe model cannot be built or
/// run: the sign codecs then round element by element, as without calibration, and candidates
/// are scored on their weights.
pub(super) fn layer_inputs(
    fine: &[u8],
    fine_w: &OnnxWeights,
    images: &Images,
    threads: usize,
    progress: impl FnMut(usize, usize),
) -> BTreeMap<String, LayerInputs> {
    probed(&[fine], fine_w, images, threads, progress)
}

#[cfg(test)]
/// [`layer_inputs`] of `model` (the fine-tune's graph holding other weights: the initializers
/// of `fine_w` at the same places), paired with the fine-tune's (`fine`) on the same images,
/// from whole runs of both: each layer's [`LayerInputs::paired`] holds the fine-tune's side.
pub(super) fn paired_inputs(
    model: &[u8],
    fine: &[u8],
    fine_w: &OnnxWeights,
    images: &Images,
    threads: usize,
) -> BTreeMap<String, LayerInputs> {
    probed(&[model, fine], fine_w, images, threads, |_, _| {})
}

fn probed(
    models: &[&[u8]],
    fine_w: &OnnxWeights,
    images: &Images,
    threads: usize,
    mut progress: impl FnMut(usize, usize),
) -> BTreeMap<String, LayerInputs> {
    let batch = (PROBE_VALUES / images.image_len().max(1)).clamp(1, PROBE_BATCH);
    let total = images.count.div_ceil(batch);
    progress(0, total);
    let out = probe_inputs(models, fine_w, images, batch, threads.max(1), |done| {
        progress(done, total);
    })
    .unwrap_or_default();
    progress(total, total);
    out
}

/// Input values per probe run: the batch is this over the image size (at least one image).
const PROBE_VALUES: usize = 1 << 16;

/// The layers' inputs in `models[0]`, paired with those in `models[1]` when there are two
/// (models of the same graph).
fn probe_inputs(
    models: &[&[u8]],
    fine_w: &OnnxWeights,
    images: &Images,
    batch: usize,
    threads: usize,
    mut progress: impl FnMut(usize),
) -> TractResult<BTreeMap<String, LayerInputs>> {
    use prost::Message;
    let protos = models
        .iter()
        .map(|m| tract_onnx::pb::ModelProto::decode(*m))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(graph) = protos.first().and_then(|p| p.graph.as_ref()) else {
        return Ok(BTreeMap::new());
    };
    let uses = weight_uses(graph, fine_w);
    let mut inputs: Vec<&str> = uses.iter().map(|u| u.input.as_str()).collect();
    inputs.sort_unstable();
    inputs.dedup();
    if inputs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let probes = protos
        .iter()
        .map(|proto| {
            let mut model = tract_onnx::onnx().model_for_proto_model(proto)?;
            model.select_outputs_by_name(&inputs)?;
            Ok(model)
        })
        .collect::<TractResult<Vec<_>>>()?;
    let paired = probes.len() > 1;
    let mut h: Vec<Sums> = uses.iter().map(|u| u.sums(fine_w, paired)).collect();
    // Each layer's cost (its matrices' size) decides its thread, largest first.
    let mut lanes: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); threads];
    let mut order: Vec<usize> = (0..uses.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(h[k].h.iter().map(Vec::len).sum::<usize>()));
    for k in order {
        let lane = lanes.iter_mut().min_by_key(|l| l.0).expect("threads >= 1");
        lane.0 += h[k].h.iter().map(Vec::len).sum::<usize>();
        lane.1.push(k);
    }
    // Per model and batch size, its runnable plan.
    let mut plans: BTreeMap<(usize, usize), std::sync::Arc<TypedSimplePlan>> = BTreeMap::new();
    let image = images.image_len();
    let chunks: Vec<&[f32]> = images.data.chunks(batch * image).collect();
    let mut done = 0;
    // `threads` runs of the probes at once (one per thread), then their layers' sums in image
    // order, each layer by the thread of its lane.
    for wave in chunks.chunks(threads) {
        for chunk in wave {
            let n = chunk.len() / image;
            for (m, probe) in probes.iter().enumerate() {
                if let std::collections::btree_map::Entry::Vacant(slot) = plans.entry((m, n)) {
                    slot.insert(
                        probe
                            .clone()
                            .with_input_fact(0, f32::fact(images.batch_shape(n)).into())?
                            .into_optimized()?
                            .into_runnable()?,
                    );
                }
            }
        }
        let plans = &plans;
        let run = |m: usize, chunk: &[f32]| -> TractResult<TVec<TValue>> {
            let n = chunk.len() / image;
            let input = tract_onnx::prelude::Tensor::from_shape(&images.batch_shape(n), chunk)?;
            plans[&(m, n)].run(tvec!(input.into()))
        };
        let jobs: Vec<(usize, &[f32])> = wave
            .iter()
            .flat_map(|chunk| (0..probes.len()).map(move |m| (m, *chunk)))
            .collect();
        // Runs on `threads` threads, the results in job order.
        let outputs: Vec<TractResult<TVec<TValue>>> = std::thread::scope(|s| {
            let per = jobs.len().div_ceil(threads);
            let others: Vec<_> = jobs[per.min(jobs.len())..]
                .chunks(per)
                .map(|part| s.spawn(move || part.iter().map(|&(m, c)| run(m, c)).collect()))
                .collect();
            let mut all: Vec<TractResult<TVec<TValue>>> = jobs[..per.min(jobs.len())]
                .iter()
                .map(|&(m, c)| run(m, c))
                .collect();
            for t in others {
                let part: Vec<_> = t.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
                all.extend(part);
            }
            all
        });
        let mut outputs = outputs.into_iter();
        for _ in wave {
            let out = (0..probes.len())
                .map(|_| outputs.next().expect("one output per job"))
                .collect::<TractResult<Vec<_>>>()?;
            add_outputs(&uses, &inputs, &lanes, &mut h, &out)?;
            done += 1;
            progress(done);
        }
    }
    let mut out = BTreeMap::new();
    for (u, hu) in uses.into_iter().zip(h) {
        let cols = u.cols(fine_w);
        if let Some(li) = hu.into_inputs(cols, u.bias.clone(), paired) {
            out.insert(u.weight, li);
        }
    }
    Ok(out)
}

impl WeightUse {
    /// Inputs per output of the weight.
    pub(super) fn cols(&self, weights: &OnnxWeights) -> usize {
        match &self.conv {
            Some(s) => s.cols(),
            None => weights.get(&self.weight).map_or(0, |w| w.dims[1] as usize),
        }
    }

    /// Empty sums of the weight's inputs (`paired`: [`Sums::paired`]).
    pub(super) fn sums(&self, weights: &OnnxWeights, paired: bool) -> Sums {
        let groups = self.groups();
        let cols = self.cols(weights);
        if paired {
            Sums::paired(groups, cols)
        } else {
            Sums::new(groups, cols)
        }
    }

    /// Adds the weight's input vectors in the activations `values[0]` (of shape `dims`; paired
    /// with `values[1]`) to `sums`.
    pub(super) fn add(&self, values: &[&[f32]], dims: &[usize], sums: &mut Sums) {
        self.add_groups(values, dims, 0..self.groups(), sums);
    }

    /// Groups of the weight's inputs (of a grouped convolution; else 1).
    pub(super) fn groups(&self) -> usize {
        self.conv.as_ref().map_or(1, |s| s.group)
    }

    /// [`WeightUse::add`] for the groups `groups` only, into sums of that many groups (the first
    /// one `groups.start`).
    pub(super) fn add_groups(
        &self,
        values: &[&[f32]],
        dims: &[usize],
        groups: Range<usize>,
        sums: &mut Sums,
    ) {
        match &self.conv {
            Some(s) if dims.len() == 4 => add_patch_pairs(s, values, dims, groups, sums),
            None if dims.len() == 2 && groups == (0..1) && dims[1] * dims[1] == sums.h[0].len() => {
                sums.add(0, values, dims[1]);
            }
            _ => {}
        }
    }
}

impl Sums {
    /// The layer's inputs (`cols` per vector, `bias` its bias) from these sums, when they hold a
    /// vector and every sum is finite.
    pub(super) fn into_inputs(
        mut self,
        cols: usize,
        bias: Option<String>,
        paired: bool,
    ) -> Option<LayerInputs> {
        self.finish();
        let finite = |m: &Vec<Vec<f64>>| m.iter().flatten().all(|x| x.is_finite());
        if cols == 0
            || self.vectors <= 0.0
            || !finite(&self.h)
            || !finite(&self.sum)
            || !finite(&self.cross)
            || !finite(&self.sum_paired)
        {
            return None;
        }
        let n = self.vectors;
        let mean = |sum: &[Vec<f64>]| -> Vec<Vec<f64>> {
            sum.iter()
                .map(|s| s.iter().map(|x| x / n).collect())
                .collect()
        };
        let paired = paired.then(|| Paired {
            cross: std::mem::take(&mut self.cross),
            mean: mean(&self.sum_paired),
        });
        Some(LayerInputs {
            cols,
            mean: mean(&self.sum),
            h: self.h,
            vectors: n,
            bias,
            paired,
        })
    }
}

/// Adds one probe run's layer inputs (`out[m]`: model `m`'s, in the order of `inputs`) to the
/// layers' sums, each lane's layers on a thread of its own.
fn add_outputs(
    uses: &[WeightUse],
    inputs: &[&str],
    lanes: &[(usize, Vec<usize>)],
    h: &mut [Sums],
    out: &[TVec<TValue>],
) -> TractResult<()> {
    let views = out
        .iter()
        .map(|o| {
            o.iter()
                .map(|t| {
                    let a = t.to_plain_array_view::<f32>()?;
                    Ok((a.to_slice().unwrap_or(&[]), a.shape().to_vec()))
                })
                .collect::<TractResult<Vec<_>>>()
        })
        .collect::<TractResult<Vec<_>>>()?;
    let mut slots: Vec<Option<&mut Sums>> = h.iter_mut().map(Some).collect();
    let work: Vec<Vec<(usize, &mut Sums)>> = lanes
        .iter()
        .map(|(_, ks)| {
            ks.iter()
                .map(|&k| (k, slots[k].take().expect("each layer in one lane")))
                .collect()
        })
        .collect();
    let views = &views;
    let sum = move |jobs: Vec<(usize, &mut Sums)>| {
        for (k, hu) in jobs {
            let u = &uses[k];
            let Ok(at) = inputs.binary_search(&u.input.as_str()) else {
                continue;
            };
            let dims = &views[0][at].1;
            if views.iter().any(|v| &v[at].1 != dims) {
                continue;
            }
            let values: Vec<&[f32]> = views.iter().map(|v| v[at].0).collect();
            u.add(&values, dims, hu);
        }
    };
    std::thread::scope(|s| {
        let mut work = work.into_iter();
        let first = work.next().unwrap_or_default();
        for jobs in work {
            s.spawn(move || sum(jobs));
        }
        sum(first);
    });
    Ok(())
}
