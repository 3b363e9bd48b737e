//! The search: candidate encodings per tensor, their isolated divergences, the knapsack within
//! the budget, the refinement in context and the confirmation on every image.

use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::sync::Arc;
use std::vec::Vec;

use super::context::in_context;
use super::evaluation::{stored, Evaluator};
use super::statistics::{layer_inputs, LayerInputs};
use super::{
    parallel, CalibError, Choice, Images, Plan, Settings, Stage, MEASURE_ROUNDS, MIN_SIGN_CHANNEL,
    SIGN_MULTIPLIERS, SIGN_PLANES, SPARSE_ENTRIES,
};
use crate::codec;
use crate::compress::{aligned, for_each_pair, CompressError};
use crate::format::{write_delta, DType, Encoded, Manifest, TensorRecord, DEFAULT_ALIGN};
use crate::knapsack::{self, Point};
use crate::onnx::OnnxWeights;

/// One candidate encoding of one tensor.
pub(super) struct Candidate {
    pub(super) label: String,
    pub(super) encoded: Encoded,
    /// Payload bytes rounded up to the payload alignment (what the file grows by).
    pub(super) cost: u64,
    /// Error of the tensor's layer: the summed squared output error of the layer the tensor
    /// multiplies when its inputs were measured, else the squared error of the weights.
    pub(super) error: f64,
    /// Divergence of the model with only this tensor so encoded: measured, or predicted from
    /// the layer error and the tensor's measured importance.
    pub(super) divergence: f64,
    /// True when `divergence` was measured.
    pub(super) measured: bool,
}

pub(super) struct Tensor {
    pub(super) name: String,
    pub(super) dtype: DType,
    pub(super) dims: Vec<u32>,
    pub(super) params: u64,
    /// Index among the models' float initializers.
    pub(super) index: usize,
    pub(super) base: Vec<f32>,
    pub(super) fine: Vec<f32>,
    pub(super) candidates: Vec<Candidate>,
    /// Indices into `candidates` on the lower convex hull of (cost, divergence), cheapest first.
    pub(super) hull: Vec<usize>,
    /// For a layer's weight whose bias is a tensor of its own: that tensor's position and the
    /// mean input vector of each group. The bias then corrects the mean output error of the
    /// weight's encoding (its encoding follows the weight's).
    pub(super) bias: Option<(usize, Vec<Vec<f64>>)>,
    /// For such a bias: the position of its weight.
    pub(super) corrects: Option<usize>,
    /// For a layer's weight with such a bias, once re-rounded in context: per output channel,
    /// what the fine-tune's outputs gain over the mean inputs (`W_f (μ_f - μ)`, with `μ` the
    /// mean inputs in the planned model, which then stand in `bias`); empty before.
    pub(super) bias_shift: Vec<f64>,
}

impl Tensor {
    /// The values the tensor holds with candidate `c` (rounded to the tensor's dtype).
    fn values(&self, c: usize) -> Vec<f32> {
        stored(self.dtype, &self.base, &self.candidates[c].encoded)
    }
}

/// The bias of tensor `i` (a layer's weight holding the values `w`) that corrects the mean
/// output error of `w`: `b = b_fine - E μ` per output channel, with `E = w - w_fine` and `μ`
/// the mean input of the channel's group (plus the tensor's `bias_shift`), as an 8-bit delta
/// (one f16 scale). Its position, the
/// encoding and the values it holds.
pub(super) fn corrected_bias(
    tensors: &[Tensor],
    i: usize,
    w: &[f32],
) -> Option<(usize, Encoded, Vec<f32>)> {
    let t = &tensors[i];
    let (j, mean) = t.bias.as_ref()?;
    let b = &tensors[*j];
    let (groups, cols) = (mean.len(), mean.first()?.len());
    let rows = b.fine.len();
    if cols == 0 || rows * cols != w.len() || !rows.is_multiple_of(groups) {
        return None;
    }
    let per = rows / groups;
    let target: Vec<f32> = (0..rows)
        .map(|r| {
            let shift: f64 = w[r * cols..(r + 1) * cols]
                .iter()
                .zip(&t.fine[r * cols..(r + 1) * cols])
                .zip(&mean[r / per])
                .map(|((&a, &f), &m)| (f64::from(a) - f64::from(f)) * m)
                .sum();
            (f64::from(b.fine[r]) - shift + t.bias_shift.get(r).copied().unwrap_or(0.0)) as f32
        })
        .collect();
    let enc = if target
        .iter()
        .zip(&b.base)
        .all(|(x, y)| x.to_bits() == y.to_bits())
    {
        Encoded::Unchanged
    } else {
        codec::q8_groups(&b.base, &target, 1, true)
    };
    let v = stored(b.dtype, &b.base, &enc);
    Some((*j, enc, v))
}

