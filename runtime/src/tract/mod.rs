//! tract adapter: run an ONNX classifier, and switch it between variants of one base without a
//! second copy of the weights.
//!
//! The first model is built straight from the memory-mapped base: the ONNX protobuf is decoded
//! once, each float initializer's bytes are overwritten in place with its reconstruction (the
//! delta kernels, tensor by tensor), and tract parses and optimizes that.
//!
//! A switch then rewrites the running model's weights in place ([`inplace`]): only the weights
//! the old or the new variant changes are reconstructed, repacked by tract's own packing format
//! and swapped in one at a time, and the execution plan is re-made around the same optimized
//! model. When that is not possible (a weight tract folded away or shares, a variant changing a
//! weight whose place was not found, or [`Engine::set_in_place`] off) the engine falls back to
//! a full rebuild: the running plan is dropped *before* the next one is built and freed memory
//! is returned to the OS (`malloc_trim` on glibc), so the peak stays that of loading one model.
//!
//! ## Weights tract would fold away: decoys, not re-derivation
//!
//! On the zoo exports (`../shared/fixtures/zoo/`) every weight tract 0.23.9 could not be found
//! again had been *dropped or shrunk because of its value*, not combined with another constant:
//! LayerNorm scales of ones (`x * 1` removed), zero biases (`x + 0` removed), uniform layer-scale
//! constants (shrunk to scalars), and a single-element Relu6 bound shared by every clip (which
//! cannot be told apart from tract's own constants of the same value). A fine-tuned variant moves those
//! values, and tract on the variant's ONNX keeps them as constants of their own, so the running
//! plan must have those constants too. Two ways were possible: re-run tract's derivation on the
//! new weight, or build the plan so that tract keeps each weight as its own constant. The
//! second was chosen, by measurement: a plan built around non-uniform values is exactly the plan
//! tract builds from the variant's ONNX (the switch tests compare outputs bit for bit, and
//! `bitdelta bench` measures inference after a switch within a few percent of tract on the fine
//! ONNX), while re-deriving would mean re-implementing tract's rewrite rules per op and version.
//! So a build for in-place switching hands tract *decoys* ([`decoy`]: distinct, non-neutral
//! values) for every weight a registered variant switches but whose built values are all equal,
//! locates every weight (the decoys by their unique values), and writes the true values over
//! the decoys before the model first runs. The base then runs `x * 1` where tract alone would
//! skip it, which gives the same bits (IEEE multiplication by one and addition of zero are exact;
//! only the sign of a zero sum can differ) for a few element-wise operations more.
//!
//! Layout changes are located, not prevented: reshapes and broadcasts (plain constants in
//! element order), transposes (depthwise kernels held tap-major), packing for the matrix
//! products (tract's panel formats, `(mn, k)` or `(k, mn)`), a kernel whose input channels a
//! channel shuffle regrouped, and one initializer fed to many nodes (every copy is a site).
//!
//! Either way the new variant's checksums and binding to the base are checked before the model
//! changes, its rebuilt weights are hashed against the manifest the first time it runs, and a
//! variant that fails leaves the engine on the variant it had.

mod inplace;
mod panels;
mod rebuild;
mod tunable;
mod widen;

use std::collections::{BTreeMap, BTreeSet};
use std::string::{String, ToString};
use std::sync::Arc;
use std::vec::Vec;

use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{ensure, format_err};

use crate::apply::check_binding;

use crate::fingerprint::Fingerprint;
use crate::format::{Codec, DType, DeltaFile, Payload};
use crate::onnx::OnnxWeights;
use inplace::Sites;
use rebuild::{decoy, payloads, rebuilt_fingerprint, reconstruct_at, stored_chunks, Rebuilder};

/// Name of the base model as a variant.
pub const BASE: &str = "base";

/// The element type of a model's input tensor (a model card's `input.dtype`).
///
/// Frames are always preprocessed in f32; an f16 model gets them rounded to f16 (to nearest)
/// just before inference. f16 models are computed in f32 (see [`widen`]) and their f16 outputs
/// rounded to f16, as onnxruntime's CPU provider does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InputType {
    /// 32-bit floats (most exports).
    #[default]
    F32,
    /// IEEE half floats (models exported in f16 end to end).
    F16,
}

