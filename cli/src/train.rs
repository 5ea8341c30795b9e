//! The training loop of `dtrain`: setup, the four sync modes, logs, metrics, evaluation,
//! checkpoints.
//!
//! # What is printed (stdout), and by whom
//! Every rank prints its own lines, as each process of the original scripts does:
//! - every `--log-every` iterations:
//!   `Training Iteration: {i} [{i*len}/{n} ({pct:.0}%)]\tLoss: {loss:.6}` where, as the
//!   original's `batch_idx`, `batch_idx * len(data)`, `len(train_loader.dataset)` and
//!   `100. * batch_idx / len(train_loader)`: `i` is the batch index within the epoch, `len`
//!   the batch size, `n` the size of the whole training set (not of this rank's shard: with a
//!   DistributedSampler, PyTorch's `len(train_loader.dataset)` is the full dataset) and `pct`
//!   the share of this rank's batches done. `loss` is this rank's own batch loss.
//! - at the end: `Average time for {N} iterations: {secs:.4}s`, the mean wall time of this
//!   process's iterations except the first (warm-up), `N` being how many were averaged;
//!   then `Parameter hash: 0x{fnv1a64 of all parameter bytes}` (equal on every rank).
//!
//! Rank 0 alone prints the evaluation after each epoch, every `--eval-every` iterations
//! (unless that is an epoch's end) and after a run cut short by `--max-iters`: `Test set: Average loss: {:.4}, Accuracy: {c}/{n} ({pct:.0}%)` followed by
//! an empty line, as the original. The test set is sharded across ranks and the loss sum and
//! correct count are summed with one all-reduce, so each rank evaluates 1/N of it. The
//! evaluated model is rank 0's: parameters are equal everywhere and rank 0's batch-norm
//! running statistics are broadcast for the evaluation (then each rank's own are restored).
//! "Average loss" is the mean per-sample cross-entropy over the test set (the original
//! averages batch means, which is the same when every batch is full), without label
//! smoothing. With `--save-best FILE`, rank 0 writes a checkpoint there (the state right
//! after the step the evaluation followed, plus `test_accuracy`/`test_loss` metadata)
//! whenever the test accuracy beats every earlier evaluation of the run (a resumed run
//! reads the best so far back from FILE).
//!
//! # Learning rate
//! Before each step the schedule ([`crate::recipe`]) sets the optimizer's rate (and with
//! onecycle its momentum) for the iteration about to run: a pure function of the iteration
//! count, so a resumed run continues the schedule exactly.
//!
//! # Metrics (`--metrics FILE`, rank 0 only)
//! One JSON object per line, flushed as written:
//! `{"iteration":I,"epoch":E,"batch":B,"loss":L,"lr":LR,"seconds":S,"images_per_s":R,
//! "comm_seconds":C,"cpu_seconds":P}`
//! per iteration (`I` counts completed iterations from the start of the run, so it continues
//! across a resume; `R` counts the images of all ranks; `C` is the time this rank spent in
//! gradient/buffer synchronisation outside of compute; `cpu_seconds` is the CPU time the whole
//! process (compute, loader and communication threads) used during the iteration, a number
//! that stays meaningful on a shared machine), and
//! `{"iteration":I,"epoch":E,"test_loss":L,"test_accuracy":A}` per evaluation (`A` in [0, 1],
//! `I` the iterations completed before it, `E` the epoch it evaluated).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use engine::optim::Sgd;
use engine::vgg::Vgg;

use crate::args::TrainConfig;
use crate::checkpoint::{self, CheckpointError, Checkpoints, Position, ResumeSource};
use crate::data::{self, DataError, DataSplit, TrainLoader};
pub use crate::model::{build_model, parameter_hash, ModelError};
use crate::sync::{GradSync, StepStats, SyncError};

