//! Kernels generic over the element type too: [`FloatVec`] is [`F32Vec`]'s interface with
//! the element as an associated type, so an op's kernel is written once for `f32` (every
//! [`F32Vec`] type, through a blanket impl) and `f64` ([`F64x4`], plain Rust). The f64
//! instance is what the gradient checks differentiate: the same source as training runs.
//!
//! [`VecKernel`] is [`super::SimdKernel`] generic over the element; [`crate::Float::run`]
//! runs one at the process's SIMD level (f32) or on [`F64x4`] (f64).

use super::{F32Vec, SimdKernel, SimdLevel};
use crate::Float;

/// A vector of `LANES` lanes of `Elem`, with [`F32Vec`]'s operations and semantics (x86
/// comparison and `max`/`min` NaN rules, fused `mul_add`, fixed-order `reduce_sum`).
pub trait FloatVec: Copy + Send + Sync + 'static {
    type Elem: Float;
    const LANES: usize;
    type Mask: Copy;

    fn splat(x: Self::Elem) -> Self;
    fn zero() -> Self;
    /// # Safety
    /// `p .. p + LANES` must be readable.
    unsafe fn load(p: *const Self::Elem) -> Self;
    /// # Safety
    /// `p .. p + LANES` must be writable.
    unsafe fn store(self, p: *mut Self::Elem);
    /// First `n <= LANES` lanes; the others are 0.
    ///
    /// # Safety
    /// `p .. p + n` must be readable.
    unsafe fn load_partial(p: *const Self::Elem, n: usize) -> Self;
    /// # Safety
    /// `p .. p + n` must be writable.
    unsafe fn store_partial(self, p: *mut Self::Elem, n: usize);
    fn add(self, b: Self) -> Self;
    fn sub(self, b: Self) -> Self;
    fn mul(self, b: Self) -> Self;
    fn div(self, b: Self) -> Self;
    /// `self * b + c`, one rounding.
    fn mul_add(self, b: Self, c: Self) -> Self;
    fn max(self, b: Self) -> Self;
    fn min(self, b: Self) -> Self;
    fn gt(self, b: Self) -> Self::Mask;
    fn lt(self, b: Self) -> Self::Mask;
    fn eq(self, b: Self) -> Self::Mask;
    fn is_nan(self) -> Self::Mask;
    fn mask_or(a: Self::Mask, b: Self::Mask) -> Self::Mask;
    fn select(m: Self::Mask, t: Self, f: Self) -> Self;
    fn reduce_sum(self) -> Self::Elem;
    /// # Safety
    /// `p .. p + LANES` must be readable.
    unsafe fn load_u8(p: *const u8) -> Self;
    /// Lanes must hold integers in `0 ..= 255`.
    ///
    /// # Safety
    /// `p .. p + LANES` must be writable.
    unsafe fn store_u8(self, p: *mut u8);
    fn deinterleave(a: Self, b: Self) -> (Self, Self);
    fn interleave(a: Self, b: Self) -> (Self, Self);
    /// See [`F32Vec::deinterleave_quarters`].
    fn deinterleave_quarters(a: Self, b: Self) -> (Self, Self);
    /// See [`F32Vec::interleave_quarters`].
    fn interleave_quarters(a: Self, b: Self) -> (Self, Self);

    /// [`FloatVec::load`] if `n >= LANES`, else [`FloatVec::load_partial`] (loops whose last
    /// step is short; the branch is predicted).
    ///
    /// # Safety
    /// `p .. p + min(n, LANES)` must be readable.
    #[inline(always)]
    unsafe fn load_n(p: *const Self::Elem, n: usize) -> Self {
        // SAFETY: forwarded contract.
        unsafe {
            if n >= Self::LANES {
                Self::load(p)
            } else {
                Self::load_partial(p, n)
            }
        }
    }
    /// [`FloatVec::store`] if `n >= LANES`, else [`FloatVec::store_partial`].
    ///
    /// # Safety
    /// `p .. p + min(n, LANES)` must be writable.
    #[inline(always)]
    unsafe fn store_n(self, p: *mut Self::Elem, n: usize) {
        // SAFETY: forwarded contract.
        unsafe {
            if n >= Self::LANES {
                self.store(p)
            } else {
                self.store_partial(p, n)
            }
        }
    }

    /// [`FloatVec::load_u8`] of the first `n <= LANES` bytes (the other lanes are 0).
    ///
    /// # Safety
    /// `p .. p + n` must be readable.
    #[inline(always)]
    unsafe fn load_u8_partial(p: *const u8, n: usize) -> Self {
        let mut tmp = [0u8; 64];
        // SAFETY: `n <= LANES <= 64` bytes are readable at `p` (caller) and fit `tmp`.
        unsafe {
            std::ptr::copy_nonoverlapping(p, tmp.as_mut_ptr(), n.min(Self::LANES));
            Self::load_u8(tmp.as_ptr())
        }
    }
    /// [`FloatVec::store_u8`] of the first `n <= LANES` lanes.
    ///
    /// # Safety
    /// `p .. p + n` must be writable.
    #[inline(always)]
    unsafe fn store_u8_partial(self, p: *mut u8, n: usize) {
        let mut tmp = [0u8; 64];
        // SAFETY: `tmp` holds `LANES <= 64` bytes; `n <= LANES` are writable at `p`.
        unsafe {
            self.store_u8(tmp.as_mut_ptr());
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), p, n.min(Self::LANES));
        }
    }
}

