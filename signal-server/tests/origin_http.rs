//! The origin over a loopback socket: stream listing, init, block caching
//! headers, 404/425, and gap fill metered against bids and grants.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clubcast_protocol::block::Block;
use clubcast_protocol::block::BlockFlags;
use clubcast_protocol::signal::ServerMsg;
use clubcast_server::app::AppState;
use clubcast_server::config::Config;
use clubcast_server::origin::{IMMUTABLE, MAX_RUN_BLOCKS, RUN_BLOCKS_HEADER, WAIT_AHEAD};
use clubcast_server::stream::{StoreConfig, Streams};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);
/// Payload per test block; its encoded form is a little larger.
const PAYLOAD: usize = 1000;

fn store(store_seconds: u64) -> StoreConfig {
    StoreConfig {
        store_seconds,
        max_bytes: 64 << 20,
    }
}

async fn serve(cfg: Config, store_seconds: u64) -> (SocketAddr, AppState) {
    let streams = Arc::new(Streams::new(None, store(store_seconds)));
    streams.get_or_create("demo").expect("valid name");
    serve_streams(cfg, streams).await
}

async fn serve_streams(cfg: Config, streams: Arc<Streams>) -> (SocketAddr, AppState) {
    let state = AppState::new(cfg, streams, CancellationToken::new());
    (common::listen(&state).await, state)
}

/// Publishes `n` blocks 1 s apart in ingest time.
fn publish(state: &AppState, n: u64) {
    let s = state.streams.get("demo").expect("exists");
    for i in 0..n {
        s.publish(
            BlockFlags::FRAGMENT_START,
            i,
            i * 1000,
            Bytes::from(vec![i as u8; PAYLOAD]),
        )
        .expect("publish");
    }
}

struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }
}

/// A minimal HTTP/1.1 client: one request per connection.
async fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Resp {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .expect("in time")
        .expect("read");
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("header end");
    let head = String::from_utf8(raw[..split].to_vec()).expect("ascii head");
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .expect("status line");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Resp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n").expect("chunk size");
        let size = usize::from_str_radix(std::str::from_utf8(&b[..eol]).expect("hex"), 16)
            .expect("hex size");
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

#[tokio::test]
async fn a_block_is_served_immutable_with_an_etag() {
    let (addr, state) = serve(Config::default(), 120).await;
    publish(&state, 3);
    let stream = state.streams.get("demo").expect("exists");
    let r = http(
        addr,
        "GET",
        &format!("/streams/{}/blocks/1", stream.id),
        &[],
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.header("cache-control"), Some(IMMUTABLE));
    let clubcast_server::store::Lookup::Found(b) = stream.block(1) else {
        panic!("stored");
    };
    assert_eq!(r.body, b.encoded.to_vec());
    let etag = r.header("etag").expect("etag").to_owned();
    assert!(etag.starts_with('"') && etag.len() > 10);

    // By name too; a revalidation with the ETag is 304, HEAD has no body.
    let again = http(
        addr,
        "GET",
        "/streams/demo/blocks/1",
        &[("If-None-Match", &etag)],
    )
    .await;
    assert_eq!(again.status, 304);
    let head = http(addr, "HEAD", "/streams/demo/blocks/1", &[]).await;
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("etag"), Some(etag.as_str()));
    // Another block has another ETag.
    let other = http(addr, "GET", "/streams/demo/blocks/2", &[]).await;
    assert_ne!(other.header("etag"), Some(etag.as_str()));
}

#[tokio::test]
async fn evicted_and_unknown_are_404_future_is_425() {
    // Keep 2 s of blocks: of 6 blocks 1 s apart, 0-2 are evicted.
    let (addr, state) = serve(Config::default(), 2).await;
    publish(&state, 6);
    let r = http(addr, "GET", "/streams/demo/blocks/0", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "evicted");
    let r = http(addr, "GET", "/streams/nope/blocks/0", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "unknown_stream");
    let r = http(addr, "GET", "/streams/demo/blocks/x1", &[]).await;
    assert_eq!(r.status, 400);
    let r = http(addr, "GET", "/streams/demo/blocks/6", &[]).await;
    assert_eq!(r.status, 425);
    assert_eq!(r.json()["code"], "not_yet");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert_eq!(r.header("cache-control"), Some("no-store"));
    let metrics = state.metrics.render();
    assert!(metrics.contains("clubcast_origin_requests_total{status=\"404\"} 2\n"));
    assert!(metrics.contains("clubcast_origin_requests_total{status=\"425\"} 1\n"));
}

