//! [`GradSync`]: how this rank trains one step with its peers — one variant per `--mode`,
//! each owning the communicator that mode needs — plus the rank-0 broadcasts every mode
//! shares (parameters, batch-norm buffers) and the one place a rank connects to its peers
//! ([`connect_peers`]).
//!
//! The per-parameter modes run after the whole backward pass, one collective per parameter,
//! exactly as the original scripts do:
//! - `gather-scatter`: rank 0 gathers every rank's gradient, sums them in rank order,
//!   divides by the world size and scatters the mean back to everybody;
//! - `allreduce`: all-reduce (sum) of the gradient, then division by the world size (with
//!   `--grad-compression bf16|fp16`: the gradient times 1/world rounded to 16 bits, summed,
//!   widened back, as DDP's buckets do).
//!
//! `ddp` lives in [`crate::ddp`]. Every mode leaves bitwise identical gradients on every rank
//! (the transport's reductions are deterministic across ranks), so parameters stay identical
//! after the optimizer step, which [`GradSync::step`] runs too.

use std::time::{Duration, Instant};

use engine::optim::Sgd;
use engine::vgg::Vgg;
use transport::{AsyncCommunicator, Bf16, CommConfig, Communicator, HalfFloat, ReduceOp, F16};

use crate::args::{GradCompression, Mode, TrainConfig};
use crate::data::Batch;
use crate::ddp::{DdpSync, WireFormat};

/// What one training step reports.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// This rank's mean cross-entropy over its batch.
    pub loss: f64,
    /// Time spent synchronising outside of compute (waiting for collectives).
    pub comm_time: Duration,
}

/// Why a step (or a collective around it) failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("communication failed: {0}")]
    Comm(#[from] transport::Error),
    #[error("the model rejected a batch: {0}")]
    Batch(String),
}

/// This rank's gradient synchronisation, one variant per mode, each with its communicator.
pub enum GradSync {
    /// A world of one: no peers, every collective is the identity.
    Solo,
    /// After backward, per parameter: gather to rank 0, average, scatter back.
    GatherScatter {
        comm: Communicator,
        /// Rank 0's gather buffer (world × largest parameter), reused across steps.
        scratch: Vec<f32>,
    },
    /// After backward, per parameter: all-reduce (sum), divide by the world size.
    AllReduce {
        comm: Communicator,
        compression: GradCompression,
        /// The 16-bit copy of one gradient when compressing (reused across parameters).
        wire: Vec<u16>,
    },
    /// Buckets all-reduced on a communication thread while backward runs.
    Ddp(Box<DdpSync>),
}

/// A rank's peers as a blocking collective needs them: a communicator of its own, or DDP's
/// communication thread (which runs the collective after the work already queued).
pub enum Peers<'a> {
    Blocking(&'a mut Communicator),
    Async(&'a AsyncCommunicator),
}

impl Peers<'_> {
    pub fn run<R: Send + 'static>(
        self,
        f: impl FnOnce(&mut Communicator) -> transport::Result<R> + Send + 'static,
    ) -> transport::Result<R> {
        match self {
            Peers::Blocking(c) => f(c),
            Peers::Async(c) => c.run(f),
        }
    }
}

/// The transport settings of `cfg` (rendezvous at rank 0's address or through the
/// launcher's TCPStore, deadlines, job digest).
pub fn comm_config(cfg: &TrainConfig) -> CommConfig {
    let mut cc = CommConfig::new(&cfg.master_addr, cfg.master_port, cfg.rank, cfg.num_nodes);
    cc.transport = cfg.transport;
    cc.store = cfg.store.clone();
    cc.config_hash = cfg.config_hash();
    cc.timeouts.connect = Duration::from_secs(cfg.opts.connect_timeout);
    cc.timeouts.collective = Duration::from_secs(cfg.opts.timeout);
    cc
}

/// Rendezvous with the other ranks: the one place a `dtrain` process (training or bench)
/// joins a job. Adds the shared secret from `DTRAIN_AUTH_TOKEN`, if set.
pub fn connect_peers(mut cc: CommConfig) -> transport::Result<Communicator> {
    cc.auth_token = std::env::var("DTRAIN_AUTH_TOKEN").ok();
    Communicator::connect(&cc)
}

impl GradSync {
    /// Join the job (collective: every rank calls it) and set up `cfg`'s mode. DDP starts
    /// from rank 0's parameters and batch-norm buffers, as PyTorch's constructor does.
    pub fn connect(cfg: &TrainConfig, model: &mut Vgg<f32>) -> transport::Result<GradSync> {
        if cfg.num_nodes <= 1 {
            return Ok(GradSync::Solo);
        }
        if let (0, Some(note)) = (cfg.rank, &cfg.master_note) {
            eprintln!(
                "dtrain: rendezvous at {}:{} ({note})",
                cfg.master_addr, cfg.master_port
            );
        }
        let mut comm = connect_peers(comm_config(cfg))?;
        Ok(match cfg.opts.mode {
            Mode::GatherScatter => GradSync::GatherScatter {
                comm,
                scratch: Vec::new(),
            },
            Mode::AllReduce => GradSync::AllReduce {
                comm,
                compression: cfg.opts.grad_compression,
                wire: Vec::new(),
            },
            Mode::Ddp => {
                broadcast_parameters(Peers::Blocking(&mut comm), model)?;
                broadcast_bn_buffers(Peers::Blocking(&mut comm), model, &mut Vec::new())?;
                let o = &cfg.opts;
                GradSync::Ddp(Box::new(DdpSync::new(
                    comm.into_async(),
                    model,
                    o.first_bucket_mb,
                    o.bucket_cap_mb,
                    o.grad_compression,
                )?))
            }
            Mode::Single => {
                return Err(transport::Error::InvalidArgument(format!(
                    "--mode single cannot run with {} ranks",
                    cfg.num_nodes
                )))
            }
        })
    }

