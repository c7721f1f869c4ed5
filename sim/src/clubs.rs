//! `clubs` mode: the real [`Membership`], [`Source`] and [`Peer`] state
//! machines on the simulated network.
//!
//! Signaling (welcome, link changes) reaches a peer one server round trip after
//! the server decided it; a new connection opens two peer round trips after
//! both ends heard of it (offer/answer, then ICE, DTLS and SCTP).

use clubcast_protocol::bid::Bid;
use clubcast_protocol::club::{club_of, ClubConfig, LateStreak, LinkChange, Membership, Overload};
use clubcast_protocol::peer::{From, Peer, PeerConfig, PeerEvent, Transmit};
use clubcast_protocol::signal::{Link, LinkOp, PeerId, SEEDER_PEER_ID};
use clubcast_protocol::source::{Source, SourceEvent};
use clubcast_protocol::wire::Frame;
use clubcast_protocol::Time;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::Config;
use crate::metrics::{Collector, DelayHist};
use crate::net::{Origin, Queue, Wire};
use crate::population::{Viewer, DOWNLOAD_X};
use crate::stream::Stream;
use crate::verify::{corrupt, SimVerifier};
use crate::Run;

/// Distinct reporters after which a peer is kicked from the swarm.
pub const KICK_REPORTS: usize = 2;
/// Back-off of a timer that is due again right after it ran, µs.
pub const SPIN_BACKOFF_US: u64 = 5_000;
/// Bid interval, µs (the server's default).
pub const BID_INTERVAL_US: u64 = 1_000_000;
/// With `CLUBCAST_SIM_DEBUG`, running totals are printed this often (sim time).
pub const DEBUG_EVERY_US: u64 = 10_000_000;
/// Seconds of stream a simulated peer caches. A browser keeps up to
/// `MAX_CACHE_BLOCKS`, but live viewers never ask for blocks this old, and a
/// cached block costs the simulator about 150 bytes per peer (10,000 peers ×
/// 2,048 blocks would be 3 GB).
pub const CACHE_SECONDS: u64 = 10;

#[derive(Debug)]
enum Ev {
    Produce(u64),
    Join(PeerId),
    Welcome(Box<Welcome>),
    Signal {
        ch: LinkChange,
        gen: u64,
    },
    Open {
        at: PeerId,
        remote: PeerId,
    },
    Deliver {
        from: PeerId,
        to: PeerId,
        frame: Wired,
        finish: u64,
    },
    Timer(PeerId),
    OriginBlock {
        to: PeerId,
        seq: u64,
    },
    GapFail {
        to: PeerId,
        seq: u64,
    },
    Leave {
        id: PeerId,
        kicked: bool,
    },
    Bid,
    /// A peer's serializer finished a frame while pushes wait in its queue.
    Drain(PeerId),
}

/// The server's welcome to a joiner.
#[derive(Debug)]
struct Welcome {
    id: PeerId,
    clubs: Vec<u16>,
    links: Vec<Link>,
    start: u64,
    edge: u64,
    gen: u64,
}

/// A frame in flight, kept small: the queue holds millions of them.
///
/// A block travels as its seq. Every block a peer relays passed its
/// verifier, so it is the stream's own, or that block corrupted if the peer
/// is hostile; the receiver gets it rebuilt from the stream.
#[derive(Debug)]
enum Wired {
    Block { seq: u64, corrupt: bool },
    Have(u64),
    Other(Box<Frame>),
}

impl Wired {
    fn new(frame: Frame, hostile: bool) -> Self {
        match frame {
            Frame::Block(b) => Wired::Block {
                seq: b.header.seq,
                corrupt: hostile,
            },
            Frame::Have(seq) => Wired::Have(seq),
            f => Wired::Other(Box::new(f)),
        }
    }

    fn into_frame(self, stream: &Stream) -> Frame {
        match self {
            Wired::Block { seq, corrupt: c } => {
                let b = &stream.blocks[seq as usize];
                Frame::Block(if c { corrupt(b) } else { b.clone() })
            }
            Wired::Have(seq) => Frame::Have(seq),
            Wired::Other(f) => *f,
        }
    }
}

#[derive(Debug, Default)]
struct Slot {
    peer: Option<Peer<SimVerifier>>,
    timer_at: u64,
    /// When a queued `Drain` is due (u64::MAX: none).
    drain_at: u64,
    /// Millisecond of the last `handle_timeout`.
    fired_ms: u64,
    reporters: Vec<PeerId>,
    /// Its `pushes_late` at the last bid.
    late_seen: u64,
    /// The server's view of its bids and overload (as `clubcast-server`).
    late_streak: LateStreak,
    overload: Overload,
    hostile: bool,
    /// (dup bytes, rejected, skipped) already folded into the collector.
    folded: bool,
}

