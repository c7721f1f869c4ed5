//! RTMP ingest, for OBS and the other encoders whose first choice it is.
//!
//! With `--rtmp-listen 0.0.0.0:1935`, an encoder publishes stream `cam` to
//! `rtmp://<host>:1935/live/cam?token=<TOKEN>` (in OBS: server
//! `rtmp://<host>:1935/live`, stream key `cam?token=<TOKEN>`). The token may
//! also follow the application name (`rtmp://<host>:1935/live?token=<TOKEN>`,
//! stream key `cam`); the application name is otherwise free. The token is the
//! server's publish token, as for HTTP ingest.
//!
//! The handshake and the chunk and command layers are [`rml_rtmp`]'s; the FLV
//! tags it yields go through [`Remuxer`] to fragmented MP4 and then through
//! the same `ingest::publish` as an HTTP body: the same
//! claim on the stream, take-over of a silent publisher, continued timeline,
//! blocks and metrics. H.264 video and AAC audio are taken; another codec ends
//! the publish with `unsupported_codec`.
//!
//! An RTMP publisher sees no HTTP status, so a refusal is an `onStatus`
//! error (`NetStream.Publish.BadName` for a wrong token or name,
//! `NetStream.Publish.Failed` otherwise) and the connection is closed; the
//! server logs the code and counts it in `clubcast_rejects_total`, as for
//! HTTP. `clubcast_rtmp_connections` is the connections open.
//!
//! Bounds: at most [`MAX_CONNECTIONS`] connections at once, the handshake within
//! [`HANDSHAKE_TIMEOUT`], a publish request within [`PUBLISH_DEADLINE`], each
//! write within [`WRITE_TIMEOUT`], and a publisher that sends nothing for
//! [`IDLE_TIMEOUT`] is closed. An RTMP message is
//! at most 16 MiB by its 24-bit length, and [`Remuxer`] bounds frames and what
//! waits for a cut.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ServerSession, ServerSessionConfig, ServerSessionEvent, ServerSessionResult,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ingest::flv::Remuxer;
use crate::ingest::{authorize, publish, IngestError, IngestState, IDLE_TIMEOUT};

/// Most RTMP connections at once.
pub const MAX_CONNECTIONS: usize = 32;
/// Time a connection gets to finish the RTMP handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Time a connection gets from its start to ask to publish.
pub const PUBLISH_DEADLINE: Duration = Duration::from_secs(30);
/// Time a write to the encoder may take (one that reads nothing is closed).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Fragmented-MP4 pieces that may wait for the publish task.
const QUEUE: usize = 64;

/// Errors that end an RTMP connection before or outside a publish.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RtmpError {
    /// The socket failed.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake failed or did not finish in time.
    #[error("handshake: {0}")]
    Handshake(String),
    /// The peer broke the RTMP protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The connection sent nothing for too long, or did not ask to publish
    /// in time.
    #[error("idle: no data for {} s, or no publish request within {} s", IDLE_TIMEOUT.as_secs(), PUBLISH_DEADLINE.as_secs())]
    Idle,
    /// The encoder did not read what the server sent.
    #[error("a write took over {} s", WRITE_TIMEOUT.as_secs())]
    WriteTimeout,
}

/// Accepts RTMP connections on `listener` until `shutdown`.
pub fn spawn(
    listener: TcpListener,
    st: IngestState,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (sock, from) = tokio::select! {
                () = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(%e, "rtmp accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::warn!(%from, "rtmp connection refused: {MAX_CONNECTIONS} already open");
                continue;
            };
            let (st, stop) = (st.clone(), shutdown.clone());
            st.metrics.rtmp_connection(true);
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                if let Err(e) = connection(sock, &st, stop).await {
                    tracing::info!(%from, "rtmp connection ended: {e}");
                }
                st.metrics.rtmp_connection(false);
                drop(slot);
            });
        }
    })
}

/// A publish in progress on a connection.
struct Publishing {
    name: String,
    remuxer: Remuxer,
    tx: mpsc::Sender<Result<Bytes, IngestError>>,
    task: JoinHandle<Result<(u64, u64), IngestError>>,
}

/// What a connection does next after an event.
enum Next {
    Go,
    Close,
}

