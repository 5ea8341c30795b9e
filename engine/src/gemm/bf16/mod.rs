//! Mixed-precision GEMM for `--precision bf16`: `C = alpha·A·B + beta·C` with f32 A, B and
//! C in memory, A and B rounded to bf16 while they are packed (no separate conversion pass),
//! products of bf16 pairs summed into f32 accumulators by `VDPBF16PS`, C written in f32.
//!
//! Same BLIS loop nest as the f32 SGEMM (`super::gemm_serial`), with the threading split
//! shared ([`super::for_each_part`]); what differs:
//! - Panels hold pair words (`u32`, two bf16 along the depth, see [`crate::bf16`]): an A
//!   panel has word `(q, i)` = `(A[i][2q], A[i][2q+1])` at `q·MR + i`, a B panel word
//!   `(q, j)` = `(B[2q][j], B[2q+1][j])` at `q·NR + j`; an odd depth is padded with a zero.
//! - Both operands are always packed (the conversion happens there), never read in place.
//! - Two microkernels over the same tile and blocking, [`Bf16Kernel::Native`] (AVX512_BF16,
//!   14×32: 28 zmm accumulators, each `VDPBF16PS` 32 multiply-adds) and
//!   [`Bf16Kernel::Emulated`] ([`crate::bf16::dot2_accumulate`] per lane, any CPU). Since the
//!   blocking, the order of every accumulation and the write-back
//!   (`alpha·acc + beta·C` per depth block, as in the f32 kernels) are the same, the two give
//!   the same bits.
//!
//! Error: with `â`, `b̂` the bf16-rounded operands, each element is the f32 sum of the exact
//! products `â·b̂` (exact: 8-bit significands) in a fixed order, one rounding per pair step
//! and per depth block: `|c - Σ â b̂| <= (K + ⌈K/KC⌉ + 1)·2^-24 · Σ|â||b̂|` (first order).
//! Against the f32 operands add the bf16 rounding (unit roundoff `u = 2^-8`):
//! `|â b̂ - a b| <= (2u + u²)|a b|`. Subnormal operands and partial sums are read / written as
//! zero (the instructions' rule), an absolute error below `2^-126` per step.

mod pack;
#[cfg(target_arch = "x86_64")]
mod x86;

use super::{
    block_size, check_c, check_view, for_each_part, scale_c, CMat, MatRef, PackedLayout, Panels,
    MAX_TILE,
};
use crate::bf16::dot2_accumulate;

/// Which bf16 microkernel a GEMM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bf16Kernel {
    /// `VDPBF16PS` / `VCVTNE2PS2BF16` (AVX512_BF16).
    Native,
    /// The same arithmetic in plain Rust, lane by lane (any CPU; slow).
    Emulated,
}

impl Bf16Kernel {
    pub const ALL: [Bf16Kernel; 2] = [Bf16Kernel::Native, Bf16Kernel::Emulated];

    /// Whether this CPU can run it (ignores `DTRAIN_SIMD`).
    pub fn is_available(self) -> bool {
        match self {
            Bf16Kernel::Native => crate::simd::bf16_supported(),
            Bf16Kernel::Emulated => true,
        }
    }

    /// The kernel of this process: native when [`crate::simd::bf16_native`].
    pub fn detect() -> Bf16Kernel {
        if crate::simd::bf16_native() {
            Bf16Kernel::Native
        } else {
            Bf16Kernel::Emulated
        }
    }

    /// How `--verbose` names it.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Kernel::Native => "avx512-bf16 (VDPBF16PS, 14x32 tile)",
            Bf16Kernel::Emulated => "emulated bf16 (no avx512_bf16 at this SIMD level; slow)",
        }
    }
}

/// Register tile and cache blocking (both kernels): `KC` is in depth elements (even), so the
/// `MC × KC` A block is 140·512·2 B = 140 KiB (L2) and a `KC × NR` B micro-panel
/// 512·32·2 B = 32 KiB (L1), the byte sizes of the f32 AVX-512 blocking.
const MR: usize = 14;
const NR: usize = 32;
const MC: usize = 140;
const KC: usize = 512;
const NC: usize = 4096;