/// The clubs simulation.
pub struct Sim {
    cfg: Config,
    q: Queue<Ev>,
    wire: Wire,
    slots: Vec<Slot>,
    membership: Membership,
    source: Source,
    stream: Stream,
    origin: Origin,
    metrics: Collector,
    verifier: SimVerifier,
    rng: ChaCha8Rng,
    tx: Vec<Transmit>,
    evs: Vec<PeerEvent>,
    uploads: Vec<(u64, u64)>,
    block_bits: u64,
    /// Blocks a peer caches ([`CACHE_SECONDS`] of stream).
    cache_blocks: usize,
    /// Skipped blocks of the skipper's own clubs and of other clubs (debug).
    skipped_split: (u64, u64),
    /// `SlowSource` reports, and those that replaced an overloaded source (debug).
    slow_reports: (u64, u64),
    /// `CLUBCAST_SIM_DEBUG` is set: print totals every [`DEBUG_EVERY_US`].
    debug: bool,
    end_us: u64,
    /// With `CLUBCAST_SIM_DEBUG`: block delays of arrivals in the viewer's
    /// own clubs, over the last hop, and from the origin.
    delay_split: [DelayHist; 3],
}

fn ms(us: u64) -> Time {
    Time(us / 1000)
}

impl Sim {
    /// Builds the run: every join, leave and block is queued up front.
    pub fn new(cfg: &Config, viewers: &[Viewer], stream: Stream, verifier: SimVerifier) -> Self {
        let ccfg = ClubConfig {
            clubs: cfg.clubs,
            in_club_links: cfg.in_club_links,
            ..ClubConfig::default()
        };
        let mut q = Queue::default();
        let mut slots: Vec<Slot> = (0..=viewers.len()).map(|_| Slot::default()).collect();
        for (i, v) in viewers.iter().enumerate() {
            let id = i as PeerId + 1;
            slots[id as usize].hostile = v.hostile;
            slots[id as usize].timer_at = u64::MAX;
            slots[id as usize].drain_at = u64::MAX;
            q.push(v.join_us, Ev::Join(id));
            if let Some(t) = v.leave_us {
                q.push(t, Ev::Leave { id, kicked: false });
            }
        }
        q.push(stream.start_us, Ev::Produce(0));
        q.push(stream.start_us, Ev::Bid);
        let end_us = stream.end_us + 2_000_000;
        Sim {
            q,
            wire: Wire::new(viewers, cfg.loss, cfg.seed),
            membership: Membership::new(ccfg),
            source: Source::new(cfg.clubs, cfg.seeds_k),
            origin: Origin::new(cfg.origin_budget_kbps, viewers.len() + 1),
            metrics: Collector::new(viewers, stream.len()),
            block_bits: stream.block_bits(),
            cache_blocks: (CACHE_SECONDS * cfg.bitrate_kbps * 1000 / 8)
                .div_ceil(cfg.block_kib * 1024)
                .max(64) as usize,
            skipped_split: (0, 0),
            slow_reports: (0, 0),
            debug: std::env::var_os("CLUBCAST_SIM_DEBUG").is_some(),
            stream,
            slots,
            verifier,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            tx: Vec::new(),
            evs: Vec::new(),
            uploads: Vec::new(),
            end_us,
            delay_split: Default::default(),
            cfg: cfg.clone(),
        }
    }

