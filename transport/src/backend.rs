//! The byte-level interface every backend (shared memory, TCP) implements.
//!
//! Buffers are raw bytes tagged with a [`DType`]; the typed, user-facing API lives on the
//! `Communicator`, which checks arguments before calling in here. Every call is collective:
//! all ranks call it in the same order with matching sizes.

use crate::{DType, ReduceOp, Result};

pub trait Backend: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// In place; `Avg` divides by the world size at the end.
    fn all_reduce(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()>;
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()>;
    /// `recv` (root only) is `world_size * send.len()` bytes, rank-major.
    fn gather(&mut self, send: &[u8], recv: Option<&mut [u8]>, root: usize) -> Result<()>;
    /// `send` (root only) is `world_size * recv.len()` bytes, rank-major.
    fn scatter(&mut self, send: Option<&[u8]>, recv: &mut [u8], root: usize) -> Result<()>;
    /// `recv` is `world_size * send.len()` bytes, rank-major.
    fn all_gather(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()>;
    /// `send` is `world_size * recv.len()` bytes; rank r receives the reduction of block r.
    fn reduce_scatter(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()>;
    fn barrier(&mut self) -> Result<()>;
}

/// Deadlines every backend honours. No wait in this crate is unbounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Rendezvous: how long ranks retry connecting to the master / attaching to shared memory.
    pub connect: std::time::Duration,
    /// A single collective may block at most this long waiting for a peer that is alive.
    pub collective: std::time::Duration,
    /// A peer that exited or was killed is detected within this time.
    pub liveness: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: std::time::Duration::from_secs(120),
            collective: std::time::Duration::from_secs(300),
            liveness: std::time::Duration::from_secs(5),
        }
    }
}
