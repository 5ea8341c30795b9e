//! The rendezvous wire format: the hello frame, the framed messages after it, and the encoding
//! of their bodies (the hello, the peer table, reject/abort reasons).
//!
//! `b"DTRAINRV" | version u32 | body_len u32 | body`, body = rank, world size, config hash,
//! transport kind, whether it holds an auth token, a client nonce, host identity, pid, data
//! address. Later messages are `kind u8 | len u32 | payload`. Integers are little-endian;
//! byte strings are `len u32 | bytes`.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::peers::PeerInfo;
use crate::auth;
use crate::config::TransportKind;
use crate::Error;

const HELLO_MAGIC: &[u8; 8] = b"DTRAINRV";
/// 2: the peer table carries the data-plane key (empty with an auth token).
pub const PROTOCOL_VERSION: u32 = 2;
pub(super) const MAX_MESSAGE: usize = 1 << 20;
/// How long rank 0 waits for a freshly accepted connection to say hello.
pub(super) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Magic, version and body length.
pub(super) const HELLO_HEAD_LEN: usize = 16;

// Message kinds after the hello.
pub(super) const MSG_CHALLENGE: u8 = 1;
pub(super) const MSG_REJECT: u8 = 2;
pub(super) const MSG_ACCEPT: u8 = 3;
pub(super) const MSG_TABLE: u8 = 4;
pub(super) const MSG_ABORT: u8 = 5;
pub(super) const MSG_PROOF: u8 = 6;

// Categories carried by reject/abort so every rank returns the same error variant.
pub(super) const CAT_RENDEZVOUS: u8 = 0;
pub(super) const CAT_AUTH: u8 = 1;
pub(super) const CAT_CONFIG: u8 = 2;

/// The first message of a joining rank (its body; see [`hello_frame`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Hello {
    pub(super) rank: usize,
    pub(super) world_size: usize,
    pub(super) config_hash: u64,
    pub(super) transport: u8,
    pub(super) has_token: bool,
    pub(super) client_nonce: [u8; auth::NONCE_LEN],
    pub(super) host_id: String,
    pub(super) pid: u32,
    pub(super) data_addr: String,
}

pub(super) fn transport_code(kind: TransportKind) -> u8 {
    match kind {
        TransportKind::Auto => 0,
        TransportKind::Shm => 1,
        TransportKind::Tcp => 2,
    }
}

pub(super) fn transport_label(code: u8) -> &'static str {
    match code {
        0 => "auto",
        1 => "shm",
        2 => "tcp",
        _ => "unknown",
    }
}

#[derive(Default)]
pub(super) struct Writer(pub(super) Vec<u8>);

impl Writer {
    pub(super) fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    pub(super) fn u32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(super) fn u64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(super) fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
}

pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Self {
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
    pub(super) fn u8(&mut self) -> std::result::Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub(super) fn u32(&mut self) -> std::result::Result<u32, String> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
    pub(super) fn u64(&mut self) -> std::result::Result<u64, String> {
        Ok(u64::from_le_bytes(
            self.take(8)?.try_into().expect("8 bytes"),
        ))
    }
    pub(super) fn bytes(&mut self) -> std::result::Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub(super) fn string(&mut self) -> std::result::Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| "invalid UTF-8".to_string())
    }
}

