//! The ingest router on its own, on a loopback port: publishers that behave
//! like ffmpeg (which closes its socket right after the last chunk), several
//! publishers at once, and a publisher that disappears mid-stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use clubcast_protocol::block::{Block, BlockFlags, BlockVerifier, VerifiedBlock};
use clubcast_server::ingest::fmp4::{self, Item};
use clubcast_server::ingest::{router, IngestState};
use clubcast_server::metrics::Metrics;
use clubcast_server::store::Lookup;
use clubcast_server::stream::{StoreConfig, Stream, Streams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const FIXTURE: &[u8] = include_bytes!("fixtures/small.mp4");
const TOKEN: &str = "router-test-token";

async fn serve(block_bytes: usize) -> (SocketAddr, Arc<Streams>) {
    let streams = Arc::new(Streams::new(
        None,
        StoreConfig {
            store_seconds: 3600,
            max_bytes: 256 << 20,
        },
    ));
    let app = router(IngestState {
        streams: streams.clone(),
        publish_token: TOKEN.into(),
        block_bytes,
        metrics: Arc::new(Metrics::default()),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, streams)
}

/// A chunked PUT in progress.
struct Put(TcpStream);

impl Put {
    async fn open(addr: SocketAddr, name: &str) -> Put {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let head = format!(
            "PUT /ingest/{name} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
             Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.expect("head");
        Put(s)
    }

    async fn send(&mut self, data: &[u8]) {
        for c in data.chunks(4096) {
            let mut frame = format!("{:x}\r\n", c.len()).into_bytes();
            frame.extend_from_slice(c);
            frame.extend_from_slice(b"\r\n");
            // Fails once the server has answered early; the answer tells why.
            let _ = self.0.write_all(&frame).await;
        }
    }

    /// Ends the body and reads the status.
    async fn finish(mut self) -> (u16, String) {
        let _ = self.0.write_all(b"0\r\n\r\n").await;
        answer(self.0).await
    }

    /// Ends the body and closes at once without reading, as ffmpeg does.
    async fn finish_and_hang_up(mut self) {
        self.0.write_all(b"0\r\n\r\n").await.expect("terminator");
        drop(self.0);
    }
}

async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    for _ in 0..500 {
        if ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

/// The fixture's fragments, as the splitter sees them.
fn fixture_fragments() -> Vec<fmp4::Fragment> {
    fmp4::split([FIXTURE])
        .expect("fixture is valid")
        .into_iter()
        .filter_map(|i| match i {
            Item::Fragment(f) => Some(f),
            Item::Init(_) => None,
        })
        .collect()
}

/// Every block of `s`, verified under its key, each at its sequence number.
fn verified_blocks(s: &Stream) -> Vec<VerifiedBlock> {
    let edge = s.live_edge().expect("blocks");
    (0..=edge)
        .map(|seq| {
            let Lookup::Found(b) = s.block(seq) else {
                panic!("block {seq} missing")
            };
            let v = s
                .key
                .verify(Block::decode(b.encoded.clone()).expect("decodes"))
                .expect("verifies");
            assert_eq!(v.seq(), seq);
            v
        })
        .collect()
}

/// Checks that `s` holds exactly the fixture: blocks verify in order, their
/// payloads rebuild every fragment, and FRAGMENT_START marks each start.
fn assert_holds_fixture(s: &Stream, block_bytes: usize) {
    let frags = fixture_fragments();
    let payloads = verified_blocks(s);
    assert!(payloads.iter().all(|v| v.payload().len() <= block_bytes));
    let mut i = 0;
    for f in &frags {
        let first = payloads[i].header();
        assert!(
            first.flags.contains(BlockFlags::FRAGMENT_START),
            "block {i}"
        );
        assert_eq!(first.flags.contains(BlockFlags::KEYFRAME), f.keyframe);
        let mut bytes = Vec::new();
        while bytes.len() < f.bytes.len() {
            let b = &payloads[i];
            assert_eq!(b.header().media_time, f.media_time);
            if !bytes.is_empty() {
                assert!(!b.header().flags.contains(BlockFlags::FRAGMENT_START));
            }
            bytes.extend_from_slice(b.payload());
            i += 1;
        }
        assert_eq!(bytes, f.bytes.to_vec(), "a block spans two fragments");
    }
    assert_eq!(i, payloads.len(), "no blocks beyond the fixture");
}

#[tokio::test]
async fn a_publisher_that_hangs_up_after_the_last_chunk_loses_nothing() {
    let (addr, streams) = serve(4096).await;
    let mut p = Put::open(addr, "cam").await;
    p.send(FIXTURE).await;
    p.finish_and_hang_up().await;
    let count: usize = fixture_fragments()
        .iter()
        .map(|f| f.bytes.len().div_ceil(4096))
        .sum();
    eventually("every block", || {
        streams
            .get("cam")
            .and_then(|s| s.live_edge())
            .is_some_and(|e| e + 1 == count as u64)
    })
    .await;
    let s = streams.get("cam").expect("created");
    assert_holds_fixture(&s, 4096);
    // The claim was released: the next publisher is accepted.
    eventually("the claim to be released", || s.claim().is_ok()).await;
}

/// One-shot PUT of `body` to `name` with `auth`, returning status and answer.
async fn put(addr: SocketAddr, name: &str, auth: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let head = format!(
        "PUT /ingest/{name} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.expect("head");
    let _ = s.write_all(body).await;
    answer(s).await
}

/// Reads the whole answer: its status and its text.
async fn answer(mut s: TcpStream) -> (u16, String) {
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

fn bearer(token: &str) -> String {
    format!("Authorization: Bearer {token}\r\n")
}

/// Asserts the JSON error body carries `code`.
fn assert_code(answer: &(u16, String), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{}", answer.1);
    let body = answer.1.split("\r\n\r\n").nth(1).unwrap_or_default();
    let json: serde_json::Value = serde_json::from_str(body).expect("a JSON error body");
    assert_eq!(json["error"]["code"], code, "{body}");
    assert!(json["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
}

#[tokio::test]
async fn bad_publishers_are_refused_while_a_good_one_streams_on() {
    let (addr, streams) = serve(16 * 1024).await;
    let moof_at = FIXTURE
        .windows(4)
        .position(|w| w == b"moof")
        .expect("has moof")
        - 4;
    let half = FIXTURE.len() / 2;
    let mut good = Put::open(addr, "good").await;
    good.send(&FIXTURE[..half]).await;
    eventually("the good stream's first blocks", || {
        streams.get("good").is_some_and(|s| s.live_edge().is_some())
    })
    .await;

    let ok = bearer(TOKEN);
    assert_code(&put(addr, "a", "", FIXTURE).await, 401, "unauthorized");
    assert_code(
        &put(addr, "a", &bearer("router-test-tokeN"), FIXTURE).await,
        401,
        "unauthorized",
    );
    assert_code(
        &put(addr, "a", "Authorization: Basic eDp5\r\n", FIXTURE).await,
        401,
        "unauthorized",
    );
    // An encoder that cannot set a header gives the token in the URL; a
    // header, when there is one, is what counts.
    let in_url = format!("q?token={TOKEN}");
    assert_code(
        &put(addr, "q?token=wrong", "", FIXTURE).await,
        401,
        "unauthorized",
    );
    assert_code(
        &put(addr, &in_url, &bearer("router-test-tokeN"), FIXTURE).await,
        401,
        "unauthorized",
    );
    // A query string that cannot be read gets our JSON error, not axum's text.
    assert_code(
        &put(addr, "r?token=a&token=b", &ok, FIXTURE).await,
        400,
        "bad_query",
    );
    assert_eq!(put(addr, &in_url, "", FIXTURE).await.0, 200);
    assert!(streams.get("q").is_some_and(|s| s.live_edge().is_some()));
    assert_code(&put(addr, "good", &ok, FIXTURE).await, 409, "stream_busy");
    assert_code(
        &put(addr, "a", &ok, b"<html>hello</html>").await,
        415,
        "not_mp4",
    );
    assert_code(
        &put(addr, "a", &ok, &FIXTURE[..half]).await,
        400,
        "truncated",
    );
    assert_code(
        &put(addr, "a", &ok, &FIXTURE[moof_at..]).await,
        400,
        "malformed_mp4",
    );
    assert_code(&put(addr, "a", &ok, b"").await, 400, "no_init");
    let mut huge = u32::MAX.to_be_bytes().to_vec();
    huge.extend_from_slice(b"ftyp");
    assert_code(&put(addr, "a", &ok, &huge).await, 413, "too_large");
    let mut huge_mdat = FIXTURE[..moof_at].to_vec();
    huge_mdat.extend_from_slice(&1u32.to_be_bytes());
    huge_mdat.extend_from_slice(b"mdat");
    huge_mdat.extend_from_slice(&(64u64 << 30).to_be_bytes());
    assert_code(&put(addr, "a", &ok, &huge_mdat).await, 413, "too_large");
    assert_code(&put(addr, "Not%20Ok", &ok, FIXTURE).await, 400, "bad_name");

    // The good publisher never noticed.
    good.send(&FIXTURE[half..]).await;
    let (status, answer) = good.finish().await;
    assert_eq!(status, 200, "{answer}");
    let s = streams.get("good").expect("created");
    assert_holds_fixture(&s, 16 * 1024);
    assert_eq!(s.init_segment().as_deref(), Some(&FIXTURE[..moof_at]));
    // A refused publisher's stream keeps what it stored before the error.
    let a = streams.get("a").expect("created by the truncated upload");
    assert!(a.live_edge().is_some());
    assert!(a.claim().is_ok(), "every refused publisher freed the name");
}

#[tokio::test]
async fn a_publisher_that_vanishes_mid_fragment_frees_its_name() {
    let (addr, streams) = serve(16 * 1024).await;
    let mut p = Put::open(addr, "cam").await;
    p.send(&FIXTURE[..FIXTURE.len() / 2]).await;
    eventually("blocks", || {
        streams.get("cam").is_some_and(|s| s.live_edge().is_some())
    })
    .await;
    drop(p);
    let s = streams.get("cam").expect("created");
    eventually("the claim to be released", || s.claim().is_ok()).await;
    let edge = s.live_edge().expect("blocks stay");
    assert!(matches!(s.block(edge), Lookup::Found(_)));
    // And the next publisher carries on from there.
    let mut next = Put::open(addr, "cam").await;
    next.send(FIXTURE).await;
    assert_eq!(next.finish().await.0, 200);
    assert!(s.live_edge().expect("blocks") > edge);
}

/// The publish command from the `ingest` docs, minus `-re`, if ffmpeg is here.
#[tokio::test]
async fn ffmpeg_publishes_with_the_documented_command() {
    if std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_err()
    {
        eprintln!("ffmpeg not installed; skipping");
        return;
    }
    let (addr, streams) = serve(16 * 1024).await;
    let dir = std::env::temp_dir().join(format!("clubcast-ingest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input = dir.join("in.mp4");
    std::fs::write(&input, FIXTURE).expect("write fixture");
    let status = tokio::process::Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-i"])
        .arg(&input)
        .args([
            "-c:v",
            "libx264",
            "-g",
            "30",
            "-c:a",
            "aac",
            "-f",
            "mp4",
            "-movflags",
            "frag_keyframe+empty_moov+default_base_moof",
            "-frag_duration",
            "1000000",
            "-method",
            "PUT",
            "-headers",
        ])
        .arg(format!("Authorization: Bearer {TOKEN}\r\n"))
        .arg(format!("http://{addr}/ingest/cam"))
        .status()
        .await
        .expect("ffmpeg runs");
    std::fs::remove_dir_all(&dir).expect("cleanup");
    assert!(status.success(), "{status}");
    let s = streams.get("cam").expect("created");
    eventually("the publisher to finish", || s.claim().is_ok()).await;
    let starts = verified_blocks(&s)
        .iter()
        .filter(|v| v.header().flags.contains(BlockFlags::FRAGMENT_START))
        .count();
    // 3 s at one keyframe a second: 3 video fragments (and maybe an audio tail).
    assert!((3..=4).contains(&starts), "{starts} fragments");
}
