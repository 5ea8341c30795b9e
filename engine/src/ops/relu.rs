//! relu, elementwise. Plain loops over chunks (LLVM vectorizes them), chunks run in parallel
//! for large tensors.
use super::{par_chunks_mut, units_per_task};
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
