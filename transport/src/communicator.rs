//! The user-facing, typed [`Communicator`] and its asynchronous wrapper.
//!
//! `Communicator::connect` runs the rendezvous, picks a backend and checks every argument
//! before any byte moves, so a wrong length or root is an `InvalidArgument` on the calling
//! rank rather than a hang or a protocol error on a peer.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::config::{CommConfig, TransportKind};
use crate::hierarchical::{host_groups, HierarchicalBackend, Placement};
use crate::local::LocalBackend;
use crate::rendezvous::{self, Rendezvous};
use crate::{Backend, Buffer, DType, Element, Error, PeerAt, ReduceOp, Result};

/// One rank's handle on the job: typed collectives over the chosen backend.
pub struct Communicator {
    backend: Box<dyn Backend>,
    transport: &'static str,
    rank: usize,
    world_size: usize,
}

fn invalid(msg: String) -> Error {
    Error::InvalidArgument(msg)
}

impl Communicator {
    /// Joins the job described by `cfg`. World size 1 gives a local no-op backend (no sockets).
    pub fn connect(cfg: &CommConfig) -> Result<Communicator> {
        if cfg.world_size == 0 {
            return Err(invalid("world size must be at least 1".into()));
        }
        if cfg.rank >= cfg.world_size {
            return Err(invalid(format!(
                "rank {} is out of range for world size {} (ranks are 0..{})",
                cfg.rank,
                cfg.world_size,
                cfg.world_size - 1
            )));
        }
        if cfg.world_size == 1 {
            return Ok(Communicator::from_backend(Box::new(LocalBackend), "local"));
        }
        let rv = rendezvous::rendezvous(cfg)?;
        let use_shm = match cfg.transport {
            TransportKind::Tcp => false,
            TransportKind::Shm => {
                if let Some(other) = rv
                    .peers
                    .iter()
                    .position(|p| p.host_id != rv.peers[0].host_id)
                {
                    return Err(Error::ConfigMismatch(format!(
                        "transport shm needs all ranks on one host, but rank 0 runs on {} and rank {other} on {} — use --transport tcp or auto",
                        rv.peers[0].hostname(),
                        rv.peers[other].hostname()
                    )));
                }
                true
            }
            TransportKind::Auto => rv.all_on_one_host(),
        };
        if use_shm {
            connect_shm(cfg, rv)
        } else if cfg.transport == TransportKind::Auto
            && Placement::new(host_groups(&rv.peers)).is_mixed()
        {
            // Several hosts, several ranks on some host: shm within hosts, TCP between them.
            let backend = HierarchicalBackend::connect(cfg.rank, rv, &cfg.timeouts)?;
            Ok(Communicator::from_backend(Box::new(backend), "shm+tcp"))
        } else {
            connect_tcp(cfg, rv)
        }
    }

    /// Wraps an already-built backend (tests, benchmarks, other transports).
    pub fn from_backend(backend: Box<dyn Backend>, transport: &'static str) -> Communicator {
        let (rank, world_size) = (backend.rank(), backend.world_size());
        Communicator {
            backend,
            transport,
            rank,
            world_size,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    /// `"local"`, `"shm"`, `"tcp"` or `"shm+tcp"` (hierarchical).
    pub fn transport_name(&self) -> &'static str {
        self.transport
    }

    fn check_root(&self, what: &str, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(invalid(format!(
                "{what}: root {root} is out of range for world size {}",
                self.world_size
            )));
        }
        Ok(())
    }

    /// `whole` must hold exactly `world_size` blocks of `block` elements.
    fn check_blocks(
        &self,
        what: &str,
        (whole_name, whole): (&str, usize),
        (block_name, block): (&str, usize),
    ) -> Result<()> {
        if whole != block * self.world_size {
            return Err(invalid(format!(
                "{what}: {whole_name} has {whole} elements, expected world_size ({}) x {block_name} ({block}) = {}",
                self.world_size,
                block * self.world_size
            )));
        }
        Ok(())
    }

    fn check_reducible<T: Element>(what: &str) -> Result<()> {
        if T::DTYPE == DType::U8 {
            return Err(invalid(format!(
                "{what}: u8 buffers can be moved but not reduced"
            )));
        }
        Ok(())
    }

