//! `bitdelta verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use bitdelta::apply::{rebuild, ApplyError};
use bitdelta::DeltaFile;
use serde_json::json;

use crate::files::{hex, read_delta, Model};

/// Check a delta: structure, caps, checksums and, with --base, that it binds to that base.
///
/// Without --base: header, manifest, tensor table, payload layout, every checksum, scales and
/// padding bits. With --base: also the base fingerprint, the exact tensor set, and that the
/// rebuilt weights hash to the fingerprint the producer recorded.
/// Exit codes: 0 valid, 1 verification failed (the message says what, expected/found), 2 error
/// (e.g. a file cannot be read).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The delta file.
    file: PathBuf,
    /// The base model the delta must apply to.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Print the result as JSON (`ok`, `error`, fingerprints).
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let bytes = read_delta(&a.file)?;
    let base = a.base.as_deref().map(Model::open).transpose()?;
    let outcome = check(&bytes, base.as_ref());
    let name = DeltaFile::parse(&bytes)
        .ok()
        .map(|f| f.manifest().name.to_owned());
    match &outcome {
        Ok(fp) => {
            if a.json {
                super::print_json(&json!({"file": a.file, "ok": true, "variant": name,
                    "result_fingerprint": fp.as_ref().map(hex)}))?;
            } else {
                let against = base
                    .as_ref()
                    .map(|b| format!(" against {}", b.path.display()))
                    .unwrap_or_default();
                println!(
                    "{}: OK (variant {:?}{against})",
                    a.file.display(),
                    name.unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(msg) => {
            if a.json {
                super::print_json(
                    &json!({"file": a.file, "ok": false, "variant": name, "error": msg}),
                )?;
            }
            eprintln!("verify failed: {}: {msg}", a.file.display());
            Ok(ExitCode::from(1))
        }
    }
}

/// Every check; `Err` carries the message for the user.
fn check(bytes: &[u8], base: Option<&Model>) -> Result<Option<[u8; 32]>, String> {
    let file = DeltaFile::parse(bytes).map_err(|e| super::describe(&e, None))?;
    file.verify_payloads()
        .map_err(|e| super::describe(&e, Some(&file)))?;
    let Some(base) = base else { return Ok(None) };
    let where_ = |e: ApplyError| format!("{e} (base {})", base.path.display());
    // rebuild checks the binding (base fingerprint, tensor set) before any payload is used.
    let result =
        rebuild(base.bytes(), &base.weights, &[(&file, 1.0)], |_, _| {}).map_err(where_)?;
    Ok(Some(result))
}
