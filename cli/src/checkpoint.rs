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
//! - checksums of every tensor, of the training state and of the header ([`integrity`]),
//!   verified on every load: a damaged file is refused with what is damaged, never trained on.
//!
//! With `--keep-checkpoints N` the previous checkpoints stay beside the newest
//! ([`rotation`]); `--resume auto` (and a restart) takes the newest one that verifies.
//!
//! The data order and augmentation are pure functions of (seed, epoch, sample index), so the
//! position *is* the RNG state: resuming at `(epoch, batch)` replays exactly the batches an
//! uninterrupted run would have seen, and the rest of the run is bit-identical.
//!
//! Batch-norm buffers are rank 0's (ranks of the non-DDP modes each track their own; they
//! only affect evaluation, which uses rank 0's anyway — see `train`).

pub mod integrity;
pub mod rotation;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use engine::optim::Sgd;
use engine::state::{
    parse_tensors, read_state_file, temp_path, LoadedState, NamedTensor, StateError,
};
use engine::vgg::Vgg;

use crate::config::ResumeFrom;
use integrity::Verified;

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
    /// Truncated, unparsable, or not matching its checksums: never loaded.
    #[error("checkpoint {path} is damaged and was not loaded: {what}")]
    Damaged { path: PathBuf, what: String },
    /// `--resume auto`: every file of the rotation is damaged.
    #[error("no checkpoint to resume from is intact: {details}; move them away to start from the beginning")]
    NoneIntact { details: String },
}

impl CheckpointError {
    /// Bad input (a file that cannot be resumed from: exit 2) rather than a failure while
    /// running (a checkpoint that could not be written: exit 1).
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, CheckpointError::Save(_))
    }
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

/// A copy of the training state taken between two steps: everything a checkpoint file
/// holds, so it can be written while training goes on.
pub struct Snapshot {
    tensors: Vec<NamedTensor>,
    metadata: HashMap<String, String>,
    pub position: Position,
}

impl Snapshot {
    /// Copy model (parameters, batch-norm buffers), optimizer (momentum), position and
    /// `settings`. This copy is all a background checkpoint costs the training loop.
    pub fn take(
        model_spec: &str,
        model: &Vgg<f32>,
        sgd: &Sgd<f32>,
        position: Position,
        settings: BTreeMap<String, String>,
    ) -> Snapshot {
        let mut tensors = model.state_dict();
        tensors.extend(sgd.state_tensors(model.params()));
        let mut metadata: HashMap<String, String> = settings.into_iter().collect();
        metadata.insert("format".into(), FORMAT.into());
        metadata.insert("version".into(), VERSION.into());
        metadata.insert("model".into(), model_spec.to_string());
        metadata.insert("epoch".into(), position.epoch.to_string());
        metadata.insert("batch".into(), position.batch.to_string());
        metadata.insert("iteration".into(), position.iteration.to_string());
        Snapshot {
            tensors,
            metadata,
            position,
        }
    }

    /// Write to `path` atomically and durably, with its checksums: on failure `path` still
    /// holds what it held and no temporary file is left.
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
        self.save_keeping(path, 1)
    }

    /// [`Snapshot::save`], keeping the `keep - 1` previous checkpoints as `path.1`, ...
    /// ([`rotation::save_rotating`]). The checksums are computed here, on the writer's
    /// thread, not in [`Snapshot::take`].
    pub fn save_keeping(&self, path: &Path, keep: usize) -> Result<(), CheckpointError> {
        let mut metadata = self.metadata.clone();
        integrity::seal(&self.tensors, &mut metadata);
        rotation::save_rotating(path, keep, &self.tensors, &metadata).map_err(CheckpointError::Save)
    }
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
    Snapshot::take(model_spec, model, sgd, position, settings).save(path)
}

/// The bytes of a checkpoint file (read whole with a fallible allocation), as rank 0 reads
/// them before handing them to its peers.
pub fn read_checkpoint(path: &Path) -> Result<Vec<u8>, CheckpointError> {
    read_state_file(path).map_err(CheckpointError::Read)
}

/// Restore model, optimizer and position from a checkpoint written by [`save_training`].
/// A checkpoint of a different model (`--model`) is refused with a message saying so.
pub fn load_resume(
    path: &Path,
    model_spec: &str,
    model: &mut Vgg<f32>,
    sgd: &mut Sgd<f32>,
) -> Result<Restored, CheckpointError> {
    restore(&read_checkpoint(path)?, path, model_spec, model, sgd)
}

