//! Tests of the checkpoint compressor and applier against `write_delta` and the ONNX path.

use std::collections::HashMap;
use std::io::Cursor;

use safetensors::tensor::TensorView;

use super::*;
use crate::compress::Policy;
use crate::format::{write_delta, Codec, DeltaFile, TensorRecord};

/// A fresh scratch folder, removed when dropped.
fn scratch(test: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("bitdelta-ckpt-{test}-"))
        .tempdir()
        .unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

struct Spec {
    name: &'static str,
    dtype: Dtype,
    shape: Vec<usize>,
    changed: bool,
}

fn spec(name: &'static str, dtype: Dtype, shape: &[usize], changed: bool) -> Spec {
    Spec {
        name,
        dtype,
        shape: shape.to_vec(),
        changed,
    }
}

/// Every codec of the auto rule, both dtypes, a scalar, an empty tensor, and names whose
/// byte order differs from their case-insensitive order.
fn specs() -> Vec<Spec> {
    vec![
        spec("blk.0.w", Dtype::F32, &[96, 80], true),
        spec("blk.0.b", Dtype::F32, &[96], true),
        spec("blk.1.w", Dtype::F32, &[16, 32], true),
        spec("emb", Dtype::F16, &[40, 130], true),
        spec("narrow", Dtype::F32, &[1100, 5], true),
        spec("frozen", Dtype::F32, &[8, 8], false),
        spec("scalar", Dtype::F32, &[], true),
        spec("Zeta.conv", Dtype::F32, &[4, 3, 3, 3], true),
        spec("empty", Dtype::F32, &[0, 4], false),
    ]
}

fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
            .collect(),
        _ => unreachable!("test dtypes"),
    }
}

/// (base, fine) tensor bytes for `specs`: fine = base + noise on changed tensors.
fn pair(specs: &[Spec], seed: u64) -> Vec<(Vec<u8>, Vec<u8>)> {
    let mut rng = Rng(seed);
    specs
        .iter()
        .map(|s| {
            let n: usize = s.shape.iter().product();
            let b: Vec<f32> = (0..n).map(|_| rng.next() * 0.5).collect();
            let f: Vec<f32> = b
                .iter()
                .map(|&x| if s.changed { x + rng.next() * 0.01 } else { x })
                .collect();
            (encode(s.dtype, &b), encode(s.dtype, &f))
        })
        .collect()
}

