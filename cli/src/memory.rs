//! Bounds on what a command line may ask for. Every flag that sizes memory is either capped
//! (thread count, model depth and widths), harmless by construction (DDP bucket caps: the
//! buckets never hold more than the parameters), or part of a lower-bound estimate of the
//! memory a rank needs (model, batch size, dataset sizes, world size for gather-scatter)
//! that is checked against what this machine has — so an impossible request is one clear
//! `dtrain: error:` line with exit code 2, never an allocator abort. The estimate counts
//! only what is certainly allocated, so a run it admits may still be too large; it exists to
//! turn requests that cannot fit into errors.

use engine::vgg::{parse_spec, LayerSpec};

use crate::args::{DatasetKind, Mode, TrainConfig};
use crate::data::{IMAGE_SIDE, IMAGE_SIZE, NUM_CLASSES};
use crate::usage::UsageError;

pub use crate::config::{MAX_CONV_WIDTH, MAX_LAYERS, MAX_THREADS};

/// Images in the train and test splits of `dataset` (CIFAR-10 and Fashion-MNIST have fixed
/// sizes; synthetic takes them from the flags).
pub fn dataset_images(cfg: &TrainConfig) -> (usize, usize) {
    match cfg.opts.dataset {
        DatasetKind::Cifar10 => (50_000, 10_000),
        DatasetKind::FashionMnist => (60_000, 10_000),
        DatasetKind::Synthetic => (cfg.opts.synthetic_train, cfg.opts.synthetic_test),
    }
}

/// A lower bound of what one rank allocates for training, in bytes, by part. Sizes are
/// `u128` and saturate, so no flag value can overflow them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TrainingMemory {
    /// Parameters, gradients and momentum (3 × 4 bytes per parameter), plus rank 0's
    /// gather buffer in gather-scatter mode.
    pub parameters: u128,
    /// One copy of every layer's output for the batch this rank really trains on.
    pub activations: u128,
    /// The decoded dataset (both splits, one byte per pixel).
    pub data: u128,
    /// The per-rank batch that `activations` counts: `--batch-size`, or the rank's share of
    /// the training set when that is smaller.
    pub batch: usize,
}

impl TrainingMemory {
    pub fn total(&self) -> u128 {
        self.parameters
            .saturating_add(self.activations)
            .saturating_add(self.data)
    }
}

/// [`TrainingMemory`] of `cfg`'s rank, for a valid `--model` spec.
pub fn training_memory(cfg: &TrainConfig) -> Result<TrainingMemory, UsageError> {
    let o = &cfg.opts;
    let layers = parse_spec(&o.model).map_err(|e| UsageError::Invalid(format!("--model: {e}")))?;
    let (mut channels, mut side) = (3u128, IMAGE_SIDE as u128);
    let (mut params, mut largest_param, mut per_image) = (0u128, 0u128, 0u128);
    for layer in &layers {
        match *layer {
            LayerSpec::Conv(width) => {
                let w = width as u128;
                let weight = channels.saturating_mul(w).saturating_mul(9);
                largest_param = largest_param.max(weight);
                // Conv weight and bias, batch-norm weight and bias.
                params = params
                    .saturating_add(weight)
                    .saturating_add(w.saturating_mul(3));
                per_image = per_image.saturating_add(w.saturating_mul(side * side));
                channels = w;
            }
            LayerSpec::MaxPool => {
                side /= 2;
                per_image = per_image.saturating_add(channels.saturating_mul(side * side));
            }
        }
    }
    let fc = channels
        .saturating_mul(side * side)
        .saturating_mul(NUM_CLASSES as u128);
    largest_param = largest_param.max(fc);
    params = params
        .saturating_add(fc)
        .saturating_add(NUM_CLASSES as u128);

    let (train, test) = dataset_images(cfg);
    let world = cfg.num_nodes.max(1);
    let batch = o.batch_size.min(train.div_ceil(world)).max(1);
    let gather = if o.mode == Mode::GatherScatter && cfg.rank == 0 {
        largest_param.saturating_mul(world as u128)
    } else {
        0
    };
    Ok(TrainingMemory {
        parameters: params
            .saturating_mul(3)
            .saturating_add(gather)
            .saturating_mul(4),
        activations: per_image.saturating_mul(batch as u128).saturating_mul(4),
        data: (train as u128)
            .saturating_add(test as u128)
            .saturating_mul(IMAGE_SIZE as u128),
        batch,
    })
}

/// Bytes this process can still allocate: available RAM plus free swap, capped by its
/// cgroup's limit; `None` when the kernel does not say.
pub fn available_memory() -> Option<u128> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let field = |name: &str| -> Option<u128> {
        let line = meminfo.lines().find(|l| l.starts_with(name))?;
        let kib: u128 = line[name.len()..]
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        Some(kib * 1024)
    };
    let system = field("MemAvailable:")?.saturating_add(field("SwapFree:").unwrap_or(0));
    Some(match cgroup_headroom() {
        Some(limit) => system.min(limit),
        None => system,
    })
}

