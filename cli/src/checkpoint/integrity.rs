//! Checksums that make a damaged checkpoint refuse to load instead of training on a flipped
//! bit: a bit flip on disk, a half-copied file, a half-synced network filesystem.
//!
//! Every checkpoint carries, as string metadata (so `safetensors.torch.load_file` still
//! reads it), the xxh3-64 of
//! - each tensor's bytes: `checksum.tensor.<name>`;
//! - the training state — every other metadata entry (position, settings, format, model):
//!   `checksum.state`;
//! - the header itself — each tensor's name, dtype and shape, and every checksum above:
//!   `checksum.header`;
//!
//! and `checksum = xxh3-64` naming the algorithm. A file without any `checksum` entry was
//! written before checksums existed (or by another program): it loads with a one-line
//! warning that it cannot be verified.
//!
//! Why xxh3-64 (crate `xxhash-rust`): ~20 GB/s on one core without any `unsafe` of ours,
//! so verifying a VGG11 checkpoint costs a few ms next to reading and converting it
//! (`cargo bench -p dtrain --bench checkpoint` measures both); 64 bits make a missed random
//! corruption a 2^-64 event per tensor. FNV-1a ([`crate::hash`]) goes one byte at a time,
//! ~20x slower. Not cryptographic: this detects accidents, not an attacker.
//!
//! Damage in a file that does not even parse is described by [`describe_unparsable`]
//! (truncated, header length damaged, header not JSON), from the bytes already in memory:
//! nothing is sized from the damaged length field.

use std::collections::{BTreeMap, HashMap};

use engine::state::{LoadedState, NamedTensor, TensorData};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// The metadata key naming the algorithm; every checksum key starts with it.
pub const ALGORITHM_KEY: &str = "checksum";
const ALGORITHM: &str = "xxh3-64";
const TENSOR_PREFIX: &str = "checksum.tensor.";
const STATE_KEY: &str = "checksum.state";
const HEADER_KEY: &str = "checksum.header";

/// What in a checkpoint does not match its checksums.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Damage {
    /// The header (tensor table or the checksums themselves): why.
    Header(String),
    /// The training state metadata (position, settings).
    State,
    /// These tensors' bytes.
    Tensors(Vec<String>),
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Damage::Header(why) => write!(f, "the header is damaged ({why})"),
            Damage::State => write!(
                f,
                "the training state (position and settings) does not match its checksum"
            ),
            Damage::Tensors(names) => {
                let shown: Vec<&str> = names.iter().take(4).map(String::as_str).collect();
                let more = match names.len() - shown.len() {
                    0 => String::new(),
                    n => format!(" and {n} more"),
                };
                match names.len() {
                    1 => write!(f, "tensor {} does not match its checksum", shown[0]),
                    _ => write!(
                        f,
                        "tensors {}{more} do not match their checksums",
                        shown.join(", ")
                    ),
                }
            }
        }
    }
}

/// Whether a file's contents were checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verified {
    /// Every tensor, the training state and the header match their checksums.
    Checked,
    /// The file has no checksums (older dtrain, or another program wrote it).
    NoChecksums,
}

fn hex(digest: u64) -> String {
    format!("{digest:016x}")
}

/// A tensor's bytes as stored (little-endian; this crate targets little-endian hosts).
fn tensor_bytes(t: &NamedTensor) -> &[u8] {
    match &t.data {
        TensorData::F32(v) => bytemuck::cast_slice(v),
        TensorData::F64(v) => bytemuck::cast_slice(v),
        TensorData::I64(v) => bytemuck::cast_slice(v),
    }
}

/// Feed `key`, `value` with separators that cannot occur inside either half ambiguously.
fn feed(h: &mut Xxh3, key: &str, value: &str) {
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key.as_bytes());
    h.update(&(value.len() as u64).to_le_bytes());
    h.update(value.as_bytes());
}

/// The digest of every non-checksum metadata entry, in key order.
fn state_digest(metadata: &HashMap<String, String>) -> u64 {
    let sorted: BTreeMap<&String, &String> = metadata
        .iter()
        .filter(|(k, _)| !k.starts_with(ALGORITHM_KEY))
        .collect();
    let mut h = Xxh3::new();
    for (k, v) in sorted {
        feed(&mut h, k, v);
    }
    h.digest()
}

