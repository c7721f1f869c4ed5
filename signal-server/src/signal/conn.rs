//! One WebSocket connection: parse, limit, dispatch, and drain the peer's queue.
//!
//! A single task owns the socket. It waits on the next frame, the peer's
//! outbound queue, a liveness tick and shutdown. Answers to the client's own
//! messages (welcome aside, which goes through the queue to keep its order) are
//! written directly; everything from other peers comes through the queue.

use std::time::{Duration, Instant};

use axum::extract::ws::{close_code, CloseFrame, Message, Utf8Bytes, WebSocket};
use clubcast_protocol::signal::{
    ClientMsg, ErrorCode, ServerMsg, MAX_SIGNAL_MESSAGE, SIGNAL_VERSION,
};
use futures_util::stream::{SplitSink, StreamExt};
use futures_util::SinkExt;
use serde::Deserialize;

use super::limits::{Offences, TokenBucket};
use super::{
    unix_ms, DropReason, Hub, Session, SignalError, CLOSE_LINGER, JOIN_TIMEOUT, MAX_OFFENCES,
    MAX_OFFENCES_IN_A_ROW, RATE_BURST, RATE_PER_SEC, SEND_TIMEOUT, SILENT_HEARTBEATS,
};

/// Message types a client may send.
const CLIENT_TYPES: [&str; 6] = [
    "join",
    "signal",
    "heartbeat",
    "bid",
    "link_failed",
    "report",
];

/// What to do after handling one frame.
enum Flow {
    Continue,
    Close(u16, &'static str),
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
        ClientMsg::Signal { .. } => "signal",
        ClientMsg::Heartbeat { .. } => "heartbeat",
        ClientMsg::Bid { .. } => "bid",
        ClientMsg::LinkFailed { .. } => "link_failed",
        ClientMsg::Report { .. } => "report",
    }
}

struct Conn {
    hub: Hub,
    sink: SplitSink<WebSocket, Message>,
    session: Option<Session>,
    bucket: TokenBucket,
    offences: Offences,
    opened: Instant,
    last_seen: Instant,
}

