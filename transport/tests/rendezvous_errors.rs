//! Rendezvous failures: every case must end in a clear error on the affected ranks (never a
//! hang or a crash), and garbage on the rendezvous port must not stop a real job.

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{finish_all, worker_config, Finished, Spawn};
use transport::ReduceOp;

#[test]
#[ignore = "rank process of this file's tests, which spawn it with --ignored --exact worker"]
fn worker() {
    let scenario = common::child_scenario();
    let cfg = worker_config();
    let mut comm = common::connect_or_exit(&cfg);
    match scenario.as_str() {
        "connect" => {
            let mut buf = vec![cfg.rank as f32 + 1.0; 1000];
            if let Err(e) = comm.all_reduce(&mut buf, ReduceOp::Sum) {
                common::exit_error(&e);
            }
            let n = cfg.world_size as f32;
            if buf.iter().any(|&x| x != n * (n + 1.0) / 2.0) {
                common::fail(format!("wrong all_reduce result {}", buf[0]));
            }
            if let Err(e) = comm.barrier() {
                common::exit_error(&e);
            }
        }
        other => common::fail(format!("unknown scenario {other}")),
    }
    println!("DONE");
    std::process::exit(0);
}

const LIMIT: Duration = Duration::from_secs(60);

fn expect_error(r: &Finished, kind: &str, needle: &str) {
    assert_eq!(r.code, Some(3), "expected an error exit:\n{}", r.describe());
    assert_eq!(
        r.tagged("ERRKIND"),
        vec![kind.to_string()],
        "{}",
        r.describe()
    );
    let err = r.error().unwrap_or_default();
    assert!(
        err.contains(needle),
        "error {err:?} should mention {needle:?}\n{}",
        r.describe()
    );
}

fn expect_done(r: &Finished) {
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert!(r.stdout.iter().any(|l| l == "DONE"), "{}", r.describe());
}

#[test]
fn matching_auth_tokens_connect() {
    let spawn = Spawn::new("connect", 3).env("DTRAIN_TEST_TOKEN", "s3cret-token");
    for r in finish_all(spawn.spawn_all(), LIMIT) {
        expect_done(&r);
    }
}

#[test]
fn ranks_started_before_the_master_retry_until_it_listens() {
    let spawn = Spawn::new("connect", 3);
    let early: Vec<_> = (1..3).map(|r| spawn.spawn_rank(r, &[])).collect();
    std::thread::sleep(Duration::from_millis(1500));
    let mut all = vec![spawn.spawn_rank(0, &[])];
    all.extend(early);
    for r in finish_all(all, LIMIT) {
        expect_done(&r);
    }
}

#[test]
fn wrong_auth_token_is_rejected_on_both_sides() {
    let spawn = Spawn::new("connect", 2).env("DTRAIN_TEST_CONNECT_MS", 4000);
    let w0 = spawn.spawn_rank(0, &[("DTRAIN_TEST_TOKEN", "alpha".into())]);
    let w1 = spawn.spawn_rank(1, &[("DTRAIN_TEST_TOKEN", "beta".into())]);
    let results = finish_all(vec![w0, w1], LIMIT);
    expect_error(&results[1], "Auth", "DTRAIN_AUTH_TOKEN differs");
    // Rank 0 keeps waiting for a rank that knows the token, then names what it rejected.
    expect_error(&results[0], "Rendezvous", "wrong auth token");
    for r in &results {
        assert!(
            !r.stdout
                .iter()
                .chain(&r.stderr)
                .any(|l| l.contains("alpha") || l.contains("beta")),
            "the token must never be printed:\n{}",
            r.describe()
        );
    }
}

#[test]
fn missing_auth_token_is_rejected() {
    let spawn = Spawn::new("connect", 2).env("DTRAIN_TEST_CONNECT_MS", 4000);
    let w0 = spawn.spawn_rank(0, &[("DTRAIN_TEST_TOKEN", "alpha".into())]);
    let w1 = spawn.spawn_rank(1, &[]);
    let results = finish_all(vec![w0, w1], LIMIT);
    expect_error(&results[1], "Auth", "requires an auth token");
    expect_error(&results[0], "Rendezvous", "requires an auth token");
}

#[test]
fn config_hash_mismatch_is_rejected_on_every_rank() {
    let spawn = Spawn::new("connect", 3);
    let w0 = spawn.spawn_rank(0, &[("DTRAIN_TEST_HASH", "111".into())]);
    let w1 = spawn.spawn_rank(1, &[("DTRAIN_TEST_HASH", "111".into())]);
    let w2 = spawn.spawn_rank(2, &[("DTRAIN_TEST_HASH", "222".into())]);
    let results = finish_all(vec![w0, w1, w2], LIMIT);
    // Rank 1 may join before or after rank 2: it is aborted or rejected, never left waiting.
    for r in &results {
        expect_error(r, "ConfigMismatch", "config hash");
    }
}

