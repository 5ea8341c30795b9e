//! Rank 0's side of the rendezvous: accept connections, authenticate each hello on its own
//! thread, check it against rank 0's configuration, and send everyone the peer table.
//!
//! Failure policy: a configuration mismatch from a correctly authenticated rank (duplicate
//! rank, rank out of range, different world size / config hash / transport) fails the whole
//! job at once — the offending rank gets a reject, the ranks already in get an abort, and
//! rank 0 returns the error; all name the problem. Garbage on the port (wrong magic) or a
//! failed authentication only drops that connection with a warning — a stranger cannot kill a
//! job — and is listed in rank 0's error if the job then times out waiting for that rank.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::peers::{bind_data_listener, host_identity, PeerInfo, Rendezvous};
use super::wire::{
    category_error, decode_hello_body, encode_table, failure_payload, parse_hello_head,
    read_message, transport_code, transport_label, write_message, Hello, CAT_AUTH, CAT_CONFIG,
    CAT_RENDEZVOUS, HANDSHAKE_TIMEOUT, HELLO_HEAD_LEN, MAX_MESSAGE, MSG_ABORT, MSG_ACCEPT,
    MSG_CHALLENGE, MSG_PROOF, MSG_REJECT, MSG_TABLE, PROTOCOL_VERSION,
};
use crate::auth;
use crate::config::CommConfig;
use crate::{Error, PeerAt, Result};

/// Binds rank 0's rendezvous port on the first of `addrs` that works.
pub(super) fn bind_master(cfg: &CommConfig, addrs: &[SocketAddr]) -> Result<TcpListener> {
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

enum Event {
    /// An authenticated hello, ready for the configuration checks.
    Joined(TcpStream, Hello, SocketAddr),
    /// A connection that was dropped (garbage, wrong version, failed auth): a warning.
    Dropped(String),
}

/// Rank 0's side, on an already bound `listener` (`label` names it in messages). A listener
/// on the unspecified address (store rendezvous) gets a data listener there too, and each
/// rank is told rank 0's data address on the interface that rank reached it by.
pub(super) fn serve(
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
    let mut lobby = Lobby::new(cfg, listener);
    lobby.wait_for_everyone(label, deadline)?;
    let job_id: String = auth::nonce()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let peers = lobby.peer_table(my_data)?;
    // With a token every rank derives the key; without one, the table carries a random one.
    let (data_key, sent_key) = match &cfg.auth_token {
        Some(token) => (auth::data_key(token, &job_id), Vec::new()),
        None => {
            let key = auth::nonce();
            (key, key.to_vec())
        }
    };
    lobby.send_tables(&job_id, &peers, my_data, &sent_key)?;
    Ok(Rendezvous {
        job_id,
        peers,
        data_key,
        data_listener,
    })
}

/// The ranks that have joined so far, and the connections still being authenticated.
struct Lobby<'a> {
    cfg: &'a CommConfig,
    listener: TcpListener,
    tx: mpsc::Sender<Event>,
    rx: mpsc::Receiver<Event>,
    /// `joined[r]`: rank r's accepted connection and hello (`None` for rank 0 and the missing).
    joined: Vec<Option<(TcpStream, Hello)>>,
    /// Warnings about dropped connections, for the timeout message.
    dropped: Vec<String>,
}

impl<'a> Lobby<'a> {
    fn new(cfg: &'a CommConfig, listener: TcpListener) -> Lobby<'a> {
        let (tx, rx) = mpsc::channel::<Event>();
        Lobby {
            cfg,
            listener,
            tx,
            rx,
            joined: (0..cfg.world_size).map(|_| None).collect(),
            dropped: Vec::new(),
        }
    }

    /// Authenticates `stream` on its own thread, so a silent connection cannot stall the others.
    fn spawn_handshake(&self, stream: TcpStream, from: SocketAddr) {
        let tx = self.tx.clone();
        let token = self.cfg.auth_token.clone();
        std::thread::spawn(move || {
            let _ = tx.send(handshake(stream, from, token.as_deref()));
        });
    }

    fn accept_pending(&self) {
        loop {
            match self.listener.accept() {
                Ok((stream, from)) => self.spawn_handshake(stream, from),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    eprintln!("dtrain rendezvous: rank 0: warning: accept failed: {e}");
                    break;
                }
            }
        }
    }

