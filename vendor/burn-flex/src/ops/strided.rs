//! Element-wise loops over strided and broadcast layouts, one innermost row at a time
//! (opsa patch; see `OPSA-PATCHES.md`).
//!
//! burn-flex 0.21.0 walks any layout it has no special case for with `StridedIter`: an index
//! computation per element and a scalar loop. In a transformer's training step that is the
//! attention mask broadcast over the heads (`[b, heads, t·L] + [b, 1, t·L]`), the backward of
//! multiplies whose operand was broadcast, and the copy of every `[b, t, heads, d]` view made
//! contiguous after `swap_dims`. Their innermost dimension is almost always contiguous (or a
//! broadcast scalar), so this module drops size-1 dimensions, merges dimensions that are
//! contiguous in every operand, and runs the innermost dimension as a plain slice loop (which
//! LLVM vectorises) with the outer offsets computed once per row. Rows are split over rayon's
//! pool like `par.rs` does. Each element is computed by the same `op` on the same inputs, so
//! results are bit-identical to the `StridedIter` loops they replace. Tested from opsa's
//! integration tests (`tests/integration/parity.rs`, against plain loops over the logical indices): this crate's own tests
//! need `realfft`, which the vendored copy leaves out.

use alloc::vec::Vec;
use core::mem::MaybeUninit;

use crate::layout::Layout;

/// Largest rank handled here (burn's tensors stay far below it).
const MAX_RANK: usize = 8;

/// A shape walked by `N` operands with their own strides: size-1 dimensions dropped, adjacent
/// dimensions merged where every operand is contiguous across them (the multi-operand form of
/// `tensor.rs`'s `collapse_for_copy`). The last of the `rank` dimensions is the row; the ones
/// before it are walked once per row.
struct Walk<const N: usize> {
    rank: usize,
    shape: [usize; MAX_RANK],
    strides: [[isize; MAX_RANK]; N],
    offsets: [isize; N],
}

impl<const N: usize> Walk<N> {
    /// `None` for a rank above [`MAX_RANK`] (the caller keeps its own loop).
    fn new(shape: &[usize], layouts: [&Layout; N]) -> Option<Self> {
        if shape.len() > MAX_RANK {
            return None;
        }
        let mut w = Walk { rank: 0, shape: [0; MAX_RANK], strides: [[0; MAX_RANK]; N], offsets: [0; N] };
        for (i, l) in layouts.iter().enumerate() {
            debug_assert_eq!(l.shape().num_dims(), shape.len());
            w.offsets[i] = l.start_offset() as isize;
        }
        for (d, &size) in shape.iter().enumerate() {
            if size == 1 {
                continue;
            }
            let merge = w.rank > 0
                && (0..N).all(|i| {
                    let st = layouts[i].strides()[d];
                    (size as isize).checked_mul(st).is_some_and(|run| w.strides[i][w.rank - 1] == run)
                });
            if merge {
                w.shape[w.rank - 1] *= size;
                for i in 0..N {
                    w.strides[i][w.rank - 1] = layouts[i].strides()[d];
                }
            } else {
                w.shape[w.rank] = size;
                for i in 0..N {
                    w.strides[i][w.rank] = layouts[i].strides()[d];
                }
                w.rank += 1;
            }
        }
        if w.rank == 0 {
            // A single element: one row of one.
            w.rank = 1;
            w.shape[0] = 1;
        }
        Some(w)
    }

    fn row_len(&self) -> usize {
        self.shape[self.rank - 1]
    }

    fn row_stride(&self, i: usize) -> isize {
        self.strides[i][self.rank - 1]
    }

    /// Each operand's offset of the first element of row `r` (rows in row-major order).
    #[inline]
    fn row_offsets(&self, mut r: usize) -> [isize; N] {
        let mut off = self.offsets;
        for d in (0..self.rank - 1).rev() {
            let (q, i) = (r / self.shape[d], r % self.shape[d]);
            for (k, o) in off.iter_mut().enumerate() {
                *o += i as isize * self.strides[k][d];
            }
            r = q;
        }
        off
    }
}

