//! relu, elementwise. Plain loops over chunks (LLVM vectorizes them), chunks run in parallel
//! for large tensors.
use super::{par_chunks_mut, units_per_task};
use crate::autograd::{ParamGrads, Tape, TapeNode, ValueId};
use crate::Float;

/// Elements per parallel task at least: below this the loop is faster than a task hand-off.
const MIN_TASK_ELEMS: usize = 1 << 15;

/// `y = max(x, 0)`.
pub fn relu_forward<T: Float>(x: &[T], y: &mut [T]) {
    assert_eq!(x.len(), y.len(), "relu_forward: x and y lengths differ");
    let chunk = units_per_task(x.len(), 1, MIN_TASK_ELEMS);
    par_chunks_mut(y, chunk, |i, y| {
        let x = &x[i * chunk..i * chunk + y.len()];
        for (yi, &xi) in y.iter_mut().zip(x) {
            // `if` rather than `max` so a NaN input stays NaN (as torch.relu), not 0.
            *yi = if xi < T::zero() { T::zero() } else { xi };
        }
    });
}

/// `dx = dy · [y > 0]` (uses the forward *output*, so the input can be freed).
/// PyTorch's convention: the gradient at exactly 0 is 0.
pub fn relu_backward<T: Float>(y: &[T], dy: &[T], dx: &mut [T]) {
    assert_eq!(y.len(), dy.len(), "relu_backward: y and dy lengths differ");
    assert_eq!(y.len(), dx.len(), "relu_backward: y and dx lengths differ");
    let chunk = units_per_task(y.len(), 1, MIN_TASK_ELEMS);
    par_chunks_mut(dx, chunk, |i, dx| {
        let range = i * chunk..i * chunk + dx.len();
        for ((dxi, &yi), &dyi) in dx.iter_mut().zip(&y[range.clone()]).zip(&dy[range]) {
            *dxi = if yi > T::zero() { dyi } else { T::zero() };
        }
    });
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
                let yd = tape.value(y);
                // A select, not a branch: signs are random and mispredicts cost ~10 ns per
                // element.
                for (g, &yv) in dy.iter_mut().zip(yd) {
                    *g = if yv > T::zero() { *g } else { T::zero() };
                }
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
