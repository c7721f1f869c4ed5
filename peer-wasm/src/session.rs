//! One viewing session: the driver of the protocol core in the browser.
//!
//! Flow: the socket opens and sends `join`; the `welcome` gives the peer id,
//! clubs, links, where to start and the grant token. The session then
//! - runs a [`Peer`] on the server's clock ([`ServerClock`]) and, after every
//!   input, drains its transmits to the links ([`links`]) and its events to
//!   playback ([`playback`]) and the origin ([`origin`]), and arms one
//!   [`Timer`] for `poll_timeout`;
//! - ticks every [`TICK_MS`] for what has no event of its own: heartbeats,
//!   bids, send-buffer levels, link timeouts, latency steering and stalls.
//!
//! With `p2p: false` the session joins without links and fetches every block
//! from the origin in order ([`origin`]); the core still verifies and orders them.
//!
//! When the signaling socket drops (network blip, proxy timeout, server
//! restart), the session keeps playing on its open links and reconnects after
//! [`RECONNECT_MS`], doubling up to [`MAX_RECONNECT_MS`]. The server forgot the
//! old peer id with the socket, so the new welcome starts a new core at the
//! block playback needs next: the old links close, the origin fills in order
//! until a new link opens, and playback goes on without a restart. A socket the
//! server closed for a policy reason (bad blocks, bad messages) is not reopened.

mod origin;
mod playback;
mod probe;
mod startup;

use std::collections::VecDeque;
use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::Bytes;
use clubcast_protocol::block::StreamKey;
use clubcast_protocol::peer::{Peer, PeerConfig, PeerEvent, PeerStats};
use clubcast_protocol::signal::{
    ClientMsg, ErrorCode, PeerId, ServerMsg, StreamInfo, SIGNAL_VERSION,
};
use clubcast_protocol::Time;
use serde::Deserialize;
use serde_json::json;
use web_sys::HtmlMediaElement;

use crate::clock::ServerClock;
use crate::fetch::{FetchError, Fetched};
use crate::mse::MseEvent;
use crate::player::{deliver, Shared};
use crate::rtc::{IceServer, LinkEvent};
use crate::timer::{self, Timer};
use crate::video::{VideoEvent, VideoEvents};
use crate::ws::{signal_url, SignalSocket, WsEvent, CLOSE_POLICY};

use crate::links::{self, Links};
use origin::Origin;
use playback::Playback;
use startup::Mark;

/// Period of the housekeeping tick, ms.
pub const TICK_MS: u64 = 100;
/// A first start makes no peer link until its first frame shows, or at most
/// this long after the welcome, ms: the start comes from the origin, and
/// setting up a dozen links at once would hold up the page's main thread
/// (the HTTP-to-swarm switch-over).
pub const LINK_HOLD_MAX_MS: f64 = 2_000.0;
/// Heartbeats sent but not yet answered that are remembered for the clock.
const MAX_HEARTBEATS_IN_FLIGHT: usize = 8;
/// A playing session with open links that has had no new block for this long,
/// ms, while less than [`STARVE_BUFFER_MS`] of media is buffered and a
/// publisher is connected (without one no block comes, and a probe every
/// [`STARVE_PROBE_EVERY_MS`] from every viewer would only load the server),
/// asks the server for the live edge at once rather than at the next heartbeat. Its
/// links are the only other way it hears of new blocks, and a data channel
/// that lost a packet holds everything behind it until SCTP retransmits it
/// (a second or more), so without the live edge the core would not know
/// which blocks to fetch from the origin before their deadlines
/// (`just bench-loss`, `bench/results/loss.md`).
pub const STARVE_SILENCE_MS: f64 = 500.0;
/// See [`STARVE_SILENCE_MS`]. Normal play swings between about 1.2 and 2.3 s
/// buffered with 1-s fragments, so this is a sign of blocks missing.
pub const STARVE_BUFFER_MS: f64 = 1_000.0;
/// Least time between two live-edge probes of a starving session, ms.
pub const STARVE_PROBE_EVERY_MS: f64 = 250.0;
/// First wait before reopening a dropped signaling socket, ms; each wait is
/// jittered by ±25 %.
pub const RECONNECT_MS: u64 = 500;
/// Longest wait between reconnection attempts, ms.
pub const MAX_RECONNECT_MS: u64 = 16_000;
/// A rejoin whose welcome puts the live edge this many blocks behind the
/// block playback needs next finds the stream restarted (its numbering began
/// again), not merely ahead of a stale edge.
pub const RESTART_MARGIN_BLOCKS: u64 = 256;

/// Errors that stop a session from starting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// No `stream` was given.
    #[error("no stream given")]
    NoStream,
    /// The signaling socket could not be created.
    #[error("signaling: {0}")]
    Socket(#[from] crate::ws::WsError),
    /// Listening on the media element failed.
    #[error("media element: {0}")]
    Video(#[from] crate::error::JsError),
    /// The browser cannot play through MSE (see [`crate::mse::media_source_class`]).
    #[error("this browser has no Media Source Extensions (MediaSource or ManagedMediaSource), so it cannot play")]
    NoMediaSource,
}

impl SessionError {
    /// Stable code for the `error` event.
    pub fn code(&self) -> &'static str {
        match self {
            SessionError::NoStream => "bad_options",
            SessionError::Socket(_) => "signal_failed",
            SessionError::Video(_) => "media",
            SessionError::NoMediaSource => "no_mse",
        }
    }
}

