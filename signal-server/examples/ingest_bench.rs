//! Ingest CPU cost, HTTP against RTMP, on the same encoded frames.
//!
//! `just bench-ingest` encodes one clip with ffmpeg as FLV (what RTMP
//! carries) and remuxes the same frames to fragmented MP4 with ffmpeg (what
//! an HTTP publisher sends), then runs this:
//!
//! ```text
//! ingest_bench <clip.flv> <clip.mp4> <media seconds> [rounds]
//! ```
//!
//! Each round publishes the clip through the server's own code into a fresh
//! stream, one path after the other:
//! - `http`: the fMP4 in 64-KiB chunks through `Fmp4Parser`, then
//!   `chunker::publish_fragment` (cut into 4-KiB blocks, signed, stored);
//! - `rtmp`: the FLV tags through `Remuxer`, its output through the same
//!   parser and chunker;
//! - `remux only`: the FLV tags through `Remuxer` alone.
//!
//! It prints one markdown table: the best round's wall time of each path (one
//! thread, nothing else to wait for, so it is that thread's CPU time; the best
//! of several rounds drops the rounds another process slowed), and the media
//! seconds one core publishes per second.

use std::sync::Arc;
use std::time::Instant;

use clubcast_server::ingest::chunker::publish_fragment;
use clubcast_server::ingest::flv::{file_tags, Remuxer};
use clubcast_server::ingest::fmp4::{Fmp4Parser, Item};
use clubcast_server::stream::{StoreConfig, Streams};

const BLOCK_BYTES: usize = 4096;
const CHUNK: usize = 64 * 1024;

/// Publishes fMP4 `chunks` to a fresh stream; returns the blocks published.
fn publish(chunks: impl IntoIterator<Item = bytes::Bytes>) -> usize {
    let streams = Arc::new(Streams::new(
        None,
        StoreConfig {
            store_seconds: 3600,
            max_bytes: usize::MAX,
        },
    ));
    let stream = streams.get_or_create("bench").expect("a stream");
    let guard = stream.claim().expect("claimed");
    let mut parser = Fmp4Parser::new();
    let mut blocks = 0;
    for chunk in chunks {
        for item in parser.push(&chunk).expect("valid fMP4") {
            match item {
                Item::Init(init) => guard.set_init(init).expect("init"),
                Item::Fragment(frag) => {
                    blocks += publish_fragment(&guard, &frag, BLOCK_BYTES)
                        .expect("published")
                        .len();
                }
            }
        }
    }
    blocks
}

fn remux(tags: &[(u8, u32, &[u8])]) -> Vec<bytes::Bytes> {
    let mut r = Remuxer::new();
    let mut out = Vec::new();
    for &(kind, ts, body) in tags {
        let pieces = if kind == 8 {
            r.audio(ts, body)
        } else {
            r.video(ts, body)
        };
        out.extend(pieces.expect("remuxes"));
    }
    out.extend(r.finish().expect("finishes"));
    out
}

/// The best of `rounds` timings of `f`, seconds, and its last result.
fn best<T>(rounds: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut best = f64::INFINITY;
    let mut last = None;
    for _ in 0..rounds {
        let t = Instant::now();
        let r = f();
        best = best.min(t.elapsed().as_secs_f64());
        last = Some(r);
    }
    (best, last.expect("at least one round"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, flv, mp4, secs, rest @ ..] = args.as_slice() else {
        eprintln!("usage: ingest_bench <clip.flv> <clip.mp4> <media seconds> [rounds]");
        std::process::exit(2);
    };
    let rounds: usize = rest.first().map_or(5, |r| r.parse().expect("rounds"));
    let media: f64 = secs.parse().expect("media seconds");
    let flv = std::fs::read(flv).expect("the FLV clip");
    let mp4 = bytes::Bytes::from(std::fs::read(mp4).expect("the MP4 clip"));
    let tags: Vec<_> = file_tags(&flv)
        .into_iter()
        .filter(|t| t.0 == 8 || t.0 == 9)
        .collect();
    let http_chunks: Vec<bytes::Bytes> = (0..mp4.len())
        .step_by(CHUNK)
        .map(|i| mp4.slice(i..(i + CHUNK).min(mp4.len())))
        .collect();

    let (http_s, http_blocks) = best(rounds, || publish(http_chunks.iter().cloned()));
    let (rtmp_s, rtmp_blocks) = best(rounds, || publish(remux(&tags)));
    let (remux_s, pieces) = best(rounds, || remux(&tags));
    let remux_bytes: usize = pieces.iter().map(bytes::Bytes::len).sum();

    println!("| path | blocks | CPU s for {media:.0} s of media (best of {rounds}) | media s per CPU s |");
    println!("|---|---|---|---|");
    for (name, s, blocks) in [
        ("http (fMP4 → blocks)", http_s, http_blocks.to_string()),
        (
            "rtmp (FLV → fMP4 → blocks)",
            rtmp_s,
            rtmp_blocks.to_string(),
        ),
        (
            "remux only (FLV → fMP4)",
            remux_s,
            format!("({remux_bytes} bytes out)"),
        ),
    ] {
        println!("| {name} | {blocks} | {s:.4} | {:.0} |", media / s);
    }
}
