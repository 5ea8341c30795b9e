//! Multi-node `dtrain launch` (`--nnodes 2 --node-rank K`): one launcher per "host", started
//! for real.
//!
//! - Across two network namespaces joined by a veth pair (each namespace a host with its own
//!   `DTRAIN_HOST_ID`, 2 ranks each, `--transport auto`: shared memory inside a host, TCP
//!   between): the four ranks end with equal parameter hashes, the same as the same job
//!   started as plain `--rank` processes; a rank killed -9 on one host ends both launchers
//!   non-zero, naming it; with `--max-restarts 1` both hosts restart together and the job
//!   ends with the uninterrupted run's hash. These need root and iproute2 (`ip`); without
//!   them they FAIL with a message saying so (CI runs as root and installs iproute2).
//! - On loopback (two launchers on this host, the launcher test child instead of training):
//!   a failure on one node stops the other, restarts across nodes, mismatched flags, and a
//!   launcher that dies is noticed by the other through its heartbeat.
//!
//! Every launcher is killed and reaped on drop (its ranks die with it: they get SIGTERM
//! when their launcher dies), and namespaces are deleted after their processes are gone.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{
    free_port, hashes, set_flag, strings, temp_dir, unprefixed, BIN, RUN_DEADLINE, SMALL,
};

use common::netns::{TwoHosts, HOST_IPS as IPS};

// ---- launchers ----------------------------------------------------------------------------

