//! Checkpoints: save (atomically), resume, and PyTorch `state_dict` import.
//!
//! A checkpoint is one safetensors file:
//! - tensors `model.<name>`: every parameter and buffer under its PyTorch `state_dict` name
//!   (BatchNorm's `num_batches_tracked` stays I64 as in PyTorch), so the file minus the
//!   `model.` prefix is what `model.load_state_dict` expects;
//! - tensors `optim.momentum.<name>`: SGD momentum buffers (absent before the first step);
//! - string metadata: `format`, `version`, `model` (the layer spec), the position
//!   (`epoch`, `batch` = next batch within that epoch, `iteration` = completed iterations),
//!   and the settings that fix the data order (`seed`, `world_size`, `batch_size`, `dataset`,
//!   `shuffle`, `augment`) plus the optimizer settings, for mismatch warnings.
//!
//! The data order and augmentation are a pure function of (seed, epoch, batch index), so the
//! position *is* the RNG state: resuming at `(epoch, batch)` replays exactly the batches an
//! uninterrupted run would have seen.
//!
//! Saving writes a temporary file in the destination's directory, syncs it, then renames it
//! over the destination: a crash leaves either the old or the new checkpoint, never half.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;

const FORMAT: &str = "dtrain-checkpoint";
const VERSION: &str = "1";
const MODEL_PREFIX: &str = "model.";
const MOMENTUM_PREFIX: &str = "optim.momentum.";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot {action} checkpoint {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {detail}")]
    Format { path: PathBuf, detail: String },
    #[error("checkpoint {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
}

/// Element data of one tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    I64(Vec<i64>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn dtype(&self) -> Dtype {
        match self {
            TensorData::F32(_) => Dtype::F32,
            TensorData::I64(_) => Dtype::I64,
        }
    }
    fn bytes(&self) -> Vec<u8> {
        // safetensors is little-endian; to_le_bytes keeps that true on any host.
        match self {
            TensorData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            TensorData::I64(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// A named tensor, as in a PyTorch `state_dict`.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// Where training stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Epoch to continue in (0-based).
    pub epoch: usize,
    /// Next batch index within `epoch`.
    pub batch: usize,
    /// Iterations completed since the start of the run (across epochs).
    pub iteration: usize,
}

/// Everything a resume needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    /// The model's layer spec (`vgg11` or e.g. `64,M,128,M`).
    pub model: String,
    /// Parameters and buffers under their `state_dict` names.
    pub state: Vec<NamedTensor>,
    /// Momentum buffers under the name of their parameter (empty before the first step).
    pub momentum: Vec<NamedTensor>,
    pub position: Position,
    /// Settings recorded for mismatch warnings on resume (`seed`, `world_size`, ...).
    pub settings: BTreeMap<String, String>,
}

fn to_view<'a>(t: &NamedTensor, bytes: &'a [u8]) -> Result<TensorView<'a>, String> {
    TensorView::new(t.data.dtype(), t.shape.clone(), bytes).map_err(|e| format!("{}: {e}", t.name))
}

/// Serialize a checkpoint to safetensors bytes.
pub fn to_bytes(ckpt: &Checkpoint) -> Result<Vec<u8>, String> {
    let mut named: Vec<(String, &NamedTensor)> = Vec::new();
    for t in &ckpt.state {
        named.push((format!("{MODEL_PREFIX}{}", t.name), t));
    }
    for t in &ckpt.momentum {
        named.push((format!("{MOMENTUM_PREFIX}{}", t.name), t));
    }
    let bytes: Vec<Vec<u8>> = named.iter().map(|(_, t)| t.data.bytes()).collect();
    let mut views = Vec::with_capacity(named.len());
    for ((name, t), b) in named.iter().zip(&bytes) {
        views.push((name.clone(), to_view(t, b)?));
    }
    let mut meta: HashMap<String, String> = ckpt
        .settings
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("version".into(), VERSION.into());
    meta.insert("model".into(), ckpt.model.clone());
    meta.insert("epoch".into(), ckpt.position.epoch.to_string());
    meta.insert("batch".into(), ckpt.position.batch.to_string());
    meta.insert("iteration".into(), ckpt.position.iteration.to_string());
    safetensors::serialize(views, Some(meta)).map_err(|e| e.to_string())
}

