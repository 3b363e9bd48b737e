//! Unit tests of the calibration search.

use super::evaluation::reconstruct_encoded;
use super::plan::{greedy, lower_hull, Candidate, Tensor};
use super::statistics::{add_patches, mirror, output_roundings, weight_uses, ConvShape};
use super::*;
use crate::codec;
use crate::format::DType;
use crate::onnx::OnnxWeights;

fn cand(cost: u64, divergence: f64) -> Candidate {
    Candidate {
        label: String::new(),
        encoded: Encoded::Unchanged,
        cost,
        stored: Vec::new(),
        divergence,
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
        range: 0..0,
        fine: Vec::new(),
        candidates,
        hull,
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
    let images = Images {
        data: (0..3 * 3 * 32 * 32)
            .map(|i| ((i % 97) as f32 - 48.0) / 30.0)
            .collect(),
        count: 3,
        shape: [3, 32, 32],
    };
    let r = output_roundings(&bytes, &w, &images);
    assert_eq!(r.len(), want.len());
    for (name, r) in &r {
        let dims = &w.get(name).unwrap().dims;
        let n: u64 = dims.iter().product();
        assert_eq!(n % r.cols() as u64, 0, "{name}");
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
