//! Bids and grants: how the origin's egress budget is split among peers.
//!
//! Every interval, each peer bids the bits it wants from the origin: the blocks
//! it is missing whose deadlines fall before the swarm can be expected to deliver
//! them (see [`crate::peer::Peer::bid`]). The server collects the bids and splits
//! its budget max-min fairly with [`allocate`]: small bids are met in full, and
//! what remains is shared equally among the larger ones. It then enforces the
//! grants: a fetch beyond a grant is refused.
//!
//! Gap fill fetches whole blocks, so a grant smaller than a block is worth
//! nothing. [`allocate_units`] splits the budget in whole units (one block with
//! its overhead): when the budget covers only a few blocks and many peers bid,
//! the blocks go one each to some of the cut bidders, in turn across intervals,
//! rather than a useless crumb to every one of them.

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

/// Splits `budget` bits among `bids` in whole units of `unit` bits, max-min
/// fairly by units.
///
/// A bid asks for `bits.div_ceil(unit)` units. Every bid gets the water level
/// `L` (or its whole ask, if smaller), where `L` is the largest level the
/// budget covers; the units left below the next level go one each to cut bids,
/// starting at index `*cursor % bids.len()` and wrapping. The cursor is left
/// just after the last bid served so, kept from one interval to the next, it
/// hands the spare units round in turn. Every grant is a whole number
/// of units, at most the bid rounded up to a unit, and the grants sum to at most
/// `budget`. A `unit` of 0 falls back to [`allocate`]. Grants come back in the
/// order of the bids.
pub fn allocate_units(budget: u64, bids: &[Bid], unit: u64, cursor: &mut usize) -> Vec<Grant> {
    if unit == 0 {
        return allocate(budget, bids);
    }
    let bids = &bids[..bids.len().min(MAX_BIDS)];
    let asks: Vec<u64> = bids.iter().map(|b| b.bits.div_ceil(unit)).collect();
    let units = budget / unit;
    let fill = |level: u64| -> u64 { asks.iter().map(|a| (*a).min(level)).sum() };
    // Largest level whose fill fits the budget (fill is monotone in level).
    let (mut lo, mut hi) = (0u64, asks.iter().copied().max().unwrap_or(0));
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        if fill(mid) <= units {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    let level = lo;
    let mut given: Vec<u64> = asks.iter().map(|a| (*a).min(level)).collect();
    let mut left = units - given.iter().sum::<u64>();
    let n = bids.len();
    let start = if n == 0 { 0 } else { *cursor % n };
    for k in 0..n {
        if left == 0 {
            break;
        }
        let i = (start + k) % n;
        if asks[i] > given[i] {
            given[i] += 1;
            left -= 1;
            *cursor = i + 1;
        }
    }
    bids.iter()
        .zip(given)
        .map(|(b, g)| Grant {
            peer: b.peer,
            bits: g * unit,
        })
        .collect()
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

    #[test]
    fn a_budget_of_a_few_blocks_is_not_split_into_useless_crumbs() {
        let unit = 1_000;
        let bids: Vec<Bid> = (0..10)
            .map(|p| Bid {
                peer: p,
                bits: 3 * unit,
            })
            .collect();
        // Four blocks' worth among ten bidders: plain max-min gives everyone
        // 400 bits, less than a block; whole units give four of them a block.
        assert!(allocate(4 * unit, &bids).iter().all(|g| g.bits < unit));
        let mut cursor = 0;
        let g = allocate_units(4 * unit + 999, &bids, unit, &mut cursor);
        let got: Vec<u64> = g.iter().map(|g| g.bits / unit).collect();
        assert_eq!(got, vec![1, 1, 1, 1, 0, 0, 0, 0, 0, 0]);
        // The cursor carries over: the next interval serves the next bidders.
        let g = allocate_units(4 * unit, &bids, unit, &mut cursor);
        let got: Vec<u64> = g.iter().map(|g| g.bits / unit).collect();
        assert_eq!(got, vec![0, 0, 0, 0, 1, 1, 1, 1, 0, 0]);
        let g = allocate_units(4 * unit, &bids, unit, &mut cursor);
        let got: Vec<u64> = g.iter().map(|g| g.bits / unit).collect();
        assert_eq!(got, vec![1, 1, 0, 0, 0, 0, 0, 0, 1, 1]);
        // Plenty of budget: small asks in full, the rest share the level.
        let mixed = [
            Bid { peer: 1, bits: 500 },
            Bid {
                peer: 2,
                bits: 9 * unit,
            },
            Bid {
                peer: 3,
                bits: 9 * unit,
            },
        ];
        let g = allocate_units(8 * unit, &mixed, unit, &mut 0);
        assert_eq!(
            g.iter().map(|g| g.bits).collect::<Vec<_>>(),
            vec![unit, 4 * unit, 3 * unit]
        );
        assert!(allocate_units(5, &[], unit, &mut 3).is_empty());
    }

    proptest! {
        #[test]
        fn unit_grants_are_whole_bounded_and_max_min_fair(budget in 0u64..200_000,
                                                          unit in 1u64..5_000,
                                                          rotate in 0usize..100,
                                                          bits in proptest::collection::vec(0u64..50_000, 0..50)) {
            let bids: Vec<Bid> = bits.iter().enumerate().map(|(i, b)| Bid { peer: i as u64, bits: *b }).collect();
            let g = allocate_units(budget, &bids, unit, &mut { rotate });
            prop_assert_eq!(g.len(), bids.len());
            prop_assert!(g.iter().map(|g| g.bits).sum::<u64>() <= budget);
            for (gi, bi) in g.iter().zip(&bids) {
                prop_assert_eq!(gi.peer, bi.peer);
                prop_assert_eq!(gi.bits % unit, 0);
                prop_assert!(gi.bits <= bi.bits.div_ceil(unit) * unit);
                if gi.bits < bi.bits {
                    // A cut bid is within one unit of everyone else.
                    prop_assert!(g.iter().all(|o| o.bits <= gi.bits + unit));
                }
            }
            // No whole unit of budget is left while bids are unmet.
            let unmet = g.iter().zip(&bids).any(|(gi, bi)| gi.bits < bi.bits);
            if unmet {
                prop_assert!(budget - g.iter().map(|g| g.bits).sum::<u64>() < unit);
            }
        }

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
