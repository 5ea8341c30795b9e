//! SGEMM kernels against the f64 reference GEMM, and the intra-op thread pool.

use engine::gemm::{gemm_reference, sgemm, sgemm_with, Kernel, MatRef};
use engine::parallel::{
    in_parallel, num_threads, parallel_for, parallel_for_threads, set_num_threads,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const TOLERANCE: f64 = 1e-4;

/// Shapes (m, n, k): ones, odd sizes, and sizes around the register tiles (6×16, 14×32,
/// 4×8) and the cache blocks (KC = 256, MC = 144/140/128, NC = 4080/4096), plus the narrow
/// outputs that take the transposed path and VGG-like conv shapes.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 1, 7),
    (1, 19, 5),
    (23, 1, 9),
    (2, 3, 1),
    (7, 5, 3),
    (6, 16, 256),
    (14, 32, 256),
    (4, 8, 16),
    (13, 17, 257),
    (29, 45, 31),
    (64, 4, 300),
    (150, 2, 77),
    (33, 9, 513),
    (145, 33, 300),
    (141, 47, 255),
    (300, 70, 600),
    (300, 20, 600),
    (40, 1500, 100),
    (1100, 30, 200),
    (100, 8, 300),
    (37, 7, 1000),
    (600, 6, 800),
    (500, 3, 900),
    (10, 100, 700),
    (12, 515, 200),
    (151, 31, 700),
    (64, 256, 27),
    (70, 130, 64),
    (9, 4100, 3),
    (17, 4099, 5),
];

/// A random `rows × cols` matrix stored either row-major (leading dim `cols + pad`) or as
/// the transpose of a row-major `cols × rows` matrix, returned as (storage, view strides).
fn random_matrix(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
    transposed: bool,
) -> (Vec<f32>, usize, usize) {
    let pad = rng.gen_range(0..3);
    if transposed {
        let ld = rows + pad;
        let data = (0..cols * ld).map(|_| rng.gen_range(-1.0..1.0)).collect();
        (data, 1, ld)
    } else {
        let ld = cols + pad;
        let data = (0..rows * ld).map(|_| rng.gen_range(-1.0..1.0)).collect();
        (data, ld, 1)
    }
}

/// ‖got − want‖_F / ‖want‖_F over the m×n region; infinite if anything is non-finite.
fn relative_error(got: &[f32], want: &[f64], m: usize, n: usize, ldc: usize) -> f64 {
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for i in 0..m {
        for j in 0..n {
            let g = got[i * ldc + j] as f64;
            if !g.is_finite() {
                return f64::INFINITY;
            }
            let w = want[i * ldc + j];
            diff += (g - w) * (g - w);
            norm += w * w;
        }
    }
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// One SGEMM call checked against the f64 reference; also checks that C's padding columns
/// (between n and ldc) are untouched. Returns the relative error.
#[allow(clippy::too_many_arguments)]
fn check_case(
    rng: &mut ChaCha8Rng,
    // None: the default `sgemm`; Some: `sgemm_with(kernel, threads, ..)`.
    with: Option<(Kernel, usize)>,
    (m, n, k): (usize, usize, usize),
    trans_a: bool,
    trans_b: bool,
    alpha: f32,
    beta: f32,
) -> f64 {
    let (a, ars, acs) = random_matrix(rng, m, k, trans_a);
    let (b, brs, bcs) = random_matrix(rng, k, n, trans_b);
    let ldc = n + rng.gen_range(0..3);
    let sentinel = 12345.0f32;
    let mut c: Vec<f32> = (0..m * ldc)
        .map(|idx| {
            if idx % ldc >= n {
                sentinel
            } else if beta == 0.0 {
                f32::NAN // must be overwritten, not scaled
            } else {
                rng.gen_range(-1.0..1.0)
            }
        })
        .collect();

    let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
    let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
    let mut want: Vec<f64> = c.iter().map(|&x| x as f64).collect();
    gemm_reference::<f64>(
        m,
        n,
        k,
        alpha as f64,
        MatRef {
            data: &a64,
            rs: ars,
            cs: acs,
        },
        MatRef {
            data: &b64,
            rs: brs,
            cs: bcs,
        },
        beta as f64,
        &mut want,
        ldc,
    );
    let a_view = MatRef {
        data: &a,
        rs: ars,
        cs: acs,
    };
    let b_view = MatRef {
        data: &b,
        rs: brs,
        cs: bcs,
    };
    match with {
        None => sgemm(m, n, k, alpha, a_view, b_view, beta, &mut c, ldc),
        Some((kernel, threads)) => sgemm_with(
            kernel, threads, m, n, k, alpha, a_view, b_view, beta, &mut c, ldc,
        ),
    }
    for i in 0..m {
        for j in n..ldc {
            assert_eq!(
                c[i * ldc + j],
                sentinel,
                "C padding overwritten at ({i},{j})"
            );
        }
    }
    relative_error(&c, &want, m, n, ldc)
}

/// Every shape × transpose combination × (alpha, beta) variant × threads {1, 2}.
fn check_kernel(kernel: Kernel) {
    let mut rng = ChaCha8Rng::seed_from_u64(0x5eed_0000 + kernel as u64);
    let mut cases = 0;
    for &shape in SHAPES {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true), (true, true)] {
            for (alpha, beta) in [(1.0f32, 0.0f32), (-0.5, 1.0), (2.5, 0.3)] {
                for threads in [1, 2] {
                    let err = check_case(
                        &mut rng,
                        Some((kernel, threads)),
                        shape,
                        trans_a,
                        trans_b,
                        alpha,
                        beta,
                    );
                    assert!(
                        err <= TOLERANCE,
                        "{kernel:?} threads={threads} shape={shape:?} trans_a={trans_a} \
                         trans_b={trans_b} alpha={alpha} beta={beta}: rel. error {err:e}"
                    );
                    cases += 1;
                }
            }
        }
    }
    eprintln!("{kernel:?}: {cases} SGEMM cases within {TOLERANCE:e} of the f64 reference");
}

