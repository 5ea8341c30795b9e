//! batchnorm2d over `[N, C, HW]`: training (batch statistics, biased variance) and eval
//! (running statistics), and the kernels it shares with the fused batch norm + relu
//! ([`super::bn_relu`]).
//!
//! Work split: channels are cut into blocks (contiguous runs of `block·HW` values per
//! image, sized so a block's data stays in L2 between the two passes); one task per block
//! reduces the block's statistics and then immediately writes its outputs while they are
//! still in cache (two passes over memory instead of three). Every kernel is one source over
//! [`FloatVec`] (f32 at the process's SIMD level, f64 for the gradient checks).
//!
//! Accumulation is blocked: each lane sums at most a few hundred values in the element type
//! (planes of `HW` values are flushed every `max(1, 256 / HW)` images), then the lane sums
//! are added in f64. A channel's sums are formed in the same order whatever the block split
//! or thread count, so results do not depend on threads. The one-pass variance is taken
//! around a sample of the channel (its first value) so `|mean| ≫ std` does not cancel, and
//! the f64 mean is applied as a two-part (`hi + lo`) value for the same reason.
use super::{par_chunks_mut, units_per_task, SharedMutPtr};
use crate::autograd::{Param, ParamGrads, Tape, TapeNode, ValueId};
use crate::simd::{FloatVec, VecKernel};
use crate::Float;

/// Elements per parallel task at least (see relu).
const MIN_TASK_ELEMS: usize = 1 << 15;
/// Bytes of one channel block (per pass): pass 2 re-reads them from L2 (512 KiB on Zen 3).
const BLOCK_BYTES: usize = 256 << 10;
/// Values a lane sums in the element type before its sum is added in f64 (see module docs).
const FLUSH_ELEMS: usize = 256;

/// The per-channel affine map a forward applies: `y = ((x - hi) - lo)·scale + shift`, where
/// `hi + lo` is the f64 mean in two parts (batch mean in training, running mean in eval).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Affine<T> {
    pub(crate) hi: T,
    pub(crate) lo: T,
    pub(crate) scale: T,
    pub(crate) shift: T,
}

impl<T: Float> Affine<T> {
    /// `y = (x - mean)·scale + shift` with the mean kept to f64 accuracy.
    fn new(mean: f64, scale: f64, shift: T) -> Self {
        let hi = T::from_f64_lossy(mean);
        Affine {
            hi,
            lo: T::from_f64_lossy(mean - hi.to_f64_lossy()),
            scale: T::from_f64_lossy(scale),
            shift,
        }
    }
}

/// Channels `c0 .. c0 + cb` of an `[n, c, hw]` tensor.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Block {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) hw: usize,
    pub(crate) c0: usize,
    pub(crate) cb: usize,
}

impl Block {
    /// Offset of plane (`img`, channel `c0 + j`).
    #[inline(always)]
    pub(crate) fn plane(&self, img: usize, j: usize) -> usize {
        (img * self.c + self.c0 + j) * self.hw
    }
}

/// Runs `f(block, outputs)` for every channel block in parallel, where `outputs` are the
/// block's entries of a per-channel result vector (returned, in channel order).
pub(crate) fn for_channel_blocks<T, R, F>(n: usize, c: usize, hw: usize, f: F) -> Vec<R>
where
    R: Send + Default + Clone,
    F: Fn(Block, &mut [R]) + Sync,
{
    let channel_len = n * hw;
    let by_cache = (BLOCK_BYTES / (channel_len * std::mem::size_of::<T>()).max(1)).max(1);
    let cb = units_per_task(c, channel_len, MIN_TASK_ELEMS)
        .min(by_cache)
        .max(1);
    let mut out = vec![R::default(); c];
    par_chunks_mut(&mut out, cb, |t, outs| {
        let blk = Block {
            n,
            c,
            hw,
            c0: t * cb,
            cb: outs.len(),
        };
        f(blk, outs)
    });
    out
}

/// Lane sums in the element type, flushed into f64 totals (see the module docs).
pub(crate) struct BlockedSums<V: FloatVec> {
    pub(crate) lanes: Vec<[V; 2]>,
    pub(crate) totals: Vec<(f64, f64)>,
    flush_every: usize,
}

