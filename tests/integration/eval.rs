//! `bitdelta eval` against an independent reference: tract run directly on the ONNX files (the
//! fine-tunes, and models rebuilt by `bitdelta apply`), images and labels read from eval.npz with
//! npyz or decoded from the image files, preprocessing copied from model-card.json, and
//! agreement and KL recomputed in f64 here.

use std::path::{Path, PathBuf};

use serde_json::Value;
use tract_onnx::prelude::*;

use crate::reference::{
    bitdelta, compress, compress_models, model, ok, p, scratch, species, tensors,
};

/// Gray images (`n` x `h` x `w`) with labels.
struct Images {
    gray: Vec<u8>,
    labels: Vec<i64>,
    h: usize,
    w: usize,
}

impl Images {
    fn len(&self) -> usize {
        self.labels.len()
    }

    /// `x_<c>`, `y_<c>` of eval.npz for each condition, concatenated.
    fn npz(conditions: &[&str]) -> Self {
        let mut npz = npyz::npz::NpzArchive::open(species().join("eval.npz")).unwrap();
        let mut set = Self {
            gray: Vec::new(),
            labels: Vec::new(),
            h: 0,
            w: 0,
        };
        for c in conditions {
            let x = npz.by_name(&format!("x_{c}")).unwrap().unwrap();
            let shape = x.shape().to_vec();
            (set.h, set.w) = (shape[1] as usize, shape[2] as usize);
            set.gray.extend(x.into_vec::<u8>().unwrap());
            let y = npz.by_name(&format!("y_{c}")).unwrap().unwrap();
            set.labels.extend(y.into_vec::<i64>().unwrap());
        }
        assert_eq!(set.gray.len(), set.len() * set.h * set.w);
        set
    }

    /// Image files with their label indices, decoded by the image crate.
    fn files(files: &[(PathBuf, usize)]) -> Self {
        let mut set = Self {
            gray: Vec::new(),
            labels: Vec::new(),
            h: 32,
            w: 32,
        };
        for (f, label) in files {
            let g = image::open(f).unwrap().to_luma8();
            assert_eq!(g.dimensions(), (32, 32), "{}", f.display());
            set.gray.extend(g.into_raw());
            set.labels.push(*label as i64);
        }
        set
    }
}

fn card() -> Value {
    serde_json::from_str(&std::fs::read_to_string(species().join("model-card.json")).unwrap())
        .unwrap()
}

