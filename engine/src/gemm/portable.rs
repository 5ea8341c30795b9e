//! Portable microkernel in plain Rust: a 4×8 tile of scalar accumulators laid out so the
//! compiler can keep them in (baseline SSE2) vector registers.

pub(crate) const MR: usize = 4;
pub(crate) const NR: usize = 8;

/// Same contract as the SIMD microkernels (see `x86.rs`).
///
/// # Safety
/// `a` must point to `kc * MR` floats, `b` to `kc * NR` floats, and `c` to an `MR × NR`
/// row-major tile with row stride `rsc`.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn kernel_portable_4x8(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    beta: f32,
) {
    // SAFETY: sizes as documented above.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a, kc * MR),
            std::slice::from_raw_parts(b, kc * NR),
        )
    };
    let mut acc = [[0.0f32; NR]; MR];
    for (av, bv) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for (row, &ai) in acc.iter_mut().zip(av) {
            for (x, &bj) in row.iter_mut().zip(bv) {
                *x += ai * bj;
            }
        }
    }
    for (i, row) in acc.iter().enumerate() {
        // SAFETY: row i of the caller's MR × NR tile.
        let out = unsafe { std::slice::from_raw_parts_mut(c.add(i * rsc), NR) };
        if beta == 0.0 {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = alpha * x;
            }
        } else {
            for (o, &x) in out.iter_mut().zip(row) {
                *o = alpha * x + beta * *o;
            }
        }
    }
}
