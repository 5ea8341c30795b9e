//! Log-softmax cross-entropy, mean over the batch (`torch.nn.functional.cross_entropy`).
//! Rows are shifted by their max before `exp` (no overflow); sums run in f64.
use crate::Float;

/// Returns the mean loss; writes softmax probabilities into `probs` (`[n, classes]`) for
/// backward. Labels must be `< classes` (callers validate user data before this).
pub fn cross_entropy_forward<T: Float>(
    n: usize,
    classes: usize,
    logits: &[T],
    labels: &[u32],
    probs: &mut [T],
) -> T {
    assert_eq!(
        logits.len(),
        n * classes,
        "cross_entropy_forward: logits length"
    );
    assert_eq!(
        probs.len(),
        n * classes,
        "cross_entropy_forward: probs length"
    );
    assert_eq!(labels.len(), n, "cross_entropy_forward: labels length");
    let mut total = 0f64;
    for ((row, prow), &label) in logits
        .chunks(classes)
        .zip(probs.chunks_mut(classes))
        .zip(labels)
    {
        let label = label as usize;
        assert!(
            label < classes,
            "cross_entropy_forward: label {label} >= {classes}"
        );
        let max = row
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(v.to_f64_lossy()));
        let sum_exp: f64 = row.iter().map(|&v| (v.to_f64_lossy() - max).exp()).sum();
        let log_sum_exp = max + sum_exp.ln();
        for (p, &v) in prow.iter_mut().zip(row) {
            *p = T::from_f64_lossy((v.to_f64_lossy() - log_sum_exp).exp());
        }
        // -log softmax[label] = logsumexp(row) - row[label]
        total += log_sum_exp - row[label].to_f64_lossy();
    }
    T::from_f64_lossy(total / n as f64)
}

/// `dlogits = dloss · (probs - onehot(labels)) / n` (overwrites `dlogits`).
pub fn cross_entropy_backward<T: Float>(
    n: usize,
    classes: usize,
    probs: &[T],
    labels: &[u32],
    dloss: T,
    dlogits: &mut [T],
) {
    assert_eq!(
        probs.len(),
        n * classes,
        "cross_entropy_backward: probs length"
    );
    assert_eq!(
        dlogits.len(),
        n * classes,
        "cross_entropy_backward: dlogits length"
    );
    assert_eq!(labels.len(), n, "cross_entropy_backward: labels length");
    let scale = dloss / T::from_f64_lossy(n as f64);
    for ((drow, prow), &label) in dlogits
        .chunks_mut(classes)
        .zip(probs.chunks(classes))
        .zip(labels)
    {
        for (d, &p) in drow.iter_mut().zip(prow) {
            *d = scale * p;
        }
        drow[label as usize] -= scale;
    }
}
