//! Camera frames to model inputs: decode, orient, resize, normalise, lay out.
//!
//! One path for every command that classifies images, driven by a [`ModelCard`]'s input:
//! 1. [`Frame::load`] decodes a PNG or JPEG in colour (or as 8-bit luma for a grey card),
//!    applies the EXIF orientation a camera recorded, and brings it to the input's size by the
//!    card's resize rule with `fast_image_resize` (SIMD convolution, bilinear filter);
//! 2. [`Frame::tensor`] turns those 8-bit pixels into the input tensor: channel order (RGB or
//!    BGR, or luma replicated), `(p * scale - mean[c]) / std[c]`, NCHW or NHWC.
//!
//! JPEGs are decoded by libjpeg-turbo's decoder (the copy `mozjpeg-sys` vendors and builds), with
//! its defaults (accurate integer IDCT, fancy upsampling): the pixels PIL (Pillow bundles
//! libjpeg-turbo) decodes, so a model sees what it saw in a numpy/PIL pipeline. Other formats
//! (and CMYK JPEGs) go through the `image` crate.
//!
//! A JPEG at least twice as large as the resize needs (on both sides) is scaled while it is
//! decoded, as PIL's `Image.draft` does: libjpeg's DCT scaling by 1/2, 1/4 or 1/8, the largest
//! reduction that leaves it at least as large as the size the resize rule resamples the whole
//! image to (the input's size to stretch; the shorter side at `resize_to` to crop; the fitted
//! size to letterbox), then the resize as usual. Scaling in the DCT skips most of the inverse
//! transform and colour conversion, which is what makes a 12 MP camera-trap photo cheap (a
//! 4000x3000 frame for a 224x224 input is decoded at 500x375).
//!
//! Frames are kept as 8-bit pixels at the input size (a 224x224 colour frame is 150 KB), so a
//! labelled set or a calibration set costs a quarter of its f32 tensors.

use std::fmt;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

