//! Damaged checkpoints are refused, never trained on: a bit flip anywhere in the header
//! (every bit of it is tried), a bit flip in each tensor (named), truncation at any length;
//! `dtrain` exits 2 naming the file and what is damaged, and overwrites nothing. With
//! `--keep-checkpoints` the previous checkpoints stay beside the newest, and `--resume auto`
//! whose newest file is damaged says so, falls back to the previous one, and ends with the
//! parameters of an uninterrupted run.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use dtrain::checkpoint::{self, CheckpointError, Position};
use engine::optim::Sgd;

const SPEC: &str = "4,M";

/// A small model after one SGD step (so momentum buffers exist), its optimizer, and the
/// bytes of its checkpoint saved at `path`.
fn saved_checkpoint(path: &Path) -> Vec<u8> {
    let mut model = dtrain::train::build_model(SPEC, 3).expect("model");
    let mut sgd = Sgd::<f32>::new(0.1, 0.9, 1e-4);
    for p in model.params_mut() {
        p.grad
            .iter_mut()
            .enumerate()
            .for_each(|(i, g)| *g = i as f32 * 1e-3);
    }
    sgd.step(model.params_mut());
    let at = Position {
        epoch: 1,
        batch: 4,
        iteration: 14,
    };
    let settings: BTreeMap<String, String> = [("seed".to_string(), "3".to_string())].into();
    checkpoint::save_training(path, SPEC, &model, &sgd, at, settings).expect("save");
    std::fs::read(path).expect("read back")
}

fn restore(bytes: &[u8], path: &Path) -> Result<Position, CheckpointError> {
    let mut model = dtrain::train::build_model(SPEC, 0).expect("model");
    let mut sgd = Sgd::<f32>::new(0.1, 0.9, 1e-4);
    checkpoint::restore(bytes, path, SPEC, &mut model, &mut sgd).map(|r| r.position)
}

/// The length of the 8-byte length field plus the header, and each tensor's
/// `(name, start, end)` in the file.
fn layout(bytes: &[u8]) -> (usize, Vec<(String, usize, usize)>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("json");
    let tensors = header
        .as_object()
        .expect("object")
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .map(|(k, v)| {
            let at = |i: usize| v["data_offsets"][i].as_u64().expect("offset") as usize;
            (k.clone(), 8 + n + at(0), 8 + n + at(1))
        })
        .collect();
    (8 + n, tensors)
}

/// The `what` of a damaged-checkpoint error (which must name `path`).
fn damage(result: Result<Position, CheckpointError>, path: &Path, case: &str) -> String {
    match result {
        Err(CheckpointError::Damaged { path: p, what }) => {
            assert_eq!(p, path, "{case}");
            what
        }
        other => panic!("{case}: not refused as damaged: {other:?}"),
    }
}

#[test]
fn the_intact_file_loads() {
    let dir = temp_dir("intact");
    let path = dir.join("c.st");
    let bytes = saved_checkpoint(&path);
    assert_eq!(restore(&bytes, &path).expect("loads").iteration, 14);
}

/// Every single-bit flip in the length field and the header (tensor table, training state,
/// checksums) is refused; each region's flips say what they damaged.
#[test]
fn every_bit_flip_in_the_header_is_refused() {
    let dir = temp_dir("header-flips");
    let path = dir.join("c.st");
    let bytes = saved_checkpoint(&path);
    let (header_end, _) = layout(&bytes);
    let header = String::from_utf8_lossy(&bytes[8..header_end]).into_owned();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for i in 0..header_end {
        for bit in 0..8 {
            let mut bad = bytes.clone();
            bad[i] ^= 1 << bit;
            let what = damage(restore(&bad, &path), &path, &format!("byte {i} bit {bit}"));
            for kind in [
                "header length",
                "not valid JSON",
                "the header is damaged (it does not match its checksum)",
                "the training state",
                "not a valid safetensors file",
            ] {
                if what.contains(kind) {
                    *seen.entry(kind).or_default() += 1;
                }
            }
        }
    }
    // The training state's values ("epoch":"1", "seed":"3", ...) sit in the header.
    assert!(header.contains("\"epoch\":\"1\""), "{header}");
    for kind in [
        "header length",
        "not valid JSON",
        "the header is damaged (it does not match its checksum)",
        "the training state",
    ] {
        assert!(seen.get(kind).is_some_and(|&n| n > 0), "{kind}: {seen:?}");
    }
}

