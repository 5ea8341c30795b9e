//! The engine's VGG against PyTorch: fixtures written by `fixtures/make_reference.py` (torch
//! 2.x CPU, model.py's VGG class, width/8 VGG11, batch of 8).
//!
//! Tolerance: norm-wise relative error `‖ours − torch‖ / ‖torch‖ <= 1e-4` (both sides compute
//! in f32 with different summation orders; the observed errors are ~1e-6).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use engine::init::{default_bound, fan_in};
use engine::state::{load_tensors, save_tensors, NamedTensor, TensorData};
use engine::{Float, Sgd, Vgg, VggConfig};

const W8_SPEC: &str = "8,M,16,M,32,32,M,64,64,M,64,64,M";
const TOL: f64 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

fn load(name: &str) -> BTreeMap<String, NamedTensor> {
    load_tensors(&fixture(name))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
        .tensors
}

fn as_f64(t: &NamedTensor) -> Vec<f64> {
    match &t.data {
        TensorData::F32(v) => v.iter().map(|&x| x as f64).collect(),
        TensorData::F64(v) => v.clone(),
        TensorData::I64(v) => v.iter().map(|&x| x as f64).collect(),
    }
}

fn to_f64<T: Float>(v: &[T]) -> Vec<f64> {
    v.iter().map(|x| x.to_f64_lossy()).collect()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// `‖a − b‖ / ‖b‖`.
fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&d) / norm(b)
}

fn assert_close(what: &str, ours: &[f64], torch: &[f64]) {
    let e = rel_err(ours, torch);
    assert!(e <= TOL, "{what}: relative error {e:e} > {TOL:e}");
}

struct Batch {
    images: Vec<f32>,
    labels: Vec<u32>,
}

fn batch() -> Batch {
    let b = load("w8_batch.safetensors");
    let images = match &b["images"].data {
        TensorData::F32(v) => v.clone(),
        other => panic!("images dtype {}", other.dtype_name()),
    };
    let labels = match &b["labels"].data {
        TensorData::I64(v) => v.iter().map(|&l| l as u32).collect(),
        other => panic!("labels dtype {}", other.dtype_name()),
    };
    assert_eq!(b["images"].shape, [8, 3, 32, 32]);
    Batch { images, labels }
}

/// The width/8 VGG11 with PyTorch's initial weights (a torch-written state_dict).
fn w8_model<T: Float>() -> Vgg<T> {
    let mut m = Vgg::<T>::new(VggConfig::from_spec(W8_SPEC, 3, 32, 10).unwrap(), 123);
    m.load_state_dict(&load("w8_init.safetensors"), true)
        .expect("torch state_dict loads strictly");
    m
}

/// One train step's loss, logits, every gradient and the running stats, in precision `T`.
fn check_step1<T: Float>() {
    let b = batch();
    let x: Vec<T> = b
        .images
        .iter()
        .map(|&v| T::from_f64_lossy(v as f64))
        .collect();
    let mut m = w8_model::<T>();
    let mut ready = Vec::new();
    let stats = m
        .forward_backward(&x, 8, &b.labels, &mut |i, g| {
            ready.push(i);
            assert!(!g.is_empty());
        })
        .unwrap();
    let r = load("w8_step1.safetensors");
    assert_close("loss", &[stats.loss], &as_f64(&r["loss"]));
    assert_close("logits", &to_f64(m.last_logits()), &as_f64(&r["logits"]));

    // Every parameter reported ready exactly once, in reverse order of use (fc1 first).
    let n = m.params().len();
    let mut sorted = ready.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..n).collect::<Vec<_>>());
    assert!(ready[..2].contains(&(n - 1)) && ready[..2].contains(&(n - 2)));

    let params = m.params();
    for (i, p) in params.iter().enumerate() {
        let ours = to_f64(&p.grad);
        let torch = as_f64(&r[&format!("grad.{}", p.name)]);
        let is_conv_bias = p.shape.len() == 1 && i > 0 && params[i - 1].shape.len() == 4;
        if is_conv_bias {
            // A conv bias feeding batch norm has an exactly-zero gradient (BN subtracts the
            // channel mean): both sides are rounding noise, so compare against the scale of
            // the layer's weight gradient instead of against each other.
            let scale = norm(&to_f64(&params[i - 1].grad));
            assert!(
                norm(&ours) <= TOL * scale && norm(&torch) <= TOL * scale,
                "{}: |ours| {:e} |torch| {:e} vs weight-grad scale {scale:e}",
                p.name,
                norm(&ours),
                norm(&torch)
            );
        } else {
            assert_close(&format!("grad {}", p.name), &ours, &torch);
        }
    }
    for bn in m.bn_buffers() {
        for (what, v) in [
            ("running_mean", &bn.running_mean),
            ("running_var", &bn.running_var),
        ] {
            let name = format!("after1.{}.{what}", bn.prefix);
            assert_close(&name, &to_f64(v), &as_f64(&r[&name]));
        }
        assert_eq!(bn.num_batches_tracked, 1);
    }
}

