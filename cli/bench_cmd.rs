//! `dtrain bench --transport shm|tcp --num-nodes N [--format table|json]`: collective
//! bandwidth and latency of a transport, nccl-tests style.
//!
//! Without `--rank`, the command starts N local ranks of itself (through the launcher's
//! supervision: a failing rank stops the others) and rank 0 prints the result. With `--rank`
//! (and `--master-ip` for ranks on other hosts), this process is one rank of a bench job.

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::args::{parse_master_addr, TransportArg, DEFAULT_MASTER_PORT};
use crate::launch::{free_port, run_local_ranks, LocalRanks};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchFormat {
    /// Human-readable table
    Table,
    /// One JSON object per row
    Json,
}

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// Transport to measure
    #[arg(long, value_enum, default_value = "auto")]
    pub transport: TransportArg,
    /// Number of ranks
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub num_nodes: usize,
    /// Join a bench job as this rank instead of starting all ranks locally
    #[arg(long)]
    pub rank: Option<usize>,
    /// Address of rank 0: IP, IP:PORT or tcp://IP:PORT [default: 127.0.0.1]
    #[arg(long, value_name = "ADDR")]
    pub master_ip: Option<String>,
    /// Port of rank 0 [default: a free port when starting ranks locally, else 29500]
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    #[arg(long, value_enum, default_value = "table")]
    pub format: BenchFormat,
    /// Smallest message, bytes (suffixes K, M, G allowed)
    #[arg(long, value_name = "BYTES", default_value = "4K", value_parser = parse_size)]
    pub min_bytes: usize,
    /// Largest message, bytes (suffixes K, M, G allowed)
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    pub max_bytes: usize,
    /// Deadline of one collective, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
}

/// "4096", "4K", "4KiB", "16M", "1G" → bytes (binary multiples).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 4096, 64K or 16M"))?;
    let mult: usize = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use K, M or G)")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Transport(#[from] transport::Error),
    #[error(transparent)]
    Launch(#[from] crate::launch::LaunchError),
}

fn validate(args: &BenchArgs) -> Result<(), BenchError> {
    if args.num_nodes < 2 {
        return Err(BenchError::Usage(format!(
            "--num-nodes must be at least 2 for a transport benchmark, got {}",
            args.num_nodes
        )));
    }
    if let Some(r) = args.rank {
        if r >= args.num_nodes {
            return Err(BenchError::Usage(format!(
                "--rank {r} is out of range for --num-nodes {}",
                args.num_nodes
            )));
        }
    }
    if args.min_bytes < 4 || args.min_bytes > args.max_bytes {
        return Err(BenchError::Usage(format!(
            "need 4 <= --min-bytes <= --max-bytes, got {} and {}",
            args.min_bytes, args.max_bytes
        )));
    }
    if args.timeout == 0 {
        return Err(BenchError::Usage(
            "--timeout must be at least 1 second".into(),
        ));
    }
    Ok(())
}

/// `dtrain bench`. Returns the exit code.
pub fn run(args: &BenchArgs) -> Result<u8, BenchError> {
    validate(args)?;
    let (host, port_in_addr) = match &args.master_ip {
        Some(raw) => parse_master_addr(raw).map_err(|e| BenchError::Usage(e.to_string()))?,
        None => ("127.0.0.1".to_string(), None),
    };
    if let (Some(p), Some(q)) = (args.master_port, port_in_addr) {
        if p != q {
            return Err(BenchError::Usage(format!(
                "--master-port {p} contradicts the port {q} given in --master-ip"
            )));
        }
    }
    let port = args.master_port.or(port_in_addr);
    match args.rank {
        Some(rank) => {
            run_rank(args, &host, port.unwrap_or(DEFAULT_MASTER_PORT), rank)?;
            Ok(0)
        }
        None => spawn_local(args, &host, port),
    }
}

