//! TCP backend: a full mesh of connections between ranks, framed messages, and the shared
//! collective algorithms on top ([`crate::algorithms::P2pBackend`]).
//!
//! Setup: after rendezvous every rank knows every rank's data listener and the job's
//! data-plane key. Rank `i` connects to each rank `j < i`; rank `j` accepts from every rank
//! above it; both prove the key by HMAC challenge-response (`rendezvous/data_plane.rs`).
//! Connections that fail it (garbage, a replayed handshake, another key, silence) are
//! refused with one warning each and do not disturb the job.

pub mod connection;
pub mod framing;
pub mod mesh;
pub mod splice;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::algorithms::{AlgoConfig, P2pBackend};
use crate::auth::DataKey;
use crate::rendezvous::data_plane;
use crate::{Error, PeerAt, Result, Timeouts};
pub use mesh::TcpMesh;

pub type TcpBackend = P2pBackend<TcpMesh>;

/// Socket buffer size asked for on data connections (the kernel may cap it).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Builds the mesh. `peers[p]` is rank `p`'s data listener; `listener` is this rank's;
/// `key` is the job's data-plane key from the rendezvous (every connection proves it, see
/// `rendezvous/data_plane.rs`).
pub fn connect_mesh(
    rank: usize,
    peers: &[SocketAddr],
    key: &DataKey,
    listener: TcpListener,
    timeouts: &Timeouts,
) -> Result<TcpBackend> {
    let located =
        |e: Error| e.located(|r| peers.get(r).map_or(PeerAt::Unknown, |a| PeerAt::Tcp(*a)));
    let world_size = peers.len();
    let deadline = Instant::now() + timeouts.connect;
    let mut streams: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
    for (peer, addr) in peers.iter().enumerate().take(rank) {
        let stream =
            connect_with_retry(*addr, deadline, timeouts.connect, peer).map_err(located)?;
        data_plane::introduce(&stream, key, (rank, peer), *addr, deadline).map_err(located)?;
        streams[peer] = Some(stream);
    }
    accept_higher_ranks(
        rank,
        &listener,
        key,
        deadline,
        timeouts.connect,
        &mut streams,
    )
    .map_err(located)?;
    for (peer, stream) in streams.iter().enumerate() {
        if let Some(stream) = stream {
            tune_socket(stream, timeouts)
                .map_err(|e| Error::io(format!("configuring connection to rank {peer}"), e))?;
        }
    }
    Ok(P2pBackend::new(
        TcpMesh::new(
            rank,
            streams,
            peers.to_vec(),
            *timeouts,
            dedicated_cores(peers, &listener),
        ),
        AlgoConfig {
            // Large pieces mean fewer frames and acks; 4 MiB left too few pieces in flight.
            piece_bytes: 1 << 20,
            ..AlgoConfig::default()
        },
    ))
}

/// Whether every rank on this host can have a core of its own. Only then do large sends use
/// splice: measured here with 3 ranks on 2 cores, spliced sends were slower than copies.
fn dedicated_cores(peers: &[SocketAddr], listener: &TcpListener) -> bool {
    let Ok(own) = listener.local_addr() else {
        return false;
    };
    let local_ranks = peers
        .iter()
        .filter(|a| a.ip() == own.ip() || a.ip().is_loopback())
        .count();
    // SAFETY: sysconf only reads a system value.
    let cpus = unsafe { nix::libc::sysconf(nix::libc::_SC_NPROCESSORS_ONLN) };
    cpus > 0 && local_ranks <= cpus as usize
}

/// A checked connection from a higher rank, or a refused one (with why).
type Checked = (TcpStream, SocketAddr, std::result::Result<usize, String>);

