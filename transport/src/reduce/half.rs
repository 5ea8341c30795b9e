//! 16-bit floats for compressed all-reduce: [`Bf16`] (bfloat16: f32's exponent, 8-bit
//! significand) and [`F16`] (IEEE binary16: 5-bit exponent, 11-bit significand).
//!
//! They are ordinary [`crate::Element`]s: `all_reduce` of a `[Bf16]` or `[F16]` moves half the
//! bytes of the f32 buffer it was encoded from. Every reduction step (one hop of a ring, one
//! rank folded into an accumulator) widens both operands to f32, combines them in f32 and
//! rounds the result back to 16 bits (round to nearest, ties to even), so the algorithms and
//! their documented sum orders are exactly those of f32 with `⊕` replaced by that step, and
//! all ranks get bitwise identical buffers.
//!
//! Conversions ([`HalfFloat::encode`], [`HalfFloat::decode`]) round to nearest even, keep
//! infinities and the sign of zero, map NaN to a quiet NaN with the same sign and the top of
//! the payload, and turn f32 values beyond the 16-bit range into ±inf (binary16 also has
//! subnormals down to 2^-24). They use AVX2 (bf16) and F16C (fp16) when the CPU has them and a
//! scalar version otherwise; both give the same bits (tested on every 16-bit pattern and on
//! f32 patterns around every rounding boundary), so hosts with different CPUs still agree.

use super::dtype::{DType, Element, ReduceOp};
use super::kernels::{combine_typed, Order};

/// bfloat16: the top 16 bits of an f32, rounded. `==` compares bit patterns.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct Bf16(u16);

/// IEEE 754 binary16 (half precision). `==` compares bit patterns.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(transparent)]
pub struct F16(u16);

/// A 16-bit float format that collectives can reduce (through f32).
pub trait HalfFloat: Element + Copy + PartialEq {
    fn from_bits(bits: u16) -> Self;
    fn to_bits(self) -> u16;
    /// Round to nearest, ties to even (NaN stays NaN, out of range becomes ±inf).
    fn from_f32(x: f32) -> Self;
    /// Exact.
    fn to_f32(self) -> f32;
    /// `dst[i] = from_f32(src[i])`, vectorized where the CPU allows. Panics if the lengths
    /// differ.
    fn encode(src: &[f32], dst: &mut [Self]);
    /// `dst[i] = src[i].to_f32()`, vectorized where the CPU allows. Panics if the lengths
    /// differ.
    fn decode(src: &[Self], dst: &mut [f32]);
}

impl Element for Bf16 {
    const DTYPE: DType = DType::BF16;
}
impl Element for F16 {
    const DTYPE: DType = DType::F16;
}

impl HalfFloat for Bf16 {
    fn from_bits(bits: u16) -> Self {
        Bf16(bits)
    }
    fn to_bits(self) -> u16 {
        self.0
    }
    fn from_f32(x: f32) -> Self {
        Bf16(scalar::bf16_from_f32(x))
    }
    fn to_f32(self) -> f32 {
        scalar::bf16_to_f32(self.0)
    }
    fn encode(src: &[f32], dst: &mut [Self]) {
        encode_with(Kernel::best(Format::Bf16), Format::Bf16, src, bits_mut(dst));
    }
    fn decode(src: &[Self], dst: &mut [f32]) {
        decode_with(Kernel::best(Format::Bf16), Format::Bf16, bits(src), dst);
    }
}

impl HalfFloat for F16 {
    fn from_bits(bits: u16) -> Self {
        F16(bits)
    }
    fn to_bits(self) -> u16 {
        self.0
    }
    fn from_f32(x: f32) -> Self {
        F16(scalar::f16_from_f32(x))
    }
    fn to_f32(self) -> f32 {
        scalar::f16_to_f32(self.0)
    }
    fn encode(src: &[f32], dst: &mut [Self]) {
        encode_with(Kernel::best(Format::F16), Format::F16, src, bits_mut(dst));
    }
    fn decode(src: &[Self], dst: &mut [f32]) {
        decode_with(Kernel::best(Format::F16), Format::F16, bits(src), dst);
    }
}

impl std::fmt::Debug for Bf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Bf16({:?})", self.to_f32())
    }
}
impl std::fmt::Debug for F16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "F16({:?})", self.to_f32())
    }
}

