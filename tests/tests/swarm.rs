//! Swarm tests: one server with the demo stream and headless Chromium
//! processes (each with its own chromedriver and `--user-data-dir`) on
//! `/watch/demo`. The tests of this file take turns (one browser set at a
//! time); together they run in about 90 s on 2 cores.
//!
//! `swarm_of_six_plays_and_survives_churn`:
//! 1. six browsers reach a first frame; then, for [`MEASURE`] of wall time,
//!    each browser's `<video>` is sampled every 250 ms (one task per browser);
//! 2. per-browser stats and the swarm's p2p ratio
//!    (`sum bytes_from_peers / sum (bytes_from_peers + bytes_from_origin)`,
//!    whole run) are printed. Asserted: no media error; every browser's
//!    `currentTime` advances by at least [`MIN_ADVANCE`] s in the window; the
//!    p2p ratio is at least [`MIN_P2P_RATIO`]; no browser's `currentTime`
//!    stands still for more than [`MAX_FREEZE_MS`] after startup.
//!    "Stands still" is measured here by the 250 ms sampling (resolution: one
//!    sample), not from the player's own `stalls`/`stall_ms`, which count
//!    from page load and are printed for the record. Note that
//!    `bytes_from_peers` includes bytes from the server's WebRTC seeder; the
//!    browsers' own share is printed as "browser uploads / all bytes";
//! 3. churn: two browsers are killed (dropped) and the other four must keep
//!    advancing `currentTime` (at least [`MIN_CHURN_ADVANCE`] s) for [`CHURN`],
//!    never standing still for more than [`MAX_CHURN_FREEZE_MS`]. Their links
//!    are replaced: no survivor keeps a link open to a killed browser (open
//!    links at most the other survivors plus the seeder), every survivor still
//!    has one, and in the churn window the survivors still get at least
//!    [`MIN_P2P_RATIO`] of their bytes over peer links (the seeder's
//!    included) rather than from the origin.
//!
//! `a_viewer_whose_signaling_drops_rejoins_and_plays_on`: three browsers, the
//! third loading its page through a [`Proxy`]. Once all play, every connection
//! through the proxy is cut (its signaling socket among them; its WebRTC links
//! go around the proxy). Asserted over the next [`REJOIN_WINDOW`]: all three
//! keep playing (at least [`MIN_REJOIN_ADVANCE`] s of media, no stand-still
//! over [`MAX_CHURN_FREEZE_MS`]); the third has rejoined under a new peer id,
//! has signaling and a link again, gets blocks from peers again, and its stats
//! carry over the rejoin.
//!
//! `bad_input_does_not_disturb_viewers`: while two browsers play, garbage is
//! `PUT` to `/ingest/demo` (no token, wrong token, right token) and malformed
//! JSON, binary and invalid UTF-8 frames are sent over `/ws`. Asserted: every
//! answer is a non-5xx status, `/healthz` says ok, and both browsers keep
//! playing (at least 10 s of media in 15 s, no media error).
//!
//! Needs `web/pkg` (`just build-web`), chromedriver and Chromium.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clubcast_tests::{
    first_frames, http_get, median, num, sample_all, watch_all, Browser, Proxy, Server,
    ServerOptions,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Browsers in the swarm.
