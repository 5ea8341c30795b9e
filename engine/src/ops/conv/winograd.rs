//! Winograd F(m×m, 3×3) convolution (Lavin & Gray 2015) for 3×3 stride-1 layers, all passes.
//!
//! 1-D, F(m, 3) computes m outputs of a 3-tap correlation from α = m + 2 inputs with α
//! multiplies: `y = Aᵀ [(G g) ⊙ (Bᵀ d)]`; 2-D nests it: `Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A` per
//! α×α input tile `d` (stride m, overlapping by 2) and 3×3 kernel `g`. Over channels the
//! element-wise product becomes, for each of the α² tile elements ξ, one GEMM:
//! - forward:         `M_ξ[tiles, C_out] = V_ξ[tiles, C_in] · U_ξ[C_in, C_out]`, then `Y = Aᵀ M A`;
//! - backward-data:   the same on `dY` with the kernel rotated 180° and C_in/C_out swapped
//!   (a stride-1 convolution's input gradient is a "full" convolution, padding `2 − pad`);
//! - backward-weight: `MW_ξ[C_out, C_in] = Σ_tiles D_ξᵀ · V_ξ` with `D = A dY_tile Aᵀ` (the
//!   adjoint of the output transform), then `dW = Gᵀ MW G` (the adjoint of `U = G g Gᵀ`).
//!
//! Variants: F(2x2,3x3) (α = 4, 16 GEMMs, points 0, ±1: exact ±1 transforms) and
//! F(4x4,3x3) (α = 6, 36 GEMMs, 4× fewer multiplies than im2col, points 0, −1, 1, ½, −2 —
//! the best-conditioned set of Barabasz et al. 2020 for F(4,3); Lavin's 0, ±1, ±2 gives
//! ~1.5× the error). Measured f32 errors (norm-wise, against an f64 direct convolution) are
//! in `tests/conv_algos.rs` and the README.
//!
//! Layouts (per chunk of images; `t` = tile index, image-major): `V[ξ][t][c_in]`,
//! `U[ξ][c_in][c_out-block]`, `M[ξ][t][c_out-block]`, `D[ξ][t][c_out-block]`,
//! `MW[ξ][c_out-block][c_in]`. Channels are innermost, so every transform works on vectors
//! of consecutive channels: one tile's patch is gathered for LANES channels into a small
//! stack block (NCHW planes are strided by channel), transformed with full vector
//! arithmetic and stored contiguously into the GEMM operands.
//!
//! Scratch: `U` (or `MW`) for a block of output channels, `V` and `M` (or `D`) for a chunk
//! of images, together at most [`WINOGRAD_SCRATCH_ELEMS`] (24 MB in f32) whatever the
//! batch size; output channels are blocked when one layer's transformed weights alone
//! would exceed half of it (512×512 channels with F(4x4): 4 blocks).
//!
//! Parallelism: transforms split over tiles (or channels), the α² GEMMs run one per task
//! (each single-threaded: no GEMM too narrow to split, full-size panels); every output
//! element has one fixed summation order, independent of the thread count.
use super::lanes::{ConvFloat, LaneKernel, Lanes};
use super::scratch::with_scratch;
use super::{Conv2dGeom, ConvVectors};
use crate::gemm::MatRef;
use crate::ops::{par_chunks_mut, units_per_task, SharedMutPtr};
use crate::parallel::parallel_for;
use std::marker::PhantomData;
use std::ops::Range;

/// The matrices of one Winograd variant F(M×M, 3×3) with α = `A` = M + 2: the definition the
/// straight-line transforms are checked against (tests only).
#[cfg(test)]
pub(super) struct Variant<const M: usize, const A: usize> {
    /// Bᵀ (α×α): input tile transform `V = Bᵀ d B`.
    bt: [[f64; A]; A],
    /// G (α×3): kernel transform `U = G g Gᵀ`.
    g: [[f64; 3]; A],
    /// Aᵀ (M×α): output transform `Y = Aᵀ M A`.
    at: [[f64; A]; M],
    /// A (α×M): output-gradient transform `D = A dY Aᵀ` (backward-weight).
    a: [[f64; M]; A],
    /// Gᵀ (3×α): weight-gradient transform `dW = Gᵀ MW G`.
    gt: [[f64; A]; 3],
}

#[cfg(test)]
const fn transpose<const R: usize, const C: usize>(m: [[f64; C]; R]) -> [[f64; R]; C] {
    let mut t = [[0.0; R]; C];
    let mut i = 0;
    while i < R {
        let mut j = 0;
        while j < C {
            t[j][i] = m[i][j];
            j += 1;
        }
        i += 1;
    }
    t
}

#[cfg(test)]
impl<const M: usize, const A: usize> Variant<M, A> {
    const fn new(bt: [[f64; A]; A], g: [[f64; 3]; A], at: [[f64; A]; M]) -> Self {
        Variant {
            bt,
            g,
            at,
            a: transpose(at),
            gt: transpose(g),
        }
    }
}

/// A Winograd variant as a (zero-sized) type: its matrices ([`Winograd::var`], the
/// definition) and the five 1-D transforms they define, written out as straight-line vector
/// code (zero and ±1 coefficients cost nothing; a generic matrix-times-vector loop was left
/// as branches and multiplies by the compiler). `tests::transforms_match_their_matrices`
/// checks each function against its matrix.
pub(super) trait Winograd<const M: usize, const A: usize>:
    Copy + Send + Sync + 'static
{
    #[cfg(test)]
    fn var() -> &'static Variant<M, A>;
    /// `Bᵀ d`.
    fn bt<L: Lanes>(d: [L; A]) -> [L; A];
    /// `G k`.
    fn g<L: Lanes>(k: [L; 3]) -> [L; A];
    /// `Aᵀ m`.
    fn at<L: Lanes>(m: [L; A]) -> [L; M];
    /// `A y`.
    fn a<L: Lanes>(y: [L; M]) -> [L; A];
    /// `Gᵀ m`.
    fn gt<L: Lanes>(m: [L; A]) -> [L; 3];
}

