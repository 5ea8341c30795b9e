//! Ops as plain forward/backward function pairs over flat NCHW buffers (llm.c style).
//!
//! Conventions shared by every op:
//! - Buffers are contiguous row-major: activations `[N, C, H, W]`, conv weights
//!   `[C_out, C_in, KH, KW]`, linear weights `[out, in]` (PyTorch layouts).
//! - Forward and backward functions *overwrite* their outputs (the tape sums fan-out).
//! - Generic over [`crate::Float`]: f32 is the fast path, f64 the gradient-checked path.

pub mod batchnorm;
pub mod conv;
pub mod linear;
pub mod loss;
pub mod pool;
pub mod relu;

pub use batchnorm::*;
pub use conv::*;
pub use linear::*;
pub use loss::*;
pub use pool::*;
pub use relu::*;
