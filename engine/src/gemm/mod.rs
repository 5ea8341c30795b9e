//! GEMM: a packed, register-blocked SGEMM (BLIS-style) with AVX-512F and AVX2+FMA
//! microkernels chosen at run time, a portable fallback, and a naive reference.
//!
//! Public contract (used by `Float::gemm` and the ops):
//! - [`MatRef`]: a strided read-only matrix view; element `(i, j)` is `data[i*rs + j*cs]`.
//! - [`sgemm`]: `C = alpha·A·B + beta·C`, best kernel for this CPU, thread count from
//!   [`crate::parallel::num_threads`].
//! - [`sgemm_with`]: the same with an explicit [`Kernel`] and thread count (tests, benches).
//! - [`gemm_reference`]: naive triple loop, generic, used for f64 and as the test oracle.
//! - [`gemm_bf16`] / [`gemm_bf16_with`]: the same product with A and B rounded to bf16
//!   while packing and f32 accumulation (`--precision bf16`; `bf16/`).
//! - [`sgemm_packed_b`] / [`gemm_packed_b_reference`]: B already in the microkernel's panel
//!   layout ([`PackedLayout`], [`Panels`]) and A read in place, as the Winograd transforms
//!   write them.
//!
//! Design (`gemm_serial`): for each `NC`-column block of B and `KC`-deep slice, B is packed
//! into `NR`-column micro-panels; for each `MC`-row block of A, A is packed into `MR`-row
//! micro-panels; the macro-kernel then runs the `MR × NR` register-blocked microkernel
//! over every tile (`x86.rs`: AVX2 6×16 and 12×8, AVX-512 14×32; `portable.rs`: 4×8).
//! Packing reads any strides, so transposed operands cost nothing extra; ragged panels are
//! zero-padded and ragged tiles go through a scratch tile, written back only where valid.
//! `alpha`/`beta` are applied in the write-back (later depth slices accumulate with
//! `beta = 1`). Narrow blocks read A (or B) in place instead of packing it, since a packed
//! panel would be reused only a few times. Threads split the larger of M and N
//! (`driver`), each part running the serial loop nest with its own thread-local,
//! 64-byte-aligned packing buffers.

mod bf16;
mod pack;
mod packed;
mod portable;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use bf16::{gemm_bf16, gemm_bf16_packed_b, gemm_bf16_with, Bf16Kernel};
pub use packed::{gemm_packed_b_reference, sgemm_packed_b, PackedLayout, Panels};

/// The arithmetic of the GEMMs the conv (im2col) and linear ops issue through
/// [`crate::Float::gemm`]: `--precision`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Precision {
    /// f32 operands and accumulation ([`sgemm`]).
    #[default]
    F32,
    /// Mixed precision: operands rounded to bf16, f32 accumulation and output
    /// ([`gemm_bf16`]). Master weights, optimizer, batch norm and loss stay f32.
    Bf16,
}

impl Precision {
    pub const ALL: [Precision; 2] = [Precision::F32, Precision::Bf16];
    /// The `--precision` value.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A `--precision` value that is not one of [`Precision::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown precision {0:?} (expected f32 or bf16)")]
pub struct ParsePrecisionError(pub String);

impl std::str::FromStr for Precision {
    type Err = ParsePrecisionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Precision::ALL
            .into_iter()
            .find(|p| p.name().eq_ignore_ascii_case(s.trim()))
            .ok_or_else(|| ParsePrecisionError(s.to_string()))
    }
}

thread_local! {
    /// The innermost [`with_precision`] on this thread.
    static PRECISION: std::cell::Cell<Precision> = const { std::cell::Cell::new(Precision::F32) };
}