/// A running process whose stdout and stderr are collected as they come.
struct Running {
    child: Child,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Running {
    fn start(mut cmd: Command) -> Running {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dtrain launch");
        let (stdout, stderr) = (Arc::default(), Arc::default());
        let readers = vec![
            read_lines(child.stdout.take().unwrap(), Arc::clone(&stdout)),
            read_lines(child.stderr.take().unwrap(), Arc::clone(&stderr)),
        ];
        Running {
            child,
            stdout,
            stderr,
            readers,
        }
    }

    /// Waits (bounded) until some line printed so far satisfies `want`; returns it.
    fn wait_for_line(&self, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + RUN_DEADLINE;
        loop {
            let found = [&self.stdout, &self.stderr].iter().find_map(|text| {
                let text = text.lock().unwrap();
                text.lines().find(|l| want(l)).map(str::to_string)
            });
            if let Some(line) = found {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "never saw {what}:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn text(&self) -> String {
        format!(
            "--- stdout\n{}--- stderr\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_lines(
    from: impl Read + Send + 'static,
    into: Arc<Mutex<String>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push_str(&format!("{line}\n"));
        }
    })
}

/// What a finished launcher printed.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn text(&self) -> String {
        format!(
            "({})\n--- stdout\n{}--- stderr\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Waits for every launcher (bounded; on a hang the test fails with what they printed).
fn wait_all(mut launchers: Vec<Running>, limit: Duration) -> Vec<Finished> {
    let start = Instant::now();
    let mut statuses: Vec<Option<ExitStatus>> = vec![None; launchers.len()];
    while statuses.iter().any(Option::is_none) {
        for (s, l) in statuses.iter_mut().zip(launchers.iter_mut()) {
            if s.is_none() {
                *s = l.child.try_wait().expect("try_wait");
            }
        }
        if start.elapsed() > limit {
            let all: Vec<String> = launchers.iter().map(Running::text).collect();
            panic!(
                "launchers still running after {limit:?}:\n{}",
                all.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    launchers
        .iter_mut()
        .zip(statuses)
        .map(|(l, s)| {
            for r in l.readers.drain(..) {
                let _ = r.join();
            }
            Finished {
                status: s.expect("exited"),
                stdout: l.stdout.lock().unwrap().clone(),
                stderr: l.stderr.lock().unwrap().clone(),
            }
        })
        .collect()
}

/// `dtrain launch --nnodes 2 --node-rank <node> --nproc-per-node 2 --master-ip <master>`,
/// in namespace `netns` if given, as host `host_id`.
fn launcher(
    netns: Option<&str>,
    node: usize,
    master: &str,
    host_id: &str,
    args: &[String],
    env: &[(&str, &str)],
) -> Running {
    let mut cmd = match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, BIN]);
            c
        }
        None => Command::new(BIN),
    };
    cmd.args(["launch", "--nnodes", "2", "--nproc-per-node", "2"])
        .args(["--node-rank", &node.to_string(), "--master-ip", master])
        .args(["--grace-secs", "3"])
        .args(args)
        .env("DTRAIN_HOST_ID", host_id)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .env_remove("TORCHELASTIC_USE_AGENT_STORE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    Running::start(cmd)
}

fn host_ids(tag: &str) -> [String; 2] {
    let base = format!("launch-multinode-{tag}-{}", std::process::id());
    [format!("{base}-a"), format!("{base}-b")]
}

/// Both launchers across the two namespaces (node 0 in the first).
fn across(hosts: &TwoHosts, ids: &[String; 2], args: &[String]) -> Vec<Running> {
    (0..2)
        .map(|node| {
            launcher(
                Some(&hosts.names[node]),
                node,
                IPS[0],
                &ids[node],
                args,
                &[],
            )
        })
        .collect()
}

/// The hash every rank must end with: the same job as four plain `--rank` processes on
/// loopback, ranks 0-1 as host `ids[0]` and 2-3 as `ids[1]` (so the same transports and sum
/// order as across the namespaces).
fn reference_hash(ids: &[String; 2], args: &[String]) -> String {
    let port = free_port().to_string();
    let mut ranks = common::Ranks {
        children: Vec::new(),
    };
    for rank in 0..4 {
        let child = Command::new(BIN)
            .args(args)
            .args(["--master-port", &port, "--num-nodes", "4"])
            .args(["--rank", &rank.to_string()])
            .env("DTRAIN_HOST_ID", &ids[rank / 2])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dtrain");
        ranks.children.push(child);
    }
    let outcomes = common::collect(&mut ranks);
    common::assert_ok(&outcomes);
    let all: Vec<String> = outcomes.iter().flat_map(|o| hashes(&o.stdout)).collect();
    assert_eq!(all.len(), 4, "one hash per reference rank: {all:?}");
    assert!(all.iter().all(|h| *h == all[0]), "reference: {all:?}");
    all[0].clone()
}

/// `(global rank, hash)` of every `[rank k] Parameter hash: …` line.
fn ranked_hashes(stdout: &str) -> Vec<(usize, String)> {
    stdout
        .lines()
        .filter_map(|l| {
            let rank = l.strip_prefix("[rank ")?.split_once(']')?.0.parse().ok()?;
            let hash = unprefixed(l).strip_prefix("Parameter hash: ")?;
            Some((rank, hash.to_string()))
        })
        .collect()
}

/// Each node's ranks (node 0: 0 and 1, node 1: 2 and 3) end with `want`.
fn assert_all_ranks_end_with(outs: &[Finished], want: &str) {
    for (node, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "node {node} failed:\n{}", out.text());
        let mut got = ranked_hashes(&out.stdout);
        got.sort();
        let expected: Vec<(usize, String)> = (2 * node..2 * node + 2)
            .map(|r| (r, want.to_string()))
            .collect();
        assert_eq!(got, expected, "node {node}:\n{}", out.text());
    }
}

/// The pid `dtrain launch` reported for global rank `rank`.
fn rank_pid(l: &Running, rank: usize) -> i32 {
    let prefix = format!("dtrain launch: rank {rank} is pid ");
    let line = l.wait_for_line(&format!("rank {rank}'s pid"), |s| s.starts_with(&prefix));
    line[prefix.len()..]
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"))
}

/// SIGKILL `pid`, after checking it is one of our dtrain ranks.
fn kill_rank(pid: i32) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("dtrain"),
        "pid {pid} is not a dtrain rank"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill -9 the rank");
}

/// The small DDP job of the other end-to-end tests, with `overrides` of its flags and `extra`
/// ones.
fn job(overrides: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
    let mut args = strings(SMALL);
    for (flag, value) in overrides {
        set_flag(&mut args, flag, value);
    }
    args.extend(strings(&["--mode", "ddp", "--transport", "auto"]));
    args.extend(strings(extra));
    args
}

// ---- across two namespace hosts -----------------------------------------------------------

#[test]
fn two_hosts_with_two_ranks_each_end_with_equal_hashes() {
    let hosts = TwoHosts::create(
        "the multi-node launch test across network namespaces",
        "l",
        None,
    );
    let ids = host_ids("equal");
    let args = job(&[], &["--max-iters", "4"]);
    let outs = wait_all(across(&hosts, &ids, &args), RUN_DEADLINE);
    drop(hosts);
    let reference = reference_hash(&ids, &args);
    assert_all_ranks_end_with(&outs, &reference);
}

#[test]
fn a_rank_killed_on_one_host_ends_both_launchers_naming_it() {
    let hosts = TwoHosts::create(
        "the multi-node launch test across network namespaces",
        "l",
        None,
    );
    let ids = host_ids("kill");
    // Long enough never to finish on its own: 10 iterations per epoch, 400 epochs.
    let args = job(&[("--synthetic-train", "640")], &["--epochs", "400"]);
    let launchers = across(&hosts, &ids, &args);
    let pid = rank_pid(&launchers[1], 3);
    launchers[1].wait_for_line("training on node 1", |l| {
        l.starts_with("[rank 3] Training Iteration: ")
    });
    kill_rank(pid);
    let outs = wait_all(launchers, Duration::from_secs(90));
    drop(hosts);
    for (node, out) in outs.iter().enumerate() {
        assert_eq!(
            out.status.code(),
            Some(128 + 9),
            "node {node} must exit as the killed rank did:\n{}",
            out.text()
        );
        assert!(
            out.stderr
                .contains("dtrain launch: error: rank 3 (node 1) failed with signal 9 (SIGKILL)"),
            "node {node} must name the killed rank:\n{}",
            out.text()
        );
    }
}

#[test]
fn a_restart_across_hosts_ends_with_the_uninterrupted_hash() {
    let hosts = TwoHosts::create(
        "the multi-node launch test across network namespaces",
        "l",
        None,
    );
    let ids = host_ids("restart");
    let dir = temp_dir("multinode-restart");
    let ckpt = dir.join("run.safetensors");
    let args = job(
        &[("--synthetic-train", "640"), ("--log-every", "20")],
        &["--epochs", "100", "--max-iters", "200"],
    );
    let mut with_restarts = args.clone();
    with_restarts.extend(strings(&[
        "--max-restarts",
        "1",
        "--save-checkpoint",
        ckpt.to_str().unwrap(),
        "--checkpoint-every",
        "5",
    ]));
    let launchers = across(&hosts, &ids, &with_restarts);
    let pid = rank_pid(&launchers[1], 2);
    wait_for_file(&ckpt, &launchers);
    kill_rank(pid);
    let outs = wait_all(launchers, RUN_DEADLINE);
    drop(hosts);
    for (node, out) in outs.iter().enumerate() {
        assert!(
            out.stderr.contains(
                "restarting all ranks on all 2 nodes in 1s (restart 1 of 1) after rank 2 (node 1) failed with signal 9 (SIGKILL)"
            ),
            "node {node}:\n{}",
            out.text()
        );
        // Attempt 1 resumed from a periodic checkpoint, before the end of the run.
        let resumed: Vec<usize> = out
            .stderr
            .lines()
            .filter_map(|l| {
                l.split_once("restart 1: resuming from ")?
                    .1
                    .rsplit_once("(iteration ")
            })
            .filter_map(|(_, n)| n.trim_end_matches(')').parse().ok())
            .collect();
        assert_eq!(
            resumed.len(),
            2,
            "both ranks of node {node} resumed:\n{}",
            out.text()
        );
        assert!(resumed.iter().all(|&i| i < 200), "{resumed:?}");
    }
    assert_all_ranks_end_with(&outs, &reference_hash(&ids, &args));
}

fn wait_for_file(path: &Path, launchers: &[Running]) {
    let deadline = Instant::now() + RUN_DEADLINE;
    while !path.exists() {
        if Instant::now() > deadline {
            let all: Vec<String> = launchers.iter().map(Running::text).collect();
            panic!("{} never appeared:\n{}", path.display(), all.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

// ---- on loopback, with the launcher test child --------------------------------------------

/// Both launchers on this host (node 0 hosting the store on a free loopback port), running
/// `launcher-test-child` as ranks.
fn on_loopback(extra: &[&str], env: &[(&str, &str)]) -> Vec<Running> {
    let master = format!("127.0.0.1:{}", free_port());
    let ids = host_ids("loopback");
    let mut args = strings(&["--child-command", "launcher-test-child"]);
    args.extend(strings(extra));
    (0..2)
        .map(|node| launcher(None, node, &master, &ids[node], &args, env))
        .collect()
}

#[test]
fn a_failure_on_one_node_stops_the_ranks_of_the_other() {
    let ready = temp_dir("multinode-fail");
    let env = [
        ("DTRAIN_TEST_FAIL_RANK", "3"),
        ("DTRAIN_TEST_EXIT_CODE", "7"),
        ("DTRAIN_TEST_SLEEP_SECS", "120"),
        ("DTRAIN_TEST_READY_DIR", ready.to_str().unwrap()),
    ];
    let start = Instant::now();
    let outs = wait_all(on_loopback(&[], &env), Duration::from_secs(60));
    assert!(start.elapsed() < Duration::from_secs(60));
    for (node, out) in outs.iter().enumerate() {
        assert_eq!(out.status.code(), Some(7), "node {node}:\n{}", out.text());
        assert!(
            out.stderr
                .contains("dtrain launch: error: rank 3 (node 1) failed with exit status 7"),
            "node {node}:\n{}",
            out.text()
        );
        // The sleepers were stopped, not waited for.
        assert!(
            !out.stdout.contains(" done"),
            "node {node}:\n{}",
            out.text()
        );
    }
    assert!(
        outs[0]
            .stderr
            .contains("a rank failed on another node; stopping the ranks of this node"),
        "{}",
        outs[0].text()
    );
    // Global ranks: node 0 ran 0 and 1, node 1 ran 2 and 3, in a world of 4.
    for (node, out) in outs.iter().enumerate() {
        for rank in [2 * node, 2 * node + 1] {
            let want = format!("[rank {rank}] rank {rank} attempt 0 port ");
            assert!(out.stdout.contains(&want), "{want:?} in\n{}", out.text());
        }
    }
}

#[test]
fn a_failing_rank_restarts_every_node_together() {
    // The failing rank waits until the others of its attempt are running.
    let ready = temp_dir("multinode-restart-child");
    let env = [
        ("DTRAIN_TEST_READY_DIR", ready.to_str().unwrap()),
        ("DTRAIN_TEST_FAIL_RANK", "2"),
        ("DTRAIN_TEST_FAIL_ATTEMPTS", "1"),
        ("DTRAIN_TEST_LINES", "0"),
    ];
    let outs = wait_all(
        on_loopback(&["--max-restarts", "2"], &env),
        Duration::from_secs(90),
    );
    for (node, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "node {node}:\n{}", out.text());
        assert!(
            out.stderr
                .contains("(restart 1 of 2) after rank 2 (node 1) failed with exit status 3"),
            "node {node}:\n{}",
            out.text()
        );
        for rank in [2 * node, 2 * node + 1] {
            for attempt in [0, 1] {
                let want = format!("[rank {rank}] rank {rank} attempt {attempt} port ");
                assert!(out.stdout.contains(&want), "{want:?} in\n{}", out.text());
            }
            assert!(
                !out.stdout.contains(&format!("rank {rank} attempt 2")),
                "{}",
                out.text()
            );
        }
    }
}

#[test]
fn nodes_started_with_different_layouts_are_rejected() {
    let master = format!("127.0.0.1:{}", free_port());
    let ids = host_ids("mismatch");
    let child = strings(&["--child-command", "launcher-test-child"]);
    let mut node1 = child.clone();
    node1.extend(strings(&["--max-restarts", "3"]));
    let launchers = vec![
        launcher(None, 0, &master, &ids[0], &child, &[]),
        launcher(None, 1, &master, &ids[1], &node1, &[]),
    ];
    let outs = wait_all(launchers, Duration::from_secs(60));
    let why = "node 1 was started with --max-restarts 3 but node 0 with --max-restarts 0";
    assert_eq!(outs[1].status.code(), Some(2), "{}", outs[1].text());
    assert!(outs[1].stderr.contains(why), "{}", outs[1].text());
    assert!(!outs[0].status.success(), "{}", outs[0].text());
    assert!(outs[0].stderr.contains(why), "{}", outs[0].text());
}

#[test]
fn a_dead_launcher_is_noticed_by_the_other_node() {
    let env = [
        ("DTRAIN_TEST_SLEEP_SECS", "120"),
        ("DTRAIN_TEST_LINES", "0"),
    ];
    let mut launchers = on_loopback(&[], &env);
    for rank in 0..4 {
        let node = &launchers[rank / 2];
        node.wait_for_line(&format!("rank {rank} running"), |l| {
            l.starts_with(&format!("[rank {rank}] rank {rank} attempt 0"))
        });
    }
    // Node 1's launcher dies; its ranks get SIGTERM from the kernel (parent-death signal).
    let node1 = launchers.pop().expect("two launchers");
    drop(node1);
    let outs = wait_all(launchers, Duration::from_secs(60));
    let out = &outs[0];
    assert!(!out.status.success(), "{}", out.text());
    assert!(
        out.stderr.contains("node 1's launcher (pid ")
            && out
                .stderr
                .contains("stopped answering: no heartbeat for 10s"),
        "{}",
        out.text()
    );
    assert!(!out.stdout.contains(" done"), "{}", out.text());
}

#[test]
fn sigterm_to_one_launcher_stops_the_job_on_both_nodes() {
    let env = [
        ("DTRAIN_TEST_SLEEP_SECS", "120"),
        ("DTRAIN_TEST_LINES", "0"),
    ];
    let launchers = on_loopback(&[], &env);
    for rank in 0..4 {
        launchers[rank / 2].wait_for_line(&format!("rank {rank} running"), |l| {
            l.starts_with(&format!("[rank {rank}] rank {rank} attempt 0"))
        });
    }
    let node1 = nix::unistd::Pid::from_raw(launchers[1].child.id() as i32);
    nix::sys::signal::kill(node1, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM node 1");
    let outs = wait_all(launchers, Duration::from_secs(60));
    assert_eq!(outs[1].status.code(), Some(128 + 15), "{}", outs[1].text());
    assert_eq!(outs[0].status.code(), Some(1), "{}", outs[0].text());
    assert!(
        outs[0]
            .stderr
            .contains("dtrain launch: error: node 1's launcher was stopped by SIGTERM"),
        "{}",
        outs[0].text()
    );
    for out in &outs {
        assert!(!out.stdout.contains(" done"), "{}", out.text());
    }
}
