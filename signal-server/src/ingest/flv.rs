//! FLV audio and video tags (as RTMP carries them) to fragmented MP4.
//!
//! [`Remuxer`] takes the payloads of FLV video tags (H.264: an
//! `AVCDecoderConfigurationRecord`, then length-prefixed NAL units) and audio
//! tags (AAC: an `AudioSpecificConfig`, then raw frames), each with its
//! millisecond timestamp, and writes what an HTTP publisher would send: an
//! init segment (`ftyp` + `moov`, a video track and, when the publisher sends
//! AAC, an audio track), then fragments (`moof` + `mdat`, one `traf` per
//! track). The output goes through the same [`Fmp4Parser`](super::fmp4) as
//! an HTTP body, so everything downstream is shared.
//!
//! - A fragment starts at every keyframe, and also at the first frame
//!   [`FRAGMENT_MS`] or more after the fragment began, so a long GOP does not
//!   hold the latest frames back (the fragment is flagged as a keyframe only
//!   when it starts with one).
//! - Frames before the first keyframe, audio before it, and frames before
//!   their decoder configuration are dropped: a viewer could not decode them.
//!   When the metadata names an audio codec, the first init segment also
//!   waits for the audio configuration (MSE cannot add a track later).
//! - Video decode times are the RTMP timestamps (timescale 1000, extended past
//!   the 32-bit wrap, kept increasing); a frame's composition offset is the
//!   tag's. Audio runs at its sample rate, [`AAC_FRAME`] samples a frame,
//!   and follows the timestamps again only when they jump by over
//!   [`AUDIO_RESYNC_MS`], so rounding never opens gaps.
//! - A new decoder configuration mid-stream (an encoder that changed its
//!   size) ends the fragment and writes a new init segment.
//! - A stream whose metadata names audio and no video (internet radio,
//!   `ffmpeg -vn`) is audio alone, cut every [`FRAGMENT_MS`]
//!   ([`Remuxer::set_audio_only`]).
//!
//! Bounds: a frame is at most [`MAX_FRAME`], the frames waiting for the next
//! cut at most [`MAX_PENDING`] bytes, and the wait for the first keyframe at
//! most [`MAX_WAIT_FRAMES`] frames. Other codecs (enhanced RTMP's HEVC or AV1,
//! MP3, Speex) get [`FlvError::Codec`]. Nothing here panics on input.

use bytes::{BufMut, Bytes, BytesMut};

/// A fragment is cut at the first frame this long after its start, keyframe
/// or not.
pub const FRAGMENT_MS: u64 = 500;
/// Largest frame accepted.
pub const MAX_FRAME: usize = 8 * 1024 * 1024;
/// Most bytes of frames waiting for the next cut.
pub const MAX_PENDING: usize = 16 * 1024 * 1024;
/// Most frames that may come before the first keyframe.
pub const MAX_WAIT_FRAMES: usize = 2_000;
/// Most of the publisher's clock, ms, that may pass before the first keyframe
/// (less than the ingest idle timeout, so the error says why).
pub const MAX_WAIT_MS: u32 = 20_000;
/// Samples in an AAC frame.
pub const AAC_FRAME: u64 = 1024;
/// Audio follows its timestamps again when they are this far off the
/// samples counted.
pub const AUDIO_RESYNC_MS: u64 = 100;

/// Video track id.
const VIDEO: u32 = 1;
/// Audio track id.
const AUDIO: u32 = 2;
/// Video timescale: the RTMP timestamps' milliseconds.
const VIDEO_SCALE: u32 = 1000;
/// FLV codec id of H.264.
const FLV_AVC: u8 = 7;
/// FLV sound format of AAC.
const FLV_AAC: u8 = 10;
/// Sample flags of a keyframe: depends on no other sample.
const SYNC: u32 = 0x0200_0000;
/// Sample flags of another frame: depends on others, not a sync sample.
const NON_SYNC: u32 = 0x0101_0000;

/// Errors of the remuxer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FlvError {
    /// A codec clubcast does not take over RTMP.
    #[error("unsupported codec: {0} (RTMP ingest takes H.264 video and AAC audio)")]
    Codec(String),
    /// A tag too short or inconsistent.
    #[error("malformed FLV tag: {0}")]
    Malformed(&'static str),
    /// A frame or the frames waiting are over their limit.
    #[error("{what} of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// A `frame`, or the `pending` frames.
        what: &'static str,
        /// Its size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// No keyframe came (or not the audio configuration the metadata named)
    /// within [`MAX_WAIT_MS`] of the publisher's clock or [`MAX_WAIT_FRAMES`]
    /// frames. An audio-only publisher whose metadata does not say so ends here.
    #[error(
        "no H.264 keyframe (or no AAC configuration the metadata named) in the first {} s or {} \
         frames; for audio alone, send onMetaData without a video codec",
        MAX_WAIT_MS / 1000,
        MAX_WAIT_FRAMES
    )]
    NoKeyframe,
}

/// One frame waiting for the next cut.
#[derive(Debug)]
struct Sample {
    /// Decode time, in the track's timescale.
    dts: u64,
    /// Composition offset, in the track's timescale.
    cto: i32,
    /// Whether it is a keyframe.
    key: bool,
    data: Bytes,
}

/// The audio track's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Aac {
    /// The `AudioSpecificConfig`.
    config: Bytes,
    /// Sample rate, the track's timescale.
    rate: u32,
    channels: u16,
}

/// Extends 32-bit millisecond timestamps past their wrap.
#[derive(Debug, Default)]
struct Clock {
    last: Option<(u32, u64)>,
}

