//! The `raw-f32` and `raw-f16` codecs: full replacement values.

use half::f16;

use crate::format::Encoded;

/// Full replacement as f32.
pub fn raw_f32(fine: &[f32]) -> Encoded {
    Encoded::RawF32(fine.to_vec())
}

/// Full replacement rounded to f16.
pub fn raw_f16(fine: &[f32]) -> Encoded {
    Encoded::RawF16(fine.iter().map(|&x| f16::from_f32(x)).collect())
}
