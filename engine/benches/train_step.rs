//! Whole VGG11 train step (forward + backward + SGD) on random 3×32×32 batches.
//!
//! `cargo bench -p engine --bench train_step` runs each configuration (batch 128 / 1 thread,
//! batch 256 / 1 thread, batch 256 / 2 threads) in its own child process (this binary
//! re-executed with `--child BATCH THREADS`, which prints one `RESULT` line) so the peak RSS
//! (VmHWM) is per configuration, and prints ms/step, images/s (median of the measured steps
//! after warm-up), peak RSS and the 1 → 2 thread scaling at the same batch. Comparisons with
//! PyTorch come only from `scripts/bench_vs_torch.py`, which times both in the same run.
//! Environment: `TRAIN_STEP_WARMUP` (default 1), `TRAIN_STEP_STEPS` (default 3),
//! `TRAIN_STEP_CONFIGS` (e.g. `128x1,256x2`), `TRAIN_STEP_PROFILE=1` (per-layer
//! forward/backward times, from the tape's node profile), `TRAIN_STEP_PRECISION=f32|bf16`
//! (`--precision`, default f32), `DTRAIN_SIMD` (the SIMD level).

use std::process::Command;
use std::time::Instant;

use engine::gemm::Precision;
use engine::{simd, Sgd, Vgg, VggConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// (batch, threads) measured by default.
const DEFAULT_CONFIGS: [(usize, usize); 3] = [(128, 1), (256, 1), (256, 2)];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size of this process in MB (VmHWM), if readable.
fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// CPU time consumed by this process (all threads), in ms.
fn process_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 / 1e6
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        0.5 * (v[m - 1] + v[m])
    }
}

/// `TRAIN_STEP_PRECISION` (default f32); an unknown value stops the bench.
fn precision() -> Precision {
    let v = std::env::var("TRAIN_STEP_PRECISION").unwrap_or_else(|_| "f32".into());
    v.parse().unwrap_or_else(|e| {
        eprintln!("TRAIN_STEP_PRECISION: {e}");
        std::process::exit(2)
    })
}

