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
use tract_onnx::prelude::*;

/// Images per run of the probe model that exposes the layers' inputs.
const PROBE_BATCH: usize = 50;

/// How a weight multiplies its input: `x Wᵀ` (fully connected) or a 2-D convolution.
#[derive(Clone, Debug)]
pub(super) struct WeightUse {
    pub(super) weight: String,
    pub(super) input: String,
    pub(super) conv: Option<ConvShape>,
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
        out.push(WeightUse {
            weight: w.clone(),
            input: x.clone(),
            conv,
        });
    }
    out
}

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

/// Copies the upper triangle of the `k × k` matrix `h` onto its lower one.
pub(super) fn mirror(h: &mut [f64], k: usize) {
    for r in 0..k {
        for c in 0..r {
            h[r * k + c] = h[c * k + r];
        }
    }
}

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

/// The output-aware rounding of every weight [`weight_uses`] finds, from its inputs in the
/// fine-tuned model on all the calibration images. Empty when the probe model cannot be built
/// or run: the sign codecs then round element by element, as without calibration.
pub(super) fn output_roundings(
    fine: &[u8],
    fine_w: &OnnxWeights,
    images: &Images,
) -> BTreeMap<String, codec::OutputRounding> {
    probe_inputs(fine, fine_w, images).unwrap_or_default()
}

fn probe_inputs(
    fine: &[u8],
    fine_w: &OnnxWeights,
    images: &Images,
) -> TractResult<BTreeMap<String, codec::OutputRounding>> {
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
    let mut h: Vec<Vec<Vec<f64>>> = uses
        .iter()
        .map(|u| match &u.conv {
            Some(s) => vec![vec![0f64; s.cols() * s.cols()]; s.group],
            None => {
                let k = fine_w.get(&u.weight).map_or(0, |w| w.dims[1] as usize);
                vec![vec![0f64; k * k]]
            }
        })
        .collect();
    let mut plans: BTreeMap<usize, std::sync::Arc<TypedSimplePlan>> = BTreeMap::new();
    let image = images.image_len();
    for batch in images.data.chunks(PROBE_BATCH * image) {
        let n = batch.len() / image;
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
        let input = tract_onnx::prelude::Tensor::from_shape(&shape, batch)?;
        let out = plans[&n].run(tvec!(input.into()))?;
        for (u, hu) in uses.iter().zip(&mut h) {
            let Ok(at) = inputs.binary_search(&u.input.as_str()) else {
                continue;
            };
            let a = out[at].to_plain_array_view::<f32>()?;
            let (values, dims) = (a.as_slice().unwrap_or(&[]), a.shape().to_vec());
            match &u.conv {
                Some(s) if dims.len() == 4 => add_patches(s, values, &dims, hu),
                None if dims.len() == 2 && dims[1] * dims[1] == hu[0].len() => {
                    for row in values.chunks_exact(dims[1]) {
                        let p: Vec<f64> = row.iter().map(|&v| f64::from(v)).collect();
                        add_outer(&mut hu[0], &p);
                    }
                }
                _ => {}
            }
        }
    }
    let mut out = BTreeMap::new();
    for (u, mut hu) in uses.into_iter().zip(h) {
        let cols = match &u.conv {
            Some(s) => s.cols(),
            None => fine_w.get(&u.weight).map_or(0, |w| w.dims[1] as usize),
        };
        hu.iter_mut().for_each(|m| mirror(m, cols));
        if let Some(r) = codec::OutputRounding::new(cols, &hu) {
            out.insert(u.weight, r);
        }
    }
    Ok(out)
}
