//! Wire format of data-path messages.
//!
//! Every message is a 24-byte header followed by `len` payload bytes:
//! `magic u32 | kind u32 | seq u64 | len u64`, little-endian. `seq` counts messages per
//! (peer, direction) from 0, so a lost, duplicated or misordered message — or two ranks
//! calling different collectives — is caught at the next header instead of corrupting data.

pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"DTRF");
pub const HEADER_LEN: usize = 24;
/// Control frames (goodbye/abort) carry at most this many payload bytes.
pub const MAX_CONTROL_LEN: u64 = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameKind {
    /// Payload of a collective.
    Data = 1,
    /// The sender dropped its communicator cleanly; no more frames follow.
    Goodbye = 2,
    /// The sender hit an error; payload = rank it blames (u64) + UTF-8 reason.
    Abort = 3,
    /// Payload of a collective, spliced from the sender's pages: the receiver acknowledges
    /// once its receives of the current operation are done (see `super::splice`).
    SplicedData = 4,
}

impl FrameKind {
    pub fn is_data(self) -> bool {
        matches!(self, FrameKind::Data | FrameKind::SplicedData)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    pub kind: FrameKind,
    pub seq: u64,
    pub len: u64,
}

impl FrameHeader {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut out = [0u8; HEADER_LEN];
        out[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        out[4..8].copy_from_slice(&(self.kind as u32).to_le_bytes());
        out[8..16].copy_from_slice(&self.seq.to_le_bytes());
        out[16..24].copy_from_slice(&self.len.to_le_bytes());
        out
    }

    /// Parses a header; the error text says what was wrong (for a `Protocol` error).
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<FrameHeader, String> {
        let word = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let dword = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        if word(0) != FRAME_MAGIC {
            return Err(format!(
                "bad frame magic {:#010x} (stream out of sync or not a dtrain peer)",
                word(0)
            ));
        }
        let kind = match word(4) {
            1 => FrameKind::Data,
            2 => FrameKind::Goodbye,
            3 => FrameKind::Abort,
            4 => FrameKind::SplicedData,
            other => return Err(format!("unknown frame kind {other}")),
        };
        let header = FrameHeader {
            kind,
            seq: dword(8),
            len: dword(16),
        };
        if !kind.is_data() && header.len > MAX_CONTROL_LEN {
            return Err(format!("control frame of {} bytes is too long", header.len));
        }
        Ok(header)
    }
}

/// Payload of an abort frame.
pub fn encode_abort(blamed_rank: usize, reason: &str) -> Vec<u8> {
    let mut out = (blamed_rank as u64).to_le_bytes().to_vec();
    let reason = reason.as_bytes();
    out.extend_from_slice(&reason[..reason.len().min(MAX_CONTROL_LEN as usize - 8)]);
    out
}

pub fn decode_abort(payload: &[u8]) -> (Option<usize>, String) {
    if payload.len() < 8 {
        return (None, String::from_utf8_lossy(payload).into_owned());
    }
    let rank = u64::from_le_bytes(payload[..8].try_into().expect("8 bytes"));
    let reason = String::from_utf8_lossy(&payload[8..]).into_owned();
    (usize::try_from(rank).ok(), reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_garbage() {
        let h = FrameHeader {
            kind: FrameKind::Data,
            seq: 42,
            len: 1 << 33,
        };
        assert_eq!(FrameHeader::decode(&h.encode()), Ok(h));
        let spliced = FrameHeader {
            kind: FrameKind::SplicedData,
            ..h
        };
        assert_eq!(FrameHeader::decode(&spliced.encode()), Ok(spliced));
        let mut bad = h.encode();
        bad[0] ^= 0xff;
        assert!(FrameHeader::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = h.encode();
        bad[4] = 9;
        assert!(FrameHeader::decode(&bad).unwrap_err().contains("kind"));
        let huge_control = FrameHeader {
            kind: FrameKind::Abort,
            seq: 0,
            len: 1 << 20,
        };
        assert!(FrameHeader::decode(&huge_control.encode()).is_err());
        let payload = encode_abort(3, "rank 3 died");
        assert_eq!(decode_abort(&payload), (Some(3), "rank 3 died".to_string()));
    }
}
