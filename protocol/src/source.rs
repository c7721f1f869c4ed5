//! The source's state machine, run by the server's seeder.
//!
//! The seeder is a peer with id [`SEEDER_PEER_ID`](crate::signal::SEEDER_PEER_ID). Its links come from
//! [`crate::club::Membership`]: `Upload { club }` to the club's seeds, and
//! `Subscriber` to non-members of a club that has no members yet. For each new
//! block it pushes to `k` seeds of the block's club, rotating through them so the
//! load spreads, and to the last-hop subscribers whose share the block is in.
//! Its upload is therefore about k × bitrate, whatever the number of viewers.
//!
//! A seed whose send buffer stays over [`SEED_MAX_BUFFERED`] is skipped; after
//! [`SLOW_STRIKES`] skips in a row it is reported as [`SourceEvent::SlowSeed`],
//! and the server replaces it. The seeder's memory never grows with a slow peer.

use std::collections::{BTreeMap, VecDeque};

use crate::club::club_of;
use crate::signal::{Link, LinkOp, LinkRole, PeerId};

/// Send buffer above which a seed is skipped for a block.
pub const SEED_MAX_BUFFERED: usize = 256 * 1024;
/// Skips in a row after which a seed is reported as slow.
pub const SLOW_STRIKES: u32 = 8;
/// Pushes queued before the driver drains them; beyond it the oldest go.
pub const MAX_SOURCE_TRANSMITS: usize = 8192;

/// A push the driver must send: block `seq` to peer `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Push {
    /// The recipient.
    pub to: PeerId,
    /// The block.
    pub seq: u64,
}

/// Something the server must act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceEvent {
    /// This seed cannot keep up; replace it.
    SlowSeed(PeerId),
}

#[derive(Debug, Default)]
struct Target {
    roles: Vec<LinkRole>,
    open: bool,
    buffered: usize,
    strikes: u32,
}

/// Which peers get each block first.
#[derive(Debug)]
pub struct Source {
    clubs: u16,
    k: usize,
    targets: BTreeMap<PeerId, Target>,
    rotation: Vec<usize>,
    pushes: VecDeque<Push>,
    events: VecDeque<SourceEvent>,
}

