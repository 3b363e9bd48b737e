//! Kernel equality tests.
//!
//! Two independent checks, on every operation:
//! - the scalar backend against a reference computed in `f64` (products of two `f32` are exact in
//!   `f64`, and rounding an `f64` sum or product of `f32` values to `f32` gives the correctly
//!   rounded `f32` result, since 53 >= 2 * 24 + 2), with the sign bits decoded here by hand;
//! - every other available backend against scalar, bit for bit (`to_bits`), over the whole output
//!   buffer including canaries before and after the slice.
//!
//! Cases are deterministic seeds (every length up to `3 * LANES + 7`, misaligned slice starts,
//! every bit offset `0..=9`, special values) plus proptest with lengths up to 5000.

use super::{available, backend_name, scalar, Kernels, LANES};
use crate::pack::packed_len;

/// SplitMix64: a small deterministic generator, so the seeds need no extra dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    fn sign(&mut self) -> f32 {
        if self.below(2) == 0 {
            1.0
        } else {
            -1.0
        }
    }

    /// A value for `base`, `acc` or `x`: mostly ordinary numbers, often a special one (signed
    /// zeros, subnormals, extremes, infinities). Never NaN.
    fn value(&mut self) -> f32 {
        let sign = self.sign();
        let v = match self.below(16) {
            0 => 0.0,
            1 => f32::from_bits(self.below(0x80_0000) as u32), // zero or subnormal
            2 => f32::MIN_POSITIVE,
            3 => f32::MAX,
            4 => f32::INFINITY,
            5 => self.below(1 << 24) as f32,
            6 => 1.0,
            // A random normal number between about 2^-30 and 2^30.
            _ => {
                f32::from_bits(((97 + self.below(60) as u32) << 23) | self.below(0x80_0000) as u32)
            }
        };
        sign * v
    }

    /// A `scale` or `alpha`.
    fn scale(&mut self) -> f32 {
        const SPECIAL: [f32; 12] = [
            0.0,
            -0.0,
            1e-40,
            1.4e-45,
            1.1754944e-38,
            1e-3,
            0.0123,
            1.0,
            3.5,
            1e30,
            f32::MAX,
            -0.75,
        ];
        match self.below(16) as usize {
            i @ 0..12 => SPECIAL[i],
            _ => self.value(),
        }
    }

    fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let fill = self.below(8);
        (0..n)
            .map(|_| match fill {
                0 => 0x00,
                1 => 0xff,
                _ => self.next_u64() as u8,
            })
            .collect()
    }

    fn q8(&mut self, n: usize) -> Vec<i8> {
        (0..n)
            .map(|_| match self.below(8) {
                0 => i8::MIN,
                1 => i8::MAX,
                2 => 0,
                _ => self.next_u64() as i8,
            })
            .collect()
    }
}

/// A value no kernel produces here, written around the slice to catch stray writes.
const CANARY: f32 = -1234.5677;

#[derive(Clone, Copy, Debug)]
enum Op {
    ApplySigns,
    AddSigns,
    ApplyQ8,
    AddQ8,
    AddScaled,
}

const OPS: [Op; 5] = [
    Op::ApplySigns,
    Op::AddSigns,
    Op::ApplyQ8,
    Op::AddQ8,
    Op::AddScaled,
];

/// One set of inputs, shared by every operation. The slices start at element `start` of their
/// buffers (misaligned for `start % 8 != 0`); `out` has `PAD_AFTER` canaries after the slice.
#[derive(Debug)]
struct Case {
    len: usize,
    start: usize,
    bit_offset: usize,
    scale: f32,
    alpha: f32,
    /// The initial output buffer: canaries, then `len` accumulator values, then canaries.
    init: Vec<f32>,
    base: Vec<f32>,
    x: Vec<f32>,
    q: Vec<i8>,
    /// Exactly `packed_len(bit_offset + len)` bytes, so reading past the end would panic in
    /// scalar code.
    bits: Vec<u8>,
}

const PAD_AFTER: usize = 2 * LANES;

impl Case {
    fn new(rng: &mut Rng, len: usize, start: usize, bit_offset: usize) -> Self {
        let (scale, alpha) = (rng.scale(), rng.scale());
        Self::with_scales(rng, len, start, bit_offset, scale, alpha)
    }

