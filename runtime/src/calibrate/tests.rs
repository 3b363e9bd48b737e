//! Unit tests of the calibration search.

use super::context::in_context;
use super::evaluation::{reconstruct_encoded, Evaluator};
use super::plan::{candidates, corrected_bias, greedy, lower_hull, Candidate, Tensor};
use super::statistics::{
    add_patches, add_patches_fast, layer_inputs, mirror, paired_inputs, weight_uses, ConvShape,
    LayerInputs, Paired, Sums, WeightUse,
};
use super::*;
use crate::codec;
use crate::format::DType;
use crate::onnx::OnnxWeights;

fn cand(cost: u64, divergence: f64) -> Candidate {
    Candidate {
        label: String::new(),
        encoded: Encoded::Unchanged,
        cost,
        error: 0.0,
        divergence,
        measured: true,
    }
}

#[test]
fn hull_drops_dominated_and_concave_points() {
    // (0, 10) (10, 9.9) (10, 5) (20, 4) (40, 0) (50, 1): (10, 9.9) is dominated by (10, 5),
    // (20, 4) lies above the segment (10, 5)-(40, 0), (50, 1) is worse than (40, 0).
    let c = [
        cand(0, 10.0),
        cand(10, 9.9),
        cand(10, 5.0),
        cand(20, 4.0),
        cand(40, 0.0),
        cand(50, 1.0),
    ];
    assert_eq!(lower_hull(&c), [0, 2, 4]);
}

fn tensor(points: &[(u64, f64)]) -> Tensor {
    let candidates: Vec<Candidate> = points.iter().map(|&(c, d)| cand(c, d)).collect();
    let hull = lower_hull(&candidates);
    Tensor {
        name: String::new(),
        dtype: DType::F32,
        dims: Vec::new(),
        params: 0,
        index: 0,
        base: Vec::new(),
        fine: Vec::new(),
        candidates,
        hull,
        bias: None,
        corrects: None,
        bias_shift: Vec::new(),
    }
}

#[test]
fn greedy_spends_on_the_best_ratio_and_respects_the_budget() {
    // Tensor a gains 8 for 10 bytes, tensor b gains 1 for 10 bytes.
    let t = [
        tensor(&[(0, 8.0), (10, 0.0)]),
        tensor(&[(0, 1.0), (10, 0.0)]),
    ];
    assert_eq!(greedy(&t, 10).0, [1, 0]);
    assert_eq!(greedy(&t, 19).0, [1, 0]);
    assert_eq!(greedy(&t, 20).0, [1, 1]);
    assert_eq!(greedy(&t, 0).0, [0, 0]);
}

#[test]
fn reconstruction_matches_the_codec_rule() {
    let base = [1.0f32, -2.0, 0.5, 3.0];
    let fine = [1.5f32, -2.5, 0.5, 2.0];
    // mean |d| = (0.5 + 0.5 + 0 + 1) / 4 = 0.5; x1.5 gives 0.75.
    let r = reconstruct_encoded(&base, &codec::sign_tensor_scaled(&base, &fine, 1.5));
    assert_eq!(r, [1.75, -2.75, 1.25, 2.25]);
    let r = reconstruct_encoded(&base, &codec::q8_groups(&base, &fine, 1, false));
    for (x, y) in r.iter().zip(fine) {
        assert!((x - y).abs() <= 1.0 / 127.0, "{r:?}");
    }
    assert_eq!(reconstruct_encoded(&base, &Encoded::Unchanged), base);
}

