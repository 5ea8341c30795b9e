//! The mixed-precision (bf16 operands, f32 accumulation) GEMM against f64 oracles, and the
//! native AVX512_BF16 kernel against its emulation bit for bit.
//!
//! Bound (see `engine/src/gemm/bf16/mod.rs`): with `â`, `b̂` the operands rounded to bf16,
//! every element `c` of `alpha·A·B + beta·C` satisfies
//! `|c - (alpha·Σ â b̂ + beta·c0)| <= (K + ⌈K/KC⌉ + 2)·2^-24·(|alpha|·Σ|â||b̂| + |beta·c0|)`:
//! one f32 rounding per pair step (`⌈K/2⌉` steps of two products, each rounded after each
//! product: K roundings), one per depth block write-back, one for `beta·c0`. Against the
//! f32 operands the bf16 rounding adds `(2u + u²)·|alpha|·Σ|a||b|` with `u = 2^-8`.

use engine::bf16::round_to_bf16;
use engine::gemm::{gemm_bf16, gemm_bf16_with, Bf16Kernel, MatRef};
use engine::simd;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Depth block of the bf16 GEMM (elements).
const KC: usize = 512;

/// (m, n, k): ones, odd K, sizes around the 14×32 tile, the KC = 512 depth block and the
/// MC = 140 row block, narrow outputs (transposed path), VGG-like conv and linear shapes.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 1, 7),
    (2, 3, 1),
    (1, 19, 5),
    (23, 1, 9),
    (14, 32, 512),
    (15, 33, 513),
    (13, 31, 1025),
    (29, 45, 31),
    (141, 47, 255),
    (64, 10, 512),
    (150, 2, 77),
    (64, 300, 27),
    (70, 130, 577),
    (33, 70, 1537),
    (9, 600, 3),
];

struct Case {
    a: Vec<f32>,
    b: Vec<f32>,
    c0: Vec<f32>,
    /// (rs, cs) of A and B.
    sa: (usize, usize),
    sb: (usize, usize),
}

fn matrix(
    rng: &mut ChaCha8Rng,
    rows: usize,
    cols: usize,
    transposed: bool,
) -> (Vec<f32>, (usize, usize)) {
    let data = (0..rows * cols)
        .map(|_| rng.gen_range(-1.0f32..1.0))
        .collect();
    (data, if transposed { (1, rows) } else { (cols, 1) })
}

fn case(rng: &mut ChaCha8Rng, m: usize, n: usize, k: usize, ta: bool, tb: bool) -> Case {
    let (a, sa) = matrix(rng, m, k, ta);
    let (b, sb) = matrix(rng, k, n, tb);
    let c0 = (0..m * n).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    Case { a, b, c0, sa, sb }
}

fn view(data: &[f32], (rs, cs): (usize, usize)) -> MatRef<'_, f32> {
    MatRef { data, rs, cs }
}

fn run(
    kernel: Bf16Kernel,
    threads: usize,
    x: &Case,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
) -> Vec<f32> {
    let mut c = x.c0.clone();
    gemm_bf16_with(
        kernel,
        threads,
        m,
        n,
        k,
        alpha,
        view(&x.a, x.sa),
        view(&x.b, x.sb),
        beta,
        &mut c,
        n,
    );
    c
}

/// Check `got` elementwise against the f64 product of the operands as given (`round`:
/// rounded to bf16 first), with the bound of the module docs.
#[allow(clippy::too_many_arguments)]
fn check_bound(
    x: &Case,
    got: &[f32],
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    beta: f32,
    round: bool,
    what: &str,
) {
    let r = |v: f32| {
        if round {
            round_to_bf16(v) as f64
        } else {
            v as f64
        }
    };
    let gamma = (k + k.div_ceil(KC) + 2) as f64 * 2f64.powi(-24);
    let u = 2f64.powi(-8);
    let rounding = if round { 0.0 } else { 2.0 * u + u * u };
    for i in 0..m {
        for j in 0..n {
            let (mut dot, mut abs) = (0f64, 0f64);
            for p in 0..k {
                let av = r(x.a[i * x.sa.0 + p * x.sa.1]);
                let bv = r(x.b[p * x.sb.0 + j * x.sb.1]);
                dot += av * bv;
                abs += (av * bv).abs();
            }
            let c0 = beta as f64 * x.c0[i * n + j] as f64;
            let want = alpha as f64 * dot + c0;
            let scale = alpha.abs() as f64 * abs + c0.abs();
            let bound = (gamma + rounding) * scale * (1.0 + 4.0 * u) + 1e-30;
            let err = (got[i * n + j] as f64 - want).abs();
            assert!(
                err <= bound,
                "{what} {m}x{n}x{k} alpha {alpha} beta {beta} at ({i},{j}): |{} - {want}| = {err:e} > {bound:e}",
                got[i * n + j]
            );
        }
    }
}

fn kernels() -> Vec<Bf16Kernel> {
    Bf16Kernel::ALL
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
}

#[test]
fn bf16_gemm_is_within_the_accumulation_bound_of_f64_on_rounded_operands() {
    let mut rng = ChaCha8Rng::seed_from_u64(16);
    for kernel in kernels() {
        for &(m, n, k) in SHAPES {
            for (ta, tb, alpha, beta) in [
                (false, false, 1.0, 0.0),
                (true, true, 0.5, 1.0),
                (false, true, 1.0, 1.0),
                (true, false, -2.0, 0.5),
            ] {
                let x = case(&mut rng, m, n, k, ta, tb);
                let got = run(kernel, 2, &x, (m, n, k), alpha, beta);
                check_bound(
                    &x,
                    &got,
                    (m, n, k),
                    alpha,
                    beta,
                    true,
                    &format!("{kernel:?}"),
                );
            }
        }
    }
}

