//! [`super::ConvAlgo::Im2col`]: any kernel/stride/padding, as im2col + GEMM over chunks of
//! images.
//!
//! For a chunk of `nb` images the column matrix is `cols[K, nb·P]` with `K = C_in·KH·KW` rows
//! (one per `(ci, ki, kj)` tap) and `P = OH·OW` columns per image, side by side. Then
//! - forward:         `Y[C_out, nb·P] = W[C_out, K] · cols`            (+ bias),
//! - backward-data:   `cols = Wᵀ[K, C_out] · dY[C_out, nb·P]`, then col2im (scatter-add),
//! - backward-weight: `dW[C_out, K] += dY · colsᵀ` over all chunks,   `db = Σ dY`.
//!
//! Chunks batch several small images into one wide GEMM (late VGG layers have P = 4..16,
//! far too narrow for one GEMM per image) while the scratch stays bounded (`MAX_COL_ELEMS`),
//! independent of the batch size. Chunks run one after another; the parallelism is inside
//! the GEMM (which splits over the thread pool) and inside im2col/col2im/scatter/gather
//! (parallel over disjoint rows or planes). Every output element therefore has one fixed
//! summation order: results do not depend on thread timing.
//!
//! Scratch buffers are cached per calling thread and reused across calls (see
//! [`super::conv2d_release_scratch`]). With a single image per chunk the GEMM writes straight into
//! `y` (and reads `dy` in place); 1×1/stride-1/pad-0 convolutions skip im2col entirely then.
use super::scratch::with_scratch;
use super::Conv2dGeom;
use crate::gemm::MatRef;
use crate::ops::{par_chunks_mut, units_per_task, SharedMutPtr};
use crate::parallel::{num_threads, parallel_for};
use crate::Float;

/// GEMM width to aim for when batching images into one column matrix.
const TARGET_COLS: usize = 2048;
/// Column matrices up to this size (elements, 4 MB in f32) stay cache-resident between
/// im2col and the GEMM, so layers with few taps (the 3-channel first layer) batch more
/// images than `TARGET_COLS` asks for: fewer, larger GEMM calls.
const CACHED_COL_ELEMS: usize = 1 << 20;
/// Upper bound on the column matrix (elements): 16 MB in f32, whatever the batch size.
const MAX_COL_ELEMS: usize = 1 << 22;
/// Elements per parallel task at least, for the copy loops.
const MIN_TASK_ELEMS: usize = 1 << 14;

/// Images per chunk: wide enough for an efficient GEMM, small enough to bound the scratch;
/// then evened out over the batch (128 images in chunks of 37 would leave a runt of 17).
/// Public so tests can make sure they cover single- and multi-image chunks.
pub fn conv2d_images_per_chunk(g: &Conv2dGeom) -> usize {
    let per_image = (g.taps() * g.out_h() * g.out_w()).max(1);
    let by_width = TARGET_COLS.div_ceil(g.out_h() * g.out_w()).max(1);
    let by_cache = CACHED_COL_ELEMS / per_image;
    let by_memory = MAX_COL_ELEMS / per_image;
    let per_chunk = by_width.max(by_cache).min(by_memory).clamp(1, g.n.max(1));
    let chunks = g.n.max(1).div_ceil(per_chunk);
    g.n.max(1).div_ceil(chunks)
}