/// `C = alpha·A·B + beta·C` in mixed precision with the kernel of this process and
/// [`crate::parallel::num_threads`] threads (same contract as [`super::sgemm`]).
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16(
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
    gemm_bf16_with(
        Bf16Kernel::detect(),
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

/// [`gemm_bf16`] with an explicit kernel and thread count. Panics if the kernel is not
/// available here or a view or `C` is too small for the shape.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_with(
    kernel: Bf16Kernel,
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
        "bf16 GEMM kernel {kernel:?} is not supported by this CPU"
    );
    check_view("A", &a, m, k);
    check_view("B", &b, k, n);
    check_c("bf16 GEMM", m, n, ldc, c.len());
    if k == 0 {
        scale_c(c, m, n, ldc, beta);
        return;
    }
    let c = CMat {
        ptr: c.as_mut_ptr(),
        rs: ldc,
        cs: 1,
    };
    // Narrow outputs waste most of the 32-wide tile: compute Cᵀ = Bᵀ·Aᵀ instead.
    let (m, n, a, b, c) = if 2 * n < NR && m > n {
        (n, m, b.t(), a.t(), c.t())
    } else {
        (m, n, a, b, c)
    };
    for_each_part(threads, m, n, k, (MR, NR), |(i0, rows), (j0, cols)| {
        let a_part = MatRef {
            data: &a.data[i0 * a.rs..],
            ..a
        };
        let b_part = MatRef {
            data: &b.data[j0 * b.cs..],
            ..b
        };
        let b_part = BSource::View(b_part);
        // SAFETY: the kernel is available (asserted), the views were checked for the full
        // shape, parts cover disjoint blocks of C, which is borrowed mutably for the call.
        unsafe {
            gemm_serial(
                kernel,
                rows,
                cols,
                k,
                alpha,
                a_part,
                b_part,
                beta,
                c.at(i0, j0),
            )
        }
    });
}

/// `C[m×n] = A·B + beta·C` (row-major C, leading dimension `ldc`) with B `k × n` in the f32
/// SGEMM's panel layout `layout` ([`Panels::b`], as the Winograd transforms write it) and A
/// any strided view, on the calling thread: the bf16 counterpart of
/// [`super::sgemm_packed_b`]. B is converted while it is re-packed into pair panels.
///
/// Panics if the kernel is not available here or an operand is too small.
#[allow(clippy::too_many_arguments)]
pub fn gemm_bf16_packed_b(
    kernel: Bf16Kernel,
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
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        kernel.is_available(),
        "bf16 GEMM kernel {kernel:?} is not supported by this CPU"
    );
    check_view("A", &a, m, k);
    let panels = Panels::b(layout, n, k);
    assert!(b.len() >= panels.len(), "packed B too small");
    check_c("packed bf16 GEMM", m, n, ldc, c.len());
    if k == 0 {
        scale_c(c, m, n, ldc, beta);
        return;
    }
    let cm = CMat {
        ptr: c.as_mut_ptr(),
        rs: ldc,
        cs: 1,
    };
    let b = BSource::Panels { data: b, panels };
    // SAFETY: the kernel is available, A was checked for m × k, B holds the k × n panels
    // (asserted), C is the checked m × n row-major matrix, borrowed mutably for the call.
    unsafe { gemm_serial(kernel, m, n, k, 1.0, a, b, beta, cm) }
}

