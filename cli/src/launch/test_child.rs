//! The hidden `launcher-test-child` subcommand: a child that prints lines, fails or sleeps as
//! the tests of `dtrain launch` tell it. Only in builds with the `test-hooks` feature (the
//! tests' builds), never in the shipped binary.

use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

use clap::Args;
use nix::sys::signal::{self, SigHandler, Signal};

use super::{allowed_cpus, cpu_list};
use crate::config::RESTART_COUNT_ENV;

/// Internal: a child for testing the launcher. Reads `DTRAIN_TEST_*` variables:
/// FAIL_RANK (that rank exits with EXIT_CODE, default 3, after printing its lines),
/// LINES (lines printed on stdout and stderr, default 2), SLEEP_SECS (the other ranks then
/// sleep this long, default 0, as a stuck rank would), IGNORE_TERM (set: ignore SIGTERM).
/// READY_DIR (a folder: non-failing ranks create `ready-<attempt>-<rank>` in it once set up;
/// the failing rank waits for those of its attempt), FAIL_ATTEMPTS (the failing rank fails
/// only while `TORCHELASTIC_RESTART_COUNT` is below it). Every child first prints
/// `pid <pid> rank <rank>`, its CPUs, and `rank <rank> attempt <restart count> port <port>`.
#[derive(Args, Debug, Clone)]
pub struct TestChildArgs {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<OsString>,
}

/// The hidden `launcher-test-child` subcommand (see [`TestChildArgs`]).
pub fn run_test_child(_args: &TestChildArgs) -> u8 {
    let var = |k: &str| std::env::var(k).ok();
    let rank: usize = var("RANK").and_then(|v| v.parse().ok()).unwrap_or(0);
    let fail_rank: Option<usize> = var("DTRAIN_TEST_FAIL_RANK").and_then(|v| v.parse().ok());
    let exit_code: u8 = var("DTRAIN_TEST_EXIT_CODE")
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let lines: usize = var("DTRAIN_TEST_LINES")
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let sleep: u64 = var("DTRAIN_TEST_SLEEP_SECS")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let world = var("WORLD_SIZE").unwrap_or_default();
    let attempt: u32 = var(RESTART_COUNT_ENV)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // FAIL_ATTEMPTS=k: the failing rank fails only in the first k attempts.
    let fail_rank = fail_rank.filter(|_| {
        var("DTRAIN_TEST_FAIL_ATTEMPTS")
            .and_then(|v| v.parse::<u32>().ok())
            .is_none_or(|k| attempt < k)
    });
    if var("DTRAIN_TEST_IGNORE_TERM").is_some() {
        // SAFETY: SIG_IGN installs no handler code; nothing else in this process handles SIGTERM.
        let _ = unsafe { signal::signal(Signal::SIGTERM, SigHandler::SigIgn) };
    }
    println!("pid {} rank {rank}", std::process::id());
    println!("rank {rank} cpus {}", cpu_list(&allowed_cpus()));
    println!(
        "rank {rank} attempt {attempt} port {}",
        var("MASTER_PORT").unwrap_or_default()
    );
    // READY_DIR: the other ranks announce they are set up; the failing rank waits for them
    // (bounded), so "stop the others" is tested on ranks that really are running.
    let ready_dir = var("DTRAIN_TEST_READY_DIR").map(std::path::PathBuf::from);
    if let Some(dir) = &ready_dir {
        let tag = format!("ready-{attempt}-");
        if fail_rank != Some(rank) {
            let _ = std::fs::write(dir.join(format!("{tag}{rank}")), b"");
        } else {
            let others = world.parse::<usize>().unwrap_or(1).saturating_sub(1);
            let ready = || {
                std::fs::read_dir(dir).map_or(0, |d| {
                    d.flatten()
                        .filter(|e| e.file_name().to_string_lossy().starts_with(&tag))
                        .count()
                })
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while ready() < others && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    for i in 0..lines {
        println!("hello {i} from rank {rank} of {world}");
        eprintln!("note {i} from rank {rank}");
    }
    let _ = std::io::stdout().flush();
    if fail_rank == Some(rank) {
        eprintln!("rank {rank} failing on purpose");
        return exit_code;
    }
    std::thread::sleep(Duration::from_secs(sleep));
    println!("rank {rank} done");
    0
}
