//! A small swarm on an emulated network with no sockets: the membership, the
//! source and every peer are the real state machines; the network delivers each
//! frame after a fixed delay. Time jumps to the next event.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use bytes::Bytes;
use clubcast_protocol::block::{Block, BlockFlags, StreamKey, StreamSigner, VerifiedBlock};
use clubcast_protocol::club::{ClubConfig, LinkChange, Membership};
use clubcast_protocol::peer::{From, Peer, PeerConfig, PeerEvent};
use clubcast_protocol::signal::{LinkOp, PeerId, SEEDER_PEER_ID};
use clubcast_protocol::source::Source;
use clubcast_protocol::wire::Frame;
use clubcast_protocol::Time;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// One-way delay between two peers: the sum of their access delays (5-45 ms).
fn delay(a: PeerId, b: PeerId) -> u64 {
    let access = |p: PeerId| 5 + (p.wrapping_mul(2654435761) % 41);
    access(a) + access(b)
}
const BLOCK_MS: u64 = 60;

enum Ev {
    Frame {
        from: PeerId,
        to: PeerId,
        bytes: Bytes,
    },
    Produce(u64),
    Timer(PeerId),
}

struct Net {
    now: Time,
    q: BinaryHeap<Reverse<(Time, u64)>>,
    evs: HashMap<u64, Ev>,
    n: u64,
    membership: Membership,
    source: Source,
    peers: BTreeMap<PeerId, Peer<StreamKey>>,
    played: HashMap<PeerId, Vec<u64>>,
    skipped: HashMap<PeerId, u64>,
    bad: Vec<(PeerId, PeerId)>,
    hostile: Vec<PeerId>,
    signer: StreamSigner,
    blocks: Vec<VerifiedBlock>,
    origin_fills: u64,
    seeded: u64,
    rng: ChaCha8Rng,
    /// Every joiner's [`PeerConfig::prune_lag_ms`].
    prune_lag_ms: u64,
}

impl Net {
    fn new(clubs: u16) -> Self {
        let cfg = ClubConfig {
            clubs,
            ..ClubConfig::default()
        };
        Net {
            now: Time(1_000_000),
            q: BinaryHeap::new(),
            evs: HashMap::new(),
            n: 0,
            membership: Membership::new(cfg),
            source: Source::new(clubs, 2),
            peers: BTreeMap::new(),
            played: HashMap::new(),
            skipped: HashMap::new(),
            bad: Vec::new(),
            hostile: Vec::new(),
            signer: StreamSigner::from_seed(&[42; 32]),
            blocks: Vec::new(),
            origin_fills: 0,
            seeded: 0,
            rng: ChaCha8Rng::seed_from_u64(1),
            prune_lag_ms: clubcast_protocol::peer::PRUNE_LAG_MS,
        }
    }

    fn at(&mut self, t: Time, ev: Ev) {
        self.n += 1;
        self.evs.insert(self.n, ev);
        self.q.push(Reverse((t, self.n)));
    }

    fn apply(&mut self, changes: Vec<LinkChange>) {
        for ch in changes {
            if ch.to == SEEDER_PEER_ID {
                self.source.handle_link(ch.op, ch.link);
                self.source.handle_link_open(ch.link.peer, true);
            } else if let Some(p) = self.peers.get_mut(&ch.to) {
                p.handle_link(self.now, ch.op, ch.link);
                if ch.op == LinkOp::Add {
                    p.handle_link_open(self.now, ch.link.peer);
                }
            }
        }
    }

    fn join(&mut self, id: PeerId) {
        let j = self.membership.join(id, true, &mut self.rng);
        let clubs = self.membership.config().clubs;
        let mut pc = PeerConfig::new(id, clubs);
        pc.prune_lag_ms = self.prune_lag_ms;
        let mut peer = Peer::new(pc, self.signer.key());
        let edge = self.blocks.len().saturating_sub(1) as u64;
        let start = self
            .blocks
            .iter()
            .rev()
            .find(|b| b.header().flags.contains(BlockFlags::FRAGMENT_START))
            .map_or(0, |b| b.seq());
        peer.handle_welcome(self.now, &j.clubs, &j.links, start, edge);
        for l in &j.links {
            if l.peer == SEEDER_PEER_ID {
                self.source.handle_link_open(id, true);
            }
            peer.handle_link_open(self.now, l.peer);
        }
        self.peers.insert(id, peer);
        self.apply(j.changes);
        self.flush(id);
    }

