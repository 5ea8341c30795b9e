//! Central-difference gradient checks (f64) of every op's backward against its forward,
//! through `L = Σ r ⊙ op(inputs)` with a fixed random `r` (so `dL/dy = r`).
use engine::gradcheck::{check_gradients, dot, random_vec, GradcheckConfig};
use engine::ops::*;

fn check(
    what: &str,
    names: &[&str],
    values: &mut [Vec<f64>],
    analytic: &[Vec<f64>],
    loss: impl FnMut(&[Vec<f64>]) -> f64,
) {
    let report = check_gradients(names, values, analytic, &GradcheckConfig::default(), loss)
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    for input in &report.inputs {
        assert!(
            input.checked > 0,
            "{what}: nothing checked for {}",
            input.name
        );
    }
}

#[test]
fn gradcheck_conv2d() {
    let shapes = [
        Conv2dGeom::new(2, 3, 5, 7, 4, (3, 3), 1, 1), // odd, rectangular image
        Conv2dGeom::new(1, 2, 6, 5, 3, (3, 3), 2, 0), // batch 1, stride 2, no padding
        Conv2dGeom::new(3, 2, 7, 4, 2, (1, 1), 1, 0), // pointwise (no im2col)
        Conv2dGeom::new(2, 1, 9, 8, 2, (5, 5), 2, 2), // 5x5, stride 2, padding 2
        Conv2dGeom::new(1, 3, 4, 6, 5, (3, 5), 1, 2), // rectangular kernel, padding 2
        Conv2dGeom::new(2, 2, 3, 3, 3, (3, 3), 1, 2), // padding larger than needed: output 5x5
        Conv2dGeom::new(1, 2, 5, 5, 2, (1, 1), 2, 1), // 1x1 with stride and padding (im2col path)
    ];
    for (t, g) in shapes.iter().enumerate() {
        let seed = 100 * t as u64;
        let (k, p) = (g.c_in * g.kh * g.kw, g.out_h() * g.out_w());
        let x = random_vec(seed, g.n * g.c_in * g.h * g.w, -1.0, 1.0);
        let w = random_vec(seed + 1, g.c_out * k, -1.0, 1.0);
        let b = random_vec(seed + 2, g.c_out, -1.0, 1.0);
        let r = random_vec(seed + 3, g.n * g.c_out * p, -1.0, 1.0);
        for with_bias in [true, false] {
            let mut dx = vec![f64::NAN; x.len()];
            let mut dw = vec![f64::NAN; w.len()];
            let mut db = vec![f64::NAN; b.len()];
            conv2d_backward_data(g, &r, &w, &mut dx);
            conv2d_backward_weight(g, &x, &r, &mut dw, Some(&mut db));
            let loss = |v: &[Vec<f64>]| {
                let mut y = vec![f64::NAN; r.len()];
                let bias = if with_bias { Some(&v[2][..]) } else { None };
                conv2d_forward(g, &v[0], &v[1], bias, &mut y);
                dot(&r, &y)
            };
            let what = format!("conv2d {g:?} bias={with_bias}");
            if with_bias {
                check(
                    &what,
                    &["x", "w", "b"],
                    &mut [x.clone(), w.clone(), b.clone()],
                    &[dx, dw, db],
                    loss,
                );
            } else {
                check(
                    &what,
                    &["x", "w"],
                    &mut [x.clone(), w.clone(), b.clone()][..2].to_vec(),
                    &[dx, dw],
                    loss,
                );
            }
        }
    }
}

