//! `TORCHELASTIC_ERROR_FILE`: where a rank started by torchrun records why it failed.
//!
//! torchrun gives every worker its own path in this variable; when a worker exits non-zero,
//! torchrun's failure summary reads the file (`torch.distributed.elastic.multiprocessing.errors`,
//! `ProcessFailure`) and prints its message instead of `error_file: <N/A>`. The shape is what
//! torch's own `ErrorHandler.record_exception` writes:
//!
//! ```json
//! {"message": {"message": "<text>", "extraInfo": {"timestamp": "<unix seconds>"}}}
//! ```
//!
//! torch adds `extraInfo.py_callstack` (a Python traceback), which the summary would print in
//! preference to `message`; we leave it out so the summary shows dtrain's one-line error. The
//! root cause torchrun reports is the failure with the smallest timestamp.

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The variable torchrun sets for each worker.
pub const ERROR_FILE_ENV: &str = "TORCHELASTIC_ERROR_FILE";

/// The error file's JSON for `message`, failed at `when`.
pub fn error_json(message: &str, when: SystemTime) -> String {
    let seconds = when
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    serde_json::json!({
        "message": {
            "message": message,
            "extraInfo": { "timestamp": seconds.to_string() },
        }
    })
    .to_string()
}

/// Writes `message` as an error file at `path`: to a temporary file in the same directory,
/// then renamed over `path`, so torchrun never reads half a file.
pub fn write_error_file(path: &Path, message: &str) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "error file path has no file name",
        )
    })?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = std::fs::File::create(&tmp).and_then(|mut f| {
        f.write_all(error_json(message, SystemTime::now()).as_bytes())?;
        f.sync_all()
    });
    let result = written.and_then(|_| std::fs::rename(&tmp, path));
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// If `env` has `TORCHELASTIC_ERROR_FILE`, records `message` there and returns the path and
/// the outcome (the caller warns if writing failed); `None` when not run by torchrun.
pub fn record_error(
    env: &dyn Fn(&str) -> Option<String>,
    message: &str,
) -> Option<(PathBuf, io::Result<()>)> {
    let path = PathBuf::from(env(ERROR_FILE_ENV).filter(|p| !p.is_empty())?);
    let outcome = write_error_file(&path, message);
    Some((path, outcome))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn json_has_the_shape_torchrun_reads() {
        let when = UNIX_EPOCH + Duration::from_secs(1_796_161_414);
        let v: serde_json::Value =
            serde_json::from_str(&error_json("dtrain: error: rank 1: \"boom\"\n", when)).unwrap();
        assert_eq!(v["message"]["message"], "dtrain: error: rank 1: \"boom\"\n");
        // torch does int(message["extraInfo"]["timestamp"]): a decimal string.
        assert_eq!(v["message"]["extraInfo"]["timestamp"], "1796161414");
        assert!(v["message"]["extraInfo"].get("py_callstack").is_none());
    }

    #[test]
    fn record_error_writes_the_file_named_by_the_environment() {
        let dir = std::env::temp_dir().join(format!("dtrain-error-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("error.json");
        let env = |k: &str| (k == ERROR_FILE_ENV).then(|| path.to_string_lossy().into_owned());
        let (written, outcome) = record_error(&env, "dtrain: error: bad").expect("env is set");
        outcome.unwrap();
        assert_eq!(written, path);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["message"]["message"], "dtrain: error: bad");
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(record_error(&|_| None, "x").is_none());
    }

    #[test]
    fn an_unwritable_path_is_an_error_not_a_panic() {
        let env = |_: &str| Some("/nonexistent-dir-for-dtrain/error.json".to_string());
        let (_, outcome) = record_error(&env, "x").unwrap();
        assert!(outcome.is_err());
    }
}