    /// Runs to the end and reports.
    pub fn run(mut self) -> Run {
        while let Some(t) = self.q.peek_time() {
            if t > self.end_us {
                break;
            }
            let (now, ev) = self.q.pop().expect("peeked");
            self.handle(now, ev);
        }
        let ids: Vec<PeerId> = (1..self.slots.len() as PeerId).collect();
        if self.debug {
            let mut tot = clubcast_protocol::peer::PeerStats::default();
            for s in self.slots.iter().filter_map(|s| s.peer.as_ref()) {
                tot.add(&s.stats());
            }
            eprintln!(
                "{tot:?} skipped own/other club {:?} retransmits {} mean serializer wait {} us, waits > 2 s {} of {}; fills ok {} denied {}",
                self.skipped_split,
                self.wire.retransmits,
                self.wire.backlog_us_sum / self.wire.sends.max(1),
                self.wire.late_sends,
                self.wire.sends,
                self.origin.fills_ok,
                self.origin.fills_denied
            );
        }
        for id in ids {
            self.fold(id, self.end_us);
        }
        if self.debug {
            let names = ["own clubs", "last hop", "origin"];
            for (name, h) in names.iter().zip(&self.delay_split) {
                eprintln!(
                    "block delay, {name}: {} arrivals, p50/p95/p99 {}/{}/{} ms",
                    h.len(),
                    h.pct(0.5),
                    h.pct(0.95),
                    h.pct(0.99)
                );
            }
        }
        let report = self.metrics.report(
            &self.cfg,
            &self.stream,
            self.end_us,
            self.origin.egress_bytes(),
            &self.uploads,
            self.q.popped,
            (self.origin.fills_ok, self.origin.fills_denied),
        );
        Run {
            report,
            metrics: self.metrics,
            stream: self.stream,
            end_us: self.end_us,
        }
    }

    fn sig_delay(&self, id: PeerId) -> u64 {
        if id == SEEDER_PEER_ID {
            0
        } else {
            self.wire.rtt(id, SEEDER_PEER_ID)
        }
    }

    fn alive(&self, id: PeerId) -> bool {
        self.wire.hosts[id as usize].alive
    }

    fn handle(&mut self, now: u64, ev: Ev) {
        match ev {
            Ev::Produce(seq) => self.produce(now, seq),
            Ev::Join(id) => self.join(now, id),
            Ev::Welcome(w) => {
                let Welcome {
                    id,
                    clubs,
                    links,
                    start,
                    edge,
                    gen,
                } = *w;
                if self.slots[id as usize].peer.is_none() && self.alive(id) {
                    // The wire reports every drained frame (`Drain`): no polling,
                    // and a block is handed to the wire only when the serializer
                    // is idle, so it can still be overtaken until then.
                    let mut pc = PeerConfig::new(id, self.cfg.clubs);
                    pc.pump_poll_ms = 0;
                    pc.send_window = 1;
                    pc.cache_blocks = self.cache_blocks;
                    let mut p = Peer::new(pc, self.verifier.clone());
                    p.handle_welcome(ms(now), &clubs, &links, start, edge);
                    self.slots[id as usize].peer = Some(p);
                    for l in links {
                        self.conn_change(now, id, LinkOp::Add, l.peer, gen);
                    }
                    self.flush(now, id);
                }
            }
            Ev::Signal { ch, gen } => self.signal(now, ch, gen),
            Ev::Open { at, remote } => self.open(now, at, remote),
            Ev::Deliver {
                from,
                to,
                frame,
                finish,
            } => {
                if finish > self.wire.hosts[from as usize].left_us || to == SEEDER_PEER_ID {
                    return;
                }
                let Some(p) = self.slots[to as usize].peer.as_mut() else {
                    return;
                };
                p.handle_links_buffered(self.wire.sync(now, to).iter().copied());
                p.handle_frame(ms(now), from, frame.into_frame(&self.stream));
                self.flush(now, to);
            }
            Ev::Timer(id) => {
                let s = &mut self.slots[id as usize];
                if s.timer_at != now {
                    return;
                }
                s.timer_at = u64::MAX;
                let Some(p) = s.peer.as_mut() else { return };
                if p.poll_timeout().is_some_and(|t| t <= ms(now)) {
                    s.fired_ms = now / 1000;
                    p.handle_links_buffered(self.wire.sync(now, id).iter().copied());
                    p.handle_timeout(ms(now));
                }
                self.flush(now, id);
            }
            Ev::OriginBlock { to, seq } => {
                let Some(p) = self.slots[to as usize].peer.as_mut() else {
                    return;
                };
                p.handle_links_buffered(self.wire.sync(now, to).iter().copied());
                p.handle_origin_block(ms(now), self.stream.blocks[seq as usize].clone());
                self.flush(now, to);
            }
            Ev::GapFail { to, seq } => {
                let Some(p) = self.slots[to as usize].peer.as_mut() else {
                    return;
                };
                p.handle_gap_fill_failed(ms(now), seq);
                self.flush(now, to);
            }
            Ev::Leave { id, kicked } => self.leave(now, id, kicked),
            Ev::Drain(id) => {
                let s = &mut self.slots[id as usize];
                if s.drain_at != now {
                    return;
                }
                s.drain_at = u64::MAX;
                let Some(p) = s.peer.as_mut() else { return };
                p.handle_links_buffered(self.wire.sync(now, id).iter().copied());
                self.flush(now, id);
            }
            Ev::Bid => {
                let bids: Vec<Bid> = self
                    .slots
                    .iter()
                    .enumerate()
                    .filter_map(|(i, s)| {
                        let bits = s.peer.as_ref()?.bid(ms(now), BID_INTERVAL_US / 1000);
                        (bits > 0).then_some(Bid {
                            peer: i as PeerId,
                            bits,
                        })
                    })
                    .collect();
                self.origin.new_interval(&bids, self.block_bits);
                // Each peer reports its late pushes with its bid.
                for s in &mut self.slots {
                    let Some(p) = &s.peer else { continue };
                    let late = p.stats().pushes_late;
                    if s.late_streak.note_bid(late - s.late_seen) {
                        s.overload.mark(now / 1000);
                    }
                    s.late_seen = late;
                }
                self.q.push(now + BID_INTERVAL_US, Ev::Bid);
                if self.debug && now % DEBUG_EVERY_US < BID_INTERVAL_US {
                    eprintln!(
                        "t {:>4} s: skipped own/other {:?}, fills ok {} denied {}, slow-source reports / replaced {:?}, retransmits {}",
                        now / 1_000_000,
                        self.skipped_split,
                        self.origin.fills_ok,
                        self.origin.fills_denied,
                        self.slow_reports,
                        self.wire.retransmits,
                    );
                }
            }
        }
    }

