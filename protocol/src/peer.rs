//! The viewer's state machine: verify, relay, pull, gap-fill and play out blocks.
//!
//! Drivers (the browser glue, the simulator) feed it with `handle_*` calls and
//! drain [`Peer::poll_transmit`], [`Peer::poll_event`] and [`Peer::poll_timeout`]
//! until they return nothing.
//!
//! Relay rules, for a verified block of one of the peer's own clubs:
//! 1. HAVE to the download links of that club (it stops their duplicates);
//! 2. push to the club's upload links that have not said HAVE (club first);
//! 3. push to the last-hop subscribers whose share the block is in.
//!
//! Pushes (and answers to WANTs) wait in a send queue ordered by class, then
//! seq: in-club pushes and WANT answers first, last-hop pushes after them, the
//! oldest block first. The queue hands a block to the transport only while the
//! bytes buffered on all links stay under [`PeerConfig::send_window`] and on
//! the link under [`LINK_WINDOW`], so a peer with little upload never builds a
//! long backlog:
//! a block waits in the queue, where it can still be overtaken by a more urgent
//! one, and is dropped there once the remote says HAVE, cancels, the link goes,
//! or the block's deadline passes. A driver reports buffer levels with
//! [`Peer::handle_link_buffered`]; while pushes wait, [`Peer::poll_timeout`]
//! also asks to be woken every [`PeerConfig::pump_poll_ms`].
//!
//! Blocks of other clubs are played but never relayed. A block of an own club
//! still missing [`PeerConfig::pull_grace_ms`] after a later one was seen is
//! pulled with WANT from a likely holder. A block of another club comes over the
//! last hop; it is pulled only from [`PeerConfig::pull_lead_ms`] before its
//! origin moment (by default not at all: a pull competes with the club's own
//! pushes for the holder's upload, and the origin is cheaper), unless no open
//! source pushes its share (the source left, closed or was dropped): such an
//! orphan is pulled at the pull grace like an own club's block. One still missing
//! [`PeerConfig::origin_margin_ms`] before its deadline produces
//! [`PeerEvent::GapFill`], and the driver fetches it from the origin within its
//! grant. A block the origin refuses ([`Peer::handle_gap_fill_failed`]) is
//! pulled at once from another holder than its source, at most
//! [`MAX_RESCUES_PER_SEC`] a second; a relay whose pushes run late answers
//! pulls over the last hop with DONT_HAVE, so that the rescue does not load it
//! further. The bid ([`Peer::bid`]) asks for as many blocks as the swarm
//! failed to bring in the last interval: most blocks still missing at their
//! origin moment come from the swarm in the end, so counting them spread the
//! grants over peers that did not need them. A joiner's backlog (its start
//! block up to the live edge of the welcome) is asked of the origin at once:
//! playback cannot start without it,
//! its links are not up yet, and the server grants it at the join (HTTP first,
//! then the swarm). Peers that upload nothing (no upload or subscriber role) answer every
//! WANT with DONT_HAVE. Blocks go to the player in seq order as
//! [`PeerEvent::Play`]; a block that misses its deadline is skipped to the next
//! fragment start ([`PeerEvent::Skip`]). A link that sends a bad block or frame is
//! dropped and reported ([`PeerEvent::BadPeer`]).

use std::collections::VecDeque;
use std::ops::Bound::{Excluded, Unbounded};

use bytes::Bytes;
use smallvec::SmallVec;

use crate::block::{BlockError, BlockFlags, BlockVerifier, VerifiedBlock};
use crate::club::club_of;
use crate::prefetch::{self, Depth};
use crate::seqmap::SeqMap;
use crate::signal::{Link, LinkOp, LinkRole, PeerId, SEEDER_PEER_ID};
use crate::vecmap::{VecMap, VecSet};
use crate::wire::{Frame, WireError, WIRE_VERSION};
use crate::Time;

/// Most blocks the cache holds; older ones are evicted first.
pub const MAX_CACHE_BLOCKS: usize = 2048;
/// Most missing blocks tracked at once; beyond it the oldest are given up.
pub const MAX_MISSING: usize = 1024;
/// Most links a peer keeps.
pub const MAX_LINKS: usize = 256;
/// Recent HAVEs remembered per link: a HAVE is remembered while its seq is
/// within this many of the highest one the link announced.
pub const MAX_LINK_HAVES: usize = 512;
/// Transmits queued before the driver drains them; beyond it the oldest block
/// pushes are dropped (control frames are kept).
pub const MAX_TRANSMITS: usize = 4096;
/// Events queued before the driver drains them.
pub const MAX_EVENTS: usize = 4096;
/// Default [`PeerConfig::send_window`]: bytes buffered across all links under
/// which the send queue hands out another block.
pub const SEND_WINDOW: usize = 40 * 1024;
/// Bytes buffered on one link under which the send queue hands it another block.
pub const LINK_WINDOW: usize = 34 * 1024;
/// A push handed to the transport this long after its block reached this
/// peer went out late ([`PeerStats::pushes_late`]), ms. A subscriber leaves a
/// block to the origin a few hundred ms before its deadline; a source whose
/// pushes wait this long in its queue is what makes it do so.
pub const SLOW_PUSH_MS: u64 = 250;
/// Most pushes waiting in the send queue; beyond it the least urgent is dropped.
pub const MAX_QUEUED_PUSHES: usize = 1024;
/// Weight of a new sample in the moving average of ms per block.
const RATE_WEIGHT: f64 = 0.1;
/// Ingest time the first block-rate estimate spans, ms.
const RATE_BASELINE_MS: u64 = 250;
/// Default wake-up interval while pushes wait, ms.
pub const PUMP_POLL_MS: u64 = 10;
/// WANTs a link may send per second; more are answered with DONT_HAVE.
pub const MAX_WANTS_PER_SEC: u32 = 64;
/// Blocks beyond the newest known seq that are accepted.
pub const MAX_AHEAD: u64 = 4096;
/// Origin fetches tried per missing block before it is left to be skipped.
pub const MAX_ORIGIN_TRIES: u8 = 2;
/// Most blocks the origin refused that a peer tries to pull from the swarm in
/// one second.
pub const MAX_RESCUES_PER_SEC: u32 = 8;
/// Most swarm failures a peer remembers for its bid.
pub const MAX_SWARM_FAILED: usize = 256;
/// Wait before retrying a failed origin fetch (about one bid interval), ms.
pub const ORIGIN_RETRY_MS: u64 = 1_000;
/// Interval at which every missing block's due time is recomputed, ms.
pub const REINDEX_MS: u64 = 1_000;
/// Default [`PeerConfig::prune_lag_ms`].
///
/// Two eager in-club parents race to push each block, so a block takes the
/// faster of two paths at every hop. Pruning the parent whose copy comes second
/// saves its upload but leaves one path per block. `clubcast-sim`, seed 1,
/// 2026-12-03, by how far behind the first copy a duplicate must come to prune
/// its parent:
///
/// | lag | 10,000 × 20 s: p95 ms, continuity, dup, origin | 100 × 120 s: dup, upload p99 |
/// |---|---|---|
/// | 0 (every duplicate) | 1,166, 0.9977, 0.051, 3.11 | 0.022, 1.88 |
/// | 100 ms | 1,051, 0.9993, 0.057, 2.95 | 0.037, 1.85 |
/// | 150 ms | 998, 0.9996, 0.080, 2.69 | 0.058, 1.94 |
/// | 200 ms | 985, 0.9996, 0.100, 2.56 | 0.074, 2.00 |
/// | never | 977, 0.9996, 0.134, 2.47 | 0.156, 2.06 |
///
/// Racing costs a relay whose upload is nearly full: its subscribers' last-hop
/// pushes wait behind the in-club ones. 200 peers, seed 5 (one such relay),
/// continuity: 0.9996 pruning on every duplicate, 0.9996 at 100 ms, 0.9995 at
/// 150 ms, 0.9989 at 200 ms. Hence 150 ms.
pub const PRUNE_LAG_MS: u64 = 150;
/// Default [`PeerConfig::prune_lag_age_pct`]: a parent is pruned only if its
/// duplicate lags the first copy by more than this share of the block's age
/// at that first copy (and [`PRUNE_LAG_MS`]), up to [`PRUNE_LAG_MAX_MS`].
///
/// A block is old at a peer deep in a large club's tree: there the two
/// parents' paths are long, their lag is larger, and each race a child keeps
/// saves more. Near the seeds, and in a small swarm, the fixed lag still
/// decides, so the duplicates it costs stay where they were. `clubcast-sim`,
/// seed 1, 2026-12-03 (block delay ms; upload p99 × bitrate):
///
/// | share of the age, up to | 10,000 × 10 s: p95, dup, origin | 100 × 120 s: p95, dup, upload p99 | 200 × 60 s, seed 5: continuity |
/// |---|---|---|---|
/// | none (150 ms always) | 997, 0.089, 2.81 | 470, 0.057, 1.94 | 0.9996 |
/// | 25 %, 250 ms (100 ms floor) | 994, 0.097, 2.77 | – | – |
/// | **30 %, 250 ms** | **983, 0.108, 2.71** | **473, 0.057, 1.93** | **0.9996** |
/// | 30 %, 200 ms | 983, 0.105, 2.70 | – | – |
/// | 30 %, 400 ms | 977, 0.108, 2.73 | – | – |
/// | 35 %, 300 ms | 978, 0.115, 2.64 | – | – |
/// | 40 %, 300 ms | 977, 0.119, 2.65 | 480, 0.059, 1.87 | 0.9998 |
///
/// With 10 %/min churn and 5 % hostile peers (1,000 × 120 s, seeds 1 to 8),
/// continuity went from 0.99939 / 0.99986 / 0.99982 / 0.99962 / 0.99974 /
/// 0.99990 / 0.99977 / 0.99987 to 0.99931 / 0.99986 / 0.99987 / 0.99974 /
/// 0.99972 / 0.99991 / 0.99978 / 0.99989 at 30 %, 250 ms.
///
/// Measured again on 2026-12-05, with churn and hostile peers, after the
/// origin bids and rescue pulls changed (b22f6e1): 40 %, 300 ms. p95 is of
/// `--peers 10000 --seconds 40 --churn-per-min 0.1 --hostile 0.05 --seed 1`
/// (ms); upload p99 of the same flags at 1,000 peers × 120 s, the row of the
/// benchmark whose upload p99 is nearest its goal of 2:
///
/// | share, up to | p95, dup, origin | upload p99 | + nearest first and a PING at open: p95 | upload p99 |
/// |---|---|---|---|---|
/// | 30 %, 250 ms | 1,015, 0.101, 2.88 | 1.9977 | – | – |
/// | **40 %, 300 ms** | 1,001, 0.112, 2.84 | 1.9927 | **993** (994 over 120 s) | **1.9978** |
/// | 35 %, 400 ms | 1,006, 0.107, 2.85 | – | – | – |
/// | 45 %, 350 ms | – | – | 1,000 over 120 s (nearest first alone) | 2.0036 |
/// | 50 %, 400 ms | 997, 0.123, 2.81 | 1.9860 | 990 (nearest first alone) | 2.0015 |
/// | 60 %, 600 ms | 999, 0.127, 2.82 | – | – | – |
///
/// Racing longer shortens the tail only so far, and its duplicates land on
/// the strongest relays: past 40 %, 300 ms the 1,000-peer row's upload p99
/// goes over 2. Continuity did not move (1,000 × 120 s, seeds 1 to 8: mean
/// 0.99991 at 30 %, 250 ms and at 40 %, 300 ms with the other two changes).
pub const PRUNE_LAG_AGE_PCT: u64 = 40;
/// Default [`PeerConfig::prune_lag_max_ms`]: the most a block's age stretches
/// the prune lag to, ms. Without a cap a block that came very late (pulled, or
/// after a stall) would keep its parents racing long after.
pub const PRUNE_LAG_MAX_MS: u64 = 300;
/// Default [`PeerConfig::yield_late_ms`], ms: a relay whose last
/// [`YIELD_LATE_PUSHES`] late pushes ([`PeerStats::pushes_late`]) all fell
/// within this window is short of upload. While it is, it stops racing for an
/// in-club child that another parent beats it to while its push still waits
/// in the send queue: it announces that club's blocks to the child instead,
/// as if the child had pruned it, and the child's WANT grafts it back.
///
/// Children prune by lag ([`PRUNE_LAG_MS`]), so they keep racing a parent that
/// is a little behind, and that parent's in-club pushes go out before its
/// last-hop ones: its subscribers pay. Only the relay sees its queue.
/// `clubcast-sim`, 2026-12-03, seed 1 unless said (continuity; 10,000 × 20 s
/// also p95 ms):
///
/// | relay yields after | 1,000 × 120 s, 10 %/min churn, 5 % hostile, seeds 1 / 2 / 3 / 4 | 200 × 60 s, seed 5 | 10,000 × 20 s |
/// |---|---|---|---|
/// | never | 0.99869 / 0.99982 / 0.99979 / 0.99960 | 0.9995 | 0.9996, 998 |
/// | 1 late push in 1 s | 0.9990 / 0.9999 / 0.9998 / 0.9997 | 0.9998 | 0.9997, 1,008 |
/// | **10 late pushes in 1 s** | **0.99939 / 0.99986 / 0.99982 / 0.99962** | **0.9996** | **0.9998, 999** |
/// | 25 late pushes in 1 s | 0.99905 / 0.99982 / 0.99979 / – | 0.9998 | 0.9997, 996 |
///
/// Counting also a push already sent to a child that then announced the block
/// (its HAVE says another parent's copy came first) left children with no
/// eager parent: 0.9970 at 200 peers, seed 5.
pub const YIELD_LATE_MS: u64 = 1_000;
/// Late pushes within [`YIELD_LATE_MS`] that make a relay yield races.
pub const YIELD_LATE_PUSHES: usize = 10;
/// Interval between PINGs on a link, ms.
pub const PING_INTERVAL_MS: u64 = 5_000;
/// Blocks of its share that an open last-hop source may leave for the origin
/// within [`SLOW_SOURCE_WINDOW_MS`] before it is reported as
/// [`PeerEvent::SlowSource`].
pub const SLOW_SOURCE_MISSES: u32 = 4;
/// Window over which a last-hop source's misses are counted, ms.
pub const SLOW_SOURCE_WINDOW_MS: u64 = 10_000;
/// A last-hop source pushes only the blocks it receives after its link opened
/// (or it got the role): a block noticed missing sooner than this after that
/// may have reached it before, so it does not count against it, ms.
pub const SOURCE_SETTLE_MS: u64 = 2_000;

/// Tunables of a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerConfig {
    /// This peer's id.
    pub peer_id: PeerId,
    /// Number of clubs C of the stream.
    pub clubs: u16,
    /// Live latency the player holds, ms; a block's deadline is its ingest time
    /// plus this.
    pub target_latency_ms: u64,
    /// Wait after a later block is seen before pulling a missing one, ms.
    pub pull_grace_ms: u64,
    /// Wait for an answer to a WANT before asking another holder, ms.
    pub want_timeout_ms: u64,
    /// Wait after an in-club parent announced a block we lack before pulling
    /// it from that parent (which grafts the parent back to pushing), ms.
    pub graft_wait_ms: u64,
    /// Ask the origin this long before a missing block's deadline, ms.
    pub origin_margin_ms: u64,
    /// Past its deadline by this much, a missing block is skipped, ms.
    pub skip_grace_ms: u64,
    /// Whether to relay to peers at all (false: a pure consumer).
    pub relay: bool,
    /// While pushes wait in the send queue, wake this often to re-check the
    /// buffer levels, ms (0: only [`Peer::handle_link_buffered`] wakes it, as
    /// in the simulator, which reports every drained frame).
    pub pump_poll_ms: u64,
    /// Bytes the send queue may leave buffered in the transport, over all
    /// links (on one link at most [`LINK_WINDOW`] of it). A block handed over
    /// can no longer be overtaken by a more urgent one, so the window should
    /// only cover the driver's reporting delay: [`SEND_WINDOW`] for a driver
    /// that polls buffer levels every [`PUMP_POLL_MS`] (the browser), 1 (one
    /// frame at a time) for one that reports every drained frame (the
    /// simulator).
    pub send_window: usize,
    /// How long before its origin moment a missing block of another club may
    /// be pulled from a peer, ms (0: never; it goes to the origin).
    pub pull_lead_ms: u64,
    /// Most blocks the cache holds (at most [`MAX_CACHE_BLOCKS`]); older ones
    /// are evicted first. Cached blocks answer WANTs and the bitfield a new
    /// link gets.
    pub cache_blocks: usize,
    /// A duplicate from an eager in-club parent prunes that parent (it sends
    /// HAVEs instead) only if it came more than this long after the first
    /// copy, ms: a parent that keeps up is kept racing ([`PRUNE_LAG_MS`]). An
    /// old block stretches it ([`PeerConfig::prune_lag_age_pct`]).
    pub prune_lag_ms: u64,
    /// A relay with [`YIELD_LATE_PUSHES`] late pushes within this many ms
    /// stops pushing to an in-club child that another parent beats it to
    /// (0: never; [`YIELD_LATE_MS`]). Only the relay sees its own queue; its
    /// children see only the lag.
    pub yield_late_ms: u64,
    /// The prune lag grows with the block's age at its first copy (arrival
    /// less ingest): this percentage of it, when that is more than
    /// [`PeerConfig::prune_lag_ms`] (0: never; [`PRUNE_LAG_AGE_PCT`]).
    pub prune_lag_age_pct: u64,
    /// Most the age can stretch the prune lag to, ms ([`PRUNE_LAG_MAX_MS`]).
    pub prune_lag_max_ms: u64,
}

