//! Which SIMD instruction set the engine's kernels use, chosen once per process.
//!
//! Every vectorized kernel (SGEMM microkernels, convolution transforms, elementwise loops,
//! SGD) dispatches on [`level`]: the best level this CPU supports, capped by the
//! environment variable `DTRAIN_SIMD=portable|avx2|avx512`. The cap lets one machine run
//! and measure every lower path (an AVX-512 machine can test the AVX2 and portable code);
//! asking for a level the CPU lacks is refused with a message, never an illegal
//! instruction.
//!
//! Levels:
//! - [`SimdLevel::Portable`]: plain Rust (whatever the compiler's baseline gives: SSE2).
//! - [`SimdLevel::Avx2`]: AVX2 + FMA (Zen 3 and later, Haswell and later).
//! - [`SimdLevel::Avx512`]: AVX-512F (+ the BW/VL/DQ subsets every AVX-512 Zen has).
//!
//! The bf16 instructions (AVX512_BF16: `VDPBF16PS`, `VCVTNE2PS2BF16`) are an extension of the
//! AVX-512 level, not a level of their own: [`bf16_native`] is true when the process runs at
//! [`SimdLevel::Avx512`] and the CPU has them, so `DTRAIN_SIMD=avx2|portable` also selects the
//! emulated bf16 path (same bits, see [`crate::bf16`]).

use std::sync::OnceLock;

mod float_vec;
mod vector;
pub(crate) use float_vec::set_f32_impl_override;
pub use float_vec::{
    current_f32_impl, dispatch_f32_at, f32_impl_override, with_f32_impl, F32Impl, F64x4, FloatVec,
    VecKernel,
};
pub use vector::{dispatch, dispatch_at, F32Vec, Portable16, Portable8, SimdKernel};
#[cfg(target_arch = "x86_64")]
pub use vector::{Avx2, Avx512};

/// A SIMD instruction-set level, lowest first (so levels compare with `<`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SimdLevel {
    Portable,
    Avx2,
    Avx512,
}

impl SimdLevel {
    /// Every level, lowest first.
    pub const ALL: [SimdLevel; 3] = [SimdLevel::Portable, SimdLevel::Avx2, SimdLevel::Avx512];

    /// The name used by `DTRAIN_SIMD` and in reports.
    pub fn name(self) -> &'static str {
        match self {
            SimdLevel::Portable => "portable",
            SimdLevel::Avx2 => "avx2",
            SimdLevel::Avx512 => "avx512",
        }
    }

    /// Parse a `DTRAIN_SIMD` value (case-insensitive).
    pub fn parse(s: &str) -> Option<SimdLevel> {
        SimdLevel::ALL
            .into_iter()
            .find(|l| l.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU can run code of this level.
    pub fn is_supported(self) -> bool {
        match self {
            SimdLevel::Portable => true,
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => {
                SimdLevel::Avx2.is_supported()
                    && std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
            }
            #[cfg(not(target_arch = "x86_64"))]
            SimdLevel::Avx2 | SimdLevel::Avx512 => false,
        }
    }

    /// The best level this CPU supports (ignores `DTRAIN_SIMD`).
    pub fn best_supported() -> SimdLevel {
        SimdLevel::ALL
            .into_iter()
            .rev()
            .find(|l| l.is_supported())
            .unwrap_or(SimdLevel::Portable)
    }

    /// Every level this CPU supports, lowest first (for tests that cover each path).
    pub fn supported() -> Vec<SimdLevel> {
        SimdLevel::ALL
            .into_iter()
            .filter(|l| l.is_supported())
            .collect()
    }
}

/// Whether this CPU has AVX512_BF16 on top of [`SimdLevel::Avx512`] (ignores `DTRAIN_SIMD`).
pub fn bf16_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        SimdLevel::Avx512.is_supported() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Whether the bf16 kernels run natively in this process: [`level`] is
/// [`SimdLevel::Avx512`] and the CPU has AVX512_BF16. Otherwise they run emulated.
pub fn bf16_native() -> bool {
    level() == SimdLevel::Avx512 && bf16_supported()
}

/// Why a `DTRAIN_SIMD` value cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimdError {
    #[error("DTRAIN_SIMD={0:?} is not one of portable, avx2, avx512")]
    Unknown(String),
    #[error("DTRAIN_SIMD={wanted} asks for more than this CPU supports (best: {best})")]
    Unsupported {
        wanted: &'static str,
        best: &'static str,
    },
}

/// The level `DTRAIN_SIMD` (if set) asks for, checked against this CPU.
pub fn level_from_env() -> Result<SimdLevel, SimdError> {
    let best = SimdLevel::best_supported();
    match std::env::var("DTRAIN_SIMD") {
        Err(_) => Ok(best),
        Ok(v) if v.trim().is_empty() => Ok(best),
        Ok(v) => {
            let wanted = SimdLevel::parse(&v).ok_or(SimdError::Unknown(v))?;
            if wanted > best {
                Err(SimdError::Unsupported {
                    wanted: wanted.name(),
                    best: best.name(),
                })
            } else {
                Ok(wanted)
            }
        }
    }
}

/// The level every kernel uses in this process: [`level_from_env`], decided on first use.
/// An unusable `DTRAIN_SIMD` falls back to the best supported level with a warning on
/// stderr (programs that want a hard error call [`level_from_env`] first, as `dtrain` does).
pub fn level() -> SimdLevel {
    static LEVEL: OnceLock<SimdLevel> = OnceLock::new();
    *LEVEL.get_or_init(|| {
        level_from_env().unwrap_or_else(|e| {
            let best = SimdLevel::best_supported();
            eprintln!("warning: {e}; using {}", best.name());
            best
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_parse_and_order() {
        assert_eq!(SimdLevel::parse("AVX2"), Some(SimdLevel::Avx2));
        assert_eq!(SimdLevel::parse(" portable "), Some(SimdLevel::Portable));
        assert_eq!(SimdLevel::parse("avx512"), Some(SimdLevel::Avx512));
        assert_eq!(SimdLevel::parse("sse9"), None);
        assert!(SimdLevel::Portable < SimdLevel::Avx2 && SimdLevel::Avx2 < SimdLevel::Avx512);
        for l in SimdLevel::ALL {
            assert_eq!(SimdLevel::parse(l.name()), Some(l));
        }
    }

    #[test]
    fn supported_levels_are_a_prefix_ending_at_the_best() {
        let s = SimdLevel::supported();
        assert_eq!(s[0], SimdLevel::Portable);
        assert_eq!(*s.last().unwrap(), SimdLevel::best_supported());
        assert_eq!(&SimdLevel::ALL[..s.len()], &s[..]);
    }
}
