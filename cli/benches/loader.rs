//! The input pipeline's own cost: building one training batch (crop + flip + normalise, what
//! the loader thread does while a step runs) from Fashion-MNIST, when installed, and from
//! synthetic data, side by side. Datasets are decoded once at load time, so a batch of either
//! costs the same work; this bench shows how small it is next to a step (the loader thread
//! prepares `PREFETCH_BATCHES` ahead, off the critical path).
//!
//! `cargo bench -p dtrain --bench loader` (batch 64; `DTRAIN_BENCH_BATCH` overrides).

use std::time::Instant;

use dtrain::data::{fashion_mnist, make_batch, synthetic, DataSplit};

fn per_batch_ms(split: &DataSplit, batch: usize, rounds: usize) -> f64 {
    let indices: Vec<usize> = (0..split.n).collect();
    let start = Instant::now();
    let mut sink = 0f32;
    for r in 0..rounds {
        let chunk = indices
            .chunks(batch)
            .nth(r % (split.n / batch))
            .unwrap_or(&indices);
        let b = make_batch(split, chunk, Some((0, r)));
        sink += b.images[0];
    }
    std::hint::black_box(sink);
    start.elapsed().as_secs_f64() * 1e3 / rounds as f64
}

fn main() {
    let batch: usize = std::env::var("DTRAIN_BENCH_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let rounds = 200;
    let synth = synthetic::generate(0, synthetic::Split::Train, 10_000).expect("synthetic data");
    println!("batch {batch}, {rounds} batches, one thread");
    println!(
        "synthetic       {:8.3} ms/batch",
        per_batch_ms(&synth, batch, rounds)
    );
    match fashion_mnist::find_dir(std::path::Path::new("./data"))
        .and_then(|d| fashion_mnist::load(&d))
    {
        Ok((train, _)) => println!(
            "fashion-mnist   {:8.3} ms/batch",
            per_batch_ms(&train, batch, rounds)
        ),
        Err(e) => println!("fashion-mnist   skipped: {e}"),
    }
}
