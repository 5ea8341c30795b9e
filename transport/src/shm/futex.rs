//! Cross-process futex wait/wake on a `u32` inside the shared mapping.
//!
//! The words live in a `MAP_SHARED` mapping of a tmpfs file, so the operations must NOT use
//! `FUTEX_PRIVATE_FLAG`: the kernel then keys the wait queue by (inode, offset) and a wake in
//! one process reaches a sleeper in another. (The `atomic-wait` crate always sets the private
//! flag, which keys by (mm, address) and can never wake another process.)

use std::sync::atomic::AtomicU32;
use std::time::Duration;

use nix::libc;

/// Sleeps while `*word == expected`, at most `timeout`. Returns early on a wake, on a value
/// change (EAGAIN), on a signal or on timeout; the caller re-checks its condition in every case.
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs().min(i64::MAX as u64) as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call (it lives in a
    // mapping the caller keeps alive); FUTEX_WAIT only reads it. The timespec outlives the call.
    // Errors (EAGAIN, EINTR, ETIMEDOUT) are all "go re-check", so the result is ignored.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            &ts as *const libc::timespec,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes every process sleeping on `word`.
pub fn futex_wake_all(word: &AtomicU32) {
    // SAFETY: `word` is a valid, aligned u32 in a live mapping; FUTEX_WAKE does not access
    // user memory beyond using the address as a key.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            i32::MAX,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}