#[test]
fn patches_give_the_output_error_of_a_convolution() {
    // A grouped convolution with a non-square kernel, stride, dilation and asymmetric pads:
    // for a weight error e, the sum over the output positions of (conv_e(x))² of output
    // channel o is e_o H e_oᵀ with H the patches' second moments of o's group.
    let s = ConvShape {
        group: 2,
        cig: 2,
        kernel: [3, 2],
        stride: [2, 1],
        dilation: [1, 2],
        pads: [1, 0, 2, 1],
    };
    let shape = [2usize, 4, 7, 6];
    let (n, c, ih, iw) = (shape[0], shape[1], shape[2], shape[3]);
    let wave = |i: usize, k: f64| ((i as f64 * k).sin() * 1.7) as f32;
    let a: Vec<f32> = (0..n * c * ih * iw).map(|i| wave(i, 0.37)).collect();
    let co = 4;
    let e: Vec<f64> = (0..co * s.cols())
        .map(|i| f64::from(wave(i, 0.91)))
        .collect();
    let mut h = vec![vec![0f64; s.cols() * s.cols()]; s.group];
    add_patches(&s, &a, &shape, &mut h);
    h.iter_mut().for_each(|m| mirror(m, s.cols()));
    // The convolution, straight from the ONNX definition.
    // Padded 10 x 7, spans 3 x 3 (dilation 2 over 2 taps), strides 2 x 1.
    let (oh, ow) = ((ih + 1 + 2 - 3) / 2 + 1, iw + 1 - 3 + 1);
    for o in 0..co {
        let g = o / (co / s.group);
        let mut sum = 0f64;
        for img in 0..n {
            for y in 0..oh {
                for x in 0..ow {
                    let mut v = 0f64;
                    for ci in 0..s.cig {
                        for ky in 0..3 {
                            for kx in 0..2 {
                                let (py, px) = (y * 2 + ky, x + kx * 2);
                                if py < 1 || px >= iw || py > ih {
                                    continue;
                                }
                                let xv = a[((img * c + g * s.cig + ci) * ih + py - 1) * iw + px];
                                v += e[o * s.cols() + (ci * 3 + ky) * 2 + kx] * f64::from(xv);
                            }
                        }
                    }
                    sum += v * v;
                }
            }
        }
        let k = s.cols();
        let row = &e[o * k..(o + 1) * k];
        let quad: f64 = (0..k)
            .map(|p| {
                (0..k)
                    .map(|q| row[p] * h[g][p * k + q] * row[q])
                    .sum::<f64>()
            })
            .sum();
        assert!(
            (quad - sum).abs() <= 1e-9 * sum.abs(),
            "channel {o}: {quad} vs {sum}"
        );
    }
}

/// `count` made-up images of the species model's input shape.
fn species_images(count: usize) -> Images {
    Images {
        data: (0..count * 3 * 32 * 32)
            .map(|i| ((i % 97) as f32 - 48.0) / 30.0)
            .collect(),
        count,
        shape: [3, 32, 32],
    }
}

#[test]
fn every_weight_of_the_species_model_gets_its_inputs() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/species/night.onnx");
    let bytes = std::fs::read(path).unwrap();
    let w = OnnxWeights::scan(&bytes).unwrap();
    use prost::Message;
    let proto = tract_onnx::pb::ModelProto::decode(&bytes[..]).unwrap();
    let uses = weight_uses(proto.graph.as_ref().unwrap(), &w);
    // Every conv kernel and the classifier: the tensors of rank 2 and 4; biases are added,
    // not multiplied.
    let mut want: Vec<&str> = w
        .initializers
        .iter()
        .filter(|i| i.dims.len() >= 2)
        .map(|i| i.name.as_str())
        .collect();
    let mut got: Vec<&str> = uses.iter().map(|u| u.weight.as_str()).collect();
    want.sort_unstable();
    got.sort_unstable();
    assert_eq!(got, want);
    for u in &uses {
        let dims = &w.get(&u.weight).unwrap().dims;
        match &u.conv {
            // Depthwise convolutions have one group per channel.
            Some(s) => assert!(s.group == 1 || s.group as u64 == dims[0], "{}", u.weight),
            None => assert_eq!(u.weight, "fc.weight"),
        }
    }
    // The probe model exposes them, and gives an output-aware rounding for every one.
    let images = species_images(3);
    let mut steps = Vec::new();
    let r = layer_inputs(&bytes, &w, &images, 2, |done, total| {
        steps.push((done, total));
    });
    assert_eq!(r.len(), want.len());
    assert_eq!(steps.first(), Some(&(0, 1)));
    assert_eq!(steps.last(), Some(&(1, 1)));
    for (name, li) in &r {
        let dims = &w.get(name).unwrap().dims;
        let n: u64 = dims.iter().product();
        assert_eq!(n % li.cols as u64, 0, "{name}");
        let r = li.rounding().unwrap();
        assert_eq!(r.cols(), li.cols, "{name}");
        // Every convolution and the classifier add a bias of their own.
        let bias = li.bias.as_deref().unwrap();
        assert_eq!(w.get(bias).unwrap().dims, [dims[0]], "{name}");
    }
}

