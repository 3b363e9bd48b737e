//! The `sign-groups` codec: one sign bit per element, one scale per group.

use super::sign::pack;
use super::{deltas, scales_from};
use crate::format::Encoded;

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
