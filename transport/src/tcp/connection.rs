//! One TCP link to one peer, and the resumable frame writer/reader that drive it.
//!
//! Sockets are nonblocking: [`Outgoing::advance`] / [`Incoming::advance`] move as many bytes
//! as the kernel accepts and return, so one thread can keep a send and a receive (on
//! different or the same socket) in flight at once; the mesh waits in `poll` between calls.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;

use std::os::fd::AsRawFd;

use super::framing::{decode_abort, FrameHeader, FrameKind, HEADER_LEN};
use super::splice::{send_more, SplicePipe, SPLICE_MIN_BYTES};

pub struct Link {
    pub peer: usize,
    pub stream: TcpStream,
    send_seq: u64,
    recv_seq: u64,
    /// A frame was only partly written when an operation failed: appending another frame
    /// would corrupt the stream, so no abort frame is sent on this link.
    pub send_mid_frame: bool,
    /// Watch this socket for the peer hanging up while waiting on other peers.
    pub monitor: bool,
    /// The peer said goodbye (dropped its communicator); holds the reason.
    pub closed: Option<String>,
    /// For zero-copy sends of large frames; created on first use.
    pipe: Option<SplicePipe>,
    /// Splicing is off, or failed once (e.g. not supported here): copy.
    splice_unavailable: bool,
}

impl Link {
    /// `splice`: send large frames zero-copy (see [`super::splice`]).
    pub fn new(peer: usize, stream: TcpStream, splice: bool) -> Link {
        Link {
            peer,
            stream,
            send_seq: 0,
            recv_seq: 0,
            send_mid_frame: false,
            monitor: true,
            closed: None,
            pipe: None,
            splice_unavailable: !splice,
        }
    }

    /// The pipe for zero-copy sends, if splicing works here.
    fn splice_pipe(&mut self) -> Option<&SplicePipe> {
        if self.pipe.is_none() && !self.splice_unavailable {
            match SplicePipe::new() {
                Ok(p) => self.pipe = Some(p),
                Err(_) => self.splice_unavailable = true,
            }
        }
        self.pipe.as_ref()
    }

    pub fn next_send_header(&mut self, kind: FrameKind, len: usize) -> [u8; HEADER_LEN] {
        let header = FrameHeader {
            kind,
            seq: self.send_seq,
            len: len as u64,
        };
        self.send_seq += 1;
        header.encode()
    }

    pub fn next_recv_seq(&mut self) -> u64 {
        let seq = self.recv_seq;
        self.recv_seq += 1;
        seq
    }
}

/// A frame being written. The payload is passed to each [`Outgoing::advance`] call rather
/// than held, so a pipeline can hand out pieces of one buffer it also receives into.
pub struct Outgoing {
    header: [u8; HEADER_LEN],
    len: usize,
    /// Header and payload bytes handed to the socket.
    sent: usize,
    /// Payload bytes mapped into the link's pipe but not yet spliced into the socket.
    in_pipe: usize,
    /// Sent as [`FrameKind::SplicedData`]: the receiver will acknowledge it.
    spliced: bool,
}

impl Outgoing {
    /// `may_splice`: the caller allows a zero-copy send of a large payload.
    pub fn new(link: &mut Link, len: usize, may_splice: bool) -> Outgoing {
        let spliced = may_splice && len >= SPLICE_MIN_BYTES && link.splice_pipe().is_some();
        let kind = if spliced {
            FrameKind::SplicedData
        } else {
            FrameKind::Data
        };
        Outgoing {
            header: link.next_send_header(kind, len),
            len,
            sent: 0,
            in_pipe: 0,
            spliced,
        }
    }

    /// The payload is (announced as) spliced: wait for the receiver's acknowledgement
    /// before the caller may change it.
    pub fn spliced(&self) -> bool {
        self.spliced
    }

    pub fn done(&self) -> bool {
        self.sent == HEADER_LEN + self.len
    }

    pub fn started(&self) -> bool {
        self.sent > 0
    }

    /// Writes until done or the socket is full. `payload` must be the same bytes on every
    /// call. Returns whether any byte moved. Large payloads are spliced (see
    /// [`super::splice`]); the caller must not change them until the receiver acknowledged.
    pub fn advance(&mut self, link: &mut Link, payload: &[u8]) -> io::Result<bool> {
        debug_assert_eq!(payload.len(), self.len);
        let mut moved = false;
        while !self.done() {
            let splice = self.spliced && link.pipe.is_some();
            let result = if splice && self.sent < HEADER_LEN {
                // MSG_MORE: the header waits for the spliced payload instead of leaving alone.
                send_more(link.stream.as_raw_fd(), &self.header[self.sent..])
            } else if splice {
                self.splice_payload(link, payload)
            } else if self.sent < HEADER_LEN {
                // One syscall for header + payload: no copy into a frame buffer, and small
                // messages leave in one segment.
                link.stream.write_vectored(&[
                    IoSlice::new(&self.header[self.sent..]),
                    IoSlice::new(payload),
                ])
            } else {
                link.stream.write(&payload[self.sent - HEADER_LEN..])
            };
            match result {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "wrote 0 bytes")),
                Ok(k) => {
                    self.sent += k;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }

    /// Maps the next part of the payload into the pipe if it is empty, then splices from
    /// the pipe into the socket. Returns the bytes that reached the socket.
    fn splice_payload(&mut self, link: &mut Link, payload: &[u8]) -> io::Result<usize> {
        let socket = link.stream.as_raw_fd();
        let pipe = link.pipe.as_ref().expect("splice pipe exists");
        if self.in_pipe == 0 {
            let start = self.sent - HEADER_LEN;
            let end = payload.len().min(start + pipe.capacity());
            match pipe.map_in(&payload[start..end]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "vmsplice mapped 0 bytes",
                    ))
                }
                Ok(k) => self.in_pipe = k,
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    return Err(e)
                }
                Err(_) => {
                    // Not supported here (the pipe is empty, so nothing is lost): copy.
                    link.pipe = None;
                    link.splice_unavailable = true;
                    return link.stream.write(&payload[start..]);
                }
            }
        }
        let more = self.sent - HEADER_LEN + self.in_pipe < payload.len();
        let k = pipe.drain_into(socket, self.in_pipe, more)?;
        self.in_pipe -= k;
        Ok(k)
    }
}

