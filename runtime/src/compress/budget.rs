//! The budgeted data-free policy: the codec of every tensor chosen to keep the whole file
//! within a number of bits per parameter, with the least weight error, without any data.
//!
//! The calibrated search ([`crate::calibrate`]) learned which codecs pay off: sign bit-planes
//! and sparse signs beside the signs and 8-bit deltas of the shape rule. Without images their
//! effect on the outputs cannot be measured, so this policy scores every candidate
//! ([`candidates`]) by a data-free proxy of the damage it does, the tensor's squared weight
//! error `‖W_fine − W_rec‖²`, weighed by [`Damage`], and spends the budget where the proxy
//! falls most per byte ([`crate::knapsack`]).
//!
//! It runs in two passes so that memory stays bounded by one tensor whatever the model's size:
//! [`Planner::add`] measures the candidates of one tensor and keeps only their sizes and
//! errors, [`Planner::plan`] chooses, and the writer encodes each tensor again with its choice
//! ([`Choice::encode`]).

use std::collections::BTreeMap;
use std::fmt;
use std::vec::Vec;

use super::{Choice, CompressError};
use crate::codec;
use crate::compose::{self, Base};
use crate::format::{DType, Encoded, DEFAULT_ALIGN};
use crate::knapsack::{self, Point};

/// Plane counts the budgeted policy tries with `sign-planes` (2 and 3 bits per element).
pub const BUDGET_PLANES: [u8; 2] = [2, 3];

/// Entries per 64-element block the budgeted policy tries with `sparse-signs` (1/4, 1/2 and
/// 1 bit per element, plus the scales).
pub const BUDGET_SPARSE_ENTRIES: [u8; 3] = [2, 4, 8];

/// Tensors at least this long measure their candidates on several threads.
const PARALLEL_MIN_ELEMENTS: usize = 1 << 16;

/// How the budgeted policy weighs one tensor's squared weight error `‖W_fine − W_rec‖²` to
/// compare it with other tensors'.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Damage {
    /// Relative to the fine-tuned weights, `‖W_fine − W_rec‖² / ‖W_fine‖²`: the relative
    /// perturbation of the layer's outputs, whatever the layer's scale (the default: it kept
    /// the most accuracy on every family measured).
    #[default]
    Weight,
    /// Relative to the fine-tune's change, `‖W_fine − W_rec‖² / ‖W_fine − W_base‖²`: the
    /// share of the change that is lost (1 for a tensor left at the base).
    Delta,
    /// The plain squared error: large-valued tensors count for more.
    Absolute,
}

impl Damage {
    /// Lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Weight => "weight",
            Self::Delta => "delta",
            Self::Absolute => "absolute",
        }
    }
}

/// The encodings the budgeted policy considers for a tensor of this shape: every codec of the
/// crate but the raw ones, with one scale per tensor and, for tensors of rank 2 or more, one
/// per output channel (`dims[0]`). Only [`Choice::Unchanged`] when the tensor did not change.
pub fn candidates(dims: &[u64], unchanged: bool) -> Vec<Choice> {
    if unchanged {
        return vec![Choice::Unchanged];
    }
    let n: u64 = dims.iter().product();
    let mut out = vec![Choice::Unchanged, Choice::SignTensor, Choice::Q8Tensor];
    let per_channel: &[bool] = if dims.len() >= 2 && dims[0] > 1 {
        out.extend([Choice::SignChannel, Choice::Q8Channel]);
        &[false, true]
    } else {
        &[false]
    };
    for &per_channel in per_channel {
        for planes in BUDGET_PLANES {
            out.push(Choice::SignPlanes {
                planes,
                per_channel,
            });
        }
        for entries in BUDGET_SPARSE_ENTRIES {
            if usize::from(entries) <= codec::max_entries(n) {
                out.push(Choice::SparseSigns {
                    entries,
                    per_channel,
                });
            }
        }
    }
    out
}

