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
//! `ddp` lives in [`ddp`], the per-parameter modes' collectives in [`per_param`], what every
//! mode shares (step report, errors, peers, the rank-0 broadcasts) in [`step`], below both.
//! Every mode leaves bitwise identical gradients on every rank (the transport's reductions are
//! deterministic across ranks), so parameters stay identical after the optimizer step, which
//! [`GradSync::step`] runs too.

pub mod ddp;
pub mod per_param;
pub mod step;

use std::time::{Duration, Instant};

use engine::optim::Sgd;
use engine::vgg::Vgg;
use transport::{Bf16, CommConfig, Communicator, ReduceOp, F16};

use crate::args::{GradCompression, Mode, TrainConfig};
use crate::data::Batch;
use ddp::DdpSync;

// Named, not globs: the old `dtrain::sync::` paths of what moved into the children.
pub use per_param::{all_reduce_mean, all_reduce_mean_half, gather_scatter_mean};
pub use step::{
    broadcast_bn_buffers, broadcast_parameters, forward_backward, pack_bn_buffers,
    unpack_bn_buffers, Peers, StepStats, SyncError,
};

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
