//! Shared by `run` and `serve`: loading the engine, cards, images, answers, CSV records.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bitdelta::tract::{argmax, softmax, Engine};
use bitdelta::DeltaFile;
use serde_json::json;

use crate::card::Card;
use crate::data::load_gray;
use crate::files::{hex, read_delta};

/// The engine with its card and the labels each variant uses.
pub(crate) struct Session {
    pub(crate) engine: Engine,
    pub(crate) card: Card,
    /// Label overrides from delta manifests, per variant name.
    pub(crate) labels: Vec<(String, Vec<String>)>,
}

/// `--card` or `model-card.json` next to the base model.
pub(crate) fn card_path(base: &Path, card: Option<&Path>) -> PathBuf {
    match card {
        Some(c) => c.to_owned(),
        None => base
            .parent()
            .unwrap_or(Path::new("."))
            .join("model-card.json"),
    }
}

impl Session {
    pub(crate) fn open(base: &Path, card: Option<&Path>) -> Result<Self> {
        let card_file = card_path(base, card);
        let card = Card::load(&card_file).with_context(|| {
            format!(
                "model card (pass --card, or put model-card.json next to {})",
                base.display()
            )
        })?;
        let map = crate::files::Model::open(base)?.map;
        let engine = Engine::new(Box::new(map), &card.batch1_shape())
            .with_context(|| format!("{}", base.display()))?;
        Ok(Self {
            engine,
            card,
            labels: Vec::new(),
        })
    }

    /// Registers `name` from `DELTA[@ALPHA]` specs joined by '+'.
    pub(crate) fn add_variant(&mut self, name: &str, specs: &[String]) -> Result<()> {
        let mut deltas = Vec::new();
        for s in specs {
            let (path, alpha) = super::apply::parse_delta_arg(s)?;
            let bytes = read_delta(&path)?;
            let file = super::parse_checked(&path, &bytes)?;
            self.take_labels(&path.display().to_string(), name, &file)?;
            deltas.push((bytes, alpha));
        }
        self.engine
            .add_variant(name, deltas)
            .with_context(|| specs.join("+"))
    }

    /// Registers `name` as one delta already in memory (e.g. from a store).
    pub(crate) fn add_variant_bytes(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        let file = DeltaFile::parse(&bytes)
            .map_err(|e| anyhow::anyhow!("variant {name:?}: {}", super::describe(&e, None)))?;
        self.take_labels(&format!("variant {name:?}"), name, &file)?;
        self.engine
            .add_variant(name, vec![(bytes, 1.0)])
            .with_context(|| format!("variant {name:?}"))
    }

    /// Records a delta's own labels (when it has them) for `name`.
    fn take_labels(&mut self, what: &str, name: &str, file: &DeltaFile<'_>) -> Result<()> {
        let labels: Vec<String> = file.manifest().labels().map(str::to_owned).collect();
        if !labels.is_empty() {
            if labels.len() != self.card.labels.len() {
                bail!(
                    "{what}: {} labels in the manifest, the model has {}",
                    labels.len(),
                    self.card.labels.len()
                );
            }
            self.labels.retain(|(n, _)| n != name);
            self.labels.push((name.to_owned(), labels));
        }
        Ok(())
    }

    fn label(&self, variant: &str, i: usize) -> String {
        self.labels
            .iter()
            .find(|(n, _)| n == variant)
            .map(|(_, l)| l[i].clone())
            .unwrap_or_else(|| {
                self.card
                    .labels
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| format!("class {i}"))
            })
    }

    /// Classifies one image with the active variant.
    pub(crate) fn classify(&mut self, image: &Path, gray: &[u8], top: usize) -> Result<Answer> {
        let input = self.card.preprocess_gray(gray);
        let t = std::time::Instant::now();
        let logits = self.engine.run(&input)?;
        let infer_ms = t.elapsed().as_secs_f64() * 1e3;
        let p = softmax(&logits);
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let (variant, fp) = self.engine.active();
        let (variant, fp) = (variant.to_owned(), hex(fp));
        let best = argmax(&logits).unwrap_or(0);
        let top = order
            .iter()
            .take(top.max(1))
            .map(|&i| (self.label(&variant, i), p[i]))
            .collect();
        Ok(Answer {
            image: image.to_owned(),
            label: self.label(&variant, best),
            score: p[best],
            top,
            variant,
            fingerprint: fp,
            infer_ms,
        })
    }
}

