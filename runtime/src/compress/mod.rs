//! Compressing a fine-tuned ONNX model against its base into a delta, one tensor at a time.
//!
//! A [`Policy`] chooses each tensor's codec: per tensor by its shape ([`Policy::Seed`],
//! [`Policy::Auto`]), or over the whole model within a size budget ([`Policy::Budget`], in
//! `budget.rs`: a first pass measures every tensor's candidates, a knapsack chooses, a second
//! pass encodes). None of them needs data.

use std::fmt;
use std::string::String;
use std::vec::Vec;

use crate::apply::{self, ApplyError};
use crate::codec;
use crate::format::{
    write_delta, Codec, DType, DeltaFile, DeltaWriter, Encoded, Manifest, TensorRecord,
    TensorShape, WriteError, DEFAULT_ALIGN,
};
use crate::onnx::{Initializer, OnnxWeights};

mod budget;
pub(crate) use budget::{aligned, stored_values};

pub use budget::{
    candidates, BudgetPlan, Damage, Planned, Planner, BUDGET_PLANES, BUDGET_SPARSE_ENTRIES,
};

/// How codecs are chosen per tensor.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// The literal seed recipe (ZIP-0427): `sign` with one mean-abs scale on every float tensor.
    Seed,
    /// The data-free default rule (see [`auto_codec`]).
    Auto,
    /// The data-free budgeted policy: every tensor's [`candidates`] (all codecs but the raw
    /// ones) scored by their weight error weighed by [`Budget::damage`], one chosen per tensor
    /// so that the whole file (header, table, names and payloads) stays within
    /// [`Budget::max_bits`] bits per parameter with the least summed damage ([`Planner`]).
    Budget(Budget),
}

/// The budget of [`Policy::Budget`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Budget {
    /// Largest average bits per parameter over the whole delta file.
    pub max_bits: f64,
    /// How tensors' weight errors are weighed against each other.
    pub damage: Damage,
}

/// An encoding of one tensor: what the data-free rule picks for a tensor of its shape (see
/// `docs/FORMAT.md`), or one of the budgeted policy's [`candidates`]. Scales are f16 where they
/// are representable, per output channel (`dims[0]`) or per tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// No change.
    Unchanged,
    /// 8-bit deltas with one f16 scale per tensor (biases, 1-D tensors).
    Q8Tensor,
    /// 8-bit deltas with one f16 scale per output channel (small tensors, <= 4096 elements).
    Q8Channel,
    /// Sign bits with one f16 scale per output channel (>= 64 elements per channel).
    SignChannel,
    /// Sign bits with one scale per tensor.
    SignTensor,
    /// `planes` sign bit-planes with least-squares scales.
    SignPlanes {
        /// Planes (bits per element), 2 to 8.
        planes: u8,
        /// One scale per output channel and plane, else per plane.
        per_channel: bool,
    },
    /// The largest changes of each 64-element block, `entries` of them.
    SparseSigns {
        /// Entries per block, 1 to 32 (and at most the last block's length).
        entries: u8,
        /// One scale per output channel, else per tensor.
        per_channel: bool,
    },
}

impl Choice {
    /// The codec this encoding writes.
    pub const fn codec(self) -> Codec {
        match self {
            Self::Unchanged => Codec::Unchanged,
            Self::Q8Tensor | Self::Q8Channel => Codec::Q8Groups,
            Self::SignChannel => Codec::SignGroups,
            Self::SignTensor => Codec::Sign,
            Self::SignPlanes { .. } => Codec::SignPlanes,
            Self::SparseSigns { .. } => Codec::SparseSigns,
        }
    }

    /// Encodes `fine` against `base` (a tensor of shape `dims`) this way.
    ///
    /// # Panics
    /// When the values do not match the shape, a per-channel choice is asked of a tensor of
    /// rank below 1, or the parameters are outside the codec's range (see [`codec`]).
    pub fn encode(self, dims: &[u64], base: &[f32], fine: &[f32]) -> Encoded {
        let groups = |per_channel: bool| if per_channel { dims[0] as usize } else { 1 };
        match self {
            Self::Unchanged => Encoded::Unchanged,
            Self::Q8Tensor => codec::q8_groups(base, fine, 1, true),
            Self::Q8Channel => codec::q8_groups(base, fine, groups(true), true),
            Self::SignChannel => codec::sign_groups(base, fine, groups(true), true),
            Self::SignTensor => codec::sign_tensor(base, fine),
            Self::SignPlanes {
                planes,
                per_channel,
            } => codec::sign_planes(base, fine, groups(per_channel), planes.into(), true),
            Self::SparseSigns {
                entries,
                per_channel,
            } => codec::sparse_signs(base, fine, groups(per_channel), entries.into(), true),
        }
    }
}

