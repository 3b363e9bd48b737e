//! The `sparse-signs` codec: per block of [`SPARSE_BLOCK`] elements, only its `m` largest
//! changes, one byte each, with one scale per group: a delta below one bit per element.
//!
//! Layout (`docs/FORMAT.md` §8): `G` scales (f16 or f32, per `FLAG_SCALES_F16`), then `m` entry
//! bytes per block, block after block (`ceil(n / 64)` blocks, the last one may be shorter). An
//! entry byte holds the element's index in its block (bits 0-5), its level (bit 6: 2, else 1) and
//! its sign (bit 7: 1 = `-`). `m` is not stored: it is the body length over the block count, in
//! `1..=`[`max_entries`]`(n)` (at most [`MAX_SPARSE_ENTRIES`], and no more than the last block
//! has elements). The indices of a block are strictly increasing and below the block's length.
//! A listed element `i` of group `g` is `base + alpha * (±(level * scale_g))`; the others are the
//! base. Fixed-size blocks put block `b` at byte `b * m` of the body, so a decoder can start at
//! any block and reads forward.

#[cfg(feature = "alloc")]
use alloc::vec;
#[cfg(feature = "alloc")]
use alloc::vec::Vec;

#[cfg(feature = "alloc")]
use super::{deltas, group_len, scales_from, Encoded};
use super::{group_scales, read_checked, Cursor, Fields, Layout, Params, Span};
use crate::error::FormatError;

/// Elements per block of a `sparse-signs` payload (the last block may be shorter).
pub const SPARSE_BLOCK: usize = 64;

/// Most entries per block of a `sparse-signs` payload.
pub const MAX_SPARSE_ENTRIES: usize = 32;

/// Entry bits: the element's index in its block.
const INDEX: u8 = 0x3f;
/// Entry bit: level 2 (else 1).
const BIG: u8 = 0x40;
/// Entry bit: negative.
const NEG: u8 = 0x80;

/// The most entries per block a `sparse-signs` payload of an `n`-element tensor may have:
/// [`MAX_SPARSE_ENTRIES`], or fewer when the last block is shorter.
pub const fn max_entries(n: u64) -> usize {
    let last = (if n == 0 { 0 } else { n - 1 }) % SPARSE_BLOCK as u64 + 1;
    if last < MAX_SPARSE_ENTRIES as u64 {
        last as usize
    } else {
        MAX_SPARSE_ENTRIES
    }
}

/// Blocks of an `n`-element tensor.
const fn blocks(n: u64) -> u64 {
    n.div_ceil(SPARSE_BLOCK as u64)
}

/// Elements of block `b` of an `n`-element tensor.
fn block_len(n: u64, b: u64) -> u64 {
    n.saturating_sub(b * SPARSE_BLOCK as u64)
        .min(SPARSE_BLOCK as u64)
}

/// `sparse-signs`: the group scales, then a whole number `m` of entries per block, `m` in
/// `1..=max_entries(n)`; the expected length is the stored one when it is, else the nearest
/// valid one.
pub(super) const LAYOUT: Layout = Layout {
    expected_len: |f| {
        let scales = group_scales(f)?;
        Ok(match entries_for_len(f.numel, f.len.checked_sub(scales)) {
            Ok(_) => f.len,
            // `blocks <= 2^34`, `m <= 32`: no overflow.
            Err(m) => scales + blocks(f.numel) * m as u64,
        })
    },
    planes: |_| 0,
};

/// The entries per block of an entry whose length passed the layout check (0 otherwise).
pub(super) fn entries(f: &Fields) -> usize {
    let body = group_scales(f).ok().and_then(|s| f.len.checked_sub(s));
    entries_for_len(f.numel, body).unwrap_or(0)
}

/// The entries per block of a body of `body` bytes (`None`: shorter than the scales) for an
/// `n`-element tensor, or the nearest valid count when it is not a whole number in
/// `1..=max_entries(n)`.
fn entries_for_len(n: u64, body: Option<u64>) -> Result<usize, usize> {
    let (blocks, most) = (blocks(n).max(1), max_entries(n) as u64);
    let m = body.map_or(0, |b| b / blocks);
    match body {
        Some(b) if (1..=most).contains(&m) && m * blocks == b => Ok(m as usize),
        _ => Err(m.clamp(1, most) as usize),
    }
}

