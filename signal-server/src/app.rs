//! The HTTP application: shared state and the router tests and `main` serve.
//!
//! Routes: `/ws` (signaling), `/streams…` (origin), `/kv/…` (the public
//! key-value store), `/vod…` (on-demand assets), `/healthz`, `/metrics`,
//! `/watch/{id}` and `/embed/{id}` (player pages), `/pkg/…` (the built wasm)
//! and every other path from the static directory. The origin's routes,
//! `/vod`'s reads, `/pkg` and the static files answer CORS requests from any origin, so that other
//! sites can embed the player. Ingest, with its own state, is merged in. With
//! `--base-path /p`, every route is served under `/p` instead (`/p` itself
//! redirects to `/p/`).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::http::{header, HeaderValue, Method};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio_util::sync::CancellationToken;
use tower_http::cors::{Any, CorsLayer};
use tower_http::services::{ServeDir, ServeFile};

use crate::config::Config;
use crate::grants::Grants;
use crate::metrics::Metrics;
use crate::signal::Hub;
use crate::stream::Streams;

/// Everything the handlers share. Cheap to clone.
#[derive(Clone, Debug)]
pub struct AppState {
    /// Options in force.
    pub config: Arc<Config>,
    /// The stream registry.
    pub streams: Arc<Streams>,
    /// Server metrics.
    pub metrics: Arc<Metrics>,
    /// The grant ledger of live gap fill (`/streams/…/blocks`).
    pub grants: Arc<Grants>,
    /// The grant ledger of on-demand runs (`/vod/{name}/blocks`), a budget
    /// of its own; `None` when they are not metered (`--vod-budget-kbps 0`).
    pub vod_grants: Option<Arc<Grants>>,
    /// Signaling.
    pub hub: Hub,
    /// Slots for block requests that wait for their block (`Prefer: wait`).
    pub origin_waiters: Arc<tokio::sync::Semaphore>,
    /// Cancelled at shutdown; ends those waits at once.
    pub shutdown: CancellationToken,
    /// The public key-value store (`/kv`).
    pub kv: Arc<crate::kv::KvStore>,
    /// The on-demand assets (`/vod`), under `<data dir>/vod`; empty until
    /// `main` loads them.
    pub vod: Arc<crate::vod::VodLibrary>,
}

impl AppState {
    /// State over `streams`; connections close when `shutdown` is cancelled.
    pub fn new(config: Config, streams: Arc<Streams>, shutdown: CancellationToken) -> Self {
        let config = Arc::new(config);
        let metrics = Arc::new(Metrics::new());
        let grants = Arc::new(
            Grants::new(
                config.budget_bits_per_interval(),
                config.anonymous_budget_percent,
                config.bid_interval(),
                Instant::now(),
            )
            .with_unit_bits(config.block_unit_bits()),
        );
        // Granted in whole on-demand blocks (with their overhead), as live is.
        let vod_grants = config.vod_budget_bits_per_interval().map(|bits| {
            Arc::new(
                Grants::new(
                    bits,
                    config.anonymous_budget_percent,
                    config.bid_interval(),
                    Instant::now(),
                )
                .with_unit_bits(config.block_unit_bits()),
            )
        });
        let vod = Arc::new(crate::vod::VodLibrary::new(
            config.data_dir.join("vod"),
            config.vod_limits(),
        ));
        let hub = Hub::new(
            config.clone(),
            streams.clone(),
            metrics.clone(),
            grants.clone(),
            vod_grants.clone(),
            vod.clone(),
            shutdown.clone(),
        );
        let kv = Arc::new(
            crate::kv::KvStore::new(config.kv_max_items, config.kv_ttl())
                .with_put_rate(config.kv_put_rate),
        );
        AppState {
            vod,
            config,
            streams,
            metrics,
            grants,
            vod_grants,
            hub,
            origin_waiters: Arc::new(tokio::sync::Semaphore::new(
                crate::origin::MAX_WAITING_REQUESTS,
            )),
            kv,
            shutdown,
        }
    }

