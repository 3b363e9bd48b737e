//! Errors of the core: [`FormatError`] for bad bytes, [`Error`] for streaming sources.

use core::fmt;

/// Which hard cap a file exceeded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Cap {
    /// Manifest length in bytes.
    ManifestLen,
    /// Number of tensors.
    Tensors,
    /// Number of dimension entries.
    Dims,
    /// Length of the tensor-name area in bytes.
    NamesLen,
    /// Length of one tensor name in bytes.
    NameLen,
    /// Rank of one tensor.
    Rank,
    /// Number of elements of one tensor.
    Elements,
}

impl Cap {
    /// `CapExceeded` when `found > max`: the one check of every hard cap.
    pub(crate) fn check(self, found: u64, max: u64) -> Result<(), FormatError> {
        if found > max {
            Err(FormatError::CapExceeded {
                cap: self,
                found,
                max,
            })
        } else {
            Ok(())
        }
    }
}

impl fmt::Display for Cap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::ManifestLen => "manifest length",
            Self::Tensors => "tensor count",
            Self::Dims => "dimension count",
            Self::NamesLen => "name area length",
            Self::NameLen => "tensor name length",
            Self::Rank => "tensor rank",
            Self::Elements => "tensor element count",
        })
    }
}

/// Which header field disagrees with the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Field {
    /// `payload_offset` in the header.
    PayloadOffset,
    /// `file_len` in the header against the real length.
    FileLen,
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PayloadOffset => "payload offset",
            Self::FileLen => "file length",
        })
    }
}

