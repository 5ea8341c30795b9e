//! maxpool2d (kernel k, stride s, no padding) with recorded argmax for backward.
//! Both directions run in parallel over `(n, c)` planes, which are independent.
use super::{par_chunks_mut, units_per_task};
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

/// Elements per parallel task at least (see relu).
const MIN_TASK_ELEMS: usize = 1 << 14;

/// Forward; `argmax[o]` is the index within the input plane (`ih*w + iw`) of output `o`'s max
/// (first max wins on ties, as PyTorch).
pub fn maxpool2d_forward<T: Float>(g: &Pool2dGeom, x: &[T], y: &mut [T], argmax: &mut [u32]) {
    let (plane_in, oh, ow) = (g.h * g.w, g.out_h(), g.out_w());
    let plane_out = oh * ow;
    let planes = g.n * g.c;
    assert_eq!(x.len(), planes * plane_in, "maxpool2d_forward: x length");
    assert_eq!(y.len(), planes * plane_out, "maxpool2d_forward: y length");
    assert_eq!(argmax.len(), y.len(), "maxpool2d_forward: argmax length");
    let per_task = units_per_task(planes, plane_in, MIN_TASK_ELEMS);
    // Pair each output plane with its argmax plane so one task owns both.
    let mut pairs: Vec<(&mut [T], &mut [u32])> = y
        .chunks_mut(plane_out)
        .zip(argmax.chunks_mut(plane_out))
        .collect();
    par_chunks_mut(&mut pairs, per_task, |t, pairs| {
        for (j, (yp, ap)) in pairs.iter_mut().enumerate() {
            let p = t * per_task + j;
            let xp = &x[p * plane_in..(p + 1) * plane_in];
            for r in 0..oh {
                for c in 0..ow {
                    let (r0, c0) = (r * g.stride, c * g.stride);
                    let mut best = r0 * g.w + c0;
                    let mut best_v = xp[best];
                    for i in 0..g.k {
                        let row = (r0 + i) * g.w + c0;
                        for (jj, &v) in xp[row..row + g.k].iter().enumerate() {
                            // Strictly greater: the first maximum in row-major window order
                            // wins; NaN propagates like PyTorch (a NaN is always taken).
                            if v > best_v || (v.is_nan() && !best_v.is_nan()) {
                                best_v = v;
                                best = row + jj;
                            }
                        }
                    }
                    yp[r * ow + c] = best_v;
                    ap[r * ow + c] = best as u32;
                }
            }
        }
    });
}

/// Backward: routes each `dy` to its argmax (overwrites `dx`). Windows may overlap when
/// `stride < k`, so contributions are summed.
pub fn maxpool2d_backward<T: Float>(g: &Pool2dGeom, dy: &[T], argmax: &[u32], dx: &mut [T]) {
    let plane_in = g.h * g.w;
    let plane_out = g.out_h() * g.out_w();
    let planes = g.n * g.c;
    assert_eq!(dx.len(), planes * plane_in, "maxpool2d_backward: dx length");
    assert_eq!(
        dy.len(),
        planes * plane_out,
        "maxpool2d_backward: dy length"
    );
    assert_eq!(argmax.len(), dy.len(), "maxpool2d_backward: argmax length");
    let per_task = units_per_task(planes, plane_in, MIN_TASK_ELEMS);
    par_chunks_mut(dx, per_task * plane_in, |t, dx| {
        for (j, dxp) in dx.chunks_mut(plane_in).enumerate() {
            let p = t * per_task + j;
            dxp.fill(T::zero());
            let range = p * plane_out..(p + 1) * plane_out;
            for (&a, &d) in argmax[range.clone()].iter().zip(&dy[range]) {
                dxp[a as usize] += d;
            }
        }
    });
}