/// A flipped bit in any tensor's data (parameters, batch-norm statistics, the I64
/// `num_batches_tracked`, momentum buffers) is refused, naming that tensor and only it.
#[test]
fn a_bit_flip_in_any_tensor_names_that_tensor() {
    let dir = temp_dir("tensor-flips");
    let path = dir.join("c.st");
    let bytes = saved_checkpoint(&path);
    let (_, tensors) = layout(&bytes);
    assert!(tensors.iter().any(|(n, _, _)| n.contains("momentum")));
    assert!(tensors
        .iter()
        .any(|(n, _, _)| n.ends_with("num_batches_tracked")));
    for (k, (name, start, end)) in tensors.iter().enumerate() {
        // The first, the last and a middle byte of each tensor, a different bit each time.
        for (j, at) in [*start, (start + end) / 2, end - 1].into_iter().enumerate() {
            let mut bad = bytes.clone();
            bad[at] ^= 1 << ((k + j) % 8);
            let what = damage(restore(&bad, &path), &path, name);
            assert_eq!(what, format!("tensor {name} does not match its checksum"));
        }
    }
}

/// A file cut at any length is refused as truncated (or, cut inside the header, as a header
/// that ends early), without reading past what is there.
#[test]
fn truncation_at_any_length_is_refused() {
    let dir = temp_dir("truncated");
    let path = dir.join("c.st");
    let bytes = saved_checkpoint(&path);
    let (header_end, _) = layout(&bytes);
    let cuts = [0, 3, 8, 9, header_end / 2, header_end, header_end + 1];
    let tail = (1..=64).map(|k| bytes.len() - k * (bytes.len() - header_end) / 64);
    for cut in cuts.into_iter().chain(tail) {
        let what = damage(restore(&bytes[..cut], &path), &path, &format!("cut {cut}"));
        assert!(what.contains("truncated"), "cut at {cut}: {what}");
    }
}

/// `--resume` of `ckpt` (also the `--save-checkpoint` target) on the small problem.
fn resume_args(ckpt: &str, extra: &[&str]) -> Vec<String> {
    let mut args = strings(SMALL);
    args.extend(strings(&["--mode", "single", "--max-iters", "6"]));
    args.extend(strings(&["--resume", ckpt, "--save-checkpoint", ckpt]));
    args.extend(strings(extra));
    args
}

/// A real checkpoint after 4 iterations, in `dir`.
fn trained_checkpoint(dir: &Path, extra: &[&str]) -> String {
    let ckpt = dir.join("c.st").to_str().expect("utf-8").to_string();
    let mut args = strings(SMALL);
    args.extend(strings(&["--mode", "single", "--max-iters", "4"]));
    args.extend(strings(&["--save-checkpoint", &ckpt]));
    args.extend(strings(extra));
    assert_ok(std::slice::from_ref(&run_single(&args)));
    ckpt
}

fn flip_bit(path: &Path, at: usize, bit: u8) {
    let mut bytes = std::fs::read(path).expect("read");
    bytes[at] ^= 1 << bit;
    std::fs::write(path, bytes).expect("write");
}

/// The first byte of the data of a tensor whose name contains `part`.
fn tensor_byte(path: &Path, part: &str) -> (String, usize) {
    let bytes = std::fs::read(path).expect("read");
    let (_, tensors) = layout(&bytes);
    let (name, start, _) = tensors
        .into_iter()
        .find(|(n, _, _)| n.contains(part))
        .expect("tensor");
    (name, start)
}

