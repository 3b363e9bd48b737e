//! `apply_signs` throughput per backend, next to `memcpy` of the same output size.
//!
//! `apply_signs` is memory bound: it reads `base` (4 bytes per element) and the sign bits (1/8
//! byte per element) and writes `out` (4 bytes per element), so the target is at least 0.9x the
//! throughput of copying the output size. Throughput is reported in output bytes for both.
//!
//! Run with `cargo bench -p bitdelta-benches --bench apply`; add `-- --quick` for a fast look.
//!
//! Caveat seen on AMD Zen 3: `copy_from_slice` (glibc `rep movsb`) slows to ~1.5 GiB/s when the
//! destination sits just after the source modulo 4 KiB, which the allocator can produce for the
//! 64 KiB buffers. Treat the 64 MiB pair as the reference comparison.

use std::hint::black_box;
use std::time::Duration;

use bitdelta::kernels::{self, Kernels};
use bitdelta::pack::packed_len;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

/// Output sizes in bytes: one that fits in L2, one far larger than any cache.
const SIZES: [(usize, &str); 2] = [(64 << 10, "64KiB"), (64 << 20, "64MiB")];

/// Deterministic, non-trivial inputs: varied base values and a mix of sign bits.
fn inputs(bytes: usize) -> (Vec<f32>, Vec<u8>) {
    let n = bytes / size_of::<f32>();
    let base = (0..n).map(|i| (i % 1000) as f32 * 1e-3 - 0.5).collect();
    let bits = (0..packed_len(n))
        .map(|i| (i as u8).wrapping_mul(0x9d) ^ 0x5a)
        .collect();
    (base, bits)
}

/// The backends to compare: scalar and the one dispatch would choose (if different), plus any
/// other this CPU supports.
fn backends() -> Vec<&'static Kernels> {
    let mut all: Vec<_> = kernels::available().collect();
    if !all.iter().any(|k| core::ptr::eq(*k, Kernels::get())) {
        all.push(Kernels::get());
    }
    all
}

fn apply_signs(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply_signs");
    for (bytes, label) in SIZES {
        let (base, bits) = inputs(bytes);
        let mut out = vec![0.0f32; base.len()];
        group.throughput(Throughput::Bytes(bytes as u64));
        for k in backends() {
            group.bench_function(BenchmarkId::new(k.name(), label), |b| {
                b.iter(|| k.apply_signs(black_box(&mut out), black_box(&base), &bits, 0, 0.01));
            });
        }
    }
    group.finish();
}

fn memcpy(c: &mut Criterion) {
    let mut group = c.benchmark_group("memcpy");
    for (bytes, label) in SIZES {
        let (src, _) = inputs(bytes);
        let mut dst = vec![0.0f32; src.len()];
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new("copy_from_slice", label), |b| {
            b.iter(|| black_box(&mut dst[..]).copy_from_slice(black_box(&src)));
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = apply_signs, memcpy
}
criterion_main!(benches);
