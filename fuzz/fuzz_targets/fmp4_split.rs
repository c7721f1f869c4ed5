//! The publisher's fragmented-MP4 splitter (the server's ingest) never panics,
//! gives the same items however the bytes are cut into chunks, and points
//! every offset it reports inside its fragment.
#![no_main]
use libfuzzer_sys::fuzz_target;

// The splitter is one file with no dependency on the rest of the server but
// `bytes` and `thiserror`. Building it alone keeps this target off the
// server's axum, tokio and WebRTC stacks, which `just lint` would otherwise
// compile for every CI run.
#[path = "../../signal-server/src/ingest/fmp4.rs"]
#[allow(dead_code)]
mod fmp4;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the chunk size; the rest is the stream.
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let whole = fmp4::split([stream]);
    let chunked = fmp4::split(stream.chunks(usize::from(cut) + 1));
    assert_eq!(whole, chunked, "the chunking changed the result");
    for item in whole.into_iter().flatten() {
        if let fmp4::Item::Fragment(f) = item {
            for t in &f.tracks {
                let width = if t.wide { 8 } else { 4 };
                assert!(
                    t.tfdt_offset + width <= f.bytes.len(),
                    "tfdt offset out of the fragment"
                );
            }
            if let Some(at) = f.sequence_offset {
                assert!(at + 4 <= f.bytes.len(), "mfhd offset out of the fragment");
            }
        }
    }
});
