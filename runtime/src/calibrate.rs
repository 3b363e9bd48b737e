//! Calibration-driven codec choice: spend the bits of a delta where the model's outputs need them.
//!
//! The data-free rule ([`crate::compress::auto_codec`]) decides from shapes alone. On a small
//! model that is both wasteful and lossy: a domain shift rewrites a few early filters, where one
//! sign bit is fatal, and barely moves many large late tensors, where even "no delta at all"
//! costs less output error than signs cost bits. Which tensors matter depends on the variant,
//! so this module measures it on a few unlabelled images from the variant's own domain:
//!
//! 0. **Inputs.** The second moments `E[x xᵀ]` of what every convolution and fully connected
//!    weight multiplies, in the fine-tuned model on all the calibration images. Sign encodings of
//!    those weights choose their bits by their effect on the layer's outputs (GPTQ with the
//!    codec's levels, [`codec::OutputRounding`]) rather than element by element.
//! 1. **Reference.** The fine-tuned model's softmax outputs on the calibration images.
//! 2. **Sensitivity.** For every tensor and every candidate encoding (unchanged; sign per tensor
//!    or per output channel, and 2 or 3 sign planes, each with a few scale multipliers; 8-bit per
//!    tensor or per channel), the
//!    fine-tuned model with *only that tensor* reconstructed from the candidate: the mean
//!    KL divergence of its outputs from the reference, on a subset of the images.
//! 3. **Budget.** A greedy multiple-choice knapsack on those measurements: starting from the
//!    cheapest encoding of every tensor, take the upgrade with the largest divergence reduction
//!    per byte (on each tensor's lower convex hull) while the whole file fits the budget.
//! 4. **Refine.** Divergences do not add up exactly, so each tensor's choice is revisited with
//!    every other tensor at its planned encoding (the real model, not the isolated one),
//!    minimising divergence + lambda * bytes within the budget. This is also where the sign
//!    scale multipliers are fitted against the outputs: the CPU counterpart of BitDelta's scale
//!    distillation (a sign delta's least-squares scale, the mean |d|, shrinks the update).
//! 5. **Confirm.** The planned model on all images: top-1 agreement with the fine-tune and the
//!    divergence, reported as the expected agreement.
//!
//! Every evaluation rebuilds the model with tract (about 30 ms for the species family) and runs
//! the images as one batch. Encodings are the crate's codecs with their normal encoders, so the
//! plan's reconstructions are exactly what a device rebuilds.

use std::collections::BTreeMap;
use std::fmt;
use std::string::{String, ToString};
use std::vec::Vec;

use crate::apply;
use crate::codec;
use crate::compose::{self, Base};
use crate::compress::{for_each_pair, CompressError};
use crate::format::{write_delta, Codec, DType, Encoded, Manifest, TensorRecord, DEFAULT_ALIGN};
use crate::metrics::Top1;
use crate::onnx::OnnxWeights;
use crate::tract::Classifier;
use tract_onnx::prelude::*;

/// Multipliers tried on the scales of sign encodings (1 = the mean |d| of the seed recipe).
pub const SIGN_MULTIPLIERS: [f64; 3] = [1.0, 1.25, 1.5];

/// Plane counts tried with the `sign-planes` codec (2 and 3 bits per element).
pub const SIGN_PLANES: [usize; 2] = [2, 3];

/// A divergence this small counts as lossless: costlier candidates of the tensor are not run.
const LOSSLESS: f64 = 1e-7;

/// Smallest channel (elements per output channel) that gets its own sign scale.
pub const MIN_SIGN_CHANNEL: u64 = 8;

/// Calibration images, preprocessed to the model's input (NCHW f32).
#[derive(Clone, Debug)]
pub struct Images {
    /// `count * channels * height * width` values, image after image.
    pub data: Vec<f32>,
    /// Number of images.
    pub count: usize,
    /// `[channels, height, width]` of one image.
    pub shape: [usize; 3],
}

impl Images {
    fn image_len(&self) -> usize {
        self.shape.iter().product()
    }
    fn batch_shape(&self, n: usize) -> [usize; 4] {
        [n, self.shape[0], self.shape[1], self.shape[2]]
    }
}

/// Search settings.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Largest average bits per parameter over the whole delta file (header, table, names and
    /// payloads).
    pub max_bits: f64,
    /// Stop spending bits once the planned model agrees with the fine-tune (top-1) on this
    /// fraction of the calibration images; `None` spends the whole budget.
    pub target_retention: Option<f64>,
    /// Images used while searching (the first ones; all are used to confirm).
    pub search_images: usize,
    /// Passes of in-context refinement.
    pub refine_rounds: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_bits: 1.5,
            target_retention: None,
            search_images: 64,
            refine_rounds: 1,
        }
    }
}

