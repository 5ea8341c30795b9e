//! `dtrain launch --nproc-per-node N [train flags]`: start N local ranks of this program, like
//! `torchrun --standalone`.
//!
//! Each child gets torchrun's environment (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK,
//! LOCAL_RANK, LOCAL_WORLD_SIZE, TORCHELASTIC_RESTART_COUNT, TORCHELASTIC_MAX_RESTARTS) and
//! the train flags unchanged. Every line a child prints is prefixed with `[rank k] `.
//! Ctrl-C / SIGTERM are forwarded to the children. When a rank fails, the others get SIGTERM,
//! then SIGKILL after a grace period, and all are reaped. With `--max-restarts N` (torchrun's
//! meaning) the whole job is then started again on a fresh rendezvous port after a short
//! backoff ([`restart_backoff`]), up to N times — each rank sees its attempt in
//! `TORCHELASTIC_RESTART_COUNT` and resumes from its `--save-checkpoint` file; after that the
//! launcher names the last failed rank and its exit status and exits with its code.
//!
//! With `--nnodes N --node-rank K` (torchrun's static multi-node form) one launcher runs on
//! each of N hosts and starts that host's ranks K·M … K·M+M−1 of a world of N·M; node 0's
//! launcher hosts a TCPStore at `--master-ip:--master-port` in which the launchers and their
//! ranks meet, a failure on any node stops the job on every node, and restarts happen on all
//! nodes together (see [`nodes`]).

mod nodes;
#[cfg(feature = "test-hooks")]
pub mod test_child;

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sched::CpuSet;
use nix::sys::signal::{self, SigHandler, Signal};
use nix::unistd::Pid;

use crate::args::{
    parse_master_addr, resolve_train_args, TrainArgs, BOUND_ENV, DEFAULT_MASTER_PORT,
    RESTART_COUNT_ENV,
};
use crate::usage::UsageError;

#[derive(Args, Debug, Clone)]
pub struct LaunchArgs {
    /// Number of ranks to start on this host
    #[arg(long, value_name = "N")]
    pub nproc_per_node: usize,
    /// Number of hosts (nodes) of the job, one `dtrain launch` on each; node 0's launcher
    /// hosts the launchers' TCPStore at --master-ip:--master-port
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub nnodes: usize,
    /// This host's node rank, 0..nnodes (its ranks are node-rank × nproc-per-node + local
    /// rank)
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub node_rank: usize,
    /// Seconds between SIGTERM and SIGKILL when stopping the ranks
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    pub grace_secs: u64,
    /// Pin each rank to its own share of this process's CPUs (auto: when there are at
    /// least as many CPUs as ranks)
    #[arg(long, value_enum, value_name = "MODE", default_value = "auto")]
    pub bind_cores: BindCores,
    /// Restart all ranks up to N times when one fails (torchrun's --max-restarts): the
    /// others are stopped, and every rank starts again on a fresh port, resuming from
    /// --save-checkpoint when it exists
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub max_restarts: u32,
    /// Internal (tests): run `dtrain <CMD>` in each child instead of training
    #[cfg(feature = "test-hooks")]
    #[arg(long, hide = true, value_name = "CMD")]
    pub child_command: Option<String>,
    /// Training flags, passed to every rank
    #[command(flatten)]
    pub train: TrainArgs,
}

