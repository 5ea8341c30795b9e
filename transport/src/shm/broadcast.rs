//! Broadcast: the root copies each stage-sized chunk into its slot and posts; the others copy
//! it out and post. The stage ring lets the root fill chunk k+1 while peers still read k.

use super::copy::copy_from_peer;
use super::segment::STAGE_BYTES;
use super::ShmBackend;
use crate::Result;

pub(crate) fn broadcast(b: &mut ShmBackend, buf: &mut [u8], root: usize) -> Result<()> {
    if b.world_size == 1 {
        return Ok(());
    }
    for chunk in buf.chunks_mut(STAGE_BYTES) {
        let is_root = b.rank == root;
        let stage = b.claim_stage(is_root)?;
        if is_root {
            // SAFETY: stage claimed for writing, not yet published.
            unsafe { b.write_stage(stage, 0, chunk) };
            // Event e = "published" here and "consumed" on the others.
            let e = b.post();
            b.release_stage(stage, e);
        } else {
            let e = b.next_event();
            b.wait_for(root, e)?;
            // SAFETY: the root posted `e` after writing; it rewrites the stage only after this
            // rank posts `e` too (its release event).
            copy_from_peer(chunk, unsafe { b.read_stage(root, stage, 0, chunk.len()) });
            b.post();
        }
    }
    Ok(())
}