/// Player options, from the JSON given to the `WasmPlayer` constructor.
#[derive(Debug, Clone, Deserialize)]
pub struct Options {
    /// HTTP base of the server; defaults to the page's origin.
    #[serde(default)]
    pub server: Option<String>,
    /// Stream id (URL form of its key) or name.
    #[serde(default)]
    pub stream: String,
    /// Live latency to hold, ms; defaults to the server's.
    #[serde(default)]
    pub target_latency_ms: Option<u64>,
    /// ICE servers; the welcome's are used when this is empty.
    #[serde(default)]
    pub ice_servers: Vec<IceServer>,
    /// False: origin only, no links (the end-to-end baseline).
    #[serde(default = "yes")]
    pub p2p: bool,
    /// Upload the viewer offers, kbit/s; the server plans its relaying on it
    /// (under the stream's bitrate: a leaf that only receives). None: the
    /// player measures it with the upload probe before it joins, or, with
    /// `upload_probe: false`, the server plans it at the cap until its bids
    /// show it falls behind.
    #[serde(default)]
    pub upload_kbps: Option<u32>,
    /// False: join at once, without the upload probe.
    #[serde(default = "yes")]
    pub upload_probe: bool,
    /// True: if the browser refuses to start playback with sound (its
    /// autoplay policy, before any user gesture), mute the element and
    /// start muted (`autoplay_muted` event). False: wait for the user to
    /// press play (`autoplay_blocked` event).
    #[serde(default = "yes")]
    pub autoplay_muted: bool,
    /// Test only: relay corrupted blocks, if the server allows it.
    #[serde(default)]
    pub test_corrupt: bool,
}

fn yes() -> bool {
    true
}

/// Everything a callback can report.
pub(crate) enum Input {
    Ws(WsEvent),
    Link {
        peer: PeerId,
        gen: u64,
        event: LinkEvent,
    },
    Mse(MseEvent),
    Video(VideoEvent),
    /// The browser refused `video.play()` (`NotAllowedError`: its autoplay policy).
    PlayRefused,
    Init(u64, Result<Fetched, FetchError>),
    /// An origin fetch from `seq`: one block or a run.
    Origin {
        seq: u64,
        result: Result<Fetched, FetchError>,
    },
    Wake,
    Tick,
    Reconnect,
    /// Queue more of the upload probe.
    ProbePump,
}

/// What the welcome set up.
struct Joined {
    peer: Peer<StreamKey>,
    peer_id: PeerId,
    stream: StreamInfo,
    grant_token: String,
    heartbeat_ms: f64,
    bid_interval_ms: f64,
    next_heartbeat: f64,
    next_bid: f64,
    live_edge: u64,
    granted_bits: u64,
    corrupt: bool,
    /// Held links are made from this local ms on, or from the first frame.
    links_at: f64,
    /// `pushes_late` of the core at the last bid.
    late_sent: u64,
    /// Bytes sent (payload and control) reported with the last bid.
    up_sent: u64,
    /// Block bytes received (peers and origin) at the last tick, and the
    /// local ms they last grew ([`STARVE_SILENCE_MS`]).
    bytes_in: u64,
    block_at: f64,
    /// No live-edge probe before this local ms; probes sent so far.
    next_probe: f64,
    edge_probes: u64,
}

/// The driver state of one `WasmPlayer`.
pub(crate) struct Session {
    weak: Weak<Shared>,
    opts: Options,
    server: String,
    /// Unix ms at `performance.now() == 0`.
    epoch_ms: f64,
    /// `performance.now()` when the player was constructed.
    created_ms: f64,
    clock: ServerClock,
    socket: Option<SignalSocket>,
    join_sent: Option<f64>,
    heartbeats: VecDeque<f64>,
    joined: Option<Joined>,
    links: Links,
    origin: Origin,
    play: Playback,
    core_timer: Timer,
    core_deadline: Option<Time>,
    tick_timer: Timer,
    _video_events: VideoEvents,
    block_delay_ms: Option<f64>,
    failed: Option<String>,
    reconnect_timer: Timer,
    /// Reconnection attempts since the last welcome.
    attempts: u32,
    /// Welcomes after the first.
    rejoins: u64,
    /// Counters of the cores that rejoins replaced.
    carried: PeerStats,
    /// The upload probe running on the socket before its join.
    probe: Option<probe::UploadProbe>,
    probe_timer: Timer,
    /// What the last probe did.
    probed: probe::ProbeRecord,
}