impl LaunchArgs {
    /// The subcommand each child runs instead of training (tests only: `--child-command`
    /// exists in builds with the `test-hooks` feature, which the tests turn on).
    fn child_command(&self) -> Option<&str> {
        #[cfg(feature = "test-hooks")]
        return self.child_command.as_deref();
        #[cfg(not(feature = "test-hooks"))]
        None
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Usage(#[from] UsageError),
    #[error("cannot start rank {rank}: {source}")]
    Spawn { rank: usize, source: std::io::Error },
    #[error("{0}")]
    Io(String),
}

/// Launcher-only flags removed from the command line forwarded to the children.
const LAUNCH_ONLY_FLAGS: [&str; 7] = [
    "--nproc-per-node",
    "--nnodes",
    "--node-rank",
    "--grace-secs",
    "--child-command",
    "--bind-cores",
    "--max-restarts",
];

/// In a multi-node launch these name the launchers' store; the ranks get it from
/// MASTER_ADDR/MASTER_PORT with TORCHELASTIC_USE_AGENT_STORE (as under torchrun).
const STORE_FLAGS: [&str; 2] = ["--master-ip", "--master-port"];

/// The child command line: the launch arguments minus launcher-only flags (and their values).
pub fn forwarded_args(launch_args: &[OsString]) -> Vec<OsString> {
    without_flags(launch_args, &LAUNCH_ONLY_FLAGS)
}

/// `args` without the flags in `flags` (each with its value, as `--f v` or `--f=v`).
fn without_flags(launch_args: &[OsString], flags: &[&str]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut skip_value = false;
    for a in launch_args {
        if skip_value {
            skip_value = false;
            continue;
        }
        let s = a.to_string_lossy();
        if flags.contains(&s.as_ref()) {
            skip_value = true;
            continue;
        }
        if flags.iter().any(|f| s.starts_with(&format!("{f}="))) {
            continue;
        }
        out.push(a.clone());
    }
    out
}

/// Bind port 0 on loopback to learn a free port (as torchrun --standalone does; another
/// process could take it before rank 0 binds, in which case the rendezvous fails loudly).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Delay before restart `k` (0-based) of the job: 1 s, doubling, at most 10 s — short, but
/// a rank that fails at once cannot turn into a restart storm.
pub fn restart_backoff(k: u32) -> Duration {
    Duration::from_secs(1u64 << k.min(4)).min(Duration::from_secs(10))
}

/// `dtrain launch`: validate, spawn, supervise, restart. `launch_args` are the raw arguments
/// after `launch`. Returns the process exit code.
pub fn run(args: &LaunchArgs, launch_args: &[OsString]) -> Result<u8, LaunchError> {
    let n = args.nproc_per_node;
    let usage = |msg: String| Err(LaunchError::Usage(UsageError::Invalid(msg)));
    if n == 0 {
        return usage("--nproc-per-node must be at least 1, got 0".into());
    }
    if args.nnodes == 0 {
        return usage("--nnodes must be at least 1, got 0".into());
    }
    if args.node_rank >= args.nnodes {
        return usage(format!(
            "--node-rank {} is out of range for --nnodes {} (node ranks are 0..{})",
            args.node_rank,
            args.nnodes,
            args.nnodes - 1
        ));
    }
    let t = &args.train;
    if t.rank.is_some() || t.local_rank.is_some() || t.local_world_size.is_some() {
        return usage(
            "dtrain launch sets --rank/--local-rank/--local-world-size of each child itself; remove them"
                .into(),
        );
    }
    let world = args.nnodes * n;
    if let Some(w) = t.num_nodes {
        if w != world {
            return usage(if args.nnodes == 1 {
                format!("--num-nodes {w} differs from --nproc-per-node {n} (launch starts a standalone world on this host)")
            } else {
                format!(
                    "--num-nodes {w} differs from --nnodes {} × --nproc-per-node {n} = {world} ranks",
                    args.nnodes
                )
            });
        }
    }
    // One launcher per node under Slurm (`srun --ntasks-per-node 1 dtrain launch --nnodes N
    // --node-rank $SLURM_NODEID`): node 0 is the allocation's first node.
    let slurm_master = match (&t.master_ip, args.nnodes > 1) {
        (None, true) => crate::slurm::master_from_env(&|k| std::env::var(k).ok())
            .map_err(|e| LaunchError::Usage(UsageError::Invalid(e)))?,
        _ => None,
    };
    let (master_addr, port_in_addr) = match (&t.master_ip, &slurm_master) {
        (Some(raw), _) => parse_master_addr(raw)?,
        (None, Some((host, _))) => (host.clone(), None),
        (None, None) => ("127.0.0.1".to_string(), None),
    };
    if let (Some(p), Some(q)) = (t.master_port, port_in_addr) {
        if p != q {
            return usage(format!(
                "--master-port {p} contradicts the port {q} given in --master-ip"
            ));
        }
    }
    // A port the user chose is kept across restarts; otherwise each attempt gets a fresh
    // one, so no socket of a dead attempt can interfere.
    let fixed_port = t
        .master_port
        .or(port_in_addr)
        .or(slurm_master.and_then(|(_, port)| port));
    let layout = nodes::NodeLayout {
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        nproc_per_node: n,
        max_restarts: args.max_restarts,
    };
    // Reject bad train flags once, here, rather than in every child.
    if args.child_command().is_none() {
        let env0 = ranks_env(&layout, &master_addr, DEFAULT_MASTER_PORT, 0, 0);
        let lookup = |k: &str| env0.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let cfg = resolve_train_args(t, &lookup)?;
        crate::memory::check_training_fits(&cfg, n)?;
        if args.max_restarts > 0 && cfg.opts.save_checkpoint.is_none() {
            eprintln!("dtrain launch: warning: without --save-checkpoint a restarted job starts from the beginning");
        }
    }
    let mut child_args: Vec<OsString> = Vec::new();
    if let Some(cmd) = args.child_command() {
        child_args.push(cmd.into());
    }
    if args.nnodes > 1 {
        let port = fixed_port.unwrap_or(DEFAULT_MASTER_PORT);
        child_args.extend(without_flags(&forwarded_args(launch_args), &STORE_FLAGS));
        return run_nodes(args, layout, child_args, &master_addr, port);
    }
    child_args.extend(forwarded_args(launch_args));
    install_forwarding_handlers();
    let pick_port = || match fixed_port {
        Some(p) => Ok(p),
        None => free_port().map_err(|e| LaunchError::Io(format!("cannot pick a free port: {e}"))),
    };
    let max_restarts = args.max_restarts;
    let mut restart = 0u32;
    loop {
        let port = pick_port()?;
        let label = match restart {
            0 => String::new(),
            k => format!("restart {k} of {max_restarts}: "),
        };
        eprintln!("dtrain launch: {label}starting {n} ranks, master {master_addr}:{port}");
        let spec = local_spec(args, child_args.clone(), {
            let master_addr = master_addr.clone();
            move |r| ranks_env(&layout, &master_addr, port, restart, r)
        });
        let end = run_attempt(&spec, &mut AttemptHooks::standalone())?;
        if let AttemptEnd::Failed { rank, status } = end {
            if restart < max_restarts {
                let wait = restart_backoff(restart);
                eprintln!(
                    "dtrain launch: restarting all ranks in {}s (restart {} of {max_restarts}) after rank {rank} failed with {}",
                    wait.as_secs(),
                    restart + 1,
                    describe(status),
                );
                match sleep_unless_signalled(wait) {
                    None => {
                        restart += 1;
                        continue;
                    }
                    Some(sig) => return Ok(AttemptEnd::Stopped(sig).report()),
                }
            } else if max_restarts > 0 {
                eprintln!("dtrain launch: giving up after {max_restarts} restarts");
            }
        }
        return Ok(end.report());
    }
}

/// Variables a launcher may have inherited from one that started it (torchrun) and must not
/// pass on: its ranks meet as this launcher says.
const INHERITED_LAUNCHER_ENV: [&str; 5] = [
    "TORCHELASTIC_USE_AGENT_STORE",
    "TORCHELASTIC_RUN_ID",
    "TORCHELASTIC_ERROR_FILE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
];

/// torchrun's environment for local rank `local` of this node in attempt `restart`, with
/// rank 0's rendezvous at `master_addr:port` (single node). Multi-node launches add the
/// store variables ([`run_nodes`]).
fn ranks_env(
    layout: &nodes::NodeLayout,
    master_addr: &str,
    port: u16,
    restart: u32,
    local: usize,
) -> Vec<(String, String)> {
    [
        ("MASTER_ADDR", master_addr.to_string()),
        ("MASTER_PORT", port.to_string()),
        ("WORLD_SIZE", layout.world_size().to_string()),
        ("RANK", layout.global_rank(local).to_string()),
        ("LOCAL_RANK", local.to_string()),
        ("LOCAL_WORLD_SIZE", layout.nproc_per_node.to_string()),
        (RESTART_COUNT_ENV, restart.to_string()),
        ("TORCHELASTIC_MAX_RESTARTS", layout.max_restarts.to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The local ranks of one attempt.
fn local_spec(
    args: &LaunchArgs,
    child_args: Vec<OsString>,
    env_for: impl Fn(usize) -> Vec<(String, String)> + 'static,
) -> LocalRanks {
    LocalRanks {
        n: args.nproc_per_node,
        args_for: Box::new(move |_| child_args.clone()),
        env_for: Box::new(env_for),
        prefix_stdout: true,
        grace: Duration::from_secs(args.grace_secs),
        bind_cores: args.bind_cores,
    }
}

/// Multi-node launch: join the other nodes' launchers, then run attempts together.
fn run_nodes(
    args: &LaunchArgs,
    layout: nodes::NodeLayout,
    child_args: Vec<OsString>,
    master_addr: &str,
    port: u16,
) -> Result<u8, LaunchError> {
    use nodes::Interrupt;
    let connect_timeout = Duration::from_secs(args.train.opts.connect_timeout);
    let me = layout.node_rank;
    let first = layout.global_rank(0);
    let last = layout.global_rank(layout.nproc_per_node - 1);
    eprintln!(
        "dtrain launch: node {me} of {}: ranks {first}..={last} of {}, launchers' TCPStore at {master_addr}:{port}{}",
        layout.nnodes,
        layout.world_size(),
        if me == 0 { " (hosted here)" } else { "" }
    );
    // Until this node has joined, Ctrl-C simply ends the launcher (no ranks yet).
    let mut group = nodes::NodeGroup::join(layout, master_addr, port, connect_timeout)?;
    install_forwarding_handlers();
    let grace = Duration::from_secs(args.grace_secs);
    let max_restarts = layout.max_restarts;
    let mut restart = 0u32;
    loop {
        if let Err(i) = group.ready(restart, connect_timeout) {
            return Ok(end_interrupted(&mut group, i));
        }
        let label = match restart {
            0 => String::new(),
            k => format!("restart {k} of {max_restarts}: "),
        };
        eprintln!(
            "dtrain launch: {label}starting ranks {first}..={last} of {} on node {me}",
            layout.world_size()
        );
        let store_env = [
            ("TORCHELASTIC_USE_AGENT_STORE", "True".to_string()),
            ("TORCHELASTIC_RUN_ID", group.run_id.clone()),
            ("GROUP_RANK", me.to_string()),
            ("GROUP_WORLD_SIZE", layout.nnodes.to_string()),
        ];
        let spec = local_spec(args, child_args.clone(), {
            let master_addr = master_addr.to_string();
            move |r| {
                let mut env = ranks_env(&layout, &master_addr, port, restart, r);
                env.extend(store_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
                env
            }
        });
        let end = {
            let group = &group;
            let mut stop_reason = || match group.interrupt(restart)? {
                Interrupt::Abort(text) => Some(text),
                Interrupt::Failed => Some("a rank failed on another node".to_string()),
                Interrupt::Signalled(sig) => Some(format!("got {sig:?}")),
            };
            let mut hooks = AttemptHooks {
                first_rank: first,
                stop_reason: Some(&mut stop_reason),
            };
            run_attempt(&spec, &mut hooks)?
        };
        let mine = match end {
            AttemptEnd::Succeeded => match group.done(restart) {
                Ok(()) => {
                    group.finish();
                    return Ok(0);
                }
                Err(Interrupt::Failed) => None,
                Err(i) => return Ok(end_interrupted(&mut group, i)),
            },
            AttemptEnd::Failed { rank, status } => {
                use std::os::unix::process::ExitStatusExt;
                Some(nodes::NodeFailure {
                    rank,
                    node: me,
                    exit_code: exit_code_of(status),
                    by_signal: status.signal().is_some(),
                    status: describe(status),
                })
            }
            AttemptEnd::Interrupted => match group.interrupt(restart) {
                Some(Interrupt::Failed) | None => None,
                Some(i) => return Ok(end_interrupted(&mut group, i)),
            },
            AttemptEnd::Stopped(sig) => {
                group.abort(&format!("node {me}'s launcher was stopped by {sig:?}"));
                return Ok(end_interrupted(&mut group, Interrupt::Signalled(sig)));
            }
            AttemptEnd::Unreaped { rank } => {
                let text = format!("rank {rank} (node {me}) could not be reaped");
                group.abort(&text);
                return Ok(end_interrupted(&mut group, Interrupt::Abort(text)));
            }
        };
        // Every node reaps its ranks, then all name the same root cause.
        let root = match group.stopped(restart, mine.as_ref(), grace + connect_timeout) {
            Ok(root) => root.or(mine),
            Err(i) => return Ok(end_interrupted(&mut group, i)),
        };
        let Some(root) = root else {
            let text = "the attempt failed but no node recorded which rank".to_string();
            return Ok(end_interrupted(&mut group, Interrupt::Abort(text)));
        };
        if restart < max_restarts {
            let wait = restart_backoff(restart);
            eprintln!(
                "dtrain launch: restarting all ranks on all {} nodes in {}s (restart {} of {max_restarts}) after {}",
                layout.nnodes,
                wait.as_secs(),
                restart + 1,
                root.describe(),
            );
            if let Some(sig) = sleep_unless_signalled(wait) {
                group.abort(&format!("node {me}'s launcher was stopped by {sig:?}"));
                return Ok(end_interrupted(&mut group, Interrupt::Signalled(sig)));
            }
            restart += 1;
            continue;
        }
        if max_restarts > 0 {
            eprintln!("dtrain launch: giving up after {max_restarts} restarts");
        }
        eprintln!("dtrain launch: error: {}", root.describe());
        group.finish();
        return Ok(root.exit_code);
    }
}

/// How the job ends on this node when it ends without a rank's failure to report (another
/// node's launcher lost, mismatched flags, a signal): says why, lets node 0's store outlive
/// the others' last look at it, and returns the exit code.
fn end_interrupted(group: &mut nodes::NodeGroup, why: nodes::Interrupt) -> u8 {
    let code = match why {
        nodes::Interrupt::Signalled(sig) => AttemptEnd::Stopped(sig).report(),
        nodes::Interrupt::Abort(text) => {
            eprintln!("dtrain launch: error: {text}");
            1
        }
        nodes::Interrupt::Failed => {
            eprintln!("dtrain launch: error: a rank failed on another node");
            1
        }
    };
    group.finish();
    code
}

/// Sleep `d`, waking early with the signal when the launcher gets SIGINT/SIGTERM.
fn sleep_unless_signalled(d: Duration) -> Option<Signal> {
    let until = Instant::now() + d;
    while Instant::now() < until {
        let sig = RECEIVED_SIGNAL.swap(0, Ordering::SeqCst);
        if let Ok(s) = Signal::try_from(sig) {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// What to start: `n` children of the current executable.
pub struct LocalRanks {
    pub n: usize,
    pub args_for: Box<dyn Fn(usize) -> Vec<OsString>>,
    pub env_for: Box<dyn Fn(usize) -> Vec<(String, String)>>,
    /// Prefix stdout lines with `[rank k] ` (stderr lines always are).
    pub prefix_stdout: bool,
    /// SIGTERM → SIGKILL delay when stopping ranks.
    pub grace: Duration,
    pub bind_cores: BindCores,
}

/// CPU binding of local ranks.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindCores {
    /// Each rank gets a disjoint, contiguous share of the launcher's CPUs when there are at
    /// least as many CPUs as ranks; otherwise no binding.
    Auto,
    /// Leave placement to the kernel.
    None,
}

/// The CPUs this process may run on, in increasing order.
pub fn allowed_cpus() -> Vec<usize> {
    match nix::sched::sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Rank `rank`'s share of `allowed` when `n` ranks split it into contiguous blocks (sizes
/// differ by at most one), or `None` when there are fewer CPUs than ranks.
pub fn cpus_for_rank(allowed: &[usize], n: usize, rank: usize) -> Option<Vec<usize>> {
    if n == 0 || allowed.len() < n || rank >= n {
        return None;
    }
    let (lo, hi) = (rank * allowed.len() / n, (rank + 1) * allowed.len() / n);
    Some(allowed[lo..hi].to_vec())
}

/// `0-3,6` style list for messages.
pub(crate) fn cpu_list(cpus: &[usize]) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        out.push(if i == j {
            cpus[i].to_string()
        } else {
            format!("{}-{}", cpus[i], cpus[j])
        });
        i = j + 1;
    }
    out.join(",")
}

/// Last signal (SIGINT/SIGTERM) received by the launcher, 0 if none.
static RECEIVED_SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn record_signal(sig: i32) {
    // Only an atomic store: async-signal-safe.
    RECEIVED_SIGNAL.store(sig, Ordering::SeqCst);
}

fn install_forwarding_handlers() {
    let action = signal::SigAction::new(
        SigHandler::Handler(record_signal),
        signal::SaFlags::SA_RESTART,
        signal::SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores into an atomic, which is async-signal-safe.
        if let Err(e) = unsafe { signal::sigaction(sig, &action) } {
            eprintln!("dtrain launch: warning: cannot handle {sig:?}: {e}");
        }
    }
}

/// Copy lines from a child's pipe to our stdout/stderr with a prefix. Writes each line in one
/// call under the stream lock so lines of different ranks never interleave mid-line.
fn pump(
    mut from: impl Read + Send + 'static,
    prefix: String,
    to_stderr: bool,
    done: mpsc::Sender<()>,
) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(&mut from);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    if !line.ends_with(b"\n") {
                        line.push(b'\n');
                    }
                    let mut out = Vec::with_capacity(prefix.len() + line.len());
                    out.extend_from_slice(prefix.as_bytes());
                    out.extend_from_slice(&line);
                    // A closed stdout (e.g. `| head`) must not kill the supervision.
                    let _ = if to_stderr {
                        std::io::stderr().lock().write_all(&out)
                    } else {
                        let mut o = std::io::stdout().lock();
                        o.write_all(&out).and_then(|_| o.flush())
                    };
                }
            }
        }
        let _ = done.send(());
    });
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("signal {s} ({sig:?})"),
            Err(_) => format!("signal {s}"),
        },
        _ => format!("{status}"),
    }
}

