//! A model whose weights can be set to any values between runs, through the in-place machinery
//! of a switch: calibration's whole-model evaluations ([`crate::calibrate`]) change one or a few
//! tensors at a time and run again, without a rebuild per evaluation.
//!
//! The model is built once like a switching build ([`super::Engine`]): tract reads the weights
//! from memory through a data resolver, weights whose values are all equal are given as
//! [`decoy`]s so that tract keeps a place for them, every weight is located, and the true values
//! are written over the decoys. [`Tunable::set`] then writes new values into the located sites
//! and re-makes the execution plan around the same optimized model. A weight without a site
//! (none on the families and zoo models this was measured on) makes `set` build the model
//! again from the current values.
//!
//! A run can also be kept part way ([`Cut`]): the values that the rest of the execution plan
//! reads of the steps already run. An evaluation that changes only weights read from some step
//! on ([`Tunable::first_step`]) then runs only the steps from there ([`Tunable::finish`]), from
//! a cut advanced to that step with the weights as they were ([`Tunable::advance`]). Every step
//! computes what a whole run computes, so the outputs are the same bits.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::vec::Vec;

use prost::Message;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::{ensure, format_err};
use tract_onnx::tract_core::ops::konst::Const;

use super::inplace::{self, Sites};
use super::rebuild::decoy;
use super::{optimized, site_shapes, widen, Classifier, InputType};
use crate::apply;
use crate::format::DType;
use crate::onnx::OnnxWeights;

/// An optimized model of a fixed input shape whose float initializers can be rewritten.
pub struct Tunable {
    weights: Arc<OnnxWeights>,
    /// The model without its weights' data ([`crate::onnx::without_weights`]).
    stripped: Arc<[u8]>,
    /// The current values of every weight (f16 weights as their f32 values).
    values: Arc<Vec<Vec<f32>>>,
    input_shape: Vec<usize>,
    input_type: InputType,
    classifier: Option<Classifier>,
    /// The execution order of the classifier's plan.
    schedule: Schedule,
    sites: Sites,
    rebuilds: usize,
    /// Values of the graph (by name) given as outputs after the model's own.
    extra_outputs: Vec<String>,
}

/// A run of one input stopped before one step of the execution plan: the values of the steps
/// before it (the input's included) that the steps from it on read. Valid while the weights read
/// before the step keep their values.
#[derive(Clone)]
pub struct Cut {
    step: usize,
    values: Vec<(usize, TVec<TValue>)>,
}

impl Cut {
    /// The first step not run yet.
    pub fn step(&self) -> usize {
        self.step
    }
}

/// The execution order of a plan: `step[node]` (`None`: not run, e.g. a constant) and the last
/// step that reads each node's outputs (`usize::MAX` for the model's outputs).
#[derive(Default)]
struct Schedule {
    step: Vec<Option<usize>>,
    last_use: Vec<usize>,
    /// The last step that reads each node's outputs, outputs of the model or not.
    last_read: Vec<usize>,
}

impl Schedule {
    fn of(model: &TypedModel, order: &[usize]) -> TractResult<Self> {
        let n = model.nodes().len();
        let mut step = vec![None; n];
        let mut last_use = vec![0; n];
        for (s, &node) in order.iter().enumerate() {
            step[node] = Some(s);
            last_use[node] = last_use[node].max(s);
            for i in &model.node(node).inputs {
                last_use[i.node] = last_use[i.node].max(s);
            }
        }
        let last_read = last_use.clone();
        for o in model.output_outlets()? {
            last_use[o.node] = usize::MAX;
        }
        Ok(Self {
            step,
            last_use,
            last_read,
        })
    }
}

/// Every weight from memory; the decoys' values instead of theirs.
struct Values {
    values: Arc<Vec<Vec<f32>>>,
    decoys: BTreeSet<usize>,
}

impl tract_onnx::data_resolver::ModelDataResolver for Values {
    fn read_bytes_from_path(
        &self,
        buf: &mut Vec<u8>,
        _path: &std::path::Path,
        offset: usize,
        length: Option<usize>,
    ) -> TractResult<()> {
        let v = self
            .values
            .get(offset)
            .ok_or_else(|| format_err!("no weight {offset}"))?;
        ensure!(
            length.is_none_or(|l| l == v.len() * 4),
            "weight {offset}: asked for {length:?} bytes"
        );
        buf.clear();
        buf.resize(v.len() * 4, 0);
        if self.decoys.contains(&offset) {
            let mut d = vec![0f32; v.len()];
            decoy(offset, 0, &mut d);
            apply::store(DType::F32, &d, buf);
        } else {
            apply::store(DType::F32, v, buf);
        }
        Ok(())
    }
}