/// The weights a model holds with tensor `i` at candidate `c` (index among the models' tensors,
/// values): the tensor, and its corrected bias.
fn changes(tensors: &[Tensor], i: usize, c: usize) -> Vec<(usize, Vec<f32>)> {
    at_values(tensors, i, tensors[i].values(c))
}

/// [`changes`] for tensor `i` holding `w`.
fn at_values(tensors: &[Tensor], i: usize, w: Vec<f32>) -> Vec<(usize, Vec<f32>)> {
    let bias = corrected_bias(tensors, i, &w);
    let mut out = vec![(tensors[i].index, w)];
    if let Some((j, _, v)) = bias {
        out.push((tensors[j].index, v));
    }
    out
}

/// `changes` as [`Evaluator`] takes them.
fn borrowed(changes: &[(usize, Vec<f32>)]) -> Vec<(usize, &[f32])> {
    changes.iter().map(|(i, v)| (*i, &v[..])).collect()
}

/// The candidate encodings of one tensor, cheapest first. With `rounding`, the sign codecs
/// choose their bits by their effect on the tensor's outputs ([`codec::round_signs_to_outputs`]).
pub(super) fn candidates(
    dims: &[u64],
    dtype: DType,
    base: &[f32],
    fine: &[f32],
    rounding: Option<&codec::OutputRounding>,
) -> Vec<(String, Encoded)> {
    candidates_where(dims, dtype, base, fine, rounding, |_| true)
}

/// [`candidates`] whose label (before ` GPTQ`) passes `keep`; the others are not encoded.
fn candidates_where(
    dims: &[u64],
    dtype: DType,
    base: &[f32],
    fine: &[f32],
    rounding: Option<&codec::OutputRounding>,
    keep: impl Fn(&str) -> bool,
) -> Vec<(String, Encoded)> {
    let unchanged = base
        .iter()
        .zip(fine)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    let mut out = Vec::new();
    if keep("unchanged") {
        out.push(("unchanged".to_string(), Encoded::Unchanged));
    }
    if unchanged {
        return out;
    }
    let n: u64 = dims.iter().product();
    let channels = if dims.len() >= 2 { dims[0] } else { 1 };
    // Per output channel when every channel holds at least `min` elements, else per tensor.
    let groups = |min: u64| {
        if channels > 1 && n / channels >= min {
            channels
        } else {
            1
        }
    };
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
        let label = format!("sign x{m}");
        if keep(&label) {
            signs(label, codec::sign_tensor_scaled(base, fine, m));
        }
    }
    if channels > 1 && n / channels >= MIN_SIGN_CHANNEL {
        for m in SIGN_MULTIPLIERS {
            let label = format!("sign-groups x{m} (G={channels})");
            if keep(&label) {
                signs(
                    label,
                    codec::sign_groups_scaled(base, fine, channels as usize, true, m),
                );
            }
        }
    }
    // Sign planes: per output channel where channels are long enough, else per tensor.
    let g = groups(MIN_SIGN_CHANNEL);
    for k in SIGN_PLANES {
        let labels = SIGN_MULTIPLIERS.map(|m| format!("sign-planes k={k} x{m} (G={g})"));
        if !labels.iter().any(|l| keep(l)) {
            continue;
        }
        let each =
            codec::sign_planes_multiplied(base, fine, g as usize, k, true, &SIGN_MULTIPLIERS);
        for (label, enc) in labels.into_iter().zip(each) {
            if keep(&label) {
                signs(label, enc);
            }
        }
    }
    // Sparse signs: the largest changes of each block, below one bit per element; one scale
    // per output channel where channels hold whole blocks, else per tensor.
    let sg = groups(codec::SPARSE_BLOCK as u64);
    for m in SPARSE_ENTRIES {
        let label = format!("sparse-signs m={m} (G={sg})");
        if m <= codec::max_entries(n) && keep(&label) {
            out.push((label, codec::sparse_signs(base, fine, sg as usize, m, true)));
        }
    }
    let label = "q8-groups (G=1)".to_string();
    if keep(&label) {
        out.push((label, codec::q8_groups(base, fine, 1, true)));
    }
    let label = format!("q8-groups (G={channels})");
    if channels > 1 && keep(&label) {
        out.push((label, codec::q8_groups(base, fine, channels as usize, true)));
    }
    // The fine-tune's own values, for tensors no larger than those the data-free rule gives 8
    // bits: a stem convolution's few hundred weights can cost more divergence at 8 bits than
    // any large layer at one.
    if n <= crate::compress::AUTO_Q8_MAX_ELEMENTS {
        if keep("raw-f16") {
            out.push(("raw-f16".to_string(), codec::raw_f16(fine)));
        }
        if dtype == DType::F32 && keep("raw-f32") {
            out.push(("raw-f32".to_string(), codec::raw_f32(fine)));
        }
    }
    out
}

