//! Parsing and checking a delta from a byte slice, without allocation.

use super::entry::{RawEntry, TensorEntry};
use super::{
    is_valid_variant_name, Header, Manifest, ENTRY_LEN, HEADER_LEN, MAX_MANIFEST_LEN,
    MAX_NAMES_LEN, MAX_RANK, MAX_TENSORS,
};
use crate::error::{Cap, Field, FormatError};

/// A parsed delta file borrowing its bytes. Construction checks the whole structure.
#[derive(Clone, Debug)]
pub struct DeltaFile<'a> {
    bytes: &'a [u8],
    manifest: Manifest<'a>,
    tables: Tables<'a>,
}

const fn align_up(x: u64, a: u64) -> Option<u64> {
    match x.checked_add(a - 1) {
        Some(v) => Some(v & !(a - 1)),
        None => None,
    }
}

impl Header {
    /// The checks on the header that need the file length but no other byte: the caps on the
    /// four counts, `file_len`, and `payload_offset` (the layout, and inside the file).
    ///
    /// Run after [`Header::parse`]; shared by [`DeltaFile::parse`] and the streaming decoder.
    pub(crate) fn check_layout(&self, file_len: u64) -> Result<(), FormatError> {
        Cap::ManifestLen.check(self.manifest_len.into(), MAX_MANIFEST_LEN.into())?;
        Cap::Tensors.check(self.tensor_count.into(), MAX_TENSORS.into())?;
        let max_dims = u64::from(MAX_TENSORS) * u64::from(MAX_RANK);
        Cap::Dims.check(self.dims_count.into(), max_dims)?;
        Cap::NamesLen.check(self.names_len.into(), MAX_NAMES_LEN.into())?;
        if self.file_len != file_len {
            return Err(FormatError::LengthMismatch {
                field: Field::FileLen,
                expected: file_len,
                found: self.file_len,
            });
        }
        let meta_end = self.meta_end();
        let align = u64::from(self.alignment);
        let payload_offset = align_up(meta_end, align).ok_or(FormatError::SizeOverflow)?;
        if self.payload_offset != payload_offset {
            return Err(FormatError::LengthMismatch {
                field: Field::PayloadOffset,
                expected: payload_offset,
                found: self.payload_offset,
            });
        }
        if payload_offset > file_len {
            return Err(FormatError::LengthMismatch {
                field: Field::FileLen,
                expected: payload_offset,
                found: file_len,
            });
        }
        Ok(())
    }

    /// End of the names area. Four u32 counts times small factors: this sum cannot overflow u64.
    fn meta_end(&self) -> u64 {
        HEADER_LEN as u64
            + u64::from(self.manifest_len)
            + u64::from(self.tensor_count) * ENTRY_LEN as u64
            + u64::from(self.dims_count) * 4
            + u64::from(self.names_len)
    }
}

/// The tensor table, dims and names areas of the meta region, with what is needed to decode and
/// check entries without the payload bytes. [`DeltaFile`] and the streaming decoder both look
/// entries up through it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tables<'a> {
    header: Header,
    file_len: u64,
    table: &'a [u8],
    dims: &'a [u8],
    names: &'a [u8],
}

