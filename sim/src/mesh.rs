//! `mesh-pull` baseline: a random mesh with buffer maps and pull, in the style
//! of CoolStreaming and P2P Media Loader, written compactly on the same network
//! model and wire frames as `clubs`.
//!
//! - A tracker gives each joiner up to `--mesh-neighbours` random peers
//!   (a peer accepts up to twice that); a peer left with fewer than half asks
//!   again. A connection opens like in `clubs` and starts with a BITFIELD.
//! - Every new block is announced with HAVE to every neighbour (the buffer
//!   map, sent incrementally).
//! - Every [`TICK_US`] a peer pulls what it lacks between its playhead and the
//!   newest block it heard of: deadline-first within [`URGENT_US`] of the
//!   deadline, rarest-first further out, from the holder with the fewest
//!   outstanding requests (at most [`MAX_OUTSTANDING`] per neighbour).
//! - The origin pushes each block to `--seeds-k` random peers, and fills a
//!   block still missing 450 ms before its deadline within the same bid
//!   budget as `clubs`.
//! - Blocks are verified with the same tag; a neighbour that sends a bad one
//!   is dropped and reported; two reports kick it.

use clubcast_protocol::bid::Bid;
use clubcast_protocol::block::BlockVerifier;
use clubcast_protocol::signal::PeerId;
use clubcast_protocol::wire::Frame;
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::clubs::{BID_INTERVAL_US, KICK_REPORTS};
use crate::config::Config;
use crate::metrics::Collector;
use crate::net::{Origin, Queue, Wire};
use crate::population::{Viewer, DOWNLOAD_X};
use crate::stream::{Stream, Wired, TARGET_LATENCY_MS};
use crate::verify::{same_block, SimVerifier};
use crate::Run;

/// Pull scheduling period, µs.
pub const TICK_US: u64 = 100_000;
/// Within this of its deadline a block is pulled deadline-first, µs.
pub const URGENT_US: u64 = 1_000_000;
/// Requests outstanding per neighbour.
pub const MAX_OUTSTANDING: u8 = 4;
/// A request unanswered this long is asked elsewhere, µs.
pub const REQUEST_TIMEOUT_US: u64 = 800_000;
/// Ask the origin this long before the deadline, µs (as the clubs peer).
pub const ORIGIN_MARGIN_US: u64 = 450_000;
/// Blocks of history in the BITFIELD sent on connect.
pub const BITFIELD_SPAN: u64 = 64;

#[derive(Debug)]
enum Ev {
    Produce(u64),
    Join(PeerId),
    Leave {
        id: PeerId,
        kicked: bool,
    },
    Open {
        at: PeerId,
        remote: PeerId,
    },
    Gone {
        at: PeerId,
        remote: PeerId,
    },
    Deliver {
        from: PeerId,
        to: PeerId,
        frame: Wired,
        finish: u64,
    },
    Tick(PeerId),
    OriginBlock {
        to: PeerId,
        seq: u64,
    },
    GapFail {
        to: PeerId,
        seq: u64,
    },
    Bid,
}

#[derive(Debug)]
struct Nbr {
    id: PeerId,
    open: bool,
    have: Vec<u64>,
    outstanding: u8,
}

#[derive(Debug, Default)]
struct Node {
    nbrs: Vec<Nbr>,
    have: Vec<u64>,
    highest: Option<u64>,
    start: u64,
    /// (seq, asked neighbour, when).
    reqs: Vec<(u64, PeerId, u64)>,
    /// (seq, tries, pending) of origin fetches.
    origin: Vec<(u64, u8, bool)>,
    reporters: Vec<PeerId>,
    hostile: bool,
    ticks: u64,
}

fn get(b: &[u64], i: u64) -> bool {
    b.get((i / 64) as usize)
        .is_some_and(|w| w >> (i % 64) & 1 == 1)
}

