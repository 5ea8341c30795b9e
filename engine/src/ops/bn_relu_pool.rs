//! Fused batch norm + relu + 2×2/stride-2 max-pool (`maxpool(relu(batchnorm2d(x)))`, VGG's
//! block before every `M`), on planes of even height and width.
//!
//! Forward: the batch statistics pass, then one pass that normalizes two input rows at a
//! time, applies relu and pools them: only the pooled output and the window positions (one
//! byte each) are written; the full-size `relu(batchnorm(x))` never exists. Backward: the
//! pooled gradient is spread back to the window maxima in registers (`dp` and positions in,
//! interleaved rows out, as [`super::maxpool2d_backward`]), masked by relu (recomputed from
//! `x` with the forward's coefficients, as [`super::bn_relu`]) and reduced for batch norm;
//! a second pass writes `dx`. So the op saves only `x`, and its backward can write `dx` over
//! `x` itself (the tape does when nothing else reads `x`): one activation-sized buffer per
//! block instead of three.
//!
//! Rows narrower than half a vector (planes up to 4×4 with AVX2) use scalar loops; the
//! scalar transform is the vector one, operation for operation, so the relu mask backward
//! recomputes is the forward's exactly.
use super::batchnorm::{
    apply_affine, block_stats, centered_grad, check_lengths, eval_coefs, for_channel_blocks,
    grad_coefficients, relu, splat_affine, write_param_grads, Affine, Block, BlockedSums, BnMode,
    BnPass, BnRecord, BnSaved, BN_EPS,
};
use super::pool::{
    load_corners, load_outputs, spread_corners, store_outputs, take_if_larger, takes, vector_rows,
    Steps,
};
use super::SharedMutPtr;
use crate::autograd::{Param, ParamGrads, Pools, Tape, TapeNode, ValueId};
use crate::simd::{FloatVec, VecKernel};
use crate::Float;

/// `relu(affine(x))` of one value, operation for operation as the vector kernels do it.
#[inline(always)]
fn affine_relu<T: Float>(x: T, a: &Affine<T>) -> (T, T) {
    let xc = (x - a.hi) - a.lo;
    let y = xc.mul_add(a.scale, a.shift);
    (xc, if y < T::zero() { T::zero() } else { y })
}

/// [`affine_relu`] of a vector (the forward's output before pooling).
#[inline(always)]
fn affine_relu_vec<V: FloatVec>(x: V, a: &[V; 4]) -> V {
    relu(apply_affine(x, a).1)
}

/// Whether a plane of `oh` rows of `ow` outputs takes the vector path: as the plain pool's
/// ([`vector_rows`]), except that quarter-vector rows need four rows in the plane (a step
/// never spans two planes here: they are different channels).
#[inline(always)]
fn plane_vector_rows(ow: usize, oh: usize, l: usize) -> bool {
    2 * ow >= l || (vector_rows(ow, l) && oh >= 4)
}

/// Shape checks; returns the output plane size `(h/2)·(w/2)`.
fn check_pool_shape(op: &str, h: usize, w: usize) -> usize {
    assert!(
        h >= 2 && w >= 2 && h.is_multiple_of(2) && w.is_multiple_of(2),
        "{op}: planes must have even height and width, got {h}x{w}"
    );
    (h / 2) * (w / 2)
}

/// Pass 2 of the forward over a block: pooled `relu(affine(x))` and window positions.
struct NormalizePool<'a, T> {
    x: &'a [T],
    p: &'a SharedMutPtr<T>,
    argmax: &'a SharedMutPtr<u8>,
    blk: Block,
    w: usize,
    coefs: &'a [Affine<T>],
}

