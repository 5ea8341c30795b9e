//! SGEMM throughput: our packed kernel vs. the pure-Rust `gemm` crate, same run, same data.
//!
//! `CARGO_TARGET_DIR=/work/target-gemm cargo bench -p engine --bench sgemm`
//! Optional filter: `... --bench sgemm -- conv4` runs only cases whose name contains it.
//! `BENCH_BF16=1`: compare our f32 SGEMM with our mixed-precision `gemm_bf16` (bf16
//! operands, f32 accumulation; `--precision bf16`) instead of with the `gemm` crate.
//!
//! Each (case, threads) cell alternates our call and the `gemm` crate's call, takes the
//! median over the repetitions, and reports GFLOP/s (2·m·n·k / time) and the ratio.

use engine::gemm::{gemm_bf16_with, sgemm_with, Bf16Kernel, Kernel, MatRef};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::{Duration, Instant};

/// Operand layout: plain row-major, or a transposed view of a row-major buffer.
#[derive(Clone, Copy, PartialEq)]
enum Layout {
    N,
    T,
}

struct Case {
    name: &'static str,
    m: usize,
    n: usize,
    k: usize,
    a: Layout,
    b: Layout,
}

const fn case(name: &'static str, m: usize, n: usize, k: usize, a: Layout, b: Layout) -> Case {
    Case {
        name,
        m,
        n,
        k,
        a,
        b,
    }
}

use Layout::{N, T};

/// VGG11 on 32×32 inputs via im2col. The conv ops batch images into one GEMM of about
/// 2048 columns (capped so the im2col scratch stays <= 4M floats; batch 64 per rank), so
/// the "b" shapes are what training runs: forward M=C_out, N=images·H·W, K=C_in·9;
/// backward-data (Wᵀ) M=C_in·9, K=C_out; backward-weight (colsᵀ) M=C_out, N=C_in·9,
/// K=images·H·W. The "1img" shapes are single-image GEMMs (N = H·W down to 4), plus the
/// classifier.
const CASES: &[Case] = &[
    case("square 256", 256, 256, 256, N, N),
    case("square 512", 512, 512, 512, N, N),
    case("square 1024", 1024, 1024, 1024, N, N),
    case("square 2048", 2048, 2048, 2048, N, N),
    case("conv1 fwd b", 64, 2048, 27, N, N),
    case("conv2 fwd b", 128, 2048, 576, N, N),
    case("conv3 fwd b", 256, 2048, 1152, N, N),
    case("conv4 fwd b", 256, 1792, 2304, N, N),
    case("conv5 fwd b", 512, 1024, 2304, N, N),
    case("conv6 fwd b", 512, 896, 4608, N, N),
    case("conv8 fwd b", 512, 256, 4608, N, N),
    case("conv2 bwd-data b", 576, 2048, 128, T, N),
    case("conv4 bwd-data b", 2304, 1792, 256, T, N),
    case("conv6 bwd-data b", 4608, 896, 512, T, N),
    case("conv8 bwd-data b", 4608, 256, 512, T, N),
    case("conv1 bwd-wgt b", 64, 27, 2048, N, T),
    case("conv2 bwd-wgt b", 128, 576, 2048, N, T),
    case("conv4 bwd-wgt b", 256, 2304, 1792, N, T),
    case("conv6 bwd-wgt b", 512, 4608, 896, N, T),
    case("conv8 bwd-wgt b", 512, 4608, 256, N, T),
    case("conv2 fwd 1img", 128, 256, 576, N, N),
    case("conv4 fwd 1img", 256, 64, 2304, N, N),
    case("conv6 fwd 1img", 512, 16, 4608, N, N),
    case("conv8 fwd 1img", 512, 4, 4608, N, N),
    case("linear fwd", 128, 10, 512, N, T),
    case("linear bwd-data", 128, 512, 10, N, N),
    case("linear bwd-wgt", 10, 512, 128, T, N),
];

/// Wall-clock budget per (case, threads) cell, split between the two libraries.
const BUDGET: Duration = Duration::from_millis(250);
const MIN_REPS: usize = 3;
const MAX_REPS: usize = 41;

