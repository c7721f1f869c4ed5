//! Signaling over a loopback WebSocket: join, relay, link changes, the seeder
//! handle, and what happens at every limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clubcast_protocol::block::BlockFlags;
use clubcast_protocol::club::{OVERLOAD_INTERVALS, OVERLOAD_LATE, OVER_PLAN_INTERVALS};
use clubcast_protocol::probe::{MAX_PROBE_BYTES, PROBE_CHUNK_BYTES};
use clubcast_protocol::signal::{
    ErrorCode, LinkOp, LinkRole, PeerId, ServerMsg, SignalData, MAX_SIGNAL_MESSAGE, SEEDER_PEER_ID,
};
use clubcast_server::app::AppState;
use clubcast_server::config::Config;
use clubcast_server::signal::{
    SeederEvent, MAX_OFFENCES, MAX_OFFENCES_IN_A_ROW, MAX_TRANSPORT_MESSAGE, RATE_BURST,
};
use clubcast_server::stream::{StoreConfig, Streams};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use ws_client::{connect, error_code, recv, send, Ws, WAIT};

mod common;
mod ws_client;

const STORE: StoreConfig = StoreConfig {
    store_seconds: 120,
    max_bytes: 64 << 20,
};

/// A server whose stream `demo` has blocks 0-19 (a fragment start every 5).
async fn serve(cfg: Config) -> (SocketAddr, AppState) {
    let streams = Arc::new(Streams::new(None, STORE));
    publish_demo(&streams);
    serve_streams(cfg, streams).await
}

fn publish_demo(streams: &Streams) {
    let demo = streams.get_or_create("demo").expect("valid name");
    for i in 0..20u64 {
        let flags = if i % 5 == 0 {
            BlockFlags::FRAGMENT_START
        } else {
            BlockFlags::empty()
        };
        demo.publish(flags, i, 1_000 + i * 200, Bytes::from(vec![7; 500]))
            .expect("publish");
    }
}

async fn serve_streams(cfg: Config, streams: Arc<Streams>) -> (SocketAddr, AppState) {
    let state = AppState::new(cfg, streams, CancellationToken::new());
    (common::listen(&state).await, state)
}

/// The next message that `f` accepts, skipping others (link changes etc.).
async fn recv_until(ws: &mut Ws, f: impl Fn(&ServerMsg) -> bool) -> ServerMsg {
    loop {
        let m = recv(ws).await;
        if f(&m) {
            return m;
        }
    }
}

/// Reads until the server closes; returns the close code.
async fn closed(ws: &mut Ws) -> Option<CloseCode> {
    ws_client::closed(ws).await.map(|(code, _)| code)
}

