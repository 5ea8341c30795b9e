//! maxpool2d (kernel k, stride s, no padding) with the position of each window's maximum
//! recorded for backward as one byte: its index in the window in row-major order
//! (`i·k + j`, so `k <= 16`). Both directions run in parallel over `(n, c)` planes, which
//! are independent.
//!
//! The VGG case (2×2, stride 2) is vectorized ([`FloatVec`]): a vector of output columns
//! comes from two rows of input columns split into even and odd lanes
//! ([`FloatVec::deinterleave`]), compared in window order; backward writes each input row
//! pair in full (the gradient or 0 per lane, interleaved back), with no scatter and no fill.
//! Planes of even height are processed as one tall image (no per-plane overhead, which
//! dominates for 2×2 and 4×4 planes). Narrow rows (fewer outputs than half a vector) and
//! other window shapes use a scalar loop.
use super::{par_chunks_mut, units_per_task, SharedMutPtr};
use crate::autograd::{ParamGrads, Pools, Tape, TapeNode, ValueId};
use crate::simd::{FloatVec, VecKernel};
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
    /// Panics unless the window fits the plane and its positions fit a byte.
    fn check(&self, op: &str) {
        assert!(
            self.k >= 1 && self.k <= 16 && self.stride >= 1 && self.k <= self.h && self.k <= self.w,
            "{op}: window {0}x{0} / stride {1} on {2}x{3} planes (windows up to 16x16)",
            self.k,
            self.stride,
            self.h,
            self.w
        );
    }
    /// 2×2 windows with stride 2 (the vectorized case).
    fn is_2x2(&self) -> bool {
        self.k == 2 && self.stride == 2
    }
}

/// Elements per parallel task at least (see relu).
const MIN_TASK_ELEMS: usize = 1 << 14;

