//! Elementwise loops shared by ops: one vectorized kernel ([`crate::Float::run`]) applied to
//! parallel chunks. An operation is a [`LaneOp`] (one function over vectors, so the same
//! source serves every SIMD level and f64).
use super::{par_chunks_mut, units_per_task};
use crate::simd::{FloatVec, VecKernel};
use crate::Float;

/// Elements per parallel task at least: below this the loop is faster than a task hand-off.
pub(crate) const MIN_TASK_ELEMS: usize = 1 << 15;

/// A lane-wise function of two vectors.
pub(crate) trait LaneOp: Copy + Send + Sync {
    fn apply<V: FloatVec>(self, a: V, b: V) -> V;
}

/// `out[i] = op(a[i], b[i])`, with `b = out` (read before written) when `b` is `None`.
pub(crate) struct MapKernel<'a, T, O> {
    pub(crate) op: O,
    pub(crate) a: &'a [T],
    pub(crate) b: Option<&'a [T]>,
    pub(crate) out: &'a mut [T],
}

impl<T: Float, O: LaneOp> VecKernel<T> for MapKernel<'_, T, O> {
    type Output = ();
    #[inline(always)]
    fn run<V: FloatVec<Elem = T>>(self) {
        let n = self.out.len();
        assert!(self.a.len() == n && self.b.is_none_or(|b| b.len() == n));
        let out = self.out.as_mut_ptr();
        let a = self.a.as_ptr();
        let b = self.b.map_or(out as *const T, |b| b.as_ptr());
        let mut i = 0;
        while i < n {
            // SAFETY: `min(n - i, LANES)` elements from `i` are inside all three slices (same
            // length, asserted); `b` may be `out` itself, read before the store.
            unsafe {
                let r = self
                    .op
                    .apply(V::load_n(a.add(i), n - i), V::load_n(b.add(i), n - i));
                r.store_n(out.add(i), n - i);
            }
            i += V::LANES;
        }
    }
}

/// `out = op(a, b)` elementwise, in parallel chunks.
pub(crate) fn map2<T: Float, O: LaneOp>(op: O, a: &[T], b: &[T], out: &mut [T]) {
    assert!(
        a.len() == out.len() && b.len() == out.len(),
        "map2: lengths differ"
    );
    let chunk = units_per_task(out.len(), 1, MIN_TASK_ELEMS);
    par_chunks_mut(out, chunk, |i, out| {
        let r = i * chunk..i * chunk + out.len();
        T::run(MapKernel {
            op,
            a: &a[r.clone()],
            b: Some(&b[r]),
            out,
        })
    });
}

/// `inout = op(a, inout)` elementwise, in parallel chunks.
pub(crate) fn map2_in_place<T: Float, O: LaneOp>(op: O, a: &[T], inout: &mut [T]) {
    assert_eq!(a.len(), inout.len(), "map2_in_place: lengths differ");
    let chunk = units_per_task(inout.len(), 1, MIN_TASK_ELEMS);
    par_chunks_mut(inout, chunk, |i, out| {
        T::run(MapKernel {
            op,
            a: &a[i * chunk..i * chunk + out.len()],
            b: None,
            out,
        })
    });
}

#[derive(Clone, Copy)]
struct Add;
impl LaneOp for Add {
    #[inline(always)]
    fn apply<V: FloatVec>(self, a: V, b: V) -> V {
        a.add(b)
    }
}

/// `acc += x` elementwise (gradient fan-out sums).
pub(crate) fn add_assign<T: Float>(acc: &mut [T], x: &[T]) {
    map2_in_place(Add, x, acc);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::random_vec;
    use crate::simd::F32Impl;

    #[test]
    fn map_kernel_matches_scalar_on_every_path_and_length() {
        for imp in F32Impl::runnable() {
            for n in [0usize, 1, 5, 8, 16, 17, 33, 1000] {
                let a: Vec<f32> = random_vec(n as u64, n, -1.0, 1.0)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                let b: Vec<f32> = random_vec(n as u64 + 9, n, -1.0, 1.0)
                    .iter()
                    .map(|&v| v as f32)
                    .collect();
                let want: Vec<f32> = a.iter().zip(&b).map(|(x, y)| x + y).collect();
                let mut out = vec![f32::NAN; n];
                imp.run(MapKernel {
                    op: Add,
                    a: &a,
                    b: Some(&b),
                    out: &mut out,
                });
                assert_eq!(out, want, "{imp:?} n={n}");
                let mut inout = b.clone();
                imp.run(MapKernel {
                    op: Add,
                    a: &a,
                    b: None,
                    out: &mut inout,
                });
                assert_eq!(inout, want, "{imp:?} n={n} in place");
            }
        }
    }
}