pub(super) fn encode_hello_body(h: &Hello) -> Vec<u8> {
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

pub(super) fn decode_hello_body(body: &[u8]) -> std::result::Result<Hello, String> {
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

pub(super) fn write_message(stream: &mut TcpStream, kind: u8, payload: &[u8]) -> io::Result<()> {
    let mut frame = Vec::with_capacity(5 + payload.len());
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    stream.write_all(&frame)
}

pub(super) fn read_message(stream: &mut TcpStream) -> io::Result<(u8, Vec<u8>)> {
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

pub(super) fn failure_payload(category: u8, text: &str) -> Vec<u8> {
    let mut p = vec![category];
    p.extend_from_slice(text.as_bytes());
    p
}

pub(super) fn failure_error(payload: &[u8], from_master: &str) -> Error {
    let (category, text) = match payload.split_first() {
        Some((c, rest)) => (*c, String::from_utf8_lossy(rest).into_owned()),
        None => (CAT_RENDEZVOUS, String::new()),
    };
    category_error(category, format!("{from_master}: {text}"))
}

/// The error a failure of `category` is reported as, on every rank alike.
pub(super) fn category_error(category: u8, text: String) -> Error {
    match category {
        CAT_AUTH => Error::Auth(text),
        CAT_CONFIG => Error::ConfigMismatch(text),
        _ => Error::Rendezvous(text),
    }
}

pub(super) fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

pub(super) fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// The whole hello as a joining rank sends it.
pub(super) fn hello_frame(body: &[u8]) -> Vec<u8> {
    let mut frame = HELLO_MAGIC.to_vec();
    frame.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

/// `(version, body length)` of a hello head, or the bytes that are not dtrain's magic.
pub(super) fn parse_hello_head(
    head: &[u8; HELLO_HEAD_LEN],
) -> std::result::Result<(u32, usize), [u8; 8]> {
    if &head[..8] != HELLO_MAGIC {
        return Err(head[..8].try_into().expect("8 bytes"));
    }
    let version = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
    let body_len = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes")) as usize;
    Ok((version, body_len))
}

/// The peer table as sent to one rank, with `rank0_data` as rank 0's data address, and
/// `data_key` (the job's data-plane key, or nothing when every rank derives it from the token).
pub(super) fn encode_table(
    job_id: &str,
    peers: &[PeerInfo],
    rank0_data: SocketAddr,
    data_key: &[u8],
) -> Vec<u8> {
    let mut w = Writer::default();
    w.bytes(job_id.as_bytes()).u64(peers.len() as u64);
    for (rank, p) in peers.iter().enumerate() {
        let addr = if rank == 0 { rank0_data } else { p.data_addr };
        w.bytes(p.host_id.as_bytes())
            .u32(p.pid)
            .bytes(addr.to_string().as_bytes());
    }
    w.bytes(data_key);
    w.0
}

/// What [`encode_table`] wrote: the job id, `world_size` peers and the data key bytes.
pub(super) fn decode_table(
    payload: &[u8],
    world_size: usize,
) -> std::result::Result<(String, Vec<PeerInfo>, Vec<u8>), String> {
    let mut r = Reader::new(payload);
    let job_id = r.string()?;
    let n = r.u64()? as usize;
    if n != world_size {
        return Err(format!("{n} entries for world size {world_size}"));
    }
    let mut peers = Vec::with_capacity(n);
    for _ in 0..n {
        let host_id = r.string()?;
        let pid = r.u32()?;
        let addr = r.string()?;
        let data_addr = addr.parse().map_err(|_| format!("bad address {addr:?}"))?;
        peers.push(PeerInfo {
            host_id,
            pid,
            data_addr,
        });
    }
    let data_key = r.bytes()?.to_vec();
    Ok((job_id, peers, data_key))
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
    fn table_round_trips_with_rank0s_address_per_connection() {
        let peers: Vec<PeerInfo> = (0..3)
            .map(|r| PeerInfo {
                host_id: format!("h{r}|m|b"),
                pid: 100 + r,
                data_addr: format!("10.0.0.{r}:4000").parse().unwrap(),
            })
            .collect();
        let rank0: SocketAddr = "192.168.1.1:5000".parse().unwrap();
        let bytes = encode_table("job", &peers, rank0, &[9; 32]);
        let (job, got, key) = decode_table(&bytes, 3).unwrap();
        assert_eq!((job.as_str(), key), ("job", vec![9; 32]));
        assert_eq!(got[0].data_addr, rank0);
        assert_eq!(got[1..], peers[1..]);
        assert!(decode_table(&bytes, 4).is_err());
        assert!(decode_table(&bytes[..bytes.len() - 2], 3).is_err());
    }

    #[test]
    fn hello_head_names_bad_magic() {
        let frame = hello_frame(b"body");
        let head: [u8; HELLO_HEAD_LEN] = frame[..HELLO_HEAD_LEN].try_into().unwrap();
        assert_eq!(parse_hello_head(&head), Ok((PROTOCOL_VERSION, 4)));
        let garbage = [b'G'; HELLO_HEAD_LEN];
        assert_eq!(parse_hello_head(&garbage), Err([b'G'; 8]));
    }
}
