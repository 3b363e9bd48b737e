//! Reconstruction: base + one delta, or base + sum of alpha_i * delta_i (DeltaSoup), in one pass.
//!
//! The output is produced chunk by chunk: each chunk is filled from the base and then every delta
//! adds its contribution while the chunk is still in cache, so memory is walked once whatever the
//! number of deltas. The arithmetic is the one `docs/FORMAT.md` specifies (f32, non-fused), so the
//! result is bit-identical on every backend and every CPU.

use crate::codec::{SliceCursor, Term};
use crate::format::Payload;

/// Elements per chunk (16 KiB of f32): small enough for L1/L2, large enough for SIMD bodies.
pub const CHUNK: usize = 4096;

/// The base tensor values.
#[derive(Clone, Copy, Debug)]
pub enum Base<'a> {
    /// Native f32 values.
    F32(&'a [f32]),
    /// Little-endian f32 bytes (any alignment, e.g. straight from an ONNX file).
    F32Le(&'a [u8]),
    /// Little-endian IEEE f16 bytes.
    F16Le(&'a [u8]),
}

impl Base<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F32Le(b) => b.len() / 4,
            Self::F16Le(b) => b.len() / 2,
        }
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Reads elements `start..start + out.len()` as f32 into `out`.
    ///
    /// # Panics
    /// When that range runs past the end.
    pub fn read(&self, start: usize, out: &mut [f32]) {
        match self {
            Self::F32(v) => out.copy_from_slice(&v[start..start + out.len()]),
            Self::F32Le(b) => {
                let src = &b[start * 4..(start + out.len()) * 4];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Self::F16Le(b) => {
                let src = &b[start * 2..(start + out.len()) * 2];
                for (o, c) in out.iter_mut().zip(src.chunks_exact(2)) {
                    *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
        }
    }
}

/// Why a composition could not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ComposeError {
    /// A payload's element count differs from the output length.
    LengthMismatch {
        /// Output length.
        expected: usize,
        /// Payload element count.
        found: usize,
    },
    /// An alpha is NaN or infinite.
    BadAlpha,
}

impl core::fmt::Display for ComposeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::LengthMismatch { expected, found } => {
                write!(
                    f,
                    "payload length mismatch: expected {expected} elements, found {found}"
                )
            }
            Self::BadAlpha => write!(f, "alpha is NaN or infinite"),
        }
    }
}

impl core::error::Error for ComposeError {}

