//! Faults and restarts, as real processes: a rank killed with `kill -9` at a random
//! iteration makes `dtrain launch --max-restarts` restart the job, which resumes from the
//! last periodic checkpoint and ends with the parameters of an uninterrupted run (2 and 3
//! ranks, every synced mode, shared memory and TCP); a rank that fails every attempt ends
//! the job after N restarts; a crash in the middle of a checkpoint write and a checkpoint
//! write that fails (file size limit) both leave the previous checkpoint loadable; and
//! requests no machine can hold are refused with a usage error.
//!
//! Every child is reaped ([`Ranks`]'s `Drop`), ports are free ones, folders are temporary.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

/// splitmix64: the random kill point. Its seed is printed with every failure.
struct Rng(u64);

impl Rng {
    fn from_clock() -> Rng {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        Rng(nanos ^ (std::process::id() as u64) << 32)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n.max(1)
    }
}

/// `dtrain launch` of `world` ranks on the small problem, crossing an epoch boundary.
fn launch_args(world: usize, mode: &str, transport: &str, iters: usize) -> Vec<String> {
    let mut args = strings(&["launch", "--nproc-per-node", &world.to_string()]);
    args.extend(strings(&["--grace-secs", "2"]));
    args.extend(strings(SMALL));
    args.extend(strings(&["--mode", mode, "--transport", transport]));
    args.extend(strings(&[
        "--epochs",
        "2",
        "--max-iters",
        &iters.to_string(),
    ]));
    args.extend(strings(&["--timeout", "60"]));
    args
}

