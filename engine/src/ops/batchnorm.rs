//! batchnorm2d over `[N, C, HW]`: training (batch statistics, biased variance) and eval
//! (running statistics). Statistics are accumulated in f64.
//!
//! Work split: training forward and backward run in parallel over channels; a task reduces
//! its channel's `N` planes and then immediately writes that channel's output planes, while
//! they are still in cache (two passes over memory instead of three). The reductions use 8
//! independent f64 lanes so LLVM vectorizes them and each lane sums a short,
//! well-conditioned series; the one-pass variance is taken around a sample of the channel so
//! `|mean| ≫ std` does not cancel. Eval forward is elementwise, parallel over planes.
use super::{par_chunks_mut, units_per_task, SharedMutPtr};
use crate::autograd::{Param, ParamGrads, Pools, Tape, TapeNode, ValueId};
use crate::Float;

/// Elements per parallel task at least (see relu).
const MIN_TASK_ELEMS: usize = 1 << 15;
const LANES: usize = 8;

/// Add `x - shift` and `(x - shift)²` to 8 f64 lanes. The shift (a sample of the channel)
/// keeps the one-pass variance free of cancellation when `|mean| ≫ std`. Lanes are summed by
/// the caller once per channel, not per plane (planes can be 4 elements).
fn accumulate_shifted<T: Float>(xs: &[T], shift: f64, s: &mut [f64; LANES], q: &mut [f64; LANES]) {
    let mut chunks = xs.chunks_exact(LANES);
    for ch in &mut chunks {
        for l in 0..LANES {
            let d = ch[l].to_f64_lossy() - shift;
            s[l] += d;
            q[l] += d * d;
        }
    }
    for (l, &v) in chunks.remainder().iter().enumerate() {
        let d = v.to_f64_lossy() - shift;
        s[l] += d;
        q[l] += d * d;
    }
}

/// Add `dy` and `dy·(x - mean)` to 8 f64 lanes (summed by the caller per channel).
fn accumulate_grads<T: Float>(
    dy: &[T],
    x: &[T],
    mean: f64,
    s: &mut [f64; LANES],
    p: &mut [f64; LANES],
) {
    let mut dy_chunks = dy.chunks_exact(LANES);
    let mut x_chunks = x.chunks_exact(LANES);
    for (dc, xc) in (&mut dy_chunks).zip(&mut x_chunks) {
        for l in 0..LANES {
            let d = dc[l].to_f64_lossy();
            s[l] += d;
            p[l] += d * (xc[l].to_f64_lossy() - mean);
        }
    }
    for (l, (&d, &xv)) in dy_chunks
        .remainder()
        .iter()
        .zip(x_chunks.remainder())
        .enumerate()
    {
        let d = d.to_f64_lossy();
        s[l] += d;
        p[l] += d * (xv.to_f64_lossy() - mean);
    }
}

/// Run `f(channel) -> R` for every channel in parallel (a channel spans `channel_len`
/// elements), collecting the results in channel order.
fn per_channel<R, F>(c: usize, channel_len: usize, f: F) -> Vec<R>
where
    R: Send + Default + Clone,
    F: Fn(usize) -> R + Sync,
{
    let mut out = vec![R::default(); c];
    let per_task = units_per_task(c, channel_len, MIN_TASK_ELEMS);
    par_chunks_mut(&mut out, per_task, |t, slots| {
        for (j, slot) in slots.iter_mut().enumerate() {
            *slot = f(t * per_task + j);
        }
    });
    out
}

