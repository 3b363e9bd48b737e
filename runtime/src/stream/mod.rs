//! Streaming decoder: rebuild weights tensor by tensor from [`embedded_io::Read`] sources, in
//! `no_std` and without allocation.
//!
//! [`DeltaFile`] needs the whole delta in memory. A bare-metal loader usually has the delta in
//! flash, behind a driver or on a serial link, and a few KiB of RAM to spare. A
//! [`StreamDecoder`] reads the delta once, front to back, never seeks, and rebuilds one tensor at
//! a time in a caller-sized chunk of `f32`.
//!
//! May depend on: `core`, `embedded-io`, `crc32fast`, `half`, [`crate::error`], [`crate::format`]
//! (the layout and every check) and [`crate::codec`] (the decoders, which run the
//! [`crate::kernels`]). No `alloc`, no `std`.
//!
//! # Use
//! 1. [`StreamDecoder::new`] reads the 64-byte header and the meta region (manifest, table, dims,
//!    names) into the caller's buffer and checks the structure.
//! 2. For each tensor, in table (name) order: [`StreamDecoder::peek`] says which tensor comes
//!    next; the caller positions its base reader at that tensor's data (little-endian f32 or f16,
//!    per [`TensorEntry::dtype`]); [`StreamDecoder::next_tensor`] reads exactly
//!    [`TensorInfo::base_len`] bytes of base, reads the payload, and hands every rebuilt chunk to
//!    `sink(element offset, values)`. [`StreamDecoder::skip_tensor`] checks a payload without
//!    rebuilding it (e.g. to leave `unchanged` tensors alone).
//!
//! Results are `f32`. Storing an f16 base is the caller's step (`half::f16::from_f32`, as in
//! `docs/FORMAT.md` §9).
//!
//! # Trust: a sunk chunk is only valid once its tensor returned `Ok`
//! The format puts each payload's CRC in the table, but a stream can only compute it after the
//! last byte, so the chunks of a tensor reach `sink` **before** its CRC is known. A chunk handed to
//! `sink` is only trusted once `next_tensor` returned `Ok(Some(_))` for that tensor. On an error,
//! discard everything sunk for that tensor: write into a staging area or the inactive slot of an
//! A/B layout, never straight over live weights. Once a value check fails (below), `sink` is not
//! called again for that tensor.
//!
//! The binding rules of `docs/FORMAT.md` §11 stay the caller's: compare
//! [`Manifest::base_fingerprint`] with the base, the table with the base's tensors, and (one delta
//! at alpha 1) the fingerprint of the stored result with [`Manifest::result_fingerprint`] before
//! activating anything.
//!
//! # Checks
//! [`StreamDecoder::new`] checks everything [`DeltaFile::parse`] checks, in the same
//! order, with the delta length the caller gives instead of a slice, except the zero padding
//! between payloads: that is checked as the stream passes over it, before the payload it precedes
//! (`PaddingNotZero` with the same offset). Per tensor, the payload checks are those of
//! [`TensorEntry::payload`] (CRC, scales, sign padding bits, no `-128`, sparse indices), reported
//! with the same precedence: the CRC first, then the first value error. Both are only reported once
//! the whole payload has been read. The arithmetic is the one of [`crate::compose::reconstruct`]
//! with a single delta at alpha 1, through the same [`crate::kernels`], so the values are
//! bit-identical to it whatever the chunk length.
//!
//! # Memory
//! - `buf` (given to [`StreamDecoder::new`]): the meta region `[64, payload_offset)` plus the
//!   group scales of the tensor with the most of them (`groups × 2` or `× 4` bytes).
//!   [`buffer_len`] computes this from a parsed file (e.g. on the host, when the
//!   delta is built); `new` refuses a smaller buffer with [`FormatError::BufferTooSmall`] before
//!   any tensor is decoded, so no tensor fails half-way for lack of room. Scales come before the
//!   data in a payload and every element needs its group's scale, so without seeking they must be
//!   held; holding them in the caller's buffer keeps the limit a run-time size the caller
//!   chooses, instead of a const generic in the type.
//! - `out_chunk` (given to each call): at least one element; its length changes the number of
//!   `sink` calls, never the values.
//! - Stack: one [`IO_BUF`]-byte buffer, half of one more (the bits of one `sign-planes` plane)
//!   and a few words per call.
//!
//! # Errors
//! Bad bytes are [`Error::Format`]. A failing reader is [`Error::Source`]: the delta reader's
//! error as is, the base reader's converted with `From` (so both share the delta reader's error
//! type; with a `&[u8]` base, that type needs `From<core::convert::Infallible>`). A delta stream
//! that ends before `delta_len` is [`FormatError::UnexpectedEof`]; a base that ends inside a
//! tensor is [`FormatError::BaseTruncated`]. Every failure is an error, never a panic or a hang: a
//! read that returns `Ok(0)` for a non-empty buffer is the end of the stream.
//!
//! After an error the stream position is unknown: the decoder is spent, later calls return
//! `Ok(None)`, and [`StreamDecoder::is_complete`] stays `false`. Start again from a new decoder.
//!
//! # Example
//! ```
//! use bitdelta::format::{write_delta, DType, Encoded, Manifest, TensorRecord};
//! use bitdelta::stream::StreamDecoder;
//!
//! // A delta of one 3-element f32 tensor, `sign` codec: base + (±0.5).
//! let manifest = Manifest {
//!     name: "v1",
//!     description: "",
//!     labels: "",
//!     tool: "doc",
//!     sequence: 1,
//!     params: 0,
//!     base_fingerprint: [0; 32],
//!     result_fingerprint: [0; 32],
//! };
//! let mut records = [TensorRecord {
//!     name: "w".into(),
//!     dtype: DType::F32,
//!     dims: vec![3],
//!     encoded: Encoded::Sign { scale: 0.5, bits: vec![0b101] },
//! }];
//! let delta = write_delta(&manifest, &mut records, 8).unwrap();
//! let base: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
//!
//! let mut buf = [0u8; 256]; // meta region + largest scale block
//! let mut dec = StreamDecoder::new(&delta[..], delta.len() as u64, &mut buf)?;
//! let mut out = [0f32; 2]; // any length >= 1
//! let mut rebuilt = [0f32; 3];
//! while let Some(info) = dec.peek() {
//!     assert_eq!(info.name, "w");
//!     let mut base_reader = &base[..]; // positioned at this tensor's data
//!     dec.next_tensor(&mut base_reader, &mut out, |at, chunk| {
//!         rebuilt[at as usize..][..chunk.len()].copy_from_slice(chunk);
//!     })?;
//!     // Only now is `rebuilt` trusted.
//! }
//! assert!(dec.is_complete());
//! assert_eq!(rebuilt, [1.5, 1.5, 3.5]);
//! Ok::<(), bitdelta::Error>(())
//! ```

