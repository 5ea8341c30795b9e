//! Collective benchmarks, nccl-tests style.
//!
//! For each message size (`min_bytes`, ×`factor`, ... `max_bytes`) and collective, runs
//! warm-up iterations, then timed repetitions; each repetition starts after a barrier and its
//! time is the slowest rank's (an all-reduce(max) after the sweep, outside the timed region);
//! the row reports the median. Repetitions shrink for large sizes so a sweep stays short.
//!
//! `bytes` is the total message size as in nccl-tests: the buffer for all-reduce and
//! broadcast, the whole gathered / scattered buffer (`ranks` × per-rank block) for gather,
//! scatter and all-gather. `algbw = bytes / time`; `busbw = algbw × factor` with factor
//! `2(n-1)/n` for all-reduce, `(n-1)/n` for gather / scatter / all-gather and `1` for
//! broadcast: the bandwidth each link must sustain, comparable across rank counts.
//! `memcpy` rows time a local `copy_from_slice` of the same sizes as a reference ceiling.
//!
//! `all_reduce_bf16` / `all_reduce_fp16` rows all-reduce the same number of elements as the
//! `all_reduce` row of that size, in 16 bits (gradient compression: half the bytes move,
//! summed in f32 at each step). Their `bytes` is the f32 size of those elements, so times
//! and bandwidths line up with the f32 row they replace: `algbw` is the effective f32
//! gradient bandwidth.

use std::time::Instant;

use crate::{Bf16, Buffer, Communicator, Element, HalfFloat, ReduceOp, Result, F16};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchCollective {
    AllReduce,
    Broadcast,
    Gather,
    Scatter,
    AllGather,
    /// All-reduce of the same elements as bf16 (see the module docs).
    AllReduceBf16,
    /// All-reduce of the same elements as IEEE binary16.
    AllReduceF16,
}

impl BenchCollective {
    pub const ALL: [BenchCollective; 7] = [
        BenchCollective::AllReduce,
        BenchCollective::Broadcast,
        BenchCollective::Gather,
        BenchCollective::Scatter,
        BenchCollective::AllGather,
        BenchCollective::AllReduceBf16,
        BenchCollective::AllReduceF16,
    ];

    pub fn name(self) -> &'static str {
        match self {
            BenchCollective::AllReduce => "all_reduce",
            BenchCollective::Broadcast => "broadcast",
            BenchCollective::Gather => "gather",
            BenchCollective::Scatter => "scatter",
            BenchCollective::AllGather => "all_gather",
            BenchCollective::AllReduceBf16 => "all_reduce_bf16",
            BenchCollective::AllReduceF16 => "all_reduce_fp16",
        }
    }

    /// nccl-tests bus-bandwidth factor for `n` ranks.
    pub fn busbw_factor(self, n: usize) -> f64 {
        let n = n as f64;
        match self {
            BenchCollective::AllReduce
            | BenchCollective::AllReduceBf16
            | BenchCollective::AllReduceF16 => 2.0 * (n - 1.0) / n,
            BenchCollective::Broadcast => 1.0,
            _ => (n - 1.0) / n,
        }
    }
}

#[derive(Clone, Debug)]
pub struct SweepConfig {
    pub min_bytes: usize,
    pub max_bytes: usize,
    /// Size multiplier between rows.
    pub factor: usize,
    pub warmup: usize,
    /// Timed repetitions for small sizes (fewer for large ones, at least 3).
    pub iters: usize,
    /// Stop adding repetitions once a size has moved about this many bytes.
    pub bytes_per_size: usize,
    pub collectives: Vec<BenchCollective>,
    /// Also time a local memcpy of each size.
    pub memcpy: bool,
    /// All-reduce buffers from `Communicator::alloc_buffer` (read in place by peers on shared
    /// memory, as DDP's buckets are) rather than ordinary `Vec`s.
    pub shared_buffers: bool,
}

