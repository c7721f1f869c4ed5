//! `PUT`/`POST /ingest/{name}`: live fragmented MP4 from any encoder.
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
//! Errors answer with a JSON body `{"error":{"code","message"}}`: 401 for a
//! missing or wrong token, 409 when another publisher holds the name, 415 when the
//! body is not MP4, 413 for an oversized box, init segment or fragment, 400 for a
//! truncated, empty or malformed stream or a bad name. Blocks published before an
//! error stay stored, and other streams are not touched.

pub mod chunker;
pub mod fmp4;

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use futures_util::StreamExt;
use serde_json::json;

use crate::metrics::Metrics;
use crate::stream::{StreamError, Streams};
use fmp4::{Fmp4Error, Fmp4Parser, Item};

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
    /// The stream name is invalid or the server is full.
    #[error(transparent)]
    Stream(StreamError),
    /// The body is not valid fragmented MP4.
    #[error(transparent)]
    Media(#[from] Fmp4Error),
    /// The request body failed mid-stream.
    #[error("request body: {0}")]
    Body(String),
}

impl IngestError {
    /// Stable code, as in the response body and the rejects metric.
    pub fn code(&self) -> &'static str {
        match self {
            IngestError::Unauthorized => "unauthorized",
            IngestError::Busy(_) => "stream_busy",
            IngestError::Stream(StreamError::BadName) => "bad_name",
            IngestError::Stream(_) => "stream_unavailable",
            IngestError::Media(Fmp4Error::NotMp4(_)) => "not_mp4",
            IngestError::Media(Fmp4Error::TooLarge { .. }) => "too_large",
            IngestError::Media(Fmp4Error::Truncated(_)) => "truncated",
            IngestError::Media(Fmp4Error::NoInit) => "no_init",
            IngestError::Media(_) => "malformed_mp4",
            IngestError::Body(_) => "body_error",
        }
    }

    fn status(&self) -> StatusCode {
        match self {
            IngestError::Unauthorized => StatusCode::UNAUTHORIZED,
            IngestError::Busy(_) => StatusCode::CONFLICT,
            IngestError::Stream(StreamError::BadName) => StatusCode::BAD_REQUEST,
            IngestError::Stream(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngestError::Media(Fmp4Error::NotMp4(_)) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            IngestError::Media(Fmp4Error::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            IngestError::Media(_) | IngestError::Body(_) => StatusCode::BAD_REQUEST,
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

fn token_ok(headers: &HeaderMap, expected: &str) -> bool {
    let Some(got) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
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
    headers: HeaderMap,
    body: Body,
) -> Response {
    match run(&st, &name, &headers, body).await {
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
    body: Body,
) -> Result<(u64, u64), IngestError> {
    if !token_ok(headers, &st.publish_token) {
        return Err(IngestError::Unauthorized);
    }
    let stream = st
        .streams
        .get_or_create(name)
        .map_err(IngestError::Stream)?;
    let guard = stream
        .claim()
        .map_err(|_| IngestError::Busy(name.to_owned()))?;
    tracing::info!(stream = %name, id = %stream.id, "publisher connected");
    let mut parser = Fmp4Parser::new();
    let mut body = body.into_data_stream();
    let (mut fragments, mut blocks) = (0u64, 0u64);
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| IngestError::Body(e.to_string()))?;
        for item in parser.push(&chunk)? {
            match item {
                Item::Init(init) => guard.stream().set_init(init),
                Item::Fragment(frag) => {
                    let b = chunker::publish_fragment(guard.stream(), &frag, st.block_bytes)
                        .map_err(IngestError::Stream)?;
                    fragments += 1;
                    blocks += b.len() as u64;
                }
            }
        }
    }
    parser.finish()?;
    tracing::info!(stream = %name, fragments, blocks, "publisher finished");
    Ok((fragments, blocks))
}
