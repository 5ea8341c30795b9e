//! The training recipe end to end, as real processes: `--eval-every` evaluations in the log
//! and metrics, the scheduled rate in the metrics, `--save-best` keeping the best evaluation's
//! state, `dtrain eval` reproducing its accuracy, and bad recipes refused with exit code 2.

mod common;

use common::*;
use serde_json::Value;

fn metrics_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .expect("metrics file")
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// 320 images, batch 16: 20 iterations per epoch; 2 epochs, evaluating every 6 iterations.
#[test]
fn eval_every_save_best_and_eval_agree() {
    let dir = temp_dir("recipe");
    let (metrics, best) = (dir.join("m.jsonl"), dir.join("best.safetensors"));
    let mut args = strings(SMALL);
    args.extend(strings(&[
        "--mode",
        "single",
        "--epochs",
        "2",
        "--eval-every",
        "6",
    ]));
    args.extend(strings(&[
        "--lr-schedule",
        "cosine",
        "--warmup-epochs",
        "0.25",
    ]));
    set_flag(&mut args, "--lr", "0.05");
    args.extend(strings(&["--final-lr", "0.001"]));
    args.extend(strings(&["--metrics", metrics.to_str().expect("utf-8")]));
    args.extend(strings(&["--save-best", best.to_str().expect("utf-8")]));
    let out = run_single(&args);
    assert_ok(std::slice::from_ref(&out));

    let lines = metrics_lines(&metrics);
    let evals: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("test_accuracy").is_some())
        .collect();
    let at: Vec<u64> = evals
        .iter()
        .map(|e| e["iteration"].as_u64().expect("iteration"))
        .collect();
    // Every 6 iterations, plus each epoch's end (20, 40); 18 and 36 are not epoch ends.
    assert_eq!(at, vec![6, 12, 18, 20, 24, 30, 36, 40], "{}", out.stdout);
    assert_eq!(out.stdout.matches("Test set: ").count(), evals.len());

    // The rate each iteration trained with: warmup from 0.1 × 0.05 over 5 iterations, then
    // cosine down towards 0.001 over the remaining 35.
    let lrs: Vec<f64> = lines.iter().filter_map(|l| l["lr"].as_f64()).collect();
    assert_eq!(lrs.len(), 40);
    let base = 0.05f32 as f64;
    assert!((lrs[0] - 0.1 * base).abs() < 1e-12, "{}", lrs[0]);
    assert!((lrs[5] - base).abs() < 1e-12, "{}", lrs[5]);
    let last = 0.001f32 as f64
        + (base - 0.001f32 as f64) * (1.0 + (std::f64::consts::PI * 34.0 / 35.0).cos()) / 2.0;
    assert!((lrs[39] - last).abs() < 1e-9, "{} vs {last}", lrs[39]);

    // The best file holds the first evaluation with the highest accuracy.
    let accs: Vec<f64> = evals
        .iter()
        .map(|e| e["test_accuracy"].as_f64().expect("acc"))
        .collect();
    let top = accs.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let first_top = accs.iter().position(|&a| a == top).expect("a best");
    let saved = engine::state::load_tensors(&best).expect("the best checkpoint loads");
    assert_eq!(
        saved.metadata["test_accuracy"]
            .parse::<f64>()
            .expect("a number"),
        top
    );
    assert_eq!(saved.metadata["iteration"], at[first_top].to_string());
    assert_eq!(saved.metadata["lr_schedule"], "cosine");

    // dtrain eval on the best checkpoint reports that accuracy.
    let mut eval = strings(&["eval", "--checkpoint", best.to_str().expect("utf-8")]);
    eval.extend(strings(SMALL));
    let evaluated = run_single(&eval);
    assert_ok(std::slice::from_ref(&evaluated));
    let correct = (top * 96.0).round() as usize;
    assert!(
        evaluated
            .stdout
            .contains(&format!("Accuracy: {correct}/96 ")),
        "{}\nbest {top}",
        evaluated.stdout
    );
}

#[test]
fn bad_recipes_and_eval_inputs_exit_2_naming_the_flag_or_file() {
    let dir = temp_dir("recipe-bad");
    let missing = dir.join("missing.safetensors");
    let not_a_checkpoint = dir.join("junk.safetensors");
    std::fs::write(&not_a_checkpoint, b"not safetensors").expect("write");
    let cases: Vec<(Vec<String>, String)> = vec![
        // 320 images / 16 = 20 iterations: no room for onecycle's two phases at pct 0.01.
        (
            strings(&["--lr-schedule", "onecycle", "--pct-start", "0.01"]),
            "--pct-start".into(),
        ),
        (
            strings(&["--lr-schedule", "cosine", "--warmup-epochs", "1"]),
            "warmup".into(),
        ),
        (
            strings(&["--nesterov", "--momentum", "0"]),
            "--nesterov".into(),
        ),
        (
            strings(&["--label-smoothing", "-0.1"]),
            "--label-smoothing".into(),
        ),
        (
            strings(&["eval", "--checkpoint", missing.to_str().expect("utf-8")]),
            "missing.safetensors".into(),
        ),
        (
            strings(&[
                "eval",
                "--checkpoint",
                not_a_checkpoint.to_str().expect("utf-8"),
            ]),
            "junk.safetensors".into(),
        ),
    ];
    for (flags, needle) in cases {
        let mut args = flags.clone();
        args.extend(strings(SMALL));
        args.extend(strings(&["--mode", "single"]));
        let out = run_single(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {}", out.stderr);
        assert!(out.stderr.contains(&needle), "{flags:?}: {}", out.stderr);
    }
}