/// Shapes whose batch the conv splits into several chunks: a multi-image chunk followed by
/// a single-image one (chunked GEMM + scatter/gather, then the direct GEMM), and pointwise
/// single-image chunks (no im2col at all). Too many inputs for an exhaustive check: a seeded
/// subset of 20 elements per input (each check costs two f64 convolutions on the naive reference GEMM).
#[test]
fn gradcheck_conv2d_multi_chunk() {
    let cfg = GradcheckConfig {
        max_checks_per_input: Some(20),
        seed: 7,
        ..GradcheckConfig::default()
    };
    let cases = [
        (Conv2dGeom::new(3, 21, 32, 32, 1, (5, 5), 1, 2), 2), // chunks of 2 + 1 images
        (Conv2dGeom::new(2, 130, 64, 64, 1, (1, 1), 1, 0), 1), // pointwise, 1 image per chunk
    ];
    for (t, (g, per_chunk)) in cases.iter().enumerate() {
        assert_eq!(
            conv2d_images_per_chunk(g),
            *per_chunk,
            "{g:?}: chunking changed"
        );
        let seed = 700 + 10 * t as u64;
        let k = g.c_in * g.kh * g.kw;
        let x = random_vec(seed, g.n * g.c_in * g.h * g.w, -1.0, 1.0);
        let w = random_vec(seed + 1, g.c_out * k, -1.0, 1.0);
        let b = random_vec(seed + 2, g.c_out, -1.0, 1.0);
        let r = random_vec(seed + 3, g.n * g.c_out * g.out_h() * g.out_w(), -1.0, 1.0);
        let mut dx = vec![f64::NAN; x.len()];
        let (mut dw, mut db) = (vec![f64::NAN; w.len()], vec![f64::NAN; b.len()]);
        conv2d_backward_data(g, &r, &w, &mut dx);
        conv2d_backward_weight(g, &x, &r, &mut dw, Some(&mut db));
        let report = check_gradients(&["x", "w", "b"], &mut [x, w, b], &[dx, dw, db], &cfg, |v| {
            let mut y = vec![f64::NAN; r.len()];
            conv2d_forward(g, &v[0], &v[1], Some(&v[2]), &mut y);
            dot(&r, &y)
        })
        .unwrap_or_else(|e| panic!("conv2d {g:?}: {e}"));
        assert_eq!(report.inputs[0].checked, 20);
    }
}

#[test]
fn gradcheck_batchnorm2d() {
    // (n, c, hw): batch 1, odd plane sizes, 1x1 planes with a larger batch.
    let shapes = [
        (2, 3, 5 * 7),
        (1, 2, 3 * 4),
        (4, 3, 1),
        (3, 1, 9),
        (2, 4, 2 * 3),
    ];
    let eps = 1e-5;
    for (t, &(n, c, hw)) in shapes.iter().enumerate() {
        let seed = 1000 + 10 * t as u64;
        // A non-zero mean and a non-unit spread exercise the centering.
        let x = random_vec(seed, n * c * hw, -2.0, 3.0);
        let gamma = random_vec(seed + 1, c, 0.5, 1.5);
        let beta = random_vec(seed + 2, c, -1.0, 1.0);
        let r = random_vec(seed + 3, x.len(), -1.0, 1.0);
        let (mut mean, mut invstd) = (vec![0.0; c], vec![0.0; c]);
        let mut y = vec![f64::NAN; x.len()];
        batchnorm2d_forward_train(
            n,
            c,
            hw,
            &x,
            &gamma,
            &beta,
            eps,
            &mut y,
            &mut mean,
            &mut invstd,
        );
        let mut dx = vec![f64::NAN; x.len()];
        let (mut dgamma, mut dbeta) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        batchnorm2d_backward(
            n,
            c,
            hw,
            &x,
            &gamma,
            &mean,
            &invstd,
            &r,
            &mut dx,
            &mut dgamma,
            &mut dbeta,
        );
        check(
            &format!("batchnorm2d n={n} c={c} hw={hw}"),
            &["x", "gamma", "beta"],
            &mut [x.clone(), gamma, beta],
            &[dx, dgamma, dbeta],
            |v| {
                let mut y = vec![f64::NAN; r.len()];
                let (mut m, mut s) = (vec![0.0; c], vec![0.0; c]);
                batchnorm2d_forward_train(
                    n, c, hw, &v[0], &v[1], &v[2], eps, &mut y, &mut m, &mut s,
                );
                dot(&r, &y)
            },
        );
    }
}

