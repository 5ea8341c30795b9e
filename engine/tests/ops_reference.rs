//! Kernel-vs-reference tests: every f32 op against the f64 version of the same op on the same
//! inputs (the f32 path runs the SIMD SGEMM, the f64 path the naive reference GEMM), and conv
//! additionally against a direct 7-loop f64 convolution written here (an oracle independent
//! of im2col/GEMM). Each runs with 1 and 2 threads. Error measure: norm-wise relative error
//! `‖a - b‖₂ / ‖b‖₂ <= 1e-4`.
//!
//! The vectorized elementwise ops (batch norm, fused batch norm + relu, relu, max-pool) also
//! run on every f32 SIMD path this CPU has and on `Portable16` (AVX-512's 16-lane logic)
//! through `simd::with_f32_impl`.
use engine::gradcheck::random_vec;
use engine::ops::*;
use engine::parallel::{set_num_threads, with_num_threads};
use engine::simd::{with_f32_impl, F32Impl};
use std::sync::{Mutex, MutexGuard};

const TOL: f64 = 1e-4;

/// Runs `check(label)` on every f32 SIMD path and with 1 and 2 threads.
fn on_every_path(mut check: impl FnMut(&str)) {
    for imp in F32Impl::runnable() {
        for threads in [1, 2] {
            with_f32_impl(imp, || {
                with_num_threads(threads, || check(&format!("{imp:?} threads={threads}")))
            });
        }
    }
}

/// The process-wide thread count ([`set_num_threads`]): tests that set it run one at a time.
fn thread_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// Random f32 values and the very same values in f64.
fn rand_pair(seed: u64, len: usize, lo: f64, hi: f64) -> (Vec<f32>, Vec<f64>) {
    let v32: Vec<f32> = random_vec(seed, len, lo, hi)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let v64 = v32.iter().map(|&v| v as f64).collect();
    (v32, v64)
}

fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(&a, &b)| (a as f64 - b).powi(2)).sum();
    let norm: f64 = b.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

fn rel_err64(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(a, b)| (a - b).powi(2)).sum();
    let norm: f64 = b.iter().map(|b| b * b).sum();
    (diff / norm).sqrt()
}

fn assert_close(what: &str, a: &[f32], b: &[f64]) {
    assert!(a.iter().all(|v| v.is_finite()), "{what}: non-finite output");
    let e = rel_err(a, b);
    assert!(e <= TOL, "{what}: relative error {e:e} > {TOL:e}");
}

/// Direct convolution by definition: forward, and the two backward passes as the adjoint
/// scatter of the same 7 loops.
struct NaiveConv {
    y: Vec<f64>,
    dx: Vec<f64>,
    dw: Vec<f64>,
    db: Vec<f64>,
}

#[allow(clippy::needless_range_loop)] // index loops mirror the math
fn naive_conv(g: &Conv2dGeom, x: &[f64], w: &[f64], b: &[f64], dy: &[f64]) -> NaiveConv {
    let (oh, ow) = (g.out_h(), g.out_w());
    let mut out = NaiveConv {
        y: vec![0.0; g.n * g.c_out * oh * ow],
        dx: vec![0.0; x.len()],
        dw: vec![0.0; w.len()],
        db: vec![0.0; g.c_out],
    };
    for n in 0..g.n {
        for co in 0..g.c_out {
            for r in 0..oh {
                for c in 0..ow {
                    let o = ((n * g.c_out + co) * oh + r) * ow + c;
                    let mut acc = b[co];
                    for ci in 0..g.c_in {
                        for i in 0..g.kh {
                            for j in 0..g.kw {
                                let ih = (r * g.stride + i) as isize - g.pad as isize;
                                let iw = (c * g.stride + j) as isize - g.pad as isize;
                                if ih < 0 || iw < 0 || ih >= g.h as isize || iw >= g.w as isize {
                                    continue;
                                }
                                let xi =
                                    ((n * g.c_in + ci) * g.h + ih as usize) * g.w + iw as usize;
                                let wi = ((co * g.c_in + ci) * g.kh + i) * g.kw + j;
                                acc += w[wi] * x[xi];
                                out.dx[xi] += w[wi] * dy[o];
                                out.dw[wi] += x[xi] * dy[o];
                            }
                        }
                    }
                    out.y[o] = acc;
                    out.db[co] += dy[o];
                }
            }
        }
    }
    out
}

