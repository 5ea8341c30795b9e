//! maxpool2d (kernel k, stride s, no padding) with recorded argmax for backward.
//! Both directions run in parallel over `(n, c)` planes, which are independent.
use super::{par_chunks_mut, units_per_task, SharedMutPtr};
use crate::autograd::{ParamGrads, Pools, Tape, TapeNode, ValueId};
use crate::tensor::numel;
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
    let argmax_ptr = SharedMutPtr(argmax.as_mut_ptr());
    par_chunks_mut(y, per_task * plane_out, |t, ys| {
        let first = t * per_task;
        let n_planes = ys.len() / plane_out;
        // SAFETY: the argmax range of this task's planes mirrors its `y` chunk: inside
        // `argmax` (same length as `y`, asserted) and disjoint from other tasks' ranges;
        // `argmax` stays exclusively borrowed until `par_chunks_mut` returns.
        let ap = unsafe {
            std::slice::from_raw_parts_mut(argmax_ptr.get().add(first * plane_out), ys.len())
        };
        let xs = &x[first * plane_in..(first + n_planes) * plane_in];
        if g.k == 2 && g.stride == 2 && g.h == 2 * oh {
            // Even height: the task's planes stack into one tall image of n_planes·oh output
            // rows (no per-plane overhead, which dominates for 2×2 and 4×4 planes).
            pool_rows_2x2(xs, g.w, oh, ow, n_planes * oh, ys, ap);
        } else {
            for j in 0..n_planes {
                let xp = &xs[j * plane_in..(j + 1) * plane_in];
                let (yp, app) = (
                    &mut ys[j * plane_out..(j + 1) * plane_out],
                    &mut ap[j * plane_out..(j + 1) * plane_out],
                );
                if g.k == 2 && g.stride == 2 {
                    pool_rows_2x2(xp, g.w, oh, ow, oh, yp, app);
                } else {
                    pool_plane(g, xp, oh, ow, yp, app);
                }
            }
        }
    });
}

/// Whether `v` replaces the running max `best`: strictly greater (so the first maximum in
/// row-major window order wins ties), or NaN (which propagates, as in PyTorch).
#[inline(always)]
fn takes<T: Float>(v: T, best: T) -> bool {
    v > best || v.is_nan()
}

/// General kernel/stride, one plane.
fn pool_plane<T: Float>(
    g: &Pool2dGeom,
    xp: &[T],
    oh: usize,
    ow: usize,
    yp: &mut [T],
    ap: &mut [u32],
) {
    for r in 0..oh {
        for c in 0..ow {
            let (r0, c0) = (r * g.stride, c * g.stride);
            let mut best = r0 * g.w + c0;
            let mut best_v = xp[best];
            for i in 0..g.k {
                let row = (r0 + i) * g.w + c0;
                for (jj, &v) in xp[row..row + g.k].iter().enumerate() {
                    if takes(v, best_v) {
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

/// The VGG case (2×2, stride 2): `rows` output rows of width `ow` from input rows of width
/// `w`, where output row `R` is row `R % oh` of its plane (a stack of planes with even height
/// is one tall image). Straight-line compares, no inner window loops.
fn pool_rows_2x2<T: Float>(
    xs: &[T],
    w: usize,
    oh: usize,
    ow: usize,
    rows: usize,
    ys: &mut [T],
    ap: &mut [u32],
) {
    for big_r in 0..rows {
        let top = &xs[2 * big_r * w..][..2 * ow];
        let bottom = &xs[(2 * big_r + 1) * w..][..2 * ow];
        let base = (2 * (big_r % oh) * w) as u32;
        let yr = &mut ys[big_r * ow..(big_r + 1) * ow];
        let ar = &mut ap[big_r * ow..(big_r + 1) * ow];
        for c in 0..ow {
            let (a, b, d, e) = (top[2 * c], top[2 * c + 1], bottom[2 * c], bottom[2 * c + 1]);
            // Window order a, b (top row) then d, e (bottom row). Selects, not branches:
            // which element wins is data-dependent and mispredicts on real activations.
            let c2 = 2 * c as u32;
            let (v, i) = (a, c2);
            let take = takes(b, v);
            let (v, i) = (if take { b } else { v }, if take { c2 + 1 } else { i });
            let take = takes(d, v);
            let (v, i) = (
                if take { d } else { v },
                if take { w as u32 + c2 } else { i },
            );
            let take = takes(e, v);
            let (v, i) = (
                if take { e } else { v },
                if take { w as u32 + c2 + 1 } else { i },
            );
            yr[c] = v;
            ar[c] = base + i;
        }
    }
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
        // One fill per task, not per plane (planes can be 4 elements).
        dx.fill(T::zero());
        for (j, dxp) in dx.chunks_mut(plane_in).enumerate() {
            let p = t * per_task + j;
            let range = p * plane_out..(p + 1) * plane_out;
            for (&a, &d) in argmax[range.clone()].iter().zip(&dy[range]) {
                dxp[a as usize] += d;
            }
        }
    });
}

struct MaxPool2dNode {
    geom: Pool2dGeom,
    x: usize,
    y: usize,
    argmax: Vec<u32>,
}

impl<T: Float> TapeNode<T> for MaxPool2dNode {
    fn op(&self) -> &'static str {
        "maxpool2d"
    }
    fn output(&self) -> usize {
        self.y
    }
    fn backward(&self, tape: &mut Tape<T>, _grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>) {
        if tape.requires_grad(self.x) {
            tape.accumulate(self.x, |_, g| {
                maxpool2d_backward(&self.geom, dy, &self.argmax, g)
            });
        }
    }
    fn recycle(self: Box<Self>, pools: &mut Pools<T>) {
        pools.indices.give(self.argmax);
    }
}

impl<T: Float> Tape<T> {
    /// Max pooling with a `k×k` window and the given stride, no padding.
    pub fn maxpool2d(&mut self, x: ValueId, k: usize, stride: usize) -> ValueId {
        let xs = self.shape(&x);
        assert!(xs.len() == 4, "maxpool2d expects [N, C, H, W], got {xs:?}");
        let geom = Pool2dGeom {
            n: xs[0],
            c: xs[1],
            h: xs[2],
            w: xs[3],
            k,
            stride,
        };
        let out_shape = vec![geom.n, geom.c, geom.out_h(), geom.out_w()];
        let mut argmax = self.pools.indices.take(numel(&out_shape));
        let y = self.new_output(out_shape, |t, yd| {
            maxpool2d_forward(&geom, t.value(x.0), yd, &mut argmax)
        });
        let record = self.record();
        let x = self.consume_input(x, false);
        if record {
            self.push_node(Box::new(MaxPool2dNode { geom, x, y, argmax }));
        } else {
            self.pools.indices.give(argmax);
        }
        self.maybe_free_data(x);
        ValueId(y)
    }
}
