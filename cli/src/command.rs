//! The clap definition of the whole `dtrain` command line: training flags or one subcommand.
//!
//! Above every subcommand: this module imports their argument structs (`LaunchArgs`,
//! `BenchArgs`, ...), none of them imports this one, so `args` (the training flags and
//! [`crate::args::TrainConfig`]) stays below the subcommands that read it.

use std::ffi::OsString;

use clap::{Parser, Subcommand};

use crate::args::TrainArgs;
use crate::usage::UsageError;

/// `dtrain [train flags]` or `dtrain <subcommand> ...`.
#[derive(Parser, Debug)]
#[command(
    name = "dtrain",
    version,
    about = "Data-parallel training of VGG11 on CPUs",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub train: TrainArgs,
}

// Built once per process, so the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Start N local ranks of this program (like torchrun --standalone)
    Launch(crate::launch::LaunchArgs),
    /// Measure collective bandwidth and latency of a transport
    Bench(crate::bench_cmd::BenchArgs),
    /// Draw loss and throughput from a metrics file as SVG
    Plot(crate::plot::PlotArgs),
    /// Evaluate a saved checkpoint on the test set of --dataset (no training)
    Eval(crate::eval_cmd::EvalArgs),
    /// Internal: a child that prints lines and exits as told (tests the launcher)
    #[cfg(feature = "test-hooks")]
    #[command(hide = true)]
    LauncherTestChild(crate::launch::test_child::TestChildArgs),
}

/// Parse the whole command line (program name first) into a [`Cli`].
pub fn parse_cli(args: impl IntoIterator<Item = OsString>) -> Result<Cli, UsageError> {
    Cli::try_parse_from(args).map_err(UsageError::from_clap)
}
