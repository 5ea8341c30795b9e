//! End-to-end tests of `dtrain` as real processes: every sync mode with 2 and 3 ranks (as
//! separate `--rank` processes and through `dtrain launch`), agreement between modes,
//! learning, checkpoint + resume, a killed rank, and user errors.
//!
//! All runs use synthetic data and a small `--model` so the suite stays quick on 2 cores.
//! Every child is killed and reaped by [`Ranks`]'s `Drop`, even when an assertion fails.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn two_ranks_every_mode_agrees_and_keeps_parameters_identical() {
    let mut per_mode = Vec::new();
    for mode in ["gather-scatter", "allreduce", "ddp"] {
        let outs = run_ranks(2, mode, &["--max-iters", "6", "--transport", "tcp"]);
        assert_ok(&outs);
        let h0 = hashes(&outs[0].stdout);
        let h1 = hashes(&outs[1].stdout);
        assert_eq!(
            h0.len(),
            1,
            "{mode}: rank 0 prints one hash:\n{}",
            outs[0].stdout
        );
        assert_eq!(h0, h1, "{mode}: ranks ended with different parameters");
        // Rank 0 alone prints the evaluation.
        assert!(
            outs[0].stdout.contains("Test set: Average loss: "),
            "{mode}"
        );
        assert!(!outs[1].stdout.contains("Test set:"), "{mode}");
        assert!(
            outs[0].stdout.contains("Average time for 5 iterations: "),
            "{mode}"
        );
        // The exposed communication is a share of the step, between 0 and 100 %.
        let share = outs[0]
            .stdout
            .lines()
            .find_map(|l| l.strip_prefix("Average exposed communication: "))
            .and_then(|l| l.split(" per iteration (").nth(1))
            .and_then(|p| p.strip_suffix("% of the step)"))
            .and_then(|p| p.parse::<f64>().ok());
        assert!(
            share.is_some_and(|p| (0.0..=100.0).contains(&p)),
            "{mode}: {share:?}\n{}",
            outs[0].stdout
        );
        per_mode.push((mode, losses(&outs[0].stdout), losses(&outs[1].stdout), h0));
    }
    let (_, ref l0, ref l1, _) = per_mode[0];
    assert_eq!(l0.len(), 6);
    // The two ranks train on different shards: their losses differ.
    assert_ne!(l0, l1);
    for (mode, m0, m1, _) in &per_mode[1..] {
        assert_losses_close(l0, m0, &format!("{mode} vs gather-scatter, rank 0"));
        assert_losses_close(l1, m1, &format!("{mode} vs gather-scatter, rank 1"));
    }
}

#[test]
fn three_ranks_every_mode_through_launch() {
    let mut per_mode: Vec<(String, Vec<(usize, f64)>)> = Vec::new();
    for mode in ["gather-scatter", "allreduce", "ddp"] {
        let port = free_port().to_string();
        let mut args = strings(&["launch", "--nproc-per-node", "3"]);
        args.extend(strings(SMALL));
        args.extend(strings(&[
            "--mode",
            mode,
            "--master-port",
            &port,
            "--max-iters",
            "4",
        ]));
        let out = run_single(&args);
        assert_ok(std::slice::from_ref(&out));
        let h = hashes(&out.stdout);
        assert_eq!(h.len(), 3, "{mode}: one hash per rank:\n{}", out.stdout);
        assert!(h.iter().all(|x| *x == h[0]), "{mode}: ranks differ: {h:?}");
        // Launch interleaves ranks' lines: compare the sorted set of losses.
        let mut l = losses(&out.stdout);
        assert_eq!(
            l.len(),
            12,
            "{mode}: 4 loss lines per rank:\n{}",
            out.stdout
        );
        l.sort_by(|a, b| a.partial_cmp(b).expect("finite losses"));
        per_mode.push((mode.to_string(), l));
    }
    for (mode, l) in &per_mode[1..] {
        assert_losses_close(
            &per_mode[0].1,
            l,
            &format!("{mode} vs gather-scatter, 3 ranks"),
        );
    }
}

