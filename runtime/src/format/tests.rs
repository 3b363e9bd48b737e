//! Tests of delta format v1: writer/parser round trip, one test per refusal class of
//! [`FormatError`], exhaustive truncation and bit flips, and proptest robustness.
//!
//! Refusal tests start from a valid file written by [`write_delta`], edit a few bytes, then
//! re-seal the checksums the edit would otherwise break (payload CRCs in the table, the meta CRC
//! at header offset 48, the header CRC at 60), so that each test reaches the check it targets
//! instead of stopping at a checksum. Every refusal test asserts the exact variant and fields.
//!
//! `SizeOverflow` is reachable only through the entry payload offset (`payload_offset + offset`
//! or `+ len` overflowing `u64`); the other `SizeOverflow` sites in the parser cannot be reached
//! because every count feeding them is capped first (see `size_overflow_from_entry_offset`).
#![cfg(feature = "alloc")]

use core::ops::Range;

use half::f16;

use super::*;
use crate::error::{Cap, Field, FormatError};

/// Default alignment of the fixture.
const ALIGN: u32 = DEFAULT_ALIGN;

// Header and entry field offsets, from the one layout definition.
use super::entry_field::{
    CODEC as E_CODEC, CRC as E_CRC, DIMS_START as E_DIMS, DTYPE as E_DTYPE, FLAGS as E_FLAGS,
    GROUPS as E_GROUPS, LEN as E_LEN, NAME_LEN as E_NAME_LEN, NAME_OFF as E_NAME_OFF,
    OFFSET as E_OFFSET, RANK as E_RANK, RESERVED as E_RESERVED, SCALE as E_SCALE,
};
use super::header_field::{
    ALIGNMENT as H_ALIGN, CRC as H_CRC, DIMS as H_DIMS, FILE_LEN as H_FILE_LEN,
    MANIFEST_LEN as H_MANIFEST_LEN, META_CRC as H_META_CRC, NAMES_LEN as H_NAMES_LEN,
    PAYLOAD_OFFSET as H_PAYLOAD_OFFSET, TENSORS as H_TENSORS, VERSION as H_VERSION,
};

// Fixture tensors, by table index (the table is sorted by name).
const UNCHANGED: u32 = 0;
const RAW_F32: u32 = 1;
const RAW_F16: u32 = 2;
const SIGN: u32 = 3;
const SIGN_GROUPS_F16: u32 = 4;
const SIGN_GROUPS_F32: u32 = 5;
const Q8_F16: u32 = 6;
const Q8_F32: u32 = 7;
const SCALAR: u32 = 8;
const PLANES_F16: u32 = 9;
const PLANES_F32: u32 = 10;
const UNICODE: u32 = 11;
const COUNT: u32 = 12;

/// Fixture names in table order.
const NAMES: [&str; COUNT as usize] = [
    "a.unchanged",
    "b.raw_f32",
    "c.raw_f16",
    "d.sign",
    "e.sign_groups_f16",
    "f.sign_groups_f32",
    "g.q8_f16",
    "h.q8_f32",
    "i.scalar",
    "j.sign_planes_f16",
    "k.sign_planes_f32",
    "z.\u{fc}n\u{ef}code",
];

/// Sum of the fixture's element counts.
const FIXTURE_PARAMS: u64 = 15 + 7 + 6 + 13 + 12 + 20 + 9 + 18 + 1 + 15 + 8 + 2;
/// Sum of the fixture's ranks.
const FIXTURE_DIMS: usize = 25 + 2 + 1;

// ---------------------------------------------------------------------------------------------
// Byte helpers

fn rd16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn rd32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn rd64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}
fn wr16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_le_bytes());
}
fn wr32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}
fn wr64(b: &mut [u8], o: usize, v: u64) {
    b[o..o + 8].copy_from_slice(&v.to_le_bytes());
}
fn crc(b: &[u8]) -> u32 {
    crc32fast::hash(b)
}

// ---------------------------------------------------------------------------------------------
// Fixture

fn f16s(v: &[f32]) -> Vec<f16> {
    v.iter().copied().map(f16::from_f32).collect()
}

fn manifest() -> Manifest<'static> {
    Manifest {
        name: "variant-1.b_2",
        description: "test delta: every codec",
        labels: "cat\ndog\n",
        tool: "bitdelta tests",
        sequence: 7,
        params: 0, // filled in by write_delta
        base_fingerprint: [0x11; 32],
        result_fingerprint: core::array::from_fn(|i| i as u8),
    }
}

const RAW_F32_VALUES: [f32; 7] = [0.0, -0.0, 1.5, -2.25, f32::MAX, f32::MIN_POSITIVE, 1.0e-40];

/// Every codec; ranks 0, 1, 2, 3, 4 and 8; element counts that are not multiples of 8; given
/// out of order (the writer sorts).
fn records() -> Vec<TensorRecord> {
    let rec = |name: &str, dtype: DType, dims: &[u32], encoded: Encoded| TensorRecord {
        name: name.into(),
        dtype,
        dims: dims.to_vec(),
        encoded,
    };
    vec![
        rec(
            NAMES[UNICODE as usize],
            DType::F32,
            &[1, 1, 1, 1, 1, 1, 1, 2],
            Encoded::Unchanged,
        ),
        rec(
            NAMES[7],
            DType::F32,
            &[1, 2, 3, 3],
            Encoded::Q8Groups {
                scales: OwnedScales::F32(vec![MAX_SCALE, 0.0]),
                q: (0..18).map(|i| ((i * 37) % 255 - 127) as i8).collect(),
            },
        ),
        rec(
            NAMES[3],
            DType::F16,
            &[13],
            Encoded::Sign {
                scale: 0.25,
                bits: vec![0b1010_1010, 0b0001_0110],
            },
        ),
        rec(
            NAMES[1],
            DType::F32,
            &[7],
            Encoded::RawF32(RAW_F32_VALUES.to_vec()),
        ),
        rec(
            NAMES[5],
            DType::F32,
            &[2, 2, 5],
            Encoded::SignGroups {
                scales: OwnedScales::F32(vec![1e-3, 0.0, MAX_SCALE, 7.5]),
                bits: vec![0x00, 0xff, 0x05],
            },
        ),
        rec(NAMES[0], DType::F32, &[3, 5], Encoded::Unchanged),
        rec(NAMES[8], DType::F32, &[], Encoded::RawF32(vec![42.0])),
        rec(
            NAMES[2],
            DType::F16,
            &[2, 3, 1],
            Encoded::RawF16(f16s(&[1.0, -1.0, 0.5, 65504.0, -0.0, 3.25])),
        ),
        rec(
            NAMES[6],
            DType::F16,
            &[9],
            Encoded::Q8Groups {
                scales: OwnedScales::F16(f16s(&[1.0, 0.25, 3.0])),
                q: vec![-127, 127, 0, 1, -1, 5, -5, 100, -100],
            },
        ),
        rec(
            NAMES[4],
            DType::F16,
            &[3, 4],
            Encoded::SignGroups {
                scales: OwnedScales::F16(vec![f16::from_f32(0.5), f16::ZERO, f16::MAX]),
                bits: vec![0xff, 0x0f],
            },
        ),
        // 2 planes of 15 elements (the last bit of each plane's second byte is padding), three
        // groups; interleaved: plane 0 byte 0, plane 1 byte 0, plane 0 byte 1, plane 1 byte 1.
        rec(
            NAMES[PLANES_F16 as usize],
            DType::F16,
            &[3, 5],
            Encoded::SignPlanes {
                planes: 2,
                scales: OwnedScales::F16(f16s(&[0.5, 0.25, 2.0, 0.125, 0.0, 65504.0])),
                bits: vec![0b1010_0101, 0x3c, 0x7f, 0x00],
            },
        ),
        rec(
            NAMES[PLANES_F32 as usize],
            DType::F32,
            &[8],
            Encoded::SignPlanes {
                planes: 3,
                scales: OwnedScales::F32(vec![1.0, MAX_SCALE, 1e-3]),
                bits: vec![0x81, 0xff, 0x00],
            },
        ),
    ]
}

/// The fixture written at `align`; checked to be fully valid.
fn fixture(align: u32) -> Vec<u8> {
    let b = write_delta(&manifest(), &mut records(), align).expect("fixture writes");
    let f = DeltaFile::parse(&b).expect("fixture parses");
    f.verify_payloads().expect("fixture payloads verify");
    b
}

/// Offsets of the areas of a (sane) file, read from its header.
#[derive(Clone, Copy, Debug)]
struct Layout {
    manifest_len: usize,
    table: usize,
    dims: usize,
    dims_count: usize,
    names: usize,
    names_len: usize,
    meta_end: usize,
    payload_offset: usize,
}

impl Layout {
    fn of(b: &[u8]) -> Self {
        let manifest_len = rd32(b, H_MANIFEST_LEN) as usize;
        let tensors = rd32(b, H_TENSORS) as usize;
        let dims_count = rd32(b, H_DIMS) as usize;
        let names_len = rd32(b, H_NAMES_LEN) as usize;
        let table = HEADER_LEN + manifest_len;
        let dims = table + tensors * ENTRY_LEN;
        let names = dims + dims_count * 4;
        Self {
            manifest_len,
            table,
            dims,
            dims_count,
            names,
            names_len,
            meta_end: names + names_len,
            payload_offset: rd64(b, H_PAYLOAD_OFFSET) as usize,
        }
    }
    /// Absolute offset of entry `i`.
    fn entry(&self, i: u32) -> usize {
        self.table + i as usize * ENTRY_LEN
    }
    /// Absolute byte range of the payload of entry `i`.
    fn payload(&self, b: &[u8], i: u32) -> Range<usize> {
        let e = self.entry(i);
        let start = self.payload_offset + rd64(b, e + E_OFFSET) as usize;
        start..start + rd64(b, e + E_LEN) as usize
    }
    /// Absolute byte range of the name of entry `i`.
    fn name(&self, b: &[u8], i: u32) -> Range<usize> {
        let e = self.entry(i);
        let start = self.names + rd32(b, e + E_NAME_OFF) as usize;
        start..start + rd16(b, e + E_NAME_LEN) as usize
    }
    /// Absolute byte offset of dimension `d` of entry `i`.
    fn dim(&self, b: &[u8], i: u32, d: usize) -> usize {
        self.dims + (rd32(b, self.entry(i) + E_DIMS) as usize + d) * 4
    }
}

// ---------------------------------------------------------------------------------------------
// Re-sealing: each works on arbitrary bytes (never panics on a file at least HEADER_LEN long).

/// Recomputes the header CRC (over bytes 0..60, stored at 60).
fn seal_header(b: &mut [u8]) {
    let c = crc(&b[..H_CRC]);
    wr32(b, H_CRC, c);
}

/// Recomputes the meta CRC over `[HEADER_LEN, payload_offset)` when that range exists, then the
/// header CRC.
fn seal_meta(b: &mut [u8]) {
    let po = rd64(b, H_PAYLOAD_OFFSET);
    let meta = usize::try_from(po)
        .ok()
        .and_then(|po| b.get(HEADER_LEN..po));
    if let Some(meta) = meta {
        let c = crc(meta);
        wr32(b, H_META_CRC, c);
    }
    seal_header(b);
}

/// Recomputes the stored payload CRC of entry `i` when the entry and its payload are inside the
/// file. Returns false when the entry itself is out of the file.
fn seal_payload(b: &mut [u8], i: u32) -> bool {
    let at =
        HEADER_LEN as u64 + u64::from(rd32(b, H_MANIFEST_LEN)) + u64::from(i) * ENTRY_LEN as u64;
    let Some(e) = usize::try_from(at)
        .ok()
        .filter(|&e| e + ENTRY_LEN <= b.len())
    else {
        return false;
    };
    let start = rd64(b, H_PAYLOAD_OFFSET).checked_add(rd64(b, e + E_OFFSET));
    let end = start.and_then(|s| s.checked_add(rd64(b, e + E_LEN)));
    let range = start
        .zip(end)
        .and_then(|(s, t)| Some(usize::try_from(s).ok()?..usize::try_from(t).ok()?));
    if let Some(p) = range.and_then(|r| b.get(r)) {
        let c = crc(p);
        wr32(b, e + E_CRC, c);
    }
    true
}