/// Training forward: normalizes with the batch mean and biased variance; writes the per-channel
/// `mean` and `invstd = 1/sqrt(var_biased + eps)` that backward needs.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward_train<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
    y: &mut [T],
    mean: &mut [T],
    invstd: &mut [T],
) {
    check_lengths("batchnorm2d_forward_train", n, c, hw, x, gamma, beta);
    assert_eq!(y.len(), x.len(), "batchnorm2d_forward_train: y length");
    assert_eq!(mean.len(), c, "batchnorm2d_forward_train: mean length");
    assert_eq!(invstd.len(), c, "batchnorm2d_forward_train: invstd length");
    let count = (n * hw) as f64;
    let y_ptr = SharedMutPtr(y.as_mut_ptr());
    // One task per channel group computes a channel's statistics and then normalizes that
    // channel right away, while its planes are still in cache (a third pass over DRAM
    // otherwise).
    let stats: Vec<(f64, f64)> = per_channel(c, n * hw, |ch| {
        let shift = x.get(ch * hw).map_or(0.0, |v| v.to_f64_lossy());
        let (mut s_lanes, mut q_lanes) = ([0f64; LANES], [0f64; LANES]);
        for img in 0..n {
            let plane = &x[(img * c + ch) * hw..(img * c + ch + 1) * hw];
            accumulate_shifted(plane, shift, &mut s_lanes, &mut q_lanes);
        }
        let (s, q): (f64, f64) = (s_lanes.iter().sum(), q_lanes.iter().sum());
        let mean_shifted = s / count;
        let var = (q / count - mean_shifted * mean_shifted).max(0.0);
        let (m, is) = (shift + mean_shifted, 1.0 / (var + eps).sqrt());
        // y = (x - mean)·(gamma·invstd) + beta. The f64 mean is applied as hi + lo parts so
        // the subtraction stays accurate in f32 even when |mean| ≫ std.
        let hi = T::from_f64_lossy(m);
        let lo = T::from_f64_lossy(m - hi.to_f64_lossy());
        let scale = T::from_f64_lossy(gamma[ch].to_f64_lossy() * is);
        let b = beta[ch];
        for img in 0..n {
            let start = (img * c + ch) * hw;
            // SAFETY: plane `(img, ch)` lies inside `y` (same length as `x`, asserted) and
            // only the task of channel `ch` writes it; `y` stays exclusively borrowed until
            // `per_channel` returns.
            let yp = unsafe { std::slice::from_raw_parts_mut(y_ptr.get().add(start), hw) };
            for (yi, &xi) in yp.iter_mut().zip(&x[start..start + hw]) {
                *yi = ((xi - hi) - lo) * scale + b;
            }
        }
        (m, is)
    });
    for ((m, is), &(sm, si)) in mean.iter_mut().zip(invstd.iter_mut()).zip(&stats) {
        *m = T::from_f64_lossy(sm);
        *is = T::from_f64_lossy(si);
    }
}

/// Eval forward with running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward_eval<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
    y: &mut [T],
) {
    check_lengths("batchnorm2d_forward_eval", n, c, hw, x, gamma, beta);
    assert_eq!(y.len(), x.len(), "batchnorm2d_forward_eval: y length");
    assert_eq!(
        running_mean.len(),
        c,
        "batchnorm2d_forward_eval: running_mean length"
    );
    assert_eq!(
        running_var.len(),
        c,
        "batchnorm2d_forward_eval: running_var length"
    );
    let coef: Vec<[T; 3]> = (0..c)
        .map(|ch| {
            let scale = gamma[ch].to_f64_lossy() / (running_var[ch].to_f64_lossy() + eps).sqrt();
            [running_mean[ch], T::from_f64_lossy(scale), beta[ch]]
        })
        .collect();
    let per_task = units_per_task(n * c, hw, MIN_TASK_ELEMS);
    par_chunks_mut(y, per_task * hw, |t, ys| {
        for (j, yp) in ys.chunks_mut(hw).enumerate() {
            let p = t * per_task + j;
            let [m, scale, b] = coef[p % c];
            for (yi, &xi) in yp.iter_mut().zip(&x[p * hw..(p + 1) * hw]) {
                *yi = (xi - m) * scale + b;
            }
        }
    });
}

/// PyTorch's running-stat update: `r = (1-m)·r + m·batch`, with the *unbiased* batch variance
/// (`count = N·HW` elements per channel; `mean`/`invstd` as written by the training forward).
/// With `count == 1` the unbiased variance is undefined (PyTorch refuses to train then); the
/// biased one is used instead of producing NaN.
pub fn batchnorm2d_update_running<T: Float>(
    mean: &[T],
    invstd: &[T],
    eps: f64,
    count: usize,
    momentum: f64,
    running_mean: &mut [T],
    running_var: &mut [T],
) {
    let c = mean.len();
    assert_eq!(invstd.len(), c, "batchnorm2d_update_running: invstd length");
    assert_eq!(
        running_mean.len(),
        c,
        "batchnorm2d_update_running: running_mean length"
    );
    assert_eq!(
        running_var.len(),
        c,
        "batchnorm2d_update_running: running_var length"
    );
    let bessel = if count > 1 {
        count as f64 / (count - 1) as f64
    } else {
        1.0
    };
    for ch in 0..c {
        let is = invstd[ch].to_f64_lossy();
        // invstd = 1/sqrt(var + eps)  =>  var = 1/invstd² - eps
        let var_biased = (1.0 / (is * is) - eps).max(0.0);
        let rm = running_mean[ch].to_f64_lossy();
        let rv = running_var[ch].to_f64_lossy();
        running_mean[ch] =
            T::from_f64_lossy((1.0 - momentum) * rm + momentum * mean[ch].to_f64_lossy());
        running_var[ch] = T::from_f64_lossy((1.0 - momentum) * rv + momentum * var_biased * bessel);
    }
}

