//! A stalled rank (SIGSTOP mid-training, as a swapped-out or preempted process would be):
//! stopped for less than `--timeout` and then continued (SIGCONT), the job ends normally with
//! the parameters of a run that never stalled; stopped for longer, its peer fails within
//! the deadline naming the stalled rank and what it waited for. Shared memory and TCP.
//!
//! Every child is reaped ([`Ranks`]'s `Drop`), ports are free ones.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::{Duration, Instant};

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

/// What a rank printed so far and how it ended.
#[derive(Default)]
struct Seen {
    stdout: [String; 2],
    stderr: [String; 2],
}

/// The two ranks, their output arriving line by line on a channel.
struct Watched {
    ranks: Ranks,
    lines: mpsc::Receiver<(usize, bool, String)>,
    seen: Seen,
}

impl Watched {
    fn start(transport: &str, timeout: u64) -> Watched {
        let port = free_port().to_string();
        let mut ranks = Ranks {
            children: (0..2)
                .map(|r| spawn(&rank_args(&port, r, transport, timeout)))
                .collect(),
        };
        let (tx, lines) = mpsc::channel();
        for (r, child) in ranks.children.iter_mut().enumerate() {
            let out: Box<dyn std::io::Read + Send> = Box::new(child.stdout.take().expect("out"));
            let err: Box<dyn std::io::Read + Send> = Box::new(child.stderr.take().expect("err"));
            for (is_err, pipe) in [(false, out), (true, err)] {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        let _ = tx.send((r, is_err, line));
                    }
                });
            }
        }
        Watched {
            ranks,
            lines,
            seen: Seen::default(),
        }
    }

    /// Take the lines that arrived within `wait`.
    fn pump(&mut self, wait: Duration) {
        while let Ok((r, is_err, line)) = self.lines.recv_timeout(wait) {
            let text = if is_err {
                &mut self.seen.stderr[r]
            } else {
                &mut self.seen.stdout[r]
            };
            text.push_str(&line);
            text.push('\n');
        }
    }

    fn iterations(&self, rank: usize) -> usize {
        losses(&self.seen.stdout[rank]).len()
    }

    /// Wait until `rank` has printed `n` iteration lines.
    fn wait_for_iterations(&mut self, rank: usize, n: usize) {
        let start = Instant::now();
        while self.iterations(rank) < n {
            assert!(start.elapsed() < RUN_DEADLINE, "rank {rank} never trained");
            self.pump(Duration::from_millis(1));
        }
    }

    fn signal(&self, rank: usize, signal: Signal) {
        let pid = Pid::from_raw(self.ranks.children[rank].id() as i32);
        kill(pid, signal).expect("signal a rank");
    }

    /// Whether `rank` has exited (and is reaped).
    fn exited(&mut self, rank: usize) -> Option<std::process::ExitStatus> {
        self.ranks.children[rank].try_wait().expect("try_wait")
    }

    /// Wait for both ranks to exit; their exit statuses.
    fn finish(mut self) -> ([std::process::ExitStatus; 2], Seen) {
        let start = Instant::now();
        let mut status = [None, None];
        while status.iter().any(Option::is_none) {
            assert!(start.elapsed() < RUN_DEADLINE, "ranks still running");
            for (r, s) in status.iter_mut().enumerate() {
                if s.is_none() {
                    *s = self.exited(r);
                }
            }
            self.pump(Duration::from_millis(10));
        }
        // The readers end with the pipes; take what is left.
        self.pump(Duration::from_millis(200));
        (status.map(|s| s.expect("exited")), self.seen)
    }
}

/// The parameter hashes of the same job without a stall.
fn reference_hashes(transport: &str) -> Vec<String> {
    let w = Watched::start(transport, 60);
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
    let mut w = Watched::start(transport, 10);
    w.wait_for_iterations(1, 3);
    w.signal(1, Signal::SIGSTOP);
    let at_stop = w.iterations(1);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        w.exited(0).is_none(),
        "rank 0 ended during the stall: {:?}",
        w.seen.stderr
    );
    w.signal(1, Signal::SIGCONT);
    let (status, seen) = w.finish();
    for r in 0..2 {
        assert!(
            status[r].success(),
            "{transport}: rank {r} {}: {}",
            status[r],
            seen.stderr[r]
        );
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
    let mut w = Watched::start(transport, 3);
    w.wait_for_iterations(1, 3);
    w.signal(1, Signal::SIGSTOP);
    let start = Instant::now();
    while w.exited(0).is_none() {
        assert!(
            start.elapsed() < RUN_DEADLINE,
            "rank 0 waits for the stalled rank forever"
        );
        w.pump(Duration::from_millis(10));
    }
    w.signal(1, Signal::SIGCONT);
    let (status, seen) = w.finish();
    assert_eq!(status[0].code(), Some(1), "{transport}: {}", seen.stderr[0]);
    // `timed out after 3.000…s waiting for rank 1 during all_reduce` (DDP's gradient buckets).
    let error = seen.stderr[0]
        .lines()
        .find(|l| l.starts_with("dtrain: error: rank 0: "))
        .unwrap_or_default();
    for part in ["timed out after 3.", "waiting for rank 1 during all_reduce"] {
        assert!(
            error.contains(part),
            "{transport}: want {part:?} in\n{}",
            seen.stderr[0]
        );
    }
    assert!(!status[1].success(), "{transport}: {}", seen.stderr[1]);
    assert!(
        seen.stderr[1].contains("rank 0"),
        "{transport}: rank 1 does not name rank 0:\n{}",
        seen.stderr[1]
    );
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