/// As a user would: damage the checkpoint, `--resume` it; exit 2 with a message naming the
/// file and what is damaged, before any training, and nothing is overwritten.
#[test]
fn dtrain_refuses_a_damaged_resume_file_with_exit_2_and_overwrites_nothing() {
    let dir = temp_dir("refuse");
    let ckpt = trained_checkpoint(&dir, &["--keep-checkpoints", "1"]);
    let path = Path::new(&ckpt);
    let pristine = std::fs::read(path).expect("read");
    let (tensor, at) = tensor_byte(path, "fc1.weight");
    let header_end = layout(&pristine).0;
    let epoch_at = 8
        + String::from_utf8_lossy(&pristine[8..header_end])
            .find("\"epoch\":\"")
            .expect("epoch")
        + "\"epoch\":\"".len();
    type DamageIt = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, DamageIt, String)> = vec![
        (
            "a bit flip in a tensor",
            Box::new(move |p| flip_bit(p, at + 5, 3)),
            format!("tensor {tensor} does not match its checksum"),
        ),
        (
            "a bit flip in the training state",
            Box::new(move |p| flip_bit(p, epoch_at, 0)),
            "the training state (position and settings) does not match its checksum".into(),
        ),
        (
            "truncation",
            Box::new(|p| {
                let b = std::fs::read(p).expect("read");
                std::fs::write(p, &b[..b.len() - 100]).expect("write");
            }),
            "the file is truncated".into(),
        ),
    ];
    for (case, damage_it, said) in cases {
        std::fs::write(path, &pristine).expect("restore the file");
        damage_it(path);
        let damaged = std::fs::read(path).expect("read");
        let out = run_single(&resume_args(&ckpt, &[]));
        assert_eq!(out.status.code(), Some(2), "{case}: {}", out.stderr);
        let line =
            format!("dtrain: error: checkpoint {ckpt} is damaged and was not loaded: {said}");
        assert!(
            out.stderr.contains(&line),
            "{case}: want {line:?} in\n{}",
            out.stderr
        );
        assert!(!out.stdout.contains("Training Iteration"), "{case}");
        assert_eq!(
            std::fs::read(path).expect("read"),
            damaged,
            "{case}: overwritten"
        );
        assert_eq!(file_names(&dir), ["c.st"], "{case}");
    }
    // --init-checkpoint verifies too.
    let mut args = strings(SMALL);
    args.extend(strings(&["--mode", "single", "--max-iters", "1"]));
    args.extend(strings(&["--init-checkpoint", &ckpt]));
    let out = run_single(&args);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("--init-checkpoint"), "{}", out.stderr);
    assert!(
        out.stderr.contains("the file is truncated"),
        "{}",
        out.stderr
    );
}

/// A checkpoint without checksums (an older dtrain's) resumes, with one warning line.
#[test]
fn a_checkpoint_without_checksums_loads_with_a_warning() {
    let dir = temp_dir("legacy");
    let ckpt = trained_checkpoint(&dir, &["--keep-checkpoints", "1"]);
    let path = Path::new(&ckpt);
    let mut old = engine::state::load_tensors(path).expect("load");
    old.metadata.retain(|k, _| !k.starts_with("checksum"));
    let tensors: Vec<_> = old.tensors.into_values().collect();
    engine::state::save_tensors(path, &tensors, &old.metadata).expect("save");
    let out = run_single(&resume_args(&ckpt, &[]));
    assert_ok(std::slice::from_ref(&out));
    let warning = format!("dtrain: warning: {ckpt} has no checksums");
    assert_eq!(out.stderr.matches(&warning).count(), 1, "{}", out.stderr);
    assert!(
        out.stderr.contains("at epoch 0, batch 4 (iteration 4)"),
        "{}",
        out.stderr
    );
    // What it saved carries checksums again: no warning on the next resume.
    let mut args = resume_args(&ckpt, &[]);
    set_flag(&mut args, "--max-iters", "7");
    let again = run_single(&args);
    assert_ok(std::slice::from_ref(&again));
    assert!(!again.stderr.contains("no checksums"), "{}", again.stderr);
}

/// `(epoch, batch, iteration)` a checkpoint holds.
fn position_of(path: &Path) -> (usize, usize, usize) {
    let loaded = engine::state::load_tensors(path).expect("load");
    let n = |k: &str| loaded.metadata[k].parse().expect("number");
    (n("epoch"), n("batch"), n("iteration"))
}

/// `--keep-checkpoints 3` keeps the three newest (periodic every 3 iterations, then the
/// final one) and no temporary file; `--keep-checkpoints 1` only the newest.
#[test]
fn keep_checkpoints_rotates_the_newest_files() {
    let dir = temp_dir("rotate");
    let ckpt = dir.join("c.st");
    let mut args = strings(SMALL);
    args.extend(strings(&["--mode", "single", "--max-iters", "8"]));
    args.extend(strings(&[
        "--checkpoint-every",
        "3",
        "--keep-checkpoints",
        "3",
    ]));
    args.extend(strings(&[
        "--save-checkpoint",
        ckpt.to_str().expect("utf-8"),
    ]));
    assert_ok(std::slice::from_ref(&run_single(&args)));
    assert_eq!(file_names(&dir), ["c.st", "c.st.1", "c.st.2"]);
    assert_eq!(position_of(&ckpt), (0, 8, 8));
    assert_eq!(position_of(&dir.join("c.st.1")), (0, 6, 6));
    assert_eq!(position_of(&dir.join("c.st.2")), (0, 3, 3));

    let dir = temp_dir("rotate1");
    let ckpt = dir.join("c.st");
    set_flag(&mut args, "--keep-checkpoints", "1");
    set_flag(
        &mut args,
        "--save-checkpoint",
        ckpt.to_str().expect("utf-8"),
    );
    assert_ok(std::slice::from_ref(&run_single(&args)));
    assert_eq!(file_names(&dir), ["c.st"]);
    assert_eq!(position_of(&ckpt), (0, 8, 8));
}

