//! `bitdelta board`: board profiles and memory fit checks.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_json::json;

use crate::files::{read_delta, Model};

/// Board profiles compiled into the binary (the files in `boards/`).
const PROFILES: [&str; 4] = [
    include_str!("../../../boards/raspberry-pi-4/board.toml"),
    include_str!("../../../boards/raspberry-pi-5/board.toml"),
    include_str!("../../../boards/jetson-orin-nano/board.toml"),
    include_str!("../../../boards/generic-aarch64/board.toml"),
];

/// Peak RSS model, calibrated with `bitdelta bench` (x86_64 and the same code on aarch64):
/// a fixed part (binary, tract, allocator) plus a multiple of the f32 weights while a plan is
/// built (the mapped base pages, the decoded protobuf, tract's tensors and its packed copies).
const FIXED_MIB: f64 = 25.0;
const PEAK_PER_WEIGHT_BYTE: f64 = 3.2;
const STEADY_PER_WEIGHT_BYTE: f64 = 2.0;

#[derive(Deserialize)]
struct Profile {
    name: String,
    model: String,
    target: String,
    cpu: String,
    ram_mib: u64,
    ram_budget_mib: u64,
    store_path: String,
}

fn profiles() -> Result<Vec<Profile>> {
    PROFILES
        .iter()
        .map(|t| toml::from_str(t).context("built-in board profile"))
        .collect()
}

/// Board profiles, and whether a model and its variants fit a board's memory budget.
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(subcommand)]
    command: Sub,
}

#[derive(clap::Subcommand)]
enum Sub {
    /// List the known boards (target, CPU, RAM, budget, store path).
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Predict peak RAM for cold start and for a switch on a board, and say whether it fits.
    ///
    /// The prediction is fixed + 3.2 x the f32 weights (+ the deltas) at peak, while a plan is
    /// built, and about 2 x the weights steady; `bitdelta bench` measures the real figures on a
    /// device. Exit code 1 when the model does not fit the board's budget.
    Check {
        /// Board name (see `bitdelta board list`).
        #[arg(long)]
        board: String,
        /// The base model.
        #[arg(long)]
        base: PathBuf,
        /// Deltas that will be installed (their sizes are added).
        #[arg(long)]
        variant: Vec<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    match a.command {
        Sub::List { json } => {
            let ps = profiles()?;
            if json {
                let v: Vec<_> = ps
                    .iter()
                    .map(|p| json!({"name": p.name, "model": p.model, "target": p.target, "cpu": p.cpu,
                        "ram_mib": p.ram_mib, "ram_budget_mib": p.ram_budget_mib, "store_path": p.store_path}))
                    .collect();
                super::print_json(&json!(v))?;
            } else {
                for p in &ps {
                    println!(
                        "{:<18} {:<12} {:<26} RAM {:>5} MiB, budget {:>5} MiB, store {}",
                        p.name, p.cpu, p.target, p.ram_mib, p.ram_budget_mib, p.store_path
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Sub::Check {
            board,
            base,
            variant,
            json,
        } => {
            let ps = profiles()?;
            let Some(p) = ps.iter().find(|p| p.name == board) else {
                let names: Vec<_> = ps.iter().map(|p| p.name.as_str()).collect();
                bail!(
                    "unknown board {board:?}: expected one of {}",
                    names.join(", ")
                );
            };
            let model = Model::open(&base)?;
            let weights: u64 = model
                .weights
                .initializers
                .iter()
                .map(|i| i.numel() * 4)
                .sum();
            let mut largest_delta = 0u64;
            for v in &variant {
                let bytes = read_delta(v)?;
                super::parse_checked(v, &bytes)?;
                largest_delta = largest_delta.max(bytes.len() as u64);
            }
            let mib = |b: f64| b / (1u64 << 20) as f64;
            let w = mib(weights as f64);
            let cold = FIXED_MIB + PEAK_PER_WEIGHT_BYTE * w + mib(largest_delta as f64);
            // A switch drops the running plan before building the next: same peak as a cold start.
            let switch = cold;
            let steady = FIXED_MIB + STEADY_PER_WEIGHT_BYTE * w;
            let fits = cold <= p.ram_budget_mib as f64;
            if json {
                super::print_json(&json!({
                    "board": p.name, "ram_budget_mib": p.ram_budget_mib, "weights_mib": w,
                    "cold_start_peak_mib": cold, "switch_peak_mib": switch, "steady_mib": steady,
                    "fits": fits,
                }))?;
            } else {
                println!(
                    "{} ({}), budget {} MiB of {} MiB",
                    p.name, p.model, p.ram_budget_mib, p.ram_mib
                );
                println!(
                    "  {}: {:.1} MiB of f32 weights, largest delta {:.2} MiB",
                    base.display(),
                    w,
                    mib(largest_delta as f64)
                );
                println!("  predicted peak: cold start {cold:.0} MiB, switch {switch:.0} MiB; steady {steady:.0} MiB");
                println!(
                    "  {}",
                    if fits {
                        "fits"
                    } else {
                        "does NOT fit the budget"
                    }
                );
            }
            Ok(if fits {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
