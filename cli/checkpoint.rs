//! Checkpoints: save each epoch and at the end, resume exactly, import PyTorch weights.
//!
//! A checkpoint is one safetensors file written with [`engine::state::save_tensors`] (temp
//! file in the same directory, then rename: a crash leaves the previous checkpoint intact):
//! - the model's `state_dict` under PyTorch names (`layers.0.weight`, ...,
//!   `layers.1.running_mean`, `layers.1.num_batches_tracked` (I64), `fc1.weight`, ...), so the
//!   file loads into the original `model.py` with `load_state_dict(..., strict=False)`;
//! - SGD momentum buffers as `optimizer.momentum_buffer.<param name>`;
//! - string metadata: `format=dtrain-checkpoint`, `version`, `model` (the layer spec), the
//!   position (`epoch`, `batch` = next batch within that epoch, `iteration` = completed
//!   iterations) and the settings that fix data order and optimisation (`seed`, `world_size`,
//!   `batch_size`, ...).
//!
//! The data order and augmentation are pure functions of (seed, epoch, sample index), so the
//! position *is* the RNG state: resuming at `(epoch, batch)` replays exactly the batches an
//! uninterrupted run would have seen, and the rest of the run is bit-identical.
//!
//! Batch-norm buffers are rank 0's (ranks of the non-DDP modes each track their own; they
//! only affect evaluation, which uses rank 0's anyway — see `train`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use engine::optim::Sgd;
use engine::state::{load_tensors, save_tensors, StateError};
use engine::vgg::Vgg;

const FORMAT: &str = "dtrain-checkpoint";
const VERSION: &str = "1";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot save checkpoint: {0}")]
    Save(StateError),
    #[error("cannot read checkpoint: {0}")]
    Read(StateError),
    #[error("checkpoint {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
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

impl Position {
    /// Where training stands after one more batch of this epoch.
    pub fn after_batch(self) -> Position {
        Position {
            batch: self.batch + 1,
            iteration: self.iteration + 1,
            ..self
        }
    }

    /// The start of the next epoch.
    pub fn next_epoch(self) -> Position {
        Position {
            epoch: self.epoch + 1,
            batch: 0,
            ..self
        }
    }
}

/// What a resume restored besides the model and optimizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    pub position: Position,
    pub settings: BTreeMap<String, String>,
}

/// Save model, optimizer, position and `settings` to `path` atomically.
pub fn save_training(
    path: &Path,
    model_spec: &str,
    model: &Vgg<f32>,
    sgd: &Sgd<f32>,
    position: Position,
    settings: BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let mut tensors = model.state_dict();
    tensors.extend(sgd.state_tensors(model.params()));
    let mut meta: HashMap<String, String> = settings.into_iter().collect();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("version".into(), VERSION.into());
    meta.insert("model".into(), model_spec.to_string());
    meta.insert("epoch".into(), position.epoch.to_string());
    meta.insert("batch".into(), position.batch.to_string());
    meta.insert("iteration".into(), position.iteration.to_string());
    save_tensors(path, &tensors, &meta).map_err(CheckpointError::Save)
}

