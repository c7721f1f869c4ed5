//! On-demand playback end to end: a real server, headless Chromium, the
//! watch page with `?vod=<name>`.
//!
//! - `demo_asset_plays_seeks_and_ends_from_the_origin`: the built-in asset
//!   `demo` (the demo clip, 16 s) starts, its time advances, a seek to 10 s
//!   lands there and plays on, the video reaches `ended`, and the player
//!   fetched every block exactly once: `bytes_from_origin` is the asset's
//!   bytes plus its init segment, as the server counted them.
//! - `a_seek_past_the_buffer_fetches_from_the_target_only`: the demo clip
//!   uploaded with `PUT /vod/clip` and played with `ahead_s=2`: the seek to
//!   10 s lands in media not fetched yet, so the player fetches from there
//!   (`refetches`), plays on to `ended`, and never fetches the part it
//!   skipped.
//! - `bad_assets_play_nothing_unverified`: a payload byte of the block that
//!   starts the fragment at 6 s is flipped in `blocks.bin` on the server's
//!   disk: the player plays what verified, reports `bad_block` and never
//!   buffers the bad fragment (nor anything after it); a pinned key that is
//!   not the asset's gives `wrong_key` and fetches nothing; an unknown name
//!   gives `unknown_asset`; an asset uploaded again while it plays (2 s
//!   ahead) gives `asset_replaced` at the next run.
//! - `fragments_longer_than_a_run_play_through`: a file ffmpeg encodes (720p
//!   H.264 high with B-frames at 6 Mbit/s, 4-s fragments, so each fragment
//!   is several runs of blocks) plays, seeks and ends.
//! - `a_second_viewer_gets_the_asset_from_the_first_and_stops_http`: viewer
//!   A holds all of a 40-s asset ffmpeg encodes; viewer B, in another
//!   Chromium, plays it 10 s ahead. B starts on HTTP, meets A through the
//!   server, takes what lies past the origin's 8 s from A over a data
//!   channel, and switches over: a `source` event says `swarm`
//!   (`swarm_keeps_up`), and in the 6 s of play after it at most a quarter of
//!   B's blocks come from the origin (the backstop), the rest from A. With
//!   `p2p=0` (a third page) nothing comes from peers and no swarm is joined.
//!   Fails when A sends no blocks (checked).
//! - `a_metered_viewer_bids_and_plays_on_its_grants`: the origin meters
//!   on-demand runs (`--vod-budget-kbps 3000`) and keeps nothing for runs
//!   without a grant token (`--anonymous-budget-percent 0`): the viewer,
//!   fetching 30 s ahead, plays 8 s only because its runs carry the token
//!   of its welcome; it bids every interval and gets grants, and the server
//!   counts the bids and the bits granted. Fails when the player sends no
//!   `Authorization` header (checked).
//! - `the_index_lists_assets_and_the_element_plays_one`: the index links
//!   `watch.html?vod=demo`, `<clubcast-player vod="demo">` plays, and so does
//!   the iframe page `/embed/demo?vod`.
//!
//! Needs `web/pkg` (`just build-web`), chromedriver and Chromium.

use std::time::{Duration, Instant};

use clubcast_protocol::block::{StreamSigner, BLOCK_OVERHEAD, HEADER_LEN};
use clubcast_protocol::vod::SignedManifest;
use clubcast_tests::{http_get, http_request, workspace_dir, Browser, Server, ServerOptions};
use serde_json::Value;

/// The publish token the test servers take uploads with.
const TOKEN: &str = "tok";
/// Wall time allowed for a first frame.
const START_TIMEOUT: Duration = Duration::from_secs(45);
/// Wall time allowed for one step of playback (advance, seek, end).
const STEP_TIMEOUT: Duration = Duration::from_secs(45);
/// Where the tests seek to, media seconds.
const SEEK_TO: f64 = 10.0;
/// How far past [`SEEK_TO`] the `seeked` event may report the playhead, s.
const SEEK_LATE_S: f64 = 2.0;
/// Media time of the fragment whose first block is tampered with, s.
const TAMPERED_AT: f64 = 6.0;
/// The playhead and the buffer may reach this far past the tampered
/// fragment's start (a frame's duration and rounding), s.
const EPS: f64 = 0.05;

