//! A client of PyTorch's TCPStore (torchrun's agent store), over std TCP.
//!
//! It sends the same bytes as torch's own client for the same operations (checked against a
//! captured exchange in `transport/tests/tcpstore_replay.rs`), including torch's habit of
//! prefixing every key with `/`, so keys written by one are found by the other. Every call has
//! a deadline: `wait` takes one, every other answer must arrive within the client's timeout.
//! After any failure the connection may be out of step with the server, so the client refuses
//! further calls.

use std::io::{self, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::protocol::{
    read_field, read_i64, read_u32, read_u8, Query, Request, CHECK_NOT_READY, CHECK_READY,
    VALIDATION_MAGIC, WAIT_CANCELED, WAIT_STOP_WAITING,
};

/// Errors of [`StoreClient`]; each names the store's address and the key(s) involved.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot connect to the TCPStore at {addr} within {waited:?}: {detail}")]
    Connect {
        addr: String,
        waited: Duration,
        detail: String,
    },
    #[error("timed out after {waited:?} waiting for {what} in the TCPStore at {addr}")]
    Timeout {
        addr: String,
        what: String,
        waited: Duration,
    },
    #[error("TCPStore at {addr}: {what} failed: {source}")]
    Io {
        addr: String,
        what: String,
        source: io::Error,
    },
    #[error("TCPStore at {addr}: {what}: {detail}")]
    Protocol {
        addr: String,
        what: String,
        detail: String,
    },
}

pub type StoreResult<T> = std::result::Result<T, StoreError>;

/// One connection to a TCPStore server.
pub struct StoreClient {
    stream: TcpStream,
    /// `host:port` as given, for messages.
    addr: String,
    /// Deadline for every answer except `wait`'s (which has its own).
    timeout: Duration,
    /// Set by the first failure: the byte stream may be out of step from then on.
    broken: Option<String>,
}

/// torch's client prefixes every key with this (its `TCPStore::keyPrefix_`).
const KEY_PREFIX: &str = "/";
/// After a `wait` times out, how long the server has to confirm the cancellation.
const CANCEL_GRACE: Duration = Duration::from_secs(10);

