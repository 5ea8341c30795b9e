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
use super::batchnorm::{self, check_lengths, BnMode, BnSaved};
use super::SharedMutPtr;
use crate::autograd::{Param, Tape, ValueId};
use crate::Float;

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
    saved: &mut BnSaved<T>,
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
    saved: &BnSaved<T>,
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
    saved: &BnSaved<T>,
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
    saved: &BnSaved<T>,
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

impl<T: Float> Tape<T> {
    /// `relu(batchnorm2d(x))` over channels of `x: [N, C, H, W]` with affine `gamma`, `beta`,
    /// as one op (see the module docs; same results as [`Tape::batchnorm2d`] then
    /// [`Tape::relu`] up to rounding). Its node is batch norm's, with relu on.
    pub fn batchnorm2d_relu(
        &mut self,
        params: &[Param<T>],
        x: ValueId,
        gamma: usize,
        beta: usize,
        mode: BnMode<'_, T>,
    ) -> ValueId {
        self.batchnorm_op::<true>(params, x, gamma, beta, mode)
    }
}
