//! Rendezvous through a TCPStore, as under torchrun: real processes that meet through our
//! `StoreServer` (speaking torch's protocol) while the store holds `MASTER_PORT`, so the
//! classic rendezvous could not bind it. Workers read torchrun's variables
//! (`TORCHELASTIC_USE_AGENT_STORE`, `MASTER_ADDR/PORT`, `TORCHELASTIC_RUN_ID`,
//! `TORCHELASTIC_RESTART_COUNT`) through `transport::store::torchelastic_store`.
//!
//! The `torchrun_*` tests (ignored: they need torch's `torchrun`, which CI lacks) start these
//! workers with the real torchrun: `cargo test --release -p transport --test store_rendezvous
//! -- --ignored`.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{finish_all, worker_config, Finished, Spawn};
use transport::store::torchelastic_store;
use transport::{CommConfig, ReduceOp, StoreClient, StoreServer};

fn env(k: &str) -> Option<String> {
    std::env::var(k).ok()
}

/// All-reduce a rank-dependent buffer, check it, print its digest and the transport used.
fn all_reduce_and_report(cfg: &CommConfig) -> ! {
    let mut comm = common::connect_or_exit(cfg);
    println!("TRANSPORT {}", comm.transport_name());
    let mut buf: Vec<f32> = (0..100_000)
        .map(|i| (i % 7) as f32 + cfg.rank as f32)
        .collect();
    if let Err(e) = comm.all_reduce(&mut buf, ReduceOp::Sum) {
        common::exit_error(&e);
    }
    let n = cfg.world_size as f32;
    let expect = |i: usize| n * (i % 7) as f32 + n * (n - 1.0) / 2.0;
    if let Some(i) = (0..buf.len()).find(|&i| buf[i] != expect(i)) {
        common::fail(format!(
            "element {i} is {} instead of {}",
            buf[i],
            expect(i)
        ));
    }
    println!(
        "HASH sum {:016x}",
        common::digest(bytemuck::cast_slice(&buf))
    );
    if let Err(e) = comm.barrier() {
        common::exit_error(&e);
    }
    drop(comm);
    println!("DONE");
    std::process::exit(0)
}

fn store_from_env() -> transport::StoreRendezvous {
    match torchelastic_store(&env) {
        Ok(Some(s)) => s,
        Ok(None) => common::fail("TORCHELASTIC_USE_AGENT_STORE=True was expected"),
        Err(e) => common::fail(e),
    }
}

#[test]
#[ignore = "rank process of this file's tests, which spawn it with --ignored --exact worker"]
fn worker() {
    let scenario = common::child_scenario();
    match scenario.as_str() {
        // Ranks from this harness; the store from torchrun's variables.
        "store" => {
            let mut cfg = worker_config();
            cfg.store = Some(store_from_env());
            all_reduce_and_report(&cfg)
        }
        // Everything from the real torchrun's environment; rank 1 of the first attempt fails
        // when asked to, so torchrun restarts the group.
        "torchrun" => {
            println!();
            let number = |k: &str| -> usize {
                env(k)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| common::fail(format!("torchrun did not set {k}")))
            };
            let (rank, world) = (number("RANK"), number("WORLD_SIZE"));
            let restart = number("TORCHELASTIC_RESTART_COUNT");
            println!("ATTEMPT {restart} rank {rank}");
            if env("DTRAIN_TEST_FAIL_FIRST_ATTEMPT").is_some() && restart == 0 && rank == 1 {
                std::thread::sleep(Duration::from_millis(500)); // let rank 0 publish first
                common::fail("failing attempt 0 on purpose");
            }
            let mut cfg = CommConfig::new("unused", 0, rank, world);
            cfg.store = Some(store_from_env());
            cfg.timeouts.connect = Duration::from_secs(60);
            all_reduce_and_report(&cfg)
        }
        other => common::fail(format!("unknown scenario {other}")),
    }
}

const LIMIT: Duration = Duration::from_secs(90);

/// A spawn whose ranks meet through `store` under run id `run` and attempt `attempt`. The
/// classic rendezvous port is the store's own port: rank 0 could not bind it.
fn through_store(world: usize, store: &StoreServer, run: &str, attempt: u32) -> Spawn {
    let mut spawn = Spawn::new("store", world)
        .env("TORCHELASTIC_USE_AGENT_STORE", "True")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", store.port())
        .env("TORCHELASTIC_RUN_ID", run)
        .env("TORCHELASTIC_RESTART_COUNT", attempt);
    spawn.port = store.port();
    spawn
}

fn expect_done(results: &[Finished], transport: &str) {
    common::assert_success_and_identical(results);
    for r in results {
        assert_eq!(r.tagged("TRANSPORT"), [transport], "{}", r.describe());
    }
}