fn key_list(keys: &[&str]) -> String {
    match keys {
        [one] => format!("key {one:?}"),
        _ => format!("keys {keys:?}"),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

impl StoreClient {
    /// Connects to the store at `host:port`, retrying (the store may still be starting) until
    /// `timeout`, then validates the connection and pings the server as torch's client does.
    /// `timeout` is also the deadline of every later answer other than `wait`'s.
    pub fn connect(host: &str, port: u16, timeout: Duration) -> StoreResult<StoreClient> {
        let addr = if host.contains(':') {
            format!("[{host}]:{port}")
        } else {
            format!("{host}:{port}")
        };
        let start = Instant::now();
        let deadline = start + timeout;
        let targets: Vec<SocketAddr> = (host, port)
            .to_socket_addrs()
            .map_err(|e| StoreError::Connect {
                addr: addr.clone(),
                waited: Duration::ZERO,
                detail: format!("cannot resolve {host:?}: {e}"),
            })?
            .collect();
        let mut backoff = Duration::from_millis(10);
        let stream = 'connect: loop {
            let mut last = String::from("no address to try");
            for target in &targets {
                let left = deadline.saturating_duration_since(Instant::now());
                let attempt = left.clamp(Duration::from_millis(1), Duration::from_secs(5));
                match TcpStream::connect_timeout(target, attempt) {
                    Ok(s) => break 'connect s,
                    Err(e) => last = format!("{target}: {e}"),
                }
            }
            if Instant::now() >= deadline {
                return Err(StoreError::Connect {
                    addr,
                    waited: start.elapsed(),
                    detail: last,
                });
            }
            std::thread::sleep(backoff.min(deadline.saturating_duration_since(Instant::now())));
            backoff = (backoff * 2).min(Duration::from_millis(500));
        };
        let _ = stream.set_nodelay(true);
        let mut client = StoreClient {
            stream,
            addr,
            timeout: timeout.max(Duration::from_millis(1)),
            broken: None,
        };
        client.handshake()?;
        Ok(client)
    }

    fn handshake(&mut self) -> StoreResult<()> {
        let nonce = std::process::id();
        let mut bytes = Request::new(Query::Validate).u32(VALIDATION_MAGIC).0;
        bytes.extend(Request::new(Query::Ping).u32(nonce).0);
        self.exchange("the connection handshake (validate + ping)", &bytes, |s| {
            let echo = read_u32(s)?;
            Ok((echo == nonce).then_some(()).ok_or(format!(
                "ping answered {echo:#x}, expected {nonce:#x} — is this a TCPStore?"
            )))
        })
    }

    /// The store's address as given (`host:port`).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// This end of the connection: the local interface that routes to the store.
    pub fn local_addr(&self) -> StoreResult<SocketAddr> {
        self.stream.local_addr().map_err(|e| StoreError::Io {
            addr: self.addr.clone(),
            what: "reading the connection's local address".into(),
            source: e,
        })
    }

    /// Sends `request`, then reads the answer with `read` within the client's timeout. `read`
    /// returns `Err(detail)` for an answer that makes no sense.
    fn exchange<T>(
        &mut self,
        what: &str,
        request: &[u8],
        read: impl FnOnce(&mut TcpStream) -> io::Result<Result<T, String>>,
    ) -> StoreResult<T> {
        self.usable(what)?;
        let timeout = self.timeout;
        let result = self
            .stream
            .set_write_timeout(Some(timeout))
            .and_then(|_| self.stream.set_read_timeout(Some(timeout)))
            .and_then(|_| self.stream.write_all(request))
            .and_then(|_| read(&mut self.stream));
        match result {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(detail)) => Err(self.fail(StoreError::Protocol {
                addr: self.addr.clone(),
                what: what.to_string(),
                detail,
            })),
            Err(e) if is_timeout(&e) => Err(self.fail(StoreError::Timeout {
                addr: self.addr.clone(),
                what: format!("the answer to {what}"),
                waited: timeout,
            })),
            Err(e) => Err(self.fail(StoreError::Io {
                addr: self.addr.clone(),
                what: what.to_string(),
                source: e,
            })),
        }
    }

    fn usable(&self, what: &str) -> StoreResult<()> {
        match &self.broken {
            None => Ok(()),
            Some(earlier) => Err(StoreError::Protocol {
                addr: self.addr.clone(),
                what: what.to_string(),
                detail: format!("connection unusable after an earlier error ({earlier})"),
            }),
        }
    }

    fn fail(&mut self, e: StoreError) -> StoreError {
        self.broken = Some(e.to_string());
        e
    }

    /// Stores `value` under `key` (no answer: the server applies requests in order).
    pub fn set(&mut self, key: &str, value: &[u8]) -> StoreResult<()> {
        let what = format!("set of key {key:?}");
        self.usable(&what)?;
        let request = Request::new(Query::Set)
            .field(prefixed(key).as_bytes())
            .field(value)
            .0;
        let timeout = self.timeout;
        let sent = self
            .stream
            .set_write_timeout(Some(timeout))
            .and_then(|_| self.stream.write_all(&request));
        sent.map_err(|e| {
            let err = if is_timeout(&e) {
                StoreError::Timeout {
                    addr: self.addr.clone(),
                    what: format!("the server to accept the {what}"),
                    waited: timeout,
                }
            } else {
                StoreError::Io {
                    addr: self.addr.clone(),
                    what,
                    source: e,
                }
            };
            self.fail(err)
        })
    }

    /// The value of `key`, waiting up to the client's timeout for it to be set (as torch's
    /// `get`: a `wait` then a `GET`).
    pub fn get(&mut self, key: &str) -> StoreResult<Vec<u8>> {
        self.wait(&[key], self.timeout)?;
        let request = Request::new(Query::Get).field(prefixed(key).as_bytes()).0;
        self.exchange(&format!("get of key {key:?}"), &request, |s| {
            Ok(Ok(read_field(s)?))
        })
    }

    /// Adds `delta` to the integer stored under `key` (0 if absent) and returns the new value.
    pub fn add(&mut self, key: &str, delta: i64) -> StoreResult<i64> {
        let request = Request::new(Query::Add)
            .field(prefixed(key).as_bytes())
            .i64(delta)
            .0;
        self.exchange(&format!("add to key {key:?}"), &request, |s| {
            Ok(Ok(read_i64(s)?))
        })
    }

    /// Whether all `keys` exist, without waiting.
    pub fn check(&mut self, keys: &[&str]) -> StoreResult<bool> {
        let request = keys
            .iter()
            .fold(Request::new(Query::Check).u64(keys.len() as u64), |r, k| {
                r.field(prefixed(k).as_bytes())
            })
            .0;
        self.exchange(&format!("check of {}", key_list(keys)), &request, |s| {
            Ok(match read_u8(s)? {
                CHECK_READY => Ok(true),
                CHECK_NOT_READY => Ok(false),
                other => Err(format!("unexpected check answer {other}")),
            })
        })
    }

    /// Atomically: if `key` holds `expected` (or is absent and `expected` is empty), store
    /// `desired`. Returns the value stored afterwards, so `result == desired` means this call
    /// won. (torch quirk: for an absent key and a non-empty `expected`, the server returns
    /// `expected` and stores nothing.)
    pub fn compare_set(
        &mut self,
        key: &str,
        expected: &[u8],
        desired: &[u8],
    ) -> StoreResult<Vec<u8>> {
        let request = Request::new(Query::CompareSet)
            .field(prefixed(key).as_bytes())
            .field(expected)
            .field(desired)
            .0;
        self.exchange(&format!("compare-set of key {key:?}"), &request, |s| {
            Ok(Ok(read_field(s)?))
        })
    }

    /// Waits until all `keys` exist, at most `timeout`. On timeout it cancels the wait with
    /// the server (as torch does) and returns [`StoreError::Timeout`] naming the keys.
    pub fn wait(&mut self, keys: &[&str], timeout: Duration) -> StoreResult<()> {
        let what = key_list(keys);
        self.usable(&format!("wait for {what}"))?;
        let timeout = timeout.max(Duration::from_millis(1));
        let request = keys
            .iter()
            .fold(Request::new(Query::Wait).u64(keys.len() as u64), |r, k| {
                r.field(prefixed(k).as_bytes())
            })
            .0;
        let write_timeout = self.timeout;
        let first = self
            .stream
            .set_write_timeout(Some(write_timeout))
            .and_then(|_| self.stream.set_read_timeout(Some(timeout)))
            .and_then(|_| self.stream.write_all(&request))
            .and_then(|_| read_u8(&mut self.stream));
        match first {
            Ok(WAIT_STOP_WAITING) => Ok(()),
            Ok(other) => Err(self.protocol(&what, format!("unexpected wait answer {other}"))),
            Err(e) if is_timeout(&e) => {
                self.cancel_wait(&what)?;
                Err(StoreError::Timeout {
                    addr: self.addr.clone(),
                    what,
                    waited: timeout,
                })
            }
            Err(e) => Err(self.fail(StoreError::Io {
                addr: self.addr.clone(),
                what: format!("wait for {what}"),
                source: e,
            })),
        }
    }

    /// After a timed-out wait: `CANCEL_WAIT`, then the server's "canceled", possibly preceded
    /// by a "stop waiting" that crossed our cancel on the wire. Leaves the connection usable.
    fn cancel_wait(&mut self, what: &str) -> StoreResult<()> {
        let timeout = self.timeout;
        self.timeout = CANCEL_GRACE.min(timeout.max(Duration::from_secs(1)));
        let cancel = Request::new(Query::CancelWait).0;
        let result = self.exchange(&format!("cancelling the wait for {what}"), &cancel, |s| {
            let mut answer = read_u8(s)?;
            if answer == WAIT_STOP_WAITING {
                answer = read_u8(s)?;
            }
            Ok((answer == WAIT_CANCELED)
                .then_some(())
                .ok_or(format!("unexpected answer {answer} to a wait cancellation")))
        });
        self.timeout = timeout;
        result
    }

    fn protocol(&mut self, what: &str, detail: String) -> StoreError {
        let e = StoreError::Protocol {
            addr: self.addr.clone(),
            what: format!("wait for {what}"),
            detail,
        };
        self.fail(e)
    }
}

fn prefixed(key: &str) -> String {
    format!("{KEY_PREFIX}{key}")
}