    /// Until every rank has joined: accept, admit authenticated hellos, fail on a mismatch or
    /// at `deadline`.
    fn wait_for_everyone(&mut self, label: &str, deadline: Instant) -> Result<()> {
        loop {
            self.accept_pending();
            if self.joined[1..].iter().all(Option::is_some) {
                return Ok(());
            }
            match self.rx.recv_timeout(Duration::from_millis(5)) {
                Ok(Event::Joined(stream, hello, from)) => {
                    self.admit(stream, hello, from, deadline)?
                }
                Ok(Event::Dropped(warning)) => {
                    eprintln!("dtrain rendezvous: rank 0: warning: {warning}");
                    self.dropped.push(warning);
                }
                Err(_) => {}
            }
            if Instant::now() >= deadline {
                return Err(self.time_out(label));
            }
        }
    }

    /// Accepts one authenticated rank, or fails the whole job if its configuration differs.
    fn admit(
        &mut self,
        mut stream: TcpStream,
        hello: Hello,
        from: SocketAddr,
        deadline: Instant,
    ) -> Result<()> {
        match check_hello(self.cfg, &hello, &self.joined) {
            Ok(()) => {
                if let Err(e) = write_message(&mut stream, MSG_ACCEPT, &[]) {
                    eprintln!(
                        "dtrain rendezvous: rank 0: warning: rank {} ({from}) vanished before it was accepted: {e}",
                        hello.rank
                    );
                    return Ok(());
                }
                let rank = hello.rank;
                self.joined[rank] = Some((stream, hello));
                Ok(())
            }
            Err((category, text)) => {
                let _ = write_message(&mut stream, MSG_REJECT, &failure_payload(category, &text));
                self.abort_all(category, &text);
                let mut told: Vec<bool> = self.joined.iter().map(Option::is_some).collect();
                if let Some(t) = told.get_mut(hello.rank) {
                    *t = true;
                }
                self.linger_and_reject(deadline, &mut told, category, &text);
                Err(category_error(category, text))
            }
        }
    }

    fn time_out(&mut self, label: &str) -> Error {
        let missing: Vec<usize> = (1..self.cfg.world_size)
            .filter(|&r| self.joined[r].is_none())
            .collect();
        let mut text = format!(
            "rank 0 timed out after {:?} waiting for ranks {missing:?} to join at {label}",
            self.cfg.timeouts.connect
        );
        if !self.dropped.is_empty() {
            text.push_str(&format!(
                "; rejected connections: {}",
                self.dropped.join("; ")
            ));
        }
        self.abort_all(CAT_RENDEZVOUS, &text);
        Error::Rendezvous(text)
    }

    /// After a fatal configuration error, keep answering for a few seconds so ranks that were
    /// started together but had not connected yet get the same error instead of waiting for
    /// their connect timeout.
    fn linger_and_reject(&self, deadline: Instant, told: &mut [bool], category: u8, text: &str) {
        let linger_end = deadline.min(Instant::now() + Duration::from_secs(5));
        let payload = failure_payload(category, text);
        while Instant::now() < linger_end && told.iter().skip(1).any(|t| !t) {
            while let Ok((stream, from)) = self.listener.accept() {
                self.spawn_handshake(stream, from);
            }
            if let Ok(Event::Joined(mut stream, hello, _)) =
                self.rx.recv_timeout(Duration::from_millis(5))
            {
                let _ = write_message(&mut stream, MSG_REJECT, &payload);
                if let Some(t) = told.get_mut(hello.rank) {
                    *t = true;
                }
            }
        }
    }

    fn abort_all(&mut self, category: u8, text: &str) {
        let payload = failure_payload(category, text);
        for (stream, _) in self.joined.iter_mut().flatten() {
            let _ = write_message(stream, MSG_ABORT, &payload);
        }
    }

    /// Everyone's entry, rank 0's (with `my_data`) first.
    fn peer_table(&self, my_data: SocketAddr) -> Result<Vec<PeerInfo>> {
        let mut peers = vec![PeerInfo {
            host_id: host_identity(),
            pid: std::process::id(),
            data_addr: my_data,
        }];
        for (_, hello) in self.joined.iter().skip(1).flatten() {
            let data_addr = hello.data_addr.parse().map_err(|_| Error::Protocol {
                rank: hello.rank,
                detail: format!("bad data address {:?}", hello.data_addr),
            })?;
            peers.push(PeerInfo {
                host_id: hello.host_id.clone(),
                pid: hello.pid,
                data_addr,
            });
        }
        Ok(peers)
    }

