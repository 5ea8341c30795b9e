//! Batches: the training loader (sharded, augmented, prepared ahead on a thread) and the
//! evaluation shard.

use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::augment::{augment_image, normalize_image, AugmentParams};
use super::sampler::rank_indices;
use super::{Batch, DataSplit, IMAGE_SIZE};
use crate::args::TrainConfig;

/// Batches prepared ahead of the training loop.
const PREFETCH_BATCHES: usize = 2;

/// Build a batch from dataset indices. With `augment`, each sample gets the crop/flip drawn
/// from (seed, epoch, index).
pub fn make_batch(split: &DataSplit, indices: &[usize], augment: Option<(u64, usize)>) -> Batch {
    let n = indices.len();
    let mut images = vec![0f32; n * IMAGE_SIZE];
    let mut labels = Vec::with_capacity(n);
    let mut scratch = vec![0u8; IMAGE_SIZE];
    for (k, &idx) in indices.iter().enumerate() {
        let src = split.image(idx);
        let pixels: &[u8] = match augment {
            Some((seed, epoch)) => {
                augment_image(src, AugmentParams::draw(seed, epoch, idx), &mut scratch);
                &scratch
            }
            None => src,
        };
        normalize_image(pixels, &mut images[k * IMAGE_SIZE..(k + 1) * IMAGE_SIZE]);
        labels.push(split.labels[idx] as u32);
    }
    Batch { images, labels, n }
}

/// One epoch of one rank's training batches, from batch `start_batch` on.
///
/// Iterating yields batches prepared by a background thread (at most
/// `PREFETCH_BATCHES` ahead). Dropping the loader early stops and joins the thread.
pub struct TrainLoader {
    batches_per_epoch: usize,
    source: Source,
}

enum Source {
    Thread {
        receiver: Option<Receiver<Batch>>,
        worker: Option<JoinHandle<()>>,
    },
    /// The thread could not be started (resource limits): prepare batches on demand instead.
    Inline {
        split: Arc<DataSplit>,
        indices: Vec<usize>,
        batch_size: usize,
        next: usize,
        augment: Option<(u64, usize)>,
    },
}

impl TrainLoader {
    pub fn new(train: Arc<DataSplit>, cfg: &TrainConfig, epoch: usize, start_batch: usize) -> Self {
        let indices = rank_indices(
            train.n,
            cfg.num_nodes,
            cfg.rank,
            cfg.opts.seed,
            epoch,
            cfg.shuffle(),
        );
        let batch_size = cfg.opts.batch_size.max(1);
        let batches_per_epoch = indices.len().div_ceil(batch_size);
        let augment = cfg.augment().then_some((cfg.opts.seed, epoch));
        let (tx, rx) = sync_channel::<Batch>(PREFETCH_BATCHES);
        // The thread gets its own copies; they are small (one index per sample).
        let (split, idx) = (train.clone(), indices.clone());
        let worker = std::thread::Builder::new()
            .name(format!("loader-r{}", cfg.rank))
            .spawn(move || {
                for chunk in idx.chunks(batch_size).skip(start_batch) {
                    let batch = make_batch(&split, chunk, augment);
                    if tx.send(batch).is_err() {
                        return; // the loader was dropped
                    }
                }
            });
        let source = match worker {
            Ok(handle) => Source::Thread {
                receiver: Some(rx),
                worker: Some(handle),
            },
            Err(e) => {
                eprintln!("dtrain: warning: no data loader thread ({e}); preparing batches inline");
                Source::Inline {
                    split: train,
                    indices,
                    batch_size,
                    next: start_batch,
                    augment,
                }
            }
        };
        TrainLoader {
            batches_per_epoch,
            source,
        }
    }

    /// Batches in a full epoch of this rank (including those skipped by `start_batch`).
    pub fn batches_per_epoch(&self) -> usize {
        self.batches_per_epoch
    }
}

impl Iterator for TrainLoader {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        match &mut self.source {
            // recv fails only once the worker has sent everything and exited.
            Source::Thread { receiver, .. } => receiver.as_ref()?.recv().ok(),
            Source::Inline {
                split,
                indices,
                batch_size,
                next,
                augment,
            } => {
                let start = *next * *batch_size;
                if start >= indices.len() {
                    return None;
                }
                let end = (start + *batch_size).min(indices.len());
                *next += 1;
                Some(make_batch(split, &indices[start..end], *augment))
            }
        }
    }
}

impl Drop for TrainLoader {
    fn drop(&mut self) {
        if let Source::Thread { receiver, worker } = &mut self.source {
            // Drop the receiver first so a worker blocked in `send` wakes up with an error.
            receiver.take();
            if let Some(h) = worker.take() {
                let _ = h.join();
            }
        }
    }
}

/// Rank `rank`'s share of the test split: indices rank, rank+W, ... (no padding, so each test
/// image is evaluated exactly once across ranks), no augmentation, in batches of `batch_size`.
pub fn test_shard(
    test: &DataSplit,
    rank: usize,
    world: usize,
    batch_size: usize,
) -> impl Iterator<Item = Batch> + '_ {
    let indices: Vec<usize> = (rank..test.n).step_by(world.max(1)).collect();
    let batch_size = batch_size.max(1);
    let nb = indices.len().div_ceil(batch_size);
    (0..nb).map(move |b| {
        let end = ((b + 1) * batch_size).min(indices.len());
        make_batch(test, &indices[b * batch_size..end], None)
    })
}
