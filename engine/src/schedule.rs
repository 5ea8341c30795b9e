//! Learning-rate schedules as pure functions of the iteration, equal to PyTorch's
//! `torch.optim.lr_scheduler` stepped once per iteration (`optimizer.step(); scheduler.step()`):
//! iteration `i` (0-based) trains with the value the scheduler holds after `i` steps.
//!
//! With `W` warmup iterations, `T` iterations in the whole run, `t = i - W` and `lr` the base
//! (`--lr`):
//!
//! ```text
//! warmup   (i < W)  lr · (s + (1 - s) · i / W)               LinearLR(start_factor=s, total_iters=W)
//! constant          lr                                        (LinearLR alone: it holds lr after W)
//! step              lr · γ^#{m_k <= i}                        MultiStepLR(milestones=[m_k - W], gamma=γ)
//! cosine            η + (lr - η)(1 + cos(π t / (T - W))) / 2  CosineAnnealingLR(T_max=T - W, eta_min=η)
//! onecycle          OneCycleLR(max_lr=lr, total_steps=T, pct_start, div_factor,
//!                   final_div_factor, anneal_strategy='cos', cycle_momentum)
//! ```
//! A warmup followed by a main schedule is PyTorch's `SequentialLR([LinearLR, main],
//! milestones=[W])`; step milestones are absolute iterations of the run (PyTorch's are relative
//! to the start of the main scheduler, hence `m_k - W`). OneCycleLR warms up by itself
//! (`pct_start`), so it takes no separate warmup.
//!
//! PyTorch computes most of these recursively (each value from the previous one); we use the
//! closed forms, which differ from PyTorch's values by rounding only (the fixture test bounds
//! it), and which make the value at any iteration — after a resume too — independent of how
//! the run got there.
//!
//! OneCycleLR cycles momentum too (PyTorch's default, `cycle_momentum=True`): from
//! `max_momentum` down to `base_momentum` while the learning rate rises, and back while it
//! falls, with the same cosine. [`LrSchedule::momentum`] returns it; `None` means the
//! optimizer's own momentum stays.

use crate::optim::Sgd;
use crate::Float;

/// The shape of a schedule after its warmup. Iterations are absolute (counted from 0 at the
/// start of the run).
#[derive(Clone, Debug, PartialEq)]
pub enum ScheduleKind {
    Constant,
    /// Multiply by `gamma` at each milestone iteration.
    Step {
        milestones: Vec<usize>,
        gamma: f64,
    },
    /// Cosine from the base rate down to `final_lr` at the end of the run.
    Cosine {
        final_lr: f64,
    },
    OneCycle(OneCycle),
}

/// OneCycleLR's parameters (PyTorch's names; the base rate is `max_lr`).
#[derive(Clone, Debug, PartialEq)]
pub struct OneCycle {
    pub pct_start: f64,
    pub div_factor: f64,
    pub final_div_factor: f64,
    /// `(base_momentum, max_momentum)`, or `None` for `cycle_momentum=False`.
    pub cycle_momentum: Option<(f64, f64)>,
}

/// A schedule that cannot be built, as a message naming the setting.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{0}")]
pub struct ScheduleError(pub String);

/// Learning rate (and with OneCycleLR momentum) for every iteration of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct LrSchedule {
    base_lr: f64,
    total_iters: usize,
    warmup_iters: usize,
    warmup_start_factor: f64,
    kind: ScheduleKind,
}

/// Iterations in `epochs` (possibly fractional) epochs of `iters_per_epoch`, rounded to the
/// nearest (the way `--warmup-epochs` and `--lr-milestones` become iterations).
pub fn epochs_to_iters(epochs: f64, iters_per_epoch: usize) -> usize {
    (epochs * iters_per_epoch as f64).round().max(0.0) as usize
}

fn err<T>(msg: String) -> Result<T, ScheduleError> {
    Err(ScheduleError(msg))
}

impl LrSchedule {
    /// A schedule of `total_iters` iterations at base rate `base_lr`, warming up linearly
    /// from `warmup_start_factor · base_lr` over the first `warmup_iters`.
    pub fn new(
        base_lr: f64,
        total_iters: usize,
        warmup_iters: usize,
        warmup_start_factor: f64,
        kind: ScheduleKind,
    ) -> Result<LrSchedule, ScheduleError> {
        if !base_lr.is_finite() || base_lr < 0.0 {
            return err(format!(
                "the learning rate must be finite and >= 0, got {base_lr}"
            ));
        }
        if total_iters == 0 {
            return err("a schedule needs at least one iteration".into());
        }
        if warmup_iters > 0 && !(warmup_start_factor > 0.0 && warmup_start_factor <= 1.0) {
            return err(format!(
                "--warmup-start-factor must be in (0, 1], got {warmup_start_factor}"
            ));
        }
        if warmup_iters >= total_iters && !matches!(kind, ScheduleKind::Constant) {
            return err(format!(
                "the warmup ({warmup_iters} iterations) must end before the run does ({total_iters} iterations)"
            ));
        }
        Self::check_kind(&kind, total_iters, warmup_iters)?;
        Ok(LrSchedule {
            base_lr,
            total_iters,
            warmup_iters,
            warmup_start_factor,
            kind,
        })
    }