impl Tunable {
    /// Builds `onnx` (whose float initializers are `weights`, with the values `values` in the
    /// same order) for `input_shape`.
    pub fn new(
        onnx: &[u8],
        weights: Arc<OnnxWeights>,
        values: Vec<Vec<f32>>,
        input_shape: &[usize],
        input_type: InputType,
    ) -> TractResult<Self> {
        Self::with_outputs(onnx, weights, values, input_shape, input_type, &[])
    }

    /// [`Tunable::new`], with the values of the graph named `outputs` given as outputs after the
    /// model's own (output `1 + k` is `outputs[k]`; [`Tunable::take_output`] reads them from a
    /// [`Cut`]).
    pub fn with_outputs(
        onnx: &[u8],
        weights: Arc<OnnxWeights>,
        values: Vec<Vec<f32>>,
        input_shape: &[usize],
        input_type: InputType,
        outputs: &[String],
    ) -> TractResult<Self> {
        ensure!(
            values.len() == weights.initializers.len()
                && values
                    .iter()
                    .zip(&weights.initializers)
                    .all(|(v, w)| v.len() as u64 == w.numel()),
            "weight values do not match the model's initializers"
        );
        let stripped = crate::onnx::without_weights(onnx, &weights)?;
        let mut t = Self {
            weights,
            stripped: Arc::from(stripped),
            values: Arc::new(values),
            input_shape: input_shape.to_vec(),
            input_type,
            classifier: None,
            schedule: Schedule::default(),
            sites: Sites::default(),
            rebuilds: 0,
            extra_outputs: outputs.to_vec(),
        };
        t.build()?;
        Ok(t)
    }

    /// The input shape the model was built for.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// How many times [`Tunable::set`] had to build the model again (a weight without a site).
    pub fn rebuilds(&self) -> usize {
        self.rebuilds
    }

    /// The current values of weight `i`.
    pub fn values(&self, i: usize) -> &[f32] {
        &self.values[i]
    }

    /// Builds the model from the current values, around decoys for uniform weights, and
    /// locates every weight; without decoys when one of them is then not located.
    fn build(&mut self) -> TractResult<()> {
        self.classifier = None;
        let (clf, sites) = match self.make(true)? {
            Some(built) => built,
            None => self.make(false)?.expect("built without decoys"),
        };
        self.sites = sites;
        self.install(clf)
    }

    /// Runs `clf` from now on.
    fn install(&mut self, clf: Classifier) -> TractResult<()> {
        self.schedule = Schedule::of(&clf.model, clf.plan.order_without_consts())?;
        self.classifier = Some(clf);
        Ok(())
    }

    /// The model from the current values and its weights' sites; `None` when a decoy was not
    /// located (it would run with its decoy values).
    fn make(&self, with_decoys: bool) -> TractResult<Option<(Classifier, Sites)>> {
        let values = &self.values;
        let decoys: BTreeSet<usize> = values
            .iter()
            .enumerate()
            .filter(|(_, v)| with_decoys && v.iter().all(|x| x.to_bits() == v[0].to_bits()))
            .map(|(i, _)| i)
            .collect();
        let mut proto = ModelProto::decode(&self.stripped[..])?;
        let widened = widen::widen_f16(&mut proto);
        let mut onnx = tract_onnx::onnx();
        onnx.provider = Arc::new(Values {
            values: values.clone(),
            decoys: decoys.clone(),
        });
        let mut parsed = onnx.parse(&proto, Some("/"))?;
        drop(onnx);
        if !self.extra_outputs.is_empty() {
            let mut outlets = parsed.model.output_outlets()?.to_vec();
            for name in &self.extra_outputs {
                let o = parsed
                    .outlets_by_name
                    .get(name)
                    .ok_or_else(|| format_err!("no value {name:?} in the graph"))?;
                outlets.push(*o);
            }
            parsed.model.select_output_outlets(&outlets)?;
        }
        let mut model = optimized(parsed, &self.input_shape)?;
        let shapes = site_shapes(&self.weights);
        let sites = Sites::find(
            &model,
            &shapes,
            |i| decoys.contains(&i),
            |i, first, out| {
                if decoys.contains(&i) {
                    decoy(i, first, out);
                } else {
                    out.copy_from_slice(&values[i][first..first + out.len()]);
                }
                Ok(())
            },
        )?;
        for &i in &decoys {
            let Some(at) = sites.get(i) else {
                return Ok(None);
            };
            for &site in at {
                inplace::write(&mut model, site, values[i].len(), |first, out| {
                    out.copy_from_slice(&values[i][first..first + out.len()]);
                    Ok(())
                })?;
            }
        }
        let clf = Classifier::from_model(
            Arc::new(model),
            self.input_shape.clone(),
            self.input_type,
            widened.is_some_and(|w| w.output),
        )?;
        Ok(Some((clf, sites)))
    }

