//! Named tensors and safetensors files (the format `safetensors.torch.save_file` /
//! `load_file` read and write).
//!
//! - [`NamedTensor`]: name, shape and typed data ([`TensorData`]: F32, F64 or I64).
//! - [`save_tensors`]`(path, &tensors, &metadata)`: writes atomically and durably (temp file
//!   in the same directory, fsync, rename, fsync of the directory; the temp file is removed
//!   on failure); `metadata` is the file's string→string `__metadata__`.
//! - [`load_tensors`]`(path)` → [`LoadedState`] (`tensors` by name + `metadata`), or
//!   [`read_state_file`] + [`parse_tensors`] for the bytes themselves. The file is read with a
//!   fallible allocation; the `safetensors` crate checks the header against the file's length
//!   (header size, overflow-checked shapes, contiguous offsets inside the file) before
//!   anything is sized from it — the tests below hold it to that.
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

/// The temporary file [`save_tensors`] writes before renaming it onto `path`: the same
/// directory (so the rename is atomic), the file name plus `.tmp.<pid>` (so a writer that
/// died can be recognised by its pid and its leftover removed).
pub fn temp_path(path: &Path, pid: u32) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp.{pid}"));
    path.with_file_name(name)
}

/// The directory holding `path` ("." for a bare file name).
fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Writes `tensors` and string `metadata` to `path` as safetensors, atomically and durably:
/// the data goes to [`temp_path`], is fsynced, renamed onto `path`, and the directory is
/// fsynced. On any failure the temporary file is removed and `path` is left as it was, so a
/// crash or a full disk never costs the previous file.
pub fn save_tensors(
    path: &Path,
    tensors: &[NamedTensor],
    metadata: &HashMap<String, String>,
) -> Result<(), StateError> {
    let tmp = temp_path(path, std::process::id());
    let result = write_durably(path, &tmp, tensors, metadata);
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn write_durably(
    path: &Path,
    tmp: &Path,
    tensors: &[NamedTensor],
    metadata: &HashMap<String, String>,
) -> Result<(), StateError> {
    let io = |action: &'static str, at: &Path| {
        let at = at.to_path_buf();
        move |source| StateError::Io {
            action,
            path: at,
            source,
        }
    };
    let info = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    let items = tensors.iter().map(|t| (t.name.as_str(), t));
    safetensors::tensor::serialize_to_file(items, info, tmp).map_err(|e| match e {
        safetensors::SafeTensorError::IoError(source) => StateError::Io {
            action: "write",
            path: tmp.to_path_buf(),
            source,
        },
        other => StateError::Format {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    })?;
    // The file's data must be on disk before the rename makes it the checkpoint.
    std::fs::File::open(tmp)
        .and_then(|f| f.sync_all())
        .map_err(io("flush to disk", tmp))?;
    std::fs::rename(tmp, path).map_err(io("rename into", path))?;
    // And the rename itself must survive a power cut.
    let dir = parent_dir(path);
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("flush the directory", dir))
}

/// Reads a whole state file, refusing (rather than aborting on) one too large to hold in
/// memory.
pub fn read_state_file(path: &Path) -> Result<Vec<u8>, StateError> {
    use std::io::Read;
    let io = |action: &'static str| {
        move |source| StateError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    };
    let mut file = std::fs::File::open(path).map_err(io("read"))?;
    let len = file.metadata().map_err(io("read"))?.len();
    let mut bytes = Vec::new();
    usize::try_from(len)
        .ok()
        .and_then(|n| bytes.try_reserve_exact(n).ok())
        .ok_or_else(|| StateError::Format {
            path: path.to_path_buf(),
            message: format!("{len} bytes do not fit in memory"),
        })?;
    file.read_to_end(&mut bytes).map_err(io("read"))?;
    Ok(bytes)
}

/// Reads every tensor (F32, F64, I64; other dtypes are an error) and the metadata of a
/// safetensors file.
pub fn load_tensors(path: &Path) -> Result<LoadedState, StateError> {
    parse_tensors(&read_state_file(path)?, path)
}

