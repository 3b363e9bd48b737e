//! The `sign-groups` codec: one sign bit per element, one scale per group.
//!
//! Layout (`docs/FORMAT.md` §8): `G` scales (f16 or f32, per `FLAG_SCALES_F16`), then
//! `ceil(n/8)` bytes of sign bits as in `sign`. `G` divides `n`; element `i` belongs to group
//! `i / (n / G)` and is `base + alpha * (±scale_g)`.

use super::sign::add_planes;
#[cfg(feature = "alloc")]
use super::{group_means, scales_from, sign::pack, Encoded};
use super::{group_scales, Cursor, Layout, Span};

/// `sign-groups`: the group scales, then `ceil(n/8)` bytes.
pub(super) const LAYOUT: Layout = Layout {
    expected_len: |f| group_scales(f).map(|s| s + f.numel.div_ceil(8)),
    planes: |_| 1,
};

/// The `sign-groups` decoder: `alpha * scale_g` for every element of group `g`.
pub(super) fn decode<C: Cursor>(s: Span<'_>, cur: &mut C) -> Result<(), C::Error> {
    let (scales, alpha) = (s.p.scales, s.alpha);
    add_planes(s, cur, |_, g| alpha * scales.get(g as usize))
}

/// Sign bits with one scale (mean |d| of the group) per group of `n / groups` elements.
/// Scales are f16 when `f16_scales` and every scale is representable as a normal f16.
///
/// # Panics
/// When `groups` is 0 or does not divide the length.
#[cfg(feature = "alloc")]
pub fn sign_groups(base: &[f32], fine: &[f32], groups: usize, f16_scales: bool) -> Encoded {
    // x * 1.0 == x exactly, so this is the unscaled rule.
    sign_groups_scaled(base, fine, groups, f16_scales, 1.0)
}

/// [`sign_groups`] with every group scale multiplied by `multiplier` (in f64, before rounding to
/// the stored type).
///
/// # Panics
/// When `groups` is 0 or does not divide the length.
#[cfg(feature = "alloc")]
pub fn sign_groups_scaled(
    base: &[f32],
    fine: &[f32],
    groups: usize,
    f16_scales: bool,
    multiplier: f64,
) -> Encoded {
    Encoded::SignGroups {
        scales: scales_from(group_means(base, fine, groups, multiplier), f16_scales),
        bits: pack(base, fine),
    }
}