fn bits<H: HalfFloat>(s: &[H]) -> &[u16] {
    bytemuck::cast_slice(s)
}
fn bits_mut<H: HalfFloat>(s: &mut [H]) -> &mut [u16] {
    bytemuck::cast_slice_mut(s)
}

/// The two formats, for the kernels (which work on raw `u16` bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    Bf16,
    F16,
}

impl Format {
    fn of(dtype: DType) -> Format {
        match dtype {
            DType::BF16 => Format::Bf16,
            DType::F16 => Format::F16,
            other => unreachable!("{other:?} is not a 16-bit float"),
        }
    }
}

/// Which implementation of the conversions runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    Scalar,
    /// AVX2 for bf16, F16C (+AVX) for fp16.
    X86,
}

impl Kernel {
    pub(crate) fn best(format: Format) -> Kernel {
        if Kernel::X86.available(format) {
            Kernel::X86
        } else {
            Kernel::Scalar
        }
    }

    pub(crate) fn available(self, format: Format) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Kernel::X86 => match format {
                Format::Bf16 => std::arch::is_x86_feature_detected!("avx2"),
                Format::F16 => {
                    std::arch::is_x86_feature_detected!("avx")
                        && std::arch::is_x86_feature_detected!("f16c")
                }
            },
            #[cfg(not(target_arch = "x86_64"))]
            Kernel::X86 => {
                let _ = format;
                false
            }
        }
    }
}

pub(crate) fn encode_with(kernel: Kernel, format: Format, src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "encode: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::X86 && kernel.available(format) {
        match format {
            // SAFETY: the CPU has the features these functions are compiled for (checked).
            Format::Bf16 => unsafe { x86::encode_bf16(src, dst) },
            Format::F16 => unsafe { x86::encode_f16(src, dst) },
        }
        return;
    }
    let _ = kernel;
    let round = match format {
        Format::Bf16 => scalar::bf16_from_f32,
        Format::F16 => scalar::f16_from_f32,
    };
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = round(s));
}

pub(crate) fn decode_with(kernel: Kernel, format: Format, src: &[u16], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "decode: length mismatch");
    #[cfg(target_arch = "x86_64")]
    if kernel == Kernel::X86 && kernel.available(format) {
        match format {
            // SAFETY: the CPU has the features these functions are compiled for (checked).
            Format::Bf16 => unsafe { x86::decode_bf16(src, dst) },
            Format::F16 => unsafe { x86::decode_f16(src, dst) },
        }
        return;
    }
    let _ = kernel;
    let widen = match format {
        Format::Bf16 => scalar::bf16_to_f32,
        Format::F16 => scalar::f16_to_f32,
    };
    dst.iter_mut().zip(src).for_each(|(d, &s)| *d = widen(s));
}

/// Elements per step of the reductions below: two f32 blocks of this size stay in L1.
const BLOCK: usize = 256;

/// Decodes 16-bit values from bytes that may be unaligned (network frames).
fn decode_bytes(format: Format, kernel: Kernel, src: &[u8], dst: &mut [f32]) {
    match bytemuck::try_cast_slice::<u8, u16>(src) {
        Ok(s) => decode_with(kernel, format, s, dst),
        Err(_) => {
            let mut tmp = [0u16; BLOCK];
            let tmp = &mut tmp[..dst.len()];
            bytemuck::cast_slice_mut::<u16, u8>(tmp).copy_from_slice(src);
            decode_with(kernel, format, tmp, dst);
        }
    }
}

fn encode_bytes(format: Format, kernel: Kernel, src: &[f32], dst: &mut [u8]) {
    match bytemuck::try_cast_slice_mut::<u8, u16>(dst) {
        Ok(d) => encode_with(kernel, format, src, d),
        Err(_) => {
            let mut tmp = [0u16; BLOCK];
            let tmp = &mut tmp[..src.len()];
            encode_with(kernel, format, src, tmp);
            dst.copy_from_slice(bytemuck::cast_slice(tmp));
        }
    }
}

/// `dst[i] = round16(f32(dst[i]) ⊕ f32(src[i]))` (operands in `order`), with f32's
/// semantics for `⊕` (see `combine_typed`).
pub(super) fn combine(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp, order: Order) {
    let format = Format::of(dtype);
    let kernel = Kernel::best(format);
    let (mut a, mut b) = ([0f32; BLOCK], [0f32; BLOCK]);
    for (d, s) in dst.chunks_mut(2 * BLOCK).zip(src.chunks(2 * BLOCK)) {
        let (a, b) = (&mut a[..d.len() / 2], &mut b[..d.len() / 2]);
        decode_bytes(format, kernel, d, a);
        decode_bytes(format, kernel, s, b);
        combine_typed(a, b, op, order);
        encode_bytes(format, kernel, a, d);
    }
}

