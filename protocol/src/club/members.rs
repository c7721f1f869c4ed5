//! One club's members, kept in the orders that link picks compare.
//!
//! Every pick in [`Membership`](super::Membership) wants the member with the
//! lowest load of some kind that is not excluded (already linked, the peer
//! itself, a failed remote). Exclusions are few (bounded by a peer's degree),
//! so walking an ordered set from its smallest key finds the pick after a few
//! steps instead of a scan of the club. Members whose in-club degree is short
//! of the target are kept in their own set, so a repair visits only them.
//!
//! Ties are broken by a hash of a per-peer salt (drawn from the caller's RNG
//! at join), the club and the load, so equal members are taken in a random
//! order that changes with every load level.

use std::collections::{BTreeMap, BTreeSet};

use crate::signal::PeerId;

/// What a member's place in the orders depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Load {
    /// Below [`LEAF_CAPACITY_PCT`](super::LEAF_CAPACITY_PCT): never uploads.
    pub leaf: bool,
    /// Upload capacity in % of the bitrate, at least 1.
    pub capacity: usize,
    /// Per-peer tie-break salt.
    pub salt: u64,
    /// In-club download links from other members (the seeder not counted).
    pub ins: usize,
    /// In-club upload links.
    pub outs: usize,
    /// Upload asked of it over all clubs, in
    /// [`STREAM_UNITS`](super::STREAM_UNITS) per club stream.
    pub units: usize,
}

/// Score, tie-break, peer.
type Key = (usize, u64, PeerId);

/// Weight of a leaf's load when picking a last-hop source: leaves serve only
/// when nobody else can.
const LEAF_SOURCE_PENALTY: usize = 1 << 30;

/// A club's members and its indexes over them.
#[derive(Debug, Default)]
pub(super) struct Members {
    club: u16,
    /// Join order, with holes filled by the last member on a leave.
    order: Vec<PeerId>,
    /// Position of each member in `order`.
    pos: BTreeMap<PeerId, usize>,
    /// Members that upload, by upload asked per unit of capacity.
    uploaders: BTreeSet<Key>,
    /// Members by in-club download links: relays, then leaves.
    receivers: [BTreeSet<Key>; 2],
    /// Relays by capacity, the largest first.
    strongest: BTreeSet<Key>,
    /// Members by upload asked per unit of capacity, leaves last.
    sources: BTreeSet<Key>,
    /// Members with fewer than the target number of download links, or (if
    /// they upload) of upload links.
    short: BTreeSet<PeerId>,
    /// Members the seeder pushes to.
    seeds: BTreeSet<PeerId>,
}

impl Members {
    pub(super) fn new(club: u16) -> Self {
        Members {
            club,
            ..Members::default()
        }
    }

    pub(super) fn len(&self) -> usize {
        self.order.len()
    }

    pub(super) fn contains(&self, p: PeerId) -> bool {
        self.pos.contains_key(&p)
    }

    /// Members in join order (the last one joined most recently, unless a
    /// leave moved it into a hole).
    pub(super) fn as_slice(&self) -> &[PeerId] {
        &self.order
    }

    /// Adds `p` at the end of the order; its keys come with [`Self::index`].
    pub(super) fn push(&mut self, p: PeerId) {
        if self.pos.insert(p, self.order.len()).is_none() {
            self.order.push(p);
        }
    }

    /// Removes `p`, whose keys must be gone already ([`Self::unindex`]).
    pub(super) fn remove(&mut self, p: PeerId) {
        let Some(i) = self.pos.remove(&p) else {
            return;
        };
        self.order.swap_remove(i);
        if let Some(&moved) = self.order.get(i) {
            self.pos.insert(moved, i);
        }
    }

    /// Files member `p` under `load`; `target` is the in-club degree wanted.
    pub(super) fn index(&mut self, p: PeerId, load: &Load, target: usize) {
        let k = self.keys(p, load, target);
        if let Some(up) = k.uploader {
            self.uploaders.insert(up);
        }
        if let Some(n) = k.strongest {
            self.strongest.insert(n);
        }
        self.receivers[usize::from(load.leaf)].insert(k.receiver);
        self.sources.insert(k.source);
        if k.short {
            self.short.insert(p);
        }
    }

    /// Takes member `p`, filed under `load`, out of every order.
    pub(super) fn unindex(&mut self, p: PeerId, load: &Load, target: usize) {
        let k = self.keys(p, load, target);
        if let Some(up) = k.uploader {
            self.uploaders.remove(&up);
        }
        if let Some(n) = k.strongest {
            self.strongest.remove(&n);
        }
        self.receivers[usize::from(load.leaf)].remove(&k.receiver);
        self.sources.remove(&k.source);
        self.short.remove(&p);
    }

    /// The uploader with the least upload asked of it per capacity.
    pub(super) fn least_loaded_uploader(
        &self,
        excluded: impl Fn(PeerId) -> bool,
    ) -> Option<PeerId> {
        first(&self.uploaders, &excluded).map(|k| k.2)
    }