/// F(2x2,3x3).
#[derive(Clone, Copy)]
pub(super) struct F2;
/// F(4x4,3x3).
#[derive(Clone, Copy)]
pub(super) struct F4;

#[inline(always)]
fn k<L: Lanes>(c: f64) -> L {
    L::constant(c)
}

impl Winograd<2, 4> for F2 {
    #[cfg(test)]
    fn var() -> &'static Variant<2, 4> {
        &F2_MATRICES
    }
    #[inline(always)]
    fn bt<L: Lanes>([d0, d1, d2, d3]: [L; 4]) -> [L; 4] {
        [d0.sub(d2), d1.add(d2), d2.sub(d1), d1.sub(d3)]
    }
    #[inline(always)]
    fn g<L: Lanes>([k0, k1, k2]: [L; 3]) -> [L; 4] {
        let t = k0.add(k2);
        [k0, t.add(k1).mul(k(0.5)), t.sub(k1).mul(k(0.5)), k2]
    }
    #[inline(always)]
    fn at<L: Lanes>([m0, m1, m2, m3]: [L; 4]) -> [L; 2] {
        [m0.add(m1).add(m2), m1.sub(m2).sub(m3)]
    }
    #[inline(always)]
    fn a<L: Lanes>([y0, y1]: [L; 2]) -> [L; 4] {
        [y0, y0.add(y1), y0.sub(y1), L::zero().sub(y1)]
    }
    #[inline(always)]
    fn gt<L: Lanes>([m0, m1, m2, m3]: [L; 4]) -> [L; 3] {
        let s = m1.add(m2).mul(k(0.5));
        [m0.add(s), m1.sub(m2).mul(k(0.5)), s.add(m3)]
    }
}

impl Winograd<4, 6> for F4 {
    #[cfg(test)]
    fn var() -> &'static Variant<4, 6> {
        &F4_MATRICES
    }
    #[inline(always)]
    fn bt<L: Lanes>([d0, d1, d2, d3, d4, d5]: [L; 6]) -> [L; 6] {
        [
            d3.sub(d1).mul_add(k(1.5), d0.add(d4)).sub(d2.add(d2)),
            d2.mul_add(k(-2.5), d3.mul_add(k(0.5), d1.add(d4))),
            d3.mul_add(k(2.5), d2.mul_add(k(0.5), d4.sub(d1))),
            d3.sub(d1).mul_add(k(2.0), d4.sub(d2)),
            d1.sub(d3).mul_add(k(0.5), d4.sub(d2)),
            d4.sub(d2).mul_add(k(1.5), d1.sub(d3.add(d3)).add(d5)),
        ]
    }
    #[inline(always)]
    fn g<L: Lanes>([k0, k1, k2]: [L; 3]) -> [L; 6] {
        [
            k0,
            k1.sub(k0).sub(k2).mul(k(1.0 / 3.0)),
            k0.add(k1).add(k2).mul(k(1.0 / 3.0)),
            k1.mul_add(k(2.0), k2)
                .mul_add(k(-4.0 / 15.0), k0.mul(k(-16.0 / 15.0))),
            k2.mul_add(k(4.0), k0)
                .mul_add(k(1.0 / 15.0), k1.mul(k(-2.0 / 15.0))),
            k2,
        ]
    }
    #[inline(always)]
    fn at<L: Lanes>([m0, m1, m2, m3, m4, m5]: [L; 6]) -> [L; 4] {
        let (p, q) = (m2.add(m1), m2.sub(m1));
        [
            p.add(m3).add(m4).add(m0),
            m4.mul_add(k(-2.0), m3.mul_add(k(0.5), q)),
            m4.mul_add(k(4.0), m3.mul_add(k(0.25), p)),
            m4.mul_add(k(-8.0), m3.mul_add(k(0.125), q)).add(m5),
        ]
    }
    #[inline(always)]
    fn a<L: Lanes>([y0, y1, y2, y3]: [L; 4]) -> [L; 6] {
        let (e, o) = (y0.add(y2), y1.add(y3));
        [
            y0,
            e.sub(o),
            e.add(o),
            y3.mul_add(k(0.125), y2.mul_add(k(0.25), y1.mul_add(k(0.5), y0))),
            y3.mul_add(k(-8.0), y2.mul_add(k(4.0), y1.mul_add(k(-2.0), y0))),
            y3,
        ]
    }
    #[inline(always)]
    fn gt<L: Lanes>([m0, m1, m2, m3, m4, m5]: [L; 6]) -> [L; 3] {
        let (p, q) = (m2.add(m1), m2.sub(m1));
        [
            m4.mul_add(
                k(1.0 / 15.0),
                m3.mul_add(k(-16.0 / 15.0), q.mul_add(k(1.0 / 3.0), m0)),
            ),
            m4.mul_add(
                k(-2.0 / 15.0),
                m3.mul_add(k(-8.0 / 15.0), p.mul(k(1.0 / 3.0))),
            ),
            m4.sub(m3)
                .mul_add(k(4.0 / 15.0), q.mul_add(k(1.0 / 3.0), m5)),
        ]
    }
}

/// F(2x2,3x3), interpolation points 0, 1, −1 (Lavin & Gray's matrices).
#[cfg(test)]
const F2_MATRICES: Variant<2, 4> = Variant::new(
    [
        [1.0, 0.0, -1.0, 0.0],
        [0.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.0],
        [0.0, 1.0, 0.0, -1.0],
    ],
    [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ],
    [[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, -1.0, -1.0]],
);

