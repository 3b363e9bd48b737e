//! safetensors checkpoints: compress a fine-tuned checkpoint against its base, and apply a delta
//! to a base checkpoint, streaming one tensor at a time.
//!
//! Checkpoints are often larger than the memory of the machine that handles them, so nothing here
//! holds a model, a second model, or a delta in memory:
//!
//! - Both checkpoints are memory-mapped ([`Checkpoint::open`]). Each tensor is read from the maps,
//!   and once it is done its pages are dropped from the process (`MADV_DONTNEED`,
//!   [`Checkpoint::release`]): they stay in the page cache but no longer count as resident.
//! - [`compress_checkpoint`] writes each payload to its final place as soon as it is encoded. The
//!   delta's manifest, table, dims and names precede the payloads, but their size depends only on
//!   the names, the shapes and the manifest strings (fingerprints are fixed-size), so the space is
//!   reserved up front and filled in last, with the CRCs and both fingerprints, by seeking back.
//!   The file is byte-identical to what [`crate::format::write_delta`] makes of the same tensors.
//! - [`apply_checkpoint`] reads the delta front to back with a [`StreamDecoder`] and writes each
//!   rebuilt tensor at its offset in a copy of the base's layout.
//!
//! The resident set is then a few times the largest tensor (its pages in the maps, its f32
//! reconstruction for the fingerprint, its encoded payload), whatever the number of tensors.
//!
//! The float tensors are f32 and f16 (the dtypes of format version 1); a checkpoint with any other
//! dtype (bf16, integers, ...) is refused. Tensors are matched by name, in ascending byte order of
//! their names, and the codecs and policies are those of [`crate::compress`], so a safetensors
//! pair and an ONNX pair with the same tensors give the same payloads.

use std::convert::Infallible;
use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::string::String;
use std::vec::Vec;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::apply::{self, ApplyError};
use crate::compose::{self, Base};
use crate::compress::{self, Options};
use crate::error::{Error, FormatError};
use crate::fingerprint::{Fingerprint, Fingerprinter};
use crate::format::{
    is_valid_variant_name, DType, DeltaWriter, Manifest, TensorShape, WriteError, DEFAULT_ALIGN,
    MAX_ELEMENTS, MAX_NAME_LEN, MAX_RANK,
};
use crate::stream::StreamDecoder;

/// Elements rebuilt per [`StreamDecoder`] chunk while applying (64 KiB of f32).
const APPLY_CHUNK: usize = 1 << 14;
/// Buffered I/O size for reading a delta.
const READ_BUF: usize = 1 << 16;

/// One tensor of a checkpoint (the weight table's one tensor type).
pub type CheckpointTensor = crate::weights::WeightTensor;

/// A memory-mapped safetensors checkpoint, its tensors indexed by name.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
    tensors: Vec<CheckpointTensor>,
}

/// A tensor with another dtype or shape in the fine-tuned checkpoint than in the base.
#[derive(Debug)]
pub struct TensorMismatch {
    /// Tensor name.
    pub name: String,
    /// `"dtype"` or `"shape"`.
    pub what: &'static str,
    /// In the base.
    pub expected: String,
    /// In the fine-tuned checkpoint.
    pub found: String,
    /// The base file.
    pub base: PathBuf,
    /// The fine-tuned file.
    pub fine: PathBuf,
}

/// Why a checkpoint could not be compressed or rebuilt.
#[derive(Debug)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A checkpoint could not be opened or mapped.
    Open {
        /// The file.
        path: PathBuf,
        /// The system's error.
        error: io::Error,
    },
    /// A checkpoint is not a valid safetensors file (bad header, offsets, or truncated).
    Invalid {
        /// The file.
        path: PathBuf,
        /// What the safetensors parser found.
        error: SafeTensorError,
    },
    /// A tensor's dtype is not f32 or f16.
    UnsupportedDType {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: Dtype,
    },
    /// A tensor cannot be stored in a delta (name, rank or dimension out of the format's range).
    Unsupported {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
        /// What is out of range.
        what: &'static str,
    },
    /// A tensor is in one checkpoint and not in the other.
    Missing {
        /// Tensor name.
        name: String,
        /// The checkpoint that has it.
        present: PathBuf,
        /// The checkpoint that does not.
        absent: PathBuf,
    },
    /// A tensor has another dtype or shape in the fine-tuned checkpoint.
    Mismatch(Box<TensorMismatch>),
    /// A value is NaN or infinite.
    NonFinite {
        /// The file.
        path: PathBuf,
        /// Tensor name.
        name: String,
    },
    /// The delta cannot be written (variant name, a scale out of range, format caps).
    Write(WriteError),
    /// Writing the output failed.
    Output(io::Error),
    /// Reading the delta failed.
    DeltaRead(io::Error),
    /// The delta is bad, made for another base, or does not rebuild what it states.
    Apply(ApplyError),
}