use embedded_io::Read;

use crate::codec::{Cursor, Term, MAX_REREAD};
use crate::error::{Error, FormatError};
use crate::format::{
    DType, DeltaFile, Header, Manifest, Tables, TensorEntry, HEADER_LEN, MAX_RANK,
};

#[cfg(all(test, feature = "alloc"))]
mod tests;

/// Bytes of the stack buffer that every read goes through (base values, payload, padding).
pub const IO_BUF: usize = 256;

/// Elements of one `sign` segment: the codec decoders read at most [`IO_BUF`] bytes at a time,
/// and a segment starting anywhere in a byte spans one byte more than its length needs.
#[cfg(all(test, feature = "alloc"))]
const SIGN_SEG: u64 = ((IO_BUF - 1) * 8) as u64;

/// Reconstruction with one delta uses alpha 1 (`docs/FORMAT.md` §9); kept as a named factor so the
/// arithmetic reads exactly as in [`crate::compose::reconstruct`].
const ALPHA: f32 = 1.0;

/// One tensor of a streamed delta: its table entry (every field and method of [`TensorEntry`],
/// through `Deref`), without payload bytes, and its dimensions as numbers.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TensorInfo<'m> {
    entry: TensorEntry<'m>,
    dims: [u32; MAX_RANK as usize],
}

