//! Command-line parsing: every flag, launcher environment fallbacks, address forms, and every
//! invalid case (a `UsageError` with a clear one-line message; exit code 2 from the binary).

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;

use dtrain::args::{
    parse_master_addr, parse_train_args, DatasetKind, Mode, ResumeFrom, TrainConfig, TransportKind,
    UsageError,
};

fn args(line: &str) -> Vec<OsString> {
    std::iter::once("dtrain")
        .chain(line.split_whitespace())
        .map(OsString::from)
        .collect()
}

fn parse_env(line: &str, env: &[(&str, &str)]) -> Result<TrainConfig, UsageError> {
    let map: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    parse_train_args(args(line), &move |k: &str| map.get(k).cloned())
}

fn parse(line: &str) -> Result<TrainConfig, UsageError> {
    parse_env(line, &[])
}

fn ok(line: &str) -> TrainConfig {
    match parse(line) {
        Ok(c) => c,
        Err(e) => panic!("{line:?} should parse, got: {e}"),
    }
}

/// The error message for `line`, checked to be one line.
fn err_env(line: &str, env: &[(&str, &str)]) -> String {
    match parse_env(line, env) {
        Ok(c) => panic!("{line:?} should be rejected, parsed as {c:?}"),
        Err(e) => {
            assert!(!e.is_help(), "{line:?}: unexpected help output");
            let msg = e.to_string();
            assert!(
                !msg.contains('\n'),
                "{line:?}: message is not one line: {msg:?}"
            );
            assert!(!msg.is_empty());
            msg
        }
    }
}

fn err(line: &str) -> String {
    err_env(line, &[])
}

#[test]
fn defaults_match_the_original() {
    let c = ok("");
    assert_eq!(c.master_addr, "127.0.0.1");
    assert_eq!(c.master_port, 29500);
    assert_eq!(
        (c.num_nodes, c.rank, c.local_rank, c.local_world_size),
        (1, 0, 0, 1)
    );
    assert_eq!(c.opts.mode, Mode::Ddp);
    assert_eq!(c.transport, TransportKind::Auto);
    assert_eq!(c.opts.dataset, DatasetKind::Cifar10);
    assert_eq!(c.opts.data_dir, PathBuf::from("./data"));
    assert_eq!(
        c.opts.download_url,
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    );
    assert_eq!(c.opts.download_md5, "c32a1d4ab5d03f1284b67883e8d87530");
    assert_eq!(c.opts.epochs, 1);
    assert_eq!(c.opts.batch_size, 64);
    assert_eq!(c.opts.lr, 0.1);
    assert_eq!(c.opts.momentum, 0.9);
    assert_eq!(c.opts.weight_decay, 1e-4);
    assert_eq!(c.opts.seed, 0);
    assert_eq!(c.opts.max_iters, None);
    assert_eq!(c.opts.log_every, 20);
    assert!(c.augment() && c.shuffle());
    assert_eq!(c.opts.metrics, None);
    assert_eq!(c.opts.save_checkpoint, None);
    assert_eq!(c.opts.resume, None);
    assert_eq!(c.opts.init_checkpoint, None);
    assert_eq!(c.opts.first_bucket_mb, 1.0);
    assert_eq!(c.opts.bucket_cap_mb, 25.0);
    assert_eq!(c.opts.model, "vgg11");
    assert_eq!(
        (c.opts.synthetic_train, c.opts.synthetic_test),
        (50_000, 10_000)
    );
    assert!(!c.progress, "tests do not run on a terminal");
    assert_eq!(c.opts.timeout, 300);
    assert_eq!(c.opts.connect_timeout, 120);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    assert_eq!(c.threads, cores);
}

#[test]
fn the_original_command_line() {
    let c = ok("--master-ip 127.0.0.1 --num-nodes 2 --rank 0 --mode ddp");
    assert_eq!((c.num_nodes, c.rank), (2, 0));
    assert_eq!(c.opts.mode, Mode::Ddp);
    // Loopback master: both ranks on this host share its cores.
    assert_eq!((c.local_rank, c.local_world_size), (0, 2));
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    assert_eq!(c.threads, (cores / 2).max(1));
}