    fn produce(&mut self, now: u64, seq: u64) {
        let source = &mut self.source;
        for &(r, q) in self.wire.sync(now, SEEDER_PEER_ID) {
            source.handle_link_buffered(r, q);
        }
        let block = &self.stream.blocks[seq as usize];
        self.source.handle_block(seq, block.payload.len());
        while let Some(push) = self.source.poll_push() {
            let frame = Frame::Block(block.clone());
            let len = frame.encoded_len();
            if let Some((finish, arrival)) = self.wire.send(now, SEEDER_PEER_ID, push.to, len) {
                self.origin.seeded(len);
                self.metrics.payload_sent += block.payload.len() as u64;
                self.metrics.overhead_sent += frame.overhead_len() as u64;
                self.q.push(
                    arrival,
                    Ev::Deliver {
                        from: SEEDER_PEER_ID,
                        to: push.to,
                        frame: Wired::new(frame, false),
                        finish,
                    },
                );
            }
        }
        while let Some(SourceEvent::SlowSeed(p)) = self.source.poll_event() {
            let changes = self.membership.replace(SEEDER_PEER_ID, p, &mut self.rng);
            self.schedule_changes(now, changes);
        }
        if ((seq + 1) as usize) < self.stream.len() {
            self.q.push(
                self.stream.ingest_us[seq as usize + 1],
                Ev::Produce(seq + 1),
            );
        }
    }

    fn join(&mut self, now: u64, id: PeerId) {
        self.wire.hosts[id as usize].alive = true;
        // Peers state their upload capacity, as a browser would after measuring it.
        let pct = self.wire.hosts[id as usize].up_bps * 100 / (self.cfg.bitrate_kbps * 1000).max(1);
        let j = self
            .membership
            .join_with_capacity(id, true, pct as u32, &mut self.rng);
        let (start, edge) = self.stream.start_for(now);
        self.q.push(
            now + self.sig_delay(id),
            Ev::Welcome(Box::new(Welcome {
                id,
                clubs: j.clubs,
                links: j.links,
                start,
                edge,
                gen: now,
            })),
        );
        self.schedule_changes(now, j.changes);
    }

    fn leave(&mut self, now: u64, id: PeerId, kicked: bool) {
        if !self.alive(id) {
            return;
        }
        self.fold(id, now);
        self.metrics.recs[id as usize].leave_us = Some(now);
        self.metrics.recs[id as usize].kicked |= kicked;
        self.wire.hosts[id as usize].leave(now);
        self.slots[id as usize].peer = None;
        let changes = self.membership.leave(id, &mut self.rng);
        self.schedule_changes(now, changes);
    }