/// One candidate of one tensor, measured: its encoding dropped.
#[derive(Clone, Copy, Debug)]
struct Measured {
    choice: Choice,
    /// Payload bytes.
    bytes: u64,
    /// `‖W_fine − W_rec‖²`, with `W_rec` as the tensor's dtype stores it.
    error: f64,
}

/// One tensor's candidates and the norms [`Damage`] divides by.
#[derive(Clone, Debug)]
struct Tensor {
    params: u64,
    fine_sq: f64,
    delta_sq: f64,
    candidates: Vec<Measured>,
}

impl Tensor {
    fn damage(&self, how: Damage, error: f64) -> f64 {
        let norm = match how {
            Damage::Weight => self.fine_sq,
            Damage::Delta => self.delta_sq,
            Damage::Absolute => 1.0,
        };
        if error == 0.0 {
            0.0
        } else if norm > 0.0 {
            error / norm
        } else {
            // All-zero fine weights (Weight) that are not matched exactly: a full loss.
            1.0
        }
    }
}

/// The first pass of the budgeted policy: each tensor's candidates, measured one tensor at a
/// time. Add every tensor in the order the delta's tensors will be encoded, then [`plan`].
///
/// [`plan`]: Planner::plan
#[derive(Clone, Debug, Default)]
pub struct Planner {
    damage: Damage,
    tensors: Vec<Tensor>,
}

/// The chosen encoding of one tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Planned {
    /// The encoding.
    pub choice: Choice,
    /// Element count.
    pub params: u64,
    /// Payload bytes.
    pub payload_bytes: u64,
    /// Its damage as [`Damage`] weighs it (0 when exact).
    pub damage: f64,
}

/// What the budgeted policy chose, tensor by tensor, in the order the tensors were added.
#[derive(Clone, Debug, PartialEq)]
pub struct BudgetPlan {
    /// One choice per tensor.
    pub tensors: Vec<Planned>,
    /// Bytes of the file before the payloads (header, manifest, table, dims, names, padding).
    pub meta_bytes: u64,
    /// Size of the delta file this plan writes, at most (the last payload needs no padding).
    pub file_bytes: u64,
    /// Total parameter count.
    pub params: u64,
    /// The budget in bytes: `floor(max_bits * params / 8)`.
    pub budget_bytes: u64,
    /// Summed damage of the choices.
    pub damage: f64,
}

impl BudgetPlan {
    /// The encoding of tensor `i` (in the order the tensors were added).
    pub fn choice(&self, i: usize) -> Choice {
        self.tensors[i].choice
    }

    /// Tensors, parameters and payload bytes per codec name.
    pub fn codec_counts(&self) -> BTreeMap<&'static str, (usize, u64, u64)> {
        let mut m = BTreeMap::new();
        for t in &self.tensors {
            let e = m.entry(t.choice.codec().name()).or_insert((0, 0, 0));
            e.0 += 1;
            e.1 += t.params;
            e.2 += t.payload_bytes;
        }
        m
    }

    /// Bits per parameter of the whole file (at most).
    pub fn bits_per_param(&self) -> f64 {
        self.file_bytes as f64 * 8.0 / self.params.max(1) as f64
    }
}

/// Bytes a payload of `len` bytes adds to the file: itself and the padding to the alignment.
pub(crate) fn aligned(len: u64) -> u64 {
    len.next_multiple_of(u64::from(DEFAULT_ALIGN))
}

/// `‖fine − rec‖²` for the encoding `enc` of `base`, `rec` as `dtype` stores it; `out` and
/// `bytes` are scratch buffers.
fn squared_error(
    enc: &Encoded,
    dtype: DType,
    base: &[f32],
    fine: &[f32],
    out: &mut Vec<f32>,
    bytes: &mut Vec<u8>,
) -> f64 {
    stored_values(enc, dtype, base, out, bytes);
    out.iter()
        .zip(fine)
        .map(|(&r, &f)| {
            let e = f64::from(r) - f64::from(f);
            e * e
        })
        .sum()
}

