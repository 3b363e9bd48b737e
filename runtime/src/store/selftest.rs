//! The activation self-test: what a candidate must pass before the active pointer moves to it.
//!
//! The candidate (a verified delta from the store, or the base) is built with tract as a running
//! service would build it, which checks the rebuilt weights against the fingerprint the producer
//! recorded. Then:
//! - each of three fixed frames ([`test_patterns`]: black, mid grey, a ramp) gives one finite
//!   output per label of the model card;
//! - each golden input of the card that applies to the candidate ([`goldens_for`]) is classified
//!   as the card says.
//!
//! A delta that carries its own labels must carry as many as the card. Firmware that embeds the
//! library runs the same test as `bitdelta activate`, and passes [`SelfTest::check`] to
//! [`Store::activate`] or [`Store::rollback`].

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::string::{String, ToString};
use std::vec;
use std::vec::Vec;

use super::{Checked, Store};
use crate::card::{argmax, CardError, Golden, ModelCard};
use crate::format::DeltaFile;
use crate::frame::{Frame, FrameError};
use crate::tract::{Engine, BASE};

/// Why a candidate failed its self-test.
#[derive(Debug)]
#[non_exhaustive]
pub enum SelfTestError {
    /// The model card cannot be read, or does not fit the base model.
    Card(CardError),
    /// The base model cannot be read.
    Base {
        /// The base model file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The delta's own labels are not as many as the card's.
    LabelCount {
        /// The variant.
        name: String,
        /// Labels in the card.
        expected: usize,
        /// Labels in the delta's manifest.
        found: usize,
    },
    /// tract could not load, build or run the candidate (the message holds the causes).
    Model(String),
    /// A test frame could not be made (e.g. a golden image does not decode).
    Frame(FrameError),
    /// A fixed test frame gave another number of outputs than the card has labels.
    OutputCount {
        /// Which test frame (0-based, in [`test_patterns`] order).
        input: usize,
        /// Labels in the card.
        expected: usize,
        /// Outputs found.
        found: usize,
    },
    /// A fixed test frame gave a NaN or infinite output.
    NotFinite {
        /// Which test frame (0-based, in [`test_patterns`] order).
        input: usize,
    },
    /// A golden input was classified as another label.
    Golden {
        /// The image, relative to the card's folder.
        image: PathBuf,
        /// The label the card asks for.
        expected: String,
        /// The label the candidate gave.
        found: String,
    },
}

impl fmt::Display for SelfTestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Card(e) => write!(f, "{e}"),
            Self::Base { path, source } => write!(f, "{}: cannot read: {source}", path.display()),
            Self::LabelCount {
                name,
                expected,
                found,
            } => write!(
                f,
                "variant {name:?}: {found} labels in the manifest, the model has {expected}"
            ),
            Self::Model(m) => f.write_str(m),
            Self::Frame(e) => write!(f, "{e}"),
            Self::OutputCount {
                input,
                expected,
                found,
            } => {
                write!(
                    f,
                    "test input {input}: expected {expected} outputs, found {found}"
                )
            }
            Self::NotFinite { input } => write!(f, "test input {input}: outputs are not finite"),
            Self::Golden {
                image,
                expected,
                found,
            } => write!(
                f,
                "golden input {}: expected {expected:?}, found {found:?}",
                image.display()
            ),
        }
    }
}

impl std::error::Error for SelfTestError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Card(e) => Some(e),
            Self::Base { source, .. } => Some(source),
            Self::Frame(e) => Some(e),
            _ => None,
        }
    }
}

impl From<CardError> for SelfTestError {
    fn from(e: CardError) -> Self {
        Self::Card(e)
    }
}

impl From<FrameError> for SelfTestError {
    fn from(e: FrameError) -> Self {
        Self::Frame(e)
    }
}

/// A tract error with its causes, as one message.
fn model_error(context: Option<&str>, e: impl fmt::Display) -> SelfTestError {
    SelfTestError::Model(match context {
        Some(c) => format!("{c}: {e:#}"),
        None => format!("{e:#}"),
    })
}

