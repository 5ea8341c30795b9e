//! All-reduce over shared memory: in place in shared buffers, or through the stages.
//!
//! **Shared buffers (zero-copy).** When every rank's buffer lies in a shared region (a
//! [`crate::Buffer`] from `alloc_buffer`) at the same offset — ranks announce region, offset
//! and length in their sync block with the entry event, so all take the same decision —
//! nothing goes through the stages: rank r owns the r-th n-th of the buffer, reads those
//! bytes from every rank's copy, reduces them (`x0 ⊕ x1 ⊕ ...` in rank order, in L1 tiles)
//! and writes the result into every rank's copy. No one else touches those bytes, so there
//! is no synchronization between the entry event and a final exit event (after which every
//! copy is complete). Per rank this reads and writes `1/n` of every copy — the whole
//! buffer's worth once, the minimum — and nothing else. Measured on 2 ranks, 37 MB: 3.4–3.9
//! ms, against 5.5 ms when each rank instead pulled the others' reduced blocks after a
//! per-chunk event.
//!
//! **Small buffers (one-shot).** Every rank copies its buffer into its stage, posts, and then
//! reduces *all* stages itself: `((x0 ⊕ x1) ⊕ x2) ⊕ ...`, always in rank order, so every rank
//! computes the identical expression and gets bitwise identical results. One copy-in, one
//! synchronization.
//!
//! **Other large buffers (reduce-scatter + all-gather through the stages, chunked and
//! pipelined).** The buffer is processed in chunks of one stage. Per chunk: every rank copies
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
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use super::copy::copy_from_peer;
use super::region::RegionMaps;
use super::segment::{NUM_STAGES, STAGE_BYTES};
use super::ShmBackend;
use crate::reduce::{reduce_into, reduce_into_rev, scale_for_avg};
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
        return one_shot(b, buf, dtype, op);
    }
    match announce_region(b, buf)? {
        Some((region, offset)) => zero_copy(b, &region, offset, buf, dtype, op),
        None => pipelined_reduce_scatter_all_gather(b, buf, dtype, op),
    }
}

/// Entry event: publishes where this rank's buffer is (its input is final from here on) and
/// returns the region and offset if *every* rank's buffer is in the same region at the same
/// offset with the same length — a decision all ranks take identically from the same data.
fn announce_region(b: &mut ShmBackend, buf: &[u8]) -> Result<Option<(Arc<RegionMaps>, usize)>> {
    let found = b.find_region(buf.as_ptr(), buf.len());
    let (id, offset) = found.as_ref().map_or((0, 0), |(r, off)| (r.id + 1, *off));
    let sync = b.seg.rank_sync(b.rank);
    sync.region.store(id, Relaxed);
    sync.region_offset.store(offset as u64, Relaxed);
    sync.region_len.store(buf.len() as u64, Relaxed);
    // The post's SeqCst store publishes the three fields with it.
    let entered = b.post();
    b.wait_all(entered)?;
    let same = (0..b.world_size).all(|p| {
        let s = b.seg.rank_sync(p);
        s.region.load(Relaxed) == id
            && s.region_offset.load(Relaxed) == offset as u64
            && s.region_len.load(Relaxed) == buf.len() as u64
    });
    Ok(found.filter(|_| id != 0 && same))
}

fn zero_copy(
    b: &mut ShmBackend,
    region: &RegionMaps,
    offset: usize,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let (n, rank) = (b.world_size, b.rank);
    b.zero_copy_count += 1;
    // Rank r owns the r-th n-th of the buffer: it alone reads and writes those bytes, in
    // every rank's copy, so no rank waits for another until the end.
    let mine = block(buf.len(), n, rank);
    let at0 = mine.start;
    let peer_ptr = |p: usize, at: usize| -> *mut u8 {
        // SAFETY: every rank announced this region, offset and length, so `offset + at0 + at`
        // plus the tile length is within rank p's copy, mapped while `region` lives.
        unsafe { region.ptr(p).add(offset + at0 + at) }
    };
    let input = |p: usize, at: usize, len: usize| -> &[u8] {
        // SAFETY: in bounds (see `peer_ptr`); rank p entered the collective (its input is
        // final) and only this rank accesses block `rank` of any copy until the exit event.
        unsafe { std::slice::from_raw_parts(peer_ptr(p, at), len) }
    };
    let publish = |at: usize, tile: &[u8]| {
        for p in (0..n).filter(|&p| p != rank) {
            // SAFETY: as for `input`; the tile was read from this very place already, so
            // overwriting it with the result disturbs no one.
            unsafe { std::ptr::copy_nonoverlapping(tile.as_ptr(), peer_ptr(p, at), tile.len()) };
        }
    };
    reduce_in_rank_order((n, rank), &mut buf[mine], input, publish, dtype, op);
    // Peers write their blocks into this buffer until they post this; the caller may use the
    // buffer only after.
    let done = b.post();
    b.wait_all(done)
}