/// Forward; `argmax[o]` is the position of output `o`'s maximum in its window (`i·k + j`;
/// first maximum in row-major window order wins on ties, as PyTorch; NaN propagates).
pub fn maxpool2d_forward<T: Float>(g: &Pool2dGeom, x: &[T], y: &mut [T], argmax: &mut [u8]) {
    g.check("maxpool2d_forward");
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
        if g.is_2x2() && g.h == 2 * oh {
            // Even height: the task's planes stack into one tall image of n_planes·oh rows.
            T::run(Pool2x2 {
                x: xs,
                w: g.w,
                ow,
                rows: n_planes * oh,
                y: ys,
                argmax: ap,
            });
        } else {
            for j in 0..n_planes {
                let xp = &xs[j * plane_in..(j + 1) * plane_in];
                let (yp, app) = (
                    &mut ys[j * plane_out..(j + 1) * plane_out],
                    &mut ap[j * plane_out..(j + 1) * plane_out],
                );
                if g.is_2x2() {
                    T::run(Pool2x2 {
                        x: xp,
                        w: g.w,
                        ow,
                        rows: oh,
                        y: yp,
                        argmax: app,
                    });
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
pub(crate) fn takes<T: Float>(v: T, best: T) -> bool {
    v > best || v.is_nan()
}

/// General kernel/stride, one plane.
fn pool_plane<T: Float>(
    g: &Pool2dGeom,
    xp: &[T],
    oh: usize,
    ow: usize,
    yp: &mut [T],
    ap: &mut [u8],
) {
    for r in 0..oh {
        for c in 0..ow {
            let (r0, c0) = (r * g.stride, c * g.stride);
            let (mut best, mut best_v) = (0, xp[r0 * g.w + c0]);
            for i in 0..g.k {
                let row = (r0 + i) * g.w + c0;
                for (j, &v) in xp[row..row + g.k].iter().enumerate() {
                    if takes(v, best_v) {
                        best_v = v;
                        best = i * g.k + j;
                    }
                }
            }
            yp[r * ow + c] = best_v;
            ap[r * ow + c] = best as u8;
        }
    }
}

/// 2×2 / stride 2 over `rows` output rows of width `ow`: output row `R` reads input rows
/// `2R` and `2R + 1` of width `w` (a stack of even-height planes is one tall image).
struct Pool2x2<'a, T> {
    x: &'a [T],
    w: usize,
    ow: usize,
    rows: usize,
    y: &'a mut [T],
    argmax: &'a mut [u8],
}

impl<T: Float> VecKernel<T> for Pool2x2<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) {
        let (w, ow, l) = (self.w, self.ow, V::LANES);
        assert!(
            2 * ow <= w && (self.rows == 0 || (2 * self.rows - 1) * w + 2 * ow <= self.x.len())
        );
        assert!(self.y.len() == self.rows * ow && self.argmax.len() == self.y.len());
        if !vector_rows(ow, l) {
            return pool_rows_2x2_scalar(self.x, w, ow, self.rows, self.y, self.argmax);
        }
        let (i1, i2, i3) = (
            V::splat(T::one()),
            V::splat(T::from_f64_lossy(2.0)),
            V::splat(T::from_f64_lossy(3.0)),
        );
        let (xp, yp, ap) = (
            self.x.as_ptr(),
            self.y.as_mut_ptr(),
            self.argmax.as_mut_ptr(),
        );
        for st in Steps::new(w, ow, self.rows, l, 0, 0) {
            // SAFETY: a step's inputs lie inside its rows (2·ow <= w) and inside `x`
            // (asserted); its outputs inside `y` and `argmax`.
            unsafe {
                let [a, b, d, e] = load_corners::<V>(xp, &st, w);
                let (best, idx) = (a, V::zero());
                let (best, idx) = take_if_larger(b, i1, best, idx);
                let (best, idx) = take_if_larger(d, i2, best, idx);
                let (best, idx) = take_if_larger(e, i3, best, idx);
                store_outputs(yp, ap, &st, best, idx);
            }
        }
    }
}

/// One vector step of a 2×2 / stride-2 pass: `m <= LANES` consecutive outputs from `out`
/// (row-major, `ow` per row), whose windows' top-row inputs are `n_lo` values at `top_lo`
/// followed by `n_hi` values at `top_hi` (`2m` in all; each window's bottom row is one input
/// row further). Rows of at least a vector of inputs are cut into steps; rows of exactly
/// half a vector are taken two at a time (`top_hi` is then the next row pair's top row), and
/// rows of a quarter vector four at a time (`quarter`: four whole row pairs, one vector each,
/// from `top_lo`), so no step is half empty.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Step {
    pub(crate) quarter: bool,
    pub(crate) top_lo: usize,
    pub(crate) n_lo: usize,
    pub(crate) top_hi: usize,
    pub(crate) n_hi: usize,
    pub(crate) out: usize,
    pub(crate) m: usize,
}

/// The [`Step`]s over `rows` output rows of width `ow` (input rows of width `w`), for
/// vectors of `l` lanes, with inputs from `in_base` and outputs from `out_base`. Needs
/// [`vector_rows`] (narrower rows use scalar loops).
pub(crate) struct Steps {
    w: usize,
    ow: usize,
    rows: usize,
    l: usize,
    in_base: usize,
    out_base: usize,
    r: usize,
    c: usize,
}

impl Steps {
    #[inline(always)]
    pub(crate) fn new(
        w: usize,
        ow: usize,
        rows: usize,
        l: usize,
        in_base: usize,
        out_base: usize,
    ) -> Self {
        debug_assert!(vector_rows(ow, l));
        Steps {
            w,
            ow,
            rows,
            l,
            in_base,
            out_base,
            r: 0,
            c: 0,
        }
    }
}

impl Iterator for Steps {
    type Item = Step;
    #[inline(always)]
    fn next(&mut self) -> Option<Step> {
        let (w, ow, l, r) = (self.w, self.ow, self.l, self.r);
        if r >= self.rows {
            return None;
        }
        let top = self.in_base + 2 * r * w;
        if 4 * ow == l && r + 3 < self.rows {
            self.r += 4;
            return Some(Step {
                quarter: true,
                top_lo: top,
                n_lo: l,
                top_hi: top,
                n_hi: 0,
                out: self.out_base + r * ow,
                m: l,
            });
        }
        if 2 * ow == l && r + 1 < self.rows {
            self.r += 2;
            return Some(Step {
                quarter: false,
                top_lo: top,
                n_lo: l,
                top_hi: top + 2 * w,
                n_hi: l,
                out: self.out_base + r * ow,
                m: l,
            });
        }
        let m = (ow - self.c).min(l);
        let top_lo = top + 2 * self.c;
        let step = Step {
            quarter: false,
            top_lo,
            n_lo: (2 * m).min(l),
            top_hi: top_lo + l,
            n_hi: (2 * m).saturating_sub(l),
            out: self.out_base + r * ow + self.c,
            m,
        };
        self.c += m;
        if self.c == ow {
            self.c = 0;
            self.r += 1;
        }
        Some(step)
    }
}

