//! PyTorch's TCPStore protocol: a client (to join torchrun's agent store), a small server
//! (tests, launchers), and the store-based rendezvous built on them.
//!
//! - [`StoreClient`]: `set`, `get`, `add`, `check`, `wait`, `compare_set`, each with a
//!   deadline; errors name the key and the store's address.
//! - [`StoreServer`]: the same protocol served from threads; `StoreServer::bind("127.0.0.1:0")`.
//! - [`StoreRendezvous`]: set `CommConfig::store` and rank 0 publishes its rendezvous address in
//!   the store instead of binding `master_port` (see [`crate::rendezvous`] and its `via_store.rs` for the design).
//!   [`torchelastic_store`] builds it from torchrun's worker environment.

mod client;
mod protocol;
mod server;

pub use crate::config::{torchelastic_prefix, torchelastic_store, StoreRendezvous};
pub use client::{StoreClient, StoreError, StoreResult};
pub use server::StoreServer;
