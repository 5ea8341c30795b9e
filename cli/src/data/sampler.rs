//! DistributedSampler semantics (PyTorch's `torch.utils.data.DistributedSampler`,
//! drop_last=false): every rank sees the same number of samples per epoch.
//!
//! 1. order = a permutation of 0..n seeded by `seed + epoch` (or 0..n without shuffle);
//! 2. pad by repeating the start of `order` until its length is a multiple of the world size;
//! 3. rank r takes positions r, r+W, r+2W, ...
//!
//! The permutation is our own (ChaCha8 Fisher–Yates), so the order differs from PyTorch's but
//! the sharding rules are the same.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The dataset indices rank `rank` of `world` visits in `epoch`, in order.
pub fn rank_indices(
    n: usize,
    world: usize,
    rank: usize,
    seed: u64,
    epoch: usize,
    shuffle: bool,
) -> Vec<usize> {
    assert!(
        world > 0 && rank < world,
        "rank {rank} out of range for world {world}"
    );
    if n == 0 {
        return Vec::new();
    }
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64));
        order.shuffle(&mut rng);
    }
    let total = n.div_ceil(world) * world;
    // Repeat the start as often as needed (more than once only when n < world).
    let mut k = 0;
    while order.len() < total {
        order.push(order[k]);
        k += 1;
    }
    order.into_iter().skip(rank).step_by(world).collect()
}

/// Batches per epoch for one rank (the last may be smaller).
pub fn batches_per_epoch(n: usize, world: usize, batch_size: usize) -> usize {
    let per_rank = n.div_ceil(world);
    per_rank.div_ceil(batch_size)
}
