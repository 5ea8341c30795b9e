//! A joining rank's side of the rendezvous (ranks > 0): reach rank 0, say hello, answer its
//! auth challenge, and wait for the peer table.

use std::io::{self, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use super::peers::{bind_data_listener, host_identity, MasterEndpoint, Rendezvous};
use super::wire::{
    decode_table, encode_hello_body, failure_error, hello_frame, is_timeout, read_message,
    remaining, transport_code, write_message, Hello, HANDSHAKE_TIMEOUT, MSG_ABORT, MSG_ACCEPT,
    MSG_CHALLENGE, MSG_PROOF, MSG_REJECT, MSG_TABLE,
};
use crate::auth;
use crate::config::CommConfig;
use crate::{Error, PeerAt, Result};

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
pub(super) fn join(
    cfg: &CommConfig,
    master: &MasterEndpoint,
    deadline: Instant,
) -> Result<Rendezvous> {
    let stream = connect_master(cfg, master, deadline)?;
    join_on(cfg, stream, &master.label, deadline)
}

/// [`join`] on a connection to rank 0 already made (`label` names rank 0's address).
pub(super) fn join_on(
    cfg: &CommConfig,
    mut stream: TcpStream,
    label: &str,
    deadline: Instant,
) -> Result<Rendezvous> {
    let master = format!("master {label}");
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
    // Handshake replies come quickly; the peer table waits for the slowest rank.
    let step_timeout = remaining(deadline)
        .max(Duration::from_secs(1))
        .min(HANDSHAKE_TIMEOUT * 2);
    stream
        .set_read_timeout(Some(step_timeout))
        .and_then(|_| stream.set_write_timeout(Some(step_timeout)))
        .map_err(|e| Error::io("rendezvous socket", e))?;
    stream
        .write_all(&hello_frame(&body))
        .map_err(|e| io_error(cfg, &master, "sending hello", e))?;
    await_accept(cfg, &mut stream, &master, &hello, &body)?;
    let payload = await_table(cfg, &mut stream, &master, deadline)?;
    let bad = |e: String| Error::Protocol {
        rank: 0,
        detail: format!("malformed peer table: {e}"),
    };
    let (job_id, peers, sent_key) = decode_table(&payload, cfg.world_size).map_err(bad)?;
    if peers[cfg.rank].data_addr != data_addr {
        return Err(bad("this rank's own entry is wrong".into()));
    }
    let data_key = data_key(cfg, &job_id, sent_key).map_err(bad)?;
    Ok(Rendezvous {
        job_id,
        peers,
        data_key,
        data_listener,
    })
}

/// The job's data-plane key: derived from the token, or the one rank 0 sent when there is none.
fn data_key(
    cfg: &CommConfig,
    job_id: &str,
    sent: Vec<u8>,
) -> std::result::Result<auth::DataKey, String> {
    match &cfg.auth_token {
        Some(token) if sent.is_empty() => Ok(auth::data_key(token, job_id)),
        None => sent
            .try_into()
            .map_err(|k: Vec<u8>| format!("a data key of {} bytes", k.len())),
        Some(_) => Err("a data key sent in the clear although this job has a token".into()),
    }
}

/// A failed read or write on the rendezvous connection: a timeout (rank 0 silent) or a
/// vanished rank 0.
fn io_error(cfg: &CommConfig, master: &str, what: &str, e: io::Error) -> Error {
    if is_timeout(&e) {
        Error::Timeout {
            rank: 0,
            at: PeerAt::Unknown,
            what: format!("rendezvous ({what}; is {master} a dtrain rank 0?)"),
            waited: cfg.timeouts.connect,
        }
    } else {
        Error::PeerDied {
            rank: 0,
            at: PeerAt::Unknown,
            what: "rendezvous".into(),
            detail: format!("{what}: {e}"),
        }
    }
}

/// Answers rank 0's auth challenge (if any) until it accepts or rejects this rank. A rank 0
/// that cannot prove the token is an auth error even if it then accepts.
fn await_accept(
    cfg: &CommConfig,
    stream: &mut TcpStream,
    master: &str,
    hello: &Hello,
    body: &[u8],
) -> Result<()> {
    let mut auth_failure = None;
    let rejected_by = format!("rejected by rank 0 ({master})");
    loop {
        let (kind, payload) = read_message(stream)
            .map_err(|e| io_error(cfg, master, "waiting for rank 0 to accept this rank", e))?;
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
                    body,
                    server_proof,
                ) {
                    auth_failure = Some(Error::Auth(format!(
                        "{master} could not prove it knows this rank's auth token — DTRAIN_AUTH_TOKEN differs between ranks"
                    )));
                }
                let proof = auth::client_proof(token, server_nonce, &hello.client_nonce, body);
                write_message(stream, MSG_PROOF, &proof)
                    .map_err(|e| io_error(cfg, master, "sending auth proof", e))?;
            }
            MSG_REJECT | MSG_ABORT => {
                return Err(auth_failure.unwrap_or_else(|| failure_error(&payload, &rejected_by)))
            }
            MSG_ACCEPT => return auth_failure.map_or(Ok(()), Err),
            other => {
                return Err(Error::Protocol {
                    rank: 0,
                    detail: format!("unexpected rendezvous message kind {other}"),
                })
            }
        }
    }
}

/// Accepted: wait (until rank 0's own deadline, plus slack) for everyone else to join; the
/// table's payload.
fn await_table(
    cfg: &CommConfig,
    stream: &mut TcpStream,
    master: &str,
    deadline: Instant,
) -> Result<Vec<u8>> {
    stream
        .set_read_timeout(Some(remaining(deadline) + Duration::from_secs(10)))
        .map_err(|e| Error::io("rendezvous socket", e))?;
    let (kind, payload) =
        read_message(stream).map_err(|e| io_error(cfg, master, "waiting for the peer table", e))?;
    match kind {
        MSG_TABLE => Ok(payload),
        MSG_ABORT | MSG_REJECT => Err(failure_error(
            &payload,
            &format!("rank 0 ({master}) aborted the rendezvous"),
        )),
        other => Err(Error::Protocol {
            rank: 0,
            detail: format!("expected the peer table, got message kind {other}"),
        }),
    }
}