async fn connection<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    st: &IngestState,
    shutdown: CancellationToken,
) -> Result<(), RtmpError> {
    let publish_by = tokio::time::Instant::now() + PUBLISH_DEADLINE;
    let mut buf = vec![0u8; 64 * 1024];
    let rest = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&mut sock, &mut buf))
        .await
        .map_err(|_| RtmpError::Handshake("not done in time".into()))??;
    let Some(rest) = rest else {
        return Ok(());
    };
    let (mut session, first) = ServerSession::new(ServerSessionConfig::new())
        .map_err(|e| RtmpError::Protocol(e.to_string()))?;
    let mut publishing: Option<Publishing> = None;
    let mut input = rest;
    let mut pending = first;
    let result = loop {
        match handle(&mut sock, &mut session, pending, st, &mut publishing).await {
            Ok(Next::Go) => {}
            Ok(Next::Close) => break Ok(()),
            Err(e) => break Err(e),
        }
        if input.is_empty() {
            let until = match publishing {
                Some(_) => tokio::time::Instant::now() + IDLE_TIMEOUT,
                None => publish_by,
            };
            let read = tokio::select! {
                () = shutdown.cancelled() => break Ok(()),
                read = tokio::time::timeout_at(until, sock.read(&mut buf)) => read,
            };
            match read {
                Err(_) => break Err(RtmpError::Idle),
                Ok(Err(e)) => break Err(e.into()),
                Ok(Ok(0)) => break Ok(()),
                Ok(Ok(n)) => input = buf[..n].to_vec(),
            }
        }
        pending = match session.handle_input(&input) {
            Ok(r) => r,
            Err(e) => break Err(RtmpError::Protocol(e.to_string())),
        };
        input.clear();
    };
    if let Some(p) = publishing.take() {
        finish(p, st).await;
    }
    result
}

/// Runs the server side of the handshake; returns the bytes that followed it,
/// or `None` when the peer left.
async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    buf: &mut [u8],
) -> Result<Option<Vec<u8>>, RtmpError> {
    let mut hs = Handshake::new(PeerType::Server);
    loop {
        let n = sock.read(buf).await?;
        if n == 0 {
            return Ok(None);
        }
        match hs
            .process_bytes(&buf[..n])
            .map_err(|e| RtmpError::Handshake(e.to_string()))?
        {
            HandshakeProcessResult::InProgress { response_bytes } => {
                write(sock, &response_bytes).await?;
            }
            HandshakeProcessResult::Completed {
                response_bytes,
                remaining_bytes,
            } => {
                write(sock, &response_bytes).await?;
                return Ok(Some(remaining_bytes));
            }
        }
    }
}

/// Sends what the session answers and acts on its events.
async fn handle<S: AsyncWrite + Unpin>(
    sock: &mut S,
    session: &mut ServerSession,
    results: Vec<ServerSessionResult>,
    st: &IngestState,
    publishing: &mut Option<Publishing>,
) -> Result<Next, RtmpError> {
    let protocol = |e: rml_rtmp::sessions::ServerSessionError| RtmpError::Protocol(e.to_string());
    let mut queue = std::collections::VecDeque::from(results);
    while let Some(result) = queue.pop_front() {
        let event = match result {
            ServerSessionResult::OutboundResponse(packet) => {
                write(sock, &packet.bytes).await?;
                continue;
            }
            ServerSessionResult::RaisedEvent(event) => event,
            ServerSessionResult::UnhandleableMessageReceived(_) => continue,
        };
        match event {
            ServerSessionEvent::ConnectionRequested { request_id, .. } => {
                queue.extend(session.accept_request(request_id).map_err(protocol)?);
            }
            ServerSessionEvent::PublishStreamRequested {
                request_id,
                app_name,
                stream_key,
                ..
            } => {
                if publishing.is_some() {
                    return Err(RtmpError::Protocol(
                        "a second publish on one connection".into(),
                    ));
                }
                let (name, token) = name_and_token(&app_name, &stream_key);
                let checked = authorize(st, &Default::default(), token.as_deref(), name);
                if let Err(e) = checked {
                    st.metrics.reject(e.code());
                    tracing::warn!(stream = %name, code = e.code(), "rtmp publish refused: {e}");
                    let answer = session
                        .reject_request(request_id, "NetStream.Publish.BadName", &e.to_string())
                        .map_err(protocol)?;
                    send(sock, answer).await?;
                    return Ok(Next::Close);
                }
                *publishing = Some(start(st, name));
                queue.extend(session.accept_request(request_id).map_err(protocol)?);
            }
            ServerSessionEvent::PlayStreamRequested { request_id, .. } => {
                let answer = session
                    .reject_request(
                        request_id,
                        "NetStream.Play.Failed",
                        "RTMP is for publishing; clubcast plays in the browser (/watch/<name>)",
                    )
                    .map_err(protocol)?;
                send(sock, answer).await?;
                return Ok(Next::Close);
            }
            ServerSessionEvent::StreamMetadataChanged { metadata, .. } => {
                if let Some(p) = publishing.as_mut() {
                    if let (Some(w), Some(h)) = (metadata.video_width, metadata.video_height) {
                        p.remuxer.set_size(w, h);
                    }
                    let audio = metadata.audio_codec_id.is_some();
                    p.remuxer.set_audio_expected(audio);
                    p.remuxer
                        .set_audio_only(audio && metadata.video_codec_id.is_none());
                }
            }
            ServerSessionEvent::VideoDataReceived {
                data, timestamp, ..
            } => {
                let going = media(publishing, true, timestamp.value, &data).await;
                if !going {
                    return Ok(Next::Close);
                }
            }
            ServerSessionEvent::AudioDataReceived {
                data, timestamp, ..
            } => {
                let going = media(publishing, false, timestamp.value, &data).await;
                if !going {
                    return Ok(Next::Close);
                }
            }
            ServerSessionEvent::PublishStreamFinished { .. } => {
                if let Some(p) = publishing.take() {
                    finish(p, st).await;
                }
            }
            _ => {}
        }
    }
    Ok(Next::Go)
}

