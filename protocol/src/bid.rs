//! Bids and grants: how the origin's egress budget is split among peers.
//!
//! Every interval, each peer bids the bits it wants from the origin: the blocks
//! it is missing whose deadlines fall before the swarm can be expected to deliver
//! them (see [`crate::peer::Peer::bid`]). The server collects the bids and splits
//! its budget max-min fairly with [`allocate`]: small bids are met in full, and
//! what remains is shared equally among the larger ones. It then enforces the
//! grants: a fetch beyond a grant is refused.

use crate::signal::PeerId;

/// Most bids one allocation considers; more are cut to the smallest ones.
pub const MAX_BIDS: usize = 1 << 20;

/// What a peer asks of the origin for one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bid {
    /// The bidder.
    pub peer: PeerId,
    /// Bits wanted in the interval.
    pub bits: u64,
}

/// What the origin allows a peer in one interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    /// The bidder.
    pub peer: PeerId,
    /// Bits allowed in the interval.
    pub bits: u64,
}

/// Splits `budget` bits among `bids`, max-min fairly (water filling).
///
/// Every grant is at most its bid, the grants sum to at most the budget, and a
/// bid that is cut gets at least as much as any other grant. Grants come back in
/// the order of the bids.
pub fn allocate(budget: u64, bids: &[Bid]) -> Vec<Grant> {
    let bids = &bids[..bids.len().min(MAX_BIDS)];
    let mut order: Vec<usize> = (0..bids.len()).collect();
    order.sort_by_key(|&i| bids[i].bits);
    let mut grants: Vec<Grant> = bids
        .iter()
        .map(|b| Grant {
            peer: b.peer,
            bits: 0,
        })
        .collect();
    let mut left = budget;
    let mut remaining = order.len() as u64;
    for i in order {
        let share = left / remaining;
        let g = bids[i].bits.min(share);
        grants[i].bits = g;
        left -= g;
        remaining -= 1;
    }
    grants
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_bids_are_met_and_large_ones_share_the_rest() {
        let bids = [
            Bid { peer: 1, bits: 100 },
            Bid {
                peer: 2,
                bits: 10_000,
            },
            Bid {
                peer: 3,
                bits: 50_000,
            },
        ];
        let g = allocate(10_100, &bids);
        assert_eq!(
            g.iter().map(|g| g.bits).collect::<Vec<_>>(),
            vec![100, 5_000, 5_000]
        );
        let all = allocate(1_000_000, &bids);
        assert!(all.iter().zip(&bids).all(|(g, b)| g.bits == b.bits));
        assert!(allocate(0, &bids).iter().all(|g| g.bits == 0));
        assert!(allocate(5, &[]).is_empty());
    }

    proptest! {
        #[test]
        fn grants_are_bounded_and_max_min_fair(budget in 0u64..1_000_000,
                                               bits in proptest::collection::vec(0u64..100_000, 0..50)) {
            let bids: Vec<Bid> = bits.iter().enumerate().map(|(i, b)| Bid { peer: i as u64, bits: *b }).collect();
            let g = allocate(budget, &bids);
            prop_assert_eq!(g.len(), bids.len());
            prop_assert!(g.iter().map(|g| g.bits).sum::<u64>() <= budget);
            for (gi, bi) in g.iter().zip(&bids) {
                prop_assert_eq!(gi.peer, bi.peer);
                prop_assert!(gi.bits <= bi.bits);
                if gi.bits < bi.bits {
                    // A cut bid gets at least what anyone else gets.
                    prop_assert!(g.iter().all(|o| o.bits <= gi.bits + 1));
                }
            }
            // No budget is wasted while bids are unmet (up to rounding).
            let unmet = g.iter().zip(&bids).any(|(gi, bi)| gi.bits < bi.bits);
            if unmet {
                prop_assert!(budget - g.iter().map(|g| g.bits).sum::<u64>() < bids.len() as u64);
            }
        }
    }
}