/// Reconstructs one tensor: `out = base + sum(alpha_i * delta_i)`, in one pass over memory.
///
/// With a single delta at alpha 1 this is the delta's exact reconstruction. Raw payloads are
/// replacements: a raw payload that comes first with alpha 1 sets the value; elsewhere it
/// contributes `alpha * (raw - base)`.
pub fn reconstruct(
    base: Base<'_>,
    deltas: &[(Payload<'_>, f32)],
    out: &mut [f32],
) -> Result<(), ComposeError> {
    if base.len() != out.len() {
        return Err(ComposeError::LengthMismatch {
            expected: out.len(),
            found: base.len(),
        });
    }
    reconstruct_at(base, deltas, 0, out)
}

/// Reconstructs the elements `first..first + out.len()` of one tensor (`base` is the whole
/// tensor): the same values [`reconstruct`] gives there, bit for bit, without the rest of it.
pub fn reconstruct_at(
    base: Base<'_>,
    deltas: &[(Payload<'_>, f32)],
    first: usize,
    out: &mut [f32],
) -> Result<(), ComposeError> {
    let n = base.len();
    let last =
        first
            .checked_add(out.len())
            .filter(|&e| e <= n)
            .ok_or(ComposeError::LengthMismatch {
                expected: n,
                found: first.saturating_add(out.len()),
            })?;
    for (p, alpha) in deltas {
        if !alpha.is_finite() {
            return Err(ComposeError::BadAlpha);
        }
        match p.elems(n) {
            Some(m) if m == n => {}
            found => {
                return Err(ComposeError::LengthMismatch {
                    expected: n,
                    found: found.unwrap_or(0),
                })
            }
        }
        let groups = p.groups().unwrap_or(0);
        if groups == 0 || !n.is_multiple_of(groups) {
            return Err(ComposeError::LengthMismatch {
                expected: n,
                found: groups,
            });
        }
    }
    let base_at = |i: u64, v: &mut [f32]| base.read(i as usize, v);
    let mut start = first;
    while start < last {
        let end = (start + CHUNK).min(last);
        let chunk = &mut out[start - first..end - first];
        let mut filled = false;
        for (k, (p, alpha)) in deltas.iter().enumerate() {
            let (codec, params, body) = p.parts(0, n as u64);
            // A replacement that comes first with alpha 1 sets the values.
            let replace = k == 0 && *alpha == 1.0 && codec.replaces();
            if !replace {
                fill(&base, start, chunk, &mut filled);
            }
            let term = Term {
                alpha: *alpha,
                base: (!replace).then_some(&base_at as &dyn Fn(u64, &mut [f32])),
            };
            let mut cur = SliceCursor::new(body);
            // The lengths were checked above, so every read is inside the payload.
            codec
                .decode(&params, &mut cur, start as u64, chunk, &term)
                .map_err(|_| ComposeError::LengthMismatch {
                    expected: n,
                    found: 0,
                })?;
            filled = true;
        }
        fill(&base, start, chunk, &mut filled);
        start = end;
    }
    Ok(())
}

fn fill(base: &Base<'_>, start: usize, chunk: &mut [f32], filled: &mut bool) {
    if !*filled {
        base.read(start, chunk);
        *filled = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::Scales;
    use proptest::prelude::*;

    /// `docs/FORMAT.md` §9 for `sign-planes` and `sign-groups`, written independently of the
    /// kernels: f64 arithmetic rounded to f32 after every operation (one f32 rounding, since
    /// f64 holds the exact sum or product of two f32), element by element, in list order.
    fn reference(base: &[f32], deltas: &[(usize, Vec<f32>, Vec<u8>, f32)]) -> Vec<f32> {
        let f = |x: f64| f64::from(x as f32);
        let n = base.len();
        (0..n)
            .map(|i| {
                let mut acc = f64::from(base[i]);
                for (planes, scales, bits, alpha) in deltas {
                    let groups = scales.len() / planes;
                    let g = i / (n / groups);
                    for j in 0..*planes {
                        let byte = if *planes == 1 {
                            i / 8
                        } else {
                            (i / 8) * planes + j
                        };
                        let s = f(f64::from(*alpha) * f64::from(scales[j * groups + g]));
                        let plus = bits[byte] >> (i % 8) & 1 == 1;
                        acc = f(acc + if plus { s } else { -s });
                    }
                }
                acc as f32
            })
            .collect()
    }

    fn xorshift(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// A base, then `(planes, scales, bits, alpha)` per delta (1 plane = `sign-groups`), with
    /// clear padding bits.
    #[allow(clippy::type_complexity)]
    fn case(
        n: usize,
        specs: &[(usize, usize, f32)],
        seed: u64,
    ) -> (Vec<f32>, Vec<(usize, Vec<f32>, Vec<u8>, f32)>) {
        let mut s = seed | 1;
        let mut unit = || (xorshift(&mut s) % 20001) as f32 / 10000.0 - 1.0;
        let base: Vec<f32> = (0..n).map(|_| unit() * 3.0).collect();
        let deltas = specs
            .iter()
            .map(|&(planes, groups, alpha)| {
                let scales = (0..planes * groups).map(|_| unit().abs() * 0.5).collect();
                let mut bits: Vec<u8> = (0..n.div_ceil(8) * planes)
                    .map(|_| (unit() * 1000.0) as i32 as u8)
                    .collect();
                if !n.is_multiple_of(8) {
                    let last = bits.len() - planes;
                    bits[last..]
                        .iter_mut()
                        .for_each(|b| *b &= (1 << (n % 8)) - 1);
                }
                (planes, scales, bits, alpha)
            })
            .collect();
        (base, deltas)
    }

    fn check(n: usize, specs: &[(usize, usize, f32)], seed: u64) {
        let (base, deltas) = case(n, specs, seed);
        let scale_bytes: Vec<Vec<u8>> = deltas
            .iter()
            .map(|d| d.1.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let payloads: Vec<(Payload<'_>, f32)> = deltas
            .iter()
            .zip(&scale_bytes)
            .map(|((planes, _, bits, alpha), sb)| {
                let scales = Scales::F32(sb);
                let p = if *planes == 1 {
                    Payload::SignGroups { scales, bits }
                } else {
                    Payload::SignPlanes {
                        planes: *planes,
                        scales,
                        bits,
                    }
                };
                (p, *alpha)
            })
            .collect();
        let mut out = vec![0f32; n];
        reconstruct(Base::F32(&base), &payloads, &mut out).unwrap();
        let want = reference(&base, &deltas);
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "element {i} of {n}, {specs:?}");
        }
        // Any element range, also starting mid-byte or mid-chunk, gives the same values.
        for first in [1, 3, n / 3, n / 2 + 5, 4095, 4099] {
            if first >= n {
                continue;
            }
            for len in [1, 9, n - first] {
                let len = len.min(n - first);
                let mut part = vec![0f32; len];
                reconstruct_at(Base::F32(&base), &payloads, first, &mut part).unwrap();
                for (i, (g, w)) in part.iter().zip(&want[first..]).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "element {} of {n} from {first}, {specs:?}",
                        first + i
                    );
                }
            }
        }
    }

    #[test]
    fn sign_planes_match_the_reference() {
        // Across chunk boundaries (CHUNK = 4096), groups that start inside a chunk or a byte,
        // every plane count, composed with other deltas and alphas.
        for (n, groups) in [(1, 1), (7, 7), (15, 3), (4097, 17), (9000, 9), (12288, 3)] {
            for planes in 2..=8 {
                check(n, &[(planes, groups, 1.0)], n as u64 ^ planes as u64);
            }
            check(n, &[(3, groups, 0.5), (1, 1, -1.25), (2, 1, 2.0)], n as u64);
        }
    }

    #[test]
    fn sign_planes_that_do_not_fit_are_refused() {
        let base = [0f32; 10];
        let mut out = [0f32; 10];
        let s = [0u8; 4 * 4];
        let scales = Scales::F32(&s);
        for (planes, bits, scales) in [
            (2, 3, scales),                // 3 bytes, 2 planes of 10 elements need 4
            (2, 5, scales),                // 5
            (0, 0, scales),                // no plane
            (3, 6, scales),                // 4 scales, not a multiple of 3
            (2, 4, Scales::F32(&s[..12])), // 3 scales for 2 planes
        ] {
            let bits = vec![0u8; bits];
            let p = Payload::SignPlanes {
                planes,
                scales,
                bits: &bits,
            };
            assert!(matches!(
                reconstruct(Base::F32(&base), &[(p, 1.0)], &mut out),
                Err(ComposeError::LengthMismatch { .. })
            ));
        }
        // 4 scales, 2 planes: 2 groups, dividing 10.
        let bits = [0u8; 4];
        let p = Payload::SignPlanes {
            planes: 2,
            scales,
            bits: &bits,
        };
        assert!(reconstruct(Base::F32(&base), &[(p, 1.0)], &mut out).is_ok());
    }

    /// `docs/FORMAT.md` §9 for `sparse-signs` deltas `(scales, m, entries, alpha)`, in list
    /// order, written independently of the decoder (f64, rounded to f32 after every operation).
    fn sparse_reference(base: &[f32], deltas: &[(Vec<f32>, usize, Vec<u8>, f32)]) -> Vec<f32> {
        let f = |x: f64| f64::from(x as f32);
        let n = base.len();
        (0..n)
            .map(|i| {
                let mut acc = f64::from(base[i]);
                for (scales, m, entries, alpha) in deltas {
                    let block = &entries[(i / 64) * m..][..*m];
                    let Some(&e) = block.iter().find(|&&e| usize::from(e & 63) == i % 64) else {
                        continue;
                    };
                    let s = f64::from(scales[i / (n / scales.len())]);
                    let level = if e & 0x40 != 0 { 2.0 } else { 1.0 };
                    let v = f(f64::from(*alpha) * f(level * s));
                    acc = f(acc + if e & 0x80 != 0 { -v } else { v });
                }
                acc as f32
            })
            .collect()
    }

    /// Random `sparse-signs` deltas `(groups, m, alpha)` on a random base of `n` elements,
    /// composed, whole and from several starts (mid-block and mid-chunk), against the reference.
    fn check_sparse(n: usize, specs: &[(usize, usize, f32)], seed: u64) {
        let mut s = seed | 1;
        let mut next = || xorshift(&mut s);
        let base: Vec<f32> = (0..n)
            .map(|_| (next() % 20001) as f32 / 5000.0 - 2.0)
            .collect();
        let deltas: Vec<(Vec<f32>, usize, Vec<u8>, f32)> = specs
            .iter()
            .map(|&(groups, m, alpha)| {
                let scales = (0..groups)
                    .map(|_| (next() % 1001) as f32 / 2000.0)
                    .collect();
                (
                    scales,
                    m,
                    crate::codec::random_entries(&mut next, n, m),
                    alpha,
                )
            })
            .collect();
        let scale_bytes: Vec<Vec<u8>> = deltas
            .iter()
            .map(|d| d.0.iter().flat_map(|x| x.to_le_bytes()).collect())
            .collect();
        let payloads: Vec<(Payload<'_>, f32)> = deltas
            .iter()
            .zip(&scale_bytes)
            .map(|((_, m, entries, alpha), sb)| {
                let p = Payload::SparseSigns {
                    per_block: *m,
                    scales: Scales::F32(sb),
                    entries,
                };
                (p, *alpha)
            })
            .collect();
        let want = sparse_reference(&base, &deltas);
        let mut out = vec![0f32; n];
        reconstruct(Base::F32(&base), &payloads, &mut out).unwrap();
        for (i, (g, w)) in out.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "element {i} of {n}, {specs:?}");
        }
        for first in [1, 63, 64, 65, n / 3, n / 2 + 5, 4095, 4097] {
            if first >= n {
                continue;
            }
            for len in [1, 70, n - first] {
                let len = len.min(n - first);
                let mut part = vec![0f32; len];
                reconstruct_at(Base::F32(&base), &payloads, first, &mut part).unwrap();
                for (i, (g, w)) in part.iter().zip(&want[first..]).enumerate() {
                    assert_eq!(
                        g.to_bits(),
                        w.to_bits(),
                        "element {} from {first}",
                        first + i
                    );
                }
            }
        }
    }

    #[test]
    fn sparse_signs_match_the_reference() {
        // Across chunk boundaries (CHUNK = 4096, 64 blocks), short last blocks, groups that
        // start inside a block, composed with another delta and alphas.
        for (n, groups) in [(1, 1), (70, 7), (4097, 17), (9000, 9), (12288, 3)] {
            let most = crate::codec::max_entries(n as u64);
            for m in [1, 2.min(most), most / 2 + 1, most] {
                check_sparse(n, &[(groups, m, 1.0)], (n * m) as u64);
            }
            check_sparse(n, &[(groups, most, 0.5), (1, 1, -1.25)], n as u64);
        }
    }

    proptest! {
        #[test]
        fn random_sparse_signs_match_the_reference(
            n in 1usize..9000,
            m_pick in any::<usize>(),
            groups_pick in any::<usize>(),
            alpha in prop::sample::select(vec![1.0f32, 0.5, -0.75, 3.0]),
            seed in any::<u64>(),
        ) {
            let divisors: Vec<usize> = (1..=n).filter(|g| n % g == 0).collect();
            let groups = divisors[groups_pick % divisors.len()];
            let m = 1 + m_pick % crate::codec::max_entries(n as u64);
            check_sparse(n, &[(groups, m, alpha)], seed);
        }

        #[test]
        fn random_sign_planes_match_the_reference(
            n in 1usize..9000,
            planes in 2usize..=8,
            groups_pick in any::<usize>(),
            alpha in prop::sample::select(vec![1.0f32, 0.5, -0.75, 3.0]),
            seed in any::<u64>(),
        ) {
            let divisors: Vec<usize> = (1..=n).filter(|g| n % g == 0).collect();
            let groups = divisors[groups_pick % divisors.len()];
            check(n, &[(planes, groups, alpha)], seed);
        }
    }
}