/// Why training stopped with an error. Every message is meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(#[from] DataError),
    #[error("rank {rank}: {source}")]
    Sync { rank: usize, source: SyncError },
    #[error("{0}")]
    Model(#[from] ModelError),
    #[error("{0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot use --init-checkpoint {path}: {reason}")]
    InitCheckpoint { path: PathBuf, reason: String },
    /// A schedule the run's length does not allow (a usage error: exit code 2).
    #[error("{0}")]
    Schedule(String),
    #[error("cannot write metrics file {path}: {source}")]
    Metrics {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl TrainError {
    /// 2 for bad input (a checkpoint that cannot be used, bad flags found only once the
    /// dataset size is known), 1 for a failure while running.
    pub fn exit_code(&self) -> u8 {
        match self {
            TrainError::Checkpoint(e) if e.is_bad_input() => 2,
            TrainError::InitCheckpoint { .. } | TrainError::Schedule(_) => 2,
            _ => 1,
        }
    }

    /// A failed step or collective of rank `rank`.
    fn sync(rank: usize) -> impl Fn(SyncError) -> TrainError {
        move |source| TrainError::Sync { rank, source }
    }

    /// A failed collective of rank `rank`.
    fn comm(rank: usize) -> impl Fn(transport::Error) -> TrainError {
        move |e| TrainError::Sync {
            rank,
            source: SyncError::Comm(e),
        }
    }
}

/// The original's per-iteration log line.
pub fn iteration_line(
    batch_idx: usize,
    batch_size: usize,
    dataset_len: usize,
    batches: usize,
    loss: f64,
) -> String {
    let pct = 100.0 * batch_idx as f64 / batches.max(1) as f64;
    format!(
        "Training Iteration: {batch_idx} [{}/{dataset_len} ({pct:.0}%)]\tLoss: {loss:.6}",
        batch_idx * batch_size
    )
}

/// The original's evaluation line (without the trailing empty line).
pub fn test_line(avg_loss: f64, correct: usize, total: usize) -> String {
    let pct = 100.0 * correct as f64 / total.max(1) as f64;
    format!("Test set: Average loss: {avg_loss:.4}, Accuracy: {correct}/{total} ({pct:.0}%)")
}

/// `--metrics` writer (rank 0 only; a no-op elsewhere).
struct Metrics {
    out: Option<(PathBuf, std::io::BufWriter<std::fs::File>)>,
}

impl Metrics {
    /// Append when the run continues an earlier one (`resumed`), so one file holds the
    /// whole run; truncate otherwise.
    fn open(cfg: &TrainConfig, resumed: bool) -> Result<Metrics, TrainError> {
        let Some(path) = cfg.opts.metrics.as_ref().filter(|_| cfg.rank == 0) else {
            return Ok(Metrics { out: None });
        };
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(resumed)
            .truncate(!resumed)
            .open(path)
            .map_err(|source| TrainError::Metrics {
                path: path.clone(),
                source,
            })?;
        Ok(Metrics {
            out: Some((path.clone(), std::io::BufWriter::new(file))),
        })
    }

    fn write(&mut self, line: String) -> Result<(), TrainError> {
        if let Some((path, w)) = &mut self.out {
            writeln!(w, "{line}")
                .and_then(|_| w.flush())
                .map_err(|source| TrainError::Metrics {
                    path: path.clone(),
                    source,
                })?;
        }
        Ok(())
    }
}

/// CPU time used by this process so far (all its threads), in seconds; 0 if unavailable.
/// Reported next to wall time because the machines we measure on are often shared.
fn process_cpu_seconds() -> f64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_PROCESS_CPUTIME_ID)
        .map(|t| t.tv_sec() as f64 + t.tv_nsec() as f64 * 1e-9)
        .unwrap_or(0.0)
}

