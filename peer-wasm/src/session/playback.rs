//! Playback: MSE appends in block order, startup, latency steering, stalls.
//!
//! The init segment is fetched once the welcome names it, for the block the
//! player starts at; its `mdhd` gives the timescale of `media_time` and its
//! sample entries the MIME codecs, so the `MediaSource` is attached only then.
//! Blocks played before that wait in a bounded queue ([`MAX_PENDING_BYTES`]).
//! A skip queues a parser reset (`SourceBuffer.abort()`) behind what is
//! already queued; the core resumes at a fragment start. The sink trims the
//! buffer behind the playhead.
//!
//! Another init: a publisher that comes back may bring other settings, and
//! the first block after it is flagged [`BlockFlags::NEW_INIT`]. At such a
//! fragment start, and at the first one after a skip (which may have passed
//! over the flagged block), the player fetches the init in force at that
//! block (`init?seq=`), holds the blocks behind it in the same bounded
//! queue, and appends the init ahead of them (`changeType` if the codecs
//! differ); the same init again is harmless to MSE. An init that does not
//! come within [`INIT_WAIT_MS`] is asked for again if the block is flagged
//! (it cannot play without it), or else given up on: the held blocks play on
//! under the init before.
//!
//! The publisher: while none is connected (the server says so, see
//! `ServerMsg::Publisher`) the live edge stands still, and a player that
//! reaches it waits for the publisher. Such a stall, one that begins while
//! no publisher is connected, is no rebuffer: its events say
//! `"reason": "publisher"`, and it counts in `publisher_wait_ms`, not in
//! `stalls` and `stall_ms`. It lasts until playback moves again, so the wait
//! for the returning publisher's first fragment counts in it too. A rebuffer
//! that is running when the publisher leaves counts as a wait from then on.
//!
//! Paused: a viewer who pauses a live stream keeps receiving it (and
//! relaying it for its clubs). Past [`PAUSED_AHEAD_S`] of media buffered ahead
//! of the paused playhead, blocks are kept out of the source buffer, as after
//! a skip, which would otherwise fill (Chrome's quota is about 150 MB, minutes
//! at a few Mbit/s) and fail every append after. Playback resumed after such
//! a pause goes to the live point as soon as media from there is buffered:
//! a live stream resumes live, as a new viewer would join it.
//!
//! Every tick: start (seek to the target latency inside the buffered backlog
//! and `play()`, once that frame is [`MIN_START_LATENCY_SHARE`] of the target
//! latency old), detect the
//! first frame and stalls (`waiting` outside a seek, or the playhead not moving for
//! [`STALL_DETECT_MS`] while not paused), leave gaps (seek to the next buffered
//! range, or the live point in it), and steer the latency with
//! [`playout::steer`]: a rate within 0.9–1.1, or a jump when far behind.

use std::collections::VecDeque;
use std::rc::Weak;

use clubcast_protocol::block::{BlockFlags, VerifiedBlock};
use serde_json::{json, Value};
use web_sys::HtmlMediaElement;

use crate::fetch::{fetch_bytes, FetchError, Fetched};
use crate::mse::{MseError, MseEvent, MseSink, MIME_H264_AAC};
use crate::player::{deliver, start_playing, Shared};
use crate::playout::{self, Stalls, Steer, Timeline, MIN_BUFFER_TO_SPEED_UP_MS};

use super::startup::{Mark, StartupTrace};
use super::Input;