impl<T: Float> VecKernel<T> for NormalizePool<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) {
        let Block { n, hw, cb, .. } = self.blk;
        let (w, l) = (self.w, V::LANES);
        let (oh, ow) = (hw / w / 2, w / 2);
        assert!(self.blk.plane(n - 1, cb - 1) + hw <= self.x.len() && self.coefs.len() == cb);
        let (i1, i2, i3) = (
            V::splat(T::one()),
            V::splat(T::from_f64_lossy(2.0)),
            V::splat(T::from_f64_lossy(3.0)),
        );
        let (xp, pp, ap) = (self.x.as_ptr(), self.p.get(), self.argmax.get());
        for img in 0..n {
            for j in 0..cb {
                let off = self.blk.plane(img, j);
                let o_off = off / 4; // output plane of (img, channel)
                let coef = &self.coefs[j];
                if !plane_vector_rows(ow, oh, l) {
                    // SAFETY: the plane's inputs and outputs lie inside `x` (asserted) and the
                    // outputs (same plane count); only this block's task writes its outputs.
                    unsafe { pool_plane_scalar(xp, pp, ap, off, o_off, w, oh, ow, coef) };
                    continue;
                }
                let a = splat_affine::<V>(coef);
                for st in Steps::new(w, ow, oh, l, off, o_off) {
                    // SAFETY: as above, vector-wise: a step's inputs and outputs lie inside the
                    // plane.
                    unsafe {
                        let [va, vb, vd, ve] = load_corners::<V>(xp, &st, w);
                        let (best, idx) = (affine_relu_vec(va, &a), V::zero());
                        let (best, idx) = take_if_larger(affine_relu_vec(vb, &a), i1, best, idx);
                        let (best, idx) = take_if_larger(affine_relu_vec(vd, &a), i2, best, idx);
                        let (best, idx) = take_if_larger(affine_relu_vec(ve, &a), i3, best, idx);
                        store_outputs(pp, ap, &st, best, idx);
                    }
                }
            }
        }
    }
}

/// The forward of one plane whose rows are narrower than half a vector, value by value.
///
/// # Safety
/// The plane's `4·oh·ow` inputs from `off` and `oh·ow` outputs from `o_off` must be
/// accessible, the outputs exclusively.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn pool_plane_scalar<T: Float>(
    xp: *const T,
    pp: *mut T,
    ap: *mut u8,
    off: usize,
    o_off: usize,
    w: usize,
    oh: usize,
    ow: usize,
    coef: &Affine<T>,
) {
    for r in 0..oh {
        let (top, bottom, out) = (off + 2 * r * w, off + (2 * r + 1) * w, o_off + r * ow);
        for c in 0..ow {
            // SAFETY: inside the plane (the caller's contract).
            unsafe {
                let v = [
                    affine_relu(*xp.add(top + 2 * c), coef).1,
                    affine_relu(*xp.add(top + 2 * c + 1), coef).1,
                    affine_relu(*xp.add(bottom + 2 * c), coef).1,
                    affine_relu(*xp.add(bottom + 2 * c + 1), coef).1,
                ];
                let (mut best, mut at) = (v[0], 0u8);
                for (k, &cand) in v.iter().enumerate().skip(1) {
                    let t = takes(cand, best);
                    best = if t { cand } else { best };
                    at = if t { k as u8 } else { at };
                }
                *pp.add(out + c) = best;
                *ap.add(out + c) = at;
            }
        }
    }
}

/// One step of the backward passes: the gradient `g` reaching the inputs at `2m` positions
/// `x .. x + 2m` of one row (relu-masked), their centered values, and what to do with them.
trait GradStep<T, V: FloatVec<Elem = T>> {
    /// Called with up to two vectors per row step (lanes past `2m` hold `g = 0`); `at` is
    /// the offset of the first lane in the plane buffer.
    fn step(&mut self, at: usize, n: usize, g: V, xc: V);
    /// One value (rows narrower than half a vector).
    fn scalar(&mut self, at: usize, g: T, xc: T);
    /// Whether values with `g = 0` may be skipped (sums: they add nothing) in the scalar walk.
    const SKIPS_ZEROS: bool;
}

