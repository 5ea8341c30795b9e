//! CIFAR-10 download: fetch the archive, verify its MD5, extract into a temporary folder inside
//! `--data-dir`, then rename `cifar-10-batches-bin/` into place in one step. A failed or
//! mismatching download leaves no `cifar-10-batches-bin/` behind.
//!
//! Ranks on one host share `--data-dir`: an exclusive `flock` on `data-dir/.download.lock`
//! lets one of them download while the others wait (with a deadline), then find the files.

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use super::cifar::{cifar_files_present, CIFAR_DIR, TEST_FILE, TRAIN_FILES};
use super::DataError;

pub const LOCK_FILE: &str = ".download.lock";
/// How long a rank waits for another rank of its host to finish downloading (163 MB).
pub const LOCK_WAIT: Duration = Duration::from_secs(30 * 60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// No byte for this long aborts the download.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Make sure `data_dir/cifar-10-batches-bin/` holds the six files, downloading if needed.
pub fn ensure_cifar10(data_dir: &Path, url: &str, md5_hex: &str) -> Result<(), DataError> {
    ensure_cifar10_with(data_dir, url, md5_hex, LOCK_WAIT)
}

/// [`ensure_cifar10`] with an explicit lock deadline (tests use a short one).
pub fn ensure_cifar10_with(
    data_dir: &Path,
    url: &str,
    md5_hex: &str,
    lock_wait: Duration,
) -> Result<(), DataError> {
    let target = data_dir.join(CIFAR_DIR);
    if cifar_files_present(&target) {
        return Ok(());
    }
    std::fs::create_dir_all(data_dir)
        .map_err(|e| DataError::io("cannot create the data folder", data_dir, e))?;
    let _lock = lock_exclusive(&data_dir.join(LOCK_FILE), lock_wait)?;
    // Another rank may have finished while we waited for the lock.
    if cifar_files_present(&target) {
        return Ok(());
    }
    if target.exists() {
        let missing: Vec<&str> = TRAIN_FILES
            .iter()
            .chain(std::iter::once(&TEST_FILE))
            .copied()
            .filter(|f| !target.join(f).is_file())
            .collect();
        return Err(DataError::BadFile {
            path: target,
            detail: format!(
                "exists but lacks {}; remove the folder to download again",
                missing.join(", ")
            ),
        });
    }
    download_and_extract(data_dir, url, md5_hex).map_err(|e| match e {
        // Could not reach the server at all: tell where the files go.
        DataError::Download { detail, .. } => DataError::Missing {
            dir: target.clone(),
            parent: data_dir.to_path_buf(),
            url: url.to_string(),
            reason: detail,
        },
        other => other,
    })
}

/// Hold an exclusive `flock` on `path` until dropped; poll until `deadline` passes.
fn lock_exclusive(path: &Path, wait: Duration) -> Result<nix::fcntl::Flock<File>, DataError> {
    use nix::errno::Errno;
    use nix::fcntl::{Flock, FlockArg};
    let start = Instant::now();
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| DataError::io("cannot open the download lock", path, e))?;
    let mut told = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((f, Errno::EWOULDBLOCK)) | Err((f, Errno::EINTR)) => {
                file = f;
                if start.elapsed() >= wait {
                    return Err(DataError::LockTimeout {
                        path: path.to_path_buf(),
                        waited: start.elapsed(),
                    });
                }
                if !told {
                    eprintln!(
                        "dtrain: another process on this host is downloading CIFAR-10 (lock {}); waiting",
                        path.display()
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err((_, errno)) => {
                return Err(DataError::io(
                    "cannot lock",
                    path,
                    std::io::Error::from_raw_os_error(errno as i32),
                ))
            }
        }
    }
}

/// Removes a temporary folder on drop (success or failure).
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique_temp_dir(parent: &Path) -> Result<TempDir, DataError> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = parent.join(format!(".cifar-download-{}-{nanos}", std::process::id()));
    std::fs::create_dir(&dir).map_err(|e| DataError::io("cannot create", &dir, e))?;
    Ok(TempDir(dir))
}