/// Bytes of played blocks held until the media source is attached.
pub const MAX_PENDING_BYTES: usize = 8 * 1024 * 1024;
/// The playhead not moving this long (while not paused) is a stall, ms.
pub const STALL_DETECT_MS: f64 = 600.0;
/// Stuck this long, the player looks for buffered media past a gap, ms.
pub const GAP_WAIT_MS: f64 = 300.0;
/// Stuck this long with media buffered ahead of the playhead, the player
/// seeks [`NUDGE_S`] forward, ms. Chromium sometimes stops just before a
/// fragment boundary inside a buffered range (`readyState` 2, `buffered`
/// a second and more past the playhead) and stays there until a seek: stalls
/// of 25 to 30 s in about one `just bench-loss` run in five at 5 and 10 %
/// loss, each after the core had skipped blocks.
pub const NUDGE_MS: f64 = 1_000.0;
/// How far a nudge seeks, s. Our fragments start on a keyframe, so the seek
/// decodes again from the one that starts the fragment it lands in.
pub const NUDGE_S: f64 = 0.1;
/// Media buffered ahead of a paused playhead past which blocks are kept
/// out of the source buffer, s: at 30 Mbit/s, about 110 MB.
pub const PAUSED_AHEAD_S: f64 = 30.0;
/// Least time between two latency jumps, ms.
pub const MIN_JUMP_INTERVAL_MS: f64 = 2_000.0;
/// Playback starts once the first buffered frame is at least this share of
/// the target latency old. A fresh stream's only fragment may be a few hundred
/// ms old; started at once, the playhead reaches its end before the next
/// fragment can arrive, and stalls.
pub const MIN_START_LATENCY_SHARE: f64 = 2.0 / 3.0;
/// Longest wait, once media is buffered, for the backlog to reach the target
/// latency position before playback starts wherever it can, ms.
pub const START_WAIT_MS: f64 = 500.0;
/// Longest wait for a later init segment (a publisher came back) before the
/// blocks held for it play on under the init before, ms.
pub const INIT_WAIT_MS: f64 = 2_000.0;
/// Timescale assumed when the init segment cannot be parsed (MPEG-TS clock).
const FALLBACK_TIMESCALE: u32 = 90_000;

/// What waits for an init segment.
enum Pending {
    Block(VerifiedBlock),
    Reset,
}

pub(super) struct Playback {
    weak: Weak<Shared>,
    video: HtmlMediaElement,
    target_ms: f64,
    mse: Option<MseSink>,
    init_bytes: u64,
    /// The init route (`…/init`), once the welcome named it.
    init_url: String,
    /// The block the init appended last was fetched for.
    init_seq: Option<u64>,
    /// An init fetch is running, for this block, since this time (ms), and
    /// whether the block is flagged `NEW_INIT`: blocks wait in `pending`.
    init_asked: Option<(u64, f64, bool)>,
    /// A skip happened: fetch the init again at the next fragment start.
    init_check: bool,
    pending: VecDeque<Pending>,
    pending_bytes: usize,
    reset_due: bool,
    need_fragment_start: bool,
    timeline: Timeline,
    started: bool,
    /// When media was first buffered (`performance.now()`).
    buffered_since: Option<f64>,
    first_frame: Option<f64>,
    last_play_call: f64,
    last_time: f64,
    last_advance: f64,
    stalls: Stalls,
    latency: Option<f64>,
    glass: Option<f64>,
    buffer_ms: f64,
    rate: f64,
    jumps: u32,
    nudges: u32,
    last_jump: f64,
    current_time: f64,
    trace: StartupTrace,
    /// What the browser's autoplay policy did to the start.
    autoplay: Autoplay,
    /// Blocks were kept out of the source buffer while paused
    /// ([`PAUSED_AHEAD_S`]): on resume, playback goes to the live point.
    paused_behind: bool,
    /// Blocks kept out of the source buffer while paused.
    paused_drops: u64,
}

/// How the start went past the browser's autoplay policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Autoplay {
    /// Not refused (yet).
    Allowed,
    /// Refused with sound: the player muted the element to start.
    Muted,
    /// Refused even muted, or muting not wanted: waits for the user.
    Blocked,
}

impl Playback {
    pub(super) fn new(weak: Weak<Shared>, video: HtmlMediaElement) -> Self {
        Playback {
            weak,
            video,
            target_ms: 1500.0,
            mse: None,
            init_bytes: 0,
            init_url: String::new(),
            init_seq: None,
            init_asked: None,
            init_check: false,
            pending: VecDeque::new(),
            pending_bytes: 0,
            reset_due: false,
            need_fragment_start: true,
            timeline: Timeline::new(1),
            started: false,
            buffered_since: None,
            first_frame: None,
            last_play_call: 0.0,
            last_time: 0.0,
            last_advance: 0.0,
            stalls: Stalls::default(),
            latency: None,
            glass: None,
            buffer_ms: 0.0,
            rate: 1.0,
            jumps: 0,
            nudges: 0,
            autoplay: Autoplay::Allowed,
            paused_behind: false,
            paused_drops: 0,
            last_jump: f64::NEG_INFINITY,
            current_time: 0.0,
            trace: StartupTrace::default(),
        }
    }