/// What this process's cgroup (v2) still allows: `memory.max - memory.current`.
fn cgroup_headroom() -> Option<u128> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = cgroups.lines().find_map(|l| l.strip_prefix("0::"))?;
    let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok();
    let max: u128 = read("memory.max")?.trim().parse().ok()?; // "max": no limit
    let current: u128 = read("memory.current")?.trim().parse().ok()?;
    Some(max.saturating_sub(current))
}

/// `12.3 GiB`-style text.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Refuse a run whose `ranks` local ranks certainly cannot fit in `available` bytes (when
/// known), naming the flags that size the largest part.
pub fn check_fits(
    cfg: &TrainConfig,
    ranks: usize,
    available: Option<u128>,
) -> Result<(), UsageError> {
    let m = training_memory(cfg)?;
    let need = m.total().saturating_mul(ranks as u128);
    let Some(available) = available else {
        return Ok(());
    };
    if need <= available {
        return Ok(());
    }
    let culprit = if m.data >= m.parameters && m.data >= m.activations {
        "a smaller dataset (--synthetic-train/--synthetic-test)"
    } else if m.activations >= m.parameters {
        "a smaller --batch-size or --model"
    } else {
        "a smaller --model"
    };
    let per_rank = if ranks > 1 {
        format!("{ranks} ranks, each with ")
    } else {
        String::new()
    };
    Err(UsageError::Invalid(format!(
        "this run needs at least {} of memory ({per_rank}{} for parameters and optimizer state, {} for the activations of a batch of {}, {} for the dataset) but {} is available; use {culprit}",
        human_bytes(need),
        human_bytes(m.parameters),
        human_bytes(m.activations),
        m.batch,
        human_bytes(m.data),
        human_bytes(available),
    )))
}

/// [`check_fits`] against this machine's available memory.
pub fn check_training_fits(cfg: &TrainConfig, ranks: usize) -> Result<(), UsageError> {
    check_fits(cfg, ranks, available_memory())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(line: &str) -> TrainConfig {
        let args = std::iter::once("dtrain").chain(line.split_whitespace());
        crate::args::parse_train_args(args.map(Into::into), &|_| None).expect("valid flags")
    }

    #[test]
    fn vgg11_estimate_is_a_lower_bound_of_its_known_footprint() {
        // VGG11 has 9.23 M parameters (PyTorch's count for the CIFAR variant).
        let m = training_memory(&cfg("--batch-size 128")).unwrap();
        let params = m.parameters / 12;
        assert!((9_200_000..9_300_000).contains(&params), "{params}");
        // One copy of VGG11's layer outputs at batch 128 is 182,784 floats per image.
        assert_eq!(m.activations, 182_784 * 4 * 128);
        assert_eq!(m.data, 60_000 * 3072);
        // The engine's whole batch-128 train step peaks at 376 MB RSS (README; no dataset).
        assert!(m.parameters + m.activations < 376_000_000, "{m:?}");
    }

    #[test]
    fn impossible_requests_are_refused_naming_the_flag() {
        let gib = 1u128 << 30;
        let small = cfg("--model 8,M --dataset synthetic --synthetic-train 64 --synthetic-test 8");
        check_fits(&small, 2, Some(gib)).expect("fits");
        check_fits(&small, 1, None).expect("unknown memory is not an error");
        let wide = cfg("--model 60000,60000,M --dataset synthetic --synthetic-train 64");
        let e = check_fits(&wide, 1, Some(16 * gib))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--model") && e.contains("16.0 GiB is available"),
            "{e}"
        );
        let batch = cfg(
            "--batch-size 100000 --dataset synthetic --synthetic-train 200000 --synthetic-test 1",
        );
        let e = check_fits(&batch, 1, Some(16 * gib))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--batch-size") && e.contains("batch of 100000"),
            "{e}"
        );
        // Sizes that would overflow 64-bit arithmetic saturate instead.
        let huge = format!(
            "--dataset synthetic --synthetic-train {} --synthetic-test {}",
            usize::MAX,
            usize::MAX
        );
        let e = check_fits(&cfg(&huge), 1, Some(16 * gib))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--synthetic-train"), "{e}");
        // The batch a rank trains on is at most its share of the training set.
        let m = training_memory(&cfg(&format!(
            "--batch-size {} --dataset synthetic --synthetic-train 100 --num-nodes 4",
            usize::MAX
        )))
        .unwrap();
        assert_eq!(m.batch, 25);
    }

    #[test]
    fn human_bytes_reads_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(
            human_bytes(u128::MAX),
            format!("{:.1} TiB", u128::MAX as f64 / 2f64.powi(40))
        );
    }
}