impl<'m> core::ops::Deref for TensorInfo<'m> {
    type Target = TensorEntry<'m>;
    fn deref(&self) -> &TensorEntry<'m> {
        &self.entry
    }
}

impl<'m> TensorInfo<'m> {
    fn new(entry: TensorEntry<'m>) -> Self {
        let mut dims = [0u32; MAX_RANK as usize];
        for (slot, d) in dims.iter_mut().zip(entry.dims()) {
            *slot = d;
        }
        Self { entry, dims }
    }
    /// Dimensions, outermost first.
    pub fn dims(&self) -> &[u32] {
        &self.dims[..self.rank()]
    }
    /// Bytes [`StreamDecoder::next_tensor`] reads from the base reader: `numel × dtype size`.
    pub fn base_len(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
}

/// A delta decoder over a forward-only reader; see the [module docs](self).
///
/// `'m` is the lifetime of the caller's buffer, which holds the meta region: names and the
/// manifest borrow from it.
#[derive(Debug)]
pub struct StreamDecoder<'m, R> {
    delta: R,
    manifest: Manifest<'m>,
    /// The table, dims and names areas of the meta region `[HEADER_LEN, payload_offset)`.
    tables: Tables<'m>,
    /// The rest of the caller's buffer: the group scales of the current tensor.
    scales: &'m mut [u8],
    /// Offset in the file of the next byte the reader yields.
    pos: u64,
    /// Index of the next tensor.
    next: u32,
    failed: bool,
}

impl<'m, R: Read> StreamDecoder<'m, R> {
    /// Reads the header and the meta region of a delta of `delta_len` bytes from `delta` (which
    /// must be at the start of the file) into `buf`, and checks the structure (see the
    /// [module docs](self#checks)).
    ///
    /// `buf` must hold [`buffer_len`] bytes; otherwise this returns
    /// [`FormatError::BufferTooSmall`] (whose `needed` is only a lower bound when the meta region
    /// itself does not fit).
    pub fn new(mut delta: R, delta_len: u64, buf: &'m mut [u8]) -> Result<Self, Error<R::Error>> {
        if delta_len < HEADER_LEN as u64 {
            return Err(FormatError::HeaderTruncated {
                found: delta_len as usize,
            }
            .into());
        }
        let mut pos = 0u64;
        let mut head = [0u8; HEADER_LEN];
        read_delta(&mut delta, &mut pos, &mut head)?;
        let header = Header::parse(&head)?;
        header.check_layout(delta_len)?;
        let found = buf.len() as u64;
        // `check_layout` guarantees `payload_offset >= meta_end >= HEADER_LEN`.
        let meta_len = header.payload_offset - HEADER_LEN as u64;
        let meta_len = usize::try_from(meta_len)
            .ok()
            .filter(|&m| m <= buf.len())
            .ok_or(FormatError::BufferTooSmall {
                needed: meta_len,
                found,
            })?;
        let (meta, scales) = buf.split_at_mut(meta_len);
        read_delta(&mut delta, &mut pos, meta)?;
        let meta: &'m [u8] = meta;
        let (manifest, tables) = DeltaFile::check_meta(&header, meta, delta_len)?;
        let mut most = 0u64;
        for i in 0..header.tensor_count {
            most = most.max(tables.entry(i)?.scale_bytes());
        }
        if most > scales.len() as u64 {
            return Err(FormatError::BufferTooSmall {
                needed: meta_len as u64 + most,
                found,
            }
            .into());
        }
        Ok(Self {
            delta,
            manifest,
            tables,
            scales,
            pos,
            next: 0,
            failed: false,
        })
    }

