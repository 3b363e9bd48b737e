//! Encoders: from a base and a fine-tuned tensor to one codec's payload (needs `alloc`).
//!
//! One file per codec holds its encoder: [`raw`] (`raw-f32`, `raw-f16`), [`sign`] (`sign`),
//! [`sign_groups`], [`q8_groups`] and [`sign_planes`]; [`rounding`] chooses the bits of the sign
//! codecs by their effect on a layer's outputs. The payload layouts and their serialisation are
//! in [`crate::format`] ([`Encoded`](crate::format::Encoded), `docs/FORMAT.md` §8), reconstruction is in
//! [`crate::compose`] and [`crate::stream`].
//!
//! May depend on: `alloc`, `half`, [`crate::format`], [`crate::pack`], [`crate::compose`]
//! (its chunk length). Nothing here does I/O.
//!
//! Differences are taken in f64 (`fine - base` of two f32 is exact there), statistics are
//! accumulated in f64 and rounded once to the stored scale type.

use alloc::vec::Vec;

use half::f16;

use crate::format::OwnedScales;

mod q8_groups;
mod raw;
mod rounding;
mod sign;
mod sign_groups;
mod sign_planes;

pub use q8_groups::q8_groups;
pub use raw::{raw_f16, raw_f32};
pub use rounding::{round_signs_to_outputs, OutputRounding, OUTPUT_ROUNDING_DAMP};
pub use sign::{sign_tensor, sign_tensor_scaled};
pub use sign_groups::{sign_groups, sign_groups_scaled};
pub use sign_planes::{sign_planes, sign_planes_scaled, PLANE_FIT_ROUNDS};

/// Smallest positive normal f16: scales below it (or above f16::MAX) are stored as f32.
const F16_MIN_NORMAL: f64 = 6.103_515_625e-5;

fn deltas<'a>(base: &'a [f32], fine: &'a [f32]) -> impl Iterator<Item = f64> + 'a {
    base.iter()
        .zip(fine)
        .map(|(&b, &f)| f64::from(f) - f64::from(b))
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

fn widen(s: &OwnedScales) -> Vec<f64> {
    scale_values(s).into_iter().map(f64::from).collect()
}

#[cfg(test)]
mod tests;