#[test]
fn every_flag() {
    let c = ok(
        "--master-ip 10.1.2.3 --master-port 1234 --num-nodes 8 --rank 5 --local-rank 1 \
                --local-world-size 4 --mode gather-scatter --transport tcp --dataset synthetic \
                --data-dir /tmp/d --download-url http://x/y.tgz \
                --download-md5 C32A1D4AB5D03F1284B67883E8D87530 --epochs 3 --batch-size 32 \
                --lr 0.05 --momentum 0.5 --weight-decay 0.001 --seed 7 --threads 3 --max-iters 100 \
                --log-every 5 --no-augment --no-shuffle --metrics m.jsonl --save-checkpoint s.ckpt \
                --init-checkpoint i.ckpt --first-bucket-mb 0.5 --bucket-cap-mb 10 \
                --model 64,M,128,M --synthetic-train 1000 --synthetic-test 200 --no-progress \
                --timeout 60 --connect-timeout 30",
    );
    assert_eq!(c.master_addr, "10.1.2.3");
    assert_eq!(c.master_port, 1234);
    assert_eq!(
        (c.num_nodes, c.rank, c.local_rank, c.local_world_size),
        (8, 5, 1, 4)
    );
    assert_eq!(c.opts.mode, Mode::GatherScatter);
    assert_eq!(c.transport, TransportKind::Tcp);
    assert_eq!(c.opts.dataset, DatasetKind::Synthetic);
    assert_eq!(c.opts.data_dir, PathBuf::from("/tmp/d"));
    assert_eq!(c.opts.download_url, "http://x/y.tgz");
    assert_eq!(c.opts.download_md5, "c32a1d4ab5d03f1284b67883e8d87530");
    assert_eq!((c.opts.epochs, c.opts.batch_size), (3, 32));
    assert_eq!(
        (c.opts.lr, c.opts.momentum, c.opts.weight_decay),
        (0.05, 0.5, 0.001)
    );
    assert_eq!(
        (c.opts.seed, c.threads, c.opts.max_iters, c.opts.log_every),
        (7, 3, Some(100), 5)
    );
    assert!(!c.augment() && !c.shuffle() && !c.progress);
    assert_eq!(c.opts.metrics, Some(PathBuf::from("m.jsonl")));
    assert_eq!(c.opts.save_checkpoint, Some(PathBuf::from("s.ckpt")));
    assert_eq!(c.opts.init_checkpoint, Some(PathBuf::from("i.ckpt")));
    assert_eq!((c.opts.first_bucket_mb, c.opts.bucket_cap_mb), (0.5, 10.0));
    assert_eq!(c.opts.model, "64,M,128,M");
    assert_eq!((c.opts.synthetic_train, c.opts.synthetic_test), (1000, 200));
    assert_eq!((c.opts.timeout, c.opts.connect_timeout), (60, 30));

    assert_eq!(
        ok("--resume r.ckpt").opts.resume,
        Some(ResumeFrom::File(PathBuf::from("r.ckpt")))
    );
    assert_eq!(ok("--mode single").opts.mode, Mode::Single);
    assert_eq!(ok("--mode allreduce").opts.mode, Mode::AllReduce);
    assert_eq!(ok("--mode all-reduce").opts.mode, Mode::AllReduce);
    assert_eq!(ok("--transport shm").transport, TransportKind::Shm);
    assert_eq!(
        ok("--dataset fashion-mnist").opts.dataset,
        DatasetKind::FashionMnist
    );
    assert_eq!(ok("--dataset cifar10").opts.dataset, DatasetKind::Cifar10);
    assert_eq!(ok("--lr=0.2").opts.lr, 0.2);
    assert_eq!(ok("--lr 0").opts.lr, 0.0);
    use engine::ops::ConvAlgoOverride;
    assert_eq!(ok("").opts.conv_algo, ConvAlgoOverride::Auto);
    assert!(!ok("").opts.verbose && ok("--verbose").opts.verbose);
    for algo in ConvAlgoOverride::ALL {
        let line = format!("--conv-algo {algo}");
        assert_eq!(ok(&line).opts.conv_algo, algo);
    }
    let msg = err("--conv-algo fft");
    assert!(msg.contains("unknown conv algorithm \"fft\""), "{msg}");
}

