//! Signaling over `GET /ws`: join, clubs and links, SDP/ICE relay, heartbeats,
//! bids and grants, reports.
//!
//! # Flow
//! 0. A client that states no upload first sends its upload probe as binary
//!    frames (`clubcast_protocol::probe`); the server times them and plans the
//!    join on the rate (`upload_probe_kbps` in the welcome).
//! 1. The client's first message is `join`; the server answers `welcome` with
//!    the stream, the clubs and links [`Membership`](clubcast_protocol::club::Membership)
//!    assigned, where to start playing, and a per-peer `grant_token`.
//! 2. Then the socket carries `signal` (relayed to a linked peer, `from` added),
//!    `link` add/remove when a peer leaves, fails (`link_failed`) or is reported
//!    (`report`), `heartbeat` → `pong`, and `bid` → `grant` once per bid interval.
//! 3. Messages for peer 0 go to the in-process seeder ([`SeederHandle`]).
//! 4. On demand, the first message is `join_vod` instead, naming an asset
//!    and the key id of the upload the viewer verified. The server seats it
//!    in that upload's room (`vod_room`), answers `vod_welcome` with up to
//!    [`VOD_NEIGHBOURS`] neighbours to offer to, tells them `neighbour add`,
//!    and relays `signal` between neighbours only. A leave, a `link_failed`
//!    or a `report` parts neighbours (`neighbour remove`) and tops up those
//!    left with fewer than [`VOD_NEEDY`]. `heartbeat` → `pong` (live edge 0);
//!    `slow_source` is refused (`bad_message`, an offence). The server never
//!    joins a room: the origin's `/vod/{name}/blocks` is the backstop, metered
//!    by a ledger of its own (`--vod-budget-kbps`): the welcome carries a
//!    `grant_token` and the `bid_interval_ms`, and `bid` → `grant` as live.
//!    Unmetered (`--vod-budget-kbps 0`), the welcome has neither and a `bid`
//!    is refused (`bad_message`, an offence). Whichever way a viewer leaves
//!    (its socket closes, it is dropped as slow or reported), its token is
//!    forgotten.
//! 5. Every bid interval ([`Hub::spawn_bid_ticker`]) ends on both ledgers at
//!    once: each live bidder's grant goes through its swarm, each on-demand
//!    bidder's through its room.
//!
//! # Limits
//! | what | bound | at the bound |
//! |---|---|---|
//! | message size | [`MAX_SIGNAL_MESSAGE`] | `too_large` (offence); over [`MAX_TRANSPORT_MESSAGE`] the socket closes |
//! | binary frames | before the join, the upload probe, up to `MAX_PROBE_BYTES` (exempt from the message rate); none after it | `too_large` / `bad_message` (offence) |
//! | message rate | [`RATE_PER_SEC`]/s, burst [`RATE_BURST`] | `rate_limited` (offence), message dropped |
//! | offences | [`MAX_OFFENCES`] per connection or [`MAX_OFFENCES_IN_A_ROW`] in a row | close 1008 |
//! | outbound queue | [`OUTBOUND_QUEUE`] messages | peer dropped (`clubcast_dropped_peers_total{reason="slow"}`) |
//! | one socket write | [`SEND_TIMEOUT`] | close |
//! | close handshake | [`CLOSE_LINGER`] for the client's close reply | socket dropped |
//! | silence | 3 × heartbeat interval | close 1001, peer dropped (`silent`) |
//! | time to join | [`JOIN_TIMEOUT`] | close 1008 |
//! | peers per stream | `--max-peers-per-stream` | `stream_full`, close |
//! | viewers per on-demand room | `--max-peers-per-stream` | `stream_full`, close |
//! | on-demand rooms | 2 × (`--vod-max-assets` + 1): each asset's upload, and replaced ones still watched | `stream_full`, close |
//! | neighbours of an on-demand viewer | [`VOD_MAX_DEGREE`] | not picked for others |
//! | failed on-demand pairs kept apart | [`FAILED_PAIR_MS`], [`MAX_FAILED_PAIRS`] per room | the expired, else the oldest, forgotten |
//! | reports | [`REPORTS_TO_KICK`] distinct linked reporters (neighbours, on demand) | the accused is dropped (`reported`) |
//!
//! Offences are protocol violations a correct client never commits: malformed
//! JSON, unknown types, bad versions, oversized messages, binary messages
//! after the join or past the probe's bytes, messages
//! before join or a second join, and rate excess. `unknown_peer` is not an
//! offence: a signal can race a link removal. A refused join (`unknown_stream`,
//! `stream_full`, `stream_ended`, and on demand `unknown_asset` for an unknown
//! or bad name or a key that is not the asset's) is answered and the socket closed. When a
//! stream ends (its publisher stayed away, [`crate::stream::Stream::end_if_away`]),
//! each of its peers gets `stream_ended` and a normal close.

