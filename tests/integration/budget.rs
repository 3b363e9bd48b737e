//! The data-free budgeted policy (`compress --max-bits B` without `--calib`): the written file
//! stays within the budget as measured on disk, the rebuilt weights are what an independent
//! decoder of `docs/FORMAT.md` §8–9 (written here, in f32 as the spec says) makes of the file's
//! payloads, the rebuilt model keeps the fine-tune's accuracy (tract), and safetensors
//! checkpoints take the same budget.

use std::collections::BTreeMap;
use std::path::Path;

use bitdelta::codec::Codec;
use bitdelta::format::TensorEntry;
use bitdelta::DeltaFile;
use half::f16;

use crate::checkpoint::{make_pair, read, Pair};
use crate::quality::accuracy;
use crate::reference::{bitdelta, compress_models, model, ok, p, scratch, tensors};

/// Scale `g` of a payload holding f16 (flag bit 0) or f32 scales.
fn scale(bytes: &[u8], f16_scales: bool, g: usize) -> f32 {
    if f16_scales {
        f16::from_le_bytes([bytes[2 * g], bytes[2 * g + 1]]).to_f32()
    } else {
        f32::from_le_bytes(bytes[4 * g..4 * g + 4].try_into().unwrap())
    }
}

/// Bit `i` of LSB-first sign bytes: true for `+`.
fn plus(bits: &[u8], i: usize) -> bool {
    bits[i / 8] >> (i % 8) & 1 == 1
}

/// The weights `e` rebuilds from `base` at alpha 1, by the rules of `docs/FORMAT.md` §8–9.
fn reference_decode(e: &TensorEntry<'_>, base: &[f32]) -> Vec<f32> {
    let (n, bytes) = (base.len(), e.payload_bytes());
    let f16_scales = e.flags & 1 == 1;
    let groups = e.groups as usize;
    let ss = if f16_scales { 2 } else { 4 };
    let group = |i: usize| i / (n / groups);
    let signed = |s: f32, plus: bool| if plus { s } else { -s };
    match e.codec {
        Codec::Unchanged => base.to_vec(),
        Codec::Sign => (0..n)
            .map(|i| base[i] + signed(e.scale, plus(bytes, i)))
            .collect(),
        Codec::SignGroups => {
            let bits = &bytes[groups * ss..];
            (0..n)
                .map(|i| base[i] + signed(scale(bytes, f16_scales, group(i)), plus(bits, i)))
                .collect()
        }
        Codec::Q8Groups => {
            let q = &bytes[groups * ss..];
            (0..n)
                .map(|i| base[i] + scale(bytes, f16_scales, group(i)) * f32::from(q[i] as i8))
                .collect()
        }
        Codec::SignPlanes => {
            let k = bytes.len() / (groups * ss + n.div_ceil(8));
            let bits = &bytes[k * groups * ss..];
            (0..n)
                .map(|i| {
                    let mut acc = base[i];
                    for j in 0..k {
                        let s = scale(bytes, f16_scales, j * groups + group(i));
                        let byte = bits[(i / 8) * k + j];
                        acc += signed(s, byte >> (i % 8) & 1 == 1);
                    }
                    acc
                })
                .collect()
        }
        Codec::SparseSigns => {
            let entries = &bytes[groups * ss..];
            let m = entries.len() / n.div_ceil(64);
            let mut out = base.to_vec();
            for (b, block) in entries.chunks(m).enumerate() {
                for &x in block {
                    let i = 64 * b + usize::from(x & 0x3f);
                    let level = if x & 0x40 != 0 { 2.0 } else { 1.0 };
                    let s = level * scale(bytes, f16_scales, group(i));
                    out[i] = base[i] + signed(s, x & 0x80 == 0);
                }
            }
            out
        }
        other => panic!(
            "{}: codec {} is not a budget candidate",
            e.name,
            other.name()
        ),
    }
}

