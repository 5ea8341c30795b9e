//! [`super::ConvAlgo::Direct`]: register-tiled direct convolution, stride 1, any kernel size
//! and padding.
//!
//! Where it wins: layers whose im2col GEMM would be very shallow (`K = C_in·KH·KW`; the
//! 3-channel first layer has K = 27), where a GEMM spends as much on packing, the column
//! matrix and its write-back as on multiply-adds.
//!
//! The input planes are copied with their left/right zero padding into column-padded rows
//! (`h × (ow + KW − 1)`), so every tap of an output row is one contiguous vector load; taps
//! that would read the top/bottom padding rows are skipped outright (for an output row, only
//! the kernel rows that land inside the image are visited).
//! - forward: a task owns (image, block of output channels); its register tile is
//!   `MR` output channels × `NV` vectors of output columns, accumulated over every
//!   `(ci, ky, kx)` tap in a fixed order (`MR×NV` = 6×2 for 8 lanes, 12×2 for 16 lanes);
//! - backward-data: the forward kernel on `dY`, padded by `K − 1 − pad`, with the kernel
//!   rotated by 180° and its channels transposed (a copy of the weights);
//! - backward-weight: a task owns a block of output channels and accumulates, image after
//!   image, `dY` rows times shifted input rows into per-(channel, tap) *vector*
//!   accumulators (one lane per output column position mod LANES), summed across lanes once
//!   at the end. The lane sum makes this pass's bits depend on the vector width (AVX2 vs
//!   AVX-512), never on the thread count.
use super::lanes::{ConvFloat, LaneKernel, Lanes};
use super::scratch::with_scratch;
use super::{Conv2dGeom, ConvPass, ConvVectors};
use crate::ops::{par_chunks_mut, units_per_task, SharedMutPtr};
use crate::parallel::{num_threads, parallel_for};
use std::ops::Range;

/// Upper bound on one call's scratch (elements; 16 MB in f32), whatever the batch size.
const DIRECT_SCRATCH_ELEMS: usize = 4 << 20;
/// Output channels per forward task (a multiple of every register tile's MR).
const CO_PER_TASK: usize = 24;
/// Extra zeroed elements after the padded planes: the last vector of a row may read past
/// its end (into the next row, or here).
const SLACK: usize = 64;
/// Elements per parallel task at least, for the copy loops.
const MIN_TASK_ELEMS: usize = 1 << 14;

/// A stride-1 convolution as the kernels see it: `c_in` planes of `h×w` into `c_out` planes
/// of `oh×ow` by a `kh×kw` kernel; output `(r, c)` reads input `(r + ky − pad_h, c + kx −
/// pad_w)` (negative padding crops).
#[derive(Clone, Copy)]
struct Planes {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    oh: usize,
    ow: usize,
    kh: usize,
    kw: usize,
    pad_h: isize,
    pad_w: isize,
}

