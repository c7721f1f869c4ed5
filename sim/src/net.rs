//! The event queue, the network model and the origin's budget.
//!
//! - [`Wheel`]: a calendar queue of events ordered by `(time, tie)`, which a
//!   driver can also empty a window at a time ([`Wheel::take_before`]).
//! - [`Queue`]: a [`Wheel`] of `(time, tie)` keys with the event payloads in a
//!   slab, so it moves 24-byte keys; equal times pop in push order, or in the
//!   order of the caller's tie keys ([`Queue::push_tie`]).
//! - [`Host`]: one FIFO upload serializer per host, per-connection queued
//!   bytes (what the core sees as `bufferedAmount`) and in-order delivery.
//! - [`Wire`]: the hosts with their latency and retransmissions (the `clubs`
//!   driver keeps its hosts itself and draws loss with [`hashed_loss_delay`]).
//! - [`Origin`]: bids, max-min grants and the egress counter.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use clubcast_protocol::bid::{allocate_units, Bid};
use clubcast_protocol::prefetch::{self, Depth};
use clubcast_protocol::signal::PeerId;
use rand::Rng;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::population::{Viewer, SEEDER_UP_BPS, SERVER_ACCESS_US};

/// Least extra delay of a frame that needs a retransmission, µs.
pub const MIN_RETRANSMIT_US: u64 = 200_000;

/// Width of one bucket of the [`Queue`]'s wheel, µs.
pub const BUCKET_US: u64 = 1_000;
/// Buckets in the wheel: events up to this many buckets ahead wait in a
/// bucket, later ones in the far heap.
pub const WHEEL_BUCKETS: usize = 4_096;

/// Discrete events ordered by time, then by the order they were pushed.
///
/// A [`Wheel`] of `(time, tie, slot)` keys with the payloads in a slab, so the
/// keys that move when a bucket is sorted are 24 bytes. At 10,000 peers a
/// millisecond holds a few thousand events, so the bucket being sorted stays
/// in cache, where one heap of every pending event would not.
#[derive(Debug)]
pub struct Queue<E> {
    keys: Wheel<u32>,
    slab: Vec<Option<E>>,
    free: Vec<u32>,
    pushed: u64,
}

impl<E> Default for Queue<E> {
    fn default() -> Self {
        Queue {
            keys: Wheel::default(),
            slab: Vec::new(),
            free: Vec::new(),
            pushed: 0,
        }
    }
}

impl<E> Queue<E> {
    /// Schedules `e` at `at_us`; equal times pop in push order.
    pub fn push(&mut self, at_us: u64, e: E) {
        self.pushed += 1;
        self.push_tie(at_us, self.pushed, e);
    }

    /// Schedules `e` at `at_us`; equal times pop in the order of `tie`, which
    /// the caller keeps unique (do not mix with [`Queue::push`]).
    pub fn push_tie(&mut self, at_us: u64, tie: u64, e: E) {
        let slot = match self.free.pop() {
            Some(i) => {
                self.slab[i as usize] = Some(e);
                i
            }
            None => {
                self.slab.push(Some(e));
                (self.slab.len() - 1) as u32
            }
        };
        self.keys.push_tie(at_us, tie, slot);
    }

    /// Time of the next event.
    pub fn peek_time(&mut self) -> Option<u64> {
        self.keys.peek_time()
    }

    /// The next event, with its time and tie key.
    pub fn peek(&mut self) -> Option<(u64, u64, &E)> {
        let (t, tie, &slot) = self.keys.peek()?;
        let e = self.slab[slot as usize]
            .as_ref()
            .expect("a queued slot holds its event");
        Some((t, tie, e))
    }

    /// Takes the next event.
    pub fn pop(&mut self) -> Option<(u64, E)> {
        self.pop_tie().map(|(t, _, e)| (t, e))
    }

    /// Takes the next event, with its tie key.
    pub fn pop_tie(&mut self) -> Option<(u64, u64, E)> {
        let (t, tie, slot) = self.keys.pop_tie()?;
        let e = self.slab[slot as usize]
            .take()
            .expect("a queued slot holds its event");
        self.free.push(slot);
        Some((t, tie, e))
    }

    /// Events popped so far.
    pub fn popped(&self) -> u64 {
        self.keys.popped
    }
}

