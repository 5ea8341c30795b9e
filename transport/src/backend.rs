//! The byte-level interface every backend (shared memory, TCP) implements.
//!
//! Buffers are raw bytes tagged with a [`DType`]; the typed, user-facing API lives on the
//! `Communicator`, which checks arguments before calling in here. Every call is collective:
//! all ranks call it in the same order with matching sizes.

use std::any::Any;
use std::ptr::NonNull;
use std::sync::Arc;

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
    /// Collective: `bytes` of zeroed memory that this backend's peers can read in place, so
    /// collectives on it skip copying into transport buffers; `None` if the backend has no
    /// such memory (the caller then uses ordinary memory).
    fn alloc_shared(&mut self, _bytes: usize) -> Result<Option<SharedMemory>> {
        Ok(None)
    }
}

/// A block of memory owned by a backend's mapping (see [`Backend::alloc_shared`]), kept
/// alive by `owner`. Peers access it only inside collectives this process takes part in.
pub struct SharedMemory {
    ptr: NonNull<u8>,
    bytes: usize,
    _owner: Arc<dyn Any + Send + Sync>,
}

// SAFETY: the memory is owned by `_owner` (Send + Sync) and this handle is its only user in
// this process; moving the handle to another thread moves that exclusive access.
unsafe impl Send for SharedMemory {}

impl SharedMemory {
    /// # Safety
    /// `ptr` is valid for reads and writes of `bytes` bytes, page aligned and zero-filled,
    /// for as long as `owner` lives; nothing else in this process accesses it, and other
    /// processes only inside collectives this process is in.
    pub unsafe fn new(ptr: *mut u8, bytes: usize, owner: Arc<dyn Any + Send + Sync>) -> Self {
        SharedMemory {
            ptr: NonNull::new(ptr).expect("shared memory pointer is null"),
            bytes,
            _owner: owner,
        }
    }

    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
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
