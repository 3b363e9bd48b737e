//! A variant the compressor was never tuned on: `models/species/unseen/rain.onnx`, the base
//! fine-tuned on rain (streaks, washed-out contrast, noise) by `scripts/make-variant.py`, checked
//! the same way as night and fog (`calib.rs`): `compress --calib` at 1.8 bits/param must keep
//! 99 % of the fine-tune's accuracy on its labelled test images (`unseen/eval.npz`). Accuracy is
//! computed here with tract on the model rebuilt by `bitdelta apply`, independently of the
//! compressor; the calibration images (`unseen/calib/rain/`) are made from training silhouettes,
//! disjoint from the test images.

use std::path::PathBuf;

use crate::quality::accuracy_on;
use crate::reference::{compress_models, model, ok, p, scratch, species, tensors};

const CONDITION: &str = "rain";

fn unseen() -> PathBuf {
    species().join("unseen")
}

fn fine() -> PathBuf {
    unseen().join(format!("{CONDITION}.onnx"))
}

fn eval_set() -> PathBuf {
    unseen().join("eval.npz")
}

#[test]
fn unseen_variant_is_a_real_fine_tune_of_the_base() {
    // Same tensors as the base, every one of them changed, and the change is what makes the
    // difference on the new condition: the base is poor there, the fine-tune good.
    let base = tensors(&model("species-base"));
    let tuned = tensors(&fine());
    assert_eq!(base.len(), 52);
    assert_eq!(
        base.iter().map(|(n, (d, _))| (n, d)).collect::<Vec<_>>(),
        tuned.iter().map(|(n, (d, _))| (n, d)).collect::<Vec<_>>()
    );
    for (name, (_, b)) in &base {
        assert_ne!(b, &tuned[name].1, "{name} unchanged");
    }
    let base_acc = accuracy_on(&model("species-base"), &eval_set(), CONDITION);
    let fine_acc = accuracy_on(&fine(), &eval_set(), CONDITION);
    println!("{CONDITION}: base {base_acc:.3}, fine-tuned {fine_acc:.3}");
    assert!(base_acc < 0.3, "base {base_acc:.3} on {CONDITION}");
    assert!(fine_acc > 0.85, "fine-tune {fine_acc:.3} on {CONDITION}");
    // Calibration images exist and are unlabelled PNGs of the variant's domain.
    let calib = std::fs::read_dir(unseen().join("calib").join(CONDITION))
        .unwrap()
        .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "png")
        .count();
    assert!(calib >= 100, "{calib} calibration images");
}

#[test]
fn calibrated_unseen_variant_keeps_99_percent_at_1_8_bits_per_param() {
    let dir = scratch(&format!("unseen_{CONDITION}"));
    let base = model("species-base");
    let delta = dir.join(format!("{CONDITION}.bdelta"));
    let rebuilt = dir.join(format!("{CONDITION}.onnx"));
    let calib = unseen().join("calib").join(CONDITION);
    let report = compress_models(
        &base,
        &fine(),
        &delta,
        &["--calib", p(&calib), "--max-bits", "1.8", "--verbose"],
    );
    ok(&["verify", p(&delta), "--base", p(&base)]);
    ok(&["apply", "--base", p(&base), p(&delta), "-o", p(&rebuilt)]);
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", p(&delta), "--json"])).unwrap();
    let bpp = std::fs::metadata(&delta).unwrap().len() as f64 * 8.0 / j["params"].as_f64().unwrap();
    let got = accuracy_on(&rebuilt, &eval_set(), CONDITION);
    let fine_acc = accuracy_on(&fine(), &eval_set(), CONDITION);
    println!("{report}");
    println!(
        "{CONDITION}: fine-tuned {fine_acc:.3}, calibrated delta {got:.3} ({:.1} % retention) at {bpp:.3} bits/param",
        100.0 * got / fine_acc
    );

    // `bitdelta eval` on the new set reports what tract measures here.
    let e: serde_json::Value = serde_json::from_str(&ok(&[
        "eval",
        "--base",
        p(&base),
        "--variant",
        p(&delta),
        "--fine",
        p(&fine()),
        "--data",
        p(&eval_set()),
        "--condition",
        CONDITION,
        "--json",
    ]))
    .unwrap();
    assert_eq!(e["images"], 600, "{e}");
    let row = &e["rows"][1];
    assert_eq!(row["kind"], "delta", "{e}");
    assert!(
        (row["accuracy"].as_f64().unwrap() - got).abs() < 1e-9,
        "eval {} vs tract {got}",
        row["accuracy"]
    );
    assert!(
        (row["fine_accuracy"].as_f64().unwrap() - fine_acc).abs() < 1e-9,
        "eval {} vs tract {fine_acc}",
        row["fine_accuracy"]
    );

    assert!(bpp <= 1.8, "{CONDITION}: {bpp:.3} bits/param over 1.8");
    assert!(
        got >= 0.99 * fine_acc,
        "{CONDITION}: retention {:.4} under 99 % ({got:.3} of {fine_acc:.3})",
        got / fine_acc
    );
    assert!(report.contains("codecs: "), "{report}");
    assert!(report.contains("expected agreement"), "{report}");
}
