//! On-demand playback (VOD): fragmented MP4 files uploaded once, played by
//! any browser from the start or from a seek, every block and the init
//! segment verified against the asset's signed manifest
//! ([`clubcast_protocol::vod`]).
//!
//! | route | answer |
//! |---|---|
//! | `PUT /vod/{name}` (`?replace=true`) | body: a fragmented MP4 file. 201 with the asset's summary |
//! | `DELETE /vod/{name}` | 204 |
//! | `GET /vod` | JSON array of summaries, by name |
//! | `GET /vod/{name}` | the summary `{name, key, duration_s, blocks, bytes, fragments, created_ms}` |
//! | `GET /vod/{name}/manifest` | the signed manifest JSON, as stored (`application/json`) |
//! | `GET /vod/{name}/init` | the init segment (`video/mp4`) |
//! | `GET /vod/{name}/blocks?from={seq}&count={n}[&key={key id}]` (`Authorization: Bearer <grant_token>` optional) | the encoded blocks `seq..seq+n`, back to back (`application/octet-stream`, `X-Clubcast-Blocks: <n served>`), fewer if the grant does not cover them all |
//!
//! An upload is a file as ffmpeg writes it for streaming (`ftyp` + `moov`
//! with `mvex`, then `moof`/`mdat` pairs):
//!
//! ```text
//! ffmpeg -i in.mp4 -c copy -movflags frag_keyframe+empty_moov+default_base_moof -f mp4 out.mp4
//! curl -T out.mp4 -H "Authorization: Bearer $TOKEN" http://127.0.0.1:8080/vod/talk
//! ```
//!
//! It needs the publish token, as ingest does (`Authorization: Bearer
//! <token>` or `?token=`). The body is never held whole: it goes through the
//! live ingest's splitter as it arrives, and each fragment is cut into blocks
//! of `--block-kib` exactly as a live fragment is, signed with a fresh asset
//! key and written to disk at once ([`upload`]). The asset appears only when
//! the whole file checked out; until then, and after any failure, the old
//! asset of the name (with `?replace=true`) is served unchanged
//! ([`library`]).
//!
//! Blocks are read from `blocks.bin` by byte range ([`asset`]). A run asks
//! for `count` blocks (default and cap [`MAX_RUN_BLOCKS`]); it is cut short at
//! the asset's end, and `from` past the end is 416. The manifest, init and
//! block answers carry `Cache-Control: no-cache` and an `ETag` derived from the
//! asset key, so a cache revalidates (a replace changes the key) and gets 304
//! for what it has.
//!
//! Runs are metered (unless `--vod-budget-kbps 0`) by an on-demand grant
//! ledger of their own ([`crate::grants`]), apart from live gap fill's: a
//! viewer seated with `join_vod` gets a `grant_token` in its welcome, bids
//! every bid interval and gets grants, and sends `Authorization: Bearer
//! <grant_token>` on its runs; a run without the header draws on the
//! anonymous share (`--anonymous-budget-percent`). A `GET` that sends blocks
//! debits the encoded size × 8 of as many leading blocks as fit
//! ([`Grants::debit_prefix`](crate::grants::Grants::debit_prefix)), after the
//! key and range checks and the `If-None-Match` check. When fewer fit than
//! were asked for, the answer is the shorter run: `X-Clubcast-Blocks` says
//! how many, the `ETag` is that run's, and it is `Cache-Control: no-store`
//! (a cache must not keep it under the full run's URL). When not even the
//! first fits: 429 `over_grant` (with a token) or `over_anonymous_budget`
//! (without), with `Retry-After` (seconds to the next interval). An unknown
//! token is 401 `unknown_token` (the viewer left: its token is forgotten),
//! and an `Authorization` header that is not `Bearer <token>` is 400
//! `bad_authorization`. `HEAD`, a 304, the manifest and the init segment are
//! not metered. Unmetered, the header is ignored and runs are served whole.
//!
//! # Limits
//! | what | bound | at the bound |
//! |---|---|---|
//! | upload size | `--vod-max-bytes` (2 GiB) | 413 `too_large` |
//! | stored assets | `--vod-max-assets` (1000) | 507 `vod_full` for a new name |
//! | uploads and deletes at once | [`MAX_UPLOADS`] | 503 `too_many_uploads` |
//! | fragments | `MAX_FRAGMENTS` of the protocol | 413 `too_large` |
//! | an upload's silence | [`IDLE_TIMEOUT`] | 408 `idle_timeout` |
//! | box, init, fragment | the splitter's bounds | 413 `too_large` |
//! | run egress | `--vod-budget-kbps` (1 Gbit/s) per bid interval: grants, the spare bid budget, the anonymous share | a cut run (`no-store`), else 429 `over_grant` / `over_anonymous_budget` |
//!
//! Errors are JSON `{"code": "...", "message": "..."}` with a stable code
//! ([`VodError::code`]), counted in `clubcast_rejects_total{code}` (404
//! aside). `clubcast_vod_assets` is the number of assets,
//! `clubcast_vod_bytes_total` the block bytes served, and
//! `clubcast_vod_uploads_total{result}` counts uploads by `created`,
//! `replaced` or error code. The ledger's refusals of runs are also counted
//! apart from live gap fill's, in `clubcast_vod_refused_total{code}`, as its
//! bids and grants are (`clubcast_vod_bids_total`, `clubcast_vod_grants_total`,
//! `clubcast_vod_granted_bits_total`).
//!
//! With the demo source on, the built-in clip ([`crate::demo::CLIP`]) is
//! also the asset `--demo-name` (`demo`), kept in memory under a key made at
//! start; it cannot be replaced or deleted (409 `builtin_asset`).

