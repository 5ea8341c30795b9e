//! GEMM on operands that are already in the microkernel's panel layout.
//!
//! Producers that write their output anyway (the Winograd transforms) can write B straight
//! into the panels the microkernel streams through, and A as any strided matrix (the
//! microkernel broadcasts A's elements from wherever they are), so the GEMM runs no packing
//! pass. For the many small GEMMs of a Winograd convolution (e.g. 36 of 128×128×512 per
//! layer and chunk) re-packing both operands per call cost ~30 % of the multiply time.
//!
//! Layout of B ([`Panels`]): the `k × n` operand, described by its `n` columns as "rows", is
//! cut into depth blocks of `KC` (the last may be shorter), each holding `⌈n/NR⌉` panels of
//! `NR` columns; inside a panel, element `(p, j)` sits at `p·NR + j % NR`. That is the
//! layout `pack.rs` produces for one `KC` block, repeated per block. The padding columns of
//! a ragged last panel are read by the microkernel; their results fall outside C and are
//! dropped.
use super::{
    check_c, check_view, macro_kernel, scale_c, Block, CMat, Kernel, MatRef, MicroKernel, TileAvx2,
    TileAvx512, TilePortable,
};
use crate::Float;

/// Panel shape and depth blocking of one microkernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedLayout {
    pub mr: usize,
    pub nr: usize,
    pub kc: usize,
}

impl PackedLayout {
    /// The layout `kernel`'s main tile reads (what [`sgemm_packed_b`] expects for it).
    pub fn of(kernel: Kernel) -> PackedLayout {
        match kernel {
            Kernel::Avx512 => PackedLayout::from_tile::<TileAvx512>(),
            Kernel::Avx2Fma => PackedLayout::from_tile::<TileAvx2>(),
            Kernel::Portable => PackedLayout::from_tile::<TilePortable>(),
        }
    }
    fn from_tile<K: MicroKernel>() -> PackedLayout {
        PackedLayout {
            mr: K::MR,
            nr: K::NR,
            kc: K::KC,
        }
    }
}

/// Where each element of a packed operand lives (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Panels {
    r: usize,
    kc: usize,
    rows_padded: usize,
    k: usize,
}

impl Panels {
    /// The `k × n` B operand.
    pub fn b(layout: PackedLayout, n: usize, k: usize) -> Panels {
        Panels::new(layout.nr, layout.kc, n, k)
    }
    fn new(r: usize, kc: usize, rows: usize, k: usize) -> Panels {
        assert!(r >= 1 && kc >= 1, "panel shape {r}, depth block {kc}");
        Panels {
            r,
            kc,
            rows_padded: rows.div_ceil(r) * r,
            k,
        }
    }
    /// Floats of the packed operand.
    pub fn len(&self) -> usize {
        self.rows_padded * self.k
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Rows (B columns) per panel: `NR`.
    pub fn panel_rows(&self) -> usize {
        self.r
    }
    /// Offset of element (row `i`, depth `p`). Consecutive rows of one panel are adjacent;
    /// consecutive depths of one depth block are `panel_rows()` apart.
    #[inline(always)]
    pub fn index(&self, i: usize, p: usize) -> usize {
        let block = p / self.kc;
        let q = p - block * self.kc;
        let depth = self.kc.min(self.k - block * self.kc);
        block * self.kc * self.rows_padded + (i / self.r) * self.r * depth + q * self.r + i % self.r
    }
}

/// `C[m×n] = A·B + beta·C` (row-major C, leading dimension `ldc`): A any strided view, read
/// in place by the microkernel (its rows are broadcast, so no packing is needed); B packed
/// in `PackedLayout::of(kernel)` ([`Panels::b`]). Runs on the calling thread.
///
/// Panics if `kernel` is not available here or an operand is too small.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_packed_b(
    kernel: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, f32>,
    b: &[f32],
    beta: f32,
    c: &mut [f32],
    ldc: usize,
) {
    assert!(
        kernel.is_available(),
        "SGEMM kernel {kernel:?} is not supported by this CPU"
    );
    match kernel {
        // SAFETY (all arms): the kernel is available (asserted above).
        Kernel::Avx512 => unsafe { run::<TileAvx512>(m, n, k, a, b, beta, c, ldc) },
        Kernel::Avx2Fma => unsafe { run::<TileAvx2>(m, n, k, a, b, beta, c, ldc) },
        Kernel::Portable => unsafe { run::<TilePortable>(m, n, k, a, b, beta, c, ldc) },
    }
}

