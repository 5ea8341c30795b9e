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
