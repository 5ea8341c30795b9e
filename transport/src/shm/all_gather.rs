//! All-gather: each round every rank copies the next stage-sized piece of its block into its
//! stage and posts; then everyone copies all pieces out and posts.

use super::copy::copy_from_peer;
use super::segment::STAGE_BYTES;
use super::ShmBackend;
use crate::Result;

pub(crate) fn all_gather(b: &mut ShmBackend, send: &[u8], recv: &mut [u8]) -> Result<()> {
    let len = send.len();
    recv[b.rank * len..(b.rank + 1) * len].copy_from_slice(send);
    if b.world_size == 1 {
        return Ok(());
    }
    for offset in (0..len).step_by(STAGE_BYTES) {
        let piece = &send[offset..(offset + STAGE_BYTES).min(len)];
        let stage = b.claim_stage(true)?;
        // SAFETY: stage claimed for writing, not yet published.
        unsafe { b.write_stage(stage, 0, piece) };
        let published = b.post();
        b.wait_all(published)?;
        for peer in (0..b.world_size).filter(|&p| p != b.rank) {
            let dst = peer * len + offset;
            // SAFETY: `peer` posted `published` after writing; it rewrites this stage only
            // after this rank posts `consumed`.
            let src = unsafe { b.read_stage(peer, stage, 0, piece.len()) };
            copy_from_peer(&mut recv[dst..dst + piece.len()], src);
        }
        let consumed = b.post();
        b.release_stage(stage, consumed);
    }
    Ok(())
}
