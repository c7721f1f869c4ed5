//! What the browser test files share: the MP4 fixture, a sleep on the
//! browser's timer, the fixture's segments and a video element on the page.
#![allow(dead_code)] // each test file uses its own part

use std::time::Duration;

use clubcast_peer::timer::Timer;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

/// Two seconds of H.264 baseline + AAC as fragmented MP4; see fixtures/make-fixture.sh.
pub const FIXTURE: &[u8] = include_bytes!("../fixtures/test.mp4");

/// Waits `ms` on the browser's timer.
pub async fn sleep(ms: u64) {
    let mut timer = Timer::new();
    let promise = js_sys::Promise::new(&mut |resolve, _reject| {
        timer
            .set(Duration::from_millis(ms), move || {
                resolve.call0(&JsValue::NULL).expect("resolve never throws");
            })
            .expect("setTimeout is available in the test page");
    });
    JsFuture::from(promise)
        .await
        .expect("the promise only resolves");
}

/// Splits a fragmented MP4 into the init segment (ftyp+moov) and its
/// moof+mdat fragments, skipping other top-level boxes (mfra).
pub fn segments(mp4: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut init = Vec::new();
    let mut fragments: Vec<Vec<u8>> = Vec::new();
    let mut at = 0;
    while at + 8 <= mp4.len() {
        let size = u32::from_be_bytes(mp4[at..at + 4].try_into().expect("4 bytes")) as usize;
        let boxed = &mp4[at..at + size];
        match &mp4[at + 4..at + 8] {
            b"ftyp" | b"moov" => init.extend_from_slice(boxed),
            b"moof" => fragments.push(boxed.to_vec()),
            b"mdat" => fragments
                .last_mut()
                .expect("mdat follows moof")
                .extend_from_slice(boxed),
            _ => {}
        }
        at += size;
    }
    (init, fragments)
}

/// A muted video element appended to the test page.
pub fn video() -> web_sys::HtmlVideoElement {
    let document = web_sys::window()
        .expect("window")
        .document()
        .expect("document");
    let video: web_sys::HtmlVideoElement = document
        .create_element("video")
        .expect("video element")
        .unchecked_into();
    video.set_muted(true);
    document
        .body()
        .expect("body")
        .append_child(&video)
        .expect("append video");
    video
}
