//! Packing: copy a block of a strided matrix into the contiguous micro-panel layout the
//! microkernels stream through, zero-padding the ragged last panel.
//!
//! Both operands use one routine. A block of `A` (rows × depth) becomes `MR`-row panels
//! where element `(i, p)` of a panel sits at `p * MR + i`; a block of `B` (depth × cols)
//! becomes `NR`-column panels with `(p, j)` at `p * NR + j`, which is the same layout as
//! packing `Bᵀ` into `NR`-row panels. So `pack_b` is `pack_a` on the transposed view.

use super::MatRef;

/// A `Vec` of 64-byte aligned storage handed out as `f32` slices (packing buffers).
#[derive(Default)]
pub(crate) struct AlignedBuf {
    blocks: Vec<Block64>,
}

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Block64([f32; 16]);

impl AlignedBuf {
    /// A 64-byte aligned slice of at least `len` floats (contents unspecified).
    pub(crate) fn get(&mut self, len: usize) -> &mut [f32] {
        let blocks = len.div_ceil(16);
        if self.blocks.len() < blocks {
            self.blocks.resize(blocks, Block64([0.0; 16]));
        }
        // SAFETY: `Block64` is `repr(C)` and exactly 16 contiguous f32 with no padding, so
        // `blocks` Block64 values are `16 * blocks >= len` valid, initialized f32.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr() as *mut f32, len) }
    }
}

/// Pack `rows × depth` of `A` starting at `(i0, p0)` into `MR`-row panels in `dst`
/// (`rows.div_ceil(MR) * MR * depth` floats).
///
/// The caller guarantees the whole block lies inside `a.data` (checked once per GEMM in
/// `check_view`); this function re-checks only the first and last element cheaply.
pub(crate) fn pack_a<const MR: usize>(
    a: MatRef<'_, f32>,
    i0: usize,
    p0: usize,
    rows: usize,
    depth: usize,
    dst: &mut [f32],
) {
    pack_panels::<MR>(a.data, i0 * a.rs + p0 * a.cs, a.rs, a.cs, rows, depth, dst)
}

/// Pack `depth × cols` of `B` starting at `(p0, j0)` into `NR`-column panels in `dst`.
pub(crate) fn pack_b<const NR: usize>(
    b: MatRef<'_, f32>,
    p0: usize,
    j0: usize,
    depth: usize,
    cols: usize,
    dst: &mut [f32],
) {
    // (p, j) of B is (j, p) of Bᵀ, whose strides are (cs, rs).
    pack_panels::<NR>(b.data, p0 * b.rs + j0 * b.cs, b.cs, b.rs, cols, depth, dst)
}

/// Element `(i, p)` of the source block is `src[base + i * rs + p * cs]`; it goes to
/// panel `i / R`, slot `p * R + i % R`.
fn pack_panels<const R: usize>(
    src: &[f32],
    base: usize,
    rs: usize,
    cs: usize,
    rows: usize,
    depth: usize,
    dst: &mut [f32],
) {
    if rows == 0 || depth == 0 {
        return;
    }
    let panels = rows.div_ceil(R);
    assert!(dst.len() >= panels * R * depth, "packing buffer too small");
    let last = base + (rows - 1) * rs + (depth - 1) * cs;
    assert!(last < src.len(), "GEMM operand view out of bounds");
    for panel in 0..panels {
        let r = (rows - panel * R).min(R);
        let s = base + panel * R * rs;
        let d = &mut dst[panel * R * depth..(panel + 1) * R * depth];
        // Specialize the two common layouts so the compiler sees unit strides.
        #[cfg(target_arch = "x86_64")]
        if R == 16 && r == R && cs == 1 && depth >= 8 && avx2_available() {
            // SAFETY: AVX2 is available; the full panel (16 rows from `s`, `depth`
            // contiguous floats each) is inside `src` (last element checked above), and
            // `d` holds 16 * depth floats.
            unsafe { pack16_contiguous_rows_avx2(src.as_ptr().add(s), rs, depth, d.as_mut_ptr()) };
            continue;
        }
        if r == R && cs == 1 {
            pack_full::<R>(src, s, rs, 1, depth, d)
        } else if r == R && rs == 1 {
            pack_full::<R>(src, s, 1, cs, depth, d)
        } else if r == R {
            pack_full::<R>(src, s, rs, cs, depth, d)
        } else {
            pack_partial::<R>(src, s, rs, cs, r, depth, d)
        }
    }
}