/// The (cost, divergence) points of a tensor's candidates, as [`knapsack`] takes them.
fn points(c: &[Candidate]) -> Vec<Point> {
    c.iter()
        .map(|c| Point {
            cost: c.cost,
            loss: c.divergence,
        })
        .collect()
}

/// Lower convex hull of (cost, divergence) points, cheapest first; ties keep the first.
pub(super) fn lower_hull(c: &[Candidate]) -> Vec<usize> {
    knapsack::lower_hull(&points(c))
}

/// Greedy multiple-choice knapsack on the isolated divergences: returns the candidate index per
/// tensor and the last accepted divergence reduction per byte (every tensor at its cheapest
/// candidate when even those exceed the budget).
pub(super) fn greedy(tensors: &[Tensor], budget: u64) -> (Vec<usize>, f64) {
    let items: Vec<Vec<Point>> = tensors.iter().map(|t| points(&t.candidates)).collect();
    match knapsack::greedy(&items, budget) {
        Some(s) => (s.chosen, s.rate),
        None => (tensors.iter().map(|t| t.hull[0]).collect(), 0.0),
    }
}

fn plan_cost(tensors: &[Tensor], chosen: &[usize]) -> u64 {
    tensors
        .iter()
        .zip(chosen)
        .map(|(t, &c)| t.candidates[c].cost)
        .sum()
}

/// The candidates of one tensor scored by their layer error, keeping per encoding family (the
/// same codec and groups) only the scale multiplier with the least error.
fn scored(
    dims: &[u64],
    dtype: DType,
    base: &[f32],
    fine: &[f32],
    inputs: Option<&LayerInputs>,
) -> Vec<Candidate> {
    let rounding = inputs.and_then(LayerInputs::rounding);
    let mut best: BTreeMap<String, Candidate> = BTreeMap::new();
    let mut order = Vec::new();
    for (label, encoded) in candidates(dims, dtype, base, fine, rounding.as_ref()) {
        let v = stored(dtype, base, &encoded);
        let e: Vec<f64> = v
            .iter()
            .zip(fine)
            .map(|(&a, &b)| f64::from(a) - f64::from(b))
            .collect();
        let error = inputs
            .and_then(|i| i.output_error(&e))
            .unwrap_or_else(|| e.iter().map(|x| x * x).sum());
        // The family: the label without its multiplier.
        let family: String = label
            .split(' ')
            .filter(|w| !w.starts_with('x'))
            .collect::<Vec<_>>()
            .join(" ");
        let c = Candidate {
            label,
            cost: aligned(encoded.payload_len() as u64),
            encoded,
            error,
            divergence: 0.0,
            measured: false,
        };
        match best.get_mut(&family) {
            Some(b) if b.error <= c.error => {}
            Some(b) => *b = c,
            None => {
                order.push(family.clone());
                best.insert(family, c);
            }
        }
    }
    order.into_iter().filter_map(|f| best.remove(&f)).collect()
}

