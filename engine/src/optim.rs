//! SGD exactly as `torch.optim.SGD` (`maximize=False`):
//!
//! ```text
//! d   = g + weight_decay · p
//! buf = d                                    (first step: a clone, no dampening)
//! buf = momentum · buf + (1 - dampening) · d (later steps)
//! p  -= lr · buf                             (or lr · (d + momentum · buf) with Nesterov,
//!                                             or lr · d when momentum == 0: no buffer)
//! ```
//! Nesterov needs momentum > 0 and dampening 0, as PyTorch requires ([`Sgd::validate`]).
//! `lr` and `momentum` are public so a schedule can set them before each step
//! ([`crate::schedule::LrSchedule::apply`]).
//! Weight decay applies to every parameter, batch-norm weights and biases included (PyTorch's
//! default with a single parameter group).
//!
//! The update is one pass over `p`, `g` and the buffer, vectorized ([`crate::Float::run`]) and
//! split over threads in chunks (each element is updated by one task: no dependence on
//! timing). `d` and the updates use fused multiply-adds (as PyTorch's vectorized `add` with
//! `alpha`).
//!
//! Momentum buffers are saved/loaded as `optimizer.momentum_buffer.<param name>` tensors
//! ([`Sgd::state_tensors`], [`Sgd::load_state_tensors`]); a parameter that has not stepped yet
//! has no buffer, as in PyTorch's optimizer state.

use std::collections::BTreeMap;

use crate::autograd::Param;
use crate::ops::{par_chunks_mut, par_chunks_mut2, units_per_task};
use crate::parallel;
use crate::simd::{FloatVec, VecKernel};
use crate::state::{NamedTensor, StateError};
use crate::Float;

/// Elements per parallel task at least (below this a task hand-off costs more than it saves).
const MIN_TASK_ELEMS: usize = 1 << 15;

/// Name prefix of momentum buffers in state files.
pub const MOMENTUM_PREFIX: &str = "optimizer.momentum_buffer.";

/// Stochastic gradient descent with momentum and weight decay.
#[derive(Clone, Debug)]
pub struct Sgd<T> {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// PyTorch's `dampening`: later steps add `(1 - dampening) · d` to the buffer.
    pub dampening: f64,
    /// PyTorch's `nesterov`: step along `d + momentum · buf` instead of `buf`.
    pub nesterov: bool,
    /// Per parameter index; `None` until that parameter's first step.
    momentum_buffers: Vec<Option<Vec<T>>>,
    /// Threads for the update (`None`: the surrounding [`parallel::num_threads`]).
    threads: Option<usize>,
}

impl<T: Float> Sgd<T> {
    pub fn new(lr: f64, momentum: f64, weight_decay: f64) -> Self {
        Sgd {
            lr,
            momentum,
            weight_decay,
            dampening: 0.0,
            nesterov: false,
            momentum_buffers: Vec::new(),
            threads: None,
        }
    }

    /// The same optimizer with Nesterov momentum on or off and the given dampening.
    pub fn with_nesterov(mut self, nesterov: bool, dampening: f64) -> Self {
        self.nesterov = nesterov;
        self.dampening = dampening;
        self
    }

