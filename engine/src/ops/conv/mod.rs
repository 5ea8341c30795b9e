//! conv2d: one interface, several algorithms, chosen per layer shape and pass.
//!
//! The tape calls [`conv2d_forward`], [`conv2d_backward_data`] and [`conv2d_backward_weight`];
//! each picks a [`ConvAlgo`] for its [`ConvPass`] with [`conv2d_algo`]:
//! - [`ConvAlgo::Im2col`] (`im2col.rs`): im2col + one SGEMM per chunk of images; any shape.
//! - [`ConvAlgo::Direct`] (`direct.rs`): register-tiled direct convolution on column-padded
//!   planes, skipping the taps that read padding rows; stride 1. Wins where the GEMM's K
//!   is tiny (the 3-channel first layer: K = 27).
//! - [`ConvAlgo::WinogradF2`] / [`ConvAlgo::WinogradF4`] (`winograd.rs`): F(2x2,3x3) and
//!   F(4x4,3x3) for 3x3 stride-1 convolutions in all three passes: vectorized transforms,
//!   the per-tile-element products as batched SGEMMs. 2.25x / 4x fewer multiplies than
//!   im2col.
//!
//! The choice ([`choose_conv_algo`]) is a pure function of the geometry, the pass and the SIMD
//! level; [`set_conv_algo_override`] forces one algorithm process-wide (`--conv-algo`), and an
//! algorithm that cannot compute a shape falls back to the automatic choice, which
//! [`ConvChoice::fallback`] reports. Every algorithm computes each output element in one
//! fixed order that depends neither on thread timing nor on the thread count, so the same
//! seed gives the same bits run after run, with any `--threads`, and a resumed run equals an
//! uninterrupted one. Results do depend on the SIMD level (the direct backward-weight pass
//! sums vector lanes; the GEMM kernels differ) and, of course, on the algorithm.
//!
//! The ops are generic over [`Float`]: for f32 the SIMD kernels run with the vector type of
//! [`crate::simd::level`]; for f64 the *same kernel source* runs over one-lane f64 "vectors"
//! and the naive reference GEMM, which is what the f64 gradient checks differentiate.
mod direct;
mod im2col;
mod lanes;
mod node;
mod scratch;
mod winograd;

pub use im2col::conv2d_images_per_chunk;
pub use scratch::conv2d_release_scratch;

use crate::gemm::Precision;
use crate::ops::{par_chunks_mut, units_per_task};
use crate::simd::SimdLevel;
use crate::Float;
use lanes::ConvFloat;
use std::any::TypeId;
use std::sync::atomic::{AtomicU8, Ordering};

/// Geometry of a 2-D convolution over a batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Conv2dGeom {
    pub n: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: usize,
}

impl Conv2dGeom {
    /// Geometry of `n` images of `c_in×h×w` convolved into `c_out` channels by a `kh×kw`
    /// kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n: usize,
        c_in: usize,
        h: usize,
        w: usize,
        c_out: usize,
        (kh, kw): (usize, usize),
        stride: usize,
        pad: usize,
    ) -> Self {
        Conv2dGeom {
            n,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            pad,
        }
    }
    pub fn out_h(&self) -> usize {
        (self.h + 2 * self.pad - self.kh) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.w + 2 * self.pad - self.kw) / self.stride + 1
    }
    /// Rows of the column matrix: `C_in·KH·KW`.
    fn taps(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
    /// 1×1, stride 1, no padding: each image already is its own column matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    /// Multiply-adds of the forward pass by the definition, zero-padding taps included (each
    /// backward pass costs the same): the count behind "effective" GFLOP/s.
    pub fn macs(&self) -> usize {
        self.n * self.c_out * self.out_h() * self.out_w() * self.taps()
    }
    fn check(&self, op: &str) {
        assert!(self.stride >= 1, "{op}: stride must be >= 1");
        assert!(
            self.kh >= 1
                && self.kw >= 1
                && self.h + 2 * self.pad >= self.kh
                && self.w + 2 * self.pad >= self.kw,
            "{op}: kernel {}x{} does not fit the padded {}x{} input (pad {})",
            self.kh,
            self.kw,
            self.h,
            self.w,
            self.pad
        );
    }
}