#[test]
fn one_step_matches_pytorch_f32() {
    check_step1::<f32>();
}

#[test]
fn one_step_matches_pytorch_f64() {
    check_step1::<f64>();
}

/// Three SGD steps (lr 0.1, momentum 0.9, wd 1e-4) on the fixture batch, as the script does.
fn three_steps() -> (Vgg<f32>, Sgd<f32>) {
    let b = batch();
    let mut m = w8_model::<f32>();
    let mut sgd = Sgd::new(0.1, 0.9, 1e-4);
    for _ in 0..3 {
        m.forward_backward(&b.images, 8, &b.labels, &mut |_, _| {})
            .unwrap();
        sgd.step(m.params_mut());
    }
    (m, sgd)
}

#[test]
fn three_sgd_steps_and_eval_match_pytorch() {
    let (mut m, _) = three_steps();
    let r = load("w8_step3.safetensors");
    let init = load("w8_init.safetensors");
    let conv_biases: Vec<String> = m
        .params()
        .windows(2)
        .filter(|w| w[0].shape.len() == 4)
        .map(|w| w[1].name.clone())
        .collect();
    for t in m.state_dict() {
        let torch = &r[&t.name];
        assert_eq!(t.shape, torch.shape, "{}", t.name);
        if t.name.ends_with("num_batches_tracked") {
            assert_eq!(t.data, TensorData::I64(vec![3]), "{}", t.name);
            assert_eq!(torch.data, TensorData::I64(vec![3]));
            continue;
        }
        let ours = as_f64(&t);
        let theirs = as_f64(torch);
        assert_close(&t.name, &ours, &theirs);
        // The parameter/statistic *change* is a stricter check (the initial values dominate
        // the norms above); same 1e-4 bound (observed ~1e-6).
        let p0 = as_f64(&init[&t.name]);
        let d_ours: Vec<f64> = ours.iter().zip(&p0).map(|(a, b)| a - b).collect();
        let d_torch: Vec<f64> = theirs.iter().zip(&p0).map(|(a, b)| a - b).collect();
        let e = rel_err(&d_ours, &d_torch);
        // Conv biases feeding batch norm: their gradient is rounding noise (see
        // check_step1), so their change is weight decay plus noise on both sides: skip.
        let is_conv_bias = t.name.ends_with(".bias") && conv_biases.contains(&t.name);
        eprintln!("change of {}: relative error {e:.2e}", t.name);
        if !is_conv_bias {
            assert!(e <= TOL, "change of {}: relative error {e:e}", t.name);
        }
    }
    let b = batch();
    let logits = m.forward_eval(&b.images, 8).unwrap();
    assert_close("eval logits", &to_f64(&logits), &as_f64(&r["eval_logits"]));
}

fn temp_path(tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    std::env::temp_dir().join(format!(
        "engine-ref-{tag}-{}-{nanos}.safetensors",
        std::process::id()
    ))
}

