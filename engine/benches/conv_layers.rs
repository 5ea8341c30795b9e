//! Per-layer timings of VGG11's convolutions (forward, backward-data, backward-weight) and of
//! its BN / ReLU / max-pool layers, at batch 128 on 32×32 inputs, with 1 and 2 threads.
//!
//! Run: `cargo bench -p engine --bench conv_layers`
//! Env: `BENCH_BATCH` (default 128), `BENCH_REPS` (timed repetitions, default 2; the best is
//! reported, after one untimed warm-up), `BENCH_THREADS` (comma list, default "1,2"),
//! `BENCH_CLOCK=cpu` (time with the calling thread's CPU clock instead of the wall clock:
//! meaningful for 1 thread only, on a machine busy with other work where wall times mostly
//! measure waiting for a core).
use engine::ops::*;
use engine::parallel::set_num_threads;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// VGG11 (CIFAR variant): `(c_in, c_out, spatial size, max-pool after)`.
const VGG11_CONVS: [(usize, usize, usize, bool); 8] = [
    (3, 64, 32, true),
    (64, 128, 16, true),
    (128, 256, 8, false),
    (256, 256, 8, true),
    (256, 512, 4, false),
    (512, 512, 4, true),
    (512, 512, 2, false),
    (512, 512, 2, true),
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
}

/// CPU time of the calling thread, ms.
fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}

fn use_cpu_clock() -> bool {
    std::env::var("BENCH_CLOCK").is_ok_and(|v| v == "cpu")
}

/// Best time in ms of `reps` runs after one warm-up (wall clock, or thread CPU clock).
fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let cpu = use_cpu_clock();
    (0..reps.max(1))
        .map(|_| {
            if cpu {
                let t = thread_cpu_ms();
                f();
                thread_cpu_ms() - t
            } else {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64() * 1e3
            }
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    let batch = env_usize("BENCH_BATCH", 128);
    let reps = env_usize("BENCH_REPS", 2);
    let threads: Vec<usize> = std::env::var("BENCH_THREADS")
        .unwrap_or_else(|_| "1,2".into())
        .split(',')
        .filter_map(|t| t.trim().parse().ok())
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let clock = if use_cpu_clock() {
        "thread CPU"
    } else {
        "wall"
    };
    println!(
        "VGG11 layers, batch {batch}, 32x32 input, best of {reps} (after 1 warm-up), {clock} clock"
    );
    if use_cpu_clock() && threads.iter().any(|&t| t > 1) {
        eprintln!(
            "WARNING: BENCH_CLOCK=cpu only counts the calling thread: multi-thread rows undercount"
        );
    }
    for &t in &threads {
        set_num_threads(t);
        println!("\n== threads {t} ==");
        println!(
            "{:<16} {:>9} {:>7} {:>9} {:>7} {:>9} {:>7}",
            "conv", "fwd ms", "GF/s", "bwd-d ms", "GF/s", "bwd-w ms", "GF/s"
        );
        let (mut sum_ms, mut sum_flops) = (0.0, 0.0);
        for &(c_in, c_out, hw, _) in &VGG11_CONVS {
            let g = Conv2dGeom {
                n: batch,
                c_in,
                h: hw,
                w: hw,
                c_out,
                kh: 3,
                kw: 3,
                stride: 1,
                pad: 1,
            };
            let x = random(&mut rng, batch * c_in * hw * hw);
            let w = random(&mut rng, c_out * c_in * 9);
            let b = random(&mut rng, c_out);
            let dy = random(&mut rng, batch * c_out * hw * hw);
            let mut y = vec![0f32; dy.len()];
            let mut dx = vec![0f32; x.len()];
            let (mut dw, mut db) = (vec![0f32; w.len()], vec![0f32; c_out]);
            let flops = 2.0 * g.macs() as f64;
            let fwd = time_ms(reps, || conv2d_forward(&g, &x, &w, Some(&b), &mut y));
            // The first layer's input gradient is never needed in training; timed anyway.
            let bwd_d = time_ms(reps, || conv2d_backward_data(&g, &dy, &w, &mut dx));
            let bwd_w = time_ms(reps, || {
                conv2d_backward_weight(&g, &x, &dy, &mut dw, Some(&mut db))
            });
            let gf = |ms: f64| flops / (ms * 1e6);
            println!(
                "{:<16} {:>9.2} {:>7.1} {:>9.2} {:>7.1} {:>9.2} {:>7.1}",
                format!("{c_in}->{c_out}@{hw}"),
                fwd,
                gf(fwd),
                bwd_d,
                gf(bwd_d),
                bwd_w,
                gf(bwd_w)
            );
            sum_ms += fwd + bwd_d + bwd_w;
            sum_flops += 3.0 * flops;
        }
        println!(
            "{:<16} {:>9.2} ms total, {:.1} GFLOP/s overall",
            "all convs",
            sum_ms,
            sum_flops / (sum_ms * 1e6)
        );

        println!(
            "\n{:<16} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "activation", "bn fwd", "bn bwd", "relu fwd", "relu bwd", "pool fwd", "pool bwd"
        );
        let mut sum_ms = 0.0;
        for &(_, c, hw, pooled) in &VGG11_CONVS {
            let len = batch * c * hw * hw;
            let x = random(&mut rng, len);
            let dy = random(&mut rng, len);
            let gamma = random(&mut rng, c);
            let beta = random(&mut rng, c);
            let (mut y, mut dx) = (vec![0f32; len], vec![0f32; len]);
            let (mut mean, mut invstd) = (vec![0f32; c], vec![0f32; c]);
            let (mut dgamma, mut dbeta) = (vec![0f32; c], vec![0f32; c]);
            let (n, p) = (batch, hw * hw);
            let bn_f = time_ms(reps, || {
                batchnorm2d_forward_train(
                    n,
                    c,
                    p,
                    &x,
                    &gamma,
                    &beta,
                    1e-5,
                    &mut y,
                    &mut mean,
                    &mut invstd,
                )
            });
            let bn_b = time_ms(reps, || {
                batchnorm2d_backward(
                    n,
                    c,
                    p,
                    &x,
                    &gamma,
                    &mean,
                    &invstd,
                    &dy,
                    &mut dx,
                    &mut dgamma,
                    &mut dbeta,
                )
            });
            let relu_f = time_ms(reps, || relu_forward(&x, &mut y));
            let relu_b = time_ms(reps, || relu_backward(&y, &dy, &mut dx));
            let (pool_f, pool_b) = if pooled {
                let g = Pool2dGeom {
                    n,
                    c,
                    h: hw,
                    w: hw,
                    k: 2,
                    stride: 2,
                };
                let out = n * c * (hw / 2) * (hw / 2);
                let (mut py, mut arg) = (vec![0f32; out], vec![0u8; out]);
                let pf = time_ms(reps, || maxpool2d_forward(&g, &x, &mut py, &mut arg));
                let pdy = random(&mut rng, out);
                let pb = time_ms(reps, || maxpool2d_backward(&g, &pdy, &arg, &mut dx));
                (pf, pb)
            } else {
                (0.0, 0.0)
            };
            sum_ms += bn_f + bn_b + relu_f + relu_b + pool_f + pool_b;
            println!(
                "{:<16} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
                format!("{c}@{hw}"),
                bn_f,
                bn_b,
                relu_f,
                relu_b,
                pool_f,
                pool_b
            );
        }
        println!("{:<16} {:>9.2} ms total", "all bn/relu/pool", sum_ms);
    }
}
