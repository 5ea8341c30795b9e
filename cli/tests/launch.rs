//! `dtrain launch`: children get torchrun's environment, lines are prefixed, a failing rank
//! stops the others and the launcher names it; everything is reaped.

mod common;

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use common::temp_dir;

use dtrain::launch::forwarded_args;

/// `dtrain launch` of `n` test children with `extra` flags and `env`, stdout and stderr
/// piped, for tests that watch it run.
fn spawn_launcher(n: usize, extra: &[&str], env: &[(&str, &str)]) -> std::process::Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dtrain"));
    cmd.args(["launch", "--nproc-per-node", &n.to_string()])
        .args(["--child-command", "launcher-test-child"])
        .args(extra)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn dtrain launch")
}

fn launch(n: usize, env: &[(&str, &str)], extra: &[&str]) -> (Output, Duration) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_dtrain"));
    cmd.args([
        "launch",
        "--nproc-per-node",
        &n.to_string(),
        "--grace-secs",
        "2",
    ])
    .args(["--child-command", "launcher-test-child"])
    .args(extra)
    .env_remove("RANK")
    .env_remove("WORLD_SIZE");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let start = Instant::now();
    let out = cmd.output().expect("run dtrain launch");
    (out, start.elapsed())
}

/// The pids the launcher reported for its children, checked to have exited (no process left
/// behind).
fn assert_children_gone(launcher_stderr: &str, n: usize) {
    let pids: Vec<u32> = launcher_stderr
        .lines()
        .filter(|l| l.starts_with("dtrain launch: rank "))
        .filter_map(|l| {
            l.split(" is pid ")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(pids.len(), n, "pid lines in\n{launcher_stderr}");
    for pid in pids {
        // The launcher reaped them, so the pid is gone (or reused by an unrelated process,
        // which would not run our test child).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains("launcher-test-child"),
            "child {pid} still exists"
        );
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn all_ranks_run_with_prefixed_lines() {
    let (out, _) = launch(3, &[("DTRAIN_TEST_LINES", "2")], &[]);
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for rank in 0..3 {
        for i in 0..2 {
            let want = format!("[rank {rank}] hello {i} from rank {rank} of 3");
            assert!(
                stdout.lines().any(|l| l == want),
                "missing {want:?} in\n{stdout}"
            );
            let want = format!("[rank {rank}] note {i} from rank {rank}");
            assert!(
                stderr.lines().any(|l| l == want),
                "missing {want:?} in\n{stderr}"
            );
        }
        assert!(stdout.contains(&format!("[rank {rank}] rank {rank} done")));
    }
    // Every stdout line is prefixed.
    assert!(stdout.lines().all(|l| l.starts_with("[rank ")), "{stdout}");
    assert_children_gone(&stderr, 3);
}

/// The CPU list each child printed (`[rank k] rank k cpus 0-1,4`), expanded, by rank.
fn child_cpus(stdout: &str, n: usize) -> Vec<Vec<usize>> {
    (0..n)
        .map(|rank| {
            let prefix = format!("[rank {rank}] rank {rank} cpus ");
            let list = stdout
                .lines()
                .find_map(|l| l.strip_prefix(&prefix))
                .unwrap_or_else(|| panic!("no cpu line for rank {rank} in\n{stdout}"));
            list.split(',')
                .flat_map(|part| match part.split_once('-') {
                    Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect(),
                    None => vec![part.parse::<usize>().unwrap()],
                })
                .collect()
        })
        .collect()
}

#[test]
fn ranks_are_pinned_to_disjoint_cpu_shares() {
    let mine = dtrain::launch::allowed_cpus();
    assert!(!mine.is_empty(), "cannot read this process's CPU affinity");
    // As many ranks as CPUs (at most 4): each gets its own share.
    let n = mine.len().min(4);
    let (out, _) = launch(n, &[], &[]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shares = child_cpus(&stdout, n);
    let mut seen: Vec<usize> = shares.concat();
    assert!(shares.iter().all(|s| !s.is_empty()), "{shares:?}");
    seen.sort_unstable();
    let total = seen.len();
    seen.dedup();
    assert_eq!(seen.len(), total, "shares overlap: {shares:?}");
    assert!(
        seen.iter().all(|c| mine.contains(c)),
        "{shares:?} vs {mine:?}"
    );
    assert!(
        text(&out.stderr).contains("on CPUs"),
        "{}",
        text(&out.stderr)
    );

    // Opted out, or more ranks than CPUs: no binding, every rank may use every CPU.
    for (ranks, extra) in [
        (n, &["--bind-cores", "none"][..]),
        (mine.len() + 1, &[][..]),
    ] {
        let (out, _) = launch(ranks, &[], extra);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        for share in child_cpus(&text(&out.stdout), ranks) {
            assert_eq!(share, mine, "ranks {ranks} {extra:?}");
        }
    }
}

#[test]
fn a_failing_rank_stops_the_others() {
    let ready = temp_dir("fail");
    // Rank 1 fails at once with status 7; ranks 0 and 2 would sleep 60 s.
    let (out, elapsed) = launch(
        3,
        &[
            ("DTRAIN_TEST_FAIL_RANK", "1"),
            ("DTRAIN_TEST_EXIT_CODE", "7"),
            ("DTRAIN_TEST_SLEEP_SECS", "60"),
            ("DTRAIN_TEST_READY_DIR", ready.0.to_str().unwrap()),
        ],
        &[],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "stderr:\n{stderr}");
    assert!(
        stderr.contains("rank 1 failed with exit status 7"),
        "stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("[rank 1] rank 1 failing on purpose"),
        "{stderr}"
    );
    // The sleepers were stopped (SIGTERM), not waited for.
    assert!(
        !stdout.contains("rank 0 done") && !stdout.contains("rank 2 done"),
        "{stdout}"
    );
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    assert_children_gone(&stderr, 3);
}

#[test]
fn ranks_ignoring_sigterm_are_killed_after_the_grace_period() {
    let ready = temp_dir("ignore-term");
    let (out, elapsed) = launch(
        2,
        &[
            ("DTRAIN_TEST_FAIL_RANK", "0"),
            ("DTRAIN_TEST_SLEEP_SECS", "60"),
            ("DTRAIN_TEST_IGNORE_TERM", "1"),
            ("DTRAIN_TEST_READY_DIR", ready.0.to_str().unwrap()),
        ],
        &[],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("still running") && stderr.contains("killing"),
        "{stderr}"
    );
    assert!(
        stderr.contains("rank 0 failed with exit status 3"),
        "{stderr}"
    );
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?}");
    assert_children_gone(&stderr, 2);
}

#[test]
fn sigterm_to_the_launcher_is_forwarded() {
    use std::io::{BufRead, BufReader};
    let mut child = spawn_launcher(
        2,
        &["--grace-secs", "5"],
        &[("DTRAIN_TEST_SLEEP_SECS", "60")],
    );
    // Wait until both ranks have printed "done"-less hello lines (they then sleep).
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.matches("pid ").count() < 2 || seen.matches("hello 1").count() < 2 {
        assert!(Instant::now() < deadline, "children did not start: {seen}");
        let mut line = String::new();
        if stdout.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let start = Instant::now();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_eq!(status.code(), Some(128 + 15), "{stderr}");
    assert!(stderr.contains("forwarding it to the ranks"), "{stderr}");
    assert!(!rest.contains("done"), "{rest}");
    assert_children_gone(&stderr, 2);
}

#[test]
fn bad_launch_arguments_are_usage_errors() {
    for extra in [
        vec!["--rank", "1"],
        vec!["--num-nodes", "5"],
        vec!["--batch-size", "0"],
        vec!["--nnodes", "0"],
        vec!["--nnodes", "2", "--node-rank", "2"],
        vec!["--nnodes", "2", "--num-nodes", "2"],
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_dtrain"));
        let out = cmd
            .args(["launch", "--nproc-per-node", "2"])
            .args(&extra)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{extra:?}: {stderr}");
        assert!(stderr.starts_with("dtrain: error: "), "{stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["launch", "--nproc-per-node", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn launcher_only_flags_are_not_forwarded() {
    let args: Vec<std::ffi::OsString> = [
        "--nproc-per-node",
        "2",
        "--mode",
        "ddp",
        "--grace-secs=3",
        "--lr",
        "0.5",
        "--child-command",
        "x",
        "--max-restarts",
        "3",
        "--nnodes",
        "2",
        "--node-rank=1",
    ]
    .iter()
    .map(Into::into)
    .collect();
    let fwd: Vec<String> = forwarded_args(&args)
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    assert_eq!(fwd, vec!["--mode", "ddp", "--lr", "0.5"]);
}

/// `dtrain bench` starts its ranks itself; rank 0 prints one JSON object per message size.
#[test]
fn bench_prints_one_json_row_per_size() {
    let out = Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["bench", "--transport", "tcp", "--num-nodes", "2"])
        .args([
            "--factor",
            "2",
            "--collectives",
            "all-reduce,broadcast",
            "--no-memcpy",
        ])
        .args([
            "--min-bytes",
            "4K",
            "--max-bytes",
            "16K",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect();
    let rows_of = |c: &str| -> Vec<u64> {
        rows.iter()
            .filter(|r| r["collective"] == c)
            .map(|r| r["bytes"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(rows_of("all_reduce"), vec![4096, 8192, 16384], "{stdout}");
    assert_eq!(rows_of("broadcast"), vec![4096, 8192, 16384], "{stdout}");
    assert_eq!(rows.len(), 6, "no memcpy rows: {stdout}");
    for r in &rows {
        assert_eq!(r["ranks"], 2);
        assert_eq!(r["transport"], "tcp");
        assert!(r["busbw_gbs"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bench_usage_errors() {
    for extra in [
        vec!["--num-nodes", "1"],
        vec!["--min-bytes", "1M", "--max-bytes", "4K"],
        vec!["--max-bytes", "12Q"],
        vec!["--rank", "2", "--num-nodes", "2"],
        vec!["--factor", "1"],
        vec!["--collectives", "reduce"],
        vec!["--max-bytes", "1000000G"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dtrain"))
            .arg("bench")
            .args(&extra)
            .output()
            .unwrap();
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{extra:?}: {stderr}");
    }
}

/// The launcher with real training: two ranks on tiny synthetic data and a tiny model finish
/// and end with the same parameters.
#[test]
fn launch_trains_two_ranks_end_to_end() {
    let out = Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .args(["launch", "--nproc-per-node", "2", "--grace-secs", "2"])
        .args([
            "--dataset",
            "synthetic",
            "--synthetic-train",
            "256",
            "--synthetic-test",
            "64",
        ])
        .args([
            "--model",
            "8,M",
            "--batch-size",
            "16",
            "--max-iters",
            "3",
            "--threads",
            "1",
        ])
        .args([
            "--mode",
            "allreduce",
            "--transport",
            "tcp",
            "--no-progress",
            "--timeout",
            "60",
        ])
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for rank in 0..2 {
        let prefix = format!("[rank {rank}] ");
        assert!(
            stdout.lines().any(|l| l.starts_with(&prefix)),
            "no output from rank {rank}:\n{stdout}"
        );
    }
    // Both ranks report the same parameter digest (the trainer prints one at the end).
    let hashes: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.split("Parameter hash: ").nth(1))
        .collect();
    assert_eq!(hashes.len(), 2, "{stdout}");
    assert_eq!(hashes[0], hashes[1], "{stdout}");
    assert_children_gone(&stderr, 2);
}

/// A launcher killed with SIGKILL cannot forward anything: its ranks still die (parent-death
/// signal) instead of being orphaned.
#[test]
fn ranks_die_with_a_killed_launcher() {
    use std::io::{BufRead, BufReader};
    let mut child = spawn_launcher(2, &[], &[("DTRAIN_TEST_SLEEP_SECS", "60")]);
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while seen.matches(" is pid ").count() < 2 {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The ranks are no longer our children: poll /proc until they are gone (bounded).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let alive: Vec<&str> = seen
            .lines()
            .filter_map(|l| l.split(" is pid ").nth(1))
            .filter(|pid| {
                let cmdline =
                    std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
                let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
                    .unwrap_or_default();
                // A zombie (state Z) waiting for its new parent to reap it has exited.
                String::from_utf8_lossy(&cmdline).contains("launcher-test-child")
                    && !stat.contains(") Z ")
            })
            .collect();
        if alive.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ranks {alive:?} outlived the launcher"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `(attempt, port)` of every start of `rank`, from its `rank k attempt a port p` lines.
fn starts_of(stdout: &str, rank: usize) -> Vec<(u32, u16)> {
    let prefix = format!("[rank {rank}] rank {rank} attempt ");
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .map(|rest| {
            let (attempt, port) = rest.split_once(" port ").expect("attempt line");
            (attempt.parse().unwrap(), port.parse().unwrap())
        })
        .collect()
}

#[test]
fn a_rank_failing_once_is_restarted_with_all_others_on_a_fresh_port() {
    let ready = temp_dir("restart-once");
    let (out, _) = launch(
        3,
        &[
            ("DTRAIN_TEST_FAIL_RANK", "1"),
            ("DTRAIN_TEST_FAIL_ATTEMPTS", "1"),
            ("DTRAIN_TEST_READY_DIR", ready.0.to_str().unwrap()),
        ],
        &["--max-restarts", "2"],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let first = starts_of(&stdout, 0);
    assert_eq!(first.len(), 2, "{stdout}");
    for rank in 0..3 {
        // Every rank ran twice, told its attempt, on the same fresh port as the others.
        let starts = starts_of(&stdout, rank);
        assert_eq!(starts, first, "rank {rank}");
        assert_eq!((starts[0].0, starts[1].0), (0, 1));
        assert!(stdout.contains(&format!("[rank {rank}] rank {rank} done")));
    }
    assert_ne!(first[0].1, first[1].1, "the restart reused the port");
    assert!(
        stderr.contains(
            "restarting all ranks in 1s (restart 1 of 2) after rank 1 failed with exit status 3"
        ),
        "{stderr}"
    );
    assert!(
        stderr.contains("restart 1 of 2: starting 3 ranks"),
        "{stderr}"
    );
    assert!(!stderr.contains("restart 2 of 2"), "{stderr}");
    assert_children_gone(&stderr, 6);
}

#[test]
fn a_rank_that_always_fails_ends_the_job_after_max_restarts() {
    let ready = temp_dir("restart-never");
    let (out, elapsed) = launch(
        3,
        &[
            ("DTRAIN_TEST_FAIL_RANK", "2"),
            ("DTRAIN_TEST_EXIT_CODE", "7"),
            ("DTRAIN_TEST_SLEEP_SECS", "60"),
            ("DTRAIN_TEST_READY_DIR", ready.0.to_str().unwrap()),
        ],
        &["--max-restarts", "2"],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(7), "{stderr}");
    // Exactly 1 + 2 attempts, each stopping the sleepers, then the last failure.
    assert_eq!(stderr.matches("starting 3 ranks").count(), 3, "{stderr}");
    assert_eq!(
        stderr.matches("[rank 2] rank 2 failing on purpose").count(),
        3,
        "{stderr}"
    );
    assert!(stderr.contains("giving up after 2 restarts"), "{stderr}");
    assert!(
        stderr
            .lines()
            .last()
            .is_some_and(|l| l == "dtrain launch: error: rank 2 failed with exit status 7"),
        "{stderr}"
    );
    // The backoff (1 s, then 2 s) spaced the attempts: no restart storm.
    assert!(elapsed >= Duration::from_secs(3), "took only {elapsed:?}");
    assert!(elapsed < Duration::from_secs(60), "took {elapsed:?}");
    assert!(!text(&out.stdout).contains("done"));
    assert_children_gone(&stderr, 9);
}

#[test]
fn sigterm_while_restarting_stops_the_launcher() {
    use std::io::{BufRead, BufReader};
    let mut child = spawn_launcher(
        2,
        &["--max-restarts", "5"],
        &[("DTRAIN_TEST_FAIL_RANK", "0")],
    );
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("restarting all ranks") {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap() == 0 {
            break;
        }
        seen.push_str(&line);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    seen.push_str(&rest);
    // Stopped during the backoff, or (if the restart had begun) with the signal forwarded.
    assert_eq!(status.code(), Some(128 + 15), "{seen}");
    assert!(seen.contains("stopped by SIGTERM"), "{seen}");
    assert!(seen.matches("starting 2 ranks").count() <= 2, "{seen}");
    let starts = seen.matches(" is pid ").count();
    assert_children_gone(&seen, starts);
}
