//! `clubs` mode: the real [`Membership`], [`Source`] and [`Peer`] state
//! machines on the simulated network.
//!
//! Signaling (welcome, link changes) reaches a peer one server round trip after
//! the server decided it; a new connection opens two peer round trips after
//! both ends heard of it (offer/answer, then ICE, DTLS and SCTP).
//!
//! # Threads: conservative windows
//! The viewers are dealt to partitions in chunks of [`CHUNK`] ids, and each
//! partition has its own event queue and its own thread. Nothing a viewer does
//! reaches another viewer sooner than the shortest one-way delay between two
//! viewers, the *lookahead*, so the partitions run the events of a window that
//! long side by side (synchronous conservative simulation, as in YAWNS).
//! Between two windows one thread
//! - hands over the frames bound for another partition;
//! - serves the window's requests to the server (gap fills, bad-peer and
//!   slow-source reports) in time order: each answer takes at least a round
//!   trip to the server, longer than a window;
//! - runs the server's own events, in time order with those requests. A
//!   block cut, a join or the seeder's connection opening reads no viewer's
//!   state, and reaches a viewer no sooner than a seeder push (half a round
//!   trip to the server), so a window may span one, and it runs after the
//!   window, where the window stops that long after it; a leave or a bid
//!   ends a window (a test checks that the results are the same).
//!
//! Equal times run in the order of (actor, the actor's count of events it
//! scheduled), not in the order a queue was pushed, and loss is drawn from a
//! hash of (sender, its frame count), so the results do not depend on the
//! number of threads (a test checks it).
//!
//! For the same reason a partition runs a window viewer by viewer, each
//! viewer's events in their own time order (`Part::run_by_peer`): that
//! reads each viewer's state once a window rather than once an event, and
//! gives the results that time order gives (a test checks it too).
//!
//! With `--latency-min-ms 0` there is no lookahead between viewers: one
//! thread runs them, in time order, in windows bounded by the server's round
//! trip.

use std::collections::VecDeque;

use clubcast_protocol::bid::Bid;
use clubcast_protocol::club::{
    club_of, ClubConfig, LateStreak, LinkChange, Membership, Overload, UploadStreak,
    DEFAULT_CAPACITY_PCT, LEAF_CAPACITY_PCT, SATURATED_PCT,
};
use clubcast_protocol::peer::{From, Peer, PeerConfig, PeerEvent};
use clubcast_protocol::prefetch::{self, Depth};
use clubcast_protocol::probe::probe_span;
use clubcast_protocol::signal::{Link, LinkOp, PeerId, SEEDER_PEER_ID};
use clubcast_protocol::source::{Source, SourceEvent};
use clubcast_protocol::wire::Frame;
use clubcast_protocol::Time;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::config::Config;
use crate::metrics::{Collector, DelayHist, Record, Tally};
use crate::net::{hashed_loss_delay, Host, Origin, Queue, SendStats, Wheel};
use crate::population::{Viewer, DOWNLOAD_X, SEEDER_UP_BPS, SERVER_ACCESS_US};
use crate::stream::{Stream, Wired};
use crate::verify::{mix, same_block, SimVerifier};
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
/// Consecutive peer ids that share a partition: neighbours in memory stay on
/// one thread, and the chunks dealt round the threads balance them.
pub const CHUNK: usize = 64;

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
    /// A peer's serializer went idle while pushes wait in its queue.
    Drain(PeerId),
}

impl Ev {
    /// The seq of the block or HAVE it delivers, and its sender.
    fn seq_and_sender(&self) -> (Option<u64>, Option<PeerId>) {
        let Ev::Deliver { from, frame, .. } = self else {
            return (None, None);
        };
        let seq = match frame {
            Wired::Block { seq, .. } | Wired::Have(seq) => Some(*seq),
            Wired::Want(_) | Wired::DontHave(_) | Wired::Other(_) => None,
        };
        (seq, Some(*from))
    }

    /// The viewer whose partition runs it; `None` for the server's own events.
    fn owner(&self) -> Option<PeerId> {
        match self {
            Ev::Produce(_) | Ev::Join(_) | Ev::Leave { .. } | Ev::Bid => None,
            Ev::Open { at, .. } => (*at != SEEDER_PEER_ID).then_some(*at),
            Ev::Welcome(w) => Some(w.id),
            Ev::Signal { ch, .. } => Some(ch.to),
            Ev::Deliver { to, .. } | Ev::OriginBlock { to, .. } | Ev::GapFail { to, .. } => {
                Some(*to)
            }
            Ev::Timer(id) | Ev::Drain(id) => Some(*id),
        }
    }
}

/// What a viewer asks of the server; served between windows, in time order.
#[derive(Debug)]
enum Req {
    GapFill { id: PeerId, seq: u64 },
    SlowSource { id: PeerId, peer: PeerId },
    BadPeer { id: PeerId, peer: PeerId },
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

/// A viewer's simulation state and the server's view of it. The fields up to
/// `peer` are read on every event and come first, together (`repr(C)`).
#[derive(Debug, Default)]
#[repr(C)]
struct Slot {
    timer_at: u64,
    /// When a queued `Drain` is due (u64::MAX: none).
    drain_at: u64,
    /// Millisecond of the last `handle_timeout`.
    fired_ms: u64,
    hostile: bool,
    peer: Option<Peer<SimVerifier>>,
    reporters: Vec<PeerId>,
    /// Its `pushes_late` at the last bid.
    late_seen: u64,
    /// Bytes it had sent at the last bid (payload and control).
    up_seen: u64,
    /// The server's count of its bids over its plan.
    up_streak: UploadStreak,
    /// The server's view of its bids and overload (as `clubcast-server`).
    late_streak: LateStreak,
    overload: Overload,
    /// (dup bytes, rejected, skipped) already folded into the collector.
    folded: bool,
}

/// One host: its peer, its upload and its record. Node 0 is the seeder (its
/// upload only).
#[derive(Debug)]
#[repr(C)]
struct Node {
    /// Events it scheduled: the tie-break of equal times ([`Node::tie`]).
    ties: u32,
    host: Host,
    slot: Slot,
    rec: Record,
}

/// How many viewers ahead [`Part::run_by_peer`] prefetches each depth of a
/// viewer's state: its struct first, the heap behind it once that has
/// arrived, and so on, while it runs the viewers before.
const PREFETCH_AHEAD: [(usize, Depth); 3] =
    [(8, Depth::Struct), (4, Depth::Heap), (2, Depth::Behind)];

/// How many of a viewer's events [`Part::prefetch`] prefetches for: a
/// viewer runs 2.2 events a window on average at 10,000 peers.
const PREFETCH_EVENTS: usize = 3;

impl Node {
    /// Prefetches, at `depth`, what an event of its window, for block `seq`
    /// from `from` (if it is a frame), reads first. The link it sends on is
    /// the same for every event of the window: only the `first` looks it up.
    fn prefetch(&self, depth: Depth, seq: Option<u64>, from: Option<PeerId>, first: bool) {
        // Its fields are what `Struct` loads: only past it may they be read.
        let remotes = if depth == Depth::Struct {
            prefetch::line(&self.ties);
            prefetch::line(&self.slot.timer_at);
            prefetch::line(&self.slot.drain_at);
            [None; 2]
        } else {
            [from, self.host.sending_to().filter(|_| first)]
        };
        self.host.prefetch(depth, remotes);
        self.rec.prefetch(depth, seq);
        if let Some(p) = &self.slot.peer {
            p.prefetch(depth, seq, remotes);
        }
    }

