//! dtrain's TCPStore client and server against PyTorch's protocol.
//!
//! - `client_sends_torchs_bytes_*`: a fake server replays the exchange recorded from torch 2.15
//!   (`fixtures/tcpstore_*`, made by `scripts/capture_tcpstore.py`) and checks that our client,
//!   doing the same operations, sends byte-identical requests and reads the same answers.
//! - `store_server_*`: our server's semantics through our client (waits, cancels, limits).
//! - `torch_*` (ignored: they need `python3` with torch, which CI lacks): our client against
//!   torch's server and torch's client against ours. Run them by hand with
//!   `cargo test --release -p transport --test tcpstore -- --ignored`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use transport::{StoreClient, StoreError, StoreServer};

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// One direction's bytes of one operation.
struct Segment {
    label: String,
    from_client: bool,
    bytes: Vec<u8>,
}

fn recorded_segments() -> Vec<Segment> {
    let transcript = String::from_utf8(fixture("tcpstore_transcript.txt")).expect("UTF-8");
    let (client, server) = (
        fixture("tcpstore_client.bin"),
        fixture("tcpstore_server.bin"),
    );
    let (mut c, mut s) = (0usize, 0usize);
    let mut out = Vec::new();
    for line in transcript.lines().filter(|l| !l.starts_with('#')) {
        let parts: Vec<&str> = line.split_whitespace().collect();
        let [label, dir, n] = parts[..] else {
            panic!("bad transcript line {line:?}");
        };
        let n: usize = n.parse().expect("length");
        let (stream, pos) = if dir == "C" {
            (&client, &mut c)
        } else {
            (&server, &mut s)
        };
        out.push(Segment {
            label: label.to_string(),
            from_client: dir == "C",
            bytes: stream[*pos..*pos + n].to_vec(),
        });
        *pos += n;
    }
    assert_eq!(
        (c, s),
        (client.len(), server.len()),
        "transcript must cover both streams"
    );
    out
}

/// The connect segment's ping carries the client's pid (`0d` + u32 after the 5-byte validate).
const PING_NONCE: std::ops::Range<usize> = 6..10;

