//! Data pipeline: CIFAR-10 parsing and its errors, download over a loopback HTTP server (MD5
//! mismatch, truncation, offline), DistributedSampler semantics, augmentation exactness,
//! synthetic data, Fashion-MNIST, loader and test sharding.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use common::temp_dir;
use dtrain::args::{DatasetKind, TrainConfig};
use dtrain::data::augment::{AugmentParams, CIFAR_MEAN, CIFAR_STD};
use dtrain::data::cifar::{load_cifar10, CIFAR_DIR, RECORD_SIZE, TEST_FILE, TRAIN_FILES};
use dtrain::data::download::ensure_cifar10_with;
use dtrain::data::{
    augment_image, batches_per_epoch, fashion_mnist, load_dataset, make_batch, normalize_image,
    rank_indices, synthetic, test_shard, DataError, DataSplit, TrainLoader, IMAGE_SIZE,
};

// ---------------------------------------------------------------- helpers

/// Record `i` of file `f`: label (f + i) % 10, pixel j = (f*31 + i*7 + j) mod 256.
fn record(f: usize, i: usize) -> Vec<u8> {
    let mut r = Vec::with_capacity(RECORD_SIZE);
    r.push(((f + i) % 10) as u8);
    r.extend((0..IMAGE_SIZE).map(|j| ((f * 31 + i * 7 + j) % 256) as u8));
    r
}

/// Bytes of a CIFAR-like file with `n` records, file number `f`.
fn cifar_file(f: usize, n: usize) -> Vec<u8> {
    (0..n).flat_map(|i| record(f, i)).collect()
}

const RECORDS_PER_FILE: usize = 3;

fn write_cifar_dir(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (f, name) in TRAIN_FILES.iter().enumerate() {
        std::fs::write(dir.join(name), cifar_file(f, RECORDS_PER_FILE)).unwrap();
    }
    std::fs::write(dir.join(TEST_FILE), cifar_file(9, RECORDS_PER_FILE)).unwrap();
}

/// A .tar.gz shaped like the official archive: cifar-10-batches-bin/*.bin.
fn cifar_archive() -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut add = |name: &str, data: Vec<u8>| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        tar.append_data(&mut h, format!("{CIFAR_DIR}/{name}"), &data[..])
            .unwrap();
    };
    for (f, name) in TRAIN_FILES.iter().enumerate() {
        add(name, cifar_file(f, RECORDS_PER_FILE));
    }
    add(TEST_FILE, cifar_file(9, RECORDS_PER_FILE));
    add("readme.html", b"<html>test</html>".to_vec());
    tar.into_inner().unwrap().finish().unwrap()
}

