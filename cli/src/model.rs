//! The network a `--model` spec names, and the digest of its parameters that the equality
//! tests and checkpoints compare.

use engine::vgg::{Vgg, VggConfig};

use crate::data;
use crate::hash::Fnv1a;

/// A `--model` spec the engine cannot build (bad input: exit code 2 before training).
#[derive(Debug, thiserror::Error)]
#[error("--model {spec:?}: {reason}")]
pub struct ModelError {
    pub spec: String,
    pub reason: String,
}

/// Build the network a `--model` spec names (`vgg11` or e.g. `64,M,128,M`) for 3×32×32
/// images and 10 classes, initialised from `seed` (identical on every rank).
pub fn build_model(spec: &str, seed: u64) -> Result<Vgg<f32>, ModelError> {
    let config = VggConfig::from_spec(spec, data::CHANNELS, data::IMAGE_SIDE, data::NUM_CLASSES)
        .map_err(|e| ModelError {
            spec: spec.to_string(),
            reason: e.to_string(),
        })?;
    Ok(Vgg::new(config, seed))
}

/// FNV-1a (64 bit) over the little-endian bytes of every parameter, in parameter order.
pub fn parameter_hash(model: &Vgg<f32>) -> u64 {
    let mut h = Fnv1a::default();
    for p in model.params() {
        for v in &p.value {
            h.update(&v.to_le_bytes());
        }
    }
    h.finish()
}