struct Operands {
    a: Vec<f32>,
    b: Vec<f32>,
    c: Vec<f32>,
    /// (rs, cs) of the A and B views.
    a_strides: (usize, usize),
    b_strides: (usize, usize),
}

fn operands(c: &Case, rng: &mut ChaCha8Rng) -> Operands {
    let mut rand_vec =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    let strides = |layout: Layout, cols: usize, rows: usize| match layout {
        N => (cols, 1),
        T => (1, rows),
    };
    Operands {
        a: rand_vec(c.m * c.k),
        b: rand_vec(c.k * c.n),
        c: vec![0.0; c.m * c.n],
        a_strides: strides(c.a, c.k, c.m),
        b_strides: strides(c.b, c.n, c.k),
    }
}

fn run_ours(c: &Case, ops: &mut Operands, threads: usize) {
    let a = MatRef {
        data: &ops.a,
        rs: ops.a_strides.0,
        cs: ops.a_strides.1,
    };
    let b = MatRef {
        data: &ops.b,
        rs: ops.b_strides.0,
        cs: ops.b_strides.1,
    };
    sgemm_with(
        Kernel::detect(),
        threads,
        c.m,
        c.n,
        c.k,
        1.0,
        a,
        b,
        0.0,
        &mut ops.c,
        c.n,
    );
}

/// `BENCH_BF16=1`: the other side is our bf16 GEMM.
fn versus_bf16() -> bool {
    std::env::var("BENCH_BF16").is_ok_and(|v| v == "1")
}

fn run_bf16(c: &Case, ops: &mut Operands, threads: usize) {
    let a = MatRef {
        data: &ops.a,
        rs: ops.a_strides.0,
        cs: ops.a_strides.1,
    };
    let b = MatRef {
        data: &ops.b,
        rs: ops.b_strides.0,
        cs: ops.b_strides.1,
    };
    let kernel = Bf16Kernel::detect();
    gemm_bf16_with(
        kernel, threads, c.m, c.n, c.k, 1.0, a, b, 0.0, &mut ops.c, c.n,
    );
}

fn run_gemm_crate(c: &Case, ops: &mut Operands, threads: usize) {
    if versus_bf16() {
        return run_bf16(c, ops, threads);
    }
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the pointers cover m×k, k×n and m×n matrices with the given strides
    // (the same views `run_ours` bounds-checks); dst := 0·dst + 1·A·B.
    unsafe {
        gemm::gemm(
            c.m,
            c.n,
            c.k,
            ops.c.as_mut_ptr(),
            1,
            c.n as isize,
            false,
            ops.a.as_ptr(),
            ops.a_strides.1 as isize,
            ops.a_strides.0 as isize,
            ops.b.as_ptr(),
            ops.b_strides.1 as isize,
            ops.b_strides.0 as isize,
            0.0f32,
            1.0f32,
            false,
            false,
            false,
            parallelism,
        )
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|x, y| x.total_cmp(y));
    v[v.len() / 2]
}

/// CPU time consumed by the calling thread: unlike wall time it does not count the time
/// other processes on this shared 2-core machine hold the core, which is most of the noise
/// in single-threaded measurements.
fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// Seconds one call takes: thread CPU time for 1 thread, wall time for more (the work is
/// then spread over threads, so only wall time means anything).
fn time_call(threads: usize, f: impl FnOnce()) -> f64 {
    if threads == 1 {
        let t = thread_cpu_seconds();
        f();
        thread_cpu_seconds() - t
    } else {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    }
}

/// Median seconds per call of ours and of the `gemm` crate, measured alternately.
fn measure(c: &Case, ops: &mut Operands, threads: usize) -> (f64, f64) {
    run_ours(c, ops, threads);
    run_gemm_crate(c, ops, threads);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    let start = Instant::now();
    while ours.len() < MAX_REPS && (ours.len() < MIN_REPS || start.elapsed() < BUDGET) {
        ours.push(time_call(threads, || run_ours(c, ops, threads)));
        theirs.push(time_call(threads, || run_gemm_crate(c, ops, threads)));
    }
    (median(&mut ours), median(&mut theirs))
}

