//! Rounding again in context: the layers of the planned model, in the order the model runs
//! them, each rounded to the fine-tune's outputs from the inputs it receives once the layers
//! before it are rounded (sequential GPTQ with the fine-tune's outputs as the target).
//!
//! Two models run side by side over the calibration images: the planned one (its weights
//! rewritten as layers are rounded again, [`Tunable`]) and the fine-tune, each giving the
//! layers' inputs as extra outputs. Each image batch is kept as a [`Cut`] of each model,
//! advanced to the next layer's first step, so that every step of both models runs once per
//! image over the whole pass; a layer's inputs are summed as they pass and dropped. The batches
//! advance on all threads; a grouped layer's sums share its groups among them, and a large
//! single group's two products (`Σ x xᵀ`, `Σ y xᵀ`) run side by side.

use std::ops::Range;
use std::sync::Arc;
use std::vec::Vec;

use prost::Message;
use tract_onnx::prelude::TValue;

use super::statistics::{weight_uses, LayerInputs, Sums, WeightUse};
use super::{parallel, CalibError, Images};
use crate::onnx::OnnxWeights;
use crate::tract::{Cut, InputType, Tunable};

/// Input values per batch of images (at least one image).
const BATCH_VALUES: usize = 1 << 16;

/// Largest batch of images.
const MOST_IMAGES: usize = 50;

/// Images that run from the first layer on: more join at each layer while its inputs hold at
/// most [`JOIN_VALUES`] values over all images (a model's cut holds a few such values per image).
const MIN_IMAGES: usize = 4;

/// Values of one layer's inputs over the images that run (see [`MIN_IMAGES`]).
const JOIN_VALUES: usize = 1 << 22;

fn model_error(e: impl std::fmt::Display) -> CalibError {
    CalibError::Model(format!("{e:#}"))
}

/// One image batch in both models: the planned model's cut, the fine-tune's, and how many of
/// the batch's images are real (the last batch is padded with zeros).
struct Batch {
    planned: Cut,
    fine: Cut,
    images: usize,
}

