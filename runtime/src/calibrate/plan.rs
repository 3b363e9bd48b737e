//! The search: candidate encodings per tensor, their isolated divergences, the knapsack within
//! the budget, the refinement in context and the confirmation on every image.

use std::string::{String, ToString};
use std::vec::Vec;

use super::evaluation::{reconstruct_encoded, stored, Evaluator};
use super::statistics::output_roundings;
use super::{
    CalibError, Choice, Images, Plan, Settings, Stage, LOSSLESS, MIN_SIGN_CHANNEL,
    SIGN_MULTIPLIERS, SIGN_PLANES,
};
use crate::codec;
use crate::compress::{for_each_pair, CompressError};
use crate::format::{write_delta, DType, Encoded, Manifest, TensorRecord, DEFAULT_ALIGN};
use crate::onnx::OnnxWeights;

/// One candidate encoding of one tensor.
pub(super) struct Candidate {
    pub(super) label: String,
    pub(super) encoded: Encoded,
    /// Payload bytes rounded up to the payload alignment (what the file grows by).
    pub(super) cost: u64,
    /// The reconstruction, stored in the tensor's dtype.
    pub(super) stored: Vec<u8>,
    /// Isolated divergence.
    pub(super) divergence: f64,
}

pub(super) struct Tensor {
    pub(super) name: String,
    pub(super) dtype: DType,
    pub(super) dims: Vec<u32>,
    pub(super) params: u64,
    /// Range of the tensor's bytes in the fine-tuned ONNX file.
    pub(super) range: std::ops::Range<usize>,
    pub(super) fine: Vec<u8>,
    pub(super) candidates: Vec<Candidate>,
    /// Indices into `candidates` on the lower convex hull of (cost, divergence), cheapest first.
    pub(super) hull: Vec<usize>,
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
pub(super) fn lower_hull(c: &[Candidate]) -> Vec<usize> {
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
pub(super) fn greedy(tensors: &[Tensor], budget: u64) -> (Vec<usize>, f64) {
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
