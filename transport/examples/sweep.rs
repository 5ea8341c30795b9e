//! Runs `bench::run_sweep` over N local ranks (this program re-executes itself per rank).
//!
//! `cargo run --release -p transport --example sweep -- <ranks> <tcp|shm|auto> [min_bytes] [max_bytes] [collectives,...]`
//! e.g. `... -- 2 tcp 8 37748736 all_reduce,all_reduce_bf16`. Prints the table and JSON lines
//! from rank 0. One rank per command instead (e.g. in different network namespaces): set
//! `SWEEP_RANK`, `SWEEP_PORT` and `SWEEP_MASTER` (rank 0's address, default 127.0.0.1).

use std::process::Command;

use transport::bench::{format_table, run_sweep, BenchCollective, SweepConfig};
use transport::{CommConfig, Communicator, TransportKind};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let ranks: usize = arg(1, "2").parse().expect("ranks");
    let transport = match arg(2, "tcp").as_str() {
        "shm" => TransportKind::Shm,
        "auto" => TransportKind::Auto,
        _ => TransportKind::Tcp,
    };
    let mut cfg = SweepConfig {
        min_bytes: arg(3, "8").parse().expect("min bytes"),
        max_bytes: arg(4, "134217728").parse().expect("max bytes"),
        ..SweepConfig::default()
    };
    cfg.memcpy = std::env::var_os("SWEEP_NO_MEMCPY").is_none();
    if let Some(list) = args.get(5) {
        cfg.collectives = BenchCollective::ALL
            .into_iter()
            .filter(|c| list.split(',').any(|n| n == c.name()))
            .collect();
    }
    if let Ok(rank) = std::env::var("SWEEP_RANK") {
        let rank: usize = rank.parse().expect("rank");
        let port: u16 = std::env::var("SWEEP_PORT")
            .expect("port")
            .parse()
            .expect("port");
        let master = std::env::var("SWEEP_MASTER").unwrap_or_else(|_| "127.0.0.1".into());
        let mut cc = CommConfig::new(master, port, rank, ranks);
        cc.transport = transport;
        let mut comm = Communicator::connect(&cc).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        let rows = run_sweep(&mut comm, &cfg).unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        if rank == 0 {
            print!("{}", format_table(&rows));
            for r in &rows {
                println!("{}", r.to_json());
            }
        }
        return;
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let exe = std::env::current_exe().expect("current exe");
    let mut children: Vec<_> = (0..ranks)
        .map(|r| {
            Command::new(&exe)
                .args(&args[1..])
                .env("SWEEP_RANK", r.to_string())
                .env("SWEEP_PORT", port.to_string())
                .spawn()
                .expect("spawn rank")
        })
        .collect();
    let mut ok = true;
    for c in children.iter_mut() {
        ok &= c.wait().map(|s| s.success()).unwrap_or(false);
    }
    std::process::exit(if ok { 0 } else { 1 });
}
