//! Failures during collectives: a rank killed with SIGKILL, a rank that stops answering
//! (SIGSTOP), and ranks calling mismatched collectives. Survivors must return errors that
//! name the culprit rank, well before the collective deadline.

mod common;

use std::time::Duration;

use common::{finish_all, worker_config, Finished, Spawn};
use transport::ReduceOp;

#[test]
#[ignore = "rank process of this file's tests, which spawn it with --ignored --exact worker"]
fn worker() {
    let scenario = common::child_scenario();
    let cfg = worker_config();
    let mut comm = common::connect_or_exit(&cfg);
    let rank = cfg.rank;
    match scenario.as_str() {
        // All-reduce forever (large: ring path; small: one-shot path) until an error.
        "loop_large" | "loop_small" => {
            let len = if scenario == "loop_large" {
                1 << 20
            } else {
                100
            };
            let mut buf = vec![1.0f32; len];
            let mut iterations = 0u64;
            loop {
                if let Err(e) = comm.all_reduce(&mut buf, ReduceOp::Avg) {
                    println!("ITERATIONS {iterations}");
                    common::exit_error(&e);
                }
                iterations += 1;
                if iterations == 3 {
                    println!("READY");
                }
            }
        }
        // Each rank passes a different length: a protocol error, not silent corruption.
        "mismatch" => {
            let mut buf = vec![1.0f32; 100 * (rank + 1)];
            match comm.all_reduce(&mut buf, ReduceOp::Sum) {
                Ok(()) => common::fail("mismatched lengths were not detected"),
                Err(e) => common::exit_error(&e),
            }
        }
        // Rank 0 finishes its part of a gather and exits without dropping its communicator
        // (no goodbye) while root 1 still waits for the late rank 2: a finished rank must not
        // be mistaken for a dead one.
        "exit_without_drop" => {
            if rank == 2 {
                std::thread::sleep(std::time::Duration::from_millis(1000));
            }
            let send = vec![rank as f32; 1000];
            let mut recv = vec![0f32; 3000];
            let root = 1;
            let result = comm.gather(&send, (rank == root).then_some(&mut recv[..]), root);
            if let Err(e) = result {
                common::exit_error(&e);
            }
            if rank == root && (0..3000).any(|i| recv[i] != (i / 1000) as f32) {
                common::fail("wrong gather result");
            }
            println!("DONE");
            std::process::exit(0); // deliberately skips dropping `comm`
        }
        other => common::fail(format!("unknown scenario {other}")),
    }
}

fn expect_error_naming(r: &Finished, kinds: &[&str], rank: usize) {
    assert_eq!(r.code, Some(3), "expected an error exit:\n{}", r.describe());
    let kind = r.tagged("ERRKIND").pop().unwrap_or_default();
    assert!(
        kinds.contains(&kind.as_str()),
        "kind {kind} not in {kinds:?}:\n{}",
        r.describe()
    );
    let err = r.error().unwrap_or_default();
    assert!(
        err.contains(&format!("rank {rank} ")),
        "error {err:?} should name rank {rank}"
    );
}

fn kill_one_rank(scenario: &str, world: usize, victim: usize) {
    // The collective deadline is far above the wait below: detection must come from the
    // dead sockets, not from a timeout.
    let spawn = Spawn::new(scenario, world).env("DTRAIN_TEST_COLLECTIVE_MS", 120_000);
    let mut workers = spawn.spawn_all();
    for w in workers.iter_mut() {
        let ready = w.wait_for_line("READY", Duration::from_secs(60));
        assert!(
            ready.is_some(),
            "rank {} never got going: {:?}",
            w.rank,
            w.output
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    workers[victim].child.kill().expect("SIGKILL the victim");
    let results = finish_all(workers, Duration::from_secs(30));
    for r in results.iter().filter(|r| r.rank != victim) {
        expect_error_naming(r, &["PeerDied"], victim);
    }
}

#[test]
fn killed_rank_is_named_by_all_survivors_large_messages() {
    kill_one_rank("loop_large", 3, 2);
}

#[test]
fn killed_rank_is_named_by_all_survivors_small_messages() {
    kill_one_rank("loop_small", 4, 1);
}

#[test]
fn stopped_rank_times_out_and_is_named() {
    let spawn = Spawn::new("loop_large", 3).env("DTRAIN_TEST_COLLECTIVE_MS", 2000);
    let mut workers = spawn.spawn_all();
    for w in workers.iter_mut() {
        assert!(
            w.wait_for_line("READY", Duration::from_secs(60)).is_some(),
            "{:?}",
            w.output
        );
    }
    let victim = 1;
    let pid = nix::unistd::Pid::from_raw(workers[victim].child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    let mut survivors = workers;
    let stopped = survivors.remove(victim);
    let results = finish_all(survivors, Duration::from_secs(30));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    let _ = stopped.finish(Duration::from_secs(10));
    // The rank waiting on the stopped one times out; the other is told by its neighbour.
    let mut saw_timeout = false;
    for r in &results {
        expect_error_naming(r, &["Timeout", "PeerDied"], victim);
        saw_timeout |= r.tagged("ERRKIND") == vec!["Timeout".to_string()];
    }
    assert!(saw_timeout, "some survivor should report a Timeout");
}

#[test]
fn mismatched_lengths_are_a_protocol_error() {
    let spawn = Spawn::new("mismatch", 2);
    let results = finish_all(spawn.spawn_all(), Duration::from_secs(60));
    for r in &results {
        assert_eq!(r.code, Some(3), "{}", r.describe());
    }
    assert!(
        results
            .iter()
            .any(|r| r.tagged("ERRKIND") == vec!["Protocol".to_string()]),
        "one rank should detect the mismatch as a protocol error: {:#?}",
        results.iter().map(Finished::describe).collect::<Vec<_>>()
    );
}

#[test]
fn rank_exiting_without_goodbye_after_its_part_is_not_an_error() {
    let spawn = Spawn::new("exit_without_drop", 3);
    for r in finish_all(spawn.spawn_all(), Duration::from_secs(60)) {
        assert_eq!(r.code, Some(0), "{}", r.describe());
    }
}
