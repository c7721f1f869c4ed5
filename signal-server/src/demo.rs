//! The built-in demo source: an embedded clip looped in real time as a live
//! stream, so a new user sees video with no encoder installed.
//!
//! `assets/demo.mp4` (made by `assets/make-demo.sh`) is a 16-s test pattern with
//! a running clock, H.264 + AAC in 1-s fragments that each start with a keyframe.
//!
//! Timing: each fragment is published when a live encoder would have finished
//! it, at its end in media time, counted from the moment the source started, so
//! latency measured on the demo is what a real publisher gets.
//!
//! Looping: on lap `n` every track's `tfdt` is moved forward by `n` times that
//! track's own clip length, in its own timescale, so decode times never jump
//! back; the `mfhd` sequence number keeps counting up. Both are overwritten in
//! place in a copy of the fragment. Audio stays locked to video only if every
//! track lasts exactly as long as the video, which `make-demo.sh` arranges
//! (480 video frames and 750 AAC frames are both exactly 16 s; a test checks
//! it). For a clip where they differ, the other tracks are shifted by the video
//! length (rounded to their timescale) instead: they stay in sync with video
//! and the difference shows up as a short overlap or gap once per loop.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ingest::chunker::publish_fragment;
use crate::ingest::fmp4::{self, Fmp4Error, Fragment, Item, Track};
use crate::stream::Streams;

/// The embedded clip.
pub const CLIP: &[u8] = include_bytes!("../assets/demo.mp4");

/// A track's place in the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopTrack {
    /// The track.
    pub track: Track,
    /// Decode time of its first sample in the clip.
    pub start: u64,
    /// How far its decode times move per lap, in its timescale.
    pub lap: u64,
}

/// The clip, split once.
#[derive(Debug, Clone)]
pub struct Clip {
    /// Init segment.
    pub init: Bytes,
    /// Fragments in order.
    pub fragments: Vec<Fragment>,
    /// Every track with its per-lap shift; the first is the reference (video).
    pub tracks: Vec<LoopTrack>,
    /// Whether every track lasts exactly as long as the reference track.
    pub exact: bool,
}

impl Clip {
    /// Splits a fragmented MP4 clip and works out each track's lap length.
    pub fn parse(data: &[u8]) -> Result<Clip, Fmp4Error> {
        let mut p = fmp4::Fmp4Parser::new();
        let items = p.push(data)?;
        p.finish()?;
        let mut init = None;
        let mut fragments = Vec::new();
        for it in items {
            match it {
                Item::Init(b) => init = Some(b),
                Item::Fragment(f) => fragments.push(f),
            }
        }
        let init = init.ok_or(Fmp4Error::NoInit)?;
        if fragments.is_empty() {
            return Err(Fmp4Error::Malformed("clip has no fragments"));
        }
        if fragments
            .iter()
            .any(|f| f.sequence_offset.is_none() || f.tracks.iter().any(|t| !t.wide))
        {
            // A 32-bit tfdt would wrap after a day of looping at 48 kHz.
            return Err(Fmp4Error::Malformed("clip needs mfhd and version-1 tfdt"));
        }
        let (tracks, exact) = laps(p.tracks(), &fragments)?;
        Ok(Clip {
            init,
            fragments,
            tracks,
            exact,
        })
    }

    /// Length of one lap.
    pub fn duration(&self) -> Duration {
        // `parse` guarantees at least one track.
        self.tracks
            .first()
            .map_or(Duration::ZERO, |t| ticks(t.lap, t.track.timescale))
    }

    /// Fragment `i` of lap `lap`, with decode times moved forward by `lap` clip
    /// lengths and the sequence number counting on; `None` past the last
    /// fragment.
    pub fn fragment(&self, lap: u64, i: usize) -> Option<Fragment> {
        let f = self.fragments.get(i)?;
        let mut bytes = BytesMut::from(&f.bytes[..]);
        let mut tracks = f.tracks.clone();
        for t in &mut tracks {
            let shift = self
                .tracks
                .iter()
                .find(|l| l.track.id == t.track_id)
                .map_or(0, |l| l.lap);
            t.base = t.base.saturating_add(lap.saturating_mul(shift));
            // `parse` checked that every tfdt is 64-bit and inside the bytes.
            bytes[t.tfdt_offset..t.tfdt_offset + 8].copy_from_slice(&t.base.to_be_bytes());
        }
        let count = self.fragments.len() as u64;
        let seq = lap.saturating_mul(count).saturating_add(i as u64 + 1) as u32;
        if let Some(at) = f.sequence_offset {
            bytes[at..at + 4].copy_from_slice(&seq.to_be_bytes());
        }
        // The fragment's media time is in the reference track's timescale.
        let shift = self.tracks.first().map_or(0, |r| lap.saturating_mul(r.lap));
        let media_time = f.media_time.saturating_add(shift);
        Some(Fragment {
            bytes: bytes.freeze(),
            media_time,
            tracks,
            ..f.clone()
        })
    }

