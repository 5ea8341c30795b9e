//! GEMM: a packed, register-blocked SGEMM (BLIS-style) with AVX-512F and AVX2+FMA
//! microkernels chosen at run time, a portable fallback, and a naive reference.
//!
//! Public contract (used by `Float::gemm` and the ops):
//! - [`MatRef`]: a strided read-only matrix view; element `(i, j)` is `data[i*rs + j*cs]`.
//! - [`sgemm`]: `C = alpha·A·B + beta·C`, best kernel for this CPU, thread count from
//!   [`crate::parallel::num_threads`].
//! - [`sgemm_with`]: the same with an explicit [`Kernel`] and thread count (tests, benches).
//! - [`gemm_reference`]: naive triple loop, generic, used for f64 and as the test oracle.

/// A strided read-only view of a matrix: element `(i, j)` is at `data[i * rs + j * cs]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    /// Row stride (elements).
    pub rs: usize,
    /// Column stride (elements).
    pub cs: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// Row-major matrix with leading dimension `ld`.
    pub fn row_major(data: &'a [T], ld: usize) -> Self {
        MatRef {
            data,
            rs: ld,
            cs: 1,
        }
    }
    /// Column-major (i.e. the transpose of a row-major matrix with leading dimension `ld`).
    pub fn col_major(data: &'a [T], ld: usize) -> Self {
        MatRef {
            data,
            rs: 1,
            cs: ld,
        }
    }
    /// The transposed view (free).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// Which microkernel an SGEMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Avx512,
    Avx2Fma,
    Portable,
}

/// Naive reference GEMM: `C = alpha·A·B + beta·C`, accumulating in `T`.
#[allow(clippy::too_many_arguments)]
pub fn gemm_reference<T: crate::Float>(
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: MatRef<'_, T>,
    b: MatRef<'_, T>,
    beta: T,
    c: &mut [T],
    ldc: usize,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = T::zero();
            for p in 0..k {
                acc += a.data[i * a.rs + p * a.cs] * b.data[p * b.rs + j * b.cs];
            }
            let cij = &mut c[i * ldc + j];
            *cij = if beta == T::zero() {
                alpha * acc
            } else {
                alpha * acc + beta * *cij
            };
        }
    }
}

/// `C = alpha·A·B + beta·C` in f32 with the best kernel for this CPU.
/// PLACEHOLDER until the packed kernels land (gemm helper replaces this body).
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
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
    gemm_reference(m, n, k, alpha, a, b, beta, c, ldc)
}