/// Exit code mirroring a child's failure: its code, or 128 + signal.
fn exit_code_of(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) if (1..=255).contains(&c) => c as u8,
        (None, Some(s)) => (128 + s).clamp(1, 255) as u8,
        _ => 1,
    }
}

fn signal_all(children: &mut [(usize, Child)], sig: Signal) {
    for (_, child) in children.iter_mut() {
        // Only children not yet reaped: their pid cannot have been reused.
        if let Ok(None) = child.try_wait() {
            let _ = signal::kill(Pid::from_raw(child.id() as i32), sig);
        }
    }
}

/// How one attempt of the job ended (every child reaped).
#[derive(Clone, Copy, Debug)]
pub enum AttemptEnd {
    Succeeded,
    /// The first rank that failed (exit status non-zero, or killed by a signal).
    Failed {
        rank: usize,
        status: ExitStatus,
    },
    /// The launcher got this signal and passed it on.
    Stopped(Signal),
    /// The ranks were stopped because [`AttemptHooks::stop_reason`] said so (multi-node: a
    /// rank failed on another node, or the job was aborted).
    Interrupted,
    /// A child whose exit status could not be collected.
    Unreaped {
        rank: usize,
    },
}

impl AttemptEnd {
    /// Print the outcome and return the launcher's exit code for it.
    pub fn report(self) -> u8 {
        match self {
            AttemptEnd::Succeeded => 0,
            AttemptEnd::Failed { rank, status } => {
                eprintln!(
                    "dtrain launch: error: rank {rank} failed with {}",
                    describe(status)
                );
                exit_code_of(status)
            }
            AttemptEnd::Stopped(s) => {
                eprintln!("dtrain launch: stopped by {s:?}");
                128 + s as i32 as u8
            }
            AttemptEnd::Interrupted => 1,
            AttemptEnd::Unreaped { rank } => {
                eprintln!("dtrain launch: error: rank {rank} could not be reaped");
                1
            }
        }
    }
}

