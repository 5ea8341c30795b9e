//! Element types and the reduction kernels every backend shares.
//!
//! Backends move bytes; reductions are applied to byte slices tagged with a [`DType`].
//! Sum order is documented per algorithm; this module only combines two buffers elementwise
//! (`dtype.rs`: the element types; `kernels.rs`: the typed loops, shared with [`half`]).
//! 16-bit floats ([`Bf16`], [`F16`]: compressed all-reduce) are combined through f32, see
//! [`half`].

mod dtype;
pub mod half;
mod kernels;

pub use dtype::{DType, Element, ReduceOp};
pub use half::{Bf16, HalfFloat, F16};
use kernels::{combine_typed, Order};

/// `dst[i] = dst[i] ⊕ src[i]` for `Sum`/`Avg` (Avg sums here; the caller scales once at the
/// end with [`scale_for_avg`]), `Max`, `Min`. Panics if lengths differ or the dtype is `U8`
/// (a programming error, not user input).
pub fn reduce_into(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) {
    reduce_bytes(dst, src, dtype, op, Order::DstFirst);
}

/// `dst[i] = src[i] ⊕ dst[i]`: like [`reduce_into`] with `src` as the left operand, so a
/// rank can fold its own values into a buffer holding an earlier rank's and keep the
/// documented rank order bit for bit (float `+` and max/min of ±0 depend on operand order).
pub fn reduce_into_rev(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp) {
    reduce_bytes(dst, src, dtype, op, Order::SrcFirst);
}

fn reduce_bytes(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp, order: Order) {
    assert_eq!(dst.len(), src.len(), "reduce_into: length mismatch");
    match dtype {
        DType::F32 => combine::<f32>(dst, src, op, order),
        DType::F64 => combine::<f64>(dst, src, op, order),
        // Wrapping add and integer max/min do not depend on operand order.
        DType::I64 => combine_i64(dst, src, op),
        DType::BF16 | DType::F16 => half::combine(dst, src, dtype, op, order),
        DType::U8 => panic!("reduce_into: U8 buffers cannot be reduced"),
    }
}

/// `Avg` finishes with a division by `world_size`; other ops are untouched.
pub fn scale_for_avg(buf: &mut [u8], dtype: DType, op: ReduceOp, world_size: usize) {
    if op != ReduceOp::Avg || world_size <= 1 {
        return;
    }
    match dtype {
        DType::F32 => {
            let inv = 1.0 / world_size as f32;
            for v in cast_mut::<f32>(buf) {
                *v *= inv;
            }
        }
        DType::F64 => {
            let inv = 1.0 / world_size as f64;
            for v in cast_mut::<f64>(buf) {
                *v *= inv;
            }
        }
        DType::I64 => {
            for v in cast_mut::<i64>(buf) {
                *v /= world_size as i64;
            }
        }
        DType::BF16 | DType::F16 => half::scale(buf, dtype, 1.0 / world_size as f32),
        DType::U8 => panic!("scale_for_avg: U8 buffers cannot be reduced"),
    }
}

fn cast_mut<T: bytemuck::Pod>(buf: &mut [u8]) -> &mut [T] {
    bytemuck::cast_slice_mut(buf)
}

// Float combine: written as simple slice loops over chunks so LLVM vectorizes them.
fn combine<T>(dst: &mut [u8], src: &[u8], op: ReduceOp, order: Order)
where
    T: bytemuck::Pod + PartialOrd + std::ops::Add<Output = T>,
{
    // Buffers handed to reductions may be unaligned byte slices (e.g. network frames):
    // fall back to an unaligned path when a cast is not possible.
    match (
        bytemuck::try_cast_slice_mut::<u8, T>(dst),
        bytemuck::try_cast_slice::<u8, T>(src),
    ) {
        (Ok(d), Ok(s)) => combine_typed(d, s, op, order),
        (d, s) => {
            let _ = (d, s);
            combine_unaligned::<T>(dst, src, op, order)
        }
    }
}

fn combine_unaligned<T>(dst: &mut [u8], src: &[u8], op: ReduceOp, order: Order)
where
    T: bytemuck::Pod + PartialOrd + std::ops::Add<Output = T>,
{
    let size = std::mem::size_of::<T>();
    for (d, s) in dst.chunks_exact_mut(size).zip(src.chunks_exact(size)) {
        let mut a: T = bytemuck::pod_read_unaligned(d);
        let b: T = bytemuck::pod_read_unaligned(s);
        combine_typed(
            std::slice::from_mut(&mut a),
            std::slice::from_ref(&b),
            op,
            order,
        );
        d.copy_from_slice(bytemuck::bytes_of(&a));
    }
}

