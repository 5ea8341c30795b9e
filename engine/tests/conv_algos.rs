//! Every conv algorithm (im2col, direct, Winograd F(2x2,3x3) and F(4x4,3x3)), each forced
//! through the `*_with` entry points, against an independent f64 oracle written here (the
//! gather form of each pass, not the scatter form of `ops_reference.rs`), for f32 with every
//! vector type this CPU runs (each supported SIMD level and the 16-lane portable type that
//! runs the AVX-512 kernels' logic) and for f64; f64 gradient checks of each algorithm;
//! measured error bounds per variant; bitwise determinism across runs and thread counts;
//! the override, its fallbacks and the automatic choice.
use engine::gemm::Precision;
use engine::gradcheck::{check_gradients, dot, random_vec, GradcheckConfig};
use engine::ops::*;
use engine::parallel::set_num_threads;
use engine::simd::SimdLevel;
use std::sync::{Mutex, MutexGuard};

/// The thread count and the algorithm override are process-wide: tests that set either run
/// one at a time.
fn global_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn avx512_notice() {
    if !SimdLevel::Avx512.is_supported() {
        eprintln!(
            "!!!!! AVX-512 not supported by this CPU: the AVX-512 conv kernels were NOT executed \
             (their 16-lane logic ran as Portable16) !!!!!"
        );
    }
}

struct Oracle {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
}

/// Input `(ih, iw)` read by output `(r, c)` through tap `(ky, kx)`, if inside the image.
fn input_at(g: &Conv2dGeom, r: usize, c: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
    let ih = (r * g.stride + ky) as isize - g.pad as isize;
    let iw = (c * g.stride + kx) as isize - g.pad as isize;
    (ih >= 0 && iw >= 0 && (ih as usize) < g.h && (iw as usize) < g.w)
        .then_some((ih as usize, iw as usize))
}

/// Each pass by its own gather formula.
fn oracle(g: &Conv2dGeom, x: &[f64], w: &[f64], b: &[f64], dy: &[f64]) -> Oracle {
    let (oh, ow) = (g.out_h(), g.out_w());
    let xi = |n: usize, ci: usize, i: usize, j: usize| ((n * g.c_in + ci) * g.h + i) * g.w + j;
    let yi = |n: usize, co: usize, r: usize, c: usize| ((n * g.c_out + co) * oh + r) * ow + c;
    let wi =
        |co: usize, ci: usize, ky: usize, kx: usize| ((co * g.c_in + ci) * g.kh + ky) * g.kw + kx;
    let mut y = vec![0.0; g.n * g.c_out * oh * ow];
    let mut dx = vec![0.0; x.len()];
    let mut dw = vec![0.0; w.len()];
    for n in 0..g.n {
        for co in 0..g.c_out {
            for r in 0..oh {
                for c in 0..ow {
                    let mut acc = b[co];
                    for ci in 0..g.c_in {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                if let Some((i, j)) = input_at(g, r, c, ky, kx) {
                                    acc += w[wi(co, ci, ky, kx)] * x[xi(n, ci, i, j)];
                                }
                            }
                        }
                    }
                    y[yi(n, co, r, c)] = acc;
                }
            }
        }
        // dx[n, ci, i, j] = Σ over (co, ky, kx) of the outputs that read it.
        for ci in 0..g.c_in {
            for i in 0..g.h {
                for j in 0..g.w {
                    let mut acc = 0.0;
                    for co in 0..g.c_out {
                        for ky in 0..g.kh {
                            for kx in 0..g.kw {
                                let (rs, cs) = (i + g.pad, j + g.pad);
                                if rs < ky
                                    || cs < kx
                                    || (rs - ky) % g.stride != 0
                                    || (cs - kx) % g.stride != 0
                                {
                                    continue;
                                }
                                let (r, c) = ((rs - ky) / g.stride, (cs - kx) / g.stride);
                                if r < oh && c < ow {
                                    acc += w[wi(co, ci, ky, kx)] * dy[yi(n, co, r, c)];
                                }
                            }
                        }
                    }
                    dx[xi(n, ci, i, j)] = acc;
                }
            }
        }
    }
    for co in 0..g.c_out {
        for ci in 0..g.c_in {
            for ky in 0..g.kh {
                for kx in 0..g.kw {
                    let mut acc = 0.0;
                    for n in 0..g.n {
                        for r in 0..oh {
                            for c in 0..ow {
                                if let Some((i, j)) = input_at(g, r, c, ky, kx) {
                                    acc += dy[yi(n, co, r, c)] * x[xi(n, ci, i, j)];
                                }
                            }
                        }
                    }
                    dw[wi(co, ci, ky, kx)] = acc;
                }
            }
        }
    }
    Oracle { y, dx, dw }
}

