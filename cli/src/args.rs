//! The `dtrain` command line: flags, launcher environment fallbacks, validation → [`TrainConfig`].
//!
//! Precedence for every distributed setting: an explicit flag, then the environment of the
//! launcher that started us (torchrun, then Slurm, then Open MPI — the first family with a
//! rank variable set wins, variables of different families are never mixed), then a default
//! for a single process. Every invalid value becomes one [`UsageError`] whose message fits on
//! one line; `main` prints it as `dtrain: error: ...` and exits with code 2.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser};

// Named, not a glob: the settings' vocabulary keeps its old `dtrain::args::` paths.
pub use crate::config::{
    DatasetKind, GradCompression, Mode, ResumeFrom, TransportArg, TransportKind, BOUND_ENV,
    DEFAULT_BUCKET_CAP_MB, DEFAULT_CIFAR_MD5, DEFAULT_CIFAR_URL, DEFAULT_FIRST_BUCKET_MB,
    DEFAULT_MASTER_PORT, MAX_CONV_WIDTH, MAX_LAYERS, MAX_THREADS, RESTART_COUNT_ENV,
};
pub use crate::usage::UsageError;

/// Everything one rank needs to train. Built only by [`parse_train_args`] /
/// [`resolve_train_args`]: the settings the launcher environment can supply are resolved into
/// fields here, every other flag is kept as given (validated) in [`TrainConfig::opts`].
#[derive(Clone, Debug, PartialEq)]
pub struct TrainConfig {
    pub master_addr: String,
    pub master_port: u16,
    /// World size: the number of ranks (processes), not of machines.
    pub num_nodes: usize,
    pub rank: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    pub transport: TransportKind,
    pub threads: usize,
    /// Draw the progress line: see [`draws_progress`].
    pub progress: bool,
    /// Where the ranks meet when the launcher hosts a TCPStore (torchrun's agent store,
    /// `TORCHELASTIC_USE_AGENT_STORE=True`): rank 0 publishes its rendezvous address there
    /// instead of binding `master_port`, which the store already holds. Not part of
    /// [`TrainConfig::config_hash`]: its key prefix differs per attempt.
    pub store: Option<transport::StoreRendezvous>,
    /// Where `master_addr`/`master_port` came from when dtrain derived them (under Slurm),
    /// said once by rank 0 when it meets the others.
    pub master_note: Option<String>,
    /// How many times the launcher restarted the job before this attempt (0 for the first),
    /// from [`RESTART_COUNT_ENV`].
    pub restart_count: usize,
    /// The flags used as given.
    pub opts: RunOptions,
}

impl TrainConfig {
    /// A single-process configuration with the original defaults (one thread, no progress
    /// bar); handy for tests.
    pub fn single_process_defaults() -> Self {
        let line = [
            "dtrain",
            "--mode",
            "single",
            "--threads",
            "1",
            "--no-progress",
        ];
        parse_train_args(line.map(OsString::from), &|_| None).expect("the default flags are valid")
    }

    /// Random crop and flip of training images (not `--no-augment`).
    pub fn augment(&self) -> bool {
        !self.opts.no_augment
    }

    /// Shuffled training order (not `--no-shuffle`).
    pub fn shuffle(&self) -> bool {
        !self.opts.no_shuffle
    }

    /// A stable digest (FNV-1a 64 over a canonical text) of the settings that must be equal
    /// on every rank for the run to be meaningful. Excludes per-rank and per-host things
    /// (rank, local rank, threads, paths, progress, deadlines, transport choice).
    pub fn config_hash(&self) -> u64 {
        let o = &self.opts;
        let max_iters = match o.max_iters {
            Some(n) => n.to_string(),
            None => "none".into(),
        };
        let canonical = format!(
            "world={};mode={};dataset={};batch={};lr={:08x};momentum={:08x};wd={:08x};seed={};\
             epochs={};max_iters={};model={};augment={};shuffle={};first_bucket={:016x};\
             bucket_cap={:016x};synthetic={}/{};grad_compression={};{}",
            self.num_nodes,
            o.mode.name(),
            o.dataset.name(),
            o.batch_size,
            o.lr.to_bits(),
            o.momentum.to_bits(),
            o.weight_decay.to_bits(),
            o.seed,
            o.epochs,
            max_iters,
            o.model,
            self.augment(),
            self.shuffle(),
            o.first_bucket_mb.to_bits(),
            o.bucket_cap_mb.to_bits(),
            o.synthetic_train,
            o.synthetic_test,
            o.grad_compression.name(),
            o.recipe.canonical(),
        );
        crate::hash::fnv1a64(canonical.as_bytes())
    }
}

