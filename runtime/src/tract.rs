//! tract adapter: run an ONNX classifier, and switch it between variants of one base without a
//! second copy of the weights.
//!
//! A variant is built straight from the memory-mapped base: the ONNX protobuf is decoded once,
//! each float initializer's bytes are overwritten in place with its reconstruction (the delta
//! kernels, tensor by tensor), and tract parses and optimizes that. On a switch the running plan
//! is dropped *before* the next one is built and freed memory is returned to the OS
//! (`malloc_trim` on glibc), so the peak stays that of loading one model. Every build re-verifies
//! the delta's checksums and binding to the base. A variant that fails to build leaves the
//! engine on the variant it had.

use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::sync::Arc;
use std::vec::Vec;

use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{bail, ensure, format_err};

use crate::apply::{self, check_binding};
use crate::fingerprint::Fingerprint;
use crate::format::DeltaFile;
use crate::onnx::OnnxWeights;

/// Name of the base model as a variant.
pub const BASE: &str = "base";

/// An optimized tract plan for a single-input, single-output classifier.
#[derive(Clone, Debug)]
pub struct Classifier {
    plan: Arc<TypedSimplePlan>,
    input_shape: Vec<usize>,
}

impl Classifier {
    /// Loads ONNX bytes, fixes the input to `input_shape` (batch included) and optimizes.
    pub fn from_onnx_bytes(bytes: &[u8], input_shape: &[usize]) -> TractResult<Self> {
        let proto = ModelProto::decode(bytes)?;
        Self::from_proto(proto, input_shape)
    }

    pub(crate) fn from_proto(proto: ModelProto, input_shape: &[usize]) -> TractResult<Self> {
        let model = tract_onnx::onnx().model_for_proto_model(&proto)?;
        drop(proto);
        let plan = model
            .with_input_fact(0, f32::fact(input_shape).into())?
            .into_optimized()?
            .into_runnable()?;
        Ok(Self {
            plan,
            input_shape: input_shape.to_vec(),
        })
    }

    /// The input shape the plan was built for.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// Runs one input (as many values as the input shape holds) and returns the flat output.
    pub fn run(&self, input: &[f32]) -> TractResult<Vec<f32>> {
        let t = Tensor::from_shape(&self.input_shape, input)?;
        let out = self.plan.run(tvec!(t.into()))?;
        let out = out
            .first()
            .ok_or_else(|| TractError::msg("model has no output"))?;
        Ok(out.to_plain_array_view::<f32>()?.iter().copied().collect())
    }
}

/// A registered variant: its deltas (owned bytes) and alphas.
struct Variant {
    deltas: Vec<(Vec<u8>, f32)>,
    /// The rebuilt weights were hashed once and matched the manifest's result fingerprint.
    verified: bool,
}

