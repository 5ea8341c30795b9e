//! Data-plane authentication: the handshake at the start of every TCP connection between two
//! ranks (the mesh built after rendezvous), proving both ends hold the job's data-plane key.
//!
//! The key comes from the rendezvous ([`super::Rendezvous::data_key`]): with an auth token
//! every rank derives it from the token and the job id ([`auth::data_key`]), so it never
//! crosses the wire; without one, rank 0 draws a random key and sends it in the peer table,
//! so a stranger who only finds a rank's data port still cannot connect.
//!
//! The higher mesh rank connects (the *connector*) and the lower one accepts (the *acceptor*):
//!
//! ```text
//! connector -> acceptor: b"DTRAINDA" | connector rank u64 | connector nonce (32)
//! acceptor -> connector: acceptor rank u64 | acceptor nonce (32) | acceptor proof (32)
//! connector -> acceptor: connector proof (32)
//! acceptor -> connector: 0xA5 (admitted)
//! ```
//!
//! Each proof is `HMAC(key, direction label | connector nonce | acceptor nonce | connector
//! rank | acceptor rank)` ([`auth::data_proof`]). Both nonces are fresh per connection, so a
//! handshake recorded from a real connection and replayed fails; the direction label keeps an
//! acceptor's proof from passing as a connector's. The acceptor treats everything as a
//! stranger's until the proof checks out — garbage, a bad rank claim, a replay, a wrong key,
//! a silence past [`HANDSHAKE_TIMEOUT`] all drop only that connection. Every read has a
//! deadline.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::auth::{self, DataKey, DataRole, NONCE_LEN, PROOF_LEN};
use crate::{Error, PeerAt, Result};

const MAGIC: &[u8; 8] = b"DTRAINDA";
/// The connector's first message.
pub const INTRO_LEN: usize = 8 + 8 + NONCE_LEN;
/// The acceptor's answer.
const CHALLENGE_LEN: usize = 8 + NONCE_LEN + PROOF_LEN;
const ADMITTED: u8 = 0xA5;
/// How long an acceptor gives a new connection to complete its side of the handshake (a real
/// rank answers within a round trip).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

fn until(deadline: Instant) -> Option<Duration> {
    Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    )
}

/// Connector side: prove this rank (`rank`) to the acceptor `peer` listening at `addr`, and
/// check its proof. Reads wait until `deadline` (the acceptor may still be connecting to its
/// own lower ranks before it answers).
pub fn introduce(
    stream: &TcpStream,
    key: &DataKey,
    (rank, peer): (usize, usize),
    addr: SocketAddr,
    deadline: Instant,
) -> Result<()> {
    let failed = |what: &str, e: io::Error| Error::PeerDied {
        rank: peer,
        at: PeerAt::Unknown,
        what: "TCP mesh setup".into(),
        detail: format!("{what} with {addr} failed: {e}"),
    };
    stream
        .set_read_timeout(until(deadline))
        .and_then(|_| stream.set_write_timeout(until(deadline)))
        .map_err(|e| Error::io(format!("configuring connection to rank {peer}"), e))?;
    let nonce = auth::nonce();
    let mut intro = Vec::with_capacity(INTRO_LEN);
    intro.extend_from_slice(MAGIC);
    intro.extend_from_slice(&(rank as u64).to_le_bytes());
    intro.extend_from_slice(&nonce);
    let mut challenge = [0u8; CHALLENGE_LEN];
    (&*stream)
        .write_all(&intro)
        .and_then(|_| (&*stream).read_exact(&mut challenge))
        .map_err(|e| failed("the introduction", e))?;
    let answered = u64::from_le_bytes(challenge[..8].try_into().expect("8 bytes"));
    if answered != peer as u64 {
        return Err(Error::Protocol {
            rank: peer,
            detail: format!(
                "the listener at {addr} answered as rank {answered}, expected rank {peer}"
            ),
        });
    }
    let (peer_nonce, peer_proof) = challenge[8..].split_at(NONCE_LEN);
    let nonces = (&nonce[..], peer_nonce);
    if !auth::verify_data_proof(key, DataRole::Acceptor, nonces, (rank, peer), peer_proof) {
        return Err(Error::Auth(format!(
            "the data listener at {addr} (rank {peer}) could not prove this job's data-plane key"
        )));
    }
    let proof = auth::data_proof(key, DataRole::Connector, &nonce, peer_nonce, rank, peer);
    let mut admitted = [0u8; 1];
    (&*stream)
        .write_all(&proof)
        .and_then(|_| (&*stream).read_exact(&mut admitted))
        .map_err(|e| failed("proving the data-plane key", e))?;
    if admitted[0] != ADMITTED {
        return Err(Error::Protocol {
            rank: peer,
            detail: format!(
                "rank {peer} answered the data-plane proof with {:#04x}",
                admitted[0]
            ),
        });
    }
    Ok(())
}

