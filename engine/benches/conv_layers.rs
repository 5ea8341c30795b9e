//! Per-layer timings of VGG11's convolutions — every applicable algorithm for each pass, side
//! by side in the same run — and of its BN / ReLU / max-pool layers, at batch 128 on 32×32
//! inputs, with 1 and 2 threads.
//!
//! Run: `cargo bench -p engine --bench conv_layers`
//! Columns: ms (best of the repetitions), effective GFLOP/s (`2·N·C_out·P·C_in·9` / time, the
//! same count for every algorithm), the algorithm's own GFLOP/s (its executed multiply-adds,
//! [`ConvAlgo::macs`]), and that as % of the FMA peak measured at the start of the run (per
//! core × threads). `*` marks the automatic choice, `x` its speed-up over im2col.
//! Env: `BENCH_BATCH` (default 128), `BENCH_REPS` (timed repetitions, default 2; the best is
//! reported, after one untimed warm-up), `BENCH_THREADS` (comma list, default "1,2"),
//! `BENCH_ALGOS` (comma list of algorithm names, default all), `BENCH_CLOCK=cpu` (time with
//! the calling thread's CPU clock instead of the wall clock: meaningful for 1 thread only,
//! on a machine busy with other work where wall times mostly measure waiting for a core).
//! `BENCH_BF16=1` adds `im2col bf16` / `winograd-f2 bf16` / `winograd-f4 bf16` rows per pass:
//! the algorithm with its GEMMs in mixed precision (`--precision bf16`; % peak against twice
//! the f32 FMA peak, `VDPBF16PS` doing two multiply-adds per f32 lane) whether or not the
//! bf16 plan uses it, `*` marking the one it does, and the bf16 plan's choice for the pass.
//! `DTRAIN_SIMD` caps the SIMD level as everywhere.
#[path = "common/fma.rs"]
mod fma;