impl<V: FloatVec> BlockedSums<V> {
    #[inline(always)]
    pub(crate) fn new(cb: usize, hw: usize) -> Self {
        BlockedSums {
            lanes: vec![[V::zero(); 2]; cb],
            totals: vec![(0.0, 0.0); cb],
            flush_every: (FLUSH_ELEMS / hw.max(1)).max(1),
        }
    }
    /// Called after image `img`'s planes were added to `lanes`.
    #[inline(always)]
    pub(crate) fn image_done(&mut self, img: usize, n: usize) {
        if (img + 1).is_multiple_of(self.flush_every) || img + 1 == n {
            for (l, t) in self.lanes.iter_mut().zip(&mut self.totals) {
                t.0 += l[0].reduce_sum().to_f64_lossy();
                t.1 += l[1].reduce_sum().to_f64_lossy();
                *l = [V::zero(); 2];
            }
        }
    }
}

/// A mask of the first `m` lanes (the valid lanes of a plane's last, partial vector).
#[inline(always)]
fn first_lanes<V: FloatVec>(m: usize) -> V::Mask {
    let idx: [V::Elem; 64] = std::array::from_fn(|i| V::Elem::from_f64_lossy(i as f64));
    // SAFETY: `idx` holds 64 >= LANES values.
    unsafe { V::load(idx.as_ptr()) }.lt(V::splat(V::Elem::from_f64_lossy(m as f64)))
}

/// Per channel of a block: `(Σ d, Σ d²)` with `d = x - shift[j]`.
struct ShiftedSums<'a, T> {
    x: &'a [T],
    blk: Block,
    shifts: &'a [T],
}

impl<T: Float> VecKernel<T> for ShiftedSums<'_, T> {
    type Output = Vec<(f64, f64)>;
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) -> Vec<(f64, f64)> {
        let Block { n, hw, cb, .. } = self.blk;
        let l = V::LANES;
        let (full, tail) = (hw / (2 * l) * (2 * l), hw % (2 * l));
        assert!(self.blk.plane(n - 1, cb - 1) + hw <= self.x.len() && self.shifts.len() == cb);
        let mut sums = BlockedSums::<V>::new(cb, hw);
        for img in 0..n {
            for j in 0..cb {
                let p = self.x[self.blk.plane(img, j)..].as_ptr();
                let sh = V::splat(self.shifts[j]);
                let [mut s0, mut q0] = sums.lanes[j];
                let (mut s1, mut q1) = (V::zero(), V::zero());
                let mut i = 0;
                // SAFETY: the plane's `hw` values lie inside `x` (asserted); every access below
                // stays within `[i, hw)` of the plane.
                unsafe {
                    while i < full {
                        let d0 = V::load(p.add(i)).sub(sh);
                        let d1 = V::load(p.add(i + l)).sub(sh);
                        (s0, q0) = (s0.add(d0), d0.mul_add(d0, q0));
                        (s1, q1) = (s1.add(d1), d1.mul_add(d1, q1));
                        i += 2 * l;
                    }
                    let mut rest = tail;
                    while rest > 0 {
                        let m = rest.min(l);
                        let d = V::select(
                            first_lanes::<V>(m),
                            V::load_partial(p.add(i), m).sub(sh),
                            V::zero(),
                        );
                        (s1, q1) = (s1.add(d), d.mul_add(d, q1));
                        i += m;
                        rest -= m;
                    }
                }
                sums.lanes[j] = [s0.add(s1), q0.add(q1)];
            }
            sums.image_done(img, n);
        }
        sums.totals
    }
}

/// `affine(x)` of one vector (and the centered `x`), exactly as the forward computes it (the
/// fused backward recomputes its relu mask with this).
#[inline(always)]
pub(crate) fn apply_affine<V: FloatVec>(x: V, a: &[V; 4]) -> (V, V) {
    let xc = x.sub(a[0]).sub(a[1]);
    (xc, xc.mul_add(a[2], a[3]))
}

/// The centered input `xc = (x - hi) - lo` and the gradient reaching batch norm's output:
/// `g`, or with `RELU`, `g · [affine(x) > 0]` (relu's mask, recomputed as the forward did).
#[inline(always)]
pub(crate) fn centered_grad<V: FloatVec, const RELU: bool>(x: V, g: V, a: &[V; 4]) -> (V, V) {
    let (xc, y) = apply_affine(x, a);
    let g = if RELU {
        V::select(y.gt(V::zero()), g, V::zero())
    } else {
        g
    };
    (xc, g)
}

