//! Collective algorithms written once, over a small point-to-point interface.
//!
//! Any transport that can move framed byte messages between two ranks implements
//! [`PointToPoint`]; [`P2pBackend`] then turns it into a full [`Backend`]. Each algorithm is
//! one short file:
//! - [`point_to_point`]: the interface itself ([`PointToPoint`], [`Pipeline`]) and how buffers
//!   are cut into blocks and pieces; below the algorithms and [`P2pBackend`] alike.
//! - [`ring`]: ring reduce-scatter and all-gather (the two halves of the ring all-reduce) as
//!   one [`Pipeline`] of pieces, so sending, receiving and reducing overlap.
//! - [`ring_allreduce`]: reduce-scatter + all-gather for large buffers, and a one-shot
//!   "gather everything, reduce in rank order" path for small ones.
//! - [`halving_doubling`]: recursive halving + doubling all-reduce, `2 log2 n` steps instead
//!   of the ring's `2 (n - 1)`; used for large f32/f64/i64 buffers when `n` is a power of
//!   two, at least 4. Half-precision all-reduces keep the ring: they round after every hop, and the
//!   ring's hop order is the one their accuracy is documented and tested for.
//! - [`cost_model`]: the α-β cost of each all-reduce algorithm (for `dtrain bench --simulate`).
//! - [`broadcast`]: direct sends from the root for small buffers, a pipelined chain for large.
//! - [`gather_scatter`]: direct sends to / from the root.
//! - [`barrier`]: dissemination barrier (ceil(log2 n) rounds of empty messages).
//!
//! **Determinism.** Every all-reduce result is computed once and then copied as bytes, or
//! computed by every rank in the same (rank) order, so all ranks end with bitwise identical
//! buffers. The exact sum orders are documented in [`ring_allreduce`].

pub mod barrier;
pub mod broadcast;
pub mod cost_model;
pub mod gather_scatter;
pub mod halving_doubling;
pub mod point_to_point;
pub mod ring;
pub mod ring_allreduce;

pub use point_to_point::{piece, piece_count, split_even, Pipeline, PointToPoint, SendRecv};

use std::ops::Range;

use crate::{Backend, DType, ReduceOp, Result};

/// Size thresholds that pick between algorithms.
#[derive(Clone, Copy, Debug)]
pub struct AlgoConfig {
    /// All-reduce of at most this many bytes uses the one-shot gather-and-reduce path.
    pub direct_allreduce_max_bytes: usize,
    /// Broadcast of more than this many bytes uses the pipelined chain.
    pub chain_broadcast_min_bytes: usize,
    /// Pipelining granularity of ring steps and chain broadcast.
    pub piece_bytes: usize,
    /// Larger all-reduces use halving-doubling instead of the ring where it wins
    /// ([`halving_doubling::halving_doubling_wins`]).
    pub halving_doubling: bool,
}

impl Default for AlgoConfig {
    fn default() -> Self {
        AlgoConfig {
            direct_allreduce_max_bytes: 64 * 1024,
            chain_broadcast_min_bytes: 256 * 1024,
            piece_bytes: 256 * 1024,
            halving_doubling: true,
        }
    }
}

/// A [`Backend`] built from any [`PointToPoint`] transport and the algorithms in this module.
pub struct P2pBackend<P: PointToPoint> {
    pub p2p: P,
    pub config: AlgoConfig,
    scratch: Vec<u8>,
    scratch2: Vec<u8>,
}

impl<P: PointToPoint> P2pBackend<P> {
    pub fn new(p2p: P, config: AlgoConfig) -> Self {
        P2pBackend {
            p2p,
            config,
            scratch: Vec::new(),
            scratch2: Vec::new(),
        }
    }
}

