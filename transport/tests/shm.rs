//! Multi-process tests of the shared-memory backend.
//!
//! Each test is a parent that re-executes this test binary (`--exact <test name>`) once per
//! rank with `DTRAIN_SHM_WORKER` set; in a worker the same test function runs the rank's side
//! instead. Workers check their own results against references computed independently here
//! (naive folds in the documented rank order, and f64 sums), print a digest of what they
//! received, and exit 0. The parent reaps every child (killing stragglers at a deadline),
//! checks exit codes and digests, and asserts the job's /dev/shm segment is gone.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use transport::shm::{segment_name, ShmBackend};
use transport::{Backend, DType, Error, ReduceOp, Timeouts};

const ENV_WORKER: &str = "DTRAIN_SHM_WORKER";
const ENV_RANK: &str = "DTRAIN_SHM_RANK";
const ENV_WORLD: &str = "DTRAIN_SHM_WORLD";
const ENV_JOB: &str = "DTRAIN_SHM_JOB";

/// Larger than one rank's 4 MiB data area, so collectives wrap the stage ring several times.
const BIG_BYTES: usize = 5 * (1 << 20) + 64 * 3;

fn test_timeouts() -> Timeouts {
    Timeouts {
        connect: Duration::from_secs(60),
        collective: Duration::from_secs(120),
        liveness: Duration::from_secs(1),
    }
}

// ---------------------------------------------------------------- process harness

struct Worker {
    rank: usize,
    world: usize,
    job: String,
}

fn worker_env() -> Option<Worker> {
    std::env::var_os(ENV_WORKER)?;
    let get = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("worker without {k}"));
    Some(Worker {
        rank: get(ENV_RANK).parse().expect("rank"),
        world: get(ENV_WORLD).parse().expect("world"),
        job: get(ENV_JOB),
    })
}

fn unique_job_id(tag: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "t-{tag}-{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn segment_path(job: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm{}", segment_name(job).unwrap()))
}

struct Job {
    job: String,
    dir: PathBuf,
    children: Vec<Option<Child>>,
}

impl Job {
    fn spawn(test_name: &str, world: usize) -> Job {
        let job = unique_job_id(test_name.get(..12).unwrap_or(test_name));
        let dir = std::env::temp_dir().join(format!("dtrain-shm-test-{job}"));
        std::fs::create_dir_all(&dir).unwrap();
        let exe = std::env::current_exe().unwrap();
        let children = (0..world)
            .map(|rank| {
                let out = std::fs::File::create(dir.join(format!("rank{rank}.out"))).unwrap();
                let err = std::fs::File::create(dir.join(format!("rank{rank}.err"))).unwrap();
                Some(
                    Command::new(&exe)
                        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
                        .env(ENV_WORKER, "1")
                        .env(ENV_RANK, rank.to_string())
                        .env(ENV_WORLD, world.to_string())
                        .env(ENV_JOB, &job)
                        .stdin(Stdio::null())
                        .stdout(out)
                        .stderr(err)
                        .spawn()
                        .unwrap(),
                )
            })
            .collect();
        Job { job, dir, children }
    }

    fn output(&self, rank: usize) -> String {
        let read = |ext: &str| {
            std::fs::read_to_string(self.dir.join(format!("rank{rank}.{ext}"))).unwrap_or_default()
        };
        format!("{}\n--- stderr ---\n{}", read("out"), read("err"))
    }

    fn pid(&self, rank: usize) -> u32 {
        self.children[rank].as_ref().unwrap().id()
    }

