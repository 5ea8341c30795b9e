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
//! Data flow: the transforms write the batched GEMMs' operands in the form the SGEMM
//! microkernel reads without any packing pass ([`crate::gemm::sgemm_packed_b`]): B as
//! `NR`-wide panels ([`Panels`]), A as a plain row-major matrix that the microkernel
//! broadcasts from in place. Per chunk of images (`t` = tile index, image-major):
//! - forward / backward-data: `V_ξ` = B `[C_in × tiles]` (input transform, vectorized over
//!   consecutive tiles: one vector store per panel run), `Uᵀ_ξ` = A `[cb × C_in]` (kernel
//!   transform, vectorized over input channels), `C_ξ = Uᵀ_ξ V_ξ` `[cb × tiles]`, read back
//!   by the output transform vectorized over tiles;
//! - backward-weight: `Vᵀ_ξ` = B `[tiles × C_in]` (vectorized over channels), `D_ξ` = A
//!   `[cb × tiles]` (vectorized over tiles), `MW_ξ = D_ξ Vᵀ_ξ` `[cb × C_in]` accumulated over
//!   chunks, then the weight-gradient transform vectorized over input channels.
//!
//! Every transform walks the α² ξ-planes as α² sequential streams (one cache line completed
//! at a time), and consecutive planes are skewed by a cache line ([`xi_stride`]) so the
//! streams do not all map to one L1 set. Patches are gathered per lane into a small stack
//! block (NCHW planes are strided by channel), then transformed with full-width vector
//! arithmetic by straight-line 1-D transforms ([`Winograd`]).
//!
//! Scratch: `U` (or `MW`) for a block of output channels, `V` and `M` (or `D`) for a chunk
//! of images, together at most [`WINOGRAD_SCRATCH_ELEMS`] (24 MB in f32) whatever the
//! batch size; output channels are blocked when one layer's transformed weights alone
//! would exceed half of it (512×512 channels with F(4x4): 4 blocks).
//!
//! Parallelism: transforms split over tiles (or channels), the α² GEMMs run one per task
//! (each single-threaded: no GEMM too narrow to split, full-size panels); every output
//! element has one fixed summation order, independent of the thread count.
use super::lanes::{prefetch, ConvFloat, LaneKernel, Lanes};
use super::scratch::with_scratch;
use super::{Conv2dGeom, ConvVectors};
use crate::gemm::{MatRef, PackedLayout, Panels};
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
/// Widest B panel (NR) of any GEMM kernel.
const MAX_PANEL: usize = 32;
/// Distance between consecutive ξ-planes of a transformed operand for planes of `len`
/// elements: rounded up to 1024 elements (4 KB in f32), plus one 64-byte line. The
/// transforms stream through all α² planes at once; planes a power of two apart (e.g.
/// 128×512 floats) would map every stream to the same L1 set and conflict-miss on every
/// access (measured: the transforms ran ~3× slower).
#[inline(always)]
fn xi_stride(len: usize) -> usize {
    len.next_multiple_of(1024) + 16
}

/// How far ahead (elements) the transforms prefetch along each ξ-plane: four cache lines.
/// They walk α² = 16 or 36 streams at once, more than the hardware prefetcher follows
/// (measured: ~10 % off the forward pass of the 64→128 layer).
const PREFETCH_AHEAD: usize = 64;

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

/// A tile's image (within the chunk), tile row and tile column.
#[derive(Clone, Copy, Default)]
struct Tile {
    img: usize,
    th: usize,
    tw: usize,
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
    /// Tile `t` of the chunk (tiles are numbered image by image, row by row).
    fn tile(&self, t: usize) -> Tile {
        let per = self.tiles_per_image();
        Tile {
            img: t / per,
            th: (t % per) / self.tiles_w,
            tw: t % self.tiles_w,
        }
    }
    /// The tile after `t` (no division: kernels walk tiles in order).
    #[inline(always)]
    fn next(&self, t: Tile) -> Tile {
        if t.tw + 1 < self.tiles_w {
            Tile { tw: t.tw + 1, ..t }
        } else if t.th + 1 < self.tiles_h {
            Tile {
                th: t.th + 1,
                tw: 0,
                ..t
            }
        } else {
            Tile {
                img: t.img + 1,
                th: 0,
                tw: 0,
            }
        }
    }
}

