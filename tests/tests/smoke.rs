//! Smoke test: one server with the demo stream, one headless Chromium on the
//! watch page. The video must play (the playhead advances by at least
//! [`PLAY_SECS`] of media), without a media error, and the player's stats must
//! be filled in, and the lone viewer must get blocks over its link to the
//! seeder, on either WebRTC stack of the seeder. It prints `startup_ms` and
//! `latency_ms` for the record; it asserts no wall-clock bounds (those belong
//! to `just bench`).
//!
//! Needs `web/pkg` (`just build-web`), chromedriver and Chromium.

use std::time::{Duration, Instant};

use clubcast_protocol::block::{BLOCK_OVERHEAD, DEFAULT_BLOCK_BYTES};
use clubcast_tests::{
    first_frames, http_get, http_request, median, Browser, Server, ServerOptions,
};
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
    let server = demo_server().await;
    let stats = play(&server, "", "smoke").await;
    assert_seeded(&server, &stats).await;
    assert_probed(&server, &stats).await;
}

/// The page stated no upload, so the player ran the upload probe before its
/// join. Over loopback the frames leave as fast as the player queues them
/// (`limited`), or the server reads more than any plan (`at_cap`), or the
/// demo stream's bitrate was not known yet at the join (`unused`): in each
/// case the viewer is planned at the cap.
async fn assert_probed(server: &Server, stats: &Value) {
    let probe = &stats["upload_probe"];
    assert!(
        probe["count"].as_u64() == Some(1) && probe["bytes"].as_u64().unwrap_or(0) > 0,
        "the upload probe did not run: {probe}; stats {stats}"
    );
    assert!(
        probe["upload_kbps"].is_null(),
        "read below the cap: {probe}"
    );
    let m = server.metrics().await.expect("metrics");
    let count = |result: &str| {
        m.get(&format!(
            "clubcast_upload_probes_total{{result=\"{result}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert_eq!(
        count("at_cap") + count("unused") + count("limited"),
        1.0,
        "one probe, planned at the cap: {m:?}"
    );
    assert!(
        m.get("clubcast_signal_messages_total{type=\"probe\"}")
            .copied()
            .unwrap_or(0.0)
            > 0.0,
        "probe frames counted: {m:?}"
    );
}

/// A P2P-off viewer fetches every block from the origin in order, in runs
/// (`/blocks?from=N`), with `Prefer: wait`: the origin holds a run whose first
/// block is not produced yet instead of answering 425, and answers the whole
/// fragment at once. Before runs it made one request per block (about 25 a
/// second on the demo); before `Prefer: wait` it also polled (94 answers 425
/// for 152 blocks in one run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_p2p_off_viewer_follows_the_live_edge_in_runs_without_polling() {
    let server = demo_server().await;
    play(&server, "?p2p=0", "smoke p2p=0").await;
    let m = server.metrics().await.expect("metrics");
    let get = |k: &str| m.get(k).copied().unwrap_or(0.0);
    let count = |status: &str| {
        get(&format!(
            "clubcast_origin_requests_total{{status=\"{status}\"}}"
        ))
    };
    let (ok, not_yet) = (count("200"), count("425"));
    // A block is at most the default payload plus its header and signature.
    let most = (DEFAULT_BLOCK_BYTES + BLOCK_OVERHEAD) as f64;
    let blocks_at_least = get("clubcast_gap_fill_bytes_total") / most;
    println!("smoke p2p=0: origin 200s {ok}, 425s {not_yet}, blocks >= {blocks_at_least:.0}");
    assert!(ok > 0.0, "blocks came from the origin: {m:?}");
    assert!(
        ok * 4.0 <= blocks_at_least,
        "{ok} requests for at least {blocks_at_least:.0} blocks: the player does not fetch runs"
    );
    assert!(
        not_yet <= ok,
        "{not_yet} answers 425 for {ok} runs served: the player polls"
    );
}

/// Another site embeds the player as the README shows (less the optional
/// `server` attribute): the
/// `<clubcast-player>` element, its script loaded from the clubcast server.
/// The page's origin differs from the server's (another port), so the module
/// scripts and the wasm are CORS requests, refused until the server answered
/// them for its static files. The element has no `server` attribute: the
/// player must take the server its script came from, not the page's origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_embedded_on_another_site_plays() {
    let server = demo_server().await;
    let page = format!(
        r#"<!doctype html>
<html><body>
<script type="module" src="{0}/clubcast-player.js"
        onerror="window.load_error = 'clubcast-player.js did not load'"></script>
<clubcast-player stream="demo" muted></clubcast-player>
<script type="module">
  await customElements.whenDefined("clubcast-player");
  window.player = document.querySelector("clubcast-player").player;
</script>
</body></html>"#,
        server.url()
    );
    let site = serve_page(page).await;
    let stats = play_at(&server, &format!("http://{site}/"), "smoke embedded").await;
    assert_seeded(&server, &stats).await;
}