/// A parsed model (every input resolved) for `input_shape`, optimized.
fn optimized(
    parsed: tract_onnx::model::ParseResult,
    input_shape: &[usize],
) -> TractResult<TypedModel> {
    ensure!(
        parsed.unresolved_inputs.is_empty(),
        "could not resolve inputs at top level: {:?}",
        parsed.unresolved_inputs
    );
    parsed
        .model
        .with_input_fact(0, input_fact(input_shape).into())?
        .into_optimized()
}

/// What [`Sites::find`] needs of every weight: its element count and leading dimension.
fn site_shapes(weights: &OnnxWeights) -> Vec<Option<(usize, usize)>> {
    weights
        .initializers
        .iter()
        .map(|init| {
            let rows = init.dims.first().copied().unwrap_or(1) as usize;
            Some((init.numel() as usize, rows))
        })
        .collect()
}

/// The f32 input fact of `shape` (an f16 input is widened with the rest of the graph).
fn input_fact(shape: &[usize]) -> TypedFact {
    f32::fact(shape)
}

/// An optimized tract plan for a single-input, single-output classifier.
#[derive(Clone, Debug)]
pub struct Classifier {
    plan: Arc<TypedSimplePlan>,
    /// The optimized model the plan runs (shared with it).
    model: Arc<TypedModel>,
    input_shape: Vec<usize>,
    input_type: InputType,
    /// The model's output was f16 (computed in f32, rounded to f16).
    round_output: bool,
}

impl Classifier {
    /// Loads ONNX bytes, fixes the input to `input_shape` (batch included) and optimizes.
    pub fn from_onnx_bytes(bytes: &[u8], input_shape: &[usize]) -> TractResult<Self> {
        Self::from_onnx_bytes_as(bytes, input_shape, InputType::F32)
    }

    /// [`Classifier::from_onnx_bytes`] for a model whose input is of type `input_type`.
    pub fn from_onnx_bytes_as(
        bytes: &[u8],
        input_shape: &[usize],
        input_type: InputType,
    ) -> TractResult<Self> {
        let mut proto = ModelProto::decode(bytes)?;
        let widened = widen::widen_f16(&mut proto);
        let model = tract_onnx::onnx().model_for_proto_model(&proto)?;
        drop(proto);
        let model = model
            .with_input_fact(0, input_fact(input_shape).into())?
            .into_optimized()?;
        Self::from_model(
            Arc::new(model),
            input_shape.to_vec(),
            input_type,
            widened.is_some_and(|w| w.output),
        )
    }

    fn from_model(
        model: Arc<TypedModel>,
        input_shape: Vec<usize>,
        input_type: InputType,
        round_output: bool,
    ) -> TractResult<Self> {
        Ok(Self {
            plan: model.clone().into_runnable()?,
            model,
            input_shape,
            input_type,
            round_output,
        })
    }

    /// The input shape the plan was built for.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// The element type of the model's input.
    pub fn input_type(&self) -> InputType {
        self.input_type
    }

    /// Runs one input (as many values as the input shape holds, converted to the model's input
    /// type) and returns the flat output as f32.
    pub fn run(&self, input: &[f32]) -> TractResult<Vec<f32>> {
        let out = self.plan.run(tvec!(self.input_value(input)?))?;
        self.output_values(&out)
    }

    /// `input` as the model's input value.
    fn input_value(&self, input: &[f32]) -> TractResult<TValue> {
        let t = match self.input_type {
            InputType::F32 => Tensor::from_shape(&self.input_shape, input)?,
            InputType::F16 => {
                let rounded: Vec<f32> = input.iter().map(|&v| widen::round_f16(v)).collect();
                Tensor::from_shape(&self.input_shape, &rounded)?
            }
        };
        Ok(t.into())
    }