/// A calendar queue of events ordered by (time, tie): the events of the
/// current millisecond bucket in a vector, sorted when the first is popped,
/// those of the next [`WHEEL_BUCKETS`] ms in one unsorted bucket per
/// millisecond, and later ones in a far heap. The events sit in the buckets
/// themselves, so a driver that takes a window's events at once
/// ([`Wheel::take_before`]) and orders them itself writes and reads them in
/// bucket order, with no sorting. [`Queue`] is one of `(time, tie, slot)` keys
/// over a slab.
#[derive(Debug)]
pub struct Wheel<E> {
    /// Events before `near_end`; latest first when `sorted`.
    near: Vec<(u64, u64, E)>,
    sorted: bool,
    /// End of the current bucket, µs.
    near_end: u64,
    /// Bucket `i` holds events in `[near_end + (i - 1) * BUCKET_US, +BUCKET_US)`
    /// for `i` counted from `head` round the ring, starting at 1.
    wheel: Vec<Vec<(u64, u64, E)>>,
    /// The wheel slot of the bucket after the current one.
    head: usize,
    /// Events in the wheel.
    in_wheel: usize,
    /// Events at or after the wheel's end.
    far: BinaryHeap<Reverse<Far<E>>>,
    /// Emptied vectors, which keep their memory for the next buckets to fill:
    /// a bucket that is not filling holds none (4,096 buckets of a few
    /// thousand events each would hold over half a GiB).
    spare: Vec<Vec<(u64, u64, E)>>,
    /// Events popped or taken so far.
    pub popped: u64,
}

/// Most emptied vectors a [`Wheel`] keeps.
const SPARE_BUCKETS: usize = 16;

/// An event of [`Wheel`]'s far heap, ordered by (time, tie) alone.
#[derive(Debug)]
struct Far<E>(u64, u64, E);

impl<E> PartialEq for Far<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.0, self.1) == (o.0, o.1)
    }
}

impl<E> Eq for Far<E> {}

impl<E> PartialOrd for Far<E> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl<E> Ord for Far<E> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.0, self.1).cmp(&(o.0, o.1))
    }
}

impl<E> Default for Wheel<E> {
    fn default() -> Self {
        Wheel {
            near: Vec::new(),
            sorted: true,
            near_end: 0,
            wheel: (0..WHEEL_BUCKETS).map(|_| Vec::new()).collect(),
            head: 0,
            in_wheel: 0,
            far: BinaryHeap::new(),
            spare: Vec::new(),
            popped: 0,
        }
    }
}

impl<E> Wheel<E> {
    /// Schedules `e` at `at_us`; equal times pop in the order of `tie`, which
    /// the caller keeps unique.
    pub fn push_tie(&mut self, at_us: u64, tie: u64, e: E) {
        if at_us < self.near_end {
            if self.sorted {
                let pos = self
                    .near
                    .partition_point(|&(t, k, _)| (t, k) > (at_us, tie));
                self.near.insert(pos, (at_us, tie, e));
            } else {
                self.near.push((at_us, tie, e));
            }
            return;
        }
        let ahead = ((at_us - self.near_end) / BUCKET_US) as usize;
        if ahead < WHEEL_BUCKETS {
            let bucket = &mut self.wheel[(self.head + ahead) % WHEEL_BUCKETS];
            if bucket.capacity() == 0 {
                if let Some(v) = self.spare.pop() {
                    *bucket = v;
                }
            }
            bucket.push((at_us, tie, e));
            self.in_wheel += 1;
        } else {
            self.far.push(Reverse(Far(at_us, tie, e)));
        }
    }

    /// Makes `near` hold the earliest events, if there are any.
    fn refill(&mut self) {
        while self.near.is_empty() {
            if self.in_wheel == 0 {
                let Some(Reverse(Far(t, _, _))) = self.far.peek() else {
                    return;
                };
                self.near_end = t - t % BUCKET_US;
            } else {
                // The bucket becomes `near`, and `near`'s empty vector a
                // spare.
                let bucket = std::mem::take(&mut self.wheel[self.head]);
                let old = std::mem::replace(&mut self.near, bucket);
                if self.spare.len() < SPARE_BUCKETS && old.capacity() > 0 {
                    self.spare.push(old);
                }
                self.sorted = false;
                self.in_wheel -= self.near.len();
                self.head = (self.head + 1) % WHEEL_BUCKETS;
            }
            self.near_end += BUCKET_US;
            let wheel_end = self.near_end + WHEEL_BUCKETS as u64 * BUCKET_US;
            while self.far.peek().is_some_and(|Reverse(f)| f.0 < wheel_end) {
                let Reverse(Far(t, tie, e)) = self.far.pop().expect("peeked");
                self.push_tie(t, tie, e);
            }
        }
    }