fn md5_hex(bytes: &[u8]) -> String {
    use md5::{Digest, Md5};
    Md5::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A tiny HTTP/1.1 server on 127.0.0.1 serving one body; `truncate_to` sends fewer bytes than
/// the Content-Length it announces, then closes.
struct HttpServer {
    url: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    fn start(body: Vec<u8>, truncate_to: Option<usize>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!(
            "http://127.0.0.1:{}/cifar-10-binary.tar.gz",
            listener.local_addr().unwrap().port()
        );
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (req2, stop2) = (requests.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !stop2.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                match listener.accept() {
                    Ok((mut sock, _)) => {
                        sock.set_nonblocking(false).unwrap();
                        sock.set_read_timeout(Some(Duration::from_secs(10)))
                            .unwrap();
                        let mut head = Vec::new();
                        let mut byte = [0u8; 1];
                        while !head.ends_with(b"\r\n\r\n") {
                            match sock.read(&mut byte) {
                                Ok(1) => head.push(byte[0]),
                                _ => break,
                            }
                        }
                        req2.fetch_add(1, Ordering::SeqCst);
                        let sent = truncate_to.unwrap_or(body.len()).min(body.len());
                        let _ = write!(
                            sock,
                            "HTTP/1.1 200 OK\r\nContent-Type: application/gzip\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = sock.write_all(&body[..sent]);
                        let _ = sock.flush();
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(5))
                    }
                    Err(_) => break,
                }
            }
        });
        HttpServer {
            url,
            requests,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Only the lock file may remain in the data folder after a failure.
fn leftovers(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != ".download.lock")
        .collect()
}

fn split_from(images: Vec<u8>, labels: Vec<u8>) -> DataSplit {
    let n = labels.len();
    DataSplit { images, labels, n }
}

// ---------------------------------------------------------------- CIFAR-10 files

#[test]
fn cifar_parses_generated_files() {
    let tmp = temp_dir("cifar-parse");
    let dir = tmp.0.join(CIFAR_DIR);
    write_cifar_dir(&dir);
    let (train, test) = load_cifar10(&dir).unwrap();
    assert_eq!(train.n, 5 * RECORDS_PER_FILE);
    assert_eq!(test.n, RECORDS_PER_FILE);
    assert_eq!(train.images.len(), train.n * 3072);
    // Sample 7 = file 2 (data_batch_3), record 1.
    let rec = record(2, 1);
    assert_eq!(train.labels[7], rec[0]);
    assert_eq!(train.image(7), &rec[1..]);
    let rec = record(9, 2);
    assert_eq!(test.labels[2], rec[0]);
    assert_eq!(test.image(2), &rec[1..]);
}

#[test]
fn cifar_truncated_file_names_file_and_record() {
    let tmp = temp_dir("cifar-trunc");
    let dir = tmp.0.join(CIFAR_DIR);
    write_cifar_dir(&dir);
    let mut bytes = cifar_file(3, RECORDS_PER_FILE);
    bytes.truncate(2 * RECORD_SIZE + 100);
    std::fs::write(dir.join("data_batch_4.bin"), bytes).unwrap();
    let e = load_cifar10(&dir).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(
            e,
            DataError::Truncated {
                record: 2,
                partial: 100,
                ..
            }
        ),
        "{msg}"
    );
    assert!(
        msg.contains("data_batch_4.bin") && msg.contains("record 2"),
        "{msg}"
    );
}

#[test]
fn cifar_bad_label_names_file_and_record() {
    let tmp = temp_dir("cifar-label");
    let dir = tmp.0.join(CIFAR_DIR);
    write_cifar_dir(&dir);
    let mut bytes = cifar_file(9, RECORDS_PER_FILE);
    bytes[RECORD_SIZE] = 12; // label of record 1
    std::fs::write(dir.join(TEST_FILE), bytes).unwrap();
    let msg = load_cifar10(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("test_batch.bin") && msg.contains("record 1") && msg.contains("label 12"),
        "{msg}"
    );
}

#[test]
fn cifar_empty_and_missing_files_are_errors() {
    let tmp = temp_dir("cifar-empty");
    let dir = tmp.0.join(CIFAR_DIR);
    write_cifar_dir(&dir);
    std::fs::write(dir.join("data_batch_1.bin"), b"").unwrap();
    let msg = load_cifar10(&dir).unwrap_err().to_string();
    assert!(
        msg.contains("data_batch_1.bin") && msg.contains("empty"),
        "{msg}"
    );
    std::fs::remove_file(dir.join("data_batch_1.bin")).unwrap();
    let msg = load_cifar10(&dir).unwrap_err().to_string();
    assert!(msg.contains("data_batch_1.bin"), "{msg}");
}

// ---------------------------------------------------------------- download

