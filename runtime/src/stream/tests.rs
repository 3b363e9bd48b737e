//! Tests of the streaming decoder against the slice parser and `compose::reconstruct`.
//!
//! Every success is compared bit for bit with [`compose::reconstruct`] on the same delta and base
//! (one delta, alpha 1); every refusal is compared with [`DeltaFile::parse`] followed by
//! [`DeltaFile::verify_payloads`]. The readers are [`Flaky`]: short reads of 1..=7 bytes in a
//! pseudo-random pattern, an error after `k` bytes, or the end of the stream after `k` bytes.

use half::f16;

use super::*;
use crate::compose::{self, Base};
use crate::format::{
    write_delta, Codec, Encoded, OwnedScales, TensorRecord, ENTRY_LEN, FLAG_SCALES_F16, MAX_SCALE,
};

// ---------------------------------------------------------------------------------------------
// Readers

/// The error of the test readers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TestErr {
    /// Injected by [`Flaky::fail_at`].
    Injected,
    /// The run was skipped: the (mutated) file asks for more base than a test should build.
    TooBig,
}

impl core::fmt::Display for TestErr {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl core::error::Error for TestErr {}

impl embedded_io::Error for TestErr {
    fn kind(&self) -> embedded_io::ErrorKind {
        embedded_io::ErrorKind::Other
    }
}

fn xorshift(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// A reader over a byte slice that can return short reads, fail, or end early.
#[derive(Clone, Debug)]
struct Flaky<'a> {
    data: &'a [u8],
    pos: usize,
    /// Short reads of 1..=7 bytes, from this xorshift state.
    short: Option<u64>,
    /// Every read at or after this many bytes fails.
    fail_at: Option<usize>,
    /// The stream ends after this many bytes.
    eof_at: Option<usize>,
}

impl<'a> Flaky<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self {
            data,
            pos: 0,
            short: None,
            fail_at: None,
            eof_at: None,
        }
    }
    fn short(self, seed: u64) -> Self {
        Self {
            short: Some(seed | 1),
            ..self
        }
    }
    fn fail_at(self, k: usize) -> Self {
        Self {
            fail_at: Some(k),
            ..self
        }
    }
    fn eof_at(self, k: usize) -> Self {
        Self {
            eof_at: Some(k),
            ..self
        }
    }
}

impl embedded_io::ErrorType for Flaky<'_> {
    type Error = TestErr;
}

impl embedded_io::Read for Flaky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, TestErr> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.fail_at.is_some_and(|f| self.pos >= f) {
            return Err(TestErr::Injected);
        }
        let end = self
            .eof_at
            .map_or(self.data.len(), |e| e.min(self.data.len()));
        if self.pos >= end {
            return Ok(0);
        }
        let mut k = buf.len().min(end - self.pos);
        if let Some(f) = self.fail_at {
            k = k.min(f - self.pos);
        }
        if let Some(s) = &mut self.short {
            *s = xorshift(*s);
            k = k.min(1 + (*s % 7) as usize);
        }
        buf[..k].copy_from_slice(&self.data[self.pos..self.pos + k]);
        self.pos += k;
        Ok(k)
    }
}

/// How the base reader of a run behaves.
#[derive(Clone, Copy, Debug, Default)]
struct BaseCfg {
    short: Option<u64>,
    fail_at: Option<usize>,
    eof_at: Option<usize>,
}

// ---------------------------------------------------------------------------------------------
// Fixture

struct Prng(u64);

impl Prng {
    fn next(&mut self) -> u64 {
        self.0 = xorshift(self.0);
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// Uniform-ish in `[lo, hi)`.
    fn f32_in(&mut self, lo: f32, hi: f32) -> f32 {
        lo + (hi - lo) * ((self.next() >> 40) as f32 / (1u64 << 24) as f32)
    }
}

fn manifest() -> Manifest<'static> {
    Manifest {
        name: "stream-test",
        description: "streaming decoder fixture",
        labels: "",
        tool: "bitdelta tests",
        sequence: 3,
        params: 0,
        base_fingerprint: [0x22; 32],
        result_fingerprint: [0x33; 32],
    }
}

fn sign_bits(rng: &mut Prng, n: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..n.div_ceil(8)).map(|_| rng.next() as u8).collect();
    if !n.is_multiple_of(8) {
        *b.last_mut().unwrap() &= (1u8 << (n % 8)) - 1;
    }
    b
}

/// `planes` interleaved planes of `n` sign bits, the padding bits of each plane clear.
fn plane_bits(rng: &mut Prng, n: usize, planes: usize) -> Vec<u8> {
    let mut b: Vec<u8> = (0..n.div_ceil(8) * planes)
        .map(|_| rng.next() as u8)
        .collect();
    if !n.is_multiple_of(8) {
        let last = b.len() - planes;
        for x in &mut b[last..] {
            *x &= (1u8 << (n % 8)) - 1;
        }
    }
    b
}

/// Valid `sparse-signs` entries, `m` per block of an `n`-element tensor.
fn sparse_entries(rng: &mut Prng, n: usize, m: usize) -> Vec<u8> {
    crate::codec::random_entries(|| rng.next(), n, m)
}

fn q8(rng: &mut Prng, n: usize) -> Vec<i8> {
    (0..n)
        .map(|_| (rng.below(255) as i16 - 127) as i8)
        .collect()
}

fn f16_scales(rng: &mut Prng, g: usize) -> OwnedScales {
    OwnedScales::F16(
        (0..g)
            .map(|i| match i % 4 {
                3 => f16::ZERO,
                _ => f16::from_f32(rng.f32_in(0.001, 2.0)),
            })
            .collect(),
    )
}

fn f32_scales(rng: &mut Prng, g: usize) -> OwnedScales {
    OwnedScales::F32(
        (0..g)
            .map(|i| match i % 5 {
                4 => 0.0,
                3 => MAX_SCALE,
                _ => rng.f32_in(0.0, 1.0),
            })
            .collect(),
    )
}

