//! safetensors checkpoints: `compress` and `apply` against an independent f64 reference of the
//! codec rules (`docs/FORMAT.md` §9 and §14), and refusals of bad input.

use std::collections::BTreeMap;
use std::path::Path;

use half::f16;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use crate::reference::{bitdelta, compress_models, ok, p, scratch};

pub(crate) struct Spec {
    pub(crate) name: &'static str,
    pub(crate) dtype: Dtype,
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

/// A small transformer-like checkpoint: ranks 0 to 4, f32 and f16, one tensor left untouched by
/// the fine-tuning, and shapes that reach every codec of the auto rule.
fn specs() -> Vec<Spec> {
    vec![
        spec(
            "decoder.layers.0.mlp.up.weight",
            Dtype::F32,
            &[128, 96],
            true,
        ),
        spec("decoder.layers.0.mlp.up.bias", Dtype::F32, &[128], true),
        spec(
            "decoder.layers.0.attn.qkv.weight",
            Dtype::F32,
            &[3, 64, 40],
            true,
        ),
        spec("decoder.layers.0.norm.weight", Dtype::F32, &[96], false),
        spec("embed.weight", Dtype::F16, &[50, 100], true),
        spec("head.weight", Dtype::F32, &[2000, 3], true),
        spec("conv.weight", Dtype::F32, &[8, 4, 3, 3], true),
        spec("logit_scale", Dtype::F32, &[], true),
    ]
}

/// xorshift64: uniform in [-1, 1).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
    }
}

/// Element values as stored, widened to f32.
fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v
            .iter()
            .flat_map(|&x| f16::from_f32(x).to_le_bytes())
            .collect(),
        _ => unreachable!("test dtypes"),
    }
}

fn decode(dtype: Dtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => unreachable!("test dtypes"),
    }
}

/// (base, fine) bytes per spec, fixed seed: base ~ U(-0.5, 0.5), fine = base + U(-0.01, 0.01).
fn pair(specs: &[Spec]) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut rng = Rng(0x005e_ed0f_b17d);
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
        .unzip()
}

fn write(path: &Path, specs: &[Spec], data: &[Vec<u8>]) {
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
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// name -> (dtype, shape, values widened to f32)
pub(crate) type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<f32>)>;

pub(crate) fn read(path: &Path) -> Tensors {
    let bytes = std::fs::read(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(name, t)| {
            (
                name.to_owned(),
                (t.dtype(), t.shape().to_vec(), decode(t.dtype(), t.data())),
            )
        })
        .collect()
}

/// Stores an f32 result in the tensor's dtype and widens it back (f16: round to nearest even).
fn stored(dtype: Dtype, w: f32) -> f32 {
    match dtype {
        Dtype::F16 => f16::from_f32(w).to_f32(),
        _ => w,
    }
}

/// The seed rule: base + mean|d| * sign(d), d = fine - base in f64, the mean rounded once to
/// f32, sign(0) = +1, the f32 sum rounded once (an f32 + f32 sum is exact in f64).
fn seed_reference(base: &[f32], fine: &[f32]) -> Vec<f32> {
    let d: Vec<f64> = base
        .iter()
        .zip(fine)
        .map(|(&b, &f)| f as f64 - b as f64)
        .collect();
    let scale = (d.iter().map(|x| x.abs()).sum::<f64>() / d.len() as f64) as f32;
    base.iter()
        .zip(&d)
        .map(|(&b, &x)| {
            let s = if x >= 0.0 { scale } else { -scale };
            (b as f64 + s as f64) as f32
        })
        .collect()
}

pub(crate) struct Pair {
    pub(crate) base: std::path::PathBuf,
    pub(crate) fine: std::path::PathBuf,
    pub(crate) specs: Vec<Spec>,
}

pub(crate) fn make_pair(dir: &Path) -> Pair {
    let specs = specs();
    let (b, f) = pair(&specs);
    let (base, fine) = (dir.join("base.safetensors"), dir.join("fine.safetensors"));
    write(&base, &specs, &b);
    write(&fine, &specs, &f);
    Pair { base, fine, specs }
}