#[test]
fn download_extracts_verifies_and_loads() {
    let archive = cifar_archive();
    let md5 = md5_hex(&archive);
    let server = HttpServer::start(archive, None);
    let tmp = temp_dir("dl-ok");
    let mut cfg = TrainConfig::single_process_defaults();
    cfg.opts.data_dir = tmp.0.clone();
    cfg.opts.download_url = server.url.clone();
    cfg.opts.download_md5 = md5;
    let (train, test) = load_dataset(&cfg).unwrap();
    assert_eq!((train.n, test.n), (5 * RECORDS_PER_FILE, RECORDS_PER_FILE));
    assert_eq!(train.image(4), &record(1, 1)[1..]);
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    // Nothing but the data and the lock file remain.
    assert_eq!(leftovers(&tmp.0), vec![CIFAR_DIR.to_string()]);
    // Present now: a second load does not download again.
    load_dataset(&cfg).unwrap();
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn concurrent_ranks_download_once() {
    let archive = cifar_archive();
    let md5 = md5_hex(&archive);
    let server = HttpServer::start(archive, None);
    let tmp = temp_dir("dl-lock");
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let (dir, url, md5) = (tmp.0.clone(), server.url.clone(), md5.clone());
            std::thread::spawn(move || {
                ensure_cifar10_with(&dir, &url, &md5, Duration::from_secs(60))
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    assert_eq!(server.requests.load(Ordering::SeqCst), 1);
    load_cifar10(&tmp.0.join(CIFAR_DIR)).unwrap();
}

#[test]
fn md5_mismatch_leaves_nothing_behind() {
    let archive = cifar_archive();
    let actual = md5_hex(&archive);
    let server = HttpServer::start(archive, None);
    let tmp = temp_dir("dl-md5");
    let wrong = "0123456789abcdef0123456789abcdef";
    let e = ensure_cifar10_with(&tmp.0, &server.url, wrong, Duration::from_secs(10)).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::Md5Mismatch { .. }), "{msg}");
    assert!(msg.contains(wrong) && msg.contains(&actual), "{msg}");
    assert!(
        leftovers(&tmp.0).is_empty(),
        "left: {:?}",
        leftovers(&tmp.0)
    );
}

#[test]
fn truncated_download_leaves_nothing_behind() {
    let archive = cifar_archive();
    let md5 = md5_hex(&archive);
    let full = archive.len();
    let server = HttpServer::start(archive, Some(full / 2));
    let tmp = temp_dir("dl-trunc");
    let e = ensure_cifar10_with(&tmp.0, &server.url, &md5, Duration::from_secs(10)).unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, DataError::DownloadTruncated { got, expected, .. } if got == (full / 2) as u64 && expected == full as u64),
        "{msg}"
    );
    assert!(
        leftovers(&tmp.0).is_empty(),
        "left: {:?}",
        leftovers(&tmp.0)
    );
}

#[test]
fn offline_error_says_where_to_put_the_files() {
    // A port nobody listens on: bind, note the port, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/cifar-10-binary.tar.gz");
    let tmp = temp_dir("dl-offline");
    let e = ensure_cifar10_with(
        &tmp.0,
        &url,
        "c32a1d4ab5d03f1284b67883e8d87530",
        Duration::from_secs(10),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, DataError::Missing { .. }), "{msg}");
    assert!(msg.contains(&url), "{msg}");
    assert!(
        msg.contains(&tmp.0.join(CIFAR_DIR).display().to_string()),
        "{msg}"
    );
    assert!(msg.contains("data_batch_1.bin"), "{msg}");
    assert!(leftovers(&tmp.0).is_empty());
}

#[test]
fn archive_without_cifar_folder_is_rejected() {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_cksum();
    tar.append_data(&mut h, "other/file.txt", &b"abc"[..])
        .unwrap();
    let archive = tar.into_inner().unwrap().finish().unwrap();
    let md5 = md5_hex(&archive);
    let server = HttpServer::start(archive, None);
    let tmp = temp_dir("dl-wrong-archive");
    let msg = ensure_cifar10_with(&tmp.0, &server.url, &md5, Duration::from_secs(10))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("does not contain cifar-10-batches-bin"),
        "{msg}"
    );
    assert!(
        leftovers(&tmp.0).is_empty(),
        "left: {:?}",
        leftovers(&tmp.0)
    );
}

// ---------------------------------------------------------------- sampler

#[test]
fn sampler_matches_hand_worked_example() {
    // n=10, W=3, no shuffle: order 0..9 padded with 0,1 to 12; rank r takes r, r+3, ...
    assert_eq!(rank_indices(10, 3, 0, 0, 0, false), vec![0, 3, 6, 9]);
    assert_eq!(rank_indices(10, 3, 1, 0, 0, false), vec![1, 4, 7, 0]);
    assert_eq!(rank_indices(10, 3, 2, 0, 0, false), vec![2, 5, 8, 1]);
    // n < W: the start is repeated more than once (0,1 then 0,1,0 ...).
    assert_eq!(rank_indices(2, 5, 4, 0, 0, false), vec![0]);
    assert_eq!(rank_indices(2, 5, 3, 0, 0, false), vec![1]);
    // Batches: ceil(ceil(10/3)/3) = 2 (batches of 3 and 1).
    assert_eq!(batches_per_epoch(10, 3, 3), 2);
    assert_eq!(batches_per_epoch(50_000, 2, 64), 391);
}

