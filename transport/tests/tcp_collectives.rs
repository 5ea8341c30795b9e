//! Every collective over real OS processes talking TCP on loopback, world sizes 1–4 and 8.

mod common;

use std::time::Duration;

use common::{assert_success_and_identical, collectives, finish_all, worker_config, Spawn};
use transport::{Communicator, ReduceOp};

/// Entry point of re-executed worker processes; does nothing in a normal test run.
#[test]
#[ignore = "rank process of this file's tests, which spawn it with --ignored --exact worker"]
fn worker() {
    let scenario = common::child_scenario();
    let cfg = worker_config();
    let mut comm = common::connect_or_exit(&cfg);
    println!("TRANSPORT {}", comm.transport_name());
    let big = std::env::var("DTRAIN_TEST_BIG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3 << 18);
    match scenario.as_str() {
        "battery" => collectives::full_battery(&mut comm, big),
        "back_to_back" => collectives::back_to_back(&mut comm, 300),
        "async" => collectives::async_ops(comm),
        "reuse" => reuse_buffers_at_once(&mut comm),
        other => common::fail(format!("unknown scenario {other}")),
    }
    println!("DONE");
    std::process::exit(0);
}

/// Large frames are sent zero-copy: the kernel reads the sender's pages when the receiver
/// reads. In each round one rank (the "writer") overwrites its buffer the instant the
/// collective returns; every other rank checks that its result holds none of those bytes.
fn reuse_buffers_at_once(comm: &mut Communicator) {
    let n = comm.world_size();
    let r = comm.rank();
    let len = 3 << 18; // 3 MB of f32: several spliced pieces per rank.
    let mut buf = vec![0f32; len];
    for round in 0..24 {
        let writer = round % n;
        // Small integers: every sum is exact in f32, whatever the order.
        let value = |q: usize, i: usize| ((q * 7 + round * 13 + i) % 1000) as f32;
        for (i, v) in buf.iter_mut().enumerate() {
            *v = value(r, i);
        }
        if let Err(e) = comm.all_reduce(&mut buf, ReduceOp::Sum) {
            common::exit_error_with("all_reduce", &e);
        }
        if r == writer {
            buf.fill(-1.0);
        } else {
            for (i, &v) in buf.iter().enumerate() {
                let want: f32 = (0..n).map(|q| value(q, i)).sum();
                if v != want {
                    common::fail(format!(
                        "round {round}: all_reduce element {i} is {v}, expected {want}"
                    ));
                }
            }
        }
        for (i, v) in buf.iter_mut().enumerate() {
            *v = if r == writer { value(r, i) } else { -2.0 };
        }
        if let Err(e) = comm.broadcast(&mut buf, writer) {
            common::exit_error_with("broadcast", &e);
        }
        if r == writer {
            buf.fill(-1.0);
        } else if let Some(i) = (0..len).find(|&i| buf[i] != value(writer, i)) {
            common::fail(format!(
                "round {round}: broadcast element {i} is {}, expected {}",
                buf[i],
                value(writer, i)
            ));
        }
    }
}

fn run(scenario: &str, world: usize, big: usize) {
    let spawn = Spawn::new(scenario, world).env("DTRAIN_TEST_BIG", big);
    let results = finish_all(spawn.spawn_all(), Duration::from_secs(300));
    assert_success_and_identical(&results);
    let expect = if world == 1 { "local" } else { "tcp" };
    for r in &results {
        assert_eq!(
            r.tagged("TRANSPORT"),
            vec![expect.to_string()],
            "{}",
            r.describe()
        );
    }
}

// `big` = 786432 elements: 3 MB of f32, 6 MB of f64/i64.
#[test]
fn battery_world_1_local() {
    run("battery", 1, 3 << 18);
}

#[test]
fn battery_world_2_tcp() {
    run("battery", 2, 3 << 18);
}

#[test]
fn battery_world_3_tcp() {
    run("battery", 3, 3 << 18);
}

#[test]
fn battery_world_4_tcp() {
    run("battery", 4, 3 << 18);
}

#[test]
fn battery_world_8_tcp_smaller_buffers() {
    run("battery", 8, 40_000);
}

#[test]
fn back_to_back_varying_sizes_world_3_tcp() {
    run("back_to_back", 3, 0);
}

#[test]
fn buffers_reused_at_once_world_2_tcp() {
    run("reuse", 2, 0);
}

#[test]
fn buffers_reused_at_once_world_3_tcp() {
    run("reuse", 3, 0);
}

#[test]
fn async_ops_world_2_tcp() {
    run("async", 2, 0);
}

#[test]
fn async_ops_world_1_local() {
    run("async", 1, 0);
}
