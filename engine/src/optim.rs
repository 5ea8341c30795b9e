//! SGD exactly as `torch.optim.SGD` (no dampening, no Nesterov):
//!
//! ```text
//! d   = g + weight_decay · p
//! buf = d                      (first step: a clone)
//! buf = momentum · buf + d     (later steps)
//! p  -= lr · buf               (or lr · d when momentum == 0: no buffer, as PyTorch)
//! ```
//! Weight decay applies to every parameter, batch-norm weights and biases included (PyTorch's
//! default with a single parameter group).
//!
//! Momentum buffers are saved/loaded as `optimizer.momentum_buffer.<param name>` tensors
//! ([`Sgd::state_tensors`], [`Sgd::load_state_tensors`]); a parameter that has not stepped yet
//! has no buffer, as in PyTorch's optimizer state.

use std::collections::BTreeMap;

use crate::autograd::Param;
use crate::state::{NamedTensor, StateError};
use crate::Float;

/// Name prefix of momentum buffers in state files.
pub const MOMENTUM_PREFIX: &str = "optimizer.momentum_buffer.";

/// Stochastic gradient descent with momentum and weight decay.
#[derive(Clone, Debug)]
pub struct Sgd<T> {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Per parameter index; `None` until that parameter's first step.
    momentum_buffers: Vec<Option<Vec<T>>>,
}

impl<T: Float> Sgd<T> {
    pub fn new(lr: f64, momentum: f64, weight_decay: f64) -> Self {
        Sgd {
            lr,
            momentum,
            weight_decay,
            momentum_buffers: Vec::new(),
        }
    }

    /// One step over all parameters (their `grad` must hold this step's gradient).
    pub fn step(&mut self, params: &mut [Param<T>]) {
        for (i, p) in params.iter_mut().enumerate() {
            self.step_param(i, p);
        }
    }

    /// One step of parameter `index` alone (lets a caller update a parameter as soon as its
    /// averaged gradient is available).
    pub fn step_param(&mut self, index: usize, p: &mut Param<T>) {
        if self.momentum_buffers.len() <= index {
            self.momentum_buffers.resize(index + 1, None);
        }
        let lr = T::from_f64_lossy(self.lr);
        let wd = T::from_f64_lossy(self.weight_decay);
        let momentum = T::from_f64_lossy(self.momentum);
        let use_wd = self.weight_decay != 0.0;
        if self.momentum == 0.0 {
            for (v, &g) in p.value.iter_mut().zip(&p.grad) {
                let d = if use_wd { g + wd * *v } else { g };
                *v -= lr * d;
            }
            return;
        }
        match &mut self.momentum_buffers[index] {
            slot @ None => {
                let mut buf = Vec::with_capacity(p.value.len());
                for (v, &g) in p.value.iter_mut().zip(&p.grad) {
                    let d = if use_wd { g + wd * *v } else { g };
                    buf.push(d);
                    *v -= lr * d;
                }
                *slot = Some(buf);
            }
            Some(buf) => {
                for ((v, &g), b) in p.value.iter_mut().zip(&p.grad).zip(buf.iter_mut()) {
                    let d = if use_wd { g + wd * *v } else { g };
                    *b = momentum * *b + d;
                    *v -= lr * *b;
                }
            }
        }
    }

    /// The momentum buffer of parameter `index`, if it has stepped.
    pub fn momentum_buffer(&self, index: usize) -> Option<&[T]> {
        self.momentum_buffers.get(index).and_then(|b| b.as_deref())
    }

    /// Momentum buffers as named tensors (`optimizer.momentum_buffer.<name>`, the parameter's
    /// shape), for parameters that have a buffer.
    pub fn state_tensors(&self, params: &[Param<T>]) -> Vec<NamedTensor> {
        params
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                self.momentum_buffer(i).map(|buf| {
                    NamedTensor::from_float(format!("{MOMENTUM_PREFIX}{}", p.name), &p.shape, buf)
                })
            })
            .collect()
    }

    /// Restores momentum buffers from `tensors` (other names are ignored). Parameters without
    /// a saved buffer start fresh (as a never-stepped PyTorch optimizer).
    pub fn load_state_tensors(
        &mut self,
        params: &[Param<T>],
        tensors: &BTreeMap<String, NamedTensor>,
    ) -> Result<(), StateError> {
        let mut buffers = vec![None; params.len()];
        for (i, p) in params.iter().enumerate() {
            let name = format!("{MOMENTUM_PREFIX}{}", p.name);
            if let Some(t) = tensors.get(&name) {
                buffers[i] = Some(t.to_float_vec::<T>(&p.shape)?);
            }
        }
        self.momentum_buffers = buffers;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand-computed against the torch.optim.SGD update rule (see module docs).
    #[test]
    fn matches_torch_update_rule_by_hand() {
        let mut p = vec![Param::new("w", &[2], vec![1.0f64, -2.0])];
        let mut sgd = Sgd::new(0.1, 0.9, 0.01);
        p[0].grad = vec![0.5, 0.25];
        sgd.step(&mut p);
        // d = g + 0.01 p = [0.51, 0.23]; buf = d; p = p - 0.1 d
        let d1 = [0.5 + 0.01 * 1.0, 0.25 + 0.01 * -2.0];
        let p1 = [1.0 - 0.1 * d1[0], -2.0 - 0.1 * d1[1]];
        assert!((p[0].value[0] - p1[0]).abs() < 1e-15 && (p[0].value[1] - p1[1]).abs() < 1e-15);
        p[0].grad = vec![-1.0, 2.0];
        sgd.step(&mut p);
        let d2 = [-1.0 + 0.01 * p1[0], 2.0 + 0.01 * p1[1]];
        let b2 = [0.9 * d1[0] + d2[0], 0.9 * d1[1] + d2[1]];
        let p2 = [p1[0] - 0.1 * b2[0], p1[1] - 0.1 * b2[1]];
        assert!((p[0].value[0] - p2[0]).abs() < 1e-15 && (p[0].value[1] - p2[1]).abs() < 1e-15);
        assert_eq!(sgd.momentum_buffer(0).unwrap().len(), 2);
    }

    #[test]
    fn no_momentum_keeps_no_buffer() {
        let mut p = vec![Param::new("w", &[1], vec![1.0f32])];
        p[0].grad = vec![2.0];
        let mut sgd = Sgd::new(0.5, 0.0, 0.0);
        sgd.step(&mut p);
        assert_eq!(p[0].value[0], 0.0);
        assert!(sgd.momentum_buffer(0).is_none());
    }
}
