//! Pure playback arithmetic: what the init segment says, which wall-clock
//! moment the playhead shows, and how to steer toward the target latency.
//!
//! Nothing here touches the browser, so it is tested natively and in Chromium.
//!
//! Latency mapping: every fragment-start block carries the decode time of the
//! fragment's first sample (`media_time`, in the track timescale parsed from
//! the init segment's `mdhd`) and the ingest wall clock at which the server cut
//! it. MSE places a fragment at its decode time (no `timestampOffset` is
//! used), so `media_time / timescale` is the fragment's start on the
//! `currentTime` axis. A playhead at `t` inside the fragment that starts at `m`
//! shows the frame ingested at about `ingest + (t - m)` seconds; how far the
//! playhead is behind the live edge is the server's clock now minus that (what
//! the player steers). A fragment reaches the server only once it is complete,
//! so its first frame was captured a fragment's duration before its ingest:
//! glass to glass, a frame at `t` was captured at `ingest - d + (t - m)`, with
//! `d` the fragment's duration (the distance to the next fragment start, or the
//! last one known). That is `latency_ms` in the stats.

use std::collections::VecDeque;

/// Fragment anchors kept for the latency mapping (a few minutes of fragments).
pub const MAX_ANCHORS: usize = 512;

/// What the driver needs from an init segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitInfo {
    /// Timescale of the video track (or of the first track if none is video).
    pub timescale: u32,
    /// The MSE MIME type with the codecs found, e.g.
    /// `video/mp4; codecs="avc1.64001f, mp4a.40.2"`.
    pub mime: String,
}

/// Errors of [`parse_init`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InitError {
    /// No `moov` box, or no track with an `mdhd`.
    #[error("init segment has no track with a media header")]
    NoTrack,
    /// A track's timescale is zero.
    #[error("track timescale is zero")]
    ZeroTimescale,
    /// An audio or video track's codec is not one the player can name for
    /// MSE (H.264 `avc1`/`avc3`, VP9 `vp09`, AV1 `av01`, AAC `mp4a`, Opus).
    #[error("the stream's codec {0:?} is not one this player knows")]
    UnknownCodec(String),
}

struct Track {
    timescale: u32,
    handler: [u8; 4],
    /// The sample entry's type.
    entry: [u8; 4],
    codec: Option<String>,
}

/// Reads the track timescales and codecs from a fragmented-MP4 init segment.
/// Malformed boxes are skipped, never trusted past their bounds.
pub fn parse_init(bytes: &[u8]) -> Result<InitInfo, InitError> {
    let moov = boxes(bytes)
        .find(|(t, _)| t == b"moov")
        .ok_or(InitError::NoTrack)?
        .1;
    let tracks: Vec<Track> = boxes(moov)
        .filter(|(t, _)| t == b"trak")
        .filter_map(|(_, trak)| track(trak))
        .collect();
    let main = tracks
        .iter()
        .find(|t| &t.handler == b"vide")
        .or_else(|| tracks.first())
        .ok_or(InitError::NoTrack)?;
    if main.timescale == 0 {
        return Err(InitError::ZeroTimescale);
    }
    let media = |t: &&Track| matches!(&t.handler, b"vide" | b"soun");
    if let Some(t) = tracks.iter().filter(media).find(|t| t.codec.is_none()) {
        return Err(InitError::UnknownCodec(
            String::from_utf8_lossy(&t.entry).into_owned(),
        ));
    }
    let has_video = tracks.iter().any(|t| &t.handler == b"vide");
    let codecs: Vec<&str> = tracks.iter().filter_map(|t| t.codec.as_deref()).collect();
    let kind = if has_video { "video" } else { "audio" };
    let mime = if codecs.is_empty() {
        crate::mse::MIME_H264_AAC.to_owned()
    } else {
        format!("{kind}/mp4; codecs=\"{}\"", codecs.join(", "))
    };
    Ok(InitInfo {
        timescale: main.timescale,
        mime,
    })
}

