//! maxpool2d (kernel k, stride s, no padding) with recorded argmax for backward.
use crate::Float;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pool2dGeom {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub k: usize,
    pub stride: usize,
}

impl Pool2dGeom {
    pub fn out_h(&self) -> usize {
        (self.h - self.k) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w - self.k) / self.stride + 1
    }
}

/// Forward; `argmax[o]` is the index within the input plane (`ih*w + iw`) of output `o`'s max
/// (first max wins on ties, as PyTorch).
pub fn maxpool2d_forward<T: Float>(_g: &Pool2dGeom, _x: &[T], _y: &mut [T], _argmax: &mut [u32]) {
    todo!("ops helper")
}

/// Backward: routes each `dy` to its argmax (overwrites `dx`).
pub fn maxpool2d_backward<T: Float>(_g: &Pool2dGeom, _dy: &[T], _argmax: &[u32], _dx: &mut [T]) {
    todo!("ops helper")
}
