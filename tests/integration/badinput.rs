//! Bad inputs: every mutant of a real delta is refused cleanly, and the fuzz corpus never panics
//! the parser.
//!
//! The mutants start from `bitdelta compress` of the night variant (with two tensors re-encoded
//! as `sign-planes` and two as `sparse-signs`, so that every codec is there): truncations, bit flips,
//! header and table fields set to boundary values, edited dims, names, payloads and manifests,
//! appended bytes, garbage, and a delta made against another base. Every mutant is checked
//! in-process with the calls `bitdelta verify --base` makes (parse, payload checks, binding and
//! rebuild). A deterministic sample of them, with every class represented, also runs through the
//! binary under a time limit and an address-space cap: exit code 1 or 2, a message naming the
//! file, no panic. A spawn costs milliseconds natively and about half a second under qemu, which
//! is why the exhaustive sets (every offset, every bit of the meta region) run in-process.
//!
//! Edits come in two kinds. *Raw* edits leave the checksums alone, so a checksum or a structural
//! check must catch them, without the base. *Sealed* edits recompute the checksums they break
//! (the header CRC; also the meta CRC for table, dims, names and manifest edits; also the payload
//! CRC for payload edits), so the edit reaches the checks behind the checksums; each must be
//! refused for another reason than a checksum it re-sealed. A sealed edit can make a structurally
//! valid file with other weights (another `sign` scale, a flipped sign bit), so sealed mutants
//! are judged with the base, where the result fingerprint catches them.
//!
//! A sealed edit can also give another encoding of the same delta: `names_len` taking in a
//! padding byte, `dims_start` pointing at equal dimensions elsewhere (v1 allows unreferenced and
//! shared ranges), a `-0.0` group scale in place of a `+0.0` one. Such a mutant is accepted with
//! the base, keeps the valid delta's manifest, and so rebuilds weights that hash to the valid
//! delta's result fingerprint. Those, and only those, may pass `verify` (exit 0); the test prints
//! them.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bitdelta::apply::rebuild;
use bitdelta::format::{write_delta, Codec, Encoded, Manifest, Payload, TensorRecord};
use bitdelta::onnx::OnnxWeights;
use bitdelta::stream::StreamDecoder;
use bitdelta::{DeltaFile, FormatError};

use crate::reference::{command, compress, model, ok, p, scratch};

/// Longest a single `bitdelta verify` may run before it is killed and the test fails.
const TIMEOUT: Duration = Duration::from_secs(10);
/// Address-space cap of each `verify` child, in KiB (`ulimit -v`): 1 GiB. A header that made the
/// reader allocate what it claims (up to 2^40 elements) fails under it instead of succeeding on a
/// large host.
const MEM_CAP_KIB: u64 = 1 << 20;
/// Seed of the sampled offsets, bits and garbage, so that every run builds the same mutants.
const SEED: u64 = 0x6269_7464_656c_7461;

const HEADER_LEN: usize = 64;
const ENTRY_LEN: usize = 44;

// ---------------------------------------------------------------------------------------------
// Bytes: little-endian fields, CRC-32 (docs/FORMAT.md §7), a seeded generator.

fn rd(b: &[u8], at: usize, width: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..width].copy_from_slice(&b[at..at + width]);
    u64::from_le_bytes(v)
}

fn wr(b: &mut [u8], at: usize, width: usize, v: u64) {
    b[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
}

const CRC_TABLE: [u32; 256] = {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
};

/// CRC-32/ISO-HDLC, written from the spec (independent of the crate's `crc32fast`).
fn crc32(b: &[u8]) -> u32 {
    !b.iter().fold(!0u32, |c, &x| {
        CRC_TABLE[((c ^ u32::from(x)) & 0xff) as usize] ^ (c >> 8)
    })
}

/// xorshift64: tiny, seeded, the same on every host.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The layout of the valid delta, read as docs/FORMAT.md §1–§6 describe it.

/// A fixed-width little-endian field: offset (in the header, or in a table entry) and width.
#[derive(Clone, Copy)]
struct Field {
    name: &'static str,
    at: usize,
    width: usize,
}

const fn field(name: &'static str, at: usize, width: usize) -> Field {
    Field { name, at, width }
}

/// The fixed header (§2).
const HEADER_FIELDS: [Field; 14] = [
    field("magic", 0, 8),
    field("version", 8, 2),
    field("reserved@10", 10, 2),
    field("alignment", 12, 4),
    field("manifest_len", 16, 4),
    field("tensor_count", 20, 4),
    field("dims_count", 24, 4),
    field("names_len", 28, 4),
    field("payload_offset", 32, 8),
    field("file_len", 40, 8),
    field("meta_crc", 48, 4),
    field("reserved@52", 52, 4),
    field("reserved@56", 56, 4),
    field("header_crc", 60, 4),
];

/// A tensor-table entry (§4).
const ENTRY_FIELDS: [Field; 13] = [
    field("offset", 0, 8),
    field("len", 8, 8),
    field("name_off", 16, 4),
    field("name_len", 20, 2),
    field("codec", 22, 1),
    field("dtype", 23, 1),
    field("dims_start", 24, 4),
    field("rank", 28, 1),
    field("flags", 29, 1),
    field("reserved", 30, 2),
    field("groups", 32, 4),
    field("scale", 36, 4),
    field("crc", 40, 4),
];

struct Entry {
    /// Absolute offset of the 44-byte entry.
    at: usize,
    codec: u8,
    flags: u8,
    groups: usize,
    numel: u64,
    /// Absolute offsets of the dims of this entry.
    dims: std::ops::Range<usize>,
    /// Absolute offsets of the name.
    name: std::ops::Range<usize>,
    /// Absolute offsets of the payload.
    payload: std::ops::Range<usize>,
}

impl Entry {
    /// Sign planes of a `sign-planes` entry (payload length / plane length), else 0.
    fn planes(&self) -> usize {
        let ss = if self.flags & 1 != 0 { 2 } else { 4 };
        let plane = self.groups * ss + self.numel.div_ceil(8) as usize;
        if self.codec == 6 {
            self.payload.len() / plane
        } else {
            0
        }
    }
}

struct Layout {
    len: usize,
    align: usize,
    manifest: std::ops::Range<usize>,
    table: usize,
    dims: usize,
    names: usize,
    meta_end: usize,
    payload_offset: usize,
    entries: Vec<Entry>,
}

impl Layout {
    /// Reads the layout and checks it against the file (so the harness reads the spec the way
    /// the writer wrote it).
    fn of(b: &[u8]) -> Self {
        let align = rd(b, 12, 4) as usize;
        let manifest_len = rd(b, 16, 4) as usize;
        let tensors = rd(b, 20, 4) as usize;
        let dims_count = rd(b, 24, 4) as usize;
        let names_len = rd(b, 28, 4) as usize;
        let payload_offset = rd(b, 32, 8) as usize;
        let table = HEADER_LEN + manifest_len;
        let dims = table + tensors * ENTRY_LEN;
        let names = dims + dims_count * 4;
        let meta_end = names + names_len;
        assert_eq!(payload_offset, meta_end.next_multiple_of(align));
        assert_eq!(rd(b, 40, 8), b.len() as u64);
        assert_eq!(crc32(&b[..60]), rd(b, 60, 4) as u32, "header CRC");
        assert_eq!(crc32(&b[HEADER_LEN..payload_offset]), rd(b, 48, 4) as u32);
        let entries = (0..tensors)
            .map(|i| {
                let at = table + i * ENTRY_LEN;
                let start = payload_offset + rd(b, at, 8) as usize;
                let payload = start..start + rd(b, at + 8, 8) as usize;
                assert_eq!(crc32(&b[payload.clone()]), rd(b, at + 40, 4) as u32);
                let d0 = dims + 4 * rd(b, at + 24, 4) as usize;
                let dims = d0..d0 + 4 * b[at + 28] as usize;
                let n0 = names + rd(b, at + 16, 4) as usize;
                Entry {
                    at,
                    codec: b[at + 22],
                    flags: b[at + 29],
                    groups: rd(b, at + 32, 4) as usize,
                    numel: dims.clone().step_by(4).map(|d| rd(b, d, 4)).product(),
                    dims,
                    name: n0..n0 + rd(b, at + 20, 2) as usize,
                    payload,
                }
            })
            .collect();
        Self {
            len: b.len(),
            align,
            manifest: HEADER_LEN..table,
            table,
            dims,
            names,
            meta_end,
            payload_offset,
            entries,
        }
    }

    /// Indices of a few entries, one per codec present plus the first and the last.
    fn sample_entries(&self) -> Vec<usize> {
        let mut v = vec![0, self.entries.len() - 1];
        for codec in 0..=7 {
            v.extend(self.entries.iter().position(|e| e.codec == codec));
        }
        v.sort_unstable();
        v.dedup();
        v
    }
}

// ---------------------------------------------------------------------------------------------
// Mutants.

/// Which checksums a mutant re-sealed after its edit.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Seal {
    /// None: a checksum or a structural check must catch the edit, without the base.
    Raw,
    /// The header CRC.
    Header,
    /// The meta CRC, then the header CRC.
    Meta,
    /// The payload CRC in the table, then the meta and header CRCs.
    Payload,
}