    /// Records a milestone of the start ([`StartupTrace`]).
    pub(super) fn mark(&mut self, m: Mark, now: f64) {
        self.trace.mark(m, now);
    }
    /// `stats().startup_trace`.
    pub(super) fn startup_trace(&self, created: f64) -> Value {
        self.trace.to_json(created)
    }

    pub(super) fn set_target(&mut self, ms: f64) {
        self.target_ms = ms;
    }

    pub(super) fn init_bytes(&self) -> u64 {
        self.init_bytes
    }
    /// Glass to glass: the server's clock now minus the capture of the frame
    /// shown (see [`playout`]).
    pub(super) fn latency_ms(&self) -> Option<f64> {
        self.glass.map(f64::round)
    }
    /// How far the frame shown is behind the live edge (what is steered).
    pub(super) fn edge_latency_ms(&self) -> Option<f64> {
        self.latency.map(f64::round)
    }
    pub(super) fn buffer_ms(&self) -> f64 {
        self.buffer_ms.round()
    }
    pub(super) fn stalls(&self) -> u32 {
        self.stalls.count()
    }
    pub(super) fn stall_ms(&self, now: f64) -> f64 {
        self.stalls.stall_ms(now).round()
    }
    /// Time spent stalled waiting for a publisher, ms (see the module doc).
    pub(super) fn publisher_wait_ms(&self, now: f64) -> f64 {
        self.stalls.publisher_wait_ms(now).round()
    }
    pub(super) fn publisher_connected(&self) -> bool {
        self.stalls.publisher_connected()
    }

    /// The server says whether a publisher is connected; the `publisher`
    /// event if that changed (see [`Stalls::set_publisher`]).
    pub(super) fn set_publisher(&mut self, connected: bool, now: f64) -> Option<Value> {
        self.stalls
            .set_publisher(connected, now)
            .then(|| json!({"type": "publisher", "connected": connected}))
    }
    pub(super) fn startup_ms(&self, created: f64) -> Option<f64> {
        self.first_frame.map(|f| (f - created).round())
    }
    pub(super) fn first_frame_at(&self) -> Option<f64> {
        self.first_frame.map(f64::round)
    }
    /// Whether playback was started (see [`Playback::tick`]).
    pub(super) fn started(&self) -> bool {
        self.started
    }
    pub(super) fn rate(&self) -> f64 {
        self.rate
    }
    pub(super) fn jumps(&self) -> u32 {
        self.jumps
    }

    /// Seeks past a playhead stuck inside buffered media ([`NUDGE_MS`]).
    pub(super) fn nudges(&self) -> u32 {
        self.nudges
    }
    pub(super) fn current_time(&self) -> f64 {
        self.current_time
    }

    /// Fetches the init segment at `url` (the welcome's) for block `seq`,
    /// where playback starts.
    pub(super) fn fetch_init(&mut self, url: String, seq: u64) {
        self.init_url = url;
        self.request_init(seq, true);
    }

    fn request_init(&mut self, seq: u64, new: bool) {
        self.init_asked = Some((seq, super::perf_now(), new));
        let weak = self.weak.clone();
        let url = format!("{}?seq={seq}", self.init_url);
        wasm_bindgen_futures::spawn_local(async move {
            let result = fetch_bytes(&url, &[], None).await;
            deliver(&weak, Input::Init(seq, result));
        });
    }