    /// Makes `near` hold the earliest events, latest first.
    fn refill_sorted(&mut self) {
        self.refill();
        if !self.sorted {
            self.near.sort_unstable_by_key(|e| Reverse((e.0, e.1)));
            self.sorted = true;
        }
    }

    /// Time of the next event.
    pub fn peek_time(&mut self) -> Option<u64> {
        self.peek().map(|e| e.0)
    }

    /// The next event, with its time and tie key.
    pub fn peek(&mut self) -> Option<(u64, u64, &E)> {
        self.refill_sorted();
        self.near.last().map(|(t, tie, e)| (*t, *tie, e))
    }

    /// Takes the next event, with its tie key.
    pub fn pop_tie(&mut self) -> Option<(u64, u64, E)> {
        self.refill_sorted();
        let e = self.near.pop()?;
        self.popped += 1;
        Some(e)
    }

    /// Hands every event before `end_us` to `f`, bucket by bucket, in no
    /// particular order within a bucket.
    pub fn take_before(&mut self, end_us: u64, mut f: impl FnMut(u64, u64, E)) {
        loop {
            self.refill();
            if self.near.is_empty() {
                return;
            }
            if self.near_end <= end_us {
                self.popped += self.near.len() as u64;
                for (t, tie, e) in self.near.drain(..) {
                    f(t, tie, e);
                }
                continue;
            }
            // The window ends within this bucket.
            if self.sorted {
                while self.near.last().is_some_and(|e| e.0 < end_us) {
                    let (t, tie, e) = self.near.pop().expect("peeked");
                    self.popped += 1;
                    f(t, tie, e);
                }
                return;
            }
            let mut i = 0;
            while i < self.near.len() {
                if self.near[i].0 < end_us {
                    let (t, tie, e) = self.near.swap_remove(i);
                    self.popped += 1;
                    f(t, tie, e);
                } else {
                    i += 1;
                }
            }
            return;
        }
    }
}

/// One direction of a connection, as its sender sees it.
#[derive(Debug, Clone)]
pub struct Conn {
    /// The other end.
    pub remote: PeerId,
    /// Whether the data channel is open.
    pub open: bool,
    /// Link roles the membership gave this connection (closed at 0).
    pub roles: u32,
    /// Bytes queued on it that have not left the serializer.
    pub queued: usize,
    /// Arrival of the latest frame sent on it (ordered delivery), µs.
    last_arrival: u64,
    dirty: bool,
}

/// A frame in a host's serializer.
#[derive(Debug, Clone, Copy, Default)]
struct Sending {
    /// When it has left, µs.
    finish: u64,
    /// Its remote.
    to: u32,
    /// Its bytes.
    len: u32,
}

/// Frames in a serializer oldest first: the first [`PENDING_INLINE`] inline, in
/// the host's own cache lines, and the rest in a spill queue. Every event
/// reads the oldest, and a host seldom has more in flight (at 1,000 peers,
/// 99 % of sends found at most 4), so the common case costs no cache miss.
#[derive(Debug, Default)]
struct Pending {
    ring: [Sending; PENDING_INLINE],
    head: u8,
    len: u8,
    /// Frames behind a full ring (empty unless the ring is full).
    spill: VecDeque<Sending>,
}

/// Frames a [`Host`] keeps inline in its serializer queue.
const PENDING_INLINE: usize = 4;

impl Pending {
    fn push(&mut self, s: Sending) {
        if usize::from(self.len) < PENDING_INLINE {
            debug_assert!(self.spill.is_empty());
            self.ring[(usize::from(self.head) + usize::from(self.len)) % PENDING_INLINE] = s;
            self.len += 1;
        } else {
            self.spill.push_back(s);
        }
    }

    fn front(&self) -> Option<&Sending> {
        (self.len > 0).then(|| &self.ring[usize::from(self.head)])
    }

