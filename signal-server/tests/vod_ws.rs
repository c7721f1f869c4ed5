//! On-demand rooms over a loopback WebSocket: `join_vod` with the built-in
//! `demo` asset's key, neighbours met and parted, SDP/ICE relay between
//! neighbours only, reports, and the refusals.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clubcast_protocol::signal::{ErrorCode, LinkOp, Neighbour, PeerId, ServerMsg, SignalData};
use clubcast_server::app::AppState;
use clubcast_server::config::Config;
use clubcast_server::demo::CLIP;
use clubcast_server::signal::MAX_OFFENCES_IN_A_ROW;
use clubcast_server::stream::{StoreConfig, Streams};
use clubcast_server::vod::VodError;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_util::sync::CancellationToken;
use ws_client::{closed, connect, error_code, listen, recv, send, Ws};

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
    let streams = Arc::new(Streams::new(
        None,
        StoreConfig {
            store_seconds: 60,
            max_bytes: 1 << 20,
        },
    ));
    let state = AppState::new(cfg, streams, CancellationToken::new());
    // As `main` opens the library at start.
    state.open_vod();
    (listen(&state).await, state, dir)
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
    for msg in [
        r#"{"type":"bid","v":1,"bits":8000}"#,
        r#"{"type":"slow_source","v":1,"peer":3}"#,
    ] {
        send(&mut a, msg).await;
        match recv(&mut a).await {
            ServerMsg::Error { code, message, .. } => {
                assert_eq!(code, ErrorCode::BadMessage);
                assert!(message.contains("live streams"), "{message}");
            }
            other => panic!("expected an error, got {other:?}"),
        }
        sync(&mut a).await;
    }
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
    assert_eq!(state.metrics.rejects("bad_message"), 2);
    eventually(|| state.hub.vod_rooms() == 0).await;
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn reports_from_two_neighbours_drop_the_accused() {
    let (addr, state, dir) = serve("report", Config::default()).await;
    let key = key_of(&state, "demo");
    let (mut a, a_id, _) = joined(addr, "demo", &key).await;
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
