//! `bitdelta compress`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use bitdelta::calibrate::{self, Images, Settings, Stage};
use bitdelta::compress::{
    compress_onnx, compress_onnx_with, plan_onnx, Budget, CompressError, Damage, Options, Policy,
};
use clap::ValueEnum;

use crate::files::{write_atomic, Model};
use bitdelta::card::ModelCard;
use bitdelta::format::Encoded;
use bitdelta::onnx::Initializer;

/// Compress a fine-tuned ONNX model into a delta against its base.
///
/// Reads both models memory-mapped, one tensor at a time, chooses a codec per tensor and writes
/// a `.bdelta` file. `--codec auto` (the default) spends 8 bits on small sensitive tensors
/// (biases, tensors of at most 4096 elements) and 1 bit with f16 per-channel scales on large
/// ones; `--codec seed` is the literal BitDelta recipe (sign + one mean-abs scale per tensor).
///
/// `--max-bits B` without `--calib` (or `--codec budget`, default 1.5) keeps the whole file
/// (header, table and payloads) within B bits/param without any data: every codec (sign,
/// sign-groups, 2 or 3 sign-planes, sparse-signs with 2/4/8 entries per block, 8-bit) is tried
/// on every tensor, scored by its weight error relative to the fine-tuned weights, and a
/// knapsack spends the bytes where that error falls most per byte. It works on ONNX models and
/// safetensors checkpoints alike, one tensor at a time (each is read twice).
///
/// `--calib DIR` (unlabelled images from the variant's own domain) chooses codecs and scales per
/// tensor by running the models with tract on those images, within `--max-bits` bits/param
/// (docs/QUALITY.md has the retention/size frontier). A base ending in `.safetensors` (or with a
/// safetensors header) is compressed as a checkpoint pair, streaming one tensor at a time.
///
/// Example: bitdelta compress --base species-base.onnx --fine night.onnx -o night.bdelta
///          bitdelta compress --base species-base.onnx --fine night.onnx --max-bits 1.0 -o night.bdelta
///          bitdelta compress --base species-base.onnx --fine night.onnx --calib calib/night -o night.bdelta
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The base model every device already has.
    #[arg(long)]
    pub(super) base: PathBuf,
    /// The fine-tuned model (same architecture and initializer names as the base).
    #[arg(long)]
    pub(super) fine: PathBuf,
    /// Output delta file.
    #[arg(short, long)]
    pub(super) output: PathBuf,
    /// Variant name (default: the fine-tuned file's stem), [A-Za-z0-9._-], at most 64 characters.
    #[arg(long)]
    pub(super) name: Option<String>,
    /// Free-text description stored in the manifest.
    #[arg(long, default_value = "")]
    pub(super) description: String,
    /// Sequence number of this variant (devices refuse to install an older one).
    #[arg(long, default_value_t = 1)]
    pub(super) sequence: u64,
    /// Codec policy (without --calib; default: budget when --max-bits is given, else auto).
    #[arg(long, value_enum)]
    pub(super) codec: Option<CodecArg>,
    /// Folder of unlabelled images (PNG/JPEG) from the variant's own domain, a few dozen to a few
    /// hundred: choose each tensor's codec from how much it changes the model's outputs on them,
    /// within --max-bits.
    #[arg(long, value_name = "DIR", conflicts_with = "codec")]
    pub(super) calib: Option<PathBuf>,
    /// Largest average bits per parameter over the whole delta file (header, tensor table,
    /// names and payloads), default 1.5: with --calib, or else the data-free --codec budget.
    #[arg(long, value_name = "B")]
    pub(super) max_bits: Option<f64>,
    /// With --codec budget: how tensors' weight errors are weighed against each other:
    /// relative to the fine-tuned weights (weight), to the fine-tune's change (delta), or as
    /// they are (absolute).
    #[arg(long, value_enum, default_value_t = DamageArg::Weight, hide = true)]
    pub(super) damage: DamageArg,
    /// With --calib: stop spending bits once the expected top-1 agreement with the fine-tuned
    /// model on the calibration images reaches R (0 to 1).
    #[arg(long, value_name = "R", requires = "calib")]
    pub(super) target_retention: Option<f64>,
    /// With --calib: model card for the preprocessing (default: model-card.json next to the base).
    #[arg(long, requires = "calib")]
    pub(super) card: Option<PathBuf>,
    /// With --calib: calibration images the search measures its candidates on (the first N in
    /// file-name order; all of them confirm the plan). Default: 64, fewer for large inputs (at
    /// 224x224 RGB: each candidate alone on 8, the plan refined on 16), so that one model
    /// evaluation costs about the same on every model. More images give a steadier choice and
    /// take proportionally longer.
    #[arg(long, value_name = "N", requires = "calib")]
    pub(super) search_images: Option<std::num::NonZeroUsize>,
    /// With --calib: threads to use (default: every core). The delta does not depend on it.
    #[arg(long, value_name = "N", requires = "calib")]
    pub(super) threads: Option<std::num::NonZeroUsize>,
    /// With --calib or --codec budget: print the codec chosen for every tensor.
    #[arg(short, long)]
    pub(super) verbose: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum CodecArg {
    /// Data-free rule: 8-bit deltas for small tensors and biases, signs + f16 channel scales for large ones.
    Auto,
    /// The literal seed recipe: sign + one mean |d| scale on every tensor (about 1 bit/param).
    Seed,
    /// Data-free, within --max-bits: every codec scored by its weight error, chosen per tensor.
    Budget,
}