async fn send<S: AsyncWrite + Unpin>(
    sock: &mut S,
    results: Vec<ServerSessionResult>,
) -> Result<(), RtmpError> {
    for r in results {
        if let ServerSessionResult::OutboundResponse(packet) = r {
            write(sock, &packet.bytes).await?;
        }
    }
    Ok(())
}

/// Writes `bytes` within [`WRITE_TIMEOUT`].
async fn write<S: AsyncWrite + Unpin>(sock: &mut S, bytes: &[u8]) -> Result<(), RtmpError> {
    tokio::time::timeout(WRITE_TIMEOUT, sock.write_all(bytes))
        .await
        .map_err(|_| RtmpError::WriteTimeout)??;
    Ok(())
}

/// The stream name and the token of a publish: the token from the stream
/// key's query, else from the application name's (percent-decoded, as in an
/// HTTP ingest URL).
fn name_and_token<'a>(app: &str, key: &'a str) -> (&'a str, Option<String>) {
    let (name, query) = key.split_once('?').unwrap_or((key, ""));
    let app_query = app.split_once('?').map_or("", |(_, q)| q);
    let token = |q: &str| {
        form_urlencoded::parse(q.as_bytes())
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.into_owned())
    };
    (name, token(query).or_else(|| token(app_query)))
}

/// Starts the publish task of stream `name`.
fn start(st: &IngestState, name: &str) -> Publishing {
    let (tx, mut rx) = mpsc::channel(QUEUE);
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
    let (task_st, task_name) = (st.clone(), name.to_owned());
    tracing::info!(stream = %name, "rtmp publisher connected");
    Publishing {
        name: name.to_owned(),
        remuxer: Remuxer::new(),
        tx,
        task: tokio::spawn(async move { publish(&task_st, &task_name, Box::pin(body)).await }),
    }
}

/// Remuxes a video or audio message of the publish in progress (none before
/// the publish request: ignored) and hands the output on; `false` when the
/// publish is over.
async fn media(publishing: &mut Option<Publishing>, video: bool, ts: u32, data: &[u8]) -> bool {
    let Some(p) = publishing.as_mut() else {
        return true;
    };
    let out = if video {
        p.remuxer.video(ts, data)
    } else {
        p.remuxer.audio(ts, data)
    };
    forward(p, out).await
}

/// Hands the remuxer's output to the publish task; `false` when the publish
/// is over (an error, or the stream taken over).
async fn forward(
    p: &mut Publishing,
    out: Result<Vec<Bytes>, crate::ingest::flv::FlvError>,
) -> bool {
    match out {
        Ok(pieces) => {
            for piece in pieces {
                if p.tx.send(Ok(piece)).await.is_err() {
                    return false;
                }
            }
            true
        }
        Err(e) => {
            let _ = p.tx.send(Err(e.into())).await;
            false
        }
    }
}