/// Relative Frobenius difference between our result and the `gemm` crate's (a sanity
/// check that both benchmarked calls compute the same product).
fn cross_check(c: &Case, ops: &mut Operands) -> f64 {
    run_ours(c, ops, 1);
    let ours = ops.c.clone();
    run_gemm_crate(c, ops, 1);
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (&x, &y) in ours.iter().zip(&ops.c) {
        diff += ((x - y) as f64).powi(2);
        norm += (y as f64).powi(2);
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

/// Median wall time of an (almost) empty `parallel_for` over 2 threads, back to back (the
/// workers are awake, as between consecutive ops in training) and after a pause long
/// enough for them to go to sleep (a condvar wake-up).
fn parallel_for_overhead() -> (f64, f64) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let sink = AtomicUsize::new(0);
    let call = || {
        let t = Instant::now();
        engine::parallel::parallel_for_threads(2, 2, |i| {
            sink.fetch_add(i, Ordering::Relaxed);
        });
        t.elapsed().as_secs_f64()
    };
    let mut hot: Vec<f64> = (0..2000).map(|_| call()).collect();
    let mut cold: Vec<f64> = (0..20)
        .map(|_| {
            std::thread::sleep(Duration::from_millis(2));
            call()
        })
        .collect();
    (median(&mut hot), median(&mut cold))
}

fn main() {
    let filter: Option<String> = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let kernel = Kernel::detect();
    let other = if versus_bf16() {
        format!("engine::gemm::gemm_bf16_with({:?})", Bf16Kernel::detect())
    } else {
        "crates.io gemm 0.19".to_string()
    };
    println!("SGEMM benchmark: ours = engine::gemm::sgemm_with({kernel:?}), gemm = {other}");
    println!("GFLOP/s = 2·m·n·k / median time (1T: thread CPU time, 2T: wall time)");
    println!("ratio = ours / gemm (bar: >= 0.85)\n");
    println!(
        "{:<17} {:>5} {:>5} {:>5} {:>3} | {:>7} {:>7} {:>5} | {:>7} {:>7} {:>5}",
        "case", "M", "N", "K", "AB", "our 1T", "gemm 1T", "ratio", "our 2T", "gemm 2T", "ratio"
    );
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut ratios = Vec::new();
    for c in CASES {
        if let Some(f) = &filter {
            if !c.name.contains(f.as_str()) {
                continue;
            }
        }
        let mut ops = operands(c, &mut rng);
        let err = cross_check(c, &mut ops);
        // bf16 operands: ~2^-8 relative per product, averaging down over the sum.
        let tolerance = if versus_bf16() { 2e-2 } else { 1e-4 };
        assert!(
            err < tolerance,
            "{}: ours and gemm disagree (rel. diff {err:e})",
            c.name
        );
        let gflop = 2.0 * (c.m * c.n * c.k) as f64 * 1e-9;
        let layout = |l: Layout| if l == N { 'N' } else { 'T' };
        print!(
            "{:<17} {:>5} {:>5} {:>5} {:>2}{} |",
            c.name,
            c.m,
            c.n,
            c.k,
            layout(c.a),
            layout(c.b)
        );
        for threads in [1, 2] {
            let (ours, theirs) = measure(c, &mut ops, threads);
            let ratio = theirs / ours;
            ratios.push(ratio);
            print!(
                " {:>7.1} {:>7.1} {:>5.2} |",
                gflop / ours,
                gflop / theirs,
                ratio
            );
        }
        println!();
    }
    let (hot, cold) = parallel_for_overhead();
    println!(
        "\nparallel_for(2 threads, 2 trivial tasks): median {:.1} µs back-to-back, {:.1} µs after 2 ms idle",
        hot * 1e6,
        cold * 1e6
    );
    if !ratios.is_empty() {
        let geo = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
        let min = ratios.iter().cloned().fold(f64::INFINITY, f64::min);
        println!("\nratio ours/gemm: geometric mean {geo:.2}, minimum {min:.2}");
    }
}