/// Run `row(first_row, dst_rows)` over `dst` cut into whole rows of `row_len`, split over
/// rayon's pool from `par::PAR_MIN` elements.
fn for_rows<R: Send>(dst: &mut [MaybeUninit<R>], row_len: usize, row: impl Fn(usize, &mut [MaybeUninit<R>]) + Sync + Send) {
    #[cfg(feature = "rayon")]
    if dst.len() >= super::par::PAR_MIN {
        use rayon::prelude::*;
        let rows_per_task = (super::par::PAR_CHUNK / row_len).max(1);
        dst.par_chunks_mut(rows_per_task * row_len).enumerate().for_each(|(t, d)| row(t * rows_per_task, d));
        return;
    }
    row(0, dst)
}

/// A vector of `n` elements, every one written by `fill` (given the uninitialised slots).
fn filled<R>(n: usize, fill: impl FnOnce(&mut [MaybeUninit<R>])) -> Vec<R> {
    let mut out: Vec<R> = Vec::with_capacity(n);
    fill(&mut out.spare_capacity_mut()[..n]);
    // SAFETY: `fill` wrote all `n` slots (every caller writes each row of the walk exactly once,
    // and the rows tile `0..n`).
    unsafe { out.set_len(n) };
    out
}

/// `op(lhs[i], rhs[j])` for every element of `shape`, in row-major order, with `lhs` and `rhs`
/// read through their layouts (same shape; broadcast dimensions have stride 0). `None` for a
/// rank this module does not handle.
pub(crate) fn binary<E, R, Op>(shape: &[usize], lhs: &[E], l: &Layout, rhs: &[E], r: &Layout, op: Op) -> Option<Vec<R>>
where
    E: Copy + Sync,
    R: Send,
    Op: Fn(E, E) -> R + Sync + Send,
{
    let w = Walk::<2>::new(shape, [l, r])?;
    let n: usize = shape.iter().product();
    if n == 0 {
        return Some(Vec::new());
    }
    let len = w.row_len();
    let (ls, rs) = (w.row_stride(0), w.row_stride(1));
    Some(filled(n, |dst| {
        for_rows(dst, len, |first, rows| {
            for (k, d) in rows.chunks_mut(len).enumerate() {
                let [lo, ro] = w.row_offsets(first + k);
                let (lo, ro) = (lo as usize, ro as usize);
                match (ls, rs) {
                    (1, 1) => {
                        for ((d, &a), &b) in d.iter_mut().zip(&lhs[lo..lo + len]).zip(&rhs[ro..ro + len]) {
                            d.write(op(a, b));
                        }
                    }
                    (1, 0) => {
                        let b = rhs[ro];
                        for (d, &a) in d.iter_mut().zip(&lhs[lo..lo + len]) {
                            d.write(op(a, b));
                        }
                    }
                    (0, 1) => {
                        let a = lhs[lo];
                        for (d, &b) in d.iter_mut().zip(&rhs[ro..ro + len]) {
                            d.write(op(a, b));
                        }
                    }
                    _ => {
                        for (j, d) in d.iter_mut().enumerate() {
                            let a = lhs[(lo as isize + j as isize * ls) as usize];
                            let b = rhs[(ro as isize + j as isize * rs) as usize];
                            d.write(op(a, b));
                        }
                    }
                }
            }
        })
    }))
}

/// `op(src[i])` for every element of `layout`'s shape, in row-major order. `None` for a rank
/// this module does not handle.
pub(crate) fn unary<E, R, Op>(src: &[E], layout: &Layout, op: Op) -> Option<Vec<R>>
where
    E: Copy + Sync,
    R: Send,
    Op: Fn(E) -> R + Sync + Send,
{
    let shape = layout.shape();
    let w = Walk::<1>::new(shape, [layout])?;
    let n: usize = shape.iter().product();
    if n == 0 {
        return Some(Vec::new());
    }
    let len = w.row_len();
    let s = w.row_stride(0);
    Some(filled(n, |dst| {
        for_rows(dst, len, |first, rows| {
            for (k, d) in rows.chunks_mut(len).enumerate() {
                let [o] = w.row_offsets(first + k);
                if s == 1 {
                    let o = o as usize;
                    for (d, &a) in d.iter_mut().zip(&src[o..o + len]) {
                        d.write(op(a));
                    }
                } else {
                    for (j, d) in d.iter_mut().enumerate() {
                        d.write(op(src[(o + j as isize * s) as usize]));
                    }
                }
            }
        })
    }))
}