    /// The tie-break key of the next event `id` schedules.
    fn tie(&mut self, id: PeerId) -> u64 {
        next_tie(&mut self.ties, id)
    }
}

/// The tie-break key of the next event viewer `id` schedules, of the `ties`
/// it scheduled so far ([`Node::tie`]).
fn next_tie(ties: &mut u32, id: PeerId) -> u64 {
    *ties += 1;
    id << 32 | u64::from(*ties)
}

/// The network every thread may read: each host's latency and presence (they
/// change only between windows) and the loss model.
#[derive(Debug)]
struct Reach {
    access_us: Vec<u64>,
    alive: Vec<bool>,
    left_us: Vec<u64>,
    loss: f64,
    /// Keys the loss draws of this run.
    loss_key: u64,
}

impl Reach {
    /// Round trip between two hosts: the sum of their access latencies, µs.
    fn rtt(&self, a: PeerId, b: PeerId) -> u64 {
        self.access_us[a as usize] + self.access_us[b as usize]
    }

    /// The loss delay of a transfer whose draw is keyed `key` on the path
    /// `a`–`b`, µs.
    fn loss_delay(&self, key: u64, a: PeerId, b: PeerId) -> u64 {
        hashed_loss_delay(self.loss, self.loss_key ^ mix(key), self.rtt(a, b))
    }

    /// Hands a frame of `len` bytes from `id` (whose upload is `host`) to
    /// `to`; its loss is drawn from (sender, frame count). Returns `(finish,
    /// arrival)`, µs, or `None` with no open connection.
    fn send(
        &self,
        host: &mut Host,
        stats: &mut SendStats,
        now: u64,
        id: PeerId,
        to: PeerId,
        len: usize,
    ) -> Option<(u64, u64)> {
        host.frames += 1;
        let extra = self.loss_delay(id << 40 ^ host.frames, id, to);
        let sent = host.send(now, to, self.rtt(id, to) / 2, extra, len, stats);
        if sent.is_some() {
            stats.retransmits += u64::from(extra > 0);
        }
        sent
    }

    /// How long a message of the server takes to reach `id` and be answered.
    fn sig_delay(&self, id: PeerId) -> u64 {
        if id == SEEDER_PEER_ID {
            0
        } else {
            self.rtt(id, SEEDER_PEER_ID)
        }
    }
}

/// Adds a role to the connection of `host` (at `at`) to `remote`; a new
/// connection opens at the returned time.
fn conn_add(
    host: &mut Host,
    reach: &Reach,
    now: u64,
    at: PeerId,
    remote: PeerId,
    gen: u64,
) -> Option<u64> {
    let (c, new) = host.add_conn(remote);
    c.roles += 1;
    new.then(|| {
        let known = gen + reach.sig_delay(at).max(reach.sig_delay(remote));
        known.max(now) + 2 * reach.rtt(at, remote)
    })
}

/// Takes a role off the connection of `host` to `remote`; says whether that
/// was its last, which closes it.
fn conn_remove(host: &mut Host, remote: PeerId) -> bool {
    let Some(c) = host.conn_mut(remote) else {
        return false;
    };
    c.roles = c.roles.saturating_sub(1);
    if c.roles > 0 {
        return false;
    }
    host.remove_conn(remote);
    true
}

/// The partition that runs the events of viewer `id`.
fn part_of(id: PeerId, parts: usize) -> usize {
    (id as usize / CHUNK) % parts
}

/// The nodes of one partition: every `parts`-th chunk.
struct Mine<'a> {
    chunks: Vec<&'a mut [Node]>,
    parts: usize,
}

impl Mine<'_> {
    fn node(&mut self, id: PeerId) -> &mut Node {
        let c = id as usize / CHUNK;
        &mut self.chunks[c / self.parts][id as usize % CHUNK]
    }
}

/// What the partitions read during a window.
struct Shared<'a> {
    cfg: &'a Config,
    stream: &'a Stream,
    reach: &'a Reach,
    membership: &'a Membership,
    debug: bool,
    cache_blocks: usize,
    parts: usize,
}

/// One thread's share of the viewers' events, and what they produce.
#[derive(Debug)]
struct Part {
    me: usize,
    q: Wheel<Ev>,

    /// Events for other partitions, by partition: (time, tie, event).
    out: Vec<Vec<(u64, u64, Ev)>>,
    /// The earliest time in each of `out` (u64::MAX: none).
    out_min: Vec<u64>,
    /// Events from other partitions, by partition, not yet in `q`: each
    /// partition files its own at the start of a window, side by side.
    inbox: Vec<Vec<(u64, u64, Ev)>>,
    /// The earliest time in `inbox` (u64::MAX: none).
    inbox_min: u64,
    /// The end of the window it runs (frames to other partitions arrive
    /// after it).
    window_end: u64,
    /// Requests to the server: (time, tie, request).
    reqs: Vec<(u64, u64, Req)>,
    tally: Tally,
    sends: SendStats,
    /// Its own copy, so that threads do not share the reference counts of
    /// the blocks their peers cache.
    verifier: SimVerifier,
    evs: Vec<PeerEvent>,
    changed: Vec<(PeerId, usize)>,
    dirty: Vec<usize>,
    /// Skipped blocks of the skipper's own clubs and of other clubs (debug).
    skipped_split: (u64, u64),
    /// With `CLUBCAST_SIM_DEBUG`: block delays of arrivals in the viewer's
    /// own clubs, over the last hop, and from the origin.
    delay_split: Vec<DelayHist>,
    /// The window's events grouped by viewer ([`Part::run_by_peer`]).
    batch: Batch,
}

/// A window's events, grouped by the viewer that runs them: each viewer's in
/// time order, as a list threaded through `next`.
#[derive(Debug, Default)]
struct Batch {
    /// The events, in the order they left the queue (bucket by bucket).
    evs: Vec<Option<(u64, u64, Ev)>>,
    /// The index of the owner's next event in `evs` (`NONE`: its last).
    next: Vec<u32>,
    /// Per viewer id: its first and last event in `evs` (`NONE`: none).
    head: Vec<u32>,
    tail: Vec<u32>,
    /// The viewers with events in the window.
    owners: Vec<PeerId>,
    /// The running viewer's own events due before the window's end that it
    /// scheduled while running: latest first.
    local: Vec<(u64, u64, Ev)>,
    /// The viewer whose events run (peer-major only).
    cur: Option<PeerId>,
    /// The window's end, µs (peer-major only).
    end: u64,
}

const NONE: u32 = u32::MAX;

impl Batch {
    /// (time, tie) of event `i`.
    fn key(&self, i: u32) -> (u64, u64) {
        let (t, tie, _) = self.evs[i as usize].as_ref().expect("not yet run");
        (*t, *tie)
    }

    /// Files event `i` in the list of `owner`, in (time, tie) order: events
    /// come bucket by bucket, in no order within a bucket.
    fn file(&mut self, owner: usize, i: u32) {
        let key = self.key(i);
        match self.tail[owner] {
            NONE => {
                self.head[owner] = i;
                self.tail[owner] = i;
                self.owners.push(owner as PeerId);
            }
            t if self.key(t) < key => {
                self.next[t as usize] = i;
                self.tail[owner] = i;
            }
            _ => {
                let (mut prev, mut at) = (NONE, self.head[owner]);
                while at != NONE && self.key(at) < key {
                    prev = at;
                    at = self.next[at as usize];
                }
                self.next[i as usize] = at;
                match prev {
                    NONE => self.head[owner] = i,
                    p => self.next[p as usize] = i,
                }
            }
        }
    }
}