/// How a pass reads the kernel `w[C_out][C_in][3][3]`: the kernel transform walks w's
/// output channels ("rows") and, vectorized, its input channels ("columns", whose taps are
/// contiguous in `w`), and writes `Uᵀ` — the pass's output channels × its input channels —
/// as the packed A operand.
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
    /// w's (output, input) channel of A's row for the pass's output channel `o` and depth
    /// (the pass's input channel) `d`.
    #[inline(always)]
    fn w_coords(self, o: usize, d: usize) -> (usize, usize) {
        match self {
            KernelRole::Forward { .. } => (o, d),
            KernelRole::BackwardData { .. } => (d, o),
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

/// Split `units` work units of `unit_elems` elements each into parallel tasks whose first
/// unit is a multiple of `align`, and run `f(range)` for each.
fn par_ranges(units: usize, unit_elems: usize, align: usize, f: impl Fn(Range<usize>) + Sync) {
    let per_task = units_per_task(units, unit_elems, MIN_TASK_ELEMS).next_multiple_of(align);
    parallel_for(units.div_ceil(per_task), |task| {
        f(task * per_task..((task + 1) * per_task).min(units))
    });
}

/// The layout of the packed GEMM operands, checked against what the tile-vectorized
/// kernels assume: a vector of up to `MAX_LANES` consecutive depths never straddles a depth
/// block.
fn packed_layout<T: ConvFloat>() -> PackedLayout {
    let layout = T::packed_layout();
    assert!(layout.kc % MAX_LANES == 0, "{layout:?}");
    layout
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
    let role = KernelRole::Forward { w_c_in: g.c_in };
    convolve::<T, W, M, A>(vectors, &planes, x, w, role, b, y)
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
    let role = KernelRole::BackwardData { w_c_in: g.c_in };
    convolve::<T, W, M, A>(vectors, &planes, dy, w, role, None, dx)
}

/// `y = conv(x, kernel) (+ bias)` over `p` by F(M×M, 3×3): per chunk of images and block of
/// output channels, `C_ξ[cb, tiles] = Uᵀ_ξ[cb, C_in] · V_ξ[C_in, tiles]` for every ξ.
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
    let (a2, layout) = (A * A, packed_layout::<T>());
    let tpi = p.tiles_per_image();
    let bl = blocking(a2, p.c_in, p.c_out, tpi, p.n);
    let max_tiles = bl.images_per_chunk * tpi;
    let (in_img, out_img) = (p.c_in * p.h * p.w, p.c_out * p.oh * p.ow);
    let lens = [
        a2 * xi_stride(bl.cb * p.c_in),
        a2 * xi_stride(Panels::b(layout, max_tiles, p.c_in).len()),
        a2 * xi_stride(bl.cb * max_tiles),
    ];
    with_scratch::<T, 3, _>(lens, |[u, v, c]| {
        for start in (0..p.n).step_by(bl.images_per_chunk) {
            let nb = bl.images_per_chunk.min(p.n - start);
            let tiles = nb * tpi;
            let pv = Panels::b(layout, tiles, p.c_in);
            let v = &mut v[..a2 * xi_stride(pv.len())];
            let x_chunk = &x[start * in_img..(start + nb) * in_img];
            input_transform::<T, W, M, A>(vectors, p, x_chunk, InputLanes::Tiles, pv, v);
            let y_chunk = &mut y[start * out_img..(start + nb) * out_img];
            for block in 0..bl.blocks {
                let outs = block * bl.cb..((block + 1) * bl.cb).min(p.c_out);
                let cb = outs.len();
                let u = &mut u[..a2 * xi_stride(cb * p.c_in)];
                // With one block, U is computed once and kept for every chunk.
                if bl.blocks > 1 || start == 0 {
                    kernel_transform::<T, W, M, A>(vectors, w, role, p.c_in, outs.clone(), u);
                }
                let c = &mut c[..a2 * xi_stride(cb * tiles)];
                let (u, v) = (&*u, &*v);
                par_chunks_mut(c, xi_stride(cb * tiles), |xi, c_xi| {
                    let u_xi = &u[xi * xi_stride(cb * p.c_in)..][..cb * p.c_in];
                    let u_xi = MatRef::row_major(u_xi, p.c_in);
                    let v_xi = &v[xi * xi_stride(pv.len())..][..pv.len()];
                    T::gemm_packed_b(
                        layout,
                        cb,
                        tiles,
                        p.c_in,
                        u_xi,
                        v_xi,
                        T::zero(),
                        c_xi,
                        tiles,
                    );
                });
                output_over_tiles::<T, W, M, A>(vectors, p, c, tiles, outs, bias, y_chunk);
            }
        }
    });
}

/// Backward-weight pass: `dw` only (lengths checked and `n > 0` ensured by the caller). Per
/// block of output channels, `MW_ξ[cb, C_in] = Σ_chunks D_ξ[cb, tiles] · Vᵀ_ξ[tiles, C_in]`.
pub(super) fn backward_weight<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    _variant: W,
    vectors: ConvVectors,
    g: &Conv2dGeom,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
) {
    let (a2, layout) = (A * A, packed_layout::<T>());
    let p = Planes::forward(g, M);
    let tpi = p.tiles_per_image();
    let bl = blocking(a2, p.c_in, p.c_out, tpi, p.n);
    let max_tiles = bl.images_per_chunk * tpi;
    let (in_img, out_img) = (p.c_in * p.h * p.w, p.c_out * p.oh * p.ow);
    let lens = [
        a2 * xi_stride(bl.cb * p.c_in),
        a2 * xi_stride(Panels::b(layout, p.c_in, max_tiles).len()),
        a2 * xi_stride(bl.cb * max_tiles),
    ];
    with_scratch::<T, 3, _>(lens, |[mw, v, d]| {
        for block in 0..bl.blocks {
            let outs = block * bl.cb..((block + 1) * bl.cb).min(p.c_out);
            let cb = outs.len();
            let mw = &mut mw[..a2 * xi_stride(cb * p.c_in)];
            for (chunk, start) in (0..p.n).step_by(bl.images_per_chunk).enumerate() {
                let nb = bl.images_per_chunk.min(p.n - start);
                let tiles = nb * tpi;
                let pv = Panels::b(layout, p.c_in, tiles);
                let v = &mut v[..a2 * xi_stride(pv.len())];
                // With one block, V is computed once per chunk; with several, once per block.
                let x_chunk = &x[start * in_img..(start + nb) * in_img];
                let over = InputLanes::Channels;
                input_transform::<T, W, M, A>(vectors, &p, x_chunk, over, pv, v);
                let d = &mut d[..a2 * xi_stride(cb * tiles)];
                let dy_chunk = &dy[start * out_img..(start + nb) * out_img];
                grad_output_over_tiles::<T, W, M, A>(vectors, &p, dy_chunk, outs.clone(), d);
                // The first chunk overwrites MW, later ones accumulate.
                let beta = if chunk == 0 { T::zero() } else { T::one() };
                let (v, d) = (&*v, &*d);
                par_chunks_mut(mw, xi_stride(cb * p.c_in), |xi, mw_xi| {
                    let d_xi = &d[xi * xi_stride(cb * tiles)..][..cb * tiles];
                    let d_xi = MatRef::row_major(d_xi, tiles);
                    let v_xi = &v[xi * xi_stride(pv.len())..][..pv.len()];
                    T::gemm_packed_b(layout, cb, p.c_in, tiles, d_xi, v_xi, beta, mw_xi, p.c_in);
                });
            }
            weight_grad_transform::<T, W, M, A>(vectors, mw, p.c_in, outs, dw);
        }
    });
}

