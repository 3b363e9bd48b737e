//! Model cards: what a model's input and output mean (`model-card.json`).
//!
//! A card names the labels, how a camera frame becomes the model's input tensor and what the
//! output is. Every command that feeds images to a model (`run`, `serve`, `eval`, `demo`,
//! `compress --calib`, the store's activation self-test) reads the same card through
//! [`ModelCard::load`] and preprocesses through [`crate::frame`], so a colour model is never
//! fed grey frames by one command and colour by another.
//!
//! Keys (version 2; scripts write cards, so these names are a contract):
//!
//! | key | values | default |
//! |---|---|---|
//! | `labels` | class names, in output order | required |
//! | `input.name` | the model's input name | the model's first input |
//! | `input.shape` | `[C, H, W]` (NCHW) or `[H, W, C]` (NHWC), without batch | required |
//! | `input.layout` | `"NCHW"` or `"NHWC"` | `"NCHW"` |
//! | `input.dtype` | `"f32"` or `"f16"` | `"f32"` |
//! | `input.colour` | `"RGB"`, `"BGR"` or `"grey"` | `"grey"` (luma replicated to every channel) |
//! | `input.resize` | `"stretch"`, `"crop"` or `"letterbox"` | `"stretch"` |
//! | `input.resize_to` | with `crop`: the shorter side before the centre crop | the shape's shorter side |
//! | `input.scale` | pixel multiplier (`1/255`, `1/127.5`, `1`) | `1/255` |
//! | `input.mean`, `input.std` | one per channel of the colour space, in its order (or one for all) | `0`, `1` |
//! | `output.name` | the model's output name | the model's first output |
//! | `output.classes` | number of classes | `labels.len()` |
//! | `output.kind` | `"logits"` or `"probabilities"` | `"logits"` |
//! | `golden` | `[{"image", "label", "variants"}]` for the activation self-test | none |
//!
//! A card without `input.colour` means what cards meant before these keys existed: 8-bit grey
//! replicated to the channels, NCHW, stretched, f32, logits.
//!
//! The input value of channel `c` of pixel `p` is `(p * scale - mean[c]) / std[c]`.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::string::{String, ToString};
use std::vec::Vec;

use serde::Deserialize;

use crate::onnx::{graph_io, GraphValue};

/// Memory layout of the input tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Layout {
    /// `[batch, channels, height, width]` (torch exports).
    #[default]
    Nchw,
    /// `[batch, height, width, channels]` (TensorFlow / tf2onnx exports).
    Nhwc,
}

/// Colour space the model was trained on, in channel order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Colour {
    /// Red, green, blue.
    Rgb,
    /// Blue, green, red (Caffe-era models).
    Bgr,
    /// 8-bit luma, replicated to every input channel.
    #[default]
    Grey,
}

impl Colour {
    /// Channels of the colour space.
    pub const fn channels(self) -> usize {
        match self {
            Colour::Rgb | Colour::Bgr => 3,
            Colour::Grey => 1,
        }
    }
}

/// How a frame of another size is brought to the input's height and width.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Resize {
    /// Scale both sides to the input size (the aspect ratio changes).
    #[default]
    Stretch,
    /// Scale the shorter side to `resize_to`, then take the centre of the input's size.
    Crop,
    /// Scale the longer side to fit, centre, and pad with the mean colour (input value 0).
    Letterbox,
}

/// Element type of the input tensor.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DType {
    /// 32-bit float.
    #[default]
    F32,
    /// IEEE half float.
    F16,
}

/// What the model's output holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OutputKind {
    /// Unnormalised scores: the runtime applies a softmax.
    #[default]
    Logits,
    /// Probabilities already (the model ends in a softmax): used as they are.
    Probabilities,
}

/// The input side of a card, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Input {
    /// The model's input name, when the card gives one.
    pub name: Option<String>,
    /// Height and width of the input in pixels.
    pub height: usize,
    /// Width in pixels.
    pub width: usize,
    /// Channels of the input tensor.
    pub channels: usize,
    /// Tensor layout.
    pub layout: Layout,
    /// Element type.
    pub dtype: DType,
    /// Colour space, in channel order.
    pub colour: Colour,
    /// Resize rule.
    pub resize: Resize,
    /// With [`Resize::Crop`]: the shorter side before the centre crop.
    pub resize_to: usize,
    /// Pixel multiplier.
    pub scale: f32,
    /// Per input channel (already expanded to `channels` values).
    pub mean: Vec<f32>,
    /// Per input channel (already expanded to `channels` values).
    pub std: Vec<f32>,
}

