//! The hierarchical backend (`"shm+tcp"`: shared memory within a host, TCP between host
//! leaders) with real OS processes. Several "hosts" on this one machine come from the
//! `DTRAIN_HOST_ID` override of the host identity, one value per rank.
//!
//! Covered: every collective (f32/f64/i64, lengths 0, 1, 7, 1023 and a few MB, Sum/Avg/Max/
//! Min) against a naive reference (integers exactly, floats to rounding) with bitwise equal
//! results on all ranks, on 2 hosts x 2 ranks, 3+1 ranks, hosts interleaved in rank order
//! (A,B,A,B), and 3 hosts of 1, 3 and 1 ranks; back-to-back collectives and async use;
//! transport selection; a rank killed with -9 (a non-leader, a leader; large and small
//! all-reduces): every survivor returns an error naming the dead rank's global rank well
//! before the collective deadline, and nothing is left in /dev/shm; a SIGSTOPped leader is
//! named after the timeouts.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{
    assert_success_and_identical, collectives, finish_all, worker_config, Finished, Spawn, Worker,
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
        "battery_small" => collectives::full_battery(&mut comm, 1 << 18),
        "back_to_back" => collectives::back_to_back(&mut comm, 200),
        "async" => collectives::async_ops(comm),
        // A barrier, so no rank exits while another is still checking its peers.
        "connect_only" => {
            if let Err(e) = comm.barrier() {
                common::exit_error(&e);
            }
        }
        // All-reduce until an error: 1 MiB (leaders' TCP ring) or 400 B (fused with the
        // leaders' status exchange).
        "loop" | "loop_small" => {
            let len = if scenario == "loop" { 1 << 18 } else { 100 };
            collectives::all_reduce_until_error(&mut comm, &mut vec![1.0f32; len])
        }
        other => common::fail(format!("unknown scenario {other}")),
    }
    println!("DONE");
    std::process::exit(0);
}

/// Spawns one worker per entry of `hosts`; rank `r` gets `DTRAIN_HOST_ID=hosts[r]`.
fn spawn_on_hosts(spawn: &Spawn, hosts: &[&str]) -> Vec<Worker> {
    assert_eq!(spawn.world_size, hosts.len());
    hosts
        .iter()
        .enumerate()
        .map(|(r, h)| spawn.spawn_rank(r, &[("DTRAIN_HOST_ID", h.to_string())]))
        .collect()
}