/// True when `m` entries per block fit a body of `len` bytes of an `n`-element tensor.
pub(super) fn fits(n: u64, m: usize, len: usize) -> bool {
    (1..=max_entries(n)).contains(&m) && Some(len as u64) == blocks(n).checked_mul(m as u64)
}

/// The value rule on whole blocks `bytes` of `p.per_block` entries, the first being block
/// `first`: in each block the indices are strictly increasing and below the block's length.
pub(super) fn check(p: &Params<'_>, first: u64, bytes: &[u8]) -> Result<(), FormatError> {
    for (k, entries) in bytes.chunks(p.per_block.max(1)).enumerate() {
        let block = first + k as u64;
        let len = block_len(p.n, block);
        let mut next = 0u64; // the smallest index allowed next
        for &e in entries {
            let i = u64::from(e & INDEX);
            if i < next || i >= len {
                return Err(FormatError::BadSparseIndex {
                    index: p.index,
                    block,
                });
            }
            next = i + 1;
        }
    }
    Ok(())
}

/// The `sparse-signs` decoder: reads the blocks that cover the span, a window of whole blocks
/// at a time, and adds `±(alpha * (level * scale_g))` to each listed element inside the span.
pub(super) fn decode<C: Cursor>(s: Span<'_>, cur: &mut C) -> Result<(), C::Error> {
    let (p, alpha, lo) = (s.p, s.alpha, s.lo);
    let (m, group) = (p.per_block, p.group_len());
    let hi = lo + s.out.len() as u64;
    if m == 0 || hi == lo {
        return Ok(());
    }
    let per_read = (C::WINDOW / m).max(1) as u64;
    let out = s.out;
    let (mut b, end) = (lo / SPARSE_BLOCK as u64, (hi - 1) / SPARSE_BLOCK as u64 + 1);
    while b < end {
        let count = per_read.min(end - b);
        let first = b;
        read_checked(
            cur,
            first * m as u64,
            count as usize * m,
            |bytes| check(p, first, bytes),
            |bytes| {
                for (k, entries) in bytes.chunks_exact(m).enumerate() {
                    let start = (first + k as u64) * SPARSE_BLOCK as u64;
                    for &e in entries {
                        let i = start + u64::from(e & INDEX);
                        if i < lo || i >= hi {
                            continue;
                        }
                        let level = if e & BIG != 0 { 2.0 } else { 1.0 };
                        let v = alpha * (level * p.scales.get((i / group) as usize));
                        let x = &mut out[(i - lo) as usize];
                        *x += if e & NEG != 0 { -v } else { v };
                    }
                }
            },
        )?;
        b += count;
    }
    Ok(())
}

/// Most Lloyd rounds of [`sparse_signs`] per group (it stops earlier when no level changes).
#[cfg(feature = "alloc")]
pub const SPARSE_FIT_ROUNDS: usize = 8;

