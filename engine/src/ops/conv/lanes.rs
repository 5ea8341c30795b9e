//! The vector abstraction of the conv kernels: one kernel source for f32 SIMD and for f64.
//!
//! A conv kernel is written once against [`Lanes`] (a vector of `LANES` elements of one
//! [`Float`] type) as a [`LaneKernel`]. [`ConvFloat::run_kernel`] runs it with
//! - for f32: the [`F32Vec`] of the requested level, through [`crate::simd::dispatch_at`]
//!   (so the body is compiled with that level's target features), or [`Portable16`];
//! - for f64: [`F64Lane`], a single f64 — the gradient checks' path, running the same
//!   tiling, transforms and accumulation order as f32, only one lane wide.
//!
//! This is a thin local extension of `crate::simd`'s f32 vectors: it adds the f64 lane and
//! the element-type association; running at a level is `crate::simd::dispatch_at`.
use super::ConvVectors;
use crate::gemm::{gemm_packed_b_reference, sgemm_packed_b, Kernel, MatRef, PackedLayout};
use crate::simd::{dispatch_at, F32Vec, Portable16, SimdKernel, SimdLevel};
use crate::Float;

/// A vector of `LANES` elements of [`Lanes::Elem`] (see the module docs).
pub(crate) trait Lanes: Copy + Send + Sync + 'static {
    type Elem: Float;
    const LANES: usize;
    fn splat(x: Self::Elem) -> Self;
    /// A matrix coefficient (exact in f32 for every transform matrix used here except the
    /// 1/3 and 1/15 families, which round once).
    fn constant(c: f64) -> Self;
    fn zero() -> Self;
    /// # Safety
    /// `p .. p + LANES` must be readable.
    unsafe fn load(p: *const Self::Elem) -> Self;
    /// Load the first `n <= LANES` lanes; the others are 0.
    ///
    /// # Safety
    /// `p .. p + n` must be readable.
    unsafe fn load_partial(p: *const Self::Elem, n: usize) -> Self;
    /// # Safety
    /// `p .. p + LANES` must be writable.
    unsafe fn store(self, p: *mut Self::Elem);
    /// Store the first `n <= LANES` lanes.
    ///
    /// # Safety
    /// `p .. p + n` must be writable.
    unsafe fn store_partial(self, p: *mut Self::Elem, n: usize);
    /// [`Lanes::load`] when `n == LANES`, else [`Lanes::load_partial`] (masked loads and
    /// stores are several times slower than plain ones on AMD cores: keep them for tails).
    ///
    /// # Safety
    /// `p .. p + n` must be readable.
    #[inline(always)]
    unsafe fn load_n(p: *const Self::Elem, n: usize) -> Self {
        // SAFETY: forwarded contract.
        unsafe {
            if n == Self::LANES {
                Self::load(p)
            } else {
                Self::load_partial(p, n)
            }
        }
    }
    /// [`Lanes::store`] when `n == LANES`, else [`Lanes::store_partial`].
    ///
    /// # Safety
    /// `p .. p + n` must be writable.
    #[inline(always)]
    unsafe fn store_n(self, p: *mut Self::Elem, n: usize) {
        // SAFETY: forwarded contract.
        unsafe {
            if n == Self::LANES {
                self.store(p)
            } else {
                self.store_partial(p, n)
            }
        }
    }
    fn add(self, b: Self) -> Self;
    fn sub(self, b: Self) -> Self;
    fn mul(self, b: Self) -> Self;
    /// `self * b + c`, fused.
    fn mul_add(self, b: Self, c: Self) -> Self;
    /// Sum of the lanes in [`F32Vec::reduce_sum`]'s fixed order.
    fn reduce_sum(self) -> Self::Elem;
}

/// An [`F32Vec`] as [`Lanes`] of f32.
#[derive(Clone, Copy)]
pub(crate) struct F32Lanes<V>(V);