/// Predicts the divergence of each unmeasured candidate of `t` from its layer error: scaled
/// like the measured (changed) candidate whose layer error is nearest on a log scale, and never
/// above what leaving the tensor at the base costs.
fn predict(t: &mut Tensor) {
    let at_base = t
        .candidates
        .iter()
        .find(|c| matches!(c.encoded, Encoded::Unchanged))
        .map_or(f64::INFINITY, |c| c.divergence);
    let known: Vec<(f64, f64)> = t
        .candidates
        .iter()
        .filter(|c| c.measured && c.error > 0.0 && !matches!(c.encoded, Encoded::Unchanged))
        .map(|c| (c.error, c.divergence))
        .collect();
    for c in t.candidates.iter_mut().filter(|c| !c.measured) {
        let nearest = known.iter().min_by(|a, b| {
            let d = |e: f64| (e.ln() - c.error.ln()).abs();
            d(a.0).total_cmp(&d(b.0))
        });
        c.divergence = nearest
            .map_or(0.0, |&(e, kl)| kl / e * c.error)
            .min(at_base);
    }
}

/// Measures candidate `c` of tensor `i` alone in the model: its divergence from the reference.
fn measure_candidate(
    ev: &mut Evaluator<'_>,
    tensors: &mut [Tensor],
    i: usize,
    c: usize,
) -> Result<(), CalibError> {
    let (kl, _) = ev.measure(&borrowed(&changes(tensors, i, c)), false)?;
    tensors[i].candidates[c].divergence = kl;
    tensors[i].candidates[c].measured = true;
    Ok(())
}

/// Each tensor's lower convex hull of its candidates.
fn rehull(tensors: &mut [Tensor]) {
    for t in tensors {
        t.hull = lower_hull(&t.candidates);
    }
}

/// The candidate whose whole-model divergence is measured to learn how much the tensor's layer
/// error costs: the changed encoding closest to one bit per parameter.
fn probe_candidate(t: &Tensor) -> Option<usize> {
    let target = t.params.div_ceil(8) as f64;
    (0..t.candidates.len())
        .filter(|&c| {
            t.candidates[c].error > 0.0 && !matches!(t.candidates[c].encoded, Encoded::Unchanged)
        })
        .min_by(|&a, &b| {
            let d = |c: usize| (t.candidates[c].cost as f64 - target).abs();
            d(a).total_cmp(&d(b))
        })
}