/// Runs `f` with [`crate::Float::gemm`] for f32 in precision `p` — on this thread and in the
/// tasks of the parallel loops it starts (models run their steps under their own precision:
/// [`crate::VggConfig::precision`]). f64 GEMMs (gradient checks) are never affected.
pub fn with_precision<R>(p: Precision, f: impl FnOnce() -> R) -> R {
    struct Restore(Precision);
    impl Drop for Restore {
        fn drop(&mut self) {
            PRECISION.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(PRECISION.with(|c| c.replace(p)));
    f()
}

/// The precision in effect here ([`Precision::F32`] outside any [`with_precision`]).
pub fn precision() -> Precision {
    PRECISION.with(|c| c.get())
}

/// Sets this thread's precision (thread pool workers, for the duration of a job).
pub(crate) fn set_precision_scope(p: Precision) {
    PRECISION.with(|c| c.set(p))
}

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
    /// AVX-512F, 14×32 register tile.
    Avx512,
    /// AVX2 + FMA, 6×16 register tile.
    Avx2Fma,
    /// Plain Rust, 4×8 tile (any CPU).
    Portable,
}

impl Kernel {
    /// Every kernel, best first.
    pub const ALL: [Kernel; 3] = [Kernel::Avx512, Kernel::Avx2Fma, Kernel::Portable];

    /// Whether this CPU can run the kernel (runtime feature detection).
    pub fn is_available(self) -> bool {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::Avx512 | Kernel::Avx2Fma => false,
            Kernel::Portable => true,
        }
    }

    /// The kernel of a SIMD level.
    pub fn for_level(level: crate::simd::SimdLevel) -> Kernel {
        match level {
            crate::simd::SimdLevel::Avx512 => Kernel::Avx512,
            crate::simd::SimdLevel::Avx2 => Kernel::Avx2Fma,
            crate::simd::SimdLevel::Portable => Kernel::Portable,
        }
    }

    /// The kernel of the process's SIMD level ([`crate::simd::level`]: the best this CPU
    /// runs, capped by `DTRAIN_SIMD`).
    pub fn detect() -> Kernel {
        Kernel::for_level(crate::simd::level())
    }

    /// The register tile `(MR, NR)` of this kernel.
    pub fn tile(self) -> (usize, usize) {
        match self {
            Kernel::Avx512 => (TileAvx512::MR, TileAvx512::NR),
            Kernel::Avx2Fma => (TileAvx2::MR, TileAvx2::NR),
            Kernel::Portable => (TilePortable::MR, TilePortable::NR),
        }
    }
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

/// `C = alpha·A·B + beta·C` in f32 with the best kernel for this CPU and
/// [`crate::parallel::num_threads`] threads. `C` is row-major `m × n` with leading
/// dimension `ldc`; when `beta == 0` it is overwritten (NaN on entry does not propagate).
///
/// Panics if a view or `C` is too small for the given shape (a programming error).
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
    sgemm_with(
        Kernel::detect(),
        crate::parallel::num_threads(),
        m,
        n,
        k,
        alpha,
        a,
        b,
        beta,
        c,
        ldc,
    )
}

/// [`sgemm`] with an explicit microkernel and thread count (the calling thread counts as
/// one). Problems too small to amortize a parallel split, and calls made from inside a
/// `parallel_for` task, run single-threaded.
///
/// Panics if `kernel` is not available on this CPU (see [`Kernel::is_available`]) or if a
/// view or `C` is too small for the shape.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_with(
    kernel: Kernel,
    threads: usize,
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
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        kernel.is_available(),
        "SGEMM kernel {kernel:?} is not supported by this CPU"
    );
    check_view("A", &a, m, k);
    check_view("B", &b, k, n);
    check_c("SGEMM", m, n, ldc, c.len());
    if k == 0 {
        scale_c(c, m, n, ldc, beta);
        return;
    }
    let cm = CMat {
        ptr: c.as_mut_ptr(),
        rs: ldc,
        cs: 1,
    };
    // SAFETY (all arms): the kernel is available on this CPU (asserted above), the views
    // were bounds-checked for the full shape, and `cm` covers the checked extent of `c`,
    // which we borrow mutably for the whole call.
    match kernel {
        Kernel::Avx512 => unsafe { driver::<TileAvx512>(threads, m, n, k, alpha, a, b, beta, cm) },
        Kernel::Avx2Fma if n <= TileAvx2Narrow::NR => unsafe {
            driver::<TileAvx2Narrow>(threads, m, n, k, alpha, a, b, beta, cm)
        },
        Kernel::Avx2Fma => unsafe { driver::<TileAvx2>(threads, m, n, k, alpha, a, b, beta, cm) },
        Kernel::Portable => unsafe {
            driver::<TilePortable>(threads, m, n, k, alpha, a, b, beta, cm)
        },
    }
}

