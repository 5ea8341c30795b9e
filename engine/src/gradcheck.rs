//! Central-difference gradient checking in f64 (PyTorch `gradcheck` tolerances).
//!
//! An op (or a whole network) is checked through a scalar function of its inputs. The usual
//! choice is `L(x, w, …) = Σ r ⊙ f(x, w, …)` with a fixed random `r` ([`random_vec`] +
//! [`dot`]): then `∂L/∂f = r` is what you feed the backward pass as the output gradient, and
//! the analytic gradients it returns must match the numeric ones
//! `(L(v + eps) - L(v - eps)) / (2·eps)` element by element:
//! `|analytic - numeric| <= atol + rtol·|numeric|`.
//!
//! ```
//! use engine::gradcheck::{check_gradients, dot, random_vec, GradcheckConfig};
//! // f(x) = x², so with L = Σ r·f(x) the gradient is 2·r·x.
//! let x = random_vec(1, 5, -1.0, 1.0);
//! let r = random_vec(2, 5, -1.0, 1.0);
//! let analytic: Vec<f64> = x.iter().zip(&r).map(|(x, r)| 2.0 * r * x).collect();
//! let mut inputs = vec![x];
//! let report = check_gradients(
//!     &["x"],
//!     &mut inputs,
//!     &[analytic],
//!     &GradcheckConfig::default(),
//!     |v| dot(&r, &v[0].iter().map(|x| x * x).collect::<Vec<_>>()),
//! )
//! .expect("gradients match");
//! assert_eq!(report.inputs[0].checked, 5);
//! ```
//!
//! For large inputs (a whole network's weights) set
//! [`GradcheckConfig::max_checks_per_input`]: a seeded random subset of each input's elements
//! is checked (each one costs two evaluations of `loss`). `loss` receives the current values
//! of *all* inputs (one of them perturbed); it must be a pure function of them.
//!
//! Mind the kinks: central differences are wrong within `eps` of a non-differentiable point
//! (relu at 0, a max-pool tie), so build inputs that stay clear of them.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Step and tolerances. The defaults are PyTorch's `gradcheck` ones.
#[derive(Clone, Debug)]
pub struct GradcheckConfig {
    pub eps: f64,
    pub atol: f64,
    pub rtol: f64,
    /// Check at most this many elements per input (a seeded random subset); `None`: all.
    pub max_checks_per_input: Option<usize>,
    /// Seed of the subset choice.
    pub seed: u64,
}

impl Default for GradcheckConfig {
    fn default() -> Self {
        GradcheckConfig {
            eps: 1e-6,
            atol: 1e-5,
            rtol: 1e-3,
            max_checks_per_input: None,
            seed: 0,
        }
    }
}

/// Per-input summary of a passed check.
#[derive(Clone, Debug)]
pub struct InputReport {
    pub name: String,
    /// Elements compared.
    pub checked: usize,
    /// Largest `|analytic - numeric|` seen.
    pub max_abs_err: f64,
}

#[derive(Clone, Debug)]
pub struct GradcheckReport {
    pub inputs: Vec<InputReport>,
}

#[derive(Debug, thiserror::Error)]
pub enum GradcheckError {
    #[error("gradcheck: {0}")]
    BadArguments(String),
    #[error(
        "gradcheck: d loss / d {input}[{index}]: analytic {analytic:e} vs numeric {numeric:e} \
         (|diff| {abs_err:e} > allowed {allowed:e}); {failures} of {checked} checked elements \
         of {input} fail"
    )]
    Mismatch {
        input: String,
        index: usize,
        analytic: f64,
        numeric: f64,
        abs_err: f64,
        allowed: f64,
        failures: usize,
        checked: usize,
    },
}

/// Compare `analytic[i]` (the gradient of `loss` w.r.t. `values[i]`, named `names[i]`) with
/// central differences of `loss`. `values` are perturbed in place and restored exactly.
/// Returns the first input with mismatches (reporting its worst element), else a summary.
pub fn check_gradients<F>(
    names: &[&str],
    values: &mut [Vec<f64>],
    analytic: &[Vec<f64>],
    cfg: &GradcheckConfig,
    mut loss: F,
) -> Result<GradcheckReport, GradcheckError>
where
    F: FnMut(&[Vec<f64>]) -> f64,
{
    if names.len() != values.len() || analytic.len() != values.len() {
        return Err(GradcheckError::BadArguments(format!(
            "{} names, {} inputs, {} analytic gradients",
            names.len(),
            values.len(),
            analytic.len()
        )));
    }
    if cfg.eps.is_nan() || cfg.eps <= 0.0 {
        return Err(GradcheckError::BadArguments(format!(
            "eps {} <= 0",
            cfg.eps
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let mut report = GradcheckReport { inputs: Vec::new() };
    for (k, name) in names.iter().enumerate() {
        let len = values[k].len();
        if analytic[k].len() != len {
            return Err(GradcheckError::BadArguments(format!(
                "{name}: {len} values but {} analytic gradients",
                analytic[k].len()
            )));
        }
        let indices: Vec<usize> = match cfg.max_checks_per_input {
            Some(m) if m < len => {
                let mut s = rand::seq::index::sample(&mut rng, len, m).into_vec();
                s.sort_unstable();
                s
            }
            _ => (0..len).collect(),
        };
        let mut max_abs_err = 0f64;
        let mut worst: Option<(usize, f64, f64, f64, f64)> = None;
        let mut failures = 0;
        for &i in &indices {
            let orig = values[k][i];
            values[k][i] = orig + cfg.eps;
            let plus = loss(values);
            values[k][i] = orig - cfg.eps;
            let minus = loss(values);
            values[k][i] = orig;
            let numeric = (plus - minus) / (2.0 * cfg.eps);
            let a = analytic[k][i];
            let abs_err = (a - numeric).abs();
            let allowed = cfg.atol + cfg.rtol * numeric.abs();
            // A NaN on either side is a failure too.
            if abs_err.is_nan() || abs_err > allowed {
                failures += 1;
                let excess = if abs_err.is_nan() {
                    f64::INFINITY
                } else {
                    abs_err / allowed
                };
                if worst.is_none_or(|w| excess > w.4) {
                    worst = Some((i, a, numeric, allowed, excess));
                }
            }
            max_abs_err = max_abs_err.max(abs_err);
        }
        if let Some((index, analytic, numeric, allowed, _)) = worst {
            return Err(GradcheckError::Mismatch {
                input: name.to_string(),
                index,
                analytic,
                numeric,
                abs_err: (analytic - numeric).abs(),
                allowed,
                failures,
                checked: indices.len(),
            });
        }
        report.inputs.push(InputReport {
            name: name.to_string(),
            checked: indices.len(),
            max_abs_err,
        });
    }
    Ok(report)
}

/// `len` values uniform in `[lo, hi)` from a seeded generator (same seed, same values).
pub fn random_vec(seed: u64, len: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.gen_range(lo..hi)).collect()
}

/// `Σ a ⊙ b`, the usual projection of an op's output to a scalar loss.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