/// Search stages, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Measuring the inputs of every layer of the fine-tuned model (for output-aware rounding).
    Inputs,
    /// Running the fine-tuned model on the images.
    Reference,
    /// Measuring each tensor's candidates in isolation.
    Sensitivity,
    /// Choosing the budget for a target agreement.
    Target,
    /// Revisiting choices in the planned model.
    Refine,
    /// Measuring the plan on every image.
    Confirm,
}

impl Stage {
    /// Lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Inputs => "inputs",
            Self::Reference => "reference",
            Self::Sensitivity => "sensitivity",
            Self::Target => "target",
            Self::Refine => "refine",
            Self::Confirm => "confirm",
        }
    }
}

/// The encoding chosen for one tensor.
#[derive(Clone, Debug)]
pub struct Choice {
    /// Tensor name.
    pub name: String,
    /// Element count.
    pub params: u64,
    /// Codec.
    pub codec: Codec,
    /// Human-readable encoding, e.g. `sign-groups x1.25 (G=96)`.
    pub label: String,
    /// Payload bytes.
    pub payload_bytes: u64,
    /// Mean KL divergence from the fine-tune with only this tensor encoded so (0 when exact).
    pub divergence: f64,
}

/// A per-tensor encoding plan and what it is expected to keep.
#[derive(Clone, Debug)]
pub struct Plan {
    /// One encoding per base initializer, in the base's order.
    pub encodings: Vec<Encoded>,
    /// What was chosen, per base initializer.
    pub choices: Vec<Choice>,
    /// Bytes of the file before the payloads (header, manifest, table, dims, names, padding).
    pub meta_bytes: u64,
    /// Size of the delta file this plan writes (at most; the last payload needs no padding).
    pub file_bytes: u64,
    /// Total parameter count.
    pub params: u64,
    /// Top-1 agreement with the fine-tune on all calibration images.
    pub agreement: f64,
    /// Mean KL divergence from the fine-tune on all calibration images.
    pub divergence: f64,
    /// Number of calibration images.
    pub images: usize,
    /// Model evaluations the search ran.
    pub evaluations: usize,
    /// Tensors whose sign encodings were rounded to their outputs (GPTQ): the weights a
    /// convolution or fully connected layer multiplies, when their inputs could be measured.
    pub output_rounded: usize,
}

impl Plan {
    /// Bits per parameter of the whole file.
    pub fn bits_per_param(&self) -> f64 {
        self.file_bytes as f64 * 8.0 / self.params.max(1) as f64
    }

    /// Tensors, parameters and payload bytes per codec name.
    pub fn codec_counts(&self) -> BTreeMap<&'static str, (usize, u64, u64)> {
        let mut m = BTreeMap::new();
        for c in &self.choices {
            let e = m.entry(c.codec.name()).or_insert((0, 0, 0));
            e.0 += 1;
            e.1 += c.params;
            e.2 += c.payload_bytes;
        }
        m
    }
}

/// Why calibration failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum CalibError {
    /// No calibration image.
    NoImages,
    /// The images do not hold `count * shape` values.
    ImageData {
        /// Values expected.
        expected: usize,
        /// Values given.
        found: usize,
    },
    /// Base and fine-tuned models do not have the same float tensors.
    Mismatch {
        /// Tensor name.
        name: String,
        /// What differs.
        what: &'static str,
    },
    /// A value is NaN or infinite.
    NonFinite {
        /// Tensor name.
        name: String,
    },
    /// Even the cheapest plan (every tensor left at the base) does not fit the budget.
    Budget {
        /// Bits per parameter of the smallest possible file.
        needed: f64,
        /// The budget.
        max_bits: f64,
    },
    /// tract could not build or run the model.
    Model(String),
}

impl fmt::Display for CalibError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoImages => write!(f, "no calibration image"),
            Self::ImageData { expected, found } => write!(
                f,
                "calibration images: expected {expected} values, found {found}"
            ),
            Self::Mismatch { name, what } => write!(f, "tensor {name:?}: {what}"),
            Self::NonFinite { name } => write!(f, "tensor {name:?}: NaN or infinite value"),
            Self::Budget { needed, max_bits } => write!(
                f,
                "budget of {max_bits:.3} bits/param is below the smallest possible delta ({needed:.3} bits/param: header and tensor table)"
            ),
            Self::Model(e) => write!(f, "running the model: {e}"),
        }
    }
}

impl std::error::Error for CalibError {}

/// One candidate encoding of one tensor.
struct Candidate {
    label: String,
    encoded: Encoded,
    /// Payload bytes rounded up to the payload alignment (what the file grows by).
    cost: u64,
    /// The reconstruction, stored in the tensor's dtype.
    stored: Vec<u8>,
    /// Isolated divergence.
    divergence: f64,
}