/// Accepts until every higher rank is in. Each connection is checked on its own thread, so a
/// stranger that connects and says nothing cannot hold up the real ranks; a refused one is
/// logged once and dropped.
fn accept_higher_ranks(
    rank: usize,
    listener: &TcpListener,
    key: &DataKey,
    deadline: Instant,
    waited: Duration,
    streams: &mut [Option<TcpStream>],
) -> Result<()> {
    let world_size = streams.len();
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("data listener", e))?;
    let (tx, rx) = mpsc::channel::<Checked>();
    while (rank + 1..world_size).any(|p| streams[p].is_none()) {
        match listener.accept() {
            Ok((stream, from)) => {
                let (tx, key) = (tx.clone(), *key);
                std::thread::spawn(move || {
                    let checked =
                        data_plane::check_connector(&stream, &key, (rank, world_size), deadline);
                    let _ = tx.send((stream, from, checked));
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(Error::io("accepting a data connection", e)),
        }
        match rx.recv_timeout(Duration::from_millis(2)) {
            Ok((stream, from, Ok(peer))) => admit_peer(stream, from, peer, streams)?,
            Ok((_, from, Err(why))) => eprintln!(
                "dtrain transport: rank {rank}: warning: refused data connection from {from}: {why}"
            ),
            Err(_) if Instant::now() >= deadline => {
                let missing: Vec<usize> = (rank + 1..world_size)
                    .filter(|&p| streams[p].is_none())
                    .collect();
                return Err(Error::Timeout {
                    rank: missing[0],
                    at: PeerAt::Unknown,
                    what: format!("TCP mesh setup (ranks {missing:?} never connected)"),
                    waited,
                });
            }
            Err(_) => {}
        }
    }
    Ok(())
}

/// Takes a connection that proved the job's key; a second one for the same rank can only be a
/// bug in this job (strangers cannot prove the key), so it is a protocol error.
fn admit_peer(
    stream: TcpStream,
    from: SocketAddr,
    peer: usize,
    streams: &mut [Option<TcpStream>],
) -> Result<()> {
    if streams[peer].is_some() {
        return Err(Error::Protocol {
            rank: peer,
            detail: format!("a second data connection from {from} proved rank {peer}"),
        });
    }
    data_plane::admit(&stream).map_err(|e| Error::PeerDied {
        rank: peer,
        at: PeerAt::Unknown,
        what: "TCP mesh setup".into(),
        detail: format!("admitting its connection failed: {e}"),
    })?;
    streams[peer] = Some(stream);
    Ok(())
}

fn connect_with_retry(
    addr: SocketAddr,
    deadline: Instant,
    waited: Duration,
    peer: usize,
) -> Result<TcpStream> {
    let mut backoff = Duration::from_millis(5);
    loop {
        let left = remaining(deadline).max(Duration::from_millis(1));
        match TcpStream::connect_timeout(&addr, left) {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() >= deadline => {
                return Err(Error::Timeout {
                    rank: peer,
                    at: PeerAt::Unknown,
                    what: format!("TCP mesh setup (connecting to {addr}: {e})"),
                    waited,
                })
            }
            Err(_) => {
                std::thread::sleep(backoff.min(remaining(deadline)));
                backoff = (backoff * 2).min(Duration::from_millis(500));
            }
        }
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Data sockets: nonblocking (the mesh polls), no Nagle delay, large buffers, and keepalive /
/// user timeouts so a vanished host (no FIN ever arrives) still errors out within seconds.
fn tune_socket(stream: &TcpStream, timeouts: &Timeouts) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nonblocking(true)?;
    stream.set_nodelay(true)?;
    let liveness_s = timeouts.liveness.as_secs().max(1) as u32;
    let apply = || -> nix::Result<()> {
        setsockopt(stream, sockopt::SndBuf, &SOCKET_BUFFER_BYTES)?;
        setsockopt(stream, sockopt::RcvBuf, &SOCKET_BUFFER_BYTES)?;
        setsockopt(stream, sockopt::KeepAlive, &true)?;
        setsockopt(stream, sockopt::TcpKeepIdle, &liveness_s.div_ceil(2))?;
        setsockopt(stream, sockopt::TcpKeepInterval, &1)?;
        setsockopt(stream, sockopt::TcpKeepCount, &3)?;
        setsockopt(stream, sockopt::TcpUserTimeout, &(liveness_s * 2000))?;
        Ok(())
    };
    apply().map_err(std::io::Error::from)?;
    if stream.peer_addr()?.ip().is_loopback() {
        use_unpaced_congestion_control(stream);
    }
    Ok(())
}

/// On loopback there is no network to pace for, but BBR (a common system default) still
/// paces every packet with a timer, which halves large transfers. Ask for cubic, else reno
/// (always permitted); this socket only, and failing is harmless.
fn use_unpaced_congestion_control(stream: &TcpStream) {
    use nix::sys::socket::{setsockopt, sockopt};
    for name in ["cubic", "reno"] {
        if setsockopt(
            stream,
            sockopt::TcpCongestion,
            &std::ffi::OsString::from(name),
        )
        .is_ok()
        {
            return;
        }
    }
}
