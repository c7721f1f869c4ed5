//! The on-demand swarm: one viewer's block exchange for one asset, and the
//! switch-over from HTTP to the swarm (invention 4).
//!
//! A [`VodSwarm`] holds the verified blocks the viewer has (up to a byte
//! bound), knows which blocks each neighbour holds, answers neighbours' wants,
//! and plans what to ask of whom: a neighbour with a `WANT`, or the origin with
//! one HTTP [`Action::Fetch`] at a time. The caller feeds it frames, HTTP
//! results and ticks, and drains [`Action`]s with [`VodSwarm::poll`].
//!
//! It has two modes. In [`Mode::Http`] the origin streams the near part of the
//! fetch window and neighbours are asked for what lies beyond it, so both
//! sources work at once and the bytes each brings measure the swarm on real
//! work. In [`Mode::Swarm`] the HTTP transfer has stopped: the origin is only
//! the deadline backstop, asked for blocks due within `urgent_s` that no
//! neighbour has brought. The switch rule ([`VodSwarm::tick`]) counts the bytes
//! from each source over a sliding window:
//!
//! - Http → Swarm ([`SwitchReason::SwarmKeepsUp`]) when a neighbour has been
//!   linked and the mode has been Http for a whole window since, the swarm
//!   brought at least `switch_share` of the window's bytes, and the media held
//!   in order from the playhead reaches `2 * urgent_s` ahead (or the end);
//! - Swarm → Http when no neighbour is left ([`SwitchReason::NoPeers`], at
//!   once) or the backstop brought at least `fallback_share` of the window's
//!   bytes ([`SwitchReason::Backstop`], not within a window of the last switch).
//!
//! The origin may meter fetches (invention 2): the viewer bids
//! ([`VodSwarm::bid`]) for the blocks due before the swarm can deliver
//! them, the origin grants ([`VodSwarm::grant`]), and a fetch over the
//! grant is refused ([`VodSwarm::http_refused`]): until the next grant,
//! neighbours are asked for the near zone as well.
//!
//! A block's deadline is the start of its fragment's media time minus the
//! playhead, in seconds. Nothing here reads a clock or does I/O: `now_ms` and
//! the playhead are arguments.

use core::ops::Range;
use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use super::{Manifest, MAX_RUN_BLOCKS};
use crate::block::{Block, BlockVerifier, VerifiedBlock};
pub use crate::signal::PeerId;
use crate::wire::{Frame, MAX_BITFIELD_BYTES, MAX_RANGE};

/// Most neighbours one swarm links to; [`VodSwarm::add_peer`] refuses more.
pub const MAX_NEIGHBOURS: usize = 16;
/// Most blocks a neighbour's has-set tracks (1 MiB of bits per neighbour):
/// blocks past it are never wanted from neighbours and come over HTTP. The
/// server's default asset limit (2 GiB) is about 0.5 M blocks, well below it.
pub const MAX_TRACKED_BLOCKS: u64 = 1 << 23;
/// Most blocks one fetch window spans, which bounds the work of a tick.
pub const MAX_WINDOW_BLOCKS: u64 = 16_384;
/// Blocks one bitfield frame covers.
const BITFIELD_BLOCKS: u64 = 8 * MAX_BITFIELD_BYTES as u64;

/// Tuning of the swarm and its switch rule.
#[derive(Debug, Clone, PartialEq)]
pub struct SwarmConfig {
    /// A block due within this many seconds of the playhead is urgent: in
    /// Swarm mode only such blocks go to the origin.
    pub urgent_s: f64,
    /// In Http mode with a neighbour linked, the origin streams blocks due
    /// within this many seconds; neighbours are asked for those beyond.
    pub http_ahead_s: f64,
    /// A want unanswered for this long is given up, and the block asked
    /// elsewhere.
    pub want_timeout_ms: u64,
    /// Most wants in flight to one neighbour.
    pub max_wants_per_peer: usize,
    /// Length of the sliding window over which bytes per source are counted,
    /// and the least time between two switches.
    pub switch_window_ms: u64,
    /// Share of the window's bytes the swarm must bring to switch to Swarm.
    pub switch_share: f64,
    /// Share of the window's bytes the backstop may bring before the swarm
    /// switches back to Http.
    pub fallback_share: f64,
    /// Most bytes of encoded blocks held.
    pub max_store_bytes: usize,
    /// A bid covers the blocks due within this many seconds (at most the
    /// origin's zone) plus the bid interval: what would otherwise stall.
    /// Fetching further ahead is not bid for; it uses the budget nobody
    /// was granted.
    pub bid_ahead_s: f64,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        SwarmConfig {
            urgent_s: 2.0,
            http_ahead_s: 8.0,
            want_timeout_ms: 2_000,
            max_wants_per_peer: 32,
            switch_window_ms: 3_000,
            switch_share: 0.9,
            fallback_share: 0.25,
            max_store_bytes: 128 << 20,
            bid_ahead_s: 4.0,
        }
    }
}

/// Where the bulk of the blocks comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// The origin streams the near part of the window; neighbours the rest.
    #[default]
    Http,
    /// Neighbours bring the window; the origin only fills urgent gaps.
    Swarm,
}

impl Mode {
    /// The name used in logs and stats: `"http"` or `"swarm"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Http => "http",
            Mode::Swarm => "swarm",
        }
    }
}

/// Why the mode changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SwitchReason {
    /// The swarm brought enough of the window's bytes, with enough buffered.
    SwarmKeepsUp,
    /// No neighbour is left.
    NoPeers,
    /// The backstop brought too much of the window's bytes.
    Backstop,
}

impl SwitchReason {
    /// The name used in logs: `"swarm_keeps_up"`, `"no_peers"` or `"backstop"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SwitchReason::SwarmKeepsUp => "swarm_keeps_up",
            SwitchReason::NoPeers => "no_peers",
            SwitchReason::Backstop => "backstop",
        }
    }
}

/// What the caller does next, drained with [`VodSwarm::poll`].
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this frame to that neighbour.
    Send {
        /// The neighbour.
        peer: PeerId,
        /// The frame.
        frame: Frame,
    },
    /// Fetch these blocks from the origin (at most [`MAX_RUN_BLOCKS`],
    /// contiguous). At most one is outstanding: the next comes only after
    /// [`VodSwarm::http_done`] or [`VodSwarm::http_failed`] for it.
    Fetch(Range<u64>),
    /// The mode changed (log it). The byte counts are the window's. A fetch
    /// outstanding when the mode becomes Swarm is left to finish; a caller
    /// that aborts it reports [`VodSwarm::http_failed`].
    Switch {
        /// The new mode.
        mode: Mode,
        /// Why.
        reason: SwitchReason,
        /// Bytes from neighbours in the window.
        swarm_bytes: u64,
        /// Bytes from the origin in the window.
        http_bytes: u64,
    },
    /// The neighbour misbehaved (a block that does not verify, or a seq past
    /// the asset): close its link and report it. The core has already
    /// forgotten it.
    Drop {
        /// The neighbour.
        peer: PeerId,
        /// What it did.
        reason: String,
    },
}

/// Counters of one swarm, for the player's stats.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SwarmStats {
    /// The current mode.
    pub mode: Mode,
    /// Neighbours linked.
    pub peers: usize,
    /// Bytes of blocks wanted from and brought by neighbours.
    pub bytes_from_peers: u64,
    /// Bytes of HTTP bodies from the origin.
    pub bytes_from_origin: u64,
    /// Bytes of blocks sent to neighbours.
    pub bytes_uploaded: u64,
    /// Blocks wanted from and brought by neighbours.
    pub blocks_from_peers: u64,
    /// Blocks from the origin.
    pub blocks_from_origin: u64,
    /// Blocks sent to neighbours.
    pub blocks_uploaded: u64,
    /// Wants sent.
    pub wants_sent: u64,
    /// Wants given up after `want_timeout_ms`.
    pub wants_timed_out: u64,
    /// DONT_HAVE frames received.
    pub dont_haves: u64,
    /// Verified blocks from neighbours that were not wanted from them or
    /// already held.
    pub duplicates: u64,
    /// Blocks from neighbours that did not verify or lay past the asset.
    pub bad_blocks: u64,
    /// Mode switches.
    pub switches: u64,
    /// Blocks not stored because the store was full of blocks in the window.
    pub store_refused: u64,
    /// Origin fetches refused for want of a grant ([`VodSwarm::http_refused`]).
    pub http_refused: u64,
    /// Grants received ([`VodSwarm::grant`]).
    pub grants: u64,
    /// Bits granted in all.
    pub bits_granted: u64,
    /// Bytes of encoded blocks held.
    pub store_bytes: usize,
    /// Blocks held.
    pub held_blocks: u64,
}

/// Which source brought bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Swarm,
    Http,
}