/// Runs one connection to its end.
pub(crate) async fn run(hub: Hub, socket: WebSocket) {
    let (sink, mut stream) = socket.split();
    let now = Instant::now();
    let heartbeat = hub.config().heartbeat();
    let mut c = Conn {
        hub: hub.clone(),
        sink,
        session: None,
        bucket: TokenBucket::new(RATE_PER_SEC, RATE_BURST, now),
        offences: Offences::new(MAX_OFFENCES, MAX_OFFENCES_IN_A_ROW),
        opened: now,
        last_seen: now,
    };
    let mut tick = tokio::time::interval(heartbeat.min(JOIN_TIMEOUT) / 2);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let flow = loop {
        let outbound = async {
            match c.session.as_mut() {
                Some(s) => s.rx.recv().await,
                None => std::future::pending().await,
            }
        };
        let flow = tokio::select! {
            _ = hub.shutdown().cancelled() => Flow::Close(close_code::AWAY, "server shutting down"),
            out = outbound => match out {
                Some(text) => c.write(Message::Text(text.into())).await,
                None => {
                    // The swarm dropped this peer and with it the queue's sender.
                    let reason = c.session.as_ref().and_then(|s| s.close.get().copied());
                    match reason {
                        Some(DropReason::Slow) => Flow::Close(close_code::POLICY, "too slow to read"),
                        Some(DropReason::Reported) => Flow::Close(close_code::POLICY, "reported for bad blocks"),
                        _ => Flow::Close(close_code::POLICY, "dropped"),
                    }
                }
            },
            frame = stream.next() => match frame {
                Some(Ok(m)) => c.handle_frame(m).await,
                // Closed by the client or a transport error (incl. a message
                // over MAX_TRANSPORT_MESSAGE): nothing more can be said.
                Some(Err(_)) | None => break None,
            },
            _ = tick.tick() => c.check_liveness(heartbeat),
        };
        if let Flow::Close(code, reason) = flow {
            break Some((code, reason));
        }
    };
    if let Some((code, reason)) = flow {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = tokio::time::timeout(SEND_TIMEOUT, c.sink.send(Message::Close(Some(frame)))).await;
        if let Some(s) = c.session.take() {
            hub.leave(&s);
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
        hub.leave(&s);
    }
}

impl Conn {
    async fn write(&mut self, m: Message) -> Flow {
        match tokio::time::timeout(SEND_TIMEOUT, self.sink.send(m)).await {
            Ok(Ok(())) => Flow::Continue,
            Ok(Err(_)) => Flow::Close(close_code::ABNORMAL, "write failed"),
            Err(_) => {
                self.hub.metrics().drop_peer(DropReason::Slow.as_str());
                Flow::Close(close_code::POLICY, "too slow to read")
            }
        }
    }

    async fn reply(&mut self, msg: &ServerMsg) -> Flow {
        let text = serde_json::to_string(msg).expect("ServerMsg is plain structs and strings");
        self.write(Message::Text(text.into())).await
    }

    /// Answers with an error; a non-offence leaves the connection up.
    async fn error(&mut self, code: ErrorCode, message: String, offence: bool) -> Flow {
        self.hub.metrics().reject(code.as_str());
        let flow = self
            .reply(&ServerMsg::Error {
                v: SIGNAL_VERSION,
                code,
                message,
            })
            .await;
        if offence && self.offences.offend() {
            self.hub.metrics().drop_peer(DropReason::Offences.as_str());
            return Flow::Close(close_code::POLICY, "too many bad messages");
        }
        flow
    }

    fn check_liveness(&mut self, heartbeat: Duration) -> Flow {
        let now = Instant::now();
        if self.session.is_none() {
            if now.duration_since(self.opened) > JOIN_TIMEOUT {
                self.hub.metrics().reject("join_timeout");
                return Flow::Close(close_code::POLICY, "no join");
            }
        } else if now.duration_since(self.last_seen) > heartbeat * SILENT_HEARTBEATS {
            self.hub.metrics().drop_peer(DropReason::Silent.as_str());
            return Flow::Close(close_code::AWAY, "no heartbeat");
        }
        Flow::Continue
    }

    async fn handle_frame(&mut self, frame: Message) -> Flow {
        let now = Instant::now();
        self.last_seen = now;
        let text = match frame {
            Message::Text(t) => t,
            Message::Binary(_) => {
                self.hub.metrics().signal_message("invalid");
                return self
                    .error(
                        ErrorCode::BadMessage,
                        "binary frames are not accepted; send JSON text".into(),
                        true,
                    )
                    .await;
            }
            Message::Close(_) => return Flow::Close(close_code::NORMAL, "bye"),
            // Pings are answered by the transport; both count as liveness.
            Message::Ping(_) | Message::Pong(_) => return Flow::Continue,
        };
        if !self.bucket.take(now) {
            return self
                .error(
                    ErrorCode::RateLimited,
                    format!("over {RATE_PER_SEC} messages per second"),
                    true,
                )
                .await;
        }
        let msg = match parse(text.as_str()) {
            Ok(m) => m,
            Err((code, message)) => {
                self.hub.metrics().signal_message("invalid");
                return self.error(code, message, true).await;
            }
        };
        self.hub.metrics().signal_message(type_of(&msg));
        self.handle_msg(msg).await
    }

    async fn handle_msg(&mut self, msg: ClientMsg) -> Flow {
        let hub = self.hub.clone();
        let Some(session) = self.session.as_ref() else {
            let ClientMsg::Join {
                stream,
                p2p,
                test_corrupt,
                ..
            } = msg
            else {
                return self
                    .error(
                        ErrorCode::NotJoined,
                        "the first message must be join".into(),
                        true,
                    )
                    .await;
            };
            return match hub.join(&stream, p2p, test_corrupt) {
                Ok(s) => {
                    self.offences.good();
                    self.session = Some(s);
                    Flow::Continue
                }
                Err(e) => {
                    let code = wire_code(&e);
                    self.error(code, e.to_string(), false).await;
                    Flow::Close(close_code::POLICY, code.as_str())
                }
            };
        };
        match msg {
            ClientMsg::Join { .. } => {
                return self
                    .error(ErrorCode::NotJoined, "already joined".into(), true)
                    .await;
            }
            ClientMsg::Signal { to, data, .. } => {
                if let Err(e) = hub.relay(session, to, data) {
                    self.offences.good();
                    return self.error(wire_code(&e), e.to_string(), false).await;
                }
            }
            ClientMsg::Heartbeat { .. } => {
                let pong = ServerMsg::Pong {
                    v: SIGNAL_VERSION,
                    server_time_ms: unix_ms(),
                    // Not through the swarm lock: a join holds it for
                    // milliseconds in a large swarm, and every peer heartbeats.
                    live_edge: session.stream.live_edge().unwrap_or(0),
                };
                self.offences.good();
                return self.reply(&pong).await;
            }
            ClientMsg::Bid { bits, .. } => {
                hub.metrics().bid();
                hub.grants().handle_bid(session.peer, bits);
            }
            ClientMsg::LinkFailed { peer, .. } => hub.link_failed(session, peer),
            ClientMsg::Report { peer, reason, .. } => hub.report(session, peer, &reason),
        }
        self.offences.good();
        Flow::Continue
    }
}

fn wire_code(e: &SignalError) -> ErrorCode {
    match e {
        SignalError::UnknownStream(_) => ErrorCode::UnknownStream,
        SignalError::StreamFull(_) => ErrorCode::StreamFull,
        SignalError::UnknownPeer(_) => ErrorCode::UnknownPeer,
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
        let big = format!(
            r#"{{"type":"heartbeat","v":1,"pad":"{}"}}"#,
            "x".repeat(MAX_SIGNAL_MESSAGE)
        );
        assert_eq!(code(&big), Some(ErrorCode::TooLarge));
    }
}