impl Planes {
    fn forward(g: &Conv2dGeom) -> Self {
        Planes {
            n: g.n,
            c_in: g.c_in,
            h: g.h,
            w: g.w,
            c_out: g.c_out,
            oh: g.out_h(),
            ow: g.out_w(),
            kh: g.kh,
            kw: g.kw,
            pad_h: g.pad as isize,
            pad_w: g.pad as isize,
        }
    }
    /// `dX` as a convolution of `dY` with the rotated, transposed kernel.
    fn backward_data(g: &Conv2dGeom) -> Self {
        Planes {
            n: g.n,
            c_in: g.c_out,
            h: g.out_h(),
            w: g.out_w(),
            c_out: g.c_in,
            oh: g.h,
            ow: g.w,
            kh: g.kh,
            kw: g.kw,
            pad_h: g.kh as isize - 1 - g.pad as isize,
            pad_w: g.kw as isize - 1 - g.pad as isize,
        }
    }
    /// Width of a column-padded row.
    fn wp(&self) -> usize {
        self.ow + self.kw - 1
    }
    fn padded_image(&self) -> usize {
        self.c_in * self.h * self.wp()
    }
    fn taps(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
    /// The kernel rows `ky` that output row `r` reads inside the image.
    fn rows(&self, r: usize) -> Range<usize> {
        let lo = (self.pad_h - r as isize).clamp(0, self.kh as isize) as usize;
        let hi = (self.h as isize + self.pad_h - r as isize).clamp(lo as isize, self.kh as isize);
        lo..hi as usize
    }
    /// Multiply-adds the kernels execute (padding rows skipped, padding columns not).
    fn macs(&self) -> usize {
        let rows: usize = (0..self.oh).map(|r| self.rows(r).len()).sum();
        self.n * self.c_out * self.c_in * rows * self.kw * self.ow
    }
}

/// Multiply-adds of one pass of `g` by the direct kernels.
pub(super) fn macs(g: &Conv2dGeom, pass: ConvPass) -> usize {
    match pass {
        ConvPass::Forward | ConvPass::BackwardWeight => Planes::forward(g).macs(),
        ConvPass::BackwardData => Planes::backward_data(g).macs(),
    }
}

/// Images per chunk so that the padded planes take at most `budget` elements.
fn images_per_chunk(p: &Planes, budget: usize) -> usize {
    let max = (budget / p.padded_image().max(1)).clamp(1, p.n.max(1));
    let chunks = p.n.max(1).div_ceil(max);
    p.n.max(1).div_ceil(chunks)
}

/// Copy `nb` images into column-padded planes `xp[img][c][h][wp]` (+ zeroed slack).
fn pad_columns<T: ConvFloat>(p: &Planes, x_chunk: &[T], nb: usize, xp: &mut [T]) {
    let wp = p.wp();
    let (planes, rows) = (nb * p.c_in, p.h * wp);
    let (body, slack) = xp.split_at_mut(planes * rows);
    slack.fill(T::zero());
    let per_task = units_per_task(planes, rows, MIN_TASK_ELEMS);
    par_chunks_mut(body, per_task * rows, |task, dst| {
        for (j, dplane) in dst.chunks_mut(rows).enumerate() {
            let src = &x_chunk[(task * per_task + j) * p.h * p.w..][..p.h * p.w];
            for (drow, srow) in dplane.chunks_mut(wp).zip(src.chunks(p.w)) {
                // drow[c] = srow[c − pad_w] where that is inside the row.
                for (c, d) in drow.iter_mut().enumerate() {
                    let s = c as isize - p.pad_w;
                    *d = if s >= 0 && (s as usize) < p.w {
                        srow[s as usize]
                    } else {
                        T::zero()
                    };
                }
            }
        }
    });
}

/// Forward pass (lengths checked by the caller).
pub(super) fn forward<T: ConvFloat>(
    vectors: ConvVectors,
    g: &Conv2dGeom,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    y: &mut [T],
) {
    let p = Planes::forward(g);
    with_scratch::<T, 1, _>([planes_len(&p)], |[xp]| {
        convolve(vectors, &p, x, w, b, y, xp)
    })
}

/// Backward-data pass (lengths checked by the caller).
pub(super) fn backward_data<T: ConvFloat>(
    vectors: ConvVectors,
    g: &Conv2dGeom,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
) {
    let p = Planes::backward_data(g);
    let kk = g.kh * g.kw;
    with_scratch::<T, 2, _>([w.len(), planes_len(&p)], |[wt, xp]| {
        // wt[ci][co][ky][kx] = w[co][ci][kh−1−ky][kw−1−kx].
        let per_task = units_per_task(g.c_in, g.c_out * kk, MIN_TASK_ELEMS);
        par_chunks_mut(wt, per_task * g.c_out * kk, |task, rows| {
            for (j, row) in rows.chunks_mut(g.c_out * kk).enumerate() {
                let ci = task * per_task + j;
                for co in 0..g.c_out {
                    let src = &w[(co * g.c_in + ci) * kk..][..kk];
                    for (t, d) in row[co * kk..(co + 1) * kk].iter_mut().enumerate() {
                        *d = src[kk - 1 - t];
                    }
                }
            }
        });
        convolve(vectors, &p, dy, wt, None, dx, xp)
    })
}

/// Scratch for the padded planes of one chunk (see [`images_per_chunk`]).
fn planes_len(p: &Planes) -> usize {
    images_per_chunk(p, DIRECT_SCRATCH_ELEMS) * p.padded_image() + SLACK
}

/// `y = conv(x, w) (+ b)` over `p`; `w` is `[c_out][c_in][kh][kw]`, `xp` scratch of
/// [`planes_len`] elements.
#[allow(clippy::too_many_arguments)]
fn convolve<T: ConvFloat>(
    vectors: ConvVectors,
    p: &Planes,
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    y: &mut [T],
    xp: &mut [T],
) {
    let per_chunk = images_per_chunk(p, DIRECT_SCRATCH_ELEMS);
    let (in_img, out_img) = (p.c_in * p.h * p.w, p.c_out * p.oh * p.ow);
    for start in (0..p.n).step_by(per_chunk) {
        let nb = per_chunk.min(p.n - start);
        let xp = &mut xp[..nb * p.padded_image() + SLACK];
        pad_columns(p, &x[start * in_img..(start + nb) * in_img], nb, xp);
        let y_chunk = &mut y[start * out_img..(start + nb) * out_img];
        let y_ptr = SharedMutPtr(y_chunk.as_mut_ptr());
        let co_tasks = p.c_out.div_ceil(CO_PER_TASK);
        let xp = &*xp;
        parallel_for(nb * co_tasks, |task| {
            let (img, ct) = (task / co_tasks, task % co_tasks);
            let outs = ct * CO_PER_TASK..((ct + 1) * CO_PER_TASK).min(p.c_out);
            T::run_kernel(
                vectors,
                ForwardTile {
                    p,
                    xp: &xp[img * p.padded_image()..],
                    w,
                    bias,
                    outs,
                    y: &y_ptr,
                    y_offset: img * out_img,
                },
            )
        });
    }
}

struct ForwardTile<'a, T> {
    p: &'a Planes,
    /// This image's padded planes (and everything after them, slack included).
    xp: &'a [T],
    w: &'a [T],
    bias: Option<&'a [T]>,
    outs: Range<usize>,
    y: &'a SharedMutPtr<T>,
    y_offset: usize,
}