/// A fixed-size set of block seqs.
#[derive(Debug, Clone)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(len: u64) -> Self {
        Bits(vec![0; len.div_ceil(64) as usize])
    }

    /// The word holding bit `i` (none past the end, also where `usize` is
    /// narrower than `u64`).
    fn word(&mut self, i: u64) -> Option<&mut u64> {
        self.0.get_mut(usize::try_from(i / 64).ok()?)
    }

    fn get(&self, i: u64) -> bool {
        usize::try_from(i / 64)
            .ok()
            .and_then(|w| self.0.get(w))
            .is_some_and(|w| (w >> (i % 64)) & 1 == 1)
    }

    fn set(&mut self, i: u64) {
        if let Some(w) = self.word(i) {
            *w |= 1 << (i % 64);
        }
    }

    fn clear(&mut self, i: u64) {
        if let Some(w) = self.word(i) {
            *w &= !(1 << (i % 64));
        }
    }

    /// Sets `r`, a word at a time (a HAVE_RANGE of 65,536 blocks is 1,024
    /// words). Bits past the set's size are ignored.
    fn set_range(&mut self, r: Range<u64>) {
        let mut s = r.start;
        while s < r.end {
            let (word, lo) = (s / 64, s % 64);
            let hi = (r.end - word * 64).min(64);
            let mask = if hi - lo == 64 {
                !0
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let Some(w) = self.word(s) else {
                return;
            };
            *w |= mask;
            s = (word + 1).saturating_mul(64);
        }
    }
}

/// A linked neighbour.
#[derive(Debug)]
struct Neighbour {
    /// The blocks it holds, as far as we know.
    has: Bits,
    /// Our wants in flight to it.
    wants: usize,
}

/// A want in flight.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    peer: PeerId,
    sent_ms: u64,
}

/// One on-demand viewer's block exchange for one asset (see the module doc).
#[derive(Debug)]
pub struct VodSwarm<K: BlockVerifier> {
    key: K,
    cfg: SwarmConfig,
    m: Manifest,
    /// Blocks a has-set tracks: `min(blocks, MAX_TRACKED_BLOCKS)`.
    tracked: u64,
    store: BTreeMap<u64, VerifiedBlock>,
    store_bytes: usize,
    peers: BTreeMap<PeerId, Neighbour>,
    /// When the neighbour count last rose from 0.
    peers_since_ms: Option<u64>,
    /// Links are being made until then ([`VodSwarm::expect_peers`]).
    expect_until_ms: u64,
    inflight: BTreeMap<u64, InFlight>,
    http: Option<Range<u64>>,
    retry_at_ms: u64,
    /// The origin refused a fetch for want of a grant: none before then,
    /// unless a grant comes first.
    refused_until_ms: u64,
    mode: Mode,
    switched_ms: Option<u64>,
    /// Bytes per source in the switch window: (when, source, bytes).
    recent: VecDeque<(u64, Source, u64)>,
    recent_swarm: u64,
    recent_http: u64,
    /// The window `[next_seq, window_end)` of the last tick, its playhead
    /// and the zone the origin was asked for.
    next_seq: u64,
    window_end: u64,
    playhead_s: f64,
    zone_s: f64,
    out: VecDeque<Action>,
    stats: SwarmStats,
}

impl<K: BlockVerifier> VodSwarm<K> {
    /// A swarm for the asset of a verified `manifest`, whose blocks `key`
    /// verifies, in Http mode with nothing held.
    pub fn new(manifest: &Manifest, key: K, cfg: SwarmConfig) -> Self {
        VodSwarm {
            key,
            cfg,
            m: manifest.clone(),
            tracked: manifest.blocks.min(MAX_TRACKED_BLOCKS),
            store: BTreeMap::new(),
            store_bytes: 0,
            peers: BTreeMap::new(),
            peers_since_ms: None,
            expect_until_ms: 0,
            inflight: BTreeMap::new(),
            http: None,
            retry_at_ms: 0,
            refused_until_ms: 0,
            mode: Mode::Http,
            switched_ms: None,
            recent: VecDeque::new(),
            recent_swarm: 0,
            recent_http: 0,
            next_seq: 0,
            window_end: 0,
            playhead_s: 0.0,
            zone_s: 0.0,
            out: VecDeque::new(),
            stats: SwarmStats::default(),
        }
    }

    /// The current mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// A link to `peer` opened: queues our bitfields of held blocks to it
    /// (chunks of at most [`MAX_BITFIELD_BYTES`], all-zero chunks skipped).
    /// False, and nothing done, if it is already linked or
    /// [`MAX_NEIGHBOURS`] are.
    pub fn add_peer(&mut self, peer: PeerId, now_ms: u64) -> bool {
        if self.peers.contains_key(&peer) || self.peers.len() >= MAX_NEIGHBOURS {
            return false;
        }
        if self.peers.is_empty() {
            self.peers_since_ms = Some(now_ms);
        }
        let has = Bits::new(self.tracked);
        self.peers.insert(peer, Neighbour { has, wants: 0 });
        for frame in self.bitfields() {
            self.send(peer, frame);
        }
        true
    }

    /// Links to neighbours are being made, and may open until `until_ms`:
    /// until then, with none open yet, HTTP keeps to the near zone
    /// (`http_ahead_s`) rather than the whole window, so that what lies
    /// beyond is left for the swarm. Without it a joiner fetches the whole
    /// window over HTTP in the second its links take to open.
    pub fn expect_peers(&mut self, until_ms: u64) {
        self.expect_until_ms = self.expect_until_ms.max(until_ms);
    }

    /// The link to `peer` closed: its wants in flight become missing again
    /// (asked elsewhere at the next tick).
    pub fn remove_peer(&mut self, peer: PeerId) {
        if self.peers.remove(&peer).is_none() {
            return;
        }
        self.inflight.retain(|_, w| w.peer != peer);
        if self.peers.is_empty() {
            self.peers_since_ms = None;
        }
    }

    /// A frame from a neighbour. Frames from a peer that is not linked are
    /// ignored.
    ///
    /// HAVE, HAVE_RANGE and BITFIELD are noted (cut at the asset's end).
    /// WANT is answered at once with the block or DONT_HAVE, so CANCEL has
    /// nothing to undo. DONT_HAVE ends our want. A BLOCK that does not verify
    /// or lies past the asset drops the peer; one we did not want from it, or
    /// already hold, is a duplicate; else it is stored and announced.
    pub fn handle_frame(&mut self, peer: PeerId, frame: Frame, now_ms: u64) {
        if !self.peers.contains_key(&peer) {
            return;
        }
        match frame {
            Frame::Have(seq) => self.note_has(peer, seq..seq.saturating_add(1)),
            Frame::HaveRange { start, count } => {
                self.note_has(peer, start..start.saturating_add(u64::from(count)));
            }
            Frame::Bitfield { start, bits } => self.note_bitfield(peer, start, &bits),
            Frame::Want(seq) => self.answer_want(peer, seq),
            Frame::DontHave(seq) => {
                self.stats.dont_haves += 1;
                if let Some(n) = self.peers.get_mut(&peer) {
                    n.has.clear(seq);
                }
                if self.inflight.get(&seq).is_some_and(|w| w.peer == peer) {
                    self.end_want(seq);
                }
            }
            Frame::Block(block) => self.handle_block(peer, block, now_ms),
            Frame::Ping(nonce) => self.send(peer, Frame::Pong(nonce)),
            Frame::Cancel(_) | Frame::Hello { .. } | Frame::Pong(_) | Frame::Prune(_) => {}
        }
    }

    /// The origin answered the fetch for `range` with these blocks, already
    /// verified by the caller, in a body of `bytes` bytes: they are stored
    /// and announced, and a want in flight for one of them is cancelled.
    pub fn http_done(
        &mut self,
        range: Range<u64>,
        blocks: Vec<VerifiedBlock>,
        bytes: u64,
        now_ms: u64,
    ) {
        if self.http.as_ref() == Some(&range) {
            self.http = None;
        }
        self.stats.bytes_from_origin += bytes;
        self.record(now_ms, Source::Http, bytes);
        let mut stored = Vec::with_capacity(blocks.len());
        for b in blocks {
            self.stats.blocks_from_origin += 1;
            let seq = b.seq();
            if seq >= self.m.blocks || self.store.contains_key(&seq) {
                continue;
            }
            if let Some(peer) = self.end_want(seq) {
                self.send(peer, Frame::Cancel(seq));
            }
            if self.store_block(b) {
                stored.push(seq);
            }
        }
        stored.sort_unstable();
        self.announce(&stored, None);
    }

    /// The fetch for `range` failed or was aborted: no new fetch before
    /// `retry_at_ms`. A range other than the outstanding one is ignored.
    pub fn http_failed(&mut self, range: Range<u64>, retry_at_ms: u64) {
        if self.http.as_ref() == Some(&range) {
            self.http = None;
            self.retry_at_ms = retry_at_ms;
        }
    }

