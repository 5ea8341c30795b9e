//! What every `--mode` shares: the step report and its errors, a rank's peers as a blocking
//! collective needs them, the forward/backward pass, and the rank-0 broadcasts of parameters
//! and batch-norm buffers.

use std::time::Duration;

use engine::vgg::Vgg;
use transport::{AsyncCommunicator, Communicator};

use crate::data::Batch;

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
