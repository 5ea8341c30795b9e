//! dtrain's collective transport: rendezvous, shared-memory and TCP backends, collectives.
//!
//! Knows nothing of tensors or models: it moves `bytemuck::Pod` slices and reduces
//! f32/f64/i64 and 16-bit floats ([`Bf16`], [`F16`]: summed in f32 at each step, half the
//! bytes on the wire). Layering follows gloo: *how bytes move* ([`shm`], [`tcp`]) is kept apart
//! from *algorithms* ([`algorithms`] for TCP, one small file each), and a [`Communicator`]
//! holds the peers.
//!
//! # API
//!
//! ```no_run
//! use transport::{CommConfig, Communicator, ReduceOp, TransportKind};
//! # fn main() -> transport::Result<()> {
//! let mut cfg = CommConfig::new("127.0.0.1", 29500, /* rank */ 0, /* world size */ 2);
//! cfg.transport = TransportKind::Tcp; // Auto (default): shm within a host, TCP across
//! cfg.config_hash = 0x1234;           // ranks with a different job config are rejected
//! cfg.auth_token = std::env::var("DTRAIN_AUTH_TOKEN").ok();
//! let mut comm = Communicator::connect(&cfg)?; // world size 1: local no-op, no sockets
//! let mut grads = vec![1.0f32; 1000];
//! comm.all_reduce(&mut grads, ReduceOp::Avg)?; // bitwise identical on every rank
//! // Collective buffers the transport's peers read in place (shared memory on one host):
//! let mut bucket = comm.alloc_buffer::<f32>(1000)?;
//! bucket.copy_from_slice(&grads);
//! comm.all_reduce(&mut bucket, ReduceOp::Avg)?; // zero-copy on shm, same result
//! comm.broadcast(&mut grads, 0)?;
//! comm.barrier()?;
//! // Overlap communication with compute: ops queue on a communication thread, in order.
//! let comm = comm.into_async();
//! let pending = comm.all_reduce_async(grads, ReduceOp::Sum);
//! let grads = pending.wait()?;
//! let rank = comm.run(|c| Ok(c.rank()))?; // runs after the queued ops
//! # let _ = (grads, rank); Ok(()) }
//! ```
//!
//! Collectives ([`Communicator`]): `all_reduce`, `broadcast`, `gather` (recv required at the
//! root), `scatter` (send required at the root), `all_gather`, `reduce_scatter`, `barrier`.
//! Every rank calls the same collectives in the same order with matching lengths. Wrong
//! lengths, a root `>= world_size` or a missing root buffer return
//! [`Error::InvalidArgument`] before anything is sent. Failures that involve a peer name its
//! rank (and, for timeouts and dead peers, where it is: [`PeerAt`]): [`Error::PeerDied`] (EOF/reset — a rank killed with -9 is reported within about a
//! second by every rank), [`Error::Timeout`] (a silent peer, after `timeouts.collective`),
//! [`Error::Protocol`] (garbage or mismatched collectives). After such an error the
//! communicator refuses further work. Drop the communicator before exiting: a clean drop
//! tells peers "goodbye", so a rank that finishes first is not mistaken for a dead one.
//!
//! Sum order (TCP): documented in [`algorithms::ring_allreduce`]; every all-reduce result is
//! either computed once and copied as bytes or computed in the same rank order everywhere,
//! so all ranks hold bitwise identical buffers.
//!
//! Rendezvous ([`rendezvous`]): rank 0 listens on `master_addr:master_port`, the others
//! connect with retries until `timeouts.connect`; duplicate ranks, out-of-range ranks and
//! different world sizes, config hashes or transports are rejected on every rank with a
//! message naming the problem; [`auth`] is an HMAC-SHA256 challenge-response in both
//! directions (the token never crosses the wire). Every TCP connection between ranks after
//! rendezvous proves a per-job data-plane key by HMAC challenge-response as well (see
//! [`Rendezvous::data_key`](rendezvous::Rendezvous::data_key)); strangers are refused with a
//! warning and the job goes on. Transport choice: `Tcp` → TCP full mesh;
//! `Shm` → shared memory, error unless all ranks share a host identity; `Auto` → shared
//! memory when all ranks are on one host, TCP when every host has one rank, and the
//! [`hierarchical`] backend (`"shm+tcp"`: shared memory within each host, TCP between host
//! leaders) for mixed placements. `DTRAIN_HOST_ID` overrides the host identity (see
//! [`rendezvous::host_identity`]). With `cfg.store` (a [`StoreRendezvous`]: torchrun's agent
//! store), rank 0 binds an ephemeral port instead and publishes it in that TCPStore, and the
//! same rendezvous runs against the published address (see [`store`]).
//!
//! Benchmarks: [`bench::run_sweep`] (nccl-tests style algbw/busbw rows, JSON + table).

pub mod algorithms;
pub mod auth;
pub mod backend;
pub mod bench;
pub mod buffer;
pub mod communicator;
pub mod config;
pub mod error;
pub mod hierarchical;
pub mod local;
pub mod reduce;
pub mod rendezvous;
pub mod shm;
pub mod store;
pub mod tcp;

pub use backend::{Backend, SharedMemory, Timeouts};
pub use buffer::Buffer;
pub use communicator::{AsyncCommunicator, Communicator, Pending};
pub use config::{CommConfig, StoreRendezvous, TransportKind};
pub use error::{Error, PeerAt, Result};
pub use reduce::{Bf16, DType, Element, HalfFloat, ReduceOp, F16};
pub use store::{StoreClient, StoreError, StoreServer};