    /// The origin refused the fetch for `range` for want of a grant (429):
    /// no new fetch before `retry_at_ms`, or before the next grant of more
    /// than nothing ([`VodSwarm::grant`]), whichever comes first. A range
    /// other than the outstanding one is ignored.
    pub fn http_refused(&mut self, range: Range<u64>, retry_at_ms: u64) {
        if self.http.as_ref() == Some(&range) {
            self.http = None;
            self.refused_until_ms = retry_at_ms;
            self.stats.http_refused += 1;
        }
    }

    /// The bits this viewer bids for the origin's next interval of
    /// `interval_ms` (invention 2): those of the blocks due before the swarm
    /// can deliver them. A block counts when it is missing (neither held
    /// nor being fetched), no neighbour holds it, it is not asked of a
    /// neighbour unless urgent, and its deadline falls within `bid_ahead_s`
    /// (at most the zone the last tick asked of the origin) plus the
    /// interval. Blocks count at the asset's mean encoded size.
    ///
    /// So a viewer that neighbours can serve bids (about) nothing, and the
    /// viewer ahead of the swarm, whose blocks nobody else has, bids for
    /// what it needs not to stall: under a tight budget, the max-min split
    /// goes to it. Fetching further ahead draws on the budget nobody was
    /// granted.
    pub fn bid(&self, interval_ms: u32) -> u64 {
        if self.m.blocks == 0 {
            return 0;
        }
        let ahead = self.zone_s.min(self.cfg.bid_ahead_s);
        let horizon = ahead + f64::from(interval_ms) / 1000.0;
        let fetching = self.http.clone().unwrap_or(0..0);
        let neighbour_has =
            |seq: u64| seq < self.tracked && self.peers.values().any(|n| n.has.get(seq));
        let missing = (self.next_seq..self.window_end)
            .filter(|&s| {
                !fetching.contains(&s)
                    && self.fetchable(s, self.playhead_s, horizon)
                    && !neighbour_has(s)
            })
            .count() as u64;
        let mean_bytes = self.m.bytes.div_ceil(self.m.blocks);
        missing.saturating_mul(mean_bytes).saturating_mul(8)
    }

    /// The origin granted `bits` for its interval now starting: a fetch it
    /// refused ([`VodSwarm::http_refused`]) may go again at once, if the
    /// grant is not nothing. The origin cuts a run at the grant (and lends
    /// what budget nobody was granted), so runs are not sized to it here.
    pub fn grant(&mut self, bits: u64) {
        self.stats.grants += 1;
        self.stats.bits_granted = self.stats.bits_granted.saturating_add(bits);
        if bits > 0 {
            self.refused_until_ms = 0;
        }
    }

    /// The origin cut a fetch at the grant (it brought only the blocks the
    /// grant covered, [`VodSwarm::http_done`]): this interval's budget is
    /// spent, so no new fetch before `until_ms` (the interval's end), or
    /// before the next grant of more than nothing, whichever comes first;
    /// meanwhile neighbours are asked for the near zone too. Without it the
    /// next fetch would go at once and be refused.
    pub fn wait_for_grant(&mut self, until_ms: u64) {
        self.refused_until_ms = self.refused_until_ms.max(until_ms);
    }

    /// The viewer got a grant token: a fetch the origin refused without one
    /// may go again at once.
    pub fn clear_refusal(&mut self) {
        self.refused_until_ms = 0;
    }

    /// Plans: times out wants, evaluates the switch rule, issues the HTTP
    /// fetch if one is due, and issues wants.
    ///
    /// `next_seq` is the first block not yet appended to the media buffer,
    /// `playhead_s` the element's current time and `ahead_s` the fetch window:
    /// `[next_seq, end)`, where `end` is the end of the last fragment that
    /// starts before `playhead_s + ahead_s` (at most [`MAX_WINDOW_BLOCKS`]).
    pub fn tick(&mut self, now_ms: u64, next_seq: u64, playhead_s: f64, ahead_s: f64) {
        self.next_seq = next_seq.min(self.m.blocks);
        self.window_end = self.window_end_for(playhead_s, ahead_s);
        self.time_out_wants(now_ms);
        self.prune(now_ms);
        self.evaluate_switch(now_ms, playhead_s);
        let zone = match self.mode {
            Mode::Http if self.peers.is_empty() && now_ms >= self.expect_until_ms => ahead_s,
            Mode::Http => self.cfg.http_ahead_s,
            Mode::Swarm => self.cfg.urgent_s,
        };
        self.playhead_s = playhead_s;
        self.zone_s = zone;
        let refused = now_ms < self.refused_until_ms;
        if self.http.is_none() && now_ms >= self.retry_at_ms && !refused {
            self.plan_fetch(playhead_s, zone);
        }
        // While the origin refuses for want of a grant, neighbours are asked
        // for the near zone too.
        let origin_zone = if refused { f64::NEG_INFINITY } else { zone };
        self.plan_wants(now_ms, playhead_s, origin_zone);
    }

    /// The next thing to do, if any.
    #[must_use]
    pub fn poll(&mut self) -> Option<Action> {
        self.out.pop_front()
    }

    /// Whether every block of `run` is held (true for an empty run).
    pub fn holds_all(&self, run: Range<u64>) -> bool {
        run.is_empty() || self.store.range(run.clone()).count() as u64 == run.end - run.start
    }

    /// The end of the blocks held in a row from `from`, at most `end`.
    pub fn held_to(&self, from: u64, end: u64) -> u64 {
        let mut next = from;
        for &seq in self.store.range(from..end).map(|(s, _)| s) {
            if seq != next {
                break;
            }
            next += 1;
        }
        next
    }

    /// The payloads of `run` concatenated, or `None` unless all are held. The
    /// blocks stay stored, to serve neighbours.
    pub fn payloads(&self, run: Range<u64>) -> Option<Vec<u8>> {
        if !self.holds_all(run.clone()) {
            return None;
        }
        let blocks = || self.store.range(run.clone()).map(|(_, b)| b.payload());
        let mut out = Vec::with_capacity(blocks().map(Bytes::len).sum());
        for p in blocks() {
            out.extend_from_slice(p);
        }
        Some(out)
    }

    /// The counters.
    pub fn stats(&self) -> SwarmStats {
        SwarmStats {
            mode: self.mode,
            peers: self.peers.len(),
            store_bytes: self.store_bytes,
            held_blocks: self.store.len() as u64,
            ..self.stats
        }
    }

    fn send(&mut self, peer: PeerId, frame: Frame) {
        self.out.push_back(Action::Send { peer, frame });
    }

    /// The deadline of block `seq`: its fragment's start minus the playhead.
    fn deadline(&self, seq: u64, playhead_s: f64) -> f64 {
        let f = self.m.fragments.get(self.m.fragment_of(seq));
        f.map_or(0.0, |f| self.m.seconds(f.media_time)) - playhead_s
    }

    fn window_end_for(&self, playhead_s: f64, ahead_s: f64) -> u64 {
        let limit = playhead_s + ahead_s;
        let n = self
            .m
            .fragments
            .partition_point(|f| self.m.seconds(f.media_time) < limit);
        let end = match n {
            0 => 0,
            n => self.m.fragment_blocks(n - 1).end,
        };
        end.min(self.next_seq.saturating_add(MAX_WINDOW_BLOCKS))
            .max(self.next_seq)
    }

