//! Shared helpers: paths, running the binary, an independent ONNX tensor reader.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use prost::Message;
use tract_onnx::pb::ModelProto;

pub(crate) fn species() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/species")
}

pub(crate) fn model(name: &str) -> PathBuf {
    species().join(format!("{name}.onnx"))
}

/// A fresh scratch folder for one test.
pub(crate) fn scratch(test: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(test);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The binary, prefixed by `BITDELTA_RUNNER` when set (e.g. `qemu-aarch64 -cpu cortex-a72 -L
/// /usr/aarch64-linux-gnu` when the tests themselves run under qemu-user without binfmt).
pub(crate) fn command() -> Command {
    match std::env::var("BITDELTA_RUNNER")
        .ok()
        .filter(|r| !r.trim().is_empty())
    {
        Some(runner) => {
            let mut parts = runner.split_whitespace();
            let mut c = Command::new(parts.next().expect("non-empty"));
            c.args(parts).arg(env!("CARGO_BIN_EXE_bitdelta"));
            c
        }
        None => Command::new(env!("CARGO_BIN_EXE_bitdelta")),
    }
}

/// Runs the binary; returns (exit code, stdout, stderr).
pub(crate) fn bitdelta(args: &[&str]) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = command().args(args).output().expect("binary runs");
    let (out, err) = (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    );
    assert!(
        !err.contains("panicked"),
        "bitdelta {args:?} panicked: {err}"
    );
    (
        status.code().expect("exited, not killed by a signal"),
        out,
        err,
    )
}

/// Like [`bitdelta`] but the command must succeed.
pub(crate) fn ok(args: &[&str]) -> String {
    let (code, out, err) = bitdelta(args);
    assert_eq!(code, 0, "bitdelta {args:?} failed: {err}");
    out
}

pub(crate) fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// `bitdelta compress` of `models/species/<variant>.onnx` against the base into `out`.
pub(crate) fn compress(variant: &str, out: &Path, codec: &str) {
    // "auto" is the default: exercise it without the flag.
    let codec_args: &[&str] = if codec == "auto" {
        &[]
    } else {
        &["--codec", codec]
    };
    compress_models(&model("species-base"), &model(variant), out, codec_args);
}

/// `bitdelta compress --base BASE --fine FINE -o OUT EXTRA...`, which must succeed; its stdout.
pub(crate) fn compress_models(base: &Path, fine: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = compress_args(base, fine, out);
    args.extend(extra);
    ok(&args)
}

/// `compress --base BASE --fine FINE -o OUT`, as arguments.
pub(crate) fn compress_args<'a>(base: &'a Path, fine: &'a Path, out: &'a Path) -> Vec<&'a str> {
    vec![
        "compress",
        "--base",
        p(base),
        "--fine",
        p(fine),
        "-o",
        p(out),
    ]
}

/// Float initializers decoded by prost (tract-onnx's ModelProto), independent of bitdelta's
/// wire walker: name -> (dims, values).
pub(crate) fn tensors(path: &Path) -> BTreeMap<String, (Vec<i64>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let proto = ModelProto::decode(bytes.as_slice()).unwrap();
    let graph = proto.graph.unwrap();
    graph
        .initializer
        .into_iter()
        .filter(|t| t.data_type == 1)
        .map(|t| {
            let v = if t.raw_data.is_empty() {
                t.float_data.clone()
            } else {
                t.raw_data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect()
            };
            (t.name, (t.dims, v))
        })
        .collect()
}

/// The model with every initializer's data removed, for comparing everything else.
pub(crate) fn skeleton(path: &Path) -> ModelProto {
    let mut proto = ModelProto::decode(std::fs::read(path).unwrap().as_slice()).unwrap();
    for t in &mut proto.graph.as_mut().unwrap().initializer {
        if t.data_type == 1 {
            t.raw_data.clear();
            t.float_data.clear();
        }
    }
    proto
}