    /// Sets weights `changes[k].0` to the values `changes[k].1` (f16 weights are rounded to
    /// f16) and makes the model run with them.
    pub fn set(&mut self, changes: &[(usize, &[f32])]) -> TractResult<()> {
        let values = Arc::make_mut(&mut self.values);
        let mut set = BTreeSet::new();
        for &(i, v) in changes {
            let w = self
                .weights
                .initializers
                .get(i)
                .ok_or_else(|| format_err!("no weight {i}"))?;
            ensure!(
                v.len() as u64 == w.numel(),
                "weight {:?}: expected {} values, found {}",
                w.name,
                w.numel(),
                v.len()
            );
            values[i].copy_from_slice(v);
            w.dtype.round(&mut values[i]);
            set.insert(i);
        }
        if set.is_empty() {
            return Ok(());
        }
        if set.iter().any(|&i| self.sites.get(i).is_none()) {
            self.rebuilds += 1;
            return self.build();
        }
        let Some(Classifier {
            plan,
            mut model,
            input_shape,
            input_type,
            round_output,
        }) = self.classifier.take()
        else {
            self.rebuilds += 1;
            return self.build();
        };
        drop(plan);
        let values = &self.values;
        let written = match Arc::get_mut(&mut model) {
            Some(m) => inplace::rewrite(m, &self.weights, &self.sites, &set, |i, first, out| {
                out.copy_from_slice(&values[i][first..first + out.len()]);
                Ok(())
            })
            .is_ok(),
            None => false,
        };
        if !written {
            self.rebuilds += 1;
            return self.build();
        }
        self.install(Classifier::from_model(
            model,
            input_shape,
            input_type,
            round_output,
        )?)
    }

    /// Runs one input of the model's input shape; the flat output as f32.
    pub fn run(&self, input: &[f32]) -> TractResult<Vec<f32>> {
        self.classifier()?.run(input)
    }

    fn classifier(&self) -> TractResult<&Classifier> {
        self.classifier
            .as_ref()
            .ok_or_else(|| format_err!("the model was not built"))
    }

    /// The first step of the execution plan whose result depends on any of the weights
    /// `weights`: a cut at that step or before stays valid when they change. `None` when one of
    /// them has no site (setting it builds the model again).
    pub fn first_step(&self, weights: &[usize]) -> Option<usize> {
        let clf = self.classifier.as_ref()?;
        let model = &*clf.model;
        let mut seen = vec![false; model.nodes().len()];
        let mut todo = VecDeque::new();
        for &i in weights {
            for site in self.sites.get(i)? {
                todo.push_back(site.node());
            }
        }
        let mut first = clf.plan.order_without_consts().len();
        while let Some(node) = todo.pop_front() {
            if std::mem::replace(&mut seen[node], true) {
                continue;
            }
            if let Some(s) = self.schedule.step[node] {
                first = first.min(s);
            }
            for o in &model.node(node).outputs {
                todo.extend(o.successors.iter().map(|i| i.node));
            }
        }
        Some(first)
    }

