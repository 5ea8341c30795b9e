//! Ring reduce-scatter and all-gather as one pipelined message plan ([`RingPlan`]).
//!
//! The buffer is cut into `n` segments (one per rank) and each segment into the same number
//! of pieces; every message carries one piece, from rank `r` to its right neighbour.
//!
//! **Reduce-scatter**, steps `k = 0..n-1`: rank `r` sends segment `(r - k - 1) mod n` and
//! receives segment `(r - k - 2) mod n` into a one-piece scratch, then adds it into its own
//! copy (`own ⊕ incoming`). After `n - 1` steps rank `r` holds the full reduction of segment
//! `r`. Sum order of segment `s`: it starts as rank `s + 1`'s values and each next rank on the
//! ring computes `own + incoming`, so `x[s] + (x[s-1] + (... + (x[s+2] + x[s+1])))` (ranks
//! mod n).
//!
//! **All-gather**, steps `k = 0..n-1`: rank `r` sends segment `(r - k) mod n` and receives
//! segment `(r - k - 1) mod n` straight into its place in the buffer. Bytes are forwarded
//! unchanged, so every rank ends with bitwise identical buffers.
//!
//! Message `i` is piece `i mod pieces` of step `i / pieces` (all-gather steps follow the
//! reduce-scatter steps). Every send after the first step forwards the piece received one
//! step earlier, so send `i` waits only for receive `i - pieces`: piece `j` of the next step
//! leaves while piece `j + 1` of this step is still arriving, and the all-gather starts
//! before the reduce-scatter has finished.

use std::ops::Range;

use super::{piece, piece_count, Pipeline, PointToPoint};
use crate::reduce::{reduce_into, scale_for_avg};
use crate::{DType, ReduceOp, Result};

pub struct RingPlan<'a> {
    buf: &'a mut [u8],
    segments: &'a [Range<usize>],
    rank: usize,
    n: usize,
    elem: usize,
    pieces: usize,
    /// `Some` for a reduce-scatter phase.
    reduce: Option<(DType, ReduceOp)>,
    scratch: &'a mut [u8],
    rs_steps: usize,
    ag_steps: usize,
    /// `Avg` in an all-reduce: the owner scales its segment right after its last
    /// reduce-scatter step, before sending it on.
    scale_avg: bool,
}

impl<'a> RingPlan<'a> {
    /// A reduce-scatter (if `reduce` is given) and/or an all-gather of `buf`, cut into
    /// `segments` of `elem`-byte elements. `scratch` is grown to one piece when reducing.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        buf: &'a mut [u8],
        segments: &'a [Range<usize>],
        rank: usize,
        elem: usize,
        reduce: Option<(DType, ReduceOp)>,
        all_gather: bool,
        piece_bytes: usize,
        scratch: &'a mut Vec<u8>,
    ) -> RingPlan<'a> {
        let n = segments.len();
        let pieces = piece_count(segments, piece_bytes);
        let largest_piece = segments
            .iter()
            .map(|s| piece(s, 0, pieces, elem).len() + elem)
            .max()
            .unwrap_or(0);
        if reduce.is_some() && scratch.len() < largest_piece {
            scratch.resize(largest_piece, 0);
        }
        let steps = n.saturating_sub(1);
        RingPlan {
            buf,
            segments,
            rank,
            n,
            elem,
            pieces,
            reduce,
            scratch: &mut scratch[..],
            rs_steps: if reduce.is_some() { steps } else { 0 },
            ag_steps: if all_gather { steps } else { 0 },
            scale_avg: all_gather && matches!(reduce, Some((_, ReduceOp::Avg))),
        }
    }

    fn piece_of(&self, i: usize, segment_back: usize) -> Range<usize> {
        let (step, j) = (i / self.pieces, i % self.pieces);
        let (r, n) = (self.rank, self.n);
        // Reduce-scatter step k sends segment r-k-1; all-gather step k sends segment r-k.
        let back = if step < self.rs_steps {
            step + 1
        } else {
            step - self.rs_steps
        } + segment_back;
        piece(
            &self.segments[(r + 2 * n - back) % n],
            j,
            self.pieces,
            self.elem,
        )
    }

    fn is_reduce_step(&self, i: usize) -> bool {
        i / self.pieces < self.rs_steps
    }
}

impl Pipeline for RingPlan<'_> {
    fn sends(&self) -> usize {
        (self.rs_steps + self.ag_steps) * self.pieces
    }
    fn recvs(&self) -> usize {
        self.sends()
    }
    fn send_after(&self, i: usize) -> usize {
        (i + 1).saturating_sub(self.pieces)
    }
    fn send_buf(&self, i: usize) -> &[u8] {
        &self.buf[self.piece_of(i, 0)]
    }
    fn recv_buf(&mut self, j: usize) -> &mut [u8] {
        let range = self.piece_of(j, 1);
        if self.is_reduce_step(j) {
            &mut self.scratch[..range.len()]
        } else {
            &mut self.buf[range]
        }
    }
    fn received(&mut self, j: usize) {
        if !self.is_reduce_step(j) {
            return;
        }
        let Some((dtype, op)) = self.reduce else {
            return;
        };
        let range = self.piece_of(j, 1);
        let dst = &mut self.buf[range.clone()];
        reduce_into(dst, &self.scratch[..range.len()], dtype, op);
        if self.scale_avg && j / self.pieces == self.rs_steps - 1 {
            scale_for_avg(dst, dtype, op, self.n);
        }
    }
}

/// In place: afterwards this rank's segment of `buf` holds the reduction over all ranks
/// (other segments hold partial sums). `Avg` is not scaled here.
pub fn ring_reduce_scatter_in_place<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    segments: &[Range<usize>],
    dtype: DType,
    op: ReduceOp,
    piece_bytes: usize,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let r = p2p.rank();
    let mut plan = RingPlan::new(
        buf,
        segments,
        r,
        dtype.size(),
        Some((dtype, op)),
        false,
        piece_bytes,
        scratch,
    );
    run_ring(p2p, &mut plan)
}

/// In place: afterwards every segment of `buf` holds its owner's bytes.
pub fn ring_all_gather_in_place<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    segments: &[Range<usize>],
    elem: usize,
    piece_bytes: usize,
) -> Result<()> {
    let r = p2p.rank();
    let mut no_scratch = Vec::new();
    let mut plan = RingPlan::new(
        buf,
        segments,
        r,
        elem,
        None,
        true,
        piece_bytes,
        &mut no_scratch,
    );
    run_ring(p2p, &mut plan)
}

/// Reduce-scatter then all-gather in one pipeline; `Avg` is scaled by each segment's owner.
pub fn ring_all_reduce_in_place<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    segments: &[Range<usize>],
    dtype: DType,
    op: ReduceOp,
    piece_bytes: usize,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let r = p2p.rank();
    let mut plan = RingPlan::new(
        buf,
        segments,
        r,
        dtype.size(),
        Some((dtype, op)),
        true,
        piece_bytes,
        scratch,
    );
    run_ring(p2p, &mut plan)
}

fn run_ring<P: PointToPoint + ?Sized>(p2p: &mut P, plan: &mut RingPlan) -> Result<()> {
    let n = p2p.world_size();
    let r = p2p.rank();
    if n == 1 {
        return Ok(());
    }
    p2p.pipeline((r + 1) % n, (r + n - 1) % n, plan)
}
