//! Which model card a command uses, and its frames (the card itself is `bitdelta::card`).

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
use bitdelta::card::ModelCard;
use bitdelta::frame::Frame;

/// `--card`, or `model-card.json` next to the base model.
pub(crate) fn card_path(base: &Path, card: Option<&Path>) -> PathBuf {
    match card {
        Some(c) => c.to_owned(),
        None => base
            .parent()
            .unwrap_or(Path::new("."))
            .join("model-card.json"),
    }
}

/// Reads the card for `base` (`--card`, else next to it) and checks it against the model's
/// declared input and output, before any model is loaded. Returns the card and its path.
pub(crate) fn load(
    base: &Path,
    base_bytes: &[u8],
    card: Option<&Path>,
) -> Result<(ModelCard, PathBuf)> {
    let path = card_path(base, card);
    if card.is_none() && !path.exists() {
        return Err(anyhow!(
            "{}: no model card (pass --card, or put model-card.json next to {})",
            path.display(),
            base.display()
        ));
    }
    let parsed = ModelCard::load(&path)?;
    parsed.check_model(base_bytes, &path, base)?;
    Ok((parsed, path))
}

/// Decodes an image file into the card's input frame.
pub(crate) fn frame(path: &Path, card: &ModelCard) -> Result<Frame> {
    Ok(Frame::load(path, &card.input)?)
}
