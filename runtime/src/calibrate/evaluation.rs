//! Running the model: its outputs on the calibration images with some tensors replaced, their
//! divergence from the fine-tune's and the top-1 agreement, and the reconstruction a device
//! computes for one encoding.

use std::sync::Arc;
use std::vec::Vec;

use super::{CalibError, Images};
use crate::format::{DType, Encoded};
use crate::metrics::Top1;
use crate::onnx::OnnxWeights;
use crate::tract::{InputType, Tunable};

/// Input values per model run: the evaluation batch is this over the image size.
const EVAL_VALUES: usize = 1 << 20;

/// Largest evaluation batch.
const EVAL_BATCH: usize = 64;

/// The fine-tuned model with some tensors replaced, run on every thread: one model
/// ([`Tunable`], its weights rewritten in place between evaluations), each thread running its
/// share of the images through it.
pub(super) struct Evaluator<'i> {
    model: Tunable,
    threads: usize,
    images: &'i Images,
    /// Images used while searching (the first ones).
    pub(super) search: usize,
    pub(super) reference_search: Vec<Vec<f64>>,
    pub(super) reference_all: Vec<Vec<f64>>,
    pub(super) evaluations: usize,
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

fn model_error(e: impl std::fmt::Display) -> CalibError {
    CalibError::Model(format!("{e:#}"))
}

impl<'i> Evaluator<'i> {
    /// Builds the fine-tuned model `fine` (weights `weights` with values `values`), run on
    /// `threads` threads, for batches of at most half the `search` images.
    pub(super) fn new(
        fine: &[u8],
        weights: Arc<OnnxWeights>,
        values: Vec<Vec<f32>>,
        images: &'i Images,
        search: usize,
        threads: usize,
    ) -> Result<Self, CalibError> {
        let threads = threads.clamp(1, images.count.max(1));
        // Half the search images in as few runs as the batch limit allows, as even as can be.
        // The batch does not depend on `threads`, so neither do the outputs.
        let half = search.div_ceil(2);
        let most = (EVAL_VALUES / images.image_len().max(1)).clamp(1, EVAL_BATCH);
        let batch = half.div_ceil(half.div_ceil(most));
        let model = Tunable::new(
            fine,
            weights,
            values,
            &images.batch_shape(batch),
            InputType::F32,
        )
        .map_err(model_error)?;
        Ok(Self {
            model,
            threads,
            images,
            search,
            reference_search: Vec::new(),
            reference_all: Vec::new(),
            evaluations: 0,
        })
    }

    /// The current values of weight `i`.
    pub(super) fn values(&self, i: usize) -> &[f32] {
        self.model.values(i)
    }

    /// Sets weights (until the next `set`).
    pub(super) fn set(&mut self, changes: &[(usize, &[f32])]) -> Result<(), CalibError> {
        self.model.set(changes).map_err(model_error)
    }

    /// Log-softmax outputs of the first `n` images with the current weights.
    pub(super) fn logits(&mut self, n: usize) -> Result<Vec<Vec<f64>>, CalibError> {
        self.evaluations += 1;
        let image = self.images.image_len();
        let share = n.div_ceil(self.threads);
        let data = &self.images.data[..n * image];
        let model = &self.model;
        let rows = std::thread::scope(|s| {
            let handles: Vec<_> = data
                .chunks(share.max(1) * image)
                .map(|part| s.spawn(move || run_share(model, part, image)))
                .collect();
            let mut rows = Vec::with_capacity(n);
            for h in handles {
                rows.extend(h.join().unwrap_or_else(|_| {
                    Err(CalibError::Model("an evaluation thread panicked".into()))
                })?);
            }
            Ok::<_, CalibError>(rows)
        })?;
        Ok(rows)
    }

    /// (mean KL(reference || model), top-1 agreement) on the search images (`all`: on every
    /// image) with the weights `changes` set for this evaluation only.
    pub(super) fn measure(
        &mut self,
        changes: &[(usize, &[f32])],
        all: bool,
    ) -> Result<(f64, f64), CalibError> {
        let saved: Vec<(usize, Vec<f32>)> = changes
            .iter()
            .map(|&(i, _)| (i, self.values(i).to_vec()))
            .collect();
        self.set(changes)?;
        let n = if all { self.images.count } else { self.search };
        let got = self.logits(n);
        let back: Vec<(usize, &[f32])> = saved.iter().map(|(i, v)| (*i, &v[..])).collect();
        self.set(&back)?;
        let got = got?;
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

/// Runs `part` (whole images) through `w` batch by batch; the last batch is padded with zeros
/// and only its real rows are kept.
fn run_share(w: &Tunable, part: &[f32], image: usize) -> Result<Vec<Vec<f64>>, CalibError> {
    let batch = w.input_shape()[0];
    let mut rows = Vec::with_capacity(part.len() / image);
    let mut padded = Vec::new();
    for chunk in part.chunks(batch * image) {
        let n = chunk.len() / image;
        let input = if n == batch {
            chunk
        } else {
            padded.clear();
            padded.extend_from_slice(chunk);
            padded.resize(batch * image, 0.0);
            &padded[..]
        };
        let out = w.run(input).map_err(model_error)?;
        if out.is_empty() || out.len() % batch != 0 {
            return Err(CalibError::Model(format!(
                "expected {batch} output rows, found {} values",
                out.len()
            )));
        }
        rows.extend(out.chunks(out.len() / batch).take(n).map(log_softmax));
    }
    Ok(rows)
}

/// The reconstruction of `enc` applied to `base` (the path a device uses), as f32 values.
pub fn reconstruct_encoded(base: &[f32], enc: &Encoded) -> Vec<f32> {
    stored(DType::F32, base, enc)
}

/// The values a tensor of `dtype` holds with `enc` applied to `base` (f16: rounded to nearest).
pub(super) fn stored(dtype: DType, base: &[f32], enc: &Encoded) -> Vec<f32> {
    let (mut out, mut bytes) = (Vec::new(), Vec::new());
    crate::compress::stored_values(enc, dtype, base, &mut out, &mut bytes);
    out
}
