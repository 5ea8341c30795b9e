//! Named tensors and safetensors files (the format `safetensors.torch.save_file` /
//! `load_file` read and write).
//!
//! - [`NamedTensor`]: name, shape and typed data ([`TensorData`]: F32, F64 or I64).
//! - [`save_tensors`]`(path, &tensors, &metadata)`: writes atomically (temp file + rename);
//!   `metadata` is the file's string→string `__metadata__`.
//! - [`load_tensors`]`(path)` → [`LoadedState`] (`tensors` by name + `metadata`).
//!
//! Callers compose files freely: a checkpoint is `Vgg::state_dict()` +
//! `Sgd::state_tensors()` + any extra tensors (epoch, RNG state as I64) + metadata.
//! Data is stored little-endian (this crate only targets little-endian hosts).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, SafeTensors, View};
use thiserror::Error;

use crate::tensor::numel;
use crate::Float;

/// Typed tensor data.
#[derive(Clone, Debug, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    I64(Vec<i64>),
}

impl TensorData {
    pub fn len(&self) -> usize {
        match self {
            TensorData::F32(v) => v.len(),
            TensorData::F64(v) => v.len(),
            TensorData::I64(v) => v.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The safetensors dtype name ("F32", "F64", "I64").
    pub fn dtype_name(&self) -> &'static str {
        match self {
            TensorData::F32(_) => "F32",
            TensorData::F64(_) => "F64",
            TensorData::I64(_) => "I64",
        }
    }
    fn dtype(&self) -> Dtype {
        match self {
            TensorData::F32(_) => Dtype::F32,
            TensorData::F64(_) => Dtype::F64,
            TensorData::I64(_) => Dtype::I64,
        }
    }
    fn bytes(&self) -> &[u8] {
        match self {
            TensorData::F32(v) => bytemuck::cast_slice(v),
            TensorData::F64(v) => bytemuck::cast_slice(v),
            TensorData::I64(v) => bytemuck::cast_slice(v),
        }
    }
}

/// A named tensor as stored in a state file.
#[derive(Clone, Debug, PartialEq)]
pub struct NamedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: TensorData,
}

/// Errors of state files and of loading state into a model/optimizer.
#[derive(Debug, Error)]
pub enum StateError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a valid safetensors file: {message}")]
    Format { path: PathBuf, message: String },
    #[error("tensor {name}: {expected} elements for shape {shape:?} but {found} given")]
    BadLength {
        name: String,
        shape: Vec<usize>,
        expected: usize,
        found: usize,
    },
    #[error("missing tensor {name} (expected shape {expected:?})")]
    Missing { name: String, expected: Vec<usize> },
    #[error("tensor {name} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("tensor {name} has dtype {found}, expected {expected}")]
    DtypeMismatch {
        name: String,
        expected: &'static str,
        found: String,
    },
    #[error("unexpected tensors in strict load: {names:?}")]
    Unexpected { names: Vec<String> },
}

impl NamedTensor {
    /// Checks that `data` has as many elements as `shape` needs.
    pub fn new(
        name: impl Into<String>,
        shape: &[usize],
        data: TensorData,
    ) -> Result<Self, StateError> {
        let name = name.into();
        let expected = numel(shape);
        if data.len() != expected {
            return Err(StateError::BadLength {
                name,
                shape: shape.to_vec(),
                expected,
                found: data.len(),
            });
        }
        Ok(NamedTensor {
            name,
            shape: shape.to_vec(),
            data,
        })
    }

    /// A float tensor stored in `T`'s own precision (F32 for f32, F64 for f64).
    /// Panics if `data.len()` does not match `shape` (a programming error).
    pub fn from_float<T: Float>(name: impl Into<String>, shape: &[usize], data: &[T]) -> Self {
        assert_eq!(numel(shape), data.len(), "from_float: shape/data mismatch");
        let data = if std::mem::size_of::<T>() == 4 {
            TensorData::F32(data.iter().map(|v| v.to_f64_lossy() as f32).collect())
        } else {
            TensorData::F64(data.iter().map(|v| v.to_f64_lossy()).collect())
        };
        NamedTensor {
            name: name.into(),
            shape: shape.to_vec(),
            data,
        }
    }

    /// A scalar (shape `[]`) I64 tensor, like PyTorch's `num_batches_tracked`.
    pub fn scalar_i64(name: impl Into<String>, value: i64) -> Self {
        NamedTensor {
            name: name.into(),
            shape: Vec::new(),
            data: TensorData::I64(vec![value]),
        }
    }

