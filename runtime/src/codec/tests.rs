//! Tests of the encoders: each payload rebuilt through the device path.

use super::*;
use crate::compose::{self, Base};
use crate::format::{
    write_delta, DType, DeltaFile, Encoded, Manifest, TensorRecord, DEFAULT_ALIGN,
};
use proptest::prelude::*;

struct Rng(u64);
impl Rng {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % 2_000_001) as f64 / 1_000_000.0 - 1.0
    }
    /// Heavy-tailed, like fine-tuning deltas.
    fn delta(&mut self) -> f32 {
        let u = self.unit();
        (u * u * u * 0.05) as f32
    }
}

fn pair(n: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut r = Rng(seed | 1);
    let base: Vec<f32> = (0..n).map(|_| r.unit() as f32).collect();
    let fine = base.iter().map(|&b| b + r.delta()).collect();
    (base, fine)
}

/// Writes `enc` as the one tensor of a delta, parses it back and rebuilds it on `base`
/// through `compose::reconstruct` (the path a device uses).
fn rebuild(base: &[f32], enc: &Encoded) -> Vec<f32> {
    let manifest = Manifest {
        name: "t",
        description: "",
        labels: "",
        tool: "test",
        sequence: 0,
        params: 0,
        base_fingerprint: [0; 32],
        result_fingerprint: [0; 32],
    };
    let mut recs = [TensorRecord {
        name: "w".into(),
        dtype: DType::F32,
        dims: vec![base.len() as u32],
        encoded: enc.clone(),
    }];
    let file = write_delta(&manifest, &mut recs, DEFAULT_ALIGN).expect("encoders write");
    let f = DeltaFile::parse(&file).expect("parses");
    let p = f.tensor(0).unwrap().payload().expect("payload checks pass");
    let mut out = vec![0f32; base.len()];
    compose::reconstruct(Base::F32(base), &[(p, 1.0)], &mut out).unwrap();
    out
}

fn sq_err(fine: &[f32], rec: &[f32]) -> f64 {
    fine.iter()
        .zip(rec)
        .map(|(&f, &r)| (f64::from(f) - f64::from(r)).powi(2))
        .sum()
}

/// Residual signs (plane `j` = sign of what the planes before left, scale = its mean
/// magnitude), written independently of the encoder, in f64: the fit's starting point.
fn residual_signs(base: &[f32], fine: &[f32], groups: usize, planes: usize) -> Vec<f64> {
    let g = base.len() / groups;
    let mut out = Vec::new();
    for k in 0..groups {
        let mut r: Vec<f64> = (k * g..(k + 1) * g)
            .map(|i| f64::from(fine[i]) - f64::from(base[i]))
            .collect();
        let d = r.clone();
        for _ in 0..planes {
            let s = r.iter().map(|x| x.abs()).sum::<f64>() / g as f64;
            r.iter_mut()
                .for_each(|x| *x -= if *x < 0.0 { -s } else { s });
        }
        out.extend(d.iter().zip(&r).map(|(d, r)| d - r));
    }
    out
}

#[test]
fn planes_fit_never_worse_than_residual_signs() {
    for (n, groups) in [(1, 1), (9, 1), (64, 8), (1000, 10), (4800, 48)] {
        for planes in 2..=4 {
            let (base, fine) = pair(n, (n * planes) as u64);
            let enc = sign_planes(&base, &fine, groups, planes, false);
            let got = sq_err(&fine, &rebuild(&base, &enc));
            let greedy: f64 = residual_signs(&base, &fine, groups, planes)
                .iter()
                .zip(base.iter().zip(&fine))
                .map(|(q, (&b, &f))| (f64::from(f) - f64::from(b) - q).powi(2))
                .sum();
            // f32 scales and f32 reconstruction: a relative slack for rounding only.
            assert!(
                got <= greedy * (1.0 + 1e-5) + 1e-12,
                "n {n} groups {groups} planes {planes}: {got} > {greedy}"
            );
            // More planes, less error; and better than one sign plane.
            let one = sq_err(
                &fine,
                &rebuild(&base, &sign_groups(&base, &fine, groups, false)),
            );
            assert!(got < one || one == 0.0, "{got} vs {one}");
        }
    }
}

#[test]
fn four_levels_are_found_exactly() {
    // Deltas drawn from ±0.5 ± 0.125 (per group, scaled): two planes represent them exactly.
    let n = 240;
    let mut r = Rng(7);
    let base: Vec<f32> = (0..n).map(|_| r.unit() as f32).collect();
    let fine: Vec<f32> = (0..n)
        .map(|i| {
            let g = (i / 60) as f32 + 1.0;
            let a = if r.unit() < 0.0 { -0.5 } else { 0.5 };
            let b = if r.unit() < 0.0 { -0.125 } else { 0.125 };
            base[i] + g * (a + b)
        })
        .collect();
    let enc = sign_planes(&base, &fine, 4, 2, false);
    let rec = rebuild(&base, &enc);
    for (i, (&f, &x)) in fine.iter().zip(&rec).enumerate() {
        assert!((f - x).abs() <= 2e-6, "element {i}: {f} vs {x}");
    }
    let Encoded::SignPlanes { scales, .. } = enc else {
        unreachable!()
    };
    // Largest plane first: plane 0 holds 0.5 * g, plane 1 0.125 * g.
    let OwnedScales::F32(s) = scales else {
        unreachable!()
    };
    for g in 0..4 {
        let m = g as f32 + 1.0;
        assert!((s[g] - 0.5 * m).abs() < 1e-5 && (s[4 + g] - 0.125 * m).abs() < 1e-5);
    }
}