#[test]
fn conv2d_f32_matches_f64_and_naive_oracle() {
    let _guard = thread_lock();
    let shapes = [
        Conv2dGeom::new(5, 3, 17, 13, 5, (3, 3), 1, 1), // one chunk of 5 images, odd sizes
        Conv2dGeom::new(5, 4, 31, 29, 7, (3, 3), 1, 1), // one chunk of 5 wide images
        Conv2dGeom::new(1, 3, 33, 35, 8, (3, 3), 1, 1), // batch 1: GEMM straight into y
        Conv2dGeom::new(4, 3, 11, 9, 6, (5, 5), 2, 2),  // 5x5 stride 2
        Conv2dGeom::new(3, 9, 10, 6, 10, (1, 1), 1, 0), // pointwise
        Conv2dGeom::new(2, 3, 40, 40, 4, (1, 1), 1, 0), // pointwise, 2-image chunk (copying im2col)
        Conv2dGeom::new(2, 130, 64, 64, 4, (1, 1), 1, 0), // pointwise, 1 image per chunk: no im2col
        Conv2dGeom::new(6, 64, 32, 32, 8, (3, 3), 1, 1), // 3 chunks of 2 images
        Conv2dGeom::new(2, 16, 8, 8, 33, (3, 3), 1, 0), // no padding, C_out not a multiple of 8
        Conv2dGeom::new(130, 20, 2, 2, 24, (3, 3), 1, 1), // late-VGG-like: 2x2 images, wide chunk
        Conv2dGeom::new(2, 5, 9, 12, 3, (3, 5), 2, 1),  // rectangular kernel, stride 2
        Conv2dGeom::new(3, 4, 7, 10, 6, (1, 5), 1, 2),  // same width, taller output (rows of zeros)
        Conv2dGeom::new(2, 3, 9, 6, 5, (5, 3), 1, 1),   // same width, shorter output
        Conv2dGeom::new(3, 4, 7, 7, 5, (3, 3), 2, 1),   // 4x4 output: tap-table path with stride 2
        Conv2dGeom::new(40, 8, 4, 4, 9, (3, 3), 1, 1),  // 4x4 planes, VGG-like: tap-table path
    ];
    // The chunking paths these shapes are meant to cover.
    let chunks = |g: &Conv2dGeom| g.n.div_ceil(conv2d_images_per_chunk(g));
    assert!(shapes
        .iter()
        .any(|g| chunks(g) > 1 && conv2d_images_per_chunk(g) > 1));
    assert!(shapes
        .iter()
        .any(|g| g.n > 1 && conv2d_images_per_chunk(g) == 1 && g.kh == 1));
    assert!(shapes
        .iter()
        .any(|g| g.n > 1 && conv2d_images_per_chunk(g) == g.n));
    for threads in [1, 2] {
        set_num_threads(threads);
        for (t, g) in shapes.iter().enumerate() {
            let seed = 10_000 + 10 * t as u64;
            let k = g.c_in * g.kh * g.kw;
            let ylen = g.n * g.c_out * g.out_h() * g.out_w();
            let (x32, x64) = rand_pair(seed, g.n * g.c_in * g.h * g.w, -1.0, 1.0);
            let (w32, w64) = rand_pair(seed + 1, g.c_out * k, -1.0, 1.0);
            let (b32, b64) = rand_pair(seed + 2, g.c_out, -1.0, 1.0);
            let (dy32, dy64) = rand_pair(seed + 3, ylen, -1.0, 1.0);
            let oracle = naive_conv(g, &x64, &w64, &b64, &dy64);
            let what = |op: &str| format!("{op} {g:?} threads={threads}");

            // Outputs start as NaN: every op must overwrite all of them.
            let mut y32 = vec![f32::NAN; ylen];
            let mut y64 = vec![f64::NAN; ylen];
            conv2d_forward(g, &x32, &w32, Some(&b32), &mut y32);
            conv2d_forward(g, &x64, &w64, Some(&b64), &mut y64);
            assert_close(&what("conv fwd vs f64"), &y32, &y64);
            assert_close(&what("conv fwd vs naive"), &y32, &oracle.y);
            let e = rel_err64(&y64, &oracle.y);
            assert!(e < 1e-12, "{}: f64 conv vs naive {e:e}", what("conv fwd"));

            let mut dx32 = vec![f32::NAN; x32.len()];
            let mut dx64 = vec![f64::NAN; x64.len()];
            conv2d_backward_data(g, &dy32, &w32, &mut dx32);
            conv2d_backward_data(g, &dy64, &w64, &mut dx64);
            assert_close(&what("conv bwd-data vs f64"), &dx32, &dx64);
            assert_close(&what("conv bwd-data vs naive"), &dx32, &oracle.dx);

            let mut dw32 = vec![f32::NAN; w32.len()];
            let mut db32 = vec![f32::NAN; b32.len()];
            let mut dw64 = vec![f64::NAN; w64.len()];
            let mut db64 = vec![f64::NAN; b64.len()];
            conv2d_backward_weight(g, &x32, &dy32, &mut dw32, Some(&mut db32));
            conv2d_backward_weight(g, &x64, &dy64, &mut dw64, Some(&mut db64));
            assert_close(&what("conv bwd-weight vs f64"), &dw32, &dw64);
            assert_close(&what("conv bwd-weight vs naive"), &dw32, &oracle.dw);
            assert_close(&what("conv bwd-bias vs f64"), &db32, &db64);
            assert_close(&what("conv bwd-bias vs naive"), &db32, &oracle.db);

            // Without bias: forward equals the biased one minus the bias.
            let mut y32_nb = vec![f32::NAN; ylen];
            conv2d_forward(g, &x32, &w32, None, &mut y32_nb);
            let p = g.out_h() * g.out_w();
            let unbiased: Vec<f64> = oracle
                .y
                .iter()
                .enumerate()
                .map(|(i, v)| v - b64[(i / p) % g.c_out])
                .collect();
            assert_close(&what("conv fwd (no bias) vs naive"), &y32_nb, &unbiased);
        }
    }
    set_num_threads(2);
}