/// The output side of a card.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    /// The model's output name, when the card gives one.
    pub name: Option<String>,
    /// Number of classes.
    pub classes: usize,
    /// Logits or probabilities.
    pub kind: OutputKind,
}

/// One golden input: `image` (relative to the card's folder) must be classified as `label`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct Golden {
    /// Image path, relative to the card's folder.
    pub image: PathBuf,
    /// The label the model must give.
    pub label: String,
    /// Variants this applies to (`"base"` for the base model); empty = every model.
    #[serde(default)]
    pub variants: Vec<String>,
}

/// A checked model card.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelCard {
    /// Class names in output order.
    pub labels: Vec<String>,
    /// Input description.
    pub input: Input,
    /// Output description.
    pub output: Output,
    /// Golden inputs for the activation self-test.
    pub golden: Vec<Golden>,
}

/// Why a card was refused: the file, the key and what was expected and found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CardError {
    /// The card file (or `<card>` when parsed from text).
    pub file: PathBuf,
    /// The offending key (`input.layout`), empty for the whole file.
    pub key: String,
    /// What was expected and found.
    pub message: String,
}

impl fmt::Display for CardError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}: {}: {}", self.file.display(), self.key, self.message)
        }
    }
}

impl std::error::Error for CardError {}

#[derive(Deserialize)]
struct RawCard {
    labels: Option<Vec<String>>,
    input: Option<RawInput>,
    #[serde(default)]
    output: RawOutput,
    #[serde(default)]
    golden: Vec<Golden>,
}

#[derive(Deserialize)]
struct RawInput {
    name: Option<String>,
    shape: Option<Vec<i64>>,
    layout: Option<String>,
    dtype: Option<String>,
    colour: Option<String>,
    resize: Option<String>,
    resize_to: Option<i64>,
    scale: Option<f32>,
    mean: Option<Vec<f32>>,
    std: Option<Vec<f32>>,
}

#[derive(Default, Deserialize)]
struct RawOutput {
    name: Option<String>,
    classes: Option<i64>,
    kind: Option<String>,
}

/// A card value spelled as one of a few words; an absent key means the `Default` variant.
trait Keyword: Copy + Default + 'static {
    /// The accepted spellings (case-insensitive), in the order errors list them.
    const WORDS: &'static [(&'static str, Self)];
}

impl Keyword for Layout {
    const WORDS: &'static [(&'static str, Self)] = &[("NCHW", Self::Nchw), ("NHWC", Self::Nhwc)];
}

impl Keyword for DType {
    const WORDS: &'static [(&'static str, Self)] = &[("f32", Self::F32), ("f16", Self::F16)];
}

impl Keyword for Colour {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("RGB", Self::Rgb),
        ("BGR", Self::Bgr),
        ("grey", Self::Grey),
        ("gray", Self::Grey),
    ];
}

impl Keyword for Resize {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("stretch", Self::Stretch),
        ("crop", Self::Crop),
        ("letterbox", Self::Letterbox),
    ];
}

impl Keyword for OutputKind {
    const WORDS: &'static [(&'static str, Self)] = &[
        ("logits", Self::Logits),
        ("probabilities", Self::Probabilities),
    ];
}

/// One of `T::WORDS` (case-insensitive), the default when absent, or an error listing them.
fn one_of<T: Keyword>(value: Option<&str>) -> Result<T, String> {
    let options = T::WORDS;
    let Some(v) = value else {
        return Ok(T::default());
    };
    options
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case(v))
        .map(|&(_, t)| t)
        .ok_or_else(|| {
            let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
            format!("expected one of {}, found {v:?}", names.join(", "))
        })
}

