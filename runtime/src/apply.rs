//! Applying deltas to an ONNX base: binding checks, reconstruction, and the rebuilt model.

use std::fmt;
use std::string::String;
use std::vec::Vec;

use crate::compose::{self, Base, ComposeError};
use crate::fingerprint::{short_hex, Fingerprint, Fingerprinter};
use crate::format::{DType, DeltaFile, Payload};
use crate::onnx::{Initializer, OnnxWeights};
use crate::FormatError;

/// Why deltas could not be applied to a base.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ApplyError {
    /// A delta's bytes are bad.
    Format {
        /// Which delta (position in the list).
        delta: usize,
        /// Tensor name, when the problem is in one tensor.
        tensor: Option<String>,
        /// The problem.
        error: FormatError,
    },
    /// The delta was made against another base.
    WrongBase {
        /// Which delta.
        delta: usize,
        /// Base fingerprint in the delta's manifest.
        expected: Fingerprint,
        /// Fingerprint of the base given.
        found: Fingerprint,
    },
    /// The delta and the base do not have the same tensors.
    TensorSet {
        /// Which delta.
        delta: usize,
        /// The first name that differs.
        name: String,
        /// What differs.
        what: &'static str,
    },
    /// Composition failed.
    Compose(ComposeError),
    /// The rebuilt weights do not hash to the manifest's result fingerprint.
    ResultMismatch {
        /// From the manifest.
        expected: Fingerprint,
        /// Computed.
        found: Fingerprint,
    },
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Format {
                delta: _,
                tensor: Some(t),
                error,
            } => write!(f, "tensor {t:?}: {error}"),
            Self::Format { error, .. } => write!(f, "{error}"),
            Self::WrongBase {
                expected, found, ..
            } => write!(
                f,
                "wrong base model: the delta expects base fingerprint {}, found {}",
                short_hex(expected, 8),
                short_hex(found, 8)
            ),
            Self::TensorSet { name, what, .. } => write!(f, "tensor {name:?} {what}"),
            Self::Compose(e) => write!(f, "{e}"),
            Self::ResultMismatch { expected, found } => write!(
                f,
                "rebuilt weights do not match the delta: expected fingerprint {}, found {}",
                short_hex(expected, 8),
                short_hex(found, 8)
            ),
        }
    }
}

impl std::error::Error for ApplyError {}

/// Checks that `delta` binds to this base: fingerprint, then the exact tensor set, dtypes, shapes.
pub fn check_binding(
    delta: &DeltaFile<'_>,
    index: usize,
    base: &OnnxWeights,
    base_fp: &Fingerprint,
) -> Result<(), ApplyError> {
    let expected = delta.manifest().base_fingerprint;
    if &expected != base_fp {
        return Err(ApplyError::WrongBase {
            delta: index,
            expected,
            found: *base_fp,
        });
    }
    // Both lists are sorted by name; a matching fingerprint makes a mismatch here unlikely, but a
    // crafted delta must not get past this point with a different table.
    check_tensor_set(
        index,
        base.initializers
            .iter()
            .map(|i| (i.name.as_str(), i.dtype, i.dims.as_slice())),
        delta
            .tensors()
            .map(|e| (e.name, e.dtype, e.dims().map(u64::from))),
    )
}

/// The tensor-set rule (`docs/FORMAT.md` §11): the delta's entries are exactly the base's
/// tensors, in the same order, with the same dtypes and shapes. `index` names the delta in
/// errors.
pub fn check_tensor_set<'b, 'd, D: Iterator<Item = u64>>(
    index: usize,
    base: impl IntoIterator<Item = (&'b str, DType, &'b [u64])>,
    mut entries: impl Iterator<Item = (&'d str, DType, D)>,
) -> Result<(), ApplyError> {
    let set = |name: &str, what| {
        Err(ApplyError::TensorSet {
            delta: index,
            name: name.into(),
            what,
        })
    };
    for (name, dtype, dims) in base {
        let Some((e_name, e_dtype, e_dims)) = entries.next() else {
            return set(name, "is missing from the delta");
        };
        if e_name != name {
            return set(
                e_name,
                "is in the delta but not in the base (or names differ)",
            );
        }
        if e_dtype != dtype {
            return set(e_name, "has another dtype in the base");
        }
        if !e_dims.eq(dims.iter().copied()) {
            return set(e_name, "has another shape in the base");
        }
    }
    if let Some((e_name, _, _)) = entries.next() {
        return set(e_name, "is in the delta but not in the base");
    }
    Ok(())
}

/// The base tensor's values as stored in the model file.
pub fn base_view<'a>(model: &'a [u8], init: &Initializer) -> Base<'a> {
    match init.dtype {
        DType::F32 => Base::F32Le(&model[init.data.clone()]),
        DType::F16 => Base::F16Le(&model[init.data.clone()]),
    }
}