impl Session {
    /// Connects to the server and starts the tick.
    pub(crate) fn start(
        weak: Weak<Shared>,
        video: HtmlMediaElement,
        opts: Options,
    ) -> Result<Session, SessionError> {
        if opts.stream.is_empty() {
            return Err(SessionError::NoStream);
        }
        // Before joining: a peer that cannot play would take a place in the
        // swarm and relay nothing it has played.
        if crate::mse::media_source_class().is_none() {
            return Err(SessionError::NoMediaSource);
        }
        let server = opts
            .server
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| web_sys::window().and_then(|w| w.location().origin().ok()))
            .unwrap_or_default()
            .trim_end_matches('/')
            .to_owned();
        let w = weak.clone();
        let socket = SignalSocket::connect(&signal_url(&server), move |e| {
            deliver(&w, Input::Ws(e));
        })?;
        let w = weak.clone();
        let video_events = VideoEvents::attach(&video, move |e| deliver(&w, Input::Video(e)))?;
        let perf = perf_now();
        let mut session = Session {
            weak: weak.clone(),
            server,
            epoch_ms: js_sys::Date::now() - perf,
            created_ms: perf,
            clock: ServerClock::new(),
            socket: Some(socket),
            join_sent: None,
            heartbeats: VecDeque::new(),
            joined: None,
            links: Links::new(
                {
                    let weak = weak.clone();
                    Rc::new(move |peer, gen, event| {
                        deliver(&weak, Input::Link { peer, gen, event })
                    })
                },
                opts.ice_servers.clone(),
            ),
            origin: Origin::new(weak.clone()),
            play: Playback::new(weak, video),
            core_timer: Timer::new(),
            core_deadline: None,
            tick_timer: Timer::new(),
            _video_events: video_events,
            block_delay_ms: None,
            failed: None,
            reconnect_timer: Timer::new(),
            attempts: 0,
            rejoins: 0,
            carried: PeerStats::default(),
            probe: None,
            probe_timer: Timer::new(),
            probed: probe::ProbeRecord::default(),
            opts,
        };
        session.arm_tick();
        Ok(session)
    }

    /// Local monotonic Unix ms.
    fn local_ms(&self) -> f64 {
        self.epoch_ms + perf_now()
    }

    /// Now on the server's clock.
    fn now(&self) -> Time {
        Time((self.local_ms() + self.clock.offset_ms()).max(0.0) as u64)
    }

    fn emit(&self, event: serde_json::Value) {
        if let Some(shared) = self.weak.upgrade() {
            shared.emit(event);
        }
    }

    fn error(&mut self, code: &str, message: String) {
        web_sys::console::warn_1(&format!("clubcast: {code}: {message}").into());
        self.emit(json!({"type": "error", "code": code, "message": message}));
    }

    fn send(&self, msg: &ClientMsg) {
        if let Some(socket) = &self.socket {
            if let Err(e) = socket.send_json(msg) {
                web_sys::console::warn_1(&format!("clubcast: signaling send: {e}").into());
            }
        }
    }

    /// Handles one input; [`Session::settle`] follows a batch of them.
    pub(crate) fn handle(&mut self, input: Input) {
        match input {
            Input::Ws(e) => self.on_socket(e),
            Input::Link { peer, gen, event } => self.on_link(peer, gen, event),
            Input::Mse(e) => self.on_mse(e),
            Input::Video(e) => self.on_video(e),
            Input::PlayRefused => {
                if let Some(event) = self
                    .play
                    .handle_play_refused(perf_now(), self.opts.autoplay_muted)
                {
                    self.emit(event);
                }
            }
            Input::Init(seq, r) => self.on_init(seq, r),
            Input::Origin { seq, result } => self.on_origin(seq, result),
            Input::Wake => {
                self.core_deadline = None;
                let now = self.now();
                if let Some(j) = &mut self.joined {
                    // Fresh buffer levels first: the core's send queue paces by them.
                    self.links.report_buffered(&mut j.peer);
                    j.peer.handle_timeout(now);
                }
            }
            Input::Tick => self.tick(),
            Input::Reconnect => self.reconnect(),
            Input::ProbePump => self.pump_probe(),
        }
    }

    /// Queues more of the upload probe; when it is over, joins.
    fn pump_probe(&mut self) {
        let (Some(p), Some(socket)) = (self.probe.as_mut(), self.socket.as_ref()) else {
            self.probe = None;
            return;
        };
        let perf = perf_now();
        if !p.pump(socket, perf) {
            let w = self.weak.clone();
            let armed = self
                .probe_timer
                .set(Duration::from_millis(probe::PROBE_PUMP_MS), move || {
                    deliver(&w, Input::ProbePump)
                });
            if armed.is_ok() {
                return;
            }
        }
        self.probed = p.record(perf, self.probed.count + 1);
        self.probe = None;
        self.send_join(self.probed.limited);
    }

    fn send_join(&mut self, probe_limited: bool) {
        self.join_sent = Some(self.local_ms());
        self.send(&ClientMsg::Join {
            v: SIGNAL_VERSION,
            stream: self.opts.stream.clone(),
            upload_kbps: self.opts.upload_kbps,
            p2p: self.opts.p2p,
            probe_limited,
            test_corrupt: self.opts.test_corrupt,
        });
    }

    /// Opens a new signaling socket; its `Open` sends the join.
    fn reconnect(&mut self) {
        if self.socket.is_some() || self.failed.is_some() {
            return;
        }
        let w = self.weak.clone();
        match SignalSocket::connect(&signal_url(&self.server), move |e| {
            deliver(&w, Input::Ws(e));
        }) {
            Ok(socket) => self.socket = Some(socket),
            Err(e) => self.fail("signal_failed", format!("signaling: {e}")),
        }
    }

    /// The signaling socket closed: reopen it later unless the server closed
    /// it for a policy reason or the session failed.
    fn signal_closed(&mut self, code: u16, reason: String) {
        self.socket = None;
        self.heartbeats.clear();
        if self.failed.is_some() {
            // The failure was reported already; the close only follows it.
            return;
        }
        if code == CLOSE_POLICY {
            self.error(
                "signal_closed",
                format!("signaling closed ({code}) {reason}; playing on with open links"),
            );
            return;
        }
        let delay = reconnect_delay_ms(self.attempts, js_sys::Math::random());
        self.attempts += 1;
        web_sys::console::warn_1(
            &format!("clubcast: signaling closed ({code}) {reason}; reconnecting in {delay} ms")
                .into(),
        );
        self.emit(json!({
            "type": "reconnecting", "code": code, "reason": reason,
            "attempt": self.attempts, "in_ms": delay,
        }));
        let w = self.weak.clone();
        if let Err(e) = self
            .reconnect_timer
            .set(Duration::from_millis(delay), move || {
                deliver(&w, Input::Reconnect)
            })
        {
            self.fail("signal_failed", format!("reconnect timer: {e}"));
        }
    }

    /// Counters over every core of the session.
    fn peer_stats(&self) -> PeerStats {
        let mut s = self.carried;
        if let Some(j) = &self.joined {
            s.add(&j.peer.stats());
        }
        s
    }

    /// Drains the core's transmits and events, then arms its timer.
    pub(crate) fn settle(&mut self) {
        for _ in 0..64 {
            let Some(j) = &mut self.joined else { return };
            let mut busy = false;
            while let Some(t) = j.peer.poll_transmit() {
                busy = true;
                self.links
                    .transmit(&mut j.peer, t, j.corrupt, self.origin.busy());
            }
            let mut events = Vec::new();
            while let Some(e) = j.peer.poll_event() {
                events.push(e);
            }
            busy |= !events.is_empty();
            for e in events {
                self.on_peer_event(e);
            }
            if !busy {
                break;
            }
        }
        // Gap fills the events queued go out now, not at the next tick: a
        // joiner's backlog waited up to a tick for its first fetch.
        if self.origin.has_work() {
            self.pump_origin();
        }
        self.arm_core_timer();
    }

    fn arm_core_timer(&mut self) {
        let Some(j) = &self.joined else { return };
        let next = j.peer.poll_timeout();
        if next == self.core_deadline && self.core_timer.is_pending() {
            return;
        }
        self.core_deadline = next;
        match next {
            Some(at) => {
                let delay = at.since(self.now());
                let w = self.weak.clone();
                if let Err(e) = self.core_timer.set(Duration::from_millis(delay), move || {
                    deliver(&w, Input::Wake)
                }) {
                    web_sys::console::warn_1(&format!("clubcast: timer: {e}").into());
                }
            }
            None => self.core_timer.cancel(),
        }
    }

    fn arm_tick(&mut self) {
        let w = self.weak.clone();
        if let Err(e) = self
            .tick_timer
            .set(Duration::from_millis(TICK_MS), move || {
                deliver(&w, Input::Tick)
            })
        {
            web_sys::console::warn_1(&format!("clubcast: tick timer: {e}").into());
        }
    }

    fn on_peer_event(&mut self, e: PeerEvent) {
        let now = self.now();
        match e {
            PeerEvent::Play(block) => self.play.play(block),
            PeerEvent::Skip { from, to } => {
                self.play.skip();
                self.emit(json!({"type": "skip", "from": from, "to": to}));
            }
            PeerEvent::GapFill { seq } => {
                if self.opts.p2p {
                    self.origin.gap_fill(seq);
                }
            }
            PeerEvent::Arrived { ingest_time_ms, .. } => {
                let d = now.as_millis() as f64 - ingest_time_ms as f64;
                self.block_delay_ms = Some(match self.block_delay_ms {
                    Some(avg) => 0.9 * avg + 0.1 * d,
                    None => d,
                });
            }
            // Reported to the server, which replaces the source only if its
            // own bids say it is overloaded (`pushes_late`). Asking for a new
            // source on every report (link_failed) cascaded with 12 browsers
            // on 2 cores, 15-48 replacements per browser in 40 s, each a new
            // connection on a saturated machine, until the swarm stalled:
            // there the misses came from the overloaded receivers.
            PeerEvent::SlowSource { peer } => {
                self.send(&ClientMsg::SlowSource {
                    v: SIGNAL_VERSION,
                    peer,
                });
                self.emit(json!({"type": "slow_source", "peer": peer}));
            }
            PeerEvent::BadPeer { peer, reason } => {
                let reason = reason.to_string();
                self.links.close(peer);
                self.send(&ClientMsg::Report {
                    v: SIGNAL_VERSION,
                    peer,
                    reason: reason.clone(),
                });
                self.send(&ClientMsg::LinkFailed {
                    v: SIGNAL_VERSION,
                    peer,
                });
                self.emit(json!({"type": "bad_peer", "peer": peer, "reason": reason}));
            }
        }
    }

    fn on_socket(&mut self, e: WsEvent) {
        match e {
            WsEvent::Open => {
                self.play.mark(Mark::SocketOpen, perf_now());
                // A relaying viewer that does not know its upload has the
                // server measure it first.
                if self.opts.upload_kbps.is_none() && self.opts.p2p && self.opts.upload_probe {
                    self.probe = Some(probe::UploadProbe::new(perf_now()));
                    self.pump_probe();
                } else {
                    self.send_join(false);
                }
            }
            WsEvent::Message(text) => match serde_json::from_str::<ServerMsg>(&text) {
                Ok(msg) => self.on_server(msg),
                Err(e) => web_sys::console::warn_1(
                    &format!("clubcast: unreadable signaling message: {e}").into(),
                ),
            },
            WsEvent::Rejected(e) => {
                web_sys::console::warn_1(&format!("clubcast: signaling: {e}").into());
            }
            WsEvent::Closed { code, reason, .. } => {
                self.probe = None;
                self.probe_timer.cancel();
                self.signal_closed(code, reason);
            }
        }
    }

    fn on_server(&mut self, msg: ServerMsg) {
        let now = self.now();
        match msg {
            ServerMsg::Welcome {
                peer_id,
                stream,
                clubs,
                links,
                live_edge,
                start_seq,
                first_seq,
                server_time_ms,
                target_latency_ms,
                heartbeat_ms,
                ice_servers,
                grant_token,
                bid_interval_ms,
                upload_probe_kbps,
                publisher_connected,
                test_corrupt,
                ..
            } => {
                self.probed.kbps = upload_probe_kbps;
                self.set_publisher(publisher_connected);
                self.play.mark(Mark::Welcome, perf_now());
                let received = self.local_ms();
                let sent = self.join_sent.unwrap_or(received);
                self.clock
                    .handle_sample(sent, server_time_ms as f64, received);
                let key = match StreamKey::from_id(&stream.id) {
                    Ok(k) => k,
                    Err(e) => return self.fail("bad_stream", format!("stream id: {e}")),
                };
                // A stream asked for by id must be that stream: the key is
                // what every block is checked against.
                if let Ok(asked) = StreamKey::from_id(&self.opts.stream) {
                    if asked != key {
                        return self.fail("bad_stream", "welcome names another stream".into());
                    }
                }
                let mut start = start_seq;
                let mut skipped_from = None;
                if let Some(old) = &self.joined {
                    if old.stream.id != stream.id {
                        return self.fail("bad_stream", "rejoin names another stream".into());
                    }
                    if let Some(next) = old.peer.next_play() {
                        match rejoin_start(next, live_edge, start_seq, first_seq) {
                            Ok(s) => {
                                start = s;
                                skipped_from = (s != next).then_some(next);
                            }
                            Err(msg) => return self.fail("stream_restarted", msg),
                        }
                    }
                }
                let rejoin = match self.joined.take() {
                    Some(old) => {
                        self.carried.add(&old.peer.stats());
                        if let Some(from) = skipped_from {
                            self.carried.blocks_skipped += start.saturating_sub(from);
                        }
                        self.links.reset();
                        self.rejoins += 1;
                        true
                    }
                    None => false,
                };
                self.attempts = 0;
                let target = self
                    .opts
                    .target_latency_ms
                    .unwrap_or(u64::from(target_latency_ms));
                let mut cfg = PeerConfig::new(peer_id, stream.clubs);
                cfg.target_latency_ms = target;
                cfg.relay = self.opts.p2p;
                let mut peer = Peer::new(cfg, key);
                let now = self.now();
                peer.handle_welcome(now, &clubs, &links, start, live_edge);
                if self.opts.ice_servers.is_empty() {
                    self.links
                        .set_ice_servers(ice_servers.into_iter().map(IceServer::from).collect());
                }
                if let Some(from) = skipped_from {
                    self.play.skip();
                    self.emit(json!({"type": "skip", "from": from, "to": start}));
                }
                let local = self.local_ms();
                self.emit(json!({
                    "type": "joined", "peer_id": peer_id, "clubs": clubs,
                    "start_seq": start, "live_edge": live_edge, "links": links.len(),
                    "rejoin": rejoin,
                }));
                self.play.set_target(target as f64);
                let init_url = format!("{}{}", self.server, stream.init_url);
                self.joined = Some(Joined {
                    peer,
                    peer_id,
                    stream,
                    grant_token,
                    heartbeat_ms: f64::from(heartbeat_ms.max(500)),
                    bid_interval_ms: f64::from(bid_interval_ms.max(100)),
                    next_heartbeat: local + f64::from(heartbeat_ms.max(500)),
                    next_bid: local,
                    live_edge,
                    granted_bits: 0,
                    corrupt: test_corrupt && self.opts.test_corrupt,
                    late_sent: 0,
                    up_sent: 0,
                    links_at: local + LINK_HOLD_MAX_MS,
                    bytes_in: 0,
                    block_at: local,
                    next_probe: local,
                    edge_probes: 0,
                });
                if !rejoin {
                    self.play.fetch_init(init_url, start);
                    self.links.hold();
                }
                for l in &links {
                    self.ensure_link(l.peer, l.offer);
                }
                // No link is open yet: every start, and every rejoin, plays
                // from the origin in order (from `start`, the core's next).
                self.fallback();
                self.bid();
            }
            ServerMsg::Link { op, link, .. } => {
                let Some(j) = &mut self.joined else { return };
                j.peer.handle_link(now, op, link);
                let listed = j.peer.link_peers().contains(&link.peer);
                if listed {
                    self.ensure_link(link.peer, link.offer);
                } else {
                    self.links.close(link.peer);
                }
            }
            ServerMsg::Signal { from, data, .. } => {
                let listed = self
                    .joined
                    .as_ref()
                    .is_some_and(|j| j.peer.link_peers().contains(&from));
                let local = self.local_ms();
                if self.links.handle_signal(from, data, listed, local) {
                    let now = self.now();
                    if let Some(j) = &mut self.joined {
                        j.peer.handle_link_closed(now, from);
                    }
                }
            }
            ServerMsg::Pong {
                server_time_ms,
                live_edge,
                ..
            } => {
                let received = self.local_ms();
                if let Some(sent) = self.heartbeats.pop_front() {
                    self.clock
                        .handle_sample(sent, server_time_ms as f64, received);
                }
                let now = self.now();
                if let Some(j) = &mut self.joined {
                    j.live_edge = j.live_edge.max(live_edge);
                    j.peer.handle_live_edge(now, live_edge);
                    self.origin.note_edge(j.live_edge);
                }
            }
            ServerMsg::Publisher { connected, .. } => self.set_publisher(connected),
            // On-demand messages answer an on-demand join, which a live
            // session never sends.
            ServerMsg::VodWelcome { .. } | ServerMsg::Neighbour { .. } => {
                self.error("bad_message", "on-demand message in a live session".into());
            }
            ServerMsg::Grant { bits, .. } => {
                if let Some(j) = &mut self.joined {
                    j.granted_bits = bits;
                }
                if bits > 0 {
                    self.origin.unblock();
                }
            }
            ServerMsg::Error { code, message, .. } => {
                // Before the join every error is final; after it, one that
                // says the stream is gone (it ended, or a rejoin found no
                // such stream) is too: reconnecting cannot bring it back.
                let gone = matches!(code, ErrorCode::StreamEnded | ErrorCode::UnknownStream);
                if self.joined.is_none() || gone {
                    self.fail(code.as_str(), message);
                } else {
                    self.error(code.as_str(), message);
                }
            }
        }
    }

    fn set_publisher(&mut self, connected: bool) {
        if let Some(event) = self.play.set_publisher(connected, perf_now()) {
            self.emit(event);
        }
    }

    /// A fatal error: stop talking to the server, keep the element.
    fn fail(&mut self, code: &str, message: String) {
        self.failed = Some(format!("{code}: {message}"));
        self.error(code, message);
        self.socket = None;
    }

    fn ensure_link(&mut self, peer: PeerId, offer: bool) {
        let Some(j) = &self.joined else { return };
        if peer == j.peer_id || !j.peer.link_peers().contains(&peer) {
            return;
        }
        let now = self.local_ms();
        self.links.ensure(peer, offer, now);
    }

    fn on_link(&mut self, peer: PeerId, gen: u64, event: LinkEvent) {
        let now = self.now();
        let local = self.local_ms();
        let Some(j) = &mut self.joined else { return };
        match self.links.handle_event(peer, gen, event, local) {
            links::Outcome::None => {}
            links::Outcome::Send(data) => self.send(&ClientMsg::Signal {
                v: SIGNAL_VERSION,
                to: peer,
                data,
            }),
            links::Outcome::Open => {
                self.play.mark(Mark::LinkOpen, perf_now());
                j.peer.handle_link_open(now, peer);
                self.emit(json!({"type": "link_open", "peer": peer}));
            }
            links::Outcome::Message(bytes) => {
                j.peer.handle_message(now, peer, Bytes::from(bytes));
            }
            links::Outcome::Buffered(n) => j.peer.handle_link_buffered(peer, n),
            links::Outcome::Failed(reason) => self.link_failed(peer, reason),
        }
    }

    fn link_failed(&mut self, peer: PeerId, reason: String) {
        let now = self.now();
        if let Some(j) = &mut self.joined {
            j.peer.handle_link_closed(now, peer);
        }
        self.send(&ClientMsg::LinkFailed {
            v: SIGNAL_VERSION,
            peer,
        });
        self.emit(json!({"type": "link_failed", "peer": peer, "reason": reason}));
    }

    fn on_mse(&mut self, e: MseEvent) {
        let drained = matches!(e, MseEvent::Drained);
        if let Some((code, message)) = self.play.handle_mse(e) {
            self.error(code, message);
        }
        if drained && !self.play.started() {
            // Media just landed in the buffer: see whether playback can start
            // now rather than at the next tick.
            let server_now = self.now().as_millis() as f64;
            for event in self.play.tick(perf_now(), server_now, self.created_ms) {
                self.emit(event);
            }
        }
    }

    fn on_video(&mut self, e: VideoEvent) {
        let now = perf_now();
        if let Some(event) = self.play.handle_video(e, now, self.created_ms) {
            if let Some(msg) = event.get("message").and_then(|m| m.as_str()) {
                web_sys::console::warn_1(&format!("clubcast: {msg}").into());
            }
            self.emit(event);
        }
    }

    fn on_init(&mut self, seq: u64, r: Result<Fetched, FetchError>) {
        if let Err((code, message)) = self.play.handle_init(seq, r) {
            self.error(code, message);
        }
    }

    fn on_origin(&mut self, seq: u64, result: Result<Fetched, FetchError>) {
        let now = self.now();
        let Some(j) = &mut self.joined else { return };
        if result.is_ok() {
            self.play.mark(Mark::OriginBlock, perf_now());
        }
        self.origin
            .handle_result(&mut j.peer, now, perf_now(), seq, result);
        if !self.origin.busy() {
            self.links.flush_deferred(&mut j.peer, j.corrupt);
        }
        self.pump_origin();
    }

    fn pump_origin(&mut self) {
        let Some(j) = &mut self.joined else { return };
        let base = format!("{}{}", self.server, j.stream.blocks_url);
        self.origin
            .pump(&base, &j.grant_token, j.peer.next_play(), perf_now());
    }

    fn bid(&mut self) {
        let now = self.now();
        let Some(j) = &mut self.joined else { return };
        let due = j.peer.bid(now, j.bid_interval_ms as u64);
        let stats = j.peer.stats();
        let late = stats.pushes_late.saturating_sub(j.late_sent);
        j.late_sent = stats.pushes_late;
        let up_total = stats.bytes_uploaded + stats.control_bytes_sent;
        let up = up_total.saturating_sub(j.up_sent);
        j.up_sent = up_total;
        let bits = if self.opts.p2p && !self.origin.in_order() {
            due
        } else {
            // A stream too new for the server to know its bitrate says 0.
            let kbps = match j.stream.bitrate_kbps {
                0 => j.peer.rate_kbps(),
                k => k,
            };
            origin::full_rate_bits(kbps, j.bid_interval_ms, due)
        };
        self.send(&ClientMsg::Bid {
            v: SIGNAL_VERSION,
            bits,
            late,
            up,
        });
    }

    fn tick(&mut self) {
        self.arm_tick();
        self.links.reap();
        let local = self.local_ms();
        let perf = perf_now();
        if let Some(j) = &mut self.joined {
            if local >= j.next_heartbeat && self.socket.is_some() {
                j.next_heartbeat = local + j.heartbeat_ms;
                if self.heartbeats.len() >= MAX_HEARTBEATS_IN_FLIGHT {
                    self.heartbeats.pop_front();
                }
                self.heartbeats.push_back(local);
                self.send(&ClientMsg::Heartbeat { v: SIGNAL_VERSION });
            }
        }
        if self.starving(local) {
            if self.heartbeats.len() >= MAX_HEARTBEATS_IN_FLIGHT {
                self.heartbeats.pop_front();
            }
            self.heartbeats.push_back(local);
            self.send(&ClientMsg::Heartbeat { v: SIGNAL_VERSION });
        }
        if let Some(j) = &mut self.joined {
            if local >= j.next_bid {
                j.next_bid = local + j.bid_interval_ms;
                self.bid();
            }
        }
        let (failed, retry) = match &mut self.joined {
            Some(j) => {
                let failed = self.links.tick(&mut j.peer, local);
                (failed, self.links.due_retries(&j.peer.link_peers(), local))
            }
            None => Default::default(),
        };
        for (peer, reason) in failed {
            self.link_failed(peer, reason);
        }
        for (peer, offer) in retry {
            self.ensure_link(peer, offer);
        }
        if let Some(j) = &self.joined {
            let due = local >= j.links_at || self.play.first_frame_at().is_some();
            if due && self.links.holding() {
                self.links.release(&j.peer.link_peers(), local);
            }
        }
        if self.fallback() {
            self.bid();
        }
        self.pump_origin();
        let server_now = self.now().as_millis() as f64;
        for event in self.play.tick(perf, server_now, self.created_ms) {
            self.emit(event);
        }
    }

    /// Whether to ask the server for the live edge now ([`STARVE_SILENCE_MS`]);
    /// counts the probe if so.
    fn starving(&mut self, local: f64) -> bool {
        let Some(j) = &mut self.joined else {
            return false;
        };
        let s = j.peer.stats();
        let got = s.bytes_from_peers + s.bytes_from_origin;
        if got != j.bytes_in {
            j.bytes_in = got;
            j.block_at = local;
        }
        // Without a publisher the edge stands still: nothing to ask for.
        let probe = self.socket.is_some()
            && self.play.publisher_connected()
            && self.play.first_frame_at().is_some()
            && self.links.open_count() > 0
            && !self.origin.in_order()
            && local - j.block_at >= STARVE_SILENCE_MS
            && self.play.buffer_ms() < STARVE_BUFFER_MS
            && local >= j.next_probe;
        if probe {
            j.next_probe = local + STARVE_PROBE_EVERY_MS;
            j.edge_probes += 1;
        }
        probe
    }

    /// Without any open link the core hears of no new blocks (only links
    /// announce them), so a session that has none (a start, a rejoin, one
    /// whose links all dropped, and `p2p: false` always) plays from the origin
    /// in order, and a p2p session goes back to gap fill once a link opens.
    /// Says whether it started the in-order fetch (the bid should follow).
    fn fallback(&mut self) -> bool {
        let Some(j) = &self.joined else { return false };
        let open = self.links.open_count() > 0;
        if !open && !self.origin.in_order() {
            let from = j.peer.next_play().unwrap_or(j.live_edge);
            self.origin.start_in_order(from, j.live_edge);
            if self.opts.p2p {
                self.emit(json!({"type": "origin_fallback", "active": true, "from": from}));
            }
            return true;
        }
        if open && self.origin.in_order() {
            self.origin.stop_in_order();
            self.emit(json!({"type": "origin_fallback", "active": false}));
        }
        false
    }

    /// The stats object, as JSON text.
    pub(crate) fn stats_json(&self) -> String {
        let s = self.peer_stats();
        let play = &self.play;
        let (sent_blocks, sent_control, received) = self.links.messages();
        let messages = json!({
            "sent_blocks": sent_blocks, "sent_control": sent_control, "received": received,
        });
        json!({
            "bytes_from_peers": s.bytes_from_peers,
            "bytes_from_origin": s.bytes_from_origin + play.init_bytes(),
            "bytes_uploaded": s.bytes_uploaded,
            "messages": messages,
            "peers": self.links.open_count(),
            "links": self.links.len(),
            "clubs": self.joined.as_ref().map_or(0, |j| j.peer.clubs().len()),
            "latency_ms": play.latency_ms(),
            "edge_latency_ms": play.edge_latency_ms(),
            "buffer_ms": play.buffer_ms(),
            "stalls": play.stalls(),
            "stall_ms": play.stall_ms(perf_now()),
            "publisher_connected": play.publisher_connected(),
            "publisher_wait_ms": play.publisher_wait_ms(perf_now()),
            "startup_ms": play.startup_ms(self.created_ms),
            "page_startup_ms": play.first_frame_at(),
            "startup_trace": play.startup_trace(self.created_ms),
            "blocks_rejected": s.blocks_rejected,
            "blocks_skipped": s.blocks_skipped,
            "dup_bytes": s.dup_bytes,
            "control_bytes_sent": s.control_bytes_sent,
            "wants_sent": s.wants_sent,
            "slow_sources": s.slow_sources,
            "pushes_late": s.pushes_late,
            "races_yielded": s.races_yielded,
            "gap_fills": s.gap_fills,
            "origin_fetches": self.origin.fetches(),
            "origin_failures": self.origin.failures(),
            "granted_bits": self.joined.as_ref().map_or(0, |j| j.granted_bits),
            "block_delay_ms": self.block_delay_ms.map(f64::round),
            "clock_offset_ms": self.clock.offset_ms().round(),
            "rtt_ms": self.clock.rtt_ms(),
            "playback_rate": play.rate(),
            "jumps": play.jumps(),
            "autoplay": play.autoplay(),
            "paused_drops": play.paused_drops(),
            "nudges": play.nudges(),
            "current_time": play.current_time(),
            "peer_id": self.joined.as_ref().map(|j| j.peer_id),
            "signaling": self.socket.is_some(),
            "rejoins": self.rejoins,
            "live_edge": self.joined.as_ref().map(|j| j.live_edge),
            "edge_probes": self.joined.as_ref().map_or(0, |j| j.edge_probes),
            "upload_probe": self.probed.stats(),
            "next_play": self.joined.as_ref().and_then(|j| j.peer.next_play()),
            "p2p": self.opts.p2p,
            "origin_fallback": self.opts.p2p && self.origin.in_order(),
            "test_corrupt": self.joined.as_ref().is_some_and(|j| j.corrupt),
            "error": self.failed,
        })
        .to_string()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.core_timer.cancel();
        self.tick_timer.cancel();
        self.probe_timer.cancel();
        self.reconnect_timer.cancel();
        self.origin.abort_all();
        self.links.close_all();
    }
}