fn combine_i64(dst: &mut [u8], src: &[u8], op: ReduceOp) {
    let size = 8;
    for (d, s) in dst.chunks_exact_mut(size).zip(src.chunks_exact(size)) {
        let a: i64 = bytemuck::pod_read_unaligned(d);
        let b: i64 = bytemuck::pod_read_unaligned(s);
        let r = match op {
            ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
            ReduceOp::Max => a.max(b),
            ReduceOp::Min => a.min(b),
        };
        d.copy_from_slice(&r.to_ne_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reduce_into_matches_scalar_ops() {
        let mut a: Vec<f32> = vec![1.0, -2.0, 3.5, 0.0, 7.0];
        let b: Vec<f32> = vec![0.5, 4.0, -3.5, -1.0, 7.0];
        let mut sum = a.clone();
        reduce_into(
            bytemuck::cast_slice_mut(&mut sum),
            bytemuck::cast_slice(&b),
            DType::F32,
            ReduceOp::Sum,
        );
        assert_eq!(sum, vec![1.5, 2.0, 0.0, -1.0, 14.0]);
        reduce_into(
            bytemuck::cast_slice_mut(&mut a),
            bytemuck::cast_slice(&b),
            DType::F32,
            ReduceOp::Max,
        );
        assert_eq!(a, vec![1.0, 4.0, 3.5, 0.0, 7.0]);
        let mut i: Vec<i64> = vec![5, -9, i64::MAX];
        let j: Vec<i64> = vec![-6, 2, 0];
        reduce_into(
            bytemuck::cast_slice_mut(&mut i),
            bytemuck::cast_slice(&j),
            DType::I64,
            ReduceOp::Min,
        );
        assert_eq!(i, vec![-6, -9, 0]);
        let mut avg: Vec<f64> = vec![3.0, 9.0];
        scale_for_avg(
            bytemuck::cast_slice_mut(&mut avg),
            DType::F64,
            ReduceOp::Avg,
            3,
        );
        assert_eq!(avg, vec![1.0, 3.0]);
    }

    /// `reduce_into(x, y)` and `reduce_into_rev(y, x)` give the same bytes for all pairs of
    /// `vals`, one pair per element (so the vector loops run, not just the tails).
    fn check_swapped_operands<T: bytemuck::Pod>(vals: &[T], dtype: DType) {
        let (mut xs, mut ys) = (Vec::new(), Vec::new());
        for &x in vals {
            for &y in vals {
                xs.push(x);
                ys.push(y);
            }
        }
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            for len in [1, xs.len()] {
                let mut fwd = xs[..len].to_vec();
                reduce_into(
                    bytemuck::cast_slice_mut(&mut fwd),
                    bytemuck::cast_slice(&ys[..len]),
                    dtype,
                    op,
                );
                let mut rev = ys[..len].to_vec();
                reduce_into_rev(
                    bytemuck::cast_slice_mut(&mut rev),
                    bytemuck::cast_slice(&xs[..len]),
                    dtype,
                    op,
                );
                let (f, r): (&[u8], &[u8]) =
                    (bytemuck::cast_slice(&fwd), bytemuck::cast_slice(&rev));
                let size = dtype.size();
                for (k, (a, b)) in f.chunks(size).zip(r.chunks(size)).enumerate() {
                    assert_eq!(
                        a,
                        b,
                        "{dtype:?} {op:?}: pair {k} (x = {:?}, y = {:?})",
                        bytemuck::bytes_of(&xs[k]),
                        bytemuck::bytes_of(&ys[k])
                    );
                }
            }
        }
    }

    #[test]
    fn reduce_into_rev_is_reduce_into_with_operands_swapped_bit_for_bit() {
        let f32_bits = [
            0x0000_0000u32, // 0
            0x8000_0000,    // -0
            0x3fc0_0000,    // 1.5
            0xc010_0000,    // -2.25
            0x7fc0_0000,    // NaN
            0xffc0_0000,    // -NaN
            0x7fc1_2345,    // NaN with a payload
            0x7f80_0001,    // signalling NaN
            0x7f80_0000,    // inf
            0xff80_0000,    // -inf
            0x0000_6ce3,    // subnormal
        ];
        let f32s: Vec<f32> = f32_bits.iter().map(|&b| f32::from_bits(b)).collect();
        check_swapped_operands(&f32s, DType::F32);
        let f64s: Vec<f64> = f32s.iter().map(|&v| v as f64).collect();
        let mut f64s = f64s;
        f64s.push(f64::from_bits(0x7ff8_0000_dead_beef));
        check_swapped_operands(&f64s, DType::F64);
        let bf16s: Vec<Bf16> = f32s.iter().map(|&v| Bf16::from_f32(v)).collect();
        check_swapped_operands(&bf16s, DType::BF16);
        let mut f16s: Vec<F16> = f32s.iter().map(|&v| F16::from_f32(v)).collect();
        f16s.extend([0x7d01u16, 0xfe55, 0x0001, 0x7bff].map(F16::from_bits));
        check_swapped_operands(&f16s, DType::F16);
        assert_eq!(
            {
                let mut d = [-0.0f32];
                reduce_into(
                    bytemuck::cast_slice_mut(&mut d),
                    bytemuck::cast_slice(&[0.0f32]),
                    DType::F32,
                    ReduceOp::Max,
                );
                d[0].to_bits()
            },
            (-0.0f32).to_bits(),
            "the left operand wins a tie"
        );
    }

    /// 16-bit sums are `round16(f32(a) + f32(b))`, averages `round16(f32(a) * (1/n))`: checked
    /// against an f64 model (the f64 sum of two f32 rounds to the f32 sum exactly), on aligned
    /// and unaligned bytes and an odd length.
    #[test]
    fn half_reductions_round_the_f32_result_once() {
        fn check<H: HalfFloat + std::fmt::Debug>(scale: f32) {
            let n = 1001;
            let mut x: u32 = 12345;
            let mut next = || {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((x >> 8) as f32 / (1 << 24) as f32 - 0.5) * scale
            };
            let a: Vec<H> = (0..n).map(|_| H::from_f32(next())).collect();
            let b: Vec<H> = (0..n).map(|_| H::from_f32(next() * 0.01)).collect();
            let want_sum: Vec<H> = a
                .iter()
                .zip(&b)
                .map(|(p, q)| H::from_f32((p.to_f32() as f64 + q.to_f32() as f64) as f32))
                .collect();
            let want_avg: Vec<H> = want_sum
                .iter()
                .map(|s| H::from_f32((s.to_f32() as f64 * (1.0f32 / 3.0) as f64) as f32))
                .collect();
            for offset in [0, 1] {
                let mut dst = vec![0u8; 2 * n + 1];
                let mut src = vec![0u8; 2 * n + 1];
                dst[offset..offset + 2 * n].copy_from_slice(bytemuck::cast_slice(&a));
                src[offset..offset + 2 * n].copy_from_slice(bytemuck::cast_slice(&b));
                let d = &mut dst[offset..offset + 2 * n];
                reduce_into(d, &src[offset..offset + 2 * n], H::DTYPE, ReduceOp::Sum);
                assert_eq!(
                    d,
                    bytemuck::cast_slice::<H, u8>(&want_sum),
                    "{:?} sum",
                    H::DTYPE
                );
                scale_for_avg(d, H::DTYPE, ReduceOp::Avg, 3);
                assert_eq!(
                    d,
                    bytemuck::cast_slice::<H, u8>(&want_avg),
                    "{:?} avg",
                    H::DTYPE
                );
            }
        }
        check::<Bf16>(1.0e3);
        check::<F16>(100.0);
    }

    #[test]
    fn reduce_into_handles_unaligned_bytes() {
        let a: Vec<f32> = vec![1.0, 2.0, 3.0];
        let b: Vec<f32> = vec![10.0, 20.0, 30.0];
        let mut dst = [0u8; 13];
        dst[1..].copy_from_slice(bytemuck::cast_slice(&a));
        let mut src = [0u8; 13];
        src[1..].copy_from_slice(bytemuck::cast_slice(&b));
        reduce_into(&mut dst[1..], &src[1..], DType::F32, ReduceOp::Sum);
        let out: Vec<f32> = dst[1..]
            .chunks_exact(4)
            .map(bytemuck::pod_read_unaligned)
            .collect();
        assert_eq!(out, vec![11.0, 22.0, 33.0]);
    }
}