    /// PyTorch's checks of the settings: `Err` names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(format!(
                "Nesterov momentum needs momentum > 0 and dampening 0 (got momentum {}, dampening {})",
                self.momentum, self.dampening
            ));
        }
        if !self.dampening.is_finite() || !(0.0..=1.0).contains(&self.dampening) {
            return Err(format!(
                "dampening must be in [0, 1], got {}",
                self.dampening
            ));
        }
        Ok(())
    }

    /// Runs updates on `threads` threads (`None`: whatever [`parallel::num_threads`] says at
    /// the call).
    pub fn set_num_threads(&mut self, threads: Option<usize>) {
        self.threads = threads.map(|t| t.max(1));
    }

    /// One step over all parameters (their `grad` must hold this step's gradient).
    pub fn step(&mut self, params: &mut [Param<T>]) {
        parallel::with_num_threads_or_default(self.threads, || {
            for (i, p) in params.iter_mut().enumerate() {
                self.update(i, p);
            }
        })
    }

    /// One step of parameter `index` alone (lets a caller update a parameter as soon as its
    /// averaged gradient is available).
    pub fn step_param(&mut self, index: usize, p: &mut Param<T>) {
        parallel::with_num_threads_or_default(self.threads, || self.update(index, p))
    }

    fn update(&mut self, index: usize, p: &mut Param<T>) {
        if self.momentum_buffers.len() <= index {
            self.momentum_buffers.resize(index + 1, None);
        }
        let rule = SgdRule {
            lr: T::from_f64_lossy(self.lr),
            weight_decay: (self.weight_decay != 0.0).then(|| T::from_f64_lossy(self.weight_decay)),
            momentum: T::from_f64_lossy(self.momentum),
            keep: (self.dampening != 0.0).then(|| T::from_f64_lossy(1.0 - self.dampening)),
            nesterov: self.nesterov,
        };
        let g = &p.grad[..];
        let chunk = units_per_task(p.value.len(), 1, MIN_TASK_ELEMS);
        if self.momentum == 0.0 {
            par_chunks_mut(&mut p.value, chunk, |i, v| {
                let g = &g[i * chunk..i * chunk + v.len()];
                T::run(SgdKernel {
                    rule,
                    value: v,
                    grad: g,
                    buf: None,
                    first: false,
                })
            });
            return;
        }
        let slot = &mut self.momentum_buffers[index];
        let first = slot.is_none();
        let buf = slot.get_or_insert_with(|| vec![T::zero(); p.value.len()]);
        par_chunks_mut2(&mut p.value, buf, chunk, |i, v, b| {
            let g = &g[i * chunk..i * chunk + v.len()];
            T::run(SgdKernel {
                rule,
                value: v,
                grad: g,
                buf: Some(b),
                first,
            })
        });
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

/// The constants of one update.
#[derive(Clone, Copy)]
struct SgdRule<T> {
    lr: T,
    /// `None` when the weight decay is 0 (then `d = g` exactly).
    weight_decay: Option<T>,
    momentum: T,
    /// `1 - dampening`, `None` when the dampening is 0 (then `buf = momentum·buf + d` exactly).
    keep: Option<T>,
    nesterov: bool,
}

/// One chunk of one parameter: `d = g + wd·p`; then with a momentum buffer `buf = d` (first
/// step) or `buf = momentum·buf + (1 - dampening)·d`, `p -= lr·buf` (Nesterov:
/// `p -= lr·(d + momentum·buf)`); without one `p -= lr·d`.
struct SgdKernel<'a, T> {
    rule: SgdRule<T>,
    value: &'a mut [T],
    grad: &'a [T],
    buf: Option<&'a mut [T]>,
    first: bool,
}

