//! The FMA-peak micro-benchmark, shared by the `fma_peak` and `conv_layers` benches.
//!
//! Independent chains of fused multiply-adds on registers (no memory traffic), enough of
//! them to cover the FMA latency on both pipes: the most f32 multiply-adds one core can
//! retire per second at a SIMD level. 2 FLOPs per lane per FMA.
// Each bench that includes this file uses only part of it.
#![allow(dead_code)]
use engine::simd::{F32Vec, Portable16, Portable8, SimdKernel, SimdLevel};
use std::time::Instant;

/// `iters` rounds of `CHAINS` dependent-chain FMAs on `V`; returns a lane sum so the work
/// cannot be optimized away.
struct FmaChains {
    iters: usize,
}

impl SimdKernel for FmaChains {
    type Output = f32;
    #[inline(always)]
    fn run<V: F32Vec>(self) -> f32 {
        // 12 accumulators fit AVX2's 16 registers; 24 use AVX-512's 32.
        if V::LANES >= 16 {
            chains::<V, 24>(self.iters)
        } else {
            chains::<V, 12>(self.iters)
        }
    }
}

#[inline(always)]
fn chains<V: F32Vec, const CHAINS: usize>(iters: usize) -> f32 {
    // Opaque operands, so the compiler cannot evaluate the chains ahead of time.
    let a = V::splat(std::hint::black_box(0.999_999_9));
    let b = V::splat(std::hint::black_box(1e-7));
    let mut acc: [V; CHAINS] =
        std::array::from_fn(|i| V::splat(std::hint::black_box(1.0 + i as f32 * 1e-3)));
    for _ in 0..std::hint::black_box(iters) {
        for v in acc.iter_mut() {
            *v = v.mul_add(a, b);
        }
    }
    acc.iter().fold(V::zero(), |s, &v| s.add(v)).reduce_sum()
}

/// What the peak is measured for: a SIMD level's vector type, or the 16-lane portable type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vectors {
    Level(SimdLevel),
    Portable16,
}

impl Vectors {
    pub fn name(self) -> &'static str {
        match self {
            Vectors::Level(l) => l.name(),
            Vectors::Portable16 => "portable16",
        }
    }
    fn lanes(self) -> usize {
        match self {
            Vectors::Level(SimdLevel::Avx512) | Vectors::Portable16 => 16,
            Vectors::Level(_) => 8,
        }
    }
    fn chains(self) -> usize {
        if self.lanes() >= 16 {
            24
        } else {
            12
        }
    }
    fn run(self, iters: usize) -> f32 {
        let k = FmaChains { iters };
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: only called for supported levels (see `measure_peak`).
            Vectors::Level(SimdLevel::Avx512) => unsafe { run_avx512(k) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Vectors::Level(SimdLevel::Avx2) => unsafe { run_avx2(k) },
            Vectors::Level(_) => k.run::<Portable8>(),
            Vectors::Portable16 => k.run::<Portable16>(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2(k: FmaChains) -> f32 {
    k.run::<engine::simd::Avx2>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn run_avx512(k: FmaChains) -> f32 {
    k.run::<engine::simd::Avx512>()
}

/// Peak f32 GFLOP/s of one core with `v`: the best of `reps` runs of about `ms` each,
/// timed with the thread's CPU clock (so time spent waiting for a core on a busy machine is
/// not counted). `None` when this CPU cannot run `v`.
pub fn measure_peak(v: Vectors, ms: f64, reps: usize) -> Option<f64> {
    if let Vectors::Level(l) = v {
        if !l.is_supported() {
            return None;
        }
    }
    // Calibrate the iteration count to about `ms`.
    let mut iters = 1 << 10;
    loop {
        let t = thread_cpu_ms();
        std::hint::black_box(v.run(std::hint::black_box(iters)));
        let dt = thread_cpu_ms() - t;
        if dt >= ms / 4.0 || iters >= 1 << 34 {
            iters = ((iters as f64) * ms / dt.max(1e-3)) as usize;
            break;
        }
        iters *= 4;
    }
    let flops = (iters * v.chains() * v.lanes() * 2) as f64;
    let best = (0..reps.max(1))
        .map(|_| {
            let t = thread_cpu_ms();
            std::hint::black_box(v.run(std::hint::black_box(iters)));
            thread_cpu_ms() - t
        })
        .fold(f64::INFINITY, f64::min);
    Some(flops / (best * 1e6))
}

/// Aggregate GFLOP/s of `threads` threads each running the chains at once (wall clock).
pub fn measure_peak_threads(v: Vectors, threads: usize, ms: f64) -> Option<f64> {
    let one = measure_peak(v, ms / 4.0, 1)?;
    let iters = (one * 1e6 * ms / (v.chains() * v.lanes() * 2) as f64) as usize;
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| std::hint::black_box(v.run(std::hint::black_box(iters))));
        }
    });
    let dt = t.elapsed().as_secs_f64() * 1e3;
    Some((threads * iters * v.chains() * v.lanes() * 2) as f64 / (dt * 1e6))
}

/// CPU time of the calling thread, ms.
pub fn thread_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux supports.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as f64 * 1e3 + ts.tv_nsec as f64 * 1e-6
}

/// The CPU model from /proc/cpuinfo (for the tables' headers).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