    /// The init segment for block `seq` arrived: the first attaches the
    /// `MediaSource`, a later one is appended; then the blocks held for it
    /// play.
    pub(super) fn handle_init(
        &mut self,
        seq: u64,
        result: Result<Fetched, FetchError>,
    ) -> Result<(), (&'static str, String)> {
        if self.init_asked.map(|(s, ..)| s) != Some(seq) {
            // Given up on (see `tick`): the media after it went on under the
            // init before, and this one has no place left to go.
            return Ok(());
        }
        self.init_asked = None;
        if self.mse.is_some() {
            let r = self.append_init(result);
            self.init_seq = Some(seq);
            self.release();
            return r;
        }
        let bytes = result
            .map_err(|e| ("init_fetch", format!("init segment: {e}")))?
            .bytes;
        self.init_seq = Some(seq);
        self.trace.mark(Mark::Init, super::perf_now());
        self.init_bytes = bytes.len() as u64;
        let (info, parsed) = match playout::parse_init(&bytes) {
            Ok(info) => (info, Ok(())),
            Err(e) => (
                playout::InitInfo {
                    timescale: FALLBACK_TIMESCALE,
                    mime: MIME_H264_AAC.to_owned(),
                },
                Err(("bad_init", format!("init segment: {e}"))),
            ),
        };
        self.timeline.set_timescale(info.timescale);
        // The start is ours (see `tick`): the element's own autoplay would
        // start a young fragment the moment it is buffered.
        self.video.set_autoplay(false);
        let weak = self.weak.clone();
        let sink = MseSink::attach(&self.video, &info.mime, move |e| {
            deliver(&weak, Input::Mse(e));
        })
        .map_err(|e| ("mse", e.to_string()))?;
        sink.append(bytes).map_err(|e| ("mse", e.to_string()))?;
        self.mse = Some(sink);
        self.release();
        parsed
    }

    /// Appends a later init segment (see the module docs).
    fn append_init(
        &mut self,
        result: Result<Fetched, FetchError>,
    ) -> Result<(), (&'static str, String)> {
        let bytes = result
            .map_err(|e| ("init_fetch", format!("init segment: {e}")))?
            .bytes;
        self.init_bytes += bytes.len() as u64;
        let info =
            playout::parse_init(&bytes).map_err(|e| ("bad_init", format!("init segment: {e}")))?;
        self.timeline.set_timescale(info.timescale);
        let Some(mse) = &self.mse else {
            return Ok(());
        };
        mse.append_init(bytes, &info.mime)
            .map_err(|e| ("mse", e.to_string()))
    }

    /// Plays the blocks held while an init was fetched.
    fn release(&mut self) {
        self.pending_bytes = 0;
        for p in std::mem::take(&mut self.pending) {
            match p {
                Pending::Block(b) => self.play(b),
                Pending::Reset => self.reset(),
            }
        }
    }

    /// The next block in order, from the core.
    pub(super) fn play(&mut self, block: VerifiedBlock) {
        if self.paused_far_ahead() {
            if !self.paused_behind {
                self.paused_behind = true;
                // What follows resumes at a fragment start, as after a skip.
                self.skip();
            }
            self.need_fragment_start = true;
            self.paused_drops += 1;
            return;
        }
        let h = block.header();
        let fragment_start = h.flags.contains(BlockFlags::FRAGMENT_START);
        if self.need_fragment_start && !fragment_start {
            return;
        }
        self.need_fragment_start = false;
        self.trace.mark(Mark::FirstBlock, super::perf_now());
        let new_init = h.flags.contains(BlockFlags::NEW_INIT) && self.init_seq != Some(h.seq);
        let waiting = self.init_asked.is_some();
        if fragment_start && self.mse.is_some() && !waiting && (new_init || self.init_check) {
            self.init_check = false;
            self.request_init(h.seq, new_init);
        }
        if self.init_asked.is_some() {
            self.hold(Pending::Block(block));
            return;
        }
        if fragment_start {
            self.timeline.note_fragment(h.media_time, h.ingest_time_ms);
        }
        self.push_media(block.payload().to_vec());
    }