/// A visitor's browser, which refuses playback with sound before a user
/// gesture (its default autoplay policy; the other tests turn it off), on a
/// page that embeds `<clubcast-player>` without `muted`, as the README's
/// example does. The player must start muted (`autoplay_muted`) and the
/// element offer an "Unmute" button that unmutes without stopping playback;
/// with `autoplay-muted="off"` it must say it waits (`autoplay_blocked`) and
/// start at a click on its "Play" button. Before, the element sat paused at
/// its first frame for good, and the page heard nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_embedded_player_gets_past_the_autoplay_policy() {
    let server = demo_server().await;
    let page = |attrs: &str| {
        format!(
            r#"<!doctype html>
<html><body>
<script type="module" src="{0}/clubcast-player.js"></script>
<clubcast-player stream="demo" {attrs}></clubcast-player>
<script type="module">
  await customElements.whenDefined("clubcast-player");
  window.player = document.querySelector("clubcast-player").player;
  window.autoplayEvents = [];
  for (const t of ["autoplay_muted", "autoplay_blocked"])
    window.player.on(t, () => window.autoplayEvents.push(t));
</script>
</body></html>"#,
            server.url()
        )
    };
    let playing = |st: &Value| st["t"].as_f64().is_some_and(|t| t > 2.0) && st["paused"] == false;

    // Muted to start; the button unmutes, and playback goes on.
    let browser = open_with_autoplay_policy(page("")).await;
    let st = autoplay_until(&browser, "plays muted", playing).await;
    assert_eq!(st["muted"], true, "{st}");
    assert_eq!(st["autoplay"], "muted", "{st}");
    assert_eq!(st["events"], serde_json::json!(["autoplay_muted"]), "{st}");
    assert_eq!(st["button"], "🔇 Unmute", "{st}");
    click_autoplay_button(&browser).await;
    let t = st["t"].as_f64().expect("currentTime");
    let st = autoplay_until(&browser, "plays on unmuted", move |st| {
        st["muted"] == false && st["t"].as_f64().is_some_and(|now| now > t + 2.0)
    })
    .await;
    println!("smoke autoplay: muted start, then unmuted: {st}");
    assert!(st["button"].is_null() && st["paused"] == false, "{st}");
    browser.close().await;

    // Told to wait: nothing plays until the Play button is clicked.
    let browser = open_with_autoplay_policy(page(r#"autoplay-muted="off""#)).await;
    let st = autoplay_until(&browser, "says it waits", |st| st["button"] == "▶ Play").await;
    assert_eq!(st["autoplay"], "blocked", "{st}");
    assert_eq!(
        st["events"],
        serde_json::json!(["autoplay_blocked"]),
        "{st}"
    );
    assert!(st["paused"] == true && st["muted"] == false, "{st}");
    click_autoplay_button(&browser).await;
    let st = autoplay_until(&browser, "plays after the click", playing).await;
    println!("smoke autoplay: blocked, then played at a click: {st}");
    assert!(st["button"].is_null() && st["muted"] == false, "{st}");
    browser.close().await;
}

/// A browser that keeps its autoplay policy, on `page` served from a site
/// of its own.
async fn open_with_autoplay_policy(page: String) -> Browser {
    let site = serve_page(page).await;
    let browser = Browser::launch_with_autoplay_policy()
        .await
        .expect("browser starts");
    browser
        .goto(&format!("http://{site}/"))
        .await
        .expect("page opens");
    browser
}

/// What [`an_embedded_player_gets_past_the_autoplay_policy`] reads of its
/// page: the element's video, the autoplay events, the player's `autoplay`
/// stat and the element's button.
async fn autoplay_state(b: &Browser) -> Value {
    b.eval(
        "const v = document.querySelector('clubcast-player').video; \
         const button = document.querySelector('clubcast-player').shadowRoot \
           .querySelector('.cc-autoplay'); \
         return {muted: v.muted, paused: v.paused, t: v.currentTime, \
           events: window.autoplayEvents, autoplay: window.player.stats().autoplay, \
           button: button ? button.textContent : null};",
    )
    .await
    .expect("page readable")
}

/// The first [`autoplay_state`] that `ok` accepts, within [`START_TIMEOUT`].
async fn autoplay_until(b: &Browser, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let st = autoplay_state(b).await;
        if ok(&st) {
            return st;
        }
        assert!(Instant::now() < deadline, "{what}: {st}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A trusted click (WebDriver's, a user gesture) on the element's button.
async fn click_autoplay_button(b: &Browser) {
    b.client()
        .find(fantoccini::Locator::Css("clubcast-player"))
        .await
        .expect("the element")
        .shadow_root()
        .await
        .expect("its shadow root")
        .find(fantoccini::Locator::Css(".cc-autoplay"))
        .await
        .expect("the button")
        .click()
        .await
        .expect("a click");
}

/// A viewer who pauses the live stream, in a browser whose source buffer
/// holds 4 MB (`--mse-*-buffer-size-limit-mb`; Chrome's own is about 150 MB,
/// which a 2-Mbit/s stream fills in 10 minutes), for longer than that fills
/// at the demo's bitrate: the player keeps the blocks past 30 s ahead out of
/// the buffer (`paused_drops`), raises no error, and on play jumps to the
/// live point (`jump` with `reason: "resume"`). Before, every append failed
/// once the buffer was full (`mse: source buffer full and nothing to trim`)
/// and the player sat at the end of what it had buffered for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_who_pauses_resumes_live() {
    /// Pause kept past the first dropped block: with it, over 4 MB of the
    /// demo would have been buffered.
    const MORE: Duration = Duration::from_secs(20);
    let server = demo_server().await;
    let browser = Browser::launch_with_flags(&[
        "--mse-video-buffer-size-limit-mb=4",
        "--mse-audio-buffer-size-limit-mb=4",
    ])
    .await
    .expect("browser starts");
    browser
        .goto(&format!("{}/watch/demo", server.url()))
        .await
        .expect("page opens");
    first_frames(std::slice::from_ref(&browser), START_TIMEOUT)
        .await
        .expect("a first frame");
    browser
        .eval(
            "window.pauseEvents = []; \
             for (const t of ['error', 'jump']) \
               window.player.on(t, (e) => window.pauseEvents.push(e)); \
             document.querySelector('video').pause();",
        )
        .await
        .expect("pauses");
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = browser.stats().await.expect("stats");
        if num(&s, "paused_drops").is_some_and(|d| d > 0.0) {
            break;
        }
        assert!(Instant::now() < deadline, "nothing held back: {s}");
    }
    tokio::time::sleep(MORE).await;
    browser
        .eval("document.querySelector('video').play();")
        .await
        .expect("plays");
    let deadline = Instant::now() + Duration::from_secs(30);
    let (s, events) = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = browser.stats().await.expect("stats");
        let events = browser
            .eval("return window.pauseEvents;")
            .await
            .expect("events");
        let resumed = events
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["reason"] == "resume"));
        let live = |k| num(&s, k).is_some_and(|l| l < 5_000.0);
        if resumed && live("edge_latency_ms") && live("latency_ms") {
            break (s, events);
        }
        assert!(
            Instant::now() < deadline,
            "not back at live: {s}; events {events}"
        );
    };
    println!("smoke pause: events {events}; stats {s}");
    let errors: Vec<&Value> = events
        .as_array()
        .expect("a list")
        .iter()
        .filter(|e| e["type"] == "error")
        .collect();
    assert!(errors.is_empty() && s["error"].is_null(), "{errors:?}; {s}");
    let jumps = events.as_array().expect("a list").len() - errors.len();
    assert_eq!(jumps, 1, "one jump, to the live point: {events}");
    let t = browser.video().await.expect("video")["current_time"]
        .as_f64()
        .expect("currentTime");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let v = browser.video().await.expect("video");
    assert!(
        v["current_time"].as_f64().is_some_and(|now| now > t + 1.0),
        "plays on from the live point: {v}"
    );
    browser.close().await;
}