/// F(4x4,3x3), interpolation points 0, −1, 1, ½, −2 (and ∞): Bᵀ rows are the coefficients of
/// `Π_{l≠j}(x − p_l)`, G rows `p_j^k / Π_{l≠j}(p_j − p_l)`, Aᵀ columns `p_j^i` (Cook–Toom).
/// Every entry of Bᵀ and Aᵀ is exact in binary; G's thirds and fifteenths round once.
#[cfg(test)]
const F4_MATRICES: Variant<4, 6> = Variant::new(
    [
        [1.0, -1.5, -2.0, 1.5, 1.0, 0.0],
        [0.0, 1.0, -2.5, 0.5, 1.0, 0.0],
        [0.0, -1.0, 0.5, 2.5, 1.0, 0.0],
        [0.0, -2.0, -1.0, 2.0, 1.0, 0.0],
        [0.0, 0.5, -1.0, -0.5, 1.0, 0.0],
        [0.0, 1.0, -1.5, -2.0, 1.5, 1.0],
    ],
    [
        [1.0, 0.0, 0.0],
        [-1.0 / 3.0, 1.0 / 3.0, -1.0 / 3.0],
        [1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0],
        [-16.0 / 15.0, -8.0 / 15.0, -4.0 / 15.0],
        [1.0 / 15.0, -2.0 / 15.0, 4.0 / 15.0],
        [0.0, 0.0, 1.0],
    ],
    [
        [1.0, 1.0, 1.0, 1.0, 1.0, 0.0],
        [0.0, -1.0, 1.0, 0.5, -2.0, 0.0],
        [0.0, 1.0, 1.0, 0.25, 4.0, 0.0],
        [0.0, -1.0, 1.0, 0.125, -8.0, 1.0],
    ],
);

/// Upper bound on one call's scratch (elements; 24 MB in f32), whatever the batch size.
const WINOGRAD_SCRATCH_ELEMS: usize = 6 << 20;
/// Output-channel blocks are multiples of this (a whole number of 16-lane vectors).
const CHANNEL_ALIGN: usize = 16;
/// Most lanes any vector type has (size of the gather/scatter stack blocks).
const MAX_LANES: usize = 16;
/// Elements per parallel transform task at least.
const MIN_TASK_ELEMS: usize = 1 << 13;

/// Multiply-adds of the batched GEMMs of F(m×m, 3×3) for one pass of `g`.
pub(super) fn macs(g: &Conv2dGeom, m: usize) -> usize {
    let alpha = m + 2;
    let tiles = g.out_h().div_ceil(m) * g.out_w().div_ceil(m);
    g.n * tiles * alpha * alpha * g.c_in * g.c_out
}

/// `F · X · Fᵀ` for the N×N tile `$x` of `$L` vectors, where `$f` (a path to one of
/// [`Winograd`]'s 1-D transforms) applies the P×N matrix `F` to a vector: first to every
/// column, then to every row of the result.
///
/// A macro, so `$f` is a direct call: a function passed as `impl Fn` is called through a
/// `Fn::call` shim that was not inlined and so ran without the SIMD level's target
/// features, every vector operation an out-of-line call (seen in profiles). For the same
/// reason kernel bodies use plain loops, not `array::map`/`from_fn` closures, for vector
/// operations.
macro_rules! apply2d {
    ($L:ty, $x:expr, $f:path, $n:expr, $p:expr) => {{
        let x: &[[$L; $n]; $n] = $x;
        let mut t = [[<$L>::zero(); $n]; $p];
        for j in 0..$n {
            let mut col = [<$L>::zero(); $n];
            for i in 0..$n {
                col[i] = x[i][j];
            }
            let col = $f(col);
            for a in 0..$p {
                t[a][j] = col[a];
            }
        }
        let mut out = [[<$L>::zero(); $p]; $p];
        for a in 0..$p {
            out[a] = $f(t[a]);
        }
        out
    }};
}

/// A stride-1 3×3 convolution as the transforms see it: `c_in` planes of `h×w` into `c_out`
/// planes of `oh×ow`; output tile (th, tw)'s input patch starts at (th·m − pad, tw·m − pad).
/// (Backward-data is such a convolution of `dY`, see [`Planes::backward_data`].)
#[derive(Clone, Copy)]
struct Planes {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    oh: usize,
    ow: usize,
    pad: isize,
    /// Output tiles per column / row.
    tiles_h: usize,
    tiles_w: usize,
}

impl Planes {
    fn new(
        m: usize,
        n: usize,
        (c_in, h, w): (usize, usize, usize),
        (c_out, oh, ow): (usize, usize, usize),
        pad: isize,
    ) -> Self {
        Planes {
            n,
            c_in,
            h,
            w,
            c_out,
            oh,
            ow,
            pad,
            tiles_h: oh.div_ceil(m),
            tiles_w: ow.div_ceil(m),
        }
    }
    fn forward(g: &Conv2dGeom, m: usize) -> Self {
        let out = (g.c_out, g.out_h(), g.out_w());
        Planes::new(m, g.n, (g.c_in, g.h, g.w), out, g.pad as isize)
    }
    /// `dX` is the convolution of `dY` (padded by `2 − pad`, negative meaning cropped) with
    /// the 180°-rotated kernel, input and output channels swapped.
    fn backward_data(g: &Conv2dGeom, m: usize) -> Self {
        let dy = (g.c_out, g.out_h(), g.out_w());
        Planes::new(m, g.n, dy, (g.c_in, g.h, g.w), 2 - g.pad as isize)
    }
    fn tiles_per_image(&self) -> usize {
        self.tiles_h * self.tiles_w
    }
    /// (image in chunk, tile row, tile column) of tile `t`.
    fn tile(&self, t: usize) -> (usize, usize, usize) {
        let per = self.tiles_per_image();
        (t / per, (t % per) / self.tiles_w, t % self.tiles_w)
    }
}

/// How a pass reads the kernel `w[C_out][C_in][3][3]`. `U_ξ` is stored row-major over
/// (w's output channel, w's input channel) — the kernel transform is vectorized over w's
/// input channels, whose taps are contiguous — which makes it `[cb × C_in]` for the forward
/// pass (the GEMM reads it as a column-major `C_in × cb` B) and `[C_out × cb]` for
/// backward-data (a row-major B).
#[derive(Clone, Copy)]
enum KernelRole {
    Forward {
        w_c_in: usize,
    },
    /// The kernel rotated by 180°, w's input channels being the pass's outputs.
    BackwardData {
        w_c_in: usize,
    },
}