impl<'a> Tables<'a> {
    /// Splits the meta region `[HEADER_LEN, payload_offset)` by the header counts; returns the
    /// manifest bytes, the tables and the padding after the names area.
    fn split_meta(
        header: &Header,
        meta: &'a [u8],
        file_len: u64,
    ) -> Result<(&'a [u8], Self, &'a [u8]), FormatError> {
        let take = |rest: &'a [u8], n: u64| {
            usize::try_from(n)
                .ok()
                .and_then(|n| rest.split_at_checked(n))
                .ok_or(FormatError::SizeOverflow)
        };
        let (manifest, rest) = take(meta, header.manifest_len.into())?;
        let (table, rest) = take(rest, u64::from(header.tensor_count) * ENTRY_LEN as u64)?;
        let (dims, rest) = take(rest, u64::from(header.dims_count) * 4)?;
        let (names, padding) = take(rest, header.names_len.into())?;
        let tables = Self {
            header: *header,
            file_len,
            table,
            dims,
            names,
        };
        Ok((manifest, tables, padding))
    }

    /// The header the tables were split by.
    pub(crate) fn header(&self) -> &Header {
        &self.header
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.header.tensor_count as usize
    }

    /// Entry `i` without payload bytes, or `None` past the end. For tables that passed
    /// [`Tables::check`], so decoding cannot fail.
    pub(crate) fn get(&self, i: usize) -> Option<TensorEntry<'a>> {
        let i = u32::try_from(i)
            .ok()
            .filter(|&i| i < self.header.tensor_count)?;
        self.entry(i).ok()
    }

    /// Walks the table once: names sorted and valid, dims in bounds, codecs known, payload
    /// lengths exact, payloads tiling `[payload_offset, file_len)`, and the element counts
    /// summing to `params`. `gap(from, to)` checks the padding bytes `[from, to)` before each
    /// payload, when the caller has them.
    fn check(
        &self,
        params_expected: u64,
        mut gap: impl FnMut(u64, u64) -> Result<(), FormatError>,
    ) -> Result<(), FormatError> {
        let align = u64::from(self.header.alignment);
        let base = self.header.payload_offset;
        let mut cursor = 0u64; // relative to payload_offset
        let mut prev: Option<&str> = None;
        let mut params = 0u64;
        for i in 0..self.header.tensor_count {
            let e = self.entry(i)?;
            if let Some(p) = prev {
                if p.as_bytes() >= e.name.as_bytes() {
                    return Err(FormatError::NamesNotSorted { index: i });
                }
            }
            prev = Some(e.name);
            let rel = e.offset - base;
            let expected = align_up(cursor, align).ok_or(FormatError::SizeOverflow)?;
            if rel != expected {
                return Err(FormatError::PayloadOffset {
                    index: i,
                    expected,
                    found: rel,
                });
            }
            gap(base + cursor, base + rel)?;
            cursor = rel + e.len;
            params = params
                .checked_add(e.numel())
                .ok_or(FormatError::SizeOverflow)?;
        }
        let total = self.file_len - base;
        if cursor != total {
            return Err(FormatError::LengthMismatch {
                field: Field::FileLen,
                expected: base + cursor,
                found: base + total,
            });
        }
        if params != params_expected {
            return Err(FormatError::ManifestInvalid);
        }
        Ok(())
    }

    /// Decodes entry `i`, checking everything that does not depend on other entries. The entry
    /// has no payload bytes; its payload is checked to lie inside `file_len`.
    pub(crate) fn entry(&self, i: u32) -> Result<TensorEntry<'a>, FormatError> {
        let at = i as usize * ENTRY_LEN;
        let e = at
            .checked_add(ENTRY_LEN)
            .and_then(|end| self.table.get(at..end))
            .and_then(|e| <&[u8; ENTRY_LEN]>::try_from(e).ok())
            .ok_or(FormatError::SizeOverflow)?;
        let entry_off = (HEADER_LEN + self.header.manifest_len as usize + at) as u64;
        RawEntry::from_bytes(e).check(
            i,
            entry_off,
            self.names,
            self.dims,
            self.header.payload_offset,
            self.file_len,
        )
    }
}

