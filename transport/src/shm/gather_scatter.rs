//! Gather and scatter through the slots, one stage-sized round at a time.
//!
//! Gather: every non-root copies its next piece into its stage and posts; the root copies all
//! pieces out and posts (event e = "published" on senders, "consumed" on the root).
//! Scatter: the root packs the next piece of every rank's block into its stage and posts; each
//! rank copies its piece out and posts.

use super::copy::copy_from_peer;
use super::segment::STAGE_BYTES;
use super::ShmBackend;
use crate::Result;

pub(crate) fn gather(
    b: &mut ShmBackend,
    send: &[u8],
    mut recv: Option<&mut [u8]>,
    root: usize,
) -> Result<()> {
    let len = send.len();
    if let Some(recv) = recv.as_deref_mut() {
        recv[root * len..(root + 1) * len].copy_from_slice(send);
    }
    if b.world_size == 1 {
        return Ok(());
    }
    for offset in (0..len).step_by(STAGE_BYTES) {
        let piece = &send[offset..(offset + STAGE_BYTES).min(len)];
        let stage = b.claim_stage(b.rank != root)?;
        match recv.as_deref_mut() {
            None => {
                // SAFETY: stage claimed for writing, not yet published.
                unsafe { b.write_stage(stage, 0, piece) };
                let e = b.post();
                b.release_stage(stage, e);
            }
            Some(recv) => {
                let e = b.next_event();
                for peer in (0..b.world_size).filter(|&p| p != root) {
                    b.wait_for(peer, e)?;
                    let dst = peer * len + offset;
                    // SAFETY: `peer` posted `e` after writing this stage; it rewrites it only
                    // after the root posts `e`.
                    let src = unsafe { b.read_stage(peer, stage, 0, piece.len()) };
                    copy_from_peer(&mut recv[dst..dst + piece.len()], src);
                }
                b.post();
            }
        }
    }
    Ok(())
}

pub(crate) fn scatter(
    b: &mut ShmBackend,
    send: Option<&[u8]>,
    recv: &mut [u8],
    root: usize,
) -> Result<()> {
    let n = b.world_size;
    let len = recv.len();
    if let Some(send) = send {
        recv.copy_from_slice(&send[root * len..(root + 1) * len]);
    }
    if n == 1 {
        return Ok(());
    }
    // Each round carries `piece` bytes of every rank's block.
    let piece = (STAGE_BYTES / n).max(1);
    for offset in (0..len).step_by(piece) {
        let this = piece.min(len - offset);
        let stage = b.claim_stage(b.rank == root)?;
        match send {
            Some(send) => {
                for peer in 0..n {
                    let src = &send[peer * len + offset..peer * len + offset + this];
                    // SAFETY: stage claimed for writing, not yet published; peer * piece +
                    // this <= n * piece <= STAGE_BYTES.
                    unsafe { b.write_stage(stage, peer * piece, src) };
                }
                let e = b.post();
                b.release_stage(stage, e);
            }
            None => {
                let e = b.next_event();
                b.wait_for(root, e)?;
                // SAFETY: the root posted `e` after writing; it rewrites the stage only after
                // every rank posted `e`.
                let src = unsafe { b.read_stage(root, stage, b.rank * piece, this) };
                copy_from_peer(&mut recv[offset..offset + this], src);
                b.post();
            }
        }
    }
    Ok(())
}
