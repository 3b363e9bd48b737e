//! `bitdelta keygen` and `bitdelta sign`.

use std::process::ExitCode;

use anyhow::Result;

/// Generate an ed25519 key pair.
#[derive(clap::Args)]
pub(crate) struct KeygenArgs {}

/// Sign a delta.
#[derive(clap::Args)]
pub(crate) struct SignArgs {}

pub(crate) fn keygen(_a: KeygenArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

pub(crate) fn sign(_a: SignArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