#[test]
fn planes_layout_and_ties() {
    // A zero delta: every bit `+` (as in `sign`), zero scales, padding bits clear.
    let base = [0.5f32; 13];
    let enc = sign_planes(&base, &base, 1, 3, true);
    assert_eq!(
        enc,
        Encoded::SignPlanes {
            planes: 3,
            scales: OwnedScales::F16(vec![f16::ZERO; 3]),
            bits: vec![0xff, 0xff, 0xff, 0x1f, 0x1f, 0x1f],
        }
    );
    assert_eq!(rebuild(&base, &enc), base);
    // Multiplier 1 is the plain fit; another one scales every scale, bits unchanged.
    let (base, fine) = pair(96, 3);
    let plain = sign_planes(&base, &fine, 8, 2, false);
    assert_eq!(sign_planes_scaled(&base, &fine, 8, 2, false, 1.0), plain);
    let (
        Encoded::SignPlanes {
            scales: OwnedScales::F32(a),
            bits: ba,
            ..
        },
        Encoded::SignPlanes {
            scales: OwnedScales::F32(b),
            bits: bb,
            ..
        },
    ) = (plain, sign_planes_scaled(&base, &fine, 8, 2, false, 1.5))
    else {
        unreachable!()
    };
    assert_eq!(ba, bb);
    for (x, y) in a.iter().zip(&b) {
        assert!((f64::from(*y) - 1.5 * f64::from(*x)).abs() <= 1e-6 * f64::from(*y));
    }
}

#[test]
fn sign_planes_multiplied_equals_one_fit_per_multiplier() {
    let (base, fine) = pair(640, 9);
    for (groups, planes, f16) in [(1, 2, true), (10, 3, true), (5, 2, false)] {
        let ms = [1.0, 1.25, 1.5];
        let each = sign_planes_multiplied(&base, &fine, groups, planes, f16, &ms);
        assert_eq!(each.len(), ms.len());
        for (&m, enc) in ms.iter().zip(&each) {
            assert_eq!(
                *enc,
                sign_planes_scaled(&base, &fine, groups, planes, f16, m)
            );
        }
    }
}

#[test]
fn format_md_example() {
    // docs/FORMAT.md §8, "Sign planes": levels ±0.5 ± 0.125.
    let fine = [
        0.625f32, 0.375, -0.375, -0.625, 0.625, 0.625, 0.625, 0.625, -0.625, 0.375,
    ];
    let base = [0f32; 10];
    let enc = sign_planes(&base, &fine, 1, 2, true);
    assert_eq!(
        enc,
        Encoded::SignPlanes {
            planes: 2,
            scales: OwnedScales::F16(vec![f16::from_f32(0.5), f16::from_f32(0.125)]),
            bits: vec![0xf3, 0xf5, 0x02, 0x00],
        }
    );
    assert_eq!(enc.payload_len(), 8);
    assert_eq!(rebuild(&base, &enc), fine);
}

// -----------------------------------------------------------------------------------------
// Output-aware rounding

/// `rows × cols` weights multiplying inputs with correlated features; their `H`.
fn layer(rows: usize, cols: usize, seed: u64) -> (Vec<f32>, Vec<f32>, Vec<f64>) {
    let (base, fine) = pair(rows * cols, seed);
    let mut r = Rng(seed ^ 0x55);
    let samples = 4 * cols;
    let mut h = vec![0f64; cols * cols];
    for _ in 0..samples {
        let common = r.unit();
        let x: Vec<f64> = (0..cols)
            .map(|c| r.unit() + common * (c % 3) as f64)
            .collect();
        for a in 0..cols {
            for b in 0..cols {
                h[a * cols + b] += x[a] * x[b] / samples as f64;
            }
        }
    }
    (base, fine, h)
}

/// `sum over rows of e H eᵀ`, e = the rebuilt row minus the fine-tuned row.
fn output_err(base: &[f32], fine: &[f32], enc: &Encoded, h: &[f64], cols: usize) -> f64 {
    let rec = rebuild(base, enc);
    let e: Vec<f64> = rec
        .iter()
        .zip(fine)
        .map(|(&r, &f)| f64::from(r) - f64::from(f))
        .collect();
    e.chunks(cols)
        .map(|row| {
            (0..cols)
                .map(|a| {
                    (0..cols)
                        .map(|b| row[a] * h[a * cols + b] * row[b])
                        .sum::<f64>()
                })
                .sum::<f64>()
        })
        .sum()
}

