//! Rendezvous: how ranks find each other and agree they belong to the same job.
//!
//! Rank 0 listens on `master_addr:master_port`; every other rank connects (retrying with
//! backoff until `timeouts.connect`) and sends a hello:
//!
//! `b"DTRAINRV" | version u32 | body_len u32 | body`, body = rank, world size, config hash,
//! transport kind, whether it holds an auth token, a client nonce, host identity (hostname,
//! /etc/machine-id, boot id), pid, and the address of the rank's own data listener (an
//! ephemeral port on the interface it used to reach the master).
//!
//! With an auth token, both sides prove knowledge of it (see [`crate::auth`]). Rank 0 then
//! checks the hello against its own configuration and answers accept or reject; once all
//! `world_size - 1` ranks are in, it sends everyone the peer table and a random job id.
//! Later messages are `kind u8 | len u32 | payload`.
//!
//! Failure policy: a configuration mismatch from a correctly authenticated rank (duplicate
//! rank, rank out of range, different world size / config hash / transport) fails the whole
//! job at once — the offending rank gets a reject, the ranks already in get an abort, and
//! rank 0 returns the error; all name the problem. Garbage on the port (wrong magic) or a
//! failed authentication only drops that connection with a warning — a stranger cannot kill a
//! job — and is listed in rank 0's error if the job then times out waiting for that rank.

use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::auth;
use crate::communicator::{CommConfig, TransportKind};
use crate::{Error, Result};

const HELLO_MAGIC: &[u8; 8] = b"DTRAINRV";
pub const PROTOCOL_VERSION: u32 = 1;
const MAX_MESSAGE: usize = 1 << 20;
/// How long rank 0 waits for a freshly accepted connection to say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

// Message kinds after the hello.
const MSG_CHALLENGE: u8 = 1;
const MSG_REJECT: u8 = 2;
const MSG_ACCEPT: u8 = 3;
const MSG_TABLE: u8 = 4;
const MSG_ABORT: u8 = 5;
const MSG_PROOF: u8 = 6;

// Categories carried by reject/abort so every rank returns the same error variant.
const CAT_RENDEZVOUS: u8 = 0;
const CAT_AUTH: u8 = 1;
const CAT_CONFIG: u8 = 2;

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

#[derive(Clone, Debug, PartialEq, Eq)]
struct Hello {
    rank: usize,
    world_size: usize,
    config_hash: u64,
    transport: u8,
    has_token: bool,
    client_nonce: [u8; auth::NONCE_LEN],
    host_id: String,
    pid: u32,
    data_addr: String,
}

fn transport_code(kind: TransportKind) -> u8 {
    match kind {
        TransportKind::Auto => 0,
        TransportKind::Shm => 1,
        TransportKind::Tcp => 2,
    }
}

fn transport_label(code: u8) -> &'static str {
    match code {
        0 => "auto",
        1 => "shm",
        2 => "tcp",
        _ => "unknown",
    }
}

// ---- wire encoding -------------------------------------------------------------------

#[derive(Default)]
struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> std::result::Result<&'a [u8], String> {
        if self.buf.len() - self.pos < n {
            return Err("message truncated".to_string());
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }
    fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    fn bytes(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "invalid UTF-8".to_string())
    }
}

fn encode_hello_body(h: &Hello) -> Vec<u8> {
    let mut w = Writer::default();
    w.u64(h.rank as u64)
        .u64(h.world_size as u64)
        .u64(h.config_hash)
        .u8(h.transport)
        .u8(h.has_token as u8)
        .bytes(&h.client_nonce)
        .bytes(h.host_id.as_bytes())
        .u32(h.pid)
        .bytes(h.data_addr.as_bytes());
    w.0
}

fn decode_hello_body(body: &[u8]) -> std::result::Result<Hello, String> {
    let mut r = Reader::new(body);
    Ok(Hello {
        rank: r.u64()? as usize,
        world_size: r.u64()? as usize,
        config_hash: r.u64()?,
        transport: r.u8()?,
        has_token: r.u8()? != 0,
        client_nonce: r
            .bytes()?
            .try_into()
            .map_err(|_| "bad nonce length".to_string())?,
        host_id: r.string()?,
        pid: r.u32()?,
        data_addr: r.string()?,
    })
}

