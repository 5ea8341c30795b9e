//! bfloat16: the conversions and the one arithmetic step the mixed-precision GEMM is built
//! from, defined bit for bit as the AVX512_BF16 instructions compute them, so the native
//! kernels (`gemm::bf16`) and their emulation here give identical results.
//!
//! A bf16 value is the upper half of an f32 (sign, 8 exponent bits, 7 fraction bits).
//! - [`f32_to_bf16`]: as `VCVTNE2PS2BF16`: round to nearest even; subnormal inputs become a
//!   zero of the same sign (the instruction treats them as zero); NaN keeps its sign and
//!   upper payload bits and is made quiet (bit 6 set). Checked against the instruction on
//!   all 2^32 inputs on an AMD Zen 5 (see the `bf16` tests).
//! - [`dot2_accumulate`]: one f32 lane of `VDPBF16PS`: `acc += a.hi·b.hi`, then
//!   `acc += a.lo·b.lo` (the odd element first), each step a fused multiply-add rounded to
//!   nearest even, subnormal inputs (accumulator and bf16 values) read as zero and subnormal
//!   results written as zero of the same sign; MXCSR is neither read nor written. That is
//!   Intel's pseudo-code; measured on Zen 5 it matches the instruction on 6.4 million random
//!   lanes, half of them with products and sums near the subnormal range (the models "even
//!   first", "sum the products, then add" and "one rounding" each differ on 10-30 % of them).
//!
//! A pair word (`u32`) holds two bf16 values, element 0 in the low half: the layout
//! `VDPBF16PS` multiplies pairwise.

/// Round `x` to bf16 (see the module docs for the rules).
#[inline]
pub fn f32_to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        ((bits >> 16) as u16) | 0x40
    } else if x.is_subnormal() {
        ((bits >> 16) & 0x8000) as u16
    } else {
        // Round to nearest even on the 16 bits dropped; a carry into the exponent is the
        // correct rounding (up to infinity from the largest values).
        let lsb = (bits >> 16) & 1;
        (bits.wrapping_add(0x7fff + lsb) >> 16) as u16
    }
}

/// The f32 with the same value as bf16 `h` (exact).
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bf16 and back: the value the bf16 GEMM multiplies in place of `x`.
#[inline]
pub fn round_to_bf16(x: f32) -> f32 {
    bf16_to_f32(f32_to_bf16(x))
}

/// The pair word of bf16 `(lo, hi)`: element 0 in the low half.
#[inline]
pub fn pair(lo: u16, hi: u16) -> u32 {
    lo as u32 | (hi as u32) << 16
}

/// Element 0 (low half) of a pair word, as f32.
#[inline]
fn pair_lo(w: u32) -> f32 {
    f32::from_bits(w << 16)
}

/// Element 1 (high half) of a pair word, as f32.
#[inline]
fn pair_hi(w: u32) -> f32 {
    f32::from_bits(w & 0xffff_0000)
}