/// Ends a publish: the remuxer's last frames, then the task's outcome.
async fn finish(mut p: Publishing, st: &IngestState) {
    if let Ok(pieces) = p.remuxer.finish() {
        for piece in pieces {
            if p.tx.send(Ok(piece)).await.is_err() {
                break;
            }
        }
    }
    drop(p.tx);
    match p.task.await {
        Ok(Ok((fragments, blocks))) => {
            tracing::info!(stream = %p.name, fragments, blocks, "rtmp publisher finished");
        }
        Ok(Err(e)) => {
            st.metrics.reject(e.code());
            tracing::warn!(stream = %p.name, code = e.code(), "rtmp ingest rejected: {e}");
        }
        Err(e) => tracing::error!(stream = %p.name, "rtmp publish task failed: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use crate::stream::{StoreConfig, Streams};
    use rml_rtmp::sessions::{ClientSession, ClientSessionConfig, ClientSessionResult};
    use tokio::io::DuplexStream;

    fn state() -> IngestState {
        IngestState {
            streams: Arc::new(Streams::new(
                None,
                StoreConfig {
                    store_seconds: 60,
                    max_bytes: usize::MAX,
                },
            )),
            publish_token: "t".into(),
            block_bytes: 4096,
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The client's side of the handshake and a `connect`, on `c`; then
    /// `pings` ping requests, sent while it reads nothing (as far as the
    /// server takes them).
    async fn connect(c: &mut DuplexStream, pings: usize) -> ClientSession {
        let mut hs = Handshake::new(PeerType::Client);
        let p0p1 = hs.generate_outbound_p0_and_p1().expect("p0 and p1");
        c.write_all(&p0p1).await.expect("send");
        let mut buf = vec![0u8; 8192];
        loop {
            let n = c.read(&mut buf).await.expect("read");
            assert!(n > 0, "the server left in the handshake");
            match hs.process_bytes(&buf[..n]).expect("handshake") {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    c.write_all(&response_bytes).await.expect("send");
                }
                HandshakeProcessResult::Completed { response_bytes, .. } => {
                    c.write_all(&response_bytes).await.expect("send");
                    break;
                }
            }
        }
        let (mut session, first) = ClientSession::new(ClientSessionConfig::new()).expect("session");
        let connect = session.request_connection("live".into()).expect("connect");
        let pings = (0..pings).map(|_| {
            let (packet, _) = session.send_ping_request().expect("a ping");
            ClientSessionResult::OutboundResponse(packet)
        });
        let out: Vec<_> = first.into_iter().chain([connect]).chain(pings).collect();
        for r in out {
            if let ClientSessionResult::OutboundResponse(p) = r {
                // A server that gave up on this client has closed the pipe.
                if c.write_all(&p.bytes).await.is_err() {
                    break;
                }
            }
        }
        session
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_asks_to_publish_is_closed() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let st = state();
        let started = tokio::time::Instant::now();
        let task =
            tokio::spawn(async move { connection(server, &st, CancellationToken::new()).await });
        let mut session = connect(&mut client, 0).await;
        // A ping 20 s in is not a publish request: the server still hangs up
        // at the deadline, not 30 s after the ping.
        tokio::time::sleep(Duration::from_secs(20)).await;
        let (ping, _) = session.send_ping_request().expect("a ping");
        client.write_all(&ping.bytes).await.expect("send");
        let mut sink = Vec::new();
        client
            .read_to_end(&mut sink)
            .await
            .expect("read to the close");
        let result = task.await.expect("the connection task");
        assert!(matches!(result, Err(RtmpError::Idle)), "{result:?}");
        let took = started.elapsed();
        assert!(took >= PUBLISH_DEADLINE && took < PUBLISH_DEADLINE + Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn a_handshake_that_stops_halfway_is_closed() {
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let st = state();
        let started = tokio::time::Instant::now();
        let task =
            tokio::spawn(async move { connection(server, &st, CancellationToken::new()).await });
        client
            .write_all(&[3; 100])
            .await
            .expect("a version byte and part of C1");
        let result = task.await.expect("the connection task");
        assert!(matches!(result, Err(RtmpError::Handshake(_))), "{result:?}");
        assert!(started.elapsed() >= HANDSHAKE_TIMEOUT);
        drop(client);
    }

    #[tokio::test(start_paused = true)]
    async fn an_encoder_that_reads_nothing_is_closed() {
        // A pipe that the server's answers to a flood of pings fill.
        let (mut client, server) = tokio::io::duplex(8192);
        let st = state();
        let started = tokio::time::Instant::now();
        let task =
            tokio::spawn(async move { connection(server, &st, CancellationToken::new()).await });
        let _session = connect(&mut client, 2_000).await;
        // Reads nothing more, and keeps the connection open.
        let result = tokio::time::timeout(Duration::from_secs(60), task)
            .await
            .expect("the server gives up on the encoder")
            .expect("the connection task");
        assert!(matches!(result, Err(RtmpError::WriteTimeout)), "{result:?}");
        assert!(started.elapsed() >= WRITE_TIMEOUT);
        drop(client);
    }

    #[test]
    fn the_token_comes_from_the_key_or_else_the_app() {
        let some = |t: &str| Some(t.to_owned());
        assert_eq!(name_and_token("live", "cam?token=t1"), ("cam", some("t1")));
        assert_eq!(name_and_token("live?token=t2", "cam"), ("cam", some("t2")));
        assert_eq!(
            name_and_token("live?token=t2", "cam?x=1&token=t1"),
            ("cam", some("t1")),
            "the key's token wins"
        );
        assert_eq!(
            name_and_token("live", "cam?token=a%26b%3D"),
            ("cam", some("a&b=")),
            "percent-decoded"
        );
        assert_eq!(name_and_token("live", "cam"), ("cam", None));
    }
}