impl Clock {
    fn extend(&mut self, ts: u32) -> u64 {
        let t = match self.last {
            None => u64::from(ts),
            // A step back of under 2^31 ms is a step back, not a wrap.
            Some((raw, at)) => at.saturating_add_signed(i64::from(ts.wrapping_sub(raw) as i32)),
        };
        self.last = Some((ts, t));
        t
    }
}

/// FLV tags in, fragmented MP4 out.
#[derive(Debug, Default)]
pub struct Remuxer {
    /// The video `AVCDecoderConfigurationRecord` in force.
    avcc: Option<Bytes>,
    /// The audio configuration in force.
    aac: Option<Aac>,
    /// Frame size from the stream's metadata.
    size: (u16, u16),
    /// Whether the stream's metadata names an audio codec.
    expect_audio: bool,
    /// Whether the stream's metadata names audio and no video: fragments of
    /// audio alone.
    audio_only: bool,
    /// Whether the init segment in force was written.
    init_written: bool,
    /// Whether the init segment in force has an audio track.
    init_has_audio: bool,
    video: Vec<Sample>,
    audio: Vec<Sample>,
    pending_bytes: usize,
    /// Frames dropped while waiting for the first keyframe.
    waited: usize,
    /// Timestamp of the first of them, ms.
    waiting_since: Option<u32>,
    video_clock: Clock,
    audio_clock: Clock,
    /// Last video decode time given out.
    last_dts: Option<u64>,
    /// Decode time of the next audio frame, in samples.
    next_audio: Option<u64>,
    sequence: u32,
}

impl Remuxer {
    /// A remuxer that has seen nothing yet.
    pub fn new() -> Self {
        Remuxer::default()
    }

    /// Frame size to write in the init segment (from `onMetaData`); the
    /// decoder reads the real one from the SPS.
    pub fn set_size(&mut self, width: u32, height: u32) {
        let clamp = |v: u32| u16::try_from(v).unwrap_or(u16::MAX);
        self.size = (clamp(width), clamp(height));
    }

    /// Whether the stream's metadata (`onMetaData`) names an audio codec: the
    /// first init segment then waits for the audio configuration, since MSE
    /// cannot add a track to a stream later.
    pub fn set_audio_expected(&mut self, expected: bool) {
        self.expect_audio = expected;
    }

    /// Whether the stream's metadata names audio and no video (internet
    /// radio, `ffmpeg -vn`): the stream is then audio alone, cut every
    /// [`FRAGMENT_MS`], and video tags are ignored. Taken only before the
    /// first init segment.
    pub fn set_audio_only(&mut self, audio_only: bool) {
        if !self.init_written && self.sequence == 0 {
            self.audio_only = audio_only;
        }
    }