/// # Safety
/// `K`'s CPU features are present.
#[allow(clippy::too_many_arguments)]
unsafe fn run<K: MicroKernel>(
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
    check_view("A", &a, m, k);
    let pb = Panels::b(PackedLayout::from_tile::<K>(), n, k);
    assert!(b.len() >= pb.len(), "packed B too small");
    check_c("packed SGEMM", m, n, ldc, c.len());
    if k == 0 {
        scale_c(c, m, n, ldc, beta);
        return;
    }
    let cm = CMat {
        ptr: c.as_mut_ptr(),
        rs: ldc,
        cs: 1,
    };
    // A ragged last row panel of A is packed here, since the kernel reads whole panels.
    let mut ragged_panel = [0f32; MAX_TILE_ROWS * MAX_KC];
    debug_assert!(K::MR <= MAX_TILE_ROWS && K::KC <= MAX_KC && K::MC % K::MR == 0);
    let ragged = m % K::MR;
    for p0 in (0..k).step_by(K::KC) {
        let depth = K::KC.min(k - p0);
        if ragged != 0 {
            K::pack_a(a, m - ragged, p0, ragged, depth, &mut ragged_panel);
        }
        let beta_block = if p0 == 0 { beta } else { 1.0 };
        // Row blocks of MC, as in `gemm_serial`: the block's A rows (MC × KC) stay in L2
        // while every B panel of the depth block streams past them.
        for i0 in (0..m).step_by(K::MC) {
            let rows = K::MC.min(m - i0);
            // SAFETY: A was checked for m × k and is read at (i0.., p0..); the depth block's
            // B panels start at `p0·rows_padded` and hold `⌈n/NR⌉` panels of `depth` steps
            // (asserted length); (i0, 0) is inside the checked m × n row-major C, which is
            // borrowed mutably for the call.
            unsafe {
                macro_kernel::<K>(
                    rows,
                    n,
                    depth,
                    1.0,
                    beta_block,
                    Block::Direct {
                        m: a,
                        r0: i0,
                        c0: p0,
                    },
                    &ragged_panel,
                    Block::Packed,
                    &b[p0 * pb.rows_padded..],
                    cm.at(i0, 0),
                )
            };
        }
    }
}

/// Tallest A panel (MR) and deepest depth block (KC) of any kernel.
const MAX_TILE_ROWS: usize = 16;
const MAX_KC: usize = 256;

/// The same product by definition, for any [`Float`] and layout (f64 and the tests).
#[allow(clippy::too_many_arguments)]
pub fn gemm_packed_b_reference<T: Float>(
    layout: PackedLayout,
    m: usize,
    n: usize,
    k: usize,
    a: MatRef<'_, T>,
    b: &[T],
    beta: T,
    c: &mut [T],
    ldc: usize,
) {
    let pb = Panels::b(layout, n, k);
    assert!(b.len() >= pb.len(), "packed B too small");
    for i in 0..m {
        for j in 0..n {
            let mut acc = T::zero();
            for p in 0..k {
                acc += a.data[i * a.rs + p * a.cs] * b[pb.index(j, p)];
            }
            let cij = &mut c[i * ldc + j];
            *cij = if beta == T::zero() {
                acc
            } else {
                acc + beta * *cij
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pack row-major `B` (k×n) by [`Panels::index`], run every available kernel with A
    /// read in place (row-major and transposed), compare with the naive product.
    #[test]
    fn packed_gemm_matches_reference_for_every_kernel() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for &(m, n, k) in &[
            (1, 1, 1),
            (6, 16, 256),
            (7, 17, 257),
            (130, 33, 600),
            (29, 70, 5),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            let c0: Vec<f32> = (0..m * n).map(|_| next()).collect();
            for kernel in Kernel::ALL.into_iter().filter(|k| k.is_available()) {
                let layout = PackedLayout::of(kernel);
                let pb = Panels::b(layout, n, k);
                let mut bp = vec![f32::NAN; pb.len()];
                let at: Vec<f32> = (0..k * m).map(|x| a[(x % m) * k + x / m]).collect();
                // Padding columns stay NaN: their results must be dropped.
                for j in 0..n {
                    for p in 0..k {
                        bp[pb.index(j, p)] = b[p * n + j];
                    }
                }
                let views = [MatRef::row_major(&a, k), MatRef::col_major(&at, m)];
                for (beta, av) in [(0.0f32, views[0]), (1.0, views[1])] {
                    let mut c = c0.clone();
                    sgemm_packed_b(kernel, m, n, k, av, &bp, beta, &mut c, n);
                    let mut want: Vec<f64> = c0.iter().map(|&x| x as f64).collect();
                    for i in 0..m {
                        for j in 0..n {
                            let dot: f64 = (0..k)
                                .map(|p| a[i * k + p] as f64 * b[p * n + j] as f64)
                                .sum();
                            want[i * n + j] = dot + beta as f64 * want[i * n + j];
                        }
                    }
                    let err: f64 = c
                        .iter()
                        .zip(&want)
                        .map(|(&x, y)| (x as f64 - y).powi(2))
                        .sum::<f64>()
                        / want.iter().map(|y| y * y).sum::<f64>();
                    assert!(
                        err.sqrt() <= 1e-5,
                        "{kernel:?} {m}x{n}x{k} beta {beta}: {:e}",
                        err.sqrt()
                    );
                }
            }
        }
    }

    #[test]
    fn panel_indices_are_a_permutation() {
        for (r, kc, rows, k) in [(6, 256, 13, 600), (16, 4, 5, 9), (1, 1, 3, 3)] {
            let p = Panels::new(r, kc, rows, k);
            let mut seen = vec![false; p.len()];
            for i in 0..p.rows_padded {
                for d in 0..k {
                    let at = p.index(i, d);
                    assert!(!seen[at], "{r} {kc} {rows} {k}: ({i}, {d}) collides");
                    seen[at] = true;
                }
            }
            assert!(seen.iter().all(|&s| s));
        }
    }
}
