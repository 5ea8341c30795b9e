//! Real launchers start dtrain: Open MPI's `mpirun` (2 and 3 ranks) and a one-host Slurm
//! (munged, slurmctld and slurmd brought up by the test in a temporary directory, then
//! `srun -n 2` and `sbatch` of a two-task script). Every run must end with the same parameter
//! hash on every rank as the same job started as plain `--rank` processes.
//!
//! These tests need Debian's `openmpi-bin`, `slurm-wlm` and `munge` (`.ci/run` installs
//! them). A missing program fails the test with a message saying what to install: it never
//! passes without having run. The `torchrun_*` test is ignored (it needs torch, which CI
//! lacks); run it with `cargo test --release --test launchers -- --ignored`.

mod common;

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use common::{free_port, temp_dir, TempDir, BIN, RUN_DEADLINE};

/// A tiny DDP job: 2 conv blocks, synthetic data, 3 iterations, one thread per rank.
const JOB: &[&str] = &[
    "--mode",
    "ddp",
    "--dataset",
    "synthetic",
    "--synthetic-train",
    "256",
    "--synthetic-test",
    "64",
    "--model",
    "8,M,16,M",
    "--batch-size",
    "8",
    "--max-iters",
    "3",
    "--threads",
    "1",
];

/// Fails the test loudly when a launcher program is missing.
fn require(program: &str, package: &str) -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
            .map(|dir| dir.join(program))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "NOT RUN: `{program}` is not installed, so this launcher test cannot start dtrain. \
             Install Debian's `{package}` (`.ci/run` does: apt-get install openmpi-bin slurm-wlm munge)."
        )
    })
}