/// Start N local ranks of `dtrain bench --rank k ...`; rank 0's stdout passes through.
fn spawn_local(args: &BenchArgs, host: &str, port: Option<u16>) -> Result<u8, BenchError> {
    let port = match port {
        Some(p) => p,
        None => {
            free_port().map_err(|e| BenchError::Usage(format!("cannot pick a free port: {e}")))?
        }
    };
    let transport = match args.transport {
        TransportArg::Auto => "auto",
        TransportArg::Shm => "shm",
        TransportArg::Tcp => "tcp",
    };
    let format = match args.format {
        BenchFormat::Table => "table",
        BenchFormat::Json => "json",
    };
    let common: Vec<OsString> = [
        "bench".to_string(),
        "--transport".into(),
        transport.into(),
        "--num-nodes".into(),
        args.num_nodes.to_string(),
        "--master-ip".into(),
        format!("{host}:{port}"),
        "--format".into(),
        format.into(),
        "--min-bytes".into(),
        args.min_bytes.to_string(),
        "--max-bytes".into(),
        args.max_bytes.to_string(),
        "--timeout".into(),
        args.timeout.to_string(),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let spec = LocalRanks {
        n: args.num_nodes,
        args_for: Box::new(move |rank| {
            let mut a = common.clone();
            a.push("--rank".into());
            a.push(rank.to_string().into());
            a
        }),
        env_for: Box::new(|_| Vec::new()),
        prefix_stdout: false,
        grace: Duration::from_secs(5),
    };
    Ok(run_local_ranks(spec)?)
}

/// One rank: connect, sweep, rank 0 prints.
fn run_rank(args: &BenchArgs, host: &str, port: u16, rank: usize) -> Result<(), BenchError> {
    let mut cfg = transport::CommConfig::new(host, port, rank, args.num_nodes);
    cfg.transport = args.transport.into();
    cfg.auth_token = std::env::var("DTRAIN_AUTH_TOKEN").ok();
    cfg.timeouts.collective = Duration::from_secs(args.timeout);
    // Ranks started with different sweeps would deadlock mid-way: reject them at rendezvous.
    cfg.config_hash = {
        let text = format!(
            "bench;{};{};{}",
            args.num_nodes, args.min_bytes, args.max_bytes
        );
        text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
        })
    };
    let mut comm = transport::Communicator::connect(&cfg)?;
    let rows = sweep::all_reduce_sweep(&mut comm, args.min_bytes, args.max_bytes)?;
    if rank == 0 {
        let name = comm.transport_name();
        match args.format {
            BenchFormat::Table => print!("{}", sweep::table(&rows, name, args.num_nodes)),
            BenchFormat::Json => {
                for r in &rows {
                    println!("{}", sweep::json(r, name, args.num_nodes));
                }
            }
        }
    }
    Ok(())
}

/// All-reduce sweep over message sizes (doubling from min to max), timed on every rank;
/// the reported time is the slowest rank's.
mod sweep {
    use std::fmt::Write as _;
    use std::time::Instant;

    use transport::{Communicator, ReduceOp};

    #[derive(Clone, Debug)]
    pub struct Row {
        pub bytes: usize,
        pub iters: usize,
        pub seconds: f64,
        pub algbw_gbps: f64,
        pub busbw_gbps: f64,
    }

    /// Enough iterations for a stable mean without long runs on a shared machine.
    fn iterations(bytes: usize) -> usize {
        ((64usize << 20) / bytes.max(1)).clamp(3, 200)
    }

    pub fn all_reduce_sweep(
        comm: &mut Communicator,
        min_bytes: usize,
        max_bytes: usize,
    ) -> transport::Result<Vec<Row>> {
        let world = comm.world_size() as f64;
        let mut rows = Vec::new();
        let mut bytes = min_bytes / 4 * 4;
        while bytes <= max_bytes {
            let mut buf = vec![1.0f32; bytes / 4];
            let iters = iterations(bytes);
            for _ in 0..2 {
                comm.all_reduce(&mut buf, ReduceOp::Sum)?; // warm-up
            }
            comm.barrier()?;
            let start = Instant::now();
            for _ in 0..iters {
                comm.all_reduce(&mut buf, ReduceOp::Sum)?;
            }
            let mut secs = [start.elapsed().as_secs_f64() / iters as f64];
            comm.all_reduce(&mut secs, ReduceOp::Max)?;
            let algbw = bytes as f64 / secs[0] / 1e9;
            rows.push(Row {
                bytes,
                iters,
                seconds: secs[0],
                algbw_gbps: algbw,
                busbw_gbps: algbw * 2.0 * (world - 1.0) / world,
            });
            bytes *= 2;
        }
        Ok(rows)
    }

    pub fn table(rows: &[Row], transport: &str, world: usize) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# all_reduce (sum, f32), transport {transport}, {world} ranks"
        );
        let _ = writeln!(
            s,
            "{:>12} {:>6} {:>12} {:>12} {:>12}",
            "bytes", "iters", "time_us", "algbw_GB/s", "busbw_GB/s"
        );
        for r in rows {
            let _ = writeln!(
                s,
                "{:>12} {:>6} {:>12.1} {:>12.3} {:>12.3}",
                r.bytes,
                r.iters,
                r.seconds * 1e6,
                r.algbw_gbps,
                r.busbw_gbps
            );
        }
        s
    }

    pub fn json(r: &Row, transport: &str, world: usize) -> String {
        serde_json::json!({
            "op": "all_reduce",
            "transport": transport,
            "world_size": world,
            "bytes": r.bytes,
            "iters": r.iters,
            "time_us": r.seconds * 1e6,
            "algbw_gbps": r.algbw_gbps,
            "busbw_gbps": r.busbw_gbps,
        })
        .to_string()
    }
}