fn invalid(msg: impl Into<String>) -> UsageError {
    UsageError::Invalid(msg.into())
}

/// The training flags. Everything the launcher environment can supply is optional so that
/// its variables can fill the gaps; the rest is [`RunOptions`].
#[derive(Args, Debug, Clone)]
pub struct TrainArgs {
    /// Address of rank 0: IP, IP:PORT or tcp://IP:PORT [env: MASTER_ADDR] [default: 127.0.0.1]
    #[arg(long, value_name = "ADDR")]
    pub master_ip: Option<String>,
    /// Port of rank 0's rendezvous [env: MASTER_PORT] [default: 29500]
    #[arg(long, value_name = "PORT")]
    pub master_port: Option<u16>,
    /// World size: number of ranks [env: WORLD_SIZE, SLURM_NTASKS, OMPI_COMM_WORLD_SIZE] [default: 1]
    #[arg(long, value_name = "N")]
    pub num_nodes: Option<usize>,
    /// This process's rank [env: RANK, SLURM_PROCID, OMPI_COMM_WORLD_RANK] [default: 0]
    #[arg(long)]
    pub rank: Option<usize>,
    /// Rank among the ranks of this host [env: LOCAL_RANK, SLURM_LOCALID, OMPI_COMM_WORLD_LOCAL_RANK]
    #[arg(long)]
    pub local_rank: Option<usize>,
    /// Number of ranks on this host [env: LOCAL_WORLD_SIZE, SLURM_NTASKS_PER_NODE, OMPI_COMM_WORLD_LOCAL_SIZE]
    #[arg(long, value_name = "N")]
    pub local_world_size: Option<usize>,
    /// Collective transport [default: auto: shared memory within a host, TCP between hosts]
    #[arg(long, value_enum)]
    pub transport: Option<TransportArg>,
    /// Compute threads of this rank [default: cores / local ranks, at least 1; all cores
    /// it is pinned to under `dtrain launch`]
    #[arg(long)]
    pub threads: Option<usize>,
    /// No progress bars even on a terminal
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub opts: RunOptions,
}

fn parse_resume(raw: &str) -> Result<ResumeFrom, String> {
    match raw {
        "" => Err("expected a checkpoint file or auto".into()),
        "auto" => Ok(ResumeFrom::Auto),
        path => Ok(ResumeFrom::File(PathBuf::from(path))),
    }
}

