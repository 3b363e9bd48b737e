//! Peak memory of `bitdelta compress` and `bitdelta apply` on a pair of large safetensors
//! checkpoints: both must stream, so the peak resident set stays a small fraction of one model
//! (the goal is below 10 %).
//!
//! Generates a synthetic base and fine-tuned checkpoint on disk (f32; one 62.5 MiB embedding,
//! then MLP layers of two 32 MiB matrices, two biases and a norm that fine-tuning leaves alone;
//! fine = base + small noise), streaming, so generating stays small in memory too. Then runs the
//! built `bitdelta` binary as a child, `compress` and then `apply`, and reads each child's peak
//! RSS from `wait4` (`ru_maxrss`). Prints one JSON object.
//!
//! Run: `cargo build --release -p bitdelta-cli && cargo bench -p bitdelta-benches --bench checkpoint`
//!
//! Environment:
//! - `BITDELTA_CKPT_GIB`: size of one checkpoint in GiB (default 4; fractions allowed).
//! - `BITDELTA_BIN`: the binary (default `target/release/bitdelta`).
//! - `BITDELTA_CODEC`: `auto` (default) or `seed`.
//! - `BITDELTA_KEEP=1`: keep the files under `target/checkpoint-bench/` (and reuse a pair of the
//!   same size on the next run).
//!
//! The checkpoints were just written, so they are read from the page cache: the timings are
//! CPU-bound figures, not disk ones. Page-cache pages do not count in RSS; mapped pages a process
//! touches do, which is what the streaming must keep in check.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

/// The goal: peak RSS below this fraction of one model's size.
const GOAL: f64 = 0.10;

/// A tensor of the synthetic checkpoint.
struct Tensor {
    name: String,
    shape: Vec<usize>,
    /// Changed by fine-tuning.
    changed: bool,
    /// Values around this centre (1.0 for norms, 0.0 otherwise).
    centre: f32,
}

impl Tensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One embedding, then as many MLP layers (about 64 MiB each) as fit in `gib`.
fn layout(gib: f64) -> Vec<Tensor> {
    let t = |name: String, shape: &[usize], changed, centre| Tensor {
        name,
        shape: shape.to_vec(),
        changed,
        centre,
    };
    let mut v = vec![t("embed.weight".into(), &[32000, 512], true, 0.0)];
    let budget = gib * (1u64 << 30) as f64 - (32000 * 512 * 4) as f64;
    let layers = ((budget / (64 << 20) as f64).round() as usize).max(1);
    for i in 0..layers {
        let l = |s: &str| format!("layers.{i:03}.{s}");
        v.push(t(l("mlp.up.weight"), &[4096, 2048], true, 0.0));
        v.push(t(l("mlp.up.bias"), &[4096], true, 0.0));
        v.push(t(l("mlp.down.weight"), &[2048, 4096], true, 0.0));
        v.push(t(l("mlp.down.bias"), &[2048], true, 0.0));
        v.push(t(l("norm.weight"), &[2048], false, 1.0));
    }
    // Data in ascending name order, the order the tools read it.
    v.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    v
}

/// The safetensors header: u64 length, then JSON padded with spaces to a multiple of 8.
fn header(tensors: &[Tensor]) -> Vec<u8> {
    let mut json = String::from(r#"{"__metadata__":{"format":"pt"}"#);
    let mut off = 0;
    for t in tensors {
        let shape: Vec<String> = t.shape.iter().map(|d| d.to_string()).collect();
        let end = off + t.numel() * 4;
        json += &format!(
            r#","{}":{{"dtype":"F32","shape":[{}],"data_offsets":[{off},{end}]}}"#,
            t.name,
            shape.join(",")
        );
        off = end;
    }
    json.push('}');
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let mut h = (json.len() as u64).to_le_bytes().to_vec();
    h.extend_from_slice(json.as_bytes());
    h
}

/// xorshift64*: uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Writes the pair, one 4 MiB chunk at a time; returns the length of one file.
fn generate(tensors: &[Tensor], base: &Path, fine: &Path) -> std::io::Result<u64> {
    let h = header(tensors);
    let mut b = BufWriter::with_capacity(1 << 20, File::create(base)?);
    let mut f = BufWriter::with_capacity(1 << 20, File::create(fine)?);
    b.write_all(&h)?;
    f.write_all(&h)?;
    let mut rng = Rng(0xb17d_e17a_5eed);
    const CHUNK: usize = 1 << 20;
    let (mut bb, mut fb) = (Vec::with_capacity(CHUNK * 4), Vec::with_capacity(CHUNK * 4));
    let mut len = h.len() as u64;
    for t in tensors {
        let mut left = t.numel();
        while left > 0 {
            let n = left.min(CHUNK);
            bb.clear();
            fb.clear();
            for _ in 0..n {
                let x = t.centre + rng.next() * 0.05;
                let y = if t.changed { x + rng.next() * 1e-3 } else { x };
                bb.extend_from_slice(&x.to_le_bytes());
                fb.extend_from_slice(&y.to_le_bytes());
            }
            b.write_all(&bb)?;
            f.write_all(&fb)?;
            left -= n;
        }
        len += t.numel() as u64 * 4;
    }
    b.into_inner()?.sync_all()?;
    f.into_inner()?.sync_all()?;
    Ok(len)
}

/// A finished child: wall time, peak RSS, output.
struct Run {
    seconds: f64,
    peak_rss: u64,
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs `bin args` and reaps it with `wait4`, which reports its peak RSS.
fn run(bin: &Path, args: &[&str]) -> std::io::Result<Run> {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // Both outputs are a few lines: far below a pipe's capacity, so the child never blocks on
    // them before it exits.
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is a plain C struct of integers, for which all-zero bytes are a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet reaped (std only reaps in `wait`/`try_wait`, which
    // are never called on it); `status` and `usage` are valid for writes.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        return Err(std::io::Error::last_os_error());
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut o) = child.stdout.take() {
        o.read_to_string(&mut stdout)?;
    }
    if let Some(mut e) = child.stderr.take() {
        e.read_to_string(&mut stderr)?;
    }
    Ok(Run {
        seconds,
        // Linux reports kilobytes.
        peak_rss: usage.ru_maxrss as u64 * 1024,
        ok: libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stdout,
        stderr,
    })
}

fn main() -> ExitCode {
    match bench() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("checkpoint bench: {e}");
            ExitCode::from(2)
        }
    }
}