/// Panic unless every element `(i, j)`, `i < rows`, `j < cols` of `v` is inside `v.data`.
/// Panics unless a row-major `m × n` C (`m, n >= 1`) with leading dimension `ldc` fits in
/// `len` elements. `op` names the GEMM in the message.
fn check_c(op: &str, m: usize, n: usize, ldc: usize, len: usize) {
    assert!(m == 1 || ldc >= n, "{op}: ldc ({ldc}) < n ({n})");
    let needed = (m - 1)
        .checked_mul(ldc)
        .and_then(|x| x.checked_add(n))
        .unwrap_or_else(|| panic!("{op}: C extent overflows usize"));
    assert!(
        needed <= len,
        "{op}: C has {len} elements, {m}x{n} with ldc {ldc} needs {needed}"
    );
}

/// `C = beta·C` over the `m × n` block (`C = 0` when `beta == 0`, so NaNs in C do not
/// survive, as BLAS): what a GEMM with `k == 0` computes.
fn scale_c(c: &mut [f32], m: usize, n: usize, ldc: usize, beta: f32) {
    for row in c.chunks_mut(ldc.max(n)).take(m) {
        for x in &mut row[..n] {
            *x = if beta == 0.0 { 0.0 } else { beta * *x };
        }
    }
}

fn check_view(name: &str, v: &MatRef<'_, f32>, rows: usize, cols: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    let last = (rows - 1)
        .checked_mul(v.rs)
        .and_then(|x| (cols - 1).checked_mul(v.cs).and_then(|y| x.checked_add(y)));
    match last {
        Some(last) if last < v.data.len() => {}
        _ => panic!(
            "SGEMM: {name} view ({rows}x{cols}, rs {}, cs {}) exceeds its {} elements",
            v.rs,
            v.cs,
            v.data.len()
        ),
    }
}

/// Multiply-adds (`m·n·k`) each thread must get for a parallel split to pay off
/// (2^19 ≈ 12 µs of single-core work at 85 GFLOP/s).
const MIN_WORK_PER_THREAD: usize = 1 << 19;
/// At most this many parallel parts per thread (see `driver`).
const PARTS_PER_THREAD: usize = 2;
/// Extra parts (beyond one per thread) only if each stays at least this wide.
const MIN_PART_WIDTH: usize = 256;

