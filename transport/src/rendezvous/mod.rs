//! Rendezvous: how ranks find each other and agree they belong to the same job.
//!
//! Rank 0 listens on `master_addr:master_port`; every other rank connects (retrying with
//! backoff until `timeouts.connect`) and sends a hello (rank, world size, config hash,
//! transport kind, whether it holds an auth token, a client nonce, host identity, pid, and
//! the address of the rank's own data listener — an ephemeral port on the interface it used
//! to reach the master). With an auth token, both sides prove knowledge of it (see
//! [`crate::auth`]). Rank 0 then checks the hello against its own configuration and answers
//! accept or reject; once all `world_size - 1` ranks are in, it sends everyone the peer table
//! and a random job id.
//!
//! Files: `wire.rs` (framing and encoding of the messages), `master.rs` (rank 0: accept,
//! authenticate, check, send the table; and the failure policy), `join.rs` (ranks > 0),
//! `peers.rs` (the outcome: who is where), `via_store.rs` (finding rank 0 through a TCPStore),
//! `data_plane.rs` (the handshake that authenticates every TCP connection between ranks
//! afterwards, with the data-plane key the rendezvous hands out).
//! The settings come from [`crate::config`], below both this module and the communicator.

pub(crate) mod data_plane;
mod join;
mod master;
mod peers;
mod via_store;
mod wire;

use std::time::Instant;

use crate::config::CommConfig;
use crate::Result;
pub use peers::{host_identity, PeerInfo, Rendezvous, HOST_ID_ENV};
pub use wire::PROTOCOL_VERSION;

/// Runs the rendezvous for `cfg` (world size > 1). Rank 0 serves; others join. With
/// `cfg.store`, ranks first find rank 0 through that TCPStore (see `via_store.rs`).
pub fn rendezvous(cfg: &CommConfig) -> Result<Rendezvous> {
    if let Some(store) = &cfg.store {
        return via_store::rendezvous_via_store(cfg, store);
    }
    let deadline = Instant::now() + cfg.timeouts.connect;
    let master = peers::MasterEndpoint {
        addrs: peers::resolve("master address", &cfg.master_addr, cfg.master_port)?,
        label: format!("{}:{}", cfg.master_addr, cfg.master_port),
    };
    if cfg.rank == 0 {
        let listener = master::bind_master(cfg, &master.addrs)?;
        master::serve(cfg, listener, &master.label, deadline)
    } else {
        join::join(cfg, &master, deadline)
    }
}