    /// The step after which output `j` (`1 + k` for the `k`-th of the outputs given to
    /// [`Tunable::with_outputs`]) has its value in a [`Cut`]: a cut at that step or later
    /// holds it until [`Tunable::take_output`].
    pub fn output_ready(&self, j: usize) -> Option<usize> {
        let clf = self.classifier.as_ref()?;
        let o = clf.model.output_outlets().ok()?.get(j)?;
        Some(self.schedule.step[o.node]? + 1)
    }

    /// Elements of output `j` (for the input shape the model was built for).
    pub fn output_len(&self, j: usize) -> Option<usize> {
        let clf = self.classifier.as_ref()?;
        let o = clf.model.output_outlets().ok()?.get(j)?;
        let fact = clf.model.outlet_fact(*o).ok()?;
        fact.shape.as_concrete().map(|d| d.iter().product())
    }

    /// The value of output `j` in `cut` (`None` when the cut is not past
    /// [`Tunable::output_ready`]); the cut then drops it when no step from its own reads it and
    /// no other output is the same node's.
    pub fn take_output(&self, cut: &mut Cut, j: usize) -> Option<TValue> {
        let clf = self.classifier.as_ref()?;
        let outlets = clf.model.output_outlets().ok()?;
        let o = outlets.get(j)?;
        let at = cut.values.iter().position(|(n, _)| *n == o.node)?;
        let v = cut.values[at].1.get(o.slot)?.clone();
        let shared = outlets.iter().filter(|p| p.node == o.node).count() > 1;
        if !shared && self.schedule.last_read[o.node] < cut.step {
            cut.values.swap_remove(at);
        }
        Some(v)
    }

    /// A run of `input` (of the model's input shape) before its first step.
    pub fn start(&self, input: &[f32]) -> TractResult<Cut> {
        let clf = self.classifier()?;
        let source = clf.model.input_outlets()?[0].node;
        Ok(Cut {
            step: 0,
            values: vec![(source, tvec!(clf.input_value(input)?))],
        })
    }

    /// Runs `cut` on with the current weights, to just before step `to`.
    pub fn advance(&self, cut: Cut, to: usize) -> TractResult<Cut> {
        let clf = self.classifier()?;
        let schedule = &self.schedule;
        let mut state = self.steps(clf, cut, to)?;
        let values = state
            .turn_state
            .values
            .iter_mut()
            .enumerate()
            .filter(|&(node, _)| schedule.step[node].is_some_and(|s| s < to))
            .filter_map(|(node, v)| Some((node, v.take()?)))
            .collect();
        Ok(Cut { step: to, values })
    }

    /// Runs the rest of the plan from `cut` with the current weights; the flat output as f32.
    /// (The steps that take over a value of the cut to change it work on a copy.)
    pub fn finish(&self, cut: &Cut) -> TractResult<Vec<f32>> {
        let clf = self.classifier()?;
        let order = clf.plan.order_without_consts();
        let mut state = self.steps(clf, cut.clone(), order.len())?;
        clf.output_values(&state.outputs()?)
    }

    /// A state holding the model's constants and `cut`'s values, run from its step to just
    /// before `to`. As in a whole run, each value is dropped before the last step that reads it
    /// runs, so that the step may take it over instead of copying it.
    fn steps(&self, clf: &Classifier, cut: Cut, to: usize) -> TractResult<TypedSimpleState> {
        let order = clf.plan.order_without_consts();
        ensure!(
            cut.step <= to && to <= order.len(),
            "cannot run from step {} to step {to} of {}",
            cut.step,
            order.len()
        );
        let (model, schedule) = (&*clf.model, &self.schedule);
        let mut state = clf.plan.spawn()?;
        let values = &mut state.turn_state.values;
        *values = model
            .nodes()
            .iter()
            .map(|n| {
                n.op_as::<Const>()
                    .map(|k| tvec!(k.val().clone().into_tvalue()))
            })
            .collect();
        for (node, v) in cut.values {
            values[node] = Some(v);
        }
        for (s, &node) in order.iter().enumerate().take(to).skip(cut.step) {
            let inputs = state.prepare_inputs(node)?;
            for i in &model.node(node).inputs {
                if schedule.last_use[i.node] == s && schedule.step[i.node].is_some() {
                    state.turn_state.values[i.node] = None;
                }
            }
            state.compute_one_with_inputs(node, inputs)?;
            if schedule.last_use[node] == s {
                state.turn_state.values[node] = None;
            }
        }
        Ok(state)
    }
}