fn rel_err<T: engine::Float>(a: &[T], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    assert!(a.iter().all(|v| v.is_finite()), "non-finite output");
    let diff: f64 = a
        .iter()
        .zip(b)
        .map(|(a, b)| (a.to_f64_lossy() - b).powi(2))
        .sum();
    let norm: f64 = b.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

/// The same values as f32 and as f64.
fn pair(seed: u64, len: usize) -> (Vec<f32>, Vec<f64>) {
    let v32: Vec<f32> = random_vec(seed, len, -1.0, 1.0)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let v64 = v32.iter().map(|&v| v as f64).collect();
    (v32, v64)
}

struct Inputs {
    x: (Vec<f32>, Vec<f64>),
    w: (Vec<f32>, Vec<f64>),
    b: (Vec<f32>, Vec<f64>),
    dy: (Vec<f32>, Vec<f64>),
}

fn inputs(g: &Conv2dGeom, seed: u64) -> Inputs {
    Inputs {
        x: pair(seed, g.n * g.c_in * g.h * g.w),
        w: pair(seed + 1, g.c_out * g.c_in * g.kh * g.kw),
        b: pair(seed + 2, g.c_out),
        dy: pair(seed + 3, g.n * g.c_out * g.out_h() * g.out_w()),
    }
}

/// The three passes of `algo` in `T` (outputs start as NaN: every element must be written).
fn run_passes<T: engine::Float>(
    algo: ConvAlgo,
    v: ConvVectors,
    g: &Conv2dGeom,
    x: &[T],
    w: &[T],
    b: &[T],
    dy: &[T],
) -> [Vec<T>; 4] {
    let nan = T::nan();
    let mut y = vec![nan; dy.len()];
    conv2d_forward_with(algo, v, g, x, w, Some(b), &mut y);
    let mut dx = vec![nan; x.len()];
    conv2d_backward_data_with(algo, v, g, dy, w, &mut dx);
    let (mut dw, mut db) = (vec![nan; w.len()], vec![nan; b.len()]);
    conv2d_backward_weight_with(algo, v, g, x, dy, &mut dw, Some(&mut db));
    [y, dx, dw, db]
}

/// Odd and VGG-like shapes; together they cover ragged Winograd tiles, pad 0/1/2/3 (negative
/// backward-data padding), channel counts that are not multiples of any lane count or
/// register tile. Run at every vector width and in f64.
fn shapes() -> Vec<Conv2dGeom> {
    vec![
        Conv2dGeom::new(5, 3, 17, 13, 5, (3, 3), 1, 1),
        Conv2dGeom::new(2, 16, 9, 11, 24, (3, 3), 1, 1),
        Conv2dGeom::new(3, 20, 7, 6, 17, (3, 3), 1, 0),
        Conv2dGeom::new(2, 5, 5, 5, 9, (3, 3), 1, 2),
        Conv2dGeom::new(1, 7, 3, 4, 6, (3, 3), 1, 3),
        Conv2dGeom::new(4, 32, 2, 2, 40, (3, 3), 1, 1),
        Conv2dGeom::new(3, 24, 4, 4, 33, (3, 3), 1, 1),
        Conv2dGeom::new(2, 3, 10, 10, 50, (3, 3), 1, 1),
        Conv2dGeom::new(1, 1, 1, 1, 1, (3, 3), 1, 1),
        Conv2dGeom::new(2, 3, 9, 8, 4, (5, 5), 1, 2),
        Conv2dGeom::new(2, 4, 7, 10, 6, (1, 5), 1, 2),
        Conv2dGeom::new(2, 9, 6, 6, 10, (1, 1), 1, 0),
        Conv2dGeom::new(2, 5, 9, 12, 3, (3, 5), 2, 1),
    ]
}

/// Shapes large enough to split the work into several chunks of images or blocks of output
/// channels (the scratch bounds are fixed, so it takes big layers). The splitting does not
/// depend on the vector type: run at the process's level only.
fn splitting_shapes() -> Vec<Conv2dGeom> {
    vec![
        // Winograd: several chunks of images (F4: 40 images per chunk, F2: 22).
        Conv2dGeom::new(45, 8, 64, 64, 8, (3, 3), 1, 1),
        // Winograd: several output-channel blocks (F4: 2 blocks).
        Conv2dGeom::new(2, 300, 2, 2, 300, (3, 3), 1, 1),
        // Winograd F2: 2 blocks.
        Conv2dGeom::new(1, 460, 2, 2, 460, (3, 3), 1, 1),
        // Direct: two chunks of padded planes in every pass.
        Conv2dGeom::new(64, 64, 32, 32, 2, (3, 3), 1, 1),
        // Direct backward-weight: two blocks of output-channel accumulators.
        Conv2dGeom::new(1, 512, 2, 2, 60, (3, 3), 1, 1),
    ]
}

/// `db` by definition.
fn bias_oracle(g: &Conv2dGeom, dy: &[f64]) -> Vec<f64> {
    let p = g.out_h() * g.out_w();
    (0..g.c_out)
        .map(|co| {
            (0..g.n)
                .map(|n| dy[(n * g.c_out + co) * p..][..p].iter().sum::<f64>())
                .sum()
        })
        .collect()
}

/// Every applicable algorithm on `g` against the oracle at each of `vectors` (f32, within
/// 1e-4, the project's kernel tolerance) and, if `f64`, in f64 (within 1e-12). Returns the
/// algorithms that ran.
fn check_against_oracle(
    g: &Conv2dGeom,
    seed: u64,
    vectors: &[ConvVectors],
    f64_too: bool,
) -> Vec<ConvAlgo> {
    let inp = inputs(g, seed);
    let o = oracle(g, &inp.x.1, &inp.w.1, &inp.b.1, &inp.dy.1);
    let db = bias_oracle(g, &inp.dy.1);
    let want = [&o.y, &o.dx, &o.dw, &db];
    let names = ["fwd", "bwd-data", "bwd-weight", "bias"];
    let mut ran = Vec::new();
    for algo in ConvAlgo::ALL {
        if algo.unsupported_reason(g).is_some() {
            continue;
        }
        ran.push(algo);
        if f64_too {
            let got = run_passes(algo, vectors[0], g, &inp.x.1, &inp.w.1, &inp.b.1, &inp.dy.1);
            for (pass, (got, want)) in names.iter().zip(got.iter().zip(want)) {
                let e = rel_err(got, want);
                assert!(e <= 1e-12, "{algo} f64 {pass} {g:?}: {e:e}");
            }
        }
        for &v in vectors {
            let got = run_passes(algo, v, g, &inp.x.0, &inp.w.0, &inp.b.0, &inp.dy.0);
            for (pass, (got, want)) in names.iter().zip(got.iter().zip(want)) {
                let e = rel_err(got, want);
                assert!(e <= 1e-4, "{algo} f32 {} {pass} {g:?}: {e:e}", v.name());
            }
        }
    }
    ran
}

/// Every algorithm that applies to each shape, f32 at every vector type and f64.
#[test]
fn every_algorithm_matches_the_oracle_at_every_vector_width() {
    avx512_notice();
    let vectors = ConvVectors::all_supported();
    let mut covered = [0usize; 4];
    for (s, g) in shapes().iter().enumerate() {
        for algo in check_against_oracle(g, 1000 + 10 * s as u64, &vectors, true) {
            covered[ConvAlgo::ALL.iter().position(|&a| a == algo).unwrap()] += 1;
        }
    }
    assert!(
        covered.iter().all(|&c| c >= 9),
        "shapes per algorithm: {covered:?}"
    );
}

#[test]
fn every_algorithm_matches_the_oracle_when_split_into_chunks_and_blocks() {
    for (s, g) in splitting_shapes().iter().enumerate() {
        check_against_oracle(g, 2000 + 10 * s as u64, &[ConvVectors::process()], false);
    }
}

/// f64 central-difference gradient checks of each algorithm's backward passes against its
/// own forward (the same kernel source as f32, one lane wide, over the naive GEMM).
#[test]
fn gradcheck_every_algorithm() {
    let shapes = [
        Conv2dGeom::new(2, 3, 5, 7, 4, (3, 3), 1, 1),
        Conv2dGeom::new(1, 2, 6, 5, 3, (3, 3), 1, 0),
        Conv2dGeom::new(1, 3, 4, 6, 5, (3, 3), 1, 2),
        Conv2dGeom::new(2, 4, 2, 2, 3, (3, 3), 1, 1),
        Conv2dGeom::new(1, 2, 9, 8, 2, (5, 3), 1, 2),
        Conv2dGeom::new(2, 3, 5, 5, 2, (3, 3), 2, 1),
    ];
    let v = ConvVectors::process();
    for algo in ConvAlgo::ALL {
        let mut checked = 0;
        for (t, g) in shapes.iter().enumerate() {
            if algo.unsupported_reason(g).is_some() {
                continue;
            }
            let seed = 500 + 10 * t as u64;
            let x = random_vec(seed, g.n * g.c_in * g.h * g.w, -1.0, 1.0);
            let w = random_vec(seed + 1, g.c_out * g.c_in * g.kh * g.kw, -1.0, 1.0);
            let b = random_vec(seed + 2, g.c_out, -1.0, 1.0);
            let r = random_vec(seed + 3, g.n * g.c_out * g.out_h() * g.out_w(), -1.0, 1.0);
            let mut dx = vec![f64::NAN; x.len()];
            let (mut dw, mut db) = (vec![f64::NAN; w.len()], vec![f64::NAN; b.len()]);
            conv2d_backward_data_with(algo, v, g, &r, &w, &mut dx);
            conv2d_backward_weight_with(algo, v, g, &x, &r, &mut dw, Some(&mut db));
            let report = check_gradients(
                &["x", "w", "b"],
                &mut [x, w, b],
                &[dx, dw, db],
                &GradcheckConfig::default(),
                |vals| {
                    let mut y = vec![f64::NAN; r.len()];
                    conv2d_forward_with(algo, v, g, &vals[0], &vals[1], Some(&vals[2]), &mut y);
                    dot(&r, &y)
                },
            )
            .unwrap_or_else(|e| panic!("{algo} {g:?}: {e}"));
            assert!(report.inputs.iter().all(|i| i.checked > 0));
            checked += 1;
        }
        assert!(checked >= 3, "{algo}: only {checked} shapes apply");
    }
}

/// Norm-wise relative error of each algorithm in f32 against the exact (f64) result on
/// VGG-like layers (random inputs in [-1, 1)), per pass, with a bound per variant. The
/// measured values are printed (`--nocapture`) and quoted in the README.
#[test]
fn error_of_each_variant_is_within_its_bound() {
    // Bounds: ~3x the largest error observed on these shapes.
    let bound = |a: ConvAlgo| match a {
        ConvAlgo::Im2col => 1e-6,
        ConvAlgo::Direct => 4e-6,
        ConvAlgo::WinogradF2 => 2e-6,
        ConvAlgo::WinogradF4 => 1e-5,
    };
    let layers = [
        Conv2dGeom::new(4, 64, 16, 16, 64, (3, 3), 1, 1),
        Conv2dGeom::new(8, 256, 8, 8, 64, (3, 3), 1, 1),
        Conv2dGeom::new(16, 512, 4, 4, 32, (3, 3), 1, 1),
        Conv2dGeom::new(32, 512, 2, 2, 32, (3, 3), 1, 1),
        Conv2dGeom::new(8, 3, 32, 32, 64, (3, 3), 1, 1),
    ];
    let v = ConvVectors::process();
    for (s, g) in layers.iter().enumerate() {
        let inp = inputs(g, 9000 + 10 * s as u64);
        // The exact result: f64 im2col (itself checked against the oracle above).
        let exact = run_passes(
            ConvAlgo::Im2col,
            v,
            g,
            &inp.x.1,
            &inp.w.1,
            &inp.b.1,
            &inp.dy.1,
        );
        for algo in ConvAlgo::ALL {
            let got = run_passes(algo, v, g, &inp.x.0, &inp.w.0, &inp.b.0, &inp.dy.0);
            let errs: Vec<f64> = (0..3).map(|i| rel_err(&got[i], &exact[i])).collect();
            eprintln!(
                "error {:<12} {:<22} fwd {:.2e} bwd-data {:.2e} bwd-weight {:.2e}",
                algo.name(),
                format!("{}->{}@{}x{} n{}", g.c_in, g.c_out, g.h, g.w, g.n),
                errs[0],
                errs[1],
                errs[2]
            );
            for (pass, e) in ConvPass::ALL.iter().zip(&errs) {
                assert!(
                    *e <= bound(algo),
                    "{algo} {} {g:?}: {e:e} > {:e}",
                    pass.name(),
                    bound(algo)
                );
            }
        }
    }
}

/// Same inputs, same bits: repeated runs, and 1 vs 2 threads (the choice and every
/// algorithm's summation order are independent of the thread count).
#[test]
fn every_algorithm_is_bitwise_deterministic_across_runs_and_thread_counts() {
    let _guard = global_lock();
    let shapes = [
        Conv2dGeom::new(8, 16, 16, 16, 32, (3, 3), 1, 1),
        Conv2dGeom::new(16, 32, 4, 4, 32, (3, 3), 1, 1),
        Conv2dGeom::new(16, 32, 2, 2, 24, (3, 3), 1, 1),
        Conv2dGeom::new(4, 3, 32, 32, 16, (3, 3), 1, 1),
    ];
    for (s, g) in shapes.iter().enumerate() {
        let inp = inputs(g, 7000 + 10 * s as u64);
        for algo in ConvAlgo::ALL {
            for v in ConvVectors::all_supported() {
                let bits = |threads: usize| {
                    set_num_threads(threads);
                    let out = run_passes(algo, v, g, &inp.x.0, &inp.w.0, &inp.b.0, &inp.dy.0);
                    out.map(|o| o.iter().map(|f| f.to_bits()).collect::<Vec<u32>>())
                };
                let first = bits(2);
                assert!(bits(2) == first, "{algo} {} {g:?}: runs differ", v.name());
                assert!(
                    bits(1) == first,
                    "{algo} {} {g:?}: 1 vs 2 threads differ",
                    v.name()
                );
            }
        }
    }
    set_num_threads(2);
}

#[test]
fn override_parses_and_falls_back_where_it_does_not_apply() {
    for o in ConvAlgoOverride::ALL {
        assert_eq!(o.name().parse::<ConvAlgoOverride>(), Ok(o));
        assert_eq!(o.name().to_uppercase().parse::<ConvAlgoOverride>(), Ok(o));
    }
    let err = "fft".parse::<ConvAlgoOverride>().unwrap_err();
    assert!(err.to_string().contains("fft") && err.to_string().contains("winograd"));

    let level = SimdLevel::best_supported();
    let vgg3x3 = Conv2dGeom::new(8, 64, 16, 16, 128, (3, 3), 1, 1);
    let stride2 = Conv2dGeom::new(8, 64, 16, 16, 128, (3, 3), 2, 1);
    let pointwise = Conv2dGeom::new(8, 64, 16, 16, 128, (1, 1), 1, 0);
    for pass in ConvPass::ALL {
        let c = conv2d_algo_for(
            &vgg3x3,
            pass,
            ConvAlgoOverride::Winograd,
            level,
            Precision::F32,
        );
        assert_eq!((c.algo, c.fallback), (ConvAlgo::WinogradF4, None));
        let c = conv2d_algo_for(
            &vgg3x3,
            pass,
            ConvAlgoOverride::Im2col,
            level,
            Precision::F32,
        );
        assert_eq!((c.algo, c.fallback), (ConvAlgo::Im2col, None));
        // Winograd on stride 2 / 1x1, direct on stride 2: the automatic choice, with the reason.
        for (g, o, why) in [
            (&stride2, ConvAlgoOverride::Winograd, "stride 1"),
            (&stride2, ConvAlgoOverride::WinogradF2, "stride 1"),
            (&pointwise, ConvAlgoOverride::Winograd, "3x3"),
            (&stride2, ConvAlgoOverride::Direct, "stride 1"),
        ] {
            let c = conv2d_algo_for(g, pass, o, level, Precision::F32);
            assert_eq!(c.algo, choose_conv_algo(g, pass, level), "{o} {g:?}");
            assert!(
                c.fallback.is_some_and(|r| r.contains(why)),
                "{o} {g:?}: {c:?}"
            );
            assert!(c.to_string().contains("fallback"), "{c}");
        }
    }
}

/// The automatic choice on VGG11's convolutions (the README's table), and its purity.
#[test]
fn automatic_choice_for_vgg11_layers() {
    use ConvAlgo::*;
    // (c_in, c_out, size): [fwd, bwd-data, bwd-weight].
    let table = [
        (3, 64, 32, [Direct, Direct, Direct]),
        (64, 128, 16, [WinogradF4, WinogradF4, WinogradF4]),
        (128, 256, 8, [WinogradF4, WinogradF4, WinogradF4]),
        (256, 256, 8, [WinogradF4, WinogradF4, WinogradF4]),
        (256, 512, 4, [WinogradF4, WinogradF4, WinogradF4]),
        (512, 512, 4, [WinogradF4, WinogradF4, WinogradF4]),
        (512, 512, 2, [WinogradF2, WinogradF2, WinogradF2]),
    ];
    for level in SimdLevel::ALL {
        for &(c_in, c_out, hw, want) in &table {
            for n in [1, 128, 256] {
                let g = Conv2dGeom::new(n, c_in, hw, hw, c_out, (3, 3), 1, 1);
                for (pass, &algo) in ConvPass::ALL.iter().zip(&want) {
                    assert_eq!(
                        choose_conv_algo(&g, *pass, level),
                        algo,
                        "{g:?} {pass:?} {level:?}"
                    );
                    let c =
                        conv2d_algo_for(&g, *pass, ConvAlgoOverride::Auto, level, Precision::F32);
                    assert_eq!((c.algo, c.fallback), (algo, None));
                }
            }
        }
    }
    // Shapes no specialised algorithm computes go to im2col.
    let g = Conv2dGeom::new(4, 64, 16, 16, 64, (3, 3), 2, 1);
    assert_eq!(
        choose_conv_algo(&g, ConvPass::Forward, SimdLevel::Avx2),
        Im2col
    );
}

/// The process-wide override reaches the public entry points and the plan.
#[test]
fn override_drives_the_public_entry_points() {
    let _guard = global_lock();
    let g = Conv2dGeom::new(3, 8, 6, 6, 5, (3, 3), 1, 1);
    let inp = inputs(&g, 42);
    for o in ConvAlgoOverride::ALL {
        set_conv_algo_override(o);
        assert_eq!(conv_algo_override(), o);
        let plan = conv2d_plan(&g);
        let mut y = vec![f32::NAN; inp.dy.0.len()];
        conv2d_forward(&g, &inp.x.0, &inp.w.0, Some(&inp.b.0), &mut y);
        let mut want = vec![f32::NAN; y.len()];
        conv2d_forward_with(
            plan.forward.algo,
            ConvVectors::process(),
            &g,
            &inp.x.0,
            &inp.w.0,
            Some(&inp.b.0),
            &mut want,
        );
        assert!(
            y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{o}: {plan}"
        );
        if o != ConvAlgoOverride::Auto {
            assert!(plan.to_string().contains(plan.forward.algo.name()));
        }
    }
    set_conv_algo_override(ConvAlgoOverride::Auto);
}

/// The GEMM inside every algorithm follows the process's SIMD level (`DTRAIN_SIMD`, read
/// once), so the portable GEMM's panel layout — NR = 8, narrower than a 16-lane vector,
/// which takes the lane-by-lane store path of the transforms — only runs in a process
/// started at the portable level: re-run the oracle test in such a child.
#[test]
fn every_algorithm_matches_the_oracle_in_a_portable_level_process() {
    const CHILD: &str = "CONV_ALGOS_PORTABLE_CHILD";
    if std::env::var_os(CHILD).is_some() {
        // We are the child: the parent checks our exit status.
        assert_eq!(engine::simd::level(), SimdLevel::Portable);
        return;
    }
    let exe = std::env::current_exe().expect("test binary path");
    let out = std::process::Command::new(exe)
        .args([
            "every_algorithm_matches_the_oracle_at_every_vector_width",
            "every_algorithm_matches_the_oracle_in_a_portable_level_process",
            "--test-threads=1",
        ])
        .env("DTRAIN_SIMD", "portable")
        .env(CHILD, "1")
        .output()
        .expect("spawn the test binary");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "portable-level child failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("2 passed"), "child ran: {stdout}");
}

/// `--precision bf16`: the im2col passes run the bf16 GEMM, so each matches the f64 oracle on
/// bf16-rounded operands (to f32-accumulation accuracy, ~sqrt(K)·2^-24 relative) and is off
/// the f32 result by about the bf16 rounding (~2^-9 relative): both asserted, so a pass that
/// silently stayed in f32 fails the first check and one that rounded wrongly the second.
#[test]
fn im2col_passes_under_bf16_compute_with_bf16_rounded_operands() {
    use engine::bf16::round_to_bf16;
    use engine::gemm::with_precision;
    let _guard = global_lock();
    set_conv_algo_override(ConvAlgoOverride::Auto);
    for g in [
        Conv2dGeom::new(3, 8, 7, 5, 6, (3, 3), 1, 1),
        Conv2dGeom::new(1, 16, 6, 6, 24, (3, 3), 2, 1),
        Conv2dGeom::new(2, 5, 4, 4, 40, (1, 1), 1, 0),
    ] {
        let inp = inputs(&g, 7);
        let r = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| round_to_bf16(x) as f64).collect() };
        let want = oracle(&g, &r(&inp.x.0), &r(&inp.w.0), &inp.b.1, &r(&inp.dy.0));
        let exact = oracle(&g, &inp.x.1, &inp.w.1, &inp.b.1, &inp.dy.1);
        let v = ConvVectors::process();
        let (x, w, b, dy) = (&inp.x.0, &inp.w.0, &inp.b.0, &inp.dy.0);
        let got = with_precision(Precision::Bf16, || {
            run_passes(ConvAlgo::Im2col, v, &g, x, w, b, dy)
        });
        for (name, out, want, exact) in [
            ("fwd", &got[0], &want.y, &exact.y),
            ("bwd-data", &got[1], &want.dx, &exact.dx),
            ("bwd-weight", &got[2], &want.dw, &exact.dw),
        ] {
            let err = rel_err(out, want);
            assert!(
                err <= 2e-6,
                "{g:?} {name}: {err:e} from the rounded-operand oracle"
            );
            let off = rel_err(out, exact);
            assert!(
                off > 1e-4 && off < 1e-2,
                "{g:?} {name}: {off:e} from the f32 oracle"
            );
        }
    }
}

