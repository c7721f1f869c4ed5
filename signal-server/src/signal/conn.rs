//! One WebSocket connection: parse, limit, dispatch, and drain the peer's queue.
//!
//! A single task owns the socket. It waits on the next frame, the peer's
//! outbound queue, a liveness tick and shutdown. Answers to the client's own
//! messages (welcome aside, which goes through the queue to keep its order) are
//! written directly; everything from other peers comes through the queue.
//!
//! Before its join a client may send binary frames: its upload probe
//! (`clubcast_protocol::probe`), timed here as they arrive, at most
//! [`MAX_PROBE_BYTES`] and exempt from the message rate (they are bounded by
//! bytes). The join is planned on the rate they measured. After the join a
//! binary frame is a bad message.
//!
//! The first message seats the connection: `join` in a live stream's swarm
//! ([`Session`]), `join_vod` in an on-demand room ([`VodSession`], which
//! ignores an upload probe: viewers of a room all upload to each other);
//! every later message goes to the handler of that kind.
//!
//! Handling an input never awaits: it returns a [`Step`] (a reply to write,
//! then maybe a close), and the loop has one write of its own. The task's
//! future is resident for every connection, and each await nested in a handler
//! would add its state to every connection's future.

use std::future::Future;
use std::time::{Duration, Instant};

use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket};
use clubcast_protocol::signal::{
    ClientMsg, ErrorCode, ServerMsg, MAX_SIGNAL_MESSAGE, SIGNAL_VERSION,
};
use futures_util::stream::{SplitSink, SplitStream, StreamExt};
use futures_util::SinkExt;
use serde::Deserialize;

use clubcast_protocol::club::LateStreak;
use clubcast_protocol::probe::{Measured, ProbeMeter, MAX_PROBE_BYTES, PROBE_CHUNK_BYTES};

use super::limits::{Offences, TokenBucket};
use super::outbox::Receiver;
use super::swarm::CloseCell;
use super::{
    unix_ms, DropReason, Hub, Session, SignalError, VodSession, CLOSE_LINGER, JOIN_TIMEOUT,
    MAX_OFFENCES, MAX_OFFENCES_IN_A_ROW, RATE_BURST, RATE_PER_SEC, SEND_TIMEOUT, SILENT_HEARTBEATS,
};

/// Message types a client may send.
const CLIENT_TYPES: [&str; 8] = [
    "join",
    "join_vod",
    "signal",
    "heartbeat",
    "bid",
    "link_failed",
    "report",
    "slow_source",
];

/// A close frame's code and reason.
type Close = (u16, &'static str);

/// Where the connection's first message seated it.
enum Joined {
    /// In a live stream's swarm.
    Live(Session),
    /// In an on-demand room.
    Vod(VodSession),
}

impl Joined {
    fn rx(&mut self) -> &mut Receiver {
        match self {
            Joined::Live(s) => &mut s.rx,
            Joined::Vod(s) => &mut s.rx,
        }
    }

    fn close(&self) -> &CloseCell {
        match self {
            Joined::Live(s) => &s.close,
            Joined::Vod(s) => &s.close,
        }
    }

    fn leave(&self, hub: &Hub) {
        match self {
            Joined::Live(s) => hub.leave(s),
            Joined::Vod(s) => hub.leave_vod(s),
        }
    }
}

/// What handling one input asks of the socket: write `reply`, then close if
/// `close` is set (even if the write failed).
#[must_use]
#[derive(Default)]
struct Step {
    reply: Option<String>,
    close: Option<Close>,
}

impl Step {
    fn reply(text: String) -> Self {
        Step {
            reply: Some(text),
            close: None,
        }
    }

    fn close(code: u16, reason: &'static str) -> Self {
        Step {
            reply: None,
            close: Some((code, reason)),
        }
    }
}

/// What woke the connection.
enum Event {
    Shutdown,
    /// A message from the peer's queue.
    Outbound(String),
    /// The swarm dropped this peer and with it the queue's sender.
    Dropped,
    Frame(Message),
    Tick,
}

/// Just enough of a message to tell a bad shape from an unknown type or version.
#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(rename = "type", borrow)]
    ty: std::borrow::Cow<'a, str>,
    #[serde(default)]
    v: Option<u64>,
}