/// Run training BN forward + backward + running update in f32 and f64 on the same inputs and
/// compare every output.
fn check_batchnorm(n: usize, c: usize, hw: usize, mean: f64, spread: f64, seed: u64, path: &str) {
    let what = |op: &str| format!("{op} n={n} c={c} hw={hw} mean={mean} {path}");
    let eps = 1e-5;
    let len = n * c * hw;
    let (x32, x64) = rand_pair(seed, len, mean - spread, mean + spread);
    let (g32, g64) = rand_pair(seed + 1, c, 0.5, 1.5);
    let (b32, b64) = rand_pair(seed + 2, c, -1.0, 1.0);
    let (dy32, dy64) = rand_pair(seed + 3, len, -1.0, 1.0);

    let (mut y32, mut m32, mut s32) = (vec![f32::NAN; len], vec![f32::NAN; c], vec![f32::NAN; c]);
    let (mut y64, mut m64, mut s64) = (vec![f64::NAN; len], vec![f64::NAN; c], vec![f64::NAN; c]);
    batchnorm2d_forward_train(
        n, c, hw, &x32, &g32, &b32, eps, &mut y32, &mut m32, &mut s32,
    );
    batchnorm2d_forward_train(
        n, c, hw, &x64, &g64, &b64, eps, &mut y64, &mut m64, &mut s64,
    );
    assert_close(&what("bn fwd y"), &y32, &y64);
    assert_close(&what("bn fwd mean"), &m32, &m64);
    assert_close(&what("bn fwd invstd"), &s32, &s64);

    // An independent two-pass f64 computation of the statistics.
    for ch in 0..c {
        let vals: Vec<f64> = (0..n)
            .flat_map(|i| x64[(i * c + ch) * hw..(i * c + ch + 1) * hw].to_vec())
            .collect();
        let mu = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / vals.len() as f64;
        assert!(
            (m64[ch] - mu).abs() <= 1e-12 * mu.abs().max(1.0),
            "{}",
            what("bn mean")
        );
        let is = 1.0 / (var + eps).sqrt();
        assert!(
            (s64[ch] - is).abs() <= 1e-9 * is,
            "{}: {} vs {is}",
            what("bn invstd"),
            s64[ch]
        );
    }

    let (mut dx32, mut dg32, mut db32) =
        (vec![f32::NAN; len], vec![f32::NAN; c], vec![f32::NAN; c]);
    let (mut dx64, mut dg64, mut db64) =
        (vec![f64::NAN; len], vec![f64::NAN; c], vec![f64::NAN; c]);
    batchnorm2d_backward(
        n, c, hw, &x32, &g32, &m32, &s32, &dy32, &mut dx32, &mut dg32, &mut db32,
    );
    batchnorm2d_backward(
        n, c, hw, &x64, &g64, &m64, &s64, &dy64, &mut dx64, &mut dg64, &mut db64,
    );
    assert_close(&what("bn bwd dx"), &dx32, &dx64);
    assert_close(&what("bn bwd dgamma"), &dg32, &dg64);
    assert_close(&what("bn bwd dbeta"), &db32, &db64);

    let (mut rm32, mut rv32) = (vec![0.5f32; c], vec![2.0f32; c]);
    let (mut rm64, mut rv64) = (vec![0.5f64; c], vec![2.0f64; c]);
    batchnorm2d_update_running(&m32, &s32, eps, n * hw, 0.1, &mut rm32, &mut rv32);
    batchnorm2d_update_running(&m64, &s64, eps, n * hw, 0.1, &mut rm64, &mut rv64);
    assert_close(&what("bn running mean"), &rm32, &rm64);
    assert_close(&what("bn running var"), &rv32, &rv64);

    let mut ye32 = vec![f32::NAN; len];
    let mut ye64 = vec![f64::NAN; len];
    batchnorm2d_forward_eval(n, c, hw, &x32, &g32, &b32, &rm32, &rv32, eps, &mut ye32);
    batchnorm2d_forward_eval(n, c, hw, &x64, &g64, &b64, &rm64, &rv64, eps, &mut ye64);
    assert_close(&what("bn eval y"), &ye32, &ye64);

    // Fused batch norm + relu: against relu of the plain op's f64 output (forward), and the
    // plain f64 backward of `dz · mask` (backward). The mask is the f32 op's own output
    // `z32 > 0` so that values within rounding of 0 cannot flip it between the two.
    let relu64 = |v: &[f64]| v.iter().map(|&v| v.max(0.0)).collect::<Vec<f64>>();
    let (mut z32, mut saved32) = (vec![f32::NAN; len], BnSaved::new());
    let (mut z64, mut saved64) = (vec![f64::NAN; len], BnSaved::new());
    batchnorm2d_relu_forward_train(n, c, hw, &x32, &g32, &b32, eps, &mut z32, &mut saved32);
    batchnorm2d_relu_forward_train(n, c, hw, &x64, &g64, &b64, eps, &mut z64, &mut saved64);
    assert_close(&what("bn+relu fwd z"), &z32, &relu64(&y64));
    assert!(
        rel_err64(&z64, &relu64(&y64)) <= 1e-12,
        "{}",
        what("bn+relu f64 fwd")
    );
    assert_eq!(saved32.mean(), &m32[..], "{}", what("bn+relu mean"));
    assert_eq!(saved32.invstd(), &s32[..], "{}", what("bn+relu invstd"));
    let reference = |mask: &[bool]| {
        let dy: Vec<f64> = dy64
            .iter()
            .zip(mask)
            .map(|(&d, &m)| if m { d } else { 0.0 })
            .collect();
        let (mut dx, mut dg, mut db) = (vec![f64::NAN; len], vec![f64::NAN; c], vec![f64::NAN; c]);
        batchnorm2d_backward(
            n, c, hw, &x64, &g64, &m64, &s64, &dy, &mut dx, &mut dg, &mut db,
        );
        (dx, dg, db)
    };
    let mask32: Vec<bool> = z32.iter().map(|&z| z > 0.0).collect();
    let (rdx, rdg, rdb) = reference(&mask32);
    let (mut dx32, mut dg32, mut db32) =
        (vec![f32::NAN; len], vec![f32::NAN; c], vec![f32::NAN; c]);
    batchnorm2d_relu_backward(
        n, c, hw, &x32, &g32, &saved32, &dy32, &mut dx32, &mut dg32, &mut db32,
    );
    assert_close(&what("bn+relu bwd dx"), &dx32, &rdx);
    assert_close(&what("bn+relu bwd dgamma"), &dg32, &rdg);
    assert_close(&what("bn+relu bwd dbeta"), &db32, &rdb);
    // In place: the same bits.
    let (mut inplace, mut dg2, mut db2) = (dy32.clone(), vec![f32::NAN; c], vec![f32::NAN; c]);
    batchnorm2d_relu_backward_in_place(
        n,
        c,
        hw,
        &x32,
        &g32,
        &saved32,
        &mut inplace,
        &mut dg2,
        &mut db2,
    );
    assert_eq!(inplace, dx32, "{}", what("bn+relu in place dx"));
    assert_eq!(
        (dg2, db2),
        (dg32, db32),
        "{}",
        what("bn+relu in place param grads")
    );
    let mask64: Vec<bool> = z64.iter().map(|&z| z > 0.0).collect();
    let (rdx, rdg, rdb) = reference(&mask64);
    let (mut dx64, mut dg64, mut db64) =
        (vec![f64::NAN; len], vec![f64::NAN; c], vec![f64::NAN; c]);
    batchnorm2d_relu_backward(
        n, c, hw, &x64, &g64, &saved64, &dy64, &mut dx64, &mut dg64, &mut db64,
    );
    for (name, a, b) in [
        ("dx", &dx64, &rdx),
        ("dgamma", &dg64, &rdg),
        ("dbeta", &db64, &rdb),
    ] {
        assert!(
            rel_err64(a, b) <= 1e-10,
            "{}",
            what(&format!("bn+relu f64 bwd {name}"))
        );
    }
    let (mut ze32, mut ze64) = (vec![f32::NAN; len], vec![f64::NAN; len]);
    batchnorm2d_relu_forward_eval(n, c, hw, &x32, &g32, &b32, &rm32, &rv32, eps, &mut ze32);
    batchnorm2d_relu_forward_eval(n, c, hw, &x64, &g64, &b64, &rm64, &rv64, eps, &mut ze64);
    assert_close(&what("bn+relu eval z"), &ze32, &relu64(&ye64));
}