/// Where B comes from: a strided f32 view, or the f32 SGEMM's packed panels.
#[derive(Clone, Copy)]
enum BSource<'a> {
    View(MatRef<'a, f32>),
    Panels { data: &'a [f32], panels: Panels },
}

thread_local! {
    /// Per-thread packed A and B blocks (pair words), reused across calls.
    static PACK_BUFS: std::cell::RefCell<(Vec<u32>, Vec<u32>)> = Default::default();
}

/// The loop nest on one thread: jc (NC) → pc (KC, pack B) → ic (MC, pack A) → tiles.
///
/// # Safety
/// `kernel` runs on this CPU; `a`, `b` hold `m×k`, `k×n`; `c` is a writable `m×n` block
/// that nothing else accesses during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_serial(
    kernel: Bf16Kernel,
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: MatRef<'_, f32>,
    b: BSource<'_>,
    beta: f32,
    c: CMat,
) {
    let (mut apack, mut bpack) = PACK_BUFS.with(|bufs| bufs.take());
    let native = kernel == Bf16Kernel::Native;
    let kc_max = block_size(k, KC, 2);
    let mc_max = block_size(m, MC, MR);
    let nc_max = block_size(n, NC, NR);
    let kp_max = kc_max.div_ceil(2);
    apack.resize(apack.len().max(mc_max.next_multiple_of(MR) * kp_max), 0);
    bpack.resize(bpack.len().max(nc_max.next_multiple_of(NR) * kp_max), 0);
    let mut jc = 0;
    while jc < n {
        let nc = nc_max.min(n - jc);
        let mut pc = 0;
        while pc < k {
            let kc = kc_max.min(k - pc);
            let beta_block = if pc == 0 { beta } else { 1.0 };
            match b {
                // (p, j) of B is row j, depth p of Bᵀ.
                BSource::View(b) => {
                    pack::pack_pairs::<NR>(b.t(), jc, pc, nc, kc, &mut bpack, native)
                }
                BSource::Panels { data, panels } => pack::pack_pairs_from_panels::<NR>(
                    data, panels, jc, pc, nc, kc, &mut bpack, native,
                ),
            }
            let mut ic = 0;
            while ic < m {
                let mc = mc_max.min(m - ic);
                pack::pack_pairs::<MR>(a, ic, pc, mc, kc, &mut apack, native);
                // SAFETY: (ic, jc) is inside C; the packed blocks hold mc rows / nc columns
                // at depth kc; the kernel is available (caller).
                unsafe {
                    macro_kernel(
                        kernel,
                        mc,
                        nc,
                        kc.div_ceil(2),
                        alpha,
                        beta_block,
                        &apack,
                        &bpack,
                        c.at(ic, jc),
                    )
                };
                ic += mc;
            }
            pc += kc;
        }
        jc += nc;
    }
    PACK_BUFS.with(|bufs| bufs.replace((apack, bpack)));
}

#[repr(C, align(64))]
struct TileBuf([f32; MAX_TILE]);