fn track(trak: &[u8]) -> Option<Track> {
    let mdia = child(trak, b"mdia")?;
    let mdhd = child(mdia, b"mdhd")?;
    let timescale = match *mdhd.first()? {
        // version, flags, creation and modification times (32 or 64 bit)
        0 => be_u32(mdhd, 12)?,
        _ => be_u32(mdhd, 20)?,
    };
    let hdlr = child(mdia, b"hdlr")?;
    let handler: [u8; 4] = hdlr.get(8..12)?.try_into().ok()?;
    let stsd = child(child(child(mdia, b"minf")?, b"stbl")?, b"stsd")?;
    // version/flags and entry count, then the sample entries
    let (entry, body) = boxes(stsd.get(8..)?).next()?;
    Some(Track {
        timescale,
        handler,
        entry,
        codec: codec(entry, body),
    })
}

/// The RFC 6381 codec string of a sample entry, for the codecs we know.
fn codec(kind: [u8; 4], entry: &[u8]) -> Option<String> {
    match &kind {
        b"avc1" | b"avc3" => {
            // VisualSampleEntry fields take 78 bytes before the child boxes.
            let avcc = boxes(entry.get(78..)?).find(|(t, _)| t == b"avcC")?.1;
            let p = avcc.get(1..4)?;
            Some(format!(
                "{}.{:02x}{:02x}{:02x}",
                String::from_utf8_lossy(&kind),
                p[0],
                p[1],
                p[2]
            ))
        }
        b"vp09" => {
            // vpcC (a full box): profile, level, then the bit depth in the
            // high nibble.
            let vpcc = boxes(entry.get(78..)?).find(|(t, _)| t == b"vpcC")?.1;
            let p = vpcc.get(4..7)?;
            Some(format!("vp09.{:02}.{:02}.{:02}", p[0], p[1], p[2] >> 4))
        }
        b"av01" => {
            // av1C: marker and version, then seq_profile (3 bits) and
            // seq_level_idx_0 (5), then seq_tier_0, high_bitdepth, twelve_bit.
            let av1c = boxes(entry.get(78..)?).find(|(t, _)| t == b"av1C")?.1;
            let p = av1c.get(1..3)?;
            let tier = if p[1] & 0x80 != 0 { 'H' } else { 'M' };
            let depth = match (p[1] & 0x40 != 0, p[1] & 0x20 != 0) {
                (true, true) => 12,
                (true, false) => 10,
                _ => 8,
            };
            Some(format!(
                "av01.{}.{:02}{tier}.{depth:02}",
                p[0] >> 5,
                p[0] & 0x1f
            ))
        }
        // AudioSampleEntry; AAC-LC is what every encoder we target emits.
        b"mp4a" => Some("mp4a.40.2".to_owned()),
        b"Opus" => Some("opus".to_owned()),
        _ => None,
    }
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn child<'a>(parent: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    boxes(parent).find(|(t, _)| t == kind).map(|(_, b)| b)
}

/// Iterates the boxes directly inside `data` as `(type, body)`; stops at the
/// first box whose size does not fit.
fn boxes(data: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    // Every step advances by at least 8 bytes, so the walk ends.
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let size = be_u32(data, at)? as usize;
        let kind: [u8; 4] = data.get(at + 4..at + 8)?.try_into().ok()?;
        let (header, size) = match size {
            1 => {
                let big = u64::from_be_bytes(data.get(at + 8..at + 16)?.try_into().ok()?);
                (16, usize::try_from(big).ok()?)
            }
            0 => (8, data.len() - at),
            n => (8, n),
        };
        if size < header {
            return None;
        }
        let body = data.get(at + header..at.checked_add(size)?)?;
        at += size;
        Some((kind, body))
    })
}

/// Maps the playhead (`currentTime`, seconds) to the ingest wall clock (ms)
/// of the frame it shows, from the fragment starts played so far.
#[derive(Debug, Default)]
pub struct Timeline {
    timescale: u32,
    /// `(fragment start in seconds, ingest ms)`, ascending by time.
    anchors: VecDeque<(f64, u64)>,
}