/// Safari on iOS has no `MediaSource`, only `ManagedMediaSource` (17.1 and
/// later), or neither. A page where `MediaSource` is renamed
/// `ManagedMediaSource` (Chromium's is the same API; Safari is not available
/// here) must play, through the managed source with remote playback off,
/// which Safari needs to open it; a page with neither must get the error
/// `no_mse` before the player joins the swarm. Before, the player threw an
/// uncaught `TypeError` (`isTypeSupported` of undefined) after joining, and
/// the page heard nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_uses_managed_media_source_or_says_it_cannot() {
    let server = demo_server().await;
    let page = |setup: &str| {
        format!(
            r#"<!doctype html>
<html><body>
<video muted playsinline></video>
<script>{setup}</script>
<script type="module">
  import {{ play }} from "{0}/clubcast.js";
  window.errors = [];
  window.player = play(document.querySelector("video"), {{ stream: "demo" }});
  window.player.on("error", (e) => window.errors.push(e));
</script>
</body></html>"#,
            server.url()
        )
    };
    let managed = page(
        "window.ManagedMediaSource = window.MediaSource; \
         delete window.MediaSource; window.MediaSource = undefined;",
    );
    let site = serve_page(managed).await;
    let browser = Browser::watch(&format!("http://{site}/"))
        .await
        .expect("page opens");
    first_frames(std::slice::from_ref(&browser), START_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no first frame: {e}"));
    let managed = browser
        .eval(
            "return {mse: typeof window.MediaSource, \
               remote_off: document.querySelector('video').disableRemotePlayback, \
               errors: window.errors};",
        )
        .await
        .expect("page readable");
    println!("smoke managed media source: {managed}");
    assert_eq!(managed["mse"], "undefined", "{managed}");
    assert_eq!(managed["remote_off"], true, "{managed}");
    assert_eq!(managed["errors"], serde_json::json!([]), "{managed}");
    browser.close().await;

    let joins =
        |m: &std::collections::BTreeMap<String, f64>| m.get("clubcast_joins_total").copied();
    let before = joins(&server.metrics().await.expect("metrics"));
    let none = page("delete window.MediaSource; window.MediaSource = undefined;");
    let site = serve_page(none).await;
    let browser = Browser::watch(&format!("http://{site}/"))
        .await
        .expect("page opens");
    let deadline = Instant::now() + Duration::from_secs(20);
    let errors = loop {
        let errors = browser.eval("return window.errors;").await.expect("errors");
        if errors.as_array().is_some_and(|e| !e.is_empty()) {
            break errors;
        }
        assert!(Instant::now() < deadline, "no error event");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    println!("smoke no media source: {errors}");
    assert_eq!(errors[0]["code"], "no_mse", "{errors}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        joins(&server.metrics().await.expect("metrics")),
        before,
        "it did not join"
    );
    browser.close().await;
}

/// A deployment under a path prefix (`--base-path /live`, as behind a proxy
/// that forwards `/live/…` as it is): the index lists the stream with a link
/// under the prefix, the watch page there plays it, and the player, taking
/// its server from where its script came from, reaches the signaling socket,
/// the origin and the seeder under the prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_plays_under_a_base_path() {
    let server = Server::start_demo(ServerOptions {
        base_path: Some("/live".into()),
        ..ServerOptions::default()
    })
    .await
    .expect("server starts under /live and publishes the demo stream");
    let (status, _) = http_get(server.addr(), "/live").await.expect("GET /live");
    assert_eq!(status, 308, "the index wants its trailing slash");
    let index = Browser::watch(&format!("{}/", server.url()))
        .await
        .expect("browser opens the index");
    let deadline = Instant::now() + Duration::from_secs(20);
    let href = loop {
        let href = index
            .eval("const a = document.querySelector('#streams a'); return a ? a.href : null;")
            .await
            .expect("index readable");
        if let Some(h) = href.as_str() {
            break h.to_owned();
        }
        assert!(Instant::now() < deadline, "the index lists no stream");
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    index.close().await;
    assert!(
        href.starts_with(&format!("{}/watch/", server.url())),
        "the stream's link stays under the prefix: {href}"
    );
    let stats = play_at(&server, &href, "smoke base path").await;
    assert_seeded(&server, &stats).await;
}

/// Serves `page` for every request on a loopback port of its own: the
/// embedding site. It runs until the test's runtime ends.
async fn serve_page(page: String) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the site");
    let addr = listener.local_addr().expect("site address");
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let page = page.clone();
            tokio::spawn(async move {
                // The request head; the page is the answer to any of them.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{page}",
                    page.len()
                );
                let _ = conn.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// A publisher that comes back (an encoder restarted) with other settings,
/// twice: ffmpeg publishes `cam` as H.264 high at 640x360, 30 fps, with AAC at
/// 48 kHz; then as H.264 baseline at 320x180, 25 fps, with AAC at 44.1 kHz;
/// then as VP9 at 480x270 with Opus. Each brings another init segment, other
/// codecs or timescales, and decode times that start at zero again. The
/// viewer must play on through both seams at each new size, without a media
/// error. Before the server continued the timeline, the player sat at the
/// first publish's end; before it handled a new init (`NEW_INIT`), the decoder
/// failed on the new frames (`PIPELINE_ERROR_DECODE`); before it named VP9 for
/// MSE, a VP9 stream never played.
///
/// The first publisher stays away for [`AWAY`] before the second comes: the
/// viewer is told (`publisher` events), its overlay says it waits for the
/// publisher, and the wait counts in `publisher_wait_ms`, not as a rebuffer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publisher_that_comes_back_with_other_settings_plays_on() {
    /// Longer than the viewer's ~2.6 s of media ahead, so that it waits.
    const AWAY: Duration = Duration::from_secs(5);
    const H264: [&str; 8] = [
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p", "-c:a", "aac",
    ];
    const VP9: [&str; 8] = [
        "-c:v",
        "libvpx-vp9",
        "-deadline",
        "realtime",
        "-cpu-used",
        "8",
        "-c:a",
        "libopus",
    ];
    // size, frame rate, audio rate, codecs, seconds.
    let publishes = [
        (
            "640x360",
            "30",
            "48000",
            [&H264[..], &["-profile:v", "high"]].concat(),
            8.0,
        ),
        (
            "320x180",
            "25",
            "44100",
            [&H264[..], &["-profile:v", "baseline"]].concat(),
            6.0,
        ),
        ("480x270", "30", "48000", VP9.to_vec(), 14.0),
    ];
    // Well into the last publish: each starts where the one before ended.
    let goal = publishes[0].4 + publishes[1].4 + 4.0;
    let (server, ingest) = ingest_server(&[]).await;
    let publisher = std::thread::spawn(move || {
        for (i, (size, rate, hz, codecs, secs)) in publishes.into_iter().enumerate() {
            if i == 1 {
                std::thread::sleep(AWAY);
            }
            ffmpeg_publish(&ingest, size, rate, hz, &codecs, secs);
        }
    });
    let browser = watching(&server, "cam").await;
    // Records the page's `publisher` events.
    browser
        .eval(
            "window.publisherEvents = []; \
             window.player.on('publisher', (e) => window.publisherEvents.push(e.connected));",
        )
        .await
        .expect("subscribes");
    let (mut widths, mut last) = (Vec::new(), 0.0f64);
    let mut statuses: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(75);
    while last <= goal {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v = browser.video().await.expect("video readable");
        let s = browser.stats().await.expect("stats readable");
        assert!(v["error"].is_null(), "video error: {v}; stats {s}");
        let width = browser
            .eval("return document.querySelector('video').videoWidth;")
            .await
            .expect("videoWidth readable");
        if widths.last() != Some(&width) {
            widths.push(width);
        }
        let status = browser
            .eval("return document.querySelector('.cc-status').textContent;")
            .await
            .expect("overlay readable");
        let status = status.as_str().unwrap_or_default().to_owned();
        if statuses.last() != Some(&status) {
            statuses.push(status);
        }
        last = last.max(v["current_time"].as_f64().expect("currentTime"));
        assert!(
            Instant::now() < deadline,
            "stuck at {last:.1} s of media (widths {widths:?}); video {v}; stats {s}\nserver log:\n{}",
            server.log_tail(20)
        );
    }
    let events = browser
        .eval("return window.publisherEvents;")
        .await
        .expect("events readable");
    let s = browser.stats().await.expect("stats readable");
    println!(
        "smoke republish: played to {last:.1} s, video widths {widths:?}, overlay {statuses:?}, \
         publisher events {events}, publisher_wait_ms {}, stalls {} ({} ms)",
        s["publisher_wait_ms"], s["stalls"], s["stall_ms"]
    );
    assert_eq!(
        widths,
        [640, 320, 480],
        "the size changed with each publish"
    );
    let events: Vec<bool> = serde_json::from_value(events).expect("a list of booleans");
    assert!(
        events.windows(2).any(|w| w == [false, true]),
        "the viewer heard the publisher leave and come back: {events:?}"
    );
    assert!(
        statuses.iter().any(|t| t == "waiting for the publisher…"),
        "the overlay said why playback stopped: {statuses:?}"
    );
    assert!(
        s["publisher_wait_ms"].as_f64().expect("publisher_wait_ms") > 0.0,
        "the wait counted as such: {s}"
    );
    browser.close().await;
    publisher.join().expect("the publisher ran");
}

/// An encoder publishing over RTMP (as OBS does by default) reaches the
/// viewers: ffmpeg sends H.264 with B-frames and AAC in FLV to
/// `rtmp://…/live/cam?token=tok`, the server remuxes it to fragmented MP4,
/// and headless Chromium plays it with its sound track. A wrong token and a
/// codec other than H.264 are refused with their codes, and leave nothing.
///
/// The keyframe interval is 8 s (about OBS's default), and the viewer joins
/// 11 s in, so most fragment starts near the live edge are not keyframes: it
/// must start at the keyframe at 8 s. Started at a fragment start without
/// one (the rule before), Chromium showed a still picture until the next
/// keyframe: no frame decoded in the 1.2 s after the first, against 37 from
/// a keyframe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtmp_publisher_plays_in_the_browser() {
    const SECS: f64 = 24.0;
    const JOIN_AT: Duration = Duration::from_secs(11);
    let port = clubcast_tests::free_port().expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    let (server, _) = ingest_server(&["--rtmp-listen", &listen]).await;
    let rtmp = format!("rtmp://{listen}/live");
    let publish = |url: String, codec: &'static [&'static str], secs: f64| {
        std::thread::spawn(move || {
            std::process::Command::new("ffmpeg")
                .args(["-hide_banner", "-loglevel", "error", "-re"])
                .args(["-f", "lavfi", "-i", "testsrc2=size=640x360:rate=30"])
                .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
                .args(["-t", &secs.to_string()])
                .args(["-g", "240", "-keyint_min", "240", "-sc_threshold", "0"])
                .args(codec)
                .args(["-c:a", "aac", "-f", "flv", &url])
                .status()
                .expect("ffmpeg runs (`just setup` installs it)")
        })
    };
    const H264: &[&str] = &[
        "-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p",
    ];
    // Refused: the wrong token, then Sorenson H.263 (FLV's own codec).
    let wrong = publish(format!("{rtmp}/bad?token=nope"), H264, 2.0).join();
    assert!(
        !wrong.expect("ffmpeg ran").success(),
        "a wrong token is refused"
    );
    let h263 = publish(format!("{rtmp}/old?token=tok"), &["-c:v", "flv1"], 2.0).join();
    assert!(!h263.expect("ffmpeg ran").success(), "H.263 is refused");
    let m = server.metrics().await.expect("metrics");
    for code in ["unauthorized", "unsupported_codec"] {
        let key = format!("clubcast_rejects_total{{code=\"{code}\"}}");
        assert_eq!(m.get(&key).copied(), Some(1.0), "{key} in {m:?}");
    }
    let publisher = publish(format!("{rtmp}/cam?token=tok"), H264, SECS);
    server
        .wait_for_stream("cam", Duration::from_secs(30))
        .await
        .expect("the stream is published");
    tokio::time::sleep(JOIN_AT).await;
    let browser = watching(&server, "cam").await;
    let frames = || async {
        let f = browser
            .eval(
                "const v = document.querySelector('video'); \
                 return [v.currentTime, v.getVideoPlaybackQuality().totalVideoFrames];",
            )
            .await
            .expect("frames readable");
        (f[0].as_f64().unwrap_or(0.0), f[1].as_f64().unwrap_or(0.0))
    };
    let first = frames().await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let moving = frames().await;
    let (mut last, mut latency) = (0.0f64, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(40);
    while last < moving.0 + 6.0 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let v = browser.video().await.expect("video readable");
        let s = browser.stats().await.expect("stats readable");
        assert!(v["error"].is_null(), "video error: {v}; stats {s}");
        if let Some(ms) = num(&s, "latency_ms") {
            latency.push(ms);
        }
        last = last.max(v["current_time"].as_f64().expect("currentTime"));
        assert!(
            Instant::now() < deadline,
            "stuck at {last:.1} s of media; video {v}; stats {s}\nserver log:\n{}",
            server.log_tail(20)
        );
    }
    let tracks = browser
        .eval(
            "const v = document.querySelector('video'); \
             return [v.videoWidth, v.videoHeight, v.webkitAudioDecodedByteCount || 0];",
        )
        .await
        .expect("tracks readable");
    let s = browser.stats().await.expect("stats readable");
    println!(
        "smoke rtmp: frames decoded {} at {:.2} s and {} at {:.2} s, played to {last:.1} s, \
         [width, height, audio bytes] {tracks}, latency_ms median {:?}, stalls {}",
        first.1,
        first.0,
        moving.1,
        moving.0,
        median(&latency),
        s["stalls"]
    );
    assert!(
        moving.1 - first.1 >= 15.0,
        "the picture moves from the start (30 fps): frames {first:?} then {moving:?}"
    );
    assert_eq!(tracks[0], 640, "the video plays at its size: {tracks}");
    assert_eq!(tracks[1], 360, "the video plays at its size: {tracks}");
    assert!(
        tracks[2].as_f64().unwrap_or(0.0) > 0.0,
        "the sound track is decoded: {tracks}"
    );
    browser.close().await;
    assert!(
        publisher.join().expect("ffmpeg ran").success(),
        "ffmpeg published to the end"
    );
    let (_, body) = http_get(server.addr(), "/streams")
        .await
        .expect("GET /streams");
    let names: Vec<Value> = serde_json::from_slice(&body).expect("a JSON list");
    assert_eq!(names.len(), 1, "only `cam` was made: {names:?}");
    // The 8-s keyframe interval is shown, and the operator warned of it.
    let gop = names[0]["keyframe_interval_ms"].as_u64().expect("measured");
    assert!(
        (6_000..=10_000).contains(&gop),
        "keyframe interval {gop} ms"
    );
    assert!(
        server
            .log_tail(usize::MAX)
            .contains("keyframes are far apart"),
        "the log warns of the long keyframe interval"
    );
}