/// Write `ckpt` to `path` atomically (temporary file + fsync + rename).
pub fn save(path: &Path, ckpt: &Checkpoint) -> Result<(), CheckpointError> {
    let bytes = to_bytes(ckpt).map_err(|detail| CheckpointError::Invalid {
        path: path.to_path_buf(),
        detail,
    })?;
    let io_err = |action, source| CheckpointError::Io {
        action,
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| CheckpointError::Invalid {
            path: path.to_path_buf(),
            detail: "the path names no file".into(),
        })?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(|e| io_err("create", e))?;
        f.write_all(&bytes).map_err(|e| io_err("write", e))?;
        f.sync_all().map_err(|e| io_err("sync", e))?;
        drop(f);
        std::fs::rename(&tmp, path).map_err(|e| io_err("rename into place", e))?;
        // Make the rename itself durable; failing to open a directory is not fatal.
        if let Ok(d) = std::fs::File::open(&dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn read_file(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    std::fs::read(path).map_err(|source| CheckpointError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })
}

fn tensor_from_view(
    path: &Path,
    name: &str,
    view: &TensorView<'_>,
) -> Result<NamedTensor, CheckpointError> {
    let bytes = view.data();
    let data = match view.dtype() {
        Dtype::F32 => TensorData::F32(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        ),
        Dtype::I64 => TensorData::I64(
            bytes
                .chunks_exact(8)
                .map(|c| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(c);
                    i64::from_le_bytes(a)
                })
                .collect(),
        ),
        other => {
            return Err(CheckpointError::Invalid {
                path: path.to_path_buf(),
                detail: format!(
                    "tensor {name} has dtype {other:?}; only F32 and I64 are supported"
                ),
            })
        }
    };
    Ok(NamedTensor {
        name: name.to_string(),
        shape: view.shape().to_vec(),
        data,
    })
}

/// Read every tensor of a safetensors file, sorted by name, plus its metadata.
fn read_tensors(
    path: &Path,
) -> Result<(Vec<NamedTensor>, HashMap<String, String>), CheckpointError> {
    let bytes = read_file(path)?;
    let format_err = |e: safetensors::SafeTensorError| CheckpointError::Format {
        path: path.to_path_buf(),
        detail: e.to_string(),
    };
    let (_, metadata) = SafeTensors::read_metadata(&bytes).map_err(format_err)?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(format_err)?;
    let mut tensors = Vec::new();
    for (name, view) in st.iter() {
        tensors.push(tensor_from_view(path, name, &view)?);
    }
    tensors.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((tensors, meta))
}

/// Load a checkpoint written by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let (tensors, mut meta) = read_tensors(path)?;
    let invalid = |detail: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        detail,
    };
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(invalid(
            "not a dtrain checkpoint (no format=dtrain-checkpoint metadata); \
             use --init-checkpoint for PyTorch state_dict files"
                .into(),
        ));
    }
    if meta.get("version").map(String::as_str) != Some(VERSION) {
        return Err(invalid(format!(
            "unsupported checkpoint version {:?} (this build reads {VERSION})",
            meta.get("version")
        )));
    }
    let mut number = |key: &str| -> Result<usize, CheckpointError> {
        let raw = meta
            .remove(key)
            .ok_or_else(|| invalid(format!("metadata {key:?} is missing")))?;
        raw.parse()
            .map_err(|_| invalid(format!("metadata {key}={raw:?} is not a number")))
    };
    let position = Position {
        epoch: number("epoch")?,
        batch: number("batch")?,
        iteration: number("iteration")?,
    };
    let model = meta
        .remove("model")
        .ok_or_else(|| invalid("metadata \"model\" is missing".into()))?;
    meta.remove("format");
    meta.remove("version");
    let mut state = Vec::new();
    let mut momentum = Vec::new();
    for mut t in tensors {
        if let Some(rest) = t.name.strip_prefix(MOMENTUM_PREFIX) {
            t.name = rest.to_string();
            momentum.push(t);
        } else if let Some(rest) = t.name.strip_prefix(MODEL_PREFIX) {
            t.name = rest.to_string();
            state.push(t);
        } else {
            return Err(invalid(format!("unexpected tensor {:?}", t.name)));
        }
    }
    Ok(Checkpoint {
        model,
        state,
        momentum,
        position,
        settings: meta.into_iter().collect(),
    })
}

/// Load a PyTorch `state_dict` saved with `safetensors.torch.save_file(model.state_dict(),
/// path)` (or a dtrain checkpoint, whose `model.` tensors are used). Returns the tensors by
/// `state_dict` name.
pub fn load_state_dict(path: &Path) -> Result<Vec<NamedTensor>, CheckpointError> {
    let (tensors, meta) = read_tensors(path)?;
    if meta.get("format").map(String::as_str) == Some(FORMAT) {
        return Ok(load(path)?.state);
    }
    Ok(tensors)
}

