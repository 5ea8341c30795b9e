//! All-reduce of 16-bit floats (bf16, fp16: compressed gradients) with real processes, on
//! every backend — shm (2, 3, 4 ranks), TCP (2, 3, 4), hierarchical shm+tcp (3 ranks on 2
//! hosts, 4 ranks on interleaved hosts) — checked element by element against an f64 model of
//! the backend's exact hop order:
//! - one hop `a ⊕ b` is `round16(f32(a + b))` (the f64 sum of two 16-bit values, rounded to
//!   f32 — exactly the f32 sum, since f64 has more than twice f32's precision — then to 16
//!   bits); `Avg` is the sum, then `round16(f32(sum * f32(1/n)))` once at the end; `Max` is
//!   `b if b > a else a`;
//! - shm: `((x0 ⊕ x1) ⊕ x2) ⊕ ...` in rank order, on every path (one-shot, zero-copy,
//!   pipelined); TCP: the same up to `direct_allreduce_max_bytes`, above it the ring order of
//!   `algorithms::ring` per segment (`x[s] ⊕ (x[s-1] ⊕ (... ⊕ x[s+1]))`); hierarchical: each
//!   host's ranks folded in rank order, then the host sums in host order up to
//!   `FUSED_ALL_REDUCE_MAX_BYTES`, else by the TCP ring among the leaders.
//!
//! Lengths are odd or straddle every path threshold (1, 3, 1001, 32768, 32771, 140001,
//! 1100003 elements); inputs span the formats' whole exponent ranges (binary16 subnormals
//! included) and contain infinities, inf - inf, NaN, overflowing sums and signed zeros.
//! Each case runs with a `Vec`, with a `Buffer` from `alloc_buffer` (zero-copy on shm) and
//! through `AsyncCommunicator::all_reduce_async` (as DDP does), and all ranks must end with
//! bitwise identical buffers.

mod common;

use std::time::Duration;

use common::{assert_success_and_identical, digest, fail, finish_all, worker_config, Spawn};
use transport::algorithms::{split_even, AlgoConfig};
use transport::hierarchical::FUSED_ALL_REDUCE_MAX_BYTES;
use transport::{AsyncCommunicator, Bf16, Communicator, DType, HalfFloat, ReduceOp, F16};

const LENS: &[usize] = &[1, 3, 1001, 32_768, 32_771, 140_001, 1_100_003];
const OPS: [ReduceOp; 3] = [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max];

#[test]
#[ignore = "rank process of this file's tests, which spawn it with --ignored --exact worker"]
fn worker() {
    let scenario = common::child_scenario();
    let cfg = worker_config();
    let mut comm = common::connect_or_exit(&cfg);
    println!("TRANSPORT {}", comm.transport_name());
    let hosts: Vec<String> = std::env::var("DTRAIN_TEST_HOSTS")
        .map(|h| h.split(',').map(str::to_string).collect())
        .unwrap_or_default();
    let topo = Topology::new(comm.transport_name(), comm.world_size(), &hosts);
    match scenario.as_str() {
        "half" => {
            cases::<Bf16>(&mut comm, &topo, false);
            cases::<F16>(&mut comm, &topo, false);
            cases::<Bf16>(&mut comm, &topo, true);
            cases::<F16>(&mut comm, &topo, true);
            let comm = comm.into_async();
            async_cases::<Bf16>(&comm, &topo);
            async_cases::<F16>(&comm, &topo);
        }
        other => fail(format!("unknown scenario {other}")),
    }
    println!("DONE");
    std::process::exit(0);
}

// ---- the model -------------------------------------------------------------------------

/// Which hop order the backend uses.
enum Topology {
    Shm {
        n: usize,
    },
    Tcp {
        n: usize,
    },
    /// Global ranks per host, hosts ordered by their lowest rank.
    Hierarchical {
        n: usize,
        hosts: Vec<Vec<usize>>,
    },
}

impl Topology {
    fn new(transport: &str, n: usize, host_ids: &[String]) -> Topology {
        match transport {
            "shm" => Topology::Shm { n },
            "tcp" => Topology::Tcp { n },
            "shm+tcp" => {
                let mut hosts: Vec<(String, Vec<usize>)> = Vec::new();
                for (rank, id) in host_ids.iter().enumerate() {
                    match hosts.iter_mut().find(|(h, _)| h == id) {
                        Some((_, ranks)) => ranks.push(rank),
                        None => hosts.push((id.clone(), vec![rank])),
                    }
                }
                if hosts.iter().map(|(_, r)| r.len()).sum::<usize>() != n {
                    fail("DTRAIN_TEST_HOSTS must name one host per rank");
                }
                Topology::Hierarchical {
                    n,
                    hosts: hosts.into_iter().map(|(_, r)| r).collect(),
                }
            }
            other => fail(format!("no hop-order model for transport {other}")),
        }
    }

