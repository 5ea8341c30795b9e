//! Zero-copy shared-memory backend: all ranks are processes on one host and map one segment.
//!
//! **Why nix + memmap2, not the `shared_memory` crate.** `shared_memory` (0.12.4, last
//! released 2022) wraps the same `shm_open`/`mmap` calls but ties unlinking to the lifetime
//! of the creating handle ("owner unlinks on drop"), while we unlink as soon as every rank has
//! attached so even a `kill -9` leaves nothing in /dev/shm; it also depends on an older `nix`
//! (0.23, a second copy in our build). `nix` + `memmap2` are already workspace dependencies
//! and let us state every flag ourselves (`O_CREAT|O_EXCL`, mode 0600, `posix_fallocate`).
//!
//! Files: `segment` (name, layout, create/open), `futex` (cross-process wait/wake),
//! `liveness` (pid + start time), `flags` (progress counters, stage ring, waits — the
//! protocol that makes the raw copies race-free), then one file per collective.
//!
//! Lifecycle: rank 0 creates `/dev/shm/dtrain-<uid>-<job_id>` (`O_CREAT|O_EXCL`, 0600), every
//! rank maps it and registers pid + start time, rank 0 waits until all `world_size` ranks
//! are attached and unlinks the name (also when attaching fails). Dropping a backend marks
//! its rank departed, so peers still waiting on it fail at once with `PeerDied`.

mod all_gather;
mod allreduce;
mod broadcast;
mod copy;
mod flags;
mod futex;
mod gather_scatter;
mod liveness;
mod reduce_scatter;
mod region;
mod segment;

use std::sync::atomic::Ordering::{AcqRel, Acquire, Relaxed, Release, SeqCst};
use std::time::{Duration, Instant};

use std::sync::{Arc, Weak};

use crate::{Backend, DType, Error, PeerAt, ReduceOp, Result, SharedMemory, Timeouts};
use region::RegionMaps;
use segment::{
    Layout, Segment, NUM_STAGES, STATE_ATTACHED, STATE_CLAIMED, STATE_DEPARTED, STATE_EMPTY,
};

pub use segment::segment_name;

/// Collectives among processes on one host through one shared segment. See the module docs.
pub struct ShmBackend {
    seg: Segment,
    rank: usize,
    world_size: usize,
    timeouts: Timeouts,
    /// Events this rank has posted (mirrors its progress counter in the segment).
    events: u32,
    /// Per stage of this rank's slot: peers stop reading it once they posted this event.
    stage_free: [u32; NUM_STAGES],
    /// Stage the next round uses (identical on all ranks).
    next_stage: usize,
    /// Name of the collective in progress, for errors.
    op: &'static str,
    /// Set after a failed collective: ranks may be at different events, so the backend can't
    /// be used again.
    broken: Option<String>,
    /// Segment name (`/dtrain-<uid>-<job>`), the prefix of shared regions' names.
    name: String,
    /// Live shared regions (an entry dies when the user drops the buffer).
    regions: Vec<Weak<RegionMaps>>,
    /// Shared-region allocations so far: the next region's id.
    regions_allocated: u32,
    /// All-reduces that ran zero-copy on shared regions (tests check the path is taken).
    zero_copy_count: u64,
}

impl ShmBackend {
    /// Joins the job `job_id` as `rank` of `world_size`. Rank 0 creates the segment; the others
    /// open it, retrying until `timeouts.connect`. Returns once all ranks are attached.
    pub fn attach(
        job_id: &str,
        rank: usize,
        world_size: usize,
        timeouts: &Timeouts,
    ) -> Result<ShmBackend> {
        if world_size == 0 || rank >= world_size {
            return Err(Error::InvalidArgument(format!(
                "rank {rank} is not in a world of size {world_size}"
            )));
        }
        if world_size > 4096 {
            return Err(Error::InvalidArgument(format!(
                "world size {world_size} is too large for the shm backend"
            )));
        }
        let name = segment_name(job_id)?;
        let layout = Layout::new(world_size);
        let deadline = Instant::now() + timeouts.connect;
        let seg = if rank == 0 {
            Segment::create(&name, layout)?
        } else {
            Segment::open(&name, layout, rank, deadline)?
        };
        let result = register_and_wait(&seg, &name, rank, deadline, timeouts.connect);
        if rank == 0 {
            // Everyone has mapped it (or attaching failed): the name is no longer needed.
            segment::unlink(&name);
        }
        result?;
        Ok(ShmBackend {
            seg,
            rank,
            world_size,
            timeouts: *timeouts,
            events: 0,
            stage_free: [0; NUM_STAGES],
            next_stage: 0,
            op: "attach",
            broken: None,
            name,
            regions: Vec::new(),
            regions_allocated: 0,
            zero_copy_count: 0,
        })
    }

