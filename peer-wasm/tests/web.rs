//! Browser tests for the peer glue, run in headless Chromium by
//! `cargo test -p clubcast-peer --target wasm32-unknown-unknown`.
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use clubcast_peer::fetch::{fetch_bytes, FetchError};
use clubcast_peer::mse::{MseEvent, MseSink, MIME_H264_AAC};
use clubcast_peer::rtc::{
    LinkEvent, RtcConfig, RtcError, RtcLink, MAX_BUFFERED_AMOUNT, MAX_QUEUED_BYTES,
    MAX_QUEUED_MESSAGES,
};
use clubcast_peer::timer::{self, Timer};
use wasm_bindgen::prelude::*;
use wasm_bindgen_test::*;

mod common;
use common::*;

wasm_bindgen_test_configure!(run_in_browser);

fn recorder<E: 'static>() -> (Rc<RefCell<Vec<E>>>, impl FnMut(E) + 'static) {
    let events = Rc::new(RefCell::new(Vec::new()));
    let sink = Rc::clone(&events);
    (events, move |e| sink.borrow_mut().push(e))
}

/// Relays descriptions and candidates from one link's events to the other,
/// and returns the events that are not signaling.
fn relay(events: &RefCell<Vec<LinkEvent>>, to: &RtcLink) -> Vec<LinkEvent> {
    let mut rest = Vec::new();
    for event in events.borrow_mut().drain(..) {
        match event {
            LinkEvent::LocalDescription(desc) => to.handle_remote_description(desc),
            LinkEvent::LocalCandidate(c) => to
                .handle_remote_candidate(c)
                .expect("a handful of candidates fits the bound"),
            LinkEvent::CandidatesDone | LinkEvent::State(_) => {}
            LinkEvent::Error(err) => panic!("link error: {err}"),
            other => rest.push(other),
        }
    }
    rest
}

fn numbered(seq: u32, len: usize) -> Vec<u8> {
    let mut message = vec![(seq % 251) as u8; len];
    message[..4].copy_from_slice(&seq.to_be_bytes());
    message
}

#[wasm_bindgen_test]
async fn data_channel_carries_binary_and_bounds_its_queue() {
    let (a_events, a_handler) = recorder();
    let (b_events, b_handler) = recorder();
    let config = RtcConfig::default();
    let a = RtcLink::offerer(&config, a_handler).expect("offerer");
    let b = RtcLink::answerer(&config, b_handler).expect("answerer");

    let mut a_got = Vec::new();
    let mut b_got = Vec::new();
    for _ in 0..1000 {
        a_got.extend(relay(&a_events, &b));
        b_got.extend(relay(&b_events, &a));
        if a.is_open() && b.is_open() {
            break;
        }
        sleep(10).await;
    }
    assert!(a.is_open() && b.is_open(), "channel did not open in 10 s");

    // Both directions carry binary messages.
    b.try_send(b"pong".to_vec()).expect("small message");
    let block_len = 16 * 1024;
    let mut sent = 0u32;
    let full = loop {
        match a.try_send(numbered(sent, block_len)) {
            Ok(()) => sent += 1,
            Err(err) => break err,
        }
        assert!(sent < 10_000, "queue never reported Full");
    };
    assert_eq!(full, RtcError::Full);
    assert!(a.queued_messages() <= MAX_QUEUED_MESSAGES);
    assert!(a.queued_bytes() <= MAX_QUEUED_BYTES);
    let bound = (MAX_BUFFERED_AMOUNT as usize + MAX_QUEUED_BYTES) / block_len + 1;
    assert!(sent as usize <= bound, "{sent} accepted, bound {bound}");
    // Still full: refusing does not grow the queue.
    let queued = a.queued_messages();
    assert_eq!(a.try_send(numbered(sent, block_len)), Err(RtcError::Full));
    assert_eq!(a.queued_messages(), queued);

    // Everything accepted arrives, in order, and the sender hears Writable.
    let mut received = Vec::new();
    let mut writable = false;
    for _ in 0..3000 {
        for event in relay(&a_events, &b) {
            writable |= event == LinkEvent::Writable;
            a_got.push(event);
        }
        for event in relay(&b_events, &a) {
            match event {
                LinkEvent::Message(m) => received.push(m),
                other => b_got.push(other),
            }
        }
        if received.len() == sent as usize && writable {
            break;
        }
        sleep(10).await;
    }
    assert_eq!(received.len(), sent as usize, "not every message arrived");
    for (i, message) in received.iter().enumerate() {
        assert_eq!(
            message,
            &numbered(i as u32, block_len),
            "message {i} differs"
        );
    }
    assert!(writable, "no Writable after the queue drained");
    assert!(a_got.contains(&LinkEvent::Message(b"pong".to_vec())));
    assert_eq!(a.queued_messages(), 0);

    drop(b);
    drop(a);
}