#[test]
fn master_address_forms() {
    let c = ok("--master-ip 192.168.0.7:4000 --num-nodes 2 --rank 1");
    assert_eq!(
        (c.master_addr.as_str(), c.master_port),
        ("192.168.0.7", 4000)
    );
    let c = ok("--master-ip tcp://192.168.0.7:4001 --num-nodes 2 --rank 1");
    assert_eq!(
        (c.master_addr.as_str(), c.master_port),
        ("192.168.0.7", 4001)
    );
    let c = ok("--master-ip tcp://node7 --num-nodes 2");
    assert_eq!((c.master_addr.as_str(), c.master_port), ("node7", 29500));
    // Same port given twice is fine.
    let c = ok("--master-ip 10.0.0.1:4000 --master-port 4000");
    assert_eq!(c.master_port, 4000);
    assert_eq!(
        parse_master_addr("[::1]:5000").unwrap(),
        ("::1".to_string(), Some(5000))
    );
    assert_eq!(
        parse_master_addr("fe80::1").unwrap(),
        ("fe80::1".to_string(), None)
    );
    assert_eq!(
        parse_master_addr("tcp://[::1]").unwrap(),
        ("::1".to_string(), None)
    );
    // Remote master: one rank per host unless told otherwise.
    let c = ok("--master-ip 10.0.0.1 --num-nodes 4 --rank 3");
    assert_eq!((c.local_rank, c.local_world_size), (0, 1));
}

