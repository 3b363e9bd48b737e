//! Running the model: its outputs on the calibration images with some tensors replaced, their
//! divergence from the fine-tune's and the top-1 agreement, and the reconstruction a device
//! computes for one encoding.

use std::ops::Range;
use std::sync::Arc;
use std::vec::Vec;

use super::{CalibError, Images};
use crate::format::{DType, Encoded};
use crate::metrics::Top1;
use crate::onnx::OnnxWeights;
use crate::tract::{Cut, InputType, Tunable};

/// Images per model run. tract runs a 1x1 convolution of an NCHW model at batch 1 as one matrix
/// product with its bias and activation fused in; at a larger batch it moves the channel axis
/// before and after each one and adds the bias apart (64 axis moves on the field family's
/// EfficientNet-Lite0). One image per run made its calibrated compress about a sixth faster and
/// the species family's no slower, with the same outputs.
const EVAL_BATCH: usize = 1;

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
    /// Mean KL divergence on the search images of the last evaluation on every image.
    pub(super) search_divergence: f64,
    /// A run of each batch of the search images part way, with the current weights.
    cut: Option<Vec<Cut>>,
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
    /// `threads` threads, for batches of [`EVAL_BATCH`] images.
    pub(super) fn new(
        fine: &[u8],
        weights: Arc<OnnxWeights>,
        values: Vec<Vec<f32>>,
        images: &'i Images,
        search: usize,
        threads: usize,
    ) -> Result<Self, CalibError> {
        let threads = threads.clamp(1, images.count.max(1));
        // The batch does not depend on `threads`, so neither do the outputs.
        let batch = EVAL_BATCH.min(search);
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
            search_divergence: 0.0,
            cut: None,
        })
    }

    /// Searches on the first `n` images from here on (the reference outputs are those of every
    /// image).
    pub(super) fn search_on(&mut self, n: usize) {
        let n = n.min(self.reference_all.len());
        if n != self.search {
            self.search = n;
            self.reference_search = self.reference_all[..n].to_vec();
            self.cut = None;
        }
    }

    /// The current values of weight `i`.
    pub(super) fn values(&self, i: usize) -> &[f32] {
        self.model.values(i)
    }

    /// Sets weights (until the next `set`). The kept cut stays when no step before it reads
    /// them.
    pub(super) fn set(&mut self, changes: &[(usize, &[f32])]) -> Result<(), CalibError> {
        let weights: Vec<usize> = changes.iter().map(|c| c.0).collect();
        let first = self.model.first_step(&weights);
        let keep = matches!((first, self.cut_step()), (Some(p), Some(s)) if s <= p);
        if !keep {
            self.cut = None;
        }
        let rebuilds = self.model.rebuilds();
        self.model.set(changes).map_err(model_error)?;
        if self.model.rebuilds() != rebuilds {
            self.cut = None;
        }
        Ok(())
    }

    /// The step of the kept cut.
    fn cut_step(&self) -> Option<usize> {
        self.cut.as_ref()?.iter().map(Cut::step).max()
    }

    /// Log-softmax outputs of the first `n` images with the current weights.
    pub(super) fn logits(&mut self, n: usize) -> Result<Vec<Vec<f64>>, CalibError> {
        self.evaluations += 1;
        let rows = self.per_batch(n, vec![(); self.batches(n).len()], |model, input, ()| {
            model.run(input).map_err(model_error)
        })?;
        self.rows(n, rows)
    }

    /// The image ranges of the batches the first `n` images run in: each thread's share of the
    /// images (in order), cut into batches of the model's batch size.
    fn batches(&self, n: usize) -> Vec<(usize, Range<usize>)> {
        let batch = self.model.input_shape()[0];
        let share = n.div_ceil(self.threads).max(1);
        (0..n)
            .step_by(share)
            .enumerate()
            .flat_map(|(t, first)| {
                let end = (first + share).min(n);
                (first..end)
                    .step_by(batch)
                    .map(move |b| (t, b..(b + batch).min(end)))
            })
            .collect()
    }

    /// `f(model, input, item)` for each batch of the first `n` images and its item of `items`
    /// (one per batch), each thread running its share's batches in order; the results in batch
    /// order. The input of a short last batch is padded with zeros.
    fn per_batch<I: Send, T: Send>(
        &self,
        n: usize,
        items: Vec<I>,
        f: impl Fn(&Tunable, &[f32], I) -> Result<T, CalibError> + Sync,
    ) -> Result<Vec<T>, CalibError> {
        let batches = self.batches(n);
        let image = self.images.image_len();
        let batch = self.model.input_shape()[0];
        let mut shares: Vec<Vec<(Range<usize>, I)>> = Vec::new();
        for ((t, range), item) in batches.into_iter().zip(items) {
            if shares.len() <= t {
                shares.push(Vec::new());
            }
            shares[t].push((range, item));
        }
        let (model, data, f) = (&self.model, &self.images.data, &f);
        std::thread::scope(|s| {
            let handles: Vec<_> = shares
                .into_iter()
                .map(|share| {
                    s.spawn(move || {
                        let mut padded = Vec::new();
                        share
                            .into_iter()
                            .map(|(range, item)| {
                                let chunk = &data[range.start * image..range.end * image];
                                let input = if range.len() == batch {
                                    chunk
                                } else {
                                    padded.clear();
                                    padded.extend_from_slice(chunk);
                                    padded.resize(batch * image, 0.0);
                                    &padded[..]
                                };
                                f(model, input, item)
                            })
                            .collect::<Result<Vec<T>, CalibError>>()
                    })
                })
                .collect();
            let mut out = Vec::new();
            for h in handles {
                out.extend(h.join().unwrap_or_else(|_| {
                    Err(CalibError::Model("an evaluation thread panicked".into()))
                })?);
            }
            Ok(out)
        })
    }

    /// The log-softmax rows of the first `n` images from the flat outputs of their batches.
    fn rows(&self, n: usize, outputs: Vec<Vec<f32>>) -> Result<Vec<Vec<f64>>, CalibError> {
        let batch = self.model.input_shape()[0];
        let mut rows = Vec::with_capacity(n);
        for ((_, range), out) in self.batches(n).into_iter().zip(outputs) {
            if out.is_empty() || out.len() % batch != 0 {
                return Err(CalibError::Model(format!(
                    "expected {batch} output rows, found {} values",
                    out.len()
                )));
            }
            rows.extend(
                out.chunks(out.len() / batch)
                    .take(range.len())
                    .map(log_softmax),
            );
        }
        Ok(rows)
    }

    /// (mean KL(reference || model), top-1 agreement) on the search images (`all`: on every
    /// image) with the weights `changes` set for this evaluation only.
    ///
    /// On the search images, only the steps of the model that read the changed weights or
    /// follow them run: the steps before come from a [`Cut`] of the search images kept between
    /// evaluations and advanced with the weights as they are. Evaluations in order of their
    /// first changed step ([`Evaluator::first_step`]) advance one cut through the model once.
    pub(super) fn measure(
        &mut self,
        changes: &[(usize, &[f32])],
        all: bool,
    ) -> Result<(f64, f64), CalibError> {
        let weights: Vec<usize> = changes.iter().map(|c| c.0).collect();
        let from = if all {
            None
        } else {
            self.model.first_step(&weights)
        };
        let saved: Vec<(usize, Vec<f32>)> = changes
            .iter()
            .map(|&(i, _)| (i, self.values(i).to_vec()))
            .collect();
        let n = if all { self.images.count } else { self.search };
        let cuts = match from {
            Some(to) => Some(self.cut_at(to)?),
            None => None,
        };
        let rebuilds = self.model.rebuilds();
        self.model.set(changes).map_err(model_error)?;
        let got = match &cuts {
            // A rebuild may have changed the plan the cuts belong to.
            Some(cuts) if self.model.rebuilds() == rebuilds => {
                self.evaluations += 1;
                self.per_batch(n, cuts.iter().collect(), |model, _, cut| {
                    model.finish(cut).map_err(model_error)
                })
                .and_then(|out| self.rows(n, out))
            }
            _ => self.logits(n),
        };
        let back: Vec<(usize, &[f32])> = saved.iter().map(|(i, v)| (*i, &v[..])).collect();
        self.model.set(&back).map_err(model_error)?;
        if self.model.rebuilds() == rebuilds {
            self.cut = cuts;
        }
        let got = got?;
        let reference = if all {
            &self.reference_all
        } else {
            &self.reference_search
        };
        let mut kl = 0f64;
        let mut agree = Top1::new();
        for (k, (r, q)) in reference.iter().zip(&got).enumerate() {
            if k == self.search && all {
                self.search_divergence = kl.max(0.0) / self.search.max(1) as f64;
            }
            kl += r
                .iter()
                .zip(q)
                .map(|(&lp, &lq)| lp.exp() * (lp - lq))
                .sum::<f64>();
            // Top-1 agreement: the fine-tune's classes are the labels.
            agree.add(Some(argmax(q)), argmax(r) as i64);
        }
        if all && self.search >= n {
            self.search_divergence = kl.max(0.0) / n as f64;
        }
        Ok((kl.max(0.0) / n as f64, agree.accuracy()))
    }

    /// The first step of the model that reads any of the weights `weights` or follows one
    /// (`usize::MAX` when not known): the order in which evaluations share one cut.
    pub(super) fn first_step(&self, weights: &[usize]) -> usize {
        self.model.first_step(weights).unwrap_or(usize::MAX)
    }

    /// The kept cut of the search images, advanced to step `to` with the current weights (from
    /// a new run when the kept one is past `to`).
    fn cut_at(&mut self, to: usize) -> Result<Vec<Cut>, CalibError> {
        let n = self.search;
        let cuts = match self.cut.take() {
            Some(c) if c.iter().all(|c| c.step() <= to) => c,
            _ => {
                let empty = (0..self.batches(n).len()).map(|_| ()).collect();
                self.per_batch(n, empty, |model, input, ()| {
                    model.start(input).map_err(model_error)
                })?
            }
        };
        self.per_batch(n, cuts, |model, _, cut| {
            model.advance(cut, to).map_err(model_error)
        })
    }
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