/// `buf[i] = round16(f32(buf[i]) * scale)`.
pub(super) fn scale(buf: &mut [u8], dtype: DType, scale: f32) {
    let format = Format::of(dtype);
    let kernel = Kernel::best(format);
    let mut a = [0f32; BLOCK];
    for d in buf.chunks_mut(2 * BLOCK) {
        let a = &mut a[..d.len() / 2];
        decode_bytes(format, kernel, d, a);
        a.iter_mut().for_each(|v| *v *= scale);
        encode_bytes(format, kernel, a, d);
    }
}

/// The conversions one value at a time, with integer arithmetic only (so they do not depend
/// on the floating-point environment).
pub(crate) mod scalar {
    pub fn bf16_from_f32(x: f32) -> u16 {
        let b = x.to_bits();
        if x.is_nan() {
            return ((b >> 16) as u16) | 0x0040; // quiet, same sign and top payload
        }
        // Adding 0x7fff plus the lowest kept bit rounds to nearest even; a carry out of the
        // significand bumps the exponent, and past the largest finite value lands on inf.
        let round = 0x7fff + ((b >> 16) & 1);
        (b.wrapping_add(round) >> 16) as u16
    }

    pub fn bf16_to_f32(h: u16) -> f32 {
        f32::from_bits((h as u32) << 16)
    }

    pub fn f16_from_f32(x: f32) -> u16 {
        let b = x.to_bits();
        let sign = ((b >> 16) & 0x8000) as u16;
        let a = b & 0x7fff_ffff;
        if a > 0x7f80_0000 {
            return sign | 0x7e00 | ((a >> 13) & 0x3ff) as u16; // NaN: quiet, top payload
        }
        if a >= 0x477f_f000 {
            // >= 65520 (halfway between the largest finite, 65504, and 65536) or inf.
            return sign | 0x7c00;
        }
        if a >= 0x3880_0000 {
            // Normal in binary16 (>= 2^-14): rebias the exponent (127 -> 15), then round the
            // 13 dropped bits to nearest even; a carry bumps the exponent.
            let r = a - 0x3800_0000;
            return sign | ((r + 0xfff + ((r >> 13) & 1)) >> 13) as u16;
        }
        // Subnormal in binary16 (or zero): value = mant * 2^(e - 150); in units of 2^-24
        // that is mant >> (126 - e). f32 subnormals (e = 0) are far below 2^-25 and round to 0.
        let e = a >> 23;
        if e < 102 {
            return sign; // < 2^-25: rounds to (signed) zero
        }
        let mant = (a & 0x7f_ffff) | 0x80_0000;
        let shift = 126 - e; // 14..=24
        let q = mant >> shift;
        let rem = mant & ((1 << shift) - 1);
        let half = 1 << (shift - 1);
        let up = rem > half || (rem == half && q & 1 == 1);
        sign | (q + up as u32) as u16
    }