/// The three passes of a convolution.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvPass {
    Forward,
    BackwardData,
    BackwardWeight,
}

impl ConvPass {
    pub const ALL: [ConvPass; 3] = [
        ConvPass::Forward,
        ConvPass::BackwardData,
        ConvPass::BackwardWeight,
    ];
    pub fn name(self) -> &'static str {
        match self {
            ConvPass::Forward => "fwd",
            ConvPass::BackwardData => "bwd-data",
            ConvPass::BackwardWeight => "bwd-weight",
        }
    }
}

/// A convolution algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvAlgo {
    /// im2col + SGEMM over chunks of images (any shape).
    Im2col,
    /// Register-tiled direct convolution (stride 1).
    Direct,
    /// Winograd F(2x2,3x3) (3x3, stride 1): 16 products per 2x2 output tile.
    WinogradF2,
    /// Winograd F(4x4,3x3) (3x3, stride 1): 36 products per 4x4 output tile.
    WinogradF4,
}

impl ConvAlgo {
    pub const ALL: [ConvAlgo; 4] = [
        ConvAlgo::Im2col,
        ConvAlgo::Direct,
        ConvAlgo::WinogradF2,
        ConvAlgo::WinogradF4,
    ];

    /// Short name, as printed in plans and tables.
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgo::Im2col => "im2col",
            ConvAlgo::Direct => "direct",
            ConvAlgo::WinogradF2 => "winograd-f2",
            ConvAlgo::WinogradF4 => "winograd-f4",
        }
    }

    /// Why this algorithm cannot compute `g`, or `None` if it can.
    pub fn unsupported_reason(self, g: &Conv2dGeom) -> Option<&'static str> {
        match self {
            ConvAlgo::Im2col => None,
            ConvAlgo::Direct => (g.stride != 1).then_some("direct needs stride 1"),
            ConvAlgo::WinogradF2 | ConvAlgo::WinogradF4 => {
                if g.kh != 3 || g.kw != 3 {
                    Some("winograd needs a 3x3 kernel")
                } else if g.stride != 1 {
                    Some("winograd needs stride 1")
                } else {
                    None
                }
            }
        }
    }

    /// Multiply-adds this algorithm itself executes for one pass of `g` (what "% of FMA
    /// peak" is computed from): im2col every tap; direct every tap except those reading
    /// padding rows; Winograd the products of its batched GEMMs (`α²` per tile and channel
    /// pair; transforms not counted).
    pub fn macs(self, g: &Conv2dGeom, pass: ConvPass) -> usize {
        match self {
            ConvAlgo::Im2col => g.macs(),
            ConvAlgo::Direct => direct::macs(g, pass),
            ConvAlgo::WinogradF2 => winograd::macs(g, 2),
            ConvAlgo::WinogradF4 => winograd::macs(g, 4),
        }
    }
}