/// Whether viewer `id` states its upload when it joins: a draw of its own,
/// hashed from the run's seed, so the run's other draws stay as they are
/// (`fraction` 1: every viewer states it).
fn states_upload(fraction: f64, seed: u64, id: PeerId) -> bool {
    let unit = (mix(seed ^ mix(id ^ 0x5354_4154_4544)) >> 11) as f64 / (1u64 << 53) as f64;
    unit < fraction
}

/// Where a viewer's upload probe is ([`Config::upload_probe`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Probe {
    /// None ran (it states its upload, or probes are off).
    None,
    /// Running, reading the upload as this % of the bitrate: the viewer
    /// joins when it ends.
    Running(u32),
    /// It ran, and read this.
    Read(u32),
    /// The viewer left while its probe ran.
    Gone,
}

/// A probe's reading error for viewer `id`, uniform in [-1, 1].
fn probe_draw(seed: u64, id: PeerId) -> f64 {
    let unit = (mix(seed ^ mix(id ^ 0x5052_4f42_4521)) >> 11) as f64 / (1u64 << 53) as f64;
    unit * 2.0 - 1.0
}

fn ms(us: u64) -> Time {
    Time(us / 1000)
}

impl Part {
    fn new(me: usize, parts: usize, verifier: SimVerifier, debug: bool) -> Self {
        Part {
            me,
            q: Wheel::default(),

            out: (0..parts).map(|_| Vec::new()).collect(),
            out_min: vec![u64::MAX; parts],
            inbox: (0..parts).map(|_| Vec::new()).collect(),
            inbox_min: u64::MAX,
            window_end: 0,
            reqs: Vec::new(),
            tally: Tally::default(),
            sends: SendStats::default(),
            verifier,
            evs: Vec::new(),
            changed: Vec::new(),
            dirty: Vec::new(),
            skipped_split: (0, 0),
            delay_split: if debug {
                vec![DelayHist::default(); 3]
            } else {
                Vec::new()
            },
            batch: Batch::default(),
        }
    }

    /// When its next event is due (µs), counting those in its inbox.
    fn next_time(&mut self) -> Option<u64> {
        let inbox = (self.inbox_min < u64::MAX).then_some(self.inbox_min);
        self.q.peek_time().into_iter().chain(inbox).min()
    }

    /// Files the events other partitions sent it in the last window, and
    /// notes the end of the one it starts.
    fn start_window(&mut self, end: u64) {
        for v in &mut self.inbox {
            for (at, tie, ev) in v.drain(..) {
                self.q.push_tie(at, tie, ev);
            }
        }
        self.inbox_min = u64::MAX;
        self.window_end = end;
    }

    /// Runs its events before `end`.
    fn run(&mut self, mine: &mut Mine<'_>, sh: &Shared<'_>, end: u64) {
        self.start_window(end);
        while self.q.peek_time().is_some_and(|t| t < end) {
            let (now, _, ev) = self.q.pop_tie().expect("peeked");
            self.handle(mine, sh, now, ev);
        }
    }

    /// Runs its events before `end` viewer by viewer: no viewer's event
    /// reaches another viewer within the window (it is at most the
    /// lookahead long), so each viewer's events can run together, in their
    /// own time order. The results are those of [`Part::run`] (a test checks
    /// it), and it is faster, as the state of 10,000 viewers is far larger
    /// than the caches:
    /// - a viewer's state is fetched once a window rather than once an event;
    /// - the viewers run in id order, and while one runs, the state of those
    ///   run next is prefetched ([`PREFETCH_AHEAD`], [`Part::prefetch`]), so
    ///   their memory loads overlap its work rather than each event stalling
    ///   on its own in turn;
    /// - the events leave the [`Wheel`] bucket by bucket, with no heap.
    fn run_by_peer(&mut self, mine: &mut Mine<'_>, sh: &Shared<'_>, end: u64, nodes: usize) {
        self.start_window(end);
        let mut b = std::mem::take(&mut self.batch);
        b.head.resize(nodes, NONE);
        b.tail.resize(nodes, NONE);
        self.q.take_before(end, |now, tie, ev| {
            let owner = ev.owner().expect("a viewer's event") as usize;
            let i = u32::try_from(b.evs.len()).expect("a window's events fit in 32 bits");
            b.evs.push(Some((now, tie, ev)));
            b.next.push(NONE);
            b.file(owner, i);
        });
        // In id order: neighbouring viewers' state sits together.
        b.owners.sort_unstable();
        let owners = std::mem::take(&mut b.owners);
        b.end = end;
        self.batch = b;
        for (ahead, depth) in PREFETCH_AHEAD {
            for &p in owners.iter().take(ahead) {
                self.prefetch(mine, p, depth);
            }
        }
        for (j, &o) in owners.iter().enumerate() {
            for (ahead, depth) in PREFETCH_AHEAD {
                if let Some(&p) = owners.get(j + ahead) {
                    self.prefetch(mine, p, depth);
                }
            }
            self.batch.cur = Some(o);
            let mut i = std::mem::replace(&mut self.batch.head[o as usize], NONE);
            self.batch.tail[o as usize] = NONE;
            loop {
                let b = &mut self.batch;
                let queued = (i != NONE).then(|| {
                    let (t, tie, _) = b.evs[i as usize].as_ref().expect("not yet run");
                    (*t, *tie)
                });
                let local = b.local.last().map(|(t, tie, _)| (*t, *tie));
                let (now, ev) = match (queued, local) {
                    (None, None) => break,
                    (Some(q), l) if l.is_none_or(|l| q < l) => {
                        let (t, _, ev) = b.evs[i as usize].take().expect("not yet run");
                        i = b.next[i as usize];
                        (t, ev)
                    }
                    _ => {
                        let (t, _, ev) = b.local.pop().expect("peeked");
                        self.q.popped += 1;
                        (t, ev)
                    }
                };
                self.handle(mine, sh, now, ev);
            }
        }
        let b = &mut self.batch;
        b.cur = None;
        b.evs.clear();
        b.next.clear();
        b.owners = owners;
        b.owners.clear();
    }

    /// Prefetches, at `depth`, what viewer `o`'s first [`PREFETCH_EVENTS`]
    /// events of the window read first (each its own block's slots and
    /// sender's link). The struct depth needs no event.
    fn prefetch(&self, mine: &mut Mine<'_>, o: PeerId, depth: Depth) {
        let n = mine.node(o);
        if depth == Depth::Struct {
            n.prefetch(depth, None, None, true);
            return;
        }
        let b = &self.batch;
        let mut i = b.head[o as usize];
        for k in 0..PREFETCH_EVENTS {
            let Some(Some((_, _, ev))) = b.evs.get(i as usize) else {
                break;
            };
            let (seq, from) = ev.seq_and_sender();
            n.prefetch(depth, seq, from, k == 0);
            i = b.next[i as usize];
        }
    }

    /// Schedules `ev` at `at` in this partition's queue, or, while viewer by
    /// viewer runs a window that `at` falls in, among the running viewer's
    /// events.
    fn sched(&mut self, at: u64, tie: u64, ev: Ev) {
        let b = &mut self.batch;
        if b.cur.is_some() && at < b.end {
            debug_assert_eq!(
                ev.owner(),
                b.cur,
                "an event for another viewer within the window"
            );
            let pos = b.local.partition_point(|&(t, k, _)| (t, k) > (at, tie));
            b.local.insert(pos, (at, tie, ev));
        } else {
            self.q.push_tie(at, tie, ev);
        }
    }