    fn with_scales(
        rng: &mut Rng,
        len: usize,
        start: usize,
        bit_offset: usize,
        scale: f32,
        alpha: f32,
    ) -> Self {
        let mut init = vec![CANARY; start + len + PAD_AFTER];
        init[start..start + len].copy_from_slice(&rng.values(len));
        let padded = |v: Vec<f32>| [vec![CANARY; start], v].concat();
        let base = padded(rng.values(len));
        let x = padded(rng.values(len));
        let q = [vec![0x55; start], rng.q8(len)].concat();
        let bits = rng.bytes(packed_len(bit_offset + len));
        Self {
            len,
            start,
            bit_offset,
            scale,
            alpha,
            init,
            base,
            x,
            q,
            bits,
        }
    }

    fn range(&self) -> core::ops::Range<usize> {
        self.start..self.start + self.len
    }

    /// Runs `op` on backend `k`, returning the whole output buffer.
    fn run(&self, op: Op, k: &Kernels) -> Vec<f32> {
        let mut buf = self.init.clone();
        let r = self.range();
        let out = &mut buf[r.clone()];
        let (base, x, q) = (&self.base[r.clone()], &self.x[r.clone()], &self.q[r]);
        let (bits, off, scale, alpha) = (&self.bits[..], self.bit_offset, self.scale, self.alpha);
        match op {
            Op::ApplySigns => k.apply_signs(out, base, bits, off, scale),
            Op::AddSigns => k.add_signs(out, bits, off, scale),
            Op::ApplyQ8 => k.apply_q8(out, base, q, scale, alpha),
            Op::AddQ8 => k.add_q8(out, q, scale, alpha),
            Op::AddScaled => k.add_scaled(out, x, alpha),
        }
        buf
    }

    /// The independent reference: `f64` arithmetic rounded to `f32` after every operation, and
    /// sign bits decoded here rather than through `pack`.
    fn reference(&self, op: Op) -> Vec<f32> {
        fn add(a: f32, b: f32) -> f32 {
            (f64::from(a) + f64::from(b)) as f32
        }
        fn mul(a: f32, b: f32) -> f32 {
            (f64::from(a) * f64::from(b)) as f32
        }
        let mut buf = self.init.clone();
        for (i, o) in buf[self.range()].iter_mut().enumerate() {
            let j = self.start + i;
            let bit = self.bits[(self.bit_offset + i) >> 3] & (1 << ((self.bit_offset + i) & 7));
            let signed = f32::from_bits(self.scale.to_bits() ^ if bit == 0 { 1 << 31 } else { 0 });
            let dq = mul(self.alpha, mul(self.scale, f32::from(self.q[j])));
            *o = match op {
                Op::ApplySigns => add(self.base[j], signed),
                Op::AddSigns => add(*o, signed),
                Op::ApplyQ8 => add(self.base[j], dq),
                Op::AddQ8 => add(*o, dq),
                Op::AddScaled => add(*o, mul(self.alpha, self.x[j])),
            };
        }
        buf
    }

    /// Checks scalar against the reference and every backend against scalar.
    fn check(&self, op: Op) {
        let expected = self.run(op, scalar());
        let reference = self.reference(op);
        for (i, (&e, &r)) in expected.iter().zip(&reference).enumerate() {
            let same = e.to_bits() == r.to_bits() || (e.is_nan() && r.is_nan());
            assert!(
                same,
                "{op:?} scalar != reference at buffer index {i}: {e:e} vs {r:e}\n{}",
                self.describe()
            );
        }
        // Under miri only the scalar code runs (SIMD intrinsics are `cfg(not(miri))` territory).
        for k in available().filter(|k| k.name() != "scalar" && !cfg!(miri)) {
            let got = self.run(op, k);
            if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != expected[i].to_bits()) {
                panic!(
                    "{op:?} {} != scalar at buffer index {i}: {:e} ({:#010x}) vs {:e} ({:#010x})\n{}",
                    k.name(),
                    got[i],
                    got[i].to_bits(),
                    expected[i],
                    expected[i].to_bits(),
                    self.describe()
                );
            }
        }
    }

    fn describe(&self) -> String {
        format!(
            "len {}, start {}, bit_offset {}, scale {:e}, alpha {:e}",
            self.len, self.start, self.bit_offset, self.scale, self.alpha
        )
    }
}

#[test]
fn backends_are_the_expected_ones() {
    let names: Vec<_> = available().map(Kernels::name).collect();
    let mut expected = vec!["scalar"];
    if !cfg!(bitdelta_backend = "scalar") {
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        expected.push("neon");
        #[cfg(all(any(target_arch = "x86", target_arch = "x86_64"), feature = "apply"))]
        if std::is_x86_feature_detected!("avx2") {
            expected.push("avx2");
        }
        #[cfg(all(
            any(target_arch = "x86", target_arch = "x86_64"),
            not(feature = "apply")
        ))]
        if cfg!(target_feature = "avx2") {
            expected.push("avx2");
        }
    }
    assert_eq!(names, expected);
}

