//! The AVX512_BF16 microkernel and the vectorized packing conversions.

use std::arch::x86_64::*;

use super::{MR, NR};

/// `VPERMW` indices interleaving two converted rows: word `t` = (element `t` of the first
/// 16 bf16, element `t` of the second 16).
const INTERLEAVE: [u16; 32] = {
    let mut idx = [0u16; 32];
    let mut t = 0;
    while t < 16 {
        idx[2 * t] = t as u16;
        idx[2 * t + 1] = 16 + t as u16;
        t += 1;
    }
    idx
};

/// Mask of the first `n` (<= 16) lanes.
#[inline(always)]
fn lanes(n: usize) -> __mmask16 {
    ((1u32 << n) - 1) as __mmask16
}

/// One panel whose rows are contiguous: element `(i, p)` at `src + i + p·cs`, `r <= R`
/// valid rows.
///
/// # Safety
/// avx512bf16/f/bw present; the `r × depth` elements readable; `d` holds `R·⌈depth/2⌉` words.
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
pub(super) unsafe fn pack_rows_contiguous<const R: usize>(
    src: *const f32,
    cs: usize,
    r: usize,
    depth: usize,
    d: &mut [u32],
) {
    debug_assert!(r <= R && d.len() >= R * depth.div_ceil(2));
    for q in 0..depth.div_ceil(2) {
        let p = 2 * q;
        for i0 in (0..R).step_by(16) {
            let width = (R - i0).min(16);
            let valid = r.saturating_sub(i0).min(width);
            let lo = src.wrapping_add(i0 + p * cs);
            let hi = (p + 1 < depth).then(|| src.wrapping_add(i0 + (p + 1) * cs));
            // SAFETY: rows i0..i0+valid at depths p (and p+1) are readable (caller); words
            // q·R + i0 .. + width are inside `d` (asserted size).
            unsafe { pack16(lo, hi, valid, width, d.as_mut_ptr().add(q * R + i0)) };
        }
    }
}

/// `width` (<= 16) pair words from two runs of floats: word `t` = (`lo[t]`, `hi[t]`) for
/// `t < valid`, zero from there on (a missing `hi` is zero too).
///
/// # Safety
/// avx512bf16/f/bw present; `lo .. lo + valid` (and `hi ..` likewise) readable when
/// `valid > 0`; `d .. d + width` writable.
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
#[inline]
pub(super) unsafe fn pack16(
    lo: *const f32,
    hi: Option<*const f32>,
    valid: usize,
    width: usize,
    d: *mut u32,
) {
    let m = lanes(valid);
    // SAFETY: masked loads touch only the `valid` readable lanes; INTERLEAVE is 64 bytes.
    let (lo, hi, idx) = unsafe {
        (
            _mm512_maskz_loadu_ps(m, lo),
            hi.map_or(_mm512_setzero_ps(), |h| _mm512_maskz_loadu_ps(m, h)),
            _mm512_loadu_si512(INTERLEAVE.as_ptr() as *const _),
        )
    };
    // SAFETY: __m512bh and __m512i are both 64 plain bytes.
    let bf: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo)) };
    let words = _mm512_permutexvar_epi16(idx, bf);
    // SAFETY: `width` writable words (caller); the masked store touches only those.
    unsafe { _mm512_mask_storeu_epi32(d as *mut _, lanes(width), words) };
}