/// JSON has no NaN/inf: write them as null.
fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// Settings recorded in checkpoints; a resume with different values warns (data order or
/// optimisation would differ from the interrupted run).
fn run_settings(cfg: &TrainConfig) -> BTreeMap<String, String> {
    let o = &cfg.opts;
    [
        ("seed", o.seed.to_string()),
        ("world_size", cfg.num_nodes.to_string()),
        ("batch_size", o.batch_size.to_string()),
        ("dataset", o.dataset.name().to_string()),
        ("shuffle", cfg.shuffle().to_string()),
        ("augment", cfg.augment().to_string()),
        ("lr", o.lr.to_string()),
        ("momentum", o.momentum.to_string()),
        ("weight_decay", o.weight_decay.to_string()),
        ("mode", o.mode.name().to_string()),
    ]
    .into_iter()
    .chain(o.recipe.settings())
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The model and optimizer a run starts from: fresh from the seed, or with
/// `--init-checkpoint` weights.
fn initial_state(cfg: &TrainConfig) -> Result<(Vgg<f32>, Sgd<f32>), TrainError> {
    let o = &cfg.opts;
    let mut model = build_model(&o.model, o.seed)?;
    model.set_label_smoothing(o.recipe.label_smoothing);
    model.set_precision(o.precision);
    let sgd = Sgd::new(o.lr as f64, o.momentum as f64, o.weight_decay as f64)
        .with_nesterov(o.recipe.nesterov, o.recipe.dampening);
    if let Some(path) = &o.init_checkpoint {
        checkpoint::load_init(path, &mut model).map_err(|reason| TrainError::InitCheckpoint {
            path: path.clone(),
            reason,
        })?;
    }
    Ok((model, sgd))
}

/// A checkpoint being resumed: where it came from and its bytes (for rank 0's peers).
struct Resumed {
    path: PathBuf,
    bytes: Vec<u8>,
}

/// `restart N: ` on restarted ranks, for the lines about resuming.
fn restart_tag(cfg: &TrainConfig) -> String {
    match cfg.restart_count {
        0 => String::new(),
        n => format!("restart {n}: "),
    }
}

/// Restore `bytes` (of the file at `path`) into model and optimizer, warn about changed
/// settings, and say so.
fn restore(
    cfg: &TrainConfig,
    path: &Path,
    bytes: &[u8],
    model: &mut Vgg<f32>,
    sgd: &mut Sgd<f32>,
) -> Result<Position, CheckpointError> {
    let restored = checkpoint::restore(bytes, path, &cfg.opts.model, model, sgd)?;
    for diff in checkpoint::setting_differences(&restored.settings, &run_settings(cfg)) {
        eprintln!("dtrain: warning: resuming with a different setting ({diff}); the run will not match an uninterrupted one");
    }
    let p = restored.position;
    let from = match cfg.rank {
        0 => path.display().to_string(),
        _ => format!("rank 0's checkpoint {}", path.display()),
    };
    eprintln!(
        "dtrain: {}resuming from {from} at epoch {}, batch {} (iteration {})",
        restart_tag(cfg),
        p.epoch,
        p.batch,
        p.iteration
    );
    Ok(p)
}

/// Rank 0 picks the checkpoint to resume from ([`checkpoint::resume_source`]), reads it and
/// restores it before the rendezvous, so a bad file fails before anyone waits. Only rank 0
/// reads checkpoints (it alone writes them); its peers get the same bytes in
/// [`share_resume`].
fn resume_on_rank0(
    cfg: &TrainConfig,
    model: &mut Vgg<f32>,
    sgd: &mut Sgd<f32>,
) -> Result<Option<(Resumed, Position)>, TrainError> {
    if cfg.rank != 0 {
        return Ok(None);
    }
    let o = &cfg.opts;
    let source = checkpoint::resume_source(
        o.resume.as_ref(),
        o.save_checkpoint.as_deref(),
        o.keep_checkpoints,
        cfg.restart_count,
    );
    match source {
        ResumeSource::Fresh { why } => {
            if let Some(why) = why {
                eprintln!(
                    "dtrain: {}{why}; starting from the beginning",
                    restart_tag(cfg)
                );
            }
            Ok(None)
        }
        ResumeSource::File(path) => {
            let bytes = checkpoint::read_checkpoint(&path)?;
            let at = restore(cfg, &path, &bytes, model, sgd)?;
            Ok(Some((Resumed { path, bytes }, at)))
        }
        ResumeSource::Newest(files) => {
            let (path, bytes, at) = checkpoint::resume_newest(&files, |path, bytes| {
                restore(cfg, path, bytes, model, sgd)
            })?;
            Ok(Some((Resumed { path, bytes }, at)))
        }
    }
}

/// After the rendezvous: rank 0's resume checkpoint (or none) on every rank, so all ranks
/// continue from the same state wherever the file lives. Returns the start position.
fn share_resume(
    cfg: &TrainConfig,
    sync: &mut GradSync,
    model: &mut Vgg<f32>,
    sgd: &mut Sgd<f32>,
    rank0: Option<(Resumed, Position)>,
) -> Result<Option<Position>, TrainError> {
    let (mut resumed, at) = match rank0 {
        Some((r, at)) => (r, Some(at)),
        None => (
            Resumed {
                path: PathBuf::new(),
                bytes: Vec::new(),
            },
            None,
        ),
    };
    // The path travels with the bytes, for the message.
    let mut path = resumed.path.to_string_lossy().into_owned().into_bytes();
    sync.broadcast_bytes(&mut path)
        .and_then(|_| sync.broadcast_bytes(&mut resumed.bytes))
        .map_err(TrainError::comm(cfg.rank))?;
    if cfg.rank == 0 || resumed.bytes.is_empty() {
        return Ok(at);
    }
    resumed.path = PathBuf::from(String::from_utf8_lossy(&path).into_owned());
    Ok(Some(restore(
        cfg,
        &resumed.path,
        &resumed.bytes,
        model,
        sgd,
    )?))
}

/// What a rank prints and records while training: log lines, the progress line, metrics,
/// iteration times.
struct RunLog {
    rank: usize,
    world: usize,
    log_every: usize,
    batch_size: usize,
    dataset_len: usize,
    progress: bool,
    metrics: Metrics,
    /// Per iteration: wall seconds and seconds spent waiting for collectives.
    iter_times: Vec<(f64, f64)>,
}

impl RunLog {
    fn open(cfg: &TrainConfig, dataset_len: usize, resumed: bool) -> Result<RunLog, TrainError> {
        Ok(RunLog {
            rank: cfg.rank,
            world: cfg.num_nodes,
            log_every: cfg.opts.log_every,
            batch_size: cfg.opts.batch_size,
            dataset_len,
            progress: cfg.progress,
            metrics: Metrics::open(cfg, resumed)?,
            iter_times: Vec::new(),
        })
    }

    /// One finished iteration: batch `at.batch` of epoch `at.epoch` (of `batches`), which
    /// started at `t0` / `cpu0` and brought the run to `iteration` completed iterations.
    fn iteration(
        &mut self,
        at: Position,
        batches: usize,
        images: usize,
        stats: StepStats,
        lr: f64,
        (t0, cpu0): (Instant, f64),
    ) -> Result<(), TrainError> {
        let secs = t0.elapsed().as_secs_f64();
        let cpu_secs = process_cpu_seconds() - cpu0;
        self.iter_times.push((secs, stats.comm_time.as_secs_f64()));
        let (epoch, batch_idx, iteration) = (at.epoch, at.batch, at.iteration + 1);
        let mut out = std::io::stdout().lock();
        if batch_idx % self.log_every == 0 {
            let line = iteration_line(
                batch_idx,
                self.batch_size,
                self.dataset_len,
                batches,
                stats.loss,
            );
            if self.progress {
                // Clear the progress line first.
                let _ = write!(out, "\r\x1b[2K");
            }
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
        let images_per_s = (images * self.world) as f64 / secs.max(1e-9);
        if self.progress {
            let _ = write!(
                out,
                "\repoch {epoch} batch {}/{batches} loss {:.4} {images_per_s:.1} img/s",
                batch_idx + 1,
                stats.loss,
            );
            let _ = out.flush();
        }
        drop(out);
        self.metrics.write(format!(
            "{{\"iteration\":{iteration},\"epoch\":{epoch},\"batch\":{batch_idx},\"loss\":{},\"lr\":{},\"seconds\":{},\"images_per_s\":{},\"comm_seconds\":{},\"cpu_seconds\":{}}}",
            json_num(stats.loss),
            json_num(lr),
            json_num(secs),
            json_num(images_per_s),
            json_num(stats.comm_time.as_secs_f64()),
            json_num(cpu_secs)
        ))
    }

    /// The end of an epoch's batches (finished or cut short).
    fn end_epoch(&self) {
        if self.progress {
            println!();
        }
    }

    /// Rank 0's evaluation result, after `at.iteration` iterations, of epoch `epoch`.
    fn test_result(
        &mut self,
        at: Position,
        epoch: usize,
        e: &TestResult,
    ) -> Result<(), TrainError> {
        if self.rank != 0 {
            return Ok(());
        }
        println!("{}\n", test_line(e.avg_loss, e.correct, e.seen));
        self.metrics.write(format!(
            "{{\"iteration\":{},\"epoch\":{epoch},\"test_loss\":{},\"test_accuracy\":{}}}",
            at.iteration,
            json_num(e.avg_loss),
            json_num(e.accuracy())
        ))
    }

    /// The closing lines: mean iteration time (without the warm-up) and the parameter hash.
    fn finish(&self, model: &Vgg<f32>) {
        if self.iter_times.len() > 1 {
            let timed = &self.iter_times[1..];
            let count = timed.len() as f64;
            let mean = timed.iter().map(|t| t.0).sum::<f64>() / count;
            println!("Average time for {} iterations: {mean:.4}s", timed.len());
            if self.world > 1 {
                // The communication the step could not hide: DDP's waits for buckets after
                // backward, or the whole exchange of the per-parameter modes.
                let comm = timed.iter().map(|t| t.1).sum::<f64>() / count;
                println!(
                    "Average exposed communication: {comm:.4}s per iteration ({:.1}% of the step)",
                    100.0 * comm / mean.max(1e-12)
                );
            }
        }
        println!("Parameter hash: 0x{:016x}", parameter_hash(model));
    }
}

/// Train as `cfg` says. Returns when training is done or on the first error (a dead peer,
/// bad data, an unreadable checkpoint...), which the caller prints before exiting non-zero.
/// `--verbose`: what this rank computes with, on stderr before training starts.
fn print_setup(cfg: &TrainConfig, model: &engine::VggConfig) {
    let o = &cfg.opts;
    eprintln!(
        "dtrain: SIMD {}, {} thread(s) per rank, conv algorithm {} (batch {} per rank):",
        engine::simd::level().name(),
        cfg.threads,
        o.conv_algo,
        o.batch_size
    );
    for line in model.conv_plan_lines(o.batch_size) {
        eprintln!("dtrain:   {line}");
    }
}

pub fn run(cfg: &TrainConfig) -> Result<(), TrainError> {
    engine::parallel::set_num_threads(cfg.threads);
    engine::ops::set_conv_algo_override(cfg.opts.conv_algo);
    let (rank, o) = (cfg.rank, &cfg.opts);
    // Data, model, schedule and checkpoints first: a missing dataset, a schedule the run
    // cannot hold or a bad checkpoint is reported before anyone waits on a rendezvous.
    let (train, test) = data::load_dataset(cfg)?;
    let train = Arc::new(train);
    let iters_per_epoch = data::batches_per_epoch(train.n, cfg.num_nodes, o.batch_size);
    let schedule = o
        .recipe
        .schedule(o.lr as f64, o.momentum as f64, o.epochs, iters_per_epoch)
        .map_err(|e| TrainError::Schedule(e.0))?;
    let (mut model, mut sgd) = initial_state(cfg)?;
    if o.verbose && rank == 0 {
        print_setup(cfg, model.config());
    } else if o.precision == engine::gemm::Precision::Bf16 && rank == 0 {
        // Said once even without --verbose: the emulated path is much slower.
        eprintln!(
            "dtrain: --precision bf16 on {}",
            engine::gemm::Bf16Kernel::detect().name()
        );
    }
    let resumed = resume_on_rank0(cfg, &mut model, &mut sgd)?;
    let mut checkpoints = match &o.save_checkpoint {
        Some(path) if rank == 0 => Some(Checkpoints::new(
            path,
            o.keep_checkpoints,
            &o.model,
            run_settings(cfg),
        )?),
        _ => None,
    };
    let mut sync = GradSync::connect(cfg, &mut model).map_err(TrainError::comm(rank))?;
    let start = share_resume(cfg, &mut sync, &mut model, &mut sgd, resumed)?;
    let mut log = RunLog::open(cfg, train.n, start.is_some())?;
    let mut eval = Evaluator::new(cfg, test, start.is_some());
    let reached_max = |p: Position| o.max_iters.is_some_and(|m| p.iteration >= m);
    let periodic = |p: Position| {
        o.checkpoint_every
            .is_some_and(|n| p.iteration.is_multiple_of(n))
    };
    let mut position = start.unwrap_or_default();

    while position.epoch < o.epochs && !reached_max(position) {
        let loader = TrainLoader::new(Arc::clone(&train), cfg, position.epoch, position.batch);
        let batches = loader.batches_per_epoch();
        model.set_training(true);
        for batch in loader {
            if reached_max(position) {
                break;
            }
            schedule.apply(position.iteration, &mut sgd);
            let started = (Instant::now(), process_cpu_seconds());
            let stats = sync
                .step(&mut model, &mut sgd, &batch)
                .map_err(TrainError::sync(rank))?;
            log.iteration(position, batches, batch.n, stats, sgd.lr, started)?;
            position = position.after_batch();
            // The epoch's end and the run's end have their own checkpoints and evaluations.
            let mid_epoch = position.batch < batches && !reached_max(position);
            if periodic(position) && mid_epoch {
                if let Some(c) = checkpoints.as_mut() {
                    c.save_in_background(&model, &sgd, position);
                }
            }
            if mid_epoch && eval.due(position) {
                let mut state = (&mut sync, &mut model, &sgd, &mut log);
                eval.run(cfg, &mut state, position, position.epoch)?;
            }
        }
        let epoch = position.epoch;
        let epoch_done = position.batch >= batches;
        if epoch_done {
            position = position.next_epoch();
        }
        log.end_epoch();
        // Evaluate after a full epoch, or once when --max-iters cut the run short.
        if epoch_done || reached_max(position) {
            let mut state = (&mut sync, &mut model, &sgd, &mut log);
            eval.run(cfg, &mut state, position, epoch)?;
        }
        if !epoch_done {
            break;
        }
        if let Some(c) = checkpoints.as_mut() {
            c.save_in_background(&model, &sgd, position);
        }
    }

    // The end-of-run checkpoint (also when there was nothing left to train).
    if let Some(c) = checkpoints.as_mut() {
        c.save_final(&model, &sgd, position)?;
    }
    sync.shutdown().map_err(TrainError::comm(rank))?;
    log.finish(&model);
    Ok(())
}

/// One evaluation over the whole test set.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TestResult {
    /// Mean per-sample cross-entropy.
    pub avg_loss: f64,
    pub correct: usize,
    pub seen: usize,
}

impl TestResult {
    /// Share of correct answers, in [0, 1].
    pub fn accuracy(&self) -> f64 {
        self.correct as f64 / self.seen.max(1) as f64
    }
}

/// What an evaluation during training needs mutable access to.
type EvalState<'a> = (
    &'a mut GradSync,
    &'a mut Vgg<f32>,
    &'a Sgd<f32>,
    &'a mut RunLog,
);

