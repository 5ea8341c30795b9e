//! The shared segment: naming, creation/opening, and the layout of the mapping.
//!
//! ```text
//! offset 0              Header              (128 B: magic, version, sizes, attach counter)
//! RANKS_OFF             RankInfo[world]     (128 B each: state, pid, start time, heartbeat)
//! sync_off              RankSync[world]     (128 B each: progress counter + sleeper count)
//! data_off (4 KiB al.)  slot[world]         (slot_bytes each = NUM_STAGES * STAGE_BYTES)
//! ```
//! Every header word is an atomic, so shared references to the header structs are sound even
//! while other processes write them. Each per-rank struct has its own 128-byte block: Zen and
//! Intel prefetch cache lines in adjacent pairs, so 64 B would still share a prefetch pair.
//! Data slots are only accessed through raw pointers, under the protocol in `flags.rs`.

use std::fs::File;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use memmap2::MmapRaw;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::mman::{shm_open, shm_unlink};
use nix::sys::stat::Mode;

use crate::{Error, PeerAt, Result};

pub const MAGIC: u64 = u64::from_le_bytes(*b"DTRNSHM1");
pub const VERSION: u32 = 2;
/// One collective round moves at most this many bytes through a rank's slot.
pub const STAGE_BYTES: usize = 1 << 20;
/// Stages form a ring per slot so a rank can fill the next stage while peers still read the
/// previous ones. Per-rank data area = 4 * 1 MiB = 4 MiB. Stages of 1 MiB (rather than
/// 256 KiB) keep the per-chunk working set in L3 while needing 4x fewer synchronizations,
/// which matters when ranks share cores with other work and each wait may cost a reschedule.
pub const NUM_STAGES: usize = 4;

/// `RankInfo::state` values.
pub const STATE_EMPTY: u32 = 0;
pub const STATE_CLAIMED: u32 = 1;
pub const STATE_ATTACHED: u32 = 2;
pub const STATE_DEPARTED: u32 = 3;

#[repr(C, align(128))]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU32,
    pub world_size: AtomicU32,
    pub stage_bytes: AtomicU64,
    pub num_stages: AtomicU32,
    /// Number of ranks that have mapped the segment and registered their pid.
    pub attached: AtomicU32,
    /// 0, or 1 + the rank that found it cannot join (configuration mismatch), so the ranks
    /// waiting for it fail at once instead of at the connect timeout.
    pub failed_rank: AtomicU32,
}

#[repr(C, align(128))]
pub struct RankInfo {
    pub state: AtomicU32,
    pub pid: AtomicU32,
    /// Start time (clock ticks since boot) of `pid`, guards against pid reuse.
    pub start_time: AtomicU64,
    /// CLOCK_MONOTONIC ns at which this rank last entered a wait or attached (diagnostics).
    pub heartbeat_ns: AtomicU64,
}

#[repr(C, align(128))]
pub struct RankSync {
    /// Number of protocol events this rank has posted since attach (the futex word).
    pub progress: AtomicU32,
    /// Number of processes sleeping (or about to sleep) on `progress`.
    pub sleepers: AtomicU32,
    /// The buffer of the all-reduce this rank is in: 1 + its shared region's id (0: not in a
    /// shared region), and its byte offset and length there. Written before the entry event.
    pub region: AtomicU32,
    pub region_offset: AtomicU64,
    pub region_len: AtomicU64,
    /// 1 if this rank created its segment of the shared region being allocated.
    pub region_alloc_ok: AtomicU32,
}

const RANKS_OFF: usize = 128;
const PAGE: usize = 4096;

/// Byte offsets of everything in the mapping, a pure function of the world size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    pub world_size: usize,
    pub sync_off: usize,
    pub data_off: usize,
    pub slot_bytes: usize,
    pub total: usize,
}

impl Layout {
    pub fn new(world_size: usize) -> Layout {
        let sync_off = RANKS_OFF + world_size * std::mem::size_of::<RankInfo>();
        let header_end = sync_off + world_size * std::mem::size_of::<RankSync>();
        let data_off = header_end.div_ceil(PAGE) * PAGE;
        let slot_bytes = STAGE_BYTES * NUM_STAGES;
        Layout {
            world_size,
            sync_off,
            data_off,
            slot_bytes,
            total: data_off + world_size * slot_bytes,
        }
    }
}

/// `/dtrain-<uid>-<job_id>`: unique per user and job. `job_id` must be 1..=64 characters of
/// `[A-Za-z0-9_.-]` (it becomes a file name in /dev/shm).
pub fn segment_name(job_id: &str) -> Result<String> {
    let ok = !job_id.is_empty()
        && job_id.len() <= 64
        && job_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !ok {
        return Err(Error::InvalidArgument(format!(
            "job id {job_id:?} must be 1-64 characters of [A-Za-z0-9_.-]"
        )));
    }
    Ok(format!("/dtrain-{}-{job_id}", nix::unistd::getuid()))
}

/// Removes the name from /dev/shm (existing mappings stay valid). Missing name is fine.
pub fn unlink(name: &str) {
    let _ = shm_unlink(name);
}

