//! Browser tests for on-demand playback that need no server: a run of blocks
//! becomes the media of its fragments or is refused whole, options parse or
//! are refused with a code, and the media source takes the removes and the
//! appends after the end of the stream that seeks need. Run in headless
//! Chromium by `cargo test -p clubcast-peer --target wasm32-unknown-unknown
//! --test vod`; the end-to-end test is `tests/tests/vod.rs`.
#![cfg(target_arch = "wasm32")]

use std::cell::RefCell;
use std::rc::Rc;

use bytes::{Bytes, BytesMut};
use clubcast_peer::mse::{MseEvent, MseSink, MIME_H264_AAC};
use clubcast_peer::vod::{accept_run, PlayError, RunError, VodOptions, VodPlayer, DEFAULT_AHEAD_S};
use clubcast_protocol::block::{BlockError, BlockFlags, StreamSigner, VerifiedBlock};
use wasm_bindgen_test::*;

mod common;
use common::*;

wasm_bindgen_test_configure!(run_in_browser);

fn signer(n: u8) -> StreamSigner {
    StreamSigner::from_seed(&[n; 32])
}

/// Blocks 0..n of an asset: two per fragment, payload `[seq; 10 + seq]`.
fn asset(signer: &StreamSigner, n: u64) -> Vec<VerifiedBlock> {
    (0..n)
        .map(|seq| {
            let flags = if seq % 2 == 0 {
                BlockFlags::FRAGMENT_START.union(BlockFlags::KEYFRAME)
            } else {
                BlockFlags::empty()
            };
            let payload = Bytes::from(vec![seq as u8; 10 + seq as usize]);
            signer
                .sign(seq, flags, 1_700_000_000_000, seq / 2 * 90_000, payload)
                .expect("small payload")
        })
        .collect()
}

/// The wire form of `blocks`, back to back, as the server answers a run.
fn body(blocks: &[VerifiedBlock]) -> Bytes {
    let mut out = BytesMut::new();
    for b in blocks {
        b.block().encode_into(&mut out);
    }
    out.freeze()
}

#[wasm_bindgen_test]
fn a_run_is_the_blocks_asked_for_verified_in_order() {
    let s = signer(1);
    let blocks = asset(&s, 6);
    let run = accept_run(&s.key(), 2..6, body(&blocks[2..6])).expect("a good run");
    assert_eq!(run, blocks[2..6]);
    let media: Vec<u8> = run.iter().flat_map(|b| b.payload().to_vec()).collect();
    assert_eq!(media.len(), 12 + 13 + 14 + 15);
}

#[wasm_bindgen_test]
fn a_tampered_block_fails_the_whole_run() {
    let s = signer(2);
    let blocks = asset(&s, 4);
    let mut bytes = body(&blocks).to_vec();
    // The last byte of the run is the last byte of block 3's payload.
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    let err = accept_run(&s.key(), 0..4, Bytes::from(bytes)).expect_err("tampered");
    assert_eq!(err, RunError::Signature { seq: 3 });
    assert_eq!(err.code(), "bad_block");
    // Blocks that verify, but under another asset's key.
    let other = asset(&signer(3), 4);
    let err = accept_run(&s.key(), 0..4, body(&other)).expect_err("other key");
    assert_eq!(err, RunError::Signature { seq: 0 });
}

#[wasm_bindgen_test]
fn a_run_that_is_not_the_one_asked_for_is_refused() {
    let s = signer(4);
    let blocks = asset(&s, 8);
    let key = s.key();
    // Genuine blocks, from the wrong place.
    let err = accept_run(&key, 0..4, body(&blocks[2..6])).expect_err("shifted");
    assert_eq!(
        err,
        RunError::WrongRun {
            asked: 0..4,
            first: Some(2),
            count: 4
        }
    );
    // Fewer, from the start: an origin that meters runs cuts one at the
    // grant, and the blocks that came are kept.
    let cut = accept_run(&key, 0..4, body(&blocks[0..3])).expect("a cut run");
    let seqs: Vec<u64> = cut.iter().map(|b| b.seq()).collect();
    assert_eq!(seqs, vec![0, 1, 2]);
    // Fewer, not from the start.
    let err = accept_run(&key, 0..4, body(&blocks[1..3])).expect_err("a middle");
    assert!(
        matches!(
            err,
            RunError::WrongRun {
                first: Some(1),
                count: 2,
                ..
            }
        ),
        "{err:?}"
    );
    // Out of order.
    let swapped = [blocks[1].clone(), blocks[0].clone()];
    let err = accept_run(&key, 0..2, body(&swapped)).expect_err("swapped");
    assert!(matches!(err, RunError::WrongRun { .. }), "{err:?}");
    // Too many: never read past the count asked for.
    let err = accept_run(&key, 0..2, body(&blocks[0..3])).expect_err("long");
    assert!(
        matches!(
            err,
            RunError::Decode {
                source: BlockError::RunTooLong(2),
                ..
            }
        ),
        "{err:?}"
    );
    // Cut short inside a block.
    let whole = body(&blocks[0..2]);
    let err = accept_run(&key, 0..2, whole.slice(..whole.len() - 3)).expect_err("truncated");
    assert!(matches!(err, RunError::Decode { .. }), "{err:?}");
    // Nothing at all.
    let err = accept_run(&key, 0..2, Bytes::new()).expect_err("empty");
    assert!(
        matches!(err, RunError::WrongRun { count: 0, .. }),
        "{err:?}"
    );
}

