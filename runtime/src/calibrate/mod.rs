//! Calibration-driven codec choice: spend the bits of a delta where the model's outputs need them.
//!
//! The data-free rule ([`crate::compress::auto_codec`]) decides from shapes alone. On a small
//! model that is both wasteful and lossy: a domain shift rewrites a few early filters, where one
//! sign bit is fatal, and barely moves many large late tensors, where even "no delta at all"
//! costs less output error than signs cost bits. Which tensors matter depends on the variant,
//! so this module measures it on a few unlabelled images from the variant's own domain:
//!
//! 0. **Inputs.** The fine-tuned model runs once over the calibration images (a few images per
//!    run, one run per thread at a time) and every convolution and fully connected weight's
//!    inputs are summed as they pass: `Σ x xᵀ` and `Σ x` per layer (per group of a grouped
//!    convolution; a convolution on at most 1024 positions of each image, on a regular stride),
//!    each layer by one thread in image order. Memory is bounded by the layers' sums, not by the
//!    number of images.
//! 1. **Score.** Every tensor's candidate encodings (unchanged; sign per tensor or per output
//!    channel, and 2 or 3 sign planes, each with a few scale multipliers; sparse signs with 2, 4
//!    or 8 entries per 64-element block; 8-bit per tensor or per channel; for tensors of at
//!    most 4096 elements the fine-tune's values in f16 and in f32) are scored by their
//!    layer's output error `Σ e H eᵀ` (`e` the weight error, `H` the inputs' second moments);
//!    sign encodings choose their bits by that error (GPTQ with the codec's levels,
//!    [`codec::OutputRounding`]), and one-plane ones then refit each scale to those bits. A layer's bias follows its weight: it corrects the weight's
//!    mean output error (8-bit). The layers' sums are freed here, before the model is built.
//! 2. **Reference.** The fine-tuned model's softmax outputs on the calibration images.
//! 3. **Sensitivity.** Two whole-model evaluations per tensor, with only that tensor at the
//!    candidate nearest one bit and at the base, give the KL divergence a unit of its layer
//!    error costs; every candidate's divergence is predicted from it. Then, for a few rounds
//!    (**Measure**), the candidates the greedy plan (4.) would choose and their next upgrades
//!    are measured alone in the model, replacing their predictions and rescaling their
//!    neighbours'. On large images these evaluations use half the search images (8 of 16 at
//!    224x224 RGB).
//! 4. **Budget.** A greedy multiple-choice knapsack on those divergences: starting from the
//!    cheapest encoding of every tensor, take the upgrade with the largest divergence reduction
//!    per byte (on each tensor's lower convex hull) while the whole file fits the budget.
//! 5. **Refine.** Divergences do not add up exactly, so the tensors with the largest predicted
//!    divergence revisit their neighbours on the hull (in model order) with every other tensor
//!    at its planned encoding, minimising divergence + lambda * bytes within the budget, on
//!    every search image.
//! 6. **Re-round in context.** Each output-rounded layer's error was scored on the fine-tune's
//!    inputs, but in the planned model it receives the inputs the encoded layers before it
//!    give. In model order, every such layer is rounded again, with its chosen encoding (the
//!    file size does not change), to the weights that best give the fine-tune's outputs from
//!    the inputs it now receives: `W = W_f + W_f (Σ y xᵀ - Σ x xᵀ)(Σ x xᵀ)⁻¹` (`x` its inputs
//!    in the planned model, `y` in the fine-tune; sequential GPTQ with an asymmetric target),
//!    and its bias corrects the mean output error from those inputs. Both models run once over
//!    the images side by side ([`crate::tract::Cut`]s advanced layer by layer; `context.rs`):
//!    a few images from the first layer, more joining as the layers' inputs shrink (so that
//!    the cuts' memory stays bounded), every image for the last ones. The plan keeps the
//!    result when its divergence on the search images is lower than after refinement.
//! 7. **Confirm.** The planned model on all images: top-1 agreement with the fine-tune and the
//!    divergence, reported as the expected agreement. After stage 6 these are images the
//!    rounding fit, so the agreement is optimistic for new images.
//!
//! Whole-model evaluations run on [`crate::tract::Tunable`]: the model is built once, shared by
//! the threads, and its weights are rewritten in place. On the search images an evaluation runs
//! only the steps of the model from the first one that reads a changed weight: the steps before
//! come from a [`crate::tract::Cut`] of the search images kept between evaluations. Sensitivity,
//! measurement and refinement go through the tensors in model order, so one cut advances
//! through the model once per stage, and an evaluation costs the part of a forward pass after
//! its tensor. The outputs are the same bits as a whole run's. Encodings are the crate's codecs
//! with their normal encoders, so the plan's reconstructions are exactly what a device rebuilds.
//!
//! The module is split by stage: [`plan`](plan()) runs the search (candidates, the knapsack and
//! the refinement; `plan.rs`), `statistics.rs` measures the layers' inputs for output-aware
//! rounding, `context.rs` runs the layers in context for stage 6, `evaluation.rs` runs the model and compares its outputs with the reference (the
//! counts through [`crate::metrics`]). This file holds the public types and the stages' thread
//! pool ([`parallel`]).
//!
//! May depend on: `std`, `tract-onnx` and `prost` (running and reading the ONNX model),
//! [`crate::codec`] (the encoders and output-aware rounding), [`crate::format`] (the file size),
//! [`crate::compress`] (pairing the base's and the fine-tune's tensors, the values a device
//! stores for an encoding, payload alignment), [`crate::knapsack`], [`crate::onnx`],
//! [`crate::tract`] and [`crate::metrics`].