/// Inverse of a `k × k` matrix (Gauss-Jordan with partial pivoting), `None` when singular.
fn invert(a: &[f64], k: usize) -> Option<Vec<f64>> {
    let w = 2 * k;
    let mut m = vec![0f64; k * w];
    for r in 0..k {
        m[r * w..r * w + k].copy_from_slice(&a[r * k..(r + 1) * k]);
        m[r * w + k + r] = 1.0;
    }
    for c in 0..k {
        let p = (c..k).max_by(|&x, &y| m[x * w + c].abs().total_cmp(&m[y * w + c].abs()))?;
        let pivot = m[p * w + c];
        if pivot == 0.0 || !pivot.is_finite() {
            return None;
        }
        if p != c {
            for j in 0..w {
                m.swap(c * w + j, p * w + j);
            }
        }
        for j in 0..w {
            m[c * w + j] /= pivot;
        }
        for r in 0..k {
            let f = m[r * w + c];
            if r != c && f != 0.0 {
                for j in 0..w {
                    m[r * w + j] -= f * m[c * w + j];
                }
            }
        }
    }
    Some((0..k * k).map(|i| m[(i / k) * w + k + i % k]).collect())
}

/// GPTQ as optimal brain quantization states it, independently of the `L D Lᵀ` shortcut:
/// keep `H⁻¹` of the columns not yet chosen; column `i` takes a level `q_i`, its error
/// `(w_i − q_i) / H⁻¹_ii · H⁻¹_i·` moves onto the rest, and `i` leaves `H⁻¹`. Returns, per
/// column, how much farther `q[i]` (the codec's choice) is from the updated `w_i` than the
/// nearest level: 0 up to rounding when the codec followed the same path.
fn obq_excess(d: &[f64], q: &[f64], levels: &[f64], h: &[f64], cols: usize) -> Vec<f64> {
    let mut h = h.to_vec();
    for i in 0..cols {
        if h[i * cols + i] <= 0.0 {
            h[i * cols + i] = 1.0;
        }
    }
    let damp = OUTPUT_ROUNDING_DAMP * (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
    (0..cols).for_each(|i| h[i * cols + i] += damp);
    let mut hinv = invert(&h, cols).unwrap();
    let mut w = d.to_vec();
    let mut excess = vec![0f64; cols];
    for i in 0..cols {
        let x = w[i];
        let nearest = levels
            .iter()
            .map(|l| (x - l).abs())
            .fold(f64::INFINITY, f64::min);
        excess[i] = (x - q[i]).abs() - nearest;
        let err = (x - q[i]) / hinv[i * cols + i];
        for j in i + 1..cols {
            w[j] -= err * hinv[i * cols + j];
        }
        let (row, p) = (hinv[i * cols..(i + 1) * cols].to_vec(), hinv[i * cols + i]);
        let col: Vec<f64> = (0..cols).map(|a| hinv[a * cols + i]).collect();
        for a in 0..cols {
            for b in 0..cols {
                hinv[a * cols + b] -= col[a] * row[b] / p;
            }
        }
    }
    excess
}

#[test]
fn output_rounding_factors_diagonalise_the_inputs() {
    // `H⁻¹ = L D Lᵀ` with `L` unit lower triangular holds exactly when `Lᵀ H L = D⁻¹` is
    // diagonal; the factors are the rows of `Lᵀ`. Checked against `H` itself (no inverse).
    for (cols, seed) in [(1, 1), (7, 2), (33, 3), (64, 4)] {
        let (_, _, h) = layer(2, cols, seed);
        let lt = super::rounding::inverse_ldl_rows(&h, cols).unwrap();
        for i in 0..cols {
            assert_eq!(lt[i * cols + i], 1.0);
            assert!((0..i).all(|j| lt[i * cols + j] == 0.0));
        }
        // M = Lᵀ H L: M_ab = Σ_pq Lᵀ_ap H_pq Lᵀ_bq.
        let m = |a: usize, b: usize| -> f64 {
            (0..cols)
                .map(|p| {
                    (0..cols)
                        .map(|q| lt[a * cols + p] * h[p * cols + q] * lt[b * cols + q])
                        .sum::<f64>()
                })
                .sum()
        };
        for a in 0..cols {
            let d = m(a, a);
            assert!(d > 0.0, "{cols}: D^-1 at {a} is {d}");
            for b in 0..a {
                let off = m(a, b);
                assert!(
                    off.abs() <= 1e-9 * (d * m(b, b)).sqrt(),
                    "{cols}: Lᵀ H L at ({a}, {b}) is {off}, diagonal {d}"
                );
            }
        }
    }
    // Not positive definite: refused.
    assert!(super::rounding::inverse_ldl_rows(&[1.0, 2.0, 2.0, 1.0], 2).is_none());
}

#[test]
fn output_rounding_matches_optimal_brain_quantization() {
    // 150 columns: errors move on in three column blocks, the last one short.
    for (rows, cols, seed) in [(6, 12, 11), (5, 150, 13)] {
        output_rounding_is_optimal_brain_quantization(rows, cols, seed);
    }
}

fn output_rounding_is_optimal_brain_quantization(rows: usize, cols: usize, seed: u64) {
    let (base, fine, h) = layer(rows, cols, seed);
    let r = OutputRounding::new(cols, std::slice::from_ref(&h)).unwrap();
    let mut enc = sign_planes(&base, &fine, rows, 2, false);
    assert!(round_signs_to_outputs(&mut enc, &base, &fine, &r));
    let Encoded::SignPlanes {
        scales: OwnedScales::F32(s),
        bits,
        ..
    } = &enc
    else {
        unreachable!()
    };
    let mut moved = 0;
    for row in 0..rows {
        let (s0, s1) = (f64::from(s[row]), f64::from(s[rows + row]));
        let levels = [-s0 - s1, -s0 + s1, s0 - s1, s0 + s1];
        let d: Vec<f64> = (row * cols..(row + 1) * cols)
            .map(|i| f64::from(fine[i]) - f64::from(base[i]))
            .collect();
        // The codec's levels, read from its bits (plane j of element i: byte (i/8)*2 + j).
        let q: Vec<f64> = (row * cols..(row + 1) * cols)
            .map(|i| {
                let sign = |j: usize| {
                    if bits[(i / 8) * 2 + j] >> (i % 8) & 1 == 1 {
                        1.0
                    } else {
                        -1.0
                    }
                };
                sign(0) * s0 + sign(1) * s1
            })
            .collect();
        for (c, e) in obq_excess(&d, &q, &levels, &h, cols).iter().enumerate() {
            assert!(
                *e < 1e-9,
                "row {row} col {c}: {e} farther than the nearest level"
            );
        }
        let plain: Vec<f64> = d
            .iter()
            .map(|&x| {
                levels
                    .iter()
                    .copied()
                    .min_by(|a, b| (x - a).abs().total_cmp(&(x - b).abs()))
                    .unwrap()
            })
            .collect();
        moved += usize::from(q != plain);
    }
    // The path is not the plain one (the error did move): with the damped `H` the error can
    // stay within a row's nearest levels, but not in most rows.
    assert!(2 * moved > rows, "{moved} of {rows} rows moved");
}

#[test]
fn output_rounding_lowers_the_output_error() {
    let (rows, cols) = (16, 24);
    let (base, fine, h) = layer(rows, cols, 5);
    let r = OutputRounding::new(cols, std::slice::from_ref(&h)).unwrap();
    let encoders: [(&str, Encoded); 4] = [
        ("sign", sign_tensor(&base, &fine)),
        ("sign-groups", sign_groups(&base, &fine, rows, true)),
        ("sign-planes 2", sign_planes(&base, &fine, rows, 2, true)),
        ("sign-planes 3", sign_planes(&base, &fine, 1, 3, false)),
    ];
    for (name, plain) in encoders {
        let mut rounded = plain.clone();
        assert!(round_signs_to_outputs(&mut rounded, &base, &fine, &r));
        let (p, q) = (
            output_err(&base, &fine, &plain, &h, cols),
            output_err(&base, &fine, &rounded, &h, cols),
        );
        assert!(q < 0.8 * p, "{name}: {q} not below {p}");
    }
}

#[test]
fn output_rounding_refits_one_plane_scales_to_the_chosen_bits() {
    // After the bits, each group's scale is the least-output-error one for them under the damped
    // H: s = Σ b H dᵀ / Σ b H bᵀ over the group's rows. Recomputed here from the rebuilt values.
    // More rows than are refitted together, so that the groups span blocks of them.
    let (rows, cols) = (40, 20);
    let (base, fine, h) = layer(rows, cols, 21);
    let mut hd = h.clone();
    let damp = OUTPUT_ROUNDING_DAMP * (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
    (0..cols).for_each(|i| hd[i * cols + i] += damp);
    let r = OutputRounding::new(cols, std::slice::from_ref(&h)).unwrap();
    for (groups, mut enc) in [
        (1, sign_tensor(&base, &fine)),
        (rows, sign_groups(&base, &fine, rows, false)),
    ] {
        assert!(round_signs_to_outputs(&mut enc, &base, &fine, &r));
        let rec = rebuild(&base, &enc);
        let per = rows / groups;
        for g in 0..groups {
            let (mut num, mut den, mut scale) = (0f64, 0f64, 0f64);
            for row in g * per..(g + 1) * per {
                let at = row * cols..(row + 1) * cols;
                let step: Vec<f64> = rec[at.clone()]
                    .iter()
                    .zip(&base[at.clone()])
                    .map(|(&x, &b)| f64::from(x) - f64::from(b))
                    .collect();
                scale = step[0].abs();
                let b: Vec<f64> = step.iter().map(|x| x.signum()).collect();
                let d: Vec<f64> = fine[at.clone()]
                    .iter()
                    .zip(&base[at])
                    .map(|(&f, &b)| f64::from(f) - f64::from(b))
                    .collect();
                for p in 0..cols {
                    for q in 0..cols {
                        num += b[p] * hd[p * cols + q] * d[q];
                        den += b[p] * hd[p * cols + q] * b[q];
                    }
                }
            }
            let want = num / den;
            assert!(
                (scale - want).abs() <= 1e-4 * want,
                "{groups} groups, group {g}: scale {scale}, least-error {want}"
            );
        }
    }
}

#[test]
fn output_rounding_gives_each_row_what_it_gives_it_alone() {
    // Rows are rounded a block at a time, across the blocks of `H` (39 rows in 3 blocks of 13):
    // each row must come out as when it is the whole tensor, with its own `H`. With 150 columns,
    // errors move on a block of columns at a time too.
    for cols in [20, 150] {
        each_row_is_rounded_as_alone(cols);
    }
}

fn each_row_is_rounded_as_alone(cols: usize) {
    let rows = 39;
    let (base, fine, _) = layer(rows, cols, 31);
    let hs: Vec<Vec<f64>> = (0..3).map(|k| layer(1, cols, 32 + k).2).collect();
    let r = OutputRounding::new(cols, &hs).unwrap();
    for planes in [1, 2, 3] {
        let encode = |b: &[f32], f: &[f32], groups: usize| match planes {
            1 => sign_groups(b, f, groups, false),
            k => sign_planes(b, f, groups, k, false),
        };
        let mut whole = encode(&base, &fine, rows);
        assert!(round_signs_to_outputs(&mut whole, &base, &fine, &r));
        let rec = rebuild(&base, &whole);
        for row in 0..rows {
            let at = row * cols..(row + 1) * cols;
            let (b, f) = (&base[at.clone()], &fine[at.clone()]);
            let alone_r = OutputRounding::new(cols, std::slice::from_ref(&hs[row / 13])).unwrap();
            let mut alone = encode(b, f, 1);
            assert!(round_signs_to_outputs(&mut alone, b, f, &alone_r));
            let want = rebuild(b, &alone);
            assert!(
                want.iter()
                    .zip(&rec[at])
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{planes} plane(s), row {row}"
            );
        }
    }
}

#[test]
fn output_rounding_with_uncorrelated_inputs_is_nearest() {
    // H = I: no error moves to other columns, so each element takes its nearest level,
    // which is what the plain encoders do.
    let (rows, cols) = (4, 10);
    let (base, fine) = pair(rows * cols, 9);
    let identity: Vec<f64> = (0..cols * cols)
        .map(|i| if i % (cols + 1) == 0 { 1.0 } else { 0.0 })
        .collect();
    // Two blocks of rows (a grouped convolution) with the same H.
    let r = OutputRounding::new(cols, &[identity.clone(), identity]).unwrap();
    for plain in [
        sign_tensor(&base, &fine),
        sign_groups(&base, &fine, rows, true),
        sign_planes(&base, &fine, rows, 3, false),
    ] {
        let mut rounded = plain.clone();
        assert!(round_signs_to_outputs(&mut rounded, &base, &fine, &r));
        assert_eq!(rounded, plain);
    }
}

#[test]
fn output_rounding_refuses_what_does_not_fit() {
    let (base, fine) = pair(24, 1);
    let h = |k: usize| {
        vec![(0..k * k)
            .map(|i| f64::from(u8::from(i % (k + 1) == 0)))
            .collect()]
    };
    let r5 = OutputRounding::new(5, &h(5)).unwrap();
    let r6 = OutputRounding::new(6, &h(6)).unwrap();
    let r6x3 =
        OutputRounding::new(6, &[h(6)[0].clone(), h(6)[0].clone(), h(6)[0].clone()]).unwrap();
    for (mut enc, r) in [
        (sign_tensor(&base, &fine), &r5),           // 5 does not divide 24
        (sign_groups(&base, &fine, 8, false), &r6), // groups of 3 split rows of 6
        (sign_planes(&base, &fine, 1, 2, true), &r6x3), // 3 blocks for 4 rows
        (q8_groups(&base, &fine, 4, true), &r6),    // not a sign codec
        (Encoded::Unchanged, &r6),
    ] {
        let before = enc.clone();
        assert!(!round_signs_to_outputs(&mut enc, &base, &fine, r));
        assert_eq!(enc, before);
    }
    assert!(OutputRounding::new(0, &[]).is_none());
    assert!(OutputRounding::new(2, &[]).is_none());
    assert!(OutputRounding::new(2, &[vec![1.0; 3]]).is_none());
    assert!(OutputRounding::new(2, &[vec![1.0, f64::NAN, f64::NAN, 1.0]]).is_none());
    // Not positive definite even after damping.
    assert!(OutputRounding::new(2, &[vec![1.0, 5.0, 5.0, 1.0]]).is_none());
    // An input that is always 0 is fine.
    assert!(OutputRounding::new(2, &[vec![0.0, 0.0, 0.0, 2.0]]).is_some());
}

proptest! {
    #[test]
    fn sign_planes_encode_valid_payloads(
        rows in 1usize..20,
        cols in 1usize..40,
        planes in 2usize..=8,
        per_channel in any::<bool>(),
        f16 in any::<bool>(),
        m in prop::sample::select(vec![1.0f64, 1.25, 1.5]),
        seed in any::<u64>(),
    ) {
        let (base, fine) = pair(rows * cols, seed);
        let groups = if per_channel { rows } else { 1 };
        let enc = sign_planes_scaled(&base, &fine, groups, planes, f16, m);
        prop_assert_eq!(enc.groups(), groups);
        // Writes, parses and rebuilds (the payload checks pass), within the levels' reach.
        let rec = rebuild(&base, &enc);
        let max = |v: &[f32]| v.iter().fold(0f32, |a, &x| a.max(x.abs()));
        let d: Vec<f32> = fine.iter().zip(&base).map(|(f, b)| f - b).collect();
        let r: Vec<f32> = rec.iter().zip(&base).map(|(x, b)| x - b).collect();
        prop_assert!(max(&r) <= m as f32 * 2.0 * max(&d) + 1e-6);
        let Encoded::SignPlanes { scales, planes: k, .. } = &enc else { unreachable!() };
        prop_assert_eq!(*k, planes);
        prop_assert!(scale_values(scales).iter().all(|x| x.is_finite() && *x >= 0.0));
    }
}

#[test]
fn scale_type_follows_the_codec_and_the_f16_flag() {
    use crate::format::FLAG_SCALES_F16;
    for (codec, plain, f16) in [
        (Codec::Unchanged, None, None),
        (Codec::RawF32, None, None),
        (Codec::RawF16, None, None),
        (Codec::Sign, Some("f32"), Some("f32")),
        (Codec::SignGroups, Some("f32"), Some("f16")),
        (Codec::Q8Groups, Some("f32"), Some("f16")),
        (Codec::SignPlanes, Some("f32"), Some("f16")),
        (Codec::SparseSigns, Some("f32"), Some("f16")),
    ] {
        assert_eq!(codec.scale_type(0), plain, "{}", codec.name());
        assert_eq!(codec.scale_type(FLAG_SCALES_F16), f16, "{}", codec.name());
    }
}

// -----------------------------------------------------------------------------------------
// sparse-signs

/// `docs/FORMAT.md` §9 for one `sparse-signs` delta, written independently of the decoder: f64
/// arithmetic rounded to f32 after every operation, element by element.
fn sparse_reference(
    base: &[f32],
    scales: &[f32],
    entries: &[u8],
    per_block: usize,
    alpha: f32,
) -> Vec<f32> {
    let f = |x: f64| f64::from(x as f32);
    let n = base.len();
    let mut out: Vec<f64> = base.iter().map(|&b| f64::from(b)).collect();
    for (b, block) in entries.chunks(per_block).enumerate() {
        for &e in block {
            let i = b * 64 + usize::from(e & 63);
            let s = f64::from(scales[i / (n / scales.len())]);
            let level = if e & 0x40 != 0 { 2.0 } else { 1.0 };
            let v = f(f64::from(alpha) * f(level * s));
            out[i] = f(out[i] + if e & 0x80 != 0 { -v } else { v });
        }
    }
    out.into_iter().map(|x| x as f32).collect()
}

fn sparse_parts(enc: &Encoded) -> (Vec<f32>, &[u8]) {
    let Encoded::SparseSigns { scales, entries } = enc else {
        panic!("not sparse-signs: {enc:?}")
    };
    (scale_values(scales), entries)
}

/// The indices `0..len` of a block of deltas `d` that rank among its `m` largest `|d|` (a tie to
/// the lower index), by counting who beats each element.
fn top_m(d: &[f64], m: usize) -> Vec<usize> {
    (0..d.len())
        .filter(|&i| {
            let beaten_by = (0..d.len())
                .filter(|&j| d[j].abs() > d[i].abs() || (d[j].abs() == d[i].abs() && j < i))
                .count();
            beaten_by < m
        })
        .collect()
}

#[test]
fn sparse_keeps_the_m_largest_of_each_block() {
    for n in [1, 5, 63, 64, 65, 127, 130, 1000, 4160] {
        for m in [1, 2, 5, 17, 32] {
            let m = m.min(max_entries(n as u64));
            let (mut base, mut fine) = pair(n, (n * 31 + m) as u64);
            // Some exact ties: equal |d| of both signs.
            for i in (0..n).step_by(7) {
                base[i] = 0.5;
                fine[i] = if i % 2 == 0 { 0.53125 } else { 0.46875 };
            }
            let groups = if n % 5 == 0 { 5 } else { 1 };
            let enc = sparse_signs(&base, &fine, groups, m, false);
            let (scales, entries) = sparse_parts(&enc);
            assert_eq!(entries.len(), n.div_ceil(64) * m, "n {n} m {m}");
            assert_eq!(scales.len(), groups);
            for (b, block) in entries.chunks(m).enumerate() {
                let lo = b * 64;
                let hi = (lo + 64).min(n);
                let d: Vec<f64> = (lo..hi)
                    .map(|i| f64::from(fine[i]) - f64::from(base[i]))
                    .collect();
                let idx: Vec<usize> = block.iter().map(|&e| usize::from(e & 63)).collect();
                assert_eq!(idx, top_m(&d, m), "n {n} m {m} block {b}");
                for &e in block {
                    let x = d[usize::from(e & 63)];
                    assert_eq!(e & 0x80 != 0, x < 0.0, "sign of {x}");
                }
            }
            // Rebuilt through the device path: the reference's values, bit for bit.
            let want = sparse_reference(&base, &scales, entries, m, 1.0);
            let got = rebuild(&base, &enc);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "n {n} m {m} element {i}");
            }
        }
    }
}

