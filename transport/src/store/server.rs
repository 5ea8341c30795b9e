//! A small TCPStore server speaking torch's protocol: for tests (CI has no torch) and for a
//! launcher that must host the store its ranks meet in (as torchrun's agent does).
//!
//! One thread per connection; keys and values live in a mutex-protected map, and waiters
//! sleep on a condition variable. Semantics follow torch's libuv backend: a missing key reads
//! as empty, compare-set on a missing key with an empty `expected` creates it. A connection
//! that does not start with `VALIDATE`, sends an unknown command or a field over the length
//! limit is closed. Dropping the server closes every connection and joins its threads.

use std::collections::HashMap;
use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use super::protocol::{
    read_field, read_i64, read_key_list, read_u32, read_u8, Query, CHECK_NOT_READY, CHECK_READY,
    VALIDATION_MAGIC, WAIT_CANCELED, WAIT_STOP_WAITING,
};

/// How often idle threads look at the stop flag (and waiters at their socket, for a cancel).
const POLL: Duration = Duration::from_millis(20);

#[derive(Default)]
struct Shared {
    data: Mutex<HashMap<Vec<u8>, Vec<u8>>>,
    changed: Condvar,
    stop: AtomicBool,
    connections: Mutex<Vec<(TcpStream, JoinHandle<()>)>>,
}