#[derive(Clone, Copy, ValueEnum)]
pub(super) enum DamageArg {
    /// Relative to the fine-tuned weights.
    Weight,
    /// Relative to the fine-tune's change.
    Delta,
    /// The plain squared error.
    Absolute,
}

/// `--max-bits` when it is not given.
const DEFAULT_MAX_BITS: f64 = 1.5;

impl Args {
    /// `--name`, else the fine-tuned file's stem; checked against the format's rule.
    pub(super) fn variant_name(&self) -> Result<String> {
        let name = match &self.name {
            Some(n) => n.clone(),
            None => self
                .fine
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default(),
        };
        anyhow::ensure!(
            bitdelta::format::is_valid_variant_name(&name),
            "variant name {name:?}: expected 1 to 64 characters from [A-Za-z0-9._-] (use --name)"
        );
        Ok(name)
    }

    /// `--max-bits`, or its default; checked.
    pub(super) fn max_bits(&self) -> Result<f64> {
        let b = self.max_bits.unwrap_or(DEFAULT_MAX_BITS);
        anyhow::ensure!(
            b.is_finite() && b > 0.0,
            "--max-bits {b}: expected a positive number of bits per parameter"
        );
        Ok(b)
    }

    /// The codec policy of `--codec` and `--max-bits` (without `--calib`).
    pub(super) fn policy(&self) -> Result<Policy> {
        let codec = match (self.codec, self.max_bits) {
            (Some(c @ (CodecArg::Auto | CodecArg::Seed)), Some(b)) => anyhow::bail!(
                "--max-bits {b}: --codec {} has no budget (use --codec budget, or --calib)",
                if matches!(c, CodecArg::Auto) {
                    "auto"
                } else {
                    "seed"
                }
            ),
            (Some(c), _) => c,
            (None, Some(_)) => CodecArg::Budget,
            (None, None) => CodecArg::Auto,
        };
        Ok(match codec {
            CodecArg::Auto => Policy::Auto,
            CodecArg::Seed => Policy::Seed,
            CodecArg::Budget => Policy::Budget(Budget {
                max_bits: self.max_bits()?,
                damage: match self.damage {
                    DamageArg::Weight => Damage::Weight,
                    DamageArg::Delta => Damage::Delta,
                    DamageArg::Absolute => Damage::Absolute,
                },
            }),
        })
    }

    /// The compression options of these arguments, for the variant `name`
    /// ([`Args::variant_name`]); with `--calib` the policy is not used.
    pub(super) fn options<'a>(&'a self, name: &'a str) -> Result<Options<'a>> {
        let policy = if self.calib.is_some() {
            Policy::Auto
        } else {
            self.policy()?
        };
        Ok(Options {
            name,
            description: &self.description,
            labels: "",
            sequence: self.sequence,
            policy,
        })
    }