    /// When fragment `i` of lap `lap` is complete, from the start of lap 0.
    pub fn due(&self, lap: u64, i: usize) -> Duration {
        let Some(r) = self.tracks.first() else {
            return Duration::ZERO;
        };
        // A fragment without the reference track is due with the last one
        // before it that has it.
        let upto = i.min(self.fragments.len().saturating_sub(1));
        let end = self.fragments[..=upto]
            .iter()
            .rev()
            .find_map(|f| f.tracks.iter().find(|t| t.track_id == r.track.id))
            .map_or(0, |t| {
                t.base.saturating_add(t.duration).saturating_sub(r.start)
            });
        ticks(
            lap.saturating_mul(r.lap).saturating_add(end),
            r.track.timescale,
        )
    }
}

/// Each track's lap length, reference (video) track first, and whether all
/// tracks last exactly as long as the reference; if not, the others follow the
/// reference's length (see the module docs).
fn laps(tracks: &[Track], fragments: &[Fragment]) -> Result<(Vec<LoopTrack>, bool), Fmp4Error> {
    let mut order = tracks.to_vec();
    order.sort_by_key(|t| !t.video);
    let mut tracks = Vec::with_capacity(order.len());
    for track in order {
        let times = fragments
            .iter()
            .flat_map(|f| f.tracks.iter())
            .filter(|t| t.track_id == track.id);
        let start = times.clone().map(|t| t.base).min();
        let end = times.map(|t| t.base.saturating_add(t.duration)).max();
        let (Some(start), Some(end)) = (start, end) else {
            continue;
        };
        if end <= start {
            return Err(Fmp4Error::Malformed("clip track has no duration"));
        }
        tracks.push(LoopTrack {
            track,
            start,
            lap: end - start,
        });
    }
    let Some(reference) = tracks.first().copied() else {
        return Err(Fmp4Error::Malformed("clip has no tracks"));
    };
    let scale = |t: &LoopTrack| u128::from(t.track.timescale);
    let exact = tracks
        .iter()
        .all(|t| u128::from(t.lap) * scale(&reference) == u128::from(reference.lap) * scale(t));
    if !exact {
        for t in tracks.iter_mut().skip(1) {
            let lap =
                (u128::from(reference.lap) * scale(t) + scale(&reference) / 2) / scale(&reference);
            t.lap = u64::try_from(lap).unwrap_or(u64::MAX);
        }
    }
    Ok((tracks, exact))
}