/// Evaluations during training: the test set, `--eval-every` and rank 0's `--save-best`.
struct Evaluator {
    test: DataSplit,
    every: Option<usize>,
    best: Option<BestCheckpoint>,
}

impl Evaluator {
    fn new(cfg: &TrainConfig, test: DataSplit, resumed: bool) -> Evaluator {
        let best = match (&cfg.opts.recipe.save_best, cfg.rank) {
            (Some(path), 0) => Some(BestCheckpoint::open(cfg, path, resumed)),
            _ => None,
        };
        Evaluator {
            test,
            every: cfg.opts.recipe.eval_every,
            best,
        }
    }

    /// An `--eval-every` evaluation is due after `at.iteration` iterations.
    fn due(&self, at: Position) -> bool {
        self.every.is_some_and(|n| at.iteration.is_multiple_of(n))
    }

    /// Evaluate (every rank takes part), log on rank 0 and keep the best checkpoint.
    fn run(
        &mut self,
        cfg: &TrainConfig,
        (sync, model, sgd, log): &mut EvalState<'_>,
        at: Position,
        epoch: usize,
    ) -> Result<(), TrainError> {
        let result = evaluate(cfg, sync, model, &self.test)?;
        log.test_result(at, epoch, &result)?;
        if let Some(best) = self.best.as_mut() {
            best.offer(model, sgd, at, &result);
        }
        Ok(())
    }
}