/// Plans one encoding per tensor of `fine` against `base` (both ONNX files with the same float
/// initializers) so that the whole delta file stays within `settings.max_bits` bits per
/// parameter, with the least divergence from the fine-tune on `images`.
///
/// `progress(stage, done, total)` reports the steps of each stage.
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
    let threads = settings.threads.max(1);
    // 0. The inputs of every layer in the fine-tuned model.
    let inputs = layer_inputs(fine, fine_w, images, threads, |done, total| {
        progress(Stage::Inputs, done, total);
    });

    let mut tensors = Vec::with_capacity(base_w.initializers.len());
    for_each_pair(base, base_w, fine, fine_w, |k, p| {
        tensors.push(Tensor {
            name: p.base.name.clone(),
            dtype: p.base.dtype,
            dims: p.dims,
            params: p.base.numel(),
            index: k,
            base: p.base_values,
            fine: p.fine_values,
            candidates: Vec::new(),
            hull: Vec::new(),
            bias: None,
            corrects: None,
            bias_shift: Vec::new(),
        });
    })
    .map_err(|e| match e {
        CompressError::Mismatch { name, what } => CalibError::Mismatch { name, what },
        CompressError::NonFinite { name } => CalibError::NonFinite { name },
        other => CalibError::Model(other.to_string()),
    })?;
    let params: u64 = tensors.iter().map(|t| t.params).sum();

    // Bias correction: link each measured layer's weight to its bias.
    let position: BTreeMap<String, usize> = tensors
        .iter()
        .enumerate()
        .map(|(k, t)| (t.name.clone(), k))
        .collect();
    for (name, li) in &inputs {
        let (Some(&i), Some(&j)) = (
            position.get(name),
            li.bias.as_ref().and_then(|b| position.get(b)),
        ) else {
            continue;
        };
        if tensors[j].params as usize * li.cols == tensors[i].params as usize
            && tensors[j].corrects.is_none()
        {
            tensors[i].bias = Some((j, li.mean.clone()));
            tensors[j].corrects = Some(i);
        }
    }

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

    // 1. Score: every candidate's layer error (on every core). Each layer's input sums are
    //    freed as soon as its weight is scored (one weight per layer), so the sums of all
    //    layers and the scoring's own matrices are not alive at once, and none is left when the
    //    model is built for the whole-model evaluations.
    let inputs: BTreeMap<String, std::sync::Mutex<Option<LayerInputs>>> = inputs
        .into_iter()
        .map(|(name, li)| (name, std::sync::Mutex::new(Some(li))))
        .collect();
    progress(Stage::Score, 0, tensors.len());
    let scored_all = parallel(
        tensors.len(),
        threads,
        |i| {
            let t = &tensors[i];
            if t.corrects.is_some() {
                // Encoded from its weight's choice; its cost is that of an 8-bit delta.
                let encoded = codec::q8_groups(&t.base, &t.fine, 1, true);
                return vec![Candidate {
                    label: "q8-groups (G=1) bias-corrected".to_string(),
                    cost: aligned(encoded.payload_len() as u64),
                    encoded,
                    error: 0.0,
                    divergence: 0.0,
                    measured: true,
                }];
            }
            let dims: Vec<u64> = t.dims.iter().map(|&d| u64::from(d)).collect();
            let layer = inputs
                .get(&t.name)
                .and_then(|m| m.lock().unwrap_or_else(|e| e.into_inner()).take());
            let layer = layer.map(|li| if t.bias.is_some() { li.centered() } else { li });
            scored(&dims, t.dtype, &t.base, &t.fine, layer.as_ref())
        },
        |d| progress(Stage::Score, d, tensors.len()),
    );
    for (t, c) in tensors.iter_mut().zip(scored_all) {
        t.candidates = c;
    }
    let output_rounded = tensors
        .iter()
        .filter(|t| t.candidates.iter().any(|c| c.label.ends_with(" GPTQ")))
        .count();
    drop(inputs);
    progress(Stage::Score, tensors.len(), tensors.len());

    // 2. Reference outputs.
    let search = settings
        .search_images
        .unwrap_or_else(|| default_search_images(images))
        .clamp(1, images.count);
    progress(Stage::Reference, 0, 1);
    // Candidates alone in the model (sensitivity, measure) run on fewer images of large
    // inputs; the plan in context (refine) on all the search images.
    let screen = settings
        .search_images
        .unwrap_or_else(|| default_screen_images(images))
        .clamp(1, search);
    let mut ev = evaluator(fine, fine_w, &tensors, images, screen, threads)?;
    ev.reference_all = ev.logits(images.count)?;
    ev.reference_search = ev.reference_all[..screen].to_vec();
    progress(Stage::Reference, 1, 1);

    // 3. Sensitivity: per tensor the model's divergence with the tensor at one candidate and
    //    at the base, which sets how much a unit of its layer error costs.
    let measured: usize = 2 * tensors
        .iter()
        .filter(|t| t.fine != t.base && t.corrects.is_none())
        .count();
    let steps = measured;
    progress(Stage::Sensitivity, 0, steps);
    // Tensors in the order the model reads them, so that the evaluations share one cut.
    let first_step: Vec<usize> = (0..tensors.len())
        .map(|i| {
            let t = &tensors[i];
            let bias = t.bias.as_ref().map(|(j, _)| tensors[*j].index);
            ev.first_step(
                &[Some(t.index), bias]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let mut in_model_order: Vec<usize> = (0..tensors.len()).collect();
    in_model_order.sort_by_key(|&i| first_step[i]);
    let mut done = 0;
    for &i in &in_model_order {
        if tensors[i].fine == tensors[i].base || tensors[i].corrects.is_some() {
            continue;
        }
        if let Some(c) = probe_candidate(&tensors[i]) {
            measure_candidate(&mut ev, &mut tensors, i, c)?;
        }
        done += 1;
        progress(Stage::Sensitivity, done, steps);
        let at_base = at_values(&tensors, i, tensors[i].base.clone());
        let (kl_base, _) = ev.measure(&borrowed(&at_base), false)?;
        for c in &mut tensors[i].candidates {
            if matches!(c.encoded, Encoded::Unchanged) {
                c.divergence = kl_base;
                c.measured = true;
            }
        }
        predict(&mut tensors[i]);
        done += 1;
        progress(Stage::Sensitivity, done, steps);
    }
    progress(Stage::Sensitivity, steps, steps);

    // 4. Measure where the plan goes: the divergences of the candidates the greedy plan
    //    chooses and of their next upgrade, alone in the model, replace the predictions.
    let most = MEASURE_ROUNDS * measured;
    let mut done = 0;
    progress(Stage::Measure, 0, most);
    for _ in 0..MEASURE_ROUNDS {
        rehull(&mut tensors);
        let (chosen, _) = greedy(&tensors, budget);
        let mut todo = Vec::new();
        for (i, t) in tensors.iter().enumerate() {
            let Some(p) = t.hull.iter().position(|&h| h == chosen[i]) else {
                continue;
            };
            for &c in &t.hull[p..t.hull.len().min(p + 2)] {
                if !t.candidates[c].measured {
                    todo.push((i, c));
                }
            }
        }
        if todo.is_empty() {
            break;
        }
        todo.sort_by_key(|&(i, _)| first_step[i]);
        for &(i, c) in &todo {
            measure_candidate(&mut ev, &mut tensors, i, c)?;
            done += 1;
            progress(Stage::Measure, done.min(most), most);
        }
        // `todo` lists a tensor's candidates together: predict once per tensor.
        let mut last = None;
        for &(i, _) in &todo {
            if last != Some(i) {
                predict(&mut tensors[i]);
                last = Some(i);
            }
        }
    }
    rehull(&mut tensors);
    progress(Stage::Measure, most, most);

    // 5. Greedy plan within the budget (or the smallest budget reaching the target).
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
            let (_, agree) = ev.measure(&borrowed(&plan_changes(&tensors, &chosen)), true)?;
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

    // 6. Refine in context: the model holds the plan; the tensors with the largest predicted
    //    divergence try their neighbours on the hull, in model order.
    ev.set(&borrowed(&plan_changes(&tensors, &chosen)))?;
    ev.search_on(search);
    let mut order: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].hull.len() > 1)
        .collect();
    order.sort_by(|&a, &b| {
        let da = tensors[a].candidates[chosen[a]].divergence;
        let db = tensors[b].candidates[chosen[b]].divergence;
        db.total_cmp(&da)
    });
    order.truncate(settings.refine_tensors);
    // In the order the model reads them: a change kept leaves the cut of the next ones valid.
    order.sort_by_key(|&i| first_step[i]);
    let lambda = lambda.max(0.0);
    let rounds = settings.refine_rounds;
    let per_round: usize = order.len() * 2;
    let mut done = 0;
    progress(Stage::Refine, 0, per_round * rounds);
    // The plan's divergence on the search images.
    let mut planned = None;
    for _ in 0..rounds {
        let (mut current, _) = ev.measure(&[], false)?;
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
            let neighbours: Vec<usize> = pos
                .map(|p| {
                    [p.checked_sub(1), Some(p + 1)]
                        .into_iter()
                        .flatten()
                        .filter_map(|q| hull.get(q).copied())
                        .collect()
                })
                .unwrap_or_default();
            for c in neighbours {
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
                let (kl, _) = ev.measure(&borrowed(&changes(&tensors, i, c)), false)?;
                let j = kl + lambda * cost as f64;
                if j < best.0 {
                    best = (j, c, kl);
                }
            }
            if best.1 != now {
                ev.set(&borrowed(&changes(&tensors, i, best.1)))?;
            }
            chosen[i] = best.1;
            current = best.2;
        }
        planned = Some(current);
    }
    progress(Stage::Refine, per_round * rounds, per_round * rounds);

    // 7. Re-round in context, kept when the divergence on the search images falls.
    let planned = match planned {
        Some(kl) => kl,
        None => ev.measure(&[], false)?.0,
    };
    // Only the chosen candidates are read from here on; the evaluator is built again after.
    for (t, &c) in tensors.iter_mut().zip(&chosen) {
        for (k, cand) in t.candidates.iter_mut().enumerate() {
            if k != c {
                cand.encoded = Encoded::Unchanged;
            }
        }
    }
    let (reference_all, evaluations) = (std::mem::take(&mut ev.reference_all), ev.evaluations);
    drop(ev);
    let old = reround(
        fine,
        &Arc::new(fine_w.clone()),
        images,
        threads,
        &mut tensors,
        &chosen,
        |d, t| progress(Stage::Reround, d, t),
    );
    let mut ev = evaluator(fine, fine_w, &tensors, images, search, threads)?;
    ev.reference_all = reference_all;
    ev.evaluations = evaluations;

    // 8. Confirm on every image.
    ev.set(&borrowed(&plan_changes(&tensors, &chosen)))?;
    progress(Stage::Confirm, 0, 1);
    let (mut divergence, mut agreement) = ev.measure(&[], true)?;
    let mut rerounded = old.len();
    if !old.is_empty() && ev.search_divergence >= planned {
        rerounded = 0;
        restore(&mut tensors, &chosen, old);
        ev.set(&borrowed(&plan_changes(&tensors, &chosen)))?;
        (divergence, agreement) = ev.measure(&[], true)?;
    }
    progress(Stage::Confirm, 1, 1);

    // Corrected biases, from their weights' final encodings.
    for i in 0..tensors.len() {
        if tensors[i].bias.is_some() {
            let w = tensors[i].values(chosen[i]);
            if let Some((j, enc, _)) = corrected_bias(&tensors, i, &w) {
                let cost = aligned(enc.payload_len() as u64);
                let c = &mut tensors[j].candidates[chosen[j]];
                c.encoded = enc;
                c.cost = cost;
            }
        }
    }
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
        search_images: search,
        screen_images: screen,
        evaluations: ev.evaluations,
        output_rounded,
        rerounded,
    })
}