#[test]
fn checkpoint_round_trips_in_rust() {
    let (mut m, sgd) = three_steps();
    let mut tensors = m.state_dict();
    tensors.extend(sgd.state_tensors(m.params()));
    let mut meta = HashMap::new();
    meta.insert("note".to_string(), "engine test".to_string());
    let path = temp_path("ckpt");
    save_tensors(&path, &tensors, &meta).unwrap();

    // Rust: a fresh model + optimizer restored from the file equal the saved ones, and the
    // next step is identical.
    let loaded = load_tensors(&path).unwrap();
    assert_eq!(loaded.metadata, meta);
    let mut m2 = Vgg::<f32>::new(VggConfig::from_spec(W8_SPEC, 3, 32, 10).unwrap(), 999);
    assert!(
        m2.load_state_dict(&loaded.tensors, true).is_err(),
        "strict load must reject the optimizer tensors"
    );
    m2.load_state_dict(&loaded.tensors, false).unwrap();
    let mut sgd2 = Sgd::<f32>::new(0.1, 0.9, 1e-4);
    sgd2.load_state_tensors(m2.params(), &loaded.tensors)
        .unwrap();
    assert_eq!(m2.state_dict(), m.state_dict());
    let b = batch();
    for (model, opt) in [(&mut m, &mut sgd.clone()), (&mut m2, &mut sgd2)] {
        model
            .forward_backward(&b.images, 8, &b.labels, &mut |_, _| {})
            .unwrap();
        opt.step(model.params_mut());
    }
    assert_eq!(m2.state_dict(), m.state_dict());
    let _ = std::fs::remove_file(&path);
}

/// PyTorch: model.py's VGG loads our checkpoint strictly (minus `optimizer.*`) and reproduces
/// its eval logits. By hand: `cargo test --release -p engine --test pytorch_reference --
/// --ignored` with `pip install torch safetensors`.
#[test]
#[ignore = "needs python3 with torch + safetensors (pip install torch safetensors), not in CI"]
fn checkpoint_loads_in_pytorch() {
    // The 3-step state (the one the fixture's eval logits belong to).
    let (m3, sgd3) = three_steps();
    let mut tensors = m3.state_dict();
    tensors.extend(sgd3.state_tensors(m3.params()));
    let mut meta = HashMap::new();
    meta.insert("note".to_string(), "engine test".to_string());
    let path = temp_path("torch-ckpt");
    save_tensors(&path, &tensors, &meta).unwrap();
    let out = std::process::Command::new("python3")
        .arg(fixture("make_reference.py"))
        .arg("--check-checkpoint")
        .arg(&path)
        .output()
        .expect("this test needs python3 (with torch + safetensors)");
    let _ = std::fs::remove_file(&path);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "PyTorch rejected the checkpoint:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("PyTorch check: {}", stdout.trim());
}

/// One line of `vgg11_full_params.txt`.
struct TorchParam {
    name: String,
    shape: Vec<usize>,
    trainable: bool,
    mean: f64,
    std: f64,
    max_abs: f64,
}

fn torch_full_vgg11() -> Vec<TorchParam> {
    let text = std::fs::read_to_string(fixture("vgg11_full_params.txt")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f.len(), 6, "bad line {l:?}");
            let shape = if f[1] == "-" {
                Vec::new()
            } else {
                f[1].split('x').map(|d| d.parse().unwrap()).collect()
            };
            TorchParam {
                name: f[0].to_string(),
                shape,
                trainable: f[2] == "1",
                mean: f[3].parse().unwrap(),
                std: f[4].parse().unwrap(),
                max_abs: f[5].parse().unwrap(),
            }
        })
        .collect()
}