    /// Reads the next tensor: `info.base_len()` bytes from `base` (positioned by the caller at that
    /// tensor's little-endian data, see [`StreamDecoder::peek`]) and its payload from the delta;
    /// hands each rebuilt chunk of `out_chunk.len()` elements (the last one shorter) to
    /// `sink(offset of its first element in the tensor, values)`, in order.
    ///
    /// Returns `Ok(None)` when every tensor has been read (or after an error). The chunks of a
    /// tensor are only trusted once this returns `Ok(Some(_))` for it (see the
    /// [module docs](self#trust-a-sunk-chunk-is-only-valid-once-its-tensor-returned-ok)).
    ///
    /// # Panics
    /// If `out_chunk` is empty.
    pub fn next_tensor<B>(
        &mut self,
        base: &mut B,
        out_chunk: &mut [f32],
        sink: impl FnMut(u64, &[f32]),
    ) -> Result<Option<TensorInfo<'m>>, Error<R::Error>>
    where
        B: Read,
        R::Error: From<B::Error>,
    {
        let (index, dtype) = match self.peek() {
            Some(info) => (info.index, info.dtype),
            None => return Ok(None),
        };
        let fill = |dst: &mut [f32], io: &mut [u8; IO_BUF]| read_base(base, dtype, index, dst, io);
        self.decode(out_chunk, fill, sink, false)
    }

