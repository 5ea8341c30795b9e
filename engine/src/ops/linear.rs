//! linear: `y[n, o] = b[o] + Σ_i x[n, i] · w[o, i]` (PyTorch's `[out, in]` weight).
use crate::Float;

#[allow(clippy::too_many_arguments)]
pub fn linear_forward<T: Float>(
    _n: usize,
    _d_in: usize,
    _d_out: usize,
    _x: &[T],
    _w: &[T],
    _b: Option<&[T]>,
    _y: &mut [T],
) {
    todo!("ops helper")
}

/// Overwrites `dx` (if given), `dw`, `db` (if given).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Float>(
    _n: usize,
    _d_in: usize,
    _d_out: usize,
    _x: &[T],
    _w: &[T],
    _dy: &[T],
    _dx: Option<&mut [T]>,
    _dw: &mut [T],
    _db: Option<&mut [T]>,
) {
    todo!("ops helper")
}