fn bench() -> Result<bool, Box<dyn std::error::Error>> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let gib: f64 = env("BITDELTA_CKPT_GIB").map_or(Ok(4.0), |v| v.parse())?;
    let keep = env("BITDELTA_KEEP").as_deref() == Some("1");
    let codec = env("BITDELTA_CODEC").unwrap_or_else(|| "auto".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target");
    let bin = env("BITDELTA_BIN").map_or_else(|| root.join("release/bitdelta"), PathBuf::from);
    if !bin.exists() {
        return Err(format!(
            "{}: no binary (cargo build --release -p bitdelta-cli, or set BITDELTA_BIN)",
            bin.display()
        )
        .into());
    }
    let dir = root.join("checkpoint-bench");
    std::fs::create_dir_all(&dir)?;
    let path = |n: &str| dir.join(n);
    let (base, fine) = (path("base.safetensors"), path("fine.safetensors"));
    let (delta, out) = (path("variant.bdelta"), path("rebuilt.safetensors"));

    let tensors = layout(gib);
    let params: u64 = tensors.iter().map(|t| t.numel() as u64).sum();
    let expected = header(&tensors).len() as u64 + params * 4;
    let len_of = |p: &Path| std::fs::metadata(p).map(|m| m.len()).ok();
    let t0 = Instant::now();
    let reused = len_of(&base) == Some(expected) && len_of(&fine) == Some(expected);
    if !reused {
        eprintln!("generating 2 x {:.2} GiB under {}", gib, dir.display());
        generate(&tensors, &base, &fine)?;
    }
    let generate_seconds = t0.elapsed().as_secs_f64();
    let model_bytes = expected;

    eprintln!("compress --codec {codec}");
    let c = run(
        &bin,
        &[
            "compress",
            "--base",
            s(&base),
            "--fine",
            s(&fine),
            "-o",
            s(&delta),
            "--codec",
            &codec,
        ],
    )?;
    if !c.ok {
        return Err(format!("compress failed: {}{}", c.stdout, c.stderr).into());
    }
    let delta_bytes = len_of(&delta).unwrap_or(0);
    eprintln!("apply");
    let a = run(
        &bin,
        &["apply", "--base", s(&base), s(&delta), "-o", s(&out)],
    )?;
    if !a.ok {
        return Err(format!("apply failed: {}{}", a.stdout, a.stderr).into());
    }

    let ratio = |r: &Run| r.peak_rss as f64 / model_bytes as f64;
    let within = ratio(&c) < GOAL && ratio(&a) < GOAL;
    println!(
        "{{\n  \"model_bytes\": {model_bytes},\n  \"params\": {params},\n  \"tensors\": {},\n  \
         \"codec\": \"{codec}\",\n  \"peak_rss_bytes\": {},\n  \"peak_rss_vs_model\": {:.4},\n  \
         \"seconds\": {:.2},\n  \"delta_bytes\": {delta_bytes},\n  \"bits_per_param\": {:.4},\n  \
         \"apply_peak_rss_bytes\": {},\n  \"apply_peak_rss_vs_model\": {:.4},\n  \
         \"apply_seconds\": {:.2},\n  \"generate_seconds\": {generate_seconds:.2},\n  \
         \"reused_pair\": {reused},\n  \"goal\": {GOAL},\n  \"within_goal\": {within}\n}}",
        tensors.len(),
        c.peak_rss,
        ratio(&c),
        c.seconds,
        delta_bytes as f64 * 8.0 / params as f64,
        a.peak_rss,
        ratio(&a),
        a.seconds,
    );
    for p in [&delta, &out] {
        let _ = std::fs::remove_file(p);
    }
    if !keep {
        for p in [&base, &fine] {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_dir(&dir);
    }
    Ok(within)
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}