#[test]
fn torchrun_environment() {
    let env = [
        ("MASTER_ADDR", "10.0.0.5"),
        ("MASTER_PORT", "23456"),
        ("WORLD_SIZE", "4"),
        ("RANK", "3"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
    ];
    let c = parse_env("", &env).unwrap();
    assert_eq!((c.master_addr.as_str(), c.master_port), ("10.0.0.5", 23456));
    assert_eq!(
        (c.num_nodes, c.rank, c.local_rank, c.local_world_size),
        (4, 3, 1, 2)
    );
    // Flags win over the environment.
    let c = parse_env("--rank 0 --master-ip 10.9.9.9 --master-port 1000", &env).unwrap();
    assert_eq!(
        (c.rank, c.master_addr.as_str(), c.master_port),
        (0, "10.9.9.9", 1000)
    );
    // Without LOCAL_WORLD_SIZE on a remote master, LOCAL_RANK=1 implies at least 2 local ranks.
    let c = parse_env("", &env[..5]).unwrap();
    assert_eq!((c.local_rank, c.local_world_size), (1, 2));
}

#[test]
fn default_threads_share_the_cpus_unless_the_launcher_pinned_the_rank() {
    let cores = std::thread::available_parallelism().unwrap().get();
    let env = [
        ("WORLD_SIZE", "2"),
        ("RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
    ];
    assert_eq!(parse_env("", &env).unwrap().threads, (cores / 2).max(1));
    let pinned = [env[0], env[1], env[2], ("DTRAIN_BOUND_CORES", "1")];
    assert_eq!(parse_env("", &pinned).unwrap().threads, cores);
    assert_eq!(parse_env("--threads 3", &pinned).unwrap().threads, 3);
}

#[test]
fn slurm_environment() {
    let env = [
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "6"),
        ("SLURM_LOCALID", "2"),
        ("SLURM_NTASKS_PER_NODE", "3(x2)"),
        ("MASTER_ADDR", "node0"),
    ];
    let c = parse_env("", &env).unwrap();
    assert_eq!(
        (c.num_nodes, c.rank, c.local_rank, c.local_world_size),
        (6, 5, 2, 3)
    );
    assert_eq!(c.master_addr, "node0");
}

#[test]
fn open_mpi_environment() {
    let env = [
        ("OMPI_COMM_WORLD_RANK", "1"),
        ("OMPI_COMM_WORLD_SIZE", "2"),
        ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
    ];
    let c = parse_env("--master-ip 127.0.0.1:7000", &env).unwrap();
    assert_eq!(
        (c.num_nodes, c.rank, c.local_rank, c.local_world_size),
        (2, 1, 1, 2)
    );
    assert_eq!(c.master_port, 7000);
}

#[test]
fn launcher_families_are_not_mixed() {
    // torchrun variables take precedence; Slurm's are ignored entirely then.
    let env = [
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("SLURM_PROCID", "7"),
        ("SLURM_NTASKS", "8"),
    ];
    let c = parse_env("", &env).unwrap();
    assert_eq!((c.num_nodes, c.rank), (2, 1));
}

#[test]
fn invalid_values_are_rejected_with_a_clear_message() {
    let cases: &[(&str, &str)] = &[
        ("--num-nodes 2 --rank 2", "--rank 2 is out of range"),
        ("--num-nodes 0", "--num-nodes must be at least 1"),
        ("--batch-size 0", "--batch-size must be at least 1"),
        ("--lr NaN", "--lr must be a finite number"),
        ("--lr -0.1", "--lr must be a finite number"),
        ("--lr inf", "--lr must be a finite number"),
        ("--momentum 1.5", "--momentum"),
        ("--weight-decay -1", "--weight-decay"),
        ("--epochs 0", "--epochs"),
        ("--max-iters 0", "--max-iters"),
        ("--log-every 0", "--log-every"),
        ("--threads 0", "--threads"),
        ("--timeout 0", "--timeout"),
        ("--bucket-cap-mb 0", "--bucket-cap-mb"),
        ("--first-bucket-mb NaN", "--first-bucket-mb"),
        (
            "--mode single --num-nodes 2",
            "--mode single needs --num-nodes 1",
        ),
        ("--mode bogus", "invalid value 'bogus' for '--mode"),
        ("--transport udp", "invalid value 'udp'"),
        ("--dataset mnist", "invalid value 'mnist'"),
        ("--master-port 0", "--master-port must be 1..65535"),
        ("--master-port 70000", "70000"),
        ("--master-ip 1.2.3.4:0", "port must be 1..65535"),
        ("--master-ip 1.2.3.4:http", "is not a number"),
        ("--master-ip udp://1.2.3.4:5", "unsupported scheme"),
        ("--master-ip :5000", "missing or malformed host"),
        (
            "--master-ip 10.0.0.1:4000 --master-port 4001",
            "contradicts",
        ),
        ("--unknown-flag", "unexpected argument '--unknown-flag'"),
        ("--batch-size abc", "invalid value 'abc'"),
        ("--model vgg99", "--model"),
        ("--model 64,X", "--model"),
        ("--download-md5 xyz", "--download-md5"),
        ("--resume a --init-checkpoint b", "cannot be used together"),
        ("--resume auto", "give --save-checkpoint FILE too"),
        ("--checkpoint-every 5", "needs --save-checkpoint"),
        (
            "--checkpoint-every 0 --save-checkpoint c",
            "--checkpoint-every must be at least 1",
        ),
        ("--resume=", "expected a checkpoint file or auto"),
        ("--threads 1025", "--threads must be in 1..=1024"),
        (
            "--model 65537,M",
            "conv width 65537 is above the limit of 65536",
        ),
        ("--model 99999999999999999999999,M", "--model"),
        (
            "--local-rank 3 --local-world-size 2 --num-nodes 4",
            "--local-rank 3",
        ),
    ];
    for (line, needle) in cases {
        let msg = err(line);
        assert!(
            msg.contains(needle),
            "{line:?}: message {msg:?} should contain {needle:?}"
        );
    }
}

#[test]
fn bad_environment_values_name_the_variable() {
    let msg = err_env("", &[("RANK", "x"), ("WORLD_SIZE", "2")]);
    assert!(msg.contains("RANK"), "{msg}");
    let msg = err_env("", &[("RANK", "4"), ("WORLD_SIZE", "2")]);
    assert!(msg.contains("out of range"), "{msg}");
    let msg = err_env("", &[("MASTER_PORT", "99999")]);
    assert!(msg.contains("MASTER_PORT"), "{msg}");
}

#[test]
fn help_is_not_an_error() {
    let e = parse("--help").unwrap_err();
    assert!(e.is_help());
    assert!(e.to_string().contains("--master-ip"));
}

#[test]
fn config_hash_covers_shared_settings_only() {
    let base = ok("--num-nodes 2 --rank 0");
    let same = ok("--num-nodes 2 --rank 1 --threads 1 --data-dir /elsewhere --metrics x");
    assert_eq!(base.config_hash(), same.config_hash());
    for line in [
        "--num-nodes 3 --rank 0",
        "--num-nodes 2 --lr 0.2",
        "--num-nodes 2 --batch-size 32",
        "--num-nodes 2 --seed 1",
        "--num-nodes 2 --mode allreduce",
        "--num-nodes 2 --no-augment",
        "--num-nodes 2 --model 64,M",
        "--num-nodes 2 --bucket-cap-mb 5",
        "--num-nodes 2 --dataset synthetic",
    ] {
        assert_ne!(base.config_hash(), ok(line).config_hash(), "{line}");
    }
}

/// Run the real binary: usage errors exit 2 with exactly one line on stderr.
#[test]
fn binary_usage_errors_exit_2_with_one_line() {
    for line in [
        "--num-nodes 2 --rank 5",
        "--batch-size 0",
        "--no-such-flag",
        "--mode sideways",
        "--num-nodes 2 --mode gather-scatter --grad-compression bf16",
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_dtrain"))
            .args(line.split_whitespace())
            .env_remove("RANK")
            .env_remove("WORLD_SIZE")
            .env_remove("SLURM_PROCID")
            .env_remove("OMPI_COMM_WORLD_RANK")
            .output()
            .expect("run dtrain");
        assert_eq!(out.status.code(), Some(2), "{line}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{line}: stderr {stderr:?}");
        assert!(stderr.starts_with("dtrain: error: "), "{line}: {stderr:?}");
        assert!(out.stdout.is_empty(), "{line}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_dtrain"))
        .arg("--help")
        .output()
        .expect("run dtrain");
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(
        help.contains("--master-ip") && help.contains("launch"),
        "{help}"
    );
}

#[test]
fn checkpoint_and_restart_flags() {
    let c = ok("--save-checkpoint c.st --checkpoint-every 50 --resume auto");
    assert_eq!(c.opts.checkpoint_every, Some(50));
    assert_eq!(c.opts.resume, Some(ResumeFrom::Auto));
    assert_eq!(c.opts.save_checkpoint, Some(PathBuf::from("c.st")));
    // A file that happens to be called auto is ./auto.
    assert_eq!(
        ok("--resume ./auto").opts.resume,
        Some(ResumeFrom::File(PathBuf::from("./auto")))
    );
    // --resume auto may start from --init-checkpoint weights when there is nothing to resume.
    ok("--resume auto --save-checkpoint c --init-checkpoint w");
    // torchrun (and dtrain launch) say which attempt this is.
    let env = [("TORCHELASTIC_RESTART_COUNT", "2")];
    assert_eq!(parse_env("", &env).unwrap().restart_count, 2);
    let msg = err_env("", &[("TORCHELASTIC_RESTART_COUNT", "-1")]);
    assert!(msg.contains("TORCHELASTIC_RESTART_COUNT"), "{msg}");
    // Restarts and the resume decision do not change what ranks must agree on.
    assert_eq!(
        parse_env("--num-nodes 2", &env).unwrap().config_hash(),
        ok("--num-nodes 2").config_hash()
    );
}

#[test]
fn model_depth_is_bounded() {
    let deep = vec!["8"; 257].join(",");
    let msg = err(&format!("--model {deep}"));
    assert!(
        msg.contains("257 layers is above the limit of 256"),
        "{msg}"
    );
    ok(&format!("--model {}", vec!["8"; 256].join(",")));
}

/// The recipe flags (schedule, Nesterov, label smoothing, evaluation cadence) through the
/// whole training parser, as `RecipeOptions` and in the config hash.
mod recipe_flags {
    use dtrain::args::{parse_train_args, TrainConfig, UsageError};
    use dtrain::recipe::RecipeOptions;
    use engine::schedule::ScheduleKind;

    fn recipe(flags: &str) -> Result<RecipeOptions, UsageError> {
        let line = format!("dtrain --mode single --threads 1 {flags}");
        parse_train_args(
            line.split_whitespace().map(std::ffi::OsString::from),
            &|_| None,
        )
        .map(|c: TrainConfig| c.opts.recipe)
    }

    #[test]
    fn epochs_become_iterations_of_this_run() {
        let r = recipe("--lr-schedule step --lr-milestones 1,2.5 --warmup-epochs 0.5").unwrap();
        let s = r.schedule(0.1, 0.9, 3, 100).unwrap();
        assert_eq!((s.total_iters(), s.warmup_iters()), (300, 50));
        assert_eq!(
            s.kind(),
            &ScheduleKind::Step {
                milestones: vec![100, 250],
                gamma: 0.1
            }
        );
        let c = recipe("--lr-schedule onecycle --base-momentum 0.8").unwrap();
        let s = c.schedule(0.1, 0.95, 1, 100).unwrap();
        assert_eq!(s.momentum(0), Some(0.95));
        let off = recipe("--lr-schedule onecycle --no-cycle-momentum").unwrap();
        assert_eq!(off.schedule(0.1, 0.95, 1, 100).unwrap().momentum(0), None);
    }

    #[test]
    fn bad_recipes_are_usage_errors_naming_the_flag() {
        for (flags, needle) in [
            ("--lr-schedule step", "--lr-milestones"),
            ("--lr-milestones 1,2", "--lr-milestones is for"),
            ("--lr-schedule step --lr-milestones 1,x", "--lr-milestones"),
            ("--label-smoothing 1.5", "--label-smoothing"),
            ("--nesterov --momentum 0", "--nesterov"),
            ("--nesterov --dampening 0.1", "--nesterov"),
            ("--warmup-epochs -1", "--warmup-epochs"),
            ("--eval-every 0", "--eval-every"),
        ] {
            let e = recipe(flags).unwrap_err().to_string();
            assert!(e.contains(needle), "{flags}: {e}");
        }
        // Needs the run's length: an error from schedule(), naming the flags.
        let r = recipe("--lr-schedule cosine --warmup-epochs 2").unwrap();
        let e = r.schedule(0.1, 0.9, 2, 10).unwrap_err().0;
        assert!(
            e.contains("--lr-schedule cosine") && e.contains("warmup"),
            "{e}"
        );
    }

    #[test]
    fn the_recipe_is_part_of_the_config_hash() {
        let hash = |flags: &str| {
            let line = format!("dtrain --mode single --threads 1 {flags}");
            parse_train_args(
                line.split_whitespace().map(std::ffi::OsString::from),
                &|_| None,
            )
            .unwrap()
            .config_hash()
        };
        let base = hash("");
        for flags in [
            "--lr-schedule cosine",
            "--nesterov",
            "--label-smoothing 0.1",
            "--warmup-epochs 1",
        ] {
            assert_ne!(hash(flags), base, "{flags}");
        }
        // Evaluation cadence and the best file do not change the training.
        assert_eq!(hash("--eval-every 5"), base);
    }
}