    /// Schedules `ev`, which viewer `owner` runs, in its partition.
    fn post(&mut self, sh: &Shared<'_>, at: u64, tie: u64, owner: PeerId, ev: Ev) {
        let to = part_of(owner, sh.parts);
        if to == self.me {
            self.sched(at, tie, ev);
        } else {
            debug_assert!(at >= self.window_end, "a frame faster than the lookahead");
            self.out_min[to] = self.out_min[to].min(at);
            self.out[to].push((at, tie, ev));
        }
    }

    fn handle(&mut self, mine: &mut Mine<'_>, sh: &Shared<'_>, now: u64, ev: Ev) {
        match ev {
            Ev::Welcome(w) => {
                let Welcome {
                    id,
                    clubs,
                    links,
                    start,
                    edge,
                    gen,
                } = *w;
                let n = mine.node(id);
                if n.slot.peer.is_some() || !sh.reach.alive[id as usize] {
                    return;
                }
                // The wire reports when the serializer goes idle (`Drain`):
                // no polling, and a block is handed to the wire only when the
                // serializer is idle, so it can still be overtaken until then.
                let mut pc = PeerConfig::new(id, sh.cfg.clubs);
                pc.pump_poll_ms = 0;
                pc.send_window = 1;
                pc.cache_blocks = sh.cache_blocks;
                let mut p = Peer::new(pc, self.verifier.clone());
                p.handle_welcome(ms(now), &clubs, &links, start, edge);
                n.slot.peer = Some(p);
                for l in links {
                    self.conn_change(n, sh, now, id, LinkOp::Add, l.peer, gen);
                }
                self.flush(mine, sh, now, id);
            }
            Ev::Signal { ch, gen } => {
                let n = mine.node(ch.to);
                let Some(p) = n.slot.peer.as_mut() else {
                    return;
                };
                p.handle_link(ms(now), ch.op, ch.link);
                self.conn_change(n, sh, now, ch.to, ch.op, ch.link.peer, gen);
            }
            Ev::Open { at, remote } => {
                if !sh.reach.alive[at as usize] || !sh.reach.alive[remote as usize] {
                    return;
                }
                let n = mine.node(at);
                let Some(c) = n.host.conn_mut(remote) else {
                    return;
                };
                if c.open {
                    return;
                }
                c.open = true;
                if let Some(p) = n.slot.peer.as_mut() {
                    p.handle_link_open(ms(now), remote);
                    self.flush(mine, sh, now, at);
                }
            }
            Ev::Deliver {
                from,
                to,
                frame,
                finish,
            } => {
                if finish > sh.reach.left_us[from as usize] {
                    return;
                }
                let n = mine.node(to);
                let Some(p) = n.slot.peer.as_mut() else {
                    return;
                };
                n.host.sync(now, &mut self.changed, &mut self.dirty);
                p.handle_links_buffered(self.changed.iter().copied());
                p.handle_frame(ms(now), from, frame.into_frame(sh.stream));
                self.flush(mine, sh, now, to);
            }
            Ev::Timer(id) => {
                let n = mine.node(id);
                if n.slot.timer_at != now {
                    return;
                }
                n.slot.timer_at = u64::MAX;
                let Some(p) = n.slot.peer.as_mut() else {
                    return;
                };
                if p.poll_timeout().is_some_and(|t| t <= ms(now)) {
                    n.slot.fired_ms = now / 1000;
                    n.host.sync(now, &mut self.changed, &mut self.dirty);
                    p.handle_links_buffered(self.changed.iter().copied());
                    p.handle_timeout(ms(now));
                }
                self.flush(mine, sh, now, id);
            }
            Ev::OriginBlock { to, seq } => {
                let n = mine.node(to);
                let Some(p) = n.slot.peer.as_mut() else {
                    return;
                };
                n.host.sync(now, &mut self.changed, &mut self.dirty);
                p.handle_links_buffered(self.changed.iter().copied());
                p.handle_origin_block(ms(now), sh.stream.blocks[seq as usize].clone());
                self.flush(mine, sh, now, to);
            }
            Ev::GapFail { to, seq } => {
                let Some(p) = mine.node(to).slot.peer.as_mut() else {
                    return;
                };
                p.handle_gap_fill_failed(ms(now), seq);
                self.flush(mine, sh, now, to);
            }
            Ev::Drain(id) => {
                let n = mine.node(id);
                if n.slot.drain_at != now {
                    return;
                }
                n.slot.drain_at = u64::MAX;
                if let Some(idle) = n.host.idle_at().filter(|&t| t > now) {
                    // Frames were queued since: no push can go before they
                    // leave, and waking the peer sooner would only drop its
                    // expired pushes sooner.
                    self.wake_at(n, id, idle);
                    return;
                }
                let Some(p) = n.slot.peer.as_mut() else {
                    return;
                };
                n.host.sync(now, &mut self.changed, &mut self.dirty);
                p.handle_links_buffered(self.changed.iter().copied());
                self.flush(mine, sh, now, id);
            }
            Ev::Produce(_) | Ev::Join(_) | Ev::Leave { .. } | Ev::Bid => {
                debug_assert!(false, "a server event in a partition");
            }
        }
    }

    /// Keeps the connection of viewer `at` to `remote` in step with its
    /// roles: the first role opens it, the last one closes it.
    #[allow(clippy::too_many_arguments)]
    fn conn_change(
        &mut self,
        n: &mut Node,
        sh: &Shared<'_>,
        now: u64,
        at: PeerId,
        op: LinkOp,
        remote: PeerId,
        gen: u64,
    ) {
        match op {
            LinkOp::Add => {
                if let Some(t) = conn_add(&mut n.host, sh.reach, now, at, remote, gen) {
                    let tie = n.tie(at);
                    self.sched(t, tie, Ev::Open { at, remote });
                }
            }
            LinkOp::Remove => {
                if conn_remove(&mut n.host, remote) {
                    if let Some(p) = n.slot.peer.as_mut() {
                        p.handle_link_closed(ms(now), remote);
                    }
                }
            }
        }
    }