/// The fixed test frames, `width x height` grey pixels each: all black, mid grey (128), and a
/// ramp from 0 to 255 in pixel order.
pub fn test_patterns(width: usize, height: usize) -> [Vec<u8>; 3] {
    let pixels = width * height;
    [
        vec![0; pixels],
        vec![128; pixels],
        (0..pixels)
            .map(|i| (i * 255 / pixels.max(1)) as u8)
            .collect(),
    ]
}

/// The golden inputs of `card` that apply to the model `name` ([`BASE`] for the base): those
/// that list it, and those that list no variant.
pub fn goldens_for<'a>(card: &'a ModelCard, name: &'a str) -> impl Iterator<Item = &'a Golden> {
    card.golden
        .iter()
        .filter(move |g| g.variants.is_empty() || g.variants.iter().any(|v| v == name))
}

/// The activation self-test of one base model with its model card.
#[derive(Clone, Debug)]
pub struct SelfTest {
    base: PathBuf,
    card: PathBuf,
}

impl SelfTest {
    /// The self-test of candidates for `base`, judged by the model card at `card` (golden
    /// images are relative to its folder).
    pub fn new(base: &Path, card: &Path) -> Self {
        Self {
            base: base.to_owned(),
            card: card.to_owned(),
        }
    }

    /// The self-test of `store`'s candidates: its base and model card; `None` when the store has
    /// no card.
    pub fn for_store(store: &Store) -> Option<Self> {
        Some(Self::new(&store.base_path(), &store.card_path()?))
    }

    /// Tests `candidate` (`None`: the base), reading the base model into memory.
    pub fn check(&self, candidate: Option<&Checked>) -> Result<(), SelfTestError> {
        let bytes = fs::read(&self.base).map_err(|source| SelfTestError::Base {
            path: self.base.clone(),
            source,
        })?;
        self.check_with(Box::new(bytes), candidate)
    }

    /// [`SelfTest::check`] with the base model's bytes given (e.g. a memory map of the file).
    pub fn check_with(
        &self,
        base: Box<dyn AsRef<[u8]> + Send + Sync>,
        candidate: Option<&Checked>,
    ) -> Result<(), SelfTestError> {
        let card = ModelCard::load(&self.card)?;
        card.check_model((*base).as_ref(), &self.card, &self.base)?;
        let mut engine = Engine::with_input_type(base, &card.batch1_shape(), card.input_type())
            .map_err(|e| model_error(Some(&self.base.display().to_string()), e))?;
        let name = match candidate {
            Some(c) => {
                let what = format!("variant {:?}", c.name);
                let file = DeltaFile::parse(c.delta()).map_err(|e| model_error(Some(&what), e))?;
                let found = file.manifest().labels().count();
                if found != 0 && found != card.labels.len() {
                    return Err(SelfTestError::LabelCount {
                        name: c.name.clone(),
                        expected: card.labels.len(),
                        found,
                    });
                }
                engine
                    .add_variant(&c.name, vec![(c.delta().to_vec(), 1.0)])
                    .map_err(|e| model_error(Some(&what), e))?;
                c.name.as_str()
            }
            None => BASE,
        };
        engine.switch(name).map_err(|e| model_error(None, e))?;
        let mut run = |frame: &Frame| {
            engine
                .run(&frame.tensor(&card))
                .map_err(|e| model_error(None, e))
        };
        let (w, h) = (card.input.width, card.input.height);
        for (input, pixels) in test_patterns(w, h).into_iter().enumerate() {
            let logits = run(&Frame::from_pixels(pixels, w, h, 1, &card.input)?)?;
            if logits.len() != card.labels.len() {
                return Err(SelfTestError::OutputCount {
                    input,
                    expected: card.labels.len(),
                    found: logits.len(),
                });
            }
            if !logits.iter().all(|x| x.is_finite()) {
                return Err(SelfTestError::NotFinite { input });
            }
        }
        let folder = self.card.parent().unwrap_or(Path::new("."));
        for g in goldens_for(&card, name) {
            let logits = run(&Frame::load(&folder.join(&g.image), &card.input)?)?;
            let found = argmax(&card.scores(&logits))
                .and_then(|i| card.labels.get(i))
                .cloned()
                .unwrap_or_default();
            if found != g.label {
                return Err(SelfTestError::Golden {
                    image: g.image.clone(),
                    expected: g.label.clone(),
                    found,
                });
            }
        }
        Ok(())
    }
}