    /// An FLV video tag's payload at `ts` ms; returns the bytes to publish.
    pub fn video(&mut self, ts: u32, tag: &[u8]) -> Result<Vec<Bytes>, FlvError> {
        let [head, kind, c0, c1, c2, body @ ..] = tag else {
            return match tag.first() {
                // An AVC end-of-sequence may come without a body.
                Some(h) if h & 0x0f == FLV_AVC => Ok(Vec::new()),
                Some(_) => Err(video_codec(tag[0])),
                None => Ok(Vec::new()),
            };
        };
        if head & 0x80 != 0 {
            // Enhanced RTMP (HEVC, AV1, VP9 by FourCC).
            let fourcc = body_fourcc(tag);
            return Err(FlvError::Codec(format!("enhanced RTMP video {fourcc:?}")));
        }
        if head & 0x0f != FLV_AVC {
            return Err(video_codec(*head));
        }
        if head >> 4 == 5 || self.audio_only {
            // A video info or command frame (no picture), or video in a
            // stream its metadata said was audio alone.
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        match kind {
            0 => {
                let avcc = parse_avcc(body)?;
                if self.avcc.as_ref() != Some(&avcc) {
                    self.flush_all(&mut out)?;
                    self.avcc = Some(avcc);
                    self.init_written = false;
                }
            }
            1 => {
                if body.len() > MAX_FRAME {
                    return Err(too_large("frame", body.len(), MAX_FRAME));
                }
                if self.avcc.is_none() {
                    // Before its decoder configuration: nothing could decode it.
                    return self.wait(ts);
                }
                let key = head >> 4 == 1;
                let cto = (i32::from(*c0) << 24 | i32::from(*c1) << 16 | i32::from(*c2) << 8) >> 8;
                let ms = self.video_clock.extend(ts);
                let dts = match self.last_dts {
                    Some(last) => ms.max(last.saturating_add(1)),
                    None => ms,
                };
                let no_audio_yet = self.expect_audio && self.aac.is_none() && self.sequence == 0;
                if self.video.is_empty() && !self.init_written && (!key || no_audio_yet) {
                    return self.wait(ts);
                }
                if let Some(first) = self.video.first() {
                    if key || dts >= first.dts.saturating_add(FRAGMENT_MS) {
                        self.flush(dts, &mut out)?;
                    }
                }
                if !self.init_written {
                    out.push(self.init());
                }
                self.last_dts = Some(dts);
                self.push_pending(
                    Sample {
                        dts,
                        cto,
                        key,
                        data: Bytes::copy_from_slice(body),
                    },
                    false,
                )?;
            }
            2 => {}
            _ => return Err(FlvError::Malformed("unknown AVC packet type")),
        }
        Ok(out)
    }

    /// An FLV audio tag's payload at `ts` ms; returns the bytes to publish.
    pub fn audio(&mut self, ts: u32, tag: &[u8]) -> Result<Vec<Bytes>, FlvError> {
        let Some(head) = tag.first() else {
            return Ok(Vec::new());
        };
        if head >> 4 != FLV_AAC {
            return Err(FlvError::Codec(format!("FLV sound format {}", head >> 4)));
        }
        let mut out = Vec::new();
        match tag.get(1) {
            Some(0) => {
                let aac = parse_asc(&tag[2..])?;
                if self.aac.as_ref() != Some(&aac) {
                    self.flush_all(&mut out)?;
                    self.aac = Some(aac);
                    self.next_audio = None;
                    self.init_written = false;
                }
            }
            Some(1) => {
                let body = &tag[2..];
                if body.len() > MAX_FRAME {
                    return Err(too_large("frame", body.len(), MAX_FRAME));
                }
                let Some(aac) = &self.aac else {
                    // Before its AudioSpecificConfig: nothing could decode it.
                    return self.wait(ts);
                };
                let rate = u64::from(aac.rate);
                let ms = self.audio_clock.extend(ts);
                if self.audio_only && !self.init_written {
                    out.push(self.init());
                } else if self.video.is_empty() && !self.init_written {
                    return self.wait(ts);
                }
                let by_clock =
                    u64::try_from(u128::from(ms) * u128::from(rate) / 1000).unwrap_or(u64::MAX);
                let dts = match self.next_audio {
                    Some(next) if by_clock.abs_diff(next) <= AUDIO_RESYNC_MS * rate / 1000 => next,
                    // A new track, or a jump in the publisher's clock.
                    _ => by_clock.max(self.next_audio.unwrap_or(0)),
                };
                self.next_audio = Some(dts.saturating_add(AAC_FRAME));
                if self.init_has_audio {
                    self.push_pending(
                        Sample {
                            dts,
                            cto: 0,
                            key: true,
                            data: Bytes::copy_from_slice(body),
                        },
                        true,
                    )?;
                }
                let first = self.audio.first().map_or(dts, |s| s.dts);
                let span = dts.saturating_add(AAC_FRAME).saturating_sub(first);
                if self.audio_only && span >= FRAGMENT_MS * rate / 1000 {
                    self.flush_audio(&mut out);
                }
            }
            Some(_) => return Err(FlvError::Malformed("unknown AAC packet type")),
            None => {}
        }
        Ok(out)
    }

    /// The publisher is done: the bytes of the frames still waiting.
    pub fn finish(&mut self) -> Result<Vec<Bytes>, FlvError> {
        let mut out = Vec::new();
        self.flush_all(&mut out)?;
        Ok(out)
    }

    /// A frame at `ts` ms dropped while waiting for the first keyframe.
    fn wait(&mut self, ts: u32) -> Result<Vec<Bytes>, FlvError> {
        self.waited += 1;
        let since = *self.waiting_since.get_or_insert(ts);
        // A step back of the clock is not waiting longer.
        let waited_ms = i64::from(ts.wrapping_sub(since) as i32);
        if self.waited > MAX_WAIT_FRAMES || waited_ms > i64::from(MAX_WAIT_MS) {
            return Err(FlvError::NoKeyframe);
        }
        Ok(Vec::new())
    }

    fn push_pending(&mut self, s: Sample, audio: bool) -> Result<(), FlvError> {
        self.pending_bytes += s.data.len();
        if self.pending_bytes > MAX_PENDING {
            return Err(too_large("pending", self.pending_bytes, MAX_PENDING));
        }
        if audio {
            self.audio.push(s);
        } else {
            self.video.push(s);
        }
        Ok(())
    }

    /// Cuts what is waiting at video decode time `end`: the video frames and
    /// the audio frames that start before `end`.
    fn flush(&mut self, end: u64, out: &mut Vec<Bytes>) -> Result<(), FlvError> {
        self.flush_to(end, end, out)
    }

    /// [`Remuxer::flush`], with the audio cut at `audio_end` ms.
    fn flush_to(&mut self, end: u64, audio_end: u64, out: &mut Vec<Bytes>) -> Result<(), FlvError> {
        if self.video.is_empty() {
            return Ok(());
        }
        let rate = self.aac.as_ref().map_or(1, |a| u64::from(a.rate));
        let cut = self
            .audio
            .iter()
            .position(|a| u128::from(a.dts) * 1000 >= u128::from(audio_end) * u128::from(rate))
            .unwrap_or(self.audio.len());
        let audio: Vec<Sample> = self.audio.drain(..cut).collect();
        let video = std::mem::take(&mut self.video);
        self.pending_bytes = self.audio.iter().map(|s| s.data.len()).sum();
        self.sequence += 1;
        out.push(fragment(self.sequence, &video, end, &audio));
        Ok(())
    }

    /// Cuts the audio waiting into a fragment of its own (audio-only streams).
    fn flush_audio(&mut self, out: &mut Vec<Bytes>) {
        if self.audio.is_empty() {
            return;
        }
        let audio = std::mem::take(&mut self.audio);
        self.pending_bytes = 0;
        self.sequence += 1;
        out.push(fragment(self.sequence, &[], 0, &audio));
    }

    /// Cuts everything waiting, guessing the last frame's duration from the
    /// one before it; the audio goes with the last video.
    fn flush_all(&mut self, out: &mut Vec<Bytes>) -> Result<(), FlvError> {
        if self.audio_only {
            self.flush_audio(out);
            return Ok(());
        }
        let Some(last) = self.video.last() else {
            self.audio.clear();
            self.pending_bytes = 0;
            return Ok(());
        };
        let step = match self.video.len() {
            n if n >= 2 => last.dts - self.video[n - 2].dts,
            _ => 33,
        };
        let end = last.dts.saturating_add(step.max(1));
        self.flush_to(end, u64::MAX, out)?;
        self.audio.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// The init segment for the configuration in force.
    fn init(&mut self) -> Bytes {
        self.init_written = true;
        self.waited = 0;
        self.waiting_since = None;
        self.init_has_audio = self.aac.is_some();
        self.audio.clear();
        let avcc = self.avcc.as_deref().filter(|_| !self.audio_only);
        init_segment(avcc, self.size, self.aac.as_ref())
    }
}

/// The tags of an FLV file, in order: (type, timestamp ms, payload), type 8
/// for audio, 9 for video, 18 for script data. They are what RTMP carries in
/// its messages, so a file can stand in for an encoder (tests, the ingest
/// bench). Reading stops at a tag that overruns the file.
pub fn file_tags(flv: &[u8]) -> Vec<(u8, u32, &[u8])> {
    let header = flv.get(5..9).and_then(|h| <[u8; 4]>::try_from(h).ok());
    let Some(header) = header else {
        return Vec::new();
    };
    let mut at = (u32::from_be_bytes(header) as usize).saturating_add(4);
    let mut out = Vec::new();
    while let Some(h) = flv.get(at..at.saturating_add(11)) {
        let size = usize::from(h[1]) << 16 | usize::from(h[2]) << 8 | usize::from(h[3]);
        let ts = u32::from_be_bytes([h[7], h[4], h[5], h[6]]);
        let Some(body) = flv.get(at + 11..at + 11 + size) else {
            break;
        };
        out.push((h[0], ts, body));
        at += 11 + size + 4;
    }
    out
}

fn video_codec(head: u8) -> FlvError {
    let name = match head & 0x0f {
        2 => "Sorenson H.263".to_owned(),
        3 => "screen video".to_owned(),
        4 | 5 => "VP6".to_owned(),
        6 => "screen video 2".to_owned(),
        12 => "HEVC (FLV codec id 12)".to_owned(),
        id => format!("FLV video codec {id}"),
    };
    FlvError::Codec(name)
}

fn body_fourcc(tag: &[u8]) -> String {
    tag.get(1..5)
        .map(|f| {
            f.iter()
                .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
                .collect()
        })
        .unwrap_or_default()
}

fn too_large(what: &'static str, size: usize, limit: usize) -> FlvError {
    FlvError::TooLarge { what, size, limit }
}

/// Checks an `AVCDecoderConfigurationRecord` enough for a browser to take it:
/// version 1, 4-byte NAL lengths' worth of header, at least one SPS.
fn parse_avcc(b: &[u8]) -> Result<Bytes, FlvError> {
    const BAD: FlvError = FlvError::Malformed("AVCDecoderConfigurationRecord");
    if b.len() < 7 || b[0] != 1 || b[5] & 0x1f == 0 {
        return Err(BAD);
    }
    if b.len() > 64 * 1024 {
        return Err(too_large("AVC configuration", b.len(), 64 * 1024));
    }
    // The first SPS must fit.
    let sps = usize::from(u16::from_be_bytes([b[6], *b.get(7).ok_or(BAD)?]));
    if b.len() < 8 + sps {
        return Err(BAD);
    }
    Ok(Bytes::copy_from_slice(b))
}

/// Reads an `AudioSpecificConfig`: the sample rate and channels.
fn parse_asc(b: &[u8]) -> Result<Aac, FlvError> {
    const BAD: FlvError = FlvError::Malformed("AudioSpecificConfig");
    const RATES: [u32; 13] = [
        96_000, 88_200, 64_000, 48_000, 44_100, 32_000, 24_000, 22_050, 16_000, 12_000, 11_025,
        8_000, 7_350,
    ];
    if b.len() < 2 || b.len() > 64 {
        return Err(BAD);
    }
    let bits = u64::from_be_bytes({
        let mut w = [0u8; 8];
        let n = b.len().min(8);
        w[..n].copy_from_slice(&b[..n]);
        w
    });
    let take = |at: u32, n: u32| ((bits << at) >> (64 - n)) as u32;
    let mut at = 5;
    if take(0, 5) == 31 {
        at += 6;
    }
    let index = take(at, 4);
    at += 4;
    let rate = if index == 15 {
        at += 24;
        take(at - 24, 24)
    } else {
        *RATES.get(index as usize).ok_or(BAD)?
    };
    if !(1..=192_000).contains(&rate) || b.len() * 8 < (at + 4) as usize {
        return Err(BAD);
    }
    let channels = match take(at, 4) {
        0 => 2, // Given in a program config element: stereo is the usual case.
        7 => 8,
        c @ 1..=6 => c as u16,
        _ => 2,
    };
    Ok(Aac {
        config: Bytes::copy_from_slice(b),
        rate,
        channels,
    })
}

/// Writes a box: its size and type, then what `body` puts.
fn bx(out: &mut BytesMut, kind: &[u8; 4], body: impl FnOnce(&mut BytesMut)) {
    let at = out.len();
    out.put_u32(0);
    out.put_slice(kind);
    body(out);
    let size = u32::try_from(out.len() - at).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&size.to_be_bytes());
}

/// Writes a full box: version and flags first.
fn full(
    out: &mut BytesMut,
    kind: &[u8; 4],
    version: u8,
    flags: u32,
    body: impl FnOnce(&mut BytesMut),
) {
    bx(out, kind, |o| {
        o.put_u32(u32::from(version) << 24 | flags);
        body(o);
    });
}

const MATRIX: [u32; 9] = [0x0001_0000, 0, 0, 0, 0x0001_0000, 0, 0, 0, 0x4000_0000];

/// The init segment: a video track with `avcc` (none for audio alone) and an
/// audio track with `aac`.
fn init_segment(avcc: Option<&[u8]>, (w, h): (u16, u16), aac: Option<&Aac>) -> Bytes {
    let mut o = BytesMut::with_capacity(1024 + avcc.map_or(0, <[u8]>::len));
    bx(&mut o, b"ftyp", |o| {
        o.put_slice(b"isom");
        o.put_u32(0x200);
        for brand in [b"isom", b"iso6", b"avc1", b"mp41"] {
            o.put_slice(brand);
        }
    });
    bx(&mut o, b"moov", |o| {
        full(o, b"mvhd", 0, 0, |o| {
            o.put_u64(0); // creation and modification times
            o.put_u32(1000);
            o.put_u32(0); // duration: unknown, live
            o.put_u32(0x0001_0000); // rate 1.0
            o.put_u16(0x0100); // volume 1.0
            o.put_bytes(0, 10);
            MATRIX.iter().for_each(|&m| o.put_u32(m));
            o.put_bytes(0, 24);
            o.put_u32(AUDIO + 1);
        });
        if let Some(avcc) = avcc {
            trak(
                o,
                VIDEO,
                VIDEO_SCALE,
                (w, h),
                |o| {
                    full(o, b"vmhd", 0, 1, |o| o.put_bytes(0, 8));
                },
                |o| {
                    bx(o, b"avc1", |o| {
                        o.put_bytes(0, 6);
                        o.put_u16(1); // data reference index
                        o.put_bytes(0, 16);
                        o.put_u16(w);
                        o.put_u16(h);
                        o.put_u32(0x0048_0000); // 72 dpi
                        o.put_u32(0x0048_0000);
                        o.put_u32(0);
                        o.put_u16(1); // frame count
                        o.put_bytes(0, 32); // compressor name
                        o.put_u16(0x18); // depth
                        o.put_i16(-1);
                        bx(o, b"avcC", |o| o.put_slice(avcc));
                    });
                },
            );
        }
        if let Some(a) = aac {
            trak(
                o,
                AUDIO,
                a.rate,
                (0, 0),
                |o| {
                    full(o, b"smhd", 0, 0, |o| o.put_u32(0));
                },
                |o| {
                    bx(o, b"mp4a", |o| {
                        o.put_bytes(0, 6);
                        o.put_u16(1);
                        o.put_bytes(0, 8);
                        o.put_u16(a.channels);
                        o.put_u16(16);
                        o.put_u32(0);
                        o.put_u32(a.rate.min(65_535) << 16);
                        full(o, b"esds", 0, 0, |o| esds(o, &a.config));
                    });
                },
            );
        }
        bx(o, b"mvex", |o| {
            let tracks = [(VIDEO, avcc.is_some()), (AUDIO, aac.is_some())];
            for (id, _) in tracks.into_iter().filter(|t| t.1) {
                full(o, b"trex", 0, 0, |o| {
                    o.put_u32(id);
                    o.put_u32(1);
                    o.put_u64(0); // default duration and size
                    o.put_u32(0);
                });
            }
        });
    });
    o.freeze()
}

/// An `ES_Descriptor` for AAC with its `AudioSpecificConfig` (at most 64
/// bytes, so every length fits one byte).
fn esds(o: &mut BytesMut, asc: &[u8]) {
    let n = asc.len() as u8;
    o.put_slice(&[3, 23 + n, 0, 0, 0]); // ES_Descriptor: id 0, no flags
    o.put_slice(&[4, 15 + n, 0x40, 0x15, 0, 0, 0]); // AAC, audio stream
    o.put_u32(0); // max bitrate
    o.put_u32(0); // average bitrate
    o.put_slice(&[5, n]);
    o.put_slice(asc);
    o.put_slice(&[6, 1, 2]); // SLConfigDescriptor: MP4
}

fn trak(
    o: &mut BytesMut,
    id: u32,
    timescale: u32,
    (w, h): (u16, u16),
    header: impl FnOnce(&mut BytesMut),
    entry: impl FnOnce(&mut BytesMut),
) {
    let video = id == VIDEO;
    bx(o, b"trak", |o| {
        full(o, b"tkhd", 0, 3, |o| {
            o.put_u64(0);
            o.put_u32(id);
            o.put_u32(0);
            o.put_u32(0); // duration
            o.put_bytes(0, 8);
            o.put_u16(0); // layer
            o.put_u16(0); // alternate group
            o.put_u16(if video { 0 } else { 0x0100 });
            o.put_u16(0);
            MATRIX.iter().for_each(|&m| o.put_u32(m));
            o.put_u32(u32::from(w) << 16);
            o.put_u32(u32::from(h) << 16);
        });
        bx(o, b"mdia", |o| {
            full(o, b"mdhd", 0, 0, |o| {
                o.put_u64(0);
                o.put_u32(timescale);
                o.put_u32(0);
                o.put_u16(0x55c4); // "und"
                o.put_u16(0);
            });
            full(o, b"hdlr", 0, 0, |o| {
                o.put_u32(0);
                o.put_slice(if video { b"vide" } else { b"soun" });
                o.put_bytes(0, 12);
                o.put_slice(if video {
                    b"VideoHandler\0"
                } else {
                    b"SoundHandler\0"
                });
            });
            bx(o, b"minf", |o| {
                header(o);
                bx(o, b"dinf", |o| {
                    full(o, b"dref", 0, 0, |o| {
                        o.put_u32(1);
                        full(o, b"url ", 0, 1, |_| {});
                    });
                });
                bx(o, b"stbl", |o| {
                    full(o, b"stsd", 0, 0, |o| {
                        o.put_u32(1);
                        entry(o);
                    });
                    full(o, b"stts", 0, 0, |o| o.put_u32(0));
                    full(o, b"stsc", 0, 0, |o| o.put_u32(0));
                    full(o, b"stsz", 0, 0, |o| o.put_u64(0));
                    full(o, b"stco", 0, 0, |o| o.put_u32(0));
                });
            });
        });
    });
}

/// One fragment: the video frames (the last one lasting until `end`) and
/// the audio frames, in one `moof` and one `mdat` (a track without frames
/// has no `traf`).
fn fragment(sequence: u32, video: &[Sample], end: u64, audio: &[Sample]) -> Bytes {
    let media: usize = video.iter().chain(audio).map(|s| s.data.len()).sum();
    let mut o = BytesMut::with_capacity(256 + 16 * (video.len() + audio.len()) + media);
    // Where each trun's data offset goes, to be set once the moof's size is known.
    let mut offsets = Vec::new();
    bx(&mut o, b"moof", |o| {
        full(o, b"mfhd", 0, 0, |o| o.put_u32(sequence));
        if !video.is_empty() {
            let duration = |i: usize| match video.get(i + 1) {
                Some(next) => next.dts - video[i].dts,
                None => end.saturating_sub(video[i].dts).max(1),
            };
            traf(o, VIDEO, video, duration, &mut offsets);
        }
        if !audio.is_empty() {
            traf(o, AUDIO, audio, |_| AAC_FRAME, &mut offsets);
        }
    });
    let moof = o.len();
    let mut data = moof + 8;
    let runs = [video, audio].into_iter().filter(|s| !s.is_empty());
    for (at, samples) in offsets.iter().zip(runs) {
        let off = u32::try_from(data).unwrap_or(u32::MAX);
        o[*at..at + 4].copy_from_slice(&off.to_be_bytes());
        data += samples.iter().map(|s| s.data.len()).sum::<usize>();
    }
    bx(&mut o, b"mdat", |o| {
        for s in video.iter().chain(audio) {
            o.put_slice(&s.data);
        }
    });
    o.freeze()
}

fn traf(
    o: &mut BytesMut,
    id: u32,
    samples: &[Sample],
    duration: impl Fn(usize) -> u64,
    offsets: &mut Vec<usize>,
) {
    let video = id == VIDEO;
    bx(o, b"traf", |o| {
        full(o, b"tfhd", 0, 0x02_0000, |o| o.put_u32(id)); // default-base-is-moof
        full(o, b"tfdt", 1, 0, |o| {
            o.put_u64(samples.first().map_or(0, |s| s.dts))
        });
        // data offset, durations, sizes, and for video flags and offsets.
        let flags = if video { 0xf01 } else { 0x301 };
        full(o, b"trun", 1, flags, |o| {
            o.put_u32(samples.len() as u32);
            offsets.push(o.len());
            o.put_u32(0);
            for (i, s) in samples.iter().enumerate() {
                o.put_u32(u32::try_from(duration(i)).unwrap_or(u32::MAX));
                o.put_u32(s.data.len() as u32);
                if video {
                    o.put_u32(if s.key { SYNC } else { NON_SYNC });
                    o.put_i32(s.cto);
                }
            }
        });
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::fmp4::{self, Item};

    /// `tests/fixtures/small.flv` (see `make-fixtures.sh`): 3 s of 25-fps
    /// H.264 with B-frames and a keyframe a second, and 44.1-kHz AAC.
    const FIXTURE: &[u8] = include_bytes!("../../tests/fixtures/small.flv");

    /// Feeds tags to a remuxer, shifting their timestamps by `shift` ms.
    fn remux(tags: &[(u8, u32, &[u8])], shift: u32) -> Result<Vec<Bytes>, FlvError> {
        let mut r = Remuxer::new();
        r.set_size(160, 90);
        let mut out = Vec::new();
        for &(kind, ts, body) in tags {
            let ts = ts.wrapping_add(shift);
            match kind {
                8 => out.extend(r.audio(ts, body)?),
                9 => out.extend(r.video(ts, body)?),
                _ => {}
            }
        }
        out.extend(r.finish()?);
        Ok(out)
    }

    fn fragments(items: &[Item]) -> Vec<&fmp4::Fragment> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Fragment(f) => Some(f),
                Item::Init(_) => None,
            })
            .collect()
    }