    /// The expected value of element `i` of a `len`-element all-reduce of `xs` (one value
    /// per rank, as f64).
    fn expect<H: HalfFloat>(&self, i: usize, len: usize, xs: &[f64], op: ReduceOp) -> f64 {
        let bytes = len * 2;
        let direct_max = AlgoConfig::default().direct_allreduce_max_bytes;
        let (n, reduced) = match self {
            Topology::Shm { n } => (*n, fold::<H>(xs.iter().copied(), op)),
            Topology::Tcp { n } if bytes <= direct_max => (*n, fold::<H>(xs.iter().copied(), op)),
            Topology::Tcp { n } => (*n, ring::<H>(xs, segment_of(i, len, *n), op)),
            Topology::Hierarchical { n, hosts } => {
                let sums: Vec<f64> = hosts
                    .iter()
                    .map(|h| fold::<H>(h.iter().map(|&r| xs[r]), op))
                    .collect();
                let reduced = if bytes <= FUSED_ALL_REDUCE_MAX_BYTES || bytes <= direct_max {
                    fold::<H>(sums.iter().copied(), op)
                } else {
                    ring::<H>(&sums, segment_of(i, len, sums.len()), op)
                };
                (*n, reduced)
            }
        };
        if op == ReduceOp::Avg {
            let inv = (1.0 / n as f32) as f64;
            round::<H>(reduced * inv) // exact product of two f32 values, rounded once
        } else {
            reduced
        }
    }
}

/// f64 -> f32 (nearest even) -> 16 bits (nearest even, the conversion checked against an
/// f64 reference in the crate's unit tests).
fn round<H: HalfFloat>(x: f64) -> f64 {
    H::from_f32(x as f32).to_f32() as f64
}