pub mod asset;
pub mod library;
pub mod upload;

use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clubcast_protocol::block::{BlockError, StreamSigner};
use clubcast_protocol::vod::{VodError as ManifestError, MAX_RUN_BLOCKS};
use futures_util::StreamExt;

use crate::app::AppState;
use crate::grants::GrantError;
use crate::ingest::chunker::now_ms;
use crate::ingest::fmp4::Fmp4Error;
use crate::ingest::{token_ok, IDLE_TIMEOUT};
use crate::metrics::Metrics;
pub use asset::{Asset, AssetSummary};
pub use library::{Loaded, Stored, VodLibrary, VodLimits, MAX_UPLOADS};
use upload::Upload;

/// An asset's init segment file.
pub const INIT_FILE: &str = "init.mp4";
/// An asset's block file: the encoded blocks, back to back.
pub const BLOCKS_FILE: &str = "blocks.bin";
/// An asset's signed manifest file.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Default `--vod-max-bytes`: 2 GiB.
pub const DEFAULT_MAX_BYTES: u64 = 2 << 30;
/// Default `--vod-max-assets`.
pub const DEFAULT_MAX_ASSETS: usize = 1000;
/// Header of a run answer: how many blocks it carries.
pub const RUN_BLOCKS_HEADER: &str = "x-clubcast-blocks";

