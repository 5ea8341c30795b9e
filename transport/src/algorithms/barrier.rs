//! Dissemination barrier: in round `k` (distance `d = 2^k`) rank `r` sends an empty message to
//! `r + d` and waits for one from `r - d`. After `ceil(log2 n)` rounds every rank has
//! (transitively) heard from every other, so nobody leaves before everyone has arrived.

use super::PointToPoint;
use crate::Result;

pub fn dissemination_barrier<P: PointToPoint + ?Sized>(p2p: &mut P) -> Result<()> {
    let n = p2p.world_size();
    let r = p2p.rank();
    let mut distance = 1;
    while distance < n {
        p2p.send_recv((r + distance) % n, &[], (r + n - distance) % n, &mut [])?;
        distance *= 2;
    }
    Ok(())
}