impl std::fmt::Display for ConvAlgo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The automatic choice: a pure function of the geometry, the pass and the SIMD level (same
/// inputs, same algorithm, so the same bits).
///
/// The rule, from `cargo bench -p engine --bench conv_layers` (which times every applicable
/// algorithm side by side; README "Convolution algorithms" has the full table):
/// - 3x3 stride 1 with at least `WINOGRAD_MIN_CHANNELS` input and output channels:
///   Winograd, F(4x4,3x3) when the output is at least 4x4, else F(2x2,3x3);
/// - other stride-1 convolutions with a short GEMM depth (`C_in·KH·KW` below
///   `DIRECT_MAX_TAPS`, e.g. the 3-channel first layer): direct;
/// - everything else: im2col.
///
/// The SIMD level is an input so the table can differ per level; today it does not (the
/// AVX-512 kernels could not be timed on the development machine).
pub fn choose_conv_algo(g: &Conv2dGeom, pass: ConvPass, level: SimdLevel) -> ConvAlgo {
    let _ = (pass, level);
    let winograd = ConvAlgo::WinogradF4.unsupported_reason(g).is_none()
        && g.c_in.min(g.c_out) >= WINOGRAD_MIN_CHANNELS;
    if winograd {
        return winograd_variant(g);
    }
    if ConvAlgo::Direct.unsupported_reason(g).is_none() && g.taps() < DIRECT_MAX_TAPS {
        return ConvAlgo::Direct;
    }
    ConvAlgo::Im2col
}

/// The automatic choice under `--precision`: [`choose_conv_algo`] for f32; for bf16 the same
/// except where im2col with the bf16 GEMM beats the f32 choice, which in
/// `BENCH_BF16=1 BENCH_CLOCK=cpu cargo bench -p engine --bench conv_layers` (AMD EPYC Zen 5,
/// 1 thread, batch 128; README "Mixed precision") is:
/// - Winograd F(4x4) layers with at most `BF16_IM2COL_MAX_CHANNELS` input channels
///   (64->128@16: 1.15x fwd, 1.39x bwd-data, 1.20x bwd-weight; from 128 channels on
///   Winograd-f32 is 1.1-1.7x faster than im2col-bf16 in every pass);
/// - the backward passes of Winograd F(2x2) layers (512->512@2: 1.05-1.21x; forward
///   0.97-1.16x, not taken);
/// - the backward-data pass of the direct layers (3->64@32: 3.3x; training never runs it).
///
/// Winograd with bf16 GEMMs ([`crate::gemm::gemm_bf16_packed_b`] on the f32 transforms'
/// panels) was measured too: within ±15 % of Winograd-f32 in most passes (the bf16 re-pack
/// of both transformed operands costs about what the faster GEMM saves), and less exact (see
/// [`ConvChoice::arithmetic`]), so Winograd and direct run f32 under bf16.
///
/// Pure, like [`choose_conv_algo`], and independent of whether the bf16 kernel is native or
/// emulated, so every CPU computes the same numbers.
pub fn choose_conv_algo_at(
    g: &Conv2dGeom,
    pass: ConvPass,
    level: SimdLevel,
    precision: Precision,
) -> ConvAlgo {
    use ConvPass::{BackwardData, BackwardWeight};
    let f32_choice = choose_conv_algo(g, pass, level);
    let im2col_pays = match (f32_choice, pass) {
        (ConvAlgo::WinogradF4, _) => g.c_in <= BF16_IM2COL_MAX_CHANNELS,
        (ConvAlgo::WinogradF2, BackwardData | BackwardWeight) => true,
        (ConvAlgo::Direct, BackwardData) => true,
        _ => false,
    };
    if precision == Precision::Bf16 && im2col_pays {
        ConvAlgo::Im2col
    } else {
        f32_choice
    }
}

/// See [`choose_conv_algo_at`].
const BF16_IM2COL_MAX_CHANNELS: usize = 64;

/// Winograd pays from this many channels (in and out) on: below, the transforms cost more
/// than the multiplies they save.
const WINOGRAD_MIN_CHANNELS: usize = 16;
/// Direct convolution beats im2col+GEMM while the GEMM depth `C_in·KH·KW` is below this.
const DIRECT_MAX_TAPS: usize = 64;

/// The Winograd variant for a 3x3 stride-1 shape: F(4x4,3x3) unless the output is smaller
/// than 4x4 (where its tile would be mostly padding).
fn winograd_variant(g: &Conv2dGeom) -> ConvAlgo {
    if g.out_h().min(g.out_w()) >= 4 {
        ConvAlgo::WinogradF4
    } else {
        ConvAlgo::WinogradF2
    }
}

/// What `--conv-algo` asks for (process-wide, see [`set_conv_algo_override`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConvAlgoOverride {
    /// [`choose_conv_algo`].
    Auto,
    Im2col,
    Direct,
    /// Winograd, with the variant [`choose_conv_algo`] would use for the shape.
    Winograd,
    WinogradF2,
    WinogradF4,
}

impl ConvAlgoOverride {
    pub const ALL: [ConvAlgoOverride; 6] = [
        ConvAlgoOverride::Auto,
        ConvAlgoOverride::Im2col,
        ConvAlgoOverride::Direct,
        ConvAlgoOverride::Winograd,
        ConvAlgoOverride::WinogradF2,
        ConvAlgoOverride::WinogradF4,
    ];
    /// The value `FromStr` accepts.
    pub fn name(self) -> &'static str {
        match self {
            ConvAlgoOverride::Auto => "auto",
            ConvAlgoOverride::Im2col => "im2col",
            ConvAlgoOverride::Direct => "direct",
            ConvAlgoOverride::Winograd => "winograd",
            ConvAlgoOverride::WinogradF2 => "winograd-f2",
            ConvAlgoOverride::WinogradF4 => "winograd-f4",
        }
    }
}

