//! x86-64 SIMD microkernels (AVX2+FMA and AVX-512F), generated from one template so the
//! AVX-512 kernel — which cannot run on the development machine (Zen 3) — shares its logic
//! line for line with the AVX2 kernel that the tests do exercise.
//!
//! A microkernel computes one `MR × NR` tile: `C = alpha · Apanel · Bpanel + beta · C`
//! where `Apanel` is `kc` steps of `MR` packed floats and `Bpanel` is `kc` steps of `NR`
//! packed floats (64-byte aligned). Accumulators live in `MR · NR / lanes` vector registers:
//! each step loads `NR / lanes` vectors of B, broadcasts each of the `MR` values of A and
//! issues one FMA per accumulator.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

macro_rules! simd_kernel {
    (
        $(#[$doc:meta])*
        name: $name:ident, features: $feat:literal, mr: $mr:literal, nv: $nv:literal,
        lanes: $lanes:literal, zero: $zero:ident, loadu: $loadu:ident,
        storeu: $storeu:ident, set1: $set1:ident, fmadd: $fmadd:ident, mul: $mul:ident
    ) => {
        $(#[$doc])*
        ///
        /// # Safety
        /// The CPU must support the enabled target features; element `(i, p)` of the
        /// `MR × kc` A panel must be readable at `a + i * rsa + p * csa` (packed panels:
        /// `rsa = 1, csa = MR`), row `p` of the `kc × NR` B panel at `b + p * rsb` (NR
        /// contiguous floats; packed panels: `rsb = NR`), and `c` must point to an
        /// `MR × NR` row-major tile with row stride `rsc`.
        #[target_feature(enable = $feat)]
        #[inline]
        #[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
        pub(crate) unsafe fn $name(
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
            const MR: usize = $mr;
            const NV: usize = $nv;
            // Start pulling the C tile into L1 now so the write-back (which reads C when
            // beta != 0, and writes it in any case) does not stall on a cache miss.
            for i in 0..MR {
                // SAFETY: prefetching is a hint; the addresses are inside the C tile.
                unsafe {
                    let row = c.add(i * rsc) as *const i8;
                    _mm_prefetch::<_MM_HINT_T0>(row);
                    _mm_prefetch::<_MM_HINT_T0>(row.add(NV * $lanes * 4 - 4));
                }
            }
            let mut acc = [[$zero(); NV]; MR];
            let mut ap = a;
            let mut bp = b;
            for _ in 0..kc {
                let mut bv = [$zero(); NV];
                for j in 0..NV {
                    // SAFETY: `bp` walks the B panel: row p at `p * rsb`, NR floats each.
                    bv[j] = unsafe { $loadu(bp.add(j * $lanes)) };
                }
                for i in 0..MR {
                    // SAFETY: `ap` walks the A panel: (i, p) at `i * rsa + p * csa`.
                    let av = $set1(unsafe { *ap.add(i * rsa) });
                    for j in 0..NV {
                        acc[i][j] = $fmadd(av, bv[j], acc[i][j]);
                    }
                }
                // SAFETY: one step forward inside the panels (at most one past the end).
                unsafe {
                    ap = ap.add(csa);
                    bp = bp.add(rsb);
                }
            }
            let alpha_v = $set1(alpha);
            if beta == 0.0 {
                // Overwrite: C is never read, so NaN/garbage on entry does not leak in.
                for i in 0..MR {
                    for j in 0..NV {
                        // SAFETY: (i, j*lanes..) lies in the caller's MR × NR tile.
                        unsafe { $storeu(c.add(i * rsc + j * $lanes), $mul(alpha_v, acc[i][j])) };
                    }
                }
            } else {
                let beta_v = $set1(beta);
                for i in 0..MR {
                    for j in 0..NV {
                        // SAFETY: (i, j*lanes..) lies in the caller's MR × NR tile.
                        unsafe {
                            let p = c.add(i * rsc + j * $lanes);
                            let old = $mul(beta_v, $loadu(p));
                            $storeu(p, $fmadd(alpha_v, acc[i][j], old));
                        }
                    }
                }
            }
        }
    };
}

/// A kernel entry point for packed A and B (`rsa = 1, csa = MR, rsb = NR` as constants,
/// so the inlined body addresses both with immediate offsets) next to the strided one.
macro_rules! packed_entry {
    ($packed:ident, $strided:ident, $feat:literal, $mr:literal, $nr:literal) => {
        /// The microkernel on a packed A panel.
        ///
        /// # Safety
        /// As for the strided kernel with `rsa = 1, csa = MR, rsb = NR`.
        #[target_feature(enable = $feat)]
        pub(crate) unsafe fn $packed(
            kc: usize,
            a: *const f32,
            b: *const f32,
            c: *mut f32,
            rsc: usize,
            alpha: f32,
            beta: f32,
        ) {
            // SAFETY: forwarded contract.
            unsafe { $strided(kc, a, 1, $mr, b, $nr, c, rsc, alpha, beta) }
        }
    };
}

simd_kernel! {
    /// AVX2+FMA 6×16 tile: 12 ymm accumulators + 2 for B + 1 broadcast (15 of 16).
    name: kernel_avx2_6x16_strided, features: "avx2,fma", mr: 6, nv: 2, lanes: 8,
    zero: _mm256_setzero_ps, loadu: _mm256_loadu_ps,
    storeu: _mm256_storeu_ps, set1: _mm256_set1_ps, fmadd: _mm256_fmadd_ps, mul: _mm256_mul_ps
}

simd_kernel! {
    /// AVX2+FMA 12×8 tile for narrow outputs (n <= 8): 12 ymm accumulators + 1 for B +
    /// 1 broadcast. Wastes half the lanes at n = 4 instead of three quarters.
    name: kernel_avx2_12x8_strided, features: "avx2,fma", mr: 12, nv: 1, lanes: 8,
    zero: _mm256_setzero_ps, loadu: _mm256_loadu_ps,
    storeu: _mm256_storeu_ps, set1: _mm256_set1_ps, fmadd: _mm256_fmadd_ps, mul: _mm256_mul_ps
}

simd_kernel! {
    /// AVX-512F 14×32 tile: 28 zmm accumulators + 2 for B + 1 broadcast (31 of 32).
    name: kernel_avx512_14x32_strided, features: "avx512f", mr: 14, nv: 2, lanes: 16,
    zero: _mm512_setzero_ps, loadu: _mm512_loadu_ps,
    storeu: _mm512_storeu_ps, set1: _mm512_set1_ps, fmadd: _mm512_fmadd_ps, mul: _mm512_mul_ps
}

packed_entry!(
    kernel_avx2_6x16,
    kernel_avx2_6x16_strided,
    "avx2,fma",
    6,
    16
);
packed_entry!(
    kernel_avx512_14x32,
    kernel_avx512_14x32_strided,
    "avx512f",
    14,
    32
);
packed_entry!(
    kernel_avx2_12x8,
    kernel_avx2_12x8_strided,
    "avx2,fma",
    12,
    8
);