/// Every codec on both base dtypes, f16 and f32 scales, element counts that are not multiples of
/// 8, group sizes that are odd, and tensors longer than one stack buffer of every kind.
fn records(seed: u64) -> Vec<TensorRecord> {
    let mut rng = Prng(seed | 1);
    let r = &mut rng;
    let rec = |name: &str, dtype: DType, dims: &[u32], encoded: Encoded| TensorRecord {
        name: name.into(),
        dtype,
        dims: dims.to_vec(),
        encoded,
    };
    let raw32 = |r: &mut Prng, n| (0..n).map(|_| r.f32_in(-3.0, 3.0)).collect::<Vec<f32>>();
    let raw16 = |r: &mut Prng, n| {
        (0..n)
            .map(|_| f16::from_f32(r.f32_in(-3.0, 3.0)))
            .collect::<Vec<f16>>()
    };
    vec![
        rec("a.unchanged32", DType::F32, &[5, 3], Encoded::Unchanged),
        rec("b.unchanged16", DType::F16, &[7], Encoded::Unchanged),
        rec(
            "c.raw32",
            DType::F32,
            &[3, 101],
            Encoded::RawF32(raw32(r, 303)),
        ),
        rec(
            "d.raw32_on_f16",
            DType::F16,
            &[9],
            Encoded::RawF32(raw32(r, 9)),
        ),
        rec(
            "e.raw16",
            DType::F16,
            &[2, 150],
            Encoded::RawF16(raw16(r, 300)),
        ),
        rec(
            "f.raw16_on_f32",
            DType::F32,
            &[11],
            Encoded::RawF16(raw16(r, 11)),
        ),
        rec(
            "g.sign32",
            DType::F32,
            &[2100],
            Encoded::Sign {
                scale: 0.03,
                bits: sign_bits(r, 2100),
            },
        ),
        rec(
            "h.sign16",
            DType::F16,
            &[13],
            Encoded::Sign {
                scale: 0.25,
                bits: sign_bits(r, 13),
            },
        ),
        rec(
            "i.sign_groups_f16",
            DType::F32,
            &[3, 301],
            Encoded::SignGroups {
                scales: f16_scales(r, 3),
                bits: sign_bits(r, 903),
            },
        ),
        rec(
            "j.sign_groups_f32",
            DType::F16,
            &[4, 5],
            Encoded::SignGroups {
                scales: f32_scales(r, 4),
                bits: sign_bits(r, 20),
            },
        ),
        rec(
            "k.q8_f16",
            DType::F32,
            &[5, 61],
            Encoded::Q8Groups {
                scales: f16_scales(r, 5),
                q: q8(r, 305),
            },
        ),
        rec(
            "l.q8_f32",
            DType::F16,
            &[600],
            Encoded::Q8Groups {
                scales: f32_scales(r, 2),
                q: q8(r, 600),
            },
        ),
        rec(
            "m.scalar_sign",
            DType::F32,
            &[],
            Encoded::Sign {
                scale: 1.5,
                bits: vec![0],
            },
        ),
        rec(
            "n.q8_per_element",
            DType::F32,
            &[17],
            Encoded::Q8Groups {
                scales: f32_scales(r, 17),
                q: q8(r, 17),
            },
        ),
        rec(
            "o.sign_planes_f16",
            DType::F32,
            &[3, 1001],
            Encoded::SignPlanes {
                planes: 3,
                scales: f16_scales(r, 9),
                bits: plane_bits(r, 3003, 3),
            },
        ),
        rec(
            "p.sign_planes_f32",
            DType::F16,
            &[13],
            Encoded::SignPlanes {
                planes: 2,
                scales: f32_scales(r, 2),
                bits: plane_bits(r, 13, 2),
            },
        ),
        rec(
            "q.sign_planes_8",
            DType::F16,
            &[2, 333],
            Encoded::SignPlanes {
                planes: 8,
                scales: f16_scales(r, 16),
                bits: plane_bits(r, 666, 8),
            },
        ),
        rec(
            "r.sign_planes_f32_groups",
            DType::F32,
            &[6, 7],
            Encoded::SignPlanes {
                planes: 2,
                scales: f32_scales(r, 12),
                bits: plane_bits(r, 42, 2),
            },
        ),
        // Sparse signs: 47 blocks of 32 entries (1504 bytes, several stack buffers; the last
        // block has 56 elements), f16 scales.
        rec(
            "s.sparse_f16",
            DType::F32,
            &[3, 1000],
            Encoded::SparseSigns {
                scales: f16_scales(r, 3),
                entries: sparse_entries(r, 3000, 32),
            },
        ),
        // A short last block (6 elements), 5 entries per block, f32 scales, groups of 10 that
        // start inside a block.
        rec(
            "t.sparse_f32",
            DType::F16,
            &[7, 10],
            Encoded::SparseSigns {
                scales: f32_scales(r, 7),
                entries: sparse_entries(r, 70, 5),
            },
        ),
        rec(
            "u.sparse_1",
            DType::F32,
            &[3, 67],
            Encoded::SparseSigns {
                scales: f32_scales(r, 1),
                entries: sparse_entries(r, 201, 1),
            },
        ),
    ]
}

const COUNT: usize = 21;

fn fixture_at(align: u32) -> Vec<u8> {
    write_delta(&manifest(), &mut records(0x5eed), align).expect("fixture writes")
}

fn fixture() -> Vec<u8> {
    fixture_at(8)
}

/// The base values of tensor `index`, as stored (little-endian `dtype`).
fn base_bytes(index: u32, dtype: DType, n: u64) -> Vec<u8> {
    let mut rng = Prng(0x9e37_79b9_7f4a_7c15 ^ u64::from(index));
    let mut out = Vec::with_capacity(n as usize * dtype.size());
    for _ in 0..n {
        let v = rng.f32_in(-2.0, 2.0);
        match dtype {
            DType::F32 => out.extend_from_slice(&v.to_le_bytes()),
            DType::F16 => out.extend_from_slice(&f16::from_f32(v).to_le_bytes()),
        }
    }
    out
}

/// The refusal of the slice parser, or the rebuilt tensors (one delta, alpha 1).
fn reference(b: &[u8]) -> Result<Vec<Vec<f32>>, FormatError> {
    let f = DeltaFile::parse(b)?;
    f.verify_payloads()?;
    let mut all = Vec::new();
    for e in f.tensors() {
        let base = base_bytes(e.index, e.dtype, e.numel());
        let view = match e.dtype {
            DType::F32 => Base::F32Le(&base),
            DType::F16 => Base::F16Le(&base),
        };
        let mut out = vec![0f32; e.numel() as usize];
        compose::reconstruct(view, &[(e.payload().unwrap(), 1.0)], &mut out).unwrap();
        all.push(out);
    }
    Ok(all)
}

/// Largest number of base elements a run builds.
const MAX_RUN_ELEMS: u64 = 1 << 20;

