//! TCP between two real network stacks: two network namespaces joined by a veth pair, ranks
//! in each, `TransportKind::Tcp`. Needs root and iproute2 (`ip`); without them this test
//! FAILS with a message saying so (CI runs as root and installs iproute2).

mod common;

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{assert_success_and_identical, collectives, finish_all, worker_config, Spawn};

#[test]
#[ignore = "rank process of this file's tests, which spawn it with --ignored --exact worker"]
fn worker() {
    let scenario = common::child_scenario();
    let cfg = worker_config();
    let mut comm = common::connect_or_exit(&cfg);
    println!("TRANSPORT {}", comm.transport_name());
    match scenario.as_str() {
        "battery" => collectives::full_battery(&mut comm, 200_000),
        other => common::fail(format!("unknown scenario {other}")),
    }
    println!("DONE");
    std::process::exit(0);
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running `ip {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(())
}

/// Two namespaces + veth pair, deleted on drop (also when the test panics).
struct NetnsPair {
    names: [String; 2],
}

impl NetnsPair {
    fn create() -> NetnsPair {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let pair = NetnsPair {
            names: [format!("dtrain-a-{id}"), format!("dtrain-b-{id}")],
        };
        let (a, b) = (&pair.names[0], &pair.names[1]);
        let (va, vb) = (format!("dva{id}"), format!("dvb{id}"));
        let steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", a],
            vec!["netns", "add", b],
            vec![
                "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b,
            ],
            vec!["-n", a, "addr", "add", "10.213.0.1/24", "dev", &va],
            vec!["-n", b, "addr", "add", "10.213.0.2/24", "dev", &vb],
            vec!["-n", a, "link", "set", "lo", "up"],
            vec!["-n", b, "link", "set", "lo", "up"],
            vec!["-n", a, "link", "set", &va, "up"],
            vec!["-n", b, "link", "set", &vb, "up"],
        ];
        for step in steps {
            if let Err(e) = ip(&step) {
                drop(pair);
                panic!("setting up network namespaces failed: {e}");
            }
        }
        pair
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        for name in &self.names {
            // Deleting a namespace also deletes its end of the veth pair (and so both ends).
            let _ = ip(&["netns", "del", name]);
        }
    }
}

fn require_root_and_ip() {
    let is_root = nix::unistd::geteuid().is_root();
    let has_ip = Command::new("ip").arg("-V").output().is_ok();
    assert!(
        is_root && has_ip,
        "the network-namespace TCP test needs root and iproute2 (`ip`): running as root = {is_root}, \
         `ip` found = {has_ip}. Run the tests as root with iproute2 installed (CI does)."
    );
}

#[test]
fn tcp_collectives_across_two_network_namespaces() {
    require_root_and_ip();
    let pair = NetnsPair::create();
    let world = 4;
    let mut spawn = Spawn::new("battery", world);
    spawn.addr = "10.213.0.1".into();
    spawn.port = 29500; // a fresh namespace: nothing else listens there
    spawn.transport = "tcp".into();
    // Ranks 0, 1 in namespace A (with the master), ranks 2, 3 in namespace B.
    spawn.wrappers = (0..world)
        .map(|r| {
            let ns = &pair.names[if r < 2 { 0 } else { 1 }];
            vec!["ip".into(), "netns".into(), "exec".into(), ns.clone()]
        })
        .collect();
    let results = finish_all(spawn.spawn_all(), Duration::from_secs(300));
    drop(pair);
    assert_success_and_identical(&results);
    for r in &results {
        assert_eq!(
            r.tagged("TRANSPORT"),
            vec!["tcp".to_string()],
            "{}",
            r.describe()
        );
    }
}