impl<T: Float> VecKernel<T> for SgdKernel<'_, T> {
    type Output = ();
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) {
        let n = self.value.len();
        assert!(self.grad.len() == n && self.buf.as_ref().is_none_or(|b| b.len() == n));
        let neg_lr = V::splat(-self.rule.lr);
        let wd = self.rule.weight_decay.map(V::splat);
        let momentum = V::splat(self.rule.momentum);
        let keep = self.rule.keep.map(V::splat);
        let (p, g) = (self.value.as_mut_ptr(), self.grad.as_ptr());
        let b = self.buf.map(|b| b.as_mut_ptr());
        let mut i = 0;
        while i < n {
            let m = n - i;
            // SAFETY: `min(m, LANES)` elements from `i` are inside `value`, `grad` and `buf`
            // (same lengths, asserted above).
            unsafe {
                let pv = V::load_n(p.add(i), m);
                let gv = V::load_n(g.add(i), m);
                let d = match wd {
                    Some(wd) => pv.mul_add(wd, gv),
                    None => gv,
                };
                let step = match b {
                    None => d,
                    Some(b) => {
                        let nb = match (self.first, keep) {
                            (true, _) => d,
                            (false, None) => V::load_n(b.add(i), m).mul_add(momentum, d),
                            (false, Some(k)) => d.mul_add(k, V::load_n(b.add(i), m).mul(momentum)),
                        };
                        nb.store_n(b.add(i), m);
                        match self.rule.nesterov {
                            true => nb.mul_add(momentum, d),
                            false => nb,
                        }
                    }
                };
                step.mul_add(neg_lr, pv).store_n(p.add(i), m);
            }
            i += V::LANES;
        }
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

    /// The vectorized update on every SIMD path against the rule in f64, on odd lengths, for
    /// the three cases (no momentum, first step, later steps).
    #[test]
    fn kernel_matches_f64_rule_on_every_path() {
        use crate::gradcheck::random_vec;
        use crate::simd::F32Impl;
        for imp in F32Impl::runnable() {
            for len in [0usize, 1, 7, 8, 17, 100] {
                for (case, (momentum, first, wd, dampening, nesterov)) in [
                    (0.0, false, 1e-2, 0.0, false),
                    (0.9, true, 1e-2, 0.0, false),
                    (0.9, false, 0.0, 0.0, false),
                    (0.8, false, 5e-4, 0.0, false),
                    (0.8, false, 5e-4, 0.25, false),
                    (0.9, true, 1e-2, 0.5, false),
                    (0.9, false, 5e-4, 0.0, true),
                    (0.9, true, 0.0, 0.0, true),
                ]
                .into_iter()
                .enumerate()
                {
                    let seed = 10 * len as u64 + case as u64;
                    let p64 = random_vec(seed, len, -1.0, 1.0);
                    let g64 = random_vec(seed + 1, len, -1.0, 1.0);
                    let b64 = random_vec(seed + 2, len, -1.0, 1.0);
                    let f32s = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
                    let (mut p, g, mut b) = (f32s(&p64), f32s(&g64), f32s(&b64));
                    let rule = SgdRule {
                        lr: 0.1f32,
                        weight_decay: (wd != 0.0).then_some(wd as f32),
                        momentum: momentum as f32,
                        keep: (dampening != 0.0).then_some(1.0 - dampening as f32),
                        nesterov,
                    };
                    let buf = (momentum != 0.0).then_some(&mut b[..]);
                    imp.run(SgdKernel {
                        rule,
                        value: &mut p,
                        grad: &g,
                        buf,
                        first,
                    });
                    for i in 0..len {
                        let d = g64[i] + wd * p64[i];
                        let nb = match (momentum != 0.0, first) {
                            (false, _) => b64[i],
                            (true, true) => d,
                            (true, false) => momentum * b64[i] + (1.0 - dampening) * d,
                        };
                        let step = match (momentum != 0.0, nesterov) {
                            (false, _) => d,
                            (true, false) => nb,
                            (true, true) => d + momentum * nb,
                        };
                        let want = p64[i] - 0.1 * step;
                        assert!(
                            (p[i] as f64 - want).abs() < 1e-6,
                            "{imp:?} len {len} case {case} p[{i}]"
                        );
                        assert!(
                            (b[i] as f64 - nb).abs() < 1e-6,
                            "{imp:?} len {len} case {case} buf[{i}]"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn nesterov_without_momentum_or_with_dampening_is_refused() {
        let ok = Sgd::<f32>::new(0.1, 0.9, 0.0).with_nesterov(true, 0.0);
        assert!(ok.validate().is_ok());
        for (m, d) in [(0.0, 0.0), (0.9, 0.1)] {
            let e = Sgd::<f32>::new(0.1, m, 0.0)
                .with_nesterov(true, d)
                .validate()
                .unwrap_err();
            assert!(e.contains("Nesterov"), "{e}");
        }
        assert!(Sgd::<f32>::new(0.1, 0.9, 0.0)
            .with_nesterov(false, 1.5)
            .validate()
            .is_err());
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
