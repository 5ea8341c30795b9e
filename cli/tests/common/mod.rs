//! Helpers shared by the end-to-end tests: run `dtrain` as real processes (always reaped),
//! read their output, temporary folders and free ports.
#![allow(dead_code)] // each test crate uses its own subset

pub mod netns;
pub mod watch;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_dtrain");
/// No run of this suite should take anywhere near this long; a hang fails instead of blocking.
pub const RUN_DEADLINE: Duration = Duration::from_secs(180);

/// Small problem: 2 conv blocks, 320 synthetic images, batch 16 per rank.
pub const SMALL: &[&str] = &[
    "--dataset",
    "synthetic",
    "--synthetic-train",
    "320",
    "--synthetic-test",
    "96",
    "--model",
    "8,M,16,M",
    "--batch-size",
    "16",
    "--threads",
    "1",
    "--lr",
    "0.02",
    "--log-every",
    "1",
    "--no-progress",
];

pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

/// A temporary directory removed when dropped (also when a test fails).
pub struct TempDir(pub PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

pub fn temp_dir(tag: &str) -> TempDir {
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "dtrain-e2e-{tag}-{}-{}-{nanos}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    TempDir(dir)
}

/// What one process printed and how it ended.
#[derive(Debug)]
pub struct Outcome {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Children that are killed and reaped when dropped.
pub struct Ranks {
    pub children: Vec<Child>,
}

impl Drop for Ranks {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn spawn(args: &[String]) -> Child {
    Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn dtrain")
}

/// Read a child's pipes on threads (so a full pipe never blocks it) and wait with a deadline.
pub fn collect(ranks: &mut Ranks) -> Vec<Outcome> {
    let mut readers = Vec::new();
    for c in &mut ranks.children {
        let mut out = c.stdout.take().expect("stdout piped");
        let mut err = c.stderr.take().expect("stderr piped");
        let o = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut out, &mut s);
            s
        });
        let e = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut err, &mut s);
            s
        });
        readers.push((o, e));
    }
    let start = Instant::now();
    let mut statuses = vec![None; ranks.children.len()];
    while statuses.iter().any(Option::is_none) {
        for (i, c) in ranks.children.iter_mut().enumerate() {
            if statuses[i].is_none() {
                statuses[i] = c.try_wait().expect("try_wait");
            }
        }
        assert!(
            start.elapsed() < RUN_DEADLINE,
            "dtrain processes still running after {RUN_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    statuses
        .into_iter()
        .zip(readers)
        .map(|(s, (o, e))| Outcome {
            status: s.expect("exited"),
            stdout: o.join().unwrap_or_default(),
            stderr: e.join().unwrap_or_default(),
        })
        .collect()
}

pub fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| s.to_string()).collect()
}

/// Replace the value of `flag` (which must be present) in `args`.
pub fn set_flag(args: &mut [String], flag: &str, value: &str) {
    let i = args.iter().position(|a| a == flag).expect("flag present");
    args[i + 1] = value.to_string();
}

/// Start `world` ranks as separate processes with explicit `--rank`, and wait for them.
pub fn run_ranks(world: usize, mode: &str, extra: &[&str]) -> Vec<Outcome> {
    let port = free_port().to_string();
    let mut ranks = Ranks {
        children: Vec::new(),
    };
    for r in 0..world {
        let mut args = strings(SMALL);
        args.extend(strings(&["--mode", mode, "--master-port", &port]));
        args.extend(strings(&[
            "--num-nodes",
            &world.to_string(),
            "--rank",
            &r.to_string(),
        ]));
        args.extend(strings(extra));
        ranks.children.push(spawn(&args));
    }
    collect(&mut ranks)
}

pub fn run_single(args: &[String]) -> Outcome {
    let mut ranks = Ranks {
        children: vec![spawn(args)],
    };
    collect(&mut ranks).remove(0)
}

pub fn assert_ok(outcomes: &[Outcome]) {
    for (r, o) in outcomes.iter().enumerate() {
        assert!(
            o.status.success(),
            "rank {r} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            o.status,
            o.stdout,
            o.stderr
        );
    }
}

/// Strip the launcher's `[rank k] ` prefix, if any.
pub fn unprefixed(line: &str) -> &str {
    match line.strip_prefix("[rank ") {
        Some(rest) => rest.split_once("] ").map(|(_, l)| l).unwrap_or(line),
        None => line,
    }
}

pub fn hashes(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| unprefixed(l).strip_prefix("Parameter hash: "))
        .map(str::to_string)
        .collect()
}

/// (batch index, loss) of every `Training Iteration` line, in order.
pub fn losses(text: &str) -> Vec<(usize, f64)> {
    text.lines()
        .map(unprefixed)
        .filter(|l| l.starts_with("Training Iteration: "))
        .map(|l| {
            let idx = l["Training Iteration: ".len()..]
                .split(' ')
                .next()
                .and_then(|s| s.parse().ok())
                .expect("batch index");
            let loss = l
                .rsplit("Loss: ")
                .next()
                .and_then(|s| s.trim().parse().ok())
                .expect("loss value");
            (idx, loss)
        })
        .collect()
}

pub fn assert_losses_close(a: &[(usize, f64)], b: &[(usize, f64)], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: different numbers of loss lines");
    assert!(!a.is_empty(), "{what}: no loss lines");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0, "{what}: batch indices differ");
        assert!(
            (x.1 - y.1).abs() <= 1e-4,
            "{what}: loss {} vs {} at batch {}",
            x.1,
            y.1,
            x.0
        );
    }
}

/// The names in `dir`, sorted.
pub fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("list a folder")
        .map(|e| {
            e.expect("folder entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}