mod conn;
pub(crate) mod limits;
mod outbox;
mod seeder;
mod swarm;
mod vod_room;
mod vod_session;

pub use seeder::{SeederEvent, SeederHandle, SEEDER_QUEUE};
pub use vod_room::{FAILED_PAIR_MS, MAX_FAILED_PAIRS, VOD_MAX_DEGREE, VOD_NEEDY, VOD_NEIGHBOURS};

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ws::WebSocketUpgrade;
use axum::extract::State;
use axum::response::Response;
use clubcast_protocol::club::{capacity_pct, Joined};
use clubcast_protocol::probe::Measured;
use clubcast_protocol::signal::{
    IceServer, Link, PeerId, ServerMsg, SignalData, StreamInfo, MAX_SIGNAL_MESSAGE, SEEDER_PEER_ID,
    SIGNAL_VERSION,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::AppState;
use crate::config::Config;
use crate::grants::Grants;
use crate::metrics::Metrics;
use crate::stream::{Stream, Streams};
use crate::vod::VodLibrary;
use swarm::{CloseCell, Effects, JoinUpload, Swarm};
use vod_room::VodRoom;
pub(crate) use vod_session::VodSession;

/// Largest WebSocket message the transport reads at all; between
/// [`MAX_SIGNAL_MESSAGE`] and this the client gets `too_large` and stays up.
pub const MAX_TRANSPORT_MESSAGE: usize = 4 * MAX_SIGNAL_MESSAGE;
/// Initial read buffer of one connection, and the most one socket read takes.
/// The WebSocket codec zero-fills the buffer on every socket read, so all of
/// it stays resident for every connection (the transport's 128 KiB default
/// cost about 140 KB per peer at 10k peers, 4 KiB was 28 % of the 14.5 KiB a
/// connection cost in `just bench-server`). An ICE candidate is about 250
/// bytes and a heartbeat 30, so a few messages fit one read; a larger message
/// (an SDP, up to [`MAX_TRANSPORT_MESSAGE`]) grows the buffer as it arrives,
/// and that connection keeps the larger buffer.
pub const READ_BUFFER: usize = 1024;
/// Messages a connection may send per second on average.
pub const RATE_PER_SEC: u32 = 50;
/// Messages a connection may send in a burst.
pub const RATE_BURST: u32 = 100;
/// Offences that close a connection over its life.
pub const MAX_OFFENCES: u32 = 5;
/// Offences in a row (no good message between) that close a connection.
pub const MAX_OFFENCES_IN_A_ROW: u32 = 3;
/// Messages queued for one peer before it counts as too slow and is dropped.
pub const OUTBOUND_QUEUE: usize = 256;
/// Longest one socket write may take before the connection is closed.
pub const SEND_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest the server waits for the client's close reply after its own close
/// frame, reading and dropping what the client still sends.
pub const CLOSE_LINGER: Duration = Duration::from_secs(1);
/// Time a new connection has to send `join`.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeat intervals of silence after which a peer is dropped.
pub const SILENT_HEARTBEATS: u32 = 3;
/// Distinct linked peers whose bad-block reports get a peer dropped.
pub const REPORTS_TO_KICK: usize = 2;

/// Errors of signaling operations, each mapped to a wire [`ErrorCode`](clubcast_protocol::signal::ErrorCode).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignalError {
    /// No stream has this id or name.
    #[error("no stream {0:?}")]
    UnknownStream(String),
    /// The stream's swarm is at its peer limit.
    #[error("the stream has its maximum of {0} peers")]
    StreamFull(usize),
    /// The peer is not in the swarm, or not linked with the sender.
    #[error("peer {0} is not linked with you")]
    UnknownPeer(PeerId),
    /// The stream ended (its publisher stayed away too long).
    #[error("the stream ended: its publisher stayed away")]
    StreamEnded,
    /// No on-demand asset has this name (first) with this key (second):
    /// the name is unknown or bad, or the asset was replaced.
    #[error("no on-demand asset {0:?} with key {1:?}")]
    UnknownAsset(String, String),
    /// As many on-demand rooms are open as the server holds.
    #[error("the server has its maximum of {0} on-demand rooms")]
    TooManyRooms(usize),
}

