//! dtrain's collective transport: rendezvous, shared-memory and TCP backends, collectives.
//!
//! Knows nothing of tensors or models: it moves `bytemuck::Pod` slices and reduces
//! f32/f64/i64. Layering follows gloo: *how bytes move* ([`shm`], [`tcp`]) is kept apart
//! from *algorithms* (one small file each), and a [`Communicator`] holds the peers.

pub mod backend;
pub mod error;
pub mod reduce;

pub use backend::{Backend, Timeouts};
pub use error::{Error, Result};
pub use reduce::{DType, Element, ReduceOp};