/// The training flags that are used as given (after validation).
#[derive(Args, Debug, Clone, PartialEq)]
pub struct RunOptions {
    /// Gradient synchronisation
    #[arg(long, value_enum, default_value = "ddp")]
    pub mode: Mode,
    /// Dataset
    #[arg(long, value_enum, default_value = "cifar10")]
    pub dataset: DatasetKind,
    /// Where datasets live (CIFAR-10 is downloaded here)
    #[arg(long, value_name = "DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// CIFAR-10 binary archive URL
    #[arg(long, value_name = "URL", default_value = DEFAULT_CIFAR_URL)]
    pub download_url: String,
    /// Expected MD5 of the archive (hex)
    #[arg(long, value_name = "HEX", default_value = DEFAULT_CIFAR_MD5)]
    pub download_md5: String,
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Images per rank per iteration
    #[arg(long, default_value_t = 64)]
    pub batch_size: usize,
    /// Learning rate
    #[arg(long, default_value_t = 0.1, allow_negative_numbers = true)]
    pub lr: f32,
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    pub momentum: f32,
    #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true)]
    pub weight_decay: f32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop after this many iterations (in total, across epochs)
    #[arg(long, value_name = "N")]
    pub max_iters: Option<usize>,
    /// Print a log line every N iterations
    #[arg(long, value_name = "N", default_value_t = 20)]
    pub log_every: usize,
    /// Disable random crop and flip
    #[arg(long)]
    pub no_augment: bool,
    /// Visit training samples in order
    #[arg(long)]
    pub no_shuffle: bool,
    /// Append one JSON object per iteration to FILE
    #[arg(long, value_name = "FILE")]
    pub metrics: Option<PathBuf>,
    /// Save a checkpoint to FILE (at the end of each epoch and of the run, and every
    /// --checkpoint-every iterations); rank 0 writes it
    #[arg(long, value_name = "FILE")]
    pub save_checkpoint: Option<PathBuf>,
    /// Also checkpoint every N iterations (in the background; needs --save-checkpoint)
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<usize>,
    /// Keep the N newest checkpoints: FILE, FILE.1 (the previous), ... FILE.<N-1>;
    /// --resume auto falls back to an older one when the newest is damaged
    #[arg(long, value_name = "N", default_value_t = 2)]
    pub keep_checkpoints: usize,
    /// Resume model, optimizer and position from a checkpoint FILE, or `auto`: from the
    /// newest intact file of the --save-checkpoint rotation if one exists, else start fresh
    /// (what a restarted rank does)
    #[arg(long, value_name = "FILE|auto", value_parser = parse_resume)]
    pub resume: Option<ResumeFrom>,
    /// Start from the weights of a checkpoint (fresh optimizer, epoch 0)
    #[arg(long, value_name = "FILE")]
    pub init_checkpoint: Option<PathBuf>,
    /// DDP: a bucket is sent as soon as it holds this many MB of gradients (smaller
    /// gradients wait for the next ones)
    #[arg(long, value_name = "MB", default_value_t = DEFAULT_FIRST_BUCKET_MB)]
    pub first_bucket_mb: f64,
    /// DDP: buckets are not merged beyond this many MB
    #[arg(long, value_name = "MB", default_value_t = DEFAULT_BUCKET_CAP_MB)]
    pub bucket_cap_mb: f64,
    /// Gradients on the wire: none (f32), bf16 or fp16 (half the bytes; ddp and allreduce)
    #[arg(long, value_enum, value_name = "FORMAT", default_value = "none")]
    pub grad_compression: GradCompression,
    /// Convolution algorithm for every layer and pass: auto (chosen per layer shape and
    /// pass), im2col, direct, winograd, winograd-f2 or winograd-f4; where the forced one cannot
    /// run a layer, that layer uses the automatic choice (--verbose says so)
    #[arg(long, value_name = "ALGO", default_value = "auto")]
    pub conv_algo: engine::ops::ConvAlgoOverride,
    /// f32, or bf16: mixed precision (bf16 operands, f32 accumulation) in the conv and
    /// classifier GEMMs; weights, SGD, batch norm, loss and checkpoints stay f32
    #[arg(long, value_name = "PRECISION", default_value = "f32")]
    pub precision: engine::gemm::Precision,
    /// Print the setup before training: SIMD level, threads, each conv layer's algorithm per
    /// pass
    #[arg(long)]
    pub verbose: bool,
    /// vgg11, or a layer spec like 64,M,128,M (conv widths and max-pools)
    #[arg(long, default_value = "vgg11")]
    pub model: String,
    /// Training images of --dataset synthetic
    #[arg(long, value_name = "N", default_value_t = 50_000)]
    pub synthetic_train: usize,
    /// Test images of --dataset synthetic
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    pub synthetic_test: usize,
    /// Deadline of one collective, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout: u64,
    /// Deadline of the rendezvous, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 120)]
    pub connect_timeout: u64,
    /// Schedule, warmup, Nesterov, label smoothing, evaluation cadence, best checkpoint.
    #[command(flatten)]
    pub recipe: crate::recipe::RecipeOptions,
}

/// Parse a training command line (program name first, no subcommand) into a validated config.
/// `env` looks up environment variables (pass `|k| std::env::var(k).ok()` in production).
pub fn parse_train_args(
    args: impl IntoIterator<Item = OsString>,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<TrainConfig, UsageError> {
    #[derive(Parser)]
    #[command(name = "dtrain")]
    struct TrainOnly {
        #[command(flatten)]
        train: TrainArgs,
    }
    let parsed = TrainOnly::try_parse_from(args).map_err(UsageError::from_clap)?;
    resolve_train_args(&parsed.train, env)
}

/// Which launcher's environment we read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Launcher {
    Torchrun,
    Slurm,
    OpenMpi,
    None,
}

