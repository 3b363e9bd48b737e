//! `bitdelta eval`.

use std::process::ExitCode;

use anyhow::Result;

/// `bitdelta eval`.
#[derive(clap::Args)]
pub(crate) struct Args {}

pub(crate) fn run(_a: Args) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