    fn check_kind(kind: &ScheduleKind, total: usize, warmup: usize) -> Result<(), ScheduleError> {
        match kind {
            ScheduleKind::Constant => Ok(()),
            ScheduleKind::Step { milestones, gamma } => {
                if !gamma.is_finite() || *gamma <= 0.0 {
                    return err(format!("--lr-gamma must be a positive number, got {gamma}"));
                }
                if milestones.is_empty() {
                    return err("--lr-schedule step needs --lr-milestones".into());
                }
                if milestones.windows(2).any(|w| w[0] >= w[1]) {
                    return err(format!(
                        "--lr-milestones must increase, got iterations {milestones:?}"
                    ));
                }
                match milestones.first() {
                    Some(&m) if m <= warmup => err(format!(
                        "--lr-milestones: the first milestone (iteration {m}) must come after the warmup ({warmup} iterations)"
                    )),
                    _ => Ok(()),
                }
            }
            ScheduleKind::Cosine { final_lr } => match final_lr.is_finite() && *final_lr >= 0.0 {
                true => Ok(()),
                false => err(format!(
                    "--final-lr must be finite and >= 0, got {final_lr}"
                )),
            },
            ScheduleKind::OneCycle(c) => c.check(total, warmup),
        }
    }

    pub fn total_iters(&self) -> usize {
        self.total_iters
    }

    pub fn warmup_iters(&self) -> usize {
        self.warmup_iters
    }

    pub fn kind(&self) -> &ScheduleKind {
        &self.kind
    }

    /// The learning rate of iteration `i` (0-based; past the end, the last iteration's).
    pub fn lr(&self, i: usize) -> f64 {
        let i = i.min(self.total_iters - 1);
        let (w, lr) = (self.warmup_iters, self.base_lr);
        if i < w {
            let s = self.warmup_start_factor;
            return lr * (s + (1.0 - s) * i as f64 / w as f64);
        }
        match &self.kind {
            ScheduleKind::Constant => lr,
            ScheduleKind::Step { milestones, gamma } => {
                let passed = milestones.partition_point(|&m| m <= i);
                lr * gamma.powi(passed as i32)
            }
            ScheduleKind::Cosine { final_lr } => {
                let t = (i - w) as f64 / (self.total_iters - w) as f64;
                final_lr + (lr - final_lr) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
            }
            ScheduleKind::OneCycle(c) => {
                let initial = lr / c.div_factor;
                let min = initial / c.final_div_factor;
                let (phase, pct) = c.phase(i, self.total_iters);
                match phase {
                    0 => anneal_cos(initial, lr, pct),
                    _ => anneal_cos(lr, min, pct),
                }
            }
        }
    }

    /// The momentum of iteration `i` when the schedule sets it (OneCycleLR with
    /// `cycle_momentum`), else `None`.
    pub fn momentum(&self, i: usize) -> Option<f64> {
        let i = i.min(self.total_iters - 1);
        match &self.kind {
            ScheduleKind::OneCycle(c) => c.cycle_momentum.map(|(base, max)| {
                let (phase, pct) = c.phase(i, self.total_iters);
                match phase {
                    0 => anneal_cos(max, base, pct),
                    _ => anneal_cos(base, max, pct),
                }
            }),
            _ => None,
        }
    }

    /// Set `sgd`'s learning rate (and momentum, if scheduled) for iteration `i`.
    pub fn apply<T: Float>(&self, i: usize, sgd: &mut Sgd<T>) {
        sgd.lr = self.lr(i);
        if let Some(m) = self.momentum(i) {
            sgd.momentum = m;
        }
    }
}

impl OneCycle {
    fn check(&self, total: usize, warmup: usize) -> Result<(), ScheduleError> {
        if warmup > 0 {
            return err(
                "--lr-schedule onecycle warms up by itself (--pct-start): drop --warmup-epochs"
                    .into(),
            );
        }
        if !(self.pct_start > 0.0 && self.pct_start < 1.0) {
            return err(format!(
                "--pct-start must be in (0, 1), got {}",
                self.pct_start
            ));
        }
        for (flag, v) in [
            ("--div-factor", self.div_factor),
            ("--final-div-factor", self.final_div_factor),
        ] {
            if !v.is_finite() || v <= 0.0 {
                return err(format!("{flag} must be a positive number, got {v}"));
            }
        }
        if let Some((base, max)) = self.cycle_momentum {
            if !(0.0..1.0).contains(&base) || !(0.0..1.0).contains(&max) {
                return err(format!(
                    "onecycle momentum must be in [0, 1): --base-momentum {base}, --momentum {max}"
                ));
            }
        }
        // Both phases need a positive length (PyTorch divides by them).
        let up_end = self.pct_start * total as f64 - 1.0;
        if up_end <= 0.0 || up_end >= (total - 1) as f64 {
            return err(format!(
                "--pct-start {} leaves no room for both onecycle phases in {total} iterations",
                self.pct_start
            ));
        }
        Ok(())
    }