    /// The member with the fewest download links, relay or leaf.
    pub(super) fn least_fed(&self, excluded: impl Fn(PeerId) -> bool) -> Option<PeerId> {
        let relay = first(&self.receivers[0], &excluded);
        let leaf = first(&self.receivers[1], &excluded);
        match (relay, leaf) {
            (Some(a), Some(b)) => Some(a.min(b).2),
            (a, b) => a.or(b).map(|k| k.2),
        }
    }

    /// The next seed: the relay with the most capacity that is not a seed
    /// yet, or failing that the leaf with the fewest download links.
    pub(super) fn next_seed(&self, excluded: impl Fn(PeerId) -> bool) -> Option<PeerId> {
        let excluded = |m| self.seeds.contains(&m) || excluded(m);
        first(&self.strongest, &excluded)
            .or_else(|| first(&self.receivers[1], &excluded))
            .map(|k| k.2)
    }

    /// The member with the least upload asked of it per capacity, leaves last.
    pub(super) fn least_loaded_source(&self, excluded: impl Fn(PeerId) -> bool) -> Option<PeerId> {
        first(&self.sources, &excluded).map(|k| k.2)
    }

    /// Members short of links, for a repair to visit.
    pub(super) fn short(&self) -> Vec<PeerId> {
        self.short.iter().copied().collect()
    }

    /// The relay with the most capacity that is not a seed yet.
    pub(super) fn next_relay_seed(&self, excluded: impl Fn(PeerId) -> bool) -> Option<PeerId> {
        let excluded = |m| self.seeds.contains(&m) || excluded(m);
        first(&self.strongest, &excluded).map(|k| k.2)
    }

    /// The members the seeder pushes to.
    pub(super) fn seeds(&self) -> impl Iterator<Item = PeerId> + '_ {
        self.seeds.iter().copied()
    }

    /// Up to `n` members with upload asked of them, the busiest first (leaves
    /// come before every relay; idle leaves are skipped).
    pub(super) fn busiest(&self, n: usize) -> Vec<PeerId> {
        self.sources
            .iter()
            .rev()
            .filter(|k| k.0 != LEAF_SOURCE_PENALTY)
            .take(n)
            .map(|k| k.2)
            .collect()
    }

    pub(super) fn seed_count(&self) -> usize {
        self.seeds.len()
    }

    pub(super) fn set_seed(&mut self, p: PeerId, seed: bool) {
        if seed {
            self.seeds.insert(p);
        } else {
            self.seeds.remove(&p);
        }
    }

    fn keys(&self, p: PeerId, load: &Load, target: usize) -> Keys {
        let key = |order: u64, score: usize| (score, self.tiebreak(load.salt, order, score), p);
        // Both picks compare the whole upload asked of a member (in-club
        // children and last-hop shares, over all its clubs) per capacity, so
        // a member busy with subscribers gets fewer children and vice versa.
        let busy = load.units * 100 / load.capacity;
        Keys {
            uploader: (!load.leaf).then(|| key(0, busy)),
            strongest: (!load.leaf).then(|| key(3, usize::MAX - load.capacity)),
            receiver: key(1, load.ins),
            source: key(
                2,
                if load.leaf {
                    LEAF_SOURCE_PENALTY + busy
                } else {
                    busy
                },
            ),
            short: load.ins < target || (!load.leaf && load.outs < target),
        }
    }

    fn tiebreak(&self, salt: u64, order: u64, score: usize) -> u64 {
        mix(salt
            ^ (u64::from(self.club) << 48)
            ^ (order << 40)
            ^ (score as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
    }

    /// Panics unless the indexes match those rebuilt from `loads`, one per member.
    #[cfg(test)]
    pub(super) fn assert_indexed(&self, loads: &[(PeerId, Load)], target: usize, seeds: &[PeerId]) {
        let mut fresh = Members::new(self.club);
        for (p, load) in loads {
            fresh.push(*p);
            fresh.index(*p, load, target);
        }
        let c = self.club;
        assert_eq!(self.len(), loads.len(), "club {c} size");
        for (i, p) in self.order.iter().enumerate() {
            assert_eq!(self.pos.get(p), Some(&i), "club {c}: position of {p}");
        }
        assert!(self.uploaders == fresh.uploaders, "club {c}: uploaders");
        assert!(self.receivers == fresh.receivers, "club {c}: receivers");
        assert!(self.strongest == fresh.strongest, "club {c}: strongest");
        assert!(self.sources == fresh.sources, "club {c}: sources");
        assert!(self.short == fresh.short, "club {c}: short members");
        let seeds: BTreeSet<PeerId> = seeds.iter().copied().collect();
        assert!(self.seeds == seeds, "club {c}: seeds");
    }
}

struct Keys {
    uploader: Option<Key>,
    strongest: Option<Key>,
    receiver: Key,
    source: Key,
    short: bool,
}

fn first(set: &BTreeSet<Key>, excluded: &impl Fn(PeerId) -> bool) -> Option<Key> {
    set.iter().find(|k| !excluded(k.2)).copied()
}

/// SplitMix64's finalizer: spreads the bits of `x` over the whole word.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