/// `--conv-algo` changes what every layer runs (and so the bits, not the learning), and
/// `--verbose` names the algorithm of each layer and pass.
#[test]
fn conv_algo_is_forced_and_verbose_names_it() {
    let run = |algo: &str| {
        let mut args = strings(SMALL);
        args.extend(strings(&[
            "--mode",
            "single",
            "--max-iters",
            "4",
            "--verbose",
            "--conv-algo",
            algo,
        ]));
        let out = run_single(&args);
        assert_ok(std::slice::from_ref(&out));
        out
    };
    let plan = |out: &Outcome| -> Vec<String> {
        out.stderr
            .lines()
            .filter(|l| l.contains(": fwd "))
            .map(|l| l.split(": fwd ").nth(1).unwrap_or_default().to_string())
            .collect()
    };
    let auto = run("auto");
    let forced = run("winograd");
    assert!(
        auto.stderr.contains("conv algorithm auto"),
        "{}",
        auto.stderr
    );
    // 3->8 at 32x32 has K = 27: direct; 8->16 has too few channels for Winograd: im2col.
    assert_eq!(
        plan(&auto),
        [
            "direct, bwd-data direct, bwd-weight direct",
            "im2col, bwd-data im2col, bwd-weight im2col"
        ],
        "{}",
        auto.stderr
    );
    assert_eq!(
        plan(&forced),
        ["winograd-f4, bwd-data winograd-f4, bwd-weight winograd-f4"; 2],
        "{}",
        forced.stderr
    );
    assert_ne!(hashes(&auto.stdout), hashes(&forced.stdout));
    assert_losses_close(
        &losses(&auto.stdout),
        &losses(&forced.stdout),
        "auto vs winograd",
    );
}

#[test]
fn loss_decreases_on_synthetic_data() {
    let dir = temp_dir("learn");
    let metrics = dir.join("m.jsonl");
    let mut args = strings(SMALL);
    args.extend(strings(&[
        "--mode",
        "single",
        "--max-iters",
        "40",
        "--epochs",
        "3",
    ]));
    args.extend(strings(&[
        "--metrics",
        metrics.to_str().expect("utf-8 path"),
    ]));
    let out = run_single(&args);
    assert_ok(std::slice::from_ref(&out));
    let l: Vec<f64> = losses(&out.stdout).into_iter().map(|(_, v)| v).collect();
    assert_eq!(l.len(), 40);
    let first: f64 = l[..10].iter().sum::<f64>() / 10.0;
    let last: f64 = l[30..].iter().sum::<f64>() / 10.0;
    assert!(
        last < 0.8 * first,
        "loss did not decrease: first 10 {first}, last 10 {last}"
    );
    // The metrics file has one line per iteration and one per evaluation.
    let text = std::fs::read_to_string(&metrics).expect("metrics file");
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).expect("metrics line is JSON");
        // Evaluation lines carry the iteration too; they are the ones with a test accuracy.
        let keys: &[&str] = if v.get("test_accuracy").is_none() {
            &[
                "epoch",
                "batch",
                "loss",
                "seconds",
                "images_per_s",
                "comm_seconds",
                "cpu_seconds",
            ]
        } else {
            &["iteration", "epoch", "test_loss", "test_accuracy"]
        };
        for k in keys {
            assert!(v[*k].is_number(), "{k} missing or not a number in {line}");
        }
    }
    let iters = text.lines().filter(|l| l.contains("\"loss\":")).count();
    let evals = text
        .lines()
        .filter(|l| l.contains("\"test_accuracy\":"))
        .count();
    assert_eq!(iters, 40);
    // 320 images / 16 = 20 batches per epoch: evaluations after epochs 0 and 1.
    assert_eq!(evals, 2, "{text}");
}