#[test]
fn multiplier_one_is_the_plain_encoder() {
    let base: Vec<f32> = (0..64).map(|i| (i as f32 * 0.37).sin()).collect();
    let fine: Vec<f32> = (0..64).map(|i| (i as f32 * 0.41).cos()).collect();
    assert_eq!(
        codec::sign_tensor_scaled(&base, &fine, 1.0),
        codec::sign_tensor(&base, &fine)
    );
    assert_eq!(
        codec::sign_groups_scaled(&base, &fine, 8, true, 1.0),
        codec::sign_groups(&base, &fine, 8, true)
    );
}

/// Activations of `shape` (`amp * sin(i * freq)`) and their sums through the matrix-product path,
/// checked against `add_patches` (f64, patch by patch).
fn gathered_against_reference(
    s: &ConvShape,
    shape: [usize; 4],
    freq: f64,
    amp: f64,
) -> (Vec<f32>, Sums) {
    let len: usize = shape.iter().product();
    let a: Vec<f32> = (0..len)
        .map(|i| ((i as f64 * freq).sin() * amp) as f32)
        .collect();
    let k = s.cols();
    let mut want = vec![vec![0f64; k * k]; s.group];
    add_patches(s, &a, &shape, &mut want);
    want.iter_mut().for_each(|m| mirror(m, k));
    let mut got = Sums::new(s.group, k);
    add_patches_fast(s, &a, &shape, &mut got);
    got.finish();
    for (g, (w, h)) in want.iter().zip(&got.h).enumerate() {
        let scale = w.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (x, y) in w.iter().zip(h) {
            assert!((x - y).abs() <= 1e-5 * scale, "group {g}: {x} vs {y}");
        }
    }
    (a, got)
}

#[test]
fn gathered_patches_give_the_sums_of_the_reference() {
    // The matrix-product path against `add_patches` (f64, patch by patch), on a grouped
    // convolution with stride, dilation and asymmetric pads, with more patches than one product
    // gathers.
    let s = ConvShape {
        group: 2,
        cig: 3,
        kernel: [3, 3],
        stride: [1, 2],
        dilation: [2, 1],
        pads: [2, 1, 0, 2],
    };
    let shape = [3usize, 6, 48, 40];
    let (a, got) = gathered_against_reference(&s, shape, 0.731, 2.0);
    // The sums of the patches: the first column of each group is tap (0, 0) of its first input
    // channel, i.e. the input at (oy * 1 + 0 - 2, ox * 2 + 0 - 1) where that is inside.
    let (oh, ow) = ((48 + 2 - 5) + 1, (40 + 3 - 3) / 2 + 1);
    for g in 0..s.group {
        let mut sum = 0f64;
        for img in 0..shape[0] {
            for y in 0..oh {
                for x in 0..ow {
                    let (py, px) = (y as i64 - 2, 2 * x as i64 - 1);
                    if py >= 0 && px >= 0 && py < 48 && px < 40 {
                        let at = ((img * 6 + g * 3) * 48 + py as usize) * 40 + px as usize;
                        sum += f64::from(a[at]);
                    }
                }
            }
        }
        assert!((got.sum[g][0] - sum).abs() <= 1e-6 * sum.abs().max(1.0));
    }
    assert_eq!(got.vectors, (shape[0] * oh * ow) as f64);
}

#[test]
fn gathered_patches_of_a_unit_stride_convolution() {
    // A 3x3 "same" convolution (stride 1: the taps' rows are copied whole) against
    // `add_patches`, and the sums of the patches against the inputs they read.
    let s = ConvShape {
        group: 1,
        cig: 2,
        kernel: [3, 3],
        stride: [1, 1],
        dilation: [1, 1],
        pads: [1, 1, 1, 1],
    };
    let (a, got) = gathered_against_reference(&s, [2, 2, 20, 30], 0.419, 1.7);
    for ci in 0..2 {
        for ky in 0..3 {
            for kx in 0..3 {
                let mut sum = 0f64;
                for img in 0..2 {
                    for oy in 0..20 {
                        for ox in 0..30 {
                            let (y, x) = ((oy + ky) as i64 - 1, (ox + kx) as i64 - 1);
                            if (0..20).contains(&y) && (0..30).contains(&x) {
                                let at = ((img * 2 + ci) * 20 + y as usize) * 30 + x as usize;
                                sum += f64::from(a[at]);
                            }
                        }
                    }
                }
                let got = got.sum[0][(ci * 3 + ky) * 3 + kx];
                assert!(
                    (got - sum).abs() <= 1e-9 * sum.abs().max(1.0),
                    "{got} vs {sum}"
                );
            }
        }
    }
}