/// Streams `delta` (claimed length `len`) with chunks of `chunk` elements; the base is one reader
/// over every tensor's base data in table order (so it also checks that each call reads exactly
/// `base_len` bytes). Checks the sink's offsets and lengths, the returned infos and the final
/// state on success.
fn run<R: Read<Error = TestErr>>(
    delta: R,
    len: u64,
    buf_len: usize,
    chunk: usize,
    cfg: BaseCfg,
) -> Result<Vec<Vec<f32>>, Error<TestErr>> {
    let mut buf = vec![0u8; buf_len];
    let mut dec = StreamDecoder::new(delta, len, &mut buf)?;
    let mut total = 0u64;
    for i in 0..dec.len() {
        total = total.saturating_add(dec.tensor(i).unwrap().numel());
    }
    if total > MAX_RUN_ELEMS {
        return Err(Error::Source(TestErr::TooBig));
    }
    let base: Vec<u8> = (0..dec.len())
        .flat_map(|i| {
            let t = dec.tensor(i).unwrap();
            base_bytes(t.index, t.dtype, t.numel())
        })
        .collect();
    let mut base_reader = Flaky::new(&base);
    base_reader.short = cfg.short;
    base_reader.fail_at = cfg.fail_at;
    base_reader.eof_at = cfg.eof_at;
    let mut out = vec![f32::NAN; chunk];
    let mut all = Vec::new();
    while let Some(info) = dec.peek() {
        let n = info.numel();
        let mut got = vec![f32::NAN; n as usize];
        let mut next = 0u64;
        let r = dec.next_tensor(&mut base_reader, &mut out, |at, c| {
            assert_eq!(at, next, "chunks arrive in order, without gaps");
            assert_eq!(c.len() as u64, (chunk as u64).min(n - at), "full chunks");
            got[at as usize..at as usize + c.len()].copy_from_slice(c);
            next += c.len() as u64;
        })?;
        assert_eq!(r, Some(info));
        assert_eq!(next, n, "every element was sunk");
        all.push(got);
    }
    assert!(dec.is_complete());
    assert_eq!(dec.position(), len);
    assert_eq!(
        dec.next_tensor(&mut base_reader, &mut out, |_, _| panic!())
            .unwrap(),
        None
    );
    assert_eq!(base_reader.pos, base.len(), "the base was read exactly");
    Ok(all)
}

fn big_buf(b: &[u8]) -> usize {
    2 * b.len() + 64
}

#[track_caller]
fn assert_bits_eq(got: &[Vec<f32>], want: &[Vec<f32>]) {
    assert_eq!(got.len(), want.len());
    for (t, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "tensor {t}");
        for (i, (a, b)) in g.iter().zip(w).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "tensor {t} element {i}: {a} != {b}"
            );
        }
    }
}

#[track_caller]
fn format_err(r: Result<Vec<Vec<f32>>, Error<TestErr>>) -> FormatError {
    match r {
        Err(Error::Format(e)) => e,
        Err(e) => panic!("expected a format error, got {e:?}"),
        Ok(_) => panic!("expected a format error, got success"),
    }
}