/// Whether rows of `ow` outputs take the vector path with `l` lanes (else a scalar loop).
#[inline(always)]
pub(crate) fn vector_rows(ow: usize, l: usize) -> bool {
    2 * ow >= l || 4 * ow == l
}

/// A step's window corners in window order (top-left, top-right, bottom-left,
/// bottom-right), one lane per output.
///
/// # Safety
/// The step's inputs must be readable from `x`.
#[inline(always)]
pub(crate) unsafe fn load_corners<V: FloatVec>(x: *const V::Elem, st: &Step, w: usize) -> [V; 4] {
    let l = V::LANES;
    // SAFETY: forwarded; empty loads are skipped.
    unsafe {
        if st.quarter {
            // Four row pairs `[top | bottom]`, a vector each: even/odd lanes give
            // `[top0, bottom0, top1, bottom1]` quarters, even/odd quarters then give rows.
            let p = x.add(st.top_lo);
            let (e01, o01) = V::deinterleave(V::load(p), V::load(p.add(l)));
            let (e23, o23) = V::deinterleave(V::load(p.add(2 * l)), V::load(p.add(3 * l)));
            let (a, d) = V::deinterleave_quarters(e01, e23);
            let (b, e) = V::deinterleave_quarters(o01, o23);
            return [a, b, d, e];
        }
        let (a, b) = V::deinterleave(
            load_or_zero(x, st.top_lo, st.n_lo),
            load_or_zero(x, st.top_hi, st.n_hi),
        );
        let (d, e) = V::deinterleave(
            load_or_zero(x, st.top_lo + w, st.n_lo),
            load_or_zero(x, st.top_hi + w, st.n_hi),
        );
        [a, b, d, e]
    }
}

/// `n` values at `x + at` (zeros past them), or zeros when `n == 0` (no memory access).
///
/// # Safety
/// `x + at .. x + at + n` must be readable.
#[inline(always)]
unsafe fn load_or_zero<V: FloatVec>(x: *const V::Elem, at: usize, n: usize) -> V {
    if n == 0 {
        return V::zero();
    }
    // SAFETY: forwarded.
    unsafe { V::load_n(x.add(at), n) }
}

/// The inverse of [`load_corners`]: the input vectors whose corners are `c`, each with its
/// offset and length (`(_, 0, _)` entries are empty).
#[inline(always)]
pub(crate) fn spread_corners<V: FloatVec>(
    st: &Step,
    w: usize,
    c: [V; 4],
) -> [(usize, usize, V); 4] {
    let l = V::LANES;
    if st.quarter {
        let (e01, e23) = V::interleave_quarters(c[0], c[2]);
        let (o01, o23) = V::interleave_quarters(c[1], c[3]);
        let (v0, v1) = V::interleave(e01, o01);
        let (v2, v3) = V::interleave(e23, o23);
        let p = st.top_lo;
        return [
            (p, l, v0),
            (p + l, l, v1),
            (p + 2 * l, l, v2),
            (p + 3 * l, l, v3),
        ];
    }
    let (top_lo, top_hi) = V::interleave(c[0], c[1]);
    let (bot_lo, bot_hi) = V::interleave(c[2], c[3]);
    [
        (st.top_lo, st.n_lo, top_lo),
        (st.top_hi, st.n_hi, top_hi),
        (st.top_lo + w, st.n_lo, bot_lo),
        (st.top_hi + w, st.n_hi, bot_hi),
    ]
}

