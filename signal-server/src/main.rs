//! clubcast-server: parses options, builds the app and serves it until
//! SIGINT/SIGTERM, then closes signaling connections and stops background tasks.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use clubcast_server::app::{app, AppState};
use clubcast_server::config::Config;
use clubcast_server::store::MAX_STORE_BYTES;
use clubcast_server::stream::{StoreConfig, Streams};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

/// Time connection tasks get to send their close frames at shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    match run(Config::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(mut config: Config) -> Result<(), Box<dyn std::error::Error>> {
    config.validate()?;
    if config.publish_token.as_deref().is_none_or(str::is_empty) {
        let token = data_encoding::HEXLOWER.encode(&rand::random::<[u8; 16]>());
        tracing::info!(%token, "no --publish-token given; generated one for this run");
        config.publish_token = Some(token);
    }
    std::fs::create_dir_all(&config.data_dir)
        .map_err(|e| format!("--data-dir {}: {e}", config.data_dir.display()))?;
    let streams = Arc::new(Streams::new(
        Some(config.data_dir.clone()),
        StoreConfig {
            store_seconds: config.store_seconds,
            max_bytes: MAX_STORE_BYTES,
        },
    ));
    let resumed = streams.open_saved();
    if resumed > 0 {
        tracing::info!(streams = resumed, "streams resumed from the data dir");
    }
    let shutdown = CancellationToken::new();
    let state = AppState::new(config.clone(), streams.clone(), shutdown.clone());
    let mut background = vec![state.hub.spawn_bid_ticker()];
    match state.kv.load_from(&config.data_dir) {
        Ok(l) if l != clubcast_server::kv::Loaded::default() => tracing::info!(
            items = l.items,
            expired = l.expired,
            refused = l.refused,
            "kv store read from the data dir"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!(%e, "cannot read the kv store from the data dir; starting empty"),
    }
    background.push(
        state
            .kv
            .clone()
            .spawn_saver(config.data_dir.clone(), shutdown.clone()),
    );
    let loaded = state.open_vod();
    if loaded != clubcast_server::vod::Loaded::default() {
        tracing::info!(
            assets = loaded.assets,
            damaged = loaded.damaged,
            "on-demand assets read from the data dir"
        );
    }
    if let Some(wait) = config.publisher_wait() {
        background.push(streams.spawn_ender(wait, state.metrics.clone(), shutdown.clone()));
    }

    if !config.no_demo {
        background.push(clubcast_server::demo::spawn(
            streams.clone(),
            &config.demo_name,
            config.block_bytes(),
            shutdown.clone(),
        ));
    }
    background.push(clubcast_server::seeder::spawn_configured(
        &state.hub,
        streams.clone(),
        &config,
        clubcast_server::seeder::SeederConfig::default(),
        shutdown.clone(),
    ));
    if let Some(addr) = config.rtmp_listen {
        let rtmp = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| format!("--rtmp-listen {addr}: {e}"))?;
        tracing::info!(addr = %rtmp.local_addr()?, "rtmp ingest listening");
        background.push(clubcast_server::rtmp::spawn(
            rtmp,
            state.ingest_state(),
            shutdown.clone(),
        ));
    }
    let router = app(state.clone());
    let _ = &mut background;

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", config.listen))?;
    tracing::info!(
        addr = %listener.local_addr()?,
        data_dir = %config.data_dir.display(),
        static_dir = %config.static_dir.display(),
        "clubcast-server listening"
    );
    let stop = shutdown.clone();
    // Client addresses, for the per-address limit on `/kv` puts.
    let router = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            stop.cancel();
        })
        .await?;
    shutdown.cancel();
    state.hub.wait_closed(SHUTDOWN_GRACE).await;
    for task in background {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, task).await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(%e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(%e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
