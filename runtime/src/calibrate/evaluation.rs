//! Running the model: its outputs on the calibration images with some tensors replaced, their
//! divergence from the fine-tune's and the top-1 agreement, and the reconstruction a device
//! computes for one encoding.

use std::vec;
use std::vec::Vec;

use super::plan::Tensor;
use super::{CalibError, Images};
use crate::apply;
use crate::compose::{self, Base};
use crate::format::{DType, Encoded};
use crate::metrics::Top1;
use crate::tract::Classifier;

/// Runs the fine-tuned model with some tensors replaced.
pub(super) struct Evaluator {
    pub(super) model: Vec<u8>,
    pub(super) images: Images,
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

impl Evaluator {
    pub(super) fn logits(&mut self, n: usize) -> Result<Vec<Vec<f64>>, CalibError> {
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
    pub(super) fn measure<'b>(
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

pub(super) fn stored(dtype: DType, values: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; values.len() * dtype.size()];
    apply::store(dtype, values, &mut out);
    out
}