    /// The model's first output of a run, flat, as f32.
    fn output_values(&self, out: &[TValue]) -> TractResult<Vec<f32>> {
        let out = out
            .first()
            .ok_or_else(|| TractError::msg("model has no output"))?;
        let out = out.cast_to::<f32>()?;
        let out = out.to_plain_array_view::<f32>()?;
        Ok(if self.round_output {
            out.iter().map(|&v| widen::round_f16(v)).collect()
        } else {
            out.iter().copied().collect()
        })
    }
}

/// A registered variant: its deltas (owned bytes) and alphas.
#[derive(Clone)]
struct Variant {
    deltas: Vec<(Arc<[u8]>, f32)>,
    /// Indices of the base weights that some delta of the variant changes.
    changed: Vec<usize>,
    /// Fingerprint of the rebuilt weights, once they have been hashed (and, for a single delta
    /// at alpha 1, matched the manifest's).
    result: Option<Fingerprint>,
}

/// How the engine made its last switch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwitchKind {
    /// The running model's weights were rewritten in place.
    InPlace,
    /// The model was built again from the base (first build, or the fallback).
    Rebuild,
}

impl SwitchKind {
    /// Lowercase name (`in-place`, `rebuild`).
    pub const fn name(self) -> &'static str {
        match self {
            SwitchKind::InPlace => "in-place",
            SwitchKind::Rebuild => "rebuild",
        }
    }
}

/// Loads a base once and serves it or any registered variant, switching in place.
pub struct Engine {
    base: Arc<dyn AsRef<[u8]> + Send + Sync>,
    weights: Arc<OnnxWeights>,
    base_fingerprint: Fingerprint,
    input_shape: Vec<usize>,
    input_type: InputType,
    variants: BTreeMap<String, Variant>,
    classifier: Option<Classifier>,
    /// Where each weight lives in the classifier's model (found on the first in-place switch).
    sites: Option<Sites>,
    in_place: bool,
    last_switch: Option<SwitchKind>,
    /// Why the last switch could not be made in place.
    fallback: Option<String>,
    /// The variant the running model holds (`None`: the base), kept apart from the registry,
    /// which may drop or replace it while it runs.
    running: Option<Variant>,
    active: String,
    active_fingerprint: Fingerprint,
}

impl Engine {
    /// Opens a base model (e.g. a memory map) for `input_shape`, and builds `start` (a registered
    /// variant name later, so at first only [`BASE`]) lazily on the first [`Engine::switch`] or
    /// [`Engine::run`].
    pub fn new(
        base: Box<dyn AsRef<[u8]> + Send + Sync>,
        input_shape: &[usize],
    ) -> TractResult<Self> {
        Self::with_input_type(base, input_shape, InputType::F32)
    }

    /// [`Engine::new`] for a model whose input is of type `input_type` (frames are still given
    /// to [`Engine::run`] as f32).
    pub fn with_input_type(
        base: Box<dyn AsRef<[u8]> + Send + Sync>,
        input_shape: &[usize],
        input_type: InputType,
    ) -> TractResult<Self> {
        let weights = OnnxWeights::scan((*base).as_ref())?;
        let base_fingerprint = weights.fingerprint((*base).as_ref());
        Ok(Self {
            base: Arc::from(base),
            weights: Arc::new(weights),
            base_fingerprint,
            input_shape: input_shape.to_vec(),
            input_type,
            variants: BTreeMap::new(),
            classifier: None,
            sites: None,
            in_place: true,
            last_switch: None,
            fallback: None,
            running: None,
            active: String::new(),
            active_fingerprint: [0; 32],
        })
    }

    /// The base model's weights.
    pub fn weights(&self) -> &OnnxWeights {
        &self.weights
    }

    /// Fingerprint of the base weights, computed from the bytes when the engine was opened.
    pub fn base_fingerprint(&self) -> &Fingerprint {
        &self.base_fingerprint
    }

    /// Switch by rewriting the running model's weights in place (`true`, the default) or always
    /// by rebuilding the model from the base (`false`: tract's public API only).
    pub fn set_in_place(&mut self, on: bool) {
        self.in_place = on;
    }