impl Timeline {
    /// A timeline for a track with this timescale.
    pub fn new(timescale: u32) -> Self {
        Timeline {
            timescale: timescale.max(1),
            anchors: VecDeque::new(),
        }
    }

    /// Sets the timescale of the fragments noted from now on (the init
    /// segment's, at the start and at each new init); anchors noted before
    /// keep their place.
    pub fn set_timescale(&mut self, timescale: u32) {
        self.timescale = timescale.max(1);
    }

    /// A fragment starting at `media_time` (track timescale) was ingested at `ingest_ms`.
    pub fn note_fragment(&mut self, media_time: u64, ingest_ms: u64) {
        let secs = media_time as f64 / f64::from(self.timescale);
        // A jump back in media time (a new timeline) invalidates older anchors.
        while self.anchors.back().is_some_and(|(s, _)| *s >= secs) {
            self.anchors.pop_back();
        }
        if self.anchors.len() >= MAX_ANCHORS {
            self.anchors.pop_front();
        }
        self.anchors.push_back((secs, ingest_ms));
    }

    /// Index of the fragment that holds `t`: the last start at or before it,
    /// or the first one when `t` precedes every start (a track that starts a
    /// little after another).
    fn fragment_at(&self, t: f64) -> Option<usize> {
        let i = self.anchors.partition_point(|(s, _)| *s <= t + 1e-3);
        if self.anchors.is_empty() {
            return None;
        }
        Some(i.saturating_sub(1))
    }

    /// Ingest wall clock (ms) of the frame at `t` seconds (the edge mapping),
    /// if a fragment start is known.
    pub fn ingest_at(&self, t: f64) -> Option<f64> {
        let (s, ingest) = *self.anchors.get(self.fragment_at(t)?)?;
        Some(ingest as f64 + (t - s) * 1000.0)
    }

    /// Capture wall clock (ms) of the frame at `t` seconds: its ingest less
    /// its fragment's duration. Known once two fragment starts are.
    pub fn capture_at(&self, t: f64) -> Option<f64> {
        let i = self.fragment_at(t)?;
        let (s, _) = *self.anchors.get(i)?;
        let duration = match self.anchors.get(i + 1) {
            Some((next, _)) => next - s,
            None => s - self.anchors.get(i.checked_sub(1)?)?.0,
        };
        Some(self.ingest_at(t)? - duration * 1000.0)
    }

    /// Media time (seconds) of the frame ingested at `ingest_ms`, if known.
    pub fn time_of(&self, ingest_ms: f64) -> Option<f64> {
        let i = self
            .anchors
            .partition_point(|(_, ing)| (*ing as f64) <= ingest_ms);
        let (s, ingest) = *self.anchors.get(i.checked_sub(1)?)?;
        Some(s + (ingest_ms - ingest as f64) / 1000.0)
    }
}

/// What the player should do to hold the target latency.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Steer {
    /// Play at this rate.
    Rate(f64),
    /// Too far behind: seek forward by this many seconds (then play at 1.0).
    Jump(f64),
}

/// Latency error below which the rate stays 1.0, ms.
pub const DEADBAND_MS: f64 = 150.0;
/// Largest rate change either way. Browsers keep the pitch
/// (`preservesPitch`), and a tenth is hard to notice.
pub const MAX_RATE_DELTA: f64 = 0.10;
/// Latency error that gets the full rate change, ms. With the deadband, an
/// error shrinks with a time constant of `FULL_RATE_ERROR_MS / MAX_RATE_DELTA`
/// (5 s), so a start a second late is back on target in about 10 s.
pub const FULL_RATE_ERROR_MS: f64 = 500.0;
/// Behind the target by more than this, the player jumps, ms.
pub const JUMP_ERROR_MS: f64 = 2_000.0;
/// Buffer below which the player never speeds up, ms.
pub const MIN_BUFFER_TO_SPEED_UP_MS: f64 = 500.0;