#[test]
fn sparse_scale_is_least_squares_for_its_levels() {
    for (n, groups, m) in [
        (640, 1, 8),
        (640, 10, 3),
        (1000, 8, 32),
        (70, 7, 6),
        (65, 5, 1),
    ] {
        let (base, fine) = pair(n, (n + groups * m) as u64);
        let enc = sparse_signs(&base, &fine, groups, m, false);
        let (scales, entries) = sparse_parts(&enc);
        let g = n / groups;
        // Per group: the error of the kept entries at the stored scale, and moved either way.
        let mut err = vec![[0f64; 3]; groups];
        let moves = [1.0, 1.0 - 1e-4, 1.0 + 1e-4];
        for (b, block) in entries.chunks(m).enumerate() {
            for &e in block {
                let i = b * 64 + usize::from(e & 63);
                let a = (f64::from(fine[i]) - f64::from(base[i])).abs();
                let level = if e & 0x40 != 0 { 2.0 } else { 1.0 };
                for (k, mv) in moves.iter().enumerate() {
                    err[i / g][k] += (a - level * f64::from(scales[i / g]) * mv).powi(2);
                }
            }
        }
        for (k, e) in err.iter().enumerate() {
            assert!(e[0] <= e[1] && e[0] <= e[2], "n {n} group {k}: {e:?}");
        }
        // The levels are the nearest ones for the scale (up to the rounding to f32).
        for (b, block) in entries.chunks(m).enumerate() {
            for &e in block {
                let i = b * 64 + usize::from(e & 63);
                let a = (f64::from(fine[i]) - f64::from(base[i])).abs();
                let s = f64::from(scales[i / g]);
                if (a - 1.5 * s).abs() > 1e-6 * s {
                    assert_eq!(e & 0x40 != 0, a > 1.5 * s, "element {i}: {a} vs {s}");
                }
            }
        }
    }
}