#[inline(always)]
fn pack_full<const R: usize>(
    src: &[f32],
    s: usize,
    rs: usize,
    cs: usize,
    depth: usize,
    d: &mut [f32],
) {
    debug_assert!(d.len() >= R * depth);
    debug_assert!(s + (R - 1) * rs + (depth - 1) * cs < src.len());
    for p in 0..depth {
        for i in 0..R {
            // SAFETY: `pack_panels` asserted that the last element of the block,
            // `base + (rows-1)*rs + (depth-1)*cs`, is in bounds, and every (i, p) of a
            // full panel is at or before it in both coordinates; `d` holds R*depth floats.
            unsafe {
                *d.get_unchecked_mut(p * R + i) = *src.get_unchecked(s + i * rs + p * cs);
            }
        }
    }
}

fn pack_partial<const R: usize>(
    src: &[f32],
    s: usize,
    rs: usize,
    cs: usize,
    r: usize,
    depth: usize,
    d: &mut [f32],
) {
    for p in 0..depth {
        let col = &mut d[p * R..(p + 1) * R];
        for (i, v) in col.iter_mut().enumerate() {
            *v = if i < r { src[s + i * rs + p * cs] } else { 0.0 };
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_available() -> bool {
    crate::simd::level() >= crate::simd::SimdLevel::Avx2
}

/// Pack a full 16-row panel whose rows are contiguous (`cs == 1`, e.g. a B operand given
/// as a transposed row-major matrix) with 8×8 register transposes instead of 16 scalar
/// strided reads per depth step.
///
/// # Safety
/// AVX2 must be available; rows `0..16` at `src + i * rs`, each `depth` floats long, must
/// be readable and `d` must be writable for `16 * depth` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack16_contiguous_rows_avx2(src: *const f32, rs: usize, depth: usize, d: *mut f32) {
    use std::arch::x86_64::*;
    let full = depth / 8 * 8;
    for p0 in (0..full).step_by(8) {
        for g in 0..2 {
            // SAFETY: rows g*8..g*8+8, floats p0..p0+8 are inside the panel.
            let r: [__m256; 8] =
                std::array::from_fn(|i| unsafe { _mm256_loadu_ps(src.add((g * 8 + i) * rs + p0)) });
            let t0 = _mm256_unpacklo_ps(r[0], r[1]);
            let t1 = _mm256_unpackhi_ps(r[0], r[1]);
            let t2 = _mm256_unpacklo_ps(r[2], r[3]);
            let t3 = _mm256_unpackhi_ps(r[2], r[3]);
            let t4 = _mm256_unpacklo_ps(r[4], r[5]);
            let t5 = _mm256_unpackhi_ps(r[4], r[5]);
            let t6 = _mm256_unpacklo_ps(r[6], r[7]);
            let t7 = _mm256_unpackhi_ps(r[6], r[7]);
            let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
            let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
            let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
            let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
            let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
            let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
            let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
            let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
            // Column q holds element p0 + q of the 8 rows.
            let cols = [
                _mm256_permute2f128_ps::<0x20>(u0, u4),
                _mm256_permute2f128_ps::<0x20>(u1, u5),
                _mm256_permute2f128_ps::<0x20>(u2, u6),
                _mm256_permute2f128_ps::<0x20>(u3, u7),
                _mm256_permute2f128_ps::<0x31>(u0, u4),
                _mm256_permute2f128_ps::<0x31>(u1, u5),
                _mm256_permute2f128_ps::<0x31>(u2, u6),
                _mm256_permute2f128_ps::<0x31>(u3, u7),
            ];
            for (q, col) in cols.into_iter().enumerate() {
                // SAFETY: slot (p0 + q) * 16 + g * 8 .. + 8 is inside `d`.
                unsafe { _mm256_storeu_ps(d.add((p0 + q) * 16 + g * 8), col) };
            }
        }
    }
    for p in full..depth {
        for i in 0..16 {
            // SAFETY: (i, p) is inside the panel and slot p * 16 + i inside `d`.
            unsafe { *d.add(p * 16 + i) = *src.add(i * rs + p) };
        }
    }
}