/// Largest tensor the data-free rule stores as 8-bit deltas.
pub const AUTO_Q8_MAX_ELEMENTS: u64 = 4096;
/// Smallest channel the data-free rule gives its own sign scale.
pub const AUTO_MIN_CHANNEL: u64 = 64;

/// The data-free rule: small sensitive tensors get 8 bits, large ones 1 bit with f16 scales.
pub fn auto_codec(dims: &[u64], unchanged: bool) -> Choice {
    let n: u64 = dims.iter().product();
    if unchanged {
        Choice::Unchanged
    } else if dims.len() <= 1 {
        Choice::Q8Tensor
    } else if n <= AUTO_Q8_MAX_ELEMENTS {
        Choice::Q8Channel
    } else if n / dims[0] >= AUTO_MIN_CHANNEL {
        Choice::SignChannel
    } else {
        Choice::SignTensor
    }
}

/// One tensor of both models: same name, dtype and shape, values read as f32.
#[derive(Debug)]
pub struct Pair<'w> {
    /// The base model's initializer.
    pub base: &'w Initializer,
    /// The fine-tuned model's initializer of the same name.
    pub fine: &'w Initializer,
    /// The shape as the format stores it.
    pub dims: Vec<u32>,
    /// The base values.
    pub base_values: Vec<f32>,
    /// The fine-tuned values.
    pub fine_values: Vec<f32>,
}

/// Matches the fine-tuned model's tensors to the base's by name and calls `each(index, pair)`
/// in the base's order. Both models must have the same tensor set, dtypes and shapes (each
/// dimension below 2^32), and only finite values.
pub fn for_each_pair<'w>(
    base: &[u8],
    base_w: &'w OnnxWeights,
    fine: &[u8],
    fine_w: &'w OnnxWeights,
    mut each: impl FnMut(usize, Pair<'w>),
) -> Result<(), CompressError> {
    let mismatch = |name: &str, what| {
        Err(CompressError::Mismatch {
            name: name.into(),
            what,
        })
    };
    if let Some(f) = fine_w
        .initializers
        .iter()
        .find(|f| base_w.get(&f.name).is_none())
    {
        return mismatch(&f.name, "is in the fine-tuned model but not in the base");
    }
    for (k, b) in base_w.initializers.iter().enumerate() {
        let Some(f) = fine_w.get(&b.name) else {
            return mismatch(&b.name, "is missing from the fine-tuned model");
        };
        if f.dims != b.dims {
            return mismatch(&b.name, "has another shape in the fine-tuned model");
        }
        if f.dtype != b.dtype {
            return mismatch(&b.name, "has another dtype in the fine-tuned model");
        }
        let base_values = read_f32(base, b);
        let fine_values = read_f32(fine, f);
        if base_values
            .iter()
            .chain(&fine_values)
            .any(|x| !x.is_finite())
        {
            return Err(CompressError::NonFinite {
                name: b.name.clone(),
            });
        }
        let dims = b
            .dims
            .iter()
            .map(|&d| u32::try_from(d))
            .collect::<Result<Vec<_>, _>>();
        let Ok(dims) = dims else {
            return mismatch(&b.name, "has a dimension over 2^32");
        };
        each(
            k,
            Pair {
                base: b,
                fine: f,
                dims,
                base_values,
                fine_values,
            },
        );
    }
    Ok(())
}

/// Options of [`compress_onnx`].
#[derive(Clone, Debug)]
pub struct Options<'a> {
    /// Variant name.
    pub name: &'a str,
    /// Description.
    pub description: &'a str,
    /// Labels when they differ from the base's, one per line.
    pub labels: &'a str,
    /// Sequence number.
    pub sequence: u64,
    /// Codec policy.
    pub policy: Policy,
}