#[test]
fn large_outputs_are_sampled_on_a_regular_stride() {
    // A 1x1 convolution on 70x70 inputs: 4,900 positions per image, more than IMAGE_POSITIONS,
    // so every 5th position (980 per image) is summed; the patch is the input's channel vector
    // (no gathering). With a pad of 1 (72x72 outputs, the border reading zeros, gathered like
    // any convolution): every 6th of 5,184 positions.
    use super::statistics::IMAGE_POSITIONS;
    let shape = [2usize, 3, 70, 70];
    let len: usize = shape.iter().product();
    let a: Vec<f32> = (0..len)
        .map(|i| ((i as f64 * 0.377).cos() * 1.5) as f32)
        .collect();
    for (pad, step, per_image) in [(0usize, 5usize, 980usize), (1, 6, 864)] {
        let s = ConvShape {
            group: 1,
            cig: 3,
            kernel: [1, 1],
            stride: [1, 1],
            dilation: [1, 1],
            pads: [pad; 4],
        };
        let out = 70 + 2 * pad;
        assert_eq!((out * out).div_ceil(IMAGE_POSITIONS), step);
        let mut want = [0f64; 9];
        let mut vectors = 0;
        for img in 0..2 {
            for pos in (0..out * out).step_by(step) {
                let (y, x) = ((pos / out).checked_sub(pad), (pos % out).checked_sub(pad));
                let v: Vec<f64> = (0..3)
                    .map(|c| match (y, x) {
                        (Some(y), Some(x)) if y < 70 && x < 70 => {
                            f64::from(a[((img * 3 + c) * 70 + y) * 70 + x])
                        }
                        _ => 0.0,
                    })
                    .collect();
                for r in 0..3 {
                    for c in 0..3 {
                        want[r * 3 + c] += v[r] * v[c];
                    }
                }
                vectors += 1;
            }
        }
        assert_eq!(vectors, 2 * per_image);
        let mut got = Sums::new(1, 3);
        add_patches_fast(&s, &a, &shape, &mut got);
        got.finish();
        assert_eq!(got.vectors, vectors as f64);
        for (x, y) in want.iter().zip(&got.h[0]) {
            assert!(
                (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                "pad {pad}: {x} vs {y}"
            );
        }
    }
}

#[test]
fn paired_sums_in_parts_are_the_sums_at_once() {
    // The re-round sums a grouped layer's groups apart (one part per thread) and runs a large
    // single group's two products side by side: both must give the sums of one pass over every
    // group, bit for bit. A grouped 3x3 convolution with pads (4 groups, split 1 + 3) and a 1x1
    // one whose product (64 x 64 x 1024 per image) is above the split threshold.
    let conv = |group, cig, k: usize, pad| ConvShape {
        group,
        cig,
        kernel: [k, k],
        stride: [1, 1],
        dilation: [1, 1],
        pads: [pad; 4],
    };
    for (s, shape) in [
        (conv(4, 2, 3, 1), [2, 8, 12, 12]),
        (conv(1, 64, 1, 0), [2, 64, 32, 32]),
    ] {
        let u = WeightUse {
            weight: "w".into(),
            input: "x".into(),
            conv: Some(s),
            bias: None,
        };
        let len: usize = shape.iter().product();
        let x: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
        let y: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos() * 1.5).collect();
        let k = s.cols();
        // Two batches, as the re-round adds them.
        let half = len / 2;
        let batches = [[&x[..half], &y[..half]], [&x[half..], &y[half..]]];
        let dims = [1, shape[1], shape[2], shape[3]];
        let mut whole = Sums::paired(s.group, k);
        for b in &batches {
            u.add_groups(b, &dims, 0..s.group, &mut whole);
        }
        let parts = if s.group > 1 {
            let parts = [0..1, 1..s.group].map(|r| {
                let mut p = Sums::paired(r.len(), k);
                for b in &batches {
                    u.add_groups(b, &dims, r.clone(), &mut p);
                }
                p
            });
            Sums::concat(parts.into())
        } else {
            let mut p = Sums::paired(1, k).with_threads(2);
            for b in &batches {
                u.add_groups(b, &dims, 0..1, &mut p);
            }
            p
        };
        let bits =
            |m: &[Vec<f64>]| -> Vec<u64> { m.iter().flatten().map(|v| v.to_bits()).collect() };
        let (w, p) = (
            whole.into_inputs(k, None, true).unwrap(),
            parts.into_inputs(k, None, true).unwrap(),
        );
        let (wp, pp) = (w.paired.unwrap(), p.paired.unwrap());
        assert_eq!(w.h.len(), s.group);
        assert_eq!(bits(&w.h), bits(&p.h), "groups {}", s.group);
        assert_eq!(bits(&w.mean), bits(&p.mean));
        assert_eq!(bits(&wp.cross), bits(&pp.cross));
        assert_eq!(bits(&wp.mean), bits(&pp.mean));
        assert_eq!(w.vectors, p.vectors);
        // Not vacuous: the two models' inputs differ, and so do their products.
        assert_ne!(bits(&w.h), bits(&wp.cross));
    }
}

