//! `bitdelta demo`: a bundled family (species by default, or field) end to end.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bitdelta::card::{argmax, ModelCard};
use bitdelta::compress::{Options, Policy};
use bitdelta::frame::Frame;
use bitdelta::metrics::Top1;
use bitdelta::tract::Classifier;

use bitdelta::mem::{release_free_memory, reset_peak_rss, rss};
use bitdelta::tract::{Engine, BASE};

use super::serve::Rule;
use crate::data::LabelledSet;
use crate::files::{read_delta, write_atomic, Model};

const CONDITIONS: [&str; 3] = ["clean", "night", "fog"];
/// Images per tract run for small inputs (a batch of 224-px frames would cost more memory than
/// it saves time).
const BATCH: usize = 100;

/// The bundled families: name, and the rules that choose a variant per frame in the
/// camera-trap loop (from the frames' brightness and contrast, measured on each family's
/// eval frames).
const FAMILIES: [(&str, [&str; 2]); 2] = [
    ("species", ["fog:brightness>0.5", "night:contrast<0.16"]),
    ("field", ["night:brightness<0.25", "fog:contrast<0.085"]),
];

/// Run a bundled family end to end: compress each variant, verify, apply, classify.
///
/// For each fine-tuned variant next to the base (night, fog) this compresses a delta with the
/// default codec rule and with the seed recipe, verifies both against the base, rebuilds the
/// models, and measures accuracy with tract on the labelled test images of every condition
/// (eval.npz, or eval/<condition>/<label>/ image folders), then classifies the sample images in
/// images/ and runs the camera-trap loop (the variant chosen per frame, switched in place).
///
/// Families: species (32x32 grey, the default) and field (224x224 colour EfficientNet-Lite0,
/// 3.4 M weights: `bitdelta demo --family field`).
#[derive(clap::Args)]
pub(crate) struct Args {
    /// Bundled family: species or field.
    #[arg(long, default_value = "species", value_parser = ["species", "field"])]
    family: String,
    /// Folder with the family instead of the bundled one: NAME-base.onnx, the variants,
    /// model-card.json, eval.npz or eval/<condition>/<label>/ images, and optionally images/.
    #[arg(long)]
    models: Option<PathBuf>,
    /// Camera-trap loop rules, NAME:STAT<VALUE or NAME:STAT>VALUE (first match wins; default: the
    /// family's). Repeatable.
    #[arg(long = "rule", value_name = "RULE")]
    rules: Vec<String>,
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

/// The bundled folder of a family.
fn family_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../models")
        .join(name)
}

/// The one `*-base.onnx` of a family folder.
fn base_of(dir: &Path) -> Result<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}: cannot read the family folder", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().ends_with("-base.onnx"))
        })
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found.remove(0)),
        n => bail!("{}: expected one NAME-base.onnx, found {n}", dir.display()),
    }
}

/// The labelled test set of each condition: `eval.npz`, or `eval/<condition>/` folders.
fn eval_sets(dir: &Path, card: &ModelCard) -> Result<(String, Vec<(String, LabelledSet)>)> {
    let npz = dir.join("eval.npz");
    let sets = if npz.is_file() {
        CONDITIONS
            .iter()
            .map(|c| Ok((c.to_string(), LabelledSet::from_npz(&npz, c, card)?)))
            .collect::<Result<Vec<_>>>()?
    } else {
        CONDITIONS
            .iter()
            .map(|c| {
                let d = dir.join("eval").join(c);
                Ok((c.to_string(), LabelledSet::from_folder(&d, card)?))
            })
            .collect::<Result<Vec<_>>>()?
    };
    let what = if npz.is_file() { "eval.npz" } else { "eval/" };
    Ok((what.to_owned(), sets))
}

struct Evaluator {
    card: ModelCard,
    sets: Vec<(String, LabelledSet)>,
}

impl Evaluator {
    fn classifier(&self, model: &[u8], batch: usize) -> Result<Classifier> {
        let mut shape = self.card.batch1_shape();
        shape[0] = batch;
        Classifier::from_onnx_bytes_as(model, &shape, self.card.input_type())
            .context("loading model in tract")
    }

