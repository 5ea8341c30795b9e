//! The per-parameter modes' collectives, run after the whole backward pass, one per
//! parameter: `gather-scatter` (mean at rank 0, scattered back) and `allreduce` (sum, then
//! division by the world size; 16-bit on the wire with `--grad-compression`).

use transport::{Communicator, HalfFloat, ReduceOp};

use super::ddp::WireFormat;

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
