//! The `sign` codec: one sign bit per element, one f32 scale per tensor.

use alloc::vec;
use alloc::vec::Vec;

use super::deltas;
use crate::format::Encoded;

/// `sign(fine - base)` packed (sign(0) is +1), chunk by chunk.
pub(super) fn pack(base: &[f32], fine: &[f32]) -> Vec<u8> {
    let mut bits = vec![0u8; crate::pack::packed_len(base.len())];
    let mut d = vec![0f32; base.len().min(crate::compose::CHUNK)];
    // pack_signs takes f32 deltas; the sign of the f32 difference equals the exact one.
    for (k, (b, f)) in base
        .chunks(crate::compose::CHUNK)
        .zip(fine.chunks(crate::compose::CHUNK))
        .enumerate()
    {
        let d = &mut d[..b.len()];
        for ((o, &x), &y) in d.iter_mut().zip(b).zip(f) {
            *o = y - x;
        }
        let at = k * crate::compose::CHUNK / 8;
        crate::pack::pack_signs(d, &mut bits[at..at + crate::pack::packed_len(d.len())]);
    }
    bits
}

/// The seed recipe (ZIP-0427, BitDelta): `sign(fine - base)` with `scale = mean |fine - base|`,
/// the mean taken in f64 and rounded once to f32. sign(0) is +1.
pub fn sign_tensor(base: &[f32], fine: &[f32]) -> Encoded {
    // x * 1.0 == x exactly, so this is the unscaled rule.
    sign_tensor_scaled(base, fine, 1.0)
}

/// [`sign_tensor`] with the scale multiplied by `multiplier` (in f64, before the one rounding to
/// f32): a scale fitted to the model's outputs rather than to the weights (see
/// [`crate::calibrate`]).
pub fn sign_tensor_scaled(base: &[f32], fine: &[f32], multiplier: f64) -> Encoded {
    let n = base.len().max(1) as f64;
    let scale = (multiplier * (deltas(base, fine).map(f64::abs).sum::<f64>() / n)) as f32;
    Encoded::Sign {
        scale,
        bits: pack(base, fine),
    }
}