struct EnvNames {
    rank: &'static str,
    world: &'static str,
    local_rank: &'static str,
    local_world: &'static str,
}

impl Launcher {
    fn detect(env: &dyn Fn(&str) -> Option<String>) -> Launcher {
        if env("RANK").is_some() || env("WORLD_SIZE").is_some() {
            Launcher::Torchrun
        } else if env("SLURM_PROCID").is_some() {
            Launcher::Slurm
        } else if env("OMPI_COMM_WORLD_RANK").is_some() {
            Launcher::OpenMpi
        } else {
            Launcher::None
        }
    }

    fn names(self) -> Option<EnvNames> {
        match self {
            Launcher::Torchrun => Some(EnvNames {
                rank: "RANK",
                world: "WORLD_SIZE",
                local_rank: "LOCAL_RANK",
                local_world: "LOCAL_WORLD_SIZE",
            }),
            Launcher::Slurm => Some(EnvNames {
                rank: "SLURM_PROCID",
                world: "SLURM_NTASKS",
                local_rank: "SLURM_LOCALID",
                local_world: "SLURM_NTASKS_PER_NODE",
            }),
            Launcher::OpenMpi => Some(EnvNames {
                rank: "OMPI_COMM_WORLD_RANK",
                world: "OMPI_COMM_WORLD_SIZE",
                local_rank: "OMPI_COMM_WORLD_LOCAL_RANK",
                local_world: "OMPI_COMM_WORLD_LOCAL_SIZE",
            }),
            Launcher::None => None,
        }
    }
}

/// Read a non-negative integer from the environment. Slurm writes per-node task counts like
/// "2(x3)" or "2,1": the leading number is this layout's first node, good enough for
/// dividing cores between local ranks.
fn env_usize(
    env: &dyn Fn(&str) -> Option<String>,
    name: &str,
) -> Result<Option<usize>, UsageError> {
    let Some(raw) = env(name) else {
        return Ok(None);
    };
    let trimmed = raw.trim();
    let digits: &str = if name == "SLURM_NTASKS_PER_NODE" {
        let end = trimmed
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(trimmed.len());
        &trimmed[..end]
    } else {
        trimmed
    };
    digits.parse::<usize>().map(Some).map_err(|_| {
        invalid(format!(
            "environment variable {name}={raw:?} is not a non-negative integer"
        ))
    })
}

/// Split `IP`, `IP:PORT`, `tcp://IP:PORT`, `[v6]:PORT` or a bare IPv6 address into host and
/// optional port.
pub fn parse_master_addr(raw: &str) -> Result<(String, Option<u16>), UsageError> {
    let s = raw.trim();
    let s = match s.split_once("://") {
        Some(("tcp", rest)) => rest,
        Some((scheme, _)) => {
            return Err(invalid(format!(
            "--master-ip {raw:?}: unsupported scheme {scheme:?} (use IP, IP:PORT or tcp://IP:PORT)"
        )))
        }
        None => s,
    };
    let s = s.strip_suffix('/').unwrap_or(s);
    let (host, port): (&str, Option<&str>) = if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| {
            invalid(format!(
                "--master-ip {raw:?}: missing ']' after IPv6 address"
            ))
        })?;
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(p) => (host, Some(p)),
                None => {
                    return Err(invalid(format!(
                        "--master-ip {raw:?}: expected ':PORT' after ']'"
                    )))
                }
            },
        }
    } else if s.matches(':').count() == 1 {
        let (h, p) = s.split_once(':').unwrap_or((s, ""));
        (h, Some(p))
    } else {
        (s, None) // no colon, or a bare IPv6 address
    };
    if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(invalid(format!(
            "--master-ip {raw:?}: missing or malformed host"
        )));
    }
    let port = match port {
        None => None,
        Some(p) => match p.parse::<u16>() {
            Ok(0) => {
                return Err(invalid(format!(
                    "--master-ip {raw:?}: port must be 1..65535, got 0"
                )))
            }
            Ok(n) => Some(n),
            Err(_) => {
                return Err(invalid(format!(
                    "--master-ip {raw:?}: port {p:?} is not a number in 1..65535"
                )))
            }
        },
    };
    Ok((host.to_string(), port))
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false)
}

