//! NEON kernels for aarch64.
//!
//! NEON (Advanced SIMD) is part of the aarch64 baseline, so this backend is chosen at compile
//! time (memchr does the same): the module is only built when `target_feature = "neon"` is on,
//! which it is for every aarch64 target except the `-softfloat` ones.
//!
//! Every body processes [`LANES`] (32) elements per step: eight 4-lane vectors, and for the sign
//! kernels the four bytes of bits that cover them. A sign bit selects `+scale` or `-scale` with
//! `vtstq_u32` (bit test against a one-bit lane mask) and `vbslq_f32`. There is no fused
//! multiply-add anywhere (no `vfmaq`/`vmlaq`): products and sums are separate `vmulq_f32` and
//! `vaddq_f32`, so results are bit-identical to the scalar reference.
//!
//! Soundness: the entry points are `unsafe` because they need NEON. The safe slots that
//! `isa_table!` writes around them (and that `debug_assert!` the body contract) are reachable
//! only through [`NEON`]; this module is compiled only when NEON is enabled for the whole build.
//! All memory accesses stay inside `chunks_exact` chunks, so a broken length contract can only
//! drop elements, never read or write out of bounds.
//!
//! May depend on: `core::arch::aarch64` and the parent [`super`] (the table type, [`LANES`] and
//! `isa_table!`). Nothing else: no `alloc`, no `std`.
#![allow(unsafe_code)]

use core::arch::aarch64::*;

use super::{Kernels, LANES};

// This module only exists when NEON is enabled at compile time for the whole build.
isa_table! {
    static NEON = "neon" {
        apply_signs: neon_apply_signs_f32_32n,
        add_signs: neon_add_signs_f32_32n,
        apply_q8: neon_apply_q8_f32_32n,
        add_q8: neon_add_q8_f32_32n,
        add_scaled: neon_add_scaled_f32_32n,
    }
}

/// The NEON table. Always available: this module is only built with `target_feature = "neon"`.
#[allow(clippy::unnecessary_wraps)] // Same signature as the other ISA modules' `table`.
pub(super) fn table() -> Option<&'static Kernels> {
    Some(&NEON)
}

/// One-bit masks: lane `k` of vector `j` tests bit `4 * j + k` of a 32-bit word.
const BIT_MASKS: [[u32; 4]; 8] = {
    let mut masks = [[0; 4]; 8];
    let mut i = 0;
    while i < 32 {
        masks[i / 4][i % 4] = 1 << i;
        i += 1;
    }
    masks
};

/// [`BIT_MASKS`] as vectors.
#[target_feature(enable = "neon")]
#[inline]
fn bit_masks() -> [uint32x4_t; 8] {
    // SAFETY: each row of `BIT_MASKS` holds exactly the 4 `u32`s that `vld1q_u32` reads.
    BIT_MASKS.map(|row| unsafe { vld1q_u32(row.as_ptr()) })
}

/// `±scale` for 4 lanes: `pos` where the bit that `mask` selects from `word` is set, else `neg`.
#[target_feature(enable = "neon")]
#[inline]
fn signed_scale4(
    word: uint32x4_t,
    mask: uint32x4_t,
    pos: float32x4_t,
    neg: float32x4_t,
) -> float32x4_t {
    vbslq_f32(vtstq_u32(word, mask), pos, neg)
}

/// The 16 values `alpha * (scale * f32::from(q[k]))`, each product rounded separately.
#[target_feature(enable = "neon")]
#[inline]
fn dequant16(q: int8x16_t, scale: float32x4_t, alpha: float32x4_t) -> [float32x4_t; 4] {
    let lo = vmovl_s8(vget_low_s8(q));
    let hi = vmovl_high_s8(q);
    [
        vmovl_s16(vget_low_s16(lo)),
        vmovl_high_s16(lo),
        vmovl_s16(vget_low_s16(hi)),
        vmovl_high_s16(hi),
    ]
    .map(|q| vmulq_f32(alpha, vmulq_f32(scale, vcvtq_f32_s32(q))))
}

/// `out[i] = base[i] + (±scale)`, sign `i` from bit `i % 8` of `bits[i / 8]`.
///
/// The body contract of [`ApplySignsFn`](super::ApplySignsFn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn neon_apply_signs_f32_32n(out: &mut [f32], base: &[f32], bits: &[u8], scale: f32) {
    let (pos, neg) = (vdupq_n_f32(scale), vdupq_n_f32(-scale));
    let masks = bit_masks();
    let chunks = out.chunks_exact_mut(LANES).zip(base.chunks_exact(LANES));
    for ((o, b), w) in chunks.zip(bits.as_chunks::<4>().0) {
        let word = vdupq_n_u32(u32::from_le_bytes(*w));
        for (j, &mask) in masks.iter().enumerate() {
            let s = signed_scale4(word, mask, pos, neg);
            // SAFETY: `b` has LANES = 32 elements and `j < 8`, so the 4 read from `4 * j` are in
            // bounds; `vld1q_f32` only needs `f32` alignment.
            let x = unsafe { vld1q_f32(b.as_ptr().add(4 * j)) };
            // SAFETY: as above, for the 32-element chunk `o`.
            unsafe { vst1q_f32(o.as_mut_ptr().add(4 * j), vaddq_f32(x, s)) };
        }
    }
}