struct Tensor {
    name: String,
    dtype: DType,
    dims: Vec<u32>,
    params: u64,
    /// Range of the tensor's bytes in the fine-tuned ONNX file.
    range: std::ops::Range<usize>,
    fine: Vec<u8>,
    candidates: Vec<Candidate>,
    /// Indices into `candidates` on the lower convex hull of (cost, divergence), cheapest first.
    hull: Vec<usize>,
}

/// Runs the fine-tuned model with some tensors replaced.
struct Evaluator {
    model: Vec<u8>,
    images: Images,
    search: usize,
    reference_search: Vec<Vec<f64>>,
    reference_all: Vec<Vec<f64>>,
    evaluations: usize,
}

fn log_softmax(row: &[f32]) -> Vec<f64> {
    let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let s: f64 = row.iter().map(|&x| (x as f64 - m).exp()).sum();
    let l = s.ln();
    row.iter().map(|&x| x as f64 - m - l).collect()
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).fold(0, |b, k| if v[k] > v[b] { k } else { b })
}

impl Evaluator {
    fn logits(&mut self, n: usize) -> Result<Vec<Vec<f64>>, CalibError> {
        self.evaluations += 1;
        let clf = Classifier::from_onnx_bytes(&self.model, &self.images.batch_shape(n))
            .map_err(|e| CalibError::Model(format!("{e:#}")))?;
        let out = clf
            .run(&self.images.data[..n * self.images.image_len()])
            .map_err(|e| CalibError::Model(format!("{e:#}")))?;
        if out.is_empty() || out.len() % n != 0 {
            return Err(CalibError::Model(format!(
                "expected {n} output rows, found {} values",
                out.len()
            )));
        }
        Ok(out.chunks(out.len() / n).map(log_softmax).collect())
    }

    /// (mean KL(reference || model), top-1 agreement) with `tensors[i]` stored as `bytes(i)`.
    fn measure<'b>(
        &mut self,
        tensors: &[Tensor],
        bytes: impl Fn(usize) -> &'b [u8],
        all: bool,
    ) -> Result<(f64, f64), CalibError> {
        for (i, t) in tensors.iter().enumerate() {
            self.model[t.range.clone()].copy_from_slice(bytes(i));
        }
        let n = if all { self.images.count } else { self.search };
        let got = self.logits(n)?;
        let reference = if all {
            &self.reference_all
        } else {
            &self.reference_search
        };
        let mut kl = 0.0;
        let mut agree = Top1::new();
        for (r, q) in reference.iter().zip(&got) {
            kl += r
                .iter()
                .zip(q)
                .map(|(&lp, &lq)| lp.exp() * (lp - lq))
                .sum::<f64>();
            // Top-1 agreement: the fine-tune's classes are the labels.
            agree.add(Some(argmax(q)), argmax(r) as i64);
        }
        Ok((kl.max(0.0) / n as f64, agree.accuracy()))
    }
}

/// The reconstruction of `enc` applied to `base` (the path a device uses), as f32 values.
pub fn reconstruct_encoded(base: &[f32], enc: &Encoded) -> Vec<f32> {
    let mut out = vec![0f32; base.len()];
    let mut bytes = Vec::new();
    let payload = enc
        .payload(base.len(), &mut bytes)
        .expect("encoders produce payloads that fit their tensor");
    compose::reconstruct(Base::F32(base), &[(payload, 1.0)], &mut out)
        .expect("encoders produce payloads that fit their tensor");
    out
}

fn stored(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * dtype.size()];
    apply::store(dtype, values, &mut out);
    out
}

fn align(len: u64) -> u64 {
    len.div_ceil(u64::from(DEFAULT_ALIGN)) * u64::from(DEFAULT_ALIGN)
}

