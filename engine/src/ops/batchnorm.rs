//! batchnorm2d over `[N, C, HW]`: training (batch statistics, biased variance) and eval
//! (running statistics). Statistics are accumulated in f64.
use crate::Float;

/// Training forward: normalizes with the batch mean and biased variance; writes the per-channel
/// `mean` and `invstd = 1/sqrt(var_biased + eps)` that backward needs.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward_train<T: Float>(
    _n: usize,
    _c: usize,
    _hw: usize,
    _x: &[T],
    _gamma: &[T],
    _beta: &[T],
    _eps: f64,
    _y: &mut [T],
    _mean: &mut [T],
    _invstd: &mut [T],
) {
    todo!("ops helper")
}

/// Eval forward with running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward_eval<T: Float>(
    _n: usize,
    _c: usize,
    _hw: usize,
    _x: &[T],
    _gamma: &[T],
    _beta: &[T],
    _running_mean: &[T],
    _running_var: &[T],
    _eps: f64,
    _y: &mut [T],
) {
    todo!("ops helper")
}

/// PyTorch's running-stat update: `r = (1-m)·r + m·batch`, with the *unbiased* batch variance
/// (`count = N·HW` elements per channel; `mean`/`invstd` as written by the training forward).
pub fn batchnorm2d_update_running<T: Float>(
    _mean: &[T],
    _invstd: &[T],
    _eps: f64,
    _count: usize,
    _momentum: f64,
    _running_mean: &mut [T],
    _running_var: &mut [T],
) {
    todo!("ops helper")
}

/// Training backward (batch statistics depend on `x`): overwrites `dx`, `dgamma`, `dbeta`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_backward<T: Float>(
    _n: usize,
    _c: usize,
    _hw: usize,
    _x: &[T],
    _gamma: &[T],
    _mean: &[T],
    _invstd: &[T],
    _dy: &[T],
    _dx: &mut [T],
    _dgamma: &mut [T],
    _dbeta: &mut [T],
) {
    todo!("ops helper")
}