#[wasm_bindgen_test]
async fn mse_plays_appended_fragments() {
    let video = video();

    let (events, handler) = recorder();
    let sink = MseSink::attach(&video, MIME_H264_AAC, handler).expect("H.264 + AAC supported");
    let (init, fragments) = segments(FIXTURE);
    assert_eq!(fragments.len(), 2, "fixture has two 1-s fragments");
    sink.append(init).expect("queue has room");
    for fragment in fragments {
        sink.append(fragment).expect("queue has room");
    }
    for _ in 0..500 {
        if sink.is_idle() && sink.buffered_end().is_some() {
            break;
        }
        sleep(10).await;
    }
    let events = events.borrow().clone();
    assert!(
        !events.iter().any(|e| matches!(e, MseEvent::Error(_))),
        "{events:?}"
    );
    assert!(events.contains(&MseEvent::Open));
    assert!(sink.is_idle(), "appends did not finish");
    let buffered = sink.buffered();
    let (start, end) = (buffered[0].0, sink.buffered_end().expect("buffered"));
    assert!(end - start > 0.5, "buffered {buffered:?}");
    assert_eq!(sink.queued_bytes(), 0);

    drop(sink);
    video.remove();
}

#[wasm_bindgen_test]
async fn timer_fires_once_and_cancel_stops_it() {
    let fired = Rc::new(RefCell::new(0));
    let mut kept = Timer::new();
    let count = Rc::clone(&fired);
    kept.set(Duration::from_millis(5), move || *count.borrow_mut() += 1)
        .expect("set");
    let mut cancelled = Timer::new();
    let count = Rc::clone(&fired);
    cancelled
        .set(Duration::from_millis(5), move || *count.borrow_mut() += 100)
        .expect("set");
    assert!(cancelled.is_pending());
    cancelled.cancel();
    assert!(!cancelled.is_pending());

    let before = timer::now();
    sleep(50).await;
    assert!(timer::now() > before);
    assert_eq!(*fired.borrow(), 1);
    assert!(!kept.is_pending());
}

#[wasm_bindgen_test]
async fn fetch_reports_missing_resource_as_status() {
    let err = fetch_bytes("/clubcast-no-such-path", &[], None)
        .await
        .expect_err("the test server has no such path");
    assert_eq!(err, FetchError::Status(404));
}

#[wasm_bindgen_test]
fn init_segment_gives_video_timescale_and_a_mime_the_browser_plays() {
    let (init, _) = segments(FIXTURE);
    let info = clubcast_peer::playout::parse_init(&init).expect("the fixture's init parses");
    assert!(info.timescale > 0);
    assert!(info.mime.contains("avc1."), "{}", info.mime);
    assert!(
        web_sys::MediaSource::is_type_supported(&info.mime),
        "Chromium refuses {}",
        info.mime
    );
    assert!(clubcast_peer::playout::parse_init(b"not an mp4").is_err());
}

#[wasm_bindgen_test]
fn playhead_maps_to_ingest_time_and_steering_stays_bounded() {
    use clubcast_peer::playout::{steer, Steer, Timeline};
    let mut tl = Timeline::new(90_000);
    tl.note_fragment(90_000, 50_000);
    tl.note_fragment(180_000, 51_000);
    assert_eq!(tl.ingest_at(1.5), Some(50_500.0));
    // Before the first fragment start (a track that starts earlier): mapped.
    assert_eq!(tl.ingest_at(0.5), Some(49_500.0));
    // Glass to glass: the 1-s fragment was captured 1 s before its ingest.
    assert_eq!(tl.capture_at(1.5), Some(49_500.0));
    for latency in [0.0, 1000.0, 1500.0, 2000.0, 3400.0] {
        match steer(latency, 1500.0, 3000.0) {
            Steer::Rate(r) => assert!((0.9..=1.1).contains(&r), "rate {r}"),
            Steer::Jump(_) => panic!("no jump within 2 s of the target"),
        }
    }
    assert!(matches!(steer(9000.0, 1500.0, 20_000.0), Steer::Jump(_)));
}

#[wasm_bindgen_test]
fn player_rejects_bad_options_and_destroys_idempotently() {
    let document = web_sys::window()
        .and_then(|w| w.document())
        .expect("a test page has a document");
    let video: web_sys::HtmlMediaElement = document
        .create_element("video")
        .expect("video element")
        .dyn_into()
        .expect("a video is a media element");
    assert!(clubcast_peer::WasmPlayer::new(video.clone(), "not json").is_err());
    assert!(clubcast_peer::WasmPlayer::new(video.clone(), "{}").is_err());
    // Nothing listens on port 9: the socket fails, the player stays usable.
    let player = clubcast_peer::WasmPlayer::new(
        video,
        r#"{"server":"http://127.0.0.1:9","stream":"demo","future_field":1}"#,
    )
    .expect("options parse");
    let stats = player.stats();
    assert!(js_sys::Reflect::has(&stats, &"startup_ms".into()).expect("an object"));
    player.destroy();
    player.destroy();
    let _ = player.stats();
}