    /// Runs one collective: refuses if an earlier one failed, and poisons the backend if this
    /// one fails.
    fn run<T>(
        &mut self,
        op: &'static str,
        f: impl FnOnce(&mut ShmBackend) -> Result<T>,
    ) -> Result<T> {
        if let Some(why) = &self.broken {
            return Err(Error::Shm(format!(
                "{op}: backend unusable after an earlier failure: {why}"
            )));
        }
        self.op = op;
        let result = f(self);
        if let Err(e) = &result {
            if !matches!(e, Error::InvalidArgument(_)) {
                self.broken = Some(e.to_string());
            }
        }
        result
    }
}

/// Claims this rank's entry, records pid/start time, and waits until all ranks attached,
/// failing fast if an attached peer dies meanwhile.
fn register_and_wait(
    seg: &Segment,
    name: &str,
    rank: usize,
    deadline: Instant,
    connect: Duration,
) -> Result<()> {
    let me = seg.rank_info(rank);
    let header = seg.header();
    if let Err(state) = me
        .state
        .compare_exchange(STATE_EMPTY, STATE_CLAIMED, AcqRel, Acquire)
    {
        header.failed_rank.store(rank as u32 + 1, Release);
        return Err(Error::ConfigMismatch(format!(
            "rank {rank} is already attached to /dev/shm{name} (state {state}, pid {}): two \
             processes were given the same rank",
            me.pid.load(Relaxed)
        )));
    }
    me.pid.store(std::process::id(), Relaxed);
    me.start_time.store(liveness::own_start_time(), Relaxed);
    me.heartbeat_ns.store(liveness::monotonic_ns(), Relaxed);
    me.state.store(STATE_ATTACHED, Release);
    header.attached.fetch_add(1, AcqRel);
    let world_size = seg.layout.world_size;
    let start = Instant::now();
    while header.attached.load(Acquire) as usize != world_size {
        let failed = header.failed_rank.load(Acquire);
        if failed != 0 {
            return Err(Error::ConfigMismatch(format!(
                "rank {} could not join /dev/shm{name} (configuration mismatch; see its error)",
                failed - 1
            )));
        }
        for q in 0..world_size {
            let info = seg.rank_info(q);
            if q != rank && info.state.load(Acquire) == STATE_ATTACHED {
                if let Some(reason) =
                    liveness::dead_reason(info.pid.load(Relaxed), info.start_time.load(Relaxed))
                {
                    return Err(Error::PeerDied {
                        rank: q,
                        at: PeerAt::ThisHost {
                            pid: Some(info.pid.load(Relaxed)),
                        },
                        what: "shm attach".into(),
                        detail: reason,
                    });
                }
            }
        }
        if Instant::now() >= deadline {
            let missing = (0..world_size)
                .find(|&q| seg.rank_info(q).state.load(Acquire) != STATE_ATTACHED)
                .unwrap_or(0);
            return Err(Error::Timeout {
                rank: missing,
                at: PeerAt::ThisHost { pid: None },
                what: format!("shm attach to /dev/shm{name} (rank {missing} never attached)"),
                waited: connect.max(start.elapsed()),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    // All pids are known now: make sure we can see them (same pid namespace), or liveness
    // checks would report live peers as dead.
    for q in 0..world_size {
        let info = seg.rank_info(q);
        if q != rank && info.state.load(Acquire) == STATE_ATTACHED {
            if let Some(reason) =
                liveness::dead_reason(info.pid.load(Relaxed), info.start_time.load(Relaxed))
            {
                return Err(Error::Shm(format!(
                    "rank {q} attached but is not visible from this process ({reason}); the \
                     shm backend needs all ranks in one pid namespace (use the tcp transport)"
                )));
            }
        }
    }
    Ok(())
}

impl Drop for ShmBackend {
    fn drop(&mut self) {
        // Peers still waiting on this rank fail with a clear PeerDied instead of a timeout.
        let info = self.seg.rank_info(self.rank);
        info.heartbeat_ns.store(liveness::monotonic_ns(), Relaxed);
        info.state.store(STATE_DEPARTED, SeqCst);
        futex::futex_wake_all(&self.seg.rank_sync(self.rank).progress);
    }
}

fn check_reducible(len: usize, dtype: DType) -> Result<()> {
    if dtype == DType::U8 {
        return Err(Error::InvalidArgument(
            "U8 buffers can be moved but not reduced".into(),
        ));
    }
    if !len.is_multiple_of(dtype.size()) {
        return Err(Error::InvalidArgument(format!(
            "buffer of {len} bytes is not a whole number of {dtype:?} elements"
        )));
    }
    Ok(())
}

fn check_root(root: usize, world_size: usize) -> Result<()> {
    if root >= world_size {
        return Err(Error::InvalidArgument(format!(
            "root {root} is not in a world of size {world_size}"
        )));
    }
    Ok(())
}

impl Backend for ShmBackend {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        check_reducible(buf.len(), dtype)?;
        self.run("all_reduce", |b| allreduce::all_reduce(b, buf, dtype, op))
    }

    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world_size)?;
        self.run("broadcast", |b| broadcast::broadcast(b, buf, root))
    }

    fn gather(&mut self, send: &[u8], recv: Option<&mut [u8]>, root: usize) -> Result<()> {
        check_root(root, self.world_size)?;
        let recv = match (self.rank == root, recv) {
            (true, Some(r)) if r.len() == send.len() * self.world_size => Some(r),
            (true, _) => {
                return Err(Error::InvalidArgument(format!(
                    "gather root needs a receive buffer of {} bytes",
                    send.len() * self.world_size
                )))
            }
            (false, _) => None,
        };
        self.run("gather", |b| gather_scatter::gather(b, send, recv, root))
    }

    fn scatter(&mut self, send: Option<&[u8]>, recv: &mut [u8], root: usize) -> Result<()> {
        check_root(root, self.world_size)?;
        let send = match (self.rank == root, send) {
            (true, Some(s)) if s.len() == recv.len() * self.world_size => Some(s),
            (true, _) => {
                return Err(Error::InvalidArgument(format!(
                    "scatter root needs a send buffer of {} bytes",
                    recv.len() * self.world_size
                )))
            }
            (false, _) => None,
        };
        self.run("scatter", |b| gather_scatter::scatter(b, send, recv, root))
    }

    fn all_gather(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        if recv.len() != send.len() * self.world_size {
            return Err(Error::InvalidArgument(format!(
                "all_gather needs a receive buffer of {} bytes, got {}",
                send.len() * self.world_size,
                recv.len()
            )));
        }
        self.run("all_gather", |b| all_gather::all_gather(b, send, recv))
    }

    fn reduce_scatter(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        check_reducible(recv.len(), dtype)?;
        if send.len() != recv.len() * self.world_size {
            return Err(Error::InvalidArgument(format!(
                "reduce_scatter needs a send buffer of {} bytes, got {}",
                recv.len() * self.world_size,
                send.len()
            )));
        }
        self.run("reduce_scatter", |b| {
            reduce_scatter::reduce_scatter(b, send, recv, dtype, op)
        })
    }

    fn alloc_shared(&mut self, bytes: usize) -> Result<Option<SharedMemory>> {
        let Some(region) = self.run("alloc_shared", |b| b.alloc_region(bytes))? else {
            return Ok(None);
        };
        let ptr = region.ptr(self.rank);
        let owner: Arc<dyn std::any::Any + Send + Sync> = region;
        // SAFETY: this rank's copy of the region is mapped read-write for as long as the
        // region lives (kept by `owner`), page aligned and zero-filled by ftruncate; peers
        // access it only inside a collective this rank is in, and nothing else in this
        // process touches it.
        Ok(Some(unsafe { SharedMemory::new(ptr, bytes, owner) }))
    }

    fn barrier(&mut self) -> Result<()> {
        self.run("barrier", |b| {
            if b.world_size > 1 {
                let e = b.post();
                b.wait_all(e)?;
            }
            Ok(())
        })
    }
}