/// The indices `i < len` with `start + i` inside `[0, size)`.
fn clip(start: isize, len: usize, size: usize) -> Range<usize> {
    let lo = (-start).clamp(0, len as isize) as usize;
    let hi = (size as isize - start).clamp(lo as isize, len as isize) as usize;
    lo..hi
}

/// Copy the `S×S` patch of `plane` (`h×w`) whose top-left corner is `(r0, q0)` into lane
/// `lane` of `block`, zero outside the plane.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gather_patch<T: ConvFloat, const S: usize>(
    plane: &[T],
    h: usize,
    w: usize,
    r0: isize,
    q0: isize,
    block: &mut [[[T; MAX_LANES]; S]; S],
    lane: usize,
) {
    let (rows, cols) = (clip(r0, S, h), clip(q0, S, w));
    for (i, brow) in block.iter_mut().enumerate() {
        if !rows.contains(&i) {
            for e in brow.iter_mut() {
                e[lane] = T::zero();
            }
            continue;
        }
        let line = &plane[(r0 + i as isize) as usize * w..][..w];
        if cols.len() == S {
            let seg = &line[q0 as usize..q0 as usize + S];
            for (e, &v) in brow.iter_mut().zip(seg) {
                e[lane] = v;
            }
        } else {
            for (j, e) in brow.iter_mut().enumerate() {
                e[lane] = if cols.contains(&j) {
                    line[(q0 + j as isize) as usize]
                } else {
                    T::zero()
                };
            }
        }
    }
}