    #[test]
    fn an_rtmp_publish_becomes_fragments_on_one_timeline() {
        let tags = file_tags(FIXTURE);
        let frames = tags
            .iter()
            .filter(|t| t.0 == 9 && t.2.get(1) == Some(&1))
            .count();
        assert_eq!(frames, 75, "3 s at 25 fps in the fixture");
        let out = remux(&tags, 0).expect("remuxes");
        let mut parser = fmp4::Fmp4Parser::new();
        let items: Vec<Item> = out
            .iter()
            .flat_map(|b| parser.push(b).expect("the splitter takes it"))
            .collect();
        parser.finish().expect("ends cleanly");
        assert!(matches!(items[0], Item::Init(_)), "the init first");
        let tracks = parser.tracks();
        assert_eq!(
            tracks
                .iter()
                .map(|t| (t.id, t.timescale, t.video))
                .collect::<Vec<_>>(),
            [(VIDEO, 1000, true), (AUDIO, 44_100, false)]
        );
        let frags = fragments(&items);
        // Cut at each keyframe (0, 1, 2 s) and at the first frame 500 ms or
        // more into each second (frames are 40 ms apart).
        assert_eq!(
            frags
                .iter()
                .map(|f| (f.media_time, f.keyframe))
                .collect::<Vec<_>>(),
            [
                (0, true),
                (520, false),
                (1000, true),
                (1520, false),
                (2000, true),
                (2520, false)
            ]
        );
        // Each track's fragments follow each other with no gap or overlap.
        for track in [VIDEO, AUDIO] {
            let times: Vec<_> = frags
                .iter()
                .filter_map(|f| f.tracks.iter().find(|t| t.track_id == track))
                .collect();
            assert_eq!(times.len(), frags.len(), "track {track} in every fragment");
            for w in times.windows(2) {
                assert_eq!(w[0].base + w[0].duration, w[1].base, "track {track}: {w:?}");
            }
        }
        let video: u64 = frags.iter().map(|f| f.duration.expect("video")).sum();
        assert_eq!(video, 3000, "75 frames of 40 ms");
    }