#[test]
fn output_error_is_the_quadratic_form_and_centering_removes_the_mean() {
    // Two groups of two rows over three inputs: `Σ_r e_r H_g e_rᵀ`, written out.
    let h = vec![
        vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0],
        vec![1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0],
    ];
    let li = LayerInputs {
        paired: None,
        cols: 3,
        h: h.clone(),
        mean: vec![vec![0.5, -0.25, 1.0], vec![0.0, 1.0, 0.5]],
        vectors: 4.0,
        bias: None,
    };
    let e = [1.0, -1.0, 0.5, 0.0, 2.0, 1.0, -0.5, 0.5, 0.0, 1.0, 1.0, 1.0];
    let quad = |h: &[f64], r: &[f64]| -> f64 {
        (0..3)
            .flat_map(|p| (0..3).map(move |q| (p, q)))
            .map(|(p, q)| r[p] * h[p * 3 + q] * r[q])
            .sum()
    };
    let want: f64 = e
        .chunks(3)
        .enumerate()
        .map(|(r, row)| quad(&h[r / 2], row))
        .sum();
    assert!((li.output_error(&e).unwrap() - want).abs() < 1e-12);
    assert_eq!(li.output_error(&e[..9]), None);
    // Centred: H - N μ μᵀ, so the error of a row drops by N (e·μ)².
    let c = li.centered();
    for (r, row) in e.chunks(3).enumerate() {
        let g = r / 2;
        let dot: f64 = row.iter().zip(&li.mean[g]).map(|(a, b)| a * b).sum();
        let got = quad(&c.h[g], row);
        assert!((got - (quad(&h[g], row) - 4.0 * dot * dot)).abs() < 1e-12);
    }
}

#[test]
fn corrected_bias_cancels_the_mean_output_error() {
    // A 4 x 3 weight in two groups and its bias: with the weight at `w`, the corrected bias
    // minus the fine-tune's must equal -E μ per output channel, up to its 8-bit step.
    let mean = vec![vec![0.5, -0.25, 1.0], vec![0.0, 1.0, 0.5]];
    let wt = |fine: Vec<f32>, base: Vec<f32>| Tensor {
        params: fine.len() as u64,
        base,
        fine,
        ..tensor(&[(0, 0.0)])
    };
    let mut weight = wt(
        (0..12).map(|i| i as f32 * 0.1).collect(),
        (0..12).map(|i| i as f32 * 0.05).collect(),
    );
    weight.bias = Some((1, mean.clone()));
    let mut bias = wt(vec![0.3, -0.2, 0.1, 0.4], vec![0.2, -0.1, 0.0, 0.5]);
    bias.corrects = Some(0);
    bias.index = 7;
    let tensors = [weight, bias];
    let w: Vec<f32> = (0..12)
        .map(|i| i as f32 * 0.1 + [0.2, -0.1, 0.05][i % 3])
        .collect();
    let (j, enc, values) = corrected_bias(&tensors, 0, &w).unwrap();
    assert_eq!(j, 1);
    assert_eq!(enc.codec(), Codec::Q8Groups);
    let e: Vec<f64> = w
        .iter()
        .zip(&tensors[0].fine)
        .map(|(&a, &b)| f64::from(a) - f64::from(b))
        .collect();
    let deltas: Vec<f64> = (0..4)
        .map(|r| {
            let shift: f64 = (0..3).map(|k| e[r * 3 + k] * mean[r / 2][k]).sum();
            f64::from(tensors[1].fine[r]) - shift - f64::from(tensors[1].base[r])
        })
        .collect();
    let step = deltas.iter().fold(0f64, |m, d| m.max(d.abs())) / 127.0;
    for (r, (v, d)) in values.iter().zip(&deltas).enumerate() {
        let got = f64::from(*v) - f64::from(tensors[1].base[r]);
        assert!((got - d).abs() <= step, "channel {r}: {got} vs {d}");
    }
    // No weight error, same bias as the base: nothing to store.
    let same = [
        Tensor {
            bias: Some((1, mean)),
            ..wt(tensors[0].fine.clone(), tensors[0].base.clone())
        },
        wt(vec![0.2, -0.1, 0.0, 0.5], vec![0.2, -0.1, 0.0, 0.5]),
    ];
    let (_, enc, _) = corrected_bias(&same, 0, &same[0].fine).unwrap();
    assert_eq!(enc, Encoded::Unchanged);
}

