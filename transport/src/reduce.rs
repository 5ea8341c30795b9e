//! Element types and the reduction kernels every backend shares.
//!
//! Backends move bytes; reductions are applied to byte slices tagged with a [`DType`].
//! Sum order is documented per algorithm; this file only combines two buffers elementwise.

/// The reduction a collective applies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum, then divide by the world size (integers: truncating division).
    Avg,
    Max,
    Min,
}

/// Element types collectives can reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    F64,
    I64,
    /// Raw bytes: may be moved, not reduced.
    U8,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::U8 => 1,
        }
    }
}

/// A `Pod` type with a [`DType`] tag.
pub trait Element: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
}
impl Element for f32 {
    const DTYPE: DType = DType::F32;
}
impl Element for f64 {
    const DTYPE: DType = DType::F64;
}
impl Element for i64 {
    const DTYPE: DType = DType::I64;
}
impl Element for u8 {
    const DTYPE: DType = DType::U8;
}

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

#[derive(Clone, Copy, PartialEq)]
enum Order {
    DstFirst,
    SrcFirst,
}

fn reduce_bytes(dst: &mut [u8], src: &[u8], dtype: DType, op: ReduceOp, order: Order) {
    assert_eq!(dst.len(), src.len(), "reduce_into: length mismatch");
    match dtype {
        DType::F32 => combine::<f32>(dst, src, op, order),
        DType::F64 => combine::<f64>(dst, src, op, order),
        // Wrapping add and integer max/min do not depend on operand order.
        DType::I64 => combine_i64(dst, src, op),
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

/// `max(x, y)` is `y if y > x else x`: the left operand wins ties (±0) and NaN on the right.
fn combine_typed<T>(d: &mut [T], s: &[T], op: ReduceOp, order: Order)
where
    T: Copy + PartialOrd + std::ops::Add<Output = T>,
{
    match (op, order) {
        (ReduceOp::Sum | ReduceOp::Avg, Order::DstFirst) => {
            d.iter_mut().zip(s).for_each(|(a, &b)| *a = *a + b)
        }
        (ReduceOp::Sum | ReduceOp::Avg, Order::SrcFirst) => {
            d.iter_mut().zip(s).for_each(|(a, &b)| *a = b + *a)
        }
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

    #[test]
    fn reduce_into_rev_is_reduce_into_with_operands_swapped_bit_for_bit() {
        let vals = [
            0.0f32,
            -0.0,
            1.5,
            -2.25,
            f32::NAN,
            -f32::NAN,
            f32::INFINITY,
            1e-40,
        ];
        for op in [ReduceOp::Sum, ReduceOp::Max, ReduceOp::Min] {
            for &x in &vals {
                for &y in &vals {
                    // forward: x ⊕ y with x in dst; reversed: x ⊕ y with y in dst.
                    let mut fwd = [x];
                    let bytes = |v: &mut [f32; 1]| bytemuck::cast_slice_mut::<f32, u8>(v).to_vec();
                    reduce_into(
                        bytemuck::cast_slice_mut(&mut fwd),
                        bytemuck::cast_slice(&[y]),
                        DType::F32,
                        op,
                    );
                    let mut rev = [y];
                    reduce_into_rev(
                        bytemuck::cast_slice_mut(&mut rev),
                        bytemuck::cast_slice(&[x]),
                        DType::F32,
                        op,
                    );
                    assert_eq!(bytes(&mut fwd), bytes(&mut rev), "{op:?} {x} {y}");
                }
            }
        }
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
