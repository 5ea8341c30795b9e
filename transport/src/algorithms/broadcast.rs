//! Broadcast: direct sends from the root (small buffers), or a pipelined chain (large).
//!
//! The chain runs over ranks in order starting at the root (`root, root+1, ...`, mod n);
//! each rank forwards piece `j` to the next rank while receiving piece `j + 1`, so every link
//! carries the buffer once and the root sends it only once.

use super::{disjoint, piece, PointToPoint};
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
    let prev = (r + n - 1) % n;
    let next = (r + 1) % n;
    let whole = 0..buf.len();
    let pieces = buf.len().div_ceil(piece_bytes.max(1)).max(1);
    if position == 0 {
        for j in 0..pieces {
            p2p.send(next, &buf[piece(&whole, j, pieces, 1)])?;
        }
    } else if position == n - 1 {
        for j in 0..pieces {
            p2p.recv(prev, &mut buf[piece(&whole, j, pieces, 1)])?;
        }
    } else {
        p2p.recv(prev, &mut buf[piece(&whole, 0, pieces, 1)])?;
        for j in 0..pieces {
            if j + 1 < pieces {
                let (fwd, incoming) = disjoint(
                    buf,
                    piece(&whole, j, pieces, 1),
                    piece(&whole, j + 1, pieces, 1),
                );
                p2p.send_recv(next, fwd, prev, incoming)?;
            } else {
                p2p.send(next, &buf[piece(&whole, j, pieces, 1)])?;
            }
        }
    }
    Ok(())
}