/// Creates `/dev/shm<name>` exclusively (mode 0600), sizes it to `bytes`, reserves its pages
/// (so a full /dev/shm fails here with ENOSPC instead of SIGBUS later) and maps it read-write.
/// On error the name is unlinked again.
pub fn create_mapped(name: &str, bytes: usize) -> Result<MmapRaw> {
    let fd = shm_open(
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(|e| match e {
        Errno::EEXIST => Error::Shm(format!(
            "/dev/shm{name} already exists: another job with this id is running, or a \
             previous run crashed during startup (remove the file if no job uses it)"
        )),
        e => Error::Shm(format!("shm_open({name}): {e}")),
    })?;
    let result = (|| {
        let file = File::from(fd);
        nix::unistd::ftruncate(&file, bytes as i64)
            .map_err(|e| Error::Shm(format!("ftruncate {name}: {e}")))?;
        {
            use std::os::fd::AsRawFd;
            nix::fcntl::posix_fallocate(file.as_raw_fd(), 0, bytes as i64).map_err(|e| {
                Error::Shm(format!(
                    "reserving {bytes} bytes in /dev/shm for {name}: {e}"
                ))
            })?;
        }
        MmapRaw::map_raw(&file).map_err(|e| Error::io(format!("mmap {name}"), e))
    })();
    if result.is_err() {
        unlink(name);
    }
    result
}

/// A mapped segment. Dropping it unmaps; the name is unlinked separately (by rank 0).
pub struct Segment {
    map: MmapRaw,
    pub layout: Layout,
}

impl Segment {
    /// Rank 0: creates the segment exclusively (mode 0600), sizes it, reserves its pages (so a
    /// full /dev/shm fails here with ENOSPC instead of SIGBUS mid-training) and publishes the
    /// header. On error the name is unlinked again.
    pub fn create(name: &str, layout: Layout) -> Result<Segment> {
        let map = create_mapped(name, layout.total)?;
        let seg = Segment { map, layout };
        let h = seg.header();
        h.version.store(VERSION, Ordering::Relaxed);
        h.world_size
            .store(layout.world_size as u32, Ordering::Relaxed);
        h.stage_bytes.store(STAGE_BYTES as u64, Ordering::Relaxed);
        h.num_stages.store(NUM_STAGES as u32, Ordering::Relaxed);
        // Release: openers that see the magic see every field above.
        h.magic.store(MAGIC, Ordering::Release);
        Ok(seg)
    }

    /// Ranks > 0: opens the segment rank 0 creates, retrying until `deadline`, and checks it
    /// was built for the same world size and constants (on mismatch it flags `failed_rank`).
    pub fn open(name: &str, layout: Layout, rank: usize, deadline: Instant) -> Result<Segment> {
        let not_yet = || {
            if Instant::now() >= deadline {
                Err(Error::Timeout {
                    rank: 0,
                    at: PeerAt::Unknown,
                    what: format!("shm attach (waiting for rank 0 to create /dev/shm{name})"),
                    waited: Duration::ZERO,
                })
            } else {
                std::thread::sleep(Duration::from_millis(2));
                Ok(())
            }
        };
        loop {
            let fd = match shm_open(name, OFlag::O_RDWR, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    not_yet()?;
                    continue;
                }
                Err(e) => return Err(Error::Shm(format!("shm_open({name}): {e}"))),
            };
            let file = File::from(fd);
            // Rank 0 may not have sized it yet (size goes 0 -> total in one ftruncate).
            let size = loop {
                let size = file
                    .metadata()
                    .map_err(|e| Error::io(format!("fstat {name}"), e))?
                    .len() as usize;
                if size > 0 {
                    break size;
                }
                not_yet()?;
            };
            if size < RANKS_OFF {
                return Err(Error::Shm(format!("{name} is too small ({size} bytes)")));
            }
            let map = MmapRaw::map_raw(&file).map_err(|e| Error::io(format!("mmap {name}"), e))?;
            let seg = Segment { map, layout };
            // Acquire pairs with the creator's Release store of the magic.
            while seg.header().magic.load(Ordering::Acquire) != MAGIC {
                not_yet()?;
            }
            let h = seg.header();
            let give_up = |e: Error| {
                h.failed_rank.store(rank as u32 + 1, Ordering::Release);
                Err(e)
            };
            let theirs = h.world_size.load(Ordering::Relaxed) as usize;
            if theirs != layout.world_size {
                return give_up(Error::ConfigMismatch(format!(
                    "rank 0 created the shm segment for world size {theirs}, this rank expects {}",
                    layout.world_size
                )));
            }
            if h.version.load(Ordering::Relaxed) != VERSION
                || h.stage_bytes.load(Ordering::Relaxed) != STAGE_BYTES as u64
                || h.num_stages.load(Ordering::Relaxed) != NUM_STAGES as u32
                || size != layout.total
            {
                return give_up(Error::ConfigMismatch(
                    "shm segment layout differs between ranks (mixed dtrain builds?)".into(),
                ));
            }
            return Ok(seg);
        }
    }

    fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    pub fn header(&self) -> &Header {
        // SAFETY: the mapping is at least RANKS_OFF bytes (checked at create/open), page
        // aligned, and Header holds only atomics, so a shared reference is sound while other
        // processes modify it.
        unsafe { &*(self.base() as *const Header) }
    }

    pub fn rank_info(&self, rank: usize) -> &RankInfo {
        assert!(rank < self.layout.world_size);
        // SAFETY: in bounds by the layout (size verified at open), 128-aligned, atomics only.
        unsafe { &*(self.base().add(RANKS_OFF + rank * 128) as *const RankInfo) }
    }

    pub fn rank_sync(&self, rank: usize) -> &RankSync {
        assert!(rank < self.layout.world_size);
        // SAFETY: as for `rank_info`.
        unsafe { &*(self.base().add(self.layout.sync_off + rank * 128) as *const RankSync) }
    }

    /// Start of `stage` in `rank`'s slot. Accesses through it must follow the stage protocol.
    pub fn stage_ptr(&self, rank: usize, stage: usize) -> *mut u8 {
        assert!(rank < self.layout.world_size && stage < NUM_STAGES);
        // SAFETY: the offset is within the mapping (data_off + world * slot_bytes = total).
        unsafe {
            self.base()
                .add(self.layout.data_off + rank * self.layout.slot_bytes + stage * STAGE_BYTES)
        }
    }
}