impl Shared {
    fn data(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Vec<u8>>> {
        // A panicking connection thread cannot leave the map half-updated (each update is
        // one insert), so a poisoned lock still holds a consistent map.
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running TCPStore server; stops when dropped.
pub struct StoreServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl StoreServer {
    /// Listens on `addr` (port 0 picks a free port; see [`StoreServer::local_addr`]).
    pub fn bind(addr: impl ToSocketAddrs) -> io::Result<StoreServer> {
        let listener = TcpListener::bind(addr)?;
        let local_addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let shared = Arc::new(Shared::default());
        let acceptor = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("tcpstore-accept".into())
                .spawn(move || accept_loop(listener, shared))?
        };
        Ok(StoreServer {
            local_addr,
            shared,
            acceptor: Some(acceptor),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn port(&self) -> u16 {
        self.local_addr.port()
    }

    /// Number of keys stored (for tests and diagnostics).
    pub fn num_keys(&self) -> usize {
        self.shared.data().len()
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.changed.notify_all();
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        let connections = std::mem::take(
            &mut *self
                .shared
                .connections
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (stream, _) in &connections {
            let _ = stream.shutdown(Shutdown::Both);
        }
        for (_, thread) in connections {
            let _ = thread.join();
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let _ = stream.set_nonblocking(false);
                let _ = stream.set_nodelay(true);
                let Ok(handle) = stream.try_clone() else {
                    continue;
                };
                let worker_shared = Arc::clone(&shared);
                let spawned = std::thread::Builder::new()
                    .name("tcpstore-conn".into())
                    .spawn(move || {
                        let mut stream = stream;
                        // Any error ends this connection only. Shut it down explicitly: the
                        // clone kept for `Drop` would otherwise hold the socket open.
                        let _ = serve_connection(&mut stream, &worker_shared);
                        let _ = stream.shutdown(Shutdown::Both);
                    });
                if let Ok(thread) = spawned {
                    let mut connections =
                        shared.connections.lock().unwrap_or_else(|p| p.into_inner());
                    // Forget connections that ended (their threads are done).
                    connections.retain(|(_, t)| !t.is_finished());
                    connections.push((handle, thread));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(POLL),
            Err(_) => std::thread::sleep(POLL),
        }
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

fn serve_connection(stream: &mut TcpStream, shared: &Shared) -> io::Result<()> {
    if Query::from_byte(read_u8(stream)?) != Some(Query::Validate)
        || read_u32(stream)? != VALIDATION_MAGIC
    {
        return Err(invalid(
            "connection did not start with a valid VALIDATE".into(),
        ));
    }
    loop {
        let byte = read_u8(stream)?;
        let query =
            Query::from_byte(byte).ok_or_else(|| invalid(format!("unknown command {byte}")))?;
        match query {
            Query::Validate => {
                if read_u32(stream)? != VALIDATION_MAGIC {
                    return Err(invalid("bad validation magic".into()));
                }
            }
            Query::Ping => {
                let nonce = read_u32(stream)?;
                stream.write_all(&nonce.to_le_bytes())?;
            }
            Query::Set => {
                let key = read_field(stream)?;
                let value = read_field(stream)?;
                shared.data().insert(key, value);
                shared.changed.notify_all();
            }
            Query::Get => {
                let key = read_field(stream)?;
                let value = shared.data().get(&key).cloned().unwrap_or_default();
                write_field(stream, &value)?;
            }
            Query::Add => {
                let key = read_field(stream)?;
                let delta = read_i64(stream)?;
                let total = add(shared, key, delta)?;
                stream.write_all(&total.to_le_bytes())?;
            }
            Query::Check => {
                let keys = read_key_list(stream)?;
                let data = shared.data();
                let ready = keys.iter().all(|k| data.contains_key(k));
                drop(data);
                stream.write_all(&[if ready { CHECK_READY } else { CHECK_NOT_READY }])?;
            }
            Query::Wait => {
                let keys = read_key_list(stream)?;
                wait_keys(stream, shared, &keys)?;
            }
            Query::CancelWait => stream.write_all(&[WAIT_CANCELED])?,
            Query::CompareSet => {
                let key = read_field(stream)?;
                let expected = read_field(stream)?;
                let desired = read_field(stream)?;
                let now = compare_set(shared, key, expected, desired);
                write_field(stream, &now)?;
            }
            Query::DeleteKey => {
                let key = read_field(stream)?;
                let deleted = shared.data().remove(&key).is_some() as i64;
                stream.write_all(&deleted.to_le_bytes())?;
            }
            Query::GetNumKeys => {
                let n = shared.data().len() as i64;
                stream.write_all(&n.to_le_bytes())?;
            }
        }
    }
}

fn write_field(stream: &mut TcpStream, value: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(8 + value.len());
    out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    out.extend_from_slice(value);
    stream.write_all(&out)
}

fn add(shared: &Shared, key: Vec<u8>, delta: i64) -> io::Result<i64> {
    let mut data = shared.data();
    let current = match data.get(&key) {
        None => 0,
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(|| invalid("add to a key whose value is not an integer".into()))?,
    };
    let total = current
        .checked_add(delta)
        .ok_or_else(|| invalid("add overflows i64".into()))?;
    data.insert(key, total.to_string().into_bytes());
    drop(data);
    shared.changed.notify_all();
    Ok(total)
}

fn compare_set(shared: &Shared, key: Vec<u8>, expected: Vec<u8>, desired: Vec<u8>) -> Vec<u8> {
    let mut data = shared.data();
    let now = match data.get_mut(&key) {
        None if expected.is_empty() => {
            data.insert(key, desired.clone());
            desired
        }
        None => expected,
        Some(current) => {
            if *current == expected {
                *current = desired;
            }
            current.clone()
        }
    };
    drop(data);
    shared.changed.notify_all();
    now
}

/// Answers "stop waiting" once every key exists, or "canceled" if the client sends
/// `CANCEL_WAIT` first. While waiting it polls the socket for that cancel (or EOF).
fn wait_keys(stream: &mut TcpStream, shared: &Shared, keys: &[Vec<u8>]) -> io::Result<()> {
    loop {
        let data = shared.data();
        if keys.iter().all(|k| data.contains_key(k)) {
            drop(data);
            return stream.write_all(&[WAIT_STOP_WAITING]);
        }
        let (data, _) = shared
            .changed
            .wait_timeout(data, POLL)
            .unwrap_or_else(|p| p.into_inner());
        drop(data);
        if shared.stop.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::Interrupted,
                "server stopping",
            ));
        }
        stream.set_nonblocking(true)?;
        let mut probe = [0u8; 1];
        let peeked = stream.peek(&mut probe);
        stream.set_nonblocking(false)?;
        match peeked {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(_) => {
                let byte = read_u8(stream)?;
                if Query::from_byte(byte) != Some(Query::CancelWait) {
                    return Err(invalid(format!("command {byte} while waiting")));
                }
                return stream.write_all(&[WAIT_CANCELED]);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
}