/// Steering toward `target_ms` given the measured `latency_ms` and the media
/// buffered ahead of the playhead (`buffer_ms`).
pub fn steer(latency_ms: f64, target_ms: f64, buffer_ms: f64) -> Steer {
    let err = latency_ms - target_ms;
    if err > JUMP_ERROR_MS && buffer_ms > MIN_BUFFER_TO_SPEED_UP_MS {
        // Land on the target, but never closer than half a second to the end
        // of the buffer.
        let ahead = (err / 1000.0).min((buffer_ms - MIN_BUFFER_TO_SPEED_UP_MS) / 1000.0);
        if ahead > 0.0 {
            return Steer::Jump(ahead);
        }
    }
    if err.abs() < DEADBAND_MS || (err > 0.0 && buffer_ms < MIN_BUFFER_TO_SPEED_UP_MS) {
        return Steer::Rate(1.0);
    }
    let delta = (err / FULL_RATE_ERROR_MS).clamp(-1.0, 1.0) * MAX_RATE_DELTA;
    Steer::Rate(1.0 + delta)
}

/// Where to seek when playback is stuck at `t`: the start of the next
/// buffered range after a gap, or the first range when `t` is before it.
pub fn gap_exit(ranges: &[(f64, f64)], t: f64) -> Option<f64> {
    const EPS: f64 = 0.1;
    if ranges.iter().any(|&(s, e)| s <= t && t < e - EPS) {
        return None;
    }
    ranges.iter().find(|&&(s, _)| s > t).map(|&(s, _)| s + 0.01)
}

/// Where to seek a playhead stuck at `t` inside buffered media: `step`
/// seconds on, if the range holding `t` reaches that far with a tenth of a
/// second to spare; `None` in a gap or near a range's end (waiting for data
/// is not being stuck, and [`gap_exit`] handles gaps).
pub fn nudge(ranges: &[(f64, f64)], t: f64, step: f64) -> Option<f64> {
    ranges
        .iter()
        .find(|&&(s, e)| s <= t && t + step + 0.1 < e)
        .map(|_| t + step)
}

/// Media buffered ahead of `t`, seconds (0 when `t` is not in a range).
pub fn ahead_of(ranges: &[(f64, f64)], t: f64) -> f64 {
    ranges
        .iter()
        .find(|&&(s, e)| s <= t + 0.05 && t < e)
        .map_or(0.0, |&(_, e)| e - t)
}

/// Why playback stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StallReason {
    /// A rebuffer: media did not come in time.
    Buffer,
    /// A wait at the live edge while no publisher is connected.
    Publisher,
}

impl StallReason {
    /// The name in the player's `stall` and `resume` events.
    pub fn as_str(self) -> &'static str {
        match self {
            StallReason::Buffer => "buffer",
            StallReason::Publisher => "publisher",
        }
    }
}

/// The player's stall accounting: rebuffers (`stalls`, `stall_ms`) apart
/// from waits for a publisher (`publisher_wait_ms`). A stall that begins
/// while no publisher is connected is a wait; a rebuffer that is running
/// when the publisher leaves is a wait from then on; a stall keeps its kind
/// when the publisher comes back, until it ends. Times are ms.
#[derive(Debug, Clone)]
pub struct Stalls {
    running: Option<(f64, StallReason)>,
    count: u32,
    buffer_ms: f64,
    publisher_ms: f64,
    publisher_connected: bool,
}

impl Default for Stalls {
    fn default() -> Self {
        Stalls {
            running: None,
            count: 0,
            buffer_ms: 0.0,
            publisher_ms: 0.0,
            publisher_connected: true,
        }
    }
}

impl Stalls {
    /// Playback stopped at `now`: the reason, unless a stall was running.
    pub fn begin(&mut self, now: f64) -> Option<StallReason> {
        if self.running.is_some() {
            return None;
        }
        let reason = if self.publisher_connected {
            self.count += 1;
            StallReason::Buffer
        } else {
            StallReason::Publisher
        };
        self.running = Some((now, reason));
        Some(reason)
    }

    /// Playback moved again at `now`: how long the stall ran (since it began,
    /// or became a wait) and its reason, if one was running.
    pub fn end(&mut self, now: f64) -> Option<(f64, StallReason)> {
        let (since, reason) = self.running.take()?;
        self.add(reason, now - since);
        Some((now - since, reason))
    }