fn set(b: &mut [u64], i: u64) {
    if let Some(w) = b.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

/// The mesh-pull simulation.
pub struct Sim {
    cfg: Config,
    q: Queue<Ev>,
    wire: Wire,
    nodes: Vec<Node>,
    alive: Vec<PeerId>,
    alive_pos: Vec<usize>,
    stream: Stream,
    origin: Origin,
    metrics: Collector,
    verifier: SimVerifier,
    rng: ChaCha8Rng,
    words: usize,
    block_bits: u64,
    end_us: u64,
}

impl Sim {
    /// Builds the run.
    pub fn new(cfg: &Config, viewers: &[Viewer], stream: Stream, verifier: SimVerifier) -> Self {
        let mut q = Queue::default();
        let mut nodes: Vec<Node> = (0..=viewers.len()).map(|_| Node::default()).collect();
        for (i, v) in viewers.iter().enumerate() {
            let id = i as PeerId + 1;
            nodes[id as usize].hostile = v.hostile;
            q.push(v.join_us, Ev::Join(id));
            if let Some(t) = v.leave_us {
                q.push(t, Ev::Leave { id, kicked: false });
            }
        }
        q.push(stream.start_us, Ev::Produce(0));
        q.push(stream.start_us, Ev::Bid);
        Sim {
            q,
            wire: Wire::new(viewers, cfg.loss, cfg.seed),
            alive: Vec::new(),
            alive_pos: vec![usize::MAX; viewers.len() + 1],
            origin: Origin::new(cfg.origin_budget_kbps, viewers.len() + 1, cfg.seconds),
            metrics: Collector::new(viewers, stream.len()),
            words: stream.len().div_ceil(64).max(1),
            block_bits: stream.block_bits(),
            end_us: stream.end_us + 2_000_000,
            stream,
            nodes,
            verifier,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            cfg: cfg.clone(),
        }
    }

    /// Runs to the end and reports.
    pub fn run(mut self) -> Run {
        self.run_events();
        let mut uploads = Vec::new();
        for id in 1..self.nodes.len() {
            let r = &self.metrics.recs[id];
            let from = r.join_us.max(self.stream.start_us);
            let until = r.leave_us.unwrap_or(self.end_us).min(self.stream.end_us);
            uploads.push((self.wire.hosts[id].sent_bytes, until.saturating_sub(from)));
        }
        let report = self.metrics.report(
            &self.cfg,
            &self.stream,
            self.end_us,
            self.origin.egress_bytes(),
            &uploads,
            self.q.popped(),
            (self.origin.fills_ok, self.origin.fills_denied),
        );
        Run {
            report,
            metrics: self.metrics,
            stream: self.stream,
            end_us: self.end_us,
        }
    }

    /// Runs the events up to the end.
    fn run_events(&mut self) {
        while let Some(t) = self.q.peek_time() {
            if t > self.end_us {
                break;
            }
            let (now, ev) = self.q.pop().expect("peeked");
            self.handle(now, ev);
        }
    }

    fn sig(&self, id: PeerId) -> u64 {
        self.wire.rtt(id, 0)
    }

    fn deadline(&self, seq: u64) -> u64 {
        self.stream.ingest_us[seq as usize] + TARGET_LATENCY_MS * 1000
    }

    fn handle(&mut self, now: u64, ev: Ev) {
        match ev {
            Ev::Produce(seq) => {
                let block = &self.stream.blocks[seq as usize];
                for _ in 0..self.cfg.seeds_k {
                    if self.alive.is_empty() {
                        break;
                    }
                    let to = self.alive[self.rng.gen_range(0..self.alive.len())];
                    let frame = Frame::Block(block.clone());
                    let len = frame.encoded_len();
                    self.origin.seeded(len);
                    self.metrics.tally.payload_sent += block.payload.len() as u64;
                    self.metrics.tally.overhead_sent += frame.overhead_len() as u64;
                    let at = now + self.wire.owd(0, to) + self.wire.loss_delay(0, to);
                    self.q.push(
                        at,
                        Ev::Deliver {
                            from: 0,
                            to,
                            frame: Wired::new(frame, false),
                            finish: now,
                        },
                    );
                }
                if ((seq + 1) as usize) < self.stream.len() {
                    self.q.push(
                        self.stream.ingest_us[seq as usize + 1],
                        Ev::Produce(seq + 1),
                    );
                }
            }
            Ev::Join(id) => self.join(now, id),
            Ev::Leave { id, kicked } => self.leave(now, id, kicked),
            Ev::Open { at, remote } => {
                if !self.wire.hosts[at as usize].alive || !self.wire.hosts[remote as usize].alive {
                    return;
                }
                let Some(c) = self.wire.hosts[at as usize].conn_mut(remote) else {
                    return;
                };
                c.open = true;
                let n = &mut self.nodes[at as usize];
                if let Some(nb) = n.nbrs.iter_mut().find(|x| x.id == remote) {
                    nb.open = true;
                }
                if let Some(h) = n.highest {
                    let start = (h + 1).saturating_sub(BITFIELD_SPAN);
                    let mut bits = vec![0u8; BITFIELD_SPAN.div_ceil(8) as usize];
                    for s in start..=h {
                        if get(&n.have, s) {
                            let i = (s - start) as usize;
                            bits[i / 8] |= 0x80 >> (i % 8);
                        }
                    }
                    let f = Frame::Bitfield {
                        start,
                        bits: bits.into(),
                    };
                    self.send(now, at, remote, f);
                }
            }
            Ev::Gone { at, remote } => self.drop_nbr(at, remote),
            Ev::Deliver {
                from,
                to,
                frame,
                finish,
            } => {
                if finish > self.wire.hosts[from as usize].left_us
                    || !self.wire.hosts[to as usize].alive
                {
                    return;
                }
                if from != 0 && !self.nodes[to as usize].nbrs.iter().any(|n| n.id == from) {
                    return;
                }
                let frame = frame.into_frame(&self.stream);
                self.frame(now, from, to, frame);
            }
            Ev::Tick(id) => {
                if self.wire.hosts[id as usize].alive {
                    self.tick(now, id);
                    self.q.push(now + TICK_US, Ev::Tick(id));
                }
            }
            Ev::OriginBlock { to, seq } => {
                if self.wire.hosts[to as usize].alive {
                    if let Some(o) = self.nodes[to as usize]
                        .origin
                        .iter_mut()
                        .find(|o| o.0 == seq)
                    {
                        o.2 = false;
                    }
                    let b = self.stream.blocks[seq as usize].clone();
                    self.got_block(now, to, 0, &b);
                }
            }
            Ev::GapFail { to, seq } => {
                if let Some(o) = self.nodes[to as usize]
                    .origin
                    .iter_mut()
                    .find(|o| o.0 == seq)
                {
                    o.2 = false;
                }
            }
            Ev::Bid => {
                let mut bids = Vec::new();
                for &id in &self.alive {
                    let n = &self.nodes[id as usize];
                    let Some(h) = n.highest else { continue };
                    let horizon = now + BID_INTERVAL_US + ORIGIN_MARGIN_US;
                    let mut bits = 0;
                    for s in self.playhead(now, id)..=h {
                        if !get(&n.have, s)
                            && self.deadline(s) <= horizon
                            && !n.origin.iter().any(|o| o.0 == s && o.1 >= 2)
                        {
                            bits += self.stream.wire_len(s) as u64 * 8;
                        }
                    }
                    if bits > 0 {
                        bids.push(Bid { peer: id, bits });
                    }
                }
                self.origin.new_interval(&bids, self.block_bits);
                self.q.push(now + BID_INTERVAL_US, Ev::Bid);
            }
        }
    }

    fn playhead(&self, now: u64, id: PeerId) -> u64 {
        let start = self.nodes[id as usize].start;
        let first_live =
            self.stream
                .ingest_us
                .partition_point(|t| t + TARGET_LATENCY_MS * 1000 < now) as u64;
        start.max(first_live)
    }

    fn join(&mut self, now: u64, id: PeerId) {
        let (start, _) = self.stream.start_for(now);
        let words = self.words;
        let n = &mut self.nodes[id as usize];
        n.start = start;
        n.have = vec![0; words];
        self.wire.hosts[id as usize].alive = true;
        self.alive_pos[id as usize] = self.alive.len();
        self.alive.push(id);
        self.find_nbrs(now, id);
        self.q.push(now + self.sig(id) + TICK_US, Ev::Tick(id));
    }

    /// Asks the tracker for random neighbours up to the target.
    fn find_nbrs(&mut self, now: u64, id: PeerId) {
        let want = self.cfg.mesh_neighbours;
        let mut tries = 0;
        while self.nodes[id as usize].nbrs.len() < want && tries < 4 * want {
            tries += 1;
            if self.alive.len() < 2 {
                break;
            }
            let other = self.alive[self.rng.gen_range(0..self.alive.len())];
            if other == id
                || self.nodes[other as usize].nbrs.len() >= 2 * want
                || self.nodes[id as usize].nbrs.iter().any(|n| n.id == other)
            {
                continue;
            }
            let open_at = now + self.sig(id).max(self.sig(other)) + 2 * self.wire.rtt(id, other);
            for (a, b) in [(id, other), (other, id)] {
                let words = self.words;
                self.nodes[a as usize].nbrs.push(Nbr {
                    id: b,
                    open: false,
                    have: vec![0; words],
                    outstanding: 0,
                });
                self.wire.hosts[a as usize].add_conn(b);
                self.q.push(open_at, Ev::Open { at: a, remote: b });
            }
        }
    }

    fn leave(&mut self, now: u64, id: PeerId, kicked: bool) {
        if !self.wire.hosts[id as usize].alive {
            return;
        }
        self.metrics.recs[id as usize].leave_us = Some(now);
        self.metrics.recs[id as usize].kicked |= kicked;
        self.wire.hosts[id as usize].leave(now);
        let pos = self.alive_pos[id as usize];
        self.alive.swap_remove(pos);
        if let Some(&moved) = self.alive.get(pos) {
            self.alive_pos[moved as usize] = pos;
        }
        let nbrs: Vec<PeerId> = self.nodes[id as usize].nbrs.iter().map(|n| n.id).collect();
        for n in nbrs {
            self.q
                .push(now + self.sig(n), Ev::Gone { at: n, remote: id });
        }
        let node = &mut self.nodes[id as usize];
        node.nbrs = Vec::new();
        node.have = Vec::new();
        node.reqs = Vec::new();
    }

    fn drop_nbr(&mut self, at: PeerId, remote: PeerId) {
        let n = &mut self.nodes[at as usize];
        n.nbrs.retain(|x| x.id != remote);
        n.reqs.retain(|r| r.1 != remote);
        self.wire.hosts[at as usize].remove_conn(remote);
    }

    /// Sends `frame`; a hostile peer corrupts the blocks it sends (each is
    /// the stream's own: a peer sends only blocks it verified).
    fn send(&mut self, now: u64, from: PeerId, to: PeerId, frame: Frame) {
        let len = frame.encoded_len();
        let overhead = frame.overhead_len();
        if let Some((finish, arrival)) = self.wire.send(now, from, to, len) {
            self.metrics.tally.payload_sent += (len - overhead) as u64;
            self.metrics.tally.overhead_sent += overhead as u64;
            self.q.push(
                arrival,
                Ev::Deliver {
                    from,
                    to,
                    frame: Wired::new(frame, self.nodes[from as usize].hostile),
                    finish,
                },
            );
        }
    }

    fn frame(&mut self, now: u64, from: PeerId, to: PeerId, frame: Frame) {
        match frame {
            Frame::Have(seq) => self.note_have(to, from, seq),
            Frame::Bitfield { start, bits } => {
                for i in 0..bits.len() as u64 * 8 {
                    if bits[(i / 8) as usize] & (0x80 >> (i % 8)) != 0 {
                        self.note_have(to, from, start + i);
                    }
                }
            }
            Frame::Want(seq) => {
                let f = if get(&self.nodes[to as usize].have, seq) {
                    Frame::Block(self.stream.blocks[seq as usize].clone())
                } else {
                    Frame::DontHave(seq)
                };
                self.send(now, to, from, f);
            }
            Frame::DontHave(seq) => {
                self.clear_req(to, from, seq);
            }
            Frame::Block(b) => {
                self.clear_req(to, from, b.header.seq);
                match self.verifier.verify(b) {
                    Ok(v) => {
                        let b = v.into_block();
                        self.got_block(now, to, from, &b);
                    }
                    Err(_) => {
                        self.metrics.tally.rejected += 1;
                        self.drop_nbr(to, from);
                        self.q.push(
                            now + self.sig(from),
                            Ev::Gone {
                                at: from,
                                remote: to,
                            },
                        );
                        let r = &mut self.nodes[from as usize].reporters;
                        if !r.contains(&to) {
                            r.push(to);
                            if r.len() == KICK_REPORTS {
                                self.q.push(
                                    now,
                                    Ev::Leave {
                                        id: from,
                                        kicked: true,
                                    },
                                );
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn note_have(&mut self, at: PeerId, from: PeerId, seq: u64) {
        if seq as usize >= self.stream.len() {
            return;
        }
        let n = &mut self.nodes[at as usize];
        if let Some(nb) = n.nbrs.iter_mut().find(|x| x.id == from) {
            set(&mut nb.have, seq);
        }
        n.highest = Some(n.highest.map_or(seq, |h| h.max(seq)));
    }

    fn clear_req(&mut self, at: PeerId, from: PeerId, seq: u64) {
        let n = &mut self.nodes[at as usize];
        if let Some(i) = n.reqs.iter().position(|r| r.0 == seq && r.1 == from) {
            n.reqs.swap_remove(i);
            if let Some(nb) = n.nbrs.iter_mut().find(|x| x.id == from) {
                nb.outstanding = nb.outstanding.saturating_sub(1);
            }
        }
    }

    fn got_block(
        &mut self,
        now: u64,
        at: PeerId,
        from: PeerId,
        b: &clubcast_protocol::block::Block,
    ) {
        let seq = b.header.seq;
        let n = &mut self.nodes[at as usize];
        if get(&n.have, seq) {
            self.metrics.tally.dup_bytes += b.payload.len() as u64;
            return;
        }
        set(&mut n.have, seq);
        n.highest = Some(n.highest.map_or(seq, |h| h.max(seq)));
        if seq >= n.start {
            self.metrics.played(at, now);
        }
        if !same_block(b, &self.stream.blocks[seq as usize]) {
            self.metrics.tally.corrupt_played += 1;
        }
        let rec = &mut self.metrics.recs[at as usize];
        self.metrics.tally.arrival(
            rec,
            seq,
            b.header.ingest_time_ms,
            now,
            from == 0,
            b.payload.len(),
        );
        let to: Vec<PeerId> = n
            .nbrs
            .iter()
            .filter(|x| x.open && !get(&x.have, seq))
            .map(|x| x.id)
            .collect();
        for t in to {
            self.send(now, at, t, Frame::Have(seq));
        }
    }

    fn tick(&mut self, now: u64, id: PeerId) {
        let head = self.playhead(now, id);
        let n = &mut self.nodes[id as usize];
        n.ticks += 1;
        // Timed-out requests go back to the pool.
        let mut timed_out = Vec::new();
        n.reqs.retain(|r| {
            let keep = now < r.2 + REQUEST_TIMEOUT_US && r.0 >= head;
            if !keep {
                timed_out.push(r.1);
            }
            keep
        });
        for p in timed_out {
            if let Some(nb) = n.nbrs.iter_mut().find(|x| x.id == p) {
                nb.outstanding = nb.outstanding.saturating_sub(1);
            }
        }
        n.origin.retain(|o| o.0 >= head);
        let repair = n.ticks % 10 == 0 && n.nbrs.len() < self.cfg.mesh_neighbours / 2;
        let Some(high) = n.highest else {
            if repair {
                self.find_nbrs(now, id);
            }
            return;
        };
        let mut urgent = Vec::new();
        let mut rare = Vec::new();
        let mut fills = Vec::new();
        for s in head..=high {
            if get(&n.have, s) || n.reqs.iter().any(|r| r.0 == s) {
                continue;
            }
            let dl = self.stream.ingest_us[s as usize] + TARGET_LATENCY_MS * 1000;
            if now + ORIGIN_MARGIN_US >= dl {
                fills.push(s);
                continue;
            }
            let holders = n.nbrs.iter().filter(|x| x.open && get(&x.have, s)).count();
            if holders == 0 {
                continue;
            }
            if now + URGENT_US >= dl {
                urgent.push(s);
            } else {
                rare.push((holders, s));
            }
        }
        rare.sort_unstable();
        for s in urgent.into_iter().chain(rare.into_iter().map(|(_, s)| s)) {
            let n = &mut self.nodes[id as usize];
            let pick = n
                .nbrs
                .iter_mut()
                .filter(|x| x.open && get(&x.have, s) && x.outstanding < MAX_OUTSTANDING)
                .min_by_key(|x| x.outstanding);
            let Some(nb) = pick else { continue };
            nb.outstanding += 1;
            let to = nb.id;
            n.reqs.push((s, to, now));
            self.send(now, id, to, Frame::Want(s));
        }
        for s in fills {
            let n = &mut self.nodes[id as usize];
            let i = match n.origin.iter().position(|o| o.0 == s) {
                Some(i) => i,
                None => {
                    n.origin.push((s, 0, false));
                    n.origin.len() - 1
                }
            };
            let (_, tries, pending) = n.origin[i];
            if pending || tries >= 2 {
                continue;
            }
            n.origin[i] = (s, tries + 1, true);
            let len = self.stream.wire_len(s);
            let rtt = self.wire.rtt(id, 0);
            if self.origin.fetch(id, len) {
                let down = self.cfg.bitrate_kbps * 1000 * DOWNLOAD_X;
                let xfer = (len as u64 * 8 * 1_000_000).div_ceil(down);
                let extra = self.wire.loss_delay(id, 0);
                self.q
                    .push(now + rtt + xfer + extra, Ev::OriginBlock { to: id, seq: s });
            } else {
                self.q.push(now + rtt, Ev::GapFail { to: id, seq: s });
            }
        }
        if repair {
            self.find_nbrs(now, id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;
    use crate::net::Host;
    use crate::population;

    /// A host keeps only the frames still in its serializer: those sent are
    /// retired, or a 10,000-peer run would hold every frame it sent (13 GiB
    /// over 120 s).
    #[test]
    fn hosts_retire_the_frames_they_sent() {
        let cfg = Config {
            mode: Mode::MeshPull,
            peers: 60,
            seconds: 10,
            ..Config::default()
        }
        .validated()
        .expect("a valid config");
        let verifier = SimVerifier::new(7);
        let stream = Stream::new(&cfg, &verifier);
        let verifier = verifier.sharing(&stream.blocks);
        let viewers = population::draw(&cfg, stream.end_us);
        let mut sim = Sim::new(&cfg, &viewers, stream, verifier);
        sim.run_events();
        let sent = sim.wire.stats.sends;
        let held: usize = sim.wire.hosts.iter().map(Host::pending_frames).sum();
        assert!(sent > 10_000, "the run sent {sent} frames");
        // A host retires frames when it sends, so it may still hold those
        // that left after its last send: a few of its frames, not all.
        assert!(held * 100 < sent as usize, "{held} of {sent} frames held");
    }
}