/// Parses a text message into a typed message or a wire error.
pub(crate) fn parse(text: &str) -> Result<ClientMsg, (ErrorCode, String)> {
    if text.len() > MAX_SIGNAL_MESSAGE {
        return Err((
            ErrorCode::TooLarge,
            format!(
                "message of {} bytes is over the limit of {MAX_SIGNAL_MESSAGE}",
                text.len()
            ),
        ));
    }
    let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| {
        (
            ErrorCode::BadMessage,
            format!("expected a JSON object with a string \"type\": {e}"),
        )
    })?;
    if !CLIENT_TYPES.contains(&env.ty.as_ref()) {
        let ty: String = env.ty.chars().take(40).collect();
        return Err((
            ErrorCode::UnknownType,
            format!("unknown message type {ty:?}"),
        ));
    }
    if env.v != Some(u64::from(SIGNAL_VERSION)) {
        return Err((
            ErrorCode::BadVersion,
            format!("field \"v\" must be {SIGNAL_VERSION}"),
        ));
    }
    serde_json::from_str(text).map_err(|e| {
        (
            ErrorCode::BadMessage,
            format!("bad {} message: {e}", env.ty),
        )
    })
}

fn type_of(m: &ClientMsg) -> &'static str {
    match m {
        ClientMsg::Join { .. } => "join",
        ClientMsg::JoinVod { .. } => "join_vod",
        ClientMsg::Signal { .. } => "signal",
        ClientMsg::Heartbeat { .. } => "heartbeat",
        ClientMsg::Bid { .. } => "bid",
        ClientMsg::LinkFailed { .. } => "link_failed",
        ClientMsg::Report { .. } => "report",
        ClientMsg::SlowSource { .. } => "slow_source",
    }
}

fn to_json(msg: &ServerMsg) -> String {
    serde_json::to_string(msg).expect("ServerMsg is plain structs and strings")
}

struct Conn {
    hub: Hub,
    sink: SplitSink<WebSocket, Message>,
    session: Option<Joined>,
    bucket: TokenBucket,
    offences: Offences,
    opened: Instant,
    last_seen: Instant,
    /// Its bids' late pushes, kept here so a bid takes no swarm lock.
    late_streak: LateStreak,
    /// Its upload probe, timed until the join (boxed: most connections are
    /// past it, and the future of every connection holds this struct).
    probe: Option<Box<ProbeMeter>>,
}