/// The values of every weight of a model.
type Values = Vec<Vec<f32>>;

/// The species night model, its weights, and the values of every weight in the base and in
/// night.
fn species_night() -> (Vec<u8>, OnnxWeights, Values, Values) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/species/");
    let fine = std::fs::read(format!("{dir}night.onnx")).unwrap();
    let base = std::fs::read(format!("{dir}species-base.onnx")).unwrap();
    let w = OnnxWeights::scan(&fine).unwrap();
    let values = |b: &[u8]| -> Vec<Vec<f32>> {
        w.initializers
            .iter()
            .map(|i| bytemuck::pod_collect_to_vec(&b[i.data.clone()]))
            .collect()
    };
    let (bv, fv) = (values(&base), values(&fine));
    (fine, w, bv, fv)
}

/// An evaluator of the fine-tune `fine` (weights `w`, values `fv`) on 2 threads, searching on the
/// first `search` of `images`, with its reference outputs.
fn referenced<'i>(
    fine: &[u8],
    w: &OnnxWeights,
    fv: &Values,
    images: &'i Images,
    search: usize,
) -> Evaluator<'i> {
    let mut ev = Evaluator::new(
        fine,
        std::sync::Arc::new(w.clone()),
        fv.clone(),
        images,
        search,
        2,
    )
    .unwrap();
    ev.reference_all = ev.logits(images.count).unwrap();
    ev.reference_search = ev.reference_all[..search].to_vec();
    ev
}

#[test]
fn an_evaluation_from_a_cut_equals_a_whole_run() {
    // The search images are all the images, so each evaluation is made twice: from the kept
    // cut (on the search images) and by whole runs (on every image). Weights in and out of
    // model order, a kept change in between, batches of 2 threads with a padded last batch.
    let (fine, w, bv, fv) = species_night();
    let images = species_images(11);
    let mut ev = referenced(&fine, &w, &fv, &images, images.count);
    let n = w.initializers.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| ev.first_step(&[i]));
    let picks = [order[1], order[n / 2], order[n - 1], order[3], order[n / 3]];
    let mut moved = 0;
    for (k, &i) in picks.iter().enumerate() {
        let change = [(i, &bv[i][..])];
        let from_cut = ev.measure(&change, false).unwrap();
        let whole = ev.measure(&change, true).unwrap();
        assert_eq!(from_cut, whole, "weight {i}");
        moved += usize::from(from_cut.0 > 0.0);
        if k == 2 {
            // Kept: later evaluations see it.
            ev.set(&[(order[n / 2 + 1], &bv[order[n / 2 + 1]][..])])
                .unwrap();
        }
    }
    assert!(moved >= 3, "only {moved} of the changes moved the outputs");
    assert_eq!(
        ev.measure(&[], false).unwrap(),
        ev.measure(&[], true).unwrap()
    );
}