/// `n` ticks of `timescale` as a duration, to the nanosecond.
fn ticks(n: u64, timescale: u32) -> Duration {
    let nanos = u128::from(n) * 1_000_000_000 / u128::from(timescale.max(1));
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Loops the embedded clip as stream `name` until `shutdown`. The task holds
/// the stream's publish claim, so an HTTP publisher on the same name gets 409.
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
    tracing::info!(stream = %name, id = %stream.id, lap = ?clip.duration(), "demo source started");
    let start = tokio::time::Instant::now();
    for lap in 0u64.. {
        for i in 0..clip.fragments.len() {
            let due = start + clip.due(lap, i);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(due) => {}
            }
            if let Some(frag) = clip.fragment(lap, i) {
                publish_fragment(guard.stream(), &frag, block_bytes)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::StoreConfig;
    use clubcast_protocol::block::{Block, BlockFlags, BlockVerifier};

    #[test]
    fn the_committed_clip_loops_without_drift() {
        let clip = Clip::parse(CLIP).expect("demo clip parses");
        assert!(clip.exact, "tracks differ in length: {:?}", clip.tracks);
        assert_eq!(clip.duration(), Duration::from_secs(16));
        assert_eq!(clip.fragments.len(), 16);
        assert!(clip.tracks[0].track.video);
        assert_eq!(clip.due(0, 0), Duration::from_secs(1));
        assert_eq!(clip.due(2, 15), Duration::from_secs(48));
    }

    #[test]
    fn laps_of_unequal_tracks_follow_the_video() {
        let mut clip = Clip::parse(CLIP).expect("demo clip parses");
        let video = clip.tracks[0];
        // Pretend the audio ran 100 samples long: it must still move by 16 s a lap.
        let last = clip.fragments.len() - 1;
        for t in &mut clip.fragments[last].tracks {
            if t.track_id != video.track.id {
                t.duration += 100;
            }
        }
        let tracks: Vec<Track> = clip.tracks.iter().map(|l| l.track).collect();
        let (laps, exact) = laps(&tracks, &clip.fragments).expect("valid");
        assert!(!exact);
        assert_eq!(laps[0], video);
        assert_eq!(laps[1].lap, u64::from(laps[1].track.timescale) * 16);
    }

    /// Parses 3 laps of the demo as a player would and checks that every
    /// track's decode time only moves forward, with no gap or overlap at the
    /// seams, and that the blocks verify in order.
    #[test]
    fn three_laps_never_jump_back_and_verify() {
        let clip = Clip::parse(CLIP).expect("demo clip parses");
        let streams = Streams::new(
            None,
            StoreConfig {
                store_seconds: 3600,
                max_bytes: usize::MAX,
            },
        );
        let s = streams.get_or_create("demo").expect("name");
        let mut blocks = Vec::new();
        for lap in 0..3 {
            for i in 0..clip.fragments.len() {
                let f = clip.fragment(lap, i).expect("in range");
                blocks.extend(publish_fragment(&s, &f, 16 * 1024).expect("publish"));
            }
        }
        // Reassemble the stream from the verified blocks alone.
        let mut stream = clip.init.to_vec();
        for (i, b) in blocks.iter().enumerate() {
            assert_eq!(b.seq(), i as u64);
            let back = Block::decode(b.encoded.clone()).expect("decodes");
            let v = s.key.verify(back).expect("verifies under the stream key");
            stream.extend_from_slice(v.payload());
        }
        let items = fmp4::split([&stream[..]]).expect("the looped stream parses");
        let frags: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                Item::Fragment(f) => Some(f),
                Item::Init(_) => None,
            })
            .collect();
        assert_eq!(frags.len(), 48);
        let mut next: Vec<(u32, u64)> = Vec::new();
        for f in &frags {
            for t in &f.tracks {
                if let Some((_, end)) = next.iter().find(|(id, _)| *id == t.track_id) {
                    assert_eq!(t.base, *end, "track {} is not continuous", t.track_id);
                }
                next.retain(|(id, _)| *id != t.track_id);
                next.push((t.track_id, t.base + t.duration));
            }
        }
        assert!(frags.windows(2).all(|w| w[1].media_time > w[0].media_time));
        let seqs: Vec<u32> = frags
            .iter()
            .map(|f| {
                let at = f.sequence_offset.expect("mfhd");
                u32::from_be_bytes(f.bytes[at..at + 4].try_into().expect("4 bytes"))
            })
            .collect();
        assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1));
        let starts = blocks
            .iter()
            .filter(|b| {
                let f = b.block.header().flags;
                f.contains(BlockFlags::FRAGMENT_START) && f.contains(BlockFlags::KEYFRAME)
            })
            .count();
        assert_eq!(starts, 48);
    }

    #[tokio::test(start_paused = true)]
    async fn the_source_publishes_in_real_time_and_stops_on_shutdown() {
        let streams = Arc::new(Streams::new(
            None,
            StoreConfig {
                store_seconds: 3600,
                max_bytes: usize::MAX,
            },
        ));
        let shutdown = CancellationToken::new();
        let task = spawn(streams.clone(), "demo", 16 * 1024, shutdown.clone());
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = streams.get("demo").expect("created");
        assert!(s.init_segment().is_some());
        assert_eq!(
            s.live_edge(),
            None,
            "nothing before the first fragment ends"
        );
        tokio::time::sleep(Duration::from_secs(33)).await;
        // 33.5 s in: two full laps and one fragment of the third.
        let starts = (0..=s.live_edge().expect("blocks"))
            .filter(|seq| match s.block(*seq) {
                crate::store::Lookup::Found(b) => {
                    b.block.header().flags.contains(BlockFlags::FRAGMENT_START)
                }
                _ => false,
            })
            .count();
        assert_eq!(starts, 33);
        assert!(s.claim().is_err(), "the demo holds the stream");
        shutdown.cancel();
        task.await.expect("the task ends cleanly");
        assert!(s.claim().is_ok(), "the claim is released on shutdown");
    }
}
