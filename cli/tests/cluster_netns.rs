//! `dtrain` across two "hosts" with a shaped link, as `scripts/cluster_bench.py` runs it: two
//! network namespaces joined by a veth pair, each end limited with `tc ... tbf rate 1gbit
//! burst 4mb latency 50ms`, ranks started by hand (`--master-ip`, `--rank`) inside them. A
//! few DDP iterations of a tiny model (several buckets) with one rank per host over TCP, and
//! with two ranks per host (`--transport auto`: shared memory within a host, TCP between the
//! hosts), also with `--grad-compression bf16`; every
//! rank must end with the same parameter hash, and the same hash as the same job on loopback
//! with the same host identities (`DTRAIN_HOST_ID`), i.e. the same transport and sum order:
//! the link changes nothing but time. No timing is checked.
//!
//! Needs root, iproute2 (`ip`, `tc`) and the `sch_tbf` qdisc; without them this test FAILS
//! with a message saying so (CI runs as root and installs iproute2). Namespaces are deleted
//! and every child killed and reaped on drop, also when an assertion fails.

mod common;

use std::process::{Command, Stdio};

use common::netns::{require_root_and_iproute2, TwoHosts, HOST_IPS as IPS};
use common::{assert_ok, collect, free_port, hashes, strings, Ranks, BIN};

/// Tiny problem: 2 conv blocks, batch 16 per rank, 4 iterations, 4 DDP buckets.
const TINY: &[&str] = &[
    "--dataset",
    "synthetic",
    "--synthetic-train",
    "512",
    "--synthetic-test",
    "64",
    "--model",
    "8,M,16,M",
    "--batch-size",
    "16",
    "--threads",
    "1",
    "--max-iters",
    "4",
    "--log-every",
    "1",
    "--no-progress",
    "--mode",
    "ddp",
    "--first-bucket-mb",
    "0.002",
    "--bucket-cap-mb",
    "0.01",
];

struct Rank {
    /// Network namespace to run in; `None` = this one.
    netns: Option<String>,
    args: Vec<String>,
    host_id: String,
}

/// Starts every rank, waits for all (bounded by [`common::RUN_DEADLINE`]), returns each
/// one's parameter hash; panics with the failing rank's output if one does not exit 0.
fn run(ranks: Vec<Rank>) -> Vec<String> {
    let mut children = Ranks {
        children: Vec::new(),
    };
    for r in &ranks {
        let mut cmd = match &r.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(&r.args)
            .env("DTRAIN_HOST_ID", &r.host_id)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        children.children.push(cmd.spawn().expect("spawn dtrain"));
    }
    let outs = collect(&mut children);
    assert_ok(&outs);
    outs.iter()
        .map(|o| match hashes(&o.stdout).as_slice() {
            [h] => h.clone(),
            _ => panic!("not one parameter hash in:\n{}", o.stdout),
        })
        .collect()
}

/// `per_host` ranks on each of the two hosts (rank-major: host 0 has ranks 0..per_host).
fn ranks_on(
    hosts: Option<&TwoHosts>,
    per_host: usize,
    transport: &str,
    extra: &[&str],
) -> Vec<Rank> {
    let world = 2 * per_host;
    let master = if hosts.is_some() { IPS[0] } else { "127.0.0.1" };
    let port = if hosts.is_some() {
        29500 // fresh namespaces: nothing else listens there
    } else {
        free_port()
    };
    let tag = format!("cluster-test-{}", std::process::id());
    (0..world)
        .map(|rank| {
            let host = rank / per_host;
            let mut args = strings(TINY);
            args.extend(
                [
                    "--master-ip",
                    master,
                    "--master-port",
                    &port.to_string(),
                    "--num-nodes",
                    &world.to_string(),
                    "--rank",
                    &rank.to_string(),
                    "--transport",
                    transport,
                ]
                .map(String::from),
            );
            args.extend(extra.iter().map(|s| s.to_string()));
            Rank {
                netns: hosts.map(|h| h.names[host].clone()),
                args,
                host_id: format!("{tag}-host{host}"),
            }
        })
        .collect()
}

fn assert_all_equal(hashes: &[String], what: &str) {
    assert!(
        hashes.iter().all(|h| h == &hashes[0]),
        "{what}: parameter hashes differ between ranks: {hashes:?}"
    );
}

/// Runs the job across two shaped hosts and on loopback (same host identities, so the same
/// transport and sum order) and returns both sets of hashes.
fn across_and_loopback(
    per_host: usize,
    transport: &str,
    extra: &[&str],
) -> (Vec<String>, Vec<String>) {
    let hosts = TwoHosts::create("the shaped two-host test", "c", Some("1gbit"));
    let across = run(ranks_on(Some(&hosts), per_host, transport, extra));
    drop(hosts);
    let loopback = run(ranks_on(None, per_host, transport, extra));
    (across, loopback)
}

fn check(per_host: usize, transport: &str, extra: &[&str]) {
    require_root_and_iproute2("the shaped two-host test");
    let what = format!(
        "2 hosts x {per_host} rank(s), --transport {transport} {}",
        extra.join(" ")
    );
    let (across, loopback) = across_and_loopback(per_host, transport, extra);
    assert_all_equal(&across, &format!("{what}, shaped link"));
    assert_all_equal(&loopback, &format!("{what}, loopback"));
    assert_eq!(
        across[0], loopback[0],
        "{what}: the job over the shaped link and over loopback ended with different parameters"
    );
}

#[test]
fn ddp_one_rank_per_shaped_host_tcp() {
    check(1, "tcp", &[]);
}

#[test]
fn ddp_two_ranks_per_shaped_host_hierarchical() {
    check(2, "auto", &[]);
}

#[test]
fn ddp_bf16_compressed_across_shaped_hosts() {
    check(1, "tcp", &["--grad-compression", "bf16"]);
    check(2, "auto", &["--grad-compression", "bf16"]);
}
