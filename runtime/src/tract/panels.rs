//! tract's f32 panel layout: where each element of a weight sits in a packed matmul operand,
//! and the writers that put a weight there chunk by chunk.
//!
//! tract packs an `(mn, k)` operand in panels of `r` rows: element `(m, k)` at
//! `(m / r) * panel + k * r + m % r`, `panel` being `k * r` padded and aligned. A weight reads as
//! that matrix in one of the [`Layout`]s.
//!
//! May depend on: `std`, tract-linalg's packing types, and [`super::rebuild::CHUNK`].

use std::sync::Arc;
use std::vec::Vec;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::format_err;
use tract_onnx::tract_core::tract_linalg::mmm::{EagerPackedInput, MMMInputValue};
use tract_onnx::tract_core::tract_linalg::pack::PackedFormat;

use super::rebuild::CHUNK;

/// How a weight's elements read as the packed matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Row-major `(mn, k)`: a conv kernel `(O, I*H*W)`, a Gemm weight with `transB`.
    MnK,
    /// Row-major `(k, mn)`: a MatMul weight.
    KMn,
    /// `(mn, k)` with `k` read as `(k / groups, groups)` and stored as `(groups, k / groups)`:
    /// a convolution after a channel shuffle (ShuffleNet), which tract folds into the kernel.
    MnKShuffled { groups: usize },
}

/// The channel-shuffle group counts tried for [`Layout::MnKShuffled`] (ShuffleNet v2 uses 2,
/// v1 3, 4 or 8).
const SHUFFLE_GROUPS: [usize; 4] = [2, 3, 4, 8];

/// Every layout a packed place is compared against, in order.
pub(super) fn packed_layouts() -> impl Iterator<Item = Layout> {
    [Layout::MnK, Layout::KMn]
        .into_iter()
        .chain(SHUFFLE_GROUPS.map(|groups| Layout::MnKShuffled { groups }))
}

/// tract's f32 panel layout of one packed operand.
#[derive(Clone, Copy, Debug)]
pub(super) struct Panels {
    pub(super) r: usize,
    /// Elements per panel (`k * r`, padded and aligned).
    pub(super) panel: usize,
    pub(super) mn: usize,
    pub(super) k: usize,
}

impl Panels {
    pub(super) fn of(v: &dyn MMMInputValue) -> Option<(Panels, PackedFormat)> {
        let e = v.downcast_ref::<EagerPackedInput>()?;
        let f = e.fact.format.downcast_ref::<PackedFormat>()?;
        let (mn, k) = (e.mn, e.fact.k);
        let p = Panels {
            r: f.r,
            panel: f.single_panel_len(k),
            mn,
            k,
        };
        (f.dt == f32::datum_type()
            && f.r > 0
            && p.panel >= k * f.r
            && e.packed.len() == f.len(k, mn) * 4)
            .then(|| (p, f.clone()))
    }

    /// Calls `f(run)` for each run of the weight's elements `first..first + n` (read as
    /// `layout`) that sits at one stride in the packed buffer.
    pub(super) fn runs(&self, layout: Layout, first: usize, n: usize, mut f: impl FnMut(Run)) {
        let (r, panel) = (self.r, self.panel);
        let mut i = 0;
        match layout {
            Layout::MnK => {
                // A row's elements sit `r` apart in its panel.
                let (mut m, mut kk) = (first / self.k, first % self.k);
                while i < n {
                    let at = (m / r) * panel + m % r;
                    let take = (self.k - kk).min(n - i);
                    f(Run {
                        dst: at + kk * r,
                        src: i,
                        len: take,
                        stride: r,
                    });
                    i += take;
                    kk = 0;
                    m += 1;
                }
            }
            Layout::MnKShuffled { groups } => {
                let per = self.k / groups;
                for j in 0..n {
                    let (m, kk) = ((first + j) / self.k, (first + j) % self.k);
                    let kk = (kk % groups) * per + kk / groups;
                    f(Run {
                        dst: (m / r) * panel + kk * r + m % r,
                        src: j,
                        len: 1,
                        stride: 1,
                    });
                }
            }
            Layout::KMn => {
                let (mut kk, mut m) = (first / self.mn, first % self.mn);
                while i < n {
                    let take = (r - m % r).min(self.mn - m).min(n - i);
                    f(Run {
                        dst: (m / r) * panel + kk * r + m % r,
                        src: i,
                        len: take,
                        stride: 1,
                    });
                    i += take;
                    m += take;
                    if m == self.mn {
                        m = 0;
                        kk += 1;
                    }
                }
            }
        }
    }
}

