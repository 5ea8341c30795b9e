//! Ring all-gather, in place, pipelined.
//!
//! Rank `r` starts owning segment `r`. In step `k = 0..n-1` it sends segment `(r - k) mod n`
//! to its right neighbour and receives segment `(r - k - 1) mod n` from its left neighbour
//! straight into its place in the buffer (no extra copy). Bytes are forwarded unchanged, so
//! every rank ends with bitwise identical buffers.

use std::ops::Range;

use super::{disjoint, piece, piece_count, PointToPoint};
use crate::Result;

pub fn ring_all_gather_in_place<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    segments: &[Range<usize>],
    elem: usize,
    piece_bytes: usize,
) -> Result<()> {
    let n = p2p.world_size();
    let r = p2p.rank();
    if n == 1 {
        return Ok(());
    }
    let right = (r + 1) % n;
    let left = (r + n - 1) % n;
    let pieces = piece_count(segments, piece_bytes);
    for k in 0..n - 1 {
        let send_seg = &segments[(r + n - k) % n];
        let recv_seg = &segments[(r + 2 * n - k - 1) % n];
        for j in 0..pieces {
            let (send, recv) = disjoint(
                buf,
                piece(send_seg, j, pieces, elem),
                piece(recv_seg, j, pieces, elem),
            );
            p2p.send_recv(right, send, left, recv)?;
        }
    }
    Ok(())
}
