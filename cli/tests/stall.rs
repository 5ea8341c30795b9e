//! A stalled rank (SIGSTOP mid-training, as a swapped-out or preempted process would be):
//! stopped for less than `--timeout` and then continued (SIGCONT), the job ends normally with
//! the parameters of a run that never stalled; stopped for longer, its peer fails within
//! the deadline naming the stalled rank, where it is (pid or address) and what it waited for.
//! Shared memory and TCP.
//!
//! Every child is reaped ([`Ranks`]'s `Drop`), ports are free ones.

mod common;

use std::time::{Duration, Instant};

use common::watch::Watched;
use common::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// 2 ranks of DDP on the small problem over `transport`, 40 iterations (4 epochs), with a
/// collective deadline of `timeout` seconds.
fn rank_args(port: &str, rank: usize, transport: &str, timeout: u64) -> Vec<String> {
    let mut args = strings(SMALL);
    args.extend(strings(&["--mode", "ddp", "--transport", transport]));
    args.extend(strings(&["--num-nodes", "2", "--rank", &rank.to_string()]));
    args.extend(strings(&["--master-port", port]));
    args.extend(strings(&["--epochs", "4", "--max-iters", "40"]));
    args.extend(strings(&["--timeout", &timeout.to_string()]));
    args
}

/// The two ranks of the job, watched.
fn start(transport: &str, timeout: u64) -> Watched {
    let port = free_port().to_string();
    Watched::start(
        (0..2)
            .map(|r| spawn(&rank_args(&port, r, transport, timeout)))
            .collect(),
    )
}

fn signal(w: &Watched, rank: usize, signal: Signal) {
    let pid = Pid::from_raw(w.ranks.children[rank].id() as i32);
    kill(pid, signal).expect("signal a rank");
}

/// The parameter hashes of the same job without a stall.
fn reference_hashes(transport: &str) -> Vec<String> {
    let w = start(transport, 60);
    let (status, seen) = w.finish();
    assert!(status.iter().all(|s| s.success()), "{:?}", seen.stderr);
    let h: Vec<String> = seen.stdout.iter().flat_map(|o| hashes(o)).collect();
    assert_eq!(h.len(), 2);
    h
}

/// Rank 1 is stopped for 2 s after its 3rd iteration, under a 10 s deadline: no rank fails,
/// training carries on after the stall, and the parameters are those of the reference run.
fn a_short_stall_is_no_failure(transport: &str) {
    let expected = reference_hashes(transport);
    let mut w = start(transport, 10);
    w.wait_for_iterations(1, 3);
    signal(&w, 1, Signal::SIGSTOP);
    let at_stop = w.iterations(1);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        w.exited(0).is_none(),
        "rank 0 ended during the stall: {:?}",
        w.seen.stderr
    );
    signal(&w, 1, Signal::SIGCONT);
    let (status, seen) = w.finish();
    for (r, (status, stderr)) in status.iter().zip(&seen.stderr).enumerate() {
        assert!(status.success(), "{transport}: rank {r} {status}: {stderr}");
    }
    // The stall came mid-training: rank 1 trained on after it.
    assert!(
        losses(&seen.stdout[1]).len() > at_stop,
        "{transport}: stopped after the last iteration"
    );
    let got: Vec<String> = seen.stdout.iter().flat_map(|o| hashes(o)).collect();
    assert_eq!(got, expected, "{transport}");
}

/// Rank 1 is stopped (and stays stopped) after its 3rd iteration, under a 3 s deadline:
/// rank 0 fails on its own, naming rank 1 and the collective it waited for; continued
/// afterwards, rank 1 finds its peer gone and fails too, naming rank 0.
fn a_long_stall_is_named(transport: &str) {
    let mut w = start(transport, 3);
    w.wait_for_iterations(1, 3);
    signal(&w, 1, Signal::SIGSTOP);
    let start = Instant::now();
    while w.exited(0).is_none() {
        assert!(
            start.elapsed() < RUN_DEADLINE,
            "rank 0 waits for the stalled rank forever"
        );
        w.pump(Duration::from_millis(10));
    }
    signal(&w, 1, Signal::SIGCONT);
    let pids: Vec<u32> = w.ranks.children.iter().map(|c| c.id()).collect();
    let (status, seen) = w.finish();
    assert_eq!(status[0].code(), Some(1), "{transport}: {}", seen.stderr[0]);
    // `timed out after 3.000…s waiting for rank 1 at 127.0.0.1:PORT during all_reduce` (DDP's
    // gradient buckets); over shm `… waiting for rank 1 (pid PID, this host) during …`.
    let error = seen.stderr[0]
        .lines()
        .find(|l| l.starts_with("dtrain: error: rank 0: "))
        .unwrap_or_default();
    let waited_for = format!("waiting for rank 1{}", located(transport, pids[1]));
    for part in ["timed out after 3.", &waited_for, " during all_reduce"] {
        assert!(
            error.contains(part),
            "{transport}: want {part:?} in\n{}",
            seen.stderr[0]
        );
    }
    assert!(!status[1].success(), "{transport}: {}", seen.stderr[1]);
    let culprit = format!("rank 0{}", located(transport, pids[0]));
    assert!(
        seen.stderr[1].contains(&culprit),
        "{transport}: rank 1 does not name {culprit:?}:\n{}",
        seen.stderr[1]
    );
}

/// How an error names where a rank of this test is: its pid over shared memory, its data
/// address (on this host, port chosen at rendezvous) over TCP.
fn located(transport: &str, pid: u32) -> String {
    match transport {
        "shm" => format!(" (pid {pid}, this host)"),
        _ => " at 127.0.0.1:".to_string(),
    }
}

#[test]
fn shm_a_short_stall_is_no_failure() {
    a_short_stall_is_no_failure("shm");
}

#[test]
fn tcp_a_short_stall_is_no_failure() {
    a_short_stall_is_no_failure("tcp");
}

#[test]
fn shm_a_long_stall_is_named() {
    a_long_stall_is_named("shm");
}

#[test]
fn tcp_a_long_stall_is_named() {
    a_long_stall_is_named("tcp");
}