/// The fused op, through its own backward (relu's mask recomputed from `x`). Inputs are
/// drawn (from a fixed seed sequence) until every batch-norm output is at least 1e-3 away
/// from relu's kink, far beyond the eps = 1e-6 perturbation.
#[test]
fn gradcheck_batchnorm2d_relu() {
    let shapes = [
        (2, 3, 5 * 7),
        (1, 2, 3 * 4),
        (4, 3, 1),
        (3, 1, 9),
        (2, 4, 2 * 3),
        (5, 2, 17),
    ];
    let eps = 1e-5;
    for (t, &(n, c, hw)) in shapes.iter().enumerate() {
        let forward = |x: &[f64], g: &[f64], b: &[f64]| {
            let (mut z, mut saved) = (vec![f64::NAN; x.len()], BnSaved::new());
            batchnorm2d_relu_forward_train(n, c, hw, x, g, b, eps, &mut z, &mut saved);
            (z, saved)
        };
        let clear_of_kink = |x: &[f64], g: &[f64], b: &[f64]| {
            let (mut y, mut m, mut s) = (vec![f64::NAN; x.len()], vec![0.0; c], vec![0.0; c]);
            batchnorm2d_forward_train(n, c, hw, x, g, b, eps, &mut y, &mut m, &mut s);
            y.iter().all(|v| v.abs() >= 1e-3)
        };
        let (x, gamma, beta) = (0..100u64)
            .map(|k| {
                let seed = 1500 + 100 * t as u64 + 10 * k;
                (
                    random_vec(seed, n * c * hw, -2.0, 3.0),
                    random_vec(seed + 1, c, 0.5, 1.5),
                    random_vec(seed + 2, c, -0.5, 0.5),
                )
            })
            .find(|(x, g, b)| clear_of_kink(x, g, b))
            .expect("some seed gives batch-norm outputs clear of relu's kink");
        let r = random_vec(1600 + t as u64, x.len(), -1.0, 1.0);
        let (z, saved) = forward(&x, &gamma, &beta);
        assert!(
            z.contains(&0.0) && z.iter().any(|&v| v > 0.0),
            "both relu branches"
        );
        let mut dx = vec![f64::NAN; x.len()];
        let (mut dgamma, mut dbeta) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        batchnorm2d_relu_backward(
            n,
            c,
            hw,
            &x,
            &gamma,
            &saved,
            &r,
            &mut dx,
            &mut dgamma,
            &mut dbeta,
        );
        check(
            &format!("batchnorm2d_relu n={n} c={c} hw={hw}"),
            &["x", "gamma", "beta"],
            &mut [x.clone(), gamma.clone(), beta.clone()],
            &[dx, dgamma, dbeta],
            |v| dot(&r, &forward(&v[0], &v[1], &v[2]).0),
        );
    }
}

/// The fused batch norm + relu + 2x2 pool. Inputs are drawn until every batch-norm output is
/// at least 1e-3 from relu's kink and, in every window whose maximum is positive, the two
/// largest relu outputs are 1e-3 apart (a tie is a kink of the max).
#[test]
fn gradcheck_batchnorm2d_relu_maxpool2d() {
    // (n, c, h, w): 1 output per row (scalar path), 2 (one f64 vector), 3 (a partial second
    // half-vector), several rows and images.
    // (f64 vectors have 4 lanes: 2 outputs per row are taken two rows at a time, 1 output
    // four rows at a time.)
    let shapes = [
        (2, 3, 2, 2),
        (3, 2, 4, 4),
        (2, 2, 4, 6),
        (1, 3, 6, 8),
        (2, 2, 6, 4),
        (2, 2, 10, 2),
    ];
    let eps = 1e-5;
    for (t, &(n, c, h, w)) in shapes.iter().enumerate() {
        let (len, out) = (n * c * h * w, n * c * h * w / 4);
        let forward = |x: &[f64], g: &[f64], b: &[f64]| {
            let (mut p, mut a, mut saved) = (vec![f64::NAN; out], vec![0u8; out], BnSaved::new());
            batchnorm2d_relu_maxpool2d_forward_train(
                n, c, h, w, x, g, b, eps, &mut p, &mut a, &mut saved,
            );
            (p, a, saved)
        };
        let clear_of_kinks = |x: &[f64], g: &[f64], b: &[f64]| {
            let (mut y, mut m, mut s) = (vec![f64::NAN; len], vec![0.0; c], vec![0.0; c]);
            batchnorm2d_forward_train(n, c, h * w, x, g, b, eps, &mut y, &mut m, &mut s);
            if y.iter().any(|v| v.abs() < 1e-3) {
                return false;
            }
            (0..out).all(|o| {
                let (plane, r, col) = (o / (h * w / 4), (o / (w / 2)) % (h / 2), o % (w / 2));
                let base = plane * h * w + 2 * r * w + 2 * col;
                let mut v =
                    [y[base], y[base + 1], y[base + w], y[base + w + 1]].map(|v| v.max(0.0));
                v.sort_by(|a, b| b.total_cmp(a));
                v[0] == 0.0 || v[0] - v[1] >= 1e-3
            })
        };
        let (x, gamma, beta) = (0..200u64)
            .map(|k| {
                let seed = 1700 + 1000 * t as u64 + 10 * k;
                (
                    random_vec(seed, len, -2.0, 3.0),
                    random_vec(seed + 1, c, 0.5, 1.5),
                    random_vec(seed + 2, c, -0.5, 0.5),
                )
            })
            .find(|(x, g, b)| clear_of_kinks(x, g, b))
            .expect("some seed gives outputs clear of relu's and the max's kinks");
        let r = random_vec(1800 + t as u64, out, -1.0, 1.0);
        let (_, argmax, saved) = forward(&x, &gamma, &beta);
        let mut dx = vec![f64::NAN; len];
        let (mut dgamma, mut dbeta) = (vec![f64::NAN; c], vec![f64::NAN; c]);
        batchnorm2d_relu_maxpool2d_backward(
            n,
            c,
            h,
            w,
            &x,
            &gamma,
            &saved,
            &r,
            &argmax,
            &mut dx,
            &mut dgamma,
            &mut dbeta,
        );
        check(
            &format!("batchnorm2d_relu_maxpool2d n={n} c={c} {h}x{w}"),
            &["x", "gamma", "beta"],
            &mut [x.clone(), gamma.clone(), beta.clone()],
            &[dx, dgamma, dbeta],
            |v| dot(&r, &forward(&v[0], &v[1], &v[2]).0),
        );
    }
}

