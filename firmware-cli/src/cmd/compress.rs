//! `bitdelta compress`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use bitdelta::compress::{compress_onnx, Options, Policy};
use clap::ValueEnum;

use crate::files::{write_atomic, Model};

/// Compress a fine-tuned ONNX model into a delta against its base.
///
/// Reads both models memory-mapped, one tensor at a time, chooses a codec per tensor and writes
/// a `.bdelta` file. `--codec auto` (the default) spends 8 bits on small sensitive tensors
/// (biases, tensors of at most 4096 elements) and 1 bit with f16 per-channel scales on large
/// ones; `--codec seed` is the literal BitDelta recipe (sign + one mean-abs scale per tensor).
///
/// Example: bitdelta compress --base species-base.onnx --fine night.onnx -o night.bdelta
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The base model every device already has.
    #[arg(long)]
    base: PathBuf,
    /// The fine-tuned model (same architecture and initializer names as the base).
    #[arg(long)]
    fine: PathBuf,
    /// Output delta file.
    #[arg(short, long)]
    output: PathBuf,
    /// Variant name (default: the fine-tuned file's stem), [A-Za-z0-9._-], at most 64 characters.
    #[arg(long)]
    name: Option<String>,
    /// Free-text description stored in the manifest.
    #[arg(long, default_value = "")]
    description: String,
    /// Sequence number of this variant (devices refuse to install an older one).
    #[arg(long, default_value_t = 1)]
    sequence: u64,
    /// Codec policy.
    #[arg(long, value_enum, default_value_t = CodecArg::Auto)]
    codec: CodecArg,
}

#[derive(Clone, Copy, ValueEnum)]
enum CodecArg {
    /// Data-free rule: 8-bit deltas for small tensors and biases, signs + f16 channel scales for large ones.
    Auto,
    /// The literal seed recipe: sign + one mean |d| scale on every tensor (about 1 bit/param).
    Seed,
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let base = Model::open(&a.base)?;
    let fine = Model::open(&a.fine)?;
    let name = match a.name {
        Some(n) => n,
        None => a
            .fine
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    anyhow::ensure!(
        bitdelta::format::is_valid_variant_name(&name),
        "variant name {name:?}: expected 1 to 64 characters from [A-Za-z0-9._-] (use --name)"
    );
    let policy = match a.codec {
        CodecArg::Auto => Policy::Auto,
        CodecArg::Seed => Policy::Seed,
    };
    let opts = Options {
        name: &name,
        description: &a.description,
        labels: "",
        sequence: a.sequence,
        policy,
    };
    let bar = indicatif::ProgressBar::new(base.weights.initializers.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("compress {bar:40} {pos}/{len} tensors")
            .expect("static template"),
    );
    let bytes = compress_onnx(
        base.bytes(),
        &base.weights,
        fine.bytes(),
        &fine.weights,
        &opts,
        |done, _| bar.set_position(done as u64),
    )
    .with_context(|| {
        format!(
            "compressing {} against {}",
            a.fine.display(),
            a.base.display()
        )
    })?;
    bar.finish_and_clear();
    write_atomic(&a.output, &bytes)?;
    let params = base.weights.params();
    println!(
        "{}: {} tensors, {} params, {} bytes, {:.3} bits/param",
        a.output.display(),
        base.weights.initializers.len(),
        params,
        bytes.len(),
        bytes.len() as f64 * 8.0 / params as f64
    );
    Ok(ExitCode::SUCCESS)
}