/// The candidate encodings of one tensor, cheapest first. With `rounding`, the sign codecs
/// choose their bits by their effect on the tensor's outputs ([`codec::round_signs_to_outputs`]).
fn candidates(
    dims: &[u64],
    base: &[f32],
    fine: &[f32],
    rounding: Option<&codec::OutputRounding>,
) -> Vec<(String, Encoded)> {
    let unchanged = base
        .iter()
        .zip(fine)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    let mut out = vec![("unchanged".to_string(), Encoded::Unchanged)];
    if unchanged {
        return out;
    }
    let n: u64 = dims.iter().product();
    let channels = if dims.len() >= 2 { dims[0] } else { 1 };
    let mut signs = |label: String, mut enc: Encoded| {
        let rounded =
            rounding.is_some_and(|r| codec::round_signs_to_outputs(&mut enc, base, fine, r));
        let label = if rounded {
            format!("{label} GPTQ")
        } else {
            label
        };
        out.push((label, enc));
    };
    for m in SIGN_MULTIPLIERS {
        signs(
            format!("sign x{m}"),
            codec::sign_tensor_scaled(base, fine, m),
        );
    }
    if channels > 1 && n / channels >= MIN_SIGN_CHANNEL {
        for m in SIGN_MULTIPLIERS {
            signs(
                format!("sign-groups x{m} (G={channels})"),
                codec::sign_groups_scaled(base, fine, channels as usize, true, m),
            );
        }
    }
    // Sign planes: per output channel where channels are long enough, else per tensor.
    let g = if channels > 1 && n / channels >= MIN_SIGN_CHANNEL {
        channels
    } else {
        1
    };
    for k in SIGN_PLANES {
        for m in SIGN_MULTIPLIERS {
            signs(
                format!("sign-planes k={k} x{m} (G={g})"),
                codec::sign_planes_scaled(base, fine, g as usize, k, true, m),
            );
        }
    }
    out.push((
        "q8-groups (G=1)".to_string(),
        codec::q8_groups(base, fine, 1, true),
    ));
    if channels > 1 {
        out.push((
            format!("q8-groups (G={channels})"),
            codec::q8_groups(base, fine, channels as usize, true),
        ));
    }
    out
}

/// Lower convex hull of (cost, divergence) points, cheapest first; ties keep the first.
fn lower_hull(c: &[Candidate]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..c.len()).collect();
    order.sort_by(|&a, &b| {
        c[a].cost
            .cmp(&c[b].cost)
            .then(c[a].divergence.total_cmp(&c[b].divergence))
    });
    let mut hull: Vec<usize> = Vec::new();
    for i in order {
        // Only strictly better divergence at a higher cost is worth a step.
        if let Some(&last) = hull.last() {
            if c[i].cost == c[last].cost || c[i].divergence >= c[last].divergence {
                continue;
            }
        }
        while hull.len() >= 2 {
            let (a, b) = (&c[hull[hull.len() - 2]], &c[hull[hull.len() - 1]]);
            let slope_ab = (a.divergence - b.divergence) / (b.cost - a.cost) as f64;
            let slope_bi = (b.divergence - c[i].divergence) / (c[i].cost - b.cost) as f64;
            if slope_bi >= slope_ab {
                hull.pop();
            } else {
                break;
            }
        }
        hull.push(i);
    }
    hull
}

/// Greedy multiple-choice knapsack on the isolated divergences: returns the candidate index per
/// tensor and the last accepted divergence reduction per byte.
fn greedy(tensors: &[Tensor], budget: u64) -> (Vec<usize>, f64) {
    let mut at: Vec<usize> = vec![0; tensors.len()]; // position on the hull
    let mut used: u64 = tensors.iter().map(|t| t.candidates[t.hull[0]].cost).sum();
    let mut lambda = 0.0;
    loop {
        let mut best: Option<(f64, usize)> = None;
        for (i, t) in tensors.iter().enumerate() {
            let Some(&next) = t.hull.get(at[i] + 1) else {
                continue;
            };
            let cur = &t.candidates[t.hull[at[i]]];
            let nx = &t.candidates[next];
            let extra = nx.cost - cur.cost;
            if used + extra > budget {
                continue;
            }
            let ratio = (cur.divergence - nx.divergence) / extra as f64;
            if best.is_none_or(|(r, _)| ratio > r) {
                best = Some((ratio, i));
            }
        }
        let Some((ratio, i)) = best else { break };
        let t = &tensors[i];
        used += t.candidates[t.hull[at[i] + 1]].cost - t.candidates[t.hull[at[i]]].cost;
        at[i] += 1;
        lambda = ratio;
    }
    let chosen = tensors.iter().zip(&at).map(|(t, &k)| t.hull[k]).collect();
    (chosen, lambda)
}

fn plan_cost(tensors: &[Tensor], chosen: &[usize]) -> u64 {
    tensors
        .iter()
        .zip(chosen)
        .map(|(t, &c)| t.candidates[c].cost)
        .sum()
}