#[test]
fn gradcheck_relu() {
    for (t, &len) in [1usize, 7, 64, 1000].iter().enumerate() {
        // |x| >= 0.1 by construction: relu's kink at 0 is far beyond eps = 1e-6, where central
        // differences would average the two slopes.
        let u = random_vec(2000 + t as u64, len, 0.1, 1.0);
        let signs = random_vec(2100 + t as u64, len, -1.0, 1.0);
        let x: Vec<f64> = u
            .iter()
            .zip(&signs)
            .map(|(u, s)| if *s < 0.0 { -u } else { *u })
            .collect();
        let r = random_vec(2200 + t as u64, len, -1.0, 1.0);
        let mut y = vec![f64::NAN; len];
        relu_forward(&x, &mut y);
        let mut dx = vec![f64::NAN; len];
        relu_backward(&y, &r, &mut dx);
        check(&format!("relu len={len}"), &["x"], &mut [x], &[dx], |v| {
            let mut y = vec![f64::NAN; len];
            relu_forward(&v[0], &mut y);
            dot(&r, &y)
        });
    }
}

#[test]
fn gradcheck_maxpool2d() {
    let shapes = [
        Pool2dGeom {
            n: 2,
            c: 3,
            h: 6,
            w: 8,
            k: 2,
            stride: 2,
        }, // the VGG case, rectangular
        Pool2dGeom {
            n: 1,
            c: 2,
            h: 5,
            w: 7,
            k: 2,
            stride: 2,
        }, // odd sizes: last row/col dropped
        Pool2dGeom {
            n: 2,
            c: 2,
            h: 7,
            w: 5,
            k: 3,
            stride: 2,
        }, // overlapping windows
        Pool2dGeom {
            n: 1,
            c: 1,
            h: 4,
            w: 6,
            k: 3,
            stride: 1,
        }, // stride 1
    ];
    for (t, g) in shapes.iter().enumerate() {
        let len = g.n * g.c * g.h * g.w;
        // Distinct values 0.01 apart (a shuffled ramp): no two window entries are within
        // 2·eps of each other, so the argmax cannot flip under the perturbation (ties are
        // kinks).
        let keys = random_vec(3000 + t as u64, len, 0.0, 1.0);
        let mut order: Vec<usize> = (0..len).collect();
        order.sort_by(|&a, &b| keys[a].total_cmp(&keys[b]));
        let mut x = vec![0.0; len];
        for (rank, &i) in order.iter().enumerate() {
            x[i] = rank as f64 * 0.01 - 1.0;
        }
        let out = g.n * g.c * g.out_h() * g.out_w();
        let r = random_vec(3100 + t as u64, out, -1.0, 1.0);
        let (mut y, mut argmax) = (vec![f64::NAN; out], vec![0u8; out]);
        maxpool2d_forward(g, &x, &mut y, &mut argmax);
        let mut dx = vec![f64::NAN; len];
        maxpool2d_backward(g, &r, &argmax, &mut dx);
        check(&format!("maxpool2d {g:?}"), &["x"], &mut [x], &[dx], |v| {
            let (mut y, mut a) = (vec![f64::NAN; out], vec![0u8; out]);
            maxpool2d_forward(g, &v[0], &mut y, &mut a);
            dot(&r, &y)
        });
    }
}

