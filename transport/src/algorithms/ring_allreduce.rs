//! All-reduce: pipelined ring for large buffers, one-shot for small ones.
//!
//! **Ring** ([`ring_all_reduce`]): reduce-scatter then all-gather over `n` near-equal,
//! element-aligned segments, as one pipeline (see [`super::ring`] for the sum order of each
//! segment). Each rank sends and receives `2 (n-1)/n` of the buffer: bandwidth-optimal.
//! `Avg` is scaled once by the segment's owner before the all-gather.
//!
//! **Direct** ([`direct_all_reduce`]): every rank gathers all `n` buffers (a ring all-gather:
//! `n - 1` latency-bound steps instead of `2 (n - 1)`), then reduces them locally in rank
//! order `((x0 + x1) + x2) + ...`. Every rank runs the same arithmetic in the same order.
//!
//! Both paths leave bitwise identical results on every rank.

use super::{ring, split_even, PointToPoint};
use crate::reduce::{reduce_into, scale_for_avg};
use crate::{DType, ReduceOp, Result};

pub fn ring_all_reduce<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    piece_bytes: usize,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let segments = split_even(buf.len(), dtype.size(), p2p.world_size());
    ring::ring_all_reduce_in_place(p2p, buf, &segments, dtype, op, piece_bytes, scratch)
}

pub fn direct_all_reduce<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    piece_bytes: usize,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let n = p2p.world_size();
    let r = p2p.rank();
    let len = buf.len();
    scratch.clear();
    scratch.resize(n * len, 0);
    scratch[r * len..(r + 1) * len].copy_from_slice(buf);
    let blocks: Vec<_> = (0..n).map(|i| i * len..(i + 1) * len).collect();
    ring::ring_all_gather_in_place(p2p, scratch, &blocks, dtype.size(), piece_bytes)?;
    buf.copy_from_slice(&scratch[..len]);
    for block in &blocks[1..] {
        reduce_into(buf, &scratch[block.clone()], dtype, op);
    }
    scale_for_avg(buf, dtype, op, n);
    Ok(())
}
