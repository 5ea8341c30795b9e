//! The TCP full mesh: one connection per pair of ranks, and [`PointToPoint`] over it.
//!
//! Every wait is a `poll` with a deadline. While blocked on one peer, the sockets of all other
//! peers are watched for hang-ups (`POLLRDHUP`), so a rank killed with -9 is reported by name
//! by every rank as soon as its kernel closes its sockets — not only by its ring neighbours.
//! A rank that drops its communicator sends a goodbye frame first, which tells a clean exit
//! apart from a crash.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use super::connection::{Incoming, Link, Outgoing, RecvFailure};
use super::framing::{encode_abort, FrameHeader, FrameKind, HEADER_LEN, MAX_CONTROL_LEN};
use crate::algorithms::{Pipeline, PointToPoint, SendRecv};
use crate::{Error, PeerAt, Result, Timeouts};

/// How long a wait keeps retrying nonblocking I/O before sleeping in `poll`: a loopback round
/// trip is ~10 µs, a sleep/wake-up several times that. Retries yield the CPU in between, so a
/// thread or rank runnable on this core (more ranks than cores, unpinned ranks, a DDP compute
/// thread) runs first instead of waiting out the spin.
const SPIN: Duration = Duration::from_micros(50);

/// At most this long a rank whose link to a peer broke looks for a deeper cause first (a
/// third rank's death, see [`TcpMesh::explain`]): closes of different connections can arrive
/// tens of milliseconds apart on a loaded host.
const LOSS_GRACE: Duration = Duration::from_millis(500);

pub struct TcpMesh {
    rank: usize,
    world_size: usize,
    /// `links[p]` is the connection to rank `p` (`None` for this rank).
    links: Vec<Option<Link>>,
    /// `addrs[p]`: rank `p`'s data address from the rendezvous, named in errors about it.
    addrs: Vec<SocketAddr>,
    timeouts: Timeouts,
    op: &'static str,
    /// Set by the first failure; the mesh refuses further work after it.
    failed: Option<(usize, String)>,
    /// A peer not involved in the current wait whose connection closed without a goodbye
    /// (killed, crashed, or exited without dropping its communicator). Not an error by
    /// itself — the rank may simply be done — but it is the culprit named if this rank's
    /// collective then fails, and any later use of its link fails.
    vanished: Option<usize>,
    /// The peer whose incoming frame is partly read (its stream is not at a frame boundary).
    recv_busy: Option<usize>,
    /// The peer whose connection broke (EOF, reset) in the failing operation: its error may
    /// be a knock-on effect of another rank's death (see [`TcpMesh::explain`]).
    lost_link: Option<usize>,
}

impl TcpMesh {
    /// `addrs[p]` is rank `p`'s data address (as published at rendezvous); `splice`: large
    /// sends may be zero-copy (see [`super::splice`]).
    pub fn new(
        rank: usize,
        streams: Vec<Option<TcpStream>>,
        addrs: Vec<SocketAddr>,
        timeouts: Timeouts,
        splice: bool,
    ) -> TcpMesh {
        let world_size = streams.len();
        let links = streams
            .into_iter()
            .enumerate()
            .map(|(peer, s)| s.map(|s| Link::new(peer, s, splice)))
            .collect();
        TcpMesh {
            rank,
            world_size,
            links,
            addrs,
            timeouts,
            op: "setup",
            failed: None,
            vanished: None,
            recv_busy: None,
            lost_link: None,
        }
    }

    fn link(&mut self, peer: usize) -> Result<&mut Link> {
        let (rank, world_size, op) = (self.rank, self.world_size, self.op);
        match self.links.get_mut(peer) {
            Some(Some(link)) => Ok(link),
            _ => Err(Error::InvalidArgument(format!(
                "{op}: rank {rank} has no link to rank {peer} (world size {world_size})"
            ))),
        }
    }

    /// Where rank `peer` is, for errors naming it.
    fn peer_at(&self, peer: usize) -> PeerAt {
        match self.addrs.get(peer) {
            Some(addr) if peer != self.rank => PeerAt::Tcp(*addr),
            _ => PeerAt::Unknown,
        }
    }

