//! The scalar kernels: the specification every other backend must match bit for bit.
//!
//! Written for clarity, not speed, and compiled on every target. Each function is the plain
//! element-wise formula from the contract in [`super`]; the dispatcher also uses them for the
//! unaligned heads and the tails that the SIMD bodies do not handle.

use super::Kernels;
use crate::pack::sign_at;

/// `+scale` for a set bit, `-scale` for a clear one. Negation only flips the sign bit, so it is
/// exact (the SIMD backends XOR the sign bit to the same effect).
#[inline(always)]
fn signed_scale(scale: f32, bit: bool) -> f32 {
    if bit {
        scale
    } else {
        -scale
    }
}

/// `alpha * (scale * q)`, each product rounded to `f32` in that order.
#[inline(always)]
fn dequant(q: i8, scale: f32, alpha: f32) -> f32 {
    alpha * (scale * f32::from(q))
}

/// `out[i] = base[i] + (±scale)`, the sign taken from bit `bit_offset + i` of `bits`.
pub(super) fn scalar_apply_signs_f32(
    out: &mut [f32],
    base: &[f32],
    bits: &[u8],
    bit_offset: usize,
    scale: f32,
) {
    debug_assert_eq!(out.len(), base.len());
    for (i, (o, &b)) in out.iter_mut().zip(base).enumerate() {
        *o = b + signed_scale(scale, sign_at(bits, bit_offset + i));
    }
}

/// `acc[i] = acc[i] + (±scale)`, the sign taken from bit `bit_offset + i` of `bits`.
pub(super) fn scalar_add_signs_f32(acc: &mut [f32], bits: &[u8], bit_offset: usize, scale: f32) {
    for (i, a) in acc.iter_mut().enumerate() {
        *a += signed_scale(scale, sign_at(bits, bit_offset + i));
    }
}

/// `out[i] = base[i] + alpha * (scale * q[i])`.
pub(super) fn scalar_apply_q8_f32(out: &mut [f32], base: &[f32], q: &[i8], scale: f32, alpha: f32) {
    debug_assert_eq!(out.len(), base.len());
    debug_assert_eq!(out.len(), q.len());
    for ((o, &b), &q) in out.iter_mut().zip(base).zip(q) {
        *o = b + dequant(q, scale, alpha);
    }
}

/// `acc[i] = acc[i] + alpha * (scale * q[i])`.
pub(super) fn scalar_add_q8_f32(acc: &mut [f32], q: &[i8], scale: f32, alpha: f32) {
    debug_assert_eq!(acc.len(), q.len());
    for (a, &q) in acc.iter_mut().zip(q) {
        *a += dequant(q, scale, alpha);
    }
}

/// `acc[i] = acc[i] + alpha * x[i]`, two roundings (never fused).
pub(super) fn scalar_add_scaled_f32(acc: &mut [f32], x: &[f32], alpha: f32) {
    debug_assert_eq!(acc.len(), x.len());
    for (a, &x) in acc.iter_mut().zip(x) {
        *a += alpha * x;
    }
}

/// Body slot: the bits start at bit 0 of `bits[0]`.
fn apply_signs_body(out: &mut [f32], base: &[f32], bits: &[u8], scale: f32) {
    scalar_apply_signs_f32(out, base, bits, 0, scale);
}

/// Body slot: the bits start at bit 0 of `bits[0]`.
fn add_signs_body(acc: &mut [f32], bits: &[u8], scale: f32) {
    scalar_add_signs_f32(acc, bits, 0, scale);
}

/// The scalar table: every slot runs the reference code above. SIMD tables start from it
/// (`Kernels { name, .., ..SCALAR }`) and overwrite the slots their ISA implements.
pub(super) const SCALAR: Kernels = Kernels {
    name: "scalar",
    apply_signs: apply_signs_body,
    add_signs: add_signs_body,
    apply_q8: scalar_apply_q8_f32,
    add_q8: scalar_add_q8_f32,
    add_scaled: scalar_add_scaled_f32,
};