impl fmt::Display for CheckpointError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Open { path, error } => write!(f, "{}: cannot open: {error}", path.display()),
            Self::Invalid { path, error } => {
                write!(
                    f,
                    "{}: not a valid safetensors file: {error}",
                    path.display()
                )
            }
            Self::UnsupportedDType { path, name, dtype } => write!(
                f,
                "{}: tensor {name:?} has dtype {dtype}: deltas cover f32 and f16 tensors only \
                 (convert the checkpoint to f32 or f16)",
                path.display()
            ),
            Self::Unsupported { path, name, what } => {
                write!(f, "{}: tensor {name:?}: {what}", path.display())
            }
            Self::Missing {
                name,
                present,
                absent,
            } => write!(
                f,
                "tensor {name:?} is in {} but not in {}",
                present.display(),
                absent.display()
            ),
            Self::Mismatch(m) => write!(
                f,
                "tensor {:?}: {} differs: expected {} (base {}), found {} (fine-tuned {})",
                m.name,
                m.what,
                m.expected,
                m.base.display(),
                m.found,
                m.fine.display()
            ),
            Self::NonFinite { path, name } => {
                write!(
                    f,
                    "{}: tensor {name:?}: NaN or infinite value",
                    path.display()
                )
            }
            Self::Write(e) => write!(f, "{e}"),
            Self::Output(e) => write!(f, "cannot write the output: {e}"),
            Self::DeltaRead(e) => write!(f, "cannot read the delta: {e}"),
            Self::Apply(e) => write!(f, "{e}"),
        }
    }
}

/// The messages include their cause, so there is no separate `source`.
impl std::error::Error for CheckpointError {}

#[allow(unsafe_code)]
fn map_readonly(file: &File) -> io::Result<Mmap> {
    // SAFETY: the mapping is read-only. As for every mapped model, the file must not be
    // truncated or rewritten by another process while it is mapped.
    unsafe { Mmap::map(file) }
}