    /// Holds `p` until the init segment arrives, within [`MAX_PENDING_BYTES`]:
    /// past it, what is held is dropped and playback resumes at a fragment
    /// start.
    fn hold(&mut self, p: Pending) {
        let len = match &p {
            Pending::Block(b) => b.payload().len(),
            Pending::Reset => 0,
        };
        if self.pending_bytes + len > MAX_PENDING_BYTES {
            self.pending.clear();
            self.pending_bytes = 0;
            self.need_fragment_start = true;
            return;
        }
        self.pending_bytes += len;
        self.pending.push_back(p);
    }

    /// Whether playback is paused (after its first frame: not a start that
    /// autoplay held back) with over [`PAUSED_AHEAD_S`] buffered ahead.
    fn paused_far_ahead(&self) -> bool {
        self.first_frame.is_some()
            && self.video.paused()
            && playout::ahead_of(&self.ranges(), self.video.current_time()) > PAUSED_AHEAD_S
    }

    /// Blocks kept out of the source buffer while paused ([`PAUSED_AHEAD_S`]).
    pub(super) fn paused_drops(&self) -> u64 {
        self.paused_drops
    }

    /// The core skipped missing blocks; what follows starts a fragment.
    pub(super) fn skip(&mut self) {
        self.reset();
        // Before the first init is appended, the start's fetch covers it.
        self.init_check = self.mse.is_some();
    }

    fn reset(&mut self) {
        match &self.mse {
            Some(mse) if self.init_asked.is_none() => {
                if mse.reset_parser().is_err() {
                    self.reset_due = true;
                }
            }
            _ => self.hold(Pending::Reset),
        }
    }

    fn push_media(&mut self, bytes: Vec<u8>) {
        let Some(mse) = &self.mse else {
            return;
        };
        if self.reset_due {
            if mse.reset_parser().is_err() {
                return;
            }
            self.reset_due = false;
        }
        if let Err(MseError::Full) = mse.append(bytes) {
            // A block is lost mid-fragment: resume at the next fragment start.
            self.need_fragment_start = true;
            self.reset_due = true;
        }
    }

    pub(super) fn handle_mse(&mut self, e: MseEvent) -> Option<(&'static str, String)> {
        match e {
            MseEvent::Error(e) => Some(("mse", e.to_string())),
            _ => None,
        }
    }

    pub(super) fn handle_video(
        &mut self,
        e: crate::video::VideoEvent,
        now: f64,
        created: f64,
    ) -> Option<Value> {
        use crate::video::{media_error_message, VideoEvent};
        match e {
            VideoEvent::Playing => {
                if self.first_frame.is_none() {
                    return Some(self.first_frame(now, created));
                }
                self.end_stall(now)
            }
            // A seek (ours at the start or past a gap, or the user's) fires
            // `waiting` until the frame at the new position decodes; that is
            // no rebuffer. One that lasts is caught by the playhead check in
            // `tick`.
            VideoEvent::Waiting if self.video.seeking() => None,
            VideoEvent::Waiting => self.begin_stall(now),
            VideoEvent::Error => {
                let message = media_error_message(&self.video);
                Some(json!({"type": "error", "code": "media", "message": message}))
            }
            // Not listened for by the live player.
            VideoEvent::Seeking | VideoEvent::Seeked | VideoEvent::Ended => None,
        }
    }

    fn first_frame(&mut self, now: f64, created: f64) -> Value {
        self.first_frame = Some(now);
        self.trace.mark(Mark::FirstFrame, now);
        self.last_advance = now;
        json!({"type": "playing", "startup_ms": (now - created).round()})
    }

    fn begin_stall(&mut self, now: f64) -> Option<Value> {
        if self.first_frame.is_none() || self.stalls.stalled() {
            return None;
        }
        // From here on: `waiting` comes after the playhead moved since the
        // last tick, and that move must not end the stall at the next one
        // (every rebuffer counted twice: stall, resume ~50 ms later, stall).
        self.last_time = self.video.current_time();
        let reason = self.stalls.begin(now)?;
        Some(json!({
            "type": "stall", "current_time": self.last_time, "reason": reason.as_str(),
        }))
    }