/// Runs the layers of `layers` (positions of weights among the float initializers of `fine_w`)
/// in the order the model reads them. For each, with the model holding `planned` and the
/// layers before it already changed, `round(weight, inputs)` gets the layer's inputs paired
/// with the fine-tune's (`values` of every initializer) on every image, and returns the weights
/// to set (the layer's own and its bias: none of them read before it). Layers whose inputs the
/// model does not give before their first step are left out. Returns how many layers `round`
/// saw.
#[allow(clippy::too_many_arguments)]
pub(super) fn in_context(
    fine: &[u8],
    fine_w: &Arc<OnnxWeights>,
    planned: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
    images: &Images,
    threads: usize,
    layers: &[usize],
    mut round: impl FnMut(usize, &LayerInputs) -> Vec<(usize, Vec<f32>)>,
    mut progress: impl FnMut(usize, usize),
) -> Result<usize, CalibError> {
    let proto = tract_onnx::pb::ModelProto::decode(fine).map_err(model_error)?;
    let Some(graph) = proto.graph.as_ref() else {
        return Ok(0);
    };
    let position = |name: &str| fine_w.initializers.iter().position(|w| w.name == name);
    let mut uses: Vec<(usize, WeightUse)> = weight_uses(graph, fine_w)
        .into_iter()
        .filter_map(|u| {
            let i = position(&u.weight)?;
            layers.contains(&i).then_some((i, u))
        })
        .collect();
    if uses.is_empty() {
        return Ok(0);
    }
    let mut names: Vec<String> = uses.iter().map(|(_, u)| u.input.clone()).collect();
    names.sort_unstable();
    names.dedup();
    let image = images.image_len();
    let batch = (BATCH_VALUES / image.max(1)).clamp(1, MOST_IMAGES);
    let shape = images.batch_shape(batch);
    let mut model = Tunable::with_outputs(
        fine,
        fine_w.clone(),
        planned,
        &shape,
        InputType::F32,
        &names,
    )
    .map_err(model_error)?;
    let reference =
        Tunable::with_outputs(fine, fine_w.clone(), values, &shape, InputType::F32, &names)
            .map_err(model_error)?;
    let output = |u: &WeightUse| 1 + names.binary_search(&u.input).unwrap_or(0);
    // The step each layer's change is first read at (its weight and its bias).
    let first = |model: &Tunable, i: usize, u: &WeightUse| {
        let mut w = vec![i];
        w.extend(u.bias.as_deref().and_then(position));
        model.first_step(&w)
    };
    uses.sort_by_key(|(i, u)| first(&model, *i, u).unwrap_or(usize::MAX));

    let chunks: Vec<&[f32]> = images.data.chunks(batch * image).collect();
    let start = |model: &Tunable, chunk: &[f32]| -> Result<Batch, CalibError> {
        let mut padded = vec![0f32; batch * image];
        padded[..chunk.len()].copy_from_slice(chunk);
        Ok(Batch {
            planned: model.start(&padded).map_err(model_error)?,
            fine: reference.start(&padded).map_err(model_error)?,
            images: chunk.len() / image,
        })
    };
    let mut batches = Vec::new();
    // Per layer: the largest input, per batch, of the layers from it on.
    let mut largest: Vec<usize> = uses
        .iter()
        .map(|(_, u)| model.output_len(output(u)).unwrap_or(0))
        .collect();
    for k in (1..largest.len()).rev() {
        largest[k - 1] = largest[k - 1].max(largest[k]);
    }
    let total = uses.len();
    let mut seen = 0;
    let mut taken: Vec<usize> = Vec::new();
    progress(0, total);
    for (k, (i, u)) in uses.iter().enumerate() {
        let j = output(u);
        let (Some(to), Some(ready), Some(ready_fine)) = (
            first(&model, *i, u),
            model.output_ready(j),
            reference.output_ready(j),
        ) else {
            continue;
        };
        let rebuilds = model.rebuilds();
        let at = Steps {
            to,
            ready,
            ready_fine,
            output: j,
            taken: &taken,
        };
        if batches.is_empty() {
            batches.push(start(&model, chunks[0])?);
        }
        let mut inputs = advance(&model, &reference, &mut batches, &at, threads)?;
        // More images join while the largest input of the layers from this one on is small
        // enough over all of them (the layers before are final: a new batch runs from the
        // input through them).
        let per_image = largest[k].div_ceil(batch).max(1);
        let wanted = (JOIN_VALUES / per_image)
            .max(MIN_IMAGES)
            .min(images.count)
            .div_ceil(batch)
            .min(chunks.len());
        // A few batches at a time (one per thread): a batch that has not run yet holds its
        // whole input, twice. All at once, the field family's last layers' images peaked at
        // 503 MiB, against 419 MiB this way.
        for group in chunks[batches.len().min(wanted)..wanted].chunks(threads.max(1)) {
            let mut more = group
                .iter()
                .map(|c| start(&model, c))
                .collect::<Result<Vec<_>, _>>()?;
            inputs.extend(advance(&model, &reference, &mut more, &at, threads)?);
            batches.extend(more);
        }
        taken.push(j);
        let pairs: Vec<(TValue, TValue, usize)> = batches
            .iter()
            .zip(inputs)
            .filter_map(|(b, (x, y))| Some((x?, y?, b.images)))
            .collect();
        let sums = layer_sums(u, fine_w, &pairs, batch, threads);
        let Some(inputs) = sums.into_inputs(u.cols(fine_w), u.bias.clone(), true) else {
            continue;
        };
        let changes = round(*i, &inputs);
        seen += 1;
        let borrowed: Vec<(usize, &[f32])> = changes.iter().map(|(i, v)| (*i, &v[..])).collect();
        model.set(&borrowed).map_err(model_error)?;
        if model.rebuilds() != rebuilds {
            // The kept cuts belong to the plan before the rebuild.
            return Err(CalibError::Model(
                "a weight could not be rewritten in place".into(),
            ));
        }
        progress(k + 1, total);
    }
    progress(total, total);
    Ok(seen)
}

/// Where [`advance`] takes the batches for one layer.
struct Steps<'a> {
    /// The planned model's first step that reads the layer's weights.
    to: usize,
    /// The step after which the planned model holds the layer's input (output `output`).
    ready: usize,
    /// The same for the fine-tune.
    ready_fine: usize,
    output: usize,
    /// Outputs already read: dropped from the cuts once no step reads them.
    taken: &'a [usize],
}