    fn check_usable(&self, peers: &[usize]) -> Result<()> {
        if let Some((rank, reason)) = &self.failed {
            return Err(Error::PeerDied {
                rank: *rank,
                at: PeerAt::Unknown,
                what: self.op.to_string(),
                detail: format!("communicator is unusable after an earlier failure: {reason}"),
            });
        }
        for &peer in peers {
            if let Some(Some(link)) = self.links.get(peer) {
                if let Some(reason) = &link.closed {
                    return Err(Error::PeerDied {
                        rank: peer,
                        at: PeerAt::Unknown,
                        what: self.op.to_string(),
                        detail: reason.clone(),
                    });
                }
            }
        }
        Ok(())
    }

    fn io_error(&self, peer: usize, e: io::Error) -> Error {
        let detail = match e.kind() {
            io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => {
                format!("connection reset ({e}): the process exited or was killed")
            }
            io::ErrorKind::TimedOut => {
                format!("TCP keepalive/user timeout ({e}): the host stopped answering")
            }
            _ => format!("socket error: {e}"),
        };
        Error::PeerDied {
            rank: peer,
            at: PeerAt::Unknown,
            what: self.op.to_string(),
            detail,
        }
    }

    fn recv_error(&self, peer: usize, failure: RecvFailure) -> Error {
        let what = self.op.to_string();
        match failure {
            RecvFailure::Io(e) => self.io_error(peer, e),
            RecvFailure::Eof { mid_frame } => Error::PeerDied {
                rank: peer,
                at: PeerAt::Unknown,
                what,
                detail: if mid_frame {
                    "connection closed in the middle of a message: the process exited or was killed"
                        .to_string()
                } else {
                    "connection closed: the process exited or was killed".to_string()
                },
            },
            RecvFailure::Protocol(detail) => Error::Protocol { rank: peer, detail },
            RecvFailure::Goodbye => Error::PeerDied {
                rank: peer,
                at: PeerAt::Unknown,
                what,
                detail: "it closed its communicator while this rank still expected data from it \
                         (ranks ran different numbers of collectives?)"
                    .to_string(),
            },
            RecvFailure::Abort(blamed, reason) => {
                // An abort blaming this rank means the sender waited on us; the sender is the
                // rank we were waiting on, so it is the one to name.
                let rank = blamed.filter(|&b| b != self.rank).unwrap_or(peer);
                Error::PeerDied {
                    rank,
                    at: PeerAt::Unknown,
                    what,
                    detail: format!("reported by rank {peer}, which aborted: {reason}"),
                }
            }
        }
    }

    /// Records the first failure and tells every peer (abort frame, then shutdown) so they
    /// fail fast and name the same culprit instead of waiting for their own deadlines.
    fn fail(&mut self, err: Error) -> Error {
        if self.failed.is_some() {
            return err;
        }
        let err = self.explain(err).located(|r| self.peer_at(r));
        let blamed = match &err {
            Error::Timeout { rank, .. }
            | Error::PeerDied { rank, .. }
            | Error::Protocol { rank, .. } => *rank,
            _ => self.rank,
        };
        let reason = err.to_string();
        self.failed = Some((blamed, reason.clone()));
        let payload = encode_abort(blamed, &format!("rank {}: {reason}", self.rank));
        for link in self.links.iter_mut().flatten() {
            if !link.send_mid_frame && link.closed.is_none() {
                let mut frame = link
                    .next_send_header(FrameKind::Abort, payload.len())
                    .to_vec();
                frame.extend_from_slice(&payload);
                // Best effort: a full socket just means the peer learns from the shutdown.
                let _ = link.stream.write(&frame);
            }
            let _ = link.stream.shutdown(Shutdown::Both);
        }
        err
    }