/// The pid `dtrain launch` reported for `rank` first.
fn pid_of(launcher_stderr: &str, rank: usize) -> Option<i32> {
    let prefix = format!("dtrain launch: rank {rank} is pid ");
    launcher_stderr
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Run `args` (a `dtrain launch` with checkpoints to `ckpt`), and once `ckpt` exists (the
/// first periodic checkpoint) kill -9 a random rank after a random number of its further
/// iterations. Returns the launcher's outcome and what was killed when.
fn run_with_a_kill(
    args: &[String],
    world: usize,
    iters: usize,
    ckpt: &Path,
    rng: &mut Rng,
) -> (Outcome, String) {
    let mut ranks = Ranks {
        children: vec![spawn(args)],
    };
    let launcher = &mut ranks.children[0];
    let (tx, rx) = mpsc::channel::<(bool, String)>();
    for (is_err, pipe) in [
        (
            false,
            Box::new(launcher.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
        ),
        (true, Box::new(launcher.stderr.take().expect("stderr"))),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send((is_err, line));
            }
        });
    }
    drop(tx);
    let victim = rng.below(world as u64) as usize;
    let victim_line = format!("[rank {victim}] Training Iteration: ");
    let (mut stdout, mut stderr) = (String::new(), String::new());
    let (mut done_iters, mut target, mut killed) = (0usize, None, None::<String>);
    let start = Instant::now();
    loop {
        assert!(
            start.elapsed() < RUN_DEADLINE,
            "still running:\n{stdout}\n{stderr}"
        );
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok((is_err, line)) => {
                if !is_err && killed.is_none() && line.starts_with(&victim_line) {
                    done_iters += 1;
                }
                let out = if is_err { &mut stderr } else { &mut stdout };
                out.push_str(&line);
                out.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if killed.is_some() {
            continue;
        }
        if target.is_none() && ckpt.exists() {
            // Leave the victim at least one iteration to do after the kill.
            let room = (iters - 1).saturating_sub(done_iters + 1) as u64;
            assert!(
                room > 0,
                "checkpoint too late to kill (at {done_iters}):\n{stdout}"
            );
            target = Some(done_iters + 1 + rng.below(room + 1) as usize);
        }
        if target.is_some_and(|t| done_iters >= t) {
            let pid = pid_of(&stderr, victim).expect("the launcher printed the victim's pid");
            nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .expect("kill -9 the victim");
            killed = Some(format!(
                "rank {victim} (pid {pid}) after its iteration {done_iters}"
            ));
        }
    }
    let status = ranks.children[0].wait().expect("wait for the launcher");
    let what = killed.unwrap_or_else(|| panic!("nobody was killed:\n{stdout}\n{stderr}"));
    (
        Outcome {
            status,
            stdout,
            stderr,
        },
        what,
    )
}

/// For every synced mode: the uninterrupted run's final parameter hash, then a run whose
/// random rank is killed at a random iteration after the first periodic checkpoint: it must
/// end with exit 0 and that same hash on every rank.
fn killed_rank_restarts_and_ends_bit_identical(world: usize, transport: &str) {
    // 320 images: 10 batches per epoch on 2 ranks, 7 on 3; the runs cross into epoch 1.
    let iters = if world == 2 { 14 } else { 11 };
    let mut rng = Rng::from_clock();
    let seed = rng.0;
    for mode in ["gather-scatter", "allreduce", "ddp"] {
        let what = format!("{world} ranks, {mode}, {transport}, seed {seed:#x}");
        let reference = run_single(&launch_args(world, mode, transport, iters));
        assert_ok(std::slice::from_ref(&reference));
        let expected = hashes(&reference.stdout);
        assert_eq!(expected.len(), world, "{what}: {}", reference.stdout);
        assert!(expected.iter().all(|h| *h == expected[0]), "{what}");

        let dir = temp_dir("kill");
        let ckpt = dir.join("run.safetensors");
        let mut args = launch_args(world, mode, transport, iters);
        args.extend(strings(&["--max-restarts", "2", "--checkpoint-every", "3"]));
        args.extend(strings(&[
            "--save-checkpoint",
            ckpt.to_str().expect("utf-8"),
        ]));
        let (out, killed) = run_with_a_kill(&args, world, iters, &ckpt, &mut rng);
        let what = format!("{what}, killed {killed}");
        assert!(
            out.status.success(),
            "{what}: launcher {}\n{}\n{}",
            out.status,
            out.stdout,
            out.stderr
        );
        assert_eq!(hashes(&out.stdout), expected, "{what}:\n{}", out.stderr);
        assert!(
            out.stderr.contains("restart 1 of 2: starting"),
            "{what}:\n{}",
            out.stderr
        );
        // Every rank of the restarted job says where it resumed.
        for rank in 0..world {
            let said = format!("[rank {rank}] dtrain: restart 1: resuming from ");
            assert!(
                out.stderr.contains(&said),
                "{what}: rank {rank}:\n{}",
                out.stderr
            );
        }
    }
}

#[test]
fn two_ranks_shm_survive_a_kill() {
    killed_rank_restarts_and_ends_bit_identical(2, "shm");
}

#[test]
fn two_ranks_tcp_survive_a_kill() {
    killed_rank_restarts_and_ends_bit_identical(2, "tcp");
}

#[test]
fn three_ranks_shm_survive_a_kill() {
    killed_rank_restarts_and_ends_bit_identical(3, "shm");
}

#[test]
fn three_ranks_tcp_survive_a_kill() {
    killed_rank_restarts_and_ends_bit_identical(3, "tcp");
}

/// A run with a schedule (onecycle cycling momentum too, with Nesterov; cosine after a
/// fractional warmup, with label smoothing), mid-epoch evaluations and --save-best, killed at
/// a random iteration after its first checkpoint: it ends with the uninterrupted run's
/// parameters and its best checkpoint evaluates the same. The schedule position is the
/// checkpoint's iteration count, so a restart that lost it would continue with other rates.
#[test]
fn a_scheduled_run_restarts_bit_identical() {
    let (world, iters) = (2, 14);
    let mut rng = Rng::from_clock();
    let seed = rng.0;
    let recipes: [(&str, &[&str]); 2] = [
        (
            "ddp",
            &[
                "--lr-schedule",
                "onecycle",
                "--nesterov",
                "--momentum",
                "0.95",
            ],
        ),
        (
            "gather-scatter",
            &[
                "--lr-schedule",
                "cosine",
                "--warmup-epochs",
                "0.5",
                "--label-smoothing",
                "0.1",
            ],
        ),
    ];
    for (mode, recipe) in recipes {
        let what = format!("{mode} {recipe:?}, seed {seed:#x}");
        let with_recipe = |dir: &Path| {
            let mut args = launch_args(world, mode, "shm", iters);
            args.extend(strings(recipe));
            let best = dir.join("best.safetensors");
            args.extend(strings(&[
                "--eval-every",
                "4",
                "--save-best",
                best.to_str().expect("utf-8"),
            ]));
            (args, best)
        };
        let ref_dir = temp_dir("sched-ref");
        let (args, ref_best) = with_recipe(&ref_dir.0);
        let reference = run_single(&args);
        assert_ok(std::slice::from_ref(&reference));
        let expected = hashes(&reference.stdout);
        assert_eq!(expected.len(), world, "{what}: {}", reference.stdout);

        let dir = temp_dir("sched-kill");
        let ckpt = dir.join("run.safetensors");
        let (mut args, best) = with_recipe(&dir.0);
        args.extend(strings(&["--max-restarts", "2", "--checkpoint-every", "3"]));
        args.extend(strings(&[
            "--save-checkpoint",
            ckpt.to_str().expect("utf-8"),
        ]));
        let (out, killed) = run_with_a_kill(&args, world, iters, &ckpt, &mut rng);
        let what = format!("{what}, killed {killed}");
        assert!(
            out.status.success(),
            "{what}: {}\n{}\n{}",
            out.status,
            out.stdout,
            out.stderr
        );
        assert!(
            out.stderr.contains("restart 1 of 2: starting"),
            "{what}:\n{}",
            out.stderr
        );
        assert_eq!(hashes(&out.stdout), expected, "{what}:\n{}", out.stderr);
        let evaluate = |file: &Path| {
            let mut args = strings(&["eval", "--checkpoint", file.to_str().expect("utf-8")]);
            args.extend(strings(SMALL));
            let o = run_single(&args);
            assert_ok(std::slice::from_ref(&o));
            o.stdout
        };
        let want = evaluate(&ref_best);
        assert!(want.starts_with("Test set: Average loss: "), "{want}");
        assert_eq!(evaluate(&best), want, "{what}: the best checkpoints differ");
    }
}

/// A corrupt --save-checkpoint file with --resume auto: rank 0 (which alone reads
/// checkpoints) fails the same way in every attempt; the launcher gives up after N restarts
/// with rank 0's error, spacing attempts by its backoff.
#[test]
fn a_deterministic_failure_gives_up_after_max_restarts() {
    let dir = temp_dir("corrupt");
    let ckpt = dir.join("run.safetensors");
    std::fs::write(&ckpt, b"not a checkpoint at all").expect("write");
    let mut args = launch_args(2, "ddp", "auto", 4);
    args.extend(strings(&["--max-restarts", "2", "--resume", "auto"]));
    args.extend(strings(&[
        "--save-checkpoint",
        ckpt.to_str().expect("utf-8"),
    ]));
    let started = Instant::now();
    let out = run_single(&args);
    let elapsed = started.elapsed();
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    let error = format!(
        "[rank 0] dtrain: error: no checkpoint to resume from is intact: checkpoint {} is \
         damaged and was not loaded: the file is truncated or its header length is damaged",
        ckpt.display()
    );
    assert_eq!(out.stderr.matches(&error).count(), 3, "{}", out.stderr);
    assert_eq!(out.stderr.matches("starting 2 ranks").count(), 3);
    assert!(
        out.stderr.contains("giving up after 2 restarts"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr
            .trim_end()
            .ends_with("dtrain launch: error: rank 0 failed with exit status 2"),
        "{}",
        out.stderr
    );
    assert!(elapsed >= Duration::from_secs(3), "no backoff: {elapsed:?}");
    assert!(!out.stdout.contains("Training Iteration"), "{}", out.stdout);
    // The corrupt file was never replaced by a run that did not train.
    assert_eq!(
        std::fs::read(&ckpt).expect("read"),
        b"not a checkpoint at all"
    );
}

/// `(epoch, batch, iteration)` from a `resuming from … at epoch E, batch B (iteration I)` line.
fn resumed_at(stderr: &str) -> Option<(usize, usize, usize)> {
    let line = stderr.lines().find(|l| l.contains("resuming from "))?;
    let nums: Vec<usize> = line
        .rsplit(" at epoch ")
        .next()?
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|t| t.parse().ok())
        .collect();
    match nums[..] {
        [e, b, i] => Some((e, b, i)),
        _ => None,
    }
}

/// A single process writing a large checkpoint every iteration is killed while a write is
/// under way (its temporary file exists): the previous checkpoint still loads and resumes,
/// and the next run removes the dead writer's temporary file.
#[test]
fn a_crash_during_a_checkpoint_write_leaves_the_previous_one_loadable() {
    let dir = temp_dir("crash-write");
    let ckpt = dir.join("big.safetensors");
    let ckpt_s = ckpt.to_str().expect("utf-8").to_string();
    // ~9.4 M parameters at 4x4 (75 MB with momentum): seconds to write, cheap to train.
    let mut args = strings(SMALL);
    set_flag(&mut args, "--model", "M,M,M,1024,1024");
    set_flag(&mut args, "--batch-size", "2");
    args.extend(strings(&["--mode", "single", "--max-iters", "1000"]));
    args.extend(strings(&[
        "--checkpoint-every",
        "1",
        "--save-checkpoint",
        &ckpt_s,
    ]));
    let mut rng = Rng::from_clock();
    let mut attempts = 0;
    let tmp = loop {
        attempts += 1;
        assert!(attempts <= 5, "never caught a write in progress");
        let _ = std::fs::remove_file(&ckpt);
        let mut ranks = Ranks {
            children: vec![spawn(&args)],
        };
        let pid = ranks.children[0].id();
        // The file being written: with the default --keep-checkpoints 2 the new checkpoint is
        // staged as big.safetensors.tmp.<pid>, itself written as <that>.tmp.<pid>.
        let tmp = dir.join(format!("big.safetensors.tmp.{pid}.tmp.{pid}"));
        // Wait for a complete checkpoint, then for the next write to begin.
        let deadline = Instant::now() + Duration::from_secs(120);
        while !(ckpt.exists() && tmp.exists()) {
            assert!(Instant::now() < deadline, "no checkpoint write seen");
            assert!(
                ranks.children[0].try_wait().expect("try_wait").is_none(),
                "the trainer exited early"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(rng.below(20)));
        ranks.children[0].kill().expect("kill -9");
        ranks.children[0].wait().expect("reap");
        if tmp.exists() {
            break tmp; // killed mid-write
        }
    };
    // The previous checkpoint resumes: one more iteration, from where it stood.
    let mut resume = strings(SMALL);
    set_flag(&mut resume, "--model", "M,M,M,1024,1024");
    set_flag(&mut resume, "--batch-size", "2");
    resume.extend(strings(&["--mode", "single", "--resume", &ckpt_s]));
    resume.extend(strings(&["--save-checkpoint", &ckpt_s]));
    let probe = run_single(&[resume.clone(), strings(&["--max-iters", "1"])].concat());
    let (epoch, batch, iteration) = resumed_at(&probe.stderr).expect("a resume line");
    assert!(iteration >= 1, "{}", probe.stderr);
    let out = run_single(
        &[
            resume,
            strings(&["--max-iters", &(iteration + 1).to_string()]),
        ]
        .concat(),
    );
    assert_ok(std::slice::from_ref(&out));
    assert_eq!(resumed_at(&out.stderr), Some((epoch, batch, iteration)));
    assert_eq!(losses(&out.stdout).len(), 1, "{}", out.stdout);
    // The dead writer's temporary file was removed, and nothing else is left.
    assert!(!tmp.exists(), "{}", probe.stderr);
    assert!(probe
        .stderr
        .contains("left by an interrupted checkpoint write"));
    assert_eq!(file_names(&dir), ["big.safetensors", "big.safetensors.1"]);
}

/// Checkpoint writes that fail for real (the child's file size limit makes every write
/// fail with EFBIG, like a full disk): periodic ones warn and training goes on, the final
/// one is the run's error; the previous checkpoint is untouched and no temporary file stays.
#[test]
fn failed_checkpoint_writes_keep_the_previous_checkpoint() {
    let dir = temp_dir("efbig");
    let ckpt = dir.join("run.safetensors");
    let ckpt_s = ckpt.to_str().expect("utf-8").to_string();
    let mut first = strings(SMALL);
    first.extend(strings(&["--mode", "single", "--max-iters", "2"]));
    first.extend(strings(&["--save-checkpoint", &ckpt_s]));
    assert_ok(std::slice::from_ref(&run_single(&first)));
    let before = std::fs::read(&ckpt).expect("checkpoint");
    assert!(
        before.len() > 16 << 10,
        "checkpoint of {} bytes",
        before.len()
    );

    let mut args = strings(SMALL);
    args.extend(strings(&["--mode", "single", "--max-iters", "5"]));
    args.extend(strings(&[
        "--resume",
        &ckpt_s,
        "--save-checkpoint",
        &ckpt_s,
    ]));
    args.extend(strings(&["--checkpoint-every", "1"]));
    let mut cmd = Command::new(BIN);
    cmd.args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec; setrlimit and signal are
    // async-signal-safe system calls and nothing is allocated.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            use nix::sys::resource::{setrlimit, Resource};
            use nix::sys::signal::{signal, SigHandler, Signal};
            // Ignored, SIGXFSZ turns into EFBIG from write(2), as a full disk's ENOSPC.
            signal(Signal::SIGXFSZ, SigHandler::SigIgn).map_err(std::io::Error::from)?;
            setrlimit(Resource::RLIMIT_FSIZE, 16 << 10, 16 << 10).map_err(std::io::Error::from)
        });
    }
    let child = cmd.spawn().expect("spawn dtrain");
    let out = collect(&mut Ranks {
        children: vec![child],
    })
    .remove(0);
    assert_eq!(out.status.code(), Some(1), "{}\n{}", out.stdout, out.stderr);
    assert_eq!(
        losses(&out.stdout).len(),
        3,
        "training went on:\n{}",
        out.stdout
    );
    for it in [3, 4] {
        let warning = format!("dtrain: warning: the checkpoint of iteration {it} was not saved");
        assert!(out.stderr.contains(&warning), "{}", out.stderr);
    }
    assert!(out.stderr.contains("File too large"), "{}", out.stderr);
    let last = out.stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("dtrain: error: cannot save checkpoint: cannot write ")
            && last.contains("File too large"),
        "{}",
        out.stderr
    );
    assert!(!out.stdout.contains("Parameter hash"), "{}", out.stdout);
    assert_eq!(std::fs::read(&ckpt).expect("checkpoint"), before);
    assert_eq!(file_names(&dir), ["run.safetensors"]);
}