    /// Our held blocks as BITFIELD frames, one per chunk of
    /// [`BITFIELD_BLOCKS`] that holds any, each cut after its last set bit.
    fn bitfields(&self) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut chunk: Option<(u64, Vec<u8>)> = None;
        for &seq in self.store.keys() {
            let start = seq - seq % BITFIELD_BLOCKS;
            if chunk.as_ref().is_some_and(|(s, _)| *s != start) {
                if let Some((start, bits)) = chunk.take() {
                    let bits = Bytes::from(bits);
                    frames.push(Frame::Bitfield { start, bits });
                }
            }
            let (s, bits) = chunk.get_or_insert_with(|| (start, Vec::new()));
            let i = (seq - *s) as usize;
            if bits.len() <= i / 8 {
                bits.resize(i / 8 + 1, 0);
            }
            bits[i / 8] |= 0x80 >> (i % 8);
        }
        if let Some((start, bits)) = chunk {
            let bits = Bytes::from(bits);
            frames.push(Frame::Bitfield { start, bits });
        }
        frames
    }

    fn note_has(&mut self, peer: PeerId, r: Range<u64>) {
        let end = r.end.min(self.tracked);
        if let Some(n) = self.peers.get_mut(&peer) {
            n.has.set_range(r.start..end);
        }
    }

    fn note_bitfield(&mut self, peer: PeerId, start: u64, bits: &[u8]) {
        let tracked = self.tracked;
        let Some(n) = self.peers.get_mut(&peer) else {
            return;
        };
        for (i, &byte) in bits.iter().enumerate() {
            let Some(base) = start.checked_add(8 * i as u64) else {
                return;
            };
            if base >= tracked {
                return;
            }
            for b in (0..8).filter(|b| byte & (0x80 >> b) != 0 && base + b < tracked) {
                n.has.set(base + b);
            }
        }
    }

    fn answer_want(&mut self, peer: PeerId, seq: u64) {
        let frame = match self.store.get(&seq) {
            Some(b) => {
                let block = b.block().clone();
                self.stats.bytes_uploaded += block.encoded_len() as u64;
                self.stats.blocks_uploaded += 1;
                Frame::Block(block)
            }
            None => Frame::DontHave(seq),
        };
        self.send(peer, frame);
    }

    fn handle_block(&mut self, peer: PeerId, block: Block, now_ms: u64) {
        let seq = block.header.seq;
        if seq >= self.m.blocks {
            let why = format!("block {seq} past the asset's {} blocks", self.m.blocks);
            return self.drop_peer(peer, why);
        }
        let block = match self.key.verify(block) {
            Ok(b) => b,
            Err(e) => return self.drop_peer(peer, format!("block {seq}: {e}")),
        };
        let wanted = self.inflight.get(&seq).is_some_and(|w| w.peer == peer);
        if wanted {
            self.end_want(seq);
        }
        if !wanted || self.store.contains_key(&seq) {
            self.stats.duplicates += 1;
            return;
        }
        let bytes = block.block().encoded_len() as u64;
        self.stats.bytes_from_peers += bytes;
        self.stats.blocks_from_peers += 1;
        self.record(now_ms, Source::Swarm, bytes);
        if let Some(n) = self.peers.get_mut(&peer) {
            n.has.set(seq);
        }
        if self.store_block(block) {
            self.announce(&[seq], Some(peer));
        }
    }

    fn drop_peer(&mut self, peer: PeerId, reason: String) {
        self.stats.bad_blocks += 1;
        self.remove_peer(peer);
        self.out.push_back(Action::Drop { peer, reason });
    }

    /// Ends the want in flight for `seq`, if any, and says to whom it went.
    fn end_want(&mut self, seq: u64) -> Option<PeerId> {
        let w = self.inflight.remove(&seq)?;
        if let Some(n) = self.peers.get_mut(&w.peer) {
            n.wants = n.wants.saturating_sub(1);
        }
        Some(w.peer)
    }

    /// Stores `block`, making room if it can; false if the store is full of
    /// blocks worth more.
    fn store_block(&mut self, block: VerifiedBlock) -> bool {
        let len = block.block().encoded_len();
        let need = (self.store_bytes + len).saturating_sub(self.cfg.max_store_bytes);
        if need > 0 && !self.make_room(block.seq(), need) {
            self.stats.store_refused += 1;
            return false;
        }
        self.store_bytes += len;
        self.store.insert(block.seq(), block);
        true
    }

    /// Evicts at least `need` bytes for block `seq`, or nothing if it cannot.
    /// Blocks behind the playhead go first (lowest seq first), then those past
    /// the window (highest first); blocks in the window never go, nor blocks
    /// worth more than `seq` itself.
    fn make_room(&mut self, seq: u64, need: usize) -> bool {
        let behind_end = seq.min(self.next_seq);
        let past_start = if seq < self.next_seq {
            u64::MAX
        } else {
            self.window_end.max(seq.saturating_add(1))
        };
        let behind = self.store.range(..behind_end);
        let past = self.store.range(past_start..).rev();
        let mut freed = 0;
        let mut victims = Vec::new();
        for (&s, b) in behind.chain(past) {
            if freed >= need {
                break;
            }
            freed += b.block().encoded_len();
            victims.push(s);
        }
        if freed < need {
            return false;
        }
        for s in victims {
            self.store.remove(&s);
        }
        self.store_bytes -= freed;
        true
    }

    /// Announces newly stored `seqs` (ascending) to every neighbour but
    /// `skip`: consecutive ones as HAVE_RANGE, single ones as HAVE.
    fn announce(&mut self, seqs: &[u64], skip: Option<PeerId>) {
        let mut frames = Vec::new();
        let mut i = 0;
        while i < seqs.len() {
            let start = seqs[i];
            let mut count = 1u32;
            while i + (count as usize) < seqs.len()
                && count < MAX_RANGE
                && seqs[i + count as usize] == start + u64::from(count)
            {
                count += 1;
            }
            frames.push(match count {
                1 => Frame::Have(start),
                _ => Frame::HaveRange { start, count },
            });
            i += count as usize;
        }
        let peers: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in peers.into_iter().filter(|p| Some(*p) != skip) {
            for f in &frames {
                self.send(peer, f.clone());
            }
        }
    }

    /// Counts `bytes` from `source` in the switch window.
    fn record(&mut self, now_ms: u64, source: Source, bytes: u64) {
        self.prune(now_ms);
        match source {
            Source::Swarm => self.recent_swarm += bytes,
            Source::Http => self.recent_http += bytes,
        }
        match self.recent.back_mut() {
            Some((t, s, b)) if *t == now_ms && *s == source => *b += bytes,
            _ => self.recent.push_back((now_ms, source, bytes)),
        }
    }

    /// Forgets bytes older than the switch window.
    fn prune(&mut self, now_ms: u64) {
        while let Some(&(t, source, bytes)) = self.recent.front() {
            if t.saturating_add(self.cfg.switch_window_ms) > now_ms {
                break;
            }
            self.recent.pop_front();
            match source {
                Source::Swarm => self.recent_swarm -= bytes,
                Source::Http => self.recent_http -= bytes,
            }
        }
    }

    fn time_out_wants(&mut self, now_ms: u64) {
        let timeout = self.cfg.want_timeout_ms;
        let expired: Vec<(u64, PeerId)> = self
            .inflight
            .iter()
            .filter(|(_, w)| now_ms.saturating_sub(w.sent_ms) >= timeout)
            .map(|(&seq, w)| (seq, w.peer))
            .collect();
        for (seq, peer) in expired {
            self.end_want(seq);
            self.stats.wants_timed_out += 1;
            // It did not deliver: do not ask it again for this block.
            if let Some(n) = self.peers.get_mut(&peer) {
                n.has.clear(seq);
            }
        }
    }

    fn evaluate_switch(&mut self, now_ms: u64, playhead_s: f64) {
        let (swarm, http) = (self.recent_swarm, self.recent_http);
        let all = (swarm + http) as f64;
        let window = self.cfg.switch_window_ms;
        let reason = match self.mode {
            Mode::Http => {
                let Some(linked) = self.peers_since_ms else {
                    return;
                };
                // A whole window in Http mode with the swarm in play; this
                // also keeps a window between two switches.
                let since = linked.max(self.switched_ms.unwrap_or(0));
                if now_ms.saturating_sub(since) < window
                    || swarm == 0
                    || (swarm as f64) < self.cfg.switch_share * all
                    || !self.buffered_ahead(playhead_s)
                {
                    return;
                }
                SwitchReason::SwarmKeepsUp
            }
            Mode::Swarm if self.peers.is_empty() => SwitchReason::NoPeers,
            Mode::Swarm => {
                let quiet = self
                    .switched_ms
                    .is_none_or(|t| now_ms.saturating_sub(t) >= window);
                if !quiet || all == 0.0 || (http as f64) < self.cfg.fallback_share * all {
                    return;
                }
                SwitchReason::Backstop
            }
        };
        self.mode = match self.mode {
            Mode::Http => Mode::Swarm,
            Mode::Swarm => Mode::Http,
        };
        self.switched_ms = Some(now_ms);
        self.stats.switches += 1;
        self.out.push_back(Action::Switch {
            mode: self.mode,
            reason,
            swarm_bytes: swarm,
            http_bytes: http,
        });
    }

    /// Whether the media held in order from `next_seq` reaches `2 * urgent_s`
    /// past the playhead, or the end of the asset.
    fn buffered_ahead(&self, playhead_s: f64) -> bool {
        let first_missing = self.held_to(self.next_seq, self.m.blocks);
        first_missing >= self.m.blocks
            || self.deadline(first_missing, playhead_s) >= 2.0 * self.cfg.urgent_s
    }

    /// Whether block `seq` may go into the next fetch: missing, not being
    /// fetched, due within `zone` (or not trackable on neighbours), and not
    /// asked of a neighbour unless it is urgent.
    fn fetchable(&self, seq: u64, playhead_s: f64, zone: f64) -> bool {
        if self.store.contains_key(&seq) {
            return false;
        }
        let d = self.deadline(seq, playhead_s);
        (d <= zone || seq >= self.tracked)
            && (!self.inflight.contains_key(&seq) || d <= self.cfg.urgent_s)
    }

    fn plan_fetch(&mut self, playhead_s: f64, zone: f64) {
        let (next, end) = (self.next_seq, self.window_end);
        let Some(first) = (next..end).find(|&s| self.fetchable(s, playhead_s, zone)) else {
            return;
        };
        let limit = end.min(first + MAX_RUN_BLOCKS);
        let last = (first + 1..limit)
            .find(|&s| !self.fetchable(s, playhead_s, zone))
            .unwrap_or(limit);
        for seq in first..last {
            if let Some(peer) = self.end_want(seq) {
                self.send(peer, Frame::Cancel(seq));
            }
        }
        self.http = Some(first..last);
        self.out.push_back(Action::Fetch(first..last));
    }

    fn plan_wants(&mut self, now_ms: u64, playhead_s: f64, zone: f64) {
        let max = self.cfg.max_wants_per_peer;
        let mut free: usize = self
            .peers
            .values()
            .map(|n| max.saturating_sub(n.wants))
            .sum();
        if free == 0 {
            return;
        }
        let fetching = self.http.clone().unwrap_or(0..0);
        let soon = 2.0 * self.cfg.urgent_s;
        let mut urgent = Vec::new();
        let mut rest = Vec::new();
        for seq in self.next_seq..self.window_end.min(self.tracked) {
            if self.store.contains_key(&seq)
                || self.inflight.contains_key(&seq)
                || fetching.contains(&seq)
            {
                continue;
            }
            let d = self.deadline(seq, playhead_s);
            if self.mode == Mode::Http && d <= zone {
                continue;
            }
            let holders = self.peers.values().filter(|n| n.has.get(seq)).count();
            match holders {
                0 => {}
                _ if d <= soon => urgent.push(seq),
                _ => rest.push((holders, seq)),
            }
        }
        rest.sort_unstable();
        for seq in urgent.into_iter().chain(rest.into_iter().map(|(_, s)| s)) {
            let pick = self
                .peers
                .iter()
                .filter(|(_, n)| n.wants < max && n.has.get(seq))
                .min_by_key(|(_, n)| n.wants)
                .map(|(&id, _)| id);
            let Some(peer) = pick else {
                continue;
            };
            if let Some(n) = self.peers.get_mut(&peer) {
                n.wants += 1;
            }
            let sent_ms = now_ms;
            self.inflight.insert(seq, InFlight { peer, sent_ms });
            self.stats.wants_sent += 1;
            self.send(peer, Frame::Want(seq));
            free -= 1;
            if free == 0 {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockFlags, StreamKey, StreamSigner, BLOCK_OVERHEAD};
    use crate::vod::VodFragment;
    use proptest::prelude::*;

    const PAYLOAD: usize = 100;
    const ENCODED: usize = BLOCK_OVERHEAD + PAYLOAD;

    fn signer() -> StreamSigner {
        StreamSigner::from_seed(&[7; 32])
    }

    /// `frags` fragments of 1 s from 0 s, `per` blocks each.
    fn asset(frags: u64, per: u64) -> Manifest {
        let m = Manifest {
            name: "clip".into(),
            key: signer().key(),
            created_ms: 1,
            init_sha256: [0; 32],
            init_bytes: 1,
            timescale: 1000,
            duration: 1000 * frags,
            blocks: frags * per,
            bytes: frags * per * ENCODED as u64,
            fragments: (0..frags)
                .map(|i| VodFragment {
                    seq: i * per,
                    media_time: 1000 * i,
                    keyframe: true,
                })
                .collect(),
        };
        m.validate().unwrap();
        m
    }

    fn block_by(s: &StreamSigner, m: &Manifest, seq: u64) -> VerifiedBlock {
        let t = m.fragments[m.fragment_of(seq)].media_time;
        let payload = Bytes::from(vec![seq as u8; PAYLOAD]);
        s.sign(seq, BlockFlags::empty(), 1, t, payload).unwrap()
    }

    fn block(m: &Manifest, seq: u64) -> VerifiedBlock {
        block_by(&signer(), m, seq)
    }

    fn swarm(m: &Manifest, cfg: SwarmConfig) -> VodSwarm<StreamKey> {
        VodSwarm::new(m, signer().key(), cfg)
    }

    fn drain(s: &mut VodSwarm<StreamKey>) -> Vec<Action> {
        std::iter::from_fn(|| s.poll()).collect()
    }

    fn sends(actions: &[Action], to: PeerId) -> Vec<Frame> {
        let frames = actions.iter().filter_map(|a| match a {
            Action::Send { peer, frame } if *peer == to => Some(frame.clone()),
            _ => None,
        });
        frames.collect()
    }

    fn fetches(actions: &[Action]) -> Vec<Range<u64>> {
        let runs = actions.iter().filter_map(|a| match a {
            Action::Fetch(r) => Some(r.clone()),
            _ => None,
        });
        runs.collect()
    }

    /// Answers a fetch as the origin would.
    fn serve(s: &mut VodSwarm<StreamKey>, m: &Manifest, run: Range<u64>, now: u64) {
        let blocks: Vec<_> = run.clone().map(|q| block(m, q)).collect();
        let bytes = blocks.iter().map(|b| b.block().encoded_len() as u64).sum();
        s.http_done(run, blocks, bytes, now);
    }

    /// A viewer playing at 1x, with neighbours and an origin that answer at once.
    struct Sim {
        s: VodSwarm<StreamKey>,
        m: Manifest,
        now: u64,
        playhead: f64,
        next: u64,
        ahead: f64,
        /// Each neighbour's blocks, and whether it answers wants.
        nbs: BTreeMap<PeerId, (Vec<bool>, bool)>,
        /// Every action, with the playhead when it came.
        log: Vec<(f64, Action)>,
    }

    impl Sim {
        fn new(m: Manifest, cfg: SwarmConfig) -> Self {
            let s = swarm(&m, cfg);
            let (now, playhead, next, ahead) = (0, 0.0, 0, 20.0);
            let (nbs, log) = (BTreeMap::new(), Vec::new());
            Sim {
                s,
                m,
                now,
                playhead,
                next,
                ahead,
                nbs,
                log,
            }
        }

        fn link(&mut self, peer: PeerId, holds: impl Fn(u64) -> bool, answers: bool) {
            assert!(self.s.add_peer(peer, self.now));
            let holds: Vec<bool> = (0..self.m.blocks).map(holds).collect();
            for seq in (0..self.m.blocks).filter(|&q| holds[q as usize]) {
                self.s.handle_frame(peer, Frame::Have(seq), self.now);
            }
            self.nbs.insert(peer, (holds, answers));
            self.drain();
        }

        fn drain(&mut self) {
            while let Some(a) = self.s.poll() {
                match &a {
                    Action::Send {
                        peer,
                        frame: Frame::Want(seq),
                    } => {
                        if let Some((holds, true)) = self.nbs.get(peer) {
                            let f = match holds[*seq as usize] {
                                true => Frame::Block(block(&self.m, *seq).into_block()),
                                false => Frame::DontHave(*seq),
                            };
                            self.s.handle_frame(*peer, f, self.now);
                        }
                    }
                    Action::Fetch(r) => serve(&mut self.s, &self.m, r.clone(), self.now),
                    _ => {}
                }
                self.log.push((self.playhead, a));
            }
        }

        /// Plays on for `ms`, ticking every 100 ms.
        fn run(&mut self, ms: u64) {
            for _ in 0..ms / 100 {
                self.now += 100;
                self.playhead += 0.1;
                while self.next < self.m.blocks && self.s.holds_all(self.next..self.next + 1) {
                    self.next += 1;
                }
                let (now, next, playhead, ahead) = (self.now, self.next, self.playhead, self.ahead);
                self.s.tick(now, next, playhead, ahead);
                self.drain();
            }
        }

        fn switches(&self) -> Vec<(Mode, SwitchReason)> {
            let s = self.log.iter().filter_map(|(_, a)| match a {
                Action::Switch { mode, reason, .. } => Some((*mode, *reason)),
                _ => None,
            });
            s.collect()
        }

        /// The window's bytes (swarm, HTTP) the last switch reported.
        fn last_switch_bytes(&self) -> (u64, u64) {
            let last = self.log.iter().rev().find_map(|(_, a)| match a {
                Action::Switch {
                    swarm_bytes,
                    http_bytes,
                    ..
                } => Some((*swarm_bytes, *http_bytes)),
                _ => None,
            });
            last.expect("a switch")
        }
    }

    /// A neighbour that holds all 240 blocks but 160 (at 40 s) has carried
    /// the viewer into Swarm mode.
    fn in_swarm_mode() -> Sim {
        let mut sim = Sim::new(asset(60, 4), SwarmConfig::default());
        sim.link(1, |q| q != 160, true);
        sim.run(100);
        let actions: Vec<Action> = sim.log.iter().map(|(_, a)| a.clone()).collect();
        // Fragments 0-8 are due within 8 s: HTTP; the next ones go to the neighbour.
        assert_eq!(fetches(&actions), vec![0..36]);
        let to_peer = sends(&actions, 1);
        let wants: Vec<_> = to_peer
            .iter()
            .filter(|f| matches!(f, Frame::Want(_)))
            .collect();
        assert_eq!(wants.len(), 32, "max_wants_per_peer");
        assert!(wants
            .iter()
            .all(|f| matches!(f, Frame::Want(q) if *q >= 36)));
        assert!(to_peer.contains(&Frame::HaveRange {
            start: 0,
            count: 36
        }));
        sim.run(2_900);
        assert_eq!(sim.s.mode(), Mode::Http, "not a whole window yet");
        sim.run(100);
        assert_eq!(
            sim.switches(),
            vec![(Mode::Swarm, SwitchReason::SwarmKeepsUp)]
        );
        let (swarm_bytes, http_bytes) = sim.last_switch_bytes();
        assert!(swarm_bytes as f64 >= 0.9 * (swarm_bytes + http_bytes) as f64);
        assert_eq!(sim.s.stats().mode, Mode::Swarm);
        sim
    }

    #[test]
    fn alone_http_fetches_the_window_in_runs_one_at_a_time() {
        let m = asset(30, 100);
        let mut s = swarm(&m, SwarmConfig::default());
        let mut runs = Vec::new();
        for now in 0..10 {
            s.tick(now, 0, 0.0, 10.0);
            let got = fetches(&drain(&mut s));
            assert!(got.len() <= 1, "{got:?}");
            // Outstanding: no second fetch before it is answered.
            s.tick(now, 0, 0.0, 10.0);
            assert!(fetches(&drain(&mut s)).is_empty());
            for run in got {
                serve(&mut s, &m, run.clone(), now);
                runs.push(run);
            }
        }
        assert_eq!(runs, vec![0..256, 256..512, 512..768, 768..1000]);
        assert!(s.holds_all(0..1000) && !s.holds_all(0..1001));
        assert_eq!(s.stats().blocks_from_origin, 1000);
        assert_eq!(s.stats().bytes_from_origin, 1000 * ENCODED as u64);
        // A failed fetch waits for its retry time.
        s.tick(10, 0, 0.0, 11.0);
        let run = fetches(&drain(&mut s)).pop().unwrap();
        s.http_failed(run.clone(), 500);
        s.tick(499, 0, 0.0, 11.0);
        assert!(fetches(&drain(&mut s)).is_empty());
        s.tick(500, 0, 0.0, 11.0);
        assert_eq!(fetches(&drain(&mut s)), vec![run]);
    }

    #[test]
    fn the_swarm_takes_over_and_http_is_only_the_backstop() {
        let mut sim = in_swarm_mode();
        let switched_at = sim.log.len();
        sim.run(40_000);
        // Only block 160, which the neighbour lacks, comes over HTTP, and only
        // once it is urgent (its fragment starts at 40 s).
        let late: Vec<(f64, Range<u64>)> = sim.log[switched_at..]
            .iter()
            .filter_map(|(p, a)| match a {
                Action::Fetch(r) => Some((*p, r.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(late.len(), 1, "{late:?}");
        assert_eq!(late[0].1, 160..161);
        assert!(late[0].0 >= 38.0 - 1e-9, "{late:?}");
        assert_eq!(sim.switches().len(), 1);
        assert_eq!(sim.next, 240, "every block arrived");
        let st = sim.s.stats();
        assert_eq!(st.blocks_from_origin, 37);
        assert_eq!(st.blocks_from_peers, 203);
        assert_eq!(st.duplicates, 0);
    }

    #[test]
    fn the_bid_is_what_would_stall_that_no_neighbour_has() {
        let m = asset(60, 4);
        let bits = |blocks: u64| blocks * ENCODED as u64 * 8;
        let mut s = swarm(&m, SwarmConfig::default());
        assert_eq!(s.bid(1000), 0, "nothing planned yet");
        // Alone, the origin streams the whole 30-s window (blocks 0..120),
        // but the bid is for what is due within 4 s and the 1-s interval:
        // the fragments at 0..=5 s.
        s.tick(0, 0, 0.0, 30.0);
        let run = fetches(&drain(&mut s))[0].clone();
        assert_eq!(run, 0..120);
        assert_eq!(s.bid(1000), 0, "what is being fetched is not bid for");
        s.http_failed(run, 0);
        assert_eq!(s.bid(1000), bits(24));
        assert_eq!(s.bid(3000), bits(32), "a longer interval: 0..=7 s");
        // Held blocks are not bid for; the playhead moves the horizon on.
        serve(&mut s, &m, 0..8, 10);
        assert_eq!(s.bid(1000), bits(16));
        s.tick(2_000, 8, 2.0, 30.0);
        let run = fetches(&drain(&mut s))[0].clone();
        s.http_failed(run, 0);
        assert_eq!(
            s.bid(1000),
            bits(24),
            "blocks 8..32: the fragments at 2..=7 s"
        );
        // A neighbour that holds blocks 8..20 can deliver them: not bid for.
        assert!(s.add_peer(5, 2_000));
        s.handle_frame(
            5,
            Frame::HaveRange {
                start: 8,
                count: 12,
            },
            2_000,
        );
        assert_eq!(s.bid(1000), bits(12));
        // In Swarm mode the zone is the urgent 2 s: see
        // `once_the_swarm_keeps_up_only_urgent_gaps_are_bid_for`.
    }

    #[test]
    fn once_the_swarm_keeps_up_only_urgent_gaps_are_bid_for() {
        let mut sim = in_swarm_mode();
        assert_eq!(sim.s.mode(), Mode::Swarm);
        assert_eq!(sim.s.bid(1000), 0, "the neighbour brings the window");
        // Block 160, which no neighbour has, is bid for once it is due
        // within the urgent zone (2 s) and the interval (1 s): its fragment
        // starts at 40 s.
        let bid_at = |sim: &mut Sim, t_ms: u64| {
            sim.run(t_ms - sim.now);
            sim.s.bid(1000)
        };
        assert_eq!(bid_at(&mut sim, 36_500), 0);
        assert!(bid_at(&mut sim, 37_200) >= ENCODED as u64 * 8);
    }

    #[test]
    fn a_fetch_refused_for_want_of_a_grant_waits_for_one() {
        let m = asset(20, 4);
        let mut s = swarm(&m, SwarmConfig::default());
        s.tick(0, 0, 0.0, 10.0);
        let run = fetches(&drain(&mut s))[0].clone();
        s.http_refused(run.clone(), 1_000);
        s.http_refused(run.clone(), 9_000); // no longer outstanding: ignored
        s.tick(100, 0, 0.0, 10.0);
        assert!(fetches(&drain(&mut s)).is_empty(), "refused: wait");
        s.grant(0);
        s.tick(200, 0, 0.0, 10.0);
        assert!(
            fetches(&drain(&mut s)).is_empty(),
            "a grant of nothing changes nothing"
        );
        s.grant(80_000);
        s.tick(300, 0, 0.0, 10.0);
        let again = fetches(&drain(&mut s));
        assert_eq!(again, vec![run.clone()], "a grant ends the wait");
        // Without a grant the wait ends at the time the origin gave.
        s.http_refused(run.clone(), 1_000);
        s.tick(999, 0, 0.0, 10.0);
        assert!(fetches(&drain(&mut s)).is_empty());
        s.tick(1_000, 0, 0.0, 10.0);
        assert_eq!(fetches(&drain(&mut s)), vec![run.clone()]);
        let st = s.stats();
        assert_eq!(
            (st.http_refused, st.grants, st.bits_granted),
            (2, 2, 80_000)
        );
        // A run cut at the grant: the rest waits for the next grant too.
        let cut: Vec<_> = (run.start..run.start + 2).map(|q| block(&m, q)).collect();
        s.http_done(run.clone(), cut, 2 * ENCODED as u64, 1_010);
        s.wait_for_grant(2_000);
        s.tick(1_020, 0, 0.0, 10.0);
        assert!(fetches(&drain(&mut s)).is_empty(), "cut: wait");
        s.grant(8_000);
        s.tick(1_030, 0, 0.0, 10.0);
        assert_eq!(fetches(&drain(&mut s)), vec![run.start + 2..run.end]);
    }

    #[test]
    fn while_the_origin_refuses_neighbours_are_asked_for_the_near_zone() {
        let m = asset(20, 4);
        let cfg = SwarmConfig {
            max_wants_per_peer: 200,
            ..SwarmConfig::default()
        };
        let mut s = swarm(&m, cfg);
        assert!(s.add_peer(5, 0));
        s.handle_frame(
            5,
            Frame::HaveRange {
                start: 0,
                count: 80,
            },
            0,
        );
        drain(&mut s);
        let wants = |actions: &[Action]| -> Vec<u64> {
            let w = sends(actions, 5).into_iter().filter_map(|f| match f {
                Frame::Want(q) => Some(q),
                _ => None,
            });
            w.collect()
        };
        s.tick(0, 0, 0.0, 20.0);
        let first = drain(&mut s);
        let run = fetches(&first)[0].clone();
        assert_eq!(run, 0..36, "the near zone: the fragments at 0..=8 s");
        assert_eq!(wants(&first), (36..80).collect::<Vec<_>>());
        s.http_refused(run.clone(), 5_000);
        s.tick(100, 0, 0.0, 20.0);
        assert_eq!(wants(&drain(&mut s)), (0..36).collect::<Vec<_>>());
    }

    #[test]
    fn while_links_are_made_http_keeps_to_the_near_zone() {
        let m = asset(60, 4);
        let mut s = swarm(&m, SwarmConfig::default());
        s.expect_peers(5_000);
        s.tick(0, 0, 0.0, 30.0);
        let near = fetches(&drain(&mut s));
        s.http_failed(near[0].clone(), 0);
        // The links did not open in time: the whole window again.
        s.tick(5_000, 0, 0.0, 30.0);
        let all = fetches(&drain(&mut s));
        assert_eq!(near.len(), 1);
        assert_eq!(all.len(), 1);
        assert_eq!(near[0].start, 0);
        assert!(near[0].end < all[0].end, "{near:?} against {all:?}");
    }

    #[test]
    fn held_to_is_the_end_of_the_blocks_held_in_a_row() {
        let m = asset(4, 4);
        let mut s = swarm(&m, SwarmConfig::default());
        let blocks: Vec<_> = [0, 1, 2, 5].iter().map(|&q| block(&m, q)).collect();
        s.tick(0, 0, 0.0, 30.0);
        let _ = drain(&mut s);
        s.http_done(0..16, blocks, 1, 0);
        assert_eq!(s.held_to(0, 16), 3);
        assert_eq!(s.held_to(0, 2), 2);
        assert_eq!(s.held_to(3, 16), 3);
        assert_eq!(s.held_to(5, 16), 6);
    }

    #[test]
    fn no_neighbour_left_switches_back_at_once() {
        let mut sim = in_swarm_mode();
        sim.s.remove_peer(1);
        sim.nbs.clear();
        sim.run(100);
        assert_eq!(
            sim.switches().last(),
            Some(&(Mode::Http, SwitchReason::NoPeers))
        );
        assert_eq!(sim.s.stats().switches, 2);
        assert_eq!(sim.s.stats().peers, 0);
    }

    #[test]
    fn a_silent_neighbour_hands_back_to_http() {
        let mut sim = in_swarm_mode();
        sim.nbs.get_mut(&1).unwrap().1 = false;
        sim.run(25_000);
        assert_eq!(
            sim.switches().last(),
            Some(&(Mode::Http, SwitchReason::Backstop))
        );
        let (swarm_bytes, http_bytes) = sim.last_switch_bytes();
        assert!(http_bytes as f64 >= 0.25 * (swarm_bytes + http_bytes) as f64);
        assert!(sim.s.stats().wants_timed_out > 0);
        // Back in Http mode the origin keeps playback going.
        sim.run(5_000);
        assert!(sim.s.deadline(sim.next, sim.playhead) > 2.0 || sim.next == 240);
    }

    #[test]
    fn an_urgent_want_is_cancelled_and_fetched_over_http() {
        let m = asset(30, 2);
        let cfg = SwarmConfig {
            want_timeout_ms: 60_000,
            ..SwarmConfig::default()
        };
        let mut s = swarm(&m, cfg);
        assert!(s.add_peer(1, 0));
        s.handle_frame(
            1,
            Frame::HaveRange {
                start: 0,
                count: 60,
            },
            0,
        );
        s.tick(0, 0, 0.0, 20.0);
        let a = drain(&mut s);
        assert_eq!(fetches(&a), vec![0..18]);
        assert_eq!(sends(&a, 1), (18..40).map(Frame::Want).collect::<Vec<_>>());
        serve(&mut s, &m, 0..18, 0);
        drain(&mut s);
        // At 8 s, fragments 9 and 10 (blocks 18-21) are due within 2 s.
        s.tick(100, 18, 8.0, 20.0);
        let a = drain(&mut s);
        let cancels: Vec<Frame> = (18..22).map(Frame::Cancel).collect();
        assert_eq!(sends(&a, 1)[..4], cancels[..]);
        assert_eq!(fetches(&a), vec![18..22]);
        assert!(matches!(a[4], Action::Fetch(_)), "cancel first: {a:?}");
        // A late answer for a cancelled want is a duplicate.
        s.handle_frame(1, Frame::Block(block(&m, 18).into_block()), 200);
        assert_eq!(s.stats().duplicates, 1);
        assert!(!s.holds_all(18..19));
    }

    #[test]
    fn a_forged_block_drops_the_neighbour_and_an_unwanted_one_is_a_duplicate() {
        let m = asset(30, 2);
        let mut s = swarm(&m, SwarmConfig::default());
        s.add_peer(1, 0);
        s.handle_frame(
            1,
            Frame::HaveRange {
                start: 0,
                count: 60,
            },
            0,
        );
        s.tick(0, 0, 0.0, 20.0);
        drain(&mut s);
        let other = StreamSigner::from_seed(&[8; 32]);
        let forged = block_by(&other, &m, 18).into_block();
        s.handle_frame(1, Frame::Block(forged), 10);
        let a = drain(&mut s);
        assert!(matches!(&a[..], [Action::Drop { peer: 1, reason }] if reason.contains("18")));
        assert_eq!((s.stats().peers, s.stats().bad_blocks), (0, 1));
        assert!(!s.holds_all(18..19) && s.inflight.is_empty());
        // The core has forgotten it: its frames are ignored.
        s.handle_frame(1, Frame::Want(0), 20);
        assert!(drain(&mut s).is_empty());

        s.add_peer(2, 30);
        drain(&mut s);
        s.handle_frame(2, Frame::Block(block(&m, 50).into_block()), 40);
        assert_eq!(s.stats().duplicates, 1);
        assert!(!s.holds_all(50..51) && drain(&mut s).is_empty());
        // A block past the asset, even well signed, is an offence.
        let past = block(&m, 60).into_block();
        s.handle_frame(2, Frame::Block(past), 50);
        assert!(matches!(&drain(&mut s)[..], [Action::Drop { peer: 2, .. }]));
    }

    #[test]
    fn wants_are_answered_and_holdings_announced() {
        // 70,000 blocks: bitfields come in chunks of 32,768.
        let m = asset(7, 10_000);
        let mut s = swarm(&m, SwarmConfig::default());
        let held: Vec<_> = [0, 1, 2, 69_999].iter().map(|&q| block(&m, q)).collect();
        s.http_done(0..3, held, 4 * ENCODED as u64, 0);
        assert!(drain(&mut s).is_empty(), "no neighbour to tell");
        assert_eq!(s.payloads(0..3).unwrap().len(), 3 * PAYLOAD);
        assert_eq!(s.payloads(1..2).unwrap(), vec![1; PAYLOAD]);
        assert_eq!(s.payloads(0..4), None);

        assert!(s.add_peer(1, 0));
        let mut far = vec![0u8; (69_999 - 65_536) / 8 + 1];
        *far.last_mut().unwrap() = 0x80 >> ((69_999 - 65_536) % 8);
        let bitfields = vec![
            Frame::Bitfield {
                start: 0,
                bits: Bytes::from_static(&[0xE0]),
            },
            Frame::Bitfield {
                start: 65_536,
                bits: Bytes::from(far),
            },
        ];
        assert_eq!(sends(&drain(&mut s), 1), bitfields);

        for (want, answer) in [
            (1, Frame::Block(block(&m, 1).into_block())),
            (5, Frame::DontHave(5)),
            (u64::MAX, Frame::DontHave(u64::MAX)),
        ] {
            s.handle_frame(1, Frame::Want(want), 1);
            assert_eq!(sends(&drain(&mut s), 1), vec![answer]);
        }
        s.handle_frame(1, Frame::Cancel(1), 1);
        s.handle_frame(1, Frame::Ping(9), 1);
        assert_eq!(sends(&drain(&mut s), 1), vec![Frame::Pong(9)]);
        assert_eq!(
            (s.stats().blocks_uploaded, s.stats().bytes_uploaded),
            (1, ENCODED as u64)
        );

        let new: Vec<_> = [10, 11, 12, 20].iter().map(|&q| block(&m, q)).collect();
        s.http_done(10..21, new, 4 * ENCODED as u64, 2);
        let announced = vec![
            Frame::HaveRange {
                start: 10,
                count: 3,
            },
            Frame::Have(20),
        ];
        assert_eq!(sends(&drain(&mut s), 1), announced);
        // Nothing held: no bitfield.
        let mut empty = swarm(&m, SwarmConfig::default());
        empty.add_peer(1, 0);
        assert!(drain(&mut empty).is_empty());
    }

    #[test]
    fn wants_go_to_the_rarest_blocks_first() {
        let m = asset(40, 1);
        let mut s = swarm(&m, SwarmConfig::default());
        for (peer, every) in [(1, 1), (2, 2), (3, 4)] {
            s.add_peer(peer, 0);
            for q in (0..40).filter(|q| q % every == 0) {
                s.handle_frame(peer, Frame::Have(q), 0);
            }
        }
        // Blocks 0-8 are due within 8 s (HTTP); 9-30 are in the window.
        s.tick(0, 0, 0.0, 31.0);
        let wants: Vec<(PeerId, u64)> = drain(&mut s)
            .into_iter()
            .filter_map(|a| match a {
                Action::Send {
                    peer,
                    frame: Frame::Want(q),
                } => Some((peer, q)),
                _ => None,
            })
            .collect();
        let odd = (9..31).step_by(2).map(|q| (1, q));
        let two = (10..31).step_by(4).map(|q| (2, q));
        let four = (12..31).step_by(4).map(|q| (3, q));
        assert_eq!(wants, odd.chain(two).chain(four).collect::<Vec<_>>());
        assert_eq!(s.stats().wants_sent, 22);
    }

    #[test]
    fn the_store_evicts_behind_then_far_ahead_but_never_the_window() {
        let m = asset(40, 1);
        let cfg = SwarmConfig {
            max_store_bytes: 10 * ENCODED,
            ..SwarmConfig::default()
        };
        let mut s = swarm(&m, cfg);
        let step = |s: &mut VodSwarm<StreamKey>, next: u64, playhead: f64, ahead: f64| {
            s.tick(0, next, playhead, ahead);
            let runs = fetches(&drain(s));
            for run in &runs {
                serve(s, &m, run.clone(), 0);
            }
            runs
        };
        assert_eq!(step(&mut s, 0, 0.0, 5.0), vec![0..5]);
        // Blocks far ahead, say from before a seek back.
        serve(&mut s, &m, 20..25, 0);
        assert_eq!(s.stats().store_bytes, 10 * ENCODED);
        // Behind the playhead first, lowest first.
        assert_eq!(step(&mut s, 3, 3.0, 5.0), vec![5..8]);
        assert!(!s.holds_all(0..1) && !s.holds_all(2..3) && s.holds_all(3..8));
        assert_eq!(step(&mut s, 5, 5.0, 5.0), vec![8..10]);
        assert!(s.holds_all(5..10) && s.holds_all(20..25));
        // Then past the window, highest first.
        assert_eq!(step(&mut s, 5, 5.0, 8.0), vec![10..13]);
        assert!(s.holds_all(5..13) && s.holds_all(20..22) && !s.holds_all(22..23));
        // The window never: what does not fit is refused, and fetched again.
        assert_eq!(step(&mut s, 5, 5.0, 15.0), vec![13..20]);
        assert!(s.holds_all(5..15) && !s.holds_all(15..16) && !s.holds_all(20..21));
        let st = s.stats();
        assert_eq!(
            (st.store_refused, st.held_blocks, st.store_bytes),
            (5, 10, 10 * ENCODED)
        );
        assert_eq!(step(&mut s, 5, 5.0, 15.0), vec![15..20]);
    }

    #[test]
    fn an_unanswered_want_times_out_and_goes_to_another_holder() {
        let m = asset(40, 1);
        let mut s = swarm(&m, SwarmConfig::default());
        for peer in [1, 2] {
            s.add_peer(peer, 0);
            s.handle_frame(peer, Frame::Have(10), 0);
        }
        s.tick(0, 0, 0.0, 20.0);
        assert_eq!(sends(&drain(&mut s), 1), vec![Frame::Want(10)]);
        s.tick(1_999, 0, 0.0, 20.0);
        assert!(sends(&drain(&mut s), 2).is_empty());
        s.tick(2_000, 0, 0.0, 20.0);
        let a = drain(&mut s);
        assert_eq!(
            (sends(&a, 1), sends(&a, 2)),
            (vec![], vec![Frame::Want(10)])
        );
        assert_eq!(s.stats().wants_timed_out, 1);
        // Neither holds it any more once both failed: nobody is asked.
        s.tick(4_000, 0, 0.0, 20.0);
        assert!(sends(&drain(&mut s), 1).is_empty() && s.inflight.is_empty());
    }

    #[test]
    fn neighbours_are_capped_and_hostile_announcements_are_cut() {
        let m = asset(40, 1);
        let mut s = swarm(&m, SwarmConfig::default());
        for peer in 0..MAX_NEIGHBOURS as u64 {
            assert!(s.add_peer(peer, 0));
        }
        assert!(!s.add_peer(99, 0), "over the cap");
        assert!(!s.add_peer(0, 0), "already linked");
        let huge = Frame::HaveRange {
            start: u64::MAX - 1,
            count: u32::MAX,
        };
        s.handle_frame(0, huge, 0);
        s.handle_frame(
            0,
            Frame::HaveRange {
                start: 30,
                count: u32::MAX,
            },
            0,
        );
        let bits = Bytes::from(vec![0xFF; 1 << 16]);
        s.handle_frame(
            1,
            Frame::Bitfield {
                start: u64::MAX - 3,
                bits: bits.clone(),
            },
            0,
        );
        s.handle_frame(1, Frame::Bitfield { start: 36, bits }, 0);
        s.handle_frame(2, Frame::Have(u64::MAX), 0);
        let has = |s: &VodSwarm<StreamKey>, p: PeerId| -> Vec<u64> {
            (0..64).filter(|&q| s.peers[&p].has.get(q)).collect()
        };
        assert_eq!(has(&s, 0), (30..40).collect::<Vec<_>>());
        assert_eq!(has(&s, 1), (36..40).collect::<Vec<_>>());
        assert!(has(&s, 2).is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Have(u64),
        HaveRange(u64, u32),
        Bitfield(u64, Vec<u8>),
        Want(u64),
        DontHave(u64),
        Block(u64, bool),
        Tick(u64, u64),
    }

    fn arb_op() -> impl Strategy<Value = Op> {
        let seq = prop_oneof![0u64..48, any::<u64>()];
        prop_oneof![
            seq.clone().prop_map(Op::Have),
            (seq.clone(), any::<u32>()).prop_map(|(s, c)| Op::HaveRange(s, c)),
            (seq.clone(), proptest::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(s, b)| Op::Bitfield(s, b)),
            seq.clone().prop_map(Op::Want),
            seq.clone().prop_map(Op::DontHave),
            (0u64..48, any::<bool>()).prop_map(|(s, f)| Op::Block(s, f)),
            (0u64..3_000, 0u64..40).prop_map(|(ms, next)| Op::Tick(ms, next)),
        ]
    }

    proptest! {
        #[test]
        fn a_hostile_neighbour_never_panics_the_core_or_plants_a_block(
            ops in proptest::collection::vec(arb_op(), 1..60),
        ) {
            let m = asset(20, 2);
            let cfg = SwarmConfig { max_store_bytes: 12 * ENCODED, ..SwarmConfig::default() };
            let mut s = swarm(&m, cfg);
            let other = StreamSigner::from_seed(&[8; 32]);
            let mut now = 0;
            s.add_peer(1, now);
            for op in ops {
                let frame = match op {
                    Op::Have(q) => Frame::Have(q),
                    Op::HaveRange(start, count) => Frame::HaveRange { start, count },
                    Op::Bitfield(start, b) => Frame::Bitfield { start, bits: Bytes::from(b) },
                    Op::Want(q) => Frame::Want(q),
                    Op::DontHave(q) => Frame::DontHave(q),
                    Op::Block(q, forged) => {
                        let by = if forged { &other } else { &signer() };
                        let m2 = asset(24, 2);
                        Frame::Block(block_by(by, &m2, q).into_block())
                    }
                    Op::Tick(ms, next) => {
                        now += ms;
                        s.tick(now, next, next as f64 / 2.0, 10.0);
                        for a in drain(&mut s) {
                            if let Action::Fetch(run) = a {
                                serve(&mut s, &m, run, now);
                            }
                        }
                        continue;
                    }
                };
                s.handle_frame(1, frame, now);
                for a in drain(&mut s) {
                    if let Action::Drop { peer, .. } = a {
                        prop_assert_eq!(peer, 1);
                        s.add_peer(1, now);
                    }
                }
                for (q, b) in &s.store {
                    prop_assert_eq!(*q, b.seq());
                    prop_assert!(*q < m.blocks);
                    prop_assert!(signer().key().verify(b.block().clone()).is_ok());
                }
                let bytes: usize = s.store.values().map(|b| b.block().encoded_len()).sum();
                prop_assert_eq!(bytes, s.stats().store_bytes);
                prop_assert!(bytes <= 12 * ENCODED);
            }
        }
    }
}
