//! RTMP ingest on a loopback port, driven by a native RTMP client
//! (`rml_rtmp`'s client session): a publish of the FLV fixture is stored as
//! signed blocks of fragmented MP4, a wrong token or another codec is refused
//! and leaves nothing, and garbage, a stalled handshake and a player do not
//! stop the server from taking the next publisher.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clubcast_server::ingest::fmp4::{self, Item};
use clubcast_server::ingest::IngestState;
use clubcast_server::metrics::Metrics;
use clubcast_server::stream::{StoreConfig, Streams};
use rml_rtmp::handshake::{Handshake, HandshakeProcessResult, PeerType};
use rml_rtmp::sessions::{
    ClientSession, ClientSessionConfig, ClientSessionEvent, ClientSessionResult,
    PublishRequestType, StreamMetadata,
};
use rml_rtmp::time::RtmpTimestamp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// `fixtures/small.flv` (see `make-fixtures.sh`): 3 s of 25-fps H.264 with
/// B-frames and a keyframe a second, and 44.1-kHz AAC.
const FIXTURE: &[u8] = include_bytes!("fixtures/small.flv");
const TOKEN: &str = "rtmp-test-token";

struct Rig {
    addr: SocketAddr,
    streams: Arc<Streams>,
    metrics: Arc<Metrics>,
    _stop: tokio_util::sync::DropGuard,
}

