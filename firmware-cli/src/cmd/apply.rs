//! `bitdelta apply`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use bitdelta::apply::{apply_onnx, Applied, ApplyError};

use crate::files::{hex, read_delta, write_atomic, Model};

/// Rebuild a variant as a standalone ONNX file: the base with its weights reconstructed.
///
/// Every byte except the float initializers' data is copied from the base. Several deltas
/// compose (DeltaSoup): W = base + sum(alpha_i * delta_i), with `DELTA@ALPHA` (default alpha 1).
/// Each delta is fully verified against the base first; nothing is written if any check fails.
/// A safetensors base (one delta, alpha 1) is rebuilt streaming, one tensor at a time.
///
/// Example: bitdelta apply --base species-base.onnx night.bdelta@0.5 fog.bdelta@0.5 -o soup.onnx
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The base model.
    #[arg(long)]
    pub(super) base: PathBuf,
    /// Deltas, each optionally followed by @ALPHA.
    #[arg(required = true, value_name = "DELTA[@ALPHA]")]
    pub(super) deltas: Vec<String>,
    /// Output ONNX file.
    #[arg(short, long)]
    pub(super) output: PathBuf,
}

/// Splits `path@alpha` (alpha must parse as a finite number; otherwise the whole is a path).
pub(crate) fn parse_delta_arg(s: &str) -> Result<(PathBuf, f32)> {
    if let Some((p, a)) = s.rsplit_once('@') {
        if let Ok(alpha) = a.parse::<f32>() {
            anyhow::ensure!(alpha.is_finite(), "{s}: alpha must be a finite number");
            return Ok((PathBuf::from(p), alpha));
        }
    }
    Ok((PathBuf::from(s), 1.0))
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    if super::checkpoint::is_safetensors(&a.base) {
        return super::checkpoint::apply(&a);
    }
    let base = Model::open(&a.base)?;
    let specs = a
        .deltas
        .iter()
        .map(|s| parse_delta_arg(s))
        .collect::<Result<Vec<_>>>()?;
    let specs: Vec<(&Path, f32)> = specs
        .iter()
        .map(|(p, alpha)| (p.as_path(), *alpha))
        .collect();
    let applied = apply_files(&base, &specs)?;
    write_atomic(&a.output, &applied.model)?;
    println!(
        "{}: {} bytes, weights fingerprint {}",
        a.output.display(),
        applied.model.len(),
        hex(&applied.fingerprint)
    );
    Ok(ExitCode::SUCCESS)
}

/// Reads, checks and applies deltas to a base model in memory; errors name the delta file
/// at fault and the base.
pub(crate) fn apply_files(base: &Model, deltas: &[(&Path, f32)]) -> Result<Applied> {
    let bytes = deltas
        .iter()
        .map(|(p, _)| read_delta(p))
        .collect::<Result<Vec<_>>>()?;
    let files = deltas
        .iter()
        .zip(&bytes)
        .map(|((p, _), b)| super::parse_checked(p, b))
        .collect::<Result<Vec<_>>>()?;
    let list: Vec<_> = files
        .iter()
        .zip(deltas)
        .map(|(f, (_, alpha))| (f, *alpha))
        .collect();
    apply_onnx(base.bytes(), &base.weights, &list).map_err(|e| {
        let which = match &e {
            ApplyError::Format { delta, .. }
            | ApplyError::WrongBase { delta, .. }
            | ApplyError::TensorSet { delta, .. } => deltas[*delta].0.display().to_string(),
            _ => deltas
                .iter()
                .map(|(p, _)| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + "),
        };
        anyhow::anyhow!("{which}: {e} (base {})", base.path.display())
    })
}
