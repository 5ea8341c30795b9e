//! The `dtrain` program as a library, so integration tests can reach its parts. The modules
//! import each other without a cycle (`tests/module_graph.rs` fails on one).
//!
//! - [`command`]: the clap `Cli`/`Command` over the subcommands' argument structs.
//! - [`args`]: flags, launcher environment (torchrun/Slurm/Open MPI), validation → `TrainConfig`;
//!   [`config`]: the leaf vocabulary (mode, dataset, transport, compression values, defaults,
//!   flag bounds, env names); [`usage`]: `UsageError`, the one bad-input error (exit code 2).
//! - [`data`]: CIFAR-10 (with download), synthetic, Fashion-MNIST; sharding, augmentation, loader.
//! - [`train`]: the training loop, logs, metrics, evaluation; [`recipe`]: schedule, Nesterov,
//!   label smoothing, evaluation cadence flags.
//! - [`model`]: the network a `--model` spec names, and its parameter digest.
//! - [`sync`]: `GradSync`, one variant per mode owning its communicator; [`sync::step`]: what
//!   every mode shares; [`sync::per_param`]: gather-scatter/all-reduce per parameter;
//!   [`sync::ddp`] (also `dtrain::ddp`): bucketed, overlapped DDP.
//! - [`checkpoint`]: save/resume/init checkpoints; [`hash`]: the one FNV-1a digest.
//! - [`memory`]: bounds on every flag that sizes memory; [`slurm`]: rank 0's address from a
//!   Slurm job's node list.
//! - [`launch`]: `dtrain launch`; [`bench_cmd`]: `dtrain bench`; [`plot`]: `dtrain plot`;
//!   [`eval_cmd`]: `dtrain eval`.

pub mod args;
pub mod bench_cmd;
pub mod checkpoint;
pub mod command;
pub mod config;
pub mod data;
pub mod error_file;
pub mod eval_cmd;
pub mod hash;
pub mod launch;
pub mod memory;
pub mod model;
pub mod plot;
pub mod recipe;
pub mod simulate;
pub mod slurm;
pub mod sync;
pub mod train;
pub mod usage;

/// DDP is one of the sync modes; `dtrain::ddp` is its old path.
pub use sync::ddp;