/// Check a model spec (the engine's grammar, [`engine::vgg::parse_spec`]: `vgg11` or
/// comma-separated conv widths and `M`) against the limits a user may ask for.
pub fn validate_model_spec(spec: &str) -> Result<(), UsageError> {
    use engine::vgg::LayerSpec;
    let layers = engine::vgg::parse_spec(spec).map_err(|e| {
        invalid(format!(
            "--model {spec:?}: {e} (expected vgg11 or a layer list like 64,M,128,M)"
        ))
    })?;
    if let Some(n) = layers.iter().find_map(|l| match *l {
        LayerSpec::Conv(n) if n > MAX_CONV_WIDTH => Some(n),
        _ => None,
    }) {
        return Err(invalid(format!(
            "--model {spec:?}: conv width {n} is above the limit of {MAX_CONV_WIDTH}"
        )));
    }
    if layers.len() > MAX_LAYERS {
        return Err(invalid(format!(
            "--model {spec:?}: {} layers is above the limit of {MAX_LAYERS}",
            layers.len()
        )));
    }
    Ok(())
}

/// Validate parsed flags, fill gaps from the launcher environment, and build the config.
pub fn resolve_train_args(
    a: &TrainArgs,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<TrainConfig, UsageError> {
    let launcher = Launcher::detect(env);
    let names = launcher.names();

    // --- master address and port
    // Under Slurm with no address given, rank 0 is the allocation's first node.
    let slurm_master = match (&a.master_ip, env("MASTER_ADDR"), launcher) {
        (None, None, Launcher::Slurm) => crate::slurm::master_from_env(env).map_err(invalid)?,
        _ => None,
    };
    let (master_addr, port_in_addr) = match (&a.master_ip, &slurm_master) {
        (Some(raw), _) => parse_master_addr(raw)?,
        (None, Some((host, _))) => (host.clone(), None),
        (None, None) => match env("MASTER_ADDR") {
            Some(raw) => parse_master_addr(&raw)
                .map_err(|e| invalid(format!("environment variable MASTER_ADDR: {e}")))?,
            None => ("127.0.0.1".to_string(), None),
        },
    };
    let slurm_port = slurm_master.as_ref().and_then(|(_, port)| *port);
    let master_note = slurm_master.is_some().then(|| {
        let port = match slurm_port {
            Some(_) if a.master_port.is_none() && env("MASTER_PORT").is_none() => {
                ", port 15000 + the last four digits of SLURM_JOB_ID"
            }
            _ => "",
        };
        format!("the first node of SLURM_JOB_NODELIST{port}")
    });
    let master_port = match (a.master_port, port_in_addr) {
        (Some(p), Some(q)) if p != q => {
            return Err(invalid(format!(
                "--master-port {p} contradicts the port {q} given in --master-ip"
            )))
        }
        (Some(p), _) => p,
        (None, Some(q)) => q,
        (None, None) => match env("MASTER_PORT") {
            Some(raw) => raw.trim().parse::<u16>().map_err(|_| {
                invalid(format!(
                    "environment variable MASTER_PORT={raw:?} is not a port number"
                ))
            })?,
            None => slurm_port.unwrap_or(DEFAULT_MASTER_PORT),
        },
    };
    if master_port == 0 {
        return Err(invalid("--master-port must be 1..65535, got 0"));
    }

    // --- world layout
    let from_env = |pick: fn(&EnvNames) -> &'static str| -> Result<Option<usize>, UsageError> {
        match &names {
            Some(n) => env_usize(env, pick(n)),
            None => Ok(None),
        }
    };
    let num_nodes = match a.num_nodes {
        Some(n) => n,
        None => from_env(|n| n.world)?.unwrap_or(1),
    };
    if num_nodes == 0 {
        return Err(invalid("--num-nodes must be at least 1, got 0"));
    }
    let rank = match a.rank {
        Some(r) => r,
        None => from_env(|n| n.rank)?.unwrap_or(0),
    };
    if rank >= num_nodes {
        return Err(invalid(format!(
            "--rank {rank} is out of range for --num-nodes {num_nodes} (ranks are 0..{})",
            num_nodes - 1
        )));
    }
    // Without launcher information, a loopback master means every rank runs on this host.
    let all_local = is_loopback(&master_addr);
    let local_rank_given = match a.local_rank {
        Some(r) => Some(r),
        None => from_env(|n| n.local_rank)?,
    };
    let local_world_given = match a.local_world_size {
        Some(n) => Some(n),
        None => from_env(|n| n.local_world)?,
    };
    let local_rank = match local_rank_given {
        Some(r) => r,
        None if all_local => rank,
        None => 0,
    };
    let local_world_size = match local_world_given {
        Some(n) => n,
        None if all_local => num_nodes,
        // Unknown layout: at least as many local ranks as our local rank implies.
        None => local_rank + 1,
    };
    if local_world_size == 0 || local_world_size > num_nodes {
        return Err(invalid(format!(
            "--local-world-size {local_world_size} must be in 1..={num_nodes} (the world size)"
        )));
    }
    if local_rank >= local_world_size {
        return Err(invalid(format!(
            "--local-rank {local_rank} is out of range for {local_world_size} ranks on this host"
        )));
    }

    let threads = match a.threads {
        Some(t) if t == 0 || t > MAX_THREADS => {
            return Err(invalid(format!(
                "--threads must be in 1..={MAX_THREADS}, got {t}"
            )))
        }
        Some(t) => t,
        None => {
            // available_parallelism counts the CPUs this process may use: all of them are
            // this rank's when `dtrain launch` pinned it, else they are shared by the
            // local ranks.
            let cores = std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1);
            if env(BOUND_ENV).is_some() {
                cores
            } else {
                (cores / local_world_size).max(1)
            }
        }
    };
    let mut opts = a.opts.clone();
    validate_run_options(&mut opts, num_nodes)?;

    // torchrun's agent store, unless the user named rank 0's address himself.
    let store = match (&a.master_ip, a.master_port) {
        (None, None) => transport::store::torchelastic_store(env).map_err(invalid)?,
        _ => None,
    };

    use std::io::IsTerminal;
    let progress = draws_progress(a.no_progress, local_rank, std::io::stdout().is_terminal());

    Ok(TrainConfig {
        master_addr,
        master_port,
        num_nodes,
        rank,
        local_rank,
        local_world_size,
        transport: a.transport.unwrap_or(TransportArg::Auto).into(),
        threads,
        progress,
        store,
        master_note,
        restart_count: env_usize(env, RESTART_COUNT_ENV)?.unwrap_or(0),
        opts,
    })
}