/// Writes f32 values in the stored dtype (f16 bases are rounded back to f16).
pub fn store(dtype: DType, values: &[f32], out: &mut [u8]) {
    match dtype {
        DType::F32 => out.copy_from_slice(bytemuck::cast_slice(values)),
        DType::F16 => {
            for (o, v) in out.chunks_exact_mut(2).zip(values) {
                o.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
    }
}

/// A base model with deltas applied.
#[derive(Clone, Debug)]
pub struct Applied {
    /// The rebuilt ONNX file.
    pub model: Vec<u8>,
    /// Fingerprint of the rebuilt weights.
    pub fingerprint: Fingerprint,
}

/// Reconstructs every weight of `base` with `deltas` (each with its alpha) and calls
/// `sink(initializer, stored bytes)` in name order. Checks binding and payloads first, tensor by
/// tensor, and returns the fingerprint of the rebuilt weights.
pub fn rebuild(
    base: &[u8],
    weights: &OnnxWeights,
    deltas: &[(&DeltaFile<'_>, f32)],
    sink: impl FnMut(&Initializer, &[u8]),
) -> Result<Fingerprint, ApplyError> {
    let found = rebuild_unchecked(base, weights, deltas, sink)?;
    check_result(deltas, found)?;
    Ok(found)
}

/// A single delta at alpha 1 carries the fingerprint of its result: the rebuilt weights'
/// fingerprint `found` must be it. Soups and other alphas have no expected result.
pub fn check_result<'d, D: core::borrow::Borrow<DeltaFile<'d>>>(
    deltas: &[(D, f32)],
    found: Fingerprint,
) -> Result<(), ApplyError> {
    if let [(d, alpha)] = deltas {
        let expected = d.borrow().manifest().result_fingerprint;
        if *alpha == 1.0 && expected != found {
            return Err(ApplyError::ResultMismatch { expected, found });
        }
    }
    Ok(())
}

/// [`rebuild`] without comparing the result to the manifest's result fingerprint (used while
/// writing a delta, before that fingerprint exists).
pub fn rebuild_unchecked(
    base: &[u8],
    weights: &OnnxWeights,
    deltas: &[(&DeltaFile<'_>, f32)],
    sink: impl FnMut(&Initializer, &[u8]),
) -> Result<Fingerprint, ApplyError> {
    let base_fp = weights.fingerprint(base);
    let fp = rebuild_with(base, weights, &base_fp, deltas, true, sink)?;
    Ok(fp.expect("hashing was asked for"))
}

/// The rebuild loop for callers that already know the base fingerprint (an engine computes it
/// once). Binding and every payload checksum are checked; the rebuilt weights are hashed only
/// when `hash` is set (it is a full pass over the weights).
pub fn rebuild_with(
    base: &[u8],
    weights: &OnnxWeights,
    base_fp: &Fingerprint,
    deltas: &[(&DeltaFile<'_>, f32)],
    hash: bool,
    mut sink: impl FnMut(&Initializer, &[u8]),
) -> Result<Option<Fingerprint>, ApplyError> {
    for (k, (d, _)) in deltas.iter().enumerate() {
        check_binding(d, k, weights, base_fp)?;
    }
    let mut fp = Fingerprinter::new();
    let mut values = Vec::new();
    let mut stored = Vec::new();
    let mut payloads: Vec<(Payload<'_>, f32)> = Vec::with_capacity(deltas.len());
    for (i, init) in weights.initializers.iter().enumerate() {
        payloads.clear();
        for (k, (d, alpha)) in deltas.iter().enumerate() {
            let e = d.tensor(i).ok_or_else(|| ApplyError::TensorSet {
                delta: k,
                name: init.name.clone(),
                what: "is missing from the delta",
            })?;
            let p = e.payload().map_err(|error| ApplyError::Format {
                delta: k,
                tensor: Some(init.name.clone()),
                error,
            })?;
            payloads.push((p, *alpha));
        }
        values.resize(init.numel() as usize, 0.0);
        compose::reconstruct(base_view(base, init), &payloads, &mut values)
            .map_err(ApplyError::Compose)?;
        stored.resize(init.data.len(), 0);
        store(init.dtype, &values, &mut stored);
        if hash {
            fp.add(&init.name, init.dtype, &init.dims, &stored);
        }
        sink(init, &stored);
    }
    Ok(hash.then(|| fp.finish()))
}

/// Applies `deltas` to the ONNX `base`: the output is the base file with every float initializer's
/// data replaced by its reconstruction, all other bytes identical.
pub fn apply_onnx(
    base: &[u8],
    weights: &OnnxWeights,
    deltas: &[(&DeltaFile<'_>, f32)],
) -> Result<Applied, ApplyError> {
    let mut model = base.to_vec();
    let fingerprint = rebuild(base, weights, deltas, |init, bytes| {
        model[init.data.clone()].copy_from_slice(bytes);
    })?;
    Ok(Applied { model, fingerprint })
}