/// Stores a step's maxima and window positions.
///
/// # Safety
/// The step's outputs must be writable in `y` and `argmax`.
#[inline(always)]
pub(crate) unsafe fn store_outputs<V: FloatVec>(
    y: *mut V::Elem,
    argmax: *mut u8,
    st: &Step,
    best: V,
    idx: V,
) {
    // SAFETY: forwarded.
    unsafe {
        best.store_n(y.add(st.out), st.m);
        if st.m == V::LANES {
            idx.store_u8(argmax.add(st.out));
        } else {
            idx.store_u8_partial(argmax.add(st.out), st.m);
        }
    }
}

/// A step's pooled gradient and window positions.
///
/// # Safety
/// The step's outputs must be readable in `dy` and `argmax`.
#[inline(always)]
pub(crate) unsafe fn load_outputs<V: FloatVec>(
    dy: *const V::Elem,
    argmax: *const u8,
    st: &Step,
) -> (V, V) {
    // SAFETY: forwarded.
    unsafe {
        let g = V::load_n(dy.add(st.out), st.m);
        let at = if st.m == V::LANES {
            V::load_u8(argmax.add(st.out))
        } else {
            V::load_u8_partial(argmax.add(st.out), st.m)
        };
        (g, at)
    }
}

/// The running window maximum `(best, idx)` after candidate `v` at window position `i`:
/// `v` wins if strictly greater or NaN (see [`takes`]).
#[inline(always)]
pub(crate) fn take_if_larger<V: FloatVec>(v: V, i: V, best: V, idx: V) -> (V, V) {
    let t = V::mask_or(v.gt(best), v.is_nan());
    (V::select(t, v, best), V::select(t, i, idx))
}

/// The scalar 2×2 loop (rows narrower than a vector), same layout as [`Pool2x2`].
fn pool_rows_2x2_scalar<T: Float>(
    xs: &[T],
    w: usize,
    ow: usize,
    rows: usize,
    ys: &mut [T],
    ap: &mut [u8],
) {
    for r in 0..rows {
        let top = &xs[2 * r * w..][..2 * ow];
        let bottom = &xs[(2 * r + 1) * w..][..2 * ow];
        let yr = &mut ys[r * ow..(r + 1) * ow];
        let ar = &mut ap[r * ow..(r + 1) * ow];
        for c in 0..ow {
            // Window order a, b (top row) then d, e (bottom row). Selects, not branches:
            // which element wins is data-dependent and mispredicts on real activations.
            let cands = [top[2 * c + 1], bottom[2 * c], bottom[2 * c + 1]];
            let (mut v, mut i) = (top[2 * c], 0u8);
            for (k, cand) in cands.into_iter().enumerate() {
                let t = takes(cand, v);
                v = if t { cand } else { v };
                i = if t { k as u8 + 1 } else { i };
            }
            yr[c] = v;
            ar[c] = i;
        }
    }
}

/// Backward: routes each `dy` to its window's maximum (overwrites `dx`). Windows may overlap
/// when `stride < k`, so contributions are summed.
pub fn maxpool2d_backward<T: Float>(g: &Pool2dGeom, dy: &[T], argmax: &[u8], dx: &mut [T]) {
    g.check("maxpool2d_backward");
    let plane_in = g.h * g.w;
    let (oh, ow) = (g.out_h(), g.out_w());
    let plane_out = oh * ow;
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
        let first = t * per_task;
        let n_planes = dx.len() / plane_in;
        let outs = first * plane_out..(first + n_planes) * plane_out;
        let (dy, am) = (&dy[outs.clone()], &argmax[outs]);
        if g.is_2x2() {
            // Rows/columns no window covers (odd sizes) get no write below.
            if g.h != 2 * oh || g.w != 2 * ow {
                dx.fill(T::zero());
            }
            if g.h == 2 * oh {
                T::run(Unpool2x2 {
                    dy,
                    argmax: am,
                    w: g.w,
                    ow,
                    rows: n_planes * oh,
                    dx,
                });
            } else {
                for (j, dxp) in dx.chunks_mut(plane_in).enumerate() {
                    let o = j * plane_out..(j + 1) * plane_out;
                    T::run(Unpool2x2 {
                        dy: &dy[o.clone()],
                        argmax: &am[o],
                        w: g.w,
                        ow,
                        rows: oh,
                        dx: dxp,
                    });
                }
            }
            return;
        }
        // One fill per task, not per plane (planes can be 4 elements).
        dx.fill(T::zero());
        for (j, dxp) in dx.chunks_mut(plane_in).enumerate() {
            for r in 0..oh {
                for c in 0..ow {
                    let o = j * plane_out + r * ow + c;
                    let (i, jj) = (am[o] as usize / g.k, am[o] as usize % g.k);
                    dxp[(r * g.stride + i) * g.w + c * g.stride + jj] += dy[o];
                }
            }
        }
    });
}

