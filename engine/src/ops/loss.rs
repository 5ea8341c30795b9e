//! Log-softmax cross-entropy, mean over the batch (`torch.nn.functional.cross_entropy`),
//! with PyTorch's `label_smoothing` ε: the target is `(1 - ε)·onehot + ε/C`, so per sample
//!
//! ```text
//! loss = (1 - ε)·(-log p[label]) + ε·(1/C)·Σ_c -log p[c]
//!      = logsumexp(x) - (1 - ε)·x[label] - ε·mean(x)
//! dx   = p - (1 - ε)·onehot(label) - ε/C
//! ```
//! Rows are shifted by their max before `exp` (no overflow); sums run in f64.
use crate::autograd::{ParamGrads, Pools, Tape, TapeNode, ValueId};
use crate::Float;

/// Returns the mean loss; writes softmax probabilities into `probs` (`[n, classes]`) for
/// backward. Labels must be `< classes` (callers validate user data before this);
/// `label_smoothing` is ε in [0, 1] (0: plain cross-entropy).
pub fn cross_entropy_forward<T: Float>(
    n: usize,
    classes: usize,
    logits: &[T],
    labels: &[u32],
    label_smoothing: f64,
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
        let nll = log_sum_exp - row[label].to_f64_lossy();
        total += match label_smoothing {
            0.0 => nll,
            eps => {
                let mean = row.iter().map(|&v| v.to_f64_lossy()).sum::<f64>() / classes as f64;
                (1.0 - eps) * nll + eps * (log_sum_exp - mean)
            }
        };
    }
    T::from_f64_lossy(total / n as f64)
}

/// `dlogits = dloss · (probs - (1 - ε)·onehot(labels) - ε/C) / n` (overwrites `dlogits`).
pub fn cross_entropy_backward<T: Float>(
    n: usize,
    classes: usize,
    probs: &[T],
    labels: &[u32],
    label_smoothing: f64,
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
    let eps = label_smoothing;
    // The target's two values: off the label ε/C, on it 1 - ε + ε/C (exactly 0 and 1 at ε = 0).
    let off = T::from_f64_lossy(eps / classes as f64);
    let on_extra = T::from_f64_lossy(1.0 - eps);
    for ((drow, prow), &label) in dlogits
        .chunks_mut(classes)
        .zip(probs.chunks(classes))
        .zip(labels)
    {
        for (d, &p) in drow.iter_mut().zip(prow) {
            *d = scale * (p - off);
        }
        drow[label as usize] -= scale * on_extra;
    }
}

struct CrossEntropyNode<T> {
    n: usize,
    classes: usize,
    logits: usize,
    loss: usize,
    probs: Vec<T>,
    labels: Vec<u32>,
    label_smoothing: f64,
}

impl<T: Float> TapeNode<T> for CrossEntropyNode<T> {
    fn op(&self) -> &'static str {
        "cross_entropy"
    }
    fn output(&self) -> usize {
        self.loss
    }
    fn backward(&self, tape: &mut Tape<T>, _grads: &mut ParamGrads<'_, T>, dy: &mut Vec<T>) {
        if tape.requires_grad(self.logits) {
            let dloss = dy[0];
            tape.accumulate(self.logits, |_, g| {
                cross_entropy_backward(
                    self.n,
                    self.classes,
                    &self.probs,
                    &self.labels,
                    self.label_smoothing,
                    dloss,
                    g,
                )
            });
        }
    }
    fn recycle(self: Box<Self>, pools: &mut Pools<T>) {
        pools.floats.give(self.probs);
    }
}

impl<T: Float> Tape<T> {
    /// Mean cross-entropy of `logits: [N, classes]` against `labels` (each `< classes`;
    /// callers validate). Returns the scalar loss value and its number.
    pub fn cross_entropy(&mut self, logits: ValueId, labels: &[u32]) -> (ValueId, T) {
        self.cross_entropy_smoothed(logits, labels, 0.0)
    }

    /// [`Tape::cross_entropy`] with PyTorch's `label_smoothing` (ε in [0, 1]).
    pub fn cross_entropy_smoothed(
        &mut self,
        logits: ValueId,
        labels: &[u32],
        label_smoothing: f64,
    ) -> (ValueId, T) {
        let ls = self.shape(&logits);
        assert!(
            ls.len() == 2 && ls[0] == labels.len(),
            "cross_entropy: {ls:?} vs {} labels",
            labels.len()
        );
        let (n, classes) = (ls[0], ls[1]);
        let mut probs = self.pools.floats.take(n * classes);
        let loss_value = cross_entropy_forward(
            n,
            classes,
            self.value(logits.0),
            labels,
            label_smoothing,
            &mut probs,
        );
        let loss = self.new_output(Vec::new(), |_, l| l[0] = loss_value);
        let record = self.record();
        let logits = self.consume_input(logits, false);
        if record {
            self.push_node(Box::new(CrossEntropyNode {
                n,
                classes,
                logits,
                loss,
                probs,
                labels: labels.to_vec(),
                label_smoothing,
            }));
        } else {
            self.pools.floats.give(probs);
        }
        self.maybe_free_data(logits);
        (ValueId(loss), loss_value)
    }
}
