//! `bitdelta eval`: how much of a fine-tune a delta keeps, measured on labelled images.
//!
//! Every row is one model run over the whole set: the base, each delta or soup rebuilt in memory
//! (verified against the base first), and each fine-tuned ONNX. Deltas are compared with their
//! fine-tune on the same images: accuracy ratio, top-1 agreement and the KL divergence of the
//! softmax outputs, so a codec's cost shows even where accuracy alone hides it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use bitdelta::apply::check_binding;
use bitdelta::card::{ModelCard, OutputKind};
use bitdelta::fingerprint::Fingerprint;
use bitdelta::metrics::Top1;
use bitdelta::tract::Classifier;
use serde_json::{json, Value};

use super::apply::{apply_files, parse_delta_arg};
use crate::data::{npz_conditions, LabelledSet};
use crate::files::{hex, read_delta, Model};

/// Measure accuracy of the base, deltas, soups and fine-tunes on labelled images.
///
/// The base is always a row; each --variant (a delta, or a soup D1@A1+D2@A2 with alphas as in
/// `bitdelta apply`) and each --fine ONNX model adds one. Every delta is verified (structure,
/// checksums, binding to the base) before anything runs. With --fine, each delta row is also
/// compared with its fine-tune: retention (accuracy / fine-tune accuracy), top-1 agreement, and
/// mean KL(fine || variant) of the softmax outputs. One --fine is the reference for every
/// variant; otherwise give one per --variant, in order. bits/param is the delta's file size
/// (summed over a soup's files) * 8 / the base's parameter count.
///
/// --data is an .npz archive with x_<condition> uint8 [N,H,W] gray images and y_<condition>
/// int64 labels (indices into the card's labels), or a folder of <label>/<image>.png|jpg with
/// label names from the model card (with --condition: <condition>/<label>/<image>). Several
/// comma-separated conditions form one mixed set. Preprocessing comes from the model card
/// (--card, else model-card.json next to the base).
///
/// Example: bitdelta eval --base models/species/species-base.onnx --variant night.bdelta
/// --variant night.bdelta@0.5+fog.bdelta@0.5 --fine models/species/night.onnx
/// --data models/species/eval.npz --condition night
#[derive(clap::Args)]
pub(crate) struct Args {
    /// The base model.
    #[arg(long)]
    base: PathBuf,
    /// A delta, or a soup of deltas joined by '+', each DELTA[@ALPHA]. Repeatable. A delta at an
    /// alpha other than 1 is reported as a soup.
    #[arg(long, value_name = "DELTA[@ALPHA][+DELTA@ALPHA...]")]
    variant: Vec<String>,
    /// A fine-tuned ONNX model: a row, and the reference the delta rows are compared with.
    /// Repeatable.
    #[arg(long, value_name = "FINE.onnx")]
    fine: Vec<PathBuf>,
    /// Labelled images: an .npz archive (x_<condition>, y_<condition>) or a <label>/<image> folder.
    #[arg(long, value_name = "EVAL.npz|DIR")]
    data: PathBuf,
    /// Condition(s) to evaluate, comma-separated (`night,fog` is one mixed set). Required for
    /// .npz; for a folder, selects <condition>/ subfolders.
    #[arg(long, value_name = "C[,C...]")]
    condition: Option<String>,
    /// Model card (labels, preprocessing).
    #[arg(long)]
    card: Option<PathBuf>,
    /// One JSON object: base, data, condition, images and one entry per row.
    #[arg(long)]
    json: bool,
}

/// Where a row's model comes from.
enum Source {
    Base,
    /// Deltas with alphas, verified against the base.
    Deltas(Vec<(PathBuf, f32)>),
    Fine(Model),
}

/// One model evaluated over the set.
struct Row {
    name: String,
    kind: &'static str,
    path: String,
    source: Source,
    /// Total size of the delta files.
    delta_bytes: Option<u64>,
    /// Index of the reference fine-tune row.
    reference: Option<usize>,
    fingerprint: String,
    /// Logits, images x classes.
    logits: Vec<f32>,
    /// Top-1 counts against the labels.
    top1: Top1,
}

