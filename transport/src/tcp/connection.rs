//! One TCP link to one peer, and the resumable frame writer/reader that drive it.
//!
//! Sockets are nonblocking: [`Outgoing::advance`] / [`Incoming::advance`] move as many bytes
//! as the kernel accepts and return, so one thread can keep a send and a receive (on
//! different or the same socket) in flight at once; the mesh waits in `poll` between calls.

use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;

use super::framing::{decode_abort, FrameHeader, FrameKind, HEADER_LEN};

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
}

impl Link {
    pub fn new(peer: usize, stream: TcpStream) -> Link {
        Link {
            peer,
            stream,
            send_seq: 0,
            recv_seq: 0,
            send_mid_frame: false,
            monitor: true,
            closed: None,
        }
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

/// A frame being written.
pub struct Outgoing<'a> {
    header: [u8; HEADER_LEN],
    payload: &'a [u8],
    sent: usize,
}

impl<'a> Outgoing<'a> {
    pub fn new(link: &mut Link, payload: &'a [u8]) -> Outgoing<'a> {
        Outgoing {
            header: link.next_send_header(FrameKind::Data, payload.len()),
            payload,
            sent: 0,
        }
    }

    pub fn done(&self) -> bool {
        self.sent == HEADER_LEN + self.payload.len()
    }

    pub fn started(&self) -> bool {
        self.sent > 0
    }

    /// Writes until done or the socket is full. Returns whether any byte moved.
    pub fn advance(&mut self, stream: &mut TcpStream) -> io::Result<bool> {
        let mut moved = false;
        while !self.done() {
            let result = if self.sent < HEADER_LEN {
                // One syscall for header + payload keeps small messages in one segment.
                stream.write_vectored(&[
                    IoSlice::new(&self.header[self.sent..]),
                    IoSlice::new(self.payload),
                ])
            } else {
                stream.write(&self.payload[self.sent - HEADER_LEN..])
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

/// A frame being read straight into the caller's buffer.
pub struct Incoming<'a> {
    header: [u8; HEADER_LEN],
    header_got: usize,
    payload: &'a mut [u8],
    got: usize,
    expected_seq: u64,
    /// Payload of a control frame (abort), and how much of it arrived.
    control: Option<(Vec<u8>, usize)>,
    complete: bool,
}

impl<'a> Incoming<'a> {
    pub fn new(link: &mut Link, payload: &'a mut [u8]) -> Incoming<'a> {
        Incoming {
            header: [0; HEADER_LEN],
            header_got: 0,
            payload,
            got: 0,
            expected_seq: link.next_recv_seq(),
            control: None,
            complete: false,
        }
    }

    pub fn done(&self) -> bool {
        self.complete
    }

    /// Whether any byte of the frame was consumed (the stream is no longer at a boundary).
    pub fn started(&self) -> bool {
        self.header_got > 0
    }

    /// Reads until done or nothing is available. Returns whether any byte moved.
    pub fn advance(&mut self, stream: &mut TcpStream) -> Result<bool, RecvFailure> {
        let mut moved = false;
        while !self.complete {
            let target: &mut [u8] = if self.header_got < HEADER_LEN {
                &mut self.header[self.header_got..]
            } else if let Some((buf, got)) = &mut self.control {
                &mut buf[*got..]
            } else {
                &mut self.payload[self.got..]
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
                self.complete = self.got == self.payload.len();
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
            FrameKind::Data => {
                if header.seq != self.expected_seq || header.len != self.payload.len() as u64 {
                    return Err(RecvFailure::Protocol(format!(
                        "expected message #{} of {} bytes, got message #{} of {} bytes \
                         (ranks called collectives in a different order or with different sizes)",
                        self.expected_seq,
                        self.payload.len(),
                        header.seq,
                        header.len
                    )));
                }
                Ok(())
            }
        }
    }
}