fn dtype_of(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

fn dims_text(dims: &[u64]) -> String {
    let parts: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    format!("[{}]", parts.join(", "))
}

impl Checkpoint {
    /// Maps and indexes a safetensors file. Every tensor must be f32 or f16, with a name, rank
    /// and dimensions a delta can store.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, CheckpointError> {
        let path = path.as_ref().to_path_buf();
        let map = File::open(&path)
            .and_then(|f| map_readonly(&f))
            .map_err(|error| CheckpointError::Open {
                path: path.clone(),
                error,
            })?;
        let (n, meta) =
            SafeTensors::read_metadata(&map).map_err(|error| CheckpointError::Invalid {
                path: path.clone(),
                error,
            })?;
        // read_metadata checked that the header and every tensor's range lie inside the file.
        let data_start = n + 8;
        let mut infos: Vec<_> = meta.tensors().into_iter().collect();
        infos.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
        let mut tensors = Vec::with_capacity(infos.len());
        for (name, info) in infos {
            let unsupported = |what| CheckpointError::Unsupported {
                path: path.clone(),
                name: name.clone(),
                what,
            };
            let Some(dtype) = dtype_of(info.dtype) else {
                return Err(CheckpointError::UnsupportedDType {
                    path: path.clone(),
                    name,
                    dtype: info.dtype,
                });
            };
            if name.is_empty()
                || name.len() > usize::from(MAX_NAME_LEN)
                || name.chars().any(char::is_control)
            {
                return Err(unsupported(
                    "the name must be 1 to 4096 bytes without control characters",
                ));
            }
            if info.shape.len() > usize::from(MAX_RANK) {
                return Err(unsupported("rank over 8"));
            }
            let dims: Vec<u64> = info.shape.iter().map(|&d| d as u64).collect();
            if dims.iter().any(|&d| d > u64::from(u32::MAX)) {
                return Err(unsupported("a dimension over 2^32 - 1"));
            }
            if dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .is_none_or(|n| n > MAX_ELEMENTS)
            {
                return Err(unsupported("more than 2^40 elements"));
            }
            let (s, e) = info.data_offsets;
            tensors.push(CheckpointTensor {
                name,
                dtype,
                dims,
                data: data_start + s..data_start + e,
            });
        }
        Ok(Self {
            path,
            map,
            data_start,
            tensors,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every tensor, in ascending byte order of the names.
    pub fn tensors(&self) -> &[CheckpointTensor] {
        &self.tensors
    }

    /// The weights a delta covers: the tensors with at least one element, in name order.
    pub fn weights(&self) -> impl Iterator<Item = &CheckpointTensor> + '_ {
        self.tensors.iter().filter(|t| t.numel() > 0)
    }

    /// Number of parameters (elements of the weights).
    pub fn params(&self) -> u64 {
        self.weights().map(CheckpointTensor::numel).sum()
    }

    /// Bytes of weight data.
    pub fn weight_bytes(&self) -> u64 {
        self.weights().map(|t| t.data.len() as u64).sum()
    }

    /// File length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// True for an empty file (never the case for an opened checkpoint).
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The 8-byte header length and the JSON header: every byte before the tensor data.
    pub fn header_bytes(&self) -> &[u8] {
        &self.map[..self.data_start]
    }

    /// The stored little-endian bytes of tensor `t`.
    ///
    /// # Panics
    /// When `t` is not a tensor of this checkpoint (its range is outside the file).
    pub fn data(&self, t: &CheckpointTensor) -> &[u8] {
        self.map
            .get(t.data.clone())
            .expect("a tensor of this checkpoint")
    }

    /// Drops the pages of tensor `t` from the process's resident set. They stay in the page
    /// cache; a later read maps them again.
    #[allow(unsafe_code)]
    pub fn release(&self, t: &CheckpointTensor) {
        if t.data.is_empty() || t.data.end > self.map.len() {
            return;
        }
        #[cfg(unix)]
        // SAFETY: the mapping is shared, read-only and backed by the file, so MADV_DONTNEED only
        // unmaps pages: the next access maps the same file bytes again, and no slice borrowed
        // from the map ever observes different contents. The range lies inside the map
        // (memmap2 widens it down to a page boundary; a neighbouring tensor's page dropped with
        // it is read back the same way).
        let _ = unsafe {
            self.map.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                t.data.start,
                t.data.len(),
            )
        };
    }

    /// Fingerprint of the weights (see [`crate::fingerprint`]), one tensor at a time;
    /// `progress(bytes done)` is called after each.
    pub fn fingerprint(&self, mut progress: impl FnMut(u64)) -> Fingerprint {
        let mut fp = Fingerprinter::new();
        let mut done = 0u64;
        for t in self.weights() {
            fp.add(&t.name, t.dtype, &t.dims, self.data(t));
            self.release(t);
            done += t.data.len() as u64;
            progress(done);
        }
        fp.finish()
    }
}

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

/// Checks that `fine` has exactly the tensors of `base`, with the same dtypes and shapes.
fn check_pair(base: &Checkpoint, fine: &Checkpoint) -> Result<(), CheckpointError> {
    let find = |c: &Checkpoint, name: &str| {
        c.tensors
            .binary_search_by(|t| t.name.as_bytes().cmp(name.as_bytes()))
            .ok()
    };
    let missing = |name: &str, present: &Checkpoint, absent: &Checkpoint| {
        Err(CheckpointError::Missing {
            name: name.into(),
            present: present.path.clone(),
            absent: absent.path.clone(),
        })
    };
    let mut names = base
        .tensors
        .iter()
        .chain(&fine.tensors)
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>();
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    names.dedup();
    for name in names {
        let (b, f) = match (find(base, name), find(fine, name)) {
            (Some(b), Some(f)) => (&base.tensors[b], &fine.tensors[f]),
            (Some(_), None) => return missing(name, base, fine),
            _ => return missing(name, fine, base),
        };
        let mismatch = |what, expected, found| {
            Err(CheckpointError::Mismatch(Box::new(TensorMismatch {
                name: name.into(),
                what,
                expected,
                found,
                base: base.path.clone(),
                fine: fine.path.clone(),
            })))
        };
        if b.dtype != f.dtype {
            return mismatch("dtype", b.dtype.name().into(), f.dtype.name().into());
        }
        if b.dims != f.dims {
            return mismatch("shape", dims_text(&b.dims), dims_text(&f.dims));
        }
    }
    Ok(())
}

/// The values of a tensor as f32: borrowed from the map when they are aligned f32, else widened
/// or copied into `buf`.
fn as_f32<'a>(bytes: &'a [u8], dtype: DType, buf: &'a mut Vec<f32>) -> &'a [f32] {
    if dtype == DType::F32 {
        if let Ok(v) = bytemuck::try_cast_slice(bytes) {
            return v;
        }
    }
    buf.clear();
    match dtype {
        DType::F32 => buf.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        DType::F16 => buf.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
    }
    buf
}

/// The view a device decodes for tensor `t` from its stored bytes.
fn base_view<'a>(bytes: &'a [u8], dtype: DType) -> Base<'a> {
    match dtype {
        DType::F32 => Base::F32Le(bytes),
        DType::F16 => Base::F16Le(bytes),
    }
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

/// The bytes of `values` stored in `dtype` (`docs/FORMAT.md` §9).
fn stored_bytes<'a>(dtype: DType, values: &'a [f32], buf: &'a mut Vec<u8>) -> &'a [u8] {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values),
        DType::F16 => {
            buf.resize(values.len() * 2, 0);
            apply::store(dtype, values, buf);
            buf
        }
    }
}