fn labels() -> Vec<String> {
    card()["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect()
}

/// Logits of an ONNX model for every image (one tract run over the whole set), preprocessing as
/// model-card.json says: x/255, minus 0.45, divided by 0.225, gray replicated to 3 channels.
fn logits(onnx: &Path, set: &Images) -> Vec<Vec<f32>> {
    let c = card();
    let (scale, mean, std) = (
        c["input"]["scale"].as_f64().unwrap() as f32,
        c["input"]["mean"][0].as_f64().unwrap() as f32,
        c["input"]["std"][0].as_f64().unwrap() as f32,
    );
    let (n, hw) = (set.len(), set.h * set.w);
    let mut input = Vec::with_capacity(n * 3 * hw);
    for img in set.gray.chunks_exact(hw) {
        for _ in 0..3 {
            input.extend(img.iter().map(|&v| (v as f32 * scale - mean) / std));
        }
    }
    let shape = [n, 3, set.h, set.w];
    let plan = tract_onnx::onnx()
        .model_for_path(onnx)
        .unwrap()
        .with_input_fact(0, f32::fact(shape).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let out = plan
        .run(tvec!(Tensor::from_shape(&shape, &input).unwrap().into()))
        .unwrap();
    let flat: Vec<f32> = out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect();
    flat.chunks_exact(flat.len() / n)
        .map(<[f32]>::to_vec)
        .collect()
}

/// Index of the first largest value.
fn top1(v: &[f32]) -> usize {
    (0..v.len()).fold(0, |b, k| if v[k] > v[b] { k } else { b })
}

/// Number of images whose top-1 class is the label.
fn correct(logits: &[Vec<f32>], set: &Images) -> usize {
    logits
        .iter()
        .zip(&set.labels)
        .filter(|(l, &y)| top1(l) as i64 == y)
        .count()
}

/// Fraction of images where both models' top-1 classes agree.
fn agreement(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    p.iter().zip(q).filter(|(a, b)| top1(a) == top1(b)).count() as f64 / p.len() as f64
}

/// Mean KL(softmax(p) || softmax(q)) in f64.
fn mean_kl(p: &[Vec<f32>], q: &[Vec<f32>]) -> f64 {
    let softmax = |v: &[f32]| -> Vec<f64> {
        let m = v
            .iter()
            .map(|&x| x as f64)
            .fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = v.iter().map(|&x| (x as f64 - m).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    };
    let total: f64 = p
        .iter()
        .zip(q)
        .map(|(a, b)| {
            let (pa, pb) = (softmax(a), softmax(b));
            pa.iter()
                .zip(&pb)
                .filter(|(x, _)| **x > 0.0)
                .map(|(x, y)| x * (x / y).ln())
                .sum::<f64>()
        })
        .sum();
    total / p.len() as f64
}

/// Parameters of the base: elements of its float initializers, decoded by prost.
fn params() -> u64 {
    tensors(&model("species-base"))
        .values()
        .map(|(dims, _)| dims.iter().product::<i64>() as u64)
        .sum()
}

fn bits_per_param(files: &[&Path]) -> f64 {
    files
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum::<u64>() as f64
        * 8.0
        / params() as f64
}

/// A delta that stores every tensor of the fine-tune as raw f32: its rebuild is bit-identical to
/// the fine-tune, so eval must find agreement 1 and KL 0 against it.
fn write_exact_delta(variant: &str, out: &Path) {
    use bitdelta::format::{write_delta, DType, Encoded, Manifest, TensorRecord, DEFAULT_ALIGN};
    use bitdelta::onnx::OnnxWeights;
    let base = std::fs::read(model("species-base")).unwrap();
    let fine = std::fs::read(model(variant)).unwrap();
    let mut records: Vec<TensorRecord> = tensors(&model(variant))
        .into_iter()
        .map(|(name, (dims, values))| TensorRecord {
            name,
            dtype: DType::F32,
            dims: dims.iter().map(|&d| d as u32).collect(),
            encoded: Encoded::RawF32(values),
        })
        .collect();
    let manifest = Manifest {
        name: variant,
        description: "the fine-tune, stored exactly",
        labels: "",
        tool: "eval test",
        sequence: 1,
        params: 0,
        base_fingerprint: OnnxWeights::scan(&base).unwrap().fingerprint(&base),
        result_fingerprint: OnnxWeights::scan(&fine).unwrap().fingerprint(&fine),
    };
    std::fs::write(
        out,
        write_delta(&manifest, &mut records, DEFAULT_ALIGN).unwrap(),
    )
    .unwrap();
}

fn eval_json(args: &[&str]) -> Value {
    let mut all = vec!["eval"];
    all.extend(args);
    all.push("--json");
    serde_json::from_str(&ok(&all)).unwrap()
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol
}

#[test]
fn eval_matches_tract_on_the_fine_tune_a_delta_and_an_exact_delta() {
    let dir = scratch("eval_night");
    let (base, fine, npz) = (
        model("species-base"),
        model("night"),
        species().join("eval.npz"),
    );
    let delta = dir.join("night.bdelta");
    let exact = dir.join("night.exact.bdelta");
    let rebuilt = dir.join("night.rebuilt.onnx");
    compress("night", &delta, "auto");
    write_exact_delta("night", &exact);
    ok(&["apply", "--base", p(&base), p(&delta), "-o", p(&rebuilt)]);
    let j = eval_json(&[
        "--base",
        p(&base),
        "--variant",
        p(&delta),
        "--variant",
        p(&exact),
        "--fine",
        p(&fine),
        "--data",
        p(&npz),
        "--condition",
        "night",
    ]);

    let set = Images::npz(&["night"]);
    let n = set.len();
    let (ref_base, ref_fine, ref_delta) = (
        logits(&base, &set),
        logits(&fine, &set),
        logits(&rebuilt, &set),
    );
    let acc = |l: &[Vec<f32>]| correct(l, &set) as f64 / n as f64;
    assert_eq!(params(), 279_018);
    assert_eq!(j["images"], 600);
    assert_eq!(j["condition"], "night");
    assert_eq!(j["data"], p(&npz));
    assert_eq!(j["base"], p(&base));
    let rows = j["rows"].as_array().unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["base", "delta", "delta", "fine"]);
    let (b, d, x, f) = (&rows[0], &rows[1], &rows[2], &rows[3]);

    // Base and fine-tune: accuracy as tract computes it here, nothing to compare with.
    assert_eq!(b["correct"], correct(&ref_base, &set));
    assert!(
        close(b["accuracy"].as_f64().unwrap(), acc(&ref_base), 1e-12),
        "{}",
        b["accuracy"]
    );
    assert_eq!(f["correct"], correct(&ref_fine, &set));
    assert!(
        close(f["accuracy"].as_f64().unwrap(), acc(&ref_fine), 1e-12),
        "{}",
        f["accuracy"]
    );
    assert_eq!(f["path"], p(&fine));
    for r in [b, f] {
        for k in [
            "fine",
            "fine_accuracy",
            "retention",
            "agreement",
            "mean_kl",
            "bits_per_param",
        ] {
            assert!(r[k].is_null(), "{} row: {k} = {}", r["kind"], r[k]);
        }
    }
    assert!(
        acc(&ref_fine) > acc(&ref_base) + 0.5,
        "the fine-tune must differ from the base"
    );

    // The default delta: every number recomputed from tract on the model `apply` rebuilt.
    let fine_acc = acc(&ref_fine);
    assert_eq!(d["name"], "night");
    assert_eq!(d["path"], p(&delta));
    assert_eq!(d["fine"], p(&fine));
    assert!(
        close(d["fine_accuracy"].as_f64().unwrap(), fine_acc, 1e-12),
        "{}",
        d["fine_accuracy"]
    );
    assert_eq!(d["correct"], correct(&ref_delta, &set));
    assert!(
        close(d["accuracy"].as_f64().unwrap(), acc(&ref_delta), 1e-12),
        "{}",
        d["accuracy"]
    );
    let retention = d["retention"].as_f64().unwrap();
    assert!(
        close(retention, acc(&ref_delta) / fine_acc, 1e-12),
        "retention {retention}"
    );
    let agree = d["agreement"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&agree));
    assert!(
        close(agree, agreement(&ref_fine, &ref_delta), 1e-12),
        "agreement {agree}"
    );
    let kl = d["mean_kl"].as_f64().unwrap();
    let ref_kl = mean_kl(&ref_fine, &ref_delta);
    assert!(kl > 0.0, "a lossy delta cannot match the fine-tune exactly");
    assert!(
        close(kl, ref_kl, 1e-5 + 1e-3 * ref_kl),
        "mean KL {kl}, reference {ref_kl}"
    );
    let bpp = d["bits_per_param"].as_f64().unwrap();
    assert!(
        close(bpp, bits_per_param(&[&delta]), 1e-12),
        "bits/param {bpp}"
    );
    assert!(bpp < 4.0, "bits/param {bpp}");

    // The exact delta is the fine-tune itself.
    assert_eq!(x["correct"], f["correct"]);
    assert_eq!(x["accuracy"], f["accuracy"]);
    assert_eq!(x["retention"].as_f64().unwrap(), 1.0);
    assert_eq!(x["agreement"].as_f64().unwrap(), 1.0);
    assert_eq!(x["mean_kl"].as_f64().unwrap(), 0.0);
    assert_eq!(x["fingerprint"], f["fingerprint"]);
    assert!(close(
        x["bits_per_param"].as_f64().unwrap(),
        bits_per_param(&[&exact]),
        1e-12
    ));
    assert!(x["bits_per_param"].as_f64().unwrap() > 32.0);
    assert_ne!(b["fingerprint"], f["fingerprint"]);
    assert_ne!(d["fingerprint"], f["fingerprint"]);
}

/// Copies the sample images of a condition into `<dir>/<species>/`, one re-encoded as JPEG;
/// returns the files with their label index.
fn labelled_folder(dir: &Path, condition: &str) -> Vec<(PathBuf, usize)> {
    let labels = labels();
    let mut out = Vec::new();
    let mut samples: Vec<PathBuf> = std::fs::read_dir(species().join("images"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| {
            f.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with(&format!("{condition}-"))
        })
        .collect();
    samples.sort();
    assert_eq!(samples.len(), 10);
    for (k, src) in samples.iter().enumerate() {
        let stem = src.file_stem().unwrap().to_str().unwrap();
        let species = stem.rsplit('-').next().unwrap();
        let label = labels.iter().position(|l| l == species).unwrap();
        std::fs::create_dir_all(dir.join(species)).unwrap();
        let dst = if k == 1 {
            let dst = dir.join(species).join(format!("{stem}.jpg"));
            image::open(src).unwrap().to_luma8().save(&dst).unwrap();
            dst
        } else {
            let dst = dir.join(species).join(src.file_name().unwrap());
            std::fs::copy(src, &dst).unwrap();
            dst
        };
        out.push((dst, label));
    }
    // Not images: skipped.
    std::fs::write(dir.join("README.txt"), "labelled samples").unwrap();
    std::fs::write(dir.join(&labels[0]).join("notes.txt"), "not an image").unwrap();
    out
}

#[test]
fn eval_reads_a_labelled_folder() {
    let root = scratch("eval_folder");
    let (base, fine) = (model("species-base"), model("night"));
    let mut files = labelled_folder(&root.join("night"), "night");
    let night = Images::files(&files);
    let (b, f) = (logits(&base, &night), logits(&fine, &night));
    let j = eval_json(&[
        "--base",
        p(&base),
        "--fine",
        p(&fine),
        "--data",
        p(&root.join("night")),
    ]);
    assert_eq!(j["images"], 10);
    assert!(j["condition"].is_null());
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["correct"], correct(&b, &night));
    assert_eq!(rows[1]["correct"], correct(&f, &night));
    let got = rows[1]["accuracy"].as_f64().unwrap();
    assert!(
        close(got, correct(&f, &night) as f64 / 10.0, 1e-12),
        "{got}"
    );
    assert!(
        correct(&f, &night) > correct(&b, &night),
        "night images: fine-tune beats the base"
    );

    // <condition>/<label>/<image> with several conditions: one mixed set.
    files.extend(labelled_folder(&root.join("clean"), "clean"));
    let mixed = Images::files(&files);
    let b = logits(&base, &mixed);
    let args = [
        "--base",
        p(&base),
        "--data",
        p(&root),
        "--condition",
        "night,clean",
        "--fine",
        p(&fine),
    ];
    let j = eval_json(&args);
    assert_eq!(j["images"], 20);
    assert_eq!(j["condition"], "night,clean");
    assert_eq!(j["rows"][0]["correct"], correct(&b, &mixed));
    assert_eq!(
        j["rows"][1]["correct"],
        correct(&logits(&fine, &mixed), &mixed)
    );

    // The table names every row.
    let mut human = vec!["eval"];
    human.extend(args);
    let out = ok(&human);
    assert!(out.contains("20 labelled images"), "{out}");
    let table: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(p(&base)) || l.contains(p(&fine)))
        .collect();
    assert_eq!(table.len(), 2, "{out}");
    assert!(
        table[0].starts_with("base") && table[1].contains("fine"),
        "{out}"
    );
}