#[test]
fn checkpoint_seed_compress_apply_matches_f64_reference_bit_for_bit() {
    let dir = scratch("checkpoint_seed");
    let Pair { base, fine, specs } = make_pair(&dir);
    let (delta, out) = (dir.join("v.bdelta"), dir.join("v.safetensors"));
    let summary = compress_models(&base, &fine, &delta, &["--codec", "seed"]);
    assert!(
        summary.contains("8 tensors") && summary.contains("bits/param"),
        "{summary}"
    );
    ok(&["verify", p(&delta)]);
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", p(&delta), "--json"])).unwrap();
    let entries = j["tensors"].as_array().unwrap();
    assert_eq!(entries.len(), specs.len());
    assert!(entries.iter().all(|t| t["codec"] == "sign"), "{entries:?}");
    let names: Vec<&str> = entries
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    assert_eq!(names, sorted, "table in ascending byte order of names");

    ok(&["apply", "--base", p(&base), p(&delta), "-o", p(&out)]);
    let (b, f, got) = (read(&base), read(&fine), read(&out));
    assert_eq!(got.len(), specs.len());
    let mut moved = 0;
    for (name, (dtype, shape, bv)) in &b {
        let (gdtype, gshape, gv) = &got[name];
        assert_eq!((gdtype, gshape), (dtype, shape), "{name}: dtype and shape");
        let want = seed_reference(bv, &f[name].2);
        for (i, (g, w)) in gv.iter().zip(&want).enumerate() {
            let w = stored(*dtype, *w);
            assert_eq!(
                g.to_bits(),
                w.to_bits(),
                "{name}[{i}]: got {g}, reference {w}"
            );
        }
        moved += usize::from(gv != bv);
    }
    assert_eq!(moved, specs.len() - 1, "all but the frozen tensor move");
    // Everything but the weights (header, metadata, layout) is the base's.
    let (bb, ob) = (std::fs::read(&base).unwrap(), std::fs::read(&out).unwrap());
    assert_eq!(bb.len(), ob.len());
    let header = 8 + u64::from_le_bytes(bb[..8].try_into().unwrap()) as usize;
    assert_eq!(bb[..header], ob[..header]);
}

/// The auto rule of `docs/FORMAT.md` §14 on the safetensors dims.
fn auto_codec(shape: &[usize], unchanged: bool) -> &'static str {
    let n: usize = shape.iter().product();
    if unchanged {
        "unchanged"
    } else if shape.len() <= 1 || n <= 4096 {
        "q8-groups"
    } else if n / shape[0] >= 64 {
        "sign-groups"
    } else {
        "sign"
    }
}

#[test]
fn checkpoint_auto_round_trip_within_codec_error() {
    let dir = scratch("checkpoint_auto");
    let Pair { base, fine, specs } = make_pair(&dir);
    // Detected by its header, without the extension.
    let base_bin = dir.join("base.bin");
    std::fs::copy(&base, &base_bin).unwrap();
    let (delta, out) = (dir.join("v.bdelta"), dir.join("v.safetensors"));
    compress_models(&base_bin, &fine, &delta, &[]);
    ok(&["apply", "--base", p(&base), p(&delta), "-o", p(&out)]);
    let j: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", p(&delta), "--json"])).unwrap();
    let codecs: BTreeMap<String, String> = j["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            let s = |k: &str| t[k].as_str().unwrap().to_owned();
            (s("name"), s("codec"))
        })
        .collect();
    let (b, f, got) = (read(&base), read(&fine), read(&out));
    let mut seen = BTreeMap::new();
    for s in &specs {
        let (bv, fv, gv) = (&b[s.name].2, &f[s.name].2, &got[s.name].2);
        let codec = auto_codec(&s.shape, !s.changed);
        assert_eq!(codecs[s.name], codec, "{}: codec", s.name);
        *seen.entry(codec).or_insert(0) += 1;
        let n = bv.len();
        let groups = match codec {
            "q8-groups" if s.shape.len() <= 1 => 1,
            "sign" | "unchanged" => 1,
            _ => s.shape[0],
        };
        let g = n / groups;
        // One rounding to the stored dtype, plus f32 rounding of the sums.
        let slack = |w: f32| {
            let ulp = |x: f32| f32::from_bits(x.abs().to_bits() + 1) - x.abs();
            match s.dtype {
                Dtype::F16 => ulp(f16::from_f32(w).to_f32()) * 8192.0,
                _ => ulp(w) * 2.0,
            }
        };
        for k in 0..groups {
            let r = k * g..(k + 1) * g;
            let d: Vec<f64> = (r.clone()).map(|i| fv[i] as f64 - bv[i] as f64).collect();
            let mean = d.iter().map(|x| x.abs()).sum::<f64>() / g as f64;
            let max = d.iter().fold(0.0f64, |m, x| m.max(x.abs()));
            for (i, &d) in r.zip(&d) {
                let (bi, fi, wi) = (bv[i] as f64, fv[i] as f64, gv[i]);
                let tol = slack(wi) as f64;
                match codec {
                    "unchanged" => assert_eq!(wi.to_bits(), bv[i].to_bits(), "{}[{i}]", s.name),
                    // q8: |w - f| <= scale / 2, scale = max|d| / 127 (f16-rounded, 2^-11).
                    "q8-groups" => {
                        let bound = max / 127.0 * 0.5 * (1.0 + 1.0 / 512.0) + tol;
                        assert!(
                            (wi as f64 - fi).abs() <= bound,
                            "{}[{i}]: |{wi} - {fi}| > {bound}",
                            s.name
                        );
                    }
                    // sign codecs: w = b + sign(d) * mean|d| of the group (f16 scales: 2^-11).
                    _ => {
                        let want = bi + if d >= 0.0 { mean } else { -mean };
                        let bound = mean / 1024.0 + tol;
                        assert!(
                            (wi as f64 - want).abs() <= bound,
                            "{}[{i}]: |{wi} - {want}| > {bound}",
                            s.name
                        );
                    }
                }
            }
        }
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        ["q8-groups", "sign", "sign-groups", "unchanged"],
        "every codec of the rule is exercised"
    );
}