/// Sets the payload CRC of tensor `i` to the CRC of its bytes, then the meta and header CRCs.
fn reseal_payload(b: &mut [u8], i: usize) {
    let f = DeltaFile::parse(b).unwrap();
    let e = f.tensor(i).unwrap();
    let crc = crc32fast::hash(e.payload_bytes());
    let h = *f.header();
    let at = HEADER_LEN + h.manifest_len as usize + i * ENTRY_LEN + 40;
    b[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    reseal_meta(b);
}

/// Recomputes the meta CRC (if the header's payload offset is in bounds) and the header CRC.
fn reseal_meta(b: &mut [u8]) {
    let po = u64::from_le_bytes(b[32..40].try_into().unwrap());
    if let Some(meta) = usize::try_from(po)
        .ok()
        .and_then(|po| b.get(HEADER_LEN..po))
    {
        let crc = crc32fast::hash(meta);
        b[48..52].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32fast::hash(&b[..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
}

// ---------------------------------------------------------------------------------------------
// Success: bit-identical to compose

const CHUNKS: [usize; 12] = [1, 2, 3, 7, 8, 9, 63, 64, 65, 255, 1000, 4096];

#[test]
fn fixture_covers_every_codec_and_dtype() {
    let b = fixture();
    let f = DeltaFile::parse(&b).unwrap();
    assert_eq!(f.len(), COUNT);
    for codec in [
        Codec::Unchanged,
        Codec::RawF32,
        Codec::RawF16,
        Codec::Sign,
        Codec::SignGroups,
        Codec::Q8Groups,
        Codec::SignPlanes,
        Codec::SparseSigns,
    ] {
        for dtype in [DType::F32, DType::F16] {
            assert!(
                f.tensors().any(|e| e.codec == codec && e.dtype == dtype),
                "{codec:?} on {dtype:?}"
            );
        }
    }
    let f16_scales = |c| {
        f.tensors()
            .any(|e| e.codec == c && e.flags & FLAG_SCALES_F16 != 0)
    };
    let f32_scales = |c| {
        f.tensors()
            .any(|e| e.codec == c && e.flags & FLAG_SCALES_F16 == 0)
    };
    for c in [
        Codec::SignGroups,
        Codec::Q8Groups,
        Codec::SignPlanes,
        Codec::SparseSigns,
    ] {
        assert!(f16_scales(c) && f32_scales(c));
    }
    // Sparse entries over more than one stack buffer, and a short last block.
    assert!(f.tensors().any(|e| e.codec == Codec::SparseSigns
        && e.payload_bytes().len() - e.scale_bytes() as usize > 2 * IO_BUF));
    assert!(f
        .tensors()
        .any(|e| e.codec == Codec::SparseSigns && e.numel() % 64 != 0));
    // Sign planes over more than one segment of the stack buffer (`IO_BUF / planes - 2` rows).
    assert!(f
        .tensors()
        .any(|e| e.codec == Codec::SignPlanes && e.numel() > 8 * (IO_BUF / e.planes()) as u64));
    assert!(f.tensors().any(|e| e.rank() == 0));
    assert!(f
        .tensors()
        .any(|e| e.codec == Codec::Sign && e.numel() as usize > SIGN_SEG as usize));
}

#[test]
fn matches_compose_for_every_chunk_length() {
    let b = fixture();
    let want = reference(&b).unwrap();
    for chunk in CHUNKS {
        let got = run(
            Flaky::new(&b),
            b.len() as u64,
            big_buf(&b),
            chunk,
            BaseCfg::default(),
        );
        assert_bits_eq(&got.unwrap(), &want);
    }
}

#[test]
fn matches_compose_with_short_reads() {
    let b = fixture();
    let want = reference(&b).unwrap();
    for (k, chunk) in CHUNKS.into_iter().enumerate() {
        for seed in 0..4u64 {
            let s = seed * 1000 + k as u64;
            let cfg = BaseCfg {
                short: Some(s ^ 0xabcdef),
                ..BaseCfg::default()
            };
            let delta = Flaky::new(&b).short(s);
            let got = run(delta, b.len() as u64, big_buf(&b), chunk, cfg).unwrap();
            assert_bits_eq(&got, &want);
        }
    }
}

#[test]
fn matches_compose_at_every_alignment() {
    // 4096 puts padding longer than the stack buffer between payloads.
    for align in [1, 2, 8, 64, 4096] {
        let b = fixture_at(align);
        let want = reference(&b).unwrap();
        for chunk in [7, 64] {
            let delta = Flaky::new(&b).short(u64::from(align));
            let got = run(
                delta,
                b.len() as u64,
                big_buf(&b),
                chunk,
                BaseCfg::default(),
            );
            assert_bits_eq(&got.unwrap(), &want);
        }
    }
}

#[test]
fn infos_match_the_table() {
    let b = fixture();
    let f = DeltaFile::parse(&b).unwrap();
    let mut buf = vec![0u8; big_buf(&b)];
    let dec = StreamDecoder::new(&b[..], b.len() as u64, &mut buf).unwrap();
    assert_eq!(dec.len(), f.len());
    assert!(!dec.is_empty());
    assert_eq!(dec.header(), f.header());
    assert_eq!(dec.manifest(), f.manifest());
    assert_eq!(dec.position(), f.header().payload_offset);
    for e in f.tensors() {
        let t = dec.tensor(e.index as usize).unwrap();
        assert_eq!(t.index, e.index);
        assert_eq!(t.name, e.name);
        assert_eq!(t.codec, e.codec);
        assert_eq!(t.dtype, e.dtype);
        assert_eq!(t.flags, e.flags);
        assert_eq!(t.groups, e.groups);
        assert_eq!(t.scale.to_bits(), e.scale.to_bits());
        assert_eq!(t.crc, e.crc);
        assert_eq!(t.offset, e.offset);
        assert_eq!(t.len, e.payload_bytes().len() as u64);
        assert_eq!(t.rank(), e.rank());
        assert!(t.dims().iter().copied().eq(e.dims()));
        assert_eq!(t.numel(), e.numel());
        assert_eq!(t.base_len(), e.numel() * e.dtype.size() as u64);
    }
    assert!(dec.tensor(f.len()).is_none());
    assert!(dec.tensor(usize::MAX).is_none());
    assert_eq!(dec.peek(), dec.tensor(0));
}

#[test]
fn empty_delta() {
    let b = write_delta(&manifest(), &mut [], 8).unwrap();
    let mut buf = [0u8; 256];
    let mut dec = StreamDecoder::new(&b[..], b.len() as u64, &mut buf).unwrap();
    assert!(dec.is_empty() && dec.is_complete());
    assert_eq!(dec.peek(), None);
    let mut out = [0f32; 4];
    let mut nothing: &[u8] = &[];
    assert_eq!(
        dec.next_tensor(&mut nothing, &mut out, |_, _| panic!())
            .unwrap(),
        None
    );
    assert_eq!(dec.skip_tensor().unwrap(), None);
    assert_eq!(dec.position(), b.len() as u64);
}

#[test]
fn skip_and_per_tensor_base() {
    // The loader pattern: leave `unchanged` tensors alone, rebuild the others from a base reader
    // positioned per tensor.
    let b = fixture();
    let want = reference(&b).unwrap();
    let mut buf = vec![0u8; big_buf(&b)];
    let mut dec = StreamDecoder::new(&b[..], b.len() as u64, &mut buf).unwrap();
    let mut out = [0f32; 7];
    let mut seen = 0;
    while let Some(t) = dec.peek() {
        if t.codec == Codec::Unchanged {
            assert_eq!(dec.skip_tensor().unwrap(), Some(t));
            continue;
        }
        let base = base_bytes(t.index, t.dtype, t.numel());
        let mut got = vec![f32::NAN; t.numel() as usize];
        let r = dec.next_tensor(&mut &base[..], &mut out, |at, c| {
            got[at as usize..][..c.len()].copy_from_slice(c);
        });
        assert_eq!(r.unwrap(), Some(t));
        assert_bits_eq(&[got], &want[t.index as usize..][..1]);
        seen += 1;
    }
    assert_eq!(seen, COUNT - 2);
    assert!(dec.is_complete());
}

#[test]
fn skip_every_tensor() {
    let b = fixture();
    let mut buf = vec![0u8; big_buf(&b)];
    let mut dec = StreamDecoder::new(Flaky::new(&b).short(9), b.len() as u64, &mut buf).unwrap();
    for i in 0..COUNT {
        assert_eq!(dec.skip_tensor().unwrap().unwrap().index as usize, i);
    }
    assert_eq!(dec.skip_tensor().unwrap(), None);
    assert!(dec.is_complete());
    assert_eq!(dec.into_inner().pos, b.len());
}

/// The example of the module docs, verbatim (doctests are not part of the `--lib` runs).
#[test]
fn doc_example() {
    use crate::format::{write_delta, DType, Encoded, Manifest, TensorRecord};
    let example = || {
        let manifest = Manifest {
            name: "v1",
            description: "",
            labels: "",
            tool: "doc",
            sequence: 1,
            params: 0,
            base_fingerprint: [0; 32],
            result_fingerprint: [0; 32],
        };
        let mut records = [TensorRecord {
            name: "w".into(),
            dtype: DType::F32,
            dims: vec![3],
            encoded: Encoded::Sign {
                scale: 0.5,
                bits: vec![0b101],
            },
        }];
        let delta = write_delta(&manifest, &mut records, 8).unwrap();
        let base: Vec<u8> = [1.0f32, 2.0, 3.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();

        let mut buf = [0u8; 256]; // meta region + largest scale block
        let mut dec = StreamDecoder::new(&delta[..], delta.len() as u64, &mut buf)?;
        let mut out = [0f32; 2]; // any length >= 1
        let mut rebuilt = [0f32; 3];
        while let Some(info) = dec.peek() {
            assert_eq!(info.name, "w");
            let mut base_reader = &base[..]; // positioned at this tensor's data
            dec.next_tensor(&mut base_reader, &mut out, |at, chunk| {
                rebuilt[at as usize..][..chunk.len()].copy_from_slice(chunk);
            })?;
            // Only now is `rebuilt` trusted.
        }
        assert!(dec.is_complete());
        assert_eq!(rebuilt, [1.5, 1.5, 3.5]);
        Ok::<(), crate::Error>(())
    };
    example().unwrap();
}

// ---------------------------------------------------------------------------------------------
// Reader failures: errors, never panics

#[test]
fn delta_error_after_every_k_bytes() {
    let b = fixture();
    for k in 0..=b.len() {
        let delta = Flaky::new(&b).fail_at(k).short(k as u64);
        let r = run(delta, b.len() as u64, big_buf(&b), 64, BaseCfg::default());
        if k < b.len() {
            assert!(
                matches!(r, Err(Error::Source(TestErr::Injected))),
                "k = {k}: {r:?}"
            );
        } else {
            r.unwrap();
        }
    }
}

#[test]
fn delta_eof_after_every_k_bytes() {
    let b = fixture();
    for k in 0..b.len() {
        let delta = Flaky::new(&b).eof_at(k).short(k as u64 + 1);
        let r = run(delta, b.len() as u64, big_buf(&b), 7, BaseCfg::default());
        assert_eq!(
            format_err(r),
            FormatError::UnexpectedEof { offset: k as u64 },
            "k = {k}"
        );
    }
}

/// The table index of the tensor whose base data holds byte `k` of the concatenated base.
fn tensor_of_base_byte(b: &[u8], k: usize) -> u32 {
    let f = DeltaFile::parse(b).unwrap();
    let mut end = 0u64;
    for e in f.tensors() {
        end += e.numel() * e.dtype.size() as u64;
        if (k as u64) < end {
            return e.index;
        }
    }
    panic!("byte {k} is past the base");
}

#[test]
fn base_error_and_eof_after_every_k_bytes() {
    let b = fixture();
    let f = DeltaFile::parse(&b).unwrap();
    let total: u64 = f.tensors().map(|e| e.numel() * e.dtype.size() as u64).sum();
    // Every k near the start and near each tensor boundary, a sample elsewhere.
    let mut ends = vec![0u64];
    for e in f.tensors() {
        ends.push(ends.last().unwrap() + e.numel() * e.dtype.size() as u64);
    }
    let near_end = |k: u64| ends.iter().any(|&e| e.abs_diff(k) <= 3);
    let ks = (0..=total).filter(|&k| k < 300 || k % 23 == 0 || near_end(k));
    for k in ks.map(|k| k as usize) {
        let cfg = BaseCfg {
            short: Some(k as u64),
            fail_at: Some(k),
            ..BaseCfg::default()
        };
        let r = run(Flaky::new(&b), b.len() as u64, big_buf(&b), 64, cfg);
        if k < total as usize {
            assert!(
                matches!(r, Err(Error::Source(TestErr::Injected))),
                "k = {k}: {r:?}"
            );
        } else {
            r.unwrap();
        }
        if k < total as usize {
            let cfg = BaseCfg {
                eof_at: Some(k),
                ..BaseCfg::default()
            };
            let r = run(Flaky::new(&b), b.len() as u64, big_buf(&b), 9, cfg);
            let index = tensor_of_base_byte(&b, k);
            assert_eq!(
                format_err(r),
                FormatError::BaseTruncated { index },
                "k = {k}"
            );
        }
    }
}

#[test]
fn header_shorter_than_64_bytes() {
    let b = fixture();
    for len in 0..HEADER_LEN as u64 {
        let mut buf = [0u8; 16];
        let r = StreamDecoder::new(&b[..], len, &mut buf);
        assert!(
            matches!(r, Err(Error::Format(FormatError::HeaderTruncated { found })) if found as u64 == len),
            "{len}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Refusals: the same as the slice parser

/// Every truncation, with the length the caller claims equal to what is there: the same refusal
/// as `DeltaFile::parse` on the truncated bytes.
#[test]
fn truncation_refused_like_parse() {
    let b = fixture();
    for cut in 0..b.len() {
        let m = &b[..cut];
        let want = reference(m).unwrap_err();
        let got = format_err(run(
            Flaky::new(m),
            cut as u64,
            big_buf(&b),
            64,
            BaseCfg::default(),
        ));
        assert_eq!(got, want, "cut = {cut}");
    }
}

#[test]
fn wrong_claimed_length() {
    let b = fixture();
    let mut buf = vec![0u8; big_buf(&b)];
    let r = StreamDecoder::new(&b[..], b.len() as u64 + 1, &mut buf);
    assert!(matches!(
        r,
        Err(Error::Format(FormatError::LengthMismatch {
            field: crate::error::Field::FileLen,
            ..
        }))
    ));
}

/// Every single-byte corruption (three masks per byte), not re-sealed: exactly the refusal of
/// `DeltaFile::parse` + `verify_payloads` (header, meta and payload CRCs, padding).
#[test]
fn every_byte_corruption_refused_like_parse() {
    let b = fixture_at(64); // padding between payloads too
    for at in 0..b.len() {
        for mask in [0x01u8, 0x80, 0xff] {
            let mut m = b.clone();
            m[at] ^= mask;
            let want = reference(&m).expect_err("a corrupted byte is refused");
            let delta = Flaky::new(&m).short(at as u64);
            let got = format_err(run(
                delta,
                m.len() as u64,
                big_buf(&m),
                7,
                BaseCfg::default(),
            ));
            assert_eq!(got, want, "byte {at} ^ {mask:#04x}");
        }
    }
}

#[test]
fn corrupted_payload_byte_is_payload_checksum() {
    let b = fixture();
    let f = DeltaFile::parse(&b).unwrap();
    let want = reference(&b).unwrap();
    for e in f.tensors() {
        let start = e.offset as usize;
        for at in start..start + e.payload_bytes().len() {
            let mut m = b.clone();
            m[at] ^= 0x40;
            let found = crc32fast::hash(&m[start..start + e.payload_bytes().len()]);
            // Earlier tensors still come out right, then this one is refused.
            let mut buf = vec![0u8; big_buf(&m)];
            let mut dec = StreamDecoder::new(&m[..], m.len() as u64, &mut buf).unwrap();
            let mut out = [0f32; 64];
            for t in 0..e.index {
                let info = dec.tensor(t as usize).unwrap();
                let base = base_bytes(t, info.dtype, info.numel());
                let mut got = vec![f32::NAN; info.numel() as usize];
                dec.next_tensor(&mut &base[..], &mut out, |o, c| {
                    got[o as usize..][..c.len()].copy_from_slice(c);
                })
                .unwrap()
                .unwrap();
                assert_bits_eq(&[got], &want[t as usize..][..1]);
            }
            let base = base_bytes(e.index, e.dtype, e.numel());
            let r = dec.next_tensor(&mut &base[..], &mut out, |_, _| {});
            assert!(
                matches!(r, Err(Error::Format(FormatError::PayloadChecksum { index, expected, found: f }))
                    if index == e.index && expected == e.crc && f == found),
                "tensor {} byte {at}: {r:?}",
                e.index
            );
            // Spent: no further tensor, and never complete.
            assert!(!dec.is_complete());
            assert_eq!(dec.peek(), None);
            assert_eq!(
                dec.next_tensor(&mut &base[..], &mut out, |_, _| panic!())
                    .unwrap(),
                None
            );
            assert_eq!(dec.skip_tensor().unwrap(), None);
        }
    }
}

/// Edits a payload byte of tensor `name`, re-seals, and returns the file.
fn edit_payload(name: &str, f: impl FnOnce(&mut [u8], &TensorEntry<'_>)) -> (Vec<u8>, u32) {
    let mut b = fixture();
    let (i, e_off, e_len) = {
        let file = DeltaFile::parse(&b).unwrap();
        let e = file.find(name).unwrap();
        (e.index, e.offset as usize, e.payload_bytes().len())
    };
    {
        let copy = b.clone();
        let file = DeltaFile::parse(&copy).unwrap();
        let e = file.tensor(i as usize).unwrap();
        f(&mut b[e_off..e_off + e_len], &e);
    }
    reseal_payload(&mut b, i as usize);
    (b, i)
}

/// Value errors (scales, sign padding bits, -128) after re-sealing the CRCs: the same refusal as
/// `TensorEntry::payload`, and no chunk of that tensor reaches the sink after the error is known.
#[test]
fn value_errors_refused_like_payload() {
    let nan32 = f32::NAN.to_le_bytes();
    let cases: Vec<(&str, Vec<u8>, u32)> = vec![
        // (tensor, payload bytes to write at offset 0 or the entry scale, ...)
        ("i.sign_groups_f16", f16::INFINITY.to_le_bytes().to_vec(), 0),
        (
            "i.sign_groups_f16",
            f16::from_f32(-1.0).to_le_bytes().to_vec(),
            2,
        ),
        ("j.sign_groups_f32", nan32.to_vec(), 12),
        ("k.q8_f16", f16::NAN.to_le_bytes().to_vec(), 8),
        ("l.q8_f32", (MAX_SCALE * 2.0).to_le_bytes().to_vec(), 4),
        ("n.q8_per_element", (-0.5f32).to_le_bytes().to_vec(), 16 * 4),
        // Sign planes: plane 1's scale of group 2 (f16), plane 1's scale (f32).
        ("o.sign_planes_f16", f16::NAN.to_le_bytes().to_vec(), 2 * 5),
        ("p.sign_planes_f32", (-1.0f32).to_le_bytes().to_vec(), 4),
        ("s.sparse_f16", f16::NAN.to_le_bytes().to_vec(), 4),
        ("t.sparse_f32", (-0.5f32).to_le_bytes().to_vec(), 6 * 4),
    ];
    for (name, bytes, at) in cases {
        let (b, i) = edit_payload(name, |p, _| {
            p[at as usize..][..bytes.len()].copy_from_slice(&bytes);
        });
        check_value_error(&b, i, false);
    }
    // The per-tensor scale of `sign` lives in the table entry.
    for bad in [f32::NAN, f32::INFINITY, -1.0, MAX_SCALE * 1.5] {
        let mut b = fixture();
        let (i, at) = {
            let f = DeltaFile::parse(&b).unwrap();
            let i = f.find("g.sign32").unwrap().index as usize;
            (
                i,
                HEADER_LEN + f.header().manifest_len as usize + i * ENTRY_LEN + 36,
            )
        };
        b[at..at + 4].copy_from_slice(&bad.to_le_bytes());
        reseal_meta(&mut b);
        check_value_error(&b, i as u32, false);
    }
    // Sign padding bits, in the per-tensor and the group codec.
    for name in ["g.sign32", "h.sign16", "i.sign_groups_f16"] {
        let (b, i) = edit_payload(name, |p, e| {
            let n = e.numel() as usize;
            *p.last_mut().unwrap() |= 1 << (n % 8);
        });
        check_value_error(&b, i, true);
    }
    // Sign padding bits of each plane (13 elements, 2 planes: the last row is the last 2 bytes).
    for plane in 0..2 {
        let (b, i) = edit_payload("p.sign_planes_f32", |p, _| {
            let at = p.len() - 2 + plane;
            p[at] |= 1 << 5;
        });
        check_value_error(&b, i, true);
    }
    // Sparse indices: a duplicate in the first, a middle and the last block, an unsorted pair,
    // an index past the short last block.
    for (name, m) in [("s.sparse_f16", 32), ("t.sparse_f32", 5), ("u.sparse_1", 1)] {
        // With one entry per block, only the short last block (9 elements) can be wrong.
        let picks = if m == 1 { 2..3 } else { 0..3 };
        for pick in picks {
            let (b, i) = edit_payload(name, |p, e| {
                let entries = &mut p[e.scale_bytes() as usize..];
                let blocks = entries.len() / m;
                let at = [0, blocks / 2, blocks - 1][pick] * m;
                let block = &mut entries[at..at + m];
                if m == 1 {
                    block[0] = 0x09;
                } else {
                    block[1] = block[0] ^ 0x80;
                }
            });
            check_value_error(&b, i, true);
        }
    }
    let (b, i) = edit_payload("t.sparse_f32", |p, e| {
        let entries = &mut p[e.scale_bytes() as usize..];
        entries.swap(5, 6);
        let last = entries.len() - 1;
        entries[last] = 6;
    });
    check_value_error(&b, i, true);

    // -128 in the first, a middle and the last q8 byte.
    for name in ["k.q8_f16", "l.q8_f32"] {
        for pick in 0..3 {
            let (b, i) = edit_payload(name, |p, e| {
                let scales = p.len() - e.numel() as usize;
                let q = &mut p[scales..];
                let at = [0, q.len() / 2, q.len() - 1][pick];
                q[at] = 0x80;
            });
            check_value_error(&b, i, true);
        }
    }
}

/// Streams `b`, which has one value error in tensor `i`; `partial` when chunks before the error
/// may legitimately have been sunk (sign padding and -128 are found in the data, not the scales).
fn check_value_error(b: &[u8], i: u32, partial: bool) {
    let want = {
        let f = DeltaFile::parse(b).unwrap();
        f.tensor(i as usize).unwrap().payload().unwrap_err()
    };
    assert_eq!(reference(b).unwrap_err(), want);
    for chunk in [1, 7, 64, 4096] {
        let got = format_err(run(
            Flaky::new(b).short(chunk as u64),
            b.len() as u64,
            big_buf(b),
            chunk,
            BaseCfg::default(),
        ));
        assert_eq!(got, want, "chunk {chunk}");
    }
    // No chunk after the error; none at all for scale errors.
    let mut buf = vec![0u8; big_buf(b)];
    let mut dec = StreamDecoder::new(b, b.len() as u64, &mut buf).unwrap();
    for _ in 0..i {
        dec.skip_tensor().unwrap().unwrap();
    }
    let t = dec.peek().unwrap();
    let base = base_bytes(t.index, t.dtype, t.numel());
    let mut sunk = 0u64;
    let mut out = [0f32; 7];
    let r = dec.next_tensor(&mut &base[..], &mut out, |_, c| sunk += c.len() as u64);
    assert!(matches!(r, Err(Error::Format(e)) if e == want));
    if partial {
        assert!(sunk < t.numel());
    } else {
        assert_eq!(sunk, 0);
    }
    // `skip_tensor` refuses it the same way.
    let mut buf = vec![0u8; big_buf(b)];
    let mut dec = StreamDecoder::new(b, b.len() as u64, &mut buf).unwrap();
    for _ in 0..i {
        dec.skip_tensor().unwrap().unwrap();
    }
    assert!(matches!(dec.skip_tensor(), Err(Error::Format(e)) if e == want));
}

#[test]
fn checksum_reported_before_value_errors() {
    // A bad scale and a wrong CRC: the CRC wins, as in `TensorEntry::payload`.
    let (mut b, i) = edit_payload("l.q8_f32", |p, _| {
        p[0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    });
    let f = DeltaFile::parse(&b).unwrap();
    let last = f.tensor(i as usize).unwrap().offset as usize + 10;
    b[last] ^= 1; // a q8 byte, CRC not resealed
    let want = reference(&b).unwrap_err();
    assert!(matches!(want, FormatError::PayloadChecksum { index, .. } if index == i));
    let got = format_err(run(
        Flaky::new(&b),
        b.len() as u64,
        big_buf(&b),
        64,
        BaseCfg::default(),
    ));
    assert_eq!(got, want);
}

#[test]
fn nonzero_padding_between_payloads() {
    let b = fixture_at(64);
    let f = DeltaFile::parse(&b).unwrap();
    let mut gaps = 0;
    let mut cursor = f.header().payload_offset as usize;
    for e in f.tensors() {
        for at in cursor..e.offset as usize {
            let mut m = b.clone();
            m[at] = 0x01;
            let want = FormatError::PaddingNotZero { offset: at as u64 };
            assert_eq!(reference(&m).unwrap_err(), want);
            let got = format_err(run(
                Flaky::new(&m),
                m.len() as u64,
                big_buf(&m),
                64,
                BaseCfg::default(),
            ));
            assert_eq!(got, want);
            gaps += 1;
        }
        cursor = e.offset as usize + e.payload_bytes().len();
    }
    assert!(gaps > 0);
}

// ---------------------------------------------------------------------------------------------
// Buffer

#[test]
fn buffer_len_is_exact() {
    let b = fixture();
    let f = DeltaFile::parse(&b).unwrap();
    let needed = buffer_len(&f);
    let meta_len = f.header().payload_offset - HEADER_LEN as u64;
    // The largest scale block: 17 f32 scales.
    assert_eq!(needed, meta_len + 17 * 4);
    let want = reference(&b).unwrap();
    let got = run(
        Flaky::new(&b),
        b.len() as u64,
        needed as usize,
        7,
        BaseCfg::default(),
    );
    assert_bits_eq(&got.unwrap(), &want);
    for (len, expect) in [
        (needed - 1, needed),
        (meta_len, needed),
        (meta_len - 1, meta_len),
        (0, meta_len),
    ] {
        let mut buf = vec![0u8; len as usize];
        let r = StreamDecoder::new(&b[..], b.len() as u64, &mut buf);
        assert!(
            matches!(r, Err(Error::Format(FormatError::BufferTooSmall { needed, found }))
                if needed == expect && found == len),
            "{len}: {r:?}"
        );
    }
}

#[test]
#[should_panic(expected = "out_chunk must hold at least one element")]
fn empty_out_chunk_panics() {
    let b = fixture();
    let mut buf = vec![0u8; big_buf(&b)];
    let mut dec = StreamDecoder::new(&b[..], b.len() as u64, &mut buf).unwrap();
    let mut nothing: &[u8] = &[];
    let _ = dec.next_tensor(&mut nothing, &mut [], |_, _| {});
}

#[test]
fn new_errors_display() {
    let s = std::format!(
        "{} / {} / {}",
        FormatError::UnexpectedEof { offset: 77 },
        FormatError::BufferTooSmall {
            needed: 100,
            found: 10
        },
        FormatError::BaseTruncated { index: 3 }
    );
    assert_eq!(
        s,
        "delta stream ended early: byte 77 is missing / buffer too small for the meta region and \
         group scales: expected at least 100 bytes, found 10 / tensor 3: base data ended early"
    );
}

// ---------------------------------------------------------------------------------------------
// Properties

#[cfg(not(miri))]
mod props {
    use proptest::prelude::*;

    use super::*;

    fn one_tensor(
        codec: u8,
        dtype16: bool,
        dims: Vec<u32>,
        groups_pick: usize,
        f16_scales: bool,
        seed: u64,
    ) -> Vec<u8> {
        let mut rng = Prng(seed | 1);
        let n: u64 = dims.iter().map(|&d| u64::from(d)).product();
        let n = n as usize;
        let divisors: Vec<usize> = (1..=n).filter(|&g| n.is_multiple_of(g)).collect();
        let g = divisors[groups_pick % divisors.len()];
        let scales = |r: &mut Prng| {
            if f16_scales {
                super::f16_scales(r, g)
            } else {
                super::f32_scales(r, g)
            }
        };
        let encoded = match codec {
            0 => Encoded::Unchanged,
            1 => Encoded::RawF32((0..n).map(|_| rng.f32_in(-9.0, 9.0)).collect()),
            2 => Encoded::RawF16(
                (0..n)
                    .map(|_| f16::from_f32(rng.f32_in(-9.0, 9.0)))
                    .collect(),
            ),
            3 => Encoded::Sign {
                scale: rng.f32_in(0.0, 2.0),
                bits: sign_bits(&mut rng, n),
            },
            4 => Encoded::SignGroups {
                scales: scales(&mut rng),
                bits: sign_bits(&mut rng, n),
            },
            5 => Encoded::Q8Groups {
                scales: scales(&mut rng),
                q: q8(&mut rng, n),
            },
            7 => {
                let m = 1 + (seed % 32) as usize % crate::codec::max_entries(n as u64);
                Encoded::SparseSigns {
                    scales: scales(&mut rng),
                    entries: sparse_entries(&mut rng, n, m),
                }
            }
            _ => {
                let planes = 2 + (seed % 7) as usize;
                let scales = if f16_scales {
                    super::f16_scales(&mut rng, g * planes)
                } else {
                    super::f32_scales(&mut rng, g * planes)
                };
                Encoded::SignPlanes {
                    planes,
                    scales,
                    bits: plane_bits(&mut rng, n, planes),
                }
            }
        };
        let dtype = if dtype16 { DType::F16 } else { DType::F32 };
        let mut recs = vec![
            TensorRecord {
                name: "p".into(),
                dtype,
                dims,
                encoded,
            },
            // A second tensor, so that a chunk or carry bug in the first shows up in the next.
            TensorRecord {
                name: "q".into(),
                dtype: DType::F32,
                dims: vec![11],
                encoded: Encoded::Sign {
                    scale: 0.5,
                    bits: sign_bits(&mut rng, 11),
                },
            },
        ];
        write_delta(&manifest(), &mut recs, 1u32 << (seed % 4)).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random shapes, codecs, group counts, chunk lengths and read patterns: bit-identical to
        /// `compose::reconstruct`.
        #[test]
        fn random_tensor_matches_compose(
            codec in 0u8..8,
            dtype16 in any::<bool>(),
            dims in prop::collection::vec(1u32..40, 0..4),
            groups_pick in any::<usize>(),
            f16_scales in any::<bool>(),
            seed in any::<u64>(),
            chunk in 1usize..100,
            short in any::<bool>(),
        ) {
            let b = one_tensor(codec, dtype16, dims, groups_pick, f16_scales, seed);
            let want = reference(&b).unwrap();
            let delta = if short { Flaky::new(&b).short(seed) } else { Flaky::new(&b) };
            let cfg = BaseCfg { short: short.then_some(!seed), ..BaseCfg::default() };
            let got = run(delta, b.len() as u64, big_buf(&b), chunk, cfg).unwrap();
            assert_bits_eq(&got, &want);
        }

        /// Random bytes overwritten then every CRC re-sealed: the decoder never panics, succeeds
        /// exactly when the slice parser does (with the same values), and reports the same
        /// refusal, except where the parser reports padding between payloads (checked by the
        /// stream only when it gets there).
        #[test]
        fn mutated_resealed_like_parse(
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            chunk in 1usize..80,
            seed in any::<u64>(),
        ) {
            let mut m = fixture();
            for (at, v) in edits {
                let at = at.index(m.len());
                m[at] = v;
            }
            // Re-seal the meta and header CRCs, then the payload CRCs the (possibly edited)
            // table still locates.
            reseal_meta(&mut m);
            let fixes: Vec<usize> = match DeltaFile::parse(&m) {
                Ok(f) => f.tensors().map(|e| e.index as usize).collect(),
                Err(_) => Vec::new(),
            };
            for i in fixes {
                reseal_payload(&mut m, i);
            }
            let want = reference(&m);
            let too_big = matches!(&want, Ok(t) if t.iter().map(|v| v.len() as u64).sum::<u64>() > MAX_RUN_ELEMS);
            prop_assume!(!too_big);
            let got = run(Flaky::new(&m).short(seed), m.len() as u64, big_buf(&m), chunk, BaseCfg::default());
            match (got, want) {
                (Ok(g), Ok(w)) => assert_bits_eq(&g, &w),
                (Err(Error::Source(TestErr::TooBig)), Err(_)) => {}
                (Err(Error::Format(g)), Err(w)) => {
                    if !matches!(w, FormatError::PaddingNotZero { .. }) {
                        prop_assert_eq!(g, w);
                    }
                }
                (g, w) => prop_assert!(false, "stream {:?}, parse {:?}", g.map(|_| ()), w.map(|_| ())),
            }
        }
    }
}

#[test]
fn skipping_a_huge_unchanged_tensor_reads_and_walks_nothing() {
    // 2^40 declared elements and no payload: skipping must not walk the extent (it would take
    // minutes on a device), and the decoder must land on the next tensor.
    let mut recs = vec![
        TensorRecord {
            name: "a.huge".into(),
            dtype: DType::F32,
            dims: vec![1 << 20, 1 << 20],
            encoded: Encoded::Unchanged,
        },
        TensorRecord {
            name: "b.small".into(),
            dtype: DType::F32,
            dims: vec![3],
            encoded: Encoded::RawF32(vec![1.0, 2.0, 3.0]),
        },
    ];
    let b = write_delta(&manifest(), &mut recs, 8).unwrap();
    let mut buf = vec![0u8; big_buf(&b)];
    let mut dec = StreamDecoder::new(&b[..], b.len() as u64, &mut buf).unwrap();
    assert_eq!(dec.skip_tensor().unwrap().unwrap().numel(), 1 << 40);
    let mut out = [0f32; 4];
    let mut got = [0f32; 3];
    let base = [0u8; 12];
    dec.next_tensor(&mut &base[..], &mut out, |at, c| {
        got[at as usize..][..c.len()].copy_from_slice(c);
    })
    .unwrap()
    .unwrap();
    assert_eq!(got, [1.0, 2.0, 3.0]);
    assert!(dec.is_complete());
}
