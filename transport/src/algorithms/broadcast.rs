//! Broadcast: direct sends from the root (small buffers), or a pipelined chain (large).
//!
//! The chain runs over ranks in order starting at the root (`root, root+1, ...`, mod n);
//! each rank forwards piece `j` to the next rank while receiving piece `j + 1`, so every link
//! carries the buffer once and the root sends it only once.

use std::ops::Range;

use super::{piece, Pipeline, PointToPoint};
use crate::Result;

pub fn direct_broadcast<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    root: usize,
) -> Result<()> {
    let n = p2p.world_size();
    let r = p2p.rank();
    if r == root {
        for k in 1..n {
            p2p.send((root + k) % n, buf)?;
        }
        Ok(())
    } else {
        p2p.recv(root, buf)
    }
}

pub fn chain_broadcast<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    root: usize,
    piece_bytes: usize,
) -> Result<()> {
    let n = p2p.world_size();
    let r = p2p.rank();
    if n == 1 {
        return Ok(());
    }
    let position = (r + n - root) % n;
    let pieces = buf.len().div_ceil(piece_bytes.max(1)).max(1);
    let mut plan = ChainPlan {
        whole: 0..buf.len(),
        buf,
        pieces,
        receives: position != 0,
        forwards: position != n - 1,
    };
    p2p.pipeline((r + 1) % n, (r + n - 1) % n, &mut plan)
}

/// One rank's part of the chain: receive every piece from the left (unless root), forward
/// each to the right once it has arrived (unless last).
struct ChainPlan<'a> {
    buf: &'a mut [u8],
    whole: Range<usize>,
    pieces: usize,
    receives: bool,
    forwards: bool,
}

impl Pipeline for ChainPlan<'_> {
    fn sends(&self) -> usize {
        if self.forwards {
            self.pieces
        } else {
            0
        }
    }
    fn recvs(&self) -> usize {
        if self.receives {
            self.pieces
        } else {
            0
        }
    }
    fn send_after(&self, i: usize) -> usize {
        if self.receives {
            i + 1
        } else {
            0
        }
    }
    fn send_buf(&self, i: usize) -> &[u8] {
        &self.buf[piece(&self.whole, i, self.pieces, 1)]
    }
    fn recv_buf(&mut self, j: usize) -> &mut [u8] {
        &mut self.buf[piece(&self.whole, j, self.pieces, 1)]
    }
    fn received(&mut self, _j: usize) {}
}