impl std::fmt::Display for ConvAlgoOverride {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `--conv-algo` value that is not one of [`ConvAlgoOverride::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown conv algorithm {0:?} (expected auto, im2col, direct, winograd, winograd-f2 or winograd-f4)")]
pub struct ParseConvAlgoError(pub String);

impl std::str::FromStr for ConvAlgoOverride {
    type Err = ParseConvAlgoError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ConvAlgoOverride::ALL
            .into_iter()
            .find(|o| o.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParseConvAlgoError(s.to_string()))
    }
}

static OVERRIDE: AtomicU8 = AtomicU8::new(0);

/// Force an algorithm for every convolution of this process (`Auto` restores the automatic
/// choice). Set it before training starts: changing it mid-run changes the numbers.
pub fn set_conv_algo_override(o: ConvAlgoOverride) {
    let index = ConvAlgoOverride::ALL.iter().position(|&a| a == o);
    OVERRIDE.store(index.unwrap_or(0) as u8, Ordering::Relaxed);
}

/// The current override ([`ConvAlgoOverride::Auto`] unless set).
pub fn conv_algo_override() -> ConvAlgoOverride {
    ConvAlgoOverride::ALL
        .get(OVERRIDE.load(Ordering::Relaxed) as usize)
        .copied()
        .unwrap_or(ConvAlgoOverride::Auto)
}

/// The algorithm one pass runs, and why it is not the forced one if it is not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvChoice {
    pub algo: ConvAlgo,
    /// `Some(reason)` when the override asked for an algorithm that cannot compute this
    /// shape; `algo` is then the automatic choice.
    pub fallback: Option<&'static str>,
    /// The precision asked for (`--precision`); what runs is [`ConvChoice::arithmetic`].
    pub precision: Precision,
}

impl ConvChoice {
    /// The arithmetic the pass's multiply-adds run in (the public entry points run the
    /// algorithm under it): the precision asked for in im2col's GEMM; f32 for direct (no
    /// bf16 kernel) and Winograd. Winograd with bf16 GEMMs exists (benches time it) but is
    /// slower here (see [`choose_conv_algo_at`]) and less exact: its transforms amplify the
    /// bf16 rounding to 0.4 % (F(2x2)) and 1.7 % (F(4x4)) relative error against 0.2 % for
    /// im2col-bf16 (`winograd_error_in_bf16_*` test).
    pub fn arithmetic(&self) -> Precision {
        match self.algo {
            ConvAlgo::Im2col => self.precision,
            ConvAlgo::Direct | ConvAlgo::WinogradF2 | ConvAlgo::WinogradF4 => Precision::F32,
        }
    }
}

impl std::fmt::Display for ConvChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.algo)?;
        if self.precision == Precision::Bf16 {
            match self.arithmetic() {
                Precision::Bf16 => write!(f, " [bf16]")?,
                Precision::F32 if self.algo != ConvAlgo::Direct => {
                    write!(f, " [f32: faster and more exact than bf16 here]")?
                }
                Precision::F32 => write!(f, " [f32: no bf16 kernel]")?,
            }
        }
        match self.fallback {
            None => Ok(()),
            Some(why) => write!(f, " (fallback: {why})"),
        }
    }
}

/// The algorithm for one pass under an explicit override, SIMD level and precision (pure).
pub fn conv2d_algo_for(
    g: &Conv2dGeom,
    pass: ConvPass,
    o: ConvAlgoOverride,
    level: SimdLevel,
    precision: Precision,
) -> ConvChoice {
    let auto = choose_conv_algo_at(g, pass, level, precision);
    let forced = match o {
        ConvAlgoOverride::Auto => auto,
        ConvAlgoOverride::Im2col => ConvAlgo::Im2col,
        ConvAlgoOverride::Direct => ConvAlgo::Direct,
        ConvAlgoOverride::Winograd => winograd_variant(g),
        ConvAlgoOverride::WinogradF2 => ConvAlgo::WinogradF2,
        ConvAlgoOverride::WinogradF4 => ConvAlgo::WinogradF4,
    };
    match forced.unsupported_reason(g) {
        None => ConvChoice {
            algo: forced,
            fallback: None,
            precision,
        },
        Some(why) => ConvChoice {
            algo: auto,
            fallback: Some(why),
            precision,
        },
    }
}

/// The algorithm one pass of `g` runs here (override, SIMD level and the
/// [`crate::gemm::with_precision`] scope applied).
pub fn conv2d_algo(g: &Conv2dGeom, pass: ConvPass) -> ConvChoice {
    conv2d_algo_for(
        g,
        pass,
        conv_algo_override(),
        crate::simd::level(),
        crate::gemm::precision(),
    )
}

/// The algorithm of each pass of one layer, for `--verbose` and the benches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvPlan {
    pub forward: ConvChoice,
    pub backward_data: ConvChoice,
    pub backward_weight: ConvChoice,
}

impl ConvPlan {
    pub fn get(&self, pass: ConvPass) -> ConvChoice {
        match pass {
            ConvPass::Forward => self.forward,
            ConvPass::BackwardData => self.backward_data,
            ConvPass::BackwardWeight => self.backward_weight,
        }
    }
}

impl std::fmt::Display for ConvPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "fwd {}, bwd-data {}, bwd-weight {}",
            self.forward, self.backward_data, self.backward_weight
        )
    }
}

/// The plan of a layer in this process, e.g. `fwd winograd-f4, bwd-data winograd-f4,
/// bwd-weight winograd-f4`.
pub fn conv2d_plan(g: &Conv2dGeom) -> ConvPlan {
    ConvPlan {
        forward: conv2d_algo(g, ConvPass::Forward),
        backward_data: conv2d_algo(g, ConvPass::BackwardData),
        backward_weight: conv2d_algo(g, ConvPass::BackwardWeight),
    }
}

/// Which vector type the SIMD conv kernels (direct, Winograd transforms) use. The ops use
/// [`ConvVectors::process`]; tests and benches pick others. (The SGEMM inside follows the
/// process level in every case.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvVectors {
    /// The vector type of a SIMD level (must be supported by this CPU).
    Level(SimdLevel),
    /// 16 portable lanes: the AVX-512 kernels' tiling and tails, on any CPU.
    Portable16,
}

impl ConvVectors {
    /// The process's level ([`crate::simd::level`]).
    pub fn process() -> ConvVectors {
        ConvVectors::Level(crate::simd::level())
    }
    /// Every choice this CPU can run: each supported level, then `Portable16`.
    pub fn all_supported() -> Vec<ConvVectors> {
        let mut v: Vec<ConvVectors> = SimdLevel::supported()
            .into_iter()
            .map(ConvVectors::Level)
            .collect();
        v.push(ConvVectors::Portable16);
        v
    }
    pub fn name(self) -> &'static str {
        match self {
            ConvVectors::Level(l) => l.name(),
            ConvVectors::Portable16 => "portable16",
        }
    }
}