#[test]
fn batchnorm2d_f32_matches_f64() {
    on_every_path(|path| {
        check_batchnorm(3, 5, 7 * 9, 0.3, 2.0, 20_000, path);
        check_batchnorm(1, 3, 13, -1.0, 1.0, 20_100, path);
        check_batchnorm(128, 64, 4, 0.0, 3.0, 20_200, path); // VGG's last BN shape-like
        check_batchnorm(16, 6, 33 * 17, 5.0, 0.5, 20_300, path);
        check_batchnorm(300, 3, 1, 0.5, 1.0, 20_400, path); // 1x1 planes: several flushes
        check_batchnorm(4, 40, 16 * 16, -0.2, 1.0, 20_500, path); // several channel blocks
    });
}

/// A large reduction (262144 elements per channel) with |mean| ≫ std: naive f32 sums or a
/// one-pass E[x²] - E[x]² in f32 would be off by far more than the tolerance.
#[test]
fn batchnorm2d_large_reduction_with_large_mean() {
    on_every_path(|path| check_batchnorm(64, 1, 64 * 64, 1000.0, 2.0, 21_000, path));
}

/// Running statistics by hand: momentum 0.1, unbiased variance over count = N·HW.
#[test]
fn batchnorm2d_running_update_hand_computed() {
    // x as [N=2, C=2, HW=2]: channel 0 holds {1, 2, 3, 4} (mean 2.5, biased var 1.25,
    // unbiased 5/3); channel 1 holds {2, 2, 2, 6} (mean 3, biased var 3, unbiased 4).
    let x = [1.0, 2.0, 2.0, 2.0, 3.0, 4.0, 2.0, 6.0];
    let eps = 1e-5;
    let expected_mean = [0.9 * 0.0 + 0.1 * 2.5, 0.9 * 1.0 + 0.1 * 3.0];
    let expected_var = [0.9 * 1.0 + 0.1 * (5.0 / 3.0), 0.9 * 0.5 + 0.1 * 4.0];
    let gamma = [1.0, 1.0];
    let beta = [0.0, 0.0];

    let (mut y, mut mean, mut invstd) = ([0f64; 8], [0f64; 2], [0f64; 2]);
    batchnorm2d_forward_train(
        2,
        2,
        2,
        &x,
        &gamma,
        &beta,
        eps,
        &mut y,
        &mut mean,
        &mut invstd,
    );
    assert_eq!(mean, [2.5, 3.0]);
    let (mut rm, mut rv) = ([0.0, 1.0], [1.0, 0.5]);
    batchnorm2d_update_running(&mean, &invstd, eps, 4, 0.1, &mut rm, &mut rv);
    for ch in 0..2 {
        assert!(
            (rm[ch] - expected_mean[ch]).abs() < 1e-12,
            "f64 running mean {rm:?}"
        );
        assert!(
            (rv[ch] - expected_var[ch]).abs() < 1e-10,
            "f64 running var {rv:?}"
        );
    }
    // Normalized with the *biased* variance: channel 0, x = 1 → (1 - 2.5)/sqrt(1.25 + eps).
    assert!((y[0] - (-1.5 / (1.25f64 + eps).sqrt())).abs() < 1e-12);

    let x32 = x.map(|v| v as f32);
    let (mut y32, mut mean32, mut invstd32) = ([0f32; 8], [0f32; 2], [0f32; 2]);
    batchnorm2d_forward_train(
        2,
        2,
        2,
        &x32,
        &[1.0; 2],
        &[0.0; 2],
        eps,
        &mut y32,
        &mut mean32,
        &mut invstd32,
    );
    let (mut rm32, mut rv32) = ([0.0f32, 1.0], [1.0f32, 0.5]);
    batchnorm2d_update_running(&mean32, &invstd32, eps, 4, 0.1, &mut rm32, &mut rv32);
    for ch in 0..2 {
        assert!(
            (rm32[ch] as f64 - expected_mean[ch]).abs() < 1e-6,
            "f32 running mean {rm32:?}"
        );
        assert!(
            (rv32[ch] as f64 - expected_var[ch]).abs() < 1e-5,
            "f32 running var {rv32:?}"
        );
    }

    // Eval mode uses exactly the running statistics.
    let mut ye = [0f64; 8];
    batchnorm2d_forward_eval(
        2,
        2,
        2,
        &x,
        &[2.0, 0.5],
        &[0.1, -0.2],
        &rm,
        &rv,
        eps,
        &mut ye,
    );
    for (i, &v) in ye.iter().enumerate() {
        let ch = (i / 2) % 2;
        let want = (x[i] - rm[ch]) / (rv[ch] + eps).sqrt() * [2.0, 0.5][ch] + [0.1, -0.2][ch];
        assert!((v - want).abs() < 1e-12, "eval y[{i}] {v} vs {want}");
    }
}