impl Default for SweepConfig {
    fn default() -> Self {
        SweepConfig {
            min_bytes: 8,
            max_bytes: 128 << 20,
            factor: 4,
            warmup: 3,
            iters: 20,
            bytes_per_size: 1 << 30,
            collectives: BenchCollective::ALL.to_vec(),
            memcpy: true,
            shared_buffers: true,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct BenchRow {
    /// `all_reduce`, `broadcast`, `gather`, `scatter`, `all_gather`, `all_reduce_bf16`,
    /// `all_reduce_fp16` or `memcpy`.
    pub collective: String,
    pub transport: String,
    pub ranks: usize,
    pub bytes: usize,
    pub time_us: f64,
    pub algbw_gbs: f64,
    pub busbw_gbs: f64,
}

impl BenchRow {
    pub fn to_json(&self) -> String {
        format!(
            "{{\"collective\":\"{}\",\"transport\":\"{}\",\"ranks\":{},\"bytes\":{},\"time_us\":{:.3},\"algbw_gbs\":{:.4},\"busbw_gbs\":{:.4}}}",
            self.collective, self.transport, self.ranks, self.bytes, self.time_us, self.algbw_gbs, self.busbw_gbs
        )
    }
}

/// A fixed-width table of rows (one line per row, with a header).
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut out = format!(
        "{:<15} {:>9} {:>5} {:>12} {:>12} {:>10} {:>10}\n",
        "collective", "transport", "ranks", "bytes", "time_us", "algbw_GB/s", "busbw_GB/s"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<15} {:>9} {:>5} {:>12} {:>12.2} {:>10.3} {:>10.3}\n",
            r.collective, r.transport, r.ranks, r.bytes, r.time_us, r.algbw_gbs, r.busbw_gbs
        ));
    }
    out
}

