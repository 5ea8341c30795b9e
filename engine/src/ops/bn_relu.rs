//! Fused batch norm + relu (`relu(batchnorm2d(x))`, VGG's block after every conv): one op,
//! one pass over memory for the normalization and the relu, no intermediate tensor.
//!
//! Forward: the batch statistics pass, then `z = max(affine(x), 0)` written once (the kernels
//! of [`super::batchnorm`] with relu on). Backward folds relu's backward into batch norm's:
//! the relu mask `affine(x) > 0` is recomputed from the saved `x` with the forward's own
//! per-channel coefficients (bit for bit the forward's values, so the mask is exactly
//! `z > 0`) — so the op saves only `x` (which batch norm's backward needs anyway), never `z`:
//! when `z` feeds a max-pool, its buffer is recycled right after the pool's forward. `dx` is
//! written over `dz` in place.
use super::batchnorm::{self, check_lengths, Affine, BnMode, BN_EPS};
use super::SharedMutPtr;
use crate::autograd::{Param, ParamGrads, Tape, TapeNode, ValueId};
use crate::Float;

/// What a training forward keeps for backward, per channel: the affine map it applied, the
/// batch mean (as `T`) and `invstd = 1/sqrt(var_biased + eps)`.
#[derive(Clone, Debug, Default)]
pub struct BnReluSaved<T> {
    pub(crate) affine: Vec<Affine<T>>,
    pub(crate) mean: Vec<T>,
    pub(crate) invstd: Vec<T>,
}

impl<T: Float> BnReluSaved<T> {
    pub fn new() -> Self {
        BnReluSaved {
            affine: Vec::new(),
            mean: Vec::new(),
            invstd: Vec::new(),
        }
    }
    /// Keeps per-channel `(mean, invstd, affine)` as a training forward computed them.
    pub(crate) fn set(&mut self, stats: &[(f64, f64, Affine<T>)]) {
        self.affine.clear();
        self.mean.clear();
        self.invstd.clear();
        for &(mean, invstd, affine) in stats {
            self.affine.push(affine);
            self.mean.push(T::from_f64_lossy(mean));
            self.invstd.push(T::from_f64_lossy(invstd));
        }
    }
    /// The batch mean per channel.
    pub fn mean(&self) -> &[T] {
        &self.mean
    }
    /// `1/sqrt(var_biased + eps)` per channel.
    pub fn invstd(&self) -> &[T] {
        &self.invstd
    }
}

/// Training forward of `relu(batchnorm2d(x))` (batch statistics, biased variance): writes
/// `z` and what backward needs into `saved` (its `mean`/`invstd` feed
/// [`super::batchnorm2d_update_running`]).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_forward_train<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
    z: &mut [T],
    saved: &mut BnReluSaved<T>,
) {
    let stats = batchnorm::forward_train::<T, true>(n, c, hw, x, gamma, beta, eps, z);
    saved.set(&stats);
}

/// Eval forward of `relu(batchnorm2d(x))` with running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_forward_eval<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
    z: &mut [T],
) {
    batchnorm::forward_eval::<T, true>(n, c, hw, x, gamma, beta, running_mean, running_var, eps, z)
}

/// Training backward of `relu(batchnorm2d(x))` from `dz`: overwrites `dx`, `dgamma`, `dbeta`.
/// `x`, `gamma` and `saved` are the forward's.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_backward<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    saved: &BnReluSaved<T>,
    dz: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    assert_eq!(dz.len(), x.len(), "batchnorm2d_relu_backward: dz length");
    assert_eq!(dx.len(), x.len(), "batchnorm2d_relu_backward: dx length");
    // The cast is sound: `dz` is only read (it does not alias `dx`).
    let dz_ptr = SharedMutPtr(dz.as_ptr() as *mut T);
    let dx_ptr = SharedMutPtr(dx.as_mut_ptr());
    backward(n, c, hw, x, gamma, saved, &dz_ptr, &dx_ptr, dgamma, dbeta);
}

