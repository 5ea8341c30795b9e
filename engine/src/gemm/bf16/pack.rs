//! Packing with the f32 → bf16 conversion fused in: a `rows × depth` block of a strided f32
//! matrix becomes `R`-row panels of pair words, word `(q, i)` = `(X[i][2q], X[i][2q+1])` at
//! `q·R + i` inside its panel (`⌈depth/2⌉·R` words per panel; rows past the matrix and the
//! missing half of an odd last pair are zero). B is packed as the rows of Bᵀ.
//!
//! Natively (AVX512_BF16) two layouts run vectorized, which covers every operand of the conv
//! and linear passes: rows contiguous (`rs == 1`: two depth steps of 16 rows converted by one
//! `VCVTNE2PS2BF16` and interleaved into 16 words by one `VPERMW`) and depth contiguous
//! (`cs == 1`: 32 depth steps of one row converted into 16 words, then stored `R` apart).
//! Everything else, and the emulated path, converts element by element with
//! [`crate::bf16::f32_to_bf16`], which gives the same bits.

use super::{MatRef, Panels};
use crate::bf16::{f32_to_bf16, pair};

/// Pack `rows × depth` of `x` from `(i0, p0)` into `dst` (resized by the caller to at least
/// `⌈rows/R⌉·R·⌈depth/2⌉` words); `native`: use the AVX512_BF16 conversions (the caller
/// checked the CPU has them).
pub(super) fn pack_pairs<const R: usize>(
    x: MatRef<'_, f32>,
    i0: usize,
    p0: usize,
    rows: usize,
    depth: usize,
    dst: &mut [u32],
    native: bool,
) {
    if rows == 0 || depth == 0 {
        return;
    }
    let kp = depth.div_ceil(2);
    let panels = rows.div_ceil(R);
    assert!(
        dst.len() >= panels * R * kp,
        "bf16 packing buffer too small"
    );
    let base = i0 * x.rs + p0 * x.cs;
    let last = base + (rows - 1) * x.rs + (depth - 1) * x.cs;
    assert!(last < x.data.len(), "bf16 GEMM operand view out of bounds");
    for panel in 0..panels {
        let r = (rows - panel * R).min(R);
        let s = base + panel * R * x.rs;
        let d = &mut dst[panel * R * kp..(panel + 1) * R * kp];
        #[cfg(target_arch = "x86_64")]
        if native && (x.rs == 1 || x.cs == 1) {
            // SAFETY: the caller checked avx512bf16; the panel's r rows × depth elements
            // from `s` lie inside `x.data` (its last element is at or before `last`), and `d`
            // holds R·kp words.
            unsafe {
                if x.rs == 1 {
                    super::x86::pack_rows_contiguous::<R>(x.data.as_ptr().add(s), x.cs, r, depth, d)
                } else {
                    super::x86::pack_depth_contiguous::<R>(
                        x.data.as_ptr().add(s),
                        x.rs,
                        r,
                        depth,
                        d,
                    )
                }
            }
            continue;
        }
        let _ = native;
        pack_scalar::<R>(x.data, s, x.rs, x.cs, r, depth, d);
    }
}

/// One panel, element by element.
fn pack_scalar<const R: usize>(
    src: &[f32],
    s: usize,
    rs: usize,
    cs: usize,
    r: usize,
    depth: usize,
    d: &mut [u32],
) {
    let at = |i: usize, p: usize| {
        if i < r && p < depth {
            f32_to_bf16(src[s + i * rs + p * cs])
        } else {
            0
        }
    };
    for q in 0..depth.div_ceil(2) {
        for i in 0..R {
            d[q * R + i] = pair(at(i, 2 * q), at(i, 2 * q + 1));
        }
    }
}

/// Pack columns `j0 .. j0 + cols`, depths `p0 .. p0 + depth` of a B held in the f32 SGEMM's
/// panel layout `pv` into `R`-column pair panels (as [`pack_pairs`] does for Bᵀ). Natively,
/// when each run of 16 columns lies inside one f32 panel (its columns are then contiguous
/// for each depth), 16 words at a time; else element by element. Columns past `cols` (the
/// f32 panels' padding included) are packed as zero.
#[allow(clippy::too_many_arguments)]
pub(super) fn pack_pairs_from_panels<const R: usize>(
    b: &[f32],
    pv: Panels,
    j0: usize,
    p0: usize,
    cols: usize,
    depth: usize,
    dst: &mut [u32],
    native: bool,
) {
    if cols == 0 || depth == 0 {
        return;
    }
    let kp = depth.div_ceil(2);
    let panels = cols.div_ceil(R);
    assert!(
        dst.len() >= panels * R * kp,
        "bf16 packing buffer too small"
    );
    assert!(b.len() >= pv.len(), "packed B too small");
    let contiguous16 =
        j0.is_multiple_of(16) && pv.panel_rows().is_multiple_of(16) && R.is_multiple_of(16);
    for panel in 0..panels {
        let jp = j0 + panel * R;
        let r = (cols - panel * R).min(R);
        let d = &mut dst[panel * R * kp..(panel + 1) * R * kp];
        #[cfg(target_arch = "x86_64")]
        if native && contiguous16 {
            for q in 0..kp {
                let p = p0 + 2 * q;
                for i0 in (0..R).step_by(16) {
                    let valid = r.saturating_sub(i0).min(16);
                    let at = |p: usize| if valid > 0 { pv.index(jp + i0, p) } else { 0 };
                    let (lo, hi) = (at(p), (2 * q + 1 < depth).then(|| at(p + 1)));
                    // SAFETY: the caller checked avx512bf16; `valid` columns from jp + i0 lie
                    // in one f32 panel (16-aligned runs of a 16-multiple panel width), so
                    // they are contiguous at each depth's index, inside `b` (its length was
                    // asserted); words q·R + i0 .. + 16 are inside `d`.
                    unsafe {
                        super::x86::pack16(
                            b.as_ptr().wrapping_add(lo),
                            hi.map(|h| b.as_ptr().wrapping_add(h)),
                            valid,
                            16,
                            d.as_mut_ptr().add(q * R + i0),
                        )
                    }
                }
            }
            continue;
        }
        let _ = (native, contiguous16);
        let at = |i: usize, p: usize| {
            if i < r && p < depth {
                f32_to_bf16(b[pv.index(jp + i, p0 + p)])
            } else {
                0
            }
        };
        for q in 0..kp {
            for i in 0..R {
                d[q * R + i] = pair(at(i, 2 * q), at(i, 2 * q + 1));
            }
        }
    }
}