#[test]
fn resume_continues_exactly_like_an_uninterrupted_run() {
    let dir = temp_dir("resume");
    let ckpt = dir.join("run.safetensors");
    let ckpt_s = ckpt.to_str().expect("utf-8 path").to_string();
    // 320 images / 2 ranks / 16 = 10 batches per epoch: 14 iterations cross an epoch.
    let straight = run_ranks(2, "ddp", &["--max-iters", "14", "--epochs", "2"]);
    assert_ok(&straight);
    let first = run_ranks(
        2,
        "ddp",
        &[
            "--max-iters",
            "6",
            "--epochs",
            "2",
            "--save-checkpoint",
            &ckpt_s,
        ],
    );
    assert_ok(&first);
    assert!(ckpt.exists());
    let resumed = run_ranks(
        2,
        "ddp",
        &["--max-iters", "14", "--epochs", "2", "--resume", &ckpt_s],
    );
    assert_ok(&resumed);
    for r in 0..2 {
        let all = losses(&straight[r].stdout);
        let mut joined = losses(&first[r].stdout);
        joined.extend(losses(&resumed[r].stdout));
        assert_eq!(all.len(), 14);
        // Bit-identical continuation: the printed losses are equal as text.
        assert_eq!(all, joined, "rank {r}: resumed losses differ");
        assert_eq!(
            hashes(&straight[r].stdout),
            hashes(&resumed[r].stdout),
            "rank {r}"
        );
    }
    // Resuming another model is refused with a clear message.
    let mut args = strings(SMALL);
    set_flag(&mut args, "--model", "8,M");
    args.extend(strings(&["--mode", "single", "--resume", &ckpt_s]));
    let out = run_single(&args);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr.contains("saved for --model \"8,M,16,M\""),
        "{}",
        out.stderr
    );
}

#[test]
fn init_checkpoint_loads_weights_and_starts_fresh() {
    let dir = temp_dir("init");
    let ckpt = dir.join("weights.safetensors");
    let ckpt_s = ckpt.to_str().expect("utf-8 path").to_string();
    let mut args = strings(SMALL);
    args.extend(strings(&[
        "--mode",
        "single",
        "--max-iters",
        "3",
        "--save-checkpoint",
        &ckpt_s,
    ]));
    let trained = run_single(&args);
    assert_ok(std::slice::from_ref(&trained));
    // With lr 0 the parameters stay exactly as loaded, and training starts at batch 0.
    let mut args = strings(SMALL);
    set_flag(&mut args, "--lr", "0");
    args.extend(strings(&["--mode", "single", "--max-iters", "2"]));
    args.extend(strings(&["--seed", "5", "--init-checkpoint", &ckpt_s]));
    let init = run_single(&args);
    assert_ok(std::slice::from_ref(&init));
    assert_eq!(hashes(&init.stdout), hashes(&trained.stdout));
    assert_eq!(losses(&init.stdout)[0].0, 0);
    // The same run without the checkpoint starts elsewhere.
    let fresh = run_single(&args[..args.len() - 2]);
    assert_ok(std::slice::from_ref(&fresh));
    assert_ne!(hashes(&fresh.stdout), hashes(&trained.stdout));
}

/// The width/8 VGG11 state_dict that PyTorch wrote with `safetensors.torch.save_file`
/// (engine/tests/fixtures/make_reference.py) loads through `--init-checkpoint`.
#[test]
fn init_checkpoint_loads_a_pytorch_state_dict() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../engine/tests/fixtures/w8_init.safetensors"
    );
    let w8 = "8,M,16,M,32,32,M,64,64,M,64,64,M";
    let run = |seed: &str, model: &str| {
        let mut args = strings(SMALL);
        set_flag(&mut args, "--model", model);
        set_flag(&mut args, "--lr", "0");
        args.extend(strings(&[
            "--mode",
            "single",
            "--max-iters",
            "2",
            "--seed",
            seed,
        ]));
        args.extend(strings(&["--init-checkpoint", fixture]));
        run_single(&args)
    };
    // The weights come from the file, not from the seed.
    let a = run("1", w8);
    let b = run("2", w8);
    assert_ok(std::slice::from_ref(&a));
    assert_ok(std::slice::from_ref(&b));
    // PyTorch's file has no dtrain checksums: it loads, with one line saying so.
    let unverified = format!("dtrain: warning: {fixture} has no checksums");
    assert_eq!(a.stderr.matches(&unverified).count(), 1, "{}", a.stderr);
    // (lr 0: the final parameters are the loaded ones; the seed still changes the data order.)
    assert_eq!(hashes(&a.stdout), hashes(&b.stdout));
    let mut args = strings(SMALL);
    set_flag(&mut args, "--model", w8);
    set_flag(&mut args, "--lr", "0");
    args.extend(strings(&[
        "--mode",
        "single",
        "--max-iters",
        "2",
        "--seed",
        "1",
    ]));
    let fresh = run_single(&args);
    assert_ok(std::slice::from_ref(&fresh));
    assert_ne!(hashes(&fresh.stdout), hashes(&a.stdout));
    // A model that does not match the file is refused, naming the tensor and both shapes.
    let wrong = run("1", "8,M,16,M");
    assert_eq!(wrong.status.code(), Some(2), "{}", wrong.stderr);
    assert!(
        wrong.stderr.contains("fc1.weight") && wrong.stderr.contains("[10, 64]"),
        "{}",
        wrong.stderr
    );
}

