//! Gather and scatter by direct sends to / from the root, in rank order.
//!
//! Blocks are rank-major: block `i` (of `send.len()` bytes for gather, `recv.len()` for
//! scatter) belongs to rank `i`. The caller (the `Communicator`) has checked the lengths.

use super::PointToPoint;
use crate::{Error, Result};

pub fn direct_gather<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    send: &[u8],
    recv: Option<&mut [u8]>,
    root: usize,
) -> Result<()> {
    let n = p2p.world_size();
    let r = p2p.rank();
    let len = send.len();
    if r != root {
        return p2p.send(root, send);
    }
    let recv = recv.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "gather: rank {root} is the root but passed no recv buffer"
        ))
    })?;
    recv[r * len..(r + 1) * len].copy_from_slice(send);
    for i in (0..n).filter(|&i| i != root) {
        p2p.recv(i, &mut recv[i * len..(i + 1) * len])?;
    }
    Ok(())
}

pub fn direct_scatter<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    send: Option<&[u8]>,
    recv: &mut [u8],
    root: usize,
) -> Result<()> {
    let n = p2p.world_size();
    let r = p2p.rank();
    let len = recv.len();
    if r != root {
        return p2p.recv(root, recv);
    }
    let send = send.ok_or_else(|| {
        Error::InvalidArgument(format!(
            "scatter: rank {root} is the root but passed no send buffer"
        ))
    })?;
    for i in (0..n).filter(|&i| i != root) {
        p2p.send(i, &send[i * len..(i + 1) * len])?;
    }
    recv.copy_from_slice(&send[r * len..(r + 1) * len]);
    Ok(())
}