/// Why a receive could not complete.
#[derive(Debug)]
pub enum RecvFailure {
    Io(io::Error),
    /// The peer closed the connection; `mid_frame` if a frame was cut short.
    Eof {
        mid_frame: bool,
    },
    Protocol(String),
    /// The peer dropped its communicator cleanly.
    Goodbye,
    /// The peer aborted; the rank it blames and its reason.
    Abort(Option<usize>, String),
}

/// A frame being read straight into the caller's buffer (passed to each
/// [`Incoming::advance`] call).
pub struct Incoming {
    header: [u8; HEADER_LEN],
    header_got: usize,
    len: usize,
    got: usize,
    expected_seq: u64,
    /// Payload of a control frame (abort), and how much of it arrived.
    control: Option<(Vec<u8>, usize)>,
    complete: bool,
    /// The header announced a spliced payload: acknowledge it.
    spliced: bool,
}

impl Incoming {
    pub fn new(link: &mut Link, len: usize) -> Incoming {
        Incoming {
            header: [0; HEADER_LEN],
            header_got: 0,
            len,
            got: 0,
            expected_seq: link.next_recv_seq(),
            control: None,
            complete: false,
            spliced: false,
        }
    }

    /// The sender spliced this frame and waits for an acknowledgement.
    pub fn spliced(&self) -> bool {
        self.spliced
    }

    pub fn done(&self) -> bool {
        self.complete
    }

    /// Whether any byte of the frame was consumed (the stream is no longer at a boundary).
    pub fn started(&self) -> bool {
        self.header_got > 0
    }

    /// Reads until done or nothing is available. `payload` must be the same buffer on every
    /// call. Returns whether any byte moved.
    pub fn advance(
        &mut self,
        stream: &mut TcpStream,
        payload: &mut [u8],
    ) -> Result<bool, RecvFailure> {
        debug_assert_eq!(payload.len(), self.len);
        let mut moved = false;
        while !self.complete {
            let target: &mut [u8] = if self.header_got < HEADER_LEN {
                &mut self.header[self.header_got..]
            } else if let Some((buf, got)) = &mut self.control {
                &mut buf[*got..]
            } else {
                &mut payload[self.got..]
            };
            let n = if target.is_empty() {
                0
            } else {
                match stream.read(target) {
                    Ok(0) => {
                        let mid_frame = self.header_got > 0;
                        return Err(RecvFailure::Eof { mid_frame });
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(moved),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(RecvFailure::Io(e)),
                }
            };
            moved |= n > 0;
            if self.header_got < HEADER_LEN {
                self.header_got += n;
                if self.header_got == HEADER_LEN {
                    self.on_header()?;
                }
            } else if let Some((buf, got)) = &mut self.control {
                *got += n;
                if *got == buf.len() {
                    let (blamed, reason) = decode_abort(buf);
                    return Err(RecvFailure::Abort(blamed, reason));
                }
            } else {
                self.got += n;
            }
            if self.header_got == HEADER_LEN && self.control.is_none() {
                self.complete = self.got == self.len;
            }
        }
        Ok(moved)
    }

    fn on_header(&mut self) -> Result<(), RecvFailure> {
        let header = FrameHeader::decode(&self.header).map_err(RecvFailure::Protocol)?;
        match header.kind {
            FrameKind::Goodbye => Err(RecvFailure::Goodbye),
            FrameKind::Abort => {
                self.control = Some((vec![0; header.len as usize], 0));
                if header.len == 0 {
                    return Err(RecvFailure::Abort(None, String::new()));
                }
                Ok(())
            }
            FrameKind::Data | FrameKind::SplicedData => {
                self.spliced = header.kind == FrameKind::SplicedData;
                if header.seq != self.expected_seq || header.len != self.len as u64 {
                    return Err(RecvFailure::Protocol(format!(
                        "expected message #{} of {} bytes, got message #{} of {} bytes \
                         (ranks called collectives in a different order or with different sizes)",
                        self.expected_seq, self.len, header.seq, header.len
                    )));
                }
                Ok(())
            }
        }
    }
}
