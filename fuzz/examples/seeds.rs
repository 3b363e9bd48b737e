//! Writes the seed corpus of both fuzz targets: small valid deltas covering every codec, both
//! dtypes and scale types, a scalar, a non-ASCII name, several alignments, an empty delta, and
//! tensors longer than the stream decoder's 256-byte I/O buffer and sign segments.
//!
//! Run from `fuzz/`: `cargo run --example seeds`. It writes `corpus/{parse,stream}/seed-*.bdelta`
//! and is deterministic, so the files only change when the format does.

use std::path::Path;

use bitdelta::format::{write_delta, DType, Encoded, Manifest, OwnedScales, TensorRecord};
use bitdelta::DeltaFile;
use half::f16;

/// xorshift64, for reproducible contents.
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
    fn f32(&mut self) -> f32 {
        (self.next() % 2001) as f32 / 1000.0 - 1.0
    }
    /// `ceil(n/8)` bytes of sign bits, the unused high bits of the last byte clear.
    fn bits(&mut self, n: usize) -> Vec<u8> {
        let mut b: Vec<u8> = (0..n.div_ceil(8)).map(|_| self.next() as u8).collect();
        if !n.is_multiple_of(8) {
            *b.last_mut().unwrap() &= (1u8 << (n % 8)) - 1;
        }
        b
    }
    /// `planes` interleaved sign planes of `n` elements, the unused high bits of each plane's
    /// last byte clear.
    fn planes(&mut self, n: usize, planes: usize) -> Vec<u8> {
        let mut b: Vec<u8> = (0..n.div_ceil(8) * planes)
            .map(|_| self.next() as u8)
            .collect();
        if !n.is_multiple_of(8) {
            let last = b.len() - planes;
            for x in &mut b[last..] {
                *x &= (1u8 << (n % 8)) - 1;
            }
        }
        b
    }
    /// `sparse-signs` entries of `n` elements, `m` per block of 64: distinct indices in
    /// increasing order (fewer than `m` only where the block is shorter, which the caller
    /// avoids), random level and sign bits.
    fn sparse(&mut self, n: usize, m: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for start in (0..n).step_by(64) {
            let len = 64.min(n - start);
            let mut idx: Vec<u8> = (0..len as u8).collect();
            for k in 0..m.min(len) {
                let j = k + (self.next() % (len - k) as u64) as usize;
                idx.swap(k, j);
            }
            idx.truncate(m.min(len));
            idx.sort_unstable();
            out.extend(idx.iter().map(|&i| i | (self.next() as u8 & 0xc0)));
        }
        out
    }
    /// `n` 8-bit deltas in -127..=127.
    fn q8(&mut self, n: usize) -> Vec<i8> {
        (0..n)
            .map(|_| ((self.next() % 255) as i16 - 127) as i8)
            .collect()
    }
    fn scales(&mut self, g: usize, f16: bool) -> OwnedScales {
        let v: Vec<f32> = (0..g)
            .map(|_| (self.next() % 1000) as f32 / 4096.0)
            .collect();
        if f16 {
            OwnedScales::F16(v.into_iter().map(f16::from_f32).collect())
        } else {
            OwnedScales::F32(v)
        }
    }
}

fn record(name: &str, dtype: DType, dims: &[u32], encoded: Encoded) -> TensorRecord {
    TensorRecord {
        name: name.into(),
        dtype,
        dims: dims.to_vec(),
        encoded,
    }
}

/// One tensor of each codec (both scale types for the group codecs), a scalar and a non-ASCII
/// name, all of `dtype`. The `sparse-signs` tensors draw from their own generator, so that
/// adding them left the other tensors' bytes as they were.
fn every_codec(rng: &mut Rng, dtype: DType) -> Vec<TensorRecord> {
    let mut sparse = Rng(rng.0 ^ 0x5a55);
    vec![
        record("a.unchanged", dtype, &[3, 5], Encoded::Unchanged),
        record(
            "b.raw_f32",
            dtype,
            &[7],
            Encoded::RawF32((0..7).map(|_| rng.f32()).collect()),
        ),
        record(
            "c.raw_f16",
            dtype,
            &[2, 3],
            Encoded::RawF16((0..6).map(|_| f16::from_f32(rng.f32())).collect()),
        ),
        record(
            "d.sign",
            dtype,
            &[13],
            Encoded::Sign {
                scale: 0.125,
                bits: rng.bits(13),
            },
        ),
        record(
            "e.sign_groups_f16",
            dtype,
            &[3, 4],
            Encoded::SignGroups {
                scales: rng.scales(3, true),
                bits: rng.bits(12),
            },
        ),
        record(
            "f.sign_groups_f32",
            dtype,
            &[4, 5],
            Encoded::SignGroups {
                scales: rng.scales(4, false),
                bits: rng.bits(20),
            },
        ),
        record(
            "g.q8_f16",
            dtype,
            &[3, 3],
            Encoded::Q8Groups {
                scales: rng.scales(3, true),
                q: rng.q8(9),
            },
        ),
        record(
            "h.q8_f32",
            dtype,
            &[2, 9],
            Encoded::Q8Groups {
                scales: rng.scales(2, false),
                q: rng.q8(18),
            },
        ),
        record("i.scalar", dtype, &[], Encoded::RawF32(vec![rng.f32()])),
        record(
            "j.sign_planes_f16",
            dtype,
            &[3, 5],
            Encoded::SignPlanes {
                planes: 2,
                scales: rng.scales(6, true),
                bits: rng.planes(15, 2),
            },
        ),
        record(
            "k.sign_planes_f32",
            dtype,
            &[11],
            Encoded::SignPlanes {
                planes: 3,
                scales: rng.scales(3, false),
                bits: rng.planes(11, 3),
            },
        ),
        // 90 elements: a block of 64 and one of 26; 4 entries per block, groups of 30.
        record(
            "l.sparse_signs_f16",
            dtype,
            &[3, 30],
            Encoded::SparseSigns {
                scales: sparse.scales(3, true),
                entries: sparse.sparse(90, 4),
            },
        ),
        // One short block, every element listed.
        record(
            "m.sparse_signs_f32",
            dtype,
            &[5],
            Encoded::SparseSigns {
                scales: sparse.scales(1, false),
                entries: sparse.sparse(5, 5),
            },
        ),
        record(
            "z.\u{fc}n\u{ef}code",
            dtype,
            &[2],
            Encoded::Q8Groups {
                scales: rng.scales(1, true),
                q: rng.q8(2),
            },
        ),
    ]
}