/// Whether this rank draws the progress line: only local rank 0, so that one line per host
/// is redrawn (mpirun gives every rank a pty, and torchrun's ranks share its terminal), and
/// only on a terminal without `--no-progress`.
pub fn draws_progress(no_progress: bool, local_rank: usize, stdout_is_terminal: bool) -> bool {
    !no_progress && local_rank == 0 && stdout_is_terminal
}

/// Check the flags used as given, normalising the MD5 (lower case) and URL (trimmed).
fn validate_run_options(o: &mut RunOptions, num_nodes: usize) -> Result<(), UsageError> {
    if o.mode == Mode::Single && num_nodes != 1 {
        return Err(invalid(format!(
            "--mode single needs --num-nodes 1, got {num_nodes}"
        )));
    }
    if o.grad_compression != GradCompression::None && !matches!(o.mode, Mode::Ddp | Mode::AllReduce)
    {
        return Err(invalid(format!(
            "--grad-compression {} needs --mode ddp or allreduce ({} does not all-reduce gradients)",
            o.grad_compression.name(),
            o.mode.name()
        )));
    }

    // --- optimisation
    if o.epochs == 0 {
        return Err(invalid("--epochs must be at least 1, got 0"));
    }
    if o.batch_size == 0 {
        return Err(invalid("--batch-size must be at least 1, got 0"));
    }
    if !o.lr.is_finite() || o.lr < 0.0 {
        return Err(invalid(format!(
            "--lr must be a finite number >= 0, got {}",
            o.lr
        )));
    }
    if !o.momentum.is_finite() || !(0.0..1.0).contains(&o.momentum) {
        return Err(invalid(format!(
            "--momentum must be in [0, 1), got {}",
            o.momentum
        )));
    }
    if !o.weight_decay.is_finite() || o.weight_decay < 0.0 {
        return Err(invalid(format!(
            "--weight-decay must be a finite number >= 0, got {}",
            o.weight_decay
        )));
    }
    if o.max_iters == Some(0) {
        return Err(invalid("--max-iters must be at least 1, got 0"));
    }
    if o.log_every == 0 {
        return Err(invalid("--log-every must be at least 1, got 0"));
    }
    for (flag, v) in [
        ("--first-bucket-mb", o.first_bucket_mb),
        ("--bucket-cap-mb", o.bucket_cap_mb),
    ] {
        if !v.is_finite() || v <= 0.0 {
            return Err(invalid(format!(
                "{flag} must be a positive number, got {v}"
            )));
        }
    }
    validate_model_spec(&o.model)?;
    o.recipe.validate(o.momentum as f64)?;
    if o.timeout == 0 {
        return Err(invalid("--timeout must be at least 1 second, got 0"));
    }
    if o.connect_timeout == 0 {
        return Err(invalid(
            "--connect-timeout must be at least 1 second, got 0",
        ));
    }

    // --- data
    if o.dataset == DatasetKind::Synthetic && (o.synthetic_train == 0 || o.synthetic_test == 0) {
        return Err(invalid(
            "--synthetic-train and --synthetic-test must be at least 1",
        ));
    }
    let md5 = o.download_md5.trim().to_ascii_lowercase();
    if md5.len() != 32 || !md5.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(invalid(format!(
            "--download-md5 {:?}: expected 32 hex digits",
            o.download_md5
        )));
    }
    o.download_md5 = md5;
    o.download_url = o.download_url.trim().to_string();
    if o.download_url.is_empty() {
        return Err(invalid("--download-url must not be empty"));
    }
    if matches!(o.resume, Some(ResumeFrom::File(_))) && o.init_checkpoint.is_some() {
        return Err(invalid(
            "--resume and --init-checkpoint cannot be used together (resume restores everything)",
        ));
    }
    if o.save_checkpoint.is_none() {
        if o.resume == Some(ResumeFrom::Auto) {
            return Err(invalid(
                "--resume auto resumes from the --save-checkpoint file: give --save-checkpoint FILE too",
            ));
        }
        if o.checkpoint_every.is_some() {
            return Err(invalid(
                "--checkpoint-every needs --save-checkpoint FILE (where to write)",
            ));
        }
    }
    if o.checkpoint_every == Some(0) {
        return Err(invalid("--checkpoint-every must be at least 1, got 0"));
    }
    if o.keep_checkpoints == 0 {
        return Err(invalid("--keep-checkpoints must be at least 1, got 0"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str, env: &[(&str, &str)]) -> Result<TrainConfig, UsageError> {
        let args = std::iter::once("dtrain")
            .chain(line.split_whitespace())
            .map(OsString::from);
        let lookup = |k: &str| {
            env.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        };
        parse_train_args(args, &lookup)
    }

    /// What torchrun 2.15 gave rank 1 of `torchrun --standalone --nproc-per-node 2`.
    const TORCHRUN: &[(&str, &str)] = &[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("GROUP_RANK", "0"),
        ("MASTER_ADDR", "localhost"),
        ("MASTER_PORT", "41233"),
        ("TORCHELASTIC_USE_AGENT_STORE", "True"),
        (
            "TORCHELASTIC_RUN_ID",
            "8d6c0f2e-4c5b-4a3e-9d8e-1f2a3b4c5d6e",
        ),
        ("TORCHELASTIC_RESTART_COUNT", "1"),
        ("TORCHELASTIC_MAX_RESTARTS", "3"),
    ];

    #[test]
    fn torchrun_agent_store_is_used_unless_the_master_is_given() {
        let c = parse("--mode ddp", TORCHRUN).unwrap();
        assert_eq!(
            c.store,
            Some(transport::StoreRendezvous {
                host: "localhost".into(),
                port: 41233,
                prefix: "dtrain/8d6c0f2e-4c5b-4a3e-9d8e-1f2a3b4c5d6e/attempt_1".into(),
            })
        );
        assert_eq!((c.rank, c.num_nodes, c.restart_count), (1, 2, 1));
        for flags in ["--master-port 29400", "--master-ip 127.0.0.1"] {
            assert_eq!(parse(flags, TORCHRUN).unwrap().store, None, "{flags}");
        }
        // dtrain launch and plain runs set no agent store.
        assert_eq!(parse("", &TORCHRUN[..7]).unwrap().store, None);
    }

    #[test]
    fn the_store_prefix_is_not_part_of_the_config_hash() {
        let first = parse("--mode ddp", TORCHRUN).unwrap();
        let mut env = TORCHRUN.to_vec();
        env.retain(|(k, _)| *k != "TORCHELASTIC_RESTART_COUNT");
        env.push(("TORCHELASTIC_RESTART_COUNT", "0"));
        let other = parse("--mode ddp", &env).unwrap();
        assert_ne!(first.store, other.store);
        assert_eq!(first.config_hash(), other.config_hash());
    }

    #[test]
    fn a_broken_agent_store_environment_is_a_usage_error() {
        let mut env = TORCHRUN.to_vec();
        env.retain(|(k, _)| *k != "TORCHELASTIC_RUN_ID");
        let err = parse("", &env).unwrap_err().to_string();
        assert!(err.contains("TORCHELASTIC_RUN_ID"), "{err}");
    }

    /// What `srun -n 2` in a two-node allocation gives task 1.
    const SLURM: &[(&str, &str)] = &[
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_JOB_NODELIST", "cn[07-08]"),
        ("SLURM_JOB_ID", "4242"),
    ];

    #[test]
    fn under_slurm_the_master_is_the_first_node_of_the_allocation() {
        let c = parse("--mode ddp", SLURM).unwrap();
        assert_eq!((c.master_addr.as_str(), c.master_port), ("cn07", 19242));
        assert_eq!((c.rank, c.num_nodes), (1, 2));
        let note = c.master_note.unwrap_or_default();
        assert!(
            note.contains("SLURM_JOB_NODELIST") && note.contains("SLURM_JOB_ID"),
            "{note}"
        );
        // Flags and the usual variables win over the derived address and port.
        let c = parse("--master-ip 10.0.0.1 --master-port 29400", SLURM).unwrap();
        assert_eq!((c.master_addr.as_str(), c.master_port), ("10.0.0.1", 29400));
        let c = parse("--master-port 29400", SLURM).unwrap();
        assert_eq!((c.master_addr.as_str(), c.master_port), ("cn07", 29400));
        let mut env = SLURM.to_vec();
        env.extend([("MASTER_ADDR", "head"), ("MASTER_PORT", "29300")]);
        let c = parse("", &env).unwrap();
        assert_eq!((c.master_addr.as_str(), c.master_port), ("head", 29300));
        // Outside Slurm the node list is not read.
        let c = parse("", &[("SLURM_JOB_NODELIST", "cn[07-08]")]).unwrap();
        assert_eq!((c.master_addr.as_str(), c.master_note), ("127.0.0.1", None));
    }

    #[test]
    fn a_malformed_slurm_node_list_is_a_usage_error() {
        let mut env = SLURM.to_vec();
        env.retain(|(k, _)| *k != "SLURM_JOB_NODELIST");
        env.push(("SLURM_JOB_NODELIST", "cn[07-"));
        let err = parse("", &env).unwrap_err().to_string();
        assert!(
            err.contains("SLURM_JOB_NODELIST") && err.contains("cn[07-"),
            "{err}"
        );
    }

    #[test]
    fn only_local_rank_0_on_a_terminal_draws_progress() {
        assert!(draws_progress(false, 0, true));
        assert!(!draws_progress(false, 1, true), "a second rank on the host");
        assert!(!draws_progress(true, 0, true), "--no-progress");
        assert!(!draws_progress(false, 0, false), "not a terminal");
    }
}