/// Bad bytes: why a delta file was refused. Small, `Copy`, and never allocates.
///
/// `index` fields are tensor-table indices; callers with the table map them to names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The file is shorter than the fixed header.
    HeaderTruncated {
        /// Bytes present.
        found: usize,
    },
    /// The first 8 bytes are not `BITDELTA`.
    BadMagic,
    /// A format version this build does not read.
    UnsupportedVersion {
        /// Version found.
        found: u16,
    },
    /// A reserved header field or entry field is not zero.
    ReservedNotZero {
        /// Byte offset of the field in the file.
        offset: u64,
    },
    /// Payload alignment is not a power of two in `1..=4096`.
    BadAlignment {
        /// Alignment found.
        found: u32,
    },
    /// A count or length is larger than the format allows.
    CapExceeded {
        /// Which cap.
        cap: Cap,
        /// Value found.
        found: u64,
        /// Largest value allowed.
        max: u64,
    },
    /// A size computation overflowed.
    SizeOverflow,
    /// A header field disagrees with the layout or the real file length.
    LengthMismatch {
        /// Which field.
        field: Field,
        /// Value the layout requires.
        expected: u64,
        /// Value found.
        found: u64,
    },
    /// The header checksum does not match.
    HeaderChecksum {
        /// Checksum stored in the header.
        expected: u32,
        /// Checksum computed over the bytes.
        found: u32,
    },
    /// The checksum over manifest, tensor table, dims and names does not match.
    MetaChecksum {
        /// Stored.
        expected: u32,
        /// Computed.
        found: u32,
    },
    /// The manifest is not valid postcard for this version, or has bytes left over.
    ManifestInvalid,
    /// The variant name in the manifest is empty, too long or not `[A-Za-z0-9._-]` (or is `.`/`..`).
    BadVariantName,
    /// A tensor name is empty, not UTF-8, out of the name area, or has control characters.
    BadTensorName {
        /// Tensor index.
        index: u32,
    },
    /// Tensor names are not in strictly ascending byte order (duplicates included).
    NamesNotSorted {
        /// Index of the first tensor out of order.
        index: u32,
    },
    /// Codec id unknown to this build.
    UnknownCodec {
        /// Tensor index.
        index: u32,
        /// Codec id found.
        found: u8,
    },
    /// Dtype id unknown to this build.
    UnknownDType {
        /// Tensor index.
        index: u32,
        /// Dtype id found.
        found: u8,
    },
    /// The dimension range of a tensor is outside the dims area.
    DimsOutOfBounds {
        /// Tensor index.
        index: u32,
    },
    /// A dimension is zero.
    ZeroDim {
        /// Tensor index.
        index: u32,
    },
    /// The scale-group count does not fit the codec or does not divide the element count.
    BadGroups {
        /// Tensor index.
        index: u32,
        /// Group count found.
        found: u32,
    },
    /// A scale is NaN, infinite, negative or larger than [`crate::format::MAX_SCALE`].
    BadScale {
        /// Tensor index.
        index: u32,
        /// Group index (0 for a per-tensor scale).
        group: u32,
    },
    /// A field that must be zero for this codec is not.
    FieldNotZero {
        /// Tensor index.
        index: u32,
    },
    /// The payload length does not match the codec, dtype and shape.
    PayloadLength {
        /// Tensor index.
        index: u32,
        /// Length the codec requires.
        expected: u64,
        /// Length found.
        found: u64,
    },
    /// The payload does not start where the layout requires (holes, overlaps, wrong order).
    PayloadOffset {
        /// Tensor index.
        index: u32,
        /// Offset the layout requires.
        expected: u64,
        /// Offset found.
        found: u64,
    },
    /// Alignment padding between payloads is not zero.
    PaddingNotZero {
        /// Byte offset of the first non-zero padding byte in the file.
        offset: u64,
    },
    /// A tensor payload checksum does not match.
    PayloadChecksum {
        /// Tensor index.
        index: u32,
        /// Stored.
        expected: u32,
        /// Computed.
        found: u32,
    },
    /// The unused bits after the last sign bit are not zero.
    SignPaddingNotZero {
        /// Tensor index.
        index: u32,
    },
    /// An 8-bit delta is -128 (the format allows -127..=127).
    Q8OutOfRange {
        /// Tensor index.
        index: u32,
    },
    /// A `sparse-signs` block lists an index twice, out of order, or past the block's end.
    BadSparseIndex {
        /// Tensor index.
        index: u32,
        /// Block index (elements `64 * block ..`).
        block: u64,
    },
    /// The delta reader ended before the length the caller gave ([`crate::stream`]).
    UnexpectedEof {
        /// Byte offset in the file of the first missing byte.
        offset: u64,
    },
    /// The caller's buffer cannot hold the meta region plus the largest block of group scales
    /// ([`crate::stream`]).
    BufferTooSmall {
        /// Bytes needed (a lower bound when the meta region alone does not fit).
        needed: u64,
        /// Bytes given.
        found: u64,
    },
    /// The base reader ended inside a tensor's data ([`crate::stream`]).
    BaseTruncated {
        /// Tensor index.
        index: u32,
    },
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use FormatError::*;
        match *self {
            HeaderTruncated { found } => write!(
                f,
                "file truncated: expected at least {} header bytes, found {found}",
                crate::format::HEADER_LEN
            ),
            BadMagic => write!(f, "not a bitdelta file: expected magic \"BITDELTA\""),
            UnsupportedVersion { found } => write!(
                f,
                "unsupported format version: expected {}, found {found}",
                crate::format::VERSION
            ),
            ReservedNotZero { offset } => {
                write!(f, "reserved field at byte {offset} is not zero")
            }
            BadAlignment { found } => write!(
                f,
                "bad payload alignment: expected a power of two from 1 to {}, found {found}",
                crate::format::MAX_ALIGN
            ),
            CapExceeded { cap, found, max } => {
                write!(f, "{cap} too large: at most {max} allowed, found {found}")
            }
            SizeOverflow => write!(f, "size computation overflows"),
            LengthMismatch { field, expected, found } => {
                write!(f, "{field} mismatch: expected {expected}, found {found}")
            }
            HeaderChecksum { expected, found } => write!(
                f,
                "header checksum mismatch: expected {expected:#010x}, found {found:#010x}"
            ),
            MetaChecksum { expected, found } => write!(
                f,
                "manifest/table checksum mismatch: expected {expected:#010x}, found {found:#010x}"
            ),
            ManifestInvalid => write!(f, "manifest is not valid for format version 1"),
            BadVariantName => write!(
                f,
                "bad variant name: expected 1 to {} characters from [A-Za-z0-9._-]",
                crate::format::MAX_VARIANT_NAME
            ),
            BadTensorName { index } => write!(f, "tensor {index}: bad name"),
            NamesNotSorted { index } => {
                write!(f, "tensor {index}: names not in strictly ascending order (duplicate or out of order)")
            }
            UnknownCodec { index, found } => {
                write!(f, "tensor {index}: unknown codec id {found}")
            }
            UnknownDType { index, found } => {
                write!(f, "tensor {index}: unknown dtype id {found}")
            }
            DimsOutOfBounds { index } => write!(f, "tensor {index}: dimensions out of bounds"),
            ZeroDim { index } => write!(f, "tensor {index}: a dimension is zero"),
            BadGroups { index, found } => {
                write!(f, "tensor {index}: bad scale-group count {found}")
            }
            BadScale { index, group } => write!(
                f,
                "tensor {index}: scale of group {group} is NaN, infinite, negative or absurd"
            ),
            FieldNotZero { index } => {
                write!(f, "tensor {index}: a field unused by its codec is not zero")
            }
            PayloadLength { index, expected, found } => write!(
                f,
                "tensor {index}: payload length mismatch: expected {expected} bytes, found {found}"
            ),
            PayloadOffset { index, expected, found } => write!(
                f,
                "tensor {index}: payload offset mismatch: expected {expected}, found {found}"
            ),
            PaddingNotZero { offset } => {
                write!(f, "padding byte at {offset} is not zero")
            }
            PayloadChecksum { index, expected, found } => write!(
                f,
                "tensor {index}: payload checksum mismatch: expected {expected:#010x}, found {found:#010x}"
            ),
            SignPaddingNotZero { index } => {
                write!(f, "tensor {index}: unused bits after the last sign are not zero")
            }
            Q8OutOfRange { index } => {
                write!(f, "tensor {index}: 8-bit delta of -128 (allowed: -127..=127)")
            }
            BadSparseIndex { index, block } => write!(
                f,
                "tensor {index}: sparse block {block}: indices not strictly increasing or past the block's end"
            ),
            UnexpectedEof { offset } => {
                write!(f, "delta stream ended early: byte {offset} is missing")
            }
            BufferTooSmall { needed, found } => write!(
                f,
                "buffer too small for the meta region and group scales: expected at least {needed} bytes, found {found}"
            ),
            BaseTruncated { index } => {
                write!(f, "tensor {index}: base data ended early")
            }
        }
    }
}