#[test]
fn bf16_gemm_error_against_the_f32_operands_is_the_bf16_rounding_bound() {
    let mut rng = ChaCha8Rng::seed_from_u64(17);
    let kernel = Bf16Kernel::detect();
    for &(m, n, k) in SHAPES {
        let x = case(&mut rng, m, n, k, false, false);
        let got = run(kernel, 1, &x, (m, n, k), 1.0, 1.0);
        check_bound(&x, &got, (m, n, k), 1.0, 1.0, false, &format!("{kernel:?}"));
    }
}

/// The native kernel gives exactly the emulation's bits (packing, conversion, accumulation
/// order, write-back). On a CPU without avx512_bf16 only the emulated path exists: the test
/// then asserts that it is the one selected and says so (the emulation's agreement with the
/// hardware is pinned by the recorded-bits test in `engine/src/bf16.rs`).
#[test]
fn native_bf16_gemm_is_bit_identical_to_the_emulation() {
    if !Bf16Kernel::Native.is_available() {
        assert_eq!(Bf16Kernel::detect(), Bf16Kernel::Emulated);
        eprintln!("no avx512_bf16 on this CPU: only the emulated bf16 GEMM runs here");
        return;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(18);
    for &(m, n, k) in SHAPES {
        for (ta, tb, beta) in [
            (false, false, 0.0),
            (true, true, 1.0),
            (false, true, 1.0),
            (true, false, 0.0),
        ] {
            let x = case(&mut rng, m, n, k, ta, tb);
            let native = run(Bf16Kernel::Native, 2, &x, (m, n, k), 1.0, beta);
            let emulated = run(Bf16Kernel::Emulated, 1, &x, (m, n, k), 1.0, beta);
            for (idx, (a, b)) in native.iter().zip(&emulated).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{m}x{n}x{k} ta {ta} tb {tb} at {idx}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn bf16_gemm_bits_do_not_depend_on_the_thread_count() {
    let mut rng = ChaCha8Rng::seed_from_u64(19);
    let kernel = Bf16Kernel::detect();
    for &(m, n, k) in &[(300, 700, 300), (1100, 30, 200), (64, 4100, 27)] {
        let x = case(&mut rng, m, n, k, false, true);
        let one = run(kernel, 1, &x, (m, n, k), 1.0, 1.0);
        for threads in [2, 3] {
            let many = run(kernel, threads, &x, (m, n, k), 1.0, 1.0);
            assert!(
                one.iter()
                    .zip(&many)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{m}x{n}x{k} threads {threads}"
            );
        }
    }
}

#[test]
fn bf16_gemm_with_beta_zero_overwrites_nan_and_leaves_padding() {
    let (m, n, k, ldc) = (17, 35, 9, 40);
    let a = vec![1.0f32; m * k];
    let b = vec![0.5f32; k * n];
    let mut c = vec![f32::NAN; m * ldc];
    gemm_bf16(
        m,
        n,
        k,
        1.0,
        MatRef::row_major(&a, k),
        MatRef::row_major(&b, n),
        0.0,
        &mut c,
        ldc,
    );
    for i in 0..m {
        assert!(c[i * ldc..i * ldc + n].iter().all(|&v| v == 4.5), "row {i}");
        assert!(
            c[i * ldc + n..(i + 1) * ldc].iter().all(|v| v.is_nan()),
            "padding of row {i} touched"
        );
    }
}

#[test]
fn bf16_kernel_follows_the_simd_level() {
    let want = if simd::level() == simd::SimdLevel::Avx512 && simd::bf16_supported() {
        Bf16Kernel::Native
    } else {
        Bf16Kernel::Emulated
    };
    assert_eq!(Bf16Kernel::detect(), want);
}

/// B in the f32 SGEMM's panel layout (as the Winograd transforms write it), for the layout of
/// every f32 kernel this CPU has: within the bound of the rounded-operand oracle, equal to
/// the strided-B product bit for bit, native equal to emulated; the NaN padding columns of
/// the f32 panels never reach C.
#[test]
fn bf16_gemm_on_f32_panels_equals_the_strided_product() {
    use engine::gemm::{gemm_bf16_packed_b, Kernel, PackedLayout, Panels};
    let mut rng = ChaCha8Rng::seed_from_u64(20);
    for &(m, n, k) in &[
        (1, 1, 1),
        (15, 33, 7),
        (29, 70, 513),
        (64, 100, 600),
        (130, 17, 255),
    ] {
        let x = case(&mut rng, m, n, k, false, false);
        for f32_kernel in Kernel::ALL.into_iter().filter(|k| k.is_available()) {
            let layout = PackedLayout::of(f32_kernel);
            let pb = Panels::b(layout, n, k);
            let mut panels = vec![f32::NAN; pb.len()];
            for j in 0..n {
                for p in 0..k {
                    panels[pb.index(j, p)] = x.b[p * n + j];
                }
            }
            for kernel in kernels() {
                let strided = run(kernel, 1, &x, (m, n, k), 1.0, 1.0);
                let mut c = x.c0.clone();
                let a = MatRef::row_major(&x.a, k);
                gemm_bf16_packed_b(kernel, layout, m, n, k, a, &panels, 1.0, &mut c, n);
                check_bound(
                    &x,
                    &c,
                    (m, n, k),
                    1.0,
                    1.0,
                    true,
                    &format!("{kernel:?} panels"),
                );
                for (idx, (a, b)) in c.iter().zip(&strided).enumerate() {
                    assert_eq!(
                        a.to_bits(),
                        b.to_bits(),
                        "{kernel:?} {f32_kernel:?} {m}x{n}x{k} at {idx}"
                    );
                }
            }
        }
    }
}
