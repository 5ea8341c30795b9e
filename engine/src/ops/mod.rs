//! Ops as plain forward/backward function pairs over flat NCHW buffers (llm.c style).
//!
//! Conventions shared by every op:
//! - Buffers are contiguous row-major: activations `[N, C, H, W]`, conv weights
//!   `[C_out, C_in, KH, KW]`, linear weights `[out, in]` (PyTorch layouts).
//! - Forward and backward functions *overwrite* their outputs (the tape sums fan-out).
//! - Generic over [`crate::Float`]: f32 is the fast path, f64 the gradient-checked path.
//! - Buffer lengths are checked with `assert!` (a mismatch is a programming error in the
//!   caller, never user data); so is a conv geometry whose kernel does not fit the padded
//!   input and a cross-entropy label `>= classes`.
//! - Parallelism: the thread count of [`crate::parallel`]. Work is split so that every output
//!   element is computed by one task in a fixed order: results are bit-identical from run to
//!   run for a given thread count (and, apart from SGEMM's blocking, for any thread count).
//! - Scratch: conv keeps a column buffer per calling thread, bounded independently of the
//!   batch size (at most 16 MB + the GEMM output of one chunk in f32); free it with
//!   [`conv2d_release_scratch`].

pub mod batchnorm;
pub mod bn_relu;
pub mod bn_relu_pool;
pub mod conv;
mod elementwise;
pub mod linear;
pub mod loss;
pub mod pool;
pub mod relu;

pub use batchnorm::*;
pub use bn_relu::*;
pub use bn_relu_pool::*;
pub use conv::*;
pub use linear::*;
pub use loss::*;
pub use pool::*;
pub use relu::*;

pub(crate) use elementwise::add_assign;

use crate::parallel::{num_threads, parallel_for};

/// A raw pointer that tasks of one `parallel_for` may share (see [`par_chunks_mut`]; conv's
/// col2im also uses it for per-task disjoint blocks of its scratch).
pub(crate) struct SharedMutPtr<T>(pub(crate) *mut T);
// SAFETY: users only hand each task a range disjoint from every other task's, of a slice that
// stays exclusively borrowed during the parallel loop; `T: Send` makes handing those ranges
// to other threads sound.
unsafe impl<T: Send> Sync for SharedMutPtr<T> {}
impl<T> SharedMutPtr<T> {
    // A method (not field access) so closures capture the whole `Sync` wrapper.
    pub(crate) fn get(&self) -> *mut T {
        self.0
    }
}

/// Split `data` into consecutive chunks of `chunk_len` elements (the last may be shorter) and
/// run `f(chunk_index, chunk)` for each, in parallel. Every element is written by exactly one
/// task, so the result never depends on scheduling.
pub(crate) fn par_chunks_mut<T: Send, F: Fn(usize, &mut [T]) + Sync>(
    data: &mut [T],
    chunk_len: usize,
    f: F,
) {
    let len = data.len();
    if len == 0 {
        return;
    }
    let chunk_len = chunk_len.max(1);
    let n_chunks = len.div_ceil(chunk_len);
    if n_chunks == 1 || num_threads() == 1 {
        for (i, chunk) in data.chunks_mut(chunk_len).enumerate() {
            f(i, chunk);
        }
        return;
    }
    let base = SharedMutPtr(data.as_mut_ptr());
    parallel_for(n_chunks, |i| {
        let start = i * chunk_len;
        let end = (start + chunk_len).min(len);
        // SAFETY: `[start, end)` lies inside `data` and is disjoint from every other task's
        // range; `data` stays exclusively borrowed until `parallel_for` returns.
        let chunk = unsafe { std::slice::from_raw_parts_mut(base.get().add(start), end - start) };
        f(i, chunk);
    });
}

/// [`par_chunks_mut`] over two slices of the same length split at the same places:
/// `f(chunk_index, a_chunk, b_chunk)`.
pub(crate) fn par_chunks_mut2<A: Send, B: Send, F: Fn(usize, &mut [A], &mut [B]) + Sync>(
    a: &mut [A],
    b: &mut [B],
    chunk_len: usize,
    f: F,
) {
    assert_eq!(a.len(), b.len(), "par_chunks_mut2: lengths differ");
    let chunk_len = chunk_len.max(1);
    let b_base = SharedMutPtr(b.as_mut_ptr());
    par_chunks_mut(a, chunk_len, |i, a_chunk| {
        // SAFETY: `b`'s chunk `i` mirrors `a`'s (same length, same split): inside `b` and
        // disjoint from every other task's; `b` stays exclusively borrowed until
        // `par_chunks_mut` returns.
        let b_chunk = unsafe {
            std::slice::from_raw_parts_mut(b_base.get().add(i * chunk_len), a_chunk.len())
        };
        f(i, a_chunk, b_chunk)
    });
}

/// How many consecutive units of `unit_len` elements one parallel task should take: enough
/// tasks for load balance (~4 per thread), but at least `min_elems` elements per task so
/// small tensors do not pay scheduling overhead.
pub(crate) fn units_per_task(n_units: usize, unit_len: usize, min_elems: usize) -> usize {
    let by_balance = n_units.div_ceil(4 * num_threads()).max(1);
    let by_size = min_elems.div_ceil(unit_len.max(1)).max(1);
    by_balance.max(by_size).min(n_units.max(1))
}