impl<V: F32Vec> Lanes for F32Lanes<V> {
    type Elem = f32;
    const LANES: usize = V::LANES;
    #[inline(always)]
    fn splat(x: f32) -> Self {
        F32Lanes(V::splat(x))
    }
    #[inline(always)]
    fn constant(c: f64) -> Self {
        F32Lanes(V::splat(c as f32))
    }
    #[inline(always)]
    fn zero() -> Self {
        F32Lanes(V::zero())
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: forwarded contract.
        F32Lanes(unsafe { V::load(p) })
    }
    #[inline(always)]
    unsafe fn load_partial(p: *const f32, n: usize) -> Self {
        // SAFETY: forwarded contract.
        F32Lanes(unsafe { V::load_partial(p, n) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: forwarded contract.
        unsafe { self.0.store(p) }
    }
    #[inline(always)]
    unsafe fn store_partial(self, p: *mut f32, n: usize) {
        // SAFETY: forwarded contract.
        unsafe { self.0.store_partial(p, n) }
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        F32Lanes(self.0.add(b.0))
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        F32Lanes(self.0.sub(b.0))
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        F32Lanes(self.0.mul(b.0))
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        F32Lanes(self.0.mul_add(b.0, c.0))
    }
    #[inline(always)]
    fn reduce_sum(self) -> f32 {
        self.0.reduce_sum()
    }
}

/// One f64 as [`Lanes`] (the gradient checks' path).
#[derive(Clone, Copy)]
pub(crate) struct F64Lane(f64);

impl Lanes for F64Lane {
    type Elem = f64;
    const LANES: usize = 1;
    #[inline(always)]
    fn splat(x: f64) -> Self {
        F64Lane(x)
    }
    #[inline(always)]
    fn constant(c: f64) -> Self {
        F64Lane(c)
    }
    #[inline(always)]
    fn zero() -> Self {
        F64Lane(0.0)
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        // SAFETY: forwarded contract (one element).
        F64Lane(unsafe { *p })
    }
    #[inline(always)]
    unsafe fn load_partial(p: *const f64, n: usize) -> Self {
        // SAFETY: forwarded contract: `p` is readable when `n >= 1`.
        F64Lane(if n == 0 { 0.0 } else { unsafe { *p } })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        // SAFETY: forwarded contract (one element).
        unsafe { *p = self.0 }
    }
    #[inline(always)]
    unsafe fn store_partial(self, p: *mut f64, n: usize) {
        if n > 0 {
            // SAFETY: forwarded contract: `p` is writable when `n >= 1`.
            unsafe { *p = self.0 }
        }
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        F64Lane(self.0 + b.0)
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        F64Lane(self.0 - b.0)
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        F64Lane(self.0 * b.0)
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        F64Lane(self.0.mul_add(b.0, c.0))
    }
    #[inline(always)]
    fn reduce_sum(self) -> f64 {
        self.0
    }
}

/// Hint the cache to fetch the line holding `p` (no-op off x86-64). For kernels that walk
/// more concurrent streams (the α² ξ-planes) than the hardware prefetcher follows. Any
/// address is allowed: a prefetch never faults.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` is SSE (every x86-64 CPU), only a hint, and never faults.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p as *const i8)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// A conv kernel written once for every [`Lanes`] of element type `T`. `run` must be
/// `#[inline(always)]`, as must every generic helper it calls (see `crate::simd`).
pub(crate) trait LaneKernel<T> {
    type Output;
    fn run<L: Lanes<Elem = T>>(self) -> Self::Output;
}

/// The element types with conv kernels.
pub(crate) trait ConvFloat: Float {
    /// Run `kernel` with the lanes `vectors` names (f32) or one f64 lane (f64).
    fn run_kernel<K: LaneKernel<Self>>(vectors: ConvVectors, kernel: K) -> K::Output;
    /// The `Lanes::LANES` that `run_kernel` uses.
    fn lanes(vectors: ConvVectors) -> usize;
    /// The panel layout [`ConvFloat::gemm_packed`] reads.
    fn packed_layout() -> PackedLayout;
    /// `C[m×n] = A·B + beta·C` with A read in place and B packed in
    /// [`ConvFloat::packed_layout`] (single-threaded: callers run one per parallel task).
    #[allow(clippy::too_many_arguments)]
    fn gemm_packed_b(
        layout: PackedLayout,
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<'_, Self>,
        b: &[Self],
        beta: Self,
        c: &mut [Self],
        ldc: usize,
    );
}

/// Runs an f32 [`LaneKernel`] as a [`SimdKernel`].
struct AsSimd<K>(K);

impl<K: LaneKernel<f32>> SimdKernel for AsSimd<K> {
    type Output = K::Output;
    #[inline(always)]
    fn run<V: F32Vec>(self) -> K::Output {
        self.0.run::<F32Lanes<V>>()
    }
}

impl ConvFloat for f32 {
    #[inline]
    fn run_kernel<K: LaneKernel<f32>>(vectors: ConvVectors, kernel: K) -> K::Output {
        match vectors {
            ConvVectors::Level(level) => dispatch_at(level, AsSimd(kernel)),
            ConvVectors::Portable16 => kernel.run::<F32Lanes<Portable16>>(),
        }
    }
    fn lanes(vectors: ConvVectors) -> usize {
        match vectors {
            ConvVectors::Level(SimdLevel::Avx512) | ConvVectors::Portable16 => 16,
            ConvVectors::Level(_) => 8,
        }
    }
    fn packed_layout() -> PackedLayout {
        PackedLayout::of(Kernel::detect())
    }
    fn gemm_packed_b(
        layout: PackedLayout,
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<'_, f32>,
        b: &[f32],
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        let kernel = Kernel::detect();
        assert_eq!(
            layout,
            PackedLayout::of(kernel),
            "B packed for another kernel"
        );
        match crate::gemm::precision() {
            crate::gemm::Precision::F32 => sgemm_packed_b(kernel, m, n, k, a, b, beta, c, ldc),
            // The transforms stay f32; their outputs are rounded to bf16 as they are packed.
            crate::gemm::Precision::Bf16 => crate::gemm::gemm_bf16_packed_b(
                crate::gemm::Bf16Kernel::detect(),
                layout,
                m,
                n,
                k,
                a,
                b,
                beta,
                c,
                ldc,
            ),
        }
    }
}

impl ConvFloat for f64 {
    #[inline]
    fn run_kernel<K: LaneKernel<f64>>(_vectors: ConvVectors, kernel: K) -> K::Output {
        kernel.run::<F64Lane>()
    }
    fn lanes(_vectors: ConvVectors) -> usize {
        1
    }
    /// A small depth block, so the f64 checks cross depth blocks even on tiny shapes.
    fn packed_layout() -> PackedLayout {
        PackedLayout {
            mr: 4,
            nr: 8,
            kc: 16,
        }
    }
    fn gemm_packed_b(
        layout: PackedLayout,
        m: usize,
        n: usize,
        k: usize,
        a: MatRef<'_, f64>,
        b: &[f64],
        beta: f64,
        c: &mut [f64],
        ldc: usize,
    ) {
        gemm_packed_b_reference(layout, m, n, k, a, b, beta, c, ldc)
    }
}