/// One panel whose depth is contiguous: element `(i, p)` at `src + i·rs + p`, `r <= R`
/// valid rows.
///
/// # Safety
/// As for [`pack_rows_contiguous`].
#[target_feature(enable = "avx512bf16,avx512f,avx512bw")]
pub(super) unsafe fn pack_depth_contiguous<const R: usize>(
    src: *const f32,
    rs: usize,
    r: usize,
    depth: usize,
    d: &mut [u32],
) {
    let kp = depth.div_ceil(2);
    debug_assert!(r <= R && d.len() >= R * kp);
    // Pair q of row i is the 8 bytes at row i, element 2q: gather them for 8 rows at a time
    // (lane t of the result holds row t's two floats, low one first), and one conversion of
    // two gathers gives the 16 pair words of 16 rows in order.
    let rows8 = |from: usize| -> __m512i {
        _mm512_setr_epi64(
            (from * rs) as i64,
            ((from + 1) * rs) as i64,
            ((from + 2) * rs) as i64,
            ((from + 3) * rs) as i64,
            ((from + 4) * rs) as i64,
            ((from + 5) * rs) as i64,
            ((from + 6) * rs) as i64,
            ((from + 7) * rs) as i64,
        )
    };
    // An odd depth's last pair has one float: done element by element below.
    let full = depth / 2;
    for i0 in (0..R).step_by(16) {
        let width = (R - i0).min(16);
        let valid = r.saturating_sub(i0).min(width);
        let (m_lo, m_hi) = (
            (lanes(valid.min(8)) & 0xff) as u8,
            (lanes(valid.saturating_sub(8)) & 0xff) as u8,
        );
        let (idx_lo, idx_hi) = (rows8(i0), rows8(i0 + 8));
        for q in 0..full {
            // SAFETY: rows i0 .. i0 + valid are readable at elements 2q, 2q + 1 < depth
            // (masked-off lanes are not accessed); offsets are in floats (scale 4).
            let bf = unsafe {
                let base = src.add(2 * q) as *const i64;
                let lo =
                    _mm512_mask_i64gather_epi64::<4>(_mm512_setzero_si512(), m_lo, idx_lo, base);
                let hi =
                    _mm512_mask_i64gather_epi64::<4>(_mm512_setzero_si512(), m_hi, idx_hi, base);
                _mm512_cvtne2ps_pbh(_mm512_castsi512_ps(hi), _mm512_castsi512_ps(lo))
            };
            // SAFETY: words q·R + i0 .. + width are inside `d`; the vector types are bytes.
            unsafe {
                _mm512_mask_storeu_epi32(
                    d.as_mut_ptr().add(q * R + i0) as *mut _,
                    lanes(width),
                    std::mem::transmute::<__m512bh, __m512i>(bf),
                )
            };
        }
        if full < kp {
            for i in i0..i0 + width {
                d[full * R + i] = if i < r {
                    // SAFETY: element depth - 1 of row i < r is readable.
                    crate::bf16::f32_to_bf16(unsafe { *src.add(i * rs + 2 * full) }) as u32
                } else {
                    0
                };
            }
        }
    }
}

/// `C[14×32] = alpha · Apanel · Bpanel + beta · C` over `kp` pair steps: per step two B
/// vectors (16 pair words each), 14 broadcast A words, 28 `VDPBF16PS`.
///
/// # Safety
/// avx512bf16 + avx512f present; `a` holds `kp·14` and `b` `kp·32` words; `c` is a 14×32
/// row-major tile with row stride `rsc`.
#[target_feature(enable = "avx512bf16,avx512f")]
#[allow(clippy::needless_range_loop)]
pub(super) unsafe fn kernel_bf16_14x32(
    kp: usize,
    a: *const u32,
    b: *const u32,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    beta: f32,
) {
    const NV: usize = NR / 16;
    for i in 0..MR {
        // SAFETY: prefetching is a hint; the addresses are inside the C tile.
        unsafe {
            let row = c.add(i * rsc) as *const i8;
            _mm_prefetch::<_MM_HINT_T0>(row);
            _mm_prefetch::<_MM_HINT_T0>(row.add(NR * 4 - 4));
        }
    }
    let mut acc = [[_mm512_setzero_ps(); NV]; MR];
    for q in 0..kp {
        let mut bv = [_mm512_setzero_si512(); NV];
        for j in 0..NV {
            // SAFETY: pair step q of the B panel: words q·NR .. q·NR + NR.
            bv[j] = unsafe { _mm512_loadu_si512(b.add(q * NR + j * 16) as *const _) };
        }
        for i in 0..MR {
            // SAFETY: word (q, i) of the A panel.
            let av = _mm512_set1_epi32(unsafe { *a.add(q * MR + i) } as i32);
            for j in 0..NV {
                // SAFETY: __m512i and __m512bh are both 64 plain bytes.
                let (x, y): (__m512bh, __m512bh) = unsafe {
                    (
                        std::mem::transmute::<__m512i, __m512bh>(av),
                        std::mem::transmute::<__m512i, __m512bh>(bv[j]),
                    )
                };
                acc[i][j] = _mm512_dpbf16_ps(acc[i][j], x, y);
            }
        }
    }
    let alpha_v = _mm512_set1_ps(alpha);
    let beta_v = _mm512_set1_ps(beta);
    for i in 0..MR {
        for j in 0..NV {
            // SAFETY: (i, 16·j ..) lies in the caller's 14 × 32 tile.
            unsafe {
                let p = c.add(i * rsc + j * 16);
                let v = if beta == 0.0 {
                    // C is never read: NaN or garbage on entry does not leak in.
                    _mm512_mul_ps(alpha_v, acc[i][j])
                } else {
                    _mm512_fmadd_ps(
                        alpha_v,
                        acc[i][j],
                        _mm512_mul_ps(beta_v, _mm512_loadu_ps(p)),
                    )
                };
                _mm512_storeu_ps(p, v);
            }
        }
    }
}
