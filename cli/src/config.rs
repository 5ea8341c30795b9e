//! The settings' vocabulary every module shares (names and conversions only): the `--mode`,
//! `--dataset`, `--transport`, `--grad-compression` and `--resume` values, defaults, flag
//! bounds and the launcher's environment variable names. A leaf: it imports no module of this
//! crate (the flags and `TrainConfig` are in [`crate::args`], the clap command in
//! [`crate::command`]).

use std::path::PathBuf;

use clap::ValueEnum;

/// Which collective transport to use. `Auto` uses shared memory between ranks on one host and
/// TCP between hosts (the transport decides).
pub use transport::TransportKind;

/// How gradients are synchronised between ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum Mode {
    /// One process, no communication (`--num-nodes 1`).
    Single,
    /// Rank 0 gathers all gradients, averages them and scatters the average back.
    GatherScatter,
    /// After the backward pass, all-reduce (sum) each parameter's gradient, then divide by the world size.
    #[value(name = "allreduce", alias = "all-reduce")]
    AllReduce,
    /// Bucketed all-reduce overlapped with the backward pass (like PyTorch DDP).
    Ddp,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Single => "single",
            Mode::GatherScatter => "gather-scatter",
            Mode::AllReduce => "allreduce",
            Mode::Ddp => "ddp",
        }
    }
}

/// How gradients travel between ranks (`--grad-compression`, ddp and allreduce only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum GradCompression {
    /// f32 gradients, averaged exactly as computed
    None,
    /// bfloat16 on the wire (half the bytes; f32's range, 8-bit significand)
    Bf16,
    /// IEEE half precision on the wire (half the bytes; 11-bit significand, range ±65504)
    Fp16,
}

impl GradCompression {
    pub fn name(self) -> &'static str {
        match self {
            GradCompression::None => "none",
            GradCompression::Bf16 => "bf16",
            GradCompression::Fp16 => "fp16",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, ValueEnum)]
pub enum DatasetKind {
    /// CIFAR-10 binary version, downloaded into --data-dir when absent.
    Cifar10,
    /// Deterministic, learnable CIFAR-shaped data generated from the seed.
    Synthetic,
    /// Fashion-MNIST IDX files, padded to 32x32 and replicated to 3 channels.
    FashionMnist,
}

impl DatasetKind {
    pub fn name(self) -> &'static str {
        match self {
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Synthetic => "synthetic",
            DatasetKind::FashionMnist => "fashion-mnist",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    Auto,
    Shm,
    Tcp,
}

impl From<TransportArg> for TransportKind {
    fn from(t: TransportArg) -> Self {
        match t {
            TransportArg::Auto => TransportKind::Auto,
            TransportArg::Shm => TransportKind::Shm,
            TransportArg::Tcp => TransportKind::Tcp,
        }
    }
}

pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// `--first-bucket-mb`: DDP closes a bucket once it holds this many MiB of gradients.
pub const DEFAULT_FIRST_BUCKET_MB: f64 = 1.0;
/// `--bucket-cap-mb`: DDP never merges a bucket past this many MiB (PyTorch's default).
pub const DEFAULT_BUCKET_CAP_MB: f64 = 25.0;
pub const DEFAULT_CIFAR_URL: &str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz";
pub const DEFAULT_CIFAR_MD5: &str = "c32a1d4ab5d03f1284b67883e8d87530";

/// What `--resume` names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeFrom {
    /// `--resume auto`: the newest intact file of the `--save-checkpoint` rotation, if any.
    Auto,
    /// `--resume FILE` (a file named `auto` is `./auto`).
    File(PathBuf),
}

/// Set in the environment of a rank that the launcher pinned to its own CPUs, so the rank
/// sizes its compute pool to all of them instead of sharing them with the other local ranks.
pub const BOUND_ENV: &str = "DTRAIN_BOUND_CORES";

/// `--threads` above this is refused (the compute pool would be mostly idle threads).
pub const MAX_THREADS: usize = 1024;
/// Widest conv layer a `--model` spec may ask for.
pub const MAX_CONV_WIDTH: usize = 65_536;
/// Most layers (convs and pools) a `--model` spec may have.
pub const MAX_LAYERS: usize = 256;

/// The environment variable torchrun (and `dtrain launch`) sets to the number of times the
/// job has been restarted; a rank with a count above 0 resumes as `--resume auto` does.
pub const RESTART_COUNT_ENV: &str = "TORCHELASTIC_RESTART_COUNT";
