//! Reduce-scatter: each round every rank packs the next piece of each of the `n` blocks of
//! its send buffer into its stage and posts; rank r then reduces piece r from all ranks'
//! stages in rank order (`x0 ⊕ x1 ⊕ ...`) into its receive buffer and posts.

use super::copy::copy_from_peer;
use super::segment::STAGE_BYTES;
use super::ShmBackend;
use crate::reduce::{reduce_into, scale_for_avg};
use crate::{DType, ReduceOp, Result};

pub(crate) fn reduce_scatter(
    b: &mut ShmBackend,
    send: &[u8],
    recv: &mut [u8],
    dtype: DType,
    op: ReduceOp,
) -> Result<()> {
    let n = b.world_size;
    let len = recv.len();
    if n == 1 {
        recv.copy_from_slice(send);
        return Ok(());
    }
    // Bytes of each block per round: whole elements, n of them fit one stage.
    let piece = (STAGE_BYTES / n / dtype.size()).max(1) * dtype.size();
    for offset in (0..len).step_by(piece) {
        let this = piece.min(len - offset);
        let stage = b.claim_stage(true)?;
        for p in 0..n {
            let src = &send[p * len + offset..p * len + offset + this];
            // SAFETY: stage claimed for writing, not yet published; n * piece <= STAGE_BYTES.
            unsafe { b.write_stage(stage, p * piece, src) };
        }
        let published = b.post();
        b.wait_all(published)?;
        let out = &mut recv[offset..offset + this];
        let at = b.rank * piece;
        // SAFETY (both reads): every rank posted `published` after writing its stage, and
        // rewrites it only after this rank posts `consumed`.
        copy_from_peer(out, unsafe { b.read_stage(0, stage, at, this) });
        for peer in 1..n {
            reduce_into(
                out,
                unsafe { b.read_stage(peer, stage, at, this) },
                dtype,
                op,
            );
        }
        scale_for_avg(out, dtype, op, n);
        let consumed = b.post();
        b.release_stage(stage, consumed);
    }
    Ok(())
}