    fn end_stall(&mut self, now: f64) -> Option<Value> {
        let (ms, reason) = self.stalls.end(now)?;
        Some(json!({"type": "resume", "stall_ms": ms.round(), "reason": reason.as_str()}))
    }

    /// Periodic control; `now` is `performance.now()`, `server_now` the
    /// server's clock (Unix ms). Returns events for JavaScript.
    pub(super) fn tick(&mut self, now: f64, server_now: f64, created: f64) -> Vec<Value> {
        let mut out = Vec::new();
        if let Some((seq, at, new)) = self.init_asked.filter(|_| self.mse.is_some()) {
            if now - at > INIT_WAIT_MS {
                web_sys::console::warn_1(
                    &format!("clubcast: no init segment for block {seq} in {INIT_WAIT_MS} ms")
                        .into(),
                );
                if new {
                    // The block needs another init: without it the decoder
                    // fails. Ask again, the blocks still held (within
                    // MAX_PENDING_BYTES).
                    self.request_init(seq, true);
                } else {
                    // Only a check after a skip: play on under the init
                    // appended, taken as this block's so that playing it
                    // from the queue does not ask again.
                    self.init_asked = None;
                    self.init_seq = Some(seq);
                    self.release();
                }
            }
        }
        let ranges = self.ranges();
        let t = self.video.current_time();
        self.current_time = t;
        if !self.started {
            if let Some(&(start, end)) = ranges.first() {
                self.trace.mark(Mark::Buffered, now);
                // The backlog starts a fragment or so further back than the
                // target: start inside it at the target, with half a second
                // of media ahead at least.
                let ahead = MIN_BUFFER_TO_SPEED_UP_MS / 1000.0;
                let want = self.timeline.time_of(server_now - self.target_ms);
                let buffered_since = *self.buffered_since.get_or_insert(now);
                if want.is_some_and(|w| w + ahead > end) && now - buffered_since < START_WAIT_MS {
                    // The rest of the backlog is on its way over HTTP.
                    return out;
                }
                let at = want.map_or(start, |x| x.clamp(start, (end - ahead).max(start)));
                let young = self
                    .timeline
                    .ingest_at(at)
                    .is_some_and(|ing| server_now - ing < MIN_START_LATENCY_SHARE * self.target_ms);
                if young {
                    return out;
                }
                if !(start..end).contains(&t) || (at - t).abs() > 0.05 {
                    self.video.set_current_time(at);
                }
                self.play_now(now);
                self.trace.mark(Mark::Play, now);
                self.started = true;
                self.last_time = at;
                self.last_advance = now;
            }
            return out;
        }
        let paused = self.video.paused();
        if paused && self.first_frame.is_none() && now - self.last_play_call > 1000.0 {
            // Autoplay may be refused until media is there; ask again.
            self.play_now(now);
        }
        if self.paused_behind && !paused {
            if let Some(jump) = self.resume_live(&ranges, t, now, server_now) {
                // The playhead moved: what follows reads it next tick.
                out.push(jump);
                return out;
            }
        }
        let advancing = t > self.last_time + 1e-3;
        if advancing {
            self.last_time = t;
            self.last_advance = now;
            if self.first_frame.is_none() {
                out.push(self.first_frame(now, created));
            }
            out.extend(self.end_stall(now));
        } else if t < self.last_time {
            // A seek back (ours or the user's).
            self.last_time = t;
        }
        let stuck = !paused && !advancing && now - self.last_advance > GAP_WAIT_MS;
        if stuck && now - self.last_advance > STALL_DETECT_MS {
            out.extend(self.begin_stall(now));
        }
        if stuck && now - self.last_advance > NUDGE_MS {
            if let Some(to) = playout::nudge(&ranges, t, NUDGE_S) {
                self.video.set_current_time(to);
                self.last_advance = now;
                self.nudges += 1;
                out.push(json!({"type": "nudge", "from": t, "to": to}));
            }
        }
        if stuck {
            if let Some(to) = playout::gap_exit(&ranges, t) {
                let end = ranges.last().map_or(to, |r| r.1);
                let live = self.live_point(to, end, server_now);
                self.video.set_current_time(live);
                self.last_advance = now;
                out.push(json!({"type": "gap", "from": t, "to": live}));
            }
        }
        self.latency = self.timeline.ingest_at(t).map(|ing| server_now - ing);
        self.glass = self.timeline.capture_at(t).map(|c| server_now - c);
        self.buffer_ms = playout::ahead_of(&ranges, t) * 1000.0;
        // After a pause that held blocks back, `resume_live` moves to the live point.
        if self.first_frame.is_some() && !self.stalls.stalled() && !paused && !self.paused_behind {
            if let Some(latency) = self.latency {
                match playout::steer(latency, self.target_ms, self.buffer_ms) {
                    Steer::Rate(r) => self.set_rate(r),
                    Steer::Jump(s) if now - self.last_jump > MIN_JUMP_INTERVAL_MS => {
                        self.last_jump = now;
                        self.jumps += 1;
                        self.set_rate(1.0);
                        self.video.set_current_time(t + s);
                        out.push(json!({"type": "jump", "from": t, "to": t + s}));
                    }
                    Steer::Jump(_) => {}
                }
            }
        }
        out
    }