#[test]
fn a_wider_search_measures_on_more_images() {
    // Candidates alone on the first 3 images, then the plan on the first 7 (`search_on`): each
    // measure is the mean KL divergence over its images, computed here from whole runs.
    let (fine, w, bv, fv) = species_night();
    let images = species_images(11);
    let mut ev = referenced(&fine, &w, &fv, &images, 3);
    let i = (0..w.initializers.len())
        .max_by_key(|&i| bv[i].len())
        .unwrap();
    let change = [(i, &bv[i][..])];
    let whole_runs = |ev: &mut Evaluator<'_>, n: usize| -> f64 {
        ev.set(&change).unwrap();
        let rows = ev.logits(n).unwrap();
        ev.set(&[(i, &fv[i][..])]).unwrap();
        let kl: f64 = rows
            .iter()
            .zip(&ev.reference_all)
            .map(|(q, r)| {
                r.iter()
                    .zip(q)
                    .map(|(&lp, &lq)| lp.exp() * (lp - lq))
                    .sum::<f64>()
            })
            .sum();
        kl / n as f64
    };
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-12 * a.abs().max(b.abs());
    let narrow = ev.measure(&change, false).unwrap().0;
    let want = whole_runs(&mut ev, 3);
    assert!(close(narrow, want), "3 images: {narrow} against {want}");
    ev.search_on(7);
    let wide = ev.measure(&change, false).unwrap().0;
    let want = whole_runs(&mut ev, 7);
    assert!(close(wide, want), "7 images: {wide} against {want}");
    assert!(!close(narrow, wide), "the 4 more images changed nothing");
}

#[test]
fn the_fine_outputs_target_solves_the_normal_equations() {
    // With `H = Σ x xᵀ`, `C = Σ y xᵀ` and `H_d` the damped `H`: the target `W` satisfies
    // `(W - W_f) H_d = W_f (C - H)`, row by row, in each group.
    let cols = 3;
    let h = vec![
        vec![4.0, 1.0, 0.5, 1.0, 3.0, 0.2, 0.5, 0.2, 2.0],
        vec![2.0, 0.3, 0.0, 0.3, 1.0, 0.1, 0.0, 0.1, 3.0],
    ];
    let cross = vec![
        vec![3.5, 1.2, 0.4, 0.8, 3.1, 0.0, 0.6, 0.1, 2.2],
        vec![2.1, 0.2, 0.1, 0.4, 0.9, 0.0, -0.1, 0.2, 2.7],
    ];
    let li = LayerInputs {
        cols,
        h: h.clone(),
        mean: vec![vec![0.0; cols]; 2],
        vectors: 10.0,
        bias: None,
        paired: Some(Paired {
            cross: cross.clone(),
            mean: vec![vec![0.0; cols]; 2],
        }),
    };
    let fine: Vec<f32> = vec![
        0.5, -1.0, 0.25, 1.5, 0.0, -0.75, -0.5, 2.0, 1.0, 0.125, -0.25, 0.5,
    ];
    let r = li.rounding().unwrap();
    let target = li.fine_outputs_target(&fine, &r, 1).unwrap();
    // Rows solved apart on more threads (one row each with 3) give the same bits.
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for threads in [2, 3] {
        let apart = li.fine_outputs_target(&fine, &r, threads).unwrap();
        assert_eq!(bits(&apart), bits(&target), "{threads} threads");
    }
    for row in 0..4 {
        let g = row / 2;
        let hg = &h[g];
        let damp = codec::OUTPUT_ROUNDING_DAMP * (0..cols).map(|i| hg[i * cols + i]).sum::<f64>()
            / cols as f64;
        let w = |c: usize| f64::from(fine[row * cols + c]);
        let e = |c: usize| f64::from(target[row * cols + c]) - w(c);
        for c in 0..cols {
            let lhs: f64 = (0..cols)
                .map(|a| e(a) * (hg[a * cols + c] + if a == c { damp } else { 0.0 }))
                .sum();
            let rhs: f64 = (0..cols)
                .map(|a| w(a) * (cross[g][a * cols + c] - hg[a * cols + c]))
                .sum();
            assert!(
                (lhs - rhs).abs() <= 1e-5,
                "row {row}, column {c}: {lhs} vs {rhs}"
            );
        }
    }
    // Unpaired inputs have no such target.
    let unpaired = LayerInputs { paired: None, ..li };
    assert!(unpaired.fine_outputs_target(&fine, &r, 2).is_none());
}