/// Rank 0's `--save-best` file and the best test accuracy it holds.
struct BestCheckpoint {
    path: PathBuf,
    model_spec: String,
    settings: BTreeMap<String, String>,
    best: Option<f64>,
}

/// Metadata key of the test accuracy a `--save-best` checkpoint was chosen by.
pub const BEST_ACCURACY_KEY: &str = "test_accuracy";

impl BestCheckpoint {
    /// A resumed run continues with the accuracy the file holds; a fresh run replaces it.
    fn open(cfg: &TrainConfig, path: &std::path::Path, resumed: bool) -> BestCheckpoint {
        let best = match resumed && path.exists() {
            false => None,
            true => match engine::state::load_tensors(path) {
                Ok(s) => s
                    .metadata
                    .get(BEST_ACCURACY_KEY)
                    .and_then(|v| v.parse().ok()),
                Err(e) => {
                    eprintln!(
                        "dtrain: warning: --save-best {}: {e}; the next evaluation replaces it",
                        path.display()
                    );
                    None
                }
            },
        };
        BestCheckpoint {
            path: path.to_path_buf(),
            model_spec: cfg.opts.model.clone(),
            settings: run_settings(cfg),
            best,
        }
    }

    /// Save the state at `at` if `result` is the best test accuracy so far. A failed write
    /// is a warning: the file keeps the previous best (writes are atomic).
    fn offer(&mut self, model: &Vgg<f32>, sgd: &Sgd<f32>, at: Position, result: &TestResult) {
        let acc = result.accuracy();
        if self.best.is_some_and(|b| acc <= b) {
            return;
        }
        let mut settings = self.settings.clone();
        settings.insert(BEST_ACCURACY_KEY.into(), acc.to_string());
        settings.insert("test_loss".into(), result.avg_loss.to_string());
        match checkpoint::save_training(&self.path, &self.model_spec, model, sgd, at, settings) {
            Ok(()) => self.best = Some(acc),
            Err(e) => eprintln!(
                "dtrain: warning: --save-best {}: {e}; it keeps the previous best",
                self.path.display()
            ),
        }
    }
}