#[inline(always)]
pub(crate) fn splat_affine<V: FloatVec>(a: &Affine<V::Elem>) -> [V; 4] {
    [
        V::splat(a.hi),
        V::splat(a.lo),
        V::splat(a.scale),
        V::splat(a.shift),
    ]
}

#[inline(always)]
pub(crate) fn relu<V: FloatVec>(y: V) -> V {
    V::select(y.lt(V::zero()), V::zero(), y)
}

/// `y = affine(x)` (then relu if `RELU`) over a block; `y` may not alias `x`.
struct Normalize<'a, T, const RELU: bool> {
    x: &'a [T],
    y: &'a SharedMutPtr<T>,
    blk: Block,
    coefs: &'a [Affine<T>],
}

impl<T: Float, const RELU: bool> VecKernel<T> for Normalize<'_, T, RELU> {
    type Output = ();
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) {
        let Block { n, hw, cb, .. } = self.blk;
        assert!(self.blk.plane(n - 1, cb - 1) + hw <= self.x.len() && self.coefs.len() == cb);
        for img in 0..n {
            for j in 0..cb {
                let off = self.blk.plane(img, j);
                let a = splat_affine::<V>(&self.coefs[j]);
                let (xp, yp) = (self.x[off..].as_ptr(), self.y.get());
                let mut i = 0;
                while i < hw {
                    // SAFETY: `min(hw - i, LANES)` values from `off + i` lie inside `x` and the
                    // output (same length as `x`); only this block's task writes these planes.
                    unsafe {
                        let (_, y) = apply_affine(V::load_n(xp.add(i), hw - i), &a);
                        let y = if RELU { relu(y) } else { y };
                        y.store_n(yp.add(off + i), hw - i);
                    }
                    i += V::LANES;
                }
            }
        }
    }
}

/// Per channel of a block: `(Σ g, Σ g·xc)` where `xc = (x - hi) - lo` and `g = dy`, or
/// with `RELU`, `g = dy · [affine(x) > 0]`.
struct GradSums<'a, T, const RELU: bool> {
    x: &'a [T],
    dy: &'a SharedMutPtr<T>,
    blk: Block,
    coefs: &'a [Affine<T>],
}

impl<T: Float, const RELU: bool> VecKernel<T> for GradSums<'_, T, RELU> {
    type Output = Vec<(f64, f64)>;
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) -> Vec<(f64, f64)> {
        let Block { n, hw, cb, .. } = self.blk;
        assert!(self.blk.plane(n - 1, cb - 1) + hw <= self.x.len() && self.coefs.len() == cb);
        let mut sums = BlockedSums::<V>::new(cb, hw);
        for img in 0..n {
            for j in 0..cb {
                let off = self.blk.plane(img, j);
                let a = splat_affine::<V>(&self.coefs[j]);
                let (xp, dyp) = (self.x[off..].as_ptr(), self.dy.get() as *const T);
                let [mut s, mut p] = sums.lanes[j];
                let mut i = 0;
                while i < hw {
                    // SAFETY: as in `Normalize`; `dy` has `x`'s length. Partial loads read
                    // zeros past the plane, which add nothing (`g = 0` there).
                    unsafe {
                        let x = V::load_n(xp.add(i), hw - i);
                        let g = V::load_n(dyp.add(off + i), hw - i);
                        let (xc, g) = centered_grad::<V, RELU>(x, g, &a);
                        (s, p) = (s.add(g), g.mul_add(xc, p));
                    }
                    i += V::LANES;
                }
                sums.lanes[j] = [s, p];
            }
            sums.image_done(img, n);
        }
        sums.totals
    }
}

/// `dx = k0·g + k1·xc + k2` per channel (`g`, `xc` as in [`GradSums`]); `dx` may be `dy`
/// itself (each vector is read before it is written).
struct GradApply<'a, T, const RELU: bool> {
    x: &'a [T],
    dy: &'a SharedMutPtr<T>,
    dx: &'a SharedMutPtr<T>,
    blk: Block,
    coefs: &'a [Affine<T>],
    k: &'a [[T; 3]],
}