impl KernelRole {
    /// The ranges of w's output and input channels that `U` holds for the pass's output
    /// channels `outs` (the pass reads `pass_c_in` input channels).
    fn block(self, pass_c_in: usize, outs: Range<usize>) -> (Range<usize>, Range<usize>) {
        match self {
            KernelRole::Forward { .. } => (outs, 0..pass_c_in),
            KernelRole::BackwardData { .. } => (0..pass_c_in, outs),
        }
    }
    /// `U_ξ` as the GEMM's B operand `[pass_c_in × cb]`.
    fn b_view<T>(self, u_xi: &[T], pass_c_in: usize, cb: usize) -> MatRef<'_, T> {
        match self {
            KernelRole::Forward { .. } => MatRef::col_major(u_xi, pass_c_in),
            KernelRole::BackwardData { .. } => MatRef::row_major(u_xi, cb),
        }
    }
    /// Index of tap `(ky, kx)` of `w[r][c]` as this pass reads it.
    #[inline(always)]
    fn index(self, r: usize, c: usize, ky: usize, kx: usize) -> usize {
        match self {
            KernelRole::Forward { w_c_in } => (r * w_c_in + c) * 9 + ky * 3 + kx,
            KernelRole::BackwardData { w_c_in } => (r * w_c_in + c) * 9 + (2 - ky) * 3 + (2 - kx),
        }
    }
}

/// Output-channel blocking and images per chunk for a pass with `c_in` input and `c_out`
/// output channels. The persistent part (`U` or `MW`) takes `α²·c_in·cb`, each tile
/// `α²·(c_in + cb)` (`V` plus `M` or `D`).
#[derive(Clone, Copy, Debug)]
struct Blocking {
    cb: usize,
    blocks: usize,
    images_per_chunk: usize,
}

fn blocking(
    alpha2: usize,
    c_in: usize,
    c_out: usize,
    tiles_per_image: usize,
    n: usize,
) -> Blocking {
    let max_cb = (WINOGRAD_SCRATCH_ELEMS / 2 / (alpha2 * c_in).max(1)).max(CHANNEL_ALIGN);
    let (cb, blocks) = if c_out <= max_cb {
        (c_out, 1)
    } else {
        let blocks = c_out.div_ceil(max_cb);
        let cb = c_out
            .div_ceil(blocks)
            .next_multiple_of(CHANNEL_ALIGN)
            .min(c_out);
        (cb, c_out.div_ceil(cb))
    };
    let rest = WINOGRAD_SCRATCH_ELEMS.saturating_sub(alpha2 * c_in * cb);
    let max_tiles = rest / (alpha2 * (c_in + cb)).max(1);
    let max_images = (max_tiles / tiles_per_image.max(1)).clamp(1, n.max(1));
    let chunks = n.max(1).div_ceil(max_images);
    Blocking {
        cb,
        blocks,
        images_per_chunk: n.max(1).div_ceil(chunks),
    }
}

/// Split `units` work units of `unit_elems` elements each into parallel tasks and run
/// `f(range)` for each.
fn par_ranges(units: usize, unit_elems: usize, f: impl Fn(Range<usize>) + Sync) {
    let per_task = units_per_task(units, unit_elems, MIN_TASK_ELEMS);
    parallel_for(units.div_ceil(per_task), |task| {
        f(task * per_task..((task + 1) * per_task).min(units))
    });
}

/// Forward pass (lengths checked by the caller).
pub(super) fn forward<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    _variant: W,
    vectors: ConvVectors,
    g: &Conv2dGeom,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    y: &mut [T],
) {
    let planes = Planes::forward(g, M);
    convolve::<T, W, M, A>(
        vectors,
        &planes,
        x,
        w,
        KernelRole::Forward { w_c_in: g.c_in },
        b,
        y,
    )
}

/// Backward-data pass (lengths checked by the caller).
pub(super) fn backward_data<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    _variant: W,
    vectors: ConvVectors,
    g: &Conv2dGeom,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
) {
    let planes = Planes::backward_data(g, M);
    convolve::<T, W, M, A>(
        vectors,
        &planes,
        dy,
        w,
        KernelRole::BackwardData { w_c_in: g.c_in },
        None,
        dx,
    )
}

/// `y = conv(x, kernel) (+ bias)` over `planes` by F(M×M, 3×3).
#[allow(clippy::too_many_arguments)]
fn convolve<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    p: &Planes,
    x: &[T],
    w: &[T],
    role: KernelRole,
    bias: Option<&[T]>,
    y: &mut [T],
) {
    let a2 = A * A;
    let tpi = p.tiles_per_image();
    let bl = blocking(a2, p.c_in, p.c_out, tpi, p.n);
    let max_tiles = bl.images_per_chunk * tpi;
    let (in_img, out_img) = (p.c_in * p.h * p.w, p.c_out * p.oh * p.ow);
    let lens = [
        a2 * p.c_in * bl.cb,
        a2 * max_tiles * p.c_in,
        a2 * max_tiles * bl.cb,
    ];
    with_scratch::<T, 3, _>(lens, |[u, v, mbuf]| {
        for start in (0..p.n).step_by(bl.images_per_chunk) {
            let nb = bl.images_per_chunk.min(p.n - start);
            let tiles = nb * tpi;
            let v = &mut v[..a2 * tiles * p.c_in];
            input_transform::<T, W, M, A>(
                vectors,
                p,
                &x[start * in_img..(start + nb) * in_img],
                tiles,
                v,
            );
            let y_chunk = &mut y[start * out_img..(start + nb) * out_img];
            for block in 0..bl.blocks {
                let o0 = block * bl.cb;
                let cb = bl.cb.min(p.c_out - o0);
                let u = &mut u[..a2 * p.c_in * cb];
                // With one block, U is computed once and kept for every chunk.
                if bl.blocks > 1 || start == 0 {
                    kernel_transform::<T, W, M, A>(vectors, w, role, p.c_in, o0..o0 + cb, u);
                }
                let mbuf = &mut mbuf[..a2 * tiles * cb];
                let (v, u) = (&*v, &*u);
                par_chunks_mut(mbuf, tiles * cb, |xi, m_xi| {
                    let v_xi = MatRef::row_major(&v[xi * tiles * p.c_in..], p.c_in);
                    let u_xi = role.b_view(&u[xi * p.c_in * cb..][..p.c_in * cb], p.c_in, cb);
                    T::gemm(tiles, cb, p.c_in, T::one(), v_xi, u_xi, T::zero(), m_xi, cb);
                });
                output_transform::<T, W, M, A>(vectors, p, mbuf, tiles, o0..o0 + cb, bias, y_chunk);
            }
        }
    });
}

