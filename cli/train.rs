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
//! Rank 0 alone prints the evaluation after each epoch (and after a run cut short by
//! `--max-iters`): `Test set: Average loss: {:.4}, Accuracy: {c}/{n} ({pct:.0}%)` followed by
//! an empty line, as the original. The test set is sharded across ranks and the loss sum and
//! correct count are summed with one all-reduce, so each rank evaluates 1/N of it. The
//! evaluated model is rank 0's: parameters are equal everywhere and rank 0's batch-norm
//! running statistics are broadcast for the evaluation (then each rank's own are restored).
//! "Average loss" is the mean per-sample cross-entropy over the test set (the original
//! averages batch means, which is the same when every batch is full).
//!
//! # Metrics (`--metrics FILE`, rank 0 only)
//! One JSON object per line, flushed as written:
//! `{"iteration":I,"epoch":E,"batch":B,"loss":L,"seconds":S,"images_per_s":R,"comm_seconds":C,
//! "cpu_seconds":P}`
//! per iteration (`I` counts completed iterations from the start of the run, so it continues
//! across a resume; `R` counts the images of all ranks; `C` is the time this rank spent in
//! gradient/buffer synchronisation outside of compute; `cpu_seconds` is the CPU time the whole
//! process (compute, loader and communication threads) used during the iteration, a number
//! that stays meaningful on a shared machine), and
//! `{"epoch":E,"test_loss":L,"test_accuracy":A}` per evaluation (`A` in [0, 1]).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use engine::vgg::{Vgg, VggConfig};

use crate::args::{Mode, TrainConfig};
use crate::checkpoint::{self, CheckpointError, Position};
use crate::data::{self, DataError, DataSplit, TrainLoader};
use crate::ddp::DdpSync;
use crate::sync::{self, Comm};