/// Forward pass (lengths checked by the caller, [`super::conv2d_forward`]).
pub(super) fn forward<T: Float>(g: &Conv2dGeom, x: &[T], w: &[T], b: Option<&[T]>, y: &mut [T]) {
    let (k, p) = (g.taps(), g.out_h() * g.out_w());
    let (in_img, out_img) = (g.c_in * g.h * g.w, g.c_out * p);
    let per_chunk = conv2d_images_per_chunk(g);
    let w_mat = MatRef::row_major(w, k);
    with_scratch::<T, 2, _>(
        [k * per_chunk * p, g.c_out * per_chunk * p],
        |[cols, ybuf]| {
            for start in (0..g.n).step_by(per_chunk) {
                let nb = per_chunk.min(g.n - start);
                let ld = nb * p;
                let x_chunk = &x[start * in_img..(start + nb) * in_img];
                let y_chunk = &mut y[start * out_img..(start + nb) * out_img];
                let cols: &[T] = if nb == 1 && g.is_pointwise() {
                    x_chunk
                } else {
                    im2col(g, x_chunk, nb, &mut cols[..k * ld]);
                    &cols[..k * ld]
                };
                if nb == 1 {
                    // One image: GEMM straight into y, accumulating onto the bias.
                    let beta = match b {
                        Some(b) => {
                            for (row, &bias) in y_chunk.chunks_mut(p).zip(b) {
                                row.fill(bias);
                            }
                            T::one()
                        }
                        None => T::zero(),
                    };
                    let cols = MatRef::row_major(cols, p);
                    T::gemm(g.c_out, p, k, T::one(), w_mat, cols, beta, y_chunk, p);
                } else {
                    let ybuf = &mut ybuf[..g.c_out * ld];
                    let cols = MatRef::row_major(cols, ld);
                    T::gemm(g.c_out, ld, k, T::one(), w_mat, cols, T::zero(), ybuf, ld);
                    scatter_output(g.c_out, p, nb, ybuf, b, y_chunk);
                }
            }
        },
    );
}

/// Backward-data pass (lengths checked by the caller).
pub(super) fn backward_data<T: Float>(g: &Conv2dGeom, dy: &[T], w: &[T], dx: &mut [T]) {
    let (k, p) = (g.taps(), g.out_h() * g.out_w());
    let (in_img, out_img) = (g.c_in * g.h * g.w, g.c_out * p);
    let per_chunk = conv2d_images_per_chunk(g);
    // Wᵀ[K, C_out] is W read column-major.
    let wt = MatRef::col_major(w, k);
    with_scratch::<T, 2, _>(
        [k * per_chunk * p, g.c_out * per_chunk * p],
        |[cols, dybuf]| {
            for start in (0..g.n).step_by(per_chunk) {
                let nb = per_chunk.min(g.n - start);
                let ld = nb * p;
                let dy_chunk = &dy[start * out_img..(start + nb) * out_img];
                let dx_chunk = &mut dx[start * in_img..(start + nb) * in_img];
                let dy_mat: &[T] = if nb == 1 {
                    dy_chunk
                } else {
                    gather_output_grad(g.c_out, p, nb, dy_chunk, &mut dybuf[..g.c_out * ld]);
                    &dybuf[..g.c_out * ld]
                };
                let dy_mat = MatRef::row_major(dy_mat, ld);
                if nb == 1 && g.is_pointwise() {
                    T::gemm(
                        k,
                        ld,
                        g.c_out,
                        T::one(),
                        wt,
                        dy_mat,
                        T::zero(),
                        dx_chunk,
                        ld,
                    );
                } else {
                    let cols = &mut cols[..k * ld];
                    T::gemm(k, ld, g.c_out, T::one(), wt, dy_mat, T::zero(), cols, ld);
                    col2im(g, cols, nb, dx_chunk);
                }
            }
        },
    );
}

/// Backward-weight pass: `dw` only (lengths checked and `n > 0` ensured by the caller).
pub(super) fn backward_weight<T: Float>(g: &Conv2dGeom, x: &[T], dy: &[T], dw: &mut [T]) {
    let (k, p) = (g.taps(), g.out_h() * g.out_w());
    let (in_img, out_img) = (g.c_in * g.h * g.w, g.c_out * p);
    let per_chunk = conv2d_images_per_chunk(g);
    with_scratch::<T, 2, _>(
        [k * per_chunk * p, g.c_out * per_chunk * p],
        |[cols, dybuf]| {
            for (chunk_index, start) in (0..g.n).step_by(per_chunk).enumerate() {
                let nb = per_chunk.min(g.n - start);
                let ld = nb * p;
                let x_chunk = &x[start * in_img..(start + nb) * in_img];
                let dy_chunk = &dy[start * out_img..(start + nb) * out_img];
                let dy_mat: &[T] = if nb == 1 {
                    dy_chunk
                } else {
                    gather_output_grad(g.c_out, p, nb, dy_chunk, &mut dybuf[..g.c_out * ld]);
                    &dybuf[..g.c_out * ld]
                };
                let cols: &[T] = if nb == 1 && g.is_pointwise() {
                    x_chunk
                } else {
                    im2col(g, x_chunk, nb, &mut cols[..k * ld]);
                    &cols[..k * ld]
                };
                // dW[C_out, K] (+)= dY[C_out, ld] · colsᵀ[ld, K]; the first chunk overwrites.
                let beta = if chunk_index == 0 {
                    T::zero()
                } else {
                    T::one()
                };
                let dy_mat = MatRef::row_major(dy_mat, ld);
                let cols_t = MatRef::row_major(cols, ld).t();
                T::gemm(g.c_out, k, ld, T::one(), dy_mat, cols_t, beta, dw, k);
            }
        },
    );
}

