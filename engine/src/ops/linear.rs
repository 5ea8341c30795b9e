//! linear: `y[n, o] = b[o] + Σ_i x[n, i] · w[o, i]` (PyTorch's `[out, in]` weight).
//! Everything is one GEMM each way; transposes are free strided views.
use crate::autograd::{Param, ParamGrads, Tape, TapeNode, ValueId};
use crate::gemm::MatRef;
use crate::tensor::numel;
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

struct LinearNode {
    n: usize,
    d_in: usize,
    d_out: usize,
    x: usize,
    y: usize,
    w: usize,
    b: Option<usize>,
}

impl<T: Float> TapeNode<T> for LinearNode {
    fn op(&self) -> &'static str {
        "linear"
    }
    fn output(&self) -> usize {
        self.y
    }
    fn backward(&self, tape: &mut Tape<T>, grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>) {
        let (n, d_in, d_out, x, w, b) = (self.n, self.d_in, self.d_out, self.x, self.w, self.b);
        let mut dw = tape.pools.floats.take(d_out * d_in);
        let mut db = tape.pools.floats.take(d_out);
        let mut dx = tape
            .requires_grad(x)
            .then(|| tape.pools.floats.take(n * d_in));
        linear_backward(
            n,
            d_in,
            d_out,
            tape.value(x),
            &grads.params[w].value,
            dy,
            dx.as_deref_mut(),
            &mut dw,
            b.map(|_| &mut db[..]),
        );
        tape.write_param_grads(grads, w, b, |_, gw, gb| {
            gw.copy_from_slice(&dw);
            if let Some(gb) = gb {
                gb.copy_from_slice(&db);
            }
        });
        tape.pools.floats.give(dw);
        tape.pools.floats.give(db);
        tape.unsave(x);
        if let Some(dx) = dx {
            tape.deliver_grad(x, dx);
        }
    }
}

impl<T: Float> Tape<T> {
    /// Fully connected layer; `x: [N, ...]` is flattened to `[N, d_in]` (PyTorch's
    /// `view(N, -1)`), `w: [d_out, d_in]`.
    pub fn linear(
        &mut self,
        params: &[Param<T>],
        x: ValueId,
        w: usize,
        b: Option<usize>,
    ) -> ValueId {
        let xs = self.shape(&x);
        let n = xs[0];
        let d_in = numel(&xs[1..]);
        let ws = &params[w].shape;
        assert!(
            ws.len() == 2 && ws[1] == d_in,
            "linear: x {xs:?} vs w {ws:?}"
        );
        let d_out = ws[0];
        let y = self.new_output(vec![n, d_out], |t, yd| {
            let bias = b.map(|b| &params[b].value[..]);
            linear_forward(n, d_in, d_out, t.value(x.0), &params[w].value, bias, yd)
        });
        let record = self.record();
        let x = self.consume_input(x, record);
        if record {
            self.note_param_use(w);
            if let Some(b) = b {
                self.note_param_use(b);
            }
            self.push_node(Box::new(LinearNode {
                n,
                d_in,
                d_out,
                x,
                y,
                w,
                b,
            }));
        }
        self.maybe_free_data(x);
        ValueId(y)
    }
}
