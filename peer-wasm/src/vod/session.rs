//! The driver of one `VodPlayer`: fetches, checks and appends, follows the
//! viewer's seeks, and reports playback.
//!
//! Stages: manifest, then init, then blocks. Blocks come from two sources,
//! planned by the [`VodSwarm`] core: the origin over HTTP (runs of
//! `/blocks`, one in flight at a time) and, unless `p2p: false`, neighbours
//! watching the same upload ([`super::p2p`]). The core starts on HTTP and
//! stops the HTTP transfer once the swarm alone keeps up (the switch-over,
//! a `source` event); the origin then only fills blocks about to be due.
//! Whole fragments the core holds are appended in order, while less than
//! [`FETCH_BELOW_QUEUED_BYTES`] wait for the source buffer. A fetch that fails
//! for the network, a 5xx or a 429 is retried after [`RETRY_MS`], doubling up
//! to [`MAX_RETRY_MS`], at most [`MAX_RETRIES`] times in a row; a 404 or
//! another 4xx, a bad manifest, init or block ends the session with an
//! `error` event (what is buffered still plays; nothing unchecked is
//! appended).
//!
//! The origin may meter runs (bids and grants, see [`super::p2p`]): a run
//! then carries the grant token, and may come back cut at the grant (the
//! blocks it has are kept; the next run waits for the next grant or the
//! interval's end). A run refused with 429 waits for the next grant or the
//! `Retry-After`, whichever is first, and is not counted as a failure (a
//! 429 for the manifest or init is retried as above); a 401 for a token the
//! origin no longer knows sends runs without one until the next welcome.
//!
//! Seeks: each fetch carries the seek epoch it was made in; a seek that
//! moves the cursor starts a new epoch, so what the old position's fetch
//! brings is dropped (and the fetch aborted). The cursor stays where it is
//! when the media from the seek target up to the cursor is buffered.
//!
//! The buffer stays bounded: the sink trims what is over
//! [`KEEP_BEHIND_SECS`](crate::mse::KEEP_BEHIND_SECS) behind the playhead,
//! the cursor fetches at most `ahead_s` ahead, and a seek removes what lies
//! more than [`FAR_AHEAD_SLACK_S`] past that from its target.

use core::ops::Range;
use std::rc::{Rc, Weak};
use std::time::Duration;

use bytes::Bytes;
use clubcast_protocol::block::StreamKey;
use clubcast_protocol::signal::PeerId;
use clubcast_protocol::vod::swarm::{Action, SwarmConfig, VodSwarm};
use clubcast_protocol::vod::{Manifest, SignedManifest, VodCursor};
use serde_json::{json, Value};
use web_sys::HtmlMediaElement;

use super::p2p::P2p;
use super::{accept_run, PlayError, VodOptions};
use crate::fetch::{fetch_bytes, Abort, FetchError, Fetched};
use crate::mse::{MseError, MseEvent, MseSink, MAX_QUEUED_BYTES};
use crate::player::{deliver, start_playing, Driver, Hub};
use crate::playout::{self, parse_init, Stalls};
use crate::rtc::LinkEvent;
use crate::session::perf_now;
use crate::timer::Timer;
use crate::video::{media_error_message, VideoEvent, VideoEvents};
use crate::ws::WsEvent;

/// Period of the housekeeping tick (fetch planning, stalls, gaps), ms.
pub const TICK_MS: u64 = 250;
/// First wait before a failed fetch is retried, ms.
pub const RETRY_MS: u64 = 500;
/// Longest wait between retries, ms.
pub const MAX_RETRY_MS: u64 = 8_000;
/// Failed attempts in a row after which a fetch is given up.
pub const MAX_RETRIES: u32 = 6;
/// A run is fetched only while fewer bytes than this wait to be appended.
pub const FETCH_BELOW_QUEUED_BYTES: usize = MAX_QUEUED_BYTES / 2;
/// After a seek, media this far past `ahead_s` from the target is removed, s.
pub const FAR_AHEAD_SLACK_S: f64 = 10.0;
/// The cursor counts as reached by the buffered media within this, s.
pub const SEEK_SLACK_S: f64 = 0.5;
/// The playhead not moving this long (playing, not seeking) is a stall, ms.
pub const STALL_DETECT_MS: f64 = 600.0;
/// Stuck this long in a hole of the buffered media, the playhead jumps it, ms.
pub const GAP_WAIT_MS: f64 = 300.0;
/// Largest hole jumped, s (the first fragment may start a little after 0).
pub const MAX_GAP_JUMP_S: f64 = 1.0;
/// A start refused for a reason other than the autoplay policy is tried
/// again after this, ms.
pub const PLAY_RETRY_MS: f64 = 1_000.0;

/// What is being fetched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stage {
    Manifest,
    Init,
    Run,
}

impl Stage {
    fn what(self) -> &'static str {
        match self {
            Stage::Manifest => "manifest",
            Stage::Init => "init segment",
            Stage::Run => "blocks",
        }
    }
}