impl<P: PointToPoint> Backend for P2pBackend<P> {
    fn rank(&self) -> usize {
        self.p2p.rank()
    }
    fn world_size(&self) -> usize {
        self.p2p.world_size()
    }
    fn all_reduce(&mut self, buf: &mut [u8], dtype: DType, op: ReduceOp) -> Result<()> {
        self.p2p.set_op("all_reduce");
        if buf.len() <= self.config.direct_allreduce_max_bytes {
            ring_allreduce::direct_all_reduce(
                &mut self.p2p,
                buf,
                dtype,
                op,
                self.config.piece_bytes,
                &mut self.scratch,
            )
        } else if self.config.halving_doubling
            && !matches!(dtype, DType::BF16 | DType::F16)
            && halving_doubling::halving_doubling_wins(self.p2p.world_size())
        {
            halving_doubling::halving_doubling_all_reduce(
                &mut self.p2p,
                buf,
                dtype,
                op,
                &mut self.scratch,
            )
        } else {
            ring_allreduce::ring_all_reduce(
                &mut self.p2p,
                buf,
                dtype,
                op,
                self.config.piece_bytes,
                &mut self.scratch,
            )
        }
    }
    fn broadcast(&mut self, buf: &mut [u8], root: usize) -> Result<()> {
        self.p2p.set_op("broadcast");
        if buf.len() < self.config.chain_broadcast_min_bytes {
            broadcast::direct_broadcast(&mut self.p2p, buf, root)
        } else {
            broadcast::chain_broadcast(&mut self.p2p, buf, root, self.config.piece_bytes)
        }
    }
    fn gather(&mut self, send: &[u8], recv: Option<&mut [u8]>, root: usize) -> Result<()> {
        self.p2p.set_op("gather");
        gather_scatter::direct_gather(&mut self.p2p, send, recv, root)
    }
    fn scatter(&mut self, send: Option<&[u8]>, recv: &mut [u8], root: usize) -> Result<()> {
        self.p2p.set_op("scatter");
        gather_scatter::direct_scatter(&mut self.p2p, send, recv, root)
    }
    fn all_gather(&mut self, send: &[u8], recv: &mut [u8]) -> Result<()> {
        self.p2p.set_op("all_gather");
        let n = self.p2p.world_size();
        let r = self.p2p.rank();
        let len = send.len();
        recv[r * len..(r + 1) * len].copy_from_slice(send);
        let blocks: Vec<Range<usize>> = (0..n).map(|i| i * len..(i + 1) * len).collect();
        ring::ring_all_gather_in_place(&mut self.p2p, recv, &blocks, 1, self.config.piece_bytes)
    }
    fn reduce_scatter(
        &mut self,
        send: &[u8],
        recv: &mut [u8],
        dtype: DType,
        op: ReduceOp,
    ) -> Result<()> {
        self.p2p.set_op("reduce_scatter");
        let n = self.p2p.world_size();
        let r = self.p2p.rank();
        let len = recv.len();
        // The ring reduces in place; keep the caller's send buffer intact.
        self.scratch2.clear();
        self.scratch2.extend_from_slice(send);
        let blocks: Vec<Range<usize>> = (0..n).map(|i| i * len..(i + 1) * len).collect();
        ring::ring_reduce_scatter_in_place(
            &mut self.p2p,
            &mut self.scratch2,
            &blocks,
            dtype,
            op,
            self.config.piece_bytes,
            &mut self.scratch,
        )?;
        recv.copy_from_slice(&self.scratch2[blocks[r].clone()]);
        crate::reduce::scale_for_avg(recv, dtype, op, n);
        Ok(())
    }
    fn barrier(&mut self) -> Result<()> {
        self.p2p.set_op("barrier");
        barrier::dissemination_barrier(&mut self.p2p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_even_covers_buffer_with_aligned_ranges() {
        let r = split_even(7 * 4, 4, 3);
        assert_eq!(r, vec![0..8, 8..16, 16..28]);
        let r = split_even(0, 8, 4);
        assert!(r.iter().all(|x| x.is_empty()));
        let r = split_even(2 * 8, 8, 4);
        assert_eq!(r.iter().map(|x| x.len()).sum::<usize>(), 16);
    }

    #[test]
    fn pieces_partition_range() {
        let range = 12..12 + 4 * 1001;
        let n = 7;
        let mut next = range.start;
        for j in 0..n {
            let p = piece(&range, j, n, 4);
            assert_eq!(p.start, next);
            assert_eq!(p.len() % 4, 0);
            next = p.end;
        }
        assert_eq!(next, range.end);
        assert_eq!(piece_count(&[0..10, 0..0], 4), 3);
        assert_eq!(piece_count(&[0..0, 0..0], 4), 1);
    }

    /// In-process transport: one unbounded channel per ordered rank pair.
    struct ChannelP2p {
        rank: usize,
        world_size: usize,
        to: Vec<std::sync::mpsc::Sender<Vec<u8>>>,
        from: Vec<std::sync::mpsc::Receiver<Vec<u8>>>,
    }

    impl PointToPoint for ChannelP2p {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world_size(&self) -> usize {
            self.world_size
        }
        fn set_op(&mut self, _what: &'static str) {}
        /// Sends never block (unbounded channels), so running the plan in order — each
        /// send once its receives are in — cannot deadlock.
        fn pipeline(&mut self, to: usize, from: usize, plan: &mut dyn Pipeline) -> Result<()> {
            let mut received = 0;
            let recv_one = |me: &mut Self, plan: &mut dyn Pipeline, j: usize| {
                let msg = me.from[from].recv().expect("peer alive");
                let buf = plan.recv_buf(j);
                assert_eq!(msg.len(), buf.len(), "rank {} from {from}: length", me.rank);
                buf.copy_from_slice(&msg);
                plan.received(j);
            };
            for i in 0..plan.sends() {
                while received < plan.send_after(i) {
                    recv_one(self, plan, received);
                    received += 1;
                }
                self.to[to]
                    .send(plan.send_buf(i).to_vec())
                    .expect("peer alive");
            }
            while received < plan.recvs() {
                recv_one(self, plan, received);
                received += 1;
            }
            Ok(())
        }
    }

    fn channel_world(n: usize) -> Vec<ChannelP2p> {
        let mut senders: Vec<Vec<Option<std::sync::mpsc::Sender<Vec<u8>>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        let mut receivers: Vec<Vec<Option<std::sync::mpsc::Receiver<Vec<u8>>>>> =
            (0..n).map(|_| (0..n).map(|_| None).collect()).collect();
        for a in 0..n {
            for b in 0..n {
                let (tx, rx) = std::sync::mpsc::channel();
                senders[a][b] = Some(tx);
                receivers[b][a] = Some(rx);
            }
        }
        (0..n)
            .map(|r| ChannelP2p {
                rank: r,
                world_size: n,
                to: senders[r].iter_mut().map(|s| s.take().unwrap()).collect(),
                from: receivers[r].iter_mut().map(|s| s.take().unwrap()).collect(),
            })
            .collect()
    }

    fn value(rank: usize, i: usize) -> i64 {
        (rank as i64 + 1) * 1_000_003 - (i as i64) * 7919 * (rank as i64 % 3 - 1)
    }

    /// Runs `f(rank's P2p)` on `n` threads joined by channels; results in rank order.
    fn on_threads<R: Send + 'static>(
        n: usize,
        f: impl Fn(&mut ChannelP2p) -> R + Send + Clone + 'static,
    ) -> Vec<R> {
        let handles: Vec<_> = channel_world(n)
            .into_iter()
            .map(|mut p2p| {
                let f = f.clone();
                std::thread::spawn(move || f(&mut p2p))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    /// Halving-doubling on 1..=9 ranks (powers of two and not: folded pairs), every length
    /// 0..=23 (blocks of zero or one element): the exact i64 sum on every rank.
    #[test]
    fn halving_doubling_is_exact_on_one_to_nine_ranks() {
        for n in 1..=9 {
            for len in 0..=23usize {
                let got = on_threads(n, move |p2p| {
                    let r = p2p.rank;
                    let mut buf: Vec<i64> = (0..len).map(|i| value(r, i)).collect();
                    halving_doubling::halving_doubling_all_reduce(
                        p2p,
                        bytemuck::cast_slice_mut(&mut buf),
                        DType::I64,
                        ReduceOp::Sum,
                        &mut Vec::new(),
                    )
                    .unwrap();
                    buf
                });
                let sum: Vec<i64> = (0..len)
                    .map(|i| (0..n).map(|q| value(q, i)).sum())
                    .collect();
                for (r, buf) in got.iter().enumerate() {
                    assert_eq!(buf, &sum, "n {n} len {len} rank {r}");
                }
            }
        }
    }

    /// f32 `Avg`: every rank ends with the same bits, within f32 rounding of the ring's
    /// result (the two sum in different orders).
    #[test]
    fn halving_doubling_f32_is_identical_on_every_rank_and_close_to_the_ring() {
        for n in [2, 3, 4, 5, 7, 8, 9] {
            let len = 1000;
            let input = move |r: usize| -> Vec<f32> {
                (0..len)
                    .map(|i| ((r * 7919 + i * 104729) % 1013) as f32 / 97.0 - 5.0)
                    .collect()
            };
            let run = move |hd: bool| {
                on_threads(n, move |p2p| {
                    let mut buf = input(p2p.rank);
                    let bytes = bytemuck::cast_slice_mut(&mut buf);
                    let mut scratch = Vec::new();
                    if hd {
                        halving_doubling::halving_doubling_all_reduce(
                            p2p,
                            bytes,
                            DType::F32,
                            ReduceOp::Avg,
                            &mut scratch,
                        )
                    } else {
                        ring_allreduce::ring_all_reduce(
                            p2p,
                            bytes,
                            DType::F32,
                            ReduceOp::Avg,
                            64,
                            &mut scratch,
                        )
                    }
                    .unwrap();
                    buf
                })
            };
            let (hd, ring) = (run(true), run(false));
            for (r, buf) in hd.iter().enumerate() {
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(buf),
                    bits(&hd[0]),
                    "n {n}: rank {r} differs from rank 0"
                );
            }
            for (i, (a, b)) in hd[0].iter().zip(&ring[0]).enumerate() {
                let exact: f64 = (0..n).map(|r| input(r)[i] as f64).sum::<f64>() / n as f64;
                let bound = 4.0 * n as f64 * f32::EPSILON as f64 * 5.5;
                assert!(
                    (*a as f64 - exact).abs() <= bound,
                    "n {n} [{i}]: {a} vs {exact}"
                );
                assert!(
                    (*a - *b).abs() as f64 <= 2.0 * bound,
                    "n {n} [{i}]: {a} vs ring {b}"
                );
            }
        }
    }

    /// Ring (tiny pieces: many pieces, some empty) and direct all-reduce, chain and direct
    /// broadcast, all-gather, reduce-scatter, gather/scatter and barrier on 1..=5 threads,
    /// every length 0..=23: exact i64 results.
    #[test]
    fn algorithms_are_exact_over_an_in_process_transport() {
        for n in 1..=5 {
            for len in 0..=23usize {
                for (direct_max, piece) in [(0usize, 8usize), (usize::MAX, 16), (0, 1 << 20)] {
                    let config = AlgoConfig {
                        direct_allreduce_max_bytes: direct_max,
                        chain_broadcast_min_bytes: if direct_max == 0 { 0 } else { usize::MAX },
                        piece_bytes: piece,
                        halving_doubling: direct_max == 0,
                    };
                    let handles: Vec<_> = channel_world(n)
                        .into_iter()
                        .map(|p2p| {
                            std::thread::spawn(move || {
                                let r = p2p.rank;
                                let mut b = P2pBackend::new(p2p, config);
                                let mut buf: Vec<i64> = (0..len).map(|i| value(r, i)).collect();
                                b.all_reduce(
                                    bytemuck::cast_slice_mut(&mut buf),
                                    DType::I64,
                                    ReduceOp::Sum,
                                )
                                .unwrap();
                                let mut bc: Vec<i64> = (0..len).map(|i| value(r, i)).collect();
                                b.broadcast(bytemuck::cast_slice_mut(&mut bc), n - 1)
                                    .unwrap();
                                let mine: Vec<i64> = (0..len).map(|i| value(r, i)).collect();
                                let mut all = vec![0i64; n * len];
                                b.all_gather(
                                    bytemuck::cast_slice(&mine),
                                    bytemuck::cast_slice_mut(&mut all),
                                )
                                .unwrap();
                                let send: Vec<i64> = (0..n * len).map(|i| value(r, i)).collect();
                                let mut rs = vec![0i64; len];
                                b.reduce_scatter(
                                    bytemuck::cast_slice(&send),
                                    bytemuck::cast_slice_mut(&mut rs),
                                    DType::I64,
                                    ReduceOp::Max,
                                )
                                .unwrap();
                                let mut gathered = vec![0i64; n * len];
                                let root = len % n;
                                b.gather(
                                    bytemuck::cast_slice(&mine),
                                    (r == root).then_some(bytemuck::cast_slice_mut(&mut gathered)),
                                    root,
                                )
                                .unwrap();
                                let mut scattered = vec![0i64; len];
                                b.scatter(
                                    (r == root).then_some(bytemuck::cast_slice(&send)),
                                    bytemuck::cast_slice_mut(&mut scattered),
                                    root,
                                )
                                .unwrap();
                                b.barrier().unwrap();
                                (r, buf, bc, all, rs, gathered, scattered)
                            })
                        })
                        .collect();
                    for h in handles {
                        let (r, buf, bc, all, rs, gathered, scattered) = h.join().unwrap();
                        let ctx = format!(
                            "n {n} len {len} rank {r} direct_max {direct_max} piece {piece}"
                        );
                        let sum: Vec<i64> = (0..len)
                            .map(|i| (0..n).map(|q| value(q, i)).sum())
                            .collect();
                        assert_eq!(buf, sum, "all_reduce {ctx}");
                        let root_vals: Vec<i64> = (0..len).map(|i| value(n - 1, i)).collect();
                        assert_eq!(bc, root_vals, "broadcast {ctx}");
                        let every: Vec<i64> = (0..n)
                            .flat_map(|q| (0..len).map(move |i| value(q, i)))
                            .collect();
                        assert_eq!(all, every, "all_gather {ctx}");
                        let max: Vec<i64> = (0..len)
                            .map(|i| (0..n).map(|q| value(q, r * len + i)).max().unwrap())
                            .collect();
                        assert_eq!(rs, max, "reduce_scatter {ctx}");
                        if r == len % n {
                            assert_eq!(gathered, every, "gather {ctx}");
                        }
                        let block: Vec<i64> =
                            (0..len).map(|i| value(len % n, r * len + i)).collect();
                        assert_eq!(scattered, block, "scatter {ctx}");
                    }
                }
            }
        }
    }
}