#[test]
fn avx2_fma_kernel_matches_reference() {
    if !Kernel::Avx2Fma.is_available() {
        eprintln!(
            "!!!!! AVX2+FMA NOT AVAILABLE ON THIS CPU: the Avx2Fma kernel was NOT tested !!!!!"
        );
        return;
    }
    check_kernel(Kernel::Avx2Fma);
}

#[test]
fn avx512_kernel_matches_reference() {
    if !Kernel::Avx512.is_available() {
        eprintln!(
            "!!!!! AVX-512F NOT AVAILABLE ON THIS CPU: the Avx512 kernel was NOT tested \
             (see `detect_picks_best_available_kernel` for what runs here) !!!!!"
        );
        return;
    }
    check_kernel(Kernel::Avx512);
}

#[test]
fn portable_kernel_matches_reference() {
    check_kernel(Kernel::Portable);
}

#[test]
fn detect_follows_the_simd_level() {
    // `Kernel::detect` is the kernel of the process's SIMD level: the best this CPU runs,
    // capped by DTRAIN_SIMD (so `DTRAIN_SIMD=portable cargo test` runs the portable path).
    let detected = Kernel::detect();
    assert!(detected.is_available());
    assert_eq!(detected, Kernel::for_level(engine::simd::level()));
    let best = Kernel::ALL.into_iter().find(|k| k.is_available()).unwrap();
    if std::env::var("DTRAIN_SIMD").is_err() {
        assert_eq!(detected, best);
    }
    #[cfg(target_arch = "x86_64")]
    {
        let want = if std::arch::is_x86_feature_detected!("avx512f") {
            Kernel::Avx512
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            Kernel::Avx2Fma
        } else {
            Kernel::Portable
        };
        assert_eq!(best, want);
    }
    eprintln!("Kernel::detect() = {detected:?}");
}

#[test]
fn unavailable_kernel_is_refused() {
    let Some(missing) = Kernel::ALL.into_iter().find(|k| !k.is_available()) else {
        eprintln!("!!!!! every kernel is available on this CPU: refusal of a missing one NOT tested !!!!!");
        return;
    };
    let x = [1.0f32];
    let mut c = [0.0f32];
    let result = std::panic::catch_unwind(move || {
        let mut c = c;
        sgemm_with(
            missing,
            1,
            1,
            1,
            1,
            1.0,
            MatRef::row_major(&x, 1),
            MatRef::row_major(&x, 1),
            0.0,
            &mut c,
            1,
        )
    });
    c[0] = 1.0;
    assert_eq!(c[0], 1.0);
    assert!(
        result.is_err(),
        "{missing:?} is unavailable but sgemm_with ran it"
    );
}