impl Seal {
    /// The refusals a mutant sealed this way must not get: those of the checksums it re-sealed.
    fn forbidden(self) -> &'static [&'static str] {
        match self {
            Self::Raw => &[],
            Self::Header => &["HeaderChecksum"],
            Self::Meta => &["HeaderChecksum", "MetaChecksum"],
            Self::Payload => &["HeaderChecksum", "MetaChecksum", "PayloadChecksum"],
        }
    }
    /// The same for the binary's messages.
    fn forbidden_messages(self) -> &'static [&'static str] {
        match self {
            Self::Raw => &[],
            Self::Header => &["header checksum mismatch"],
            Self::Meta => &[
                "header checksum mismatch",
                "manifest/table checksum mismatch",
            ],
            Self::Payload => &[
                "header checksum mismatch",
                "manifest/table checksum mismatch",
                "payload checksum mismatch",
            ],
        }
    }
}

enum Edit {
    /// The first `n` bytes of the valid delta.
    Cut(usize),
    /// The valid delta with bit `i` (byte `i / 8`, bit `i % 8`) flipped.
    Flip(usize),
    /// The valid delta with bytes replaced (offset, new value), with what the edit is.
    Patch(String, Vec<(usize, u8)>),
    /// Any other bytes, with what they are.
    Bytes(String, Vec<u8>),
}

struct Mutant {
    class: &'static str,
    edit: Edit,
    seal: Seal,
    /// Judged with the base (sealed edits, and files bound to another base).
    needs_base: bool,
    /// Also run through the binary.
    cli: bool,
}

impl Mutant {
    fn what(&self) -> String {
        match &self.edit {
            Edit::Cut(n) => format!("cut to {n} bytes"),
            Edit::Flip(i) => format!("bit {} of byte {} flipped", i % 8, i / 8),
            Edit::Patch(what, _) | Edit::Bytes(what, _) => what.clone(),
        }
    }
    fn bytes<'a>(&'a self, good: &'a [u8]) -> Cow<'a, [u8]> {
        match &self.edit {
            Edit::Cut(n) => Cow::Borrowed(&good[..*n]),
            Edit::Flip(i) => {
                let mut b = good.to_vec();
                b[i / 8] ^= 1 << (i % 8);
                Cow::Owned(b)
            }
            Edit::Patch(_, d) => {
                let mut b = good.to_vec();
                for &(at, v) in d {
                    b[at] = v;
                }
                Cow::Owned(b)
            }
            Edit::Bytes(_, b) => Cow::Borrowed(b),
        }
    }
}

/// Makes same-length edits of the valid delta and keeps only the bytes they change, so that
/// thousands of mutants do not each hold a copy of the file.
struct Patcher<'a> {
    good: &'a [u8],
    work: Vec<u8>,
}

impl<'a> Patcher<'a> {
    fn new(good: &'a [u8]) -> Self {
        Self {
            good,
            work: good.to_vec(),
        }
    }
    fn patch(&mut self, edit: impl FnOnce(&mut [u8])) -> Vec<(usize, u8)> {
        edit(&mut self.work);
        let mut changed = Vec::new();
        for (k, (a, b)) in self.good.chunks(64).zip(self.work.chunks(64)).enumerate() {
            if a != b {
                let diff = a.iter().zip(b).enumerate().filter(|(_, (x, y))| x != y);
                changed.extend(diff.map(|(j, (_, &y))| (k * 64 + j, y)));
            }
        }
        for &(at, _) in &changed {
            self.work[at] = self.good[at];
        }
        changed
    }
}

/// Recomputes the header CRC.
fn seal_header(b: &mut [u8]) {
    let c = crc32(&b[..60]);
    wr(b, 60, 4, c.into());
}

/// Recomputes the meta CRC over `[64, payload_offset)` of `l`, then the header CRC.
fn seal_meta(b: &mut [u8], l: &Layout) {
    let c = crc32(&b[HEADER_LEN..l.payload_offset]);
    wr(b, 48, 4, c.into());
    seal_header(b);
}

/// Recomputes the payload CRC of entry `e`, then the meta and header CRCs.
fn seal_payload(b: &mut [u8], l: &Layout, e: &Entry) {
    let c = crc32(&b[e.payload.clone()]);
    wr(b, e.at + 40, 4, c.into());
    seal_meta(b, l);
}

/// `0, 1, 2, max, max-1, the top bit, file length -1/+0/+1, the original value ±1` and `extra`,
/// those that fit in the field, without the original value.
fn boundary_values(f: Field, orig: u64, file_len: u64, extra: &[u64]) -> Vec<u64> {
    let max = if f.width == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * f.width)) - 1
    };
    let mut v = vec![
        0,
        1,
        2,
        max,
        max - 1,
        max / 2 + 1,
        file_len - 1,
        file_len,
        file_len + 1,
        orig.wrapping_add(1),
        orig.wrapping_sub(1),
    ];
    v.extend_from_slice(extra);
    v.retain(|&x| x <= max && x != orig);
    v.sort_unstable();
    v.dedup();
    v
}