/// The swarm core's block store, bytes: at 8 Mbit/s, about a minute of media.
pub const STORE_BYTES: usize = 64 << 20;
/// The core plans (a scan of the fetch window) at most this often on
/// arriving frames, ms; the tick, an origin answer and a seek plan at once.
/// A neighbour's blocks arrive hundreds a second, and each replan scans
/// thousands of blocks; with 32 wants per neighbour this still asks for
/// 640 blocks a second of each.
pub const PLAN_EVERY_MS: u64 = 50;

/// Everything a callback can report.
pub(crate) enum Input {
    Manifest(Result<Fetched, FetchError>),
    Init(Result<Fetched, FetchError>),
    Run {
        epoch: u64,
        run: Range<u64>,
        /// Whether it carried a grant token.
        metered: bool,
        result: Result<Fetched, FetchError>,
    },
    Mse(MseEvent),
    Video(VideoEvent),
    /// The browser refused `video.play()` (`NotAllowedError`).
    PlayRefused,
    Retry(Stage),
    Tick,
    /// The signaling socket.
    Ws(WsEvent),
    /// A neighbour's link.
    Link {
        peer: PeerId,
        gen: u64,
        event: LinkEvent,
    },
    Heartbeat,
    Reconnect,
    /// The bid interval ([`super::p2p::P2p::on_bid`]).
    Bid,
    /// A plan put off by [`PLAN_EVERY_MS`] is due.
    Plan,
}

/// The driver state of one `VodPlayer`.
pub(crate) struct VodSession {
    weak: Weak<Hub<VodSession>>,
    video: HtmlMediaElement,
    opts: VodOptions,
    /// The server's HTTP base.
    server: String,
    /// `<server>/vod/<name>`.
    base: String,
    /// `performance.now()` when the player was constructed.
    created_ms: f64,
    manifest: Option<SignedManifest>,
    mse: Option<MseSink>,
    cursor: VodCursor,
    /// The block store and planner, from the manifest on.
    core: Option<VodSwarm<StreamKey>>,
    /// The swarm side, from the manifest on unless `p2p: false`.
    p2p: Option<P2p>,
    /// When the core last planned ([`PLAN_EVERY_MS`]).
    planned_ms: u64,
    /// A plan put off by [`PLAN_EVERY_MS`].
    plan_timer: Timer,
    /// Seek epoch: results of fetches made in an older one are dropped.
    epoch: u64,
    /// The run being fetched, and its abort handle.
    inflight: Option<(Range<u64>, Rc<Abort>)>,
    /// Checked media the sink's queue had no room for.
    held: Option<Vec<u8>>,
    attempts: u32,
    retry_timer: Timer,
    tick_timer: Timer,
    _video_events: Option<VideoEvents>,
    /// `endOfStream` was asked for (since the last reopen).
    eos: bool,
    ended: bool,
    first_frame: Option<f64>,
    last_play_call: f64,
    last_time: f64,
    last_advance: f64,
    stalls: Stalls,
    buffer_ms: f64,
    autoplay: Option<&'static str>,
    init_bytes: u64,
    runs: u64,
    failures: u64,
    seeks: u64,
    refetches: u64,
    gaps: u64,
    failed: Option<&'static str>,
}

impl Driver for VodSession {
    type Input = Input;

    fn handle(&mut self, input: Input) {
        match input {
            Input::Manifest(r) => self.on_manifest(r),
            Input::Init(r) => self.on_init(r),
            Input::Run {
                epoch,
                run,
                metered,
                result,
            } => self.on_run(epoch, run, metered, result),
            Input::Mse(e) => self.on_mse(e),
            Input::Video(e) => self.on_video(e),
            Input::PlayRefused => self.on_play_refused(),
            Input::Retry(stage) => self.fetch(stage),
            Input::Tick => self.tick(),
            Input::Ws(e) => {
                let now = perf_now();
                if let (Some(p2p), Some(core)) = (&mut self.p2p, &mut self.core) {
                    p2p.on_ws(e, core, now);
                }
                self.pump();
            }
            Input::Link { peer, gen, event } => {
                let now = perf_now();
                if let (Some(p2p), Some(core)) = (&mut self.p2p, &mut self.core) {
                    p2p.on_link(peer, gen, event, core, now);
                }
                self.pump_lazily();
            }
            Input::Plan => self.pump(),
            Input::Heartbeat => {
                if let Some(p2p) = &mut self.p2p {
                    p2p.on_heartbeat();
                }
            }
            Input::Reconnect => {
                if let Some(p2p) = &mut self.p2p {
                    p2p.on_reconnect();
                }
            }
            Input::Bid => {
                if let (Some(p2p), Some(core)) = (&mut self.p2p, &self.core) {
                    p2p.on_bid(core);
                }
            }
        }
    }

    fn settle(&mut self) {}

