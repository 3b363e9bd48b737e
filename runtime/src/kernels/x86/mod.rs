//! AVX2 kernels for x86 and x86_64.
//!
//! Every body processes [`LANES`] (32) elements per step: four 8-lane vectors, and for the sign
//! kernels the four bytes of bits that cover them. Sign bits become a sign-bit XOR on `-scale`:
//! lane `k` of a 32-bit broadcast of the bit word is shifted left by `31 - k` (`vpsllvd`), so bit
//! `k` lands in the sign position; XOR-ing that into `-scale` yields `+scale` for a set bit and
//! `-scale` for a clear one, exactly like the scalar negation. There is no FMA anywhere: products
//! and sums are separate `vmulps`/`vaddps`, so results are bit-identical to the scalar reference.
//!
//! Soundness: the entry points are `unsafe` because they need AVX2. The safe slots that
//! `isa_table!` writes around them (and that `debug_assert!` the body contract) are reachable
//! only through [`AVX2`], which [`table`] hands out only after checking that the CPU has AVX2 (at
//! run time with `std`, at compile time without). All memory accesses stay inside `chunks_exact`
//! chunks, so a broken length contract can only drop elements, never read or write out of
//! bounds.
//!
//! May depend on: `core::arch::x86`/`x86_64`, `std` for run-time feature detection (with the
//! `apply` feature), and the parent [`super`] (the table type, [`LANES`] and `isa_table!`).
#![allow(unsafe_code)]

#[cfg(target_arch = "x86")]
use core::arch::x86::*;
#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

use super::{Kernels, LANES};

// `table` hands `AVX2` out only when `is_available()` (see the module docs).
isa_table! {
    static AVX2 = "avx2" {
        apply_signs: avx2_apply_signs_f32_32n,
        add_signs: avx2_add_signs_f32_32n,
        apply_q8: avx2_apply_q8_f32_32n,
        add_q8: avx2_add_q8_f32_32n,
        add_scaled: avx2_add_scaled_f32_32n,
    }
}

/// The AVX2 table, if this CPU supports AVX2.
pub(super) fn table() -> Option<&'static Kernels> {
    is_available().then_some(&AVX2)
}

/// Whether AVX2 can be used: detected at run time with `std`, fixed at compile time without.
fn is_available() -> bool {
    #[cfg(feature = "apply")]
    {
        std::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(feature = "apply"))]
    {
        cfg!(target_feature = "avx2")
    }
}

/// Per-lane shift counts that move bit `8 * j + k` of a 32-bit word to bit 31 in lane `k` of
/// vector `j`.
#[target_feature(enable = "avx2")]
#[inline]
fn sign_shifts() -> [__m256i; 4] {
    [
        _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24),
        _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16),
        _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8),
        _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0),
    ]
}

/// `±scale` for 8 lanes: `neg_scale` (a broadcast `-scale`) with its sign flipped where the bit
/// that `shift` selects from the broadcast bit word `word` is set.
#[target_feature(enable = "avx2")]
#[inline]
fn signed_scale8(word: __m256i, shift: __m256i, neg_scale: __m256) -> __m256 {
    let flip = _mm256_and_si256(_mm256_sllv_epi32(word, shift), _mm256_set1_epi32(i32::MIN));
    _mm256_xor_ps(neg_scale, _mm256_castsi256_ps(flip))
}

/// The 32 sign bits of one step, broadcast to every lane.
#[target_feature(enable = "avx2")]
#[inline]
fn bit_word(bits: &[u8; 4]) -> __m256i {
    _mm256_set1_epi32(i32::from_le_bytes(*bits))
}

/// The 8 values `alpha * (scale * f32::from(q[k]))`, each product rounded separately.
#[target_feature(enable = "avx2")]
#[inline]
fn dequant8(q: &[i8; 8], scale: __m256, alpha: __m256) -> __m256 {
    let q = _mm_set1_epi64x(i64::from_le_bytes(q.map(i8::cast_unsigned)));
    let q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
    _mm256_mul_ps(alpha, _mm256_mul_ps(scale, q))
}