#[test]
fn gradcheck_linear() {
    // (n, d_in, d_out): batch 1, non-square, odd.
    for (t, &(n, d_in, d_out)) in [(3, 5, 4), (1, 7, 3), (4, 1, 6), (2, 9, 10)]
        .iter()
        .enumerate()
    {
        let seed = 4000 + 10 * t as u64;
        let x = random_vec(seed, n * d_in, -1.0, 1.0);
        let w = random_vec(seed + 1, d_out * d_in, -1.0, 1.0);
        let b = random_vec(seed + 2, d_out, -1.0, 1.0);
        let r = random_vec(seed + 3, n * d_out, -1.0, 1.0);
        let mut dx = vec![f64::NAN; x.len()];
        let (mut dw, mut db) = (vec![f64::NAN; w.len()], vec![f64::NAN; d_out]);
        linear_backward(
            n,
            d_in,
            d_out,
            &x,
            &w,
            &r,
            Some(&mut dx),
            &mut dw,
            Some(&mut db),
        );
        check(
            &format!("linear n={n} in={d_in} out={d_out}"),
            &["x", "w", "b"],
            &mut [x, w, b],
            &[dx, dw, db],
            |v| {
                let mut y = vec![f64::NAN; r.len()];
                linear_forward(n, d_in, d_out, &v[0], &v[1], Some(&v[2]), &mut y);
                dot(&r, &y)
            },
        );
    }
}

/// Plain (ε = 0) and label-smoothed cross-entropy.
#[test]
fn gradcheck_cross_entropy() {
    let cases = [
        (4, 10, 0.0),
        (1, 3, 0.0),
        (5, 2, 0.0),
        (3, 7, 0.0),
        (4, 10, 0.1),
        (3, 7, 0.35),
        (2, 2, 1.0),
    ];
    for (t, &(n, classes, eps)) in cases.iter().enumerate() {
        let seed = 5000 + 10 * t as u64;
        // Large logits (±20) check the max-shift path too.
        let logits = random_vec(seed, n * classes, -20.0, 20.0);
        let labels: Vec<u32> = random_vec(seed + 1, n, 0.0, classes as f64)
            .iter()
            .map(|&u| (u as u32).min(classes as u32 - 1))
            .collect();
        // A non-unit upstream gradient of the loss.
        let dloss = random_vec(seed + 2, 1, 0.5, 2.0)[0];
        let mut probs = vec![f64::NAN; logits.len()];
        cross_entropy_forward(n, classes, &logits, &labels, eps, &mut probs);
        let mut dlogits = vec![f64::NAN; logits.len()];
        cross_entropy_backward(n, classes, &probs, &labels, eps, dloss, &mut dlogits);
        check(
            &format!("cross_entropy n={n} classes={classes} label_smoothing={eps}"),
            &["logits"],
            &mut [logits],
            &[dlogits],
            |v| {
                let mut p = vec![f64::NAN; n * classes];
                dloss * cross_entropy_forward(n, classes, &v[0], &labels, eps, &mut p)
            },
        );
    }
}

/// The checker itself must reject a wrong gradient (otherwise every test above is vacuous).
#[test]
fn gradcheck_detects_wrong_gradient() {
    let x = random_vec(6000, 6, -1.0, 1.0);
    let r = random_vec(6001, 6, -1.0, 1.0);
    let mut wrong: Vec<f64> = x.iter().zip(&r).map(|(x, r)| 2.0 * r * x).collect();
    wrong[3] *= 1.01;
    let result = check_gradients(
        &["x"],
        &mut [x],
        &[wrong],
        &GradcheckConfig::default(),
        |v| dot(&r, &v[0].iter().map(|x| x * x).collect::<Vec<_>>()),
    );
    match result {
        Err(engine::gradcheck::GradcheckError::Mismatch {
            index, failures, ..
        }) => {
            assert_eq!((index, failures), (3, 1));
        }
        other => panic!("expected a mismatch at index 3, got {other:?}"),
    }
}
