//! A contiguous, row-major, owned tensor: a shape plus a flat `Vec<T>`.
//!
//! Deliberately minimal: the ops work on flat slices (see [`crate::ops`]) and the tape
//! ([`crate::autograd`]) owns its activation buffers; `Tensor` is the type callers hand in
//! (images) and get back (logits, state).

use thiserror::Error;

/// The shape and the number of elements disagree.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("tensor shape {shape:?} needs {expected} elements but {found} were given")]
pub struct ShapeError {
    pub shape: Vec<usize>,
    pub expected: usize,
    pub found: usize,
}

/// A contiguous row-major tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor<T> {
    shape: Vec<usize>,
    data: Vec<T>,
}

/// Number of elements of a shape (1 for the scalar shape `[]`).
pub fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

impl<T: Copy + Default> Tensor<T> {
    /// A tensor of `T::default()` (zero for floats).
    pub fn zeros(shape: &[usize]) -> Self {
        Tensor {
            shape: shape.to_vec(),
            data: vec![T::default(); numel(shape)],
        }
    }
}

impl<T> Tensor<T> {
    /// Wraps `data` (row-major) with `shape`; fails if the element counts differ.
    pub fn from_vec(shape: &[usize], data: Vec<T>) -> Result<Self, ShapeError> {
        let expected = numel(shape);
        if expected != data.len() {
            return Err(ShapeError {
                shape: shape.to_vec(),
                expected,
                found: data.len(),
            });
        }
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn numel(&self) -> usize {
        self.data.len()
    }
    pub fn data(&self) -> &[T] {
        &self.data
    }
    pub fn data_mut(&mut self) -> &mut [T] {
        &mut self.data
    }
    pub fn into_vec(self) -> Vec<T> {
        self.data
    }
    /// Same data, new shape with the same element count.
    pub fn reshape(self, shape: &[usize]) -> Result<Self, ShapeError> {
        Tensor::from_vec(shape, self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_vec_checks_element_count() {
        assert!(Tensor::from_vec(&[2, 3], vec![0f32; 6]).is_ok());
        let err = Tensor::from_vec(&[2, 3], vec![0f32; 5]).unwrap_err();
        assert_eq!((err.expected, err.found), (6, 5));
        // The scalar shape holds exactly one element, as in PyTorch.
        assert_eq!(numel(&[]), 1);
        assert!(Tensor::from_vec(&[], vec![1i64]).is_ok());
    }
}
