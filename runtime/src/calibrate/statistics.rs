//! Statistics of the layers' inputs: the second moments `E[x xᵀ]` of what every convolution and
//! fully connected weight multiplies, measured in the fine-tuned model on the calibration images,
//! for output-aware rounding ([`codec::OutputRounding`]).

use std::collections::BTreeMap;
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
pub(super) struct LayerInputs {
    pub(super) cols: usize,
    pub(super) h: Vec<Vec<f64>>,
    /// The mean input vector of each group.
    pub(super) mean: Vec<Vec<f64>>,
    /// Input vectors summed (per group).
    pub(super) vectors: f64,
    /// The bias added to the layer's outputs, if it is a tensor of its own.
    pub(super) bias: Option<String>,
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
    /// the second moments about the mean, `H - N μ μᵀ`, with `N` the input vectors summed.
    pub(super) fn centered(&self) -> Self {
        let count = self.vectors;
        let h = self
            .h
            .iter()
            .zip(&self.mean)
            .map(|(h, m)| {
                let mut c = h.clone();
                for (r, &mr) in m.iter().enumerate() {
                    for (x, &mc) in c[r * self.cols..(r + 1) * self.cols].iter_mut().zip(m) {
                        *x -= count * mr * mc;
                    }
                }
                c
            })
            .collect();
        Self {
            cols: self.cols,
            h,
            mean: self.mean.clone(),
            vectors: self.vectors,
            bias: self.bias.clone(),
        }
    }
}

/// Running sums of one layer's input vectors, per group: `Σ x xᵀ`, `Σ x` and their count. The
/// products `Σ x xᵀ` gather in f32 over at most [`PATCH_ROWS`] vectors, then go into the f64
/// sums ([`Sums::finish`] adds the last ones).
#[derive(Clone, Debug, Default)]
pub(super) struct Sums {
    pub(super) h: Vec<Vec<f64>>,
    pub(super) sum: Vec<Vec<f64>>,
    pub(super) vectors: f64,
    /// Per group: `Σ x xᵀ` (f32) of the vectors not yet in `h`, and their count.
    pending: Vec<(Vec<f32>, usize)>,
}

impl Sums {
    pub(super) fn new(groups: usize, cols: usize) -> Self {
        Self {
            h: vec![vec![0f64; cols * cols]; groups],
            sum: vec![vec![0f64; cols]; groups],
            vectors: 0.0,
            pending: vec![(Vec::new(), 0); groups],
        }
    }

    /// Adds the rows of `cols` values in `x` to group `g`.
    fn add(&mut self, g: usize, x: &[f32], cols: usize) {
        if let Ok(x) = ArrayView2::from_shape((x.len() / cols, cols), x) {
            self.add_columns(g, x.t());
        }
    }

    /// Adds the columns of `xt` (one input vector per column) to group `g`.
    fn add_columns(&mut self, g: usize, xt: ArrayView2<'_, f32>) {
        let (cols, n) = xt.dim();
        if self.h[g].len() != cols * cols || n == 0 {
            return;
        }
        let (acc, count) = &mut self.pending[g];
        if acc.is_empty() {
            *acc = vec![0f32; cols * cols];
        }
        let mut m = ArrayViewMut2::from_shape((cols, cols), &mut acc[..]).expect("cols x cols");
        general_mat_mul(1.0, &xt, &xt.t(), 1.0, &mut m);
        *count += n;
        for (o, row) in self.sum[g].iter_mut().zip(xt.rows()) {
            *o += row.iter().map(|&v| f64::from(v)).sum::<f64>();
        }
        if g == 0 {
            self.vectors += n as f64;
        }
        if *count >= PATCH_ROWS {
            self.flush(g);
        }
    }

    fn flush(&mut self, g: usize) {
        let (acc, count) = &mut self.pending[g];
        for (o, v) in self.h[g].iter_mut().zip(acc.iter_mut()) {
            *o += f64::from(*v);
            *v = 0.0;
        }
        *count = 0;
    }