    /// Drops the oldest frame.
    fn pop(&mut self) {
        if self.len == 0 {
            return;
        }
        self.head = ((usize::from(self.head) + 1) % PENDING_INLINE) as u8;
        self.len -= 1;
        if let Some(s) = self.spill.pop_front() {
            self.ring[(usize::from(self.head) + usize::from(self.len)) % PENDING_INLINE] = s;
            self.len += 1;
        }
    }

    fn clear(&mut self) {
        self.len = 0;
        self.spill.clear();
    }
}

/// A host's network attachment. The fields every send and every event's
/// sync read come first, together (`repr(C)`).
#[derive(Debug)]
#[repr(C)]
pub struct Host {
    /// Frames in the serializer.
    pending: Pending,
    /// `conns[i].remote`, packed: a search reads a few cache lines, not every
    /// connection.
    remotes: Vec<PeerId>,
    /// Its connections.
    conns: Vec<Conn>,
    busy_until: u64,
    /// Upload capacity, bit/s.
    pub up_bps: u64,
    /// Bytes it queued for upload, every frame counted.
    pub sent_bytes: u64,
    /// Frames it offered to send: with its id, the key of each frame's loss draw
    /// ([`hashed_loss_delay`]).
    pub frames: u64,
    /// Access latency, µs: its share of a round trip ([`Wire::rtt`]).
    pub access_us: u64,
    /// Whether it is in the swarm.
    pub alive: bool,
    /// When it left, µs (u64::MAX while present).
    pub left_us: u64,
}

impl Host {
    /// A host uploading at `up_bps` with access latency `access_us`.
    pub fn new(up_bps: u64, access_us: u64) -> Self {
        Host {
            up_bps,
            access_us,
            alive: false,
            left_us: u64::MAX,
            sent_bytes: 0,
            conns: Vec::new(),
            remotes: Vec::new(),
            busy_until: 0,
            pending: Pending::default(),
            frames: 0,
        }
    }

    /// Prefetches, at `depth`, what an event for a frame from one of
    /// `remotes` reads first: its fields, then its remote list, then the
    /// connections to `remotes` (see `clubcast_protocol::prefetch`).
    pub fn prefetch(&self, depth: Depth, remotes: [Option<PeerId>; 2]) {
        match depth {
            Depth::Struct => {
                prefetch::line(&self.busy_until);
                prefetch::line(&self.remotes);
                prefetch::line(&self.conns);
                prefetch::line(&self.up_bps);
            }
            Depth::Heap => prefetch::at(&self.remotes, 0),
            Depth::Behind => {
                for i in remotes.into_iter().flatten().filter_map(|r| self.index(r)) {
                    prefetch::at(&self.conns, i);
                }
            }
        }
    }

    /// The remote of the frame that leaves its serializer next.
    pub fn sending_to(&self) -> Option<PeerId> {
        self.pending.front().map(|s| PeerId::from(s.to))
    }

    fn index(&self, remote: PeerId) -> Option<usize> {
        self.remotes.iter().position(|&r| r == remote)
    }

    /// The connection to `remote`, mutable.
    pub fn conn_mut(&mut self, remote: PeerId) -> Option<&mut Conn> {
        self.index(remote).map(|i| &mut self.conns[i])
    }

    /// Adds a closed connection to `remote` (or returns the existing one) and
    /// says whether it is new.
    pub fn add_conn(&mut self, remote: PeerId) -> (&mut Conn, bool) {
        if let Some(i) = self.index(remote) {
            return (&mut self.conns[i], false);
        }
        self.remotes.push(remote);
        self.conns.push(Conn {
            remote,
            open: false,
            roles: 0,
            queued: 0,
            last_arrival: 0,
            dirty: false,
        });
        (self.conns.last_mut().expect("just pushed"), true)
    }

    /// Drops the connection to `remote`.
    pub fn remove_conn(&mut self, remote: PeerId) {
        self.conns.retain(|c| c.remote != remote);
        self.remotes.retain(|&r| r != remote);
    }