/// Zero lanes `from..` of every element of `block` (a partial vector's unused lanes).
#[inline(always)]
fn zero_lanes<T: ConvFloat, const S: usize>(block: &mut [[[T; MAX_LANES]; S]; S], from: usize) {
    for e in block.iter_mut().flatten() {
        e[from..].iter_mut().for_each(|v| *v = T::zero());
    }
}

/// Load lane block `block` (`S×S` elements of `MAX_LANES` lanes) as vectors.
#[inline(always)]
fn load_block<L: Lanes, const S: usize>(block: &[[[L::Elem; MAX_LANES]; S]; S]) -> [[L; S]; S] {
    let mut out = [[L::zero(); S]; S];
    for (orow, brow) in out.iter_mut().zip(block) {
        for (o, e) in orow.iter_mut().zip(brow) {
            // SAFETY: `e` holds MAX_LANES >= LANES elements.
            *o = unsafe { L::load(e.as_ptr()) };
        }
    }
    out
}

/// Store vectors into lane block `block`.
#[inline(always)]
fn store_block<L: Lanes, const S: usize>(
    v: &[[L; S]; S],
    block: &mut [[[L::Elem; MAX_LANES]; S]; S],
) {
    for (vrow, brow) in v.iter().zip(block.iter_mut()) {
        for (x, e) in vrow.iter().zip(brow.iter_mut()) {
            // SAFETY: `e` holds MAX_LANES >= LANES elements.
            unsafe { x.store(e.as_mut_ptr()) };
        }
    }
}

/// Which dimension the input transform's vector lanes run over, i.e. which packed B operand
/// it writes (see the module docs).
#[derive(Clone, Copy, PartialEq, Eq)]
enum InputLanes {
    /// `V_ξ` `[C_in × tiles]` (forward, backward-data): lanes = consecutive tiles; tile panel
    /// by tile panel, channel by channel.
    Tiles,
    /// `Vᵀ_ξ` `[tiles × C_in]` (backward-weight): lanes = consecutive channels; channel panel
    /// by channel panel, tile by tile.
    Channels,
}

