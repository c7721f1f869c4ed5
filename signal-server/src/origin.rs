//! The origin: stream metadata, init segments and blocks over plain HTTP.
//!
//! | route | answer |
//! |---|---|
//! | `GET /streams` | JSON list of `{id, name, live_edge, clubs, bitrate_kbps, keyframe_interval_ms, peers, publishing}` |
//! | `GET /streams/{id}` | one such object (`id` may be the name); 404 if unknown |
//! | `GET /streams/{id}/init` | the newest init segment (`video/mp4`); 404 until published |
//! | `GET /streams/{id}/init?seq={seq}` | the init segment block `seq` needs (a publisher that comes back may bring another; its first block is flagged `NEW_INIT`) |
//! | `GET`/`HEAD /streams/{id}/blocks/{seq}` | the encoded block |
//! | `GET /streams/{id}/blocks?from={seq}&max={n}` | a run: the encoded blocks from `seq` on, back to back |
//!
//! Blocks are immutable: 200 carries `Cache-Control: public, max-age=31536000,
//! immutable` and an `ETag` made from the block's signature, so any HTTP cache
//! can sit in front; a matching `If-None-Match` gets 304. 404 means evicted or
//! unknown, 425 not produced yet (with `Retry-After`).
//!
//! A client that follows the live edge may send `Prefer: wait=<seconds>` (RFC
//! 7240): a block not produced yet, but at most [`WAIT_AHEAD`] beyond the next
//! one, is then answered when it is produced, or with 425 after
//! min(wait, [`MAX_WAIT`]). At most [`MAX_WAITING_REQUESTS`] requests wait at
//! once (beyond it, 425 at once), and shutdown ends every wait. Without the
//! header, 425 comes at once, so caches and other clients see no change.
//!
//! A run answers the produced blocks from `from` on, at most `max` (default and
//! cap [`MAX_RUN_BLOCKS`]), concatenated; each block's header gives its length,
//! so a client splits the body without any framing. The first block decides
//! the status as for a single block (404, 425, 429, `Prefer: wait`); the run
//! then stops before the first block not produced yet or over the grant. It is
//! `no-cache` (its extent depends on when it is asked) and carries
//! `X-Clubcast-Blocks: <count>`. A viewer that plays from the origin alone
//! makes one request per fragment instead of one per block.
//!
//! Gap fill is metered: a `GET` that serves a block debits [`Grants`] by the
//! encoded size × 8 bits, from the peer named by `Authorization: Bearer
//! <grant_token>` or, without a token, from the shared anonymous bucket. Over
//! the grant is 429 with `Retry-After` (seconds to the next bid interval); an
//! unknown token is 401. `HEAD`, 304 and the init segment are not metered.
//! Errors are JSON `{"code": "...", "message": "..."}`, and every answer is
//! counted in `clubcast_origin_requests_total{status}`.

use std::time::{Duration, Instant};

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use bytes::BytesMut;
use serde::Serialize;

use crate::app::AppState;
use crate::grants::{GrantError, Grants};
use crate::metrics::Metrics;
use crate::store::Lookup;
use crate::stream::Stream;

/// `Cache-Control` of a served block.
pub const IMMUTABLE: &str = "public, max-age=31536000, immutable";
/// Seconds a client should wait before asking again for a block not yet produced.
pub const NOT_YET_RETRY_SECS: u64 = 1;
/// Longest a `Prefer: wait` request is held.
pub const MAX_WAIT: Duration = Duration::from_secs(5);
/// How far beyond the next block a `Prefer: wait` request may wait, blocks.
pub const WAIT_AHEAD: u64 = 4;
/// Most block requests waiting at once, over all streams.
pub const MAX_WAITING_REQUESTS: usize = 4096;
/// Most blocks in one run answer (and its default `max`): 256 KiB of 4-KiB blocks.
pub const MAX_RUN_BLOCKS: u64 = 64;
/// Header of a run answer: how many blocks it carries.
pub const RUN_BLOCKS_HEADER: &str = "x-clubcast-blocks";