/// A register-blocked microkernel with its cache-blocking parameters.
///
/// Blocking for Zen 3 (32 KiB L1d, 512 KiB L2 per core, 32 MiB L3): a `KC × NR` B
/// micro-panel stays in L1 while the `MC × KC` A block streams from L2, and the
/// `KC × NC` B block lives in L3.
trait MicroKernel {
    const MR: usize;
    const NR: usize;
    const MC: usize;
    const KC: usize;
    const NC: usize;
    /// Pack an A block into MR-row panels (see `pack.rs`).
    fn pack_a(a: MatRef<'_, f32>, i0: usize, p0: usize, rows: usize, depth: usize, dst: &mut [f32]);
    /// Pack a B block into NR-column panels (see `pack.rs`).
    fn pack_b(b: MatRef<'_, f32>, p0: usize, j0: usize, depth: usize, cols: usize, dst: &mut [f32]);
    /// `C[MR×NR] = alpha · Apanel · Bpanel + beta · C` on a packed A panel (see `x86.rs`).
    ///
    /// # Safety
    /// The kernel's CPU features are present and the pointers satisfy the microkernel
    /// contract documented in `x86.rs` (with `rsa = 1, csa = MR`).
    #[allow(clippy::too_many_arguments)]
    unsafe fn run(
        kc: usize,
        a: *const f32,
        b: *const f32,
        c: *mut f32,
        rsc: usize,
        alpha: f32,
        beta: f32,
    );
    /// The same on unpacked panels: A `(i, p)` at `a + i * rsa + p * csa`, B row `p` at
    /// `b + p * rsb`.
    ///
    /// # Safety
    /// As for [`MicroKernel::run`].
    #[allow(clippy::too_many_arguments)]
    unsafe fn run_strided(
        kc: usize,
        a: *const f32,
        rsa: usize,
        csa: usize,
        b: *const f32,
        rsb: usize,
        c: *mut f32,
        rsc: usize,
        alpha: f32,
        beta: f32,
    );
}

/// Implements [`MicroKernel`] for a tile type from its kernel functions and blocking.
macro_rules! micro_kernel {
    ($tile:ident, mr: $mr:expr, nr: $nr:expr, mc: $mc:expr, kc: $kc:expr, nc: $nc:expr,
     packed: $packed:path, strided: $strided:path, cfg: $cfg:meta) => {
        struct $tile;
        impl MicroKernel for $tile {
            const MR: usize = $mr;
            const NR: usize = $nr;
            const MC: usize = $mc;
            const KC: usize = $kc;
            const NC: usize = $nc;
            fn pack_a(
                a: MatRef<'_, f32>,
                i0: usize,
                p0: usize,
                rows: usize,
                depth: usize,
                dst: &mut [f32],
            ) {
                pack::pack_a::<{ $mr }>(a, i0, p0, rows, depth, dst)
            }
            fn pack_b(
                b: MatRef<'_, f32>,
                p0: usize,
                j0: usize,
                depth: usize,
                cols: usize,
                dst: &mut [f32],
            ) {
                pack::pack_b::<{ $nr }>(b, p0, j0, depth, cols, dst)
            }
            unsafe fn run(
                kc: usize,
                a: *const f32,
                b: *const f32,
                c: *mut f32,
                rsc: usize,
                alpha: f32,
                beta: f32,
            ) {
                #[cfg($cfg)]
                // SAFETY: forwarded contract of `MicroKernel::run`.
                unsafe {
                    $packed(kc, a, b, c, rsc, alpha, beta)
                }
                #[cfg(not($cfg))]
                unreachable!(
                    "kernel not built for this CPU {:?}",
                    (kc, a, b, c, rsc, alpha, beta)
                )
            }
            unsafe fn run_strided(
                kc: usize,
                a: *const f32,
                rsa: usize,
                csa: usize,
                b: *const f32,
                rsb: usize,
                c: *mut f32,
                rsc: usize,
                alpha: f32,
                beta: f32,
            ) {
                #[cfg($cfg)]
                // SAFETY: forwarded contract of `MicroKernel::run_strided`.
                unsafe {
                    $strided(kc, a, rsa, csa, b, rsb, c, rsc, alpha, beta)
                }
                #[cfg(not($cfg))]
                unreachable!(
                    "kernel not built for this CPU {:?}",
                    (kc, a, rsa, csa, b, rsb, c, rsc, alpha, beta)
                )
            }
        }
    };
}

// Blocking for Zen 3 (AVX2): A block 144·256·4 = 144 KiB (L2), B micro-panel
// 256·16·4 = 16 KiB (half of L1), B block 256·4080·4 ≈ 4 MiB (L3).
micro_kernel!(TileAvx2, mr: 6, nr: 16, mc: 144, kc: 256, nc: 4080,
    packed: x86::kernel_avx2_6x16, strided: x86::kernel_avx2_6x16_strided,
    cfg: target_arch = "x86_64");
// The narrow AVX2 tile for n <= 8: same A/B block sizes (MC a multiple of 12).
micro_kernel!(TileAvx2Narrow, mr: 12, nr: 8, mc: 144, kc: 256, nc: 4080,
    packed: x86::kernel_avx2_12x8, strided: x86::kernel_avx2_12x8_strided,
    cfg: target_arch = "x86_64");
// AVX-512: A block 140·256·4 = 140 KiB, B micro-panel 256·32·4 = 32 KiB.
micro_kernel!(TileAvx512, mr: 14, nr: 32, mc: 140, kc: 256, nc: 4096,
    packed: x86::kernel_avx512_14x32, strided: x86::kernel_avx512_14x32_strided,
    cfg: target_arch = "x86_64");
micro_kernel!(TilePortable, mr: 4, nr: 8, mc: 128, kc: 256, nc: 4096,
    packed: portable::kernel_portable::<4, 8>, strided: portable::kernel_portable_strided::<4, 8>,
    cfg: all());

/// Largest `MR · NR` of any kernel (size of the edge-tile scratch buffer).
const MAX_TILE: usize = 14 * 32;

/// The output matrix as a raw strided pointer, so parallel tasks can each write their own
/// disjoint block and so `C` can be viewed transposed.
#[derive(Clone, Copy)]
struct CMat {
    ptr: *mut f32,
    rs: usize,
    cs: usize,
}

// SAFETY: a `CMat` is only shared between tasks that write disjoint sets of elements
// (different row or column ranges), and the `&mut [f32]` it came from is borrowed for the
// whole SGEMM call.
unsafe impl Send for CMat {}
// SAFETY: see `Send`.
unsafe impl Sync for CMat {}

impl CMat {
    /// The sub-matrix starting at `(i, j)`.
    ///
    /// # Safety
    /// `(i, j)` must lie inside the matrix.
    unsafe fn at(self, i: usize, j: usize) -> CMat {
        CMat {
            // SAFETY: in bounds by the caller's contract.
            ptr: unsafe { self.ptr.add(i * self.rs + j * self.cs) },
            ..self
        }
    }
    fn t(self) -> CMat {
        CMat {
            ptr: self.ptr,
            rs: self.cs,
            cs: self.rs,
        }
    }
}

/// Orientation, threading split, then the serial blocked loops on each part.
///
/// # Safety
/// `K` runs on this CPU; `a`, `b` were checked for `m×k`, `k×n`; `c` points to a writable
/// `m×n` matrix with strides `(c.rs, c.cs)` that nothing else accesses during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn driver<K: MicroKernel>(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    beta: f32,
    c: CMat,
) {
    // Very narrow outputs (n < NR/2) waste most of each register tile; Cᵀ = Bᵀ·Aᵀ puts
    // the long side along the tile's NR. Not done for n >= NR/2: it would make the big
    // operand (A, e.g. the weights) the one that must be packed (a transposing copy),
    // while as A it is read in place for narrow blocks (see `DIRECT_PANELS`).
    let (m, n, a, b, c) = if 2 * n < K::NR && m > n {
        (n, m, b.t(), a.t(), c.t())
    } else {
        (m, n, a, b, c)
    };
    for_each_part(
        threads,
        m,
        n,
        k,
        (K::MR, K::NR),
        |(i0, rows), (j0, cols)| {
            let a_part = MatRef {
                data: &a.data[i0 * a.rs..],
                ..a
            };
            let b_part = MatRef {
                data: &b.data[j0 * b.cs..],
                ..b
            };
            // SAFETY: forwarded contract; parts cover disjoint blocks of C, (i0, j0) is inside.
            unsafe { gemm_serial::<K>(rows, cols, k, alpha, a_part, b_part, beta, c.at(i0, j0)) }
        },
    );
}

/// The threading split of an `m×n×k` product with register tile `(mr, nr)`: calls
/// `part((i0, rows), (j0, cols))` for disjoint blocks of C covering it, on up to `threads`
/// threads (one call with the whole of C when the work is too small to split, or from
/// inside a parallel task). Each block is computed by one thread in a fixed order, so the
/// result does not depend on the thread count.
fn for_each_part(
    threads: usize,
    m: usize,
    n: usize,
    k: usize,
    (mr, nr): (usize, usize),
    part: impl Fn((usize, usize), (usize, usize)) + Sync,
) {
    // Each thread needs enough work to amortize waking it (a few µs).
    let work = m.saturating_mul(n).saturating_mul(k);
    let threads = if crate::parallel::in_parallel() {
        1
    } else {
        threads.min(work / MIN_WORK_PER_THREAD).max(1)
    };
    if threads == 1 {
        part((0, m), (0, n));
        return;
    }
    // Split the larger dimension: splitting N makes every part re-pack all of A (cost
    // ∝ m·k per part vs. m·k·n/T of arithmetic), splitting M re-packs B; both are small
    // relative to the arithmetic when the split dimension is large.
    let split_n = n >= m;
    let (len, step) = if split_n { (n, nr) } else { (m, mr) };
    let units = len.div_ceil(step);
    // Two parts per thread, claimed dynamically, so a thread that loses its core for a
    // while (DDP's communication thread, other processes) does not hold everyone up. Each
    // part re-packs the other operand, so parts stay at least MIN_PART_WIDTH wide.
    let parts = (work / MIN_WORK_PER_THREAD)
        .min(PARTS_PER_THREAD * threads)
        .min(len / MIN_PART_WIDTH)
        .max(threads)
        .min(units);
    crate::parallel::parallel_for_threads(threads.min(parts), parts, |t| {
        let lo = (units * t / parts * step).min(len);
        let hi = (units * (t + 1) / parts * step).min(len);
        if lo >= hi {
            return;
        }
        if split_n {
            part((0, m), (lo, hi - lo))
        } else {
            part((lo, hi - lo), (0, n))
        }
    });
}

thread_local! {
    /// Per-thread packing buffers for A blocks and B blocks, reused across calls.
    static PACK_BUFS: std::cell::RefCell<(pack::AlignedBuf, pack::AlignedBuf)> =
        std::cell::RefCell::new(Default::default());
}

/// Split `len` into `ceil(len / max)` blocks of nearly equal size, each a multiple of
/// `align` (except possibly the last), so no tiny trailing block is left over.
fn block_size(len: usize, max: usize, align: usize) -> usize {
    let blocks = len.div_ceil(max);
    len.div_ceil(blocks)
        .next_multiple_of(align)
        .min(max.max(align))
}

/// The BLIS loop nest on one thread: jc (NC) → pc (KC, pack B) → ic (MC, pack A) →
/// macro-kernel (jr, ir) over register tiles.
///
/// # Safety
/// As for [`driver`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_serial<K: MicroKernel>(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
    beta: f32,
    c: CMat,
) {
    // Take the buffers out of the thread-local (and put them back at the end) so no
    // RefCell borrow is held across the computation.
    let (mut abuf, mut bbuf) = PACK_BUFS.with(|bufs| bufs.take());
    let kc_max = block_size(k, K::KC, 1);
    let mc_max = block_size(m, K::MC, K::MR);
    let nc_max = block_size(n, K::NC, K::NR);
    let apack = abuf.get(mc_max.next_multiple_of(K::MR) * kc_max);
    // With few column panels each packed A panel would be reused only a few times, so the
    // packing pass (a transposing copy of all of A) would cost about as much as the
    // arithmetic: read A in place instead (the microkernel broadcasts from any address).
    let direct_a = nc_max.div_ceil(K::NR) <= DIRECT_PANELS;
    // Likewise for B when there are few row panels, if its rows are contiguous (the
    // kernel loads NR consecutive floats per depth step).
    let direct_b = !direct_a && b.cs == 1 && mc_max.div_ceil(K::MR) <= DIRECT_PANELS;
    let bpack = bbuf.get(nc_max.next_multiple_of(K::NR) * kc_max);

    let mut jc = 0;
    while jc < n {
        let nc = nc_max.min(n - jc);
        let mut pc = 0;
        while pc < k {
            let kc = kc_max.min(k - pc);
            // Later depth blocks accumulate onto the first one's result.
            let beta_block = if pc == 0 { beta } else { 1.0 };
            let b_block = if direct_b {
                // Only a ragged last column panel is packed (to the buffer's start).
                let ragged = nc % K::NR;
                if ragged != 0 {
                    K::pack_b(b, pc, jc + nc - ragged, kc, ragged, bpack);
                }
                Block::Direct {
                    m: b,
                    r0: pc,
                    c0: jc,
                }
            } else {
                K::pack_b(b, pc, jc, kc, nc, bpack);
                Block::Packed
            };
            let mut ic = 0;
            while ic < m {
                let mc = mc_max.min(m - ic);
                let a_block = if direct_a {
                    // A ragged last row panel is still packed (to the buffer's start),
                    // since the kernel reads whole panels.
                    let ragged = mc % K::MR;
                    if ragged != 0 {
                        K::pack_a(a, ic + mc - ragged, pc, ragged, kc, apack);
                    }
                    Block::Direct {
                        m: a,
                        r0: ic,
                        c0: pc,
                    }
                } else {
                    K::pack_a(a, ic, pc, mc, kc, apack);
                    Block::Packed
                };
                // SAFETY: (ic, jc) is inside C; the block is mc × nc within m × n.
                unsafe {
                    macro_kernel::<K>(
                        mc,
                        nc,
                        kc,
                        alpha,
                        beta_block,
                        a_block,
                        apack,
                        b_block,
                        bpack,
                        c.at(ic, jc),
                    )
                };
                ic += mc;
            }
            pc += kc;
        }
        jc += nc;
    }
    PACK_BUFS.with(|bufs| bufs.replace((abuf, bbuf)));
}