impl<T: ConvFloat> LaneKernel<T> for ForwardTile<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        match L::LANES {
            1 => self.tile::<L, 4, 2>(),
            2..=8 => self.tile::<L, 6, 2>(),
            _ => self.tile::<L, 12, 2>(),
        }
    }
}

impl<T: ConvFloat> ForwardTile<'_, T> {
    /// Register tile: `MR` output channels × `NV` vectors of one output row.
    #[inline(always)]
    fn tile<L: Lanes<Elem = T>, const MR: usize, const NV: usize>(&self) {
        let p = self.p;
        let (wp, k) = (p.wp(), p.taps());
        let width = NV * L::LANES;
        for co0 in self.outs.clone().step_by(MR) {
            let valid = MR.min(self.outs.end - co0);
            // Rows past the block's end repeat its last row: computed, never stored.
            // Rows past the block's end repeat its last row: computed, never stored.
            let wrow: [&[T]; MR] = std::array::from_fn(|m| {
                let co = co0 + m.min(valid - 1);
                &self.w[co * k..(co + 1) * k]
            });
            // Plain loops for every vector operation in kernels (see `winograd::apply2d`).
            let mut bias = [L::zero(); MR];
            if let Some(b) = self.bias {
                for (m, bv) in bias.iter_mut().enumerate() {
                    *bv = L::splat(b[co0 + m.min(valid - 1)]);
                }
            }
            for r in 0..p.oh {
                let rows = p.rows(r);
                for c0 in (0..p.ow).step_by(width) {
                    let mut acc = [[L::zero(); NV]; MR];
                    for (a, &bv) in acc.iter_mut().zip(&bias) {
                        for v in a.iter_mut() {
                            *v = bv;
                        }
                    }
                    for ci in 0..p.c_in {
                        for ky in rows.clone() {
                            let ih = (r + ky) as isize - p.pad_h;
                            let at = (ci * p.h + ih as usize) * wp + c0;
                            let tap0 = (ci * p.kh + ky) * p.kw;
                            // The loads read `xp[at + kx + v·LANES ..][..LANES]`: at most
                            // `NV·LANES + kw − 1` past column `c0` of this padded row, inside
                            // the planes or the SLACK behind them (`NV·LANES <= 32 < SLACK`).
                            assert!(at + p.kw - 1 + width <= self.xp.len() && tap0 + p.kw <= k);
                            let line = self.xp[at..].as_ptr();
                            let taps: [*const T; MR] =
                                std::array::from_fn(|m| wrow[m][tap0..].as_ptr());
                            for kx in 0..p.kw {
                                let mut xv = [L::zero(); NV];
                                for (v, xv) in xv.iter_mut().enumerate() {
                                    // SAFETY: inside `xp` (asserted above).
                                    *xv = unsafe { L::load(line.add(kx + v * L::LANES)) };
                                }
                                for (a, tap) in acc.iter_mut().zip(&taps) {
                                    // SAFETY: tap `tap0 + kx` of this row of `w` (asserted).
                                    let wv = L::splat(unsafe { *tap.add(kx) });
                                    for (av, &x) in a.iter_mut().zip(&xv) {
                                        *av = x.mul_add(wv, *av);
                                    }
                                }
                            }
                        }
                    }
                    for (m, a) in acc.iter().enumerate().take(valid) {
                        let row = self.y_offset + ((co0 + m) * p.oh + r) * p.ow;
                        for (v, av) in a.iter().enumerate() {
                            let c = c0 + v * L::LANES;
                            if c >= p.ow {
                                break;
                            }
                            // SAFETY: columns `c .. c + n` of output row `r` of channel
                            // `co0 + m` of this image, inside `y`; this task alone owns the
                            // channel block of this image.
                            unsafe {
                                av.store_n(self.y.get().add(row + c), L::LANES.min(p.ow - c))
                            };
                        }
                    }
                }
            }
        }
    }
}

