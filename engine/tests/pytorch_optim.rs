//! Schedules, SGD (Nesterov, dampening) and label-smoothed cross-entropy against the values
//! PyTorch produced, from the fixtures of `scripts/make_schedule_fixtures.py`.

use engine::autograd::Param;
use engine::ops::{cross_entropy_backward, cross_entropy_forward};
use engine::schedule::{LrSchedule, OneCycle, ScheduleKind};
use engine::Sgd;
use serde_json::Value;

fn fixture(name: &str) -> Value {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn f(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number"))
}

fn u(v: &Value, key: &str) -> usize {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} is not an integer")) as usize
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .expect("an array")
        .iter()
        .map(|x| x.as_f64().expect("a number"))
        .collect()
}

/// `|got - want| <= rtol·|want| + atol`, naming the case and element on failure.
fn assert_close(what: &str, got: &[f64], want: &[f64], rtol: f64, atol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= rtol * w.abs() + atol,
            "{what}[{i}]: got {g:e}, PyTorch {w:e}"
        );
    }
}

fn schedule_of(c: &Value) -> LrSchedule {
    let kind = match c["kind"].as_str().expect("kind") {
        "constant" => ScheduleKind::Constant,
        "step" => ScheduleKind::Step {
            milestones: floats(&c["milestones"])
                .iter()
                .map(|&m| m as usize)
                .collect(),
            gamma: f(c, "gamma"),
        },
        "cosine" => ScheduleKind::Cosine {
            final_lr: f(c, "final_lr"),
        },
        "onecycle" => ScheduleKind::OneCycle(OneCycle {
            pct_start: f(c, "pct_start"),
            div_factor: f(c, "div_factor"),
            final_div_factor: f(c, "final_div_factor"),
            cycle_momentum: c["cycle_momentum"]
                .as_bool()
                .expect("cycle_momentum")
                .then(|| (f(c, "base_momentum"), f(c, "max_momentum"))),
        }),
        other => panic!("unknown schedule kind {other}"),
    };
    LrSchedule::new(
        f(c, "base_lr"),
        u(c, "total_iters"),
        u(c, "warmup_iters"),
        f(c, "warmup_start_factor"),
        kind,
    )
    .expect("a valid schedule")
}

/// Every iteration's learning rate (and OneCycleLR's momentum) equals PyTorch's. PyTorch
/// computes recursively, we in closed form: they agree to a few ulps per step (measured
/// worst 5e-14 relative over 1955 cosine steps), far below f32's 6e-8.
#[test]
fn schedules_match_pytorch_at_every_iteration() {
    let all = fixture("schedules.json");
    let cases = all["schedules"].as_array().expect("schedules");
    assert_eq!(cases.len(), 8);
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let s = schedule_of(c);
        let total = u(c, "total_iters");
        let lrs: Vec<f64> = (0..total).map(|i| s.lr(i)).collect();
        assert_close(&format!("{name} lr"), &lrs, &floats(&c["lr"]), 1e-12, 1e-18);
        let torch_momentum = floats(&c["momentum"]);
        let momenta: Vec<f64> = (0..total).map(|i| s.momentum(i).unwrap_or(0.9)).collect();
        assert_close(
            &format!("{name} momentum"),
            &momenta,
            &torch_momentum,
            1e-12,
            0.0,
        );
        // Only a cycling schedule sets the momentum.
        let cycles = c["kind"] == "onecycle" && c["cycle_momentum"] == true;
        assert_eq!(s.momentum(0).is_some(), cycles, "{name}");
    }
}

/// Four float64 SGD steps per setting, with lr and momentum set before each step as a
/// schedule does: parameters and momentum buffers equal PyTorch's.
#[test]
fn sgd_nesterov_and_dampening_match_pytorch() {
    let all = fixture("optim_loss.json");
    let cases = all["sgd"].as_array().expect("sgd");
    assert_eq!(cases.len(), 6);
    for c in cases {
        let name = c["name"].as_str().expect("name");
        let mut sgd = Sgd::<f64>::new(0.1, f(c, "momentum"), f(c, "weight_decay")).with_nesterov(
            c["nesterov"].as_bool().expect("nesterov"),
            f(c, "dampening"),
        );
        sgd.validate().expect("PyTorch accepted these settings");
        let initial = floats(&c["initial"]);
        let mut params = vec![Param::new("w", &[initial.len()], initial)];
        let (lrs, momenta) = (floats(&c["lrs"]), floats(&c["momenta"]));
        let grads = c["grads"].as_array().expect("grads");
        for (k, g) in grads.iter().enumerate() {
            sgd.lr = lrs[k];
            sgd.momentum = momenta[k];
            params[0].grad = floats(g);
            sgd.step(&mut params);
            let what = format!("{name} step {k}");
            let want = floats(&c["values"][k]);
            assert_close(
                &format!("{what} value"),
                &params[0].value,
                &want,
                1e-14,
                1e-15,
            );
            match &c["buffers"][k] {
                Value::Null => assert!(sgd.momentum_buffer(0).is_none(), "{what}: no buffer"),
                b => {
                    let buf = sgd.momentum_buffer(0).expect("a momentum buffer");
                    assert_close(&format!("{what} buffer"), buf, &floats(b), 1e-14, 1e-15);
                }
            }
        }
    }
}

/// The mean loss and its gradient for given logits, with and without label smoothing, in
/// f64 (tight) and f32 (the training type).
#[test]
fn label_smoothed_cross_entropy_matches_pytorch() {
    let all = fixture("optim_loss.json");
    let cases = all["cross_entropy"].as_array().expect("cross_entropy");
    assert_eq!(cases.len(), 5);
    for c in cases {
        let (n, classes, eps) = (u(c, "n"), u(c, "classes"), f(c, "label_smoothing"));
        let logits = floats(&c["logits"]);
        let labels: Vec<u32> = floats(&c["labels"]).iter().map(|&l| l as u32).collect();
        let (want_loss, want_grad) = (f(c, "loss"), floats(&c["grad"]));
        let what = format!("n={n} classes={classes} label_smoothing={eps}");

        let mut probs = vec![0f64; n * classes];
        let loss = cross_entropy_forward(n, classes, &logits, &labels, eps, &mut probs);
        assert_close(&format!("{what} loss"), &[loss], &[want_loss], 1e-13, 1e-15);
        let mut grad = vec![f64::NAN; n * classes];
        cross_entropy_backward(n, classes, &probs, &labels, eps, 1.0, &mut grad);
        assert_close(&format!("{what} grad"), &grad, &want_grad, 1e-12, 1e-15);

        let l32: Vec<f32> = logits.iter().map(|&v| v as f32).collect();
        let mut p32 = vec![0f32; n * classes];
        let loss32 = cross_entropy_forward(n, classes, &l32, &labels, eps, &mut p32);
        assert_close(
            &format!("{what} f32 loss"),
            &[loss32 as f64],
            &[want_loss],
            1e-5,
            1e-6,
        );
        let mut g32 = vec![f32::NAN; n * classes];
        cross_entropy_backward(n, classes, &p32, &labels, eps, 1.0, &mut g32);
        let g32: Vec<f64> = g32.iter().map(|&v| v as f64).collect();
        assert_close(&format!("{what} f32 grad"), &g32, &want_grad, 1e-4, 1e-6);
    }
}