fn expect_error(r: &Finished, kind: &str, needles: &[&str]) {
    assert_eq!(r.code, Some(3), "expected an error exit:\n{}", r.describe());
    assert_eq!(r.tagged("ERRKIND"), [kind], "{}", r.describe());
    let err = r.error().unwrap_or_default();
    for needle in needles {
        assert!(
            err.contains(needle),
            "error {err:?} should mention {needle:?}\n{}",
            r.describe()
        );
    }
}

#[test]
fn ranks_meet_through_the_store_while_it_holds_the_master_port() {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    let tcp = through_store(3, &store, "run-tcp", 0);
    expect_done(&finish_all(tcp.spawn_all(), LIMIT), "tcp");
    let mut shm = through_store(2, &store, "run-shm", 0);
    shm.transport = "shm".into();
    expect_done(&finish_all(shm.spawn_all(), LIMIT), "shm");
}

#[test]
fn placement_comes_from_host_identity_through_the_store() {
    // Two "hosts" of two ranks: auto picks shm within each, TCP between them.
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    let mut spawn = through_store(4, &store, "run-mixed", 0);
    spawn.transport = "auto".into();
    let workers = (0..4)
        .map(|r| spawn.spawn_rank(r, &[("DTRAIN_HOST_ID", ["A", "A", "B", "B"][r].into())]))
        .collect();
    expect_done(&finish_all(workers, LIMIT), "shm+tcp");
}

#[test]
fn token_and_config_checks_still_apply_through_the_store() {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    let spawn = through_store(2, &store, "run-token", 0).env("DTRAIN_TEST_CONNECT_MS", 4000);
    let w0 = spawn.spawn_rank(0, &[("DTRAIN_TEST_TOKEN", "alpha".into())]);
    let w1 = spawn.spawn_rank(1, &[("DTRAIN_TEST_TOKEN", "beta".into())]);
    let results = finish_all(vec![w0, w1], LIMIT);
    expect_error(&results[1], "Auth", &["DTRAIN_AUTH_TOKEN differs"]);
    expect_error(&results[0], "Rendezvous", &["wrong auth token"]);

    let spawn = through_store(3, &store, "run-config", 0);
    let workers = (0..3)
        .map(|r| {
            spawn.spawn_rank(
                r,
                &[("DTRAIN_TEST_HASH", if r == 2 { "2" } else { "1" }.into())],
            )
        })
        .collect();
    for r in finish_all(workers, LIMIT) {
        expect_error(&r, "ConfigMismatch", &["config hash"]);
    }
}

#[test]
fn a_missing_rank0_is_a_timeout_naming_the_key_and_the_store() {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    let spawn = through_store(2, &store, "run-alone", 0).env("DTRAIN_TEST_CONNECT_MS", 1500);
    let results = finish_all(vec![spawn.spawn_rank(1, &[])], LIMIT);
    let addr = format!("127.0.0.1:{}", store.port());
    expect_error(
        &results[0],
        "Timeout",
        &["rank 0", "\"dtrain/run-alone/attempt_0/rank0\"", &addr],
    );
}

#[test]
fn a_store_nobody_serves_is_named() {
    let port = common::free_port();
    let spawn = Spawn::new("store", 2)
        .env("TORCHELASTIC_USE_AGENT_STORE", "True")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", port)
        .env("TORCHELASTIC_RUN_ID", "run-down")
        .env("TORCHELASTIC_RESTART_COUNT", 0)
        .env("DTRAIN_TEST_CONNECT_MS", 1000);
    let addr = format!("127.0.0.1:{port}");
    for r in finish_all(spawn.spawn_all(), LIMIT) {
        expect_error(&r, "Rendezvous", &["cannot connect to the TCPStore", &addr]);
    }
}

#[test]
fn an_earlier_attempts_keys_are_never_read() {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    // What a dead rank 0 of attempt 0 left behind: an address nobody listens on.
    let mut client =
        StoreClient::connect("127.0.0.1", store.port(), Duration::from_secs(5)).unwrap();
    let dead = format!("v1\n127.0.0.1:{}\n4242\ngone|m|b", common::free_port());
    client
        .set("dtrain/run-restart/attempt_0/rank0", dead.as_bytes())
        .unwrap();
    // Attempt 1 meets under its own keys and leaves attempt 0's alone.
    let next = through_store(2, &store, "run-restart", 1);
    expect_done(&finish_all(next.spawn_all(), LIMIT), "tcp");
    assert_eq!(
        client.get("dtrain/run-restart/attempt_0/rank0").unwrap(),
        dead.as_bytes()
    );
}

