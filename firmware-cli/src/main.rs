//! `bitdelta`: compress, verify, apply and run fine-tuned model variants as small deltas.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod card;
mod cmd;
mod data;
mod files;
mod synth;

/// Ship fine-tuned model variants as tiny deltas against one base model.
///
/// Typical flow: `compress` a fine-tuned ONNX against its base on a workstation, copy the
/// `.bdelta` to the device, `verify` it there against the base, then `apply` (or run) it.
/// Exit codes: 0 ok, 1 verification failed, 2 error.
#[derive(Parser)]
#[command(
    name = "bitdelta",
    version,
    propagate_version = true,
    max_term_width = 100
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Compress(cmd::compress::Args),
    Inspect(cmd::inspect::Args),
    Verify(cmd::verify::Args),
    Apply(cmd::apply::Args),
    Run(cmd::run::Args),
    Serve(cmd::serve::Args),
    Bench(cmd::bench::Args),
    Board(cmd::board::Args),
    Bundle(cmd::bundle::BundleArgs),
    Info(cmd::info::Args),
    Demo(cmd::demo::Args),
    Eval(cmd::eval::Args),
    Keygen(cmd::keys::KeygenArgs),
    Sign(cmd::keys::SignArgs),
    Store(cmd::store::StoreArgs),
    Install(cmd::store::InstallArgs),
    Activate(cmd::store::ActivateArgs),
    Rollback(cmd::store::RollbackArgs),
    Remove(cmd::store::RemoveArgs),
    List(cmd::store::ListArgs),
    Status(cmd::store::StatusArgs),
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Compress(a) => cmd::compress::run(a),
        Command::Inspect(a) => cmd::inspect::run(a),
        Command::Verify(a) => cmd::verify::run(a),
        Command::Apply(a) => cmd::apply::run(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Serve(a) => cmd::serve::run(a),
        Command::Bench(a) => cmd::bench::run(a),
        Command::Board(a) => cmd::board::run(a),
        Command::Bundle(a) => cmd::bundle::run(a),
        Command::Info(a) => cmd::info::run(a),
        Command::Demo(a) => cmd::demo::run(a),
        Command::Eval(a) => cmd::eval::run(a),
        Command::Keygen(a) => cmd::keys::keygen(a),
        Command::Sign(a) => cmd::keys::sign(a),
        Command::Store(a) => cmd::store::store(a),
        Command::Install(a) => cmd::store::install(a),
        Command::Activate(a) => cmd::store::activate(a),
        Command::Rollback(a) => cmd::store::rollback(a),
        Command::Remove(a) => cmd::store::remove(a),
        Command::List(a) => cmd::store::list(a),
        Command::Status(a) => cmd::store::status(a),
    };
    match result {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Rust ignores SIGPIPE, which turns `bitdelta list | head` into a "failed printing to stdout"
/// panic. Like other Unix tools, stop quietly when the reader goes away.
#[allow(unsafe_code)]
fn restore_sigpipe() {
    // SAFETY: resetting a signal disposition to its default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