/// Values of a header field that reach particular checks or overflow size arithmetic.
fn header_extras(f: &str, l: &Layout) -> Vec<u64> {
    let (po, len) = (l.payload_offset as u64, l.len as u64);
    match f {
        "magic" => vec![
            u64::from_le_bytes(*b"bitdelta"),
            u64::from_le_bytes(*b"BITDELT\0"),
        ],
        "version" => vec![0x0100],
        "alignment" => vec![3, 4, 16, 4096, 8192, 1 << 31],
        "manifest_len" => vec![1 << 20, (1 << 20) + 1],
        // 2^20 is the cap; u32::MAX / 44 + 1 overflows `44 × count` in 32 bits.
        "tensor_count" => vec![1 << 20, (1 << 20) + 1, u64::from(u32::MAX) / 44 + 1],
        "dims_count" => vec![1 << 23, (1 << 23) + 1, u64::from(u32::MAX) / 4 + 1],
        "names_len" => vec![64 << 20, (64 << 20) + 1],
        "payload_offset" => vec![
            l.meta_end as u64,
            po + l.align as u64,
            po - l.align as u64,
            u64::MAX - 63,
            1 << 63,
        ],
        "file_len" => vec![po, 1 << 63, u64::MAX - len + 1],
        _ => vec![],
    }
}

/// Values of an entry field that reach particular checks or overflow size arithmetic.
fn entry_extras(f: &str, e: &Entry, l: &Layout, orig: u64) -> Vec<u64> {
    let po = l.payload_offset as u64;
    let rel = (e.payload.start - l.payload_offset) as u64;
    match f {
        // payload_offset + offset overflows; then + len overflows; the payload starts at EOF.
        "offset" => vec![
            u64::MAX - po + 1,
            u64::MAX - po,
            orig + l.align as u64,
            (l.len - l.payload_offset) as u64,
        ],
        "len" => vec![
            u64::MAX - (po + rel) + 1,
            orig * 2,
            (l.len - e.payload.start) as u64,
        ],
        "name_len" => vec![4096, 4097],
        "codec" => vec![3, 4, 5, 6, 7, 8, 0x80],
        "dtype" => vec![3, 0x80],
        "rank" => vec![8, 9],
        "flags" => vec![0x80],
        "groups" => vec![e.numel, e.numel + 1, orig * 2, u64::from(u32::MAX)],
        // NaN, ±inf, -0.0, -1.0, 1e6 (the cap), the next f32 above it, the smallest subnormal.
        "scale" => vec![
            0x7fc0_0000,
            0x7f80_0000,
            0xff80_0000,
            0x8000_0000,
            0xbf80_0000,
            0x4974_2400,
            0x4974_2401,
        ],
        "crc" => vec![!orig & 0xffff_ffff],
        _ => vec![],
    }
}

/// Postcard varint (unsigned LEB128).
fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

/// The manifest in postcard, fields in the order of docs/FORMAT.md §3.
fn encode_manifest(m: &Manifest<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    for s in [m.name, m.description, m.labels, m.tool] {
        varint(&mut out, s.len() as u64);
        out.extend_from_slice(s.as_bytes());
    }
    varint(&mut out, m.sequence);
    varint(&mut out, m.params);
    out.extend_from_slice(&m.base_fingerprint);
    out.extend_from_slice(&m.result_fingerprint);
    out
}

/// The valid delta with its manifest replaced by `manifest` (any bytes): the meta region is
/// rebuilt, the payload area copied (its offsets are relative), every header field and CRC
/// recomputed.
fn with_manifest(good: &[u8], l: &Layout, manifest: &[u8]) -> Vec<u8> {
    let mut b = good[..HEADER_LEN].to_vec();
    b.extend_from_slice(manifest);
    b.extend_from_slice(&good[l.table..l.meta_end]);
    b.resize(b.len().next_multiple_of(l.align), 0);
    let po = b.len();
    b.extend_from_slice(&good[l.payload_offset..]);
    wr(&mut b, 16, 4, manifest.len() as u64);
    wr(&mut b, 32, 8, po as u64);
    let len = b.len() as u64;
    wr(&mut b, 40, 8, len);
    let c = crc32(&b[HEADER_LEN..po]);
    wr(&mut b, 48, 4, c.into());
    seal_header(&mut b);
    b
}

