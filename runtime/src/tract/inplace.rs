//! In-place weight rewriting of an optimized tract model (the fast switch).
//!
//! After `into_optimized()`, tract 0.23.9 keeps a model's weights in three kinds of places:
//! plain `Const` nodes (biases, depthwise kernels, reshaped but in element order), `Const` nodes
//! holding packed matrices (`PackedMatrixStorage`: one for an im2col convolution's kernel, one
//! per group for a grouped convolution's), and packed operands baked into `OptMatMul` micro-ops
//! (`MatMulOperand::Const`). [`Sites::find`]
//! locates every weight of the base ONNX in those places by *content*: a plain constant must hold
//! the same elements, a packed one must equal what the operand's own packing format makes of the
//! weight read as an `(mn, k)` or a `(k, mn)` matrix. A weight is only given a site when that
//! match is unique both ways (one place for the weight, one weight for the place); weights whose
//! elements are all equal (zero biases, which tract may drop or share) never get one. A switch
//! that would change a weight without a site falls back to a full rebuild.
//!
//! Packed sites must use tract's f32 panel layout (`PackedFormat`: element `(m, k)` of an
//! `(mn, k)` operand at `(m / r) * panel + k * r + m % r`); the match is made by writing the
//! current weight with that rule in compare mode, so a site is only accepted when this module's
//! writer reproduces tract's packed bytes exactly.
//!
//! [`write`] then overwrites one site with new values, chunk by chunk (the weight is never whole
//! in memory), in the buffer that already holds it: a constant node is taken apart (its op and
//! its output fact let go of the tensor), written, and put back; a packed operand baked into
//! `OptMatMul` is written in its own blob. Writing in place was chosen by measurement
//! (`bitdelta bench`): a new tensor per site made every switch fault in fresh pages, and the
//! allocator kept the old ones unless each switch ended with a trim (field family: 0.085 of a
//! cold load with new tensors and a trim; 0.045 written in place, with peak RSS at 1.00x one
//! model). Only a buffer that something else still shares gets a new one of its size. The
//! model then runs exactly what tract would have built from those weights with the same plan.
//!
//! These are tract's public-but-internal types: tract is pinned to `=0.23.9` in the workspace
//! and the switch is tested against tract running the applied ONNX of every variant.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::vec::Vec;

use tract_onnx::prelude::*;

use crate::onnx::OnnxWeights;
use tract_onnx::tract_core::internal::{bail, format_err};
use tract_onnx::tract_core::ops::identity::Identity;
use tract_onnx::tract_core::ops::konst::Const;
use tract_onnx::tract_core::ops::matmul::optimized::{MatMulOperand, OptMatMul, ProtoFusedSpec};
use tract_onnx::tract_core::tract_linalg::mmm::{
    EagerPackedInput, MMMInputValue, PackedMatrixStorage,
};

use super::panels::{packed_layouts, repacked, scatter, Layout, Panels};
use super::rebuild::CHUNK;

/// Where one weight lives in an optimized model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Site {
    /// A `Const` node with the weight's elements in order (any shape), or transposed: the
    /// weight read as `(rows, n / rows)` stored column by column (`Some(rows)`, e.g. a depthwise
    /// kernel read tap-major by tract's channel-last depthwise convolution).
    Plain {
        node: usize,
        transposed: Option<usize>,
    },
    /// A `Const` node holding one packed matrix.
    Packed { node: usize, layout: Layout },
    /// A `Const` node holding one packed `(mn, k)` matrix per group of a grouped convolution:
    /// group `g` holds the weight's elements `g * n / groups..(g + 1) * n / groups`.
    Grouped { node: usize },
    /// Operand `a` (or `b`) of micro-op `op` of an `OptMatMul` node, packed.
    Baked {
        node: usize,
        op: usize,
        b: bool,
        layout: Layout,
    },
}

