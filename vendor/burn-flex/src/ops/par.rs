//! Element-wise loops split over rayon's pool (opsa patch; see `OPSA-PATCHES.md`).
//!
//! burn-flex 0.21.0 runs every unary, binary and scalar element-wise op on the calling thread.
//! In a training step on a 2-core CPU that left the second core idle for more than half of
//! the wall time (the divergence's `exp` over `[chunk, vocab]`, the autodiff backward's
//! multiplies and adds). These helpers split a contiguous loop into chunks handed to rayon
//! above [`PAR_MIN`] elements and run it inline below. Every element is computed by the same
//! scalar or SIMD code as before, so results are bit-identical to the serial loop.

use alloc::vec::Vec;

/// Fewest elements for which a loop is split: below it rayon's wake-up (a few µs) costs more
/// than a second core saves on a memory-bound add. Lower than flex's own
/// `ops::PARALLEL_THRESHOLD` (256K, for per-row loops such as softmax) on purpose: an
/// element-wise chunk is the whole task, with nothing per row to amortise. 64K is what the
/// benchmarks in docs/benchmarks.md ran with; 256K was not measured against it.
pub(crate) const PAR_MIN: usize = 1 << 16;

/// Elements per rayon task.
pub(crate) const PAR_CHUNK: usize = 1 << 14;

/// `f(chunk)` over consecutive chunks of `dst`.
#[inline]
pub(crate) fn chunks_mut<E: Send>(dst: &mut [E], f: impl Fn(&mut [E]) + Sync + Send) {
    #[cfg(feature = "rayon")]
    if dst.len() >= PAR_MIN {
        use rayon::prelude::*;
        dst.par_chunks_mut(PAR_CHUNK).for_each(f);
        return;
    }
    f(dst)
}

/// `f(dst_chunk, src_chunk)` over consecutive aligned chunks of `dst` and `src` (same length).
#[inline]
pub(crate) fn zip_chunks_mut<E: Send, R: Sync>(dst: &mut [E], src: &[R], f: impl Fn(&mut [E], &[R]) + Sync + Send) {
    debug_assert_eq!(dst.len(), src.len());
    #[cfg(feature = "rayon")]
    if dst.len() >= PAR_MIN {
        use rayon::prelude::*;
        dst.par_chunks_mut(PAR_CHUNK).zip(src.par_chunks(PAR_CHUNK)).for_each(|(d, s)| f(d, s));
        return;
    }
    f(dst, src)
}

/// `src.map(f)` collected in order.
#[inline]
pub(crate) fn map<E: Copy + Sync, R: Send>(src: &[E], f: impl Fn(E) -> R + Sync + Send) -> Vec<R> {
    #[cfg(feature = "rayon")]
    if src.len() >= PAR_MIN {
        use rayon::prelude::*;
        return src.par_iter().with_min_len(PAR_CHUNK).map(|&x| f(x)).collect();
    }
    src.iter().map(|&x| f(x)).collect()
}

/// `a.zip(b).map(f)` collected in order (`a` and `b` of the same length).
#[inline]
pub(crate) fn zip_map<E: Copy + Sync, R: Send>(a: &[E], b: &[E], f: impl Fn(E, E) -> R + Sync + Send) -> Vec<R> {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(feature = "rayon")]
    if a.len() >= PAR_MIN {
        use rayon::prelude::*;
        return a.par_iter().zip(b.par_iter()).with_min_len(PAR_CHUNK).map(|(&x, &y)| f(x, y)).collect();
    }
    a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()
}