/// A kernel written once for every [`FloatVec`] of element `T`.
pub trait VecKernel<T> {
    type Output;
    /// The kernel body; must be `#[inline(always)]` (see [`super::SimdKernel`]).
    fn run<V: FloatVec<Elem = T>>(self) -> Self::Output;
}

/// Runs an f32 [`VecKernel`] at `level` (tests and benches compare levels this way; ops use
/// [`crate::Float::run`]). Panics if the CPU lacks `level`.
#[inline]
pub fn dispatch_f32_at<K: VecKernel<f32>>(level: SimdLevel, kernel: K) -> K::Output {
    super::dispatch_at(level, AsSimdKernel(kernel))
}

/// One way to run an f32 kernel on this machine, for tests that cover every path: each
/// supported [`SimdLevel`], and [`super::Portable16`] (AVX-512's 16-lane logic in plain
/// Rust, so tiling and tails of the AVX-512 instance are tested on CPUs without it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum F32Impl {
    Level(SimdLevel),
    Portable16,
}

impl F32Impl {
    /// Every variant this CPU can run; prints a loud notice once when AVX-512 cannot run here.
    pub fn runnable() -> Vec<F32Impl> {
        if !SimdLevel::Avx512.is_supported() {
            static NOTICE: std::sync::Once = std::sync::Once::new();
            NOTICE.call_once(|| {
                eprintln!(
                    "!!!!! AVX-512 not supported by this CPU: AVX-512 kernels were NOT executed \
                     (their 16-lane logic runs as Portable16) !!!!!"
                )
            });
        }
        let mut v: Vec<F32Impl> = SimdLevel::supported()
            .into_iter()
            .map(F32Impl::Level)
            .collect();
        v.push(F32Impl::Portable16);
        v
    }
    /// Runs `kernel` on this variant.
    pub fn run<K: VecKernel<f32>>(self, kernel: K) -> K::Output {
        self.run_simd(AsSimdKernel(kernel))
    }
    /// Runs an [`SimdKernel`] on this variant.
    pub fn run_simd<K: SimdKernel>(self, kernel: K) -> K::Output {
        match self {
            F32Impl::Level(l) => super::dispatch_at(l, kernel),
            F32Impl::Portable16 => kernel.run::<super::Portable16>(),
        }
    }
}

