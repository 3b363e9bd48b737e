//! `bitdelta inspect`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use bitdelta::sign;
use serde_json::json;

use crate::files::{hex, read_delta};

/// Show a delta's manifest, per-tensor codecs, sizes and bits per parameter.
///
/// Checks the file's structure and checksums first. For a signed file, also shows the signer's
/// key id; the signature itself is checked by `bitdelta verify --trust-key`.
///
/// Example: bitdelta inspect night.bdelta --json
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The delta file.
    file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let bytes = read_delta(&a.file)?;
    let signer = sign::is_signed(&bytes)
        .then(|| sign::open(&bytes))
        .transpose()
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.file.display()))?;
    let key_id = signer.as_ref().map(sign::Signed::key_id);
    let file = super::parse_checked(&a.file, signer.as_ref().map_or(&bytes[..], |s| s.payload))?;
    let m = file.manifest();
    let params = file.params();
    let bpp = |b: u64, n: u64| {
        if n == 0 {
            0.0
        } else {
            b as f64 * 8.0 / n as f64
        }
    };
    let mut by_codec: BTreeMap<&str, (u64, u64, u64)> = BTreeMap::new();
    let mut tensors = Vec::new();
    for e in file.tensors() {
        let n = e.numel();
        let len = e.payload_bytes().len() as u64;
        let c = by_codec.entry(e.codec.name()).or_default();
        *c = (c.0 + 1, c.1 + n, c.2 + len);
        let scales = e.codec.scale_type(e.flags).unwrap_or("none");
        tensors.push(json!({
            "name": e.name, "codec": e.codec.name(), "dtype": e.dtype.name(),
            "dims": e.dims().collect::<Vec<_>>(), "params": n, "groups": e.groups,
            "scales": scales, "planes": e.planes(), "payload_bytes": len, "sign_bytes": e.sign_bytes(),
            "bits_per_param": bpp(len, n),
        }));
    }
    let total = bytes.len() as u64;
    let payload: u64 = file.tensors().map(|e| e.payload_bytes().len() as u64).sum();
    if a.json {
        let codecs: serde_json::Map<_, _> = by_codec
            .iter()
            .map(|(k, (t, n, b))| {
                (
                    k.to_string(),
                    json!({"tensors": t, "params": n, "bytes": b}),
                )
            })
            .collect();
        super::print_json(&json!({
            "file": a.file, "signed": key_id.is_some(), "key_id": key_id,
            "name": m.name, "description": m.description, "tool": m.tool,
            "sequence": m.sequence, "labels": m.labels().collect::<Vec<_>>(),
            "base_fingerprint": hex(&m.base_fingerprint), "result_fingerprint": hex(&m.result_fingerprint),
            "format_version": file.header().version, "alignment": file.header().alignment,
            "tensor_count": file.len(), "params": params, "file_bytes": total, "payload_bytes": payload,
            "bits_per_param": bpp(total, params), "payload_bits_per_param": bpp(payload, params),
            "codecs": codecs, "tensors": tensors,
        }))?;
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{}: variant {:?} (sequence {}), made by {}",
        a.file.display(),
        m.name,
        m.sequence,
        m.tool
    );
    if let Some(id) = &key_id {
        println!("  signed by key {id} (signature not checked: use verify --trust-key)");
    }
    if !m.description.is_empty() {
        println!("  description: {}", m.description);
    }
    println!("  base fingerprint:   {}", hex(&m.base_fingerprint));
    println!("  result fingerprint: {}", hex(&m.result_fingerprint));
    println!(
        "  {} tensors, {} params, {} bytes ({} payload), {:.3} bits/param",
        file.len(),
        params,
        total,
        payload,
        bpp(total, params)
    );
    for (k, (t, n, b)) in &by_codec {
        println!(
            "  {k:<12} {t:>4} tensors {n:>10} params {b:>10} bytes {:>7.3} bits/param",
            bpp(*b, *n)
        );
    }
    println!(
        "  {:<48} {:<12} {:>9} {:>9} {:>8}",
        "tensor", "codec", "params", "bytes", "bits/p"
    );
    for t in &tensors {
        println!(
            "  {:<48} {:<12} {:>9} {:>9} {:>8.3}",
            t["name"].as_str().unwrap_or(""),
            t["codec"].as_str().unwrap_or(""),
            t["params"],
            t["payload_bytes"],
            t["bits_per_param"].as_f64().unwrap_or(0.0)
        );
    }
    Ok(ExitCode::SUCCESS)
}
