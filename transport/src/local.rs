//! The world-size-1 backend: every collective is a local copy (or nothing). No sockets.

use crate::{Backend, DType, ReduceOp, Result};

pub struct LocalBackend;

impl Backend for LocalBackend {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce(&mut self, _buf: &mut [u8], _dtype: DType, _op: ReduceOp) -> Result<()> {
        Ok(()) // Avg over one rank is the identity.
    }
    fn broadcast(&mut self, _buf: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }
    fn gather(&mut self, send: &[u8], recv: Option<&mut [u8]>, _root: usize) -> Result<()> {
        if let Some(recv) = recv {
            recv.copy_from_slice(send);
        }
        Ok(())
    }
    fn scatter(&mut self, send: Option<&[u8]>, recv: &mut [u8], _root: usize) -> Result<()> {
        if let Some(send) = send {
            recv.copy_from_slice(send);
        }
        Ok(())
    }
    fn all_gather(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn reduce_scatter(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        _dtype: DType,
        _op: ReduceOp,
    ) -> Result<()> {
        recv.copy_from_slice(send);
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