const N: usize = 6;
/// Browsers killed in the churn phase.
const KILLED: usize = 2;
/// Wall time of the measured window.
const MEASURE: Duration = Duration::from_secs(30);
/// Media seconds every browser must play within [`MEASURE`].
const MIN_ADVANCE: f64 = 20.0;
/// Wall time the survivors must keep playing after the churn.
const CHURN: Duration = Duration::from_secs(15);
/// Media seconds every survivor must play within [`CHURN`].
const MIN_CHURN_ADVANCE: f64 = 9.0;
/// Longest allowed wall time with a survivor's `currentTime` not advancing
/// after the churn (same sampling as [`MAX_FREEZE_MS`]).
const MAX_CHURN_FREEZE_MS: f64 = 1000.0;
/// Minimum swarm-wide `bytes_from_peers / (bytes_from_peers + bytes_from_origin)`.
const MIN_P2P_RATIO: f64 = 0.5;
/// Longest allowed wall time with `currentTime` not advancing, after startup
/// (measured by [`clubcast_tests::TICK`] sampling, so resolution is one tick).
const MAX_FREEZE_MS: f64 = 500.0;
/// Wall time sampled after a viewer's signaling connection is cut.
const REJOIN_WINDOW: Duration = Duration::from_secs(15);
/// Media seconds every browser must play within [`REJOIN_WINDOW`].
const MIN_REJOIN_ADVANCE: f64 = 10.0;
/// Wall time allowed for all browsers to reach a first frame.
const START_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_of_six_plays_and_survives_churn() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let server = Server::start_demo(ServerOptions::default())
        .await
        .expect("server starts and publishes the demo stream");
    let url = format!("{}/watch/demo", server.url());
    let mut browsers = watch_all(N, &url)
        .await
        .expect("browsers open the watch page");

    // Every browser reaches a first frame.
    let started = Instant::now();
    let startup = first_frames(&browsers, START_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log_tail(30)));
    println!("swarm: all {N} started after {:?}", started.elapsed());

    // Measured window.
    let mut before = Vec::new();
    for b in &browsers {
        before.push(b.stats().await.expect("stats readable"));
    }
    let play = sample_all(&browsers, MEASURE).await;
    let mut after = Vec::new();
    for b in &browsers {
        after.push(b.stats().await.expect("stats readable"));
    }

    let (mut peers_total, mut origin_total) = (0.0, 0.0);
    let (mut win_peers, mut win_origin) = (0.0, 0.0);
    let mut latencies = Vec::new();
    let mut uploaded = 0.0;
    for i in 0..N {
        uploaded += num(&after[i], "bytes_uploaded");
        let (s0, s) = (&before[i], &after[i]);
        let p = &play[i];
        peers_total += num(s, "bytes_from_peers");
        origin_total += num(s, "bytes_from_origin");
        win_peers += num(s, "bytes_from_peers") - num(s0, "bytes_from_peers");
        win_origin += num(s, "bytes_from_origin") - num(s0, "bytes_from_origin");
        latencies.push(num(s, "latency_ms"));
        println!(
            "swarm: browser {i}: startup_ms={} advance={:.1}s longest_freeze_ms={:.0} \
             freezes>500ms={} samples={} stalls={} (+{} in window) stall_ms={} (+{:.0}) \
             bytes_from_peers={} bytes_from_origin={} peers={} latency_ms={} slow_sources={}",
            startup[i],
            p.advance(),
            p.longest_freeze_ms,
            p.freezes_over_500ms,
            p.samples,
            s["stalls"],
            num(s, "stalls") - num(s0, "stalls"),
            s["stall_ms"],
            num(s, "stall_ms") - num(s0, "stall_ms"),
            s["bytes_from_peers"],
            s["bytes_from_origin"],
            s["peers"],
            s["latency_ms"],
            s["slow_sources"],
        );
    }
    let ratio = |p: f64, o: f64| if p + o > 0.0 { p / (p + o) } else { 0.0 };
    println!(
        "swarm: p2p ratio (whole run) = {:.3} ({peers_total} / {}); p2p ratio (window) = {:.3}; \
         latency_ms p50 = {:?}; browser uploads / all bytes = {:.3}",
        ratio(peers_total, origin_total),
        peers_total + origin_total,
        ratio(win_peers, win_origin),
        median(&latencies),
        ratio(uploaded, peers_total + origin_total - uploaded),
    );
    for (i, p) in play.iter().enumerate() {
        assert!(p.errors.is_empty(), "browser {i}: {:?}", p.errors);
        assert!(
            p.advance() >= MIN_ADVANCE,
            "browser {i} played only {:.1} s of media in {MEASURE:?}: {p:?}; stats {}",
            p.advance(),
            after[i]
        );
    }
    assert!(
        peers_total > 0.0,
        "no bytes came from peers across the swarm; origin bytes {origin_total}"
    );
    assert!(
        ratio(peers_total, origin_total) >= MIN_P2P_RATIO,
        "p2p ratio {:.3} < {MIN_P2P_RATIO}: peers {peers_total}, origin {origin_total}",
        ratio(peers_total, origin_total)
    );
    for (i, p) in play.iter().enumerate() {
        assert!(
            p.longest_freeze_ms <= MAX_FREEZE_MS,
            "browser {i}: currentTime stood still for {:.0} ms after startup: {p:?}",
            p.longest_freeze_ms
        );
    }

    // Churn: kill two, the rest keep playing.
    let survivors = browsers.split_off(KILLED);
    drop(browsers);
    let mut before = Vec::new();
    for b in &survivors {
        before.push(b.stats().await.expect("stats readable"));
    }
    let play = sample_all(&survivors, CHURN).await;
    let (mut win_peers, mut win_origin) = (0.0, 0.0);
    for (i, p) in play.iter().enumerate() {
        let s = survivors[i].stats().await.expect("stats readable");
        win_peers += num(&s, "bytes_from_peers") - num(&before[i], "bytes_from_peers");
        win_origin += num(&s, "bytes_from_origin") - num(&before[i], "bytes_from_origin");
        println!(
            "churn: survivor {i}: advance={:.1}s longest_freeze_ms={:.0} stalls={} \
             bytes_from_peers={} bytes_from_origin={} peers={} latency_ms={}",
            p.advance(),
            p.longest_freeze_ms,
            s["stalls"],
            s["bytes_from_peers"],
            s["bytes_from_origin"],
            s["peers"],
            s["latency_ms"],
        );
        assert!(p.errors.is_empty(), "survivor {i}: {:?}", p.errors);
        assert!(
            p.advance() >= MIN_CHURN_ADVANCE,
            "survivor {i} played only {:.1} s of media in {CHURN:?} after the churn: {p:?}; \
             stats {s}",
            p.advance()
        );
        assert!(
            p.longest_freeze_ms <= MAX_CHURN_FREEZE_MS,
            "survivor {i}: currentTime stood still for {:.0} ms after the churn: {p:?}",
            p.longest_freeze_ms
        );
        // One link per remote at most: the other survivors and the seeder.
        let alive = (N - KILLED) as f64;
        assert!(
            (1.0..=alive).contains(&num(&s, "peers")),
            "survivor {i} has {} open links; expected 1..={alive} (none to a killed browser): {s}",
            s["peers"]
        );
    }
    println!(
        "churn: p2p ratio (churn window) = {:.3}",
        ratio(win_peers, win_origin)
    );
    assert!(
        ratio(win_peers, win_origin) >= MIN_P2P_RATIO,
        "after the churn the survivors got only {:.3} of their bytes from peers \
         (peers {win_peers}, origin {win_origin}): the killed browsers' roles were not taken over",
        ratio(win_peers, win_origin)
    );
    for b in survivors {
        b.close().await;
    }
}