/// Acceptor side (this rank is `rank` of `world_size`): the connector's proven rank, or why
/// the connection is refused (to log). The caller checks the rank is still expected and then
/// calls [`admit`].
pub fn check_connector(
    stream: &TcpStream,
    key: &DataKey,
    (rank, world_size): (usize, usize),
    deadline: Instant,
) -> std::result::Result<usize, String> {
    let limit = until(deadline.min(Instant::now() + HANDSHAKE_TIMEOUT));
    stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(limit))
        .and_then(|_| stream.set_write_timeout(limit))
        .map_err(|e| format!("configuring it failed: {e}"))?;
    let mut intro = [0u8; INTRO_LEN];
    (&*stream)
        .read_exact(&mut intro)
        .map_err(|e| format!("no complete introduction: {e}"))?;
    if &intro[..8] != MAGIC {
        return Err(format!(
            "not a dtrain data connection (bad magic {:02x?})",
            &intro[..8]
        ));
    }
    let peer = u64::from_le_bytes(intro[8..16].try_into().expect("8 bytes"));
    if peer <= rank as u64 || peer >= world_size as u64 {
        return Err(format!(
            "it claims rank {peer}, which rank {rank} does not accept from (world size {world_size})"
        ));
    }
    let peer = peer as usize;
    let peer_nonce = &intro[16..];
    let nonce = auth::nonce();
    let proof = auth::data_proof(key, DataRole::Acceptor, peer_nonce, &nonce, peer, rank);
    let mut challenge = Vec::with_capacity(CHALLENGE_LEN);
    challenge.extend_from_slice(&(rank as u64).to_le_bytes());
    challenge.extend_from_slice(&nonce);
    challenge.extend_from_slice(&proof);
    let mut answer = [0u8; PROOF_LEN];
    (&*stream)
        .write_all(&challenge)
        .and_then(|_| (&*stream).read_exact(&mut answer))
        .map_err(|e| format!("claimed rank {peer} but gave no proof: {e}"))?;
    let nonces = (peer_nonce, &nonce[..]);
    if !auth::verify_data_proof(key, DataRole::Connector, nonces, (peer, rank), &answer) {
        return Err(format!(
            "claimed rank {peer} with a wrong proof (a replayed handshake or another job's key)"
        ));
    }
    Ok(peer)
}

/// Tells a connector that passed [`check_connector`] it is in.
pub fn admit(stream: &TcpStream) -> io::Result<()> {
    (&*stream).write_all(&[ADMITTED])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        (c, l.accept().unwrap().0)
    }

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[test]
    fn same_key_admits_and_wrong_key_is_refused_on_both_sides() {
        let key = auth::nonce();
        let (c, a) = pair();
        let addr = a.local_addr().unwrap();
        let acceptor = std::thread::spawn(move || {
            let got = check_connector(&a, &key, (0, 3), soon());
            admit(&a).unwrap();
            got
        });
        introduce(&c, &key, (2, 0), addr, soon()).unwrap();
        assert_eq!(acceptor.join().unwrap(), Ok(2));

        let (c, a) = pair();
        let acceptor = std::thread::spawn(move || check_connector(&a, &key, (0, 3), soon()));
        let err = introduce(&c, &auth::nonce(), (1, 0), addr, soon()).unwrap_err();
        assert!(matches!(err, Error::Auth(_)), "{err}");
        drop(c);
        let refused = acceptor.join().unwrap().unwrap_err();
        assert!(refused.contains("no proof"), "{refused}");
    }

    #[test]
    fn garbage_bad_ranks_and_silence_are_refused_within_the_deadline() {
        let key = auth::nonce();
        let refuse = |bytes: Vec<u8>, deadline: Instant| {
            let (mut c, a) = pair();
            c.write_all(&bytes).unwrap();
            let r = check_connector(&a, &key, (1, 3), deadline).unwrap_err();
            drop(c);
            r
        };
        let garbage = refuse(
            b"GET / HTTP/1.1\r\nHost: example\r\nAccept: */*\r\nUser-Agent: x\r\n\r\n".to_vec(),
            soon(),
        );
        assert!(garbage.contains("bad magic"), "{garbage}");
        for claim in [0u64, 1, 3, u64::MAX] {
            let mut intro = MAGIC.to_vec();
            intro.extend_from_slice(&claim.to_le_bytes());
            intro.extend_from_slice(&[0; NONCE_LEN]);
            let r = refuse(intro, soon());
            assert!(r.contains("does not accept"), "{claim}: {r}");
        }
        let start = Instant::now();
        let silent = refuse(MAGIC.to_vec(), Instant::now() + Duration::from_millis(300));
        assert!(silent.contains("no complete introduction"), "{silent}");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
    }

    #[test]
    fn a_recorded_handshake_replayed_is_refused() {
        let key = auth::nonce();
        let (c, a) = pair();
        let addr = a.local_addr().unwrap();
        // Record what a real connector sends by relaying it through this thread.
        let (relay_in, mut relay_out) = pair();
        let acceptor = std::thread::spawn(move || {
            let got = check_connector(&a, &key, (0, 2), soon());
            admit(&a).unwrap();
            got
        });
        let recorder = std::thread::spawn(move || {
            let mut recorded = vec![0u8; INTRO_LEN + PROOF_LEN];
            let mut relay_in = relay_in;
            relay_in.read_exact(&mut recorded[..INTRO_LEN]).unwrap();
            (&c).write_all(&recorded[..INTRO_LEN]).unwrap();
            let mut challenge = [0u8; CHALLENGE_LEN];
            (&c).read_exact(&mut challenge).unwrap();
            relay_in.write_all(&challenge).unwrap();
            relay_in.read_exact(&mut recorded[INTRO_LEN..]).unwrap();
            (&c).write_all(&recorded[INTRO_LEN..]).unwrap();
            let mut ok = [0u8; 1];
            (&c).read_exact(&mut ok).unwrap();
            relay_in.write_all(&ok).unwrap();
            recorded
        });
        introduce(&relay_out, &key, (1, 0), addr, soon()).unwrap();
        let recorded = recorder.join().unwrap();
        assert_eq!(acceptor.join().unwrap(), Ok(1));
        relay_out.flush().unwrap();

        let (mut replay, a) = pair();
        replay.write_all(&recorded).unwrap();
        let refused = check_connector(&a, &key, (0, 2), soon()).unwrap_err();
        assert!(refused.contains("wrong proof"), "{refused}");
    }
}