/// Advances every batch, the planned model to step `at.to` and the fine-tune to at least
/// `at.ready_fine`, and reads the layer's inputs in both (per batch: planned, fine-tune); the
/// batches are shared out among `threads` threads. When the planned model gives the input
/// only after `at.to`, it is read from a copy of the cut run on to `at.ready` (the cut itself
/// stays before the layer, whose weights are about to change).
#[allow(clippy::type_complexity)]
fn advance(
    model: &Tunable,
    reference: &Tunable,
    batches: &mut Vec<Batch>,
    at: &Steps<'_>,
    threads: usize,
) -> Result<Vec<(Option<TValue>, Option<TValue>)>, CalibError> {
    let per = batches.len().div_ceil(threads.max(1)).max(1);
    let owned = std::mem::take(batches);
    let mut parts: Vec<Vec<Batch>> = Vec::new();
    let mut it = owned.into_iter().peekable();
    while it.peek().is_some() {
        parts.push(it.by_ref().take(per).collect());
    }
    type Stepped = (Batch, (Option<TValue>, Option<TValue>));
    let step = |b: Batch| -> Result<Stepped, CalibError> {
        let mut planned = if b.planned.step() < at.to {
            model.advance(b.planned, at.to).map_err(model_error)?
        } else {
            b.planned
        };
        let x = if at.ready <= planned.step() {
            model.take_output(&mut planned, at.output)
        } else {
            let mut ahead = model
                .advance(planned.clone(), at.ready)
                .map_err(model_error)?;
            model.take_output(&mut ahead, at.output)
        };
        let mut fine = if b.fine.step() < at.ready_fine {
            reference
                .advance(b.fine, at.ready_fine)
                .map_err(model_error)?
        } else {
            b.fine
        };
        let y = reference.take_output(&mut fine, at.output);
        for &j in at.taken {
            model.take_output(&mut planned, j);
            reference.take_output(&mut fine, j);
        }
        Ok((
            Batch {
                planned,
                fine,
                images: b.images,
            },
            (x, y),
        ))
    };
    let step = &step;
    let done: Vec<Result<Vec<Stepped>, CalibError>> = std::thread::scope(|s| {
        let handles: Vec<_> = parts
            .into_iter()
            .map(|part| s.spawn(move || part.into_iter().map(step).collect()))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(CalibError::Model("a rounding thread panicked".into())))
            })
            .collect()
    });
    let mut inputs = Vec::new();
    for part in done {
        for (b, xy) in part? {
            batches.push(b);
            inputs.push(xy);
        }
    }
    Ok(inputs)
}

/// The paired sums of layer `u`'s inputs `pairs` (per batch: planned model, fine-tune, real
/// images), batch after batch. The groups of a grouped convolution are shared out among
/// `threads` threads, and a single group's two products run side by side; each group is summed
/// in image order either way, so the sums do not depend on `threads`.
fn layer_sums(
    u: &WeightUse,
    fine_w: &OnnxWeights,
    pairs: &[(TValue, TValue, usize)],
    batch: usize,
    threads: usize,
) -> Sums {
    let groups = u.groups();
    let parts = threads.min(groups).max(1);
    let sum = |range: Range<usize>, mut sums: Sums| {
        for (x, y, real) in pairs {
            add(u, x, y, *real, batch, range.clone(), &mut sums);
        }
        sums
    };
    if parts == 1 {
        return sum(0..groups, u.sums(fine_w, true).with_threads(threads));
    }
    let cols = u.cols(fine_w);
    let per = groups.div_ceil(parts);
    let sums = parallel(
        groups.div_ceil(per),
        threads,
        |k| {
            let range = k * per..groups.min((k + 1) * per);
            sum(range.clone(), Sums::paired(range.len(), cols))
        },
        |_| {},
    );
    Sums::concat(sums)
}

/// Adds the first `real` of the `batch` images of the layer inputs `x` (planned model) and `y`
/// (fine-tune) to `sums`, for the groups `groups` of the layer.
fn add(
    u: &WeightUse,
    x: &TValue,
    y: &TValue,
    real: usize,
    batch: usize,
    groups: Range<usize>,
    sums: &mut Sums,
) {
    // Inputs that are not f32 values are left out.
    let (Ok(x), Ok(y)) = (
        x.to_plain_array_view::<f32>(),
        y.to_plain_array_view::<f32>(),
    ) else {
        return;
    };
    if x.shape() != y.shape() || x.shape().first() != Some(&batch) {
        return;
    }
    let (Some(xs), Some(ys)) = (x.to_slice(), y.to_slice()) else {
        return;
    };
    let mut dims = x.shape().to_vec();
    let per = xs.len() / batch;
    dims[0] = real;
    u.add_groups(&[&xs[..real * per], &ys[..real * per]], &dims, groups, sums);
}
