//! On-demand rooms over a loopback WebSocket: `join_vod` with the built-in
//! `demo` asset's key, neighbours met and parted, SDP/ICE relay between
//! neighbours only, reports, and the refusals; and metering: the welcome's
//! grant token, bids and grants, runs cut and refused at the grant, and the
//! token forgotten when the viewer leaves.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use clubcast_protocol::block::Block;
use clubcast_protocol::signal::{ErrorCode, LinkOp, Neighbour, PeerId, ServerMsg, SignalData};
use clubcast_server::app::{app, AppState};
use clubcast_server::config::Config;
use clubcast_server::demo::CLIP;
use clubcast_server::signal::MAX_OFFENCES_IN_A_ROW;
use clubcast_server::vod::VodError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tower::ServiceExt;
use ws_client::{closed, connect, error_code, recv, send, Ws};

mod common;
mod ws_client;

/// A server with the built-in `demo` asset, its data dir a fresh temp dir
/// named after `tag`.
async fn serve(tag: &str, cfg: Config) -> (SocketAddr, AppState, PathBuf) {
    let dir = std::env::temp_dir().join(format!("clubcast-vod-ws-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let cfg = Config {
        data_dir: dir.clone(),
        ..cfg
    };
    let (_, state) = common::router(cfg);
    // As `main` opens the library at start.
    state.open_vod();
    (common::listen(&state).await, state, dir)
}

/// The key id of the asset `name` now.
fn key_of(state: &AppState, name: &str) -> String {
    state
        .vod
        .get(name)
        .expect("the asset exists")
        .manifest()
        .key
        .to_id()
}

async fn join_vod(ws: &mut Ws, asset: &str, key: &str) -> ServerMsg {
    send(
        ws,
        &format!(r#"{{"type":"join_vod","v":1,"asset":"{asset}","key":"{key}"}}"#),
    )
    .await;
    recv(ws).await
}

/// Joins `asset` under `key`; the peer id and the neighbours of the welcome.
async fn joined(addr: SocketAddr, asset: &str, key: &str) -> (Ws, PeerId, Vec<Neighbour>) {
    let mut ws = connect(addr).await;
    match join_vod(&mut ws, asset, key).await {
        ServerMsg::VodWelcome {
            peer_id,
            neighbours,
            ..
        } => (ws, peer_id, neighbours),
        other => panic!("expected a vod welcome, got {other:?}"),
    }
}

/// A seated viewer as its welcome describes it.
struct Seated {
    ws: Ws,
    peer: PeerId,
    grant_token: Option<String>,
    bid_interval_ms: u32,
}

/// Joins `asset` under `key`, with what the welcome says of metering.
async fn seated(addr: SocketAddr, asset: &str, key: &str) -> Seated {
    let mut ws = connect(addr).await;
    match join_vod(&mut ws, asset, key).await {
        ServerMsg::VodWelcome {
            peer_id,
            grant_token,
            bid_interval_ms,
            ..
        } => Seated {
            ws,
            peer: peer_id,
            grant_token,
            bid_interval_ms,
        },
        other => panic!("expected a vod welcome, got {other:?}"),
    }
}

/// An HTTP answer of the router.
struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Answer {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }

    fn code(&self) -> String {
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap_or_default();
        json["code"].as_str().unwrap_or("").to_owned()
    }

    /// `X-Clubcast-Blocks`.
    fn blocks(&self) -> u64 {
        self.header("x-clubcast-blocks")
            .parse()
            .expect("a block count")
    }
}

/// `method uri` through `router`, with `token` as the bearer if given.
async fn http(router: &Router, method: &str, uri: &str, token: Option<&str>) -> Answer {
    http_with(router, method, uri, token, &[]).await
}

async fn http_with(
    router: &Router,
    method: &str,
    uri: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
) -> Answer {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = router
        .clone()
        .oneshot(req.body(Body::empty()).expect("request"))
        .await
        .expect("infallible");
    let (status, headers) = (r.status(), r.headers().clone());
    let body = axum::body::to_bytes(r.into_body(), 64 << 20)
        .await
        .expect("body");
    Answer {
        status,
        headers,
        body,
    }
}

/// The next grant, skipping other messages (neighbour changes).
async fn grant(ws: &mut Ws) -> (u64, u32) {
    loop {
        if let ServerMsg::Grant {
            bits, interval_ms, ..
        } = recv(ws).await
        {
            return (bits, interval_ms);
        }
    }
}

/// Waits until a run with `token` is refused as `unknown_token` (the
/// server forgets a token on its own time after the viewer left).
async fn forgotten(router: &Router, token: &str) {
    for _ in 0..250 {
        let r = http(
            router,
            "GET",
            "/vod/demo/blocks?from=0&count=1",
            Some(token),
        )
        .await;
        if r.status == StatusCode::UNAUTHORIZED {
            assert_eq!(r.code(), "unknown_token");
            return;
        }
        // Still known: served, or over its grant.
        assert!(
            [StatusCode::OK, StatusCode::TOO_MANY_REQUESTS].contains(&r.status),
            "{}",
            r.status
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the token of a viewer that left is still honoured");
}

/// The next neighbour change.
async fn neighbour(ws: &mut Ws) -> (LinkOp, Neighbour) {
    match recv(ws).await {
        ServerMsg::Neighbour { op, neighbour, .. } => (op, neighbour),
        other => panic!("expected a neighbour change, got {other:?}"),
    }
}

/// The peer of the next neighbour removal, skipping additions.
async fn removed(ws: &mut Ws) -> PeerId {
    loop {
        if let (LinkOp::Remove, n) = neighbour(ws).await {
            return n.peer;
        }
    }
}

/// Sends a heartbeat and waits for its pong: every message sent before it on
/// this socket has been handled, and none was answered.
async fn sync(ws: &mut Ws) {
    send(ws, r#"{"type":"heartbeat","v":1}"#).await;
    match recv(ws).await {
        ServerMsg::Pong { live_edge, .. } => assert_eq!(live_edge, 0, "no live edge on demand"),
        other => panic!("expected a pong, got {other:?}"),
    }
}

fn offer(to: PeerId, sdp: &str) -> String {
    format!(
        r#"{{"type":"signal","v":1,"to":{to},"data":{{"kind":"offer","sdp":"{sdp}","conn":1}}}}"#
    )
}

/// Waits until `f` holds (the server handles a close on its own time).
async fn eventually(f: impl Fn() -> bool) {
    for _ in 0..250 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(f(), "not in time");
}

#[tokio::test]
async fn a_joiner_meets_the_earlier_viewers_who_hear_of_it() {
    let (addr, state, dir) = serve("meet", Config::default()).await;
    let key = key_of(&state, "demo");
    let mut a = connect(addr).await;
    let welcome = join_vod(&mut a, "demo", &key).await;
    let ServerMsg::VodWelcome {
        peer_id: a_id,
        asset,
        key: told,
        neighbours,
        ice_servers,
        heartbeat_ms,
        ..
    } = welcome
    else {
        panic!("expected a vod welcome, got {welcome:?}");
    };
    assert_eq!((asset.as_str(), told.as_str()), ("demo", key.as_str()));
    assert!(neighbours.is_empty(), "the first viewer has no one");
    assert_eq!(heartbeat_ms, state.config.heartbeat_ms);
    assert_eq!(ice_servers, state.config.ice_servers().unwrap_or_default());

    let (mut b, b_id, nb) = joined(addr, "demo", &key).await;
    assert_eq!(
        nb,
        [Neighbour {
            peer: a_id,
            offer: true
        }],
        "the joiner offers to the earlier viewer"
    );
    assert_eq!(
        neighbour(&mut a).await,
        (
            LinkOp::Add,
            Neighbour {
                peer: b_id,
                offer: false
            }
        )
    );
    let (_c, c_id, nc) = joined(addr, "demo", &key).await;
    let mut peers: Vec<PeerId> = nc.iter().map(|n| n.peer).collect();
    peers.sort_unstable();
    assert_eq!(peers, [a_id, b_id]);
    assert!(nc.iter().all(|n| n.offer));
    for ws in [&mut a, &mut b] {
        assert_eq!(
            neighbour(ws).await,
            (
                LinkOp::Add,
                Neighbour {
                    peer: c_id,
                    offer: false
                }
            )
        );
    }
    sync(&mut a).await;
    assert_eq!(state.hub.vod_peers(&key), 3);
    let text = state.metrics.render();
    assert!(text.contains("clubcast_vod_peers 3\n"), "{text}");
    assert!(text.contains("clubcast_vod_joins_total 3\n"), "{text}");
    assert!(text.contains("clubcast_signal_messages_total{type=\"join_vod\"} 3\n"));
    // On-demand viewers are not in any live swarm.
    assert!(text.contains("clubcast_joins_total 0\n"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_wrong_key_or_an_unknown_asset_is_refused_and_closed() {
    let (addr, state, dir) = serve("refused", Config::default()).await;
    let key = key_of(&state, "demo");
    let other = {
        // A key of the right form that is not the asset's.
        let mut k = key.clone().into_bytes();
        k[0] = if k[0] == b'a' { b'b' } else { b'a' };
        String::from_utf8(k).expect("ascii")
    };
    for (asset, key) in [
        ("demo", other.as_str()),
        ("demo", "nonsense"),
        ("nope", key.as_str()),
        ("../demo", key.as_str()),
        ("Demo", key.as_str()),
    ] {
        let mut ws = connect(addr).await;
        send(
            &mut ws,
            &format!(r#"{{"type":"join_vod","v":1,"asset":"{asset}","key":"{key}"}}"#),
        )
        .await;
        assert_eq!(
            error_code(&mut ws).await,
            ErrorCode::UnknownAsset,
            "{asset} {key}"
        );
        let (code, reason) = closed(&mut ws).await.expect("a close frame");
        assert_eq!(
            (code, reason.as_str()),
            (CloseCode::Policy, "unknown_asset")
        );
    }
    assert_eq!(state.hub.vod_rooms(), 0);
    assert_eq!(state.metrics.rejects("unknown_asset"), 5);
    assert_eq!(state.metrics.vod_joins(), 0);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn signals_go_between_neighbours_with_from_and_elsewhere_get_unknown_peer() {
    let (addr, state, dir) = serve("relay", Config::default()).await;
    let key = key_of(&state, "demo");
    let (mut a, a_id, _) = joined(addr, "demo", &key).await;
    let (mut b, b_id, _) = joined(addr, "demo", &key).await;
    neighbour(&mut a).await;
    send(&mut b, &offer(a_id, "v=0 b")).await;
    assert_eq!(
        recv(&mut a).await,
        ServerMsg::Signal {
            v: 1,
            from: b_id,
            data: SignalData::Offer {
                sdp: "v=0 b".into(),
                conn: Some(1),
            }
        }
    );
    send(
        &mut a,
        &format!(r#"{{"type":"signal","v":1,"to":{b_id},"data":{{"kind":"candidate","conn":1,"candidate":"c","sdpMid":"0","sdpMLineIndex":0}}}}"#),
    )
    .await;
    let got = recv(&mut b).await;
    assert!(
        matches!(got, ServerMsg::Signal { from, data: SignalData::Candidate { .. }, .. } if from == a_id),
        "{got:?}"
    );
    // Not an offence: a signal may race a removal.
    for _ in 0..=MAX_OFFENCES_IN_A_ROW {
        send(&mut a, &offer(999_999, "x")).await;
        assert_eq!(error_code(&mut a).await, ErrorCode::UnknownPeer);
    }
    // Parted by a failure, A and B are in the same room but no longer neighbours.
    send(
        &mut a,
        &format!(r#"{{"type":"link_failed","v":1,"peer":{b_id}}}"#),
    )
    .await;
    assert_eq!(
        neighbour(&mut a).await,
        (
            LinkOp::Remove,
            Neighbour {
                peer: b_id,
                offer: false
            }
        )
    );
    assert_eq!(
        neighbour(&mut b).await,
        (
            LinkOp::Remove,
            Neighbour {
                peer: a_id,
                offer: true
            }
        )
    );
    send(&mut b, &offer(a_id, "again")).await;
    assert_eq!(error_code(&mut b).await, ErrorCode::UnknownPeer);
    // The other end's echo of the failure changes nothing, and both stay up.
    send(
        &mut b,
        &format!(r#"{{"type":"link_failed","v":1,"peer":{a_id}}}"#),
    )
    .await;
    sync(&mut b).await;
    sync(&mut a).await;
    assert_eq!(state.hub.vod_peers(&key), 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_closed_socket_is_removed_from_its_neighbours_and_the_last_empties_the_room() {
    let (addr, state, dir) = serve("leave", Config::default()).await;
    let key = key_of(&state, "demo");
    let (mut a, _, _) = joined(addr, "demo", &key).await;
    let (mut b, b_id, _) = joined(addr, "demo", &key).await;
    neighbour(&mut a).await;
    b.close(None).await.expect("close");
    drop(b);
    assert_eq!(
        neighbour(&mut a).await,
        (
            LinkOp::Remove,
            Neighbour {
                peer: b_id,
                offer: false
            }
        )
    );
    assert_eq!(state.hub.vod_peers(&key), 1);
    assert_eq!(state.metrics.vod_peers(), 1);
    a.close(None).await.expect("close");
    drop(a);
    eventually(|| state.hub.vod_rooms() == 0).await;
    assert_eq!(state.metrics.vod_peers(), 0);
    // A new viewer makes the room again.
    let (_c, _, nc) = joined(addr, "demo", &key).await;
    assert!(nc.is_empty());
    assert_eq!(state.hub.vod_rooms(), 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn live_only_and_second_joins_are_refused_and_the_viewer_stays() {
    let (addr, state, dir) = serve("misuse", Config::default()).await;
    let key = key_of(&state, "demo");
    let (mut a, _, _) = joined(addr, "demo", &key).await;
    // Metered (the default), a bid is taken without an answer.
    send(&mut a, r#"{"type":"bid","v":1,"bits":8000}"#).await;
    sync(&mut a).await;
    assert_eq!(state.metrics.vod_bids(), 1);
    send(&mut a, r#"{"type":"slow_source","v":1,"peer":3}"#).await;
    match recv(&mut a).await {
        ServerMsg::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::BadMessage);
            assert!(message.contains("live streams"), "{message}");
        }
        other => panic!("expected an error, got {other:?}"),
    }
    sync(&mut a).await;
    send(
        &mut a,
        &format!(r#"{{"type":"join_vod","v":1,"asset":"demo","key":"{key}"}}"#),
    )
    .await;
    assert_eq!(error_code(&mut a).await, ErrorCode::NotJoined);
    sync(&mut a).await;
    // Offences add up as for any bad message, and close the connection.
    for _ in 0..MAX_OFFENCES_IN_A_ROW {
        send(&mut a, r#"{"type":"join","v":1,"stream":"demo"}"#).await;
    }
    assert_eq!(error_code(&mut a).await, ErrorCode::NotJoined);
    let (code, reason) = closed(&mut a).await.expect("a close frame");
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Policy, "too many bad messages")
    );
    assert_eq!(state.metrics.rejects("bad_message"), 1);
    eventually(|| state.hub.vod_rooms() == 0).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn reports_from_two_neighbours_drop_the_accused() {
    let (addr, state, dir) = serve("report", Config::default()).await;
    let key = key_of(&state, "demo");
    let Seated {
        ws: mut a,
        peer: a_id,
        grant_token,
        ..
    } = seated(addr, "demo", &key).await;
    let a_token = grant_token.expect("metered by default");
    let (mut b, _, _) = joined(addr, "demo", &key).await;
    let (mut c, _, _) = joined(addr, "demo", &key).await;
    let report = format!(r#"{{"type":"report","v":1,"peer":{a_id},"reason":"bad signature"}}"#);
    send(&mut b, &report).await;
    assert_eq!(removed(&mut b).await, a_id, "the reporter is parted");
    sync(&mut b).await;
    assert_eq!(state.hub.vod_peers(&key), 3, "one report is not enough");
    send(&mut c, &report).await;
    assert_eq!(removed(&mut c).await, a_id);
    let (code, reason) = closed(&mut a).await.expect("a close frame");
    assert_eq!(
        (code, reason.as_str()),
        (CloseCode::Policy, "reported for bad blocks")
    );
    assert_eq!(state.metrics.dropped_peers("reported"), 1);
    assert_eq!(state.hub.vod_peers(&key), 2);
    // The dropped viewer's runs are no longer metered to it.
    forgotten(&app(state.clone()), &a_token).await;
    assert_eq!(state.hub.vod_viewers(), 2);
    assert!(state
        .metrics
        .render()
        .contains("clubcast_reports_total 2\n"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_replaced_assets_viewers_keep_their_room_and_new_ones_get_the_new() {
    let (addr, state, dir) = serve("replace", Config::default()).await;
    let body = || futures_util::stream::iter([Ok::<_, VodError>(Bytes::from_static(CLIP))]);
    state
        .vod
        .store("clip", false, body())
        .await
        .expect("stored");
    let old = key_of(&state, "clip");
    let (mut a, _, _) = joined(addr, "clip", &old).await;
    state
        .vod
        .store("clip", true, body())
        .await
        .expect("replaced");
    let new = key_of(&state, "clip");
    assert_ne!(old, new);
    // The old key is no longer the asset's: no one new joins its room.
    let mut late = connect(addr).await;
    let refused = join_vod(&mut late, "clip", &old).await;
    assert!(
        matches!(
            refused,
            ServerMsg::Error {
                code: ErrorCode::UnknownAsset,
                ..
            }
        ),
        "{refused:?}"
    );
    assert_eq!(
        closed(&mut late).await.map(|c| c.0),
        Some(CloseCode::Policy)
    );
    let (_b, _, nb) = joined(addr, "clip", &new).await;
    assert!(nb.is_empty(), "A watches the old upload: {nb:?}");
    sync(&mut a).await;
    assert_eq!(state.hub.vod_peers(&old), 1);
    assert_eq!(state.hub.vod_peers(&new), 1);
    assert_eq!(state.hub.vod_rooms(), 2);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_unmetered_server_gives_no_token_and_refuses_bids() {
    let cfg = Config {
        vod_budget_kbps: 0,
        ..Config::default()
    };
    let (addr, state, dir) = serve("unmetered", cfg).await;
    let key = key_of(&state, "demo");
    let mut a = seated(addr, "demo", &key).await;
    assert_eq!((a.grant_token.as_deref(), a.bid_interval_ms), (None, 0));
    send(&mut a.ws, r#"{"type":"bid","v":1,"bits":8000}"#).await;
    match recv(&mut a.ws).await {
        ServerMsg::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::BadMessage);
            assert!(
                message.contains("does not meter on-demand runs"),
                "{message}"
            );
        }
        other => panic!("expected an error, got {other:?}"),
    }
    sync(&mut a.ws).await;
    state.hub.run_bid_interval(std::time::Instant::now());
    sync(&mut a.ws).await;
    assert_eq!(state.metrics.vod_bids(), 0);
    assert_eq!(state.metrics.vod_grants(), 0);
    assert_eq!(state.metrics.rejects("bad_message"), 1);
    // Runs are served as ever, with or without a header.
    let router = app(state.clone());
    let r = http(&router, "GET", "/vod/demo/blocks?from=0&count=8", None).await;
    assert_eq!((r.status, r.blocks()), (StatusCode::OK, 8));
    let r = http(&router, "GET", "/vod/demo/blocks?from=0&count=8", Some("x")).await;
    assert_eq!((r.status, r.blocks()), (StatusCode::OK, 8));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_metered_viewers_bid_is_answered_by_a_grant_within_an_interval_or_two() {
    let cfg = Config {
        bid_interval_ms: 150,
        ..Config::default()
    };
    let unit = cfg.block_unit_bits();
    let (addr, state, dir) = serve("grant", cfg).await;
    let ticker = state.hub.spawn_bid_ticker();
    let key = key_of(&state, "demo");
    let mut a = seated(addr, "demo", &key).await;
    let token = a.grant_token.clone().expect("a grant token");
    assert_eq!(token.len(), 32, "16 bytes in hex: {token}");
    assert_eq!(a.bid_interval_ms, 150);
    let mut b = seated(addr, "demo", &key).await;
    assert_ne!(b.grant_token, a.grant_token);
    // Ten blocks' worth, and a bit more: granted in whole blocks.
    send(
        &mut a.ws,
        &format!(
            r#"{{"type":"bid","v":1,"bits":{},"late":0,"up":0}}"#,
            10 * unit + 1
        ),
    )
    .await;
    // recv waits up to 5 s a message: dozens of intervals.
    assert_eq!(grant(&mut a.ws).await, (11 * unit, 150));
    // The grant is spendable with the token.
    let router = app(state.clone());
    let r = http(
        &router,
        "GET",
        "/vod/demo/blocks?from=0&count=8",
        Some(&token),
    )
    .await;
    assert_eq!((r.status, r.blocks()), (StatusCode::OK, 8));
    // B did not bid: no grant comes to it.
    sync(&mut b.ws).await;
    ticker.abort();
    assert_eq!(state.metrics.vod_bids(), 1);
    assert!(state.metrics.vod_grants() >= 1);
    assert!(state.metrics.vod_granted_bits() >= 11 * unit);
    // Apart from live gap fill's.
    let text = state.metrics.render();
    assert!(text.contains("clubcast_bids_total 0\n"), "{text}");
    assert!(text.contains("clubcast_grants_total 0\n"), "{text}");
    assert!(text.contains("clubcast_vod_bids_total 1\n"), "{text}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_run_past_the_grant_is_cut_then_refused_and_a_gone_viewers_token_is_unknown() {
    // Ten blocks an interval: eight for bids, two anonymous.
    let cfg = common::metered(10);
    let unit = cfg.block_unit_bits();
    let (addr, state, dir) = serve("cut", cfg).await;
    let ledger = state.vod_grants.clone().expect("metered");
    let router = app(state.clone());
    let key = key_of(&state, "demo");
    let mut a = seated(addr, "demo", &key).await;
    let token = a.grant_token.clone().expect("a grant token");
    assert_eq!(a.bid_interval_ms, 1000);

    // No grant yet: a run with the token draws on the bid budget nobody was
    // granted, whole.
    let first = "/vod/demo/blocks?from=0&count=4";
    let r = http(&router, "GET", first, Some(&token)).await;
    assert_eq!((r.status, r.blocks()), (StatusCode::OK, 4));
    assert_eq!(r.header("cache-control"), "no-cache");
    let first_tag = r.header("etag").to_owned();

    // A bids three blocks; the interval ends and its grant arrives.
    send(
        &mut a.ws,
        &format!(r#"{{"type":"bid","v":1,"bits":{}}}"#, 3 * unit),
    )
    .await;
    sync(&mut a.ws).await;
    state.hub.run_bid_interval(std::time::Instant::now());
    assert_eq!(grant(&mut a.ws).await, (3 * unit, 1000));
    assert_eq!(ledger.balance(a.peer), 3 * unit);

    // A run longer than the grant and the spare budget is cut, and says so.
    let count = 64;
    let uri = format!("/vod/demo/blocks?from=0&count={count}");
    let full_tag = http(&router, "HEAD", &uri, None).await;
    let full_tag = full_tag.header("etag").to_owned();
    let r = http(&router, "GET", &uri, Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.code());
    let n = r.blocks();
    // Its three blocks, then what the five spare ones cover.
    assert!((3..count).contains(&n), "{n} blocks");
    assert!(
        r.body.len() as u64 * 8 <= 8 * unit + 1000,
        "within the bid budget"
    );
    assert_eq!(r.header("cache-control"), "no-store");
    let cut = http(
        &router,
        "HEAD",
        &format!("/vod/demo/blocks?from=0&count={n}"),
        None,
    )
    .await;
    assert_eq!(r.header("etag"), cut.header("etag"), "the shorter run's");
    assert_ne!(r.header("etag"), full_tag);
    let blocks = Block::decode_run(r.body.clone(), count as usize).expect("decodes");
    let seqs: Vec<u64> = blocks.iter().map(|b| b.header.seq).collect();
    assert_eq!(seqs, (0..n).collect::<Vec<_>>());
    assert_eq!(ledger.balance(a.peer), 0);

    // The block that did not fit is refused until the next interval.
    let next = format!("/vod/demo/blocks?from={n}&count={count}");
    let r = http(&router, "GET", &next, Some(&token)).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "over_grant");
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(state.metrics.vod_refused("over_grant"), 1);
    // HEAD and a 304 are not metered.
    let r = http(&router, "HEAD", &next, Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = http_with(
        &router,
        "GET",
        first,
        Some(&token),
        &[("if-none-match", &first_tag)],
    )
    .await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    // The anonymous share is not the bidders' to take, nor theirs to lose.
    let r = http(&router, "GET", &next, None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.code());
    // A new interval (no bid this time) frees the bid budget again.
    state.hub.run_bid_interval(std::time::Instant::now());
    let r = http(&router, "GET", &next, Some(&token)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.code());

    // Once A's socket closes, its token is unknown.
    assert_eq!(state.hub.vod_viewers(), 1);
    a.ws.close(None).await.expect("close");
    drop(a);
    forgotten(&router, &token).await;
    eventually(|| state.hub.vod_viewers() == 0).await;
    let _ = std::fs::remove_dir_all(dir);
}