/// Human-readable differences between the settings recorded in a checkpoint and the current
/// ones (only keys present in both).
pub fn setting_differences(
    saved: &BTreeMap<String, String>,
    current: &BTreeMap<String, String>,
) -> Vec<String> {
    current
        .iter()
        .filter_map(|(k, v)| match saved.get(k) {
            Some(s) if s != v => Some(format!("{k}: checkpoint has {s}, this run has {v}")),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn temp_dir() -> PathBuf {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "dtrain-ckpt-test-{}-{}-{nanos}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        dir
    }

    fn sample() -> Checkpoint {
        Checkpoint {
            model: "8,M,16".into(),
            state: vec![
                NamedTensor {
                    name: "features.0.weight".into(),
                    shape: vec![2, 3],
                    data: TensorData::F32(vec![1.5, -2.0, 0.25, f32::MIN_POSITIVE, 7.0, -0.0]),
                },
                NamedTensor {
                    name: "features.1.num_batches_tracked".into(),
                    shape: vec![],
                    data: TensorData::I64(vec![42]),
                },
            ],
            momentum: vec![NamedTensor {
                name: "features.0.weight".into(),
                shape: vec![2, 3],
                data: TensorData::F32(vec![0.1, 0.2, 0.3, 0.4, 0.5, 0.6]),
            }],
            position: Position {
                epoch: 2,
                batch: 17,
                iteration: 95,
            },
            settings: [("seed".to_string(), "7".to_string())]
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn save_then_load_round_trips_bit_exactly() {
        let dir = temp_dir();
        let path = dir.join("run.safetensors");
        let ckpt = sample();
        save(&path, &ckpt).expect("save");
        let back = load(&path).expect("load");
        assert_eq!(back, ckpt);
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("run.safetensors")]);
        // As a state_dict, the model tensors come back without the prefix.
        let sd = load_state_dict(&path).expect("state dict");
        assert_eq!(sd, ckpt.state);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn overwriting_replaces_the_previous_checkpoint() {
        let dir = temp_dir();
        let path = dir.join("c.safetensors");
        let mut ckpt = sample();
        save(&path, &ckpt).unwrap();
        ckpt.position.iteration = 96;
        save(&path, &ckpt).unwrap();
        assert_eq!(load(&path).unwrap().position.iteration, 96);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_save_leaves_the_previous_file_intact() {
        let dir = temp_dir();
        let path = dir.join("c.safetensors");
        save(&path, &sample()).unwrap();
        // A tensor whose shape disagrees with its data cannot be serialized.
        let mut bad = sample();
        bad.state[0].shape = vec![5, 5];
        let err = save(&path, &bad).unwrap_err();
        assert!(err.to_string().contains("features.0.weight"), "{err}");
        assert_eq!(load(&path).unwrap(), sample());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_files_give_clear_errors() {
        let dir = temp_dir();
        let missing = load(&dir.join("nope.safetensors")).unwrap_err();
        assert!(
            missing.to_string().contains("cannot read checkpoint"),
            "{missing}"
        );
        let garbage = dir.join("garbage.safetensors");
        std::fs::write(&garbage, b"this is not a checkpoint").unwrap();
        let e = load(&garbage).unwrap_err();
        assert!(
            e.to_string().contains("not a valid safetensors file"),
            "{e}"
        );
        // Truncated: a valid file cut short.
        let good = to_bytes(&sample()).unwrap();
        let cut = dir.join("cut.safetensors");
        std::fs::write(&cut, &good[..good.len() - 3]).unwrap();
        assert!(load(&cut).is_err());
        // A plain state_dict is refused by `load` with a hint, accepted by load_state_dict.
        let plain = dir.join("plain.safetensors");
        let data = 1.0f32.to_le_bytes();
        let view = TensorView::new(Dtype::F32, vec![1], &data).unwrap();
        std::fs::write(&plain, safetensors::serialize([("w", view)], None).unwrap()).unwrap();
        let e = load(&plain).unwrap_err();
        assert!(e.to_string().contains("--init-checkpoint"), "{e}");
        let sd = load_state_dict(&plain).unwrap();
        assert_eq!(sd[0].name, "w");
        assert_eq!(sd[0].data, TensorData::F32(vec![1.0]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn setting_differences_lists_changed_keys_only() {
        let saved: BTreeMap<String, String> = [("seed", "1"), ("world_size", "2"), ("x", "3")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let current: BTreeMap<String, String> = [("seed", "1"), ("world_size", "3")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(
            setting_differences(&saved, &current),
            vec!["world_size: checkpoint has 2, this run has 3".to_string()]
        );
    }
}