/// `len` elements of a weight, from its element `src` (relative to a chunk), at `dst`,
/// `dst + stride`, ... in a packed buffer.
#[derive(Clone, Copy, Debug)]
pub(super) struct Run {
    pub(super) dst: usize,
    pub(super) src: usize,
    pub(super) len: usize,
    pub(super) stride: usize,
}

impl Run {
    /// The run's places in `held`: `None` when it runs past the end.
    pub(super) fn places<'a>(&self, held: &'a [f32]) -> Option<impl Iterator<Item = &'a f32> + 'a> {
        let end = self.dst + (self.len.max(1) - 1) * self.stride;
        (end < held.len()).then(|| held[self.dst..=end].iter().step_by(self.stride))
    }

    /// Whether `held` holds `values[src..src + len]` at the run's places.
    pub(super) fn holds(&self, held: &[f32], values: &[f32]) -> bool {
        let want = &values[self.src..self.src + self.len];
        self.places(held).is_some_and(|got| {
            got.map(|v| v.to_bits())
                .eq(want.iter().map(|v| v.to_bits()))
        })
    }

    /// Writes `values[src..src + len]` at the run's places in `dst`.
    pub(super) fn write(&self, dst: &mut [f32], values: &[f32]) {
        let want = &values[self.src..self.src + self.len];
        if self.stride == 1 {
            dst[self.dst..self.dst + self.len].copy_from_slice(want);
        } else {
            let end = self.dst + (self.len.max(1) - 1) * self.stride;
            for (d, v) in dst[self.dst..=end]
                .iter_mut()
                .step_by(self.stride)
                .zip(want)
            {
                *d = *v;
            }
        }
    }
}

/// Writes a weight of `n` elements (`fill(first, out)` gives its elements `first..`) into a
/// packed f32 buffer, chunk by chunk.
pub(super) fn scatter(
    p: &Panels,
    layout: Layout,
    n: usize,
    dst: &mut [f32],
    fill: &mut impl FnMut(usize, &mut [f32]) -> TractResult<()>,
) -> TractResult<()> {
    let mut buf = Vec::new();
    let mut at = 0;
    while at < n {
        let len = CHUNK.min(n - at);
        buf.resize(len, 0.0);
        fill(at, &mut buf)?;
        p.runs(layout, at, len, |run| run.write(dst, &buf));
        at += len;
    }
    Ok(())
}

/// A new packed operand like `like` (same format and size) holding the weight.
pub(super) fn repacked(
    like: &dyn MMMInputValue,
    layout: Layout,
    fill: &mut impl FnMut(usize, &mut [f32]) -> TractResult<()>,
) -> TractResult<EagerPackedInput> {
    let (p, format) = Panels::of(like).ok_or_else(|| format_err!("not an f32 panel operand"))?;
    let mut e = format.new_packed_buffer(p.k, p.mn)?;
    let blob = Arc::get_mut(&mut e.packed).ok_or_else(|| format_err!("new buffer is shared"))?;
    let dst = bytemuck::try_cast_slice_mut(blob.as_bytes_mut())
        .map_err(|e| format_err!("packed buffer: {e}"))?;
    scatter(&p, layout, p.mn * p.k, dst, fill)?;
    Ok(e)
}
