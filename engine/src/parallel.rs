//! Intra-op parallelism: a thread count and a persistent pool that runs
//! `parallel_for(n_tasks, |task_index| ...)`.
//!
//! The thread count [`num_threads`] is, in order: the count of the innermost
//! [`with_num_threads`] scope on this thread (models and optimizers hold their own count and
//! run under it: [`crate::Vgg::set_num_threads`], [`crate::Sgd::set_num_threads`]); else the
//! process default [`set_num_threads`]; else all cores. Tasks of a parallel loop see the count
//! of the loop that runs them (and its [`crate::simd::with_f32_impl`] override and
//! [`crate::gemm::with_precision`] scope).
//!
//! Why a hand-written pool rather than `rayon`: the only pattern the engine needs is "split
//! this loop over T threads and wait", with T small (2 on the target machine). A pool built
//! on one mutex, two condvars and a few atomics does that in a few µs, never pulls in a
//! work-stealing runtime whose idle threads keep spinning, and lets us control exactly how
//! long idle workers spin (briefly, then they sleep on a condvar) — important because the
//! DDP communication thread shares the same cores.
//!
//! Rules:
//! - The calling thread always takes part in the work, so `T` threads means `T - 1` pool
//!   workers plus the caller.
//! - A `parallel_for` issued from inside a task (nested), or while another thread is
//!   already using the pool, runs inline on the calling thread: never a deadlock.
//! - A panic inside a task is caught, the loop still waits for every participant, and the
//!   panic is then re-raised on the calling thread.

use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, TryLockError};
use std::time::{Duration, Instant};

static NUM_THREADS: AtomicUsize = AtomicUsize::new(0);

/// How long an idle worker spins on the job counter before it sleeps on the condvar. Short
/// enough not to steal a core from other work for long, long enough that back-to-back
/// loops (one op after another) find the workers awake.
const WORKER_SPIN: Duration = Duration::from_micros(50);
/// How long the caller spins waiting for workers to finish before it sleeps.
const CALLER_SPIN: Duration = Duration::from_micros(200);
/// Timed waits re-check their condition at least this often (guards against any missed
/// wake-up; there should be none).
const WAIT_SLICE: Duration = Duration::from_millis(10);

/// Set the process-wide default number of threads intra-op parallel loops use (>= 1); a
/// [`with_num_threads`] scope overrides it.
pub fn set_num_threads(n: usize) {
    NUM_THREADS.store(n.max(1), Ordering::Relaxed);
}

/// The number of threads intra-op parallel loops use here (see the module docs).
pub fn num_threads() -> usize {
    match SCOPED_THREADS.with(|t| t.get()) {
        0 => default_num_threads(),
        n => n,
    }
}

/// The process default: [`set_num_threads`], else all cores.
fn default_num_threads() -> usize {
    match NUM_THREADS.load(Ordering::Relaxed) {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
        n => n,
    }
}

/// Runs `f` with [`num_threads`] = `threads` (>= 1) on this thread (and in the tasks of the
/// parallel loops it starts), restoring the previous count afterwards, also on unwind.
pub fn with_num_threads<R>(threads: usize, f: impl FnOnce() -> R) -> R {
    let _restore = ScopedThreads::set(threads.max(1));
    f()
}

/// [`with_num_threads`] if `threads` is given, else just `f()` (the surrounding count).
pub fn with_num_threads_or_default<R>(threads: Option<usize>, f: impl FnOnce() -> R) -> R {
    match threads {
        Some(t) => with_num_threads(t, f),
        None => f(),
    }
}

/// Sets this thread's scoped count; dropping restores the previous one.
struct ScopedThreads(usize);

impl ScopedThreads {
    fn set(threads: usize) -> Self {
        ScopedThreads(SCOPED_THREADS.with(|t| t.replace(threads)))
    }
}

impl Drop for ScopedThreads {
    fn drop(&mut self) {
        SCOPED_THREADS.with(|t| t.set(self.0));
    }
}

thread_local! {
    /// True on pool workers and on a caller while it runs its share of a parallel loop.
    static IN_PARALLEL: Cell<bool> = const { Cell::new(false) };
    /// The innermost [`with_num_threads`] count on this thread (0: none).
    static SCOPED_THREADS: Cell<usize> = const { Cell::new(0) };
}

/// True when called from inside a `parallel_for` task: a nested parallel loop would run
/// inline, so callers (e.g. SGEMM) can pick their single-threaded path directly.
pub fn in_parallel() -> bool {
    IN_PARALLEL.with(|p| p.get())
}

/// Run `f(i)` for every `i` in `0..n_tasks`, spread over [`num_threads`] threads; returns
/// when all are done. Tasks are handed out dynamically (one atomic increment each).
pub fn parallel_for<F: Fn(usize) + Sync>(n_tasks: usize, f: F) {
    parallel_for_threads(num_threads(), n_tasks, f)
}