/// Tensors longer than the stream decoder's I/O buffer (256 bytes) and sign segment (2032
/// elements), with groups that start inside a chunk.
fn long(rng: &mut Rng) -> Vec<TensorRecord> {
    let mut sparse = Rng(rng.0 ^ 0x5a55);
    vec![
        record(
            "conv.sign",
            DType::F32,
            &[5, 1000],
            Encoded::Sign {
                scale: 0.01,
                bits: rng.bits(5000),
            },
        ),
        record(
            "conv.sign_groups",
            DType::F32,
            &[3, 1365],
            Encoded::SignGroups {
                scales: rng.scales(3, true),
                bits: rng.bits(4095),
            },
        ),
        record(
            "conv.sign_planes",
            DType::F32,
            &[3, 1001],
            Encoded::SignPlanes {
                planes: 3,
                scales: rng.scales(9, true),
                bits: rng.planes(3003, 3),
            },
        ),
        record(
            "conv.sign_planes_8",
            DType::F16,
            &[2, 333],
            Encoded::SignPlanes {
                planes: 8,
                scales: rng.scales(16, false),
                bits: rng.planes(666, 8),
            },
        ),
        // 47 blocks of 32 entries: 1504 bytes, several I/O buffers.
        record(
            "conv.sparse_signs",
            DType::F32,
            &[3, 1000],
            Encoded::SparseSigns {
                scales: sparse.scales(3, true),
                entries: sparse.sparse(3000, 32),
            },
        ),
        // One entry per block, a last block of 8 elements.
        record(
            "conv.sparse_signs_1",
            DType::F16,
            &[2, 100],
            Encoded::SparseSigns {
                scales: sparse.scales(2, false),
                entries: sparse.sparse(200, 1),
            },
        ),
        record(
            "fc.q8",
            DType::F16,
            &[6, 100],
            Encoded::Q8Groups {
                scales: rng.scales(6, false),
                q: rng.q8(600),
            },
        ),
        record(
            "fc.raw",
            DType::F32,
            &[100],
            Encoded::RawF32((0..100).map(|_| rng.f32()).collect()),
        ),
    ]
}

fn main() {
    let manifest = Manifest {
        name: "seed",
        description: "fuzz seed",
        labels: "cat\ndog\n",
        tool: "bitdelta-fuzz seeds",
        sequence: 1,
        params: 0,
        base_fingerprint: [0x11; 32],
        result_fingerprint: [0x22; 32],
    };
    let mut rng = Rng(0x5eed);
    let seeds: Vec<(&str, Vec<TensorRecord>, u32)> = vec![
        ("every-codec", every_codec(&mut rng, DType::F32), 8),
        ("every-codec-f16-base", every_codec(&mut rng, DType::F16), 8),
        ("every-codec-align-1", every_codec(&mut rng, DType::F32), 1),
        (
            "every-codec-align-64",
            every_codec(&mut rng, DType::F32),
            64,
        ),
        ("long-tensors", long(&mut rng), 8),
        ("empty", Vec::new(), 8),
        (
            "align-4096",
            vec![
                record("a", DType::F32, &[4], Encoded::Unchanged),
                record(
                    "b",
                    DType::F32,
                    &[9],
                    Encoded::Sign {
                        scale: 1.0,
                        bits: rng.bits(9),
                    },
                ),
                record("c", DType::F32, &[2], Encoded::RawF32(vec![1.0, -0.0])),
            ],
            4096,
        ),
    ];
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for (name, mut records, align) in seeds {
        let bytes = write_delta(&manifest, &mut records, align).expect("seed writes");
        let file = DeltaFile::parse(&bytes).expect("seed parses");
        file.verify_payloads().expect("seed verifies");
        assert!(bytes.len() < 64 << 10, "{name}: {} bytes", bytes.len());
        for target in ["parse", "stream"] {
            let dir = root.join(target);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(format!("seed-{name}.bdelta")), &bytes).unwrap();
        }
        println!("seed-{name}.bdelta: {} bytes", bytes.len());
    }
}