    fn stats_json(&self) -> String {
        let now = perf_now();
        let m = self.manifest.as_ref().map(SignedManifest::manifest);
        let sw = self.core.as_ref().map(VodSwarm::stats).unwrap_or_default();
        let mut stats = json!({
            "bytes_from_peers": sw.bytes_from_peers,
            // The init segment and the runs that verified (the core counts those).
            "bytes_from_origin": self.init_bytes + sw.bytes_from_origin,
            "bytes_uploaded": sw.bytes_uploaded,
            "peers": sw.peers,
            "clubs": 0,
            "latency_ms": null,
            "edge_latency_ms": null,
            "buffer_ms": self.buffer_ms.round(),
            "stalls": self.stalls.count(),
            "stall_ms": self.stalls.stall_ms(now).round(),
            "publisher_wait_ms": 0,
            "publisher_connected": true,
            "startup_ms": self.first_frame.map(|f| (f - self.created_ms).round()),
            "position_s": self.video.current_time(),
            "duration_s": m.map(|m| m.duration_s()),
            "vod": self.opts.name,
            "key": m.map(|m| m.key.to_id()),
            "asset_bytes": m.map(|m| m.bytes),
            "init_bytes": self.init_bytes,
            "blocks": m.map(|m| m.blocks),
            "blocks_fetched": sw.blocks_from_origin,
            "blocks_from_peers": sw.blocks_from_peers,
            "blocks_uploaded": sw.blocks_uploaded,
            "mode": sw.mode.as_str(),
            "switches": sw.switches,
            "grants": sw.grants,
            "bits_granted": sw.bits_granted,
            "origin_refused": sw.http_refused,
            "wants_sent": sw.wants_sent,
            "wants_timed_out": sw.wants_timed_out,
            "dont_haves": sw.dont_haves,
            "duplicates": sw.duplicates,
            "bad_blocks": sw.bad_blocks,
            "store_bytes": sw.store_bytes,
            "next_block": self.cursor.next(),
            "origin_fetches": self.runs,
            "origin_failures": self.failures,
            "seeks": self.seeks,
            "refetches": self.refetches,
            "gaps": self.gaps,
            "ended": self.ended,
            "autoplay": self.autoplay,
            "current_time": self.video.current_time(),
            "p2p": self.opts.p2p,
            "error": self.failed,
        });
        if let (Some(p2p), Some(obj)) = (&self.p2p, stats.as_object_mut()) {
            if let Some(more) = p2p.stats().as_object() {
                obj.extend(more.clone());
            }
        }
        stats.to_string()
    }
}

impl VodSession {
    /// Listens on `video`, starts the tick and fetches the manifest.
    pub(crate) fn start(
        weak: Weak<Hub<VodSession>>,
        video: HtmlMediaElement,
        opts: VodOptions,
    ) -> Result<VodSession, PlayError> {
        if crate::mse::media_source_class().is_none() {
            return Err(PlayError::NoMediaSource);
        }
        let server = opts
            .server
            .clone()
            .or_else(|| web_sys::window().and_then(|w| w.location().origin().ok()))
            .unwrap_or_default();
        let base = format!("{server}/vod/{}", opts.name);
        let w = weak.clone();
        let events = VideoEvents::attach_kinds(&video, &VideoEvent::ON_DEMAND, move |e| {
            deliver(&w, Input::Video(e));
        })
        .map_err(|e| PlayError::Media(e.to_string()))?;
        // The start is ours, once media is there.
        video.set_autoplay(false);
        let now = perf_now();
        let mut s = VodSession {
            weak,
            video,
            opts,
            server,
            base,
            created_ms: now,
            manifest: None,
            mse: None,
            cursor: VodCursor::new(),
            core: None,
            p2p: None,
            planned_ms: 0,
            plan_timer: Timer::new(),
            epoch: 0,
            inflight: None,
            held: None,
            attempts: 0,
            retry_timer: Timer::new(),
            tick_timer: Timer::new(),
            _video_events: Some(events),
            eos: false,
            ended: false,
            first_frame: None,
            last_play_call: f64::NEG_INFINITY,
            last_time: 0.0,
            last_advance: now,
            stalls: Stalls::default(),
            buffer_ms: 0.0,
            autoplay: None,
            init_bytes: 0,
            runs: 0,
            failures: 0,
            seeks: 0,
            refetches: 0,
            gaps: 0,
            failed: None,
        };
        s.fetch(Stage::Manifest);
        s.arm_tick();
        Ok(s)
    }

    fn emit(&self, event: Value) {
        if let Some(shared) = self.weak.upgrade() {
            shared.emit(event);
        }
    }

    /// Ends the session's fetching with an `error` event; what is buffered
    /// still plays.
    fn fail(&mut self, e: PlayError) {
        if self.failed.is_some() {
            return;
        }
        let code = e.code();
        self.failed = Some(code);
        self.abort_inflight();
        self.held = None;
        self.retry_timer.cancel();
        if let Some(p2p) = &mut self.p2p {
            p2p.close();
        }
        web_sys::console::warn_1(&format!("clubcast: {e}").into());
        self.emit(json!({"type": "error", "code": code, "message": e.to_string()}));
    }