    /// Queues `len` bytes to `to` behind everything already sending; the
    /// path's one-way delay is `owd` and its loss delay `extra`, µs (the
    /// caller counts retransmissions). Returns
    /// `(finish, arrival)` in µs, or `None` when there is no open connection.
    pub fn send(
        &mut self,
        now_us: u64,
        to: PeerId,
        owd: u64,
        extra: u64,
        len: usize,
        stats: &mut SendStats,
    ) -> Option<(u64, u64)> {
        let i = self.index(to).filter(|&i| self.conns[i].open)?;
        let tx_us = (len as u64 * 8 * 1_000_000).div_ceil(self.up_bps.max(1));
        let finish = self.busy_until.max(now_us) + tx_us;
        stats.backlog_us_sum += finish - now_us;
        stats.sends += 1;
        if finish - now_us > 2_000_000 {
            stats.late_sends += 1;
        }
        self.busy_until = finish;
        self.sent_bytes += len as u64;
        self.pending.push(Sending {
            finish,
            to: u32::try_from(to).expect("host ids fit in 32 bits"),
            len: len as u32,
        });
        let c = &mut self.conns[i];
        c.queued += len;
        // SCTP delivers a channel's messages in order: a retransmitted frame
        // holds back the ones behind it.
        let arrival = (finish + owd + extra).max(c.last_arrival);
        c.last_arrival = arrival;
        Some((finish, arrival))
    }

    /// Keeps its upload busy for `tx_us` from `from_us` on (or from when it
    /// is next free) with `len` bytes bound outside the swarm (the upload
    /// probe): frames queued meanwhile wait behind them.
    pub fn occupy(&mut self, from_us: u64, tx_us: u64, len: u64) {
        self.busy_until = self.busy_until.max(from_us) + tx_us;
        self.sent_bytes += len;
    }

    /// Frames in its serializer, those that left it but were not yet
    /// retired ([`Host::sync`]) included.
    pub fn pending_frames(&self) -> usize {
        usize::from(self.pending.len) + self.pending.spill.len()
    }

    /// When its serializer has sent every frame queued so far, µs (`None`
    /// when nothing is queued).
    pub fn idle_at(&self) -> Option<u64> {
        self.pending.front().map(|_| self.busy_until)
    }

    /// Retires the frames that left the serializer by `now_us` and fills
    /// `changed` with each connection whose queue changed, as (remote, queued
    /// bytes), in connection order. `dirty` is scratch space.
    pub fn sync(
        &mut self,
        now_us: u64,
        changed: &mut Vec<(PeerId, usize)>,
        dirty: &mut Vec<usize>,
    ) {
        changed.clear();
        while let Some(&Sending { finish, to, len }) = self.pending.front() {
            if finish > now_us {
                break;
            }
            self.pending.pop();
            if let Some(i) = self.index(PeerId::from(to)) {
                let c = &mut self.conns[i];
                c.queued = c.queued.saturating_sub(len as usize);
                if !c.dirty {
                    c.dirty = true;
                    dirty.push(i);
                }
            }
        }
        // In connection order, as a pass over them all would give.
        dirty.sort_unstable();
        for i in dirty.drain(..) {
            let c = &mut self.conns[i];
            c.dirty = false;
            changed.push((c.remote, c.queued));
        }
    }

    /// Forgets everything (the host left).
    pub fn leave(&mut self, now_us: u64) {
        self.alive = false;
        self.left_us = now_us;
        self.conns.clear();
        self.remotes.clear();
        self.pending.clear();
    }
}

/// Hosts and the links between them. Host 0 is the server.
#[derive(Debug)]
pub struct Wire {
    /// Hosts by peer id.
    pub hosts: Vec<Host>,
    loss: f64,
    rng: ChaCha8Rng,
    /// Counters of the frames sent.
    pub stats: SendStats,
    /// Scratch of [`Host::sync`] for [`Wire::send`]: connections whose
    /// queue changed, which no driver of a `Wire` reads.
    changed: Vec<(PeerId, usize)>,
    /// Scratch of [`Host::sync`]: connections of the host being synced.
    dirty: Vec<usize>,
}

impl Wire {
    /// The server plus `viewers` (ids 1..).
    pub fn new(viewers: &[Viewer], loss: f64, seed: u64) -> Self {
        let mut hosts = vec![Host::new(SEEDER_UP_BPS, SERVER_ACCESS_US)];
        hosts[0].alive = true;
        hosts.extend(viewers.iter().map(|v| Host::new(v.up_bps, v.access_us)));
        Wire {
            hosts,
            loss,
            rng: ChaCha8Rng::seed_from_u64(seed ^ 0x1055),
            stats: SendStats::default(),
            changed: Vec::new(),
            dirty: Vec::new(),
        }
    }