thread_local! {
    /// The innermost [`with_f32_impl`] on this thread.
    static F32_OVERRIDE: std::cell::Cell<Option<F32Impl>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with every f32 kernel dispatched through [`crate::Float::run`] or
/// [`super::dispatch`] running on `imp` — on this thread and in the tasks of the parallel
/// loops it starts — instead of at [`super::level`]. For tests and benches that compare paths
/// (the SGEMM keeps its own dispatch on [`super::level`]). Panics if the CPU cannot run `imp`.
pub fn with_f32_impl<R>(imp: F32Impl, f: impl FnOnce() -> R) -> R {
    if let F32Impl::Level(l) = imp {
        assert!(
            l.is_supported(),
            "SIMD level {} is not supported by this CPU",
            l.name()
        );
    }
    struct Restore(Option<F32Impl>);
    impl Drop for Restore {
        fn drop(&mut self) {
            F32_OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(F32_OVERRIDE.with(|o| o.replace(Some(imp))));
    f()
}

/// The [`with_f32_impl`] override in effect on this thread, if any (the thread pool hands it
/// to the tasks of a loop).
pub fn f32_impl_override() -> Option<F32Impl> {
    F32_OVERRIDE.with(|o| o.get())
}

/// Sets this thread's override (thread pool workers, for the duration of a job).
pub(crate) fn set_f32_impl_override(imp: Option<F32Impl>) {
    F32_OVERRIDE.with(|o| o.set(imp))
}

/// How f32 kernels run here now: the override, else the process's [`super::level`].
#[inline]
pub fn current_f32_impl() -> F32Impl {
    f32_impl_override().unwrap_or_else(|| F32Impl::Level(super::level()))
}

/// An f32 [`VecKernel`] seen as a [`SimdKernel`] (every [`F32Vec`] is a [`FloatVec`]).
struct AsSimdKernel<K>(K);

impl<K: VecKernel<f32>> SimdKernel for AsSimdKernel<K> {
    type Output = K::Output;
    #[inline(always)]
    fn run<V: F32Vec>(self) -> K::Output {
        self.0.run::<V>()
    }
}

impl<V: F32Vec> FloatVec for V {
    type Elem = f32;
    const LANES: usize = <V as F32Vec>::LANES;
    type Mask = <V as F32Vec>::Mask;

    #[inline(always)]
    fn splat(x: f32) -> Self {
        <V as F32Vec>::splat(x)
    }
    #[inline(always)]
    fn zero() -> Self {
        <V as F32Vec>::zero()
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        // SAFETY: forwarded contract.
        unsafe { <V as F32Vec>::load(p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        // SAFETY: forwarded contract.
        unsafe { <V as F32Vec>::store(self, p) }
    }
    #[inline(always)]
    unsafe fn load_partial(p: *const f32, n: usize) -> Self {
        // SAFETY: forwarded contract.
        unsafe { <V as F32Vec>::load_partial(p, n) }
    }
    #[inline(always)]
    unsafe fn store_partial(self, p: *mut f32, n: usize) {
        // SAFETY: forwarded contract.
        unsafe { <V as F32Vec>::store_partial(self, p, n) }
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        <V as F32Vec>::add(self, b)
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        <V as F32Vec>::sub(self, b)
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        <V as F32Vec>::mul(self, b)
    }
    #[inline(always)]
    fn div(self, b: Self) -> Self {
        <V as F32Vec>::div(self, b)
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        <V as F32Vec>::mul_add(self, b, c)
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        <V as F32Vec>::max(self, b)
    }
    #[inline(always)]
    fn min(self, b: Self) -> Self {
        <V as F32Vec>::min(self, b)
    }
    #[inline(always)]
    fn gt(self, b: Self) -> Self::Mask {
        <V as F32Vec>::gt(self, b)
    }
    #[inline(always)]
    fn lt(self, b: Self) -> Self::Mask {
        <V as F32Vec>::lt(self, b)
    }
    #[inline(always)]
    fn eq(self, b: Self) -> Self::Mask {
        <V as F32Vec>::eq(self, b)
    }
    #[inline(always)]
    fn is_nan(self) -> Self::Mask {
        <V as F32Vec>::is_nan(self)
    }
    #[inline(always)]
    fn mask_or(a: Self::Mask, b: Self::Mask) -> Self::Mask {
        <V as F32Vec>::mask_or(a, b)
    }
    #[inline(always)]
    fn select(m: Self::Mask, t: Self, f: Self) -> Self {
        <V as F32Vec>::select(m, t, f)
    }
    #[inline(always)]
    fn reduce_sum(self) -> f32 {
        <V as F32Vec>::reduce_sum(self)
    }
    #[inline(always)]
    unsafe fn load_u8(p: *const u8) -> Self {
        // SAFETY: forwarded contract.
        unsafe { <V as F32Vec>::load_u8(p) }
    }
    #[inline(always)]
    unsafe fn store_u8(self, p: *mut u8) {
        // SAFETY: forwarded contract.
        unsafe { <V as F32Vec>::store_u8(self, p) }
    }
    #[inline(always)]
    fn deinterleave(a: Self, b: Self) -> (Self, Self) {
        <V as F32Vec>::deinterleave(a, b)
    }
    #[inline(always)]
    fn interleave(a: Self, b: Self) -> (Self, Self) {
        <V as F32Vec>::interleave(a, b)
    }
    #[inline(always)]
    fn deinterleave_quarters(a: Self, b: Self) -> (Self, Self) {
        <V as F32Vec>::deinterleave_quarters(a, b)
    }
    #[inline(always)]
    fn interleave_quarters(a: Self, b: Self) -> (Self, Self) {
        <V as F32Vec>::interleave_quarters(a, b)
    }
}

/// 4 f64 lanes in plain Rust: the f64 (gradient-check) instance of every kernel.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct F64x4(pub [f64; 4]);

impl F64x4 {
    #[inline(always)]
    fn map2(self, b: Self, f: impl Fn(f64, f64) -> f64) -> Self {
        F64x4(std::array::from_fn(|i| f(self.0[i], b.0[i])))
    }
    #[inline(always)]
    fn mask2(self, b: Self, f: impl Fn(f64, f64) -> bool) -> [bool; 4] {
        std::array::from_fn(|i| f(self.0[i], b.0[i]))
    }
}

impl FloatVec for F64x4 {
    type Elem = f64;
    const LANES: usize = 4;
    type Mask = [bool; 4];

    #[inline(always)]
    fn splat(x: f64) -> Self {
        F64x4([x; 4])
    }
    #[inline(always)]
    fn zero() -> Self {
        F64x4([0.0; 4])
    }
    #[inline(always)]
    unsafe fn load(p: *const f64) -> Self {
        // SAFETY: the caller guarantees 4 readable values at `p`.
        F64x4(unsafe { std::ptr::read_unaligned(p as *const [f64; 4]) })
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f64) {
        // SAFETY: the caller guarantees 4 writable values at `p`.
        unsafe { std::ptr::write_unaligned(p as *mut [f64; 4], self.0) }
    }
    #[inline(always)]
    unsafe fn load_partial(p: *const f64, n: usize) -> Self {
        let mut out = [0.0; 4];
        for (i, o) in out.iter_mut().enumerate().take(n.min(4)) {
            // SAFETY: the caller guarantees `n` readable values at `p`.
            *o = unsafe { *p.add(i) };
        }
        F64x4(out)
    }
    #[inline(always)]
    unsafe fn store_partial(self, p: *mut f64, n: usize) {
        for i in 0..n.min(4) {
            // SAFETY: the caller guarantees `n` writable values at `p`.
            unsafe { *p.add(i) = self.0[i] };
        }
    }
    #[inline(always)]
    fn add(self, b: Self) -> Self {
        self.map2(b, |x, y| x + y)
    }
    #[inline(always)]
    fn sub(self, b: Self) -> Self {
        self.map2(b, |x, y| x - y)
    }
    #[inline(always)]
    fn mul(self, b: Self) -> Self {
        self.map2(b, |x, y| x * y)
    }
    #[inline(always)]
    fn div(self, b: Self) -> Self {
        self.map2(b, |x, y| x / y)
    }
    #[inline(always)]
    fn mul_add(self, b: Self, c: Self) -> Self {
        F64x4(std::array::from_fn(|i| self.0[i].mul_add(b.0[i], c.0[i])))
    }
    #[inline(always)]
    fn max(self, b: Self) -> Self {
        self.map2(b, |x, y| if x > y { x } else { y })
    }
    #[inline(always)]
    fn min(self, b: Self) -> Self {
        self.map2(b, |x, y| if x < y { x } else { y })
    }
    #[inline(always)]
    fn gt(self, b: Self) -> [bool; 4] {
        self.mask2(b, |x, y| x > y)
    }
    #[inline(always)]
    fn lt(self, b: Self) -> [bool; 4] {
        self.mask2(b, |x, y| x < y)
    }
    #[inline(always)]
    fn eq(self, b: Self) -> [bool; 4] {
        self.mask2(b, |x, y| x == y)
    }
    #[inline(always)]
    fn is_nan(self) -> [bool; 4] {
        self.0.map(f64::is_nan)
    }
    #[inline(always)]
    fn mask_or(a: [bool; 4], b: [bool; 4]) -> [bool; 4] {
        std::array::from_fn(|i| a[i] || b[i])
    }
    #[inline(always)]
    fn select(m: [bool; 4], t: Self, f: Self) -> Self {
        F64x4(std::array::from_fn(|i| if m[i] { t.0[i] } else { f.0[i] }))
    }
    #[inline(always)]
    fn reduce_sum(self) -> f64 {
        let v = self.0;
        (v[0] + v[2]) + (v[1] + v[3])
    }
    #[inline(always)]
    unsafe fn load_u8(p: *const u8) -> Self {
        // SAFETY: the caller guarantees 4 readable bytes at `p`.
        let b = unsafe { std::ptr::read_unaligned(p as *const [u8; 4]) };
        F64x4(b.map(f64::from))
    }
    #[inline(always)]
    unsafe fn store_u8(self, p: *mut u8) {
        // SAFETY: the caller guarantees 4 writable bytes at `p`.
        unsafe { std::ptr::write_unaligned(p as *mut [u8; 4], self.0.map(|v| v as u8)) }
    }
    #[inline(always)]
    fn deinterleave(a: Self, b: Self) -> (Self, Self) {
        let (a, b) = (a.0, b.0);
        (
            F64x4([a[0], a[2], b[0], b[2]]),
            F64x4([a[1], a[3], b[1], b[3]]),
        )
    }
    #[inline(always)]
    fn interleave(a: Self, b: Self) -> (Self, Self) {
        let (a, b) = (a.0, b.0);
        (
            F64x4([a[0], b[0], a[1], b[1]]),
            F64x4([a[2], b[2], a[3], b[3]]),
        )
    }
    #[inline(always)]
    fn deinterleave_quarters(a: Self, b: Self) -> (Self, Self) {
        // Quarters of 4 lanes are lanes.
        Self::deinterleave(a, b)
    }
    #[inline(always)]
    fn interleave_quarters(a: Self, b: Self) -> (Self, Self) {
        Self::interleave(a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::Portable8;

    /// Exercises every operation on one vector type against scalar definitions.
    struct AllOps;

    impl<T: Float> VecKernel<T> for AllOps {
        type Output = ();
        #[inline(always)]
        fn run<V: FloatVec<Elem = T>>(self) {
            let l = V::LANES;
            let t = |v: f64| T::from_f64_lossy(v);
            let a: Vec<T> = (0..2 * l).map(|i| t(i as f64 * 0.75 - 3.0)).collect();
            let mut b: Vec<T> = (0..2 * l).map(|i| t(2.0 - i as f64 * 0.5)).collect();
            b[1] = T::nan();
            let out = |f: &dyn Fn(V, V) -> V| {
                let mut o = vec![T::zero(); l];
                // SAFETY: `a`, `b` hold 2·LANES values, `o` LANES.
                unsafe { f(V::load(a.as_ptr()), V::load(b.as_ptr())).store(o.as_mut_ptr()) };
                o
            };
            let lanewise =
                |f: &dyn Fn(T, T) -> T| (0..l).map(|i| f(a[i], b[i])).collect::<Vec<T>>();
            let same = |x: Vec<T>, y: Vec<T>, what: &str| {
                let eq = x
                    .iter()
                    .zip(&y)
                    .all(|(p, q)| p == q || (p.is_nan() && q.is_nan()));
                assert!(eq, "{what}, {l} lanes: {x:?} vs {y:?}");
            };
            same(out(&|x, y| x.add(y)), lanewise(&|x, y| x + y), "add");
            same(
                out(&|x, y| x.mul_add(y, x)),
                lanewise(&|x, y| x.mul_add(y, x)),
                "mul_add",
            );
            same(
                out(&|x, y| x.max(y)),
                lanewise(&|x, y| if x > y { x } else { y }),
                "max",
            );
            let sel =
                |m: &dyn Fn(V, V) -> V::Mask| out(&|x, y| V::select(m(x, y), x, V::splat(t(-7.0))));
            let pick =
                |f: &dyn Fn(T, T) -> bool| lanewise(&|x, y| if f(x, y) { x } else { t(-7.0) });
            same(sel(&|x, y| x.gt(y)), pick(&|x, y| x > y), "gt");
            same(sel(&|x, y| x.lt(y)), pick(&|x, y| x < y), "lt");
            same(
                sel(&|x, y| x.eq(y.add(y).sub(y))),
                pick(&|x, y| x == y),
                "eq",
            );
            same(
                sel(&|x, y| V::mask_or(y.is_nan(), x.gt(V::zero()))),
                pick(&|x, y| y.is_nan() || x > T::zero()),
                "is_nan | gt",
            );
            // SAFETY: `a` holds 2·LANES values; `o` buffers hold LANES each.
            unsafe {
                let (va, vb) = (V::load(a.as_ptr()), V::load(a.as_ptr().add(l)));
                let (e, o) = V::deinterleave(va, vb);
                let (mut ev, mut od) = (vec![T::zero(); l], vec![T::zero(); l]);
                e.store(ev.as_mut_ptr());
                o.store(od.as_mut_ptr());
                same(ev, (0..l).map(|i| a[2 * i]).collect(), "deinterleave even");
                same(
                    od,
                    (0..l).map(|i| a[2 * i + 1]).collect(),
                    "deinterleave odd",
                );
                let (lo, hi) = V::interleave(e, o);
                let mut back = vec![T::zero(); 2 * l];
                lo.store(back.as_mut_ptr());
                hi.store(back.as_mut_ptr().add(l));
                same(back, a.clone(), "interleave");
                let q = l / 4;
                let (e, o) = V::deinterleave_quarters(va, vb);
                let (mut ev, mut od) = (vec![T::zero(); l], vec![T::zero(); l]);
                e.store(ev.as_mut_ptr());
                o.store(od.as_mut_ptr());
                let quarter = |k: usize| a[k * q..(k + 1) * q].to_vec(); // a ++ b: 8 quarters
                same(
                    ev,
                    [0, 2, 4, 6].iter().flat_map(|&k| quarter(k)).collect(),
                    "deinterleave_quarters even",
                );
                same(
                    od,
                    [1, 3, 5, 7].iter().flat_map(|&k| quarter(k)).collect(),
                    "deinterleave_quarters odd",
                );
                let (lo, hi) = V::interleave_quarters(e, o);
                let mut back = vec![T::zero(); 2 * l];
                lo.store(back.as_mut_ptr());
                hi.store(back.as_mut_ptr().add(l));
                same(back, a.clone(), "interleave_quarters");
                let bytes: Vec<u8> = (0..l).map(|i| (i * 37 % 256) as u8).collect();
                let v = V::load_u8(bytes.as_ptr());
                let mut round = vec![0u8; l];
                v.store_u8(round.as_mut_ptr());
                assert_eq!(round, bytes, "u8 round trip, {l} lanes");
                let mut part = vec![9u8; l];
                V::load_u8_partial(bytes.as_ptr(), l - 1)
                    .store_u8_partial(part.as_mut_ptr(), l - 1);
                assert_eq!(part[..l - 1], bytes[..l - 1]);
                assert_eq!(part[l - 1], 9, "store_u8_partial wrote past n");
                let s = V::load(a.as_ptr()).reduce_sum().to_f64_lossy();
                let want: f64 = a[..l].iter().map(|v| v.to_f64_lossy()).sum();
                assert!((s - want).abs() < 1e-5, "reduce_sum {s} vs {want}");
            }
        }
    }

    #[test]
    fn every_vector_type_matches_scalar_definitions() {
        <AllOps as VecKernel<f32>>::run::<Portable8>(AllOps);
        <AllOps as VecKernel<f64>>::run::<F64x4>(AllOps);
        for imp in F32Impl::runnable() {
            imp.run(AllOps);
        }
    }
}
