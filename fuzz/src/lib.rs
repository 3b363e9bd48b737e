//! What the fuzz targets check; each target in `fuzz_targets/` is one call into here.
//!
//! - [`parse`]: [`DeltaFile::parse`], [`DeltaFile::verify_payloads`] and every accessor; each
//!   payload that passes its checks is rebuilt with [`compose::reconstruct`] over a synthetic
//!   base (alone at alpha 1, and composed twice with other alphas), which must succeed; a valid
//!   delta must round-trip through [`write_delta`].
//! - [`stream`]: the `no_std` [`StreamDecoder`] over the byte slice must refuse what
//!   [`DeltaFile`] refuses, with the same error (except the zero padding between payloads, which
//!   it checks as it passes over it), and rebuild, chunk by chunk, exactly the bits
//!   [`compose::reconstruct`] gives.
//!
//! Every byte of a delta is under a CRC, so random mutations rarely get past the header and meta
//! checksums. Each target therefore runs twice per input: on the bytes as they are (the
//! checksum paths), and on a copy with every checksum the input's own layout fields locate
//! recomputed ([`seal`]), so that mutations reach the structural and payload checks behind them.
//!
//! Any panic, overflow (the targets build with overflow checks), disagreement or hang is a bug.

use bitdelta::compose::{self, Base};
use bitdelta::format::{write_delta, DType, Encoded, Payload, TensorEntry, TensorRecord};
use bitdelta::stream::StreamDecoder;
use bitdelta::{DeltaFile, Error, FormatError};

/// Tensors with more elements are not rebuilt. An `unchanged` entry has no payload, so its
/// element count is bounded by the format's cap (2^40), not by the input's length.
pub const MAX_REBUILD: u64 = 1 << 16;

/// A base tensor of `n` elements of `dtype`, little-endian: ordinary values, both zeros, a
/// subnormal and large magnitudes, so that rounding and signed zeros matter.
fn base_bytes(n: u64, dtype: DType) -> Vec<u8> {
    let value = |i: u64| match i % 7 {
        0 => 0.0,
        1 => -0.0,
        2 => 1.0e-40,
        3 => -65504.0,
        _ => (i as f32 * 0.37).sin() * 3.0,
    };
    let mut out = Vec::with_capacity(n as usize * dtype.size());
    for i in 0..n {
        match dtype {
            DType::F32 => out.extend_from_slice(&value(i).to_le_bytes()),
            DType::F16 => out.extend_from_slice(&half::f16::from_f32(value(i)).to_le_bytes()),
        }
    }
    out
}

fn base_view(bytes: &[u8], dtype: DType) -> Base<'_> {
    match dtype {
        DType::F32 => Base::F32Le(bytes),
        DType::F16 => Base::F16Le(bytes),
    }
}

/// Rebuilds entry `e` (whose payload passed its checks) alone at alpha 1.
fn rebuild(e: &TensorEntry<'_>, p: Payload<'_>, base: &[u8]) -> Vec<f32> {
    let mut out = vec![0f32; e.numel() as usize];
    compose::reconstruct(base_view(base, e.dtype), &[(p, 1.0)], &mut out)
        .unwrap_or_else(|err| panic!("tensor {}: a checked payload does not fit: {err}", e.index));
    out
}