    /// One-way delay between two hosts: half their round trip, µs.
    pub fn owd(&self, a: PeerId, b: PeerId) -> u64 {
        self.rtt(a, b) / 2
    }

    /// Round trip between two hosts: the sum of their access latencies, µs.
    pub fn rtt(&self, a: PeerId, b: PeerId) -> u64 {
        self.hosts[a as usize].access_us + self.hosts[b as usize].access_us
    }

    /// Extra delay of a frame on the path `a`–`b`: a retransmission with
    /// probability `loss`.
    pub fn loss_delay(&mut self, a: PeerId, b: PeerId) -> u64 {
        if self.loss > 0.0 && self.rng.gen::<f64>() < self.loss {
            self.stats.retransmits += 1;
            MIN_RETRANSMIT_US.max(self.rtt(a, b))
        } else {
            0
        }
    }

    /// Queues `len` bytes from `from` to `to` behind everything `from` is
    /// already sending. Returns `(finish, arrival)` in µs, or `None` when there
    /// is no open connection.
    ///
    /// It first retires the frames that left `from`'s serializer by `now_us`:
    /// no driver of a `Wire` reads buffer levels, and frames never retired
    /// would pile up, 16 bytes for each frame of the run (13 GiB at 10,000
    /// mesh-pull peers × 120 s).
    pub fn send(
        &mut self,
        now_us: u64,
        from: PeerId,
        to: PeerId,
        len: usize,
    ) -> Option<(u64, u64)> {
        self.hosts[from as usize].sync(now_us, &mut self.changed, &mut self.dirty);
        let owd = self.owd(from, to);
        let extra = self.loss_delay(from, to);
        self.hosts[from as usize].send(now_us, to, owd, extra, len, &mut self.stats)
    }
}

/// Counters of the frames hosts sent; a parallel driver keeps one per thread.
#[derive(Debug, Default, Clone, Copy)]
pub struct SendStats {
    /// Frames that needed a retransmission.
    pub retransmits: u64,
    /// Sum over frames of the time from queueing to leaving, µs.
    pub backlog_us_sum: u64,
    /// Frames sent.
    pub sends: u64,
    /// Frames that waited more than 2 s in their serializer.
    pub late_sends: u64,
}

impl SendStats {
    /// Adds `o` into `self`.
    pub fn add(&mut self, o: &SendStats) {
        self.retransmits += o.retransmits;
        self.backlog_us_sum += o.backlog_us_sum;
        self.sends += o.sends;
        self.late_sends += o.late_sends;
    }
}

/// The loss delay of the frame with draw key `key`: as
/// [`Wire::loss_delay`], but drawn from a hash of the key rather than one
/// shared generator, so a frame's fate does not depend on the order in which
/// threads send ([`crate::clubs`] keys it by sender and the sender's frame count).
pub fn hashed_loss_delay(loss: f64, key: u64, rtt_us: u64) -> u64 {
    let unit = (crate::verify::mix(key) >> 11) as f64 / (1u64 << 53) as f64;
    if loss > 0.0 && unit < loss {
        MIN_RETRANSMIT_US.max(rtt_us)
    } else {
        0
    }
}

/// The origin: gap-fill grants out of an egress budget, and the egress meter.
///
/// The budget is a rate, and the origin holds it over the whole run: an
/// interval's fills are planned on the seeder's egress of the interval before,
/// so an interval may overspend, and the next one pays it back; and the run
/// never spends more than the budget times its duration (fills still running
/// after the stream's last block draw on what is left of it).
#[derive(Debug)]
pub struct Origin {
    budget_bits: u64,
    /// Most bits the whole run may send.
    total_bits: u64,
    /// Intervals started so far.
    intervals: u64,
    grants: Vec<u64>,
    pool: u64,
    seed_bits_interval: u64,
    cursor: usize,
    /// Bytes the seeder pushed.
    pub seed_bytes: u64,
    /// Bytes served as gap fill.
    pub fill_bytes: u64,
    /// Gap fills served.
    pub fills_ok: u64,
    /// Gap fills refused (over the grant and the spare pool).
    pub fills_denied: u64,
}