impl ModelCard {
    /// Reads and checks a card file.
    pub fn load(path: &Path) -> Result<Self, CardError> {
        let text = std::fs::read_to_string(path).map_err(|e| CardError {
            file: path.to_owned(),
            key: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&text, path)
    }

    /// Parses and checks a card's JSON text; `file` names it in errors.
    pub fn parse(text: &str, file: &Path) -> Result<Self, CardError> {
        let err = |key: &str, message: String| CardError {
            file: file.to_owned(),
            key: key.to_string(),
            message,
        };
        let raw: RawCard = serde_json::from_str(text)
            .map_err(|e| err("", format!("not a valid model card: {e}")))?;
        let labels = raw.labels.ok_or_else(|| {
            err(
                "labels",
                "expected a list of class names, found none".into(),
            )
        })?;
        if labels.is_empty() {
            return Err(err("labels", "expected at least one label".into()));
        }
        let i = raw
            .input
            .ok_or_else(|| err("input", "expected the input description, found none".into()))?;
        let layout: Layout = one_of(i.layout.as_deref()).map_err(|m| err("input.layout", m))?;
        let dtype: DType = one_of(i.dtype.as_deref()).map_err(|m| err("input.dtype", m))?;
        let colour: Colour = one_of(i.colour.as_deref()).map_err(|m| err("input.colour", m))?;
        let resize: Resize = one_of(i.resize.as_deref()).map_err(|m| err("input.resize", m))?;
        let shape = i.shape.ok_or_else(|| {
            err(
                "input.shape",
                "expected [channels, height, width] (or [height, width, channels] with NHWC), \
                 found none"
                    .into(),
            )
        })?;
        let dims: Vec<usize> = shape
            .iter()
            .map(|&d| usize::try_from(d).ok().filter(|&d| d > 0 && d <= 1 << 16))
            .collect::<Option<_>>()
            .filter(|d: &Vec<usize>| d.len() == 3)
            .ok_or_else(|| {
                let what = match layout {
                    Layout::Nchw => "[channels, height, width]",
                    Layout::Nhwc => "[height, width, channels]",
                };
                err(
                    "input.shape",
                    format!("expected {what} of positive sizes, found {shape:?}"),
                )
            })?;
        let (channels, height, width) = match layout {
            Layout::Nchw => (dims[0], dims[1], dims[2]),
            Layout::Nhwc => (dims[2], dims[0], dims[1]),
        };
        if colour != Colour::Grey && channels != 3 {
            return Err(err(
                "input.shape",
                format!("expected 3 channels for {colour:?} input, found {channels}"),
            ));
        }
        let short = height.min(width);
        let resize_to = match i.resize_to {
            None => short,
            Some(r) => match usize::try_from(r) {
                Ok(r) if r >= short && r <= 1 << 16 => r,
                _ => {
                    return Err(err(
                        "input.resize_to",
                        format!(
                            "expected at least the input's shorter side ({short} pixels), found {r}"
                        ),
                    ))
                }
            },
        };
        let per_channel = |key: &str, v: Option<Vec<f32>>, default: f32| {
            let v = v.unwrap_or_else(|| vec![default]);
            let n = colour.channels();
            let expanded = match v.len() {
                1 => vec![v[0]; channels],
                len if len == n || (colour == Colour::Grey && len == channels) => {
                    if colour == Colour::Grey && len != channels {
                        vec![v[0]; channels]
                    } else {
                        v.clone()
                    }
                }
                len => {
                    return Err(err(
                        key,
                        format!(
                            "expected {n} value{} (one per channel of {colour:?}), found {len}",
                            if n == 1 { "" } else { "s" }
                        ),
                    ))
                }
            };
            if expanded.iter().any(|x| !x.is_finite()) {
                return Err(err(key, format!("expected finite values, found {v:?}")));
            }
            Ok(expanded)
        };
        let mean = per_channel("input.mean", i.mean, 0.0)?;
        let std = per_channel("input.std", i.std, 1.0)?;
        if std.contains(&0.0) {
            return Err(err(
                "input.std",
                format!("expected non-zero values, found {std:?}"),
            ));
        }
        let scale = i.scale.unwrap_or(1.0 / 255.0);
        if !scale.is_finite() || scale == 0.0 {
            return Err(err(
                "input.scale",
                format!("expected a finite non-zero number, found {scale}"),
            ));
        }
        let kind: OutputKind =
            one_of(raw.output.kind.as_deref()).map_err(|m| err("output.kind", m))?;
        let classes = match raw.output.classes {
            None => labels.len(),
            Some(c) if c == labels.len() as i64 => labels.len(),
            Some(c) => {
                return Err(err(
                    "output.classes",
                    format!("expected {} (one per label), found {c}", labels.len()),
                ))
            }
        };
        for g in &raw.golden {
            if !labels.contains(&g.label) {
                return Err(err(
                    "golden",
                    format!(
                        "input {}: label {:?} is not one of the labels",
                        g.image.display(),
                        g.label
                    ),
                ));
            }
            if !g.image.is_relative()
                || !g
                    .image
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)))
            {
                return Err(err(
                    "golden",
                    format!(
                        "input {}: expected a path relative to the card's folder",
                        g.image.display()
                    ),
                ));
            }
        }
        Ok(Self {
            labels,
            input: Input {
                name: i.name,
                height,
                width,
                channels,
                layout,
                dtype,
                colour,
                resize,
                resize_to,
                scale,
                mean,
                std,
            },
            output: Output {
                name: raw.output.name,
                classes,
                kind,
            },
            golden: raw.golden,
        })
    }

    /// The model's input shape with batch 1, in the card's layout.
    pub fn batch1_shape(&self) -> Vec<usize> {
        let i = &self.input;
        match i.layout {
            Layout::Nchw => vec![1, i.channels, i.height, i.width],
            Layout::Nhwc => vec![1, i.height, i.width, i.channels],
        }
    }

    /// The input type a tract engine gives the model, as the card's `input.dtype` declares it.
    #[cfg(feature = "tract")]
    pub fn input_type(&self) -> crate::tract::InputType {
        match self.input.dtype {
            DType::F32 => crate::tract::InputType::F32,
            DType::F16 => crate::tract::InputType::F16,
        }
    }

    /// Values in one input tensor.
    pub fn input_len(&self) -> usize {
        self.input.channels * self.input.height * self.input.width
    }

    /// Checks the card against an ONNX model's declared input and output (names, shape, element
    /// type), without loading the model. `card` names the card file in errors.
    pub fn check_model(&self, onnx: &[u8], card: &Path, model: &Path) -> Result<(), CardError> {
        let err = |key: &str, message: String| CardError {
            file: card.to_owned(),
            key: key.to_string(),
            message,
        };
        let (inputs, outputs) = graph_io(onnx).map_err(|e| CardError {
            file: model.to_owned(),
            key: String::new(),
            message: e.to_string(),
        })?;
        let pick = |values: &[GraphValue], name: &Option<String>, key: &str| {
            let names = || {
                values
                    .iter()
                    .map(|v| format!("{:?}", v.name))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            match name {
                Some(n) => values
                    .iter()
                    .find(|v| &v.name == n)
                    .cloned()
                    .ok_or_else(|| {
                        err(
                            key,
                            format!(
                                "expected one of the model's names ({}), found {n:?}",
                                names()
                            ),
                        )
                    }),
                None => values
                    .first()
                    .cloned()
                    .ok_or_else(|| err(key, format!("{} declares no such value", model.display()))),
            }
        };
        let input = pick(&inputs, &self.input.name, "input.name")?;
        let want = self.batch1_shape();
        let fits = input.dims.len() == want.len()
            && input
                .dims
                .iter()
                .zip(&want)
                .enumerate()
                .all(|(k, (d, w))| d.is_none_or(|d| d as usize == *w || (k == 0 && d >= 1)));
        if !fits {
            let dims: Vec<String> = input
                .dims
                .iter()
                .map(|d| d.map_or("?".to_string(), |d| d.to_string()))
                .collect();
            return Err(err(
                "input.shape",
                format!(
                    "expected the model's input {:?} [{}] ({:?} layout, without batch), found {:?}",
                    input.name,
                    dims.join(", "),
                    self.input.layout,
                    &want[1..]
                ),
            ));
        }
        let model_dtype = match input.elem_type {
            10 => Some(DType::F16),
            1 => Some(DType::F32),
            _ => None,
        };
        if let Some(t) = model_dtype {
            if t != self.input.dtype {
                return Err(err(
                    "input.dtype",
                    format!(
                        "the model's input {:?} is {}, found {:?}",
                        input.name,
                        if t == DType::F16 { "f16" } else { "f32" },
                        if self.input.dtype == DType::F16 {
                            "f16"
                        } else {
                            "f32"
                        }
                    ),
                ));
            }
        }
        let output = pick(&outputs, &self.output.name, "output.name")?;
        if let Some(Some(n)) = output.dims.last() {
            if *n as usize != self.output.classes {
                return Err(err(
                    "output.classes",
                    format!(
                        "the model's output {:?} has {n} classes, the card {}",
                        output.name, self.output.classes
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Class scores of one output: a softmax of logits, or probabilities as they are.
    pub fn scores(&self, output: &[f32]) -> Vec<f32> {
        match self.output.kind {
            OutputKind::Logits => softmax(output),
            OutputKind::Probabilities => output.to_vec(),
        }
    }
}

/// Index of the largest value (first one on ties), or `None` for an empty slice.
pub fn argmax(v: &[f32]) -> Option<usize> {
    v.iter()
        .enumerate()
        .fold(None, |best: Option<(usize, f32)>, (i, &x)| match best {
            Some((_, b)) if b >= x => best,
            _ => Some((i, x)),
        })
        .map(|(i, _)| i)
}

/// Softmax in f64 (numerically stable), as f32 probabilities.
pub fn softmax(v: &[f32]) -> Vec<f32> {
    let m = v.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = v.iter().map(|&x| (x as f64 - m).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|x| (x / s) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ModelCard, CardError> {
        ModelCard::parse(text, Path::new("card.json"))
    }

    #[test]
    fn a_card_without_the_new_keys_means_grey_nchw_stretch_f32_logits() {
        let c = parse(
            r#"{"labels": ["a", "b"], "input": {"shape": [3, 32, 32], "scale": 0.5,
                "mean": [0.45, 0.45, 0.45], "std": [0.225, 0.225, 0.225]},
                "output": {"name": "logits", "classes": 2}}"#,
        )
        .unwrap();
        let i = &c.input;
        assert_eq!(
            (i.colour, i.layout, i.resize, i.dtype),
            (Colour::Grey, Layout::Nchw, Resize::Stretch, DType::F32)
        );
        assert_eq!(
            (i.channels, i.height, i.width, i.resize_to),
            (3, 32, 32, 32)
        );
        assert_eq!(c.output.kind, OutputKind::Logits);
        assert_eq!(c.batch1_shape(), [1, 3, 32, 32]);
    }

    #[test]
    fn nhwc_shapes_are_height_width_channels() {
        let c = parse(
            r#"{"labels": ["a"], "input": {"shape": [160, 120, 3], "layout": "NHWC",
                "colour": "BGR", "resize": "crop", "resize_to": 200, "mean": [1, 2, 3]},
                "output": {"kind": "probabilities"}}"#,
        )
        .unwrap();
        assert_eq!(
            (c.input.height, c.input.width, c.input.channels),
            (160, 120, 3)
        );
        assert_eq!(c.batch1_shape(), [1, 160, 120, 3]);
        assert_eq!(c.input.mean, [1.0, 2.0, 3.0]);
        assert_eq!(c.input.std, [1.0; 3]);
        assert_eq!(c.scores(&[0.25, 0.75]), [0.25, 0.75]);
    }

    #[test]
    fn each_bad_key_is_named() {
        let good = r#"{"labels": ["a"], "input": {"shape": [3, 8, 8], "colour": "RGB"}}"#;
        assert!(parse(good).is_ok());
        for (edit, key) in [
            (r#""colour": "RGB", "layout": "CHW""#, "input.layout"),
            (r#""colour": "YUV""#, "input.colour"),
            (r#""colour": "RGB", "mean": [1, 2]"#, "input.mean"),
            (r#""colour": "RGB", "std": [1, 0, 1]"#, "input.std"),
            (r#""colour": "RGB", "dtype": "f64""#, "input.dtype"),
            (r#""colour": "RGB", "resize": "fill""#, "input.resize"),
            (
                r#""colour": "RGB", "resize": "crop", "resize_to": 7"#,
                "input.resize_to",
            ),
        ] {
            let text = good.replace(r#""colour": "RGB""#, edit);
            let e = parse(&text).unwrap_err();
            assert_eq!(e.key, key, "{text}: {e}");
            assert!(e.to_string().starts_with("card.json: "), "{e}");
        }
        let e = parse(r#"{"labels": ["a"], "input": {"shape": [1, 8, 8], "colour": "RGB"}}"#)
            .unwrap_err();
        assert_eq!(e.key, "input.shape");
    }
}