/// Every mutant of `good` (whose layout is `l`); `other_base` is a valid delta made against
/// another base, `onnx` a file that is not a delta.
fn mutants(good: &[u8], l: &Layout, other_base: &[u8], onnx: &[u8]) -> Vec<Mutant> {
    let mut rng = Rng(SEED);
    let mut out = Vec::new();
    let mut push = |class, edit, seal, cli| {
        let needs_base = seal != Seal::Raw;
        out.push(Mutant {
            class,
            edit,
            seal,
            needs_base,
            cli,
        });
    };
    let len = l.len;
    let po = l.payload_offset;
    let sampled = l.sample_entries();
    let mut patcher = Patcher::new(good);

    // Truncation at every offset. Through the binary: the fixed header, each area boundary and
    // each table entry start (±1), a random sample of the rest of the meta region, and 64 evenly
    // spaced plus 16 random payload offsets.
    let mut cuts: Vec<usize> = (0..=HEADER_LEN).collect();
    for b in [l.table, l.dims, l.names, l.meta_end, po] {
        cuts.extend([b - 1, b, b + 1]);
    }
    cuts.extend(l.entries.iter().map(|e| e.at));
    cuts.extend((0..24).map(|_| HEADER_LEN + rng.below(po - HEADER_LEN)));
    cuts.extend((0..64).map(|k| po + k * (len - po) / 64));
    cuts.extend((0..16).map(|_| po + rng.below(len - po)));
    let cli_cuts: std::collections::BTreeSet<usize> = cuts.into_iter().collect();
    for n in 0..len {
        let class = if n <= po {
            "truncate-meta"
        } else {
            "truncate-payload"
        };
        push(class, Edit::Cut(n), Seal::Raw, cli_cuts.contains(&n));
    }

    // Every bit of the meta region [0, payload_offset); through the binary, every bit of the
    // fixed header and 128 random others.
    let cli_bits: std::collections::BTreeSet<usize> = (0..128)
        .map(|_| HEADER_LEN * 8 + rng.below((po - HEADER_LEN) * 8))
        .collect();
    for i in 0..po * 8 {
        let cli = i < HEADER_LEN * 8 || cli_bits.contains(&i);
        push("flip-meta", Edit::Flip(i), Seal::Raw, cli);
    }

    // Payload bits: every bit of the zero padding between payloads, of the first and last byte
    // of each payload, and 4096 random ones; 96 of them through the binary.
    let mut bits = std::collections::BTreeSet::new();
    let mut cursor = po;
    for e in &l.entries {
        for byte in cursor..e.payload.start {
            bits.extend(byte * 8..byte * 8 + 8);
        }
        if !e.payload.is_empty() {
            bits.extend(e.payload.start * 8..e.payload.start * 8 + 8);
            bits.extend((e.payload.end - 1) * 8..e.payload.end * 8);
        }
        cursor = e.payload.end;
    }
    bits.extend((0..4096).map(|_| po * 8 + rng.below((len - po) * 8)));
    let bits: Vec<usize> = bits.into_iter().collect();
    let cli_bits: std::collections::BTreeSet<usize> =
        (0..96).map(|_| bits[rng.below(bits.len())]).collect();
    for &i in &bits {
        push(
            "flip-payload",
            Edit::Flip(i),
            Seal::Raw,
            cli_bits.contains(&i),
        );
    }

    // Header fields at boundary values: raw (the header CRC must catch them) and sealed (the
    // header CRC recomputed, so the field's own check must). The CRC fields only raw.
    for f in HEADER_FIELDS {
        let orig = rd(good, f.at, f.width);
        let values = boundary_values(f, orig, len as u64, &header_extras(f.name, l));
        for &v in &values {
            let raw_cli = v == 0 || v == values[values.len() - 1] || v == len as u64 + 1;
            let what = format!("header {} = {v:#x}", f.name);
            let raw = patcher.patch(|b| wr(b, f.at, f.width, v));
            push(
                "field-header-raw",
                Edit::Patch(what.clone(), raw),
                Seal::Raw,
                raw_cli,
            );
            if f.name != "header_crc" {
                let sealed = patcher.patch(|b| {
                    wr(b, f.at, f.width, v);
                    seal_header(b);
                });
                push(
                    "field-header",
                    Edit::Patch(what, sealed),
                    Seal::Header,
                    true,
                );
            }
        }
    }

    // Entry fields at boundary values, sealed (meta and header CRCs): every entry in-process;
    // through the binary, 240 of those of a few entries (first, last, one of each codec).
    let mut entry_mutants = Vec::new();
    for (i, e) in l.entries.iter().enumerate() {
        for f in ENTRY_FIELDS {
            let orig = rd(good, e.at + f.at, f.width);
            let extra = entry_extras(f.name, e, l, orig);
            for v in boundary_values(f, orig, len as u64, &extra) {
                let b = patcher.patch(|b| {
                    wr(b, e.at + f.at, f.width, v);
                    seal_meta(b, l);
                });
                let what = format!("entry {i} {} = {v:#x}", f.name);
                entry_mutants.push((sampled.contains(&i), what, b));
            }
        }
    }
    let sample: Vec<usize> = (0..entry_mutants.len())
        .filter(|&k| entry_mutants[k].0)
        .collect();
    let cli_entries: std::collections::BTreeSet<usize> =
        (0..240).map(|_| sample[rng.below(sample.len())]).collect();
    for (k, (_, what, b)) in entry_mutants.into_iter().enumerate() {
        let cli = cli_entries.contains(&k);
        push("field-entry", Edit::Patch(what, b), Seal::Meta, cli);
    }

    // Dimensions (sealed): every dimension of every entry; through the binary, those of the
    // sampled entries.
    for (i, e) in l.entries.iter().enumerate() {
        for (d, at) in e.dims.clone().step_by(4).enumerate() {
            let orig = rd(good, at, 4);
            let f = field("dim", 0, 4);
            for v in boundary_values(f, orig, len as u64, &[orig * 2, 1 << 20]) {
                let b = patcher.patch(|b| {
                    wr(b, at, 4, v);
                    seal_meta(b, l);
                });
                let what = format!("entry {i} dim {d} = {v}");
                let cli = sampled.contains(&i) && (v == 0 || v == orig + 1 || v == 1 << 20);
                push("field-dims", Edit::Patch(what, b), Seal::Meta, cli);
            }
        }
    }

    // Names (sealed): a control character, an invalid UTF-8 byte, DEL, a path separator, and
    // the last byte bumped (another name, maybe out of order).
    for (i, e) in l.entries.iter().enumerate() {
        let last = e.name.end - 1;
        for (at, v) in [
            (e.name.start, 0x00),
            (e.name.start, 0xff),
            (e.name.start, 0x7f),
            (e.name.start, b'/'),
            (last, good[last].wrapping_add(1)),
        ] {
            let b = patcher.patch(|b| {
                b[at] = v;
                seal_meta(b, l);
            });
            let what = format!("entry {i} name byte {} = {v:#04x}", at - e.name.start);
            push(
                "field-names",
                Edit::Patch(what, b),
                Seal::Meta,
                sampled.contains(&i),
            );
        }
    }

    // Payload values (sealed, payload CRC included): q8 deltas of -128 and +1, group scales
    // NaN/±inf/-1/-0.0/absurd, sign padding bits set (in every plane's last byte for
    // sign-planes), a flipped sign bit; sparse entries duplicated, out of order, past the short
    // last block, with a flipped sign or level bit.
    for (i, e) in l.entries.iter().enumerate() {
        let f16 = e.flags & 1 != 0;
        let ss = if f16 { 2 } else { 4 };
        let planes = e.planes();
        let scales_end = e.payload.start + planes.max(1) * e.groups * ss;
        let mut edits: Vec<(String, usize, Vec<u8>)> = Vec::new();
        if (4..=7).contains(&e.codec) {
            let bad: &[(&str, u32)] = if f16 {
                &[
                    ("NaN", 0x7e00),
                    ("inf", 0x7c00),
                    ("-inf", 0xfc00),
                    ("-1", 0xbc00),
                    ("-0", 0x8000),
                ]
            } else {
                &[
                    ("NaN", 0x7fc0_0000),
                    ("inf", 0x7f80_0000),
                    ("-1", 0xbf80_0000),
                    ("-0", 0x8000_0000),
                    ("1.0000001e6", 0x4974_2401),
                ]
            };
            for &(name, v) in bad {
                let g = planes.max(1) * e.groups - 1;
                let bytes = u64::from(v).to_le_bytes()[..ss].to_vec();
                edits.push((
                    format!("scale {g} = {name}"),
                    e.payload.start + g * ss,
                    bytes,
                ));
            }
        }
        if e.codec == 5 {
            edits.push(("q8 = -128".into(), scales_end, vec![0x80]));
            let q = good[scales_end] as i8;
            let q = if q == 127 { 126 } else { q + 1 };
            edits.push(("q8 + 1".into(), scales_end, vec![q as u8]));
        }
        if e.codec == 6 && e.numel % 8 != 0 {
            // The first plane's last byte starts the last row.
            let at = e.payload.end - planes;
            edits.push(("plane 0 padding bit set".into(), at, vec![good[at] | 0x80]));
        }
        if e.codec == 7 {
            // Entries per block, from the body length (`docs/FORMAT.md` §8).
            let blocks = e.numel.div_ceil(64) as usize;
            let m = (e.payload.end - scales_end) / blocks;
            let (first, last) = (scales_end, e.payload.end - m);
            let entry = |k: usize| good[first + k];
            edits.push((
                "sparse sign bit flipped".into(),
                first,
                vec![entry(0) ^ 0x80],
            ));
            edits.push((
                "sparse level bit flipped".into(),
                first,
                vec![entry(0) ^ 0x40],
            ));
            if m >= 2 {
                edits.push((
                    "sparse index repeated".into(),
                    first + 1,
                    vec![entry(0) ^ 0xc0],
                ));
                edits.push((
                    "sparse indices swapped".into(),
                    first,
                    vec![entry(1), entry(0)],
                ));
                edits.push((
                    "sparse index to 0 in the last block".into(),
                    e.payload.end - 1,
                    vec![0],
                ));
            }
            if e.numel % 64 != 0 {
                edits.push(("sparse index past the last block".into(), last, vec![0x3f]));
            }
        }
        if e.codec == 3 || e.codec == 4 || e.codec == 6 {
            let bits_start = if e.codec == 3 {
                e.payload.start
            } else {
                scales_end
            };
            edits.push((
                "sign bit 0 flipped".into(),
                bits_start,
                vec![good[bits_start] ^ 1],
            ));
            if e.numel % 8 != 0 {
                let at = e.payload.end - 1;
                edits.push(("sign padding bit set".into(), at, vec![good[at] | 0x80]));
            }
        }
        for (what, at, bytes) in edits {
            let b = patcher.patch(|b| {
                b[at..at + bytes.len()].copy_from_slice(&bytes);
                seal_payload(b, l, e);
            });
            let what = format!("entry {i} payload {what}");
            push(
                "field-payload",
                Edit::Patch(what, b),
                Seal::Payload,
                sampled.contains(&i),
            );
        }
    }

    // Manifests (sealed): params, variant names, fingerprints, bytes left over or missing,
    // lengths past the end.
    let file = DeltaFile::parse(good).expect("the valid delta parses");
    let m = file.manifest();
    let mb = &good[l.manifest.clone()];
    assert_eq!(
        encode_manifest(m),
        mb,
        "the manifest encoder matches the writer"
    );
    let long_name = "n".repeat(65);
    let mut manifests: Vec<(String, Vec<u8>)> = Vec::new();
    for params in [0, m.params - 1, m.params + 1, u64::MAX] {
        let edited = Manifest {
            params,
            ..m.clone()
        };
        manifests.push((format!("params = {params}"), encode_manifest(&edited)));
    }
    for name in [
        "",
        ".",
        "..",
        "../night",
        "night/x",
        "night\n",
        "n\u{ef}ght",
        "night x",
    ] {
        let edited = Manifest { name, ..m.clone() };
        manifests.push((format!("name = {name:?}"), encode_manifest(&edited)));
    }
    let edited = Manifest {
        name: &long_name,
        ..m.clone()
    };
    manifests.push(("name of 65 bytes".into(), encode_manifest(&edited)));
    let mut fp = m.base_fingerprint;
    fp[0] ^= 1;
    let edited = Manifest {
        base_fingerprint: fp,
        ..m.clone()
    };
    manifests.push((
        "base fingerprint bit flipped".into(),
        encode_manifest(&edited),
    ));
    let edited = Manifest {
        base_fingerprint: [0; 32],
        ..m.clone()
    };
    manifests.push(("base fingerprint zero".into(), encode_manifest(&edited)));
    let edited = Manifest {
        result_fingerprint: [0; 32],
        ..m.clone()
    };
    manifests.push(("result fingerprint zero".into(), encode_manifest(&edited)));
    manifests.push(("empty".into(), Vec::new()));
    manifests.push(("one byte left over".into(), [mb, &[0]].concat()));
    manifests.push(("last byte missing".into(), mb[..mb.len() - 1].to_vec()));
    let mut huge = vec![0xff; 9];
    huge.push(0x01);
    manifests.push((
        "name length varint of 10 bytes".into(),
        [&huge, &mb[1..]].concat(),
    ));
    let mut past = Vec::new();
    varint(&mut past, mb.len() as u64);
    manifests.push((
        "name length past the end".into(),
        [&past, &mb[1..]].concat(),
    ));
    for (what, manifest) in manifests {
        let b = with_manifest(good, l, &manifest);
        push(
            "manifest",
            Edit::Bytes(format!("manifest {what}"), b),
            Seal::Meta,
            true,
        );
    }

    // Appended bytes: raw, and with file_len updated and the header re-sealed (so the payloads
    // must end at the end of the file).
    for (n, fill) in [(1, 0u8), (1, 0xff), (7, 0), (4096, 0)] {
        let mut b = good.to_vec();
        b.resize(len + n, fill);
        let what = format!("{n} byte(s) {fill:#04x} appended");
        push(
            "append",
            Edit::Bytes(what.clone(), b.clone()),
            Seal::Raw,
            true,
        );
        wr(&mut b, 40, 8, (len + n) as u64);
        seal_header(&mut b);
        push(
            "append",
            Edit::Bytes(format!("{what}, file_len updated"), b),
            Seal::Header,
            true,
        );
    }

    // Not a delta: empty, the magic alone, a zeroed header, garbage, an ONNX model.
    let mut misc: Vec<(String, Vec<u8>)> = vec![
        ("empty file".into(), Vec::new()),
        ("the magic alone".into(), b"BITDELTA".to_vec()),
        (
            "the magic and 56 zero bytes".into(),
            [&b"BITDELTA"[..], &[0; 56]].concat(),
        ),
        ("the valid header alone".into(), good[..HEADER_LEN].to_vec()),
        ("4096 bytes 0xff".into(), vec![0xff; 4096]),
        ("an ONNX model".into(), onnx.to_vec()),
    ];
    for n in [1, 63, 64, 65, 1000, 4096, len] {
        misc.push((format!("{n} random bytes"), rng.bytes(n)));
        let mut b = rng.bytes(n.max(8));
        b[..8].copy_from_slice(b"BITDELTA");
        misc.push((format!("the magic and {} random bytes", n.max(8) - 8), b));
    }
    for (what, b) in misc {
        push("garbage", Edit::Bytes(what, b), Seal::Raw, true);
    }

    // Valid, but made against another base (fog compressed against night).
    out.push(Mutant {
        class: "wrong-base",
        edit: Edit::Bytes("fog against night".into(), other_base.to_vec()),
        seal: Seal::Raw,
        needs_base: true,
        cli: true,
    });
    out
}

