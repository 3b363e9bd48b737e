//! Writing a delta file (needs `alloc`).

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use super::entry::RawEntry;
use super::{
    is_valid_tensor_name, is_valid_variant_name, DType, Header, Manifest, Payload, ENTRY_LEN,
    HEADER_LEN, MAX_ALIGN, MAX_ELEMENTS, MAX_MANIFEST_LEN, MAX_NAMES_LEN, MAX_RANK, MAX_TENSORS,
    VERSION,
};

/// Group scales to be written.
#[derive(Clone, Debug, PartialEq)]
pub enum OwnedScales {
    /// Stored as IEEE f16.
    F16(Vec<half::f16>),
    /// Stored as f32.
    F32(Vec<f32>),
}

impl OwnedScales {
    /// Number of scales.
    pub fn len(&self) -> usize {
        match self {
            Self::F16(v) => v.len(),
            Self::F32(v) => v.len(),
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub(crate) fn is_f16(&self) -> bool {
        matches!(self, Self::F16(_))
    }
    /// Bytes of the scales as stored.
    pub(crate) fn byte_len(&self) -> usize {
        self.len() * if self.is_f16() { 2 } else { 4 }
    }
    pub(crate) fn write(&self, out: &mut Vec<u8>) {
        match self {
            Self::F16(v) => v
                .iter()
                .for_each(|s| out.extend_from_slice(&s.to_le_bytes())),
            Self::F32(v) => v
                .iter()
                .for_each(|s| out.extend_from_slice(&s.to_le_bytes())),
        }
    }
}

pub use crate::codec::Encoded;

/// One tensor to write.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorRecord {
    /// Name (as in the base model).
    pub name: String,
    /// Base dtype.
    pub dtype: DType,
    /// Dimensions.
    pub dims: Vec<u32>,
    /// Encoded payload.
    pub encoded: Encoded,
}

/// Why a delta could not be written.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteError {
    /// The variant name is not valid.
    BadVariantName,
    /// Two tensors have the same name.
    DuplicateName(String),
    /// A tensor's payload does not fit its shape.
    Inconsistent(String),
    /// The alignment is not a power of two in `1..=4096`.
    BadAlignment(u32),
    /// Too large for the format.
    TooLarge,
    /// The tensors given to [`DeltaWriter::new`] are not in ascending byte order of names.
    NotSorted(String),
}

impl fmt::Display for WriteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadVariantName => write!(
                f,
                "bad variant name: expected 1 to 64 characters from [A-Za-z0-9._-]"
            ),
            Self::DuplicateName(n) => write!(f, "duplicate tensor name {n:?}"),
            Self::Inconsistent(n) => {
                write!(f, "tensor {n:?}: payload does not fit its shape, or a scale/value/name is out of range")
            }
            Self::BadAlignment(a) => write!(
                f,
                "bad alignment {a}: expected a power of two from 1 to 4096"
            ),
            Self::TooLarge => write!(f, "delta too large for format version 1"),
            Self::NotSorted(n) => {
                write!(
                    f,
                    "tensor {n:?} is out of order: expected ascending byte order of names"
                )
            }
        }
    }
}

impl core::error::Error for WriteError {}

/// One tensor's place in a delta, known before its payload: name, base dtype and dimensions.
#[derive(Clone, Copy, Debug)]
pub struct TensorShape<'t> {
    /// Name (as in the base model).
    pub name: &'t str,
    /// Base dtype.
    pub dtype: DType,
    /// Dimensions.
    pub dims: &'t [u32],
}

/// A streaming delta writer: the layout of the meta region is fixed by the tensors' names and
/// shapes and the manifest's strings, so payloads can be written in order, each at its final
/// offset, before the meta region is known.
///
/// 1. [`DeltaWriter::new`] takes the manifest and every tensor's [`TensorShape`], in ascending
///    byte order of names, and checks them with the reader's rules and caps.
/// 2. Write [`DeltaWriter::payload_offset`] placeholder bytes, then for each tensor in order
///    [`DeltaWriter::push`] its encoded payload (with its alignment padding) and write those bytes.
/// 3. [`DeltaWriter::finish`] returns the header and meta region for bytes
///    `[0, payload_offset)`.
///
/// Each entry is checked with the reader's entry and payload checks as it is pushed, so the
/// output parses with [`super::DeltaFile::parse`] (everything the reader refuses, the writer
/// refuses first). [`write_delta`] is this writer over one buffer.
#[derive(Debug)]
pub struct DeltaWriter<'m> {
    manifest: Manifest<'m>,
    manifest_len: usize,
    alignment: u32,
    /// Per tensor: dtype, rank, index of the first dim, name offset, name length.
    shapes: Vec<(DType, u8, u32, u32, u16)>,
    dims: Vec<u8>,
    names: Vec<u8>,
    table: Vec<u8>,
    payload_offset: u64,
    /// End of the payloads so far, relative to `payload_offset`.
    cursor: u64,
}