/// The valid output columns `[lo, hi)` of a stride-1 tap with column offset `off = kj - pad`:
/// input column `c + off` must lie in `[0, w)`.
fn valid_cols(off: isize, w: usize, ow: usize) -> (usize, usize) {
    let lo = (-off).clamp(0, ow as isize) as usize;
    let hi = (w as isize - off).clamp(lo as isize, ow as isize) as usize;
    (lo, hi)
}

/// Fill `cols[K, nb·P]` (row stride `nb·P`) from a chunk of `nb` images. Parallel over rows
/// (taps); each row holds that tap's shifted input for every image of the chunk.
fn im2col<T: Float>(g: &Conv2dGeom, x_chunk: &[T], nb: usize, cols: &mut [T]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let (p, plane) = (oh * ow, g.h * g.w);
    let ld = nb * p;
    let rows_per_task = units_per_task(g.taps(), ld, MIN_TASK_ELEMS);
    let table = (p <= SMALL_PLANE).then(|| tap_table(g));
    par_chunks_mut(cols, rows_per_task * ld, |t, rows| {
        for (j, row) in rows.chunks_mut(ld).enumerate() {
            let r = t * rows_per_task + j;
            let (ci, ki, kj) = (r / (g.kh * g.kw), (r / g.kw) % g.kh, r % g.kw);
            for img in 0..nb {
                let src = &x_chunk[(img * g.c_in + ci) * plane..][..plane];
                let dst = &mut row[img * p..(img + 1) * p];
                if let Some(table) = &table {
                    let tap = &table[(ki * g.kw + kj) * p..][..p];
                    for (d, &i) in dst.iter_mut().zip(tap) {
                        *d = if i == PADDING {
                            T::zero()
                        } else {
                            src[i as usize]
                        };
                    }
                } else if g.stride == 1 && ow == g.w {
                    im2col_tap_same_width(g, src, ki, kj, oh, dst);
                } else {
                    im2col_tap(g, src, ki, kj, oh, ow, dst);
                }
            }
        }
    });
}

/// Output planes up to this many pixels use [`tap_table`] in im2col/col2im: with rows of
/// 2..4 pixels, per-row copies would spend more on `memcpy` calls than on data.
const SMALL_PLANE: usize = 16;
/// Marks an output pixel whose tap reads the zero padding.
const PADDING: u32 = u32::MAX;

/// For every tap `(ki, kj)` and output pixel `q`, the input-plane index the tap reads, or
/// [`PADDING`]: `table[(ki·KW + kj)·P + q]`.
fn tap_table(g: &Conv2dGeom) -> Vec<u32> {
    let (oh, ow) = (g.out_h(), g.out_w());
    let mut table = Vec::with_capacity(g.kh * g.kw * oh * ow);
    for ki in 0..g.kh {
        for kj in 0..g.kw {
            for orow in 0..oh {
                for c in 0..ow {
                    let ih = (orow * g.stride + ki) as isize - g.pad as isize;
                    let iw = (c * g.stride + kj) as isize - g.pad as isize;
                    let inside = ih >= 0 && iw >= 0 && ih < g.h as isize && iw < g.w as isize;
                    table.push(if inside {
                        (ih as usize * g.w + iw as usize) as u32
                    } else {
                        PADDING
                    });
                }
            }
        }
    }
    table
}