/// Why training stopped with an error. Every message is meant for the user.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Data(#[from] DataError),
    #[error("rank {rank}: communication failed: {source}")]
    Comm {
        rank: usize,
        source: transport::Error,
    },
    #[error("--model {spec:?}: {reason}")]
    Model { spec: String, reason: String },
    #[error("{0}")]
    Checkpoint(#[from] CheckpointError),
    #[error("cannot resume from {path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    #[error("cannot use --init-checkpoint {path}: {reason}")]
    InitCheckpoint { path: PathBuf, reason: String },
    #[error("cannot write metrics file {path}: {source}")]
    Metrics {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rank {rank}: the model rejected a batch: {reason}")]
    Batch { rank: usize, reason: String },
}

/// Build the network a `--model` spec names (`vgg11` or e.g. `64,M,128,M`) for 3×32×32
/// images and 10 classes, initialised from `seed` (identical on every rank).
pub fn build_model(spec: &str, seed: u64) -> Result<Vgg<f32>, TrainError> {
    let config = if spec.eq_ignore_ascii_case("vgg11") {
        VggConfig::vgg11()
    } else {
        VggConfig::from_spec(spec, data::CHANNELS, data::IMAGE_SIDE, data::NUM_CLASSES).map_err(
            |e| TrainError::Model {
                spec: spec.to_string(),
                reason: e.to_string(),
            },
        )?
    };
    Ok(Vgg::new(config, seed))
}

/// FNV-1a (64 bit) over the little-endian bytes of every parameter, in parameter order.
pub fn parameter_hash(model: &Vgg<f32>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in model.params() {
        for v in &p.value {
            for b in v.to_le_bytes() {
                h ^= b as u64;
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
    }
    h
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
    fn open(cfg: &TrainConfig) -> Result<Metrics, TrainError> {
        let Some(path) = cfg.metrics.as_ref().filter(|_| cfg.rank == 0) else {
            return Ok(Metrics { out: None });
        };
        // Append on resume so one file holds the whole run; truncate otherwise.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .append(cfg.resume.is_some())
            .truncate(cfg.resume.is_none())
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
    [
        ("seed", cfg.seed.to_string()),
        ("world_size", cfg.num_nodes.to_string()),
        ("batch_size", cfg.batch_size.to_string()),
        ("dataset", cfg.dataset.name().to_string()),
        ("shuffle", cfg.shuffle.to_string()),
        ("augment", cfg.augment.to_string()),
        ("lr", cfg.lr.to_string()),
        ("momentum", cfg.momentum.to_string()),
        ("weight_decay", cfg.weight_decay.to_string()),
        ("mode", cfg.mode.name().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// Train as `cfg` says. Returns when training is done or on the first error (a dead peer,
/// bad data, an unreadable checkpoint...), which the caller prints before exiting non-zero.
pub fn run(cfg: &TrainConfig) -> Result<(), TrainError> {
    engine::parallel::set_num_threads(cfg.threads);
    let rank = cfg.rank;
    let world = cfg.num_nodes;
    let comm_err = |source| TrainError::Comm { rank, source };

    // Data first: a missing dataset is reported before anyone waits on a rendezvous.
    let (train, test) = data::load_dataset(cfg)?;
    let train = Arc::new(train);
    let mut model = build_model(&cfg.model, cfg.seed)?;
    let mut sgd =
        engine::optim::Sgd::<f32>::new(cfg.lr as f64, cfg.momentum as f64, cfg.weight_decay as f64);
    let mut start = Position::default();
    if let Some(path) = &cfg.init_checkpoint {
        checkpoint::load_init(path, &mut model).map_err(|reason| TrainError::InitCheckpoint {
            path: path.clone(),
            reason,
        })?;
    }
    if let Some(path) = &cfg.resume {
        let restored = checkpoint::load_resume(path, &cfg.model, &mut model, &mut sgd)?;
        for diff in checkpoint::setting_differences(&restored.settings, &run_settings(cfg)) {
            eprintln!("dtrain: warning: resuming with a different setting ({diff}); the run will not match an uninterrupted one");
        }
        start = restored.position;
    }

    let mut comm = Comm::connect(cfg).map_err(comm_err)?;
    let mut ddp = if cfg.mode == Mode::Ddp && world > 1 {
        // DDP starts from rank 0's parameters and buffers, as PyTorch's constructor does.
        sync::broadcast_parameters(&mut comm, &mut model).map_err(comm_err)?;
        let mut flat = Vec::new();
        sync::broadcast_bn_buffers(&mut comm, &mut model, &mut flat).map_err(comm_err)?;
        comm.make_async();
        let (first, cap) = (cfg.first_bucket_mb, cfg.bucket_cap_mb);
        Some(DdpSync::new(&model, first, cap, comm.async_comm()).map_err(comm_err)?)
    } else {
        None
    };

    let mut metrics = Metrics::open(cfg)?;
    let mut bn_flat: Vec<f32> = Vec::new();
    let mut gs_scratch: Vec<f32> = Vec::new();
    let mut iter_times: Vec<f64> = Vec::new();
    let mut iteration = start.iteration;
    let mut position = start;
    // The position last written to --save-checkpoint.
    let mut saved_at: Option<Position> = None;
    let reached_max = |it: usize| cfg.max_iters.is_some_and(|m| it >= m);
    let stdout = std::io::stdout();

    let mut epoch = start.epoch;
    while epoch < cfg.epochs && !reached_max(iteration) {
        let start_batch = if epoch == start.epoch { start.batch } else { 0 };
        let loader = TrainLoader::new(Arc::clone(&train), cfg, epoch, start_batch);
        let batches = loader.batches_per_epoch();
        let mut batch_idx = start_batch;
        model.set_training(true);
        for batch in loader {
            if reached_max(iteration) {
                break;
            }
            let t0 = Instant::now();
            let cpu0 = process_cpu_seconds();
            let mut comm_time = Duration::ZERO;
            // Forward + backward (+ DDP's overlapped bucket all-reduces).
            let stats = match ddp.as_mut() {
                Some(ddp) => {
                    // PyTorch DDP's broadcast_buffers=True: rank 0's BN buffers before forward.
                    let tb = Instant::now();
                    sync::broadcast_bn_buffers(&mut comm, &mut model, &mut bn_flat)
                        .map_err(comm_err)?;
                    comm_time += tb.elapsed();
                    ddp.begin_step();
                    let acomm = comm.async_comm();
                    let stats = model.forward_backward(
                        &batch.images,
                        batch.n,
                        &batch.labels,
                        &mut |i, g| ddp.on_grad_ready(acomm, i, g),
                    );
                    let tw = Instant::now();
                    // Wait for every bucket even when the batch was rejected, so no
                    // collective is left half-done.
                    let finished = ddp.finish(acomm, model.params_mut());
                    comm_time += tw.elapsed();
                    let stats = stats.map_err(|e| TrainError::Batch {
                        rank,
                        reason: e.to_string(),
                    })?;
                    finished.map_err(comm_err)?;
                    stats
                }
                None => {
                    let stats = model
                        .forward_backward(&batch.images, batch.n, &batch.labels, &mut |_, _| {})
                        .map_err(|e| TrainError::Batch {
                            rank,
                            reason: e.to_string(),
                        })?;
                    let ts = Instant::now();
                    match (cfg.mode, comm.blocking()) {
                        (Mode::GatherScatter, Some(c)) => {
                            for p in model.params_mut() {
                                sync::gather_scatter_mean(c, &mut p.grad, &mut gs_scratch)
                                    .map_err(comm_err)?;
                            }
                        }
                        (Mode::AllReduce | Mode::Ddp, Some(c)) => {
                            for p in model.params_mut() {
                                sync::all_reduce_mean(c, &mut p.grad).map_err(comm_err)?;
                            }
                        }
                        _ => {}
                    }
                    comm_time += ts.elapsed();
                    stats
                }
            };
            sgd.step(model.params_mut());
            let secs = t0.elapsed().as_secs_f64();
            let cpu_secs = process_cpu_seconds() - cpu0;
            iter_times.push(secs);
            iteration += 1;
            position = Position {
                epoch,
                batch: batch_idx + 1,
                iteration,
            };

            if batch_idx % cfg.log_every == 0 {
                let line = iteration_line(batch_idx, cfg.batch_size, train.n, batches, stats.loss);
                let mut out = stdout.lock();
                if cfg.progress {
                    // Clear the progress line first.
                    let _ = write!(out, "\r\x1b[2K");
                }
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
            let images_per_s = (batch.n * world) as f64 / secs.max(1e-9);
            if cfg.progress {
                let mut out = stdout.lock();
                let _ = write!(
                    out,
                    "\repoch {} batch {}/{} loss {:.4} {:.1} img/s",
                    epoch,
                    batch_idx + 1,
                    batches,
                    stats.loss,
                    images_per_s
                );
                let _ = out.flush();
            }
            metrics.write(format!(
                "{{\"iteration\":{iteration},\"epoch\":{epoch},\"batch\":{batch_idx},\"loss\":{},\"seconds\":{},\"images_per_s\":{},\"comm_seconds\":{},\"cpu_seconds\":{}}}",
                json_num(stats.loss),
                json_num(secs),
                json_num(images_per_s),
                json_num(comm_time.as_secs_f64()),
                json_num(cpu_secs)
            ))?;
            batch_idx += 1;
        }
        let epoch_done = batch_idx >= batches;
        if epoch_done {
            position = Position {
                epoch: epoch + 1,
                batch: 0,
                iteration,
            };
        }
        if cfg.progress {
            println!();
        }
        // Evaluate after a full epoch, or once when --max-iters cut the run short.
        if epoch_done || reached_max(iteration) {
            evaluate(
                cfg,
                &mut comm,
                &mut model,
                &test,
                &mut bn_flat,
                &mut metrics,
                epoch,
            )?;
        }
        // Each finished epoch is checkpointed; a run cut short is saved once, below.
        if epoch_done && rank == 0 {
            if let Some(path) = &cfg.save_checkpoint {
                checkpoint::save_training(
                    path,
                    &cfg.model,
                    &model,
                    &sgd,
                    position,
                    run_settings(cfg),
                )?;
                saved_at = Some(position);
            }
        }
        if !epoch_done {
            break;
        }
        epoch += 1;
    }

    // The end-of-run checkpoint (also when there was nothing left to train).
    if let Some(path) = cfg.save_checkpoint.as_ref().filter(|_| rank == 0) {
        if saved_at != Some(position) {
            checkpoint::save_training(path, &cfg.model, &model, &sgd, position, run_settings(cfg))?;
        }
    }
    comm.shutdown().map_err(comm_err)?;

    if iter_times.len() > 1 {
        let timed = &iter_times[1..];
        let mean = timed.iter().sum::<f64>() / timed.len() as f64;
        println!("Average time for {} iterations: {mean:.4}s", timed.len());
    }
    println!("Parameter hash: 0x{:016x}", parameter_hash(&model));
    Ok(())
}

/// Evaluate rank 0's model on the test set, each rank taking a shard; rank 0 prints.
fn evaluate(
    cfg: &TrainConfig,
    comm: &mut Comm,
    model: &mut Vgg<f32>,
    test: &DataSplit,
    bn_flat: &mut Vec<f32>,
    metrics: &mut Metrics,
    epoch: usize,
) -> Result<(), TrainError> {
    let rank = cfg.rank;
    let comm_err = |source| TrainError::Comm { rank, source };
    // Evaluate with rank 0's running statistics; keep ours to restore afterwards.
    let saved: Vec<(Vec<f32>, Vec<f32>)> = model
        .bn_buffers()
        .iter()
        .map(|b| (b.running_mean.clone(), b.running_var.clone()))
        .collect();
    sync::broadcast_bn_buffers(comm, model, bn_flat).map_err(comm_err)?;
    model.set_training(false);
    let mut loss_sum = 0.0f64;
    let mut correct = 0usize;
    let mut seen = 0usize;
    let mut result = Ok(());
    for batch in data::test_shard(test, rank, cfg.num_nodes, cfg.batch_size) {
        match model.evaluate(&batch.images, batch.n, &batch.labels) {
            Ok((l, c)) => {
                loss_sum += l;
                correct += c;
                seen += batch.n;
            }
            Err(e) => {
                result = Err(TrainError::Batch {
                    rank,
                    reason: e.to_string(),
                });
                break;
            }
        }
    }
    model.set_training(true);
    for (b, (mean, var)) in model.bn_buffers_mut().iter_mut().zip(saved) {
        b.running_mean = mean;
        b.running_var = var;
    }
    result?;
    let mut totals = [loss_sum, correct as f64, seen as f64];
    comm.all_reduce_f64_sum(&mut totals).map_err(comm_err)?;
    let (loss_sum, correct, seen) = (totals[0], totals[1] as usize, totals[2] as usize);
    if rank == 0 {
        let avg = loss_sum / seen.max(1) as f64;
        println!("{}\n", test_line(avg, correct, seen));
        metrics.write(format!(
            "{{\"epoch\":{epoch},\"test_loss\":{},\"test_accuracy\":{}}}",
            json_num(avg),
            json_num(correct as f64 / seen.max(1) as f64)
        ))?;
    }
    Ok(())
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