    /// PyTorch's phase search: `(0, pct)` while `i <= pct_start·T - 1`, then `(1, pct)`.
    fn phase(&self, i: usize, total: usize) -> (usize, f64) {
        let up_end = self.pct_start * total as f64 - 1.0;
        let i = i as f64;
        if i <= up_end {
            (0, i / up_end)
        } else {
            (1, (i - up_end) / ((total - 1) as f64 - up_end))
        }
    }
}

/// PyTorch's `OneCycleLR._annealing_cos`: from `start` to `end` as `pct` goes 0 → 1.
fn anneal_cos(start: f64, end: f64, pct: f64) -> f64 {
    let cos_out = (std::f64::consts::PI * pct).cos() + 1.0;
    end + (start - end) / 2.0 * cos_out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cycle() -> OneCycle {
        OneCycle {
            pct_start: 0.3,
            div_factor: 25.0,
            final_div_factor: 1e4,
            cycle_momentum: Some((0.85, 0.95)),
        }
    }

    #[test]
    fn warmup_rises_linearly_then_the_main_schedule_starts_at_the_base_rate() {
        let s = LrSchedule::new(0.4, 100, 10, 0.1, ScheduleKind::Cosine { final_lr: 0.0 }).unwrap();
        assert_eq!(s.lr(0), 0.4 * 0.1);
        assert!((s.lr(5) - 0.4 * (0.1 + 0.9 * 0.5)).abs() < 1e-15);
        assert_eq!(s.lr(10), 0.4);
        assert!(s.lr(99) < 1e-3 && s.lr(99) > 0.0);
        assert_eq!(s.lr(1000), s.lr(99), "past the end: the last value");
        assert_eq!(s.momentum(3), None);
    }

    #[test]
    fn step_milestones_are_absolute_iterations() {
        let kind = ScheduleKind::Step {
            milestones: vec![30, 60],
            gamma: 0.1,
        };
        let s = LrSchedule::new(1.0, 100, 5, 0.5, kind).unwrap();
        assert_eq!((s.lr(29), s.lr(30), s.lr(59)), (1.0, 0.1, 0.1));
        assert!((s.lr(60) - 0.01).abs() < 1e-17);
    }

    #[test]
    fn onecycle_peaks_at_pct_start_and_cycles_momentum_the_other_way() {
        let s = LrSchedule::new(0.1, 100, 0, 1.0, ScheduleKind::OneCycle(cycle())).unwrap();
        assert!((s.lr(0) - 0.1 / 25.0).abs() < 1e-17);
        assert_eq!(s.momentum(0), Some(0.95));
        let peak = (0..100)
            .max_by(|&a, &b| s.lr(a).total_cmp(&s.lr(b)))
            .unwrap();
        assert_eq!(peak, 29);
        assert!((s.momentum(29).unwrap() - 0.85).abs() < 1e-15);
        assert!((s.lr(99) - 0.1 / 25.0 / 1e4).abs() < 1e-15);
        assert!((s.momentum(99).unwrap() - 0.95).abs() < 1e-15);
    }

    #[test]
    fn bad_settings_are_refused_with_the_flag_named() {
        let bad = |total, warmup, kind| {
            LrSchedule::new(0.1, total, warmup, 0.1, kind)
                .unwrap_err()
                .0
        };
        let step = |m: Vec<usize>| ScheduleKind::Step {
            milestones: m,
            gamma: 0.1,
        };
        assert!(bad(100, 10, step(vec![10])).contains("after the warmup"));
        assert!(bad(100, 0, step(vec![50, 40])).contains("increase"));
        assert!(bad(100, 0, step(vec![])).contains("--lr-milestones"));
        assert!(bad(10, 10, ScheduleKind::Cosine { final_lr: 0.0 }).contains("warmup"));
        assert!(bad(100, 5, ScheduleKind::OneCycle(cycle())).contains("--warmup-epochs"));
        assert!(bad(3, 0, ScheduleKind::OneCycle(cycle())).contains("--pct-start"));
        assert!(LrSchedule::new(0.1, 0, 0, 1.0, ScheduleKind::Constant).is_err());
        // A warmup as long as the run is fine for a constant rate.
        assert!(LrSchedule::new(0.1, 10, 10, 0.1, ScheduleKind::Constant).is_ok());
    }

    #[test]
    fn epochs_round_to_the_nearest_iteration() {
        assert_eq!(epochs_to_iters(0.5, 391), 196);
        assert_eq!(epochs_to_iters(2.0, 391), 782);
        assert_eq!(epochs_to_iters(0.0, 391), 0);
    }
}