/// `y[n, co, oh, ow] = b[co] + Σ w[co, ci, i, j] · x[n, ci, oh*s+i-p, ow*s+j-p]`.
pub fn conv2d_forward<T: Float>(g: &Conv2dGeom, x: &[T], w: &[T], b: Option<&[T]>, y: &mut [T]) {
    let c = conv2d_algo(g, ConvPass::Forward);
    crate::gemm::with_precision(c.arithmetic(), || {
        conv2d_forward_with(c.algo, ConvVectors::process(), g, x, w, b, y)
    })
}

/// `dx = ∂L/∂x` given `dy = ∂L/∂y` (overwrites `dx`).
pub fn conv2d_backward_data<T: Float>(g: &Conv2dGeom, dy: &[T], w: &[T], dx: &mut [T]) {
    let c = conv2d_algo(g, ConvPass::BackwardData);
    crate::gemm::with_precision(c.arithmetic(), || {
        conv2d_backward_data_with(c.algo, ConvVectors::process(), g, dy, w, dx)
    })
}

/// `dw = ∂L/∂w` and, if given, `db = ∂L/∂b` (overwrites both).
pub fn conv2d_backward_weight<T: Float>(
    g: &Conv2dGeom,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    db: Option<&mut [T]>,
) {
    let c = conv2d_algo(g, ConvPass::BackwardWeight);
    crate::gemm::with_precision(c.arithmetic(), || {
        conv2d_backward_weight_with(c.algo, ConvVectors::process(), g, x, dy, dw, db)
    })
}

