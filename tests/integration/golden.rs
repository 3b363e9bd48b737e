//! Cross-platform golden values: compressing and applying give the same bytes on every build
//! (x86_64 with AVX2 or scalar kernels, aarch64 with NEON under qemu). `tests/data/golden.json`
//! was written by this test with `BITDELTA_BLESS=1` on x86_64; every other build must match it.

use std::path::Path;

use crate::reference::{compress, model, ok, p, scratch, species};

fn hash(path: &Path) -> String {
    blake3::hash(&std::fs::read(path).unwrap())
        .to_hex()
        .to_string()
}

#[test]
fn golden_delta_and_rebuilt_model_are_bit_identical_across_platforms() {
    let dir = scratch("golden");
    let base = model("species-base");
    let mut got = serde_json::Map::new();
    for (v, codec) in [("night", "auto"), ("night", "seed"), ("fog", "auto")] {
        let d = dir.join(format!("{v}.{codec}.bdelta"));
        let o = dir.join(format!("{v}.{codec}.onnx"));
        compress(v, &d, codec);
        ok(&["apply", "--base", p(&base), p(&d), "-o", p(&o)]);
        got.insert(format!("{v}.{codec}.bdelta"), hash(&d).into());
        got.insert(format!("{v}.{codec}.onnx"), hash(&o).into());
    }
    let golden_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/golden.json");
    if std::env::var_os("BITDELTA_BLESS").is_some() {
        let text = serde_json::to_string_pretty(&serde_json::Value::Object(got.clone())).unwrap();
        std::fs::write(&golden_path, text + "\n").unwrap();
    }
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&golden_path).unwrap()).unwrap();
    assert_eq!(
        serde_json::Value::Object(got),
        golden,
        "BLAKE3 of deltas and rebuilt models"
    );
}

#[test]
fn night_variant_names_the_night_images() {
    let dir = scratch("golden_run");
    let base = model("species-base");
    let d = dir.join("night.bdelta");
    compress("night", &d, "auto");
    let images = [
        "night-0001-zebra.png",
        "night-0002-cat.png",
        "night-0003-sheep.png",
    ];
    let paths: Vec<_> = images
        .iter()
        .map(|i| species().join("images").join(i))
        .collect();
    let mut args = vec!["run", "--base", p(&base), "--variant", p(&d), "--json"];
    args.extend(paths.iter().map(|x| p(x)));
    let out = ok(&args);
    let labels: Vec<String> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["label"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(labels, ["zebra", "cat", "sheep"]);
}