    /// Before reporting a failure, look at every other link: an abort frame waiting there
    /// names the rank its sender blames, and a closed connection marks a vanished peer.
    /// Knock-on failures (a neighbour that gave up, a stall) are then attributed to that rank
    /// instead of to the messenger.
    ///
    /// A broken link with no such explanation yet gets a short grace: the peer may be a
    /// survivor that gave up because a third rank died and could not send its abort frame
    /// (it was in the middle of a frame to us, or its socket was full), and the dead rank's
    /// own close can reach us after the survivor's (the kernel does not order closes across
    /// connections). A peer that really died costs this rank the grace before it reports.
    fn explain(&mut self, err: Error) -> Error {
        let lost = self.lost_link.take().filter(
            |&p| matches!(&err, Error::PeerDied { rank, .. } | Error::Timeout { rank, .. } if *rank == p),
        );
        let (mut reported, mut quiet) = self.scan_for_cause(lost);
        if let Some(lost) = lost {
            let deadline = Instant::now() + self.loss_grace();
            while reported.is_none() && self.vanished.is_none() && !quiet.is_empty() {
                let left = super::remaining(deadline);
                if left.is_zero() {
                    break;
                }
                self.wait_for_news(&quiet, left.min(Duration::from_millis(20)));
                (reported, quiet) = self.scan_for_cause(Some(lost));
            }
        }
        if let Some((blamed, messenger, why)) = reported {
            if let Error::PeerDied { rank, .. } | Error::Timeout { rank, .. } = &err {
                if *rank != blamed {
                    return Error::PeerDied {
                        rank: blamed,
                        at: self.peer_at(blamed),
                        what: self.op.to_string(),
                        detail: format!(
                            "reported by rank {messenger}, which aborted: {why}; here: {err}"
                        ),
                    };
                }
            }
            return err;
        }
        self.blame_vanished(err)
    }

    /// How long a broken link waits for its real cause (see [`TcpMesh::explain`]).
    fn loss_grace(&self) -> Duration {
        (self.timeouts.collective / 4).min(LOSS_GRACE)
    }