/// Serializes the tests of this file: each runs its own browsers, and two
/// swarms at once would overload a 2-core machine.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `method path` with `headers` and `body` over HTTP/1.0: the status code.
async fn http_send(addr: SocketAddr, method: &str, path: &str, headers: &str, body: &[u8]) -> u16 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n{headers}\
         Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("send head");
    // The server may answer (and close) before reading the whole body.
    let _ = s.write_all(body).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await;
    std::str::from_utf8(&buf[..buf.len().min(64)])
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// Opens `/ws` with a hand-made WebSocket handshake and sends `frames`
/// (opcode, payload) as masked client frames; returns the handshake status.
async fn ws_garbage(addr: SocketAddr, frames: &[(u8, &[u8])]) -> u16 {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let req = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("send handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        match s.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let status = std::str::from_utf8(&head)
        .ok()
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    if status != 101 {
        return status;
    }
    let mask = [0x37u8, 0xfa, 0x21, 0x3d];
    for (opcode, payload) in frames {
        let mut f = vec![0x80 | opcode];
        if payload.len() < 126 {
            f.push(0x80 | payload.len() as u8);
        } else {
            f.push(0x80 | 126);
            f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        }
        f.extend_from_slice(&mask);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        if s.write_all(&f).await.is_err() {
            break;
        }
    }
    // Whatever the server answers (errors, close), drain it for a moment.
    let mut sink = vec![0u8; 4096];
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    status
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_does_not_disturb_viewers() {
    let _turn = ONE_AT_A_TIME.lock().await;
    const TOKEN: &str = "swarm-test-token";
    let server = Server::start_demo(ServerOptions {
        args: vec!["--publish-token".into(), TOKEN.into()],
        ..ServerOptions::default()
    })
    .await
    .expect("server starts and publishes the demo stream");
    let url = format!("{}/watch/demo", server.url());
    let browsers = watch_all(2, &url)
        .await
        .expect("browsers open the watch page");
    first_frames(&browsers, START_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log_tail(30)));
    // Sample while the garbage flies.
    let watching = sample_all(&browsers, Duration::from_secs(15));

    let addr = server.addr();
    let garbage: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let auth = format!("Authorization: Bearer {TOKEN}\r\n");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        for (headers, body) in [
            ("", &garbage[..]),
            ("Authorization: Bearer wrong\r\n", &garbage[..]),
            (auth.as_str(), &garbage[..]),
            (&*format!("{auth}Content-Type: video/mp4\r\n"), &garbage[..]),
            (auth.as_str(), &b"\0\0\0\x08moov"[..]),
            (auth.as_str(), &b""[..]),
        ] {
            statuses.push(http_send(addr, "PUT", "/ingest/demo", headers, body).await);
        }
        let ws = ws_garbage(
            addr,
            &[
                (1, b"{"),
                (1, b"not json at all"),
                (1, b"{\"type\":\"no-such-message\",\"x\":[1,2,3]}"),
                (1, b"[1,2,3]"),
                (1, b"{\"type\":\"join\",\"stream\":12345}"),
                (2, &garbage[..1000]),
                (1, &[0xff, 0xfe, 0xfd]),
            ],
        )
        .await;
        statuses.push(ws);
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    println!("bad input: statuses {statuses:?}");
    assert!(
        statuses.iter().all(|s| (100..500).contains(s)),
        "the server answered bad input with a server error or not at all: {statuses:?}"
    );
    let (code, body) = http_get(addr, "/healthz").await.expect("healthz");
    assert_eq!(
        (code, String::from_utf8_lossy(&body).trim().to_owned()),
        (200, "ok".to_owned()),
        "healthz after bad input"
    );

    let play = watching.await;
    for (i, p) in play.iter().enumerate() {
        println!(
            "bad input: browser {i}: advance={:.1}s longest_freeze_ms={:.0}",
            p.advance(),
            p.longest_freeze_ms
        );
        assert!(p.errors.is_empty(), "browser {i}: {:?}", p.errors);
        assert!(
            p.advance() >= 10.0,
            "browser {i} played only {:.1} s of media in 15 s during bad input: {p:?}",
            p.advance()
        );
    }
    for b in browsers {
        b.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_viewer_whose_signaling_drops_rejoins_and_plays_on() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let server = Server::start_demo(ServerOptions::default())
        .await
        .expect("server starts and publishes the demo stream");
    let proxy = Proxy::start(server.addr()).await.expect("proxy starts");
    // Two browsers straight to the server, the last one through the proxy.
    let mut browsers = watch_all(2, &format!("{}/watch/demo", server.url()))
        .await
        .expect("browsers open the watch page");
    browsers.push(
        Browser::watch(&format!("{}/watch/demo", proxy.url()))
            .await
            .expect("a browser opens the watch page through the proxy"),
    );
    first_frames(&browsers, START_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e}\nserver log:\n{}", server.log_tail(30)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let viewer = &browsers[2];
    let before = viewer.stats().await.expect("stats readable");
    assert_eq!(
        num(&before, "rejoins"),
        0.0,
        "no rejoin before the cut: {before}"
    );

    let cut = proxy.cut();
    assert!(cut >= 1, "the signaling socket runs through the proxy");
    let play = sample_all(&browsers, REJOIN_WINDOW).await;
    let s1 = viewer.stats().await.expect("stats readable");
    tokio::time::sleep(Duration::from_secs(4)).await;
    let s2 = viewer.stats().await.expect("stats readable");
    println!("rejoin: cut {cut} connections; before {before}\nafter {s2}");
    for (i, p) in play.iter().enumerate() {
        println!(
            "rejoin: browser {i}: advance={:.1}s longest_freeze_ms={:.0}",
            p.advance(),
            p.longest_freeze_ms
        );
        assert!(p.errors.is_empty(), "browser {i}: {:?}", p.errors);
        assert!(
            p.advance() >= MIN_REJOIN_ADVANCE,
            "browser {i} played only {:.1} s of media in {REJOIN_WINDOW:?} after the cut: {p:?}",
            p.advance()
        );
        assert!(
            p.longest_freeze_ms <= MAX_CHURN_FREEZE_MS,
            "browser {i}: currentTime stood still for {:.0} ms after the cut: {p:?}",
            p.longest_freeze_ms
        );
    }
    assert!(num(&s2, "rejoins") >= 1.0, "the viewer rejoined: {s2}");
    assert_eq!(s2["signaling"], true, "signaling is open again: {s2}");
    assert_ne!(
        s2["peer_id"], before["peer_id"],
        "the rejoin got a new peer id: {s2}"
    );
    assert!(num(&s2, "peers") >= 1.0, "the viewer has links again: {s2}");
    assert!(
        num(&s2, "bytes_from_peers") > num(&s1, "bytes_from_peers"),
        "the viewer gets blocks from peers again after the rejoin: {s1} then {s2}"
    );
    // The old core's startup backlog came from the origin, more than the new
    // core fetches there: a session that dropped the old core's counters
    // would show less than before the cut.
    for k in ["bytes_from_origin", "gap_fills", "bytes_from_peers"] {
        assert!(
            num(&s2, k) >= num(&before, k),
            "stats carry over the rejoin ({k}): {before} then {s2}"
        );
    }
    for b in browsers {
        b.close().await;
    }
}
