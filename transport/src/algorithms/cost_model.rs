//! The α-β cost of each all-reduce algorithm: `α` the per-message latency of a link, `β` its
//! seconds per byte; every rank sends and receives at once (full duplex), reductions are
//! free. For predicting scale on paper (`dtrain bench --simulate`), not for timing.

use super::halving_doubling::halving_doubling_wins;

/// One link between hosts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// One-way latency of a message, seconds.
    pub latency_s: f64,
    /// Bytes per second in each direction.
    pub bytes_per_s: f64,
}

/// The all-reduce algorithms dtrain has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AllReduceAlgo {
    /// Reduce-scatter + all-gather around a ring: `2 (n-1)` steps of `S/n`.
    Ring,
    /// Recursive halving + doubling: `2 log2 p` steps moving `2 (p-1)/p · S` in all, plus a
    /// whole-buffer fold in and out when `n` is not a power of two.
    HalvingDoubling,
    /// Binomial tree reduce then broadcast of the whole buffer: `2 ceil(log2 n)` steps of `S`.
    Tree,
}

impl AllReduceAlgo {
    pub const ALL: [AllReduceAlgo; 3] = [Self::Ring, Self::HalvingDoubling, Self::Tree];

    pub fn name(self) -> &'static str {
        match self {
            Self::Ring => "ring",
            Self::HalvingDoubling => "halving-doubling",
            Self::Tree => "tree",
        }
    }

    /// Predicted seconds to all-reduce `bytes` over `n` hosts on `link`.
    pub fn seconds(self, n: usize, bytes: f64, link: Link) -> f64 {
        if n <= 1 {
            return 0.0;
        }
        let (a, b) = (link.latency_s, 1.0 / link.bytes_per_s);
        let nf = n as f64;
        match self {
            Self::Ring => 2.0 * (nf - 1.0) * (a + bytes / nf * b),
            Self::HalvingDoubling => {
                let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
                let pf = p as f64;
                let fold = if p == n { 0.0 } else { 2.0 * (a + bytes * b) };
                2.0 * pf.log2() * a + 2.0 * (pf - 1.0) / pf * bytes * b + fold
            }
            Self::Tree => 2.0 * nf.log2().ceil() * (a + bytes * b),
        }
    }
}

/// The algorithm dtrain's TCP backend runs for a large all-reduce over `n` ranks.
pub fn chosen_algo(n: usize) -> AllReduceAlgo {
    if halving_doubling_wins(n) {
        AllReduceAlgo::HalvingDoubling
    } else {
        AllReduceAlgo::Ring
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GBIT: Link = Link {
        latency_s: 50e-6,
        bytes_per_s: 125e6,
    };

    #[test]
    fn two_hosts_cost_the_same_for_ring_and_halving_doubling() {
        let s = 36.9e6;
        let ring = AllReduceAlgo::Ring.seconds(2, s, GBIT);
        let hd = AllReduceAlgo::HalvingDoubling.seconds(2, s, GBIT);
        assert!((ring - hd).abs() < 1e-12, "{ring} {hd}");
        // One round trip of the whole buffer each way: 2·(α + S/2·β).
        assert!((ring - 2.0 * (50e-6 + s / 2.0 / 125e6)).abs() < 1e-12);
        assert_eq!(AllReduceAlgo::Tree.seconds(1, s, GBIT), 0.0);
    }

    #[test]
    fn halving_doubling_wins_on_latency_at_powers_of_two_and_loses_on_folds() {
        let small = 4096.0;
        for n in [4, 8, 64, 1024] {
            let ring = AllReduceAlgo::Ring.seconds(n, small, GBIT);
            let hd = AllReduceAlgo::HalvingDoubling.seconds(n, small, GBIT);
            assert!(hd < ring, "n {n}: hd {hd} ring {ring}");
            assert_eq!(chosen_algo(n), AllReduceAlgo::HalvingDoubling);
        }
        // A fold moves the whole buffer twice more: a large buffer on 5 hosts is the ring's.
        let big = 36.9e6;
        let ring = AllReduceAlgo::Ring.seconds(5, big, GBIT);
        let hd = AllReduceAlgo::HalvingDoubling.seconds(5, big, GBIT);
        assert!(ring < hd, "{ring} {hd}");
        assert_eq!(chosen_algo(5), AllReduceAlgo::Ring);
        assert_eq!(chosen_algo(2), AllReduceAlgo::Ring);
        // The tree moves the whole buffer every step: never better for big buffers.
        assert!(AllReduceAlgo::Tree.seconds(8, big, GBIT) > ring);
    }
}