pub(crate) fn run(a: Args) -> Result<ExitCode> {
    let started = Instant::now();
    let base = Model::open(&a.base)?;
    let (card, card_file) = crate::card::load(&a.base, base.bytes(), a.card.as_deref())?;
    let base_fp = base.weights.fingerprint(base.bytes());
    let params = base.weights.params();
    let conditions = parse_conditions(a.condition.as_deref())?;
    let set = load_set(&a.data, &conditions, &card)?;

    let fines = a.fine.len();
    ensure!(
        fines <= 1 || fines == a.variant.len(),
        "{fines} --fine models for {} --variant rows: give one --fine (the reference for every \
         variant) or one per --variant, in the same order",
        a.variant.len()
    );
    let first_fine = 1 + a.variant.len();
    let mut rows = vec![Row::new(
        "base".into(),
        "base",
        a.base.display().to_string(),
        Source::Base,
    )];
    for (i, spec) in a.variant.iter().enumerate() {
        let deltas = parse_soup(spec)?;
        let mut names = Vec::new();
        let mut bytes = 0u64;
        for (path, alpha) in &deltas {
            let (name, len) = verify_delta(path, &base, &base_fp)?;
            names.push(if *alpha == 1.0 && deltas.len() == 1 {
                name
            } else {
                format!("{name}@{alpha}")
            });
            bytes += len;
        }
        let soup = deltas.len() > 1 || deltas[0].1 != 1.0;
        let mut row = Row::new(
            names.join("+"),
            if soup { "soup" } else { "delta" },
            spec.clone(),
            Source::Deltas(deltas),
        );
        row.delta_bytes = Some(bytes);
        row.reference = match fines {
            0 => None,
            1 => Some(first_fine),
            _ => Some(first_fine + i),
        };
        rows.push(row);
    }
    for path in &a.fine {
        let model = Model::open(path)?;
        let name = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| path.display().to_string());
        rows.push(Row::new(
            name,
            "fine",
            path.display().to_string(),
            Source::Fine(model),
        ));
    }

    let n = set.len();
    let bar = indicatif::ProgressBar::new((rows.len() * n) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("eval {msg:16} {bar:40} {pos}/{len} images")
            .expect("static template"),
    );
    for row in &mut rows {
        bar.set_message(row.name.clone());
        let (logits, fp) = match &row.source {
            Source::Base => (infer(base.bytes(), &a.base, &set, &card, &bar)?, base_fp),
            Source::Deltas(deltas) => {
                let list: Vec<(&Path, f32)> =
                    deltas.iter().map(|(p, al)| (p.as_path(), *al)).collect();
                let applied = apply_files(&base, &list)?;
                let logits = infer(&applied.model, Path::new(&row.path), &set, &card, &bar)?;
                (logits, applied.fingerprint)
            }
            Source::Fine(m) => (
                infer(m.bytes(), &m.path, &set, &card, &bar)?,
                m.weights.fingerprint(m.bytes()),
            ),
        };
        let classes = card.labels.len();
        row.top1 = Top1::of_rows(&logits, classes, &set.labels);
        row.logits = logits;
        row.fingerprint = hex(&fp);
    }
    bar.finish_and_clear();

    let report = Report {
        rows: &rows,
        images: n,
        classes: card.labels.len(),
        kind: card.output.kind,
        params,
    };
    if a.json {
        super::print_json(&json!({
            "base": a.base.display().to_string(),
            "data": a.data.display().to_string(),
            "condition": a.condition.as_ref().map(|_| conditions.join(",")),
            "images": n,
            "rows": (0..rows.len()).map(|i| report.json(i)).collect::<Vec<_>>(),
        }))?;
    } else {
        let what = match &a.condition {
            Some(_) => format!("{}, condition {}", a.data.display(), conditions.join(",")),
            None => a.data.display().to_string(),
        };
        println!(
            "{n} labelled images ({what}); preprocessing from {}",
            card_file.display()
        );
        report.table();
        println!(
            "{} model{} x {n} images in {:.1} s",
            rows.len(),
            if rows.len() == 1 { "" } else { "s" },
            started.elapsed().as_secs_f64()
        );
    }
    Ok(ExitCode::SUCCESS)
}

impl Row {
    fn new(name: String, kind: &'static str, path: String, source: Source) -> Self {
        Self {
            name,
            kind,
            path,
            source,
            delta_bytes: None,
            reference: None,
            fingerprint: String::new(),
            logits: Vec::new(),
            top1: Top1::new(),
        }
    }
}

/// Per-row numbers, derived from the logits.
struct Report<'a> {
    rows: &'a [Row],
    images: usize,
    classes: usize,
    kind: OutputKind,
    params: u64,
}

/// A delta row's comparison with its fine-tune.
struct Comparison<'a> {
    fine: &'a Row,
    retention: Option<f64>,
    agreement: f64,
    mean_kl: f64,
}