/// One tap of one image, any stride: row by row.
fn im2col_tap<T: Float>(
    g: &Conv2dGeom,
    src: &[T],
    ki: usize,
    kj: usize,
    oh: usize,
    ow: usize,
    dst: &mut [T],
) {
    let off = kj as isize - g.pad as isize;
    for orow in 0..oh {
        let ih = (orow * g.stride + ki) as isize - g.pad as isize;
        let d = &mut dst[orow * ow..(orow + 1) * ow];
        if ih < 0 || ih >= g.h as isize {
            d.fill(T::zero());
            continue;
        }
        let s = &src[ih as usize * g.w..(ih as usize + 1) * g.w];
        if g.stride == 1 {
            // Contiguous: one copy framed by zero padding.
            let (lo, hi) = valid_cols(off, g.w, ow);
            d[..lo].fill(T::zero());
            let s0 = (lo as isize + off) as usize;
            d[lo..hi].copy_from_slice(&s[s0..s0 + (hi - lo)]);
            d[hi..].fill(T::zero());
        } else {
            for (c, v) in d.iter_mut().enumerate() {
                let iw = (c * g.stride) as isize + off;
                *v = if iw >= 0 && iw < g.w as isize {
                    s[iw as usize]
                } else {
                    T::zero()
                };
            }
        }
    }
}

/// Where one tap of a stride-1, same-width conv lands: valid columns `lo..hi`, valid output
/// rows `r_lo..r_hi`, and the constant offset from a column-buffer index to the input plane.
/// Shared by [`im2col_tap_same_width`] and its adjoint [`col2im_tap_same_width`], which must
/// agree exactly. `None` when the tap touches only padding.
struct SameWidthTap {
    lo: usize,
    hi: usize,
    r_lo: usize,
    r_hi: usize,
    shift: isize,
}

fn same_width_tap(g: &Conv2dGeom, ki: usize, kj: usize, oh: usize) -> Option<SameWidthTap> {
    let w = g.w;
    let off = kj as isize - g.pad as isize;
    let (lo, hi) = valid_cols(off, w, w);
    // Output rows whose input row `orow + ki - pad` exists.
    let r_lo = g.pad.saturating_sub(ki).min(oh);
    let r_hi = (g.h + g.pad).saturating_sub(ki).clamp(r_lo, oh);
    if lo >= hi || r_lo >= r_hi {
        return None;
    }
    let shift = (ki as isize - g.pad as isize) * w as isize + off;
    Some(SameWidthTap {
        lo,
        hi,
        r_lo,
        r_hi,
        shift,
    })
}

/// One tap of one image when stride is 1 and the output is as wide as the input ("same"
/// padding, e.g. every 3×3/pad-1 VGG conv): the tap is the whole plane shifted by a constant
/// offset, so the valid rows are ONE contiguous copy; afterwards only the columns that fell
/// into the left/right padding (holding wrapped-around neighbours) are zeroed. Much cheaper
/// than per-row copies when rows are short (late layers have 2..8 columns).
fn im2col_tap_same_width<T: Float>(
    g: &Conv2dGeom,
    src: &[T],
    ki: usize,
    kj: usize,
    oh: usize,
    dst: &mut [T],
) {
    let w = g.w;
    let Some(SameWidthTap {
        lo,
        hi,
        r_lo,
        r_hi,
        shift,
    }) = same_width_tap(g, ki, kj, oh)
    else {
        dst.fill(T::zero());
        return;
    };
    dst[..r_lo * w].fill(T::zero());
    dst[r_hi * w..].fill(T::zero());
    let (start, end) = (r_lo * w + lo, (r_hi - 1) * w + hi);
    let s0 = (start as isize + shift) as usize;
    dst[start..end].copy_from_slice(&src[s0..s0 + (end - start)]);
    if lo > 0 || hi < w {
        for d in dst[r_lo * w..r_hi * w].chunks_exact_mut(w) {
            zero_edges(d, lo, hi);
        }
    }
}