#[test]
fn sparse_edge_cases() {
    // m = every element of a short tensor; m = 32 of whole blocks; a zero delta.
    let (base, fine) = pair(10, 4);
    let enc = sparse_signs(&base, &fine, 2, 10, true);
    let (_, entries) = sparse_parts(&enc);
    let idx: Vec<u8> = entries.iter().map(|e| e & 63).collect();
    assert_eq!(idx, (0..10).collect::<Vec<u8>>());
    let zero = sparse_signs(&base, &base, 1, 3, true);
    assert_eq!(
        zero,
        Encoded::SparseSigns {
            scales: OwnedScales::F16(vec![f16::ZERO]),
            entries: vec![0, 1, 2],
        }
    );
    assert_eq!(rebuild(&base, &zero), base);
    // n = 65: the last block has one element, so one entry per block.
    assert_eq!(max_entries(65), 1);
    assert_eq!(max_entries(64), 32);
    assert_eq!(max_entries(96), 32);
    assert_eq!(max_entries(70), 6);
    assert_eq!(max_entries(1), 1);
    let (base, fine) = pair(65, 5);
    let enc = sparse_signs(&base, &fine, 13, 1, false);
    assert_eq!(enc.payload_len(), 13 * 4 + 2);
    assert_eq!(enc.groups(), 13);
    assert_eq!(enc.codec(), Codec::SparseSigns);
    // f16 scales out of range fall back to f32 for the whole tensor.
    let big: Vec<f32> = base.iter().map(|b| b + 1e5).collect();
    assert!(matches!(
        sparse_signs(&base, &big, 1, 1, true),
        Encoded::SparseSigns {
            scales: OwnedScales::F32(_),
            ..
        }
    ));
}

