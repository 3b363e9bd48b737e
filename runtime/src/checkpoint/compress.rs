//! Compressing a fine-tuned safetensors checkpoint against its base, one tensor at a time.

#[allow(clippy::wildcard_imports)]
use super::*;
use crate::compress::{Planner, Policy};

/// What [`compress_checkpoint`] wrote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Summary {
    /// Tensors in the delta.
    pub tensors: usize,
    /// Parameters the delta covers.
    pub params: u64,
    /// Length of the delta file.
    pub file_len: u64,
    /// Fingerprint of the base weights.
    pub base_fingerprint: Fingerprint,
    /// Fingerprint of the weights the delta rebuilds.
    pub result_fingerprint: Fingerprint,
}

/// Reusable per-tensor buffers, sized by the largest tensor.
#[derive(Default)]
struct Scratch {
    base: Vec<f32>,
    fine: Vec<f32>,
    values: Vec<f32>,
    stored: Vec<u8>,
    payload: Vec<u8>,
}

/// The values of tensor `b` of `base` and `f` of `fine` as f32 (borrowed from the maps or
/// converted into `bufs`), refused when one is NaN or infinite.
fn finite_pair<'s>(
    base: &'s Checkpoint,
    fine: &'s Checkpoint,
    b: &CheckpointTensor,
    f: &CheckpointTensor,
    bufs: (&'s mut Vec<f32>, &'s mut Vec<f32>),
) -> Result<(&'s [f32], &'s [f32]), CheckpointError> {
    let bv = as_f32(base.data(b), b.dtype, bufs.0);
    let fv = as_f32(fine.data(f), f.dtype, bufs.1);
    for (c, v) in [(base, bv), (fine, fv)] {
        if v.iter().any(|x| !x.is_finite()) {
            return Err(CheckpointError::NonFinite {
                path: c.path.clone(),
                name: b.name.clone(),
            });
        }
    }
    Ok((bv, fv))
}

fn write_zeros(out: &mut impl Write, n: u64) -> io::Result<()> {
    io::copy(&mut io::repeat(0).take(n), out).map(|_| ())
}

/// Compresses the safetensors checkpoint `fine` against `base` into `out`, one tensor at a time,
/// with the codecs and policies of [`crate::compress`] (`opts.labels` is stored as given).
/// With [`Policy::Budget`] both checkpoints are read twice: once to plan, once to encode.
///
/// `out` is written from its start; on success it holds the whole delta and is positioned at its
/// end. `progress(bytes done, bytes total)` counts base weight bytes (twice over for a budget)
/// and is called after each tensor. The delta is byte-identical to [`crate::format::write_delta`] of the same tensors,
/// manifest and [`DEFAULT_ALIGN`].
pub fn compress_checkpoint<W: Write + Seek>(
    base: &Checkpoint,
    fine: &Checkpoint,
    opts: &Options<'_>,
    out: &mut W,
    mut progress: impl FnMut(u64, u64),
) -> Result<Summary, CheckpointError> {
    if !is_valid_variant_name(opts.name) {
        return Err(CheckpointError::Write(WriteError::BadVariantName));
    }
    check_pair(base, fine)?;
    let pairs: Vec<(&CheckpointTensor, &CheckpointTensor)> = base
        .weights()
        .zip(fine.weights())
        .inspect(|(b, f)| debug_assert_eq!(b.name, f.name))
        .collect();
    let write_err = CheckpointError::Write;
    let mut dims = Vec::with_capacity(pairs.len());
    for (t, _) in &pairs {
        let d: Option<Vec<u32>> = t.dims.iter().map(|&d| u32::try_from(d).ok()).collect();
        dims.push(d.ok_or(write_err(WriteError::TooLarge))?);
    }
    let shapes = pairs.iter().zip(&dims).map(|((t, _), dims)| TensorShape {
        name: &t.name,
        dtype: t.dtype,
        dims,
    });
    let manifest = crate::compress::draft_manifest(opts);
    let mut writer = DeltaWriter::new(&manifest, shapes, DEFAULT_ALIGN).map_err(write_err)?;
    let payload_offset = writer.payload_offset();
    let mut s = Scratch::default();
    let total = base.weight_bytes();
    // A budget is planned over every tensor first: the first pass keeps sizes and errors only.
    let plan = match opts.policy {
        Policy::Budget(budget) => {
            let mut planner = Planner::new(budget.damage);
            let mut done = 0u64;
            for (b, f) in &pairs {
                let (bv, fv) = finite_pair(base, fine, b, f, (&mut s.base, &mut s.fine))?;
                planner.add(&b.dims, b.dtype, bv, fv);
                fine.release(f);
                base.release(b);
                done += b.data.len() as u64;
                progress(done, 2 * total);
            }
            Some(
                planner
                    .plan(payload_offset, budget.max_bits)
                    .map_err(CheckpointError::Budget)?,
            )
        }
        Policy::Seed | Policy::Auto => None,
    };
    let (mut done, total) = match plan {
        Some(_) => (total, 2 * total),
        None => (0, total),
    };

    out.seek(SeekFrom::Start(0))
        .map_err(CheckpointError::Output)?;
    write_zeros(out, payload_offset).map_err(CheckpointError::Output)?;

    let mut base_fp = Fingerprinter::new();
    let mut result_fp = Fingerprinter::new();
    let mut file_len = payload_offset;
    for (i, (b, f)) in pairs.iter().enumerate() {
        let bb = base.data(b);
        let (bv, fv) = finite_pair(base, fine, b, f, (&mut s.base, &mut s.fine))?;
        let enc = match &plan {
            Some(plan) => plan.choice(i).encode(&b.dims, bv, fv),
            None => crate::compress::encode(opts.policy, &b.dims, bv, fv),
        };
        fine.release(f);
        s.payload.clear();
        // Alignment padding and payload, checked with the reader's rules.
        let payload = writer.push(&enc, &mut s.payload).map_err(write_err)?;

        // The result, rebuilt as a device does (docs/FORMAT.md §9) and stored in the base dtype.
        base_fp.add(&b.name, b.dtype, &b.dims, bb);
        s.values.resize(b.numel() as usize, 0.0);
        compose::reconstruct(base_view(bb, b.dtype), &[(payload, 1.0)], &mut s.values)
            .map_err(|e| CheckpointError::Apply(ApplyError::Compose(e)))?;
        out.write_all(&s.payload).map_err(CheckpointError::Output)?;
        file_len += s.payload.len() as u64;
        let stored = stored_bytes(b.dtype, &s.values, &mut s.stored);
        result_fp.add(&b.name, b.dtype, &b.dims, stored);
        base.release(b);

        done += bb.len() as u64;
        progress(done, total);
    }

    writer.set_fingerprints(base_fp.finish(), result_fp.finish());
    let params = writer.manifest().params;
    let (base_fingerprint, result_fingerprint) = (
        writer.manifest().base_fingerprint,
        writer.manifest().result_fingerprint,
    );
    let meta = writer.finish().map_err(write_err)?;
    let patch = |out: &mut W| {
        out.seek(SeekFrom::Start(0))?;
        out.write_all(&meta)?;
        out.seek(SeekFrom::Start(file_len))?;
        out.flush()
    };
    patch(out).map_err(CheckpointError::Output)?;
    Ok(Summary {
        tensors: pairs.len(),
        params,
        file_len,
        base_fingerprint,
        result_fingerprint,
    })
}