#[test]
fn shuffled_sampler_is_a_padded_permutation() {
    let (n, w) = (103, 4);
    let shards: Vec<Vec<usize>> = (0..w).map(|r| rank_indices(n, w, r, 5, 2, true)).collect();
    assert!(shards.iter().all(|s| s.len() == 26));
    // Interleave back into the padded order.
    let order: Vec<usize> = (0..26 * w).map(|p| shards[p % w][p / w]).collect();
    let mut seen = order[..n].to_vec();
    seen.sort();
    assert_eq!(
        seen,
        (0..n).collect::<Vec<_>>(),
        "first n entries are a permutation"
    );
    assert_eq!(&order[n..], &order[..104 - n], "padding repeats the start");
    assert_ne!(order[..n], (0..n).collect::<Vec<_>>()[..], "shuffled");
    // Same seed+epoch → same order on every call; another epoch → another order.
    assert_eq!(rank_indices(n, w, 1, 5, 2, true), shards[1]);
    assert_ne!(rank_indices(n, w, 1, 5, 3, true), shards[1]);
}

// ---------------------------------------------------------------- augmentation

/// An image whose value encodes its position: v(c, y, x) = (c*61 + y*8 + x) % 251 + 1 (never 0).
fn position_image() -> Vec<u8> {
    let mut img = vec![0u8; IMAGE_SIZE];
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                img[c * 1024 + y * 32 + x] = ((c * 61 + y * 8 + x) % 251 + 1) as u8;
            }
        }
    }
    img
}

fn px(img: &[u8], c: usize, y: usize, x: usize) -> u8 {
    img[c * 1024 + y * 32 + x]
}

#[test]
fn crop_and_flip_are_exact() {
    let src = position_image();
    let mut out = vec![0u8; IMAGE_SIZE];

    augment_image(&src, AugmentParams::IDENTITY, &mut out);
    assert_eq!(out, src);

    // Crop at (0, 0) of the padded image: content moves down-right by 4, zeros top-left.
    augment_image(
        &src,
        AugmentParams {
            crop_y: 0,
            crop_x: 0,
            flip: false,
        },
        &mut out,
    );
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                let want = if y < 4 || x < 4 {
                    0
                } else {
                    px(&src, c, y - 4, x - 4)
                };
                assert_eq!(px(&out, c, y, x), want, "c{c} y{y} x{x}");
            }
        }
    }

    // Crop at (8, 2): out(y, x) = src(y + 4, x - 2); bottom 4 rows and left 2 columns zero.
    augment_image(
        &src,
        AugmentParams {
            crop_y: 8,
            crop_x: 2,
            flip: false,
        },
        &mut out,
    );
    assert_eq!(px(&out, 1, 0, 2), px(&src, 1, 4, 0));
    assert_eq!(px(&out, 2, 27, 31), px(&src, 2, 31, 29));
    assert_eq!(px(&out, 0, 28, 10), 0);
    assert_eq!(px(&out, 0, 10, 1), 0);

    // Flip only: out(y, x) = src(y, 31 - x).
    augment_image(
        &src,
        AugmentParams {
            crop_y: 4,
            crop_x: 4,
            flip: true,
        },
        &mut out,
    );
    for c in 0..3 {
        for y in 0..32 {
            for x in 0..32 {
                assert_eq!(px(&out, c, y, x), px(&src, c, y, 31 - x));
            }
        }
    }

    // Crop then flip (torchvision order): crop (4, 7) gives src(y, x + 3), then mirrored.
    augment_image(
        &src,
        AugmentParams {
            crop_y: 4,
            crop_x: 7,
            flip: true,
        },
        &mut out,
    );
    assert_eq!(px(&out, 0, 5, 31), px(&src, 0, 5, 3)); // cropped x = 0 → src x = 3
    assert_eq!(px(&out, 0, 5, 3), px(&src, 0, 5, 31)); // cropped x = 28 → src x = 31
    assert_eq!(px(&out, 0, 5, 2), 0); // cropped x = 29 → src x = 32: padding
    assert_eq!(px(&out, 0, 5, 4), px(&src, 0, 5, 30)); // cropped x = 27 → src x = 30
}

