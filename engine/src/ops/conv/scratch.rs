//! Scratch memory for every conv algorithm: ONE buffer per calling thread, reused across calls
//! and split into the parts a call asks for.
//!
//! One buffer (rather than one per purpose) keeps the retained memory at the largest single
//! request over all layers and algorithms: with separate buffers, layer A's large column
//! buffer and layer B's large transform buffer would both stay allocated. Each algorithm
//! bounds its request independently of the batch size (see their `*_SCRATCH_ELEMS`), so the
//! resident scratch is the maximum of those bounds.
use crate::Float;
use std::cell::RefCell;

thread_local! {
    /// Stored as f64 words so the memory is aligned for any `Float`.
    static SCRATCH: RefCell<Vec<f64>> = const { RefCell::new(Vec::new()) };
}

/// Run `f` with `N` disjoint scratch slices of the given lengths (content: whatever a
/// previous call left — initialized, but any value, NaN included). The buffer is
/// taken out of the thread-local while in use, so a nested call allocates its own instead of
/// aliasing.
pub(super) fn with_scratch<T: Float, const N: usize, R>(
    lens: [usize; N],
    f: impl FnOnce([&mut [T]; N]) -> R,
) -> R {
    let total: usize = lens.iter().sum();
    let words = (total * std::mem::size_of::<T>()).div_ceil(8);
    let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
    if buf.len() < words {
        buf.resize(words, 0.0);
    }
    let result = {
        let all: &mut [T] = bytemuck::cast_slice_mut(&mut buf[..words]);
        let mut rest = &mut all[..total];
        let parts: [&mut [T]; N] = std::array::from_fn(|i| {
            let (part, tail) = std::mem::take(&mut rest).split_at_mut(lens[i]);
            rest = tail;
            part
        });
        f(parts)
    };
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        // Keep the larger buffer if a nested call left one behind.
        if s.len() < buf.len() {
            *s = buf;
        }
    });
    result
}

/// Free this thread's cached conv scratch (it is otherwise kept for the next call).
pub fn conv2d_release_scratch() {
    SCRATCH.with(|s| *s.borrow_mut() = Vec::new());
}
