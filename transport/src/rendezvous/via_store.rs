//! Rendezvous through a TCPStore: how ranks started by torchrun find rank 0.
//!
//! torchrun's agent already listens on `MASTER_ADDR:MASTER_PORT` (its TCPStore), so rank 0
//! cannot bind that port for dtrain's own rendezvous. Instead rank 0 binds an ephemeral port
//! on every interface and publishes `address, pid, host identity` under
//! `<prefix>/rank0` with a compare-set (so a second process claiming rank 0 is an error, not
//! a silent overwrite); the other ranks wait for that key, with the connect deadline, and
//! then run dtrain's ordinary rendezvous against the published address. The store is only
//! the directory: the hello (rank, world size, config hash, transport, host identity, data
//! address, pid), the HMAC token proof and every rejection stay in [`super::master`], so
//! both ways of starting a job check exactly the same things.
//!
//! The prefix must be unique per attempt — torchrun keeps its store across worker restarts —
//! so build it with [`crate::config::torchelastic_prefix`] from `TORCHELASTIC_RUN_ID` and
//! `TORCHELASTIC_RESTART_COUNT`. torchrun restarts workers after a membership change
//! without raising the restart count, so a new rank 0 can find the key taken by the rank 0
//! of the previous round: if nothing answers at the address in that record any more (the
//! old rank 0 is gone), rank 0 replaces it by compare-set; if something does, two live
//! processes claim rank 0 and that is an error. Joining ranks that read such a stale record
//! find nobody at its address and read the key again until rank 0 has replaced it.
//!
//! Which address the others use: rank 0 publishes the local address of its own store
//! connection (the interface that routes to the store). If that is a loopback address, the
//! store runs on rank 0's host, so a rank on another host (different host identity) uses the
//! store's host name with the published port instead.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::join::join_on;
use super::master::serve;
use super::peers::{host_identity, resolve, MasterEndpoint, Rendezvous};
use crate::config::{CommConfig, StoreRendezvous};
use crate::store::{StoreClient, StoreError};
use crate::{Error, PeerAt, Result};

/// What rank 0 publishes: `v1`, its rendezvous address, pid, host identity (one per line;
/// the host identity last, as the rest of the value).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Rank0Record {
    addr: SocketAddr,
    pid: u32,
    host_id: String,
}

impl Rank0Record {
    fn encode(&self) -> Vec<u8> {
        format!("v1\n{}\n{}\n{}", self.addr, self.pid, self.host_id).into_bytes()
    }

    fn decode(bytes: &[u8]) -> std::result::Result<Rank0Record, String> {
        let text = std::str::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
        let mut parts = text.splitn(4, '\n');
        let (Some("v1"), Some(addr), Some(pid), Some(host_id)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format!("not a dtrain rank 0 record: {text:?}"));
        };
        Ok(Rank0Record {
            addr: addr.parse().map_err(|_| format!("bad address {addr:?}"))?,
            pid: pid.parse().map_err(|_| format!("bad pid {pid:?}"))?,
            host_id: host_id.to_string(),
        })
    }
}

fn store_error(e: StoreError) -> Error {
    Error::Rendezvous(e.to_string())
}

/// [`super::rendezvous`] for a `cfg` with a store.
pub(crate) fn rendezvous_via_store(
    cfg: &CommConfig,
    store: &StoreRendezvous,
) -> Result<Rendezvous> {
    let deadline = Instant::now() + cfg.timeouts.connect;
    let client =
        StoreClient::connect(&store.host, store.port, cfg.timeouts.connect).map_err(store_error)?;
    let key = format!("{}/rank0", store.prefix);
    if cfg.rank == 0 {
        serve_via_store(cfg, store, client, &key, deadline)
    } else {
        join_via_store(cfg, store, client, &key, deadline)
    }
}

