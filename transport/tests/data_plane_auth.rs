//! Data-plane authentication: strangers on a rank's data port (garbage, a handshake recorded
//! from a real connection and replayed, a proof made with another key, a silent connection)
//! are refused — each logged once — and the job still completes with the right result.
//!
//! The ranks run as threads of one spawned child (the `worker` entry), so the test can read
//! the warnings the transport prints on stderr.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use transport::auth::{self, DataKey, DataRole};
use transport::tcp::connect_mesh;
use transport::{Communicator, ReduceOp, Timeouts};

const TIMEOUTS: Timeouts = Timeouts {
    connect: Duration::from_secs(30),
    collective: Duration::from_secs(30),
    liveness: Duration::from_secs(5),
};
/// Connector's introduction (magic, rank, nonce) and proof, as documented in the transport.
const INTRO_LEN: usize = 8 + 8 + 32;
const CHALLENGE_LEN: usize = 8 + 32 + 32;

#[test]
#[ignore = "rank process of this file's tests, which spawn it with --ignored --exact worker"]
fn worker() {
    let scenario = common::child_scenario();
    println!(); // libtest printed "test worker ... " without a newline
    match scenario.as_str() {
        "strangers" => strangers(),
        other => common::fail(format!("unknown scenario {other}")),
    }
    println!("DONE");
    std::process::exit(0);
}

fn bind() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// One rank of a mesh in a thread: all-reduce `rank + 1` and return the result.
fn rank_thread(
    rank: usize,
    peers: Vec<SocketAddr>,
    key: DataKey,
    listener: TcpListener,
) -> std::thread::JoinHandle<Result<Vec<f32>, String>> {
    std::thread::spawn(move || {
        let mesh =
            connect_mesh(rank, &peers, &key, listener, &TIMEOUTS).map_err(|e| e.to_string())?;
        let mut comm = Communicator::from_backend(Box::new(mesh), "tcp");
        let mut buf = vec![rank as f32 + 1.0; 1000];
        comm.all_reduce(&mut buf, ReduceOp::Sum)
            .map_err(|e| e.to_string())?;
        Ok(buf)
    })
}

/// Relays one connection from `front` to `back` both ways, recording what the client sent.
fn recording_relay(front: TcpListener, back: SocketAddr) -> Arc<Mutex<Vec<u8>>> {
    let recorded = Arc::new(Mutex::new(Vec::new()));
    let rec = recorded.clone();
    std::thread::spawn(move || {
        let (client, _) = front.accept().unwrap();
        let server = TcpStream::connect(back).unwrap();
        let (mut c_in, mut s_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut &server, &mut &client);
        });
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = c_in.read(&mut buf) {
            rec.lock().unwrap().extend_from_slice(&buf[..n]);
            if s_out.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    recorded
}

/// Everything the acceptor sends before it closes a refused connection (bounded wait).
fn answer_until_closed(mut s: TcpStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    got
}

fn strangers() {
    let key = auth::nonce();
    // A real handshake of a job with this key, recorded through a relay in front of rank 0.
    let ((l0, a0), (l1, a1), (relay, relay_addr)) = (bind(), bind(), bind());
    let recorded = recording_relay(relay, a0);
    let r0 = rank_thread(0, vec![a0, a1], key, l0);
    let r1 = rank_thread(1, vec![relay_addr, a1], key, l1);
    for r in [r0, r1] {
        r.join()
            .unwrap()
            .unwrap_or_else(|e| common::fail(format!("recorded job: {e}")));
    }
    let replay: Vec<u8> = recorded.lock().unwrap()[..INTRO_LEN + 32].to_vec();

    // The job under attack, same key. Rank 0 is accepting; rank 1 starts after the strangers.
    let ((l0, a0), (l1, a1)) = (bind(), bind());
    let r0 = rank_thread(0, vec![a0, a1], key, l0);

    let mut garbage = TcpStream::connect(a0).unwrap();
    garbage.write_all(&[0x47; 64]).unwrap();
    let got = answer_until_closed(garbage);
    if !got.is_empty() {
        common::fail(format!("garbage got an answer: {got:?}"));
    }

    let mut replayed = TcpStream::connect(a0).unwrap();
    replayed.write_all(&replay).unwrap();
    let got = answer_until_closed(replayed);
    if got.len() != CHALLENGE_LEN {
        common::fail(format!(
            "a replay got {} bytes back, expected only the challenge",
            got.len()
        ));
    }

    let wrong_key = auth::nonce();
    let mut forger = TcpStream::connect(a0).unwrap();
    let nonce = auth::nonce();
    let mut intro = b"DTRAINDA".to_vec();
    intro.extend_from_slice(&1u64.to_le_bytes());
    intro.extend_from_slice(&nonce);
    forger.write_all(&intro).unwrap();
    let mut challenge = [0u8; CHALLENGE_LEN];
    forger.read_exact(&mut challenge).unwrap();
    let proof = auth::data_proof(
        &wrong_key,
        DataRole::Connector,
        &nonce,
        &challenge[8..40],
        1,
        0,
    );
    forger.write_all(&proof).unwrap();
    let got = answer_until_closed(forger);
    if !got.is_empty() {
        common::fail(format!("a wrong-key proof was answered: {got:?}"));
    }

    // Connected and silent for the whole job: must not hold up the real rank.
    let _silent = TcpStream::connect(a0).unwrap();

    let r1 = rank_thread(1, vec![a0, a1], key, l1);
    for (rank, r) in [r0, r1].into_iter().enumerate() {
        let buf = r
            .join()
            .unwrap()
            .unwrap_or_else(|e| common::fail(format!("rank {rank}: {e}")));
        if buf.iter().any(|&x| x != 3.0) {
            common::fail(format!("rank {rank}: wrong all-reduce result {}", buf[0]));
        }
    }
    println!("RESULT ok");
}

#[test]
fn strangers_on_the_data_port_are_refused_once_each_and_the_job_completes() {
    let child = common::Spawn::new("strangers", 1).spawn_rank(0, &[]);
    let r = child.finish(Duration::from_secs(120));
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert!(
        r.stdout.iter().any(|l| l == "RESULT ok"),
        "{}",
        r.describe()
    );
    let refused: Vec<&String> = r
        .stderr
        .iter()
        .filter(|l| l.contains("refused data connection"))
        .collect();
    let count = |needle: &str| refused.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(
        refused.len(),
        3,
        "one warning per refused stranger:\n{}",
        r.describe()
    );
    assert_eq!(count("bad magic"), 1, "{}", r.describe());
    assert_eq!(
        count("wrong proof"),
        2,
        "replay and wrong key:\n{}",
        r.describe()
    );
    assert!(
        refused
            .iter()
            .all(|l| l.starts_with("dtrain transport: rank 0: warning:")),
        "{}",
        r.describe()
    );
}