/// The values a device stores for `enc` applied to `base` in a tensor of `dtype`, in `out`: the
/// reconstruction of docs/FORMAT.md, rounded to nearest for f16 tensors. `bytes` holds the
/// payload.
pub(crate) fn stored_values(
    enc: &Encoded,
    dtype: DType,
    base: &[f32],
    out: &mut Vec<f32>,
    bytes: &mut Vec<u8>,
) {
    out.resize(base.len(), 0.0);
    let payload = enc
        .payload(base.len(), bytes)
        .expect("encoders produce payloads that fit their tensor");
    compose::reconstruct(Base::F32(base), &[(payload, 1.0)], out)
        .expect("encoders produce payloads that fit their tensor");
    dtype.round(out);
}

/// Measures `choices` of one tensor on `threads` threads (each taking every `threads`-th).
fn measure(
    choices: &[Choice],
    dims: &[u64],
    dtype: DType,
    base: &[f32],
    fine: &[f32],
    threads: usize,
) -> Vec<Measured> {
    let one = |k: usize, out: &mut Vec<f32>, bytes: &mut Vec<u8>| {
        let choice = choices[k];
        let enc = choice.encode(dims, base, fine);
        Measured {
            choice,
            bytes: enc.payload_len() as u64,
            error: squared_error(&enc, dtype, base, fine, out, bytes),
        }
    };
    let threads = threads.clamp(1, choices.len().max(1));
    if threads == 1 {
        let (mut out, mut bytes) = (Vec::new(), Vec::new());
        return (0..choices.len())
            .map(|k| one(k, &mut out, &mut bytes))
            .collect();
    }
    let mut results: Vec<Option<Measured>> = vec![None; choices.len()];
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let (mut out, mut bytes) = (Vec::new(), Vec::new());
                    (t..choices.len())
                        .step_by(threads)
                        .map(|k| (k, one(k, &mut out, &mut bytes)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        for h in handles {
            for (k, m) in h.join().expect("a measuring thread panicked") {
                results[k] = Some(m);
            }
        }
    });
    results
        .into_iter()
        .map(|m| m.expect("every candidate measured"))
        .collect()
}

impl Planner {
    /// A planner weighing errors by `damage`.
    pub fn new(damage: Damage) -> Self {
        Self {
            damage,
            tensors: Vec::new(),
        }
    }

    /// Measures the [`candidates`] of one tensor (shape `dims`, stored as `dtype`, values read
    /// as f32): each is encoded, rebuilt as a device rebuilds it, its size and squared error
    /// kept and the encoding dropped. Large tensors use every core.
    ///
    /// # Panics
    /// When `base` and `fine` do not both hold the `dims` product of values.
    pub fn add(&mut self, dims: &[u64], dtype: DType, base: &[f32], fine: &[f32]) {
        let n = dims.iter().product::<u64>() as usize;
        assert!(
            base.len() == n && fine.len() == n,
            "a tensor's values must match its shape"
        );
        let unchanged = base
            .iter()
            .zip(fine)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        let threads = if n >= PARALLEL_MIN_ELEMENTS {
            std::thread::available_parallelism().map_or(1, |t| t.get())
        } else {
            1
        };
        let choices = candidates(dims, unchanged);
        let candidates = measure(&choices, dims, dtype, base, fine, threads);
        let (mut fine_sq, mut delta_sq) = (0.0, 0.0);
        for (&b, &f) in base.iter().zip(fine) {
            let (b, f) = (f64::from(b), f64::from(f));
            fine_sq += f * f;
            delta_sq += (f - b) * (f - b);
        }
        self.tensors.push(Tensor {
            params: n as u64,
            fine_sq,
            delta_sq,
            candidates,
        });
    }

