//! Every collective over real OS processes talking TCP on loopback, world sizes 1–4 and 8.

mod common;

use std::time::Duration;

use common::{assert_success_and_identical, collectives, finish_all, worker_config, Spawn};

/// Entry point of re-executed worker processes; does nothing in a normal test run.
#[test]
fn worker() {
    let Ok(scenario) = std::env::var("DTRAIN_TEST_SCENARIO") else {
        return;
    };
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
        other => common::fail(format!("unknown scenario {other}")),
    }
    println!("DONE");
    std::process::exit(0);
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
fn async_ops_world_2_tcp() {
    run("async", 2, 0);
}

#[test]
fn async_ops_world_1_local() {
    run("async", 1, 0);
}
