//! Calibrated compression (`compress --calib`): the codecs chosen on unlabelled calibration
//! images keep the fine-tune's accuracy on the labelled test images within a bits/param budget.
//! Accuracy is computed here with tract on the model rebuilt by `bitdelta apply`, independently
//! of the compressor; the calibration images (`models/species/calib/`) are made from training
//! silhouettes, disjoint from the test images in `eval.npz`.

use std::path::Path;

use crate::quality::accuracy;
use crate::reference::{bitdelta, compress_args, model, ok, p, scratch, species};

/// `compress --base BASE --fine FINE -o OUT --calib CALIB`.
fn calib_args<'a>(base: &'a Path, fine: &'a Path, out: &'a Path, calib: &'a Path) -> Vec<&'a str> {
    let mut args = compress_args(base, fine, out);
    args.extend(["--calib", p(calib)]);
    args
}

/// Compresses `variant` with `--calib` at `max_bits`; returns (bits/param of the file, accuracy,
/// fine-tune accuracy) and the compressor's report.
fn calibrated(variant: &str, max_bits: &str, dir: &Path) -> (f64, f64, f64, String) {
    let base = model("species-base");
    let delta = dir.join(format!("{variant}.bdelta"));
    let rebuilt = dir.join(format!("{variant}.onnx"));
    let calib = species().join("calib").join(variant);
    let fine = model(variant);
    let mut args = calib_args(&base, &fine, &delta, &calib);
    args.extend(["--max-bits", max_bits, "--verbose"]);
    let (code, report, err) = bitdelta(&args);
    assert_eq!(code, 0, "compress --calib failed: {err}");
    // stderr is a pipe here: one progress line as each stage starts, in order.
    let stages: Vec<&str> = err
        .lines()
        .filter_map(|l| l.strip_prefix("calibrate: "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    assert_eq!(
        stages,
        [
            "inputs",
            "score",
            "reference",
            "sensitivity",
            "measure",
            "refine",
            "reround",
            "confirm"
        ],
        "progress lines in a pipe: {err}"
    );
    ok(&["verify", p(&delta), "--base", p(&base)]);
    ok(&["apply", "--base", p(&base), p(&delta), "-o", p(&rebuilt)]);
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", p(&delta), "--json"])).unwrap();
    let bpp = std::fs::metadata(&delta).unwrap().len() as f64 * 8.0 / j["params"].as_f64().unwrap();
    let got = accuracy(&rebuilt, variant);
    let fine = accuracy(&model(variant), variant);
    (bpp, got, fine, report)
}

fn keeps_99_percent_at_1_8_bits(variant: &str) {
    let dir = scratch(&format!("calib_{variant}"));
    let (bpp, got, fine, report) = calibrated(variant, "1.8", &dir);
    println!("{report}");
    println!(
        "{variant}: fine-tuned {fine:.3}, calibrated delta {got:.3} ({:.1} % retention) at {bpp:.3} bits/param",
        100.0 * got / fine
    );
    assert!(bpp <= 1.8, "{variant}: {bpp:.3} bits/param over 1.8");
    assert!(
        got >= 0.99 * fine,
        "{variant}: retention {:.4} under 99 % ({got:.3} of {fine:.3})",
        got / fine
    );
    // The report names every tensor (--verbose) and sums up the codecs and the expectation.
    assert!(report.contains("codecs: "), "{report}");
    assert!(report.contains("expected agreement"), "{report}");
    // By default the search measures its candidates on the first 64 of the 200 images.
    assert!(
        report.contains("calibration images: ") && report.contains("on the first 64 in"),
        "{report}"
    );
    assert_eq!(
        report.matches("onnx::Conv_").count() + report.matches("fc.").count(),
        52,
        "one line per tensor with --verbose: {report}"
    );
}

#[test]
fn calibrated_night_keeps_99_percent_at_1_8_bits_per_param() {
    keeps_99_percent_at_1_8_bits("night");
}

#[test]
fn calibrated_night_matches_auto_with_fewer_bits_and_more_agreement() {
    // Calibration must beat the data-free default: at least its accuracy, in fewer bits.
    let dir = scratch("calib_night_vs_auto");
    let (bpp, got, fine, report) = calibrated("night", "1.8", &dir);
    let auto = dir.join("auto.bdelta");
    let auto_onnx = dir.join("auto.onnx");
    let base = model("species-base");
    crate::reference::compress("night", &auto, "auto");
    ok(&["apply", "--base", p(&base), p(&auto), "-o", p(&auto_onnx)]);
    let j: serde_json::Value = serde_json::from_str(&ok(&["inspect", p(&auto), "--json"])).unwrap();
    let auto_bpp =
        std::fs::metadata(&auto).unwrap().len() as f64 * 8.0 / j["params"].as_f64().unwrap();
    let auto_acc = accuracy(&auto_onnx, "night");
    println!("{report}");
    println!(
        "night: fine-tuned {fine:.3}; calibrated {got:.3} at {bpp:.3} bits/param; auto {auto_acc:.3} at {auto_bpp:.3}"
    );
    assert!(bpp <= 1.8, "{bpp:.3} bits/param over 1.8");
    assert!(
        bpp < auto_bpp,
        "calibrated {bpp:.3} bits/param, auto {auto_bpp:.3}"
    );
    assert!(
        got >= auto_acc,
        "calibrated {got:.3} under auto {auto_acc:.3}"
    );
    assert!(got >= 0.98 * fine, "retention {:.4} under 98 %", got / fine);
}

#[test]
fn calibrated_fog_keeps_99_percent_at_1_8_bits_per_param() {
    keeps_99_percent_at_1_8_bits("fog");
}

#[test]
fn bad_calibration_folders_exit_2_naming_the_path() {
    let dir = scratch("calib_bad");
    let (base, fine) = (model("species-base"), model("night"));
    let out = dir.join("night.bdelta");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let missing = dir.join("missing");
    let text = dir.join("text");
    std::fs::create_dir_all(&text).unwrap();
    std::fs::write(text.join("notes.txt"), "not an image").unwrap();
    let corrupt = dir.join("corrupt");
    std::fs::create_dir_all(&corrupt).unwrap();
    std::fs::write(corrupt.join("night-1.png"), b"\x89PNG\r\n\x1a\nbroken").unwrap();
    for (folder, named) in [
        (&empty, empty.clone()),
        (&missing, missing.clone()),
        (&text, text.join("notes.txt")),
        (&corrupt, corrupt.join("night-1.png")),
    ] {
        let (code, _, err) = bitdelta(&calib_args(&base, &fine, &out, folder));
        assert_eq!(code, 2, "{}: {err}", folder.display());
        assert!(
            err.contains(p(&named)),
            "error names {}: {err}",
            named.display()
        );
        assert!(!out.exists(), "no delta written for {}", folder.display());
    }
}

#[test]
fn calibration_flags_need_calib_and_sane_values() {
    let dir = scratch("calib_flags");
    let (base, fine) = (model("species-base"), model("night"));
    let out = dir.join("night.bdelta");
    let calib = species().join("calib").join("night");
    let common = [
        "compress",
        "--base",
        p(&base),
        "--fine",
        p(&fine),
        "-o",
        p(&out),
    ];
    for extra in [
        // Without --calib a budget needs the budgeted policy (tests/integration/budget.rs).
        vec!["--codec", "seed", "--max-bits", "1.2"],
        vec!["--target-retention", "0.99"],
        vec!["--calib", p(&calib), "--max-bits", "0"],
        vec!["--calib", p(&calib), "--target-retention", "1.5"],
        vec!["--calib", p(&calib), "--max-bits", "0.05"],
        vec!["--search-images", "8"],
        vec!["--calib", p(&calib), "--search-images", "0"],
        vec!["--calib", p(&calib), "--search-images", "many"],
    ] {
        let args: Vec<&str> = common.iter().copied().chain(extra.clone()).collect();
        let (code, _, err) = bitdelta(&args);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(!out.exists(), "no delta written for {extra:?}");
    }
}

#[test]
fn search_images_sets_the_images_the_search_measures_on() {
    // More than the folder holds: the search uses all of them; the plan is confirmed on all.
    let dir = scratch("calib_search_images");
    let (base, fine) = (model("species-base"), model("night"));
    let calib = species().join("calib").join("night");
    let images = std::fs::read_dir(&calib).unwrap().count();
    for (asked, used) in [("16", 16), ("100000", images)] {
        let out = dir.join(format!("night-{asked}.bdelta"));
        let mut args = calib_args(&base, &fine, &out, &calib);
        args.extend(["--max-bits", "0.8", "--search-images", asked]);
        let (code, report, err) = bitdelta(&args);
        assert_eq!(code, 0, "--search-images {asked}: {err}");
        assert!(
            report.contains(&format!("on {images} calibration images: "))
                && report.contains(&format!("model evaluations on the first {used} in")),
            "--search-images {asked}: {report}"
        );
        ok(&["verify", p(&out), "--base", p(&base)]);
    }
}
