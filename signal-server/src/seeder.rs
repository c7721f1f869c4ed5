//! The seeder: peer 0 of every stream's swarm, pushing each new block to the club seeds that
//! [`Source`] picks, over WebRTC data channels.
//!
//! # Data flow
//!
//! ```text
//! Hub ──SeederEvent──▶ ┌──────────── one task ────────────┐ ──try_send(Frame::Block)──▶ seeds
//! Stream::subscribe ─▶ │ per stream: Source + peer roles  │ ──signal(answer, ICE)────▶ Hub
//!   (one forwarder     │ per peer:   Conn (offer → open)  │ ──link_failed────────────▶ Hub
//!    task per stream)  └──────────────────────────────────┘
//!                        ▲ LinkEvents of every link, accept() results
//! ```
//!
//! Peers always offer; the seeder answers through [`Transport::accept`], trickles its
//! candidates back with [`SeederHandle::signal`] and adds the peer's. One connection per peer
//! carries all of the seeder's roles towards it (`Upload` to a seed, `Subscriber` for the last
//! hop of an empty club); it is closed when the role set becomes empty. A connection that
//! fails, or a seed [`Source`] reports as slow, is handed back with
//! [`SeederHandle::link_failed`] so the server replaces it.
//!
//! # Bounds
//!
//! | what | bound | at the bound |
//! |---|---|---|
//! | connections | [`SeederConfig::max_connections`] ([`MAX_CONNECTIONS`]) | offer refused (`clubcast_rejects_total{code="seeder_full"}`), `link_failed` |
//! | handshakes in progress | [`SeederConfig::max_pending_handshakes`] ([`MAX_PENDING_HANDSHAKES`]) | the offer waits in a queue |
//! | offers waiting | [`SeederConfig::max_queued_offers`] ([`MAX_QUEUED_OFFERS`]), each for [`SeederConfig::queued_offer_ttl`] | refused (`seeder_busy`), `link_failed` |
//! | bytes queued on one link | [`SEED_MAX_BUFFERED`] for pushes, [`crate::rtc::MAX_BUFFERED_BYTES`] in the link | the seed is skipped; after [`clubcast_protocol::source::SLOW_STRIKES`] skips it is replaced (`seeder_slow_seed`); a refused send counts `seeder_send_full` |
//! | blocks between a stream and the seeder | [`BLOCK_QUEUE`], then the stream's broadcast | the seeder skips ahead (`seeder_lagged`) |
//! | WANTs answered per link | [`SeederConfig::wants_per_sec`] ([`WANTS_PER_SEC`]) | DONT_HAVE |
//! | remote candidates per link | [`crate::rtc::MAX_REMOTE_CANDIDATES`] | dropped |
//!
//! A slow peer therefore costs at most one link's send buffer; it never makes the seeder's
//! memory grow.
//!
//! # Measured
//!
//! `examples/seeder_bench.rs`, figures and commands in `bench/results/seeder.md` (2-core VM,
//! release, webrtc 0.21.1; no test asserts them): 50 data-channel seeds of a 2 Mbit/s stream
//! cost the server 3.6 % of one core and 63 MiB RSS (baseline without peers 0.4 %, 22 MiB).
//! Through a path that drops 2 % of packets each way, SCTP falls behind within seconds; the
//! seed is then replaced as slow and reconnects, so stalls stay under ~3 s but the peer gets
//! only about half the blocks (a quarter at 5 %).

