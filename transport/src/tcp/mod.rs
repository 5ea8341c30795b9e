//! TCP backend: a full mesh of connections between ranks, framed messages, and the shared
//! collective algorithms on top ([`crate::algorithms::P2pBackend`]).
//!
//! Setup: after rendezvous every rank knows every rank's data listener. Rank `i` connects to
//! each rank `j < i` and introduces itself (magic, job id, rank); rank `j` accepts from every
//! rank above it and answers with its own rank. Stray connections (wrong magic, wrong job) are
//! dropped with a warning.

pub mod connection;
pub mod framing;
pub mod mesh;
pub mod splice;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::algorithms::{AlgoConfig, P2pBackend};
use crate::{Error, Result, Timeouts};
pub use mesh::TcpMesh;

pub type TcpBackend = P2pBackend<TcpMesh>;

const DATA_HELLO_MAGIC: &[u8; 8] = b"DTRAINDT";
const DATA_HELLO_LEN: usize = 8 + 32 + 8;
/// Socket buffer size asked for on data connections (the kernel may cap it).
const SOCKET_BUFFER_BYTES: usize = 4 << 20;

/// Builds the mesh. `peers[p]` is rank `p`'s data listener; `listener` is this rank's.
pub fn connect_mesh(
    rank: usize,
    peers: &[SocketAddr],
    job_id: &str,
    listener: TcpListener,
    timeouts: &Timeouts,
) -> Result<TcpBackend> {
    let world_size = peers.len();
    let deadline = Instant::now() + timeouts.connect;
    let job = job_id_bytes(job_id);
    let mut streams: Vec<Option<TcpStream>> = (0..world_size).map(|_| None).collect();
    for (peer, addr) in peers.iter().enumerate().take(rank) {
        let stream = connect_with_retry(*addr, deadline, timeouts.connect, peer)?;
        stream
            .set_read_timeout(Some(remaining(deadline)))
            .and_then(|_| stream.set_write_timeout(Some(remaining(deadline))))
            .map_err(|e| Error::io(format!("configuring connection to rank {peer}"), e))?;
        let mut hello = Vec::with_capacity(DATA_HELLO_LEN);
        hello.extend_from_slice(DATA_HELLO_MAGIC);
        hello.extend_from_slice(&job);
        hello.extend_from_slice(&(rank as u64).to_le_bytes());
        let mut ack = [0u8; 8];
        (&stream)
            .write_all(&hello)
            .and_then(|_| (&stream).read_exact(&mut ack))
            .map_err(|e| Error::PeerDied {
                rank: peer,
                what: "TCP mesh setup".into(),
                detail: format!("introduction to {addr} failed: {e}"),
            })?;
        if u64::from_le_bytes(ack) != peer as u64 {
            return Err(Error::Protocol {
                rank: peer,
                detail: format!(
                    "the listener at {addr} answered as rank {}, expected rank {peer}",
                    u64::from_le_bytes(ack)
                ),
            });
        }
        streams[peer] = Some(stream);
    }
    accept_higher_ranks(
        rank,
        &listener,
        &job,
        deadline,
        timeouts.connect,
        &mut streams,
    )?;
    for (peer, stream) in streams.iter().enumerate() {
        if let Some(stream) = stream {
            tune_socket(stream, timeouts)
                .map_err(|e| Error::io(format!("configuring connection to rank {peer}"), e))?;
        }
    }
    Ok(P2pBackend::new(
        TcpMesh::new(rank, streams, *timeouts, dedicated_cores(peers, &listener)),
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

fn accept_higher_ranks(
    rank: usize,
    listener: &TcpListener,
    job: &[u8; 32],
    deadline: Instant,
    waited: Duration,
    streams: &mut [Option<TcpStream>],
) -> Result<()> {
    let world_size = streams.len();
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("data listener", e))?;
    while (rank + 1..world_size).any(|p| streams[p].is_none()) {
        let (stream, from) = match listener.accept() {
            Ok(pair) => pair,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    let missing: Vec<usize> = (rank + 1..world_size)
                        .filter(|&p| streams[p].is_none())
                        .collect();
                    return Err(Error::Timeout {
                        rank: missing[0],
                        what: format!("TCP mesh setup (ranks {missing:?} never connected)"),
                        waited,
                    });
                }
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(e) => return Err(Error::io("accepting a data connection", e)),
        };
        let introduced = (|| -> std::io::Result<[u8; DATA_HELLO_LEN]> {
            stream.set_nonblocking(false)?;
            stream.set_read_timeout(Some(remaining(deadline).min(Duration::from_secs(10))))?;
            let mut hello = [0u8; DATA_HELLO_LEN];
            (&stream).read_exact(&mut hello)?;
            Ok(hello)
        })();
        let hello = match introduced {
            Ok(h) => h,
            Err(e) => {
                eprintln!("dtrain transport: rank {rank}: warning: dropped data connection from {from}: {e}");
                continue;
            }
        };
        let peer = u64::from_le_bytes(hello[40..48].try_into().expect("8 bytes")) as usize;
        if &hello[..8] != DATA_HELLO_MAGIC || &hello[8..40] != job {
            eprintln!(
                "dtrain transport: rank {rank}: warning: dropped data connection from {from}: \
                 not a dtrain rank of this job"
            );
            continue;
        }
        if peer <= rank || peer >= world_size || streams[peer].is_some() {
            return Err(Error::Protocol {
                rank: peer,
                detail: format!("data connection from {from} claims rank {peer}, which rank {rank} does not expect"),
            });
        }
        (&stream)
            .write_all(&(rank as u64).to_le_bytes())
            .map_err(|e| Error::PeerDied {
                rank: peer,
                what: "TCP mesh setup".into(),
                detail: format!("acknowledging its connection failed: {e}"),
            })?;
        streams[peer] = Some(stream);
    }
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

fn job_id_bytes(job_id: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    let b = job_id.as_bytes();
    out[..b.len().min(32)].copy_from_slice(&b[..b.len().min(32)]);
    out
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