/// `(Bᵀ d B)[ξ]` of every tile and channel of the chunk as the packed B operand `pv`, laid
/// out as `over` says. Either way each ξ-plane is written as one sequential stream.
fn input_transform<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    p: &Planes,
    x_chunk: &[T],
    over: InputLanes,
    pv: Panels,
    v: &mut [T],
) {
    let tiles = x_chunk.len() / (p.c_in * p.h * p.w) * p.tiles_per_image();
    let (want, align) = match over {
        InputLanes::Tiles => (
            Panels::b(T::packed_layout(), tiles, p.c_in),
            pv.panel_rows().max(MAX_LANES),
        ),
        InputLanes::Channels => (Panels::b(T::packed_layout(), p.c_in, tiles), 1),
    };
    assert!(v.len() >= A * A * xi_stride(pv.len()) && pv == want);
    assert!(pv.panel_rows() <= MAX_PANEL);
    let v_ptr = SharedMutPtr(v.as_mut_ptr());
    par_ranges(tiles, A * A * p.c_in, align, |range| {
        T::run_kernel(
            vectors,
            InputTransform::<T, W, M, A> {
                var: PhantomData,
                p,
                x: x_chunk,
                over,
                pv,
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
    over: InputLanes,
    pv: Panels,
    /// Tiles of this task (over tiles: the first a multiple of the panel width and of
    /// MAX_LANES).
    range: Range<usize>,
    v: &'a SharedMutPtr<T>,
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize> LaneKernel<T>
    for InputTransform<'_, T, W, M, A>
{
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        match self.over {
            InputLanes::Tiles => self.over_tiles::<L>(),
            InputLanes::Channels => self.over_channels::<L>(),
        }
    }
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>
    InputTransform<'_, T, W, M, A>
{
    /// Panels that hold whole vectors take vector stores; otherwise lane by lane. Returns
    /// (contiguous, rows per group).
    #[inline(always)]
    fn grouping<L: Lanes<Elem = T>>(&self) -> (bool, usize) {
        let nr = self.pv.panel_rows();
        let contiguous = nr.is_multiple_of(L::LANES);
        (contiguous, if contiguous { nr } else { L::LANES })
    }

    /// Transform the gathered patches and store them as rows `row0 ..` (+ lane) at `depth`
    /// of every ξ-plane.
    #[inline(always)]
    fn transform_and_store<L: Lanes<Elem = T>>(
        &self,
        block: &[[[T; MAX_LANES]; A]; A],
        (row0, depth, lanes): (usize, usize, usize),
        contiguous: bool,
    ) {
        let out = apply2d!(L, &load_block::<L, A>(block), W::bt, A, A);
        let base = self.pv.index(row0, depth);
        let mut lane_vals = [T::zero(); MAX_LANES];
        for (xi, ov) in out.iter().flatten().enumerate() {
            let plane = xi * xi_stride(self.pv.len());
            // SAFETY: element (row0 + lane, depth) of plane ξ of the packed operand, inside
            // `v` (asserted by `input_transform`); with whole vectors per panel the LANES
            // slots from `base` are one run of the zero-padded panel. These rows (tiles) or
            // this depth (tile) belong to this task alone.
            unsafe {
                // Over tiles, the next depths (channels) of this plane follow panel row by
                // panel row. (Prefetching the other streams' stores measured no better.)
                if self.over == InputLanes::Tiles {
                    prefetch(
                        self.v
                            .get()
                            .add(plane + base)
                            .wrapping_add(4 * self.pv.panel_rows()),
                    );
                }
                if contiguous {
                    ov.store(self.v.get().add(plane + base));
                } else {
                    ov.store(lane_vals.as_mut_ptr());
                    for (lane, &val) in lane_vals.iter().enumerate().take(lanes) {
                        let at = plane + self.pv.index(row0 + lane, depth);
                        *self.v.get().add(at) = val;
                    }
                }
            }
        }
    }

    #[inline(always)]
    fn over_tiles<L: Lanes<Elem = T>>(&self) {
        let p = self.p;
        let plane = p.h * p.w;
        let (contiguous, group) = self.grouping::<L>();
        let mut block = [[[T::zero(); MAX_LANES]; A]; A];
        let mut tiles = [Tile::default(); MAX_PANEL];
        let mut cursor = p.tile(self.range.start);
        for g0 in self.range.clone().step_by(group) {
            let gl = group.min(self.range.end - g0);
            for t in tiles.iter_mut().take(gl) {
                *t = cursor;
                cursor = p.next(cursor);
            }
            for c in 0..p.c_in {
                for v0 in (0..gl).step_by(L::LANES) {
                    let lanes = L::LANES.min(gl - v0);
                    if lanes < L::LANES {
                        zero_lanes(&mut block, lanes);
                    }
                    for (lane, t) in tiles[v0..v0 + lanes].iter().enumerate() {
                        let src = &self.x[(t.img * p.c_in + c) * plane..][..plane];
                        let (r0, q0) = ((t.th * M) as isize - p.pad, (t.tw * M) as isize - p.pad);
                        gather_patch(src, p.h, p.w, r0, q0, &mut block, lane);
                    }
                    self.transform_and_store::<L>(&block, (g0 + v0, c, lanes), contiguous);
                }
            }
        }
    }

    #[inline(always)]
    fn over_channels<L: Lanes<Elem = T>>(&self) {
        let p = self.p;
        let plane = p.h * p.w;
        let (contiguous, group) = self.grouping::<L>();
        let mut block = [[[T::zero(); MAX_LANES]; A]; A];
        for g0 in (0..p.c_in).step_by(group) {
            let gl = group.min(p.c_in - g0);
            let mut tile = p.tile(self.range.start);
            for t in self.range.clone() {
                let (r0, q0) = (
                    (tile.th * M) as isize - p.pad,
                    (tile.tw * M) as isize - p.pad,
                );
                for v0 in (0..gl).step_by(L::LANES) {
                    let (c0, lanes) = (g0 + v0, L::LANES.min(gl - v0));
                    if lanes < L::LANES {
                        zero_lanes(&mut block, lanes);
                    }
                    for lane in 0..lanes {
                        let src = &self.x[(tile.img * p.c_in + c0 + lane) * plane..][..plane];
                        gather_patch(src, p.h, p.w, r0, q0, &mut block, lane);
                    }
                    self.transform_and_store::<L>(&block, (c0, t, lanes), contiguous);
                }
                tile = p.next(tile);
            }
        }
    }
}

/// `Uᵀ_ξ[o][d] = (G g Gᵀ)[ξ]`, row-major (the GEMM's A, read in place): rows = the pass's
/// output channels `outs`, depth = its `pass_c_in` input channels, vectorized over depth.
fn kernel_transform<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    w: &[T],
    role: KernelRole,
    pass_c_in: usize,
    outs: Range<usize>,
    u: &mut [T],
) {
    assert!(u.len() >= A * A * xi_stride(outs.len() * pass_c_in));
    let u_ptr = SharedMutPtr(u.as_mut_ptr());
    par_ranges(outs.len(), A * A * pass_c_in, 1, |range| {
        T::run_kernel(
            vectors,
            KernelTransform::<T, W, M, A> {
                var: PhantomData,
                w,
                role,
                outs: outs.clone(),
                depth: pass_c_in,
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
    outs: Range<usize>,
    depth: usize,
    /// Rows (relative to `outs.start`) of this task.
    range: Range<usize>,
    u: &'a SharedMutPtr<T>,
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize> LaneKernel<T>
    for KernelTransform<'_, T, W, M, A>
{
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        let stride = xi_stride(self.outs.len() * self.depth);
        let mut taps = [[[T::zero(); MAX_LANES]; 3]; 3];
        for i in self.range.clone() {
            let o = self.outs.start + i;
            for d0 in (0..self.depth).step_by(L::LANES) {
                let lanes = L::LANES.min(self.depth - d0);
                for lane in 0..lanes {
                    let (wr, wc) = self.role.w_coords(o, d0 + lane);
                    for (ky, row) in taps.iter_mut().enumerate() {
                        for (kx, e) in row.iter_mut().enumerate() {
                            e[lane] = self.w[self.role.index(wr, wc, ky, kx)];
                        }
                    }
                }
                let u = apply2d!(L, &load_block::<L, 3>(&taps), W::g, 3, A);
                for (xi, uv) in u.iter().flatten().enumerate() {
                    let at = xi * stride + i * self.depth + d0;
                    // SAFETY: row i, depths d0 .. d0 + lanes of plane ξ, inside `u` (asserted
                    // by `kernel_transform`); row i belongs to this task alone.
                    unsafe { uv.store_n(self.u.get().add(at), lanes) };
                }
            }
        }
    }
}

/// `y[img][o][tile] = (Aᵀ C A) (+ bias[o])` for the output channels `outs`, from the GEMM
/// results `c` (`[ξ][o − outs.start][tile]`), vectorized over consecutive tiles: channel by
/// channel, so each ξ-plane of `c` is read sequentially.
#[allow(clippy::too_many_arguments)]
fn output_over_tiles<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    p: &Planes,
    c: &[T],
    tiles: usize,
    outs: Range<usize>,
    bias: Option<&[T]>,
    y_chunk: &mut [T],
) {
    assert!(c.len() >= A * A * xi_stride(tiles * outs.len()) && outs.end <= p.c_out);
    assert_eq!(
        y_chunk.len() * p.tiles_per_image(),
        tiles * p.c_out * p.oh * p.ow
    );
    let y_ptr = SharedMutPtr(y_chunk.as_mut_ptr());
    par_ranges(tiles, A * A * outs.len(), MAX_LANES, |range| {
        T::run_kernel(
            vectors,
            OutputOverTiles::<T, W, M, A> {
                var: PhantomData,
                p,
                c,
                tiles,
                outs: outs.clone(),
                bias,
                range,
                y: &y_ptr,
            },
        )
    });
}

struct OutputOverTiles<'a, T, W, const M: usize, const A: usize> {
    var: PhantomData<W>,
    p: &'a Planes,
    c: &'a [T],
    tiles: usize,
    outs: Range<usize>,
    bias: Option<&'a [T]>,
    range: Range<usize>,
    y: &'a SharedMutPtr<T>,
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize> LaneKernel<T>
    for OutputOverTiles<'_, T, W, M, A>
{
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        let p = self.p;
        let (o0, cb) = (self.outs.start, self.outs.len());
        let plane = p.oh * p.ow;
        let mut block = [[[T::zero(); MAX_LANES]; M]; M];
        let mut tiles = [Tile::default(); MAX_LANES];
        for o in 0..cb {
            let bias = self.bias.map(|b| b[o0 + o]);
            let mut cursor = p.tile(self.range.start);
            for t0 in self.range.clone().step_by(L::LANES) {
                let lanes = L::LANES.min(self.range.end - t0);
                for t in tiles.iter_mut().take(lanes) {
                    *t = cursor;
                    cursor = p.next(cursor);
                }
                let mut m = [[L::zero(); A]; A];
                for (xi, mv) in m.iter_mut().flatten().enumerate() {
                    let at = xi * xi_stride(cb * self.tiles) + o * self.tiles + t0;
                    let at = self.c[at..].as_ptr();
                    // SAFETY: `at + lanes` is inside plane ξ of `c` (asserted by `output_over_tiles`).
                    *mv = unsafe { L::load_n(at, lanes) };
                    prefetch(at.wrapping_add(PREFETCH_AHEAD));
                }
                let mut out = apply2d!(L, &m, W::at, A, M);
                if let Some(b) = bias {
                    let bv = L::splat(b);
                    for ov in out.iter_mut().flatten() {
                        *ov = ov.add(bv);
                    }
                }
                store_block(&out, &mut block);
                for (lane, t) in tiles.iter().enumerate().take(lanes) {
                    let rows = M.min(p.oh - t.th * M);
                    let cols = M.min(p.ow - t.tw * M);
                    let base = (t.img * p.c_out + o0 + o) * plane + t.th * M * p.ow + t.tw * M;
                    for (i, brow) in block.iter().enumerate().take(rows) {
                        for (j, e) in brow.iter().enumerate().take(cols) {
                            // SAFETY: row `th·M + i < oh` and column `tw·M + j < ow` of
                            // plane (img, o), inside `y_chunk` (asserted by
                            // `output_over_tiles`); the tile belongs to this task alone.
                            unsafe { *self.y.get().add(base + i * p.ow + j) = e[lane] };
                        }
                    }
                }
            }
        }
    }
}

/// `D_ξ[o][t] = (A dY_tile Aᵀ)[ξ]` (zero beyond the output's edge), row-major (the GEMM's
/// A, read in place): rows = output channels `outs`, depth = tiles, vectorized over tiles.
fn grad_output_over_tiles<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize>(
    vectors: ConvVectors,
    p: &Planes,
    dy_chunk: &[T],
    outs: Range<usize>,
    d: &mut [T],
) {
    let tiles = dy_chunk.len() / (p.c_out * p.oh * p.ow) * p.tiles_per_image();
    assert!(outs.end <= p.c_out && d.len() >= A * A * xi_stride(outs.len() * tiles));
    let d_ptr = SharedMutPtr(d.as_mut_ptr());
    par_ranges(tiles, A * A * outs.len(), MAX_LANES, |range| {
        T::run_kernel(
            vectors,
            GradOutputOverTiles::<T, W, M, A> {
                var: PhantomData,
                p,
                dy: dy_chunk,
                outs: outs.clone(),
                tiles,
                range,
                d: &d_ptr,
            },
        )
    });
}

struct GradOutputOverTiles<'a, T, W, const M: usize, const A: usize> {
    var: PhantomData<W>,
    p: &'a Planes,
    dy: &'a [T],
    outs: Range<usize>,
    tiles: usize,
    range: Range<usize>,
    d: &'a SharedMutPtr<T>,
}

impl<T: ConvFloat, W: Winograd<M, A>, const M: usize, const A: usize> LaneKernel<T>
    for GradOutputOverTiles<'_, T, W, M, A>
{
    type Output = ();
    #[inline(always)]
    fn run<L: Lanes<Elem = T>>(self) {
        let p = self.p;
        let (o0, cb) = (self.outs.start, self.outs.len());
        let plane = p.oh * p.ow;
        let stride = xi_stride(cb * self.tiles);
        let mut block = [[[T::zero(); MAX_LANES]; M]; M];
        let mut tiles = [Tile::default(); MAX_LANES];
        for o in 0..cb {
            let mut cursor = p.tile(self.range.start);
            for t0 in self.range.clone().step_by(L::LANES) {
                let lanes = L::LANES.min(self.range.end - t0);
                for t in tiles.iter_mut().take(lanes) {
                    *t = cursor;
                    cursor = p.next(cursor);
                }
                for (lane, t) in tiles.iter().enumerate().take(lanes) {
                    let src = &self.dy[(t.img * p.c_out + o0 + o) * plane..][..plane];
                    let (r0, q0) = ((t.th * M) as isize, (t.tw * M) as isize);
                    gather_patch(src, p.oh, p.ow, r0, q0, &mut block, lane);
                }
                let dt = apply2d!(L, &load_block::<L, M>(&block), W::a, M, A);
                for (xi, dv) in dt.iter().flatten().enumerate() {
                    let at = xi * stride + o * self.tiles + t0;
                    // SAFETY: row o, tiles t0 .. t0 + lanes of plane ξ, inside `d` (asserted
                    // by `grad_output_over_tiles`); these tiles belong to this task alone.
                    unsafe { dv.store_n(self.d.get().add(at), lanes) };
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
    assert!(mw.len() >= A * A * xi_stride(cb * c_in) && dw.len() >= outs.end * c_in * 9);
    let dw_ptr = SharedMutPtr(dw.as_mut_ptr());
    par_ranges(cb, A * A * c_in, 1, |range| {
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
                for (xi, mv) in m.iter_mut().flatten().enumerate() {
                    let at = xi * xi_stride(cb * c_in) + o * c_in + ib;
                    let at = self.mw[at..].as_ptr();
                    // SAFETY: `at + lanes` is inside plane ξ of `mw` (asserted by `weight_grad_transform`).
                    *mv = unsafe { L::load_n(at, lanes) };
                    prefetch(at.wrapping_add(PREFETCH_AHEAD));
                }
                let out = apply2d!(L, &m, W::gt, A, 3);
                store_block(&out, &mut block);
                for lane in 0..lanes {
                    let base = ((o0 + o) * c_in + ib + lane) * 9;
                    for (tap, e) in block.iter().flatten().enumerate() {
                        // SAFETY: `base + 8 < outs.end·c_in·9 <= dw.len()` (asserted by
                        // `weight_grad_transform`); output channel `o0 + o` belongs to
                        // this task alone.
                        unsafe { *self.dw.get().add(base + tap) = e[lane] };
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
            m: usize,
            what: &str,
            mat: &[[f64; N]; P],
            f: impl Fn([F64Lane; N]) -> [F64Lane; P],
        ) {
            for j in 0..N {
                let unit = std::array::from_fn(|i| F64Lane::splat(if i == j { 1.0 } else { 0.0 }));
                let col = f(unit);
                for (i, (v, row)) in col.iter().zip(mat).enumerate() {
                    let got = v.reduce_sum();
                    assert!(
                        (got - row[j]).abs() < 1e-15,
                        "F({m},3) {what}[{i}][{j}]: {got} vs {}",
                        row[j]
                    );
                }
            }
        }
        let var = W::var();
        check(M, "Bt", &var.bt, W::bt);
        check(M, "G", &var.g, W::g);
        check(M, "At", &var.at, W::at);
        check(M, "A", &var.a, W::a);
        check(M, "Gt", &var.gt, W::gt);
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