impl Origin {
    /// An origin with `budget_kbps` of egress for hosts `0..hosts`, over a
    /// run of `seconds`.
    pub fn new(budget_kbps: u64, hosts: usize, seconds: u64) -> Self {
        Origin {
            budget_bits: budget_kbps * 1000,
            total_bits: budget_kbps * 1000 * seconds,
            intervals: 0,
            grants: vec![0; hosts],
            pool: 0,
            seed_bits_interval: 0,
            cursor: 0,
            seed_bytes: 0,
            fill_bytes: 0,
            fills_ok: 0,
            fills_denied: 0,
        }
    }

    /// The seeder pushed `bytes`.
    pub fn seeded(&mut self, bytes: usize) {
        self.seed_bytes += bytes as u64;
        self.seed_bits_interval += bytes as u64 * 8;
    }

    /// A new 1 s interval: what the seeder did not use of the budget in the
    /// last one, less any overspend still to pay back, is split among `bids`
    /// (max-min fair in whole blocks of `block_bits`, as the server does); the
    /// unallocated rest is a first-come pool for fetches nobody bid for.
    pub fn new_interval(&mut self, bids: &[Bid], block_bits: u64) {
        self.intervals += 1;
        let allowed = (self.budget_bits * self.intervals).min(self.total_bits);
        let left = allowed.saturating_sub(self.egress_bytes() * 8);
        let avail = left
            .min(self.budget_bits)
            .saturating_sub(self.seed_bits_interval);
        self.seed_bits_interval = 0;
        self.grants.iter_mut().for_each(|g| *g = 0);
        let grants = allocate_units(avail, bids, block_bits, &mut self.cursor);
        let mut given = 0;
        for g in grants {
            self.grants[g.peer as usize] = g.bits;
            given += g.bits;
        }
        self.pool = avail - given;
    }

    /// A fetch of `bytes` by `peer`: within its grant, else the spare pool.
    pub fn fetch(&mut self, peer: PeerId, bytes: usize) -> bool {
        let bits = bytes as u64 * 8;
        let g = &mut self.grants[peer as usize];
        if *g >= bits {
            *g -= bits;
        } else if self.pool >= bits {
            self.pool -= bits;
        } else {
            self.fills_denied += 1;
            return false;
        }
        self.fills_ok += 1;
        self.fill_bytes += bytes as u64;
        true
    }