/// One step `a ⊕ b`, `a` being the left operand.
fn hop<H: HalfFloat>(a: f64, b: f64, op: ReduceOp) -> f64 {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => round::<H>(a + b),
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

/// `((x0 ⊕ x1) ⊕ x2) ⊕ ...`
fn fold<H: HalfFloat>(mut xs: impl Iterator<Item = f64>, op: ReduceOp) -> f64 {
    let first = xs.next().expect("at least one rank");
    xs.fold(first, |acc, x| hop::<H>(acc, x, op))
}

/// Segment `s` of the ring: starts as rank s+1's values; each next rank computes
/// `own ⊕ incoming`, ending at rank s.
fn ring<H: HalfFloat>(xs: &[f64], s: usize, op: ReduceOp) -> f64 {
    let n = xs.len();
    let mut acc = xs[(s + 1) % n];
    for k in 2..=n {
        acc = hop::<H>(xs[(s + k) % n], acc, op);
    }
    acc
}

fn segment_of(i: usize, len: usize, parts: usize) -> usize {
    let segments = split_even(len * 2, 2, parts);
    segments
        .iter()
        .position(|s| s.contains(&(i * 2)))
        .expect("every element is in a segment")
}

// ---- inputs ----------------------------------------------------------------------------

fn mix(rank: usize, i: usize, seed: u64) -> u64 {
    let mut x = (rank as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ seed.wrapping_mul(0x1656_67B1_9E37_79F9);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    x
}

/// Rank `rank`'s input element `i`: random sign, significand and exponent over the format's
/// range (a third of the elements within a factor 8 of each other, so sums round often),
/// with specials at fixed positions.
fn value<H: HalfFloat>(rank: usize, n: usize, i: usize, seed: u64) -> H {
    let (min_exp, max_exp, max_finite) = match H::DTYPE {
        DType::BF16 => (-133, 120, f32::from_bits(0x7f7f_0000)),
        _ => (-24, 14, 65504.0),
    };
    let r = mix(rank, i, seed);
    let x = match i % 61 {
        5 if rank == 0 => f32::INFINITY,
        6 if rank == 0 => f32::INFINITY,
        6 if rank == 1 => f32::NEG_INFINITY, // inf + -inf = NaN
        7 if rank == n - 1 => f32::NAN,
        8 => max_finite, // the sum overflows to inf
        9 => -0.0,       // -0 + -0 = -0
        10 => [0.0, -0.0][rank % 2],
        _ => {
            let exp = if r.is_multiple_of(3) {
                (r >> 8) as i32 % 3
            } else {
                min_exp + ((r >> 8) % (max_exp - min_exp) as u64) as i32
            };
            let frac = 1.0 + (r >> 32) as f32 / 2f32.powi(32);
            let sign = if r & 1 == 0 { 1.0 } else { -1.0 };
            sign * frac * 2f32.powi(exp)
        }
    };
    H::from_f32(x)
}

fn inputs<H: HalfFloat>(n: usize, len: usize, seed: u64) -> Vec<Vec<H>> {
    (0..n)
        .map(|r| (0..len).map(|i| value::<H>(r, n, i, seed)).collect())
        .collect()
}

// ---- cases -----------------------------------------------------------------------------

/// Checks `got` against the model, element by element, and prints its digest.
fn check<H: HalfFloat>(label: &str, topo: &Topology, all: &[Vec<H>], got: &[H], op: ReduceOp) {
    let mut xs = vec![0f64; all.len()];
    for (i, g) in got.iter().enumerate() {
        for (x, rank_input) in xs.iter_mut().zip(all) {
            *x = rank_input[i].to_f32() as f64;
        }
        let want = topo.expect::<H>(i, got.len(), &xs, op);
        let g = g.to_f32() as f64;
        let same = (g.is_nan() && want.is_nan())
            || (g == want && g.is_sign_negative() == want.is_sign_negative());
        if !same {
            fail(format!(
                "{label}: element {i} of {} is {g:e}, the hop-order model says {want:e} (inputs {xs:?})",
                got.len()
            ));
        }
    }
    println!(
        "HASH {label} {:016x}",
        digest(bytemuck::cast_slice::<H, u8>(got))
    );
}

fn seed_of(len: usize, op: ReduceOp) -> u64 {
    len as u64 * 31 + op as u64
}

fn cases<H: HalfFloat>(comm: &mut Communicator, topo: &Topology, shared: bool) {
    let (n, rank) = (comm.world_size(), comm.rank());
    for &len in LENS {
        for op in OPS {
            let label = format!(
                "{:?}-{len}-{op:?}-{}",
                H::DTYPE,
                if shared { "shared" } else { "heap" }
            );
            let all = inputs::<H>(n, len, seed_of(len, op));
            let result = if shared {
                comm.alloc_buffer::<H>(len).and_then(|mut buf| {
                    buf.copy_from_slice(&all[rank]);
                    comm.all_reduce(&mut buf, op).map(|()| buf.to_vec())
                })
            } else {
                let mut buf = all[rank].clone();
                comm.all_reduce(&mut buf, op).map(|()| buf)
            };
            match result {
                Ok(got) => check(&label, topo, &all, &got, op),
                Err(e) => common::exit_error_with(&label, &e),
            }
        }
    }
}

fn async_cases<H: HalfFloat>(comm: &AsyncCommunicator, topo: &Topology) {
    let (n, rank) = (comm.world_size(), comm.rank());
    for &len in LENS {
        for op in OPS {
            let label = format!("{:?}-{len}-{op:?}-async", H::DTYPE);
            let all = inputs::<H>(n, len, seed_of(len, op));
            let result = comm.alloc_buffer::<H>(len).and_then(|mut buf| {
                buf.copy_from_slice(&all[rank]);
                comm.all_reduce_async(buf, op).wait()
            });
            match result {
                Ok(got) => check(&label, topo, &all, &got, op),
                Err(e) => common::exit_error_with(&label, &e),
            }
        }
    }
}

// ---- parent side -----------------------------------------------------------------------

fn run(transport: &str, hosts: &[&str], expect_transport: &str) {
    let mut spawn = Spawn::new("half", hosts.len());
    spawn.transport = transport.into();
    spawn = spawn.env("DTRAIN_TEST_HOSTS", hosts.join(","));
    let workers = (0..hosts.len())
        .map(|r| spawn.spawn_rank(r, &[("DTRAIN_HOST_ID", format!("half-{}", hosts[r]))]))
        .collect();
    let results = finish_all(workers, Duration::from_secs(600));
    assert_success_and_identical(&results);
    for r in &results {
        assert_eq!(
            r.tagged("TRANSPORT"),
            vec![expect_transport.to_string()],
            "{}",
            r.describe()
        );
        let cases = r.tagged("HASH").len();
        assert_eq!(cases, 2 * LENS.len() * OPS.len() * 3, "{}", r.describe());
    }
}

#[test]
fn shm_two_three_four_ranks() {
    for n in 2..=4 {
        run("shm", &vec!["A"; n], "shm");
    }
}

#[test]
fn tcp_two_three_four_ranks() {
    for n in 2..=4 {
        run("tcp", &vec!["A"; n], "tcp");
    }
}

#[test]
fn hierarchical_three_ranks_two_hosts() {
    run("auto", &["A", "A", "B"], "shm+tcp");
}

#[test]
fn hierarchical_four_ranks_interleaved_hosts() {
    run("auto", &["A", "B", "B", "A"], "shm+tcp");
}