#[test]
fn full_vgg11_state_dict_matches_pytorch_names_and_shapes() {
    let torch = torch_full_vgg11();
    let m = Vgg::<f32>::new(VggConfig::vgg11(), 0);
    let ours = m.state_dict();
    let ours_ns: Vec<(&str, &[usize])> = ours
        .iter()
        .map(|t| (t.name.as_str(), &t.shape[..]))
        .collect();
    let torch_ns: Vec<(&str, &[usize])> = torch
        .iter()
        .map(|t| (t.name.as_str(), &t.shape[..]))
        .collect();
    assert_eq!(ours_ns, torch_ns);
    let trainable: Vec<&TorchParam> = torch.iter().filter(|t| t.trainable).collect();
    assert_eq!(trainable.len(), 34);
    assert_eq!(m.params().len(), 34);
    let torch_count: usize = trainable
        .iter()
        .map(|t| t.shape.iter().product::<usize>())
        .sum();
    assert_eq!(torch_count, 9_231_114);
    assert_eq!(m.num_params(), 9_231_114);
    // parameters() order = hook index order.
    let names: Vec<&str> = m.params().iter().map(|p| p.name.as_str()).collect();
    let torch_names: Vec<&str> = trainable.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, torch_names);
}

/// Sampling tolerances for `n` draws of `U(-b, b)`: the mean has standard deviation
/// `b/sqrt(3n)`; the sample variance `s²` has standard deviation
/// `sqrt((μ4 − σ⁴)/n) = b²·sqrt((1/5 − 1/9)/n)`, i.e. relative `sqrt(0.8/n)`, so `s` is within
/// relative `sqrt(0.2/n)` (1 sigma). We allow 5 sigma (+ f32 rounding, negligible).
fn check_uniform_stats(what: &str, n: usize, bound: f64, mean: f64, std: f64, max_abs: f64) {
    let expected_std = bound / 3f64.sqrt();
    let mean_tol = 5.0 * bound / (3.0 * n as f64).sqrt();
    let std_tol = 5.0 * (0.2 / n as f64).sqrt() * expected_std;
    assert!(
        mean.abs() <= mean_tol,
        "{what}: mean {mean:e} beyond ±{mean_tol:e}"
    );
    assert!(
        (std - expected_std).abs() <= std_tol,
        "{what}: std {std:e} vs bound/sqrt(3) = {expected_std:e} (± {std_tol:e})"
    );
    assert!(
        max_abs <= bound * (1.0 + 1e-6),
        "{what}: |x| {max_abs:e} > bound {bound:e}"
    );
}

#[test]
fn init_statistics_match_pytorch_default_init() {
    let torch = torch_full_vgg11();
    let m = Vgg::<f32>::new(VggConfig::vgg11(), 0);
    let params = m.params();
    let by_name: HashMap<&str, &TorchParam> = torch.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut checked = 0;
    for (i, p) in params.iter().enumerate() {
        let t = by_name[p.name.as_str()];
        let v = to_f64(&p.value);
        let n = v.len() as f64;
        let mean = v.iter().sum::<f64>() / n;
        let std = (v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n).sqrt();
        let max_abs = v.iter().fold(0f64, |m, x| m.max(x.abs()));
        let is_bn =
            p.shape.len() == 1 && !p.name.starts_with("fc1") && params[i - 1].shape.len() == 1;
        if is_bn {
            // BatchNorm: weight 1, bias 0 (both sides exact).
            let want = if p.name.ends_with("weight") { 1.0 } else { 0.0 };
            assert!(v.iter().all(|&x| x == want), "{}", p.name);
            assert!((t.mean - want).abs() == 0.0 && t.std == 0.0, "{}", p.name);
            continue;
        }
        // Conv/linear weight, or its bias: both U(±1/sqrt(fan_in of the weight)).
        let w_shape = if p.shape.len() == 1 {
            &params[i - 1].shape
        } else {
            &p.shape
        };
        let bound = default_bound(fan_in(w_shape));
        check_uniform_stats(
            &format!("ours {}", p.name),
            v.len(),
            bound,
            mean,
            std,
            max_abs,
        );
        check_uniform_stats(
            &format!("torch {}", p.name),
            v.len(),
            bound,
            t.mean,
            t.std,
            t.max_abs,
        );
        checked += 1;
    }
    assert_eq!(checked, 18, "9 conv/linear weights + 9 biases");
    for bn in m.bn_buffers() {
        assert!(bn.running_mean.iter().all(|&x| x == 0.0));
        assert!(bn.running_var.iter().all(|&x| x == 1.0));
        assert_eq!(bn.num_batches_tracked, 0);
    }
}