/// Backward-weight pass: `dw` only (lengths checked and `n > 0` ensured by the caller).
pub(super) fn backward_weight<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    _variant: W,
    vectors: ConvVectors,
    g: &Conv2dGeom,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
) {
    let a2 = A * A;
    let p = Planes::forward(g, M);
    let tpi = p.tiles_per_image();
    let bl = blocking(a2, p.c_in, p.c_out, tpi, p.n);
    let max_tiles = bl.images_per_chunk * tpi;
    let (in_img, out_img) = (p.c_in * p.h * p.w, p.c_out * p.oh * p.ow);
    let lens = [
        a2 * bl.cb * p.c_in,
        a2 * max_tiles * p.c_in,
        a2 * max_tiles * bl.cb,
    ];
    with_scratch::<T, 3, _>(lens, |[mw, v, d]| {
        for block in 0..bl.blocks {
            let o0 = block * bl.cb;
            let cb = bl.cb.min(p.c_out - o0);
            let mw = &mut mw[..a2 * cb * p.c_in];
            for (chunk, start) in (0..p.n).step_by(bl.images_per_chunk).enumerate() {
                let nb = bl.images_per_chunk.min(p.n - start);
                let tiles = nb * tpi;
                let v = &mut v[..a2 * tiles * p.c_in];
                // With one block, V is computed once per chunk; with several, once per block.
                input_transform::<T, W, M, A>(
                    vectors,
                    &p,
                    &x[start * in_img..(start + nb) * in_img],
                    tiles,
                    v,
                );
                let d = &mut d[..a2 * tiles * cb];
                let dy_chunk = &dy[start * out_img..(start + nb) * out_img];
                grad_output_transform::<T, W, M, A>(vectors, &p, dy_chunk, tiles, o0..o0 + cb, d);
                // MW_ξ[cb, C_in] (+)= D_ξᵀ[cb, tiles] · V_ξ[tiles, C_in]; the first chunk overwrites.
                let beta = if chunk == 0 { T::zero() } else { T::one() };
                let (v, d) = (&*v, &*d);
                par_chunks_mut(mw, cb * p.c_in, |xi, mw_xi| {
                    let d_xi = MatRef {
                        data: &d[xi * tiles * cb..(xi + 1) * tiles * cb],
                        rs: 1,
                        cs: cb,
                    };
                    let v_xi = MatRef::row_major(&v[xi * tiles * p.c_in..], p.c_in);
                    T::gemm(cb, p.c_in, tiles, T::one(), d_xi, v_xi, beta, mw_xi, p.c_in);
                });
            }
            weight_grad_transform::<T, W, M, A>(vectors, mw, p.c_in, o0..o0 + cb, dw);
        }
    });
}

/// `V[ξ][t][c] = (Bᵀ d B)[ξ]` for every tile `t` of the chunk and channel `c`.
fn input_transform<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    p: &Planes,
    x_chunk: &[T],
    tiles: usize,
    v: &mut [T],
) {
    assert!(v.len() >= A * A * tiles * p.c_in);
    assert_eq!(
        x_chunk.len() * p.tiles_per_image(),
        tiles * p.c_in * p.h * p.w
    );
    let v_ptr = SharedMutPtr(v.as_mut_ptr());
    par_ranges(tiles, A * A * p.c_in, |range| {
        T::run_kernel(
            vectors,
            InputTransform::<T, W, M, A> {
                var: PhantomData,
                p,
                x: x_chunk,
                tiles,
                range,
                v: &v_ptr,
            },
        )
    });
}

struct InputTransform<'a, T, W, const M: usize, const A: usize> {
    var: PhantomData<W>,
    p: &'a Planes,
    x: &'a [T],
    tiles: usize,
    range: Range<usize>,
    v: &'a SharedMutPtr<T>,
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize> LaneKernel<T>
    for InputTransform<'_, T, W, M, A>
{
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        let p = self.p;
        let plane = p.h * p.w;
        let mut block = [[[T::zero(); MAX_LANES]; A]; A];
        for t in self.range.clone() {
            let (img, th, tw) = p.tile(t);
            let r0 = (th * M) as isize - p.pad;
            let q0 = (tw * M) as isize - p.pad;
            // The patch's rows and columns that lie inside the plane.
            let rows = clip(r0, A, p.h);
            let cols = clip(q0, A, p.w);
            for c0 in (0..p.c_in).step_by(L::LANES) {
                let lanes = L::LANES.min(p.c_in - c0);
                for lane in 0..lanes {
                    let src = &self.x[(img * p.c_in + c0 + lane) * plane..][..plane];
                    for (i, row) in block.iter_mut().enumerate() {
                        if !rows.contains(&i) {
                            row.iter_mut().for_each(|e| e[lane] = T::zero());
                            continue;
                        }
                        let line = &src[(r0 + i as isize) as usize * p.w..][..p.w];
                        for (j, e) in row.iter_mut().enumerate() {
                            e[lane] = if cols.contains(&j) {
                                line[(q0 + j as isize) as usize]
                            } else {
                                T::zero()
                            };
                        }
                    }
                }
                let mut d = [[L::zero(); A]; A];
                for (drow, brow) in d.iter_mut().zip(&block) {
                    for (dv, e) in drow.iter_mut().zip(brow) {
                        // SAFETY: `e` holds MAX_LANES >= LANES elements.
                        *dv = unsafe { L::load(e.as_ptr()) };
                    }
                }
                let out = apply2d!(L, &d, W::bt, A, A);
                for (i, orow) in out.iter().enumerate() {
                    for (j, ov) in orow.iter().enumerate() {
                        let xi = i * A + j;
                        // SAFETY: `(ξ·tiles + t)·c_in + c0 + lanes <= α²·tiles·c_in`, inside
                        // `v` (asserted by `input_transform`); tile `t` belongs to this task
                        // alone, so no other task writes these elements.
                        unsafe {
                            ov.store_n(self.v.get().add((xi * self.tiles + t) * p.c_in + c0), lanes)
                        };
                    }
                }
            }
        }
    }
}