/// Audio alone over RTMP (internet radio; ffmpeg `-vn` names no video in its
/// `onMetaData`) is remuxed to audio-only fragments, and headless Chromium
/// plays it: its currentTime moves, its audio is decoded, with no media error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_rtmp_radio_stream_plays_in_the_browser() {
    let port = clubcast_tests::free_port().expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    let (server, _) = ingest_server(&["--rtmp-listen", &listen]).await;
    let url = format!("rtmp://{listen}/live/radio?token=tok");
    let publisher = std::thread::spawn(move || {
        std::process::Command::new("ffmpeg")
            .args(["-hide_banner", "-loglevel", "error", "-re"])
            .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
            .args(["-t", "14", "-vn", "-c:a", "aac", "-f", "flv", &url])
            .status()
            .expect("ffmpeg runs (`just setup` installs it)")
    });
    let browser = watching(&server, "radio").await;
    let audio = || async {
        let a = browser
            .eval(
                "const v = document.querySelector('video'); \
                 return [v.currentTime, v.webkitAudioDecodedByteCount || 0];",
            )
            .await
            .expect("audio readable");
        (a[0].as_f64().unwrap_or(0.0), a[1].as_f64().unwrap_or(0.0))
    };
    let first = audio().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let later = audio().await;
    let v = browser.video().await.expect("video readable");
    let s = browser.stats().await.expect("stats readable");
    println!(
        "smoke rtmp radio: [time, audio bytes] {first:?} then {later:?}, latency_ms {}, stalls {}",
        s["latency_ms"], s["stalls"]
    );
    assert!(v["error"].is_null(), "media error: {v}; stats {s}");
    assert!(
        later.0 - first.0 > 2.0,
        "it plays: {first:?} then {later:?}"
    );
    assert!(
        later.1 > first.1,
        "its audio is decoded: {first:?} then {later:?}"
    );
    browser.close().await;
    assert!(
        publisher.join().expect("ffmpeg ran").success(),
        "ffmpeg published to the end"
    );
}

