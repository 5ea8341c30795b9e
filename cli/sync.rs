//! Gradient synchronisation of the `gather-scatter` and `allreduce` modes, plus the helpers
//! every mode shares (parameter/buffer broadcast).
//!
//! Both modes run after the whole backward pass, one collective per parameter, exactly as
//! the original scripts do:
//! - `gather-scatter`: rank 0 gathers every rank's gradient, sums them in rank order,
//!   divides by the world size and scatters the mean back to everybody;
//! - `allreduce`: all-reduce (sum) of the gradient, then division by the world size.
//!
//! Both leave bitwise identical gradients on every rank (the transport's all-reduce is
//! deterministic across ranks), so parameters stay identical after the optimizer step.

use std::time::Duration;

use engine::vgg::Vgg;
use transport::{AsyncCommunicator, CommConfig, Communicator, ReduceOp};

use crate::args::TrainConfig;

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

/// This rank's connection to its peers, in the shape the current mode needs.
pub enum Comm {
    /// World of one: every collective is the identity.
    Solo,
    /// Blocking collectives (gather-scatter, allreduce, and DDP before training starts).
    Blocking(Communicator),
    /// DDP during training: bucket all-reduces run on the transport's communication thread.
    Async(AsyncCommunicator),
    /// Transient state while converting; never observed outside `make_async`.
    Converting,
}

impl Comm {
    /// Rendezvous with the other ranks (nothing to do for a world of one).
    pub fn connect(cfg: &TrainConfig) -> transport::Result<Comm> {
        if cfg.num_nodes <= 1 {
            return Ok(Comm::Solo);
        }
        let mut cc = CommConfig::new(&cfg.master_addr, cfg.master_port, cfg.rank, cfg.num_nodes);
        cc.transport = match cfg.transport {
            crate::args::TransportKind::Auto => transport::TransportKind::Auto,
            crate::args::TransportKind::Shm => transport::TransportKind::Shm,
            crate::args::TransportKind::Tcp => transport::TransportKind::Tcp,
        };
        cc.config_hash = cfg.config_hash();
        cc.auth_token = std::env::var("DTRAIN_AUTH_TOKEN").ok();
        cc.timeouts.connect = Duration::from_secs(cfg.connect_timeout_secs);
        cc.timeouts.collective = Duration::from_secs(cfg.timeout_secs);
        Ok(Comm::Blocking(Communicator::connect(&cc)?))
    }

    /// Switch to asynchronous collectives (DDP's training loop).
    pub fn make_async(&mut self) {
        if let Comm::Blocking(c) = std::mem::replace(self, Comm::Converting) {
            *self = Comm::Async(c.into_async());
        } else if let Comm::Converting = self {
            unreachable!("Comm::make_async re-entered");
        }
    }

    /// The blocking communicator, if this rank has peers and is not in async mode.
    pub fn blocking(&mut self) -> Option<&mut Communicator> {
        match self {
            Comm::Blocking(c) => Some(c),
            _ => None,
        }
    }

    /// The asynchronous communicator (DDP). Panics outside DDP: a programming error.
    pub fn async_comm(&mut self) -> &mut AsyncCommunicator {
        match self {
            Comm::Async(c) => c,
            _ => panic!("Comm::async_comm outside DDP mode"),
        }
    }

    /// Run a blocking collective in whatever mode we are in.
    fn with_blocking<R: Send + 'static>(
        &mut self,
        solo: R,
        f: impl FnOnce(&mut Communicator) -> transport::Result<R> + Send + 'static,
    ) -> transport::Result<R> {
        match self {
            Comm::Solo | Comm::Converting => Ok(solo),
            Comm::Blocking(c) => f(c),
            Comm::Async(c) => c.run(f),
        }
    }

    /// Broadcast `buf` from rank 0.
    pub fn broadcast_f32(&mut self, buf: &mut Vec<f32>) -> transport::Result<()> {
        let data = std::mem::take(buf);
        *buf = self.with_blocking(Vec::new(), move |c| {
            let mut data = data;
            c.broadcast(&mut data[..], 0)?;
            Ok(data)
        })?;
        Ok(())
    }

    /// Sum `values` over all ranks (in place).
    pub fn all_reduce_f64_sum(&mut self, values: &mut [f64]) -> transport::Result<()> {
        let data = values.to_vec();
        let solo = data.clone();
        let out = self.with_blocking(solo, move |c| {
            let mut data = data;
            c.all_reduce(&mut data[..], ReduceOp::Sum)?;
            Ok(data)
        })?;
        values.copy_from_slice(&out);
        Ok(())
    }

    /// Wait until every rank got here, then drop the connection cleanly.
    pub fn shutdown(&mut self) -> transport::Result<()> {
        let r = self.with_blocking((), |c| c.barrier());
        *self = Comm::Solo;
        r
    }
}

/// Broadcast every parameter from rank 0 (one collective for all of them).
pub fn broadcast_parameters(comm: &mut Comm, model: &mut Vgg<f32>) -> transport::Result<()> {
    let mut flat: Vec<f32> = model
        .params()
        .iter()
        .flat_map(|p| p.value.iter().copied())
        .collect();
    comm.broadcast_f32(&mut flat)?;
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
    comm: &mut Comm,
    model: &mut Vgg<f32>,
    flat: &mut Vec<f32>,
) -> transport::Result<()> {
    if matches!(comm, Comm::Solo) {
        return Ok(());
    }
    flat.clear();
    for b in model.bn_buffers() {
        flat.extend_from_slice(&b.running_mean);
        flat.extend_from_slice(&b.running_var);
    }
    comm.broadcast_f32(flat)?;
    let mut off = 0;
    for b in model.bn_buffers_mut() {
        let n = b.running_mean.len();
        b.running_mean.copy_from_slice(&flat[off..off + n]);
        b.running_var.copy_from_slice(&flat[off + n..off + 2 * n]);
        off += 2 * n;
    }
    Ok(())
}