#[wasm_bindgen_test]
fn options_parse_and_bad_ones_are_refused_with_a_code() {
    let o = VodOptions::parse(r#"{"vod":"demo","stream":"ignored","target_latency_ms":1500}"#)
        .expect("unknown fields are ignored");
    assert_eq!(o.name, "demo");
    assert_eq!(o.key, None);
    assert_eq!(o.ahead_s, DEFAULT_AHEAD_S);
    assert!(o.autoplay_muted);
    let key = signer(5).key();
    let json = format!(
        r#"{{"vod":"talk-2","server":"http://h:1/","key":"{}","ahead_s":4.5}}"#,
        key.to_id()
    );
    let o = VodOptions::parse(&json).expect("valid");
    assert_eq!(o.key, Some(key));
    assert_eq!(o.server.as_deref(), Some("http://h:1"));
    assert_eq!(o.ahead_s, 4.5);
    for bad in [
        r#"{}"#,
        r#"{"vod":""}"#,
        r#"{"vod":"Demo"}"#,
        r#"{"vod":"../streams"}"#,
        r#"{"vod":"demo","key":"not-a-key"}"#,
        r#"{"vod":"demo","ahead_s":0}"#,
        r#"{"vod":"demo","ahead_s":100000}"#,
        r#"{"vod":"demo","ahead_s":"lots"}"#,
        r#"not json"#,
    ] {
        let err = VodOptions::parse(bad).expect_err(bad);
        assert!(matches!(err, PlayError::BadOptions(_)), "{bad}: {err:?}");
        assert_eq!(err.code(), "bad_options");
    }
}

#[wasm_bindgen_test]
fn the_player_throws_bad_options_with_their_code() {
    let v = video();
    let thrown = VodPlayer::new(v.clone().into(), r#"{"vod":"no/such"}"#)
        .err()
        .expect("a bad name throws");
    let code = js_sys::Reflect::get(&thrown, &"code".into()).expect("has a code");
    assert_eq!(code.as_string().as_deref(), Some("bad_options"));
    v.remove();
}

async fn settle(sink: &MseSink) {
    for _ in 0..500 {
        if sink.is_idle() {
            return;
        }
        sleep(10).await;
    }
    panic!("the sink did not go idle");
}

#[wasm_bindgen_test]
async fn an_ended_source_takes_a_remove_and_appends_again_after_reopen() {
    let v = video();
    let events = Rc::new(RefCell::new(Vec::new()));
    let log = Rc::clone(&events);
    let sink = MseSink::attach(&v, MIME_H264_AAC, move |e| log.borrow_mut().push(e))
        .expect("H.264 + AAC supported");
    let (init, fragments) = segments(FIXTURE);
    assert_eq!(fragments.len(), 2, "fixture has two 1-s fragments");
    sink.append(init).expect("room");
    sink.append(fragments[0].clone()).expect("room");
    sink.end_of_stream().expect("end");
    settle(&sink).await;
    let first = sink.buffered_end().expect("buffered");
    assert!(first > 0.5 && first < 1.5, "one fragment: {first}");
    assert_eq!(
        sink.append(fragments[1].clone()),
        Err(clubcast_peer::mse::MseError::Closed),
        "an ended sink refuses appends until reopened"
    );

    // A seek back into media no longer buffered: reopen, remove, append.
    sink.reopen();
    sink.remove(0.0, 0.5).expect("room");
    sink.append(fragments[1].clone())
        .expect("room after reopen");
    settle(&sink).await;
    sink.end_of_stream().expect("end again");
    settle(&sink).await;
    let buffered = sink.buffered();
    assert!(
        buffered.first().is_some_and(|r| r.0 >= 0.4),
        "the remove took the start: {buffered:?}"
    );
    assert!(
        sink.buffered_end().is_some_and(|e| e > 1.5),
        "the second fragment went in: {buffered:?}"
    );
    assert!(
        !events
            .borrow()
            .iter()
            .any(|e| matches!(e, MseEvent::Error(_))),
        "{:?}",
        events.borrow()
    );
    drop(sink);
    v.remove();
}
