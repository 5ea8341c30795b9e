//! conv2d: general kernel/stride/padding; the implementation picks an algorithm per shape.
use crate::Float;

/// Geometry of a 2-D convolution over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeom {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2dGeom {
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
}

/// `y[n, co, oh, ow] = b[co] + Σ w[co, ci, i, j] · x[n, ci, oh*s+i-p, ow*s+j-p]`.
pub fn conv2d_forward<T: Float>(
    _g: &Conv2dGeom,
    _x: &[T],
    _w: &[T],
    _b: Option<&[T]>,
    _y: &mut [T],
) {
    todo!("ops helper")
}

/// `dx = ∂L/∂x` given `dy = ∂L/∂y` (overwrites `dx`).
pub fn conv2d_backward_data<T: Float>(_g: &Conv2dGeom, _dy: &[T], _w: &[T], _dx: &mut [T]) {
    todo!("ops helper")
}

/// `dw = ∂L/∂w` and, if given, `db = ∂L/∂b` (overwrites both).
pub fn conv2d_backward_weight<T: Float>(
    _g: &Conv2dGeom,
    _x: &[T],
    _dy: &[T],
    _dw: &mut [T],
    _db: Option<&mut [T]>,
) {
    todo!("ops helper")
}
