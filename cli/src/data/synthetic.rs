//! `--dataset synthetic`: CIFAR-shaped images generated from the seed, learnable but not
//! trivially.
//!
//! Each class has a template: an oriented sinusoidal grating (its own frequency and
//! direction within a quarter turn, so horizontal flips never map one class onto another)
//! with its own per-channel weights. A sample of class c is
//!   pixel = 128 + offset[ch] + amp * w_c[ch] * sin(2π(fx·x + fy·y)/32 + phase) + noise
//! with a random phase (so the network must recognise the pattern anywhere), a random
//! amplitude, a random colour offset shared by all classes (so the mean colour alone does not
//! give the class away) and uniform noise. Every sample's randomness comes from
//! (seed, split, index), so the data are identical on every rank and every run.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::augment::splitmix64;
use super::{try_zeroed, DataError, DataSplit, IMAGE_SIDE, IMAGE_SIZE, NUM_CLASSES};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    Train,
    Test,
}

#[derive(Clone, Copy, Debug)]
struct ClassTemplate {
    /// Cycles per image along x and y.
    fx: f32,
    fy: f32,
    /// Channel weights in [-1, 1].
    weights: [f32; 3],
}

fn templates(seed: u64) -> [ClassTemplate; NUM_CLASSES] {
    let mut rng = ChaCha8Rng::seed_from_u64(splitmix64(seed ^ 0x7465_6d70_6c61_7465));
    let mut out = [ClassTemplate {
        fx: 0.0,
        fy: 0.0,
        weights: [0.0; 3],
    }; NUM_CLASSES];
    for (c, t) in out.iter_mut().enumerate() {
        // Ten directions within a quarter turn: a horizontal flip (augmentation) mirrors a
        // direction into the other quarter, so no class turns into another one.
        let angle = std::f32::consts::FRAC_PI_2 * (c as f32 + rng.gen_range(-0.15..0.15))
            / NUM_CLASSES as f32;
        let freq = rng.gen_range(1.5f32..3.5);
        t.fx = freq * angle.cos();
        t.fy = freq * angle.sin();
        // Stripe colours: every channel clearly involved, with a random sign.
        for w in t.weights.iter_mut() {
            let sign = if rng.gen_bool(0.5) { 1.0 } else { -1.0 };
            *w = sign * rng.gen_range(0.5f32..1.0);
        }
    }
    out
}

/// Generate `n` samples of `split` (an error when they do not fit in memory).
pub fn generate(seed: u64, split: Split, n: usize) -> Result<DataSplit, DataError> {
    let templates = templates(seed);
    let split_key = match split {
        Split::Train => 0x7472_6169_6e00_0000u64,
        Split::Test => 0x7465_7374_0000_0000u64,
    };
    let what = format!("{n} synthetic images");
    let mut images = try_zeroed(n.checked_mul(IMAGE_SIZE), &what)?;
    let mut labels = try_zeroed(Some(n), &what)?;
    let side = IMAGE_SIDE;
    let two_pi = 2.0 * std::f32::consts::PI / side as f32;
    let mut sin_x = [0f32; IMAGE_SIDE];
    let mut cos_x = [0f32; IMAGE_SIDE];
    let mut sin_y = [0f32; IMAGE_SIDE];
    let mut cos_y = [0f32; IMAGE_SIDE];
    for i in 0..n {
        let mut rng =
            ChaCha8Rng::seed_from_u64(splitmix64(seed ^ split_key) ^ splitmix64(i as u64));
        let class = rng.gen_range(0..NUM_CLASSES);
        labels[i] = class as u8;
        let t = templates[class];
        let phase = rng.gen_range(0.0f32..2.0 * std::f32::consts::PI);
        let amp = rng.gen_range(40.0f32..70.0);
        let offset: [f32; 3] = [
            rng.gen_range(-25.0f32..25.0),
            rng.gen_range(-25.0f32..25.0),
            rng.gen_range(-25.0f32..25.0),
        ];
        // sin(a + b) = sin a cos b + cos a sin b, with a = fx·x + phase and b = fy·y, so only
        // 2×32 sines and cosines per image.
        for k in 0..side {
            let a = two_pi * t.fx * k as f32 + phase;
            let b = two_pi * t.fy * k as f32;
            sin_x[k] = a.sin();
            cos_x[k] = a.cos();
            sin_y[k] = b.sin();
            cos_y[k] = b.cos();
        }
        let img = &mut images[i * IMAGE_SIZE..(i + 1) * IMAGE_SIZE];
        for ch in 0..3 {
            let scale = amp * t.weights[ch];
            let base = 128.0 + offset[ch];
            for y in 0..side {
                for x in 0..side {
                    let wave = sin_x[x] * cos_y[y] + cos_x[x] * sin_y[y];
                    let noise: f32 = rng.gen_range(-32.0..32.0);
                    let v = base + scale * wave + noise;
                    img[ch * side * side + y * side + x] = v.clamp(0.0, 255.0) as u8;
                }
            }
        }
    }
    Ok(DataSplit { images, labels, n })
}