    /// Drains a peer's transmits and events, then re-arms its timer.
    fn flush(&mut self, mine: &mut Mine<'_>, sh: &Shared<'_>, now: u64, id: PeerId) {
        let n = mine.node(id);
        let Some(p) = n.slot.peer.as_mut() else {
            return;
        };
        let hostile = n.slot.hostile;
        // Each frame goes to the wire as it is polled, not through a list:
        // a block's frame is 144 bytes to move.
        while let Some(t) = p.poll_transmit() {
            let frame = t.frame;
            debug_assert!(
                !matches!(&frame, Frame::Block(b) if *b != sh.stream.blocks[b.header.seq as usize]),
                "a relayed block is the stream's own"
            );
            let len = frame.encoded_len();
            let overhead = frame.overhead_len();
            if let Some((finish, arrival)) =
                sh.reach
                    .send(&mut n.host, &mut self.sends, now, id, t.to, len)
            {
                self.tally.payload_sent += (len - overhead) as u64;
                self.tally.overhead_sent += overhead as u64;
                if t.to != SEEDER_PEER_ID {
                    let tie = next_tie(&mut n.ties, id);
                    let ev = Ev::Deliver {
                        from: id,
                        to: t.to,
                        frame: Wired::new(frame, hostile),
                        finish,
                    };
                    self.post(sh, arrival, tie, t.to, ev);
                }
            }
        }
        while let Some(e) = p.poll_event() {
            self.evs.push(e);
        }
        let timeout = p.poll_timeout();
        let waiting = p.queued_pushes() > 0;
        let mut evs = std::mem::take(&mut self.evs);
        for e in evs.drain(..) {
            self.event(n, sh, now, id, e);
        }
        self.evs = evs;
        if waiting {
            // The peer's send window is one byte (see `Ev::Welcome`): its
            // queued pushes go out one by one, each when the serializer has
            // sent everything before it, so that is when it next pumps.
            if let Some(at) = n.host.idle_at() {
                if at < n.slot.drain_at || n.slot.drain_at <= now {
                    self.wake_at(n, id, at.max(now));
                }
            }
        }
        if let Some(t) = timeout {
            let mut at = t.0 * 1000;
            if at <= now {
                // Due now: run it in the next event step. A peer that asks
                // for a timeout in the past right after handling one at this
                // millisecond is spinning (see the crate doc): back off.
                at = if n.slot.fired_ms == now / 1000 {
                    now + SPIN_BACKOFF_US
                } else {
                    now + 1
                };
            }
            if at < n.slot.timer_at {
                n.slot.timer_at = at;
                let tie = n.tie(id);
                self.sched(at, tie, Ev::Timer(id));
            }
        }
    }

    /// Wakes viewer `id` (node `n`) with a `Drain` at `at`, in place of any
    /// earlier wake.
    fn wake_at(&mut self, n: &mut Node, id: PeerId, at: u64) {
        n.slot.drain_at = at;
        let tie = n.tie(id);
        self.sched(at, tie, Ev::Drain(id));
    }

    fn event(&mut self, n: &mut Node, sh: &Shared<'_>, now: u64, id: PeerId, e: PeerEvent) {
        match e {
            PeerEvent::Play(b) => {
                n.rec.first_play_us.get_or_insert(now);
                if !same_block(b.block(), &sh.stream.blocks[b.seq() as usize]) {
                    self.tally.corrupt_played += 1;
                }
            }
            PeerEvent::Skip { from, to } => {
                if !sh.debug {
                    return;
                }
                if let Some(clubs) = sh.membership.clubs_of(id) {
                    for seq in from..to {
                        if clubs.contains(&club_of(seq, sh.cfg.clubs)) {
                            self.skipped_split.0 += 1;
                        } else {
                            self.skipped_split.1 += 1;
                        }
                    }
                }
            }
            PeerEvent::Arrived {
                seq,
                ingest_time_ms,
                from,
                bytes,
            } => {
                let server = matches!(from, From::Origin | From::Peer(SEEDER_PEER_ID));
                if sh.debug {
                    let c = club_of(seq, sh.cfg.clubs);
                    let own = sh.membership.clubs_of(id).is_some_and(|cs| cs.contains(&c));
                    let k = match (own, from) {
                        (true, _) => 0,
                        (false, From::Peer(_)) => 1,
                        (false, From::Origin) => 2,
                    };
                    self.delay_split[k].note((now / 1000).saturating_sub(ingest_time_ms));
                }
                self.tally
                    .arrival(&mut n.rec, seq, ingest_time_ms, now, server, bytes);
            }
            PeerEvent::GapFill { seq } => {
                let tie = n.tie(id);
                self.reqs.push((now, tie, Req::GapFill { id, seq }));
            }
            PeerEvent::SlowSource { peer } => {
                let tie = n.tie(id);
                self.reqs.push((now, tie, Req::SlowSource { id, peer }));
            }
            PeerEvent::BadPeer { peer, .. } => {
                let tie = n.tie(id);
                self.reqs.push((now, tie, Req::BadPeer { id, peer }));
            }
        }
    }
}

/// Whether server event `ev` may run after a window that it falls in: it
/// reads no viewer's state, and what it does reaches a viewer no sooner than
/// a seeder push would (a block cut, a join, the seeder's connection
/// opening). A leave ends the viewer's events and a bid reads every viewer,
/// so each of those ends a window.
fn runs_after_window(ev: &Ev) -> bool {
    matches!(ev, Ev::Produce(_) | Ev::Join(_) | Ev::Open { .. })
}

/// The clubs simulation.
pub struct Sim {
    cfg: Config,
    /// The server's own events.
    q: Queue<Ev>,
    parts: Vec<Part>,
    /// By peer id; 0 is the seeder.
    nodes: Vec<Node>,
    reach: Reach,
    membership: Membership,
    source: Source,
    stream: Stream,
    origin: Origin,
    /// What the server side counted (seeder pushes, departed viewers).
    tally: Tally,
    /// The seeder's frames.
    sends: SendStats,
    rng: ChaCha8Rng,
    uploads: Vec<(u64, u64)>,
    block_bits: u64,
    /// Blocks a peer caches ([`CACHE_SECONDS`] of stream).
    cache_blocks: usize,
    /// `SlowSource` reports, and those that replaced an overloaded source (debug).
    slow_reports: (u64, u64),
    /// `CLUBCAST_SIM_DEBUG` is set: print totals every [`DEBUG_EVERY_US`].
    debug: bool,
    end_us: u64,
    /// Longest window the partitions run side by side, µs.
    lookahead: u64,
    /// The partitions run each window viewer by viewer
    /// ([`Part::run_by_peer`]), not in time order.
    by_peer: bool,
    /// Every viewer event before this time has run (debug checks).
    done_us: u64,
    /// The least delay from the server's doing to a viewer's, µs: a seeder
    /// push's one-way delay.
    server_reach: u64,
    /// Server events that run after the window they fall in.
    held: VecDeque<(u64, u64, Ev)>,
    /// Upload probes by viewer id ([`Config::upload_probe`]).
    probes: Vec<Probe>,
    reqs: Vec<(u64, u64, Req)>,
    changed: Vec<(PeerId, usize)>,
    dirty: Vec<usize>,
}

