//! Labelled sets: frames at the model card's input, with their class indices.

use std::path::Path;

use anyhow::{ensure, Context, Result};
use bitdelta::card::ModelCard;
use bitdelta::frame::Frame;

use crate::card::frame;

/// Labelled frames, from an `.npz` archive (`x_<condition>`, `y_<condition>`) of 8-bit grey
/// images or a `<label>/<image>` folder.
pub(crate) struct LabelledSet {
    pub(crate) frames: Vec<Frame>,
    pub(crate) labels: Vec<i64>,
}

impl LabelledSet {
    /// Reads `x_<condition>` (uint8 [n, h, w] grey images, which must be of the card's input
    /// size) and `y_<condition>` (int64 class indices).
    pub(crate) fn from_npz(path: &Path, condition: &str, card: &ModelCard) -> Result<Self> {
        let mut npz = npyz::npz::NpzArchive::open(path)
            .with_context(|| format!("{}: cannot open", path.display()))?;
        let x = npz
            .by_name(&format!("x_{condition}"))
            .with_context(|| format!("{}: cannot read x_{condition}", path.display()))?
            .with_context(|| format!("{}: no array x_{condition}", path.display()))?;
        let shape = x.shape().to_vec();
        let images: Vec<u8> = x
            .into_vec()
            .with_context(|| format!("{}: x_{condition}: expected uint8", path.display()))?;
        let y = npz
            .by_name(&format!("y_{condition}"))
            .with_context(|| format!("{}: cannot read y_{condition}", path.display()))?
            .with_context(|| format!("{}: no array y_{condition}", path.display()))?;
        let labels: Vec<i64> = y
            .into_vec()
            .with_context(|| format!("{}: y_{condition}: expected int64", path.display()))?;
        ensure!(
            shape.len() == 3,
            "{}: x_{condition}: expected [n, h, w], found {shape:?}",
            path.display()
        );
        ensure!(
            shape[0] as usize == labels.len(),
            "{}: x/y_{condition}: counts differ",
            path.display()
        );
        let (h, w) = (shape[1] as usize, shape[2] as usize);
        let (ch, cw) = (card.input.height, card.input.width);
        ensure!(
            (h, w) == (ch, cw),
            "{}: x_{condition}: expected {ch}x{cw} images (the model card's input), found {h}x{w}",
            path.display()
        );
        let frames = images
            .chunks_exact((h * w).max(1))
            .map(|g| Frame::from_pixels(g.to_vec(), w, h, 1, &card.input))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("{}: x_{condition}", path.display()))?;
        Ok(Self { frames, labels })
    }

    pub(crate) fn len(&self) -> usize {
        self.labels.len()
    }

    /// Frame `i`.
    pub(crate) fn frame(&self, i: usize) -> &Frame {
        &self.frames[i]
    }
}

/// Image files a labelled folder may hold.
const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

impl LabelledSet {
    /// Reads a folder of labelled images, `<label>/<file>.{png,jpg,jpeg}`: each subfolder is
    /// named after one of the card's labels. Images are decoded and preprocessed by the card
    /// ([`Frame::load`]); hidden entries, loose files and other extensions are skipped. Folders
    /// and files are read in name order.
    pub(crate) fn from_folder(dir: &Path, card: &ModelCard) -> Result<Self> {
        let mut folders = sorted_entries(dir)?;
        folders.retain(|p| p.is_dir());
        let mut set = Self {
            frames: Vec::new(),
            labels: Vec::new(),
        };
        for folder in folders {
            let name = folder
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let Some(label) = card.labels.iter().position(|l| *l == name) else {
                anyhow::bail!(
                    "{}: label {name:?} is not in the model card (labels: {})",
                    folder.display(),
                    card.labels.join(", ")
                );
            };
            for file in sorted_entries(&folder)? {
                let is_image = file.is_file()
                    && file.extension().is_some_and(|e| {
                        IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x))
                    });
                if is_image {
                    set.frames.push(frame(&file, card)?);
                    set.labels.push(label as i64);
                }
            }
        }
        ensure!(
            !set.labels.is_empty(),
            "{}: no labelled images (expected <label>/<image>.png or .jpg, with labels from the \
             model card: {})",
            dir.display(),
            card.labels.join(", ")
        );
        Ok(set)
    }

    /// Appends another set made for the same card (a mixed set).
    pub(crate) fn extend(&mut self, other: Self) {
        self.frames.extend(other.frames);
        self.labels.extend(other.labels);
    }
}

/// Conditions an `.npz` archive holds: names `c` with both `x_<c>` and `y_<c>` arrays.
pub(crate) fn npz_conditions(path: &Path) -> Result<Vec<String>> {
    let npz = npyz::npz::NpzArchive::open(path)
        .with_context(|| format!("{}: cannot open", path.display()))?;
    let names: Vec<&str> = npz.array_names().collect();
    let mut conditions: Vec<String> = names
        .iter()
        .filter_map(|n| n.strip_prefix("x_"))
        .filter(|c| names.contains(&format!("y_{c}").as_str()))
        .map(str::to_owned)
        .collect();
    conditions.sort();
    Ok(conditions)
}

/// Non-hidden entries of a folder, sorted by name.
fn sorted_entries(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).with_context(|| format!("{}: cannot read", dir.display()))? {
        let e = e.with_context(|| format!("{}: cannot read", dir.display()))?;
        if !e.file_name().to_string_lossy().starts_with('.') {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}
