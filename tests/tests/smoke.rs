//! Smoke test: one server with the demo stream, one headless Chromium on the
//! watch page. The video must play (the playhead advances by at least
//! [`PLAY_SECS`] of media), without a media error, and the player's stats must
//! be filled in. It prints `startup_ms` and `latency_ms` for the record; it
//! asserts no wall-clock bounds (those belong to `just bench`).
//!
//! Needs `web/pkg` (`just build-web`), chromedriver and Chromium.

use std::time::{Duration, Instant};

use clubcast_tests::{first_frames, median, Browser, Server, ServerOptions};
use serde_json::Value;

/// Media seconds the viewer must play.
const PLAY_SECS: f64 = 10.0;
/// Wall time allowed to reach the first frame.
const START_TIMEOUT: Duration = Duration::from_secs(45);
/// Wall time allowed to play [`PLAY_SECS`] after the first frame.
const PLAY_TIMEOUT: Duration = Duration::from_secs(40);

fn num(v: &Value, k: &str) -> Option<f64> {
    v.get(k).and_then(Value::as_f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_viewer_plays_the_demo_stream() {
    let server = Server::start_demo(ServerOptions::default())
        .await
        .expect("server starts and publishes the demo stream");
    let browser = Browser::watch(&format!("{}/watch/demo", server.url()))
        .await
        .expect("browser opens the watch page");

    // First frame.
    let startup_ms = first_frames(std::slice::from_ref(&browser), START_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no first frame: {e}\nserver log:\n{}", server.log_tail(30)))[0];
    let stats = browser.stats().await.expect("stats readable");
    assert!(startup_ms > 0.0, "startup_ms is filled in: {stats}");

    // Play on.
    let t0 = browser.video().await.expect("video")["current_time"]
        .as_f64()
        .expect("currentTime is a number");
    let playing = Instant::now();
    let mut latencies = Vec::new();
    let mut last = t0;
    let (video, stats) = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v = browser.video().await.expect("video readable");
        let s = browser.stats().await.expect("stats readable");
        assert!(v["error"].is_null(), "video error: {v}; stats {s}");
        let t = v["current_time"].as_f64().expect("currentTime");
        last = last.max(t);
        if let Some(l) = num(&s, "latency_ms") {
            latencies.push(l);
        }
        if last - t0 >= PLAY_SECS {
            break (v, s);
        }
        assert!(
            playing.elapsed() < PLAY_TIMEOUT,
            "played only {:.1} s of media in {PLAY_TIMEOUT:?}; video {v}; stats {s}",
            last - t0
        );
    };
    assert!(video["error"].is_null());
    let bytes = num(&stats, "bytes_from_peers").unwrap_or(0.0)
        + num(&stats, "bytes_from_origin").unwrap_or(0.0);
    assert!(bytes > 0.0, "bytes were received: {stats}");
    assert!(
        num(&stats, "latency_ms").is_some(),
        "latency is measured: {stats}"
    );
    println!(
        "smoke: startup_ms={startup_ms} latency_ms(last)={} latency_ms(p50)={:?} \
         bytes_from_peers={} bytes_from_origin={} stalls={} peers={}",
        stats["latency_ms"],
        median(&latencies),
        stats["bytes_from_peers"],
        stats["bytes_from_origin"],
        stats["stalls"],
        stats["peers"],
    );
    browser.close().await;
}