#[test]
fn default_sgemm_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for &shape in &[(128, 10, 512), (64, 1024, 27), (512, 4, 600), (75, 3, 2)] {
        for (trans_a, trans_b) in [(false, false), (true, false), (false, true)] {
            let err = check_case(&mut rng, None, shape, trans_a, trans_b, 1.0, 0.0);
            assert!(err <= TOLERANCE, "sgemm {shape:?}: rel. error {err:e}");
        }
    }
}

#[test]
fn k_zero_scales_c() {
    let mut c = vec![f32::NAN, f32::NAN, 2.0, 4.0];
    let empty: [f32; 0] = [];
    let run = |beta, c: &mut [f32]| {
        sgemm_with(
            Kernel::Portable,
            1,
            2,
            2,
            0,
            1.0,
            MatRef::row_major(&empty, 0),
            MatRef::row_major(&empty, 2),
            beta,
            c,
            2,
        )
    };
    run(0.0, &mut c);
    assert_eq!(c, vec![0.0; 4]);
    let mut c = vec![1.0, -2.0, 2.0, 4.0];
    run(0.5, &mut c);
    assert_eq!(c, vec![0.5, -1.0, 1.0, 2.0]);
}

#[test]
fn beta_one_accumulates_over_calls() {
    // Backward-weight style: dW += dY_i · col_iᵀ over several images.
    let (m, n, k, images) = (20, 45, 64, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut rand_vec =
        |len: usize| -> Vec<f32> { (0..len).map(|_| rng.gen_range(-1.0..1.0)).collect() };
    let dys: Vec<Vec<f32>> = (0..images).map(|_| rand_vec(m * k)).collect();
    let cols: Vec<Vec<f32>> = (0..images).map(|_| rand_vec(n * k)).collect();
    let mut dw = vec![f32::NAN; m * n];
    let mut want = vec![0.0f64; m * n];
    for (i, (dy, col)) in dys.iter().zip(&cols).enumerate() {
        let beta = if i == 0 { 0.0 } else { 1.0 };
        sgemm(
            m,
            n,
            k,
            1.0,
            MatRef::row_major(dy, k),
            MatRef::row_major(col, k).t(),
            beta,
            &mut dw,
            n,
        );
        let dy64: Vec<f64> = dy.iter().map(|&x| x as f64).collect();
        let col64: Vec<f64> = col.iter().map(|&x| x as f64).collect();
        gemm_reference::<f64>(
            m,
            n,
            k,
            1.0,
            MatRef::row_major(&dy64, k),
            MatRef::row_major(&col64, k).t(),
            1.0,
            &mut want,
            n,
        );
    }
    let err = relative_error(&dw, &want, m, n, n);
    assert!(err <= TOLERANCE, "accumulated rel. error {err:e}");
}

#[test]
fn sgemm_inside_parallel_for_runs_inline_and_correct() {
    let (m, n, k) = (100, 90, 300);
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let a: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let b: Vec<f32> = (0..k * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let mut want = vec![0.0f32; m * n];
    sgemm_with(
        Kernel::detect(),
        1,
        m,
        n,
        k,
        1.0,
        MatRef::row_major(&a, k),
        MatRef::row_major(&b, n),
        0.0,
        &mut want,
        n,
    );
    let outs: Vec<Mutex<Vec<f32>>> = (0..4).map(|_| Mutex::new(vec![f32::NAN; m * n])).collect();
    parallel_for_threads(2, outs.len(), |t| {
        let mut c = outs[t].lock().unwrap();
        sgemm_with(
            Kernel::detect(),
            2,
            m,
            n,
            k,
            1.0,
            MatRef::row_major(&a, k),
            MatRef::row_major(&b, n),
            0.0,
            &mut c,
            n,
        );
    });
    for out in &outs {
        // Same kernel, same blocking, single-threaded either way: bitwise equal.
        assert_eq!(*out.lock().unwrap(), want);
    }
}

#[test]
fn parallel_for_visits_every_index_once() {
    for threads in [1, 2, 3, 4] {
        for n_tasks in [0, 1, 2, 3, 7, 100, 1000] {
            let hits: Vec<AtomicUsize> = (0..n_tasks).map(|_| AtomicUsize::new(0)).collect();
            parallel_for_threads(threads, n_tasks, |i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            for (i, h) in hits.iter().enumerate() {
                assert_eq!(
                    h.load(Ordering::Relaxed),
                    1,
                    "threads={threads} n={n_tasks} index {i}"
                );
            }
        }
    }
}

#[test]
fn parallel_for_repeated_calls() {
    // Many back-to-back loops: exercises the job hand-over between epochs.
    let total = AtomicUsize::new(0);
    for round in 0..2000 {
        parallel_for_threads(2, 1 + round % 5, |i| {
            total.fetch_add(i + 1, Ordering::Relaxed);
        });
    }
    let want: usize = (0..2000)
        .map(|r| {
            let n = 1 + r % 5;
            n * (n + 1) / 2
        })
        .sum();
    assert_eq!(total.load(Ordering::Relaxed), want);
}

#[test]
fn parallel_for_uses_two_threads_concurrently() {
    // Each of the two tasks waits (up to a short deadline) until both have started: that
    // can only succeed if a pool worker runs one task while the caller runs the other.
    // While another test holds the pool, the loop legitimately runs inline on the caller,
    // so retry (bounded) until one attempt gets the pool.
    let overall = Instant::now() + Duration::from_secs(60);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let started = AtomicUsize::new(0);
        let ids = Mutex::new(HashSet::new());
        let deadline = Instant::now() + Duration::from_millis(200);
        parallel_for_threads(2, 2, |_| {
            ids.lock().unwrap().insert(std::thread::current().id());
            started.fetch_add(1, Ordering::SeqCst);
            while started.load(Ordering::SeqCst) < 2 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(100));
            }
        });
        assert_eq!(started.load(Ordering::SeqCst), 2);
        if ids.lock().unwrap().len() == 2 {
            break;
        }
        assert!(
            Instant::now() < overall,
            "parallel_for(2 threads) never ran two tasks concurrently in {attempts} attempts"
        );
    }
}

