//! The synchronization protocol: per-rank progress counters, stage ownership, and waits.
//!
//! **Progress counters.** Every rank owns one `u32` counter in the header (`RankSync`), the
//! number of protocol *events* it has posted since attach. Every collective posts the same
//! number of events on every rank, so event numbers line up across ranks: "rank p has done
//! step k of this collective" is simply `progress[p] >= e_k`. What an event *means* may
//! depend on the role (in a broadcast, event e is "data published" on the root and "data
//! consumed" on the others); a waiter only ever waits for the role-specific meaning it
//! needs. Counters only grow (compared with wrapping arithmetic), so a slow rank can never
//! mistake an old collective's flag for the current one: generation = event number.
//!
//! **Stages.** Each rank's data slot is a ring of `NUM_STAGES` stages. Every round of every
//! collective takes the next stage on all ranks (`claim_stage`). Only the slot's owner writes
//! its stages; before it writes stage s it waits until every peer has posted the event
//! recorded in `stage_free[s]`, the event after which peers no longer read the previous
//! content (`release_stage`). Readers read a peer's stage only after that peer posted the
//! event that follows its write. Hence no byte of a slot is ever written while another
//! process reads it, which is what makes the raw copies in the collectives race-free.
//!
//! **No deadlock.** A rank waits either for an event it has posted itself already, or for
//! the *next* event from a rank that posts it after waiting only for events it has posted
//! already (a publisher: root of a broadcast/scatter, sender of a gather). So the rank with
//! the least progress is never blocked for long while everyone is alive.
//!
//! **Waiting.** Spin briefly (the peer is usually a few hundred ns away), then yield, then
//! sleep on the peer's counter with a cross-process futex. The poster only issues FUTEX_WAKE
//! when the peer's `sleepers` count is non-zero, so the fast path makes no system call. The
//! sleeper increments `sleepers` *before* re-reading the counter and the poster stores the
//! counter *before* reading `sleepers` (both SeqCst), so a wake can't be lost: either the
//! sleeper sees the new value, or the poster sees the sleeper. Sleeps are bounded so the
//! sleeper periodically checks that the awaited process is still alive.

use std::hint::spin_loop;
use std::sync::atomic::Ordering::{Acquire, Relaxed, SeqCst};
use std::time::{Duration, Instant};

use super::futex::{futex_wait, futex_wake_all};
use super::liveness::{dead_reason, monotonic_ns};
use super::segment::{NUM_STAGES, STAGE_BYTES, STATE_DEPARTED};
use super::ShmBackend;
use crate::{Error, PeerAt, Result};

/// Busy-poll this long before yielding: a peer in the same collective is usually this close.
const SPIN: Duration = Duration::from_micros(10);
/// Then `sched_yield` this long (gives the core away if anything else is runnable).
const YIELD: Duration = Duration::from_micros(100);

/// `current >= target` on a wrapping counter.
pub fn reached(current: u32, target: u32) -> bool {
    current.wrapping_sub(target) as i32 >= 0
}

impl ShmBackend {
    /// The number the next `post` will publish.
    pub(crate) fn next_event(&self) -> u32 {
        self.events.wrapping_add(1)
    }

    /// Publishes the next event: everything this rank wrote to its slot before is visible to
    /// a peer that observes the new counter value (SeqCst store ⊇ Release).
    pub(crate) fn post(&mut self) -> u32 {
        self.events = self.events.wrapping_add(1);
        let sync = self.seg.rank_sync(self.rank);
        sync.progress.store(self.events, SeqCst);
        if sync.sleepers.load(SeqCst) != 0 {
            futex_wake_all(&sync.progress);
        }
        self.events
    }

    /// Waits until every peer has posted event `target`.
    pub(crate) fn wait_all(&self, target: u32) -> Result<()> {
        for peer in 0..self.world_size {
            if peer != self.rank {
                self.wait_for(peer, target)?;
            }
        }
        Ok(())
    }

    /// Takes the next stage of the ring (same index on every rank). A rank that will write
    /// its own stage first waits until all peers are done reading its previous content.
    pub(crate) fn claim_stage(&mut self, will_write: bool) -> Result<usize> {
        let stage = self.next_stage;
        self.next_stage = (stage + 1) % NUM_STAGES;
        if will_write {
            self.wait_all(self.stage_free[stage])?;
        }
        Ok(stage)
    }

    /// Peers no longer read `stage` of this rank's slot once they have posted `event`.
    pub(crate) fn release_stage(&mut self, stage: usize, event: u32) {
        self.stage_free[stage] = event;
    }