    /// Reaps the listed ranks (killing any still running at `deadline`); returns exit success.
    fn wait(&mut self, ranks: &[usize], timeout: Duration) -> Vec<bool> {
        let deadline = Instant::now() + timeout;
        ranks
            .iter()
            .map(|&r| {
                let child = self.children[r].as_mut().unwrap();
                loop {
                    if let Some(status) = child.try_wait().unwrap() {
                        self.children[r] = None;
                        return status.success();
                    }
                    if Instant::now() >= deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        self.children[r] = None;
                        eprintln!("rank {r} did not finish in {timeout:?}: killed");
                        return false;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .collect()
    }

    /// Asserts every rank exited 0, and returns their stdout.
    fn expect_success(mut self, timeout: Duration) -> Vec<String> {
        let all: Vec<usize> = (0..self.children.len()).collect();
        let ok = self.wait(&all, timeout);
        for (rank, ok) in ok.iter().enumerate() {
            assert!(ok, "rank {rank} failed:\n{}", self.output(rank));
        }
        let outs = all.iter().map(|&r| self.output(r)).collect();
        self.assert_no_segment();
        outs
    }

    fn assert_no_segment(&self) {
        let path = segment_path(&self.job);
        assert!(!path.exists(), "{} was left behind", path.display());
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        for child in self.children.iter_mut().flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn digests(outputs: &[String]) -> Vec<String> {
    outputs
        .iter()
        .map(|o| {
            // libtest prints "test <name> ... " without a newline before the test's output.
            let at = o
                .find("DIGEST ")
                .unwrap_or_else(|| panic!("no digest in output:\n{o}"));
            o[at..].lines().next().unwrap_or_default().to_string()
        })
        .collect()
}

fn run_job(test_name: &str, world: usize) {
    let outs = Job::spawn(test_name, world).expect_success(Duration::from_secs(300));
    let d = digests(&outs);
    assert!(
        d.iter().all(|x| *x == d[0]),
        "ranks received different bytes: {d:?}"
    );
}

// ---------------------------------------------------------------- data and references

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

fn noise(case: u64, rank: usize, i: usize) -> u64 {
    splitmix(splitmix(case ^ ((rank as u64) << 48)) ^ i as u64)
}

trait TestElem: bytemuck::Pod + PartialEq + std::fmt::Debug {
    const DT: DType;
    fn gen(case: u64, rank: usize, i: usize) -> Self;
    /// `a ⊕ b` exactly as documented for `reduce_into`.
    fn combine(a: Self, b: Self, op: ReduceOp) -> Self;
    fn avg(sum: Self, n: usize) -> Self;
    fn to_f64(self) -> f64;
    /// Relative rounding unit, 0 for exact types.
    const EPS: f64;
}

impl TestElem for f32 {
    const DT: DType = DType::F32;
    const EPS: f64 = f32::EPSILON as f64;
    fn gen(case: u64, rank: usize, i: usize) -> f32 {
        (noise(case, rank, i) >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    fn combine(a: f32, b: f32, op: ReduceOp) -> f32 {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => a + b,
            ReduceOp::Max => {
                if b > a {
                    b
                } else {
                    a
                }
            }
            ReduceOp::Min => {
                if b < a {
                    b
                } else {
                    a
                }
            }
        }
    }
    fn avg(sum: f32, n: usize) -> f32 {
        sum * (1.0 / n as f32)
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl TestElem for f64 {
    const DT: DType = DType::F64;
    const EPS: f64 = f64::EPSILON;
    fn gen(case: u64, rank: usize, i: usize) -> f64 {
        (noise(case, rank, i) >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }
    fn combine(a: f64, b: f64, op: ReduceOp) -> f64 {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => a + b,
            ReduceOp::Max => {
                if b > a {
                    b
                } else {
                    a
                }
            }
            ReduceOp::Min => {
                if b < a {
                    b
                } else {
                    a
                }
            }
        }
    }
    fn avg(sum: f64, n: usize) -> f64 {
        sum * (1.0 / n as f64)
    }
    fn to_f64(self) -> f64 {
        self
    }
}

impl TestElem for i64 {
    const DT: DType = DType::I64;
    const EPS: f64 = 0.0;
    fn gen(case: u64, rank: usize, i: usize) -> i64 {
        (noise(case, rank, i) >> 24) as i64 - (1i64 << 39)
    }
    fn combine(a: i64, b: i64, op: ReduceOp) -> i64 {
        match op {
            ReduceOp::Sum | ReduceOp::Avg => a.wrapping_add(b),
            ReduceOp::Max => a.max(b),
            ReduceOp::Min => a.min(b),
        }
    }
    fn avg(sum: i64, n: usize) -> i64 {
        sum / n as i64
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

fn input<T: TestElem>(case: u64, rank: usize, len: usize) -> Vec<T> {
    (0..len).map(|i| T::gen(case, rank, i)).collect()
}

/// FNV-1a, folded over everything a worker received.
struct Digest(u64);
impl Digest {
    fn add(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// All-reduce `len` elements and check against (1) the documented rank-order fold, exactly,
/// and (2) for floats, an f64 sum within rounding error.
fn check_all_reduce<T: TestElem>(
    b: &mut ShmBackend,
    case: u64,
    len: usize,
    op: ReduceOp,
    digest: &mut Digest,
) {
    let n = b.world_size();
    let inputs: Vec<Vec<T>> = (0..n).map(|r| input::<T>(case, r, len)).collect();
    let mut buf = inputs[b.rank()].clone();
    b.all_reduce(bytemuck::cast_slice_mut(&mut buf), T::DT, op)
        .unwrap_or_else(|e| panic!("all_reduce {:?} {op:?} len {len}: {e}", T::DT));
    for i in 0..len {
        let mut folded = inputs[0][i];
        for input in &inputs[1..] {
            folded = T::combine(folded, input[i], op);
        }
        if op == ReduceOp::Avg {
            folded = T::avg(folded, n);
        }
        assert_eq!(
            buf[i], folded,
            "all_reduce {:?} {op:?} len {len} world {n}: element {i} differs from the rank-order fold",
            T::DT
        );
        if matches!(op, ReduceOp::Sum | ReduceOp::Avg) && T::EPS > 0.0 {
            let exact: f64 = inputs.iter().map(|x| x[i].to_f64()).sum();
            let magnitude: f64 = inputs.iter().map(|x| x[i].to_f64().abs()).sum();
            let scale = if op == ReduceOp::Avg {
                1.0 / n as f64
            } else {
                1.0
            };
            let err = (buf[i].to_f64() - exact * scale).abs();
            assert!(
                err <= (n as f64 + 1.0) * T::EPS * magnitude * scale + 1e-300,
                "element {i}: {:?} vs f64 reference {}",
                buf[i],
                exact * scale
            );
        }
    }
    digest.add(bytemuck::cast_slice(&buf));
}

fn check_reduce_scatter<T: TestElem>(b: &mut ShmBackend, case: u64, len: usize, op: ReduceOp) {
    let n = b.world_size();
    let me = b.rank();
    let inputs: Vec<Vec<T>> = (0..n).map(|r| input::<T>(case, r, len * n)).collect();
    let mut recv = vec![T::gen(0, 0, 0); len];
    b.reduce_scatter(
        bytemuck::cast_slice(&inputs[me]),
        bytemuck::cast_slice_mut(&mut recv),
        T::DT,
        op,
    )
    .unwrap_or_else(|e| panic!("reduce_scatter: {e}"));
    for (i, got) in recv.iter().enumerate() {
        let j = me * len + i;
        let mut folded = inputs[0][j];
        for input in &inputs[1..] {
            folded = T::combine(folded, input[j], op);
        }
        if op == ReduceOp::Avg {
            folded = T::avg(folded, n);
        }
        assert_eq!(
            *got,
            folded,
            "reduce_scatter {:?} {op:?} len {len}: element {i}",
            T::DT
        );
    }
}

fn bytes_of(case: u64, rank: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| noise(case, rank, i) as u8).collect()
}

// ---------------------------------------------------------------- worker scenarios

const LENS: [usize; 4] = [0, 1, 7, 1023];
const OPS: [ReduceOp; 4] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min];

fn attach(w: &Worker) -> ShmBackend {
    ShmBackend::attach(&w.job, w.rank, w.world, &test_timeouts())
        .unwrap_or_else(|e| panic!("rank {} attach: {e}", w.rank))
}

/// Every collective, every root, small and large sizes.
fn every_collective(w: &Worker) {
    let mut b = attach(w);
    let n = w.world;
    let me = w.rank;
    let mut digest = Digest(0xcbf2_9ce4_8422_2325);
    let mut case = 1u64;
    for op in OPS {
        for len in LENS {
            check_all_reduce::<f32>(&mut b, case, len, op, &mut digest);
            check_all_reduce::<f64>(&mut b, case + 1, len, op, &mut digest);
            check_all_reduce::<i64>(&mut b, case + 2, len, op, &mut digest);
            case += 3;
        }
        // Large: several chunks and more than one trip around the stage ring.
        check_all_reduce::<f32>(&mut b, case, BIG_BYTES / 4, op, &mut digest);
        check_all_reduce::<f64>(&mut b, case + 1, BIG_BYTES / 8 + 3, op, &mut digest);
        check_all_reduce::<i64>(&mut b, case + 2, BIG_BYTES / 8 + 1, op, &mut digest);
        check_all_reduce::<f32>(&mut b, case + 3, 8192, op, &mut digest);
        check_all_reduce::<f32>(&mut b, case + 4, 8193, op, &mut digest);
        check_all_reduce::<f32>(&mut b, case + 5, 65536 + 5, op, &mut digest);
        // Around the one-shot threshold (256 KiB): 65536 f32 is the largest one-shot buffer.
        check_all_reduce::<f32>(&mut b, case + 6, 65536, op, &mut digest);
        check_all_reduce::<f32>(&mut b, case + 7, 65537, op, &mut digest);
        case += 8;
    }
    for len in LENS.into_iter().chain([BIG_BYTES]) {
        for root in 0..n {
            case += 1;
            // broadcast
            let want = bytes_of(case, root, len);
            let mut buf = if me == root {
                want.clone()
            } else {
                vec![0xAB; len]
            };
            b.broadcast(&mut buf, root).unwrap();
            assert!(buf == want, "broadcast len {len} root {root}");
            digest.add(&buf);
            // gather
            let send = bytes_of(case, me, len);
            let mut recv = vec![0u8; len * n];
            b.gather(&send, (me == root).then_some(&mut recv[..]), root)
                .unwrap();
            if me == root {
                for r in 0..n {
                    assert!(
                        recv[r * len..(r + 1) * len] == bytes_of(case, r, len),
                        "gather len {len} root {root} block {r}"
                    );
                }
            }
            // scatter
            let all: Vec<u8> = (0..n).flat_map(|r| bytes_of(case + 7, r, len)).collect();
            let mut mine = vec![0u8; len];
            b.scatter((me == root).then_some(&all[..]), &mut mine, root)
                .unwrap();
            assert!(
                mine == bytes_of(case + 7, me, len),
                "scatter len {len} root {root}"
            );
        }
        // all_gather
        case += 1;
        let send = bytes_of(case, me, len);
        let mut recv = vec![0u8; len * n];
        b.all_gather(&send, &mut recv).unwrap();
        for r in 0..n {
            assert!(
                recv[r * len..(r + 1) * len] == bytes_of(case, r, len),
                "all_gather len {len} block {r}"
            );
        }
        digest.add(&recv);
        b.barrier().unwrap();
    }
    for op in OPS {
        for len in LENS.into_iter().chain([BIG_BYTES / 8 / n + 5]) {
            case += 1;
            check_reduce_scatter::<f32>(&mut b, case, len, op);
            check_reduce_scatter::<f64>(&mut b, case, len, op);
            check_reduce_scatter::<i64>(&mut b, case, len, op);
        }
    }
    // Wrong arguments are rejected without poisoning the backend.
    let mut odd = [0u8; 5];
    assert!(matches!(
        b.all_reduce(&mut odd, DType::F32, ReduceOp::Sum),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        b.broadcast(&mut odd, n),
        Err(Error::InvalidArgument(_))
    ));
    b.barrier().unwrap();
    println!("DIGEST {:016x}", digest.0);
}

/// Many collectives back to back with sizes drawn (identically on all ranks) from a wide
/// range, so consecutive collectives of different sizes share stages.
fn back_to_back(w: &Worker) {
    let mut b = attach(w);
    let n = w.world;
    let me = w.rank;
    let mut digest = Digest(0xcbf2_9ce4_8422_2325);
    for iter in 0..400u64 {
        let r = splitmix(iter ^ 0x5eed);
        let len = match r % 4 {
            0 => (r >> 8) as usize % 16,
            1 => (r >> 8) as usize % 5000,
            2 => (r >> 8) as usize % 200_000,
            _ => (r >> 8) as usize % 700_000,
        };
        match (r >> 40) % 5 {
            0 | 1 => check_all_reduce::<f32>(&mut b, iter, len, ReduceOp::Sum, &mut digest),
            2 => check_all_reduce::<i64>(&mut b, iter, len / 2, ReduceOp::Max, &mut digest),
            3 => {
                let root = (r >> 50) as usize % n;
                let want = bytes_of(iter, root, len);
                let mut buf = if me == root {
                    want.clone()
                } else {
                    vec![0; len]
                };
                b.broadcast(&mut buf, root).unwrap();
                assert!(buf == want, "iteration {iter}: broadcast len {len}");
            }
            _ => {
                let len = len / 4;
                let send = bytes_of(iter, me, len);
                let mut recv = vec![0u8; len * n];
                b.all_gather(&send, &mut recv).unwrap();
                for q in 0..n {
                    assert!(
                        recv[q * len..(q + 1) * len] == bytes_of(iter, q, len),
                        "iteration {iter}: all_gather"
                    );
                }
            }
        }
    }
    println!("DIGEST {:016x}", digest.0);
}

// ---------------------------------------------------------------- tests

macro_rules! multi_process_test {
    ($name:ident, $world:expr, $scenario:ident) => {
        #[test]
        fn $name() {
            match worker_env() {
                Some(w) => $scenario(&w),
                None => run_job(stringify!($name), $world),
            }
        }
    };
}

multi_process_test!(every_collective_world_1, 1, every_collective);
multi_process_test!(every_collective_world_2, 2, every_collective);
multi_process_test!(every_collective_world_3, 3, every_collective);
multi_process_test!(every_collective_world_4, 4, every_collective);
multi_process_test!(back_to_back_varying_sizes_world_2, 2, back_to_back);
multi_process_test!(back_to_back_varying_sizes_world_3, 3, back_to_back);
multi_process_test!(back_to_back_varying_sizes_world_8, 8, back_to_back);

/// Survivors loop over large all-reduces until the victim (rank 1) is killed with SIGKILL by
/// the parent mid-collective; each must fail with `PeerDied` naming rank 1 (not a timeout: the
/// collective timeout is 120 s, the liveness check 1 s). The victim stays an unreaped zombie
/// until the survivors finished, which `kill(pid, 0)` alone would miss.
#[test]
fn kill_9_mid_collective_reports_peer_died() {
    const VICTIM: usize = 1;
    if let Some(w) = worker_env() {
        let mut b = attach(&w);
        let mut buf = vec![1.0f32; 1 << 20];
        for iter in 0.. {
            if iter == 3 {
                println!("RUNNING");
            }
            match b.all_reduce(
                bytemuck::cast_slice_mut(&mut buf),
                DType::F32,
                ReduceOp::Avg,
            ) {
                Ok(()) => {}
                Err(Error::PeerDied { rank, detail, .. }) => {
                    println!("PEERDIED rank={rank} after {iter} iterations: {detail}");
                    // A second call fails at once (backend poisoned), naming the cause.
                    let again = b.all_reduce(
                        bytemuck::cast_slice_mut(&mut buf),
                        DType::F32,
                        ReduceOp::Sum,
                    );
                    assert!(matches!(again, Err(Error::Shm(_))), "{again:?}");
                    return;
                }
                Err(e) => panic!("expected PeerDied, got {e}"),
            }
        }
        return;
    }
    let world = 3;
    let mut job = Job::spawn("kill_9_mid_collective_reports_peer_died", world);
    // Wait until the ranks are attached and running collectives.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !job.output(0).contains("RUNNING") {
        assert!(
            Instant::now() < deadline,
            "workers never started:\n{}",
            job.output(0)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(job.pid(VICTIM) as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let survivors: Vec<usize> = (0..world).filter(|&r| r != VICTIM).collect();
    let ok = job.wait(&survivors, Duration::from_secs(60));
    for (&r, ok) in survivors.iter().zip(ok) {
        let out = job.output(r);
        assert!(ok, "rank {r} failed:\n{out}");
        assert!(
            out.contains(&format!("PEERDIED rank={VICTIM}")),
            "rank {r}:\n{out}"
        );
        if let Some(line) = out.lines().find(|l| l.contains("PEERDIED")) {
            eprintln!("rank {r}: {line}");
        }
    }
    assert_eq!(job.wait(&[VICTIM], Duration::from_secs(10)), [false]);
    job.assert_no_segment();
}

/// A rank that drops its backend while a peer waits for it is reported as departed at once.
#[test]
fn dropped_backend_reports_peer_departed() {
    if let Some(w) = worker_env() {
        let mut b = attach(&w);
        let mut buf = vec![1i64; 100];
        b.all_reduce(
            bytemuck::cast_slice_mut(&mut buf),
            DType::I64,
            ReduceOp::Sum,
        )
        .unwrap();
        assert_eq!(buf, vec![2i64; 100]);
        if w.rank == 1 {
            drop(b);
            // Stay alive: rank 0 must learn of the departure from the segment, not the pid.
            std::thread::sleep(Duration::from_secs(3));
            println!("DEPARTED");
        } else {
            match b.all_reduce(
                bytemuck::cast_slice_mut(&mut buf),
                DType::I64,
                ReduceOp::Sum,
            ) {
                Err(Error::PeerDied {
                    rank: 1, detail, ..
                }) if detail.contains("left the job") => {
                    println!("SAW_DEPARTURE");
                }
                other => panic!("expected PeerDied(1, left the job), got {other:?}"),
            }
        }
        return;
    }
    let outs = Job::spawn("dropped_backend_reports_peer_departed", 2)
        .expect_success(Duration::from_secs(60));
    assert!(outs[0].contains("SAW_DEPARTURE"), "{}", outs[0]);
    assert!(outs[1].contains("DEPARTED"), "{}", outs[1]);
}

#[test]
fn attach_rejects_bad_arguments() {
    let t = test_timeouts();
    for bad in ["", "a/b", "../x", "with space", &"x".repeat(65)] {
        assert!(
            matches!(
                ShmBackend::attach(bad, 0, 1, &t),
                Err(Error::InvalidArgument(_))
            ),
            "job id {bad:?} accepted"
        );
    }
    let job = unique_job_id("args");
    assert!(matches!(
        ShmBackend::attach(&job, 2, 2, &t),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        ShmBackend::attach(&job, 0, 0, &t),
        Err(Error::InvalidArgument(_))
    ));
    assert!(!segment_path(&job).exists());
}

#[test]
fn attach_times_out_naming_the_missing_rank_and_cleans_up() {
    let t = Timeouts {
        connect: Duration::from_millis(300),
        ..test_timeouts()
    };
    let job = unique_job_id("timeout");
    match ShmBackend::attach(&job, 0, 3, &t) {
        Err(Error::Timeout { rank: 1, .. }) => {}
        other => panic!(
            "expected Timeout naming rank 1, got {:?}",
            other.map(|_| ())
        ),
    }
    assert!(
        !segment_path(&job).exists(),
        "creator left its segment behind"
    );
    match ShmBackend::attach(&job, 2, 3, &t) {
        Err(Error::Timeout { rank: 0, .. }) => {}
        other => panic!(
            "expected Timeout naming rank 0, got {:?}",
            other.map(|_| ())
        ),
    }
}

#[test]
fn world_of_one_runs_in_process() {
    let job = unique_job_id("one");
    let mut b = ShmBackend::attach(&job, 0, 1, &test_timeouts()).unwrap();
    assert!(
        !segment_path(&job).exists(),
        "segment must be unlinked once all ranks attached"
    );
    let mut buf = vec![1.5f32, -2.0];
    b.all_reduce(
        bytemuck::cast_slice_mut(&mut buf),
        DType::F32,
        ReduceOp::Avg,
    )
    .unwrap();
    assert_eq!(buf, vec![1.5, -2.0]);
    b.barrier().unwrap();
}

/// A rank started with a different world size fails with ConfigMismatch, and so does rank 0,
/// at once rather than at the connect timeout (which would be a `Timeout` error).
#[test]
fn world_size_mismatch_fails_fast_on_both_sides() {
    let job = unique_job_id("mismatch");
    let t = test_timeouts();
    let rank0 = {
        let job = job.clone();
        std::thread::spawn(move || ShmBackend::attach(&job, 0, 2, &t).map(|_| ()))
    };
    let rank1 = ShmBackend::attach(&job, 1, 3, &t).map(|_| ());
    let rank0 = rank0.join().unwrap();
    assert!(
        matches!(rank1, Err(Error::ConfigMismatch(_))),
        "rank 1: {rank1:?}"
    );
    assert!(
        matches!(rank0, Err(Error::ConfigMismatch(_))),
        "rank 0: {rank0:?}"
    );
    assert!(!segment_path(&job).exists());
}

/// A peer that is alive but never joins the collective makes the waiter fail with a Timeout
/// naming it after `timeouts.collective`.
#[test]
fn stalled_peer_times_out_naming_it() {
    if let Some(w) = worker_env() {
        let t = Timeouts {
            collective: Duration::from_millis(300),
            ..test_timeouts()
        };
        let mut b = ShmBackend::attach(&w.job, w.rank, w.world, &t).unwrap();
        if w.rank == 1 {
            // Alive, attached, but not calling any collective.
            std::thread::sleep(Duration::from_secs(2));
            return;
        }
        let mut buf = vec![0.5f64; 10];
        match b.all_reduce(
            bytemuck::cast_slice_mut(&mut buf),
            DType::F64,
            ReduceOp::Sum,
        ) {
            Err(Error::Timeout { rank: 1, .. }) => println!("TIMED_OUT"),
            other => panic!("expected Timeout naming rank 1, got {other:?}"),
        }
        return;
    }
    let outs =
        Job::spawn("stalled_peer_times_out_naming_it", 2).expect_success(Duration::from_secs(60));
    assert!(outs[0].contains("TIMED_OUT"), "{}", outs[0]);
}