#[test]
fn nested_parallel_for_runs_inline_without_deadlock() {
    let hits: Vec<AtomicUsize> = (0..8 * 8).map(|_| AtomicUsize::new(0)).collect();
    parallel_for_threads(2, 8, |i| {
        assert!(in_parallel());
        parallel_for_threads(2, 8, |j| {
            hits[i * 8 + j].fetch_add(1, Ordering::Relaxed);
        });
    });
    assert!(!in_parallel());
    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
}

#[test]
fn parallel_for_from_several_threads_at_once() {
    // Concurrent submitters: one gets the pool, the others run inline; all complete.
    std::thread::scope(|s| {
        for t in 0..4 {
            s.spawn(move || {
                for _ in 0..200 {
                    let sum = AtomicUsize::new(0);
                    parallel_for_threads(2, 10, |i| {
                        sum.fetch_add(i, Ordering::Relaxed);
                    });
                    assert_eq!(sum.load(Ordering::Relaxed), 45, "submitter {t}");
                }
            });
        }
    });
}

#[test]
fn parallel_for_propagates_panics_and_stays_usable() {
    for _ in 0..3 {
        let result = std::panic::catch_unwind(|| {
            parallel_for_threads(2, 16, |i| {
                if i % 5 == 3 {
                    panic!("task {i} fails on purpose");
                }
            })
        });
        assert!(result.is_err(), "a task panic must reach the caller");
    }
    let count = AtomicUsize::new(0);
    parallel_for_threads(2, 50, |_| {
        count.fetch_add(1, Ordering::Relaxed);
    });
    assert_eq!(count.load(Ordering::Relaxed), 50);
}

#[test]
fn set_num_threads_changes_count() {
    // The only test that touches the global count (others pass explicit thread counts).
    set_num_threads(3);
    assert_eq!(num_threads(), 3);
    let hits: Vec<AtomicUsize> = (0..20).map(|_| AtomicUsize::new(0)).collect();
    parallel_for(20, |i| {
        hits[i].fetch_add(1, Ordering::Relaxed);
    });
    assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
    set_num_threads(0);
    assert_eq!(num_threads(), 1, "0 is clamped to 1");
    set_num_threads(2);
    assert_eq!(num_threads(), 2);
}