/// Walks a block's planes output row by output row, spreading `dp` back to the window
/// maxima and masking it with relu, and hands every input vector to `f`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn walk_block<T: Float, V: FloatVec<Elem = T>, F: GradStep<T, V>>(
    x: *const T,
    dp: &[T],
    argmax: &[u8],
    blk: Block,
    w: usize,
    coefs: &[Affine<T>],
    img: usize,
    j: usize,
    f: &mut F,
) {
    let hw = blk.hw;
    let l = V::LANES;
    let (oh, ow) = (hw / w / 2, w / 2);
    let off = blk.plane(img, j);
    let o_off = off / 4;
    let coef = &coefs[j];
    let a = splat_affine::<V>(coef);
    let z = V::zero();
    let idx = [
        z,
        V::splat(T::one()),
        V::splat(T::from_f64_lossy(2.0)),
        V::splat(T::from_f64_lossy(3.0)),
    ];
    if !plane_vector_rows(ow, oh, l) {
        for r in 0..oh {
            let rows = [off + 2 * r * w, off + (2 * r + 1) * w];
            let out = o_off + r * ow;
            for c in 0..ow {
                let (g, at) = (dp[out + c], argmax[out + c] as usize);
                for k in 0..4 {
                    if F::SKIPS_ZEROS && k != at {
                        continue;
                    }
                    let pos = rows[k >> 1] + 2 * c + (k & 1);
                    // SAFETY: `pos` is inside the plane, inside `x` (the caller's bounds).
                    let (xc, y) = affine_relu(unsafe { *x.add(pos) }, coef);
                    let gk = if k == at && y > T::zero() {
                        g
                    } else {
                        T::zero()
                    };
                    f.scalar(pos, gk, xc);
                }
            }
        }
        return;
    }
    for st in Steps::new(w, ow, oh, l, off, o_off) {
        // SAFETY: a step's outputs are inside `dp` and `argmax` (the caller's bounds).
        let (g, at) = unsafe { load_outputs::<V>(dp.as_ptr(), argmax.as_ptr(), &st) };
        let part = [
            V::select(at.eq(idx[0]), g, z),
            V::select(at.eq(idx[1]), g, z),
            V::select(at.eq(idx[2]), g, z),
            V::select(at.eq(idx[3]), g, z),
        ];
        for (at, cnt, gv) in spread_corners(&st, w, part) {
            if cnt == 0 {
                continue;
            }
            // SAFETY: a step's inputs are inside the plane.
            let xv = unsafe { V::load_n(x.add(at), cnt) };
            let (xc, g) = centered_grad::<V, true>(xv, gv, &a);
            f.step(at, cnt, g, xc);
        }
    }
}

/// Pass 1 of the backward: per channel `(Σ g, Σ g·xc)`.
struct PoolGradSums<'a, T> {
    x: &'a SharedMutPtr<T>,
    dp: &'a [T],
    argmax: &'a [u8],
    blk: Block,
    w: usize,
    coefs: &'a [Affine<T>],
}

struct SumStep<'a, V: FloatVec> {
    lanes: &'a mut [V; 2],
    total: &'a mut (f64, f64),
}

impl<T: Float, V: FloatVec<Elem = T>> GradStep<T, V> for SumStep<'_, V> {
    const SKIPS_ZEROS: bool = true;
    #[inline(always)]
    fn step(&mut self, _at: usize, _n: usize, g: V, xc: V) {
        self.lanes[0] = self.lanes[0].add(g);
        self.lanes[1] = g.mul_add(xc, self.lanes[1]);
    }
    #[inline(always)]
    fn scalar(&mut self, _at: usize, g: T, xc: T) {
        self.total.0 += g.to_f64_lossy();
        self.total.1 += (g * xc).to_f64_lossy();
    }
}

impl<T: Float> VecKernel<T> for PoolGradSums<'_, T> {
    type Output = Vec<(f64, f64)>;
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) -> Vec<(f64, f64)> {
        let Block { n, hw, cb, .. } = self.blk;
        assert!(
            self.dp.len() * 4 >= (self.blk.plane(n - 1, cb - 1) + hw) && self.coefs.len() == cb
        );
        let mut sums = BlockedSums::<V>::new(cb, hw);
        for img in 0..n {
            for j in 0..cb {
                let mut step = SumStep {
                    lanes: &mut sums.lanes[j],
                    total: &mut sums.totals[j],
                };
                walk_block(
                    self.x.get(),
                    self.dp,
                    self.argmax,
                    self.blk,
                    self.w,
                    self.coefs,
                    img,
                    j,
                    &mut step,
                );
            }
            sums.image_done(img, n);
        }
        sums.totals
    }
}

