//! `--keep-checkpoints N`: the newest checkpoint at `c.st`, the ones before it at `c.st.1`
//! (the previous), `c.st.2`, ... `c.st.<N-1>`, so a newest file that turns out damaged has
//! a good one beside it.
//!
//! A save never leaves fewer good files than it found, whenever it is interrupted:
//! 1. the new checkpoint is written completely and fsynced under a temporary name
//!    ([`temp_path`]) — a crash here leaves the old files as they were;
//! 2. older files move up one name (`c.st.1` → `c.st.2`, ...: each rename is atomic);
//! 3. `c.st` is hard-linked as `c.st.1`, so `c.st` itself stays in place (where hard links
//!    are not supported, `c.st` is renamed to `c.st.1`: for that instant `c.st.1` is the
//!    good file, and `--resume auto` looks there);
//! 4. the temporary file is renamed onto `c.st` (atomic) and the directory fsynced.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

use engine::state::{save_tensors, temp_path, NamedTensor, StateError};

use std::collections::HashMap;

/// The `k`-th newest checkpoint file of `path`'s rotation: `path` itself for 0, else
/// `path.k`.
pub fn rotated_path(path: &Path, k: usize) -> PathBuf {
    if k == 0 {
        return path.to_path_buf();
    }
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{k}"));
    path.with_file_name(name)
}

/// The files of the rotation of `keep` checkpoints that exist, newest first.
pub fn existing(path: &Path, keep: usize) -> Vec<PathBuf> {
    (0..keep.max(1))
        .map(|k| rotated_path(path, k))
        .filter(|p| p.exists())
        .collect()
}

/// The directory holding `path` ("." for a bare file name).
pub fn dir_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StateError {
    let path = path.to_path_buf();
    move |source| StateError::Io {
        action,
        path,
        source,
    }
}

/// `Ok` also when `result` failed only because the file was not there.
fn unless_missing(result: std::io::Result<()>) -> std::io::Result<()> {
    match result {
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Move each kept file one name older, dropping the oldest; `path` stays where it is.
fn rotate(path: &Path, keep: usize) -> Result<(), StateError> {
    for k in (1..keep - 1).rev() {
        let (from, to) = (rotated_path(path, k), rotated_path(path, k + 1));
        unless_missing(std::fs::rename(&from, &to)).map_err(io_error("rotate", &from))?;
    }
    if !path.exists() {
        return Ok(()); // the first save, or the newest was moved aside as damaged
    }
    let previous = rotated_path(path, 1);
    unless_missing(std::fs::remove_file(&previous)).map_err(io_error("rotate", &previous))?;
    match std::fs::hard_link(path, &previous) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        // No hard links on this filesystem: the rename leaves `previous` as the good file.
        Err(_) => std::fs::rename(path, &previous).map_err(io_error("rotate", path)),
    }
}

/// Write `tensors` and `metadata` as the newest checkpoint at `path`, keeping the `keep - 1`
/// before it (see the module's comment for why no crash loses the last good file). On
/// failure no temporary file is left; files already rotated stay rotated (each is whole).
pub fn save_rotating(
    path: &Path,
    keep: usize,
    tensors: &[NamedTensor],
    metadata: &HashMap<String, String>,
) -> Result<(), StateError> {
    if keep <= 1 {
        return save_tensors(path, tensors, metadata);
    }
    let staged = temp_path(path, std::process::id());
    save_tensors(&staged, tensors, metadata)?;
    let result = rotate(path, keep).and_then(|()| {
        std::fs::rename(&staged, path).map_err(io_error("rename into", path))?;
        let dir = dir_of(path);
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("flush the directory", dir))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&staged);
    }
    result
}

/// Where a damaged checkpoint is moved when a resume fell back past it: `path.damaged`.
pub fn damaged_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".damaged");
    path.with_file_name(name)
}