/// Bytes, params and the codec of every tensor of a delta file.
fn file_stats(delta: &Path) -> (u64, u64, BTreeMap<String, Codec>) {
    let bytes = std::fs::read(delta).unwrap();
    let file = DeltaFile::parse(&bytes).unwrap();
    let codecs = file
        .tensors()
        .map(|e| (e.name.to_owned(), e.codec))
        .collect();
    (bytes.len() as u64, file.params(), codecs)
}

#[test]
fn budget_species_within_max_bits_rebuilds_the_spec_decoding_and_keeps_accuracy() {
    let dir = scratch("budget_species");
    let (base, fine) = (model("species-base"), model("night"));
    let mut seen = BTreeMap::new();
    for max_bits in ["0.8", "1.2"] {
        let delta = dir.join(format!("night-{max_bits}.bdelta"));
        let rebuilt = dir.join(format!("night-{max_bits}.onnx"));
        // --max-bits without --calib or --codec: the budgeted policy.
        let report = compress_models(&base, &fine, &delta, &["--max-bits", max_bits, "-v"]);
        assert!(report.contains("codecs: "), "{report}");
        let (len, params, codecs) = file_stats(&delta);
        let budget = (max_bits.parse::<f64>().unwrap() * params as f64 / 8.0).floor() as u64;
        assert!(
            len <= budget,
            "{max_bits}: {len} bytes over the budget of {budget}"
        );
        // The knapsack spends the budget: what is left is less than one 8-bit tensor's worth.
        assert!(
            len as f64 >= 0.97 * budget as f64,
            "{max_bits}: {len} bytes, budget {budget}"
        );
        for c in codecs.values() {
            *seen.entry(c.name()).or_insert(0) += 1;
        }
        ok(&["verify", p(&delta), "--base", p(&base)]);
        ok(&["apply", "--base", p(&base), p(&delta), "-o", p(&rebuilt)]);
        let bytes = std::fs::read(&delta).unwrap();
        let file = DeltaFile::parse(&bytes).unwrap();
        let (b, got) = (tensors(&base), tensors(&rebuilt));
        for e in file.tensors() {
            let want = reference_decode(&e, &b[e.name].1);
            let have = &got[e.name].1;
            assert_eq!(want.len(), have.len(), "{}", e.name);
            for (i, (w, h)) in want.iter().zip(have).enumerate() {
                assert_eq!(w.to_bits(), h.to_bits(), "{}[{i}]: {h} != {w}", e.name);
            }
        }
        // tract on the rebuilt model, against the fine-tune on the labelled night images.
        let (got, want) = (accuracy(&rebuilt, "night"), accuracy(&fine, "night"));
        println!("budget {max_bits}: {len} bytes, accuracy {got:.3} of {want:.3}");
        assert!(
            got >= 0.93 * want,
            "{max_bits}: accuracy {got:.3} under 93 % of the fine-tune's {want:.3}"
        );
    }
    // The new codecs are part of the choice, beside the shape rule's.
    for codec in ["sign-planes", "sparse-signs", "q8-groups", "unchanged"] {
        assert!(seen.contains_key(codec), "{codec} never chosen: {seen:?}");
    }
}

#[test]
fn budget_below_the_smallest_file_exits_2_naming_the_files() {
    let dir = scratch("budget_refused");
    let (base, fine) = (model("species-base"), model("night"));
    let delta = dir.join("tiny.bdelta");
    let mut args = crate::reference::compress_args(&base, &fine, &delta);
    args.extend(["--max-bits", "0.05"]);
    let (code, _, err) = bitdelta(&args);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains(p(&fine)) && err.contains(p(&base)), "{err}");
    assert!(
        err.contains("expected at least") && err.contains("found 0.05"),
        "{err}"
    );
    assert!(!delta.exists(), "nothing written");
    // A budget for a policy without one, and a budget that is not a number of bits.
    for extra in [
        &["--codec", "auto", "--max-bits", "1"][..],
        &["--max-bits", "0"],
    ] {
        let mut args = crate::reference::compress_args(&base, &fine, &delta);
        args.extend(extra);
        let (code, _, err) = bitdelta(&args);
        assert_eq!(code, 2, "{extra:?}: {err}");
        assert!(err.contains("--max-bits"), "{extra:?}: {err}");
    }
}

