//! `bundle mender`: wrap deltas in a Mender artifact for the `bitdelta` Update Module
//! (`boards/mender/bitdelta`).
//!
//! The artifact is written by Mender's own `mender-artifact` tool rather than by us: the format
//! (tar of header, type-info, checksums, optional signature and compression) is Mender's, and its
//! tool is what every Mender server and client is tested against. We only decide what goes in.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, ensure, Context, Result};
use bitdelta::fingerprint::hex;
use serde_json::json;

/// Package deltas for an over-the-air update system.
#[derive(clap::Args)]
pub(crate) struct BundleArgs {
    #[command(subcommand)]
    command: BundleCommand,
}

#[derive(clap::Subcommand)]
enum BundleCommand {
    Mender(MenderArgs),
}

/// Write a Mender artifact (payload type `bitdelta`) carrying deltas for the bitdelta Update
/// Module.
///
/// Each delta (plain or signed) is checked (structure, every checksum, the signature envelope)
/// and all must bind to the same base. The artifact carries the base fingerprint and each
/// variant's sequence in its meta-data and provides (`bitdelta.base`, `bitdelta.variant.NAME`),
/// and depends on `bitdelta.base` so that Mender refuses it, before downloading the payload, on
/// a device whose last bitdelta artifact was for another base. The first bitdelta artifact a
/// device gets needs --no-depends (the device does not provide `bitdelta.base` yet); the Update
/// Module then checks the base itself in its Download state, before the payload is read. The
/// last delta given is the one the module activates at commit. Needs `mender-artifact` on PATH
/// (or $MENDER_ARTIFACT).
///
/// Example: bitdelta bundle mender night.bdelta --device-type camera-trap -o night-2.mender
#[derive(clap::Args)]
struct MenderArgs {
    /// Delta files (plain or signed), one per variant; the last one is activated.
    #[arg(required = true)]
    deltas: Vec<PathBuf>,
    /// Device type the artifact is compatible with (repeatable).
    #[arg(long, short = 't', required = true, value_name = "T")]
    device_type: Vec<String>,
    /// Output artifact.
    #[arg(short, long, value_name = "X.mender")]
    output: PathBuf,
    /// Artifact name (default: bitdelta-NAME-SEQ for the activated variant).
    #[arg(long, short = 'n')]
    name: Option<String>,
    /// Leave out the dependency on `bitdelta.base` (a device's first bitdelta artifact).
    #[arg(long)]
    no_depends: bool,
    /// Payload compression passed to mender-artifact: none, gzip or lzma. Deltas are already
    /// entropy-dense, so `none` is the default.
    #[arg(long, default_value = "none", value_parser = ["none", "gzip", "lzma"])]
    compression: String,
    /// Sign the artifact with this key (PEM, passed to `mender-artifact -k`); devices then
    /// check it with their ArtifactVerifyKey.
    #[arg(long, value_name = "KEY.pem")]
    mender_key: Option<PathBuf>,
}

/// One checked delta.
struct Part {
    path: PathBuf,
    name: String,
    sequence: u64,
    base: String,
    result: String,
    signed_by: Option<String>,
}

fn check(path: &Path) -> Result<Part> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let (delta, signed_by) = if bitdelta::sign::is_signed(&bytes) {
        let s =
            bitdelta::sign::open(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        (s.payload, Some(bitdelta::sign::key_id(&s.key)))
    } else {
        (&bytes[..], None)
    };
    let file = super::parse_checked(path, delta)?;
    let m = file.manifest();
    Ok(Part {
        path: path.to_owned(),
        name: m.name.to_string(),
        sequence: m.sequence,
        base: hex(&m.base_fingerprint),
        result: hex(&m.result_fingerprint),
        signed_by,
    })
}

pub(crate) fn run(a: BundleArgs) -> Result<ExitCode> {
    match a.command {
        BundleCommand::Mender(a) => mender(a),
    }
}