/// Subnormal to zero of the same sign (`VDPBF16PS` reads inputs and writes results so).
#[inline]
fn flush(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// `acc + a·b` with one rounding, for `a`, `b` with at most 8 significant bits (bf16 values):
/// their product is exact in f64, and the f64 sum rounds to f32 exactly as a fused f32
/// multiply-add would (where the f64 sum is inexact the exponents are more than 29 apart,
/// so the smaller term is far below half an f32 ulp of the result and cannot move it), on
/// any CPU and without a software `fmaf`.
#[inline]
fn fma_bf16(a: f32, b: f32, acc: f32) -> f32 {
    (a as f64 * b as f64 + acc as f64) as f32
}

/// One f32 lane of `VDPBF16PS`: `acc` plus the two products of the pair words `a`, `b`
/// (see the module docs for the order and rounding).
#[inline]
pub fn dot2_accumulate(acc: f32, a: u32, b: u32) -> f32 {
    let t = flush(fma_bf16(flush(pair_hi(a)), flush(pair_hi(b)), flush(acc)));
    flush(fma_bf16(flush(pair_lo(a)), flush(pair_lo(b)), t))
}

/// Convert `src` to bf16 into `dst` (same length): `VCVTNE2PS2BF16` where the process's
/// SIMD level has it ([`crate::simd::bf16_native`]), else [`f32_to_bf16`] per element; the
/// bits are the same either way.
pub fn convert_to_bf16(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "convert_to_bf16: lengths differ");
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::simd::bf16_native() {
        done = src.len() / 32 * 32;
        // SAFETY: avx512bf16 and avx512f are available (bf16_native); `done` floats of
        // `src` are read and `done` values of `dst` written, both within their lengths.
        unsafe { x86::convert_blocks_of_32(src.as_ptr(), dst.as_mut_ptr(), done) };
    }
    for (d, &s) in dst[done..].iter_mut().zip(&src[done..]) {
        *d = f32_to_bf16(s);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// 32 floats at `src` as 32 bf16 in order: as 16 pair words, element `2q` in the low half
    /// of word `q` (the bf16 GEMM's pair layout along a contiguous depth).
    ///
    /// # Safety
    /// avx512bf16 + avx512f must be available and `src .. src + 32` readable.
    #[target_feature(enable = "avx512bf16,avx512f")]
    #[inline]
    pub(crate) unsafe fn cvt32(src: *const f32) -> __m512i {
        // SAFETY: 32 readable floats (caller).
        let (lo, hi) = unsafe { (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16))) };
        // SAFETY: __m512bh and __m512i are both 64 plain bytes.
        unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
    }

    /// Convert `n` (a multiple of 32) floats at `src` to bf16 at `dst`.
    ///
    /// # Safety
    /// avx512bf16 + avx512f must be available; `src .. src + n` readable, `dst .. dst + n`
    /// writable.
    #[target_feature(enable = "avx512bf16,avx512f")]
    pub(crate) unsafe fn convert_blocks_of_32(src: *const f32, dst: *mut u16, n: usize) {
        for i in (0..n).step_by(32) {
            // SAFETY: i + 32 <= n: in bounds of both buffers (caller).
            unsafe { _mm512_storeu_si512(dst.add(i) as *mut _, cvt32(src.add(i))) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversion_rounds_to_nearest_even_and_keeps_specials() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6: up to even.
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        // Just above halfway rounds up.
        assert_eq!(f32_to_bf16(f32::from_bits(0x3f80_8001)), 0x3f81);
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80, "rounds up to infinity");
        assert_eq!(f32_to_bf16(f32::from_bits(0x0000_0001)), 0x0000);
        assert_eq!(f32_to_bf16(-f32::from_bits(0x007f_ffff)), 0x8000);
        assert_eq!(f32_to_bf16(f32::MIN_POSITIVE), 0x0080);
        // A signalling NaN whose payload lives only in the dropped bits stays a NaN.
        let snan = f32::from_bits(0x7f80_0001);
        assert!(bf16_to_f32(f32_to_bf16(snan)).is_nan());
        assert_eq!(f32_to_bf16(f32::from_bits(0xffc1_2345)), 0xffc1);
    }

    #[test]
    fn slice_conversion_equals_the_scalar_one_at_every_length() {
        // Lengths around the 32-float vector blocks, over the recorded-bits input set.
        let src = convert_inputs();
        for len in [0, 1, 31, 32, 33, 95, src.len()] {
            let mut dst = vec![0xdead_u16; len];
            convert_to_bf16(&src[..len], &mut dst);
            for (d, s) in dst.iter().zip(&src) {
                assert_eq!(*d, f32_to_bf16(*s), "{:#x} at length {len}", s.to_bits());
            }
        }
    }

    #[test]
    fn rounding_error_is_at_most_half_a_bf16_ulp() {
        // 8 significant bits: half an ulp is at most 2^-8 of the value (the unit roundoff).

        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let v = f32::from_bits(x);
            if !v.is_finite() || v.abs() < f32::MIN_POSITIVE || v.abs() > 1e38 {
                continue;
            }
            let r = round_to_bf16(v) as f64;
            let rel = ((r - v as f64) / v as f64).abs();
            assert!(rel <= 2f64.powi(-8), "{v:e} -> {r:e}: {rel:e}");
        }
    }

    #[test]
    fn dot2_takes_the_odd_products_first_and_flushes_subnormals() {
        let w = |lo: f32, hi: f32| pair(f32_to_bf16(lo), f32_to_bf16(hi));
        // hi first: (1 + 2^24·... ) order matters when the first sum absorbs the second.
        // acc = 2^24, hi product 1 (2^24 + 1 rounds to even 2^24), lo product 1 again:
        // 2^24 both ways; with lo product 3: 2^24 + 3 -> 2^24 + 4.
        let big = 2f32.powi(24);
        assert_eq!(dot2_accumulate(big, w(3.0, 1.0), w(1.0, 1.0)), big + 4.0);
        // Subnormal accumulator reads as zero; a subnormal result is flushed.
        let tiny = f32::from_bits(0x0000_0100);
        assert_eq!(dot2_accumulate(tiny, w(0.0, 0.0), w(0.0, 0.0)).to_bits(), 0);
        let r = dot2_accumulate(0.0, w(2f32.powi(-70), 0.0), w(2f32.powi(-60), 0.0));
        assert_eq!(r.to_bits(), 0, "2^-130 flushed");
        let r = dot2_accumulate(0.0, w(-2f32.powi(-70), 0.0), w(2f32.powi(-60), 0.0));
        assert_eq!(r.to_bits(), 0x8000_0000, "-2^-130 flushed to -0");
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// A bf16 with exponent `center ± spread`, random sign and fraction.
        fn bf16(&mut self, center: i32, spread: i32) -> u16 {
            let x = self.next();
            let e = (center + (x >> 8) as i32 % (2 * spread + 1) - spread).clamp(0, 254);
            (((x & 1) as u16) << 15) | ((e as u16) << 7) | ((x >> 20) & 0x7f) as u16
        }
    }

    /// `(acc, a, b)` lanes: normal range, and products / sums around 2^-126 (exponent
    /// center 127 - 63 per factor), with subnormal and negative-zero accumulators.
    fn dot_inputs() -> Vec<(f32, u32, u32)> {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut v = Vec::new();
        for center in [127, 64] {
            for _ in 0..160_000 {
                let a = pair(rng.bf16(center, 10), rng.bf16(center, 10));
                let b = pair(rng.bf16(center, 10), rng.bf16(center, 10));
                let hi = (rng.bf16(2 * center - 127, 10) as u32) << 16;
                let acc = match rng.next() % 4 {
                    0 => f32::from_bits(rng.next() as u32 & 0x807f_ffff),
                    1 => -0.0,
                    _ => f32::from_bits(hi | (rng.next() as u32 & 0xffff)),
                };
                v.push((acc, a, b));
            }
        }
        v
    }

    /// A stride through all 2^32 bit patterns (every sign, exponent, NaN and subnormal
    /// class) with the rounding boundaries around each; a multiple of 32 long.
    fn convert_inputs() -> Vec<f32> {
        let mut src = Vec::new();
        let mut x = 0u64;
        while x < 1 << 32 {
            for d in [0u32, 0x7fff, 0x8000, 0x8001, 0xffff] {
                src.push(f32::from_bits((x as u32) & 0xffff_0000 | d));
            }
            x += 65_537 * 3;
        }
        src.truncate(src.len() / 32 * 32);
        src
    }

    fn fnv(h: u64, x: u32) -> u64 {
        (h ^ x as u64).wrapping_mul(0x0100_0000_01b3)
    }

    /// FNV-1a of `VDPBF16PS` / `VCVTNE2PS2BF16` on [`dot_inputs`] / [`convert_inputs`], as the
    /// instructions computed them on an AMD EPYC Zen 5 (recorded with `native_hashes`): the
    /// emulation must reproduce the hardware's bits on every CPU, also those without it.
    const NATIVE_DOT_HASH: u64 = 0x10ce_ec25_2c14_25cb;
    const NATIVE_CONVERT_HASH: u64 = 0x6035_cb3a_f74d_bdc1;

    fn emulated_hashes() -> (u64, u64) {
        let dot = dot_inputs()
            .iter()
            .map(|&(acc, a, b)| dot2_accumulate(acc, a, b).to_bits())
            .fold(0xcbf2_9ce4_8422_2325, fnv);
        let cvt = convert_inputs()
            .iter()
            .map(|&x| f32_to_bf16(x) as u32)
            .fold(0xcbf2_9ce4_8422_2325, fnv);
        (dot, cvt)
    }

    /// The emulation reproduces the instructions' recorded bits (any CPU).
    #[test]
    fn emulation_reproduces_the_recorded_native_bits() {
        let (dot, cvt) = emulated_hashes();
        assert_eq!(
            dot, NATIVE_DOT_HASH,
            "dot2_accumulate differs from VDPBF16PS"
        );
        assert_eq!(
            cvt, NATIVE_CONVERT_HASH,
            "f32_to_bf16 differs from VCVTNE2PS2BF16"
        );
    }

    /// Lane by lane against the instructions themselves, where this CPU has them (on a CPU
    /// without avx512_bf16 this test asserts the capability is absent and the emulated
    /// path is what runs: the comparison itself is the recorded-bits test above).
    #[test]
    fn emulation_matches_the_native_instructions_lane_by_lane() {
        if !crate::simd::bf16_supported() {
            assert!(
                !crate::simd::bf16_native(),
                "no avx512_bf16: native path must be off"
            );
            eprintln!("no avx512_bf16 on this CPU: compared with recorded native bits only");
            return;
        }
        #[cfg(target_arch = "x86_64")]
        native_checks::run(dot_inputs(), convert_inputs());
    }

    #[cfg(target_arch = "x86_64")]
    mod native_checks {
        use super::super::*;
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512bf16,avx512f")]
        unsafe fn native_dot(acc: &[f32; 16], a: &[u32; 16], b: &[u32; 16]) -> [f32; 16] {
            // SAFETY: 16 readable / writable lanes each; the vector types are plain bytes.
            unsafe {
                let c = _mm512_loadu_ps(acc.as_ptr());
                let av: __m512bh = std::mem::transmute(_mm512_loadu_si512(a.as_ptr() as *const _));
                let bv: __m512bh = std::mem::transmute(_mm512_loadu_si512(b.as_ptr() as *const _));
                let mut out = [0f32; 16];
                _mm512_storeu_ps(out.as_mut_ptr(), _mm512_dpbf16_ps(c, av, bv));
                out
            }
        }

        /// Native results and their hashes (printed, to record `NATIVE_*_HASH`).
        pub(super) fn run(dots: Vec<(f32, u32, u32)>, src: Vec<f32>) {
            let mut h = 0xcbf2_9ce4_8422_2325;
            for lanes in dots.chunks(16) {
                let acc: [f32; 16] = std::array::from_fn(|j| lanes[j].0);
                let a: [u32; 16] = std::array::from_fn(|j| lanes[j].1);
                let b: [u32; 16] = std::array::from_fn(|j| lanes[j].2);
                // SAFETY: the caller checked bf16_supported().
                let got = unsafe { native_dot(&acc, &a, &b) };
                for j in 0..16 {
                    let want = dot2_accumulate(acc[j], a[j], b[j]);
                    assert_eq!(
                        got[j].to_bits(),
                        want.to_bits(),
                        "acc {:#x} a {:#x} b {:#x}",
                        acc[j].to_bits(),
                        a[j],
                        b[j]
                    );
                    h = super::fnv(h, got[j].to_bits());
                }
            }
            let mut native = vec![0u16; src.len()];
            // SAFETY: avx512bf16 present; both buffers hold src.len() (a multiple of 32).
            unsafe { x86::convert_blocks_of_32(src.as_ptr(), native.as_mut_ptr(), src.len()) };
            let mut hc = 0xcbf2_9ce4_8422_2325;
            for (s, n) in src.iter().zip(&native) {
                assert_eq!(*n, f32_to_bf16(*s), "{:#x}", s.to_bits());
                hc = super::fnv(hc, *n as u32);
            }
            eprintln!("native hashes: dot {h:#x}, convert {hc:#x}");
        }
    }
}
