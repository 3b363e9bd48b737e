//! `bitdelta run`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use super::classify::{variant_name_of, Csv, Session};

/// Classify images with the base model or a variant (base + delta, built in memory).
///
/// Labels and preprocessing come from the model card (--card, else model-card.json next to the
/// base); a delta's own labels, when it has them, win. Several --variant deltas form a soup
/// (base + sum of alpha_i * delta_i), each as DELTA[@ALPHA].
///
/// With --store (or $BITDELTA_STORE and no --base), the store's base and active variant run;
/// a corrupt active variant falls back to the previous one or the base, with a warning.
///
/// Example: bitdelta run --base models/species/species-base.onnx --variant night.bdelta night-0001.png
///          bitdelta run --store /var/lib/bitdelta night-0001.png
#[derive(clap::Args)]
pub(crate) struct Args {
    #[command(flatten)]
    model: super::store::BaseOrStore,
    /// Delta(s) to apply, each DELTA[@ALPHA]; none = the base model.
    #[arg(long, value_name = "DELTA[@ALPHA]")]
    variant: Vec<String>,
    /// Model card (labels, preprocessing).
    #[arg(long)]
    card: Option<PathBuf>,
    /// Images (PNG, JPEG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// How many species to list per image.
    #[arg(long, default_value_t = 3)]
    top: usize,
    /// One JSON object per image (JSON Lines) with `label`, `variant`, `fingerprint`, `top`.
    #[arg(long)]
    json: bool,
    /// Append detections to this CSV (Camtrap DP-friendly columns).
    #[arg(long)]
    csv: Option<PathBuf>,
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let mut s = match &a.model.base {
        Some(base) => Session::open(base, a.card.as_deref())?,
        None => {
            anyhow::ensure!(
                a.variant.is_empty(),
                "--variant: not with a store (the store's active variant runs; see `bitdelta activate`)"
            );
            let store = a.model.store.open()?;
            super::store::open_session(&store, a.card.as_deref())?.0
        }
    };
    let name = match a.variant.as_slice() {
        [] => bitdelta::tract::BASE.to_owned(),
        [one] => variant_name_of(one)?,
        many => many
            .iter()
            .map(|v| variant_name_of(v))
            .collect::<Result<Vec<_>>>()?
            .join("+"),
    };
    if !a.variant.is_empty() {
        s.add_variant(&name, &a.variant)?;
        s.engine.switch(&name)?;
    } else if a.model.base.is_some() {
        s.engine.switch(&name)?;
    }
    let mut csv = a.csv.as_deref().map(Csv::open).transpose()?;
    for path in &a.images {
        let frame = crate::card::frame(path, &s.card)?;
        let ans = s.classify(path, &frame, a.top)?;
        if let Some(c) = csv.as_mut() {
            c.record(&ans)?;
        }
        if a.json {
            println!("{}", ans.json());
        } else {
            let top: Vec<String> = ans.top.iter().map(|(l, p)| format!("{l} {p:.3}")).collect();
            println!(
                "{}: {} ({:.3})  [{}; variant {} {}]",
                path.display(),
                ans.label,
                ans.score,
                top.join(", "),
                ans.variant,
                &ans.fingerprint[..16]
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
