//! The point-to-point interface the algorithms are written against, and how every rank cuts
//! buffers into the same blocks and pieces.

use std::ops::Range;

use crate::Result;

/// A sequence of messages to send to one peer and to receive from one (possibly other) peer,
/// where a send may have to wait until some receives are complete — e.g. a ring step forwards
/// the piece it just received and reduced. Lets a transport keep both directions busy at once
/// across the whole collective instead of one piece at a time.
///
/// Sends and receives are numbered from 0 and happen in that order on their link.
pub trait Pipeline {
    fn sends(&self) -> usize;
    fn recvs(&self) -> usize;
    /// How many receives must be complete (and [`Pipeline::received`] called for them)
    /// before send `i` may start. Must not decrease with `i`.
    fn send_after(&self, i: usize) -> usize;
    /// Payload of send `i`; the same bytes every time it is asked for until the send completes.
    fn send_buf(&self, i: usize) -> &[u8];
    /// Where receive `j` lands; its length is the exact length expected.
    fn recv_buf(&mut self, j: usize) -> &mut [u8];
    /// Receive `j` is complete.
    fn received(&mut self, j: usize);
}

/// Moves whole messages between this rank and its peers. Messages on one (peer, direction)
/// pair arrive in the order they were sent; a receive must name the exact length the
/// matching send used (a mismatch is a `Protocol` error naming the peer).
pub trait PointToPoint: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Names the collective in progress; used in error messages.
    fn set_op(&mut self, what: &'static str);
    /// Runs `plan`: its sends go to `to`, its receives come from `from` (`to == from` is
    /// allowed), with sends and receives in flight at the same time so that two ranks
    /// exchanging large buffers never deadlock on full socket buffers.
    fn pipeline(&mut self, to: usize, from: usize, plan: &mut dyn Pipeline) -> Result<()>;

    fn send(&mut self, peer: usize, buf: &[u8]) -> Result<()> {
        self.pipeline(
            peer,
            peer,
            &mut SendRecv {
                send: Some(buf),
                recv: None,
            },
        )
    }
    fn recv(&mut self, peer: usize, buf: &mut [u8]) -> Result<()> {
        self.pipeline(
            peer,
            peer,
            &mut SendRecv {
                send: None,
                recv: Some(buf),
            },
        )
    }
    /// Sends `send` to `to` while receiving `recv` from `from`.
    fn send_recv(&mut self, to: usize, send: &[u8], from: usize, recv: &mut [u8]) -> Result<()> {
        self.pipeline(
            to,
            from,
            &mut SendRecv {
                send: Some(send),
                recv: Some(recv),
            },
        )
    }
}

/// At most one independent send and one receive.
pub struct SendRecv<'a> {
    pub send: Option<&'a [u8]>,
    pub recv: Option<&'a mut [u8]>,
}

impl Pipeline for SendRecv<'_> {
    fn sends(&self) -> usize {
        self.send.is_some() as usize
    }
    fn recvs(&self) -> usize {
        self.recv.is_some() as usize
    }
    fn send_after(&self, _i: usize) -> usize {
        0
    }
    fn send_buf(&self, _i: usize) -> &[u8] {
        self.send.unwrap_or(&[])
    }
    fn recv_buf(&mut self, _j: usize) -> &mut [u8] {
        self.recv.as_deref_mut().unwrap_or(&mut [])
    }
    fn received(&mut self, _j: usize) {}
}

/// Splits `len` bytes of `elem`-byte elements into `parts` contiguous element-aligned ranges
/// whose lengths differ by at most one element.
pub fn split_even(len: usize, elem: usize, parts: usize) -> Vec<Range<usize>> {
    let count = len / elem;
    (0..parts)
        .map(|p| (p * count / parts) * elem..((p + 1) * count / parts) * elem)
        .collect()
}

/// Piece `j` of `pieces` of `range`, element-aligned. Every rank computes the same pieces for
/// the same range, which is what keeps senders and receivers in step.
pub fn piece(range: &Range<usize>, j: usize, pieces: usize, elem: usize) -> Range<usize> {
    let count = range.len() / elem;
    let start = range.start + (j * count / pieces) * elem;
    let end = range.start + ((j + 1) * count / pieces) * elem;
    start..end
}

/// Number of pieces so that the largest of `ranges` is cut into pieces of at most
/// `piece_bytes` (at least one piece, so empty buffers still exchange one empty message).
pub fn piece_count(ranges: &[Range<usize>], piece_bytes: usize) -> usize {
    let max = ranges.iter().map(|r| r.len()).max().unwrap_or(0);
    max.div_ceil(piece_bytes.max(1)).max(1)
}
