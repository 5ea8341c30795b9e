//! Ranks watched while they run: their output arrives line by line, so a test can act at a
//! point of training (stop a rank, take a link down) and then wait for the outcome.

use std::io::{BufRead, BufReader};
use std::process::{Child, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{losses, Ranks, RUN_DEADLINE};

/// What each rank printed so far.
#[derive(Default)]
pub struct Seen {
    pub stdout: Vec<String>,
    pub stderr: Vec<String>,
}

/// Running ranks (killed and reaped on drop) and their output.
pub struct Watched {
    pub ranks: Ranks,
    lines: mpsc::Receiver<(usize, bool, String)>,
    pub seen: Seen,
}

impl Watched {
    /// Watch `children`, spawned with piped stdout and stderr; rank k is `children[k]`.
    pub fn start(children: Vec<Child>) -> Watched {
        let n = children.len();
        let mut ranks = Ranks { children };
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
            seen: Seen {
                stdout: vec![String::new(); n],
                stderr: vec![String::new(); n],
            },
        }
    }

    /// Take the lines that arrive until none came for `wait`.
    pub fn pump(&mut self, wait: Duration) {
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

    /// The `Training Iteration` lines `rank` printed so far.
    pub fn iterations(&self, rank: usize) -> usize {
        losses(&self.seen.stdout[rank]).len()
    }

    /// Wait until `rank` has printed `n` iteration lines.
    pub fn wait_for_iterations(&mut self, rank: usize, n: usize) {
        let start = Instant::now();
        while self.iterations(rank) < n {
            assert!(
                start.elapsed() < RUN_DEADLINE,
                "rank {rank} never trained: {:?}",
                self.seen.stderr
            );
            assert!(
                self.exited(rank).is_none(),
                "rank {rank} ended early: {:?}",
                self.seen.stderr
            );
            self.pump(Duration::from_millis(1));
        }
    }

    /// `rank`'s exit status once it has exited (it is then reaped).
    pub fn exited(&mut self, rank: usize) -> Option<ExitStatus> {
        self.ranks.children[rank].try_wait().expect("try_wait")
    }

    /// Wait (bounded by [`RUN_DEADLINE`]) for every rank to exit.
    pub fn finish(mut self) -> (Vec<ExitStatus>, Seen) {
        let start = Instant::now();
        let mut status: Vec<Option<ExitStatus>> = vec![None; self.ranks.children.len()];
        while status.iter().any(Option::is_none) {
            assert!(
                start.elapsed() < RUN_DEADLINE,
                "ranks still running: {:?}",
                self.seen.stderr
            );
            for (r, s) in status.iter_mut().enumerate() {
                if s.is_none() {
                    *s = self.exited(r);
                }
            }
            self.pump(Duration::from_millis(10));
        }
        // The readers end with the pipes; take what is left.
        self.pump(Duration::from_millis(200));
        let seen = std::mem::take(&mut self.seen);
        (
            status.into_iter().map(|s| s.expect("exited")).collect(),
            seen,
        )
    }
}
