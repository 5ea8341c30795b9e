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

/// Largest expansion of a deflate stream (about 1032:1), bounding what a gzipped IDX file
/// can decompress to before its header's sizes are trusted.
const MAX_GZIP_RATIO: u64 = 1032;

/// How many bytes an IDX source holds, header included.
#[derive(Clone, Copy, Debug)]
enum SourceLen {
    /// Exactly this many (an uncompressed file of known length).
    Exact(u64),
    /// At most this many (a gzip stream).
    AtMost(u64),
}

/// Read an IDX file, gzipped or not, checking the sizes its header states against the
/// file's length before allocating anything from them.
fn load_idx(path: &Path) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let io = |e| DataError::io("cannot read", path, e);
    let mut file = std::io::BufReader::new(std::fs::File::open(path).map_err(io)?);
    let len = file.get_ref().metadata().map_err(io)?.len();
    let gzipped = std::io::BufRead::fill_buf(&mut file)
        .map_err(io)?
        .starts_with(&[0x1f, 0x8b]);
    if gzipped {
        let most = SourceLen::AtMost(len.saturating_mul(MAX_GZIP_RATIO));
        read_idx(flate2::bufread::GzDecoder::new(file), path, most)
    } else {
        read_idx(file, path, SourceLen::Exact(len))
    }
}

/// Parse an IDX file: magic 0x0000_08NN (unsigned bytes, NN dimensions), NN big-endian u32
/// sizes, then the data. Returns (dims, data).
pub fn parse_idx(path: &Path, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    read_idx(bytes, path, SourceLen::Exact(bytes.len() as u64))
}

/// [`parse_idx`] from a stream of `len` bytes: the data size the header states is
/// overflow-checked and compared with `len` before it is allocated (fallibly).
fn read_idx(
    mut src: impl Read,
    path: &Path,
    len: SourceLen,
) -> Result<(Vec<usize>, Vec<u8>), DataError> {
    let bad = |detail: String| DataError::BadFile {
        path: path.to_path_buf(),
        detail,
    };
    let corrupt = |e: std::io::Error| bad(format!("corrupt data: {e}"));
    let mut magic = [0u8; 4];
    let got = read_up_to(&mut src, &mut magic).map_err(corrupt)?;
    if got < 4 || magic[..3] != [0, 0, 0x08] {
        return Err(bad(
            "not an IDX file of unsigned bytes (bad magic number)".into()
        ));
    }
    let mut raw_dims = vec![0u8; 4 * magic[3] as usize];
    let got = read_up_to(&mut src, &mut raw_dims).map_err(corrupt)?;
    if got < raw_dims.len() {
        return Err(bad(format!("truncated header ({} bytes)", 4 + got)));
    }
    let dims: Vec<usize> = raw_dims
        .chunks_exact(4)
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize)
        .collect();
    let header = 4 + raw_dims.len() as u64;
    let expected = dims
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d as u64))
        .ok_or_else(|| bad(format!("header dimensions {dims:?} overflow")))?;
    let mismatch = |has: String| {
        bad(format!(
            "header says {dims:?} = {expected} bytes of data but the file has {has}"
        ))
    };
    match len {
        SourceLen::Exact(total) if total.saturating_sub(header) != expected => {
            return Err(mismatch(total.saturating_sub(header).to_string()))
        }
        SourceLen::AtMost(most) if expected > most => {
            return Err(mismatch(format!("at most {most} once decompressed")))
        }
        _ => {}
    }
    let mut data = Vec::new();
    usize::try_from(expected)
        .ok()
        .and_then(|n| data.try_reserve_exact(n).ok())
        .ok_or_else(|| bad(format!("{expected} bytes of data do not fit in memory")))?;
    (&mut src)
        .take(expected)
        .read_to_end(&mut data)
        .map_err(corrupt)?;
    if (data.len() as u64) < expected {
        return Err(mismatch(data.len().to_string()));
    }
    if read_up_to(&mut src, &mut [0u8; 1]).map_err(corrupt)? > 0 {
        return Err(mismatch("more".into()));
    }
    Ok((dims, data))
}

/// Fill as much of `buf` as `src` has; returns how much was read.
fn read_up_to(src: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match src.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn load_split(dir: &Path, images_stem: &str, labels_stem: &str) -> Result<DataSplit, DataError> {
    let missing = |stem: &str| DataError::Invalid(format!("{}: no {stem}[.gz]", dir.display()));
    let ipath = find_file(dir, images_stem).ok_or_else(|| missing(images_stem))?;
    let lpath = find_file(dir, labels_stem).ok_or_else(|| missing(labels_stem))?;
    let (idims, pixels) = load_idx(&ipath)?;
    let (ldims, labels) = load_idx(&lpath)?;
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
    let mut images = super::try_zeroed(n.checked_mul(IMAGE_SIZE), &format!("{n} images"))?;
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