#[test]
fn sparse_encoder_panics_on_bad_arguments() {
    let (base, fine) = pair(70, 6);
    for (groups, m) in [(1, 0), (1, 7), (1, 33), (0, 1), (3, 1)] {
        let r = std::panic::catch_unwind(|| sparse_signs(&base, &fine, groups, m, false));
        assert!(r.is_err(), "groups {groups} m {m}");
    }
}

#[test]
fn sparse_format_md_example() {
    // docs/FORMAT.md §8, "Sparse signs": n = 70 (blocks of 64 and 6), m = 2, G = 1.
    let base = [0f32; 70];
    let mut fine = [0f32; 70];
    (fine[3], fine[10], fine[65], fine[69]) = (-0.5, 1.0, 0.5, -0.5);
    let enc = sparse_signs(&base, &fine, 1, 2, true);
    assert_eq!(
        enc,
        Encoded::SparseSigns {
            scales: OwnedScales::F16(vec![f16::from_f32(0.5)]),
            entries: vec![0x83, 0x4a, 0x01, 0x85],
        }
    );
    let mut bytes = Vec::new();
    enc.write(&mut bytes);
    assert_eq!(bytes, [0x00, 0x38, 0x83, 0x4a, 0x01, 0x85]);
    assert_eq!(rebuild(&base, &enc), fine);
}

