//! Fault classes of the README's "Faults and restarts" table not covered elsewhere, as the
//! user meets them: ranks started with different flags, a rendezvous port already taken, a
//! `--resume` file that does not exist.

mod common;

use common::*;

/// Rank 1 started with another `--lr`: both ranks refuse at the rendezvous, naming the
/// mismatch, before training.
#[test]
fn ranks_with_different_flags_are_refused_on_every_rank() {
    let port = free_port().to_string();
    let mut ranks = Ranks {
        children: Vec::new(),
    };
    for (rank, lr) in [(0, "0.02"), (1, "0.05")] {
        let mut args = strings(SMALL);
        set_flag(&mut args, "--lr", lr);
        args.extend(strings(&["--mode", "ddp", "--num-nodes", "2"]));
        args.extend(strings(&[
            "--master-port",
            &port,
            "--rank",
            &rank.to_string(),
        ]));
        args.extend(strings(&["--max-iters", "2", "--connect-timeout", "30"]));
        ranks.children.push(spawn(&args));
    }
    for (rank, out) in collect(&mut ranks).iter().enumerate() {
        assert_eq!(out.status.code(), Some(1), "rank {rank}: {}", out.stderr);
        let said =
            format!("dtrain: error: rank {rank}: communication failed: configuration mismatch: ");
        assert!(out.stderr.contains(&said), "rank {rank}: {}", out.stderr);
        assert!(out
            .stderr
            .contains("all ranks must run the same configuration"));
        assert!(!out.stdout.contains("Training Iteration"), "rank {rank}");
    }
}

/// Rank 0's `--master-port` is taken by another program: rank 0 says so at once.
#[test]
fn a_master_port_in_use_is_named() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = squatter.local_addr().expect("addr").port().to_string();
    let mut args = strings(SMALL);
    args.extend(strings(&[
        "--mode",
        "ddp",
        "--num-nodes",
        "2",
        "--rank",
        "0",
    ]));
    args.extend(strings(&["--master-port", &port, "--max-iters", "2"]));
    let out = run_single(&args);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    let said = format!("rendezvous failed: port {port} on 127.0.0.1 is already in use");
    assert!(out.stderr.contains(&said), "{}", out.stderr);
    drop(squatter);
}

/// `--resume` of a file that is not there: exit 2 naming it.
#[test]
fn a_missing_resume_file_is_a_usage_error() {
    let dir = temp_dir("missing");
    let missing = dir.join("nope.safetensors");
    let mut args = strings(SMALL);
    args.extend(strings(&["--mode", "single", "--max-iters", "2"]));
    args.extend(strings(&["--resume", missing.to_str().expect("utf-8")]));
    let out = run_single(&args);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    let said = format!(
        "dtrain: error: cannot read checkpoint: cannot read {}",
        missing.display()
    );
    assert!(out.stderr.contains(&said), "{}", out.stderr);
}
