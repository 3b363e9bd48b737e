//! Images and labelled sets.

use std::path::Path;

use anyhow::{ensure, Context, Result};

use crate::card::Card;

/// Decodes an image file (PNG, JPEG), converts to 8-bit gray and resizes to the card's input.
pub(crate) fn load_gray(path: &Path, card: &Card) -> Result<Vec<u8>> {
    let img =
        image::open(path).with_context(|| format!("{}: cannot decode image", path.display()))?;
    let (h, w) = (card.input.shape[1] as u32, card.input.shape[2] as u32);
    let g = img.to_luma8();
    let g = if g.dimensions() == (w, h) {
        g
    } else {
        image::imageops::resize(&g, w, h, image::imageops::FilterType::Triangle)
    };
    Ok(g.into_raw())
}

/// A labelled set of 8-bit gray images from an `.npz` archive (`x_<condition>`, `y_<condition>`).
pub(crate) struct LabelledSet {
    pub(crate) images: Vec<u8>,
    pub(crate) labels: Vec<i64>,
    pub(crate) pixels: usize,
}

impl LabelledSet {
    pub(crate) fn from_npz(path: &Path, condition: &str) -> Result<Self> {
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
        Ok(Self {
            images,
            labels,
            pixels: (shape[1] * shape[2]) as usize,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.labels.len()
    }

    pub(crate) fn image(&self, i: usize) -> &[u8] {
        &self.images[i * self.pixels..(i + 1) * self.pixels]
    }
}