// ---------------------------------------------------------------------------------------------
// Judging a mutant in-process: the calls `bitdelta verify` makes.

/// The variant name of an error (`PayloadChecksum`, `WrongBase`, ...).
fn kind(debug: String) -> String {
    debug
        .split(|c: char| !c.is_alphanumeric())
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// `Ok` when `verify` accepts `bytes` (with the base when given), else the refusal's kind. An
/// accepted delta is `Ok(true)` when it provably means what the valid one means: checked with
/// the base (so its rebuilt weights hash to its manifest's result fingerprint) and with the
/// valid delta's manifest (so that fingerprint is the valid delta's).
fn verdict(
    bytes: &[u8],
    base: Option<(&[u8], &OnnxWeights)>,
    valid: &Manifest<'_>,
) -> Result<bool, String> {
    let file = DeltaFile::parse(bytes).map_err(|e| kind(format!("{e:?}")))?;
    file.verify_payloads().map_err(|e| kind(format!("{e:?}")))?;
    let Some((bytes, weights)) = base else {
        return Ok(false);
    };
    match rebuild(bytes, weights, &[(&file, 1.0)], |_, _| {}) {
        Ok(_) => Ok(file.manifest() == valid),
        Err(bitdelta::apply::ApplyError::Format { error, .. }) => Err(kind(format!("{error:?}"))),
        Err(e) => Err(kind(format!("{e:?}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// Running `bitdelta verify` under a time limit and an address-space cap.

struct Outcome {
    code: Option<i32>,
    stderr: String,
    elapsed: Duration,
    timed_out: bool,
}

/// `bitdelta verify file [--base species-base]` through `sh -c 'ulimit -v …; exec "$@"'` (after
/// `BITDELTA_RUNNER`, e.g. qemu-user, when set), killed after [`TIMEOUT`].
fn verify_capped(file: &Path, with_base: bool, stderr_to: &Path) -> Outcome {
    let inner = command();
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -v {MEM_CAP_KIB} && exec \"$@\""))
        .arg("sh")
        .arg(inner.get_program())
        .args(inner.get_args())
        .arg("verify")
        .arg(file);
    if with_base {
        c.arg("--base").arg(model("species-base"));
    }
    c.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(stderr_to).unwrap());
    let start = Instant::now();
    let mut child = c.spawn().expect("sh runs");
    let mut timed_out = false;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > TIMEOUT {
            timed_out = true;
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    Outcome {
        code: status.code(),
        stderr: std::fs::read_to_string(stderr_to).unwrap_or_default(),
        elapsed: start.elapsed(),
        timed_out,
    }
}

/// What the binary must do with a mutant; `None` when it did.
fn cli_problem(m: &Mutant, equivalent: bool, file: &Path, o: &Outcome) -> Option<String> {
    let f = p(file);
    let problem = if o.timed_out {
        format!("still running after {TIMEOUT:?}")
    } else if o.stderr.contains("panicked") {
        "panicked".into()
    } else if o.code == Some(0) && equivalent {
        return None;
    } else if !matches!(o.code, Some(1 | 2)) {
        format!("exit code {:?} (killed by a signal when None)", o.code)
    } else if o.stderr.trim().is_empty() {
        "no message on stderr".into()
    } else if !o.stderr.contains(f) {
        "the message does not name the file".into()
    } else if let Some(c) = m
        .seal
        .forbidden_messages()
        .iter()
        .find(|c| o.stderr.contains(*c))
    {
        format!("refused by a checksum the edit re-sealed ({c})")
    } else {
        return None;
    };
    Some(format!(
        "{}: {} ({f}): {problem}: {}",
        m.class,
        m.what(),
        o.stderr.trim()
    ))
}

#[derive(Default)]
struct ClassStats {
    in_process: usize,
    cli: usize,
    cli_without_base: usize,
    exit: BTreeMap<i32, usize>,
    slowest: Duration,
}

#[test]
fn verify_refuses_every_mutant_cleanly() {
    let dir = scratch("badinput_mutants");
    let night = dir.join("night.bdelta");
    compress("night", &night, "auto");
    let good = with_library_codecs(&std::fs::read(&night).unwrap());
    std::fs::write(&night, &good).unwrap();
    let fog = dir.join("fog-on-night.bdelta");
    let (b, f) = (model("night"), model("fog"));
    ok(&["compress", "--base", p(&b), "--fine", p(&f), "-o", p(&fog)]);
    let base = std::fs::read(model("species-base")).unwrap();
    let weights = OnnxWeights::scan(&base).unwrap();
    let with_base = Some((base.as_slice(), &weights));

    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    let l = Layout::of(&good);
    let mutants = mutants(&good, &l, &std::fs::read(&fog).unwrap(), &base);

    // Controls: the valid delta, re-sealed unchanged and with another description (a field no
    // check covers once the meta CRC is re-sealed), is accepted; so sealing reaches the checks.
    let file = DeltaFile::parse(&good).unwrap();
    let described = Manifest {
        description: "edited",
        ..file.manifest().clone()
    };
    let mut resealed = good.clone();
    seal_meta(&mut resealed, &l);
    assert_eq!(resealed, good);
    let controls = [
        ("valid", good.clone()),
        (
            "description edited, re-sealed",
            with_manifest(&good, &l, &encode_manifest(&described)),
        ),
    ];

    // In-process: every mutant.
    let mut stats: BTreeMap<&str, ClassStats> = BTreeMap::new();
    let mut reasons: BTreeMap<(&str, String), usize> = BTreeMap::new();
    let mut failures = Vec::new();
    let valid = file.manifest();
    for (what, b) in &controls {
        let v = verdict(b, with_base, valid);
        assert!(v.is_ok(), "control {what}: {v:?}");
    }
    // Sealed mutants that are accepted with the base and rebuild the same weights: another
    // encoding of the same delta (e.g. `names_len` taking in a padding byte, `dims_start`
    // pointing at equal dims elsewhere). The binary may accept these (exit 0), and no other.
    let mut equivalent = std::collections::BTreeSet::new();
    let mut work = good.clone();
    for (i, m) in mutants.iter().enumerate() {
        let outcome = catch_unwind(AssertUnwindSafe(|| {
            let base = if m.needs_base { with_base } else { None };
            let judge = |b: &[u8]| verdict(b, base, valid);
            match &m.edit {
                Edit::Cut(n) => judge(&good[..*n]),
                Edit::Flip(i) => {
                    work[i / 8] ^= 1 << (i % 8);
                    let v = judge(&work);
                    work[i / 8] ^= 1 << (i % 8);
                    v
                }
                Edit::Patch(_, d) => {
                    for &(at, v) in d {
                        work[at] = v;
                    }
                    let v = judge(&work);
                    for &(at, _) in d {
                        work[at] = good[at];
                    }
                    v
                }
                Edit::Bytes(_, b) => judge(b),
            }
        }));
        if outcome.is_err() {
            work.copy_from_slice(&good); // the edit may not have been undone
        }
        stats.entry(m.class).or_default().in_process += 1;
        let problem = match outcome {
            Err(_) => Some("panicked in-process".to_owned()),
            Ok(Ok(true)) if m.needs_base => {
                equivalent.insert(i);
                println!("equivalent, accepted: {}: {}", m.class, m.what());
                None
            }
            Ok(Ok(_)) => Some("accepted".to_owned()),
            Ok(Err(k)) if m.seal.forbidden().contains(&k.as_str()) => {
                Some(format!("refused by a checksum the edit re-sealed ({k})"))
            }
            Ok(Err(k)) => {
                *reasons.entry((m.class, k)).or_default() += 1;
                None
            }
        };
        if let Some(problem) = problem {
            failures.push(format!("{}: {}: {problem}", m.class, m.what()));
        }
    }
    work.clear();

    // Through the binary: the sampled mutants (under an emulator, where a spawn costs tens of
    // times more, every 8th of each class), each raw one every 4th time without --base, in a few
    // threads.
    let stride = if std::env::var("BITDELTA_RUNNER").is_ok_and(|r| !r.trim().is_empty()) {
        8
    } else {
        1
    };
    let (mut seen, mut raw) = (BTreeMap::<&str, usize>::new(), 0usize);
    let mut jobs: Vec<(usize, bool)> = Vec::new();
    for (i, m) in mutants.iter().enumerate().filter(|(_, m)| m.cli) {
        let k = seen.entry(m.class).or_default();
        *k += 1;
        if (*k - 1) % stride == 0 {
            raw += usize::from(!m.needs_base);
            jobs.push((i, m.needs_base || raw % 4 != 1));
        }
    }
    let cli_dir = dir.join("cli");
    std::fs::create_dir_all(&cli_dir).unwrap();
    let next = AtomicUsize::new(0);
    let results = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get() + 1)
        .min(4);
    let started = Instant::now();
    std::thread::scope(|s| {
        for w in 0..threads {
            let (jobs, next, results, mutants, good, cli_dir, equivalent) = (
                &jobs,
                &next,
                &results,
                &mutants,
                &good,
                &cli_dir,
                &equivalent,
            );
            s.spawn(move || {
                let stderr = cli_dir.join(format!("stderr-{w}.txt"));
                while let Some(&(i, base)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let m = &mutants[i];
                    let file = cli_dir.join(format!("{}-{i}.bdelta", m.class));
                    std::fs::write(&file, m.bytes(good)).unwrap();
                    let o = verify_capped(&file, base, &stderr);
                    let problem = cli_problem(m, equivalent.contains(&i), &file, &o);
                    if problem.is_none() {
                        std::fs::remove_file(&file).unwrap();
                    }
                    results.lock().unwrap().push((i, base, o, problem));
                }
            });
        }
    });
    let cli_time = started.elapsed();
    for (i, with_base, o, problem) in results.into_inner().unwrap() {
        let st = stats.entry(mutants[i].class).or_default();
        st.cli += 1;
        st.cli_without_base += usize::from(!with_base);
        *st.exit.entry(o.code.unwrap_or(-1)).or_default() += 1;
        st.slowest = st.slowest.max(o.elapsed);
        failures.extend(problem);
    }
    for (what, b) in &controls {
        let file = cli_dir.join("control.bdelta");
        std::fs::write(&file, b).unwrap();
        let o = verify_capped(&file, true, &cli_dir.join("stderr-control.txt"));
        assert_eq!(o.code, Some(0), "control {what}: {}", o.stderr);
    }

    println!(
        "{:<18} {:>10} {:>6} {:>8}  {:<18} {:>8}",
        "class", "in-process", "cli", "no-base", "cli exit codes", "slowest"
    );
    for (class, s) in &stats {
        let codes: Vec<String> = s.exit.iter().map(|(c, n)| format!("{c}:{n}")).collect();
        println!(
            "{class:<18} {:>10} {:>6} {:>8}  {:<18} {:>6}ms",
            s.in_process,
            s.cli,
            s.cli_without_base,
            codes.join(" "),
            s.slowest.as_millis()
        );
    }
    println!(
        "{} mutants in-process ({} equivalent to the valid delta), {} runs of the binary in {:.1}s ({threads} threads)",
        mutants.len(),
        equivalent.len(),
        jobs.len(),
        cli_time.as_secs_f64()
    );
    println!("in-process refusals by class and kind:");
    for ((class, k), n) in &reasons {
        println!("  {class:<18} {k:<20} {n}");
    }
    assert!(
        failures.is_empty(),
        "{} mutants not refused cleanly; first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(30)].join("\n")
    );
    assert!(mutants.len() > 100_000, "{} mutants", mutants.len());
    assert!(
        jobs.len() * stride > 1000,
        "{} runs of the binary",
        jobs.len()
    );
}

/// `auto` writes no `sign-planes` entry (only `compress --calib` chooses it) and no policy
/// writes `sparse-signs`, so the valid delta the mutants start from is the `auto` one rewritten
/// through the library: `fc.weight` as `sign-planes` with 2 planes and one f16 scale per output
/// channel, `fc.bias` (10 elements, so padding bits) with 3 planes and f32 scales; the first
/// other weight (rank 2 or more) of at least 256 elements as `sparse-signs` with 8 entries per
/// block and one f16 scale per output channel, and the first other changed tensor whose length
/// is not a multiple of 64 (a short last block) with as many entries as its last block allows,
/// up to 3, and one f32 scale. The manifest is kept and the result fingerprint is recomputed, as `compress` does.
fn with_library_codecs(auto: &[u8]) -> Vec<u8> {
    use bitdelta::compress::{compress_onnx_with, encode, Options, Policy};
    let file = DeltaFile::parse(auto).unwrap();
    let m = file.manifest();
    let base = std::fs::read(model("species-base")).unwrap();
    let fine = std::fs::read(model("night")).unwrap();
    let (bw, fw) = (
        OnnxWeights::scan(&base).unwrap(),
        OnnxWeights::scan(&fine).unwrap(),
    );
    let opts = Options {
        name: m.name,
        description: m.description,
        labels: m.labels,
        sequence: m.sequence,
        policy: Policy::Auto,
    };
    let (mut sparse_big, mut sparse_short) = (false, false);
    let out = compress_onnx_with(
        &base,
        &bw,
        &fine,
        &fw,
        &opts,
        |_, init, b, f| match init.name.as_str() {
            "fc.weight" => bitdelta::codec::sign_planes(b, f, init.dims[0] as usize, 2, true),
            "fc.bias" => bitdelta::codec::sign_planes(b, f, 1, 3, false),
            _ if !sparse_big && b.len() >= 256 && init.dims.len() >= 2 => {
                sparse_big = true;
                bitdelta::codec::sparse_signs(b, f, init.dims[0] as usize, 8, true)
            }
            _ if !sparse_short && b.len() % 64 != 0 && b != f => {
                sparse_short = true;
                let m = bitdelta::codec::max_entries(b.len() as u64).min(3);
                bitdelta::codec::sparse_signs(b, f, 1, m, false)
            }
            _ => encode(Policy::Auto, &init.dims, b, f),
        },
        |_, _| {},
    )
    .unwrap();
    let codecs: Vec<Codec> = DeltaFile::parse(&out)
        .unwrap()
        .tensors()
        .map(|e| e.codec)
        .collect();
    assert_eq!(
        codecs.iter().filter(|&&c| c == Codec::SignPlanes).count(),
        2
    );
    assert_eq!(
        codecs.iter().filter(|&&c| c == Codec::SparseSigns).count(),
        2
    );
    out
}

// ---------------------------------------------------------------------------------------------
// The fuzz corpus, in-process.

/// Files under `fuzz/corpus/<target>/` and `fuzz/artifacts/<target>/`.
fn fuzz_files() -> Vec<PathBuf> {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let mut files = Vec::new();
    for sub in ["corpus", "artifacts"] {
        let Ok(targets) = std::fs::read_dir(fuzz.join(sub)) else {
            continue;
        };
        for t in targets {
            for f in std::fs::read_dir(t.unwrap().path()).unwrap() {
                let f = f.unwrap().path();
                if f.is_file() {
                    files.push(f);
                }
            }
        }
    }
    files.sort();
    files
}

/// The payload as a record for [`write_delta`].
fn encoded(p: Payload<'_>) -> Encoded {
    p.to_encoded()
}

/// An unchanged tensor reads no payload, so its element count is not bounded by the file; the
/// streaming decoder still walks its elements. Larger ones are not streamed here.
const STREAM_UNCHANGED_MAX: u64 = 1 << 24;

/// Whether the streaming decoder accepts `bytes`, with an ample buffer; `Err` when it disagrees
/// with [`DeltaFile::parse`] on a structural refusal; `Ok(None)` when not streamed.
fn stream_verdict(
    bytes: &[u8],
    parsed: &Result<DeltaFile<'_>, FormatError>,
) -> Result<Option<bool>, String> {
    let mut buf = vec![0u8; 2 * bytes.len() + HEADER_LEN];
    let dec = StreamDecoder::new(bytes, bytes.len() as u64, &mut buf);
    // `new` makes the checks of `parse` in the same order, except the padding between payloads.
    let mut dec = match (dec, parsed) {
        (Ok(dec), Ok(_)) => dec,
        (Ok(dec), Err(FormatError::PaddingNotZero { offset }))
            if *offset >= dec.header().payload_offset =>
        {
            dec
        }
        (Err(bitdelta::Error::Format(s)), Err(e))
            if s == *e || matches!(e, FormatError::PaddingNotZero { .. }) =>
        {
            return Ok(Some(false))
        }
        (Ok(_), Err(e)) => return Err(format!("parse refuses ({e}), the stream decoder accepts")),
        (Err(s), p) => {
            return Err(format!(
                "the stream decoder refuses ({s:?}), parse gives {:?}",
                p.as_ref().err()
            ))
        }
    };
    let huge = (0..dec.len())
        .filter_map(|i| dec.tensor(i))
        .any(|t| t.codec == Codec::Unchanged && t.numel() > STREAM_UNCHANGED_MAX);
    if huge {
        return Ok(None);
    }
    loop {
        match dec.skip_tensor() {
            Ok(Some(_)) => {}
            Ok(None) => return Ok(Some(dec.is_complete())),
            Err(bitdelta::Error::Format(_)) => return Ok(Some(false)),
            Err(e) => return Err(format!("the stream decoder failed: {e:?}")),
        }
    }
}

/// Parses, checks and walks one file; `Ok(true)` when it is a valid delta that round-trips
/// through [`write_delta`] (same manifest, alignment, tensors and payload bytes).
fn corpus_check(bytes: &[u8]) -> Result<bool, String> {
    let parsed = DeltaFile::parse(bytes);
    let checked = match &parsed {
        Ok(f) => {
            let _ = f.params();
            for e in f.tensors() {
                let _ = (e.dims().count(), e.numel(), e.payload());
                if f.find(e.name).map(|x| x.index) != Some(e.index) {
                    return Err(format!("find({:?}) misses its entry", e.name));
                }
            }
            f.verify_payloads()
        }
        Err(e) => Err(*e),
    };
    if let Some(streamed) = stream_verdict(bytes, &parsed)? {
        if streamed != checked.is_ok() {
            return Err(format!(
                "stream decoder accepts: {streamed}, parse + verify_payloads: {checked:?}"
            ));
        }
    }
    let (Ok(f), Ok(())) = (&parsed, checked) else {
        return Ok(false);
    };
    let mut records = f
        .tensors()
        .map(|e| {
            Ok(TensorRecord {
                name: e.name.into(),
                dtype: e.dtype,
                dims: e.dims().collect(),
                encoded: encoded(e.payload()?),
            })
        })
        .collect::<Result<Vec<_>, FormatError>>()
        .map_err(|e| e.to_string())?;
    let again = write_delta(f.manifest(), &mut records, f.header().alignment)
        .map_err(|e| format!("valid, but write_delta refuses it: {e}"))?;
    let g = DeltaFile::parse(&again).map_err(|e| format!("rewritten: {e}"))?;
    g.verify_payloads().map_err(|e| format!("rewritten: {e}"))?;
    let same = g.manifest() == f.manifest()
        && g.header().alignment == f.header().alignment
        && g.len() == f.len()
        && f.tensors().zip(g.tensors()).all(|(a, b)| {
            a.name == b.name
                && a.dtype == b.dtype
                && a.codec == b.codec
                && a.flags == b.flags
                && a.groups == b.groups
                && a.scale.to_bits() == b.scale.to_bits()
                && a.crc == b.crc
                && a.dims().eq(b.dims())
                && a.payload_bytes() == b.payload_bytes()
        });
    if same {
        Ok(true)
    } else {
        Err("the rewritten delta differs".into())
    }
}

/// `data` with its checksums recomputed where its own header and table locate them (payload
/// CRCs, then the meta CRC, then the header CRC), as the fuzz targets do before their second
/// pass (`fuzz/src/lib.rs`); `None` when shorter than the header or already sealed.
fn seal_located(data: &[u8]) -> Option<Vec<u8>> {
    let get = |b: &[u8], at: u64, len: u64| -> Option<std::ops::Range<usize>> {
        let at = usize::try_from(at).ok()?;
        let end = at.checked_add(usize::try_from(len).ok()?)?;
        (end <= b.len()).then_some(at..end)
    };
    let mut b = data.to_vec();
    if b.len() < HEADER_LEN {
        return None;
    }
    let table = HEADER_LEN as u64 + rd(&b, 16, 4);
    let payload_offset = rd(&b, 32, 8);
    for i in 0..rd(&b, 20, 4) {
        let Some(e) = get(&b, table + ENTRY_LEN as u64 * i, ENTRY_LEN as u64) else {
            break;
        };
        let (off, len) = (rd(&b, e.start, 8), rd(&b, e.start + 8, 8));
        let payload = payload_offset
            .checked_add(off)
            .and_then(|start| get(&b, start, len));
        if let Some(p) = payload {
            let c = crc32(&b[p]);
            wr(&mut b, e.start + 40, 4, c.into());
        }
    }
    if let Some(meta) = get(&b, HEADER_LEN as u64, payload_offset.saturating_sub(64)) {
        let c = crc32(&b[meta]);
        wr(&mut b, 48, 4, c.into());
    }
    seal_header(&mut b);
    (b != data).then_some(b)
}

#[test]
fn fuzz_corpus_never_panics_and_valid_deltas_round_trip() {
    let files = fuzz_files();
    assert!(!files.is_empty(), "no files under fuzz/corpus");
    let (mut valid, mut failures) = (0, Vec::new());
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        let sealed = catch_unwind(|| seal_located(&bytes)).expect("sealing never panics");
        let inputs = std::iter::once(("", bytes.clone())).chain(sealed.map(|s| (", sealed", s)));
        for (how, b) in inputs {
            match catch_unwind(|| corpus_check(&b)) {
                Ok(Ok(v)) => valid += usize::from(v),
                Ok(Err(msg)) => failures.push(format!("{}{how}: {msg}", f.display())),
                Err(_) => failures.push(format!("{}{how}: panicked", f.display())),
            }
        }
    }
    println!(
        "{} fuzz corpus files (each also sealed), {valid} valid deltas",
        files.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert!(valid > 0, "the corpus holds valid deltas (the seeds)");
}