/// Where a rejoin whose playback needs block `next` starts, given the
/// welcome's `live_edge`, `start_seq` and `first_seq`: at `next`, so nothing
/// is skipped, unless that block is gone (before `first_seq`: a restarted
/// server, or away longer than the origin keeps blocks); then where a new
/// viewer would, `start_seq`. An error (the message) for a stream whose
/// numbering began again: its live edge more than
/// [`RESTART_MARGIN_BLOCKS`] behind `next`.
pub(crate) fn rejoin_start(
    next: u64,
    live_edge: u64,
    start_seq: u64,
    first_seq: Option<u64>,
) -> Result<u64, String> {
    if next > live_edge.saturating_add(RESTART_MARGIN_BLOCKS) {
        return Err(format!(
            "the stream restarted (its live edge is {live_edge}, playback was at {next}); \
             reload the player"
        ));
    }
    if first_seq.is_some_and(|first| next < first) {
        Ok(start_seq)
    } else {
        Ok(next)
    }
}

/// Wait before reconnection attempt `attempts` (0 first), ms: [`RECONNECT_MS`]
/// doubling up to [`MAX_RECONNECT_MS`], scaled by 0.75 to 1.25 with `unit` (a
/// random draw in [0, 1)), so that viewers dropped together (a server restart)
/// do not all come back in the same instant.
pub(crate) fn reconnect_delay_ms(attempts: u32, unit: f64) -> u64 {
    let base = (RECONNECT_MS << attempts.min(8)).min(MAX_RECONNECT_MS);
    let unit = if unit.is_nan() {
        0.5
    } else {
        unit.clamp(0.0, 1.0)
    };
    (base as f64 * (0.75 + 0.5 * unit)) as u64
}