    pub fn f16_to_f32(h: u16) -> f32 {
        let sign = ((h & 0x8000) as u32) << 16;
        let e = ((h >> 10) & 0x1f) as u32;
        let m = (h & 0x3ff) as u32;
        let bits = match (e, m) {
            (0x1f, 0) => sign | 0x7f80_0000,
            (0x1f, _) => sign | 0x7fc0_0000 | (m << 13), // NaN: quiet, payload kept
            (0, 0) => sign,
            (0, _) => {
                // Subnormal: m * 2^-24; normalize so the leading one becomes implicit.
                let shift = m.leading_zeros() - 21; // moves the leading one to bit 10
                let exp = 113 - shift; // 2^-14 is exponent 113; each shift halves it
                sign | (exp << 23) | (((m << shift) & 0x3ff) << 13)
            }
            _ => sign | ((e + 112) << 23) | (m << 13),
        };
        f32::from_bits(bits)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// 8 f32 -> 8 bf16 in the low 16 bits of each 32-bit lane (as `scalar::bf16_from_f32`).
    #[target_feature(enable = "avx2")]
    fn round_bf16(x: __m256) -> __m256i {
        let b = _mm256_castps_si256(x);
        let high = _mm256_srli_epi32::<16>(b);
        let lsb = _mm256_and_si256(high, _mm256_set1_epi32(1));
        let round = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb);
        let rounded = _mm256_srli_epi32::<16>(_mm256_add_epi32(b, round));
        let quiet_nan = _mm256_or_si256(high, _mm256_set1_epi32(0x40));
        let is_nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
        _mm256_blendv_epi8(rounded, quiet_nan, is_nan)
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn encode_bf16(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let whole = n - n % 16;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for i in (0..whole).step_by(16) {
            // SAFETY: i + 16 <= whole <= n for both slices; unaligned loads and stores.
            let (lo, hi) = unsafe { (_mm256_loadu_ps(s.add(i)), _mm256_loadu_ps(s.add(i + 8))) };
            // packus works per 128-bit lane: [lo0-3 hi0-3 | lo4-7 hi4-7]; the permute puts the
            // 64-bit quarters back in order. Values are <= 0xffff, so nothing saturates.
            let packed = _mm256_packus_epi32(round_bf16(lo), round_bf16(hi));
            let ordered = _mm256_permute4x64_epi64::<0b11_01_10_00>(packed);
            // SAFETY: as above.
            unsafe { _mm256_storeu_si256(d.add(i) as *mut __m256i, ordered) };
        }
        for i in whole..n {
            dst[i] = super::scalar::bf16_from_f32(src[i]);
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) fn decode_bf16(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let whole = n - n % 8;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= whole <= n for both slices; unaligned loads and stores.
            let h = unsafe { _mm_loadu_si128(s.add(i) as *const __m128i) };
            let wide = _mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h));
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(d.add(i), _mm256_castsi256_ps(wide)) };
        }
        for i in whole..n {
            dst[i] = super::scalar::bf16_to_f32(src[i]);
        }
    }

    #[target_feature(enable = "avx,f16c")]
    pub(super) fn encode_f16(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let whole = n - n % 8;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= whole <= n for both slices; unaligned loads and stores.
            let x = unsafe { _mm256_loadu_ps(s.add(i)) };
            // The immediate rounding mode (not MXCSR's): nearest, ties to even.
            let h = _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x);
            // SAFETY: as above.
            unsafe { _mm_storeu_si128(d.add(i) as *mut __m128i, h) };
        }
        for i in whole..n {
            dst[i] = super::scalar::f16_from_f32(src[i]);
        }
    }

    #[target_feature(enable = "avx,f16c")]
    pub(super) fn decode_f16(src: &[u16], dst: &mut [f32]) {
        let n = src.len().min(dst.len());
        let whole = n - n % 8;
        let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
        for i in (0..whole).step_by(8) {
            // SAFETY: i + 8 <= whole <= n for both slices; unaligned loads and stores.
            let h = unsafe { _mm_loadu_si128(s.add(i) as *const __m128i) };
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(d.add(i), _mm256_cvtph_ps(h)) };
        }
        for i in whole..n {
            dst[i] = super::scalar::f16_to_f32(src[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Independent reference: the 16-bit value nearest to `x` (ties to even), computed in f64
    /// from the format's parameters rather than from bit tricks. `None` for NaN.
    fn reference_round(format: Format, x: f32) -> Option<f64> {
        if x.is_nan() {
            return None;
        }
        let (mant_bits, min_exp, max_finite) = match format {
            // bf16: 7 stored bits, normal exponents down to -126, max (2 - 2^-7) * 2^127.
            Format::Bf16 => (7, -126, (2.0 - 2f64.powi(-7)) * 2f64.powi(127)),
            Format::F16 => (10, -14, 65504.0),
        };
        let x = x as f64;
        if x.is_infinite() {
            return Some(x);
        }
        if x == 0.0 {
            return Some(x);
        }
        let exp = (x.abs().log2().floor() as i32).max(min_exp);
        // log2 may be off by one near powers of two: fix the exponent so 2^exp <= |x| < 2^(exp+1)
        let exp = if exp > min_exp && 2f64.powi(exp) > x.abs() {
            exp - 1
        } else if 2f64.powi(exp + 1) <= x.abs() {
            exp + 1
        } else {
            exp
        };
        let ulp = 2f64.powi(exp - mant_bits);
        let q = x / ulp; // exact: a power-of-two scaling
        let r = q.round_ties_even() * ulp;
        // Overflow: anything that rounds beyond the largest finite value becomes inf.
        if r.abs() > max_finite {
            return Some(f64::INFINITY.copysign(x));
        }
        Some(if r == 0.0 { 0.0f64.copysign(x) } else { r })
    }

    fn decode_one(format: Format, kernel: Kernel, h: u16) -> f32 {
        let mut out = [0f32];
        decode_with(kernel, format, &[h], &mut out);
        out[0]
    }

    fn kernels(format: Format) -> Vec<Kernel> {
        let ks: Vec<Kernel> = [Kernel::Scalar, Kernel::X86]
            .into_iter()
            .filter(|k| k.available(format))
            .collect();
        if ks.len() < 2 {
            eprintln!(
                "WARNING: no SIMD conversion for {format:?} on this CPU: only the scalar kernel is tested"
            );
        }
        ks
    }

    /// f32 inputs: every rounding boundary of the 16-bit formats and its neighbours, the
    /// specials, and a sweep of random bit patterns.
    fn f32_cases(format: Format) -> Vec<f32> {
        let mut out = vec![
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7f80_0001), // signalling NaN
            f32::from_bits(0xffbf_ffff),
            f32::MAX,
            f32::MIN,
            f32::MIN_POSITIVE,
            f32::from_bits(1),
            65504.0,
            65519.996,
            65520.0,
            65536.0,
            -65520.0,
        ];
        // Every 16-bit value, the midpoints to its neighbour and one f32 ulp around both.
        let shift = match format {
            Format::Bf16 => 16,
            Format::F16 => 13,
        };
        for h in 0..=u16::MAX {
            let v = decode_one(format, Kernel::Scalar, h);
            if !v.is_finite() {
                continue;
            }
            let b = v.to_bits();
            match format {
                Format::Bf16 => {
                    let mid = b + (1 << (shift - 1));
                    out.extend([mid - 1, mid, mid + 1, b + 1].map(f32::from_bits));
                }
                Format::F16 => {
                    let next = decode_one(format, Kernel::Scalar, h.wrapping_add(1));
                    if next.is_finite() && (next > v) == (v >= 0.0) {
                        let mid = (v as f64 + next as f64) / 2.0;
                        let m = mid as f32; // exact: one more bit than f16 fits in f32
                        let mb = m.to_bits();
                        out.extend([mb - 1, mb, mb + 1].map(f32::from_bits));
                    }
                    out.push(f32::from_bits(b.wrapping_add(1)));
                }
            }
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(f32::from_bits(x as u32));
        }
        out
    }

    fn check_encode(format: Format) {
        let cases = f32_cases(format);
        for kernel in kernels(format) {
            let mut got = vec![0u16; cases.len()];
            encode_with(kernel, format, &cases, &mut got);
            for (&x, &h) in cases.iter().zip(&got) {
                let back = decode_one(format, Kernel::Scalar, h);
                match reference_round(format, x) {
                    None => {
                        assert!(back.is_nan(), "{kernel:?} {x:?} -> {h:#06x} is not NaN");
                        assert_eq!(
                            back.is_sign_negative(),
                            x.is_sign_negative(),
                            "{kernel:?} NaN sign {x:?}"
                        );
                    }
                    Some(want) => assert!(
                        back as f64 == want && back.is_sign_negative() == want.is_sign_negative(),
                        "{format:?} {kernel:?}: {x:e} ({:#010x}) -> {h:#06x} = {back:e}, want {want:e}",
                        x.to_bits()
                    ),
                }
            }
            // Scalar and SIMD agree bit for bit (NaN payloads included).
            let scalar: Vec<u16> = cases
                .iter()
                .map(|&x| match format {
                    Format::Bf16 => scalar::bf16_from_f32(x),
                    Format::F16 => scalar::f16_from_f32(x),
                })
                .collect();
            assert!(got == scalar, "{format:?} {kernel:?} differs from scalar");
        }
    }

    fn check_decode(format: Format) {
        let all: Vec<u16> = (0..=u16::MAX).collect();
        for kernel in kernels(format) {
            let mut got = vec![0f32; all.len()];
            decode_with(kernel, format, &all, &mut got);
            for (&h, &v) in all.iter().zip(&got) {
                // Reference: the format's definition in f64.
                let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
                let (ebits, mbits) = match format {
                    Format::Bf16 => (8, 7),
                    Format::F16 => (5, 10),
                };
                let e = ((h as u32 >> mbits) & ((1 << ebits) - 1)) as i32;
                let m = (h as u32 & ((1 << mbits) - 1)) as f64;
                let bias = (1 << (ebits - 1)) - 1;
                let want = if e == (1 << ebits) - 1 {
                    if m == 0.0 {
                        sign * f64::INFINITY
                    } else {
                        f64::NAN
                    }
                } else if e == 0 {
                    sign * m * 2f64.powi(1 - bias - mbits)
                } else {
                    sign * (1.0 + m / (1u32 << mbits) as f64) * 2f64.powi(e - bias)
                };
                if want.is_nan() {
                    assert!(v.is_nan(), "{format:?} {kernel:?} {h:#06x} -> {v}");
                    assert_eq!(v.is_sign_negative(), sign < 0.0);
                    // Round trip keeps the NaN's sign and (quieted) payload.
                    let mut back = [0u16];
                    encode_with(kernel, format, &[v], &mut back);
                    let quiet = match format {
                        Format::Bf16 => 0x0040,
                        Format::F16 => 0x0200,
                    };
                    assert_eq!(back[0], h | quiet, "{format:?} NaN {h:#06x} round trip");
                } else {
                    assert!(
                        v as f64 == want && v.is_sign_negative() == (sign < 0.0),
                        "{format:?} {kernel:?} {h:#06x} -> {v:e}, want {want:e}"
                    );
                    let mut back = [0u16];
                    encode_with(kernel, format, &[v], &mut back);
                    assert_eq!(back[0], h, "{format:?} {kernel:?} round trip of {h:#06x}");
                }
            }
            let scalar: Vec<u32> = all
                .iter()
                .map(|&h| decode_one(format, Kernel::Scalar, h).to_bits())
                .collect();
            let simd: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
            assert!(
                simd == scalar,
                "{format:?} {kernel:?} decode differs from scalar"
            );
        }
    }

    #[test]
    fn bf16_encode_rounds_to_nearest_even_on_every_kernel() {
        check_encode(Format::Bf16);
    }

    #[test]
    fn f16_encode_rounds_to_nearest_even_on_every_kernel() {
        check_encode(Format::F16);
    }

    #[test]
    fn bf16_decode_is_exact_for_every_pattern_on_every_kernel() {
        check_decode(Format::Bf16);
    }

    #[test]
    fn f16_decode_is_exact_for_every_pattern_on_every_kernel() {
        check_decode(Format::F16);
    }

    #[test]
    fn kernels_handle_every_length_tail() {
        let src: Vec<f32> = (0..70).map(|i| i as f32 * 1.37 - 20.0).collect();
        for format in [Format::Bf16, Format::F16] {
            for kernel in kernels(format) {
                for len in 0..src.len() {
                    let mut h = vec![0xaaaau16; len + 1];
                    encode_with(kernel, format, &src[..len], &mut h[..len]);
                    assert_eq!(h[len], 0xaaaa, "encode wrote past {len}");
                    let mut back = vec![7f32; len + 1];
                    decode_with(kernel, format, &h[..len], &mut back[..len]);
                    assert_eq!(back[len], 7.0, "decode wrote past {len}");
                    for i in 0..len {
                        let want = match format {
                            Format::Bf16 => scalar::bf16_from_f32(src[i]),
                            Format::F16 => scalar::f16_from_f32(src[i]),
                        };
                        assert_eq!(h[i], want, "{format:?} {kernel:?} len {len} elem {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn typed_api_round_trips() {
        let v = [1.0f32, -2.5, 3.0e-3, 1.0e30];
        let mut b = [Bf16::default(); 4];
        Bf16::encode(&v, &mut b);
        let mut f = [F16::default(); 4];
        F16::encode(&v, &mut f);
        let mut out = [0f32; 4];
        Bf16::decode(&b, &mut out);
        assert_eq!(out[..2], [1.0, -2.5]);
        assert_eq!(out[3], Bf16::from_f32(1.0e30).to_f32());
        F16::decode(&f, &mut out);
        assert_eq!(out[..2], [1.0, -2.5]);
        assert_eq!(out[3], f32::INFINITY, "1e30 overflows binary16");
        assert_eq!(F16::from_f32(3.0e-3).to_bits(), f[2].to_bits());
        assert_eq!(format!("{:?}", Bf16::from_f32(-2.5)), "Bf16(-2.5)");
    }
}