    #[test]
    fn timestamps_past_the_32_bit_wrap_keep_increasing() {
        let tags = file_tags(FIXTURE);
        // Starts 1.5 s before the wrap of the 32-bit millisecond clock.
        let out = remux(&tags, u32::MAX - 1_499).expect("remuxes");
        let items = fmp4::split(out.iter().map(|b| &b[..])).expect("splits");
        let times: Vec<u64> = fragments(&items).iter().map(|f| f.media_time).collect();
        let start = u64::from(u32::MAX - 1_499);
        assert_eq!(times.first(), Some(&start));
        assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
        assert_eq!(times.last(), Some(&(start + 2_520)));
    }

    #[test]
    fn frames_before_the_first_keyframe_are_dropped_and_a_new_configuration_writes_a_new_init() {
        let tags = file_tags(FIXTURE);
        let config = tags
            .iter()
            .position(|t| t.0 == 9 && t.2[1] == 0)
            .expect("avcC");
        let first_key = tags
            .iter()
            .position(|t| t.0 == 9 && t.2[1] == 1)
            .expect("a frame");
        // Joined past the first keyframe: nothing until the keyframe at 1 s.
        let mut late: Vec<_> = tags[..first_key].to_vec();
        late.extend(tags.iter().copied().filter(|t| t.1 >= 200));
        let items =
            fmp4::split(remux(&late, 0).expect("remuxes").iter().map(|b| &b[..])).expect("splits");
        assert_eq!(fragments(&items)[0].media_time, 1000);
        assert!(fragments(&items)[0].keyframe);
        // A second, different decoder configuration at 1.5 s.
        let mut changed = tags.clone();
        let mut avcc = tags[config].2.to_vec();
        avcc[5 + 3] ^= 1; // another level (after the tag's 5-byte header)
        let at = tags.iter().position(|t| t.1 >= 1500).expect("1.5 s");
        changed.insert(at, (9, 1500, &avcc));
        let items = fmp4::split(remux(&changed, 0).expect("remuxes").iter().map(|b| &b[..]))
            .expect("splits");
        let inits = items.iter().filter(|i| matches!(i, Item::Init(_))).count();
        assert_eq!(inits, 2, "a new init for the new configuration");
        // The frames after the change wait for the next keyframe, at 2 s.
        let times: Vec<u64> = fragments(&items).iter().map(|f| f.media_time).collect();
        assert_eq!(times, [0, 520, 1000, 2000, 2520]);
    }