    /// Sends each rank the table, with rank 0's data address on the interface it came in by
    /// when rank 0 listens on the unspecified address; aborts everyone if one send fails.
    fn send_tables(
        &mut self,
        job_id: &str,
        peers: &[PeerInfo],
        my_data: SocketAddr,
        data_key: &[u8],
    ) -> Result<()> {
        let mut failed = None;
        for (rank, slot) in self.joined.iter_mut().enumerate().skip(1) {
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
                &encode_table(job_id, peers, rank0_data, data_key),
            ) {
                failed = Some(Error::PeerDied {
                    rank,
                    at: PeerAt::Unknown,
                    what: "rendezvous".into(),
                    detail: format!("could not send the peer table: {e}"),
                });
                break;
            }
        }
        if let Some(err) = failed {
            self.abort_all(CAT_RENDEZVOUS, &err.to_string());
            return Err(err);
        }
        Ok(())
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
    check_settings(cfg, hello, &who)
}

/// The job-wide settings every rank must share with rank 0.
fn check_settings(
    cfg: &CommConfig,
    hello: &Hello,
    who: &str,
) -> std::result::Result<(), (u8, String)> {
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

/// Reads and authenticates one hello.
fn handshake(mut stream: TcpStream, from: SocketAddr, token: Option<&str>) -> Event {
    let result = read_hello(&mut stream, from).and_then(|(hello, body)| {
        authenticate(&mut stream, from, token, &hello, &body).map(|()| hello)
    });
    match result {
        Ok(hello) => Event::Joined(stream, hello, from),
        Err(warning) => Event::Dropped(warning),
    }
}

/// The hello and its body bytes (the auth proofs cover them); `Err` is the warning to log.
fn read_hello(
    stream: &mut TcpStream,
    from: SocketAddr,
) -> std::result::Result<(Hello, Vec<u8>), String> {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT)))
        .and_then(|_| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)));
    if let Err(e) = setup {
        return Err(format!("connection from {from}: {e}"));
    }
    let mut head = [0u8; HELLO_HEAD_LEN];
    if let Err(e) = stream.read_exact(&mut head) {
        return Err(format!(
            "connection from {from} sent no complete hello: {e}"
        ));
    }
    let (version, body_len) = parse_hello_head(&head).map_err(|magic| {
        format!("connection from {from} is not a dtrain rank (bad magic {magic:02x?}); dropped it")
    })?;
    if version != PROTOCOL_VERSION {
        let text = format!(
            "protocol version mismatch: this rank speaks version {version}, rank 0 speaks {PROTOCOL_VERSION} — run the same dtrain build everywhere"
        );
        let _ = write_message(stream, MSG_REJECT, &failure_payload(CAT_CONFIG, &text));
        return Err(format!("connection from {from}: {text}"));
    }
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
    Ok((hello, body))
}

/// Both sides prove the token (see [`crate::auth`]), or both have none.
fn authenticate(
    stream: &mut TcpStream,
    from: SocketAddr,
    token: Option<&str>,
    hello: &Hello,
    body: &[u8],
) -> std::result::Result<(), String> {
    let who = format!("rank {} at {from}", hello.rank);
    let reject = |stream: &mut TcpStream, text: String| {
        let _ = write_message(stream, MSG_REJECT, &failure_payload(CAT_AUTH, &text));
        Err(format!("{who}: {text}"))
    };
    let token = match (token, hello.has_token) {
        (None, false) => return Ok(()),
        (Some(_), false) => return reject(
            stream,
            "rank 0 requires an auth token but this rank has none — set DTRAIN_AUTH_TOKEN on every rank".into(),
        ),
        (None, true) => return reject(
            stream,
            "this rank has an auth token but rank 0 has none — set DTRAIN_AUTH_TOKEN on every rank or on none".into(),
        ),
        (Some(token), true) => token,
    };
    let server_nonce = auth::nonce();
    let proof = auth::server_proof(token, &hello.client_nonce, &server_nonce, body);
    let mut challenge = server_nonce.to_vec();
    challenge.extend_from_slice(&proof);
    if let Err(e) = write_message(stream, MSG_CHALLENGE, &challenge) {
        return Err(format!("{who}: sending the auth challenge failed: {e}"));
    }
    let answer = match read_message(stream) {
        Ok((MSG_PROOF, p)) => p,
        Ok((kind, _)) => {
            return Err(format!(
                "{who}: expected an auth proof, got message kind {kind}"
            ))
        }
        Err(e) => return Err(format!("{who}: no auth proof: {e}")),
    };
    if !auth::verify_client_proof(token, &server_nonce, &hello.client_nonce, body, &answer) {
        return reject(
            stream,
            "wrong auth token: this rank's DTRAIN_AUTH_TOKEN differs from rank 0's".into(),
        );
    }
    Ok(())
}
