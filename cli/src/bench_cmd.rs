//! `dtrain bench --transport shm|tcp --num-nodes N [--format table|json]`: collective
//! bandwidth and latency of a transport, nccl-tests style.
//!
//! Without `--rank`, the command starts N local ranks of itself (through the launcher's
//! supervision: a failing rank stops the others) and rank 0 prints the result. With `--rank`
//! (and `--master-ip` for ranks on other hosts), this process is one rank of a bench job.
//! The measurement itself is `transport::bench::run_sweep` (median of slowest-rank times).

use std::ffi::OsString;
use std::time::Duration;

use clap::{Args, ValueEnum};

use transport::bench::{format_table, run_sweep, BenchCollective, SweepConfig};

use crate::args::parse_master_addr;
use crate::config::{TransportArg, DEFAULT_MASTER_PORT};
use crate::hash::fnv1a64;
use crate::launch::{free_port, run_local_ranks, BindCores, LocalRanks};
use crate::sync::connect_peers;

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
    #[arg(long, value_name = "BYTES", default_value = "8", value_parser = parse_size)]
    pub min_bytes: usize,
    /// Largest message, bytes (suffixes K, M, G allowed)
    #[arg(long, value_name = "BYTES", default_value = "128M", value_parser = parse_size)]
    pub max_bytes: usize,
    /// Size multiplier between rows
    #[arg(long, default_value_t = 4)]
    pub factor: usize,
    /// Collectives to time (comma-separated)
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "all-reduce,all-reduce-bf16,all-reduce-fp16,broadcast,gather,scatter,all-gather"
    )]
    pub collectives: Vec<CollectiveArg>,
    /// Timed repetitions for small sizes (fewer for large ones)
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Warm-up repetitions per size
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Leave out the local memcpy reference rows
    #[arg(long)]
    pub no_memcpy: bool,
    /// All-reduce ordinary heap buffers instead of buffers from the transport's
    /// `alloc_buffer` (which peers read in place on shared memory, as DDP's buckets)
    #[arg(long)]
    pub heap_buffers: bool,
    /// Pin each locally started rank to its own CPUs (auto: when there are at least as many
    /// CPUs as ranks)
    #[arg(long, value_enum, value_name = "MODE", default_value = "auto")]
    pub bind_cores: BindCores,
    /// Deadline of one collective, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub timeout: u64,
    /// Measure nothing: print the modelled VGG11 DDP step on 2..1024 hosts (ring vs
    /// halving-doubling vs tree, see README "Scale on paper")
    #[arg(long)]
    pub simulate: bool,
    /// --simulate: link speed between hosts, Gbit/s
    #[arg(long, value_name = "GBIT", default_value_t = 10.0)]
    pub link_gbit: f64,
    /// --simulate: one-way latency between hosts, microseconds
    #[arg(long, value_name = "US", default_value_t = 50.0)]
    pub latency_us: f64,
    /// --simulate: the one-process step (forward + backward + SGD), milliseconds
    #[arg(long, value_name = "MS", default_value_t = 650.0)]
    pub step_ms: f64,
    /// --simulate: backward's share of that step
    #[arg(long, value_name = "FRACTION", default_value_t = 0.65)]
    pub backward_share: f64,
    /// --simulate: images per host and step
    #[arg(long, value_name = "N", default_value_t = 128)]
    pub batch_size: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CollectiveArg {
    #[value(alias = "all_reduce", alias = "allreduce")]
    AllReduce,
    /// The same f32 elements all-reduced as bfloat16 (`--grad-compression bf16`); bytes
    /// and bandwidth are counted in f32 terms, so the row lines up with the f32 one
    #[value(alias = "all_reduce_bf16")]
    AllReduceBf16,
    /// As all-reduce-bf16, in IEEE half precision (`--grad-compression fp16`)
    #[value(alias = "all_reduce_fp16")]
    AllReduceFp16,
    Broadcast,
    Gather,
    Scatter,
    #[value(alias = "all_gather", alias = "allgather")]
    AllGather,
}

impl From<CollectiveArg> for BenchCollective {
    fn from(c: CollectiveArg) -> Self {
        match c {
            CollectiveArg::AllReduce => BenchCollective::AllReduce,
            CollectiveArg::AllReduceBf16 => BenchCollective::AllReduceBf16,
            CollectiveArg::AllReduceFp16 => BenchCollective::AllReduceF16,
            CollectiveArg::Broadcast => BenchCollective::Broadcast,
            CollectiveArg::Gather => BenchCollective::Gather,
            CollectiveArg::Scatter => BenchCollective::Scatter,
            CollectiveArg::AllGather => BenchCollective::AllGather,
        }
    }
}

