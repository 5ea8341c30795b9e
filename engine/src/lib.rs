//! dtrain's compute engine: tensors, a tape autograd, SIMD kernels, ops, SGD and VGG models.
//!
//! The engine knows nothing of networks or processes. Every op is a pair of plain
//! `*_forward` / `*_backward` functions over flat NCHW buffers (see [`ops`]), generic over
//! [`Float`]: `f32` runs the fast SIMD kernels, `f64` runs the same op code over naive
//! reference kernels, which is what the gradient checks differentiate.
//!
//! Training API: [`vgg`] (models, with a complete usage example), [`autograd`] (the tape),
//! [`optim`] (SGD), [`schedule`] (learning-rate schedules), [`state`] (safetensors I/O), [`init`] (PyTorch default init),
//! [`parallel`] (thread counts: per model, per optimizer, or scoped), [`bf16`] (the bf16 rounding
//! and dot-product step of `--precision bf16`), [`simd`] (the SIMD level
//! every kernel runs at, `DTRAIN_SIMD`).

pub mod autograd;
pub mod bf16;
pub mod float;
pub mod gemm;
pub mod gradcheck;
pub mod init;
pub mod ops;
pub mod optim;
pub mod parallel;
pub mod schedule;
pub mod simd;
pub mod state;
pub mod tensor;
pub mod vgg;

pub use autograd::{Param, Tape, ValueId};
pub use float::Float;
pub use optim::Sgd;
pub use schedule::{LrSchedule, ScheduleKind};
pub use state::{load_tensors, save_tensors, LoadedState, NamedTensor, StateError, TensorData};
pub use tensor::Tensor;
pub use vgg::{parse_spec, LayerSpec, ModelError, StepStats, Vgg, VggConfig};