fn too_large<T>(_: T) -> WriteError {
    WriteError::TooLarge
}

impl<'m> DeltaWriter<'m> {
    /// Checks the manifest and the tensors, and lays out the meta region. `manifest.params` is
    /// filled in; its fingerprints may be set later with [`DeltaWriter::set_fingerprints`].
    pub fn new<'t>(
        manifest: &Manifest<'m>,
        tensors: impl IntoIterator<Item = TensorShape<'t>>,
        alignment: u32,
    ) -> Result<Self, WriteError> {
        if !is_valid_variant_name(manifest.name) {
            return Err(WriteError::BadVariantName);
        }
        if !alignment.is_power_of_two() || alignment > MAX_ALIGN {
            return Err(WriteError::BadAlignment(alignment));
        }
        let (mut shapes, mut dims, mut names) = (Vec::new(), Vec::new(), Vec::new());
        let mut params = 0u64;
        let mut prev: Option<&str> = None;
        for t in tensors {
            match prev {
                Some(p) if p == t.name => return Err(WriteError::DuplicateName(t.name.into())),
                Some(p) if p.as_bytes() > t.name.as_bytes() => {
                    return Err(WriteError::NotSorted(t.name.into()))
                }
                _ => {}
            }
            prev = Some(t.name);
            let n = t
                .dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(u64::from(d)));
            let Some(n) = n.filter(|&n| n <= MAX_ELEMENTS) else {
                return Err(WriteError::TooLarge);
            };
            if !is_valid_tensor_name(t.name) || t.dims.len() > usize::from(MAX_RANK) {
                return Err(WriteError::Inconsistent(t.name.into()));
            }
            let dims_start = u32::try_from(dims.len() / 4).map_err(too_large)?;
            let name_off = u32::try_from(names.len()).map_err(too_large)?;
            // Checked above: at most MAX_NAME_LEN and MAX_RANK.
            shapes.push((
                t.dtype,
                t.dims.len() as u8,
                dims_start,
                name_off,
                t.name.len() as u16,
            ));
            t.dims
                .iter()
                .for_each(|d| dims.extend_from_slice(&d.to_le_bytes()));
            names.extend_from_slice(t.name.as_bytes());
            if shapes.len() > MAX_TENSORS as usize || names.len() > MAX_NAMES_LEN as usize {
                return Err(WriteError::TooLarge);
            }
            params += n;
        }
        let manifest = Manifest {
            params,
            ..manifest.clone()
        };
        let manifest_len = postcard::to_allocvec(&manifest).map_err(too_large)?.len();
        if manifest_len > MAX_MANIFEST_LEN as usize {
            return Err(WriteError::TooLarge);
        }
        let meta_end =
            (HEADER_LEN + manifest_len + shapes.len() * ENTRY_LEN + dims.len() + names.len())
                as u64;
        let payload_offset = meta_end.next_multiple_of(u64::from(alignment));
        Ok(Self {
            manifest,
            manifest_len,
            alignment,
            table: Vec::with_capacity(shapes.len() * ENTRY_LEN),
            shapes,
            dims,
            names,
            payload_offset,
            cursor: 0,
        })
    }

    /// Absolute offset of the first payload byte: the length of the header and meta region.
    pub fn payload_offset(&self) -> u64 {
        self.payload_offset
    }

    /// The manifest as it will be written (with `params` filled in).
    pub fn manifest(&self) -> &Manifest<'m> {
        &self.manifest
    }

    /// Sets the base and result fingerprints of the manifest (fixed-size: the layout is kept).
    pub fn set_fingerprints(&mut self, base: [u8; 32], result: [u8; 32]) {
        self.manifest.base_fingerprint = base;
        self.manifest.result_fingerprint = result;
    }

    /// Appends to `out` the zero padding before the next tensor's payload and the payload of
    /// `encoded`, checks the entry and payload with the reader's rules, and returns the
    /// reader's view of the payload (borrowed from `out`).
    ///
    /// # Errors
    /// [`WriteError::Inconsistent`] when the payload does not fit the tensor's shape or breaks
    /// a rule of the format (out-of-range scale or value, sign padding bits set); `out` is then
    /// left with the bytes appended. [`WriteError::TooLarge`] past the last tensor.
    pub fn push<'o>(
        &mut self,
        encoded: &Encoded,
        out: &'o mut Vec<u8>,
    ) -> Result<Payload<'o>, WriteError> {
        let i = self.table.len() / ENTRY_LEN;
        let &(dtype, rank, dims_start, name_off, name_len) =
            self.shapes.get(i).ok_or(WriteError::TooLarge)?;
        let name = || {
            let s = name_off as usize;
            String::from_utf8_lossy(&self.names[s..s + usize::from(name_len)]).into_owned()
        };
        let pad = self.cursor.next_multiple_of(u64::from(self.alignment)) - self.cursor;
        out.resize(out.len() + pad as usize, 0);
        let start = out.len();
        encoded.write(out);
        let bytes = &out[start..];
        let len = bytes.len() as u64;
        let groups =
            u32::try_from(encoded.groups()).map_err(|_| WriteError::Inconsistent(name()))?;
        let (scale, flags) = (encoded.scale(), encoded.flags());
        let raw = RawEntry {
            offset: self.cursor + pad,
            len,
            name_off,
            name_len,
            codec: encoded.codec() as u8,
            dtype: dtype as u8,
            dims_start,
            rank,
            flags,
            reserved: 0,
            groups,
            scale,
            crc: crc32fast::hash(bytes),
        };
        let entry_off = (HEADER_LEN + self.manifest_len + self.table.len()) as u64;
        // The plane count read back must be the encoded one (a scale count that is not a
        // multiple of the planes could otherwise alias another count).
        let planes_ok = |e: &super::TensorEntry<'_>| encoded.planes() == e.planes();
        let payload = raw
            .check(i as u32, entry_off, &self.names, &self.dims, 0, u64::MAX)
            .ok()
            .filter(planes_ok)
            .and_then(|e| e.split_payload(bytes).ok())
            .ok_or_else(|| WriteError::Inconsistent(name()))?;
        self.table.extend_from_slice(&raw.to_bytes());
        self.cursor += pad + len;
        Ok(payload)
    }

    /// The header and meta region: bytes `[0, payload_offset)` of the delta, whose payloads
    /// (`file_len - payload_offset` bytes) are those [`DeltaWriter::push`] appended.
    ///
    /// # Errors
    /// [`WriteError::TooLarge`] when not every tensor was pushed.
    pub fn finish(self) -> Result<Vec<u8>, WriteError> {
        if self.table.len() != self.shapes.len() * ENTRY_LEN {
            return Err(WriteError::TooLarge);
        }
        let manifest_b = postcard::to_allocvec(&self.manifest).map_err(too_large)?;
        // The fingerprints are fixed-size, so the manifest keeps the length `new` laid out.
        if manifest_b.len() != self.manifest_len {
            return Err(WriteError::TooLarge);
        }
        let mut out = Vec::with_capacity(self.payload_offset as usize);
        out.resize(HEADER_LEN, 0);
        out.extend_from_slice(&manifest_b);
        out.extend_from_slice(&self.table);
        out.extend_from_slice(&self.dims);
        out.extend_from_slice(&self.names);
        out.resize(self.payload_offset as usize, 0);
        let header = Header {
            version: VERSION,
            alignment: self.alignment,
            manifest_len: self.manifest_len as u32,
            tensor_count: self.shapes.len() as u32,
            dims_count: (self.dims.len() / 4) as u32,
            names_len: self.names.len() as u32,
            payload_offset: self.payload_offset,
            file_len: self.payload_offset + self.cursor,
            meta_crc: crc32fast::hash(&out[HEADER_LEN..]),
        };
        out[..HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok(out)
    }
}

/// Writes a complete delta file. Tensors are sorted by name; `manifest.params` is filled in.
/// The output parses with [`super::DeltaFile::parse`]: the tensors are checked with the reader's
/// rules and caps ([`DeltaWriter`]).
pub fn write_delta(
    manifest: &Manifest<'_>,
    tensors: &mut [TensorRecord],
    alignment: u32,
) -> Result<Vec<u8>, WriteError> {
    tensors.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    let shapes = tensors.iter().map(|t| TensorShape {
        name: &t.name,
        dtype: t.dtype,
        dims: &t.dims,
    });
    let mut w = DeltaWriter::new(manifest, shapes, alignment)?;
    let mut payloads = Vec::new();
    for t in tensors.iter() {
        w.push(&t.encoded, &mut payloads)?;
    }
    let mut out = w.finish()?;
    out.try_reserve_exact(payloads.len()).map_err(too_large)?;
    out.extend_from_slice(&payloads);
    debug_assert!(super::DeltaFile::parse(&out).is_ok());
    Ok(out)
}