/// Errors the origin answers with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OriginError {
    /// No stream with this id or name.
    #[error("no stream {0:?}")]
    UnknownStream(String),
    /// The stream has no init segment yet.
    #[error("the stream has not been published yet")]
    NoInit,
    /// The seq is not a decimal u64.
    #[error("block seq must be a decimal integer")]
    BadSeq,
    /// A run's query is not `from=<seq>[&max=<n>]` with decimal numbers, n ≥ 1.
    #[error("a run is asked as ?from=<seq>&max=<n> with decimal integers, n >= 1")]
    BadRun,
    /// The block was evicted from the store.
    #[error("block {0} is no longer stored")]
    Evicted(u64),
    /// The block has not been produced yet.
    #[error("block {0} has not been produced yet")]
    NotYet(u64),
    /// The `Authorization` header is not `Bearer <token>`.
    #[error("Authorization must be \"Bearer <grant_token>\"")]
    BadAuthorization,
    /// The grant ledger refused the request.
    #[error(transparent)]
    Grant(#[from] GrantError),
}

impl OriginError {
    fn status(&self) -> StatusCode {
        match self {
            OriginError::UnknownStream(_) | OriginError::NoInit | OriginError::Evicted(_) => {
                StatusCode::NOT_FOUND
            }
            OriginError::BadSeq | OriginError::BadRun => StatusCode::BAD_REQUEST,
            OriginError::NotYet(_) => StatusCode::TOO_EARLY,
            OriginError::BadAuthorization | OriginError::Grant(GrantError::UnknownToken) => {
                StatusCode::UNAUTHORIZED
            }
            OriginError::Grant(_) => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Stable code in the JSON body and in `clubcast_rejects_total`.
    pub fn code(&self) -> &'static str {
        match self {
            OriginError::UnknownStream(_) => "unknown_stream",
            OriginError::NoInit => "not_published",
            OriginError::BadSeq => "bad_seq",
            OriginError::BadRun => "bad_run",
            OriginError::Evicted(_) => "evicted",
            OriginError::NotYet(_) => "not_yet",
            OriginError::BadAuthorization => "bad_authorization",
            OriginError::Grant(g) => g.code(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            OriginError::NotYet(_) => Some(NOT_YET_RETRY_SECS),
            OriginError::Grant(g) => g.retry_after().map(|d| d.as_secs().max(1)),
            _ => None,
        }
    }

    fn respond(&self, metrics: &Metrics) -> Response {
        let status = self.status();
        metrics.reject(self.code());
        metrics.origin_request(status.as_u16());
        let body = serde_json::json!({ "code": self.code(), "message": self.to_string() });
        let mut r = (status, Json(body)).into_response();
        let h = r.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

/// A stream as the listing shows it.
#[derive(Debug, Serialize)]
pub struct StreamSummary {
    /// URL form of the stream key.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Newest block, `null` before the first.
    pub live_edge: Option<u64>,
    /// Clubs C.
    pub clubs: u16,
    /// Bitrate estimate, kbit/s.
    pub bitrate_kbps: u32,
    /// About how far apart the publisher's keyframes are, ms (`null` before
    /// the second). New viewers start at a keyframe, so a long interval
    /// (over 4 s) makes them start further back and fetch more to catch up.
    pub keyframe_interval_ms: Option<u64>,
    /// Peers in the swarm.
    pub peers: usize,
    /// Whether a publisher is connected and sending: `false` for a stream
    /// whose publisher went away or stayed silent long enough to be taken
    /// over (viewers keep waiting; it may come back).
    pub publishing: bool,
}

fn summary(state: &AppState, s: &Stream) -> StreamSummary {
    StreamSummary {
        id: s.id.clone(),
        name: s.name.clone(),
        live_edge: s.live_edge(),
        clubs: state.config.club_config().clubs,
        bitrate_kbps: s.bitrate_kbps(),
        keyframe_interval_ms: s.keyframe_interval_ms(),
        peers: state.hub.peers(&s.id),
        publishing: s.publishing(),
    }
}

/// The origin's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/streams", get(list))
        .route("/streams/{id}", get(one))
        .route("/streams/{id}/init", get(init))
        .route("/streams/{id}/blocks/{seq}", get(block))
        .route("/streams/{id}/blocks", get(run))
}

fn ok(metrics: &Metrics, r: impl IntoResponse) -> Response {
    let r = r.into_response();
    metrics.origin_request(r.status().as_u16());
    r
}

async fn list(State(state): State<AppState>) -> Response {
    let all: Vec<StreamSummary> = state
        .streams
        .list()
        .iter()
        .map(|s| summary(&state, s))
        .collect();
    ok(&state.metrics, no_cache(Json(all)))
}

async fn one(State(state): State<AppState>, Path(id): Path<String>) -> Response {
    match state.streams.get(&id) {
        Some(s) => ok(&state.metrics, no_cache(Json(summary(&state, &s)))),
        None => OriginError::UnknownStream(id).respond(&state.metrics),
    }
}

async fn init(
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> Response {
    let r = init_query(query.as_deref()).and_then(|seq| {
        let s = state
            .streams
            .get(&id)
            .ok_or(OriginError::UnknownStream(id))?;
        let init = match seq {
            Some(seq) => s.init_segment_at(seq),
            None => s.init_segment(),
        };
        init.ok_or(OriginError::NoInit)
    });
    match r {
        Ok(bytes) => ok(
            &state.metrics,
            (
                [
                    (header::CONTENT_TYPE, "video/mp4"),
                    // A new publisher may send a different init under the same id.
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                bytes,
            ),
        ),
        Err(e) => e.respond(&state.metrics),
    }
}

fn no_cache(r: impl IntoResponse) -> Response {
    let mut r = r.into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

async fn block(
    State(state): State<AppState>,
    method: Method,
    Path((id, seq)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let serve = || {
        serve_block(
            &state.streams,
            &state.grants,
            &state.metrics,
            &method,
            &id,
            &seq,
            &headers,
        )
    };
    answer_or_wait(&state, &id, &headers, serve).await
}

async fn run(
    State(state): State<AppState>,
    method: Method,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let (from, max) = match run_query(query.as_deref()) {
        Ok(q) => q,
        Err(e) => return e.respond(&state.metrics),
    };
    let serve = || {
        serve_run(
            &state.streams,
            &state.grants,
            &state.metrics,
            &method,
            &id,
            (from, max),
            &headers,
        )
    };
    answer_or_wait(&state, &id, &headers, serve).await
}

/// `from` and `max` of a run's query string; `max` defaults to, and is capped
/// at, [`MAX_RUN_BLOCKS`]. Unknown keys are ignored.
fn run_query(query: Option<&str>) -> Result<(u64, u64), OriginError> {
    let (mut from, mut max) = (None, MAX_RUN_BLOCKS);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or(OriginError::BadRun)?;
        let n: u64 = v.parse().map_err(|_| OriginError::BadRun)?;
        match k {
            "from" => from = Some(n),
            "max" if n >= 1 => max = n.min(MAX_RUN_BLOCKS),
            "max" => return Err(OriginError::BadRun),
            _ => {}
        }
    }
    Ok((from.ok_or(OriginError::BadRun)?, max))
}

/// `seq` of an init request's query string, if given. Unknown keys are
/// ignored.
fn init_query(query: Option<&str>) -> Result<Option<u64>, OriginError> {
    let mut seq = None;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        if let Some(v) = pair.strip_prefix("seq=") {
            seq = Some(v.parse().map_err(|_| OriginError::BadSeq)?);
        }
    }
    Ok(seq)
}

/// Answers `serve`; when that is "not produced yet" and the client sent
/// `Prefer: wait`, waits for the block (see [`wait_for`]) and answers again.
async fn answer_or_wait(
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    serve: impl Fn() -> Result<Response, OriginError>,
) -> Response {
    let mut answer = serve();
    if let (Err(OriginError::NotYet(n)), Some(wait)) = (&answer, prefer_wait(headers, MAX_WAIT)) {
        if let Some(stream) = state.streams.get(id) {
            let produced = tokio::select! {
                p = wait_for(&stream, *n, wait, &state.origin_waiters) => p,
                () = state.shutdown.cancelled() => false,
            };
            if produced {
                answer = serve();
            }
        }
    }
    match answer {
        Ok(r) => ok(&state.metrics, r),
        Err(e) => e.respond(&state.metrics),
    }
}

/// The wait a `Prefer: wait=<seconds>` header asks for, at most `max`;
/// `None` without one (or with a malformed one).
pub(crate) fn prefer_wait(headers: &HeaderMap, max: Duration) -> Option<Duration> {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split([',', ';']))
        .find_map(|pref| {
            let (k, v) = pref.split_once('=')?;
            if !k.trim().eq_ignore_ascii_case("wait") {
                return None;
            }
            let secs: u64 = v.trim().trim_matches('"').parse().ok()?;
            Some(Duration::from_secs(secs).min(max))
        })
        .filter(|d| !d.is_zero())
}

/// Waits, at most `wait`, until block `seq` of `stream` is produced; whether it
/// was. Only a block at most [`WAIT_AHEAD`] beyond the next one waits, and only
/// while a slot of `slots` is free.
async fn wait_for(
    stream: &Stream,
    seq: u64,
    wait: Duration,
    slots: &tokio::sync::Semaphore,
) -> bool {
    let next = stream.next_seq();
    if seq > next.saturating_add(WAIT_AHEAD) {
        return false;
    }
    let Ok(_slot) = slots.try_acquire() else {
        return false;
    };
    // Subscribe before looking again, so a block published in between is seen.
    let mut rx = stream.subscribe();
    let produced = |s: &Stream| !matches!(s.block(seq), Lookup::NotYet);
    if produced(stream) {
        return true;
    }
    let waited = tokio::time::timeout(wait, async {
        loop {
            match rx.recv().await {
                Ok(b) if b.seq() >= seq => return true,
                Ok(_) => {}
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    if produced(stream) {
                        return true;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return false,
            }
        }
    })
    .await;
    waited.unwrap_or(false)
}

/// The grant token of `Authorization: Bearer <token>`; `None` without the
/// header, an error for any other form of it. On-demand runs read it too.
pub(crate) fn bearer(headers: &HeaderMap) -> Result<Option<&str>, OriginError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| OriginError::BadAuthorization)?;
    let (scheme, token) = v.split_once(' ').ok_or(OriginError::BadAuthorization)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(OriginError::BadAuthorization);
    }
    Ok(Some(token.trim()))
}

/// The stream `id` names (its id or its name).
fn find(streams: &crate::stream::Streams, id: &str) -> Result<std::sync::Arc<Stream>, OriginError> {
    streams
        .get(id)
        .ok_or_else(|| OriginError::UnknownStream(id.chars().take(80).collect()))
}

fn serve_block(
    streams: &crate::stream::Streams,
    grants: &Grants,
    metrics: &Metrics,
    method: &Method,
    id: &str,
    seq: &str,
    headers: &HeaderMap,
) -> Result<Response, OriginError> {
    let stream = find(streams, id)?;
    let seq: u64 = seq.parse().map_err(|_| OriginError::BadSeq)?;
    let token = bearer(headers)?;
    let block = match stream.block(seq) {
        Lookup::Found(b) => b,
        Lookup::Evicted => return Err(OriginError::Evicted(seq)),
        Lookup::NotYet => return Err(OriginError::NotYet(seq)),
    };
    let sig = &block.block.block().signature;
    let etag = format!("\"{}\"", data_encoding::HEXLOWER.encode(&sig[..16]));
    let etag = HeaderValue::from_str(&etag).expect("hex in quotes is a valid header value");
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == etag.as_bytes() || v.as_bytes() == b"*");
    let cache = [
        (header::CACHE_CONTROL, HeaderValue::from_static(IMMUTABLE)),
        (header::ETAG, etag),
    ];
    if fresh {
        return Ok((StatusCode::NOT_MODIFIED, cache).into_response());
    }
    if method != Method::HEAD {
        let bits = block.encoded.len() as u64 * 8;
        grants.debit(token, bits, Instant::now())?;
        metrics.gap_fill(block.encoded.len() as u64);
    }
    let ctype = [(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    )];
    Ok((StatusCode::OK, cache, ctype, block.encoded.clone()).into_response())
}

/// A run of blocks from `from`, at most `max`: see the module doc.
fn serve_run(
    streams: &crate::stream::Streams,
    grants: &Grants,
    metrics: &Metrics,
    method: &Method,
    id: &str,
    (from, max): (u64, u64),
    headers: &HeaderMap,
) -> Result<Response, OriginError> {
    let stream = find(streams, id)?;
    let token = bearer(headers)?;
    let now = Instant::now();
    let mut body = BytesMut::new();
    let mut count = 0u64;
    for seq in from..from.saturating_add(max) {
        let block = match (stream.block(seq), count) {
            (Lookup::Found(b), _) => b,
            (Lookup::Evicted, 0) => return Err(OriginError::Evicted(seq)),
            (Lookup::NotYet, 0) => return Err(OriginError::NotYet(seq)),
            _ => break,
        };
        if method != Method::HEAD {
            let len = block.encoded.len() as u64;
            match grants.debit(token, len * 8, now) {
                Ok(()) => metrics.gap_fill(len),
                Err(e) if count == 0 => return Err(e.into()),
                Err(_) => break,
            }
        }
        body.extend_from_slice(&block.encoded);
        count += 1;
    }
    let headers = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        ),
        (
            header::HeaderName::from_static(RUN_BLOCKS_HEADER),
            HeaderValue::from(count),
        ),
    ];
    Ok((StatusCode::OK, headers, body.freeze()).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefer(values: &[&str]) -> Option<Duration> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("prefer", HeaderValue::from_str(v).expect("header"));
        }
        prefer_wait(&h, MAX_WAIT)
    }

    #[test]
    fn prefer_wait_is_read_from_any_preference_and_capped() {
        assert_eq!(prefer(&[]), None);
        assert_eq!(prefer(&["wait=2"]), Some(Duration::from_secs(2)));
        assert_eq!(
            prefer(&["respond-async, Wait = 3"]),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            prefer(&["return=minimal", "wait=\"1\""]),
            Some(Duration::from_secs(1))
        );
        assert_eq!(prefer(&["wait=3600"]), Some(MAX_WAIT));
        assert_eq!(prefer(&["wait=0"]), None);
        assert_eq!(prefer(&["wait=-1"]), None);
        assert_eq!(prefer(&["wait=soon"]), None);
        assert_eq!(prefer(&["waiting=2"]), None);
    }

    #[test]
    fn run_query_needs_from_and_caps_max() {
        assert_eq!(run_query(Some("from=7")).ok(), Some((7, MAX_RUN_BLOCKS)));
        assert_eq!(run_query(Some("from=7&max=3")).ok(), Some((7, 3)));
        assert_eq!(run_query(Some("max=3&from=0&x=1")).ok(), Some((0, 3)));
        assert_eq!(
            run_query(Some("from=7&max=100000")).ok(),
            Some((7, MAX_RUN_BLOCKS))
        );
        for bad in [
            None,
            Some(""),
            Some("max=3"),
            Some("from=-1"),
            Some("from=7&max=0"),
            Some("from"),
            Some("from=1e3"),
        ] {
            assert!(
                matches!(run_query(bad), Err(OriginError::BadRun)),
                "{bad:?}"
            );
        }
    }
}