impl Report<'_> {
    fn bits_per_param(&self, row: &Row) -> Option<f64> {
        row.delta_bytes
            .map(|b| b as f64 * 8.0 / self.params.max(1) as f64)
    }

    fn compare(&self, row: &Row) -> Option<Comparison<'_>> {
        let fine = &self.rows[row.reference?];
        let kl = summed_kl(&fine.logits, &row.logits, self.classes, self.kind);
        Some(Comparison {
            fine,
            retention: row.top1.retention(&fine.top1),
            agreement: Top1::agreement(&fine.logits, &row.logits, self.classes).accuracy(),
            mean_kl: kl / self.images as f64,
        })
    }

    fn json(&self, i: usize) -> Value {
        let row = &self.rows[i];
        let c = self.compare(row);
        json!({
            "name": row.name,
            "kind": row.kind,
            "path": row.path,
            "accuracy": row.top1.accuracy(),
            "correct": row.top1.correct(),
            "fine": c.as_ref().map(|c| &c.fine.path),
            "fine_accuracy": c.as_ref().map(|c| c.fine.top1.accuracy()),
            "retention": c.as_ref().and_then(|c| c.retention),
            "agreement": c.as_ref().map(|c| c.agreement),
            "mean_kl": c.as_ref().map(|c| c.mean_kl),
            "bits_per_param": self.bits_per_param(row),
            "fingerprint": row.fingerprint,
        })
    }

    fn table(&self) {
        let width = self
            .rows
            .iter()
            .map(|r| r.name.len())
            .max()
            .unwrap_or(0)
            .max(4);
        println!(
            "{:<width$}  {:<5}  {:>8}  {:>11}  {:>9}  {:>9}  {:>8}  {:>10}  {:<16}  path",
            "name",
            "kind",
            "accuracy",
            "correct",
            "retention",
            "agreement",
            "mean KL",
            "bits/param",
            "fingerprint"
        );
        let dash = || "-".to_owned();
        for row in self.rows {
            let c = self.compare(row);
            let vs = c
                .as_ref()
                .map(|c| format!(" (vs {})", c.fine.name))
                .unwrap_or_default();
            println!(
                "{:<width$}  {:<5}  {:>8.3}  {:>11}  {:>9}  {:>9}  {:>8}  {:>10}  {:<16}  {}{vs}",
                row.name,
                row.kind,
                row.top1.accuracy(),
                format!("{}/{}", row.top1.correct(), self.images),
                c.as_ref()
                    .and_then(|c| c.retention)
                    .map_or_else(dash, |r| format!("{r:.3}")),
                c.as_ref()
                    .map_or_else(dash, |c| format!("{:.3}", c.agreement)),
                c.as_ref()
                    .map_or_else(dash, |c| format!("{:.4}", c.mean_kl)),
                self.bits_per_param(row)
                    .map_or_else(dash, |b| format!("{b:.3}")),
                &row.fingerprint[..16.min(row.fingerprint.len())],
                row.path,
            );
        }
    }
}

/// The summed KL(p || q) of the class probabilities
/// (from log-softmax of logits in f64, so saturated probabilities stay finite; a model that
/// outputs probabilities has them floored at 1e-12 before the log).
fn summed_kl(p: &[f32], q: &[f32], classes: usize, kind: OutputKind) -> f64 {
    let log_p = |v: &[f32]| match kind {
        OutputKind::Logits => log_softmax(v),
        OutputKind::Probabilities => v.iter().map(|&x| f64::from(x).max(1e-12).ln()).collect(),
    };
    let mut kl = 0.0;
    for (a, b) in p.chunks_exact(classes).zip(q.chunks_exact(classes)) {
        let (la, lb) = (log_p(a), log_p(b));
        let d: f64 = la.iter().zip(&lb).map(|(x, y)| x.exp() * (x - y)).sum();
        // KL is never negative; rounding of near-identical outputs can dip just under zero.
        kl += d.max(0.0);
    }
    kl
}

fn log_softmax(v: &[f32]) -> Vec<f64> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = v.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln() + m;
    v.iter().map(|&x| x as f64 - lse).collect()
}