impl Source {
    /// A source for `clubs` clubs pushing each block to `k` seeds.
    pub fn new(clubs: u16, k: u8) -> Self {
        Source {
            clubs: clubs.max(1),
            k: usize::from(k.max(1)),
            targets: BTreeMap::new(),
            rotation: vec![0; usize::from(clubs.max(1))],
            pushes: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// A link role of the seeder was added or removed.
    pub fn handle_link(&mut self, op: LinkOp, link: Link) {
        match op {
            LinkOp::Add => {
                let t = self.targets.entry(link.peer).or_default();
                if !t.roles.contains(&link.role) {
                    t.roles.push(link.role);
                }
            }
            LinkOp::Remove => {
                if let Some(t) = self.targets.get_mut(&link.peer) {
                    t.roles.retain(|r| *r != link.role);
                    if t.roles.is_empty() {
                        self.targets.remove(&link.peer);
                    }
                }
            }
        }
    }

    /// The data channel to `peer` opened or closed.
    pub fn handle_link_open(&mut self, peer: PeerId, open: bool) {
        if let Some(t) = self.targets.get_mut(&peer) {
            t.open = open;
            t.buffered = 0;
            t.strikes = 0;
        }
    }

    /// The link's send buffer now holds `buffered` bytes.
    pub fn handle_link_buffered(&mut self, peer: PeerId, buffered: usize) {
        if let Some(t) = self.targets.get_mut(&peer) {
            t.buffered = buffered;
        }
    }

    /// Peers with at least one role.
    pub fn peers(&self) -> Vec<PeerId> {
        self.targets.keys().copied().collect()
    }

    /// A new block of `len` bytes: queue its pushes.
    pub fn handle_block(&mut self, seq: u64, len: usize) {
        let c = club_of(seq, self.clubs);
        let share_idx = seq / u64::from(self.clubs);
        let seeds: Vec<PeerId> = self
            .targets
            .iter()
            .filter(|(_, t)| t.roles.contains(&LinkRole::Upload { club: c }))
            .map(|(p, _)| *p)
            .collect();
        let mut sent = 0;
        if !seeds.is_empty() {
            let start = self.rotation[usize::from(c)] % seeds.len();
            self.rotation[usize::from(c)] = self.rotation[usize::from(c)].wrapping_add(1);
            for i in 0..seeds.len() {
                if sent == self.k {
                    break;
                }
                let p = seeds[(start + i) % seeds.len()];
                if self.try_push(p, seq, len, SEED_MAX_BUFFERED) {
                    sent += 1;
                }
            }
        }
        let subs: Vec<PeerId> = self
            .targets
            .iter()
            .filter(|(_, t)| {
                t.roles.iter().any(|r| {
                    matches!(*r, LinkRole::Subscriber { club, share, share_count }
                        if club == c && share_idx % u64::from(share_count.max(1)) == u64::from(share))
                })
            })
            .map(|(p, _)| *p)
            .collect();
        for p in subs {
            self.try_push(p, seq, len, SEED_MAX_BUFFERED);
        }
    }

    fn try_push(&mut self, p: PeerId, seq: u64, len: usize, limit: usize) -> bool {
        let Some(t) = self.targets.get_mut(&p) else {
            return false;
        };
        if !t.open {
            return false;
        }
        if t.buffered >= limit {
            t.strikes += 1;
            if t.strikes == SLOW_STRIKES {
                self.events.push_back(SourceEvent::SlowSeed(p));
            }
            return false;
        }
        t.strikes = 0;
        t.buffered += len;
        if self.pushes.len() >= MAX_SOURCE_TRANSMITS {
            self.pushes.pop_front();
        }
        self.pushes.push_back(Push { to: p, seq });
        true
    }

    /// Next push to send.
    #[must_use]
    pub fn poll_push(&mut self) -> Option<Push> {
        self.pushes.pop_front()
    }

    /// Next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SourceEvent> {
        self.events.pop_front()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn link(peer: PeerId, role: LinkRole) -> Link {
        Link {
            peer,
            role,
            offer: false,
        }
    }

    fn drain(s: &mut Source) -> Vec<Push> {
        std::iter::from_fn(|| s.poll_push()).collect()
    }

    #[test]
    fn pushes_to_k_seeds_rotating() {
        let mut s = Source::new(2, 2);
        for p in 1..=3 {
            s.handle_link(LinkOp::Add, link(p, LinkRole::Upload { club: 0 }));
            s.handle_link_open(p, true);
        }
        s.handle_link(LinkOp::Add, link(9, LinkRole::Upload { club: 1 }));
        s.handle_link_open(9, true);
        let mut counts = [0; 4];
        for seq in (0..60).step_by(2) {
            s.handle_block(seq, 100);
            let pushes = drain(&mut s);
            assert_eq!(pushes.len(), 2, "k seeds per block");
            for p in pushes {
                counts[p.to as usize] += 1;
                s.handle_link_buffered(p.to, 0);
            }
        }
        assert_eq!(counts[1..], [20, 20, 20], "rotation spreads the load");
        s.handle_block(1, 100);
        assert_eq!(drain(&mut s), vec![Push { to: 9, seq: 1 }]);
    }

    #[test]
    fn slow_seed_is_skipped_then_reported() {
        let mut s = Source::new(1, 1);
        for p in 1..=2 {
            s.handle_link(LinkOp::Add, link(p, LinkRole::Upload { club: 0 }));
            s.handle_link_open(p, true);
        }
        s.handle_link_buffered(1, SEED_MAX_BUFFERED);
        for seq in 0..(2 * SLOW_STRIKES as u64) {
            s.handle_block(seq, 10);
            assert!(drain(&mut s).iter().all(|p| p.to == 2));
            s.handle_link_buffered(2, 0);
        }
        assert_eq!(s.poll_event(), Some(SourceEvent::SlowSeed(1)));
    }

    #[test]
    fn last_hop_subscribers_get_their_share() {
        let mut s = Source::new(4, 2);
        let sub = |share| LinkRole::Subscriber {
            club: 1,
            share,
            share_count: 2,
        };
        s.handle_link(LinkOp::Add, link(5, sub(0)));
        s.handle_link(LinkOp::Add, link(6, sub(1)));
        s.handle_link_open(5, true);
        s.handle_link_open(6, true);
        s.handle_block(1, 10); // share index 0
        s.handle_block(5, 10); // share index 1
        s.handle_block(2, 10); // another club
        assert_eq!(
            drain(&mut s),
            vec![Push { to: 5, seq: 1 }, Push { to: 6, seq: 5 }]
        );
    }

    #[test]
    fn the_oldest_pushes_go_when_the_driver_falls_behind() {
        let mut s = Source::new(1, 1);
        s.handle_link(LinkOp::Add, link(1, LinkRole::Upload { club: 0 }));
        s.handle_link_open(1, true);
        let blocks = MAX_SOURCE_TRANSMITS as u64 + 100;
        for seq in 0..blocks {
            s.handle_block(seq, 1);
            s.handle_link_buffered(1, 0);
        }
        let pushes = drain(&mut s);
        assert_eq!(pushes.len(), MAX_SOURCE_TRANSMITS);
        assert_eq!(pushes[0].seq, 100, "the oldest went");
        assert_eq!(pushes.last().map(|p| p.seq), Some(blocks - 1));
    }

    /// An operation on the source, as the seeder's driver makes them.
    #[derive(Debug, Clone)]
    enum Op {
        Add(PeerId, LinkRole),
        Remove(PeerId, LinkRole),
        Open(PeerId, bool),
        Buffered(PeerId, usize),
        Block(u64, usize),
    }

    const PEERS: PeerId = 7;
    const CLUBS: u16 = 4;

    /// Peer `p` is a member of the clubs `c` with `(p + c)` even, as in a real
    /// membership: the seeder uploads to a club's members and serves the
    /// others as a last hop, never both.
    fn member(p: PeerId, club: u16) -> bool {
        (p + u64::from(club)) % 2 == 0
    }

    fn role() -> impl Strategy<Value = (PeerId, LinkRole)> {
        (1..=PEERS, 0..CLUBS, 1u8..4, 0u8..4).prop_map(|(p, club, share_count, share)| {
            let role = if member(p, club) {
                LinkRole::Upload { club }
            } else {
                LinkRole::Subscriber {
                    club,
                    // Now and then a share the count does not cover: it matches no block.
                    share: share % (share_count + 1),
                    share_count,
                }
            };
            (p, role)
        })
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => role().prop_map(|(p, r)| Op::Add(p, r)),
            1 => role().prop_map(|(p, r)| Op::Remove(p, r)),
            2 => (1..=PEERS, proptest::bool::weighted(0.8)).prop_map(|(p, o)| Op::Open(p, o)),
            3 => (1..=PEERS, prop_oneof![Just(0), Just(SEED_MAX_BUFFERED - 1),
                                         Just(SEED_MAX_BUFFERED), Just(4 * SEED_MAX_BUFFERED)])
                .prop_map(|(p, b)| Op::Buffered(p, b)),
            8 => (0u64..256, 1usize..70_000).prop_map(|(seq, len)| Op::Block(seq, len)),
        ]
    }

    /// What the test knows of a target, kept from the operations alone.
    #[derive(Debug, Default)]
    struct Shadow {
        roles: Vec<LinkRole>,
        open: bool,
        buffered: usize,
        /// Blocks since the last push or open/close for which the source may
        /// have tried it while it was full: at least its strikes.
        may_skip: u32,
        /// Those for which it certainly tried it (a subscriber whose share the
        /// block is in, or a seed of a club with at most `k` seeds): at most
        /// its strikes.
        sure_skip: u32,
        reported: bool,
    }

    proptest! {
        #[test]
        fn any_sequence_of_operations_keeps_the_seeding_rules(
            k in 1u8..4,
            ops in proptest::collection::vec(op(), 1..300),
        ) {
            let mut s = Source::new(CLUBS, k);
            let mut shadow: BTreeMap<PeerId, Shadow> = BTreeMap::new();
            for op in ops {
                match op {
                    Op::Add(p, r) => {
                        s.handle_link(LinkOp::Add, link(p, r));
                        let t = shadow.entry(p).or_default();
                        if !t.roles.contains(&r) {
                            t.roles.push(r);
                        }
                    }
                    Op::Remove(p, r) => {
                        s.handle_link(LinkOp::Remove, link(p, r));
                        if let Some(t) = shadow.get_mut(&p) {
                            t.roles.retain(|x| *x != r);
                            if t.roles.is_empty() {
                                shadow.remove(&p);
                            }
                        }
                    }
                    Op::Open(p, o) => {
                        s.handle_link_open(p, o);
                        if let Some(t) = shadow.get_mut(&p) {
                            let roles = std::mem::take(&mut t.roles);
                            *t = Shadow { roles, open: o, ..Shadow::default() };
                        }
                    }
                    Op::Buffered(p, b) => {
                        s.handle_link_buffered(p, b);
                        if let Some(t) = shadow.get_mut(&p) {
                            t.buffered = b;
                        }
                    }
                    Op::Block(seq, len) => {
                        let c = club_of(seq, CLUBS);
                        let idx = seq / u64::from(CLUBS);
                        let seeds: Vec<PeerId> = shadow.iter()
                            .filter(|(_, t)| t.roles.contains(&LinkRole::Upload { club: c }))
                            .map(|(p, _)| *p).collect();
                        let subs: Vec<PeerId> = shadow.iter()
                            .filter(|(_, t)| t.roles.iter().any(|r| matches!(*r,
                                LinkRole::Subscriber { club, share, share_count }
                                    if club == c
                                        && idx % u64::from(share_count) == u64::from(share))))
                            .map(|(p, _)| *p).collect();
                        let ready = |p: &PeerId| {
                            let t = &shadow[p];
                            t.open && t.buffered < SEED_MAX_BUFFERED
                        };
                        let ready_seeds: Vec<PeerId> =
                            seeds.iter().copied().filter(ready).collect();
                        let ready_subs: Vec<PeerId> = subs.iter().copied().filter(ready).collect();

                        s.handle_block(seq, len);
                        let pushes = drain(&mut s);
                        let to: Vec<PeerId> = pushes.iter().map(|p| p.to).collect();
                        prop_assert!(pushes.iter().all(|p| p.seq == seq));
                        // Club seeds first: min(k, ready) of them, then every
                        // ready subscriber whose share the block is in.
                        let n_seeds = ready_seeds.len().min(usize::from(k));
                        prop_assert_eq!(to.len(), n_seeds + ready_subs.len(), "pushes {:?}", to);
                        prop_assert!(to[..n_seeds].iter().all(|p| ready_seeds.contains(p)));
                        prop_assert_eq!(&to[n_seeds..], &ready_subs[..]);
                        let mut distinct = to.clone();
                        distinct.sort_unstable();
                        distinct.dedup();
                        prop_assert_eq!(distinct.len(), to.len(), "one push per peer");

                        for p in seeds.iter().chain(&subs) {
                            let t = shadow.get_mut(p).expect("a target");
                            if to.contains(p) {
                                t.buffered += len;
                                t.may_skip = 0;
                                t.sure_skip = 0;
                                t.reported = false;
                            } else if t.open && t.buffered >= SEED_MAX_BUFFERED {
                                t.may_skip += 1;
                                if subs.contains(p) || seeds.len() <= usize::from(k) {
                                    t.sure_skip += 1;
                                }
                            }
                        }
                        while let Some(SourceEvent::SlowSeed(p)) = s.poll_event() {
                            let t = shadow.get_mut(&p);
                            prop_assert!(t.is_some(), "{} reported but not a target", p);
                            let t = t.expect("checked");
                            prop_assert!(t.may_skip >= SLOW_STRIKES,
                                         "{} reported after {} skips", p, t.may_skip);
                            prop_assert!(!t.reported, "{} reported twice in one slow spell", p);
                            t.reported = true;
                        }
                        for (p, t) in &shadow {
                            prop_assert!(t.sure_skip < SLOW_STRIKES || t.reported,
                                         "{} skipped {} times and not reported", p, t.sure_skip);
                        }
                    }
                }
                let mut peers: Vec<PeerId> = shadow.keys().copied().collect();
                peers.sort_unstable();
                prop_assert_eq!(s.peers(), peers);
            }
        }

        #[test]
        fn stable_seeds_share_a_club_evenly(n in 1u64..10, k in 1u8..5, rounds in 1u64..6) {
            let mut s = Source::new(3, k);
            for p in 1..=n {
                s.handle_link(LinkOp::Add, link(p, LinkRole::Upload { club: 2 }));
                s.handle_link_open(p, true);
            }
            let mut counts = vec![0u64; n as usize + 1];
            for b in 0..n * rounds {
                s.handle_block(3 * b + 2, 100);
                for push in drain(&mut s) {
                    counts[push.to as usize] += 1;
                    s.handle_link_buffered(push.to, 0);
                }
            }
            let each = rounds * u64::from(k).min(n);
            prop_assert!(counts[1..].iter().all(|c| *c == each),
                         "{:?}, {} each expected", counts, each);
        }
    }
}