/// The fine-tuned model for whole-model evaluations, holding the fine-tune's weights.
fn evaluator<'i>(
    fine: &[u8],
    fine_w: &OnnxWeights,
    tensors: &[Tensor],
    images: &'i Images,
    search: usize,
    threads: usize,
) -> Result<Evaluator<'i>, CalibError> {
    let values: Vec<Vec<f32>> = tensors.iter().map(|t| t.fine.clone()).collect();
    Evaluator::new(
        fine,
        Arc::new(fine_w.clone()),
        values,
        images,
        search,
        threads,
    )
}

/// The weights of the plan `chosen` (index among the models' tensors, values), biases corrected.
fn plan_changes(tensors: &[Tensor], chosen: &[usize]) -> Vec<(usize, Vec<f32>)> {
    let mut out: BTreeMap<usize, Vec<f32>> = BTreeMap::new();
    for (i, (t, &c)) in tensors.iter().zip(chosen).enumerate() {
        if t.corrects.is_none() {
            out.extend(changes(tensors, i, c));
        } else {
            out.entry(t.index).or_insert_with(|| t.values(c));
        }
    }
    out.into_iter().collect()
}

/// What [`reround`] replaced in one tensor: its position, the encoding of its chosen
/// candidate, its bias's mean inputs and its bias shift.
type Replaced = (usize, Encoded, Option<Vec<Vec<f64>>>, Vec<f64>);

