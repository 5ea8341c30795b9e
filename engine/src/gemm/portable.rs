//! Portable microkernel in plain Rust: an `MR × NR` tile of scalar accumulators laid out so
//! the compiler can keep them in (baseline SSE2) vector registers. Used as a 4×8 tile on
//! CPUs without AVX2, and (in unit tests) with the AVX-512 tile shape to exercise that
//! kernel's blocking on machines that cannot run AVX-512.

/// Same contract as the SIMD microkernels (see `x86.rs`).
///
/// # Safety
/// Element `(i, p)` of the A panel must be readable at `a + i * rsa + p * csa`, row `p`
/// of the B panel (NR floats) at `b + p * rsb`, and `c` must point to an `MR × NR`
/// row-major tile with row stride `rsc`.
#[allow(clippy::too_many_arguments)]
#[inline]
pub(crate) unsafe fn kernel_portable_strided<const MR: usize, const NR: usize>(
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
    let mut acc = [[0.0f32; NR]; MR];
    for p in 0..kc {
        // SAFETY: row p of the B panel, readable by the contract above.
        let bv = unsafe { &*(b.add(p * rsb) as *const [f32; NR]) };
        for (i, row) in acc.iter_mut().enumerate() {
            // SAFETY: (i, p) of the A panel, readable by the contract above.
            let ai = unsafe { *a.add(i * rsa + p * csa) };
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

/// [`kernel_portable_strided`] on packed panels (`rsa = 1, csa = MR, rsb = NR`).
///
/// # Safety
/// As for the strided kernel.
pub(crate) unsafe fn kernel_portable<const MR: usize, const NR: usize>(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    rsc: usize,
    alpha: f32,
    beta: f32,
) {
    // SAFETY: forwarded contract.
    unsafe { kernel_portable_strided::<MR, NR>(kc, a, 1, MR, b, NR, c, rsc, alpha, beta) }
}