/// Backward-weight pass: `dw` only (lengths checked and `n > 0` ensured by the caller).
pub(super) fn backward_weight<T: ConvFloat>(
    vectors: ConvVectors,
    g: &Conv2dGeom,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
) {
    let p = Planes::forward(g);
    let k = p.taps();
    let lanes = T::lanes(vectors);
    // Vector accumulators `acc[co][tap][lane]` for a block of output channels at a time.
    let max_co = (DIRECT_SCRATCH_ELEMS / 2 / (k * lanes)).clamp(1, p.c_out);
    let co_blocks = p.c_out.div_ceil(max_co);
    let co_block = p.c_out.div_ceil(co_blocks);
    let per_chunk = images_per_chunk(&p, DIRECT_SCRATCH_ELEMS / 2);
    let (in_img, out_img) = (p.c_in * p.h * p.w, p.c_out * p.oh * p.ow);
    let lens = [co_block * k * lanes, per_chunk * p.padded_image() + SLACK];
    with_scratch::<T, 2, _>(lens, |[acc, xp]| {
        for outs in (0..p.c_out)
            .step_by(co_block)
            .map(|o| o..(o + co_block).min(p.c_out))
        {
            let acc = &mut acc[..outs.len() * k * lanes];
            acc.fill(T::zero());
            for start in (0..p.n).step_by(per_chunk) {
                let nb = per_chunk.min(p.n - start);
                let xp = &mut xp[..nb * p.padded_image() + SLACK];
                pad_columns(&p, &x[start * in_img..(start + nb) * in_img], nb, xp);
                let dy_chunk = &dy[start * out_img..(start + nb) * out_img];
                // Tasks own disjoint runs of output channels (rows of `acc`), a multiple
                // of every register tile's MR.
                let per_task = outs
                    .len()
                    .div_ceil(4 * num_threads())
                    .next_multiple_of(6)
                    .min(outs.len());
                let xp = &*xp;
                par_chunks_mut(acc, per_task * k * lanes, |task, acc_rows| {
                    let first = outs.start + task * per_task;
                    let outs = first..first + acc_rows.len() / (k * lanes);
                    T::run_kernel(
                        vectors,
                        WeightTile {
                            p: &p,
                            xp,
                            dy: dy_chunk,
                            nb,
                            outs,
                            acc: acc_rows,
                        },
                    )
                });
            }
            // dw[co][tap] = Σ_lanes acc[co][tap][lane].
            let dw_rows = &mut dw[outs.start * k..outs.end * k];
            let acc = &*acc;
            T::run_kernel(vectors, ReduceLanes { acc, dw: dw_rows });
        }
    })
}

struct WeightTile<'a, T> {
    p: &'a Planes,
    xp: &'a [T],
    dy: &'a [T],
    nb: usize,
    /// Output channels of this task; `acc` holds their `[tap][lane]` accumulators.
    outs: Range<usize>,
    acc: &'a mut [T],
}

impl<T: ConvFloat> LaneKernel<T> for WeightTile<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        // 9 accumulators for 16 registers (a 4×3 tile spilled), 18 for 32.
        match L::LANES {
            1 => self.tile::<L, 2, 3>(),
            2..=8 => self.tile::<L, 3, 3>(),
            _ => self.tile::<L, 6, 3>(),
        }
    }
}

