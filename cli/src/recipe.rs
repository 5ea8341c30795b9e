//! The training recipe beyond a constant learning rate: schedule, warmup, Nesterov,
//! label smoothing, evaluation cadence and the best checkpoint (flags flattened into
//! [`crate::args::RunOptions`]; definitions in `engine::schedule`, `engine::optim`).
//!
//! Epoch counts (`--warmup-epochs`, `--lr-milestones`) become iterations with this rank's
//! batches per epoch (equal on every rank: DistributedSampler pads), rounded to the nearest.
//! The schedule spans the whole run, `--epochs` × batches per epoch; `--max-iters` cuts a
//! run short without changing the schedule, so a short run follows the long run's rates.

use clap::{Args, ValueEnum};
use engine::optim::Sgd;
use engine::schedule::{epochs_to_iters, LrSchedule, OneCycle, ScheduleError, ScheduleKind};

use crate::usage::UsageError;

/// `--lr-schedule`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum ScheduleArg {
    /// --lr throughout (after the warmup)
    Constant,
    /// Multiply by --lr-gamma at each --lr-milestones epoch (MultiStepLR)
    Step,
    /// Cosine from --lr to --final-lr over the run (CosineAnnealingLR)
    Cosine,
    /// OneCycleLR with max_lr = --lr (its own warmup: --pct-start)
    Onecycle,
}

impl ScheduleArg {
    pub fn name(self) -> &'static str {
        match self {
            ScheduleArg::Constant => "constant",
            ScheduleArg::Step => "step",
            ScheduleArg::Cosine => "cosine",
            ScheduleArg::Onecycle => "onecycle",
        }
    }
}

/// `--lr-milestones`: epochs, in the order given.
#[derive(Clone, Debug, PartialEq)]
pub struct Milestones(pub Vec<f64>);

/// Comma-separated epochs, e.g. `30,60,80` or `0.5,1.5`.
fn parse_milestones(raw: &str) -> Result<Milestones, String> {
    raw.split(',')
        .map(|t| match t.trim().parse::<f64>() {
            Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
            _ => Err(format!(
                "{t:?} is not a positive number of epochs (expected e.g. 30,60,80)"
            )),
        })
        .collect::<Result<Vec<f64>, String>>()
        .map(Milestones)
}

#[derive(Args, Debug, Clone, PartialEq)]
pub struct RecipeOptions {
    /// Learning-rate schedule, stepped every iteration (PyTorch's formulas)
    #[arg(long, value_enum, value_name = "KIND", default_value = "constant")]
    pub lr_schedule: ScheduleArg,
    /// Linear warmup over this many epochs (fractional allowed), from
    /// --warmup-start-factor × the rate (LinearLR); not with onecycle
    #[arg(
        long,
        value_name = "EPOCHS",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub warmup_epochs: f64,
    /// The warmup's first rate as a fraction of --lr (LinearLR's start_factor)
    #[arg(
        long,
        value_name = "F",
        default_value_t = 0.1,
        allow_negative_numbers = true
    )]
    pub warmup_start_factor: f64,
    /// step: epochs at which the rate is multiplied by --lr-gamma, e.g. 30,60,80
    #[arg(long, value_name = "EPOCHS", value_parser = parse_milestones)]
    pub lr_milestones: Option<Milestones>,
    /// step: the factor at each milestone
    #[arg(
        long,
        value_name = "F",
        default_value_t = 0.1,
        allow_negative_numbers = true
    )]
    pub lr_gamma: f64,
    /// cosine: the rate at the end of the run (eta_min)
    #[arg(
        long,
        value_name = "LR",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub final_lr: f64,
    /// onecycle: share of the run spent raising the rate
    #[arg(
        long,
        value_name = "F",
        default_value_t = 0.3,
        allow_negative_numbers = true
    )]
    pub pct_start: f64,
    /// onecycle: the first rate is --lr / this
    #[arg(
        long,
        value_name = "F",
        default_value_t = 25.0,
        allow_negative_numbers = true
    )]
    pub div_factor: f64,
    /// onecycle: the last rate is the first / this
    #[arg(
        long,
        value_name = "F",
        default_value_t = 1e4,
        allow_negative_numbers = true
    )]
    pub final_div_factor: f64,
    /// onecycle: momentum cycles between this and --momentum (max_momentum; PyTorch's
    /// default max is 0.95)
    #[arg(
        long,
        value_name = "M",
        default_value_t = 0.85,
        allow_negative_numbers = true
    )]
    pub base_momentum: f64,
    /// onecycle: keep --momentum fixed (cycle_momentum=False)
    #[arg(long)]
    pub no_cycle_momentum: bool,
    /// Nesterov momentum (PyTorch SGD's nesterov=True; needs --momentum > 0, --dampening 0)
    #[arg(long)]
    pub nesterov: bool,
    /// SGD dampening of the momentum buffer (PyTorch's dampening)
    #[arg(
        long,
        value_name = "F",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub dampening: f64,
    /// Label smoothing of the training loss (CrossEntropyLoss(label_smoothing)); test loss
    /// stays plain cross-entropy
    #[arg(
        long,
        value_name = "EPS",
        default_value_t = 0.0,
        allow_negative_numbers = true
    )]
    pub label_smoothing: f64,
    /// Also evaluate on the test set every N iterations (besides each epoch's end)
    #[arg(long, value_name = "N")]
    pub eval_every: Option<usize>,
    /// Keep the checkpoint of the best test accuracy so far in FILE (rank 0 writes it)
    #[arg(long, value_name = "FILE")]
    pub save_best: Option<std::path::PathBuf>,
}

