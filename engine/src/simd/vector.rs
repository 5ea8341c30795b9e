//! One kernel source, compiled once per SIMD level.
//!
//! A kernel is written once, generic over [`F32Vec`] (a vector of `LANES` f32 lanes with the
//! few operations kernels need), as a [`SimdKernel`]. [`dispatch`] runs it with the
//! vector type of the process's [`super::level`], inside a function compiled with that
//! level's target features, so the generic body is inlined and compiled to AVX2 or AVX-512
//! instructions. The implementations:
//! - [`Avx2`]: `__m256` (8 lanes, AVX2 + FMA);
//! - [`Avx512`]: `__m512` (16 lanes, AVX-512F);
//! - [`Portable8`] / [`Portable16`]: arrays of 8 / 16 lanes in plain Rust, with the same
//!   lane semantics (including a fused multiply-add, so results match the x86 types bit for
//!   bit where the operations are the same). `Portable8` is the portable level's type;
//!   `Portable16` exists for tests: it runs a kernel's 16-lane logic (tiling, tails, lane
//!   reductions) on a machine without AVX-512, leaving only the one-line mapping of each
//!   operation to its AVX-512 intrinsic untested there.
//!
//! Rules for kernel bodies: mark [`SimdKernel::run`] and any generic helper it calls
//! `#[inline(always)]` (a helper that is not inlined is compiled without the level's
//! features); keep lane-order-dependent arithmetic (e.g. [`F32Vec::reduce_sum`]) out of
//! results that must not depend on the level, or document that they do.

use super::SimdLevel;

/// A vector of `LANES` f32 lanes.
///
/// Comparisons follow x86 semantics: a comparison with a NaN lane is false; `max`/`min`
/// return `b`'s lane when either lane is NaN (as `maxps`/`minps`).
pub trait F32Vec: Copy + Send + Sync + 'static {
    /// Lanes per vector.
    const LANES: usize;
    /// The SIMD level whose instructions this type uses.
    const LEVEL: SimdLevel;
    /// Result of a lane-wise comparison, consumed by [`F32Vec::select`].
    type Mask: Copy;

    fn splat(x: f32) -> Self;
    fn zero() -> Self {
        Self::splat(0.0)
    }
    /// Load `LANES` floats (no alignment needed).
    ///
    /// # Safety
    /// `p .. p + LANES` must be readable.
    unsafe fn load(p: *const f32) -> Self;
    /// Store `LANES` floats (no alignment needed).
    ///
    /// # Safety
    /// `p .. p + LANES` must be writable.
    unsafe fn store(self, p: *mut f32);
    /// Load the first `n` lanes (`n <= LANES`); the others are 0.
    ///
    /// # Safety
    /// `p .. p + n` must be readable.
    unsafe fn load_partial(p: *const f32, n: usize) -> Self;
    /// Store the first `n` lanes (`n <= LANES`); memory past them is not touched.
    ///
    /// # Safety
    /// `p .. p + n` must be writable.
    unsafe fn store_partial(self, p: *mut f32, n: usize);

    fn add(self, b: Self) -> Self;
    fn sub(self, b: Self) -> Self;
    fn mul(self, b: Self) -> Self;
    fn div(self, b: Self) -> Self;
    /// `self * b + c` with one rounding (fused).
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn max(self, b: Self) -> Self;
    fn min(self, b: Self) -> Self;
    /// Lane-wise `self > b`.
    fn gt(self, b: Self) -> Self::Mask;
    /// Lane-wise `self < b`.
    fn lt(self, b: Self) -> Self::Mask;
    /// Lane-wise `self == b` (false if either lane is NaN).
    fn eq(self, b: Self) -> Self::Mask;
    /// Lane-wise "is NaN".
    fn is_nan(self) -> Self::Mask;
    /// Lane-wise `a || b` of two masks.
    fn mask_or(a: Self::Mask, b: Self::Mask) -> Self::Mask;
    /// Lane-wise `if m { t } else { f }`.
    fn select(m: Self::Mask, t: Self, f: Self) -> Self;
    /// Load `LANES` bytes as lanes (`0.0 ..= 255.0`).
    ///
    /// # Safety
    /// `p .. p + LANES` must be readable.
    unsafe fn load_u8(p: *const u8) -> Self;
    /// Store the lanes, which must hold integers in `0 ..= 255`, as `LANES` bytes.
    ///
    /// # Safety
    /// `p .. p + LANES` must be writable.
    unsafe fn store_u8(self, p: *mut u8);
    /// The even and the odd lanes of the `2·LANES`-lane sequence `a ++ b`:
    /// `([a0, a2, …, b0, b2, …], [a1, a3, …, b1, b3, …])`.
    fn deinterleave(a: Self, b: Self) -> (Self, Self);
    /// The inverse of [`F32Vec::deinterleave`]: `a0, b0, a1, b1, …` as two vectors (first
    /// half, second half).
    fn interleave(a: Self, b: Self) -> (Self, Self);
    /// [`F32Vec::deinterleave`] of quarter vectors (`LANES / 4` lanes each) instead of lanes:
    /// `([a.q0, a.q2, b.q0, b.q2], [a.q1, a.q3, b.q1, b.q3])`.
    fn deinterleave_quarters(a: Self, b: Self) -> (Self, Self);
    /// The inverse of [`F32Vec::deinterleave_quarters`]:
    /// `([a.q0, b.q0, a.q1, b.q1], [a.q2, b.q2, a.q3, b.q3])`.
    fn interleave_quarters(a: Self, b: Self) -> (Self, Self);
    /// Sum of the lanes, in a fixed order: lanes are added pairwise, halves first
    /// (`LANES = 8`: `((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))`), the same for every type of
    /// the same width.
    fn reduce_sum(self) -> f32;
}