#[test]
fn augment_draws_cover_all_choices_deterministically() {
    let mut offsets = std::collections::HashSet::new();
    let mut flips = 0;
    for i in 0..2000 {
        let p = AugmentParams::draw(3, 1, i);
        assert_eq!(p, AugmentParams::draw(3, 1, i));
        assert!(p.crop_x <= 8 && p.crop_y <= 8);
        offsets.insert((p.crop_y, p.crop_x));
        flips += p.flip as usize;
    }
    assert_eq!(offsets.len(), 81);
    assert!((800..1200).contains(&flips), "{flips} flips of 2000");
    let differs = (0..100).any(|i| AugmentParams::draw(3, 1, i) != AugmentParams::draw(3, 2, i));
    assert!(differs, "epoch changes the draws");
}

#[test]
fn normalization_uses_cifar_mean_and_std() {
    let mut src = vec![0u8; IMAGE_SIZE];
    src[0] = 255; // channel 0
    src[1024 + 5] = 123; // channel 1
    src[2048 + 7] = 10; // channel 2
    let mut out = vec![0f32; IMAGE_SIZE];
    normalize_image(&src, &mut out);
    let close = |a: f32, b: f32| (a - b).abs() < 1e-5;
    assert!(close(out[0], (255.0 - 125.3) / 63.0), "{}", out[0]);
    assert!(close(out[1], -125.3 / 63.0));
    assert!(close(out[1024 + 5], 0.0));
    assert!(close(out[2048 + 7], (10.0 - 113.9) / 66.7));
    assert_eq!(
        (CIFAR_MEAN, CIFAR_STD),
        ([125.3, 123.0, 113.9], [63.0, 62.1, 66.7])
    );
}

// ---------------------------------------------------------------- loader

fn numbered_split(n: usize) -> DataSplit {
    let mut images = vec![0u8; n * IMAGE_SIZE];
    for i in 0..n {
        images[i * IMAGE_SIZE..(i + 1) * IMAGE_SIZE].fill((i % 256) as u8);
    }
    split_from(images, (0..n).map(|i| (i % 10) as u8).collect())
}

#[test]
fn loader_shards_batches_and_resumes() {
    let split = Arc::new(numbered_split(103));
    let mut cfg = TrainConfig::single_process_defaults();
    cfg.num_nodes = 2;
    cfg.rank = 1;
    cfg.opts.batch_size = 16;
    cfg.opts.seed = 9;
    let loader = TrainLoader::new(split.clone(), &cfg, 3, 0);
    assert_eq!(loader.batches_per_epoch(), 4); // 52 samples: 16+16+16+4
    let batches: Vec<_> = loader.collect();
    assert_eq!(
        batches.iter().map(|b| b.n).collect::<Vec<_>>(),
        vec![16, 16, 16, 4]
    );
    let indices = rank_indices(103, 2, 1, 9, 3, true);
    let labels: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    assert_eq!(
        labels,
        indices.iter().map(|&i| (i % 10) as u32).collect::<Vec<_>>()
    );
    // Each batch equals make_batch over its indices with (seed, epoch) augmentation.
    assert_eq!(
        batches[2],
        make_batch(&split, &indices[32..48], Some((9, 3)))
    );
    // Resuming at batch 2 yields exactly the tail.
    let resumed: Vec<_> = TrainLoader::new(split.clone(), &cfg, 3, 2).collect();
    assert_eq!(resumed, batches[2..].to_vec());
    // Dropping a loader early does not hang.
    let mut early = TrainLoader::new(split, &cfg, 3, 0);
    assert!(early.next().is_some());
    drop(early);
}

