//! Ring reduce-scatter, in place, pipelined.
//!
//! The buffer is cut into `n` segments (one per rank). In step `k = 0..n-1`, rank `r` sends
//! segment `(r - k - 1) mod n` to its right neighbour and receives segment `(r - k - 2) mod n`
//! from its left neighbour, adding the incoming values into its own copy. After `n - 1` steps
//! rank `r` holds the full reduction of segment `r`.
//!
//! Sum order of segment `s` (what makes results reproducible): it starts as rank `s + 1`'s
//! values and each next rank on the ring computes `own + incoming`, so
//! `x[s] + (x[s-1] + (... + (x[s+2] + x[s+1])))` (ranks mod n).
//!
//! Each step is cut into pieces of about `piece_bytes`: while this rank reduces one piece the
//! kernel is already receiving the next, and the deadlock-free `send_recv` keeps both
//! directions moving.

use std::ops::Range;

use super::{piece, piece_count, PointToPoint};
use crate::reduce::reduce_into;
use crate::{DType, ReduceOp, Result};

pub fn ring_reduce_scatter_in_place<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    segments: &[Range<usize>],
    dtype: DType,
    op: ReduceOp,
    piece_bytes: usize,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let n = p2p.world_size();
    let r = p2p.rank();
    if n == 1 {
        return Ok(());
    }
    let right = (r + 1) % n;
    let left = (r + n - 1) % n;
    let elem = dtype.size();
    let pieces = piece_count(segments, piece_bytes);
    let largest_piece = segments
        .iter()
        .map(|s| piece(s, 0, pieces, elem).len() + elem)
        .max()
        .unwrap_or(0);
    if scratch.len() < largest_piece {
        scratch.resize(largest_piece, 0);
    }
    for k in 0..n - 1 {
        let send_seg = &segments[(r + 2 * n - k - 1) % n];
        let recv_seg = &segments[(r + 2 * n - k - 2) % n];
        for j in 0..pieces {
            let send_piece = piece(send_seg, j, pieces, elem);
            let recv_piece = piece(recv_seg, j, pieces, elem);
            let incoming = &mut scratch[..recv_piece.len()];
            p2p.send_recv(right, &buf[send_piece], left, incoming)?;
            reduce_into(&mut buf[recv_piece], incoming, dtype, op);
        }
    }
    Ok(())
}
