//! The variant store: `store init`, `install`, `activate`, `rollback`, `remove`, `list`, `status`.

use std::process::ExitCode;

use anyhow::Result;

/// Manage a variant store.
#[derive(clap::Args)]
pub(crate) struct StoreArgs {}
/// Install deltas into a store.
#[derive(clap::Args)]
pub(crate) struct InstallArgs {}
/// Activate an installed variant.
#[derive(clap::Args)]
pub(crate) struct ActivateArgs {}
/// Go back to the previous variant.
#[derive(clap::Args)]
pub(crate) struct RollbackArgs {}
/// Remove an installed variant.
#[derive(clap::Args)]
pub(crate) struct RemoveArgs {}
/// List installed variants.
#[derive(clap::Args)]
pub(crate) struct ListArgs {}
/// Show the store's state.
#[derive(clap::Args)]
pub(crate) struct StatusArgs {}

pub(crate) fn store(_a: StoreArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
pub(crate) fn install(_a: InstallArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
pub(crate) fn activate(_a: ActivateArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
pub(crate) fn rollback(_a: RollbackArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
pub(crate) fn remove(_a: RemoveArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
pub(crate) fn list(_a: ListArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
pub(crate) fn status(_a: StatusArgs) -> Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
