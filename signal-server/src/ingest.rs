//! `PUT`/`POST /ingest/{name}`: live fragmented MP4 from any encoder (RTMP
//! publishers, remuxed by [`flv`], join it at `publish`).
//!
//! The body is read as a stream and split as it arrives: the init segment is
//! stored, and each fragment is cut into signed blocks the moment its `mdat` is
//! complete, so latency does not wait for the request to end. Publish with
//! ffmpeg:
//!
//! ```text
//! ffmpeg -re -i input.mp4 -c:v libx264 -g 30 -c:a aac -f mp4 \
//!   -movflags frag_keyframe+empty_moov+default_base_moof -frag_duration 1000000 \
//!   -method PUT -headers "Authorization: Bearer $TOKEN" \
//!   http://127.0.0.1:8080/ingest/cam
//! ```
//!
//! An encoder that cannot set a header gives the token in the URL instead:
//! `http://127.0.0.1:8080/ingest/cam?token=$TOKEN` (the header wins if both
//! are there). The server logs no request URL.
//!
//! Verified with ffmpeg 5.1 (and run by the `ingest_router` test when ffmpeg is
//! installed). `-method PUT` and `-chunked_post 1` (the default) make ffmpeg's
//! HTTP output one long chunked request; `-re` paces a file as if it were live;
//! for a camera or screen, replace `-re -i input.mp4` with its input. `-g`
//! should be the frame rate (a keyframe a second) so that with `frag_keyframe`
//! every fragment starts with a keyframe and is a place where a viewer can
//! start. ffmpeg warns "No trailing CRLF found in HTTP header" and adds it
//! itself; the warning is harmless. ffmpeg hangs up right after its last chunk
//! without reading the answer; everything it sent is still published.
//!
//! Errors answer with a JSON body `{"error":{"code":"...","message":"..."}}` and
//! a stable code ([`IngestError::code`]): 401 `unauthorized` for a missing or
//! wrong token, 409 `stream_busy` when another publisher holds the name (409
//! `replaced` ends a publisher that another took over, below), 415
//! `not_mp4` when the body is not MP4, 413 `too_large` for an oversized box,
//! init segment or fragment, 400 `truncated`, `no_init` or `malformed_mp4` for a
//! bad stream, 400 `bad_name`, 400 `bad_query` for a query string that cannot
//! be read (a repeated `token`), and 408 `idle_timeout` when the publisher
//! sends nothing for [`IDLE_TIMEOUT`]; a block that cannot be signed or stored is a
//! server fault, 500 `internal`. Blocks published before an error stay stored,
//! other streams are not touched, and the name is free for the next publisher as
//! soon as the request ends. A stream is created (and its key stored) only at a
//! publish's init segment: a body that fails before it leaves nothing behind.
//!
//! A publisher may come back to a stream (an encoder restarted, a dropped
//! connection): the stream goes on. Its block numbers count on, and its decode
//! times are moved to continue from where the last publish ended
//! (see `continuation`), so the viewers' players play on after a pause as long
//! as the publisher was away.
//!
//! A publisher whose connection broke without closing holds the stream only
//! while it is not stale: silent for at most
//! [`STALE_PUBLISHER`](crate::stream::STALE_PUBLISHER) (3 s), or twice its
//! longest silence so far. After that the same encoder, coming back on a new
//! connection, takes the stream over instead of getting 409 until the old
//! request's [`IDLE_TIMEOUT`].

pub mod chunker;
pub mod flv;
pub mod fmp4;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::json;

use crate::metrics::Metrics;
use crate::stream::{valid_name, PublishGuard, StreamError, Streams};
use flv::FlvError;
use fmp4::{Fmp4Error, Fmp4Parser, Fragment, Item};

/// A publisher that sends nothing for this long is dropped and its name freed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Keyframes further apart than this get a warning in the log: new viewers
/// start at a keyframe, so they start up to this far back and fetch it all.
pub const LONG_KEYFRAME_INTERVAL_MS: u64 = 4_000;

