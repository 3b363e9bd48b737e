//! `bitdelta demo`: the species family end to end.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use bitdelta::compress::{compress_onnx, Options, Policy};
use bitdelta::tract::{argmax, Classifier};

use crate::card::Card;
use crate::data::{load_gray, LabelledSet};
use crate::files::{read_delta, write_atomic, Model};

const CONDITIONS: [&str; 3] = ["clean", "night", "fog"];
const BATCH: usize = 100;

/// Run the bundled species family end to end: compress each variant, verify, apply, classify.
///
/// For each fine-tuned variant next to the base (night, fog) this compresses a delta with the
/// default codec rule and with the seed recipe, verifies both against the base, rebuilds the
/// models, and measures species accuracy with tract on the labelled test images of every
/// condition (eval.npz), then classifies the sample images in images/.
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Folder with species-base.onnx, the variants, model-card.json, eval.npz and images/.
    #[arg(long, default_value = default_models())]
    models: PathBuf,
    /// Where to write the deltas (default: a fresh folder under the system temp dir).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Variants to run (file stems next to the base).
    #[arg(long, value_delimiter = ',', default_value = "night,fog")]
    variants: Vec<String>,
}

pub(crate) fn default_models() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../models/species")
}

struct Evaluator {
    card: Card,
    sets: Vec<(String, LabelledSet)>,
}

