//! Training transforms as torchvision's `RandomCrop(32, padding=4)` (zero padding) then
//! `RandomHorizontalFlip()`, then `Normalize(mean, std)` after scaling to [0, 1].
//!
//! The random choices of a sample come from an RNG seeded by (seed, epoch, dataset index),
//! so they do not depend on which rank or thread prepares it, nor on where a resumed run
//! restarts.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::{IMAGE_SIDE, IMAGE_SIZE};

/// Per-channel mean and std of CIFAR-10 training pixels, in 0..255 units (as the original).
pub const CIFAR_MEAN: [f32; 3] = [125.3, 123.0, 113.9];
pub const CIFAR_STD: [f32; 3] = [63.0, 62.1, 66.7];
pub const CROP_PADDING: usize = 4;

/// The random choices for one sample.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AugmentParams {
    /// Top-left corner of the crop in the 40×40 zero-padded image, each in 0..=8.
    pub crop_y: usize,
    pub crop_x: usize,
    pub flip: bool,
}

impl AugmentParams {
    /// The identity: crop at the centre, no flip.
    pub const IDENTITY: AugmentParams = AugmentParams {
        crop_y: CROP_PADDING,
        crop_x: CROP_PADDING,
        flip: false,
    };

    pub fn draw(seed: u64, epoch: usize, index: usize) -> Self {
        // Mix the three numbers so that nearby (epoch, index) pairs get unrelated streams.
        let key = splitmix64(splitmix64(seed ^ 0x6175_676d_656e_7421) ^ (epoch as u64))
            ^ splitmix64(index as u64);
        let mut rng = ChaCha8Rng::seed_from_u64(key);
        AugmentParams {
            crop_y: rng.gen_range(0..=2 * CROP_PADDING),
            crop_x: rng.gen_range(0..=2 * CROP_PADDING),
            flip: rng.gen_bool(0.5),
        }
    }
}

pub(crate) fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d4_9bb1_3311_10eb);
    x ^ (x >> 31)
}

/// Crop and flip one CHW u8 image: out[c][y][x] = padded[c][y + crop_y][x' + crop_x] with
/// x' = 31 - x when flipped, where `padded` is `src` with 4 zero pixels on every side.
pub fn augment_image(src: &[u8], p: AugmentParams, out: &mut [u8]) {
    assert_eq!(src.len(), IMAGE_SIZE);
    assert_eq!(out.len(), IMAGE_SIZE);
    let s = IMAGE_SIDE as isize;
    let pad = CROP_PADDING as isize;
    for c in 0..3 {
        let plane = &src[c * IMAGE_SIDE * IMAGE_SIDE..(c + 1) * IMAGE_SIDE * IMAGE_SIDE];
        let out_plane = &mut out[c * IMAGE_SIDE * IMAGE_SIDE..(c + 1) * IMAGE_SIDE * IMAGE_SIDE];
        for y in 0..s {
            let sy = y + p.crop_y as isize - pad;
            for x in 0..s {
                let xx = if p.flip { s - 1 - x } else { x };
                let sx = xx + p.crop_x as isize - pad;
                let v = if (0..s).contains(&sy) && (0..s).contains(&sx) {
                    plane[(sy * s + sx) as usize]
                } else {
                    0
                };
                out_plane[(y * s + x) as usize] = v;
            }
        }
    }
}

/// Scale to [0, 1] and normalize per channel: (v/255 - mean/255) / (std/255).
pub fn normalize_image(src: &[u8], out: &mut [f32]) {
    assert_eq!(src.len(), IMAGE_SIZE);
    assert_eq!(out.len(), IMAGE_SIZE);
    let plane = IMAGE_SIDE * IMAGE_SIDE;
    for c in 0..3 {
        let mean = CIFAR_MEAN[c] / 255.0;
        let inv_std = 255.0 / CIFAR_STD[c];
        for i in c * plane..(c + 1) * plane {
            out[i] = (src[i] as f32 / 255.0 - mean) * inv_std;
        }
    }
}