/// Re-seals everything: payload CRCs of every entry, then the meta CRC, then the header CRC.
fn reseal(b: &mut [u8]) {
    if b.len() < HEADER_LEN {
        return;
    }
    for i in 0..rd32(b, H_TENSORS) {
        if !seal_payload(b, i) {
            break;
        }
    }
    seal_meta(b);
}

/// The fixture at `align`, edited by `f`, fully re-sealed.
fn edit_at(align: u32, f: impl FnOnce(&mut Vec<u8>, &Layout)) -> Vec<u8> {
    let mut b = fixture(align);
    let l = Layout::of(&b);
    f(&mut b, &l);
    reseal(&mut b);
    b
}

/// The default fixture, edited by `f`, fully re-sealed.
fn edit(f: impl FnOnce(&mut Vec<u8>, &Layout)) -> Vec<u8> {
    edit_at(ALIGN, f)
}

/// The default fixture, edited by `f`; only the meta and header CRCs are re-sealed (payload
/// CRCs stored in the table are kept as written).
fn edit_keep_payload_crcs(f: impl FnOnce(&mut Vec<u8>, &Layout)) -> Vec<u8> {
    let mut b = fixture(ALIGN);
    let l = Layout::of(&b);
    f(&mut b, &l);
    seal_meta(&mut b);
    b
}

/// The default fixture with a header edit; only the header CRC is re-sealed.
fn edit_header(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut b = fixture(ALIGN);
    f(&mut b);
    seal_header(&mut b);
    b
}

/// A file split into its areas, to rebuild it after changes that move things around. Payload
/// offsets in the table are relative to `payload_offset`, so the payload area moves verbatim.
#[derive(Clone, Debug)]
struct Parts {
    align: u32,
    manifest: Vec<u8>,
    table: Vec<u8>,
    dims: Vec<u8>,
    names: Vec<u8>,
    payloads: Vec<u8>,
}

impl Parts {
    fn of(b: &[u8]) -> Self {
        let l = Layout::of(b);
        Self {
            align: rd32(b, H_ALIGN),
            manifest: b[HEADER_LEN..l.table].to_vec(),
            table: b[l.table..l.dims].to_vec(),
            dims: b[l.dims..l.names].to_vec(),
            names: b[l.names..l.meta_end].to_vec(),
            payloads: b[l.payload_offset..].to_vec(),
        }
    }

    fn with_manifest(mut self, m: &Manifest<'_>) -> Self {
        self.manifest = postcard::to_allocvec(m).unwrap();
        self
    }

    /// Lays the parts out with a correct header (counts, payload offset, file length) and
    /// correct meta and header CRCs.
    fn build(&self) -> Vec<u8> {
        let meta_end = HEADER_LEN
            + self.manifest.len()
            + self.table.len()
            + self.dims.len()
            + self.names.len();
        let po = meta_end.next_multiple_of(self.align as usize);
        let mut b = vec![0u8; HEADER_LEN];
        b[..8].copy_from_slice(&MAGIC);
        wr16(&mut b, H_VERSION, VERSION);
        wr32(&mut b, H_ALIGN, self.align);
        wr32(&mut b, H_MANIFEST_LEN, self.manifest.len() as u32);
        wr32(&mut b, H_TENSORS, (self.table.len() / ENTRY_LEN) as u32);
        wr32(&mut b, H_DIMS, (self.dims.len() / 4) as u32);
        wr32(&mut b, H_NAMES_LEN, self.names.len() as u32);
        wr64(&mut b, H_PAYLOAD_OFFSET, po as u64);
        wr64(&mut b, H_FILE_LEN, (po + self.payloads.len()) as u64);
        b.extend_from_slice(&self.manifest);
        b.extend_from_slice(&self.table);
        b.extend_from_slice(&self.dims);
        b.extend_from_slice(&self.names);
        b.resize(po, 0);
        b.extend_from_slice(&self.payloads);
        seal_meta(&mut b);
        b
    }
}

/// The structural refusal of `b`.
#[track_caller]
fn parse_err(b: &[u8]) -> FormatError {
    DeltaFile::parse(b).expect_err("the structure must be refused")
}

/// The payload refusal of tensor `i` in `b` (whose structure must parse); checks that
/// `verify_payloads` reports the same.
#[track_caller]
fn payload_err(b: &[u8], i: u32) -> FormatError {
    let f = DeltaFile::parse(b).expect("the structure must parse");
    let e = f
        .tensor(i as usize)
        .unwrap()
        .payload()
        .expect_err("the payload must be refused");
    assert_eq!(f.verify_payloads(), Err(e));
    e
}

/// Parses and, on success, walks every accessor, checking the invariants a parsed file promises;
/// returns the first refusal.
fn exercise(b: &[u8]) -> Result<(), FormatError> {
    let f = DeltaFile::parse(b)?;
    let h = *f.header();
    let align = u64::from(h.alignment);
    assert_eq!(h.version, VERSION);
    assert!(h.alignment.is_power_of_two() && h.alignment <= MAX_ALIGN);
    assert_eq!(h.file_len, b.len() as u64);
    assert!(h.payload_offset <= h.file_len && h.payload_offset.is_multiple_of(align));
    assert_eq!(f.len(), h.tensor_count as usize);
    assert!(is_valid_variant_name(f.manifest().name));
    let _ = f.manifest().labels().count();
    let mut params = 0u64;
    let mut cursor = h.payload_offset;
    let mut first_err = None;
    for (i, e) in f.tensors().enumerate() {
        assert_eq!(e.index as usize, i);
        assert!(!e.name.is_empty() && !e.name.chars().any(char::is_control));
        assert!(e.rank() <= MAX_RANK as usize && e.rank() == e.dims().count());
        assert!(e.dims().all(|d| d > 0));
        assert!(e.numel() <= MAX_ELEMENTS);
        let len = e.payload_bytes().len() as u64;
        assert_eq!(e.offset, cursor.next_multiple_of(align));
        assert!(e.offset + len <= h.file_len);
        assert!(b[cursor as usize..e.offset as usize]
            .iter()
            .all(|&x| x == 0));
        cursor = e.offset + len;
        let _ = e.sign_bytes();
        assert_eq!(f.find(e.name).map(|x| x.index), Some(e.index));
        params += e.numel();
        match e.payload() {
            Ok(Payload::SignGroups { scales, .. } | Payload::Q8Groups { scales, .. }) => {
                assert_eq!(scales.len(), e.groups as usize);
                for g in 0..scales.len() {
                    let s = scales.get(g);
                    assert!((0.0..=MAX_SCALE).contains(&s));
                }
            }
            Ok(_) => {}
            Err(err) => {
                first_err.get_or_insert(err);
            }
        }
    }
    assert_eq!(cursor, h.file_len);
    assert_eq!(params, f.manifest().params);
    assert_eq!(f.params(), params);
    assert!(f.tensor(f.len()).is_none());
    assert_eq!(f.verify_payloads(), first_err.map_or(Ok(()), Err));
    f.verify_payloads()
}

// ---------------------------------------------------------------------------------------------
// Round trip

