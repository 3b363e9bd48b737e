//! Encoders: from a base and a fine-tuned tensor to one codec's payload (needs `alloc`).
//!
//! Differences are taken in f64 (`fine - base` of two f32 is exact there), statistics are
//! accumulated in f64 and rounded once to the stored scale type. Reconstruction is in
//! [`crate::compose`]; the rules both sides follow are in `docs/FORMAT.md`.

use alloc::vec;
use alloc::vec::Vec;

use half::f16;

use crate::format::{Encoded, OwnedScales};

/// Smallest positive normal f16: scales below it (or above f16::MAX) are stored as f32.
const F16_MIN_NORMAL: f64 = 6.103_515_625e-5;

fn deltas<'a>(base: &'a [f32], fine: &'a [f32]) -> impl Iterator<Item = f64> + 'a {
    base.iter()
        .zip(fine)
        .map(|(&b, &f)| f64::from(f) - f64::from(b))
}

fn pack(base: &[f32], fine: &[f32]) -> Vec<u8> {
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

fn scales_from(values: Vec<f64>, allow_f16: bool) -> OwnedScales {
    let f16_ok = allow_f16
        && values
            .iter()
            .all(|&v| v == 0.0 || (F16_MIN_NORMAL..=f64::from(f16::MAX.to_f32())).contains(&v));
    if f16_ok {
        // Through f32, so every platform (F16C, FP16, software) rounds the same way.
        OwnedScales::F16(
            values
                .into_iter()
                .map(|v| f16::from_f32(v as f32))
                .collect(),
        )
    } else {
        OwnedScales::F32(values.into_iter().map(|v| v as f32).collect())
    }
}

fn scale_values(s: &OwnedScales) -> Vec<f32> {
    match s {
        OwnedScales::F16(v) => v.iter().map(|x| x.to_f32()).collect(),
        OwnedScales::F32(v) => v.clone(),
    }
}

/// Sign bits with one scale (mean |d| of the group) per group of `n / groups` elements.
/// Scales are f16 when `f16_scales` and every scale is representable as a normal f16.
///
/// # Panics
/// When `groups` is 0 or does not divide the length.
pub fn sign_groups(base: &[f32], fine: &[f32], groups: usize, f16_scales: bool) -> Encoded {
    // x * 1.0 == x exactly, so this is the unscaled rule.
    sign_groups_scaled(base, fine, groups, f16_scales, 1.0)
}

/// [`sign_groups`] with every group scale multiplied by `multiplier` (in f64, before rounding to
/// the stored type).
///
/// # Panics
/// When `groups` is 0 or does not divide the length.
pub fn sign_groups_scaled(
    base: &[f32],
    fine: &[f32],
    groups: usize,
    f16_scales: bool,
    multiplier: f64,
) -> Encoded {
    assert!(
        groups > 0 && base.len().is_multiple_of(groups),
        "groups must divide the tensor length"
    );
    let g = base.len() / groups;
    let means = (0..groups)
        .map(|k| {
            multiplier
                * (deltas(&base[k * g..(k + 1) * g], &fine[k * g..(k + 1) * g])
                    .map(f64::abs)
                    .sum::<f64>()
                    / g as f64)
        })
        .collect();
    Encoded::SignGroups {
        scales: scales_from(means, f16_scales),
        bits: pack(base, fine),
    }
}

/// 8-bit symmetric deltas: per group, `scale = max |d| / 127` (rounded to the stored type),
/// `q = round(d / scale)` clamped to -127..=127 (0 where the scale is 0).
///
/// # Panics
/// When `groups` is 0 or does not divide the length.
pub fn q8_groups(base: &[f32], fine: &[f32], groups: usize, f16_scales: bool) -> Encoded {
    assert!(
        groups > 0 && base.len().is_multiple_of(groups),
        "groups must divide the tensor length"
    );
    let g = base.len() / groups;
    let maxes = (0..groups)
        .map(|k| {
            deltas(&base[k * g..(k + 1) * g], &fine[k * g..(k + 1) * g])
                .map(f64::abs)
                .fold(0.0, f64::max)
                / 127.0
        })
        .collect();
    let scales = scales_from(maxes, f16_scales);
    let sv = scale_values(&scales);
    let q = deltas(base, fine)
        .enumerate()
        .map(|(i, d)| {
            let s = f64::from(sv[i / g]);
            if s == 0.0 {
                0
            } else {
                (d / s).round().clamp(-127.0, 127.0) as i8
            }
        })
        .collect();
    Encoded::Q8Groups { scales, q }
}

/// Full replacement as f32.
pub fn raw_f32(fine: &[f32]) -> Encoded {
    Encoded::RawF32(fine.to_vec())
}

/// Full replacement rounded to f16.
pub fn raw_f16(fine: &[f32]) -> Encoded {
    Encoded::RawF16(fine.iter().map(|&x| f16::from_f32(x)).collect())
}
