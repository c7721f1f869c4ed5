//! The built-in demo source: an embedded clip looped in real time as a live
//! stream, so a new user sees video with no encoder installed.
//!
//! `assets/demo.mp4` (made by `assets/make-demo.sh`) is a 16-s test pattern with
//! a running clock, H.264 + AAC in 1-s fragments. Each fragment is published at
//! its real-time moment. On every loop each track's `tfdt` is moved forward by
//! the clip's video duration (converted to the track's timescale), so decode
//! times never jump back and audio stays locked to video; `mfhd` sequence
//! numbers keep increasing too.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ingest::chunker::publish_fragment;
use crate::ingest::fmp4::{Fmp4Error, Fmp4Parser, Fragment, Item, Track};
use crate::stream::Streams;

/// The embedded clip.
pub const CLIP: &[u8] = include_bytes!("../assets/demo.mp4");

/// The clip, split once.
#[derive(Debug, Clone)]
pub struct Clip {
    /// Init segment.
    pub init: Bytes,
    /// Fragments in order.
    pub fragments: Vec<Fragment>,
    /// Tracks.
    pub tracks: Vec<Track>,
    /// Video duration, in seconds × 1e6.
    pub duration_us: u64,
}

impl Clip {
    /// Splits a fragmented MP4 clip.
    pub fn parse(data: &[u8]) -> Result<Clip, Fmp4Error> {
        let mut p = Fmp4Parser::new();
        let items = p.push(data)?;
        let mut init = None;
        let mut fragments = Vec::new();
        for it in items {
            match it {
                Item::Init(b) => init = Some(b),
                Item::Fragment(f) => fragments.push(f),
            }
        }
        let init = init.ok_or(Fmp4Error::Malformed("clip has no init segment"))?;
        let tracks = p.tracks().to_vec();
        let reference = tracks.iter().find(|t| t.video).or(tracks.first()).copied();
        let Some(reference) = reference else {
            return Err(Fmp4Error::Malformed("clip has no tracks"));
        };
        let end = fragments
            .iter()
            .flat_map(|f| f.tracks.iter())
            .filter(|t| t.track_id == reference.id)
            .map(|t| t.base + t.duration)
            .max()
            .ok_or(Fmp4Error::Malformed("clip has no fragments"))?;
        let duration_us = end * 1_000_000 / u64::from(reference.timescale);
        Ok(Clip {
            init,
            fragments,
            tracks,
            duration_us,
        })
    }

    /// Fragment `i` of loop `lap`, with decode times moved forward by `lap`
    /// clip durations.
    pub fn fragment(&self, lap: u64, i: usize) -> Fragment {
        let f = &self.fragments[i];
        let mut bytes = BytesMut::from(&f.bytes[..]);
        let mut tracks = f.tracks.clone();
        for t in &mut tracks {
            let scale = self
                .tracks
                .iter()
                .find(|tr| tr.id == t.track_id)
                .map_or(1, |tr| u64::from(tr.timescale));
            let shift = lap * self.duration_us * scale / 1_000_000;
            t.base += shift;
            let at = t.tfdt_offset;
            if t.wide {
                bytes[at..at + 8].copy_from_slice(&t.base.to_be_bytes());
            } else {
                // A 32-bit tfdt wraps after ~1 day at 48 kHz; the clip uses v1.
                bytes[at..at + 4].copy_from_slice(&(t.base as u32).to_be_bytes());
            }
        }
        if let Some(pos) = find_mfhd(&bytes) {
            let seq = (lap * self.fragments.len() as u64 + i as u64 + 1) as u32;
            bytes[pos..pos + 4].copy_from_slice(&seq.to_be_bytes());
        }
        let video = self.tracks.iter().find(|t| t.video).map(|t| t.id);
        let media_time = tracks
            .iter()
            .find(|t| Some(t.track_id) == video)
            .or(tracks.first())
            .map_or(0, |t| t.base);
        Fragment {
            bytes: bytes.freeze(),
            media_time,
            tracks,
            ..f.clone()
        }
    }