/// Errors of the on-demand routes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VodError {
    /// No `Authorization: Bearer` header or `?token=`, or the wrong token.
    #[error("missing or wrong publish token")]
    Unauthorized,
    /// The name is not 1-64 of `a-z`, `0-9`, `_`, `-`.
    #[error("asset names are 1-64 characters of a-z, 0-9, '_' and '-'")]
    BadName,
    /// The query string cannot be read.
    #[error("query string: {0}")]
    BadQuery(String),
    /// No asset of this name.
    #[error("no on-demand asset {0:?}")]
    UnknownAsset(String),
    /// An asset of this name exists and the upload did not ask to replace it.
    #[error("asset {0:?} exists; upload with ?replace=true to replace it")]
    Exists(String),
    /// Another upload or delete of this name is running.
    #[error("asset {0:?} is being uploaded or deleted; try again when that is done")]
    Busy(String),
    /// The asset is built in.
    #[error("asset {0:?} is built in and cannot be replaced or deleted")]
    Builtin(String),
    /// `--vod-max-assets` assets are stored.
    #[error("the server holds its most on-demand assets ({0}); delete one first")]
    Full(usize),
    /// [`MAX_UPLOADS`] uploads and deletes are running.
    #[error("{0} uploads are running; try again later")]
    TooManyUploads(usize),
    /// The file is over `--vod-max-bytes`.
    #[error("the file is over the limit of {0} bytes (--vod-max-bytes)")]
    TooLarge(u64),
    /// The file has more fragments than a manifest may list.
    #[error("the file has more than {0} fragments")]
    TooManyFragments(usize),
    /// The body is not valid fragmented MP4. The message says how to make
    /// one, since the usual cause is a plain (unfragmented) MP4 file.
    #[error("{0}; an upload must be fragmented MP4, as `ffmpeg -i in.mp4 -c copy -movflags frag_keyframe+empty_moov+default_base_moof -f mp4 out.mp4` writes it")]
    Media(#[from] Fmp4Error),
    /// A second `moov` came after the first.
    #[error("an on-demand asset has one init segment")]
    SecondInit,
    /// The file has an init segment but no `moof`/`mdat`.
    #[error("the file has no media fragments")]
    NoFragments,
    /// The file's fragments do not make a valid manifest.
    #[error("the file does not make a valid asset: {0}")]
    Manifest(ManifestError),
    /// A run's query is not `from=<seq>[&count=<n>]`, n ≥ 1.
    #[error("a run is asked as ?from=<seq>&count=<n> with decimal integers, n >= 1")]
    BadRun,
    /// The run names (`?key=`) another upload than the asset's current one:
    /// it was replaced while a viewer played it.
    #[error(
        "asset {0:?} was replaced: its blocks are another upload's now; load its manifest again"
    )]
    Replaced(String),
    /// A run's `Authorization` header is not `Bearer <grant_token>`.
    #[error("Authorization must be \"Bearer <grant_token>\"")]
    BadAuthorization,
    /// The on-demand grant ledger refused the run: its first block is over
    /// the grant or the anonymous share (429), or the token is unknown (401).
    #[error(transparent)]
    Grant(#[from] GrantError),
    /// The run starts past the asset's last block.
    #[error("block {from} is past the asset's end ({blocks} blocks)")]
    OutOfRange {
        /// The first block asked for.
        from: u64,
        /// The asset's block count.
        blocks: u64,
    },
    /// The request body failed mid-stream.
    #[error("request body: {0}")]
    Body(String),
    /// The uploader sent nothing for [`IDLE_TIMEOUT`].
    #[error("no data for {} s", IDLE_TIMEOUT.as_secs())]
    Idle,
    /// A block could not be signed (a server bug, not the input).
    #[error("signing: {0}")]
    Block(#[from] BlockError),
    /// Reading or writing the data dir failed.
    #[error("storage: {0}")]
    Io(#[from] std::io::Error),
    /// A stored asset does not match its manifest.
    #[error("damaged asset: {0}")]
    Damaged(String),
}

impl VodError {
    /// Stable code, as in the response body and the metrics.
    pub fn code(&self) -> &'static str {
        match self {
            VodError::Unauthorized => "unauthorized",
            VodError::BadName => "bad_name",
            VodError::BadQuery(_) => "bad_query",
            VodError::UnknownAsset(_) => "unknown_asset",
            VodError::Exists(_) => "asset_exists",
            VodError::Busy(_) => "asset_busy",
            VodError::Builtin(_) => "builtin_asset",
            VodError::Full(_) => "vod_full",
            VodError::TooManyUploads(_) => "too_many_uploads",
            VodError::TooLarge(_)
            | VodError::TooManyFragments(_)
            | VodError::Media(Fmp4Error::TooLarge { .. }) => "too_large",
            VodError::Media(Fmp4Error::NotMp4(_)) => "not_mp4",
            VodError::Media(Fmp4Error::Truncated(_)) => "truncated",
            VodError::Media(Fmp4Error::NoInit) => "no_init",
            VodError::Media(_) => "malformed_mp4",
            VodError::SecondInit | VodError::NoFragments | VodError::Manifest(_) => "bad_media",
            VodError::BadRun => "bad_run",
            VodError::Replaced(_) => "asset_replaced",
            VodError::BadAuthorization => "bad_authorization",
            VodError::Grant(g) => g.code(),
            VodError::OutOfRange { .. } => "out_of_range",
            VodError::Body(_) => "body_error",
            VodError::Idle => "idle_timeout",
            VodError::Block(_) | VodError::Io(_) | VodError::Damaged(_) => "internal",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            VodError::Unauthorized | VodError::Grant(GrantError::UnknownToken) => {
                StatusCode::UNAUTHORIZED
            }
            VodError::Grant(_) => StatusCode::TOO_MANY_REQUESTS,
            VodError::UnknownAsset(_) => StatusCode::NOT_FOUND,
            VodError::Exists(_)
            | VodError::Busy(_)
            | VodError::Builtin(_)
            | VodError::Replaced(_) => StatusCode::CONFLICT,
            VodError::Full(_) => StatusCode::INSUFFICIENT_STORAGE,
            VodError::TooManyUploads(_) => StatusCode::SERVICE_UNAVAILABLE,
            VodError::TooLarge(_)
            | VodError::TooManyFragments(_)
            | VodError::Media(Fmp4Error::TooLarge { .. }) => StatusCode::PAYLOAD_TOO_LARGE,
            VodError::Media(Fmp4Error::NotMp4(_)) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            VodError::OutOfRange { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            VodError::Idle => StatusCode::REQUEST_TIMEOUT,
            VodError::Block(_) | VodError::Io(_) | VodError::Damaged(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            VodError::BadName
            | VodError::BadQuery(_)
            | VodError::Media(_)
            | VodError::SecondInit
            | VodError::NoFragments
            | VodError::Manifest(_)
            | VodError::BadRun
            | VodError::BadAuthorization
            | VodError::Body(_) => StatusCode::BAD_REQUEST,
        }
    }

    /// Seconds until a retry may succeed, for `Retry-After`: the next bid
    /// interval, for a run over the grant or the anonymous share.
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            VodError::Grant(g) => g.retry_after().map(|d| d.as_secs().max(1)),
            _ => None,
        }
    }

    /// The JSON error answer, counted in the rejects metric (404 aside: an
    /// unknown name is a question, not an offence), and a grant refusal also
    /// in the on-demand ledger's.
    fn respond(&self, metrics: &Metrics) -> Response {
        if !matches!(self, VodError::UnknownAsset(_)) {
            metrics.reject(self.code());
        }
        if let VodError::Grant(g) = self {
            metrics.vod_refuse(g.code());
        }
        let body = serde_json::json!({ "code": self.code(), "message": self.to_string() });
        let mut r = (self.status(), Json(body)).into_response();
        let h = r.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(secs) = self.retry_after() {
            h.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        r
    }
}

/// The built-in demo clip as the in-memory asset `name`, cut into blocks of
/// `block_bytes` and signed with a key made now.
pub fn demo_asset(name: &str, block_bytes: usize) -> Result<Asset, VodError> {
    let signer = StreamSigner::from_seed(&rand::random());
    let mut upload = Upload::in_memory(name, block_bytes, u64::MAX, signer, now_ms());
    upload.push(crate::demo::CLIP)?;
    Ok(upload.finish()?.0)
}

/// The on-demand routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/vod", get(list))
        .route("/vod/{name}", get(summary).put(upload).delete(remove))
        .route("/vod/{name}/manifest", get(manifest))
        .route("/vod/{name}/init", get(init))
        .route("/vod/{name}/blocks", get(blocks))
}

/// The query of an upload.
#[derive(Debug, serde::Deserialize)]
struct UploadQuery {
    /// The publish token, for a client that cannot set a header.
    token: Option<String>,
    /// Whether an existing asset of the name is replaced.
    #[serde(default)]
    replace: bool,
}

async fn upload(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = match query {
        Ok(Query(q)) => store(&state, &name, &q, &headers, body).await,
        Err(e) => Err(VodError::BadQuery(e.body_text())),
    };
    match result {
        Ok(stored) => {
            let result = if stored.replaced {
                "replaced"
            } else {
                "created"
            };
            state.metrics.vod_upload(result);
            (StatusCode::CREATED, Json(stored.asset.summary())).into_response()
        }
        Err(e) => {
            state.metrics.vod_upload(e.code());
            tracing::warn!(asset = %safe_name(&name), code = e.code(), "upload refused: {e}");
            e.respond(&state.metrics)
        }
    }
}

async fn store(
    state: &AppState,
    name: &str,
    query: &UploadQuery,
    headers: &HeaderMap,
    body: Body,
) -> Result<Stored, VodError> {
    authorize(state, headers, query.token.as_deref())?;
    let max = state.vod.limits().max_bytes;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max) {
        return Err(VodError::TooLarge(max));
    }
    let body = body
        .into_data_stream()
        .map(|chunk| chunk.map_err(|e| VodError::Body(e.to_string())));
    state.vod.store(name, query.replace, body).await
}