#[test]
fn sparse_value_checks() {
    let scales = 1f32.to_le_bytes();
    let check = |n: u64, m: usize, entries: &[u8]| {
        Payload::SparseSigns {
            per_block: m,
            scales: Scales::F32(&scales),
            entries,
        }
        .check(4, n)
    };
    let bad = |block| Err(FormatError::BadSparseIndex { index: 4, block });
    assert_eq!(check(70, 2, &[0x83, 0x4a, 0x01, 0x85]), Ok(()));
    assert_eq!(check(70, 2, &[0x0a, 0x03, 0x01, 0x05]), bad(0)); // unsorted
    assert_eq!(check(70, 2, &[0x03, 0xc3, 0x01, 0x05]), bad(0)); // duplicate (other flags)
    assert_eq!(check(70, 2, &[0x03, 0x04, 0x01, 0x06]), bad(1)); // past the short last block
    assert_eq!(check(70, 2, &[0x03, 0x04, 0x05, 0x3f]), bad(1));
    assert_eq!(check(128, 2, &[0x3e, 0x3f, 0x05, 0x05]), bad(1));
    // The scales, as for the other group codecs.
    for s in [f32::NAN, -1.0, f32::INFINITY] {
        let b = s.to_le_bytes();
        let p = Payload::SparseSigns {
            per_block: 1,
            scales: Scales::F32(&b),
            entries: &[0],
        };
        assert_eq!(
            p.check(2, 3),
            Err(FormatError::BadScale { index: 2, group: 0 })
        );
    }
    // Entries that do not fit the tensor are not a payload of it (compose refuses them).
    let fits = |n: usize, m: usize, len: usize| {
        Payload::SparseSigns {
            per_block: m,
            scales: Scales::F32(&scales),
            entries: &vec![0; len],
        }
        .elems(n)
    };
    assert_eq!(fits(70, 2, 4), Some(70));
    assert_eq!(fits(70, 7, 14), None); // more entries than the last block has elements
    assert_eq!(fits(70, 2, 5), None);
    assert_eq!(fits(70, 0, 0), None);
    assert_eq!(fits(6400, 33, 3300), None);
}