/// A place in the model that may hold a weight, with what it holds now.
enum Place<'m> {
    Plain(&'m [f32]),
    Packed(Panels, &'m [f32]),
    /// One `(mn, k)` matrix per group, all of the same size.
    Grouped(Vec<(Panels, &'m [f32])>),
}

impl Place<'_> {
    fn len(&self) -> usize {
        match self {
            Place::Plain(v) => v.len(),
            Place::Packed(p, _) => p.mn * p.k,
            Place::Grouped(g) => g.len() * g.first().map_or(0, |(p, _)| p.mn * p.k),
        }
    }
}

/// Calls `f(group, first, src, len)` for each part of the weight's elements `first..first + n`
/// that falls in one group of `per` elements: `first` within the group, `src` from `first`.
fn per_group(per: usize, first: usize, n: usize, mut f: impl FnMut(usize, usize, usize, usize)) {
    let mut at = first;
    while at < first + n && per > 0 {
        let (g, local) = (at / per, at % per);
        let take = (per - local).min(first + n - at);
        f(g, local, at - first, take);
        at += take;
    }
}

fn packed_f32(v: &dyn MMMInputValue) -> Option<(Panels, &[f32])> {
    let (p, _) = Panels::of(v)?;
    let e = v.downcast_ref::<EagerPackedInput>()?;
    Some((p, bytemuck::try_cast_slice(e.packed.as_bytes()).ok()?))
}

/// The sites of a model's weights, by weight index: every place that holds the weight (an
/// exporter may feed one initializer to many nodes, e.g. one LayerNorm scale to every block).
#[derive(Clone, Debug, Default)]
pub(crate) struct Sites(Vec<Vec<Site>>);

impl Sites {
    /// The sites of weight `i`, if it has any.
    pub(crate) fn get(&self, i: usize) -> Option<&[Site]> {
        self.0.get(i).map(Vec::as_slice).filter(|s| !s.is_empty())
    }

    /// How many weights have a site.
    pub(crate) fn found(&self) -> usize {
        self.0.iter().filter(|s| !s.is_empty()).count()
    }

    /// Locates weights in `model`. `shapes[i]` is weight `i`'s element count and leading
    /// dimension (`None`: it cannot be rewritten); `current(i, first, out)`
    /// fills `out` with its elements `first..` as the model holds them now. A weight whose
    /// elements are all equal (a single one included) is only located when `distinct(i)` says its
    /// current values are unlike any other constant (decoys).
    pub(crate) fn find<'m>(
        model: &'m TypedModel,
        shapes: &[Option<(usize, usize)>],
        distinct: impl Fn(usize) -> bool,
        mut current: impl FnMut(usize, usize, &mut [f32]) -> TractResult<()>,
    ) -> TractResult<Sites> {
        // Every candidate place, grouped by element count.
        let mut places: BTreeMap<usize, Vec<(Site, Place<'m>)>> = BTreeMap::new();
        let mut add = |site: Site, place: Place<'m>| {
            places.entry(place.len()).or_default().push((site, place));
        };
        for node in model.nodes() {
            if let Some(c) = node.op_as::<Const>() {
                let t = c.val();
                if t.datum_type() == f32::datum_type() && t.is_plain_ram() {
                    let v = t.try_as_plain_ram()?.as_slice::<f32>()?;
                    let site = Site::Plain {
                        node: node.id,
                        transposed: None,
                    };
                    add(site, Place::Plain(v));
                } else if let Ok(s) = t.try_storage_as::<PackedMatrixStorage>() {
                    if let [v] = s.values() {
                        if let Some((p, held)) = packed_f32(&**v) {
                            let site = Site::Packed {
                                node: node.id,
                                layout: Layout::MnK,
                            };
                            add(site, Place::Packed(p, held));
                        }
                    } else if let Some(groups) = s
                        .values()
                        .iter()
                        .map(|v| packed_f32(&**v))
                        .collect::<Option<Vec<_>>>()
                        .filter(|g| g.iter().all(|(p, _)| (p.mn, p.k) == (g[0].0.mn, g[0].0.k)))
                    {
                        add(Site::Grouped { node: node.id }, Place::Grouped(groups));
                    }
                }
            } else if let Some(m) = node.op_as::<OptMatMul>() {
                for (op, spec) in m.micro_ops.iter().enumerate() {
                    if let ProtoFusedSpec::AddMatMul { a, b, .. } = spec {
                        for (is_b, operand) in [(false, a), (true, b)] {
                            if let MatMulOperand::Const(v) = operand {
                                if let Some((p, held)) = packed_f32(&**v) {
                                    let site = Site::Baked {
                                        node: node.id,
                                        op,
                                        b: is_b,
                                        layout: Layout::MnK,
                                    };
                                    add(site, Place::Packed(p, held));
                                }
                            }
                        }
                    }
                }
            }
        }
        // Every (weight, place) pair whose contents agree, compared chunk by chunk.
        let mut matches: Vec<(usize, Site)> = Vec::new();
        let mut buf = Vec::new();
        for (i, shape) in shapes.iter().enumerate() {
            let Some((n, rows)) = *shape else { continue };
            // The weight as (rows, cols), stored column by column.
            let columns = (rows > 1 && rows < n && n.is_multiple_of(rows)).then_some(Panels {
                r: rows,
                panel: n,
                mn: rows,
                k: n / rows,
            });
            let Some(candidates) = places.get(&n) else {
                continue;
            };
            // Per candidate: still equal as (plain in order, plain transposed), or for a packed
            // place, in each of `packed_layouts()`.
            let mut equal: Vec<Vec<bool>> = candidates
                .iter()
                .map(|(_, p)| match p {
                    Place::Plain(_) => vec![true, columns.is_some()],
                    Place::Packed(p, _) => packed_layouts()
                        .map(|l| match l {
                            Layout::MnKShuffled { groups } => {
                                groups < p.k && p.k.is_multiple_of(groups)
                            }
                            _ => true,
                        })
                        .collect(),
                    Place::Grouped(_) => vec![true],
                })
                .collect();
            let mut first_bits = None;
            let mut uniform = true;
            let mut at = 0;
            while at < n && equal.iter().any(|e| e.contains(&true)) {
                let len = CHUNK.min(n - at);
                buf.resize(len, 0.0);
                current(i, at, &mut buf)?;
                let b0 = *first_bits.get_or_insert(buf[0].to_bits());
                uniform &= buf.iter().all(|v| v.to_bits() == b0);
                for ((_, place), eq) in candidates.iter().zip(equal.iter_mut()) {
                    match place {
                        Place::Plain(held) => {
                            eq[0] &= same(&held[at..at + len], &buf);
                            if let (true, Some(t)) = (eq[1], &columns) {
                                t.runs(Layout::MnK, at, len, |run| {
                                    eq[1] &= run.holds(held, &buf);
                                });
                            }
                        }
                        Place::Packed(p, held) => {
                            for (e, layout) in eq.iter_mut().zip(packed_layouts()) {
                                if *e {
                                    p.runs(layout, at, len, |run| {
                                        *e &= run.holds(held, &buf);
                                    });
                                }
                            }
                        }
                        Place::Grouped(groups) => {
                            let per = groups[0].0.mn * groups[0].0.k;
                            per_group(per, at, len, |g, local, from, take| {
                                let (p, held) = &groups[g];
                                let part = &buf[from..from + take];
                                p.runs(Layout::MnK, local, take, |run| {
                                    eq[0] &= run.holds(held, part);
                                });
                            });
                        }
                    }
                }
                at += len;
            }
            if uniform && at >= n && !distinct(i) {
                continue; // all elements equal: not identifiable (tract may share or drop it)
            }
            for ((site, _), eq) in candidates.iter().zip(&equal) {
                // A weight that reads the same in two layouts is ambiguous.
                let mut hits = eq.iter().enumerate().filter(|(_, e)| **e).map(|(k, _)| k);
                let (Some(k), None) = (hits.next(), hits.next()) else {
                    continue;
                };
                let site = match *site {
                    Site::Plain { node, .. } => Site::Plain {
                        node,
                        transposed: (k == 1).then_some(rows),
                    },
                    s => with_layout(s, packed_layouts().nth(k).expect("one of them")),
                };
                matches.push((i, site));
            }
        }
        // A place that two weights match (equal contents) is ambiguous: neither weight gets any
        // site, since that place may derive from either.
        let mut per_place: BTreeMap<(usize, usize, bool), usize> = BTreeMap::new();
        for (_, s) in &matches {
            *per_place.entry(place_key(*s)).or_default() += 1;
        }
        let mut ambiguous = vec![false; shapes.len()];
        for (i, s) in &matches {
            ambiguous[*i] |= per_place[&place_key(*s)] > 1;
        }
        let mut sites = vec![Vec::new(); shapes.len()];
        for (i, s) in matches {
            if !ambiguous[i] {
                sites[i].push(s);
            }
        }
        Ok(Sites(sites))
    }
}

fn same(a: &[f32], b: &[f32]) -> bool {
    a.iter()
        .map(|x| x.to_bits())
        .eq(b.iter().map(|x| x.to_bits()))
}

fn with_layout(site: Site, layout: Layout) -> Site {
    match site {
        Site::Packed { node, .. } => Site::Packed { node, layout },
        Site::Baked { node, op, b, .. } => Site::Baked {
            node,
            op,
            b,
            layout,
        },
        s => s,
    }
}

fn place_key(site: Site) -> (usize, usize, bool) {
    match site {
        Site::Plain { node, .. } | Site::Packed { node, .. } | Site::Grouped { node } => {
            (node, usize::MAX, false)
        }
        Site::Baked { node, op, b, .. } => (node, op, b),
    }
}

impl Site {
    /// The node that holds the site.
    pub(crate) fn node(self) -> usize {
        match self {
            Site::Plain { node, .. }
            | Site::Packed { node, .. }
            | Site::Grouped { node }
            | Site::Baked { node, .. } => node,
        }
    }
}

/// Replaces weight `i`'s data at `site` with `n` new elements, given chunk by chunk by
/// `fill(first, out)`.
pub(crate) fn write(
    model: &mut TypedModel,
    site: Site,
    n: usize,
    fill: impl FnMut(usize, &mut [f32]) -> TractResult<()>,
) -> TractResult<()> {
    write_node(model.node_mut(site.node()), site, n, fill)
}

/// [`write`] on the site's node (`node` is `site.node()`), so that the sites of different nodes
/// can be written on different threads.
pub(crate) fn write_node(
    node: &mut TypedNode,
    site: Site,
    n: usize,
    mut fill: impl FnMut(usize, &mut [f32]) -> TractResult<()>,
) -> TractResult<()> {
    match site {
        Site::Plain { transposed, .. } => {
            // Written where it is (no new pages to fault in) when nothing else holds it, else a
            // new tensor of its size takes its place.
            let mut held = take_const(node)?;
            if Arc::get_mut(&mut held).is_none() {
                held = Arc::new(Tensor::zero::<f32>(held.shape())?);
            }
            let t = Arc::get_mut(&mut held).expect("unique: made above");
            let mut view = t.try_as_plain_ram_mut()?;
            let dst = view.as_slice_mut::<f32>()?;
            if dst.len() != n {
                bail!(
                    "constant {} holds {} elements, not {n}",
                    node.name,
                    dst.len()
                );
            }
            match transposed {
                None => {
                    let mut at = 0;
                    while at < n {
                        let len = CHUNK.min(n - at);
                        fill(at, &mut dst[at..at + len])?;
                        at += len;
                    }
                }
                Some(rows) => {
                    let columns = Panels {
                        r: rows,
                        panel: n,
                        mn: rows,
                        k: n / rows.max(1),
                    };
                    scatter(&columns, Layout::MnK, n, dst, &mut fill)?;
                }
            }
            node.op = Box::new(Const::new(held)?);
            refresh_fact(node)
        }
        Site::Packed { layout, .. } => {
            let (shape, dt, mut held) = take_packed(node)?;
            let [value] = held.as_mut_slice() else {
                bail!("constant {} holds more than one packed matrix", node.name);
            };
            rewrite_packed(value, layout, &mut fill)?;
            put_packed(node, &shape, dt, held)
        }
        Site::Grouped { .. } => {
            let (shape, dt, mut held) = take_packed(node)?;
            let per = n / held.len().max(1);
            if per * held.len() != n {
                bail!(
                    "constant {} holds {} groups, not a split of {n}",
                    node.name,
                    held.len()
                );
            }
            for (g, value) in held.iter_mut().enumerate() {
                rewrite_packed(value, Layout::MnK, &mut |first, out: &mut [f32]| {
                    fill(g * per + first, out)
                })?;
            }
            put_packed(node, &shape, dt, held)
        }
        Site::Baked { op, b, layout, .. } => {
            let name = node.name.clone();
            let m = node
                .op_as_mut::<OptMatMul>()
                .ok_or_else(|| format_err!("node {name} is not a matrix product"))?;
            let Some(ProtoFusedSpec::AddMatMul { a, b: bb, .. }) = m.micro_ops.get_mut(op) else {
                bail!("node {name} has no matrix product at micro-op {op}");
            };
            let MatMulOperand::Const(held) = (if b { bb } else { a }) else {
                bail!("node {name}: operand is not constant");
            };
            // Rewrite the operand's own buffer when nothing else holds it.
            if let Some(e) = held.downcast_mut::<EagerPackedInput>() {
                return rewrite_packed(e, layout, &mut fill);
            }
            *held = Box::new(repacked(&**held, layout, &mut fill)?);
            Ok(())
        }
    }
}

/// Takes a packed constant's matrices out of `node` (its op becomes an identity until
/// [`put_packed`]): with the op and its output fact let go, each matrix's buffer is held by
/// nobody else unless something outside the node shares it.
fn take_packed(
    node: &mut TypedNode,
) -> TractResult<(TVec<usize>, DatumType, Vec<EagerPackedInput>)> {
    let t = take_const(node)?;
    let storage = t.try_storage_as::<PackedMatrixStorage>()?;
    let values = storage
        .values()
        .iter()
        .map(|v| {
            v.downcast_ref::<EagerPackedInput>()
                .cloned()
                .ok_or_else(|| format_err!("constant {} holds an unknown packing", node.name))
        })
        .collect::<TractResult<Vec<_>>>()?;
    Ok((storage.batch_shape().into(), t.datum_type(), values))
}

/// Takes a constant's tensor out of `node`: its op becomes an identity and its output fact lets
/// go of the value, so the tensor is held by nobody else unless something outside the node
/// shares it. The caller puts a constant back.
fn take_const(node: &mut TypedNode) -> TractResult<Arc<Tensor>> {
    let held = node
        .op_as::<Const>()
        .ok_or_else(|| format_err!("node {} is not a constant", node.name))?
        .val()
        .clone();
    node.op = Box::new(Identity);
    node.outputs[0].fact.konst = None;
    node.outputs[0].fact.uniform = None;
    Ok(held)
}

/// Puts matrices taken by [`take_packed`] back into `node` as its constant.
fn put_packed(
    node: &mut TypedNode,
    shape: &[usize],
    dt: DatumType,
    held: Vec<EagerPackedInput>,
) -> TractResult<()> {
    let values = held
        .into_iter()
        .map(|v| Box::new(v) as Box<dyn MMMInputValue>)
        .collect();
    let t = PackedMatrixStorage::new_batched(shape, values).into_tensor(dt);
    let fact = t.exotic_fact()?;
    node.op = Box::new(Const::new_with_opt_exotic_fact(Arc::new(t), fact)?);
    refresh_fact(node)
}

/// Writes a weight into a packed matrix: in its own buffer when nothing else holds it (no new
/// pages, nothing for the allocator to keep), else into a new buffer of the same format.
fn rewrite_packed(
    e: &mut EagerPackedInput,
    layout: Layout,
    fill: &mut impl FnMut(usize, &mut [f32]) -> TractResult<()>,
) -> TractResult<()> {
    if let Some((p, _)) = Panels::of(&*e) {
        if let Some(blob) = Arc::get_mut(&mut e.packed) {
            let dst = bytemuck::try_cast_slice_mut(blob.as_bytes_mut())
                .map_err(|e| format_err!("packed buffer: {e}"))?;
            return scatter(&p, layout, p.mn * p.k, dst, fill);
        }
    }
    *e = repacked(&*e, layout, fill)?;
    Ok(())
}

/// A constant's output fact holds its tensor (`konst`): renew it, or the old weights stay alive.
fn refresh_fact(node: &mut TypedNode) -> TractResult<()> {
    let facts = node.op.output_facts(&[])?;
    let fact = facts
        .into_iter()
        .next()
        .ok_or_else(|| format_err!("constant {} has no output", node.name))?;
    node.outputs[0].fact = fact;
    Ok(())
}

/// The sites one node holds, `(weight, site)`, and their element count.
type NodeWork = (usize, Vec<(usize, Site)>);

/// Writes every weight of `set` into its sites in `model`, `fill(i, first, out)` giving weight
/// `i`'s elements `first..`. Nodes are shared out among the CPU's cores (each node's sites are
/// written by one thread), largest first. On failure, the weight that failed and why.
pub(crate) fn rewrite(
    model: &mut TypedModel,
    weights: &OnnxWeights,
    sites: &Sites,
    set: &BTreeSet<usize>,
    fill: impl Fn(usize, usize, &mut [f32]) -> TractResult<()> + Sync,
) -> Result<(), (usize, TractError)> {
    let mut work: BTreeMap<usize, NodeWork> = BTreeMap::new();
    for &i in set {
        for &site in sites.get(i).unwrap_or_default() {
            let w = work.entry(site.node()).or_default();
            w.0 += weights.initializers[i].numel() as usize;
            w.1.push((i, site));
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, work.len().max(1));
    let mut jobs: Vec<(&mut TypedNode, &NodeWork)> = model
        .nodes
        .iter_mut()
        .filter_map(|node| work.get(&node.id).map(|w| (node, w)))
        .collect();
    jobs.sort_by_key(|(_, (size, _))| std::cmp::Reverse(*size));
    let mut lanes: Vec<(usize, Vec<_>)> = (0..threads).map(|_| (0, Vec::new())).collect();
    for job in jobs {
        let lane = lanes
            .iter_mut()
            .min_by_key(|(load, _)| *load)
            .expect("at least one lane");
        lane.0 += job.1 .0;
        lane.1.push(job);
    }
    let fill = &fill;
    let lane = |jobs: Vec<(&mut TypedNode, &NodeWork)>| {
        for (node, (_, items)) in jobs {
            for &(i, site) in items {
                let n = weights.initializers[i].numel() as usize;
                write_node(node, site, n, |first, out| fill(i, first, out)).map_err(|e| (i, e))?;
            }
        }
        Ok(())
    };
    let mut lanes = lanes.into_iter().map(|(_, jobs)| jobs);
    let first = lanes.next().unwrap_or_default();
    std::thread::scope(|s| {
        let others: Vec<_> = lanes.map(|jobs| s.spawn(move || lane(jobs))).collect();
        let mut result = lane(first);
        for h in others {
            let r = h
                .join()
                .unwrap_or_else(|_| Err((0, format_err!("a rewriting thread panicked"))));
            result = result.and(r);
        }
        result
    })
}
