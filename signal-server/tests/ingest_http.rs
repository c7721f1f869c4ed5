//! Ingest over a real loopback socket: a committed ffmpeg-made clip becomes
//! signed blocks that verify in order, a publisher that comes back continues
//! the stream's timeline, and bad bodies get clear 4xx answers without
//! touching the streams already stored.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clubcast_protocol::block::{Block, BlockFlags, BlockVerifier};
use clubcast_server::app::AppState;
use clubcast_server::config::Config;
use clubcast_server::ingest::fmp4::{self, Fragment, Item};
use clubcast_server::store::Lookup;
use clubcast_server::stream::{StoreConfig, Streams, STALE_PUBLISHER};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const CLIP: &[u8] = include_bytes!("../assets/demo.mp4");
const TOKEN: &str = "s3cret-token";

async fn serve() -> (SocketAddr, AppState) {
    let streams = Arc::new(Streams::new(
        None,
        StoreConfig {
            store_seconds: 3600,
            max_bytes: 256 << 20,
        },
    ));
    let cfg = Config {
        publish_token: Some(TOKEN.into()),
        ..Config::default()
    };
    let state = AppState::new(cfg, streams, CancellationToken::new());
    (common::listen(&state).await, state)
}

/// Opens a chunked PUT and returns the socket, headers sent.
async fn open_put(addr: SocketAddr, name: &str, token: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "PUT /ingest/{name} HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.expect("write head");
    s
}

async fn send_chunk(s: &mut TcpStream, data: &[u8]) {
    s.write_all(format!("{:x}\r\n", data.len()).as_bytes())
        .await
        .expect("size");
    s.write_all(data).await.expect("data");
    s.write_all(b"\r\n").await.expect("crlf");
}

async fn finish(mut s: TcpStream) -> (u16, String) {
    // Writes fail once the server has answered early; that is fine.
    let _ = s.write_all(b"0\r\n\r\n").await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut out)).await;
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, text)
}

async fn put(addr: SocketAddr, name: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut s = open_put(addr, name, token).await;
    for c in body.chunks(64 * 1024) {
        send_chunk(&mut s, c).await;
    }
    finish(s).await
}

#[tokio::test]
async fn a_clip_becomes_verified_blocks_in_order() {
    let (addr, state) = serve().await;
    let (status, body) = put(addr, "cam", Some(TOKEN), CLIP).await;
    assert_eq!(status, 200, "{body}");
    let s = state.streams.get("cam").expect("created");
    assert!(s.init_segment().is_some());
    let edge = s.live_edge().expect("blocks");
    let mut starts = 0;
    for seq in 0..=edge {
        let Lookup::Found(b) = s.block(seq) else {
            panic!("block {seq} missing")
        };
        let back = Block::decode(b.encoded.clone()).expect("decodes");
        assert_eq!(back.header.seq, seq);
        if back.header.flags.contains(BlockFlags::FRAGMENT_START) {
            starts += 1;
            assert!(back.header.flags.contains(BlockFlags::KEYFRAME));
        }
        s.key.verify(back).expect("verifies under the stream key");
    }
    assert_eq!(starts, 16, "one fragment start per 1-s fragment");
}