/// `acc[i] = acc[i] + (±scale)`, sign `i` from bit `i % 8` of `bits[i / 8]`.
///
/// The body contract of [`AddSignsFn`](super::AddSignsFn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn neon_add_signs_f32_32n(acc: &mut [f32], bits: &[u8], scale: f32) {
    let (pos, neg) = (vdupq_n_f32(scale), vdupq_n_f32(-scale));
    let masks = bit_masks();
    for (a, w) in acc.chunks_exact_mut(LANES).zip(bits.as_chunks::<4>().0) {
        let word = vdupq_n_u32(u32::from_le_bytes(*w));
        for (j, &mask) in masks.iter().enumerate() {
            let s = signed_scale4(word, mask, pos, neg);
            let p = a[4 * j..].as_mut_ptr();
            // SAFETY: `a` has 32 elements and `j < 8`, so `p` points at 4 valid elements.
            unsafe { vst1q_f32(p, vaddq_f32(vld1q_f32(p), s)) };
        }
    }
}

/// `out[i] = base[i] + alpha * (scale * q[i])`.
///
/// The body contract of [`ApplyQ8Fn`](super::ApplyQ8Fn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn neon_apply_q8_f32_32n(out: &mut [f32], base: &[f32], q: &[i8], scale: f32, alpha: f32) {
    let (scale, alpha) = (vdupq_n_f32(scale), vdupq_n_f32(alpha));
    let chunks = out.chunks_exact_mut(16).zip(base.chunks_exact(16));
    for ((o, b), q) in chunks.zip(q.as_chunks::<16>().0) {
        // SAFETY: `q` is a 16-byte array, exactly what `vld1q_s8` reads.
        let d = dequant16(unsafe { vld1q_s8(q.as_ptr()) }, scale, alpha);
        for (j, d) in d.into_iter().enumerate() {
            // SAFETY: `b` and `o` have 16 elements and `j < 4`, so 4 elements from `4 * j` are
            // in bounds in both.
            unsafe {
                let x = vld1q_f32(b.as_ptr().add(4 * j));
                vst1q_f32(o.as_mut_ptr().add(4 * j), vaddq_f32(x, d));
            }
        }
    }
}

/// `acc[i] = acc[i] + alpha * (scale * q[i])`.
///
/// The body contract of [`AddQ8Fn`](super::AddQ8Fn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn neon_add_q8_f32_32n(acc: &mut [f32], q: &[i8], scale: f32, alpha: f32) {
    let (scale, alpha) = (vdupq_n_f32(scale), vdupq_n_f32(alpha));
    for (a, q) in acc.chunks_exact_mut(16).zip(q.as_chunks::<16>().0) {
        // SAFETY: `q` is a 16-byte array, exactly what `vld1q_s8` reads.
        let d = dequant16(unsafe { vld1q_s8(q.as_ptr()) }, scale, alpha);
        for (j, d) in d.into_iter().enumerate() {
            let p = a[4 * j..].as_mut_ptr();
            // SAFETY: `a` has 16 elements and `j < 4`, so `p` points at 4 valid elements.
            unsafe { vst1q_f32(p, vaddq_f32(vld1q_f32(p), d)) };
        }
    }
}

/// `acc[i] = acc[i] + alpha * x[i]`.
///
/// The body contract of [`AddScaledFn`](super::AddScaledFn) (debug-asserted by the slot).
///
/// # Safety
/// - The CPU must support NEON.
#[target_feature(enable = "neon")]
unsafe fn neon_add_scaled_f32_32n(acc: &mut [f32], x: &[f32], alpha: f32) {
    let alpha = vdupq_n_f32(alpha);
    for (a, x) in acc.chunks_exact_mut(LANES).zip(x.chunks_exact(LANES)) {
        for j in 0..LANES / 4 {
            let p = a[4 * j..].as_mut_ptr();
            // SAFETY: `a` and `x` have 32 elements and `j < 8`, so 4 elements from `4 * j` are
            // valid in both.
            unsafe {
                let v = vmulq_f32(alpha, vld1q_f32(x.as_ptr().add(4 * j)));
                vst1q_f32(p, vaddq_f32(vld1q_f32(p), v));
            }
        }
    }
}