/// 2×2 / stride 2 backward over `rows` output rows (layout as [`Pool2x2`]): writes input
/// columns `0 .. 2·ow` of every row pair (the gradient at the recorded position, else 0).
struct Unpool2x2<'a, T> {
    dy: &'a [T],
    argmax: &'a [u8],
    w: usize,
    ow: usize,
    rows: usize,
    dx: &'a mut [T],
}

impl<T: Float> VecKernel<T> for Unpool2x2<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) {
        let (w, ow, l) = (self.w, self.ow, V::LANES);
        assert!(
            2 * ow <= w && (self.rows == 0 || (2 * self.rows - 1) * w + 2 * ow <= self.dx.len())
        );
        assert!(self.dy.len() == self.rows * ow && self.argmax.len() == self.dy.len());
        if !vector_rows(ow, l) {
            return unpool_rows_2x2_scalar(self.dy, self.argmax, w, ow, self.rows, self.dx);
        }
        let idx: [V; 4] = [
            V::zero(),
            V::splat(T::one()),
            V::splat(T::from_f64_lossy(2.0)),
            V::splat(T::from_f64_lossy(3.0)),
        ];
        let (dyp, ap, dxp) = (self.dy.as_ptr(), self.argmax.as_ptr(), self.dx.as_mut_ptr());
        for st in Steps::new(w, ow, self.rows, l, 0, 0) {
            // SAFETY: a step's outputs lie inside `dy` and `argmax`, its inputs inside its
            // rows and `dx` (asserted).
            unsafe {
                let (g, at) = load_outputs::<V>(dyp, ap, &st);
                let z = V::zero();
                let (p0, p1) = (
                    V::select(at.eq(idx[0]), g, z),
                    V::select(at.eq(idx[1]), g, z),
                );
                let (p2, p3) = (
                    V::select(at.eq(idx[2]), g, z),
                    V::select(at.eq(idx[3]), g, z),
                );
                for (at, n, v) in spread_corners(&st, w, [p0, p1, p2, p3]) {
                    if n > 0 {
                        v.store_n(dxp.add(at), n);
                    }
                }
            }
        }
    }
}

/// The scalar 2×2 backward (rows narrower than a vector), same layout as [`Unpool2x2`].
fn unpool_rows_2x2_scalar<T: Float>(
    dy: &[T],
    argmax: &[u8],
    w: usize,
    ow: usize,
    rows: usize,
    dx: &mut [T],
) {
    for r in 0..rows {
        for c in 0..ow {
            let (g, at) = (dy[r * ow + c], argmax[r * ow + c]);
            for k in 0..4u8 {
                let pos = (2 * r + (k as usize >> 1)) * w + 2 * c + (k as usize & 1);
                dx[pos] = if at == k { g } else { T::zero() };
            }
        }
    }
}

struct MaxPool2dNode {
    geom: Pool2dGeom,
    x: usize,
    y: usize,
    argmax: Vec<u8>,
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
        pools.bytes.give(self.argmax);
    }
}

impl<T: Float> Tape<T> {
    /// Max pooling with a `k×k` window (`k <= 16`) and the given stride, no padding.
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
        let mut argmax = self.pools.bytes.take(numel(&out_shape));
        let y = self.new_output(out_shape, |t, yd| {
            maxpool2d_forward(&geom, t.value(x.0), yd, &mut argmax)
        });
        let record = self.record();
        let x = self.consume_input(x, false);
        if record {
            self.push_node(Box::new(MaxPool2dNode { geom, x, y, argmax }));
        } else {
            self.pools.bytes.give(argmax);
        }
        self.maybe_free_data(x);
        ValueId(y)
    }
}