/// Runs a command that must fail with exit code 2, naming `file` in its message.
fn refused(args: &[&str], file: &Path, what: &str) -> String {
    let (code, _, err) = bitdelta(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert!(
        err.contains(p(file)),
        "{args:?}: the message should name {}: {err}",
        file.display()
    );
    assert!(err.contains(what), "{args:?}: expected {what:?} in {err}");
    err
}

#[test]
fn checkpoint_bad_inputs_exit_2_naming_the_file() {
    let dir = scratch("checkpoint_bad");
    let Pair { base, fine, .. } = make_pair(&dir);
    let specs0 = specs();
    let (_, f) = pair(&specs0);
    let delta = dir.join("v.bdelta");
    let compress = |fine: &Path| {
        vec![
            "compress".to_owned(),
            "--base".into(),
            p(&base).into(),
            "--fine".into(),
            p(fine).into(),
            "-o".into(),
            p(&delta).into(),
        ]
    };
    let run = |v: Vec<String>, file: &Path, what: &str| {
        let v: Vec<&str> = v.iter().map(String::as_str).collect();
        refused(&v, file, what)
    };

    // A tensor renamed in the fine-tuned checkpoint.
    let renamed = dir.join("renamed.safetensors");
    let mut s = specs();
    s[5].name = "head.w";
    write(&renamed, &s, &f);
    run(compress(&renamed), &renamed, "\"head.w\"");

    // Another shape (same element count).
    let reshaped = dir.join("reshaped.safetensors");
    let mut s = specs();
    s[5].shape = vec![3, 2000];
    write(&reshaped, &s, &f);
    let err = run(compress(&reshaped), &reshaped, "expected [2000, 3]");
    assert!(err.contains("found [3, 2000]"), "{err}");

    // Non-float and unsupported float dtypes.
    let ints = dir.join("ints.safetensors");
    let mut s = specs();
    s[1].dtype = Dtype::I32;
    write(&ints, &s, &f);
    run(compress(&ints), &ints, "I32");
    let bf16 = dir.join("bf16.safetensors");
    let mut s = specs();
    s[4].dtype = Dtype::BF16;
    write(&bf16, &s, &f);
    run(compress(&bf16), &bf16, "BF16");

    // A truncated file.
    let cut = dir.join("cut.safetensors");
    let bytes = std::fs::read(&fine).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    run(compress(&cut), &cut, "not a valid safetensors file");
    assert!(!delta.exists(), "nothing written on refusal");

    // Apply: another base, a corrupt delta, a composition.
    compress_models(&base, &fine, &delta, &[]);
    let out = dir.join("out.safetensors");
    let err = refused(
        &["apply", "--base", p(&fine), p(&delta), "-o", p(&out)],
        &delta,
        "wrong base",
    );
    assert!(err.contains(p(&fine)), "{err}");
    let corrupt = dir.join("corrupt.bdelta");
    let mut bytes = std::fs::read(&delta).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&corrupt, &bytes).unwrap();
    refused(
        &["apply", "--base", p(&base), p(&corrupt), "-o", p(&out)],
        &corrupt,
        "checksum",
    );
    refused(
        &[
            "apply",
            "--base",
            p(&base),
            &format!("{}@0.5", p(&delta)),
            "-o",
            p(&out),
        ],
        &delta,
        "alpha 1",
    );
    assert!(!out.exists(), "nothing written on refusal");
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");
}
