//! Two "hosts" for the multi-host tests: network namespaces joined by a veth pair, optionally
//! shaped with `tc … tbf`, deleted on drop (which also deletes the veth pair and its qdiscs).
//! Needs root and iproute2; without them the test fails saying so (CI runs as root and
//! installs iproute2).

use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// The hosts' addresses: `HOST_IPS[0]` in the first namespace, `HOST_IPS[1]` in the second.
pub const HOST_IPS: [&str; 2] = ["10.216.0.1", "10.216.0.2"];

/// Run `program args`, its stderr in the error when it fails.
pub fn run_tool(program: &str, args: &[&str]) -> Result<Output, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("running `{program} {}`: {e}", args.join(" ")))?;
    if !out.status.success() {
        return Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(out)
}

/// Fail (not skip) unless this runs as root with iproute2's `ip` and `tc`.
pub fn require_root_and_iproute2(test: &str) {
    let is_root = nix::unistd::geteuid().is_root();
    let has_ip = Command::new("ip").arg("-V").output().is_ok();
    let has_tc = Command::new("tc").arg("-V").output().is_ok();
    assert!(
        is_root && has_ip && has_tc,
        "{test} needs root and iproute2 (`ip`, `tc`): running as root = {is_root}, `ip` found \
         = {has_ip}, `tc` found = {has_tc}. Run the tests as root with iproute2 installed (CI \
         does)."
    );
}

/// Two namespaces joined by a veth pair, `HOST_IPS` on its ends; deleted on drop.
pub struct TwoHosts {
    pub names: [String; 2],
    /// The veth end inside each namespace.
    pub links: [String; 2],
}

impl TwoHosts {
    /// `tag` (a letter or two) names the test in the namespace and interface names; `rate`
    /// (e.g. `1gbit`) shapes both ends with `tbf rate RATE burst 4mb latency 50ms`.
    pub fn create(test: &str, tag: &str, rate: Option<&str>) -> TwoHosts {
        require_root_and_iproute2(test);
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let id = format!(
            "{}{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        // Interface names are at most 15 bytes: "d" + tag + side + pid and counter.
        let hosts = TwoHosts {
            names: [format!("dtrain-{tag}a-{id}"), format!("dtrain-{tag}b-{id}")],
            links: [format!("d{tag}a{id}"), format!("d{tag}b{id}")],
        };
        let [a, b] = hosts.names.clone();
        let [va, vb] = hosts.links.clone();
        let cidrs = HOST_IPS.map(|ip| format!("{ip}/24"));
        let mut steps: Vec<Vec<&str>> = vec![
            vec!["netns", "add", &a],
            vec!["netns", "add", &b],
            vec![
                "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
            ],
        ];
        for (ns, dev, cidr) in [(&a, &va, &cidrs[0]), (&b, &vb, &cidrs[1])] {
            steps.push(vec!["-n", ns, "addr", "add", cidr, "dev", dev]);
            steps.push(vec!["-n", ns, "link", "set", "lo", "up"]);
            steps.push(vec!["-n", ns, "link", "set", dev, "up"]);
        }
        for step in steps {
            if let Err(e) = run_tool("ip", &step) {
                drop(hosts);
                panic!("setting up network namespaces failed: {e}");
            }
        }
        if let Some(rate) = rate {
            for (ns, dev) in [(&a, &va), (&b, &vb)] {
                let shape = [
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                    rate, "burst", "4mb", "latency", "50ms",
                ];
                if let Err(e) = run_tool("ip", &shape) {
                    drop(hosts);
                    panic!("shaping the link with tc tbf failed (is sch_tbf available?): {e}");
                }
            }
        }
        hosts
    }
}

impl TwoHosts {
    /// `ip link set <host's veth end> up|down` inside host `host`'s namespace.
    pub fn set_link(&self, host: usize, up: bool) -> Result<(), String> {
        let state = if up { "up" } else { "down" };
        let (ns, dev) = (&self.names[host], &self.links[host]);
        run_tool("ip", &["-n", ns, "link", "set", dev, state]).map(|_| ())
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for name in &self.names {
            // Deleting a namespace deletes its veth end (and so the pair) and its qdisc.
            let _ = run_tool("ip", &["netns", "del", name]);
        }
    }
}