impl<T: Float, const RELU: bool> VecKernel<T> for GradApply<'_, T, RELU> {
    type Output = ();
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) {
        let Block { n, hw, cb, .. } = self.blk;
        assert!(self.blk.plane(n - 1, cb - 1) + hw <= self.x.len());
        assert!(self.coefs.len() == cb && self.k.len() == cb);
        for img in 0..n {
            for j in 0..cb {
                let off = self.blk.plane(img, j);
                let a = splat_affine::<V>(&self.coefs[j]);
                let [k0, k1, k2] = self.k[j];
                let (k0, k1, k2) = (V::splat(k0), V::splat(k1), V::splat(k2));
                let (xp, dyp, dxp) = (self.x[off..].as_ptr(), self.dy.get(), self.dx.get());
                let mut i = 0;
                while i < hw {
                    // SAFETY: as in `GradSums`; only this block's task writes these planes of
                    // `dx`, and when `dx` is `dy` each vector is loaded before it is stored.
                    unsafe {
                        let x = V::load_n(xp.add(i), hw - i);
                        let g = V::load_n(dyp.add(off + i), hw - i);
                        let (xc, g) = centered_grad::<V, RELU>(x, g, &a);
                        g.mul_add(k0, xc.mul_add(k1, k2))
                            .store_n(dxp.add(off + i), hw - i);
                    }
                    i += V::LANES;
                }
            }
        }
    }
}

/// Training forward of a batch norm (+ relu if `RELU`): per channel the batch mean and
/// `invstd = 1/sqrt(var_biased + eps)` (f64) and the affine map applied.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_train<T: Float, const RELU: bool>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
    y: &mut [T],
) -> Vec<(f64, f64, Affine<T>)> {
    check_lengths("batchnorm2d forward", n, c, hw, x, gamma, beta);
    assert_eq!(y.len(), x.len(), "batchnorm2d forward: y length");
    let y_ptr = SharedMutPtr(y.as_mut_ptr());
    for_channel_blocks::<T, _, _>(n, c, hw, |blk, outs| {
        block_stats(x, blk, gamma, beta, eps, outs);
        let coefs: Vec<Affine<T>> = outs.iter().map(|o| o.2).collect();
        T::run(Normalize::<T, RELU> {
            x,
            y: &y_ptr,
            blk,
            coefs: &coefs,
        });
    })
}

/// A block's batch statistics: per channel `(mean, invstd, affine map)` into `outs`.
pub(crate) fn block_stats<T: Float>(
    x: &[T],
    blk: Block,
    gamma: &[T],
    beta: &[T],
    eps: f64,
    outs: &mut [(f64, f64, Affine<T>)],
) {
    let count = (blk.n * blk.hw) as f64;
    let shifts: Vec<T> = (0..blk.cb).map(|j| x[blk.plane(0, j)]).collect();
    let sums = T::run(ShiftedSums {
        x,
        blk,
        shifts: &shifts,
    });
    for (j, (out, (s, q))) in outs.iter_mut().zip(sums).enumerate() {
        let ch = blk.c0 + j;
        let mean_shifted = s / count;
        let var = (q / count - mean_shifted * mean_shifted).max(0.0);
        let mean = shifts[j].to_f64_lossy() + mean_shifted;
        let invstd = 1.0 / (var + eps).sqrt();
        let affine = Affine::new(mean, gamma[ch].to_f64_lossy() * invstd, beta[ch]);
        *out = (mean, invstd, affine);
    }
}

/// Eval forward (+ relu if `RELU`) with running statistics.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward_eval<T: Float, const RELU: bool>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
    y: &mut [T],
) {
    check_lengths("batchnorm2d eval forward", n, c, hw, x, gamma, beta);
    assert_eq!(y.len(), x.len(), "batchnorm2d eval forward: y length");
    assert_eq!(
        running_mean.len(),
        c,
        "batchnorm2d eval: running_mean length"
    );
    assert_eq!(running_var.len(), c, "batchnorm2d eval: running_var length");
    let coefs = eval_coefs(gamma, beta, running_mean, running_var, eps);
    let y_ptr = SharedMutPtr(y.as_mut_ptr());
    for_channel_blocks::<T, (), _>(n, c, hw, |blk, _| {
        let coefs = &coefs[blk.c0..blk.c0 + blk.cb];
        T::run(Normalize::<T, RELU> {
            x,
            y: &y_ptr,
            blk,
            coefs,
        });
    });
}

/// The affine maps of an eval forward (running statistics).
pub(crate) fn eval_coefs<T: Float>(
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
) -> Vec<Affine<T>> {
    (0..gamma.len())
        .map(|ch| {
            let scale = gamma[ch].to_f64_lossy() / (running_var[ch].to_f64_lossy() + eps).sqrt();
            Affine::new(running_mean[ch].to_f64_lossy(), scale, beta[ch])
        })
        .collect()
}