    /// The server says whether a publisher is connected at `now`; whether
    /// that changed.
    pub fn set_publisher(&mut self, connected: bool, now: f64) -> bool {
        if connected == self.publisher_connected {
            return false;
        }
        self.publisher_connected = connected;
        if let Some((since, StallReason::Buffer)) = self.running.filter(|_| !connected) {
            self.add(StallReason::Buffer, now - since);
            self.running = Some((now, StallReason::Publisher));
        }
        true
    }

    fn add(&mut self, reason: StallReason, ms: f64) {
        match reason {
            StallReason::Buffer => self.buffer_ms += ms,
            StallReason::Publisher => self.publisher_ms += ms,
        }
    }

    /// Whether a stall is running.
    pub fn stalled(&self) -> bool {
        self.running.is_some()
    }
    /// Whether a publisher is connected, as the server last said.
    pub fn publisher_connected(&self) -> bool {
        self.publisher_connected
    }
    /// Rebuffers so far.
    pub fn count(&self) -> u32 {
        self.count
    }
    /// Time spent in rebuffers up to `now`.
    pub fn stall_ms(&self, now: f64) -> f64 {
        self.buffer_ms + self.running_for(StallReason::Buffer, now)
    }
    /// Time spent waiting for a publisher up to `now`.
    pub fn publisher_wait_ms(&self, now: f64) -> f64 {
        self.publisher_ms + self.running_for(StallReason::Publisher, now)
    }