#[tokio::test]
async fn prefer_wait_holds_a_request_for_the_next_block_until_it_is_produced() {
    let (addr, state) = serve(Config::default(), 3600).await;
    publish(&state, 3);
    let get = |path: String, prefer: Option<&'static str>| async move {
        let headers: Vec<(&str, &str)> = prefer.map(|p| ("Prefer", p)).into_iter().collect();
        tokio::time::timeout(4 * WAIT, http(addr, "GET", &path, &headers))
            .await
            .expect("answered")
    };
    // Without the header, a block not produced yet is 425 at once.
    assert_eq!(get("/streams/demo/blocks/3".into(), None).await.status, 425);
    // Too far beyond the next block: 425 even with the header.
    let far = 3 + 1 + WAIT_AHEAD;
    let r = get(format!("/streams/demo/blocks/{far}"), Some("wait=5")).await;
    assert_eq!(r.status, 425);
    // The next block, with the header: answered once it is produced.
    let s = state.streams.get("demo").expect("exists");
    let publisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.publish(
            BlockFlags::FRAGMENT_START,
            3,
            3_000,
            Bytes::from(vec![3; PAYLOAD]),
        )
        .expect("publish");
    });
    let r = get("/streams/demo/blocks/3".into(), Some("wait=5")).await;
    publisher.await.expect("published");
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    let block =
        clubcast_protocol::block::Block::decode(Bytes::from(r.body.clone())).expect("a block");
    assert_eq!(block.header.seq, 3);
    // Nothing is produced within the wait: 425 when it ends.
    let r = get("/streams/demo/blocks/4".into(), Some("wait=1")).await;
    assert_eq!(r.status, 425);
    let metrics = state.metrics.render();
    assert!(metrics.contains("clubcast_origin_requests_total{status=\"200\"} 1\n"));
}

/// `GET path` with `Prefer: wait=5`, while blocks `seqs` of `demo` are
/// published 300 ms after the request is sent.
async fn get_while_published(
    addr: SocketAddr,
    state: &AppState,
    path: &str,
    seqs: std::ops::Range<u64>,
) -> Resp {
    let s = state.streams.get("demo").expect("exists");
    let publisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for seq in seqs {
            s.publish(
                BlockFlags::FRAGMENT_START,
                seq,
                seq * 1000,
                Bytes::from(vec![1; PAYLOAD]),
            )
            .expect("publish");
        }
    });
    let r = tokio::time::timeout(4 * WAIT, http(addr, "GET", path, &[("Prefer", "wait=5")]))
        .await
        .expect("answered");
    publisher.await.expect("published");
    r
}