/// Training backward (+ relu's if `RELU`, whose mask is recomputed from `x` and `coefs`):
/// writes `dx` (which may be the same buffer as `dy`) and returns per channel
/// `(Σ g, Σ g·xc)` for the parameter gradients ([`write_param_grads`]).
///
/// With `xc = x - mean`, `M = N·HW` and `k = gamma·invstd`:
/// `dx = k·g - k·invstd²·(Σ g·xc)/M · xc - k·(Σ g)/M`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward<T: Float, const RELU: bool>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    coefs: &[Affine<T>],
    invstd: &[T],
    dy: &SharedMutPtr<T>,
    dx: &SharedMutPtr<T>,
) -> Vec<(f64, f64)> {
    assert_eq!(x.len(), n * c * hw, "batchnorm2d backward: x length");
    assert!(
        gamma.len() == c && coefs.len() == c && invstd.len() == c,
        "batchnorm2d backward: per-channel lengths"
    );
    for_channel_blocks::<T, _, _>(n, c, hw, |blk, outs| {
        let coefs = &coefs[blk.c0..blk.c0 + blk.cb];
        let sums = T::run(GradSums::<T, RELU> { x, dy, blk, coefs });
        let k = grad_coefficients(&sums, blk, gamma, invstd);
        T::run(GradApply::<T, RELU> {
            x,
            dy,
            dx,
            blk,
            coefs,
            k: &k,
        });
        outs.copy_from_slice(&sums);
    })
}

/// A block's `dx = k0·g + k1·xc + k2` coefficients from its sums `(Σ g, Σ g·xc)`.
pub(crate) fn grad_coefficients<T: Float>(
    sums: &[(f64, f64)],
    blk: Block,
    gamma: &[T],
    invstd: &[T],
) -> Vec<[T; 3]> {
    let count = (blk.n * blk.hw) as f64;
    sums.iter()
        .enumerate()
        .map(|(j, &(sum_g, sum_gx))| {
            let ch = blk.c0 + j;
            let is = invstd[ch].to_f64_lossy();
            let kk = gamma[ch].to_f64_lossy() * is;
            [kk, -kk * is * is * sum_gx / count, -kk * sum_g / count].map(T::from_f64_lossy)
        })
        .collect()
}

/// `dbeta = Σ g`, `dgamma = (Σ g·xc)·invstd` from [`backward`]'s per-channel sums.
pub(crate) fn write_param_grads<T: Float>(
    sums: &[(f64, f64)],
    invstd: &[T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    let c = sums.len();
    assert_eq!(dgamma.len(), c, "batchnorm2d backward: dgamma length");
    assert_eq!(dbeta.len(), c, "batchnorm2d backward: dbeta length");
    for ch in 0..c {
        let (sum_g, sum_gx) = sums[ch];
        dbeta[ch] = T::from_f64_lossy(sum_g);
        dgamma[ch] = T::from_f64_lossy(sum_gx * invstd[ch].to_f64_lossy());
    }
}

/// Training forward: normalizes with the batch mean and biased variance; writes the
/// per-channel `mean` and `invstd = 1/sqrt(var_biased + eps)` that backward needs.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward_train<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    eps: f64,
    y: &mut [T],
    mean: &mut [T],
    invstd: &mut [T],
) {
    assert_eq!(mean.len(), c, "batchnorm2d_forward_train: mean length");
    assert_eq!(invstd.len(), c, "batchnorm2d_forward_train: invstd length");
    let stats = forward_train::<T, false>(n, c, hw, x, gamma, beta, eps, y);
    for ((m, is), &(sm, si, _)) in mean.iter_mut().zip(invstd.iter_mut()).zip(&stats) {
        *m = T::from_f64_lossy(sm);
        *is = T::from_f64_lossy(si);
    }
}

/// Eval forward with running statistics.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_forward_eval<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
    y: &mut [T],
) {
    forward_eval::<T, false>(n, c, hw, x, gamma, beta, running_mean, running_var, eps, y)
}