/// `performance.now()`, ms.
pub(crate) fn perf_now() -> f64 {
    timer::now().as_secs_f64() * 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconnect_waits_double_to_a_cap_and_are_jittered() {
        assert_eq!(reconnect_delay_ms(0, 0.5), RECONNECT_MS);
        assert_eq!(reconnect_delay_ms(0, 0.0), RECONNECT_MS * 3 / 4);
        assert_eq!(reconnect_delay_ms(0, 1.0), RECONNECT_MS * 5 / 4);
        assert_eq!(reconnect_delay_ms(1, 0.5), 2 * RECONNECT_MS);
        assert_eq!(reconnect_delay_ms(3, 0.5), 8 * RECONNECT_MS);
        for attempts in [5, 6, 50, u32::MAX] {
            assert_eq!(reconnect_delay_ms(attempts, 0.5), MAX_RECONNECT_MS);
            assert!(reconnect_delay_ms(attempts, 0.999) < MAX_RECONNECT_MS * 5 / 4);
        }
        // A draw out of range is clamped.
        assert_eq!(reconnect_delay_ms(0, -3.0), RECONNECT_MS * 3 / 4);
        assert_eq!(reconnect_delay_ms(0, 7.0), RECONNECT_MS * 5 / 4);
        assert_eq!(reconnect_delay_ms(0, f64::NAN), RECONNECT_MS);
    }

    #[test]
    fn a_rejoin_goes_on_unless_its_next_block_is_gone() {
        // The usual rejoin: the block needed next is still to be had.
        assert_eq!(rejoin_start(400, 410, 380, Some(100)), Ok(400));
        // An older server says nothing of what it keeps.
        assert_eq!(rejoin_start(400, 410, 380, None), Ok(400));
        // A restarted server that resumed the stream at 443, nothing stored yet.
        assert_eq!(rejoin_start(443, 442, 443, Some(443)), Ok(443));
        // ... and the blocks 420-442 held only by the old process: skipped.
        assert_eq!(rejoin_start(420, 442, 443, Some(443)), Ok(443));
        // Away longer than the origin keeps blocks.
        assert_eq!(rejoin_start(50, 5000, 4950, Some(2000)), Ok(4950));
        // A stream numbered from 0 again (its data dir lost).
        let err = rejoin_start(412, 0, 0, Some(0)).unwrap_err();
        assert!(err.contains("restarted"), "{err}");
        assert_eq!(
            rejoin_start(256, 0, 0, Some(0)),
            Ok(256),
            "within the margin"
        );
    }

    #[test]
    fn options_carry_the_stated_upload_and_refuse_a_bad_one() {
        let o: Options =
            serde_json::from_str(r#"{"stream":"demo","upload_kbps":3000}"#).expect("valid");
        assert_eq!(o.upload_kbps, Some(3000));
        assert!(o.p2p);
        let o: Options = serde_json::from_str(r#"{"stream":"demo"}"#).expect("valid");
        assert_eq!(o.upload_kbps, None);
        for bad in [
            r#"{"upload_kbps":-1}"#,
            r#"{"upload_kbps":"lots"}"#,
            r#"{"upload_kbps":1.5}"#,
            r#"{"upload_kbps":5000000000}"#,
        ] {
            assert!(serde_json::from_str::<Options>(bad).is_err(), "{bad}");
        }
    }
}
