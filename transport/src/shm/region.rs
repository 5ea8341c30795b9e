//! Shared regions: user buffers that live in shared memory, so collectives read peers' data
//! where it is instead of copying it through the stages first.
//!
//! `alloc_region` is collective: every rank asks for the same size in the same order (the
//! k-th region has id k on every rank). Each rank creates its own segment
//! `/dtrain-<uid>-<job>-r<id>-<rank>` (0600, exclusive, pages reserved), posts, maps every
//! peer's segment **read-only**, posts again, and unlinks its own name once every peer has
//! mapped it — so, as for the main segment, nothing is left in /dev/shm even after a crash
//! past this point. Only the owner writes its region; peers read it only inside a
//! collective, under the event protocol of `flags.rs`.

use std::fs::File;
use std::sync::{Arc, Weak};

use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::mman::shm_open;
use nix::sys::stat::Mode;

use super::segment::unlink;
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
    /// Start of `rank`'s copy of the region (writable only for this process's own rank).
    pub fn ptr(&self, rank: usize) -> *mut u8 {
        self.maps[rank].as_mut_ptr()
    }
}

fn region_name(base: &str, id: u32, rank: usize) -> String {
    format!("{base}-r{id}-{rank}")
}

/// Creates this rank's segment of `bytes` (at least one page) and maps it read-write.
fn create(name: &str, bytes: usize) -> Result<MmapRaw> {
    let fd = shm_open(
        name,
        OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_RDWR,
        Mode::S_IRUSR | Mode::S_IWUSR,
    )
    .map_err(|e| match e {
        Errno::EEXIST => Error::Shm(format!(
            "/dev/shm{name} already exists (another job with this id, or a crashed one: remove \
             the file if no job uses it)"
        )),
        e => Error::Shm(format!("shm_open({name}): {e}")),
    })?;
    let result = (|| {
        let file = File::from(fd);
        nix::unistd::ftruncate(&file, bytes as i64)
            .map_err(|e| Error::Shm(format!("ftruncate {name}: {e}")))?;
        {
            use std::os::fd::AsRawFd;
            // Reserve the pages now: a full /dev/shm fails here, not with SIGBUS later.
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

/// Maps a peer's segment read-only, checking its size.
fn open_peer(name: &str, bytes: usize) -> Result<MmapRaw> {
    let fd = shm_open(name, OFlag::O_RDONLY, Mode::empty())
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
    MmapOptions::new()
        .map_raw_read_only(&file)
        .map_err(|e| Error::io(format!("mmap {name}"), e))
}

impl ShmBackend {
    /// Collective: allocates a region of `bytes` (rounded up to whole pages) in every rank.
    pub(crate) fn alloc_region(&mut self, bytes: usize) -> Result<Arc<RegionMaps>> {
        let bytes = bytes.max(1).div_ceil(4096) * 4096;
        let id = self.regions.len() as u32;
        let own_name = region_name(&self.name, id, self.rank);
        let own = create(&own_name, bytes)?;
        let result = (|| {
            // Event 1: every rank's segment exists. Event 2: every rank mapped all of them.
            let created = self.post();
            self.wait_all(created)?;
            let mut maps = Vec::with_capacity(self.world_size);
            for p in 0..self.world_size {
                if p == self.rank {
                    maps.push(None);
                } else {
                    maps.push(Some(open_peer(&region_name(&self.name, id, p), bytes)?));
                }
            }
            let mapped = self.post();
            self.wait_all(mapped)?;
            Ok(maps)
        })();
        unlink(&own_name);
        let mut own = Some(own);
        let maps = result?
            .into_iter()
            .map(|m| m.unwrap_or_else(|| own.take().expect("own map used once")))
            .collect();
        let region = Arc::new(RegionMaps { id, bytes, maps });
        self.regions.push(Arc::downgrade(&region));
        Ok(region)
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