pub(crate) struct Answer {
    pub(crate) image: PathBuf,
    pub(crate) label: String,
    pub(crate) score: f32,
    pub(crate) top: Vec<(String, f32)>,
    pub(crate) variant: String,
    pub(crate) fingerprint: String,
    pub(crate) infer_ms: f64,
}

impl Answer {
    pub(crate) fn json(&self) -> serde_json::Value {
        json!({
            "image": self.image, "variant": self.variant, "fingerprint": self.fingerprint,
            "label": self.label, "score": self.score,
            "top": self.top.iter().map(|(l, p)| json!({"label": l, "p": p})).collect::<Vec<_>>(),
            "infer_ms": self.infer_ms,
        })
    }
}

/// Loads an image as the card's 8-bit gray input.
pub(crate) fn image(path: &Path, card: &Card) -> Result<Vec<u8>> {
    load_gray(path, card)
}

/// Mean brightness and contrast (standard deviation) of an 8-bit image, both in [0, 1].
pub(crate) fn stats(gray: &[u8]) -> (f64, f64) {
    let n = gray.len().max(1) as f64;
    let mean = gray.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = gray.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean / 255.0, var.sqrt() / 255.0)
}

/// Appends detections to a CSV in a Camtrap DP-friendly layout (observations table columns).
pub(crate) struct Csv {
    file: std::fs::File,
    path: PathBuf,
}

pub(crate) const CSV_HEADER: &str =
    "observationID,mediaID,filePath,timestamp,scientificName,commonName,classificationProbability,classificationMethod,classifiedBy";

impl Csv {
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let new = !path.exists()
            || std::fs::metadata(path)
                .map(|m| m.len() == 0)
                .unwrap_or(true);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for appending", path.display()))?;
        if new {
            writeln!(file, "{CSV_HEADER}")
                .with_context(|| format!("{}: cannot write", path.display()))?;
        }
        Ok(Self {
            file,
            path: path.to_owned(),
        })
    }

    pub(crate) fn record(&mut self, a: &Answer) -> Result<()> {
        let media = a
            .image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let ts = std::fs::metadata(&a.image)
            .and_then(|m| m.modified())
            .ok()
            .map(rfc3339)
            .unwrap_or_default();
        let obs = format!("{media}-{}", &a.fingerprint[..8.min(a.fingerprint.len())]);
        let fields = [
            obs,
            media,
            a.image.display().to_string(),
            ts,
            String::new(),
            a.label.clone(),
            format!("{:.4}", a.score),
            "machine".into(),
            format!(
                "bitdelta {} variant {} ({})",
                env!("CARGO_PKG_VERSION"),
                a.variant,
                a.fingerprint
            ),
        ];
        let line = fields
            .iter()
            .map(|f| csv_field(f))
            .collect::<Vec<_>>()
            .join(",");
        writeln!(self.file, "{line}")
            .with_context(|| format!("{}: cannot write", self.path.display()))
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// RFC 3339 UTC timestamp of a system time (civil-from-days, proleptic Gregorian).
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    let secs = t
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Checks that a delta file names a variant, for `NAME=DELTA` defaults.
pub(crate) fn variant_name_of(spec: &str) -> Result<String> {
    let (path, _) = super::apply::parse_delta_arg(spec)?;
    let bytes = read_delta(&path)?;
    let file = DeltaFile::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), super::describe(&e, None)))?;
    Ok(file.manifest().name.to_owned())
}
