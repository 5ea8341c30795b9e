//! `--precision bf16` end to end: every mode trains with rank-identical parameters, the bf16
//! numbers differ from f32's (the flag reaches the engine), they do not depend on the thread
//! count, checkpoints resume across precisions, bad values are refused.

mod common;
use common::*;

/// One rank's run of the SMALL problem (model 8,M,16,M: its 8->16 layer runs im2col, so
/// bf16 changes its GEMMs; the classifier too).
fn single(extra: &[&str]) -> Outcome {
    let mut args = strings(SMALL);
    args.extend(strings(&["--mode", "single", "--max-iters", "4"]));
    args.extend(strings(extra));
    run_single(&args)
}

#[test]
fn bf16_trains_in_every_mode_with_identical_ranks_and_other_bits_than_f32() {
    let f32_hash = {
        let out = single(&[]);
        assert_ok(std::slice::from_ref(&out));
        hashes(&out.stdout)
    };
    let bf16 = single(&["--precision", "bf16", "--verbose"]);
    assert_ok(std::slice::from_ref(&bf16));
    assert_ne!(hashes(&bf16.stdout), f32_hash, "bf16 computed the f32 bits");
    assert!(
        bf16.stderr.contains("precision bf16: GEMM kernel") && bf16.stderr.contains("[bf16]"),
        "--verbose names the bf16 kernel and the passes it runs:\n{}",
        bf16.stderr
    );
    for mode in ["gather-scatter", "allreduce", "ddp"] {
        let outs = run_ranks(2, mode, &["--max-iters", "4", "--precision", "bf16"]);
        assert_ok(&outs);
        let h: Vec<Vec<String>> = outs.iter().map(|o| hashes(&o.stdout)).collect();
        assert_eq!(h[0].len(), 1, "{mode}: {}", outs[0].stdout);
        assert_eq!(h[0], h[1], "{mode}: ranks differ");
        let f32_outs = run_ranks(2, mode, &["--max-iters", "4"]);
        assert_ok(&f32_outs);
        assert_ne!(
            hashes(&f32_outs[0].stdout),
            h[0],
            "{mode}: bf16 computed the f32 bits"
        );
    }
}

#[test]
fn bf16_bits_do_not_depend_on_the_thread_count() {
    let mut runs = Vec::new();
    for threads in ["1", "2"] {
        let mut args = strings(SMALL);
        set_flag(&mut args, "--threads", threads);
        args.extend(strings(&[
            "--mode",
            "single",
            "--max-iters",
            "3",
            "--precision",
            "bf16",
        ]));
        let out = run_single(&args);
        assert_ok(std::slice::from_ref(&out));
        runs.push((hashes(&out.stdout), losses(&out.stdout)));
    }
    assert_eq!(runs[0].0.len(), 1);
    assert_eq!(runs[0], runs[1], "1 vs 2 threads");
}

#[test]
fn checkpoints_resume_across_precisions() {
    let dir = temp_dir("precision-resume");
    let ckpt = dir.join("run.safetensors");
    let ckpt_s = ckpt.to_str().expect("utf-8 path").to_string();
    let first = single(&["--precision", "bf16", "--save-checkpoint", &ckpt_s]);
    assert_ok(std::slice::from_ref(&first));
    assert!(ckpt.exists());
    // The f32 run resumes from the bf16 run's f32 weights and trains on.
    let mut args = strings(SMALL);
    args.extend(strings(&[
        "--mode",
        "single",
        "--max-iters",
        "6",
        "--resume",
        &ckpt_s,
    ]));
    let resumed = run_single(&args);
    assert_ok(std::slice::from_ref(&resumed));
    assert_eq!(losses(&resumed.stdout).len(), 2, "{}", resumed.stdout);
}

#[test]
fn unknown_precision_is_refused_with_exit_code_2() {
    let out = single(&["--precision", "fp8"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--precision"), "{}", out.stderr);
}