fn run(scenario: &str, hosts: &[&str], transport: &str) -> Vec<Finished> {
    let mut spawn = Spawn::new(scenario, hosts.len());
    spawn.transport = transport.into();
    let results = finish_all(spawn_on_hosts(&spawn, hosts), Duration::from_secs(600));
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

/// This user's dtrain segments in /dev/shm whose names end like a hierarchical host
/// segment (`-h<rank>`).
fn host_segments() -> BTreeSet<String> {
    let prefix = format!("dtrain-{}-", nix::unistd::getuid());
    std::fs::read_dir("/dev/shm")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n.starts_with(&prefix)
                        && n.rsplit_once("-h").is_some_and(|(_, r)| {
                            !r.is_empty() && r.bytes().all(|b| b.is_ascii_digit())
                        })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Segments are unlinked as soon as a host's ranks have attached, so after the workers are
/// gone none may remain. Tests running in parallel may hold one for a moment while
/// attaching: only names that were not there before and are still there 3 s later count.
fn assert_no_new_segments(before: &BTreeSet<String>) {
    let after: BTreeSet<String> = host_segments().difference(before).cloned().collect();
    if after.is_empty() {
        return;
    }
    std::thread::sleep(Duration::from_secs(3));
    let still_there = host_segments();
    let lasting: Vec<&String> = after.intersection(&still_there).collect();
    assert!(
        lasting.is_empty(),
        "leftover /dev/shm segments: {lasting:?}"
    );
}

#[test]
fn two_hosts_two_ranks_each_battery() {
    let before = host_segments();
    assert_transport(&run("battery", &["A", "A", "B", "B"], "auto"), "shm+tcp");
    assert_no_new_segments(&before);
}

#[test]
fn uneven_three_plus_one_battery() {
    assert_transport(&run("battery", &["A", "A", "A", "B"], "auto"), "shm+tcp");
}

#[test]
fn interleaved_hosts_battery() {
    assert_transport(&run("battery", &["A", "B", "A", "B"], "auto"), "shm+tcp");
}

#[test]
fn three_hosts_with_single_rank_hosts_battery() {
    // Rank 0 is alone on host B and host C has one rank: leaders without shared memory.
    assert_transport(
        &run("battery_small", &["B", "A", "A", "A", "C"], "auto"),
        "shm+tcp",
    );
}

#[test]
fn single_rank_host_leads_back_to_back() {
    // Host B's only rank is rank 0: the leaders' mesh includes a host without shared memory.
    assert_transport(
        &run("back_to_back", &["B", "A", "A", "A", "C"], "auto"),
        "shm+tcp",
    );
}

#[test]
fn async_over_hierarchy() {
    assert_transport(&run("async", &["A", "B", "B", "A"], "auto"), "shm+tcp");
}

#[test]
fn transport_selection() {
    // One rank per host: plain TCP. Forced TCP stays TCP on a mixed placement.
    assert_transport(&run("connect_only", &["A", "B", "C"], "auto"), "tcp");
    assert_transport(&run("connect_only", &["A", "A", "B", "B"], "tcp"), "tcp");
    // All on one "host" via the override: shared memory.
    assert_transport(&run("connect_only", &["A", "A", "A"], "auto"), "shm");
    // Forced shm across "hosts" is refused on every rank, naming the hosts.
    let mut spawn = Spawn::new("connect_only", 4);
    spawn.transport = "shm".into();
    let results = finish_all(
        spawn_on_hosts(&spawn, &["hostA", "hostA", "hostB", "hostB"]),
        Duration::from_secs(120),
    );
    for r in &results {
        assert_eq!(r.code, Some(3), "{}", r.describe());
        let err = r.error().unwrap_or_default();
        assert!(
            err.contains("hostA") && err.contains("hostB"),
            "error {err:?} should name both hosts\n{}",
            r.describe()
        );
    }
}

/// Kills `victim` with SIGKILL once every rank is looping over all-reduces; every survivor
/// must exit with an error naming `victim` long before the collective deadline (120 s).
fn kill_one(scenario: &str, hosts: &[&str], victim: usize) {
    let before = host_segments();
    let mut spawn = Spawn::new(scenario, hosts.len()).env("DTRAIN_TEST_COLLECTIVE_MS", 120_000);
    spawn.transport = "auto".into();
    let mut workers = spawn_on_hosts(&spawn, hosts);
    for w in workers.iter_mut() {
        assert!(
            w.wait_for_line("READY", Duration::from_secs(60)).is_some(),
            "rank {} never got going: {:?}",
            w.rank,
            w.output
        );
    }
    workers[victim].child.kill().expect("SIGKILL");
    // A survivor still running after 30 s is killed by the harness and fails below.
    let results = finish_all(workers, Duration::from_secs(30));
    for r in results.iter().filter(|r| r.rank != victim) {
        assert_eq!(
            r.tagged("TRANSPORT"),
            vec!["shm+tcp".to_string()],
            "{}",
            r.describe()
        );
        assert_eq!(r.code, Some(3), "expected an error exit:\n{}", r.describe());
        let kind = r.tagged("ERRKIND").pop().unwrap_or_default();
        assert_eq!(kind, "PeerDied", "{}", r.describe());
        let err = r.error().unwrap_or_default();
        eprintln!("rank {} after rank {victim} was killed: {err}", r.rank);
        assert!(
            err.contains(&format!("rank {victim} ")),
            "rank {}: error {err:?} should name rank {victim}\n{}",
            r.rank,
            r.describe()
        );
    }
    assert_no_new_segments(&before);
}

#[test]
fn killed_non_leader_is_named_on_every_host() {
    kill_one("loop", &["A", "A", "B", "B"], 3);
}

#[test]
fn killed_leader_is_named_on_every_host() {
    kill_one("loop", &["A", "A", "B", "B"], 2);
}

#[test]
fn killed_non_leader_of_big_host_is_named() {
    kill_one("loop", &["A", "A", "A", "B"], 1);
}

#[test]
fn killed_leader_interleaved_is_named() {
    kill_one("loop", &["A", "B", "A", "B"], 1);
}

#[test]
fn killed_non_leader_small_messages_is_named() {
    kill_one("loop_small", &["A", "A", "B", "B"], 3);
}

#[test]
fn killed_leader_small_messages_is_named() {
    kill_one("loop_small", &["A", "A", "B", "B", "B"], 2);
}

/// A leader that stops answering (SIGSTOP): the other leader times out on it over TCP and
/// tells its host; the stopped leader's own host peer times out on it in shared memory
/// (after `2 x collective + connect`, the longer deadline non-leaders give their leader).
#[test]
fn stopped_leader_times_out_and_is_named() {
    let victim = 2;
    let mut spawn = Spawn::new("loop", 4)
        .env("DTRAIN_TEST_COLLECTIVE_MS", 2000)
        .env("DTRAIN_TEST_CONNECT_MS", 10_000);
    spawn.transport = "auto".into();
    let mut workers = spawn_on_hosts(&spawn, &["A", "A", "B", "B"]);
    for w in workers.iter_mut() {
        assert!(
            w.wait_for_line("READY", Duration::from_secs(60)).is_some(),
            "rank {} never got going: {:?}",
            w.rank,
            w.output
        );
    }
    let pid = nix::unistd::Pid::from_raw(workers[victim].child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let mut survivors = workers;
    let stopped = survivors.remove(victim);
    let results = finish_all(survivors, Duration::from_secs(60));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let _ = stopped.finish(Duration::from_secs(10));
    let mut saw_timeout = false;
    for r in &results {
        assert_eq!(r.code, Some(3), "expected an error exit:\n{}", r.describe());
        let kind = r.tagged("ERRKIND").pop().unwrap_or_default();
        assert!(
            kind == "Timeout" || kind == "PeerDied",
            "kind {kind}:\n{}",
            r.describe()
        );
        saw_timeout |= kind == "Timeout";
        let err = r.error().unwrap_or_default();
        eprintln!("rank {} after rank {victim} was stopped: {err}", r.rank);
        assert!(
            err.contains(&format!("rank {victim} ")),
            "rank {}: error {err:?} should name rank {victim}\n{}",
            r.rank,
            r.describe()
        );
    }
    assert!(saw_timeout, "some survivor should report a Timeout");
}