    fn leave(&mut self, id: PeerId) {
        self.peers.remove(&id);
        let ch = self.membership.leave(id, &mut self.rng);
        self.apply(ch);
        let ids: Vec<_> = self.peers.keys().copied().collect();
        for p in ids {
            self.flush(p);
        }
    }

    fn flush(&mut self, id: PeerId) {
        let now = self.now;
        let Some(p) = self.peers.get_mut(&id) else {
            return;
        };
        let mut out = Vec::new();
        while let Some(t) = p.poll_transmit() {
            out.push(t);
        }
        let mut events = Vec::new();
        while let Some(e) = p.poll_event() {
            events.push(e);
        }
        // The emulated link drains instantly.
        for t in &out {
            p.handle_link_buffered(t.to, 0);
        }
        let timer = p.poll_timeout();
        for t in out {
            let mut bytes = t.frame.encode();
            if self.hostile.contains(&id) {
                if let Frame::Block(b) = &t.frame {
                    let mut v = b.encode().to_vec();
                    let last = v.len() - 1;
                    v[last] ^= 0xFF;
                    let bad = Block::decode(Bytes::from(v)).expect("structure intact");
                    bytes = Frame::Block(bad).encode();
                }
            }
            self.at(
                now + delay(id, t.to),
                Ev::Frame {
                    from: id,
                    to: t.to,
                    bytes,
                },
            );
        }
        for e in events {
            match e {
                PeerEvent::Play(b) => self.played.entry(id).or_default().push(b.seq()),
                PeerEvent::Skip { from, to } => *self.skipped.entry(id).or_default() += to - from,
                PeerEvent::GapFill { seq } => {
                    self.origin_fills += 1;
                    let p = self.peers.get_mut(&id).expect("present");
                    match self.blocks.get(seq as usize) {
                        Some(b) => p.handle_origin_block(now, b.block().clone()),
                        // Not produced yet (the origin's 425): a welcome to a
                        // stream with no block yet names edge 0.
                        None => p.handle_gap_fill_failed(now, seq),
                    }
                    self.flush(id);
                }
                PeerEvent::BadPeer { peer, .. } => self.bad.push((id, peer)),
                // A fixed swarm: no server to ask for another source.
                PeerEvent::SlowSource { .. } => {}
                PeerEvent::Arrived {
                    from: From::Origin, ..
                }
                | PeerEvent::Arrived { .. } => {}
            }
        }
        if let Some(t) = timer {
            self.at(t, Ev::Timer(id));
        }
    }

    fn run_until(&mut self, end: Time) {
        while let Some(Reverse((t, n))) = self.q.peek().copied() {
            if t > end {
                break;
            }
            self.q.pop();
            self.now = t;
            match self.evs.remove(&n).expect("queued") {
                Ev::Produce(seq) => {
                    let b = self
                        .signer
                        .sign(
                            seq,
                            if seq % 10 == 0 {
                                BlockFlags::FRAGMENT_START
                            } else {
                                BlockFlags::empty()
                            },
                            t.0,
                            seq,
                            Bytes::from(vec![seq as u8; 2000]),
                        )
                        .expect("small");
                    self.blocks.push(b.clone());
                    self.source.handle_block(seq, 2000);
                    while let Some(p) = self.source.poll_push() {
                        self.source.handle_link_buffered(p.to, 0);
                        self.seeded += 2000;
                        let bytes = Frame::Block(b.block().clone()).encode();
                        self.at(
                            t + delay(SEEDER_PEER_ID, p.to),
                            Ev::Frame {
                                from: SEEDER_PEER_ID,
                                to: p.to,
                                bytes,
                            },
                        );
                    }
                    self.at(t + BLOCK_MS, Ev::Produce(seq + 1));
                }
                Ev::Frame { from, to, bytes } => {
                    if let Some(p) = self.peers.get_mut(&to) {
                        p.handle_message(t, from, bytes);
                        self.flush(to);
                    }
                }
                Ev::Timer(id) => {
                    if let Some(p) = self.peers.get_mut(&id) {
                        if p.poll_timeout().is_some_and(|x| x <= t) {
                            p.handle_timeout(t);
                            self.flush(id);
                        }
                    }
                }
            }
        }
        self.now = end;
    }
}