    /// In place on every rank. Results are bitwise identical on all ranks.
    pub fn all_reduce<T: Element>(&mut self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        Self::check_reducible::<T>("all_reduce")?;
        self.backend
            .all_reduce(bytemuck::cast_slice_mut(buf), T::DTYPE, op)
    }

    /// Collective (every rank, same `len`, same order): a zeroed buffer that the transport's
    /// peers read in place when it can (shared memory), ordinary memory otherwise. Collectives
    /// on it skip the copy into the transport's staging area (see [`Buffer`]).
    pub fn alloc_buffer<T: Element>(&mut self, len: usize) -> Result<Buffer<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| invalid(format!("alloc_buffer: {len} elements overflow")))?;
        Ok(match self.backend.alloc_shared(bytes)? {
            Some(mem) => Buffer::shared(mem, len),
            None => Buffer::heap(len),
        })
    }

    /// Copies `root`'s `buf` into every rank's `buf` (same length everywhere).
    pub fn broadcast<T: Element>(&mut self, buf: &mut [T], root: usize) -> Result<()> {
        self.check_root("broadcast", root)?;
        self.backend.broadcast(bytemuck::cast_slice_mut(buf), root)
    }

    /// `recv` (required at the root, ignored elsewhere) gets `world_size` blocks of
    /// `send.len()`, block `i` from rank `i`.
    pub fn gather<T: Element>(
        &mut self,
        send: &[T],
        recv: Option<&mut [T]>,
        root: usize,
    ) -> Result<()> {
        self.check_root("gather", root)?;
        let recv = if self.rank == root {
            let recv = recv.ok_or_else(|| {
                invalid(format!(
                    "gather: rank {root} is the root and must pass a recv buffer"
                ))
            })?;
            self.check_blocks("gather", ("recv", recv.len()), ("send", send.len()))?;
            Some(bytemuck::cast_slice_mut(recv))
        } else {
            None
        };
        self.backend.gather(bytemuck::cast_slice(send), recv, root)
    }

    /// `send` (required at the root, ignored elsewhere) holds `world_size` blocks of
    /// `recv.len()`; rank `i` receives block `i`.
    pub fn scatter<T: Element>(
        &mut self,
        send: Option<&[T]>,
        recv: &mut [T],
        root: usize,
    ) -> Result<()> {
        self.check_root("scatter", root)?;
        let send = if self.rank == root {
            let send = send.ok_or_else(|| {
                invalid(format!(
                    "scatter: rank {root} is the root and must pass a send buffer"
                ))
            })?;
            self.check_blocks("scatter", ("send", send.len()), ("recv", recv.len()))?;
            Some(bytemuck::cast_slice(send))
        } else {
            None
        };
        self.backend
            .scatter(send, bytemuck::cast_slice_mut(recv), root)
    }

    /// `recv` gets `world_size` blocks of `send.len()`, block `i` from rank `i`.
    pub fn all_gather<T: Element>(&mut self, send: &[T], recv: &mut [T]) -> Result<()> {
        self.check_blocks("all_gather", ("recv", recv.len()), ("send", send.len()))?;
        self.backend
            .all_gather(bytemuck::cast_slice(send), bytemuck::cast_slice_mut(recv))
    }

    /// `send` holds `world_size` blocks of `recv.len()`; rank `i` receives the reduction of
    /// block `i` over all ranks.
    pub fn reduce_scatter<T: Element>(
        &mut self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        Self::check_reducible::<T>("reduce_scatter")?;
        self.check_blocks("reduce_scatter", ("send", send.len()), ("recv", recv.len()))?;
        self.backend.reduce_scatter(
            bytemuck::cast_slice(send),
            bytemuck::cast_slice_mut(recv),
            T::DTYPE,
            op,
        )
    }

    /// Returns once every rank has entered the barrier.
    pub fn barrier(&mut self) -> Result<()> {
        self.backend.barrier()
    }

    /// Moves this communicator onto a communication thread.
    pub fn into_async(self) -> AsyncCommunicator {
        AsyncCommunicator::new(self)
    }
}

fn connect_tcp(cfg: &CommConfig, rv: Rendezvous) -> Result<Communicator> {
    let addrs: Vec<_> = rv.peers.iter().map(|p| p.data_addr).collect();
    let backend = crate::tcp::connect_mesh(
        cfg.rank,
        &addrs,
        &rv.data_key,
        rv.data_listener,
        &cfg.timeouts,
    )?;
    Ok(Communicator::from_backend(Box::new(backend), "tcp"))
}