    /// How the last switch that changed the model was made (`None` before the first build).
    pub fn last_switch(&self) -> Option<SwitchKind> {
        self.last_switch
    }

    /// Why the last switch rebuilt the model instead of rewriting it in place (`None` when it
    /// did not, or when in-place switching is off or nothing was running yet).
    pub fn fallback_reason(&self) -> Option<&str> {
        self.fallback.as_deref()
    }

    /// How many of the base's weights the running model can rewrite in place (`None` until the
    /// first in-place switch has located them).
    pub fn located_weights(&self) -> Option<usize> {
        self.sites.as_ref().map(Sites::found)
    }

    /// Forgets a registered variant; the running model is kept (it stays active until the next
    /// switch). Returns whether it was registered.
    pub fn remove_variant(&mut self, name: &str) -> bool {
        self.variants.remove(name).is_some()
    }

    /// Registers a variant made of one or more deltas with alphas. Each delta is fully checked
    /// now (structure, checksums, binding to this base); builds check again. Registering the
    /// running variant's name again replaces the registration, not the running model: the new
    /// deltas load at the next switch to that name from another variant.
    pub fn add_variant(&mut self, name: &str, deltas: Vec<(Vec<u8>, f32)>) -> TractResult<()> {
        ensure!(
            name != BASE,
            "variant name {BASE:?} is reserved for the base model"
        );
        ensure!(!deltas.is_empty(), "variant {name:?}: no delta");
        let mut changed = BTreeSet::new();
        for (k, (bytes, alpha)) in deltas.iter().enumerate() {
            ensure!(alpha.is_finite(), "variant {name:?}: alpha is not finite");
            let file = DeltaFile::parse(bytes).map_err(|e| format_err!("variant {name:?}: {e}"))?;
            file.verify_payloads()
                .map_err(|e| format_err!("variant {name:?}: {e}"))?;
            check_binding(&file, k, &self.weights, &self.base_fingerprint)
                .map_err(|e| format_err!("variant {name:?}: {e}"))?;
            changed.extend(
                file.tensors()
                    .enumerate()
                    .filter(|(_, e)| e.codec != Codec::Unchanged)
                    .map(|(i, _)| i),
            );
        }
        self.variants.insert(
            name.to_string(),
            Variant {
                deltas: deltas.into_iter().map(|(b, a)| (Arc::from(b), a)).collect(),
                changed: changed.into_iter().collect(),
                result: None,
            },
        );
        Ok(())
    }

    /// Names of the registered variants (without the base).
    pub fn variants(&self) -> impl Iterator<Item = &str> {
        self.variants.keys().map(String::as_str)
    }

    /// The active variant's name and weights fingerprint (empty before the first build).
    pub fn active(&self) -> (&str, &Fingerprint) {
        (&self.active, &self.active_fingerprint)
    }

    /// Makes `name` (a registered variant or [`BASE`]) the running model. Returns `false` when it
    /// already was. On failure the previous variant stays (or, after a failed rebuild, is rebuilt
    /// and stays) active.
    pub fn switch(&mut self, name: &str) -> TractResult<bool> {
        if self.classifier.is_some() && self.active == name {
            return Ok(false);
        }
        ensure!(
            name == BASE || self.variants.contains_key(name),
            "unknown variant {name:?}"
        );
        self.fallback = None;
        if self.in_place && self.classifier.is_some() {
            match self.switch_in_place(name) {
                Ok(true) => {
                    self.last_switch = Some(SwitchKind::InPlace);
                    return Ok(true);
                }
                Ok(false) => {}
                Err(e) => return Err(e.context(format!("switching to variant {name:?}"))),
            }
        }
        let previous = std::mem::take(&mut self.active);
        // Drop the running plan first: its weights are the memory the next build needs, and
        // give what it freed back to the OS (glibc keeps it otherwise).
        self.sites = None;
        let dropped = self.classifier.take().is_some();
        if dropped {
            crate::mem::release_free_memory();
        }
        match self.build_for_switching(name) {
            Ok((clf, fp, sites)) => {
                if dropped {
                    crate::mem::release_free_memory();
                }
                self.classifier = Some(clf);
                self.sites = sites;
                if let Some(v) = self.variants.get_mut(name) {
                    v.result = Some(fp);
                }
                self.running = self.variants.get(name).cloned();
                self.active = name.to_string();
                self.active_fingerprint = fp;
                self.last_switch = Some(SwitchKind::Rebuild);
                Ok(true)
            }
            Err(e) => {
                if !previous.is_empty() {
                    if let Ok((clf, fp, sites)) = self.build_for_switching(&previous) {
                        self.classifier = Some(clf);
                        self.sites = sites;
                        self.running = self.variants.get(&previous).cloned();
                        self.active = previous;
                        self.active_fingerprint = fp;
                    }
                }
                Err(e.context(format!("switching to variant {name:?}")))
            }
        }
    }