/// A server with no demo, publish token `tok` and `args`, and its ingest
/// URL for stream `cam`.
async fn ingest_server(args: &[&str]) -> (Server, String) {
    let args = ["--no-demo", "--publish-token", "tok"].iter().chain(args);
    let server = Server::start(ServerOptions {
        args: args.map(|a| a.to_string()).collect(),
        ..ServerOptions::default()
    })
    .await
    .expect("server starts");
    let ingest = format!("{}/ingest/cam", server.url());
    (server, ingest)
}

/// ffmpeg publishes a test pattern and a tone to `ingest` (publish token
/// `tok`) in real time for `secs`, at `size` and `rate` frames a second (a
/// keyframe a second), the tone at `hz`, with `codecs`.
fn ffmpeg_publish(ingest: &str, size: &str, rate: &str, hz: &str, codecs: &[&str], secs: f64) {
    let video = format!("testsrc2=size={size}:rate={rate}");
    let audio = format!("sine=frequency=440:sample_rate={hz}");
    let status = std::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-re"])
        .args(["-f", "lavfi", "-i", &video, "-f", "lavfi", "-i", &audio])
        .args(["-t", &secs.to_string(), "-g", rate])
        .args(codecs)
        .args(["-f", "mp4", "-movflags"])
        .args(["frag_keyframe+empty_moov+default_base_moof"])
        .args(["-frag_duration", "1000000", "-method", "PUT"])
        .args(["-headers", "Authorization: Bearer tok", ingest])
        .status()
        .expect("ffmpeg runs (`just setup` installs it)");
    assert!(status.success(), "ffmpeg publishing {size}: {status}");
}