impl PeerConfig {
    /// Defaults for a peer with id `peer_id` in a stream of `clubs` clubs.
    pub fn new(peer_id: PeerId, clubs: u16) -> Self {
        PeerConfig {
            peer_id,
            clubs: clubs.max(1),
            target_latency_ms: 1500,
            pull_grace_ms: 450,
            want_timeout_ms: 350,
            graft_wait_ms: 150,
            origin_margin_ms: 450,
            skip_grace_ms: 250,
            relay: true,
            pump_poll_ms: PUMP_POLL_MS,
            send_window: SEND_WINDOW,
            pull_lead_ms: 0,
            cache_blocks: MAX_CACHE_BLOCKS,
            prune_lag_ms: PRUNE_LAG_MS,
            yield_late_ms: YIELD_LATE_MS,
            prune_lag_age_pct: PRUNE_LAG_AGE_PCT,
            prune_lag_max_ms: PRUNE_LAG_MAX_MS,
        }
    }
}

/// Something a peer sends on a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// The remote peer.
    pub to: PeerId,
    /// The frame.
    pub frame: Frame,
}

/// Why a remote peer was dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// It sent a block that failed verification.
    #[error("bad block: {0}")]
    BadBlock(#[from] BlockError),
    /// It sent bytes that are not a frame.
    #[error("bad frame: {0}")]
    BadFrame(#[from] WireError),
    /// It speaks another wire version.
    #[error("peer speaks wire version {0}")]
    Version(u8),
}

/// Where a block came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// A peer link.
    Peer(PeerId),
    /// The origin, through gap fill.
    Origin,
}

/// Something the driver must act on or may record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// The next block in order, for the player.
    Play(VerifiedBlock),
    /// Playback jumps from `from` to `to` (a fragment start) over missing blocks.
    Skip {
        /// First block not played.
        from: u64,
        /// Block playback resumes at.
        to: u64,
    },
    /// Fetch block `seq` from the origin, then call
    /// [`Peer::handle_origin_block`] or [`Peer::handle_gap_fill_failed`].
    GapFill {
        /// The block.
        seq: u64,
    },
    /// A new verified block arrived (not a duplicate).
    Arrived {
        /// The block.
        seq: u64,
        /// Its ingest time, for delay statistics.
        ingest_time_ms: u64,
        /// Who sent it.
        from: From,
        /// Its payload bytes.
        bytes: usize,
    },
    /// A last-hop source leaves its share to the origin: it is open but its
    /// blocks come too late. Nothing is wrong with the remote, so it is not
    /// reported as bad. The driver tells the server (`slow_source`), which
    /// replaces the source only if the source's own bids say it is
    /// overloaded ([`PeerStats::pushes_late`]); a source that is merely late,
    /// deep in its club's tree, is kept, as a new one would be no earlier.
    SlowSource {
        /// The remote.
        peer: PeerId,
    },
    /// Drop this link and report the peer to the server.
    BadPeer {
        /// The remote.
        peer: PeerId,
        /// What it did.
        reason: PeerError,
    },
}

/// Counters a driver reports as stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PeerStats {
    /// Payload bytes of new blocks received from peers.
    pub bytes_from_peers: u64,
    /// Payload bytes of new blocks received from the origin.
    pub bytes_from_origin: u64,
    /// Payload bytes of duplicate blocks received.
    pub dup_bytes: u64,
    /// Payload bytes of blocks sent to peers.
    pub bytes_uploaded: u64,
    /// Non-payload bytes of all frames sent.
    pub control_bytes_sent: u64,
    /// Blocks that failed verification.
    pub blocks_rejected: u64,
    /// WANTs sent.
    pub wants_sent: u64,
    /// Gap fills asked of the origin.
    pub gap_fills: u64,
    /// Blocks skipped by playback.
    pub blocks_skipped: u64,
    /// Last-hop sources reported as too slow ([`PeerEvent::SlowSource`]).
    pub slow_sources: u64,
    /// Blocks handed to the transport for in-club links and WANT answers.
    pub pushed_club: u64,
    /// Blocks handed to the transport for last-hop subscribers.
    pub pushed_last_hop: u64,
    /// Queued pushes dropped: the remote had the block, the link went, the
    /// deadline passed, or the queue was full.
    pub pushes_dropped: u64,
    /// Pushes this peer's upload could not send in time: last-hop pushes
    /// handed to the transport more than [`SLOW_PUSH_MS`] after the block
    /// arrived, and pushes still wanted (link open, the remote without the
    /// block) when they expired in the send queue or were pushed out of a
    /// full one. The peer took on more than its upload can carry. This tells
    /// an overloaded source from one that is merely late (a block that
    /// reaches it past its deadline is never queued), which its subscribers'
    /// [`PeerEvent::SlowSource`] reports cannot. The core sees only its own
    /// queue: with a large transport window (a browser's data channel
    /// buffer) the wait happens below it and is not counted.
    pub pushes_late: u64,
    /// In-club children this peer stopped racing for while its upload ran
    /// late: another parent beat it to them ([`YIELD_LATE_MS`]).
    pub races_yielded: u64,
    /// Duplicate blocks received of the peer's own clubs.
    pub dup_club: u64,
    /// Duplicate blocks received of other clubs.
    pub dup_last_hop: u64,
}

impl PeerStats {
    /// Adds `other`'s counters to these, e.g. to carry a session's totals
    /// across the cores of its rejoins.
    pub fn add(&mut self, other: &PeerStats) {
        let PeerStats {
            bytes_from_peers,
            bytes_from_origin,
            dup_bytes,
            bytes_uploaded,
            control_bytes_sent,
            blocks_rejected,
            wants_sent,
            gap_fills,
            blocks_skipped,
            slow_sources,
            pushed_club,
            pushed_last_hop,
            pushes_dropped,
            pushes_late,
            races_yielded,
            dup_club,
            dup_last_hop,
        } = *other;
        self.bytes_from_peers += bytes_from_peers;
        self.bytes_from_origin += bytes_from_origin;
        self.dup_bytes += dup_bytes;
        self.bytes_uploaded += bytes_uploaded;
        self.control_bytes_sent += control_bytes_sent;
        self.blocks_rejected += blocks_rejected;
        self.wants_sent += wants_sent;
        self.gap_fills += gap_fills;
        self.blocks_skipped += blocks_skipped;
        self.slow_sources += slow_sources;
        self.pushed_club += pushed_club;
        self.pushed_last_hop += pushed_last_hop;
        self.pushes_dropped += pushes_dropped;
        self.pushes_late += pushes_late;
        self.races_yielded += races_yielded;
        self.dup_club += dup_club;
        self.dup_last_hop += dup_last_hop;
    }
}

/// A queued push: (class, seq, rank, remote). Class 0 holds in-club pushes
/// and WANT answers, class 1 last-hop pushes; within a class the oldest block
/// goes first, and a block goes to its nearest remotes first (the rank is the
/// least round trip measured, see [`LinkState::rank`]).
///
/// A relay sends a block to its remotes one after the other. Serving the
/// nearest first hands it soonest to the children that relay it on, as a
/// shortest-path tree would. Serving the farthest first instead, which evens
/// out the arrivals at this hop, made the whole tree slower. `clubcast-sim
/// --mode clubs --peers 10000 --seconds 40 --churn-per-min 0.1 --hostile 0.05
/// --seed 1`, block delay p50 / p95 ms (prune lag 30 %, 250 ms): by peer id
/// 791 / 1,015; farthest first 805 / 1,022; nearest first 779 / 1,009. A link
/// is pinged as soon as it opens, so that its pushes are ranked from its first
/// blocks: 776 / 998 without that and 770 / 993 with it (prune lag 40 %,
/// 300 ms).
type Queued = (u8, u64, u16, PeerId);

/// The fields up to `haves` are read for every block relayed, every ping and
/// every buffer report, so they are laid out together (`repr(C)`): a link
/// costs a cache line or two, not one per field.
#[derive(Debug, Default)]
#[repr(C)]
struct LinkState {
    open: bool,
    /// Its roles, inline: every relayed block reads every link's roles.
    roles: SmallVec<[LinkRole; 4]>,
    /// Clubs for which the remote pruned us: announce, don't push.
    lazy: u64,
    /// Clubs for which we pruned the remote (a parent that now announces).
    pruned: u64,
    buffered: usize,
    next_ping: Time,
    haves: HaveWindow,
    remote_clubs: u64,
    rtt_ms: Option<u64>,
    /// The least round trip measured: the path's own latency, without the
    /// queues a PONG may have waited in. It ranks the link's pushes
    /// ([`LinkState::rank`]).
    min_rtt_ms: Option<u64>,
    ping_nonce: u64,
    ping_sent: Time,
    want_window: (u64, u32),
    /// Blocks of its last-hop share that went to the origin, and when the
    /// count started.
    source_misses: (u32, Time),
    /// Since when it has been an open link with a last-hop source role.
    source_since: Option<Time>,
}

impl LinkState {
    /// Starts the source clock once the link is open with a source role.
    fn note_source(&mut self, now: Time) {
        let source = self
            .roles
            .iter()
            .any(|r| matches!(r, LinkRole::Source { .. }));
        if self.open && source && self.source_since.is_none() {
            self.source_since = Some(now);
        }
    }

    /// The rank of its pushes among those of the same block ([`Queued`]):
    /// its least round trip, 0 (first) while unknown.
    fn rank(&self) -> u16 {
        self.min_rtt_ms
            .map_or(0, |r| u16::try_from(r).unwrap_or(u16::MAX))
    }

    fn said_have(&self, seq: u64) -> bool {
        self.haves.contains(seq)
    }

    /// Announces instead of pushing club `c`'s blocks to this child, as its
    /// PRUNE asks; its WANT grafts us back. Returns whether that is new (not
    /// for a link that is no child of ours in `c`).
    fn go_lazy(&mut self, c: u16) -> bool {
        if c >= 64
            || self.lazy & (1 << c) != 0
            || !self.roles.contains(&LinkRole::Upload { club: c })
        {
            return false;
        }
        self.lazy |= 1 << c;
        true
    }

    fn note_have(&mut self, seq: u64) {
        self.haves.insert(seq);
    }
}

/// Whether block `seq` is in last-hop share `share` of `share_count` of its
/// club: `(seq / C) % share_count == share`.
fn in_share(seq: u64, clubs: u16, share: u8, share_count: u8) -> bool {
    (seq / u64::from(clubs.max(1))) % u64::from(share_count.max(1)) == u64::from(share)
}

/// Whether role `r` makes its link push block `seq` to us over the last hop.
fn source_of(r: &LinkRole, seq: u64, clubs: u16) -> bool {
    match *r {
        LinkRole::Source {
            club,
            share,
            share_count,
        } => club == club_of(seq, clubs) && in_share(seq, clubs, share, share_count),
        _ => false,
    }
}

/// The seqs a link announced, as a bitmap of the [`MAX_LINK_HAVES`] seqs up
/// to the highest one: O(1) to test, where a list of recent HAVEs cost a scan
/// per lookup and every relayed block looks up each link.
#[derive(Debug, Default)]
struct HaveWindow {
    /// Highest seq noted (meaningful once `any`).
    hi: u64,
    any: bool,
    bits: [u64; MAX_LINK_HAVES / 64],
}

impl HaveWindow {
    const SPAN: u64 = MAX_LINK_HAVES as u64;

    fn slot(seq: u64) -> (usize, u64) {
        let i = (seq % Self::SPAN) as usize;
        (i / 64, 1 << (i % 64))
    }

    fn contains(&self, seq: u64) -> bool {
        if !self.any || seq > self.hi || self.hi - seq >= Self::SPAN {
            return false;
        }
        let (w, b) = Self::slot(seq);
        self.bits[w] & b != 0
    }

    fn insert(&mut self, seq: u64) {
        if !self.any {
            self.any = true;
            self.hi = seq;
        } else if seq > self.hi {
            if seq - self.hi >= Self::SPAN {
                self.bits = [0; MAX_LINK_HAVES / 64];
            } else {
                // Clear the slots of hi + 1 .. seq a word at a time.
                let mut s = self.hi + 1;
                while s < seq {
                    let (w, b) = Self::slot(s);
                    // This word's bits from `b` up, but none at or past seq.
                    let n = (64 - b.trailing_zeros() as u64).min(seq - s);
                    let run = if n == 64 {
                        u64::MAX
                    } else {
                        ((1u64 << n) - 1) * b
                    };
                    self.bits[w] &= !run;
                    s += n;
                }
            }
            self.hi = seq;
        } else if self.hi - seq >= Self::SPAN {
            return;
        }
        let (w, b) = Self::slot(seq);
        self.bits[w] |= b;
    }
}

/// A cached block and, for a block of an own club, when it came (for
/// [`PeerStats::pushes_late`] and [`PeerConfig::prune_lag_ms`]): one ring slot
/// serves both.
#[derive(Debug, Clone)]
struct Cached {
    block: VerifiedBlock,
    arrived: Option<Time>,
}

#[derive(Debug, Clone, Copy)]
struct Missing {
    noticed: Time,
    asked: Option<(PeerId, Time)>,
    tries: u8,
    origin: bool,
    origin_tries: u8,
    /// A failed origin fetch is retried no earlier than this.
    retry_at: Time,
    /// When it next needs a look (its key in `Peer::due`), if ever.
    due: Option<Time>,
    /// A block of another club whose last-hop source went (or was never
    /// there) while it was missing: nobody will push it, so it is pulled at
    /// the pull grace like an own club's block.
    orphan: bool,
}

/// One viewer's relay and playout state.
#[derive(Debug)]
pub struct Peer<V> {
    cfg: PeerConfig,
    verifier: V,
    clubs: u64,
    links: VecMap<PeerId, LinkState>,
    cache: SeqMap<Cached>,
    missing: SeqMap<Missing>,
    /// (when, seq) of every missing block that needs a look at some time, so
    /// timers touch only the blocks that are due.
    due: VecSet<(Time, u64)>,
    /// Next time every due time is recomputed (deadline estimates drift).
    reindex_at: Time,
    highest: Option<u64>,
    /// (seq, ingest ms) of a recent block, for deadline estimates.
    anchor: Option<(u64, u64)>,
    /// The live edge of the welcome and when it came: blocks up to it are the
    /// startup backlog.
    backlog: Option<(u64, Time)>,
    ms_per_block: f64,
    /// The first real block's (seq, ingest ms), until the blocks since span
    /// [`RATE_BASELINE_MS`] of ingest and give the first rate estimate.
    rate_base: Option<(u64, u64)>,
    /// Whether `anchor` is a real block's, not the welcome's guess.
    anchor_real: bool,
    next_play: Option<u64>,
    transmits: VecDeque<Transmit>,
    /// The send queue, class 0 in-club pushes and WANT answers, class 1
    /// last-hop pushes.
    queued: VecSet<Queued>,
    /// The earliest `next_ping` of the open links, once computed (`None`:
    /// a link opened, closed, went or pinged since). Every event reschedules,
    /// and a pass over the links to find it would touch them all.
    ping_min: Option<Option<Time>>,
    /// For each club, the links with a role in it, in peer order: a block
    /// concerns only its club's links, and the peer has links in every club.
    by_club: Vec<Vec<PeerId>>,
    /// Scratch lists of [`Peer::relay`], kept so that a block costs no allocation.
    relay_haves: Vec<PeerId>,
    relay_pushes: Vec<Queued>,
    /// Sum of the links' `buffered`.
    buffered_total: usize,
    /// When the last [`YIELD_LATE_PUSHES`] pushes of ours that went out late
    /// did ([`PeerStats::pushes_late`]).
    late_at: VecDeque<Time>,
    /// When the swarm failed the latest missing blocks (at most
    /// [`MAX_SWARM_FAILED`]): what [`Peer::bid`] asks for.
    swarm_failed: VecDeque<Time>,
    /// (second, rescues tried in it): pulls of blocks the origin refused
    /// ([`MAX_RESCUES_PER_SEC`]).
    rescues: (u64, u32),
    /// When `pump` last dropped the expired front of the queue.
    expired_at: Option<Time>,
    /// Time of the latest `handle_*` call that carried one.
    now: Time,
    events: VecDeque<PeerEvent>,
    stats: PeerStats,
    next_check: Option<Time>,
}