    /// Reads and checks the next tensor's payload (the same checks as
    /// [`StreamDecoder::next_tensor`]) without rebuilding it and without a base.
    ///
    /// Returns `Ok(None)` when every tensor has been read (or after an error).
    pub fn skip_tensor(&mut self) -> Result<Option<TensorInfo<'m>>, Error<R::Error>> {
        let mut out = [0f32; 64];
        let fill = |dst: &mut [f32], _: &mut [u8; IO_BUF]| {
            dst.fill(0.0);
            Ok(())
        };
        self.decode(&mut out, fill, |_, _| {}, true)
    }

    fn decode<F, S>(
        &mut self,
        out: &mut [f32],
        mut fill: F,
        mut sink: S,
        skip: bool,
    ) -> Result<Option<TensorInfo<'m>>, Error<R::Error>>
    where
        F: FnMut(&mut [f32], &mut [u8; IO_BUF]) -> Result<(), Error<R::Error>>,
        S: FnMut(u64, &[f32]),
    {
        assert!(
            !out.is_empty(),
            "StreamDecoder: out_chunk must hold at least one element"
        );
        if self.failed || self.next >= self.header().tensor_count {
            return Ok(None);
        }
        match self.decode_one(out, &mut fill, &mut sink, skip) {
            Ok(info) => {
                self.next += 1;
                Ok(Some(info))
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn decode_one<F, S>(
        &mut self,
        out: &mut [f32],
        fill: &mut F,
        sink: &mut S,
        skip: bool,
    ) -> Result<TensorInfo<'m>, Error<R::Error>>
    where
        F: FnMut(&mut [f32], &mut [u8; IO_BUF]) -> Result<(), Error<R::Error>>,
        S: FnMut(u64, &[f32]),
    {
        let info = TensorInfo::new(self.tables.entry(self.next)?);
        let index = info.index;
        let Self {
            delta,
            pos,
            scales: scale_buf,
            ..
        } = self;
        let mut cur = PayloadCursor {
            delta,
            pos,
            crc: crc32fast::Hasher::new(),
            deferred: None,
            io: [0u8; IO_BUF],
            end: 0,
            tail: [0u8; MAX_REREAD],
            tail_len: 0,
        };

        // Zero padding up to the payload: no CRC covers it, so every byte is checked.
        while *cur.pos < info.offset {
            let m = (info.offset - *cur.pos).min(IO_BUF as u64) as usize;
            let at = *cur.pos;
            read_delta(cur.delta, cur.pos, &mut cur.io[..m])?;
            if let Some(p) = cur.io[..m].iter().position(|&b| b != 0) {
                return Err(FormatError::PaddingNotZero {
                    offset: at + p as u64,
                }
                .into());
            }
        }

        // Group scales, held in the caller's buffer (its size was checked by `new`).
        let scale_len = info.scale_bytes();
        let room = scale_buf.len() as u64;
        let sbuf = usize::try_from(scale_len)
            .ok()
            .and_then(|l| scale_buf.get_mut(..l))
            .ok_or(FormatError::BufferTooSmall {
                needed: scale_len,
                found: room,
            })?;
        read_payload(cur.delta, cur.pos, &mut cur.crc, sbuf)?;
        let sbuf: &[u8] = sbuf;
        let n = info.numel();
        let params = info.params(sbuf);
        // The first value error (scale, sign padding, -128, sparse index) is reported after the
        // CRC.
        if let Err(err) = params.check_scales() {
            cur.flag(err);
        }
        // One delta at alpha 1: raw values replace the base.
        let term = Term {
            alpha: ALPHA,
            base: None,
        };

        let mut start = 0u64;
        // Skipping a tensor without payload reads nothing: do not walk its (possibly huge) extent.
        let stop = if skip && info.len == 0 { 0 } else { n };
        while start < stop {
            let len = (out.len() as u64).min(n - start) as usize;
            let chunk = &mut out[..len];
            fill(chunk, &mut cur.io)?;
            info.codec.decode(&params, &mut cur, start, chunk, &term)?;
            if cur.deferred.is_none() {
                sink(start, chunk);
            }
            start += len as u64;
        }
        let (crc, deferred) = (cur.crc, cur.deferred);

        let found = crc.finalize();
        if found != info.crc {
            return Err(FormatError::PayloadChecksum {
                index,
                expected: info.crc,
                found,
            }
            .into());
        }
        match deferred {
            Some(err) => Err(err.into()),
            None => Ok(info),
        }
    }
}

/// The size of the buffer [`StreamDecoder::new`] needs for `file`: its meta region plus its
/// largest block of group scales. For sizing the buffer ahead of time, e.g. on the host when the
/// delta is built.
pub fn buffer_len(file: &DeltaFile<'_>) -> u64 {
    let most = file.tensors().map(|e| e.scale_bytes()).max().unwrap_or(0);
    file.header().payload_offset - HEADER_LEN as u64 + most
}

impl<'m, R> StreamDecoder<'m, R> {
    /// The header.
    pub fn header(&self) -> &Header {
        self.tables.header()
    }
    /// The manifest.
    pub fn manifest(&self) -> &Manifest<'m> {
        &self.manifest
    }
    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tables.len()
    }
    /// True when the delta has no tensor.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Entry `i` of the table (any `i`, read or not), or `None` past the end.
    pub fn tensor(&self, i: usize) -> Option<TensorInfo<'m>> {
        // `new` checked every entry.
        self.tables.get(i).map(TensorInfo::new)
    }
    /// The tensor the next call to [`StreamDecoder::next_tensor`] or
    /// [`StreamDecoder::skip_tensor`] reads, or `None` when done (or after an error).
    pub fn peek(&self) -> Option<TensorInfo<'m>> {
        if self.failed {
            return None;
        }
        self.tensor(self.next as usize)
    }
    /// True when every tensor has been read and checked without error.
    pub fn is_complete(&self) -> bool {
        !self.failed && self.next == self.header().tensor_count
    }
    /// Offset in the file of the next byte to read from the delta reader.
    pub fn position(&self) -> u64 {
        self.pos
    }
    /// The delta reader.
    pub fn into_inner(self) -> R {
        self.delta
    }
}