#[test]
fn inputs_in_context_equal_whole_runs_of_the_model_so_far() {
    // Each layer's weight goes to the base's as the pass reaches it. The inputs each layer then
    // sees (paired with the fine-tune's) are those of whole runs of the probe model with the
    // layers before it at the base. Two threads, a padded batch.
    let (fine, w, bv, fv) = species_night();
    let images = species_images(5);
    let all: Vec<usize> = (0..w.initializers.len()).collect();
    let mut seen: Vec<(usize, LayerInputs)> = Vec::new();
    let mut steps = Vec::new();
    let rounded = in_context(
        &fine,
        &std::sync::Arc::new(w.clone()),
        fv.clone(),
        fv.clone(),
        &images,
        2,
        &all,
        |i, li| {
            seen.push((i, li.clone()));
            vec![(i, bv[i].clone())]
        },
        |done, total| steps.push((done, total)),
    )
    .unwrap();
    use prost::Message;
    let proto = tract_onnx::pb::ModelProto::decode(&fine[..]).unwrap();
    let layers = weight_uses(proto.graph.as_ref().unwrap(), &w).len();
    assert_eq!(rounded, layers);
    assert_eq!(seen.len(), layers);
    assert_eq!(steps.last(), Some(&(layers, layers)));
    for k in [1, layers - 1] {
        let (i, got) = &seen[k];
        let mut model = fine.clone();
        for (j, _) in &seen[..k] {
            let init = &w.initializers[*j];
            crate::apply::store(init.dtype, &bv[*j], &mut model[init.data.clone()]);
        }
        let want = paired_inputs(&model, &fine, &w, &images, 2);
        let want = &want[&w.initializers[*i].name];
        assert_eq!(got.vectors, want.vectors, "layer {k}");
        let close = |a: &[Vec<f64>], b: &[Vec<f64>], what: &str| {
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                let scale = b.iter().flatten().fold(1f64, |m, v| m.max(v.abs()));
                assert!(
                    (x - y).abs() <= 1e-5 * scale,
                    "layer {k} {what}: {x} vs {y}"
                );
            }
        };
        close(&got.h, &want.h, "H");
        close(&got.mean, &want.mean, "mean");
        let (gp, wp) = (got.paired.as_ref().unwrap(), want.paired.as_ref().unwrap());
        close(&gp.cross, &wp.cross, "cross");
        close(&gp.mean, &wp.mean, "fine-tune's mean");
        if k > 0 {
            // The layers before moved its inputs away from the fine-tune's.
            assert!(got.h != gp.cross, "layer {k}");
        }
    }
}

#[test]
fn small_tensors_may_keep_the_fine_tunes_values() {
    let dims = [8u64, 4, 3, 3];
    let base: Vec<f32> = (0..288).map(|i| (i as f32 * 0.37).sin()).collect();
    let fine: Vec<f32> = base
        .iter()
        .enumerate()
        .map(|(i, b)| b + ((i * 7 % 13) as f32 - 6.0) * 0.013)
        .collect();
    let rebuilt = |c: &[(String, Encoded)], label: &str| {
        c.iter()
            .find(|(l, _)| l == label)
            .map(|(_, e)| reconstruct_encoded(&base, e))
    };
    let c = candidates(&dims, DType::F32, &base, &fine, None);
    assert_eq!(rebuilt(&c, "raw-f32").unwrap(), fine);
    let f16: Vec<f32> = fine
        .iter()
        .map(|&x| half::f16::from_f32(x).to_f32())
        .collect();
    assert_eq!(rebuilt(&c, "raw-f16").unwrap(), f16);
    // An f16 tensor's f16 values are exact: no f32 copy.
    let c = candidates(&dims, DType::F16, &base, &fine, None);
    assert!(rebuilt(&c, "raw-f16").is_some());
    assert!(rebuilt(&c, "raw-f32").is_none());
    // Above the data-free rule's 8-bit limit: no copy at all.
    let n = crate::compress::AUTO_Q8_MAX_ELEMENTS as usize + 1;
    let (base, fine): (Vec<f32>, Vec<f32>) = (vec![0.5; n], vec![0.25; n]);
    let c = candidates(&[n as u64], DType::F32, &base, &fine, None);
    assert!(c.iter().any(|(l, _)| l.starts_with("q8-groups")));
    assert!(!c.iter().any(|(l, _)| l.starts_with("raw")));
}