    /// What a failed compression was doing (error context).
    pub(super) fn doing(&self) -> String {
        format!(
            "compressing {} against {}",
            self.fine.display(),
            self.base.display()
        )
    }
}

/// [`compress_onnx`] of two opened models; `progress(done, total)` after each tensor.
pub(super) fn compress_models(
    base: &Model,
    fine: &Model,
    opts: &Options<'_>,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<u8>, CompressError> {
    compress_onnx(
        base.bytes(),
        &base.weights,
        fine.bytes(),
        &fine.weights,
        opts,
        progress,
    )
}

/// [`compress_onnx_with`] of two opened models: `encode(index, initializer, base, fine)` per
/// tensor, `progress(done, total)` after each.
fn compress_models_with(
    base: &Model,
    fine: &Model,
    opts: &Options<'_>,
    encode: impl FnMut(usize, &Initializer, &[f32], &[f32]) -> Encoded,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<u8>, CompressError> {
    compress_onnx_with(
        base.bytes(),
        &base.weights,
        fine.bytes(),
        &fine.weights,
        opts,
        encode,
        progress,
    )
}

/// The line every compress path ends with.
pub(super) fn print_written(output: &Path, tensors: usize, params: u64, bytes: u64) {
    println!(
        "{}: {tensors} tensors, {params} params, {bytes} bytes, {:.3} bits/param",
        output.display(),
        bytes as f64 * 8.0 / params.max(1) as f64
    );
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    if super::checkpoint::is_safetensors(&a.base) {
        return super::checkpoint::compress(&a);
    }
    let base = Model::open(&a.base)?;
    let fine = Model::open(&a.fine)?;
    let name = a.variant_name()?;
    let opts = a.options(&name)?;
    if let Some(dir) = &a.calib {
        return calibrated(&a, dir, &base, &fine, &opts);
    }
    if let Policy::Budget(budget) = opts.policy {
        return budgeted(&a, &base, &fine, &opts, budget);
    }
    let bar = indicatif::ProgressBar::new(base.weights.initializers.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("compress {bar:40} {pos}/{len} tensors")
            .expect("static template"),
    );
    let bytes = compress_models(&base, &fine, &opts, |done, _| {
        bar.set_position(done as u64);
    })
    .with_context(|| a.doing())?;
    bar.finish_and_clear();
    write_atomic(&a.output, &bytes)?;
    Ok(onnx_written(&a, &base, &bytes))
}

/// Prints the line an ONNX compress ends with: `bytes` written for the base `base`.
fn onnx_written(a: &Args, base: &Model, bytes: &[u8]) -> ExitCode {
    let w = &base.weights;
    print_written(
        &a.output,
        w.initializers.len(),
        w.params(),
        bytes.len() as u64,
    );
    ExitCode::SUCCESS
}

/// One row of the per-tensor table: (name, params, encoding), payload bytes, and a damage.
type ChoiceRow<'a> = ((&'a str, u64, String), u64, f64);

/// Prints the encoding chosen for every tensor (`-v`), `measure` naming the last column.
fn print_choices<'a>(measure: &str, rows: impl Iterator<Item = ChoiceRow<'a>>) {
    println!(
        "{:<24} {:>8} {:<34} {:>9} {:>8} {:>10}",
        "tensor", "params", "encoding", "bytes", "bits/p", measure
    );
    for ((name, params, label), bytes, damage) in rows {
        println!(
            "{name:<24} {params:>8} {label:<34} {bytes:>9} {:>8.3} {damage:>10.6}",
            bytes as f64 * 8.0 / params.max(1) as f64,
        );
    }
}

/// Prints tensors, parameters and bits per parameter per codec name.
fn print_codec_counts(counts: &std::collections::BTreeMap<&'static str, (usize, u64, u64)>) {
    let counts: Vec<String> = counts
        .iter()
        .map(|(codec, (t, p, b))| {
            format!(
                "{codec} {t} tensors / {p} params / {:.3} bits/param",
                *b as f64 * 8.0 / *p as f64
            )
        })
        .collect();
    println!("codecs: {}", counts.join(", "));
}