/// Runs a model over the set, one image per call; returns the logits, images x classes.
///
/// The plan takes a batch dimension, but tract runs this model family no faster in batches
/// (1800 images: 4.0 s at batch 1, 4.1 s at 16, 4.7 s at 64 on a 2-core x86), and batch 1 is
/// the plan a device runs, so its logits are the device's.
fn infer(
    model: &[u8],
    what: &Path,
    set: &LabelledSet,
    card: &ModelCard,
    bar: &indicatif::ProgressBar,
) -> Result<Vec<f32>> {
    let classes = card.labels.len();
    let clf = Classifier::from_onnx_bytes_as(model, &card.batch1_shape(), card.input_type())
        .with_context(|| format!("{}: cannot load the model in tract", what.display()))?;
    let mut logits = Vec::with_capacity(set.len() * classes);
    for i in 0..set.len() {
        let out = clf
            .run(&set.frame(i).tensor(card))
            .with_context(|| format!("{}: inference failed", what.display()))?;
        ensure!(
            out.len() == classes,
            "{}: {} outputs per image, the model card has {classes} labels",
            what.display(),
            out.len()
        );
        logits.extend(out);
        bar.inc(1);
    }
    Ok(logits)
}

/// Reads the delta, checks its structure, checksums and binding to the base; returns its variant
/// name and file size.
fn verify_delta(path: &Path, base: &Model, base_fp: &Fingerprint) -> Result<(String, u64)> {
    let bytes = read_delta(path)?;
    let file = super::parse_checked(path, &bytes).map_err(|e| {
        if path
            .extension()
            .is_some_and(|x| x.eq_ignore_ascii_case("onnx"))
        {
            e.context(format!(
                "{}: not a delta (pass fine-tuned ONNX models with --fine)",
                path.display()
            ))
        } else {
            e
        }
    })?;
    check_binding(&file, 0, &base.weights, base_fp)
        .map_err(|e| anyhow!("{}: {e} (base {})", path.display(), base.path.display()))?;
    Ok((file.manifest().name.to_owned(), bytes.len() as u64))
}

/// `DELTA[@ALPHA]`, or several joined by '+'. A spec naming an existing file is one delta even if
/// its name contains '+'.
fn parse_soup(spec: &str) -> Result<Vec<(PathBuf, f32)>> {
    let whole = parse_delta_arg(spec)?;
    if whole.0.is_file() {
        return Ok(vec![whole]);
    }
    spec.split('+')
        .map(|part| {
            ensure!(
                !part.trim().is_empty(),
                "--variant {spec:?}: empty delta in the soup (expected D1@A1+D2@A2)"
            );
            parse_delta_arg(part.trim())
        })
        .collect()
}

/// `night,fog` -> ["night", "fog"]; none -> empty.
fn parse_conditions(arg: Option<&str>) -> Result<Vec<String>> {
    let Some(arg) = arg else {
        return Ok(Vec::new());
    };
    let mut out: Vec<String> = Vec::new();
    for c in arg.split(',').map(str::trim) {
        ensure!(
            !c.is_empty(),
            "--condition {arg:?}: empty condition (expected C or C1,C2)"
        );
        ensure!(
            !out.iter().any(|o| o == c),
            "--condition {arg:?}: {c:?} listed twice"
        );
        out.push(c.to_owned());
    }
    Ok(out)
}

/// The labelled set: the union of the conditions of an .npz archive, or a labelled folder.
fn load_set(data: &Path, conditions: &[String], card: &ModelCard) -> Result<LabelledSet> {
    let mut sets = Vec::new();
    if data.is_dir() {
        if conditions.is_empty() {
            sets.push(LabelledSet::from_folder(data, card)?);
        }
        for c in conditions {
            let dir = data.join(c);
            ensure!(
                dir.is_dir(),
                "{}: no folder for condition {c:?} (with --condition, a folder holds \
                 <condition>/<label>/<image>)",
                dir.display()
            );
            sets.push(LabelledSet::from_folder(&dir, card)?);
        }
    } else {
        let available = npz_conditions(data)?;
        if conditions.is_empty() {
            bail!(
                "{}: --condition is required for an .npz set (conditions in it: {})",
                data.display(),
                available.join(", ")
            );
        }
        for c in conditions {
            ensure!(
                available.contains(c),
                "{}: no condition {c:?} (arrays x_{c}, y_{c}); conditions in it: {}",
                data.display(),
                available.join(", ")
            );
            let set = LabelledSet::from_npz(data, c, card)?;
            let classes = card.labels.len() as i64;
            if let Some(bad) = set.labels.iter().find(|&&y| !(0..classes).contains(&y)) {
                bail!(
                    "{}: y_{c}: label {bad} outside the model card's {classes} labels",
                    data.display()
                );
            }
            sets.push(set);
        }
    }
    let mut sets = sets.into_iter();
    let mut set = sets.next().expect("at least one set");
    for s in sets {
        set.extend(s);
    }
    ensure!(
        !set.labels.is_empty(),
        "{}: no labelled images",
        data.display()
    );
    Ok(set)
}