/// Pass 2 of the backward: `dx = k0·g + k1·xc + k2`; `dx` may be `x` itself (every vector
/// is read before the same positions are written).
struct PoolGradApply<'a, T> {
    x: &'a SharedMutPtr<T>,
    dx: &'a SharedMutPtr<T>,
    dp: &'a [T],
    argmax: &'a [u8],
    blk: Block,
    w: usize,
    coefs: &'a [Affine<T>],
    k: &'a [[T; 3]],
}

struct ApplyStep<T, V> {
    dx: *mut T,
    k: [V; 3],
    ks: [T; 3],
}

impl<T: Float, V: FloatVec<Elem = T>> GradStep<T, V> for ApplyStep<T, V> {
    const SKIPS_ZEROS: bool = false;
    #[inline(always)]
    fn step(&mut self, at: usize, n: usize, g: V, xc: V) {
        let [k0, k1, k2] = self.k;
        // SAFETY: `walk_block` hands positions inside the plane; only this block's task
        // writes them.
        unsafe {
            g.mul_add(k0, xc.mul_add(k1, k2))
                .store_n(self.dx.add(at), n)
        }
    }
    #[inline(always)]
    fn scalar(&mut self, at: usize, g: T, xc: T) {
        let [k0, k1, k2] = self.ks;
        // SAFETY: as in `step`.
        unsafe { *self.dx.add(at) = g.mul_add(k0, xc.mul_add(k1, k2)) }
    }
}

impl<T: Float> VecKernel<T> for PoolGradApply<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) {
        let Block { n, hw, cb, .. } = self.blk;
        assert!(self.dp.len() * 4 >= (self.blk.plane(n - 1, cb - 1) + hw));
        assert!(self.coefs.len() == cb && self.k.len() == cb);
        for img in 0..n {
            for j in 0..cb {
                let [k0, k1, k2] = self.k[j];
                let mut step = ApplyStep::<T, V> {
                    dx: self.dx.get(),
                    k: [V::splat(k0), V::splat(k1), V::splat(k2)],
                    ks: [k0, k1, k2],
                };
                walk_block(
                    self.x.get(),
                    self.dp,
                    self.argmax,
                    self.blk,
                    self.w,
                    self.coefs,
                    img,
                    j,
                    &mut step,
                );
            }
        }
    }
}

/// Training forward of `maxpool2x2(relu(batchnorm2d(x)))` on `[n, c, h, w]` (`h`, `w`
/// even): writes the pooled `p` (`[n, c, h/2, w/2]`), each output's window position
/// (`argmax`, as [`super::maxpool2d_forward`]) and what backward needs into `saved`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_maxpool2d_forward_train<T: Float>(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
    p: &mut [T],
    argmax: &mut [u8],
    saved: &mut BnSaved<T>,
) {
    let op = "batchnorm2d_relu_maxpool2d_forward_train";
    let out_plane = check_pool_shape(op, h, w);
    check_lengths(op, n, c, h * w, x, gamma, beta);
    assert_eq!(p.len(), n * c * out_plane, "{op}: p length");
    assert_eq!(argmax.len(), p.len(), "{op}: argmax length");
    let (p_ptr, a_ptr) = (
        SharedMutPtr(p.as_mut_ptr()),
        SharedMutPtr(argmax.as_mut_ptr()),
    );
    let stats = for_channel_blocks::<T, _, _>(n, c, h * w, |blk, outs| {
        block_stats(x, blk, gamma, beta, eps, outs);
        let coefs: Vec<Affine<T>> = outs.iter().map(|o| o.2).collect();
        T::run(NormalizePool {
            x,
            p: &p_ptr,
            argmax: &a_ptr,
            blk,
            w,
            coefs: &coefs,
        });
    });
    saved.set(&stats);
}