/// `compress --max-bits` without `--calib`: plan the budget from the weights alone, then write.
fn budgeted(
    a: &Args,
    base: &Model,
    fine: &Model,
    opts: &Options<'_>,
    budget: Budget,
) -> Result<ExitCode> {
    let Budget { max_bits, damage } = budget;
    let started = std::time::Instant::now();
    let total = base.weights.initializers.len() as u64;
    let bar = indicatif::ProgressBar::new(2 * total);
    bar.set_style(
        indicatif::ProgressStyle::with_template("compress {msg} {bar:40} {pos}/{len} tensors")
            .expect("static template"),
    );
    bar.set_message("plan");
    let plan = plan_onnx(
        base.bytes(),
        &base.weights,
        fine.bytes(),
        &fine.weights,
        opts,
        budget,
        |done, _| bar.set_position(done as u64),
    )
    .with_context(|| a.doing())?;
    bar.set_message("encode");
    let bytes = compress_models_with(
        base,
        fine,
        opts,
        |k, init, bv, fv| plan.choice(k).encode(&init.dims, bv, fv),
        |done, _| bar.set_position(total + done as u64),
    )
    .with_context(|| a.doing())?;
    bar.finish_and_clear();
    write_atomic(&a.output, &bytes)?;
    let names = base.weights.initializers.iter().map(|i| i.name.as_str());
    if a.verbose {
        print_choices(
            damage.name(),
            names.zip(&plan.tensors).map(|(name, t)| {
                (
                    (name, t.params, t.choice.to_string()),
                    t.payload_bytes,
                    t.damage,
                )
            }),
        );
    }
    print_codec_counts(&plan.codec_counts());
    println!(
        "budget {max_bits} bits/param: {} bytes; header and tensor table {} bytes; summed \
         {} damage {:.5}; planned in {:.1} s",
        plan.budget_bytes,
        plan.meta_bytes,
        damage.name(),
        plan.damage,
        started.elapsed().as_secs_f64()
    );
    Ok(onnx_written(a, base, &bytes))
}

/// Image files a calibration folder may hold.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// Reads every PNG/JPEG file of `dir` (not its subfolders), in name order, as the model input
/// (preprocessed by the model card; `Images::shape` is in the card's layout).
fn calibration_images(dir: &Path, card: &ModelCard) -> Result<Images> {
    let entries = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the calibration folder", dir.display()))?;
    let mut files = Vec::new();
    for e in entries {
        let path = e
            .with_context(|| format!("{}: cannot read the calibration folder", dir.display()))?
            .path();
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if path.is_file() && !hidden {
            files.push(path);
        }
    }
    files.sort();
    // Every image at once: the data never reallocates (a doubling vector peaks at 1.5x).
    let mut data = Vec::with_capacity(files.len() * card.input_len());
    let mut count = 0;
    for f in &files {
        let is_image = f
            .extension()
            .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
        anyhow::ensure!(
            is_image,
            "{}: not a calibration image (expected .png, .jpg or .jpeg)",
            f.display()
        );
        crate::card::frame(f, card)?.tensor_into(&card.input, &mut data);
        count += 1;
    }
    anyhow::ensure!(
        count > 0,
        "{}: no calibration image (expected .png, .jpg or .jpeg files)",
        dir.display()
    );
    let s = card.batch1_shape();
    Ok(Images {
        data,
        count,
        shape: [s[1], s[2], s[3]],
    })
}

/// glibc gives every thread its own heap ("arena"), and the pages an arena frees stay with it:
/// with the model's activations freed and reallocated on every worker, the field family's
/// calibrated search peaked at 611-660 MB of RSS for 310 MB of live heap. One shared arena (with
/// one model shared by the threads) kept it at 434-489 MB on that family. glibc also raises its
/// mmap threshold to the largest block freed (up to 32 MB), after which the activations (a few
/// MB each) come from the heap, whose freed middle is never given back: a fixed 1 MB threshold
/// keeps every block from 1 MB up in its own mapping, returned when freed, and took the field
/// night search's peak from 453 to 437 MiB (the quiet stages from 275 to 250 MiB) with the same
/// output and time (`docs/QUALITY.md`). Called before the search starts its threads.
#[allow(unsafe_code)]
fn malloc_for_search() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: `mallopt` only changes allocator settings; M_ARENA_MAX takes any positive count
    // and M_MMAP_THRESHOLD any size up to 32 MB.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// `compress --calib`: plan the codecs on the calibration images, then write the delta.