fn write_message(stream: &mut TcpStream, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame)
}

fn read_message(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    stream.read_exact(&mut head)?;
    let len = u32::from_le_bytes(head[1..5].try_into().expect("4 bytes")) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message of {len} bytes is too long"),
        ));
    }
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload)?;
    Ok((head[0], payload))
}

fn failure_payload(category: u8, text: &str) -> Vec<u8> {
    let mut p = vec![category];
    p.extend_from_slice(text.as_bytes());
    p
}

fn failure_error(payload: &[u8], from_master: &str) -> Error {
    let (category, text) = match payload.split_first() {
        Some((c, rest)) => (*c, String::from_utf8_lossy(rest).into_owned()),
        None => (CAT_RENDEZVOUS, String::new()),
    };
    let text = format!("{from_master}: {text}");
    match category {
        CAT_AUTH => Error::Auth(text),
        CAT_CONFIG => Error::ConfigMismatch(text),
        _ => Error::Rendezvous(text),
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

// ---- entry point ---------------------------------------------------------------------

/// Runs the rendezvous for `cfg` (world size > 1). Rank 0 serves; others join. With
/// `cfg.store`, ranks first find rank 0 through that TCPStore (see [`crate::store`]).
pub fn rendezvous(cfg: &CommConfig) -> Result<Rendezvous> {
    if let Some(store) = &cfg.store {
        return crate::store::rendezvous_via_store(cfg, store);
    }
    let deadline = Instant::now() + cfg.timeouts.connect;
    let master = MasterEndpoint {
        addrs: resolve("master address", &cfg.master_addr, cfg.master_port)?,
        label: format!("{}:{}", cfg.master_addr, cfg.master_port),
    };
    if cfg.rank == 0 {
        let listener = bind_master(cfg, &master.addrs)?;
        serve(cfg, listener, &master.label, deadline)
    } else {
        join(cfg, &master, deadline)
    }
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

fn bind_master(cfg: &CommConfig, addrs: &[SocketAddr]) -> Result<TcpListener> {
    let mut last = None;
    for addr in addrs {
        match TcpListener::bind(addr) {
            Ok(l) => return Ok(l),
            Err(e) if e.kind() == io::ErrorKind::AddrInUse => {
                return Err(Error::Rendezvous(format!(
                    "port {} on {} is already in use — pick another --master-port \
                     (or stop the other job using it)",
                    cfg.master_port,
                    addr.ip()
                )))
            }
            Err(e) => last = Some((addr, e)),
        }
    }
    let (addr, e) = last.expect("at least one address");
    if e.kind() == io::ErrorKind::AddrNotAvailable {
        return Err(Error::Rendezvous(format!(
            "master address {:?} resolves to {}, which is not an address of this machine — \
             rank 0 must run on the master host",
            cfg.master_addr,
            addr.ip()
        )));
    }
    Err(Error::io(format!("binding the rendezvous port {addr}"), e))
}

fn bind_data_listener(ip: IpAddr) -> Result<TcpListener> {
    TcpListener::bind((ip, 0))
        .map_err(|e| Error::io(format!("binding this rank's data listener on {ip}"), e))
}

// ---- rank 0 --------------------------------------------------------------------------

enum Event {
    /// An authenticated hello, ready for the configuration checks.
    Joined(TcpStream, Hello, SocketAddr),
    /// A connection that was dropped (garbage, wrong version, failed auth): a warning.
    Dropped(String),
}

/// Rank 0's side, on an already bound `listener` (`label` names it in messages). A listener
/// on the unspecified address (store rendezvous) gets a data listener there too, and each
/// rank is told rank 0's data address on the interface that rank reached it by.
pub(crate) fn serve(
    cfg: &CommConfig,
    listener: TcpListener,
    label: &str,
    deadline: Instant,
) -> Result<Rendezvous> {
    let master_ip = listener
        .local_addr()
        .map_err(|e| Error::io("rendezvous listener address", e))?
        .ip();
    let data_listener = bind_data_listener(master_ip)?;
    let my_data = data_listener
        .local_addr()
        .map_err(|e| Error::io("data listener address", e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("rendezvous listener", e))?;

    let n = cfg.world_size;
    let (tx, rx) = mpsc::channel::<Event>();
    let mut joined: Vec<Option<(TcpStream, Hello)>> = (0..n).map(|_| None).collect();
    let mut dropped: Vec<String> = Vec::new();
    loop {
        loop {
            match listener.accept() {
                Ok((stream, from)) => {
                    let tx = tx.clone();
                    let token = cfg.auth_token.clone();
                    std::thread::spawn(move || {
                        let _ = tx.send(handshake(stream, from, token.as_deref()));
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    eprintln!("dtrain rendezvous: rank 0: warning: accept failed: {e}");
                    break;
                }
            }
        }
        if joined[1..].iter().all(Option::is_some) {
            break;
        }
        match rx.recv_timeout(Duration::from_millis(5)) {
            Ok(Event::Joined(mut stream, hello, from)) => match check_hello(cfg, &hello, &joined) {
                Ok(()) => {
                    if let Err(e) = write_message(&mut stream, MSG_ACCEPT, &[]) {
                        eprintln!(
                            "dtrain rendezvous: rank 0: warning: rank {} ({from}) vanished before it was accepted: {e}",
                            hello.rank
                        );
                        continue;
                    }
                    let rank = hello.rank;
                    joined[rank] = Some((stream, hello));
                }
                Err((category, text)) => {
                    let _ =
                        write_message(&mut stream, MSG_REJECT, &failure_payload(category, &text));
                    abort_all(&mut joined, category, &text);
                    let mut told: Vec<bool> = joined.iter().map(Option::is_some).collect();
                    if let Some(t) = told.get_mut(hello.rank) {
                        *t = true;
                    }
                    linger_and_reject(
                        &listener, &tx, &rx, cfg, deadline, &mut told, category, &text,
                    );
                    return Err(match category {
                        CAT_AUTH => Error::Auth(text),
                        CAT_CONFIG => Error::ConfigMismatch(text),
                        _ => Error::Rendezvous(text),
                    });
                }
            },
            Ok(Event::Dropped(warning)) => {
                eprintln!("dtrain rendezvous: rank 0: warning: {warning}");
                dropped.push(warning);
            }
            Err(_) => {}
        }
        if Instant::now() >= deadline {
            let missing: Vec<usize> = (1..n).filter(|&r| joined[r].is_none()).collect();
            let mut text = format!(
                "rank 0 timed out after {:?} waiting for ranks {missing:?} to join at {label}",
                cfg.timeouts.connect
            );
            if !dropped.is_empty() {
                text.push_str(&format!("; rejected connections: {}", dropped.join("; ")));
            }
            abort_all(&mut joined, CAT_RENDEZVOUS, &text);
            return Err(Error::Rendezvous(text));
        }
    }

    let job_id: String = auth::nonce()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut peers = vec![PeerInfo {
        host_id: host_identity(),
        pid: std::process::id(),
        data_addr: my_data,
    }];
    for (stream, hello) in joined.iter().skip(1).flatten() {
        let data_addr = hello.data_addr.parse().map_err(|_| Error::Protocol {
            rank: hello.rank,
            detail: format!("bad data address {:?}", hello.data_addr),
        })?;
        let _ = stream;
        peers.push(PeerInfo {
            host_id: hello.host_id.clone(),
            pid: hello.pid,
            data_addr,
        });
    }
    let mut failed = None;
    for (rank, slot) in joined.iter_mut().enumerate().skip(1) {
        let (stream, _) = slot.as_mut().expect("all joined");
        let mut rank0_data = my_data;
        if my_data.ip().is_unspecified() {
            if let Ok(local) = stream.local_addr() {
                rank0_data.set_ip(local.ip());
            }
        }
        if let Err(e) = write_message(
            stream,
            MSG_TABLE,
            &encode_table(&job_id, &peers, rank0_data),
        ) {
            failed = Some(Error::PeerDied {
                rank,
                what: "rendezvous".into(),
                detail: format!("could not send the peer table: {e}"),
            });
            break;
        }
    }
    if let Some(err) = failed {
        abort_all(&mut joined, CAT_RENDEZVOUS, &err.to_string());
        return Err(err);
    }
    Ok(Rendezvous {
        job_id,
        peers,
        data_listener,
    })
}

/// After a fatal configuration error, keep answering for a few seconds so ranks that were
/// started together but had not connected yet get the same error instead of waiting for
/// their connect timeout.
#[allow(clippy::too_many_arguments)]
fn linger_and_reject(
    listener: &TcpListener,
    tx: &mpsc::Sender<Event>,
    rx: &mpsc::Receiver<Event>,
    cfg: &CommConfig,
    deadline: Instant,
    told: &mut [bool],
    category: u8,
    text: &str,
) {
    let linger_end = deadline.min(Instant::now() + Duration::from_secs(5));
    let payload = failure_payload(category, text);
    while Instant::now() < linger_end && told.iter().skip(1).any(|t| !t) {
        while let Ok((stream, from)) = listener.accept() {
            let tx = tx.clone();
            let token = cfg.auth_token.clone();
            std::thread::spawn(move || {
                let _ = tx.send(handshake(stream, from, token.as_deref()));
            });
        }
        if let Ok(Event::Joined(mut stream, hello, _)) = rx.recv_timeout(Duration::from_millis(5)) {
            let _ = write_message(&mut stream, MSG_REJECT, &payload);
            if let Some(t) = told.get_mut(hello.rank) {
                *t = true;
            }
        }
    }
}

fn abort_all(joined: &mut [Option<(TcpStream, Hello)>], category: u8, text: &str) {
    let payload = failure_payload(category, text);
    for (stream, _) in joined.iter_mut().flatten() {
        let _ = write_message(stream, MSG_ABORT, &payload);
    }
}

/// Configuration checks of one authenticated hello against rank 0's own settings.
fn check_hello(
    cfg: &CommConfig,
    hello: &Hello,
    joined: &[Option<(TcpStream, Hello)>],
) -> std::result::Result<(), (u8, String)> {
    let who = format!(
        "rank {} (pid {} on {})",
        hello.rank,
        hello.pid,
        hello.host_id.split('|').next().unwrap_or("?")
    );
    if hello.world_size != cfg.world_size {
        return Err((
            CAT_CONFIG,
            format!(
                "{who} has world size {} but rank 0 has world size {}",
                hello.world_size, cfg.world_size
            ),
        ));
    }
    if hello.rank >= cfg.world_size {
        return Err((
            CAT_CONFIG,
            format!(
                "{who}: rank {} is out of range for world size {}",
                hello.rank, cfg.world_size
            ),
        ));
    }
    if hello.rank == 0 {
        return Err((
            CAT_CONFIG,
            format!("two processes claim rank 0: this master and {who}"),
        ));
    }
    if let Some((_, first)) = &joined[hello.rank] {
        return Err((
            CAT_CONFIG,
            format!(
                "two processes claim rank {}: pid {} on {} and pid {} on {}",
                hello.rank,
                first.pid,
                first.host_id.split('|').next().unwrap_or("?"),
                hello.pid,
                hello.host_id.split('|').next().unwrap_or("?")
            ),
        ));
    }
    if hello.config_hash != cfg.config_hash {
        return Err((
            CAT_CONFIG,
            format!(
                "{who} has job config hash {:#018x} but rank 0 has {:#018x} — all ranks must run the same configuration",
                hello.config_hash, cfg.config_hash
            ),
        ));
    }
    if hello.transport != transport_code(cfg.transport) {
        return Err((
            CAT_CONFIG,
            format!(
                "{who} asked for transport {} but rank 0 asked for {}",
                transport_label(hello.transport),
                transport_label(transport_code(cfg.transport))
            ),
        ));
    }
    Ok(())
}

/// Reads and authenticates one hello (runs on its own thread so a silent connection cannot
/// stall the others).
fn handshake(mut stream: TcpStream, from: SocketAddr, token: Option<&str>) -> Event {
    match handshake_inner(&mut stream, from, token) {
        Ok(hello) => Event::Joined(stream, hello, from),
        Err(warning) => Event::Dropped(warning),
    }
}

fn handshake_inner(
    stream: &mut TcpStream,
    from: SocketAddr,
    token: Option<&str>,
) -> std::result::Result<Hello, String> {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)))
        .and_then(|_| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)));
    if let Err(e) = setup {
        return Err(format!("connection from {from}: {e}"));
    }
    let mut head = [0u8; 16];
    if let Err(e) = stream.read_exact(&mut head) {
        return Err(format!(
            "connection from {from} sent no complete hello: {e}"
        ));
    }
    if &head[..8] != HELLO_MAGIC {
        return Err(format!(
            "connection from {from} is not a dtrain rank (bad magic {:02x?}); dropped it",
            &head[..8]
        ));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    if version != PROTOCOL_VERSION {
        let text = format!(
            "protocol version mismatch: this rank speaks version {version}, rank 0 speaks {PROTOCOL_VERSION} — run the same dtrain build everywhere"
        );
        let _ = write_message(stream, MSG_REJECT, &failure_payload(CAT_CONFIG, &text));
        return Err(format!("connection from {from}: {text}"));
    }
    let body_len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
    if body_len > MAX_MESSAGE {
        return Err(format!(
            "connection from {from}: hello of {body_len} bytes is too long"
        ));
    }
    let mut body = vec![0u8; body_len];
    if let Err(e) = stream.read_exact(&mut body) {
        return Err(format!(
            "connection from {from} sent a truncated hello: {e}"
        ));
    }
    let hello = decode_hello_body(&body)
        .map_err(|e| format!("connection from {from} sent a malformed hello: {e}"))?;
    let who = format!("rank {} at {from}", hello.rank);
    let reject = |stream: &mut TcpStream, text: String| {
        let _ = write_message(stream, MSG_REJECT, &failure_payload(CAT_AUTH, &text));
        Err(format!("{who}: {text}"))
    };
    match (token, hello.has_token) {
        (None, false) => {}
        (Some(_), false) => {
            return reject(
                stream,
                "rank 0 requires an auth token but this rank has none — set DTRAIN_AUTH_TOKEN on every rank".into(),
            )
        }
        (None, true) => {
            return reject(
                stream,
                "this rank has an auth token but rank 0 has none — set DTRAIN_AUTH_TOKEN on every rank or on none".into(),
            )
        }
        (Some(token), true) => {
            let server_nonce = auth::nonce();
            let proof = auth::server_proof(token, &hello.client_nonce, &server_nonce, &body);
            let mut challenge = server_nonce.to_vec();
            challenge.extend_from_slice(&proof);
            if let Err(e) = write_message(stream, MSG_CHALLENGE, &challenge) {
                return Err(format!("{who}: sending the auth challenge failed: {e}"));
            }
            let answer = match read_message(stream) {
                Ok((MSG_PROOF, p)) => p,
                Ok((kind, _)) => return Err(format!("{who}: expected an auth proof, got message kind {kind}")),
                Err(e) => return Err(format!("{who}: no auth proof: {e}")),
            };
            if !auth::verify_client_proof(token, &server_nonce, &hello.client_nonce, &body, &answer) {
                return reject(
                    stream,
                    "wrong auth token: this rank's DTRAIN_AUTH_TOKEN differs from rank 0's".into(),
                );
            }
        }
    }
    Ok(hello)
}

// ---- ranks > 0 -----------------------------------------------------------------------

/// The peer table as sent to one rank, with `rank0_data` as rank 0's data address.
fn encode_table(job_id: &str, peers: &[PeerInfo], rank0_data: SocketAddr) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(job_id.as_bytes()).u64(peers.len() as u64);
    for (rank, p) in peers.iter().enumerate() {
        let addr = if rank == 0 { rank0_data } else { p.data_addr };
        w.bytes(p.host_id.as_bytes())
            .u32(p.pid)
            .bytes(addr.to_string().as_bytes());
    }
    w.0
}

fn connect_master(
    cfg: &CommConfig,
    master: &MasterEndpoint,
    deadline: Instant,
) -> Result<TcpStream> {
    let addrs = &master.addrs;
    let mut backoff = Duration::from_millis(10);
    loop {
        let mut last_error = None;
        for addr in addrs {
            let limit = remaining(deadline).clamp(Duration::from_millis(1), Duration::from_secs(5));
            match TcpStream::connect_timeout(addr, limit) {
                Ok(s) => return Ok(s),
                Err(e) => last_error = Some(e),
            }
        }
        if Instant::now() >= deadline {
            let e = last_error.expect("tried at least one address");
            let reason = match e.kind() {
                io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => "no answer".to_string(),
                _ => e.to_string(),
            };
            return Err(Error::Rendezvous(format!(
                "could not reach master at {} after {:.1}s: {reason} — is rank 0 running?",
                master.label,
                cfg.timeouts.connect.as_secs_f64()
            )));
        }
        std::thread::sleep(backoff.min(remaining(deadline)));
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// A rank > 0's side: connect to rank 0 at `master` (retrying until `deadline`) and join.
pub(crate) fn join(
    cfg: &CommConfig,
    master: &MasterEndpoint,
    deadline: Instant,
) -> Result<Rendezvous> {
    let stream = connect_master(cfg, master, deadline)?;
    join_on(cfg, stream, &master.label, deadline)
}

/// [`join`] on a connection to rank 0 already made (`label` names rank 0's address).
pub(crate) fn join_on(
    cfg: &CommConfig,
    mut stream: TcpStream,
    label: &str,
    deadline: Instant,
) -> Result<Rendezvous> {
    let master = format!("master {label}");
    let io_err = |what: &str, e: io::Error| -> Error {
        if is_timeout(&e) {
            Error::Timeout {
                rank: 0,
                what: format!("rendezvous ({what}; is {master} a dtrain rank 0?)"),
                waited: cfg.timeouts.connect,
            }
        } else {
            Error::PeerDied {
                rank: 0,
                what: "rendezvous".into(),
                detail: format!("{what}: {e}"),
            }
        }
    };
    let local_ip = stream
        .local_addr()
        .map_err(|e| Error::io("rendezvous socket address", e))?
        .ip();
    let data_listener = bind_data_listener(local_ip)?;
    let data_addr = data_listener
        .local_addr()
        .map_err(|e| Error::io("data listener address", e))?;
    let hello = Hello {
        rank: cfg.rank,
        world_size: cfg.world_size,
        config_hash: cfg.config_hash,
        transport: transport_code(cfg.transport),
        has_token: cfg.auth_token.is_some(),
        client_nonce: auth::nonce(),
        host_id: host_identity(),
        pid: std::process::id(),
        data_addr: data_addr.to_string(),
    };
    let body = encode_hello_body(&hello);
    let mut frame = HELLO_MAGIC.to_vec();
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(&body);
    // Handshake replies come quickly; the peer table waits for the slowest rank.
    let step_timeout = remaining(deadline)
        .max(Duration::from_secs(1))
        .min(HANDSHAKE_TIMEOUT * 2);
    stream
        .set_read_timeout(Some(step_timeout))
        .and_then(|_| stream.set_write_timeout(Some(step_timeout)))
        .map_err(|e| Error::io("rendezvous socket", e))?;
    stream
        .write_all(&frame)
        .map_err(|e| io_err("sending hello", e))?;
    let mut auth_failure = None;
    let rejected_by = format!("rejected by rank 0 ({master})");
    loop {
        let (kind, payload) = read_message(&mut stream)
            .map_err(|e| io_err("waiting for rank 0 to accept this rank", e))?;
        match kind {
            MSG_CHALLENGE => {
                let token = cfg.auth_token.as_deref().unwrap_or("");
                if payload.len() != auth::NONCE_LEN + auth::PROOF_LEN {
                    return Err(Error::Protocol {
                        rank: 0,
                        detail: "malformed auth challenge".into(),
                    });
                }
                let (server_nonce, server_proof) = payload.split_at(auth::NONCE_LEN);
                if !auth::verify_server_proof(
                    token,
                    &hello.client_nonce,
                    server_nonce,
                    &body,
                    server_proof,
                ) {
                    auth_failure = Some(Error::Auth(format!(
                        "{master} could not prove it knows this rank's auth token — DTRAIN_AUTH_TOKEN differs between ranks"
                    )));
                }
                let proof = auth::client_proof(token, server_nonce, &hello.client_nonce, &body);
                write_message(&mut stream, MSG_PROOF, &proof)
                    .map_err(|e| io_err("sending auth proof", e))?;
            }
            MSG_REJECT | MSG_ABORT => {
                return Err(auth_failure.unwrap_or_else(|| failure_error(&payload, &rejected_by)))
            }
            MSG_ACCEPT => {
                if let Some(err) = auth_failure {
                    return Err(err);
                }
                break;
            }
            other => {
                return Err(Error::Protocol {
                    rank: 0,
                    detail: format!("unexpected rendezvous message kind {other}"),
                })
            }
        }
    }
    // Accepted: wait (until rank 0's own deadline, plus slack) for everyone else to join.
    stream
        .set_read_timeout(Some(remaining(deadline) + Duration::from_secs(10)))
        .map_err(|e| Error::io("rendezvous socket", e))?;
    let (kind, payload) =
        read_message(&mut stream).map_err(|e| io_err("waiting for the peer table", e))?;
    match kind {
        MSG_TABLE => {}
        MSG_ABORT | MSG_REJECT => {
            return Err(failure_error(
                &payload,
                &format!("rank 0 ({master}) aborted the rendezvous"),
            ))
        }
        other => {
            return Err(Error::Protocol {
                rank: 0,
                detail: format!("expected the peer table, got message kind {other}"),
            })
        }
    }
    let bad = |e: String| Error::Protocol {
        rank: 0,
        detail: format!("malformed peer table: {e}"),
    };
    let mut r = Reader::new(&payload);
    let job_id = r.string().map_err(bad)?;
    let n = r.u64().map_err(bad)? as usize;
    if n != cfg.world_size {
        return Err(bad(format!(
            "{n} entries for world size {}",
            cfg.world_size
        )));
    }
    let mut peers = Vec::with_capacity(n);
    for _ in 0..n {
        let host_id = r.string().map_err(bad)?;
        let pid = r.u32().map_err(bad)?;
        let addr = r.string().map_err(bad)?;
        let data_addr = addr
            .parse()
            .map_err(|_| bad(format!("bad address {addr:?}")))?;
        peers.push(PeerInfo {
            host_id,
            pid,
            data_addr,
        });
    }
    if peers[cfg.rank].data_addr != data_addr {
        return Err(bad("this rank's own entry is wrong".into()));
    }
    Ok(Rendezvous {
        job_id,
        peers,
        data_listener,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trips_and_truncation_is_an_error() {
        let h = Hello {
            rank: 3,
            world_size: 8,
            config_hash: 0xdead_beef,
            transport: 2,
            has_token: true,
            client_nonce: [7; 32],
            host_id: "node|m|b".into(),
            pid: 1234,
            data_addr: "10.0.0.2:40000".into(),
        };
        let body = encode_hello_body(&h);
        assert_eq!(decode_hello_body(&body), Ok(h));
        assert!(decode_hello_body(&body[..body.len() - 1]).is_err());
    }

    #[test]
    fn host_identity_is_stable() {
        assert_eq!(host_identity(), host_identity());
        assert!(host_identity().contains('|'));
    }
}