/// After a restart (a new registry on the same data dir), the blocks before
/// the saved number are gone (404), the saved init is served, and a request
/// that waits for the next block is held until the publisher sends it.
#[tokio::test]
async fn a_resumed_stream_serves_from_its_saved_number() {
    let dir = std::env::temp_dir().join(format!("clubcast-origin-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let before = Streams::new(Some(dir.clone()), store(3600));
    let s = before.get_or_create("demo").expect("valid name");
    s.set_init(Bytes::from_static(b"the init"));
    // More than `WAIT_AHEAD` blocks: a wait at the saved number is not a
    // wait far beyond an empty store's edge.
    for i in 0..10 {
        s.publish(
            BlockFlags::FRAGMENT_START,
            i,
            i * 1000,
            Bytes::from(vec![1; PAYLOAD]),
        )
        .expect("publish");
    }
    s.save_progress(0, None);
    drop((s, before));

    let streams = Arc::new(Streams::new(Some(dir.clone()), store(3600)));
    assert_eq!(streams.open_saved(), 1);
    let (addr, state) = serve_streams(Config::default(), streams).await;
    assert_eq!(
        http(addr, "GET", "/streams/demo/blocks/9", &[])
            .await
            .status,
        404
    );
    let init = http(addr, "GET", "/streams/demo/init", &[]).await;
    assert_eq!((init.status, &init.body[..]), (200, &b"the init"[..]));
    let r = get_while_published(addr, &state, "/streams/demo/blocks/10", 10..11).await;
    assert_eq!(r.status, 200, "{:?}", String::from_utf8_lossy(&r.body));
    std::fs::remove_dir_all(dir).expect("cleanup");
}

#[tokio::test]
async fn a_run_carries_the_produced_blocks_back_to_back() {
    let (addr, state) = serve(Config::default(), 3600).await;
    publish(&state, 10);
    let stream = state.streams.get("demo").expect("exists");
    let encoded = |seq| match stream.block(seq) {
        clubcast_server::store::Lookup::Found(b) => b.encoded.to_vec(),
        _ => panic!("block {seq} stored"),
    };
    let r = http(addr, "GET", "/streams/demo/blocks?from=2&max=3", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header(RUN_BLOCKS_HEADER), Some("3"));
    assert_eq!(r.header("cache-control"), Some("no-cache"));
    assert_eq!(r.body, [encoded(2), encoded(3), encoded(4)].concat());
    let run = Block::decode_run(Bytes::from(r.body), 3).expect("splits");
    assert_eq!(
        run.iter().map(|b| b.header.seq).collect::<Vec<_>>(),
        [2, 3, 4]
    );
    // Without max, up to the newest block.
    let r = http(addr, "GET", "/streams/demo/blocks?from=8", &[]).await;
    assert_eq!(r.header(RUN_BLOCKS_HEADER), Some("2"));
    // The first block decides: not produced yet, with or without a wait.
    let r = http(addr, "GET", "/streams/demo/blocks?from=10", &[]).await;
    assert_eq!(r.status, 425);
    let r = get_while_published(addr, &state, "/streams/demo/blocks?from=10", 10..12).await;
    assert_eq!(r.status, 200);
    let first = Block::decode_run(Bytes::from(r.body), MAX_RUN_BLOCKS as usize).expect("splits");
    assert_eq!(first.first().map(|b| b.header.seq), Some(10));
    // Malformed queries are 400 with a code; unknown streams 404.
    for q in ["", "?max=3", "?from=x", "?from=1&max=0", "?from"] {
        let r = http(addr, "GET", &format!("/streams/demo/blocks{q}"), &[]).await;
        assert_eq!(r.status, 400, "{q}");
        assert_eq!(r.json()["code"], "bad_run");
    }
    let r = http(addr, "GET", "/streams/nope/blocks?from=0", &[]).await;
    assert_eq!(r.status, 404);
}

#[tokio::test]
async fn a_run_stops_at_the_grant_and_an_evicted_start_is_404() {
    let (addr, state) = serve(tight_budget(), 5).await;
    publish(&state, 10);
    // The oldest blocks are evicted (5 s kept of 10 blocks 1 s apart).
    let r = http(addr, "GET", "/streams/demo/blocks?from=0", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "evicted");
    // The anonymous bucket (25_000 bits) holds `fit` blocks: the run stops there.
    let fit = 25_000 / block_bits(&state, 5);
    assert!((1..5).contains(&fit));
    let r = http(addr, "GET", "/streams/demo/blocks?from=5", &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header(RUN_BLOCKS_HEADER), Some(fit.to_string().as_str()));
    let before = state.metrics.render();
    let r = http(
        addr,
        "GET",
        &format!("/streams/demo/blocks?from={}", 5 + fit),
        &[],
    )
    .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["code"], "over_anonymous_budget");
    assert!(before.contains(&format!(
        "clubcast_gap_fill_bytes_total {}",
        fit * block_bits(&state, 5) / 8
    )));
}

#[tokio::test]
async fn streams_are_listed_and_init_is_404_until_published() {
    let (addr, state) = serve(Config::default(), 120).await;
    let r = http(addr, "GET", "/streams", &[]).await;
    assert_eq!(r.status, 200);
    let list = r.json();
    assert_eq!(list[0]["name"], "demo");
    assert_eq!(list[0]["clubs"], 8);
    assert!(list[0]["live_edge"].is_null());
    publish(&state, 2);
    let id = state.streams.get("demo").expect("exists").id.clone();
    let one = http(addr, "GET", &format!("/streams/{id}"), &[])
        .await
        .json();
    assert_eq!(one["live_edge"], 1);
    assert_eq!(one["id"], id.as_str());
    // Blocks but no publisher connected (this test publishes directly).
    assert_eq!(one["publishing"], false);
    let guard = state.streams.get("demo").expect("exists").claim();
    let one = http(addr, "GET", "/streams/demo", &[]).await.json();
    assert_eq!(one["publishing"], true, "a publisher holds it");
    let metrics = |addr| async move {
        String::from_utf8(http(addr, "GET", "/metrics", &[]).await.body).expect("utf8")
    };
    let gauge = "clubcast_stream_publishing{stream=\"demo\"}";
    assert!(metrics(addr).await.contains(&format!("{gauge} 1\n")));
    drop(guard);
    assert!(metrics(addr).await.contains(&format!("{gauge} 0\n")));
    let list = http(addr, "GET", "/streams", &[]).await.json();
    assert_eq!(list[0]["publishing"], false, "the publisher went away");
    let r = http(addr, "GET", "/streams/nope", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "unknown_stream");

    let r = http(addr, "GET", "/streams/demo/init", &[]).await;
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["code"], "not_published");
    state
        .streams
        .get("demo")
        .expect("exists")
        .set_init(Bytes::from_static(b"ftypmoov"));
    let r = http(addr, "GET", &format!("/streams/{id}/init"), &[]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"ftypmoov");
    assert_eq!(r.header("content-type"), Some("video/mp4"));
    // A publisher comes back with another init: in force from block 2 (the
    // next fragment start) on; `?seq=` answers the one a block needs.
    let s = state.streams.get("demo").expect("exists");
    s.set_init(Bytes::from_static(b"ftypmoov2"));
    publish(&state, 2);
    for (query, body) in [
        ("", &b"ftypmoov2"[..]),
        ("?seq=0", b"ftypmoov"),
        ("?seq=1", b"ftypmoov"),
        ("?seq=2", b"ftypmoov2"),
        ("?seq=3&x=y", b"ftypmoov2"),
    ] {
        let r = http(addr, "GET", &format!("/streams/demo/init{query}"), &[]).await;
        assert_eq!((r.status, &r.body[..]), (200, body), "init{query}");
    }
    let r = http(addr, "GET", "/streams/demo/init?seq=two", &[]).await;
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["code"], "bad_seq");

    assert_eq!(http(addr, "GET", "/healthz", &[]).await.body, b"ok");
    let m = http(addr, "GET", "/metrics", &[]).await;
    let text = String::from_utf8(m.body).expect("utf8");
    assert!(text.contains("clubcast_streams 1\n"));
    assert!(text.contains("# TYPE clubcast_gap_fill_bytes_total counter"));
}

