//! Integrity tests: a peer that relays corrupted blocks cannot disturb the
//! others.
//!
//! `corrupt_relay_is_rejected_and_dropped`: a server built with the
//! `test-hooks` feature and started with `--allow-test-corruption`; one of
//! [`N`] browsers opens `/watch/demo?test_corrupt=1`, so it flips a payload
//! byte of every block it relays (`peer-wasm/src/session/links.rs`). Asserted:
//! 1. the server granted the corruption to that browser only (`test_corrupt`
//!    in each player's stats, which is the welcome's grant);
//! 2. an honest browser rejects a block (`blocks_rejected` > 0) within
//!    [`REJECT_TIMEOUT`] of the first frames;
//! 3. the honest browsers drop that peer: the server got their bad-block
//!    reports (`clubcast_reports_total`, sent with the link's close), and no
//!    honest browser rejects more than [`MAX_REJECTED`] blocks in the whole
//!    run, which it would if it kept the link (the relay sends every block of
//!    its clubs, a few a second);
//! 4. they play on: in the [`WINDOW`] after the first rejection each honest
//!    `<video>` advances by at least [`MIN_ADVANCE`] s, never stands still for
//!    more than [`MAX_FREEZE_MS`], and shows no media error.
//!
//! `plain_build_refuses_test_corruption`: the server built without the
//! feature (the build every other test and production use) exits with an
//! error when started with `--allow-test-corruption`, so feature unification
//! has not turned the hook on. That a server without the flag answers a
//! corruption request with `test_corrupt: false` is tested at the signaling
//! level in `signal-server/tests/signal_ws.rs`.
//!
//! Needs `web/pkg` (`just build-web`), chromedriver and Chromium.

use std::io::Read as _;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clubcast_tests::{
    first_frames, num, sample_all, server_binary, Browser, Server, ServerOptions,
};
use serde_json::Value;

/// Browsers, the corrupting one included.
const N: usize = 4;
/// Wall time allowed for all browsers to reach a first frame.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Wall time allowed, after the first frames, for an honest browser to reject a block.
const REJECT_TIMEOUT: Duration = Duration::from_secs(60);
/// Wall time the honest browsers are sampled after the first rejection.
const WINDOW: Duration = Duration::from_secs(15);
/// Media seconds every honest browser must play within [`WINDOW`].
const MIN_ADVANCE: f64 = 9.0;
/// Longest wall time an honest `currentTime` may stand still in [`WINDOW`]
/// (the bound after churn; resolution one [`clubcast_tests::TICK`]).
const MAX_FREEZE_MS: f64 = 1000.0;
/// Most blocks one honest browser may reject: those in flight when it drops the link.
const MAX_REJECTED: f64 = 16.0;

fn flag(v: &Value, k: &str) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_relay_is_rejected_and_dropped() {
    let server = Server::start_demo(ServerOptions {
        args: vec!["--allow-test-corruption".into()],
        test_hooks: true,
        ..ServerOptions::default()
    })
    .await
    .expect("the test-hooks server starts and publishes the demo stream");
    let url = format!("{}/watch/demo", server.url());
    // The corrupting browser joins first, so it is in clubs the later ones
    // take blocks from.
    let mut browsers = vec![Browser::watch(&format!("{url}?test_corrupt=1"))
        .await
        .expect("corrupting browser opens the watch page")];
    for _ in 1..N {
        browsers.push(
            Browser::watch(&url)
                .await
                .expect("browser opens the watch page"),
        );
    }
    let startup = first_frames(&browsers, START_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log_tail(30)));
    println!("integrity: startup_ms {startup:?}");

    for (i, b) in browsers.iter().enumerate() {
        let s = b.stats().await.expect("stats readable");
        assert_eq!(
            flag(&s, "test_corrupt"),
            i == 0,
            "browser {i}: the server grants corruption to the asking browser only: {s}"
        );
    }
    let (bad, honest) = browsers.split_at(1);

    // An honest browser rejects a block.
    let started = Instant::now();
    loop {
        let mut rejected = Vec::new();
        for b in honest {
            rejected.push(num(
                &b.stats().await.expect("stats readable"),
                "blocks_rejected",
            ));
        }
        if rejected.iter().any(|&r| r > 0.0) {
            println!(
                "integrity: first rejection after {:?}: blocks_rejected {rejected:?}",
                started.elapsed()
            );
            break;
        }
        assert!(
            started.elapsed() < REJECT_TIMEOUT,
            "no honest browser rejected a block in {REJECT_TIMEOUT:?}; corrupting browser: {}",
            bad[0].stats().await.expect("stats readable")
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // They play on.
    let play = sample_all(honest, WINDOW).await;
    let metrics = server.metrics().await.expect("metrics readable");
    let metric = |k: &str| metrics.get(k).copied().unwrap_or(0.0);
    println!(
        "integrity: server: reports {} dropped(reported) {} corrupting browser: {}",
        metric("clubcast_reports_total"),
        metric("clubcast_dropped_peers_total{reason=\"reported\"}"),
        bad[0].stats().await.expect("stats readable"),
    );
    for (i, (b, p)) in honest.iter().zip(&play).enumerate() {
        let s = b.stats().await.expect("stats readable");
        println!(
            "integrity: honest {i}: advance={:.1}s longest_freeze_ms={:.0} blocks_rejected={} \
             peers={} bytes_from_peers={} bytes_from_origin={} stalls={}",
            p.advance(),
            p.longest_freeze_ms,
            s["blocks_rejected"],
            s["peers"],
            s["bytes_from_peers"],
            s["bytes_from_origin"],
            s["stalls"],
        );
        assert!(p.errors.is_empty(), "honest browser {i}: {:?}", p.errors);
        assert!(
            p.advance() >= MIN_ADVANCE,
            "honest browser {i} played only {:.1} s of media in {WINDOW:?} after the first \
             rejection: {p:?}; stats {s}",
            p.advance()
        );
        assert!(
            p.longest_freeze_ms <= MAX_FREEZE_MS,
            "honest browser {i}: currentTime stood still for {:.0} ms after the first \
             rejection: {p:?}",
            p.longest_freeze_ms
        );
        assert!(
            num(&s, "blocks_rejected") <= MAX_REJECTED,
            "honest browser {i} kept taking corrupted blocks (the link was not dropped): {s}"
        );
    }
    assert!(
        metric("clubcast_reports_total") >= 1.0,
        "the server got no bad-block report: {metrics:?}"
    );
    for b in browsers {
        b.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_build_refuses_test_corruption() {
    let bin = tokio::task::spawn_blocking(|| server_binary(false))
        .await
        .expect("build task")
        .expect("the plain server builds");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(&bin)
        .args([
            "--listen",
            "127.0.0.1:0",
            "--allow-test-corruption",
            "--data-dir",
        ])
        .arg(dir.path())
        // It logs its refusal (tracing, to stdout) and exits non-zero.
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the server runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("a plain build accepted --allow-test-corruption and kept running");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut out = String::new();
    if let Some(mut p) = child.stdout.take() {
        let _ = p.read_to_string(&mut out);
    }
    if let Some(mut p) = child.stderr.take() {
        let _ = p.read_to_string(&mut out);
    }
    assert!(!status.success(), "exit status {status}; output {out}");
    assert!(
        out.contains("--allow-test-corruption is refused"),
        "the refusal names the flag and the missing feature: {out}"
    );
}