/// What the ingest route needs.
#[derive(Clone)]
pub struct IngestState {
    /// The stream registry.
    pub streams: Arc<Streams>,
    /// Bearer token publishers must present.
    pub publish_token: Arc<str>,
    /// Block payload size.
    pub block_bytes: usize,
    /// Where rejects are counted.
    pub metrics: Arc<Metrics>,
}

impl std::fmt::Debug for IngestState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IngestState")
            .field("block_bytes", &self.block_bytes)
            .finish_non_exhaustive()
    }
}

/// Errors of an ingest request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// No `Authorization: Bearer` header, or the wrong token.
    #[error("missing or wrong publish token")]
    Unauthorized,
    /// Another publisher holds this stream.
    #[error("stream {0:?} is already being published")]
    Busy(String),
    /// This publisher was silent and another one took the stream over.
    #[error("another publisher took the stream over while this one was silent")]
    Replaced,
    /// The stream name is invalid or the server is full.
    #[error(transparent)]
    Stream(StreamError),
    /// The body is not valid fragmented MP4.
    #[error(transparent)]
    Media(#[from] Fmp4Error),
    /// An RTMP publisher's audio or video cannot be remuxed.
    #[error(transparent)]
    Flv(#[from] FlvError),
    /// The query string cannot be read (a repeated or badly encoded `token`).
    #[error("query string: {0}")]
    Query(String),
    /// The request body failed mid-stream.
    #[error("request body: {0}")]
    Body(String),
    /// The publisher sent nothing for [`IDLE_TIMEOUT`].
    #[error("no data for {} s", IDLE_TIMEOUT.as_secs())]
    Idle,
    /// A block could not be signed or stored (a server bug, not the input).
    #[error("publishing failed: {0}")]
    Publish(StreamError),
}

impl IngestError {
    /// Stable code, as in the response body and the rejects metric.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::Unauthorized => "unauthorized",
            IngestError::Busy(_) => "stream_busy",
            IngestError::Replaced => "replaced",
            IngestError::Stream(StreamError::BadName) => "bad_name",
            IngestError::Stream(_) => "stream_unavailable",
            IngestError::Media(Fmp4Error::NotMp4(_)) => "not_mp4",
            IngestError::Media(Fmp4Error::TooLarge { .. }) => "too_large",
            IngestError::Media(Fmp4Error::Truncated(_)) => "truncated",
            IngestError::Media(Fmp4Error::NoInit) => "no_init",
            IngestError::Media(_) => "malformed_mp4",
            IngestError::Flv(FlvError::Codec(_)) => "unsupported_codec",
            IngestError::Flv(FlvError::TooLarge { .. }) => "too_large",
            IngestError::Flv(FlvError::NoKeyframe) => "no_keyframe",
            IngestError::Flv(_) => "malformed_flv",
            IngestError::Query(_) => "bad_query",
            IngestError::Body(_) => "body_error",
            IngestError::Idle => "idle_timeout",
            IngestError::Publish(_) => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            IngestError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngestError::Busy(_) | IngestError::Replaced => StatusCode::CONFLICT,
            IngestError::Stream(StreamError::BadName) => StatusCode::BAD_REQUEST,
            IngestError::Stream(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Media(Fmp4Error::NotMp4(_)) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Media(Fmp4Error::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Media(_)
            | IngestError::Flv(_)
            | IngestError::Query(_)
            | IngestError::Body(_) => StatusCode::BAD_REQUEST,
            IngestError::Idle => StatusCode::REQUEST_TIMEOUT,
            IngestError::Publish(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl IntoResponse for IngestError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": {"code": self.code(), "message": self.to_string()}}));
        (self.status(), body).into_response()
    }
}

/// The ingest routes, with their own state; merge into the app.
pub fn router(state: IngestState) -> Router {
    Router::new()
        .route("/ingest/{name}", put(ingest).post(ingest))
        .with_state(state)
}

/// The query of an ingest request.
#[derive(Debug, serde::Deserialize)]
struct IngestQuery {
    /// The publish token, for an encoder that cannot set a header.
    token: Option<String>,
}

/// Checks a publish, HTTP or RTMP: the publish token (`Authorization: Bearer
/// <token>`, or else `query_token`), then the stream name.
pub(crate) fn authorize(
    st: &IngestState,
    headers: &HeaderMap,
    query_token: Option<&str>,
    name: &str,
) -> Result<(), IngestError> {
    if !token_ok(headers, query_token, &st.publish_token) {
        return Err(IngestError::Unauthorized);
    }
    if !valid_name(name) {
        return Err(IngestError::Stream(StreamError::BadName));
    }
    Ok(())
}

/// Whether the request carries the publish token: `Authorization: Bearer
/// <token>`, or else `?token=<token>`.
pub(crate) fn token_ok(headers: &HeaderMap, query: Option<&str>, expected: &str) -> bool {
    let Some(got) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .or(query)
    else {
        return false;
    };
    // Constant time in the token's content. An empty token never matches.
    let (a, b) = (got.as_bytes(), expected.as_bytes());
    !b.is_empty()
        && a.len() == b.len()
        && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn ingest(
    State(st): State<IngestState>,
    Path(name): Path<String>,
    query: Result<Query<IngestQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = match query {
        Ok(Query(query)) => run(&st, &name, &headers, query.token.as_deref(), body).await,
        Err(e) => Err(IngestError::Query(e.body_text())),
    };
    match result {
        Ok((fragments, blocks)) => (
            StatusCode::OK,
            Json(json!({"fragments": fragments, "blocks": blocks})),
        )
            .into_response(),
        Err(e) => {
            st.metrics.reject(e.code());
            tracing::warn!(stream = %name, code = e.code(), "ingest rejected: {e}");
            e.into_response()
        }
    }
}

async fn run(
    st: &IngestState,
    name: &str,
    headers: &HeaderMap,
    query_token: Option<&str>,
    body: Body,
) -> Result<(u64, u64), IngestError> {
    authorize(st, headers, query_token, name)?;
    let body = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(|e| IngestError::Body(e.to_string())));
    publish(st, name, body).await
}

/// Publishes the fragmented MP4 of `body` to stream `name`, whose publisher
/// was checked; returns the fragments and blocks published. The HTTP route
/// and RTMP ingest both end here.
pub(crate) async fn publish(
    st: &IngestState,
    name: &str,
    mut body: impl Stream<Item = Result<Bytes, IngestError>> + Unpin,
) -> Result<(u64, u64), IngestError> {
    // Claimed at the init segment: a body that is not fragmented MP4 creates
    // no stream (and no key file), and takes no silent publisher's place.
    let mut guard: Option<PublishGuard> = None;
    let mut parser = Fmp4Parser::new();
    let (mut fragments, mut blocks) = (0u64, 0u64);
    // How far this publish's decode times move to continue the stream's
    // timeline, set at its first fragment.
    let mut shift = None;
    let mut idle_at = tokio::time::Instant::now() + IDLE_TIMEOUT;
    let mut warned_gop = false;
    loop {
        let replaced = async {
            match &guard {
                Some(g) => g.replaced().cancelled().await,
                None => std::future::pending().await,
            }
        };
        // Once silent long enough to be taken over, the publisher shows as
        // away to viewers until it sends again.
        let quiet = guard.as_ref().and_then(PublishGuard::quiet_in);
        let quiet = async {
            match quiet {
                Some(d) => tokio::time::sleep(d + Duration::from_millis(1)).await,
                None => std::future::pending().await,
            }
        };
        let next = tokio::select! {
            next = tokio::time::timeout_at(idle_at, body.next()) => next,
            () = replaced => return Err(IngestError::Replaced),
            () = quiet => {
                if let Some(g) = &guard {
                    g.note_quiet();
                }
                continue;
            }
        };
        let Some(chunk) = next.map_err(|_| IngestError::Idle)? else {
            break;
        };
        let chunk = chunk?;
        idle_at = tokio::time::Instant::now() + IDLE_TIMEOUT;
        if let Some(g) = &guard {
            g.alive();
        }
        for item in parser.push(&chunk)? {
            if guard.is_none() {
                guard = Some(claim(st, name)?);
            }
            let guard = guard.as_ref().expect("claimed above");
            match item {
                Item::Init(init) => guard.set_init(init).map_err(publishing)?,
                Item::Fragment(mut frag) => {
                    let by = *shift.get_or_insert_with(|| {
                        let by = continuation(guard.stream().timeline_end(), &frag);
                        if by != 0 {
                            let ms = i128::from(by) * 1000 / i128::from(frag.timescale.max(1));
                            tracing::info!(stream = %name, shift_ms = %ms, "publisher continues the stream's timeline");
                        }
                        by
                    });
                    frag.shift(by, parser.tracks())?;
                    let b = chunker::publish_fragment(guard, &frag, st.block_bytes)
                        .map_err(publishing)?;
                    fragments += 1;
                    blocks += b.len() as u64;
                    // Read at keyframes only, until the one warning.
                    let long_gop = (frag.keyframe && !warned_gop)
                        .then(|| guard.stream().keyframe_interval_ms())
                        .flatten()
                        .filter(|&ms| ms > LONG_KEYFRAME_INTERVAL_MS);
                    if let Some(ms) = long_gop {
                        warned_gop = true;
                        tracing::warn!(
                            stream = %name,
                            keyframe_interval_ms = ms,
                            "keyframes are far apart: viewers start at a keyframe, so they \
                             start up to that far back; set the encoder's keyframe interval \
                             to 1-2 s (OBS: Settings, Output, Keyframe Interval 2)"
                        );
                    }
                }
            }
        }
    }
    parser.finish()?;
    tracing::info!(stream = %name, fragments, blocks, "publisher finished");
    Ok((fragments, blocks))
}

/// Creates stream `name` if new and claims it for this publisher. A stream
/// that ended between the lookup and the claim is made again.
fn claim(st: &IngestState, name: &str) -> Result<PublishGuard, IngestError> {
    loop {
        let stream = st
            .streams
            .get_or_create(name)
            .map_err(IngestError::Stream)?;
        match stream.claim() {
            Ok(guard) => {
                tracing::info!(stream = %name, id = %stream.id, "publisher connected");
                return Ok(guard);
            }
            Err(StreamError::Ended) => continue,
            Err(_) => return Err(IngestError::Busy(name.to_owned())),
        }
    }
}

/// The ingest error for a failure to publish: the stream taken over, or a
/// server fault.
fn publishing(e: StreamError) -> IngestError {
    match e {
        StreamError::Replaced => IngestError::Replaced,
        e => IngestError::Publish(e),
    }
}

/// How many ticks of `first`'s timescale a publish whose first fragment is
/// `first` moves to start where the stream's timeline ends (`end`: ticks and
/// their timescale; `None` for a new stream, which keeps its own times).
///
/// A publisher that comes back (an encoder restarted, a network blip) starts
/// its decode times again, usually at zero, while the viewers' players have
/// media buffered up to the end of the last publish: MSE would put the new
/// fragments back in the past, over what was played, and the players would
/// wait at the old end until the new times caught up. Continued, the stream
/// goes on where it stopped; the players wait out only the wall-clock gap.
/// The shift is the same time for every track (see [`Fragment::shift`]).
pub(crate) fn continuation(end: Option<(u64, u32)>, first: &Fragment) -> i64 {
    let Some((end, scale)) = end else {
        return 0;
    };
    let end = u128::from(end) * u128::from(first.timescale) / u128::from(scale.max(1));
    let by = i128::try_from(end).unwrap_or(i128::MAX) - i128::from(first.media_time);
    i64::try_from(by).unwrap_or(if by < 0 { i64::MIN } else { i64::MAX })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::StoreConfig;
    use bytes::Bytes;
    use futures_util::stream;

    const FIXTURE: &[u8] = include_bytes!("../tests/fixtures/small.mp4");
    const TOKEN: &str = "idle-test-token";

    fn state() -> IngestState {
        IngestState {
            streams: Arc::new(Streams::new(
                None,
                StoreConfig {
                    store_seconds: 3600,
                    max_bytes: usize::MAX,
                },
            )),
            publish_token: TOKEN.into(),
            block_bytes: 16 * 1024,
            metrics: Arc::new(Metrics::default()),
        }
    }

    fn auth() -> HeaderMap {
        let mut h = HeaderMap::new();
        let v = format!("Bearer {TOKEN}")
            .parse()
            .expect("ASCII header value");
        h.insert(axum::http::header::AUTHORIZATION, v);
        h
    }

    /// The fixture in four chunks.
    fn quarters() -> Vec<Result<Bytes, std::io::Error>> {
        FIXTURE
            .chunks(FIXTURE.len().div_ceil(4))
            .map(|c| Ok(Bytes::from_static(c)))
            .collect()
    }

    #[test]
    fn a_returning_publisher_starts_where_the_timeline_ended() {
        let items = fmp4::split([FIXTURE]).expect("valid");
        let Some(Item::Fragment(first)) = items.into_iter().nth(1) else {
            panic!("a fragment after the init")
        };
        let t = i64::try_from(first.media_time).expect("small");
        let scale = first.timescale;
        assert_eq!(
            continuation(None, &first),
            0,
            "a new stream keeps its times"
        );
        // An end in the fragment's own timescale, ahead of it and behind it.
        assert_eq!(continuation(Some((90_000, scale)), &first), 90_000 - t);
        assert_eq!(continuation(Some((0, scale)), &first), -t);
        // An end in another timescale (a publisher with another encoder):
        // 10 s at 90 kHz is 10 s in the fragment's ticks.
        let ten = 10 * i64::from(scale);
        assert_eq!(continuation(Some((900_000, 90_000)), &first), ten - t);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stalled_publisher_gets_408_and_frees_the_name() {
        let st = state();
        let first = quarters().into_iter().take(2);
        let body = Body::from_stream(stream::iter(first).chain(stream::pending()));
        let started = tokio::time::Instant::now();
        let err = tokio::time::timeout(2 * IDLE_TIMEOUT, run(&st, "cam", &auth(), None, body))
            .await
            .expect("the server gives up on the publisher")
            .expect_err("stalls");
        assert!(started.elapsed() >= IDLE_TIMEOUT, "not before the timeout");
        assert!(matches!(err, IngestError::Idle), "{err}");
        assert_eq!(err.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(err.code(), "idle_timeout");
        let s = st.streams.get("cam").expect("created");
        assert!(s.live_edge().is_some(), "what arrived stays published");
        assert!(s.claim().is_ok(), "the name is free for the next publisher");
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_but_steady_publisher_is_not_cut_off() {
        let st = state();
        let gap = IDLE_TIMEOUT - Duration::from_secs(1);
        let body = Body::from_stream(stream::iter(quarters()).then(move |c| async move {
            tokio::time::sleep(gap).await;
            c
        }));
        let started = tokio::time::Instant::now();
        let (fragments, _) = run(&st, "cam", &auth(), None, body)
            .await
            .expect("accepted");
        assert!(started.elapsed() > 3 * IDLE_TIMEOUT, "the limit is per gap");
        let whole = fmp4::split([FIXTURE]).expect("valid fixture");
        assert_eq!(fragments as usize, whole.len() - 1, "every fragment");
    }
}