fn mender(a: MenderArgs) -> Result<ExitCode> {
    let parts = a
        .deltas
        .iter()
        .map(|p| check(p))
        .collect::<Result<Vec<_>>>()?;
    let first = &parts[0];
    for p in &parts[1..] {
        ensure!(
            p.base == first.base,
            "{}: made for another base than {}: expected base fingerprint {}, found {}",
            p.path.display(),
            first.path.display(),
            &first.base[..16],
            &p.base[..16]
        );
    }
    for (i, p) in parts.iter().enumerate() {
        if let Some(q) = parts[..i].iter().find(|q| q.name == p.name) {
            bail!(
                "{}: variant {:?} is already given by {}: one delta per variant",
                p.path.display(),
                p.name,
                q.path.display()
            );
        }
    }
    let last = parts.last().expect("at least one delta");
    let name = a
        .name
        .clone()
        .unwrap_or_else(|| format!("bitdelta-{}-{}", last.name, last.sequence));
    // The payload files are named NAME.SEQ.bdelta, as in the store; the meta-data lists them.
    let out_dir = a.output.parent().filter(|d| !d.as_os_str().is_empty());
    let work = out_dir
        .unwrap_or(Path::new("."))
        .join(format!(".bitdelta-bundle-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("{}: cannot create", work.display()))?;
    let res = write_artifact(&a, &parts, &name, &work);
    let _ = std::fs::remove_dir_all(&work);
    res?;
    let size = std::fs::metadata(&a.output).map(|m| m.len()).unwrap_or(0);
    let delta_bytes: u64 = parts
        .iter()
        .map(|p| std::fs::metadata(&p.path).map(|m| m.len()).unwrap_or(0))
        .sum();
    println!(
        "{}: Mender artifact {name:?} ({size} B, deltas {delta_bytes} B) for base {}; activates {} sequence {}",
        a.output.display(),
        &first.base[..16],
        last.name,
        last.sequence
    );
    Ok(ExitCode::SUCCESS)
}

fn write_artifact(a: &MenderArgs, parts: &[Part], name: &str, work: &Path) -> Result<()> {
    let base = &parts[0].base;
    let last = parts.last().expect("at least one delta");
    let meta = json!({"bitdelta": {
        "format": 1,
        "base_fingerprint": base,
        "activate": last.name,
        "variants": parts.iter().map(|p| json!({
            "name": p.name, "sequence": p.sequence, "fingerprint": p.result,
            "file": format!("{}.{}.bdelta", p.name, p.sequence), "signed_by": p.signed_by,
        })).collect::<Vec<_>>(),
    }});
    let meta_path = work.join("meta-data.json");
    std::fs::write(&meta_path, serde_json::to_vec(&meta)?)
        .with_context(|| format!("{}: cannot write", meta_path.display()))?;
    let tool = std::env::var_os("MENDER_ARTIFACT").unwrap_or_else(|| "mender-artifact".into());
    let mut cmd = Command::new(&tool);
    cmd.args(["write", "module-image", "-T", "bitdelta", "-n", name]);
    for t in &a.device_type {
        cmd.args(["-t", t]);
    }
    for p in parts {
        let staged = work.join(format!("{}.{}.bdelta", p.name, p.sequence));
        std::fs::copy(&p.path, &staged).with_context(|| {
            format!("{}: cannot copy to {}", p.path.display(), staged.display())
        })?;
        cmd.arg("-f").arg(&staged);
        cmd.args([
            "--provides",
            &format!("bitdelta.variant.{}:{}", p.name, p.sequence),
        ]);
    }
    cmd.arg("-m").arg(&meta_path);
    cmd.args(["--provides", &format!("bitdelta.base:{base}")]);
    if !a.no_depends {
        cmd.args(["--depends", &format!("bitdelta.base:{base}")]);
    }
    cmd.args(["--compression", &a.compression]);
    if let Some(k) = &a.mender_key {
        cmd.arg("-k").arg(k);
    }
    cmd.arg("-o").arg(&a.output);
    let out = cmd.output().with_context(|| {
        format!(
            "cannot run {} (install the mender-artifact package, or set MENDER_ARTIFACT)",
            tool.to_string_lossy()
        )
    })?;
    ensure!(
        out.status.success(),
        "{}: mender-artifact failed ({}): {}",
        a.output.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