/// The page's video, the player's stats and the events recorded since
/// [`record_events`].
const STATE_JS: &str = "const v = document.getElementById('video');
    const b = [];
    for (let i = 0; i < v.buffered.length; i++) b.push([v.buffered.start(i), v.buffered.end(i)]);
    return {t: v.currentTime, ended: v.ended, seeking: v.seeking, buffered: b,
            error: v.error ? v.error.message : null,
            stats: window.player ? window.player.stats() : null,
            events: window.vodEvents || []};";

/// Records the player's events in `window.vodEvents`.
const RECORD_JS: &str = "window.vodEvents = [];
    for (const t of ['playing', 'seeked', 'ended', 'error', 'stall', 'resume', 'retry', 'gap',
                     'source', 'p2p_joined', 'p2p_error', 'peer_dropped'])
      window.player.on(t, (e) => window.vodEvents.push(Object.assign({type: t}, e)));";

/// A server with the demo source (and so the `demo` asset) that takes
/// uploads with [`TOKEN`].
async fn server() -> Server {
    let opts = ServerOptions {
        args: vec!["--publish-token".into(), TOKEN.into()],
        ..ServerOptions::default()
    };
    Server::start(opts).await.expect("server starts")
}

/// The demo clip's file.
fn clip_bytes() -> Vec<u8> {
    let file = workspace_dir().join("signal-server/assets/demo.mp4");
    std::fs::read(&file).expect("the demo clip is in the repository")
}

/// `PUT /vod/<name>` of the demo clip; the summary.
async fn upload_demo_clip(server: &Server, name: &str) -> Value {
    upload(server, name, &clip_bytes()).await
}

/// `PUT /vod/<name>` of `bytes` (`name` may carry `?replace=true`), which
/// must be taken; the summary.
async fn upload(server: &Server, name: &str, bytes: &[u8]) -> Value {
    let sep = if name.contains('?') { '&' } else { '?' };
    let path = format!("/vod/{name}{sep}token={TOKEN}");
    let (status, body) = http_request(server.addr(), "PUT", &path, bytes)
        .await
        .expect("upload");
    let text = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 201, "upload answered {status}: {text}");
    serde_json::from_str(&text).expect("a JSON summary")
}