/// Scatter-add `cols[K, nb·P]` back into the input-shaped `dx_chunk` (overwritten).
///
/// Tasks own one input channel `ci` for a block of images: plane `(img, ci)` only receives
/// from channel `ci`'s taps, so no two tasks write the same element, and within a plane the
/// taps are added in a fixed order. A task walks its tap rows of `cols` in memory order (row
/// by row, images side by side), which matters when `cols` is larger than the TLB reach:
/// walking it column-wise (plane by plane) was several times slower for small planes.
/// `cols` is scratch and gets clobbered (see [`col2im_tap_same_width`]).
fn col2im<T: Float>(g: &Conv2dGeom, cols: &mut [T], nb: usize, dx_chunk: &mut [T]) {
    let (oh, ow) = (g.out_h(), g.out_w());
    let (p, plane) = (oh * ow, g.h * g.w);
    let ld = nb * p;
    let kk = g.kh * g.kw;
    assert!(cols.len() >= g.taps() * ld, "col2im: cols too short");
    assert_eq!(
        dx_chunk.len(),
        nb * g.c_in * plane,
        "col2im: dx_chunk length"
    );
    let blocks = (4 * num_threads()).div_ceil(g.c_in).clamp(1, nb);
    let block_len = nb.div_ceil(blocks);
    let blocks = nb.div_ceil(block_len);
    let table = (p <= SMALL_PLANE).then(|| tap_table(g));
    let cols_ptr = SharedMutPtr(cols.as_mut_ptr());
    let dx_ptr = SharedMutPtr(dx_chunk.as_mut_ptr());
    parallel_for(g.c_in * blocks, |task| {
        let (ci, block) = (task / blocks, task % blocks);
        let images = block * block_len..((block + 1) * block_len).min(nb);
        // SAFETY (both unsafe blocks below): the ranges lie inside `dx_chunk` / `cols`
        // (asserted above) and belong to this task alone: dx plane `(img, ci)` and the cols
        // segments `[r·ld + img·P, +P)` with `r` a tap row of channel `ci`, for the images of
        // this task's block. Both buffers stay exclusively borrowed until `parallel_for`
        // returns.
        let dx_plane = |img: usize| unsafe {
            std::slice::from_raw_parts_mut(dx_ptr.get().add((img * g.c_in + ci) * plane), plane)
        };
        for img in images.clone() {
            dx_plane(img).fill(T::zero());
        }
        for ki in 0..g.kh {
            for kj in 0..g.kw {
                let r = ci * kk + ki * g.kw + kj;
                for img in images.clone() {
                    let src = unsafe {
                        std::slice::from_raw_parts_mut(cols_ptr.get().add(r * ld + img * p), p)
                    };
                    let dxp = dx_plane(img);
                    if let Some(table) = &table {
                        let tap = &table[(ki * g.kw + kj) * p..][..p];
                        for (&sv, &i) in src.iter().zip(tap) {
                            if i != PADDING {
                                dxp[i as usize] += sv;
                            }
                        }
                    } else if g.stride == 1 && ow == g.w {
                        col2im_tap_same_width(g, src, ki, kj, oh, dxp);
                    } else {
                        col2im_tap(g, src, ki, kj, oh, ow, dxp);
                    }
                }
            }
        }
    });
}

/// One tap of one image, any stride: row by row.
fn col2im_tap<T: Float>(
    g: &Conv2dGeom,
    src: &[T],
    ki: usize,
    kj: usize,
    oh: usize,
    ow: usize,
    dxp: &mut [T],
) {
    let off = kj as isize - g.pad as isize;
    for orow in 0..oh {
        let ih = (orow * g.stride + ki) as isize - g.pad as isize;
        if ih < 0 || ih >= g.h as isize {
            continue;
        }
        let d = &mut dxp[ih as usize * g.w..(ih as usize + 1) * g.w];
        let s = &src[orow * ow..(orow + 1) * ow];
        if g.stride == 1 {
            let (lo, hi) = valid_cols(off, g.w, ow);
            let d0 = (lo as isize + off) as usize;
            for (dv, &sv) in d[d0..d0 + (hi - lo)].iter_mut().zip(&s[lo..hi]) {
                *dv += sv;
            }
        } else {
            for (c, &sv) in s.iter().enumerate() {
                let iw = (c * g.stride) as isize + off;
                if iw >= 0 && iw < g.w as isize {
                    d[iw as usize] += sv;
                }
            }
        }
    }
}

