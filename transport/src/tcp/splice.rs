//! Zero-copy sends: a payload's pages are `vmsplice`d into a pipe and `splice`d from there
//! into the socket, so the kernel queues references to the caller's pages instead of copying
//! them into socket buffers (on loopback this removes one of the two copies per byte; the
//! receiver copies straight out of the sender's pages).
//!
//! The pages are read when the receiver reads, not when the send returns. Memory stays valid
//! (the kernel holds page references), but the *bytes* must not change until the peer has
//! read them: spliced frames say so in their header, and the mesh ends every operation that
//! sent one by waiting for an acknowledgement from the receiver (see `TcpMesh::drive`).
//!
//! `splice` into a closed socket raises SIGPIPE; Rust programs ignore SIGPIPE by default, so
//! this surfaces as an `EPIPE` error naming the peer.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::libc;

/// Frames of at least this many payload bytes are spliced (and acknowledged); for smaller
/// ones a copy is cheaper than the acknowledgement round trip.
pub const SPLICE_MIN_BYTES: usize = 128 << 10;
/// Pipe capacity asked for (the default is 64 KiB; unprivileged processes may go to
/// /proc/sys/fs/pipe-max-size, 1 MiB by default).
const PIPE_BYTES: usize = 1 << 20;

pub struct SplicePipe {
    read: OwnedFd,
    write: OwnedFd,
    capacity: usize,
}

impl SplicePipe {
    pub fn new() -> io::Result<SplicePipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        // SAFETY: fcntl on a descriptor we own; a failure only leaves the default size.
        let got = unsafe {
            libc::fcntl(
                write.as_raw_fd(),
                libc::F_SETPIPE_SZ,
                PIPE_BYTES as libc::c_int,
            )
        };
        let capacity = if got > 0 { got as usize } else { 64 << 10 };
        Ok(SplicePipe {
            read,
            write,
            capacity,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Puts references to the pages of `data` into the (empty) pipe; returns how many bytes
    /// went in.
    pub fn map_in(&self, data: &[u8]) -> io::Result<usize> {
        let iov = libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len().min(self.capacity),
        };
        // SAFETY: `iov` describes memory inside `data`, alive for the call; vmsplice without
        // SPLICE_F_GIFT only takes references to those pages and never writes them.
        let n = unsafe { libc::vmsplice(self.write.as_raw_fd(), &iov, 1, libc::SPLICE_F_NONBLOCK) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Moves up to `len` bytes from the pipe into `socket`; `more` tells TCP that the frame
    /// continues (so it does not push a short segment).
    pub fn drain_into(&self, socket: RawFd, len: usize, more: bool) -> io::Result<usize> {
        let mut flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
        if more {
            flags |= libc::SPLICE_F_MORE;
        }
        // SAFETY: both descriptors are open for the call; null offsets are required for
        // pipes and sockets.
        let n = unsafe {
            libc::splice(
                self.read.as_raw_fd(),
                std::ptr::null_mut(),
                socket,
                std::ptr::null_mut(),
                len,
                flags,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// `send(2)` with `MSG_MORE`: `buf` (a frame header) waits for the payload that follows
/// instead of leaving in a segment of its own.
pub fn send_more(socket: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the duration of the call.
    let n = unsafe {
        libc::send(
            socket,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            libc::MSG_MORE | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