/// Read A (B) in place when a block has at most this many column (row) panels.
const DIRECT_PANELS: usize = 4;

/// Where the macro-kernel reads the current A or B block from.
#[derive(Clone, Copy)]
enum Block<'a> {
    /// Packed into the buffer by `pack_a` / `pack_b`.
    Packed,
    /// In place: the block starts at `(r0, c0)` of the strided view. A ragged last panel
    /// is still packed, to the start of the buffer (by `gemm_serial`), since the kernel
    /// reads whole panels.
    Direct {
        m: MatRef<'a, f32>,
        r0: usize,
        c0: usize,
    },
}

#[repr(C, align(64))]
struct TileBuf([f32; MAX_TILE]);

/// Run the microkernel over every register tile of an `mc × nc` block of C.
/// Full tiles are written in place; ragged edge tiles (and transposed C) go through a
/// scratch tile and only their valid part is merged into C.
///
/// # Safety
/// As for [`driver`], with `c` pointing at the block's top-left element and the packed
/// buffers holding `mc` rows / `nc` columns at depth `kc`.
#[allow(clippy::too_many_arguments)]
unsafe fn macro_kernel<K: MicroKernel>(
    mc: usize,
    nc: usize,
    kc: usize,
    alpha: f32,
    beta: f32,
    a_block: Block<'_>,
    apack: &[f32],
    b_block: Block<'_>,
    bpack: &[f32],
    c: CMat,
) {
    debug_assert!(K::MR * K::NR <= MAX_TILE);
    debug_assert!(apack.len() >= mc.div_ceil(K::MR) * K::MR * kc);
    debug_assert!(bpack.len() >= nc.div_ceil(K::NR) * K::NR * kc);
    let mut tile = TileBuf([0.0; MAX_TILE]);
    for jp in 0..nc.div_ceil(K::NR) {
        let nr = K::NR.min(nc - jp * K::NR);
        // (B panel, its row stride or None when packed).
        let (bp, b_stride) = match b_block {
            // SAFETY: panel jp starts at jp·NR·kc < bpack.len() (packed size above).
            Block::Packed => (unsafe { bpack.as_ptr().add(jp * K::NR * kc) }, None),
            Block::Direct { m: b, r0, c0 } if nr == K::NR => (
                // SAFETY: (r0, c0 + jp·NR) is inside B (checked view; full column panel).
                unsafe { b.data.as_ptr().add(r0 * b.rs + (c0 + jp * K::NR) * b.cs) },
                Some(b.rs),
            ),
            Block::Direct { .. } => (bpack.as_ptr(), None),
        };
        for ip in 0..mc.div_ceil(K::MR) {
            let mr = K::MR.min(mc - ip * K::MR);
            // (A panel, its strides or None when packed).
            let (ap, a_strides) = match a_block {
                // SAFETY: as for `bp`, in the packed A block.
                Block::Packed => (unsafe { apack.as_ptr().add(ip * K::MR * kc) }, None),
                Block::Direct { m: a, r0, c0 } if mr == K::MR => (
                    // SAFETY: (r0 + ip·MR, c0) is inside A (checked view; full row panel).
                    unsafe { a.data.as_ptr().add((r0 + ip * K::MR) * a.rs + c0 * a.cs) },
                    Some((a.rs, a.cs)),
                ),
                Block::Direct { .. } => (apack.as_ptr(), None),
            };
            // SAFETY (both calls): the A and B panels are readable at `ap`, `bp` with the
            // given strides (or packed), and the caller passes an MR × NR tile with row
            // stride `rsc`.
            let kernel =
                |cp: *mut f32, rsc: usize, alpha: f32, beta: f32| match (a_strides, b_stride) {
                    (None, None) => unsafe { K::run(kc, ap, bp, cp, rsc, alpha, beta) },
                    _ => {
                        let (rsa, csa) = a_strides.unwrap_or((1, K::MR));
                        let rsb = b_stride.unwrap_or(K::NR);
                        unsafe { K::run_strided(kc, ap, rsa, csa, bp, rsb, cp, rsc, alpha, beta) }
                    }
                };
            // SAFETY: (ip·MR, jp·NR) is inside the mc × nc block.
            let ct = unsafe { c.at(ip * K::MR, jp * K::NR) };
            if mr == K::MR && nr == K::NR && c.cs == 1 {
                // A full tile of C with unit column stride: write in place.
                kernel(ct.ptr, ct.rs, alpha, beta);
            } else {
                // The scratch tile is MR × NR (row stride NR) and 64-byte aligned.
                kernel(tile.0.as_mut_ptr(), K::NR, 1.0, 0.0);
                for i in 0..mr {
                    for j in 0..nr {
                        let v = alpha * tile.0[i * K::NR + j];
                        // SAFETY: (i, j) is within the valid mr × nr part of the tile.
                        unsafe {
                            let dst = ct.ptr.add(i * ct.rs + j * ct.cs);
                            *dst = if beta == 0.0 { v } else { v + beta * *dst };
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The AVX-512 kernel cannot run on the development machine (Zen 3). Its intrinsics
    //! come from the same template as the tested AVX2 kernel; what is specific to it is
    //! the 14×32 tile and its blocking, which this test runs through the driver with the
    //! portable kernel at the same tile shape and block sizes.
    use super::*;

    micro_kernel!(TileAvx512Emulated, mr: 14, nr: 32, mc: TileAvx512::MC, kc: TileAvx512::KC,
        nc: TileAvx512::NC, packed: portable::kernel_portable::<14, 32>,
        strided: portable::kernel_portable_strided::<14, 32>, cfg: all());

    #[test]
    fn avx512_tiling_with_portable_kernel_matches_reference() {
        let shapes = [
            (1, 1, 1),
            (14, 32, 256),
            (15, 33, 257),
            (141, 65, 300),
            (29, 7, 513),
            (300, 100, 40),
            (9, 200, 70),
        ];
        let mut seed = 0x1234_5678u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(m, n, k) in &shapes {
            for (trans_a, trans_b) in [(false, false), (true, true), (false, true)] {
                for threads in [1, 2] {
                    let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
                    let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
                    let av = if trans_a {
                        MatRef::col_major(&a, m)
                    } else {
                        MatRef::row_major(&a, k)
                    };
                    let bv = if trans_b {
                        MatRef::col_major(&b, k)
                    } else {
                        MatRef::row_major(&b, n)
                    };
                    let c0: Vec<f32> = (0..m * n).map(|_| next()).collect();
                    let mut c = c0.clone();
                    let cm = CMat {
                        ptr: c.as_mut_ptr(),
                        rs: n,
                        cs: 1,
                    };
                    // SAFETY: portable kernel (any CPU); views and C sized for m×k, k×n, m×n.
                    unsafe { driver::<TileAvx512Emulated>(threads, m, n, k, 0.5, av, bv, 2.0, cm) };
                    let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
                    let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
                    let mut want: Vec<f64> = c0.iter().map(|&x| x as f64).collect();
                    let (av64, bv64) = (
                        MatRef {
                            data: &a64,
                            rs: av.rs,
                            cs: av.cs,
                        },
                        MatRef {
                            data: &b64,
                            rs: bv.rs,
                            cs: bv.cs,
                        },
                    );
                    gemm_reference::<f64>(m, n, k, 0.5, av64, bv64, 2.0, &mut want, n);
                    let diff: f64 = c
                        .iter()
                        .zip(&want)
                        .map(|(&x, &y)| (x as f64 - y).powi(2))
                        .sum();
                    let norm: f64 = want.iter().map(|y| y * y).sum();
                    let err = (diff / norm).sqrt();
                    assert!(
                        err <= 1e-4,
                        "{m}x{n}x{k} ta={trans_a} tb={trans_b}: {err:e}"
                    );
                }
            }
        }
    }
}