#[test]
fn relu_f32_matches_f64() {
    on_every_path(|_| {
        // Large enough to be split into parallel chunks, odd length for the tails.
        for (t, &len) in [13usize, 1 << 20 | 3].iter().enumerate() {
            let (x32, x64) = rand_pair(30_000 + t as u64, len, -1.0, 1.0);
            let (dy32, dy64) = rand_pair(30_100 + t as u64, len, -1.0, 1.0);
            let (mut y32, mut y64) = (vec![f32::NAN; len], vec![f64::NAN; len]);
            relu_forward(&x32, &mut y32);
            relu_forward(&x64, &mut y64);
            assert_close("relu fwd", &y32, &y64);
            assert!(
                y64.iter().zip(&x64).all(|(&y, &x)| y == x.max(0.0)),
                "relu fwd definition"
            );
            let (mut dx32, mut dx64) = (vec![f32::NAN; len], vec![f64::NAN; len]);
            relu_backward(&y32, &dy32, &mut dx32);
            relu_backward(&y64, &dy64, &mut dx64);
            assert_close("relu bwd", &dx32, &dx64);
            let by_def = x64
                .iter()
                .zip(&dy64)
                .map(|(&x, &d)| if x > 0.0 { d } else { 0.0 });
            assert!(dx64.iter().copied().eq(by_def), "relu bwd definition");
        }
    });
}

#[test]
fn maxpool2d_f32_matches_f64_and_definition() {
    let shapes = [
        // Quarter-vector rows four at a time (AVX2: 4 wide; Portable16: 8 wide), with rows
        // left over.
        Pool2dGeom {
            n: 3,
            c: 1,
            h: 6,
            w: 4,
            k: 2,
            stride: 2,
        },
        Pool2dGeom {
            n: 1,
            c: 3,
            h: 10,
            w: 8,
            k: 2,
            stride: 2,
        },
        // Half-vector rows two at a time, across planes of odd height/2 (AVX2, Portable16).
        Pool2dGeom {
            n: 3,
            c: 2,
            h: 6,
            w: 8,
            k: 2,
            stride: 2,
        },
        Pool2dGeom {
            n: 2,
            c: 3,
            h: 10,
            w: 16,
            k: 2,
            stride: 2,
        },
        // VGG's first pool: vector rows
        Pool2dGeom {
            n: 2,
            c: 3,
            h: 32,
            w: 32,
            k: 2,
            stride: 2,
        },
        // 10 outputs per row: partial vectors
        Pool2dGeom {
            n: 3,
            c: 2,
            h: 6,
            w: 20,
            k: 2,
            stride: 2,
        },
        // odd height: one plane at a time, vector rows
        Pool2dGeom {
            n: 2,
            c: 5,
            h: 7,
            w: 36,
            k: 2,
            stride: 2,
        },
        // 2 outputs per row: the scalar loop
        Pool2dGeom {
            n: 5,
            c: 4,
            h: 4,
            w: 4,
            k: 2,
            stride: 2,
        },
        // 4 outputs per row
        Pool2dGeom {
            n: 1,
            c: 3,
            h: 8,
            w: 8,
            k: 2,
            stride: 2,
        },
        Pool2dGeom {
            n: 64,
            c: 32,
            h: 16,
            w: 16,
            k: 2,
            stride: 2,
        },
        Pool2dGeom {
            n: 3,
            c: 5,
            h: 9,
            w: 7,
            k: 2,
            stride: 2,
        },
        // Even height, odd width: stacked planes whose rows are wider than 2·ow.
        Pool2dGeom {
            n: 4,
            c: 6,
            h: 8,
            w: 7,
            k: 2,
            stride: 2,
        },
        Pool2dGeom {
            n: 2,
            c: 3,
            h: 8,
            w: 11,
            k: 3,
            stride: 2,
        },
    ];
    on_every_path(|path| {
        for (t, g) in shapes.iter().enumerate() {
            let len = g.n * g.c * g.h * g.w;
            let out = g.n * g.c * g.out_h() * g.out_w();
            let (mut x32, mut x64) = rand_pair(40_000 + t as u64, len, -1.0, 1.0);
            // Ties (the first in window order wins) and a NaN (propagates).
            for i in (0..len - 1).step_by(7) {
                x32[i] = x32[i + 1];
                x64[i] = x64[i + 1];
            }
            x32[len / 2] = f32::NAN;
            x64[len / 2] = f64::NAN;
            let (dy32, dy64) = rand_pair(40_100 + t as u64, out, -1.0, 1.0);
            let (mut y32, mut a32) = (vec![f32::NAN; out], vec![u8::MAX; out]);
            let (mut y64, mut a64) = (vec![f64::NAN; out], vec![u8::MAX; out]);
            maxpool2d_forward(g, &x32, &mut y32, &mut a32);
            maxpool2d_forward(g, &x64, &mut y64, &mut a64);
            assert_eq!(a32, a64, "pool argmax f32 vs f64, {g:?} {path}");
            // By definition: the first maximum of each window in row-major order (a NaN
            // wins), at the recorded window position; f32 gives exactly the f32 inputs.
            let (oh, ow) = (g.out_h(), g.out_w());
            for (o, (&v, &v32)) in y64.iter().zip(&y32).enumerate() {
                let (plane, r, c) = (o / (oh * ow), (o / ow) % oh, o % ow);
                let xp = &x64[plane * g.h * g.w..(plane + 1) * g.h * g.w];
                let at = |k: usize| xp[(r * g.stride + k / g.k) * g.w + c * g.stride + k % g.k];
                let mut best = 0;
                for k in 1..g.k * g.k {
                    if at(k) > at(best) || (at(k).is_nan() && !at(best).is_nan()) {
                        best = k;
                    }
                }
                assert_eq!(
                    a64[o] as usize, best,
                    "pool argmax at output {o}, {g:?} {path}"
                );
                assert!(
                    v.to_bits() == at(best).to_bits(),
                    "pool max at output {o}, {path}"
                );
                assert!(
                    v32.to_bits() == (v as f32).to_bits(),
                    "pool f32 max at {o}, {path}"
                );
            }
            let (mut dx32, mut dx64) = (vec![f32::NAN; len], vec![f64::NAN; len]);
            maxpool2d_backward(g, &dy32, &a32, &mut dx32);
            maxpool2d_backward(g, &dy64, &a64, &mut dx64);
            // By definition: the sum of the dy routed to each input.
            let mut want = vec![0f64; len];
            for o in 0..out {
                let (plane, r, c) = (o / (oh * ow), (o / ow) % oh, o % ow);
                let k = a64[o] as usize;
                want[plane * g.h * g.w
                    + (r * g.stride + k / g.k) * g.w
                    + c * g.stride
                    + k % g.k] += dy64[o];
            }
            assert_eq!(dx64, want, "pool bwd definition, {g:?} {path}");
            assert_close(&format!("pool bwd {g:?} {path}"), &dx32, &dx64);
        }
    });
}