mod conn;
mod frames;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clubcast_protocol::signal::{
    same_attempt, Link as RoleLink, LinkOp, LinkRole, PeerId, SignalData,
};
use clubcast_protocol::source::{Source, SourceEvent, SEED_MAX_BUFFERED};
use clubcast_protocol::wire::Frame;
use futures_util::stream::{self, BoxStream, SelectAll, StreamExt};
use tokio::sync::{broadcast, mpsc};
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::SeederRtc;
use crate::metrics::Metrics;
use crate::rtc::{
    Handshake, IceCandidate, IceServer, Link, LinkEvent, LinkEvents, RtcConfig, RtcError, SdpKind,
    SendError, SessionDescription, Str0m, Transport, WebrtcRs,
};
use crate::signal::{Hub, SeederEvent, SeederHandle, SignalError};
use crate::store::StoredBlock;
use crate::stream::{Stream, Streams};
use conn::{Conn, State};
use frames::{Dialogue, Reply};

/// Default for [`SeederConfig::max_connections`]: data channels the seeder keeps over all
/// streams. It holds about `clubs × (k + 1)` seeds plus the last hop of empty clubs per stream.
pub const MAX_CONNECTIONS: usize = 2048;
/// Default for [`SeederConfig::max_pending_handshakes`].
pub const MAX_PENDING_HANDSHAKES: usize = 64;
/// Default for [`SeederConfig::max_queued_offers`].
pub const MAX_QUEUED_OFFERS: usize = 512;
/// Default for [`SeederConfig::queued_offer_ttl`].
pub const QUEUED_OFFER_TTL: Duration = Duration::from_secs(10);
/// Default for [`SeederConfig::wants_per_sec`].
pub const WANTS_PER_SEC: u32 = 8;
/// New blocks queued from the per-stream forwarders to the seeder task.
pub const BLOCK_QUEUE: usize = 256;
/// How often the seeder expires queued offers and checks for lost hub events.
const TICK: Duration = Duration::from_secs(1);
/// Longest wait for links to close at shutdown.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Bounds of the seeder; [`SeederConfig::default`] uses the `MAX_*` constants.
#[derive(Debug, Clone)]
pub struct SeederConfig {
    /// Most connections over all streams, pending ones included.
    pub max_connections: usize,
    /// Most connections between offer and open at once.
    pub max_pending_handshakes: usize,
    /// Most offers waiting for a handshake slot.
    pub max_queued_offers: usize,
    /// How long an offer may wait for a slot before it is refused.
    pub queued_offer_ttl: Duration,
    /// WANTs answered from the store per link per second (and burst).
    pub wants_per_sec: u32,
}

impl Default for SeederConfig {
    fn default() -> Self {
        SeederConfig {
            max_connections: MAX_CONNECTIONS,
            max_pending_handshakes: MAX_PENDING_HANDSHAKES,
            max_queued_offers: MAX_QUEUED_OFFERS,
            queued_offer_ttl: QUEUED_OFFER_TTL,
            wants_per_sec: WANTS_PER_SEC,
        }
    }
}

