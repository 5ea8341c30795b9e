//! The transport's error type. Every variant that involves a peer names its rank.

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("timed out after {waited:?} waiting for rank {rank} during {what}")]
    Timeout {
        rank: usize,
        what: String,
        waited: Duration,
    },
    #[error("rank {rank} died or disconnected during {what}: {detail}")]
    PeerDied {
        rank: usize,
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
}