/// Loss sum, correct count and sample count of `model` (in eval mode) over rank `rank`'s
/// shard of `test` (the whole set when `world` is 1).
pub fn test_shard_totals(
    model: &mut Vgg<f32>,
    test: &DataSplit,
    (rank, world): (usize, usize),
    batch_size: usize,
) -> Result<(f64, usize, usize), engine::ModelError> {
    let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
    for batch in data::test_shard(test, rank, world, batch_size) {
        let (l, c) = model.evaluate(&batch.images, batch.n, &batch.labels)?;
        loss_sum += l;
        correct += c;
        seen += batch.n;
    }
    Ok((loss_sum, correct, seen))
}

/// Evaluate rank 0's model on the test set, each rank taking a shard.
fn evaluate(
    cfg: &TrainConfig,
    sync: &mut GradSync,
    model: &mut Vgg<f32>,
    test: &DataSplit,
) -> Result<TestResult, TrainError> {
    let rank = cfg.rank;
    // Evaluate with rank 0's running statistics; keep ours to restore afterwards.
    let saved: Vec<(Vec<f32>, Vec<f32>)> = model
        .bn_buffers()
        .iter()
        .map(|b| (b.running_mean.clone(), b.running_var.clone()))
        .collect();
    sync.broadcast_bn_buffers(model)
        .map_err(TrainError::comm(rank))?;
    model.set_training(false);
    let totals = test_shard_totals(model, test, (rank, cfg.num_nodes), cfg.opts.batch_size);
    model.set_training(true);
    for (b, (mean, var)) in model.bn_buffers_mut().iter_mut().zip(saved) {
        b.running_mean = mean;
        b.running_var = var;
    }
    let (loss_sum, correct, seen) = totals.map_err(|e| TrainError::Sync {
        rank,
        source: SyncError::Batch(e.to_string()),
    })?;
    let mut totals = [loss_sum, correct as f64, seen as f64];
    sync.all_reduce_f64_sum(&mut totals)
        .map_err(TrainError::comm(rank))?;
    let seen = totals[2] as usize;
    Ok(TestResult {
        avg_loss: totals[0] / seen.max(1) as f64,
        correct: totals[1] as usize,
        seen,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_lines_match_the_original_format() {
        // Python: 'Training Iteration: {} [{}/{} ({:.0f}%)]\tLoss: {:.6f}'.format(
        //     20, 20*64, 50000, 100.*20/782, 2.312345)
        assert_eq!(
            iteration_line(20, 64, 50000, 782, 2.312345),
            "Training Iteration: 20 [1280/50000 (3%)]\tLoss: 2.312345"
        );
        assert_eq!(
            test_line(1.23456, 5234, 10000),
            "Test set: Average loss: 1.2346, Accuracy: 5234/10000 (52%)"
        );
        // Ties round to even, as Python's format does: 100*1/8 = 12.5 -> "12".
        assert_eq!(
            iteration_line(1, 1, 8, 8, 0.0),
            "Training Iteration: 1 [1/8 (12%)]\tLoss: 0.000000"
        );
    }

    #[test]
    fn parameter_hash_changes_with_any_parameter_bit() {
        let mut m = build_model("4,M", 3).expect("model");
        let h0 = parameter_hash(&m);
        assert_eq!(h0, parameter_hash(&build_model("4,M", 3).unwrap()));
        let last = m.params().len() - 1;
        let v = &mut m.params_mut()[last].value[0];
        *v = f32::from_bits(v.to_bits() ^ 1);
        assert_ne!(parameter_hash(&m), h0);
        assert_ne!(parameter_hash(&build_model("4,M", 4).unwrap()), h0);
    }

    #[test]
    fn bad_model_spec_is_a_clear_error() {
        let e = build_model("64,X", 0).err().expect("must fail");
        assert!(e.to_string().contains("--model"), "{e}");
    }
}