/// PyTorch's running-stat update: `r = (1-m)·r + m·batch`, with the *unbiased* batch variance
/// (`count = N·HW` elements per channel; `mean`/`invstd` as written by the training forward).
/// With `count == 1` the unbiased variance is undefined (PyTorch refuses to train then); the
/// biased one is used instead of producing NaN.
pub fn batchnorm2d_update_running<T: Float>(
    mean: &[T],
    invstd: &[T],
    eps: f64,
    count: usize,
    momentum: f64,
    running_mean: &mut [T],
    running_var: &mut [T],
) {
    let c = mean.len();
    assert_eq!(invstd.len(), c, "batchnorm2d_update_running: invstd length");
    assert_eq!(
        running_mean.len(),
        c,
        "batchnorm2d_update_running: running_mean length"
    );
    assert_eq!(
        running_var.len(),
        c,
        "batchnorm2d_update_running: running_var length"
    );
    let bessel = if count > 1 {
        count as f64 / (count - 1) as f64
    } else {
        1.0
    };
    for ch in 0..c {
        let is = invstd[ch].to_f64_lossy();
        // invstd = 1/sqrt(var + eps)  =>  var = 1/invstd² - eps
        let var_biased = (1.0 / (is * is) - eps).max(0.0);
        let rm = running_mean[ch].to_f64_lossy();
        let rv = running_var[ch].to_f64_lossy();
        running_mean[ch] =
            T::from_f64_lossy((1.0 - momentum) * rm + momentum * mean[ch].to_f64_lossy());
        running_var[ch] = T::from_f64_lossy((1.0 - momentum) * rv + momentum * var_biased * bessel);
    }
}

/// Training backward (batch statistics depend on `x`): overwrites `dx`, `dgamma`, `dbeta`.
///
/// With `x̂ = (x - mean)·invstd` and `M = N·HW`:
/// `dbeta = Σ dy`, `dgamma = Σ dy·x̂`,
/// `dx = gamma·invstd·(dy - dbeta/M - x̂·dgamma/M)`.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm2d_backward<T: Float>(
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    mean: &[T],
    invstd: &[T],
    dy: &[T],
    dx: &mut [T],
    dgamma: &mut [T],
    dbeta: &mut [T],
) {
    check_lengths("batchnorm2d_backward", n, c, hw, x, gamma, gamma);
    assert_eq!(mean.len(), c, "batchnorm2d_backward: mean length");
    assert_eq!(dy.len(), x.len(), "batchnorm2d_backward: dy length");
    assert_eq!(dx.len(), x.len(), "batchnorm2d_backward: dx length");
    let coefs = centering(mean);
    // SAFETY of the cast: without aliasing `dx`, `dy` is only read.
    let dy_ptr = SharedMutPtr(dy.as_ptr() as *mut T);
    let dx_ptr = SharedMutPtr(dx.as_mut_ptr());
    let sums = backward::<T, false>(n, c, hw, x, gamma, &coefs, invstd, &dy_ptr, &dx_ptr);
    write_param_grads(&sums, invstd, dgamma, dbeta);
}

/// Coefficients that only center (`x - mean` in T; `scale`/`shift` matter only with relu),
/// for the plain batch norm's backward.
fn centering<T: Float>(mean: &[T]) -> Vec<Affine<T>> {
    mean.iter()
        .map(|&m| Affine {
            hi: m,
            ..Affine::default()
        })
        .collect()
}

pub(crate) fn check_lengths<T>(
    op: &str,
    n: usize,
    c: usize,
    hw: usize,
    x: &[T],
    gamma: &[T],
    beta: &[T],
) {
    assert_eq!(x.len(), n * c * hw, "{op}: x length");
    assert_eq!(gamma.len(), c, "{op}: gamma length");
    assert_eq!(beta.len(), c, "{op}: beta length");
}

/// Batch-norm statistics mode for [`Tape::batchnorm2d`] and [`Tape::batchnorm2d_relu`].
pub enum BnMode<'a, T> {
    /// Normalize with batch statistics and update the running ones (PyTorch `train()`).
    Train {
        running_mean: &'a mut [T],
        running_var: &'a mut [T],
        momentum: f64,
        /// Where to keep the batch statistics the running update used (see
        /// [`BnBatchStats::update_running`]), if the caller wants them.
        last_batch: Option<&'a mut BnBatchStats<T>>,
    },
    /// Normalize with the running statistics (PyTorch `eval()`); not differentiable here:
    /// only allowed while gradients are disabled.
    Eval {
        running_mean: &'a [T],
        running_var: &'a [T],
    },
}

