//! The element type the ops are generic over.
//!
//! `f32` is the training type and dispatches to the packed SIMD SGEMM (or, inside
//! [`crate::gemm::with_precision`]`(Bf16, ..)`, the mixed-precision bf16 GEMM); `f64` uses a naive
//! reference GEMM so that gradient checks (central differences need f64) run the very same
//! op code as training does.

use crate::gemm::{self, MatRef};
use crate::simd::{F64x4, VecKernel};

/// A floating-point element for tensors and ops.
pub trait Float:
    num_traits::Float
    + num_traits::FromPrimitive
    + std::ops::AddAssign
    + std::ops::SubAssign
    + std::ops::MulAssign
    + std::iter::Sum
    + Default
    + bytemuck::Pod
    + Send
    + Sync
    + std::fmt::Debug
    + 'static
{
    /// `C[m×n] = alpha · A[m×k] · B[k×n] + beta · C` (row-major `C` with leading dimension
    /// `ldc`; `A` and `B` are strided views so transposes are free). When `beta == 0`,
    /// `C` is overwritten and may hold anything (NaN included) on entry.
    #[allow(clippy::too_many_arguments)]
    fn gemm(
        m: usize,
        n: usize,
        k: usize,
        alpha: Self,
        a: MatRef<'_, Self>,
        b: MatRef<'_, Self>,
        beta: Self,
        c: &mut [Self],
        ldc: usize,
    );

    fn from_f64_lossy(v: f64) -> Self;
    fn to_f64_lossy(self) -> f64;

    /// Runs a kernel written over [`crate::simd::FloatVec`]: f32 at the process's SIMD level
    /// ([`crate::simd::level`], or a [`crate::simd::with_f32_impl`] override), f64 on
    /// [`F64x4`] (plain Rust, the gradient-check path).
    fn run<K: VecKernel<Self>>(kernel: K) -> K::Output;
}

impl Float for f32 {
    fn gemm(
        m: usize,
        n: usize,
        k: usize,
        alpha: f32,
        a: MatRef<'_, f32>,
        b: MatRef<'_, f32>,
        beta: f32,
        c: &mut [f32],
        ldc: usize,
    ) {
        match gemm::precision() {
            gemm::Precision::F32 => gemm::sgemm(m, n, k, alpha, a, b, beta, c, ldc),
            gemm::Precision::Bf16 => gemm::gemm_bf16(m, n, k, alpha, a, b, beta, c, ldc),
        }
    }
    fn from_f64_lossy(v: f64) -> f32 {
        v as f32
    }
    fn to_f64_lossy(self) -> f64 {
        self as f64
    }
    #[inline]
    fn run<K: VecKernel<f32>>(kernel: K) -> K::Output {
        crate::simd::current_f32_impl().run(kernel)
    }
}

impl Float for f64 {
    fn gemm(
        m: usize,
        n: usize,
        k: usize,
        alpha: f64,
        a: MatRef<'_, f64>,
        b: MatRef<'_, f64>,
        beta: f64,
        c: &mut [f64],
        ldc: usize,
    ) {
        gemm::gemm_reference(m, n, k, alpha, a, b, beta, c, ldc)
    }
    fn from_f64_lossy(v: f64) -> f64 {
        v
    }
    fn to_f64_lossy(self) -> f64 {
        self
    }
    #[inline]
    fn run<K: VecKernel<f64>>(kernel: K) -> K::Output {
        kernel.run::<F64x4>()
    }
}