/// Rank 0: bind an ephemeral port, claim the key for it (replacing a dead rank 0's record),
/// then serve the ordinary rendezvous there.
fn serve_via_store(
    cfg: &CommConfig,
    store: &StoreRendezvous,
    mut client: StoreClient,
    key: &str,
    deadline: Instant,
) -> Result<Rendezvous> {
    let local_ip = client.local_addr().map_err(store_error)?.ip();
    let any: IpAddr = match local_ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let listener = TcpListener::bind((any, 0))
        .map_err(|e| Error::io(format!("binding rank 0's rendezvous listener on {any}"), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("rendezvous listener address", e))?
        .port();
    let mine = Rank0Record {
        addr: SocketAddr::new(local_ip, port),
        pid: std::process::id(),
        host_id: host_identity(),
    };
    let mut stored = client
        .compare_set(key, b"", &mine.encode())
        .map_err(store_error)?;
    if stored != mine.encode() && is_stale(&stored, store, client.addr()) {
        stored = client
            .compare_set(key, &stored, &mine.encode())
            .map_err(store_error)?;
    }
    if stored != mine.encode() {
        let other = match Rank0Record::decode(&stored) {
            Ok(r) => format!(
                "pid {} on {} (rendezvous address {})",
                r.pid,
                r.host_id.split('|').next().unwrap_or("?"),
                r.addr
            ),
            Err(e) => e,
        };
        return Err(Error::ConfigMismatch(format!(
            "two processes claim rank 0: key {key:?} in the TCPStore at {} names {other}, \
             which is still running — every attempt needs its own key prefix \
             (TORCHELASTIC_RESTART_COUNT)",
            client.addr()
        )));
    }
    let label = format!(
        "{}, published in the TCPStore at {}",
        mine.addr,
        client.addr()
    );
    drop(client);
    serve(cfg, listener, &label, deadline)
}

/// Ranks > 0: wait for rank 0's record, then join at its address (reading the key again
/// while it names a rank 0 that is gone).
fn join_via_store(
    cfg: &CommConfig,
    store: &StoreRendezvous,
    mut client: StoreClient,
    key: &str,
    deadline: Instant,
) -> Result<Rendezvous> {
    let left = deadline.saturating_duration_since(Instant::now());
    client
        .wait(&[key], left.max(Duration::from_millis(1)))
        .map_err(|e| match e {
            StoreError::Timeout { addr, waited, .. } => Error::Timeout {
                rank: 0,
                at: PeerAt::Unknown,
                what: format!(
                    "rendezvous (rank 0 publishing its address under key {key:?} in the \
                     TCPStore at {addr}; is rank 0 running?)"
                ),
                waited,
            },
            other => store_error(other),
        })?;
    let mut backoff = Duration::from_millis(10);
    loop {
        let value = client.get(key).map_err(store_error)?;
        let record = Rank0Record::decode(&value).map_err(|e| {
            Error::Rendezvous(format!(
                "key {key:?} in the TCPStore at {}: {e}",
                client.addr()
            ))
        })?;
        let master = rank0_endpoint(&record, store, client.addr(), &host_identity())?;
        let left = deadline.saturating_duration_since(Instant::now());
        match connect_any(&master.addrs, left.min(PROBE_TIMEOUT)) {
            Ok(stream) => {
                drop(client);
                return join_on(cfg, stream, &master.label, deadline);
            }
            // A record left by the rank 0 of an earlier round (see the module docs): read
            // the key again until this round's rank 0 has replaced it.
            Err(_) if Instant::now() < deadline => {
                std::thread::sleep(backoff.min(left));
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
            Err(e) => {
                return Err(Error::Rendezvous(format!(
                    "could not reach rank 0 at {} after {:.1}s: {e} — is rank 0 running?",
                    master.label,
                    cfg.timeouts.connect.as_secs_f64()
                )))
            }
        }
    }
}

/// How long one connection attempt to a published rank 0 address may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The first of `addrs` that accepts a connection within `timeout` (each).
fn connect_any(addrs: &[SocketAddr], timeout: Duration) -> std::io::Result<TcpStream> {
    let timeout = timeout.max(Duration::from_millis(1));
    let mut last = std::io::Error::other("no address to try");
    for addr in addrs {
        match TcpStream::connect_timeout(addr, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Whether `stored` (the value of the rank 0 key) is a record whose rank 0 is gone: nothing
/// accepts connections at its address. Anything else (a live listener, garbage) is not
/// stale.
fn is_stale(stored: &[u8], store: &StoreRendezvous, store_addr: &str) -> bool {
    let Ok(record) = Rank0Record::decode(stored) else {
        return false;
    };
    match rank0_endpoint(&record, store, store_addr, &host_identity()) {
        Ok(endpoint) => connect_any(&endpoint.addrs, PROBE_TIMEOUT).is_err(),
        Err(_) => false,
    }
}

/// Where a joining rank on host `my_host` reaches the rank 0 described by `record`.
/// (`store_addr` names the store in messages.)
fn rank0_endpoint(
    record: &Rank0Record,
    store: &StoreRendezvous,
    store_addr: &str,
    my_host: &str,
) -> Result<MasterEndpoint> {
    if record.addr.ip().is_loopback() && record.host_id != my_host {
        let port = record.addr.port();
        return Ok(MasterEndpoint {
            addrs: resolve("TCPStore host", &store.host, port)?,
            label: format!(
                "{}:{port}, the store's host with rank 0's port from the TCPStore at {store_addr}",
                store.host
            ),
        });
    }
    Ok(MasterEndpoint {
        addrs: vec![record.addr],
        label: format!("{}, from the TCPStore at {store_addr}", record.addr),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank0_record_round_trips_and_rejects_garbage() {
        let r = Rank0Record {
            addr: "[::1]:4000".parse().unwrap(),
            pid: 77,
            host_id: "node|m|b".into(),
        };
        assert_eq!(Rank0Record::decode(&r.encode()), Ok(r));
        assert!(Rank0Record::decode(b"v2\n1.2.3.4:5\n1\nh").is_err());
        assert!(Rank0Record::decode(b"v1\nnot-an-addr\n1\nh").is_err());
        assert!(Rank0Record::decode(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn loopback_address_is_replaced_by_the_store_host_for_other_hosts_only() {
        let store = StoreRendezvous {
            host: "127.0.0.2".into(),
            port: 29500,
            prefix: "p".into(),
        };
        let record = Rank0Record {
            addr: "127.0.0.1:4000".parse().unwrap(),
            pid: 1,
            host_id: "A|m|b".into(),
        };
        let same = rank0_endpoint(&record, &store, "s", "A|m|b").unwrap();
        assert_eq!(same.addrs, vec!["127.0.0.1:4000".parse().unwrap()]);
        let other = rank0_endpoint(&record, &store, "s", "B|m|b").unwrap();
        assert_eq!(other.addrs, vec!["127.0.0.2:4000".parse().unwrap()]);
        let routable = Rank0Record {
            addr: "10.1.2.3:4000".parse().unwrap(),
            ..record
        };
        let remote = rank0_endpoint(&routable, &store, "s", "B|m|b").unwrap();
        assert_eq!(remote.addrs, vec!["10.1.2.3:4000".parse().unwrap()]);
    }
}
