//! Sign-bit packing: the one place that defines the bit order.
//!
//! A delta tensor of `n` elements stores one sign bit per element in [`packed_len`]`(n)` bytes.
//! Element `i` uses bit `i % 8` of byte `i / 8`, least significant bit first:
//!
//! ```text
//! byte:      bits[0]                  bits[1]
//! bit:       7 6 5 4 3 2 1 0          7 6 5 4 3 2 1 0
//! element:   7 6 5 4 3 2 1 0         15 ...         8
//! ```
//!
//! Bit `1` means `+1` and bit `0` means `-1`. Zero (of either sign) maps to `+1`: the bit is
//! `!(d < 0.0)`. The unused high bits of the last byte are always `0`, so a packed tensor has exactly
//! one valid encoding ([`padding_bits_clear`] checks this when reading untrusted bytes).
//!
//! Everything here is pure and allocation-free; the kernels in [`crate::kernels`] read bits with
//! the same order (through [`sign_at`] in the scalar reference).

/// The number of bytes that hold the sign bits of `n` elements: `ceil(n / 8)`.
///
/// ```
/// use bitdelta::pack::packed_len;
/// assert_eq!(packed_len(0), 0);
/// assert_eq!(packed_len(1), 1);
/// assert_eq!(packed_len(8), 1);
/// assert_eq!(packed_len(9), 2);
/// ```
#[inline]
#[must_use]
pub const fn packed_len(n: usize) -> usize {
    n.div_ceil(8)
}

/// The sign bit of one delta: `1` (`+1`) unless `d < 0.0`, so both zeros map to `+1`.
#[inline(always)]
#[allow(
    clippy::neg_cmp_op_on_partial_ord,
    reason = "this is the definition: zeros map to +1"
)]
fn sign_bit(d: f32) -> u8 {
    u8::from(!(d < 0.0))
}

/// Packs up to eight deltas into one byte, element `k` in bit `k`. Missing elements give `0` bits.
#[inline(always)]
fn pack_byte(chunk: &[f32]) -> u8 {
    chunk
        .iter()
        .enumerate()
        .fold(0u8, |acc, (k, &d)| acc | (sign_bit(d) << k))
}

/// Packs the signs of `deltas` into `out`, one bit per element, LSB first.
///
/// Writes exactly [`packed_len`]`(deltas.len())` bytes at the start of `out` and leaves the rest
/// of `out` untouched. The unused high bits of the last written byte are `0`. Callers guarantee
/// that `deltas` holds no NaN (a NaN would pack as `+1`).
///
/// # Panics
/// If `out.len() < packed_len(deltas.len())`.
///
/// ```
/// use bitdelta::pack::{pack_signs, sign_at};
/// let deltas = [0.5, -0.25, 0.0, -0.0, -3.0, 1.0, 2.0, -1.0, -7.0];
/// let mut bits = [0u8; 2];
/// pack_signs(&deltas, &mut bits);
/// assert_eq!(bits, [0b0110_1101, 0b0000_0000]);
/// assert!(sign_at(&bits, 0) && !sign_at(&bits, 1) && sign_at(&bits, 3));
/// ```
pub fn pack_signs(deltas: &[f32], out: &mut [u8]) {
    let len = packed_len(deltas.len());
    assert!(
        out.len() >= len,
        "pack_signs: output holds {} bytes but {} elements need {len}",
        out.len(),
        deltas.len()
    );
    let (chunks, rest) = deltas.as_chunks::<8>();
    let (body, last) = out[..len].split_at_mut(chunks.len());
    for (byte, chunk) in body.iter_mut().zip(chunks) {
        *byte = pack_byte(chunk);
    }
    if let Some(byte) = last.first_mut() {
        *byte = pack_byte(rest);
    }
}

/// The sign bit of element `i`: `true` means `+1`, `false` means `-1`.
///
/// # Panics
/// If `i / 8 >= bits.len()`.
#[inline]
#[must_use]
pub fn sign_at(bits: &[u8], i: usize) -> bool {
    (bits[i / 8] >> (i % 8)) & 1 == 1
}

/// Whether the bits past element `n` in the last byte of a packed tensor are all zero.
///
/// Inspects only byte `n / 8` (when `n % 8 != 0`); bytes after [`packed_len`]`(n)` are not looked
/// at. Returns `false` when `bits` is shorter than `packed_len(n)`, so it never panics on
/// untrusted input.
///
/// ```
/// use bitdelta::pack::padding_bits_clear;
/// assert!(padding_bits_clear(&[0b0000_0111], 3));
/// assert!(!padding_bits_clear(&[0b0000_1111], 3));
/// assert!(padding_bits_clear(&[0xff], 8));
/// assert!(!padding_bits_clear(&[], 1));
/// ```
#[must_use]
pub fn padding_bits_clear(bits: &[u8], n: usize) -> bool {
    if bits.len() < packed_len(n) {
        return false;
    }
    let used = n % 8;
    if used == 0 {
        return true;
    }
    bits[n / 8] >> used == 0
}

