//! The transport's error type. Every variant that involves a peer names its rank, and the
//! timeout / peer-died variants also say where that peer is ([`PeerAt`]).

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("timed out after {waited:?} waiting for rank {rank}{at} during {what}")]
    Timeout {
        rank: usize,
        /// Where `rank` is, as this rank knows it.
        at: PeerAt,
        what: String,
        waited: Duration,
    },
    #[error("rank {rank}{at} died or disconnected during {what}: {detail}")]
    PeerDied {
        rank: usize,
        /// Where `rank` is, as this rank knows it.
        at: PeerAt,
        what: String,
        detail: String,
    },
    #[error("protocol error from rank {rank}: {detail}")]
    Protocol { rank: usize, detail: String },
    #[error("rendezvous failed: {0}")]
    Rendezvous(String),
    #[error("authentication failed: {0}")]
    Auth(String),
    #[error("configuration mismatch: {0}")]
    ConfigMismatch(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("shared memory: {0}")]
    Shm(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl Error {
    /// Wrap an I/O error with what we were doing.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// Says where the culprit is, if the raiser did not: `locate(rank)` answers for the ranks
    /// the caller knows. Only timeout / peer-died errors name a location.
    pub fn located(mut self, locate: impl Fn(usize) -> PeerAt) -> Self {
        if let Error::Timeout { rank, at, .. } | Error::PeerDied { rank, at, .. } = &mut self {
            if *at == PeerAt::Unknown {
                *at = locate(*rank);
            }
        }
        self
    }
}

/// Where a peer named in an error is, so a user can find the host (and process) at fault.
/// Printed right after the rank: "rank 1 at 10.0.0.2:41234", "rank 1 (pid 123, this host)".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PeerAt {
    /// Not known where the error was raised (printed as nothing).
    #[default]
    Unknown,
    /// A TCP peer: the data address it published at rendezvous (its end of the data link).
    Tcp(SocketAddr),
    /// A rank on another host that this rank has no link to (a non-leader behind its
    /// host's leader): that host's address.
    Host(IpAddr),
    /// A shared-memory peer on this host; its pid when known.
    ThisHost { pid: Option<u32> },
}

impl fmt::Display for PeerAt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerAt::Unknown => Ok(()),
            PeerAt::Tcp(addr) => write!(f, " at {addr}"),
            PeerAt::Host(ip) => write!(f, " on host {ip}"),
            PeerAt::ThisHost { pid: Some(pid) } => write!(f, " (pid {pid}, this host)"),
            PeerAt::ThisHost { pid: None } => write!(f, " (this host)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_name_the_rank_and_where_it_is() {
        let timeout = |at| Error::Timeout {
            rank: 1,
            at,
            what: "all_reduce".into(),
            waited: Duration::from_secs(3),
        };
        let addr: SocketAddr = "10.0.0.2:41234".parse().expect("address");
        assert_eq!(
            timeout(PeerAt::Tcp(addr)).to_string(),
            "timed out after 3s waiting for rank 1 at 10.0.0.2:41234 during all_reduce"
        );
        assert_eq!(
            timeout(PeerAt::Unknown).to_string(),
            "timed out after 3s waiting for rank 1 during all_reduce"
        );
        let died = Error::PeerDied {
            rank: 2,
            at: PeerAt::ThisHost { pid: Some(77) },
            what: "broadcast".into(),
            detail: "process 77 no longer exists".into(),
        };
        assert_eq!(
            died.to_string(),
            "rank 2 (pid 77, this host) died or disconnected during broadcast: \
             process 77 no longer exists"
        );
        let host = PeerAt::Host("10.0.0.3".parse().expect("ip"));
        let located = timeout(PeerAt::Unknown).located(|_| host);
        assert!(located
            .to_string()
            .contains("rank 1 on host 10.0.0.3 during"));
        // An address set where the error was raised is kept.
        let kept = timeout(PeerAt::Tcp(addr)).located(|_| host);
        assert!(kept.to_string().contains("at 10.0.0.2:41234"));
    }
}
