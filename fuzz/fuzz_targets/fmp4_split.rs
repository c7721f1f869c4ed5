//! The publisher's fragmented-MP4 splitter (the server's ingest) never panics,
//! gives the same items however the bytes are cut into chunks, and points
//! every offset it reports inside its fragment; and moving a fragment along
//! the timeline (`Fragment::shift`, for a publisher that comes back) either
//! leaves it as it was or is undone by the opposite shift.
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
    // The tracks, for the shift: as far as the stream parses.
    let mut parser = fmp4::Fmp4Parser::new();
    let _ = parser.push(stream);
    let tracks = parser.tracks().to_vec();
    let by = (i64::from(cut) - 128) * 40_009;
    for item in whole.into_iter().flatten() {
        if let fmp4::Item::Fragment(f) = item {
            let mut g = f.clone();
            match g.shift(by, &tracks) {
                Ok(()) => {
                    g.shift(-by, &tracks).expect("the way back is in range");
                    assert_eq!(g, f, "a shift and its opposite changed the fragment");
                }
                Err(_) => assert_eq!(g, f, "a refused shift changed the fragment"),
            }
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