    #[test]
    fn audio_named_in_the_metadata_is_in_the_first_init() {
        let mut tags = file_tags(FIXTURE);
        let asc = tags
            .iter()
            .position(|t| t.0 == 8 && t.2[1] == 0)
            .expect("ASC");
        // The audio configuration comes late, after the first frames.
        let asc = tags.remove(asc);
        let at = tags.iter().position(|t| t.1 >= 200).expect("200 ms");
        tags.insert(at, asc);
        for expected in [true, false] {
            let mut r = Remuxer::new();
            r.set_audio_expected(expected);
            let mut out = Vec::new();
            for &(kind, ts, body) in &tags {
                match kind {
                    8 => out.extend(r.audio(ts, body).expect("audio")),
                    9 => out.extend(r.video(ts, body).expect("video")),
                    _ => {}
                }
            }
            let mut parser = fmp4::Fmp4Parser::new();
            let first = parser.push(&out[0]).expect("an init");
            assert!(matches!(first.as_slice(), [Item::Init(_)]));
            let tracks = parser.tracks().len();
            let items = fmp4::split(out.iter().map(|b| &b[..])).expect("splits");
            let start = fragments(&items)[0].media_time;
            if expected {
                assert_eq!((tracks, start), (2, 1000), "waits for the audio");
            } else {
                assert_eq!((tracks, start), (1, 0), "starts on the video alone");
            }
        }
    }

