//! Intra-op parallelism: a process-wide thread count the caller sets (default: all cores).
//!
//! PLACEHOLDER API (gemm helper owns this file): `set_num_threads`, `num_threads`,
//! `parallel_for(n_tasks, |task_index| ...)` running tasks on a persistent pool.

use std::sync::atomic::{AtomicUsize, Ordering};

static NUM_THREADS: AtomicUsize = AtomicUsize::new(0);

/// Set the number of threads intra-op parallel loops use (>= 1).
pub fn set_num_threads(n: usize) {
    NUM_THREADS.store(n.max(1), Ordering::Relaxed);
}

/// The number of threads intra-op parallel loops use.
pub fn num_threads() -> usize {
    match NUM_THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    }
}

/// Run `f(i)` for every `i` in `0..n_tasks`, spread over [`num_threads`] threads; returns
/// when all are done.
pub fn parallel_for<F: Fn(usize) + Sync>(n_tasks: usize, f: F) {
    for i in 0..n_tasks {
        f(i)
    }
}