/// The asset's manifest, verified; waits (a minute) for the asset to appear.
async fn manifest(server: &Server, name: &str) -> SignedManifest {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = http_get(server.addr(), &format!("/vod/{name}/manifest"))
            .await
            .expect("GET manifest");
        if status == 200 {
            let text = String::from_utf8(body).expect("UTF-8 JSON");
            return SignedManifest::from_json(&text).expect("a manifest that verifies");
        }
        assert!(
            Instant::now() < deadline,
            "no asset {name:?} (status {status}); server log:\n{}",
            server.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn open(browser: &Browser, server: &Server, query: &str) {
    browser
        .goto(&format!("{}/watch.html?{query}", server.url()))
        .await
        .expect("open the watch page");
    // `window.player` is set by the page's module script.
    wait(browser, "window.player", STEP_TIMEOUT, |s| {
        !s["stats"].is_null()
    })
    .await;
    browser.eval(RECORD_JS).await.expect("record events");
}

async fn state(browser: &Browser) -> Value {
    browser.eval(STATE_JS).await.expect("read the page")
}

/// Polls the page until `done` holds; the state then. Panics on timeout or
/// a media error.
async fn wait(
    browser: &Browser,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = state(browser).await;
        assert!(s["error"].is_null(), "media error waiting for {what}: {s}");
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {s}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn t(s: &Value) -> f64 {
    s["t"].as_f64().unwrap_or(0.0)
}

fn stat(s: &Value, k: &str) -> f64 {
    s["stats"][k].as_f64().unwrap_or(f64::NAN)
}

fn has_event(s: &Value, kind: &str) -> bool {
    s["events"]
        .as_array()
        .is_some_and(|es| es.iter().any(|e| e["type"] == kind))
}

fn buffered_end(s: &Value) -> f64 {
    s["buffered"]
        .as_array()
        .and_then(|b| b.last())
        .and_then(|r| r[1].as_f64())
        .unwrap_or(0.0)
}

/// Starts, advances, seeks to [`SEEK_TO`] and ends; the state at the end.
async fn play_seek_and_end(browser: &Browser) -> Value {
    let started = wait(browser, "a first frame", START_TIMEOUT, |s| {
        stat(s, "startup_ms").is_finite()
    })
    .await;
    eprintln!("startup_ms {}", stat(&started, "startup_ms"));
    let from = t(&started);
    wait(browser, "the time to advance", STEP_TIMEOUT, |s| {
        t(s) >= from + 1.0
    })
    .await;
    browser
        .eval(&format!(
            "document.getElementById('video').currentTime = {SEEK_TO};"
        ))
        .await
        .expect("seek");
    let landed = wait(browser, "the seek to land", STEP_TIMEOUT, |s| {
        has_event(s, "seeked")
    })
    .await;
    let seeked = landed["events"]
        .as_array()
        .and_then(|es| es.iter().find(|e| e["type"] == "seeked"))
        .and_then(|e| e["current_time"].as_f64())
        .unwrap_or(f64::NAN);
    // The page reads the time when it gets the event; on a loaded machine
    // the media may have played on a little by then.
    assert!(
        (SEEK_TO - 0.1..SEEK_TO + SEEK_LATE_S).contains(&seeked),
        "the seek landed at {seeked}: {landed}"
    );
    wait(
        browser,
        "playback to go on after the seek",
        STEP_TIMEOUT,
        |s| t(s) >= SEEK_TO + 1.0,
    )
    .await;
    wait(browser, "the end", STEP_TIMEOUT, |s| {
        s["ended"] == true && has_event(s, "ended")
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_asset_plays_seeks_and_ends_from_the_origin() {
    let server = server().await;
    let signed = manifest(&server, "demo").await;
    let m = signed.manifest();
    let browser = Browser::launch().await.expect("browser");
    open(&browser, &server, "vod=demo").await;
    let end = play_seek_and_end(&browser).await;

    assert!(end["stats"]["error"].is_null(), "{end}");
    assert!(
        (stat(&end, "duration_s") - m.duration_s()).abs() < 1e-6,
        "{end}"
    );
    assert_eq!(stat(&end, "blocks_fetched"), m.blocks as f64, "{end}");
    // The seek landed in media already fetched (30 s ahead covers the clip):
    // every block came once, the init segment once.
    let want = (m.bytes + m.init_bytes) as f64;
    assert_eq!(stat(&end, "bytes_from_origin"), want, "{end}");
    assert_eq!(stat(&end, "bytes_from_peers"), 0.0);
    let metrics = server.metrics().await.expect("metrics");
    let served = metrics
        .get("clubcast_vod_bytes_total")
        .copied()
        .unwrap_or(f64::NAN);
    assert_eq!(served, m.bytes as f64, "the server's count of block bytes");
    eprintln!(
        "demo: {} blocks, {} bytes + {} init; stalls {}, stall_ms {}",
        m.blocks,
        m.bytes,
        m.init_bytes,
        stat(&end, "stalls"),
        stat(&end, "stall_ms")
    );
    browser.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_past_the_buffer_fetches_from_the_target_only() {
    let server = server().await;
    let summary = upload_demo_clip(&server, "clip").await;
    let signed = manifest(&server, "clip").await;
    let m = signed.manifest();
    assert_eq!(summary["bytes"].as_u64(), Some(m.bytes), "{summary}");
    let (status, list) = http_get(server.addr(), "/vod").await.expect("GET /vod");
    assert_eq!(status, 200);
    let list: Value = serde_json::from_slice(&list).expect("JSON");
    assert!(
        list.as_array()
            .is_some_and(|l| l.iter().any(|a| a["name"] == "clip")),
        "{list}"
    );

    let browser = Browser::launch().await.expect("browser");
    open(&browser, &server, "vod=clip&ahead_s=2").await;
    let end = play_seek_and_end(&browser).await;

    assert!(end["stats"]["error"].is_null(), "{end}");
    assert!(
        stat(&end, "refetches") >= 1.0,
        "the seek moved the fetches: {end}"
    );
    // Fetched: from the start to a few seconds past where the seek came
    // from, and from 10 s to the end; not the seconds in between.
    let total = (m.bytes + m.init_bytes) as f64;
    let got = stat(&end, "bytes_from_origin");
    assert!(
        got < 0.85 * total && got > 0.3 * total,
        "fetched {got} of {total} bytes: {end}"
    );
    assert!(stat(&end, "blocks_fetched") < m.blocks as f64, "{end}");
    browser.close().await;
}

/// `PUT /vod/<name>` of a file ffmpeg makes: `secs` of 1280x720 H.264 high
/// with B-frames at `kbps`, AAC, one fragment per `gop_s` seconds; the
/// summary.
async fn upload_encoded(server: &Server, name: &str, secs: u32, kbps: u32, gop_s: u32) -> Value {
    let dir = tempfile_dir(name);
    let file = dir.join("in.mp4");
    let status = std::process::Command::new("ffmpeg")
        .args(["-loglevel", "error", "-y", "-f", "lavfi", "-i"])
        .arg("testsrc2=size=1280x720:rate=30")
        .args(["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000"])
        .args([
            "-t",
            &secs.to_string(),
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
        ])
        .args([
            "-profile:v",
            "high",
            "-bf",
            "2",
            "-g",
            &(30 * gop_s).to_string(),
        ])
        .args(["-b:v", &format!("{kbps}k"), "-minrate", &format!("{kbps}k")])
        .args([
            "-maxrate",
            &format!("{kbps}k"),
            "-bufsize",
            &format!("{}k", kbps / 2),
        ])
        .args([
            "-c:a",
            "aac",
            "-movflags",
            "frag_keyframe+empty_moov+default_base_moof",
        ])
        .args(["-f", "mp4"])
        .arg(&file)
        .status()
        .expect("ffmpeg runs (`just setup` installs it)");
    assert!(status.success(), "ffmpeg made the file");
    let bytes = std::fs::read(&file).expect("the encoded file");
    let _ = std::fs::remove_dir_all(&dir);
    upload(server, name, &bytes).await
}

/// A fresh directory under the test's `TMPDIR`.
fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("clubcast-vod-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_longer_than_a_run_play_through() {
    // 4-s fragments at 6 Mbit/s: about 3 MB, some 700 blocks of 4 KiB each,
    // so every fragment takes several runs (at most 256 blocks each), and
    // B-frames reorder the samples within them.
    let server = server().await;
    upload_encoded(&server, "long", 12, 6000, 4).await;
    let signed = manifest(&server, "long").await;
    let m = signed.manifest();
    let longest = (0..m.fragments.len())
        .map(|i| m.fragment_blocks(i).end - m.fragment_blocks(i).start)
        .max()
        .unwrap_or(0);
    assert!(
        longest > clubcast_protocol::vod::MAX_RUN_BLOCKS,
        "a fragment of {longest} blocks fits in one run: the test would prove nothing"
    );
    let browser = Browser::launch().await.expect("browser");
    open(&browser, &server, "vod=long").await;
    let end = play_seek_and_end(&browser).await;
    assert!(end["stats"]["error"].is_null(), "{end}");
    // At least one whole long fragment came, in several runs.
    assert!(stat(&end, "blocks_fetched") >= longest as f64, "{end}");
    assert!(
        buffered_end(&end) >= m.start_s() + m.duration_s() - 0.1,
        "{end}"
    );
    browser.close().await;
}

/// Flips a payload byte of block `seq` in the asset's `blocks.bin`.
fn tamper(server: &Server, name: &str, seq: u64) {
    let path = server.data_dir().join("vod").join(name).join("blocks.bin");
    let mut bytes = std::fs::read(&path).expect("the asset's blocks on disk");
    let mut at = 0usize;
    for _ in 0..seq {
        let len = u32::from_be_bytes(
            bytes[at + HEADER_LEN - 4..at + HEADER_LEN]
                .try_into()
                .expect("4 bytes"),
        ) as usize;
        at += BLOCK_OVERHEAD + len;
    }
    let len = u32::from_be_bytes(
        bytes[at + HEADER_LEN - 4..at + HEADER_LEN]
            .try_into()
            .expect("4 bytes"),
    ) as usize;
    assert_eq!(
        u64::from_be_bytes(bytes[at + 2..at + 10].try_into().expect("8 bytes")),
        seq,
        "walked to the right block"
    );
    bytes[at + BLOCK_OVERHEAD + len / 2] ^= 0x40;
    std::fs::write(&path, bytes).expect("write blocks.bin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_assets_play_nothing_unverified() {
    let server = server().await;
    upload_demo_clip(&server, "clip").await;
    let signed = manifest(&server, "clip").await;
    let m = signed.manifest();
    let bad = m
        .fragments
        .iter()
        .find(|f| m.seconds(f.media_time) >= TAMPERED_AT)
        .copied()
        .expect("the clip is longer than that");
    let bad_at = m.seconds(bad.media_time);
    tamper(&server, "clip", bad.seq);
    let browser = Browser::launch().await.expect("browser");

    // The tampered block: playback goes up to it, never into it.
    open(&browser, &server, "vod=clip&ahead_s=2").await;
    let failed = wait(&browser, "bad_block", STEP_TIMEOUT, |s| {
        s["stats"]["error"].is_string()
    })
    .await;
    assert_eq!(failed["stats"]["error"], "bad_block", "{failed}");
    // Let what was buffered play out, until the playhead stands still.
    let mut last = t(&failed);
    let mut still_since = Instant::now();
    let deadline = Instant::now() + STEP_TIMEOUT;
    let s = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let s = state(&browser).await;
        if (t(&s) - last).abs() > 1e-3 {
            last = t(&s);
            still_since = Instant::now();
        } else if still_since.elapsed() > Duration::from_secs(2) {
            break s;
        }
        assert!(Instant::now() < deadline, "the playhead never stopped: {s}");
    };
    assert!(
        t(&s) > 2.0,
        "what verified before the bad block played: {s}"
    );
    assert!(
        t(&s) <= bad_at + EPS && buffered_end(&s) <= bad_at + EPS,
        "nothing from the fragment at {bad_at} s on was buffered or played: {s}"
    );
    assert!(
        stat(&s, "blocks_fetched") <= bad.seq as f64,
        "no block from the bad run counted: {s}"
    );

    // A pinned key that is not the asset's: nothing fetched past the manifest.
    let other = StreamSigner::from_seed(&[9; 32]).key().to_id();
    open(&browser, &server, &format!("vod=clip&key={other}")).await;
    let s = wait(&browser, "wrong_key", STEP_TIMEOUT, |s| {
        s["stats"]["error"].is_string()
    })
    .await;
    assert_eq!(s["stats"]["error"], "wrong_key", "{s}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = state(&browser).await;
    assert_eq!(stat(&s, "bytes_from_origin"), 0.0, "{s}");
    assert_eq!(buffered_end(&s), 0.0, "{s}");

    // No such asset.
    open(&browser, &server, "vod=nosuch").await;
    let s = wait(&browser, "unknown_asset", STEP_TIMEOUT, |s| {
        s["stats"]["error"].is_string()
    })
    .await;
    assert_eq!(s["stats"]["error"], "unknown_asset", "{s}");

    // Replaced while it plays, 2 s ahead: the next run is refused with
    // `asset_replaced`, not taken for blocks that do not verify.
    open(&browser, &server, "vod=clip&ahead_s=2").await;
    wait(&browser, "a first frame", START_TIMEOUT, |s| {
        stat(s, "startup_ms").is_finite()
    })
    .await;
    let before = state(&browser).await;
    let again = upload(&server, "clip?replace=true", &clip_bytes()).await;
    assert_ne!(again["key"], before["stats"]["key"], "{again}");
    let s = wait(&browser, "asset_replaced", STEP_TIMEOUT, |s| {
        s["stats"]["error"].is_string()
    })
    .await;
    assert_eq!(s["stats"]["error"], "asset_replaced", "{s}");
    assert!(
        s["events"]
            .as_array()
            .is_some_and(|es| es.iter().any(|e| e["code"] == "asset_replaced")),
        "{s}"
    );
    browser.close().await;
}

/// The element's player: its stats and its video's time.
const ELEMENT_JS: &str = "const el = document.querySelector('clubcast-player');
    const v = el && el.shadowRoot && el.shadowRoot.querySelector('video');
    return {stats: el && el.player ? el.player.stats() : null, t: v ? v.currentTime : 0,
            links: Array.from(document.querySelectorAll('#assets a'), (a) => a.getAttribute('href'))};";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_lists_assets_and_the_element_plays_one() {
    let server = server().await;
    manifest(&server, "demo").await;
    let browser = Browser::launch().await.expect("browser");
    browser
        .goto(&format!("{}/", server.url()))
        .await
        .expect("open the index");
    browser
        .eval(
            "import('./clubcast-player.js').then(() => {
               const el = document.createElement('clubcast-player');
               el.setAttribute('vod', 'demo');
               el.setAttribute('muted', '');
               document.body.append(el);
             });",
        )
        .await
        .expect("add the element");
    let deadline = Instant::now() + START_TIMEOUT;
    let mut from = None;
    let s = loop {
        let s = browser.eval(ELEMENT_JS).await.expect("read the page");
        if stat(&s, "startup_ms").is_finite() {
            let start = *from.get_or_insert(t(&s));
            if t(&s) >= start + 1.0 {
                break s;
            }
        }
        assert!(Instant::now() < deadline, "the element did not play: {s}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(s["stats"]["error"].is_null(), "{s}");
    assert!(
        s["links"]
            .as_array()
            .is_some_and(|l| l.iter().any(|h| h == "watch.html?vod=demo")),
        "the index links the asset: {s}"
    );
    // The iframe page the watch page offers: /embed/{name}?vod.
    browser
        .goto(&format!("{}/embed/demo?vod", server.url()))
        .await
        .expect("open the embed page");
    let embedded = wait(&browser, "the embed page to play", START_TIMEOUT, |s| {
        stat(s, "startup_ms").is_finite() && stat(s, "duration_s") > 15.0
    })
    .await;
    assert!(embedded["stats"]["error"].is_null(), "{embedded}");
    browser.close().await;
}

/// The `source` events recorded on a page.
fn source_events(s: &Value) -> Vec<Value> {
    s["events"]
        .as_array()
        .map(|es| {
            es.iter()
                .filter(|e| e["type"] == "source")
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_viewer_gets_the_asset_from_the_first_and_stops_http() {
    let server = server().await;
    // 40 s, so that the swarm has blocks to bring whenever B's link opens.
    upload_encoded(&server, "long", 40, 1000, 2).await;
    let signed = manifest(&server, "long").await;
    let m = signed.manifest();
    let blocks = m.blocks as f64;

    // A alone, fetching the whole asset at once over HTTP.
    let a = Browser::launch().await.expect("browser A");
    open(&a, &server, "vod=long&ahead_s=600").await;
    wait(&a, "A to hold the whole asset", START_TIMEOUT, |s| {
        stat(s, "blocks_fetched") == blocks && stat(s, "peer_id").is_finite()
    })
    .await;

    // B fetches 10 s ahead: the origin's 8 s, and the rest from A.
    let b = Browser::launch().await.expect("browser B");
    open(&b, &server, "vod=long&ahead_s=10").await;
    let switched = wait(&b, "B to switch to the swarm", START_TIMEOUT, |s| {
        source_events(s).iter().any(|e| e["mode"] == "swarm")
    })
    .await;
    let first = &source_events(&switched)[0];
    assert_eq!(first["mode"], "swarm", "{switched}");
    assert_eq!(first["reason"], "swarm_keeps_up", "{switched}");
    assert!(
        first["swarm_bytes"].as_f64().unwrap_or(0.0) > 0.0,
        "{switched}"
    );
    let at = t(&switched);
    let later = wait(&b, "B to play on for 6 s", STEP_TIMEOUT, |s| {
        t(s) >= at + 6.0
    })
    .await;
    assert!(later["stats"]["error"].is_null(), "{later}");
    assert_eq!(later["stats"]["mode"], "swarm", "{later}");
    // After the switch the origin only fills blocks about to be due; A
    // answers at once, so nearly everything comes from A.
    let origin = stat(&later, "blocks_fetched") - stat(&switched, "blocks_fetched");
    let peers = stat(&later, "blocks_from_peers") - stat(&switched, "blocks_from_peers");
    assert!(peers > 0.0, "{later}");
    assert!(
        origin <= 0.25 * (origin + peers),
        "{origin} blocks from the origin and {peers} from A after the switch: {later}"
    );
    let a_now = state(&a).await;
    assert!(
        stat(&a_now, "blocks_uploaded") >= stat(&later, "blocks_from_peers"),
        "B's blocks from peers came from A: {a_now}"
    );
    eprintln!(
        "swarm: B switched at {at:.1} s; in the next 6 s {peers} blocks from A, {origin} from \
         the origin; {} of {blocks} from A in all",
        stat(&later, "blocks_from_peers")
    );

    // The baseline, on a page of its own: no swarm, every byte from the origin.
    let c = Browser::launch().await.expect("browser C");
    open(&c, &server, "vod=demo&p2p=0").await;
    let demo = manifest(&server, "demo").await;
    let demo_blocks = demo.manifest().blocks as f64;
    let c_end = wait(&c, "C to hold the whole clip", START_TIMEOUT, |s| {
        stat(s, "blocks_fetched") == demo_blocks
    })
    .await;
    assert_eq!(stat(&c_end, "blocks_from_peers"), 0.0, "{c_end}");
    assert!(source_events(&c_end).is_empty(), "{c_end}");
    assert!(c_end["stats"]["peer_id"].is_null(), "{c_end}");
    for browser in [a, b, c] {
        browser.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metered_viewer_bids_and_plays_on_its_grants() {
    // Nothing for runs without a token: the viewer plays only if its runs
    // carry the grant token its welcome gave. 3 Mbit/s for a 1-Mbit/s
    // asset fetched 30 s ahead, in 0.5-s intervals: runs are cut at the
    // grant and refused past it.
    let opts = ServerOptions {
        args: [
            "--publish-token",
            TOKEN,
            "--vod-budget-kbps",
            "3000",
            "--anonymous-budget-percent",
            "0",
            "--bid-interval-ms",
            "500",
        ]
        .map(String::from)
        .to_vec(),
        ..ServerOptions::default()
    };
    let server = Server::start(opts).await.expect("server starts");
    upload_encoded(&server, "metered", 40, 1000, 2).await;
    let m = manifest(&server, "metered").await;
    let browser = Browser::launch().await.expect("browser");
    open(&browser, &server, "vod=metered&ahead_s=30").await;
    let s = wait(&browser, "8 s of play", START_TIMEOUT, |s| t(s) >= 8.0).await;
    assert!(s["stats"]["error"].is_null(), "{s}");
    assert_eq!(s["stats"]["metered"], true, "{s}");
    assert!(stat(&s, "bids_sent") >= 2.0, "{s}");
    assert!(stat(&s, "grants") >= 1.0, "{s}");
    assert!(stat(&s, "bits_granted") > 0.0, "{s}");
    let metrics = server.metrics().await.expect("metrics readable");
    let metric = |k: &str| metrics.get(k).copied().unwrap_or(0.0);
    assert!(metric("clubcast_vod_bids_total") >= 2.0, "{metrics:?}");
    assert!(
        metric("clubcast_vod_granted_bits_total") > 0.0,
        "{metrics:?}"
    );
    eprintln!(
        "metered: {} of {} blocks by 8 s of play, {} runs, {} refused, {} grants ({} bits), \
         {} bids",
        stat(&s, "blocks_fetched"),
        m.manifest().blocks,
        stat(&s, "origin_fetches"),
        stat(&s, "origin_refused"),
        stat(&s, "grants"),
        stat(&s, "bits_granted"),
        stat(&s, "bids_sent"),
    );
    browser.close().await;
}
