//! linear: `y[n, o] = b[o] + Σ_i x[n, i] · w[o, i]` (PyTorch's `[out, in]` weight).
//! Everything is one GEMM each way; transposes are free strided views.
use crate::gemm::MatRef;
use crate::Float;

#[allow(clippy::too_many_arguments)]
pub fn linear_forward<T: Float>(
    n: usize,
    d_in: usize,
    d_out: usize,
    x: &[T],
    w: &[T],
    b: Option<&[T]>,
    y: &mut [T],
) {
    assert_eq!(x.len(), n * d_in, "linear_forward: x length");
    assert_eq!(w.len(), d_out * d_in, "linear_forward: w length");
    assert_eq!(y.len(), n * d_out, "linear_forward: y length");
    // Seed y with the bias so the GEMM accumulates onto it (beta = 1).
    let beta = match b {
        Some(b) => {
            assert_eq!(b.len(), d_out, "linear_forward: b length");
            for row in y.chunks_mut(d_out) {
                row.copy_from_slice(b);
            }
            T::one()
        }
        None => T::zero(),
    };
    // y[n × out] = x[n × in] · wᵀ[in × out]
    T::gemm(
        n,
        d_out,
        d_in,
        T::one(),
        MatRef::row_major(x, d_in),
        MatRef::col_major(w, d_in),
        beta,
        y,
        d_out,
    );
}

/// Overwrites `dx` (if given), `dw`, `db` (if given).
#[allow(clippy::too_many_arguments)]
pub fn linear_backward<T: Float>(
    n: usize,
    d_in: usize,
    d_out: usize,
    x: &[T],
    w: &[T],
    dy: &[T],
    dx: Option<&mut [T]>,
    dw: &mut [T],
    db: Option<&mut [T]>,
) {
    assert_eq!(x.len(), n * d_in, "linear_backward: x length");
    assert_eq!(w.len(), d_out * d_in, "linear_backward: w length");
    assert_eq!(dy.len(), n * d_out, "linear_backward: dy length");
    assert_eq!(dw.len(), d_out * d_in, "linear_backward: dw length");
    if let Some(dx) = dx {
        assert_eq!(dx.len(), n * d_in, "linear_backward: dx length");
        // dx[n × in] = dy[n × out] · w[out × in]
        T::gemm(
            n,
            d_in,
            d_out,
            T::one(),
            MatRef::row_major(dy, d_out),
            MatRef::row_major(w, d_in),
            T::zero(),
            dx,
            d_in,
        );
    }
    // dw[out × in] = dyᵀ[out × n] · x[n × in]
    T::gemm(
        d_out,
        d_in,
        n,
        T::one(),
        MatRef::col_major(dy, d_out),
        MatRef::row_major(x, d_in),
        T::zero(),
        dw,
        d_in,
    );
    if let Some(db) = db {
        assert_eq!(db.len(), d_out, "linear_backward: db length");
        // Column sums of dy, accumulated in f64 (n is small; precision is free here).
        let mut acc = vec![0f64; d_out];
        for row in dy.chunks(d_out) {
            for (a, &v) in acc.iter_mut().zip(row) {
                *a += v.to_f64_lossy();
            }
        }
        for (d, a) in db.iter_mut().zip(acc) {
            *d = T::from_f64_lossy(a);
        }
    }
}
