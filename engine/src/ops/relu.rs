//! relu, elementwise.
use crate::Float;

/// `y = max(x, 0)`.
pub fn relu_forward<T: Float>(_x: &[T], _y: &mut [T]) {
    todo!("ops helper")
}

/// `dx = dy · [y > 0]` (uses the forward *output*, so the input can be freed).
pub fn relu_backward<T: Float>(_y: &[T], _dy: &[T], _dx: &mut [T]) {
    todo!("ops helper")
}