/// `data` with its checksums recomputed where its own header and table locate them: each
/// payload CRC (entries in the file, payloads inside it), then the meta CRC over
/// `[64, payload_offset)`, then the header CRC. `None` when `data` is shorter than the header or
/// already sealed.
pub fn seal(data: &[u8]) -> Option<Vec<u8>> {
    let rd = |b: &[u8], at: usize, w: usize| -> Option<u64> {
        let mut v = [0u8; 8];
        v[..w].copy_from_slice(b.get(at..at.checked_add(w)?)?);
        Some(u64::from_le_bytes(v))
    };
    let range = |start: u64, len: u64| -> Option<core::ops::Range<usize>> {
        let start = usize::try_from(start).ok()?;
        Some(start..start.checked_add(usize::try_from(len).ok()?)?)
    };
    use bitdelta::format::{entry_field as ef, header_field as hf, ENTRY_LEN, HEADER_LEN};
    let mut b = data.to_vec();
    if b.len() < HEADER_LEN {
        return None;
    }
    let table = HEADER_LEN + rd(&b, hf::MANIFEST_LEN, 4)? as usize;
    let payload_offset = rd(&b, hf::PAYLOAD_OFFSET, 8)?;
    for i in 0..rd(&b, hf::TENSORS, 4)? as usize {
        let e = table + ENTRY_LEN * i;
        if e + ENTRY_LEN > b.len() {
            break;
        }
        let (Some(off), Some(len)) = (rd(&b, e + ef::OFFSET, 8), rd(&b, e + ef::LEN, 8)) else {
            break;
        };
        let payload = payload_offset
            .checked_add(off)
            .and_then(|start| range(start, len))
            .and_then(|r| b.get(r));
        if let Some(p) = payload {
            let crc = crc32fast::hash(p);
            b[e + ef::CRC..e + ef::CRC + 4].copy_from_slice(&crc.to_le_bytes());
        }
    }
    let meta = range(
        HEADER_LEN as u64,
        payload_offset.saturating_sub(HEADER_LEN as u64),
    );
    if let Some(meta) = meta.and_then(|r| b.get(r)) {
        let crc = crc32fast::hash(meta);
        b[hf::META_CRC..hf::META_CRC + 4].copy_from_slice(&crc.to_le_bytes());
    }
    let crc = crc32fast::hash(&b[..hf::CRC]);
    b[hf::CRC..hf::CRC + 4].copy_from_slice(&crc.to_le_bytes());
    (b != data).then_some(b)
}

/// Fuzz target `parse`: [`check_parse`] on the input, then on it [sealed](seal).
pub fn parse(data: &[u8]) {
    check_parse(data);
    if let Some(sealed) = seal(data) {
        check_parse(&sealed);
    }
}

/// Fuzz target `stream`: [`check_stream`] on the input, then on it [sealed](seal).
pub fn stream(data: &[u8]) {
    check_stream(data);
    if let Some(sealed) = seal(data) {
        check_stream(&sealed);
    }
}

/// The slice parser on `data`: see the [crate docs](crate).
pub fn check_parse(data: &[u8]) {
    let Ok(file) = DeltaFile::parse(data) else {
        return;
    };
    let checked = file.verify_payloads();
    let _ = (
        file.header(),
        file.manifest().labels().count(),
        file.params(),
    );
    assert_eq!(file.tensors().count(), file.len());
    let mut first = None;
    for e in file.tensors() {
        assert_eq!(file.find(e.name).map(|f| f.index), Some(e.index));
        assert_eq!(e.dims().count(), e.rank());
        let p = match e.payload() {
            Ok(p) => p,
            Err(err) => {
                first.get_or_insert(err);
                continue;
            }
        };
        if e.numel() > MAX_REBUILD {
            continue;
        }
        let base = base_bytes(e.numel(), e.dtype);
        rebuild(&e, p, &base);
        let mut out = vec![0f32; e.numel() as usize];
        compose::reconstruct(base_view(&base, e.dtype), &[(p, 0.5), (p, -1.25)], &mut out)
            .unwrap_or_else(|err| panic!("tensor {}: composition refused: {err}", e.index));
    }
    // `verify_payloads` reports the first failing payload in table order.
    assert_eq!(checked.err(), first);
    if checked.is_ok() {
        round_trip(&file);
    }
}

/// The payload as a record for [`write_delta`].
fn encoded(p: Payload<'_>) -> Encoded {
    p.to_encoded()
}