/// Runs one connection to its end.
///
/// Not an `async fn`: one keeps its arguments in its state for its whole life,
/// and the socket (about 370 bytes) is split into two handles before the future
/// starts. Only `c` and `stream` are captured.
pub(crate) fn run(hub: Hub, socket: WebSocket) -> impl Future<Output = ()> + Send {
    let (sink, mut stream) = socket.split();
    let now = Instant::now();
    let mut c = Conn {
        hub,
        sink,
        session: None,
        bucket: TokenBucket::new(RATE_PER_SEC, RATE_BURST, now),
        offences: Offences::new(MAX_OFFENCES, MAX_OFFENCES_IN_A_ROW),
        opened: now,
        last_seen: now,
        late_streak: LateStreak::default(),
        probe: None,
    };
    async move {
        let hub = c.hub.clone();
        let heartbeat = hub.config().heartbeat();
        let mut tick = tokio::time::interval(heartbeat.min(JOIN_TIMEOUT) / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let close = loop {
            let outbound = async {
                match c.session.as_mut() {
                    Some(s) => s.rx().recv().await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                _ = hub.shutdown().cancelled() => Event::Shutdown,
                out = outbound => out.map_or(Event::Dropped, Event::Outbound),
                frame = stream.next() => match frame {
                    Some(Ok(m)) => Event::Frame(m),
                    // Closed by the client or a transport error (incl. a message
                    // over MAX_TRANSPORT_MESSAGE): nothing more can be said.
                    Some(Err(_)) | None => break None,
                },
                _ = tick.tick() => Event::Tick,
            };
            let Step { reply, close } = c.handle_event(event, heartbeat);
            let failed = match reply {
                Some(text) => c.write(text).await,
                None => None,
            };
            if let Some(close) = close.or(failed) {
                break Some(close);
            }
        };
        // Boxed: it runs once, and its timers would otherwise be part of every
        // connection's resident future.
        Box::pin(finish(c, stream, close)).await;
    }
}

/// Sends the close frame if there is one, leaves the swarm, and lingers for
/// the client's close reply.
async fn finish(mut c: Conn, mut stream: SplitStream<WebSocket>, close: Option<Close>) {
    let hub = c.hub.clone();
    if let Some((code, reason)) = close {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = tokio::time::timeout(SEND_TIMEOUT, c.sink.send(Message::Close(Some(frame)))).await;
        if let Some(s) = c.session.take() {
            s.leave(&hub);
        }
        // Read and drop what the client already sent, until its close reply:
        // a socket closed with unread input makes the kernel send a reset, and
        // the client then loses the close frame and the errors queued before it.
        let _ = tokio::time::timeout(CLOSE_LINGER, async {
            while let Some(Ok(_)) = stream.next().await {}
        })
        .await;
    }
    if let Some(s) = c.session.take() {
        s.leave(&hub);
    }
}

impl Conn {
    fn handle_event(&mut self, event: Event, heartbeat: Duration) -> Step {
        match event {
            Event::Shutdown => Step::close(close_code::AWAY, "server shutting down"),
            Event::Outbound(text) => Step::reply(text),
            Event::Dropped => self.dropped(),
            Event::Frame(m) => self.handle_frame(m),
            Event::Tick => self.check_liveness(heartbeat),
        }
    }

    /// Writes one text message; `Some` is the close a failed write calls for.
    async fn write(&mut self, text: String) -> Option<Close> {
        match tokio::time::timeout(SEND_TIMEOUT, self.sink.send(Message::Text(text.into()))).await {
            Ok(Ok(())) => None,
            Ok(Err(_)) => Some((close_code::ABNORMAL, "write failed")),
            Err(_) => {
                self.hub.metrics().drop_peer(DropReason::Slow.as_str());
                Some((close_code::POLICY, "too slow to read"))
            }
        }
    }

    /// The close for a peer the swarm dropped.
    fn dropped(&self) -> Step {
        let reason = self.session.as_ref().and_then(|s| s.close().get().copied());
        match reason {
            Some(DropReason::Slow) => Step::close(close_code::POLICY, "too slow to read"),
            Some(DropReason::Reported) => {
                Step::close(close_code::POLICY, "reported for bad blocks")
            }
            Some(DropReason::StreamEnded) => Step::close(close_code::NORMAL, "stream ended"),
            _ => Step::close(close_code::POLICY, "dropped"),
        }
    }

    /// Answers with an error; a non-offence leaves the connection up.
    fn error(&mut self, code: ErrorCode, message: String, offence: bool) -> Step {
        self.hub.metrics().reject(code.as_str());
        let reply = to_json(&ServerMsg::Error {
            v: SIGNAL_VERSION,
            code,
            message,
        });
        let mut step = Step::reply(reply);
        if offence && self.offences.offend() {
            self.hub.metrics().drop_peer(DropReason::Offences.as_str());
            step.close = Some((close_code::POLICY, "too many bad messages"));
        }
        step
    }

    fn check_liveness(&mut self, heartbeat: Duration) -> Step {
        let now = Instant::now();
        if self.session.is_none() {
            if now.duration_since(self.opened) > JOIN_TIMEOUT {
                self.hub.metrics().reject("join_timeout");
                return Step::close(close_code::POLICY, "no join");
            }
        } else if now.duration_since(self.last_seen) > heartbeat * SILENT_HEARTBEATS {
            self.hub.metrics().drop_peer(DropReason::Silent.as_str());
            return Step::close(close_code::AWAY, "no heartbeat");
        }
        Step::default()
    }

    fn handle_frame(&mut self, frame: Message) -> Step {
        let now = Instant::now();
        self.last_seen = now;
        let text = match frame {
            Message::Text(t) => t,
            Message::Binary(b) if self.session.is_none() => return self.probe_frame(now, b.len()),
            Message::Binary(_) => {
                self.hub.metrics().signal_message("invalid");
                return self.error(
                    ErrorCode::BadMessage,
                    "binary frames are not accepted; send JSON text".into(),
                    true,
                );
            }
            Message::Close(_) => return Step::close(close_code::NORMAL, "bye"),
            // Pings are answered by the transport; both count as liveness.
            Message::Ping(_) | Message::Pong(_) => return Step::default(),
        };
        if !self.bucket.take(now) {
            return self.error(
                ErrorCode::RateLimited,
                format!("over {RATE_PER_SEC} messages per second"),
                true,
            );
        }
        let msg = match parse(text.as_str()) {
            Ok(m) => m,
            Err((code, message)) => {
                self.hub.metrics().signal_message("invalid");
                return self.error(code, message, true);
            }
        };
        self.hub.metrics().signal_message(type_of(&msg));
        self.handle_msg(msg)
    }

    /// A frame of the upload probe, `len` bytes, arrived at `now`.
    fn probe_frame(&mut self, now: Instant, len: usize) -> Step {
        let meter = self.probe.get_or_insert_with(Box::default);
        // The last frame may straddle the limit.
        let most = u64::from(MAX_PROBE_BYTES + PROBE_CHUNK_BYTES);
        if meter.bytes() + len as u64 > most {
            self.hub.metrics().signal_message("invalid");
            return self.error(
                ErrorCode::TooLarge,
                format!("an upload probe sends at most {MAX_PROBE_BYTES} bytes before the join"),
                true,
            );
        }
        self.hub.metrics().signal_message("probe");
        let ms = now.saturating_duration_since(self.opened).as_millis() as u64;
        meter.feed(ms, len);
        Step::default()
    }

    fn handle_msg(&mut self, msg: ClientMsg) -> Step {
        match self.session {
            None => self.handle_first(msg),
            Some(Joined::Live(_)) => self.handle_live(msg),
            Some(Joined::Vod(_)) => self.handle_vod(msg),
        }
    }

    /// The refusal of a join, `e`: answered, then closed.
    fn refuse(&mut self, e: &SignalError) -> Step {
        let code = wire_code(e);
        Step {
            close: Some((close_code::POLICY, code.as_str())),
            ..self.error(code, e.to_string(), false)
        }
    }

    /// The first message, which must be a join of either kind.
    fn handle_first(&mut self, msg: ClientMsg) -> Step {
        let hub = self.hub.clone();
        if let ClientMsg::JoinVod { asset, key, .. } = msg {
            // Viewers of a room upload to each other alike: no plan to make.
            self.probe = None;
            return match hub.join_vod(&asset, &key) {
                Ok(s) => {
                    self.offences.good();
                    self.session = Some(Joined::Vod(s));
                    Step::default()
                }
                Err(e) => self.refuse(&e),
            };
        }
        let ClientMsg::Join {
            stream,
            p2p,
            upload_kbps,
            probe_limited,
            test_corrupt,
            ..
        } = msg
        else {
            return self.error(
                ErrorCode::NotJoined,
                "the first message must be join or join_vod".into(),
                true,
            );
        };
        // A probe that ran dry at the sender measured the sender.
        let probe = self.probe.take().map(|m| {
            if probe_limited {
                Measured::Limited
            } else {
                m.measure()
            }
        });
        match hub.join(&stream, p2p, upload_kbps, probe, test_corrupt) {
            Ok(s) => {
                self.offences.good();
                self.session = Some(Joined::Live(s));
                Step::default()
            }
            Err(e) => self.refuse(&e),
        }
    }

    /// A second join, of either kind: an offence.
    fn already_joined(&mut self) -> Step {
        self.error(ErrorCode::NotJoined, "already joined".into(), true)
    }

    /// The outcome of a relay: a refusal is answered, not an offence.
    fn relayed(&mut self, r: Result<(), SignalError>) -> Step {
        self.offences.good();
        match r {
            Ok(()) => Step::default(),
            Err(e) => self.error(wire_code(&e), e.to_string(), false),
        }
    }

    /// The answer to a heartbeat (`live_edge` 0 on demand).
    fn pong(&mut self, live_edge: u64) -> Step {
        let pong = ServerMsg::Pong {
            v: SIGNAL_VERSION,
            server_time_ms: unix_ms(),
            live_edge,
        };
        self.offences.good();
        Step::reply(to_json(&pong))
    }

    /// A message of a peer in a live stream's swarm.
    fn handle_live(&mut self, msg: ClientMsg) -> Step {
        let hub = self.hub.clone();
        let Some(Joined::Live(session)) = self.session.as_ref() else {
            return Step::default();
        };
        match msg {
            ClientMsg::Join { .. } | ClientMsg::JoinVod { .. } => return self.already_joined(),
            ClientMsg::Signal { to, data, .. } => {
                let relayed = hub.relay(session, to, data);
                return self.relayed(relayed);
            }
            // Not through the swarm lock: a join holds it for milliseconds
            // in a large swarm, and every peer heartbeats.
            ClientMsg::Heartbeat { .. } => return self.pong(session.stream.edge_seq()),
            ClientMsg::Bid { bits, late, up, .. } => {
                hub.metrics().bid();
                hub.grants().handle_bid(session.peer, bits);
                if self.late_streak.note_bid(late) {
                    hub.note_overloaded(session);
                }
                hub.note_upload(session, up, late);
            }
            ClientMsg::SlowSource { peer, .. } => hub.slow_source(session, peer),
            ClientMsg::LinkFailed { peer, .. } => hub.link_failed(session, peer),
            ClientMsg::Report { peer, reason, .. } => hub.report(session, peer, &reason),
        }
        self.offences.good();
        Step::default()
    }

    /// A message of a viewer in an on-demand room.
    fn handle_vod(&mut self, msg: ClientMsg) -> Step {
        let hub = self.hub.clone();
        let Some(Joined::Vod(session)) = self.session.as_ref() else {
            return Step::default();
        };
        match msg {
            ClientMsg::Join { .. } | ClientMsg::JoinVod { .. } => return self.already_joined(),
            ClientMsg::Signal { to, data, .. } => {
                let relayed = hub.vod_relay(session, to, data);
                return self.relayed(relayed);
            }
            ClientMsg::Heartbeat { .. } => return self.pong(0),
            ClientMsg::Bid { bits, .. } => {
                if !hub.vod_bid(session, bits) {
                    return self.error(
                        ErrorCode::BadMessage,
                        "this server does not meter on-demand runs (the vod_welcome gave no grant_token): there is nothing to bid for; fetch runs without a grant".into(),
                        true,
                    );
                }
            }
            ClientMsg::SlowSource { .. } => {
                return self.error(
                    ErrorCode::BadMessage,
                    "slow_source is for live streams; an on-demand viewer has no last-hop source"
                        .into(),
                    true,
                );
            }
            ClientMsg::LinkFailed { peer, .. } => hub.vod_link_failed(session, peer),
            ClientMsg::Report { peer, reason, .. } => hub.vod_report(session, peer, &reason),
        }
        self.offences.good();
        Step::default()
    }
}

fn wire_code(e: &SignalError) -> ErrorCode {
    match e {
        SignalError::UnknownStream(_) => ErrorCode::UnknownStream,
        SignalError::StreamFull(_) => ErrorCode::StreamFull,
        SignalError::UnknownPeer(_) => ErrorCode::UnknownPeer,
        SignalError::StreamEnded => ErrorCode::StreamEnded,
        SignalError::UnknownAsset(..) => ErrorCode::UnknownAsset,
        // The same answer as a full swarm: try again later.
        SignalError::TooManyRooms(_) => ErrorCode::StreamFull,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_tells_shapes_types_and_versions_apart() {
        let code = |s: &str| parse(s).map_err(|e| e.0).err();
        assert_eq!(code("not json"), Some(ErrorCode::BadMessage));
        assert_eq!(code(r#"{"v":1}"#), Some(ErrorCode::BadMessage));
        assert_eq!(
            code(r#"{"type":"dance","v":1}"#),
            Some(ErrorCode::UnknownType)
        );
        assert_eq!(
            code(r#"{"type":"heartbeat","v":9}"#),
            Some(ErrorCode::BadVersion)
        );
        assert_eq!(
            code(r#"{"type":"bid","v":1,"bits":"x"}"#),
            Some(ErrorCode::BadMessage)
        );
        assert_eq!(code(r#"{"type":"heartbeat","v":1}"#), None);
        assert_eq!(
            code(r#"{"type":"join_vod","v":1,"asset":"demo","key":"k"}"#),
            None
        );
        assert_eq!(
            code(r#"{"type":"join_vod","v":1,"asset":"demo"}"#),
            Some(ErrorCode::BadMessage)
        );
        let big = format!(
            r#"{{"type":"heartbeat","v":1,"pad":"{}"}}"#,
            "x".repeat(MAX_SIGNAL_MESSAGE)
        );
        assert_eq!(code(&big), Some(ErrorCode::TooLarge));
    }
}