fn write_zeros(out: &mut impl Write, n: u64) -> io::Result<()> {
    io::copy(&mut io::repeat(0).take(n), out).map(|_| ())
}

/// Compresses the safetensors checkpoint `fine` against `base` into `out`, one tensor at a time,
/// with the codecs and policies of [`crate::compress`] (`opts.labels` is stored as given).
///
/// `out` is written from its start; on success it holds the whole delta and is positioned at its
/// end. `progress(bytes done, bytes total)` counts base weight bytes and is called after each
/// tensor. The delta is byte-identical to [`crate::format::write_delta`] of the same tensors,
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
    let manifest = Manifest {
        name: opts.name,
        description: opts.description,
        labels: opts.labels,
        tool: concat!("bitdelta ", env!("CARGO_PKG_VERSION")),
        sequence: opts.sequence,
        params: 0,
        base_fingerprint: [0; 32],
        result_fingerprint: [0; 32],
    };
    let mut writer = DeltaWriter::new(&manifest, shapes, DEFAULT_ALIGN).map_err(write_err)?;
    let payload_offset = writer.payload_offset();

    out.seek(SeekFrom::Start(0))
        .map_err(CheckpointError::Output)?;
    write_zeros(out, payload_offset).map_err(CheckpointError::Output)?;

    let total = base.weight_bytes();
    let mut done = 0u64;
    let mut base_fp = Fingerprinter::new();
    let mut result_fp = Fingerprinter::new();
    let mut file_len = payload_offset;
    let mut s = Scratch::default();
    for (b, f) in &pairs {
        let (bb, fb) = (base.data(b), fine.data(f));
        let bv = as_f32(bb, b.dtype, &mut s.base);
        let fv = as_f32(fb, f.dtype, &mut s.fine);
        for (c, v) in [(base, bv), (fine, fv)] {
            if v.iter().any(|x| !x.is_finite()) {
                return Err(CheckpointError::NonFinite {
                    path: c.path.clone(),
                    name: b.name.clone(),
                });
            }
        }
        let enc = compress::encode(opts.policy, &b.dims, bv, fv);
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

/// A [`std::io::Read`] as an [`embedded_io::Read`] for the [`StreamDecoder`].
struct IoRead<R>(R);

/// The delta reader's error.
#[derive(Debug)]
struct ReadError(io::Error);

impl fmt::Display for ReadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for ReadError {}

impl embedded_io::Error for ReadError {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}

impl From<Infallible> for ReadError {
    fn from(e: Infallible) -> Self {
        match e {}
    }
}

impl<R> embedded_io::ErrorType for IoRead<R> {
    type Error = ReadError;
}

impl<R: Read> embedded_io::Read for IoRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ReadError> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                r => return r.map_err(ReadError),
            }
        }
    }
}