/// The bf16 plan: im2col-bf16 exactly where it measured faster than the f32 choice
/// (`choose_conv_algo_at`), every other pass in f32 and saying why.
#[test]
fn bf16_plan_names_the_arithmetic_of_every_pass() {
    use ConvAlgo::{Direct, Im2col, WinogradF2, WinogradF4};
    let _guard = global_lock();
    set_conv_algo_override(ConvAlgoOverride::Auto);
    let level = engine::simd::level();
    let geom = |c_in, hw, c_out| Conv2dGeom::new(128, c_in, hw, hw, c_out, (3, 3), 1, 1);
    // (layer, forward, backward-data, backward-weight) under bf16.
    let want = [
        (geom(3, 32, 64), [Direct, Im2col, Direct]),
        (geom(64, 16, 128), [Im2col; 3]),
        (geom(128, 8, 256), [WinogradF4; 3]),
        (geom(512, 2, 512), [WinogradF2, Im2col, Im2col]),
    ];
    for (g, algos) in want {
        for (pass, algo) in ConvPass::ALL.into_iter().zip(algos) {
            let c = conv2d_algo_for(&g, pass, ConvAlgoOverride::Auto, level, Precision::Bf16);
            assert_eq!(c.algo, algo, "{g:?} {pass:?}");
            let (arithmetic, note) = match algo {
                Im2col => (Precision::Bf16, "[bf16]"),
                Direct => (Precision::F32, "[f32: no bf16 kernel]"),
                _ => (
                    Precision::F32,
                    "[f32: faster and more exact than bf16 here]",
                ),
            };
            assert_eq!(c.arithmetic(), arithmetic, "{c}");
            assert!(c.to_string().ends_with(note), "{c}");
            // f32 plans print as before.
            let f = conv2d_algo_for(&g, pass, ConvAlgoOverride::Auto, level, Precision::F32);
            assert_eq!(f.to_string(), f.algo.name());
            assert_eq!(f.arithmetic(), Precision::F32);
        }
    }
}