/// Eval forward of `maxpool2x2(relu(batchnorm2d(x)))` with running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_maxpool2d_forward_eval<T: Float>(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
    p: &mut [T],
    argmax: &mut [u8],
) {
    let op = "batchnorm2d_relu_maxpool2d_forward_eval";
    let out_plane = check_pool_shape(op, h, w);
    check_lengths(op, n, c, h * w, x, gamma, beta);
    assert!(
        running_mean.len() == c && running_var.len() == c,
        "{op}: running statistics length"
    );
    assert_eq!(p.len(), n * c * out_plane, "{op}: p length");
    assert_eq!(argmax.len(), p.len(), "{op}: argmax length");
    let coefs = eval_coefs(gamma, beta, running_mean, running_var, eps);
    let (p_ptr, a_ptr) = (
        SharedMutPtr(p.as_mut_ptr()),
        SharedMutPtr(argmax.as_mut_ptr()),
    );
    for_channel_blocks::<T, (), _>(n, c, h * w, |blk, _| {
        T::run(NormalizePool {
            x,
            p: &p_ptr,
            argmax: &a_ptr,
            blk,
            w,
            coefs: &coefs[blk.c0..blk.c0 + blk.cb],
        });
    });
}

/// Training backward of `maxpool2x2(relu(batchnorm2d(x)))` from the pooled gradient `dp`:
/// overwrites `dx`, `dgamma`, `dbeta`. `x`, `gamma`, `argmax` and `saved` are the forward's.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_maxpool2d_backward<T: Float>(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    x: &[T],
    gamma: &[T],
    saved: &BnSaved<T>,
    dp: &[T],
    argmax: &[u8],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    assert_eq!(
        dx.len(),
        x.len(),
        "batchnorm2d_relu_maxpool2d_backward: dx length"
    );
    // The cast is sound: `x` is only read (it does not alias `dx`).
    let x_ptr = SharedMutPtr(x.as_ptr() as *mut T);
    let dx_ptr = SharedMutPtr(dx.as_mut_ptr());
    let args = (n, c, h, w);
    backward(
        args,
        x.len(),
        &x_ptr,
        &dx_ptr,
        gamma,
        saved,
        dp,
        argmax,
        dgamma,
        dbeta,
    );
}

/// [`batchnorm2d_relu_maxpool2d_backward`] writing `dx` over `x` (the forward's input, which
/// this backward reads for the last time).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_relu_maxpool2d_backward_in_place<T: Float>(
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    x_then_dx: &mut [T],
    gamma: &[T],
    saved: &BnSaved<T>,
    dp: &[T],
    argmax: &[u8],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let ptr = SharedMutPtr(x_then_dx.as_mut_ptr());
    let args = (n, c, h, w);
    backward(
        args,
        x_then_dx.len(),
        &ptr,
        &ptr,
        gamma,
        saved,
        dp,
        argmax,
        dgamma,
        dbeta,
    );
}

#[allow(clippy::too_many_arguments)]
fn backward<T: Float>(
    (n, c, h, w): (usize, usize, usize, usize),
    x_len: usize,
    x: &SharedMutPtr<T>,
    dx: &SharedMutPtr<T>,
    gamma: &[T],
    saved: &BnSaved<T>,
    dp: &[T],
    argmax: &[u8],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let op = "batchnorm2d_relu_maxpool2d_backward";
    let out_plane = check_pool_shape(op, h, w);
    assert_eq!(x_len, n * c * h * w, "{op}: x length");
    assert_eq!(gamma.len(), c, "{op}: gamma length");
    assert_eq!(dp.len(), n * c * out_plane, "{op}: dp length");
    assert_eq!(argmax.len(), dp.len(), "{op}: argmax length");
    debug_assert!(
        argmax.iter().all(|&a| a < 4),
        "{op}: window positions of a 2x2 pool are 0..4"
    );
    assert!(
        saved.affine.len() == c && saved.invstd.len() == c,
        "{op}: saved statistics are for another channel count"
    );
    let sums = for_channel_blocks::<T, _, _>(n, c, h * w, |blk, outs| {
        let coefs = &saved.affine[blk.c0..blk.c0 + blk.cb];
        let s = T::run(PoolGradSums {
            x,
            dp,
            argmax,
            blk,
            w,
            coefs,
        });
        let k = grad_coefficients(&s, blk, gamma, &saved.invstd);
        T::run(PoolGradApply {
            x,
            dx,
            dp,
            argmax,
            blk,
            w,
            coefs,
            k: &k,
        });
        outs.copy_from_slice(&s);
    });
    write_param_grads(&sums, &saved.invstd, dgamma, dbeta);
}

struct BnReluPoolNode<T> {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    x: usize,
    p: usize,
    gamma: usize,
    beta: usize,
    saved: BnSaved<T>,
    argmax: Vec<u8>,
}