    /// Copies `src` into this rank's `stage` at `offset`.
    ///
    /// # Safety
    /// This rank claimed `stage` with `will_write = true` in the current round and has not
    /// yet posted the event that publishes it (so no peer reads it).
    pub(crate) unsafe fn write_stage(&self, stage: usize, offset: usize, src: &[u8]) {
        assert!(offset + src.len() <= STAGE_BYTES);
        let dst = self.seg.stage_ptr(self.rank, stage).add(offset);
        std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len());
    }

    /// `len` bytes of `rank`'s `stage` at `offset`.
    ///
    /// # Safety
    /// `rank` posted the event that publishes this content, and this rank has not yet posted
    /// the event that lets `rank` overwrite it (its `release_stage` event); the slice must
    /// not be used after that post. For `rank == self.rank`: no peer may write it (true by
    /// construction: only the owner writes its slot).
    pub(crate) unsafe fn read_stage(
        &self,
        rank: usize,
        stage: usize,
        offset: usize,
        len: usize,
    ) -> &[u8] {
        assert!(offset + len <= STAGE_BYTES);
        std::slice::from_raw_parts(self.seg.stage_ptr(rank, stage).add(offset), len)
    }

    /// Waits until `peer` has posted event `target`, or fails naming it: `PeerDied` if it (or
    /// any rank that has not reached `target` yet) exited or left, `Timeout` after
    /// `timeouts.collective`.
    pub(crate) fn wait_for(&self, peer: usize, target: u32) -> Result<()> {
        let sync = self.seg.rank_sync(peer);
        if reached(sync.progress.load(Acquire), target) {
            return Ok(());
        }
        let start = Instant::now();
        // Phase 1: spin, then yield.
        loop {
            for _ in 0..64 {
                spin_loop();
                if reached(sync.progress.load(Acquire), target) {
                    return Ok(());
                }
            }
            let spent = start.elapsed();
            if spent >= SPIN + YIELD {
                break;
            }
            if spent >= SPIN {
                std::thread::yield_now();
            }
        }
        // Phase 2: sleep on the peer's counter, checking liveness every `interval`.
        let deadline = start + self.timeouts.collective;
        let interval =
            (self.timeouts.liveness / 5).clamp(Duration::from_millis(1), Duration::from_secs(1));
        // The first /proc check comes one interval in: most slow waits end sooner.
        let mut next_check = start + interval;
        loop {
            let now = Instant::now();
            if self.seg.rank_info(peer).state.load(Acquire) == STATE_DEPARTED || now >= next_check {
                self.check_peers(peer, target)?;
                self.seg
                    .rank_info(self.rank)
                    .heartbeat_ns
                    .store(monotonic_ns(), Relaxed);
                next_check = now + interval;
            }
            if now >= deadline {
                let at = sync.progress.load(Acquire);
                let age_ms = monotonic_ns()
                    .saturating_sub(self.seg.rank_info(peer).heartbeat_ns.load(Relaxed))
                    / 1_000_000;
                return Err(Error::Timeout {
                    rank: peer,
                    at: self.peer_at(peer),
                    what: format!(
                        "{} (shm: rank {peer} is at event {at}, this rank needs event {target}; \
                         its last heartbeat was {age_ms} ms ago)",
                        self.op
                    ),
                    waited: now - start,
                });
            }
            sync.sleepers.fetch_add(1, SeqCst);
            let current = sync.progress.load(SeqCst);
            if !reached(current, target) {
                let until = next_check.min(deadline);
                futex_wait(
                    &sync.progress,
                    current,
                    until.saturating_duration_since(now),
                );
            }
            sync.sleepers.fetch_sub(1, SeqCst);
            if reached(sync.progress.load(Acquire), target) {
                return Ok(());
            }
        }
    }

    /// A peer of this segment, by its pid (0 until it attached: then just "this host").
    fn peer_at(&self, peer: usize) -> PeerAt {
        let pid = self.seg.rank_info(peer).pid.load(Relaxed);
        PeerAt::ThisHost {
            pid: (pid != 0).then_some(pid),
        }
    }

    /// Fails if `awaited`, or any other rank that has not yet posted `target` (and so has not
    /// finished the current collective), left the job or died.
    fn check_peers(&self, awaited: usize, target: u32) -> Result<()> {
        let order = std::iter::once(awaited).chain((0..self.world_size).filter(|&q| q != awaited));
        for q in order {
            if q == self.rank || reached(self.seg.rank_sync(q).progress.load(Acquire), target) {
                continue;
            }
            let info = self.seg.rank_info(q);
            let died = |detail: String| Error::PeerDied {
                rank: q,
                at: self.peer_at(q),
                what: self.op.to_string(),
                detail,
            };
            if info.state.load(Acquire) == STATE_DEPARTED {
                let at = self.seg.rank_sync(q).progress.load(Acquire);
                return Err(died(format!(
                    "it left the job (dropped its shm backend) at event {at}; this rank needs event {target}"
                )));
            }
            let pid = info.pid.load(Relaxed);
            if let Some(reason) = dead_reason(pid, info.start_time.load(Relaxed)) {
                return Err(died(reason));
            }
        }
        Ok(())
    }
}