fn invalid(msg: String) -> UsageError {
    UsageError::Invalid(msg)
}

impl RecipeOptions {
    /// Checks that need no dataset (ranges, combinations). `momentum` is `--momentum`.
    pub fn validate(&self, momentum: f64) -> Result<(), UsageError> {
        let in_range =
            |flag: &str, v: f64, lo: f64, hi: f64| match v.is_finite() && v >= lo && v <= hi {
                true => Ok(()),
                false => Err(invalid(format!("{flag} must be in [{lo}, {hi}], got {v}"))),
            };
        in_range("--label-smoothing", self.label_smoothing, 0.0, 1.0)?;
        in_range("--dampening", self.dampening, 0.0, 1.0)?;
        if !self.warmup_epochs.is_finite() || self.warmup_epochs < 0.0 {
            return Err(invalid(format!(
                "--warmup-epochs must be a number >= 0, got {}",
                self.warmup_epochs
            )));
        }
        if self.eval_every == Some(0) {
            return Err(invalid("--eval-every must be at least 1, got 0".into()));
        }
        let sgd = Sgd::<f32>::new(0.0, momentum, 0.0).with_nesterov(self.nesterov, self.dampening);
        sgd.validate()
            .map_err(|e| invalid(format!("--nesterov: {e}")))?;
        match (self.lr_schedule, &self.lr_milestones) {
            (ScheduleArg::Step, None) => Err(invalid(
                "--lr-schedule step needs --lr-milestones (epochs, e.g. 30,60,80)".into(),
            )),
            (s, Some(_)) if s != ScheduleArg::Step => Err(invalid(format!(
                "--lr-milestones is for --lr-schedule step, not {}",
                s.name()
            ))),
            _ => Ok(()),
        }
    }

    /// The schedule of a run of `epochs` epochs of `iters_per_epoch` iterations at base rate
    /// `lr` (momentum `momentum`, OneCycleLR's max_momentum). Errors name the flag.
    pub fn schedule(
        &self,
        lr: f64,
        momentum: f64,
        epochs: usize,
        iters_per_epoch: usize,
    ) -> Result<LrSchedule, ScheduleError> {
        let iters = |e: f64| epochs_to_iters(e, iters_per_epoch);
        let kind = match self.lr_schedule {
            ScheduleArg::Constant => ScheduleKind::Constant,
            ScheduleArg::Step => ScheduleKind::Step {
                milestones: self
                    .lr_milestones
                    .iter()
                    .flat_map(|m| &m.0)
                    .map(|&m| iters(m))
                    .collect(),
                gamma: self.lr_gamma,
            },
            ScheduleArg::Cosine => ScheduleKind::Cosine {
                final_lr: self.final_lr,
            },
            ScheduleArg::Onecycle => ScheduleKind::OneCycle(OneCycle {
                pct_start: self.pct_start,
                div_factor: self.div_factor,
                final_div_factor: self.final_div_factor,
                cycle_momentum: (!self.no_cycle_momentum).then_some((self.base_momentum, momentum)),
            }),
        };
        LrSchedule::new(
            lr,
            epochs * iters_per_epoch,
            iters(self.warmup_epochs),
            self.warmup_start_factor,
            kind,
        )
        .map_err(|e| {
            ScheduleError(format!(
                "--lr-schedule {} ({epochs} epochs of {iters_per_epoch} iterations): {e}",
                self.lr_schedule.name()
            ))
        })
    }

    /// The settings a checkpoint records (a resume with other values warns), and that must
    /// be equal on every rank.
    pub fn settings(&self) -> Vec<(&'static str, String)> {
        let milestones = match &self.lr_milestones {
            Some(m) => m.0.iter().map(f64::to_string).collect::<Vec<_>>().join(","),
            None => "none".into(),
        };
        vec![
            ("lr_schedule", self.lr_schedule.name().to_string()),
            ("warmup_epochs", self.warmup_epochs.to_string()),
            ("warmup_start_factor", self.warmup_start_factor.to_string()),
            ("lr_milestones", milestones),
            ("lr_gamma", self.lr_gamma.to_string()),
            ("final_lr", self.final_lr.to_string()),
            ("pct_start", self.pct_start.to_string()),
            ("div_factor", self.div_factor.to_string()),
            ("final_div_factor", self.final_div_factor.to_string()),
            ("base_momentum", self.base_momentum.to_string()),
            ("cycle_momentum", (!self.no_cycle_momentum).to_string()),
            ("nesterov", self.nesterov.to_string()),
            ("dampening", self.dampening.to_string()),
            ("label_smoothing", self.label_smoothing.to_string()),
        ]
    }

    /// [`RecipeOptions::settings`] as one canonical string (for the config hash).
    pub fn canonical(&self) -> String {
        self.settings()
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";")
    }
}