/// Winograd with bf16 GEMMs (the transforms stay f32, their outputs are rounded to bf16 as
/// the GEMM packs them): the error against the exact (f64, unrounded) result is the bf16
/// rounding amplified by the transforms. Measured on this data (relative Frobenius error per
/// pass, printed): im2col-bf16 0.20-0.21 %, F(2x2) 0.39-0.41 %, F(4x4) 1.7-1.9 %; asserted:
/// F(2x2) within 3x im2col-bf16's error, F(4x4) beyond it. Half of why Winograd runs f32
/// under `--precision bf16` (the other half is speed: `conv_layers` bench, `BENCH_BF16=1`).
#[test]
fn winograd_error_in_bf16_is_the_rounding_amplified_by_its_transforms() {
    use engine::gemm::with_precision;
    let _guard = global_lock();
    set_conv_algo_override(ConvAlgoOverride::Auto);
    let g = Conv2dGeom::new(2, 64, 8, 8, 32, (3, 3), 1, 1);
    let inp = inputs(&g, 9);
    let exact = oracle(&g, &inp.x.1, &inp.w.1, &inp.b.1, &inp.dy.1);
    let v = ConvVectors::process();
    let (x, w, b, dy) = (&inp.x.0, &inp.w.0, &inp.b.0, &inp.dy.0);
    let errors = |algo| {
        let got = with_precision(Precision::Bf16, || run_passes(algo, v, &g, x, w, b, dy));
        [
            rel_err(&got[0], &exact.y),
            rel_err(&got[1], &exact.dx),
            rel_err(&got[2], &exact.dw),
        ]
    };
    let base = errors(ConvAlgo::Im2col);
    for (algo, within) in [(ConvAlgo::WinogradF2, true), (ConvAlgo::WinogradF4, false)] {
        let e = errors(algo);
        eprintln!("bf16 {algo}: {e:?} (im2col {base:?})");
        for pass in 0..3 {
            assert!(
                base[pass] > 1e-3 && base[pass] < 4e-3,
                "im2col-bf16 pass {pass}: {:e}",
                base[pass]
            );
            assert_eq!(
                e[pass] <= 3.0 * base[pass],
                within,
                "{algo} pass {pass}: {:e} vs im2col {:e}",
                e[pass],
                base[pass]
            );
        }
    }
}