/// Checks the publish token, as ingest does.
fn authorize(state: &AppState, headers: &HeaderMap, query: Option<&str>) -> Result<(), VodError> {
    let expected = state.config.publish_token.as_deref().unwrap_or_default();
    if token_ok(headers, query, expected) {
        Ok(())
    } else {
        Err(VodError::Unauthorized)
    }
}

async fn remove(
    State(state): State<AppState>,
    Path(name): Path<String>,
    query: Result<Query<UploadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let result = match query {
        Ok(Query(q)) => match authorize(&state, &headers, q.token.as_deref()) {
            Ok(()) => state.vod.delete(&name).await,
            Err(e) => Err(e),
        },
        Err(e) => Err(VodError::BadQuery(e.body_text())),
    };
    match result {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => e.respond(&state.metrics),
    }
}

async fn list(State(state): State<AppState>) -> Response {
    let all: Vec<AssetSummary> = state.vod.list().iter().map(|a| a.summary()).collect();
    no_cache(Json(all))
}

/// The asset `name`, or the 404.
fn find(state: &AppState, name: &str) -> Result<std::sync::Arc<Asset>, VodError> {
    state
        .vod
        .get(name)
        .ok_or_else(|| VodError::UnknownAsset(safe_name(name)))
}

/// At most 80 characters of a name from a request, for messages and logs.
fn safe_name(name: &str) -> String {
    name.chars().take(80).collect()
}

