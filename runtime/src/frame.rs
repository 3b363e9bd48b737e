//! Camera frames to model inputs: decode, orient, resize, normalise, lay out.
//!
//! One path for every command that classifies images, driven by a [`ModelCard`]'s input:
//! 1. [`Frame::load`] decodes a PNG or JPEG in colour (or as 8-bit luma for a grey card),
//!    applies the EXIF orientation a camera recorded, and brings it to the input's size by the
//!    card's resize rule with `fast_image_resize` (SIMD convolution, bilinear filter);
//! 2. [`Frame::tensor`] turns those 8-bit pixels into the input tensor: channel order (RGB or
//!    BGR, or luma replicated), `(p * scale - mean[c]) / std[c]`, NCHW or NHWC.
//!
//! Frames are kept as 8-bit pixels at the input size (a 224x224 colour frame is 150 KB), so a
//! labelled set or a calibration set costs a quarter of its f32 tensors.

use std::fmt;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::{DynamicImage, ImageDecoder, ImageReader};

use crate::card::{Colour, Input, Layout, ModelCard, Resize};

/// Why a frame could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameError {
    /// The image file (empty for frames built from memory).
    pub path: PathBuf,
    /// What went wrong.
    pub message: String,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.as_os_str().is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path.display(), self.message)
        }
    }
}

impl std::error::Error for FrameError {}

/// An 8-bit frame at a model's input size: luma (1 channel) or RGB (3, interleaved).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pixels: Vec<u8>,
    width: usize,
    height: usize,
    channels: usize,
}

impl Frame {
    /// Decodes an image file (PNG, JPEG; format from its content), applies its EXIF orientation
    /// and fits it to `input` (grey or RGB by the card's colour, resized by its rule).
    pub fn load(path: &Path, input: &Input) -> Result<Self, FrameError> {
        let fail = |message: String| FrameError {
            path: path.to_owned(),
            message,
        };
        let reader = ImageReader::open(path)
            .map_err(|e| fail(format!("cannot read: {e}")))?
            .with_guessed_format()
            .map_err(|e| fail(format!("cannot read: {e}")))?;
        let mut decoder = reader
            .into_decoder()
            .map_err(|e| fail(format!("cannot decode image (expected PNG or JPEG): {e}")))?;
        let orientation = decoder.orientation().ok();
        let mut img = DynamicImage::from_decoder(decoder)
            .map_err(|e| fail(format!("cannot decode image: {e}")))?;
        if let Some(o) = orientation {
            img.apply_orientation(o);
        }
        Self::from_image(img, input).map_err(|e| fail(e.message))
    }