/// Output-rounded weights of the plan `chosen` rounded again in context, in model order
/// (`order`): each layer's inputs measured in the planned model with the layers before it
/// already rounded again, paired with the fine-tune's ([`paired_inputs`]), and the weight
/// rounded with the same encoding to the values that best give the fine-tune's outputs from
/// them ([`LayerInputs::fine_outputs_target`]); a bias-corrected weight's bias follows. Changes
/// `tensors` and returns what it replaced.
#[allow(clippy::too_many_arguments)]
fn reround(
    fine: &[u8],
    fine_w: &Arc<OnnxWeights>,
    images: &Images,
    threads: usize,
    tensors: &mut [Tensor],
    chosen: &[usize],
    progress: impl FnMut(usize, usize),
) -> Vec<Replaced> {
    let todo: Vec<usize> = (0..tensors.len())
        .filter(|&i| tensors[i].candidates[chosen[i]].label.ends_with(" GPTQ"))
        .map(|i| tensors[i].index)
        .collect();
    if todo.is_empty() {
        return Vec::new();
    }
    let values: Vec<Vec<f32>> = tensors.iter().map(|t| t.fine.clone()).collect();
    let mut planned = values.clone();
    for (i, v) in plan_changes(tensors, chosen) {
        planned[i] = v;
    }
    let position: BTreeMap<usize, usize> = tensors
        .iter()
        .enumerate()
        .map(|(k, t)| (t.index, k))
        .collect();
    let mut replaced = Vec::new();
    let done = in_context(
        fine,
        fine_w,
        planned,
        values,
        images,
        threads,
        &todo,
        |w, li| {
            let Some(&i) = position.get(&w) else {
                return Vec::new();
            };
            let Some((enc, mean, shift)) = rounded_in_context(&tensors[i], chosen[i], li, threads)
            else {
                return Vec::new();
            };
            let t = &mut tensors[i];
            let enc = std::mem::replace(&mut t.candidates[chosen[i]].encoded, enc);
            let bias = match (&mut t.bias, mean) {
                (Some((_, m)), Some(mean)) => Some(std::mem::replace(m, mean)),
                _ => None,
            };
            replaced.push((i, enc, bias, std::mem::replace(&mut t.bias_shift, shift)));
            changes(tensors, i, chosen[i])
        },
        progress,
    );
    // Rounding again only improves a plan: when the models could not run, the plan stays.
    if done.is_err() {
        restore(tensors, chosen, std::mem::take(&mut replaced));
    }
    replaced
}

