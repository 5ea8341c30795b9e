//! Is a peer process still alive? Identity = pid + start time, so a recycled pid is not
//! mistaken for the original process, and a zombie (killed but not yet reaped by its parent,
//! which `kill(pid, 0)` still reports as present) counts as dead.

use nix::errno::Errno;
use nix::sys::signal::kill;
use nix::unistd::Pid;

/// Start time of a process in clock ticks since boot (field 22 of `/proc/<pid>/stat`), and
/// its state letter (field 3).
fn read_stat(pid: &str) -> std::io::Result<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces or ')': parse
    // from the last ')'.
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable stat");
    let rest = &text[text.rfind(')').ok_or_else(bad)? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields
        .next()
        .and_then(|s| s.chars().next())
        .ok_or_else(bad)?;
    // After the state (field 3) come fields 4..; starttime is field 22, i.e. 19 further on.
    let start = fields.nth(18).ok_or_else(bad)?.parse().map_err(|_| bad())?;
    Ok((state, start))
}

/// Start time of the calling process (0 if /proc is unavailable: liveness then relies on
/// `kill(pid, 0)` alone).
pub fn own_start_time() -> u64 {
    read_stat("self").map(|(_, t)| t).unwrap_or(0)
}

/// `None` if the process recorded as (`pid`, `start_time`) is alive, else why it is not.
pub fn dead_reason(pid: u32, start_time: u64) -> Option<String> {
    match read_stat(&pid.to_string()) {
        Ok((state, start)) => {
            if start_time != 0 && start != start_time {
                Some(format!(
                    "pid {pid} now belongs to another process (it exited)"
                ))
            } else if state == 'Z' || state == 'X' {
                Some(format!("process {pid} exited or was killed (zombie)"))
            } else {
                None
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            Some(format!("process {pid} no longer exists"))
        }
        // /proc unreadable (hidepid, not mounted): fall back to signal 0.
        Err(_) => match kill(Pid::from_raw(pid as i32), None) {
            Err(Errno::ESRCH) => Some(format!("process {pid} no longer exists")),
            _ => None,
        },
    }
}

/// CLOCK_MONOTONIC in nanoseconds: one clock for every process on the host, so heartbeats
/// written by one rank can be aged by another.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}