#[test]
fn loader_without_augment_and_shuffle_is_plain() {
    let split = Arc::new(numbered_split(10));
    let mut cfg = TrainConfig::single_process_defaults();
    cfg.opts.batch_size = 4;
    cfg.opts.no_augment = true;
    cfg.opts.no_shuffle = true;
    let batches: Vec<_> = TrainLoader::new(split.clone(), &cfg, 0, 0).collect();
    assert_eq!(batches.len(), 3);
    let mut want = vec![0f32; IMAGE_SIZE];
    normalize_image(split.image(5), &mut want);
    assert_eq!(&batches[1].images[IMAGE_SIZE..2 * IMAGE_SIZE], &want[..]);
    assert_eq!(batches[2].labels, vec![8, 9]);
}

#[test]
fn test_shards_cover_the_test_set_once() {
    let split = numbered_split(23);
    let mut seen = Vec::new();
    for rank in 0..3 {
        for b in test_shard(&split, rank, 3, 4) {
            assert!(b.n <= 4);
            seen.extend(b.labels.iter().copied());
            assert_eq!(b.images.len(), b.n * IMAGE_SIZE);
        }
    }
    assert_eq!(seen.len(), 23);
    let mut counts = [0usize; 10];
    seen.iter().for_each(|&l| counts[l as usize] += 1);
    assert_eq!(counts, [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]);
    // Rank 1 of 3 sees 1, 4, 7, ... in order, unaugmented.
    let first = test_shard(&split, 1, 3, 100).next().unwrap();
    assert_eq!(first.labels, vec![1, 4, 7, 0, 3, 6, 9, 2]);
}

// ---------------------------------------------------------------- synthetic

#[test]
fn synthetic_is_deterministic_and_balanced() {
    let a = synthetic::generate(4, synthetic::Split::Train, 500).unwrap();
    let b = synthetic::generate(4, synthetic::Split::Train, 500).unwrap();
    assert_eq!(a, b);
    let other_seed = synthetic::generate(5, synthetic::Split::Train, 500).unwrap();
    assert_ne!(a.images, other_seed.images);
    let test = synthetic::generate(4, synthetic::Split::Test, 500).unwrap();
    assert_ne!(a.images, test.images);
    // A prefix is the same whatever the total size (samples depend on their index only).
    let small = synthetic::generate(4, synthetic::Split::Train, 50).unwrap();
    assert_eq!(small.images[..], a.images[..50 * IMAGE_SIZE]);
    let mut counts = [0usize; 10];
    a.labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert!(counts.iter().all(|&c| (25..80).contains(&c)), "{counts:?}");
    let mut cfg = TrainConfig::single_process_defaults();
    cfg.opts.dataset = DatasetKind::Synthetic;
    cfg.opts.synthetic_train = 300;
    cfg.opts.synthetic_test = 70;
    let (tr, te) = load_dataset(&cfg).unwrap();
    assert_eq!((tr.n, te.n, tr.images.len()), (300, 70, 300 * IMAGE_SIZE));
}