/// Loads a base once and serves it or any registered variant, switching in place.
pub struct Engine {
    base: Box<dyn AsRef<[u8]> + Send + Sync>,
    weights: OnnxWeights,
    base_fingerprint: Fingerprint,
    input_shape: Vec<usize>,
    variants: BTreeMap<String, Variant>,
    classifier: Option<Classifier>,
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
        let weights = OnnxWeights::scan((*base).as_ref())?;
        let base_fingerprint = weights.fingerprint((*base).as_ref());
        Ok(Self {
            base,
            weights,
            base_fingerprint,
            input_shape: input_shape.to_vec(),
            variants: BTreeMap::new(),
            classifier: None,
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

    /// Forgets a registered variant; the running model is kept (it stays active until the next
    /// switch). Returns whether it was registered.
    pub fn remove_variant(&mut self, name: &str) -> bool {
        self.variants.remove(name).is_some()
    }

    /// Registers a variant made of one or more deltas with alphas. Each delta is fully checked
    /// now (structure, checksums, binding to this base); builds check again.
    pub fn add_variant(&mut self, name: &str, deltas: Vec<(Vec<u8>, f32)>) -> TractResult<()> {
        ensure!(
            name != BASE,
            "variant name {BASE:?} is reserved for the base model"
        );
        ensure!(!deltas.is_empty(), "variant {name:?}: no delta");
        for (k, (bytes, alpha)) in deltas.iter().enumerate() {
            ensure!(alpha.is_finite(), "variant {name:?}: alpha is not finite");
            let file = DeltaFile::parse(bytes).map_err(|e| format_err!("variant {name:?}: {e}"))?;
            file.verify_payloads()
                .map_err(|e| format_err!("variant {name:?}: {e}"))?;
            check_binding(&file, k, &self.weights, &self.base_fingerprint)
                .map_err(|e| format_err!("variant {name:?}: {e}"))?;
        }
        self.variants.insert(
            name.to_string(),
            Variant {
                deltas,
                verified: false,
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
    /// already was. On failure the previous variant is rebuilt and stays active.
    pub fn switch(&mut self, name: &str) -> TractResult<bool> {
        if self.classifier.is_some() && self.active == name {
            return Ok(false);
        }
        ensure!(
            name == BASE || self.variants.contains_key(name),
            "unknown variant {name:?}"
        );
        let previous = std::mem::take(&mut self.active);
        // Drop the running plan first: its weights are the memory the next build needs.
        self.classifier = None;
        crate::mem::release_free_memory();
        match self.build(name) {
            Ok((clf, fp)) => {
                self.classifier = Some(clf);
                if let Some(v) = self.variants.get_mut(name) {
                    v.verified = true;
                }
                self.active = name.to_string();
                self.active_fingerprint = fp;
                Ok(true)
            }
            Err(e) => {
                if !previous.is_empty() {
                    if let Ok((clf, fp)) = self.build(&previous) {
                        self.classifier = Some(clf);
                        self.active = previous;
                        self.active_fingerprint = fp;
                    }
                }
                Err(e.context(format!("switching to variant {name:?}")))
            }
        }
    }

    fn build(&self, name: &str) -> TractResult<(Classifier, Fingerprint)> {
        let base = (*self.base).as_ref();
        let mut proto = ModelProto::decode(base)?;
        let fp = match self.variants.get(name) {
            None => self.base_fingerprint,
            Some(v) => {
                let files = v
                    .deltas
                    .iter()
                    .map(|(b, _)| DeltaFile::parse(b).map_err(|e| format_err!("{e}")))
                    .collect::<TractResult<Vec<_>>>()?;
                let list: Vec<_> = files
                    .iter()
                    .zip(&v.deltas)
                    .map(|(f, (_, a))| (f, *a))
                    .collect();
                let graph = proto
                    .graph
                    .as_mut()
                    .ok_or_else(|| format_err!("model has no graph"))?;
                let index: BTreeMap<String, usize> = graph
                    .initializer
                    .iter()
                    .enumerate()
                    .map(|(i, t)| (t.name.clone(), i))
                    .collect();
                let mut missing = None;
                // A single delta at alpha 1 carries the fingerprint of its result (checked when it
                // was verified); a soup's weights are hashed as they are rebuilt.
                let known = match list.as_slice() {
                    [(f, a)] if *a == 1.0 => Some(f.manifest().result_fingerprint),
                    _ => None,
                };
                // The first build hashes the rebuilt weights and compares them with the manifest;
                // later builds re-check every payload checksum and the binding, not the hash.
                let hash = known.is_none() || !v.verified;
                let fp = apply::rebuild_with(
                    base,
                    &self.weights,
                    &self.base_fingerprint,
                    &list,
                    hash,
                    |init, bytes| match index.get(&init.name).map(|&i| &mut graph.initializer[i]) {
                        Some(t) if t.raw_data.len() == bytes.len() => {
                            t.raw_data.copy_from_slice(bytes);
                        }
                        Some(t) if t.float_data.len() * 4 == bytes.len() => {
                            for (o, c) in t.float_data.iter_mut().zip(bytes.chunks_exact(4)) {
                                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                            }
                        }
                        _ => missing = Some(init.name.clone()),
                    },
                )
                .map_err(|e| format_err!("{e}"))?;
                if let (Some(k), Some(f)) = (known, fp) {
                    ensure!(
                        k == f,
                        "rebuilt weights do not match the delta: expected fingerprint {}, found {}",
                        crate::fingerprint::short_hex(&k, 8),
                        crate::fingerprint::short_hex(&f, 8)
                    );
                }
                let fp = known.or(fp).expect("hashed when not known");
                if let Some(m) = missing {
                    bail!("initializer {m:?} not found in the decoded model");
                }
                fp
            }
        };
        let clf = Classifier::from_proto(proto, &self.input_shape)?;
        crate::mem::release_free_memory();
        Ok((clf, fp))
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