impl<T: ConvFloat> WeightTile<'_, T> {
    /// Register tile: `MR` output channels × `NT` consecutive taps `kx` of one kernel row.
    #[inline(always)]
    fn tile<L: Lanes<Elem = T>, const MR: usize, const NT: usize>(self) {
        let p = self.p;
        let (wp, k, lanes) = (p.wp(), p.taps(), L::LANES);
        let acc = self.acc;
        assert_eq!(acc.len(), self.outs.len() * k * lanes);
        let acc_ptr = acc.as_mut_ptr();
        for img in 0..self.nb {
            let xp = &self.xp[img * p.padded_image()..];
            for m0 in (0..self.outs.len()).step_by(MR) {
                let valid = MR.min(self.outs.len() - m0);
                let dy_plane: [&[T]; MR] = std::array::from_fn(|m| {
                    let co = self.outs.start + m0 + m.min(valid - 1);
                    &self.dy[(img * p.c_out + co) * p.oh * p.ow..][..p.oh * p.ow]
                });
                for ci in 0..p.c_in {
                    for ky in 0..p.kh {
                        for kx0 in (0..p.kw).step_by(NT) {
                            let taps = NT.min(p.kw - kx0);
                            let tap0 = (ci * p.kh + ky) * p.kw + kx0;
                            // Accumulator of (channel m0 + m, tap tap0 + t); rows and taps past
                            // the valid ones repeat the last: computed, never stored.
                            let at = |m: usize, t: usize| {
                                ((m0 + m.min(valid - 1)) * k + tap0 + t.min(taps - 1)) * lanes
                            };
                            // SAFETY (loads and stores of `acc`): `at(m, t) + lanes <= acc.len()`.
                            let mut a = [[L::zero(); NT]; MR];
                            for (m, am) in a.iter_mut().enumerate() {
                                for (t, av) in am.iter_mut().enumerate() {
                                    *av = unsafe { L::load(acc_ptr.add(at(m, t))) };
                                }
                            }
                            for r in 0..p.oh {
                                let ih = (r + ky) as isize - p.pad_h;
                                if ih < 0 || ih >= p.h as isize {
                                    continue;
                                }
                                // Row r of each dY plane and the padded input row from column
                                // kx0: `ow` (`ow + taps − 1`) elements, asserted once per row.
                                let line = (ci * p.h + ih as usize) * wp + kx0;
                                assert!(line + p.ow + taps - 1 <= xp.len());
                                let line = xp[line..].as_ptr();
                                let dy_rows: [*const T; MR] = std::array::from_fn(|m| {
                                    dy_plane[m][r * p.ow..][..p.ow].as_ptr()
                                });
                                for c0 in (0..p.ow).step_by(lanes) {
                                    let n = lanes.min(p.ow - c0);
                                    let mut xv = [L::zero(); NT];
                                    for (t, xt) in xv.iter_mut().enumerate() {
                                        // SAFETY: columns c0 + t' .. + n of the padded row
                                        // (t' < taps), inside `xp` (asserted above).
                                        *xt =
                                            unsafe { L::load_n(line.add(c0 + t.min(taps - 1)), n) };
                                    }
                                    // One dY vector at a time, right before its FMAs.
                                    for (am, row) in a.iter_mut().zip(&dy_rows) {
                                        // SAFETY: columns c0 .. c0 + n of this dY row.
                                        let d = unsafe { L::load_n(row.add(c0), n) };
                                        for (av, &xt) in am.iter_mut().zip(&xv) {
                                            *av = d.mul_add(xt, *av);
                                        }
                                    }
                                }
                            }
                            for (m, am) in a.iter().enumerate().take(valid) {
                                for (t, av) in am.iter().enumerate().take(taps) {
                                    // SAFETY: see above; (m, t) is a valid accumulator.
                                    unsafe { av.store(acc_ptr.add(at(m, t))) };
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// `dw[i] = Σ_lanes acc[i·LANES + lane]` (fixed lane order).
struct ReduceLanes<'a, T> {
    acc: &'a [T],
    dw: &'a mut [T],
}

impl<T: ConvFloat> LaneKernel<T> for ReduceLanes<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        assert_eq!(self.acc.len(), self.dw.len() * L::LANES);
        for (d, a) in self.dw.iter_mut().zip(self.acc.chunks_exact(L::LANES)) {
            // SAFETY: `a` holds LANES elements.
            *d = unsafe { L::load(a.as_ptr()) }.reduce_sum();
        }
    }
}