#[test]
fn eval_runs_a_soup_on_a_mixed_set() {
    let dir = scratch("eval_soup");
    let (base, npz) = (model("species-base"), species().join("eval.npz"));
    let (night, fog) = (dir.join("night.bdelta"), dir.join("fog.bdelta"));
    compress("night", &night, "auto");
    compress("fog", &fog, "auto");
    let soup = dir.join("soup.onnx");
    let (n_half, f_half) = (format!("{}@0.5", p(&night)), format!("{}@0.5", p(&fog)));
    ok(&[
        "apply",
        "--base",
        p(&base),
        &n_half,
        &f_half,
        "-o",
        p(&soup),
    ]);
    let spec = format!("{n_half}+{f_half}");
    let j = eval_json(&[
        "--base",
        p(&base),
        "--variant",
        &spec,
        "--data",
        p(&npz),
        "--condition",
        "night,fog",
    ]);
    let set = Images::npz(&["night", "fog"]);
    assert_eq!(set.len(), 1200);
    assert_eq!(j["images"], 1200);
    assert_eq!(j["condition"], "night,fog");
    let rows = j["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    let (b, s) = (&rows[0], &rows[1]);
    assert_eq!(b["correct"], correct(&logits(&base, &set), &set));
    assert_eq!(s["kind"], "soup");
    assert_eq!(s["name"], "night@0.5+fog@0.5");
    assert_eq!(s["path"], spec);
    assert_eq!(s["correct"], correct(&logits(&soup, &set), &set));
    assert!(s["fine"].is_null() && s["retention"].is_null() && s["mean_kl"].is_null());
    let bpp = s["bits_per_param"].as_f64().unwrap();
    assert!(
        close(bpp, bits_per_param(&[&night, &fog]), 1e-12),
        "bits/param {bpp}"
    );
}

/// Runs eval; it must fail with exit code 2, print no results, and name `what` in the error.
fn fails_naming(args: &[&str], what: &str, also: &str) {
    let mut all = vec!["eval"];
    all.extend(args);
    let (code, out, err) = bitdelta(&all);
    assert_eq!(code, 2, "{all:?}: {err}");
    assert!(out.is_empty(), "{all:?}: printed {out}");
    assert!(
        err.contains(what),
        "{all:?}: error does not name {what}: {err}"
    );
    assert!(
        err.contains(also),
        "{all:?}: error does not say {also:?}: {err}"
    );
}

#[test]
fn eval_bad_input_exits_2_naming_the_file() {
    let dir = scratch("eval_bad");
    let (base, fine, npz) = (
        model("species-base"),
        model("night"),
        species().join("eval.npz"),
    );
    let base_args = ["--base", p(&base)];
    let npz_args = ["--data", p(&npz), "--condition", "night"];
    let with = |extra: &[&str]| -> Vec<String> {
        base_args
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let run = |args: Vec<String>, what: &str, also: &str| {
        fails_naming(
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
            what,
            also,
        );
    };

    // A condition the archive does not have.
    run(
        with(&["--data", p(&npz), "--condition", "night,dusk"]),
        p(&npz),
        "\"dusk\"",
    );
    run(with(&["--data", p(&npz)]), p(&npz), "--condition");

    // A label folder that is not in the model card.
    let wolf = dir.join("set").join("wolf");
    std::fs::create_dir_all(&wolf).unwrap();
    std::fs::copy(
        species().join("images/night-0000-bear.png"),
        wolf.join("a.png"),
    )
    .unwrap();
    run(with(&["--data", p(&dir.join("set"))]), p(&wolf), "\"wolf\"");
    // An image that does not decode.
    let bear = dir.join("broken").join("bear");
    std::fs::create_dir_all(&bear).unwrap();
    std::fs::write(bear.join("a.png"), b"not a png").unwrap();
    run(
        with(&["--data", p(&dir.join("broken"))]),
        p(&bear.join("a.png")),
        "decode",
    );

    // A delta made against another base.
    let wrong = dir.join("wrong.bdelta");
    compress_models(&fine, &model("fog"), &wrong, &[]);
    let mut a = with(&["--variant", p(&wrong)]);
    a.extend(npz_args.map(String::from));
    run(a, p(&wrong), "wrong base");

    // A damaged delta, alone and inside a soup.
    let good = dir.join("night.bdelta");
    compress("night", &good, "auto");
    let mut bytes = std::fs::read(&good).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    let damaged = dir.join("damaged.bdelta");
    std::fs::write(&damaged, bytes).unwrap();
    let mut a = with(&["--variant", p(&damaged)]);
    a.extend(npz_args.map(String::from));
    run(a, p(&damaged), "checksum");
    let soup = format!("{}@0.5+{}@0.5", p(&good), p(&damaged));
    let mut a = with(&["--variant", &soup]);
    a.extend(npz_args.map(String::from));
    run(a, p(&damaged), "checksum");
    let missing = dir.join("missing.bdelta");
    let soup = format!("{}@0.5+{}@0.5", p(&good), p(&missing));
    let mut a = with(&["--variant", &soup]);
    a.extend(npz_args.map(String::from));
    run(a, p(&missing), "cannot read");

    // A model where a delta belongs.
    let mut a = with(&["--variant", p(&fine)]);
    a.extend(npz_args.map(String::from));
    run(a, p(&fine), "--fine");

    // Two references for three variants.
    let g = p(&good);
    let mut a = with(&["--variant", g, "--variant", g, "--variant", g]);
    a.extend(["--fine", p(&fine), "--fine", p(&fine)].map(String::from));
    a.extend(npz_args.map(String::from));
    run(a, "--fine", "--variant");
}