    #[test]
    fn a_stream_of_audio_alone_is_cut_every_half_second() {
        let tags = file_tags(FIXTURE);
        let mut r = Remuxer::new();
        r.set_audio_only(true);
        let mut out = Vec::new();
        // Video tags too: a stream announced as audio alone ignores them.
        for &(kind, ts, body) in &tags {
            match kind {
                8 => out.extend(r.audio(ts, body).expect("audio")),
                9 => out.extend(r.video(ts, body).expect("video ignored")),
                _ => {}
            }
        }
        out.extend(r.finish().expect("finish"));
        let mut parser = fmp4::Fmp4Parser::new();
        let items: Vec<Item> = out
            .iter()
            .flat_map(|b| parser.push(b).expect("the splitter takes it"))
            .collect();
        let tracks: Vec<_> = parser
            .tracks()
            .iter()
            .map(|t| (t.timescale, t.video))
            .collect();
        assert_eq!(tracks, [(44_100, false)], "one audio track");
        let frags = fragments(&items);
        assert_eq!(frags.len(), 6, "3 s in 500-ms fragments");
        assert!(
            frags.iter().all(|f| f.keyframe),
            "every audio fragment is a start"
        );
        for w in frags.windows(2) {
            let (a, b) = (&w[0].tracks[0], &w[1].tracks[0]);
            assert_eq!(a.base + a.duration, b.base, "no gap");
            assert!(a.duration * 1000 >= 500 * 44_100, "at least 500 ms: {a:?}");
        }
    }

