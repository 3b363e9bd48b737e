//! The `q8-groups` codec: an 8-bit symmetric delta per element, one scale per group.
//!
//! Layout (`docs/FORMAT.md` §8): `G` scales (f16 or f32, per `FLAG_SCALES_F16`), then `n`
//! signed bytes in `-127..=127` (`-128` is refused). `G` divides `n`; element `i` of group `g`
//! is `base + alpha * (scale_g * q_i)`.

#[cfg(feature = "alloc")]
use super::{deltas, group_len, group_pairs, scale_values, scales_from, Encoded};
use super::{group_scales, read_checked, Cursor, Layout, Params, Span};
use crate::error::FormatError;
use crate::kernels;

/// `q8-groups`: the group scales, then `n` bytes.
pub(super) const LAYOUT: Layout = Layout {
    expected_len: |f| group_scales(f).map(|s| s + f.numel),
    planes: |_| 0,
};

/// The value rule: no `-128`.
pub(super) fn check(p: &Params<'_>, q: &[u8]) -> Result<(), FormatError> {
    if q.contains(&0x80) {
        return Err(FormatError::Q8OutOfRange { index: p.index });
    }
    Ok(())
}

/// The `q8-groups` decoder, a segment at a time (one group, at most one window).
pub(super) fn decode<C: Cursor>(mut s: Span<'_>, cur: &mut C) -> Result<(), C::Error> {
    let (p, alpha) = (s.p, s.alpha);
    s.segments(p.group_len(), C::WINDOW as u64, |g, a, b, seg| {
        let scale = p.scales.get(g as usize);
        let add = |q: &[u8]| kernels::add_q8(seg, bytemuck::cast_slice(q), scale, alpha);
        read_checked(cur, a, (b - a) as usize, |q| check(p, q), add)
    })
}

/// 8-bit symmetric deltas: per group, `scale = max |d| / 127` (rounded to the stored type),
/// `q = round(d / scale)` clamped to -127..=127 (0 where the scale is 0).
///
/// # Panics
/// When `groups` is 0 or does not divide the length.
#[cfg(feature = "alloc")]
pub fn q8_groups(base: &[f32], fine: &[f32], groups: usize, f16_scales: bool) -> Encoded {
    let g = group_len(base.len(), groups);
    let maxes = group_pairs(base, fine, groups, g)
        .map(|(b, f)| deltas(b, f).map(f64::abs).fold(0.0, f64::max) / 127.0)
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