/// The indices `i < len` with `start + i` inside `[0, size)`.
fn clip(start: isize, len: usize, size: usize) -> Range<usize> {
    let lo = (-start).clamp(0, len as isize) as usize;
    let hi = (size as isize - start).clamp(lo as isize, len as isize) as usize;
    lo..hi
}

/// `U_ξ[r][c] = (G g Gᵀ)[ξ]` for the kernels `g = w[r][c]` of the block [`KernelRole::block`]
/// gives for the pass's output channels `outs`.
fn kernel_transform<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    w: &[T],
    role: KernelRole,
    pass_c_in: usize,
    outs: Range<usize>,
    u: &mut [T],
) {
    let (rows, cols) = role.block(pass_c_in, outs);
    assert!(u.len() >= A * A * rows.len() * cols.len());
    let u_ptr = SharedMutPtr(u.as_mut_ptr());
    par_ranges(rows.len(), A * A * cols.len(), |range| {
        T::run_kernel(
            vectors,
            KernelTransform::<T, W, M, A> {
                var: PhantomData,
                w,
                role,
                rows: rows.clone(),
                cols: cols.clone(),
                range,
                u: &u_ptr,
            },
        )
    });
}

struct KernelTransform<'a, T, W, const M: usize, const A: usize> {
    var: PhantomData<W>,
    w: &'a [T],
    role: KernelRole,
    rows: Range<usize>,
    cols: Range<usize>,
    /// Rows (relative to `rows.start`) of this task.
    range: Range<usize>,
    u: &'a SharedMutPtr<T>,
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize> LaneKernel<T>
    for KernelTransform<'_, T, W, M, A>
{
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        let (n_rows, n_cols) = (self.rows.len(), self.cols.len());
        let mut block = [[[T::zero(); MAX_LANES]; 3]; 3];
        for r in self.range.clone() {
            for cb in (0..n_cols).step_by(L::LANES) {
                let lanes = L::LANES.min(n_cols - cb);
                // The lanes' 9 taps each: 9·lanes consecutive floats of w.
                for lane in 0..lanes {
                    let (wr, wc) = (self.rows.start + r, self.cols.start + cb + lane);
                    for (ky, row) in block.iter_mut().enumerate() {
                        for (kx, e) in row.iter_mut().enumerate() {
                            e[lane] = self.w[self.role.index(wr, wc, ky, kx)];
                        }
                    }
                }
                let mut k = [[L::zero(); 3]; 3];
                for (krow, brow) in k.iter_mut().zip(&block) {
                    for (kv, e) in krow.iter_mut().zip(brow) {
                        // SAFETY: `e` holds MAX_LANES >= LANES elements.
                        *kv = unsafe { L::load(e.as_ptr()) };
                    }
                }
                let out = apply2d!(L, &k, W::g, 3, A);
                for (a, orow) in out.iter().enumerate() {
                    for (b, ov) in orow.iter().enumerate() {
                        let at = ((a * A + b) * n_rows + r) * n_cols + cb;
                        // SAFETY: `at + lanes <= α²·rows·cols`, inside `u` (asserted by
                        // `kernel_transform`); row `r` belongs to this task alone.
                        unsafe { ov.store_n(self.u.get().add(at), lanes) };
                    }
                }
            }
        }
    }
}

/// `y[img][o][tile] = (Aᵀ M A) (+ bias[o])` for the output channels `outs` of every tile.
#[allow(clippy::too_many_arguments)]
fn output_transform<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    p: &Planes,
    mbuf: &[T],
    tiles: usize,
    outs: Range<usize>,
    bias: Option<&[T]>,
    y_chunk: &mut [T],
) {
    assert!(mbuf.len() >= A * A * tiles * outs.len() && outs.end <= p.c_out);
    assert_eq!(
        y_chunk.len() * p.tiles_per_image(),
        tiles * p.c_out * p.oh * p.ow
    );
    let y_ptr = SharedMutPtr(y_chunk.as_mut_ptr());
    par_ranges(tiles, A * A * outs.len(), |range| {
        T::run_kernel(
            vectors,
            OutputTransform::<T, W, M, A> {
                var: PhantomData,
                p,
                mbuf,
                tiles,
                outs: outs.clone(),
                bias,
                range,
                y: &y_ptr,
            },
        )
    });
}