/// Start the ranks, supervise them, and reap all. Returns the launcher's exit code.
pub fn run_local_ranks(spec: LocalRanks) -> Result<u8, LaunchError> {
    install_forwarding_handlers();
    Ok(run_attempt(&spec, &mut AttemptHooks::standalone())?.report())
}

/// What supervising one attempt needs beyond its [`LocalRanks`] (a multi-node launch).
struct AttemptHooks<'a> {
    /// Global rank of local rank 0 (labels, messages and [`AttemptEnd::Failed`] use global
    /// ranks).
    first_rank: usize,
    /// Polled while the ranks run: a reason to stop them all.
    stop_reason: Option<&'a mut dyn FnMut() -> Option<String>>,
}

impl AttemptHooks<'static> {
    /// One host, nothing to watch but the ranks.
    fn standalone() -> Self {
        AttemptHooks {
            first_rank: 0,
            stop_reason: None,
        }
    }
}

/// One attempt: start the ranks, supervise them, stop the others when one fails (SIGTERM,
/// grace, SIGKILL), and reap all.
fn run_attempt(spec: &LocalRanks, hooks: &mut AttemptHooks) -> Result<AttemptEnd, LaunchError> {
    let exe = std::env::current_exe()
        .map_err(|e| LaunchError::Io(format!("cannot find the dtrain executable: {e}")))?;
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let mut running: Vec<(usize, Child)> = Vec::new();
    let mut pumps = 0;
    let allowed = allowed_cpus();
    for rank in 0..spec.n {
        let global = hooks.first_rank + rank;
        match spawn_rank(spec, &exe, &allowed, rank, global) {
            Ok(mut child) => {
                if let Some(out) = child.stdout.take() {
                    let prefix = if spec.prefix_stdout {
                        format!("[rank {global}] ")
                    } else {
                        String::new()
                    };
                    pump(out, prefix, false, done_tx.clone());
                    pumps += 1;
                }
                if let Some(err) = child.stderr.take() {
                    pump(err, format!("[rank {global}] "), true, done_tx.clone());
                    pumps += 1;
                }
                running.push((rank, child));
            }
            Err(e) => {
                stop_and_reap(&mut running, spec.grace);
                return Err(e);
            }
        }
    }
    drop(done_tx);
    let end = supervise(&mut running, spec, hooks);
    // Let the pumps drain what the children printed last (bounded: a grandchild could keep a
    // pipe open).
    let drain_deadline = Instant::now() + Duration::from_secs(5);
    for _ in 0..pumps {
        let left = drain_deadline.saturating_duration_since(Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            eprintln!("dtrain launch: warning: some rank output was still open after exit");
            break;
        }
    }
    Ok(end)
}

