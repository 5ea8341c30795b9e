//! Whole-network checks of the tape + VGG: f64 central-difference gradient checks, fan-out
//! summing, buffer reuse, train/eval bookkeeping.

use engine::autograd::{Param, Tape};
use engine::gradcheck::{check_gradients, random_vec, GradcheckConfig};
use engine::{Vgg, VggConfig};

/// conv-bn-relu-pool ×2 → linear → cross-entropy, batch 3 of 3×8×8, 5 classes, in f64:
/// every parameter gradient and the input gradient against central differences.
#[test]
fn gradcheck_small_network() {
    let config = VggConfig::from_spec("4,M,6,M", 3, 8, 5).unwrap();
    let mut model = Vgg::<f64>::new(config, 11);
    // Non-trivial batch-norm affine parameters (init is exactly 1 / 0).
    for (i, p) in model.params_mut().iter_mut().enumerate() {
        if p.name.starts_with("layers.1.") || p.name.starts_with("layers.5.") {
            p.value = random_vec(100 + i as u64, p.value.len(), 0.5, 1.5);
        }
    }
    let n = 3;
    let x = random_vec(7, n * 3 * 8 * 8, -1.0, 1.0);
    let labels = [0u32, 3, 4];

    let mut hook_order = Vec::new();
    let mut hook_grads = Vec::new();
    let (_, input_grad) = model
        .forward_backward_with_input_grad(&x, n, &labels, &mut |i, g| {
            hook_order.push(i);
            hook_grads.push(g.to_vec());
        })
        .unwrap();
    let n_params = model.params().len();
    // What the hook saw is the final gradient (DDP copies it into a bucket right there).
    for (&i, g) in hook_order.iter().zip(&hook_grads) {
        assert_eq!(g, &model.params()[i].grad, "{}", model.params()[i].name);
    }
    assert_eq!(n_params, 10);
    // Ready order: fc1 first, the first conv last.
    let mut sorted = hook_order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n_params).collect::<Vec<_>>());
    assert!(hook_order[..2].contains(&(n_params - 1)));
    assert!(hook_order[n_params - 2..].contains(&0));

    let names: Vec<String> = model
        .params()
        .iter()
        .map(|p| p.name.clone())
        .chain(["input".to_string()])
        .collect();
    let name_refs: Vec<&str> = names.iter().map(|s| s.as_str()).collect();
    let mut analytic: Vec<Vec<f64>> = model.params().iter().map(|p| p.grad.clone()).collect();
    analytic.push(input_grad);
    let mut values: Vec<Vec<f64>> = model.params().iter().map(|p| p.value.clone()).collect();
    values.push(x.clone());

    let report = check_gradients(
        &name_refs,
        &mut values,
        &analytic,
        &GradcheckConfig::default(),
        |v| {
            for (p, val) in model.params_mut().iter_mut().zip(v) {
                p.value.copy_from_slice(val);
            }
            model
                .forward_backward(&v[n_params], n, &labels, &mut |_, _| {})
                .unwrap()
                .loss
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let checked: usize = report.inputs.iter().map(|r| r.checked).sum();
    let total: usize = values.iter().map(|v| v.len()).sum();
    assert_eq!(checked, total, "every element checked");
}

/// A parameter used by two ops gets the sum of both contributions, and its ready hook fires
/// once, after the last use is back-propagated.
#[test]
fn gradcheck_shared_parameter_and_input() {
    let (n, d) = (3, 4);
    let mut params = vec![
        Param::new("w", &[d, d], random_vec(1, d * d, -1.0, 1.0)),
        Param::new("b", &[d], random_vec(2, d, -0.5, 0.5)),
    ];
    let x = random_vec(3, n * d, -1.0, 1.0);
    let labels = [1u32, 0, 3];
    let mut tape = Tape::<f64>::new();
    let run = |tape: &mut Tape<f64>, params: &mut [Param<f64>], x: &[f64], backward: bool| {
        tape.reset();
        let input = tape.leaf(&[n, d], x, true);
        let keep = tape.share(&input);
        let h = tape.linear(params, input, 0, Some(1));
        // A second, dead consumer of h: its (zero) gradient arrives first and the live one
        // must be summed into it.
        let h_dead = tape.share(&h);
        let h = tape.relu(h);
        let dead = tape.relu(h_dead);
        tape.release(dead);
        let logits = tape.linear(params, h, 0, Some(1));
        let (loss, value) = tape.cross_entropy(logits, &labels);
        let mut calls = Vec::new();
        let mut grad_x = Vec::new();
        if backward {
            tape.backward(loss, params, &mut |i, _| calls.push(i));
            grad_x = tape.grad(&keep).unwrap().to_vec();
        } else {
            tape.release(loss);
        }
        tape.release(keep);
        (value, calls, grad_x)
    };
    let (_, calls, grad_x) = run(&mut tape, &mut params, &x, true);
    let mut sorted = calls.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, vec![0, 1], "one ready call per parameter");
    let analytic = vec![params[0].grad.clone(), params[1].grad.clone(), grad_x];
    let mut values = vec![params[0].value.clone(), params[1].value.clone(), x.clone()];
    check_gradients(
        &["w", "b", "x"],
        &mut values,
        &analytic,
        &GradcheckConfig::default(),
        |v| {
            params[0].value.copy_from_slice(&v[0]);
            params[1].value.copy_from_slice(&v[1]);
            run(&mut tape, &mut params, &v[2], false).0
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}

/// Pooled buffers hold stale data from the previous step: results must not depend on them,
/// and a fixed batch size allocates nothing after the first step.
#[test]
fn buffers_are_reused_and_steps_are_reproducible() {
    let config = VggConfig::from_spec("8,M,16,M,16,M", 3, 16, 10).unwrap();
    let n = 4;
    let x: Vec<f32> = random_vec(5, n * 3 * 16 * 16, -1.0, 1.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    let labels = [1u32, 2, 9, 0];
    let mut a = Vgg::<f32>::new(config.clone(), 3);
    let first = a.forward_backward(&x, n, &labels, &mut |_, _| {}).unwrap();
    let grads1: Vec<Vec<f32>> = a.params().iter().map(|p| p.grad.clone()).collect();
    let allocs = a.train_buffer_allocations();
    assert!(allocs > 0);
    for _ in 0..2 {
        let again = a.forward_backward(&x, n, &labels, &mut |_, _| {}).unwrap();
        // Parameters did not change; batch statistics do not depend on running ones.
        assert_eq!(again, first);
        let grads: Vec<Vec<f32>> = a.params().iter().map(|p| p.grad.clone()).collect();
        assert_eq!(grads, grads1);
        assert_eq!(
            a.train_buffer_allocations(),
            allocs,
            "no new buffers at a fixed batch size"
        );
    }
    // A different batch size works (and re-allocates), then the original one again.
    let m = 2;
    a.forward_backward(&x[..m * 3 * 16 * 16], m, &labels[..m], &mut |_, _| {})
        .unwrap();
    let back = a.forward_backward(&x, n, &labels, &mut |_, _| {}).unwrap();
    assert_eq!(back, first);
}

#[test]
fn train_updates_buffers_and_eval_does_not() {
    let config = VggConfig::from_spec("4,M", 3, 4, 3).unwrap();
    let mut m = Vgg::<f64>::new(config, 1);
    let n = 2;
    let x = random_vec(9, n * 3 * 4 * 4, -1.0, 1.0);
    let labels = [0u32, 2];
    m.forward_backward(&x, n, &labels, &mut |_, _| {}).unwrap();
    let bn = &m.bn_buffers()[0];
    assert_eq!(bn.num_batches_tracked, 1);
    assert!(bn.running_mean.iter().any(|&v| v != 0.0));
    // running_var = 0.9·1 + 0.1·unbiased batch var: check one channel by hand.
    let before = m.bn_buffers()[0].clone();
    let logits = m.forward_eval(&x, n).unwrap();
    let after = &m.bn_buffers()[0];
    assert_eq!(after.running_mean, before.running_mean);
    assert_eq!(after.running_var, before.running_var);
    assert_eq!(after.num_batches_tracked, 1);
    assert_eq!(logits.len(), n * 3);
    // evaluate() agrees with the logits.
    let (loss_sum, correct) = m.evaluate(&x, n, &labels).unwrap();
    let mut want_loss = 0.0;
    let mut want_correct = 0;
    for (row, &l) in logits.chunks(3).zip(&labels) {
        let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
        want_loss += lse - row[l as usize];
        let best = (0..3).fold(0, |b, i| if row[i] > row[b] { i } else { b });
        want_correct += usize::from(best == l as usize);
    }
    assert!((loss_sum - want_loss).abs() < 1e-12);
    assert_eq!(correct, want_correct);
    m.set_training(false);
    assert!(m.forward_backward(&x, n, &labels, &mut |_, _| {}).is_err());
}

/// The plain batch-norm and relu nodes chained, and the fused node, on the same tape graph
/// (`x → bn(+relu) → linear → CE`, f64): the same loss and gradients, and the plain chain
/// passes a central-difference check through the tape (the fused one is checked by
/// `gradcheck_small_network`).
#[test]
fn fused_and_chained_batchnorm_relu_agree_through_the_tape() {
    use engine::autograd::BnMode;
    let (n, c, h, w) = (3, 2, 3, 2);
    let mut params = vec![
        Param::new("gamma", &[c], random_vec(21, c, 0.5, 1.5)),
        Param::new("beta", &[c], random_vec(22, c, -0.5, 0.5)),
        Param::new(
            "w",
            &[4, c * h * w],
            random_vec(23, 4 * c * h * w, -1.0, 1.0),
        ),
    ];
    let x = random_vec(24, n * c * h * w, -2.0, 2.0);
    let labels = [1u32, 3, 0];
    let mut tape = Tape::<f64>::new();
    let mut run = |params: &mut [Param<f64>], x: &[f64], fused: bool, backward: bool| {
        tape.reset();
        let (mut rm, mut rv) = (vec![0.0; c], vec![1.0; c]);
        let mode = BnMode::Train {
            running_mean: &mut rm,
            running_var: &mut rv,
            momentum: 0.1,
            last_batch: None,
        };
        let input = tape.leaf(&[n, c, h, w], x, true);
        let keep = tape.share(&input);
        let z = if fused {
            tape.batchnorm2d_relu(params, input, 0, 1, mode)
        } else {
            let y = tape.batchnorm2d(params, input, 0, 1, mode);
            tape.relu(y)
        };
        let logits = tape.linear(params, z, 2, None);
        let (loss, value) = tape.cross_entropy(logits, &labels);
        let mut dx = Vec::new();
        if backward {
            tape.backward(loss, params, &mut |_, _| {});
            dx = tape.grad(&keep).unwrap().to_vec();
        } else {
            tape.release(loss);
        }
        tape.release(keep);
        (value, dx, (rm, rv))
    };
    let (loss_f, dx_f, stats_f) = run(&mut params, &x, true, true);
    let grads_f: Vec<Vec<f64>> = params.iter().map(|p| p.grad.clone()).collect();
    let (loss_c, dx_c, stats_c) = run(&mut params, &x, false, true);
    assert!((loss_f - loss_c).abs() < 1e-12, "{loss_f} vs {loss_c}");
    assert_eq!(stats_f, stats_c, "running statistics");
    let close = |a: &[f64], b: &[f64]| a.iter().zip(b).all(|(a, b)| (a - b).abs() < 1e-10);
    assert!(close(&dx_f, &dx_c), "input gradient");
    for (p, g) in params.iter().zip(&grads_f) {
        assert!(close(&p.grad, g), "{}", p.name);
    }
    let mut analytic: Vec<Vec<f64>> = params.iter().map(|p| p.grad.clone()).collect();
    analytic.push(dx_c);
    let mut values: Vec<Vec<f64>> = params.iter().map(|p| p.value.clone()).collect();
    values.push(x.clone());
    check_gradients(
        &["gamma", "beta", "w", "x"],
        &mut values,
        &analytic,
        &GradcheckConfig::default(),
        |v| {
            for (p, val) in params.iter_mut().zip(v) {
                p.value.copy_from_slice(val);
            }
            run(&mut params, &v[3], false, false).0
        },
    )
    .unwrap_or_else(|e| panic!("{e}"));
}