fn one_shot(b: &mut ShmBackend, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
    let stage = b.claim_stage(true)?;
    // SAFETY: stage claimed for writing, not yet published.
    unsafe { b.write_stage(stage, 0, buf) };
    let published = b.post();
    b.wait_all(published)?;
    let shape = (b.world_size, b.rank);
    // SAFETY: every rank posted `published` after writing its stage (waited for above), and
    // this rank posts the release event only after the reduction.
    let input = |p, at, len| unsafe { b.read_stage(p, stage, at, len) };
    reduce_in_rank_order(shape, buf, input, |_, _| {}, dtype, op);
    let consumed = b.post();
    b.release_stage(stage, consumed);
    Ok(())
}

/// Tiles small enough that the accumulator stays in L1.
const TILE_BYTES: usize = 4096;

/// `out = x0 ⊕ x1 ⊕ ...` in rank order, where `x_p` for a peer is `input(p, at, len)` (the
/// bytes matching `out[at..at + len]`) and this rank's own input is what `out` holds. Runs
/// in L1-sized tiles so each input is read once and the result written once (to `out`, and
/// handed to `publish(at, tile)`). Every rank evaluates the same expression in the same
/// order, so all get bitwise identical results.
fn reduce_in_rank_order<'a>(
    (n, rank): (usize, usize),
    out: &mut [u8],
    input: impl Fn(usize, usize, usize) -> &'a [u8],
    mut publish: impl FnMut(usize, &[u8]),
    dtype: DType,
    op: ReduceOp,
) {
    let mut tile = [0u8; TILE_BYTES];
    for at in (0..out.len()).step_by(TILE_BYTES) {
        let len = TILE_BYTES.min(out.len() - at);
        let own = &mut out[at..at + len];
        if rank <= 1 {
            // Fold in place: rank 0 holds x0 already; rank 1 holds x1 and folds x0 in as
            // the left operand. Saves the tile copies on the common 2-rank path.
            if rank == 1 {
                reduce_into_rev(own, input(0, at, len), dtype, op);
            }
            for p in (rank + 1).max(1)..n {
                reduce_into(own, input(p, at, len), dtype, op);
            }
            scale_for_avg(own, dtype, op, n);
            publish(at, own);
            continue;
        }
        let acc = &mut tile[..len];
        copy_from_peer(acc, input(0, at, len));
        for p in 1..n {
            let x: &[u8] = if p == rank { own } else { input(p, at, len) };
            reduce_into(acc, x, dtype, op);
        }
        scale_for_avg(acc, dtype, op, n);
        own.copy_from_slice(acc);
        publish(at, acc);
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
            let (shape, s, at0) = ((n, b.rank), stage[k], mine.start);
            let bref = &*b;
            // SAFETY (input): every rank posted `published[k]` after writing its stage and
            // rewrites it only after this rank posts its release event for chunk k.
            let input = |p, at, len| unsafe { bref.read_stage(p, s, at0 + at, len) };
            // SAFETY (publish): see the comment above.
            let publish = |at, tile: &[u8]| unsafe { bref.write_stage(s, at0 + at, tile) };
            reduce_in_rank_order(shape, &mut chunk[mine], input, publish, dtype, op);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Backend, Timeouts};

    /// Two ranks as threads: buffers from `alloc_shared` at the same offset take the zero-copy
    /// path (and give the right sums); a heap buffer on one rank makes both fall back.
    #[test]
    fn shared_regions_take_the_zero_copy_path_only_when_all_ranks_agree() {
        let job = format!("unit-zc-{}", std::process::id());
        let len = 300_000; // f32 elements: above the one-shot threshold, several chunks
        let threads: Vec<_> = (0..2)
            .map(|rank| {
                let job = job.clone();
                std::thread::spawn(move || {
                    let mut b = ShmBackend::attach(&job, rank, 2, &Timeouts::default()).unwrap();
                    let mem = b
                        .alloc_shared(len * 4)
                        .unwrap()
                        .expect("shm has shared memory");
                    let mut buf = crate::Buffer::<f32>::shared(mem, len);
                    let fill = |v: &mut [f32]| {
                        for (i, x) in v.iter_mut().enumerate() {
                            *x = (i % 1000) as f32 + rank as f32 * 0.5;
                        }
                    };
                    fill(&mut buf);
                    b.all_reduce(
                        bytemuck::cast_slice_mut(&mut buf),
                        DType::F32,
                        ReduceOp::Sum,
                    )
                    .unwrap();
                    let zero_copy = b.zero_copy_count;
                    let mut heap = vec![0f32; len];
                    fill(if rank == 0 { &mut heap } else { &mut buf });
                    let v: &mut [f32] = if rank == 0 { &mut heap } else { &mut buf };
                    b.all_reduce(bytemuck::cast_slice_mut(v), DType::F32, ReduceOp::Sum)
                        .unwrap();
                    let second: Vec<f32> = v.to_vec();
                    (zero_copy, b.zero_copy_count, buf.to_vec(), second)
                })
            })
            .collect();
        for t in threads {
            let (first_count, second_count, first, second) = t.join().unwrap();
            assert_eq!((first_count, second_count), (1, 1));
            for (i, (a, b)) in first.iter().zip(&second).enumerate() {
                let want = 2.0 * (i % 1000) as f32 + 0.5;
                assert_eq!((*a, *b), (want, want), "element {i}");
            }
        }
    }
}
