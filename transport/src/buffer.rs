//! [`Buffer`]: a collective buffer that lives in memory the peers can read in place when the
//! transport has such memory (shared memory on one host), and in ordinary memory otherwise.
//!
//! Allocate it with [`crate::Communicator::alloc_buffer`] (collective: every rank, same
//! length, same order) and use it as a slice; collectives on it, or on a sub-slice at the
//! same offset on every rank, then read and write peers' data where it is instead of copying
//! it through the transport's staging area (all-reduce of 37 MB on 2 ranks: ~3.5 ms instead
//! of ~5.5 ms). Any other buffer still works, through the staging area.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

use crate::backend::SharedMemory;
use crate::Element;

pub struct Buffer<T: Element> {
    inner: Inner<T>,
}

enum Inner<T> {
    Heap(Vec<T>),
    Shared {
        mem: SharedMemory,
        len: usize,
        _elem: PhantomData<T>,
    },
}

impl<T: Element> Buffer<T> {
    /// `len` zeroed elements in ordinary memory.
    pub fn heap(len: usize) -> Buffer<T> {
        Buffer {
            inner: Inner::Heap(vec![T::zeroed(); len]),
        }
    }

    /// `len` elements in `mem`, which must hold at least `len * size_of::<T>()` bytes.
    pub fn shared(mem: SharedMemory, len: usize) -> Buffer<T> {
        assert!(len * std::mem::size_of::<T>() <= mem.bytes());
        assert_eq!(mem.as_ptr() as usize % std::mem::align_of::<T>(), 0);
        Buffer {
            inner: Inner::Shared {
                mem,
                len,
                _elem: PhantomData,
            },
        }
    }

    /// Whether peers read this buffer in place.
    pub fn is_shared(&self) -> bool {
        matches!(self.inner, Inner::Shared { .. })
    }
}

impl<T: Element> Deref for Buffer<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match &self.inner {
            Inner::Heap(v) => v,
            // SAFETY: `mem` is valid, aligned (checked in `shared`) and zero-initialised, so
            // every bit pattern is a valid `T: Pod`; `len` elements fit (checked); only this
            // handle accesses it in this process, and `&self` borrows it.
            Inner::Shared { mem, len, .. } => unsafe {
                std::slice::from_raw_parts(mem.as_ptr() as *const T, *len)
            },
        }
    }
}

impl<T: Element> DerefMut for Buffer<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match &mut self.inner {
            Inner::Heap(v) => v,
            // SAFETY: as in `deref`, with `&mut self` giving exclusive access.
            Inner::Shared { mem, len, .. } => unsafe {
                std::slice::from_raw_parts_mut(mem.as_ptr() as *mut T, *len)
            },
        }
    }
}

impl<T: Element> AsRef<[T]> for Buffer<T> {
    fn as_ref(&self) -> &[T] {
        self
    }
}

impl<T: Element> AsMut<[T]> for Buffer<T> {
    fn as_mut(&mut self) -> &mut [T] {
        self
    }
}

impl<T: Element> std::fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len())
            .field("shared", &self.is_shared())
            .finish()
    }
}