/// The adjoint of [`im2col_tap_same_width`]: the tap adds to the plane shifted by a constant
/// offset, as ONE long vectorizable loop (per-row loops of w-1 elements would run entirely in
/// the scalar remainder of a vectorized loop). Entries of `src` whose input column falls in
/// the padding would land on a wrapped-around neighbour, so they are zeroed first (adding an
/// exact 0 changes nothing).
fn col2im_tap_same_width<T: Float>(
    g: &Conv2dGeom,
    src: &mut [T],
    ki: usize,
    kj: usize,
    oh: usize,
    dxp: &mut [T],
) {
    let w = g.w;
    let Some(SameWidthTap {
        lo,
        hi,
        r_lo,
        r_hi,
        shift,
    }) = same_width_tap(g, ki, kj, oh)
    else {
        return;
    };
    if lo > 0 || hi < w {
        for s in src[r_lo * w..r_hi * w].chunks_exact_mut(w) {
            zero_edges(s, lo, hi);
        }
    }
    let (start, end) = (r_lo * w + lo, (r_hi - 1) * w + hi);
    let d0 = (start as isize + shift) as usize;
    for (d, &s) in dxp[d0..d0 + (end - start)].iter_mut().zip(&src[start..end]) {
        *d += s;
    }
}

/// Zero `row[..lo]` and `row[hi..]`. The common 3×3/pad-1 case zeroes single elements, where
/// a `memset` call per row would cost more than the store.
#[inline(always)]
fn zero_edges<T: Float>(row: &mut [T], lo: usize, hi: usize) {
    match lo {
        0 => {}
        1 => row[0] = T::zero(),
        _ => row[..lo].fill(T::zero()),
    }
    match row.len() - hi {
        0 => {}
        1 => row[hi] = T::zero(),
        _ => row[hi..].fill(T::zero()),
    }
}

/// `y_chunk[img, co, :] = ybuf[co, img·P..] + b[co]` (from GEMM layout to NCHW).
fn scatter_output<T: Float>(
    c_out: usize,
    p: usize,
    nb: usize,
    ybuf: &[T],
    b: Option<&[T]>,
    y_chunk: &mut [T],
) {
    let ld = nb * p;
    let per_task = units_per_task(nb * c_out, p, MIN_TASK_ELEMS);
    par_chunks_mut(y_chunk, per_task * p, |t, planes| {
        for (j, yp) in planes.chunks_mut(p).enumerate() {
            let pl = t * per_task + j;
            let (img, co) = (pl / c_out, pl % c_out);
            let src = &ybuf[co * ld + img * p..][..p];
            match b {
                Some(b) => {
                    for (yv, &sv) in yp.iter_mut().zip(src) {
                        *yv = sv + b[co];
                    }
                }
                None => yp.copy_from_slice(src),
            }
        }
    });
}

/// `dybuf[co, img·P..] = dy_chunk[img, co, :]` (from NCHW to GEMM layout).
fn gather_output_grad<T: Float>(
    c_out: usize,
    p: usize,
    nb: usize,
    dy_chunk: &[T],
    dybuf: &mut [T],
) {
    let ld = nb * p;
    let per_task = units_per_task(c_out, ld, MIN_TASK_ELEMS);
    par_chunks_mut(dybuf, per_task * ld, |t, rows| {
        for (j, row) in rows.chunks_mut(ld).enumerate() {
            let co = t * per_task + j;
            for img in 0..nb {
                row[img * p..(img + 1) * p]
                    .copy_from_slice(&dy_chunk[(img * c_out + co) * p..][..p]);
            }
        }
    });
}