impl Sim {
    /// Builds the run: every join, leave and block is queued up front.
    pub fn new(cfg: &Config, viewers: &[Viewer], stream: Stream, verifier: SimVerifier) -> Self {
        let ccfg = ClubConfig {
            clubs: cfg.clubs,
            in_club_links: cfg.in_club_links,
            ..ClubConfig::default()
        };
        let debug = std::env::var_os("CLUBCAST_SIM_DEBUG").is_some();
        let recs = Collector::records(viewers, stream.len());
        let nodes: Vec<Node> = recs
            .into_iter()
            .enumerate()
            .map(|(i, rec)| {
                let (up, access) = match i.checked_sub(1) {
                    None => (SEEDER_UP_BPS, SERVER_ACCESS_US),
                    Some(v) => (viewers[v].up_bps, viewers[v].access_us),
                };
                let slot = Slot {
                    timer_at: u64::MAX,
                    drain_at: u64::MAX,
                    hostile: rec.hostile,
                    ..Slot::default()
                };
                Node {
                    slot,
                    host: Host::new(up, access),
                    rec,
                    ties: 0,
                }
            })
            .collect();
        let mut alive = vec![false; nodes.len()];
        alive[SEEDER_PEER_ID as usize] = true;
        let reach = Reach {
            access_us: nodes.iter().map(|n| n.host.access_us).collect(),
            alive,
            left_us: vec![u64::MAX; nodes.len()],
            loss: cfg.loss,
            loss_key: mix(cfg.seed ^ 0x1055),
        };
        // Between two viewers a frame takes at least the smaller access
        // latency, and every answer of the server a round trip to it. One
        // thread needs only the latter.
        let min_access = viewers.iter().map(|v| v.access_us).min().unwrap_or(0);
        let threads = if min_access == 0 { 1 } else { cfg.threads() };
        // Viewer by viewer ([`Part::run_by_peer`]) needs windows no longer
        // than a frame between two viewers takes, as threads do.
        let by_peer = min_access > 0 && !cfg.time_order;
        let lookahead = if threads == 1 && !by_peer {
            min_access + SERVER_ACCESS_US
        } else {
            min_access
        };
        let parts = (0..threads)
            .map(|me| Part::new(me, threads, verifier.sharing(&stream.blocks), debug))
            .collect();
        let end_us = stream.end_us + 2_000_000;
        let mut sim = Sim {
            q: Queue::default(),
            parts,
            nodes,
            reach,
            membership: Membership::new(ccfg),
            source: Source::new(cfg.clubs, cfg.seeds_k),
            origin: Origin::new(cfg.origin_budget_kbps, viewers.len() + 1, cfg.seconds),
            tally: Tally::default(),
            sends: SendStats::default(),
            block_bits: stream.block_bits(),
            cache_blocks: (CACHE_SECONDS * cfg.bitrate_kbps * 1000 / 8)
                .div_ceil(cfg.block_kib * 1024)
                .max(64) as usize,
            slow_reports: (0, 0),
            debug,
            stream,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            uploads: Vec::new(),
            end_us,
            lookahead,
            by_peer,
            done_us: 0,
            server_reach: (SERVER_ACCESS_US + min_access) / 2,
            held: VecDeque::new(),
            probes: vec![Probe::None; viewers.len() + 1],
            reqs: Vec::new(),
            changed: Vec::new(),
            dirty: Vec::new(),
            cfg: cfg.clone(),
        };
        for (i, v) in viewers.iter().enumerate() {
            let id = i as PeerId + 1;
            sim.post(v.join_us, Ev::Join(id));
            if let Some(t) = v.leave_us {
                sim.post(t, Ev::Leave { id, kicked: false });
            }
        }
        sim.post(sim.stream.start_us, Ev::Produce(0));
        sim.post(sim.stream.start_us, Ev::Bid);
        sim
    }

    /// Schedules `ev` (the server's doing) in the queue that runs it.
    fn post(&mut self, at: u64, ev: Ev) {
        debug_assert!(
            ev.owner().is_none() || at >= self.done_us,
            "an event in a window that ran"
        );
        let tie = self.nodes[0].tie(SEEDER_PEER_ID);
        match ev.owner() {
            None => self.q.push_tie(at, tie, ev),
            Some(id) => {
                let i = part_of(id, self.parts.len());
                self.parts[i].q.push_tie(at, tie, ev);
            }
        }
    }

    /// Runs to the end and reports.
    pub fn run(mut self) -> Run {
        loop {
            let server = self.q.peek_time();
            let viewers = self.parts.iter_mut().filter_map(Part::next_time).min();
            let Some(next) = server.into_iter().chain(viewers).min() else {
                break;
            };
            if next > self.end_us {
                break;
            }
            if server == Some(next) {
                // At equal times the server's events run first.
                let (now, ev) = self.q.pop().expect("peeked");
                self.handle(now, ev);
                continue;
            }
            let mut end = (next + self.lookahead).min(self.end_us + 1);
            // A server event that reads no viewer's state and reaches the
            // viewers only after the window may fall in it: it runs after
            // the window, in time order with the window's requests, as if the
            // window had stopped at it. Any other ends the window.
            let mut held = std::mem::take(&mut self.held);
            while let Some((t, _, ev)) = self.q.peek() {
                if t >= end {
                    break;
                }
                if !runs_after_window(ev) || self.cfg.cut_at_server_events {
                    end = t;
                    break;
                }
                end = end.min(t + self.server_reach);
                held.push_back(self.q.pop_tie().expect("peeked"));
            }
            self.window(end);
            self.done_us = end;
            self.between_windows(end, &mut held);
            self.held = held;
        }
        let events = self.q.popped() + self.parts.iter().map(|p| p.q.popped).sum::<u64>();
        for p in &self.parts {
            self.tally.add(&p.tally);
            self.sends.add(&p.sends);
        }
        if self.debug {
            let mut tot = clubcast_protocol::peer::PeerStats::default();
            for p in self.nodes.iter().filter_map(|n| n.slot.peer.as_ref()) {
                tot.add(&p.stats());
            }
            let s = &self.sends;
            eprintln!(
                "{tot:?} skipped own/other club {:?} retransmits {} mean serializer wait {} us, waits > 2 s {} of {}; fills ok {} denied {}",
                self.skipped_split(),
                s.retransmits,
                s.backlog_us_sum / s.sends.max(1),
                s.late_sends,
                s.sends,
                self.origin.fills_ok,
                self.origin.fills_denied
            );
            let names = ["own clubs", "last hop", "origin"];
            for (k, name) in names.iter().enumerate() {
                let mut h = DelayHist::default();
                for p in &self.parts {
                    h.add(&p.delay_split[k]);
                }
                eprintln!(
                    "block delay, {name}: {} arrivals, p50/p95/p99 {}/{}/{} ms",
                    h.len(),
                    h.pct(0.5),
                    h.pct(0.95),
                    h.pct(0.99)
                );
            }
        }
        for id in 1..self.nodes.len() as PeerId {
            self.fold(id, self.end_us);
        }
        let metrics = Collector {
            recs: std::mem::take(&mut self.nodes)
                .into_iter()
                .map(|n| n.rec)
                .collect(),
            tally: std::mem::take(&mut self.tally),
        };
        let mut report = metrics.report(
            &self.cfg,
            &self.stream,
            self.end_us,
            self.origin.egress_bytes(),
            &self.uploads,
            events,
            (self.origin.fills_ok, self.origin.fills_denied),
        );
        report.threads = self.parts.len();
        Run {
            report,
            metrics,
            stream: self.stream,
            end_us: self.end_us,
        }
    }

    fn skipped_split(&self) -> (u64, u64) {
        self.parts.iter().fold((0, 0), |a, p| {
            (a.0 + p.skipped_split.0, a.1 + p.skipped_split.1)
        })
    }

    /// Runs every viewer event before `end`, the partitions side by side.
    fn window(&mut self, end: u64) {
        let n = self.parts.len();
        let by_peer = self.by_peer;
        let nodes = self.nodes.len();
        let sh = Shared {
            cfg: &self.cfg,
            stream: &self.stream,
            reach: &self.reach,
            membership: &self.membership,
            debug: self.debug,
            cache_blocks: self.cache_blocks,
            parts: n,
        };
        let mut mine: Vec<Mine<'_>> = (0..n)
            .map(|_| Mine {
                chunks: Vec::new(),
                parts: n,
            })
            .collect();
        for (c, chunk) in self.nodes.chunks_mut(CHUNK).enumerate() {
            mine[c % n].chunks.push(chunk);
        }
        let mut work = self.parts.iter_mut().zip(mine.iter_mut());
        let Some((first, first_mine)) = work.next() else {
            return;
        };
        let run = move |p: &mut Part, m: &mut Mine<'_>, sh: &Shared<'_>| {
            if by_peer {
                p.run_by_peer(m, sh, end, nodes);
            } else {
                p.run(m, sh, end);
            }
        };
        if n == 1 {
            run(first, first_mine, &sh);
            return;
        }
        std::thread::scope(|s| {
            for (p, m) in work {
                let sh = &sh;
                s.spawn(move || run(p, m, sh));
            }
            run(first, first_mine, &sh);
        });
    }