/// Why the seeder refused or dropped a connection.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SeederError {
    /// The seeder holds [`SeederConfig::max_connections`] connections.
    #[error("seeder at its maximum of {0} connections")]
    Full(usize),
    /// Handshake slots and the offer queue are all taken, or the offer waited too long.
    #[error("seeder busy: no handshake slot for the offer")]
    Busy,
    /// The WebRTC stack refused the offer or a candidate.
    #[error(transparent)]
    Rtc(#[from] RtcError),
    /// Signaling refused our answer or candidate (the peer left or the link was removed).
    #[error(transparent)]
    Signal(#[from] SignalError),
    /// The peer sent a frame that does not decode.
    #[error("bad frame from peer: {0}")]
    BadFrame(#[from] clubcast_protocol::wire::WireError),
}

/// The [`RtcConfig`] the seeder's links should use for the server's `--ice-server` list.
pub fn rtc_config(config: &crate::config::Config) -> RtcConfig {
    let ice_servers = config
        .ice_servers()
        .unwrap_or_default()
        .into_iter()
        .map(|s| IceServer {
            urls: s.urls,
            username: s.username.unwrap_or_default(),
            credential: s.credential.unwrap_or_default(),
        })
        .collect();
    RtcConfig {
        ice_servers,
        public_ip: config.rtc_public_ip,
        // Checked by `Config::validate`.
        ports: config.rtc_ports().ok().flatten(),
        ..RtcConfig::default()
    }
}

/// Starts the seeder on the WebRTC stack that `config` names (`--seeder-rtc`), with
/// [`rtc_config`]; see [`spawn`].
pub fn spawn_configured(
    hub: &Hub,
    streams: Arc<Streams>,
    config: &crate::config::Config,
    cfg: SeederConfig,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let rtc = rtc_config(config);
    match config.seeder_rtc {
        SeederRtc::WebrtcRs => spawn(hub, streams, WebrtcRs::new(rtc), cfg, shutdown),
        SeederRtc::Str0m => spawn(hub, streams, Str0m::new(rtc), cfg, shutdown),
    }
}

/// Starts the seeder: attaches it to `hub` (replacing any earlier seeder) and runs it until
/// `shutdown` is cancelled or the hub goes away, then closes every link.
pub fn spawn<T: Transport>(
    hub: &Hub,
    streams: Arc<Streams>,
    transport: T,
    cfg: SeederConfig,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let handle = hub.attach_seeder();
    let club = hub.config().club_config();
    let (blocks_tx, blocks_rx) = mpsc::channel(BLOCK_QUEUE);
    let seeder = Seeder {
        hub: hub.clone(),
        handle,
        streams,
        transport: Arc::new(transport),
        cfg,
        clubs: club.clubs,
        k: hub.config().seeds_per_block,
        swarms: HashMap::new(),
        conns: HashMap::new(),
        next_gen: 0,
        accepts: JoinSet::new(),
        control: JoinSet::new(),
        events: SelectAll::new(),
        blocks_tx,
        blocks_rx,
        forwarders: JoinSet::new(),
        shutdown,
        queue_drops_seen: 0,
    };
    tokio::spawn(seeder.run())
}

/// The seeder's view of one stream's swarm.
struct Swarm {
    stream: Arc<Stream>,
    source: Source,
    /// The seeder's roles towards each peer, as the hub last told us.
    roles: HashMap<PeerId, Vec<LinkRole>>,
}

/// What an accept task returns.
type Accepted<L> = (PeerId, u64, Result<Handshake<L>, RtcError>);

/// Everything the seeder task owns.
struct Seeder<T: Transport> {
    hub: Hub,
    handle: SeederHandle,
    streams: Arc<Streams>,
    transport: Arc<T>,
    cfg: SeederConfig,
    clubs: u16,
    k: u8,
    /// By stream id.
    swarms: HashMap<String, Swarm>,
    /// By peer id; peer ids are unique across streams.
    conns: HashMap<PeerId, Conn<T::Link>>,
    next_gen: u64,
    accepts: JoinSet<Accepted<T::Link>>,
    /// Remote-candidate additions in flight.
    control: JoinSet<()>,
    /// Every link's events, tagged with the peer and the connection's generation.
    events: SelectAll<BoxStream<'static, (PeerId, u64, LinkEvent)>>,
    blocks_tx: mpsc::Sender<(String, Arc<StoredBlock>)>,
    blocks_rx: mpsc::Receiver<(String, Arc<StoredBlock>)>,
    forwarders: JoinSet<()>,
    shutdown: CancellationToken,
    /// The hub's `seeder_queue_full` count when we last resynchronised.
    queue_drops_seen: u64,
}

impl<T: Transport> Seeder<T> {
    async fn run(mut self) {
        info!("seeder started");
        self.queue_drops_seen = self.metrics().rejects("seeder_queue_full");
        for stream in self.streams.list() {
            self.resync(&stream);
        }
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Local work first: blocks and link events before new remote work from the hub.
        loop {
            tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                Some((id, block)) = self.blocks_rx.recv() => self.on_block(&id, &block),
                Some((peer, gen, event)) = self.events.next() => {
                    self.on_link_event(peer, gen, event);
                }
                Some(done) = self.accepts.join_next_with_id() => match done {
                    Ok((_, (peer, gen, result))) => self.on_accepted(peer, gen, result),
                    Err(error) => self.on_accept_panicked(error.id()),
                },
                Some(_) = self.control.join_next() => {}
                event = self.handle.recv() => match event {
                    Some(event) => self.on_hub_event(event),
                    None => break,
                },
                _ = tick.tick() => self.on_tick(),
            }
        }
        self.close_all().await;
        info!("seeder stopped");
    }

    fn metrics(&self) -> &Metrics {
        self.hub.metrics()
    }

    // ---- hub events -------------------------------------------------------------------

    fn on_hub_event(&mut self, event: SeederEvent) {
        match event {
            SeederEvent::Link { stream, op, link } => {
                self.swarm(&stream);
                self.apply_link(&stream.id, op, link);
            }
            SeederEvent::Signal { stream, from, data } => match data {
                SignalData::Offer { sdp, conn } => self.on_offer(&stream, from, sdp, conn),
                SignalData::Candidate {
                    conn,
                    candidate,
                    sdp_mid,
                    sdp_mline_index,
                } => self.on_remote_candidate(
                    from,
                    conn,
                    IceCandidate {
                        candidate,
                        sdp_mid,
                        sdp_m_line_index: sdp_mline_index,
                    },
                ),
                SignalData::Answer { .. } => {
                    debug!(
                        peer = from,
                        "seeder: ignoring an answer; peers offer to the seeder"
                    );
                }
            },
        }
    }

    /// The swarm entry of `stream`, made (with its block forwarder) on first use. An
    /// entry under its id for an earlier stream of that name, which ended, is replaced.
    fn swarm(&mut self, stream: &Arc<Stream>) -> &mut Swarm {
        if self
            .swarms
            .get(&stream.id)
            .is_some_and(|s| !Arc::ptr_eq(&s.stream, stream))
        {
            self.forget_swarm(&stream.id);
        }
        if !self.swarms.contains_key(&stream.id) {
            self.forwarders.spawn(forward(
                stream.clone(),
                self.blocks_tx.clone(),
                self.hub.clone(),
                self.shutdown.clone(),
            ));
            debug!(stream = %stream.name, "seeder: seeding a new stream");
        }
        self.swarms
            .entry(stream.id.clone())
            .or_insert_with(|| Swarm {
                stream: stream.clone(),
                source: Source::new(self.clubs, self.k),
                roles: HashMap::new(),
            })
    }

    /// Drops the swarm entry `stream_id` and the connections of its peers.
    fn forget_swarm(&mut self, stream_id: &str) {
        let Some(swarm) = self.swarms.remove(stream_id) else {
            return;
        };
        for peer in swarm.roles.keys() {
            self.close(*peer);
        }
        debug!(stream = %swarm.stream.name, "seeder: stream ended; no longer seeding it");
    }

    /// Adds or removes one role; a peer left with no role loses its connection.
    fn apply_link(&mut self, stream_id: &str, op: LinkOp, link: RoleLink) {
        let Some(swarm) = self.swarms.get_mut(stream_id) else {
            return;
        };
        let peer = link.peer;
        let roles = swarm.roles.entry(peer).or_default();
        match op {
            LinkOp::Add => {
                if !roles.contains(&link.role) {
                    roles.push(link.role);
                }
            }
            LinkOp::Remove => roles.retain(|r| *r != link.role),
        }
        let empty = roles.is_empty();
        if empty {
            swarm.roles.remove(&peer);
        }
        swarm.source.handle_link(op, link);
        let open = self
            .conns
            .get(&peer)
            .is_some_and(|c| c.open_link().is_some());
        if op == LinkOp::Add && open {
            // A peer that had no role had no `Source` target; tell it the channel is open.
            swarm.source.handle_link_open(peer, true);
        }
        if empty {
            self.close(peer);
        }
    }

    /// Re-reads the seeder's roles in `stream` from the hub after events were lost.
    fn resync(&mut self, stream: &Arc<Stream>) {
        let want = self.handle.links(&stream.id);
        if want.is_empty() && !self.swarms.contains_key(&stream.id) {
            return;
        }
        let have: Vec<RoleLink> = self
            .swarm(stream)
            .roles
            .iter()
            .flat_map(|(peer, roles)| {
                roles.iter().map(|role| RoleLink {
                    peer: *peer,
                    role: *role,
                    offer: false,
                })
            })
            .collect();
        let same = |a: &RoleLink, b: &RoleLink| a.peer == b.peer && a.role == b.role;
        for gone in have.iter().filter(|h| !want.iter().any(|w| same(h, w))) {
            self.apply_link(&stream.id, LinkOp::Remove, *gone);
        }
        for new in want.iter().filter(|w| !have.iter().any(|h| same(h, w))) {
            self.apply_link(&stream.id, LinkOp::Add, *new);
        }
    }

    fn has_roles(&self, stream_id: &str, peer: PeerId) -> bool {
        self.swarms
            .get(stream_id)
            .is_some_and(|s| s.roles.contains_key(&peer))
    }

    fn on_offer(&mut self, stream: &Arc<Stream>, peer: PeerId, sdp: String, conn: Option<u64>) {
        if !self.has_roles(&stream.id, peer) {
            // The hub only relays offers from linked peers: we missed its link events.
            self.resync(stream);
            if !self.has_roles(&stream.id, peer) {
                debug!(peer, "seeder: offer from a peer without a role; ignored");
                return;
            }
        }
        if self.conns.contains_key(&peer) {
            // The peer started over (its side failed or it reloaded): the new offer wins.
            debug!(peer, "seeder: new offer replaces the connection");
            self.close(peer);
        }
        if self.conns.len() >= self.cfg.max_connections {
            self.refuse(stream, peer, SeederError::Full(self.cfg.max_connections));
            return;
        }
        let pending = self.conns.values().filter(|c| c.is_pending()).count();
        let queued = self.conns.values().filter(|c| c.is_queued()).count();
        if pending >= self.cfg.max_pending_handshakes && queued >= self.cfg.max_queued_offers {
            self.refuse(stream, peer, SeederError::Busy);
            return;
        }
        let offer = SessionDescription {
            kind: SdpKind::Offer,
            sdp,
        };
        self.next_gen += 1;
        self.conns.insert(
            peer,
            Conn {
                stream: stream.clone(),
                gen: self.next_gen,
                remote_conn: conn,
                state: State::Queued {
                    offer,
                    since: Instant::now(),
                },
                candidates: Vec::new(),
                dialogue: Dialogue::new(self.cfg.wants_per_sec, Instant::now()),
            },
        );
        self.start_queued();
    }

    /// Tells the hub we cannot serve `peer`, so it is given another source.
    fn refuse(&self, stream: &Stream, peer: PeerId, why: SeederError) {
        let code = match why {
            SeederError::Full(_) => "seeder_full",
            _ => "seeder_busy",
        };
        warn!(peer, error = %why, "seeder: offer refused");
        self.metrics().reject(code);
        self.link_failed(stream, peer);
    }

    fn link_failed(&self, stream: &Stream, peer: PeerId) {
        if let Err(error) = self.handle.link_failed(&stream.id, peer) {
            debug!(peer, %error, "seeder: link_failed not delivered");
        }
    }

    fn on_remote_candidate(&mut self, peer: PeerId, attempt: Option<u64>, candidate: IceCandidate) {
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        if !same_attempt(attempt, conn.remote_conn) {
            debug!(
                peer,
                "seeder: candidate of an earlier connection attempt; dropped"
            );
            return;
        }
        match &conn.state {
            State::Up { link, .. } => {
                let link = link.clone();
                self.control.spawn(async move {
                    if let Err(error) = link.add_remote_candidate(candidate).await {
                        debug!(peer, %error, "seeder: remote candidate refused");
                    }
                });
            }
            State::Queued { .. } | State::Accepting { .. } => {
                if !conn.hold_candidate(candidate) {
                    debug!(peer, "seeder: too many early candidates; dropped");
                }
            }
        }
    }

    // ---- handshakes -------------------------------------------------------------------

    /// Starts the oldest queued offers while handshake slots are free.
    fn start_queued(&mut self) {
        loop {
            let pending = self.conns.values().filter(|c| c.is_pending()).count();
            if pending >= self.cfg.max_pending_handshakes {
                return;
            }
            let next = self
                .conns
                .iter()
                .filter(|(_, c)| c.is_queued())
                .min_by_key(|(_, c)| c.gen)
                .map(|(peer, _)| *peer);
            let Some(peer) = next else {
                return;
            };
            let Some(conn) = self.conns.get_mut(&peer) else {
                return;
            };
            let State::Queued { offer, .. } = &conn.state else {
                return;
            };
            let offer = offer.clone();
            let gen = conn.gen;
            let transport = self.transport.clone();
            let task = self
                .accepts
                .spawn(async move { (peer, gen, transport.accept(offer).await) })
                .id();
            conn.state = State::Accepting { task };
        }
    }

    fn on_accepted(
        &mut self,
        peer: PeerId,
        gen: u64,
        result: Result<Handshake<T::Link>, RtcError>,
    ) {
        let current = self
            .conns
            .get(&peer)
            .is_some_and(|c| c.gen == gen && matches!(c.state, State::Accepting { .. }));
        if !current {
            // Replaced or closed while accepting: dropping the handshake closes its link.
            return;
        }
        let handshake = match result {
            Ok(handshake) => handshake,
            Err(error) => {
                warn!(peer, %error, "seeder: could not answer the offer");
                self.fail(peer);
                return;
            }
        };
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        let stream = conn.stream.clone();
        let answer = SignalData::Answer {
            sdp: handshake.local.sdp,
            conn: conn.remote_conn,
        };
        if let Err(error) = self.handle.signal(&stream.id, peer, answer) {
            debug!(peer, %error, "seeder: answer not delivered; dropping the connection");
            self.close(peer);
            return;
        }
        let link = Arc::new(handshake.link);
        self.events.push(tagged(peer, gen, handshake.events));
        let early = std::mem::take(&mut conn.candidates);
        if !early.is_empty() {
            let link = link.clone();
            self.control.spawn(async move {
                for candidate in early {
                    if let Err(error) = link.add_remote_candidate(candidate).await {
                        debug!(peer, %error, "seeder: remote candidate refused");
                    }
                }
            });
        }
        conn.state = State::Up { link, open: false };
    }

    fn on_accept_panicked(&mut self, task: tokio::task::Id) {
        let peer = self.conns.iter().find_map(|(peer, c)| match c.state {
            State::Accepting { task: t } if t == task => Some(*peer),
            _ => None,
        });
        warn!(?peer, "seeder: accept task panicked");
        if let Some(peer) = peer {
            self.fail(peer);
        }
    }

    // ---- links ------------------------------------------------------------------------

    fn on_link_event(&mut self, peer: PeerId, gen: u64, event: LinkEvent) {
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        if conn.gen != gen {
            return;
        }
        let stream = conn.stream.clone();
        match event {
            LinkEvent::LocalCandidate(candidate) => {
                let data = SignalData::Candidate {
                    conn: conn.remote_conn,
                    candidate: candidate.candidate,
                    sdp_mid: candidate.sdp_mid,
                    sdp_mline_index: candidate.sdp_m_line_index,
                };
                if let Err(error) = self.handle.signal(&stream.id, peer, data) {
                    debug!(peer, %error, "seeder: candidate not delivered");
                }
            }
            LinkEvent::Open => {
                if let State::Up { open, .. } = &mut conn.state {
                    *open = true;
                }
                debug!(peer, stream = %stream.name, "seeder: channel open");
                if let Some(swarm) = self.swarms.get_mut(&stream.id) {
                    swarm.source.handle_link_open(peer, true);
                }
                self.start_queued();
            }
            LinkEvent::Message(message) => self.on_message(peer, message),
            LinkEvent::Writable => {
                if let (Some(link), Some(swarm)) =
                    (conn.open_link(), self.swarms.get_mut(&stream.id))
                {
                    swarm
                        .source
                        .handle_link_buffered(peer, link.buffered_amount());
                }
            }
            LinkEvent::Closed(reason) => {
                debug!(peer, ?reason, "seeder: link closed");
                self.fail(peer);
            }
        }
    }

    fn on_message(&mut self, peer: PeerId, message: Bytes) {
        let Some(conn) = self.conns.get_mut(&peer) else {
            return;
        };
        let Some(link) = conn.open_link().cloned() else {
            return;
        };
        let frame = match Frame::decode(message) {
            Ok(frame) => frame,
            Err(error) => {
                warn!(peer, error = %SeederError::from(error), "seeder: closing the link");
                self.fail(peer);
                return;
            }
        };
        let room = link.buffered_amount() < SEED_MAX_BUFFERED;
        let reply = conn
            .dialogue
            .handle(frame, &conn.stream, room, Instant::now());
        let (bytes, block) = match reply {
            Reply::None => return,
            Reply::Frame(bytes) => (bytes, false),
            Reply::Block(bytes) => (bytes, true),
        };
        let len = bytes.len() as u64;
        match link.try_send(bytes) {
            Ok(()) if block => self.metrics().seeded(len),
            Ok(()) => {}
            Err(SendError::Full { .. }) => self.metrics().reject("seeder_send_full"),
            Err(error) => debug!(peer, %error, "seeder: reply not sent"),
        }
    }

    /// The connection to `peer` failed: forget it and, if the peer still has roles, ask the
    /// hub to replace them.
    fn fail(&mut self, peer: PeerId) {
        let Some(conn) = self.conns.get(&peer) else {
            return;
        };
        let stream = conn.stream.clone();
        self.close(peer);
        if self.has_roles(&stream.id, peer) {
            self.link_failed(&stream, peer);
        }
    }

    /// Drops the connection to `peer`, which closes its link.
    fn close(&mut self, peer: PeerId) {
        let Some(conn) = self.conns.remove(&peer) else {
            return;
        };
        if let Some(swarm) = self.swarms.get_mut(&conn.stream.id) {
            swarm.source.handle_link_open(peer, false);
        }
        if conn.is_pending() {
            self.start_queued();
        }
    }

    // ---- blocks -----------------------------------------------------------------------

    fn on_block(&mut self, stream_id: &str, block: &StoredBlock) {
        let Some(swarm) = self.swarms.get_mut(stream_id) else {
            return;
        };
        // Fresh buffered amounts: a seed that drained since its last push must not be
        // skipped on a stale figure.
        for peer in swarm.roles.keys() {
            if let Some(link) = self.conns.get(peer).and_then(|c| c.open_link()) {
                swarm
                    .source
                    .handle_link_buffered(*peer, link.buffered_amount());
            }
        }
        let frame = frames::block_frame(block);
        swarm.source.handle_block(block.seq(), frame.len());
        let metrics = self.hub.metrics();
        while let Some(push) = swarm.source.poll_push() {
            let Some(link) = self.conns.get(&push.to).and_then(|c| c.open_link()) else {
                continue;
            };
            match link.try_send(frame.clone()) {
                Ok(()) => {
                    metrics.seeded(frame.len() as u64);
                    swarm
                        .source
                        .handle_link_buffered(push.to, link.buffered_amount());
                }
                Err(SendError::Full { buffered }) => {
                    metrics.reject("seeder_send_full");
                    swarm.source.handle_link_buffered(push.to, buffered);
                }
                Err(error) => debug!(peer = push.to, %error, "seeder: push not sent"),
            }
        }
        let mut slow = Vec::new();
        while let Some(SourceEvent::SlowSeed(peer)) = swarm.source.poll_event() {
            slow.push(peer);
        }
        let stream = swarm.stream.clone();
        for peer in slow {
            warn!(peer, stream = %stream.name, "seeder: seed too slow; asking for a replacement");
            self.metrics().reject("seeder_slow_seed");
            self.link_failed(&stream, peer);
        }
    }

    // ---- housekeeping -----------------------------------------------------------------

    fn on_tick(&mut self) {
        let now = Instant::now();
        let ttl = self.cfg.queued_offer_ttl;
        let expired: Vec<PeerId> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.state, State::Queued { since, .. } if now.duration_since(since) > ttl)
            })
            .map(|(peer, _)| *peer)
            .collect();
        for peer in expired {
            if let Some(stream) = self.conns.get(&peer).map(|c| c.stream.clone()) {
                self.close(peer);
                self.refuse(&stream, peer, SeederError::Busy);
            }
        }
        let ended: Vec<String> = self
            .swarms
            .iter()
            .filter(|(_, s)| s.stream.ended().is_cancelled())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ended {
            self.forget_swarm(&id);
        }
        let drops = self.metrics().rejects("seeder_queue_full");
        if drops != self.queue_drops_seen {
            self.queue_drops_seen = drops;
            warn!("seeder: the hub dropped events; resynchronising");
            let streams: Vec<Arc<Stream>> =
                self.swarms.values().map(|s| s.stream.clone()).collect();
            for stream in streams {
                self.resync(&stream);
            }
        }
    }

    async fn close_all(&mut self) {
        self.forwarders.abort_all();
        self.accepts.abort_all();
        self.control.abort_all();
        let mut closing = JoinSet::new();
        for (_, conn) in self.conns.drain() {
            if let State::Up { link, .. } = conn.state {
                if let Ok(link) = Arc::try_unwrap(link) {
                    closing.spawn(link.close());
                }
            }
        }
        if tokio::time::timeout(CLOSE_GRACE, closing.join_all())
            .await
            .is_err()
        {
            warn!("seeder: links still closing at shutdown");
        }
    }
}

