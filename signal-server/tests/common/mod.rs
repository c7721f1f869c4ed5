//! What the router tests share: an application on `cfg`, with a small
//! in-memory stream store, as `main` would build it.

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
#[allow(dead_code)] // not every test binary meters
pub fn metered(units: u64) -> Config {
    let base = Config::default();
    Config {
        bid_interval_ms: 1000,
        anonymous_budget_percent: 20,
        vod_budget_kbps: (units * base.block_unit_bits()).div_ceil(1000),
        ..base
    }
}
