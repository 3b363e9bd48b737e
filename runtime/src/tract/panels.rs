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
    /// Rows per panel (the kernel's `mr` or `nr`).
    pub(super) r: usize,
    /// Elements per panel (`k * r`, padded and aligned).
    pub(super) panel: usize,
    /// Rows of the `(mn, k)` operand.
    pub(super) mn: usize,
    /// Its columns, the reduction length.
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

    /// Writes whole rows `m0..` of a row-major `(mn, k)` weight (`rows`, `m0` a multiple of
    /// `r`) into the packed buffer, one panel at a time, in 4x4 tiles: four elements of four
    /// rows are read and written as four runs of four (row by row, every element of a wide
    /// panel would land on a cache line of its own). Measured on the field family's switch:
    /// 3.7 ms row by row, 3.6 ms with 8x8 tiles, 2.8 to 3.3 ms with 4x4 tiles, which the
    /// compiler keeps in registers. Same places as [`Panels::runs`] with [`Layout::MnK`].
    pub(super) fn write_panels(&self, m0: usize, rows: &[f32], dst: &mut [f32]) {
        const T: usize = 4;
        let (r, k) = (self.r, self.k);
        for (p, panel_rows) in rows.chunks(r * k).enumerate() {
            let base = (m0 / r + p) * self.panel;
            let out = &mut dst[base..base + k * r];
            let height = panel_rows.len() / k;
            for j0 in (0..height).step_by(T) {
                let th = T.min(height - j0);
                let src = &panel_rows[j0 * k..(j0 + th) * k];
                let mut k0 = 0;
                if th == T {
                    while k0 + T <= k {
                        let mut tile = [[0f32; T]; T];
                        for (j, line) in tile.iter_mut().enumerate() {
                            line.copy_from_slice(&src[j * k + k0..j * k + k0 + T]);
                        }
                        let runs = out[k0 * r..(k0 + T) * r].chunks_exact_mut(r);
                        for (b, run) in runs.enumerate() {
                            let col: [f32; T] = core::array::from_fn(|j| tile[j][b]);
                            run[j0..j0 + T].copy_from_slice(&col);
                        }
                        k0 += T;
                    }
                }
                for (j, row) in src.chunks_exact(k).enumerate() {
                    for (b, v) in row[k0..].iter().enumerate() {
                        out[(k0 + b) * r + j0 + j] = *v;
                    }
                }
            }
        }
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
    dst: usize,
    src: usize,
    len: usize,
    stride: usize,
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
    // Row-major weights go in whole panels (`r` rows) per chunk when a panel fits in a few
    // chunks: each panel is then written block by block in cache ([`Panels::write_panels`]),
    // where row by row every element of a wide panel would land on a line of its own.
    let block = p.r * p.k;
    let in_panels = layout == Layout::MnK && block > 0 && block <= 4 * CHUNK;
    let step = if in_panels {
        (CHUNK / block).max(1) * block
    } else {
        CHUNK
    };
    let mut buf = Vec::new();
    let mut at = 0;
    while at < n {
        let len = step.min(n - at);
        buf.resize(len, 0.0);
        fill(at, &mut buf)?;
        if in_panels {
            p.write_panels(at / p.k, &buf, dst);
        } else {
            p.runs(layout, at, len, |run| run.write(dst, &buf));
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The panel-blocked writer puts every element where tract's packing rule (the row-by-row
    /// runs, checked against tract's own packed bytes by the switching tests) puts it, and
    /// leaves the padding alone, on panels with a partial last one and `k` not a multiple of
    /// the block.
    #[test]
    fn panel_writes_land_where_the_runs_put_them() {
        for (r, mn, k, pad) in [
            (16, 40, 37, 3),
            (12, 30, 20, 2),
            (4, 8, 16, 0),
            (48, 50, 5, 1),
            (8, 3, 1, 0),
        ] {
            let p = Panels {
                r,
                panel: k * r + pad,
                mn,
                k,
            };
            let n = mn * k;
            let values: Vec<f32> = (0..n).map(|i| i as f32 + 0.5).collect();
            let len = mn.div_ceil(r) * p.panel;
            let mut by_runs = vec![-1.0f32; len];
            p.runs(Layout::MnK, 0, n, |run| run.write(&mut by_runs, &values));
            let mut by_panels = vec![-1.0f32; len];
            // In chunks of whole panels, as `scatter` gives them.
            for (c, rows) in values.chunks(2 * r * k).enumerate() {
                p.write_panels(c * 2 * r, rows, &mut by_panels);
            }
            assert_eq!(by_runs, by_panels, "r={r} mn={mn} k={k}");
            // The oracle: element (m, kk) at (m / r) * panel + kk * r + m % r.
            for m in 0..mn {
                for kk in 0..k {
                    assert_eq!(
                        by_panels[(m / r) * p.panel + kk * r + m % r],
                        values[m * k + kk]
                    );
                }
            }
        }
    }
}
