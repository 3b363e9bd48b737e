//! `bitdelta info`.

use std::process::ExitCode;

use anyhow::Result;
use serde_json::json;

/// Show the version, target and the kernel backend this CPU uses (avx2, neon or scalar).
///
/// Set BITDELTA_FORCE_SCALAR=1 to force the scalar kernels (for A/B checks on a device).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let version = env!("CARGO_PKG_VERSION");
    let target = format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS);
    let backend = bitdelta::kernels::backend_name();
    let format = bitdelta::format::VERSION;
    if a.json {
        super::print_json(
            &json!({"version": version, "target": target, "backend": backend, "format_version": format}),
        )?;
    } else {
        println!("bitdelta {version}\ntarget: {target}\nkernel backend: {backend}\ndelta format: v{format}");
    }
    Ok(ExitCode::SUCCESS)
}
