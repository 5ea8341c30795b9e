//! PyTorch's default initialization, from a seeded ChaCha RNG.
//!
//! `nn.Conv2d` / `nn.Linear` `reset_parameters()`: the weight is
//! `kaiming_uniform_(a = sqrt(5))`, i.e. `U(-b, b)` with
//! `b = gain · sqrt(3 / fan_in)`, `gain = sqrt(2 / (1 + a²)) = sqrt(1/3)`, so `b = 1/sqrt(fan_in)`;
//! the bias is `U(-1/sqrt(fan_in), 1/sqrt(fan_in))`. `fan_in = in_channels · kh · kw` (conv) or
//! `in_features` (linear). `nn.BatchNorm2d`: weight 1, bias 0, running mean 0, running var 1.
//! The values are not bit-identical to PyTorch's (different RNG), only identically distributed.

use rand::distributions::{Distribution, Uniform};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::Float;

/// The RNG every initializer draws from (seeded, portable, reproducible).
pub type InitRng = ChaCha8Rng;

/// A seeded initialization RNG.
pub fn init_rng(seed: u64) -> InitRng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// `fan_in` of a conv (`[C_out, C_in, KH, KW]`) or linear (`[out, in]`) weight shape:
/// the product of all dimensions but the first (PyTorch's `_calculate_fan_in_and_fan_out`).
pub fn fan_in(weight_shape: &[usize]) -> usize {
    weight_shape[1..].iter().product()
}

/// The bound `b` of PyTorch's default weight and bias init: `1/sqrt(fan_in)`.
pub fn default_bound(fan_in: usize) -> f64 {
    // kaiming_uniform(a = sqrt(5)): gain² = 2 / (1 + 5); bound = sqrt(3) · gain / sqrt(fan_in).
    let gain = (2.0 / (1.0 + 5.0f64)).sqrt();
    3.0f64.sqrt() * gain / (fan_in as f64).sqrt()
}

/// Fills `out` with `U(-bound, bound)` samples (drawn in f64, then rounded to `T`).
pub fn uniform_fill<T: Float>(rng: &mut InitRng, bound: f64, out: &mut [T]) {
    let dist = Uniform::new(-bound, bound);
    for v in out.iter_mut() {
        *v = T::from_f64_lossy(dist.sample(rng));
    }
}

/// PyTorch's default init of a conv/linear `weight` and `bias` (drawn in that order).
pub fn init_weight_and_bias<T: Float>(
    rng: &mut InitRng,
    weight_shape: &[usize],
    weight: &mut [T],
    bias: Option<&mut [T]>,
) {
    let bound = default_bound(fan_in(weight_shape));
    uniform_fill(rng, bound, weight);
    if let Some(bias) = bias {
        uniform_fill(rng, bound, bias);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_is_one_over_sqrt_fan_in() {
        for fan in [1usize, 27, 576, 4608] {
            let b = default_bound(fan);
            assert!((b - 1.0 / (fan as f64).sqrt()).abs() < 1e-15);
        }
        assert_eq!(fan_in(&[64, 3, 3, 3]), 27);
        assert_eq!(fan_in(&[10, 512]), 512);
    }

    #[test]
    fn same_seed_same_values_and_within_bound() {
        let (mut a, mut b) = (vec![0f32; 1000], vec![0f32; 1000]);
        uniform_fill(&mut init_rng(7), 0.25, &mut a);
        uniform_fill(&mut init_rng(7), 0.25, &mut b);
        assert_eq!(a, b);
        assert!(a.iter().all(|v| v.abs() <= 0.25));
        let mut c = vec![0f32; 1000];
        uniform_fill(&mut init_rng(8), 0.25, &mut c);
        assert_ne!(a, c);
    }
}