/// Child: run one configuration and print one `RESULT` line.
fn child(batch: usize, threads: usize) {
    let warmup = env_usize("TRAIN_STEP_WARMUP", 1);
    let steps = env_usize("TRAIN_STEP_STEPS", 3).max(1);
    let mut model = Vgg::<f32>::new(VggConfig::vgg11().with_precision(precision()), 0);
    // dtrain's defaults (and engine/tests/fixtures/make_reference.py's): lr 0.1, momentum
    // 0.9, weight decay 1e-4.
    let mut sgd = Sgd::<f32>::new(0.1, 0.9, 1e-4);
    model.set_num_threads(Some(threads));
    sgd.set_num_threads(Some(threads));
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let x: Vec<f32> = (0..batch * 3 * 32 * 32)
        .map(|_| rng.gen_range(-1.0..1.0))
        .collect();
    let labels: Vec<u32> = (0..batch).map(|_| rng.gen_range(0..10)).collect();
    let profile = std::env::var("TRAIN_STEP_PROFILE").is_ok_and(|v| v == "1");
    let mut step_ms = Vec::new();
    let mut fb_ms = Vec::new();
    let mut cpu_ms = Vec::new();
    for i in 0..warmup + steps {
        let c0 = process_cpu_ms();
        let t0 = Instant::now();
        model
            .forward_backward(&x, batch, &labels, &mut |_, _| {})
            .expect("valid batch");
        let t1 = Instant::now();
        sgd.step(model.params_mut());
        let t2 = Instant::now();
        let c2 = process_cpu_ms();
        if i + 1 == warmup {
            model.set_profiling(profile);
        }
        if i >= warmup {
            step_ms.push((t2 - t0).as_secs_f64() * 1e3);
            fb_ms.push((t1 - t0).as_secs_f64() * 1e3);
            cpu_ms.push(c2 - c0);
        }
    }
    let ms = median(&mut step_ms);
    let fb = median(&mut fb_ms);
    let cpu = median(&mut cpu_ms);
    if profile {
        // Per-node mean ms/step, to stderr (the parent prints it).
        for p in model.take_profile() {
            eprintln!(
                "PROFILE {:<14} {:<18} fwd {:>8.1} ms  bwd {:>8.1} ms",
                p.op,
                format!("{:?}", p.out_shape),
                p.forward_ms / steps as f64,
                p.backward_ms / steps as f64
            );
        }
    }
    let rss = peak_rss_mb().unwrap_or(f64::NAN);
    println!("RESULT {batch} {threads} {ms:.3} {fb:.3} {rss:.1} {cpu:.3}");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(pos) = args.iter().position(|a| a == "--child") {
        let batch = args.get(pos + 1).and_then(|v| v.parse().ok());
        let threads = args.get(pos + 2).and_then(|v| v.parse().ok());
        match (batch, threads) {
            (Some(b), Some(t)) => child(b, t),
            _ => {
                eprintln!("usage: train_step --child BATCH THREADS");
                std::process::exit(2);
            }
        }
        return;
    }
    let configs: Vec<(usize, usize)> = match std::env::var("TRAIN_STEP_CONFIGS") {
        Ok(s) => s
            .split(',')
            .filter_map(|c| {
                let (b, t) = c.split_once('x')?;
                Some((b.trim().parse().ok()?, t.trim().parse().ok()?))
            })
            .collect(),
        Err(_) => DEFAULT_CONFIGS.to_vec(),
    };
    let exe = std::env::current_exe().expect("own executable path");
    println!(
        "VGG11 train step (forward+backward+SGD), precision {}, 3x32x32, median of measured steps, SIMD {}",
        precision(),
        simd::level().name()
    );
    let mut batches: Vec<usize> = configs.iter().map(|&(b, _)| b).collect();
    batches.sort_unstable();
    batches.dedup();
    for b in batches {
        println!("conv algorithms at batch {b}:");
        for line in VggConfig::vgg11()
            .with_precision(precision())
            .conv_plan_lines(b)
        {
            println!("  {line}");
        }
    }
    println!(
        "{:>6} {:>7} {:>10} {:>10} {:>9} {:>9}",
        "batch", "threads", "ms/step", "fwd+bwd", "img/s", "peak MB"
    );
    // ms/step per (batch, threads), for the scaling line.
    let mut measured: Vec<(usize, usize, f64)> = Vec::new();
    for (batch, threads) in configs {
        let out = Command::new(&exe)
            .args(["--child", &batch.to_string(), &threads.to_string()])
            .output()
            .expect("spawn child");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let Some(line) = stdout.lines().find(|l| l.starts_with("RESULT ")) else {
            eprintln!(
                "batch {batch} / {threads} threads failed ({}):\n{stdout}\n{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
            continue;
        };
        let f: Vec<f64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        let (ms, fb, rss, cpu) = (f[2], f[3], f[4], f[5]);
        for l in String::from_utf8_lossy(&out.stderr).lines() {
            if let Some(p) = l.strip_prefix("PROFILE ") {
                println!("  [b{batch}/t{threads}] {p}");
            }
        }
        let ips = batch as f64 / (ms / 1e3);
        println!("{batch:>6} {threads:>7} {ms:>10.1} {fb:>10.1} {ips:>9.1} {rss:>9.0}");
        measured.push((batch, threads, ms));
        // On a shared machine wall time includes waiting for a core; CPU time / threads is
        // what the step costs when the cores are ours (an upper bound on speed for t > 1).
        let cpu_ips = batch as f64 / (cpu / threads as f64 / 1e3);
        println!(
            "{:>6} {:>7} {:>10.1} {:>10} {cpu_ips:>9.1}   (from CPU time {cpu:.0} ms/step / {threads} threads)",
            "", "cpu", cpu / threads as f64, ""
        );
    }
    // Scaling from the medians of every run of a configuration, so an interleaved list
    // (e.g. TRAIN_STEP_CONFIGS=256x1,256x2,256x1,256x2) averages out this VM's drift.
    let median_ms = |b: usize, t: usize| {
        let mut v: Vec<f64> = measured
            .iter()
            .filter(|m| (m.0, m.1) == (b, t))
            .map(|m| m.2)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).map(|&m| (m, v.len()))
    };
    let mut shown: Vec<(usize, usize)> = Vec::new();
    for &(b, t, _) in &measured {
        if t == 1 || shown.contains(&(b, t)) {
            continue;
        }
        shown.push((b, t));
        if let (Some((ms1, n1)), Some((ms, n))) = (median_ms(b, 1), median_ms(b, t)) {
            println!(
                "scaling at batch {b}: 1 -> {t} threads {:.2}x (medians of {n1} and {n} runs)",
                ms1 / ms
            );
        }
    }
    if let Ok(l) = std::fs::read_to_string("/proc/loadavg") {
        println!("load average after the run: {}", l.trim());
    }
}