    fn check_shape(&self, expected: &[usize]) -> Result<(), StateError> {
        if self.shape != expected {
            return Err(StateError::ShapeMismatch {
                name: self.name.clone(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            });
        }
        Ok(())
    }

    /// The data converted to `T` after checking the shape; F32 and F64 are accepted (as
    /// PyTorch's `load_state_dict` copies across float dtypes).
    pub fn to_float_vec<T: Float>(&self, expected_shape: &[usize]) -> Result<Vec<T>, StateError> {
        self.check_shape(expected_shape)?;
        match &self.data {
            TensorData::F32(v) => Ok(v.iter().map(|&x| T::from_f64_lossy(x as f64)).collect()),
            TensorData::F64(v) => Ok(v.iter().map(|&x| T::from_f64_lossy(x)).collect()),
            TensorData::I64(_) => Err(StateError::DtypeMismatch {
                name: self.name.clone(),
                expected: "F32 or F64",
                found: "I64".into(),
            }),
        }
    }

    /// The value of a one-element I64 tensor of the expected shape.
    pub fn to_i64_scalar(&self, expected_shape: &[usize]) -> Result<i64, StateError> {
        self.check_shape(expected_shape)?;
        match &self.data {
            TensorData::I64(v) if v.len() == 1 => Ok(v[0]),
            other => Err(StateError::DtypeMismatch {
                name: self.name.clone(),
                expected: "I64",
                found: other.dtype_name().into(),
            }),
        }
    }
}

impl View for &NamedTensor {
    fn dtype(&self) -> Dtype {
        self.data.dtype()
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(self.data.bytes())
    }
    fn data_len(&self) -> usize {
        self.data.bytes().len()
    }
}

/// A loaded state file.
#[derive(Clone, Debug, Default)]
pub struct LoadedState {
    pub tensors: BTreeMap<String, NamedTensor>,
    pub metadata: HashMap<String, String>,
}

/// Writes `tensors` and string `metadata` to `path` as safetensors, atomically (a temp file in
/// the same directory, then rename).
pub fn save_tensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: &HashMap<String, String>,
) -> Result<(), StateError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let info = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    let items = tensors.iter().map(|t| (t.name.as_str(), t));
    safetensors::tensor::serialize_to_file(items, info, &tmp).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => StateError::Io {
            action: "write",
            path: tmp.clone(),
            source,
        },
        other => StateError::Format {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })?;
    std::fs::rename(&tmp, path).map_err(|source| StateError::Io {
        action: "rename into",
        path: path.to_path_buf(),
        source,
    })
}

/// Reads every tensor (F32, F64, I64; other dtypes are an error) and the metadata of a
/// safetensors file.
pub fn load_tensors(path: &Path) -> Result<LoadedState, StateError> {
    let bytes = std::fs::read(path).map_err(|source| StateError::Io {
        action: "read",
        path: path.to_path_buf(),
        source,
    })?;
    let format_err = |message: String| StateError::Format {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| format_err(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format_err(e.to_string()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::F32 => TensorData::F32(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::F64 => TensorData::F64(
                raw.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            Dtype::I64 => TensorData::I64(
                raw.chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            ),
            other => {
                return Err(StateError::DtypeMismatch {
                    name: name.to_string(),
                    expected: "F32, F64 or I64",
                    found: format!("{other:?}"),
                })
            }
        };
        let t = NamedTensor::new(name, view.shape(), data)?;
        tensors.insert(name.to_string(), t);
    }
    Ok(LoadedState { tensors, metadata })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_path(tag: &str) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        std::env::temp_dir().join(format!(
            "engine-state-{tag}-{}-{nanos}.safetensors",
            std::process::id()
        ))
    }

    #[test]
    fn round_trip_all_dtypes_and_metadata() {
        let path = temp_path("rt");
        let tensors = vec![
            NamedTensor::new(
                "a",
                &[2, 3],
                TensorData::F32(vec![1.0, 2.0, 3.0, 4.0, 5.0, -6.5]),
            )
            .unwrap(),
            NamedTensor::new("b", &[1], TensorData::F64(vec![std::f64::consts::PI])).unwrap(),
            NamedTensor::scalar_i64("n", 42),
        ];
        let mut meta = HashMap::new();
        meta.insert("epoch".to_string(), "3".to_string());
        save_tensors(&path, &tensors, &meta).unwrap();
        let loaded = load_tensors(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert_eq!(loaded.metadata, meta);
        assert_eq!(loaded.tensors.len(), 3);
        for t in &tensors {
            assert_eq!(&loaded.tensors[&t.name], t);
        }
        assert_eq!(loaded.tensors["n"].to_i64_scalar(&[]).unwrap(), 42);
    }

    #[test]
    fn errors_name_the_tensor() {
        let t = NamedTensor::from_float("layers.0.weight", &[2, 2], &[0f32; 4]);
        let err = t.to_float_vec::<f32>(&[4]).unwrap_err().to_string();
        assert!(
            err.contains("layers.0.weight") && err.contains("[2, 2]"),
            "{err}"
        );
        assert!(NamedTensor::new("x", &[3], TensorData::I64(vec![1])).is_err());
        let missing = load_tensors(Path::new("/nonexistent/dir/file.safetensors"));
        assert!(matches!(missing, Err(StateError::Io { .. })));
    }
}
