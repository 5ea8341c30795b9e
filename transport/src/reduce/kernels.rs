//! The typed elementwise loops every float reduction ends in (f32, f64, and 16-bit floats
//! widened to f32 by [`super::half`]).

use super::dtype::ReduceOp;

/// Which operand is on the left of `⊕` (float `+` and max/min of ±0 depend on it).
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Order {
    DstFirst,
    SrcFirst,
}

/// `d[i] = d[i] ⊕ s[i]` (or `s[i] ⊕ d[i]`, by `order`), with AVX2 where the CPU has it.
/// `max(x, y)` is `y if y > x else x`: the left operand wins ties (±0) and NaN on the right;
/// `x + y` keeps `x`'s NaN when `x` is NaN (see [`add_left_nan`]).
pub(crate) fn combine_typed<T>(d: &mut [T], s: &[T], op: ReduceOp, order: Order)
where
    T: Copy + PartialOrd + std::ops::Add<Output = T> + bytemuck::Zeroable,
{
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked above).
        unsafe { combine_avx2(d, s, op, order) };
        return;
    }
    combine_loops(d, s, op, order)
}

/// The same loops compiled for AVX2: 256-bit vectors and a one-instruction select make the
/// NaN rule of [`add_left_nan`] free.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn combine_avx2<T>(d: &mut [T], s: &[T], op: ReduceOp, order: Order)
where
    T: Copy + PartialOrd + std::ops::Add<Output = T> + bytemuck::Zeroable,
{
    combine_loops(d, s, op, order)
}

/// `x + y`, except that when `x` is NaN the result is `x` (quieted). Which NaN the hardware
/// returns when *both* operands are NaN depends on the instruction's operand order, which the
/// compiler may swap (`+` commutes); adding 0 instead of `y` when `x` is NaN leaves a single
/// NaN operand, so a rank that folds its own values in as the right operand (`reduce_into`)
/// and one that folds them in as the left operand (`reduce_into_rev`) get the same bits.
/// (Selecting `y`, not the result, keeps LLVM from turning the loop into masked stores,
/// which are ~5x slower on Zen 3.)
#[inline(always)]
fn add_left_nan<T>(x: T, y: T) -> T
where
    T: Copy + PartialOrd + std::ops::Add<Output = T> + bytemuck::Zeroable,
{
    #[allow(clippy::eq_op)] // x != x: x is NaN
    let y = if x != x { T::zeroed() } else { y };
    x + y
}

#[inline(always)]
fn combine_loops<T>(d: &mut [T], s: &[T], op: ReduceOp, order: Order)
where
    T: Copy + PartialOrd + std::ops::Add<Output = T> + bytemuck::Zeroable,
{
    match (op, order) {
        (ReduceOp::Sum | ReduceOp::Avg, Order::DstFirst) => d
            .iter_mut()
            .zip(s)
            .for_each(|(a, &b)| *a = add_left_nan(*a, b)),
        (ReduceOp::Sum | ReduceOp::Avg, Order::SrcFirst) => d
            .iter_mut()
            .zip(s)
            .for_each(|(a, &b)| *a = add_left_nan(b, *a)),
        (ReduceOp::Max, Order::DstFirst) => d.iter_mut().zip(s).for_each(|(a, &b)| {
            if b > *a {
                *a = b
            }
        }),
        (ReduceOp::Max, Order::SrcFirst) => d.iter_mut().zip(s).for_each(|(a, &b)| {
            if (*a).partial_cmp(&b) != Some(std::cmp::Ordering::Greater) {
                *a = b
            }
        }),
        (ReduceOp::Min, Order::DstFirst) => d.iter_mut().zip(s).for_each(|(a, &b)| {
            if b < *a {
                *a = b
            }
        }),
        (ReduceOp::Min, Order::SrcFirst) => d.iter_mut().zip(s).for_each(|(a, &b)| {
            if (*a).partial_cmp(&b) != Some(std::cmp::Ordering::Less) {
                *a = b
            }
        }),
    }
}
