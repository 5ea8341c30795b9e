//! `dtrain eval --checkpoint FILE [training flags]`: evaluate saved weights on the test split
//! of `--dataset` (one process, no training) and print the evaluation line training prints.
//!
//! The network is the checkpoint's (its `model` metadata, for dtrain checkpoints) or
//! `--model` (PyTorch state dicts). The data flags (`--dataset`, `--data-dir`,
//! `--batch-size`, `--seed` and `--synthetic-test` for synthetic data, `--threads`) mean what
//! they mean for training; the others are accepted and ignored.

use std::path::PathBuf;

use clap::Args;

use crate::args::{resolve_train_args, TrainArgs, UsageError};
use crate::train::{build_model, test_line, test_shard_totals, TrainError};

#[derive(Args, Debug, Clone)]
pub struct EvalArgs {
    /// Checkpoint to evaluate (--save-checkpoint/--save-best file, or a PyTorch state_dict
    /// in safetensors)
    #[arg(long, value_name = "FILE")]
    pub checkpoint: PathBuf,
    #[command(flatten)]
    pub train: TrainArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{0}")]
    Usage(UsageError),
    #[error("--checkpoint {}: {reason}", path.display())]
    Checkpoint { path: PathBuf, reason: String },
    #[error("{0}")]
    Train(#[from] TrainError),
}

/// The `model` a dtrain checkpoint records, if the file is one.
fn checkpoint_model(path: &std::path::Path) -> Result<Option<String>, EvalError> {
    let state = engine::state::load_tensors(path).map_err(|e| EvalError::Checkpoint {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(state.metadata.get("model").cloned())
}

/// Evaluate and print `Test set: Average loss: ..., Accuracy: c/n (p%)`.
pub fn run(args: &EvalArgs) -> Result<(), EvalError> {
    let env = |k: &str| std::env::var(k).ok();
    let mut cfg = resolve_train_args(&args.train, &env).map_err(EvalError::Usage)?;
    // One process evaluates everything, whatever launcher variables say.
    (cfg.num_nodes, cfg.rank) = (1, 0);
    engine::parallel::set_num_threads(cfg.threads);
    let spec = checkpoint_model(&args.checkpoint)?.unwrap_or_else(|| cfg.opts.model.clone());
    let mut model = build_model(&spec, 0).map_err(TrainError::from)?;
    crate::checkpoint::load_init(&args.checkpoint, &mut model).map_err(|reason| {
        EvalError::Checkpoint {
            path: args.checkpoint.clone(),
            reason,
        }
    })?;
    let (_, test) = crate::data::load_dataset(&cfg).map_err(TrainError::from)?;
    model.set_training(false);
    let (loss_sum, correct, seen) =
        test_shard_totals(&mut model, &test, (0, 1), cfg.opts.batch_size).map_err(|e| {
            EvalError::Checkpoint {
                path: args.checkpoint.clone(),
                reason: e.to_string(),
            }
        })?;
    println!(
        "{}",
        test_line(loss_sum / seen.max(1) as f64, correct, seen)
    );
    Ok(())
}