    /// Adds the vectors still pending to the f64 sums and frees their f32 sums.
    pub(super) fn finish(&mut self) {
        for g in 0..self.pending.len() {
            if self.pending[g].1 > 0 {
                self.flush(g);
            }
            self.pending[g].0 = Vec::new();
        }
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
pub(super) fn add_patches_fast(s: &ConvShape, a: &[f32], shape: &[usize], sums: &mut Sums) {
    let [n, c, ih, iw] = [shape[0], shape[1], shape[2], shape[3]];
    let ([kh, kw], [sy, sx], [dy, dx]) = (s.kernel, s.stride, s.dilation);
    let (span_y, span_x) = (dy * (kh - 1) + 1, dx * (kw - 1) + 1);
    let (py, px) = (ih + s.pads[0] + s.pads[2], iw + s.pads[1] + s.pads[3]);
    if c != s.cig * s.group || py < span_y || px < span_x {
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
            for gi in 0..s.group {
                let at = (img * c + gi * s.cig) * hw;
                let shape = (s.cig, per_image).strides((hw, step));
                if let Ok(xt) = ArrayView2::from_shape(shape, &a[at..]) {
                    sums.add_columns(gi, xt);
                }
            }
        }
        return;
    }
    // One image and group at a time: `Xᵀ`, one row per patch value (input channel and tap), one
    // column per position (at most IMAGE_POSITIONS). Without sampling, a tap's values along an
    // output row are the input row read from one offset on the horizontal stride.
    let mut xt = vec![0f32; cols * per_image];
    let (pt, pl) = (s.pads[0], s.pads[1]);
    for img in 0..n {
        for gi in 0..s.group {
            for ci in 0..s.cig {
                let plane = &a[((img * c) + gi * s.cig + ci) * ih * iw..][..ih * iw];
                for ky in 0..kh {
                    for kx in 0..kw {
                        let row = &mut xt[((ci * kh + ky) * kw + kx) * per_image..][..per_image];
                        if step == 1 {
                            // Output columns whose input column is inside: ox*sx + kx*dx - pl in
                            // 0..iw.
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
                                    let src = plane[y * iw + first..].iter().step_by(sx);
                                    for (o, &v) in out[lo..hi].iter_mut().zip(src) {
                                        *o = v;
                                    }
                                }
                            }
                        } else {
                            for (r, o) in row.iter_mut().enumerate() {
                                let k = r * step;
                                let (oy, ox) = (k / ow, k % ow);
                                let y = (oy * sy + ky * dy).checked_sub(pt);
                                let xx = (ox * sx + kx * dx).checked_sub(pl);
                                *o = match (y, xx) {
                                    (Some(y), Some(xx)) if y < ih && xx < iw => plane[y * iw + xx],
                                    _ => 0.0,
                                };
                            }
                        }
                    }
                }
            }
            if let Ok(view) = ArrayView2::from_shape((cols, per_image), &xt[..]) {
                sums.add_columns(gi, view);
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
    mut progress: impl FnMut(usize, usize),
) -> BTreeMap<String, LayerInputs> {
    let batch = (PROBE_VALUES / images.image_len().max(1)).clamp(1, PROBE_BATCH);
    let total = images.count.div_ceil(batch);
    progress(0, total);
    let out = probe_inputs(fine, fine_w, images, batch, threads.max(1), |done| {
        progress(done, total);
    })
    .unwrap_or_default();
    progress(total, total);
    out
}

/// Input values per probe run: the batch is this over the image size (at least one image).
const PROBE_VALUES: usize = 1 << 16;

fn probe_inputs(
    fine: &[u8],
    fine_w: &OnnxWeights,
    images: &Images,
    batch: usize,
    threads: usize,
    mut progress: impl FnMut(usize),
) -> TractResult<BTreeMap<String, LayerInputs>> {
    use prost::Message;
    let proto = tract_onnx::pb::ModelProto::decode(fine)?;
    let Some(graph) = proto.graph.as_ref() else {
        return Ok(BTreeMap::new());
    };
    let uses = weight_uses(graph, fine_w);
    let mut inputs: Vec<&str> = uses.iter().map(|u| u.input.as_str()).collect();
    inputs.sort_unstable();
    inputs.dedup();
    if inputs.is_empty() {
        return Ok(BTreeMap::new());
    }
    let mut model = tract_onnx::onnx().model_for_proto_model(&proto)?;
    model.select_outputs_by_name(&inputs)?;
    let mut h: Vec<Sums> = uses
        .iter()
        .map(|u| match &u.conv {
            Some(s) => Sums::new(s.group, s.cols()),
            None => Sums::new(1, fine_w.get(&u.weight).map_or(0, |w| w.dims[1] as usize)),
        })
        .collect();
    // Each layer's cost (its matrices' size) decides its thread, largest first.
    let mut lanes: Vec<(usize, Vec<usize>)> = vec![(0, Vec::new()); threads];
    let mut order: Vec<usize> = (0..uses.len()).collect();
    order.sort_by_key(|&k| std::cmp::Reverse(h[k].h.iter().map(Vec::len).sum::<usize>()));
    for k in order {
        let lane = lanes.iter_mut().min_by_key(|l| l.0).expect("threads >= 1");
        lane.0 += h[k].h.iter().map(Vec::len).sum::<usize>();
        lane.1.push(k);
    }
    let mut plans: BTreeMap<usize, std::sync::Arc<TypedSimplePlan>> = BTreeMap::new();
    let image = images.image_len();
    let chunks: Vec<&[f32]> = images.data.chunks(batch * image).collect();
    let mut done = 0;
    // `threads` runs of the probe at once (one per thread), then their layers' sums in image
    // order, each layer by the thread of its lane.
    for wave in chunks.chunks(threads) {
        for chunk in wave {
            let n = chunk.len() / image;
            if let std::collections::btree_map::Entry::Vacant(slot) = plans.entry(n) {
                slot.insert(
                    model
                        .clone()
                        .with_input_fact(0, f32::fact(images.batch_shape(n)).into())?
                        .into_optimized()?
                        .into_runnable()?,
                );
            }
        }
        let plans = &plans;
        let run = |chunk: &&[f32]| -> TractResult<TVec<TValue>> {
            let n = chunk.len() / image;
            let input = tract_onnx::prelude::Tensor::from_shape(&images.batch_shape(n), chunk)?;
            plans[&n].run(tvec!(input.into()))
        };
        let outputs: Vec<TractResult<TVec<TValue>>> = std::thread::scope(|s| {
            let others: Vec<_> = wave[1..]
                .iter()
                .map(|chunk| s.spawn(move || run(chunk)))
                .collect();
            let mut all = vec![run(&wave[0])];
            all.extend(
                others
                    .into_iter()
                    .map(|t| t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))),
            );
            all
        });
        for out in outputs {
            let out = out?;
            add_outputs(&uses, &inputs, &lanes, &mut h, &out)?;
            done += 1;
            progress(done);
        }
    }
    h.iter_mut().for_each(Sums::finish);
    let mut out = BTreeMap::new();
    for (u, hu) in uses.into_iter().zip(h) {
        let cols = match &u.conv {
            Some(s) => s.cols(),
            None => fine_w.get(&u.weight).map_or(0, |w| w.dims[1] as usize),
        };
        let finite = |m: &Vec<Vec<f64>>| m.iter().flatten().all(|x| x.is_finite());
        if cols > 0 && hu.vectors > 0.0 && finite(&hu.h) && finite(&hu.sum) {
            let mean = hu
                .sum
                .iter()
                .map(|s| s.iter().map(|x| x / hu.vectors).collect())
                .collect();
            out.insert(
                u.weight,
                LayerInputs {
                    cols,
                    h: hu.h,
                    mean,
                    vectors: hu.vectors,
                    bias: u.bias,
                },
            );
        }
    }
    Ok(out)
}

/// Adds one probe run's layer inputs (`out`, in the order of `inputs`) to the layers' sums, each
/// lane's layers on a thread of its own.
fn add_outputs(
    uses: &[WeightUse],
    inputs: &[&str],
    lanes: &[(usize, Vec<usize>)],
    h: &mut [Sums],
    out: &[TValue],
) -> TractResult<()> {
    let views = out
        .iter()
        .map(|t| {
            let a = t.to_plain_array_view::<f32>()?;
            Ok((a.to_slice().unwrap_or(&[]), a.shape().to_vec()))
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
            let (values, dims) = (&views[at].0, &views[at].1);
            match &u.conv {
                Some(s) if dims.len() == 4 => add_patches_fast(s, values, dims, hu),
                None if dims.len() == 2 && dims[1] * dims[1] == hu.h[0].len() => {
                    hu.add(0, values, dims[1]);
                }
                _ => {}
            }
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