/// Encoded size of a test block, bits.
/// An origin budget of 100 kbit/s: 100_000 bits per 1-s interval, of which
/// 25 % (25_000 bits) is the anonymous bucket.
fn tight_budget() -> Config {
    Config {
        origin_budget_kbps: 100,
        ..Config::default()
    }
}

fn block_bits(state: &AppState, seq: u64) -> u64 {
    match state.streams.get("demo").expect("exists").block(seq) {
        clubcast_server::store::Lookup::Found(b) => b.encoded.len() as u64 * 8,
        _ => panic!("block {seq} stored"),
    }
}

#[tokio::test]
async fn anonymous_fetches_share_a_capped_bucket() {
    let (addr, state) = serve(tight_budget(), 120).await;
    publish(&state, 10);
    let fit = 25_000 / block_bits(&state, 0);
    assert!(fit >= 1);
    for seq in 0..fit {
        let r = http(addr, "GET", &format!("/streams/demo/blocks/{seq}"), &[]).await;
        assert_eq!(r.status, 200, "block {seq}");
    }
    let r = http(addr, "GET", &format!("/streams/demo/blocks/{fit}"), &[]).await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json()["code"], "over_anonymous_budget");
    assert!(r.header("retry-after").is_some());
    // HEAD is not metered.
    let r = http(addr, "HEAD", &format!("/streams/demo/blocks/{fit}"), &[]).await;
    assert_eq!(r.status, 200);
    // An unknown token is not the anonymous bucket either.
    let r = http(
        addr,
        "GET",
        "/streams/demo/blocks/0",
        &[("Authorization", "Bearer 0000")],
    )
    .await;
    assert_eq!(r.status, 401);
    // The next interval refills the bucket.
    state.hub.run_bid_interval(Instant::now());
    let r = http(addr, "GET", &format!("/streams/demo/blocks/{fit}"), &[]).await;
    assert_eq!(r.status, 200);
}