/// Start local rank `rank` (global rank `global`) with its environment, pipes and CPU
/// binding.
fn spawn_rank(
    spec: &LocalRanks,
    exe: &std::path::Path,
    allowed: &[usize],
    rank: usize,
    global: usize,
) -> Result<Child, LaunchError> {
    let mut cmd = Command::new(exe);
    for name in INHERITED_LAUNCHER_ENV {
        cmd.env_remove(name);
    }
    cmd.args((spec.args_for)(rank))
        .envs((spec.env_for)(rank))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // Unpinned, the kernel's wake-up placement often stacks two ranks that wake each
    // other on one CPU while another idles, halving collective bandwidth for a whole run.
    let binding = match spec.bind_cores {
        BindCores::Auto => cpus_for_rank(allowed, spec.n, rank),
        BindCores::None => None,
    };
    let cpu_set = match &binding {
        Some(cpus) => {
            let mut set = CpuSet::new();
            for &c in cpus {
                set.set(c).map_err(|e| {
                    LaunchError::Io(format!("cannot bind rank {global} to CPU {c}: {e}"))
                })?;
            }
            cmd.env(BOUND_ENV, cpu_list(cpus));
            Some(set)
        }
        None => None,
    };
    let launcher_pid = std::process::id() as i32;
    // SAFETY: runs in the forked child before exec; prctl, getppid and
    // sched_setaffinity are async-signal-safe and nothing is allocated (the CPU set is
    // built before the fork).
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(move || {
            // If the launcher dies (even by SIGKILL), the rank gets SIGTERM instead of
            // being orphaned; if it already died before this point, give up now.
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)?;
            if nix::unistd::getppid().as_raw() != launcher_pid {
                return Err(std::io::Error::other("the launcher exited"));
            }
            if let Some(set) = &cpu_set {
                nix::sched::sched_setaffinity(Pid::from_raw(0), set)
                    .map_err(std::io::Error::from)?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
        rank: global,
        source,
    })?;
    match &binding {
        Some(cpus) => eprintln!(
            "dtrain launch: rank {global} is pid {} on CPUs {}",
            child.id(),
            cpu_list(cpus)
        ),
        None => eprintln!("dtrain launch: rank {global} is pid {}", child.id()),
    }
    Ok(child)
}