/// [`parallel_for`] with an explicit thread count (the caller counts as one thread).
pub fn parallel_for_threads<F: Fn(usize) + Sync>(threads: usize, n_tasks: usize, f: F) {
    let participants = threads.min(n_tasks);
    if participants <= 1 || in_parallel() {
        run_inline(n_tasks, &f);
        return;
    }
    let pool = pool();
    // One loop at a time uses the pool; anyone else runs inline rather than queueing.
    let _submit = match pool.submit.try_lock() {
        Ok(guard) => guard,
        // A task panic re-raised by the previous loop poisons the lock; the pool itself is
        // consistent (it waited for every worker), so keep using it.
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => {
            run_inline(n_tasks, &f);
            return;
        }
    };
    let workers = pool.ensure_workers(participants - 1);
    if workers == 0 {
        run_inline(n_tasks, &f);
        return;
    }
    pool.run(threads, workers, n_tasks, &f);
}

/// Run all tasks on the calling thread, flagged as inside a parallel loop (so nested
/// loops and SGEMMs stay single-threaded, as they would on a pool worker).
fn run_inline(n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            IN_PARALLEL.with(|p| p.set(self.0));
        }
    }
    let _restore = Restore(IN_PARALLEL.with(|p| p.replace(true)));
    for i in 0..n_tasks {
        f(i)
    }
}