#[test]
fn sparse_decoder_matches_the_reference_from_every_start() {
    let mut x = 0x1234_5678_u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (n, groups, m) in [
        (1, 1, 1),
        (70, 7, 6),
        (200, 4, 8),
        (256, 2, 32),
        (321, 3, 1),
    ] {
        let entries = random_entries(&mut next, n, m);
        let sv: Vec<f32> = (0..groups).map(|g| 0.25 + g as f32 * 0.375).collect();
        let sb: Vec<u8> = sv.iter().flat_map(|s| s.to_le_bytes()).collect();
        let base: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = Payload::SparseSigns {
            per_block: m,
            scales: Scales::F32(&sb),
            entries: &entries,
        };
        assert_eq!(p.check(0, n as u64), Ok(()));
        for alpha in [1.0f32, -0.75, 0.1] {
            let want = sparse_reference(&base, &sv, &entries, m, alpha);
            for first in 0..n {
                for len in [1, 3, 64, n - first] {
                    let len = len.min(n - first);
                    let mut out = vec![0f32; len];
                    compose::reconstruct_at(Base::F32(&base), &[(p, alpha)], first, &mut out)
                        .unwrap();
                    for (k, (g, w)) in out.iter().zip(&want[first..]).enumerate() {
                        assert_eq!(
                            g.to_bits(),
                            w.to_bits(),
                            "n {n} from {first}: {}",
                            first + k
                        );
                    }
                }
            }
        }
    }
}

proptest! {
    #[test]
    fn sparse_signs_encode_valid_payloads(
        n in 1usize..700,
        groups_pick in any::<usize>(),
        m_pick in any::<usize>(),
        f16 in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let (base, fine) = pair(n, seed);
        let divisors: Vec<usize> = (1..=n).filter(|g| n % g == 0).collect();
        let groups = divisors[groups_pick % divisors.len()];
        let m = 1 + m_pick % max_entries(n as u64);
        let enc = sparse_signs(&base, &fine, groups, m, f16);
        prop_assert_eq!(enc.groups(), groups);
        let (scales, entries) = sparse_parts(&enc);
        prop_assert_eq!(entries.len(), n.div_ceil(64) * m);
        prop_assert!(scales.iter().all(|x| x.is_finite() && *x >= 0.0));
        // Writes, parses and rebuilds (the payload checks pass), as the reference says.
        let want = sparse_reference(&base, &scales, entries, m, 1.0);
        let got = rebuild(&base, &enc);
        for (g, w) in got.iter().zip(&want) {
            prop_assert_eq!(g.to_bits(), w.to_bits());
        }
        // Never worse than leaving the tensor unchanged by more than the rounding of scales.
        let unchanged = sq_err(&fine, &base);
        prop_assert!(sq_err(&fine, &got) <= unchanged * (1.0 + 1e-3) + 1e-12);
    }
}

#[test]
fn solve_rows_multiplies_by_the_inverse_of_the_damped_inputs() {
    // `y H⁻¹` against an explicit Gauss-Jordan inverse of `H + 0.01 mean(diag H) I`.
    for (cols, seed) in [(1, 5), (6, 6), (31, 7)] {
        let (_, _, h) = layer(1, cols, seed);
        let r = OutputRounding::new(cols, &[h.clone(), h.clone()]).unwrap();
        let damp =
            OUTPUT_ROUNDING_DAMP * (0..cols).map(|i| h[i * cols + i]).sum::<f64>() / cols as f64;
        let mut damped = h.clone();
        for i in 0..cols {
            damped[i * cols + i] += damp;
        }
        let inv = invert(&damped, cols).unwrap();
        let mut rng = Rng(seed);
        // More rows than are solved together.
        let y: Vec<f64> = (0..40 * cols).map(|_| rng.unit()).collect();
        let mut got = y.clone();
        assert!(r.solve_rows(1, &mut got));
        for (row, out) in y.chunks_exact(cols).zip(got.chunks_exact(cols)) {
            for c in 0..cols {
                let want: f64 = (0..cols).map(|a| row[a] * inv[a * cols + c]).sum();
                assert!(
                    (want - out[c]).abs() <= 1e-9 * want.abs().max(1.0),
                    "cols {cols}: {want} vs {}",
                    out[c]
                );
            }
        }
        // No third block; rows that do not fit.
        assert!(!r.solve_rows(2, &mut got));
        assert!(cols == 1 || !r.solve_rows(0, &mut vec![1.0; cols + 1]));
    }
}