async fn join(
    addr: SocketAddr,
) -> (
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    String,
) {
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connects");
    ws.send(Message::text(r#"{"type":"join","v":1,"stream":"demo"}"#))
        .await
        .expect("send");
    loop {
        let Some(Ok(Message::Text(t))) = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        else {
            panic!("no welcome");
        };
        if let ServerMsg::Welcome { grant_token, .. } =
            serde_json::from_str(t.as_str()).expect("valid")
        {
            return (ws, grant_token);
        }
    }
}

async fn grant_of<S>(ws: &mut S) -> u64
where
    S: futures_util::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
{
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
            .expect("open")
            .expect("ok");
        if let Message::Text(t) = m {
            if let ServerMsg::Grant { bits, .. } = serde_json::from_str(t.as_str()).expect("valid")
            {
                return bits;
            }
        }
    }
}

#[tokio::test]
async fn bids_over_the_budget_are_cut_and_fetches_beyond_a_grant_get_429() {
    // 100_000 bits per interval; 25 % anonymous, so bids share 75_000,
    // granted in whole units of one 1 KiB block with its overhead.
    let cfg = Config {
        origin_budget_kbps: 100,
        block_kib: 1,
        ..Config::default()
    };
    let unit = cfg.block_unit_bits();
    let units = 75_000 / unit;
    let (addr, state) = serve(cfg, 120).await;
    publish(&state, 20);
    let bits = block_bits(&state, 0);
    let (mut a, token_a) = join(addr).await;
    let (mut b, token_b) = join(addr).await;
    assert!(bits <= unit && units >= 4, "{bits} {unit}");
    // The startup grants of the joins outlive one interval end: let them go.
    state.hub.run_bid_interval(Instant::now());
    state.hub.run_bid_interval(Instant::now());
    let small = bits + bits / 2; // one block and a half
    a.send(Message::text(format!(
        r#"{{"type":"bid","v":1,"bits":{small}}}"#
    )))
    .await
    .expect("send");
    b.send(Message::text(r#"{"type":"bid","v":1,"bits":1000000}"#))
        .await
        .expect("send");
    // Let both bids arrive before the interval ends.
    for _ in 0..50 {
        if state.metrics.render().contains("clubcast_bids_total 2\n") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    state.hub.run_bid_interval(Instant::now());
    let grant_a = grant_of(&mut a).await;
    let grant_b = grant_of(&mut b).await;
    assert_eq!(
        grant_a,
        2 * unit,
        "a small bid is met in full, in whole blocks"
    );
    assert_eq!(
        grant_b,
        (units - 2) * unit,
        "a large bid gets the rest, cut"
    );

    let auth_a = format!("Bearer {token_a}");
    let auth_b = format!("Bearer {token_b}");
    let get = |seq: u64, auth: &str| {
        let auth = auth.to_owned();
        async move {
            http(
                addr,
                "GET",
                &format!("/streams/demo/blocks/{seq}"),
                &[("Authorization", &auth)],
            )
            .await
        }
    };
    let fit_a = grant_a / bits;
    for seq in 0..fit_a {
        assert_eq!(get(seq, &auth_a).await.status, 200, "block {seq}");
    }
    let over = get(fit_a, &auth_a).await;
    assert_eq!(over.status, 429);
    assert_eq!(over.json()["code"], "over_grant");
    let retry: u64 = over
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("Retry-After seconds");
    assert!((1..=1).contains(&retry), "{retry}");

    let fit_b = grant_b / bits;
    for seq in 0..fit_b {
        assert_eq!(get(seq, &auth_b).await.status, 200, "block {seq}");
    }
    assert_eq!(get(fit_b, &auth_b).await.status, 429);
    // Unused grants expire with the interval: no bid, no grant. The bid
    // budget nobody took is spare, first come: b's fetches draw on it until
    // it is spent, then get 429.
    state.hub.run_bid_interval(Instant::now());
    let mut spent = 0;
    let mut refused = false;
    for seq in 0..20 {
        match get(seq, &auth_b).await.status {
            200 => spent += block_bits(&state, seq),
            429 => {
                refused = true;
                break;
            }
            other => panic!("block {seq}: {other}"),
        }
    }
    assert!(refused, "the spare budget ran out");
    assert!(spent > 0 && spent <= 75_000, "{spent}");
    assert!(state.metrics.render().contains("clubcast_grants_total 2\n"));
}