/// A command whose environment carries no launcher's variables from the test's own.
fn clean_command(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut cmd = Command::new(program);
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy().into_owned();
        let launcher = ["SLURM_", "OMPI_", "PMIX_", "PMI_", "TORCHELASTIC_"]
            .iter()
            .any(|p| k.starts_with(p))
            || [
                "RANK",
                "WORLD_SIZE",
                "LOCAL_RANK",
                "LOCAL_WORLD_SIZE",
                "GROUP_RANK",
                "MASTER_ADDR",
                "MASTER_PORT",
                "DTRAIN_AUTH_TOKEN",
            ]
            .contains(&k.as_str());
        if launcher {
            cmd.env_remove(&k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

struct Outcome {
    success: bool,
    text: String,
}

/// Runs `cmd` to completion within `limit`; on a hang, SIGTERM (launchers forward it to
/// their ranks), then SIGKILL, and the test fails with what it printed.
fn run(mut cmd: Command, limit: Duration) -> Outcome {
    let described = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {described}: {e}"));
    let readers = [
        read_in_background(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
        read_in_background(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ),
    ];
    let status = wait_or_stop(&mut child, limit);
    let [out, err] = readers.map(|r| r.join().unwrap_or_default());
    let text = format!("$ {described}\n--- stdout\n{out}--- stderr\n{err}");
    match status {
        Some(s) => Outcome {
            success: s.success(),
            text,
        },
        None => panic!("still running after {limit:?}, stopped it:\n{text}"),
    }
}

fn read_in_background(stream: Option<Box<dyn Read + Send>>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = stream {
            let mut bytes = Vec::new();
            let _ = r.read_to_end(&mut bytes);
            s = String::from_utf8_lossy(&bytes).into_owned();
        }
        s
    })
}

/// Waits for `child` until `limit`; then SIGTERM, 10 s of grace, SIGKILL. `None` = stopped.
fn wait_or_stop(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
    let grace = Instant::now() + Duration::from_secs(10);
    while Instant::now() < grace {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// Every `Parameter hash: 0x…` line (launchers may prefix lines or end them with `\r`).
fn hashes(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| {
            l.split_once("Parameter hash: ")
                .map(|(_, h)| h.trim().to_string())
        })
        .collect()
}

/// The hash every rank must end with: the same job as `world` plain `--rank` processes.
fn reference_hash(world: usize) -> String {
    let port = free_port().to_string();
    let children: Vec<Child> = (0..world)
        .map(|rank| {
            clean_command(BIN)
                .args(JOB)
                .args(["--no-progress", "--master-port", &port])
                .args([
                    "--num-nodes",
                    &world.to_string(),
                    "--rank",
                    &rank.to_string(),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn dtrain")
        })
        .collect();
    let mut found = Vec::new();
    for mut child in children {
        let out = read_in_background(
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let err = read_in_background(
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        );
        let status = wait_or_stop(&mut child, RUN_DEADLINE);
        let (out, err) = (
            out.join().unwrap_or_default(),
            err.join().unwrap_or_default(),
        );
        assert!(
            status.is_some_and(|s| s.success()),
            "reference rank failed:\n{out}\n{err}"
        );
        found.extend(hashes(&out));
    }
    assert_eq!(found.len(), world, "one hash per reference rank: {found:?}");
    assert!(
        found.iter().all(|h| *h == found[0]),
        "reference ranks disagree: {found:?}"
    );
    found.remove(0)
}

fn assert_ranks_match(outcome: &Outcome, world: usize, reference: &str) {
    assert!(outcome.success, "launcher run failed:\n{}", outcome.text);
    let got = hashes(&outcome.text);
    assert_eq!(
        got,
        vec![reference.to_string(); world],
        "every one of the {world} ranks must end with the reference hash {reference}:\n{}",
        outcome.text
    );
}

// ---- Open MPI -----------------------------------------------------------------------------

fn mpirun_job(np: usize) {
    let mpirun = require("mpirun", "openmpi-bin");
    let reference = reference_hash(np);
    let mut cmd = clean_command(mpirun);
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ])
    .arg(BIN)
    .args(JOB)
    .args(["--master-port", &free_port().to_string()]);
    let outcome = run(cmd, RUN_DEADLINE);
    assert_ranks_match(&outcome, np, &reference);
    // mpirun gives every rank a pty, so every rank sees a terminal; only local rank 0 may
    // draw the progress line (each drawing rank redraws `epoch 0 batch 1/…` once).
    let drawn = outcome.text.matches("\repoch 0 batch 1/").count();
    assert_ne!(
        drawn, 0,
        "NOT CHECKED: no rank drew a progress line, so mpirun gave the ranks no terminal \
         here and the one-progress-line-per-host rule cannot be tested:\n{}",
        outcome.text
    );
    assert_eq!(
        drawn, 1,
        "{drawn} ranks drew the progress line; only local rank 0 may:\n{}",
        outcome.text
    );
}

#[test]
fn mpirun_starts_two_ranks() {
    mpirun_job(2);
}

#[test]
fn mpirun_starts_three_ranks() {
    mpirun_job(3);
}

// ---- Slurm ----------------------------------------------------------------------------------

/// A one-host Slurm cluster living in a temporary directory: munged with its own key and
/// socket, slurmctld and slurmd on free ports, all in the foreground as children of the test,
/// stopped and reaped on drop.
struct SlurmCluster {
    daemons: Vec<(&'static str, Child)>,
    conf: PathBuf,
    dir: TempDir,
    /// The first job's id: dtrain derives rank 0's port from a job id (15000 + its last four
    /// digits), so the ids are chosen where those ports are free, and differ between clusters
    /// of tests running in parallel.
    first_job: u32,
}

/// How many jobs one test cluster runs (each needs its job-id port free).
const SLURM_JOBS: u32 = 3;

/// A first job id whose next [`SLURM_JOBS`] job-id ports are free now.
fn first_job_with_free_ports() -> u32 {
    let free = |port: u32| std::net::TcpListener::bind(("0.0.0.0", port as u16)).is_ok();
    for _ in 0..1000 {
        let first = 1000 + rand::random::<u32>() % 8000;
        if (first..first + SLURM_JOBS).all(|id| free(15000 + id % 10000)) {
            return first;
        }
    }
    panic!("no run of {SLURM_JOBS} free ports in 16000..25000 for Slurm job ids");
}

impl SlurmCluster {
    fn start() -> SlurmCluster {
        let munged = require("munged", "munge");
        let slurmctld = require("slurmctld", "slurm-wlm");
        let slurmd = require("slurmd", "slurm-wlm");
        require("sinfo", "slurm-wlm");
        let dir = temp_dir("slurm");
        let d = dir.to_path_buf();
        let d = d.as_path();
        let mut cluster = SlurmCluster {
            daemons: Vec::new(),
            conf: d.join("slurm.conf"),
            dir,
            first_job: first_job_with_free_ports(),
        };

        // munged insists on a private key and on a socket directory everyone can enter.
        let munge_dir = d.join("munge");
        std::fs::create_dir_all(&munge_dir).unwrap();
        set_mode(d, 0o755);
        set_mode(&munge_dir, 0o755);
        let key = munge_dir.join("munge.key");
        let mut bytes = vec![0u8; 1024];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut bytes))
            .expect("random munge key");
        std::fs::write(&key, &bytes).unwrap();
        set_mode(&key, 0o400);
        let socket = munge_dir.join("munge.sock");
        let mut cmd = Command::new(munged);
        cmd.arg("--foreground")
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!(
                "--pid-file={}",
                munge_dir.join("munged.pid").display()
            ))
            .arg(format!(
                "--log-file={}",
                munge_dir.join("munged.log").display()
            ))
            .arg(format!(
                "--seed-file={}",
                munge_dir.join("munged.seed").display()
            ));
        cluster.spawn_daemon("munged", cmd);
        cluster.wait_until(
            "munged to create its socket",
            Duration::from_secs(20),
            |_| socket.exists(),
        );

        let node = short_hostname();
        for sub in ["state", "spool", "log"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let conf = format!(
            "ClusterName=dtraintest\n\
             SlurmctldHost={node}(127.0.0.1)\n\
             SlurmctldPort={ctld_port}\n\
             SlurmdPort={slurmd_port}\n\
             SlurmUser=root\n\
             SlurmdUser=root\n\
             AuthType=auth/munge\n\
             CredType=cred/munge\n\
             AuthInfo=socket={socket}\n\
             StateSaveLocation={d}/state\n\
             SlurmdSpoolDir={d}/spool\n\
             SlurmctldPidFile={d}/slurmctld.pid\n\
             SlurmdPidFile={d}/slurmd.pid\n\
             SlurmctldLogFile={d}/log/slurmctld.log\n\
             SlurmdLogFile={d}/log/slurmd.log\n\
             ProctrackType=proctrack/linuxproc\n\
             TaskPlugin=task/none\n\
             SwitchType=switch/none\n\
             MpiDefault=none\n\
             JobAcctGatherType=jobacct_gather/none\n\
             AccountingStorageType=accounting_storage/none\n\
             SchedulerType=sched/builtin\n\
             SelectType=select/cons_tres\n\
             SelectTypeParameters=CR_Core\n\
             ReturnToService=2\n\
             FirstJobId={first_job}\n\
             SlurmdParameters=config_overrides\n\
             NodeName={node} NodeAddr=127.0.0.1 CPUs=4 State=UNKNOWN\n\
             PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES\n",
            first_job = cluster.first_job,
            ctld_port = free_port(),
            slurmd_port = free_port(),
            socket = socket.display(),
            d = d.display(),
        );
        std::fs::write(&cluster.conf, conf).unwrap();
        let mut ctld = Command::new(slurmctld);
        ctld.arg("-D").arg("-f").arg(&cluster.conf);
        cluster.spawn_daemon("slurmctld", ctld);
        let mut slurmd_cmd = Command::new(slurmd);
        slurmd_cmd
            .arg("-D")
            .arg("-f")
            .arg(&cluster.conf)
            .args(["-N", &node]);
        cluster.spawn_daemon("slurmd", slurmd_cmd);
        cluster.wait_until(
            "the node to be idle in sinfo",
            Duration::from_secs(60),
            |c| {
                let out = c
                    .command("sinfo")
                    .args(["-h", "-o", "%T"])
                    .stderr(Stdio::null())
                    .output();
                out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "idle")
            },
        );
        cluster
    }

    fn spawn_daemon(&mut self, name: &'static str, mut cmd: Command) {
        let log = File::create(self.dir.join(format!("{name}.out"))).unwrap();
        let child = cmd
            .env("SLURM_CONF", &self.conf)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.daemons.push((name, child));
    }

    /// Polls `ready` until `limit`; fails with every daemon's log if it never holds or a
    /// daemon exits.
    fn wait_until(&mut self, what: &str, limit: Duration, ready: impl Fn(&SlurmCluster) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if ready(self) {
                return;
            }
            let exited: Vec<String> = self
                .daemons
                .iter_mut()
                .filter_map(|(n, c)| {
                    c.try_wait()
                        .ok()
                        .flatten()
                        .map(|s| format!("{n} exited ({s})"))
                })
                .collect();
            if !exited.is_empty() || Instant::now() >= deadline {
                panic!(
                    "one-host Slurm did not come up (waiting for {what}; {}):\n{}",
                    if exited.is_empty() {
                        format!("gave up after {limit:?}")
                    } else {
                        exited.join(", ")
                    },
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn logs(&self) -> String {
        let mut text = String::new();
        for name in [
            "munged.out",
            "munge/munged.log",
            "slurmctld.out",
            "log/slurmctld.log",
            "slurmd.out",
            "log/slurmd.log",
        ] {
            let content = std::fs::read_to_string(self.dir.join(name)).unwrap_or_default();
            let tail: Vec<&str> = content.lines().rev().take(30).collect();
            text.push_str(&format!("--- {name}\n"));
            for line in tail.into_iter().rev() {
                text.push_str(line);
                text.push('\n');
            }
        }
        text
    }

    /// A Slurm client command (srun, sbatch, sinfo) aimed at this cluster.
    fn command(&self, program: &str) -> Command {
        let mut cmd = clean_command(program);
        cmd.env("SLURM_CONF", &self.conf);
        cmd
    }
}

impl Drop for SlurmCluster {
    fn drop(&mut self) {
        if !self.daemons.is_empty() {
            let _ = self
                .command("scancel")
                .args(["--full", "--partition", "debug"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        // Reverse start order: slurmd, slurmctld, then munged.
        for (_, child) in self.daemons.iter_mut().rev() {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
            let grace = Instant::now() + Duration::from_secs(10);
            while Instant::now() < grace && matches!(child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn short_hostname() -> String {
    let full = nix::unistd::gethostname().expect("hostname");
    let full = full.to_string_lossy();
    full.split('.').next().unwrap_or(&full).to_string()
}

#[test]
fn slurm_srun_and_sbatch_start_dtrain() {
    let cluster = SlurmCluster::start();
    let reference = reference_hash(2);

    let mut srun = cluster.command("srun");
    srun.args(["-n", "2", "--kill-on-bad-exit=1"])
        .arg(BIN)
        .args(JOB)
        .args(["--master-port", &free_port().to_string()]);
    let outcome = run(srun, RUN_DEADLINE);
    assert_ranks_match(&outcome, 2, &reference);

    // The batch job gives no address or port: both come from SLURM_JOB_NODELIST and
    // SLURM_JOB_ID.
    let out_file = cluster.dir.join("sbatch.out");
    let quoted: Vec<String> = JOB.iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "#!/bin/sh\n#SBATCH -n 2\n#SBATCH -o {out}\nexec srun --kill-on-bad-exit=1 '{BIN}' {args}\n",
        out = out_file.display(),
        args = quoted.join(" "),
    );
    let script_path = cluster.dir.join("job.sh");
    std::fs::write(&script_path, script).unwrap();
    let mut sbatch = cluster.command("sbatch");
    sbatch.arg("--wait").arg(&script_path);
    let submitted = run(sbatch, RUN_DEADLINE);
    let job_output = std::fs::read_to_string(&out_file).unwrap_or_default();
    let outcome = Outcome {
        success: submitted.success,
        text: format!(
            "{}\n--- job output ({})\n{job_output}",
            submitted.text,
            out_file.display()
        ),
    };
    assert_ranks_match(&outcome, 2, &reference);
    assert!(
        job_output.contains(&format!(
            "{}:{}",
            short_hostname(),
            15000 + cluster.first_job + 1
        )),
        "rank 0's address should be the first node and the job-id port:\n{job_output}"
    );

    // One `dtrain launch` per node, the multi-node form: node 0's launcher's store is
    // derived from the allocation too.
    let mut srun = cluster.command("srun");
    let launch = format!(
        "exec '{BIN}' launch --nnodes 2 --node-rank \"$SLURM_PROCID\" --nproc-per-node 1 {}",
        quoted.join(" ")
    );
    srun.args(["-n", "2", "--kill-on-bad-exit=1", "sh", "-c", &launch]);
    let outcome = run(srun, RUN_DEADLINE);
    assert_ranks_match(&outcome, 2, &reference);
    let store = format!(
        "launchers' TCPStore at {}:{}",
        short_hostname(),
        15000 + cluster.first_job + 2
    );
    assert!(outcome.text.contains(&store), "{}", outcome.text);
}

// ---- torchrun (by hand) ---------------------------------------------------------------------

/// torchrun's failure summary shows what `dtrain::error_file` writes. A one-rank torchrun job
/// copies a file written by `record_error` to its `TORCHELASTIC_ERROR_FILE` and fails.
#[test]
#[ignore = "needs torchrun (pip install torch), not in CI"]
fn torchrun_failure_summary_shows_the_error_file_message() {
    let dir = temp_dir("errfile");
    let written = dir.join("written.json");
    let message = "dtrain: error: rank 0: communication failed: a message for torchrun's summary";
    let env = |k: &str| {
        (k == dtrain::error_file::ERROR_FILE_ENV).then(|| written.to_string_lossy().into_owned())
    };
    let (_, outcome) = dtrain::error_file::record_error(&env, message).unwrap();
    outcome.unwrap();
    let mut cmd = clean_command("torchrun");
    cmd.args([
        "--standalone",
        "--nproc-per-node",
        "1",
        "--no-python",
        "sh",
        "-c",
    ])
    .arg(r#"cp "$DTRAIN_WRITTEN" "$TORCHELASTIC_ERROR_FILE"; exit 3"#)
    .env("DTRAIN_WRITTEN", &written);
    let outcome = run(cmd, RUN_DEADLINE);
    assert!(!outcome.success, "{}", outcome.text);
    assert!(
        outcome.text.contains(&format!("traceback : {message}")),
        "torchrun's summary should quote the error file:\n{}",
        outcome.text
    );
    assert!(
        !outcome.text.contains("error_file: <N/A>"),
        "{}",
        outcome.text
    );
}
