//! Weights as tract reads them: base plus deltas reconstructed chunk by chunk, for the data
//! resolver of a cold build ([`Rebuilder`]), the fingerprint of rebuilt weights, the values
//! written into a running model's sites, and the decoys a plan for switching is built with.
//!
//! Depends on the format, composition and apply modules; tract only through its data-resolver
//! trait. Every weight reaches tract as f32 (f16 weights are widened with their graph, see
//! [`super::widen`]), each reconstructed value rounded to its stored type first.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::vec::Vec;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{ensure, format_err};

use crate::apply::{self, base_view};
use crate::compose;
use crate::fingerprint::{Fingerprint, Fingerprinter};
use crate::format::{DType, DeltaFile, Payload};
use crate::onnx::OnnxWeights;

/// The checked payloads of weight `i` in `deltas`, with their alphas.
pub(super) fn payloads<'d>(
    weights: &OnnxWeights,
    deltas: &[(DeltaFile<'d>, f32)],
    i: usize,
) -> TractResult<Vec<(Payload<'d>, f32)>> {
    deltas
        .iter()
        .map(|(f, a)| {
            let e = f.tensor(i).ok_or_else(|| {
                format_err!(
                    "tensor {:?} is missing from the delta",
                    weights.initializers[i].name
                )
            })?;
            Ok((e.payload().map_err(|e| format_err!("{e}"))?, *a))
        })
        .collect()
}

/// Elements `first..first + out.len()` of weight `i` with the checked `payloads` applied, as
/// the applied model stores them (an f16 weight's values rounded to f16).
pub(super) fn reconstruct_at(
    base: &[u8],
    weights: &OnnxWeights,
    i: usize,
    payloads: &[(Payload<'_>, f32)],
    first: usize,
    out: &mut [f32],
) -> TractResult<()> {
    let init = &weights.initializers[i];
    compose::reconstruct_at(base_view(base, init), payloads, first, out)
        .map_err(|e| format_err!("{e}"))?;
    init.dtype.round(out);
    Ok(())
}

/// Fingerprint of the base with `deltas` applied, chunk by chunk (weights the deltas leave
/// unchanged are hashed straight from the base).
pub(super) fn rebuilt_fingerprint(
    base: &[u8],
    weights: &OnnxWeights,
    deltas: &[(DeltaFile<'_>, f32)],
) -> TractResult<Fingerprint> {
    let mut fp = Fingerprinter::new();
    let (mut values, mut stored) = (Vec::new(), Vec::new());
    for (i, init) in weights.initializers.iter().enumerate() {
        let p = payloads(weights, deltas, i)?;
        if p.iter().all(|(p, _)| matches!(p, Payload::Unchanged)) {
            fp.add(&init.name, init.dtype, &init.dims, &base[init.data.clone()]);
            continue;
        }
        fp.begin(&init.name, init.dtype, &init.dims, init.data.len() as u64);
        stored_chunks(
            base,
            weights,
            i,
            &p,
            init.dtype,
            &mut values,
            &mut stored,
            |_, bytes| {
                fp.update(bytes);
            },
        )?;
    }
    Ok(fp.finish())
}

/// Weight `i` with the checked `payloads` applied, stored as `dtype` (its own in the model's
/// file, f32 for tract), chunk by chunk: `f(byte offset, bytes)` for each chunk (`values` and
/// `stored` are scratch buffers).
#[allow(clippy::too_many_arguments)]
pub(super) fn stored_chunks(
    base: &[u8],
    weights: &OnnxWeights,
    i: usize,
    payloads: &[(Payload<'_>, f32)],
    dtype: DType,
    values: &mut Vec<f32>,
    stored: &mut Vec<u8>,
    mut f: impl FnMut(usize, &[u8]),
) -> TractResult<()> {
    let n = weights.initializers[i].numel() as usize;
    let width = dtype.size();
    let mut at = 0;
    while at < n {
        let len = CHUNK.min(n - at);
        values.resize(len, 0.0);
        reconstruct_at(base, weights, i, payloads, at, values)?;
        stored.resize(len * width, 0);
        apply::store(dtype, values, stored);
        f(at * width, stored);
        at += len;
    }
    Ok(())
}

/// Elements reconstructed at a time.
pub(super) const CHUNK: usize = 1 << 16;

/// Elements `first..first + out.len()` of the stand-in values a model is built with for weight
/// `i` when its true values are all equal: distinct per weight and per element, finite, neither
/// 0 nor 1, so that tract's optimizer keeps the weight as a constant of its own, as it does for
/// a fine-tuned variant's values.
pub(super) fn decoy(i: usize, first: usize, out: &mut [f32]) {
    for (j, o) in out.iter_mut().enumerate() {
        let k = (first + j) as u64 ^ ((i as u64) << 32);
        let h = k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 41; // 23 bits
        *o = 1.5 + h as f32 / (1u32 << 23) as f32 * 0.25;
    }
}

/// tract's data resolver for a build: each weight (marked as external data by
/// [`crate::onnx::without_weights`], offset = its index) is reconstructed from the base and the
/// deltas when tract reads it, so the decoded model never holds a second copy of the weights.
pub(super) struct Rebuilder {
    pub(super) base: Arc<dyn AsRef<[u8]> + Send + Sync>,
    pub(super) weights: Arc<OnnxWeights>,
    pub(super) deltas: Vec<(Arc<[u8]>, f32)>,
    /// Weights given as [`decoy`] values.
    pub(super) decoys: BTreeSet<usize>,
}

impl tract_onnx::data_resolver::ModelDataResolver for Rebuilder {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        _path: &std::path::Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        let base = (*self.base).as_ref();
        let init = self
            .weights
            .initializers
            .get(offset)
            .ok_or_else(|| format_err!("no weight {offset}"))?;
        // Every weight reaches tract as f32 (f16 weights are widened with their graph).
        let size = init.numel() as usize * 4;
        ensure!(
            length.is_none_or(|l| l == size),
            "weight {:?}: asked for {length:?} bytes",
            init.name
        );
        let files = self
            .deltas
            .iter()
            .map(|(b, a)| Ok((DeltaFile::parse(b).map_err(|e| format_err!("{e}"))?, *a)))
            .collect::<TractResult<Vec<_>>>()?;
        buf.clear();
        buf.resize(size, 0);
        if self.decoys.contains(&offset) {
            let mut values = vec![0f32; init.numel() as usize];
            decoy(offset, 0, &mut values);
            apply::store(DType::F32, &values, buf);
            return Ok(());
        }
        let p = payloads(&self.weights, &files, offset)?;
        let (mut values, mut stored) = (Vec::new(), Vec::new());
        stored_chunks(
            base,
            &self.weights,
            offset,
            &p,
            DType::F32,
            &mut values,
            &mut stored,
            |at, bytes| buf[at..at + bytes.len()].copy_from_slice(bytes),
        )
    }
}