    /// Hands frames over between partitions (each files them itself, in
    /// the next window), then runs the window's requests to the server and
    /// the server events `held` back from it, in time order (the server's
    /// own first at equal times), with those they schedule before `end`.
    fn between_windows(&mut self, end: u64, held: &mut VecDeque<(u64, u64, Ev)>) {
        let n = self.parts.len();
        for i in 0..n {
            for j in (0..n).filter(|&j| j != i) {
                // Swapped, not moved: each list keeps its capacity.
                let mut v = std::mem::take(&mut self.parts[i].out[j]);
                debug_assert!(self.parts[j].inbox[i].is_empty());
                std::mem::swap(&mut v, &mut self.parts[j].inbox[i]);
                self.parts[i].out[j] = v;
                let at = std::mem::replace(&mut self.parts[i].out_min[j], u64::MAX);
                self.parts[j].inbox_min = self.parts[j].inbox_min.min(at);
            }
        }
        let mut reqs = std::mem::take(&mut self.reqs);
        for p in &mut self.parts {
            reqs.append(&mut p.reqs);
        }
        reqs.sort_unstable_by_key(|r| (r.0, r.1));
        let mut pending = reqs.drain(..).peekable();
        loop {
            let posted = self
                .q
                .peek()
                .filter(|e| e.0 < end)
                .map(|(t, tie, _)| (t, tie));
            let first = held.front().map(|e| (e.0, e.1));
            let server = first.into_iter().chain(posted).min();
            let req = pending.peek().map(|r| r.0);
            if let Some((t, tie)) = server.filter(|s| req.is_none_or(|r| s.0 <= r)) {
                let ev = if first == Some((t, tie)) {
                    held.pop_front().expect("peeked").2
                } else {
                    self.q.pop().expect("peeked").1
                };
                debug_assert!(runs_after_window(&ev), "a server event that ends windows");
                self.handle(t, ev);
            } else if let Some((now, _, req)) = pending.next() {
                self.serve(now, req);
            } else {
                break;
            }
        }
        drop(pending);
        self.reqs = reqs;
    }

