//! What a checkpoint costs: the copy of the training state that stalls the training loop
//! (`Snapshot::take`) and the atomic, fsynced write that a background thread does
//! (`Snapshot::save`), for a model after one SGD step (so momentum exists); and what a load
//! costs: reading the file, parsing it into tensors, and checking its checksums
//! (`integrity::verify`, xxh3-64), next to FNV-1a over the same bytes (why not FNV).
//!
//! `cargo bench -p dtrain --bench checkpoint` (VGG11); `DTRAIN_BENCH_MODEL` picks another
//! `--model` spec, `DTRAIN_BENCH_REPS` the repetitions (default 7), `DTRAIN_BENCH_DIR` where
//! to write (default the system's temporary folder).

use std::time::Instant;

use dtrain::checkpoint::{integrity, read_checkpoint, Position, Snapshot};

fn median_and_range(mut ms: Vec<f64>) -> String {
    ms.sort_by(f64::total_cmp);
    format!(
        "median {:.1} ms ({:.1}–{:.1} ms)",
        ms[ms.len() / 2],
        ms[0],
        ms[ms.len() - 1]
    )
}

fn main() {
    let spec = std::env::var("DTRAIN_BENCH_MODEL").unwrap_or_else(|_| "vgg11".into());
    let reps: usize = std::env::var("DTRAIN_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(7)
        .max(1);
    let mut model = dtrain::train::build_model(&spec, 0).expect("--model spec");
    let mut sgd = engine::optim::Sgd::<f32>::new(0.1, 0.9, 1e-4);
    for p in model.params_mut() {
        p.grad.iter_mut().for_each(|g| *g = 1e-3);
    }
    sgd.step(model.params_mut());
    let dir = std::env::var("DTRAIN_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir())
        .join(format!("dtrain-bench-checkpoint-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("bench folder");
    let path = dir.join("bench.safetensors");
    let (mut copies, mut writes) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = Instant::now();
        let snapshot = Snapshot::take(&spec, &model, &sgd, Position::default(), Default::default());
        copies.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        snapshot.save(&path).expect("save");
        writes.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
    let (mut reads, mut parses, mut verifies, mut fnvs) = (vec![], vec![], vec![], vec![]);
    for _ in 0..reps {
        let t = Instant::now();
        let raw = read_checkpoint(&path).expect("read");
        reads.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let loaded = engine::state::parse_tensors(&raw, &path).expect("parse");
        parses.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let verified = integrity::verify(&loaded).expect("intact");
        verifies.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(verified, integrity::Verified::Checked);
        let t = Instant::now();
        std::hint::black_box(dtrain::hash::fnv1a64(&raw));
        fnvs.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = std::fs::remove_dir_all(&dir);
    println!("model {spec}, checkpoint {bytes} bytes, {reps} repetitions");
    println!(
        "copy of the state (training stalls): {}",
        median_and_range(copies)
    );
    println!(
        "atomic write with fsync (background): {}",
        median_and_range(writes)
    );
    println!("load: read the file: {}", median_and_range(reads));
    println!("load: parse into tensors: {}", median_and_range(parses));
    println!(
        "load: verify the xxh3-64 checksums: {}",
        median_and_range(verifies)
    );
    println!(
        "(FNV-1a over the same bytes, for comparison: {})",
        median_and_range(fnvs)
    );
}
