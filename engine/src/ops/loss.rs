//! Log-softmax cross-entropy, mean over the batch (`torch.nn.functional.cross_entropy`).
use crate::Float;

/// Returns the mean loss; writes softmax probabilities into `probs` (`[n, classes]`) for
/// backward. Labels must be `< classes` (callers validate user data before this).
pub fn cross_entropy_forward<T: Float>(
    _n: usize,
    _classes: usize,
    _logits: &[T],
    _labels: &[u32],
    _probs: &mut [T],
) -> T {
    todo!("ops helper")
}

/// `dlogits = dloss · (probs - onehot(labels)) / n` (overwrites `dlogits`).
pub fn cross_entropy_backward<T: Float>(
    _n: usize,
    _classes: usize,
    _probs: &[T],
    _labels: &[u32],
    _dloss: T,
    _dlogits: &mut [T],
) {
    todo!("ops helper")
}
