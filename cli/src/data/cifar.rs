//! CIFAR-10 "binary version": each file is a sequence of 3073-byte records, one label byte
//! (0..=9) then 3072 pixel bytes (1024 red, 1024 green, 1024 blue, rows top to bottom) —
//! exactly our CHW layout.

use std::path::Path;

use super::{DataError, DataSplit, IMAGE_SIZE, NUM_CLASSES};

/// Folder inside `--data-dir` that the official archive extracts to.
pub const CIFAR_DIR: &str = "cifar-10-batches-bin";
pub const RECORD_SIZE: usize = 1 + IMAGE_SIZE;
pub const TRAIN_FILES: [&str; 5] = [
    "data_batch_1.bin",
    "data_batch_2.bin",
    "data_batch_3.bin",
    "data_batch_4.bin",
    "data_batch_5.bin",
];
pub const TEST_FILE: &str = "test_batch.bin";

/// Are all six files present in `dir`?
pub fn cifar_files_present(dir: &Path) -> bool {
    TRAIN_FILES
        .iter()
        .chain(std::iter::once(&TEST_FILE))
        .all(|f| dir.join(f).is_file())
}

/// Decode records from the bytes of `path`, appending to `out`.
pub fn parse_records(path: &Path, bytes: &[u8], out: &mut DataSplit) -> Result<(), DataError> {
    if bytes.is_empty() {
        return Err(DataError::BadFile {
            path: path.to_path_buf(),
            detail: "file is empty (expected 3073-byte records)".into(),
        });
    }
    let whole = bytes.len() / RECORD_SIZE;
    let partial = bytes.len() % RECORD_SIZE;
    if partial != 0 {
        return Err(DataError::Truncated {
            path: path.to_path_buf(),
            len: bytes.len() as u64,
            record_size: RECORD_SIZE,
            record: whole,
            partial,
        });
    }
    let no_memory = || DataError::BadFile {
        path: path.to_path_buf(),
        detail: format!("not enough memory for its {whole} images"),
    };
    out.images
        .try_reserve(whole * IMAGE_SIZE)
        .map_err(|_| no_memory())?;
    out.labels.try_reserve(whole).map_err(|_| no_memory())?;
    for (record, rec) in bytes.chunks_exact(RECORD_SIZE).enumerate() {
        let label = rec[0];
        if label as usize >= NUM_CLASSES {
            return Err(DataError::BadRecord {
                path: path.to_path_buf(),
                record,
                detail: format!("label {label} is not a class in 0..=9"),
            });
        }
        out.labels.push(label);
        out.images.extend_from_slice(&rec[1..]);
    }
    out.n += whole;
    Ok(())
}

/// Read and decode one CIFAR-10 binary file.
pub fn load_file(path: &Path, out: &mut DataSplit) -> Result<(), DataError> {
    parse_records(path, &super::read_file(path)?, out)
}

fn empty() -> DataSplit {
    DataSplit {
        images: Vec::new(),
        labels: Vec::new(),
        n: 0,
    }
}

/// Load the five training files and the test file from `dir` (the `cifar-10-batches-bin`
/// folder).
pub fn load_cifar10(dir: &Path) -> Result<(DataSplit, DataSplit), DataError> {
    let mut train = empty();
    for f in TRAIN_FILES {
        load_file(&dir.join(f), &mut train)?;
    }
    let mut test = empty();
    load_file(&dir.join(TEST_FILE), &mut test)?;
    if (train.n, test.n) != (50_000, 10_000) {
        // Well-formed but not the official sizes (a hand-made subset?): usable, but say so.
        eprintln!(
            "dtrain: warning: {} holds {} training and {} test images, not CIFAR-10's 50000 and 10000",
            dir.display(),
            train.n,
            test.n
        );
    }
    Ok((train, test))
}
