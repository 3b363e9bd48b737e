//! The seed recipe (ZIP-0427) is exact, tested against an f64 reference.

use crate::reference::{bitdelta, compress, model, ok, p, scratch, skeleton, tensors};

/// The reference: base + mean|d| * sign(d) with d = fine - base in f64, the mean rounded once to
/// f32, sign(0) = +1, and the f32 sum rounded once (an f32 + f32 sum is exact in f64).
fn seed_reference(base: &[f32], fine: &[f32]) -> (f32, Vec<f32>) {
    let d: Vec<f64> = base
        .iter()
        .zip(fine)
        .map(|(&b, &f)| f as f64 - b as f64)
        .collect();
    let scale = (d.iter().map(|x| x.abs()).sum::<f64>() / d.len() as f64) as f32;
    let w = base
        .iter()
        .zip(&d)
        .map(|(&b, &x)| {
            (b as f64
                + if x >= 0.0 {
                    scale as f64
                } else {
                    -(scale as f64)
                }) as f32
        })
        .collect();
    (scale, w)
}

#[test]
fn seed_delta_reproduces_f64_reference_bit_for_bit() {
    let dir = scratch("seed_reference");
    let delta = dir.join("night.seed.bdelta");
    let out = dir.join("night.seed.onnx");
    compress("night", &delta, "seed");
    ok(&["verify", p(&delta), "--base", p(&model("species-base"))]);
    ok(&[
        "apply",
        "--base",
        p(&model("species-base")),
        p(&delta),
        "-o",
        p(&out),
    ]);
    let base = tensors(&model("species-base"));
    let fine = tensors(&model("night"));
    let applied = tensors(&out);
    assert_eq!(
        base.len(),
        52,
        "the species family has 52 float initializers"
    );
    assert_eq!(applied.len(), base.len());
    let mut changed = 0;
    for (name, (dims, b)) in &base {
        let (_, f) = &fine[name];
        let (adims, got) = &applied[name];
        assert_eq!(dims, adims, "{name}: shape");
        let (_, want) = seed_reference(b, f);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name}[{i}]: got {g}, reference {w}"
            );
        }
        changed += usize::from(got != b);
    }
    assert_eq!(
        changed, 52,
        "every tensor changed in fine-tuning, so every one must move"
    );
    // Everything but the weights is byte-identical to the base.
    assert_eq!(
        std::fs::metadata(&out).unwrap().len(),
        std::fs::metadata(model("species-base")).unwrap().len()
    );
    assert_eq!(skeleton(&out), skeleton(&model("species-base")));
}

#[test]
fn seed_sign_payload_is_ceil_n_over_8_and_file_at_most_1_15_bits_per_param() {
    let dir = scratch("seed_size");
    for variant in ["night", "fog"] {
        let delta = dir.join(format!("{variant}.bdelta"));
        compress(variant, &delta, "seed");
        let j: serde_json::Value =
            serde_json::from_str(&ok(&["inspect", p(&delta), "--json"])).unwrap();
        let tensors = j["tensors"].as_array().unwrap();
        assert_eq!(tensors.len(), 52);
        let mut params = 0u64;
        for t in tensors {
            let n = t["params"].as_u64().unwrap();
            params += n;
            assert_eq!(t["codec"], "sign", "{}", t["name"]);
            assert_eq!(
                t["payload_bytes"].as_u64().unwrap(),
                n.div_ceil(8),
                "{}",
                t["name"]
            );
        }
        let file_bytes = std::fs::metadata(&delta).unwrap().len();
        assert_eq!(j["file_bytes"].as_u64().unwrap(), file_bytes);
        assert_eq!(j["params"].as_u64().unwrap(), params);
        let bpp = file_bytes as f64 * 8.0 / params as f64;
        assert!(
            bpp <= 1.15,
            "{variant}: {bpp:.4} bits/param over the 1.15 budget"
        );
        println!(
            "{variant}: seed delta {file_bytes} bytes for {params} params = {bpp:.4} bits/param"
        );
    }
}

#[test]
fn soup_of_two_seed_deltas_follows_the_composition_rule() {
    let dir = scratch("soup");
    let (n, f) = (dir.join("night.bdelta"), dir.join("fog.bdelta"));
    let base_path = model("species-base");
    for (v, d) in [("night", &n), ("fog", &f)] {
        compress(v, d, "seed");
    }
    let out = dir.join("soup.onnx");
    let (na, fa) = (0.7f32, 0.3f32);
    ok(&[
        "apply",
        "--base",
        p(&base_path),
        &format!("{}@{na}", p(&n)),
        &format!("{}@{fa}", p(&f)),
        "-o",
        p(&out),
    ]);
    let base = tensors(&base_path);
    let night = tensors(&model("night"));
    let fog = tensors(&model("fog"));
    let soup = tensors(&out);
    for (name, (_, b)) in &base {
        // Composition rule: acc = base; acc = acc + (alpha_i * (scale_i * s_i)), each op in f32.
        let ref_n = seed_reference(b, &night[name].1).0;
        let ref_f = seed_reference(b, &fog[name].1).0;
        for (i, &x) in b.iter().enumerate() {
            let sn = if night[name].1[i] as f64 - x as f64 >= 0.0 {
                1.0f32
            } else {
                -1.0
            };
            let sf = if fog[name].1[i] as f64 - x as f64 >= 0.0 {
                1.0f32
            } else {
                -1.0
            };
            let want = (x + na * (ref_n * sn)) + fa * (ref_f * sf);
            assert_eq!(soup[name].1[i].to_bits(), want.to_bits(), "{name}[{i}]");
        }
    }
    // A soup is not one delta: no result fingerprint to check, but a wrong alpha syntax is refused.
    let (code, _, err) = bitdelta(&[
        "apply",
        "--base",
        p(&base_path),
        &format!("{}@inf", p(&n)),
        "-o",
        p(&out),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("alpha"), "{err}");
}