    /// Fits a decoded image to `input`.
    pub fn from_image(img: DynamicImage, input: &Input) -> Result<Self, FrameError> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if input.colour == Colour::Grey {
            Self::from_pixels(img.to_luma8().into_raw(), w, h, 1, input)
        } else {
            Self::from_pixels(img.to_rgb8().into_raw(), w, h, 3, input)
        }
    }

    /// Fits 8-bit pixels (`channels` = 1 for luma or 3 for interleaved RGB, `width x height`) to
    /// `input`: a colour image for a grey card becomes luma, a grey one for a colour card RGB.
    pub fn from_pixels(
        pixels: Vec<u8>,
        width: usize,
        height: usize,
        channels: usize,
        input: &Input,
    ) -> Result<Self, FrameError> {
        let fail = |message: String| FrameError {
            path: PathBuf::new(),
            message,
        };
        if !matches!(channels, 1 | 3) || width == 0 || height == 0 {
            return Err(fail(format!(
                "expected a non-empty 1- or 3-channel image, found {width}x{height}x{channels}"
            )));
        }
        if width
            .checked_mul(height)
            .and_then(|n| n.checked_mul(channels))
            != Some(pixels.len())
        {
            return Err(fail(format!(
                "expected {width}x{height}x{channels} bytes, found {}",
                pixels.len()
            )));
        }
        let want = input.colour.channels();
        let pixels = match (channels, want) {
            (1, 3) => pixels.iter().flat_map(|&p| [p, p, p]).collect(),
            (3, 1) => pixels
                .chunks_exact(3)
                .map(|p| luma(p[0], p[1], p[2]))
                .collect(),
            _ => pixels,
        };
        let src = Self {
            pixels,
            width,
            height,
            channels: want,
        };
        src.fit(input).map_err(|m| fail(m.to_string()))
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The 8-bit pixels (luma, or interleaved RGB), row after row.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    /// Mean brightness and contrast (standard deviation) of the frame's luma, both in [0, 1].
    pub fn stats(&self) -> (f64, f64) {
        let luma: Vec<u8> = if self.channels == 1 {
            self.pixels.clone()
        } else {
            self.pixels
                .chunks_exact(3)
                .map(|p| luma(p[0], p[1], p[2]))
                .collect()
        };
        let n = luma.len().max(1) as f64;
        let mean = luma.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = luma
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean / 255.0, var.sqrt() / 255.0)
    }

    /// The model's input tensor for this frame (without batch), in the card's layout.
    pub fn tensor(&self, card: &ModelCard) -> Vec<f32> {
        let mut out = Vec::with_capacity(card.input_len());
        self.tensor_into(&card.input, &mut out);
        out
    }

    /// Appends the input tensor for this frame to `out` (e.g. to build a batch).
    ///
    /// # Panics
    /// If the frame was not made for `input` (another size).
    pub fn tensor_into(&self, input: &Input, out: &mut Vec<f32>) {
        assert_eq!(
            (self.width, self.height, self.channels),
            (input.width, input.height, input.colour.channels()),
            "frame made for another input"
        );
        let c = input.channels;
        // Pixel component feeding input channel `k`.
        let source: Vec<usize> = (0..c)
            .map(|k| match input.colour {
                Colour::Grey => 0,
                Colour::Rgb => k,
                Colour::Bgr => 2 - k,
            })
            .collect();
        let (scale, mean, std) = (input.scale, &input.mean, &input.std);
        let value = |p: u8, k: usize| (f32::from(p) * scale - mean[k]) / std[k];
        let step = self.channels;
        match input.layout {
            Layout::Nchw => {
                for (k, &s) in source.iter().enumerate() {
                    out.extend(self.pixels.chunks_exact(step).map(|px| value(px[s], k)));
                }
            }
            Layout::Nhwc => {
                for px in self.pixels.chunks_exact(step) {
                    out.extend((0..c).map(|k| value(px[source[k]], k)));
                }
            }
        }
    }

    /// Brings the frame to the input's size by its resize rule.
    fn fit(self, input: &Input) -> Result<Self, &'static str> {
        let (tw, th) = (input.width, input.height);
        let (sw, sh) = (self.width as f64, self.height as f64);
        match input.resize {
            Resize::Stretch => self.resized(tw, th, None),
            Resize::Crop => {
                // Shorter side to resize_to, then the centre (tw x th) of that, expressed as a
                // box of the source so only one resampling pass runs. Sizes and offsets round
                // half to even, as torchvision's Resize/CenterCrop (Python's round) do.
                let k = input.resize_to as f64 / sw.min(sh);
                let (rw, rh) = (
                    (sw * k).round_ties_even().max(1.0),
                    (sh * k).round_ties_even().max(1.0),
                );
                let (left, top) = (
                    ((rw - tw as f64) / 2.0).round_ties_even(),
                    ((rh - th as f64) / 2.0).round_ties_even(),
                );
                let (fx, fy) = (sw / rw, sh / rh);
                let crop = (left * fx, top * fy, tw as f64 * fx, th as f64 * fy);
                self.resized(tw, th, Some(crop))
            }
            Resize::Letterbox => {
                let k = (tw as f64 / sw).min(th as f64 / sh);
                let (rw, rh) = (
                    ((sw * k).round() as usize).clamp(1, tw),
                    ((sh * k).round() as usize).clamp(1, th),
                );
                let inner = self.resized(rw, rh, None)?;
                let ch = inner.channels;
                // Pad with the mean colour: those pixels are 0 after normalisation.
                let pad: Vec<u8> = (0..ch)
                    .map(|k| {
                        let m = match input.colour {
                            Colour::Bgr => input.mean[2 - k],
                            _ => input.mean[k.min(input.mean.len() - 1)],
                        };
                        (m / input.scale).round().clamp(0.0, 255.0) as u8
                    })
                    .collect();
                let mut pixels: Vec<u8> = pad.iter().copied().cycle().take(tw * th * ch).collect();
                let (x0, y0) = ((tw - rw) / 2, (th - rh) / 2);
                for y in 0..rh {
                    let dst = ((y0 + y) * tw + x0) * ch;
                    pixels[dst..dst + rw * ch]
                        .copy_from_slice(&inner.pixels[y * rw * ch..(y + 1) * rw * ch]);
                }
                Ok(Self {
                    pixels,
                    width: tw,
                    height: th,
                    channels: ch,
                })
            }
        }
    }

    /// Resamples (bilinear convolution) the whole frame, or `crop` (left, top, width, height in
    /// source pixels), to `w x h`. A frame already that size and uncropped is returned as is.
    fn resized(
        self,
        w: usize,
        h: usize,
        crop: Option<(f64, f64, f64, f64)>,
    ) -> Result<Self, &'static str> {
        let whole = crop.is_none_or(|(l, t, cw, ch)| {
            l == 0.0 && t == 0.0 && cw == self.width as f64 && ch == self.height as f64
        });
        if whole && (self.width, self.height) == (w, h) {
            return Ok(self);
        }
        let pixel = if self.channels == 1 {
            PixelType::U8
        } else {
            PixelType::U8x3
        };
        let dim = |n: usize| u32::try_from(n).map_err(|_| "image too large");
        let src = ImageRef::new(dim(self.width)?, dim(self.height)?, &self.pixels, pixel)
            .map_err(|_| "image buffer does not match its size")?;
        let mut dst = Image::new(dim(w)?, dim(h)?, pixel);
        let mut options =
            ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear));
        if let Some((l, t, cw, ch)) = crop {
            options = options.crop(l, t, cw, ch);
        }
        Resizer::new()
            .resize(&src, &mut dst, &options)
            .map_err(|_| "cannot resize the image")?;
        Ok(Self {
            pixels: dst.into_vec(),
            width: w,
            height: h,
            channels: self.channels,
        })
    }
}