    /// One training step on `batch`: forward, backward, gradient synchronisation, then the
    /// optimizer step (inside, so a mode may step parameters as soon as their gradients are
    /// final).
    pub fn step(
        &mut self,
        model: &mut Vgg<f32>,
        sgd: &mut Sgd<f32>,
        batch: &Batch,
    ) -> Result<StepStats, SyncError> {
        if let GradSync::Ddp(ddp) = self {
            return ddp.step(model, sgd, batch);
        }
        let loss = forward_backward(model, batch, &mut |_, _| {})?;
        let t = Instant::now();
        match self {
            GradSync::GatherScatter { comm, scratch } => {
                for p in model.params_mut() {
                    gather_scatter_mean(comm, &mut p.grad, scratch)?;
                }
            }
            GradSync::AllReduce {
                comm,
                compression,
                wire,
            } => {
                for p in model.params_mut() {
                    let g = &mut p.grad;
                    match compression {
                        GradCompression::None => all_reduce_mean(comm, g)?,
                        GradCompression::Bf16 => all_reduce_mean_half::<Bf16>(comm, g, wire)?,
                        GradCompression::Fp16 => all_reduce_mean_half::<F16>(comm, g, wire)?,
                    }
                }
            }
            GradSync::Solo | GradSync::Ddp(_) => {}
        }
        let comm_time = t.elapsed();
        sgd.step(model.params_mut());
        Ok(StepStats { loss, comm_time })
    }

    /// The peers for a blocking collective; `None` in a world of one.
    pub fn peers(&mut self) -> Option<Peers<'_>> {
        match self {
            GradSync::Solo => None,
            GradSync::GatherScatter { comm, .. } | GradSync::AllReduce { comm, .. } => {
                Some(Peers::Blocking(comm))
            }
            GradSync::Ddp(ddp) => Some(Peers::Async(ddp.comm())),
        }
    }

    /// Sum `values` over all ranks (in place).
    pub fn all_reduce_f64_sum(&mut self, values: &mut [f64]) -> transport::Result<()> {
        let Some(peers) = self.peers() else {
            return Ok(());
        };
        let data = values.to_vec();
        let out = peers.run(move |c| {
            let mut data = data;
            c.all_reduce(&mut data[..], ReduceOp::Sum)?;
            Ok(data)
        })?;
        values.copy_from_slice(&out);
        Ok(())
    }

    /// Rank 0's `bytes` on every rank (any length, empty included).
    pub fn broadcast_bytes(&mut self, bytes: &mut Vec<u8>) -> transport::Result<()> {
        let Some(peers) = self.peers() else {
            return Ok(());
        };
        let data = std::mem::take(bytes);
        *bytes = peers.run(move |c| {
            let mut len = [data.len() as i64];
            c.broadcast(&mut len[..], 0)?;
            let mut data = data;
            if c.rank() != 0 {
                let len = usize::try_from(len[0]).unwrap_or(usize::MAX);
                data.try_reserve_exact(len).map_err(|_| {
                    transport::Error::InvalidArgument(format!(
                        "rank 0 sent {len} bytes, more than this rank can hold"
                    ))
                })?;
                data.resize(len, 0);
            }
            if !data.is_empty() {
                c.broadcast(&mut data[..], 0)?;
            }
            Ok(data)
        })?;
        Ok(())
    }

    /// Rank 0's batch-norm running statistics on every rank.
    pub fn broadcast_bn_buffers(&mut self, model: &mut Vgg<f32>) -> transport::Result<()> {
        match self.peers() {
            Some(peers) => broadcast_bn_buffers(peers, model, &mut Vec::new()),
            None => Ok(()),
        }
    }

    /// Wait until every rank got here, then drop the connection cleanly.
    pub fn shutdown(mut self) -> transport::Result<()> {
        match self.peers() {
            Some(peers) => peers.run(|c| c.barrier()),
            None => Ok(()),
        }
    }
}

/// Forward and backward of `batch`, calling `on_grad_ready` as each gradient is final;
/// returns the loss.
pub fn forward_backward(
    model: &mut Vgg<f32>,
    batch: &Batch,
    on_grad_ready: &mut dyn FnMut(usize, &[f32]),
) -> Result<f64, SyncError> {
    model
        .forward_backward(&batch.images, batch.n, &batch.labels, on_grad_ready)
        .map(|s| s.loss)
        .map_err(|e| SyncError::Batch(e.to_string()))
}