    /// Chooses one candidate per tensor so that a file of `meta_bytes` before its payloads
    /// stays within `max_bits` bits per parameter as a whole, with the least summed damage.
    ///
    /// # Errors
    /// [`CompressError::Budget`] when the budget is below the smallest possible file (every
    /// tensor left at the base: the header and tensor table alone), or is not a positive
    /// finite number.
    pub fn plan(self, meta_bytes: u64, max_bits: f64) -> Result<BudgetPlan, CompressError> {
        let params: u64 = self.tensors.iter().map(|t| t.params).sum();
        let budget_bytes = (max_bits * params as f64 / 8.0).floor();
        let too_small = || CompressError::Budget {
            max_bits,
            needed_bits: meta_bytes as f64 * 8.0 / params.max(1) as f64,
            needed_bytes: meta_bytes,
        };
        if !(max_bits.is_finite() && max_bits > 0.0) || budget_bytes < meta_bytes as f64 {
            return Err(too_small());
        }
        // Below 2^64 bytes: at most 2^61 params (the format's caps) times a finite `max_bits`
        // that fits them, or the saturating cast caps it where no file can reach.
        let budget_bytes = budget_bytes as u64;
        let items: Vec<Vec<Point>> = self
            .tensors
            .iter()
            .map(|t| {
                t.candidates
                    .iter()
                    .map(|c| Point {
                        cost: aligned(c.bytes),
                        loss: t.damage(self.damage, c.error),
                    })
                    .collect()
            })
            .collect();
        let s = knapsack::greedy(&items, budget_bytes - meta_bytes).ok_or_else(too_small)?;
        let tensors = self
            .tensors
            .iter()
            .zip(&s.chosen)
            .zip(&items)
            .map(|((t, &c), points)| Planned {
                choice: t.candidates[c].choice,
                params: t.params,
                payload_bytes: t.candidates[c].bytes,
                damage: points[c].loss,
            })
            .collect();
        Ok(BudgetPlan {
            tensors,
            meta_bytes,
            file_bytes: meta_bytes + s.cost,
            params,
            budget_bytes,
            damage: s.loss,
        })
    }
}

