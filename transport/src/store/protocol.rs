//! The TCPStore wire format of PyTorch 2.15 (`torch/csrc/distributed/c10d/TCPStore*.cpp`),
//! shared by [`super::StoreClient`] and [`super::StoreServer`].
//!
//! A request is one command byte followed by its arguments; integers are little-endian (torch
//! writes them in host order, and every platform it runs on is little-endian), and a string or
//! value is `u64 length | bytes`. A connection starts with `VALIDATE | u32 magic` and torch's
//! client then sends `PING | u32 nonce` (its pid), which the server echoes. Answers:
//!
//! | request | arguments | answer |
//! |---|---|---|
//! | `SET` | key, value | none |
//! | `GET` | key | value (empty if missing, libuv backend) |
//! | `ADD` | key, i64 delta | i64 new value (stored as its decimal text) |
//! | `CHECK` | u64 n, n keys | u8: 0 ready, 1 not ready |
//! | `WAIT` | u64 n, n keys | u8 0 (stop waiting) once all keys exist |
//! | `CANCEL_WAIT` | | u8 1 (wait canceled) |
//! | `COMPARE_SET` | key, expected, desired | the value now stored (see the server) |
//! | `DELETE_KEY` | key | i64 number deleted |
//! | `GETNUMKEYS` | | i64 |
//! | `PING` | u32 nonce | the same u32 |
//!
//! The captured bytes in `transport/tests/fixtures/tcpstore_*` are the reference.

use std::io::{self, Read};

/// Sent right after connecting; the libuv server ignores a client until it has seen it.
pub(crate) const VALIDATION_MAGIC: u32 = 0x3C85_F7CE;

/// Command bytes (torch's `QueryType` enum, in order).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Query {
    Validate = 0,
    Set = 1,
    CompareSet = 2,
    Get = 3,
    Add = 4,
    Check = 5,
    Wait = 6,
    GetNumKeys = 7,
    DeleteKey = 8,
    CancelWait = 12,
    Ping = 13,
}

impl Query {
    pub(crate) fn from_byte(b: u8) -> Option<Query> {
        Some(match b {
            0 => Query::Validate,
            1 => Query::Set,
            2 => Query::CompareSet,
            3 => Query::Get,
            4 => Query::Add,
            5 => Query::Check,
            6 => Query::Wait,
            7 => Query::GetNumKeys,
            8 => Query::DeleteKey,
            12 => Query::CancelWait,
            13 => Query::Ping,
            _ => return None,
        })
    }
}

pub(crate) const CHECK_READY: u8 = 0;
pub(crate) const CHECK_NOT_READY: u8 = 1;
pub(crate) const WAIT_STOP_WAITING: u8 = 0;
pub(crate) const WAIT_CANCELED: u8 = 1;

/// Longest key or value either side accepts: torch has no limit, ours keeps a corrupt length
/// from allocating gigabytes.
pub(crate) const MAX_FIELD_LEN: u64 = 64 << 20;
/// Most keys in one `CHECK`/`WAIT` (torch's `MAX_KEY_COUNT`).
pub(crate) const MAX_KEYS: u64 = 128 * 1024;

/// One request being built: the command byte, then arguments.
pub(crate) struct Request(pub(crate) Vec<u8>);

impl Request {
    pub(crate) fn new(query: Query) -> Request {
        Request(vec![query as u8])
    }
    pub(crate) fn field(mut self, bytes: &[u8]) -> Request {
        self.0
            .extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        self.0.extend_from_slice(bytes);
        self
    }
    pub(crate) fn u64(mut self, v: u64) -> Request {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn i64(mut self, v: i64) -> Request {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    pub(crate) fn u32(mut self, v: u32) -> Request {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
}

pub(crate) fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

pub(crate) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_le_bytes(b))
}

pub(crate) fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

pub(crate) fn read_i64(r: &mut impl Read) -> io::Result<i64> {
    Ok(read_u64(r)? as i64)
}

/// `u64 length | bytes`, refusing lengths above [`MAX_FIELD_LEN`].
pub(crate) fn read_field(r: &mut impl Read) -> io::Result<Vec<u8>> {
    let len = read_u64(r)?;
    if len > MAX_FIELD_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("field of {len} bytes is longer than the {MAX_FIELD_LEN}-byte limit"),
        ));
    }
    let mut buf = vec![0u8; len as usize];
    r.read_exact(&mut buf)?;
    Ok(buf)
}

/// `u64 n | n fields` (the key list of `CHECK` and `WAIT`).
pub(crate) fn read_key_list(r: &mut impl Read) -> io::Result<Vec<Vec<u8>>> {
    let n = read_u64(r)?;
    if n > MAX_KEYS {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{n} keys in one request, more than the limit of {MAX_KEYS}"),
        ));
    }
    (0..n).map(|_| read_field(r)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_encoding_and_field_limits() {
        let req = Request::new(Query::Set).field(b"k").field(b"vv");
        assert_eq!(
            req.0,
            [1, 1, 0, 0, 0, 0, 0, 0, 0, b'k', 2, 0, 0, 0, 0, 0, 0, 0, b'v', b'v']
        );
        let mut r = &req.0[1..];
        assert_eq!(read_field(&mut r).unwrap(), b"k");
        assert_eq!(read_field(&mut r).unwrap(), b"vv");
        let huge = (MAX_FIELD_LEN + 1).to_le_bytes();
        let err = read_field(&mut &huge[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let many = (MAX_KEYS + 1).to_le_bytes();
        assert!(read_key_list(&mut &many[..]).is_err());
        for q in [Query::Validate, Query::Wait, Query::CancelWait, Query::Ping] {
            assert_eq!(Query::from_byte(q as u8), Some(q));
        }
        assert_eq!(Query::from_byte(200), None);
    }
}