/// Batch-norm epsilon (PyTorch default).
pub const BN_EPS: f64 = 1e-5;

/// The per-channel statistics of the last training batch, as the running-stat update read
/// them: with these the update can be redone from other running values, bit for bit (DDP
/// applies rank 0's broadcast buffers after a forward that did not wait for them).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BnBatchStats<T> {
    pub mean: Vec<T>,
    pub invstd: Vec<T>,
    /// Elements per channel (`N·H·W`); 0 before the first training batch.
    pub count: usize,
}

impl<T: Float> BnBatchStats<T> {
    /// Sets `running_*` to what the last training forward would have left had they held
    /// `base_*` before it (`base_*` alone before any training batch).
    pub fn update_running(
        &self,
        momentum: f64,
        base_mean: &[T],
        base_var: &[T],
        running_mean: &mut [T],
        running_var: &mut [T],
    ) {
        running_mean.copy_from_slice(base_mean);
        running_var.copy_from_slice(base_var);
        if self.count > 0 {
            batchnorm2d_update_running(
                &self.mean,
                &self.invstd,
                BN_EPS,
                self.count,
                momentum,
                running_mean,
                running_var,
            );
        }
    }
}

/// What a training forward of the batch-norm family keeps for backward, per channel: the
/// affine map it applied, the batch mean (as `T`) and `invstd = 1/sqrt(var_biased + eps)`.
#[derive(Clone, Debug, Default)]
pub struct BnSaved<T> {
    pub(crate) affine: Vec<Affine<T>>,
    pub(crate) mean: Vec<T>,
    pub(crate) invstd: Vec<T>,
}

