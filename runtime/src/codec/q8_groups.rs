//! The `q8-groups` codec: an 8-bit symmetric delta per element, one scale per group.

use super::{deltas, scale_values, scales_from};
use crate::format::Encoded;

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