/// Training backward (batch statistics depend on `x`): overwrites `dx`, `dgamma`, `dbeta`.
///
/// With `x̂ = (x - mean)·invstd` and `M = N·HW`:
/// `dbeta = Σ dy`, `dgamma = Σ dy·x̂`,
/// `dx = gamma·invstd·(dy - dbeta/M - x̂·dgamma/M)`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_backward<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    mean: &[T],
    invstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    check_lengths("batchnorm2d_backward", n, c, hw, x, gamma, gamma);
    assert_eq!(mean.len(), c, "batchnorm2d_backward: mean length");
    assert_eq!(invstd.len(), c, "batchnorm2d_backward: invstd length");
    assert_eq!(dy.len(), x.len(), "batchnorm2d_backward: dy length");
    assert_eq!(dx.len(), x.len(), "batchnorm2d_backward: dx length");
    assert_eq!(dgamma.len(), c, "batchnorm2d_backward: dgamma length");
    assert_eq!(dbeta.len(), c, "batchnorm2d_backward: dbeta length");
    let count = (n * hw) as f64;
    let dx_ptr = SharedMutPtr(dx.as_mut_ptr());
    // As in the forward: a channel's reductions and then its dx, in one task, in cache.
    let sums: Vec<(f64, f64)> = per_channel(c, n * hw, |ch| {
        let m = mean[ch].to_f64_lossy();
        let (mut s_lanes, mut p_lanes) = ([0f64; LANES], [0f64; LANES]);
        for img in 0..n {
            let r = (img * c + ch) * hw..(img * c + ch + 1) * hw;
            accumulate_grads(&dy[r.clone()], &x[r], m, &mut s_lanes, &mut p_lanes);
        }
        let (sum_dy, sum_dy_xm): (f64, f64) = (s_lanes.iter().sum(), p_lanes.iter().sum());
        // dx = a·dy + b·(x - mean) + d (x - mean is exact-ish in T, so no cancellation when
        // |mean| ≫ std).
        let is = invstd[ch].to_f64_lossy();
        let k = gamma[ch].to_f64_lossy() * is;
        let a = T::from_f64_lossy(k);
        let b = T::from_f64_lossy(-k * is * is * sum_dy_xm / count);
        let d = T::from_f64_lossy(-k * sum_dy / count);
        let mt = mean[ch];
        for img in 0..n {
            let start = (img * c + ch) * hw;
            // SAFETY: plane `(img, ch)` lies inside `dx` (same length as `x`, asserted) and
            // only the task of channel `ch` writes it; `dx` stays exclusively borrowed until
            // `per_channel` returns.
            let dxp = unsafe { std::slice::from_raw_parts_mut(dx_ptr.get().add(start), hw) };
            let r = start..start + hw;
            for ((dxi, &dyi), &xi) in dxp.iter_mut().zip(&dy[r.clone()]).zip(&x[r]) {
                *dxi = a * dyi + b * (xi - mt) + d;
            }
        }
        (sum_dy, sum_dy_xm)
    });
    for ch in 0..c {
        let (sum_dy, sum_dy_xm) = sums[ch];
        dbeta[ch] = T::from_f64_lossy(sum_dy);
        dgamma[ch] = T::from_f64_lossy(sum_dy_xm * invstd[ch].to_f64_lossy());
    }
}

fn check_lengths<T>(op: &str, n: usize, c: usize, hw: usize, x: &[T], gamma: &[T], beta: &[T]) {
    assert_eq!(x.len(), n * c * hw, "{op}: x length");
    assert_eq!(gamma.len(), c, "{op}: gamma length");
    assert_eq!(beta.len(), c, "{op}: beta length");
}