/// Plans one encoding per tensor of `fine` against `base` (both ONNX files with the same float
/// initializers) so that the whole delta file stays within `settings.max_bits` bits per
/// parameter, with the least divergence from the fine-tune on `images`.
///
/// `progress(stage, done, total)` reports each model evaluation.
pub fn plan(
    base: &[u8],
    base_w: &OnnxWeights,
    fine: &[u8],
    fine_w: &OnnxWeights,
    images: &Images,
    settings: &Settings,
    mut progress: impl FnMut(Stage, usize, usize),
) -> Result<Plan, CalibError> {
    if images.count == 0 {
        return Err(CalibError::NoImages);
    }
    let expected = images.count * images.image_len();
    if images.data.len() != expected {
        return Err(CalibError::ImageData {
            expected,
            found: images.data.len(),
        });
    }
    // Output-aware rounding: the second moments of every layer's inputs in the fine-tuned model.
    progress(Stage::Inputs, 0, 1);
    let roundings = output_roundings(fine, fine_w, images);
    progress(Stage::Inputs, 1, 1);

    let mut tensors = Vec::with_capacity(base_w.initializers.len());
    for_each_pair(base, base_w, fine, fine_w, |_, p| {
        let (b, bv, fv) = (p.base, &p.base_values, &p.fine_values);
        let candidates = candidates(&b.dims, bv, fv, roundings.get(&b.name))
            .into_iter()
            .map(|(label, encoded)| Candidate {
                label,
                cost: align(encoded.payload_len() as u64),
                stored: stored(b.dtype, &reconstruct_encoded(bv, &encoded)),
                encoded,
                divergence: 0.0,
            })
            .collect();
        tensors.push(Tensor {
            name: b.name.clone(),
            dtype: b.dtype,
            dims: p.dims,
            params: b.numel(),
            range: p.fine.data.clone(),
            fine: fine[p.fine.data.clone()].to_vec(),
            candidates,
            hull: Vec::new(),
        });
    })
    .map_err(|e| match e {
        CompressError::Mismatch { name, what } => CalibError::Mismatch { name, what },
        CompressError::NonFinite { name } => CalibError::NonFinite { name },
        other => CalibError::Model(other.to_string()),
    })?;
    let params: u64 = tensors.iter().map(|t| t.params).sum();
    let output_rounded = tensors
        .iter()
        .filter(|t| roundings.contains_key(&t.name))
        .count();

    // Bytes before the payloads do not depend on the codecs.
    let meta_bytes = {
        let mut records: Vec<TensorRecord> = tensors
            .iter()
            .map(|t| TensorRecord {
                name: t.name.clone(),
                dtype: t.dtype,
                dims: t.dims.clone(),
                encoded: Encoded::Unchanged,
            })
            .collect();
        let manifest = Manifest {
            name: "calibration",
            description: "",
            labels: "",
            tool: concat!("bitdelta ", env!("CARGO_PKG_VERSION")),
            sequence: 0,
            params: 0,
            base_fingerprint: [0; 32],
            result_fingerprint: [0; 32],
        };
        write_delta(&manifest, &mut records, DEFAULT_ALIGN)
            .map(|f| f.len() as u64)
            .map_err(|e| CalibError::Model(e.to_string()))?
    };
    let budget_file = (settings.max_bits * params as f64 / 8.0).floor() as u64;
    let Some(budget) = budget_file.checked_sub(meta_bytes) else {
        return Err(CalibError::Budget {
            needed: meta_bytes as f64 * 8.0 / params as f64,
            max_bits: settings.max_bits,
        });
    };

    // 1. Reference outputs.
    let search = settings.search_images.clamp(1, images.count);
    let mut ev = Evaluator {
        model: fine.to_vec(),
        images: images.clone(),
        search,
        reference_search: Vec::new(),
        reference_all: Vec::new(),
        evaluations: 0,
    };
    progress(Stage::Reference, 0, 1);
    ev.reference_all = ev.logits(images.count)?;
    ev.reference_search = ev.reference_all[..search].to_vec();
    progress(Stage::Reference, 1, 1);

    // 2. Isolated sensitivity of every candidate.
    let total: usize = tensors
        .iter()
        .map(|t| t.candidates.len().saturating_sub(1))
        .sum();
    let mut done = 0;
    for i in 0..tensors.len() {
        // Candidates come cheapest first within each family; once one is (nearly) lossless, a
        // costlier one cannot improve on it and is not run.
        let mut lossless_at: Option<u64> = None;
        for c in 0..tensors[i].candidates.len() {
            let exact = tensors[i].candidates[c].stored == tensors[i].fine;
            let cost = tensors[i].candidates[c].cost;
            let d = if exact {
                0.0
            } else if lossless_at.is_some_and(|at| cost >= at) {
                LOSSLESS
            } else {
                let (kl, _) = ev.measure(
                    &tensors,
                    |k| {
                        if k == i {
                            &tensors[i].candidates[c].stored
                        } else {
                            &tensors[k].fine
                        }
                    },
                    false,
                )?;
                kl
            };
            tensors[i].candidates[c].divergence = d;
            if d <= LOSSLESS {
                lossless_at = Some(lossless_at.map_or(cost, |at| at.min(cost)));
            }
            if c > 0 {
                done += 1;
                progress(Stage::Sensitivity, done, total);
            }
        }
        tensors[i].hull = lower_hull(&tensors[i].candidates);
    }

    // 3. Greedy plan within the budget (or the smallest budget reaching the target).
    let floor: u64 = tensors.iter().map(|t| t.candidates[t.hull[0]].cost).sum();
    if floor > budget {
        return Err(CalibError::Budget {
            needed: (meta_bytes + floor) as f64 * 8.0 / params as f64,
            max_bits: settings.max_bits,
        });
    }
    let mut budget = budget;
    if let Some(target) = settings.target_retention {
        // Bisect on the budget: agreement on all images of the greedy plan.
        let (mut lo, mut hi) = (floor, budget);
        let steps = 8;
        for s in 0..steps {
            progress(Stage::Target, s, steps);
            if hi - lo <= params / 400 {
                break;
            }
            let mid = lo + (hi - lo) / 2;
            let (chosen, _) = greedy(&tensors, mid);
            let (_, agree) =
                ev.measure(&tensors, |k| &tensors[k].candidates[chosen[k]].stored, true)?;
            if agree >= target {
                hi = mid;
            } else {
                lo = mid;
            }
        }
        progress(Stage::Target, steps, steps);
        budget = hi;
    }
    let (mut chosen, lambda) = greedy(&tensors, budget);

    // 4. Refine in context: revisit each tensor with the others at their planned encoding.
    let mut order: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].candidates.len() > 1)
        .collect();
    order.sort_by(|&a, &b| {
        let da = tensors[a].candidates[chosen[a]].divergence;
        let db = tensors[b].candidates[chosen[b]].divergence;
        db.total_cmp(&da)
    });
    let lambda = lambda.max(0.0);
    let rounds = settings.refine_rounds;
    let per_round: usize = order.len() * 3;
    let mut done = 0;
    for _ in 0..rounds {
        let (mut current, _) = ev.measure(
            &tensors,
            |k| &tensors[k].candidates[chosen[k]].stored,
            false,
        )?;
        for &i in &order {
            let used = plan_cost(&tensors, &chosen);
            let now = chosen[i];
            let mut best = (
                current + lambda * tensors[i].candidates[now].cost as f64,
                now,
                current,
            );
            let hull = &tensors[i].hull;
            let pos = hull.iter().position(|&h| h == now);
            for c in 0..tensors[i].candidates.len() {
                // The neighbours on the hull, and the other scale multipliers of the same codec.
                let neighbour =
                    pos.is_some_and(|p| (p > 0 && hull[p - 1] == c) || hull.get(p + 1) == Some(&c));
                let sibling = tensors[i].candidates[c].cost == tensors[i].candidates[now].cost
                    && tensors[i].candidates[c].encoded.codec()
                        == tensors[i].candidates[now].encoded.codec();
                if c == now || !(neighbour || sibling) {
                    continue;
                }
                done += 1;
                progress(
                    Stage::Refine,
                    done.min(per_round * rounds),
                    per_round * rounds,
                );
                let cost = tensors[i].candidates[c].cost;
                if used - tensors[i].candidates[now].cost + cost > budget {
                    continue;
                }
                let (kl, _) = ev.measure(
                    &tensors,
                    |k| {
                        let c = if k == i { c } else { chosen[k] };
                        &tensors[k].candidates[c].stored
                    },
                    false,
                )?;
                let j = kl + lambda * cost as f64;
                if j < best.0 {
                    best = (j, c, kl);
                }
            }
            chosen[i] = best.1;
            current = best.2;
        }
    }
    progress(Stage::Refine, per_round * rounds, per_round * rounds);

    // 5. Confirm on every image.
    progress(Stage::Confirm, 0, 1);
    let (divergence, agreement) =
        ev.measure(&tensors, |k| &tensors[k].candidates[chosen[k]].stored, true)?;
    progress(Stage::Confirm, 1, 1);

    let payload_bytes = plan_cost(&tensors, &chosen);
    let mut encodings = Vec::with_capacity(tensors.len());
    let mut choices = Vec::with_capacity(tensors.len());
    for (t, &c) in tensors.iter_mut().zip(&chosen) {
        let cand = &mut t.candidates[c];
        choices.push(Choice {
            name: t.name.clone(),
            params: t.params,
            codec: cand.encoded.codec(),
            label: cand.label.clone(),
            payload_bytes: cand.encoded.payload_len() as u64,
            divergence: cand.divergence,
        });
        encodings.push(std::mem::replace(&mut cand.encoded, Encoded::Unchanged));
    }
    Ok(Plan {
        encodings,
        choices,
        meta_bytes,
        file_bytes: meta_bytes + payload_bytes,
        params,
        agreement,
        divergence,
        images: images.count,
        evaluations: ev.evaluations,
        output_rounded,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(cost: u64, divergence: f64) -> Candidate {
        Candidate {
            label: String::new(),
            encoded: Encoded::Unchanged,
            cost,
            stored: Vec::new(),
            divergence,
        }
    }

    #[test]
    fn hull_drops_dominated_and_concave_points() {
        // (0, 10) (10, 9.9) (10, 5) (20, 4) (40, 0) (50, 1): (10, 9.9) is dominated by (10, 5),
        // (20, 4) lies above the segment (10, 5)-(40, 0), (50, 1) is worse than (40, 0).
        let c = [
            cand(0, 10.0),
            cand(10, 9.9),
            cand(10, 5.0),
            cand(20, 4.0),
            cand(40, 0.0),
            cand(50, 1.0),
        ];
        assert_eq!(lower_hull(&c), [0, 2, 4]);
    }

    fn tensor(points: &[(u64, f64)]) -> Tensor {
        let candidates: Vec<Candidate> = points.iter().map(|&(c, d)| cand(c, d)).collect();
        let hull = lower_hull(&candidates);
        Tensor {
            name: String::new(),
            dtype: DType::F32,
            dims: Vec::new(),
            params: 0,
            range: 0..0,
            fine: Vec::new(),
            candidates,
            hull,
        }
    }

    #[test]
    fn greedy_spends_on_the_best_ratio_and_respects_the_budget() {
        // Tensor a gains 8 for 10 bytes, tensor b gains 1 for 10 bytes.
        let t = [
            tensor(&[(0, 8.0), (10, 0.0)]),
            tensor(&[(0, 1.0), (10, 0.0)]),
        ];
        assert_eq!(greedy(&t, 10).0, [1, 0]);
        assert_eq!(greedy(&t, 19).0, [1, 0]);
        assert_eq!(greedy(&t, 20).0, [1, 1]);
        assert_eq!(greedy(&t, 0).0, [0, 0]);
    }

    #[test]
    fn reconstruction_matches_the_codec_rule() {
        let base = [1.0f32, -2.0, 0.5, 3.0];
        let fine = [1.5f32, -2.5, 0.5, 2.0];
        // mean |d| = (0.5 + 0.5 + 0 + 1) / 4 = 0.5; x1.5 gives 0.75.
        let r = reconstruct_encoded(&base, &codec::sign_tensor_scaled(&base, &fine, 1.5));
        assert_eq!(r, [1.75, -2.75, 1.25, 2.25]);
        let r = reconstruct_encoded(&base, &codec::q8_groups(&base, &fine, 1, false));
        for (x, y) in r.iter().zip(fine) {
            assert!((x - y).abs() <= 1.0 / 127.0, "{r:?}");
        }
        assert_eq!(reconstruct_encoded(&base, &Encoded::Unchanged), base);
    }

    #[test]
    fn patches_give_the_output_error_of_a_convolution() {
        // A grouped convolution with a non-square kernel, stride, dilation and asymmetric pads:
        // for a weight error e, the sum over the output positions of (conv_e(x))² of output
        // channel o is e_o H e_oᵀ with H the patches' second moments of o's group.
        let s = ConvShape {
            group: 2,
            cig: 2,
            kernel: [3, 2],
            stride: [2, 1],
            dilation: [1, 2],
            pads: [1, 0, 2, 1],
        };
        let shape = [2usize, 4, 7, 6];
        let (n, c, ih, iw) = (shape[0], shape[1], shape[2], shape[3]);
        let wave = |i: usize, k: f64| ((i as f64 * k).sin() * 1.7) as f32;
        let a: Vec<f32> = (0..n * c * ih * iw).map(|i| wave(i, 0.37)).collect();
        let co = 4;
        let e: Vec<f64> = (0..co * s.cols())
            .map(|i| f64::from(wave(i, 0.91)))
            .collect();
        let mut h = vec![vec![0f64; s.cols() * s.cols()]; s.group];
        add_patches(&s, &a, &shape, &mut h);
        h.iter_mut().for_each(|m| mirror(m, s.cols()));
        // The convolution, straight from the ONNX definition.
        // Padded 10 x 7, spans 3 x 3 (dilation 2 over 2 taps), strides 2 x 1.
        let (oh, ow) = ((ih + 1 + 2 - 3) / 2 + 1, iw + 1 - 3 + 1);
        for o in 0..co {
            let g = o / (co / s.group);
            let mut sum = 0f64;
            for img in 0..n {
                for y in 0..oh {
                    for x in 0..ow {
                        let mut v = 0f64;
                        for ci in 0..s.cig {
                            for ky in 0..3 {
                                for kx in 0..2 {
                                    let (py, px) = (y * 2 + ky, x + kx * 2);
                                    if py < 1 || px >= iw || py > ih {
                                        continue;
                                    }
                                    let xv =
                                        a[((img * c + g * s.cig + ci) * ih + py - 1) * iw + px];
                                    v += e[o * s.cols() + (ci * 3 + ky) * 2 + kx] * f64::from(xv);
                                }
                            }
                        }
                        sum += v * v;
                    }
                }
            }
            let k = s.cols();
            let row = &e[o * k..(o + 1) * k];
            let quad: f64 = (0..k)
                .map(|p| {
                    (0..k)
                        .map(|q| row[p] * h[g][p * k + q] * row[q])
                        .sum::<f64>()
                })
                .sum();
            assert!(
                (quad - sum).abs() <= 1e-9 * sum.abs(),
                "channel {o}: {quad} vs {sum}"
            );
        }
    }

    #[test]
    fn every_weight_of_the_species_model_gets_its_inputs() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/species/night.onnx");
        let bytes = std::fs::read(path).unwrap();
        let w = OnnxWeights::scan(&bytes).unwrap();
        use prost::Message;
        let proto = tract_onnx::pb::ModelProto::decode(&bytes[..]).unwrap();
        let uses = weight_uses(proto.graph.as_ref().unwrap(), &w);
        // Every conv kernel and the classifier: the tensors of rank 2 and 4; biases are added,
        // not multiplied.
        let mut want: Vec<&str> = w
            .initializers
            .iter()
            .filter(|i| i.dims.len() >= 2)
            .map(|i| i.name.as_str())
            .collect();
        let mut got: Vec<&str> = uses.iter().map(|u| u.weight.as_str()).collect();
        want.sort_unstable();
        got.sort_unstable();
        assert_eq!(got, want);
        for u in &uses {
            let dims = &w.get(&u.weight).unwrap().dims;
            match &u.conv {
                // Depthwise convolutions have one group per channel.
                Some(s) => assert!(s.group == 1 || s.group as u64 == dims[0], "{}", u.weight),
                None => assert_eq!(u.weight, "fc.weight"),
            }
        }
        // The probe model exposes them, and gives an output-aware rounding for every one.
        let images = Images {
            data: (0..3 * 3 * 32 * 32)
                .map(|i| ((i % 97) as f32 - 48.0) / 30.0)
                .collect(),
            count: 3,
            shape: [3, 32, 32],
        };
        let r = output_roundings(&bytes, &w, &images);
        assert_eq!(r.len(), want.len());
        for (name, r) in &r {
            let dims = &w.get(name).unwrap().dims;
            let n: u64 = dims.iter().product();
            assert_eq!(n % r.cols() as u64, 0, "{name}");
        }
    }

    #[test]
    fn multiplier_one_is_the_plain_encoder() {
        let base: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
        let fine: Vec<f32> = (0..64).map(|i| (i as f32 * 0.41).cos()).collect();
        assert_eq!(
            codec::sign_tensor_scaled(&base, &fine, 1.0),
            codec::sign_tensor(&base, &fine)
        );
        assert_eq!(
            codec::sign_groups_scaled(&base, &fine, 8, true, 1.0),
            codec::sign_groups(&base, &fine, 8, true)
        );
    }
}