    /// Peeks every link but `skip` (and the one mid-read) without blocking. Returns the first
    /// abort frame blaming another rank (blamed, sender, reason), and the peers whose links
    /// are open and empty (where news would show up as readable or hung up). A closed link
    /// marks its peer vanished.
    fn scan_for_cause(
        &mut self,
        skip: Option<usize>,
    ) -> (Option<(usize, usize, String)>, Vec<usize>) {
        let mut reported: Option<(usize, usize, String)> = None;
        let mut quiet = Vec::new();
        for link in self.links.iter_mut().flatten() {
            if Some(link.peer) == self.recv_busy || Some(link.peer) == skip || link.closed.is_some()
            {
                continue;
            }
            let mut peeked = vec![0u8; HEADER_LEN + MAX_CONTROL_LEN as usize];
            match link.stream.peek(&mut peeked) {
                Ok(0) => {
                    self.vanished.get_or_insert(link.peer);
                }
                Ok(n) if n >= HEADER_LEN => {
                    if let Ok(h) =
                        FrameHeader::decode(peeked[..HEADER_LEN].try_into().expect("header length"))
                    {
                        if h.kind == FrameKind::Abort && n >= HEADER_LEN + h.len as usize {
                            let payload = &peeked[HEADER_LEN..HEADER_LEN + h.len as usize];
                            let (blamed, why) = super::framing::decode_abort(payload);
                            if let Some(b) = blamed.filter(|&b| b != self.rank) {
                                reported.get_or_insert((b, link.peer, why));
                            }
                        }
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => quiet.push(link.peer),
                Err(_) => {
                    self.vanished.get_or_insert(link.peer);
                }
            }
        }
        (reported, quiet)
    }

    /// Sleeps until one of `peers`' links is readable or hung up, or `limit` passes.
    fn wait_for_news(&self, peers: &[usize], limit: Duration) {
        use nix::libc;
        let mut fds: Vec<libc::pollfd> = peers
            .iter()
            .filter_map(|&p| self.links.get(p)?.as_ref())
            .map(|link| libc::pollfd {
                fd: link.stream.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            })
            .collect();
        let timeout_ms = limit.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
        // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfd structs
        // whose descriptors belong to sockets in `self.links`, open for the whole call.
        let _ = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    }

    /// If a peer vanished earlier and the current failure is a knock-on effect (a neighbour
    /// that gave up or a stall), name the vanished peer as the cause.
    fn blame_vanished(&self, err: Error) -> Error {
        let Some(dead) = self.vanished else {
            return err;
        };
        match &err {
            Error::PeerDied { rank, .. } | Error::Timeout { rank, .. } if *rank != dead => {
                Error::PeerDied {
                    rank: dead,
                    at: PeerAt::Unknown,
                    what: self.op.to_string(),
                    detail: format!(
                        "its connection closed without a goodbye (the process exited or was killed); then: {err}"
                    ),
                }
            }
            _ => err,
        }
    }

    /// A peer went silent. It may itself be stuck waiting on another rank (a stall travels
    /// along the ring), so tell everyone, then listen briefly on the silent peer's socket:
    /// if it aborts blaming a third rank, name that rank instead.
    fn blame_after_timeout(&mut self, silent: usize, waited: Duration, can_read: bool) -> Error {
        let what = self.op.to_string();
        let timeout = Error::Timeout {
            rank: silent,
            at: self.peer_at(silent),
            what: what.clone(),
            waited,
        };
        let reason = timeout.to_string();
        self.failed = Some((silent, reason.clone()));
        self.send_aborts(silent, &reason, Shutdown::Write);
        let grace = (self.timeouts.collective / 2).min(Duration::from_secs(2));
        let deadline = Instant::now() + grace;
        let mut verdict = None;
        while can_read && Instant::now() < deadline {
            let Some(Some(link)) = self.links.get_mut(silent) else {
                break;
            };
            let mut peeked = vec![0u8; HEADER_LEN + MAX_CONTROL_LEN as usize];
            match link.stream.peek(&mut peeked) {
                Ok(0) => break,
                Ok(n) if n >= HEADER_LEN => {
                    match FrameHeader::decode(
                        peeked[..HEADER_LEN].try_into().expect("header length"),
                    ) {
                        Ok(h) if h.kind == FrameKind::Abort && n >= HEADER_LEN + h.len as usize => {
                            let payload = &peeked[HEADER_LEN..HEADER_LEN + h.len as usize];
                            let (blamed, why) = super::framing::decode_abort(payload);
                            if let Some(b) = blamed.filter(|&b| b != silent && b != self.rank) {
                                verdict = Some(if why.contains("timed out") {
                                    // The same stall, seen first further upstream.
                                    Error::Timeout {
                                        rank: b,
                                        at: PeerAt::Unknown,
                                        what: format!(
                                            "{what} (rank {silent} was stalled waiting for it)"
                                        ),
                                        waited,
                                    }
                                } else {
                                    Error::PeerDied {
                                        rank: b,
                                        at: PeerAt::Unknown,
                                        what: what.clone(),
                                        detail: format!(
                                            "rank {silent} stalled because of it: {why}"
                                        ),
                                    }
                                });
                            }
                            break;
                        }
                        Ok(h) if h.kind == FrameKind::Abort => {}
                        _ => break,
                    }
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            let fd = PollFd::new(link.stream.as_fd(), PollFlags::POLLIN);
            let _ = poll(&mut [fd], PollTimeout::from(50u16));
        }
        for link in self.links.iter_mut().flatten() {
            let _ = link.stream.shutdown(Shutdown::Both);
        }
        self.blame_vanished(verdict.unwrap_or(timeout))
    }

    fn send_aborts(&mut self, blamed: usize, reason: &str, how: Shutdown) {
        let payload = encode_abort(blamed, &format!("rank {}: {reason}", self.rank));
        for link in self.links.iter_mut().flatten() {
            if !link.send_mid_frame && link.closed.is_none() {
                let mut frame = link
                    .next_send_header(FrameKind::Abort, payload.len())
                    .to_vec();
                frame.extend_from_slice(&payload);
                // Best effort: a full socket just means the peer learns from the shutdown.
                let _ = link.stream.write(&frame);
            }
            let _ = link.stream.shutdown(how);
        }
    }

    /// Runs `plan` to completion: one frame out to `to` and one frame in from `from` in
    /// flight at a time, alternating between them without blocking so both directions stay
    /// busy, waiting in `poll` only when neither can move.
    ///
    /// Spliced frames are read from the caller's pages, which it may not change until the
    /// receiver has read them: the receiver of a spliced frame (the header says so) answers
    /// with an empty acknowledgement frame once all its receives are done, and the sender
    /// waits for it.
    fn drive(&mut self, to: usize, from: usize, plan: &mut dyn Pipeline) -> Result<()> {
        let (mut sent_spliced, mut received_spliced) = (false, false);
        self.drive_frames(to, from, plan, &mut sent_spliced, &mut received_spliced)?;
        if !sent_spliced && !received_spliced {
            return Ok(());
        }
        let mut ack = SendRecv {
            send: received_spliced.then_some(&[][..]),
            recv: sent_spliced.then_some(&mut [][..]),
        };
        self.drive_frames(from, to, &mut ack, &mut false, &mut false)
    }

    fn drive_frames(
        &mut self,
        to: usize,
        from: usize,
        plan: &mut dyn Pipeline,
        sent_spliced: &mut bool,
        received_spliced: &mut bool,
    ) -> Result<()> {
        let (sends, recvs) = (plan.sends(), plan.recvs());
        // Splice only when this rank also receives: then the send copy would compete with
        // its own receive work. In one-way transfers it runs on the sender's otherwise idle
        // core, and splicing only moves per-page work to the receiver (measured no faster).
        let may_splice = sends > 0 && recvs > 0;
        let (mut next_send, mut next_recv) = (0, 0);
        let mut out: Option<Outgoing> = None;
        let mut inc: Option<Incoming> = None;
        let mut last_progress = Instant::now();
        loop {
            let mut moved = false;
            if out.is_none() && next_send < sends && plan.send_after(next_send) <= next_recv {
                let len = plan.send_buf(next_send).len();
                let o = Outgoing::new(self.link(to)?, len, may_splice);
                *sent_spliced |= o.spliced();
                out = Some(o);
            }
            if let Some(o) = out.as_mut() {
                let link = self.link(to)?;
                let result = o.advance(link, plan.send_buf(next_send));
                link.send_mid_frame = o.started() && !o.done();
                match result {
                    Ok(m) => moved |= m,
                    Err(e) => {
                        self.lost_link = Some(to);
                        return Err(self.io_error(to, e));
                    }
                }
                if o.done() {
                    out = None;
                    next_send += 1;
                }
            }
            if inc.is_none() && next_recv < recvs {
                let len = plan.recv_buf(next_recv).len();
                inc = Some(Incoming::new(self.link(from)?, len));
            }
            if let Some(i) = inc.as_mut() {
                let link = self.link(from)?;
                let result = i.advance(&mut link.stream, plan.recv_buf(next_recv));
                self.recv_busy = (i.started() && !i.done()).then_some(from);
                match result {
                    Ok(m) => moved |= m,
                    Err(f) => {
                        if matches!(f, RecvFailure::Eof { .. } | RecvFailure::Io(_)) {
                            self.lost_link = Some(from);
                        }
                        return Err(self.recv_error(from, f));
                    }
                }
                if i.done() {
                    *received_spliced |= i.spliced();
                    inc = None;
                    plan.received(next_recv);
                    next_recv += 1;
                }
            }
            if next_send == sends && next_recv == recvs {
                return Ok(());
            }
            if moved {
                last_progress = Instant::now();
                continue;
            }
            if last_progress.elapsed() < SPIN {
                std::thread::yield_now();
                continue;
            }
            let send_ready = next_send < sends && plan.send_after(next_send) <= next_recv;
            let out_peer = send_ready.then_some(to);
            let inc_peer = (next_recv < recvs).then_some(from);
            let Some(waiting_on) = inc_peer.or(out_peer) else {
                return Ok(());
            };
            let idle = last_progress.elapsed();
            if idle >= self.timeouts.collective {
                let can_read =
                    inc_peer != Some(waiting_on) || !inc.as_ref().is_some_and(|i| i.started());
                return Err(self.blame_after_timeout(waiting_on, idle, can_read));
            }
            self.wait(out_peer, inc_peer, self.timeouts.collective - idle)?;
        }
    }

    /// Blocks until the active sockets are ready or `limit` passes; checks hang-ups on the
    /// watched sockets.
    fn wait(
        &mut self,
        out_peer: Option<usize>,
        inc_peer: Option<usize>,
        limit: Duration,
    ) -> Result<()> {
        let mut hung_up: Vec<usize> = Vec::new();
        {
            use nix::libc;
            let mut peers = Vec::with_capacity(self.world_size);
            let mut fds: Vec<libc::pollfd> = Vec::with_capacity(self.world_size);
            for link in self.links.iter().flatten() {
                let mut events: libc::c_short = 0;
                if Some(link.peer) == out_peer {
                    events |= libc::POLLOUT;
                }
                if Some(link.peer) == inc_peer {
                    events |= libc::POLLIN;
                } else if link.monitor && link.closed.is_none() {
                    events |= libc::POLLRDHUP;
                }
                if events == 0 {
                    continue;
                }
                peers.push(link.peer);
                fds.push(libc::pollfd {
                    fd: link.stream.as_raw_fd(),
                    events,
                    revents: 0,
                });
            }
            let timeout_ms = limit.as_millis().clamp(1, i32::MAX as u128) as libc::c_int;
            // nix's `PollFd::revents` drops flags it does not name (POLLRDHUP), so call poll(2)
            // directly.
            // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()` pollfd structs
            // whose descriptors belong to sockets in `self.links`, open for the whole call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
            if rc < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(Error::io(
                        format!("poll while waiting during {}", self.op),
                        e,
                    ));
                }
            }
            let hangup = libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
            for (fd, &peer) in fds.iter().zip(&peers) {
                let active_reader = Some(peer) == inc_peer;
                if !active_reader && fd.revents & hangup != 0 {
                    hung_up.push(peer);
                }
            }
        }
        let waiting_on = inc_peer.or(out_peer);
        for peer in hung_up {
            self.check_hang_up(peer, Some(peer) == out_peer, waiting_on)?;
        }
        Ok(())
    }

    /// A socket we are not reading from reported a hang-up: find out whether the peer left
    /// cleanly (goodbye), aborted, died, or merely has unread data queued before its close.
    fn check_hang_up(
        &mut self,
        peer: usize,
        must_send: bool,
        waiting_on: Option<usize>,
    ) -> Result<()> {
        let what = self.op.to_string();
        let link = self.link(peer)?;
        let mut peeked = vec![0u8; HEADER_LEN + MAX_CONTROL_LEN as usize];
        let n = match link.stream.peek(&mut peeked) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                link.monitor = false;
                return Ok(());
            }
            Err(e) if must_send => {
                self.lost_link = Some(peer);
                return Err(self.io_error(peer, e));
            }
            Err(_) => 0,
        };
        if n == 0 {
            let detail = "connection closed without a goodbye: the process exited or was killed";
            if must_send {
                self.lost_link = Some(peer);
                return Err(Error::PeerDied {
                    rank: peer,
                    at: PeerAt::Unknown,
                    what,
                    detail: detail.to_string(),
                });
            }
            link.closed = Some(detail.to_string());
            link.monitor = false;
            self.vanished.get_or_insert(peer);
            return Ok(());
        }
        let header = if n >= HEADER_LEN {
            FrameHeader::decode(peeked[..HEADER_LEN].try_into().expect("header length"))
        } else {
            Err(String::new())
        };
        match header {
            Ok(h) if h.kind == FrameKind::Goodbye => {
                let mut discard = [0u8; HEADER_LEN];
                let _ = link.stream.read_exact(&mut discard);
                let reason = "it closed its communicator (finished or exited)".to_string();
                link.closed = Some(reason.clone());
                link.monitor = false;
                if must_send {
                    return Err(Error::PeerDied {
                        rank: peer,
                        at: PeerAt::Unknown,
                        what,
                        detail: format!("{reason} while this rank still had data for it"),
                    });
                }
                Ok(())
            }
            Ok(h) if h.kind == FrameKind::Abort && n >= HEADER_LEN + h.len as usize => {
                let payload = peeked[HEADER_LEN..HEADER_LEN + h.len as usize].to_vec();
                let (blamed, reason) = super::framing::decode_abort(&payload);
                if blamed == Some(self.rank) {
                    // The sender gave up on us while we were still waiting on someone else:
                    // the stall is upstream of us.
                    if let Some(w) = waiting_on.filter(|&w| w != peer) {
                        return Err(Error::Timeout {
                            rank: w,
                            at: PeerAt::Unknown,
                            what: format!(
                                "{what} (rank {peer} gave up waiting for this rank, which was itself still waiting for rank {w})"
                            ),
                            waited: self.timeouts.collective,
                        });
                    }
                }
                Err(self.recv_error(peer, RecvFailure::Abort(blamed, reason)))
            }
            Ok(h) if h.kind == FrameKind::Abort => Ok(()), // rest of the abort is on its way
            _ => {
                // Data queued ahead of the close: it is read (and the close seen) in order.
                link.monitor = false;
                Ok(())
            }
        }
    }
}

