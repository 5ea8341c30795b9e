//! Worker-side battery of collective checks against locally computed references.
//!
//! Every rank can compute every rank's input (a hash of rank, index and a seed), so each rank
//! checks its own results independently: i64 exactly, f32/f64 against a naive f64 sum with a
//! rounding tolerance, moves (broadcast/gather/scatter/all-gather) exactly. Digests of all
//! results are printed so the parent can require bitwise identical results on all ranks.
#![allow(dead_code)]

use transport::{Communicator, Element, ReduceOp};

use super::{digest, fail};

fn mix(rank: usize, i: usize, seed: u64) -> u64 {
    let mut x = (rank as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (i as u64).wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
        ^ seed.wrapping_mul(0x1656_67B1_9E37_79F9);
    x ^= x >> 31;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 29;
    x
}

pub trait TestElement: Element + PartialEq + std::fmt::Debug {
    const NAME: &'static str;
    fn value(rank: usize, i: usize, seed: u64) -> Self;
    fn to_f64(self) -> f64;
    /// Checks an all-reduce result element against the inputs of all ranks.
    fn check_reduced(got: Self, inputs: &[Self], op: ReduceOp) -> Result<(), String>;
}

fn float_check(got: f64, inputs: &[f64], op: ReduceOp, eps: f64) -> Result<(), String> {
    let n = inputs.len() as f64;
    let (expect, tol) = match op {
        ReduceOp::Sum | ReduceOp::Avg => {
            let sum: f64 = inputs.iter().sum();
            let abs: f64 = inputs.iter().map(|x| x.abs()).sum();
            let scale = if op == ReduceOp::Avg { 1.0 / n } else { 1.0 };
            (sum * scale, (abs * scale) * eps * (n + 2.0) + 1e-30)
        }
        ReduceOp::Max => (inputs.iter().cloned().fold(f64::MIN, f64::max), 0.0),
        ReduceOp::Min => (inputs.iter().cloned().fold(f64::MAX, f64::min), 0.0),
    };
    if (got - expect).abs() > tol {
        return Err(format!(
            "{op:?}: got {got}, expected {expect} (tolerance {tol})"
        ));
    }
    Ok(())
}

impl TestElement for f32 {
    const NAME: &'static str = "f32";
    fn value(rank: usize, i: usize, seed: u64) -> f32 {
        ((mix(rank, i, seed) % 200_001) as f32 - 100_000.0) * 0.0137
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn check_reduced(got: f32, inputs: &[f32], op: ReduceOp) -> Result<(), String> {
        let inputs: Vec<f64> = inputs.iter().map(|&x| x as f64).collect();
        float_check(got as f64, &inputs, op, f32::EPSILON as f64)
    }
}

impl TestElement for f64 {
    const NAME: &'static str = "f64";
    fn value(rank: usize, i: usize, seed: u64) -> f64 {
        ((mix(rank, i, seed) % 2_000_000_001) as f64 - 1e9) * 1.37e-3
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn check_reduced(got: f64, inputs: &[f64], op: ReduceOp) -> Result<(), String> {
        float_check(got, inputs, op, f64::EPSILON)
    }
}

impl TestElement for i64 {
    const NAME: &'static str = "i64";
    fn value(rank: usize, i: usize, seed: u64) -> i64 {
        (mix(rank, i, seed) % 2_000_000_000_001) as i64 - 1_000_000_000_000
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn check_reduced(got: i64, inputs: &[i64], op: ReduceOp) -> Result<(), String> {
        let n = inputs.len() as i64;
        let expect = match op {
            ReduceOp::Sum => inputs.iter().sum::<i64>(),
            ReduceOp::Avg => inputs.iter().sum::<i64>() / n,
            ReduceOp::Max => *inputs.iter().max().expect("non-empty"),
            ReduceOp::Min => *inputs.iter().min().expect("non-empty"),
        };
        if got != expect {
            return Err(format!("{op:?}: got {got}, expected {expect} exactly"));
        }
        Ok(())
    }
}

fn inputs<T: TestElement>(rank: usize, len: usize, seed: u64) -> Vec<T> {
    (0..len).map(|i| T::value(rank, i, seed)).collect()
}

fn report<T: Element>(label: &str, data: &[T]) {
    println!("HASH {label} {:016x}", digest(bytemuck::cast_slice(data)));
}

fn run<R>(what: &str, r: transport::Result<R>) -> R {
    r.unwrap_or_else(|e| super::exit_error_with(what, &e))
}

pub fn check_all_reduce<T: TestElement>(
    comm: &mut Communicator,
    len: usize,
    op: ReduceOp,
    seed: u64,
) {
    let n = comm.world_size();
    let mut buf = inputs::<T>(comm.rank(), len, seed);
    run("all_reduce", comm.all_reduce(&mut buf, op));
    let all: Vec<Vec<T>> = (0..n).map(|r| inputs::<T>(r, len, seed)).collect();
    for i in 0..len {
        let column: Vec<T> = all.iter().map(|v| v[i]).collect();
        if let Err(e) = T::check_reduced(buf[i], &column, op) {
            fail(format!("all_reduce {} len {len} element {i}: {e}", T::NAME));
        }
    }
    report(&format!("all_reduce/{}/{op:?}/{len}/{seed}", T::NAME), &buf);
}

pub fn check_broadcast<T: TestElement>(
    comm: &mut Communicator,
    len: usize,
    root: usize,
    seed: u64,
) {
    let mut buf = inputs::<T>(comm.rank(), len, seed);
    run("broadcast", comm.broadcast(&mut buf, root));
    if buf != inputs::<T>(root, len, seed) {
        fail(format!(
            "broadcast {} len {len} root {root}: wrong data",
            T::NAME
        ));
    }
    report(&format!("broadcast/{}/{len}/{root}", T::NAME), &buf);
}

pub fn check_gather<T: TestElement>(comm: &mut Communicator, len: usize, root: usize, seed: u64) {
    let n = comm.world_size();
    let send = inputs::<T>(comm.rank(), len, seed);
    let mut recv = vec![T::value(99, 0, 0); n * len];
    let is_root = comm.rank() == root;
    run(
        "gather",
        comm.gather(
            &send,
            if is_root { Some(&mut recv[..]) } else { None },
            root,
        ),
    );
    if is_root {
        let expect: Vec<T> = (0..n).flat_map(|r| inputs::<T>(r, len, seed)).collect();
        if recv != expect {
            fail(format!(
                "gather {} len {len} root {root}: wrong data",
                T::NAME
            ));
        }
    }
}

pub fn check_scatter<T: TestElement>(comm: &mut Communicator, len: usize, root: usize, seed: u64) {
    let n = comm.world_size();
    let send: Vec<T> = (0..n).flat_map(|r| inputs::<T>(r, len, seed ^ 7)).collect();
    let mut recv = vec![T::value(99, 0, 0); len];
    let is_root = comm.rank() == root;
    run(
        "scatter",
        comm.scatter(
            if is_root { Some(&send[..]) } else { None },
            &mut recv,
            root,
        ),
    );
    if recv != inputs::<T>(comm.rank(), len, seed ^ 7) {
        fail(format!(
            "scatter {} len {len} root {root}: wrong data",
            T::NAME
        ));
    }
}

pub fn check_all_gather<T: TestElement>(comm: &mut Communicator, len: usize, seed: u64) {
    let n = comm.world_size();
    let send = inputs::<T>(comm.rank(), len, seed);
    let mut recv = vec![T::value(99, 0, 0); n * len];
    run("all_gather", comm.all_gather(&send, &mut recv));
    let expect: Vec<T> = (0..n).flat_map(|r| inputs::<T>(r, len, seed)).collect();
    if recv != expect {
        fail(format!("all_gather {} len {len}: wrong data", T::NAME));
    }
    report(&format!("all_gather/{}/{len}", T::NAME), &recv);
}

pub fn check_reduce_scatter<T: TestElement>(
    comm: &mut Communicator,
    len: usize,
    op: ReduceOp,
    seed: u64,
) {
    let n = comm.world_size();
    let r = comm.rank();
    let send = inputs::<T>(r, n * len, seed);
    let mut recv = vec![T::value(99, 0, 0); len];
    run("reduce_scatter", comm.reduce_scatter(&send, &mut recv, op));
    for (i, &got) in recv.iter().enumerate() {
        let column: Vec<T> = (0..n).map(|q| T::value(q, r * len + i, seed)).collect();
        if let Err(e) = T::check_reduced(got, &column, op) {
            fail(format!(
                "reduce_scatter {} len {len} element {i}: {e}",
                T::NAME
            ));
        }
    }
}

fn battery_for<T: TestElement>(comm: &mut Communicator, lens: &[usize]) {
    let n = comm.world_size();
    for (k, &len) in lens.iter().enumerate() {
        let seed = 1000 + k as u64;
        for op in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min] {
            check_all_reduce::<T>(comm, len, op, seed);
        }
        let root = (len + k) % n;
        check_broadcast::<T>(comm, len, root, seed);
        check_gather::<T>(comm, len, root, seed);
        check_scatter::<T>(comm, len, (root + 1) % n, seed);
        check_all_gather::<T>(comm, len, seed);
        check_reduce_scatter::<T>(comm, len, ReduceOp::Sum, seed);
        check_reduce_scatter::<T>(comm, len.min(1000), ReduceOp::Max, seed);
        run("barrier", comm.barrier());
    }
}

/// Every collective, f32/f64/i64, lengths 0, 1, 7, 1023 and `big` elements.
pub fn full_battery(comm: &mut Communicator, big: usize) {
    let lens = [0, 1, 7, 1023, big];
    battery_for::<f32>(comm, &lens);
    battery_for::<f64>(comm, &lens);
    battery_for::<i64>(comm, &lens);
    check_argument_errors(comm);
}

/// All-reduce of a window `[at, at + len)` of a buffer from `alloc_buffer`; rank `heap_rank`
/// (if any) uses an ordinary `Vec` instead and rank `shifted_rank` (if any) another offset,
/// so the transport must fall back to its staged path on every rank.
fn check_all_reduce_in_buffer<T: TestElement>(
    comm: &mut Communicator,
    buf: &mut transport::Buffer<T>,
    (at, len): (usize, usize),
    op: ReduceOp,
    seed: u64,
    (heap_rank, shifted_rank): (Option<usize>, Option<usize>),
) {
    let (n, rank) = (comm.world_size(), comm.rank());
    let at = if shifted_rank == Some(rank) {
        at + 16
    } else {
        at
    };
    let mine = inputs::<T>(rank, len, seed);
    let result: Vec<T> = if heap_rank == Some(rank) {
        let mut v = mine;
        run("all_reduce", comm.all_reduce(&mut v, op));
        v
    } else {
        let window = &mut buf[at..at + len];
        window.copy_from_slice(&mine);
        run("all_reduce", comm.all_reduce(window, op));
        window.to_vec()
    };
    let all: Vec<Vec<T>> = (0..n).map(|r| inputs::<T>(r, len, seed)).collect();
    for i in 0..len {
        let column: Vec<T> = all.iter().map(|v| v[i]).collect();
        if let Err(e) = T::check_reduced(result[i], &column, op) {
            fail(format!(
                "all_reduce in buffer {} len {len} element {i}: {e}",
                T::NAME
            ));
        }
    }
    report(&format!("shared/{}/{op:?}/{len}/{seed}", T::NAME), &result);
}

fn shared_battery_for<T: TestElement>(comm: &mut Communicator, lens: &[usize]) {
    let max = lens.iter().copied().max().unwrap_or(0);
    let mut buf = run("alloc_buffer", comm.alloc_buffer::<T>(max + 64));
    println!("SHARED {}", buf.is_shared());
    let n = comm.world_size();
    for (k, &len) in lens.iter().enumerate() {
        let seed = 7000 + k as u64;
        for (j, op) in [ReduceOp::Sum, ReduceOp::Avg, ReduceOp::Max, ReduceOp::Min]
            .into_iter()
            .enumerate()
        {
            let at = [0, 3, 16, 48][j];
            check_all_reduce_in_buffer(comm, &mut buf, (at, len), op, seed, (None, None));
        }
        // Fallbacks: one rank's buffer is not shared, or is at another offset.
        let odd = Some(k % n);
        check_all_reduce_in_buffer(comm, &mut buf, (0, len), ReduceOp::Sum, seed, (odd, None));
        check_all_reduce_in_buffer(comm, &mut buf, (0, len), ReduceOp::Sum, seed, (None, odd));
    }
}

/// All-reduce in buffers from `alloc_buffer` (zero-copy on shared memory): f32/f64/i64,
/// every op, windows at several offsets, lengths around the one-shot threshold and `big`,
/// fallbacks when ranks disagree, and the same buffer rewritten right after each of many
/// back-to-back all-reduces (a rank must not leave before peers finished reading it).
pub fn shared_buffer_battery(comm: &mut Communicator, big: usize) {
    let lens = [0, 1, 7, 1023, 70_000, big, big + 13];
    shared_battery_for::<f32>(comm, &lens);
    shared_battery_for::<f64>(comm, &lens);
    shared_battery_for::<i64>(comm, &lens);
    let mut buf = run("alloc_buffer", comm.alloc_buffer::<i64>(big));
    for it in 0..20u64 {
        let len = big - (it as usize * 977) % (big / 2);
        check_all_reduce_in_buffer(
            comm,
            &mut buf,
            (0, len),
            ReduceOp::Sum,
            9000 + it,
            (None, None),
        );
    }
}

/// A buffer from `alloc_buffer` all-reduced through the communication thread, as DDP does.
pub fn shared_buffer_async(comm: Communicator, len: usize) {
    let rank = comm.rank();
    let comm = comm.into_async();
    let mut buf = run("alloc_buffer", comm.alloc_buffer::<f32>(len));
    buf.copy_from_slice(&inputs::<f32>(rank, len, 77));
    let got = comm
        .all_reduce_async(buf, ReduceOp::Sum)
        .wait()
        .unwrap_or_else(|e| super::exit_error_with("all_reduce_async", &e));
    let all: Vec<Vec<f32>> = (0..comm.world_size())
        .map(|r| inputs::<f32>(r, len, 77))
        .collect();
    for i in 0..len {
        let column: Vec<f32> = all.iter().map(|v| v[i]).collect();
        if let Err(e) = f32::check_reduced(got[i], &column, ReduceOp::Sum) {
            fail(format!(
                "async all_reduce of a shared buffer element {i}: {e}"
            ));
        }
    }
    report("shared/async", &got);
    run("barrier", comm.run(|c| c.barrier()));
}

/// All-reduces `buf` (Avg) until a collective fails, then exits with that error; prints
/// `READY` after three rounds so the parent knows every rank is inside the loop.
pub fn all_reduce_until_error(comm: &mut Communicator, buf: &mut [f32]) -> ! {
    let mut iterations = 0u64;
    loop {
        if let Err(e) = comm.all_reduce(buf, ReduceOp::Avg) {
            super::exit_error(&e);
        }
        iterations += 1;
        if iterations == 3 {
            println!("READY");
        }
    }
}

/// Argument errors are caught locally, on every rank, before any communication.
pub fn check_argument_errors(comm: &mut Communicator) {
    let n = comm.world_size();
    let expect_invalid = |what: &str, r: transport::Result<()>| match r {
        Err(transport::Error::InvalidArgument(msg)) => println!("INVALID {what}: {msg}"),
        other => fail(format!("{what}: expected InvalidArgument, got {other:?}")),
    };
    let mut buf = vec![0f32; 4];
    expect_invalid("broadcast root", comm.broadcast(&mut buf, n));
    let mut small = vec![0f32; 4 * n + 1];
    expect_invalid("all_gather length", comm.all_gather(&buf, &mut small));
    expect_invalid(
        "reduce_scatter length",
        comm.reduce_scatter(&small, &mut buf, ReduceOp::Sum),
    );
    let mut recv = vec![0f32; 4];
    expect_invalid(
        "gather root recv missing",
        comm.gather(&buf, None, comm.rank()),
    );
    expect_invalid(
        "scatter root send missing",
        comm.scatter(None, &mut recv, comm.rank()),
    );
    expect_invalid("gather root", comm.gather(&buf, None, n + 3));
    let mut bytes = vec![0u8; 3];
    expect_invalid("u8 all_reduce", comm.all_reduce(&mut bytes, ReduceOp::Sum));
    // The communicator still works after rejected calls.
    check_all_reduce::<f32>(comm, 5, ReduceOp::Sum, 5);
}

/// Many back-to-back collectives of varying sizes (same sequence on every rank).
pub fn back_to_back(comm: &mut Communicator, iterations: usize) {
    let n = comm.world_size();
    let mut state: u64 = 0x1234_5678;
    for it in 0..iterations {
        state = mix(it, state as usize, 3);
        let len = if state.is_multiple_of(10) {
            20_000 + (state % 200_000) as usize
        } else {
            (state % 3000) as usize
        };
        let seed = 5000 + it as u64;
        match it % 5 {
            0 => check_all_reduce::<f32>(comm, len, ReduceOp::Sum, seed),
            1 => check_broadcast::<i64>(comm, len, it % n, seed),
            2 => check_all_gather::<f64>(comm, len / 4, seed),
            3 => check_all_reduce::<i64>(comm, len, ReduceOp::Max, seed),
            _ => check_reduce_scatter::<f32>(comm, len / 8, ReduceOp::Sum, seed),
        }
    }
}

/// Several async all-reduces in flight, waited out of order, then a `run` after them.
pub fn async_ops(comm: Communicator) {
    let n = comm.world_size();
    let rank = comm.rank();
    let comm = comm.into_async();
    let lens = [10usize, 100_000, 3, 70_000, 0];
    let pending: Vec<_> = lens
        .iter()
        .enumerate()
        .map(|(k, &len)| {
            comm.all_reduce_async(inputs::<f32>(rank, len, 900 + k as u64), ReduceOp::Sum)
        })
        .collect();
    for (k, p) in pending.into_iter().enumerate().rev() {
        let got = p
            .wait()
            .unwrap_or_else(|e| super::exit_error_with("all_reduce_async", &e));
        if got.len() != lens[k] {
            fail(format!(
                "all_reduce_async #{k} returned {} elements",
                got.len()
            ));
        }
        for (i, &value) in got.iter().enumerate() {
            let column: Vec<f32> = (0..n).map(|r| f32::value(r, i, 900 + k as u64)).collect();
            if let Err(e) = f32::check_reduced(value, &column, ReduceOp::Sum) {
                fail(format!("all_reduce_async #{k} element {i}: {e}"));
            }
        }
        report(&format!("async/{k}"), &got);
    }
    let world = comm
        .run(|c| {
            c.barrier()?;
            Ok(c.world_size())
        })
        .unwrap_or_else(|e| super::exit_error_with("run", &e));
    if world != n || comm.world_size() != n || comm.rank() != rank {
        fail("async communicator reports the wrong rank / world size");
    }
}
