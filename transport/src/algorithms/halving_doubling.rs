//! All-reduce by recursive halving then recursive doubling (Rabenseifner's algorithm).
//!
//! With `p` the largest power of two `<= n`: the first `2 (n - p)` ranks pair up and each even
//! one folds its buffer into its odd neighbour (`n - p` extra ranks sit out the middle).
//! The `p` remaining ranks then run `log2 p` **halving** steps — exchange half of the
//! current range with the partner at distance `p/2, p/4, …, 1`, keep and reduce the other
//! half — after which rank `v` (numbered among the `p`) holds the full reduction of block `v`
//! of `p` element-aligned blocks; `Avg` is scaled there, once. `log2 p` **doubling** steps
//! (distance `1, 2, …, p/2`) gather the blocks back as bytes, and the odd ranks of the folded
//! pairs send the result to their even neighbours.
//!
//! Each rank sends `2 (p-1)/p` of the buffer (plus one whole buffer on the folded pairs), as
//! the ring does, in `2 log2 p` latency-bound steps instead of the ring's `2 (n - 1)`: it wins
//! when `n` is a power of two >= 4 and latency matters (many hosts, small buckets).
//!
//! **Determinism.** Every block is reduced at one rank only and then copied as bytes, so all
//! ranks end with bitwise identical buffers. The sum order of block `b` follows the halving
//! tree (pairs, then pairs of pairs…), so it differs from the ring's by f32 rounding only.

use super::{split_even, PointToPoint};
use crate::reduce::{reduce_into, scale_for_avg};
use crate::{DType, ReduceOp, Result};

/// Where a rank stands in the power-of-two core of the algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// Folds its buffer into `rank + 1` and waits for the result from it.
    Folded,
    /// Takes part as virtual rank `v` (of `p`); with `Some(r)`, also folds rank `r` in.
    Core { v: usize, partner_of: Option<usize> },
}

/// Largest power of two `<= n` (`n >= 1`).
fn core_size(n: usize) -> usize {
    1 << (usize::BITS - 1 - n.leading_zeros())
}

fn role(rank: usize, n: usize) -> Role {
    let extra = n - core_size(n);
    if rank < 2 * extra {
        match rank % 2 {
            0 => Role::Folded,
            _ => Role::Core {
                v: rank / 2,
                partner_of: Some(rank - 1),
            },
        }
    } else {
        Role::Core {
            v: rank - extra,
            partner_of: None,
        }
    }
}

/// The real rank of virtual rank `v`.
fn real_rank(v: usize, n: usize) -> usize {
    let extra = n - core_size(n);
    if v < extra {
        2 * v + 1
    } else {
        v + extra
    }
}

pub fn halving_doubling_all_reduce<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let n = p2p.world_size();
    if n == 1 {
        return Ok(());
    }
    let len = buf.len();
    match role(p2p.rank(), n) {
        Role::Folded => {
            let to = p2p.rank() + 1;
            p2p.send(to, buf)?;
            p2p.recv(to, buf)
        }
        Role::Core { v, partner_of } => {
            if let Some(from) = partner_of {
                scratch.clear();
                scratch.resize(len, 0);
                p2p.recv(from, scratch)?;
                reduce_into(buf, scratch, dtype, op);
            }
            core_all_reduce(p2p, v, buf, dtype, op, scratch)?;
            match partner_of {
                Some(to) => p2p.send(to, buf),
                None => Ok(()),
            }
        }
    }
}

/// Halving then doubling among the `p` core ranks; this one is virtual rank `v`.
fn core_all_reduce<P: PointToPoint + ?Sized>(
    p2p: &mut P,
    v: usize,
    buf: &mut [u8],
    dtype: DType,
    op: ReduceOp,
    scratch: &mut Vec<u8>,
) -> Result<()> {
    let n = p2p.world_size();
    let p = core_size(n);
    let blocks = split_even(buf.len(), dtype.size(), p);
    let bytes = |lo: usize, hi: usize| blocks[lo].start..blocks[hi - 1].end;
    // Halving: keep the half of [lo, hi) on this rank's side of `mask`, reduce the partner's
    // copy of it in, send the other half.
    let (mut lo, mut hi) = (0, p);
    let mut mask = p / 2;
    while mask > 0 {
        let peer = real_rank(v ^ mask, n);
        let mid = lo + (hi - lo) / 2;
        let (keep, give) = match v & mask {
            0 => ((lo, mid), (mid, hi)),
            _ => ((mid, hi), (lo, mid)),
        };
        let (k, g) = (bytes(keep.0, keep.1), bytes(give.0, give.1));
        scratch.clear();
        scratch.resize(k.len(), 0);
        p2p.send_recv(peer, &buf[g], peer, scratch)?;
        reduce_into(&mut buf[k], scratch, dtype, op);
        (lo, hi) = keep;
        mask /= 2;
    }
    debug_assert_eq!((lo, hi), (v, v + 1));
    scale_for_avg(&mut buf[blocks[v].clone()], dtype, op, n);
    // Doubling: swap the ranges held so far with the partner at distance 1, 2, …, p/2.
    let mut mask = 1;
    while mask < p {
        let peer = real_rank(v ^ mask, n);
        // [lo, hi) is `mask` blocks aligned to `mask`, and so is the partner's.
        let plo = lo ^ mask;
        let phi = plo + mask;
        let (mine, theirs) = (bytes(lo, hi), bytes(plo, phi));
        scratch.clear();
        scratch.resize(theirs.len(), 0);
        p2p.send_recv(peer, &buf[mine], peer, scratch)?;
        buf[theirs].copy_from_slice(scratch);
        (lo, hi) = (lo.min(plo), hi.max(phi));
        mask *= 2;
    }
    Ok(())
}

/// Whether halving-doubling should replace the ring for `n` ranks: the same bytes per rank
/// in fewer latency-bound steps, when there is no fold (a power of two) and the ring would
/// take more steps (`n >= 4`).
pub fn halving_doubling_wins(n: usize) -> bool {
    n >= 4 && n.is_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_cover_every_virtual_rank_once() {
        for n in 1..=40 {
            let p = core_size(n);
            assert!(p <= n && 2 * p > n, "n {n}");
            let mut seen = vec![false; p];
            for r in 0..n {
                match role(r, n) {
                    Role::Folded => assert_eq!(role(r + 1, n).partner_of(), Some(r), "n {n}"),
                    Role::Core { v, .. } => {
                        assert!(!seen[v], "n {n} v {v}");
                        seen[v] = true;
                        assert_eq!(real_rank(v, n), r, "n {n}");
                    }
                }
            }
            assert!(seen.iter().all(|&s| s), "n {n}");
        }
    }

    impl Role {
        fn partner_of(self) -> Option<usize> {
            match self {
                Role::Core { partner_of, .. } => partner_of,
                Role::Folded => None,
            }
        }
    }
}