/// Panics (a programming error) unless `algo` can compute `g`.
fn check_algo(op: &str, algo: ConvAlgo, g: &Conv2dGeom) {
    if let Some(why) = algo.unsupported_reason(g) {
        panic!("{op}: {algo} cannot compute {g:?}: {why}");
    }
}

/// [`conv2d_forward`] with an explicit algorithm and vector type (tests, benches).
/// Panics if `algo` cannot compute `g` (see [`ConvAlgo::unsupported_reason`]).
pub fn conv2d_forward_with<T: Float>(
    algo: ConvAlgo,
    vectors: ConvVectors,
    g: &Conv2dGeom,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    y: &mut [T],
) {
    const OP: &str = "conv2d_forward";
    g.check(OP);
    check_algo(OP, algo, g);
    assert_eq!(x.len(), g.n * g.c_in * g.h * g.w, "{OP}: x length");
    assert_eq!(w.len(), g.c_out * g.taps(), "{OP}: w length");
    assert_eq!(
        y.len(),
        g.n * g.c_out * g.out_h() * g.out_w(),
        "{OP}: y length"
    );
    if let Some(b) = b {
        assert_eq!(b.len(), g.c_out, "{OP}: b length");
    }
    if g.n == 0 {
        return;
    }
    if algo == ConvAlgo::Im2col {
        return im2col::forward(g, x, w, b, y);
    }
    fn typed<T: ConvFloat>(
        algo: ConvAlgo,
        v: ConvVectors,
        g: &Conv2dGeom,
        x: &[T],
        w: &[T],
        b: Option<&[T]>,
        y: &mut [T],
    ) {
        match algo {
            ConvAlgo::Im2col => im2col::forward(g, x, w, b, y),
            ConvAlgo::Direct => direct::forward(v, g, x, w, b, y),
            ConvAlgo::WinogradF2 => winograd::forward(winograd::F2, v, g, x, w, b, y),
            ConvAlgo::WinogradF4 => winograd::forward(winograd::F4, v, g, x, w, b, y),
        }
    }
    if is::<T, f32>() {
        typed::<f32>(algo, vectors, g, same(x), same(w), b.map(same), same_mut(y))
    } else if is::<T, f64>() {
        typed::<f64>(algo, vectors, g, same(x), same(w), b.map(same), same_mut(y))
    } else {
        no_kernels::<T>(OP)
    }
}

/// [`conv2d_backward_data`] with an explicit algorithm and vector type (tests, benches).
pub fn conv2d_backward_data_with<T: Float>(
    algo: ConvAlgo,
    vectors: ConvVectors,
    g: &Conv2dGeom,
    dy: &[T],
    w: &[T],
    dx: &mut [T],
) {
    const OP: &str = "conv2d_backward_data";
    g.check(OP);
    check_algo(OP, algo, g);
    assert_eq!(
        dy.len(),
        g.n * g.c_out * g.out_h() * g.out_w(),
        "{OP}: dy length"
    );
    assert_eq!(w.len(), g.c_out * g.taps(), "{OP}: w length");
    assert_eq!(dx.len(), g.n * g.c_in * g.h * g.w, "{OP}: dx length");
    if g.n == 0 {
        return;
    }
    if algo == ConvAlgo::Im2col {
        return im2col::backward_data(g, dy, w, dx);
    }
    fn typed<T: ConvFloat>(
        algo: ConvAlgo,
        v: ConvVectors,
        g: &Conv2dGeom,
        dy: &[T],
        w: &[T],
        dx: &mut [T],
    ) {
        match algo {
            ConvAlgo::Im2col => im2col::backward_data(g, dy, w, dx),
            ConvAlgo::Direct => direct::backward_data(v, g, dy, w, dx),
            ConvAlgo::WinogradF2 => winograd::backward_data(winograd::F2, v, g, dy, w, dx),
            ConvAlgo::WinogradF4 => winograd::backward_data(winograd::F4, v, g, dy, w, dx),
        }
    }
    if is::<T, f32>() {
        typed::<f32>(algo, vectors, g, same(dy), same(w), same_mut(dx))
    } else if is::<T, f64>() {
        typed::<f64>(algo, vectors, g, same(dy), same(w), same_mut(dx))
    } else {
        no_kernels::<T>(OP)
    }
}