impl<T: Float> TapeNode<T> for BnReluPoolNode<T> {
    fn op(&self) -> &'static str {
        "bn_relu_maxpool2d"
    }
    fn output(&self) -> usize {
        self.p
    }
    fn backward(&self, tape: &mut Tape<T>, grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>) {
        let (n, c, h, w, x) = (self.n, self.c, self.h, self.w, self.x);
        let mut gamma_value = tape.pools.floats.take(c);
        gamma_value.copy_from_slice(&grads.params[self.gamma].value);
        // The last reader of `x`: write dx over it (else into a new buffer).
        let mut stolen = tape.take_saved_data(x);
        let mut fresh = stolen
            .is_none()
            .then(|| tape.pools.floats.take(n * c * h * w));
        tape.write_param_grads(grads, self.gamma, Some(self.beta), |t, gg, gb| {
            let gb = gb.expect("beta grad");
            let (saved, am) = (&self.saved, &self.argmax[..]);
            match (&mut stolen, &mut fresh) {
                (Some(xd), _) => batchnorm2d_relu_maxpool2d_backward_in_place(
                    n,
                    c,
                    h,
                    w,
                    xd,
                    &gamma_value,
                    saved,
                    dy,
                    am,
                    gg,
                    gb,
                ),
                (None, Some(dx)) => batchnorm2d_relu_maxpool2d_backward(
                    n,
                    c,
                    h,
                    w,
                    t.value(x),
                    &gamma_value,
                    saved,
                    dy,
                    am,
                    dx,
                    gg,
                    gb,
                ),
                (None, None) => unreachable!("a dx buffer exists"),
            }
        });
        tape.pools.floats.give(gamma_value);
        if stolen.is_none() {
            tape.unsave(x);
        }
        let dx = stolen.or(fresh).expect("a dx buffer exists");
        if tape.requires_grad(x) {
            tape.deliver_grad(x, dx);
        } else {
            tape.pools.floats.give(dx);
        }
    }
    fn recycle(self: Box<Self>, pools: &mut Pools<T>) {
        pools.bytes.give(self.argmax);
    }
}

impl<T: Float> Tape<T> {
    /// `maxpool2d(relu(batchnorm2d(x)), 2, 2)` as one op on `x: [N, C, H, W]` with even `H`
    /// and `W` (see the module docs; the same results as the three ops in a row up to
    /// rounding).
    pub fn batchnorm2d_relu_maxpool2d(
        &mut self,
        params: &[Param<T>],
        x: ValueId,
        gamma: usize,
        beta: usize,
        mode: BnMode<'_, T>,
    ) -> ValueId {
        let xs = self.shape(&x).to_vec();
        assert!(
            xs.len() == 4 && xs[2].is_multiple_of(2) && xs[3].is_multiple_of(2),
            "batchnorm2d_relu_maxpool2d expects [N, C, H, W] with even H and W, got {xs:?}"
        );
        let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
        let mut argmax = self.pools.bytes.take(n * c * (h / 2) * (w / 2));
        let out_shape = vec![n, c, h / 2, w / 2];
        let (p, rec) = self.record_batchnorm(
            params,
            x,
            gamma,
            beta,
            mode,
            out_shape,
            |x, g, b, pass, p| {
                let am = &mut argmax;
                match pass {
                    BnPass::Train(saved) => batchnorm2d_relu_maxpool2d_forward_train(
                        n, c, h, w, x, g, b, BN_EPS, p, am, saved,
                    ),
                    BnPass::Eval {
                        running_mean,
                        running_var,
                    } => batchnorm2d_relu_maxpool2d_forward_eval(
                        n,
                        c,
                        h,
                        w,
                        x,
                        g,
                        b,
                        running_mean,
                        running_var,
                        BN_EPS,
                        p,
                        am,
                    ),
                }
            },
        );
        match rec {
            Some(BnRecord { x, out, saved }) => self.push_node(Box::new(BnReluPoolNode {
                n,
                c,
                h,
                w,
                x,
                p: out,
                gamma,
                beta,
                saved,
                argmax,
            })),
            None => self.pools.bytes.give(argmax),
        }
        p
    }
}