    #[test]
    fn other_codecs_and_bad_tags_get_typed_errors() {
        let mut r = Remuxer::new();
        // Sorenson H.263, VP6, HEVC by FLV id 12, enhanced RTMP's FourCC.
        for tag in [
            &[0x12u8, 0][..],
            &[0x14, 0],
            &[0x1c, 0, 0, 0, 0],
            b"\x90hvc1xx",
        ] {
            assert!(
                matches!(r.video(0, tag), Err(FlvError::Codec(_))),
                "{tag:?}"
            );
        }
        // MP3 audio.
        assert!(matches!(r.audio(0, &[0x2f, 0]), Err(FlvError::Codec(_))));
        assert_eq!(
            r.video(0, &[0x17, 1, 0, 0, 0, 0, 0, 0, 1]),
            Ok(Vec::new()),
            "a frame before its configuration is dropped"
        );
        assert!(
            matches!(
                r.video(0, &[0x17, 0, 0, 0, 0, 2, 0x64]),
                Err(FlvError::Malformed(_))
            ),
            "a bad AVCDecoderConfigurationRecord"
        );
        assert!(matches!(
            r.audio(0, &[0xaf, 0, 0xff]),
            Err(FlvError::Malformed(_))
        ));
        assert_eq!(
            r.audio(0, &[0xaf, 1, 0, 0]),
            Ok(Vec::new()),
            "audio before its configuration is dropped"
        );
    }

    #[test]
    fn a_stream_without_keyframes_is_refused_in_bounded_time() {
        let tags = file_tags(FIXTURE);
        let mut r = Remuxer::new();
        for &(kind, ts, body) in tags.iter().filter(|t| t.0 == 9 && t.2[1] == 0) {
            assert_eq!(kind, 9);
            r.video(ts, body).expect("the configuration");
        }
        let inter = tags
            .iter()
            .find(|t| t.0 == 9 && t.2[0] >> 4 == 2)
            .expect("an inter frame");
        // Frames 40 ms apart: refused past 20 s of the publisher's clock.
        let mut refused_at = None;
        for i in 0..=MAX_WAIT_FRAMES as u32 {
            if r.video(i * 40, inter.2) == Err(FlvError::NoKeyframe) {
                refused_at = Some(i * 40);
                break;
            }
        }
        assert_eq!(refused_at, Some(MAX_WAIT_MS + 40));
        // Frames with one timestamp (a stuck clock): refused past 2,000 frames.
        let mut r = Remuxer::new();
        let mut refused_at = None;
        for i in 0..=MAX_WAIT_FRAMES {
            if r.video(7, inter.2) == Err(FlvError::NoKeyframe) {
                refused_at = Some(i);
                break;
            }
        }
        assert_eq!(refused_at, Some(MAX_WAIT_FRAMES));
        // Audio alone, without metadata that says so: refused at 20 s too,
        // before the ingest idle timeout.
        let mut r = Remuxer::new();
        let audio: Vec<_> = tags.iter().filter(|t| t.0 == 8).collect();
        let (config, frame) = (audio[0].2, audio[1].2);
        r.audio(0, config).expect("the configuration");
        let mut refused_at = None;
        for i in 0..2_000u32 {
            if r.audio(i * 23, frame) == Err(FlvError::NoKeyframe) {
                refused_at = Some(i * 23);
                break;
            }
        }
        assert_eq!(refused_at, Some((MAX_WAIT_MS / 23 + 1) * 23));
    }

    proptest::proptest! {
        #[test]
        fn any_tags_never_panic(
            tags in proptest::collection::vec(
                (proptest::bool::ANY, proptest::num::u32::ANY, proptest::collection::vec(proptest::num::u8::ANY, 0..64)),
                0..64,
            )
        ) {
            let mut r = Remuxer::new();
            for (video, ts, body) in tags {
                let _ = if video { r.video(ts, &body) } else { r.audio(ts, &body) };
            }
            let _ = r.finish();
        }

        /// Whatever clock a publisher sends, the output is fragmented MP4
        /// the splitter takes, with decode times that only go forward.
        #[test]
        fn any_timestamps_give_valid_fragments(
            clock in proptest::collection::vec(proptest::num::u32::ANY, 1..300)
        ) {
            let tags: Vec<_> = file_tags(FIXTURE)
                .into_iter()
                .zip(clock.iter().cycle())
                .map(|((kind, _, body), &ts)| (kind, ts, body))
                .collect();
            let out = remux(&tags, 0).expect("the fixture's tags remux");
            let items = fmp4::split(out.iter().map(|b| &b[..])).expect("splits");
            let times: Vec<u64> = fragments(&items).iter().map(|f| f.media_time).collect();
            proptest::prop_assert!(times.windows(2).all(|w| w[0] < w[1]), "{:?}", times);
        }

        #[test]
        fn corrupted_fixture_tags_never_panic(at in 0usize..60_000, byte in proptest::num::u8::ANY) {
            let mut flv = FIXTURE.to_vec();
            let at = at % flv.len();
            flv[at] = byte;
            // Only the payloads are corrupted: the file's framing is the test's.
            let clean = file_tags(FIXTURE);
            let mut r = Remuxer::new();
            let mut offset = 0;
            for (kind, ts, body) in clean {
                let start = body.as_ptr() as usize - FIXTURE.as_ptr() as usize;
                let bad = &flv[start..start + body.len()];
                offset += 1;
                let _ = match kind {
                    8 => r.audio(ts, bad),
                    9 => r.video(ts, bad),
                    _ => Ok(Vec::new()),
                };
            }
            let _ = (r.finish(), offset);
        }
    }
}