use fast_image_resize::images::{Image, ImageRef};
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::metadata::Orientation;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageReader, RgbImage};

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
    ///
    /// JPEGs are decoded by libjpeg (scaled while decoding when much larger than the input
    /// needs; see the module docs). A corrupt or truncated file is an error naming it.
    pub fn load(path: &Path, input: &Input) -> Result<Self, FrameError> {
        let fail = |message: String| FrameError {
            path: path.to_owned(),
            message,
        };
        let data = std::fs::read(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let img = match decode_jpeg(&data, input).map_err(fail)? {
            Some(img) => img,
            None => {
                let reader = ImageReader::new(Cursor::new(data))
                    .with_guessed_format()
                    .map_err(|e| fail(format!("cannot read: {e}")))?;
                let mut decoder = reader.into_decoder().map_err(|e| {
                    fail(format!("cannot decode image (expected PNG or JPEG): {e}"))
                })?;
                let orientation = decoder.orientation().ok();
                let mut img = DynamicImage::from_decoder(decoder)
                    .map_err(|e| fail(format!("cannot decode image: {e}")))?;
                if let Some(o) = orientation {
                    img.apply_orientation(o);
                }
                img
            }
        };
        Self::from_image(img, input).map_err(|e| fail(e.message))
    }

    /// Fits a decoded image to `input`.
    pub fn from_image(img: DynamicImage, input: &Input) -> Result<Self, FrameError> {
        let (w, h) = (img.width() as usize, img.height() as usize);
        if input.colour == Colour::Grey {
            Self::from_pixels(img.into_luma8().into_raw(), w, h, 1, input)
        } else {
            Self::from_pixels(img.into_rgb8().into_raw(), w, h, 3, input)
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
        let (rw, rh) = resampled_size(input, sw, sh);
        match input.resize {
            Resize::Stretch => self.resized(tw, th, None),
            Resize::Crop => {
                // Shorter side to resize_to, then the centre (tw x th) of that, expressed as a
                // box of the source so only one resampling pass runs. Offsets round half to
                // even, as the sizes do.
                let (left, top) = (
                    ((rw - tw as f64) / 2.0).round_ties_even(),
                    ((rh - th as f64) / 2.0).round_ties_even(),
                );
                let (fx, fy) = (sw / rw, sh / rh);
                let crop = (left * fx, top * fy, tw as f64 * fx, th as f64 * fy);
                self.resized(tw, th, Some(crop))
            }
            Resize::Letterbox => {
                let (rw, rh) = (rw as usize, rh as usize);
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

/// The size (width, height) the input's resize rule resamples a whole `sw x sh` image to, before
/// any crop or padding: the input's size to stretch; the shorter side at `resize_to` to crop
/// (sizes round half to even, as torchvision's Resize/CenterCrop, Python's round, do); the
/// largest size that fits the input to letterbox.
fn resampled_size(input: &Input, sw: f64, sh: f64) -> (f64, f64) {
    let (tw, th) = (input.width as f64, input.height as f64);
    match input.resize {
        Resize::Stretch => (tw, th),
        Resize::Crop => {
            let k = input.resize_to as f64 / sw.min(sh);
            (
                (sw * k).round_ties_even().max(1.0),
                (sh * k).round_ties_even().max(1.0),
            )
        }
        Resize::Letterbox => {
            let k = (tw / sw).min(th / sh);
            (
                (sw * k).round().clamp(1.0, tw),
                (sh * k).round().clamp(1.0, th),
            )
        }
    }
}

/// libjpeg's DCT scaling for a `w x h` JPEG whose resize needs `need_w x need_h`: the largest
/// of 8, 4, 2 that divides neither side below what is needed (PIL's `Image.draft`), else 1.
/// The image is decoded at `ceil(w / d) x ceil(h / d)`.
fn draft_denominator(w: usize, h: usize, need_w: usize, need_h: usize) -> usize {
    let room = (w / need_w.max(1)).min(h / need_h.max(1));
    [8, 4, 2].into_iter().find(|&d| d <= room).unwrap_or(1)
}

/// Decodes a JPEG (by its SOI marker) with libjpeg for `input`, with the EXIF orientation
/// applied; `None` when `data` is no JPEG or one libjpeg cannot give as RGB or grey (CMYK),
/// for the `image` crate.
fn decode_jpeg(data: &[u8], input: &Input) -> Result<Option<DynamicImage>, String> {
    if !data.starts_with(&[0xFF, 0xD8, 0xFF]) {
        return Ok(None);
    }
    let mut orientation = None;
    let decoded = libjpeg::decode(data, &mut |w, h, exif| {
        orientation = exif.and_then(Orientation::from_exif_chunk);
        // What the resize needs, in the stored (unrotated) axes.
        let turned = matches!(
            orientation,
            Some(
                Orientation::Rotate90
                    | Orientation::Rotate270
                    | Orientation::Rotate90FlipH
                    | Orientation::Rotate270FlipH
            )
        );
        let (ow, oh) = if turned { (h, w) } else { (w, h) };
        let (nw, nh) = resampled_size(input, ow as f64, oh as f64);
        let (nw, nh) = if turned { (nh, nw) } else { (nw, nh) };
        draft_denominator(w, h, nw as usize, nh as usize)
    })
    .map_err(|e| format!("cannot decode JPEG: {e}"))?;
    let Some(d) = decoded else {
        return Ok(None);
    };
    let size = |n: usize| u32::try_from(n).map_err(|_| "image too large".to_string());
    let (w, h) = (size(d.width)?, size(d.height)?);
    let mut img = if d.channels == 1 {
        GrayImage::from_raw(w, h, d.pixels).map(DynamicImage::ImageLuma8)
    } else {
        RgbImage::from_raw(w, h, d.pixels).map(DynamicImage::ImageRgb8)
    }
    .ok_or("libjpeg gave fewer pixels than the image's size")?;
    if let Some(o) = orientation {
        img.apply_orientation(o);
    }
    Ok(Some(img))
}

/// libjpeg's decoder behind one safe function.
///
/// libjpeg reports a fatal error by calling the error manager's `error_exit`, which must not
/// return. Ours unwinds (`resume_unwind`, which does not run the panic hook, so nothing is
/// printed) back through the C frames (built with `-fexceptions` by `mozjpeg-sys`'s
/// `unwinding` feature) to a `catch_unwind` here, which turns it into the message. Warnings
/// about corrupt data are ignored as PIL ignores them, except the one for data running out: a
/// truncated file is an error (libjpeg would pad it with grey).
#[allow(unsafe_code)]
mod libjpeg {
    use std::ffi::{c_int, c_ulong};
    use std::mem;
    use std::panic::{self, AssertUnwindSafe};
    use std::string::{String, ToString};
    use std::vec::Vec;

    use mozjpeg_sys as ffi;

    /// Decoded 8-bit pixels: luma (1 channel) or RGB (3, interleaved), row after row.
    pub(super) struct Decoded {
        pub(super) pixels: Vec<u8>,
        pub(super) width: usize,
        pub(super) height: usize,
        pub(super) channels: usize,
    }

    /// What `error_exit` unwinds with.
    struct Failure(String);

    /// Picks the scale denominator (1, 2, 4 or 8) from the stored width and height and the Exif
    /// chunk, once the header is read.
    pub(super) type Scale<'a> = dyn FnMut(usize, usize, Option<&[u8]>) -> usize + 'a;

    /// Decodes `data`, scaled by `1 / scale(width, height, exif)` (1, 2, 4 or 8), where `exif`
    /// is the APP1 Exif chunk (from its TIFF header). `None` for colour spaces other than grey,
    /// YCbCr and RGB (CMYK, YCCK).
    pub(super) fn decode(data: &[u8], scale: &mut Scale<'_>) -> Result<Option<Decoded>, String> {
        let len = c_ulong::try_from(data.len()).map_err(|_| "file too large".to_string())?;
        // SAFETY: both are C structs of integers, raw pointers and `Option`s of function
        // pointers, for which all zeros is a valid value (the state libjpeg's own `memset`
        // leaves before `jpeg_std_error` and `jpeg_create_decompress` fill them in).
        let (mut err, mut cinfo) = unsafe {
            (
                Box::new(mem::zeroed::<ffi::jpeg_error_mgr>()),
                Box::new(mem::zeroed::<ffi::jpeg_decompress_struct>()),
            )
        };
        // SAFETY: `err` is a valid, exclusively borrowed error manager.
        unsafe { ffi::jpeg_std_error(&mut err) };
        err.error_exit = Some(error_exit);
        err.emit_message = Some(emit_message);
        cinfo.common.err = &mut *err;
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `cinfo` is zeroed with a valid error manager that outlives it; `data`
            // outlives the decoding (the source only reads it).
            unsafe {
                ffi::jpeg_create_decompress(&mut *cinfo);
                ffi::jpeg_mem_src(&mut cinfo, data.as_ptr(), len);
                run(&mut cinfo, scale)
            }
        }));
        // SAFETY: `cinfo` was created above (or is still zeroed, for which destroying is a
        // no-op: it frees nothing when the memory manager is null); nothing uses it after.
        unsafe { ffi::jpeg_destroy_decompress(&mut cinfo) };
        match result {
            Ok(r) => Ok(r),
            Err(payload) => match payload.downcast::<Failure>() {
                Ok(f) => Err(f.0),
                Err(other) => panic::resume_unwind(other),
            },
        }
    }

    /// Reads the header, picks the scale and reads every scanline.
    ///
    /// # Safety
    /// `cinfo` is a created decompressor with a source.
    unsafe fn run(
        cinfo: &mut ffi::jpeg_decompress_struct,
        scale: &mut Scale<'_>,
    ) -> Option<Decoded> {
        // SAFETY: the caller's contract; the marker list is libjpeg's, valid until destroy.
        unsafe {
            ffi::jpeg_save_markers(cinfo, 0xE1, 0xFFFF);
            ffi::jpeg_read_header(cinfo, 1);
            let grey = match cinfo.jpeg_color_space {
                ffi::JCS_GRAYSCALE => true,
                ffi::JCS_YCbCr | ffi::JCS_RGB => false,
                _ => return None,
            };
            let mut exif = None;
            let mut m = cinfo.marker_list;
            while let Some(marker) = m.as_ref() {
                let bytes = std::slice::from_raw_parts(marker.data, marker.data_length as usize);
                if marker.marker == 0xE1 && exif.is_none() {
                    exif = bytes.strip_prefix(b"Exif\0\0");
                }
                m = marker.next;
            }
            let d = scale(
                cinfo.image_width as usize,
                cinfo.image_height as usize,
                exif,
            );
            cinfo.scale_num = 1;
            cinfo.scale_denom = d as _;
            cinfo.out_color_space = if grey {
                ffi::JCS_GRAYSCALE
            } else {
                ffi::JCS_RGB
            };
            ffi::jpeg_start_decompress(cinfo);
            let (width, height) = (cinfo.output_width as usize, cinfo.output_height as usize);
            let channels = cinfo.output_components as usize;
            let stride = width * channels;
            let mut pixels = Vec::new();
            if pixels.try_reserve_exact(stride * height).is_err() {
                fail("image too large for memory");
            }
            pixels.resize(stride * height, 0);
            while (cinfo.output_scanline as usize) < height {
                let y = cinfo.output_scanline as usize;
                let mut row = pixels[y * stride..].as_mut_ptr();
                if ffi::jpeg_read_scanlines(cinfo, &mut row, 1) == 0 {
                    fail("libjpeg stopped before the last row");
                }
            }
            Some(Decoded {
                pixels,
                width,
                height,
                channels,
            })
        }
    }

    /// Ends the decoding with `message` (caught in [`decode`]).
    fn fail(message: &str) -> ! {
        panic::resume_unwind(Box::new(Failure(message.to_string())))
    }

    /// libjpeg's fatal errors: its message, then unwind (it must not return).
    extern "C-unwind" fn error_exit(cinfo: &mut ffi::jpeg_common_struct) {
        let mut buffer = [0u8; 80];
        // SAFETY: `err` is the manager set up in `decode`; `format_message` writes at most 80
        // bytes (JMSG_LENGTH_MAX), NUL included, into the buffer it is given. It is declared
        // as taking `&[u8; 80]` but writes to it, so it is called through a `*mut u8` type
        // (the same C ABI).
        unsafe {
            if let Some(format) = (*cinfo.err).format_message {
                let format: unsafe extern "C-unwind" fn(&mut ffi::jpeg_common_struct, *mut u8) =
                    mem::transmute(format);
                format(cinfo, buffer.as_mut_ptr());
            }
        }
        let end = buffer.iter().position(|&b| b == 0).unwrap_or(buffer.len());
        fail(&String::from_utf8_lossy(&buffer[..end]))
    }

    /// libjpeg's warnings (level -1) and trace messages: a premature end of data is a
    /// truncated file; other warnings are counted and decoding goes on, as in PIL.
    extern "C-unwind" fn emit_message(cinfo: &mut ffi::jpeg_common_struct, level: c_int) {
        if level < 0 {
            // SAFETY: `err` is the manager set up in `decode`, only used on this thread.
            let err = unsafe { &mut *cinfo.err };
            if err.msg_code == ffi::JWRN_JPEG_EOF as c_int {
                fail("the file is truncated");
            }
            err.num_warnings += 1;
        }
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

    /// A `w x h` colour JPEG (quality 90, 4:2:0) of a smooth gradient.
    fn jpeg(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([
                (x * 255 / w) as u8,
                (y * 255 / h) as u8,
                ((x + y) % 256) as u8,
            ])
        });
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
            .encode_image(&img)
            .unwrap();
        out
    }

    fn stretch(w: usize, h: usize) -> Input {
        let text =
            format!(r#"{{"labels": ["a"], "input": {{"shape": [3, {h}, {w}], "colour": "RGB"}}}}"#);
        ModelCard::parse(&text, Path::new("card.json"))
            .unwrap()
            .input
    }

    #[test]
    fn draft_takes_the_largest_reduction_that_leaves_what_the_resize_needs() {
        assert_eq!(draft_denominator(4000, 3000, 224, 224), 8);
        assert_eq!(draft_denominator(768, 576, 224, 224), 2);
        assert_eq!(draft_denominator(768, 576, 192, 144), 4);
        assert_eq!(draft_denominator(768, 576, 193, 144), 2);
        assert_eq!(draft_denominator(447, 447, 224, 224), 1);
        assert_eq!(draft_denominator(224, 224, 224, 224), 1);
        assert_eq!(draft_denominator(100, 100, 224, 224), 1);
    }

    #[test]
    fn large_jpegs_are_scaled_while_decoding_and_never_below_the_need() {
        let data = jpeg(640, 480);
        let size = |input: &Input| {
            let img = decode_jpeg(&data, input).unwrap().unwrap();
            (img.width(), img.height())
        };
        // Stretch to 80x60: 1/8; to 81x60: 1/4 (160x120); whole at 640x480 and above.
        assert_eq!(size(&stretch(80, 60)), (80, 60));
        assert_eq!(size(&stretch(81, 60)), (160, 120));
        assert_eq!(size(&stretch(320, 60)), (320, 240));
        assert_eq!(size(&stretch(321, 60)), (640, 480));
        // Crop: the shorter side at resize_to (130 → 173x130 needed: 1/2, 320x240).
        let crop = ModelCard::parse(
            r#"{"labels": ["a"], "input": {"shape": [3, 112, 112], "colour": "RGB",
                "resize": "crop", "resize_to": 130}}"#,
            Path::new("card.json"),
        )
        .unwrap()
        .input;
        assert_eq!(size(&crop), (320, 240));
        // The frame itself comes out at the input's size either way.
        let file = tempfile::Builder::new()
            .prefix("bitdelta-frame-")
            .suffix(".jpg")
            .tempfile()
            .unwrap();
        std::fs::write(file.path(), &data).unwrap();
        let f = Frame::load(file.path(), &stretch(81, 60));
        assert_eq!(f.map(|f| (f.width(), f.height())), Ok((81, 60)));
    }

    #[test]
    fn truncated_and_corrupt_jpegs_are_errors() {
        let data = jpeg(64, 48);
        let input = stretch(64, 48);
        assert!(decode_jpeg(&data, &input).unwrap().is_some());
        let cut = decode_jpeg(&data[..data.len() / 2], &input).unwrap_err();
        assert!(cut.contains("truncated"), "{cut}");
        let bad = decode_jpeg(b"\xFF\xD8\xFF\xC0\x00\x01garbage", &input).unwrap_err();
        assert!(bad.starts_with("cannot decode JPEG: "), "{bad}");
        assert!(
            bad.len() > "cannot decode JPEG: ".len(),
            "libjpeg's message: {bad}"
        );
        // Not a JPEG: left to the image crate.
        assert_eq!(decode_jpeg(b"\x89PNG\r\n\x1a\n", &input), Ok(None));
    }
}
