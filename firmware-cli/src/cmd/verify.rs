//! `bitdelta verify`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use bitdelta::apply::{rebuild, ApplyError};
use bitdelta::{sign, DeltaFile};
use ed25519_dalek::VerifyingKey;
use serde_json::json;

use crate::files::{hex, read_delta, Model};

/// Check a delta: structure, caps, checksums and, with --base, that it binds to that base.
///
/// Without --base: header, manifest, tensor table, payload layout, every checksum, scales and
/// padding bits. With --base: also the base fingerprint, the exact tensor set, and that the
/// rebuilt weights hash to the fingerprint the producer recorded.
///
/// Signed files (`bitdelta sign`): with --trust-key, the signature must verify with one of the
/// given public keys before anything inside the delta is parsed. Without it, the envelope is
/// checked for structure only and the output says which key signed it and that the signature
/// was not checked.
///
/// Example: bitdelta verify night.signed.bdelta --trust-key field-2025.key.pub --base species-base.onnx
///
/// Exit codes: 0 valid, 1 verification failed (the message says what, expected/found), 2 error
/// (e.g. a file cannot be read).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The delta file.
    file: PathBuf,
    /// The base model the delta must apply to.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Print the result as JSON (`ok`, `error`, fingerprints, `signed`, `key_id`).
    #[arg(long)]
    json: bool,
    /// Public key file (KEY.pub from `bitdelta keygen`) to trust; repeat for several keys. With
    /// any, the file must carry a valid signature by one of them.
    #[arg(long = "trust-key", value_name = "KEY.pub")]
    trust_key: Vec<PathBuf>,
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let trusted = a
        .trust_key
        .iter()
        .map(|p| super::keys::read_public_key(p))
        .collect::<Result<Vec<_>>>()?;
    let bytes = read_delta(&a.file)?;
    let base = a.base.as_deref().map(Model::open).transpose()?;
    let signed = sign::is_signed(&bytes);
    // Structure only, to name the signer in every outcome; `open_envelope` does the checking.
    let key_id = sign::open(&bytes).ok().map(|s| s.key_id());
    let payload = open_envelope(&bytes, &trusted);
    let outcome = payload.clone().and_then(|p| check(p, base.as_ref()));
    // The delta is parsed only once the envelope (and its signature, when keys are given) passed.
    let name = payload
        .ok()
        .and_then(|p| DeltaFile::parse(p).ok())
        .map(|f| f.manifest().name.to_owned());
    match &outcome {
        Ok(fp) => {
            let verified = signed && !trusted.is_empty();
            if a.json {
                super::print_json(&json!({"file": a.file, "ok": true, "variant": name,
                    "result_fingerprint": fp.as_ref().map(|f| hex(f)), "signed": signed,
                    "key_id": key_id, "signature_verified": verified}))?;
            } else {
                let against = base
                    .as_ref()
                    .map(|b| format!(" against {}", b.path.display()))
                    .unwrap_or_default();
                let by = match (&key_id, verified) {
                    (Some(id), true) => format!("; signed by key {id}, signature verified"),
                    (Some(id), false) => {
                        format!("; signed by key {id}, signature not checked: no --trust-key given")
                    }
                    (None, _) => String::new(),
                };
                println!(
                    "{}: OK (variant {:?}{against}{by})",
                    a.file.display(),
                    name.unwrap_or_default()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(msg) => {
            if a.json {
                super::print_json(&json!({"file": a.file, "ok": false, "variant": name,
                    "error": msg, "signed": signed, "key_id": key_id,
                    "signature_verified": false}))?;
            }
            eprintln!("verify failed: {}: {msg}", a.file.display());
            Ok(ExitCode::from(1))
        }
    }
}

/// The delta inside `bytes`: with trusted keys, only from an envelope whose signature verifies
/// with one of them; without keys, from an envelope that is structurally valid, or `bytes`
/// itself when the file is not signed. `Err` carries the message for the user.
fn open_envelope<'a>(bytes: &'a [u8], trusted: &[VerifyingKey]) -> Result<&'a [u8], String> {
    let envelope = if !trusted.is_empty() {
        sign::verify(bytes, trusted)
    } else if sign::is_signed(bytes) {
        sign::open(bytes)
    } else {
        return Ok(bytes);
    };
    envelope.map(|s| s.payload).map_err(|e| e.to_string())
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