/// A link's events as a stream tagged with its peer and connection generation.
fn tagged(
    peer: PeerId,
    gen: u64,
    events: LinkEvents,
) -> BoxStream<'static, (PeerId, u64, LinkEvent)> {
    stream::unfold(events, |mut events| async move {
        events.next().await.map(|event| (event, events))
    })
    .map(move |event| (peer, gen, event))
    .boxed()
}

/// Feeds one stream's new blocks to the seeder task. Waiting on the bounded queue makes the
/// broadcast lag rather than anything grow; a lagging seeder skips ahead.
async fn forward(
    stream: Arc<Stream>,
    tx: mpsc::Sender<(String, Arc<StoredBlock>)>,
    hub: Hub,
    shutdown: CancellationToken,
) {
    let mut rx = stream.subscribe();
    loop {
        let next = tokio::select! {
            () = shutdown.cancelled() => return,
            () = stream.ended().cancelled() => return,
            next = rx.recv() => next,
        };
        match next {
            Ok(block) => {
                if tx.send((stream.id.clone(), block)).await.is_err() {
                    return;
                }
            }
            Err(broadcast::error::RecvError::Lagged(skipped)) => {
                warn!(stream = %stream.name, skipped, "seeder: lagging; skipped blocks");
                hub.metrics().reject("seeder_lagged");
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}