/// Wait for the ranks: pass on signals, stop the others after the first failure (or when
/// `hooks` says so), reap all. Ranks in the result are global (`hooks.first_rank` + local).
fn supervise(
    running: &mut [(usize, Child)],
    spec: &LocalRanks,
    hooks: &mut AttemptHooks,
) -> AttemptEnd {
    let global = |local: usize| hooks.first_rank + local;
    let mut failure: Option<(usize, ExitStatus)> = None;
    let mut forwarded_signal: Option<Signal> = None;
    let mut interrupted = false;
    let mut stop_deadline: Option<Instant> = None;
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; spec.n];
    loop {
        let sig = RECEIVED_SIGNAL.swap(0, Ordering::SeqCst);
        if let Ok(s) = Signal::try_from(sig) {
            if forwarded_signal.is_some() && stop_deadline.is_some() {
                // A second Ctrl-C: stop waiting for a clean exit.
                signal_all(running, Signal::SIGKILL);
            } else {
                eprintln!("dtrain launch: got {s:?}, forwarding it to the ranks");
                signal_all(running, s);
                forwarded_signal = Some(s);
                stop_deadline = Some(Instant::now() + spec.grace);
            }
        }
        let mut failed_now: Vec<(usize, ExitStatus)> = Vec::new();
        for (rank, child) in running.iter_mut() {
            if statuses[*rank].is_some() {
                continue;
            }
            match child.try_wait() {
                Ok(Some(status)) => {
                    statuses[*rank] = Some(status);
                    if !status.success() {
                        failed_now.push((*rank, status));
                    }
                }
                Ok(None) => {}
                Err(e) => eprintln!("dtrain launch: cannot poll rank {}: {e}", global(*rank)),
            }
        }
        let stopping = forwarded_signal.is_some() || interrupted;
        if failure.is_none() && !stopping {
            // Of the failures seen at once, a rank killed by a signal is the likelier cause:
            // the others often only report that it died.
            use std::os::unix::process::ExitStatusExt;
            failure = failed_now
                .iter()
                .find(|(_, s)| s.signal().is_some())
                .or(failed_now.first())
                .copied();
        }
        if statuses.iter().all(|s| s.is_some()) {
            break;
        }
        if let Some((rank, status)) = failure {
            if stop_deadline.is_none() {
                eprintln!(
                    "dtrain launch: rank {} failed ({}); stopping the other ranks",
                    global(rank),
                    describe(status)
                );
                signal_all(running, Signal::SIGTERM);
                stop_deadline = Some(Instant::now() + spec.grace);
            }
        }
        if failure.is_none() && !stopping {
            if let Some(reason) = hooks.stop_reason.as_mut().and_then(|f| f()) {
                eprintln!("dtrain launch: {reason}; stopping the ranks of this node");
                signal_all(running, Signal::SIGTERM);
                interrupted = true;
                stop_deadline = Some(Instant::now() + spec.grace);
            }
        }
        if let Some(deadline) = stop_deadline {
            if Instant::now() >= deadline {
                let late: Vec<usize> = running
                    .iter()
                    .filter(|(r, _)| statuses[*r].is_none())
                    .map(|(r, _)| global(*r))
                    .collect();
                eprintln!(
                    "dtrain launch: ranks {late:?} still running {:?} after SIGTERM; killing them",
                    spec.grace
                );
                stop_and_reap(running, Duration::ZERO);
                for (rank, child) in running.iter_mut() {
                    if statuses[*rank].is_none() {
                        statuses[*rank] = child.try_wait().ok().flatten();
                    }
                }
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if let Some((rank, status)) = failure {
        return AttemptEnd::Failed {
            rank: global(rank),
            status,
        };
    }
    if let Some(s) = forwarded_signal {
        return AttemptEnd::Stopped(s);
    }
    if interrupted {
        return AttemptEnd::Interrupted;
    }
    for (rank, s) in statuses.iter().enumerate() {
        match s {
            Some(st) if st.success() => {}
            Some(st) => {
                return AttemptEnd::Failed {
                    rank: global(rank),
                    status: *st,
                }
            }
            None => return AttemptEnd::Unreaped { rank: global(rank) },
        }
    }
    AttemptEnd::Succeeded
}

/// SIGTERM the running children, wait up to `grace`, SIGKILL the rest, reap all.
fn stop_and_reap(children: &mut [(usize, Child)], grace: Duration) {
    if !grace.is_zero() {
        signal_all(children, Signal::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline
            && children
                .iter_mut()
                .any(|(_, c)| matches!(c.try_wait(), Ok(None)))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for (_, child) in children.iter_mut() {
        if let Ok(None) = child.try_wait() {
            let _ = child.kill(); // SIGKILL
        }
        let _ = child.wait(); // cannot block long after SIGKILL
    }
}

/// True when `arg` is the given subcommand name (used by main to split the raw arguments).
pub fn is_subcommand(arg: &OsStr, name: &str) -> bool {
    arg == OsStr::new(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_get_disjoint_contiguous_cpu_shares() {
        let allowed = [0, 1, 2, 3, 8, 9, 10];
        let shares: Vec<Vec<usize>> = (0..3)
            .map(|r| cpus_for_rank(&allowed, 3, r).unwrap())
            .collect();
        assert_eq!(shares, vec![vec![0, 1], vec![2, 3], vec![8, 9, 10]]);
        assert_eq!(cpus_for_rank(&[4, 5], 2, 1), Some(vec![5]));
        assert_eq!(cpus_for_rank(&[0, 1], 3, 0), None, "more ranks than CPUs");
        assert_eq!(cpu_list(&[0, 1, 2, 5, 7, 8]), "0-2,5,7-8");
    }
}