#[test]
fn every_peer_plays_every_block_in_order() {
    let mut net = Net::new(4);
    // This network has no upload limit, so both parents' copies come within
    // the default prune lag and both stay eager; with a lag of 0 the second
    // copy prunes its parent, which the duplicate bound below checks.
    net.prune_lag_ms = 0;
    for id in 1..=24 {
        net.join(id);
    }
    net.at(net.now, Ev::Produce(0));
    let end = net.now + 200 * BLOCK_MS + 3_000;
    net.run_until(end);
    let produced = net.blocks.len() as u64;
    for (id, played) in &net.played {
        let last = *played.last().expect("played something");
        assert!(
            last + 40 >= produced,
            "peer {id} fell behind: {last} of {produced}"
        );
        assert!(
            played.windows(2).all(|w| w[1] == w[0] + 1),
            "peer {id} out of order"
        );
        assert_eq!(net.skipped.get(id), None, "peer {id} skipped");
    }
    assert_eq!(net.played.len(), 24);
    let from_peers: u64 = net.peers.values().map(|p| p.stats().bytes_from_peers).sum();
    let from_origin: u64 = net
        .peers
        .values()
        .map(|p| p.stats().bytes_from_origin)
        .sum();
    assert_eq!(from_origin, 0, "a loss-free swarm needs no gap fill");
    assert!(from_peers > 0);
    // Nobody relays another club's blocks: upload stays near one bitrate.
    let total_up: u64 = net.peers.values().map(|p| p.stats().bytes_uploaded).sum();
    let dup: u64 = net.peers.values().map(|p| p.stats().dup_bytes).sum();
    // Every upload is received once or counted as a duplicate, but for the
    // few frames still in flight when the run stops.
    let received = from_peers + dup - net.seeded;
    assert!(
        received <= total_up && total_up - received < total_up / 50,
        "{received} vs {total_up}"
    );
    eprintln!(
        "events {} dup ratio {:.3} wants {}",
        net.n,
        dup as f64 / from_peers as f64,
        net.peers
            .values()
            .map(|p| p.stats().wants_sent)
            .sum::<u64>()
    );
    assert!(dup * 3 < from_peers, "duplicates stay under a third");
}

#[test]
fn hostile_relay_is_dropped_and_nothing_corrupt_is_played() {
    let mut net = Net::new(4);
    for id in 1..=16 {
        net.join(id);
    }
    net.hostile.push(3);
    net.at(net.now, Ev::Produce(0));
    net.run_until(net.now + 100 * BLOCK_MS + 3_000);
    assert!(!net.bad.is_empty(), "the hostile peer was noticed");
    assert!(net.bad.iter().all(|(_, bad)| *bad == 3));
    let produced = net.blocks.len() as u64;
    for (id, played) in &net.played {
        if *id == 3 {
            continue;
        }
        let last = *played.last().expect("played");
        assert!(last + 40 >= produced, "peer {id} stalled at {last}");
    }
    let rejected: u64 = net.peers.values().map(|p| p.stats().blocks_rejected).sum();
    assert!(rejected > 0);
}

#[test]
fn churn_does_not_strand_anyone() {
    let mut net = Net::new(4);
    for id in 1..=20 {
        net.join(id);
    }
    net.at(net.now, Ev::Produce(0));
    for round in 0..5u64 {
        net.run_until(net.now + 30 * BLOCK_MS);
        net.leave(1 + round * 3);
        net.join(100 + round);
    }
    net.run_until(net.now + 60 * BLOCK_MS);
    let produced = net.blocks.len() as u64;
    for id in net.peers.keys() {
        let last = *net.played.get(id).and_then(|p| p.last()).expect("played");
        assert!(
            last + 40 >= produced,
            "peer {id} stranded at {last} of {produced}"
        );
    }
}