/// Why the server closed a peer's connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DropReason {
    /// Its outbound queue was full.
    Slow,
    /// It sent nothing for [`SILENT_HEARTBEATS`] heartbeat intervals.
    Silent,
    /// Distinct linked peers reported bad blocks from it.
    Reported,
    /// It committed too many protocol offences.
    Offences,
    /// Its stream ended.
    StreamEnded,
}

impl DropReason {
    /// Stable label for metrics and close frames.
    pub fn as_str(&self) -> &'static str {
        match self {
            DropReason::Slow => "slow",
            DropReason::Silent => "silent",
            DropReason::Reported => "reported",
            DropReason::Offences => "offences",
            DropReason::StreamEnded => "stream_ended",
        }
    }
}

struct HubInner {
    config: Arc<Config>,
    streams: Arc<Streams>,
    metrics: Arc<Metrics>,
    grants: Arc<Grants>,
    /// The on-demand ledger; `None` when on-demand runs are not metered.
    vod_grants: Option<Arc<Grants>>,
    ice_servers: Vec<IceServer>,
    /// Each stream's swarm, by stream id.
    swarms: Mutex<HashMap<String, SwarmEntry>>,
    peers: Mutex<HashMap<PeerId, Arc<Mutex<Swarm>>>>,
    /// The on-demand assets, whose current keys `join_vod` checks.
    vod: Arc<VodLibrary>,
    /// Each on-demand room, by key id.
    vod_rooms: Mutex<HashMap<String, Arc<Mutex<VodRoom>>>>,
    /// Each on-demand viewer's room, for its grants: as many entries as
    /// viewers (kept by `join_vod` and the leaves). Taken alone, never with
    /// a room or the rooms map held.
    vod_viewers: Mutex<HashMap<PeerId, Arc<Mutex<VodRoom>>>>,
    next_peer: AtomicU64,
    seeder: Mutex<Option<mpsc::Sender<SeederEvent>>>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// A swarm with the stream it was made for: a stream that ended and was
/// made again has the same id, and gets a swarm of its own.
struct SwarmEntry {
    stream: Arc<Stream>,
    swarm: Arc<Mutex<Swarm>>,
}

/// The signaling hub: every stream's swarm and the routes between peers.
/// Cheap to clone.
#[derive(Clone)]
pub struct Hub(Arc<HubInner>);

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// A joined peer, as its connection task holds it.
pub(crate) struct Session {
    pub(crate) peer: PeerId,
    /// The stream, readable without the swarm lock (heartbeats ask its live edge).
    pub(crate) stream: Arc<crate::stream::Stream>,
    pub(crate) swarm: Arc<Mutex<Swarm>>,
    pub(crate) rx: outbox::Receiver,
    pub(crate) close: CloseCell,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // No code panics while holding these locks with a half-done mutation;
    // a poisoned lock still guards consistent state.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a joiner's upload probe gives its plan: the measured upload to plan
/// on, if it is below the cap (a reading at or above it, or too fast to
/// time, leaves the plan at the cap), and the probe's result for
/// `clubcast_upload_probes_total` (`planned`, `at_cap`, `limited`: the
/// sender ran dry, so the rate is a lower bound, `nothing`: too little came
/// to time, `unused`: the peer stated its upload or relays nothing, or the
/// stream's bitrate is not known yet). `None` without a probe.
fn probe_outcome(
    probe: Option<Measured>,
    wanted: bool,
    stream: &crate::stream::Stream,
    cfg: &Config,
) -> (Option<u32>, Option<&'static str>) {
    let Some(measured) = probe else {
        return (None, None);
    };
    let bitrate = stream.bitrate_kbps();
    let result = match measured {
        _ if !wanted => "unused",
        Measured::Nothing => "nothing",
        Measured::Fast => "at_cap",
        Measured::Limited => "limited",
        // A rate is no share of a bitrate not known yet.
        Measured::Kbps(_) if bitrate == 0 => "unused",
        Measured::Kbps(kbps) => {
            let pct = capacity_pct(Some(kbps), bitrate);
            if pct >= cfg.club_config().max_capacity_pct {
                "at_cap"
            } else {
                return (Some(kbps), Some("planned"));
            }
        }
    };
    (None, Some(result))
}

/// Units (blocks) of a joiner's startup grant: its backlog (start block to
/// live edge), plus two bid intervals of the stream, the time until the grant
/// of its own first bid is spendable. A stream too new to know its bitrate
/// counts its backlog as one interval's worth.
fn startup_units(backlog: u64, bitrate_kbps: u32, interval_ms: u32, unit_bits: u64) -> u64 {
    let per_interval = match bitrate_kbps {
        0 => backlog,
        k => (u64::from(k) * u64::from(interval_ms)).div_ceil(unit_bits.max(1)),
    };
    backlog.saturating_add(per_interval.saturating_mul(2))
}

/// Unix time, ms.
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Hub {
    /// A hub with no swarms or rooms, seating on-demand viewers of the
    /// assets in `vod`, whose bids go to `vod_grants` (`None`: on-demand runs
    /// are not metered). Connections close when `shutdown` is cancelled.
    /// `config` must have passed [`Config::validate`]; bad ICE entries are skipped.
    pub fn new(
        config: Arc<Config>,
        streams: Arc<Streams>,
        metrics: Arc<Metrics>,
        grants: Arc<Grants>,
        vod_grants: Option<Arc<Grants>>,
        vod: Arc<VodLibrary>,
        shutdown: CancellationToken,
    ) -> Self {
        let ice_servers = config.ice_servers().unwrap_or_default();
        Hub(Arc::new(HubInner {
            config,
            streams,
            metrics,
            grants,
            vod_grants,
            ice_servers,
            swarms: Mutex::new(HashMap::new()),
            peers: Mutex::new(HashMap::new()),
            vod,
            vod_rooms: Mutex::new(HashMap::new()),
            vod_viewers: Mutex::new(HashMap::new()),
            next_peer: AtomicU64::new(SEEDER_PEER_ID + 1),
            seeder: Mutex::new(None),
            shutdown,
            tasks: TaskTracker::new(),
        }))
    }

    /// Attaches the seeder, replacing any earlier one.
    pub fn attach_seeder(&self) -> SeederHandle {
        let (tx, rx) = mpsc::channel(SEEDER_QUEUE);
        *lock(&self.0.seeder) = Some(tx);
        SeederHandle {
            hub: self.clone(),
            rx,
        }
    }

    /// Peers connected to the stream `id_or_name`.
    pub fn peers(&self, id_or_name: &str) -> usize {
        self.swarm_of(id_or_name).map_or(0, |s| lock(&s).len())
    }

    /// Ends the current bid interval of both ledgers: allocates each budget
    /// over its bids and sends every bidder its grant, a live peer through
    /// its swarm and an on-demand viewer through its room.
    pub fn run_bid_interval(&self, now: Instant) {
        self.run_live_interval(now);
        self.run_vod_interval(now);
    }

    fn run_live_interval(&self, now: Instant) {
        let grants = self.0.grants.handle_interval(now);
        let interval_ms = self.0.config.bid_interval_ms;
        for g in grants {
            self.0.metrics.grant(g.bits);
            let Some(swarm) = lock(&self.0.peers).get(&g.peer).cloned() else {
                continue;
            };
            let mut fx = Effects::default();
            let msg = ServerMsg::Grant {
                v: SIGNAL_VERSION,
                bits: g.bits,
                interval_ms,
            };
            lock(&swarm).send(g.peer, &msg, &mut fx);
            self.apply(fx);
        }
    }

    /// Runs [`Hub::run_bid_interval`] every bid interval until shutdown.
    pub fn spawn_bid_ticker(&self) -> tokio::task::JoinHandle<()> {
        let hub = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(hub.0.config.bid_interval());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = hub.0.shutdown.cancelled() => break,
                    _ = tick.tick() => hub.run_bid_interval(Instant::now()),
                }
            }
        })
    }

    /// Waits up to `grace` for connection tasks to send their close frames
    /// after shutdown was cancelled.
    pub async fn wait_closed(&self, grace: Duration) {
        self.0.tasks.close();
        if tokio::time::timeout(grace, self.0.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = self.0.tasks.len(),
                "signaling connections still open at shutdown"
            );
        }
    }

    fn swarm_of(&self, id_or_name: &str) -> Option<Arc<Mutex<Swarm>>> {
        let stream = self.0.streams.get(id_or_name)?;
        lock(&self.0.swarms)
            .get(&stream.id)
            .filter(|e| Arc::ptr_eq(&e.stream, &stream))
            .map(|e| e.swarm.clone())
    }

    /// The swarm of `stream`, made (with its watch) if it has none: the
    /// entry under its id may be that of an earlier stream of the same
    /// name that ended.
    fn swarm_for(&self, stream: &Arc<Stream>) -> Arc<Mutex<Swarm>> {
        let mut swarms = lock(&self.0.swarms);
        if let Some(e) = swarms.get(&stream.id) {
            if Arc::ptr_eq(&e.stream, stream) {
                return e.swarm.clone();
            }
        }
        let swarm = Arc::new(Mutex::new(Swarm::new(
            stream.clone(),
            self.0.config.club_config(),
            self.0.config.max_peers_per_stream,
        )));
        self.spawn_stream_watch(stream, &swarm);
        let entry = SwarmEntry {
            stream: stream.clone(),
            swarm: swarm.clone(),
        };
        swarms.insert(stream.id.clone(), entry);
        swarm
    }

    /// Adds a peer to a stream's swarm, planned on the upload it stated if
    /// any, else on what its upload probe measured (`probe`), and queues its
    /// welcome.
    pub(crate) fn join(
        &self,
        stream_ref: &str,
        p2p: bool,
        upload_kbps: Option<u32>,
        probe: Option<Measured>,
        test_corrupt: bool,
    ) -> Result<Session, SignalError> {
        // Honoured only by a `test-hooks` build started with
        // --allow-test-corruption (Config::validate refuses it elsewhere).
        let test_corrupt = test_corrupt && self.0.config.allow_test_corruption;
        let stream = self
            .0
            .streams
            .get(stream_ref)
            .ok_or_else(|| SignalError::UnknownStream(stream_ref.chars().take(80).collect()))?;
        let swarm = self.swarm_for(&stream);
        let (probed_kbps, probe_result) =
            probe_outcome(probe, p2p && upload_kbps.is_none(), &stream, &self.0.config);
        if let Some(result) = probe_result {
            self.0.metrics.upload_probe(result);
        }
        let peer = self.0.next_peer.fetch_add(1, Ordering::Relaxed);
        let token = self.0.grants.register(peer);
        let (tx, rx) = outbox::outbox(OUTBOUND_QUEUE);
        let close = CloseCell::default();
        let joined = {
            let mut s = lock(&swarm);
            let upload = JoinUpload {
                stated_kbps: upload_kbps,
                probed_kbps,
            };
            let r = s.join(peer, p2p, upload, tx, close.clone(), |j| {
                self.welcome(peer, &stream, j, token, probed_kbps, test_corrupt)
            });
            r.map(|fx| (fx, s.len()))
        };
        let (fx, len) = match joined {
            Ok(v) => v,
            Err(e) => {
                self.0.grants.unregister(peer);
                return Err(e);
            }
        };
        lock(&self.0.peers).insert(peer, swarm.clone());
        self.0.metrics.join();
        self.0.metrics.set_peers(&stream.name, len);
        tracing::debug!(peer, stream = %stream.name, p2p, ?upload_kbps, "peer joined");
        self.apply(fx);
        Ok(Session {
            peer,
            stream,
            swarm,
            rx,
            close,
        })
    }

    /// Tells every peer of `swarm` when a publisher connects to its stream
    /// or leaves ([`ServerMsg::Publisher`]), until shutdown. A joiner's
    /// welcome says how it stood at the join, read under the swarm lock this
    /// task sends under; a change between that read and this task's send
    /// reaches the joiner after its welcome, through its queue. When the
    /// stream ends, ends the swarm ([`Hub::end_swarm`]).
    fn spawn_stream_watch(&self, stream: &Arc<Stream>, swarm: &Arc<Mutex<Swarm>>) {
        let mut rx = stream.watch_publishing();
        rx.mark_unchanged();
        let ended = stream.ended().clone();
        let swarm = Arc::downgrade(swarm);
        let hub = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = hub.0.shutdown.cancelled() => break,
                    () = ended.cancelled() => {
                        if let Some(swarm) = swarm.upgrade() {
                            hub.end_swarm(&swarm);
                        }
                        break;
                    }
                    r = rx.changed() => if r.is_err() { break },
                }
                let Some(swarm) = swarm.upgrade() else { break };
                let mut fx = Effects::default();
                let (connected, peers) = {
                    let mut s = lock(&swarm);
                    let connected = *rx.borrow_and_update();
                    let msg = ServerMsg::Publisher {
                        v: SIGNAL_VERSION,
                        connected,
                    };
                    s.broadcast(&msg, &mut fx);
                    (connected, s.len())
                };
                tracing::debug!(connected, peers, "publisher change sent to the swarm");
                hub.apply(fx);
            }
        });
    }

    /// The stream of `swarm` ended: every peer is told (`stream_ended`)
    /// and closed, the seeder loses its links, and the swarm is forgotten.
    fn end_swarm(&self, swarm: &Arc<Mutex<Swarm>>) {
        let (fx, stream) = {
            let mut s = lock(swarm);
            let fx = s.end();
            (fx, s.stream.clone())
        };
        let peers = fx.dropped.len();
        self.apply(fx);
        let mut swarms = lock(&self.0.swarms);
        if swarms
            .get(&stream.id)
            .is_some_and(|e| Arc::ptr_eq(&e.swarm, swarm))
        {
            swarms.remove(&stream.id);
        }
        tracing::info!(stream = %stream.name, peers, "stream ended; its viewers were told");
    }

    fn welcome(
        &self,
        peer: PeerId,
        stream: &crate::stream::Stream,
        joined: &Joined,
        grant_token: String,
        upload_probe_kbps: Option<u32>,
        test_corrupt: bool,
    ) -> String {
        let cfg = &self.0.config;
        // Nothing stored yet: playback starts at the next block (a stream
        // resumed after a restart goes on from its saved number).
        let live_edge = stream.edge_seq();
        let start_seq = stream
            .start_seq(cfg.target_latency_ms.into())
            .unwrap_or_else(|| stream.next_seq());
        // HTTP first: the joiner may fetch its start block to the live edge
        // from the origin at once, before its links are up, and what its
        // links miss until the grant of its own first bid comes.
        if stream.live_edge().is_some() {
            let units = startup_units(
                live_edge.saturating_sub(start_seq) + 1,
                stream.bitrate_kbps(),
                cfg.bid_interval_ms,
                cfg.block_unit_bits(),
            );
            self.0.grants.grant_startup(peer, units);
        }
        let msg = ServerMsg::Welcome {
            v: SIGNAL_VERSION,
            peer_id: peer,
            stream: StreamInfo {
                id: stream.id.clone(),
                name: stream.name.clone(),
                init_url: format!("/streams/{}/init", stream.id),
                blocks_url: format!("/streams/{}/blocks/", stream.id),
                clubs: cfg.club_config().clubs,
                bitrate_kbps: stream.bitrate_kbps(),
            },
            clubs: joined.clubs.clone(),
            links: joined.links.clone(),
            live_edge,
            start_seq,
            first_seq: Some(stream.first_available()),
            server_time_ms: unix_ms(),
            target_latency_ms: cfg.target_latency_ms,
            heartbeat_ms: cfg.heartbeat_ms,
            ice_servers: self.0.ice_servers.clone(),
            grant_token,
            bid_interval_ms: cfg.bid_interval_ms,
            upload_probe_kbps,
            publisher_connected: stream.publishing(),
            test_corrupt,
        };
        serde_json::to_string(&msg).expect("ServerMsg is plain structs and strings")
    }

    /// A peer's connection ended.
    pub(crate) fn leave(&self, session: &Session) {
        let (fx, name, len) = {
            let mut s = lock(&session.swarm);
            let fx = s.leave(session.peer);
            (fx, s.stream.name.clone(), s.len())
        };
        self.forget(session.peer);
        self.0.metrics.set_peers(&name, len);
        self.apply(fx);
    }

    fn forget(&self, peer: PeerId) {
        lock(&self.0.peers).remove(&peer);
        self.0.grants.unregister(peer);
    }

    /// Applies what a swarm operation left for outside its lock.
    fn apply(&self, fx: Effects) {
        for (peer, reason) in fx.dropped {
            tracing::info!(peer, reason = reason.as_str(), "peer dropped");
            self.0.metrics.drop_peer(reason.as_str());
            self.forget(peer);
        }
        if let Some((name, len)) = fx.size {
            self.0.metrics.set_peers(&name, len);
        }
        if fx.seeder.is_empty() {
            return;
        }
        let tx = lock(&self.0.seeder).clone();
        let Some(tx) = tx.filter(|tx| !tx.is_closed()) else {
            return;
        };
        for ev in fx.seeder {
            if tx.try_send(ev).is_err() {
                self.0.metrics.reject("seeder_queue_full");
                tracing::warn!("seeder event queue full or closed; event dropped");
            }
        }
    }

    fn seeder_attached(&self) -> bool {
        lock(&self.0.seeder)
            .as_ref()
            .is_some_and(|tx| !tx.is_closed())
    }

    /// Relays SDP/ICE from `session`'s peer to `to`.
    pub(crate) fn relay(
        &self,
        session: &Session,
        to: PeerId,
        data: SignalData,
    ) -> Result<(), SignalError> {
        if to == SEEDER_PEER_ID && !self.seeder_attached() {
            return Err(SignalError::UnknownPeer(to));
        }
        let mut fx = Effects::default();
        let r = lock(&session.swarm).relay(session.peer, to, data, &mut fx);
        self.apply(fx);
        r
    }

    /// `session`'s link to `remote` failed.
    pub(crate) fn link_failed(&self, session: &Session, remote: PeerId) {
        let fx = lock(&session.swarm).link_failed(session.peer, remote, Instant::now());
        self.apply(fx);
    }

    /// `session`'s bids say its upload stays behind (see
    /// [`Swarm::note_overloaded`]).
    pub(crate) fn note_overloaded(&self, session: &Session) {
        lock(&session.swarm).note_overloaded(session.peer, Instant::now());
    }

    /// `session`'s peer sent `up_bytes` since its previous bid and sent `late`
    /// pushes late; one that stays over its plan sheds a last-hop share, and
    /// one that stated no upload and falls behind is planned on what it sent
    /// (see [`Swarm::note_upload`]).
    pub(crate) fn note_upload(&self, session: &Session, up_bytes: u64, late: u64) {
        let interval_ms = u64::from(self.0.config.bid_interval_ms);
        let (done, fx) = lock(&session.swarm).note_upload(
            session.peer,
            up_bytes,
            late,
            interval_ms,
            Instant::now(),
        );
        if done.shed {
            self.0.metrics.share_shed();
            tracing::debug!(peer = session.peer, "last-hop share shed: upload over plan");
        }
        if done.learned {
            self.0.metrics.capacity_learned();
            tracing::debug!(peer = session.peer, "capacity learned from a late bid");
        }
        self.apply(fx);
    }

    /// `session`'s peer says its last-hop source `source` is too slow; an
    /// overloaded one is replaced (see [`Swarm::slow_source`]).
    pub(crate) fn slow_source(&self, session: &Session, source: PeerId) {
        let (replaced, fx) = lock(&session.swarm).slow_source(session.peer, source, Instant::now());
        if replaced {
            self.0.metrics.source_replaced();
            tracing::debug!(
                reporter = session.peer,
                source,
                "overloaded source replaced"
            );
        }
        self.apply(fx);
    }

    /// `session`'s peer reports a bad block from `accused`.
    pub(crate) fn report(&self, session: &Session, accused: PeerId, reason: &str) {
        self.0.metrics.report();
        let (kicked, fx, name, len) = {
            let mut s = lock(&session.swarm);
            let (kicked, fx) = s.report(session.peer, accused, Instant::now());
            (kicked, fx, s.stream.name.clone(), s.len())
        };
        tracing::warn!(
            reporter = session.peer,
            accused,
            kicked,
            reason = %reason.chars().take(200).collect::<String>(),
            "bad block reported"
        );
        self.0.metrics.set_peers(&name, len);
        self.apply(fx);
    }

    fn seeder_signal(&self, stream: &str, to: PeerId, data: SignalData) -> Result<(), SignalError> {
        let swarm = self
            .swarm_of(stream)
            .ok_or_else(|| SignalError::UnknownStream(stream.to_owned()))?;
        let mut fx = Effects::default();
        let r = lock(&swarm).relay(SEEDER_PEER_ID, to, data, &mut fx);
        self.apply(fx);
        r
    }

    fn seeder_link_failed(&self, stream: &str, peer: PeerId) -> Result<(), SignalError> {
        let swarm = self
            .swarm_of(stream)
            .ok_or_else(|| SignalError::UnknownStream(stream.to_owned()))?;
        let fx = lock(&swarm).link_failed(SEEDER_PEER_ID, peer, Instant::now());
        self.apply(fx);
        Ok(())
    }

    fn seeder_links(&self, stream: &str) -> Vec<Link> {
        self.swarm_of(stream)
            .map(|s| lock(&s).seeder_links())
            .unwrap_or_default()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.0.config
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    pub(crate) fn grants(&self) -> &Grants {
        &self.0.grants
    }

    pub(crate) fn shutdown(&self) -> &CancellationToken {
        &self.0.shutdown
    }
}

/// `GET /ws`: upgrades to a WebSocket and runs the signaling session.
pub async fn ws_handler(State(state): State<AppState>, ws: WebSocketUpgrade) -> Response {
    let hub = state.hub.clone();
    let tasks = hub.0.tasks.clone();
    ws.max_message_size(MAX_TRANSPORT_MESSAGE)
        .max_frame_size(MAX_TRANSPORT_MESSAGE)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| tasks.track_future(conn::run(hub, socket)))
}

#[cfg(test)]
mod tests {
    use super::startup_units;

    #[test]
    fn startup_units_cover_the_backlog_and_two_intervals() {
        // 2 Mbit/s over 1 s intervals in 128,000-bit (16 KB) units: 16 a second.
        assert_eq!(startup_units(30, 2_000, 1_000, 128_000), 30 + 2 * 16);
        // Bitrate unknown yet: the backlog stands in for an interval.
        assert_eq!(startup_units(6, 0, 1_000, 128_000), 18);
        assert_eq!(startup_units(u64::MAX, 1, 1, 0), u64::MAX);
    }
}