/// Puts back what [`reround`] replaced.
fn restore(tensors: &mut [Tensor], chosen: &[usize], replaced: Vec<Replaced>) {
    for (i, enc, bias, shift) in replaced {
        let t = &mut tensors[i];
        t.candidates[chosen[i]].encoded = enc;
        if let (Some((_, m)), Some(mean)) = (&mut t.bias, bias) {
            *m = mean;
        }
        t.bias_shift = shift;
    }
}

/// Tensor `t` at candidate `c` rounded again to the fine-tune's outputs from the paired inputs
/// `li` (the target solved on `threads` threads): the encoding, and for a bias-corrected weight
/// its bias's mean inputs and shift.
#[allow(clippy::type_complexity)]
fn rounded_in_context(
    t: &Tensor,
    c: usize,
    li: &LayerInputs,
    threads: usize,
) -> Option<(Encoded, Option<Vec<Vec<f64>>>, Vec<f64>)> {
    let c = &t.candidates[c];
    let li = if t.bias.is_some() {
        li.centered()
    } else {
        li.clone()
    };
    let r = li.rounding()?;
    let target = li.fine_outputs_target(&t.fine, &r, threads)?;
    let dims: Vec<u64> = t.dims.iter().map(|&d| u64::from(d)).collect();
    let label = c.label.strip_suffix(" GPTQ")?;
    let (_, enc) = candidates_where(&dims, t.dtype, &t.base, &target, Some(&r), |l| l == label)
        .pop()
        .filter(|(l, _)| l == &c.label)?;
    if aligned(enc.payload_len() as u64) != c.cost {
        return None;
    }
    let p = li.paired.as_ref()?;
    if t.bias.is_none() {
        return Some((enc, None, Vec::new()));
    }
    let cols = li.cols;
    let per = t.fine.len() / cols / li.mean.len();
    let shift = t
        .fine
        .chunks_exact(cols)
        .enumerate()
        .map(|(r, w)| {
            let g = r / per;
            w.iter()
                .zip(p.mean[g].iter().zip(&li.mean[g]))
                .map(|(&w, (&mf, &mq))| f64::from(w) * (mf - mq))
                .sum()
        })
        .collect();
    Some((enc, Some(li.mean.clone()), shift))
}

/// Search images when the settings do not say: 64, fewer for large images (at least 16), so
/// that a whole-model evaluation costs about the same on every model size.
fn default_search_images(images: &Images) -> usize {
    ((1usize << 21) / images.image_len().max(1)).clamp(16, 64)
}

/// Images each candidate is measured alone on (sensitivity, measure) when the settings do not
/// say: like [`default_search_images`] for half the values, at least 8 (8 of the 16 at 224x224
/// RGB; all 64 at 32x32). On field night at 1 bit/param this kept the mean KL from the
/// fine-tune on the test frames (0.0735 against 0.0736 on 16) in three quarters of the time.
fn default_screen_images(images: &Images) -> usize {
    ((1usize << 20) / images.image_len().max(1)).clamp(8, 64)
}