/// A stream whose publisher stays away longer than `--publisher-wait-seconds`
/// ends: its viewer's player ends its session with the error `stream_ended`
/// and the overlay says so, the stream leaves `/streams`, and a publisher
/// that comes back starts it again, numbered on, and seeded to a new viewer.
/// Before streams ended, a stream stayed listed and held its blocks in memory
/// for as long as the server ran, and its viewers waited for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_whose_publisher_stays_away_ends() {
    const H264: [&str; 6] = ["-c:v", "libx264", "-preset", "veryfast", "-c:a", "aac"];
    let (server, ingest) = ingest_server(&["--publisher-wait-seconds", "3"]).await;
    let first = {
        let ingest = ingest.clone();
        std::thread::spawn(move || ffmpeg_publish(&ingest, "320x180", "25", "44100", &H264, 12.0))
    };
    let browser = watching(&server, "cam").await;
    browser
        .eval(
            "window.endEvents = []; \
             window.player.on('error', (e) => window.endEvents.push(e));",
        )
        .await
        .expect("subscribes");
    first.join().expect("the first publish ran");
    let listed = |server: &Server| {
        let addr = server.addr();
        async move {
            let (status, body) = http_get(addr, "/streams").await.expect("GET /streams");
            assert_eq!(status, 200);
            let list: Vec<Value> = serde_json::from_slice(&body).expect("a JSON list");
            list.into_iter().find(|s| s["name"] == "cam")
        }
    };
    let edge = listed(&server).await.expect("listed while away")["live_edge"]
        .as_u64()
        .expect("blocks stored");
    // Ended within the wait plus a quarter of it, and the viewer told at once.
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let events = browser
            .eval("return window.endEvents;")
            .await
            .expect("events");
        if events.as_array().is_some_and(|e| !e.is_empty()) {
            break events;
        }
        assert!(
            Instant::now() < deadline,
            "the viewer heard no end; stats {}\nserver log:\n{}",
            browser.stats().await.expect("stats"),
            server.log_tail(20)
        );
    };
    assert_eq!(events[0]["code"], "stream_ended", "{events}");
    let status = browser
        .eval("return document.querySelector('.cc-status').textContent;")
        .await
        .expect("overlay readable");
    assert_eq!(status, "the stream has ended");
    assert!(
        listed(&server).await.is_none(),
        "an ended stream is not listed"
    );
    let metrics = server.metrics().await.expect("metrics");
    assert_eq!(metrics.get("clubcast_streams_ended_total"), Some(&1.0));
    let seeded = metrics["clubcast_bytes_seeded_total"];
    browser.close().await;

    let again =
        std::thread::spawn(move || ffmpeg_publish(&ingest, "320x180", "25", "44100", &H264, 12.0));
    let browser = watching(&server, "cam").await;
    let stream = listed(&server).await.expect("listed again");
    assert!(
        stream["live_edge"].as_u64().is_some_and(|e| e > edge),
        "numbered on past {edge}: {stream}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = server.metrics().await.expect("metrics");
    let stats = browser.stats().await.expect("stats");
    println!(
        "smoke stream end: ended at edge {edge}, events {events}; again {stream}; stats {stats}"
    );
    assert!(
        metrics["clubcast_bytes_seeded_total"] > seeded,
        "the seeder seeds the stream made again: {stats}\nserver log:\n{}",
        server.log_tail(30)
    );
    browser.close().await;
    again.join().expect("the second publish ran");
}