/// Replays `segments` to one client; returns the mismatches it saw (empty = identical).
fn replay_server(listener: TcpListener, segments: Vec<Segment>) -> Vec<String> {
    let (mut stream, _) = listener.accept().expect("accept");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut problems = Vec::new();
    let mut nonce = [0u8; 4];
    for seg in &segments {
        if seg.from_client {
            let mut got = vec![0u8; seg.bytes.len()];
            if let Err(e) = stream.read_exact(&mut got) {
                problems.push(format!(
                    "{}: expected {} bytes from the client: {e}",
                    seg.label,
                    seg.bytes.len()
                ));
                break;
            }
            let mut expected = seg.bytes.clone();
            if seg.label == "connect" {
                // torch pings with its pid, we with ours: compare everything else.
                nonce.copy_from_slice(&got[PING_NONCE]);
                expected[PING_NONCE].copy_from_slice(&nonce);
            }
            if got != expected {
                problems.push(format!(
                    "{}: client sent\n  {}\ntorch sent\n  {}",
                    seg.label,
                    hex(&got),
                    hex(&expected)
                ));
                break;
            }
        } else {
            let answer = if seg.label == "connect" {
                nonce.to_vec() // the server echoes the ping nonce
            } else {
                seg.bytes.clone()
            };
            stream.write_all(&answer).expect("answer");
        }
    }
    if problems.is_empty() {
        // The client must not send anything beyond torch's requests.
        let mut extra = [0u8; 64];
        match stream.read(&mut extra) {
            Ok(0) => {}
            Ok(n) => problems.push(format!("client sent {n} extra bytes: {}", hex(&extra[..n]))),
            Err(e) => problems.push(format!("waiting for the client to close: {e}")),
        }
    }
    let _ = stream.shutdown(Shutdown::Both);
    problems
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

type Op = (&'static str, fn(&mut StoreClient) -> String);

/// The operations of `scripts/capture_tcpstore.py`, in its order, with the results torch's
/// client got (printed by that script).
fn operations() -> Vec<Op> {
    fn show(r: Result<impl std::fmt::Debug, StoreError>) -> String {
        match r {
            Ok(v) => format!("{v:?}"),
            Err(e) => format!("error: {e}"),
        }
    }
    vec![
        ("set", |s| show(s.set("dtrain/run-1/0/alpha", b"value-one"))),
        ("get", |s| {
            show(s.get("dtrain/run-1/0/alpha").map(String::from_utf8))
        }),
        ("add_new", |s| show(s.add("dtrain/run-1/0/counter", 5))),
        ("add_existing", |s| {
            show(s.add("dtrain/run-1/0/counter", -2))
        }),
        ("check_present", |s| {
            show(s.check(&["dtrain/run-1/0/alpha"]))
        }),
        ("check_missing", |s| {
            show(s.check(&["dtrain/run-1/0/alpha", "dtrain/run-1/0/missing"]))
        }),
        ("wait_present", |s| {
            show(s.wait(
                &["dtrain/run-1/0/alpha", "dtrain/run-1/0/counter"],
                Duration::from_secs(5),
            ))
        }),
        ("wait_timeout", |s| {
            match s.wait(&["dtrain/run-1/0/missing"], Duration::from_millis(300)) {
                Err(StoreError::Timeout { what, .. }) => format!("timeout waiting for {what}"),
                other => format!("expected a timeout, got {other:?}"),
            }
        }),
        ("compare_set_create", |s| {
            show(
                s.compare_set("dtrain/run-1/0/rank0", b"", b"10.0.0.1:4242")
                    .map(String::from_utf8),
            )
        }),
        ("compare_set_conflict", |s| {
            show(
                s.compare_set("dtrain/run-1/0/rank0", b"", b"10.0.0.2:1")
                    .map(String::from_utf8),
            )
        }),
        ("compare_set_swap", |s| {
            show(
                s.compare_set("dtrain/run-1/0/rank0", b"10.0.0.1:4242", b"10.0.0.3:7")
                    .map(String::from_utf8),
            )
        }),
        ("get_binary", |s| {
            let all: Vec<u8> = (0..=255).collect();
            show(
                s.set("dtrain/run-1/0/bin", &all)
                    .and_then(|_| s.get("dtrain/run-1/0/bin"))
                    .map(|v| v == all),
            )
        }),
    ]
}

/// What torch's client returned for each operation (the capture script's output).
const TORCH_RESULTS: &[&str] = &[
    "()",
    "Ok(\"value-one\")",
    "5",
    "3",
    "true",
    "false",
    "()",
    "timeout waiting for key \"dtrain/run-1/0/missing\"",
    "Ok(\"10.0.0.1:4242\")",
    "Ok(\"10.0.0.1:4242\")",
    "Ok(\"10.0.0.3:7\")",
    "true",
];

fn run_operations(client: &mut StoreClient) -> Vec<String> {
    operations().iter().map(|(_, op)| op(client)).collect()
}

#[test]
fn client_sends_torchs_bytes_and_reads_torchs_answers() {
    let segments = recorded_segments();
    let mut labels: Vec<&str> = Vec::new();
    for seg in &segments {
        if labels.last() != Some(&seg.label.as_str()) {
            labels.push(&seg.label);
        }
    }
    let ours: Vec<&str> = std::iter::once("connect")
        .chain(operations().iter().map(|(l, _)| *l))
        .collect();
    assert_eq!(
        labels, ours,
        "the fixture's operations and this test's must be the same list"
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || replay_server(listener, segments));
    let mut client = StoreClient::connect("127.0.0.1", port, Duration::from_secs(10))
        .expect("connect to the replaying server");
    let results = run_operations(&mut client);
    drop(client);
    let problems = server.join().expect("replay thread");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert_eq!(results, TORCH_RESULTS);
}

#[test]
fn store_server_gives_torchs_answers_to_the_same_operations() {
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let mut client =
        StoreClient::connect("127.0.0.1", server.port(), Duration::from_secs(10)).expect("connect");
    assert_eq!(run_operations(&mut client), TORCH_RESULTS);
    // After the timed-out wait was cancelled, the connection is still in step.
    assert_eq!(client.add("dtrain/run-1/0/counter", 0).unwrap(), 3);
}

#[test]
fn store_server_wakes_a_waiter_when_another_client_sets_the_key() {
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let port = server.port();
    let waiter = std::thread::spawn(move || {
        let mut c = StoreClient::connect("127.0.0.1", port, Duration::from_secs(10)).unwrap();
        let start = Instant::now();
        c.wait(&["late"], Duration::from_secs(20))
            .map(|_| start.elapsed())
    });
    std::thread::sleep(Duration::from_millis(200));
    let mut setter = StoreClient::connect("127.0.0.1", port, Duration::from_secs(10)).unwrap();
    setter.set("late", b"here").unwrap();
    let waited = waiter
        .join()
        .unwrap()
        .expect("the wait ends when the key is set");
    assert!(
        waited >= Duration::from_millis(150),
        "returned before the set: {waited:?}"
    );
    assert_eq!(setter.get("late").unwrap(), b"here");
}

#[test]
fn timeouts_and_failures_name_the_key_and_the_address() {
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let port = server.port();
    let mut client = StoreClient::connect("127.0.0.1", port, Duration::from_millis(400)).unwrap();
    // `get` waits with the client's timeout for a key nobody sets.
    let err = client.get("job/never-set").unwrap_err().to_string();
    assert!(
        err.contains("\"job/never-set\"") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    drop(server);
    let err = client.add("job/counter", 1).unwrap_err().to_string();
    assert!(
        err.contains("\"job/counter\"") && err.contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
    // Nobody listens any more: connecting gives up at the deadline and says where it tried.
    let start = Instant::now();
    let err = StoreClient::connect("127.0.0.1", port, Duration::from_millis(500))
        .err()
        .expect("no server");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, StoreError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains(&format!("127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn store_server_closes_connections_that_speak_something_else() {
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let port = server.port();
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],           // no VALIDATE
        &[0u8, 1, 2, 3, 4][..],                   // wrong magic
        &[0u8, 0xce, 0xf7, 0x85, 0x3c, 0xee][..], // unknown command
        &[
            0u8, 0xce, 0xf7, 0x85, 0x3c, 1, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f,
        ][..], // huge key
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(garbage).unwrap();
        let mut buf = [0u8; 16];
        // Closed: EOF, or a reset when the server left some of the garbage unread.
        let closed = match s.read(&mut buf) {
            Ok(n) => n == 0,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        };
        assert!(closed, "server must close after {garbage:02x?}");
    }
    // The server still serves real clients.
    let mut client = StoreClient::connect("127.0.0.1", port, Duration::from_secs(10)).unwrap();
    client.set("k", b"v").unwrap();
    assert_eq!(client.get("k").unwrap(), b"v");
    assert_eq!(server.num_keys(), 1);
}

#[test]
fn client_refuses_a_server_that_is_not_a_tcpstore() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut hello = [0u8; 10];
        s.read_exact(&mut hello).unwrap();
        s.write_all(b"HTTP").unwrap(); // not the ping echo
        std::thread::sleep(Duration::from_millis(200));
    });
    let err = StoreClient::connect("127.0.0.1", port, Duration::from_secs(5))
        .err()
        .expect("bad ping echo");
    assert!(err.to_string().contains("is this a TCPStore?"), "{err}");
    fake.join().unwrap();
}

// ---- by hand, against real torch -----------------------------------------------------------

fn python_with_torch(script: &str, stdin: Stdio) -> std::process::Child {
    Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("these tests need python3 with torch installed (pip install torch)")
}

#[test]
#[ignore = "needs python3 with torch (not in CI)"]
fn torch_server_answers_our_client() {
    for use_libuv in ["True", "False"] {
        let script = format!(
            "import datetime, sys, torch.distributed as d\n\
             s = d.TCPStore('127.0.0.1', 0, is_master=True, wait_for_workers=False, use_libuv={use_libuv}, timeout=datetime.timedelta(seconds=30))\n\
             print(s.port, flush=True)\n\
             sys.stdin.readline()\n\
             c = d.TCPStore('127.0.0.1', s.port, is_master=False, wait_for_workers=False)\n\
             print(c.get('from-rust').decode(), c.add('dtrain/run-1/0/counter', 0), flush=True)\n"
        );
        let mut py = python_with_torch(&script, Stdio::piped());
        let mut out = std::io::BufReader::new(py.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        let port: u16 = line.trim().parse().expect("torch printed its port");
        let mut client = StoreClient::connect("127.0.0.1", port, Duration::from_secs(10)).unwrap();
        assert_eq!(
            run_operations(&mut client),
            TORCH_RESULTS,
            "use_libuv={use_libuv}"
        );
        client.set("from-rust", b"hello torch").unwrap();
        let mut stdin = py.stdin.take().unwrap();
        stdin.write_all(b"go\n").unwrap();
        line.clear();
        std::io::BufRead::read_line(&mut out, &mut line).unwrap();
        assert_eq!(line.trim(), "hello torch 3", "use_libuv={use_libuv}");
        assert!(py.wait().unwrap().success());
    }
}

#[test]
#[ignore = "needs python3 with torch (not in CI)"]
fn torch_client_gets_the_same_answers_from_our_server() {
    let server = StoreServer::bind("127.0.0.1:0").unwrap();
    let script = format!(
        "import datetime, torch.distributed as d\n\
         s = d.TCPStore('127.0.0.1', {port}, is_master=False, wait_for_workers=False, timeout=datetime.timedelta(seconds=10))\n\
         s.set('dtrain/run-1/0/alpha', b'value-one')\n\
         print(s.get('dtrain/run-1/0/alpha'), s.add('dtrain/run-1/0/counter', 5), s.add('dtrain/run-1/0/counter', -2))\n\
         print(s.check(['dtrain/run-1/0/alpha']), s.check(['dtrain/run-1/0/alpha', 'dtrain/run-1/0/missing']))\n\
         s.wait(['dtrain/run-1/0/alpha'])\n\
         try:\n    s.wait(['dtrain/run-1/0/missing'], datetime.timedelta(milliseconds=300)); print('no timeout')\n\
         except Exception as e:\n    print('timeout')\n\
         print(s.compare_set('dtrain/run-1/0/rank0', b'', b'a'), s.compare_set('dtrain/run-1/0/rank0', b'', b'b'), s.compare_set('dtrain/run-1/0/rank0', b'a', b'c'))\n\
         print(s.num_keys(), s.delete_key('dtrain/run-1/0/rank0'), s.num_keys())\n",
        port = server.port()
    );
    let py = python_with_torch(&script, Stdio::null());
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success(), "torch client failed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.lines().collect::<Vec<_>>(),
        [
            "b'value-one' 5 3",
            "True False",
            "timeout",
            "b'a' b'a' b'c'",
            "3 True 2",
        ]
    );
}
