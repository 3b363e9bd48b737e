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
//!
//! This module reads safetensors checkpoints ([`Checkpoint`]); `compress.rs` writes a delta from
//! a pair of them through [`crate::format::DeltaWriter`], `apply.rs` rebuilds one from a base and
//! a delta through the [`StreamDecoder`].
//!
//! May depend on: `std`, `memmap2`, `safetensors`, [`crate::format`], [`crate::stream`],
//! [`crate::compose`], [`crate::compress`] (codec policy), [`crate::apply`] (stores),
//! [`crate::fingerprint`] and [`crate::weights`].

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::string::String;
use std::vec::Vec;

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensorError, SafeTensors};

use crate::apply::ApplyError;
use crate::compose::{self, Base};
use crate::compress::{CompressError, Options};
use crate::error::{Error, FormatError};
use crate::fingerprint::{Fingerprint, Fingerprinter};
use crate::format::{
    is_valid_variant_name, DType, DeltaWriter, TensorShape, WriteError, DEFAULT_ALIGN,
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
    /// The budget of [`crate::compress::Policy::Budget`] is below the smallest possible delta
    /// ([`CompressError::Budget`]).
    Budget(CompressError),
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
            Self::Budget(e) => write!(f, "{e}"),
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

/// Checks that `fine` has exactly the tensors of `base`, with the same dtypes and shapes.
pub(super) fn check_pair(base: &Checkpoint, fine: &Checkpoint) -> Result<(), CheckpointError> {
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
pub(super) fn as_f32<'a>(bytes: &'a [u8], dtype: DType, buf: &'a mut Vec<f32>) -> &'a [f32] {
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
pub(super) fn base_view<'a>(bytes: &'a [u8], dtype: DType) -> Base<'a> {
    match dtype {
        DType::F32 => Base::F32Le(bytes),
        DType::F16 => Base::F16Le(bytes),
    }
}

/// The bytes of `values` stored in `dtype` (`docs/FORMAT.md` §9).
pub(super) fn stored_bytes<'a>(dtype: DType, values: &'a [f32], buf: &'a mut Vec<u8>) -> &'a [u8] {
    match dtype {
        DType::F32 => bytemuck::cast_slice(values),
        DType::F16 => {
            buf.resize(values.len() * 2, 0);
            crate::apply::store(dtype, values, buf);
            buf
        }
    }
}

mod apply;
mod compress;
#[cfg(test)]
mod tests;

pub use apply::{apply_checkpoint, rebuild_checkpoint, verify_delta};
pub use compress::{compress_checkpoint, Summary};