/// Restore model, optimizer and position from a checkpoint written by [`save_training`].
/// A checkpoint of a different model (`--model`) is refused with a message saying so.
pub fn load_resume(
    path: &Path,
    model_spec: &str,
    model: &mut Vgg<f32>,
    sgd: &mut Sgd<f32>,
) -> Result<Restored, CheckpointError> {
    let loaded = load_tensors(path).map_err(CheckpointError::Read)?;
    let invalid = |detail: String| CheckpointError::Invalid {
        path: path.to_path_buf(),
        detail,
    };
    let mut meta = loaded.metadata;
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(invalid(
            "not a dtrain checkpoint (no format=dtrain-checkpoint metadata); \
             to start from PyTorch weights use --init-checkpoint"
                .into(),
        ));
    }
    if meta.get("version").map(String::as_str) != Some(VERSION) {
        return Err(invalid(format!(
            "unsupported checkpoint version {:?} (this build reads {VERSION})",
            meta.get("version")
        )));
    }
    let saved_model = meta.remove("model").unwrap_or_default();
    if !saved_model.eq_ignore_ascii_case(model_spec) {
        return Err(invalid(format!(
            "it was saved for --model {saved_model:?} but this run uses --model {model_spec:?}"
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
    meta.remove("format");
    meta.remove("version");
    // Model tensors are everything but the optimizer's.
    let model_tensors: BTreeMap<_, _> = loaded
        .tensors
        .iter()
        .filter(|(k, _)| !k.starts_with(engine::optim::MOMENTUM_PREFIX))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    model
        .load_state_dict(&model_tensors, true)
        .map_err(|e| invalid(e.to_string()))?;
    sgd.load_state_tensors(model.params(), &loaded.tensors)
        .map_err(|e| invalid(e.to_string()))?;
    Ok(Restored {
        position,
        settings: meta.into_iter().collect(),
    })
}

/// Load weights (and batch-norm buffers) from a PyTorch `state_dict` saved with
/// `safetensors.torch.save_file(model.state_dict(), path)` from the original `model.py`, or
/// from a dtrain checkpoint (its optimizer state and position are ignored).
pub fn load_init(path: &Path, model: &mut Vgg<f32>) -> Result<(), String> {
    let loaded = load_tensors(path).map_err(|e| e.to_string())?;
    let model_tensors: BTreeMap<_, _> = loaded
        .tensors
        .into_iter()
        .filter(|(k, _)| !k.starts_with(engine::optim::MOMENTUM_PREFIX))
        .collect();
    model
        .load_state_dict(&model_tensors, true)
        .map_err(|e| e.to_string())
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
    use crate::train::{build_model, parameter_hash};
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

    /// A tiny model after two SGD steps on a fixed batch (so momentum and BN stats are set).
    fn trained(spec: &str, seed: u64) -> (Vgg<f32>, Sgd<f32>) {
        let mut model = build_model(spec, seed).unwrap();
        let mut sgd = Sgd::new(0.05, 0.9, 1e-4);
        let n = 2;
        let x: Vec<f32> = (0..n * 3 * 32 * 32)
            .map(|i| ((i * 37 % 101) as f32) / 50.0 - 1.0)
            .collect();
        for _ in 0..2 {
            model
                .forward_backward(&x, n, &[3, 7], &mut |_, _| {})
                .unwrap();
            sgd.step(model.params_mut());
        }
        (model, sgd)
    }

    #[test]
    fn save_then_resume_restores_everything() {
        let dir = temp_dir();
        let path = dir.join("run.safetensors");
        let (model, sgd) = trained("4,M", 1);
        let pos = Position {
            epoch: 2,
            batch: 17,
            iteration: 95,
        };
        let settings: BTreeMap<String, String> = [("seed".to_string(), "7".to_string())].into();
        save_training(&path, "4,M", &model, &sgd, pos, settings.clone()).unwrap();
        // Only the checkpoint is left in the directory (no temporary file).
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);

        let mut fresh = build_model("4,M", 99).unwrap();
        let mut fresh_sgd = Sgd::new(0.05, 0.9, 1e-4);
        let restored = load_resume(&path, "4,M", &mut fresh, &mut fresh_sgd).unwrap();
        assert_eq!(restored.position, pos);
        assert_eq!(restored.settings, settings);
        assert_eq!(parameter_hash(&fresh), parameter_hash(&model));
        for (a, b) in fresh.bn_buffers().iter().zip(model.bn_buffers()) {
            assert_eq!(a.running_mean, b.running_mean);
            assert_eq!(a.running_var, b.running_var);
            assert_eq!(a.num_batches_tracked, b.num_batches_tracked);
        }
        for i in 0..model.params().len() {
            assert_eq!(fresh_sgd.momentum_buffer(i), sgd.momentum_buffer(i));
            assert!(sgd.momentum_buffer(i).is_some());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn resume_refuses_another_model_and_non_checkpoints() {
        let dir = temp_dir();
        let path = dir.join("c.safetensors");
        let (model, sgd) = trained("4,M", 1);
        save_training(
            &path,
            "4,M",
            &model,
            &sgd,
            Position::default(),
            BTreeMap::new(),
        )
        .unwrap();
        let mut other = build_model("8,M", 1).unwrap();
        let mut other_sgd = Sgd::new(0.05, 0.9, 1e-4);
        let e = load_resume(&path, "8,M", &mut other, &mut other_sgd).unwrap_err();
        assert!(e.to_string().contains("saved for --model \"4,M\""), "{e}");

        // A plain state_dict (as PyTorch would save) is refused by resume, accepted by init.
        let plain = dir.join("plain.safetensors");
        save_tensors(&plain, &model.state_dict(), &HashMap::new()).unwrap();
        let mut m = build_model("4,M", 5).unwrap();
        let e = load_resume(&plain, "4,M", &mut m, &mut other_sgd).unwrap_err();
        assert!(e.to_string().contains("--init-checkpoint"), "{e}");
        load_init(&plain, &mut m).unwrap();
        assert_eq!(parameter_hash(&m), parameter_hash(&model));

        let garbage = dir.join("garbage.safetensors");
        std::fs::write(&garbage, b"not a checkpoint").unwrap();
        assert!(load_init(&garbage, &mut m).is_err());
        let missing = load_resume(&dir.join("nope"), "4,M", &mut m, &mut other_sgd).unwrap_err();
        assert!(missing.to_string().contains("nope"), "{missing}");
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