#[cfg(test)]
#[allow(
    clippy::neg_cmp_op_on_partial_ord,
    reason = "the tests restate the definition"
)]
mod tests {
    use super::*;

    fn pack_vec(deltas: &[f32]) -> Vec<u8> {
        // Fill with a canary to prove pack_signs writes every byte of its output.
        let mut out = vec![0xa5; packed_len(deltas.len()) + 3];
        pack_signs(deltas, &mut out);
        assert_eq!(
            &out[packed_len(deltas.len())..],
            &[0xa5; 3],
            "wrote past packed_len"
        );
        out.truncate(packed_len(deltas.len()));
        out
    }

    /// An independent bit-by-bit reference: no chunking, no folds.
    fn pack_naive(deltas: &[f32]) -> Vec<u8> {
        let mut out = vec![0u8; packed_len(deltas.len())];
        for (i, &d) in deltas.iter().enumerate() {
            if d >= 0.0 {
                out[i / 8] |= 1 << (i % 8);
            }
        }
        out
    }

    #[test]
    fn packed_len_is_ceil_div_8() {
        for n in 0..100 {
            // The fewest bytes that hold n bits.
            let len = packed_len(n);
            assert!(len * 8 >= n && (len == 0 || (len - 1) * 8 < n), "n = {n}");
        }
        assert_eq!(packed_len(usize::MAX), usize::MAX / 8 + 1);
    }

    #[test]
    fn hand_example() {
        let deltas = [
            0.5,
            -0.25,
            0.0,
            -0.0,
            -3.0,
            1.0,
            2.0,
            -1.0,
            -7.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
        ];
        assert_eq!(pack_vec(&deltas), [0b0110_1101, 0b0000_0010]);
        assert_eq!(pack_vec(&[]), Vec::<u8>::new());
        assert_eq!(pack_vec(&[-1.0; 8]), [0]);
        assert_eq!(pack_vec(&[1.0; 9]), [0xff, 0x01]);
    }

    #[test]
    fn roundtrip_small() {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        for n in 0..=70 {
            let deltas: Vec<f32> = (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    match state % 5 {
                        0 => 0.0,
                        1 => -0.0,
                        2 => -f32::from_bits(1),
                        _ => (state >> 40) as f32 - (1u64 << 23) as f32,
                    }
                })
                .collect();
            let bits = pack_vec(&deltas);
            assert_eq!(bits, pack_naive(&deltas), "n = {n}");
            assert!(padding_bits_clear(&bits, n));
            for (i, &d) in deltas.iter().enumerate() {
                assert_eq!(sign_at(&bits, i), !(d < 0.0), "n = {n}, i = {i}");
            }
        }
    }

    #[test]
    fn padding_detection() {
        for n in 1..=16usize {
            let mut bits = pack_vec(&vec![1.0; n]);
            assert!(padding_bits_clear(&bits, n));
            if n % 8 != 0 {
                *bits.last_mut().unwrap() |= 0x80;
                assert!(!padding_bits_clear(&bits, n), "n = {n}");
            }
            assert!(!padding_bits_clear(&bits[..bits.len() - 1], n));
        }
        assert!(padding_bits_clear(&[], 0));
        assert!(
            padding_bits_clear(&[0xff, 0xff], 8),
            "bytes past packed_len are not inspected"
        );
    }

    #[test]
    #[should_panic(expected = "pack_signs")]
    fn short_output_panics() {
        pack_signs(&[1.0; 9], &mut [0u8; 1]);
    }

    #[cfg(not(miri))]
    mod props {
        use super::*;
        use proptest::prelude::*;

        fn delta() -> impl Strategy<Value = f32> {
            prop_oneof![
                Just(0.0f32),
                Just(-0.0f32),
                any::<f32>().prop_filter("no NaN", |d| !d.is_nan()),
            ]
        }

        proptest! {
            #[test]
            fn pack_then_unpack(deltas in prop::collection::vec(delta(), 0..2000)) {
                let bits = pack_vec(&deltas);
                prop_assert_eq!(bits.len(), packed_len(deltas.len()));
                prop_assert!(padding_bits_clear(&bits, deltas.len()));
                prop_assert_eq!(&bits, &pack_naive(&deltas));
                for (i, &d) in deltas.iter().enumerate() {
                    prop_assert_eq!(sign_at(&bits, i), !(d < 0.0));
                }
            }
        }
    }
}
