//! Would several TCP connections per rank pair help? Times a 2-rank all-reduce of `BYTES`
//! (default 36 MiB of f32) split over `K` independent TCP communicators, one thread each — K
//! sockets per pair and K poll loops, an upper bound for what striping one all-reduce over
//! several sockets (NCCL's NSOCKS_PERTHREAD) or adding send threads could gain. K = 1 is the
//! transport as it is.
//!
//! One rank per command (e.g. in two network namespaces, as `scripts/cluster_bench.py
//! collectives --parallel-links 1,2,4` runs it):
//! `PL_RANK=r PL_MASTER=10.77.0.1 PL_PORT=29700 PL_K=4 [PL_BYTES=37748736] [PL_REPS=8]
//! target/release/examples/parallel_links` — ports PL_PORT..PL_PORT+K-1 are used. Rank 0 prints
//! one JSON line: `{"k":K,"bytes":B,"median_ms":M,"times_ms":[...]}` (first repetition
//! dropped as warm-up; each repetition starts after a barrier on the first communicator).

use std::time::Instant;

use transport::{CommConfig, Communicator, ReduceOp, TransportKind};

fn env<T: std::str::FromStr>(name: &str, default: Option<T>) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v} is not valid")),
        Err(_) => default.unwrap_or_else(|| panic!("set {name}")),
    }
}

fn main() {
    let rank: usize = env("PL_RANK", None);
    let master: String = env("PL_MASTER", Some("127.0.0.1".to_string()));
    let port: u16 = env("PL_PORT", None);
    let k: usize = env("PL_K", Some(1));
    let bytes: usize = env("PL_BYTES", Some(36 << 20));
    let reps: usize = env("PL_REPS", Some(8));
    let mut comms: Vec<Communicator> = (0..k)
        .map(|i| {
            let mut cfg = CommConfig::new(master.clone(), port + i as u16, rank, 2);
            cfg.transport = TransportKind::Tcp;
            Communicator::connect(&cfg).unwrap_or_else(|e| panic!("rank {rank}, link {i}: {e}"))
        })
        .collect();
    let per_link = bytes / 4 / k;
    let mut bufs: Vec<Vec<f32>> = (0..k).map(|_| vec![1.0f32; per_link]).collect();
    let mut times = Vec::new();
    for rep in 0..reps + 1 {
        comms[0].barrier().expect("barrier");
        let t0 = Instant::now();
        std::thread::scope(|s| {
            for (c, b) in comms.iter_mut().zip(bufs.iter_mut()) {
                s.spawn(move || c.all_reduce(b, ReduceOp::Sum).expect("all_reduce"));
            }
        });
        if rep > 0 {
            times.push(t0.elapsed().as_secs_f64() * 1e3);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    if rank == 0 {
        let list: Vec<String> = times.iter().map(|t| format!("{t:.2}")).collect();
        println!(
            "{{\"k\":{k},\"bytes\":{},\"median_ms\":{:.2},\"times_ms\":[{}]}}",
            per_link * 4 * k,
            sorted[sorted.len() / 2],
            list.join(",")
        );
    }
}