fn calibrated(
    a: &Args,
    dir: &Path,
    base: &Model,
    fine: &Model,
    opts: &Options<'_>,
) -> Result<ExitCode> {
    let max_bits = a.max_bits()?;
    malloc_for_search();
    if let Some(r) = a.target_retention {
        anyhow::ensure!(
            (0.0..=1.0).contains(&r),
            "--target-retention {r}: expected a fraction from 0 to 1"
        );
    }
    let (card, _) = crate::card::load(&a.base, base.bytes(), a.card.as_deref())?;
    let images = calibration_images(dir, &card)?;
    let settings = Settings {
        max_bits,
        target_retention: a.target_retention,
        threads: a.threads.map_or(Settings::default().threads, |n| n.get()),
        search_images: a.search_images.map(|n| n.get()),
        ..Settings::default()
    };
    let started = std::time::Instant::now();
    // On a terminal a bar with its ETA; in a pipe or a log (where the bar is hidden) one line as
    // each stage starts, so a long job is never silent.
    let piped = !std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut stage_now = None;
    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "calibrate {msg:<12} {bar:40} {pos}/{len} {elapsed} (ETA {eta})",
        )
        .expect("static template"),
    );
    let plan = calibrate::plan(
        base.bytes(),
        &base.weights,
        fine.bytes(),
        &fine.weights,
        &images,
        &settings,
        |stage: Stage, done, total| {
            if stage_now != Some(stage) {
                stage_now = Some(stage);
                if piped {
                    eprintln!(
                        "calibrate: {} ({total} step{}), {:.1} s in",
                        stage.name(),
                        if total == 1 { "" } else { "s" },
                        started.elapsed().as_secs_f64()
                    );
                }
                bar.set_message(stage.name());
                bar.reset_eta();
            }
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .with_context(|| {
        format!(
            "calibrating {} against {} on {}",
            a.fine.display(),
            a.base.display(),
            dir.display()
        )
    })?;
    bar.finish_and_clear();
    let mut encodings = plan.encodings.clone().into_iter();
    let bytes = compress_models_with(
        base,
        fine,
        opts,
        |_, _, _, _| encodings.next().expect("one encoding per tensor"),
        |_, _| {},
    )
    .with_context(|| a.doing())?;
    write_atomic(&a.output, &bytes)?;
    if a.verbose {
        print_choices(
            "KL alone",
            plan.choices.iter().map(|c| {
                let row = (c.name.as_str(), c.params, c.label.clone());
                (row, c.payload_bytes, c.divergence)
            }),
        );
    }
    print_codec_counts(&plan.codec_counts());
    println!(
        "sign bits rounded to the layer outputs (GPTQ) in {} of {} tensors; {} rounded again in context (to the fine-tune's outputs from the inputs the layers before them give)",
        plan.output_rounded,
        plan.choices.len(),
        plan.rerounded
    );
    let params = base.weights.params();
    println!(
        "header and tensor table: {} bytes ({:.3} bits/param)",
        plan.meta_bytes,
        plan.meta_bytes as f64 * 8.0 / params as f64
    );
    let on = if plan.screen_images == plan.search_images {
        plan.search_images.to_string()
    } else {
        format!(
            "{} (candidates alone) and {} (the plan)",
            plan.screen_images, plan.search_images
        )
    };
    println!(
        "expected agreement with the fine-tuned model on {} calibration images: {:.3} (mean KL {:.5}); {} model evaluations on the first {on} in {:.1} s",
        plan.images,
        plan.agreement,
        plan.divergence,
        plan.evaluations,
        started.elapsed().as_secs_f64()
    );
    Ok(onnx_written(a, base, &bytes))
}