/// Rank 0 gathers `grad` from every rank, averages, and scatters the mean back into `grad`.
/// `scratch` is reused across calls (grown to `world * grad.len()` on rank 0).
pub fn gather_scatter_mean(
    comm: &mut Communicator,
    grad: &mut [f32],
    scratch: &mut Vec<f32>,
) -> transport::Result<()> {
    let world = comm.world_size();
    let len = grad.len();
    if comm.rank() == 0 {
        scratch.resize(world * len, 0.0);
        comm.gather(grad, Some(&mut scratch[..]), 0)?;
        // Sum in rank order starting from zero, then divide: the original's
        // `grad_sum = zeros; for i in range(size): grad_sum += grad_list[i]; grad_sum / size`.
        let inv_world = world as f32;
        for i in 0..len {
            let mut sum = 0.0f32;
            for r in 0..world {
                sum += scratch[r * len + i];
            }
            grad[i] = sum / inv_world;
        }
        // The scatter sends rank r block r: every block is the mean.
        for r in 0..world {
            scratch[r * len..(r + 1) * len].copy_from_slice(grad);
        }
        comm.scatter(Some(&scratch[..]), grad, 0)?;
    } else {
        comm.gather(grad, None, 0)?;
        comm.scatter(None, grad, 0)?;
    }
    Ok(())
}

/// All-reduce (sum) `grad`, then divide it by the world size.
pub fn all_reduce_mean(comm: &mut Communicator, grad: &mut [f32]) -> transport::Result<()> {
    let world = comm.world_size() as f32;
    comm.all_reduce(grad, ReduceOp::Sum)?;
    for g in grad.iter_mut() {
        *g /= world;
    }
    Ok(())
}

/// The compressed all-reduce mean of `grad` in the 16-bit format `H`, through `wire`
/// (reused): packed as DDP's buckets are ([`WireFormat`]), summed, widened back.
pub fn all_reduce_mean_half<H: HalfFloat + WireFormat>(
    comm: &mut Communicator,
    grad: &mut [f32],
    wire: &mut Vec<u16>,
) -> transport::Result<()> {
    wire.resize(grad.len(), 0);
    let wire: &mut [H] = bytemuck::cast_slice_mut(&mut wire[..]);
    H::pack(grad, 1.0 / comm.world_size() as f32, wire);
    comm.all_reduce(wire, H::REDUCE)?;
    H::unpack(wire, grad);
    Ok(())
}

/// Broadcast `buf` from rank 0.
fn broadcast_f32(peers: Peers<'_>, buf: &mut Vec<f32>) -> transport::Result<()> {
    let data = std::mem::take(buf);
    *buf = peers.run(move |c| {
        let mut data = data;
        c.broadcast(&mut data[..], 0)?;
        Ok(data)
    })?;
    Ok(())
}

/// Broadcast every parameter from rank 0 (one collective for all of them).
pub fn broadcast_parameters(peers: Peers<'_>, model: &mut Vgg<f32>) -> transport::Result<()> {
    let mut flat: Vec<f32> = model
        .params()
        .iter()
        .flat_map(|p| p.value.iter().copied())
        .collect();
    broadcast_f32(peers, &mut flat)?;
    let mut off = 0;
    for p in model.params_mut() {
        let n = p.value.len();
        p.value.copy_from_slice(&flat[off..off + n]);
        off += n;
    }
    Ok(())
}

/// Broadcast the batch-norm running means and variances from rank 0, packed into `flat`
/// (reused across calls). `num_batches_tracked` is not sent: every rank runs the same number
/// of training forwards, so it is equal everywhere by construction.
pub fn broadcast_bn_buffers(
    peers: Peers<'_>,
    model: &mut Vgg<f32>,
    flat: &mut Vec<f32>,
) -> transport::Result<()> {
    pack_bn_buffers(model, flat);
    broadcast_f32(peers, flat)?;
    unpack_bn_buffers(model, flat, false);
    Ok(())
}

/// Every batch-norm layer's running mean then running variance, in layer order, into `flat`.
pub fn pack_bn_buffers(model: &Vgg<f32>, flat: &mut Vec<f32>) {
    flat.clear();
    for b in model.bn_buffers() {
        flat.extend_from_slice(&b.running_mean);
        flat.extend_from_slice(&b.running_var);
    }
}

/// Rank 0's running statistics (`flat`, as [`pack_bn_buffers`] packs them) into every layer:
/// copied, or with `rebase` as the base the last training forward should have started from
/// ([`engine::vgg::BnBuffers::rebase_running`]).
pub fn unpack_bn_buffers(model: &mut Vgg<f32>, flat: &[f32], rebase: bool) {
    let mut off = 0;
    for b in model.bn_buffers_mut() {
        let n = b.running_mean.len();
        let (mean, var) = (&flat[off..off + n], &flat[off + n..off + 2 * n]);
        if rebase {
            b.rebase_running(mean, var);
        } else {
            b.running_mean.copy_from_slice(mean);
            b.running_var.copy_from_slice(var);
        }
        off += 2 * n;
    }
}