async fn join(ws: &mut Ws) -> ServerMsg {
    send(ws, r#"{"type":"join","v":1,"stream":"demo"}"#).await;
    recv(ws).await
}

fn peer_id(welcome: &ServerMsg) -> u64 {
    match welcome {
        ServerMsg::Welcome { peer_id, .. } => *peer_id,
        other => panic!("expected welcome, got {other:?}"),
    }
}

#[tokio::test]
async fn join_gets_a_welcome_with_stream_clubs_links_and_start() {
    let (addr, state) = serve(Config::default()).await;
    let stream = state.streams.get("demo").expect("exists");
    let mut ws = connect(addr).await;
    let ServerMsg::Welcome {
        peer_id,
        stream: info,
        clubs,
        links,
        live_edge,
        start_seq,
        first_seq,
        target_latency_ms,
        heartbeat_ms,
        grant_token,
        bid_interval_ms,
        ..
    } = join(&mut ws).await
    else {
        panic!("expected welcome");
    };
    assert!(peer_id > SEEDER_PEER_ID);
    assert_eq!(info.name, "demo");
    assert_eq!(info.id, stream.id);
    assert_eq!(info.init_url, format!("/streams/{}/init", stream.id));
    assert_eq!(info.blocks_url, format!("/streams/{}/blocks/", stream.id));
    assert_eq!(info.clubs, 8);
    assert_eq!(clubs.len(), 2);
    // The first peer of a swarm is a seed: the seeder pushes to it.
    assert!(links.iter().any(|l| l.peer == SEEDER_PEER_ID));
    assert_eq!(live_edge, 19);
    assert_eq!(Some(start_seq), stream.start_seq(1500));
    assert_eq!(first_seq, Some(0), "all stored");
    assert_eq!(target_latency_ms, 1500);
    assert_eq!(heartbeat_ms, 5000);
    assert_eq!(bid_interval_ms, 1000);
    assert_eq!(grant_token.len(), 32);
    assert_eq!(state.hub.peers("demo"), 1);

    send(&mut ws, r#"{"type":"heartbeat","v":1}"#).await;
    assert!(matches!(
        recv(&mut ws).await,
        ServerMsg::Pong { live_edge: 19, .. }
    ));
}

/// After a restart (a new registry on the same data dir), a stream whose
/// state was saved is there before its publisher: a joiner is welcomed at
/// the saved number, with everything before it gone and the publisher away.
#[tokio::test]
async fn a_resumed_stream_welcomes_at_its_saved_number() {
    let dir = std::env::temp_dir().join(format!("clubcast-ws-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let before = Streams::new(Some(dir.clone()), STORE);
    publish_demo(&before);
    let demo = before.get("demo").expect("published");
    // As ingest saves it before a fragment: 5 more blocks reserved.
    demo.save_progress(5, Some((20, 1000)));
    let id = demo.id.clone();
    drop((demo, before));

    let streams = Arc::new(Streams::new(Some(dir.clone()), STORE));
    assert_eq!(streams.open_saved(), 1);
    let (addr, _state) = serve_streams(Config::default(), streams).await;
    let mut ws = connect(addr).await;
    let ServerMsg::Welcome {
        stream,
        live_edge,
        start_seq,
        first_seq,
        publisher_connected,
        ..
    } = join(&mut ws).await
    else {
        panic!("expected welcome");
    };
    assert_eq!(stream.id, id, "the same key");
    assert_eq!((live_edge, start_seq, first_seq), (24, 25, Some(25)));
    assert!(!publisher_connected);
    std::fs::remove_dir_all(dir).expect("cleanup");
}

/// A stream whose publisher stays away ends: its viewers are told and
/// closed, the seeder loses its links, a join finds no stream, and a
/// publisher that comes back starts it again, numbered on.
#[tokio::test]
async fn an_ended_stream_tells_its_viewers_and_starts_again_numbered_on() {
    let dir = std::env::temp_dir().join(format!("clubcast-ws-end-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let streams = Arc::new(Streams::new(Some(dir.clone()), STORE));
    publish_demo(&streams);
    let (addr, state) = serve_streams(Config::default(), streams.clone()).await;
    let mut seeder = state.hub.attach_seeder();
    let mut a = connect(addr).await;
    let mut b = connect(addr).await;
    let (a_id, b_id) = (peer_id(&join(&mut a).await), peer_id(&join(&mut b).await));
    let seeded = seeder.links("demo");
    assert!(!seeded.is_empty());
    let id = streams.get("demo").expect("published").id.clone();

    let wait = Duration::from_secs(600);
    let now = std::time::Instant::now();
    assert!(
        streams.end_away(wait, now).is_empty(),
        "not away long enough"
    );
    assert_eq!(streams.end_away(wait, now + wait).len(), 1);
    for ws in [&mut a, &mut b] {
        let ended = recv_until(ws, |m| matches!(m, ServerMsg::Error { .. })).await;
        assert!(
            matches!(
                ended,
                ServerMsg::Error {
                    code: ErrorCode::StreamEnded,
                    ..
                }
            ),
            "{ended:?}"
        );
        assert_eq!(closed(ws).await, Some(CloseCode::Normal));
    }
    // Every link the seeder held in the stream is removed.
    let mut removed = Vec::new();
    while removed.len() < seeded.len() {
        let ev = tokio::time::timeout(WAIT, seeder.recv())
            .await
            .expect("in time")
            .expect("event");
        if let SeederEvent::Link {
            op: LinkOp::Remove,
            link,
            ..
        } = ev
        {
            assert!([a_id, b_id].contains(&link.peer));
            removed.push(link);
        }
    }
    assert_eq!(state.metrics.dropped_peers("stream_ended"), 2);
    let mut c = connect(addr).await;
    send(&mut c, r#"{"type":"join","v":1,"stream":"demo"}"#).await;
    assert_eq!(error_code(&mut c).await, ErrorCode::UnknownStream);

    // The publisher comes back: the same key, numbered on from block 20.
    let again = streams.get_or_create("demo").expect("made again");
    assert_eq!(again.id, id);
    let guard = again.claim().expect("free");
    guard
        .publish(
            BlockFlags::FRAGMENT_START,
            0,
            9_000,
            Bytes::from(vec![7; 500]),
        )
        .expect("publish");
    let mut d = connect(addr).await;
    let ServerMsg::Welcome {
        live_edge,
        publisher_connected,
        ..
    } = join(&mut d).await
    else {
        panic!("expected welcome");
    };
    assert_eq!((live_edge, publisher_connected), (20, true));
    drop(guard);
    std::fs::remove_dir_all(dir).expect("cleanup");
}

/// Every peer of a stream hears when a publisher connects and when it
/// leaves; a joiner's welcome says how it stands.
#[tokio::test]
async fn peers_hear_when_the_publisher_comes_and_goes() {
    let (addr, state) = serve(Config::default()).await;
    let stream = state.streams.get("demo").expect("exists");
    let connected = |want: bool| move |m: &ServerMsg| matches!(m, ServerMsg::Publisher { connected, .. } if *connected == want);
    let mut a = connect(addr).await;
    assert!(matches!(
        join(&mut a).await,
        ServerMsg::Welcome {
            publisher_connected: false,
            ..
        }
    ));
    let guard = stream.claim().expect("no publisher yet");
    recv_until(&mut a, connected(true)).await;
    let mut b = connect(addr).await;
    assert!(matches!(
        join(&mut b).await,
        ServerMsg::Welcome {
            publisher_connected: true,
            ..
        }
    ));
    drop(guard);
    recv_until(&mut a, connected(false)).await;
    recv_until(&mut b, connected(false)).await;
    // The connections are still up.
    send(&mut a, r#"{"type":"heartbeat","v":1}"#).await;
    recv_until(&mut a, |m| matches!(m, ServerMsg::Pong { .. })).await;
}

#[tokio::test]
async fn signal_from_a_arrives_at_b_with_from() {
    let (addr, _state) = serve(Config::default()).await;
    let mut a = connect(addr).await;
    let a_id = peer_id(&join(&mut a).await);
    let mut b = connect(addr).await;
    let wb = join(&mut b).await;
    let b_id = peer_id(&wb);
    let ServerMsg::Welcome { links, .. } = wb else {
        unreachable!()
    };
    // With one other peer in the swarm, B gets links to A (shared club or last hop).
    assert!(links.iter().any(|l| l.peer == a_id), "{links:?}");
    // A hears of B through link additions.
    recv_until(
        &mut a,
        |m| matches!(m, ServerMsg::Link { op: LinkOp::Add, link, .. } if link.peer == b_id),
    )
    .await;

    send(
        &mut b,
        &format!(
            r#"{{"type":"signal","v":1,"to":{a_id},"data":{{"kind":"offer","sdp":"v=0 b"}}}}"#
        ),
    )
    .await;
    let got = recv_until(&mut a, |m| matches!(m, ServerMsg::Signal { .. })).await;
    assert_eq!(
        got,
        ServerMsg::Signal {
            v: 1,
            from: b_id,
            data: SignalData::Offer {
                sdp: "v=0 b".into(),
                conn: None,
            }
        }
    );
    send(
        &mut a,
        &format!(r#"{{"type":"signal","v":1,"to":{b_id},"data":{{"kind":"candidate","candidate":"c","sdpMid":"0","sdpMLineIndex":0}}}}"#),
    )
    .await;
    let got = recv_until(&mut b, |m| matches!(m, ServerMsg::Signal { .. })).await;
    assert!(
        matches!(got, ServerMsg::Signal { from, data: SignalData::Candidate { .. }, .. } if from == a_id)
    );
}

#[tokio::test]
async fn a_leaving_peer_removes_its_links_from_the_others() {
    let (addr, state) = serve(Config::default()).await;
    let mut a = connect(addr).await;
    join(&mut a).await;
    let mut b = connect(addr).await;
    let b_id = peer_id(&join(&mut b).await);
    b.close(None).await.expect("close");
    drop(b);
    recv_until(
        &mut a,
        |m| matches!(m, ServerMsg::Link { op: LinkOp::Remove, link, .. } if link.peer == b_id),
    )
    .await;
    assert_eq!(state.hub.peers("demo"), 1);
}

#[tokio::test]
async fn signals_to_unlinked_or_unknown_peers_get_unknown_peer_and_stay_up() {
    let (addr, _state) = serve(Config::default()).await;
    let mut a = connect(addr).await;
    join(&mut a).await;
    for _ in 0..(MAX_OFFENCES_IN_A_ROW + 2) {
        send(
            &mut a,
            r#"{"type":"signal","v":1,"to":999999,"data":{"kind":"offer","sdp":"x"}}"#,
        )
        .await;
        assert_eq!(error_code(&mut a).await, ErrorCode::UnknownPeer);
    }
    // No seeder attached: peer 0 is unknown even though A has a link to it.
    send(
        &mut a,
        r#"{"type":"signal","v":1,"to":0,"data":{"kind":"offer","sdp":"x"}}"#,
    )
    .await;
    assert_eq!(error_code(&mut a).await, ErrorCode::UnknownPeer);
    send(&mut a, r#"{"type":"heartbeat","v":1}"#).await;
    assert!(matches!(recv(&mut a).await, ServerMsg::Pong { .. }));
}

#[tokio::test]
async fn the_seeder_handle_gets_links_and_signals_and_answers() {
    let (addr, state) = serve(Config::default()).await;
    let mut seeder = state.hub.attach_seeder();
    let mut a = connect(addr).await;
    let a_id = peer_id(&join(&mut a).await);
    let ev = tokio::time::timeout(WAIT, seeder.recv())
        .await
        .expect("in time")
        .expect("event");
    assert!(
        matches!(&ev, SeederEvent::Link { op: LinkOp::Add, link, stream } if link.peer == a_id && stream.name == "demo"),
        "{ev:?}"
    );
    assert!(seeder.links("demo").iter().any(|l| l.peer == a_id));
    send(
        &mut a,
        r#"{"type":"signal","v":1,"to":0,"data":{"kind":"offer","sdp":"browser offer","conn":3}}"#,
    )
    .await;
    let ev = loop {
        let ev = tokio::time::timeout(WAIT, seeder.recv())
            .await
            .expect("in time")
            .expect("event");
        if matches!(ev, SeederEvent::Signal { .. }) {
            break ev;
        }
    };
    assert!(
        matches!(&ev, SeederEvent::Signal { from, data: SignalData::Offer { sdp, conn: Some(3) }, .. } if *from == a_id && sdp == "browser offer")
    );
    seeder
        .signal(
            "demo",
            a_id,
            SignalData::Answer {
                sdp: "seeder answer".into(),
                conn: Some(3),
            },
        )
        .expect("a is linked with the seeder");
    let got = recv_until(&mut a, |m| matches!(m, ServerMsg::Signal { .. })).await;
    assert!(matches!(
        got,
        ServerMsg::Signal {
            from: 0,
            data: SignalData::Answer { conn: Some(3), .. },
            ..
        }
    ));
}

#[tokio::test]
async fn bad_messages_get_errors_and_the_connection_stays_up() {
    let (addr, state) = serve(Config::default()).await;
    let mut ws = connect(addr).await;
    // Offence 1: a message before join.
    send(&mut ws, r#"{"type":"heartbeat","v":1}"#).await;
    assert_eq!(error_code(&mut ws).await, ErrorCode::NotJoined);
    join(&mut ws).await;
    let good = r#"{"type":"heartbeat","v":1}"#;
    let big = format!(
        r#"{{"type":"heartbeat","v":1,"pad":"{}"}}"#,
        "x".repeat(MAX_SIGNAL_MESSAGE)
    );
    // Offences 2-4, each followed by a good message: under the limit of 5.
    let cases = [
        ("{not json", ErrorCode::BadMessage),
        (r#"{"type":"dance","v":1}"#, ErrorCode::UnknownType),
        (big.as_str(), ErrorCode::TooLarge),
    ];
    for (text, code) in cases {
        send(&mut ws, text).await;
        assert_eq!(error_code(&mut ws).await, code);
        send(&mut ws, good).await;
        assert!(matches!(recv(&mut ws).await, ServerMsg::Pong { .. }));
    }
    assert_eq!(state.metrics.rejects("too_large"), 1);
    // The fifth offence closes, good messages in between or not.
    send(&mut ws, r#"{"type":"heartbeat","v":7}"#).await;
    assert_eq!(error_code(&mut ws).await, ErrorCode::BadVersion);
    assert_eq!(closed(&mut ws).await, Some(CloseCode::Policy));
}

#[tokio::test]
async fn a_message_over_the_transport_limit_ends_the_connection() {
    let (addr, state) = serve(Config::default()).await;
    let mut ws = connect(addr).await;
    join(&mut ws).await;
    assert_eq!(state.hub.peers("demo"), 1);
    // Far over the read buffer too: the limit holds however the buffer grows.
    let huge = format!(
        r#"{{"type":"heartbeat","v":1,"pad":"{}"}}"#,
        "x".repeat(MAX_TRANSPORT_MESSAGE)
    );
    // The server may hang up before the whole message is written.
    let _ = ws.send(Message::text(huge)).await;
    assert_eq!(closed(&mut ws).await, None);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(state.hub.peers("demo"), 0);
}

#[tokio::test]
async fn three_bad_messages_in_a_row_close_the_connection() {
    let (addr, state) = serve(Config::default()).await;
    let mut ws = connect(addr).await;
    join(&mut ws).await;
    for text in [
        r#"{"type":"bid","v":1,"bits":-1}"#,
        r#"{"type":"join","v":1,"stream":"demo"}"#,
    ] {
        send(&mut ws, text).await;
        error_code(&mut ws).await;
    }
    ws.send(Message::binary(vec![1, 2, 3])).await.expect("send");
    assert_eq!(error_code(&mut ws).await, ErrorCode::BadMessage);
    assert_eq!(closed(&mut ws).await, Some(CloseCode::Policy));
    assert_eq!(state.metrics.dropped_peers("offences"), 1);
    // The closed peer left the swarm.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(state.hub.peers("demo"), 0);
}

#[tokio::test]
async fn a_flood_is_rate_limited_then_closed() {
    let (addr, state) = serve(Config::default()).await;
    let mut ws = connect(addr).await;
    join(&mut ws).await;
    let n = RATE_BURST as usize + 50;
    for _ in 0..n {
        // The server may close mid-flood; later sends may fail.
        if ws
            .send(Message::text(r#"{"type":"heartbeat","v":1}"#))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut pongs = 0;
    let mut limited = 0;
    let code = loop {
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Text(t))) => match serde_json::from_str(t.as_str()).expect("valid") {
                ServerMsg::Pong { .. } => pongs += 1,
                ServerMsg::Error {
                    code: ErrorCode::RateLimited,
                    ..
                } => limited += 1,
                other => panic!("unexpected {other:?}"),
            },
            Some(Ok(Message::Close(c))) => break c.map(|c| c.code),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break None,
        }
    };
    // The join took one token of the burst.
    assert!(pongs >= RATE_BURST as usize - 1, "{pongs} pongs");
    assert!(pongs < n, "{pongs} pongs");
    // Closed at the third refusal in a row, or the fifth overall if the bucket
    // refilled a token in between.
    assert!(
        (MAX_OFFENCES_IN_A_ROW as usize..=MAX_OFFENCES as usize).contains(&limited),
        "{limited} refusals"
    );
    assert_eq!(code, Some(CloseCode::Policy));
    assert_eq!(state.metrics.rejects("rate_limited"), limited as u64);
}

#[tokio::test]
async fn refused_joins_answer_then_close() {
    let cfg = Config {
        max_peers_per_stream: 1,
        ..Config::default()
    };
    let (addr, _state) = serve(cfg).await;
    let mut ws = connect(addr).await;
    send(&mut ws, r#"{"type":"join","v":1,"stream":"nope"}"#).await;
    assert_eq!(error_code(&mut ws).await, ErrorCode::UnknownStream);
    assert_eq!(closed(&mut ws).await, Some(CloseCode::Policy));

    let mut a = connect(addr).await;
    join(&mut a).await;
    let mut b = connect(addr).await;
    send(&mut b, r#"{"type":"join","v":1,"stream":"demo"}"#).await;
    assert_eq!(error_code(&mut b).await, ErrorCode::StreamFull);
    assert_eq!(closed(&mut b).await, Some(CloseCode::Policy));
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_three_heartbeats() {
    let cfg = Config {
        heartbeat_ms: 500,
        ..Config::default()
    };
    let (addr, state) = serve(cfg).await;
    let mut ws = connect(addr).await;
    join(&mut ws).await;
    assert_eq!(closed(&mut ws).await, Some(CloseCode::Away));
    assert_eq!(state.metrics.dropped_peers("silent"), 1);
}

#[tokio::test]
async fn metrics_count_joins_messages_and_rejects() {
    let (addr, state) = serve(Config::default()).await;
    let mut ws = connect(addr).await;
    join(&mut ws).await;
    send(&mut ws, r#"{"type":"dance","v":1}"#).await;
    error_code(&mut ws).await;
    state.metrics.set_streams(state.streams.list().len());
    let text = state.metrics.render();
    assert!(text.contains("clubcast_joins_total 1\n"), "{text}");
    assert!(text.contains("clubcast_peers{stream=\"demo\"} 1\n"));
    assert!(text.contains("clubcast_signal_messages_total{type=\"join\"} 1\n"));
    assert!(text.contains("clubcast_rejects_total{code=\"unknown_type\"} 1\n"));
    assert!(text.contains("clubcast_streams 1\n"));
}

#[tokio::test]
async fn a_report_replaces_the_reporters_link_and_is_counted() {
    let (addr, state) = serve(Config::default()).await;
    let mut a = connect(addr).await;
    let a_id = peer_id(&join(&mut a).await);
    let mut b = connect(addr).await;
    join(&mut b).await;
    send(
        &mut b,
        &format!(r#"{{"type":"report","v":1,"peer":{a_id},"reason":"bad signature"}}"#),
    )
    .await;
    recv_until(
        &mut b,
        |m| matches!(m, ServerMsg::Link { op: LinkOp::Remove, link, .. } if link.peer == a_id),
    )
    .await;
    assert!(state
        .metrics
        .render()
        .contains("clubcast_reports_total 1\n"));
    // One reporter is not enough to drop A.
    assert_eq!(state.hub.peers("demo"), 2);
}

/// Sends a heartbeat and waits for its pong: every message sent before it on
/// this socket has been handled, and none was refused.
async fn sync(ws: &mut Ws) {
    send(ws, r#"{"type":"heartbeat","v":1}"#).await;
    recv_until(ws, |m| {
        assert!(!matches!(m, ServerMsg::Error { .. }), "refused: {m:?}");
        matches!(m, ServerMsg::Pong { .. })
    })
    .await;
}

/// Joins `n` viewers, with `extra` JSON fields in their joins, then one more;
/// returns the `n` (id and socket), the last one's socket, and a viewer among
/// the `n` that is its last-hop source (the last joiner's welcome is its
/// current link set).
async fn viewer_source(addr: SocketAddr, n: usize, extra: &str) -> (Vec<(PeerId, Ws)>, Ws, PeerId) {
    let mut peers = Vec::new();
    for _ in 0..n {
        let mut ws = connect(addr).await;
        send(
            &mut ws,
            &format!(r#"{{"type":"join","v":1,"stream":"demo"{extra}}}"#),
        )
        .await;
        let id = peer_id(&recv(&mut ws).await);
        peers.push((id, ws));
    }
    let mut fresh = connect(addr).await;
    let ServerMsg::Welcome { links, .. } = join(&mut fresh).await else {
        panic!("expected a welcome");
    };
    let source = links
        .iter()
        .find(|l| matches!(l.role, LinkRole::Source { .. }) && l.peer != SEEDER_PEER_ID)
        .unwrap_or_else(|| panic!("a viewer among {n} has another viewer as a last-hop source"))
        .peer;
    (peers, fresh, source)
}

/// The socket of viewer `id`.
fn source_ws(peers: &mut [(PeerId, Ws)], id: PeerId) -> &mut Ws {
    &mut peers
        .iter_mut()
        .find(|(p, _)| *p == id)
        .expect("the source is one of ours")
        .1
}

#[tokio::test]
async fn only_an_overloaded_source_is_replaced_on_a_slow_source_report() {
    let (addr, state) = serve(Config::default()).await;
    // Viewers that state their upload: their late bids leave the plan as it is.
    let (mut peers, mut fresh, source) = viewer_source(addr, 10, STATED).await;
    let s_ws = source_ws(&mut peers, source);
    let replaced = || {
        state
            .metrics
            .render()
            .contains("clubcast_sources_replaced_total 1\n")
    };
    let report = format!(r#"{{"type":"slow_source","v":1,"peer":{source}}}"#);
    // Not overloaded: the report changes nothing.
    send(&mut fresh, &report).await;
    sync(&mut fresh).await;
    assert!(!replaced());
    // Its bids say its upload fell behind, but not for long enough yet.
    let behind = format!(r#"{{"type":"bid","v":1,"bits":0,"late":{OVERLOAD_LATE}}}"#);
    for _ in 1..OVERLOAD_INTERVALS {
        send(s_ws, &behind).await;
    }
    sync(s_ws).await;
    send(&mut fresh, &report).await;
    sync(&mut fresh).await;
    assert!(!replaced());
    // One more: it stays behind, and the report replaces it.
    send(s_ws, &behind).await;
    sync(s_ws).await;
    send(&mut fresh, &report).await;
    recv_until(&mut fresh, |m| {
        matches!(m, ServerMsg::Link { op: LinkOp::Remove, link, .. }
            if link.peer == source && matches!(link.role, LinkRole::Source { .. }))
    })
    .await;
    assert!(replaced(), "{}", state.metrics.render());
    assert!(state
        .metrics
        .render()
        .contains("clubcast_signal_messages_total{type=\"slow_source\"} 3\n"));
}

/// A relay whose bids say it sends more than the planned cap, bid after bid,
/// loses one last-hop subscriber share to a member with room (forty peers:
/// every club has members besides a subscriber's two sources).
#[tokio::test]
async fn a_relay_whose_bids_stay_over_the_upload_cap_sheds_a_share() {
    let (addr, state) = serve(Config::default()).await;
    let (mut peers, _fresh, source) = viewer_source(addr, 40, STATED).await;
    let s_ws = source_ws(&mut peers, source);
    // The test stream carries about 21 kbit/s: 1 MB in a bid interval (1 s,
    // however close the bids come) is far over the cap, and 0 bytes far
    // under it. The first bid only starts the server's clock.
    send(s_ws, &up_bid(0)).await;
    for _ in 1..OVER_PLAN_INTERVALS {
        send(s_ws, &up_bid(1_000_000)).await;
    }
    send(s_ws, &up_bid(0)).await;
    sync(s_ws).await;
    assert!(!shed_one(&state), "a bid under its plan ends the streak");
    for _ in 0..OVER_PLAN_INTERVALS {
        send(s_ws, &up_bid(1_000_000)).await;
    }
    subscriber_removed(s_ws).await;
    assert!(shed_one(&state), "{}", state.metrics.render());
    // A flood of bids over the cap sheds no more until a streak's worth of
    // bid intervals (3 s) has passed.
    for _ in 0..2 * OVER_PLAN_INTERVALS {
        send(s_ws, &up_bid(1_000_000)).await;
    }
    sync(s_ws).await;
    assert!(shed_one(&state), "still one: {}", state.metrics.render());
}

/// A relay planned below the cap (viewers stating 150 % of the bitrate)
/// cannot send more than it has: bids at 170 %, under the 190 % cap but past
/// 95 % of its plan, shed a share; bids at 120 % do not. (The margins allow
/// for the bitrate estimate moving as the store fills.)
#[tokio::test]
async fn a_relay_planned_below_the_cap_sheds_a_share_once_nearly_full() {
    let (addr, state) = serve(Config::default()).await;
    let bitrate = u64::from(state.streams.get("demo").expect("exists").bitrate_kbps());
    assert!(bitrate > 10 && bitrate < 100, "{bitrate} kbit/s");
    let stated = format!(r#","upload_kbps":{}"#, bitrate * 3 / 2);
    let (mut peers, _fresh, source) = viewer_source(addr, 40, &stated).await;
    let s_ws = source_ws(&mut peers, source);
    // Bids come closer than the interval (1 s), so each counts as one
    // interval: `pct` % of the bitrate is bitrate * 10 * pct / 8 bytes.
    let bid = |pct: u64| up_bid(bitrate * 10 * pct / 8);
    send(s_ws, &bid(0)).await;
    for _ in 0..2 * OVER_PLAN_INTERVALS {
        send(s_ws, &bid(120)).await;
    }
    sync(s_ws).await;
    assert!(
        !shed_one(&state),
        "under its plan: {}",
        state.metrics.render()
    );
    for _ in 0..OVER_PLAN_INTERVALS {
        send(s_ws, &bid(170)).await;
    }
    subscriber_removed(s_ws).await;
    assert!(shed_one(&state), "{}", state.metrics.render());
}

/// A viewer that stated no upload is planned like the strongest until a bid
/// says it falls behind ([`OVERLOAD_LATE`] late pushes); then it is planned on
/// the upload that bid measured. Here that is nothing, so it becomes a leaf
/// and its last-hop subscribers move. A viewer that stated its upload keeps
/// its plan on the same bids.
#[tokio::test]
async fn a_viewer_that_stated_no_upload_and_falls_behind_is_planned_on_what_it_sent() {
    for (extra, learns) in [("", true), (STATED, false)] {
        let (addr, state) = serve(Config::default()).await;
        let (mut peers, _fresh, source) = viewer_source(addr, 10, extra).await;
        let s_ws = source_ws(&mut peers, source);
        let learned = |n: u64| {
            state
                .metrics
                .render()
                .contains(&format!("clubcast_capacities_learned_total {n}\n"))
        };
        let behind = format!(r#"{{"type":"bid","v":1,"bits":0,"late":{OVERLOAD_LATE}}}"#);
        // The first bid only starts the server's clock: nothing is measured.
        send(s_ws, &behind).await;
        sync(s_ws).await;
        assert!(learned(0), "{}", state.metrics.render());
        // Not behind: the measured upload (none) changes nothing either.
        send(s_ws, &up_bid(0)).await;
        sync(s_ws).await;
        assert!(learned(0), "{}", state.metrics.render());
        send(s_ws, &behind).await;
        if learns {
            subscriber_removed(s_ws).await;
            assert!(learned(1), "{}", state.metrics.render());
            // Planned on nothing already: later late bids learn nothing new.
            send(s_ws, &behind).await;
            sync(s_ws).await;
            assert!(learned(1), "{}", state.metrics.render());
        } else {
            sync(s_ws).await;
            assert!(learned(0), "{}", state.metrics.render());
        }
    }
}

/// Join fields of a viewer that states more upload than the planned cap.
const STATED: &str = r#","upload_kbps":1000000"#;

/// A bid that reports `up` bytes sent since the previous one.
fn up_bid(up: u64) -> String {
    format!(r#"{{"type":"bid","v":1,"bits":0,"up":{up}}}"#)
}

/// Whether the server has shed exactly one last-hop share.
fn shed_one(state: &AppState) -> bool {
    state
        .metrics
        .render()
        .contains("clubcast_shares_shed_total 1\n")
}

/// Waits until `ws` is told to drop a subscriber share.
async fn subscriber_removed(ws: &mut Ws) {
    recv_until(ws, |m| {
        matches!(m, ServerMsg::Link { op: LinkOp::Remove, link, .. }
            if matches!(link.role, LinkRole::Subscriber { .. }))
    })
    .await;
}

#[tokio::test]
async fn a_passive_viewer_gets_no_clubs_or_links() {
    let (addr, state) = serve(Config::default()).await;
    let mut ws = connect(addr).await;
    send(
        &mut ws,
        r#"{"type":"join","v":1,"stream":"demo","p2p":false}"#,
    )
    .await;
    let ServerMsg::Welcome { clubs, links, .. } = recv(&mut ws).await else {
        panic!("expected welcome");
    };
    assert!(clubs.is_empty() && links.is_empty());
    assert_eq!(state.hub.peers("demo"), 1);
}

/// `n` viewers joined to the demo stream.
async fn joined(addr: SocketAddr, n: usize) -> Vec<Ws> {
    let mut all = Vec::new();
    for _ in 0..n {
        let mut ws = connect(addr).await;
        join(&mut ws).await;
        all.push(ws);
    }
    all
}

/// Whether a role has its holder send blocks (a leaf holds none).
fn sends(r: &LinkRole) -> bool {
    matches!(r, LinkRole::Upload { .. } | LinkRole::Subscriber { .. })
}

/// Joins the demo stream with `extra` JSON fields; returns the socket and the
/// roles of the welcome's links.
async fn join_roles(addr: SocketAddr, extra: &str) -> (Ws, Vec<LinkRole>) {
    let (ws, _, roles) = probe_then_join(addr, 0, 0, Duration::ZERO, extra).await;
    (ws, roles)
}

/// The test stream carries about 21 kbit/s: 10 kbit/s of stated upload is under
/// the bitrate, so that viewer is planned as a leaf that only receives.
#[tokio::test]
async fn a_viewer_stating_little_upload_only_receives() {
    let (addr, state) = serve(Config::default()).await;
    let bitrate = state.streams.get("demo").expect("exists").bitrate_kbps();
    assert!(bitrate > 10 && bitrate < 100, "{bitrate} kbit/s");
    let _others = joined(addr, 16).await;
    let (_leaf, leaf_roles) = join_roles(addr, r#","upload_kbps":10"#).await;
    assert!(!leaf_roles.is_empty());
    assert!(!leaf_roles.iter().any(sends), "{leaf_roles:?}");
    // The same join with upload to spare relays.
    let (_relay, relay_roles) = join_roles(addr, r#","upload_kbps":100"#).await;
    assert!(relay_roles.iter().any(sends), "{relay_roles:?}");
    // A statement that is not a kbit/s count is refused like any bad join.
    let mut bad = connect(addr).await;
    send(
        &mut bad,
        r#"{"type":"join","v":1,"stream":"demo","upload_kbps":-5}"#,
    )
    .await;
    assert_eq!(error_code(&mut bad).await, ErrorCode::BadMessage);
    assert_eq!(state.hub.peers("demo"), 18);
}

/// Sends an upload probe of `frames` binary frames of `len` bytes, `every`
/// apart, then joins with `extra` JSON fields; returns the socket, the
/// welcome's measured upload and the roles of its links.
async fn probe_then_join(
    addr: SocketAddr,
    frames: usize,
    len: usize,
    every: Duration,
    extra: &str,
) -> (Ws, Option<u32>, Vec<LinkRole>) {
    let mut ws = connect(addr).await;
    for i in 0..frames {
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        ws.send(Message::binary(vec![0u8; len]))
            .await
            .expect("send");
    }
    send(
        &mut ws,
        &format!(r#"{{"type":"join","v":1,"stream":"demo"{extra}}}"#),
    )
    .await;
    match recv(&mut ws).await {
        ServerMsg::Welcome {
            links,
            upload_probe_kbps,
            ..
        } => (
            ws,
            upload_probe_kbps,
            links.into_iter().map(|l| l.role).collect(),
        ),
        other => panic!("expected welcome, got {other:?}"),
    }
}

/// The test stream carries about 21 kbit/s. A probe of 100 bytes every 100
/// ms measures about 8 kbit/s: that viewer is planned as a leaf. One sent at
/// once is above any plan: planned at the cap, it relays.
#[tokio::test]
async fn an_upload_probe_before_the_join_plans_the_viewer_on_what_it_measured() {
    let (addr, state) = serve(Config::default()).await;
    let _others = joined(addr, 16).await;
    let (_slow, kbps, roles) = probe_then_join(addr, 8, 100, Duration::from_millis(100), "").await;
    let kbps = kbps.expect("the slow probe was timed");
    assert!((4..=12).contains(&kbps), "measured {kbps} kbit/s");
    assert!(!roles.is_empty() && !roles.iter().any(sends), "{roles:?}");
    assert_eq!(state.metrics.upload_probes("planned"), 1);
    let (_fast, kbps, roles) = probe_then_join(addr, 64, 4096, Duration::ZERO, "").await;
    assert_eq!(kbps, None, "loopback is faster than any plan");
    assert!(roles.iter().any(sends), "{roles:?}");
    assert_eq!(state.metrics.upload_probes("at_cap"), 1);
    // The same slow probe, with a stated upload (which wins over the probe),
    // or from a sender that ran dry (so it measured the sender): planned at
    // the cap (100 kbit/s is far above the stream), and so it relays.
    // Each socket stays open to the test's end, like the other viewers'.
    let mut kept = Vec::new();
    for (extra, result) in [
        (r#","upload_kbps":100"#, "unused"),
        (r#","probe_limited":true"#, "limited"),
    ] {
        let (socket, kbps, roles) =
            probe_then_join(addr, 8, 100, Duration::from_millis(100), extra).await;
        assert_eq!(kbps, None, "{extra}");
        assert!(roles.iter().any(sends), "{extra}: {roles:?}");
        assert_eq!(state.metrics.upload_probes(result), 1, "{extra}");
        kept.push(socket);
    }
    // Too few bytes to time say nothing, and plan at the cap.
    let (_tiny, kbps, _) = probe_then_join(addr, 1, 100, Duration::ZERO, "").await;
    assert_eq!(kbps, None);
    assert_eq!(state.metrics.upload_probes("nothing"), 1);
    assert_eq!(state.hub.peers("demo"), 21);
}

#[tokio::test]
async fn a_probe_past_its_bytes_or_after_the_join_is_refused() {
    let (addr, state) = serve(Config::default()).await;
    let mut ws = connect(addr).await;
    let chunk = PROBE_CHUNK_BYTES as usize;
    for _ in 0..(MAX_PROBE_BYTES as usize / chunk + 1) {
        ws.send(Message::binary(vec![0u8; chunk]))
            .await
            .expect("send");
    }
    ws.send(Message::binary(vec![0u8; chunk]))
        .await
        .expect("send");
    assert_eq!(error_code(&mut ws).await, ErrorCode::TooLarge);
    // The connection stays up and may still join; after the join a binary
    // frame is a bad message.
    assert!(matches!(join(&mut ws).await, ServerMsg::Welcome { .. }));
    ws.send(Message::binary(vec![0u8; 10])).await.expect("send");
    assert_eq!(error_code(&mut ws).await, ErrorCode::BadMessage);
    assert_eq!(state.metrics.rejects("too_large"), 1);
}

#[tokio::test]
async fn test_corruption_is_granted_only_when_the_server_allows_it() {
    for allow in [false, true] {
        let cfg = Config {
            allow_test_corruption: allow,
            ..Config::default()
        };
        let (addr, _state) = serve(cfg).await;
        let mut ws = connect(addr).await;
        send(
            &mut ws,
            r#"{"type":"join","v":1,"stream":"demo","test_corrupt":true}"#,
        )
        .await;
        let ServerMsg::Welcome { test_corrupt, .. } = recv(&mut ws).await else {
            panic!("expected a welcome")
        };
        assert_eq!(test_corrupt, allow);
    }
}