impl CollectiveArg {
    fn flag_value(self) -> &'static str {
        match self {
            CollectiveArg::AllReduce => "all-reduce",
            CollectiveArg::AllReduceBf16 => "all-reduce-bf16",
            CollectiveArg::AllReduceFp16 => "all-reduce-fp16",
            CollectiveArg::Broadcast => "broadcast",
            CollectiveArg::Gather => "gather",
            CollectiveArg::Scatter => "scatter",
            CollectiveArg::AllGather => "all-gather",
        }
    }
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
    if args.min_bytes == 0 || args.min_bytes > args.max_bytes {
        return Err(BenchError::Usage(format!(
            "need 1 <= --min-bytes <= --max-bytes, got {} and {}",
            args.min_bytes, args.max_bytes
        )));
    }
    if args.factor < 2 {
        return Err(BenchError::Usage(format!(
            "--factor must be at least 2, got {}",
            args.factor
        )));
    }
    if args.iters == 0 {
        return Err(BenchError::Usage("--iters must be at least 1".into()));
    }
    if args.timeout == 0 {
        return Err(BenchError::Usage(
            "--timeout must be at least 1 second".into(),
        ));
    }
    // Each rank holds about three buffers of the largest size (all-reduce, send, gather);
    // ranks started here share this machine.
    let ranks_here = if args.rank.is_some() {
        1
    } else {
        args.num_nodes
    };
    let need = (args.max_bytes as u128)
        .saturating_mul(3)
        .saturating_mul(ranks_here as u128);
    if let Some(available) = crate::memory::available_memory().filter(|&a| need > a) {
        return Err(BenchError::Usage(format!(
            "--max-bytes {} needs at least {} of memory for {ranks_here} rank(s) but {} is available",
            args.max_bytes,
            crate::memory::human_bytes(need),
            crate::memory::human_bytes(available)
        )));
    }
    Ok(())
}

/// `dtrain bench`. Returns the exit code.
pub fn run(args: &BenchArgs) -> Result<u8, BenchError> {
    if args.simulate {
        print!(
            "{}",
            crate::simulate::report(&scenario(args)?, &crate::simulate::HOSTS)
        );
        return Ok(0);
    }
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

/// The `--simulate` flags, checked.
fn scenario(args: &BenchArgs) -> Result<crate::simulate::Scenario, BenchError> {
    let positive = |name: &str, v: f64| match v.is_finite() && v > 0.0 {
        true => Ok(v),
        false => Err(BenchError::Usage(format!(
            "{name} must be a positive number, got {v}"
        ))),
    };
    let share = args.backward_share;
    if !(share > 0.0 && share <= 1.0) {
        return Err(BenchError::Usage(format!(
            "--backward-share must be in (0, 1], got {share}"
        )));
    }
    if args.batch_size == 0 {
        return Err(BenchError::Usage("--batch-size must be at least 1".into()));
    }
    Ok(crate::simulate::Scenario {
        link: transport::algorithms::cost_model::Link {
            latency_s: positive("--latency-us", args.latency_us)? * 1e-6,
            bytes_per_s: positive("--link-gbit", args.link_gbit)? * 1e9 / 8.0,
        },
        step_s: positive("--step-ms", args.step_ms)? * 1e-3,
        backward_share: share,
        batch: args.batch_size,
        first_bucket_mb: crate::config::DEFAULT_FIRST_BUCKET_MB,
        bucket_cap_mb: crate::config::DEFAULT_BUCKET_CAP_MB,
    })
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
        "--factor".into(),
        args.factor.to_string(),
        "--iters".into(),
        args.iters.to_string(),
        "--warmup".into(),
        args.warmup.to_string(),
        "--collectives".into(),
        args.collectives
            .iter()
            .map(|c| c.flag_value())
            .collect::<Vec<_>>()
            .join(","),
    ]
    .into_iter()
    .chain(args.no_memcpy.then(|| "--no-memcpy".to_string()))
    .chain(args.heap_buffers.then(|| "--heap-buffers".to_string()))
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
        bind_cores: args.bind_cores,
    };
    Ok(run_local_ranks(spec)?)
}

/// One rank: connect, sweep, rank 0 prints.
fn run_rank(args: &BenchArgs, host: &str, port: u16, rank: usize) -> Result<(), BenchError> {
    let mut cfg = transport::CommConfig::new(host, port, rank, args.num_nodes);
    cfg.transport = args.transport.into();
    cfg.timeouts.collective = Duration::from_secs(args.timeout);
    // Ranks started with different sweeps would deadlock mid-way: reject them at rendezvous.
    let sweep = SweepConfig {
        min_bytes: args.min_bytes,
        max_bytes: args.max_bytes,
        factor: args.factor,
        warmup: args.warmup,
        iters: args.iters,
        collectives: args.collectives.iter().map(|&c| c.into()).collect(),
        memcpy: !args.no_memcpy,
        shared_buffers: !args.heap_buffers,
        ..SweepConfig::default()
    };
    cfg.config_hash = fnv1a64(format!("bench;{};{sweep:?}", args.num_nodes).as_bytes());
    let mut comm = connect_peers(cfg)?;
    let rows = run_sweep(&mut comm, &sweep)?;
    if rank == 0 {
        match args.format {
            BenchFormat::Table => print!("{}", format_table(&rows)),
            BenchFormat::Json => {
                for r in &rows {
                    println!("{}", r.to_json());
                }
            }
        }
    }
    Ok(())
}
