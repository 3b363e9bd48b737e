//! The command line: help, refusals with clear messages and exit codes, JSON contracts.

use crate::reference::{bitdelta, compress, model, ok, p, scratch};

const COMMANDS: [&str; 10] = [
    "compress", "inspect", "verify", "apply", "run", "serve", "bench", "board", "info", "demo",
];

#[test]
fn every_command_has_help() {
    for c in COMMANDS {
        let out = ok(&[c, "--help"]);
        assert!(out.contains("Usage: bitdelta"), "{c}: {out}");
    }
    let out = ok(&["--help"]);
    for c in COMMANDS {
        assert!(out.contains(c), "top-level help lists {c}");
    }
}

#[test]
fn info_reports_the_kernel_backend() {
    let j: serde_json::Value = serde_json::from_str(&ok(&["info", "--json"])).unwrap();
    let backend = j["backend"].as_str().unwrap();
    let expected: &[&str] = if cfg!(target_arch = "x86_64") {
        &["avx2", "scalar"]
    } else if cfg!(target_arch = "aarch64") {
        &["neon"]
    } else {
        &["scalar"]
    };
    assert!(expected.contains(&backend), "backend {backend}");
}

#[test]
fn bench_json_has_apply_vs_memcpy_and_the_switching_ratios() {
    // A contract test of the JSON shape on small inputs; speed itself is for `bitdelta bench`.
    let out = ok(&[
        "bench",
        "--json",
        "--size-mib",
        "4",
        "--iters",
        "3",
        "--mlp-hidden",
        "64",
        "--switches",
        "4",
    ]);
    let j: serde_json::Value = serde_json::from_str(&out).unwrap();
    let r = j["apply_vs_memcpy"].as_f64().unwrap();
    assert!(r.is_finite() && r > 0.0);
    assert!(j["memcpy_gbps"].as_f64().unwrap() > 0.0);
    for k in [
        "switch_vs_cold_load",
        "switch_peak_rss_vs_one",
        "infer_after_switch_vs_fine",
        "cold_start_vs_fine_load",
    ] {
        assert!(j[k].as_f64().unwrap() > 0.0, "{k}");
        assert!(j["mlp"][k].as_f64().unwrap() > 0.0, "mlp {k}");
    }
}

fn night_delta(dir: &std::path::Path) -> Vec<u8> {
    let delta = dir.join("night.bdelta");
    compress("night", &delta, "auto");
    std::fs::read(&delta).unwrap()
}

/// Runs `verify` on `bytes` (written to a file) and returns (code, stderr).
fn verify(dir: &std::path::Path, name: &str, bytes: &[u8], with_base: bool) -> (i32, String) {
    let f = dir.join(name);
    std::fs::write(&f, bytes).unwrap();
    let base = model("species-base");
    let mut args = vec!["verify", p(&f)];
    if with_base {
        args.extend(["--base", p(&base)]);
    }
    let (code, _, err) = bitdelta(&args);
    if code != 0 {
        assert!(err.contains(p(&f)), "message names the file: {err}");
    }
    (code, err)
}

#[test]
fn verify_refuses_wrong_base_truncation_and_corruption() {
    let dir = scratch("verify_refusals");
    let good = night_delta(&dir);
    assert_eq!(verify(&dir, "good.bdelta", &good, true).0, 0);

    // Wrong base: the night delta checked against the fog model.
    let f = dir.join("good.bdelta");
    let (code, _, err) = bitdelta(&["verify", p(&f), "--base", p(&model("fog"))]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("wrong base model") && err.contains("expects base fingerprint"),
        "{err}"
    );

    // Truncated in the header, in the table, in the payload.
    for cut in [10, 100, good.len() / 2, good.len() - 1] {
        let (code, err) = verify(&dir, "cut.bdelta", &good[..cut], false);
        assert_eq!(code, 1, "cut at {cut}: {err}");
        assert!(
            err.contains("truncated")
                || err.contains("file length mismatch")
                || err.contains("checksum"),
            "{err}"
        );
    }
    let (code, err) = verify(&dir, "short.bdelta", &good[..10], false);
    assert_eq!(code, 1);
    assert!(
        err.contains("expected at least 64 header bytes, found 10"),
        "{err}"
    );

    // Trailing byte.
    let mut long = good.clone();
    long.push(0);
    let (code, err) = verify(&dir, "long.bdelta", &long, false);
    assert_eq!(code, 1);
    assert!(err.contains("file length mismatch"), "{err}");

    // A flipped byte in the last payload: the checksum names the tensor.
    let mut bad = good.clone();
    let at = bad.len() - 3;
    bad[at] ^= 0x10;
    let (code, err) = verify(&dir, "corrupt.bdelta", &bad, false);
    assert_eq!(code, 1);
    assert!(
        err.contains("payload checksum mismatch") && err.contains("tensor \""),
        "{err}"
    );

    // Not a delta at all; a missing file is an error (2), not a verification failure.
    let (code, err) = verify(
        &dir,
        "model.bdelta",
        &std::fs::read(model("night")).unwrap(),
        false,
    );
    assert_eq!(code, 1);
    assert!(err.contains("not a bitdelta file"), "{err}");
    let (code, _, err) = bitdelta(&["verify", p(&dir.join("missing.bdelta"))]);
    assert_eq!(code, 2);
    assert!(err.contains("missing.bdelta"), "{err}");
}

