//! `bitdelta bench`.

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Result;
use bitdelta::kernels;
use serde_json::json;

/// Measure delta kernels against memcpy over the same output bytes, in one run.
///
/// Buffers are far larger than the caches (64 MiB of f32 output by default), so the ratio
/// `apply_vs_memcpy` (sign codec throughput / memcpy throughput) says how close applying a delta
/// comes to merely copying the base. Each figure is the median of --iters runs.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Output size in MiB.
    #[arg(long, default_value_t = 64)]
    size_mib: usize,
    /// Timed runs per kernel (median reported).
    #[arg(long, default_value_t = 11)]
    iters: usize,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn time(iters: usize, mut f: impl FnMut()) -> Duration {
    f(); // warm-up: page faults, caches
    median(
        (0..iters.max(1))
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect(),
    )
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    anyhow::ensure!(a.size_mib > 0, "--size-mib: expected at least 1");
    let n = a.size_mib * (1 << 20) / 4;
    let base: Vec<f32> = (0..n).map(|i| (i % 1021) as f32 * 1e-3 - 0.5).collect();
    let bits: Vec<u8> = (0..n.div_ceil(8))
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let q: Vec<i8> = (0..n)
        .map(|i| ((i * 37) % 255) as i8)
        .map(|v| v.max(-127))
        .collect();
    let mut out = vec![0f32; n];
    let bytes = (n * 4) as f64;
    let memcpy = time(a.iters, || {
        out.copy_from_slice(black_box(&base));
        black_box(&out);
    });
    let sign = time(a.iters, || {
        kernels::apply_signs(&mut out, black_box(&base), black_box(&bits), 0, 0.01);
        black_box(&out);
    });
    let q8 = time(a.iters, || {
        kernels::apply_q8(&mut out, black_box(&base), black_box(&q), 0.001, 1.0);
        black_box(&out);
    });
    let gbps = |d: Duration| bytes / d.as_secs_f64() / 1e9;
    let (m, s, q) = (gbps(memcpy), gbps(sign), gbps(q8));
    if a.json {
        super::print_json(&json!({
            "backend": kernels::backend_name(), "size_mib": a.size_mib, "iters": a.iters,
            "memcpy_gbps": m, "apply_sign_gbps": s, "apply_q8_gbps": q,
            "apply_vs_memcpy": s / m, "q8_vs_memcpy": q / m,
        }))?;
    } else {
        println!(
            "backend {}, {} MiB output, median of {} runs",
            kernels::backend_name(),
            a.size_mib,
            a.iters
        );
        println!("  memcpy          {m:>7.2} GB/s");
        println!(
            "  apply sign      {s:>7.2} GB/s   apply_vs_memcpy {:.3}",
            s / m
        );
        println!(
            "  apply q8        {q:>7.2} GB/s   q8_vs_memcpy    {:.3}",
            q / m
        );
    }
    Ok(ExitCode::SUCCESS)
}