/// [`conv2d_backward_weight`] with an explicit algorithm and vector type (tests, benches).
pub fn conv2d_backward_weight_with<T: Float>(
    algo: ConvAlgo,
    vectors: ConvVectors,
    g: &Conv2dGeom,
    x: &[T],
    dy: &[T],
    dw: &mut [T],
    db: Option<&mut [T]>,
) {
    const OP: &str = "conv2d_backward_weight";
    g.check(OP);
    check_algo(OP, algo, g);
    assert_eq!(x.len(), g.n * g.c_in * g.h * g.w, "{OP}: x length");
    let out_img = g.c_out * g.out_h() * g.out_w();
    assert_eq!(dy.len(), g.n * out_img, "{OP}: dy length");
    assert_eq!(dw.len(), g.c_out * g.taps(), "{OP}: dw length");
    if let Some(db) = db {
        assert_eq!(db.len(), g.c_out, "{OP}: db length");
        bias_grad(g, dy, db);
    }
    if g.n == 0 {
        dw.fill(T::zero());
        return;
    }
    if algo == ConvAlgo::Im2col {
        return im2col::backward_weight(g, x, dy, dw);
    }
    fn typed<T: ConvFloat>(
        algo: ConvAlgo,
        v: ConvVectors,
        g: &Conv2dGeom,
        x: &[T],
        dy: &[T],
        dw: &mut [T],
    ) {
        match algo {
            ConvAlgo::Im2col => im2col::backward_weight(g, x, dy, dw),
            ConvAlgo::Direct => direct::backward_weight(v, g, x, dy, dw),
            ConvAlgo::WinogradF2 => winograd::backward_weight(winograd::F2, v, g, x, dy, dw),
            ConvAlgo::WinogradF4 => winograd::backward_weight(winograd::F4, v, g, x, dy, dw),
        }
    }
    if is::<T, f32>() {
        typed::<f32>(algo, vectors, g, same(x), same(dy), same_mut(dw))
    } else if is::<T, f64>() {
        typed::<f64>(algo, vectors, g, same(x), same(dy), same_mut(dw))
    } else {
        no_kernels::<T>(OP)
    }
}

/// Elements per parallel task at least, for the bias-gradient reduction.
const MIN_TASK_ELEMS: usize = 1 << 14;

/// `db[co] = Σ_n Σ_p dy[n, co, p]`, in f64, parallel over output channels (every algorithm).
fn bias_grad<T: Float>(g: &Conv2dGeom, dy: &[T], db: &mut [T]) {
    let p = g.out_h() * g.out_w();
    let out_img = g.c_out * p;
    let per_task = units_per_task(g.c_out, g.n * p, MIN_TASK_ELEMS);
    par_chunks_mut(db, per_task, |t, dbs| {
        for (j, d) in dbs.iter_mut().enumerate() {
            let co = t * per_task + j;
            let mut acc = 0f64;
            for img in 0..g.n {
                let plane = &dy[img * out_img + co * p..img * out_img + (co + 1) * p];
                acc += plane.iter().map(|v| v.to_f64_lossy()).sum::<f64>();
            }
            *d = T::from_f64_lossy(acc);
        }
    });
}

// The SIMD kernels exist for f32 and f64 (`lanes::ConvFloat`); the public ops are generic
// over any `Float`, so they reinterpret their slices as the concrete type they are.
fn is<T: 'static, U: 'static>() -> bool {
    TypeId::of::<T>() == TypeId::of::<U>()
}
/// `s` as a slice of `U`; only called when `is::<T, U>()`.
fn same<T: Float, U: Float>(s: &[T]) -> &[U] {
    assert!(is::<T, U>());
    bytemuck::cast_slice(s)
}
fn same_mut<T: Float, U: Float>(s: &mut [T]) -> &mut [U] {
    assert!(is::<T, U>());
    bytemuck::cast_slice_mut(s)
}
fn no_kernels<T>(op: &str) -> ! {
    panic!(
        "{op}: no conv kernels for element type {}",
        std::any::type_name::<T>()
    )
}