#[test]
fn a_killed_rank_makes_the_others_exit_naming_it() {
    let port = free_port().to_string();
    let world = 3;
    let mut ranks = Ranks {
        children: Vec::new(),
    };
    for r in 0..world {
        let mut args = strings(SMALL);
        args.extend(strings(&[
            "--mode",
            "ddp",
            "--master-port",
            &port,
            "--epochs",
            "1000",
        ]));
        args.extend(strings(&["--transport", "tcp", "--timeout", "60"]));
        args.extend(strings(&["--num-nodes", "3", "--rank", &r.to_string()]));
        ranks.children.push(spawn(&args));
    }
    // Wait until rank 1 is training (its first loss line), then kill -9 it.
    let stdout = ranks.children[1].stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.starts_with("Training Iteration: ") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("rank 1 never started training");
    ranks.children[1].kill().expect("kill -9 rank 1");
    let _ = ranks.children[1].wait();
    let killed_at = Instant::now();
    for r in [0, 2] {
        let c = &mut ranks.children[r];
        let status = loop {
            if let Some(s) = c.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                killed_at.elapsed() < Duration::from_secs(45),
                "rank {r} still running 45 s after rank 1 was killed"
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(!status.success(), "rank {r} exited successfully");
        let mut err = String::new();
        if let Some(mut e) = c.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut err);
        }
        assert!(
            err.contains("rank 1"),
            "rank {r} does not name rank 1:\n{err}"
        );
    }
}

#[test]
fn user_errors_are_reported_clearly() {
    // An unknown mode: usage error, exit 2, one line.
    let out = run_single(&strings(&["--mode", "bogus"]));
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("bogus"), "{}", out.stderr);

    // A bad model spec.
    let out = run_single(&strings(&["--model", "8,X", "--dataset", "synthetic"]));
    assert_ne!(out.status.code(), Some(0));
    assert!(out.stderr.contains("--model"), "{}", out.stderr);

    // CIFAR-10 missing and the download server unreachable (a closed local port).
    let dir = temp_dir("nodata");
    let url = format!("http://127.0.0.1:{}/cifar-10-binary.tar.gz", free_port());
    let out = run_single(&strings(&[
        "--mode",
        "single",
        "--dataset",
        "cifar10",
        "--data-dir",
        dir.to_str().expect("utf-8 path"),
        "--download-url",
        &url,
    ]));
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("CIFAR-10 not found"), "{}", out.stderr);
    assert!(!out.stdout.contains("Training Iteration"));

    // An unreadable checkpoint.
    let bogus = dir.join("bogus.safetensors");
    std::fs::write(&bogus, b"garbage").expect("write");
    let mut args = strings(SMALL);
    args.extend(strings(&[
        "--mode",
        "single",
        "--resume",
        bogus.to_str().expect("utf-8"),
    ]));
    let out = run_single(&args);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("bogus.safetensors"), "{}", out.stderr);
}

/// Keep the helper honest: `unprefixed` and `losses` read both plain and launcher lines.
#[test]
fn log_parsing_helpers() {
    let text = "[rank 2] Training Iteration: 3 [48/320 (30%)]\tLoss: 2.500000\nTraining Iteration: 0 [0/320 (0%)]\tLoss: 1.250000\n";
    assert_eq!(losses(text), vec![(3, 2.5), (0, 1.25)]);
    assert_eq!(
        hashes("[rank 0] Parameter hash: 0xab\n"),
        vec!["0xab".to_string()]
    );
    assert!(Path::new(BIN).exists());
}