/// Why compression failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum CompressError {
    /// Base and fine-tuned models do not have the same float tensors.
    Mismatch {
        /// Tensor name.
        name: String,
        /// What differs.
        what: &'static str,
    },
    /// A fine-tuned or base value is NaN or infinite.
    NonFinite {
        /// Tensor name.
        name: String,
    },
    /// Writing failed.
    Write(WriteError),
    /// The written delta did not read back (a bug).
    Readback(ApplyError),
    /// The budget of [`Policy::Budget`] is below the smallest possible delta (every tensor
    /// left at the base: the header and the tensor table).
    Budget {
        /// The budget asked for, in bits per parameter.
        max_bits: f64,
        /// Bits per parameter of the smallest possible delta.
        needed_bits: f64,
        /// Bytes of the smallest possible delta.
        needed_bytes: u64,
    },
}

impl fmt::Display for CompressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Mismatch { name, what } => write!(f, "tensor {name:?}: {what}"),
            Self::NonFinite { name } => write!(f, "tensor {name:?}: NaN or infinite value"),
            Self::Write(e) => write!(f, "{e}"),
            Self::Readback(e) => write!(f, "written delta does not read back: {e}"),
            Self::Budget {
                max_bits,
                needed_bits,
                needed_bytes,
            } => write!(
                f,
                "budget of {max_bits} bits/param is below the smallest possible delta: expected \
                 at least {needed_bits:.4} bits/param ({needed_bytes} bytes of header and tensor \
                 table), found {max_bits}"
            ),
        }
    }
}

impl std::error::Error for CompressError {}

/// Reads an initializer as f32 values.
pub fn read_f32(model: &[u8], init: &Initializer) -> Vec<f32> {
    let mut v = vec![0f32; init.numel() as usize];
    // reconstruct with no delta is a plain read of the base
    crate::compose::reconstruct(apply::base_view(model, init), &[], &mut v)
        .expect("lengths come from the same initializer");
    v
}

/// Encodes one tensor with a per-tensor policy: [`Policy::Seed`] or [`Policy::Auto`].
/// [`Policy::Budget`] chooses from every tensor at once ([`Planner`], then [`Choice::encode`]);
/// given here, a tensor gets the rule of [`Policy::Auto`].
pub fn encode(policy: Policy, dims: &[u64], base: &[f32], fine: &[f32]) -> Encoded {
    let unchanged = base
        .iter()
        .zip(fine)
        .all(|(a, b)| a.to_bits() == b.to_bits());
    match policy {
        Policy::Seed => codec::sign_tensor(base, fine),
        Policy::Auto | Policy::Budget(_) => auto_codec(dims, unchanged).encode(dims, base, fine),
    }
}

/// Bytes a delta of these tensors (in any order) made with `manifest` holds before its
/// payloads: header, manifest, tensor table, dims, names and the padding to the first payload.
/// They depend on the names, shapes and manifest strings only, not on the codecs.
///
/// # Errors
/// As [`DeltaWriter::new`].
pub fn meta_bytes<'t>(
    manifest: &Manifest<'_>,
    tensors: impl IntoIterator<Item = TensorShape<'t>>,
) -> Result<u64, WriteError> {
    let mut shapes: Vec<TensorShape<'t>> = tensors.into_iter().collect();
    shapes.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    DeltaWriter::new(manifest, shapes, DEFAULT_ALIGN).map(|w| w.payload_offset())
}

/// The manifest of a delta made with `opts`, before its counts and fingerprints are known
/// (`params` and both fingerprints zero).
pub(crate) fn draft_manifest<'a>(opts: &Options<'a>) -> Manifest<'a> {
    Manifest {
        name: opts.name,
        description: opts.description,
        labels: opts.labels,
        tool: concat!("bitdelta ", env!("CARGO_PKG_VERSION")),
        sequence: opts.sequence,
        params: 0,
        base_fingerprint: [0; 32],
        result_fingerprint: [0; 32],
    }
}