/// Σ over tensors of ‖fine − got‖² / ‖fine‖², in f64.
fn relative_error(fine: &crate::checkpoint::Tensors, got: &crate::checkpoint::Tensors) -> f64 {
    fine.iter()
        .map(|(name, (_, _, f))| {
            let g = &got[name].2;
            let e: f64 = f
                .iter()
                .zip(g)
                .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
                .sum();
            let w: f64 = f.iter().map(|&a| f64::from(a).powi(2)).sum();
            e / w
        })
        .sum()
}

#[test]
fn budget_safetensors_within_max_bits_and_below_the_seed_error_at_its_size() {
    let dir = scratch("budget_checkpoint");
    let Pair { base, fine, specs } = make_pair(&dir);
    let (b, f) = (read(&base), read(&fine));
    // The seed recipe's file, and its weight error.
    let (seed, seed_out) = (dir.join("seed.bdelta"), dir.join("seed.safetensors"));
    compress_models(&base, &fine, &seed, &["--codec", "seed"]);
    ok(&["apply", "--base", p(&base), p(&seed), "-o", p(&seed_out)]);
    let (seed_len, params, _) = file_stats(&seed);
    let seed_bits = seed_len as f64 * 8.0 / params as f64;
    let seed_error = relative_error(&f, &read(&seed_out));

    // The budget at the seed's size: every tensor could take the seed's own encoding.
    let max_bits = format!("{seed_bits:.6}");
    let (delta, out) = (dir.join("v.bdelta"), dir.join("v.safetensors"));
    compress_models(
        &base,
        &fine,
        &delta,
        &["--codec", "budget", "--max-bits", &max_bits],
    );
    ok(&["verify", p(&delta)]);
    ok(&["apply", "--base", p(&base), p(&delta), "-o", p(&out)]);
    let (len, params2, _) = file_stats(&delta);
    assert_eq!(params, params2);
    let budget = (max_bits.parse::<f64>().unwrap() * params as f64 / 8.0).floor() as u64;
    assert!(len <= budget, "{len} bytes over the budget of {budget}");

    // Rebuilt weights: the spec decoding of each payload, stored in the tensor's dtype.
    let got = read(&out);
    let bytes = std::fs::read(&delta).unwrap();
    let file = DeltaFile::parse(&bytes).unwrap();
    for s in &specs {
        let e = file.find(s.name).unwrap();
        let want = reference_decode(&e, &b[s.name].2);
        for (i, (w, h)) in want.iter().zip(&got[s.name].2).enumerate() {
            let w = match s.dtype {
                safetensors::Dtype::F16 => f16::from_f32(*w).to_f32(),
                _ => *w,
            };
            assert_eq!(w.to_bits(), h.to_bits(), "{}[{i}]: {h} != {w}", s.name);
        }
    }
    let error = relative_error(&f, &got);
    println!("seed {seed_bits:.3} bits/param: error {seed_error:.6}; budget: {len} bytes, error {error:.6}");
    assert!(
        error < seed_error,
        "budgeted error {error} not below the seed's {seed_error} at the same size"
    );
    // Below the header and table: refused, naming the checkpoints, nothing written.
    let tiny = dir.join("tiny.bdelta");
    let mut args = crate::reference::compress_args(&base, &fine, &tiny);
    args.extend(["--max-bits", "0.01"]);
    let (code, _, err) = bitdelta(&args);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(p(&fine)) && err.contains("expected at least"),
        "{err}"
    );
    assert!(!tiny.exists());
}