    /// All bytes the server sent (seeding plus gap fill).
    pub fn egress_bytes(&self) -> u64 {
        self.seed_bytes + self.fill_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An interval that overspends (the seeder's share is planned on the
    /// interval before) is paid back by the next, and the run never spends
    /// more than its budget times its duration, however long fills go on.
    #[test]
    fn the_origin_pays_back_an_overspend_and_keeps_the_run_budget() {
        // 100 kbit/s over 3 s: 100,000 bits an interval, 300,000 in all.
        let mut o = Origin::new(100, 2, 3);
        o.new_interval(&[], 8);
        assert!(o.fetch(1, 12_500), "a whole interval's pool");
        assert!(!o.fetch(1, 1), "and no more");
        o.seeded(6_250);
        // 150,000 bits sent against 100,000: the next interval has nothing.
        o.new_interval(&[], 8);
        assert!(!o.fetch(1, 1), "the overspend is paid back first");
        // Nothing sent in the second: a full interval again, not more.
        o.new_interval(&[], 8);
        assert!(o.fetch(1, 12_500));
        assert!(!o.fetch(1, 1));
        // Past the run's 3 s, only what is left of 300,000 bits.
        o.new_interval(&[], 8);
        assert!(o.fetch(1, 6_250));
        assert!(!o.fetch(1, 1), "the run's budget is spent");
        assert_eq!(o.egress_bytes() * 8, 300_000);
    }

    /// The inline serializer queue is a FIFO, through its spill queue too
    /// (bursts longer than the ring), and `clear` empties both parts.
    #[test]
    fn pending_frames_leave_in_send_order_past_the_inline_ring() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut p = Pending::default();
        let mut reference = VecDeque::new();
        let mut max_len = 0;
        for n in 0..20_000u64 {
            match rng.gen_range(0..10) {
                0..=4 => {
                    let s = Sending {
                        finish: n,
                        to: rng.gen(),
                        len: rng.gen(),
                    };
                    p.push(s);
                    reference.push_back((s.finish, s.to, s.len));
                }
                5..=8 => {
                    p.pop();
                    reference.pop_front();
                }
                _ if n % 1_000 == 9 => {
                    p.clear();
                    reference.clear();
                }
                _ => {}
            }
            max_len = max_len.max(reference.len());
            assert_eq!(
                p.front().map(|s| (s.finish, s.to, s.len)),
                reference.front().copied()
            );
        }
        assert!(max_len > PENDING_INLINE, "the spill queue was used");
        while let Some(&s) = p.front() {
            assert_eq!(Some((s.finish, s.to, s.len)), reference.pop_front());
            p.pop();
        }
        assert!(reference.is_empty());
    }

    /// A time to schedule at when it is `now`: mostly within 3 ms, some in
    /// the past, some exactly now and some up to 20 s ahead (past the wheel).
    fn draw_time(rng: &mut ChaCha8Rng, now: u64) -> u64 {
        match rng.gen_range(0..10) {
            0 => now.saturating_sub(rng.gen_range(0..5_000)),
            1 => now + rng.gen_range(0..20_000_000),
            2 => now,
            _ => now + rng.gen_range(0..3_000),
        }
    }

    /// The wheel pops what one heap of every event would, and a take hands
    /// over exactly the events before its end, whichever of pops and takes
    /// ran before and wherever the events were filed (near, wheel-wide, far,
    /// past times).
    #[test]
    fn the_wheel_pops_in_order_and_takes_exactly_the_events_before_the_end() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut w = Wheel::default();
        let mut reference = BinaryHeap::new();
        let mut now = 1_000_000_000u64;
        let (mut n, mut taken) = (0u64, 0u64);
        for round in 0..20_000 {
            for _ in 0..rng.gen_range(0..4) {
                let at = draw_time(&mut rng, now);
                n += 1;
                w.push_tie(at, n, n);
                reference.push(Reverse((at, n)));
            }
            assert_eq!(w.peek_time(), reference.peek().map(|Reverse((t, _))| *t));
            if round % 5 == 0 {
                let end = now + rng.gen_range(0..4_000);
                let mut got = Vec::new();
                w.take_before(end, |t, tie, e| {
                    assert_eq!(tie, e);
                    got.push((t, tie));
                });
                got.sort_unstable();
                let mut want = Vec::new();
                while reference.peek().is_some_and(|Reverse((t, _))| *t < end) {
                    want.push(reference.pop().expect("peeked").0);
                }
                assert_eq!(got, want, "a take before {end}");
                taken += got.len() as u64;
                now = now.max(end);
            } else if round % 3 != 0 {
                if let Some((t, tie, e)) = w.pop_tie() {
                    assert_eq!(tie, e);
                    assert_eq!(Some(Reverse((t, tie))), reference.pop());
                    now = now.max(t);
                }
            }
        }
        assert!(taken > 1_000, "takes took events ({taken})");
        while let Some((t, tie, _)) = w.pop_tie() {
            assert_eq!(Some(Reverse((t, tie))), reference.pop());
        }
        assert!(reference.is_empty());
        assert_eq!(w.popped, n);
    }

    /// The calendar queue pops what one heap of every event would, near,
    /// wheel-wide and far pushes interleaved with pops, past times included.
    #[test]
    fn the_queue_pops_in_time_then_push_order() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut q = Queue::default();
        let mut reference = BinaryHeap::new();
        let mut n = 0u64;
        let mut now = 1_000_000_000u64;
        let mut popped = Vec::new();
        let mut expected = Vec::new();
        for round in 0..20_000 {
            for _ in 0..rng.gen_range(0..4) {
                let at = draw_time(&mut rng, now);
                n += 1;
                q.push(at, n);
                reference.push(Reverse((at, n)));
            }
            if round % 3 != 0 {
                assert_eq!(q.peek_time(), reference.peek().map(|Reverse((t, _))| *t));
                if let Some((t, e)) = q.pop() {
                    now = now.max(t);
                    popped.push((t, e));
                    let Reverse(r) = reference.pop().expect("same length");
                    expected.push(r);
                }
            }
        }
        while let Some(p) = q.pop() {
            popped.push(p);
            let Reverse(r) = reference.pop().expect("same length");
            expected.push(r);
        }
        assert!(reference.is_empty());
        assert_eq!(popped, expected);
        assert_eq!(q.popped(), n);
    }
}