    fn arm_tick(&mut self) {
        let weak = self.weak.clone();
        let _ = self
            .tick_timer
            .set(Duration::from_millis(TICK_MS), move || {
                deliver(&weak, Input::Tick)
            });
    }

    /// Starts the fetch of `stage` (a run: the next one due, if any).
    fn fetch(&mut self, stage: Stage) {
        if self.failed.is_some() {
            return;
        }
        let weak = self.weak.clone();
        match stage {
            Stage::Manifest => {
                let url = format!("{}/manifest", self.base);
                wasm_bindgen_futures::spawn_local(async move {
                    let r = fetch_bytes(&url, &[], None).await;
                    deliver(&weak, Input::Manifest(r));
                });
            }
            Stage::Init => {
                let url = format!("{}/init", self.base);
                wasm_bindgen_futures::spawn_local(async move {
                    let r = fetch_bytes(&url, &[], None).await;
                    deliver(&weak, Input::Init(r));
                });
            }
            Stage::Run => self.pump(),
        }
    }

    fn on_manifest(&mut self, r: Result<Fetched, FetchError>) {
        let fetched = match r {
            Ok(f) => f,
            Err(e) => {
                self.fetch_failed(Stage::Manifest, e);
                return;
            }
        };
        self.attempts = 0;
        let text = String::from_utf8_lossy(&fetched.bytes);
        let signed = match SignedManifest::from_json(&text) {
            Ok(s) => s,
            Err(e) => return self.fail(e.into()),
        };
        let m = signed.manifest();
        if let Some(pinned) = self.opts.key.filter(|k| *k != m.key) {
            return self.fail(PlayError::WrongKey {
                pinned: pinned.to_id(),
                got: m.key.to_id(),
            });
        }
        self.emit(json!({
            "type": "manifest", "name": m.name, "key": m.key.to_id(),
            "duration_s": m.duration_s(), "blocks": m.blocks, "bytes": m.bytes,
            "fragments": m.fragments.len(),
        }));
        let cfg = SwarmConfig {
            max_store_bytes: STORE_BYTES,
            ..SwarmConfig::default()
        };
        self.core = Some(VodSwarm::new(m, m.key, cfg));
        if self.opts.p2p {
            self.p2p = Some(P2p::start(
                self.weak.clone(),
                &self.server,
                &self.opts.name,
                &m.key,
                self.opts.ice_servers.clone(),
            ));
        }
        self.manifest = Some(signed);
        self.fetch(Stage::Init);
    }

    fn on_init(&mut self, r: Result<Fetched, FetchError>) {
        let fetched = match r {
            Ok(f) => f,
            Err(e) => {
                self.fetch_failed(Stage::Init, e);
                return;
            }
        };
        self.attempts = 0;
        let Some(signed) = &self.manifest else { return };
        if let Err(e) = signed.verify_init(&fetched.bytes) {
            return self.fail(e.into());
        }
        let info = match parse_init(&fetched.bytes) {
            Ok(i) => i,
            Err(e) => return self.fail(e.into()),
        };
        let weak = self.weak.clone();
        let sink = MseSink::attach(&self.video, &info.mime, move |e| {
            deliver(&weak, Input::Mse(e));
        });
        let sink = match sink {
            Ok(s) => s,
            Err(MseError::NoMediaSource) => return self.fail(PlayError::NoMediaSource),
            Err(e) => return self.fail(PlayError::Mse(e)),
        };
        self.init_bytes = fetched.bytes.len() as u64;
        // The whole asset's length, so that a seek past what is buffered
        // goes there rather than to the end of the buffer.
        let end = signed.manifest().start_s() + signed.manifest().duration_s();
        let queued = sink
            .append(fetched.bytes)
            .and_then(|()| sink.set_duration(end));
        if let Err(e) = queued {
            return self.fail(PlayError::Mse(e));
        }
        self.mse = Some(sink);
        self.play_now();
        self.pump();
    }

    /// Appends the whole fragments the core holds, in order, while the
    /// sink has room; at the end, asks for the end of the stream. Then lets
    /// the core plan (wants, the origin fetch, the switch-over) and carries
    /// out what it asks.
    fn pump(&mut self) {
        if self.failed.is_some() {
            return;
        }
        let t = self.video.current_time();
        while self.held.is_none() {
            let (Some(signed), Some(mse), Some(core)) = (&self.manifest, &self.mse, &self.core)
            else {
                return;
            };
            let m = signed.manifest();
            if self.cursor.done(m) {
                if !self.eos {
                    self.eos = true;
                    if let Err(e) = mse.end_of_stream() {
                        return self.fail(PlayError::Mse(e));
                    }
                }
                break;
            }
            if mse.queued_bytes() >= FETCH_BELOW_QUEUED_BYTES {
                break;
            }
            let Some(run) = self.cursor.next_run(m, t, self.opts.ahead_s) else {
                break;
            };
            let held = core.held_to(run.start, run.end);
            let Some(run) = held_part(m, run, held) else {
                break;
            };
            let Some(media) = core.payloads(run.clone()) else {
                break;
            };
            self.cursor.fetched(run);
            self.held = Some(media);
            self.release();
        }
        let Some(core) = &mut self.core else { return };
        let now = now_ms();
        self.planned_ms = now;
        core.tick(now, self.cursor.next(), t, self.opts.ahead_s);
        self.carry_out();
    }