/// A kernel written once for every [`F32Vec`].
pub trait SimdKernel {
    type Output;
    /// The kernel body. Implementations must be `#[inline(always)]` (see the module docs).
    fn run<V: F32Vec>(self) -> Self::Output;
}

/// Run `kernel` at the process's SIMD level ([`super::level`]), or on the variant a
/// [`super::with_f32_impl`] scope asks for.
#[inline]
pub fn dispatch<K: SimdKernel>(kernel: K) -> K::Output {
    super::current_f32_impl().run_simd(kernel)
}

/// Run `kernel` at an explicit level (tests and benches compare levels this way).
///
/// Panics if this CPU does not support `level` (a programming error: use
/// [`SimdLevel::supported`]).
#[inline]
pub fn dispatch_at<K: SimdKernel>(level: SimdLevel, kernel: K) -> K::Output {
    assert!(
        level.is_supported(),
        "SIMD level {} is not supported by this CPU",
        level.name()
    );
    match level {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX-512F/BW/VL/DQ (checked above).
        SimdLevel::Avx512 => unsafe { run_avx512(kernel) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        SimdLevel::Avx2 => unsafe { run_avx2(kernel) },
        _ => kernel.run::<Portable8>(),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<K: SimdKernel>(kernel: K) -> K::Output {
    kernel.run::<Avx2>()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")]
unsafe fn run_avx512<K: SimdKernel>(kernel: K) -> K::Output {
    kernel.run::<Avx512>()
}

// ---------------------------------------------------------------- portable (any CPU)

macro_rules! portable_vec {
    ($(#[$doc:meta])* $name:ident, $lanes:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq)]
        pub struct $name(pub [f32; $lanes]);

        impl $name {
            #[inline(always)]
            fn map2(self, b: Self, f: impl Fn(f32, f32) -> f32) -> Self {
                let mut out = [0.0; $lanes];
                for i in 0..$lanes {
                    out[i] = f(self.0[i], b.0[i]);
                }
                $name(out)
            }
        }

        impl F32Vec for $name {
            const LANES: usize = $lanes;
            const LEVEL: SimdLevel = SimdLevel::Portable;
            type Mask = [bool; $lanes];

            #[inline(always)]
            fn splat(x: f32) -> Self {
                $name([x; $lanes])
            }
            #[inline(always)]
            unsafe fn load(p: *const f32) -> Self {
                // SAFETY: the caller guarantees `LANES` readable floats at `p`.
                $name(unsafe { std::ptr::read_unaligned(p as *const [f32; $lanes]) })
            }
            #[inline(always)]
            unsafe fn store(self, p: *mut f32) {
                // SAFETY: the caller guarantees `LANES` writable floats at `p`.
                unsafe { std::ptr::write_unaligned(p as *mut [f32; $lanes], self.0) }
            }
            #[inline(always)]
            unsafe fn load_partial(p: *const f32, n: usize) -> Self {
                let mut out = [0.0; $lanes];
                for (i, o) in out.iter_mut().enumerate().take(n.min($lanes)) {
                    // SAFETY: the caller guarantees `n` readable floats at `p`.
                    *o = unsafe { *p.add(i) };
                }
                $name(out)
            }
            #[inline(always)]
            unsafe fn store_partial(self, p: *mut f32, n: usize) {
                for i in 0..n.min($lanes) {
                    // SAFETY: the caller guarantees `n` writable floats at `p`.
                    unsafe { *p.add(i) = self.0[i] };
                }
            }
            #[inline(always)]
            fn add(self, b: Self) -> Self {
                self.map2(b, |x, y| x + y)
            }
            #[inline(always)]
            fn sub(self, b: Self) -> Self {
                self.map2(b, |x, y| x - y)
            }
            #[inline(always)]
            fn mul(self, b: Self) -> Self {
                self.map2(b, |x, y| x * y)
            }
            #[inline(always)]
            fn div(self, b: Self) -> Self {
                self.map2(b, |x, y| x / y)
            }
            #[inline(always)]
            fn mul_add(self, b: Self, c: Self) -> Self {
                let mut out = [0.0; $lanes];
                for i in 0..$lanes {
                    out[i] = self.0[i].mul_add(b.0[i], c.0[i]);
                }
                $name(out)
            }
            #[inline(always)]
            fn max(self, b: Self) -> Self {
                // maxps: `a > b ? a : b` (b when either is NaN).
                self.map2(b, |x, y| if x > y { x } else { y })
            }
            #[inline(always)]
            fn min(self, b: Self) -> Self {
                self.map2(b, |x, y| if x < y { x } else { y })
            }
            #[inline(always)]
            fn gt(self, b: Self) -> Self::Mask {
                let mut m = [false; $lanes];
                for i in 0..$lanes {
                    m[i] = self.0[i] > b.0[i];
                }
                m
            }
            #[inline(always)]
            fn lt(self, b: Self) -> Self::Mask {
                let mut m = [false; $lanes];
                for i in 0..$lanes {
                    m[i] = self.0[i] < b.0[i];
                }
                m
            }
            #[inline(always)]
            fn eq(self, b: Self) -> Self::Mask {
                let mut m = [false; $lanes];
                for i in 0..$lanes {
                    m[i] = self.0[i] == b.0[i];
                }
                m
            }
            #[inline(always)]
            fn is_nan(self) -> Self::Mask {
                let mut m = [false; $lanes];
                for i in 0..$lanes {
                    m[i] = self.0[i].is_nan();
                }
                m
            }
            #[inline(always)]
            fn mask_or(a: Self::Mask, b: Self::Mask) -> Self::Mask {
                let mut m = [false; $lanes];
                for i in 0..$lanes {
                    m[i] = a[i] || b[i];
                }
                m
            }
            #[inline(always)]
            fn select(m: Self::Mask, t: Self, f: Self) -> Self {
                let mut out = [0.0; $lanes];
                for i in 0..$lanes {
                    out[i] = if m[i] { t.0[i] } else { f.0[i] };
                }
                $name(out)
            }
            #[inline(always)]
            unsafe fn load_u8(p: *const u8) -> Self {
                // SAFETY: the caller guarantees `LANES` readable bytes at `p`.
                let bytes = unsafe { std::ptr::read_unaligned(p as *const [u8; $lanes]) };
                $name(bytes.map(|b| b as f32))
            }
            #[inline(always)]
            unsafe fn store_u8(self, p: *mut u8) {
                // SAFETY: the caller guarantees `LANES` writable bytes at `p`.
                unsafe { std::ptr::write_unaligned(p as *mut [u8; $lanes], self.0.map(|v| v as u8)) }
            }
            #[inline(always)]
            fn deinterleave(a: Self, b: Self) -> (Self, Self) {
                let (mut even, mut odd) = ([0.0; $lanes], [0.0; $lanes]);
                for i in 0..$lanes / 2 {
                    even[i] = a.0[2 * i];
                    odd[i] = a.0[2 * i + 1];
                    even[i + $lanes / 2] = b.0[2 * i];
                    odd[i + $lanes / 2] = b.0[2 * i + 1];
                }
                ($name(even), $name(odd))
            }
            #[inline(always)]
            fn interleave(a: Self, b: Self) -> (Self, Self) {
                let (mut lo, mut hi) = ([0.0; $lanes], [0.0; $lanes]);
                for i in 0..$lanes / 2 {
                    lo[2 * i] = a.0[i];
                    lo[2 * i + 1] = b.0[i];
                    hi[2 * i] = a.0[i + $lanes / 2];
                    hi[2 * i + 1] = b.0[i + $lanes / 2];
                }
                ($name(lo), $name(hi))
            }
            #[inline(always)]
            fn deinterleave_quarters(a: Self, b: Self) -> (Self, Self) {
                const Q: usize = $lanes / 4;
                let (mut even, mut odd) = ([0.0; $lanes], [0.0; $lanes]);
                for i in 0..Q {
                    for (k, src) in [(0, &a.0), (2, &b.0)] {
                        even[k * Q + i] = src[i];
                        even[(k + 1) * Q + i] = src[2 * Q + i];
                        odd[k * Q + i] = src[Q + i];
                        odd[(k + 1) * Q + i] = src[3 * Q + i];
                    }
                }
                ($name(even), $name(odd))
            }
            #[inline(always)]
            fn interleave_quarters(a: Self, b: Self) -> (Self, Self) {
                const Q: usize = $lanes / 4;
                let (mut lo, mut hi) = ([0.0; $lanes], [0.0; $lanes]);
                for i in 0..Q {
                    lo[i] = a.0[i];
                    lo[Q + i] = b.0[i];
                    lo[2 * Q + i] = a.0[Q + i];
                    lo[3 * Q + i] = b.0[Q + i];
                    hi[i] = a.0[2 * Q + i];
                    hi[Q + i] = b.0[2 * Q + i];
                    hi[2 * Q + i] = a.0[3 * Q + i];
                    hi[3 * Q + i] = b.0[3 * Q + i];
                }
                ($name(lo), $name(hi))
            }
            #[inline(always)]
            fn reduce_sum(self) -> f32 {
                let mut v = self.0;
                let mut width = $lanes;
                while width > 1 {
                    width /= 2;
                    for i in 0..width {
                        v[i] += v[i + width];
                    }
                }
                v[0]
            }
        }
    };
}

portable_vec!(
    /// 8 lanes in plain Rust: the portable level's vector.
    Portable8,
    8
);
portable_vec!(
    /// 16 lanes in plain Rust: runs AVX-512-width kernel logic anywhere (tests).
    Portable16,
    16
);

// ---------------------------------------------------------------- x86-64

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{F32Vec, SimdLevel};
    use std::arch::x86_64::*;

    /// 8 lanes, AVX2 + FMA. Only constructed inside [`super::dispatch`]'s AVX2 context.
    #[derive(Clone, Copy, Debug)]
    pub struct Avx2(__m256);

    /// 16 lanes, AVX-512F. Only constructed inside [`super::dispatch`]'s AVX-512 context.
    #[derive(Clone, Copy, Debug)]
    pub struct Avx512(__m512);

    // SAFETY (for every intrinsic call below): these types are only created by kernels that
    // `dispatch_at` runs after checking the CPU supports the level, inside a function
    // compiled with that level's target features, into which these `inline(always)`
    // methods are inlined.

    /// Lane mask of the first `n` lanes for `_mm256_maskload_ps`.
    #[inline(always)]
    fn avx2_prefix_mask(n: usize) -> __m256i {
        // SAFETY: see the note above the impls.
        unsafe {
            let idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            _mm256_cmpgt_epi32(_mm256_set1_epi32(n.min(8) as i32), idx)
        }
    }

    impl F32Vec for Avx2 {
        const LANES: usize = 8;
        const LEVEL: SimdLevel = SimdLevel::Avx2;
        type Mask = __m256;

        #[inline(always)]
        fn splat(x: f32) -> Self {
            // SAFETY: see the note above the impls.
            Avx2(unsafe { _mm256_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller guarantees 8 readable floats at `p`.
            Avx2(unsafe { _mm256_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller guarantees 8 writable floats at `p`.
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn load_partial(p: *const f32, n: usize) -> Self {
            // SAFETY: masked-off lanes are not accessed; the caller guarantees `n` floats.
            Avx2(unsafe { _mm256_maskload_ps(p, avx2_prefix_mask(n)) })
        }
        #[inline(always)]
        unsafe fn store_partial(self, p: *mut f32, n: usize) {
            // SAFETY: masked-off lanes are not accessed; the caller guarantees `n` floats.
            unsafe { _mm256_maskstore_ps(p, avx2_prefix_mask(n), self.0) }
        }
        #[inline(always)]
        fn add(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx2(unsafe { _mm256_add_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx2(unsafe { _mm256_sub_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx2(unsafe { _mm256_mul_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn div(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx2(unsafe { _mm256_div_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx2(unsafe { _mm256_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx2(unsafe { _mm256_max_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn min(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx2(unsafe { _mm256_min_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn gt(self, b: Self) -> __m256 {
            // SAFETY: see the note above the impls.
            unsafe { _mm256_cmp_ps::<_CMP_GT_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn lt(self, b: Self) -> __m256 {
            // SAFETY: see the note above the impls.
            unsafe { _mm256_cmp_ps::<_CMP_LT_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn eq(self, b: Self) -> __m256 {
            // SAFETY: see the note above the impls.
            unsafe { _mm256_cmp_ps::<_CMP_EQ_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn is_nan(self) -> __m256 {
            // SAFETY: see the note above the impls.
            unsafe { _mm256_cmp_ps::<_CMP_UNORD_Q>(self.0, self.0) }
        }
        #[inline(always)]
        fn mask_or(a: __m256, b: __m256) -> __m256 {
            // SAFETY: see the note above the impls.
            unsafe { _mm256_or_ps(a, b) }
        }
        #[inline(always)]
        fn select(m: __m256, t: Self, f: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx2(unsafe { _mm256_blendv_ps(f.0, t.0, m) })
        }
        #[inline(always)]
        unsafe fn load_u8(p: *const u8) -> Self {
            // SAFETY: the caller guarantees 8 readable bytes at `p` (a 64-bit load).
            Avx2(unsafe {
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i)))
            })
        }
        #[inline(always)]
        unsafe fn store_u8(self, p: *mut u8) {
            // SAFETY: the caller guarantees 8 writable bytes at `p` (a 64-bit store); lanes
            // in 0..=255 survive both saturating packs unchanged.
            unsafe {
                let i = _mm256_cvttps_epi32(self.0);
                let w =
                    _mm_packus_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256::<1>(i));
                _mm_storel_epi64(p as *mut __m128i, _mm_packus_epi16(w, w));
            }
        }
        #[inline(always)]
        fn deinterleave(a: Self, b: Self) -> (Self, Self) {
            // SAFETY: see the note above the impls.
            unsafe {
                // Per 128-bit half: (a0 a2 b0 b2 | a4 a6 b4 b6); then the 64-bit pairs are
                // put in order 0, 2, 1, 3.
                // (No closures here: one would be compiled without AVX2.)
                let even = _mm256_castps_pd(_mm256_shuffle_ps::<0b10_00_10_00>(a.0, b.0));
                let odd = _mm256_castps_pd(_mm256_shuffle_ps::<0b11_01_11_01>(a.0, b.0));
                (
                    Avx2(_mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(
                        even,
                    ))),
                    Avx2(_mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(
                        odd,
                    ))),
                )
            }
        }
        #[inline(always)]
        fn interleave(a: Self, b: Self) -> (Self, Self) {
            // SAFETY: see the note above the impls.
            unsafe {
                // (a0 b0 a1 b1 | a4 b4 a5 b5) and (a2 b2 a3 b3 | a6 b6 a7 b7), then halves.
                let lo = _mm256_unpacklo_ps(a.0, b.0);
                let hi = _mm256_unpackhi_ps(a.0, b.0);
                (
                    Avx2(_mm256_permute2f128_ps::<0x20>(lo, hi)),
                    Avx2(_mm256_permute2f128_ps::<0x31>(lo, hi)),
                )
            }
        }
        #[inline(always)]
        fn deinterleave_quarters(a: Self, b: Self) -> (Self, Self) {
            // SAFETY: see the note above the impls.
            unsafe {
                // Quarters are 64-bit pairs: (a0 b0 a2 b2) and (a1 b1 a3 b3), then reordered.
                let (a, b) = (_mm256_castps_pd(a.0), _mm256_castps_pd(b.0));
                let (even, odd) = (_mm256_unpacklo_pd(a, b), _mm256_unpackhi_pd(a, b));
                (
                    Avx2(_mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(
                        even,
                    ))),
                    Avx2(_mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(
                        odd,
                    ))),
                )
            }
        }
        #[inline(always)]
        fn interleave_quarters(a: Self, b: Self) -> (Self, Self) {
            // SAFETY: see the note above the impls.
            unsafe {
                // (a0 b0 a2 b2) and (a1 b1 a3 b3) in 64-bit pairs, then the 128-bit halves.
                let (a, b) = (_mm256_castps_pd(a.0), _mm256_castps_pd(b.0));
                let (lo, hi) = (_mm256_unpacklo_pd(a, b), _mm256_unpackhi_pd(a, b));
                (
                    Avx2(_mm256_castpd_ps(_mm256_permute2f128_pd::<0x20>(lo, hi))),
                    Avx2(_mm256_castpd_ps(_mm256_permute2f128_pd::<0x31>(lo, hi))),
                )
            }
        }
        #[inline(always)]
        fn reduce_sum(self) -> f32 {
            // SAFETY: see the note above the impls.
            unsafe {
                // (l0+l4, l1+l5, l2+l6, l3+l7), then (.. + ..2 apart), then pairs.
                let h = _mm_add_ps(
                    _mm256_castps256_ps128(self.0),
                    _mm256_extractf128_ps::<1>(self.0),
                );
                let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let s = _mm_add_ss(q, _mm_shuffle_ps::<0b01>(q, q));
                _mm_cvtss_f32(s)
            }
        }
    }

    impl F32Vec for Avx512 {
        const LANES: usize = 16;
        const LEVEL: SimdLevel = SimdLevel::Avx512;
        type Mask = __mmask16;

        #[inline(always)]
        fn splat(x: f32) -> Self {
            // SAFETY: see the note above the impls.
            Avx512(unsafe { _mm512_set1_ps(x) })
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            // SAFETY: the caller guarantees 16 readable floats at `p`.
            Avx512(unsafe { _mm512_loadu_ps(p) })
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            // SAFETY: the caller guarantees 16 writable floats at `p`.
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn load_partial(p: *const f32, n: usize) -> Self {
            let m: __mmask16 = if n >= 16 { 0xffff } else { (1u16 << n) - 1 };
            // SAFETY: masked-off lanes are not accessed; the caller guarantees `n` floats.
            Avx512(unsafe { _mm512_maskz_loadu_ps(m, p) })
        }
        #[inline(always)]
        unsafe fn store_partial(self, p: *mut f32, n: usize) {
            let m: __mmask16 = if n >= 16 { 0xffff } else { (1u16 << n) - 1 };
            // SAFETY: masked-off lanes are not accessed; the caller guarantees `n` floats.
            unsafe { _mm512_mask_storeu_ps(p, m, self.0) }
        }
        #[inline(always)]
        fn add(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx512(unsafe { _mm512_add_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn sub(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx512(unsafe { _mm512_sub_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn mul(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx512(unsafe { _mm512_mul_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn div(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx512(unsafe { _mm512_div_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn mul_add(self, b: Self, c: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx512(unsafe { _mm512_fmadd_ps(self.0, b.0, c.0) })
        }
        #[inline(always)]
        fn max(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx512(unsafe { _mm512_max_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn min(self, b: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx512(unsafe { _mm512_min_ps(self.0, b.0) })
        }
        #[inline(always)]
        fn gt(self, b: Self) -> __mmask16 {
            // SAFETY: see the note above the impls.
            unsafe { _mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn lt(self, b: Self) -> __mmask16 {
            // SAFETY: see the note above the impls.
            unsafe { _mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn eq(self, b: Self) -> __mmask16 {
            // SAFETY: see the note above the impls.
            unsafe { _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(self.0, b.0) }
        }
        #[inline(always)]
        fn is_nan(self) -> __mmask16 {
            // SAFETY: see the note above the impls.
            unsafe { _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(self.0, self.0) }
        }
        #[inline(always)]
        fn mask_or(a: __mmask16, b: __mmask16) -> __mmask16 {
            a | b
        }
        #[inline(always)]
        fn select(m: __mmask16, t: Self, f: Self) -> Self {
            // SAFETY: see the note above the impls.
            Avx512(unsafe { _mm512_mask_blend_ps(m, f.0, t.0) })
        }
        #[inline(always)]
        unsafe fn load_u8(p: *const u8) -> Self {
            // SAFETY: the caller guarantees 16 readable bytes at `p`.
            Avx512(unsafe {
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(p as *const __m128i)))
            })
        }
        #[inline(always)]
        unsafe fn store_u8(self, p: *mut u8) {
            // SAFETY: the caller guarantees 16 writable bytes at `p`; lanes in 0..=255 are
            // unchanged by the truncating narrow.
            unsafe {
                let b = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(self.0));
                _mm_storeu_si128(p as *mut __m128i, b)
            }
        }
        #[inline(always)]
        fn deinterleave(a: Self, b: Self) -> (Self, Self) {
            // SAFETY: see the note above the impls.
            unsafe {
                // Indices 0..15 pick from `a`, 16..31 from `b`.
                let even =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let odd =
                    _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
                (
                    Avx512(_mm512_permutex2var_ps(a.0, even, b.0)),
                    Avx512(_mm512_permutex2var_ps(a.0, odd, b.0)),
                )
            }
        }
        #[inline(always)]
        fn interleave(a: Self, b: Self) -> (Self, Self) {
            // SAFETY: see the note above the impls.
            unsafe {
                let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                let hi =
                    _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
                (
                    Avx512(_mm512_permutex2var_ps(a.0, lo, b.0)),
                    Avx512(_mm512_permutex2var_ps(a.0, hi, b.0)),
                )
            }
        }
        #[inline(always)]
        fn deinterleave_quarters(a: Self, b: Self) -> (Self, Self) {
            // SAFETY: see the note above the impls.
            unsafe {
                // Quarters are 128-bit blocks: blocks (0, 2) of a then of b, and (1, 3).
                (
                    Avx512(_mm512_shuffle_f32x4::<0b10_00_10_00>(a.0, b.0)),
                    Avx512(_mm512_shuffle_f32x4::<0b11_01_11_01>(a.0, b.0)),
                )
            }
        }
        #[inline(always)]
        fn interleave_quarters(a: Self, b: Self) -> (Self, Self) {
            // SAFETY: see the note above the impls.
            unsafe {
                // (a0 a1 b0 b1) then blocks 0, 2, 1, 3; likewise with blocks 2, 3.
                let lo = _mm512_shuffle_f32x4::<0b01_00_01_00>(a.0, b.0);
                let hi = _mm512_shuffle_f32x4::<0b11_10_11_10>(a.0, b.0);
                (
                    Avx512(_mm512_shuffle_f32x4::<0b11_01_10_00>(lo, lo)),
                    Avx512(_mm512_shuffle_f32x4::<0b11_01_10_00>(hi, hi)),
                )
            }
        }
        #[inline(always)]
        fn reduce_sum(self) -> f32 {
            // SAFETY: see the note above the impls.
            unsafe {
                // Halves first (l_i + l_{i+8}), then the 8-lane order of `Avx2::reduce_sum`.
                let lo = _mm512_castps512_ps256(self.0);
                let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(self.0)));
                let v = _mm256_add_ps(lo, hi);
                let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                let q = _mm_add_ps(h, _mm_movehl_ps(h, h));
                let s = _mm_add_ss(q, _mm_shuffle_ps::<0b01>(q, q));
                _mm_cvtss_f32(s)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512};

#[cfg(test)]
mod tests {
    use super::*;

    /// `y = a * x + y` then the sum of `y` and a relu-like select, as a kernel: exercises
    /// loads, partial tails, fma, select and reduce on every type.
    struct Probe<'a> {
        a: f32,
        x: &'a [f32],
        y: &'a mut [f32],
    }

    impl SimdKernel for Probe<'_> {
        type Output = f32;
        #[inline(always)]
        fn run<V: F32Vec>(self) -> f32 {
            let n = self.x.len();
            let av = V::splat(self.a);
            let mut acc = V::zero();
            let mut i = 0;
            while i < n {
                let m = (n - i).min(V::LANES);
                // SAFETY: `m` floats from `i` are inside both slices.
                unsafe {
                    let x = V::load_partial(self.x.as_ptr().add(i), m);
                    let y = V::load_partial(self.y.as_ptr().add(i), m);
                    let r = av.mul_add(x, y);
                    let r = V::select(r.lt(V::zero()), V::zero(), r);
                    r.store_partial(self.y.as_mut_ptr().add(i), m);
                    acc = acc.add(r);
                }
                i += m;
            }
            acc.reduce_sum()
        }
    }

    fn probe_reference(a: f32, x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            let r = a.mul_add(x, *y);
            *y = if r < 0.0 { 0.0 } else { r };
        }
    }

    fn check<V: F32Vec>() {
        for n in [0usize, 1, 7, 8, 9, 15, 16, 17, 33, 100] {
            let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let y0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() - 0.3).collect();
            let mut y = y0.clone();
            let sum = Probe {
                a: 1.5,
                x: &x,
                y: &mut y,
            }
            .run::<V>();
            let mut want = y0.clone();
            probe_reference(1.5, &x, &mut want);
            assert_eq!(y, want, "{} lanes, n = {n}", V::LANES);
            let total: f64 = want.iter().map(|&v| v as f64).sum();
            assert!(
                (sum as f64 - total).abs() <= 1e-5 * (1.0 + total.abs()),
                "{sum} vs {total}"
            );
        }
    }

    #[test]
    fn portable_types_match_the_scalar_reference() {
        check::<Portable8>();
        check::<Portable16>();
    }

    #[test]
    fn every_supported_level_matches_the_scalar_reference() {
        for level in SimdLevel::supported() {
            for n in [0usize, 5, 8, 21, 64] {
                let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
                let y0: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos() - 0.3).collect();
                let mut y = y0.clone();
                dispatch_at(
                    level,
                    Probe {
                        a: 1.5,
                        x: &x,
                        y: &mut y,
                    },
                );
                let mut want = y0.clone();
                probe_reference(1.5, &x, &mut want);
                assert_eq!(y, want, "level {}, n = {n}", level.name());
            }
        }
        if !SimdLevel::Avx512.is_supported() {
            eprintln!("!!!!! AVX-512 not supported by this CPU: the Avx512 vector type was NOT executed (its 16-lane logic runs as Portable16) !!!!!");
        }
    }

    #[test]
    fn reduce_sum_order_is_the_same_for_types_of_one_width() {
        // Values whose sum depends on the order in f32.
        let v: Vec<f32> = (0..16)
            .map(|i| 1.0e7 * ((i % 3) as f32 - 1.0) + i as f32 * 0.1)
            .collect();
        let p8 = unsafe { Portable8::load(v.as_ptr()) }.reduce_sum();
        #[cfg(target_arch = "x86_64")]
        if SimdLevel::Avx2.is_supported() {
            struct R<'a>(&'a [f32]);
            impl SimdKernel for R<'_> {
                type Output = f32;
                #[inline(always)]
                fn run<V: F32Vec>(self) -> f32 {
                    // SAFETY: the slice holds at least 16 floats.
                    unsafe { V::load(self.0.as_ptr()) }.reduce_sum()
                }
            }
            assert_eq!(dispatch_at(SimdLevel::Avx2, R(&v)).to_bits(), p8.to_bits());
        }
        let manual = ((v[0] + v[4]) + (v[2] + v[6])) + ((v[1] + v[5]) + (v[3] + v[7]));
        assert_eq!(p8.to_bits(), manual.to_bits());
    }
}