/// The digest of the tensor table (name, dtype, shape, in name order) and of every checksum
/// entry but the header's own.
fn header_digest<'a>(
    tensors: impl Iterator<Item = &'a NamedTensor>,
    metadata: &HashMap<String, String>,
) -> u64 {
    let mut table: Vec<&NamedTensor> = tensors.collect();
    table.sort_by(|a, b| a.name.cmp(&b.name));
    let mut h = Xxh3::new();
    for t in table {
        let shape: Vec<String> = t.shape.iter().map(usize::to_string).collect();
        feed(
            &mut h,
            &t.name,
            &format!("{} [{}]", t.data.dtype_name(), shape.join(",")),
        );
    }
    let sums: BTreeMap<&String, &String> = metadata
        .iter()
        .filter(|(k, _)| k.starts_with(ALGORITHM_KEY) && k.as_str() != HEADER_KEY)
        .collect();
    for (k, v) in sums {
        feed(&mut h, k, v);
    }
    h.digest()
}

/// Add the checksums of `tensors` and of `metadata` (the training state) to `metadata`.
pub fn seal(tensors: &[NamedTensor], metadata: &mut HashMap<String, String>) {
    metadata.retain(|k, _| !k.starts_with(ALGORITHM_KEY));
    let state = state_digest(metadata);
    metadata.insert(ALGORITHM_KEY.into(), ALGORITHM.into());
    metadata.insert(STATE_KEY.into(), hex(state));
    for t in tensors {
        metadata.insert(
            format!("{TENSOR_PREFIX}{}", t.name),
            hex(xxh3_64(tensor_bytes(t))),
        );
    }
    let header = header_digest(tensors.iter(), metadata);
    metadata.insert(HEADER_KEY.into(), hex(header));
}

/// Check a parsed file against its checksums: the header first (so a damaged checksum is
/// reported as such, not as a damaged tensor), then the training state, then every tensor.
pub fn verify(loaded: &LoadedState) -> Result<Verified, Damage> {
    let meta = &loaded.metadata;
    if !meta.keys().any(|k| k.starts_with(ALGORITHM_KEY)) {
        return Ok(Verified::NoChecksums);
    }
    let header = |why: &str| Damage::Header(why.to_string());
    match meta.get(ALGORITHM_KEY).map(String::as_str) {
        Some(ALGORITHM) => {}
        Some(other) => return Err(header(&format!("unknown checksum algorithm {other:?}"))),
        None => return Err(header("checksums without their algorithm")),
    }
    let recorded = meta
        .get(HEADER_KEY)
        .ok_or_else(|| header("its checksum is missing"))?;
    if *recorded != hex(header_digest(loaded.tensors.values(), meta)) {
        return Err(header("it does not match its checksum"));
    }
    let tensor_sums = meta.keys().filter(|k| k.starts_with(TENSOR_PREFIX)).count();
    if tensor_sums != loaded.tensors.len() {
        return Err(header(&format!(
            "{} tensors but {tensor_sums} tensor checksums",
            loaded.tensors.len()
        )));
    }
    if meta.get(STATE_KEY) != Some(&hex(state_digest(meta))) {
        return Err(Damage::State);
    }
    let damaged: Vec<String> = loaded
        .tensors
        .values()
        .filter(|t| {
            meta.get(&format!("{TENSOR_PREFIX}{}", t.name)) != Some(&hex(xxh3_64(tensor_bytes(t))))
        })
        .map(|t| t.name.clone())
        .collect();
    if damaged.is_empty() {
        Ok(Verified::Checked)
    } else {
        Err(Damage::Tensors(damaged))
    }
}

/// Remove the checksum entries (they are not settings).
pub fn strip(metadata: &mut HashMap<String, String>) {
    metadata.retain(|k, _| !k.starts_with(ALGORITHM_KEY));
}

/// What is wrong with bytes that do not parse as safetensors, in words for the user; `None`
/// when nothing more specific than the parser's own message can be said. Reads only the
/// bytes given: the header length field is checked against them before it is used.
pub fn describe_unparsable(bytes: &[u8]) -> Option<String> {
    let Some(len_field) = bytes.get(..8) else {
        return Some(format!(
            "the file is truncated: {} bytes, less than the 8-byte header length",
            bytes.len()
        ));
    };
    let header_len = u64::from_le_bytes(len_field.try_into().ok()?);
    let rest = bytes.len() as u64 - 8;
    if header_len > rest {
        return Some(format!(
            "the file is truncated or its header length is damaged: the header length says \
             {header_len} bytes, only {rest} follow"
        ));
    }
    let header = &bytes[8..8 + header_len as usize];
    let json: serde_json::Value = match serde_json::from_slice(header) {
        Ok(v) => v,
        Err(e) => return Some(format!("the header is damaged: not valid JSON ({e})")),
    };
    let data_end = json
        .as_object()?
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()?;
    let data_len = rest - header_len;
    (data_end > data_len).then(|| {
        format!(
            "the file is truncated: its header describes {data_end} bytes of tensor data, \
             {data_len} are there"
        )
    })
}