/// 8-bit luma of an sRGB pixel, with the weights `image`'s `to_luma8` uses (ITU-R BT.709).
fn luma(r: u8, g: u8, b: u8) -> u8 {
    let l = 2126 * u32::from(r) + 7152 * u32::from(g) + 722 * u32::from(b);
    ((l + 5000) / 10000) as u8
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn card(extra: &str, shape: &str) -> ModelCard {
        let text = format!(
            r#"{{"labels": ["a"], "input": {{"shape": {shape}, "scale": 0.5, "mean": [1, 2, 3], "std": [2, 4, 8] {extra}}}}}"#
        );
        ModelCard::parse(&text, Path::new("card.json")).unwrap()
    }

    /// Two pixels (R, G, B) = (10, 20, 30) and (40, 50, 60), laid out by hand.
    const PIXELS: [u8; 6] = [10, 20, 30, 40, 50, 60];

    fn by_hand(v: u8, c: usize) -> f32 {
        (f32::from(v) * 0.5 - [1.0, 2.0, 3.0][c]) / [2.0, 4.0, 8.0][c]
    }

    #[test]
    fn rgb_nchw_and_bgr_nhwc_tensors_match_a_hand_layout() {
        let c = card(r#", "colour": "RGB""#, "[3, 1, 2]");
        let f = Frame::from_pixels(PIXELS.to_vec(), 2, 1, 3, &c.input).unwrap();
        let want: Vec<f32> = [(10, 0), (40, 0), (20, 1), (50, 1), (30, 2), (60, 2)]
            .iter()
            .map(|&(v, ch)| by_hand(v, ch))
            .collect();
        assert_eq!(f.tensor(&c), want);

        let c = card(r#", "colour": "BGR", "layout": "NHWC""#, "[1, 2, 3]");
        let f = Frame::from_pixels(PIXELS.to_vec(), 2, 1, 3, &c.input).unwrap();
        let want: Vec<f32> = [(30, 0), (20, 1), (10, 2), (60, 0), (50, 1), (40, 2)]
            .iter()
            .map(|&(v, ch)| by_hand(v, ch))
            .collect();
        assert_eq!(f.tensor(&c), want);
    }

    #[test]
    fn grey_cards_replicate_luma_with_the_image_crate_weights() {
        let c = card("", "[3, 1, 2]");
        let f = Frame::from_pixels(PIXELS.to_vec(), 2, 1, 3, &c.input).unwrap();
        let rgb = image::RgbImage::from_raw(2, 1, PIXELS.to_vec()).unwrap();
        let luma = image::DynamicImage::ImageRgb8(rgb).to_luma8().into_raw();
        assert_eq!(f.pixels(), &luma[..]);
        let t = f.tensor(&c);
        for ch in 0..3 {
            assert_eq!(
                t[ch * 2..ch * 2 + 2],
                [by_hand(luma[0], ch), by_hand(luma[1], ch)]
            );
        }
    }

    #[test]
    fn letterbox_pads_with_the_mean_and_crop_takes_the_centre() {
        // A 4x2 white frame into a 4x4 letterbox: rows 0 and 3 are padding (input value 0).
        let c = ModelCard::parse(
            r#"{"labels": ["a"], "input": {"shape": [1, 4, 4], "resize": "letterbox",
                "scale": 1, "mean": [100], "std": [1]}}"#,
            Path::new("card.json"),
        )
        .unwrap();
        let f = Frame::from_pixels(vec![255; 8], 4, 2, 1, &c.input).unwrap();
        let t = f.tensor(&c);
        assert!(t[..4].iter().chain(&t[12..]).all(|&v| v == 0.0), "{t:?}");
        assert!(t[4..12].iter().all(|&v| v == 155.0), "{t:?}");
        // Crop at scale 1: a 6x4 frame whose centre 4x4 is 1..=16 comes out unchanged.
        let c = ModelCard::parse(
            r#"{"labels": ["a"], "input": {"shape": [1, 4, 4], "resize": "crop",
                "resize_to": 4, "scale": 1}}"#,
            Path::new("card.json"),
        )
        .unwrap();
        let mut px = vec![0u8; 24];
        for y in 0..4 {
            for x in 0..4 {
                px[y * 6 + x + 1] = (y * 4 + x + 1) as u8;
            }
        }
        let f = Frame::from_pixels(px, 6, 4, 1, &c.input).unwrap();
        assert_eq!(f.pixels(), (1..=16).collect::<Vec<u8>>());
    }
}