    fn accuracy(&self, model: &[u8]) -> Result<Vec<f64>> {
        let batch = if self.card.input_len() <= 4096 {
            BATCH
        } else {
            1
        };
        let batched = self.classifier(model, batch)?;
        let single = self.classifier(model, 1)?;
        let mut out = Vec::new();
        for (_, set) in &self.sets {
            let mut top1 = Top1::new();
            let mut i = 0;
            while i < set.len() {
                let (clf, b) = if set.len() - i >= batch {
                    (&batched, batch)
                } else {
                    (&single, 1)
                };
                let mut input = Vec::with_capacity(b * self.card.input_len());
                for k in i..i + b {
                    set.frame(k).tensor_into(&self.card.input, &mut input);
                }
                let logits = clf.run(&input)?;
                top1.add_rows(&logits, logits.len() / b, &set.labels[i..i + b]);
                i += b;
            }
            out.push(top1.accuracy());
        }
        Ok(out)
    }
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let started = Instant::now();
    let dir = &a.models.clone().unwrap_or_else(|| family_dir(&a.family));
    let base = Model::open(&base_of(dir)?)?;
    let (card, _) =
        crate::card::load(&base.path, base.bytes(), Some(&dir.join("model-card.json")))?;
    let (eval_name, sets) = eval_sets(dir, &card)?;
    let rules = if a.rules.is_empty() {
        let family = FAMILIES
            .iter()
            .find(|(f, _)| *f == a.family)
            .map_or(FAMILIES[0].1, |(_, r)| *r);
        family.map(str::to_owned).to_vec()
    } else {
        a.rules.clone()
    };
    let rules = rules
        .iter()
        .map(|r| Rule::parse(r))
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
        "{} family: {} ({} float tensors, {} params); deltas in {}",
        a.family,
        base.path.display(),
        base.weights.initializers.len(),
        params,
        out_dir.display()
    );
    println!(
        "accuracy on {eval_name} with tract ({} labelled images per condition)\n",
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
                description: "demo variant",
                labels: "",
                sequence: 1,
                policy,
            };
            let bytes = super::compress::compress_models(&base, &fine, &opts, |_, _| {})
                .with_context(|| format!("compressing {}", fine_path.display()))?;
            let path = out_dir.join(format!("{v}.{label}.bdelta"));
            write_atomic(&path, &bytes)?;
            let model = super::apply::apply_files(&base, &[(&path, 1.0)])?.model;
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
    camera_trap(&base, &ev, &variant_models, &rules)?;
    println!("\ndone in {:.1} s", started.elapsed().as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

/// Classifies images/<condition>-<index>-<species>.png with the base and with the variant named
/// like the condition.
fn samples(
    dir: &Path,
    card: &ModelCard,
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
    let ty = card.input_type();
    let base_clf = Classifier::from_onnx_bytes_as(base.bytes(), &shape, ty)?;
    let var_clf = variants
        .iter()
        .map(|(v, _, m)| Ok((v.as_str(), Classifier::from_onnx_bytes_as(m, &shape, ty)?)))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "\nsample images ({}): species by the base, and by the variant for that condition",
        img_dir.display()
    );
    for cond in CONDITIONS {
        let (mut ok_base, mut ok_var) = (Top1::new(), Top1::new());
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
            // A file name's class that the card does not list is never correct.
            let label = card
                .labels
                .iter()
                .position(|l| l == truth)
                .map_or(-1, |i| i as i64);
            let input = crate::card::frame(f, card)?.tensor(card);
            let predict = |c: &Classifier| -> Result<Option<usize>> { Ok(argmax(&c.run(&input)?)) };
            let b = predict(&base_clf)?;
            let v = clf.map(predict).transpose()?;
            ok_base.add(b, label);
            ok_var.add(v.flatten(), label);
            if ok_base.total() <= 4 {
                let name = |p: Option<usize>| p.map_or("", |i| card.labels[i].as_str());
                line.push_str(&format!(" {truth}->{}", name(v.unwrap_or(b))));
            }
        }
        let n = ok_base.total();
        let (ok_base, ok_var) = (ok_base.correct(), ok_var.correct());
        match clf {
            Some(_) => println!("  {cond:<6} {n} images: base {ok_base}/{n} correct, {cond} variant {ok_var}/{n} correct;{line} ..."),
            None => println!("  {cond:<6} {n} images: base {ok_base}/{n} correct;{line} ..."),
        }
    }
    Ok(())
}