/// A valid delta, written again from what was parsed, parses to the same manifest, alignment,
/// entries and payload bytes (the bytes may differ: v1 allows shared or unreferenced dims and
/// names ranges).
fn round_trip(file: &DeltaFile<'_>) {
    let mut records: Vec<TensorRecord> = file
        .tensors()
        .map(|e| TensorRecord {
            name: e.name.into(),
            dtype: e.dtype,
            dims: e.dims().collect(),
            encoded: encoded(e.payload().expect("verified")),
        })
        .collect();
    let again = write_delta(file.manifest(), &mut records, file.header().alignment)
        .unwrap_or_else(|e| panic!("a valid delta cannot be written again: {e}"));
    let g = DeltaFile::parse(&again).expect("the writer's output parses");
    g.verify_payloads().expect("the writer's payloads verify");
    assert_eq!(g.manifest(), file.manifest());
    assert_eq!(g.header().alignment, file.header().alignment);
    assert_eq!(g.len(), file.len());
    for (a, b) in file.tensors().zip(g.tensors()) {
        assert_eq!(
            (a.name, a.dtype, a.codec, a.flags),
            (b.name, b.dtype, b.codec, b.flags)
        );
        assert_eq!(
            (a.groups, a.scale.to_bits(), a.crc),
            (b.groups, b.scale.to_bits(), b.crc)
        );
        assert!(a.dims().eq(b.dims()));
        assert_eq!(a.payload_bytes(), b.payload_bytes());
    }
}

/// The streaming decoder on `data`, against the slice parser: see the [crate docs](crate).
pub fn check_stream(data: &[u8]) {
    let parsed = DeltaFile::parse(data);
    // The padding between payloads starts at `payload_offset` (header bytes 32..40).
    let between_payloads = |e: &FormatError| match e {
        FormatError::PaddingNotZero { offset } => data
            .get(32..40)
            .is_some_and(|b| *offset >= u64::from_le_bytes(b.try_into().unwrap())),
        _ => false,
    };
    // The meta region and any one payload's scales each fit in the input's length.
    let mut buf = vec![0u8; 2 * data.len() + 64];
    let mut dec = match (
        StreamDecoder::new(data, data.len() as u64, &mut buf),
        &parsed,
    ) {
        (Ok(d), Ok(_)) => d,
        (Ok(d), Err(e)) if between_payloads(e) => d,
        (Err(Error::Format(s)), Err(e)) if s == *e || between_payloads(e) => return,
        (d, p) => panic!(
            "the stream decoder gives {:?}, DeltaFile::parse gives {:?}",
            d.err(),
            p.as_ref().err()
        ),
    };
    let file = parsed.ok();
    // Any chunk length gives the same values; take one from the input.
    let mut out = vec![0f32; 1 + data.len() % 61];
    while let Some(info) = dec.peek() {
        let n = info.numel();
        if n > MAX_REBUILD {
            return;
        }
        let base = base_bytes(n, info.dtype);
        let mut got = vec![f32::NAN; n as usize];
        let mut at = 0u64;
        let res = dec.next_tensor(&mut &base[..], &mut out, |start, chunk| {
            assert_eq!(start, at, "chunks come in order");
            assert!(!chunk.is_empty());
            got[start as usize..][..chunk.len()].copy_from_slice(chunk);
            at += chunk.len() as u64;
        });
        let entry = file
            .as_ref()
            .map(|f| f.tensor(info.index as usize).unwrap());
        match res {
            Ok(Some(t)) => {
                assert_eq!(t.index, info.index);
                assert_eq!(at, n, "every element was sunk");
                if let Some(e) = entry {
                    let p = e.payload().unwrap_or_else(|err| {
                        panic!(
                            "tensor {}: streamed, but its payload is refused: {err}",
                            e.index
                        )
                    });
                    let want = rebuild(&e, p, &base);
                    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                        assert_eq!(a.to_bits(), b.to_bits(), "tensor {} element {i}", e.index);
                    }
                }
            }
            Ok(None) => panic!("peek announced tensor {}", info.index),
            Err(Error::Format(s)) => {
                // The same refusal as the payload checks of the slice parser.
                if let Some(e) = entry {
                    assert_eq!(Err(s), e.payload().map(|_| ()), "tensor {}", e.index);
                }
                assert!(!dec.is_complete() && dec.peek().is_none());
                return;
            }
            Err(e) => panic!("a slice reader cannot fail: {e:?}"),
        }
    }
    assert!(dec.is_complete());
    let file = file.expect("the stream decoder accepts a file DeltaFile::parse refuses");
    file.verify_payloads()
        .expect("the stream decoder accepts payloads DeltaFile refuses");
}