impl<T: Float> BnSaved<T> {
    pub fn new() -> Self {
        BnSaved {
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

/// The batch-norm part of a forward of the batch-norm family (see
/// [`Tape::record_batchnorm`]).
pub(crate) enum BnPass<'a, T> {
    /// Batch statistics, kept in `saved`.
    Train(&'a mut BnSaved<T>),
    Eval {
        running_mean: &'a [T],
        running_var: &'a [T],
    },
}

/// What a recorded op of the batch-norm family leaves for its node.
pub(crate) struct BnRecord<T> {
    pub(crate) x: usize,
    pub(crate) out: usize,
    pub(crate) saved: BnSaved<T>,
}

impl<T: Float> Tape<T> {
    /// Records an op of the batch-norm family (plain, + relu, + relu + pool) on
    /// `x: [N, C, H, W]`: runs `forward(x, gamma, beta, pass, out)` into a new output of
    /// `out_shape`, updates the running statistics in training, consumes `x` (saved for
    /// backward when recording) and returns the output and, when recording, what the op's node
    /// needs (the caller pushes the node).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_batchnorm(
        &mut self,
        params: &[Param<T>],
        x: ValueId,
        gamma: usize,
        beta: usize,
        mode: BnMode<'_, T>,
        out_shape: Vec<usize>,
        forward: impl FnOnce(&[T], &[T], &[T], BnPass<'_, T>, &mut [T]),
    ) -> (ValueId, Option<BnRecord<T>>) {
        let xs = self.shape(&x);
        assert!(xs.len() == 4, "batch norm expects [N, C, H, W], got {xs:?}");
        let count = xs[0] * xs[2] * xs[3];
        let record = self.record();
        let (g, b) = (&params[gamma].value[..], &params[beta].value[..]);
        match mode {
            BnMode::Train {
                running_mean,
                running_var,
                momentum,
                last_batch,
            } => {
                let mut saved = BnSaved::new();
                let out = self.new_output(out_shape, |t, out| {
                    forward(t.value(x.0), g, b, BnPass::Train(&mut saved), out)
                });
                batchnorm2d_update_running(
                    &saved.mean,
                    &saved.invstd,
                    BN_EPS,
                    count,
                    momentum,
                    running_mean,
                    running_var,
                );
                if let Some(last) = last_batch {
                    last.mean.clone_from(&saved.mean);
                    last.invstd.clone_from(&saved.invstd);
                    last.count = count;
                }
                let x = self.consume_input(x, record);
                if record {
                    self.note_param_use(gamma);
                    self.note_param_use(beta);
                }
                self.maybe_free_data(x);
                (ValueId(out), record.then_some(BnRecord { x, out, saved }))
            }
            BnMode::Eval {
                running_mean,
                running_var,
            } => {
                assert!(
                    !record,
                    "eval-mode batch norm is not differentiable here: disable gradients"
                );
                let out = self.new_output(out_shape, |t, out| {
                    let pass = BnPass::Eval {
                        running_mean,
                        running_var,
                    };
                    forward(t.value(x.0), g, b, pass, out)
                });
                let x = self.consume_input(x, false);
                self.maybe_free_data(x);
                (ValueId(out), None)
            }
        }
    }

    /// The backward of a batch-norm-family node that writes `dx` over `dy`:
    /// `compute(x, gamma, dy_then_dx, dgamma, dbeta)`, then `dx` goes to `x`.
    pub(crate) fn backward_over_dy(
        &mut self,
        grads: &mut ParamGrads<'_, T>,
        (x, gamma, beta): (usize, usize, usize),
        dy: &mut Vec<T>,
        compute: impl FnOnce(&[T], &[T], &mut [T], &mut [T], &mut [T]),
    ) {
        let mut gamma_value = self.pools.floats.take(grads.params[gamma].numel());
        gamma_value.copy_from_slice(&grads.params[gamma].value);
        self.write_param_grads(grads, gamma, Some(beta), |t, gg, gb| {
            compute(t.value(x), &gamma_value, dy, gg, gb.expect("beta grad"))
        });
        self.pools.floats.give(gamma_value);
        self.unsave(x);
        if self.requires_grad(x) {
            self.deliver_grad(x, std::mem::take(dy));
        }
    }
}

/// The node of batch norm, and (`RELU`) of the fused batch norm + relu.
struct BatchNormNode<T, const RELU: bool> {
    n: usize,
    c: usize,
    hw: usize,
    x: usize,
    y: usize,
    gamma: usize,
    beta: usize,
    saved: BnSaved<T>,
}

impl<T: Float, const RELU: bool> TapeNode<T> for BatchNormNode<T, RELU> {
    fn op(&self) -> &'static str {
        if RELU {
            "batchnorm2d_relu"
        } else {
            "batchnorm2d"
        }
    }
    fn output(&self) -> usize {
        self.y
    }
    fn backward(&self, tape: &mut Tape<T>, grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>) {
        let (n, c, hw) = (self.n, self.c, self.hw);
        let ids = (self.x, self.gamma, self.beta);
        tape.backward_over_dy(grads, ids, dy, |x, gamma, dy, dgamma, dbeta| {
            let ptr = SharedMutPtr(dy.as_mut_ptr());
            let (affine, invstd) = (&self.saved.affine, &self.saved.invstd);
            let sums = backward::<T, RELU>(n, c, hw, x, gamma, affine, invstd, &ptr, &ptr);
            write_param_grads(&sums, invstd, dgamma, dbeta);
        });
    }
}

impl<T: Float> Tape<T> {
    /// Batch norm over channels of `x: [N, C, H, W]` with affine `gamma`, `beta`.
    pub fn batchnorm2d(
        &mut self,
        params: &[Param<T>],
        x: ValueId,
        gamma: usize,
        beta: usize,
        mode: BnMode<'_, T>,
    ) -> ValueId {
        self.batchnorm_op::<false>(params, x, gamma, beta, mode)
    }

    /// [`Tape::batchnorm2d`], followed by relu if `RELU` (see [`super::bn_relu`]).
    pub(crate) fn batchnorm_op<const RELU: bool>(
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
            "batchnorm2d expects [N, C, H, W], got {xs:?}"
        );
        let (n, c, hw) = (xs[0], xs[1], xs[2] * xs[3]);
        let (y, rec) = self.record_batchnorm(
            params,
            x,
            gamma,
            beta,
            mode,
            xs,
            |x, g, b, pass, y| match pass {
                BnPass::Train(saved) => {
                    saved.set(&forward_train::<T, RELU>(n, c, hw, x, g, b, BN_EPS, y))
                }
                BnPass::Eval {
                    running_mean,
                    running_var,
                } => {
                    forward_eval::<T, RELU>(n, c, hw, x, g, b, running_mean, running_var, BN_EPS, y)
                }
            },
        );
        if let Some(BnRecord { x, out, saved }) = rec {
            self.push_node(Box::new(BatchNormNode::<T, RELU> {
                n,
                c,
                hw,
                x,
                y: out,
                gamma,
                beta,
                saved,
            }));
        }
        y
    }
}
