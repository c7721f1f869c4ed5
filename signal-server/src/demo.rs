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
//! Looping: on lap `n` every track's `tfdt` is moved forward by `n` times the
//! video's clip length, converted exactly (in `u128`, rounded to the nearest
//! tick) to that track's timescale, so every track moves by the same time each
//! lap: decode times never jump back and audio never drifts from video. The
//! `mfhd` sequence number keeps counting up. Both are overwritten in place in a
//! copy of the fragment. A track that lasts exactly as long as the video is
//! seamless across laps; any other shows the difference once a lap as a short
//! gap or overlap. The committed clip's audio ends one sample (21 us) before its
//! video, because the muxer stretched the first video frame to cover the AAC
//! priming, so each lap leaves a one-sample audio gap, which MSE plays through.
//!
//! The clip's tracks must not be cut to equal lengths by re-muxing AAC from
//! ADTS: with `empty_moov` ffmpeg then writes an `esds` without the
//! AudioSpecificConfig, and Chrome's MSE refuses the init segment ("stream
//! parsing failed"); a test checks that the config is there.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::ingest::chunker::publish_fragment;
use crate::ingest::continuation;
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
    /// Whether every track lasts exactly as long as the reference track, so
    /// that no track has a gap or overlap where one lap meets the next.
    pub seamless: bool,
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
        let (tracks, seamless) = laps(p.tracks(), &fragments)?;
        Ok(Clip {
            init,
            fragments,
            tracks,
            seamless,
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

/// Each track's start and per-lap shift, reference (video) track first: the
/// reference's length converted to the track's timescale. Also whether every
/// track is exactly as long as the reference (see the module docs).
fn laps(tracks: &[Track], fragments: &[Fragment]) -> Result<(Vec<LoopTrack>, bool), Fmp4Error> {
    let mut order = tracks.to_vec();
    order.sort_by_key(|t| !t.video);
    // Each track with its start and its own length.
    let mut own = Vec::with_capacity(order.len());
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
        own.push((track, start, end - start));
    }
    let Some(&(reference, _, length)) = own.first() else {
        return Err(Fmp4Error::Malformed("clip has no tracks"));
    };
    let from = u128::from(reference.timescale);
    let mut seamless = true;
    let tracks = own
        .into_iter()
        .map(|(track, start, own_length)| {
            let to = u128::from(track.timescale);
            let lap = (u128::from(length) * to + from / 2) / from;
            let lap = u64::try_from(lap).unwrap_or(u64::MAX);
            seamless &= u128::from(own_length) * from == u128::from(length) * to;
            LoopTrack { track, start, lap }
        })
        .collect();
    Ok((tracks, seamless))
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
    guard.set_init(clip.init.clone())?;
    tracing::info!(stream = %name, id = %stream.id, lap = ?clip.duration(), "demo source started");
    let start = tokio::time::Instant::now();
    // A stream resumed after a restart goes on where its timeline ended, as
    // an encoder that came back would (see `ingest::continuation`).
    let tracks: Vec<Track> = clip.tracks.iter().map(|l| l.track).collect();
    let mut shift = None;
    for lap in 0u64.. {
        for i in 0..clip.fragments.len() {
            let due = start + clip.due(lap, i);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep_until(due) => {}
            }
            if let Some(mut frag) = clip.fragment(lap, i) {
                let by = *shift.get_or_insert_with(|| continuation(stream.timeline_end(), &frag));
                frag.shift(by, &tracks)?;
                publish_fragment(&guard, &frag, block_bytes)?;
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

    /// The clip's audio track.
    fn audio(clip: &Clip) -> LoopTrack {
        *clip.tracks.get(1).expect("an audio track")
    }

    #[test]
    fn the_committed_clip_loops_every_track_by_the_same_time() {
        let clip = Clip::parse(CLIP).expect("demo clip parses");
        assert_eq!(clip.fragments.len(), 16);
        let (video, audio) = (clip.tracks[0], audio(&clip));
        assert!(video.track.video && !audio.track.video);
        let lap = clip.duration();
        assert!(
            (Duration::from_secs(16)..Duration::from_millis(16_050)).contains(&lap),
            "{lap:?}"
        );
        // Audio moves by exactly the video's lap: no drift, however long it runs.
        assert_eq!(ticks(audio.lap, audio.track.timescale), lap);
        // Its own length is a sample short of that (see the module docs).
        assert!(!clip.seamless);
        // The first fragment is due when it ends, the last one at the lap's end.
        let first = &clip.fragments[0].tracks[0];
        assert_eq!(clip.due(0, 0), ticks(first.duration, video.track.timescale));
        assert!(clip.due(2, 15).abs_diff(3 * lap) < Duration::from_micros(1));
    }

    #[test]
    fn laps_follow_the_video_whatever_the_audio_length() {
        let clip = Clip::parse(CLIP).expect("demo clip parses");
        let tracks: Vec<Track> = clip.tracks.iter().map(|l| l.track).collect();
        let audio_id = audio(&clip).track.id;
        let mut seen = Vec::new();
        for extra in [0, 1, 100] {
            let mut fragments = clip.fragments.clone();
            let last = fragments.len() - 1;
            for t in &mut fragments[last].tracks {
                if t.track_id == audio_id {
                    t.duration += extra;
                }
            }
            let (laps, seamless) = laps(&tracks, &fragments).expect("valid");
            assert_eq!(laps[0], clip.tracks[0], "the video is the reference");
            seen.push((laps[1].lap, seamless));
        }
        // One sample longer makes the audio exactly as long as the video.
        let lap = audio(&clip).lap;
        assert_eq!(seen, [(lap, false), (lap, true), (lap, false)]);
    }

    /// Reassembles 3 laps from the verified blocks, as a player appends them,
    /// and checks what MSE needs to play across the seams: every track's
    /// decode time strictly increases with no overlap and no gap of a
    /// millisecond or more, audio stays as far from video as in lap 0 (to
    /// within a sample), and fragment times and sequence numbers count up.
    #[test]
    fn three_laps_play_on_without_jumps_or_drift() {
        let clip = Clip::parse(CLIP).expect("demo clip parses");
        let streams = Streams::new(
            None,
            StoreConfig {
                store_seconds: 3600,
                max_bytes: usize::MAX,
            },
        );
        let s = streams.get_or_create("demo").expect("name");
        let guard = s.claim().expect("free");
        let mut blocks = Vec::new();
        for lap in 0..3 {
            for i in 0..clip.fragments.len() {
                let f = clip.fragment(lap, i).expect("in range");
                blocks.extend(publish_fragment(&guard, &f, 16 * 1024).expect("publish"));
            }
        }
        assert!(clip.fragment(0, clip.fragments.len()).is_none());
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
        let scale = |id: u32| {
            let t = clip.tracks.iter().find(|l| l.track.id == id);
            u64::from(t.expect("known track").track.timescale)
        };
        let (video, audio) = (clip.tracks[0].track, audio(&clip).track);
        let mut ends: Vec<(u32, u64)> = Vec::new();
        let mut offsets = Vec::new();
        for f in &frags {
            for t in &f.tracks {
                if let Some(&(_, end)) = ends.iter().find(|(id, _)| *id == t.track_id) {
                    assert!(t.base >= end, "track {} overlaps or goes back", t.track_id);
                    let gap = t.base - end;
                    assert!(gap * 1000 < scale(t.track_id), "track {} gap", t.track_id);
                }
                ends.retain(|(id, _)| *id != t.track_id);
                ends.push((t.track_id, t.base + t.duration));
            }
            // Audio minus video start, in audio samples.
            let base = |id: u32| f.tracks.iter().find(|t| t.track_id == id).map(|t| t.base);
            let (v, a) = (
                base(video.id).expect("video"),
                base(audio.id).expect("audio"),
            );
            let v_in_audio =
                u128::from(v) * u128::from(audio.timescale) / u128::from(video.timescale);
            offsets.push(i128::from(a) - v_in_audio as i128);
        }
        let fragment = i128::from(audio.timescale);
        for (i, o) in offsets.iter().enumerate() {
            let lap0 = offsets[i % clip.fragments.len()];
            assert!(
                (o - lap0).abs() <= 1,
                "fragment {i}: audio drifted by {}",
                o - lap0
            );
            assert!(
                o.abs() < fragment,
                "fragment {i}: audio {o} samples off video"
            );
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

    /// MSE needs the AAC AudioSpecificConfig in the init segment: the `esds`
    /// must carry a DecoderSpecificInfo (tag 5) after the DecoderConfig (tag 4).
    #[test]
    fn the_clip_tells_the_browser_how_to_decode_its_audio() {
        let clip = Clip::parse(CLIP).expect("demo clip parses");
        let init = &clip.init[..];
        let at = init
            .windows(4)
            .position(|w| w == b"esds")
            .expect("an esds box");
        let size = u32::from_be_bytes(init[at - 4..at].try_into().expect("4 bytes")) as usize;
        let esds = &init[at + 8..at - 4 + size];
        let info = decoder_specific_info(esds).expect("an AudioSpecificConfig");
        assert_eq!(info.first().map(|b| b >> 3), Some(2), "AAC LC: {info:02x?}");
    }

    /// The DecoderSpecificInfo in an `esds` body (after version and flags).
    fn decoder_specific_info(mut d: &[u8]) -> Option<&[u8]> {
        // Each descriptor: a tag, a length of 1-4 bytes of 7 bits, the body.
        fn descriptor(d: &[u8]) -> Option<(u8, &[u8], &[u8])> {
            let (&tag, mut rest) = d.split_first()?;
            let mut len = 0usize;
            for _ in 0..4 {
                let (&b, r) = rest.split_first()?;
                rest = r;
                len = len << 7 | usize::from(b & 0x7f);
                if b & 0x80 == 0 {
                    break;
                }
            }
            (len <= rest.len()).then(|| (tag, &rest[..len], &rest[len..]))
        }
        let (tag, es, _) = descriptor(d)?;
        // ES_ID, then flags: no dependsOn, URL or OCR stream in ffmpeg's output.
        (tag == 3 && es.get(2)? & 0xe0 == 0).then_some(())?;
        d = &es[3..];
        let (tag, config, _) = descriptor(d)?;
        // objectTypeIndication, streamType, bufferSizeDB, maxBitrate, avgBitrate.
        (tag == 4).then_some(())?;
        let (tag, info, _) = descriptor(config.get(13..)?)?;
        (tag == 5).then_some(info)
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
