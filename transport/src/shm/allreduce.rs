//! All-reduce, reading peers' data in place in their slots.
//!
//! **Small buffers (one-shot).** Every rank copies its buffer into its stage, posts, and then
//! reduces *all* stages itself: `((x0 ⊕ x1) ⊕ x2) ⊕ ...`, always in rank order, so every rank
//! computes the identical expression and gets bitwise identical results. One copy-in, one
//! synchronization.
//!
//! **Large buffers (reduce-scatter + all-gather, chunked and pipelined).** The buffer is
//! processed in chunks of one stage. Per chunk: every rank copies
//! the blocks the *other* ranks reduce into its stage and posts; rank r reduces block r from
//! its own buffer and every peer's stage, again `x0 ⊕ x1 ⊕ ...` in rank order, writes it to
//! its buffer and into its own stage, and posts; then every rank copies the other ranks'
//! reduced blocks out of their stages. The three phases of consecutive chunks are overlapped
//! (`LAG`). Each block is computed once and copied as bytes, so results are bitwise identical
//! on all ranks and equal to the one-shot path's. `Avg` divides each reduced block before it
//! is published.
//!
//! Per rank this reads its buffer once and writes it once (the minimum), copies
//! `(n-1)/n` of it into the shared segment and reads `2(n-1)/n` of it out of peers' stages,
//! which stay in cache. Peer data is read with vector loads (see `copy.rs`). (Streaming
//! stores for the results were measured slower: the lines were just read and are cached.)

use std::ops::Range;

use super::copy::copy_from_peer;
use super::segment::{NUM_STAGES, STAGE_BYTES};
use super::ShmBackend;
use crate::reduce::{reduce_into, scale_for_avg};
use crate::{DType, ReduceOp, Result};

/// All-reduces of at most this many bytes use the one-shot path: measured on 2 ranks, one
/// synchronization beats the pipeline's three up to at least 256 KiB (11 µs vs ~40 µs at
/// 128 KiB), because each extra wait risks a reschedule.
pub const ONE_SHOT_MAX_BYTES: usize = 256 << 10;
const _: () = assert!(ONE_SHOT_MAX_BYTES <= STAGE_BYTES);

/// Bytes of the buffer per pipelined round (one stage).
const CHUNK_BYTES: usize = STAGE_BYTES;

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
    reduce_in_rank_order(b, stage, 0, buf, false, dtype, op);
    let consumed = b.post();
    b.release_stage(stage, consumed);
    Ok(())
}

/// Tiles small enough that the accumulator stays in L1.
const TILE_BYTES: usize = 4096;

/// `out = x0 ⊕ x1 ⊕ ...` in rank order, where `x_p` is `stage[p][offset..]` for peers and
/// the bytes already in `out` for this rank. Runs in L1-sized tiles so each input is read
/// once and the result written once (to `out`, and also to this rank's stage at `offset` if
/// `publish`, for the peers). Every rank evaluates the same expression in the same
/// order, so all get bitwise identical results.
fn reduce_in_rank_order(
    b: &ShmBackend,
    stage: usize,
    offset: usize,
    out: &mut [u8],
    publish: bool,
    dtype: DType,
    op: ReduceOp,
) {
    let mut tile = [0u8; TILE_BYTES];
    for at in (0..out.len()).step_by(TILE_BYTES) {
        let len = TILE_BYTES.min(out.len() - at);
        let acc = &mut tile[..len];
        for p in 0..b.world_size {
            let x: &[u8] = if p == b.rank {
                &out[at..at + len]
            } else {
                // SAFETY: every rank posted the event publishing this stage (the caller
                // waited for it) and this rank has not posted the event releasing it yet.
                unsafe { b.read_stage(p, stage, offset + at, len) }
            };
            if p == 0 {
                copy_from_peer(acc, x);
            } else {
                reduce_into(acc, x, dtype, op);
            }
        }
        scale_for_avg(acc, dtype, op, b.world_size);
        out[at..at + len].copy_from_slice(acc);
        if publish {
            // SAFETY: this part of this rank's stage is read by peers only after the next
            // post (the caller's contract), and by no one before.
            unsafe { b.write_stage(stage, offset + at, acc) };
        }
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
        .step_by(CHUNK_BYTES)
        .map(|at| at..(at + CHUNK_BYTES).min(buf.len()))
        .collect();
    let count = chunks.len();
    // Per chunk: its stage and the events that publish its input / its reduced blocks. Every
    // rank runs the same schedule, so these numbers are the same on every rank.
    let mut stage = vec![0usize; count];
    let mut published = vec![0u32; count];
    let mut reduced = vec![0u32; count];
    for step in 0..count + 2 * LAG {
        // Phase 1: publish chunk `step`, except the block this rank reduces from `buf`.
        if let Some(k) = (step < count).then_some(step) {
            stage[k] = b.claim_stage(true)?;
            let chunk = &buf[chunks[k].clone()];
            let mine = block(chunk.len(), n, b.rank);
            // SAFETY: stage claimed for writing, not yet published.
            unsafe {
                b.write_stage(stage[k], 0, &chunk[..mine.start]);
                b.write_stage(stage[k], mine.end, &chunk[mine.end..]);
            }
            published[k] = b.post();
        }
        // Phase 2: reduce-scatter chunk `step - LAG`: this rank's block from its buffer and
        // every peer's stage, in rank order, into its buffer and its own stage. Block `mine`
        // of this rank's stage is read by no one in this phase (each rank reads its own
        // block) and by peers only after the next post.
        if let Some(k) = step.checked_sub(LAG).filter(|&k| k < count) {
            b.wait_all(published[k])?;
            let chunk = &mut buf[chunks[k].clone()];
            let mine = block(chunk.len(), n, b.rank);
            reduce_in_rank_order(b, stage[k], mine.start, &mut chunk[mine], true, dtype, op);
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
                copy_from_peer(&mut chunk[theirs], src);
            }
            let consumed = b.post();
            b.release_stage(stage[k], consumed);
        }
    }
    Ok(())
}