impl PointToPoint for TcpMesh {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world_size
    }
    fn set_op(&mut self, what: &'static str) {
        self.op = what;
    }
    fn pipeline(&mut self, to: usize, from: usize, plan: &mut dyn Pipeline) -> Result<()> {
        let mut peers = Vec::with_capacity(2);
        if plan.sends() > 0 {
            peers.push(to);
        }
        if plan.recvs() > 0 {
            peers.push(from);
        }
        self.check_usable(&peers)
            .map_err(|e| e.located(|r| self.peer_at(r)))?;
        let result = self.drive(to, from, plan);
        result.map_err(|e| self.fail(e).located(|r| self.peer_at(r)))
    }
}

impl Drop for TcpMesh {
    fn drop(&mut self) {
        if self.failed.is_some() {
            return;
        }
        for link in self.links.iter_mut().flatten() {
            if !link.send_mid_frame && link.closed.is_none() {
                let goodbye = link.next_send_header(FrameKind::Goodbye, 0);
                let _ = link.stream.write(&goodbye);
            }
            let _ = link.stream.shutdown(Shutdown::Write);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A connected pair of nonblocking loopback sockets, as the mesh uses them.
    fn socket_pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let a = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (b, _) = listener.accept().expect("accept");
        for s in [&a, &b] {
            s.set_nonblocking(true).expect("nonblocking");
        }
        (a, b)
    }

    /// Rank 2 of three dies, but its connection to rank 1 is seen closed only after rank 0 —
    /// which was in the middle of a large frame to rank 1, so it could send no abort frame —
    /// gave up and closed its link to rank 1 (under load the kernel can deliver the two
    /// closes in that order). Rank 1 must still name rank 2, not the messenger rank 0.
    #[test]
    fn a_survivor_that_closes_mid_frame_is_not_blamed_for_the_dead_rank() {
        let timeouts = Timeouts {
            connect: Duration::from_secs(10),
            collective: Duration::from_secs(10),
            liveness: Duration::from_secs(5),
        };
        let (r0_to_1, r1_to_0) = socket_pair();
        let (r0_to_2, r2_to_0) = socket_pair();
        let (r1_to_2, r2_to_1) = socket_pair();
        let addrs: Vec<SocketAddr> = ["10.0.0.1:7000", "10.0.0.2:7000", "10.0.0.3:7000"]
            .iter()
            .map(|a| a.parse().expect("address"))
            .collect();
        let mut rank0 = TcpMesh::new(
            0,
            vec![None, Some(r0_to_1), Some(r0_to_2)],
            addrs.clone(),
            timeouts,
            false,
        );
        let mut rank1 = TcpMesh::new(
            1,
            vec![Some(r1_to_0), None, Some(r1_to_2)],
            addrs,
            timeouts,
            false,
        );
        // Far more than both socket buffers: rank 0 is stuck mid-frame while rank 1 is idle.
        let big = vec![7u8; 64 << 20];
        let rank0 = std::thread::spawn(move || {
            let mut from_dead = vec![0u8; 16];
            let mut plan = SendRecv {
                send: Some(&big),
                recv: Some(&mut from_dead),
            };
            rank0.pipeline(1, 2, &mut plan).expect_err("rank 2 is dead")
        });
        std::thread::sleep(Duration::from_millis(200));
        drop(r2_to_0); // rank 2 "dies": rank 0 sees it first
        let error0 = rank0.join().expect("rank 0 thread");
        assert!(
            error0.to_string().contains("rank 2 at 10.0.0.3:7000"),
            "{error0}"
        );
        let rank1 = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 20];
            let mut plan = SendRecv {
                send: None,
                recv: Some(&mut buf),
            };
            rank1.pipeline(0, 0, &mut plan).expect_err("rank 0 gave up")
        });
        // Rank 1 reads what rank 0 got out, then the close; rank 2's close arrives later.
        std::thread::sleep(Duration::from_millis(100));
        drop(r2_to_1);
        let error1 = rank1.join().expect("rank 1 thread");
        let text = error1.to_string();
        assert!(
            matches!(error1, Error::PeerDied { rank: 2, .. }),
            "rank 1 should name rank 2: {text}"
        );
        assert!(text.contains("rank 2 at 10.0.0.3:7000"), "{text}");
    }
}