/// The class is in the pattern, not in simple statistics: a nearest-class-mean classifier on
/// raw pixels is weak (random phases blur the means), while matching each sample against the
/// class gratings' power (what a convolution can learn) is strong.
#[test]
fn synthetic_classes_need_the_pattern() {
    let train = synthetic::generate(0, synthetic::Split::Train, 2000).unwrap();
    let test = synthetic::generate(0, synthetic::Split::Test, 500).unwrap();
    let mean_color = |s: &DataSplit, i: usize| -> [f32; 3] {
        let img = s.image(i);
        let mut m = [0f32; 3];
        for c in 0..3 {
            m[c] = img[c * 1024..(c + 1) * 1024]
                .iter()
                .map(|&v| v as f32)
                .sum::<f32>()
                / 1024.0;
        }
        m
    };
    // Nearest class mean colour.
    let mut sums = [[0f32; 3]; 10];
    let mut counts = [0f32; 10];
    for i in 0..train.n {
        let m = mean_color(&train, i);
        let l = train.labels[i] as usize;
        for c in 0..3 {
            sums[l][c] += m[c];
        }
        counts[l] += 1.0;
    }
    let correct_color = (0..test.n)
        .filter(|&i| {
            let m = mean_color(&test, i);
            let best = (0..10)
                .min_by(|&a, &b| {
                    let d = |k: usize| {
                        (0..3)
                            .map(|c| (m[c] - sums[k][c] / counts[k]).powi(2))
                            .sum::<f32>()
                    };
                    d(a).partial_cmp(&d(b)).unwrap()
                })
                .unwrap();
            best == test.labels[i] as usize
        })
        .count();
    // Power spectrum features (|DFT| at low frequencies, per channel), nearest class mean:
    // phase-invariant, so it sees the grating whatever its shift.
    let spectrum = |s: &DataSplit, i: usize| -> Vec<f32> {
        let img = s.image(i);
        let mut f = Vec::new();
        for c in 0..3 {
            for u in 0..6 {
                for v in -5i32..6 {
                    let (mut re, mut im) = (0f32, 0f32);
                    for y in 0..32 {
                        for x in 0..32 {
                            let val = img[c * 1024 + y * 32 + x] as f32;
                            let ang = 2.0
                                * std::f32::consts::PI
                                * (u as f32 * x as f32 + v as f32 * y as f32)
                                / 32.0;
                            re += val * ang.cos();
                            im += val * ang.sin();
                        }
                    }
                    f.push(if u == 0 && v == 0 {
                        0.0
                    } else {
                        (re * re + im * im).sqrt()
                    });
                }
            }
        }
        f
    };
    let feats_train: Vec<Vec<f32>> = (0..400).map(|i| spectrum(&train, i)).collect();
    let mut csum = vec![vec![0f32; feats_train[0].len()]; 10];
    let mut ccount = [0f32; 10];
    for (i, f) in feats_train.iter().enumerate() {
        let l = train.labels[i] as usize;
        csum[l].iter_mut().zip(f).for_each(|(a, b)| *a += b);
        ccount[l] += 1.0;
    }
    let correct_spectrum = (0..200)
        .filter(|&i| {
            let f = spectrum(&test, i);
            let best = (0..10)
                .min_by(|&a, &b| {
                    let d = |k: usize| {
                        f.iter()
                            .zip(&csum[k])
                            .map(|(x, s)| (x - s / ccount[k]).powi(2))
                            .sum::<f32>()
                    };
                    d(a).partial_cmp(&d(b)).unwrap()
                })
                .unwrap();
            best == test.labels[i] as usize
        })
        .count();
    let acc_color = correct_color as f32 / test.n as f32;
    let acc_spectrum = correct_spectrum as f32 / 200.0;
    eprintln!(
        "synthetic: mean-colour accuracy {acc_color:.3}, spectrum accuracy {acc_spectrum:.3}"
    );
    assert!(acc_color < 0.35, "mean colour alone gives {acc_color}");
    assert!(acc_spectrum > 0.8, "the grating gives only {acc_spectrum}");
}

// ---------------------------------------------------------------- Fashion-MNIST

#[test]
fn fashion_mnist_loads_from_the_debian_package() {
    let dir = Path::new(fashion_mnist::SYSTEM_DIR);
    assert!(
        dir.is_dir(),
        "{} is missing: install Debian's dataset-fashion-mnist package",
        dir.display()
    );
    let (train, test) = fashion_mnist::load(dir).unwrap();
    assert_eq!((train.n, test.n), (60_000, 10_000));
    assert_eq!(train.images.len(), 60_000 * IMAGE_SIZE);
    assert!(train.labels.iter().all(|&l| l < 10));
    let mut counts = [0usize; 10];
    train.labels.iter().for_each(|&l| counts[l as usize] += 1);
    assert_eq!(
        counts, [6000; 10],
        "Fashion-MNIST has 6000 training images per class"
    );
    for i in [0, 123, 59_999] {
        let img = train.image(i);
        // 2-pixel zero border, identical channels, some ink inside.
        for c in 0..3 {
            for k in 0..32 {
                for (y, x) in [
                    (0, k),
                    (1, k),
                    (30, k),
                    (31, k),
                    (k, 0),
                    (k, 1),
                    (k, 30),
                    (k, 31),
                ] {
                    assert_eq!(img[c * 1024 + y * 32 + x], 0);
                }
            }
        }
        assert_eq!(img[..1024], img[1024..2048]);
        assert_eq!(img[..1024], img[2048..]);
        assert!(img.iter().any(|&v| v > 100));
    }
}