/// `out[i] = base[i] + (±scale)`, sign `i` from bit `i % 8` of `bits[i / 8]`.
///
/// The body contract of [`ApplySignsFn`](super::ApplySignsFn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn avx2_apply_signs_f32_32n(out: &mut [f32], base: &[f32], bits: &[u8], scale: f32) {
    let neg_scale = _mm256_set1_ps(-scale);
    let shifts = sign_shifts();
    let chunks = out.chunks_exact_mut(LANES).zip(base.chunks_exact(LANES));
    for ((o, b), w) in chunks.zip(bits.as_chunks::<4>().0) {
        let word = bit_word(w);
        for (j, &shift) in shifts.iter().enumerate() {
            let s = signed_scale8(word, shift, neg_scale);
            // SAFETY: `b` has LANES = 32 elements and `j < 4`, so the 8 read from `8 * j` are in
            // bounds; `loadu` has no alignment requirement.
            let x = unsafe { _mm256_loadu_ps(b.as_ptr().add(8 * j)) };
            // SAFETY: as above, for the 32-element chunk `o`.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * j), _mm256_add_ps(x, s)) };
        }
    }
}

/// `acc[i] = acc[i] + (±scale)`, sign `i` from bit `i % 8` of `bits[i / 8]`.
///
/// The body contract of [`AddSignsFn`](super::AddSignsFn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn avx2_add_signs_f32_32n(acc: &mut [f32], bits: &[u8], scale: f32) {
    let neg_scale = _mm256_set1_ps(-scale);
    let shifts = sign_shifts();
    for (a, w) in acc.chunks_exact_mut(LANES).zip(bits.as_chunks::<4>().0) {
        let word = bit_word(w);
        for (j, &shift) in shifts.iter().enumerate() {
            let s = signed_scale8(word, shift, neg_scale);
            let p = a[8 * j..].as_mut_ptr();
            // SAFETY: `a` has 32 elements and `j < 4`, so `p` points at 8 valid elements;
            // `loadu`/`storeu` have no alignment requirement.
            unsafe { _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), s)) };
        }
    }
}

/// `out[i] = base[i] + alpha * (scale * q[i])`.
///
/// The body contract of [`ApplyQ8Fn`](super::ApplyQ8Fn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn avx2_apply_q8_f32_32n(out: &mut [f32], base: &[f32], q: &[i8], scale: f32, alpha: f32) {
    let (scale, alpha) = (_mm256_set1_ps(scale), _mm256_set1_ps(alpha));
    let chunks = out.chunks_exact_mut(LANES).zip(base.chunks_exact(LANES));
    for ((o, b), q) in chunks.zip(q.as_chunks::<LANES>().0) {
        for (j, q) in q.as_chunks::<8>().0.iter().enumerate() {
            let d = dequant8(q, scale, alpha);
            // SAFETY: `b` has 32 elements and `j < 4`, so the 8 read from `8 * j` are in bounds.
            let x = unsafe { _mm256_loadu_ps(b.as_ptr().add(8 * j)) };
            // SAFETY: as above, for the 32-element chunk `o`.
            unsafe { _mm256_storeu_ps(o.as_mut_ptr().add(8 * j), _mm256_add_ps(x, d)) };
        }
    }
}

/// `acc[i] = acc[i] + alpha * (scale * q[i])`.
///
/// The body contract of [`AddQ8Fn`](super::AddQ8Fn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn avx2_add_q8_f32_32n(acc: &mut [f32], q: &[i8], scale: f32, alpha: f32) {
    let (scale, alpha) = (_mm256_set1_ps(scale), _mm256_set1_ps(alpha));
    for (a, q) in acc.chunks_exact_mut(LANES).zip(q.as_chunks::<LANES>().0) {
        for (j, q) in q.as_chunks::<8>().0.iter().enumerate() {
            let d = dequant8(q, scale, alpha);
            let p = a[8 * j..].as_mut_ptr();
            // SAFETY: `a` has 32 elements and `j < 4`, so `p` points at 8 valid elements.
            unsafe { _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), d)) };
        }
    }
}

/// `acc[i] = acc[i] + alpha * x[i]`.
///
/// The body contract of [`AddScaledFn`](super::AddScaledFn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn avx2_add_scaled_f32_32n(acc: &mut [f32], x: &[f32], alpha: f32) {
    let alpha = _mm256_set1_ps(alpha);
    for (a, x) in acc.chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)) {
        for j in 0..LANES / 8 {
            let p = a[8 * j..].as_mut_ptr();
            // SAFETY: `a` and `x` have 32 elements and `j < 4`, so 8 elements from `8 * j` are
            // valid in both.
            unsafe {
                let v = _mm256_mul_ps(alpha, _mm256_loadu_ps(x.as_ptr().add(8 * j)));
                _mm256_storeu_ps(p, _mm256_add_ps(_mm256_loadu_ps(p), v));
            }
        }
    }
}