#[test]
fn dispatch_reports_its_choice() {
    let chosen = backend_name();
    assert_eq!(chosen, Kernels::get().name());
    assert!(core::ptr::eq(Kernels::get(), Kernels::get()));
    let forced = cfg!(feature = "apply")
        && std::env::var_os("BITDELTA_FORCE_SCALAR").is_some_and(|v| v == "1");
    if forced || cfg!(bitdelta_backend = "scalar") {
        assert_eq!(chosen, "scalar");
    } else {
        assert_eq!(Some(chosen), available().last().map(Kernels::name));
    }
    assert_eq!(scalar().name(), "scalar");
    assert!(format!("{:?}", Kernels::get()).contains(chosen));
}

/// Small cases worked out by hand, on every backend (lengths past `LANES` reach the SIMD body).
#[test]
fn hand_computed() {
    let n = 2 * LANES + 3;
    let base: Vec<f32> = (0..n).map(|i| i as f32).collect();
    // Alternating signs: bit pattern 0b0101_0101, so even elements get +scale.
    let bits = vec![0x55u8; packed_len(n)];
    let q: Vec<i8> = (0..n).map(|i| (i % 5) as i8 - 2).collect();
    for k in available() {
        let mut out = vec![0.0; n];
        k.apply_signs(&mut out, &base, &bits, 0, 0.5);
        for (i, &o) in out.iter().enumerate() {
            let want = if i % 2 == 0 {
                i as f32 + 0.5
            } else {
                i as f32 - 0.5
            };
            assert_eq!(o, want, "{} apply_signs[{i}]", k.name());
        }
        // From bit 1 the pattern is shifted: now odd elements get +scale.
        k.apply_signs(&mut out, &base, &bits, 1, 0.25);
        for (i, &o) in out.iter().enumerate() {
            let want = if i % 2 == 1 {
                i as f32 + 0.25
            } else {
                i as f32 - 0.25
            };
            assert_eq!(o, want, "{} apply_signs offset 1 [{i}]", k.name());
        }

        let mut acc = vec![1.0; n];
        k.add_signs(&mut acc, &bits, 0, 2.0);
        assert!(acc
            .iter()
            .enumerate()
            .all(|(i, &a)| a == if i % 2 == 0 { 3.0 } else { -1.0 }));

        // -0.0 + (+0.0) is +0.0; -0.0 + (-0.0) stays -0.0.
        let mut zeros = vec![-0.0f32; n];
        k.add_signs(&mut zeros, &bits, 0, 0.0);
        for (i, z) in zeros.iter().enumerate() {
            assert_eq!(
                z.to_bits(),
                if i % 2 == 0 { 0 } else { 0x8000_0000 },
                "{} zero {i}",
                k.name()
            );
        }

        let mut out = vec![0.0; n];
        k.apply_q8(&mut out, &base, &q, 0.5, 2.0);
        for (i, &o) in out.iter().enumerate() {
            assert_eq!(
                o,
                i as f32 + ((i % 5) as f32 - 2.0),
                "{} apply_q8[{i}]",
                k.name()
            );
        }
        let mut acc = vec![10.0; n];
        k.add_q8(&mut acc, &q, 0.25, -4.0);
        for (i, &a) in acc.iter().enumerate() {
            assert_eq!(a, 10.0 - ((i % 5) as f32 - 2.0), "{} add_q8[{i}]", k.name());
        }
        let mut acc = base.clone();
        k.add_scaled(&mut acc, &base, 3.0);
        for (i, &a) in acc.iter().enumerate() {
            assert_eq!(a, 4.0 * i as f32, "{} add_scaled[{i}]", k.name());
        }
    }
}

/// The two roundings of `alpha * (scale * q)` and of `acc + alpha * x` are visible: a fused
/// implementation would give a different answer here.
#[test]
fn never_fused() {
    // 1 + 2^-23 squared is 1 + 2^-22 + 2^-46: rounded it is 1 + 2^-22; the sum with -(1 + 2^-22)
    // is then exactly 0, whereas a fused multiply-add would keep 2^-46.
    let a = 1.0 + f32::EPSILON;
    let n = LANES + 1;
    for k in available() {
        let mut acc = vec![-(1.0 + 2.0 * f32::EPSILON); n];
        k.add_scaled(&mut acc, &vec![a; n], a);
        assert!(
            acc.iter().all(|&v| v == 0.0),
            "{}: add_scaled fused: {acc:?}",
            k.name()
        );

        let base = vec![-(1.0 + 2.0 * f32::EPSILON); n];
        let mut out = vec![1.0; n];
        k.apply_q8(&mut out, &base, &vec![1; n], a, a);
        assert!(
            out.iter().all(|&v| v == 0.0),
            "{}: apply_q8 fused: {out:?}",
            k.name()
        );
        let mut acc = base;
        k.add_q8(&mut acc, &vec![1; n], a, a);
        assert!(
            acc.iter().all(|&v| v == 0.0),
            "{}: add_q8 fused: {acc:?}",
            k.name()
        );
    }
}