fn le_f32(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
fn le_f16(v: &[f16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

#[track_caller]
fn check_scales(want: &OwnedScales, got: Scales<'_>, e: &TensorEntry<'_>, count: usize) {
    assert_eq!(got.len(), want.len());
    assert!(!got.is_empty());
    assert_eq!(count, want.len());
    match (want, got) {
        (OwnedScales::F16(w), Scales::F16(g)) => {
            assert_eq!(e.flags, FLAG_SCALES_F16);
            assert_eq!(g, le_f16(w));
            for (i, s) in w.iter().enumerate() {
                assert_eq!(got.get(i).to_bits(), s.to_f32().to_bits());
            }
        }
        (OwnedScales::F32(w), Scales::F32(g)) => {
            assert_eq!(e.flags, 0);
            assert_eq!(g, le_f32(w));
            for (i, s) in w.iter().enumerate() {
                assert_eq!(got.get(i).to_bits(), s.to_bits());
            }
        }
        (w, g) => panic!("{}: scales {w:?} read back as {g:?}", e.name),
    }
}

/// Checks that entry `e` carries exactly the record `r`.
#[track_caller]
fn check_entry(r: &TensorRecord, e: &TensorEntry<'_>) {
    assert_eq!(e.name, r.name);
    assert_eq!(e.dtype, r.dtype);
    assert_eq!(e.codec, r.encoded.codec());
    assert_eq!(e.dims().collect::<Vec<_>>(), r.dims);
    assert_eq!(e.rank(), r.dims.len());
    let numel: u64 = r.dims.iter().map(|&d| u64::from(d)).product();
    assert_eq!(e.numel(), numel);
    assert_eq!(e.payload_bytes().len(), r.encoded.payload_len());
    assert_eq!(e.crc, crc(e.payload_bytes()));
    let planes = match &r.encoded {
        Encoded::Sign { .. } | Encoded::SignGroups { .. } => 1,
        Encoded::SignPlanes { planes, .. } => *planes,
        _ => 0,
    };
    assert_eq!(e.planes(), planes);
    assert_eq!(e.sign_bytes(), planes as u64 * numel.div_ceil(8));
    if !matches!(e.codec, Codec::Sign) {
        assert_eq!(e.scale.to_bits(), 0);
    }
    if !matches!(
        e.codec,
        Codec::Sign | Codec::SignGroups | Codec::Q8Groups | Codec::SignPlanes | Codec::SparseSigns
    ) {
        assert_eq!((e.groups, e.flags), (0, 0));
    }
    match (&r.encoded, e.payload().unwrap()) {
        (Encoded::Unchanged, Payload::Unchanged) => assert!(e.payload_bytes().is_empty()),
        (Encoded::RawF32(v), Payload::RawF32(b)) => assert_eq!(b, le_f32(v)),
        (Encoded::RawF16(v), Payload::RawF16(b)) => assert_eq!(b, le_f16(v)),
        (Encoded::Sign { scale, bits }, Payload::Sign { scale: s, bits: b }) => {
            assert_eq!(s.to_bits(), scale.to_bits());
            assert_eq!(e.scale.to_bits(), scale.to_bits());
            assert_eq!((e.groups, e.flags), (1, 0));
            assert_eq!(b, bits.as_slice());
        }
        (Encoded::SignGroups { scales, bits }, Payload::SignGroups { scales: s, bits: b }) => {
            check_scales(scales, s, e, e.groups as usize);
            assert_eq!(b, bits.as_slice());
        }
        (Encoded::Q8Groups { scales, q }, Payload::Q8Groups { scales: s, q: b }) => {
            check_scales(scales, s, e, e.groups as usize);
            assert_eq!(b, q.iter().map(|&x| x as u8).collect::<Vec<_>>());
        }
        (
            Encoded::SignPlanes {
                planes,
                scales,
                bits,
            },
            Payload::SignPlanes {
                planes: k,
                scales: s,
                bits: b,
            },
        ) => {
            assert_eq!(k, *planes);
            assert_eq!(e.groups as usize * planes, scales.len());
            // The scale table is laid out as `planes * groups` group scales.
            check_scales(scales, s, e, scales.len());
            assert_eq!(b, bits.as_slice());
        }
        (
            Encoded::SparseSigns { scales, entries },
            Payload::SparseSigns {
                per_block,
                scales: s,
                entries: b,
            },
        ) => {
            check_scales(scales, s, e, e.groups as usize);
            assert_eq!(b, entries.as_slice());
            assert_eq!(per_block as u64 * numel.div_ceil(64), entries.len() as u64);
        }
        (r, p) => panic!("{}: {r:?} read back as {p:?}", e.name),
    }
}

#[track_caller]
fn check_round_trip(align: u32) {
    let b = fixture(align);
    let f = DeltaFile::parse(&b).unwrap();

    let m = f.manifest();
    assert_eq!(
        *m,
        Manifest {
            params: FIXTURE_PARAMS,
            ..manifest()
        }
    );
    assert_eq!(m.labels().collect::<Vec<_>>(), ["cat", "dog"]);
    assert_eq!(f.params(), FIXTURE_PARAMS);

    let h = f.header();
    let names_len: usize = NAMES.iter().map(|n| n.len()).sum();
    let manifest_len = postcard::to_allocvec(m).unwrap().len();
    let meta_end =
        HEADER_LEN + manifest_len + COUNT as usize * ENTRY_LEN + FIXTURE_DIMS * 4 + names_len;
    assert_eq!(
        *h,
        Header {
            version: VERSION,
            alignment: align,
            manifest_len: manifest_len as u32,
            tensor_count: COUNT,
            dims_count: FIXTURE_DIMS as u32,
            names_len: names_len as u32,
            payload_offset: meta_end.next_multiple_of(align as usize) as u64,
            file_len: b.len() as u64,
            meta_crc: crc(&b[HEADER_LEN..meta_end.next_multiple_of(align as usize)]),
        }
    );
    assert_eq!(Header::parse(&b), Ok(*h));
    assert_eq!(h.to_bytes(), b[..HEADER_LEN]);

    // Table order is byte order of the names, whatever the input order.
    assert_eq!(f.len(), COUNT as usize);
    assert!(!f.is_empty());
    assert_eq!(f.tensors().map(|e| e.name).collect::<Vec<_>>(), NAMES);
    let mut want = records();
    want.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    for (r, e) in want.iter().zip(f.tensors()) {
        check_entry(r, &e);
    }

    // Tiling: each payload at the next aligned offset after the previous one, zero padding,
    // the last one ending at the end of the file.
    let mut cursor = h.payload_offset;
    for e in f.tensors() {
        assert!(e.offset.is_multiple_of(u64::from(align)), "{}", e.name);
        assert_eq!(
            e.offset,
            cursor.next_multiple_of(u64::from(align)),
            "{}",
            e.name
        );
        assert!(b[cursor as usize..e.offset as usize]
            .iter()
            .all(|&x| x == 0));
        cursor = e.offset + e.payload_bytes().len() as u64;
    }
    assert_eq!(cursor, b.len() as u64);
    assert!(b[meta_end..h.payload_offset as usize]
        .iter()
        .all(|&x| x == 0));
    assert_eq!(exercise(&b), Ok(()));
}

#[test]
fn round_trip_every_codec() {
    check_round_trip(ALIGN);
}

#[test]
fn round_trip_alignments() {
    let mut payloads = Vec::new();
    for align in [1, 2, 8, 64, MAX_ALIGN] {
        check_round_trip(align);
        let b = fixture(align);
        let f = DeltaFile::parse(&b).unwrap();
        payloads.push(
            f.tensors()
                .map(|e| e.payload_bytes().to_vec())
                .collect::<Vec<_>>(),
        );
    }
    // The payload bytes do not depend on the alignment.
    assert!(payloads.windows(2).all(|w| w[0] == w[1]));
    // Alignment 1 packs payloads back to back; 4096 puts each one on its own page.
    let b = fixture(1);
    let f = DeltaFile::parse(&b).unwrap();
    let po = f.header().payload_offset;
    assert_eq!(
        b.len() as u64 - po,
        records()
            .iter()
            .map(|r| r.encoded.payload_len() as u64)
            .sum::<u64>()
    );
    let b = fixture(MAX_ALIGN);
    assert!(DeltaFile::parse(&b)
        .unwrap()
        .tensors()
        .all(|e| e.offset.is_multiple_of(4096)));
}

#[test]
fn round_trip_empty() {
    for align in [1, 8, 64] {
        let b = write_delta(&manifest(), &mut [], align).unwrap();
        let f = DeltaFile::parse(&b).unwrap();
        assert!(f.is_empty());
        assert_eq!(f.len(), 0);
        assert_eq!(f.params(), 0);
        assert_eq!(f.manifest().params, 0);
        assert_eq!(f.header().payload_offset, b.len() as u64);
        assert!(f.header().payload_offset.is_multiple_of(u64::from(align)));
        assert!(f.find("a").is_none() && f.find("").is_none());
        assert_eq!(exercise(&b), Ok(()));
    }
}

#[test]
fn round_trip_name_limits() {
    // The longest name and the deepest rank allowed, and a one-element tensor.
    let name = "n".repeat(MAX_NAME_LEN as usize);
    let mut t = [TensorRecord {
        name: name.clone(),
        dtype: DType::F32,
        dims: vec![1; MAX_RANK as usize],
        encoded: Encoded::Sign {
            scale: MAX_SCALE,
            bits: vec![1],
        },
    }];
    let b = write_delta(&manifest(), &mut t, 1).unwrap();
    let f = DeltaFile::parse(&b).unwrap();
    assert_eq!(f.find(&name).unwrap().name, name);
    assert_eq!(f.tensor(0).unwrap().rank(), MAX_RANK as usize);
    assert_eq!(exercise(&b), Ok(()));
}

#[test]
fn find_by_name() {
    let b = fixture(ALIGN);
    let f = DeltaFile::parse(&b).unwrap();
    for (i, name) in NAMES.iter().enumerate() {
        let e = f.find(name).unwrap_or_else(|| panic!("{name} not found"));
        assert_eq!((e.index as usize, e.name), (i, *name));
        assert_eq!(f.tensor(i).unwrap().name, *name);
    }
    for missing in [
        "",
        "a",
        "b.raw_f3",
        "b.raw_f320",
        "c",
        "zz",
        "z.unicode",
        "\u{10ffff}",
    ] {
        assert!(f.find(missing).is_none(), "{missing:?}");
    }
    assert!(f.tensor(COUNT as usize).is_none());
    assert!(f.tensor(usize::MAX).is_none());
}

#[test]
fn writer_refuses_bad_arguments() {
    for align in [0, 3, 12, 8192] {
        assert_eq!(
            write_delta(&manifest(), &mut records(), align),
            Err(WriteError::BadAlignment(align))
        );
    }
    for name in ["", ".", "..", "../x", "a b"] {
        let m = Manifest { name, ..manifest() };
        assert_eq!(
            write_delta(&m, &mut records(), ALIGN),
            Err(WriteError::BadVariantName)
        );
    }
    let mut dup = records();
    dup.push(records().remove(0));
    assert_eq!(
        write_delta(&manifest(), &mut dup, ALIGN),
        Err(WriteError::DuplicateName(NAMES[UNICODE as usize].into()))
    );
    let mut bad = records();
    bad[3].dims = vec![8];
    assert_eq!(
        write_delta(&manifest(), &mut bad, ALIGN),
        Err(WriteError::Inconsistent(NAMES[1].into()))
    );
}

#[test]
fn writer_refuses_bad_sign_planes() {
    let planes = |planes: usize, scales: Vec<f32>, bits: Vec<u8>| TensorRecord {
        name: "p".into(),
        dtype: DType::F32,
        dims: vec![2, 5],
        encoded: Encoded::SignPlanes {
            planes,
            scales: OwnedScales::F32(scales),
            bits,
        },
    };
    let write = |r: TensorRecord| write_delta(&manifest(), &mut [r], ALIGN);
    // 10 elements: 2 bytes per plane, 6 padding bits in each plane's second byte.
    assert!(write(planes(2, vec![1.0; 4], vec![0xff, 0xff, 0x03, 0x03])).is_ok());
    assert!(write(planes(2, vec![1.0; 2], vec![0xff, 0xff, 0x03, 0x03])).is_ok());
    let bad = [
        // One plane is `sign-groups`; nine is over the cap.
        planes(1, vec![1.0; 2], vec![0xff, 0x03]),
        planes(9, vec![1.0; 9], vec![0; 18]),
        // Scales not a whole number of groups per plane, or groups not dividing 10.
        planes(2, vec![1.0; 3], vec![0; 4]),
        planes(2, vec![1.0; 6], vec![0; 4]),
        planes(2, vec![], vec![0; 4]),
        // Bits: too few, too many, a padding bit set in plane 0 or plane 1.
        planes(2, vec![1.0; 4], vec![0; 3]),
        planes(2, vec![1.0; 4], vec![0; 5]),
        planes(2, vec![1.0; 4], vec![0, 0, 0x04, 0]),
        planes(2, vec![1.0; 4], vec![0, 0, 0, 0x80]),
        // Scales the format refuses.
        planes(2, vec![1.0, -1.0, 1.0, 1.0], vec![0; 4]),
        planes(2, vec![1.0, 1.0, f32::NAN, 1.0], vec![0; 4]),
    ];
    for r in bad {
        let what = format!("{:?}", r.encoded);
        assert_eq!(
            write(r),
            Err(WriteError::Inconsistent("p".into())),
            "{what}"
        );
    }
}

/// The test helpers themselves: re-sealing a valid file and rebuilding it from its parts are
/// the identity, so the refusal tests below change exactly what they say.
#[test]
fn helpers_are_identity() {
    for align in [1, 8, 64, MAX_ALIGN] {
        let b = fixture(align);
        let mut r = b.clone();
        reseal(&mut r);
        assert_eq!(r, b);
        assert_eq!(Parts::of(&b).build(), b);
        let l = Layout::of(&b);
        assert_eq!(
            l.meta_end.next_multiple_of(align as usize),
            l.payload_offset
        );
        for i in 0..COUNT {
            assert_eq!(&b[l.name(&b, i)], NAMES[i as usize].as_bytes());
        }
    }
    // Moving the table (a longer manifest) keeps the file valid: payload offsets are relative.
    let b = fixture(ALIGN);
    let long = "x".repeat(300);
    let moved = Parts::of(&b).with_manifest(&Manifest {
        description: &long,
        params: FIXTURE_PARAMS,
        ..manifest()
    });
    let moved = moved.build();
    assert_eq!(exercise(&moved), Ok(()));
    assert_eq!(
        DeltaFile::parse(&moved).unwrap().manifest().description,
        long
    );
}

// ---------------------------------------------------------------------------------------------
// Header refusals

#[test]
fn header_truncated() {
    let b = fixture(ALIGN);
    for n in [0, 1, 8, 63] {
        assert_eq!(
            parse_err(&b[..n]),
            FormatError::HeaderTruncated { found: n }
        );
        assert_eq!(
            Header::parse(&b[..n]),
            Err(FormatError::HeaderTruncated { found: n })
        );
    }
}

#[test]
fn bad_magic() {
    for (at, x) in [(0, 0x20), (7, 0x01), (3, 0xff)] {
        let b = edit_header(|b| b[at] ^= x);
        assert_eq!(parse_err(&b), FormatError::BadMagic);
    }
    // The magic is checked before anything else, even the checksum.
    assert_eq!(parse_err(&[0u8; HEADER_LEN]), FormatError::BadMagic);
    let mut b = fixture(ALIGN);
    b[..8].copy_from_slice(b"bitdelta");
    assert_eq!(parse_err(&b), FormatError::BadMagic);
}

#[test]
fn unsupported_version() {
    for v in [0, 2, u16::MAX] {
        let b = edit_header(|b| wr16(b, H_VERSION, v));
        assert_eq!(parse_err(&b), FormatError::UnsupportedVersion { found: v });
    }
}

#[test]
fn reserved_header_fields() {
    for (byte, offset) in [(10, 10), (11, 10), (52, 52), (55, 52), (56, 56), (59, 56)] {
        let b = edit_header(|b| b[byte] = 0x01);
        assert_eq!(
            parse_err(&b),
            FormatError::ReservedNotZero { offset },
            "byte {byte}"
        );
    }
}

#[test]
fn bad_alignment() {
    for a in [0, 3, 6, 12, 8192, 1 << 31, u32::MAX] {
        let b = edit_header(|b| wr32(b, H_ALIGN, a));
        assert_eq!(parse_err(&b), FormatError::BadAlignment { found: a });
    }
}

#[test]
fn header_checksum() {
    let b = fixture(ALIGN);
    let stored = rd32(&b, H_CRC);
    for at in [8, 20, 47, 59] {
        let mut m = b.clone();
        m[at] ^= 0x04;
        assert_eq!(
            parse_err(&m),
            FormatError::HeaderChecksum {
                expected: stored,
                found: crc(&m[..60])
            }
        );
    }
    // A corrupted checksum field.
    let mut m = b.clone();
    m[62] ^= 0x80;
    assert_eq!(
        parse_err(&m),
        FormatError::HeaderChecksum {
            expected: stored ^ 0x80_0000,
            found: stored
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Caps

#[test]
fn cap_manifest_len() {
    let l = Layout::of(&fixture(ALIGN));
    for v in [MAX_MANIFEST_LEN + 1, u32::MAX] {
        let b = edit_header(|b| wr32(b, H_MANIFEST_LEN, v));
        let want = FormatError::CapExceeded {
            cap: Cap::ManifestLen,
            found: v.into(),
            max: MAX_MANIFEST_LEN.into(),
        };
        assert_eq!(parse_err(&b), want);
    }
    // At the cap the next check (layout) is reached.
    let b = edit_header(|b| wr32(b, H_MANIFEST_LEN, MAX_MANIFEST_LEN));
    let expected =
        (l.meta_end - l.manifest_len + MAX_MANIFEST_LEN as usize).next_multiple_of(8) as u64;
    assert_eq!(
        parse_err(&b),
        FormatError::LengthMismatch {
            field: Field::PayloadOffset,
            expected,
            found: l.payload_offset as u64
        }
    );
}

#[test]
fn cap_tensors() {
    let l = Layout::of(&fixture(ALIGN));
    for v in [MAX_TENSORS + 1, u32::MAX] {
        let b = edit_header(|b| wr32(b, H_TENSORS, v));
        let want = FormatError::CapExceeded {
            cap: Cap::Tensors,
            found: v.into(),
            max: MAX_TENSORS.into(),
        };
        assert_eq!(parse_err(&b), want);
    }
    let b = edit_header(|b| wr32(b, H_TENSORS, MAX_TENSORS));
    let expected =
        (l.meta_end + (MAX_TENSORS - COUNT) as usize * ENTRY_LEN).next_multiple_of(8) as u64;
    assert_eq!(
        parse_err(&b),
        FormatError::LengthMismatch {
            field: Field::PayloadOffset,
            expected,
            found: l.payload_offset as u64
        }
    );
}

#[test]
fn cap_dims() {
    let max = u64::from(MAX_TENSORS) * u64::from(MAX_RANK);
    for v in [max as u32 + 1, u32::MAX] {
        let b = edit_header(|b| wr32(b, H_DIMS, v));
        assert_eq!(
            parse_err(&b),
            FormatError::CapExceeded {
                cap: Cap::Dims,
                found: v.into(),
                max
            }
        );
    }
    let b = edit_header(|b| wr32(b, H_DIMS, max as u32));
    assert!(matches!(
        parse_err(&b),
        FormatError::LengthMismatch {
            field: Field::PayloadOffset,
            ..
        }
    ));
}

#[test]
fn cap_names_len() {
    for v in [MAX_NAMES_LEN + 1, u32::MAX] {
        let b = edit_header(|b| wr32(b, H_NAMES_LEN, v));
        let want = FormatError::CapExceeded {
            cap: Cap::NamesLen,
            found: v.into(),
            max: MAX_NAMES_LEN.into(),
        };
        assert_eq!(parse_err(&b), want);
    }
    let b = edit_header(|b| wr32(b, H_NAMES_LEN, MAX_NAMES_LEN));
    assert!(matches!(
        parse_err(&b),
        FormatError::LengthMismatch {
            field: Field::PayloadOffset,
            ..
        }
    ));
}

#[test]
fn cap_order_manifest_first() {
    let b = edit_header(|b| {
        for at in [H_MANIFEST_LEN, H_TENSORS, H_DIMS, H_NAMES_LEN] {
            wr32(b, at, u32::MAX);
        }
    });
    assert!(matches!(
        parse_err(&b),
        FormatError::CapExceeded {
            cap: Cap::ManifestLen,
            ..
        }
    ));
}

#[test]
fn cap_rank() {
    for rank in [MAX_RANK + 1, 255] {
        let b = edit(|b, l| b[l.entry(SIGN) + E_RANK] = rank);
        let want = FormatError::CapExceeded {
            cap: Cap::Rank,
            found: rank.into(),
            max: MAX_RANK.into(),
        };
        assert_eq!(parse_err(&b), want);
    }
}

#[test]
fn cap_elements() {
    let set_dims = |dims: [u32; 3]| {
        edit(|b, l| {
            for (d, v) in dims.into_iter().enumerate() {
                let at = l.dim(b, RAW_F16, d);
                wr32(b, at, v);
            }
        })
    };
    let want = |found| FormatError::CapExceeded {
        cap: Cap::Elements,
        found,
        max: MAX_ELEMENTS,
    };
    assert_eq!(parse_err(&set_dims([1 << 20, 1 << 20, 2])), want(1 << 41));
    assert_eq!(
        parse_err(&set_dims([1 << 20, (1 << 20) + 1, 1])),
        want((1 << 40) + (1 << 20))
    );
    // A product past u64 saturates rather than wrapping to something small.
    assert_eq!(parse_err(&set_dims([u32::MAX; 3])), want(u64::MAX));
    // At the cap: accepted by the cap, refused by the payload length (2 bytes per element).
    assert_eq!(
        parse_err(&set_dims([1 << 20, 1 << 20, 1])),
        FormatError::PayloadLength {
            index: RAW_F16,
            expected: 1 << 41,
            found: 12
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Layout and lengths

#[test]
fn size_overflow_from_entry_offset() {
    // The other SizeOverflow sites are unreachable: meta_end < 2^28 (every count is capped), so
    // aligning it cannot overflow; payload_offset <= file_len is checked before slicing the
    // meta area; the payload cursor is bounded by the file length; params is at most
    // MAX_TENSORS * MAX_ELEMENTS = 2^60.
    // payload_offset + offset overflows u64:
    let b = edit(|b, l| wr64(b, l.entry(RAW_F16) + E_OFFSET, u64::MAX));
    assert_eq!(parse_err(&b), FormatError::SizeOverflow);
    // payload_offset + offset = u64::MAX, then + len (12) overflows:
    let b = edit(|b, l| {
        wr64(
            b,
            l.entry(RAW_F16) + E_OFFSET,
            u64::MAX - l.payload_offset as u64,
        );
    });
    assert_eq!(parse_err(&b), FormatError::SizeOverflow);
}

#[test]
fn length_mismatch_file_len() {
    let b = fixture(ALIGN);
    let n = b.len() as u64;
    // Truncated by one byte.
    assert_eq!(
        parse_err(&b[..b.len() - 1]),
        FormatError::LengthMismatch {
            field: Field::FileLen,
            expected: n - 1,
            found: n
        }
    );
    // One byte appended.
    let mut m = b.clone();
    m.push(0);
    assert_eq!(
        parse_err(&m),
        FormatError::LengthMismatch {
            field: Field::FileLen,
            expected: n + 1,
            found: n
        }
    );
    // One byte appended and the header updated: refused because the payloads do not tile.
    let mut m = b.clone();
    m.push(0);
    wr64(&mut m, H_FILE_LEN, n + 1);
    seal_header(&mut m);
    assert_eq!(
        parse_err(&m),
        FormatError::LengthMismatch {
            field: Field::FileLen,
            expected: n,
            found: n + 1
        }
    );
    // The header's file length changed alone.
    for v in [0, n - 1, n + 1, u64::MAX] {
        let m = edit_header(|b| wr64(b, H_FILE_LEN, v));
        assert_eq!(
            parse_err(&m),
            FormatError::LengthMismatch {
                field: Field::FileLen,
                expected: n,
                found: v
            }
        );
    }
}

#[test]
fn length_mismatch_payload_offset() {
    let b = fixture(ALIGN);
    let po = Layout::of(&b).payload_offset as u64;
    for v in [0, 64, po - 8, po - 1, po + 1, po + 8, u64::MAX] {
        let m = edit_header(|b| wr64(b, H_PAYLOAD_OFFSET, v));
        assert_eq!(
            parse_err(&m),
            FormatError::LengthMismatch {
                field: Field::PayloadOffset,
                expected: po,
                found: v
            },
            "payload_offset {v}"
        );
    }
}

#[test]
fn length_mismatch_payload_offset_past_end() {
    // The file ends inside the meta area, and the header agrees with that length.
    let b = fixture(ALIGN);
    let po = Layout::of(&b).payload_offset;
    for n in [HEADER_LEN, po - 1] {
        let mut m = b[..n].to_vec();
        wr64(&mut m, H_FILE_LEN, n as u64);
        seal_header(&mut m);
        assert_eq!(
            parse_err(&m),
            FormatError::LengthMismatch {
                field: Field::FileLen,
                expected: po as u64,
                found: n as u64
            }
        );
    }
}

#[test]
fn meta_checksum() {
    let b = fixture(ALIGN);
    let l = Layout::of(&b);
    let stored = rd32(&b, H_META_CRC);
    for at in [
        HEADER_LEN,
        l.table + 7,
        l.dims,
        l.names + 3,
        l.payload_offset - 1,
    ] {
        let mut m = b.clone();
        m[at] ^= 0x10;
        let found = crc(&m[HEADER_LEN..l.payload_offset]);
        assert_eq!(
            parse_err(&m),
            FormatError::MetaChecksum {
                expected: stored,
                found
            },
            "byte {at}"
        );
    }
    // A wrong stored meta checksum under a valid header checksum.
    let m = edit_header(|b| wr32(b, H_META_CRC, stored ^ 1));
    assert_eq!(
        parse_err(&m),
        FormatError::MetaChecksum {
            expected: stored ^ 1,
            found: stored
        }
    );
}

// ---------------------------------------------------------------------------------------------
// Manifest

fn fixture_manifest() -> Manifest<'static> {
    Manifest {
        params: FIXTURE_PARAMS,
        ..manifest()
    }
}

#[test]
fn manifest_invalid_garbage() {
    // Not postcard: a length varint that never ends.
    let b = edit(|b, l| b[HEADER_LEN..l.table].fill(0xff));
    assert_eq!(parse_err(&b), FormatError::ManifestInvalid);
    // The variant name is not UTF-8.
    let b = edit(|b, _| b[HEADER_LEN + 1] = 0xff);
    assert_eq!(parse_err(&b), FormatError::ManifestInvalid);
    // A string running past the manifest.
    let b = edit(|b, _| b[HEADER_LEN] = 0x7f);
    assert_eq!(parse_err(&b), FormatError::ManifestInvalid);
    // An empty manifest.
    let mut p = Parts::of(&fixture(ALIGN));
    p.manifest.clear();
    assert_eq!(parse_err(&p.build()), FormatError::ManifestInvalid);
}

#[test]
fn manifest_invalid_length() {
    // One byte missing (the end of the result fingerprint).
    let mut p = Parts::of(&fixture(ALIGN));
    p.manifest.pop();
    assert_eq!(parse_err(&p.build()), FormatError::ManifestInvalid);
    // Trailing bytes after a valid manifest.
    for extra in [&[0u8][..], &[1, 2, 3]] {
        let mut p = Parts::of(&fixture(ALIGN));
        p.manifest.extend_from_slice(extra);
        assert_eq!(parse_err(&p.build()), FormatError::ManifestInvalid);
    }
}

#[test]
fn manifest_invalid_params() {
    for params in [0, FIXTURE_PARAMS - 1, FIXTURE_PARAMS + 1, u64::MAX] {
        let b = Parts::of(&fixture(ALIGN))
            .with_manifest(&Manifest {
                params,
                ..fixture_manifest()
            })
            .build();
        assert_eq!(
            parse_err(&b),
            FormatError::ManifestInvalid,
            "params {params}"
        );
    }
    let ok = Parts::of(&fixture(ALIGN))
        .with_manifest(&fixture_manifest())
        .build();
    assert_eq!(ok, fixture(ALIGN));
}

#[test]
fn bad_variant_name() {
    let long = "a".repeat(MAX_VARIANT_NAME + 1);
    for name in [
        "",
        ".",
        "..",
        "../x",
        "a/b",
        "a b",
        "\u{e9}",
        "a\0",
        long.as_str(),
    ] {
        let b = Parts::of(&fixture(ALIGN))
            .with_manifest(&Manifest {
                name,
                ..fixture_manifest()
            })
            .build();
        assert_eq!(parse_err(&b), FormatError::BadVariantName, "{name:?}");
    }
    let max = "a".repeat(MAX_VARIANT_NAME);
    for name in ["...", "-", "_", "A.9", max.as_str()] {
        let b = Parts::of(&fixture(ALIGN))
            .with_manifest(&Manifest {
                name,
                ..fixture_manifest()
            })
            .build();
        assert_eq!(exercise(&b), Ok(()), "{name:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// Tensor table

#[test]
fn reserved_entry_fields() {
    for i in [UNCHANGED, SIGN, UNICODE] {
        for (byte, field, v) in [
            (E_RESERVED, E_RESERVED, 1),
            (E_RESERVED + 1, E_RESERVED, 0x80),
        ] {
            let b = edit(|b, l| b[l.entry(i) + byte] = v);
            let offset = (Layout::of(&b).entry(i) + field) as u64;
            assert_eq!(parse_err(&b), FormatError::ReservedNotZero { offset });
        }
    }
    // Unknown flag bits, with or without the known one.
    for (i, flags) in [
        (RAW_F32, 0x02),
        (SIGN_GROUPS_F16, 0x03),
        (Q8_F32, 0x80),
        (UNCHANGED, 0xfe),
    ] {
        let b = edit(|b, l| b[l.entry(i) + E_FLAGS] = flags);
        let offset = (Layout::of(&b).entry(i) + E_FLAGS) as u64;
        assert_eq!(
            parse_err(&b),
            FormatError::ReservedNotZero { offset },
            "tensor {i}"
        );
    }
}

#[test]
fn bad_tensor_name_empty() {
    for i in [UNCHANGED, SIGN, UNICODE] {
        let b = edit(|b, l| wr16(b, l.entry(i) + E_NAME_LEN, 0));
        assert_eq!(parse_err(&b), FormatError::BadTensorName { index: i });
    }
}

#[test]
fn cap_name_len() {
    for len in [MAX_NAME_LEN + 1, u16::MAX] {
        let b = edit(|b, l| wr16(b, l.entry(UNCHANGED) + E_NAME_LEN, len));
        let want = FormatError::CapExceeded {
            cap: Cap::NameLen,
            found: len.into(),
            max: MAX_NAME_LEN.into(),
        };
        assert_eq!(parse_err(&b), want);
    }
    // At the cap the name is read (and here runs out of the name area).
    let b = edit(|b, l| wr16(b, l.entry(UNCHANGED) + E_NAME_LEN, MAX_NAME_LEN));
    assert_eq!(
        parse_err(&b),
        FormatError::BadTensorName { index: UNCHANGED }
    );
    // The writer does not produce what the reader refuses.
    let mut t = [TensorRecord {
        name: "n".repeat(MAX_NAME_LEN as usize + 1),
        dtype: DType::F32,
        dims: vec![1],
        encoded: Encoded::Unchanged,
    }];
    assert!(write_delta(&manifest(), &mut t, ALIGN).is_err());
}

#[test]
fn bad_tensor_name_out_of_area() {
    let names_len = Layout::of(&fixture(ALIGN)).names_len as u32;
    // The last name runs one byte past the name area (into the padding).
    let b = edit(|b, l| {
        let at = l.entry(UNICODE) + E_NAME_LEN;
        let len = rd16(b, at);
        wr16(b, at, len + 1);
    });
    assert_eq!(parse_err(&b), FormatError::BadTensorName { index: UNICODE });
    for off in [names_len, names_len - 1, u32::MAX] {
        let b = edit(|b, l| wr32(b, l.entry(SIGN) + E_NAME_OFF, off));
        assert_eq!(
            parse_err(&b),
            FormatError::BadTensorName { index: SIGN },
            "name offset {off}"
        );
    }
    // A name ending exactly at the end of the area is fine: the fixture's last one does.
    let b = fixture(ALIGN);
    let l = Layout::of(&b);
    assert_eq!(l.name(&b, UNICODE).end, l.meta_end);
}

#[test]
fn bad_tensor_name_not_utf8() {
    // A byte that never occurs in UTF-8.
    let b = edit(|b, l| {
        let at = l.name(b, SIGN).start;
        b[at] = 0xff;
    });
    assert_eq!(parse_err(&b), FormatError::BadTensorName { index: SIGN });
    // A lone continuation byte.
    let b = edit(|b, l| {
        let at = l.name(b, RAW_F32).start + 2;
        b[at] = 0x80;
    });
    assert_eq!(parse_err(&b), FormatError::BadTensorName { index: RAW_F32 });
    // Cut in the middle of a two-byte character ("z.\u{fc}..." -> "z.\xc3").
    let b = edit(|b, l| wr16(b, l.entry(UNICODE) + E_NAME_LEN, 3));
    assert_eq!(parse_err(&b), FormatError::BadTensorName { index: UNICODE });
}

#[test]
fn bad_tensor_name_control_char() {
    for c in [b'\0', b'\n', b'\t', 0x1b, 0x7f] {
        let b = edit(|b, l| {
            let at = l.name(b, SIGN).start + 1;
            b[at] = c;
        });
        assert_eq!(
            parse_err(&b),
            FormatError::BadTensorName { index: SIGN },
            "{c:#x}"
        );
    }
    // A C1 control character (U+0085, two bytes) in place of "\u{fc}".
    let b = edit(|b, l| {
        let at = l.name(b, UNICODE).start + 2;
        b[at..at + 2].copy_from_slice("\u{85}".as_bytes());
    });
    assert_eq!(parse_err(&b), FormatError::BadTensorName { index: UNICODE });
}

#[test]
fn names_not_sorted() {
    // A duplicate (the two names have the same length, so the edit is in place).
    let b = edit(|b, l| {
        let r = l.name(b, RAW_F16);
        b[r].copy_from_slice(NAMES[RAW_F32 as usize].as_bytes());
    });
    assert_eq!(
        parse_err(&b),
        FormatError::NamesNotSorted { index: RAW_F16 }
    );
    // A duplicate by pointing at the same name bytes.
    let b = edit(|b, l| {
        let (e1, e2) = (l.entry(RAW_F32), l.entry(RAW_F16));
        let (off, len) = (rd32(b, e1 + E_NAME_OFF), rd16(b, e1 + E_NAME_LEN));
        wr32(b, e2 + E_NAME_OFF, off);
        wr16(b, e2 + E_NAME_LEN, len);
    });
    assert_eq!(
        parse_err(&b),
        FormatError::NamesNotSorted { index: RAW_F16 }
    );
    // Two names swapped.
    let b = edit(|b, l| {
        let (r1, r2) = (l.name(b, RAW_F32), l.name(b, RAW_F16));
        b[r1].copy_from_slice(NAMES[RAW_F16 as usize].as_bytes());
        b[r2].copy_from_slice(NAMES[RAW_F32 as usize].as_bytes());
    });
    assert_eq!(
        parse_err(&b),
        FormatError::NamesNotSorted { index: RAW_F16 }
    );
    // A prefix sorts first: "b" after "a.unchanged" is fine, "a" is not.
    let b = edit(|b, l| wr16(b, l.entry(RAW_F32) + E_NAME_LEN, 1));
    assert_eq!(exercise(&b), Ok(()));
    let b = edit(|b, l| {
        let e = l.entry(RAW_F32);
        wr32(b, e + E_NAME_OFF, 0);
        wr16(b, e + E_NAME_LEN, 1);
    });
    assert_eq!(
        parse_err(&b),
        FormatError::NamesNotSorted { index: RAW_F32 }
    );
    // All names in reverse order (the name fields of the entries reversed, the rest in place,
    // so the payload tiling stays valid).
    let b = edit(|b, l| {
        let fields: Vec<[u8; 6]> = (0..COUNT)
            .map(|i| {
                b[l.entry(i) + E_NAME_OFF..l.entry(i) + E_NAME_LEN + 2]
                    .try_into()
                    .unwrap()
            })
            .collect();
        for (i, f) in fields.iter().rev().enumerate() {
            let at = l.entry(i as u32) + E_NAME_OFF;
            b[at..at + 6].copy_from_slice(f);
        }
    });
    assert_eq!(parse_err(&b), FormatError::NamesNotSorted { index: 1 });
}

#[test]
fn unknown_codec() {
    for (i, id) in [
        (SIGN, 8u8),
        (UNCHANGED, 0xff),
        (Q8_F32, 0x80),
        (PLANES_F16, 8),
    ] {
        let b = edit(|b, l| b[l.entry(i) + E_CODEC] = id);
        assert_eq!(
            parse_err(&b),
            FormatError::UnknownCodec {
                index: i,
                found: id
            }
        );
    }
}

#[test]
fn unknown_dtype() {
    for (i, id) in [(SIGN, 0u8), (RAW_F32, 3), (UNICODE, 0xff)] {
        let b = edit(|b, l| b[l.entry(i) + E_DTYPE] = id);
        assert_eq!(
            parse_err(&b),
            FormatError::UnknownDType {
                index: i,
                found: id
            }
        );
    }
}

#[test]
fn dims_out_of_bounds() {
    let dims_count = Layout::of(&fixture(ALIGN)).dims_count as u32;
    for start in [dims_count, u32::MAX, u32::MAX / 4 + 1] {
        let b = edit(|b, l| wr32(b, l.entry(SIGN) + E_DIMS, start));
        assert_eq!(
            parse_err(&b),
            FormatError::DimsOutOfBounds { index: SIGN },
            "start {start}"
        );
    }
    // The last tensor's dims (rank 8) shifted by one past the area.
    let b = edit(|b, l| {
        let at = l.entry(UNICODE) + E_DIMS;
        let start = rd32(b, at);
        wr32(b, at, start + 1);
    });
    assert_eq!(
        parse_err(&b),
        FormatError::DimsOutOfBounds { index: UNICODE }
    );
    // A scalar (rank 0) may start at the end of the area but not past it.
    let b = edit(|b, l| wr32(b, l.entry(SCALAR) + E_DIMS, dims_count));
    assert_eq!(exercise(&b), Ok(()));
    let b = edit(|b, l| wr32(b, l.entry(SCALAR) + E_DIMS, dims_count + 1));
    assert_eq!(
        parse_err(&b),
        FormatError::DimsOutOfBounds { index: SCALAR }
    );
}

#[test]
fn zero_dim() {
    for (i, d) in [(SIGN, 0), (RAW_F16, 2), (UNICODE, 7), (UNICODE, 0)] {
        let b = edit(|b, l| {
            let at = l.dim(b, i, d);
            wr32(b, at, 0);
        });
        assert_eq!(
            parse_err(&b),
            FormatError::ZeroDim { index: i },
            "tensor {i} dim {d}"
        );
    }
}

#[test]
fn bad_groups() {
    let set = |i: u32, groups: u32| edit(|b, l| wr32(b, l.entry(i) + E_GROUPS, groups));
    // No groups.
    assert_eq!(
        parse_err(&set(SIGN_GROUPS_F16, 0)),
        FormatError::BadGroups {
            index: SIGN_GROUPS_F16,
            found: 0
        }
    );
    assert_eq!(
        parse_err(&set(Q8_F32, 0)),
        FormatError::BadGroups {
            index: Q8_F32,
            found: 0
        }
    );
    // Not dividing the element count (9, 12, 20).
    for (i, g) in [
        (Q8_F16, 2),
        (Q8_F16, 18),
        (SIGN_GROUPS_F16, 5),
        (SIGN_GROUPS_F32, 3),
        (Q8_F16, u32::MAX),
    ] {
        assert_eq!(
            parse_err(&set(i, g)),
            FormatError::BadGroups { index: i, found: g },
            "tensor {i}"
        );
    }
    // Sign takes exactly one group, and no flags.
    for g in [0, 2, u32::MAX] {
        assert_eq!(
            parse_err(&set(SIGN, g)),
            FormatError::BadGroups {
                index: SIGN,
                found: g
            }
        );
    }
    let b = edit(|b, l| b[l.entry(SIGN) + E_FLAGS] = FLAG_SCALES_F16);
    assert_eq!(
        parse_err(&b),
        FormatError::BadGroups {
            index: SIGN,
            found: 1
        }
    );
    // Sign planes: groups per plane, dividing the 15 elements.
    for g in [0, 2, 4] {
        assert_eq!(
            parse_err(&set(PLANES_F16, g)),
            FormatError::BadGroups {
                index: PLANES_F16,
                found: g
            }
        );
    }
    // 5 groups make planes of 5 * 2 + 2 bytes, and 16 bytes are not two of them.
    assert_eq!(
        parse_err(&set(PLANES_F16, 5)),
        FormatError::PayloadLength {
            index: PLANES_F16,
            expected: 2 * 12,
            found: 16
        }
    );
    // Dividing but with a payload of the wrong size: the length check catches it.
    assert_eq!(
        parse_err(&set(Q8_F16, 9)),
        FormatError::PayloadLength {
            index: Q8_F16,
            expected: 9 * 2 + 9,
            found: 3 * 2 + 9
        }
    );
}

#[test]
fn field_not_zero() {
    let cases: [(u32, usize, &[u8]); 7] = [
        (UNCHANGED, E_GROUPS, &[1]),
        (RAW_F32, E_FLAGS, &[FLAG_SCALES_F16]),
        (RAW_F16, E_SCALE, &1.0f32.to_le_bytes()),
        (SCALAR, E_GROUPS + 3, &[0x80]),
        (SIGN_GROUPS_F32, E_SCALE, &0.5f32.to_le_bytes()),
        (Q8_F32, E_SCALE, &(-0.0f32).to_le_bytes()),
        (UNICODE, E_SCALE, &f32::NAN.to_le_bytes()),
    ];
    for (i, field, v) in cases {
        let b = edit(|b, l| {
            let at = l.entry(i) + field;
            b[at..at + v.len()].copy_from_slice(v);
        });
        assert_eq!(
            parse_err(&b),
            FormatError::FieldNotZero { index: i },
            "tensor {i} field {field}"
        );
    }
}

#[test]
fn payload_length() {
    let set_len = |i: u32, len: u64| edit(|b, l| wr64(b, l.entry(i) + E_LEN, len));
    let cases = [
        (RAW_F32, 28, 27),
        (RAW_F32, 28, 29),
        (UNCHANGED, 0, 1),
        (SIGN, 2, 1),
        (Q8_F32, 26, u64::MAX),
        // Sign planes: a whole number of planes (8 bytes each here) from 2 to 8; the
        // expected length is the nearest valid one.
        (PLANES_F16, 16, 8),
        (PLANES_F16, 16, 17),
        (PLANES_F16, 16, 23),
        (PLANES_F16, 64, 72),
        (PLANES_F16, 64, u64::MAX),
        (PLANES_F32, 10, 4),
        (PLANES_F32, 10, 0),
    ];
    for (i, expected, found) in cases {
        assert_eq!(
            parse_err(&set_len(i, found)),
            FormatError::PayloadLength {
                index: i,
                expected,
                found
            }
        );
    }
    // The scale width follows the flag.
    let b = edit(|b, l| b[l.entry(Q8_F32) + E_FLAGS] = FLAG_SCALES_F16);
    assert_eq!(
        parse_err(&b),
        FormatError::PayloadLength {
            index: Q8_F32,
            expected: 2 * 2 + 18,
            found: 2 * 4 + 18
        }
    );
    let b = edit(|b, l| b[l.entry(SIGN_GROUPS_F16) + E_FLAGS] = 0);
    assert_eq!(
        parse_err(&b),
        FormatError::PayloadLength {
            index: SIGN_GROUPS_F16,
            expected: 3 * 4 + 2,
            found: 3 * 2 + 2
        }
    );
    // The length follows the shape and the codec.
    let b = edit(|b, l| {
        let at = l.dim(b, RAW_F32, 0);
        wr32(b, at, 8);
    });
    assert_eq!(
        parse_err(&b),
        FormatError::PayloadLength {
            index: RAW_F32,
            expected: 32,
            found: 28
        }
    );
    let b = edit(|b, l| b[l.entry(RAW_F32) + E_CODEC] = Codec::RawF16 as u8);
    assert_eq!(
        parse_err(&b),
        FormatError::PayloadLength {
            index: RAW_F32,
            expected: 14,
            found: 28
        }
    );
}

#[test]
fn payload_offset_hole_overlap_misaligned() {
    let b = fixture(ALIGN);
    let l = Layout::of(&b);
    let rel = rd64(&b, l.entry(RAW_F16) + E_OFFSET);
    assert_eq!(rel, 32); // after 28 bytes of RAW_F32 at 0
    for (found, what) in [
        (rel + 8, "hole"),
        (rel - 8, "overlap"),
        (rel + 1, "misaligned"),
        (0, "overlap"),
    ] {
        let m = edit(|b, l| wr64(b, l.entry(RAW_F16) + E_OFFSET, found));
        assert_eq!(
            parse_err(&m),
            FormatError::PayloadOffset {
                index: RAW_F16,
                expected: rel,
                found
            },
            "{what}"
        );
    }
    // Even an empty payload must sit at the next aligned offset.
    let m = edit(|b, l| wr64(b, l.entry(UNCHANGED) + E_OFFSET, 8));
    assert_eq!(
        parse_err(&m),
        FormatError::PayloadOffset {
            index: UNCHANGED,
            expected: 0,
            found: 8
        }
    );
    // Two payloads swapped (same length is not needed: the order is wrong).
    let m = edit(|b, l| {
        let (a, c) = (l.entry(SIGN_GROUPS_F16), l.entry(SIGN_GROUPS_F32));
        let (oa, oc) = (rd64(b, a + E_OFFSET), rd64(b, c + E_OFFSET));
        wr64(b, a + E_OFFSET, oc);
        wr64(b, c + E_OFFSET, oa);
    });
    assert!(matches!(
        parse_err(&m),
        FormatError::PayloadOffset {
            index: SIGN_GROUPS_F16,
            ..
        }
    ));
    // Past the end of the file. The reported `expected` is not meaningful here (the parser
    // reports 0 before it knows the layout offset), so only the index and offset are checked.
    let past = (b.len() - l.payload_offset) as u64 + 1;
    let m = edit(|b, l| wr64(b, l.entry(RAW_F16) + E_OFFSET, past));
    assert!(matches!(
        parse_err(&m),
        FormatError::PayloadOffset { index: RAW_F16, found, .. } if found == past
    ));
}

#[test]
fn padding_not_zero_meta() {
    let b = fixture(64);
    let l = Layout::of(&b);
    assert!(
        l.meta_end < l.payload_offset,
        "the fixture at alignment 64 has meta padding"
    );
    for at in l.meta_end..l.payload_offset {
        let m = edit_at(64, |b, _| b[at] = 0x01);
        assert_eq!(
            parse_err(&m),
            FormatError::PaddingNotZero { offset: at as u64 }
        );
    }
    // The first non-zero byte is reported.
    let m = edit_at(64, |b, l| b[l.meta_end..l.payload_offset].fill(0xff));
    assert_eq!(
        parse_err(&m),
        FormatError::PaddingNotZero {
            offset: l.meta_end as u64
        }
    );
}

/// Byte ranges of alignment padding inside the payload area.
fn payload_gaps(b: &[u8]) -> Vec<Range<usize>> {
    let f = DeltaFile::parse(b).unwrap();
    let mut cursor = f.header().payload_offset as usize;
    let mut gaps = Vec::new();
    for e in f.tensors() {
        if (e.offset as usize) > cursor {
            gaps.push(cursor..e.offset as usize);
        }
        cursor = e.offset as usize + e.payload_bytes().len();
    }
    gaps
}

#[test]
fn padding_not_zero_between_payloads() {
    let b = fixture(ALIGN);
    let gaps = payload_gaps(&b);
    let l = Layout::of(&b);
    // Padding after RAW_F32 (28 bytes), and padding at the very end of the file before the
    // trailing empty payload of UNICODE (after the 4-byte SCALAR).
    assert!(gaps.contains(&(l.payload_offset + 28..l.payload_offset + 32)));
    assert_eq!(gaps.last().unwrap().end, b.len());
    for at in gaps.iter().flat_map(Range::clone) {
        let m = edit(|b, _| b[at] = 0x80);
        assert_eq!(
            parse_err(&m),
            FormatError::PaddingNotZero { offset: at as u64 },
            "byte {at}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Payload refusals

#[test]
fn payload_checksum() {
    let b = fixture(ALIGN);
    let l = Layout::of(&b);
    for i in [
        RAW_F32,
        RAW_F16,
        SIGN,
        SIGN_GROUPS_F16,
        SIGN_GROUPS_F32,
        Q8_F16,
        Q8_F32,
        SCALAR,
    ] {
        let r = l.payload(&b, i);
        for at in [r.start, r.end - 1] {
            let mut m = b.clone();
            m[at] ^= 0x01;
            let want = FormatError::PayloadChecksum {
                index: i,
                expected: rd32(&b, l.entry(i) + E_CRC),
                found: crc(&m[r.clone()]),
            };
            assert_eq!(payload_err(&m, i), want);
            // The other tensors are unaffected.
            let f = DeltaFile::parse(&m).unwrap();
            assert!(f
                .tensors()
                .filter(|e| e.index != i)
                .all(|e| e.payload().is_ok()));
        }
    }
    // A wrong stored checksum (for an empty payload, the CRC of nothing is 0).
    let m = edit_keep_payload_crcs(|b, l| wr32(b, l.entry(UNCHANGED) + E_CRC, 1));
    assert_eq!(
        payload_err(&m, UNCHANGED),
        FormatError::PayloadChecksum {
            index: UNCHANGED,
            expected: 1,
            found: 0
        }
    );
}

/// Replaces the scale of group `g` of tensor `i` (in the payload, or in the entry for `Sign`).
fn with_scale(i: u32, g: usize, bytes: &[u8]) -> Vec<u8> {
    edit(|b, l| {
        let at = if i == SIGN {
            l.entry(i) + E_SCALE
        } else {
            l.payload(b, i).start + g * bytes.len()
        };
        b[at..at + bytes.len()].copy_from_slice(bytes);
    })
}

#[test]
fn bad_scale_per_tensor() {
    let above = f32::from_bits(MAX_SCALE.to_bits() + 1);
    for s in [
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -1.0,
        -f32::MIN_POSITIVE,
        above,
        f32::MAX,
    ] {
        let b = with_scale(SIGN, 0, &s.to_le_bytes());
        // The structure is fine; the scale is checked with the payload.
        assert_eq!(
            payload_err(&b, SIGN),
            FormatError::BadScale {
                index: SIGN,
                group: 0
            },
            "{s}"
        );
    }
    for s in [0.0, -0.0, f32::from_bits(1), MAX_SCALE] {
        assert_eq!(
            exercise(&with_scale(SIGN, 0, &s.to_le_bytes())),
            Ok(()),
            "{s}"
        );
    }
}

#[test]
fn bad_scale_groups() {
    let above = f32::from_bits(MAX_SCALE.to_bits() + 1);
    // For sign-planes the scale index runs over the planes: `plane * groups + group`.
    for (i, g) in [
        (SIGN_GROUPS_F32, 2),
        (SIGN_GROUPS_F32, 0),
        (Q8_F32, 1),
        (PLANES_F32, 0),
        (PLANES_F32, 2),
    ] {
        for s in [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -0.5,
            above,
            f32::MAX,
        ] {
            let b = with_scale(i, g, &s.to_le_bytes());
            assert_eq!(
                payload_err(&b, i),
                FormatError::BadScale {
                    index: i,
                    group: g as u32
                },
                "{s}"
            );
        }
        assert_eq!(
            exercise(&with_scale(i, g, &MAX_SCALE.to_le_bytes())),
            Ok(())
        );
    }
    // f16 scales cannot exceed MAX_SCALE when finite (f16::MAX = 65504), so only NaN, the
    // infinities and negatives are refused.
    for (i, g) in [
        (SIGN_GROUPS_F16, 1),
        (SIGN_GROUPS_F16, 2),
        (Q8_F16, 0),
        (PLANES_F16, 3),
        (PLANES_F16, 5),
    ] {
        for s in [
            f16::NAN,
            f16::INFINITY,
            f16::NEG_INFINITY,
            f16::from_f32(-2.0),
            f16::from_bits(0x8001),
        ] {
            let b = with_scale(i, g, &s.to_le_bytes());
            assert_eq!(
                payload_err(&b, i),
                FormatError::BadScale {
                    index: i,
                    group: g as u32
                },
                "{s}"
            );
        }
        for s in [f16::MAX, f16::ZERO, f16::NEG_ZERO, f16::from_bits(1)] {
            assert_eq!(exercise(&with_scale(i, g, &s.to_le_bytes())), Ok(()), "{s}");
        }
    }
}

#[test]
fn sign_padding_not_zero() {
    // (tensor, byte of the sign section, first padding bit): 13, 12, 20 and 15 elements; the
    // two planes of the last interleave their bytes, so each plane's last byte has padding.
    for (i, byte, first) in [
        (SIGN, 1, 5),
        (SIGN_GROUPS_F16, 1, 4),
        (SIGN_GROUPS_F32, 2, 4),
        (PLANES_F16, 2, 7),
        (PLANES_F16, 3, 7),
    ] {
        let signs_at = |b: &[u8], l: &Layout| {
            let r = l.payload(b, i);
            r.end
                - DeltaFile::parse(b)
                    .unwrap()
                    .tensor(i as usize)
                    .unwrap()
                    .sign_bytes() as usize
        };
        for bit in first..8 {
            let m = edit(|b, l| {
                let at = signs_at(b, l) + byte;
                b[at] |= 1 << bit;
            });
            assert_eq!(
                payload_err(&m, i),
                FormatError::SignPaddingNotZero { index: i },
                "tensor {i} bit {bit}"
            );
        }
        // The last used bit is a sign, not padding.
        let m = edit(|b, l| {
            let at = signs_at(b, l) + byte;
            b[at] |= 1 << (first - 1);
        });
        assert_eq!(exercise(&m), Ok(()));
    }
}

#[test]
fn q8_out_of_range() {
    for (i, k) in [(Q8_F16, 0), (Q8_F16, 8), (Q8_F32, 17)] {
        let m = edit(|b, l| {
            let r = l.payload(b, i);
            b[r.end - 1 - k] = 0x80;
        });
        assert_eq!(payload_err(&m, i), FormatError::Q8OutOfRange { index: i });
        let m = edit(|b, l| {
            let r = l.payload(b, i);
            b[r.end - 1 - k] = 0x81; // -127
        });
        assert_eq!(exercise(&m), Ok(()));
    }
}

// ---------------------------------------------------------------------------------------------
// Exhaustive truncation and bit flips

#[test]
fn truncation_at_every_offset() {
    for align in [1, 8, 64] {
        let b = fixture(align);
        let n = b.len() as u64;
        for len in 0..b.len() {
            let want = if len < HEADER_LEN {
                FormatError::HeaderTruncated { found: len }
            } else {
                FormatError::LengthMismatch {
                    field: Field::FileLen,
                    expected: len as u64,
                    found: n,
                }
            };
            assert_eq!(exercise(&b[..len]), Err(want), "length {len}");
        }
    }
}

#[test]
fn truncation_with_matching_header() {
    // The header claims the truncated length: still refused by the structure alone.
    for align in [1, 8, 64] {
        let b = fixture(align);
        let po = Layout::of(&b).payload_offset;
        for len in HEADER_LEN..b.len() {
            let mut m = b[..len].to_vec();
            wr64(&mut m, H_FILE_LEN, len as u64);
            seal_header(&mut m);
            let err = parse_err(&m);
            if len < po {
                let want = FormatError::LengthMismatch {
                    field: Field::FileLen,
                    expected: po as u64,
                    found: len as u64,
                };
                assert_eq!(err, want, "length {len}");
            } else {
                assert!(
                    matches!(
                        err,
                        FormatError::PayloadOffset { .. } | FormatError::LengthMismatch { .. }
                    ),
                    "length {len}: {err:?}"
                );
            }
        }
    }
}

/// Every single-bit flip is refused: bytes 0..8 by the magic, 8..64 by the header CRC, the meta
/// area and its padding by the meta CRC, payloads by their CRCs, and padding between payloads by
/// the zero check. Each flip is refused with exactly the error of the region it falls in.
#[test]
fn every_bit_flip_is_refused() {
    for align in [1, 8, 64] {
        let b = fixture(align);
        let l = Layout::of(&b);
        let payloads: Vec<(u32, Range<usize>)> =
            (0..COUNT).map(|i| (i, l.payload(&b, i))).collect();
        let stride = if cfg!(miri) { 97 } else { 1 };
        for bit in (0..b.len() * 8).step_by(stride) {
            let at = bit / 8;
            let mut m = b.clone();
            m[at] ^= 1 << (bit % 8);
            let want = if at < 8 {
                FormatError::BadMagic
            } else if at < HEADER_LEN {
                FormatError::HeaderChecksum {
                    expected: rd32(&m, H_CRC),
                    found: crc(&m[..H_CRC]),
                }
            } else if at < l.payload_offset {
                FormatError::MetaChecksum {
                    expected: rd32(&m, H_META_CRC),
                    found: crc(&m[HEADER_LEN..l.payload_offset]),
                }
            } else if let Some((i, r)) = payloads.iter().find(|(_, r)| r.contains(&at)) {
                FormatError::PayloadChecksum {
                    index: *i,
                    expected: rd32(&m, l.entry(*i) + E_CRC),
                    found: crc(&m[r.clone()]),
                }
            } else {
                FormatError::PaddingNotZero { offset: at as u64 }
            };
            assert_eq!(
                exercise(&m),
                Err(want),
                "alignment {align}, bit {bit} (byte {at})"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Property tests: whatever the bytes, parse and verify_payloads never panic.

#[cfg(not(miri))]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn align() -> impl Strategy<Value = u32> {
        prop_oneof![Just(1u32), Just(8), Just(64)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn random_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
            let _ = exercise(&bytes);
        }

        /// Random bytes behind a header that passes its own checks (magic, CRC, version,
        /// reserved fields, alignment, file length), so the parser gets past the header.
        #[test]
        fn random_bytes_behind_valid_header(
            bytes in prop::collection::vec(any::<u8>(), HEADER_LEN..2048),
            align_log in 0u32..13,
            small in any::<bool>(),
        ) {
            let mut bytes = bytes;
            bytes[..8].copy_from_slice(&MAGIC);
            wr16(&mut bytes, H_VERSION, VERSION);
            wr16(&mut bytes, 10, 0);
            wr64(&mut bytes, 52, 0);
            wr32(&mut bytes, H_ALIGN, 1 << align_log);
            if small {
                // Small counts and the payload offset they imply, so the layout may fit.
                let mut meta_end = HEADER_LEN as u64;
                for (at, unit) in [(H_MANIFEST_LEN, 1), (H_TENSORS, ENTRY_LEN as u64), (H_DIMS, 4), (H_NAMES_LEN, 1)] {
                    let v = rd32(&bytes, at) % 16;
                    wr32(&mut bytes, at, v);
                    meta_end += u64::from(v) * unit;
                }
                wr64(&mut bytes, H_PAYLOAD_OFFSET, meta_end.next_multiple_of(1 << align_log));
            }
            let n = bytes.len() as u64;
            wr64(&mut bytes, H_FILE_LEN, n);
            reseal(&mut bytes);
            let _ = exercise(&bytes);
        }

        /// Any mutation of a valid file without re-sealing is refused (CRC32 catches every
        /// burst of up to 32 bits and all but 2^-32 of the others).
        #[test]
        fn mutated_file_is_refused(
            align in align(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        ) {
            let b = fixture(align);
            let mut m = b.clone();
            for (at, x) in edits {
                m[at.index(b.len())] ^= x;
            }
            if m != b {
                prop_assert!(exercise(&m).is_err());
            }
        }

        /// Mutations re-sealed so that every checksum matches: the parser must judge the
        /// structure itself, and never panic.
        #[test]
        fn mutated_and_resealed_file(
            align in align(),
            edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
            cut in any::<Option<prop::sample::Index>>(),
        ) {
            let mut m = fixture(align);
            for (at, v) in edits {
                let at = at.index(m.len());
                m[at] = v;
            }
            if let Some(cut) = cut {
                m.truncate(cut.index(m.len()).max(HEADER_LEN));
            }
            reseal(&mut m);
            let _ = exercise(&m);
        }

        /// One field of one table entry (or of the header) set to an arbitrary value, re-sealed.
        #[test]
        fn field_edit_resealed(
            align in align(),
            entry in 0..COUNT,
            field in prop_oneof![
                Just((E_OFFSET, 8)), Just((E_LEN, 8)), Just((E_NAME_OFF, 4)), Just((E_NAME_LEN, 2)),
                Just((E_CODEC, 1)), Just((E_DTYPE, 1)), Just((E_DIMS, 4)), Just((E_RANK, 1)),
                Just((E_FLAGS, 1)), Just((E_GROUPS, 4)), Just((E_SCALE, 4)),
            ],
            small in any::<bool>(),
            value in any::<u64>(),
            header in any::<bool>(),
        ) {
            let mut m = fixture(align);
            let l = Layout::of(&m);
            let value = if small { value % 64 } else { value };
            let (at, width) = if header {
                // The header's count and length fields, 16..48.
                (H_MANIFEST_LEN + (field.0 % 32), field.1.min(4))
            } else {
                (l.entry(entry) + field.0, field.1)
            };
            m[at..at + width].copy_from_slice(&value.to_le_bytes()[..width]);
            reseal(&mut m);
            let _ = exercise(&m);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The writer refuses everything the reader refuses

/// Each cap the reader enforces on the meta region is enforced by the writer, as `TooLarge`.
#[test]
fn writer_refuses_what_the_caps_refuse() {
    let m = manifest();
    let shape = |name: &'static str| TensorShape {
        name,
        dtype: DType::F32,
        dims: &[],
    };
    let long = "d".repeat(MAX_MANIFEST_LEN as usize);
    let too_long = Manifest {
        description: &long,
        ..manifest()
    };
    assert_eq!(
        DeltaWriter::new(&too_long, [shape("a")], ALIGN).err(),
        Some(WriteError::TooLarge)
    );
    let names: Vec<String> = (0..=MAX_TENSORS).map(|i| format!("{i:08}")).collect();
    let shapes = names.iter().map(|name| TensorShape {
        name,
        dtype: DType::F32,
        dims: &[],
    });
    assert_eq!(
        DeltaWriter::new(&m, shapes.clone().take(MAX_TENSORS as usize), ALIGN).map(|_| ()),
        Ok(())
    );
    assert_eq!(
        DeltaWriter::new(&m, shapes, ALIGN).err(),
        Some(WriteError::TooLarge)
    );
    let count = (MAX_NAMES_LEN / u32::from(MAX_NAME_LEN)) as usize;
    let names: Vec<String> = (0..=count)
        .map(|i| format!("{i:0width$}", width = usize::from(MAX_NAME_LEN)))
        .collect();
    let shapes = names.iter().map(|name| TensorShape {
        name,
        dtype: DType::F32,
        dims: &[],
    });
    assert_eq!(
        DeltaWriter::new(&m, shapes.clone().take(count), ALIGN).map(|_| ()),
        Ok(())
    );
    assert_eq!(
        DeltaWriter::new(&m, shapes, ALIGN).err(),
        Some(WriteError::TooLarge)
    );
}

/// The reader's tensor-name rule: empty, too long, or with a control character is refused.
#[test]
fn writer_refuses_bad_tensor_names() {
    let long = "n".repeat(usize::from(MAX_NAME_LEN) + 1);
    for name in ["", "a\u{0}b", "tab\there", "\u{85}", long.as_str()] {
        let mut r = vec![TensorRecord {
            name: name.into(),
            dtype: DType::F32,
            dims: vec![2],
            encoded: Encoded::Unchanged,
        }];
        assert_eq!(
            write_delta(&manifest(), &mut r, ALIGN),
            Err(WriteError::Inconsistent(name.into()))
        );
    }
    let ok = "n".repeat(usize::from(MAX_NAME_LEN));
    let mut r = vec![TensorRecord {
        name: ok,
        dtype: DType::F32,
        dims: vec![2],
        encoded: Encoded::Unchanged,
    }];
    assert!(write_delta(&manifest(), &mut r, ALIGN).is_ok());
}

/// Tensors given to the streaming writer out of order are refused (the reader needs them sorted).
#[test]
fn streaming_writer_refuses_unsorted_names() {
    let shape = |name| TensorShape {
        name,
        dtype: DType::F32,
        dims: &[1],
    };
    assert_eq!(
        DeltaWriter::new(&manifest(), [shape("b"), shape("a")], ALIGN).err(),
        Some(WriteError::NotSorted("a".into()))
    );
}

mod writer_props {
    use super::*;
    use proptest::prelude::*;

    /// Mostly valid scales, sometimes ones the format refuses.
    fn scale() -> impl Strategy<Value = f32> {
        prop_oneof![
            8 => 0.0f32..=MAX_SCALE,
            1 => Just(-1.0f32),
            1 => Just(f32::NAN),
            1 => Just(f32::INFINITY),
            1 => Just(MAX_SCALE * 2.0),
        ]
    }

    fn scales(len: usize, f16: bool) -> impl Strategy<Value = OwnedScales> {
        prop::collection::vec(scale(), len).prop_map(move |v| {
            if f16 {
                OwnedScales::F16(f16s(&v))
            } else {
                OwnedScales::F32(v)
            }
        })
    }

    /// Bytes whose length is the expected one, or off by one either way.
    fn bytes(len: usize) -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            6 => Just(len),
            1 => Just(len + 1),
            1 => Just(len.saturating_sub(1)),
        ]
        .prop_flat_map(|l| prop::collection::vec(any::<u8>(), l))
    }

    /// A record of about the right shape for its codec: the writer must accept exactly those
    /// the reader accepts.
    fn record() -> impl Strategy<Value = TensorRecord> {
        let name = prop_oneof![
            8 => "[a-z.]{1,6}",
            1 => Just(String::new()),
            1 => "[a-z]{0,2}[\u{0}\u{7f}\u{85}][a-z]{0,2}",
        ];
        let dims = prop::collection::vec(1u32..6, 0..4);
        (
            name,
            dims,
            any::<bool>(),
            0u8..8,
            1usize..5,
            0usize..10,
            any::<bool>(),
        )
            .prop_flat_map(|(name, dims, f16, codec, gdiv, planes, f16_dtype)| {
                let n = dims.iter().product::<u32>() as usize;
                // A group count that divides n when `gdiv` does, else one that may not.
                let g = if n.is_multiple_of(gdiv) {
                    gdiv
                } else {
                    gdiv.min(n)
                };
                let signs = n.div_ceil(8);
                let enc: BoxedStrategy<Encoded> = match codec {
                    0 => Just(Encoded::Unchanged).boxed(),
                    1 => prop::collection::vec(any::<f32>(), n)
                        .prop_map(Encoded::RawF32)
                        .boxed(),
                    2 => prop::collection::vec(any::<f32>(), n)
                        .prop_map(|v| Encoded::RawF16(f16s(&v)))
                        .boxed(),
                    3 => (scale(), bytes(signs))
                        .prop_map(|(scale, bits)| Encoded::Sign { scale, bits })
                        .boxed(),
                    4 => (scales(g, f16), bytes(signs))
                        .prop_map(|(scales, bits)| Encoded::SignGroups { scales, bits })
                        .boxed(),
                    5 => (scales(g, f16), prop::collection::vec(any::<i8>(), n))
                        .prop_map(|(scales, q)| Encoded::Q8Groups { scales, q })
                        .boxed(),
                    6 => (scales(g * planes, f16), bytes(signs * planes))
                        .prop_map(move |(scales, bits)| Encoded::SignPlanes {
                            planes,
                            scales,
                            bits,
                        })
                        .boxed(),
                    // sparse-signs: `planes` (0..10) entries per block; valid blocks (sorted
                    // distinct indices, fewer where the block is short) or bytes of about the
                    // right length.
                    _ => {
                        let valid: Vec<_> = (0..n.div_ceil(64))
                            .map(|b| {
                                let len = (n - 64 * b).min(64);
                                let idx: Vec<u8> = (0..len as u8).collect();
                                prop::sample::subsequence(idx, planes.min(len)).prop_flat_map(
                                    |idx| {
                                        prop::collection::vec(0u8..4, idx.len()).prop_map(
                                            move |hi| {
                                                idx.iter()
                                                    .zip(&hi)
                                                    .map(|(&i, &h)| i | h << 6)
                                                    .collect::<Vec<u8>>()
                                            },
                                        )
                                    },
                                )
                            })
                            .collect();
                        let valid = (scales(g, f16), valid).prop_map(|(scales, blocks)| {
                            Encoded::SparseSigns {
                                scales,
                                entries: blocks.concat(),
                            }
                        });
                        let any = (scales(g, f16), bytes(n.div_ceil(64) * planes))
                            .prop_map(|(scales, entries)| Encoded::SparseSigns { scales, entries });
                        prop_oneof![3 => valid, 1 => any].boxed()
                    }
                };
                let dtype = if f16_dtype { DType::F16 } else { DType::F32 };
                (Just(name), Just(dims), enc).prop_map(move |(name, dims, encoded)| TensorRecord {
                    name,
                    dtype,
                    dims,
                    encoded,
                })
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any delta the writer accepts parses, passes every payload check, and gives back each
        /// tensor's name, dtype, dims, codec and payload bytes.
        #[test]
        fn written_delta_parses_and_round_trips(
            records in prop::collection::vec(record(), 0..6),
            align in prop_oneof![Just(1u32), Just(8), Just(64)],
        ) {
            let mut records = records;
            let Ok(bytes) = write_delta(&manifest(), &mut records, align) else {
                return Ok(());
            };
            let f = DeltaFile::parse(&bytes).expect("the writer's output parses");
            f.verify_payloads().expect("the writer's payloads pass their checks");
            prop_assert_eq!(f.len(), records.len());
            for (r, e) in records.iter().zip(f.tensors()) {
                check_entry(r, &e);
                let mut payload = Vec::new();
                r.encoded.write(&mut payload);
                prop_assert_eq!(e.payload_bytes(), payload.as_slice());
            }
        }

        /// The writer's verdict on one record is the reader's: a record is refused exactly when
        /// the same bytes, laid out by hand, fail the reader's entry or payload checks.
        #[test]
        fn writer_accepts_what_the_reader_accepts(r in record()) {
            let mut one = [r.clone()];
            let written = write_delta(&manifest(), &mut one, ALIGN);
            let mut payload = Vec::new();
            r.encoded.write(&mut payload);
            let reader_ok = hand_laid(&r, &payload).is_some_and(|b| {
                DeltaFile::parse(&b).and_then(|f| f.verify_payloads()).is_ok()
            });
            prop_assert_eq!(written.is_ok(), reader_ok, "{:?}", r);
        }
    }

    /// `r` laid out with the entry fields a codec implies, without the writer's checks.
    fn hand_laid(r: &TensorRecord, payload: &[u8]) -> Option<Vec<u8>> {
        let ok = TensorRecord {
            encoded: Encoded::Unchanged,
            ..r.clone()
        };
        let bytes = write_delta(&manifest(), &mut [ok], ALIGN).ok()?;
        let l = Layout::of(&bytes);
        let mut b = bytes[..l.payload_offset].to_vec();
        b.extend_from_slice(payload);
        let e = l.entry(0);
        let (groups, scale, flags) = match &r.encoded {
            Encoded::Sign { scale, .. } => (1, *scale, 0),
            Encoded::SignGroups { scales, .. }
            | Encoded::Q8Groups { scales, .. }
            | Encoded::SignPlanes { scales, .. }
            | Encoded::SparseSigns { scales, .. } => (
                u32::try_from(r.encoded.groups()).ok()?,
                0.0,
                u8::from(matches!(scales, OwnedScales::F16(_))),
            ),
            _ => (0, 0.0, 0),
        };
        b[e + E_CODEC] = r.encoded.codec() as u8;
        b[e + E_FLAGS] = flags;
        wr32(&mut b, e + E_GROUPS, groups);
        b[e + E_SCALE..e + E_SCALE + 4].copy_from_slice(&scale.to_le_bytes());
        wr64(&mut b, e + E_LEN, payload.len() as u64);
        wr32(&mut b, e + E_CRC, crc(payload));
        let file_len = b.len() as u64;
        wr64(&mut b, H_FILE_LEN, file_len);
        reseal(&mut b);
        // A sign-planes plane count that reads back differently is a different tensor.
        if let Encoded::SignPlanes { planes, .. } = &r.encoded {
            let f = DeltaFile::parse(&b).ok()?;
            if f.tensor(0)?.planes() != *planes {
                return None;
            }
        }
        Some(b)
    }

    /// A one-tensor `sparse-signs` delta of `dims` laid out by hand (no writer checks), parsed and
    /// checked: the reader's verdict.
    fn sparse_verdict(
        dims: &[u32],
        scales: OwnedScales,
        entries: &[u8],
    ) -> Result<(), FormatError> {
        let r = TensorRecord {
            name: "w".into(),
            dtype: DType::F32,
            dims: dims.to_vec(),
            encoded: Encoded::SparseSigns {
                scales,
                entries: entries.to_vec(),
            },
        };
        // The writer agrees with the reader on every case here.
        let written = write_delta(&manifest(), &mut [r.clone()], ALIGN);
        let mut payload = Vec::new();
        r.encoded.write(&mut payload);
        let b = hand_laid(&r, &payload).expect("lays out");
        let verdict = DeltaFile::parse(&b).and_then(|f| f.verify_payloads());
        assert_eq!(written.is_ok(), verdict.is_ok(), "{r:?}: {verdict:?}");
        verdict
    }

    #[test]
    fn sparse_signs_refusals() {
        let one = || OwnedScales::F32(vec![0.5]);
        // 70 elements: blocks of 64 and 6.
        assert_eq!(
            sparse_verdict(&[70], one(), &[0x83, 0x4a, 0x01, 0x85]),
            Ok(())
        );
        assert_eq!(
            sparse_verdict(&[70], OwnedScales::F16(f16s(&[0.5, 1.0])), &[3, 4, 2, 0x45]),
            Ok(())
        );
        let bad = |block| Err(FormatError::BadSparseIndex { index: 0, block });
        // Unsorted, duplicate (also with other level or sign bits), past the short last block.
        assert_eq!(
            sparse_verdict(&[70], one(), &[0x0a, 0x03, 0x01, 0x05]),
            bad(0)
        );
        assert_eq!(
            sparse_verdict(&[70], one(), &[0x03, 0x03, 0x01, 0x05]),
            bad(0)
        );
        assert_eq!(
            sparse_verdict(&[70], one(), &[0x03, 0x04, 0x01, 0x81]),
            bad(1)
        );
        assert_eq!(
            sparse_verdict(&[70], one(), &[0x03, 0x04, 0x01, 0x06]),
            bad(1)
        );
        assert_eq!(
            sparse_verdict(&[70], one(), &[0x03, 0x04, 0x3f, 0x3f]),
            bad(1)
        );
        // More entries per block than the last block has elements (7 > 6): the length is
        // refused, and the nearest valid length (6 per block) is the expected one.
        let seven: Vec<u8> = (0..7).chain(0..7).collect();
        assert_eq!(
            sparse_verdict(&[70], one(), &seven),
            Err(FormatError::PayloadLength {
                index: 0,
                expected: 4 + 12,
                found: 4 + 14,
            })
        );
        // A body that is not a whole number of entries per block; none; more than 32.
        for (entries, expected) in [(3, 4 + 2), (5, 4 + 4), (0, 4 + 2)] {
            assert_eq!(
                sparse_verdict(&[70], one(), &vec![0; entries]),
                Err(FormatError::PayloadLength {
                    index: 0,
                    expected,
                    found: 4 + entries as u64,
                })
            );
        }
        let many: Vec<u8> = (0..33).chain(0..33).collect();
        assert_eq!(
            sparse_verdict(&[128], one(), &many),
            Err(FormatError::PayloadLength {
                index: 0,
                expected: 4 + 64,
                found: 4 + 66,
            })
        );
        // Scales: NaN, negative, infinite, too large; f16 NaN.
        for s in [f32::NAN, -1.0, f32::INFINITY, MAX_SCALE * 2.0] {
            assert_eq!(
                sparse_verdict(&[70], OwnedScales::F32(vec![0.5, s]), &[1, 2, 3, 4]),
                Err(FormatError::BadScale { index: 0, group: 1 })
            );
        }
        assert_eq!(
            sparse_verdict(&[70], OwnedScales::F16(vec![f16::NAN]), &[1, 2, 3, 4]),
            Err(FormatError::BadScale { index: 0, group: 0 })
        );
        // Groups that do not divide n.
        assert_eq!(
            sparse_verdict(&[70], OwnedScales::F32(vec![0.5; 3]), &[1, 2, 3, 4]),
            Err(FormatError::BadGroups { index: 0, found: 3 })
        );
    }
}