struct OutputTransform<'a, T, W, const M: usize, const A: usize> {
    var: PhantomData<W>,
    p: &'a Planes,
    mbuf: &'a [T],
    tiles: usize,
    outs: Range<usize>,
    bias: Option<&'a [T]>,
    range: Range<usize>,
    y: &'a SharedMutPtr<T>,
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize> LaneKernel<T>
    for OutputTransform<'_, T, W, M, A>
{
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        let p = self.p;
        let (o0, cb) = (self.outs.start, self.outs.len());
        let plane = p.oh * p.ow;
        let mut block = [[[T::zero(); MAX_LANES]; M]; M];
        for t in self.range.clone() {
            let (img, th, tw) = p.tile(t);
            let rows = M.min(p.oh - th * M);
            let cols = M.min(p.ow - tw * M);
            for ob in (0..cb).step_by(L::LANES) {
                let lanes = L::LANES.min(cb - ob);
                let mut m = [[L::zero(); A]; A];
                for (i, mrow) in m.iter_mut().enumerate() {
                    for (j, mv) in mrow.iter_mut().enumerate() {
                        let at = ((i * A + j) * self.tiles + t) * cb + ob;
                        // SAFETY: `at + lanes <= α²·tiles·cb <= mbuf.len()`.
                        *mv = unsafe { L::load_n(self.mbuf[at..].as_ptr(), lanes) };
                    }
                }
                let mut out = apply2d!(L, &m, W::at, A, M);
                if let Some(bias) = self.bias {
                    let bv = &bias[o0 + ob..o0 + ob + lanes];
                    // SAFETY: `bv` holds `lanes` elements.
                    let bv = unsafe { L::load_n(bv.as_ptr(), lanes) };
                    for row in out.iter_mut() {
                        for o in row.iter_mut() {
                            *o = o.add(bv);
                        }
                    }
                }
                for (brow, orow) in block.iter_mut().zip(&out) {
                    for (e, ov) in brow.iter_mut().zip(orow) {
                        // SAFETY: `e` holds MAX_LANES >= LANES elements.
                        unsafe { ov.store(e.as_mut_ptr()) };
                    }
                }
                for lane in 0..lanes {
                    let base = (img * p.c_out + o0 + ob + lane) * plane + th * M * p.ow + tw * M;
                    for (i, brow) in block.iter().enumerate().take(rows) {
                        for (j, e) in brow.iter().enumerate().take(cols) {
                            // SAFETY: row `th·M + i < oh` and column `tw·M + j < ow` of plane
                            // `(img, o)`, inside `y_chunk` (asserted by `output_transform`);
                            // tile `t` belongs to this task alone.
                            unsafe { *self.y.get().add(base + i * p.ow + j) = e[lane] };
                        }
                    }
                }
            }
        }
    }
}

/// `D[ξ][t][o − o0] = (A dY_tile Aᵀ)[ξ]` (zero beyond the output's edge) for `outs`.
fn grad_output_transform<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    p: &Planes,
    dy_chunk: &[T],
    tiles: usize,
    outs: Range<usize>,
    d: &mut [T],
) {
    assert!(d.len() >= A * A * tiles * outs.len() && outs.end <= p.c_out);
    assert_eq!(
        dy_chunk.len() * p.tiles_per_image(),
        tiles * p.c_out * p.oh * p.ow
    );
    let d_ptr = SharedMutPtr(d.as_mut_ptr());
    par_ranges(tiles, A * A * outs.len(), |range| {
        T::run_kernel(
            vectors,
            GradOutputTransform::<T, W, M, A> {
                var: PhantomData,
                p,
                dy: dy_chunk,
                tiles,
                outs: outs.clone(),
                range,
                d: &d_ptr,
            },
        )
    });
}

struct GradOutputTransform<'a, T, W, const M: usize, const A: usize> {
    var: PhantomData<W>,
    p: &'a Planes,
    dy: &'a [T],
    tiles: usize,
    outs: Range<usize>,
    range: Range<usize>,
    d: &'a SharedMutPtr<T>,
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize> LaneKernel<T>
    for GradOutputTransform<'_, T, W, M, A>
{
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        let p = self.p;
        let (o0, cb) = (self.outs.start, self.outs.len());
        let plane = p.oh * p.ow;
        let mut block = [[[T::zero(); MAX_LANES]; M]; M];
        for t in self.range.clone() {
            let (img, th, tw) = p.tile(t);
            let rows = M.min(p.oh - th * M);
            let cols = M.min(p.ow - tw * M);
            for ob in (0..cb).step_by(L::LANES) {
                let lanes = L::LANES.min(cb - ob);
                for lane in 0..lanes {
                    let src = &self.dy[(img * p.c_out + o0 + ob + lane) * plane..][..plane];
                    for (i, brow) in block.iter_mut().enumerate() {
                        for (j, e) in brow.iter_mut().enumerate() {
                            e[lane] = if i < rows && j < cols {
                                src[(th * M + i) * p.ow + tw * M + j]
                            } else {
                                T::zero()
                            };
                        }
                    }
                }
                let mut dyt = [[L::zero(); M]; M];
                for (drow, brow) in dyt.iter_mut().zip(&block) {
                    for (dv, e) in drow.iter_mut().zip(brow) {
                        // SAFETY: `e` holds MAX_LANES >= LANES elements.
                        *dv = unsafe { L::load(e.as_ptr()) };
                    }
                }
                let out = apply2d!(L, &dyt, W::a, M, A);
                for (i, orow) in out.iter().enumerate() {
                    for (j, ov) in orow.iter().enumerate() {
                        let xi = i * A + j;
                        // SAFETY: `(ξ·tiles + t)·cb + ob + lanes <= α²·tiles·cb`, inside `d`
                        // (asserted by the caller); tile `t` belongs to this task alone.
                        unsafe {
                            ov.store_n(self.d.get().add((xi * self.tiles + t) * cb + ob), lanes)
                        };
                    }
                }
            }
        }
    }
}

/// `dw[o][i] = (Gᵀ MW G)` for the output channels `outs` (rows of `mw`), every input channel.
fn weight_grad_transform<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    mw: &[T],
    c_in: usize,
    outs: Range<usize>,
    dw: &mut [T],
) {
    let cb = outs.len();
    assert!(mw.len() >= A * A * cb * c_in && dw.len() >= outs.end * c_in * 9);
    let dw_ptr = SharedMutPtr(dw.as_mut_ptr());
    par_ranges(cb, A * A * c_in, |range| {
        T::run_kernel(
            vectors,
            WeightGradTransform::<T, W, M, A> {
                var: PhantomData,
                mw,
                c_in,
                outs: outs.clone(),
                range,
                dw: &dw_ptr,
            },
        )
    });
}