fn connect_shm(cfg: &CommConfig, rv: Rendezvous) -> Result<Communicator> {
    // The TCP rendezvous stays the source of truth for membership; shared memory is named
    // after its random job id so concurrent jobs on one host never collide.
    drop(rv.data_listener);
    let backend =
        crate::shm::ShmBackend::attach(&rv.job_id, cfg.rank, cfg.world_size, &cfg.timeouts)?;
    Ok(Communicator::from_backend(Box::new(backend), "shm"))
}

type Job = Box<dyn FnOnce(&mut Communicator) + Send>;

/// A [`Communicator`] owned by a communication thread. Operations queue in submission order
/// and run in that order, so every rank must submit the same sequence (as with blocking calls).
pub struct AsyncCommunicator {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    rank: usize,
    world_size: usize,
    transport: &'static str,
}

/// The result of a queued operation.
pub struct Pending<T> {
    result: mpsc::Receiver<Result<T>>,
    rank: usize,
}

impl<T> Pending<T> {
    /// Blocks until the operation has run. Bounded: the operation itself runs under the
    /// communicator's deadlines.
    pub fn wait(self) -> Result<T> {
        self.result
            .recv()
            .unwrap_or_else(|_| Err(thread_gone(self.rank)))
    }
}

fn thread_gone(rank: usize) -> Error {
    Error::PeerDied {
        rank,
        at: PeerAt::Unknown,
        what: "async operation".into(),
        detail: "this rank's communication thread exited (a queued operation panicked)".into(),
    }
}

impl AsyncCommunicator {
    fn new(comm: Communicator) -> AsyncCommunicator {
        let (rank, world_size, transport) = (comm.rank, comm.world_size, comm.transport);
        let (tx, rx) = mpsc::channel::<Job>();
        let thread = std::thread::Builder::new()
            .name(format!("dtrain-comm-{rank}"))
            .spawn(move || {
                let mut comm = comm;
                for job in rx {
                    job(&mut comm);
                }
            })
            .expect("spawning the communication thread");
        AsyncCommunicator {
            jobs: Some(tx),
            thread: Some(thread),
            rank,
            world_size,
            transport,
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    pub fn transport_name(&self) -> &'static str {
        self.transport
    }

    fn submit<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Communicator) -> Result<R> + Send + 'static,
    ) -> Pending<R> {
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move |comm| {
            let _ = tx.send(f(comm));
        });
        if let Some(jobs) = &self.jobs {
            // A send error means the thread is gone; `wait` reports that.
            let _ = jobs.send(job);
        }
        Pending {
            result: rx,
            rank: self.rank,
        }
    }

    /// Starts an all-reduce of `buf` (a `Vec<T>` or a [`Buffer<T>`]) now; `wait` returns the
    /// reduced buffer.
    pub fn all_reduce_async<T: Element, B: AsMut<[T]> + Send + 'static>(
        &self,
        buf: B,
        op: ReduceOp,
    ) -> Pending<B> {
        self.submit(move |comm| {
            let mut buf = buf;
            comm.all_reduce(buf.as_mut(), op)?;
            Ok(buf)
        })
    }

    /// Starts a broadcast of `buf` from `root` now; `wait` returns the buffer holding
    /// `root`'s data.
    pub fn broadcast_async<T: Element, B: AsMut<[T]> + Send + 'static>(
        &self,
        buf: B,
        root: usize,
    ) -> Pending<B> {
        self.submit(move |comm| {
            let mut buf = buf;
            comm.broadcast(buf.as_mut(), root)?;
            Ok(buf)
        })
    }

    /// [`Communicator::alloc_buffer`] on the communication thread (after queued operations).
    pub fn alloc_buffer<T: Element>(&self, len: usize) -> Result<Buffer<T>> {
        self.run(move |comm| comm.alloc_buffer(len))
    }

    /// Runs `f` on the communication thread after all queued operations, and waits for it.
    pub fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Communicator) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        self.submit(f).wait()
    }
}

impl Drop for AsyncCommunicator {
    fn drop(&mut self) {
        drop(self.jobs.take()); // Ends the thread's loop once queued work is done.
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