#[test]
fn idx_errors_are_clear() {
    let p = Path::new("x.idx");
    let msg = fashion_mnist::parse_idx(p, &[0, 0, 8, 1, 0, 0, 0, 5, 1, 2])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("x.idx") && msg.contains("5 bytes of data") && msg.contains("has 2"),
        "{msg}"
    );
    let msg = fashion_mnist::parse_idx(p, &[1, 2, 3, 4])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("magic"), "{msg}");
    let (dims, data) =
        fashion_mnist::parse_idx(p, &[0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 1, 7, 9]).unwrap();
    assert_eq!((dims, data), (vec![2, 1], vec![7, 9]));
}

/// Sizes in IDX headers are checked for overflow and against the file's (or the gzip
/// stream's) length before anything is allocated from them.
#[test]
fn idx_header_sizes_are_checked_before_allocating() {
    let p = Path::new("x.idx");
    let err = |bytes: &[u8]| fashion_mnist::parse_idx(p, bytes).unwrap_err().to_string();
    // 0xffffffff^3 elements overflow 64 bits.
    let mut huge = vec![0, 0, 8, 3];
    huge.extend_from_slice(&[0xff; 12]);
    assert!(err(&huge).contains("overflow"), "{}", err(&huge));
    // A header claiming 4 GiB over 1 byte of data; more data than the header says.
    assert!(err(&[0, 0, 8, 1, 0xff, 0xff, 0xff, 0xff, 1]).contains("has 1"));
    assert!(err(&[0, 0, 8, 1, 0, 0, 0, 1, 5, 6]).contains("has 2"));
    assert!(err(&[0, 0, 8, 2, 0, 0, 0, 1]).contains("truncated header"));
    assert!(err(&[0, 0, 8]).contains("magic"));

    // Gzipped files: the stream's possible size bounds the header before any allocation.
    let gz = |bytes: &[u8]| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(bytes).unwrap();
        e.finish().unwrap()
    };
    let load_with_train_images = |images: Vec<u8>| {
        let dir = temp_dir("idx-gz");
        let fm = dir.0.join("fashion-mnist");
        std::fs::create_dir_all(&fm).unwrap();
        let labels = gz(&[0, 0, 8, 1, 0, 0, 0, 1, 3]);
        std::fs::write(fm.join("train-images-idx3-ubyte.gz"), images).unwrap();
        for f in [
            "train-labels-idx1-ubyte.gz",
            "t10k-images-idx3-ubyte.gz",
            "t10k-labels-idx1-ubyte.gz",
        ] {
            std::fs::write(fm.join(f), &labels).unwrap();
        }
        let found = fashion_mnist::find_dir(&dir.0).unwrap();
        fashion_mnist::load(&found).unwrap_err().to_string()
    };
    // 65535 images of 65535 x 65535 pixels inside a few dozen bytes.
    let mut bomb = vec![0, 0, 8, 3];
    bomb.extend_from_slice(&[0, 0, 0xff, 0xff].repeat(3));
    let msg = load_with_train_images(gz(&bomb));
    assert!(msg.contains("once decompressed"), "{msg}");
    let mut short = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28];
    short.extend_from_slice(&[1; 100]);
    let msg = load_with_train_images(gz(&short));
    assert!(msg.contains("the file has 100"), "{msg}");
    let mut long = vec![0, 0, 8, 3, 0, 0, 0, 1, 0, 0, 0, 28, 0, 0, 0, 28];
    long.extend_from_slice(&[1; 28 * 28 + 1]);
    let msg = load_with_train_images(gz(&long));
    assert!(msg.contains("the file has more"), "{msg}");
    let msg = load_with_train_images(b"\x1f\x8b not really gzip".to_vec());
    assert!(msg.contains("corrupt data"), "{msg}");
}