async fn serve() -> Rig {
    let streams = Arc::new(Streams::new(
        None,
        StoreConfig {
            store_seconds: 3600,
            max_bytes: 256 << 20,
        },
    ));
    let metrics = Arc::new(Metrics::default());
    let st = IngestState {
        streams: streams.clone(),
        publish_token: TOKEN.into(),
        block_bytes: 16 * 1024,
        metrics: metrics.clone(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    clubcast_server::rtmp::spawn(listener, st, stop.clone());
    Rig {
        addr,
        streams,
        metrics,
        _stop: stop.drop_guard(),
    }
}

/// The FLV file's tags: (type, timestamp ms, payload).
fn tags(flv: &[u8]) -> Vec<(u8, u32, Bytes)> {
    clubcast_server::ingest::flv::file_tags(flv)
        .into_iter()
        .map(|(kind, ts, body)| (kind, ts, Bytes::copy_from_slice(body)))
        .collect()
}

/// A native RTMP client on a connection.
struct Client {
    sock: TcpStream,
    session: ClientSession,
    events: Vec<ClientSessionEvent>,
}

impl Client {
    async fn connect(addr: SocketAddr, app: &str) -> Client {
        let mut sock = TcpStream::connect(addr).await.expect("connect");
        let mut hs = Handshake::new(PeerType::Client);
        let p0p1 = hs.generate_outbound_p0_and_p1().expect("p0 and p1");
        sock.write_all(&p0p1).await.expect("send p0 and p1");
        let mut buf = vec![0u8; 64 * 1024];
        let rest = loop {
            let n = sock.read(&mut buf).await.expect("handshake read");
            assert!(n > 0, "the server left in the handshake");
            match hs.process_bytes(&buf[..n]).expect("handshake") {
                HandshakeProcessResult::InProgress { response_bytes } => {
                    sock.write_all(&response_bytes)
                        .await
                        .expect("handshake write");
                }
                HandshakeProcessResult::Completed {
                    response_bytes,
                    remaining_bytes,
                } => {
                    sock.write_all(&response_bytes)
                        .await
                        .expect("handshake write");
                    break remaining_bytes;
                }
            }
        };
        let (session, first) = ClientSession::new(ClientSessionConfig::new()).expect("session");
        let mut c = Client {
            sock,
            session,
            events: Vec::new(),
        };
        c.send(first).await;
        if !rest.is_empty() {
            let r = c.session.handle_input(&rest).expect("input");
            c.send(r).await;
        }
        let r = c
            .session
            .request_connection(app.to_owned())
            .expect("connect request");
        c.send(vec![r]).await;
        assert!(
            c.until(|e| matches!(e, ClientSessionEvent::ConnectionRequestAccepted))
                .await,
            "connected to {app}: {:?}",
            c.events
        );
        c
    }

    async fn send(&mut self, results: Vec<ClientSessionResult>) {
        for r in results {
            match r {
                ClientSessionResult::OutboundResponse(p) => {
                    self.sock.write_all(&p.bytes).await.expect("send");
                }
                ClientSessionResult::RaisedEvent(e) => self.events.push(e),
                ClientSessionResult::UnhandleableMessageReceived(_) => {}
            }
        }
    }

    /// Reads until an event matches (`true`) or the server closes (`false`).
    async fn until(&mut self, ok: impl Fn(&ClientSessionEvent) -> bool) -> bool {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if self.events.iter().any(&ok) {
                return true;
            }
            let read = tokio::time::timeout(Duration::from_secs(10), self.sock.read(&mut buf))
                .await
                .expect("the server answers");
            let n = match read {
                Ok(0) | Err(_) => return false,
                Ok(n) => n,
            };
            let Ok(results) = self.session.handle_input(&buf[..n]) else {
                return false;
            };
            self.send(results).await;
        }
    }

    /// Asks to publish `key`; whether the server accepted.
    async fn publish(&mut self, key: &str) -> bool {
        let r = self
            .session
            .request_publishing(key.to_owned(), PublishRequestType::Live)
            .expect("publish request");
        self.send(vec![r]).await;
        self.until(|e| matches!(e, ClientSessionEvent::PublishRequestAccepted))
            .await
    }

    /// Sends `onMetaData`.
    async fn metadata(&mut self, m: &StreamMetadata) {
        let r = self.session.publish_metadata(m).expect("metadata");
        self.send(vec![r]).await;
    }

    /// Sends the tags and stops publishing; `false` if the server hung up.
    async fn send_tags(&mut self, tags: &[(u8, u32, Bytes)]) -> bool {
        for (kind, ts, body) in tags {
            let r = match kind {
                8 => self
                    .session
                    .publish_audio_data(body.clone(), RtmpTimestamp::new(*ts), false),
                9 => self
                    .session
                    .publish_video_data(body.clone(), RtmpTimestamp::new(*ts), false),
                _ => continue,
            };
            let ClientSessionResult::OutboundResponse(p) = r.expect("a packet") else {
                panic!("a packet to send")
            };
            if self.sock.write_all(&p.bytes).await.is_err() {
                return false;
            }
        }
        let stop = self.session.stop_publishing().expect("stop");
        self.send(stop).await;
        true
    }
}

async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_rtmp_publish_is_stored_as_fragmented_mp4_blocks() {
    let rig = serve().await;
    let mut c = Client::connect(rig.addr, "live").await;
    assert!(
        c.publish(&format!("cam?token={TOKEN}")).await,
        "{:?}",
        c.events
    );
    assert!(
        c.send_tags(&tags(FIXTURE)).await,
        "the server took every tag"
    );
    eventually("the stream is published and the publisher gone", || {
        rig.streams
            .get("cam")
            .is_some_and(|s| s.live_edge().is_some() && !s.publishing())
    })
    .await;
    let s = rig.streams.get("cam").expect("made");
    // The init segment is the remuxer's: video at 1 kHz, audio at 44.1 kHz.
    let init = s.init_segment().expect("an init segment");
    let mut parser = fmp4::Fmp4Parser::new();
    let items = parser.push(&init).expect("the init splits");
    assert!(matches!(items.as_slice(), [Item::Init(_)]));
    let scales: Vec<_> = parser
        .tracks()
        .iter()
        .map(|t| (t.timescale, t.video))
        .collect();
    assert_eq!(scales, [(1000, true), (44_100, false)]);
    // 3 s of media in 500-ms fragments, each its own run of blocks.
    assert!(
        s.bitrate_kbps() > 0 && s.next_seq() >= 6,
        "blocks stored: next {}",
        s.next_seq()
    );
    assert_eq!(rig.metrics.rejects("unauthorized"), 0);
}

/// The tracks of stream `name`'s init segment: (timescale, video).
fn init_tracks(streams: &Streams, name: &str) -> Vec<(u32, bool)> {
    let init = streams
        .get(name)
        .and_then(|s| s.init_segment())
        .expect("an init segment");
    let mut parser = fmp4::Fmp4Parser::new();
    parser.push(&init).expect("the init splits");
    parser
        .tracks()
        .iter()
        .map(|t| (t.timescale, t.video))
        .collect()
}

#[tokio::test]
async fn the_metadata_decides_the_tracks() {
    let rig = serve().await;
    let all = tags(FIXTURE);
    // Audio alone (ffmpeg -vn, internet radio): the metadata names no video.
    let mut c = Client::connect(rig.addr, "live").await;
    assert!(c.publish(&format!("radio?token={TOKEN}")).await);
    let mut m = StreamMetadata::new();
    m.audio_codec_id = Some(10);
    c.metadata(&m).await;
    let audio: Vec<_> = all.iter().filter(|t| t.0 == 8).cloned().collect();
    assert!(c.send_tags(&audio).await);
    // Both named, the audio configuration late (after the first frames): the
    // first init waits for it, since MSE cannot add a track later.
    let mut late = all.clone();
    let asc = late
        .iter()
        .position(|t| t.0 == 8 && t.2[1] == 0)
        .expect("the AudioSpecificConfig");
    let asc = late.remove(asc);
    let at = late.iter().position(|t| t.1 >= 200).expect("200 ms in");
    late.insert(at, asc);
    late.retain(|t| !(t.0 == 8 && t.2[1] == 1 && t.1 < 200));
    let mut c = Client::connect(rig.addr, "live").await;
    assert!(c.publish(&format!("late?token={TOKEN}")).await);
    m.video_codec_id = Some(7);
    c.metadata(&m).await;
    assert!(c.send_tags(&late).await);
    eventually("both are published", || {
        ["radio", "late"].iter().all(|n| {
            rig.streams
                .get(n)
                .is_some_and(|s| s.live_edge().is_some() && !s.publishing())
        })
    })
    .await;
    assert_eq!(init_tracks(&rig.streams, "radio"), [(44_100, false)]);
    assert_eq!(
        init_tracks(&rig.streams, "late"),
        [(1000, true), (44_100, false)]
    );
}

#[tokio::test]
async fn a_wrong_token_another_codec_or_a_player_is_refused_and_leaves_nothing() {
    let rig = serve().await;
    // A wrong token, then none: refused at the publish request.
    for key in ["cam?token=nope".to_owned(), "cam".to_owned()] {
        let mut c = Client::connect(rig.addr, "live").await;
        assert!(!c.publish(&key).await, "{key} refused");
    }
    assert_eq!(rig.metrics.rejects("unauthorized"), 2);
    // A bad name.
    let mut c = Client::connect(rig.addr, "live").await;
    assert!(!c.publish(&format!("../x?token={TOKEN}")).await);
    assert_eq!(rig.metrics.rejects("bad_name"), 1);
    // Sorenson H.263: accepted as a publish, ended at its first frame.
    let mut c = Client::connect(rig.addr, "live").await;
    assert!(c.publish(&format!("old?token={TOKEN}")).await);
    let h263 = vec![(9u8, 0u32, Bytes::from_static(&[0x12, 0, 0, 0])); 50];
    c.send_tags(&h263).await;
    eventually("the codec is refused", || {
        rig.metrics.rejects("unsupported_codec") == 1
    })
    .await;
    assert!(
        rig.streams.list().is_empty(),
        "no stream was made by a refused publish"
    );
    // A player is told RTMP is for publishing.
    let mut c = Client::connect(rig.addr, "live").await;
    let r = c
        .session
        .request_playback("cam".to_owned())
        .expect("play request");
    c.send(vec![r]).await;
    assert!(
        !c.until(|e| matches!(e, ClientSessionEvent::PlaybackRequestAccepted))
            .await,
        "playback refused"
    );
}

#[tokio::test]
async fn garbage_and_a_stalled_handshake_do_not_stop_the_next_publisher() {
    let rig = serve().await;
    // Not RTMP at all (an HTTP request on the wrong port).
    let mut junk = TcpStream::connect(rig.addr).await.expect("connect");
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    let mut buf = [0u8; 4096];
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match junk.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server hangs up on garbage");
    // A handshake that stops halfway holds its own connection only.
    let mut stalled = TcpStream::connect(rig.addr).await.expect("connect");
    stalled
        .write_all(&[3; 100])
        .await
        .expect("half a p0 and p1");
    // A random stream after a good handshake.
    let mut c = Client::connect(rig.addr, "live").await;
    let noise: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = c.sock.write_all(&noise).await;
    assert!(
        !c.until(|_| false).await,
        "the server hangs up on a broken chunk stream"
    );
    // The next publisher is served.
    let mut c = Client::connect(rig.addr, "live").await;
    assert!(c.publish(&format!("cam?token={TOKEN}")).await);
    assert!(c.send_tags(&tags(FIXTURE)).await);
    eventually("the stream is published", || {
        rig.streams
            .get("cam")
            .is_some_and(|s| s.live_edge().is_some())
    })
    .await;
    drop(stalled);
}