use std::collections::BTreeMap;
use std::fmt;
use std::string::String;
use std::vec::Vec;

use crate::format::{Codec, Encoded};

mod context;
mod evaluation;
mod plan;
mod statistics;
#[cfg(test)]
mod tests;

pub use evaluation::reconstruct_encoded;
pub use plan::plan;

/// Multipliers tried on the scales of sign encodings (1 = the mean |d| of the seed recipe).
pub const SIGN_MULTIPLIERS: [f64; 3] = [1.0, 1.25, 1.5];

/// Plane counts tried with the `sign-planes` codec (2 and 3 bits per element).
pub const SIGN_PLANES: [usize; 2] = [2, 3];

/// Rounds of measuring, alone in the model, the candidates the greedy plan chooses and their
/// next upgrades (at most two evaluations per tensor and round).
pub const MEASURE_ROUNDS: usize = 2;

/// Entries per 64-element block tried with the `sparse-signs` codec (1/4, 1/2 and 1 bit per
/// element, plus the scales).
pub const SPARSE_ENTRIES: [usize; 3] = [2, 4, 8];

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
    /// Images used while searching (the first ones; all are used to confirm). `None`: 64, fewer
    /// for large images (at least 16), so that an evaluation costs about the same on every model;
    /// then the candidates alone in the model are measured on half as many for the largest
    /// images (at least 8).
    pub search_images: Option<usize>,
    /// Passes of in-context refinement.
    pub refine_rounds: usize,
    /// Tensors revisited in context per pass (those with the largest expected divergence).
    pub refine_tensors: usize,
    /// Threads (at least 1): layers' statistics and candidates are shared out among them, and
    /// every model evaluation runs its images on all of them. The plan does not depend on it.
    pub threads: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_bits: 1.5,
            target_retention: None,
            search_images: None,
            refine_rounds: 1,
            refine_tensors: 24,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Search stages, for progress reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Measuring the inputs of every layer of the fine-tuned model (for output-aware rounding).
    Inputs,
    /// Scoring every tensor's candidate encodings by their layer's output error.
    Score,
    /// Building the model and running the fine-tune on the images.
    Reference,
    /// Measuring each tensor's candidates in isolation.
    Sensitivity,
    /// Measuring the candidates the plan would choose and their next upgrades.
    Measure,
    /// Choosing the budget for a target agreement.
    Target,
    /// Revisiting choices in the planned model.
    Refine,
    /// Measuring the layers' inputs in the planned model and rounding again to them.
    Reround,
    /// Measuring the plan on every image.
    Confirm,
}

impl Stage {
    /// Lowercase name.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Inputs => "inputs",
            Self::Score => "score",
            Self::Reference => "reference",
            Self::Sensitivity => "sensitivity",
            Self::Measure => "measure",
            Self::Target => "target",
            Self::Refine => "refine",
            Self::Reround => "reround",
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
    /// Images the search refined the plan on (the first ones).
    pub search_images: usize,
    /// Images each candidate was measured alone on (the first ones; at most `search_images`).
    pub screen_images: usize,
    /// Model evaluations the search ran.
    pub evaluations: usize,
    /// Tensors whose sign encodings were rounded to their outputs (GPTQ): the weights a
    /// convolution or fully connected layer multiplies, when their inputs could be measured.
    pub output_rounded: usize,
    /// Of those, the layers rounded again in context in the plan (see the module's stage 6); 0
    /// when that did not lower the divergence on the search images.
    pub rerounded: usize,
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

/// Runs `f(i)` for `i` in `0..n` on `threads` threads (each taking the next index), calls
/// `done(count)` on this thread as results come in, and returns the results in index order.
fn parallel<T: Send>(
    n: usize,
    threads: usize,
    f: impl Fn(usize) -> T + Sync,
    mut done: impl FnMut(usize),
) -> Vec<T> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..threads.clamp(1, n.max(1)) {
            let tx = tx.clone();
            let (next, f) = (&next, &f);
            s.spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || tx.send((i, f(i))).is_err() {
                    break;
                }
            });
        }
        drop(tx);
        let mut out: Vec<Option<T>> = (0..n).map(|_| None).collect();
        for (k, (i, t)) in rx.iter().enumerate() {
            out[i] = Some(t);
            done(k + 1);
        }
        out.into_iter()
            .map(|t| t.expect("every index ran"))
            .collect()
    })
}