/// The camera-trap loop: frames from clean, night and fog in runs of mixed length, the variant
/// chosen per frame by rule from image statistics, one model in memory at a time.
fn camera_trap(
    base: &Model,
    ev: &Evaluator,
    variants: &[(String, PathBuf, Vec<u8>)],
    rules: &[Rule],
) -> Result<()> {
    // Frames: runs of 4..=19 frames per condition, 300 frames, deterministic order.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut used = [0usize; 3];
    let mut frames = Vec::new();
    let available: usize = ev.sets.iter().map(|(_, s)| s.len()).sum();
    while frames.len() < 300.min(available) {
        let c = (next() % 3) as usize;
        for _ in 0..4 + next() % 16 {
            if used[c] < ev.sets[c].1.len() {
                frames.push((c, used[c]));
                used[c] += 1;
            }
        }
    }
    frames.truncate(300.min(available));
    let shape = ev.card.batch1_shape();
    let ty = ev.card.input_type();
    let engine_on_base = || Engine::with_input_type(Box::new(base.map.to_vec()), &shape, ty);
    // Peak memory of one model (base + one variant built, one inference), for comparison.
    release_free_memory();
    reset_peak_rss();
    {
        let mut one = engine_on_base()?;
        if let Some((name, path, _)) = variants.first() {
            one.add_variant(name, vec![(read_delta(path)?, 1.0)])?;
            one.switch(name)?;
        }
        one.run(&ev.sets[0].1.frame(0).tensor(&ev.card))?;
    }
    let peak_one = rss().map(|r| r.1);
    release_free_memory();
    reset_peak_rss();
    let mut engine = engine_on_base()?;
    for (name, path, _) in variants {
        engine.add_variant(name, vec![(read_delta(path)?, 1.0)])?;
    }
    let known: Vec<String> = engine.variants().map(str::to_owned).collect();
    let mut switch_ms = Vec::new();
    let mut first_load_ms = None;
    let (mut with_switching, mut base_only_top1): ([Top1; 3], [Top1; 3]) = Default::default();
    let mut base_only = engine_on_base()?;
    let rule_text: Vec<String> = rules.iter().map(Rule::to_string).collect();
    println!(
        "\ncamera-trap loop: {} frames from clean/night/fog in runs; rules {}",
        frames.len(),
        rule_text.join(", ")
    );
    for (k, &(c, i)) in frames.iter().enumerate() {
        let (cond, set) = (&ev.sets[c].0, &ev.sets[c].1);
        let frame: &Frame = set.frame(i);
        let (b, ct) = frame.stats();
        let want = rules
            .iter()
            .find(|r| r.matches(b, ct))
            .map(|r| r.variant().to_owned())
            .filter(|v| known.contains(v))
            .unwrap_or_else(|| BASE.to_owned());
        let t = Instant::now();
        let first = engine.active().0.is_empty();
        if engine.switch(&want)? {
            let ms = t.elapsed().as_secs_f64() * 1e3;
            if first {
                first_load_ms = Some(ms);
            } else {
                switch_ms.push(ms);
            }
        }
        let input = frame.tensor(&ev.card);
        let pred = argmax(&engine.run(&input)?).unwrap_or(0);
        let pred_base = argmax(&base_only.run(&input)?).unwrap_or(0);
        with_switching[c].add(Some(pred), set.labels[i]);
        base_only_top1[c].add(Some(pred_base), set.labels[i]);
        if k < 12 {
            println!(
                "  frame {k:>3} {cond:<5} brightness {b:.2} contrast {ct:.2} -> {want:<5} {:<8} (truth {})",
                ev.card.labels[pred],
                ev.card.labels[set.labels[i] as usize]
            );
        }
    }
    println!("  ...");
    let peak_loop = rss().map(|r| r.1);
    println!(
        "  {:<6} {:>6} {:>16} {:>16}",
        "", "frames", "with switching", "base only"
    );
    // A condition without frames shows 0.
    let acc = |t: &Top1| if t.total() == 0 { 0.0 } else { t.accuracy() };
    for c in 0..3 {
        println!(
            "  {:<6} {:>6} {:>16.3} {:>16.3}",
            ev.sets[c].0,
            with_switching[c].total(),
            acc(&with_switching[c]),
            acc(&base_only_top1[c])
        );
    }
    if let Some(ms) = first_load_ms {
        println!("  first load (base) {ms:.1} ms");
    }
    switch_ms.sort_by(f64::total_cmp);
    if !switch_ms.is_empty() {
        println!(
            "  {} switches ({}), median {:.1} ms, max {:.1} ms",
            switch_ms.len(),
            engine.last_switch().map_or("-", |k| k.name()),
            switch_ms[switch_ms.len() / 2],
            switch_ms[switch_ms.len() - 1]
        );
    }
    if let (Some(one), Some(lp)) = (peak_one, peak_loop) {
        println!(
            "  peak RSS while switching {:.1} MB vs {:.1} MB for one model ({:.2}x; the base-only engine runs alongside for comparison)",
            lp as f64 / 1e6,
            one as f64 / 1e6,
            lp as f64 / one as f64
        );
    }
    Ok(())
}
