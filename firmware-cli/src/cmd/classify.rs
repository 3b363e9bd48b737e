//! Shared by `run` and `serve`: loading the engine, cards, images, answers, CSV records.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bitdelta::card::{argmax, ModelCard};
use bitdelta::frame::Frame;
use bitdelta::tract::Engine;
use bitdelta::DeltaFile;
use serde_json::json;

use crate::files::{hex, read_delta};

/// The engine with its card and the labels each variant uses.
pub(crate) struct Session {
    pub(crate) engine: Engine,
    pub(crate) card: ModelCard,
    /// Label overrides from delta manifests, per variant name.
    pub(crate) labels: Vec<(String, Vec<String>)>,
}

impl Session {
    /// Opens `base` with its model card (`card`, else model-card.json next to it), checked
    /// against the model's declared input before tract loads anything.
    pub(crate) fn open(base: &Path, card: Option<&Path>) -> Result<Self> {
        let map = crate::files::Model::open(base)?.map;
        let (card, _) = crate::card::load(base, &map, card)?;
        let engine =
            Engine::with_input_type(Box::new(map), &card.batch1_shape(), card.input_type())
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

    /// Classifies one frame with the active variant.
    pub(crate) fn classify(&mut self, image: &Path, frame: &Frame, top: usize) -> Result<Answer> {
        let input = frame.tensor(&self.card);
        let t = std::time::Instant::now();
        let out = self.engine.run(&input)?;
        let infer_ms = t.elapsed().as_secs_f64() * 1e3;
        anyhow::ensure!(
            out.len() == self.card.output.classes,
            "{}: the model gave {} outputs, the model card has {} classes",
            image.display(),
            out.len(),
            self.card.output.classes
        );
        let p = self.card.scores(&out);
        let mut order: Vec<usize> = (0..p.len()).collect();
        order.sort_by(|&a, &b| p[b].total_cmp(&p[a]));
        let (variant, fp) = self.engine.active();
        let (variant, fp) = (variant.to_owned(), hex(fp));
        let best = argmax(&p).unwrap_or(0);
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

/// Appends detections to a CSV in a Camtrap DP-friendly layout (observations table columns).
pub(crate) struct Csv {
    out: csv::Writer<std::fs::File>,
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
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}: cannot open for appending", path.display()))?;
        let mut csv = Self {
            out: csv::Writer::from_writer(file),
            path: path.to_owned(),
        };
        if new {
            csv.write(CSV_HEADER.split(','))?;
        }
        Ok(csv)
    }

    /// Writes one record and flushes it to the file.
    fn write<I: IntoIterator<Item: AsRef<[u8]>>>(&mut self, record: I) -> Result<()> {
        let cannot = || format!("{}: cannot write", self.path.display());
        self.out.write_record(record).with_context(cannot)?;
        self.out.flush().with_context(cannot)
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
        self.write(&fields)
    }
}

/// RFC 3339 UTC timestamp of a system time, to the second. RFC 3339 years have four digits:
/// times before 1970 are written as the epoch, times after 9999 as its last second.
pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    use std::time::{Duration, UNIX_EPOCH};
    let last = UNIX_EPOCH + Duration::from_secs(253_402_300_799);
    humantime::format_rfc3339_seconds(t.clamp(UNIX_EPOCH, last)).to_string()
}

/// Checks that a delta file names a variant, for `NAME=DELTA` defaults.
pub(crate) fn variant_name_of(spec: &str) -> Result<String> {
    let (path, _) = super::apply::parse_delta_arg(spec)?;
    let bytes = read_delta(&path)?;
    let file = DeltaFile::parse(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: {}", path.display(), super::describe(&e, None)))?;
    Ok(file.manifest().name.to_owned())
}