/// A server that dies (SIGKILL) and comes back on the same data dir does not
/// end a viewer's session. The stream's numbering and timeline were saved, so
/// the viewer reconnects, skips the blocks that only the dead process held,
/// and plays on from the resumed demo. Before the numbering was saved, the
/// viewer, well past block 256 of a stream that began again at 0, ended with
/// `stream_restarted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_plays_on_across_a_server_restart() {
    /// Media played before the restart: past block 256 at the demo's rate.
    const BEFORE: f64 = 15.0;
    /// Media to play after it.
    const AFTER: f64 = 8.0;
    let mut server = demo_server().await;
    let browser = watching(&server, "demo").await;
    browser
        .eval(
            "window.restartEvents = []; \
             for (const t of ['error', 'joined', 'skip', 'reconnecting']) \
               window.player.on(t, (e) => window.restartEvents.push(e));",
        )
        .await
        .expect("subscribes");
    let played_to = |target: f64, within: Duration| {
        let browser = &browser;
        async move {
            let deadline = Instant::now() + within;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let v = browser.video().await.expect("video readable");
                let s = browser.stats().await.expect("stats readable");
                assert!(v["error"].is_null(), "video error: {v}; stats {s}");
                let t = v["current_time"].as_f64().expect("currentTime");
                if t >= target {
                    return t;
                }
                let events = browser.eval("return window.restartEvents;").await;
                assert!(
                    Instant::now() < deadline,
                    "stuck at {t:.1} s of media (goal {target:.1}); video {v}; stats {s}; \
                     events {events:?}"
                );
            }
        }
    };
    let before = played_to(BEFORE, Duration::from_secs(60)).await;
    server.restart().await.expect("the server starts again");
    server
        .wait_for_stream("demo", Duration::from_secs(30))
        .await
        .expect("the demo resumes");
    let after = played_to(before + AFTER, Duration::from_secs(60)).await;
    let events = browser
        .eval("return window.restartEvents;")
        .await
        .expect("events readable");
    let s = browser.stats().await.expect("stats readable");
    println!(
        "smoke restart: played {before:.1} s, then to {after:.1} s across the restart; \
         events {events}; stalls {} ({} ms), rejoins {}",
        s["stalls"], s["stall_ms"], s["rejoins"]
    );
    let events = events.as_array().expect("a list of events");
    let errors: Vec<&Value> = events.iter().filter(|e| e["type"] == "error").collect();
    assert!(errors.is_empty(), "no error ended the session: {errors:?}");
    let joined: Vec<&Value> = events.iter().filter(|e| e["type"] == "joined").collect();
    assert!(
        joined.iter().any(|e| e["rejoin"] == true),
        "the viewer rejoined the restarted server: {events:?}"
    );
    assert!(
        s["rejoins"].as_f64().is_some_and(|r| r >= 1.0),
        "stats count the rejoin: {s}"
    );
    browser.close().await;
}

/// The seeder on the other WebRTC stack, the `webrtc` crate (`--seeder-rtc webrtc-rs`;
/// `str0m` is the default, which the test above plays through).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_gets_blocks_from_a_seeder_on_webrtc_rs() {
    let server = Server::start_demo(ServerOptions {
        args: vec!["--seeder-rtc".into(), "webrtc-rs".into()],
        ..ServerOptions::default()
    })
    .await
    .expect("server starts with the webrtc-rs seeder");
    let stats = play(&server, "", "smoke webrtc-rs").await;
    assert_seeded(&server, &stats).await;
}

/// The seeder set up for a server behind a 1:1 NAT (`--rtc-public-ip`, here this machine's
/// own address: no NAT is available to test through) and a firewall (`--rtc-ports`): the
/// viewer still gets blocks over its link to the seeder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_gets_blocks_from_a_seeder_with_an_announced_address_and_ports() {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    // No datagram is sent: a UDP `connect` only picks the route.
    socket.connect("192.0.2.1:9").expect("a default route");
    let own = socket.local_addr().expect("local address").ip().to_string();
    let server = Server::start_demo(ServerOptions {
        args: ["--rtc-public-ip", &own, "--rtc-ports", "42000-42099"]
            .map(String::from)
            .to_vec(),
        ..ServerOptions::default()
    })
    .await
    .expect("server starts with the seeder's address announced");
    let stats = play(&server, "", "smoke announced").await;
    assert_seeded(&server, &stats).await;
}

/// The lone viewer's blocks came over its data channel to the seeder, not only from the
/// origin.
async fn assert_seeded(server: &Server, stats: &Value) {
    let metrics = server.metrics().await.expect("metrics");
    let seeded = metrics
        .get("clubcast_bytes_seeded_total")
        .copied()
        .unwrap_or(0.0);
    assert!(
        num(stats, "bytes_from_peers").unwrap_or(0.0) > 0.0 && seeded > 0.0,
        "no bytes over the seeder's link (seeded {seeded}): {stats}\nserver log:\n{}",
        server.log_tail(30)
    );
}

/// A browser on `/watch/{stream}`, once the stream is published (within 30 s)
/// and the page shows its first frame.
async fn watching(server: &Server, stream: &str) -> Browser {
    server
        .wait_for_stream(stream, Duration::from_secs(30))
        .await
        .expect("the stream is published");
    let browser = Browser::watch(&format!("{}/watch/{stream}", server.url()))
        .await
        .expect("browser opens the page");
    first_frames(std::slice::from_ref(&browser), START_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("no first frame: {e}\nserver log:\n{}", server.log_tail(30)));
    browser
}

async fn demo_server() -> Server {
    Server::start_demo(ServerOptions::default())
        .await
        .expect("server starts and publishes the demo stream")
}

/// Opens `/watch/demo{query}` in one browser and plays [`PLAY_SECS`] of media,
/// checking the player's stats on the way; returns the last stats read.
async fn play(server: &Server, query: &str, label: &str) -> Value {
    play_at(
        server,
        &format!("{}/watch/demo{query}", server.url()),
        label,
    )
    .await
}

/// Opens `url`, a page that plays the demo stream of `server` and sets
/// `window.player`, as [`play`] does.
async fn play_at(server: &Server, url: &str, label: &str) -> Value {
    let browser = Browser::watch(url).await.expect("browser opens the page");
    // A page whose player script failed to load says so (`window.load_error`).
    let failed = browser
        .eval("return window.player ? null : (window.load_error || null);")
        .await
        .expect("page readable");
    assert!(failed.is_null(), "{label}: {failed}");

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
        "{label}: startup_ms={startup_ms} latency_ms(last)={} latency_ms(p50)={:?} \
         bytes_from_peers={} bytes_from_origin={} stalls={} peers={}",
        stats["latency_ms"],
        median(&latencies),
        stats["bytes_from_peers"],
        stats["bytes_from_origin"],
        stats["stalls"],
        stats["peers"],
    );
    browser.close().await;
    stats
}