/// Parse the bytes of the checkpoint at `path` and check them against their checksums: a
/// truncated, unparsable or damaged file is [`CheckpointError::Damaged`], saying what is
/// damaged; a file without checksums loads with a one-line warning.
pub fn parse_verified(bytes: &[u8], path: &Path) -> Result<LoadedState, CheckpointError> {
    let damaged = |what: String| CheckpointError::Damaged {
        path: path.to_path_buf(),
        what,
    };
    let mut loaded = parse_tensors(bytes, path).map_err(|e| match e {
        StateError::Format { message, .. } => damaged(
            integrity::describe_unparsable(bytes)
                .unwrap_or_else(|| format!("not a valid safetensors file ({message})")),
        ),
        other => CheckpointError::Read(other),
    })?;
    match integrity::verify(&loaded) {
        Ok(Verified::Checked) => {}
        Ok(Verified::NoChecksums) => eprintln!(
            "dtrain: warning: {} has no checksums (an older dtrain or another program wrote it); it is loaded unverified",
            path.display()
        ),
        Err(damage) => return Err(damaged(damage.to_string())),
    }
    integrity::strip(&mut loaded.metadata);
    Ok(loaded)
}

/// [`load_resume`] from the bytes of the file at `path` (named in errors).
pub fn restore(
    bytes: &[u8],
    path: &Path,
    model_spec: &str,
    model: &mut Vgg<f32>,
    sgd: &mut Sgd<f32>,
) -> Result<Restored, CheckpointError> {
    let loaded = parse_verified(bytes, path)?;
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

/// The outcome of one background write: the position it held and whether it landed.
pub type WriteOutcome = (Position, Result<(), CheckpointError>);

/// Writes snapshots to one path on a background thread, one at a time: starting a write
/// first waits for the one in flight. Dropping the writer waits for the write in flight.
pub struct CheckpointWriter {
    path: PathBuf,
    /// `--keep-checkpoints`: how many files of the rotation a write keeps.
    keep: usize,
    jobs: Option<mpsc::Sender<Snapshot>>,
    done: mpsc::Receiver<WriteOutcome>,
    /// The outcome of a write made inline (no thread could be started).
    inline_done: Option<WriteOutcome>,
    in_flight: bool,
    thread: Option<JoinHandle<()>>,
}

impl CheckpointWriter {
    /// A writer for `path`. Fails now if its directory cannot take a file (missing, not
    /// writable), rather than at the first checkpoint; removes temporary files that writers
    /// which died (a crash mid-write, `kill -9`) left next to `path`.
    pub fn new(path: &Path, keep: usize) -> Result<CheckpointWriter, CheckpointError> {
        remove_stale_temp_files(path);
        let probe = temp_path(path, std::process::id());
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)
            .map_err(|source| {
                CheckpointError::Save(StateError::Io {
                    action: "create",
                    path: probe.clone(),
                    source,
                })
            })?;
        let _ = std::fs::remove_file(&probe);
        let (job_tx, job_rx) = mpsc::channel::<Snapshot>();
        let (done_tx, done) = mpsc::channel();
        let target = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                for snapshot in job_rx {
                    let outcome = (snapshot.position, snapshot.save_keeping(&target, keep));
                    drop(snapshot);
                    if done_tx.send(outcome).is_err() {
                        return;
                    }
                }
            });
        let (jobs, thread) = match thread {
            Ok(t) => (Some(job_tx), Some(t)),
            Err(e) => {
                eprintln!("dtrain: warning: no checkpoint writer thread ({e}); checkpoints will be written inline");
                (None, None)
            }
        };
        Ok(CheckpointWriter {
            path: path.to_path_buf(),
            keep,
            jobs,
            done,
            inline_done: None,
            in_flight: false,
            thread,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Wait for the write in flight, if any; returns its outcome.
    pub fn wait(&mut self) -> Option<WriteOutcome> {
        if !std::mem::take(&mut self.in_flight) {
            return None;
        }
        if let Some(outcome) = self.inline_done.take() {
            return Some(outcome);
        }
        Some(self.done.recv().unwrap_or_else(|_| {
            (
                Position::default(),
                Err(CheckpointError::Invalid {
                    path: self.path.clone(),
                    detail: "the checkpoint writer thread stopped".into(),
                }),
            )
        }))
    }

    /// Start writing `snapshot` once the write in flight is done; returns that one's
    /// outcome.
    pub fn start(&mut self, snapshot: Snapshot) -> Option<WriteOutcome> {
        let previous = self.wait();
        match &self.jobs {
            Some(jobs) => {
                if let Err(mpsc::SendError(snapshot)) = jobs.send(snapshot) {
                    let saved = snapshot.save_keeping(&self.path, self.keep);
                    self.inline_done = Some((snapshot.position, saved));
                }
            }
            None => {
                let saved = snapshot.save_keeping(&self.path, self.keep);
                self.inline_done = Some((snapshot.position, saved));
            }
        }
        self.in_flight = true;
        previous
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        drop(self.jobs.take()); // the thread ends after the write in flight
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Remove `path`'s temporary files ([`temp_path`], and the rotation's staged file's own
/// `<path>.tmp.<pid>.tmp.<pid>`) whose writer process no longer runs.
fn remove_stale_temp_files(path: &Path) {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return;
    };
    let prefix = format!("{name}.tmp.");
    let dir = rotation::dir_of(path);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(pid) = file_name
            .to_str()
            .and_then(|n| n.strip_prefix(&prefix))
            .and_then(|p| p.split('.').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let alive = pid as u32 != std::process::id()
            && nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None)
                .map_or_else(|e| e != nix::errno::Errno::ESRCH, |_| true);
        if !alive && std::fs::remove_file(entry.path()).is_ok() {
            eprintln!(
                "dtrain: removed {}, left by an interrupted checkpoint write",
                entry.path().display()
            );
        }
    }
}

/// Rank 0's checkpoints to `--save-checkpoint`: periodic (`--checkpoint-every`) and
/// epoch-end ones are written in the background — a failed one is reported as a warning
/// and the previous checkpoint stays; the next one tries again — while the end-of-run one is
/// waited for, and its failure is the run's error.
pub struct Checkpoints {
    writer: CheckpointWriter,
    model_spec: String,
    settings: BTreeMap<String, String>,
}

impl Checkpoints {
    /// Checkpoints to `path`, keeping `keep` files of its rotation (`--keep-checkpoints`).
    pub fn new(
        path: &Path,
        keep: usize,
        model_spec: &str,
        settings: BTreeMap<String, String>,
    ) -> Result<Checkpoints, CheckpointError> {
        Ok(Checkpoints {
            writer: CheckpointWriter::new(path, keep)?,
            model_spec: model_spec.to_string(),
            settings,
        })
    }

    /// Start a background checkpoint of the state at `at`.
    pub fn save_in_background(&mut self, model: &Vgg<f32>, sgd: &Sgd<f32>, at: Position) {
        let snapshot = Snapshot::take(&self.model_spec, model, sgd, at, self.settings.clone());
        let previous = self.writer.start(snapshot);
        self.warn_on_failure(previous);
    }

    /// The end-of-run checkpoint of the state at `at`: waits for the write in flight, writes
    /// `at` unless that write already held it, and fails if the file does not hold `at`.
    pub fn save_final(
        &mut self,
        model: &Vgg<f32>,
        sgd: &Sgd<f32>,
        at: Position,
    ) -> Result<(), CheckpointError> {
        match self.writer.wait() {
            Some((pos, Ok(()))) if pos == at => return Ok(()),
            previous => self.warn_on_failure(previous),
        }
        let snapshot = Snapshot::take(&self.model_spec, model, sgd, at, self.settings.clone());
        self.writer.start(snapshot);
        match self.writer.wait() {
            Some((_, result)) => result,
            None => Ok(()),
        }
    }

    fn warn_on_failure(&self, outcome: Option<WriteOutcome>) {
        if let Some((pos, Err(e))) = outcome {
            eprintln!(
                "dtrain: warning: the checkpoint of iteration {} was not saved ({e}); {} keeps the previous one and the next checkpoint tries again",
                pos.iteration,
                self.writer.path().display()
            );
        }
    }
}

/// Where a run starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResumeSource {
    /// From the seed (or `--init-checkpoint`); `why` says why nothing was resumed when a
    /// resume was asked for (`--resume auto`, a restart).
    Fresh { why: Option<String> },
    /// From this checkpoint file (`--resume FILE`): damaged is an error.
    File(PathBuf),
    /// From the newest of these files of the `--save-checkpoint` rotation (newest first)
    /// that is intact ([`resume_newest`]).
    Newest(Vec<PathBuf>),
}