#[test]
fn rank_arriving_after_a_config_error_gets_the_same_error() {
    let spawn = Spawn::new("connect", 3);
    let w0 = spawn.spawn_rank(0, &[("DTRAIN_TEST_HASH", "111".into())]);
    let bad = spawn
        .spawn_rank(2, &[("DTRAIN_TEST_HASH", "222".into())])
        .finish(LIMIT);
    expect_error(&bad, "ConfigMismatch", "config hash");
    // Rank 0 has already failed; it lingers briefly to tell latecomers why.
    let late = spawn.spawn_rank(1, &[("DTRAIN_TEST_HASH", "111".into())]);
    for r in finish_all(vec![w0, late], LIMIT) {
        expect_error(&r, "ConfigMismatch", "config hash");
    }
}

#[test]
fn duplicate_rank_is_rejected_on_every_rank() {
    let spawn = Spawn::new("connect", 3);
    let workers = vec![
        spawn.spawn_rank(0, &[]),
        spawn.spawn_rank(1, &[]),
        spawn.spawn_rank(1, &[]),
    ];
    for r in finish_all(workers, LIMIT) {
        expect_error(&r, "ConfigMismatch", "two processes claim rank 1");
    }
}

#[test]
fn rank_out_of_range_is_an_invalid_argument() {
    let spawn = Spawn::new("connect", 4);
    let r = spawn.spawn_rank(5, &[]).finish(LIMIT);
    expect_error(
        &r,
        "InvalidArgument",
        "rank 5 is out of range for world size 4",
    );
}

#[test]
fn different_world_size_is_rejected_on_both_sides() {
    let spawn = Spawn::new("connect", 2);
    let w0 = spawn.spawn_rank(0, &[]);
    let w1 = spawn.spawn_rank(5, &[("DTRAIN_TEST_WORLD", "8".into())]);
    for r in finish_all(vec![w0, w1], LIMIT) {
        expect_error(
            &r,
            "ConfigMismatch",
            "world size 8 but rank 0 has world size 2",
        );
    }
}

#[test]
fn different_transport_is_rejected() {
    let mut spawn = Spawn::new("connect", 2);
    spawn.transport = "tcp".into();
    let w0 = spawn.spawn_rank(0, &[]);
    let w1 = spawn.spawn_rank(1, &[("DTRAIN_TEST_TRANSPORT", "auto".into())]);
    for r in finish_all(vec![w0, w1], LIMIT) {
        expect_error(
            &r,
            "ConfigMismatch",
            "transport auto but rank 0 asked for tcp",
        );
    }
}

#[test]
fn unreachable_master_times_out_with_a_clear_message() {
    let spawn = Spawn::new("connect", 2).env("DTRAIN_TEST_CONNECT_MS", 1500);
    let r = spawn.spawn_rank(1, &[]).finish(LIMIT);
    let needle = format!("could not reach master at 127.0.0.1:{} after 1.5s: connection refused — is rank 0 running?", spawn.port);
    expect_error(&r, "Rendezvous", &needle);
}

#[test]
fn port_in_use_is_reported() {
    let squatter = TcpListener::bind("127.0.0.1:0").expect("bind");
    let mut spawn = Spawn::new("connect", 2);
    spawn.port = squatter.local_addr().expect("addr").port();
    let r = spawn.spawn_rank(0, &[]).finish(LIMIT);
    let needle = format!("port {} on 127.0.0.1 is already in use", spawn.port);
    expect_error(&r, "Rendezvous", &needle);
    drop(squatter);
}

fn connect_when_listening(port: u16) -> TcpStream {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match TcpStream::connect(("127.0.0.1", port)) {
            Ok(s) => return s,
            Err(e) if Instant::now() > deadline => panic!("rank 0 never listened on {port}: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn garbage_on_the_rendezvous_port_is_dropped_and_real_ranks_still_join() {
    let spawn = Spawn::new("connect", 2);
    let w0 = spawn.spawn_rank(0, &[]);
    // 1. Random bytes.
    let mut garbage = connect_when_listening(spawn.port);
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    garbage.write_all(&noise).expect("write garbage");
    // 2. A silent connection that never says anything.
    let _silent = connect_when_listening(spawn.port);
    // 3. Our magic with a future protocol version: answered with a reject naming the version.
    let mut future = connect_when_listening(spawn.port);
    let mut hello = b"DTRAINRV".to_vec();
    hello.extend_from_slice(&99u32.to_le_bytes());
    hello.extend_from_slice(&0u32.to_le_bytes());
    future.write_all(&hello).expect("write hello");
    future
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut reply = Vec::new();
    let _ = future.read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.contains("protocol version mismatch"),
        "reply: {reply:?}"
    );
    // Then the real rank joins and the job runs.
    let w1 = spawn.spawn_rank(1, &[]);
    let results = finish_all(vec![w0, w1], LIMIT);
    expect_done(&results[0]);
    expect_done(&results[1]);
    assert!(
        results[0]
            .stderr
            .iter()
            .any(|l| l.contains("warning") && l.contains("not a dtrain rank")),
        "rank 0 should log a warning about the garbage connection:\n{}",
        results[0].describe()
    );
}
