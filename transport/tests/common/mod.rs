//! Multi-process test harness. A test binary re-executes itself (`current_exe`) with
//! `DTRAIN_TEST_SCENARIO` set as `<exe> worker --exact --ignored`; its `worker` entry (an
//! `#[ignore]`d test, so it never counts as a passing test in a normal run) then runs one rank
//! of that scenario and exits the process directly. Workers report on stdout with tagged lines:
//! `HASH <label> <hex>` (result digests, compared across ranks), `READY`, `ERROR <text>`,
//! `FAIL <text>` (a check failed), `DONE`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use transport::{CommConfig, Communicator, Timeouts, TransportKind};

// ---- parent side -----------------------------------------------------------------------

/// A port nobody listens on right now (bind to 0, read it, close). Collisions with other
/// tests are possible in principle; every rendezvous error message would name the port.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    l.local_addr().expect("local addr").port()
}

pub struct Worker {
    pub rank: usize,
    pub child: Child,
    lines: mpsc::Receiver<String>,
    pub output: Vec<String>,
    stderr: mpsc::Receiver<String>,
}

#[derive(Clone, Debug)]
pub struct Spawn {
    pub scenario: String,
    pub world_size: usize,
    pub port: u16,
    pub addr: String,
    pub transport: String,
    pub env: Vec<(String, String)>,
    /// Per-rank command prefix (e.g. `ip netns exec NAME`); empty = run directly.
    pub wrappers: Vec<Vec<String>>,
}

impl Spawn {
    pub fn new(scenario: &str, world_size: usize) -> Spawn {
        Spawn {
            scenario: scenario.to_string(),
            world_size,
            port: free_port(),
            addr: "127.0.0.1".to_string(),
            transport: "tcp".to_string(),
            env: Vec::new(),
            wrappers: Vec::new(),
        }
    }

    pub fn env(mut self, k: &str, v: impl ToString) -> Spawn {
        self.env.push((k.to_string(), v.to_string()));
        self
    }

    pub fn spawn_rank(&self, rank: usize, extra: &[(&str, String)]) -> Worker {
        let exe = std::env::current_exe().expect("current_exe");
        let mut argv: Vec<String> = Vec::new();
        if let Some(prefix) = self.wrappers.get(rank) {
            argv.extend(prefix.iter().cloned());
        }
        argv.push(exe.to_string_lossy().into_owned());
        argv.extend(
            [
                "worker",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ]
            .map(String::from),
        );
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env("DTRAIN_TEST_SCENARIO", &self.scenario)
            .env("DTRAIN_TEST_RANK", rank.to_string())
            .env("DTRAIN_TEST_WORLD", self.world_size.to_string())
            .env("DTRAIN_TEST_PORT", self.port.to_string())
            .env("DTRAIN_TEST_ADDR", &self.addr)
            .env("DTRAIN_TEST_TRANSPORT", &self.transport)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {argv:?}: {e}"));
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let (etx, stderr) = mpsc::channel();
        let err = child.stderr.take().expect("piped stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = etx.send(line);
            }
        });
        Worker {
            rank,
            child,
            lines,
            output: Vec::new(),
            stderr,
        }
    }

    pub fn spawn_all(&self) -> Vec<Worker> {
        (0..self.world_size)
            .map(|r| self.spawn_rank(r, &[]))
            .collect()
    }
}