/// `--resume auto` started by hand, and a rank started (as torchrun does) with
/// `TORCHELASTIC_RESTART_COUNT` > 0: fresh when there is no checkpoint yet, resumed when
/// there is one — ending like the uninterrupted run.
#[test]
fn resume_auto_and_a_torchrun_restart_count() {
    let dir = temp_dir("auto");
    let ckpt = dir.join("run.safetensors");
    let ckpt_s = ckpt.to_str().expect("utf-8").to_string();
    let straight = run_ranks(2, "allreduce", &["--max-iters", "12", "--epochs", "2"]);
    assert_ok(&straight);
    let auto = [
        "--max-iters",
        "5",
        "--epochs",
        "2",
        "--resume",
        "auto",
        "--save-checkpoint",
        &ckpt_s,
    ];
    let first = run_ranks(2, "allreduce", &auto);
    assert_ok(&first);
    assert!(
        first[0].stderr.contains("no checkpoint at ")
            && first[0].stderr.contains("starting from the beginning"),
        "{}",
        first[0].stderr
    );
    // Attempt 1 of a torchrun job: the ranks resume from rank 0's checkpoint.
    let port = free_port().to_string();
    let mut ranks = Ranks {
        children: Vec::new(),
    };
    for r in 0..2 {
        let mut args = strings(SMALL);
        args.extend(strings(&[
            "--mode",
            "allreduce",
            "--max-iters",
            "12",
            "--epochs",
            "2",
        ]));
        args.extend(strings(&["--save-checkpoint", &ckpt_s]));
        let child = Command::new(BIN)
            .args(&args)
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", &port)
            .env("WORLD_SIZE", "2")
            .env("RANK", r.to_string())
            .env("TORCHELASTIC_RESTART_COUNT", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        ranks.children.push(child);
    }
    let resumed = collect(&mut ranks);
    assert_ok(&resumed);
    for r in 0..2 {
        assert_eq!(
            resumed_at(&resumed[r].stderr),
            Some((0, 5, 5)),
            "{}",
            resumed[r].stderr
        );
        assert!(resumed[r].stderr.contains("restart 1: resuming from "));
        let mut joined = losses(&first[r].stdout);
        joined.extend(losses(&resumed[r].stdout));
        assert_eq!(joined, losses(&straight[r].stdout), "rank {r}");
        assert_eq!(hashes(&resumed[r].stdout), hashes(&straight[r].stdout));
    }
}

/// Every flag that sizes memory: a request no machine can hold is one usage error (exit 2),
/// before any data is generated or any rank waits; bucket caps cannot over-allocate.
#[test]
fn impossible_memory_requests_are_usage_errors() {
    let cases: &[(&[&str], &str)] = &[
        (&["--model", "60000,60000,M"], "use a smaller --model"),
        (&["--model", "65537"], "conv width 65537 is above the limit"),
        (&["--threads", "100000"], "--threads must be in 1..=1024"),
        (
            &["--batch-size", "10000000", "--synthetic-train", "10000000"],
            "use a smaller --batch-size",
        ),
        (
            &["--synthetic-train", "18446744073709551615"],
            "use a smaller dataset",
        ),
        (
            &["--synthetic-test", "1000000000000"],
            "use a smaller dataset",
        ),
    ];
    for (flags, needle) in cases {
        for launch in [false, true] {
            let mut args = if launch {
                strings(&["launch", "--nproc-per-node", "2"])
            } else {
                Vec::new()
            };
            args.extend(strings(SMALL));
            for pair in flags.chunks(2) {
                if args.contains(&pair[0].to_string()) {
                    set_flag(&mut args, pair[0], pair[1]);
                } else {
                    args.extend(strings(pair));
                }
            }
            let out = run_single(&args);
            assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", out.stderr);
            assert_eq!(out.stderr.lines().count(), 1, "{flags:?}: {}", out.stderr);
            assert!(out.stderr.starts_with("dtrain: error: "), "{}", out.stderr);
            assert!(out.stderr.contains(needle), "{flags:?}: {}", out.stderr);
        }
    }
    // Launching N ranks needs N times one rank's memory: a size that fits once but not 1000
    // times is refused by the launcher.
    let mut args = strings(&["launch", "--nproc-per-node", "1000"]);
    args.extend(strings(SMALL));
    set_flag(&mut args, "--synthetic-train", "2000000");
    let out = run_single(&args);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("(1000 ranks, each with "),
        "{}",
        out.stderr
    );
    // Absurd bucket caps are harmless: buckets never exceed the parameters.
    for (first, cap) in [("1e300", "1e300"), ("1e-300", "1e-300")] {
        let outs = run_ranks(
            2,
            "ddp",
            &[
                "--max-iters",
                "2",
                "--first-bucket-mb",
                first,
                "--bucket-cap-mb",
                cap,
            ],
        );
        assert_ok(&outs);
        assert_eq!(hashes(&outs[0].stdout), hashes(&outs[1].stdout));
    }
}

/// A crafted checkpoint whose header claims sizes beyond the file is a clear error, not a
/// panic or an allocation abort.
#[test]
fn a_checkpoint_with_a_lying_header_is_a_clear_error() {
    let dir = temp_dir("lying");
    let path = dir.join("lie.safetensors");
    let header =
        r#"{"fc1.weight":{"dtype":"F32","shape":[1000000000000,1000000],"data_offsets":[0,16]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0; 16]);
    std::fs::write(&path, &bytes).expect("write");
    for flag in ["--resume", "--init-checkpoint"] {
        let mut args = strings(SMALL);
        args.extend(strings(&[
            "--mode",
            "single",
            flag,
            path.to_str().expect("utf-8"),
        ]));
        let out = run_single(&args);
        assert_eq!(out.status.code(), Some(2), "{flag}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("dtrain: error: ")
                && out.stderr.contains(
                    "lie.safetensors is damaged and was not loaded: not a valid safetensors file"
                ),
            "{flag}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    }
}
