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
use tract_onnx::prelude::tract_ndarray::ArrayView2;
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

/// Running sums of one layer's input vectors, per group: `Σ x xᵀ`, `Σ x` and their count.
#[derive(Clone, Debug, Default)]
pub(super) struct Sums {
    pub(super) h: Vec<Vec<f64>>,
    pub(super) sum: Vec<Vec<f64>>,
    pub(super) vectors: f64,
}

impl Sums {
    pub(super) fn new(groups: usize, cols: usize) -> Self {
        Self {
            h: vec![vec![0f64; cols * cols]; groups],
            sum: vec![vec![0f64; cols]; groups],
            vectors: 0.0,
        }
    }

    /// Adds the rows of `cols` values in `x` to group `g`.
    fn add(&mut self, g: usize, x: &[f32], cols: usize) {
        let Ok(x) = ArrayView2::from_shape((x.len() / cols, cols), x) else {
            return;
        };
        let gram = x.t().dot(&x);
        for (o, v) in self.h[g].iter_mut().zip(gram.iter()) {
            *o += f64::from(*v);
        }
        for row in x.rows() {
            for (o, v) in self.sum[g].iter_mut().zip(row) {
                *o += f64::from(*v);
            }
        }
        if g == 0 {
            self.vectors += x.nrows() as f64;
        }
    }
}

/// Patch rows gathered at a time for one product `Xᵀ X`.
const PATCH_ROWS: usize = 4096;

/// [`add_patches`] through matrix products: the patches of each group are gathered into rows of
/// a matrix `X` (at most [`PATCH_ROWS`] at a time) and `Xᵀ X` (f32) is added to the group's sums.
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
    let positions = n * oh * ow;
    let mut x = vec![0f32; PATCH_ROWS.min(positions) * cols];
    for gi in 0..s.group {
        let mut at = 0;
        while at < positions {
            let rows = PATCH_ROWS.min(positions - at);
            for (r, p) in x[..rows * cols].chunks_exact_mut(cols).enumerate() {
                let pos = at + r;
                let (img, oy, ox) = (pos / (oh * ow), pos / ow % oh, pos % ow);
                for ci in 0..s.cig {
                    let plane = &a[((img * c) + gi * s.cig + ci) * ih * iw..][..ih * iw];
                    for ky in 0..kh {
                        for kx in 0..kw {
                            let y = (oy * sy + ky * dy).checked_sub(s.pads[0]);
                            let xx = (ox * sx + kx * dx).checked_sub(s.pads[1]);
                            p[(ci * kh + ky) * kw + kx] = match (y, xx) {
                                (Some(y), Some(xx)) if y < ih && xx < iw => plane[y * iw + xx],
                                _ => 0.0,
                            };
                        }
                    }
                }
            }
            sums.add(gi, &x[..rows * cols], cols);
            at += rows;
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
    for (done, chunk) in images.data.chunks(batch * image).enumerate() {
        if done > 0 {
            progress(done);
        }
        let n = chunk.len() / image;
        let shape = images.batch_shape(n);
        if let std::collections::btree_map::Entry::Vacant(slot) = plans.entry(n) {
            slot.insert(
                model
                    .clone()
                    .with_input_fact(0, f32::fact(shape).into())?
                    .into_optimized()?
                    .into_runnable()?,
            );
        }
        let input = tract_onnx::prelude::Tensor::from_shape(&shape, chunk)?;
        let out = plans[&n].run(tvec!(input.into()))?;
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
        let (uses, inputs, views) = (&uses, &inputs, &views);
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
    }
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