/// Batch-norm statistics mode for [`Tape::batchnorm2d`].
pub enum BnMode<'a, T> {
    /// Normalize with batch statistics and update the running ones (PyTorch `train()`).
    Train {
        running_mean: &'a mut [T],
        running_var: &'a mut [T],
        momentum: f64,
    },
    /// Normalize with the running statistics (PyTorch `eval()`); not differentiable here:
    /// only allowed while gradients are disabled.
    Eval {
        running_mean: &'a [T],
        running_var: &'a [T],
    },
}

/// Batch-norm epsilon (PyTorch default).
pub const BN_EPS: f64 = 1e-5;

struct BatchNorm2dNode<T> {
    n: usize,
    c: usize,
    hw: usize,
    x: usize,
    y: usize,
    gamma: usize,
    beta: usize,
    mean: Vec<T>,
    invstd: Vec<T>,
}

impl<T: Float> TapeNode<T> for BatchNorm2dNode<T> {
    fn op(&self) -> &'static str {
        "batchnorm2d"
    }
    fn output(&self) -> usize {
        self.y
    }
    fn backward(&self, tape: &mut Tape<T>, grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>) {
        let (n, c, hw, x) = (self.n, self.c, self.hw, self.x);
        let mut dx = tape.pools.floats.take(n * c * hw);
        let mut gamma_value = tape.pools.floats.take(c);
        gamma_value.copy_from_slice(&grads.params[self.gamma].value);
        tape.write_param_grads(grads, self.gamma, Some(self.beta), |t, gg, gb| {
            batchnorm2d_backward(
                n,
                c,
                hw,
                t.value(x),
                &gamma_value,
                &self.mean,
                &self.invstd,
                dy,
                &mut dx,
                gg,
                gb.expect("beta grad"),
            )
        });
        tape.pools.floats.give(gamma_value);
        tape.unsave(x);
        if tape.requires_grad(x) {
            tape.deliver_grad(x, dx);
        } else {
            tape.pools.floats.give(dx);
        }
    }
    fn recycle(self: Box<Self>, pools: &mut Pools<T>) {
        pools.floats.give(self.mean);
        pools.floats.give(self.invstd);
    }
}

impl<T: Float> Tape<T> {
    /// Batch norm over channels of `x: [N, C, H, W]` with affine `gamma`, `beta`.
    pub fn batchnorm2d(
        &mut self,
        params: &[Param<T>],
        x: ValueId,
        gamma: usize,
        beta: usize,
        mode: BnMode<'_, T>,
    ) -> ValueId {
        let xs = self.shape(&x).to_vec();
        assert!(
            xs.len() == 4,
            "batchnorm2d expects [N, C, H, W], got {xs:?}"
        );
        let (n, c, hw) = (xs[0], xs[1], xs[2] * xs[3]);
        let record = self.record();
        let (g, b) = (&params[gamma].value, &params[beta].value);
        match mode {
            BnMode::Train {
                running_mean,
                running_var,
                momentum,
            } => {
                let mut mean = self.pools.floats.take(c);
                let mut invstd = self.pools.floats.take(c);
                let y = self.new_output(xs, |t, yd| {
                    let xd = t.value(x.0);
                    batchnorm2d_forward_train(
                        n,
                        c,
                        hw,
                        xd,
                        g,
                        b,
                        BN_EPS,
                        yd,
                        &mut mean,
                        &mut invstd,
                    )
                });
                batchnorm2d_update_running(
                    &mean,
                    &invstd,
                    BN_EPS,
                    n * hw,
                    momentum,
                    running_mean,
                    running_var,
                );
                let x = self.consume_input(x, record);
                if record {
                    self.note_param_use(gamma);
                    self.note_param_use(beta);
                    self.push_node(Box::new(BatchNorm2dNode {
                        n,
                        c,
                        hw,
                        x,
                        y,
                        gamma,
                        beta,
                        mean,
                        invstd,
                    }));
                } else {
                    self.pools.floats.give(mean);
                    self.pools.floats.give(invstd);
                }
                self.maybe_free_data(x);
                ValueId(y)
            }
            BnMode::Eval {
                running_mean,
                running_var,
            } => {
                assert!(
                    !record,
                    "eval-mode batch norm is not differentiable here: disable gradients"
                );
                let y = self.new_output(xs, |t, yd| {
                    batchnorm2d_forward_eval(
                        n,
                        c,
                        hw,
                        t.value(x.0),
                        g,
                        b,
                        running_mean,
                        running_var,
                        BN_EPS,
                        yd,
                    )
                });
                let x = self.consume_input(x, false);
                self.maybe_free_data(x);
                ValueId(y)
            }
        }
    }
}