/// Download `url` (http, https or file://) into `temp/archive.tar.gz`, verify, extract, move
/// `cifar-10-batches-bin/` into `data_dir`.
pub fn download_and_extract(data_dir: &Path, url: &str, md5_hex: &str) -> Result<(), DataError> {
    let temp = unique_temp_dir(data_dir)?;
    let archive = temp.0.join("archive.tar.gz");
    let actual = fetch(url, &archive)?;
    if !actual.eq_ignore_ascii_case(md5_hex) {
        return Err(DataError::Md5Mismatch {
            url: url.to_string(),
            expected: md5_hex.to_ascii_lowercase(),
            actual,
        });
    }
    let extract_dir = temp.0.join("extract");
    std::fs::create_dir(&extract_dir)
        .map_err(|e| DataError::io("cannot create", &extract_dir, e))?;
    let f = File::open(&archive).map_err(|e| DataError::io("cannot open", &archive, e))?;
    // `unpack` refuses entries that would land outside `extract_dir` ("..", absolute paths).
    tar::Archive::new(flate2::read::GzDecoder::new(std::io::BufReader::new(f)))
        .unpack(&extract_dir)
        .map_err(|e| DataError::Archive {
            url: url.to_string(),
            detail: format!("cannot extract: {e}"),
        })?;
    let extracted = extract_dir.join(CIFAR_DIR);
    if !cifar_files_present(&extracted) {
        return Err(DataError::Archive {
            url: url.to_string(),
            detail: format!(
                "does not contain {CIFAR_DIR}/ with data_batch_1.bin .. data_batch_5.bin and {TEST_FILE}"
            ),
        });
    }
    let target = data_dir.join(CIFAR_DIR);
    std::fs::rename(&extracted, &target)
        .map_err(|e| DataError::io("cannot move the extracted folder to", &target, e))?;
    eprintln!("dtrain: CIFAR-10 ready in {}", target.display());
    Ok(())
}

/// Copy `url` to `dest`, returning the MD5 (lower-case hex) of the bytes.
fn fetch(url: &str, dest: &Path) -> Result<String, DataError> {
    let download_err = |detail: String| DataError::Download {
        url: url.to_string(),
        detail,
    };
    let (mut body, expected): (Box<dyn Read>, Option<u64>) = if let Some(path) =
        url.strip_prefix("file://")
    {
        let f = File::open(path).map_err(|e| download_err(format!("cannot open {path}: {e}")))?;
        let len = f.metadata().ok().map(|m| m.len());
        (Box::new(f), len)
    } else {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(CONNECT_TIMEOUT)
            .timeout_read(READ_TIMEOUT)
            .build();
        let resp = agent.get(url).call().map_err(|e| match e {
            ureq::Error::Status(code, r) => {
                download_err(format!("HTTP status {code} {}", r.status_text()))
            }
            ureq::Error::Transport(t) => download_err(t.to_string()),
        })?;
        let len = resp
            .header("Content-Length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        (resp.into_reader(), len)
    };
    let mut out = File::create(dest).map_err(|e| DataError::io("cannot create", dest, e))?;
    let mut hasher = Md5::new();
    let mut got: u64 = 0;
    let mut buf = vec![0u8; 1 << 16];
    let mut progress = Progress::new(url, expected);
    loop {
        let n = match body.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                progress.finish();
                return match expected {
                    Some(exp) if got < exp => Err(DataError::DownloadTruncated {
                        url: url.to_string(),
                        got,
                        expected: exp,
                    }),
                    _ => Err(DataError::Download {
                        url: url.to_string(),
                        detail: format!("after {got} bytes: {e}"),
                    }),
                };
            }
        };
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| DataError::io("cannot write", dest, e))?;
        got += n as u64;
        progress.update(got);
    }
    progress.finish();
    if let Some(exp) = expected {
        if got != exp {
            return Err(DataError::DownloadTruncated {
                url: url.to_string(),
                got,
                expected: exp,
            });
        }
    }
    out.sync_all()
        .map_err(|e| DataError::io("cannot write", dest, e))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A progress bar on stderr: redrawn in place on a terminal, a line per 10% otherwise.
struct Progress {
    expected: Option<u64>,
    tty: bool,
    last_draw: Instant,
    last_decile: u64,
    drawn: bool,
}

impl Progress {
    fn new(url: &str, expected: Option<u64>) -> Self {
        let size = match expected {
            Some(n) => format!("{:.1} MB", n as f64 / 1e6),
            None => "unknown size".into(),
        };
        eprintln!("dtrain: downloading {url} ({size})");
        Progress {
            expected,
            tty: std::io::stderr().is_terminal(),
            last_draw: Instant::now(),
            last_decile: 0,
            drawn: false,
        }
    }

    fn update(&mut self, got: u64) {
        let mb = got as f64 / 1e6;
        if self.tty {
            if self.last_draw.elapsed() < Duration::from_millis(200) {
                return;
            }
            self.last_draw = Instant::now();
            self.drawn = true;
            match self.expected {
                Some(exp) if exp > 0 => {
                    let frac = (got as f64 / exp as f64).min(1.0);
                    let width = 30;
                    let filled = (frac * width as f64) as usize;
                    eprint!(
                        "\r[{}{}] {:5.1}% {mb:.1}/{:.1} MB",
                        "#".repeat(filled),
                        " ".repeat(width - filled),
                        frac * 100.0,
                        exp as f64 / 1e6
                    );
                }
                _ => eprint!("\r{mb:.1} MB"),
            }
        } else if let Some(exp) = self.expected.filter(|&e| e > 0) {
            let decile = got * 10 / exp;
            if decile > self.last_decile {
                self.last_decile = decile;
                eprintln!("dtrain: downloaded {mb:.1} MB ({}%)", decile * 10);
            }
        }
    }

    fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}