/// A private value through the public key-value store, between two browsers
/// (two Chromium processes) on a page of another site that imports
/// `clubcast.js` from the server, as a broadcaster's page handing a private
/// stream's key to a viewer would. Each makes a secret (Web Crypto); they
/// trade public keys (here through the test); the viewer waits on the slot
/// they share (`Prefer: wait`); the broadcaster seals and puts the value;
/// the viewer's wait answers with it and opens it. The server holds only the
/// sealed bytes, and a stale put is refused with the server's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_browsers_share_a_private_value_through_the_key_value_store() {
    let server = Server::start(ServerOptions {
        args: vec!["--no-demo".into()],
        ..ServerOptions::default()
    })
    .await
    .expect("server starts");
    let page = format!(
        r#"<!doctype html>
<html><body>
<script type="module">
  import {{ kv }} from "{0}/clubcast.js";
  try {{
    window.store = await kv();
    window.me = new window.store.KvSecret();
  }} catch (e) {{
    window.load_error = String(e);
  }}
</script>
</body></html>"#,
        server.url()
    );
    let site = serve_page(page).await;
    let open = || async {
        let b = Browser::watch(&format!("http://{site}/"))
            .await
            .expect("browser opens the page");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = b
                .eval("return window.me ? window.me.publicKey : (window.load_error ? 'error: ' + window.load_error : null);")
                .await
                .expect("page readable");
            if let Some(key) = v.as_str() {
                assert!(!key.starts_with("error"), "{key}");
                return (b, key.to_owned());
            }
            assert!(Instant::now() < deadline, "the kv API did not load");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (broadcaster, broadcaster_key) = open().await;
    let (viewer, viewer_key) = open().await;
    assert_ne!(broadcaster_key, viewer_key);

    // The viewer waits on the shared slot before anything is there.
    viewer
        .eval(&format!(
            r#"window.slot = window.me.shared("{broadcaster_key}");
               window.got = null;
               window.store.get(window.slot.publicKey, {{ salt: "stream-key", after: 0, wait: 20 }})
                 .then((item) => {{ window.got = item ? new TextDecoder().decode(window.slot.open(item)) : "none"; }},
                       (e) => {{ window.got = "error " + e.code; }});
               return window.slot.publicKey;"#
        ))
        .await
        .expect("viewer waits");
    tokio::time::sleep(Duration::from_millis(500)).await;

    let put = broadcaster
        .eval(&format!(
            r#"const slot = window.me.shared("{viewer_key}");
               const item = slot.seal("stream-key", 1, new TextEncoder().encode("the private key is 42"));
               await window.store.put(item);
               let stale = "accepted";
               try {{ await window.store.put(slot.seal("stream-key", 1, new TextEncoder().encode("other"))); }}
               catch (e) {{ stale = e.code + " " + e.status; }}
               return {{ key: slot.publicKey, stale }};"#
        ))
        .await
        .expect("broadcaster puts");
    assert_eq!(put["stale"], "seq_too_low 409", "{put}");
    let slot_key = put["key"].as_str().expect("slot key").to_owned();

    let deadline = Instant::now() + Duration::from_secs(15);
    let got = loop {
        let v = viewer
            .eval("return window.got;")
            .await
            .expect("page readable");
        if !v.is_null() {
            break v;
        }
        assert!(
            Instant::now() < deadline,
            "the viewer's wait did not answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(got, "the private key is 42");

    // The server holds the item, and not the plaintext.
    let (status, body) = http_get(
        server.addr(),
        &format!("/kv/{slot_key}?salt={}", "73747265616d2d6b6579"),
    )
    .await
    .expect("kv get");
    assert_eq!(status, 200);
    let held = String::from_utf8_lossy(&body);
    assert!(!held.contains("private key"), "{held}");
    let metrics = server.metrics().await.expect("metrics");
    assert_eq!(metrics.get("clubcast_kv_items"), Some(&1.0), "{metrics:?}");
    broadcaster.close().await;
    viewer.close().await;
}

/// `/kv` items outlive a crash of the server: an item put, then the server
/// killed (SIGKILL, nothing saved on the way out) after the store's save
/// interval, is served by the restarted server, and the restarted server
/// still refuses its older seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_items_outlive_a_crash_of_the_server() {
    use clubcast_protocol::kv::KvSecret;
    use rand::SeedableRng;

    let mut server = Server::start(ServerOptions {
        args: vec!["--no-demo".into()],
        ..ServerOptions::default()
    })
    .await
    .expect("server starts");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let slot = KvSecret::random(&mut rng)
        .shared(&KvSecret::random(&mut rng).public())
        .expect("shared");
    let mut item = |seq: u64| {
        let i = slot.seal(b"k", seq, b"survives", &mut rng).expect("sealed");
        let key: String = i.key.iter().map(|b| format!("{b:02x}")).collect();
        let path = format!("/kv/{key}");
        (path, serde_json::to_vec(&i.to_json()).expect("json"))
    };
    let (path, body) = item(2);
    let (status, answer) = http_request(server.addr(), "PUT", &path, &body)
        .await
        .expect("put");
    assert_eq!(status, 201, "{}", String::from_utf8_lossy(&answer));

    // The store writes at most 10 s after a put.
    tokio::time::sleep(Duration::from_secs(12)).await;
    server.restart().await.expect("server restarts");

    let (status, answer) = http_get(server.addr(), &format!("{path}?salt=6b"))
        .await
        .expect("get");
    assert_eq!(
        status,
        200,
        "{}\n{}",
        String::from_utf8_lossy(&answer),
        server.log_tail(20)
    );
    let back: Value = serde_json::from_slice(&answer).expect("json");
    assert_eq!(back["seq"], 2);
    let (_, older) = item(1);
    let (status, _) = http_request(server.addr(), "PUT", &path, &older)
        .await
        .expect("put");
    assert_eq!(status, 409, "the restarted store still holds seq 2");
}
