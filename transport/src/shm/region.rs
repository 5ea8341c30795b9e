//! Shared regions: user buffers that live in shared memory, so collectives read peers' data
//! where it is instead of copying it through the stages first.
//!
//! `alloc_region` is collective: every rank asks for the same size in the same order (the
//! k-th region has id k on every rank). Each rank creates its own segment
//! `/dtrain-<uid>-<job>-r<id>-<rank>` (0600, exclusive, pages reserved), posts, maps every
//! peer's segment, posts again, and unlinks its own name once every peer has mapped it — so,
//! as for the main segment, nothing is left in /dev/shm even after a crash past this point.
//! Peers touch a rank's region only inside a collective the rank is in, under the event
//! protocol of `flags.rs` (the all-reduce writes each reduced block into every copy).

use std::fs::File;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use memmap2::MmapRaw;
use nix::fcntl::OFlag;
use nix::sys::mman::shm_open;
use nix::sys::stat::Mode;

use super::segment::{create_mapped, unlink};
use super::ShmBackend;
use crate::{Error, Result};

/// Every rank's mapping of one region; index = rank. Kept alive by the user's buffer and,
/// during a collective, by the backend.
pub struct RegionMaps {
    pub id: u32,
    pub bytes: usize,
    maps: Vec<MmapRaw>,
}

impl RegionMaps {
    /// Start of `rank`'s copy of the region.
    pub fn ptr(&self, rank: usize) -> *mut u8 {
        self.maps[rank].as_mut_ptr()
    }
}

fn region_name(base: &str, id: u32, rank: usize) -> String {
    format!("{base}-r{id}-{rank}")
}

/// Maps a peer's segment read-write (the all-reduce writes each reduced block straight into
/// every rank's buffer), checking its size.
fn open_peer(name: &str, bytes: usize) -> Result<MmapRaw> {
    let fd = shm_open(name, OFlag::O_RDWR, Mode::empty())
        .map_err(|e| Error::Shm(format!("shm_open({name}) of a peer's region: {e}")))?;
    let file = File::from(fd);
    let size = file
        .metadata()
        .map_err(|e| Error::io(format!("fstat {name}"), e))?
        .len() as usize;
    if size != bytes {
        return Err(Error::ConfigMismatch(format!(
            "{name} has {size} bytes, this rank expects {bytes}: ranks allocated shared \
             buffers of different sizes or in a different order"
        )));
    }
    MmapRaw::map_raw(&file).map_err(|e| Error::io(format!("mmap {name}"), e))
}

impl ShmBackend {
    /// Collective: allocates a region of `bytes` (rounded up to whole pages) in every rank.
    /// `None` (on every rank) if some rank could not create its segment, e.g. a small
    /// /dev/shm: callers then use ordinary memory.
    pub(crate) fn alloc_region(&mut self, bytes: usize) -> Result<Option<Arc<RegionMaps>>> {
        let bytes = bytes.max(1).div_ceil(4096) * 4096;
        // Ids count attempts, identically on every rank (alloc is collective).
        let id = self.regions_allocated;
        self.regions_allocated += 1;
        self.regions.retain(|r| r.strong_count() > 0);
        let own_name = region_name(&self.name, id, self.rank);
        let own = create_mapped(&own_name, bytes);
        if let Err(e) = &own {
            eprintln!(
                "dtrain: rank {}: no shared buffer of {bytes} bytes ({e}); using ordinary memory",
                self.rank
            );
        }
        let sync = self.seg.rank_sync(self.rank);
        sync.region_alloc_ok.store(own.is_ok() as u32, Relaxed);
        let result = (|| {
            // Event 1: every rank tried to create its segment. Event 2: every rank mapped all
            // of them, or saw that one failed (so nobody rewrites its flag before all read it).
            let created = self.post();
            self.wait_all(created)?;
            let all_ok = (0..self.world_size)
                .all(|p| self.seg.rank_sync(p).region_alloc_ok.load(Relaxed) == 1);
            let mut maps = Vec::with_capacity(self.world_size);
            for p in 0..self.world_size {
                if p == self.rank || !all_ok {
                    maps.push(None);
                } else {
                    maps.push(Some(open_peer(&region_name(&self.name, id, p), bytes)?));
                }
            }
            let mapped = self.post();
            self.wait_all(mapped)?;
            Ok(all_ok.then_some(maps))
        })();
        unlink(&own_name);
        let (Some(maps), Ok(own)) = (result?, own) else {
            return Ok(None);
        };
        let mut own = Some(own);
        let maps = maps
            .into_iter()
            .map(|m| m.unwrap_or_else(|| own.take().expect("own map used once")))
            .collect();
        let region = Arc::new(RegionMaps { id, bytes, maps });
        self.regions.push(Arc::downgrade(&region));
        Ok(Some(region))
    }

    /// The live region whose own copy holds `len` bytes at `ptr`, with the offset there.
    pub(crate) fn find_region(
        &self,
        ptr: *const u8,
        len: usize,
    ) -> Option<(Arc<RegionMaps>, usize)> {
        let at = ptr as usize;
        self.regions.iter().find_map(|weak: &Weak<RegionMaps>| {
            let region = weak.upgrade()?;
            let start = region.ptr(self.rank) as usize;
            (at >= start && at + len <= start + region.bytes).then(|| (region.clone(), at - start))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shm::segment_name;
    use crate::{Backend, Timeouts};

    /// A rank that cannot create its segment (here: the name is taken) makes every rank get
    /// `None` — no rank is left with a half-shared buffer — and the next allocation works.
    #[test]
    fn one_failed_segment_means_no_shared_region_on_any_rank() {
        let job = format!("unit-region-{}", std::process::id());
        let blocker = region_name(&segment_name(&job).unwrap(), 0, 1);
        let fd = shm_open(
            blocker.as_str(),
            OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
            Mode::S_IRUSR | Mode::S_IWUSR,
        )
        .expect("create blocker");
        drop(fd);
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = std::sync::Mutex::new(rx);
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..2)
                .map(|rank| {
                    let (job, tx, rx) = (&job, tx.clone(), &rx);
                    s.spawn(move || {
                        let t = Timeouts::default();
                        let mut b = ShmBackend::attach(job, rank, 2, &t).unwrap();
                        let first = b.alloc_shared(10_000).unwrap().is_some();
                        // Rank 0 removes the blocker between the two allocations.
                        if rank == 0 {
                            unlink(&region_name(&b.name, 0, 1));
                            tx.send(()).unwrap();
                        } else {
                            rx.lock().unwrap().recv().unwrap();
                        }
                        b.barrier().unwrap();
                        let second = b.alloc_shared(10_000).unwrap().is_some();
                        (first, second)
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap(), (false, true));
            }
        });
        unlink(&blocker);
    }
}