/// torchrun restarts workers after a membership change without raising the restart count:
/// the new round's rank 0 finds the key of the old one, whose address nobody answers any
/// more. It takes the key over; a rank that read the old record first reads it again.
#[test]
fn a_dead_rank0s_record_of_the_same_attempt_is_replaced() {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    let mut client =
        StoreClient::connect("127.0.0.1", store.port(), Duration::from_secs(5)).unwrap();
    let dead = format!("v1\n127.0.0.1:{}\n4242\ngone|m|b", common::free_port());
    client
        .set("dtrain/run-rejoin/attempt_0/rank0", dead.as_bytes())
        .unwrap();
    let spawn = through_store(3, &store, "run-rejoin", 0);
    // Ranks 1 and 2 start first and see only the dead record for a while.
    let mut workers = vec![spawn.spawn_rank(1, &[]), spawn.spawn_rank(2, &[])];
    std::thread::sleep(Duration::from_millis(1500));
    workers.insert(0, spawn.spawn_rank(0, &[]));
    expect_done(&finish_all(workers, LIMIT), "tcp");
    assert_ne!(
        client.get("dtrain/run-rejoin/attempt_0/rank0").unwrap(),
        dead.as_bytes(),
        "rank 0 should have replaced the dead record"
    );
}

#[test]
fn a_live_second_rank0_is_rejected() {
    let store = StoreServer::bind("127.0.0.1:0").unwrap();
    // A process that holds the key and still listens at the address it published.
    let live = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client =
        StoreClient::connect("127.0.0.1", store.port(), Duration::from_secs(5)).unwrap();
    let record = format!("v1\n{}\n4242\nother|m|b", live.local_addr().unwrap());
    client
        .set("dtrain/run-twice/attempt_0/rank0", record.as_bytes())
        .unwrap();
    let spawn = through_store(2, &store, "run-twice", 0).env("DTRAIN_TEST_CONNECT_MS", 1500);
    let results = finish_all(vec![spawn.spawn_rank(0, &[])], LIMIT);
    expect_error(
        &results[0],
        "ConfigMismatch",
        &[
            "two processes claim rank 0",
            "pid 4242",
            "still running",
            "TORCHELASTIC_RESTART_COUNT",
        ],
    );
    drop(live);
}

// ---- by hand, with the real torchrun --------------------------------------------------------

fn torchrun(args: &[&str], extra_env: &[(&str, &str)]) -> (bool, String) {
    let exe = std::env::current_exe().unwrap();
    let mut cmd = Command::new("torchrun");
    cmd.args(args)
        .arg("--no-python")
        .arg(&exe)
        .args([
            "worker",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("DTRAIN_TEST_SCENARIO", "torchrun");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let out = cmd
        .output()
        .expect("these tests need torchrun on PATH (pip install torch)");
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn assert_two_ranks_done(ok: bool, text: &str, attempt: usize) {
    assert!(ok, "torchrun failed:\n{text}");
    for rank in 0..2 {
        assert!(
            text.contains(&format!("ATTEMPT {attempt} rank {rank}")),
            "no rank {rank} in attempt {attempt}:\n{text}"
        );
    }
    assert_eq!(text.matches("\nDONE").count(), 2, "{text}");
    let hashes: Vec<&str> = text.lines().filter(|l| l.starts_with("HASH ")).collect();
    assert!(hashes.len() == 2 && hashes[0] == hashes[1], "{text}");
}

#[test]
#[ignore = "needs torchrun (pip install torch), not in CI"]
fn torchrun_standalone_ranks_meet_through_the_agent_store() {
    let (ok, text) = torchrun(&["--standalone", "--nproc-per-node", "2"], &[]);
    assert_two_ranks_done(ok, &text, 0);
}

#[test]
#[ignore = "needs torchrun (pip install torch), not in CI"]
fn torchrun_c10d_one_node_ranks_meet_through_the_agent_store() {
    let endpoint = format!("127.0.0.1:{}", common::free_port());
    let args = [
        "--nnodes",
        "1",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        &endpoint,
    ];
    let (ok, text) = torchrun(&args, &[]);
    assert_two_ranks_done(ok, &text, 0);
}

#[test]
#[ignore = "needs torchrun (pip install torch), not in CI"]
fn torchrun_restart_meets_under_the_new_attempts_keys() {
    let args = [
        "--standalone",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "1",
    ];
    let (ok, text) = torchrun(&args, &[("DTRAIN_TEST_FAIL_FIRST_ATTEMPT", "1")]);
    assert!(text.contains("FAIL failing attempt 0 on purpose"), "{text}");
    assert_two_ranks_done(ok, &text, 1);
}
