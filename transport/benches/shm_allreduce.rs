//! All-reduce latency/bandwidth of the shm backend, 2 (or `SHM_BENCH_WORLD`) processes.
//!
//! `cargo bench -p transport --bench shm_allreduce` — the binary re-executes itself once per
//! rank; rank 0 prints, per size, the median time of one f32 Sum all-reduce, the bus bandwidth
//! `bytes / median * 2(n-1)/n`, and the 10th-percentile time. Optional: `SHM_BENCH_SIZES=8,37000000`.

use std::process::Command;
use std::time::{Duration, Instant};

use transport::shm::ShmBackend;
use transport::{Backend, DType, ReduceOp, Timeouts};

fn main() {
    let world: usize = std::env::var("SHM_BENCH_WORLD")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    match std::env::var("SHM_BENCH_RANK") {
        Ok(rank) => worker(rank.parse().expect("rank"), world),
        Err(_) => parent(world),
    }
}

fn parent(world: usize) {
    let job = format!("bench-{}", std::process::id());
    let exe = std::env::current_exe().expect("current_exe");
    let children: Vec<_> = (0..world)
        .map(|rank| {
            Command::new(&exe)
                .env("SHM_BENCH_RANK", rank.to_string())
                .env("SHM_BENCH_WORLD", world.to_string())
                .env("SHM_BENCH_JOB", &job)
                .spawn()
                .expect("spawn")
        })
        .collect();
    let mut failed = false;
    for mut c in children {
        failed |= !c.wait().expect("wait").success();
    }
    if failed {
        eprintln!("a rank failed");
        std::process::exit(1);
    }
}

fn sizes() -> Vec<usize> {
    match std::env::var("SHM_BENCH_SIZES") {
        Ok(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => vec![8, 4 << 10, 64 << 10, 1 << 20, 8 << 20, 37_000_000],
    }
}

/// What the machine's memory system gives one process at the moment: copy a 37 MB buffer
/// into a 1 MiB area and back chunk by chunk (the all-reduce's minimal traffic per rank).
/// Reported so numbers taken on a busy machine can be judged.
fn memcpy_baseline() -> f64 {
    const N: usize = 37_000_000;
    const C: usize = 1 << 20;
    let src = vec![1u8; N];
    let mut dst = vec![2u8; N];
    let mut stage = vec![3u8; C];
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for (s, d) in src.chunks(C).zip(dst.chunks_mut(C)) {
            stage[..s.len()].copy_from_slice(s);
            d.copy_from_slice(&stage[..s.len()]);
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    N as f64 / best / 1e9
}

fn worker(rank: usize, world: usize) {
    let job = std::env::var("SHM_BENCH_JOB").expect("job");
    let timeouts = Timeouts {
        connect: Duration::from_secs(30),
        ..Timeouts::default()
    };
    let mut b = ShmBackend::attach(&job, rank, world, &timeouts).expect("attach");
    if rank == 0 {
        println!(
            "memcpy baseline right now (37 MB buffer through a 1 MiB staging area, in+out): \
             {:.2} GB/s",
            memcpy_baseline()
        );
        println!("shm all_reduce f32 Sum, {world} ranks (median of per-call times)");
        println!(
            "{:>12} {:>8} {:>12} {:>12} {:>12}",
            "bytes", "iters", "median", "busbw GB/s", "p10"
        );
    }
    for bytes in sizes() {
        let n = bytes / 4;
        let mut buf: Vec<f32> = (0..n).map(|i| (i % 7) as f32).collect();
        // About 0.5 s per size, at least 5 and at most 20000 calls.
        let iters = (400_000_000 / bytes.max(1)).clamp(5, 20_000);
        let mut times = Vec::with_capacity(iters);
        for i in 0..iters + iters / 10 + 2 {
            b.barrier().expect("barrier");
            let t = Instant::now();
            b.all_reduce(
                bytemuck::cast_slice_mut(&mut buf),
                DType::F32,
                ReduceOp::Sum,
            )
            .expect("all_reduce");
            if i >= iters / 10 + 2 {
                times.push(t.elapsed());
            }
            // Keep values bounded.
            if i % 16 == 15 {
                buf.iter_mut().for_each(|v| *v = 1.0);
            }
        }
        times.sort();
        if rank == 0 {
            let median = times[times.len() / 2];
            let bus =
                bytes as f64 / median.as_secs_f64() * 2.0 * (world - 1) as f64 / world as f64 / 1e9;
            // p10: the time when both ranks happen to be on a core (telling on busy machines).
            let p10 = times[times.len() / 10];
            println!(
                "{bytes:>12} {:>8} {:>12.2?} {bus:>12.2} {:>12.2?}",
                times.len(),
                median,
                p10
            );
        }
    }
}