/// A lifetime-erased pointer to the loop body. Only dereferenced by workers that joined the
/// current job, and the submitting thread waits for all of them to leave before returning
/// (so before the closure it points to goes out of scope).
#[derive(Clone, Copy)]
struct JobPtr(*const (dyn Fn(usize) + Sync + 'static));
// SAFETY: the pointee is `Sync` (shared `&` calls from several threads are fine) and is
// kept alive by the submitting thread for as long as any worker can use the pointer.
unsafe impl Send for JobPtr {}

struct State {
    /// The job being run, `None` between jobs.
    job: Option<JobPtr>,
    /// Number of the current/last job; workers compare it with the last one they saw.
    epoch: u64,
    /// How many workers may still join the current job.
    open_slots: usize,
    /// The current job's thread count (what `num_threads` says inside its tasks).
    threads: usize,
    /// The submitter's `simd::with_f32_impl` override, applied inside the job's tasks.
    f32_impl: Option<crate::simd::F32Impl>,
    /// The submitter's `gemm::with_precision` scope, applied inside the job's tasks.
    precision: crate::gemm::Precision,
    /// Workers spawned so far.
    n_workers: usize,
}

struct Pool {
    submit: Mutex<()>,
    state: Mutex<State>,
    /// Workers sleep here waiting for a new job.
    work_cv: Condvar,
    /// The submitter sleeps here waiting for joined workers to leave.
    done_cv: Condvar,
    /// Mirror of `State::epoch` that idle workers spin on without taking the lock.
    epoch: AtomicU64,
    n_tasks: AtomicUsize,
    next_task: AtomicUsize,
    tasks_done: AtomicUsize,
    /// Workers that joined / left the current job (joined is changed under `state`).
    joined: AtomicUsize,
    left: AtomicUsize,
    panicked: AtomicBool,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| Pool {
        submit: Mutex::new(()),
        state: Mutex::new(State {
            job: None,
            epoch: 0,
            open_slots: 0,
            threads: 1,
            f32_impl: None,
            precision: crate::gemm::Precision::F32,
            n_workers: 0,
        }),
        work_cv: Condvar::new(),
        done_cv: Condvar::new(),
        epoch: AtomicU64::new(0),
        n_tasks: AtomicUsize::new(0),
        next_task: AtomicUsize::new(0),
        tasks_done: AtomicUsize::new(0),
        joined: AtomicUsize::new(0),
        left: AtomicUsize::new(0),
        panicked: AtomicBool::new(false),
    })
}

/// Lock ignoring poisoning: the pool's state stays consistent because tasks never run while
/// the lock is held.
fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Pool {
    /// Spawn workers until there are `wanted`; returns how many are available (fewer if the
    /// OS refused to spawn a thread).
    fn ensure_workers(&'static self, wanted: usize) -> usize {
        let mut st = lock(&self.state);
        while st.n_workers < wanted {
            let seen = st.epoch;
            let spawned = std::thread::Builder::new()
                .name(format!("dtrain-pool-{}", st.n_workers))
                .spawn(move || self.worker_loop(seen));
            if spawned.is_err() {
                break;
            }
            st.n_workers += 1;
        }
        st.n_workers.min(wanted)
    }

    /// Publish a job, take part in it, and wait until every joined worker has left.
    fn run(&self, threads: usize, workers: usize, n_tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        // SAFETY: only the lifetime is erased; see `JobPtr` for why no worker can use the
        // pointer after this function returns.
        let job = JobPtr(unsafe {
            std::mem::transmute::<
                *const (dyn Fn(usize) + Sync + '_),
                *const (dyn Fn(usize) + Sync + 'static),
            >(f as *const _)
        });
        {
            let mut st = lock(&self.state);
            self.n_tasks.store(n_tasks, Ordering::Relaxed);
            self.next_task.store(0, Ordering::Relaxed);
            self.tasks_done.store(0, Ordering::Relaxed);
            self.joined.store(0, Ordering::Relaxed);
            self.left.store(0, Ordering::Relaxed);
            self.panicked.store(false, Ordering::Relaxed);
            st.job = Some(job);
            st.open_slots = workers;
            st.threads = threads;
            st.f32_impl = crate::simd::f32_impl_override();
            st.precision = crate::gemm::precision();
            st.epoch += 1;
            self.epoch.store(st.epoch, Ordering::Release);
        }
        self.work_cv.notify_all();

        IN_PARALLEL.with(|p| p.set(true));
        let own_panic = {
            let _scope = ScopedThreads::set(threads);
            self.run_tasks(f)
        };
        IN_PARALLEL.with(|p| p.set(false));

        // Wait for the workers: spin briefly (tasks are usually balanced), then sleep.
        let all_left = |p: &Pool| {
            p.tasks_done.load(Ordering::Acquire) == n_tasks
                && p.left.load(Ordering::Acquire) == p.joined.load(Ordering::Acquire)
        };
        let spin_until = Instant::now() + CALLER_SPIN;
        let mut spins = 0u32;
        while !all_left(self) {
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(64) && Instant::now() > spin_until {
                break;
            }
        }
        let mut st = lock(&self.state);
        // `joined` only changes under the lock, so this check-then-close is race free.
        while !all_left(self) {
            st = self
                .done_cv
                .wait_timeout(st, WAIT_SLICE)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        st.job = None;
        st.open_slots = 0;
        drop(st);

        if let Some(payload) = own_panic {
            resume_unwind(payload);
        }
        if self.panicked.load(Ordering::Acquire) {
            panic!("a parallel_for task panicked on a pool worker");
        }
    }

    /// Claim and run tasks until none are left. A panicking task still counts as done (so
    /// nobody waits for it forever); the first panic payload is returned.
    fn run_tasks(&self, f: &(dyn Fn(usize) + Sync)) -> Option<Box<dyn std::any::Any + Send>> {
        let n = self.n_tasks.load(Ordering::Relaxed);
        let mut first_panic = None;
        loop {
            let i = self.next_task.fetch_add(1, Ordering::Relaxed);
            if i >= n {
                break;
            }
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| f(i))) {
                first_panic.get_or_insert(payload);
            }
            self.tasks_done.fetch_add(1, Ordering::Release);
        }
        first_panic
    }

    fn worker_loop(&self, mut seen: u64) {
        IN_PARALLEL.with(|p| p.set(true));
        loop {
            // Spin a little on the epoch before taking the lock and sleeping.
            let spin_until = Instant::now() + WORKER_SPIN;
            let mut spins = 0u32;
            while self.epoch.load(Ordering::Acquire) == seen {
                std::hint::spin_loop();
                spins += 1;
                if spins.is_multiple_of(64) && Instant::now() > spin_until {
                    break;
                }
            }
            let (job, threads, f32_impl, precision) = {
                let mut st = lock(&self.state);
                loop {
                    if st.epoch != seen {
                        seen = st.epoch;
                        if let (Some(job), true) = (st.job, st.open_slots > 0) {
                            st.open_slots -= 1;
                            self.joined.fetch_add(1, Ordering::AcqRel);
                            break (job, st.threads, st.f32_impl, st.precision);
                        }
                    }
                    // Idle workers sleep indefinitely by design (nothing to wait *for*);
                    // the timed slice only re-checks the epoch.
                    st = self
                        .work_cv
                        .wait_timeout(st, WAIT_SLICE * 10)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            // SAFETY: we joined the job under the lock while it was published; the
            // submitter keeps the closure alive until we bump `left` below.
            let f = unsafe { &*job.0 };
            SCOPED_THREADS.with(|t| t.set(threads));
            crate::simd::set_f32_impl_override(f32_impl);
            crate::gemm::set_precision_scope(precision);
            if self.run_tasks(f).is_some() {
                self.panicked.store(true, Ordering::Release);
            }
            crate::gemm::set_precision_scope(crate::gemm::Precision::F32);
            crate::simd::set_f32_impl_override(None);
            SCOPED_THREADS.with(|t| t.set(0));
            // Take the lock so the submitter cannot miss the notification between its
            // check and its wait.
            let st = lock(&self.state);
            self.left.fetch_add(1, Ordering::AcqRel);
            drop(st);
            self.done_cv.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn scoped_thread_count_applies_to_the_scope_and_its_tasks_and_is_restored() {
        let outer = num_threads();
        let seen = Mutex::new(Vec::new());
        with_num_threads(2, || {
            assert_eq!(num_threads(), 2);
            parallel_for(8, |_| seen.lock().unwrap().push(num_threads()));
            with_num_threads(1, || assert_eq!(num_threads(), 1));
            assert_eq!(num_threads(), 2);
        });
        assert_eq!(num_threads(), outer);
        assert_eq!(*seen.lock().unwrap(), vec![2; 8]);
        // Restored on unwind too.
        let r = std::panic::catch_unwind(|| with_num_threads(3, || panic!("boom")));
        assert!(r.is_err());
        assert_eq!(num_threads(), outer);
    }
}