fn sizes(cfg: &SweepConfig) -> Vec<usize> {
    let mut out = Vec::new();
    let mut s = cfg.min_bytes.max(1);
    while s <= cfg.max_bytes {
        out.push(s);
        s = s.saturating_mul(cfg.factor.max(2));
    }
    out
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// One collective at one size: returns (reported bytes, per-repetition local times in s).
fn time_collective(
    comm: &mut Communicator,
    which: BenchCollective,
    bytes: usize,
    (warmup, reps): (usize, usize),
    shared_buffers: bool,
) -> Result<(usize, Vec<f64>)> {
    let n = comm.world_size();
    let rank = comm.rank();
    // Moves use u8 blocks; all-reduces use f32 (the training workload) or its 16-bit forms.
    let block = (bytes / n).max(1);
    let elems = (bytes / 4).max(1);
    // Each all-reduce row gets a full buffer of its type, other rows a token one (allocating
    // a shared region is itself a collective, so skip it for them).
    let mut floats = reduce_buffer::<f32>(
        comm,
        which == BenchCollective::AllReduce,
        elems,
        shared_buffers,
    )?;
    floats.fill(1.0);
    let mut bf16s = reduce_buffer::<Bf16>(
        comm,
        which == BenchCollective::AllReduceBf16,
        elems,
        shared_buffers,
    )?;
    bf16s.fill(Bf16::from_f32(1.0));
    let mut f16s = reduce_buffer::<F16>(
        comm,
        which == BenchCollective::AllReduceF16,
        elems,
        shared_buffers,
    )?;
    f16s.fill(F16::from_f32(1.0));
    let mut buf = vec![rank as u8; bytes.max(1)];
    let mut block_buf = vec![0u8; block];
    let mut whole = vec![0u8; block * n];
    let reported = match which {
        BenchCollective::AllReduce
        | BenchCollective::AllReduceBf16
        | BenchCollective::AllReduceF16 => elems * 4,
        BenchCollective::Broadcast => buf.len(),
        _ => block * n,
    };
    let mut run_once = |comm: &mut Communicator| -> Result<()> {
        match which {
            BenchCollective::AllReduce => comm.all_reduce(&mut floats, ReduceOp::Sum),
            BenchCollective::Broadcast => comm.broadcast(&mut buf, 0),
            BenchCollective::Gather => {
                comm.gather(&block_buf, (rank == 0).then_some(&mut whole[..]), 0)
            }
            BenchCollective::Scatter => {
                comm.scatter((rank == 0).then_some(&whole[..]), &mut block_buf, 0)
            }
            BenchCollective::AllGather => comm.all_gather(&block_buf, &mut whole),
            BenchCollective::AllReduceBf16 => comm.all_reduce(&mut bf16s, ReduceOp::Sum),
            BenchCollective::AllReduceF16 => comm.all_reduce(&mut f16s, ReduceOp::Sum),
        }
    };
    for _ in 0..warmup {
        run_once(comm)?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        comm.barrier()?;
        let t0 = Instant::now();
        run_once(comm)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    Ok((reported, times))
}

/// `len` elements for the row that reduces `T` (shared or heap as configured), one element
/// otherwise.
fn reduce_buffer<T: Element>(
    comm: &mut Communicator,
    used: bool,
    len: usize,
    shared: bool,
) -> Result<Buffer<T>> {
    match (used, shared) {
        (true, true) => comm.alloc_buffer::<T>(len),
        (true, false) => Ok(Buffer::heap(len)),
        (false, _) => Ok(Buffer::heap(1)),
    }
}

fn reps_for(cfg: &SweepConfig, bytes: usize) -> (usize, usize) {
    let reps = (cfg.bytes_per_size / bytes.max(1)).clamp(3, cfg.iters.max(3));
    let warmup = if bytes >= 16 << 20 {
        cfg.warmup.min(1)
    } else {
        cfg.warmup
    };
    (warmup, reps)
}

/// Runs the sweep. Collective: every rank calls it with the same `cfg`; every rank gets the
/// same rows (memcpy rows are this rank's own).
pub fn run_sweep(comm: &mut Communicator, cfg: &SweepConfig) -> Result<Vec<BenchRow>> {
    let n = comm.world_size();
    let transport = comm.transport_name().to_string();
    let mut rows = Vec::new();
    for bytes in sizes(cfg) {
        let (warmup, reps) = reps_for(cfg, bytes);
        for &which in &cfg.collectives {
            let (reported, mut times) =
                time_collective(comm, which, bytes, (warmup, reps), cfg.shared_buffers)?;
            // The slowest rank defines each repetition.
            comm.all_reduce(&mut times, ReduceOp::Max)?;
            let t = median(&mut times);
            let algbw = reported as f64 / t / 1e9;
            rows.push(BenchRow {
                collective: which.name().to_string(),
                transport: transport.clone(),
                ranks: n,
                bytes: reported,
                time_us: t * 1e6,
                algbw_gbs: algbw,
                busbw_gbs: algbw * which.busbw_factor(n),
            });
        }
        if cfg.memcpy {
            let src = vec![1u8; bytes];
            let mut dst = vec![0u8; bytes];
            let mut times = Vec::with_capacity(reps);
            for i in 0..warmup + reps {
                let t0 = Instant::now();
                dst.copy_from_slice(std::hint::black_box(&src));
                std::hint::black_box(&mut dst);
                if i >= warmup {
                    times.push(t0.elapsed().as_secs_f64());
                }
            }
            let t = median(&mut times);
            let bw = bytes as f64 / t / 1e9;
            rows.push(BenchRow {
                collective: "memcpy".to_string(),
                transport: transport.clone(),
                ranks: n,
                bytes,
                time_us: t * 1e6,
                algbw_gbs: bw,
                busbw_gbs: bw,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busbw_factors_follow_nccl_tests() {
        assert_eq!(BenchCollective::AllReduce.busbw_factor(4), 1.5);
        assert_eq!(BenchCollective::AllGather.busbw_factor(4), 0.75);
        assert_eq!(BenchCollective::Broadcast.busbw_factor(8), 1.0);
    }

    #[test]
    fn sizes_step_by_factor() {
        let cfg = SweepConfig::default();
        let s = sizes(&cfg);
        assert_eq!(s[0], 8);
        assert_eq!(s[1], 32);
        assert_eq!(*s.last().unwrap(), 128 << 20);
    }

    #[test]
    fn json_has_exactly_the_documented_fields() {
        let row = BenchRow {
            collective: "all_reduce".into(),
            transport: "tcp".into(),
            ranks: 2,
            bytes: 8,
            time_us: 12.5,
            algbw_gbs: 0.00064,
            busbw_gbs: 0.00064,
        };
        assert_eq!(
            row.to_json(),
            "{\"collective\":\"all_reduce\",\"transport\":\"tcp\",\"ranks\":2,\"bytes\":8,\"time_us\":12.500,\"algbw_gbs\":0.0006,\"busbw_gbs\":0.0006}"
        );
    }

    #[test]
    fn local_sweep_produces_rows_for_every_collective_and_size() {
        let mut comm = Communicator::from_backend(Box::new(crate::local::LocalBackend), "local");
        let cfg = SweepConfig {
            min_bytes: 8,
            max_bytes: 512,
            iters: 3,
            warmup: 1,
            ..SweepConfig::default()
        };
        let rows = run_sweep(&mut comm, &cfg).unwrap();
        assert_eq!(rows.len(), 4 * 8); // sizes 8, 32, 128, 512 × (7 collectives + memcpy)
        assert!(rows
            .iter()
            .all(|r| r.time_us > 0.0 && r.algbw_gbs.is_finite()));
        assert!(format_table(&rows).lines().count() == rows.len() + 1);
    }
}