#[cfg(not(miri))]
#[test]
fn seeds() {
    let mut rng = Rng(0x5eed);
    for len in 0..=3 * LANES + 7 {
        for start in 0..=3 {
            for bit_offset in 0..=9 {
                let case = Case::new(&mut rng, len, start, bit_offset);
                for op in OPS {
                    case.check(op);
                }
            }
        }
    }
}

/// A lighter version of [`seeds`] for miri: scalar code only, short lengths.
#[test]
fn seeds_small() {
    let mut rng = Rng(0x5ca1a);
    for len in [0, 1, 7, 8, 9, LANES - 1, LANES, LANES + 9] {
        for (start, bit_offset) in [(0, 0), (1, 3), (3, 9)] {
            let case = Case::new(&mut rng, len, start, bit_offset);
            for op in OPS {
                case.check(op);
            }
        }
    }
}

/// Long runs with large bit offsets: many SIMD steps, a head and a tail.
#[cfg(not(miri))]
#[test]
fn seeds_long() {
    let mut rng = Rng(0x10_0000);
    for len in [LANES * 64, LANES * 64 + 13, 4099] {
        for bit_offset in [0, 5, 8, 64, 1001] {
            let case = Case::new(&mut rng, len, 1, bit_offset);
            for op in OPS {
                case.check(op);
            }
        }
    }
}

#[test]
#[should_panic(expected = "apply_signs: base has 3 elements, expected 4")]
fn apply_signs_length_mismatch_panics() {
    super::apply_signs(&mut [0.0; 4], &[0.0; 3], &[0], 0, 1.0);
}

#[test]
#[should_panic(expected = "need more than the 1 bytes of sign bits")]
fn apply_signs_short_bits_panics() {
    super::apply_signs(&mut [0.0; 4], &[0.0; 4], &[0], 5, 1.0);
}

#[test]
#[should_panic(expected = "add_signs")]
fn add_signs_bit_offset_overflow_panics() {
    super::add_signs(&mut [0.0; 4], &[0], usize::MAX - 1, 1.0);
}

#[test]
#[should_panic(expected = "apply_q8: q has 2 elements, expected 3")]
fn apply_q8_length_mismatch_panics() {
    super::apply_q8(&mut [0.0; 3], &[0.0; 3], &[0; 2], 1.0, 1.0);
}

#[test]
#[should_panic(expected = "add_q8: q has 4 elements, expected 3")]
fn add_q8_length_mismatch_panics() {
    super::add_q8(&mut [0.0; 3], &[0; 4], 1.0, 1.0);
}

#[test]
#[should_panic(expected = "add_scaled: x has 0 elements, expected 1")]
fn add_scaled_length_mismatch_panics() {
    super::add_scaled(&mut [0.0; 1], &[], 1.0);
}

#[test]
fn exact_bits_are_enough() {
    // 13 elements from bit 3 need exactly packed_len(16) = 2 bytes.
    let mut out = [0.0; 13];
    super::apply_signs(&mut out, &[1.0; 13], &[0xff, 0xff], 3, 1.0);
    assert_eq!(out, [2.0; 13]);
    // An empty run needs no bytes.
    super::add_signs(&mut [], &[], 0, 1.0);
}

#[cfg(not(miri))]
mod props {
    use super::*;
    use proptest::prelude::*;

    fn scale() -> impl Strategy<Value = f32> {
        prop_oneof![
            any::<f32>().prop_filter("no NaN", |s| !s.is_nan()),
            -1e3f32..1e3,
            Just(0.0f32),
            Just(-0.0f32),
            (1u32..0x80_0000).prop_map(f32::from_bits),
        ]
    }

    proptest! {
        #[test]
        fn backends_match_scalar(
            len in 0usize..5000,
            start in 0usize..4,
            bit_offset in 0usize..64,
            scale in scale(),
            alpha in scale(),
            seed in any::<u64>(),
        ) {
            let case = Case::with_scales(&mut Rng(seed), len, start, bit_offset, scale, alpha);
            for op in OPS {
                case.check(op);
            }
        }
    }
}