    /// [`Self::pump`], unless the core planned less than [`PLAN_EVERY_MS`]
    /// ago: then only what it asked for since (answers to neighbours).
    fn pump_lazily(&mut self) {
        let since = now_ms().saturating_sub(self.planned_ms);
        if since >= PLAN_EVERY_MS {
            return self.pump();
        }
        self.carry_out();
        if !self.plan_timer.is_pending() {
            let weak = self.weak.clone();
            let wait = Duration::from_millis(PLAN_EVERY_MS - since);
            let _ = self
                .plan_timer
                .set(wait, move || deliver(&weak, Input::Plan));
        }
    }

    /// Does what the core asked for.
    fn carry_out(&mut self) {
        let Some(core) = &mut self.core else { return };
        let actions: Vec<Action> = std::iter::from_fn(|| core.poll()).collect();
        for action in actions {
            match action {
                Action::Send { peer, frame } => {
                    if let Some(p2p) = &mut self.p2p {
                        p2p.send_frame(peer, &frame);
                    }
                }
                Action::Fetch(run) => self.fetch_run(run),
                Action::Switch {
                    mode,
                    reason,
                    swarm_bytes,
                    http_bytes,
                } => {
                    web_sys::console::info_1(
                        &format!(
                            "clubcast: source {} ({}: {swarm_bytes} B from peers, \
                             {http_bytes} B from the origin in the window)",
                            mode.as_str(),
                            reason.as_str()
                        )
                        .into(),
                    );
                    self.emit(json!({
                        "type": "source", "mode": mode.as_str(), "reason": reason.as_str(),
                        "swarm_bytes": swarm_bytes, "http_bytes": http_bytes,
                        "current_time": self.video.current_time(),
                    }));
                }
                Action::Drop { peer, reason } => {
                    if let Some(p2p) = &mut self.p2p {
                        p2p.drop_peer(peer, reason);
                    }
                }
            }
        }
    }

    /// Fetches `run` from the origin.
    fn fetch_run(&mut self, run: Range<u64>) {
        let key = self.manifest.as_ref().map(|m| m.manifest().key.to_id());
        let (Ok(abort), Some(key)) = (Abort::new(), key) else {
            if let Some(core) = &mut self.core {
                core.http_failed(run, now_ms() + RETRY_MS);
            }
            return;
        };
        let count = run.end - run.start;
        // The upload it verified: a replaced asset answers 409, not blocks
        // under another key.
        let url = format!(
            "{}/blocks?from={}&count={count}&key={key}",
            self.base, run.start
        );
        // Metered by the origin when the swarm side holds a grant token.
        let auth = self
            .p2p
            .as_ref()
            .and_then(|p| p.grant_token())
            .map(|t| format!("Bearer {t}"));
        // A seek cancels the transfer through the handle kept in `inflight`.
        let abort = Rc::new(abort);
        let mine = Rc::clone(&abort);
        let weak = self.weak.clone();
        let epoch = self.epoch;
        let asked = run.clone();
        let metered = auth.is_some();
        wasm_bindgen_futures::spawn_local(async move {
            let headers: Vec<(&str, &str)> = auth
                .as_deref()
                .map(|a| ("Authorization", a))
                .into_iter()
                .collect();
            let result = fetch_bytes(&url, &headers, Some(&mine)).await;
            deliver(
                &weak,
                Input::Run {
                    epoch,
                    run: asked,
                    metered,
                    result,
                },
            );
        });
        if let Some((old, abort)) = self.inflight.replace((run, abort)) {
            // The core asks for one fetch at a time; should it not, the
            // older one goes.
            abort.abort();
            if let Some(core) = &mut self.core {
                core.http_failed(old, now_ms());
            }
        }
    }

    /// Cancels the run in flight, if any.
    fn abort_inflight(&mut self) {
        if let Some((run, abort)) = self.inflight.take() {
            abort.abort();
            if let Some(core) = &mut self.core {
                core.http_failed(run, now_ms());
            }
        }
    }