    fn running_for(&self, reason: StallReason, now: f64) -> f64 {
        match self.running {
            Some((since, r)) if r == reason => now - since,
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stall_while_no_publisher_is_connected_is_a_wait_not_a_rebuffer() {
        let mut s = Stalls::default();
        assert!(s.publisher_connected());
        // A rebuffer, counted once however often it is begun.
        assert_eq!(s.begin(1_000.0), Some(StallReason::Buffer));
        assert_eq!(s.begin(1_100.0), None);
        assert_eq!(s.end(1_400.0), Some((400.0, StallReason::Buffer)));
        assert_eq!(s.end(1_500.0), None);
        assert_eq!((s.count(), s.stall_ms(2_000.0)), (1, 400.0));
        // The publisher leaves; the player reaches the edge and waits.
        assert!(s.set_publisher(false, 2_000.0));
        assert!(!s.set_publisher(false, 2_100.0), "no change");
        assert_eq!(s.begin(3_000.0), Some(StallReason::Publisher));
        assert_eq!(s.publisher_wait_ms(4_000.0), 1_000.0);
        // It comes back: the wait lasts until playback moves.
        assert!(s.set_publisher(true, 5_000.0));
        assert!(s.stalled());
        assert_eq!(s.end(6_000.0), Some((3_000.0, StallReason::Publisher)));
        assert_eq!((s.count(), s.stall_ms(7_000.0)), (1, 400.0));
        assert_eq!(s.publisher_wait_ms(7_000.0), 3_000.0);
        // A rebuffer running when the publisher leaves is a wait from then on.
        assert_eq!(s.begin(8_000.0), Some(StallReason::Buffer));
        assert!(s.set_publisher(false, 8_500.0));
        assert_eq!(s.stall_ms(9_000.0), 900.0);
        assert_eq!(s.publisher_wait_ms(9_000.0), 3_500.0);
        assert_eq!(s.end(9_500.0), Some((1_000.0, StallReason::Publisher)));
        assert_eq!((s.count(), s.stall_ms(10_000.0)), (2, 900.0));
        assert_eq!(s.publisher_wait_ms(10_000.0), 4_000.0);
    }

    fn bx(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut v = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(body);
        v
    }

    fn trak(handler: &[u8; 4], timescale: u32, entry: Vec<u8>) -> Vec<u8> {
        let mut mdhd = vec![0u8; 12];
        mdhd.extend_from_slice(&timescale.to_be_bytes());
        mdhd.extend_from_slice(&[0u8; 8]);
        let mut hdlr = vec![0u8; 8];
        hdlr.extend_from_slice(handler);
        hdlr.extend_from_slice(&[0u8; 13]);
        let mut stsd = vec![0, 0, 0, 0, 0, 0, 0, 1];
        stsd.extend(entry);
        let stbl = bx(b"stbl", &bx(b"stsd", &stsd));
        let minf = bx(b"minf", &stbl);
        let mdia = [bx(b"mdhd", &mdhd), bx(b"hdlr", &hdlr), minf].concat();
        bx(b"trak", &bx(b"mdia", &mdia))
    }

    pub(crate) fn sample_init() -> Vec<u8> {
        let mut avc1 = vec![0u8; 78];
        avc1.extend(bx(b"avcC", &[1, 0x64, 0x00, 0x1f, 0xff]));
        let video = trak(b"vide", 90_000, bx(b"avc1", &avc1));
        let audio = trak(b"soun", 48_000, bx(b"mp4a", &[0u8; 28]));
        [
            bx(b"ftyp", b"isom\0\0\0\0"),
            bx(b"moov", &[audio, video].concat()),
        ]
        .concat()
    }

    #[test]
    fn init_gives_video_timescale_and_codecs() {
        let info = parse_init(&sample_init()).expect("parses");
        assert_eq!(info.timescale, 90_000);
        assert_eq!(info.mime, "video/mp4; codecs=\"mp4a.40.2, avc1.64001f\"");
    }

    #[test]
    fn vp9_av1_and_opus_are_named_and_an_unknown_codec_is_an_error() {
        let init = |video: Vec<u8>| {
            let video = trak(b"vide", 15_360, video);
            let audio = trak(b"soun", 48_000, bx(b"Opus", &[0u8; 28]));
            bx(b"moov", &[video, audio].concat())
        };
        let entry = |kind: &[u8; 4], config: Vec<u8>| {
            let mut e = vec![0u8; 78];
            e.extend(config);
            bx(kind, &e)
        };
        // As ffmpeg 5.1 writes it for 320x180 (profile 0, level 1.1, 8 bits).
        let vpcc = bx(b"vpcC", &[1, 0, 0, 0, 0x00, 0x0b, 0x82, 2, 2, 2, 0, 0]);
        let info = parse_init(&init(entry(b"vp09", vpcc))).expect("parses");
        assert_eq!(info.mime, "video/mp4; codecs=\"vp09.00.11.08, opus\"");
        assert_eq!(info.timescale, 15_360);
        // Main profile, level 4.0 (seq_level_idx 8), main tier, 8 bits; and
        // high tier, 10 bits.
        let av1c = |b: u8| bx(b"av1C", &[0x81, 0x08, b, 0]);
        let info = parse_init(&init(entry(b"av01", av1c(0x0c)))).expect("parses");
        assert_eq!(info.mime, "video/mp4; codecs=\"av01.0.08M.08, opus\"");
        let info = parse_init(&init(entry(b"av01", av1c(0xcc)))).expect("parses");
        assert_eq!(info.mime, "video/mp4; codecs=\"av01.0.08H.10, opus\"");
        // HEVC is not named (headless Chromium has no decoder to check it
        // against); and an av1C without its fields (ffmpeg 5.1 writes one with
        // `empty_moov`) cannot be named either.
        assert_eq!(
            parse_init(&init(entry(b"hvc1", bx(b"hvcC", &[1; 23])))),
            Err(InitError::UnknownCodec("hvc1".into()))
        );
        assert_eq!(
            parse_init(&init(entry(b"av01", bx(b"av1C", &[])))),
            Err(InitError::UnknownCodec("av01".into()))
        );
    }

    #[test]
    fn init_garbage_is_an_error_not_a_panic() {
        assert_eq!(parse_init(b"junk"), Err(InitError::NoTrack));
        let mut init = sample_init();
        init.truncate(init.len() - 40);
        assert!(parse_init(&init).is_err());
        for cut in 0..sample_init().len() {
            let _ = parse_init(&sample_init()[..cut]);
        }
    }

    #[test]
    fn timeline_maps_playhead_to_ingest_time() {
        let mut tl = Timeline::new(1000);
        assert_eq!(tl.ingest_at(1.0), None);
        tl.note_fragment(2_000, 10_000);
        assert_eq!(tl.capture_at(2.5), None, "one fragment: no duration yet");
        tl.note_fragment(4_000, 12_000);
        // Before the first start (another track starts earlier): extrapolated.
        assert_eq!(tl.ingest_at(1.5), Some(9_500.0));
        assert_eq!(tl.ingest_at(2.5), Some(10_500.0));
        // Glass to glass: the 2-s fragments were captured 2 s before ingest.
        assert_eq!(tl.capture_at(2.5), Some(8_500.0));
        assert_eq!(tl.capture_at(4.5), Some(10_500.0));
        assert_eq!(tl.ingest_at(4.25), Some(12_250.0));
        assert_eq!(tl.time_of(12_250.0), Some(4.25));
        // Another init with another timescale: the anchors noted stay put,
        // the next ones are read in the new timescale.
        tl.set_timescale(2000);
        assert_eq!(tl.ingest_at(4.25), Some(12_250.0));
        tl.note_fragment(12_000, 14_000);
        assert_eq!(tl.ingest_at(6.5), Some(14_500.0));
    }

    #[test]
    fn steering_is_bounded_and_jumps_when_far_behind() {
        assert_eq!(steer(1500.0, 1500.0, 2000.0), Steer::Rate(1.0));
        assert_eq!(
            steer(1600.0, 1500.0, 2000.0),
            Steer::Rate(1.0),
            "in the deadband"
        );
        assert_eq!(steer(1750.0, 1500.0, 2000.0), Steer::Rate(1.05));
        assert_eq!(steer(2500.0, 1500.0, 2000.0), Steer::Rate(1.1));
        assert_eq!(steer(3400.0, 1500.0, 2000.0), Steer::Rate(1.1), "bounded");
        assert_eq!(steer(500.0, 1500.0, 2000.0), Steer::Rate(0.9));
        assert_eq!(steer(2000.0, 1500.0, 100.0), Steer::Rate(1.0));
        // 2 s behind the target is not yet a jump; more is.
        assert_eq!(steer(3500.0, 1500.0, 10_000.0), Steer::Rate(1.1));
        match steer(6000.0, 1500.0, 10_000.0) {
            Steer::Jump(s) => assert!((s - 4.5).abs() < 1e-9),
            other => panic!("expected a jump, got {other:?}"),
        }
        // Far behind but nothing buffered to jump into: no jump.
        assert_eq!(steer(6000.0, 1500.0, 300.0), Steer::Rate(1.0));
    }

    #[test]
    fn gap_exit_finds_next_range() {
        let r = [(0.0, 4.0), (5.0, 9.0)];
        assert_eq!(gap_exit(&r, 2.0), None);
        assert_eq!(gap_exit(&r, 3.95), Some(5.01));
        assert_eq!(gap_exit(&r, 9.0), None);
        assert_eq!(gap_exit(&[(3.0, 4.0)], 0.0), Some(3.01));
        assert_eq!(ahead_of(&r, 6.0), 3.0);
        assert_eq!(ahead_of(&r, 4.5), 0.0);
    }

    #[test]
    fn nudge_only_inside_buffered_media() {
        // The bench-loss case: stuck at 30.008 with 31.04 buffered.
        let r = [(18.04, 31.04), (32.04, 41.06)];
        assert_eq!(nudge(&r, 30.008, 0.1), Some(30.108));
        // Near a range's end the player is waiting for data, not stuck.
        assert_eq!(nudge(&r, 30.9, 0.1), None);
        // In a gap, or before the first range, gap_exit seeks instead.
        assert_eq!(nudge(&r, 31.5, 0.1), None);
        assert_eq!(nudge(&r, 10.0, 0.1), None);
        assert_eq!(nudge(&[], 1.0, 0.1), None);
    }
}
