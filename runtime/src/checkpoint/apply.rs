//! Verifying a delta and applying it to a base safetensors checkpoint, streaming.

#[allow(clippy::wildcard_imports)]
use super::*;

/// A [`std::io::Read`] as an [`embedded_io::Read`] for the [`StreamDecoder`].
type IoRead<R> = embedded_io_adapters::std::FromStd<R>;

fn delta_error(e: Error<io::Error>, tensor: Option<&str>) -> CheckpointError {
    match e {
        Error::Format(error) => CheckpointError::Apply(ApplyError::Format {
            delta: 0,
            tensor: tensor.map(Into::into),
            error,
        }),
        Error::Source(e) => CheckpointError::DeltaRead(e),
    }
}

/// A buffer large enough for the delta's meta region and its largest block of scales.
fn decoder_buffer<R: Read + Seek>(delta: &mut R, len: u64) -> Result<Vec<u8>, CheckpointError> {
    let mut size = 64usize << 10;
    loop {
        delta
            .seek(SeekFrom::Start(0))
            .map_err(CheckpointError::DeltaRead)?;
        let mut buf = vec![0u8; size];
        let reader = IoRead::new(BufReader::with_capacity(READ_BUF, &mut *delta));
        let opened = StreamDecoder::new(reader, len, &mut buf).map(drop);
        match opened {
            Ok(()) => return Ok(buf),
            // `needed` is bounded by the file: the meta region and every scale block lie in it.
            Err(Error::Format(FormatError::BufferTooSmall { needed, .. }))
                if needed > size as u64 && needed <= len.saturating_mul(2) =>
            {
                size = needed as usize;
            }
            Err(e) => return Err(delta_error(e, None)),
        }
    }
}

/// The delta's length and a buffer large enough for its [`StreamDecoder`], with the reader
/// positioned at the start.
fn rewind_with_buffer<R: Read + Seek>(delta: &mut R) -> Result<(u64, Vec<u8>), CheckpointError> {
    let len = delta
        .seek(SeekFrom::End(0))
        .map_err(CheckpointError::DeltaRead)?;
    let buf = decoder_buffer(delta, len)?;
    delta
        .seek(SeekFrom::Start(0))
        .map_err(CheckpointError::DeltaRead)?;
    Ok((len, buf))
}

/// Reads a whole delta front to back and checks its structure and every payload (what
/// `bitdelta verify` checks without a base), holding only its meta region in memory.
pub fn verify_delta<R: Read + Seek>(delta: &mut R) -> Result<(), CheckpointError> {
    let (len, mut buf) = rewind_with_buffer(delta)?;
    let reader = IoRead::new(BufReader::with_capacity(READ_BUF, &mut *delta));
    let mut dec = StreamDecoder::new(reader, len, &mut buf).map_err(|e| delta_error(e, None))?;
    while let Some(info) = dec.peek() {
        dec.skip_tensor()
            .map_err(|e| delta_error(e, Some(info.name)))?;
    }
    Ok(())
}

/// Rebuilds every weight of `base` with the delta read from `delta` (one delta, alpha 1), and
/// calls `sink(tensor, stored bytes)` in name order. Returns the fingerprint of the rebuilt
/// weights.
///
/// The binding rules of `docs/FORMAT.md` §11 come first: the delta's structure, the base
/// fingerprint (one pass over the base), the tensor set. `sink` only sees a tensor once its
/// payload checked out, but the result fingerprint can only be compared after the last one:
/// what `sink` wrote must not be used unless this returns `Ok`. `progress(bytes done, bytes
/// total)` counts base bytes over both passes.
pub fn rebuild_checkpoint<R: Read + Seek>(
    base: &Checkpoint,
    delta: &mut R,
    mut sink: impl FnMut(&CheckpointTensor, &[u8]) -> io::Result<()>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Fingerprint, CheckpointError> {
    let (len, mut buf) = rewind_with_buffer(delta)?;
    let reader = IoRead::new(BufReader::with_capacity(READ_BUF, &mut *delta));
    let mut dec = StreamDecoder::new(reader, len, &mut buf).map_err(|e| delta_error(e, None))?;
    let (expected_base, expected_result) = (
        dec.manifest().base_fingerprint,
        dec.manifest().result_fingerprint,
    );

    let total = base.weight_bytes() * 2;
    let found = base.fingerprint(|done| progress(done, total));
    if found != expected_base {
        return Err(CheckpointError::Apply(ApplyError::WrongBase {
            delta: 0,
            expected: expected_base,
            found,
        }));
    }
    let weights: Vec<&CheckpointTensor> = base.weights().collect();
    crate::apply::check_tensor_set(
        0,
        weights
            .iter()
            .map(|t| (t.name.as_str(), t.dtype, t.dims.as_slice())),
        (0..).map_while(|i| dec.tensor(i)).map(|e| {
            let dims: Vec<u64> = e.dims().iter().map(|&d| u64::from(d)).collect();
            (e.name, e.dtype, dims.into_iter())
        }),
    )
    .map_err(CheckpointError::Apply)?;

    let mut chunk = vec![0f32; APPLY_CHUNK];
    let mut stored = Vec::new();
    let mut fp = Fingerprinter::new();
    let mut done = total / 2;
    for t in weights {
        let bytes = base.data(t);
        let size = t.dtype.size();
        stored.resize(bytes.len(), 0);
        // A std reader too, so that its error type is the delta reader's.
        let mut reader = IoRead::new(bytes);
        let res = dec.next_tensor(&mut reader, &mut chunk, |at, values| {
            let start = at as usize * size;
            crate::apply::store(
                t.dtype,
                values,
                &mut stored[start..start + values.len() * size],
            );
        });
        base.release(t);
        match res {
            Ok(Some(_)) => {}
            Ok(None) => {
                return Err(CheckpointError::Apply(ApplyError::TensorSet {
                    delta: 0,
                    name: t.name.clone(),
                    what: "is missing from the delta",
                }))
            }
            Err(e) => return Err(delta_error(e, Some(&t.name))),
        }
        fp.add(&t.name, t.dtype, &t.dims, &stored);
        sink(t, &stored).map_err(CheckpointError::Output)?;
        done += bytes.len() as u64;
        progress(done, total);
    }
    let found = fp.finish();
    if found != expected_result {
        return Err(CheckpointError::Apply(ApplyError::ResultMismatch {
            expected: expected_result,
            found,
        }));
    }
    Ok(found)
}

/// Applies the delta read from `delta` to `base` and writes the rebuilt checkpoint to `out`:
/// the base file with every weight's data replaced by its reconstruction, all other bytes
/// (header, metadata, layout) identical. Checks as [`rebuild_checkpoint`]; on error, what was
/// written to `out` must be discarded (write to a temporary file and rename it on success).
pub fn apply_checkpoint<R: Read + Seek, W: Write + Seek>(
    base: &Checkpoint,
    delta: &mut R,
    out: &mut W,
    progress: impl FnMut(u64, u64),
) -> Result<Fingerprint, CheckpointError> {
    let fp = rebuild_checkpoint(
        base,
        delta,
        |t, bytes| {
            out.seek(SeekFrom::Start(t.data.start as u64))?;
            out.write_all(bytes)
        },
        progress,
    )?;
    let finish = |out: &mut W| {
        out.seek(SeekFrom::Start(0))?;
        out.write_all(base.header_bytes())?;
        out.seek(SeekFrom::Start(base.len()))?;
        out.flush()
    };
    finish(out).map_err(CheckpointError::Output)?;
    Ok(fp)
}