    fn on_run(
        &mut self,
        epoch: u64,
        run: Range<u64>,
        metered: bool,
        result: Result<Fetched, FetchError>,
    ) {
        if epoch != self.epoch || self.failed.is_some() {
            return;
        }
        if self.inflight.as_ref().map(|(r, _)| r) != Some(&run) {
            return;
        }
        self.inflight = None;
        self.runs += 1;
        let fetched = match result {
            Ok(f) => f,
            // Over this interval's grant (or the anonymous budget): the
            // core waits for its next grant or the origin's Retry-After.
            // Metering is not a failure, so no retry is counted.
            Err(FetchError::RateLimited { retry_after }) => {
                let wait = retry_after.map_or(RETRY_MS, |d| d.as_millis() as u64);
                if let Some(core) = &mut self.core {
                    core.http_refused(run, now_ms() + wait.min(MAX_RETRY_MS));
                }
                return;
            }
            // The origin no longer knows the token (the socket that got it
            // closed): again at once, without it, until the next welcome.
            Err(FetchError::Status(401)) if metered => {
                if let Some(p2p) = &mut self.p2p {
                    p2p.forget_token();
                }
                if let Some(core) = &mut self.core {
                    core.http_failed(run, now_ms());
                }
                return;
            }
            Err(e) => {
                let retry_at = self
                    .fetch_failed(Stage::Run, e)
                    .map_or(u64::MAX, |d| now_ms() + d);
                if let Some(core) = &mut self.core {
                    core.http_failed(run, retry_at);
                }
                return;
            }
        };
        self.attempts = 0;
        let bytes = fetched.bytes.len() as u64;
        let (Some(signed), Some(core)) = (&self.manifest, &mut self.core) else {
            return;
        };
        let key = signed.manifest().key;
        let blocks = match accept_run(&key, run.clone(), Bytes::from(fetched.bytes)) {
            Ok(blocks) => blocks,
            Err(e) => return self.fail(e.into()),
        };
        let cut = (blocks.len() as u64) < run.end - run.start;
        let now = now_ms();
        core.http_done(run, blocks, bytes, now);
        // Cut at the grant: this interval's budget is spent.
        let interval = self.p2p.as_ref().map_or(0, |p| p.bid_interval_ms());
        if cut && metered && interval > 0 {
            core.wait_for_grant(now + u64::from(interval));
        }
        self.pump();
    }

    /// Appends the held media once the sink's queue has room for it (it
    /// waits for `Drained` or the next tick otherwise).
    fn release(&mut self) {
        let Some(mse) = &self.mse else { return };
        let Some(len) = self.held.as_ref().map(Vec::len) else {
            return;
        };
        let queued = mse.queued_bytes();
        if queued > 0 && queued + len > MAX_QUEUED_BYTES {
            return;
        }
        let Some(media) = self.held.take() else {
            return;
        };
        let result = mse.append(media);
        match result {
            Ok(()) => {}
            // The queue's segment bound: the bytes are gone, fetch them again.
            Err(MseError::Full) if queued > 0 => self.rewind(),
            Err(e) => self.fail(PlayError::Mse(e)),
        }
    }

    /// What was fetched past the media buffered at the playhead is lost:
    /// the cursor goes back to the end of that media.
    fn rewind(&mut self) {
        let (Some(signed), Some(mse)) = (&self.manifest, &self.mse) else {
            return;
        };
        let t = self.video.current_time();
        let end = covered_to(&mse.buffered(), t);
        self.cursor.seek(signed.manifest(), end);
    }

    /// A fetch of `stage` failed: retried (after the wait returned, ms), or
    /// the end of the session.
    fn fetch_failed(&mut self, stage: Stage, e: FetchError) -> Option<u64> {
        let what = stage.what();
        let retry_after = match &e {
            FetchError::Aborted => return Some(0),
            FetchError::Status(404) => {
                self.fail(PlayError::UnknownAsset(self.opts.name.clone()));
                return None;
            }
            FetchError::Status(409) if stage == Stage::Run => {
                self.fail(PlayError::Replaced(self.opts.name.clone()));
                return None;
            }
            FetchError::Status(status) if *status < 500 => {
                self.fail(PlayError::Http {
                    what,
                    status: *status,
                });
                return None;
            }
            FetchError::RateLimited { retry_after } => *retry_after,
            _ => None,
        };
        self.failures += 1;
        self.attempts += 1;
        if self.attempts > MAX_RETRIES {
            let attempts = self.attempts;
            self.fail(PlayError::Network {
                what,
                source: e,
                attempts,
            });
            return None;
        }
        let delay = retry_after.map_or_else(
            || retry_delay_ms(self.attempts - 1),
            |d| (d.as_millis() as u64).min(MAX_RETRY_MS),
        );
        self.emit(json!({
            "type": "retry", "what": what, "attempt": self.attempts, "in_ms": delay,
            "message": e.to_string(),
        }));
        let weak = self.weak.clone();
        let _ = self.retry_timer.set(Duration::from_millis(delay), move || {
            deliver(&weak, Input::Retry(stage))
        });
        Some(delay)
    }

    fn on_mse(&mut self, e: MseEvent) {
        match e {
            MseEvent::Error(e) => self.fail(PlayError::Mse(e)),
            MseEvent::Drained => {
                self.release();
                self.pump();
            }
            _ => self.pump(),
        }
    }