/// Images per run of the probe model that exposes the layers' inputs.
const PROBE_BATCH: usize = 50;

/// How a weight multiplies its input: `x Wᵀ` (fully connected) or a 2-D convolution.
#[derive(Clone, Debug)]
struct WeightUse {
    weight: String,
    input: String,
    conv: Option<ConvShape>,
}

/// A 2-D convolution's geometry (weight `[co, cig, kh, kw]`, `group` groups).
#[derive(Clone, Copy, Debug)]
struct ConvShape {
    group: usize,
    cig: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    dilation: [usize; 2],
    /// Top, left, bottom, right.
    pads: [usize; 4],
}

impl ConvShape {
    fn cols(&self) -> usize {
        self.cig * self.kernel[0] * self.kernel[1]
    }
}

/// The weights that exactly one `Conv` (2-D, explicit padding) or `Gemm` (`transA = 0`,
/// `transB = 1`) node multiplies with its first input, and with nothing else.
fn weight_uses(graph: &tract_onnx::pb::GraphProto, weights: &OnnxWeights) -> Vec<WeightUse> {
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
fn add_patches(s: &ConvShape, a: &[f32], shape: &[usize], h: &mut [Vec<f64>]) {
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
fn mirror(h: &mut [f64], k: usize) {
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
fn output_roundings(
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
