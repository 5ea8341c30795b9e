//! Whole-program benchmark: mean iteration time of `dtrain` per sync mode, as real processes
//! (`dtrain launch`), read from the program's own `Average time for N iterations` line (the
//! first iteration, a warm-up, is excluded).
//!
//! `cargo bench -p dtrain --bench iteration` runs full VGG11, 2 ranks × 1 thread, batch 128
//! per rank, synthetic data, 6 iterations. Override with environment variables:
//! `DTRAIN_BENCH_MODEL` (e.g. `64,M,128,M` for a quick run), `DTRAIN_BENCH_BATCH`,
//! `DTRAIN_BENCH_ITERS`, `DTRAIN_BENCH_RANKS`, `DTRAIN_BENCH_THREADS`, `DTRAIN_BENCH_MODES`
//! (comma-separated, default `single,gather-scatter,allreduce,ddp`),
//! `DTRAIN_BENCH_TRANSPORT` (default `auto`).

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_dtrain");

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(29611)
}

fn main() {
    // `cargo bench` passes `--bench`; libtest-style filters are ignored.
    let model = env_or("DTRAIN_BENCH_MODEL", "vgg11");
    let batch = env_or("DTRAIN_BENCH_BATCH", "128");
    let iters = env_or("DTRAIN_BENCH_ITERS", "6");
    let ranks = env_or("DTRAIN_BENCH_RANKS", "2");
    let threads = env_or("DTRAIN_BENCH_THREADS", "1");
    let transport = env_or("DTRAIN_BENCH_TRANSPORT", "auto");
    let modes = env_or("DTRAIN_BENCH_MODES", "single,gather-scatter,allreduce,ddp");
    let batch_n: usize = batch.parse().unwrap_or(128);
    let train_images = (batch_n * 20).to_string();
    println!("model {model}, batch {batch}/rank, {ranks} ranks x {threads} thread(s), {iters} iterations, transport {transport}");
    println!("{:<16} {:>14} {:>14}", "mode", "ms/iteration", "images/s");
    for mode in modes.split(',') {
        let world = if mode == "single" {
            "1"
        } else {
            ranks.as_str()
        };
        let port = free_port().to_string();
        let common = [
            "--mode",
            mode,
            "--dataset",
            "synthetic",
            "--synthetic-train",
            &train_images,
            "--synthetic-test",
            "64",
            "--model",
            &model,
            "--batch-size",
            &batch,
            "--threads",
            &threads,
            "--max-iters",
            &iters,
            "--log-every",
            "1000000",
            "--no-progress",
            "--transport",
            &transport,
            "--master-port",
            &port,
        ];
        let out = if world == "1" {
            Command::new(BIN).args(common).output()
        } else {
            Command::new(BIN)
                .args(["launch", "--nproc-per-node", world])
                .args(common)
                .output()
        };
        let out = match out {
            Ok(o) => o,
            Err(e) => {
                eprintln!("{mode}: cannot run {BIN}: {e}");
                std::process::exit(1);
            }
        };
        let text = String::from_utf8_lossy(&out.stdout);
        // The slowest rank sets the pace: report the largest per-rank mean.
        let secs = text
            .lines()
            .filter_map(|l| l.split("Average time for ").nth(1))
            .filter_map(|rest| rest.split(": ").nth(1))
            .filter_map(|v| v.trim_end_matches('s').trim().parse::<f64>().ok())
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))));
        match (out.status.success(), secs) {
            (true, Some(s)) => {
                let images = batch_n as f64 * world.parse::<f64>().unwrap_or(1.0) / s;
                println!("{mode:<16} {:>14.1} {images:>14.1}", s * 1000.0);
            }
            _ => {
                eprintln!(
                    "{mode}: run failed ({}):\n{}\n{}",
                    out.status,
                    text,
                    String::from_utf8_lossy(&out.stderr)
                );
                std::process::exit(1);
            }
        }
    }
}