/// A publisher whose connection went silent without closing (a network path
/// that broke) shows as away to viewers once it is stale, and holds its stream
/// only until [`STALE_PUBLISHER`]: the same
/// encoder coming back on a new connection takes it over, instead of getting
/// 409 until the idle timeout (30 s); the old request ends at once with 409
/// `replaced` (the stream's unit tests check that a replaced publisher
/// publishes nothing more).
#[tokio::test]
async fn a_publisher_that_comes_back_takes_over_its_silent_connection() {
    let (addr, state) = serve().await;
    let mut stale = open_put(addr, "cam", Some(TOKEN)).await;
    send_chunk(&mut stale, &CLIP[..200_000]).await;
    let s = loop {
        match state.streams.get("cam") {
            Some(s) if s.live_edge().is_some() => break s,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_eq!(
        put(addr, "cam", Some(TOKEN), CLIP).await.0,
        409,
        "still fresh"
    );
    assert!(s.publishing());
    tokio::time::sleep(STALE_PUBLISHER + Duration::from_millis(300)).await;
    // (The stream's unit tests check that it shows as back when it sends.)
    assert!(!s.publishing(), "a stale publisher shows as away");
    let before = s.live_edge().expect("blocks");
    let (status, body) = put(addr, "cam", Some(TOKEN), CLIP).await;
    assert_eq!(status, 200, "{body}");
    let edge = s.live_edge().expect("blocks");
    assert!(edge > before, "the new publisher published");
    // The old request was ended when the new one took over.
    let (status, body) = finish(stale).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("replaced"), "{body}");
    assert_eq!(s.live_edge(), Some(edge));
}

/// The stream's blocks `from..=to`, reassembled into fragments under `init`.
fn fragments_of(
    s: &clubcast_server::stream::Stream,
    init: &[u8],
    from: u64,
    to: u64,
) -> Vec<Fragment> {
    let mut bytes = init.to_vec();
    for seq in from..=to {
        let Lookup::Found(b) = s.block(seq) else {
            panic!("block {seq} missing")
        };
        bytes.extend_from_slice(b.block.payload());
    }
    let items = fmp4::split([&bytes[..]]).expect("the stored blocks are fragmented MP4");
    items
        .into_iter()
        .filter_map(|i| match i {
            Item::Fragment(f) => Some(f),
            Item::Init(_) => None,
        })
        .collect()
}

#[tokio::test]
async fn a_publisher_that_comes_back_continues_the_timeline() {
    const SMALL: &[u8] = include_bytes!("fixtures/small.mp4");
    let (addr, state) = serve().await;
    // The clip twice, then another encoder's clip (its own init, B-frames,
    // 0.5-s fragments and an audio tail), all as the stream `cam`.
    let mut publishes = Vec::new();
    for body in [CLIP, CLIP, SMALL] {
        let (status, text) = put(addr, "cam", Some(TOKEN), body).await;
        assert_eq!(status, 200, "{text}");
        let s = state.streams.get("cam").expect("created");
        let from = publishes.last().map_or(0, |&(_, to, _)| to + 1);
        publishes.push((from, s.live_edge().expect("blocks"), body));
    }
    let s = state.streams.get("cam").expect("created");
    let mut video_end: Option<u64> = None;
    for (i, &(from, to, body)) in publishes.iter().enumerate() {
        let init = &body[..body.windows(4).position(|w| w == b"moof").expect("moof") - 4];
        let frags = fragments_of(&s, init, from, to);
        let first = frags.first().expect("fragments");
        if let Some(end) = video_end {
            // The same timescale (15360) in both clips.
            assert_eq!(
                first.media_time, end,
                "publish {i} starts where the last one ended"
            );
        } else {
            assert_eq!(first.media_time, 0, "the first publish keeps its own times");
        }
        for w in frags.windows(2) {
            assert!(
                w[1].media_time > w[0].media_time,
                "publish {i}: times go forward"
            );
        }
        // The blocks carry the times the fragments' bytes say.
        let Lookup::Found(b) = s.block(from) else {
            panic!("block {from} missing")
        };
        assert_eq!(b.block.header().media_time, first.media_time);
        let last_video = frags
            .iter()
            .rev()
            .find_map(|f| f.duration.map(|d| f.media_time + d));
        video_end = last_video;
    }
}

#[tokio::test]
async fn bad_bodies_get_4xx_and_leave_other_streams_alone() {
    let (addr, state) = serve().await;
    assert_eq!(put(addr, "good", Some(TOKEN), CLIP).await.0, 200);
    let good = state.streams.get("good").expect("created");
    let edge = good.live_edge().expect("blocks");

    assert_eq!(put(addr, "x", None, CLIP).await.0, 401);
    assert_eq!(put(addr, "x", Some("wrong-token!"), CLIP).await.0, 401);
    let (status, body) = put(addr, "junk", Some(TOKEN), b"this is not an mp4 file at all").await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("not_mp4"), "{body}");
    assert_eq!(
        put(addr, "cut", Some(TOKEN), &CLIP[..CLIP.len() / 2])
            .await
            .0,
        400
    );
    let mut huge = vec![0xFF, 0xFF, 0xFF, 0xF0];
    huge.extend_from_slice(b"ftyp");
    assert_eq!(put(addr, "huge", Some(TOKEN), &huge).await.0, 413);
    // A body that failed before its init segment created no stream.
    for name in ["x", "junk", "huge"] {
        assert!(state.streams.get(name).is_none(), "{name} was created");
    }
    let (status, body) = put(addr, "Bad%20Name", Some(TOKEN), CLIP).await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("bad_name"), "{body}");

    // A second publisher on a live name gets 409; the first keeps going.
    let mut first = open_put(addr, "live", Some(TOKEN)).await;
    send_chunk(&mut first, &CLIP[..200_000]).await;
    let claimed = async {
        loop {
            if state
                .streams
                .get("live")
                .is_some_and(|s| s.live_edge().is_some())
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), claimed)
        .await
        .expect("first publisher started");
    assert_eq!(put(addr, "live", Some(TOKEN), CLIP).await.0, 409);
    send_chunk(&mut first, &CLIP[200_000..]).await;
    assert_eq!(finish(first).await.0, 200);

    // Nothing already stored was lost.
    assert_eq!(good.live_edge(), Some(edge));
    assert!((0..=edge).all(|s| matches!(good.block(s), Lookup::Found(_))));
    let m = state.metrics.render();
    assert!(
        m.contains("not_mp4") && m.contains("unauthorized"),
        "rejects are counted"
    );
}
