//! Datasets (CIFAR-10 with download, synthetic, Fashion-MNIST), sharding, augmentation and
//! the background batch loader.
//!
//! Every dataset is held as [`DataSplit`]: n×3×32×32 CHW bytes plus labels 0..=9. The training
//! side goes through [`TrainLoader`] (DistributedSampler sharding + deterministic augmentation,
//! prepared ahead on a thread); evaluation through [`test_shard`].

pub mod augment;
pub mod cifar;
pub mod download;
pub mod fashion_mnist;
pub mod loader;
pub mod sampler;
pub mod synthetic;

use std::path::PathBuf;
use std::time::Duration;

use crate::args::TrainConfig;
use crate::config::DatasetKind;

pub use augment::{augment_image, normalize_image, AugmentParams, CIFAR_MEAN, CIFAR_STD};
pub use loader::{make_batch, test_shard, TrainLoader};
pub use sampler::{batches_per_epoch, rank_indices};

/// Side of the (square) images.
pub const IMAGE_SIDE: usize = 32;
pub const CHANNELS: usize = 3;
/// Bytes (and floats) per image: 3×32×32.
pub const IMAGE_SIZE: usize = CHANNELS * IMAGE_SIDE * IMAGE_SIDE;
pub const NUM_CLASSES: usize = 10;

/// One split of a dataset, decoded and in memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSplit {
    /// n×3×32×32, CHW, one byte per channel value.
    pub images: Vec<u8>,
    /// n labels, each < 10.
    pub labels: Vec<u8>,
    pub n: usize,
}

impl DataSplit {
    pub fn image(&self, i: usize) -> &[u8] {
        &self.images[i * IMAGE_SIZE..(i + 1) * IMAGE_SIZE]
    }
}

/// A batch ready for the model.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    /// n×3×32×32, normalized with the CIFAR-10 mean and std.
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub n: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{context} {}: {source}", path.display())]
    Io {
        context: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file ends inside a record.
    #[error("{}: truncated: {len} bytes is not a whole number of {record_size}-byte records; record {record} is incomplete ({partial} of {record_size} bytes)", path.display())]
    Truncated {
        path: PathBuf,
        len: u64,
        record_size: usize,
        record: usize,
        partial: usize,
    },
    #[error("{}: record {record}: {detail}", path.display())]
    BadRecord {
        path: PathBuf,
        record: usize,
        detail: String,
    },
    #[error("{}: {detail}", path.display())]
    BadFile { path: PathBuf, detail: String },
    /// CIFAR-10 absent and could not be downloaded.
    #[error("CIFAR-10 not found in {} and the download failed ({reason}). Without network, download {url} elsewhere and extract it in {} so that {}/data_batch_1.bin .. data_batch_5.bin and test_batch.bin exist", dir.display(), parent.display(), dir.display())]
    Missing {
        dir: PathBuf,
        parent: PathBuf,
        url: String,
        reason: String,
    },
    #[error("download of {url} failed: {detail}")]
    Download { url: String, detail: String },
    #[error("download of {url} is truncated: got {got} of {expected} bytes")]
    DownloadTruncated {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error("MD5 mismatch for {url}: expected {expected}, got {actual} (nothing was extracted)")]
    Md5Mismatch {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("archive from {url}: {detail}")]
    Archive { url: String, detail: String },
    #[error("timed out after {waited:?} waiting for the download lock {} held by another rank on this host", path.display())]
    LockTimeout { path: PathBuf, waited: Duration },
    #[error("{0}")]
    Invalid(String),
}

impl DataError {
    pub fn io(context: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io {
            context,
            path: path.into(),
            source,
        }
    }
}

/// `len` zero bytes for `what` (named in the error), allocated fallibly: sizes that come from
/// flags or file headers must not abort the process.
pub fn try_zeroed(len: Option<usize>, what: &str) -> Result<Vec<u8>, DataError> {
    let mut v = Vec::new();
    len.and_then(|n| v.try_reserve_exact(n).ok().map(|_| n))
        .map(|n| {
            v.resize(n, 0);
            v
        })
        .ok_or_else(|| DataError::Invalid(format!("not enough memory for {what}")))
}

/// A whole file, read with a fallible allocation of its length.
pub fn read_file(path: &std::path::Path) -> Result<Vec<u8>, DataError> {
    use std::io::Read;
    let mut file = std::fs::File::open(path).map_err(|e| DataError::io("cannot read", path, e))?;
    let len = file
        .metadata()
        .map_err(|e| DataError::io("cannot read", path, e))?
        .len();
    let mut bytes = Vec::new();
    usize::try_from(len)
        .ok()
        .and_then(|n| bytes.try_reserve_exact(n).ok())
        .ok_or_else(|| DataError::BadFile {
            path: path.to_path_buf(),
            detail: format!("{len} bytes do not fit in memory"),
        })?;
    file.read_to_end(&mut bytes)
        .map_err(|e| DataError::io("cannot read", path, e))?;
    Ok(bytes)
}

/// Load (downloading CIFAR-10 if needed) the train and test splits of `--dataset`.
pub fn load_dataset(cfg: &TrainConfig) -> Result<(DataSplit, DataSplit), DataError> {
    let o = &cfg.opts;
    match o.dataset {
        DatasetKind::Cifar10 => {
            download::ensure_cifar10(&o.data_dir, &o.download_url, &o.download_md5)?;
            cifar::load_cifar10(&o.data_dir.join(cifar::CIFAR_DIR))
        }
        DatasetKind::Synthetic => Ok((
            synthetic::generate(o.seed, synthetic::Split::Train, o.synthetic_train)?,
            synthetic::generate(o.seed, synthetic::Split::Test, o.synthetic_test)?,
        )),
        DatasetKind::FashionMnist => {
            let dir = fashion_mnist::find_dir(&o.data_dir)?;
            fashion_mnist::load(&dir)
        }
    }
}
