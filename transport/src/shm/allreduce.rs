//! All-reduce, reading peers' data in place in their slots.
//!
//! **Small buffers (one-shot).** Every rank copies its buffer into its stage, posts, and then
//! reduces *all* stages itself: `((x0 ⊕ x1) ⊕ x2) ⊕ ...`, always in rank order, so every rank
//! computes the identical expression and gets bitwise identical results. One copy-in, one
//! synchronization.
//!
//! **Large buffers (reduce-scatter + all-gather, chunked and pipelined).** The buffer is
//! processed in chunks of one stage (1 MiB), so the working set stays in cache. Per chunk:
//! every rank copies its chunk into its stage and posts; rank r reduces block r of the chunk
//! from all ranks' stages, again `x0 ⊕ x1 ⊕ ...` in rank order, writes it to its buffer and
//! back into its own stage, and posts; then every rank copies the other ranks' reduced blocks
//! out of their stages. The three phases of consecutive chunks are overlapped (`LAG`). Each
//! block is computed once and copied as bytes, so results are bitwise identical on all ranks
//! and equal to the one-shot path's. `Avg` divides each reduced block before it is published.
//! (For 2 ranks a chunked one-shot variant — every rank reduces whole chunks, one sync fewer
//! per chunk — was measured at the same speed on 37 MB, ~15 ms, so the one algorithm stays.)

use std::ops::Range;

use super::segment::{NUM_STAGES, STAGE_BYTES};
use super::ShmBackend;
use crate::reduce::{reduce_into, scale_for_avg};
use crate::{DType, ReduceOp, Result};

/// All-reduces of at most this many bytes use the one-shot path: measured on 2 ranks, one
/// synchronization beats the pipeline's three up to at least 256 KiB (11 µs vs ~40 µs at
/// 128 KiB), because each extra wait risks a reschedule.
pub const ONE_SHOT_MAX_BYTES: usize = 256 << 10;
const _: () = assert!(ONE_SHOT_MAX_BYTES <= STAGE_BYTES);

pub(crate) fn all_reduce(
    b: &mut ShmBackend,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    if b.world_size == 1 || buf.is_empty() {
        return Ok(());
    }
    if buf.len() <= ONE_SHOT_MAX_BYTES {
        one_shot(b, buf, dtype, op)
    } else {
        pipelined_reduce_scatter_all_gather(b, buf, dtype, op)
    }
}

fn one_shot(b: &mut ShmBackend, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    let stage = b.claim_stage(true)?;
    // SAFETY: stage claimed for writing, not yet published.
    unsafe { b.write_stage(stage, 0, buf) };
    let published = b.post();
    b.wait_all(published)?;
    reduce_stages_in_rank_order(b, stage, 0, buf, dtype, op);
    scale_for_avg(buf, dtype, op, b.world_size);
    let consumed = b.post();
    b.release_stage(stage, consumed);
    Ok(())
}

/// `out = stage[0][offset..] ⊕ stage[1][offset..] ⊕ ...` in rank order. `out` may already hold
/// rank 0's data only if this is rank 0 (its buffer is its own input).
fn reduce_stages_in_rank_order(
    b: &ShmBackend,
    stage: usize,
    offset: usize,
    out: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) {
    let len = out.len();
    if b.rank != 0 {
        // SAFETY: every rank posted the event publishing this stage (caller waited for it)
        // and this rank has not posted the event releasing it yet.
        out.copy_from_slice(unsafe { b.read_stage(0, stage, offset, len) });
    }
    for peer in 1..b.world_size {
        // SAFETY: as above.
        let src = unsafe { b.read_stage(peer, stage, offset, len) };
        reduce_into(out, src, dtype, op);
    }
}

/// Byte range of rank `p`'s block when `len` bytes are split among `n` ranks in 64-byte
/// units (whole elements of every dtype; cache-line aligned within the stage).
pub(crate) fn block(len: usize, n: usize, p: usize) -> Range<usize> {
    const UNIT: usize = 64;
    let per_rank = len.div_ceil(UNIT).div_ceil(n) * UNIT;
    (p * per_rank).min(len)..((p + 1) * per_rank).min(len)
}

/// Chunks in flight between the three phases: chunk k is published at step k, reduced at
/// step k + LAG and gathered at step k + 2 * LAG, so a rank can run up to LAG chunks ahead of a
/// slow peer instead of idling. 2 * LAG + 1 stages are live at once (< NUM_STAGES).
const LAG: usize = 1;
const _: () = assert!(2 * LAG < NUM_STAGES);

fn pipelined_reduce_scatter_all_gather(
    b: &mut ShmBackend,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let n = b.world_size;
    let chunks: Vec<Range<usize>> = (0..buf.len())
        .step_by(STAGE_BYTES)
        .map(|at| at..(at + STAGE_BYTES).min(buf.len()))
        .collect();
    let count = chunks.len();
    // Per chunk: its stage and the events that publish its input / its reduced blocks. Every
    // rank runs the same schedule, so these numbers are the same on every rank.
    let mut stage = vec![0usize; count];
    let mut published = vec![0u32; count];
    let mut reduced = vec![0u32; count];
    for step in 0..count + 2 * LAG {
        // Phase 1: publish chunk `step`.
        if let Some(k) = (step < count).then_some(step) {
            stage[k] = b.claim_stage(true)?;
            // SAFETY: stage claimed for writing, not yet published.
            unsafe { b.write_stage(stage[k], 0, &buf[chunks[k].clone()]) };
            published[k] = b.post();
        }
        // Phase 2: reduce-scatter chunk `step - LAG`: this rank's block from every rank's
        // stage, in rank order, into its buffer and back into its own stage.
        if let Some(k) = step.checked_sub(LAG).filter(|&k| k < count) {
            b.wait_all(published[k])?;
            let chunk = &mut buf[chunks[k].clone()];
            let mine = block(chunk.len(), n, b.rank);
            let out = &mut chunk[mine.clone()];
            reduce_stages_in_rank_order(b, stage[k], mine.start, out, dtype, op);
            scale_for_avg(out, dtype, op, n);
            // SAFETY: block `mine` of this rank's stage is read by no one in this phase
            // (each rank reads its own block), and by peers only after the next post.
            unsafe { b.write_stage(stage[k], mine.start, out) };
            reduced[k] = b.post();
        }
        // Phase 3: all-gather chunk `step - 2 * LAG`: the other ranks' reduced blocks.
        if let Some(k) = step.checked_sub(2 * LAG).filter(|&k| k < count) {
            b.wait_all(reduced[k])?;
            let chunk = &mut buf[chunks[k].clone()];
            for peer in (0..n).filter(|&p| p != b.rank) {
                let theirs = block(chunk.len(), n, peer);
                // SAFETY: `peer` posted `reduced[k]` after writing its block; it rewrites this
                // stage only after this rank posts the release event below.
                let src = unsafe { b.read_stage(peer, stage[k], theirs.start, theirs.len()) };
                chunk[theirs].copy_from_slice(src);
            }
            let consumed = b.post();
            b.release_stage(stage[k], consumed);
        }
    }
    Ok(())
}