fn delta_error(e: Error<ReadError>, tensor: Option<&str>) -> CheckpointError {
    match e {
        Error::Format(error) => CheckpointError::Apply(ApplyError::Format {
            delta: 0,
            tensor: tensor.map(Into::into),
            error,
        }),
        Error::Source(ReadError(e)) => CheckpointError::DeltaRead(e),
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
        let reader = IoRead(BufReader::with_capacity(READ_BUF, &mut *delta));
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
    let reader = IoRead(BufReader::with_capacity(READ_BUF, &mut *delta));
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
    let reader = IoRead(BufReader::with_capacity(READ_BUF, &mut *delta));
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
    apply::check_tensor_set(
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
        let mut reader = bytes;
        let res = dec.next_tensor(&mut reader, &mut chunk, |at, values| {
            let start = at as usize * size;
            apply::store(
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

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::io::Cursor;

    use safetensors::tensor::TensorView;

    use super::*;
    use crate::compress::Policy;
    use crate::format::{write_delta, Codec, DeltaFile, TensorRecord};

    /// A fresh scratch folder, removed when dropped.
    struct TempDir(PathBuf);
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    impl std::ops::Deref for TempDir {
        type Target = Path;
        fn deref(&self) -> &Path {
            &self.0
        }
    }
    fn scratch(test: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("bitdelta-ckpt-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        }
    }

    struct Spec {
        name: &'static str,
        dtype: Dtype,
        shape: Vec<usize>,
        changed: bool,
    }

    fn spec(name: &'static str, dtype: Dtype, shape: &[usize], changed: bool) -> Spec {
        Spec {
            name,
            dtype,
            shape: shape.to_vec(),
            changed,
        }
    }

    /// Every codec of the auto rule, both dtypes, a scalar, an empty tensor, and names whose
    /// byte order differs from their case-insensitive order.
    fn specs() -> Vec<Spec> {
        vec![
            spec("blk.0.w", Dtype::F32, &[96, 80], true),
            spec("blk.0.b", Dtype::F32, &[96], true),
            spec("blk.1.w", Dtype::F32, &[16, 32], true),
            spec("emb", Dtype::F16, &[40, 130], true),
            spec("narrow", Dtype::F32, &[1100, 5], true),
            spec("frozen", Dtype::F32, &[8, 8], false),
            spec("scalar", Dtype::F32, &[], true),
            spec("Zeta.conv", Dtype::F32, &[4, 3, 3, 3], true),
            spec("empty", Dtype::F32, &[0, 4], false),
        ]
    }

    fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
        match dtype {
            Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Dtype::F16 => v
                .iter()
                .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
                .collect(),
            _ => unreachable!("test dtypes"),
        }
    }

    /// (base, fine) tensor bytes for `specs`: fine = base + noise on changed tensors.
    fn pair(specs: &[Spec], seed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut rng = Rng(seed);
        specs
            .iter()
            .map(|s| {
                let n: usize = s.shape.iter().product();
                let b: Vec<f32> = (0..n).map(|_| rng.next() * 0.5).collect();
                let f: Vec<f32> = b
                    .iter()
                    .map(|&x| if s.changed { x + rng.next() * 0.01 } else { x })
                    .collect();
                (encode(s.dtype, &b), encode(s.dtype, &f))
            })
            .collect()
    }

    fn write_st(path: &Path, specs: &[Spec], data: &[Vec<u8>]) {
        let views: Vec<(&str, TensorView<'_>)> = specs
            .iter()
            .zip(data)
            .map(|(s, d)| {
                (
                    s.name,
                    TensorView::new(s.dtype, s.shape.clone(), d).unwrap(),
                )
            })
            .collect();
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    }

    /// A checkpoint whose tensor data starts 2 bytes off a 4-byte boundary (the header JSON is
    /// written by hand and padded so).
    fn write_unaligned(path: &Path, specs: &[Spec], data: &[Vec<u8>]) {
        let mut json = String::from("{");
        let mut off = 0;
        let mut body = Vec::new();
        for (k, (s, d)) in specs.iter().zip(data).enumerate() {
            let shape: Vec<String> = s.shape.iter().map(|d| d.to_string()).collect();
            json += &format!(
                "{}\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                if k == 0 { "" } else { "," },
                s.name,
                s.dtype,
                shape.join(","),
                off,
                off + d.len()
            );
            off += d.len();
            body.extend_from_slice(d);
        }
        json.push('}');
        while (8 + json.len()) % 4 != 2 {
            json.push(' ');
        }
        let mut file = (json.len() as u64).to_le_bytes().to_vec();
        file.extend_from_slice(json.as_bytes());
        file.extend_from_slice(&body);
        std::fs::write(path, file).unwrap();
    }

    fn checkpoints(dir: &Path, specs: &[Spec], seed: u64) -> (Checkpoint, Checkpoint) {
        let data = pair(specs, seed);
        let (b, f): (Vec<_>, Vec<_>) = data.into_iter().unzip();
        write_st(&dir.join("base.safetensors"), specs, &b);
        write_st(&dir.join("fine.safetensors"), specs, &f);
        (
            Checkpoint::open(dir.join("base.safetensors")).unwrap(),
            Checkpoint::open(dir.join("fine.safetensors")).unwrap(),
        )
    }

    fn opts(policy: Policy) -> Options<'static> {
        Options {
            name: "variant-1",
            description: "a test variant",
            labels: "",
            sequence: 7,
            policy,
        }
    }

    fn values(c: &Checkpoint, t: &CheckpointTensor) -> Vec<f32> {
        let mut v = Vec::new();
        as_f32(c.data(t), t.dtype, &mut v).to_vec()
    }

    /// The same tensors through `write_delta`, the result fingerprint through `DeltaFile`.
    fn reference(base: &Checkpoint, fine: &Checkpoint, opts: &Options<'_>) -> Vec<u8> {
        let mut records: Vec<TensorRecord> = base
            .weights()
            .zip(fine.weights())
            .map(|(b, f)| TensorRecord {
                name: b.name.clone(),
                dtype: b.dtype,
                dims: b.dims.iter().map(|&d| d as u32).collect(),
                encoded: compress::encode(opts.policy, &b.dims, &values(base, b), &values(fine, f)),
            })
            .collect();
        let mut base_fp = Fingerprinter::new();
        for t in base.weights() {
            base_fp.add(&t.name, t.dtype, &t.dims, base.data(t));
        }
        let mut manifest = Manifest {
            name: opts.name,
            description: opts.description,
            labels: opts.labels,
            tool: concat!("bitdelta ", env!("CARGO_PKG_VERSION")),
            sequence: opts.sequence,
            params: 0,
            base_fingerprint: base_fp.finish(),
            result_fingerprint: [0; 32],
        };
        let draft = write_delta(&manifest, &mut records, DEFAULT_ALIGN).unwrap();
        let parsed = DeltaFile::parse(&draft).unwrap();
        let mut fp = Fingerprinter::new();
        for (i, t) in base.weights().enumerate() {
            let e = parsed.tensor(i).unwrap();
            assert_eq!(e.name, t.name);
            let mut v = vec![0f32; t.numel() as usize];
            compose::reconstruct(
                base_view(base.data(t), t.dtype),
                &[(e.payload().unwrap(), 1.0)],
                &mut v,
            )
            .unwrap();
            let mut stored = vec![0u8; t.data.len()];
            apply::store(t.dtype, &v, &mut stored);
            fp.add(&t.name, t.dtype, &t.dims, &stored);
        }
        manifest.result_fingerprint = fp.finish();
        write_delta(&manifest, &mut records, DEFAULT_ALIGN).unwrap()
    }

    fn compress(base: &Checkpoint, fine: &Checkpoint, opts: &Options<'_>) -> (Vec<u8>, Summary) {
        let mut out = Cursor::new(Vec::new());
        let mut calls = Vec::new();
        let summary =
            compress_checkpoint(base, fine, opts, &mut out, |d, t| calls.push((d, t))).unwrap();
        assert_eq!(out.position(), summary.file_len);
        assert_eq!(calls.len(), base.weights().count());
        assert_eq!(
            calls.last().unwrap(),
            &(base.weight_bytes(), base.weight_bytes())
        );
        (out.into_inner(), summary)
    }

    #[test]
    fn checkpoint_streaming_delta_is_byte_identical_to_write_delta() {
        let dir = scratch("identical");
        let (base, fine) = checkpoints(&dir, &specs(), 1);
        assert_eq!(
            base.weights().count(),
            8,
            "the empty tensor is not a weight"
        );
        for policy in [Policy::Seed, Policy::Auto] {
            let o = opts(policy);
            let (delta, summary) = compress(&base, &fine, &o);
            let want = reference(&base, &fine, &o);
            assert_eq!(delta.len(), want.len(), "{policy:?}: length");
            assert!(delta == want, "{policy:?}: bytes differ from write_delta");
            let parsed = DeltaFile::parse(&delta).unwrap();
            parsed.verify_payloads().unwrap();
            assert_eq!(
                parsed.manifest().result_fingerprint,
                summary.result_fingerprint
            );
            assert_eq!(summary.params, parsed.params());
            let codecs: Vec<_> = parsed.tensors().map(|e| (e.name, e.codec)).collect();
            let names: Vec<_> = codecs.iter().map(|c| c.0).collect();
            assert_eq!(
                names,
                [
                    "Zeta.conv",
                    "blk.0.b",
                    "blk.0.w",
                    "blk.1.w",
                    "emb",
                    "frozen",
                    "narrow",
                    "scalar"
                ]
            );
            if policy == Policy::Auto {
                let want = [
                    Codec::Q8Groups,
                    Codec::Q8Groups,
                    Codec::SignGroups,
                    Codec::Q8Groups,
                    Codec::SignGroups,
                    Codec::Unchanged,
                    Codec::Sign,
                    Codec::Q8Groups,
                ];
                assert_eq!(codecs.iter().map(|c| c.1).collect::<Vec<_>>(), want);
            } else {
                assert!(codecs.iter().all(|c| c.1 == Codec::Sign));
            }
            verify_delta(&mut Cursor::new(&delta)).unwrap();
        }
    }

    /// An ONNX model whose graph holds `specs` as raw-data initializers.
    fn onnx_model(specs: &[Spec], data: &[Vec<u8>]) -> Vec<u8> {
        use prost::encoding::{encode_key, encode_varint, WireType};
        let field = |number: u32, bytes: &[u8], out: &mut Vec<u8>| {
            encode_key(number, WireType::LengthDelimited, out);
            encode_varint(bytes.len() as u64, out);
            out.extend_from_slice(bytes);
        };
        let mut graph = Vec::new();
        for (s, d) in specs.iter().zip(data) {
            let mut t = Vec::new();
            for &dim in &s.shape {
                encode_key(1, WireType::Varint, &mut t);
                encode_varint(dim as u64, &mut t);
            }
            encode_key(2, WireType::Varint, &mut t);
            encode_varint(if s.dtype == Dtype::F16 { 10 } else { 1 }, &mut t);
            field(8, s.name.as_bytes(), &mut t);
            field(9, d, &mut t);
            field(5, &t, &mut graph);
        }
        let mut model = Vec::new();
        field(7, &graph, &mut model);
        model
    }

    /// The streaming checkpoint writer and the in-memory ONNX writer give the same file for the
    /// same tensors: both lay out the delta with `format::DeltaWriter`.
    #[test]
    fn checkpoint_and_onnx_writers_give_byte_identical_deltas() {
        let dir = scratch("onnx-identical");
        let specs = specs();
        let data = pair(&specs, 4);
        let (b, f): (Vec<_>, Vec<_>) = data.into_iter().unzip();
        write_st(&dir.join("base.safetensors"), &specs, &b);
        write_st(&dir.join("fine.safetensors"), &specs, &f);
        let open = |n: &str| Checkpoint::open(dir.join(n)).unwrap();
        let (base, fine) = (open("base.safetensors"), open("fine.safetensors"));
        let (base_onnx, fine_onnx) = (onnx_model(&specs, &b), onnx_model(&specs, &f));
        let base_w = crate::onnx::scan(&base_onnx).unwrap();
        let fine_w = crate::onnx::scan(&fine_onnx).unwrap();
        assert_eq!(base_w.initializers.len(), base.weights().count());
        for policy in [Policy::Seed, Policy::Auto] {
            let o = opts(policy);
            let (delta, _) = compress(&base, &fine, &o);
            let from_onnx =
                compress::compress_onnx(&base_onnx, &base_w, &fine_onnx, &fine_w, &o, |_, _| {})
                    .unwrap();
            assert_eq!(delta.len(), from_onnx.len(), "{policy:?}: length");
            assert!(delta == from_onnx, "{policy:?}: bytes differ");
        }
    }

    #[test]
    fn checkpoint_unaligned_data_gives_the_same_delta() {
        let dir = scratch("unaligned");
        let specs = specs();
        let data = pair(&specs, 2);
        let (b, f): (Vec<_>, Vec<_>) = data.into_iter().unzip();
        write_st(&dir.join("base.safetensors"), &specs, &b);
        write_st(&dir.join("fine.safetensors"), &specs, &f);
        write_unaligned(&dir.join("base-u.safetensors"), &specs, &b);
        write_unaligned(&dir.join("fine-u.safetensors"), &specs, &f);
        let open = |n: &str| Checkpoint::open(dir.join(n)).unwrap();
        let (base, fine) = (open("base.safetensors"), open("fine.safetensors"));
        let (base_u, fine_u) = (open("base-u.safetensors"), open("fine-u.safetensors"));
        assert_eq!(base_u.header_bytes().len() % 4, 2);
        let o = opts(Policy::Auto);
        assert!(compress(&base, &fine, &o).0 == compress(&base_u, &fine_u, &o).0);
    }

    #[test]
    fn checkpoint_apply_rebuilds_the_reference_and_keeps_the_layout() {
        let dir = scratch("apply");
        let (base, fine) = checkpoints(&dir, &specs(), 3);
        for policy in [Policy::Seed, Policy::Auto] {
            let (delta, summary) = compress(&base, &fine, &opts(policy));
            let parsed = DeltaFile::parse(&delta).unwrap();
            let mut out = Cursor::new(Vec::new());
            let fp =
                apply_checkpoint(&base, &mut Cursor::new(&delta), &mut out, |_, _| {}).unwrap();
            assert_eq!(fp, summary.result_fingerprint);
            let out = out.into_inner();
            assert_eq!(out.len() as u64, base.len());
            assert_eq!(&out[..base.header_bytes().len()], base.header_bytes());
            let st = SafeTensors::deserialize(&out).unwrap();
            for (i, t) in base.weights().enumerate() {
                let e = parsed.tensor(i).unwrap();
                let mut v = vec![0f32; t.numel() as usize];
                compose::reconstruct(
                    base_view(base.data(t), t.dtype),
                    &[(e.payload().unwrap(), 1.0)],
                    &mut v,
                )
                .unwrap();
                let mut want = vec![0u8; t.data.len()];
                apply::store(t.dtype, &v, &mut want);
                let got = st.tensor(&t.name).unwrap();
                assert_eq!(
                    got.shape(),
                    t.dims.iter().map(|&d| d as usize).collect::<Vec<_>>()
                );
                assert!(got.data() == &want[..], "{policy:?} {}", t.name);
                // Only the frozen tensor keeps its values (seed: a zero scale; auto: `unchanged`).
                assert_eq!(
                    got.data() == base.data(t),
                    t.name == "frozen",
                    "{policy:?} {}",
                    t.name
                );
                if policy == Policy::Auto {
                    assert_eq!(e.codec == Codec::Unchanged, t.name == "frozen");
                }
            }
        }
    }

    #[test]
    fn checkpoint_apply_refuses_another_base_and_a_corrupt_delta() {
        let dir = scratch("refuse");
        let (base, fine) = checkpoints(&dir, &specs(), 4);
        let (delta, _) = compress(&base, &fine, &opts(Policy::Seed));
        let mut out = Cursor::new(Vec::new());
        let e = apply_checkpoint(&fine, &mut Cursor::new(&delta), &mut out, |_, _| {});
        assert!(
            matches!(e, Err(CheckpointError::Apply(ApplyError::WrongBase { .. }))),
            "{e:?}"
        );
        assert!(
            out.get_ref().is_empty(),
            "nothing is written before the binding checks"
        );

        // One flipped bit in the last payload: the CRC catches it, for that tensor.
        let mut bad = delta.clone();
        *bad.last_mut().unwrap() ^= 0x10;
        let e = apply_checkpoint(&base, &mut Cursor::new(&bad), &mut out, |_, _| {}).unwrap_err();
        match &e {
            CheckpointError::Apply(ApplyError::Format { tensor, error, .. }) => {
                assert_eq!(tensor.as_deref(), Some("scalar"));
                assert!(
                    matches!(error, FormatError::PayloadChecksum { .. }),
                    "{error:?}"
                );
            }
            e => panic!("{e:?}"),
        }
        assert!(verify_delta(&mut Cursor::new(&bad)).is_err());

        let cut = &delta[..delta.len() - 3];
        let e = apply_checkpoint(&base, &mut Cursor::new(cut), &mut out, |_, _| {}).unwrap_err();
        assert!(
            matches!(e, CheckpointError::Apply(ApplyError::Format { .. })),
            "{e:?}"
        );
    }

    #[test]
    fn checkpoint_pairs_must_match_and_hold_f32_or_f16() {
        let dir = scratch("mismatch");
        let specs_a = specs();
        let data = pair(&specs_a, 5);
        let (b, f): (Vec<_>, Vec<_>) = data.into_iter().unzip();
        write_st(&dir.join("base.safetensors"), &specs_a, &b);
        let base = Checkpoint::open(dir.join("base.safetensors")).unwrap();
        let o = opts(Policy::Auto);
        let run = |specs: &[Spec], data: &[Vec<u8>]| {
            let path = dir.join("fine.safetensors");
            write_st(&path, specs, data);
            let fine = Checkpoint::open(&path)?;
            compress_checkpoint(&base, &fine, &o, &mut Cursor::new(Vec::new()), |_, _| {})
        };

        let mut s = specs();
        s[4].shape = vec![5500];
        let e = run(&s, &f).unwrap_err();
        assert!(
            e.to_string()
                .contains("tensor \"narrow\": shape differs: expected [1100, 5]"),
            "{e}"
        );
        assert!(e.to_string().contains("found [5500]"), "{e}");

        let mut s = specs();
        s[3].name = "embed";
        let e = run(&s, &f).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::Missing { name, .. } if name == "emb"),
            "{e}"
        );

        let mut s = specs();
        s[0].dtype = Dtype::BF16;
        let mut d = f.clone();
        let half = d[0].len() / 2;
        d[0].truncate(half);
        let e = run(&s, &d).unwrap_err();
        assert!(
            matches!(
                e,
                CheckpointError::UnsupportedDType {
                    dtype: Dtype::BF16,
                    ..
                }
            ),
            "{e}"
        );

        let mut d = f.clone();
        d[1][0..4].copy_from_slice(&f32::NAN.to_le_bytes());
        let e = run(&specs(), &d).unwrap_err();
        assert!(
            matches!(&e, CheckpointError::NonFinite { name, .. } if name == "blk.0.b"),
            "{e}"
        );

        // A scale the format cannot hold (mean |d| over 1e6) is refused, as write_delta does.
        let mut d = f.clone();
        for c in d[1].chunks_exact_mut(4) {
            c.copy_from_slice(&5.0e6f32.to_le_bytes());
        }
        let path = dir.join("fine.safetensors");
        write_st(&path, &specs(), &d);
        let fine = Checkpoint::open(&path).unwrap();
        let seed = opts(Policy::Seed);
        let e = compress_checkpoint(&base, &fine, &seed, &mut Cursor::new(Vec::new()), |_, _| {});
        assert!(
            matches!(&e, Err(CheckpointError::Write(WriteError::Inconsistent(n))) if n == "blk.0.b"),
            "{e:?}"
        );

        let path = dir.join("cut.safetensors");
        let full = std::fs::read(dir.join("base.safetensors")).unwrap();
        std::fs::write(&path, &full[..full.len() - 1]).unwrap();
        let e = Checkpoint::open(&path).unwrap_err();
        assert!(matches!(e, CheckpointError::Invalid { .. }), "{e}");
        assert!(e.to_string().contains("cut.safetensors"), "{e}");
    }
}