    /// Folds a viewer's counters into the collector (once).
    fn fold(&mut self, id: PeerId, now: u64) {
        let s = &mut self.slots[id as usize];
        if s.folded {
            return;
        }
        let Some(p) = s.peer.as_ref() else { return };
        s.folded = true;
        let st = p.stats();
        self.metrics.dup_bytes += st.dup_bytes;
        self.metrics.rejected += st.blocks_rejected;
        self.metrics.skipped += st.blocks_skipped;
        let h = &self.wire.hosts[id as usize];
        let joined = self.metrics.recs[id as usize].join_us;
        let from = joined.max(self.stream.start_us);
        self.uploads.push((
            h.sent_bytes,
            now.min(self.stream.end_us).saturating_sub(from),
        ));
    }

    fn schedule_changes(&mut self, now: u64, changes: Vec<LinkChange>) {
        for ch in changes {
            if ch.to == SEEDER_PEER_ID {
                self.signal(now, ch, now);
            } else {
                self.q
                    .push(now + self.sig_delay(ch.to), Ev::Signal { ch, gen: now });
            }
        }
    }

    fn signal(&mut self, now: u64, ch: LinkChange, gen: u64) {
        if ch.to == SEEDER_PEER_ID {
            self.source.handle_link(ch.op, ch.link);
        } else {
            let Some(p) = self.slots[ch.to as usize].peer.as_mut() else {
                return;
            };
            p.handle_link(ms(now), ch.op, ch.link);
        }
        self.conn_change(now, ch.to, ch.op, ch.link.peer, gen);
    }

    /// Keeps the connection of `at` to `remote` in step with its roles: the
    /// first role opens it, the last one closes it.
    fn conn_change(&mut self, now: u64, at: PeerId, op: LinkOp, remote: PeerId, gen: u64) {
        match op {
            LinkOp::Add => {
                let (c, new) = self.wire.hosts[at as usize].add_conn(remote);
                c.roles += 1;
                if new {
                    let known = gen + self.sig_delay(at).max(self.sig_delay(remote));
                    let open_at = known.max(now) + 2 * self.wire.rtt(at, remote);
                    self.q.push(open_at, Ev::Open { at, remote });
                }
            }
            LinkOp::Remove => {
                let h = &mut self.wire.hosts[at as usize];
                if let Some(c) = h.conn_mut(remote) {
                    c.roles = c.roles.saturating_sub(1);
                    if c.roles == 0 {
                        h.remove_conn(remote);
                        if at == SEEDER_PEER_ID {
                            self.source.handle_link_open(remote, false);
                        } else if let Some(p) = self.slots[at as usize].peer.as_mut() {
                            p.handle_link_closed(ms(now), remote);
                        }
                    }
                }
            }
        }
    }

    fn open(&mut self, now: u64, at: PeerId, remote: PeerId) {
        if !self.alive(at) || !self.alive(remote) {
            return;
        }
        let Some(c) = self.wire.hosts[at as usize].conn_mut(remote) else {
            return;
        };
        if c.open {
            return;
        }
        c.open = true;
        if at == SEEDER_PEER_ID {
            self.source.handle_link_open(remote, true);
        } else if let Some(p) = self.slots[at as usize].peer.as_mut() {
            p.handle_link_open(ms(now), remote);
            self.flush(now, at);
        }
    }

    /// Drains a peer's transmits and events, then re-arms its timer.
    fn flush(&mut self, now: u64, id: PeerId) {
        let mut tx = std::mem::take(&mut self.tx);
        let mut evs = std::mem::take(&mut self.evs);
        let slot = &mut self.slots[id as usize];
        let Some(p) = slot.peer.as_mut() else {
            return;
        };
        while let Some(t) = p.poll_transmit() {
            tx.push(t);
        }
        while let Some(e) = p.poll_event() {
            evs.push(e);
        }
        let timeout = p.poll_timeout();
        let waiting = p.queued_pushes() > 0;
        let hostile = slot.hostile;
        for t in tx.drain(..) {
            let frame = t.frame;
            debug_assert!(
                !matches!(&frame, Frame::Block(b) if *b != self.stream.blocks[b.header.seq as usize]),
                "a relayed block is the stream's own"
            );
            let len = frame.encoded_len();
            let overhead = frame.overhead_len();
            if let Some((finish, arrival)) = self.wire.send(now, id, t.to, len) {
                self.metrics.payload_sent += (len - overhead) as u64;
                self.metrics.overhead_sent += overhead as u64;
                self.q.push(
                    arrival,
                    Ev::Deliver {
                        from: id,
                        to: t.to,
                        frame: Wired::new(frame, hostile),
                        finish,
                    },
                );
            }
        }
        for e in evs.drain(..) {
            self.event(now, id, e);
        }
        self.tx = tx;
        self.evs = evs;
        if waiting {
            // Queued pushes go out as the serializer frees the window.
            if let Some(at) = self.wire.next_finish(id) {
                let s = &mut self.slots[id as usize];
                if at < s.drain_at || s.drain_at <= now {
                    s.drain_at = at.max(now);
                    self.q.push(s.drain_at, Ev::Drain(id));
                }
            }
        }
        if let Some(t) = timeout {
            let mut at = t.0 * 1000;
            let s = &mut self.slots[id as usize];
            if at <= now {
                // Due now: run it in the next event step. A peer that asks
                // for a timeout in the past right after handling one at this
                // millisecond is spinning (see the crate doc): back off.
                at = if s.fired_ms == now / 1000 {
                    now + SPIN_BACKOFF_US
                } else {
                    now + 1
                };
            }
            if at < s.timer_at {
                s.timer_at = at;
                self.q.push(at, Ev::Timer(id));
            }
        }
    }

