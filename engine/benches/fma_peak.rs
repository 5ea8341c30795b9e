//! FMA peak per core per SIMD level: the ceiling the conv table's "% of peak" refers to.
//!
//! Run: `cargo bench -p engine --bench fma_peak`. Env: `FMA_PEAK_MS` (per run, default 200),
//! `FMA_PEAK_REPS` (best of, default 5). One thread is timed with its CPU clock; the
//! 2-thread row with the wall clock (two threads at once).
#[path = "common/fma.rs"]
mod fma;

use engine::simd::SimdLevel;
use fma::Vectors;

fn env_f64(name: &str, default: f64) -> f64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let ms = env_f64("FMA_PEAK_MS", 200.0);
    let reps = env_f64("FMA_PEAK_REPS", 5.0) as usize;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("FMA peak (f32), {}, {threads} CPUs", fma::cpu_model());
    println!(
        "{:<12} {:>6} {:>14} {:>16}",
        "vectors",
        "lanes",
        "1 core GF/s",
        format!("{threads} threads GF/s")
    );
    let mut all: Vec<Vectors> = SimdLevel::ALL.into_iter().map(Vectors::Level).collect();
    all.push(Vectors::Portable16);
    for v in all {
        match fma::measure_peak(v, ms, reps) {
            Some(one) => {
                let many = fma::measure_peak_threads(v, threads, ms).unwrap_or(f64::NAN);
                let lanes = if matches!(v, Vectors::Level(SimdLevel::Avx512) | Vectors::Portable16)
                {
                    16
                } else {
                    8
                };
                println!("{:<12} {lanes:>6} {one:>14.1} {many:>16.1}", v.name());
            }
            None => println!(
                "{:<12}   !!!!! not supported by this CPU: NOT measured !!!!!",
                v.name()
            ),
        }
    }
}