/// PyTorch: the first maximum (in row-major window order) wins a tie.
#[test]
fn maxpool2d_ties_pick_first() {
    let g = Pool2dGeom {
        n: 1,
        c: 1,
        h: 2,
        w: 4,
        k: 2,
        stride: 2,
    };
    let x = [1.0f32, 3.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0];
    let (mut y, mut a) = ([0f32; 2], [0u8; 2]);
    maxpool2d_forward(&g, &x, &mut y, &mut a);
    assert_eq!(y, [3.0, 0.0]);
    assert_eq!(a, [1, 0]); // window positions: top-right, top-left
    let mut dx = [f32::NAN; 8];
    maxpool2d_backward(&g, &[1.0, 2.0], &a, &mut dx);
    assert_eq!(dx, [0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
}

#[test]
fn linear_f32_matches_f64() {
    let _guard = thread_lock();
    for threads in [1, 2] {
        set_num_threads(threads);
        for (t, &(n, d_in, d_out)) in [(128, 512, 10), (7, 33, 17), (1, 9, 5)].iter().enumerate() {
            let seed = 50_000 + 10 * t as u64;
            let (x32, x64) = rand_pair(seed, n * d_in, -1.0, 1.0);
            let (w32, w64) = rand_pair(seed + 1, d_out * d_in, -1.0, 1.0);
            let (b32, b64) = rand_pair(seed + 2, d_out, -1.0, 1.0);
            let (dy32, dy64) = rand_pair(seed + 3, n * d_out, -1.0, 1.0);
            let (mut y32, mut y64) = (vec![f32::NAN; n * d_out], vec![f64::NAN; n * d_out]);
            linear_forward(n, d_in, d_out, &x32, &w32, Some(&b32), &mut y32);
            linear_forward(n, d_in, d_out, &x64, &w64, Some(&b64), &mut y64);
            assert_close("linear fwd", &y32, &y64);
            // By definition, y[i, o] = b[o] + Σ x[i, :]·w[o, :].
            for i in 0..n {
                for o in 0..d_out {
                    let want = b64[o]
                        + (0..d_in)
                            .map(|j| x64[i * d_in + j] * w64[o * d_in + j])
                            .sum::<f64>();
                    assert!(
                        (y64[i * d_out + o] - want).abs() < 1e-10,
                        "linear fwd definition"
                    );
                }
            }
            let (mut dx32, mut dw32, mut db32) = (
                vec![f32::NAN; x32.len()],
                vec![f32::NAN; w32.len()],
                vec![f32::NAN; d_out],
            );
            let (mut dx64, mut dw64, mut db64) = (
                vec![f64::NAN; x64.len()],
                vec![f64::NAN; w64.len()],
                vec![f64::NAN; d_out],
            );
            linear_backward(
                n,
                d_in,
                d_out,
                &x32,
                &w32,
                &dy32,
                Some(&mut dx32),
                &mut dw32,
                Some(&mut db32),
            );
            linear_backward(
                n,
                d_in,
                d_out,
                &x64,
                &w64,
                &dy64,
                Some(&mut dx64),
                &mut dw64,
                Some(&mut db64),
            );
            assert_close("linear dx", &dx32, &dx64);
            assert_close("linear dw", &dw32, &dw64);
            assert_close("linear db", &db32, &db64);
        }
    }
    set_num_threads(2);
}

#[test]
fn cross_entropy_f32_matches_f64_and_definition() {
    for (t, &(n, classes, scale)) in [(128, 10, 5.0), (3, 7, 50.0), (1, 2, 1.0)]
        .iter()
        .enumerate()
    {
        let seed = 60_000 + 10 * t as u64;
        let (l32, l64) = rand_pair(seed, n * classes, -scale, scale);
        let labels: Vec<u32> = random_vec(seed + 1, n, 0.0, classes as f64)
            .iter()
            .map(|&u| (u as u32).min(classes as u32 - 1))
            .collect();
        let (mut p32, mut p64) = (vec![f32::NAN; n * classes], vec![f64::NAN; n * classes]);
        let loss32 = cross_entropy_forward(n, classes, &l32, &labels, 0.0, &mut p32);
        let loss64 = cross_entropy_forward(n, classes, &l64, &labels, 0.0, &mut p64);
        assert!(
            ((loss32 as f64 - loss64) / loss64).abs() < TOL,
            "ce loss {loss32} vs {loss64}"
        );
        assert_close("ce probs", &p32, &p64);
        // Definition: mean of -log(softmax(l)[label]), via log-sum-exp written out here.
        let mut want = 0.0;
        for i in 0..n {
            let row = &l64[i * classes..(i + 1) * classes];
            let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + row.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            want += lse - row[labels[i] as usize];
        }
        want /= n as f64;
        assert!(
            (loss64 - want).abs() < 1e-12 * want.abs().max(1.0),
            "ce definition"
        );
        let (mut d32, mut d64) = (vec![f32::NAN; n * classes], vec![f64::NAN; n * classes]);
        cross_entropy_backward(n, classes, &p32, &labels, 0.0, 0.7, &mut d32);
        cross_entropy_backward(n, classes, &p64, &labels, 0.0, 0.7, &mut d64);
        assert_close("ce dlogits", &d32, &d64);
    }
}

/// With a fixed thread count, results must not depend on thread timing: repeated runs give
/// bit-identical outputs (VGG-like shapes that use every parallel path).
#[test]
fn conv_and_batchnorm_are_deterministic_with_two_threads() {
    let _guard = thread_lock();
    set_num_threads(2);
    for (t, g) in [
        Conv2dGeom::new(16, 32, 16, 16, 64, (3, 3), 1, 1),
        Conv2dGeom::new(64, 64, 4, 4, 64, (3, 3), 1, 1),
    ]
    .iter()
    .enumerate()
    {
        let seed = 70_000 + 10 * t as u64;
        let ylen = g.n * g.c_out * g.out_h() * g.out_w();
        let (x, _) = rand_pair(seed, g.n * g.c_in * g.h * g.w, -1.0, 1.0);
        let (w, _) = rand_pair(seed + 1, g.c_out * g.c_in * 9, -1.0, 1.0);
        let (dy, _) = rand_pair(seed + 2, ylen, -1.0, 1.0);
        let run = || {
            let mut y = vec![0f32; ylen];
            let mut dx = vec![0f32; x.len()];
            let (mut dw, mut db) = (vec![0f32; w.len()], vec![0f32; g.c_out]);
            conv2d_forward(g, &x, &w, None, &mut y);
            conv2d_backward_data(g, &dy, &w, &mut dx);
            conv2d_backward_weight(g, &x, &dy, &mut dw, Some(&mut db));
            let (c, hw) = (g.c_out, g.out_h() * g.out_w());
            let (gamma, beta) = (vec![1.5f32; c], vec![0.5f32; c]);
            let mut z = vec![0f32; ylen];
            let (mut m, mut s) = (vec![0f32; c], vec![0f32; c]);
            batchnorm2d_forward_train(g.n, c, hw, &y, &gamma, &beta, 1e-5, &mut z, &mut m, &mut s);
            let mut dz = vec![0f32; ylen];
            let (mut dg, mut dbt) = (vec![0f32; c], vec![0f32; c]);
            batchnorm2d_backward(
                g.n, c, hw, &y, &gamma, &m, &s, &dy, &mut dz, &mut dg, &mut dbt,
            );
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<u32>>();
            [y, dx, dw, db, z, m, s, dz, dg, dbt].map(|v| bits(&v))
        };
        let first = run();
        for _ in 0..3 {
            assert!(
                run() == first,
                "{g:?}: results differ between identical runs"
            );
        }
    }
    set_num_threads(2);
}

/// Fused batch norm + relu + 2x2 pool against the three ops chained: the same bits forward
/// (the chained ops compute each value the same way), and backward against the chained f64
/// backward (pool backward, relu mask, batch-norm backward), on every SIMD path; the
/// in-place backward gives the same bits as the other.
#[test]
fn batchnorm2d_relu_maxpool2d_matches_the_chained_ops() {
    // (n, c, h, w): VGG's first block, partial vectors, narrow rows (scalar with AVX2),
    // 2x2 planes, several channel blocks, an odd number of outputs per row.
    let shapes = [
        (2, 3, 32, 32),
        (3, 4, 6, 20),
        (4, 5, 4, 4),
        (5, 3, 2, 2),
        (2, 40, 8, 8),
        (3, 2, 16, 6),
        // Rows of half a vector (AVX2: 8 wide, Portable16: 16 wide) are taken two at a time;
        // an odd row count leaves one alone.
        (3, 2, 6, 8),
        (2, 3, 10, 16),
        // Rows of a quarter vector (AVX2: 4 wide, Portable16: 8 wide) four at a time, and
        // the rows left over.
        (2, 3, 8, 4),
        (2, 2, 12, 8),
        (3, 2, 6, 4),
    ];
    let eps = 1e-5;
    on_every_path(|path| {
        for (t, &(n, c, h, w)) in shapes.iter().enumerate() {
            let what = |op: &str| format!("{op} n={n} c={c} {h}x{w} {path}");
            let (len, out) = (n * c * h * w, n * c * h * w / 4);
            let seed = 50_000 + 10 * t as u64;
            let (x32, x64) = rand_pair(seed, len, -1.0, 2.0);
            let (g32, g64) = rand_pair(seed + 1, c, 0.5, 1.5);
            let (b32, b64) = rand_pair(seed + 2, c, -0.5, 0.5);
            let (dp32, dp64) = rand_pair(seed + 3, out, -1.0, 1.0);
            let geom = Pool2dGeom {
                n,
                c,
                h,
                w,
                k: 2,
                stride: 2,
            };

            // Chained, f32 and f64.
            let chained = |x: &[f64], g: &[f64], b: &[f64]| {
                let (mut z, mut saved) = (vec![f64::NAN; len], BnSaved::new());
                batchnorm2d_relu_forward_train(n, c, h * w, x, g, b, eps, &mut z, &mut saved);
                let (mut p, mut a) = (vec![f64::NAN; out], vec![u8::MAX; out]);
                maxpool2d_forward(&geom, &z, &mut p, &mut a);
                (z, saved, p, a)
            };
            let (z64, s64, p64, a64) = chained(&x64, &g64, &b64);
            let (mut z32, mut s32) = (vec![f32::NAN; len], BnSaved::new());
            batchnorm2d_relu_forward_train(n, c, h * w, &x32, &g32, &b32, eps, &mut z32, &mut s32);
            let (mut pc32, mut ac32) = (vec![f32::NAN; out], vec![u8::MAX; out]);
            maxpool2d_forward(&geom, &z32, &mut pc32, &mut ac32);

            // Fused.
            let (mut p32, mut a32, mut sf32) =
                (vec![f32::NAN; out], vec![u8::MAX; out], BnSaved::new());
            batchnorm2d_relu_maxpool2d_forward_train(
                n, c, h, w, &x32, &g32, &b32, eps, &mut p32, &mut a32, &mut sf32,
            );
            assert_eq!(p32, pc32, "{}", what("fused fwd p (f32)"));
            assert_eq!(a32, ac32, "{}", what("fused fwd argmax (f32)"));
            assert_eq!(
                (sf32.mean(), sf32.invstd()),
                (s32.mean(), s32.invstd()),
                "{}",
                what("stats")
            );
            let (mut pf64, mut af64, mut sf64) =
                (vec![f64::NAN; out], vec![u8::MAX; out], BnSaved::new());
            batchnorm2d_relu_maxpool2d_forward_train(
                n, c, h, w, &x64, &g64, &b64, eps, &mut pf64, &mut af64, &mut sf64,
            );
            assert_eq!(pf64, p64, "{}", what("fused fwd p (f64)"));
            assert_eq!(af64, a64, "{}", what("fused fwd argmax (f64)"));
            assert_close(&what("fused fwd f32 vs f64"), &p32, &p64);

            // Backward reference: chained f64 with the f32 op's own window positions and
            // relu mask (so values within rounding of a tie or of 0 cannot differ).
            let mut dz = vec![f64::NAN; len];
            maxpool2d_backward(&geom, &dp64, &a32, &mut dz);
            for (d, &z) in dz.iter_mut().zip(&z32) {
                if z <= 0.0 {
                    *d = 0.0;
                }
            }
            let (mut rdx, mut rdg, mut rdb) =
                (vec![f64::NAN; len], vec![f64::NAN; c], vec![f64::NAN; c]);
            let (m64, is64) = (s64.mean().to_vec(), s64.invstd().to_vec());
            batchnorm2d_backward(
                n,
                c,
                h * w,
                &x64,
                &g64,
                &m64,
                &is64,
                &dz,
                &mut rdx,
                &mut rdg,
                &mut rdb,
            );
            let (mut dx32, mut dg32, mut db32) =
                (vec![f32::NAN; len], vec![f32::NAN; c], vec![f32::NAN; c]);
            batchnorm2d_relu_maxpool2d_backward(
                n, c, h, w, &x32, &g32, &sf32, &dp32, &a32, &mut dx32, &mut dg32, &mut db32,
            );
            assert_close(&what("fused bwd dx"), &dx32, &rdx);
            assert_close(&what("fused bwd dgamma"), &dg32, &rdg);
            assert_close(&what("fused bwd dbeta"), &db32, &rdb);
            let (mut inplace, mut dg2, mut db2) =
                (x32.clone(), vec![f32::NAN; c], vec![f32::NAN; c]);
            batchnorm2d_relu_maxpool2d_backward_in_place(
                n,
                c,
                h,
                w,
                &mut inplace,
                &g32,
                &sf32,
                &dp32,
                &a32,
                &mut dg2,
                &mut db2,
            );
            assert_eq!(inplace, dx32, "{}", what("fused bwd in place dx"));
            assert_eq!(
                (dg2, db2),
                (dg32, db32),
                "{}",
                what("fused bwd in place param grads")
            );
            // f64 fused backward against the f64 chain (exact masks and positions in f64).
            let mut dz = vec![f64::NAN; len];
            maxpool2d_backward(&geom, &dp64, &a64, &mut dz);
            for (d, &z) in dz.iter_mut().zip(&z64) {
                if z <= 0.0 {
                    *d = 0.0;
                }
            }
            batchnorm2d_backward(
                n,
                c,
                h * w,
                &x64,
                &g64,
                &m64,
                &is64,
                &dz,
                &mut rdx,
                &mut rdg,
                &mut rdb,
            );
            let (mut dx64, mut dg64, mut db64) =
                (vec![f64::NAN; len], vec![f64::NAN; c], vec![f64::NAN; c]);
            batchnorm2d_relu_maxpool2d_backward(
                n, c, h, w, &x64, &g64, &sf64, &dp64, &a64, &mut dx64, &mut dg64, &mut db64,
            );
            for (name, a, b) in [
                ("dx", &dx64, &rdx),
                ("dgamma", &dg64, &rdg),
                ("dbeta", &db64, &rdb),
            ] {
                assert!(
                    rel_err64(a, b) <= 1e-10,
                    "{}",
                    what(&format!("fused f64 bwd {name}"))
                );
            }

            // Eval: against the chain too.
            let (rm32, rv32) = (vec![0.1f32; c], vec![1.5f32; c]);
            let mut ze = vec![f32::NAN; len];
            batchnorm2d_relu_forward_eval(
                n,
                c,
                h * w,
                &x32,
                &g32,
                &b32,
                &rm32,
                &rv32,
                eps,
                &mut ze,
            );
            let (mut pe, mut ae) = (vec![f32::NAN; out], vec![u8::MAX; out]);
            maxpool2d_forward(&geom, &ze, &mut pe, &mut ae);
            let (mut pf, mut af) = (vec![f32::NAN; out], vec![u8::MAX; out]);
            batchnorm2d_relu_maxpool2d_forward_eval(
                n, c, h, w, &x32, &g32, &b32, &rm32, &rv32, eps, &mut pf, &mut af,
            );
            assert_eq!((pf, af), (pe, ae), "{}", what("fused eval"));
        }
    });
}