impl<V: BlockVerifier> Peer<V> {
    /// A peer that verifies blocks with `verifier` (the stream key).
    pub fn new(cfg: PeerConfig, verifier: V) -> Self {
        Peer {
            cfg,
            verifier,
            clubs: 0,
            links: VecMap::new(),
            cache: SeqMap::new(),
            missing: SeqMap::new(),
            due: VecSet::new(),
            reindex_at: Time(0),
            highest: None,
            anchor: None,
            rate_base: None,
            anchor_real: false,
            backlog: None,
            ms_per_block: 70.0,
            next_play: None,
            transmits: VecDeque::new(),
            queued: VecSet::new(),
            ping_min: None,
            by_club: vec![Vec::new(); usize::from(cfg.clubs)],
            relay_haves: Vec::new(),
            relay_pushes: Vec::new(),
            buffered_total: 0,
            late_at: VecDeque::new(),
            swarm_failed: VecDeque::new(),
            rescues: (0, 0),
            expired_at: None,
            now: Time(0),
            events: VecDeque::new(),
            stats: PeerStats::default(),
            next_check: None,
        }
    }

    /// The config.
    pub fn config(&self) -> &PeerConfig {
        &self.cfg
    }

    /// Prefetches, at `depth`, the memory that handling an event for block
    /// `seq` (if any) from one of `remotes` reads first: its struct's fields;
    /// then its push queue, link keys, the cache and missing slots of `seq`
    /// and its club's link index; then the links to `remotes` and the club's
    /// first link. See [`crate::prefetch`].
    pub fn prefetch(&self, depth: Depth, seq: Option<u64>, remotes: [Option<PeerId>; 2]) {
        // Only past `Struct` may the fields be read: they are what it loads.
        let club = || seq.and_then(|s| self.by_club.get(usize::from(club_of(s, self.cfg.clubs))));
        match depth {
            Depth::Struct => {
                prefetch::line(&self.links);
                prefetch::line(&self.cache);
                prefetch::line(&self.missing);
                prefetch::line(&self.due);
                prefetch::line(&self.queued);
                prefetch::line(&self.by_club);
                prefetch::line(&self.transmits);
                prefetch::line(&self.events);
                prefetch::line(&self.relay_haves);
                prefetch::line(&self.relay_pushes);
                prefetch::line(&self.late_at);
                prefetch::line(&self.buffered_total);
                prefetch::line(&self.now);
            }
            Depth::Heap => {
                if let Some(q) = self.queued.first() {
                    prefetch::line(q);
                }
                self.links.prefetch_keys();
                if let Some(seq) = seq {
                    self.cache.prefetch(seq);
                    self.missing.prefetch(seq);
                }
                if let Some(v) = club() {
                    prefetch::line(v);
                }
            }
            Depth::Behind => {
                for r in remotes {
                    if let Some(l) = self.links.get_or_first(r) {
                        prefetch::line(l);
                        prefetch::line(&l.haves);
                    }
                }
                if let Some(p) = club().and_then(|v| v.first()) {
                    prefetch::line(p);
                }
            }
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> PeerStats {
        self.stats
    }

    /// The clubs this peer is in.
    pub fn clubs(&self) -> Vec<u16> {
        (0..self.cfg.clubs).filter(|c| self.in_club(*c)).collect()
    }

    /// Remote peers with at least one role, open or not.
    pub fn link_peers(&self) -> Vec<PeerId> {
        self.links.keys().copied().collect()
    }

    /// Links whose data channel is open.
    pub fn open_links(&self) -> usize {
        self.links.values().filter(|l| l.open).count()
    }

    /// Next block the player needs.
    pub fn next_play(&self) -> Option<u64> {
        self.next_play
    }

    /// Whether block `seq` is in the cache.
    pub fn has(&self, seq: u64) -> bool {
        self.cache.contains_key(seq)
    }

    /// Pushes waiting in the send queue.
    pub fn queued_pushes(&self) -> usize {
        self.queued.len()
    }

    fn in_club(&self, c: u16) -> bool {
        c < 64 && self.clubs & (1 << c) != 0
    }

    /// Sets the clubs and links from the server's welcome, and where playback
    /// starts. `live_edge` is the newest block the server had.
    pub fn handle_welcome(
        &mut self,
        now: Time,
        clubs: &[u16],
        links: &[Link],
        start_seq: u64,
        live_edge: u64,
    ) {
        self.clubs = clubs
            .iter()
            .filter(|c| **c < 64)
            .fold(0u64, |m, c| m | (1 << c));
        for l in links {
            self.handle_link(now, LinkOp::Add, *l);
        }
        self.next_play = Some(start_seq);
        // The edge block was cut about now: a first anchor for deadlines.
        self.anchor.get_or_insert((live_edge, now.as_millis()));
        // Set before `note_seen`, so the backlog is indexed as due at once.
        self.backlog = (live_edge >= start_seq).then_some((live_edge, now));
        self.note_seen(now, live_edge);
        // The edge block itself exists too; the seeder pushed it before our
        // link was up, so nobody may push it to us.
        if self.backlog.is_some() {
            self.mark_missing(now, live_edge);
            self.schedule(now);
        }
    }

    /// The server says block `seq` is the newest produced (from a heartbeat
    /// answer). A peer with no open link learns of new blocks this way, so it
    /// can still pull or gap-fill them.
    pub fn handle_live_edge(&mut self, now: Time, seq: u64) {
        self.note_seen(now, seq);
        if self.highest.is_some_and(|h| seq <= h) {
            self.mark_missing(now, seq);
        }
        self.schedule(now);
    }

    /// Adds or removes a link role (from the welcome or a later `link` message).
    /// The driver connects when a peer gets its first role and closes the
    /// connection when [`Peer::link_peers`] no longer lists it.
    pub fn handle_link(&mut self, now: Time, op: LinkOp, link: Link) {
        match op {
            LinkOp::Add => {
                if !self.links.contains_key(&link.peer) && self.links.len() >= MAX_LINKS {
                    return;
                }
                self.ping_min = None;
                let st = self.links.get_or_default(link.peer);
                if !st.roles.contains(&link.role) {
                    st.roles.push(link.role);
                }
                st.note_source(now);
                self.index_link(link.peer);
            }
            LinkOp::Remove => {
                if let Some(st) = self.links.get_mut(&link.peer) {
                    let had = st.roles.contains(&link.role);
                    st.roles.retain(|r| *r != link.role);
                    if st.roles.is_empty() {
                        self.buffered_total -= st.buffered;
                        self.links.remove(&link.peer);
                        self.ping_min = None;
                        self.unqueue(|&(_, _, _, to)| to == link.peer);
                    }
                    self.index_link(link.peer);
                    if had {
                        self.orphan_shares_of(now, &[link.role]);
                    }
                }
            }
        }
    }

    /// The data channel to `peer` opened: greet it and tell it what we hold.
    pub fn handle_link_open(&mut self, now: Time, peer: PeerId) {
        let clubs = self.clubs();
        let Some(st) = self.links.get_mut(&peer) else {
            return;
        };
        st.open = true;
        // Ping at once: the round trip ranks its pushes ([`Queued`]).
        st.next_ping = now;
        self.ping_min = None;
        st.note_source(now);
        self.push(
            peer,
            Frame::Hello {
                version: WIRE_VERSION,
                peer_id: self.cfg.peer_id,
                clubs,
            },
        );
        if let (Some(first), Some(last)) = (self.cache.first_key(), self.cache.last_key()) {
            let span = (last - first + 1).min(8 * crate::wire::MAX_BITFIELD_BYTES as u64);
            let start = last + 1 - span;
            let mut bits = vec![0u8; span.div_ceil(8) as usize];
            for seq in self.cache.range(start, last).map(|(s, _)| s) {
                let i = (seq - start) as usize;
                bits[i / 8] |= 0x80 >> (i % 8);
            }
            self.push(
                peer,
                Frame::Bitfield {
                    start,
                    bits: Bytes::from(bits),
                },
            );
        }
    }

    /// The data channel to `peer` closed. Its roles stay until the server
    /// replaces them; the driver should report the failure.
    pub fn handle_link_closed(&mut self, now: Time, peer: PeerId) {
        let mut roles = SmallVec::<[LinkRole; 4]>::new();
        self.ping_min = None;
        if let Some(st) = self.links.get_mut(&peer) {
            st.open = false;
            st.source_since = None;
            self.buffered_total -= st.buffered;
            st.buffered = 0;
            roles.clone_from(&st.roles);
        }
        self.unqueue(|&(_, _, _, to)| to == peer);
        self.orphan_shares_of(now, &roles);
    }

    /// The link's send buffer now holds `buffered` bytes (the driver's
    /// bufferedAmount, or the simulator's queue). When it drained, queued
    /// pushes may go out: drain [`Peer::poll_transmit`] afterwards.
    pub fn handle_link_buffered(&mut self, peer: PeerId, buffered: usize) {
        self.handle_links_buffered([(peer, buffered)]);
    }

    /// Several links' send buffers changed at once, as `(peer, buffered)`:
    /// the queue is pumped once, after all of them, so the most urgent push
    /// goes first whichever of them drained.
    pub fn handle_links_buffered(&mut self, levels: impl IntoIterator<Item = (PeerId, usize)>) {
        let mut drained = false;
        for (peer, buffered) in levels {
            let Some(st) = self.links.get_mut(&peer) else {
                continue;
            };
            drained |= buffered < st.buffered;
            self.buffered_total = self.buffered_total - st.buffered + buffered;
            st.buffered = buffered;
        }
        if drained {
            self.pump();
        }
    }

    /// A message arrived on the link to `from`.
    pub fn handle_message(&mut self, now: Time, from: PeerId, msg: Bytes) {
        match Frame::decode(msg) {
            Ok(f) => self.handle_frame(now, from, f),
            Err(e) => self.bad_peer(from, PeerError::BadFrame(e)),
        }
    }

    /// A decoded frame arrived on the link to `from`.
    pub fn handle_frame(&mut self, now: Time, from: PeerId, frame: Frame) {
        self.now = now;
        self.frame(now, from, frame);
        self.pump();
    }

    fn frame(&mut self, now: Time, from: PeerId, frame: Frame) {
        if !self.links.contains_key(&from) {
            return;
        }
        match frame {
            Frame::Hello { version, clubs, .. } => {
                if version != WIRE_VERSION {
                    self.bad_peer(from, PeerError::Version(version));
                    return;
                }
                if let Some(st) = self.links.get_mut(&from) {
                    st.open = true;
                    self.ping_min = None;
                    st.remote_clubs = clubs
                        .iter()
                        .filter(|c| **c < 64)
                        .fold(0, |m, c| m | (1 << c));
                }
            }
            Frame::Have(seq) => {
                self.lost_race(now, from, seq);
                self.note_remote_have(now, from, seq);
                let parent = self.links.get(&from).is_some_and(|l| {
                    l.roles.contains(&LinkRole::Download {
                        club: club_of(seq, self.cfg.clubs),
                    })
                });
                if parent {
                    // A lazy parent has it: pull soon rather than after the
                    // full grace.
                    let soon = now
                        - self
                            .cfg
                            .pull_grace_ms
                            .saturating_sub(self.cfg.graft_wait_ms);
                    if let Some(m) = self.missing.get_mut(seq) {
                        if m.asked.is_none() && m.noticed > soon {
                            m.noticed = soon;
                            self.reindex(seq);
                            self.schedule(now);
                        }
                    }
                }
            }
            Frame::HaveRange { start, count } => {
                // The decoder refuses an empty or overflowing range; a frame
                // built in process is held to the same.
                let Some(last) = u64::from(count)
                    .checked_sub(1)
                    .and_then(|n| start.checked_add(n))
                else {
                    return;
                };
                let from_seq = last.saturating_sub(MAX_LINK_HAVES as u64 - 1).max(start);
                for s in from_seq..=last {
                    self.note_remote_have(now, from, s);
                }
            }
            Frame::Bitfield { start, bits } => {
                let n = bits.len() as u64 * 8;
                let first = start.saturating_add(n.saturating_sub(MAX_LINK_HAVES as u64));
                for s in first..start.saturating_add(n) {
                    let i = (s - start) as usize;
                    if bits[i / 8] & (0x80 >> (i % 8)) != 0 {
                        self.note_remote_have(now, from, s);
                    }
                }
            }
            Frame::Block(block) => match self.verifier.verify(block) {
                Ok(b) => self.accept(now, b, From::Peer(from)),
                Err(e) => {
                    self.stats.blocks_rejected += 1;
                    self.bad_peer(from, PeerError::BadBlock(e));
                }
            },
            Frame::Want(seq) => self.answer_want(now, from, seq),
            Frame::Cancel(seq) => {
                for class in 0..=1 {
                    let e = self.queued_key(class, seq, from);
                    self.queued.remove(&e);
                }
            }
            Frame::DontHave(seq) => {
                if let Some(m) = self.missing.get_mut(seq) {
                    if m.asked.is_some_and(|(p, _)| p == from) {
                        // Ask someone else at the next check.
                        m.asked = Some((from, Time(0)));
                        self.reindex(seq);
                        self.schedule(now);
                    }
                }
            }
            Frame::Prune(seq) => {
                let c = club_of(seq, self.cfg.clubs);
                if let Some(st) = self.links.get_mut(&from) {
                    st.go_lazy(c);
                }
            }
            Frame::Ping(n) => self.push(from, Frame::Pong(n)),
            Frame::Pong(n) => {
                if let Some(st) = self.links.get_mut(&from) {
                    if st.ping_nonce == n {
                        let rtt = now.since(st.ping_sent);
                        st.rtt_ms = Some(rtt);
                        self.note_rtt(from, rtt);
                    }
                }
            }
        }
    }

    /// A block fetched from the origin (gap fill). Bad bytes count as a
    /// rejected block but drop no link.
    pub fn handle_origin_block(&mut self, now: Time, block: crate::block::Block) {
        self.now = now;
        match self.verifier.verify(block) {
            Ok(b) => self.accept(now, b, From::Origin),
            Err(_) => self.stats.blocks_rejected += 1,
        }
        self.pump();
    }

    /// The origin fetch for `seq` failed (over the grant, evicted, network).
    /// The block stays missing and may be skipped at its deadline.
    pub fn handle_gap_fill_failed(&mut self, now: Time, seq: u64) {
        self.now = now;
        let Some(m) = self.missing.get_mut(seq) else {
            return;
        };
        // Retry with the next grant, not at once.
        m.origin = false;
        m.retry_at = now + ORIGIN_RETRY_MS;
        let unasked = m.asked.is_none();
        // Before the deadline the swarm is the last resort: pull it now from
        // a holder other than the source that let it go missing.
        let sec = now.as_millis() / 1000;
        if self.rescues.0 != sec {
            self.rescues = (sec, 0);
        }
        if unasked && now < self.deadline(seq) && self.rescues.1 < MAX_RESCUES_PER_SEC {
            self.rescues.1 += 1;
            let slow = self.source_link(seq);
            if let Some(p) = self.holder(seq, slow) {
                self.want(now, seq, p);
            }
        }
        self.reindex(seq);
        self.schedule(now);
        self.pump();
    }

    /// Timers: pulls, gap fills, skips and pings.
    pub fn handle_timeout(&mut self, now: Time) {
        self.now = now;
        self.pump();
        self.next_check = None;
        self.check_missing(now);
        self.advance_play(now);
        self.ping(now);
        self.schedule(now);
    }

    /// Next frame to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<PeerEvent> {
        self.events.pop_front()
    }

    /// When [`Peer::handle_timeout`] should next be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Time> {
        let pump = (!self.queued.is_empty() && self.cfg.pump_poll_ms > 0)
            .then(|| self.now + self.cfg.pump_poll_ms);
        match (self.next_check, pump) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Bits this peer wants from the origin in the next `interval_ms`: as
    /// many blocks as the swarm failed to bring it in the last one.
    pub fn bid(&self, now: Time, interval_ms: u64) -> u64 {
        let since = Time(now.0.saturating_sub(interval_ms));
        let failed = self.swarm_failed.iter().filter(|t| **t > since).count() as u64;
        failed * self.avg_block_bits()
    }

    /// A missing block that went to the origin came from there, or came
    /// late or never: the swarm failed it (the startup backlog aside, which
    /// goes to the origin by design).
    fn note_swarm_failed(&mut self, now: Time, seq: u64, m: &Missing) {
        if m.origin_tries == 0 || self.in_backlog(seq) {
            return;
        }
        if self.swarm_failed.len() >= MAX_SWARM_FAILED {
            self.swarm_failed.pop_front();
        }
        self.swarm_failed.push_back(now);
    }

    /// The stream's bitrate as the blocks seen so far show it (mean block size
    /// over the mean spacing of ingest times), kbit/s; a default-sized block
    /// ([`crate::block::DEFAULT_BLOCK_BYTES`]) every 70 ms until blocks arrive.
    pub fn rate_kbps(&self) -> u32 {
        (self.avg_block_bits() as f64 / self.ms_per_block.max(1.0)) as u32
    }

    fn avg_block_bits(&self) -> u64 {
        let n = self.cache.len().min(32);
        if n == 0 {
            return (crate::block::DEFAULT_BLOCK_BYTES * 8) as u64;
        }
        let sum: usize = self
            .cache
            .iter()
            .rev()
            .take(n)
            .map(|(_, c)| c.block.payload().len() + crate::block::BLOCK_OVERHEAD)
            .sum();
        (sum / n) as u64 * 8
    }

    /// The deadline of block `seq`: its (estimated) ingest time plus the target
    /// latency. The startup backlog is older than that by design (the start
    /// block is the target latency behind the edge), so its blocks get the
    /// target latency from the welcome instead, whichever is later.
    pub fn deadline(&self, seq: u64) -> Time {
        let d = self.ingest_deadline(seq);
        match self.backlog {
            Some((_, at)) if self.in_backlog(seq) => d.max(at + self.cfg.target_latency_ms),
            _ => d,
        }
    }

    fn ingest_deadline(&self, seq: u64) -> Time {
        let ingest = match self.cache.get(seq) {
            Some(c) => c.block.header().ingest_time_ms,
            None => match self.anchor {
                Some((s, t)) => {
                    let d = (seq as f64 - s as f64) * self.ms_per_block;
                    (t as f64 + d).max(0.0) as u64
                }
                // Nothing known yet: no deadline presses.
                None => return Time(u64::MAX / 4),
            },
        };
        Time(ingest) + self.cfg.target_latency_ms
    }

    fn bad_peer(&mut self, peer: PeerId, reason: PeerError) {
        if let Some(st) = self.links.remove(&peer) {
            self.ping_min = None;
            self.index_link(peer);
            self.buffered_total -= st.buffered;
            self.orphan_shares_of(self.now, &st.roles);
        }
        self.unqueue(|&(_, _, _, to)| to == peer);
        let mut asked = Vec::new();
        for (seq, m) in self.missing.iter_mut() {
            if m.asked.is_some_and(|(p, _)| p == peer) {
                m.asked = Some((peer, Time(0)));
                asked.push(seq);
            }
        }
        for seq in asked {
            self.reindex(seq);
        }
        self.event(PeerEvent::BadPeer { peer, reason });
    }

    fn event(&mut self, e: PeerEvent) {
        if self.events.len() >= MAX_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(e);
    }

    fn push(&mut self, to: PeerId, frame: Frame) {
        let len = frame.encoded_len();
        self.stats.control_bytes_sent += frame.overhead_len() as u64;
        if let Frame::Block(b) = &frame {
            self.stats.bytes_uploaded += b.payload.len() as u64;
        }
        if let Some(st) = self.links.get_mut(&to) {
            st.buffered += len;
            self.buffered_total += len;
        }
        if self.transmits.len() >= MAX_TRANSMITS {
            if let Some(i) = self
                .transmits
                .iter()
                .position(|t| matches!(t.frame, Frame::Block(_)))
            {
                self.transmits.remove(i);
            }
        }
        self.transmits.push_back(Transmit { to, frame });
    }

    /// A push of ours went out late, or not at all while still wanted.
    fn note_late(&mut self) {
        self.stats.pushes_late += 1;
        if self.late_at.len() >= YIELD_LATE_PUSHES {
            self.late_at.pop_front();
        }
        self.late_at.push_back(self.now);
    }

    /// In-club child `from` announced block `seq` while our push of it still
    /// waited in the send queue: another parent was faster. While our pushes
    /// run late, stop racing for that child, as its PRUNE would make us; its
    /// WANT grafts us back ([`YIELD_LATE_MS`]).
    fn lost_race(&mut self, now: Time, from: PeerId, seq: u64) {
        if !self.running_late(now) || !self.queued.contains(&self.queued_key(0, seq, from)) {
            return;
        }
        let c = club_of(seq, self.cfg.clubs);
        if self.links.get_mut(&from).is_some_and(|st| st.go_lazy(c)) {
            self.stats.races_yielded += 1;
        }
    }

    /// Whether [`YIELD_LATE_PUSHES`] pushes went out late within the last
    /// [`PeerConfig::yield_late_ms`].
    fn running_late(&self, now: Time) -> bool {
        self.cfg.yield_late_ms > 0
            && self.late_at.len() >= YIELD_LATE_PUSHES
            && self
                .late_at
                .front()
                .is_some_and(|&t| now.since(t) < self.cfg.yield_late_ms)
    }

    fn note_remote_have(&mut self, now: Time, from: PeerId, seq: u64) {
        self.link_has(from, seq);
        self.note_seen(now, seq);
        if self.highest.is_some_and(|h| seq <= h) {
            self.mark_missing(now, seq);
        }
    }

    /// Records that `seq` exists; blocks between the old and new edge that we
    /// lack become missing.
    fn note_seen(&mut self, now: Time, seq: u64) {
        let start = match self.highest {
            Some(h) if seq <= h => return,
            Some(h) => {
                if seq > h.saturating_add(MAX_AHEAD) {
                    return;
                }
                h + 1
            }
            None => self.next_play.unwrap_or(seq),
        };
        self.highest = Some(seq);
        let from = start.max(seq.saturating_sub(MAX_MISSING as u64));
        for s in from..seq {
            self.mark_missing(now, s);
        }
        self.schedule(now);
    }

    fn mark_missing(&mut self, now: Time, seq: u64) {
        if self.cache.contains_key(seq) || self.next_play.is_some_and(|p| seq < p) {
            return;
        }
        if self.missing.contains_key(seq) {
            return;
        }
        if self.missing.len() >= MAX_MISSING {
            if let Some(first) = self.missing.first_key() {
                self.forget(first);
            }
        }
        let orphan = !self.in_club(club_of(seq, self.cfg.clubs)) && !self.has_source(seq);
        self.missing.insert(
            seq,
            Missing {
                noticed: now,
                asked: None,
                tries: 0,
                origin: false,
                origin_tries: 0,
                retry_at: Time(0),
                due: None,
                orphan,
            },
        );
        self.reindex(seq);
    }

    /// Puts link `p` in the club lists its roles name, and in no other.
    fn index_link(&mut self, p: PeerId) {
        let roles = self.links.get(&p).map(|st| &st.roles);
        for (c, list) in self.by_club.iter_mut().enumerate() {
            let member = roles.is_some_and(|rs| rs.iter().any(|r| usize::from(r.club()) == c));
            match (list.binary_search(&p), member) {
                (Err(i), true) => list.insert(i, p),
                (Ok(i), false) => {
                    list.remove(i);
                }
                _ => {}
            }
        }
    }

    /// The links with a role in club `c`, in peer order.
    fn club_links(&self, c: u16) -> &[PeerId] {
        let list = self
            .by_club
            .get(usize::from(c))
            .map_or(&[][..], Vec::as_slice);
        debug_assert!(
            usize::from(c) >= self.by_club.len()
                || list.iter().copied().eq(self
                    .links
                    .iter()
                    .filter(|(_, st)| st.roles.iter().any(|r| r.club() == c))
                    .map(|(p, _)| *p)),
            "the club index matches the links"
        );
        list
    }

    /// Whether an open last-hop source pushes block `seq` of another club.
    fn has_source(&self, seq: u64) -> bool {
        self.source_link(seq).is_some()
    }

    /// The open last-hop source whose share block `seq` is in, if any.
    fn source_link(&self, seq: u64) -> Option<PeerId> {
        let clubs = self.cfg.clubs;
        self.club_links(club_of(seq, clubs))
            .iter()
            .copied()
            .find(|p| {
                self.links
                    .get(p)
                    .is_some_and(|st| st.open && st.roles.iter().any(|r| source_of(r, seq, clubs)))
            })
    }

    /// Link `peer` stops being a source (it went, closed or lost the role):
    /// the missing blocks of its shares that no other open source pushes are
    /// pulled now. The server gives a new source, but it pushes only blocks
    /// it receives after its link opens.
    fn orphan_shares_of(&mut self, now: Time, roles: &[LinkRole]) {
        if !roles.iter().any(|r| matches!(r, LinkRole::Source { .. })) {
            return;
        }
        let clubs = self.cfg.clubs;
        let hit: Vec<u64> = self
            .missing
            .iter()
            .filter(|(seq, m)| !m.orphan && roles.iter().any(|r| source_of(r, *seq, clubs)))
            .map(|(seq, _)| seq)
            .collect();
        let mut any = false;
        for seq in hit {
            if self.has_source(seq) {
                continue;
            }
            if let Some(m) = self.missing.get_mut(seq) {
                m.orphan = true;
                any = true;
            }
            self.reindex(seq);
        }
        if any {
            self.schedule(now);
        }
    }

    /// When missing block `seq` next needs a look: its origin moment, or its
    /// pull or WANT timeout; never while an origin fetch runs.
    fn due_of(&self, seq: u64, m: &Missing) -> Option<Time> {
        if m.origin {
            return None;
        }
        let origin = self.origin_at(seq);
        let pull = match m.asked {
            None => self.pull_at(seq, m),
            Some((p, t)) => t + self.want_timeout(p),
        };
        // After a failed origin fetch nothing happens before its retry (a
        // pull due earlier waits too: `check_one` would do nothing, and the
        // timer would fire again at once).
        Some(origin.min(pull).max(m.retry_at))
    }

    /// Recomputes the due time of missing block `seq`.
    fn reindex(&mut self, seq: u64) {
        let Some(m) = self.missing.get(seq).copied() else {
            return;
        };
        if let Some(t) = m.due {
            self.due.remove(&(t, seq));
        }
        let due = self.due_of(seq, &m);
        if let Some(t) = due {
            self.due.insert((t, seq));
        }
        if let Some(m) = self.missing.get_mut(seq) {
            m.due = due;
        }
    }

    /// Stops tracking missing block `seq`.
    fn forget(&mut self, seq: u64) -> Option<Missing> {
        let m = self.missing.remove(seq)?;
        if let Some(t) = m.due {
            self.due.remove(&(t, seq));
        }
        Some(m)
    }

    fn accept(&mut self, now: Time, block: VerifiedBlock, from: From) {
        let seq = block.seq();
        let len = block.payload().len();
        if self.cache.contains_key(seq)
            || self
                .next_play
                .is_some_and(|p| seq < p && !self.in_club(club_of(seq, self.cfg.clubs)))
        {
            self.stats.dup_bytes += len as u64;
            if self.in_club(club_of(seq, self.cfg.clubs)) {
                self.stats.dup_club += 1;
            } else {
                self.stats.dup_last_hop += 1;
            }
            if let From::Peer(p) = from {
                self.prune(p, seq);
            }
            return;
        }
        match from {
            From::Peer(p) => {
                self.stats.bytes_from_peers += len as u64;
                self.link_has(p, seq);
            }
            From::Origin => self.stats.bytes_from_origin += len as u64,
        }
        let ingest = block.header().ingest_time_ms;
        self.event(PeerEvent::Arrived {
            seq,
            ingest_time_ms: ingest,
            from,
            bytes: len,
        });
        self.learn_rate(seq, ingest);
        if let Some(m) = self.forget(seq) {
            if from == From::Origin || now > self.deadline(seq) {
                self.note_swarm_failed(now, seq, &m);
            }
            if let Some((p, _)) = m.asked {
                if From::Peer(p) != from {
                    self.push(p, Frame::Cancel(seq));
                }
            }
        }
        self.note_seen(now, seq);
        let arrived = self.in_club(club_of(seq, self.cfg.clubs)).then_some(now);
        if arrived.is_some() && self.cfg.relay {
            self.relay(&block, from);
        }
        self.cache.insert(seq, Cached { block, arrived });
        while self.cache.len() > self.cfg.cache_blocks.clamp(1, MAX_CACHE_BLOCKS) {
            if let Some((old, _)) = self.cache.pop_first() {
                self.unqueue_block(old);
            }
        }
        self.advance_play(now);
    }

    /// A duplicate came from `p`: if `p` is an eager in-club parent that lags
    /// the first copy by more than [`PeerConfig::prune_lag_ms`] and another
    /// parent stays eager, ask `p` to send HAVEs instead.
    fn prune(&mut self, p: PeerId, seq: u64) {
        let c = club_of(seq, self.cfg.clubs);
        let down = LinkRole::Download { club: c };
        let bit = if c < 64 { 1u64 << c } else { 0 };
        self.link_has(p, seq);
        // The cheap tests of `p` itself first: most duplicates come from a
        // parent already pruned, or from the seeder or a last-hop source.
        let Some(st) = self.links.get(&p) else {
            return;
        };
        if p == SEEDER_PEER_ID || bit == 0 || !st.roles.contains(&down) || st.pruned & bit != 0 {
            return;
        }
        let lagging = self
            .cache
            .get(seq)
            .and_then(|c| c.arrived)
            .is_none_or(|t| self.now.since(t) > self.prune_lag(seq, t));
        // Keep at least one other eager peer parent (the seeder pushes only some
        // of the club's blocks), or the club would go quiet.
        if !lagging
            || !self
                .club_links(c)
                .iter()
                .filter(|&&q| q != p && q != SEEDER_PEER_ID)
                .filter_map(|q| self.links.get(q))
                .any(|l| l.open && l.roles.contains(&down) && l.pruned & bit == 0)
        {
            return;
        }
        if let Some(st) = self.links.get_mut(&p) {
            st.pruned |= bit;
        }
        self.push(p, Frame::Prune(seq));
    }

    /// How far behind the first copy of `seq`, which came at `first`, a
    /// duplicate must come to prune its parent, ms: [`PeerConfig::prune_lag_ms`],
    /// or more for a block that was already old at its first copy.
    fn prune_lag(&self, seq: u64, first: Time) -> u64 {
        let floor = self.cfg.prune_lag_ms;
        let Some(c) = self.cache.get(seq) else {
            return floor;
        };
        let age = first.0.saturating_sub(c.block.header().ingest_time_ms);
        let scaled = age.saturating_mul(self.cfg.prune_lag_age_pct) / 100;
        floor.max(scaled.min(self.cfg.prune_lag_max_ms))
    }

    fn learn_rate(&mut self, seq: u64, ingest: u64) {
        if !self.anchor_real {
            // The welcome's anchor is a guess (the edge cut "about now"; in a
            // stream not started yet, seq 0 long before it is cut): the first
            // real block replaces it and teaches no rate.
            self.anchor = Some((seq, ingest));
            self.anchor_real = true;
            self.rate_base = Some((seq, ingest));
            return;
        }
        if let Some((bs, bt)) = self.rate_base {
            // Ingest is bursty (a fragment's blocks may share one ingest time),
            // so the first estimate spans some ingest time, which a burst
            // does not; then the average follows drift.
            if seq > bs && ingest >= bt + RATE_BASELINE_MS {
                let per = (ingest - bt) as f64 / (seq - bs) as f64;
                self.ms_per_block = per.clamp(1.0, 10_000.0);
                self.rate_base = None;
            }
        }
        if let Some((s, t)) = self.anchor {
            if seq > s && ingest >= t {
                let per = (ingest - t) as f64 / (seq - s) as f64;
                self.ms_per_block = (1.0 - RATE_WEIGHT) * self.ms_per_block
                    + RATE_WEIGHT * per.clamp(1.0, 10_000.0);
            }
            if seq <= s {
                return;
            }
        }
        self.anchor = Some((seq, ingest));
    }

    fn relay(&mut self, block: &VerifiedBlock, from: From) {
        let seq = block.seq();
        let c = club_of(seq, self.cfg.clubs);
        let sender = match from {
            From::Peer(p) => Some(p),
            From::Origin => None,
        };
        // Scratch lists kept between blocks: this runs for every block.
        let mut haves = std::mem::take(&mut self.relay_haves);
        let mut pushes = std::mem::take(&mut self.relay_pushes);
        for &p in self.club_links(c) {
            let Some(st) = self.links.get(&p) else {
                continue;
            };
            if Some(p) == sender || !st.open {
                continue;
            }
            let mut class = None;
            let mut have = false;
            for r in &st.roles {
                match *r {
                    LinkRole::Download { club } if club == c => have = true,
                    LinkRole::Upload { club } if club == c && !st.said_have(seq) => {
                        if c < 64 && st.lazy & (1 << c) != 0 {
                            have = true;
                        } else {
                            class = Some(0);
                        }
                    }
                    LinkRole::Subscriber {
                        club,
                        share,
                        share_count,
                    } if club == c
                        && in_share(seq, self.cfg.clubs, share, share_count)
                        && !st.said_have(seq) =>
                    {
                        class = class.or(Some(1));
                    }
                    _ => {}
                }
            }
            match class {
                Some(k) => pushes.push((k, seq, st.rank(), p)),
                None if have => haves.push(p),
                None => {}
            }
        }
        for p in haves.drain(..) {
            self.push(p, Frame::Have(seq));
        }
        if self.past_push_deadline(block) {
            // It reached us too late to be of use: no push, and no sign that
            // our upload is short (see `PeerStats::pushes_late`).
            self.stats.pushes_dropped += pushes.len() as u64;
            pushes.clear();
        }
        for e in pushes.drain(..) {
            self.enqueue(e);
        }
        self.relay_haves = haves;
        self.relay_pushes = pushes;
    }

    /// The queue entry of block `seq` for `to` in `class`.
    fn queued_key(&self, class: u8, seq: u64, to: PeerId) -> Queued {
        let rank = self.links.get(&to).map_or(0, LinkState::rank);
        (class, seq, rank, to)
    }

    /// A round trip to link `p` was measured: a new least one re-ranks its
    /// queued pushes (a pass over the bounded queue, at most once per PING).
    fn note_rtt(&mut self, p: PeerId, rtt: u64) {
        let Some(st) = self.links.get_mut(&p) else {
            return;
        };
        let old = st.rank();
        st.min_rtt_ms = Some(st.min_rtt_ms.map_or(rtt, |m| m.min(rtt)));
        let rank = st.rank();
        if rank == old {
            return;
        }
        let moved: Vec<Queued> = self
            .queued
            .range(..)
            .filter(|e| e.3 == p)
            .copied()
            .collect();
        for e @ (class, seq, _, to) in moved {
            self.queued.remove(&e);
            self.queued.insert((class, seq, rank, to));
        }
    }

    /// Queues a push, keyed as [`Peer::queued_key`] keys it (the callers
    /// hold the link, so they rank it).
    fn enqueue(&mut self, e: Queued) {
        debug_assert_eq!(e, self.queued_key(e.0, e.1, e.3), "ranked as its link");
        self.queued.insert(e);
        if self.queued.len() > MAX_QUEUED_PUSHES {
            // The least urgent push goes unsent: the upload is behind.
            self.queued.pop_last();
            self.stats.pushes_dropped += 1;
            self.note_late();
        }
    }

    /// Hands queued blocks to the transport while the send windows allow,
    /// most urgent first, dropping those nobody needs any more.
    fn pump(&mut self) {
        if self.queued.is_empty() {
            return;
        }
        // Entries whose link went or learnt the block left the queue when
        // that happened; deadlines pass in seq order, so the expired ones
        // are the front of each class, and only a new millisecond expires any.
        for class in 0..=1u8 {
            if self.expired_at == Some(self.now) {
                break;
            }
            while let Some(&e) = self
                .queued
                .range((class, 0, 0, 0)..=(class, u64::MAX, u16::MAX, PeerId::MAX))
                .next()
            {
                if self.sendable(e) {
                    break;
                }
                self.drop_queued(e);
            }
        }
        self.expired_at = Some(self.now);
        let mut total = self.buffered_total;
        debug_assert_eq!(
            total,
            self.links.values().map(|l| l.buffered).sum::<usize>()
        );
        let link_window = LINK_WINDOW.min(self.cfg.send_window);
        let mut stale = Vec::new();
        // Entries before the last one sent were stale (dropped) or waited on
        // a full link, which a push only fills further: each pass starts
        // after it.
        let mut after = None;
        let mut room = Vec::new();
        while total < self.cfg.send_window {
            // The most urgent entry whose link has room (a push raises only
            // that link's level, so each pass sends one block). Entries of
            // full links are passed over unlooked-at: a long queue behind
            // full links costs no cache lookups on every frame. No link holds
            // more than `total`, so below one link's window every open link
            // has room, and the entry's own link is looked at instead of
            // listing them all (the common case, and every frame's).
            let every_open_link = total < link_window;
            if !every_open_link {
                room.clear();
                room.extend(
                    self.links
                        .iter()
                        .filter(|(_, l)| l.open && l.buffered < link_window)
                        .map(|(&p, _)| p),
                );
                if room.is_empty() {
                    break;
                }
            }
            let mut next = None;
            let rest = match after {
                Some(a) => self.queued.range((Excluded(a), Unbounded)),
                None => self.queued.range(..),
            };
            for &e in rest {
                let st = self.links.get(&e.3);
                let has_room = if every_open_link {
                    st.is_some_and(|l| l.open)
                } else {
                    room.contains(&e.3)
                };
                if !has_room {
                    continue;
                }
                if self.sendable_on(e, st) {
                    next = Some(e);
                    break;
                }
                stale.push(e);
            }
            for e in stale.drain(..) {
                self.drop_queued(e);
            }
            let Some(e @ (class, seq, _, to)) = next else {
                break;
            };
            after = Some(e);
            self.queued.remove(&e);
            let Some(c) = self.cache.get(seq) else {
                continue;
            };
            let arrived = c.arrived;
            let frame = Frame::Block(c.block.block().clone());
            total += frame.encoded_len();
            if class == 0 {
                self.stats.pushed_club += 1;
            } else {
                self.stats.pushed_last_hop += 1;
            }
            // Last-hop pushes come after the club's, so they show an upload
            // falling behind first; only the relay queues them, while a
            // WANT's answer may rightly go long after the block came.
            if class == 1 && arrived.is_some_and(|t| self.now.since(t) > SLOW_PUSH_MS) {
                self.note_late();
            }
            self.push(to, frame);
        }
    }

    /// Drops unsendable entry `e` from the queue, counting it as expired if
    /// only its deadline stopped it.
    fn drop_queued(&mut self, e: Queued) {
        self.queued.remove(&e);
        self.stats.pushes_dropped += 1;
        let (_, seq, _, to) = e;
        let wanted = self
            .links
            .get(&to)
            .is_some_and(|st| st.open && !st.said_have(seq));
        if wanted && self.cache.contains_key(seq) {
            self.note_late();
        }
    }

    /// Whether a queued push may still go: its link is open, the remote has
    /// not said it has the block, and the block is cached and not past its
    /// deadline.
    fn sendable(&self, e: Queued) -> bool {
        self.sendable_on(e, self.links.get(&e.3))
    }

    /// [`Peer::sendable`], given `e`'s link `st` (`None`: it went).
    fn sendable_on(&self, (_, seq, _, _): Queued, st: Option<&LinkState>) -> bool {
        match (st, self.cache.get(seq)) {
            (Some(st), Some(c)) => {
                st.open && !st.said_have(seq) && !self.past_push_deadline(&c.block)
            }
            _ => false,
        }
    }

    /// Whether block `b` is too old to push: a receiver would get it past its
    /// deadline (its ingest plus the target latency).
    fn past_push_deadline(&self, b: &VerifiedBlock) -> bool {
        self.now.0 >= b.header().ingest_time_ms + self.cfg.target_latency_ms
    }

    /// Drops the queued pushes `gone` matches.
    fn unqueue(&mut self, gone: impl Fn(&Queued) -> bool) {
        let before = self.queued.len();
        self.queued.retain(|e| !gone(e));
        self.stats.pushes_dropped += (before - self.queued.len()) as u64;
    }

    /// Drops the queued pushes of block `seq` (a range of the queue per
    /// class, not a pass over all of it: this runs on every accepted block
    /// once the cache is full).
    fn unqueue_block(&mut self, seq: u64) {
        for class in 0..=1u8 {
            let gone: Vec<_> = self
                .queued
                .range((class, seq, 0, 0)..=(class, seq, u16::MAX, PeerId::MAX))
                .copied()
                .collect();
            for e in gone {
                self.queued.remove(&e);
                self.stats.pushes_dropped += 1;
            }
        }
    }

    /// Link `p` has block `seq` (it said HAVE or sent it): remember that and
    /// drop any push of it queued for `p`.
    fn link_has(&mut self, p: PeerId, seq: u64) {
        if let Some(st) = self.links.get_mut(&p) {
            st.note_have(seq);
            let rank = st.rank();
            for class in 0..=1 {
                if self.queued.remove(&(class, seq, rank, p)) {
                    self.stats.pushes_dropped += 1;
                }
            }
        }
    }

    /// Whether the server gave this peer anyone to upload to. A peer without
    /// (a leaf, whose upload is too small to share) answers no WANTs.
    fn uploads(&self) -> bool {
        self.links.values().any(|l| {
            l.roles
                .iter()
                .any(|r| matches!(r, LinkRole::Upload { .. } | LinkRole::Subscriber { .. }))
        })
    }

    fn answer_want(&mut self, now: Time, from: PeerId, seq: u64) {
        let sec = now.as_millis() / 1000;
        let Some(st) = self.links.get_mut(&from) else {
            return;
        };
        if st.want_window.0 != sec {
            st.want_window = (sec, 0);
        }
        st.want_window.1 += 1;
        let c = club_of(seq, self.cfg.clubs);
        if c < 64 {
            // A WANT from a pruned child grafts the link back to eager push.
            st.lazy &= !(1 << c);
        }
        let over = st.want_window.1 > MAX_WANTS_PER_SEC;
        // A relay whose pushes run late keeps its upload for its children
        // and subscribers: a pull over the last hop would come late too, and
        // the puller may ask someone else.
        let in_club = st.roles.iter().any(
            |r| matches!(*r, LinkRole::Download { club } | LinkRole::Upload { club } if club == c),
        );
        let rank = st.rank();
        let busy = !in_club && self.running_late(now);
        if !over && !busy && self.uploads() && self.cache.contains_key(seq) {
            self.enqueue((0, seq, rank, from));
        } else {
            self.push(from, Frame::DontHave(seq));
        }
    }

    /// Candidates to pull `seq` from: links that said HAVE first, then members
    /// of its club (download/upload links and sources), skipping `not`.
    fn holder(&self, seq: u64, not: Option<PeerId>) -> Option<PeerId> {
        let c = club_of(seq, self.cfg.clubs);
        let mut best: Option<(u8, PeerId)> = None;
        for (&p, st) in &self.links {
            if !st.open || Some(p) == not {
                continue;
            }
            let rank = if st.said_have(seq) {
                0
            } else if st.roles.iter().any(|r| match *r {
                LinkRole::Download { club } | LinkRole::Upload { club } => club == c,
                LinkRole::Source { club, .. } => club == c,
                LinkRole::Subscriber { .. } => false,
            }) || (c < 64 && st.remote_clubs & (1 << c) != 0)
            {
                1
            } else {
                continue;
            };
            if best.is_none_or(|(b, _)| rank < b) {
                best = Some((rank, p));
            }
        }
        best.map(|(_, p)| p)
    }

    /// When a missing, unasked block is first pulled: an own club's block
    /// after the pull grace, another club's no earlier than
    /// [`PeerConfig::pull_lead_ms`] before its origin moment.
    fn pull_at(&self, seq: u64, m: &Missing) -> Time {
        let grace = m.noticed + self.cfg.pull_grace_ms;
        if self.in_club(club_of(seq, self.cfg.clubs)) {
            return grace;
        }
        if m.orphan {
            return grace;
        }
        let lead = self.cfg.origin_margin_ms + self.cfg.pull_lead_ms;
        grace.max(Time(self.deadline(seq).0.saturating_sub(lead)))
    }

    fn in_backlog(&self, seq: u64) -> bool {
        self.backlog.is_some_and(|(end, _)| seq <= end)
    }

    /// When missing block `seq` goes to the origin: at once for the startup
    /// backlog, else [`PeerConfig::origin_margin_ms`] before its deadline.
    fn origin_at(&self, seq: u64) -> Time {
        if self.in_backlog(seq) {
            return Time(0);
        }
        Time(
            self.deadline(seq)
                .0
                .saturating_sub(self.cfg.origin_margin_ms),
        )
    }

    /// How long a WANT to `p` may go unanswered: at least two round trips.
    fn want_timeout(&self, p: PeerId) -> u64 {
        let rtt = self.links.get(&p).and_then(|l| l.rtt_ms).unwrap_or(0);
        self.cfg.want_timeout_ms.max(2 * rtt)
    }

    fn check_missing(&mut self, now: Time) {
        if now >= self.reindex_at {
            // Deadlines are estimates that move as blocks arrive: refresh
            // every due time now and then, not on every block.
            self.reindex_at = now + REINDEX_MS;
            let all: Vec<u64> = self.missing.keys().collect();
            for seq in all {
                self.reindex(seq);
            }
        }
        let seqs: Vec<u64> = self
            .due
            .range(..=(now, u64::MAX))
            .map(|&(_, seq)| seq)
            .collect();
        for seq in seqs {
            self.check_one(now, seq);
            self.reindex(seq);
        }
    }

    /// Block `seq` goes to the origin: counts it against the open last-hop
    /// source of its share, and reports a source that does so too often.
    fn source_missed(&mut self, now: Time, seq: u64, noticed: Time) {
        let Some(p) = self.source_link(seq) else {
            return;
        };
        let Some(st) = self.links.get_mut(&p) else {
            return;
        };
        if st
            .source_since
            .is_none_or(|since| noticed < since + SOURCE_SETTLE_MS)
        {
            return;
        }
        let (n, since) = &mut st.source_misses;
        if now.since(*since) > SLOW_SOURCE_WINDOW_MS {
            *n = 0;
            *since = now;
        }
        *n += 1;
        if *n >= SLOW_SOURCE_MISSES {
            *n = 0;
            *since = now;
            self.stats.slow_sources += 1;
            self.event(PeerEvent::SlowSource { peer: p });
        }
    }

    /// Pulls, re-pulls or gap-fills missing block `seq` if it is due.
    fn check_one(&mut self, now: Time, seq: u64) {
        let Some(m) = self.missing.get(seq).copied() else {
            return;
        };
        if m.origin || now < m.retry_at {
            return;
        }
        if now >= self.origin_at(seq) {
            if let Some((p, _)) = m.asked {
                self.push(p, Frame::Cancel(seq));
            }
            if let Some(mm) = self.missing.get_mut(seq) {
                mm.origin = true;
                mm.asked = None;
            }
            // The startup backlog goes to the origin by design, before any
            // source could push it: not a source's miss.
            if !m.orphan && !self.in_backlog(seq) {
                self.source_missed(now, seq, m.noticed);
            }
            if m.origin_tries < MAX_ORIGIN_TRIES {
                if let Some(mm) = self.missing.get_mut(seq) {
                    mm.origin_tries += 1;
                }
                self.stats.gap_fills += 1;
                self.event(PeerEvent::GapFill { seq });
            }
            return;
        }
        let due = match m.asked {
            None => now >= self.pull_at(seq, &m),
            Some((p, at)) => now.since(at) >= self.want_timeout(p),
        };
        if !due {
            return;
        }
        let not = m.asked.map(|(p, _)| p);
        if let Some(p) = self.holder(seq, not) {
            let c = club_of(seq, self.cfg.clubs);
            if let Some(st) = self.links.get_mut(&p) {
                if c < 64 && st.roles.contains(&LinkRole::Download { club: c }) {
                    // The WANT grafts this parent back to eager push.
                    st.pruned &= !(1 << c);
                }
            }
            self.want(now, seq, p);
        } else if let Some(mm) = self.missing.get_mut(seq) {
            mm.asked = None;
            mm.noticed = now;
        }
    }

    /// Pulls missing block `seq` from `p` with WANT.
    fn want(&mut self, now: Time, seq: u64, p: PeerId) {
        self.stats.wants_sent += 1;
        self.push(p, Frame::Want(seq));
        if let Some(m) = self.missing.get_mut(seq) {
            m.asked = Some((p, now));
            m.tries = m.tries.saturating_add(1);
        }
    }

    fn advance_play(&mut self, now: Time) {
        let Some(mut next) = self.next_play else {
            return;
        };
        loop {
            if let Some(c) = self.cache.get(next) {
                let b = c.block.clone();
                self.event(PeerEvent::Play(b));
                next += 1;
                continue;
            }
            // Missing: skip once it is past its deadline and a later fragment
            // start is at hand.
            if now.0 < self.deadline(next).0 + self.cfg.skip_grace_ms {
                break;
            }
            let resume = self
                .cache
                .range(next.saturating_add(1), u64::MAX)
                .find(|(s, c)| {
                    *s > next && c.block.header().flags.contains(BlockFlags::FRAGMENT_START)
                })
                .map(|(s, _)| s);
            let Some(to) = resume else { break };
            self.stats.blocks_skipped += to - next;
            self.event(PeerEvent::Skip { from: next, to });
            let gone: Vec<u64> = self.missing.keys_below(to).collect();
            for s in gone {
                if let Some(m) = self.forget(s) {
                    self.note_swarm_failed(now, s, &m);
                }
            }
            next = to;
        }
        self.next_play = Some(next);
        let stale: Vec<u64> = self.missing.keys_below(next).collect();
        for s in stale {
            // Own-club blocks behind the playhead still matter to the club, but
            // not enough to chase them.
            self.forget(s);
        }
    }

    /// The earliest `next_ping` of the open links.
    fn next_ping(&mut self) -> Option<Time> {
        let fresh = || {
            self.links
                .values()
                .filter(|l| l.open)
                .map(|l| l.next_ping)
                .min()
        };
        if let Some(t) = self.ping_min {
            debug_assert_eq!(t, fresh(), "the remembered ping matches the links");
            return t;
        }
        let t = fresh();
        self.ping_min = Some(t);
        t
    }

    fn ping(&mut self, now: Time) {
        if self.next_ping().is_none_or(|t| t > now) {
            return;
        }
        // One pass pings the due links and finds the next ping.
        let mut due = SmallVec::<[(PeerId, u64); 8]>::new();
        let mut next: Option<Time> = None;
        for (&p, st) in self.links.iter_mut().filter(|(_, st)| st.open) {
            if st.next_ping <= now {
                st.ping_nonce = st.ping_nonce.wrapping_add(1);
                st.ping_sent = now;
                st.next_ping = now + PING_INTERVAL_MS;
                due.push((p, st.ping_nonce));
            }
            next = Some(next.map_or(st.next_ping, |t| t.min(st.next_ping)));
        }
        self.ping_min = Some(next);
        for (p, n) in due {
            self.push(p, Frame::Ping(n));
        }
    }

    fn schedule(&mut self, now: Time) {
        let mut next: Option<Time> = None;
        let mut at = |t: Time| {
            let t = t.max(now);
            next = Some(next.map_or(t, |n: Time| n.min(t)));
        };
        if let Some(&(t, _)) = self.due.first() {
            at(t);
        }
        if let Some(p) = self.next_play {
            let skip_at = self.deadline(p) + self.cfg.skip_grace_ms;
            // Past it, the skip waits for a fragment start to arrive, which
            // re-evaluates playback by itself.
            if !self.cache.contains_key(p) && skip_at > now {
                at(skip_at);
            }
        }
        let ping = self.next_ping();
        if let Some(t) = ping {
            at(t);
        }
        self.next_check = next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{Block, StreamKey, StreamSigner};
    use proptest::prelude::*;

    const T0: u64 = 1_000_000;

    fn signer() -> StreamSigner {
        StreamSigner::from_seed(&[5; 32])
    }

    fn block(seq: u64, start: bool) -> Block {
        let flags = if start {
            BlockFlags::FRAGMENT_START
        } else {
            BlockFlags::empty()
        };
        signer()
            .sign(
                seq,
                flags,
                T0 + seq * 100,
                seq,
                Bytes::from(vec![seq as u8; 100]),
            )
            .expect("small")
            .into_block()
    }

    fn link(peer: PeerId, role: LinkRole) -> Link {
        Link {
            peer,
            role,
            offer: true,
        }
    }

    /// Peer 1 in clubs 0 and 1 of 4: download from 2, upload to 3 and 4 in club
    /// 0, last-hop subscriber 5 (share 0 of 1) and 6 (share 1 of 2) for club 0,
    /// source 7 for club 2.
    fn peer() -> Peer<StreamKey> {
        peer_with(PeerConfig::new(1, 4))
    }

    /// The links of [`peer`].
    fn links() -> [Link; 6] {
        [
            link(2, LinkRole::Download { club: 0 }),
            link(3, LinkRole::Upload { club: 0 }),
            link(4, LinkRole::Upload { club: 0 }),
            link(
                5,
                LinkRole::Subscriber {
                    club: 0,
                    share: 0,
                    share_count: 1,
                },
            ),
            link(
                6,
                LinkRole::Subscriber {
                    club: 0,
                    share: 1,
                    share_count: 2,
                },
            ),
            link(
                7,
                LinkRole::Source {
                    club: 2,
                    share: 0,
                    share_count: 1,
                },
            ),
        ]
    }

    fn peer_with(cfg: PeerConfig) -> Peer<StreamKey> {
        let mut p = Peer::new(cfg, signer().key());
        let links = links();
        p.handle_welcome(Time(T0), &[0, 1], &links, 0, 0);
        for l in &links {
            p.handle_link_open(Time(T0), l.peer);
        }
        // Block 0, the startup backlog, goes to the origin at once.
        p.handle_timeout(Time(T0));
        let (_, e) = drain(&mut p);
        assert!(e.contains(&PeerEvent::GapFill { seq: 0 }), "{e:?}");
        p
    }

    fn drain(p: &mut Peer<StreamKey>) -> (Vec<Transmit>, Vec<PeerEvent>) {
        let t = std::iter::from_fn(|| p.poll_transmit()).collect();
        let e = std::iter::from_fn(|| p.poll_event()).collect();
        (t, e)
    }

    fn sent(t: &[Transmit]) -> Vec<(PeerId, &'static str)> {
        t.iter()
            .map(|t| {
                let kind = match t.frame {
                    Frame::Have(_) => "have",
                    Frame::Block(_) => "block",
                    Frame::Want(_) => "want",
                    Frame::Prune(_) => "prune",
                    Frame::Cancel(_) => "cancel",
                    _ => "other",
                };
                (t.to, kind)
            })
            .collect()
    }

    #[test]
    fn own_club_block_is_announced_then_pushed_club_first_then_last_hop() {
        let mut p = peer();
        // Peer 4 already has block 4 (club 0, share index 1).
        p.handle_frame(Time(T0 + 10), 4, Frame::Have(4));
        p.handle_frame(Time(T0 + 20), 2, Frame::Block(block(4, false)));
        let (t, e) = drain(&mut p);
        assert_eq!(
            sent(&t),
            vec![(3, "block"), (5, "block"), (6, "block")],
            "no HAVE back to the sender; push to 3 (not 4, which has it); then last hop"
        );
        assert!(e
            .iter()
            .any(|e| matches!(e, PeerEvent::Arrived { seq: 4, .. })));
        // Block 8 is share index 2: subscriber 6 (share 1 of 2) does not get it.
        p.handle_frame(Time(T0 + 30), 3, Frame::Block(block(8, false)));
        let (t, _) = drain(&mut p);
        assert_eq!(sent(&t), vec![(2, "have"), (4, "block"), (5, "block")]);
    }

    #[test]
    fn other_clubs_blocks_are_played_but_not_relayed() {
        let mut p = peer();
        p.handle_frame(Time(T0), 7, Frame::Block(block(2, false)));
        let (t, e) = drain(&mut p);
        assert!(t.is_empty(), "club 2 is not ours: {:?}", sent(&t));
        assert!(e
            .iter()
            .any(|e| matches!(e, PeerEvent::Arrived { seq: 2, .. })));
    }

    /// [`peer`] with a second in-club parent, 8, after block 0 came from
    /// parent 2 at `T0`; and the prune lag.
    fn two_parents() -> (Peer<StreamKey>, u64) {
        let mut p = peer();
        p.handle_link(
            Time(T0),
            LinkOp::Add,
            link(8, LinkRole::Download { club: 0 }),
        );
        p.handle_link_open(Time(T0), 8);
        drain(&mut p);
        p.handle_frame(Time(T0), 2, Frame::Block(block(0, true)));
        drain(&mut p);
        let lag = p.config().prune_lag_ms;
        (p, lag)
    }

    #[test]
    fn duplicates_are_dropped_and_the_slower_parent_pruned() {
        let (mut p, lag) = two_parents();
        p.handle_frame(Time(T0 + lag + 1), 8, Frame::Block(block(0, true)));
        let (t, e) = drain(&mut p);
        assert_eq!(sent(&t), vec![(8, "prune")]);
        assert!(
            e.is_empty(),
            "a duplicate is neither played nor counted as arrived"
        );
        assert_eq!(p.stats().dup_bytes, 100);
        assert_eq!(p.stats().bytes_from_peers, 100);
        // Pruned by 3, we announce club 0 blocks to 3 instead of pushing.
        let t1 = T0 + lag + 1;
        p.handle_frame(Time(t1 + 6), 3, Frame::Prune(0));
        p.handle_frame(Time(t1 + 7), 2, Frame::Block(block(4, false)));
        let (t, _) = drain(&mut p);
        assert!(sent(&t).contains(&(3, "have")));
        assert!(!sent(&t).contains(&(3, "block")));
        // A WANT from 3 grafts it back to pushes.
        p.handle_frame(Time(t1 + 8), 3, Frame::Want(4));
        p.handle_frame(Time(t1 + 9), 2, Frame::Block(block(8, false)));
        let (t, _) = drain(&mut p);
        assert!(sent(&t).contains(&(3, "block")));
    }

    /// A parent whose copy comes within the prune lag keeps racing the other.
    #[test]
    fn a_duplicate_close_behind_the_first_copy_prunes_nobody() {
        let (mut p, lag) = two_parents();
        p.handle_frame(Time(T0 + lag), 8, Frame::Block(block(0, true)));
        let (t, _) = drain(&mut p);
        assert!(sent(&t).is_empty(), "{:?}", sent(&t));
        assert_eq!(p.stats().dup_bytes, 100);
        // Later, the same parent lagging on another block is pruned.
        p.handle_frame(Time(T0 + 400), 2, Frame::Block(block(4, false)));
        drain(&mut p);
        p.handle_frame(Time(T0 + 400 + lag + 1), 8, Frame::Block(block(4, false)));
        let (t, _) = drain(&mut p);
        assert_eq!(sent(&t), vec![(8, "prune")]);
    }

    /// A block already old at its first copy stretches the lag: deep in a
    /// large club both parents' paths are long.
    #[test]
    fn an_old_block_stretches_the_prune_lag() {
        let (mut p, lag) = two_parents();
        let cfg = *p.config();
        // Block 8 (club 0) is ingested at T0 + 800 and first comes 700 ms
        // later: the lag is 30 % of 700 ms, 210 ms.
        let age = 700;
        let stretched = (age * cfg.prune_lag_age_pct / 100).min(cfg.prune_lag_max_ms);
        assert!(stretched > lag + 1);
        let first = T0 + 800 + age;
        p.handle_frame(Time(first), 2, Frame::Block(block(8, false)));
        drain(&mut p);
        p.handle_frame(Time(first + lag + 1), 8, Frame::Block(block(8, false)));
        let (t, _) = drain(&mut p);
        assert!(sent(&t).is_empty(), "{:?}", sent(&t));
        // Block 12, as old at its first copy: a duplicate past the stretched
        // lag prunes.
        let first = T0 + 1200 + age;
        p.handle_frame(Time(first), 2, Frame::Block(block(12, false)));
        drain(&mut p);
        p.handle_frame(
            Time(first + stretched + 1),
            8,
            Frame::Block(block(12, false)),
        );
        let (t, _) = drain(&mut p);
        assert_eq!(sent(&t), vec![(8, "prune")]);
    }

    #[test]
    fn the_bitrate_is_estimated_from_the_blocks_seen() {
        let mut p = peer();
        // A 16 KiB block every 100 ms of ingest time (club 0 holds every 4th
        // seq, stamped 400 ms apart): about 1.3 Mbit/s with the overhead.
        for seq in 0..40 {
            p.handle_frame(Time(T0 + seq * 100), 2, Frame::Block(big_block(seq * 4)));
        }
        let kbps = p.rate_kbps();
        let want = (16 * 1024 + crate::block::BLOCK_OVERHEAD) as f64 * 8.0 / 100.0;
        assert!(
            (f64::from(kbps) - want).abs() < want * 0.2,
            "{kbps} vs {want}"
        );
    }

    #[test]
    fn blocks_play_in_order() {
        let mut p = peer();
        p.handle_frame(Time(T0), 2, Frame::Block(block(1, false)));
        let (_, e) = drain(&mut p);
        assert!(
            !e.iter().any(|e| matches!(e, PeerEvent::Play(_))),
            "0 is still missing"
        );
        p.handle_frame(Time(T0 + 1), 2, Frame::Block(block(0, true)));
        let (_, e) = drain(&mut p);
        let played: Vec<u64> = e
            .iter()
            .filter_map(|e| match e {
                PeerEvent::Play(b) => Some(b.seq()),
                _ => None,
            })
            .collect();
        assert_eq!(played, vec![0, 1]);
    }

    fn big_block(seq: u64) -> Block {
        signer()
            .sign(
                seq,
                BlockFlags::empty(),
                T0 + seq * 100,
                seq,
                Bytes::from(vec![seq as u8; 16 * 1024]),
            )
            .expect("fits")
            .into_block()
    }

    #[test]
    fn queued_pushes_wait_for_send_window_club_first_and_drop_when_had() {
        let mut p = peer();
        // Two 16 KiB blocks of club 0 arrive at once; each goes to 3 and 4
        // (in club) and to subscriber 5 (last hop). 8 is share index 2: not 6.
        p.handle_frame(Time(T0 + 1), 2, Frame::Block(big_block(4)));
        p.handle_frame(Time(T0 + 2), 2, Frame::Block(big_block(8)));
        let (t, _) = drain(&mut p);
        // The window lets about 40 KiB out: the in-club pushes of block 4 first.
        assert_eq!(sent(&t)[..3], [(3, "block"), (4, "block"), (5, "block")]);
        let blocks = t
            .iter()
            .filter(|t| matches!(t.frame, Frame::Block(_)))
            .count();
        assert!(blocks < 6, "the window holds some back: {:?}", sent(&t));
        assert!(p.queued_pushes() > 0);
        // While pushes wait, the driver is asked to wake for the pump.
        assert_eq!(p.poll_timeout(), Some(Time(T0 + 2 + PUMP_POLL_MS)));
        // Peer 5 says it has block 8: its queued push is dropped, not sent.
        p.handle_frame(Time(T0 + 3), 5, Frame::Have(8));
        for peer in [3, 4, 5, 6] {
            p.handle_link_buffered(peer, 0);
        }
        let (t, _) = drain(&mut p);
        assert!(!t.iter().any(|t| t.to == 5 && t.frame.encoded_len() > 1000));
        assert!(sent(&t).contains(&(3, "block")) && sent(&t).contains(&(4, "block")));
        assert_eq!(p.queued_pushes(), 0);
        assert_eq!(p.stats().pushes_dropped, 1);
        // A pump wake-up is asked for only while pushes wait.
        assert_eq!(p.poll_timeout(), p.next_check);
    }

    /// A peer whose transport takes one frame at a time and whose queue is
    /// woken only by a drained frame.
    fn one_frame_window_peer() -> Peer<StreamKey> {
        let mut cfg = PeerConfig::new(1, 4);
        cfg.pump_poll_ms = 0;
        cfg.send_window = 1;
        peer_with(cfg)
    }

    #[test]
    fn a_one_frame_window_lets_a_newer_in_club_push_overtake_a_last_hop_one() {
        let mut p = one_frame_window_peer();
        let blocks = |t: &[Transmit]| -> Vec<(PeerId, u64)> {
            t.iter()
                .filter_map(|t| match &t.frame {
                    Frame::Block(b) => Some((t.to, b.header.seq)),
                    _ => None,
                })
                .collect()
        };
        // Drains what the peer sent, then reports it sent by the transport:
        // at most one block goes out per round.
        let round = |p: &mut Peer<StreamKey>, order: &mut Vec<(PeerId, u64)>| {
            let (t, _) = drain(p);
            assert!(blocks(&t).len() <= 1, "{:?}", blocks(&t));
            order.extend(blocks(&t));
            let mut to: Vec<PeerId> = t.iter().map(|t| t.to).collect();
            to.dedup();
            for peer in to {
                p.handle_link_buffered(peer, 0);
            }
        };
        let mut order = Vec::new();
        // The welcome's frames leave.
        for l in links() {
            p.handle_link_buffered(l.peer, 0);
        }
        p.handle_frame(Time(T0 + 1), 2, Frame::Block(big_block(4)));
        round(&mut p, &mut order);
        // No polling: only a drained frame wakes the queue.
        assert_eq!(p.poll_timeout(), p.next_check);
        p.handle_frame(Time(T0 + 2), 2, Frame::Block(big_block(8)));
        for _ in 0..8 {
            round(&mut p, &mut order);
        }
        // Block 8's in-club pushes overtake block 4's last-hop pushes.
        let want = [(3, 4), (4, 4), (3, 8), (4, 8), (5, 4), (6, 4), (5, 8)];
        assert_eq!(order, want);
    }

    #[test]
    fn a_block_goes_to_its_nearest_remotes_first() {
        let mut p = one_frame_window_peer();
        send(&mut p, T0);
        // The links are pinged again (the first PINGs, at open, went
        // unanswered); block 52 (club 0, share 1 of 2: 3 and 4 in club, 5 and
        // 6 last hop) arrives before any PONG, so its first push goes by peer
        // id.
        let at = T0 + PING_INTERVAL_MS;
        p.handle_timeout(Time(at));
        let (t, _) = drain(&mut p);
        let pings: Vec<(PeerId, u64)> = t
            .iter()
            .filter_map(|t| match t.frame {
                Frame::Ping(n) => Some((t.to, n)),
                _ => None,
            })
            .collect();
        assert_eq!(pings.len(), links().len(), "{pings:?}");
        p.handle_frame(Time(at + 1), 2, Frame::Block(big_block(52)));
        let first = |sent: Vec<(PeerId, &'static str)>| {
            sent.into_iter().find(|s| s.1 == "block").map(|s| s.0)
        };
        assert_eq!(first(send(&mut p, at + 1)), Some(3));
        // The PONGs re-rank the pushes still queued: the nearest first, in
        // club before last hop.
        for (to, n) in pings {
            let rtt = match to {
                4 => 90,
                5 => 60,
                6 => 30,
                _ => 10,
            };
            p.handle_frame(Time(at + rtt), to, Frame::Pong(n));
        }
        let order: Vec<Option<PeerId>> =
            (0..3).map(|i| first(send(&mut p, at + 100 + i))).collect();
        assert_eq!(order, [Some(4), Some(6), Some(5)]);
    }

    /// The transport drains every link of `p` at `at`; one block goes out.
    fn send(p: &mut Peer<StreamKey>, at: u64) -> Vec<(PeerId, &'static str)> {
        p.now = Time(at);
        p.handle_links_buffered(links().map(|l| (l.peer, 0)));
        sent(&drain(p).0)
    }

    /// A [`one_frame_window_peer`] that got eight blocks of club 0 at once:
    /// 15 in-club pushes and 12 last-hop ones wait behind the first push.
    fn swamped_peer() -> Peer<StreamKey> {
        let mut p = one_frame_window_peer();
        send(&mut p, T0);
        for (i, seq) in (4..=32).step_by(4).enumerate() {
            p.handle_frame(Time(T0 + 1 + i as u64), 2, Frame::Block(big_block(seq)));
        }
        p
    }

    /// Drains the queue of `p` from T0 + 300 ms on, a frame a millisecond,
    /// so its last-hop pushes go out late; returns the time after.
    fn drain_late(p: &mut Peer<StreamKey>) -> u64 {
        let mut at = T0 + 300;
        while p.queued_pushes() > 0 {
            send(p, at);
            at += 1;
        }
        assert!(p.stats().pushes_late >= YIELD_LATE_PUSHES as u64);
        at
    }

    #[test]
    fn a_relay_running_late_stops_racing_for_a_child_another_parent_beat() {
        let mut p = swamped_peer();
        assert_eq!(sent(&drain(&mut p).0), vec![(3, "block")]);
        // On time: child 4 announcing block 4 while its push waits costs the
        // push only.
        p.handle_frame(Time(T0 + 10), 4, Frame::Have(4));
        assert_eq!(p.stats().races_yielded, 0);
        // From 300 ms on, the queue drains; the last-hop pushes are late.
        let at = drain_late(&mut p);
        // Now child 4 announcing block 36 before our push went makes us lazy
        // for it in club 0.
        p.handle_frame(Time(at), 2, Frame::Block(big_block(36)));
        assert_eq!(send(&mut p, at + 1), vec![(3, "block")]);
        p.handle_frame(Time(at + 2), 4, Frame::Have(36));
        assert_eq!(p.stats().races_yielded, 1);
        p.handle_frame(Time(at + 3), 3, Frame::Have(36));
        assert_eq!(p.stats().races_yielded, 1, "3 had our copy: no race lost");
        while p.queued_pushes() > 0 {
            send(&mut p, at + 4);
        }
        p.handle_frame(Time(at + 10), 2, Frame::Block(big_block(40)));
        let mut out = sent(&drain(&mut p).0);
        for i in 0..4 {
            out.extend(send(&mut p, at + 11 + i));
        }
        assert!(
            out.contains(&(4, "have")) && !out.contains(&(4, "block")),
            "{out:?}"
        );
        assert!(out.contains(&(3, "block")), "{out:?}");
        // Its WANT grafts us back.
        p.handle_frame(Time(at + 20), 4, Frame::Want(40));
        p.handle_frame(Time(at + 30), 2, Frame::Block(big_block(44)));
        let mut out = sent(&drain(&mut p).0);
        for i in 0..6 {
            out.extend(send(&mut p, at + 31 + i));
        }
        assert!(out.contains(&(4, "block")), "{out:?}");
        // Past `yield_late_ms` with nothing late, a lost race costs nothing.
        let calm = at + p.config().yield_late_ms;
        while p.queued_pushes() > 0 {
            send(&mut p, calm);
        }
        send(&mut p, calm);
        p.handle_frame(Time(calm + 1), 2, Frame::Block(big_block(48)));
        assert_eq!(sent(&drain(&mut p).0), vec![(3, "block")]);
        p.handle_frame(Time(calm + 3), 4, Frame::Have(48));
        assert_eq!(p.stats().races_yielded, 1);
    }

    /// A block the origin refused is pulled at once from another holder of
    /// its club (not the source that let it go missing), a few a second.
    #[test]
    fn a_block_the_origin_refused_is_pulled_from_another_holder_a_few_a_second() {
        let mut p = peer_with_second_source();
        p.handle_frame(Time(T0 + 1), 2, Frame::Block(block(0, true)));
        // Block 100 shows that 1..=99 are missing; club 2's are 2, 6, 10, ...
        p.handle_frame(Time(T0 + 2), 2, Frame::Block(block(100, true)));
        drain(&mut p);
        let refused: Vec<u64> = (2..100)
            .step_by(4)
            .take(MAX_RESCUES_PER_SEC as usize + 2)
            .collect();
        let now = Time(T0 + 50);
        for &seq in &refused {
            p.handle_gap_fill_failed(now, seq);
        }
        let (t, _) = drain(&mut p);
        assert_eq!(
            sent(&t),
            vec![(8, "want"); MAX_RESCUES_PER_SEC as usize],
            "pulled from 8, never from the source 7, and only so many a second"
        );
        // The next second, the next refusal is pulled too.
        p.handle_gap_fill_failed(now + 1_000, 98);
        assert_eq!(sent(&drain(&mut p).0), vec![(8, "want")]);
        // Past its deadline a refused block is left to be skipped.
        p.handle_gap_fill_failed(p.deadline(94) + 1, 94);
        assert_eq!(sent(&drain(&mut p).0), vec![]);
    }

    /// A relay whose pushes run late answers pulls over the last hop with
    /// DONT_HAVE, so the puller asks someone else, and still serves its club.
    #[test]
    fn a_relay_running_late_refuses_last_hop_pulls_but_serves_its_club() {
        let mut p = swamped_peer();
        drain(&mut p);
        // On time, subscriber 5 gets what it asks for.
        p.handle_frame(Time(T0 + 20), 5, Frame::Want(4));
        assert!(!sent(&drain(&mut p).0).contains(&(5, "other")));
        let at = drain_late(&mut p);
        // Running late: the subscriber and the source of club 2 are refused,
        p.handle_frame(Time(at), 5, Frame::Want(8));
        p.handle_frame(Time(at), 7, Frame::Want(8));
        let (t, _) = drain(&mut p);
        assert!(
            t.iter().all(|t| matches!(t.frame, Frame::DontHave(8))) && t.len() == 2,
            "{:?}",
            sent(&t)
        );
        assert_eq!(p.queued_pushes(), 0);
        // and the in-club child is served.
        p.handle_frame(Time(at + 1), 3, Frame::Want(8));
        assert!(drain(&mut p).0.is_empty());
        assert_eq!(p.queued_pushes(), 1);
    }

    #[test]
    fn have_window_remembers_the_last_span_of_seqs() {
        let mut w = HaveWindow::default();
        assert!(!w.contains(0));
        w.insert(10);
        w.insert(3);
        assert!(w.contains(10) && w.contains(3) && !w.contains(4) && !w.contains(11));
        // Moving up clears the slots it passes, which held seqs a span older.
        w.insert(10 + HaveWindow::SPAN);
        assert!(!w.contains(10), "fell out of the window");
        assert!(w.contains(10 + HaveWindow::SPAN));
        assert!(!w.contains(3 + HaveWindow::SPAN), "slot of 3 was cleared");
        // Too old to remember, and a jump past the whole span clears it all.
        w.insert(5);
        assert!(!w.contains(5));
        w.insert(10 + 5 * HaveWindow::SPAN);
        assert!(!w.contains(10 + HaveWindow::SPAN));
        assert!(w.contains(10 + 5 * HaveWindow::SPAN));
    }

    #[test]
    fn queued_pushes_past_their_deadline_are_dropped() {
        let mut p = peer();
        p.handle_frame(Time(T0 + 1), 2, Frame::Block(big_block(4)));
        p.handle_frame(Time(T0 + 2), 2, Frame::Block(big_block(8)));
        drain(&mut p);
        let queued = p.queued_pushes() as u64;
        assert!(queued > 0);
        assert_eq!(p.stats().pushes_late, 0);
        let late = p.deadline(8) + 1;
        p.handle_timeout(late);
        let (t, _) = drain(&mut p);
        assert!(!t.iter().any(|t| matches!(t.frame, Frame::Block(_))));
        assert_eq!(p.queued_pushes(), 0);
        assert_eq!(p.stats().pushes_late, queued, "still wanted, but too late");
    }

    #[test]
    fn a_block_that_arrives_past_its_deadline_is_not_queued_nor_counted_expired() {
        let mut p = peer();
        let b = big_block(4);
        let late = Time(b.header.ingest_time_ms + p.cfg.target_latency_ms + 1);
        p.handle_frame(late, 2, Frame::Block(b));
        let (t, _) = drain(&mut p);
        assert!(!t.iter().any(|t| matches!(t.frame, Frame::Block(_))));
        assert_eq!(p.queued_pushes(), 0);
        assert_eq!(p.stats().pushes_late, 0, "late, not overloaded");
        assert!(p.stats().pushes_dropped > 0);
    }

    #[test]
    fn a_peer_that_uploads_nothing_answers_wants_with_dont_have() {
        let mut p = peer_with(PeerConfig::new(1, 4));
        p.handle_link(
            Time(T0),
            LinkOp::Remove,
            link(3, LinkRole::Upload { club: 0 }),
        );
        p.handle_frame(Time(T0), 2, Frame::Block(block(0, true)));
        drain(&mut p);
        p.handle_frame(Time(T0 + 1), 7, Frame::Want(0));
        let (t, _) = drain(&mut p);
        assert_eq!(sent(&t), vec![(7, "block")], "still an uploader");
        // Without 4, 5 and 6 (3 went above) it uploads to no one.
        for l in &links()[2..5] {
            p.handle_link(Time(T0), LinkOp::Remove, *l);
        }
        p.handle_frame(Time(T0 + 2), 7, Frame::Want(0));
        let (t, _) = drain(&mut p);
        assert_eq!(sent(&t), vec![(7, "other")], "a leaf says DONT_HAVE");
    }

    #[test]
    fn by_default_a_missing_last_hop_block_goes_to_the_origin_unpulled() {
        let mut p = peer();
        p.handle_frame(Time(T0 + 100), 2, Frame::Block(block(0, true)));
        // Block 2 (club 2, not ours) never comes; 4 does.
        p.handle_frame(Time(T0 + 400), 2, Frame::Block(block(4, true)));
        drain(&mut p);
        let mut now = Time(T0 + 400);
        let mut wants = 0;
        let mut gap_fill = None;
        for _ in 0..50 {
            now = p.poll_timeout().expect("timer").max(now + 1);
            p.handle_timeout(now);
            let (t, e) = drain(&mut p);
            wants += sent(&t).iter().filter(|(_, k)| *k == "want").count();
            if e.contains(&PeerEvent::GapFill { seq: 2 }) {
                gap_fill = Some(now);
                break;
            }
        }
        assert_eq!(wants, 0);
        let at = gap_fill.expect("gap fill");
        assert!(at.0 < p.deadline(2).0);
    }

    #[test]
    fn an_open_source_that_leaves_its_share_to_the_origin_is_reported_slow() {
        let mut p = peer();
        // Source 7 (club 2, the whole share) stays open but sends nothing;
        // club 0's blocks keep coming from 2, one every 100 ms.
        let mut club2_fills = Vec::new();
        let mut slow = Vec::new();
        let mut now = Time(T0);
        for seq in (0..=80).step_by(4) {
            let at = Time(T0 + seq * 100);
            while let Some(t) = p.poll_timeout().filter(|t| *t < at) {
                now = t.max(now + 1);
                p.handle_timeout(now);
                let e = drain(&mut p).1;
                for e in &e {
                    if let PeerEvent::GapFill { seq } = e {
                        if seq % 4 == 2 {
                            club2_fills.push(*seq);
                        }
                    }
                }
                for e in e {
                    if let PeerEvent::SlowSource { peer } = e {
                        slow.push((peer, club2_fills.len()));
                    }
                }
            }
            now = at;
            p.handle_frame(now, 2, Frame::Block(block(seq, true)));
            drain(&mut p);
        }
        let n = SLOW_SOURCE_MISSES as usize;
        assert!(club2_fills.len() >= 2 * n, "{club2_fills:?}");
        // The blocks noticed missing in its first SOURCE_SETTLE_MS (one every
        // 400 ms) may have reached it before its link opened: not counted.
        // After that it is reported after every SLOW_SOURCE_MISSES of its
        // blocks that went to the origin, and not counted as a bad peer.
        let first = slow.first().expect("reported").1;
        assert!(first > n, "the misses before it settled counted: {slow:?}");
        assert!(
            first <= n + (SOURCE_SETTLE_MS / 400) as usize + 1,
            "{slow:?}"
        );
        assert!(slow.windows(2).all(|w| w[1].1 - w[0].1 == n), "{slow:?}");
        assert!(slow.iter().all(|(peer, _)| *peer == 7));
        assert_eq!(p.stats().slow_sources, slow.len() as u64);
        assert_eq!(p.stats().blocks_rejected, 0);
    }

    #[test]
    fn a_welcome_before_the_first_block_does_not_skew_deadlines() {
        // Welcomed 2 s before the stream starts (edge 0 is a guess); blocks
        // are then cut every 30 ms from T0 + 2000.
        let mut p = Peer::new(PeerConfig::new(1, 4), signer().key());
        p.handle_welcome(Time(T0), &[0, 1], &links(), 0, 0);
        let cut = |seq: u64| {
            signer()
                .sign(
                    seq,
                    BlockFlags::empty(),
                    T0 + 2000 + seq * 30,
                    seq,
                    Bytes::from_static(b"x"),
                )
                .expect("small")
                .into_block()
        };
        // A second of real blocks gives the rate.
        for seq in 0..=34 {
            p.handle_origin_block(Time(T0 + 2100 + seq * 30), cut(seq));
        }
        let want = T0 + 2000 + 44 * 30 + p.cfg.target_latency_ms;
        let got = p.deadline(44).0;
        assert!(got.abs_diff(want) <= 15, "deadline {got}, cut-based {want}");
    }

    /// [`peer`] with an open link to 8, the source of the other half of club
    /// 2 (7 sends all of it).
    fn peer_with_second_source() -> Peer<StreamKey> {
        let mut p = peer();
        let other = link(
            8,
            LinkRole::Source {
                club: 2,
                share: 1,
                share_count: 2,
            },
        );
        p.handle_link(Time(T0), LinkOp::Add, other);
        p.handle_link_open(Time(T0), 8);
        p
    }

    #[test]
    fn a_last_hop_block_whose_source_went_is_pulled_from_another_member() {
        let mut p = peer_with_second_source();
        p.handle_frame(Time(T0 + 100), 2, Frame::Block(block(0, true)));
        // Block 2 (club 2, share 0: source 7's) does not come; 4 does.
        p.handle_frame(Time(T0 + 400), 2, Frame::Block(block(4, true)));
        drain(&mut p);
        // Source 7 goes: nobody will push block 2 any more.
        p.handle_link_closed(Time(T0 + 450), 7);
        let mut now = Time(T0 + 450);
        let mut want = None;
        for _ in 0..20 {
            now = p.poll_timeout().expect("timer").max(now + 1);
            p.handle_timeout(now);
            let (t, e) = drain(&mut p);
            assert!(!e.contains(&PeerEvent::GapFill { seq: 2 }), "pulled first");
            if sent(&t).contains(&(8, "want")) {
                want = Some(now);
                break;
            }
        }
        let at = want.expect("block 2 is pulled from the club's other source");
        assert!(
            at.0 <= T0 + 400 + 450,
            "at the pull grace, not near the deadline"
        );
    }

    #[test]
    fn missing_block_is_pulled_then_gap_filled_then_skipped() {
        let mut cfg = PeerConfig::new(1, 4);
        cfg.pull_lead_ms = 350;
        let mut p = peer_with(cfg);
        p.handle_frame(Time(T0 + 100), 2, Frame::Block(block(0, true)));
        // Block 2 (club 2) never comes; 3 and a later fragment start do.
        p.handle_frame(Time(T0 + 350), 7, Frame::Block(block(1, false)));
        p.handle_frame(Time(T0 + 400), 2, Frame::Block(block(4, true)));
        drain(&mut p);
        // (Block 3, of a club nobody serves us, is pulled first: it has no
        // source. Source 7 serves club 2.)
        let mut pull_at = Time(T0 + 400);
        for _ in 0..10 {
            pull_at = p
                .poll_timeout()
                .expect("a pull is scheduled")
                .max(pull_at + 1);
            p.handle_timeout(pull_at);
            let (t, _) = drain(&mut p);
            if sent(&t).contains(&(7, "want")) {
                break;
            }
        }
        assert!(
            pull_at.0 + 450 + 350 >= p.deadline(2).0,
            "pulled only within the lead"
        );
        p.handle_frame(pull_at + 1, 7, Frame::DontHave(2));
        // Block 2's origin moment falls within the next interval, but the
        // swarm failed nothing yet: no bid.
        assert_eq!(p.bid(pull_at + 1, 1_000), 0);
        // Nobody has it: near the deadline the origin is asked.
        let mut gap_fill = false;
        let mut now = pull_at;
        for _ in 0..50 {
            now = p.poll_timeout().expect("timer").max(now + 1);
            p.handle_timeout(now);
            let (_, e) = drain(&mut p);
            if e.iter().any(|e| *e == PeerEvent::GapFill { seq: 2 }) {
                gap_fill = true;
                break;
            }
        }
        assert!(gap_fill);
        assert!(
            now.0 < p.deadline(2).0,
            "gap fill comes before the deadline"
        );
        p.handle_gap_fill_failed(now, 2);
        // Past the deadline playback skips to the next fragment start.
        let late = p.deadline(2) + 1_000;
        p.handle_timeout(late);
        let (_, e) = drain(&mut p);
        assert!(e.contains(&PeerEvent::Skip { from: 2, to: 4 }), "{e:?}");
        assert_eq!(p.next_play(), Some(5));
        // The swarm failed block 2 (and 3, which also went to the origin):
        // the next interval's bid asks for as many blocks, the one after
        // for none.
        let one = p.avg_block_bits();
        assert_eq!(p.bid(late, 1_000), 2 * one);
        assert_eq!(p.bid(late + 1_001, 1_000), 0);
    }

    #[test]
    fn origin_block_fills_the_gap() {
        let mut p = peer();
        p.handle_frame(Time(T0), 2, Frame::Block(block(0, true)));
        drain(&mut p);
        // Gap-filled blocks of our own club are relayed like any other.
        p.handle_origin_block(Time(T0 + 1), block(4, true));
        let (t, e) = drain(&mut p);
        assert!(e.iter().any(|e| matches!(
            e,
            PeerEvent::Arrived {
                seq: 4,
                from: From::Origin,
                ..
            }
        )));
        assert_eq!(
            sent(&t),
            vec![
                (2, "have"),
                (3, "block"),
                (4, "block"),
                (5, "block"),
                (6, "block")
            ]
        );
        assert_eq!(p.stats().bytes_from_origin, 100);
        // A bad origin block counts as rejected but drops no link.
        let mut bad = block(8, false);
        bad.payload = Bytes::from_static(b"tampered");
        p.handle_origin_block(Time(T0 + 2), bad);
        assert_eq!(p.stats().blocks_rejected, 1);
        assert_eq!(p.link_peers().len(), 6);
    }

    #[test]
    fn bad_block_drops_the_sender() {
        let mut p = peer();
        let mut b = block(0, true);
        b.signature[0] ^= 1;
        p.handle_frame(Time(T0), 2, Frame::Block(b));
        let (_, e) = drain(&mut p);
        assert!(matches!(
            e.as_slice(),
            [PeerEvent::BadPeer {
                peer: 2,
                reason: PeerError::BadBlock(BlockError::Signature)
            }]
        ));
        assert!(!p.link_peers().contains(&2));
        assert_eq!(p.stats().blocks_rejected, 1);
        p.handle_message(Time(T0), 3, Bytes::from_static(b"garbage"));
        let (_, e) = drain(&mut p);
        assert!(matches!(e.as_slice(), [PeerEvent::BadPeer { peer: 3, .. }]));
    }

    /// `handle_frame` takes frames built in process too (the simulator's),
    /// which no decoder checked: those the decoder refuses change nothing.
    /// `cargo fuzz run peer_ops` found the empty range's underflow.
    #[test]
    fn frames_the_decoder_refuses_are_ignored_when_built_in_process() {
        let mut p = peer();
        let before = p.stats();
        for f in [
            Frame::HaveRange { start: 5, count: 0 },
            Frame::HaveRange {
                start: u64::MAX,
                count: 2,
            },
            Frame::Bitfield {
                start: 3,
                bits: Bytes::new(),
            },
        ] {
            assert_eq!(Frame::decode(f.encode()).ok(), None, "{f:?} is refused");
            p.handle_frame(Time(T0 + 1), 2, f);
        }
        let (t, e) = drain(&mut p);
        assert!(e.is_empty(), "{e:?}");
        assert!(t.is_empty(), "{t:?}");
        assert_eq!(p.stats(), before);
    }

    /// Runs `p`'s timers until it has asked the origin for `n` blocks (or 20
    /// timers passed) and returns the blocks asked for.
    fn gap_fills(p: &mut Peer<StreamKey>, n: usize) -> Vec<u64> {
        let mut asked = Vec::new();
        for _ in 0..20 {
            let Some(t) = p.poll_timeout() else { break };
            p.handle_timeout(t);
            let (_, e) = drain(p);
            asked.extend(e.iter().filter_map(|e| match e {
                PeerEvent::GapFill { seq } => Some(*seq),
                _ => None,
            }));
            if asked.len() >= n {
                break;
            }
        }
        asked
    }

    #[test]
    fn a_peer_with_no_links_learns_the_edge_from_the_server_and_gap_fills() {
        let mut p = Peer::new(PeerConfig::new(1, 4), signer().key());
        p.handle_welcome(Time(T0), &[0, 1], &[], 0, 0);
        p.handle_origin_block(Time(T0 + 10), block(0, true));
        drain(&mut p);
        p.handle_live_edge(Time(T0 + 300), 3);
        let asked = gap_fills(&mut p, 3);
        assert_eq!(asked, vec![1, 2, 3]);
    }

    #[test]
    fn cache_is_bounded() {
        let mut p = peer();
        for seq in 0..(MAX_CACHE_BLOCKS as u64 + 100) {
            p.handle_frame(Time(T0 + seq), 7, Frame::Block(block(seq * 4 + 2, false)));
            drain(&mut p);
        }
        assert!(p.cache.len() <= MAX_CACHE_BLOCKS);
        assert!(p.missing.len() <= MAX_MISSING);
    }

    #[test]
    fn wants_beyond_the_rate_limit_get_dont_have() {
        let mut p = peer();
        p.handle_frame(Time(T0), 2, Frame::Block(block(0, true)));
        drain(&mut p);
        for _ in 0..MAX_WANTS_PER_SEC + 10 {
            p.handle_frame(Time(T0 + 1), 3, Frame::Want(0));
        }
        let (t, _) = drain(&mut p);
        let blocks = t
            .iter()
            .filter(|t| matches!(t.frame, Frame::Block(_)))
            .count();
        assert_eq!(blocks, MAX_WANTS_PER_SEC as usize);
    }

    #[test]
    fn dont_have_moves_the_pull_to_another_holder_at_once() {
        let mut p = peer();
        p.handle_frame(Time(T0), 2, Frame::Block(block(0, true)));
        p.handle_frame(Time(T0 + 10), 2, Frame::Block(block(8, false)));
        drain(&mut p);
        // Block 4 (club 0, ours) is missing: pulled after the grace.
        let at = p.poll_timeout().expect("pull scheduled");
        p.handle_timeout(at);
        let (t, _) = drain(&mut p);
        let first: Vec<PeerId> = sent(&t)
            .iter()
            .filter(|(_, k)| *k == "want")
            .map(|(p, _)| *p)
            .collect();
        assert_eq!(first.len(), 1, "{:?}", sent(&t));
        let now = at + 5;
        p.handle_frame(now, first[0], Frame::DontHave(4));
        assert_eq!(
            p.poll_timeout(),
            Some(now),
            "the next holder is asked at once"
        );
        p.handle_timeout(now);
        let (t, _) = drain(&mut p);
        assert!(
            sent(&t).iter().any(|(q, k)| *k == "want" && *q != first[0]),
            "{:?}",
            sent(&t)
        );
    }

    #[test]
    fn the_welcome_edge_block_is_fetched_when_nobody_pushes_it() {
        let mut p = Peer::new(PeerConfig::new(1, 4), signer().key());
        p.handle_welcome(Time(T0 + 300), &[0, 1], &[], 0, 3);
        for seq in 0..3 {
            p.handle_origin_block(Time(T0 + 300 + seq), block(seq, seq == 0));
        }
        drain(&mut p);
        let asked = gap_fills(&mut p, 1);
        assert_eq!(
            asked,
            vec![3],
            "the edge block is gap-filled, not waited out"
        );
    }

    #[test]
    fn a_joiner_asks_the_origin_for_its_backlog_at_once_and_waits_for_it() {
        // Blocks 0..=20 were ingested 100 ms apart from T0; the welcome comes at
        // T0 + 3000, starting at block 0: older than the target latency (1500).
        let mut p = Peer::new(PeerConfig::new(1, 4), signer().key());
        let welcome = T0 + 3_000;
        p.handle_welcome(Time(welcome), &[0, 1], &[], 0, 20);
        let Some(t) = p.poll_timeout() else {
            panic!("a timer is armed")
        };
        assert!(
            t <= Time(welcome),
            "the backlog is due at once, not at {t:?}"
        );
        p.handle_timeout(Time(welcome));
        let (_, e) = drain(&mut p);
        let asked: Vec<u64> = e
            .iter()
            .filter_map(|e| match e {
                PeerEvent::GapFill { seq } => Some(*seq),
                _ => None,
            })
            .collect();
        assert_eq!(asked, (0..=20).collect::<Vec<_>>(), "all of it, in order");
        assert_eq!(
            p.bid(Time(welcome), 1_000),
            0,
            "the backlog is asked for at once, before any grant could come"
        );
        // Everything but block 0 arrives; a later fragment starts at 10.
        for seq in 1..=20 {
            p.handle_origin_block(Time(welcome + 100), block(seq, seq % 10 == 0));
        }
        drain(&mut p);
        // Past block 0's ingest deadline, but within the target latency of the
        // welcome: the joiner waits for its start block instead of skipping.
        p.handle_timeout(Time(welcome + 1_499));
        let (_, e) = drain(&mut p);
        assert!(
            !e.iter().any(|e| matches!(e, PeerEvent::Skip { .. })),
            "no skip yet: {e:?}"
        );
        p.handle_origin_block(Time(welcome + 1_499), block(0, true));
        let (_, e) = drain(&mut p);
        let played = e.iter().filter(|e| matches!(e, PeerEvent::Play(_))).count();
        assert_eq!(played, 21, "the whole backlog plays from the start block");
    }

    /// The due index holds exactly the missing blocks that have a due time.
    fn index_consistent(p: &Peer<StreamKey>) -> bool {
        let with_due = p.missing.iter().filter(|(_, m)| m.due.is_some()).count();
        with_due == p.due.len()
            && p.missing
                .iter()
                .all(|(s, m)| m.due.is_none_or(|t| p.due.contains(&(t, s))))
            && p.due
                .range(..)
                .all(|(t, s)| p.missing.get(*s).and_then(|m| m.due) == Some(*t))
    }

    proptest! {
        #[test]
        fn a_have_window_holds_exactly_the_seqs_of_its_last_span(
            steps in proptest::collection::vec(0u64..200, 1..300)
        ) {
            // Seqs mostly climbing, in steps of up to 200, with some older
            // ones mixed in: every gap the word-wise clear may take.
            let mut w = HaveWindow::default();
            let mut said = std::collections::BTreeSet::new();
            let mut hi = 0u64;
            for (i, step) in steps.into_iter().enumerate() {
                let seq = if i % 3 == 2 { hi.saturating_sub(step * 4) } else { hi + step };
                w.insert(seq);
                said.insert(seq);
                hi = hi.max(seq);
                let lo = hi.saturating_sub(HaveWindow::SPAN - 1);
                for q in lo.saturating_sub(70)..=hi + 70 {
                    let want = said.contains(&q) && q >= lo && q <= hi;
                    prop_assert_eq!(w.contains(q), want, "seq {} with hi {}", q, hi);
                }
            }
        }

        #[test]
        fn the_due_index_follows_every_change(
            ops in proptest::collection::vec((0u8..7, 0u64..120, 1u64..400), 0..300)
        ) {
            let mut p = peer();
            let mut now = T0;
            for (op, seq, dt) in ops {
                now += dt;
                let t = Time(now);
                match op {
                    0 => p.handle_frame(t, 2, Frame::Block(block(seq, seq % 5 == 0))),
                    1 => p.handle_frame(t, 7, Frame::Have(seq)),
                    2 => p.handle_frame(t, 7, Frame::DontHave(seq)),
                    3 => p.handle_gap_fill_failed(t, seq),
                    4 => p.handle_origin_block(t, block(seq, false)),
                    5 => p.handle_live_edge(t, seq),
                    _ => {
                        if let Some(w) = p.poll_timeout() {
                            p.handle_timeout(w.max(t));
                        }
                    }
                }
                drain(&mut p);
                prop_assert!(index_consistent(&p));
                prop_assert!(p.missing.len() <= MAX_MISSING);
            }
        }

        #[test]
        fn hostile_messages_never_panic_and_stay_bounded(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..200)
        ) {
            let mut p = peer();
            let mut now = T0;
            for m in msgs {
                now += 3;
                p.handle_message(Time(now), 4, Bytes::from(m));
                p.handle_timeout(Time(now));
            }
            let (t, e) = drain(&mut p);
            prop_assert!(t.len() <= MAX_TRANSMITS && e.len() <= MAX_EVENTS);
        }
    }
}