/// The payload of the current tensor as a codec [`Cursor`]: reads go through one [`IO_BUF`]
/// buffer (also lent to the base reader between reads), feed the payload CRC, and keep the last
/// row of sign bits for a read that starts inside it.
struct PayloadCursor<'r, R> {
    delta: &'r mut R,
    pos: &'r mut u64,
    crc: crc32fast::Hasher,
    /// The first value error met.
    deferred: Option<FormatError>,
    io: [u8; IO_BUF],
    /// Body bytes read so far.
    end: u64,
    /// The last `tail_len` bytes read, ending at `end` (what a decoder may read again).
    tail: [u8; MAX_REREAD],
    tail_len: usize,
}

impl<R: Read> Cursor for PayloadCursor<'_, R> {
    type Error = Error<R::Error>;
    const WINDOW: usize = IO_BUF;
    fn read(&mut self, at: u64, len: usize) -> Result<&[u8], Self::Error> {
        // The decoders read in order and start again at most one row back (`Cursor`'s contract).
        let again = self
            .end
            .checked_sub(at)
            .and_then(|a| usize::try_from(a).ok())
            .unwrap_or(usize::MAX);
        assert!(
            again <= self.tail_len && again <= len && len <= IO_BUF,
            "payload reads go forward"
        );
        self.io[..again].copy_from_slice(&self.tail[self.tail_len - again..self.tail_len]);
        read_payload(
            self.delta,
            self.pos,
            &mut self.crc,
            &mut self.io[again..len],
        )?;
        self.end += (len - again) as u64;
        self.tail_len = len.min(MAX_REREAD);
        self.tail[..self.tail_len].copy_from_slice(&self.io[len - self.tail_len..len]);
        Ok(&self.io[..len])
    }
    fn flag(&mut self, e: FormatError) {
        self.deferred.get_or_insert(e);
    }
}

/// Fills `buf` from the delta, advancing `pos`; a stream that ends first is `UnexpectedEof`.
fn read_delta<R: Read>(
    delta: &mut R,
    pos: &mut u64,
    mut buf: &mut [u8],
) -> Result<(), Error<R::Error>> {
    while !buf.is_empty() {
        match delta.read(buf) {
            Ok(0) => return Err(FormatError::UnexpectedEof { offset: *pos }.into()),
            Ok(k) => {
                // A reader claiming more than it was given breaks the `Read` contract; clamp
                // rather than panic (the CRCs still cover every byte used).
                let k = k.min(buf.len());
                *pos += k as u64;
                buf = &mut buf[k..];
            }
            Err(e) => return Err(Error::Source(e)),
        }
    }
    Ok(())
}

/// [`read_delta`] for payload bytes: also feeds the payload CRC.
fn read_payload<R: Read>(
    delta: &mut R,
    pos: &mut u64,
    crc: &mut crc32fast::Hasher,
    buf: &mut [u8],
) -> Result<(), Error<R::Error>> {
    read_delta(delta, pos, buf)?;
    crc.update(buf);
    Ok(())
}

/// Reads `dst.len()` base elements of `dtype` (little-endian) from `base` through `io`.
fn read_base<B: Read, E: From<B::Error>>(
    base: &mut B,
    dtype: DType,
    index: u32,
    dst: &mut [f32],
    io: &mut [u8; IO_BUF],
) -> Result<(), Error<E>> {
    let size = dtype.size();
    for sub in dst.chunks_mut(IO_BUF / size) {
        let mut buf = &mut io[..sub.len() * size];
        while !buf.is_empty() {
            match base.read(buf) {
                Ok(0) => return Err(FormatError::BaseTruncated { index }.into()),
                Ok(k) => {
                    let k = k.min(buf.len());
                    buf = &mut buf[k..];
                }
                Err(e) => return Err(Error::Source(e.into())),
            }
        }
        let bytes = &io[..sub.len() * size];
        match dtype {
            DType::F32 => {
                for (o, c) in sub.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            DType::F16 => {
                for (o, c) in sub.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }
    Ok(())
}
