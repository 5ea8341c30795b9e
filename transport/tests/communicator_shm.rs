//! The shared-memory backend reached through `Communicator` (`TransportKind::Shm` / `Auto`),
//! plus transport selection: Auto picks shm on one host and shm+tcp (hierarchical) when a
//! host has several ranks and another host exists, Shm refuses to run across hosts. "Another
//! host" is simulated with a UTS namespace (different hostname), which needs root and
//! `unshare`; without them those tests FAIL saying so.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{
    assert_success_and_identical, collectives, finish_all, worker_config, Finished, Spawn,
};

#[test]
#[ignore = "rank process of this file's tests, which spawn it with --ignored --exact worker"]
fn worker() {
    let scenario = common::child_scenario();
    let cfg = worker_config();
    let mut comm = common::connect_or_exit(&cfg);
    println!("TRANSPORT {}", comm.transport_name());
    match scenario.as_str() {
        "battery" => collectives::full_battery(&mut comm, 3 << 18),
        "battery_small" => collectives::full_battery(&mut comm, 20_000),
        "back_to_back" => collectives::back_to_back(&mut comm, 300),
        "async" => collectives::async_ops(comm),
        "shared" => {
            collectives::shared_buffer_battery(&mut comm, 3 << 18);
            collectives::shared_buffer_async(comm, 3 << 18);
        }
        // All-reduce forever (until a peer is killed): ordinary or zero-copy buffers.
        "loop" | "shared_loop" => {
            let mut buf = if scenario == "loop" {
                transport::Buffer::heap(1 << 18)
            } else {
                comm.alloc_buffer::<f32>(3 << 18)
                    .unwrap_or_else(|e| common::exit_error(&e))
            };
            buf.fill(1.0);
            collectives::all_reduce_until_error(&mut comm, &mut buf)
        }
        other => common::fail(format!("unknown scenario {other}")),
    }
    println!("DONE");
    std::process::exit(0);
}

fn run(scenario: &str, world: usize, transport: &str) -> Vec<Finished> {
    let mut spawn = Spawn::new(scenario, world);
    spawn.transport = transport.into();
    let results = finish_all(spawn.spawn_all(), Duration::from_secs(300));
    assert_success_and_identical(&results);
    results
}

fn assert_transport(results: &[Finished], expect: &str) {
    for r in results {
        assert_eq!(
            r.tagged("TRANSPORT"),
            vec![expect.to_string()],
            "{}",
            r.describe()
        );
    }
}

#[test]
fn shm_battery_world_2() {
    assert_transport(&run("battery", 2, "shm"), "shm");
}

#[test]
fn shm_battery_world_3() {
    assert_transport(&run("battery", 3, "shm"), "shm");
}

#[test]
fn auto_picks_shm_on_one_host_world_4() {
    assert_transport(&run("battery", 4, "auto"), "shm");
}

#[test]
fn shm_battery_world_8_small() {
    assert_transport(&run("battery_small", 8, "shm"), "shm");
}

#[test]
fn shm_back_to_back_world_3() {
    assert_transport(&run("back_to_back", 3, "shm"), "shm");
}

#[test]
fn shm_async_world_2() {
    assert_transport(&run("async", 2, "shm"), "shm");
}

/// Buffers from `alloc_buffer` live in shared memory and all-reduce in place (zero-copy).
fn run_shared(world: usize) {
    let results = run("shared", world, "shm");
    assert_transport(&results, "shm");
    for r in &results {
        let shared = r.tagged("SHARED");
        assert!(
            !shared.is_empty() && shared.iter().all(|s| s == "true"),
            "{}",
            r.describe()
        );
    }
}

#[test]
fn shm_shared_buffers_world_2() {
    run_shared(2);
}

#[test]
fn shm_shared_buffers_world_3() {
    run_shared(3);
}

#[test]
fn shm_shared_buffers_world_4() {
    run_shared(4);
}

#[test]
fn shm_killed_rank_is_named_by_survivors() {
    killed_rank_is_named("loop");
}

#[test]
fn shm_killed_rank_is_named_by_survivors_in_a_zero_copy_all_reduce() {
    killed_rank_is_named("shared_loop");
}

fn killed_rank_is_named(scenario: &str) {
    let mut spawn = Spawn::new(scenario, 3).env("DTRAIN_TEST_COLLECTIVE_MS", 120_000);
    spawn.transport = "shm".into();
    let mut workers = spawn.spawn_all();
    for w in workers.iter_mut() {
        assert!(
            w.wait_for_line("READY", Duration::from_secs(60)).is_some(),
            "{:?}",
            w.output
        );
    }
    workers[1].child.kill().expect("SIGKILL");
    let results = finish_all(workers, Duration::from_secs(30));
    for r in results.iter().filter(|r| r.rank != 1) {
        assert_eq!(r.code, Some(3), "{}", r.describe());
        let err = r.error().unwrap_or_default();
        assert!(
            err.contains("rank 1"),
            "error {err:?} should name rank 1\n{}",
            r.describe()
        );
    }
}

/// Runs rank 1 in its own UTS namespace with another hostname: a different host identity.
fn other_host_wrappers(world: usize) -> Vec<Vec<String>> {
    let root = nix::unistd::geteuid().is_root();
    let has_unshare = Command::new("unshare").arg("--version").output().is_ok();
    assert!(
        root && has_unshare,
        "simulating a second host needs root and util-linux `unshare`: root = {root}, unshare found = {has_unshare}"
    );
    (0..world)
        .map(|r| {
            if r == 1 {
                [
                    "unshare",
                    "--uts",
                    "sh",
                    "-c",
                    "hostname dtrain-other-host && exec \"$0\" \"$@\"",
                ]
                .map(String::from)
                .to_vec()
            } else {
                Vec::new()
            }
        })
        .collect()
}

/// Ranks 0 and 2 share a host, rank 1 is on another: a mixed placement, so Auto picks the
/// hierarchical backend (shm within a host, TCP between host leaders).
#[test]
fn auto_uses_shm_plus_tcp_when_ranks_are_on_different_hosts() {
    let mut spawn = Spawn::new("battery_small", 3);
    spawn.transport = "auto".into();
    spawn.wrappers = other_host_wrappers(3);
    let results = finish_all(spawn.spawn_all(), Duration::from_secs(300));
    assert_success_and_identical(&results);
    assert_transport(&results, "shm+tcp");
}

#[test]
fn shm_across_hosts_is_a_clear_error_on_every_rank() {
    let mut spawn = Spawn::new("battery_small", 3);
    spawn.transport = "shm".into();
    spawn.wrappers = other_host_wrappers(3);
    for r in finish_all(spawn.spawn_all(), Duration::from_secs(120)) {
        assert_eq!(r.code, Some(3), "{}", r.describe());
        let err = r.error().unwrap_or_default();
        assert!(
            err.contains("shm needs all ranks on one host") && err.contains("dtrain-other-host"),
            "unexpected error {err:?}\n{}",
            r.describe()
        );
    }
}