/// The checkpoint a run resumes from. A restart (`restart_count` > 0, from
/// `TORCHELASTIC_RESTART_COUNT`) or `--resume auto` resumes from the `--save-checkpoint`
/// rotation (`keep` files) when one of its files exists; otherwise `--resume FILE` is used
/// if given, else the run starts fresh.
pub fn resume_source(
    resume: Option<&ResumeFrom>,
    save_checkpoint: Option<&Path>,
    keep: usize,
    restart_count: usize,
) -> ResumeSource {
    let auto = restart_count > 0 || resume == Some(&ResumeFrom::Auto);
    if auto {
        let files = save_checkpoint.map_or_else(Vec::new, |p| rotation::existing(p, keep));
        if !files.is_empty() {
            return ResumeSource::Newest(files);
        }
    }
    if let Some(ResumeFrom::File(path)) = resume {
        return ResumeSource::File(path.clone());
    }
    let why = auto.then(|| match save_checkpoint {
        Some(path) => format!("no checkpoint at {} yet", path.display()),
        None => "no --save-checkpoint to resume from".to_string(),
    });
    ResumeSource::Fresh { why }
}

/// The newest of `candidates` (newest first) that `load` accepts, with its bytes: a file
/// that cannot be read or is damaged is reported on stderr and the next older one is tried;
/// any other error of `load` (another model, ...) is the answer. The damaged files newer than
/// the one resumed are moved aside ([`rotation::damaged_path`]) so that the next saves
/// rotate good files, not them.
pub fn resume_newest<T>(
    candidates: &[PathBuf],
    mut load: impl FnMut(&Path, &[u8]) -> Result<T, CheckpointError>,
) -> Result<(PathBuf, Vec<u8>, T), CheckpointError> {
    let mut damaged: Vec<(&Path, String)> = Vec::new();
    for (i, path) in candidates.iter().enumerate() {
        let outcome = read_checkpoint(path).and_then(|bytes| Ok((load(path, &bytes)?, bytes)));
        match outcome {
            Ok((loaded, bytes)) => {
                move_aside(&damaged);
                return Ok((path.clone(), bytes, loaded));
            }
            Err(e @ (CheckpointError::Damaged { .. } | CheckpointError::Read(_))) => {
                let next = match candidates.get(i + 1) {
                    Some(older) => format!("falling back to the previous one, {}", older.display()),
                    None => "no older checkpoint is left".to_string(),
                };
                eprintln!("dtrain: {e}; {next}");
                damaged.push((path, e.to_string()));
            }
            Err(e) => return Err(e),
        }
    }
    let details: Vec<String> = damaged.into_iter().map(|(_, e)| e).collect();
    Err(CheckpointError::NoneIntact {
        details: details.join("; "),
    })
}