    /// Builds `name`; with in-place switching on, around decoys for the weights tract would
    /// fold away (see [`Engine::uniform_switched_weights`]), unless one of them is then not
    /// located (the model is built again from the true values).
    fn build_for_switching(
        &self,
        name: &str,
    ) -> TractResult<(Classifier, Fingerprint, Option<Sites>)> {
        if self.in_place {
            match self.build(name, true)? {
                Built::Model(clf, fp, sites) => return Ok((clf, fp, sites)),
                Built::Decoy(_) => {}
            }
        }
        match self.build(name, false)? {
            Built::Model(clf, fp, sites) => Ok((clf, fp, sites)),
            Built::Decoy(w) => Err(format_err!("weight {w:?} was built from a decoy")),
        }
    }

    /// The parsed deltas of a variant (none for the base).
    fn deltas_of<'v>(
        variants: &'v BTreeMap<String, Variant>,
        name: &str,
    ) -> TractResult<Vec<(DeltaFile<'v>, f32)>> {
        parse(variants.get(name))
    }

    /// Rewrites the running model's weights for `name`. `Ok(false)`: not possible here (the
    /// caller rebuilds; the model may have been dropped). `Err`: the variant was refused before
    /// anything changed.
    fn switch_in_place(&mut self, name: &str) -> TractResult<bool> {
        let base = (*self.base).as_ref();
        let weights = &self.weights;
        let variants = &self.variants;
        let from = parse(self.running.as_ref())?;
        let to = Self::deltas_of(variants, name)?;
        let set: BTreeSet<usize> = [self.running.as_ref(), variants.get(name)]
            .into_iter()
            .flatten()
            .flat_map(|v| v.changed.iter().copied())
            .collect();
        if self.sites.is_none() {
            let Some(clf) = self.classifier.as_ref() else {
                return Ok(false);
            };
            self.sites = Some(self.locate(&clf.model, &from, &BTreeSet::new())?);
        }
        let sites = self.sites.as_ref().expect("found above");
        let missing: Vec<&str> = set
            .iter()
            .filter(|&&i| sites.get(i).is_none())
            .map(|&i| weights.initializers[i].name.as_str())
            .collect();
        if !missing.is_empty() {
            self.fallback = Some(format!(
                "{} weight(s) not found in tract's optimized model: {}",
                missing.len(),
                missing.join(", ")
            ));
            return Ok(false);
        }
        // Check the target before the model changes: binding, the checksums of every payload
        // used, and the first time, the fingerprint of its rebuilt weights.
        for (k, (f, _)) in to.iter().enumerate() {
            check_binding(f, k, weights, &self.base_fingerprint).map_err(|e| format_err!("{e}"))?;
        }
        let mut checked = BTreeMap::new();
        for &i in &set {
            checked.insert(i, payloads(weights, &to, i)?);
        }
        let fp = match variants.get(name) {
            None => self.base_fingerprint,
            Some(v) => match v.result {
                Some(fp) => fp,
                None => {
                    let fp = rebuilt_fingerprint(base, weights, &to)?;
                    check_result(&to, fp)?;
                    fp
                }
            },
        };
        // Rewrite, one weight at a time; a failure here leaves no model (the caller rebuilds).
        let Classifier {
            plan,
            mut model,
            input_shape,
            input_type,
            round_output,
        } = self.classifier.take().expect("checked above");
        drop(plan);
        let sites = self.sites.take().expect("found above");
        let Some(m) = Arc::get_mut(&mut model) else {
            self.fallback = Some("the running model is shared with a clone".into());
            return Ok(false);
        };
        if let Err((i, e)) = inplace::rewrite(m, weights, &sites, &set, |i, first, out| {
            reconstruct_at(base, weights, i, &checked[&i], first, out)
        }) {
            self.fallback = Some(format!("rewriting {}: {e}", weights.initializers[i].name));
            return Ok(false);
        }
        let Ok(clf) = Classifier::from_model(model, input_shape, input_type, round_output) else {
            return Ok(false);
        };
        drop(from);
        drop(to);
        self.classifier = Some(clf);
        self.sites = Some(sites);
        if let Some(v) = self.variants.get_mut(name) {
            v.result = Some(fp);
        }
        self.running = self.variants.get(name).cloned();
        self.active = name.to_string();
        self.active_fingerprint = fp;
        Ok(true)
    }

    /// Builds `name` from scratch: tract decodes the base without its weights and reads each
    /// weight from [`Rebuilder`] (base + deltas, reconstructed as tract asks for it), while the
    /// rebuilt weights are hashed on another thread the first time.
    fn build(&self, name: &str, decoys: bool) -> TractResult<Built> {
        let base = (*self.base).as_ref();
        let variant = self.variants.get(name);
        let files = Self::deltas_of(&self.variants, name)?;
        for (k, (f, _)) in files.iter().enumerate() {
            check_binding(f, k, &self.weights, &self.base_fingerprint)
                .map_err(|e| format_err!("{e}"))?;
        }
        let decoys = if decoys {
            self.uniform_switched_weights(&files)?
        } else {
            BTreeSet::new()
        };
        let stripped = crate::onnx::without_weights(base, &self.weights)?;
        let mut proto = ModelProto::decode(&stripped[..])?;
        let widened = widen::widen_f16(&mut proto);
        drop(stripped);
        let mut onnx = tract_onnx::onnx();
        onnx.provider = Arc::new(Rebuilder {
            base: self.base.clone(),
            weights: self.weights.clone(),
            deltas: variant.map(|v| v.deltas.clone()).unwrap_or_default(),
            decoys: decoys.clone(),
        });
        let (parsed, hashed) = std::thread::scope(|s| {
            let hasher = variant
                .filter(|v| v.result.is_none())
                .map(|_| s.spawn(|| rebuilt_fingerprint(base, &self.weights, &files)));
            // Any existing directory: the resolver ignores the path ("." inside it).
            let parsed = onnx.parse(&proto, Some("/"));
            let hashed = hasher.map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(format_err!("fingerprint thread panicked")))
            });
            (parsed, hashed)
        });
        drop(proto);
        let fp = match (variant, hashed) {
            (None, _) => self.base_fingerprint,
            (Some(v), None) => v.result.expect("hashed when not known"),
            (Some(_), Some(fp)) => {
                let fp = fp?;
                check_result(&files, fp)?;
                fp
            }
        };
        let mut model = optimized(parsed?, &self.input_shape)?;
        let sites = if decoys.is_empty() {
            None
        } else {
            // The plan was made around the decoys: find every weight (the decoys as they are
            // now) and write the true values over the decoys.
            let sites = self.locate(&model, &files, &decoys)?;
            for &i in &decoys {
                let Some(at) = sites.get(i) else {
                    return Ok(Built::Decoy(self.weights.initializers[i].name.clone()));
                };
                let p = payloads(&self.weights, &files, i)?;
                let n = self.weights.initializers[i].numel() as usize;
                for &site in at {
                    inplace::write(&mut model, site, n, |first, out| {
                        reconstruct_at(base, &self.weights, i, &p, first, out)
                    })?;
                }
            }
            Some(sites)
        };
        let clf = Classifier::from_model(
            Arc::new(model),
            self.input_shape.clone(),
            self.input_type,
            widened.is_some_and(|w| w.output),
        )?;
        Ok(Built::Model(clf, fp, sites))
    }

    /// The weights that some registered variant changes but whose values in the model built
    /// with `files` are all equal (LayerNorm scales of ones, zero biases, a layer-scale
    /// constant): tract folds such a weight away (`x * 1`, `x + 0`) or shrinks it to a scalar,
    /// so a plan built from them has no place for the variant's values.
    fn uniform_switched_weights(
        &self,
        files: &[(DeltaFile<'_>, f32)],
    ) -> TractResult<BTreeSet<usize>> {
        let base = (*self.base).as_ref();
        let changed: BTreeSet<usize> = self
            .variants
            .values()
            .flat_map(|v| v.changed.iter().copied())
            .collect();
        let mut out = BTreeSet::new();
        let (mut values, mut stored) = (Vec::new(), Vec::new());
        for i in changed {
            let p = payloads(&self.weights, files, i)?;
            let mut first: Option<[u8; 4]> = None;
            let mut uniform = true;
            stored_chunks(
                base,
                &self.weights,
                i,
                &p,
                DType::F32,
                &mut values,
                &mut stored,
                |_, b| {
                    let f = *first.get_or_insert_with(|| [b[0], b[1], b[2], b[3]]);
                    uniform &= b.chunks_exact(4).all(|c| c == f);
                },
            )?;
            if uniform {
                out.insert(i);
            }
        }
        Ok(out)
    }

    /// Finds every weight of the base in `model` (f16 weights as the f32 values tract holds),
    /// whose weights are those of `files` except the `decoys`, which hold [`decoy`] values.
    fn locate(
        &self,
        model: &TypedModel,
        files: &[(DeltaFile<'_>, f32)],
        decoys: &BTreeSet<usize>,
    ) -> TractResult<Sites> {
        let base = (*self.base).as_ref();
        let weights = &self.weights;
        let shapes = site_shapes(weights);
        let mut held: Option<(usize, Vec<(Payload<'_>, f32)>)> = None;
        inplace::Sites::find(
            model,
            &shapes,
            |i| decoys.contains(&i),
            |i, first, out| {
                if decoys.contains(&i) {
                    decoy(i, first, out);
                    return Ok(());
                }
                if held.as_ref().is_none_or(|(j, _)| *j != i) {
                    held = Some((i, payloads(weights, files, i)?));
                }
                let p = &held.as_ref().expect("set above").1;
                reconstruct_at(base, weights, i, p, first, out)
            },
        )
    }

    /// Runs the active model (building the base first if nothing is active yet).
    pub fn run(&mut self, input: &[f32]) -> TractResult<Vec<f32>> {
        if self.classifier.is_none() {
            self.switch(BASE)?;
        }
        self.classifier
            .as_ref()
            .expect("switch built a classifier")
            .run(input)
    }
}

/// The parsed deltas of a variant (none for the base).
fn parse(v: Option<&Variant>) -> TractResult<Vec<(DeltaFile<'_>, f32)>> {
    v.map_or(&[][..], |v| &v.deltas[..])
        .iter()
        .map(|(b, a)| Ok((DeltaFile::parse(b).map_err(|e| format_err!("{e}"))?, *a)))
        .collect()
}

/// What [`Engine::build`] made.
enum Built {
    /// The model, its weights' fingerprint, and where its weights are (when located).
    Model(Classifier, Fingerprint, Option<Sites>),
    /// A weight built from decoy values was not located: the model cannot be used.
    Decoy(String),
}

pub use crate::card::{argmax, softmax};
pub use tunable::{Cut, Tunable};

/// [`crate::apply::check_result`] as a tract error.
fn check_result(files: &[(DeltaFile<'_>, f32)], fp: Fingerprint) -> TractResult<()> {
    crate::apply::check_result(files, fp).map_err(|e| format_err!("{e}"))
}

#[cfg(test)]
mod tests;