    /// Loads the on-demand assets stored in the data dir and, with the demo
    /// source on, adds the demo clip as the built-in asset `--demo-name`.
    /// Blocking (it reads every asset's block headers): called once at start.
    pub fn open_vod(&self) -> crate::vod::Loaded {
        let loaded = self.vod.load();
        if !self.config.no_demo {
            match crate::vod::demo_asset(&self.config.demo_name, self.config.block_bytes()) {
                Ok(asset) => self.vod.add_builtin(asset),
                Err(e) => tracing::error!("the demo clip cannot be served on demand: {e}"),
            }
        }
        loaded
    }

    /// What ingest (HTTP or RTMP) needs.
    pub fn ingest_state(&self) -> crate::ingest::IngestState {
        crate::ingest::IngestState {
            streams: self.streams.clone(),
            publish_token: self.config.publish_token.clone().unwrap_or_default().into(),
            block_bytes: self.config.block_bytes(),
            metrics: self.metrics.clone(),
        }
    }
}

/// The application router.
pub fn app(state: AppState) -> Router {
    let dir = state.config.static_dir.clone();
    // Cross-origin players (the <clubcast-player> element on other sites) fetch
    // blocks with a bearer token, so the origin answers CORS preflights.
    let cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::HEAD])
        .allow_headers([
            header::AUTHORIZATION,
            header::IF_NONE_MATCH,
            header::HeaderName::from_static("prefer"),
        ])
        .expose_headers([header::ETAG, header::RETRY_AFTER]);
    // A page on another site (a broadcaster's, handing out a private
    // stream's key) reads and writes items; they are signed, so any origin may.
    let kv_cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::PUT])
        .allow_headers([
            header::CONTENT_TYPE,
            header::IF_MATCH,
            header::IF_NONE_MATCH,
            header::HeaderName::from_static("prefer"),
        ])
        .expose_headers([header::ETAG]);
    // Other sites load the player's scripts and wasm from here: a module
    // script and the wasm fetch from another origin are CORS requests, refused
    // without this (`<script type="module" src=".../clubcast-player.js">`
    // on an embedding page). Public files, read-only: any origin may read them.
    // Players on other sites fetch on-demand assets too, their runs with a
    // grant token (`Authorization`); uploads and deletes (with the publish
    // token) are not for browsers on other sites.
    let vod_cors = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::HEAD])
        .allow_headers([header::AUTHORIZATION, header::IF_NONE_MATCH])
        .expose_headers([
            header::ETAG,
            header::RETRY_AFTER,
            header::HeaderName::from_static(crate::vod::RUN_BLOCKS_HEADER),
        ]);
    let assets = CorsLayer::new()
        .allow_origin(Any)
        .allow_methods([Method::GET, Method::HEAD]);
    let files = Router::new()
        .nest_service("/pkg", ServeDir::new(dir.join("pkg")))
        .fallback_service(ServeDir::new(dir.clone()))
        .layer(assets);
    let ingest = crate::ingest::router(state.ingest_state());
    let base = state.config.base_path().to_owned();
    let router = Router::new()
        .route("/ws", get(crate::signal::ws_handler))
        .merge(crate::origin::router().layer(cors))
        .merge(crate::kv::router().layer(kv_cors))
        .merge(crate::vod::router().layer(vod_cors))
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .route_service("/watch/{id}", ServeFile::new(dir.join("watch.html")))
        .route_service("/embed/{id}", ServeFile::new(dir.join("embed.html")))
        .merge(files)
        .with_state(state)
        // Ingest carries its own state, so it joins the stateless router.
        .merge(ingest);
    if base.is_empty() {
        return router;
    }
    // Under `--base-path`, as one service with the prefix stripped. The
    // index needs its trailing slash, since the pages' URLs are relative.
    let bare = base.clone();
    Router::new()
        .nest_service(&base, router)
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                let to = (req.uri().path() == bare).then(|| {
                    let query = req.uri().query().map(|q| format!("?{q}"));
                    format!("{bare}/{}", query.unwrap_or_default())
                });
                async move {
                    match to {
                        Some(to) => axum::response::Redirect::permanent(&to).into_response(),
                        None => next.run(req).await,
                    }
                }
            },
        ))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let streams = state.streams.list();
    state.metrics.set_streams(streams.len());
    state.metrics.set_kv_items(state.kv.len());
    state.metrics.set_vod_assets(state.vod.len());
    state
        .metrics
        .set_publishing(streams.iter().map(|s| (s.name.clone(), s.publishing())));
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
}