    fn on_video(&mut self, e: VideoEvent) {
        let now = perf_now();
        match e {
            VideoEvent::Playing => {
                self.last_advance = now;
                if self.first_frame.is_none() {
                    self.first_frame = Some(now);
                    let startup = (now - self.created_ms).round();
                    self.emit(json!({"type": "playing", "startup_ms": startup}));
                } else {
                    self.end_stall(now);
                }
            }
            // A seek fires `waiting` until the frame at the target decodes:
            // no rebuffer; one that lasts is caught by `tick`.
            VideoEvent::Waiting if self.video.seeking() => {}
            VideoEvent::Waiting => self.begin_stall(now),
            VideoEvent::Error => {
                self.fail(PlayError::Media(media_error_message(&self.video)));
            }
            VideoEvent::Seeking => self.on_seeking(),
            VideoEvent::Seeked => {
                let t = self.video.current_time();
                self.last_time = t;
                self.last_advance = now;
                self.emit(json!({"type": "seeked", "current_time": t}));
            }
            VideoEvent::Ended => {
                if !self.ended {
                    self.ended = true;
                    self.end_stall(now);
                    let t = self.video.current_time();
                    self.emit(json!({"type": "ended", "current_time": t}));
                }
            }
        }
    }

    /// The viewer seeks: keep the cursor if the media from the target up to
    /// it is buffered, else move it to the keyframe fragment the target (or
    /// the end of the media buffered from it) needs, dropping what is in
    /// flight for the old position.
    fn on_seeking(&mut self) {
        self.ended = false;
        self.seeks += 1;
        let t = self.video.current_time();
        let Some(signed) = &self.manifest else { return };
        let m = signed.manifest();
        let Some(mse) = &self.mse else {
            // Before the init: start where the viewer is.
            self.cursor.seek(m, t);
            return;
        };
        let ranges = mse.buffered();
        let covered_to = covered_to(&ranges, t);
        let keep = if self.cursor.done(m) {
            let last = m.fragments.last().map_or(0.0, |f| m.seconds(f.media_time));
            covered_to + SEEK_SLACK_S >= last
        } else {
            let next = m.seconds(m.fragments[m.fragment_of(self.cursor.next())].media_time);
            let from = m.seconds(m.fragments[m.seek_fragment(t)].media_time);
            next >= from && next <= covered_to + SEEK_SLACK_S
        };
        if keep {
            return;
        }
        self.cursor.seek(m, covered_to);
        let far = t + self.opts.ahead_s + FAR_AHEAD_SLACK_S;
        let end = ranges.last().map_or(0.0, |&(_, e)| e);
        if self.eos {
            mse.reopen();
        }
        // A run may have ended inside a fragment: what follows starts a new one.
        let queued = mse.reset_parser().and_then(|()| mse.remove(far, end));
        self.eos = false;
        self.refetches += 1;
        self.epoch += 1;
        self.abort_inflight();
        self.held = None;
        if let Err(e) = queued {
            return self.fail(PlayError::Mse(e));
        }
        self.attempts = 0;
        self.retry_timer.cancel();
        self.pump();
    }

    fn begin_stall(&mut self, now: f64) {
        if self.first_frame.is_none() || self.ended || self.video.ended() {
            return;
        }
        self.last_time = self.video.current_time();
        if self.stalls.begin(now).is_some() {
            self.emit(json!({
                "type": "stall", "current_time": self.last_time, "reason": "buffer",
            }));
        }
    }

    fn end_stall(&mut self, now: f64) {
        if let Some((ms, reason)) = self.stalls.end(now) {
            self.emit(json!({
                "type": "resume", "stall_ms": ms.round(), "reason": reason.as_str(),
            }));
        }
    }

    fn play_now(&mut self) {
        self.last_play_call = perf_now();
        // Other rejections than a refusal are retried by `tick`.
        start_playing(&self.video, self.weak.clone(), Input::PlayRefused);
    }

    fn on_play_refused(&mut self) {
        if self.first_frame.is_some() {
            return;
        }
        if self.opts.autoplay_muted && !self.video.muted() {
            self.video.set_muted(true);
            self.autoplay = Some("muted");
            self.play_now();
            self.emit(json!({"type": "autoplay_muted"}));
        } else if self.autoplay != Some("blocked") {
            self.autoplay = Some("blocked");
            self.emit(json!({"type": "autoplay_blocked"}));
        }
    }

