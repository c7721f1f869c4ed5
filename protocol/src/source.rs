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
}
