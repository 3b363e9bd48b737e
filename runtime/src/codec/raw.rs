//! The `raw-f32` and `raw-f16` codecs: full replacement values.
//!
//! Layout (`docs/FORMAT.md` §8): `n` little-endian values (4 bytes each for `raw-f32`, 2 for
//! `raw-f16`), no groups, no scale. Decoding sets the values (the first delta at alpha 1) or adds
//! `alpha * (value - base)`.

#[cfg(feature = "alloc")]
use alloc::vec::Vec;

#[cfg(feature = "alloc")]
use half::f16;

#[cfg(feature = "alloc")]
use super::Encoded;
use super::{no_groups, Cursor, Layout, Span, Term};

/// `raw-f32`: `n * 4` bytes.
pub(super) const F32: Layout = Layout {
    expected_len: |f| no_groups(f).map(|()| f.numel * 4),
    planes: |_| 0,
};

/// `raw-f16`: `n * 2` bytes.
pub(super) const F16: Layout = Layout {
    expected_len: |f| no_groups(f).map(|()| f.numel * 2),
    planes: |_| 0,
};

/// Elements read per step when the base is needed (a stack buffer of base values).
const BASE_STEP: usize = 64;

/// One little-endian value of `size` bytes (4: f32, 2: IEEE f16) widened to f32.
fn value(c: &[u8]) -> f32 {
    match *c {
        [a, b, c, d] => f32::from_le_bytes([a, b, c, d]),
        [a, b] => half::f16::from_le_bytes([a, b]).to_f32(),
        _ => unreachable!("raw values are 2 or 4 bytes"),
    }
}

/// The decoder of both raw codecs (values of `size` bytes): sets the span's values, or with a
/// base reader in `t` adds `alpha * (value - base)`.
pub(super) fn decode<C: Cursor>(
    size: usize,
    s: Span<'_>,
    t: &Term<'_>,
    cur: &mut C,
) -> Result<(), C::Error> {
    let step = match t.base {
        None => C::WINDOW / size,
        Some(_) => (C::WINDOW / size).min(BASE_STEP),
    };
    let mut at = s.lo;
    for sub in s.out.chunks_mut(step) {
        let bytes = cur.read(at * size as u64, sub.len() * size)?;
        let values = bytes.chunks_exact(size).map(value);
        match t.base {
            None => sub.iter_mut().zip(values).for_each(|(o, v)| *o = v),
            Some(base) => {
                let mut b = [0f32; BASE_STEP];
                let b = &mut b[..sub.len()];
                base(at, b);
                for ((o, v), &x) in sub.iter_mut().zip(values).zip(b.iter()) {
                    *o += s.alpha * (v - x);
                }
            }
        }
        at += sub.len() as u64;
    }
    Ok(())
}

/// Appends little-endian values.
#[cfg(feature = "alloc")]
pub(super) fn write<T: bytemuck::NoUninit>(v: &[T], out: &mut Vec<u8>) {
    out.extend_from_slice(bytemuck::cast_slice(v));
}

/// Full replacement as f32.
#[cfg(feature = "alloc")]
pub fn raw_f32(fine: &[f32]) -> Encoded {
    Encoded::RawF32(fine.to_vec())
}

/// Full replacement rounded to f16.
#[cfg(feature = "alloc")]
pub fn raw_f16(fine: &[f32]) -> Encoded {
    Encoded::RawF16(fine.iter().map(|&x| f16::from_f32(x)).collect())
}
