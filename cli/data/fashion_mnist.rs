//! Fashion-MNIST from IDX files (as shipped by Debian's `dataset-fashion-mnist`, gzipped or
//! not): 28×28 grey images padded with 2 zero pixels to 32×32 and replicated to 3 channels.
//! They then go through the same transforms as CIFAR-10 (including its mean/std
//! normalization), so the model and the loader need no dataset-specific path.

use std::io::Read;
use std::path::{Path, PathBuf};

use super::{DataError, DataSplit, IMAGE_SIDE, IMAGE_SIZE, NUM_CLASSES};

/// Where Debian's package installs the files.
pub const SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";
const STEMS: [&str; 4] = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
];
const MNIST_SIDE: usize = 28;

/// The file `stem` or `stem.gz` in `dir`, if any.
fn find_file(dir: &Path, stem: &str) -> Option<PathBuf> {
    [dir.join(stem), dir.join(format!("{stem}.gz"))]
        .into_iter()
        .find(|p| p.is_file())
}

/// `data_dir/fashion-mnist` if it holds the four files, else the system folder.
pub fn find_dir(data_dir: &Path) -> Result<PathBuf, DataError> {
    let candidates = [data_dir.join("fashion-mnist"), PathBuf::from(SYSTEM_DIR)];
    for dir in &candidates {
        if STEMS.iter().all(|s| find_file(dir, s).is_some()) {
            return Ok(dir.clone());
        }
    }
    Err(DataError::Invalid(format!(
        "Fashion-MNIST not found: put {} (optionally .gz) in {} or install Debian's \
         dataset-fashion-mnist package ({})",
        STEMS.join(", "),
        candidates[0].display(),
        SYSTEM_DIR
    )))
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>, DataError> {
    let raw = std::fs::read(path).map_err(|e| DataError::io("cannot read", path, e))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .map_err(|e| DataError::BadFile {
                path: path.to_path_buf(),
                detail: format!("corrupt gzip data: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parse an IDX file: magic 0x0000_08NN (unsigned bytes, NN dimensions), NN big-endian u32
/// sizes, then the data. Returns (dims, data).
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let bad = |detail: String| DataError::BadFile {
        path: path.to_path_buf(),
        detail,
    };
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 {
        return Err(bad(
            "not an IDX file of unsigned bytes (bad magic number)".into()
        ));
    }
    let ndim = bytes[3] as usize;
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(bad(format!("truncated header ({} bytes)", bytes.len())));
    }
    let dims: Vec<usize> = (0..ndim)
        .map(|d| {
            let o = 4 + 4 * d;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let expected: usize = dims.iter().product();
    let data = &bytes[header..];
    if data.len() != expected {
        return Err(bad(format!(
            "header says {dims:?} = {expected} bytes of data but the file has {}",
            data.len()
        )));
    }
    Ok((dims, data.to_vec()))
}

fn load_split(dir: &Path, images_stem: &str, labels_stem: &str) -> Result<DataSplit, DataError> {
    let missing = |stem: &str| DataError::Invalid(format!("{}: no {stem}[.gz]", dir.display()));
    let ipath = find_file(dir, images_stem).ok_or_else(|| missing(images_stem))?;
    let lpath = find_file(dir, labels_stem).ok_or_else(|| missing(labels_stem))?;
    let (idims, pixels) = parse_idx(&ipath, &read_maybe_gz(&ipath)?)?;
    let (ldims, labels) = parse_idx(&lpath, &read_maybe_gz(&lpath)?)?;
    if idims.len() != 3 || idims[1] != MNIST_SIDE || idims[2] != MNIST_SIDE {
        return Err(DataError::BadFile {
            path: ipath,
            detail: format!("expected n×28×28 images, header says {idims:?}"),
        });
    }
    if ldims.len() != 1 || ldims[0] != idims[0] {
        return Err(DataError::BadFile {
            path: lpath,
            detail: format!("expected {} labels, header says {ldims:?}", idims[0]),
        });
    }
    if let Some(record) = labels.iter().position(|&l| l as usize >= NUM_CLASSES) {
        return Err(DataError::BadRecord {
            path: lpath,
            record,
            detail: format!("label {} is not a class in 0..=9", labels[record]),
        });
    }
    let n = idims[0];
    let mut images = vec![0u8; n * IMAGE_SIZE];
    let pad = (IMAGE_SIDE - MNIST_SIDE) / 2;
    for i in 0..n {
        let src = &pixels[i * MNIST_SIDE * MNIST_SIDE..(i + 1) * MNIST_SIDE * MNIST_SIDE];
        let dst = &mut images[i * IMAGE_SIZE..(i + 1) * IMAGE_SIZE];
        for c in 0..3 {
            for y in 0..MNIST_SIDE {
                let o = c * IMAGE_SIDE * IMAGE_SIDE + (y + pad) * IMAGE_SIDE + pad;
                dst[o..o + MNIST_SIDE].copy_from_slice(&src[y * MNIST_SIDE..(y + 1) * MNIST_SIDE]);
            }
        }
    }
    Ok(DataSplit { images, labels, n })
}

/// Load train (60,000) and test (10,000) splits from `dir`.
pub fn load(dir: &Path) -> Result<(DataSplit, DataSplit), DataError> {
    Ok((
        load_split(dir, STEMS[0], STEMS[1])?,
        load_split(dir, STEMS[2], STEMS[3])?,
    ))
}