fn write_st(path: &Path, specs: &[Spec], data: &[Vec<u8>]) {
    let views: Vec<(&str, TensorView<'_>)> = specs
        .iter()
        .zip(data)
        .map(|(s, d)| {
            (
                s.name,
                TensorView::new(s.dtype, s.shape.clone(), d).unwrap(),
            )
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    std::fs::write(path, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
}

/// A checkpoint whose tensor data starts 2 bytes off a 4-byte boundary (the header JSON is
/// written by hand and padded so).
fn write_unaligned(path: &Path, specs: &[Spec], data: &[Vec<u8>]) {
    let mut json = String::from("{");
    let mut off = 0;
    let mut body = Vec::new();
    for (k, (s, d)) in specs.iter().zip(data).enumerate() {
        let shape: Vec<String> = s.shape.iter().map(|d| d.to_string()).collect();
        json += &format!(
            "{}\"{}\":{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
            if k == 0 { "" } else { "," },
            s.name,
            s.dtype,
            shape.join(","),
            off,
            off + d.len()
        );
        off += d.len();
        body.extend_from_slice(d);
    }
    json.push('}');
    while (8 + json.len()) % 4 != 2 {
        json.push(' ');
    }
    let mut file = (json.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(json.as_bytes());
    file.extend_from_slice(&body);
    std::fs::write(path, file).unwrap();
}

fn checkpoints(dir: &Path, specs: &[Spec], seed: u64) -> (Checkpoint, Checkpoint) {
    let data = pair(specs, seed);
    let (b, f): (Vec<_>, Vec<_>) = data.into_iter().unzip();
    write_st(&dir.join("base.safetensors"), specs, &b);
    write_st(&dir.join("fine.safetensors"), specs, &f);
    (
        Checkpoint::open(dir.join("base.safetensors")).unwrap(),
        Checkpoint::open(dir.join("fine.safetensors")).unwrap(),
    )
}

fn opts(policy: Policy) -> Options<'static> {
    Options {
        name: "variant-1",
        description: "a test variant",
        labels: "",
        sequence: 7,
        policy,
    }
}

fn values(c: &Checkpoint, t: &CheckpointTensor) -> Vec<f32> {
    let mut v = Vec::new();
    as_f32(c.data(t), t.dtype, &mut v).to_vec()
}

/// The same tensors through `write_delta`, the result fingerprint through `DeltaFile`.
fn reference(base: &Checkpoint, fine: &Checkpoint, opts: &Options<'_>) -> Vec<u8> {
    let mut records: Vec<TensorRecord> = base
        .weights()
        .zip(fine.weights())
        .map(|(b, f)| TensorRecord {
            name: b.name.clone(),
            dtype: b.dtype,
            dims: b.dims.iter().map(|&d| d as u32).collect(),
            encoded: crate::compress::encode(
                opts.policy,
                &b.dims,
                &values(base, b),
                &values(fine, f),
            ),
        })
        .collect();
    let mut base_fp = Fingerprinter::new();
    for t in base.weights() {
        base_fp.add(&t.name, t.dtype, &t.dims, base.data(t));
    }
    let mut manifest = crate::compress::draft_manifest(opts);
    manifest.base_fingerprint = base_fp.finish();
    let draft = write_delta(&manifest, &mut records, DEFAULT_ALIGN).unwrap();
    let parsed = DeltaFile::parse(&draft).unwrap();
    let mut fp = Fingerprinter::new();
    for (i, t) in base.weights().enumerate() {
        let e = parsed.tensor(i).unwrap();
        assert_eq!(e.name, t.name);
        let mut v = vec![0f32; t.numel() as usize];
        compose::reconstruct(
            base_view(base.data(t), t.dtype),
            &[(e.payload().unwrap(), 1.0)],
            &mut v,
        )
        .unwrap();
        let mut stored = vec![0u8; t.data.len()];
        crate::apply::store(t.dtype, &v, &mut stored);
        fp.add(&t.name, t.dtype, &t.dims, &stored);
    }
    manifest.result_fingerprint = fp.finish();
    write_delta(&manifest, &mut records, DEFAULT_ALIGN).unwrap()
}

fn compress(base: &Checkpoint, fine: &Checkpoint, opts: &Options<'_>) -> (Vec<u8>, Summary) {
    let mut out = Cursor::new(Vec::new());
    let mut calls = Vec::new();
    let summary =
        compress_checkpoint(base, fine, opts, &mut out, |d, t| calls.push((d, t))).unwrap();
    assert_eq!(out.position(), summary.file_len);
    assert_eq!(calls.len(), base.weights().count());
    assert_eq!(
        calls.last().unwrap(),
        &(base.weight_bytes(), base.weight_bytes())
    );
    (out.into_inner(), summary)
}

#[test]
fn checkpoint_streaming_delta_is_byte_identical_to_write_delta() {
    let dir = scratch("identical");
    let (base, fine) = checkpoints(dir.path(), &specs(), 1);
    assert_eq!(
        base.weights().count(),
        8,
        "the empty tensor is not a weight"
    );
    for policy in [Policy::Seed, Policy::Auto] {
        let o = opts(policy);
        let (delta, summary) = compress(&base, &fine, &o);
        let want = reference(&base, &fine, &o);
        assert_eq!(delta.len(), want.len(), "{policy:?}: length");
        assert!(delta == want, "{policy:?}: bytes differ from write_delta");
        let parsed = DeltaFile::parse(&delta).unwrap();
        parsed.verify_payloads().unwrap();
        assert_eq!(
            parsed.manifest().result_fingerprint,
            summary.result_fingerprint
        );
        assert_eq!(summary.params, parsed.params());
        let codecs: Vec<_> = parsed.tensors().map(|e| (e.name, e.codec)).collect();
        let names: Vec<_> = codecs.iter().map(|c| c.0).collect();
        assert_eq!(
            names,
            [
                "Zeta.conv",
                "blk.0.b",
                "blk.0.w",
                "blk.1.w",
                "emb",
                "frozen",
                "narrow",
                "scalar"
            ]
        );
        if policy == Policy::Auto {
            let want = [
                Codec::Q8Groups,
                Codec::Q8Groups,
                Codec::SignGroups,
                Codec::Q8Groups,
                Codec::SignGroups,
                Codec::Unchanged,
                Codec::Sign,
                Codec::Q8Groups,
            ];
            assert_eq!(codecs.iter().map(|c| c.1).collect::<Vec<_>>(), want);
        } else {
            assert!(codecs.iter().all(|c| c.1 == Codec::Sign));
        }
        verify_delta(&mut Cursor::new(&delta)).unwrap();
    }
}

/// An ONNX model whose graph holds `specs` as raw-data initializers.
fn onnx_model(specs: &[Spec], data: &[Vec<u8>]) -> Vec<u8> {
    use prost::encoding::{encode_key, encode_varint, WireType};
    let field = |number: u32, bytes: &[u8], out: &mut Vec<u8>| {
        encode_key(number, WireType::LengthDelimited, out);
        encode_varint(bytes.len() as u64, out);
        out.extend_from_slice(bytes);
    };
    let mut graph = Vec::new();
    for (s, d) in specs.iter().zip(data) {
        let mut t = Vec::new();
        for &dim in &s.shape {
            encode_key(1, WireType::Varint, &mut t);
            encode_varint(dim as u64, &mut t);
        }
        encode_key(2, WireType::Varint, &mut t);
        encode_varint(if s.dtype == Dtype::F16 { 10 } else { 1 }, &mut t);
        field(8, s.name.as_bytes(), &mut t);
        field(9, d, &mut t);
        field(5, &t, &mut graph);
    }
    let mut model = Vec::new();
    field(7, &graph, &mut model);
    model
}

/// The streaming checkpoint writer and the in-memory ONNX writer give the same file for the
/// same tensors: both lay out the delta with `format::DeltaWriter`.
#[test]
fn checkpoint_and_onnx_writers_give_byte_identical_deltas() {
    let dir = scratch("onnx-identical");
    let specs = specs();
    let data = pair(&specs, 4);
    let (b, f): (Vec<_>, Vec<_>) = data.into_iter().unzip();
    write_st(&dir.path().join("base.safetensors"), &specs, &b);
    write_st(&dir.path().join("fine.safetensors"), &specs, &f);
    let open = |n: &str| Checkpoint::open(dir.path().join(n)).unwrap();
    let (base, fine) = (open("base.safetensors"), open("fine.safetensors"));
    let (base_onnx, fine_onnx) = (onnx_model(&specs, &b), onnx_model(&specs, &f));
    let base_w = crate::onnx::scan(&base_onnx).unwrap();
    let fine_w = crate::onnx::scan(&fine_onnx).unwrap();
    assert_eq!(base_w.initializers.len(), base.weights().count());
    for policy in [Policy::Seed, Policy::Auto] {
        let o = opts(policy);
        let (delta, _) = compress(&base, &fine, &o);
        let from_onnx =
            crate::compress::compress_onnx(&base_onnx, &base_w, &fine_onnx, &fine_w, &o, |_, _| {})
                .unwrap();
        assert_eq!(delta.len(), from_onnx.len(), "{policy:?}: length");
        assert!(delta == from_onnx, "{policy:?}: bytes differ");
    }
}

#[test]
fn checkpoint_unaligned_data_gives_the_same_delta() {
    let dir = scratch("unaligned");
    let specs = specs();
    let data = pair(&specs, 2);
    let (b, f): (Vec<_>, Vec<_>) = data.into_iter().unzip();
    write_st(&dir.path().join("base.safetensors"), &specs, &b);
    write_st(&dir.path().join("fine.safetensors"), &specs, &f);
    write_unaligned(&dir.path().join("base-u.safetensors"), &specs, &b);
    write_unaligned(&dir.path().join("fine-u.safetensors"), &specs, &f);
    let open = |n: &str| Checkpoint::open(dir.path().join(n)).unwrap();
    let (base, fine) = (open("base.safetensors"), open("fine.safetensors"));
    let (base_u, fine_u) = (open("base-u.safetensors"), open("fine-u.safetensors"));
    assert_eq!(base_u.header_bytes().len() % 4, 2);
    let o = opts(Policy::Auto);
    assert!(compress(&base, &fine, &o).0 == compress(&base_u, &fine_u, &o).0);
}

#[test]
fn checkpoint_apply_rebuilds_the_reference_and_keeps_the_layout() {
    let dir = scratch("apply");
    let (base, fine) = checkpoints(dir.path(), &specs(), 3);
    for policy in [Policy::Seed, Policy::Auto] {
        let (delta, summary) = compress(&base, &fine, &opts(policy));
        let parsed = DeltaFile::parse(&delta).unwrap();
        let mut out = Cursor::new(Vec::new());
        let fp = apply_checkpoint(&base, &mut Cursor::new(&delta), &mut out, |_, _| {}).unwrap();
        assert_eq!(fp, summary.result_fingerprint);
        let out = out.into_inner();
        assert_eq!(out.len() as u64, base.len());
        assert_eq!(&out[..base.header_bytes().len()], base.header_bytes());
        let st = SafeTensors::deserialize(&out).unwrap();
        for (i, t) in base.weights().enumerate() {
            let e = parsed.tensor(i).unwrap();
            let mut v = vec![0f32; t.numel() as usize];
            compose::reconstruct(
                base_view(base.data(t), t.dtype),
                &[(e.payload().unwrap(), 1.0)],
                &mut v,
            )
            .unwrap();
            let mut want = vec![0u8; t.data.len()];
            crate::apply::store(t.dtype, &v, &mut want);
            let got = st.tensor(&t.name).unwrap();
            assert_eq!(
                got.shape(),
                t.dims.iter().map(|&d| d as usize).collect::<Vec<_>>()
            );
            assert!(got.data() == &want[..], "{policy:?} {}", t.name);
            // Only the frozen tensor keeps its values (seed: a zero scale; auto: `unchanged`).
            assert_eq!(
                got.data() == base.data(t),
                t.name == "frozen",
                "{policy:?} {}",
                t.name
            );
            if policy == Policy::Auto {
                assert_eq!(e.codec == Codec::Unchanged, t.name == "frozen");
            }
        }
    }
}

#[test]
fn checkpoint_apply_refuses_another_base_and_a_corrupt_delta() {
    let dir = scratch("refuse");
    let (base, fine) = checkpoints(dir.path(), &specs(), 4);
    let (delta, _) = compress(&base, &fine, &opts(Policy::Seed));
    let mut out = Cursor::new(Vec::new());
    let e = apply_checkpoint(&fine, &mut Cursor::new(&delta), &mut out, |_, _| {});
    assert!(
        matches!(e, Err(CheckpointError::Apply(ApplyError::WrongBase { .. }))),
        "{e:?}"
    );
    assert!(
        out.get_ref().is_empty(),
        "nothing is written before the binding checks"
    );

    // One flipped bit in the last payload: the CRC catches it, for that tensor.
    let mut bad = delta.clone();
    *bad.last_mut().unwrap() ^= 0x10;
    let e = apply_checkpoint(&base, &mut Cursor::new(&bad), &mut out, |_, _| {}).unwrap_err();
    match &e {
        CheckpointError::Apply(ApplyError::Format { tensor, error, .. }) => {
            assert_eq!(tensor.as_deref(), Some("scalar"));
            assert!(
                matches!(error, FormatError::PayloadChecksum { .. }),
                "{error:?}"
            );
        }
        e => panic!("{e:?}"),
    }
    assert!(verify_delta(&mut Cursor::new(&bad)).is_err());

    let cut = &delta[..delta.len() - 3];
    let e = apply_checkpoint(&base, &mut Cursor::new(cut), &mut out, |_, _| {}).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Apply(ApplyError::Format { .. })),
        "{e:?}"
    );
}

#[test]
fn checkpoint_pairs_must_match_and_hold_f32_or_f16() {
    let dir = scratch("mismatch");
    let specs_a = specs();
    let data = pair(&specs_a, 5);
    let (b, f): (Vec<_>, Vec<_>) = data.into_iter().unzip();
    write_st(&dir.path().join("base.safetensors"), &specs_a, &b);
    let base = Checkpoint::open(dir.path().join("base.safetensors")).unwrap();
    let o = opts(Policy::Auto);
    let run = |specs: &[Spec], data: &[Vec<u8>]| {
        let path = dir.path().join("fine.safetensors");
        write_st(&path, specs, data);
        let fine = Checkpoint::open(&path)?;
        compress_checkpoint(&base, &fine, &o, &mut Cursor::new(Vec::new()), |_, _| {})
    };

    let mut s = specs();
    s[4].shape = vec![5500];
    let e = run(&s, &f).unwrap_err();
    assert!(
        e.to_string()
            .contains("tensor \"narrow\": shape differs: expected [1100, 5]"),
        "{e}"
    );
    assert!(e.to_string().contains("found [5500]"), "{e}");

    let mut s = specs();
    s[3].name = "embed";
    let e = run(&s, &f).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::Missing { name, .. } if name == "emb"),
        "{e}"
    );

    let mut s = specs();
    s[0].dtype = Dtype::BF16;
    let mut d = f.clone();
    let half = d[0].len() / 2;
    d[0].truncate(half);
    let e = run(&s, &d).unwrap_err();
    assert!(
        matches!(
            e,
            CheckpointError::UnsupportedDType {
                dtype: Dtype::BF16,
                ..
            }
        ),
        "{e}"
    );

    let mut d = f.clone();
    d[1][0..4].copy_from_slice(&f32::NAN.to_le_bytes());
    let e = run(&specs(), &d).unwrap_err();
    assert!(
        matches!(&e, CheckpointError::NonFinite { name, .. } if name == "blk.0.b"),
        "{e}"
    );

    // A scale the format cannot hold (mean |d| over 1e6) is refused, as write_delta does.
    let mut d = f.clone();
    for c in d[1].chunks_exact_mut(4) {
        c.copy_from_slice(&5.0e6f32.to_le_bytes());
    }
    let path = dir.path().join("fine.safetensors");
    write_st(&path, &specs(), &d);
    let fine = Checkpoint::open(&path).unwrap();
    let seed = opts(Policy::Seed);
    let e = compress_checkpoint(&base, &fine, &seed, &mut Cursor::new(Vec::new()), |_, _| {});
    assert!(
        matches!(&e, Err(CheckpointError::Write(WriteError::Inconsistent(n))) if n == "blk.0.b"),
        "{e:?}"
    );

    let path = dir.path().join("cut.safetensors");
    let full = std::fs::read(dir.path().join("base.safetensors")).unwrap();
    std::fs::write(&path, &full[..full.len() - 1]).unwrap();
    let e = Checkpoint::open(&path).unwrap_err();
    assert!(matches!(e, CheckpointError::Invalid { .. }), "{e}");
    assert!(e.to_string().contains("cut.safetensors"), "{e}");
}