/// The first pass of [`Policy::Budget`] on a pair of ONNX models: every tensor's candidates
/// measured, one tensor at a time, and the plan for a delta made with `opts` within `budget`
/// (`opts.policy` is not used). [`compress_onnx`] runs it for a budgeted policy; call it to see the
/// plan, then write it with [`compress_onnx_with`] and [`BudgetPlan::choice`].
///
/// # Errors
/// As [`for_each_pair`], [`CompressError::Budget`] when the budget is too small, and
/// [`CompressError::Write`] when the tensors cannot be written at all.
pub fn plan_onnx(
    base: &[u8],
    base_w: &OnnxWeights,
    fine: &[u8],
    fine_w: &OnnxWeights,
    opts: &Options<'_>,
    budget: Budget,
    mut progress: impl FnMut(usize, usize),
) -> Result<BudgetPlan, CompressError> {
    let total = base_w.initializers.len();
    let mut planner = Planner::new(budget.damage);
    let mut dims = Vec::with_capacity(total);
    for_each_pair(base, base_w, fine, fine_w, |k, p| {
        planner.add(&p.base.dims, p.base.dtype, &p.base_values, &p.fine_values);
        dims.push((p.base, p.dims));
        progress(k + 1, total);
    })?;
    let shapes = dims.iter().map(|(init, dims)| TensorShape {
        name: &init.name,
        dtype: init.dtype,
        dims,
    });
    let meta = meta_bytes(&draft_manifest(opts), shapes).map_err(CompressError::Write)?;
    planner.plan(meta, budget.max_bits)
}

/// Compresses `fine` against `base` (both ONNX files with the same float initializers).
/// `progress(done, total)` is called after each tensor.
pub fn compress_onnx(
    base: &[u8],
    base_w: &OnnxWeights,
    fine: &[u8],
    fine_w: &OnnxWeights,
    opts: &Options<'_>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<u8>, CompressError> {
    let policy = opts.policy;
    if let Policy::Budget(budget) = policy {
        // Planning is the first half of the work, encoding the second.
        let total = base_w.initializers.len();
        let plan = plan_onnx(base, base_w, fine, fine_w, opts, budget, |k, n| {
            progress(k, 2 * n);
        })?;
        return compress_onnx_with(
            base,
            base_w,
            fine,
            fine_w,
            opts,
            |k, init, bv, fv| plan.choice(k).encode(&init.dims, bv, fv),
            |k, _| progress(total + k, 2 * total),
        );
    }
    compress_onnx_with(
        base,
        base_w,
        fine,
        fine_w,
        opts,
        |_, init, bv, fv| encode(policy, &init.dims, bv, fv),
        progress,
    )
}

/// [`compress_onnx`] with the codec of each tensor chosen by the caller:
/// `encode(index, base initializer, base values, fine values)` is called once per base
/// initializer, in the base's order (`opts.policy` is not used). The calibrated compressor
/// ([`crate::calibrate`]) passes its per-tensor plan this way.
pub fn compress_onnx_with(
    base: &[u8],
    base_w: &OnnxWeights,
    fine: &[u8],
    fine_w: &OnnxWeights,
    opts: &Options<'_>,
    mut encode: impl FnMut(usize, &Initializer, &[f32], &[f32]) -> Encoded,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<u8>, CompressError> {
    let total = base_w.initializers.len();
    let mut records = Vec::with_capacity(total);
    for_each_pair(base, base_w, fine, fine_w, |k, p| {
        records.push(TensorRecord {
            name: p.base.name.clone(),
            dtype: p.base.dtype,
            encoded: encode(k, p.base, &p.base_values, &p.fine_values),
            dims: p.dims,
        });
        progress(k + 1, total);
    })?;
    let mut manifest = Manifest {
        base_fingerprint: base_w.fingerprint(base),
        ..draft_manifest(opts)
    };
    let draft =
        write_delta(&manifest, &mut records, DEFAULT_ALIGN).map_err(CompressError::Write)?;
    // The result fingerprint is computed by the same path a device uses to apply the delta.
    let parsed = DeltaFile::parse(&draft).map_err(|error| {
        CompressError::Readback(ApplyError::Format {
            delta: 0,
            tensor: None,
            error,
        })
    })?;
    manifest.result_fingerprint =
        apply::rebuild_unchecked(base, base_w, &[(&parsed, 1.0)], |_, _| {})
            .map_err(CompressError::Readback)?;
    write_delta(&manifest, &mut records, DEFAULT_ALIGN).map_err(CompressError::Write)
}

/// Codec names per tensor of a delta, for reports.
pub fn codec_summary(delta: &DeltaFile<'_>) -> Vec<(String, Codec, DType)> {
    delta
        .tensors()
        .map(|e| (e.name.into(), e.codec, e.dtype))
        .collect()
}
