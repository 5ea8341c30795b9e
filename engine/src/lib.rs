//! dtrain's compute engine: tensors, a tape autograd, SIMD kernels, ops, SGD and VGG models.
//!
//! The engine knows nothing of networks or processes. Every op is a pair of plain
//! `*_forward` / `*_backward` functions over flat NCHW buffers (see [`ops`]), generic over
//! [`Float`]: `f32` runs the fast SIMD kernels, `f64` runs the same op code over naive
//! reference kernels, which is what the gradient checks differentiate.

pub mod float;
pub mod gemm;
pub mod gradcheck;
pub mod ops;
pub mod parallel;

pub use float::Float;