async fn summary(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match find(&state, &name) {
        Ok(a) => no_cache(Json(a.summary())),
        Err(e) => e.respond(&state.metrics),
    }
}

async fn manifest(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    match find(&state, &name) {
        Ok(a) => cached(&headers, etag(&a, ""), "application/json", || {
            a.manifest_json().clone()
        }),
        Err(e) => e.respond(&state.metrics),
    }
}

async fn init(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    match find(&state, &name) {
        Ok(a) => cached(&headers, etag(&a, "init"), "video/mp4", || a.init().clone()),
        Err(e) => e.respond(&state.metrics),
    }
}

async fn blocks(
    State(state): State<AppState>,
    method: Method,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    match serve_run(&state, &method, &name, query.as_deref(), &headers).await {
        Ok(r) => r,
        Err(e) => e.respond(&state.metrics),
    }
}

/// A run of blocks: see the module doc (metering included).
async fn serve_run(
    state: &AppState,
    method: &Method,
    name: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Result<Response, VodError> {
    let asset = find(state, name)?;
    let (from, count, key) = run_query(query)?;
    if key.is_some_and(|k| k != asset.manifest().key.to_id()) {
        return Err(VodError::Replaced(name.to_owned()));
    }
    let mut run = asset.run(from, count)?;
    let ledger = state.vod_grants.as_deref();
    // Read only when metered (as the origin does, for HEAD too); unmetered,
    // runs are served as they always were, whatever the header.
    let token = match ledger {
        Some(_) => crate::origin::bearer(headers).map_err(|_| VodError::BadAuthorization)?,
        None => None,
    };
    let asked = run.seqs.end - run.seqs.start;
    let mut tag = etag(&asset, &format!("{from}-{asked}"));
    let mut fresh = if_none_match(headers, &tag);
    let mut cut = false;
    if let Some(ledger) = ledger.filter(|_| !fresh && method != Method::HEAD) {
        let bits = asset.block_lens(&run).map(|len| len.saturating_mul(8));
        // At least one block: `run` has one, and a refusal is an error.
        let n = ledger.debit_prefix(token, bits, Instant::now())? as u64;
        if n < asked {
            run = asset.run(from, n)?;
            tag = etag(&asset, &format!("{from}-{n}"));
            fresh = if_none_match(headers, &tag);
            cut = true;
        }
    }
    let n = run.seqs.end - run.seqs.start;
    let body = if fresh || method == Method::HEAD {
        bytes::Bytes::new()
    } else {
        let body = asset.read(&run).await?;
        state.metrics.vod_bytes(body.len() as u64);
        body
    };
    let mut r = cached(headers, tag, "application/octet-stream", || body);
    let h = r.headers_mut();
    h.insert(
        header::HeaderName::from_static(RUN_BLOCKS_HEADER),
        HeaderValue::from(n),
    );
    if cut {
        // Not the answer to this URL in general: what the grant allowed now.
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if method == Method::HEAD && !fresh {
        h.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from(run.bytes.end - run.bytes.start),
        );
    }
    Ok(r)
}

/// `from`, `count` and `key` of a run's query string; `count` defaults to,
/// and is capped at, [`MAX_RUN_BLOCKS`]; `key` (the upload the player
/// verified the manifest of) is optional. Unknown keys are ignored.
fn run_query(query: Option<&str>) -> Result<(u64, u64, Option<&str>), VodError> {
    let (mut from, mut count, mut key) = (None, MAX_RUN_BLOCKS, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').ok_or(VodError::BadRun)?;
        match k {
            "from" => from = Some(v.parse().map_err(|_| VodError::BadRun)?),
            "count" => {
                let n: u64 = v.parse().map_err(|_| VodError::BadRun)?;
                if n == 0 {
                    return Err(VodError::BadRun);
                }
                count = n.min(MAX_RUN_BLOCKS);
            }
            "key" => key = Some(v),
            _ => {}
        }
    }
    Ok((from.ok_or(VodError::BadRun)?, count, key))
}

/// The `ETag` of one of `asset`'s answers: its key (a replace changes it)
/// and `what`.
fn etag(asset: &Asset, what: &str) -> HeaderValue {
    let key = asset.manifest().key.to_id();
    let tag = if what.is_empty() {
        format!("\"{key}\"")
    } else {
        format!("\"{key}-{what}\"")
    };
    // A stream id is base32 and `what` is digits, '-' and letters.
    HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"\""))
}

fn if_none_match(headers: &HeaderMap, tag: &HeaderValue) -> bool {
    headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes() == tag.as_bytes() || v.as_bytes() == b"*")
}

/// 304 if the request already holds `tag`, else 200 with `body()`, typed
/// `ctype`; revalidated by caches either way.
fn cached(
    headers: &HeaderMap,
    tag: HeaderValue,
    ctype: &'static str,
    body: impl FnOnce() -> bytes::Bytes,
) -> Response {
    let fresh = if_none_match(headers, &tag);
    let common = [
        (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        (header::ETAG, tag),
    ];
    if fresh {
        return (StatusCode::NOT_MODIFIED, common).into_response();
    }
    let ctype = [(header::CONTENT_TYPE, HeaderValue::from_static(ctype))];
    (StatusCode::OK, common, ctype, body()).into_response()
}

fn no_cache(r: impl IntoResponse) -> Response {
    let mut r = r.into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