    fn tick(&mut self) {
        self.arm_tick();
        let now = perf_now();
        if let (Some(p2p), Some(core)) = (&mut self.p2p, &mut self.core) {
            p2p.tick(core, now);
        }
        self.release();
        self.pump();
        let Some(mse) = &self.mse else { return };
        let ranges = mse.buffered();
        let t = self.video.current_time();
        self.buffer_ms = playout::ahead_of(&ranges, t) * 1000.0;
        let paused = self.video.paused();
        if paused
            && self.first_frame.is_none()
            && self.autoplay != Some("blocked")
            && now - self.last_play_call > PLAY_RETRY_MS
        {
            self.play_now();
        }
        let advancing = (t - self.last_time).abs() > 1e-3 && !self.video.seeking();
        if advancing {
            if t > self.last_time {
                self.last_advance = now;
                if self.first_frame.is_none() {
                    // `playing` did not come (or not yet): the playhead moves.
                    self.first_frame = Some(now);
                    let startup = (now - self.created_ms).round();
                    self.emit(json!({"type": "playing", "startup_ms": startup}));
                }
                self.end_stall(now);
            }
            self.last_time = t;
            return;
        }
        let idle = paused || self.video.seeking() || self.video.ended();
        if idle {
            self.last_advance = now;
            return;
        }
        let stuck_ms = now - self.last_advance;
        if stuck_ms > GAP_WAIT_MS {
            // Before the first frame, any distance: the media may start late.
            let jump = |to: &f64| to - t <= MAX_GAP_JUMP_S || self.first_frame.is_none();
            if let Some(to) = playout::gap_exit(&ranges, t).filter(jump) {
                self.gaps += 1;
                self.video.set_current_time(to);
                self.last_advance = now;
                self.emit(json!({"type": "gap", "from": t, "to": to}));
                return;
            }
        }
        if stuck_ms > STALL_DETECT_MS {
            self.begin_stall(now);
        }
    }
}

impl Drop for VodSession {
    fn drop(&mut self) {
        self.tick_timer.cancel();
        self.retry_timer.cancel();
        self.plan_timer.cancel();
        self.abort_inflight();
        if let Some(p2p) = &mut self.p2p {
            p2p.close();
        }
    }
}

/// What of `run` can be appended when the blocks up to `held` are held:
/// all of it, else its whole fragments that are (`None` if not even the
/// first is). The blocks arrive out of order from neighbours, and a run
/// planned as far as its fragments fit would otherwise wait for its last.
fn held_part(m: &Manifest, run: Range<u64>, held: u64) -> Option<Range<u64>> {
    if held >= run.end {
        return Some(run);
    }
    let boundary = m.fragments[m.fragment_of(held)].seq;
    (boundary > run.start).then_some(run.start..boundary)
}

/// The core's clock: `performance.now()` in whole ms.
fn now_ms() -> u64 {
    perf_now().max(0.0) as u64
}

/// The end of the buffered range that holds `t` (within [`SEEK_SLACK_S`]),
/// or `t` when none does.
fn covered_to(ranges: &[(f64, f64)], t: f64) -> f64 {
    ranges
        .iter()
        .find(|&&(s, e)| s <= t + SEEK_SLACK_S && t < e)
        .map_or(t, |&(_, e)| e)
}

/// Wait before retry `attempt` (0 first), ms: [`RETRY_MS`] doubling up to
/// [`MAX_RETRY_MS`].
pub(crate) fn retry_delay_ms(attempt: u32) -> u64 {
    (RETRY_MS << attempt.min(8)).min(MAX_RETRY_MS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_wait_longer_up_to_a_cap() {
        assert_eq!(retry_delay_ms(0), RETRY_MS);
        assert_eq!(retry_delay_ms(1), 2 * RETRY_MS);
        assert_eq!(retry_delay_ms(MAX_RETRIES), MAX_RETRY_MS);
        assert_eq!(retry_delay_ms(u32::MAX), MAX_RETRY_MS);
    }

    #[test]
    fn only_whole_fragments_held_are_appended() {
        use clubcast_protocol::vod::VodFragment;
        let frag = |seq, t| VodFragment {
            seq,
            media_time: t,
            keyframe: true,
        };
        let m = Manifest {
            name: "a".into(),
            key: clubcast_protocol::block::StreamSigner::from_seed(&[1; 32]).key(),
            created_ms: 0,
            init_sha256: [0; 32],
            init_bytes: 1,
            timescale: 1,
            duration: 3,
            blocks: 30,
            bytes: 30,
            fragments: vec![frag(0, 0), frag(10, 1), frag(20, 2)],
        };
        assert_eq!(held_part(&m, 0..30, 30), Some(0..30));
        assert_eq!(held_part(&m, 0..30, 25), Some(0..20));
        assert_eq!(held_part(&m, 0..30, 10), Some(0..10));
        assert_eq!(held_part(&m, 0..30, 9), None);
        assert_eq!(held_part(&m, 10..30, 12), None);
    }

    #[test]
    fn a_seek_keeps_the_media_buffered_from_its_target() {
        let ranges = [(0.0, 4.0), (10.0, 14.0)];
        assert_eq!(covered_to(&ranges, 2.0), 4.0);
        assert_eq!(covered_to(&ranges, 9.8), 14.0, "just before a range");
        assert_eq!(covered_to(&ranges, 6.0), 6.0, "in a hole: nothing");
        assert_eq!(covered_to(&ranges, 20.0), 20.0);
        assert_eq!(covered_to(&[], 3.0), 3.0);
    }
}
