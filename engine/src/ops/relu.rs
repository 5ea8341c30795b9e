//! relu, elementwise: vectorized (the shared `elementwise` loops), parallel for large tensors.
#[cfg(test)]
use super::elementwise::MapKernel;
use super::elementwise::{map2, map2_in_place, LaneOp};
use crate::autograd::{ParamGrads, Tape, TapeNode, ValueId};
use crate::simd::FloatVec;
use crate::Float;

/// `max(a, 0)` (the second operand is ignored). A select rather than `max` so a NaN input
/// stays NaN, as `torch.relu`.
#[derive(Clone, Copy)]
struct ReluOp;
impl LaneOp for ReluOp {
    #[inline(always)]
    fn apply<V: FloatVec>(self, x: V, _: V) -> V {
        V::select(x.lt(V::zero()), V::zero(), x)
    }
}

/// `dy · [y > 0]` with `(y, dy)`.
#[derive(Clone, Copy)]
struct ReluMaskOp;
impl LaneOp for ReluMaskOp {
    #[inline(always)]
    fn apply<V: FloatVec>(self, y: V, dy: V) -> V {
        V::select(y.gt(V::zero()), dy, V::zero())
    }
}

/// `y = max(x, 0)`.
pub fn relu_forward<T: Float>(x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len(), "relu_forward: x and y lengths differ");
    map2(ReluOp, x, x, y);
}

/// `dx = dy · [y > 0]` (uses the forward *output*, so the input can be freed).
/// PyTorch's convention: the gradient at exactly 0 is 0.
pub fn relu_backward<T: Float>(y: &[T], dy: &[T], dx: &mut [T]) {
    assert_eq!(y.len(), dy.len(), "relu_backward: y and dy lengths differ");
    assert_eq!(y.len(), dx.len(), "relu_backward: y and dx lengths differ");
    map2(ReluMaskOp, y, dy, dx);
}

/// [`relu_backward`] in place: `g = g · [y > 0]`.
pub fn relu_backward_in_place<T: Float>(y: &[T], g: &mut [T]) {
    assert_eq!(y.len(), g.len(), "relu_backward_in_place: lengths differ");
    map2_in_place(ReluMaskOp, y, g);
}

struct ReluNode {
    x: usize,
    y: usize,
}

impl<T: Float> TapeNode<T> for ReluNode {
    fn op(&self) -> &'static str {
        "relu"
    }
    fn output(&self) -> usize {
        self.y
    }
    fn backward(&self, tape: &mut Tape<T>, _grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>) {
        let (x, y) = (self.x, self.y);
        if tape.requires_grad(x) {
            if !tape.has_grad(x) {
                // First contribution: mask dy in place and hand it over (saves a full
                // activation-sized buffer at the peak).
                relu_backward_in_place(tape.value(y), dy);
                tape.deliver_grad(x, std::mem::take(dy));
            } else {
                tape.accumulate(x, |t, g| relu_backward(t.value(y), dy, g));
            }
        }
        tape.unsave(y);
    }
}

impl<T: Float> Tape<T> {
    /// `max(x, 0)`; backward uses the output, so the input can be freed.
    pub fn relu(&mut self, x: ValueId) -> ValueId {
        let shape = self.shape(&x).to_vec();
        let y = self.new_output(shape, |t, yd| relu_forward(t.value(x.0), yd));
        let record = self.record();
        let x = self.consume_input(x, false);
        if record {
            self.save(y);
            self.push_node(Box::new(ReluNode { x, y }));
        }
        self.maybe_free_data(x);
        ValueId(y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::random_vec;
    use crate::simd::F32Impl;

    /// Both kernels on every SIMD path against their definitions, odd lengths, signed zeros
    /// and NaN included.
    #[test]
    fn relu_kernels_match_definitions_on_every_path() {
        for imp in F32Impl::runnable() {
            for n in [0usize, 1, 7, 9, 16, 31, 100] {
                let mut x: Vec<f32> = random_vec(n as u64, n, -1.0, 1.0)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                let dy: Vec<f32> = random_vec(n as u64 + 1, n, -1.0, 1.0)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                for (i, special) in [f32::NAN, 0.0, -0.0].into_iter().enumerate() {
                    if i < n {
                        x[i] = special;
                    }
                }
                let mut y = vec![7.0f32; n];
                imp.run(MapKernel {
                    op: ReluOp,
                    a: &x,
                    b: Some(&x),
                    out: &mut y,
                });
                for (yi, xi) in y.iter().zip(&x) {
                    let want = if *xi < 0.0 { 0.0 } else { *xi };
                    assert!(yi.to_bits() == want.to_bits(), "{imp:?} relu({xi}) = {yi}");
                }
                let mut dx = vec![7.0f32; n];
                imp.run(MapKernel {
                    op: ReluMaskOp,
                    a: &x,
                    b: Some(&dy),
                    out: &mut dx,
                });
                let want: Vec<f32> = x
                    .iter()
                    .zip(&dy)
                    .map(|(x, d)| if *x > 0.0 { *d } else { 0.0 })
                    .collect();
                assert_eq!(dx, want, "{imp:?} n={n}");
            }
        }
    }
}