impl Evaluator {
    fn accuracy(&self, model: &[u8]) -> Result<Vec<f64>> {
        let mut shape = self.card.batch1_shape();
        shape[0] = BATCH;
        let batched =
            Classifier::from_onnx_bytes(model, &shape).context("loading model in tract")?;
        let single = Classifier::from_onnx_bytes(model, &self.card.batch1_shape())
            .context("loading model in tract")?;
        let mut out = Vec::new();
        for (_, set) in &self.sets {
            let mut correct = 0usize;
            let mut i = 0;
            while i < set.len() {
                let (clf, b) = if set.len() - i >= BATCH {
                    (&batched, BATCH)
                } else {
                    (&single, 1)
                };
                let input: Vec<f32> = (i..i + b)
                    .flat_map(|k| self.card.preprocess_gray(set.image(k)))
                    .collect();
                let logits = clf.run(&input)?;
                let classes = logits.len() / b;
                for k in 0..b {
                    let pred = argmax(&logits[k * classes..(k + 1) * classes]);
                    correct += usize::from(pred.map(|p| p as i64) == Some(set.labels[i + k]));
                }
                i += b;
            }
            out.push(correct as f64 / set.len() as f64);
        }
        Ok(out)
    }
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let started = Instant::now();
    let dir = &a.models;
    let base = Model::open(&dir.join("species-base.onnx"))?;
    let card = Card::load(&dir.join("model-card.json"))?;
    let eval_path = dir.join("eval.npz");
    let sets = CONDITIONS
        .iter()
        .map(|c| Ok((c.to_string(), LabelledSet::from_npz(&eval_path, c)?)))
        .collect::<Result<Vec<_>>>()?;
    let ev = Evaluator { card, sets };
    let out_dir = match a.out {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("bitdelta-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("{}: cannot create", out_dir.display()))?;
    let params = base.weights.params();
    println!(
        "species family: {} ({} float tensors, {} params); deltas in {}",
        base.path.display(),
        base.weights.initializers.len(),
        params,
        out_dir.display()
    );
    println!(
        "accuracy on eval.npz with tract ({} labelled images per condition)\n",
        ev.sets[0].1.len()
    );
    println!(
        "{:<8} {:<10} {:>9} {:>10} {:>8} {:>7} {:>7} {:>7}",
        "variant", "weights", "bytes", "bits/param", "verify", "clean", "night", "fog"
    );
    let row = |v: &str, w: &str, bytes: String, bpp: String, ver: &str, acc: &[f64]| {
        println!(
            "{v:<8} {w:<10} {bytes:>9} {bpp:>10} {ver:>8} {:>7.3} {:>7.3} {:>7.3}",
            acc[0], acc[1], acc[2]
        );
    };
    row(
        "base",
        "onnx",
        base.map.len().to_string(),
        "32".into(),
        "-",
        &ev.accuracy(base.bytes())?,
    );
    let mut variant_models = Vec::new();
    for v in &a.variants {
        let fine_path = dir.join(format!("{v}.onnx"));
        let fine = Model::open(&fine_path)?;
        row(
            v,
            "fine-tuned",
            fine.map.len().to_string(),
            "32".into(),
            "-",
            &ev.accuracy(fine.bytes())?,
        );
        for (label, policy) in [("delta", Policy::Auto), ("seed", Policy::Seed)] {
            let opts = Options {
                name: v,
                description: "species demo variant",
                labels: "",
                sequence: 1,
                policy,
            };
            let bytes = compress_onnx(
                base.bytes(),
                &base.weights,
                fine.bytes(),
                &fine.weights,
                &opts,
                |_, _| {},
            )
            .with_context(|| format!("compressing {}", fine_path.display()))?;
            let path = out_dir.join(format!("{v}.{label}.bdelta"));
            write_atomic(&path, &bytes)?;
            let model = super::apply::apply_files(&base, &[(&path, 1.0)])?;
            let bpp = format!("{:.3}", bytes.len() as f64 * 8.0 / params as f64);
            row(
                v,
                label,
                read_delta(&path)?.len().to_string(),
                bpp,
                "ok",
                &ev.accuracy(&model)?,
            );
            if policy == Policy::Auto {
                variant_models.push((v.clone(), path, model));
            }
        }
    }
    samples(dir, &ev.card, &base, &variant_models)?;
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// Classifies images/<condition>-<index>-<species>.png with the base and with the variant named
/// like the condition.
fn samples(
    dir: &Path,
    card: &Card,
    base: &Model,
    variants: &[(String, PathBuf, Vec<u8>)],
) -> Result<()> {
    let img_dir = dir.join("images");
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&img_dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .collect(),
        Err(_) => return Ok(()),
    };
    files.sort();
    let shape = card.batch1_shape();
    let base_clf = Classifier::from_onnx_bytes(base.bytes(), &shape)?;
    let var_clf = variants
        .iter()
        .map(|(v, _, m)| Ok((v.as_str(), Classifier::from_onnx_bytes(m, &shape)?)))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "\nsample images ({}): species by the base, and by the variant for that condition",
        img_dir.display()
    );
    for cond in CONDITIONS {
        let (mut n, mut ok_base, mut ok_var) = (0, 0, 0);
        let clf = var_clf.iter().find(|(v, _)| *v == cond).map(|(_, c)| c);
        let mut line = String::new();
        for f in files.iter().filter(|f| {
            f.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(&format!("{cond}-")))
        }) {
            let stem = f
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let truth = stem.rsplit('-').next().unwrap_or("");
            let input = card.preprocess_gray(&load_gray(f, card)?);
            let label = |c: &Classifier| -> Result<String> {
                Ok(argmax(&c.run(&input)?)
                    .map(|i| card.labels[i].clone())
                    .unwrap_or_default())
            };
            let b = label(&base_clf)?;
            let v = clf.map(label).transpose()?;
            n += 1;
            ok_base += usize::from(b == truth);
            ok_var += usize::from(v.as_deref() == Some(truth));
            if n <= 4 {
                line.push_str(&format!(" {truth}->{}", v.as_deref().unwrap_or(&b)));
            }
        }
        match clf {
            Some(_) => println!("  {cond:<6} {n} images: base {ok_base}/{n} correct, {cond} variant {ok_var}/{n} correct;{line} ..."),
            None => println!("  {cond:<6} {n} images: base {ok_base}/{n} correct;{line} ..."),
        }
    }
    Ok(())
}