    /// Playback resumed after blocks were kept out while paused: once media
    /// past the kept range is buffered, seeks to the live point in it (and
    /// returns the `jump` event).
    fn resume_live(
        &mut self,
        ranges: &[(f64, f64)],
        t: f64,
        now: f64,
        server_now: f64,
    ) -> Option<Value> {
        let &(start, end) = ranges.last().filter(|(start, _)| *start > t)?;
        self.paused_behind = false;
        let live = self.live_point(start, end, server_now);
        self.video.set_current_time(live);
        self.last_time = live;
        self.last_advance = now;
        self.jumps += 1;
        Some(json!({"type": "jump", "from": t, "to": live, "reason": "resume"}))
    }

    /// The live point (the target latency behind the edge) in the buffered
    /// media from `from` to `end`, and at most up to half a second before `end`.
    fn live_point(&self, from: f64, end: f64, server_now: f64) -> f64 {
        self.timeline
            .time_of(server_now - self.target_ms)
            .unwrap_or(from)
            .clamp(from, (end - 0.5).max(from))
    }

    fn set_rate(&mut self, r: f64) {
        if (self.video.playback_rate() - r).abs() > 1e-3 {
            self.video.set_playback_rate(r);
        }
        self.rate = r;
    }

    fn play_now(&mut self, now: f64) {
        self.last_play_call = now;
        // Other rejections than a refusal are retried by `tick`.
        start_playing(&self.video, self.weak.clone(), Input::PlayRefused);
    }

    /// The browser refused to start playback (its autoplay policy): with
    /// `mute` and sound on, mutes the element and starts again, once;
    /// otherwise playback waits for the user's play (or any gesture that
    /// lets `tick`'s next try through). Returns the event to emit, once per
    /// outcome.
    pub(super) fn handle_play_refused(&mut self, now: f64, mute: bool) -> Option<Value> {
        if self.first_frame.is_some() {
            return None;
        }
        if mute && !self.video.muted() {
            self.video.set_muted(true);
            self.autoplay = Autoplay::Muted;
            self.play_now(now);
            return Some(json!({"type": "autoplay_muted"}));
        }
        if self.autoplay == Autoplay::Blocked {
            return None;
        }
        self.autoplay = Autoplay::Blocked;
        Some(json!({"type": "autoplay_blocked"}))
    }

    /// `null` if the autoplay policy let the start through, `"muted"` if the
    /// player muted the element to start, `"blocked"` if it waits (or
    /// waited) for the user.
    pub(super) fn autoplay(&self) -> Option<&'static str> {
        match self.autoplay {
            Autoplay::Allowed => None,
            Autoplay::Muted => Some("muted"),
            Autoplay::Blocked => Some("blocked"),
        }
    }

    fn ranges(&self) -> Vec<(f64, f64)> {
        let r = self.video.buffered();
        (0..r.length())
            .filter_map(|i| Some((r.start(i).ok()?, r.end(i).ok()?)))
            .collect()
    }
}