/// Rename each damaged file to its [`rotation::damaged_path`], saying so.
fn move_aside(damaged: &[(&Path, String)]) {
    for (path, _) in damaged {
        if !path.exists() {
            continue;
        }
        let aside = rotation::damaged_path(path);
        match std::fs::rename(path, &aside) {
            Ok(()) => eprintln!(
                "dtrain: moved the damaged {} to {} (kept for inspection, out of the rotation)",
                path.display(),
                aside.display()
            ),
            Err(e) => eprintln!(
                "dtrain: warning: cannot move the damaged {} aside ({e}); the next checkpoint rotates it",
                path.display()
            ),
        }
    }
}

/// Load weights (and batch-norm buffers) from a PyTorch `state_dict` saved with
/// `safetensors.torch.save_file(model.state_dict(), path)` from the original `model.py`, or
/// from a dtrain checkpoint (its optimizer state and position are ignored). The file is
/// verified as a resume is ([`parse_verified`]).
pub fn load_init(path: &Path, model: &mut Vgg<f32>) -> Result<(), String> {
    let bytes = read_checkpoint(path).map_err(|e| e.to_string())?;
    let loaded = parse_verified(&bytes, path).map_err(|e| e.to_string())?;
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
    use crate::model::{build_model, parameter_hash};
    use engine::state::save_tensors;
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

    #[test]
    fn resume_source_follows_the_restart_rules() {
        let dir = temp_dir();
        let saved = dir.join("saved.safetensors");
        let missing = dir.join("missing.safetensors");
        std::fs::write(&saved, b"x").unwrap();
        let given = ResumeFrom::File(PathBuf::from("given.safetensors"));
        let file = |p: &Path| ResumeSource::File(p.to_path_buf());
        let newest = |p: &Path| ResumeSource::Newest(vec![p.to_path_buf()]);
        let fresh = |why: &str| ResumeSource::Fresh {
            why: Some(why.to_string()),
        };
        let no_ckpt = format!("no checkpoint at {} yet", missing.display());
        let cases: Vec<(Option<&ResumeFrom>, Option<&Path>, usize, ResumeSource)> = vec![
            (None, None, 0, ResumeSource::Fresh { why: None }),
            (None, Some(&saved), 0, ResumeSource::Fresh { why: None }),
            (Some(&given), None, 0, file(Path::new("given.safetensors"))),
            // --resume FILE keeps its meaning on a first attempt...
            (
                Some(&given),
                Some(&saved),
                0,
                file(Path::new("given.safetensors")),
            ),
            // ...a restart prefers the newer --save-checkpoint file, if there is one.
            (Some(&given), Some(&saved), 1, newest(&saved)),
            (
                Some(&given),
                Some(&missing),
                1,
                file(Path::new("given.safetensors")),
            ),
            (Some(&ResumeFrom::Auto), Some(&saved), 0, newest(&saved)),
            (Some(&ResumeFrom::Auto), Some(&missing), 0, fresh(&no_ckpt)),
            (None, Some(&saved), 3, newest(&saved)),
            (None, Some(&missing), 1, fresh(&no_ckpt)),
            (None, None, 2, fresh("no --save-checkpoint to resume from")),
        ];
        for (resume, save, restart, want) in cases {
            assert_eq!(
                resume_source(resume, save, 2, restart),
                want,
                "{resume:?} {save:?} restart {restart}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A pid no process has (for a leftover temp file of a dead writer).
    fn dead_pid() -> u32 {
        (400_000..)
            .find(|&p: &u32| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), None)
                    == Err(nix::errno::Errno::ESRCH)
            })
            .unwrap()
    }

    #[test]
    fn background_checkpoints_land_one_at_a_time_and_the_final_one_is_waited_for() {
        let dir = temp_dir();
        let path = dir.join("run.safetensors");
        // Leftovers: a dead writer's (removed), a live process's (pid 1, kept).
        let dead = temp_path(&path, dead_pid());
        let live = temp_path(&path, 1);
        std::fs::write(&dead, b"partial").unwrap();
        std::fs::write(&live, b"partial").unwrap();
        let (model, sgd) = trained("4,M", 1);
        let mut c = Checkpoints::new(&path, 1, "4,M", BTreeMap::new()).unwrap();
        assert!(!dead.exists() && live.exists());
        std::fs::remove_file(&live).unwrap();
        for it in 1..=3 {
            let at = Position {
                epoch: 0,
                batch: it,
                iteration: it,
            };
            c.save_in_background(&model, &sgd, at);
        }
        let last = Position {
            epoch: 0,
            batch: 3,
            iteration: 3,
        };
        // The write in flight already holds the final position: nothing is written twice.
        c.save_final(&model, &sgd, last).unwrap();
        let mut m = build_model("4,M", 9).unwrap();
        let mut s = Sgd::new(0.05, 0.9, 1e-4);
        assert_eq!(
            load_resume(&path, "4,M", &mut m, &mut s).unwrap().position,
            last
        );
        assert_eq!(parameter_hash(&m), parameter_hash(&model));
        let end = Position {
            epoch: 1,
            batch: 0,
            iteration: 4,
        };
        c.save_final(&model, &sgd, end).unwrap();
        assert_eq!(
            load_resume(&path, "4,M", &mut m, &mut s).unwrap().position,
            end
        );
        drop(c);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn failed_checkpoints_warn_in_the_background_and_fail_at_the_end() {
        let dir = temp_dir();
        let sub = dir.join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let path = sub.join("run.safetensors");
        let (model, sgd) = trained("4,M", 1);
        let mut c = Checkpoints::new(&path, 1, "4,M", BTreeMap::new()).unwrap();
        // The folder disappears under the writer: every write now fails.
        std::fs::remove_dir_all(&sub).unwrap();
        let at = Position::default();
        c.save_in_background(&model, &sgd, at);
        let e = c.save_final(&model, &sgd, at).unwrap_err();
        assert!(e.to_string().contains("cannot save checkpoint"), "{e}");
        assert!(e.to_string().contains("run.safetensors.tmp."), "{e}");
        // A folder that does not exist is refused when the writer is made.
        let e = Checkpoints::new(&path, 1, "4,M", BTreeMap::new())
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot create"), "{e}");
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