pub struct Finished {
    pub rank: usize,
    pub code: Option<i32>,
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

impl Finished {
    pub fn tagged(&self, tag: &str) -> Vec<String> {
        let prefix = format!("{tag} ");
        self.stdout
            .iter()
            .filter_map(|l| l.strip_prefix(&prefix).map(str::to_string))
            .collect()
    }
    pub fn error(&self) -> Option<String> {
        self.tagged("ERROR").into_iter().next()
    }
    pub fn describe(&self) -> String {
        format!(
            "rank {} exit {:?}\n  stdout: {:#?}\n  stderr: {:#?}",
            self.rank, self.code, self.stdout, self.stderr
        )
    }
}

impl Worker {
    /// Waits for a stdout line starting with `tag` (bounded).
    pub fn wait_for_line(&mut self, tag: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = line.starts_with(tag);
                    self.output.push(line.clone());
                    if hit {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Waits for exit (killing the process after `limit`) and collects its output.
    pub fn finish(mut self, limit: Duration) -> Finished {
        let deadline = Instant::now() + limit;
        let code = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break status.code(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    self.output.push(format!("HARNESS killed after {limit:?}"));
                    break None;
                }
            }
        };
        // Reader threads end at EOF; give them a moment to deliver the last lines.
        let drain_deadline = Instant::now() + Duration::from_secs(5);
        while let Ok(line) = self
            .lines
            .recv_timeout(drain_deadline.saturating_duration_since(Instant::now()))
        {
            self.output.push(line);
        }
        let stderr = self.stderr.try_iter().collect();
        Finished {
            rank: self.rank,
            code,
            stdout: self.output,
            stderr,
        }
    }
}

pub fn finish_all(workers: Vec<Worker>, limit: Duration) -> Vec<Finished> {
    let deadline = Instant::now() + limit;
    workers
        .into_iter()
        .map(|w| w.finish(deadline.saturating_duration_since(Instant::now())))
        .collect()
}

/// Asserts every rank exited 0 and that digests with the same label agree across ranks.
pub fn assert_success_and_identical(results: &[Finished]) {
    for r in results {
        assert_eq!(r.code, Some(0), "worker failed:\n{}", r.describe());
        assert!(
            r.stdout.iter().any(|l| l == "DONE"),
            "no DONE:\n{}",
            r.describe()
        );
    }
    let digests = |r: &Finished| r.tagged("HASH");
    let first = digests(&results[0]);
    for r in &results[1..] {
        assert_eq!(
            digests(r),
            first,
            "result digests differ between rank 0 and rank {}",
            r.rank
        );
    }
}

// ---- worker side -----------------------------------------------------------------------

/// The scenario a spawned rank process runs. Without `DTRAIN_TEST_SCENARIO` (someone ran
/// `cargo test -- --ignored`) the `worker` entry fails loudly instead of passing for nothing.
pub fn child_scenario() -> String {
    std::env::var("DTRAIN_TEST_SCENARIO").unwrap_or_else(|_| {
        panic!(
            "`worker` is the rank process of this file's multi-process tests, started by them \
             with DTRAIN_TEST_SCENARIO set; it is not a test of its own"
        )
    })
}

pub fn env_usize(name: &str) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("worker needs {name}"))
}

pub fn worker_config() -> CommConfig {
    // libtest printed "test worker ... " without a newline: start our lines on a fresh one.
    println!();
    let mut cfg = CommConfig::new(
        std::env::var("DTRAIN_TEST_ADDR").unwrap_or_else(|_| "127.0.0.1".into()),
        env_usize("DTRAIN_TEST_PORT") as u16,
        env_usize("DTRAIN_TEST_RANK"),
        env_usize("DTRAIN_TEST_WORLD"),
    );
    cfg.transport = match std::env::var("DTRAIN_TEST_TRANSPORT").as_deref() {
        Ok("shm") => TransportKind::Shm,
        Ok("auto") => TransportKind::Auto,
        _ => TransportKind::Tcp,
    };
    cfg.auth_token = std::env::var("DTRAIN_TEST_TOKEN").ok();
    cfg.config_hash = std::env::var("DTRAIN_TEST_HASH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let ms = |name: &str, default: u64| {
        Duration::from_millis(
            std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(default),
        )
    };
    cfg.timeouts = Timeouts {
        connect: ms("DTRAIN_TEST_CONNECT_MS", 60_000),
        collective: ms("DTRAIN_TEST_COLLECTIVE_MS", 60_000),
        liveness: Duration::from_secs(5),
    };
    cfg
}

/// Connects, or prints `ERROR <text>` and exits 3.
pub fn connect_or_exit(cfg: &CommConfig) -> Communicator {
    match Communicator::connect(cfg) {
        Ok(c) => c,
        Err(e) => exit_error(&e),
    }
}

pub fn exit_error(e: &transport::Error) -> ! {
    println!("ERROR {e}");
    println!("ERRKIND {}", error_kind(e));
    std::process::exit(3)
}

pub fn error_kind(e: &transport::Error) -> &'static str {
    use transport::Error::*;
    match e {
        Timeout { .. } => "Timeout",
        PeerDied { .. } => "PeerDied",
        Protocol { .. } => "Protocol",
        Rendezvous(_) => "Rendezvous",
        Auth(_) => "Auth",
        ConfigMismatch(_) => "ConfigMismatch",
        InvalidArgument(_) => "InvalidArgument",
        Shm(_) => "Shm",
        Io { .. } => "Io",
    }
}

pub fn fail(msg: impl std::fmt::Display) -> ! {
    println!("FAIL {msg}");
    std::process::exit(1)
}

/// FNV-1a over bytes: a digest for comparing results across ranks.
pub fn digest(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

pub mod collectives;

pub fn exit_error_with(what: &str, e: &transport::Error) -> ! {
    println!("ERROR {what}: {e}");
    println!("ERRKIND {}", error_kind(e));
    std::process::exit(3)
}