/// The fallback restart: 2 DDP ranks checkpoint every 3 iterations and stop at 8 (newest
/// 8, previous 6); the newest is damaged; `--resume auto` says so, resumes from the previous
/// one at iteration 6 (and says which), moves the damaged file aside, and after 14
/// iterations both ranks hold the parameters of an uninterrupted 14-iteration run.
#[test]
fn resume_auto_falls_back_to_the_previous_checkpoint_and_matches_an_uninterrupted_run() {
    let reference = run_ranks(2, "ddp", &["--max-iters", "14", "--epochs", "2"]);
    assert_ok(&reference);
    let expected: Vec<String> = reference.iter().flat_map(|o| hashes(&o.stdout)).collect();
    assert_eq!(expected.len(), 2);

    let dir = temp_dir("fallback");
    let ckpt = dir.join("c.st");
    let ckpt_s = ckpt.to_str().expect("utf-8");
    let save = ["--save-checkpoint", ckpt_s, "--checkpoint-every", "3"];
    let first = run_ranks(
        2,
        "ddp",
        &[&["--max-iters", "8", "--epochs", "2"], &save[..]].concat(),
    );
    assert_ok(&first);
    assert_eq!(position_of(&ckpt), (0, 8, 8));
    assert_eq!(position_of(&dir.join("c.st.1")), (0, 6, 6));
    let (tensor, at) = tensor_byte(&ckpt, "layers.0.weight");
    flip_bit(&ckpt, at + 2, 6);
    let damaged = std::fs::read(&ckpt).expect("read");

    let resume = [
        &["--max-iters", "14", "--epochs", "2", "--resume", "auto"],
        &save[..],
    ]
    .concat();
    let resumed = run_ranks(2, "ddp", &resume);
    assert_ok(&resumed);
    let said = &resumed[0].stderr;
    let previous = dir.join("c.st.1");
    let line = format!(
        "dtrain: checkpoint {ckpt_s} is damaged and was not loaded: tensor {tensor} does not \
         match its checksum; falling back to the previous one, {}",
        previous.display()
    );
    assert!(said.contains(&line), "want {line:?} in\n{said}");
    let from = format!(
        "resuming from {} at epoch 0, batch 6 (iteration 6)",
        previous.display()
    );
    assert!(said.contains(&from), "{said}");
    assert!(resumed[1]
        .stderr
        .contains(&format!("rank 0's checkpoint {}", previous.display())));
    let got: Vec<String> = resumed.iter().flat_map(|o| hashes(&o.stdout)).collect();
    assert_eq!(got, expected, "{said}");
    // The damaged file was kept aside, untouched, out of the rotation.
    assert_eq!(
        std::fs::read(dir.join("c.st.damaged")).expect("aside"),
        damaged
    );
    assert!(said.contains("moved the damaged"), "{said}");
    assert_eq!(position_of(&ckpt), (1, 4, 14));
    assert_eq!(position_of(&dir.join("c.st.1")), (1, 2, 12));
}

/// `--resume auto` when every kept file is damaged: exit 2 naming each, nothing changed.
#[test]
fn resume_auto_with_every_checkpoint_damaged_is_refused() {
    let dir = temp_dir("all-damaged");
    let ckpt = trained_checkpoint(&dir, &["--checkpoint-every", "2"]);
    assert_eq!(file_names(&dir), ["c.st", "c.st.1"]);
    let older = dir.join("c.st.1");
    let (_, at) = tensor_byte(&older, "fc1.bias");
    flip_bit(&older, at, 0);
    let b = std::fs::read(&ckpt).expect("read");
    std::fs::write(&ckpt, &b[..b.len() / 2]).expect("truncate");
    let before: Vec<Vec<u8>> = [&ckpt, older.to_str().expect("utf-8")]
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    let mut args = strings(SMALL);
    args.extend(strings(&[
        "--mode",
        "single",
        "--max-iters",
        "6",
        "--resume",
        "auto",
    ]));
    args.extend(strings(&["--save-checkpoint", &ckpt]));
    let out = run_single(&args);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("no checkpoint to resume from is intact"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("the file is truncated"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("tensor fc1.bias does not match"),
        "{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("no older checkpoint is left"),
        "{}",
        out.stderr
    );
    let after: Vec<Vec<u8>> = [&ckpt, older.to_str().expect("utf-8")]
        .iter()
        .map(|p| std::fs::read(p).expect("read"))
        .collect();
    assert_eq!(before, after);
    assert_eq!(file_names(&dir), ["c.st", "c.st.1"]);
}