use engine::gemm::Precision;
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
                let t = fma::thread_cpu_ms();
                f();
                fma::thread_cpu_ms() - t
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
    let level = engine::simd::level();
    let peak = fma::measure_peak(fma::Vectors::Level(level), 100.0, 5).unwrap_or(f64::NAN);
    println!(
        "{}, SIMD level {}: FMA peak {peak:.1} GFLOP/s per core (fma_peak bench kernel)",
        fma::cpu_model(),
        level.name()
    );
    let algos: Vec<ConvAlgo> = match std::env::var("BENCH_ALGOS") {
        Ok(list) => ConvAlgo::ALL
            .into_iter()
            .filter(|a| list.split(',').any(|n| n.trim() == a.name()))
            .collect(),
        Err(_) => ConvAlgo::ALL.to_vec(),
    };
    for &t in &threads {
        set_num_threads(t);
        println!("\n== threads {t} ==");
        conv_table(batch, reps, t, peak * t as f64, &algos, &mut rng);
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

/// Time every algorithm in `algos` that applies, per layer and pass; print the table and the
/// totals of the automatic choice against im2col.
fn conv_table(
    batch: usize,
    reps: usize,
    threads: usize,
    peak: f64,
    algos: &[ConvAlgo],
    rng: &mut ChaCha8Rng,
) {
    println!(
        "{:<14} {:<10} {:<13} {:>9} {:>8} {:>8} {:>7} {:>7}",
        "conv", "pass", "algorithm", "ms", "eff GF/s", "alg GF/s", "% peak", "vs i2c"
    );
    let (mut auto_ms, mut im2col_ms) = (0.0, 0.0);
    for &(c_in, c_out, hw, _) in &VGG11_CONVS {
        let g = Conv2dGeom::new(batch, c_in, hw, hw, c_out, (3, 3), 1, 1);
        let x = random(rng, batch * c_in * hw * hw);
        let w = random(rng, c_out * c_in * 9);
        let b = random(rng, c_out);
        let dy = random(rng, batch * c_out * hw * hw);
        let mut y = vec![0f32; dy.len()];
        let mut dx = vec![0f32; x.len()];
        let (mut dw, mut db) = (vec![0f32; w.len()], vec![0f32; c_out]);
        let v = ConvVectors::process();
        let plan = conv2d_plan(&g);
        let bf16_plan = engine::gemm::with_precision(Precision::Bf16, || conv2d_plan(&g));
        for pass in ConvPass::ALL {
            let auto = plan.get(pass).algo;
            let mut im2col = None;
            for &algo in algos.iter().filter(|a| a.unsupported_reason(&g).is_none()) {
                let ms = time_ms(reps, || match pass {
                    ConvPass::Forward => conv2d_forward_with(algo, v, &g, &x, &w, Some(&b), &mut y),
                    // The first layer's input gradient is never needed in training; timed anyway.
                    ConvPass::BackwardData => {
                        conv2d_backward_data_with(algo, v, &g, &dy, &w, &mut dx)
                    }
                    ConvPass::BackwardWeight => {
                        conv2d_backward_weight_with(algo, v, &g, &x, &dy, &mut dw, Some(&mut db))
                    }
                });
                if algo == ConvAlgo::Im2col {
                    im2col = Some(ms);
                    im2col_ms += ms;
                }
                if algo == auto {
                    auto_ms += ms;
                }
                let eff = 2.0 * g.macs() as f64 / (ms * 1e6);
                let own = 2.0 * algo.macs(&g, pass) as f64 / (ms * 1e6);
                let speedup = match (algo == auto, im2col) {
                    (true, Some(i)) => format!("{:.2}x", i / ms),
                    _ => String::new(),
                };
                println!(
                    "{:<14} {:<10} {:<13} {ms:>9.2} {eff:>8.1} {own:>8.1} {:>6.0}% {speedup:>7}",
                    format!("{c_in}->{c_out}@{hw}"),
                    pass.name(),
                    format!("{}{}", algo.name(), if algo == auto { " *" } else { "" }),
                    100.0 * own / peak
                );
            }
            if std::env::var("BENCH_BF16").is_ok_and(|v| v == "1") {
                let bf16_algos = [ConvAlgo::Im2col, ConvAlgo::WinogradF2, ConvAlgo::WinogradF4];
                for algo in bf16_algos
                    .into_iter()
                    .filter(|a| a.unsupported_reason(&g).is_none())
                {
                    let ms = engine::gemm::with_precision(Precision::Bf16, || {
                        time_ms(reps, || match pass {
                            ConvPass::Forward => {
                                conv2d_forward_with(algo, v, &g, &x, &w, Some(&b), &mut y)
                            }
                            ConvPass::BackwardData => {
                                conv2d_backward_data_with(algo, v, &g, &dy, &w, &mut dx)
                            }
                            ConvPass::BackwardWeight => conv2d_backward_weight_with(
                                algo,
                                v,
                                &g,
                                &x,
                                &dy,
                                &mut dw,
                                Some(&mut db),
                            ),
                        })
                    });
                    let eff = 2.0 * g.macs() as f64 / (ms * 1e6);
                    let own = 2.0 * algo.macs(&g, pass) as f64 / (ms * 1e6);
                    let chosen = bf16_plan.get(pass);
                    let runs_this = chosen.algo == algo && chosen.arithmetic() == Precision::Bf16;
                    let mark = if runs_this { " *" } else { "" };
                    println!(
                        "{:<14} {:<10} {:<13} {ms:>9.2} {eff:>8.1} {own:>8.1} {:>6.0}%  bf16 plan: {chosen}",
                        format!("{c_in}->{c_out}@{hw}"),
                        pass.name(),
                        format!("{} bf16{mark}", algo.name()),
                        100.0 * own / (2.0 * peak),
                    );
                }
            }
        }
    }
    println!(
        "all convs, {threads} thread(s): automatic choice {auto_ms:.1} ms, im2col {im2col_ms:.1} ms ({:.2}x)",
        im2col_ms / auto_ms
    );
}
