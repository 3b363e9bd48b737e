//! Model cards: labels and preprocessing (the format of `models/species/model-card.json`).

use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Card {
    pub(crate) labels: Vec<String>,
    pub(crate) input: Input,
    /// Golden inputs for the activation self-test: images (relative to the card's folder) and
    /// the label the model must give them.
    #[serde(default)]
    pub(crate) golden: Vec<Golden>,
}

/// One golden input: `image` (relative to the card's folder) must be classified as `label`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Golden {
    pub(crate) image: std::path::PathBuf,
    pub(crate) label: String,
    /// Variants this applies to (`"base"` for the base model); empty = every model.
    #[serde(default)]
    pub(crate) variants: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Input {
    /// [channels, height, width]
    pub(crate) shape: Vec<usize>,
    pub(crate) scale: f32,
    pub(crate) mean: Vec<f32>,
    pub(crate) std: Vec<f32>,
}

impl Card {
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let card: Card = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid model card", path.display()))?;
        let i = &card.input;
        ensure!(
            i.shape.len() == 3,
            "{}: input.shape: expected [channels, height, width], found {:?}",
            path.display(),
            i.shape
        );
        ensure!(
            i.mean.len() == i.shape[0] && i.std.len() == i.shape[0],
            "{}: input.mean/std: expected {} values each",
            path.display(),
            i.shape[0]
        );
        if i.std.iter().any(|&s| s == 0.0 || !s.is_finite()) {
            bail!(
                "{}: input.std: expected non-zero finite values",
                path.display()
            );
        }
        ensure!(
            !card.labels.is_empty(),
            "{}: labels: expected at least one label",
            path.display()
        );
        for g in &card.golden {
            ensure!(
                card.labels.contains(&g.label),
                "{}: golden input {}: label {:?} is not one of the labels",
                path.display(),
                g.image.display(),
                g.label
            );
            ensure!(
                g.image.is_relative()
                    && g.image
                        .components()
                        .all(|c| matches!(c, std::path::Component::Normal(_))),
                "{}: golden input {}: expected a path relative to the card's folder",
                path.display(),
                g.image.display()
            );
        }
        Ok(card)
    }

    /// The model's input shape with batch 1.
    pub(crate) fn batch1_shape(&self) -> Vec<usize> {
        let mut s = vec![1];
        s.extend(&self.input.shape);
        s
    }

    /// Preprocesses one 8-bit grayscale image (height x width) into NCHW f32.
    pub(crate) fn preprocess_gray(&self, gray: &[u8]) -> Vec<f32> {
        let [c, h, w] = [
            self.input.shape[0],
            self.input.shape[1],
            self.input.shape[2],
        ];
        let mut out = Vec::with_capacity(c * h * w);
        for ch in 0..c {
            let (m, s) = (self.input.mean[ch], self.input.std[ch]);
            out.extend(
                gray[..h * w]
                    .iter()
                    .map(|&p| (p as f32 * self.input.scale - m) / s),
            );
        }
        out
    }
}