/// Parses the bytes of a safetensors file (read from `path`, named in errors).
pub fn parse_tensors(bytes: &[u8], path: &Path) -> Result<LoadedState, StateError> {
    let format_err = |message: String| StateError::Format {
        path: path.to_path_buf(),
        message,
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| format_err(e.to_string()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = SafeTensors::deserialize(bytes).map_err(|e| format_err(e.to_string()))?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.iter() {
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::F32 => TensorData::F32(
                raw.chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            Dtype::F64 => TensorData::F64(
                raw.chunks_exact(8)
                    .map(|b| f64::from_le_bytes(b.try_into().unwrap_or_default()))
                    .collect(),
            ),
            Dtype::I64 => TensorData::I64(
                raw.chunks_exact(8)
                    .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()))
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

    /// A safetensors file with `header` (JSON) and `data_len` zero bytes of data.
    fn raw_file(header: &str, data_len: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + data_len, 0);
        bytes
    }

    fn parse_error(bytes: &[u8]) -> String {
        match parse_tensors(bytes, Path::new("crafted.safetensors")) {
            Ok(s) => panic!("crafted file accepted: {:?}", s.tensors.keys()),
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.contains("crafted.safetensors"), "{msg}");
                msg
            }
        }
    }

    /// Crafted headers: every size the file states is checked (for overflow, and against
    /// the file's length) before anything is allocated or sliced from it.
    #[test]
    fn headers_are_checked_against_the_file_length_and_for_overflow() {
        let ok = raw_file(
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
            8,
        );
        assert_eq!(
            parse_tensors(&ok, Path::new("x")).unwrap().tensors["a"].shape,
            [2]
        );
        parse_error(&ok[..5]);
        // A header length beyond the file, up to u64::MAX.
        for len in [ok.len() as u64, 1 << 40, u64::MAX] {
            let mut bad = ok.clone();
            bad[..8].copy_from_slice(&len.to_le_bytes());
            parse_error(&bad);
        }
        let cases = [
            "not json",
            // Offsets past the end of the data, or not matching the shape.
            r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
            // Element and byte counts that overflow 64 bits.
            r#"{"a":{"dtype":"F32","shape":[4294967296,4294967296,2],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F64","shape":[2305843009213693951],"data_offsets":[0,18446744073709551608]}}"#,
            // Tensors whose sizes sum past 2^64.
            r#"{"a":{"dtype":"U8","shape":[18446744073709551615],"data_offsets":[0,18446744073709551615]},
                "b":{"dtype":"U8","shape":[9],"data_offsets":[18446744073709551615,8]}}"#,
            // Malformed fields.
            r#"{"a":{"dtype":"Q7","shape":[2],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}"#,
            r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}}"#,
            r#"{"a":7}"#,
        ];
        for header in cases {
            parse_error(&raw_file(header, 8));
        }
    }

    #[test]
    fn a_failed_save_keeps_the_previous_file_and_leaves_no_temp_file() {
        let dir = std::env::temp_dir().join(format!(
            "engine-state-fail-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.safetensors");
        let t = vec![NamedTensor::from_float("w", &[2], &[1.0f32, 2.0])];
        save_tensors(&path, &t, &HashMap::new()).unwrap();
        let before = std::fs::read(&path).unwrap();
        // The rename cannot replace a non-empty directory: the save fails after writing.
        let blocker = dir.join("blocked.safetensors");
        std::fs::create_dir_all(blocker.join("inside")).unwrap();
        let e = save_tensors(&blocker, &t, &HashMap::new()).unwrap_err();
        assert!(e.to_string().contains("rename into"), "{e}");
        // A directory that does not exist: nothing can be created.
        let e = save_tensors(&dir.join("no/such/dir/x.safetensors"), &t, &HashMap::new());
        assert!(matches!(e, Err(StateError::Io { .. })));
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["blocked.safetensors", "state.safetensors"]);
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert_eq!(
            super::temp_path(&path, 42),
            dir.join("state.safetensors.tmp.42")
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
