//! What the router tests share: an application on `cfg`, with a small
//! in-memory stream store, as `main` would build it, and a server of it on
//! a loopback port.
// Each test binary uses a part of it.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use clubcast_server::app::{app, AppState};
use clubcast_server::config::Config;
use clubcast_server::stream::{StoreConfig, Streams};
use tokio_util::sync::CancellationToken;

/// The router and its state, on `cfg`; streams keep 60 s or 1 MiB of blocks.
pub fn router(cfg: Config) -> (Router, AppState) {
    let streams = Arc::new(Streams::new(
        None,
        StoreConfig {
            store_seconds: 60,
            max_bytes: 1 << 20,
        },
    ));
    let state = AppState::new(cfg, streams, CancellationToken::new());
    (app(state.clone()), state)
}

/// A config whose on-demand budget is `units` whole blocks (with their
/// overhead) per 1-s bid interval, 20 % of it anonymous. No bid ticker runs
/// unless the test starts one: it ends intervals itself (`run_bid_interval`).
pub fn metered(units: u64) -> Config {
    let base = Config::default();
    Config {
        bid_interval_ms: 1000,
        anonymous_budget_percent: 20,
        vod_budget_kbps: (units * base.block_unit_bits()).div_ceil(1000),
        ..base
    }
}

/// Serves the application of `state` on a loopback port; its address.
pub async fn listen(state: &AppState) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let router = app(state.clone());
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}