/// Every register tile of an `mc × nc` block of C (`kp` pair steps); ragged edge tiles and
/// transposed C go through a scratch tile of which only the valid part is merged into C.
///
/// # Safety
/// As for [`gemm_serial`], with `c` at the block's top-left element.
#[allow(clippy::too_many_arguments)]
unsafe fn macro_kernel(
    kernel: Bf16Kernel,
    mc: usize,
    nc: usize,
    kp: usize,
    alpha: f32,
    beta: f32,
    apack: &[u32],
    bpack: &[u32],
    c: CMat,
) {
    assert!(apack.len() >= mc.div_ceil(MR) * MR * kp && bpack.len() >= nc.div_ceil(NR) * NR * kp);
    let mut tile = TileBuf([0.0; MAX_TILE]);
    for jp in 0..nc.div_ceil(NR) {
        let nr = NR.min(nc - jp * NR);
        let bp = &bpack[jp * NR * kp..];
        for ip in 0..mc.div_ceil(MR) {
            let mr = MR.min(mc - ip * MR);
            let ap = &apack[ip * MR * kp..];
            // SAFETY: both panels hold kp pair steps (asserted sizes); the caller passes an
            // MR × NR tile with row stride `rsc`; the kernel is available.
            let run = |cp: *mut f32, rsc: usize, alpha: f32, beta: f32| unsafe {
                run_tile(kernel, kp, ap.as_ptr(), bp.as_ptr(), cp, rsc, alpha, beta)
            };
            // SAFETY: (ip·MR, jp·NR) is inside the block.
            let ct = unsafe { c.at(ip * MR, jp * NR) };
            if mr == MR && nr == NR && c.cs == 1 {
                run(ct.ptr, ct.rs, alpha, beta);
            } else {
                run(tile.0.as_mut_ptr(), NR, 1.0, 0.0);
                for i in 0..mr {
                    for j in 0..nr {
                        let v = alpha * tile.0[i * NR + j];
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

/// One `MR × NR` tile: `C = alpha · Apanel · Bpanel + beta · C` over `kp` pair steps.
///
/// # Safety
/// `kernel` runs here; `a` holds `kp·MR` and `b` `kp·NR` words; `c` is an `MR × NR` tile
/// with row stride `rsc`.
#[allow(clippy::too_many_arguments)]
#[inline]
unsafe fn run_tile(
    kernel: Bf16Kernel,
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    beta: f32,
) {
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded contract (avx512bf16 present: the kernel is available).
        Bf16Kernel::Native => unsafe { x86::kernel_bf16_14x32(kp, a, b, c, rsc, alpha, beta) },
        #[cfg(not(target_arch = "x86_64"))]
        Bf16Kernel::Native => unreachable!("no native bf16 kernel on this architecture"),
        // SAFETY: forwarded contract.
        Bf16Kernel::Emulated => unsafe { kernel_emulated(kp, a, b, c, rsc, alpha, beta) },
    }
}

/// The native kernel's arithmetic lane by lane: each accumulator starts at 0 and takes one
/// [`dot2_accumulate`] per pair step; the write-back is `alpha·acc` (`beta == 0`) or
/// `fma(alpha, acc, beta·C)`, as `_mm512_mul_ps` / `_mm512_fmadd_ps` round them.
///
/// # Safety
/// As for [`run_tile`].
#[allow(clippy::needless_range_loop)]
unsafe fn kernel_emulated(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    beta: f32,
) {
    let mut acc = [[0f32; NR]; MR];
    for q in 0..kp {
        // SAFETY: pair step q of both panels (caller: kp·MR and kp·NR words).
        let (aq, bq) = unsafe {
            (
                std::slice::from_raw_parts(a.add(q * MR), MR),
                std::slice::from_raw_parts(b.add(q * NR), NR),
            )
        };
        for i in 0..MR {
            for j in 0..NR {
                acc[i][j] = dot2_accumulate(acc[i][j], aq[i], bq[j]);
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: row i of the caller's MR × NR tile.
        let out = unsafe { std::slice::from_raw_parts_mut(c.add(i * rsc), NR) };
        for (o, &x) in out.iter_mut().zip(row) {
            *o = if beta == 0.0 {
                alpha * x
            } else {
                alpha.mul_add(x, beta * *o)
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each element by definition: the lane step over the pairs of one depth block, then the
    /// block write-back, in the kernels' order — independent of the tiling and packing code.
    fn lane_reference(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
        use crate::bf16::{f32_to_bf16, pair};
        let kc = block_size(k, KC, 2);
        for i in 0..m {
            for j in 0..n {
                let mut cij = 0f32;
                for p0 in (0..k).step_by(kc) {
                    let mut acc = 0f32;
                    for p in (p0..(p0 + kc).min(k)).step_by(2) {
                        let hi = |x: &dyn Fn(usize) -> f32| {
                            if p + 1 < (p0 + kc).min(k) {
                                f32_to_bf16(x(p + 1))
                            } else {
                                0
                            }
                        };
                        let aw = pair(f32_to_bf16(a[i * k + p]), hi(&|q| a[i * k + q]));
                        let bw = pair(f32_to_bf16(b[p * n + j]), hi(&|q| b[q * n + j]));
                        acc = dot2_accumulate(acc, aw, bw);
                    }
                    cij = if p0 == 0 { acc } else { 1f32.mul_add(acc, cij) };
                }
                c[i * n + j] = cij;
            }
        }
    }

    #[test]
    fn emulated_kernel_follows_the_lane_definition_bitwise() {
        let mut seed = 11u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(m, n, k) in &[(1, 1, 1), (15, 33, 7), (29, 65, 1030), (3, 40, 513)] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let mut want = vec![0f32; m * n];
            lane_reference(m, n, k, &a, &b, &mut want);
            let mut got = vec![f32::NAN; m * n];
            gemm_bf16_with(
                Bf16Kernel::Emulated,
                2,
                m,
                n,
                k,
                1.0,
                MatRef::row_major(&a, k),
                MatRef::row_major(&b, n),
                0.0,
                &mut got,
                n,
            );
            for (x, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{m}x{n}x{k} at {x}: {g} vs {w}");
            }
        }
    }
}