impl FormatError {
    /// The tensor-table index the error names, if it names one (callers with the table map it
    /// to a name).
    pub const fn tensor_index(&self) -> Option<u32> {
        use FormatError::*;
        match *self {
            BadTensorName { index }
            | NamesNotSorted { index }
            | UnknownCodec { index, .. }
            | UnknownDType { index, .. }
            | DimsOutOfBounds { index }
            | ZeroDim { index }
            | BadGroups { index, .. }
            | BadScale { index, .. }
            | FieldNotZero { index }
            | PayloadLength { index, .. }
            | PayloadOffset { index, .. }
            | PayloadChecksum { index, .. }
            | SignPaddingNotZero { index }
            | Q8OutOfRange { index }
            | BadSparseIndex { index, .. }
            | BaseTruncated { index } => Some(index),
            HeaderTruncated { .. }
            | BadMagic
            | UnsupportedVersion { .. }
            | ReservedNotZero { .. }
            | BadAlignment { .. }
            | CapExceeded { .. }
            | SizeOverflow
            | LengthMismatch { .. }
            | HeaderChecksum { .. }
            | MetaChecksum { .. }
            | ManifestInvalid
            | BadVariantName
            | PaddingNotZero { .. }
            | UnexpectedEof { .. }
            | BufferTooSmall { .. } => None,
        }
    }
}

impl core::error::Error for FormatError {}

/// An error of a streaming operation: bad bytes, or the source failed.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error<E = core::convert::Infallible> {
    /// The bytes are not a valid delta.
    Format(FormatError),
    /// The source (reader) failed.
    Source(E),
}

impl<E> From<FormatError> for Error<E> {
    fn from(e: FormatError) -> Self {
        Self::Format(e)
    }
}

impl<E: fmt::Display> fmt::Display for Error<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Format(e) => e.fmt(f),
            Self::Source(e) => write!(f, "read error: {e}"),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> core::error::Error for Error<E> {}

#[cfg(feature = "apply")]
impl From<Error<std::io::Error>> for std::io::Error {
    fn from(e: Error<std::io::Error>) -> Self {
        match e {
            Error::Format(f) => std::io::Error::new(std::io::ErrorKind::InvalidData, f),
            Error::Source(io) => io,
        }
    }
}