/// [`batchnorm2d_relu_backward`] writing `dx` over `dz` (no second activation-sized buffer).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_backward_in_place<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    saved: &BnReluSaved<T>,
    dz_then_dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    assert_eq!(
        dz_then_dx.len(),
        x.len(),
        "batchnorm2d_relu_backward_in_place: dz length"
    );
    let ptr = SharedMutPtr(dz_then_dx.as_mut_ptr());
    backward(n, c, hw, x, gamma, saved, &ptr, &ptr, dgamma, dbeta);
}

#[allow(clippy::too_many_arguments)]
fn backward<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    saved: &BnReluSaved<T>,
    dz: &SharedMutPtr<T>,
    dx: &SharedMutPtr<T>,
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    check_lengths("batchnorm2d_relu_backward", n, c, hw, x, gamma, gamma);
    assert!(
        saved.affine.len() == c && saved.invstd.len() == c,
        "batchnorm2d_relu_backward: saved statistics are for another channel count"
    );
    let sums =
        batchnorm::backward::<T, true>(n, c, hw, x, gamma, &saved.affine, &saved.invstd, dz, dx);
    batchnorm::write_param_grads(&sums, &saved.invstd, dgamma, dbeta);
}

struct BnReluNode<T> {
    n: usize,
    c: usize,
    hw: usize,
    x: usize,
    z: usize,
    gamma: usize,
    beta: usize,
    saved: BnReluSaved<T>,
}

impl<T: Float> TapeNode<T> for BnReluNode<T> {
    fn op(&self) -> &'static str {
        "batchnorm2d_relu"
    }
    fn output(&self) -> usize {
        self.z
    }
    fn backward(&self, tape: &mut Tape<T>, grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>) {
        let (n, c, hw, x) = (self.n, self.c, self.hw, self.x);
        let mut gamma_value = tape.pools.floats.take(c);
        gamma_value.copy_from_slice(&grads.params[self.gamma].value);
        tape.write_param_grads(grads, self.gamma, Some(self.beta), |t, gg, gb| {
            batchnorm2d_relu_backward_in_place(
                n,
                c,
                hw,
                t.value(x),
                &gamma_value,
                &self.saved,
                dy,
                gg,
                gb.expect("beta grad"),
            )
        });
        tape.pools.floats.give(gamma_value);
        tape.unsave(x);
        if tape.requires_grad(x) {
            tape.deliver_grad(x, std::mem::take(dy));
        }
    }
}

impl<T: Float> Tape<T> {
    /// `relu(batchnorm2d(x))` over channels of `x: [N, C, H, W]` with affine `gamma`, `beta`,
    /// as one op (see the module docs; same results as [`Tape::batchnorm2d`] then
    /// [`Tape::relu`] up to rounding).
    pub fn batchnorm2d_relu(
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
            "batchnorm2d_relu expects [N, C, H, W], got {xs:?}"
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
                let mut saved = BnReluSaved::new();
                let z = self.new_output(xs, |t, zd| {
                    batchnorm2d_relu_forward_train(
                        n,
                        c,
                        hw,
                        t.value(x.0),
                        g,
                        b,
                        BN_EPS,
                        zd,
                        &mut saved,
                    )
                });
                super::batchnorm2d_update_running(
                    &saved.mean,
                    &saved.invstd,
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
                    self.push_node(Box::new(BnReluNode {
                        n,
                        c,
                        hw,
                        x,
                        z,
                        gamma,
                        beta,
                        saved,
                    }));
                }
                self.maybe_free_data(x);
                ValueId(z)
            }
            BnMode::Eval {
                running_mean,
                running_var,
            } => {
                assert!(
                    !record,
                    "eval-mode batch norm is not differentiable here: disable gradients"
                );
                let z = self.new_output(xs, |t, zd| {
                    batchnorm2d_relu_forward_eval(
                        n,
                        c,
                        hw,
                        t.value(x.0),
                        g,
                        b,
                        running_mean,
                        running_var,
                        BN_EPS,
                        zd,
                    )
                });
                let x = self.consume_input(x, false);
                self.maybe_free_data(x);
                ValueId(z)
            }
        }
    }
}
