//! Who is where after rendezvous: the peer table ([`PeerInfo`], [`Rendezvous`]), this machine's
//! host identity, and the addresses rank 0 and the data listeners use.

use std::net::{IpAddr, SocketAddr, TcpListener, ToSocketAddrs};

use crate::auth::DataKey;
use crate::{Error, Result};

/// What every rank knows about every rank after rendezvous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// `hostname|machine-id|boot-id`: equal strings mean the same machine (and kernel).
    pub host_id: String,
    pub pid: u32,
    pub data_addr: SocketAddr,
}

impl PeerInfo {
    pub fn hostname(&self) -> &str {
        self.host_id.split('|').next().unwrap_or("")
    }
}

pub struct Rendezvous {
    /// 32 hex characters, random per job; names shared-memory segments.
    pub job_id: String,
    pub peers: Vec<PeerInfo>,
    /// Proves membership on the data plane (see `data_plane.rs`): derived from the auth token
    /// and the job id, or drawn by rank 0 and sent in the table when there is no token.
    pub data_key: DataKey,
    /// This rank's data listener (already bound; its address is in `peers[rank]`).
    pub data_listener: TcpListener,
}

impl Rendezvous {
    pub fn all_on_one_host(&self) -> bool {
        self.peers
            .iter()
            .all(|p| p.host_id == self.peers[0].host_id)
    }
}

/// Environment variable that overrides [`host_identity`].
pub const HOST_ID_ENV: &str = "DTRAIN_HOST_ID";

/// `hostname|machine-id|boot-id` of this machine, or `<value>|DTRAIN_HOST_ID|` when the
/// environment variable `DTRAIN_HOST_ID` is set and non-empty. Ranks with equal identities
/// share memory. The override is for tests (several "hosts" on one machine) and for
/// containers that share a kernel but must not share /dev/shm: give each such group its own
/// value. It must never give two ranks on *different* machines the same value.
pub fn host_identity() -> String {
    if let Some(id) = std::env::var(HOST_ID_ENV).ok().filter(|v| !v.is_empty()) {
        return format!("{id}|{HOST_ID_ENV}|");
    }
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown-host".to_string());
    let read = |p: &str| {
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    };
    format!(
        "{hostname}|{}|{}",
        read("/etc/machine-id"),
        read("/proc/sys/kernel/random/boot_id")
    )
}

/// Where the joining ranks reach rank 0's rendezvous listener.
pub(crate) struct MasterEndpoint {
    pub(crate) addrs: Vec<SocketAddr>,
    /// `host:port` (and where it came from) for messages.
    pub(crate) label: String,
}

/// `host:port` → socket addresses; `what` names the address in errors.
pub(crate) fn resolve(what: &str, host: &str, port: u16) -> Result<Vec<SocketAddr>> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| Error::Rendezvous(format!("cannot resolve {what} {host:?}: {e}")))?
        .collect();
    if addrs.is_empty() {
        return Err(Error::Rendezvous(format!(
            "{what} {host:?} resolved to no addresses"
        )));
    }
    Ok(addrs)
}

/// This rank's data listener (the TCP mesh's), on the interface that reaches the master.
pub(crate) fn bind_data_listener(ip: IpAddr) -> Result<TcpListener> {
    TcpListener::bind((ip, 0))
        .map_err(|e| Error::io(format!("binding this rank's data listener on {ip}"), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_identity_is_stable() {
        assert_eq!(host_identity(), host_identity());
        assert!(host_identity().contains('|'));
    }
}