/// The `m` largest changes of every block of [`SPARSE_BLOCK`] elements, with one scale per
/// group of `n / groups` elements and two levels (1 and 2 times the scale). Scales are f16
/// when `f16_scales` and every scale is representable as a normal f16 (or 0).
///
/// Per block the entries are the `m` largest `|fine - base|` (a tie goes to the lower index).
/// Per group, over the entries whose element lies in it: level 1 for all and the scale the mean
/// `|d|`; then Lloyd rounds (level 2 where `|d| > 1.5 * scale`, else 1; the least-squares scale
/// `sum(|d| * level) / sum(level^2)`) until no level changes, at most [`SPARSE_FIT_ROUNDS`].
/// The scale is rounded once to the stored type at the end.
///
/// # Panics
/// When `groups` is 0 or does not divide the length, or `m` is outside
/// `1..=`[`max_entries`]`(n)` (at most [`MAX_SPARSE_ENTRIES`], and no more than the last
/// block's elements).
#[cfg(feature = "alloc")]
pub fn sparse_signs(
    base: &[f32],
    fine: &[f32],
    groups: usize,
    m: usize,
    f16_scales: bool,
) -> Encoded {
    let g = group_len(base.len(), groups);
    let n = base.len();
    let most = max_entries(n as u64);
    assert!(
        (1..=most).contains(&m),
        "entries per block must be in 1..={most}"
    );
    let d: Vec<f64> = deltas(base, fine).collect();
    // The kept elements, in element order, each with its |d|, its level and its entry byte.
    let mut kept: Vec<(usize, f64)> = Vec::with_capacity(n.div_ceil(SPARSE_BLOCK) * m);
    let mut order: Vec<usize> = Vec::with_capacity(SPARSE_BLOCK);
    for start in (0..n).step_by(SPARSE_BLOCK) {
        let len = SPARSE_BLOCK.min(n - start);
        order.clear();
        order.extend(start..start + len);
        // Largest |d| first, a tie to the lower index; then the m kept in element order.
        order.sort_by(|&a, &b| d[b].abs().total_cmp(&d[a].abs()).then(a.cmp(&b)));
        order.truncate(m);
        order.sort_unstable();
        kept.extend(order.iter().map(|&i| (i, d[i].abs())));
    }
    let mut levels = vec![1u8; kept.len()];
    let mut scales = vec![0f64; groups];
    let mut at = 0;
    for (k, scale) in scales.iter_mut().enumerate() {
        let len = kept[at..].partition_point(|&(i, _)| i < (k + 1) * g);
        *scale = fit_levels(&kept[at..at + len], &mut levels[at..at + len]);
        at += len;
    }
    let entries = kept
        .iter()
        .zip(&levels)
        .map(|(&(i, _), &level)| {
            let big = if level == 2 { BIG } else { 0 };
            let neg = if d[i] < 0.0 { NEG } else { 0 };
            (i % SPARSE_BLOCK) as u8 | big | neg
        })
        .collect();
    Encoded::SparseSigns {
        scales: scales_from(scales, f16_scales),
        entries,
    }
}

/// Fits one group's scale to its kept `(element, |d|)` with levels 1 or 2 (set in `levels`):
/// returns the least-squares scale for the final levels (0 without entries).
#[cfg(feature = "alloc")]
fn fit_levels(kept: &[(usize, f64)], levels: &mut [u8]) -> f64 {
    let fit = |levels: &[u8]| {
        let (mut num, mut den) = (0f64, 0f64);
        for (&(_, a), &l) in kept.iter().zip(levels) {
            let l = f64::from(l);
            num += a * l;
            den += l * l;
        }
        if den > 0.0 {
            num / den
        } else {
            0.0
        }
    };
    levels.fill(1);
    let mut scale = fit(levels);
    for _ in 0..SPARSE_FIT_ROUNDS {
        let mut changed = false;
        for (&(_, a), l) in kept.iter().zip(levels.iter_mut()) {
            let new = if a > 1.5 * scale { 2 } else { 1 };
            changed |= new != *l;
            *l = new;
        }
        if !changed {
            break;
        }
        scale = fit(levels);
    }
    scale
}

/// Valid entries for tests: per block of an `n`-element tensor, `m` distinct indices in
/// increasing order with random level and sign bits, drawn from `next`.
#[cfg(test)]
pub(crate) fn random_entries(mut next: impl FnMut() -> u64, n: usize, m: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for start in (0..n).step_by(SPARSE_BLOCK) {
        let len = SPARSE_BLOCK.min(n - start);
        let mut idx: Vec<u8> = (0..len as u8).collect();
        for k in 0..m.min(len) {
            let j = k + (next() % (len - k) as u64) as usize;
            idx.swap(k, j);
        }
        idx.truncate(m.min(len));
        idx.sort_unstable();
        out.extend(idx.iter().map(|&i| i | (next() as u8 & (BIG | NEG))));
    }
    out
}