    /// Serves a viewer's request that reached the server at `now`.
    fn serve(&mut self, now: u64, req: Req) {
        match req {
            Req::GapFill { id, seq } => {
                let len = self.stream.wire_len(seq);
                let rtt = self.reach.rtt(id, SEEDER_PEER_ID);
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
                    let extra = self.reach.loss_delay(!(id << 40 ^ seq), id, SEEDER_PEER_ID);
                    self.sends.retransmits += u64::from(extra > 0);
                    self.post(now + rtt + xfer + extra, Ev::OriginBlock { to: id, seq });
                } else {
                    self.post(now + rtt, Ev::GapFail { to: id, seq });
                }
            }
            Req::SlowSource { id, peer } => {
                self.slow_reports.0 += 1;
                // Another last-hop source, no report, if the source is
                // overloaded and may shed a subscriber (`club::Overload`); the
                // in-club links between the two stay (see
                // `Membership::replace_source`).
                if !self.nodes[peer as usize].slot.overload.may_shed(now / 1000) {
                    return;
                }
                let changes = self.membership.replace_source(id, peer);
                if !changes.is_empty() {
                    self.nodes[peer as usize].slot.overload.shed(now / 1000);
                    self.slow_reports.1 += 1;
                }
                self.schedule_changes(now, changes);
            }
            Req::BadPeer { id, peer } => {
                let changes = self.membership.replace(id, peer, &mut self.rng);
                self.schedule_changes(now, changes);
                let s = &mut self.nodes[peer as usize].slot;
                if !s.reporters.contains(&id) {
                    s.reporters.push(id);
                    if s.reporters.len() == KICK_REPORTS {
                        // The kick takes effect once the server has heard the
                        // report and the peer its verdict.
                        let at = now + self.reach.sig_delay(id);
                        self.post(
                            at,
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

    /// Runs one of the server's own events.
    fn handle(&mut self, now: u64, ev: Ev) {
        match ev {
            Ev::Produce(seq) => self.produce(now, seq),
            Ev::Join(id) => self.join(now, id),
            Ev::Leave { id, kicked } => self.leave(now, id, kicked),
            Ev::Open { at, remote } => {
                debug_assert_eq!(at, SEEDER_PEER_ID);
                if !self.reach.alive[remote as usize] {
                    return;
                }
                let Some(c) = self.nodes[0].host.conn_mut(remote) else {
                    return;
                };
                if !c.open {
                    c.open = true;
                    self.source.handle_link_open(remote, true);
                }
            }
            Ev::Bid => self.bid(now),
            _ => debug_assert!(false, "a viewer's event in the server's queue"),
        }
    }

    fn bid(&mut self, now: u64) {
        let bids: Vec<Bid> = self
            .nodes
            .iter()
            .enumerate()
            .filter_map(|(i, n)| {
                let bits = n.slot.peer.as_ref()?.bid(ms(now), BID_INTERVAL_US / 1000);
                (bits > 0).then_some(Bid {
                    peer: i as PeerId,
                    bits,
                })
            })
            .collect();
        self.origin.new_interval(&bids, self.block_bits);
        // Each peer reports its late pushes and what it sent with its bid.
        let cap = self.membership.config().max_capacity_pct;
        let bitrate = u32::try_from(self.cfg.bitrate_kbps).unwrap_or(u32::MAX);
        let mut shed = Vec::new();
        let mut learned = Vec::new();
        for (id, n) in self.nodes.iter_mut().enumerate() {
            let s = &mut n.slot;
            let Some(p) = &s.peer else { continue };
            let st = p.stats();
            let late = st.pushes_late;
            let late_now = late - s.late_seen;
            let behind = s.late_streak.note_bid(late_now);
            if behind {
                s.overload.mark(now / 1000);
            }
            s.late_seen = late;
            let up = st.bytes_uploaded + st.control_bytes_sent;
            let limit = self.membership.plan_limit_pct(id as PeerId).unwrap_or(cap);
            if s.up_streak.note_bid(
                now / 1000,
                up - s.up_seen,
                BID_INTERVAL_US / 1000,
                bitrate,
                limit,
            ) {
                shed.push(id as PeerId);
            }
            s.up_seen = up;
            // A viewer that stated no upload is planned on a guess; one that
            // falls behind is planned on what it sends.
            if let Some(pct) = s.up_streak.behind_pct(late_now) {
                if !states_upload(self.cfg.stated_upload, self.cfg.seed, id as PeerId) {
                    learned.push((id as PeerId, pct));
                }
            }
        }
        for (id, pct) in learned {
            let nodes = &self.nodes;
            let changes = self
                .membership
                .learn_capacity(id, pct, |m| nodes[m as usize].slot.up_streak.last_pct())
                .unwrap_or_default();
            self.schedule_changes(now, changes);
        }
        for id in shed {
            let nodes = &self.nodes;
            let changes = self
                .membership
                .shed_share(id, |m| nodes[m as usize].slot.up_streak.last_pct());
            if !changes.is_empty() {
                self.nodes[id as usize].slot.up_streak.shed(now / 1000);
            }
            self.schedule_changes(now, changes);
        }
        self.post(now + BID_INTERVAL_US, Ev::Bid);
        if self.debug && now % DEBUG_EVERY_US < BID_INTERVAL_US {
            let retransmits = self.sends.retransmits
                + self.parts.iter().map(|p| p.sends.retransmits).sum::<u64>();
            // Relays (upload at least the bitrate) whose last bid used
            // SATURATED_PCT of their upload or more: a relay stuck there
            // sheds shares (`Membership::plan_limit_pct`).
            let bitrate_bps = self.cfg.bitrate_kbps * 1000;
            let (mut relays, mut full) = (0, 0);
            for n in self.nodes.iter().filter(|n| n.slot.peer.is_some()) {
                let own_pct = n.host.up_bps * 100 / bitrate_bps.max(1);
                if own_pct >= u64::from(LEAF_CAPACITY_PCT) {
                    relays += 1;
                    let used = u64::from(n.slot.up_streak.last_pct());
                    full += usize::from(used * 100 >= u64::from(SATURATED_PCT) * own_pct);
                }
            }
            eprintln!(
                "t {:>4} s: skipped own/other {:?}, fills ok {} denied {}, slow-source reports / replaced {:?}, retransmits {}, relays at >= {} % of their upload {} of {}",
                now / 1_000_000,
                self.skipped_split(),
                self.origin.fills_ok,
                self.origin.fills_denied,
                self.slow_reports,
                retransmits,
                SATURATED_PCT,
                full,
                relays,
            );
        }
    }

    fn produce(&mut self, now: u64, seq: u64) {
        let seeder = &mut self.nodes[0].host;
        seeder.sync(now, &mut self.changed, &mut self.dirty);
        for &(r, q) in &self.changed {
            self.source.handle_link_buffered(r, q);
        }
        let block = &self.stream.blocks[seq as usize];
        self.source.handle_block(seq, block.payload.len());
        let mut delivers = Vec::new();
        while let Some(push) = self.source.poll_push() {
            let frame = Frame::Block(block.clone());
            let len = frame.encoded_len();
            let seeder = &mut self.nodes[0].host;
            if let Some((finish, arrival)) =
                self.reach
                    .send(seeder, &mut self.sends, now, SEEDER_PEER_ID, push.to, len)
            {
                self.origin.seeded(len);
                self.tally.payload_sent += block.payload.len() as u64;
                self.tally.overhead_sent += frame.overhead_len() as u64;
                let ev = Ev::Deliver {
                    from: SEEDER_PEER_ID,
                    to: push.to,
                    frame: Wired::new(frame, false),
                    finish,
                };
                delivers.push((arrival, ev));
            }
        }
        for (at, ev) in delivers {
            self.post(at, ev);
        }
        while let Some(SourceEvent::SlowSeed(p)) = self.source.poll_event() {
            let changes = self.membership.replace(SEEDER_PEER_ID, p, &mut self.rng);
            self.schedule_changes(now, changes);
        }
        if ((seq + 1) as usize) < self.stream.len() {
            self.post(
                self.stream.ingest_us[seq as usize + 1],
                Ev::Produce(seq + 1),
            );
        }
    }

    fn join(&mut self, now: u64, id: PeerId) {
        let bitrate_bps = (self.cfg.bitrate_kbps * 1000).max(1);
        let stated = states_upload(self.cfg.stated_upload, self.cfg.seed, id);
        let host = &self.nodes[id as usize].host;
        let up = host.up_bps.max(1);
        match self.probes[id as usize] {
            Probe::None if !stated && self.cfg.upload_probe => {
                // The player sends the probe on its signaling socket, then
                // its join right behind it; the server times the probe.
                let (bytes, ms) = probe_span(up);
                let read = up as f64 * (1.0 + self.cfg.probe_error * probe_draw(self.cfg.seed, id));
                let pct = (read * 100.0 / bitrate_bps as f64) as u32;
                self.probes[id as usize] = Probe::Running(pct);
                self.nodes[id as usize].host.occupy(now, ms * 1000, bytes);
                let joined = now + ms * 1000 + self.reach.rtt(id, SEEDER_PEER_ID) / 2;
                self.post(joined, Ev::Join(id));
                return;
            }
            Probe::Running(pct) => self.probes[id as usize] = Probe::Read(pct),
            Probe::Gone => return,
            Probe::None | Probe::Read(_) => {}
        }
        self.reach.alive[id as usize] = true;
        let host = &self.nodes[id as usize].host;
        // A viewer states its upload capacity (as a page that knows it sets
        // `upload_kbps`), states what its probe read, or states none and is
        // planned at the server's default.
        let pct = if stated {
            host.up_bps * 100 / bitrate_bps
        } else {
            match self.probes[id as usize] {
                Probe::Read(pct) => u64::from(pct),
                _ => u64::from(DEFAULT_CAPACITY_PCT),
            }
        };
        let j = self
            .membership
            .join_with_capacity(id, true, pct as u32, &mut self.rng);
        let (start, edge) = self.stream.start_for(now);
        self.post(
            now + self.reach.sig_delay(id),
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
        if !self.reach.alive[id as usize] {
            // Left during its upload probe: it never joins.
            if let Probe::Running(_) = self.probes[id as usize] {
                self.probes[id as usize] = Probe::Gone;
            }
            return;
        }
        self.fold(id, now);
        let n = &mut self.nodes[id as usize];
        n.rec.leave_us = Some(now);
        n.rec.kicked |= kicked;
        n.host.leave(now);
        n.slot.peer = None;
        self.reach.alive[id as usize] = false;
        self.reach.left_us[id as usize] = now;
        let changes = self.membership.leave(id, &mut self.rng);
        self.schedule_changes(now, changes);
    }

    /// Folds a viewer's counters into the collector (once).
    fn fold(&mut self, id: PeerId, now: u64) {
        let n = &mut self.nodes[id as usize];
        if n.slot.folded {
            return;
        }
        let Some(p) = n.slot.peer.as_ref() else {
            return;
        };
        n.slot.folded = true;
        let st = p.stats();
        self.tally.dup_bytes += st.dup_bytes;
        self.tally.rejected += st.blocks_rejected;
        self.tally.skipped += st.blocks_skipped;
        let from = n.rec.join_us.max(self.stream.start_us);
        self.uploads.push((
            n.host.sent_bytes,
            now.min(self.stream.end_us).saturating_sub(from),
        ));
    }

    fn schedule_changes(&mut self, now: u64, changes: Vec<LinkChange>) {
        for ch in changes {
            if ch.to == SEEDER_PEER_ID {
                self.signal_seeder(now, ch);
            } else {
                let at = now + self.reach.sig_delay(ch.to);
                self.post(at, Ev::Signal { ch, gen: now });
            }
        }
    }

    /// The seeder hears of a link change at once.
    fn signal_seeder(&mut self, now: u64, ch: LinkChange) {
        self.source.handle_link(ch.op, ch.link);
        let remote = ch.link.peer;
        let seeder = &mut self.nodes[0].host;
        match ch.op {
            LinkOp::Add => {
                if let Some(t) = conn_add(seeder, &self.reach, now, SEEDER_PEER_ID, remote, now) {
                    self.post(
                        t,
                        Ev::Open {
                            at: SEEDER_PEER_ID,
                            remote,
                        },
                    );
                }
            }
            LinkOp::Remove => {
                if conn_remove(seeder, remote) {
                    self.source.handle_link_open(remote, false);
                }
            }
        }
    }
}
