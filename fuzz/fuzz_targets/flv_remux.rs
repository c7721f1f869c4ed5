//! The RTMP remuxer (FLV tags to fragmented MP4) never panics on any tags and
//! clock, and whatever it writes is fragmented MP4 that the server's own
//! splitter takes, with fragments that only go forward in time.
#![no_main]
use libfuzzer_sys::fuzz_target;

// Both files depend only on `bytes` and `thiserror` outside their tests;
// built alone, as for `fmp4_split`.
#[path = "../../signal-server/src/ingest/flv.rs"]
#[allow(dead_code)]
mod flv;
#[path = "../../signal-server/src/ingest/fmp4.rs"]
#[allow(dead_code)]
mod fmp4;

fuzz_target!(|data: &[u8]| {
    // Tags: a kind byte (even: video, odd: audio), a 4-byte timestamp, a
    // 2-byte length, then the payload.
    let mut r = flv::Remuxer::new();
    r.set_audio_expected(data.first().is_some_and(|b| b & 0x80 != 0));
    let mut out = Vec::new();
    let mut rest = data;
    let mut failed = false;
    while rest.len() >= 7 && !failed {
        let ts = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]);
        let len = usize::from(u16::from_be_bytes([rest[5], rest[6]])).min(rest.len() - 7);
        let body = &rest[7..7 + len];
        let got = if rest[0] & 1 == 0 {
            r.video(ts, body)
        } else {
            r.audio(ts, body)
        };
        match got {
            Ok(pieces) => out.extend(pieces),
            Err(_) => failed = true,
        }
        rest = &rest[7 + len..];
    }
    if !failed {
        if let Ok(pieces) = r.finish() {
            out.extend(pieces);
        }
    }
    if out.is_empty() {
        return;
    }
    let items = fmp4::split(out.iter().map(|b| &b[..])).expect("the remuxer writes valid fMP4");
    let times: Vec<u64> = items
        .iter()
        .filter_map(|i| match i {
            fmp4::Item::Fragment(f) => Some(f.media_time),
            fmp4::Item::Init(_) => None,
        })
        .collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
});