impl<'a> DeltaFile<'a> {
    /// Parses and checks the structure of a whole delta file: header, caps, layout, manifest,
    /// tensor table, names and the tiling of payloads. Payload checksums are checked per tensor by
    /// [`TensorEntry::payload`], or all at once by [`DeltaFile::verify_payloads`].
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let header = Header::parse(bytes)?;
        let file_len = bytes.len() as u64;
        header.check_layout(file_len)?;
        let meta = bytes
            .get(HEADER_LEN..header.payload_offset as usize)
            .ok_or(FormatError::SizeOverflow)?;
        let (manifest, tables) = Self::check_meta_region(&header, meta, file_len)?;
        tables.check(manifest.params, |from, to| {
            let gap = bytes.get(from as usize..to as usize).unwrap_or(&[]);
            match gap.iter().position(|&b| b != 0) {
                Some(p) => Err(FormatError::PaddingNotZero {
                    offset: from + p as u64,
                }),
                None => Ok(()),
            }
        })?;
        Ok(Self {
            bytes,
            manifest,
            tables,
        })
    }

    /// Checks the meta region `meta` = bytes `[HEADER_LEN, payload_offset)` of a file of
    /// `file_len` bytes whose `header` passed [`Header::parse`] and [`Header::check_layout`]:
    /// everything [`DeltaFile::parse`] checks except the padding between payloads (which needs
    /// the payload area). Returns the manifest and the checked tables. Used by the streaming
    /// decoder.
    pub(crate) fn check_meta(
        header: &Header,
        meta: &'a [u8],
        file_len: u64,
    ) -> Result<(Manifest<'a>, Tables<'a>), FormatError> {
        let (manifest, tables) = Self::check_meta_region(header, meta, file_len)?;
        tables.check(manifest.params, |_, _| Ok(()))?;
        Ok((manifest, tables))
    }

    /// Meta CRC, padding after the names, manifest and variant name.
    fn check_meta_region(
        header: &Header,
        meta: &'a [u8],
        file_len: u64,
    ) -> Result<(Manifest<'a>, Tables<'a>), FormatError> {
        let found = crc32fast::hash(meta);
        if found != header.meta_crc {
            return Err(FormatError::MetaChecksum {
                expected: header.meta_crc,
                found,
            });
        }
        let (manifest_b, tables, padding) = Tables::split_meta(header, meta, file_len)?;
        if let Some(p) = padding.iter().position(|&b| b != 0) {
            return Err(FormatError::PaddingNotZero {
                offset: header.meta_end() + p as u64,
            });
        }
        let manifest = match postcard::take_from_bytes::<Manifest<'a>>(manifest_b) {
            Ok((m, [])) => m,
            _ => return Err(FormatError::ManifestInvalid),
        };
        if !is_valid_variant_name(manifest.name) {
            return Err(FormatError::BadVariantName);
        }
        Ok((manifest, tables))
    }

    /// The header.
    pub fn header(&self) -> &Header {
        self.tables.header()
    }
    /// The manifest.
    pub fn manifest(&self) -> &Manifest<'a> {
        &self.manifest
    }
    /// The whole file.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tables.len()
    }
    /// True when the delta has no tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Entry `i` with its payload bytes, or `None` past the end.
    pub fn tensor(&self, i: usize) -> Option<TensorEntry<'a>> {
        // parse() checked every entry, and that each payload lies inside the file.
        let e = self.tables.get(i)?;
        let start = usize::try_from(e.offset).ok()?;
        let end = usize::try_from(e.offset + e.len).ok()?;
        Some(e.with_payload(self.bytes.get(start..end)?))
    }
    /// All entries in table (name) order.
    pub fn tensors(&self) -> impl Iterator<Item = TensorEntry<'a>> + '_ {
        (0..self.len()).filter_map(|i| self.tensor(i))
    }
    /// The entry named `name` (binary search: names are sorted).
    pub fn find(&self, name: &str) -> Option<TensorEntry<'a>> {
        let (mut lo, mut hi) = (0usize, self.len());
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            let e = self.tensor(mid)?;
            match e.name.as_bytes().cmp(name.as_bytes()) {
                core::cmp::Ordering::Less => lo = mid + 1,
                core::cmp::Ordering::Greater => hi = mid,
                core::cmp::Ordering::Equal => return Some(e),
            }
        }
        None
    }
    /// Total number of parameters covered by the table.
    pub fn params(&self) -> u64 {
        self.tensors().map(|e| e.numel()).sum()
    }
    /// Checks every payload (checksums, scales, padding bits, ranges).
    pub fn verify_payloads(&self) -> Result<(), FormatError> {
        for e in self.tensors() {
            e.payload()?;
        }
        Ok(())
    }
}