#[test]
fn verify_refuses_every_mutation_cleanly() {
    let dir = scratch("verify_mutations");
    let good = night_delta(&dir);
    // Every byte of the first 512 and a stride through the payload, each flipped in turn: all
    // bytes are covered by a checksum, so each must be refused with exit 1 and a message.
    let mut offsets: Vec<usize> = (0..512.min(good.len())).collect();
    offsets.extend((512..good.len()).step_by(97));
    for &o in &offsets {
        let mut m = good.clone();
        m[o] ^= 1 << (o % 8);
        let (code, err) = verify(&dir, "m.bdelta", &m, false);
        assert_eq!(code, 1, "flip at {o}: {err}");
        assert!(err.starts_with("verify failed:"), "flip at {o}: {err}");
    }
    assert!(offsets.len() > 300, "hundreds of mutations");
}

#[test]
fn apply_refuses_a_delta_for_another_base_and_writes_nothing() {
    let dir = scratch("apply_wrong_base");
    night_delta(&dir);
    let out = dir.join("out.onnx");
    let (code, _, err) = bitdelta(&[
        "apply",
        "--base",
        p(&model("fog")),
        p(&dir.join("night.bdelta")),
        "-o",
        p(&out),
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("night.bdelta") && err.contains("wrong base model"),
        "{err}"
    );
    assert!(!out.exists());
}

#[test]
fn compress_refuses_models_that_do_not_match() {
    let dir = scratch("compress_mismatch");
    let junk = dir.join("junk.onnx");
    std::fs::write(&junk, b"\x08\x07not a model").unwrap();
    let (code, _, err) = bitdelta(&[
        "compress",
        "--base",
        p(&model("species-base")),
        "--fine",
        p(&junk),
        "-o",
        p(&dir.join("x.bdelta")),
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("junk.onnx"), "{err}");
}

#[test]
fn board_check_predicts_the_species_model_fits_and_a_huge_budget_miss() {
    let j: serde_json::Value = serde_json::from_str(&ok(&["board", "list", "--json"])).unwrap();
    let names: Vec<&str> = j
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "raspberry-pi-4",
            "raspberry-pi-5",
            "jetson-orin-nano",
            "generic-aarch64"
        ]
    );
    let base = model("species-base");
    let j: serde_json::Value = serde_json::from_str(&ok(&[
        "board",
        "check",
        "--board",
        "raspberry-pi-4",
        "--base",
        p(&base),
        "--json",
    ]))
    .unwrap();
    assert_eq!(j["fits"], true);
    // 279,018 f32 weights = 1.064 MiB; the prediction is 25 MiB + 3.2 x weights at peak.
    let w = j["weights_mib"].as_f64().unwrap();
    assert!((w - 279_018.0 * 4.0 / 1048576.0).abs() < 1e-9, "{w}");
    assert!((j["cold_start_peak_mib"].as_f64().unwrap() - (25.0 + 3.2 * w)).abs() < 1e-9);
    let (code, _, err) = bitdelta(&["board", "check", "--board", "pi-zero", "--base", p(&base)]);
    assert_eq!(code, 2);
    assert!(
        err.contains("unknown board \"pi-zero\"") && err.contains("raspberry-pi-4"),
        "{err}"
    );
}
