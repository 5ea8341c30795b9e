//! The network link between two hosts goes down mid-training (`ip link set <veth> down`
//! in one of two network namespaces, one DDP rank over TCP in each): an outage shorter than
//! `--timeout` costs nothing (TCP retransmits once the link is back; the job ends with the
//! parameters of a run without an outage); a longer one fails every rank within the
//! deadline, each naming the rank it waited for and that rank's address.
//!
//! Needs root and iproute2; without them these tests FAIL saying so (CI runs as root and
//! installs iproute2). Namespaces are deleted and every child killed and reaped on drop.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::{TwoHosts, HOST_IPS};
use common::watch::Watched;
use common::*;

/// Rank `rank` of a 2-rank DDP job, in host `rank`'s namespace, over TCP.
fn rank_command(hosts: &TwoHosts, rank: usize, timeout: u64, iters: usize) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &hosts.names[rank], BIN]);
    cmd.args(strings(SMALL));
    cmd.args(["--mode", "ddp", "--transport", "tcp", "--num-nodes", "2"]);
    // Fresh namespaces: nothing else listens on 29500 there.
    cmd.args(["--master-ip", HOST_IPS[0], "--master-port", "29500"]);
    cmd.args(["--rank", &rank.to_string(), "--epochs", "100"]);
    cmd.args(["--max-iters", &iters.to_string()]);
    cmd.args(["--timeout", &timeout.to_string()]);
    cmd.env(
        "DTRAIN_HOST_ID",
        format!("link-test-{}-{rank}", std::process::id()),
    )
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    cmd
}

fn start(hosts: &TwoHosts, timeout: u64, iters: usize) -> Watched {
    Watched::start(
        (0..2)
            .map(|r| {
                rank_command(hosts, r, timeout, iters)
                    .spawn()
                    .expect("spawn dtrain")
            })
            .collect(),
    )
}

/// A 1 s outage under a 15 s deadline, after both ranks trained 3 iterations.
#[test]
fn a_short_link_outage_is_no_failure() {
    let hosts = TwoHosts::create("the link-down test", "lo", None);
    let (status, seen) = start(&hosts, 15, 30).finish();
    assert!(status.iter().all(|s| s.success()), "{:?}", seen.stderr);
    let expected: Vec<String> = seen.stdout.iter().flat_map(|o| hashes(o)).collect();
    assert_eq!(expected.len(), 2, "{:?}", seen.stdout);

    let mut w = start(&hosts, 15, 30);
    w.wait_for_iterations(0, 3);
    w.wait_for_iterations(1, 3);
    hosts.set_link(0, false).expect("link down");
    let at_outage = w.iterations(1);
    std::thread::sleep(Duration::from_secs(1));
    hosts.set_link(0, true).expect("link up");
    let (status, seen) = w.finish();
    for (r, (s, err)) in status.iter().zip(&seen.stderr).enumerate() {
        assert!(s.success(), "rank {r} {s}: {err}");
    }
    assert!(
        losses(&seen.stdout[1]).len() > at_outage,
        "the outage came after the last step"
    );
    let got: Vec<String> = seen.stdout.iter().flat_map(|o| hashes(o)).collect();
    assert_eq!(got, expected);
}

/// The link stays down: under a 4 s deadline each rank fails on its own, naming the other
/// and its address.
#[test]
fn a_link_down_longer_than_the_deadline_is_named_on_every_rank() {
    let hosts = TwoHosts::create("the link-down test", "ld", None);
    let mut w = start(&hosts, 4, 100_000);
    w.wait_for_iterations(0, 3);
    w.wait_for_iterations(1, 3);
    hosts.set_link(0, false).expect("link down");
    let start = Instant::now();
    while w.exited(0).is_none() || w.exited(1).is_none() {
        assert!(
            start.elapsed() < RUN_DEADLINE,
            "a rank waits forever: {:?}",
            w.seen.stderr
        );
        w.pump(Duration::from_millis(10));
    }
    let (status, seen) = w.finish();
    for (rank, (status, stderr)) in status.iter().zip(&seen.stderr).enumerate() {
        let other = 1 - rank;
        assert_eq!(status.code(), Some(1), "rank {rank}: {stderr}");
        let error = stderr
            .lines()
            .find(|l| l.starts_with(&format!("dtrain: error: rank {rank}: ")))
            .unwrap_or_else(|| panic!("rank {rank} printed no error:\n{stderr}"));
        // The rank and its data address: `rank 1 at 10.216.0.2:PORT`.
        let named = format!("rank {other} at {}:", HOST_IPS[other]);
        assert!(
            error.contains(&named),
            "rank {rank} does not name {named:?}: {error}"
        );
        // Its own deadline (`timed out after 4.0…s`), or its peer's report of it.
        assert!(error.contains("timed out after 4."), "rank {rank}: {error}");
    }
}