struct WeightGradTransform<'a, T, W, const M: usize, const A: usize> {
    var: PhantomData<W>,
    mw: &'a [T],
    c_in: usize,
    outs: Range<usize>,
    /// Rows (output channels relative to `outs.start`) of this task.
    range: Range<usize>,
    dw: &'a SharedMutPtr<T>,
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize> LaneKernel<T>
    for WeightGradTransform<'_, T, W, M, A>
{
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        let (o0, cb, c_in) = (self.outs.start, self.outs.len(), self.c_in);
        let mut block = [[[T::zero(); MAX_LANES]; 3]; 3];
        for o in self.range.clone() {
            for ib in (0..c_in).step_by(L::LANES) {
                let lanes = L::LANES.min(c_in - ib);
                let mut m = [[L::zero(); A]; A];
                for (i, mrow) in m.iter_mut().enumerate() {
                    for (j, mv) in mrow.iter_mut().enumerate() {
                        let at = ((i * A + j) * cb + o) * c_in + ib;
                        // SAFETY: `at + lanes <= α²·cb·c_in <= mw.len()`.
                        *mv = unsafe { L::load_n(self.mw[at..].as_ptr(), lanes) };
                    }
                }
                let out = apply2d!(L, &m, W::gt, A, 3);
                for (brow, orow) in block.iter_mut().zip(&out) {
                    for (e, ov) in brow.iter_mut().zip(orow) {
                        // SAFETY: `e` holds MAX_LANES >= LANES elements.
                        unsafe { ov.store(e.as_mut_ptr()) };
                    }
                }
                for lane in 0..lanes {
                    let base = ((o0 + o) * c_in + ib + lane) * 9;
                    for (ky, brow) in block.iter().enumerate() {
                        for (kx, e) in brow.iter().enumerate() {
                            // SAFETY: `base + 8 < outs.end·c_in·9 <= dw.len()` (asserted by
                            // `weight_grad_transform`); output channel `o0 + o` belongs to
                            // this task alone.
                            unsafe { *self.dw.get().add(base + ky * 3 + kx) = e[lane] };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 1-D identity behind every pass: `Σ_ξ Aᵀ[i][ξ] G[ξ][k] Bᵀ[ξ][l] = [l == i + k]`
    /// (output i of a 3-tap correlation reads input i + k with tap k), to f64 rounding of
    /// G's thirds and fifteenths.
    fn check_identity<const M: usize, const A: usize>(var: &Variant<M, A>) {
        for i in 0..M {
            for k in 0..3 {
                for l in 0..A {
                    let s: f64 = (0..A)
                        .map(|x| var.at[i][x] * var.g[x][k] * var.bt[x][l])
                        .sum();
                    let want = if l == i + k { 1.0 } else { 0.0 };
                    assert!((s - want).abs() < 1e-14, "F({M},3): i={i} k={k} l={l}: {s}");
                }
            }
        }
        for i in 0..A {
            for j in 0..M {
                assert_eq!(var.a[i][j], var.at[j][i]);
            }
            for k in 0..3 {
                assert_eq!(var.gt[k][i], var.g[i][k]);
            }
        }
    }

    /// Each straight-line 1-D transform equals its matrix (columns = images of unit vectors).
    fn check_transforms<W: Winograd<M, A>, const M: usize, const A: usize>() {
        use crate::ops::conv::lanes::F64Lane;
        fn check<const N: usize, const P: usize>(
            what: &str,
            mat: &[[f64; N]; P],
            f: impl Fn([F64Lane; N]) -> [F64Lane; P],
        ) {
            for j in 0..N {
                let unit = std::array::from_fn(|i| F64Lane::splat(if i == j { 1.0 } else { 0.0 }));
                let col = f(unit);
                for (i, v) in col.iter().enumerate() {
                    let got = v.reduce_sum();
                    assert!(
                        (got - mat[i][j]).abs() < 1e-15,
                        "F({M},3) {what}[{i}][{j}]: {got} vs {}",
                        mat[i][j]
                    );
                }
            }
        }
        let var = W::var();
        check("Bt", &var.bt, W::bt);
        check("G", &var.g, W::g);
        check("At", &var.at, W::at);
        check("A", &var.a, W::a);
        check("Gt", &var.gt, W::gt);
    }

    #[test]
    fn transforms_match_their_matrices() {
        check_transforms::<F2, 2, 4>();
        check_transforms::<F4, 4, 6>();
    }

    #[test]
    fn winograd_matrices_satisfy_the_bilinear_identity() {
        check_identity(F2::var());
        check_identity(F4::var());
    }

    #[test]
    fn blocking_bounds_the_scratch() {
        for &(a2, c_in, c_out, tpi, n) in &[
            (36, 512, 512, 1, 256),
            (36, 64, 128, 16, 128),
            (16, 512, 512, 1, 128),
            (36, 3, 64, 64, 7),
            (36, 4096, 4096, 1, 2),
        ] {
            let b = blocking(a2, c_in, c_out, tpi, n);
            let used = a2 * c_in * b.cb + a2 * b.images_per_chunk * tpi * (c_in + b.cb);
            assert!(
                b.cb * b.blocks >= c_out && b.cb * (b.blocks - 1) < c_out,
                "{b:?}"
            );
            assert!(b.images_per_chunk >= 1 && b.images_per_chunk <= n.max(1));
            // Over budget only when a single image and the smallest block already are.
            let floor = a2 * c_in * b.cb + a2 * tpi * (c_in + b.cb);
            assert!(
                used <= WINOGRAD_SCRATCH_ELEMS || used == floor,
                "{b:?} uses {used}"
            );
        }
    }
}