    /// Start of fragment `i` within the clip, µs.
    fn offset_us(&self, i: usize) -> u64 {
        let video = self.tracks.iter().find(|t| t.video).or(self.tracks.first());
        let Some(v) = video else { return 0 };
        self.fragments[i]
            .tracks
            .iter()
            .find(|t| t.track_id == v.id)
            .map_or(0, |t| t.base * 1_000_000 / u64::from(v.timescale))
    }
}

/// Offset of the `mfhd` sequence number in a fragment (after an optional styp).
fn find_mfhd(b: &[u8]) -> Option<usize> {
    let pos = b.windows(4).take(256).position(|w| w == b"mfhd")?;
    let at = pos + 4 + 4;
    (at + 4 <= b.len()).then_some(at)
}

/// Loops the embedded clip as stream `name` until `shutdown`.
pub fn spawn(
    streams: Arc<Streams>,
    name: &str,
    block_bytes: usize,
    shutdown: CancellationToken,
) -> JoinHandle<()> {
    let name = name.to_owned();
    tokio::spawn(async move {
        if let Err(e) = run(streams, &name, block_bytes, shutdown).await {
            tracing::error!(stream = %name, "demo source stopped: {e}");
        }
    })
}

async fn run(
    streams: Arc<Streams>,
    name: &str,
    block_bytes: usize,
    shutdown: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let clip = Clip::parse(CLIP)?;
    let stream = streams.get_or_create(name)?;
    let guard = stream.claim()?;
    guard.stream().set_init(clip.init.clone());
    tracing::info!(stream = %name, id = %stream.id, "demo source started");
    let start = tokio::time::Instant::now();
    for lap in 0u64.. {
        for i in 0..clip.fragments.len() {
            let due = start + Duration::from_micros(lap * clip.duration_us + clip.offset_us(i));
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(due) => {}
            }
            publish_fragment(guard.stream(), &clip.fragment(lap, i), block_bytes)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::StoreConfig;
    use clubcast_protocol::block::{Block, BlockVerifier};

    #[test]
    fn loops_never_jump_back_and_verify() {
        let clip = Clip::parse(CLIP).expect("demo clip parses");
        assert!(
            (15_900_000..16_100_000).contains(&clip.duration_us),
            "{}",
            clip.duration_us
        );
        let streams = Streams::new(
            None,
            StoreConfig {
                store_seconds: 3600,
                max_bytes: usize::MAX,
            },
        );
        let s = streams.get_or_create("demo").expect("name");
        let mut last: Vec<(u32, u64)> = Vec::new();
        let mut blocks = Vec::new();
        for lap in 0..3 {
            for i in 0..clip.fragments.len() {
                let f = clip.fragment(lap, i);
                // Re-parse the rewritten bytes: the tfdt fields moved.
                let mut p = Fmp4Parser::new();
                p.push(&CLIP[..clip.init.len()]).expect("init");
                let again = match p.push(&f.bytes).expect("fragment").pop() {
                    Some(Item::Fragment(g)) => g,
                    other => panic!("expected a fragment, got {other:?}"),
                };
                for t in &again.tracks {
                    if let Some((_, prev)) = last.iter().find(|(id, _)| *id == t.track_id) {
                        assert!(
                            t.base > *prev,
                            "track {} went back: {} after {}",
                            t.track_id,
                            t.base,
                            prev
                        );
                    }
                    last.retain(|(id, _)| *id != t.track_id);
                    last.push((t.track_id, t.base));
                }
                blocks.extend(publish_fragment(&s, &f, 16 * 1024).expect("publish"));
            }
        }
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(b.seq(), i as u64);
            let back = Block::decode(b.encoded.clone()).expect("decodes");
            s.key.verify(back).expect("verifies under the stream key");
        }
    }
}