impl fmt::Display for Choice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let groups = |per_channel: bool| {
            if per_channel {
                "per channel"
            } else {
                "per tensor"
            }
        };
        match *self {
            Self::Unchanged => write!(f, "unchanged"),
            Self::Q8Tensor => write!(f, "q8-groups per tensor"),
            Self::Q8Channel => write!(f, "q8-groups per channel"),
            Self::SignChannel => write!(f, "sign-groups per channel"),
            Self::SignTensor => write!(f, "sign"),
            Self::SignPlanes {
                planes,
                per_channel,
            } => write!(f, "sign-planes k={planes} {}", groups(per_channel)),
            Self::SparseSigns {
                entries,
                per_channel,
            } => write!(f, "sparse-signs m={entries} {}", groups(per_channel)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in (-1, 1): the fractional part of a scaled sine.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                ((i as f64 * 12.9898 + seed as f64 * 78.233).sin() * 43758.5453).fract() as f32
            })
            .collect()
    }

    /// One tensor: dims, dtype, base values, fine values.
    type TestTensor = (Vec<u64>, DType, Vec<f32>, Vec<f32>);

    #[test]
    fn candidates_follow_the_shape() {
        assert_eq!(candidates(&[16, 64], true), vec![Choice::Unchanged]);
        let c = candidates(&[16, 64], false);
        // unchanged, sign, q8 per tensor, sign-groups, q8 per channel, then per tensor and per
        // channel: 2 plane counts and 3 sparse counts.
        assert_eq!(c.len(), 5 + 2 * (2 + 3));
        assert!(c.contains(&Choice::SparseSigns {
            entries: 8,
            per_channel: true
        }));
        let flat = candidates(&[100], false);
        assert_eq!(flat.len(), 3 + 2 + 3);
        assert!(!flat.contains(&Choice::Q8Channel) && !flat.contains(&Choice::SignChannel));
        // A 3-element tensor: its one block holds at most 3 entries.
        let tiny = candidates(&[3], false);
        assert!(tiny.contains(&Choice::SparseSigns {
            entries: 2,
            per_channel: false
        }));
        assert!(!tiny
            .iter()
            .any(|c| matches!(c, Choice::SparseSigns { entries: 4.., .. })));
    }

    /// Tensors of several shapes, one unchanged: (dims, dtype, base, fine).
    fn model() -> Vec<TestTensor> {
        let shapes: [&[u64]; 5] = [&[32, 3, 3, 3], &[64], &[10, 64], &[4096], &[7, 5]];
        shapes
            .iter()
            .enumerate()
            .map(|(k, dims)| {
                let n = dims.iter().product::<u64>() as usize;
                let base = values(k as u64 + 1, n);
                let noise = values(k as u64 + 100, n);
                // Tensor 3 does not change; tensor 2 is f16 (values as f16 holds them).
                let dtype = if k == 2 { DType::F16 } else { DType::F32 };
                let round = |v: f32| match dtype {
                    DType::F16 => half::f16::from_f32(v).to_f32(),
                    DType::F32 => v,
                };
                let fine = base
                    .iter()
                    .zip(&noise)
                    .map(|(&b, &d)| round(if k == 3 { b } else { b + 0.05 * d * d * d }))
                    .collect();
                let base = base.into_iter().map(round).collect();
                (dims.to_vec(), dtype, base, fine)
            })
            .collect()
    }

    #[test]
    fn plans_stay_within_budget_and_the_second_pass_matches_the_first() {
        let m = model();
        let params: u64 = m.iter().map(|t| t.2.len() as u64).sum();
        let meta = 100;
        let mut last = f64::INFINITY;
        for max_bits in [0.5, 1.0, 2.0, 4.0, 9.0] {
            let mut planner = Planner::new(Damage::Weight);
            for (dims, dtype, b, f) in &m {
                planner.add(dims, *dtype, b, f);
            }
            let plan = planner.plan(meta, max_bits).unwrap();
            assert_eq!(plan.params, params);
            assert_eq!(plan.budget_bytes, (max_bits * params as f64 / 8.0) as u64);
            assert!(plan.file_bytes <= plan.budget_bytes, "{max_bits}: {plan:?}");
            // More bits never hurt here, and the unchanged tensor costs nothing.
            assert!(plan.damage <= last, "{max_bits}: {} > {last}", plan.damage);
            last = plan.damage;
            assert_eq!(plan.tensors[3].choice, Choice::Unchanged);
            let mut file = meta;
            let (mut out, mut bytes) = (Vec::new(), Vec::new());
            for (t, (dims, dtype, b, f)) in plan.tensors.iter().zip(&m) {
                // Encoding again gives the size and the error the plan was made with.
                let enc = t.choice.encode(dims, b, f);
                assert_eq!(enc.payload_len() as u64, t.payload_bytes);
                let error = squared_error(&enc, *dtype, b, f, &mut out, &mut bytes);
                let norm: f64 = f.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
                assert_eq!(t.damage, if error == 0.0 { 0.0 } else { error / norm });
                file += aligned(t.payload_bytes);
            }
            assert_eq!(file, plan.file_bytes);
        }
        // With 9 bits a parameter, the 8-bit per-channel codec fits everywhere: no tensor is
        // worse than it.
        assert!(last > 0.0);
    }

    #[test]
    fn budget_below_the_meta_region_is_refused() {
        let m = model();
        let params: u64 = m.iter().map(|t| t.2.len() as u64).sum();
        let plan = |meta: u64, max_bits: f64| {
            let mut planner = Planner::new(Damage::Delta);
            for (dims, dtype, b, f) in &m {
                planner.add(dims, *dtype, b, f);
            }
            planner.plan(meta, max_bits)
        };
        // Exactly the meta region: every tensor at the base.
        let max_bits = 8.0 * 600.0 / params as f64;
        let p = plan(600, max_bits).unwrap();
        assert!(p.tensors.iter().all(|t| t.choice == Choice::Unchanged));
        assert_eq!(p.file_bytes, 600);
        match plan(601, max_bits) {
            Err(CompressError::Budget { needed_bytes, .. }) => assert_eq!(needed_bytes, 601),
            other => panic!("{other:?}"),
        }
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(
                matches!(plan(600, bad), Err(CompressError::Budget { .. })),
                "{bad}"
            );
        }
    }
}