    fn event(&mut self, now: u64, id: PeerId, e: PeerEvent) {
        match e {
            PeerEvent::Play(b) => {
                self.metrics.played(id, now);
                let orig = &self.stream.blocks[b.seq() as usize];
                if b.block() != orig {
                    self.metrics.corrupt_played += 1;
                }
            }
            PeerEvent::Skip { from, to } => {
                if let Some(clubs) = self.membership.clubs_of(id) {
                    for seq in from..to {
                        let c = club_of(seq, self.cfg.clubs);
                        if clubs.contains(&c) {
                            self.skipped_split.0 += 1;
                        } else {
                            self.skipped_split.1 += 1;
                        }
                    }
                }
            }
            PeerEvent::GapFill { seq } => {
                let len = self.stream.wire_len(seq);
                let rtt = self.wire.rtt(id, SEEDER_PEER_ID);
                // A block not produced yet is the origin's 425 (a welcome to a
                // stream with no block yet names edge 0).
                let produced = self
                    .stream
                    .blocks
                    .get(seq as usize)
                    .is_some_and(|b| b.header.ingest_time_ms <= now / 1000);
                if produced && self.origin.fetch(id, len) {
                    let down_bps = self.cfg.bitrate_kbps * 1000 * DOWNLOAD_X;
                    let xfer = (len as u64 * 8 * 1_000_000).div_ceil(down_bps);
                    let extra = self.wire.loss_delay(id, SEEDER_PEER_ID);
                    self.q
                        .push(now + rtt + xfer + extra, Ev::OriginBlock { to: id, seq });
                } else {
                    self.q.push(now + rtt, Ev::GapFail { to: id, seq });
                }
            }
            PeerEvent::Arrived {
                seq,
                ingest_time_ms,
                from,
                bytes,
            } => {
                let server = matches!(from, From::Origin | From::Peer(SEEDER_PEER_ID));
                if self.debug {
                    let c = club_of(seq, self.cfg.clubs);
                    let own = self
                        .membership
                        .clubs_of(id)
                        .is_some_and(|cs| cs.contains(&c));
                    let k = match (own, from) {
                        (true, _) => 0,
                        (false, From::Peer(_)) => 1,
                        (false, From::Origin) => 2,
                    };
                    self.delay_split[k].note((now / 1000).saturating_sub(ingest_time_ms));
                }
                self.metrics
                    .arrival(id, seq, ingest_time_ms, now, server, bytes);
            }
            PeerEvent::SlowSource { peer } => {
                self.slow_reports.0 += 1;
                // Another last-hop source, no report, if the source is
                // overloaded and may shed a subscriber (`club::Overload`); the
                // in-club links between the two stay (see
                // `Membership::replace_source`).
                if !self.slots[peer as usize].overload.may_shed(now / 1000) {
                    return;
                }
                let changes = self.membership.replace_source(id, peer);
                if !changes.is_empty() {
                    self.slots[peer as usize].overload.shed(now / 1000);
                    self.slow_reports.1 += 1;
                }
                self.schedule_changes(now, changes);
            }
            PeerEvent::BadPeer { peer, .. } => {
                let changes = self.membership.replace(id, peer, &mut self.rng);
                self.schedule_changes(now, changes);
                let s = &mut self.slots[peer as usize];
                if !s.reporters.contains(&id) {
                    s.reporters.push(id);
                    if s.reporters.len() == KICK_REPORTS {
                        self.q.push(
                            now,
                            Ev::Leave {
                                id: peer,
                                kicked: true,
                            },
                        );
                    }
                }
            }
        }
    }
}
