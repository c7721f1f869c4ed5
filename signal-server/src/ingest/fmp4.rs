//! Incremental fragmented-MP4 (CMAF) splitter.
//!
//! Bytes arrive in arbitrary chunks from a chunked HTTP body. [`Fmp4Parser::push`]
//! frames top-level boxes as they complete and yields:
//! - [`Item::Init`]: `ftyp` + `moov`, the init segment a SourceBuffer needs;
//! - [`Item::Fragment`]: an optional `styp`, then `moof` + `mdat`.
//!
//! Every other top-level box (`free`, `skip`, `uuid`, `sidx`, `mfra`, `prft`,
//! `emsg`, ...) is skipped as it streams past, without being buffered: MSE does
//! not need them and some players choke on them.
//!
//! Only top-level boxes are framed here; inside `moov` and `moof` the few fields
//! clubcast needs are read directly: each track's id, timescale and handler, and
//! per fragment each track's `tfdt` (and its byte offset, so the demo source can
//! rewrite it in place), its duration, and whether the video track starts with a
//! sync sample. A box-tree crate such as `mp4-atom` decodes whole boxes into
//! owned structs and re-encodes them, which is more than this splitter needs, does
//! not give the byte offsets the in-place rewrite needs, and would widen the
//! surface exposed to untrusted input.
//!
//! Keyframes: a fragment starts with a keyframe when its video track's first
//! sample has `sample_is_non_sync_sample == 0`, taking the sample's flags from
//! trun `first_sample_flags`, else the trun's per-sample flags, else tfhd
//! `default_sample_flags`, else the `trex` defaults of the init segment. `trex` is
//! mandatory in a fragmented file, so the flags are always known for a
//! conforming stream; ffmpeg's `frag_keyframe` layout sets `first_sample_flags`.
//! A fragment with no video `traf` in a stream that has video is never a
//! keyframe; in an audio-only stream every fragment is.
//!
//! Bounds: a top-level box is at most [`MAX_BOX`], the init segment at most
//! [`MAX_INIT`], and a buffered fragment (styp + moof + mdat) at most
//! [`MAX_FRAGMENT`]. Each is checked from the box header, before the box is
//! buffered. Nothing here panics on input; [`split`] is the pure entry point for
//! the property tests below and the `fmp4_split` cargo-fuzz target
//! (`fuzz/fuzz_targets/fmp4_split.rs`), which builds this file on its own: it
//! must keep depending on nothing but `bytes` and `thiserror`.

use bytes::{Buf, Bytes, BytesMut};

/// Largest top-level box accepted (a fragment's `mdat` included).
pub const MAX_BOX: u64 = 16 * 1024 * 1024;
/// Largest init segment (`ftyp` + `moov`) accepted.
pub const MAX_INIT: usize = 1024 * 1024;
/// Largest fragment (`styp` + `moof` + `mdat`) buffered before it is published.
pub const MAX_FRAGMENT: usize = 24 * 1024 * 1024;
/// Most tracks per stream.
pub const MAX_TRACKS: usize = 8;
/// Most child boxes read from one container.
const MAX_CHILDREN: usize = 4096;

/// `sample_is_non_sync_sample` in ISO BMFF sample flags.
const NON_SYNC: u32 = 0x0001_0000;

/// Errors of the splitter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Fmp4Error {
    /// The stream does not start like an MP4 file.
    #[error("not an MP4 stream: first box is {0:?}")]
    NotMp4(String),
    /// A box, the init segment or a fragment is over its limit.
    #[error("{kind:?} of {size} bytes is over the limit of {limit}")]
    TooLarge {
        /// The box type, or `init` / `fragment`.
        kind: String,
        /// Its declared size.
        size: u64,
        /// The limit it broke.
        limit: u64,
    },
    /// The stream ended inside a box or between a `moof` and its `mdat`.
    #[error("stream ended inside a box ({0} bytes left over)")]
    Truncated(usize),
    /// The stream ended before an init segment.
    #[error("stream ended before an init segment (ftyp + moov)")]
    NoInit,
    /// A fragment came before the init segment.
    #[error("fragment before the init segment (ftyp + moov)")]
    FragmentBeforeInit,
    /// A box is malformed.
    #[error("malformed MP4: {0}")]
    Malformed(&'static str),
}

/// A track of the init segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Track {
    /// `track_ID`.
    pub id: u32,
    /// Media timescale (units per second).
    pub timescale: u32,
    /// Whether it is a video track (`hdlr` `vide`).
    pub video: bool,
    /// `trex` default sample duration.
    default_duration: u32,
    /// `trex` default sample flags.
    default_flags: u32,
}

/// Where one track's decode time sits in a fragment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TrackTime {
    /// `track_ID`.
    pub track_id: u32,
    /// `baseMediaDecodeTime`, in the track's timescale.
    pub base: u64,
    /// Sum of the fragment's sample durations for the track.
    pub duration: u64,
    /// Byte offset of the `baseMediaDecodeTime` field in the fragment bytes.
    pub tfdt_offset: usize,
    /// Whether the field is 64-bit (`tfdt` version 1).
    pub wide: bool,
}

/// One fragment: optional `styp`, `moof` and `mdat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// The bytes, as appended to a SourceBuffer.
    pub bytes: Bytes,
    /// Decode time of the fragment in [`Fragment::timescale`]: the video track's
    /// `tfdt` (or the first track's in a stream without video). A fragment that
    /// lacks that track takes its first `traf`'s time, converted, so block media
    /// times stay on one timeline.
    pub media_time: u64,
    /// Timescale of `media_time` and `duration`: the video track's, else the
    /// first track's.
    pub timescale: u32,
    /// Duration of the reference track's samples, if the fragment has them.
    pub duration: Option<u64>,
    /// Whether the fragment starts with a video sync sample (see module docs).
    pub keyframe: bool,
    /// Per-track timing.
    pub tracks: Vec<TrackTime>,
    /// Byte offset of the `mfhd` `sequence_number` in `bytes`, if present.
    pub sequence_offset: Option<usize>,
}

/// What the splitter produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The init segment.
    Init(Bytes),
    /// A media fragment.
    Fragment(Fragment),
}

/// What happens to a top-level box once it is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Keep,
    Skip,
}

/// Incremental splitter; see the module docs.
#[derive(Debug, Default)]
pub struct Fmp4Parser {
    buf: BytesMut,
    /// Bytes of a skipped box still to discard.
    skip: u64,
    /// `ftyp` of the init segment being assembled.
    ftyp: Option<Bytes>,
    tracks: Vec<Track>,
    have_init: bool,
    /// `styp` of the fragment being assembled.
    styp: Option<Bytes>,
    moof: Option<Bytes>,
    started: bool,
}

/// Splits a whole stream given as chunks: the pure entry point for property
/// tests and fuzzing. Checks that the stream ends cleanly.
pub fn split<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<Item>, Fmp4Error> {
    let mut p = Fmp4Parser::new();
    let mut items = Vec::new();
    for c in chunks {
        items.extend(p.push(c)?);
    }
    p.finish()?;
    Ok(items)
}

impl Fmp4Parser {
    /// A splitter at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tracks of the init segment, once it has been seen.
    pub fn tracks(&self) -> &[Track] {
        &self.tracks
    }

    /// Feeds bytes; returns the items they complete. After an error the stream
    /// is unusable and the parser should be dropped.
    pub fn push(&mut self, mut data: &[u8]) -> Result<Vec<Item>, Fmp4Error> {
        if self.skip > 0 {
            let n = usize::try_from(self.skip).map_or(data.len(), |s| s.min(data.len()));
            data = &data[n..];
            self.skip -= n as u64;
        }
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some((kind, size, header)) = self.peek_box()? {
            match self.fate(&kind, size)? {
                Fate::Skip => {
                    let have = self.buf.len() as u64;
                    if have >= size {
                        self.buf.advance(size as usize);
                    } else {
                        self.buf.clear();
                        self.skip = size - have;
                        break;
                    }
                }
                Fate::Keep => {
                    if (self.buf.len() as u64) < size {
                        break;
                    }
                    let boxed = self.buf.split_to(size as usize).freeze();
                    self.handle_box(kind, boxed, header, &mut out)?;
                }
            }
        }
        Ok(out)
    }

    /// Checks that the stream ended on a box boundary, after an init segment
    /// and not between a `moof` and its `mdat`.
    pub fn finish(&self) -> Result<(), Fmp4Error> {
        let left = self.buf.len()
            + self.moof.as_ref().map_or(0, Bytes::len)
            + usize::try_from(self.skip).unwrap_or(usize::MAX);
        if left > 0 {
            return Err(Fmp4Error::Truncated(left));
        }
        if !self.have_init {
            return Err(Fmp4Error::NoInit);
        }
        Ok(())
    }

    /// Type, size and header length of the next box, if its header is here.
    fn peek_box(&mut self) -> Result<Option<([u8; 4], u64, usize)>, Fmp4Error> {
        if self.buf.len() < 8 {
            return Ok(None);
        }
        let size32 = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]);
        let kind = [self.buf[4], self.buf[5], self.buf[6], self.buf[7]];
        if !self.started {
            if !matches!(
                &kind,
                b"ftyp" | b"styp" | b"moov" | b"moof" | b"free" | b"skip" | b"wide" | b"uuid"
            ) {
                return Err(Fmp4Error::NotMp4(printable(&kind)));
            }
            self.started = true;
        }
        if !kind.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
            return Err(Fmp4Error::Malformed(
                "box type is not a four-character code",
            ));
        }
        let (size, header) = match size32 {
            0 => {
                return Err(Fmp4Error::Malformed(
                    "box extends to end of file (size 0), which a live stream cannot use",
                ))
            }
            1 => {
                if self.buf.len() < 16 {
                    return Ok(None);
                }
                let mut b = &self.buf[8..16];
                (b.get_u64(), 16)
            }
            s => (u64::from(s), 8),
        };
        if size < header as u64 {
            return Err(Fmp4Error::Malformed("box smaller than its header"));
        }
        if size > MAX_BOX {
            return Err(too_large(&printable(&kind), size, MAX_BOX));
        }
        Ok(Some((kind, size, header)))
    }

    /// Whether to keep or skip a box, checking the bound it would break.
    fn fate(&self, kind: &[u8; 4], size: u64) -> Result<Fate, Fmp4Error> {
        let lead = self.styp.as_ref().map_or(0, Bytes::len) as u64;
        match kind {
            b"ftyp" | b"styp" if size > MAX_INIT as u64 => {
                Err(too_large(&printable(kind), size, MAX_INIT as u64))
            }
            b"moov" => {
                let total = size + self.ftyp.as_ref().map_or(0, Bytes::len) as u64;
                if total > MAX_INIT as u64 {
                    return Err(too_large("init", total, MAX_INIT as u64));
                }
                Ok(Fate::Keep)
            }
            b"moof" | b"mdat" => {
                let moof = self.moof.as_ref().map_or(0, Bytes::len) as u64;
                let total = lead + moof + size;
                if total > MAX_FRAGMENT as u64 {
                    return Err(too_large("fragment", total, MAX_FRAGMENT as u64));
                }
                Ok(Fate::Keep)
            }
            b"ftyp" | b"styp" => Ok(Fate::Keep),
            _ => Ok(Fate::Skip),
        }
    }

    fn handle_box(
        &mut self,
        kind: [u8; 4],
        boxed: Bytes,
        header: usize,
        out: &mut Vec<Item>,
    ) -> Result<(), Fmp4Error> {
        match &kind {
            b"ftyp" => self.ftyp = Some(boxed),
            b"moov" => {
                self.tracks = parse_moov(&boxed[header..])?;
                self.have_init = true;
                let init = match self.ftyp.take() {
                    Some(ftyp) => {
                        let mut init = BytesMut::with_capacity(ftyp.len() + boxed.len());
                        init.extend_from_slice(&ftyp);
                        init.extend_from_slice(&boxed);
                        init.freeze()
                    }
                    None => boxed,
                };
                out.push(Item::Init(init));
            }
            b"styp" => self.styp = Some(boxed),
            b"moof" => {
                if !self.have_init {
                    return Err(Fmp4Error::FragmentBeforeInit);
                }
                if self.moof.is_some() {
                    return Err(Fmp4Error::Malformed("moof without mdat"));
                }
                self.moof = Some(boxed);
            }
            b"mdat" => {
                let Some(moof) = self.moof.take() else {
                    return Err(Fmp4Error::Malformed("mdat without moof"));
                };
                out.push(Item::Fragment(self.fragment(moof, boxed)?));
            }
            _ => {}
        }
        Ok(())
    }

    fn fragment(&mut self, moof: Bytes, mdat: Bytes) -> Result<Fragment, Fmp4Error> {
        let styp = self.styp.take();
        let lead = styp.as_ref().map_or(0, Bytes::len);
        let mut bytes = BytesMut::with_capacity(lead + moof.len() + mdat.len());
        if let Some(p) = &styp {
            bytes.extend_from_slice(p);
        }
        bytes.extend_from_slice(&moof);
        bytes.extend_from_slice(&mdat);
        let moof_header = if moof.get(..4) == Some(&[0, 0, 0, 1]) {
            16
        } else {
            8
        };
        let parsed = parse_moof(&moof[moof_header..], lead + moof_header, &self.tracks)?;
        let video = self.tracks.iter().find(|t| t.video);
        let reference = video.or(self.tracks.first()).copied();
        let Some(reference) = reference else {
            return Err(Fmp4Error::Malformed("fragment before any track"));
        };
        let own = parsed
            .trafs
            .iter()
            .find(|(t, _)| t.track_id == reference.id);
        let (media_time, duration, keyframe) = match own {
            Some((t, sync)) => (t.base, Some(t.duration), *sync),
            None => {
                let (first, sync) = parsed
                    .trafs
                    .first()
                    .ok_or(Fmp4Error::Malformed("moof without traf"))?;
                let scale = self
                    .tracks
                    .iter()
                    .find(|t| t.id == first.track_id)
                    .map_or(reference.timescale, |t| t.timescale);
                let converted =
                    u128::from(first.base) * u128::from(reference.timescale) / u128::from(scale);
                let converted = u64::try_from(converted).unwrap_or(u64::MAX);
                (converted, None, video.is_none() && *sync)
            }
        };
        Ok(Fragment {
            bytes: bytes.freeze(),
            media_time,
            timescale: reference.timescale,
            duration,
            keyframe,
            tracks: parsed.trafs.into_iter().map(|(t, _)| t).collect(),
            sequence_offset: parsed.sequence_offset,
        })
    }
}

impl Fragment {
    /// Moves the fragment `shift` ticks of [`Fragment::timescale`] along the
    /// timeline, in place: `media_time` by `shift`, and every track's `tfdt`
    /// by the same time in the track's own timescale (from `tracks`, the init
    /// segment's), rounded to the nearest tick, so the tracks stay in step.
    /// Ingest uses it to continue a stream's timeline when a publisher comes
    /// back. Nothing changes if a decode time would fall below zero or
    /// outgrow a 32-bit `tfdt`.
    pub fn shift(&mut self, shift: i64, tracks: &[Track]) -> Result<(), Fmp4Error> {
        if shift == 0 {
            return Ok(());
        }
        const RANGE: Fmp4Error = Fmp4Error::Malformed(
            "a decode time leaves the tfdt's range when the timeline is continued",
        );
        let moved = |v: u64, by: i128| u64::try_from(i128::from(v) + by).map_err(|_| RANGE);
        let media_time = moved(self.media_time, i128::from(shift))?;
        let mut times = self.tracks.clone();
        for t in &mut times {
            let scale = tracks
                .iter()
                .find(|k| k.id == t.track_id)
                .map_or(self.timescale, |k| k.timescale);
            let by = div_round(
                i128::from(shift) * i128::from(scale),
                i128::from(self.timescale.max(1)),
            );
            t.base = moved(t.base, by)?;
            if !t.wide && u32::try_from(t.base).is_err() {
                return Err(RANGE);
            }
        }
        let mut bytes = BytesMut::from(&self.bytes[..]);
        for t in &times {
            let wide = t.base.to_be_bytes();
            let field = if t.wide { &wide[..] } else { &wide[4..] };
            bytes
                .get_mut(t.tfdt_offset..t.tfdt_offset + field.len())
                .ok_or(Fmp4Error::Malformed("tfdt offset outside the fragment"))?
                .copy_from_slice(field);
        }
        self.bytes = bytes.freeze();
        self.media_time = media_time;
        self.tracks = times;
        Ok(())
    }
}

/// `n / d` rounded to the nearest integer, halves away from zero (`d > 0`).
fn div_round(n: i128, d: i128) -> i128 {
    if n >= 0 {
        (n + d / 2) / d
    } else {
        -((-n + d / 2) / d)
    }
}

fn too_large(kind: &str, size: u64, limit: u64) -> Fmp4Error {
    Fmp4Error::TooLarge {
        kind: kind.to_owned(),
        size,
        limit,
    }
}

fn printable(kind: &[u8; 4]) -> String {
    kind.iter()
        .map(|c| {
            if c.is_ascii_graphic() {
                *c as char
            } else {
                '?'
            }
        })
        .collect()
}

/// A child box: its type, its body, and the body's offset in the parent.
type Child<'a> = ([u8; 4], &'a [u8], usize);

/// Child boxes of a container body.
fn children(data: &[u8]) -> Result<Vec<Child<'_>>, Fmp4Error> {
    let mut out = Vec::new();
    let mut off = 0usize;
    while data.len() - off >= 8 {
        let size = u64::from(be32(data, off)?);
        let kind = [data[off + 4], data[off + 5], data[off + 6], data[off + 7]];
        let (size, header) = match size {
            0 => ((data.len() - off) as u64, 8),
            1 => (be64(data, off + 8)?, 16),
            s => (s, 8),
        };
        let rest = (data.len() - off) as u64;
        if size < header as u64 || size > rest {
            return Err(Fmp4Error::Malformed("child box overruns its parent"));
        }
        // size <= rest <= data.len(), so it fits a usize.
        let size = size as usize;
        out.push((kind, &data[off + header..off + size], off + header));
        off += size;
        if out.len() > MAX_CHILDREN {
            return Err(Fmp4Error::Malformed("too many child boxes"));
        }
    }
    Ok(out)
}

fn be32(d: &[u8], at: usize) -> Result<u32, Fmp4Error> {
    d.get(at..)
        .and_then(|d| d.get(..4))
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(Fmp4Error::Malformed("field past end of box"))
}

fn be64(d: &[u8], at: usize) -> Result<u64, Fmp4Error> {
    let hi = be32(d, at)?;
    let lo = be32(d, at.checked_add(4).ok_or(Fmp4Error::Malformed("offset"))?)?;
    Ok((u64::from(hi) << 32) | u64::from(lo))
}

fn parse_moov(moov: &[u8]) -> Result<Vec<Track>, Fmp4Error> {
    let mut tracks = Vec::new();
    let mut trex = Vec::new();
    for (kind, body, _) in children(moov)? {
        match &kind {
            b"trak" => {
                let mut id = None;
                let mut timescale = None;
                let mut video = false;
                for (k, b, _) in children(body)? {
                    match &k {
                        b"tkhd" => {
                            let v = *b.first().ok_or(Fmp4Error::Malformed("empty tkhd"))?;
                            id = Some(be32(b, if v == 1 { 20 } else { 12 })?);
                        }
                        b"mdia" => {
                            for (k2, b2, _) in children(b)? {
                                match &k2 {
                                    b"mdhd" => {
                                        let v = *b2
                                            .first()
                                            .ok_or(Fmp4Error::Malformed("empty mdhd"))?;
                                        timescale = Some(be32(b2, if v == 1 { 20 } else { 12 })?);
                                    }
                                    b"hdlr" => video = b2.get(8..12) == Some(b"vide"),
                                    _ => {}
                                }
                            }
                        }
                        _ => {}
                    }
                }
                let (Some(id), Some(timescale)) = (id, timescale) else {
                    return Err(Fmp4Error::Malformed("trak without tkhd or mdhd"));
                };
                if timescale == 0 {
                    return Err(Fmp4Error::Malformed("zero timescale"));
                }
                if tracks.len() >= MAX_TRACKS {
                    return Err(Fmp4Error::Malformed("too many tracks"));
                }
                tracks.push(Track {
                    id,
                    timescale,
                    video,
                    default_duration: 0,
                    default_flags: 0,
                });
            }
            b"mvex" => {
                for (k, b, _) in children(body)? {
                    if &k == b"trex" {
                        trex.push((be32(b, 4)?, be32(b, 12)?, be32(b, 20)?));
                    }
                }
            }
            _ => {}
        }
    }
    for (id, dur, flags) in trex {
        if let Some(t) = tracks.iter_mut().find(|t| t.id == id) {
            t.default_duration = dur;
            t.default_flags = flags;
        }
    }
    if tracks.is_empty() {
        return Err(Fmp4Error::Malformed("moov without tracks"));
    }
    Ok(tracks)
}

/// What a `moof` says about its fragment.
struct Moof {
    /// Per traf: timing and whether its first sample is a sync sample.
    trafs: Vec<(TrackTime, bool)>,
    /// Offset of the `mfhd` sequence number within the fragment bytes.
    sequence_offset: Option<usize>,
}

/// Reads a `moof` body; `base` is its offset within the fragment bytes.
fn parse_moof(moof: &[u8], base: usize, tracks: &[Track]) -> Result<Moof, Fmp4Error> {
    let mut trafs = Vec::new();
    let mut sequence_offset = None;
    for (kind, body, off) in children(moof)? {
        match &kind {
            b"mfhd" => {
                be32(body, 4)?;
                sequence_offset = Some(base + off + 4);
            }
            b"traf" => {
                if trafs.len() >= MAX_TRACKS {
                    return Err(Fmp4Error::Malformed("too many trafs"));
                }
                trafs.push(parse_traf(body, base + off, tracks)?);
            }
            _ => {}
        }
    }
    Ok(Moof {
        trafs,
        sequence_offset,
    })
}

fn parse_traf(traf: &[u8], base: usize, tracks: &[Track]) -> Result<(TrackTime, bool), Fmp4Error> {
    let mut track = None;
    let mut default_duration = None;
    let mut default_flags = None;
    let mut tfdt = None;
    let mut duration = 0u64;
    let mut first_flags = None;
    for (k, b, boff) in children(traf)? {
        match &k {
            b"tfhd" => {
                let flags = be32(b, 0)? & 0x00FF_FFFF;
                let id = be32(b, 4)?;
                track = Some(
                    tracks
                        .iter()
                        .find(|t| t.id == id)
                        .copied()
                        .ok_or(Fmp4Error::Malformed("traf for a track not in moov"))?,
                );
                let mut at = 8;
                if flags & 0x01 != 0 {
                    at += 8;
                }
                if flags & 0x02 != 0 {
                    at += 4;
                }
                if flags & 0x08 != 0 {
                    default_duration = Some(be32(b, at)?);
                    at += 4;
                }
                if flags & 0x10 != 0 {
                    at += 4;
                }
                if flags & 0x20 != 0 {
                    default_flags = Some(be32(b, at)?);
                }
            }
            b"tfdt" => {
                let v = *b.first().ok_or(Fmp4Error::Malformed("empty tfdt"))?;
                let field = base + boff + 4;
                tfdt = Some(if v == 1 {
                    (be64(b, 4)?, field, true)
                } else {
                    (u64::from(be32(b, 4)?), field, false)
                });
            }
            b"trun" => {
                let Some(track) = track else {
                    return Err(Fmp4Error::Malformed("trun before tfhd"));
                };
                let dflt = default_duration.unwrap_or(track.default_duration);
                let run = parse_trun(b, dflt)?;
                duration = duration.saturating_add(run.duration);
                if first_flags.is_none() {
                    first_flags = run.first_flags;
                }
            }
            _ => {}
        }
    }
    let Some(track) = track else {
        return Err(Fmp4Error::Malformed("traf without tfhd"));
    };
    let (tfdt_base, tfdt_offset, wide) = tfdt.ok_or(Fmp4Error::Malformed("traf without tfdt"))?;
    let flags = first_flags.or(default_flags).unwrap_or(track.default_flags);
    Ok((
        TrackTime {
            track_id: track.id,
            base: tfdt_base,
            duration,
            tfdt_offset,
            wide,
        },
        flags & NON_SYNC == 0,
    ))
}

/// What a `trun` says: its total duration and its first sample's flags.
struct Run {
    duration: u64,
    first_flags: Option<u32>,
}

fn parse_trun(b: &[u8], default_duration: u32) -> Result<Run, Fmp4Error> {
    let flags = be32(b, 0)? & 0x00FF_FFFF;
    let count = u64::from(be32(b, 4)?);
    let mut at = 8usize;
    if flags & 0x01 != 0 {
        at += 4;
    }
    let mut first_flags = None;
    if flags & 0x04 != 0 {
        first_flags = Some(be32(b, at)?);
        at += 4;
    }
    let has_duration = flags & 0x100 != 0;
    let per = [0x100u32, 0x200, 0x400, 0x800]
        .iter()
        .filter(|bit| flags & **bit != 0)
        .count()
        * 4;
    if per == 0 {
        // No per-sample fields: O(1), whatever the declared count.
        return Ok(Run {
            duration: count * u64::from(default_duration),
            first_flags,
        });
    }
    let table = b
        .get(at..)
        .ok_or(Fmp4Error::Malformed("trun overruns its box"))?;
    if count > (table.len() / per) as u64 {
        return Err(Fmp4Error::Malformed("trun overruns its box"));
    }
    // count * per <= table.len(): the loop is bounded by the box size.
    let mut duration = 0u64;
    for (i, sample) in table.chunks_exact(per).take(count as usize).enumerate() {
        let mut f = 0;
        duration += u64::from(if has_duration {
            f += 4;
            be32(sample, 0)?
        } else {
            default_duration
        });
        if flags & 0x200 != 0 {
            f += 4;
        }
        if i == 0 && first_flags.is_none() && flags & 0x400 != 0 {
            first_flags = Some(be32(sample, f)?);
        }
    }
    Ok(Run {
        duration,
        first_flags,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEMO: &[u8] = include_bytes!("../../assets/demo.mp4");
    const SMALL: &[u8] = include_bytes!("../../tests/fixtures/small.mp4");

    fn fragments(items: &[Item]) -> Vec<&Fragment> {
        items
            .iter()
            .filter_map(|i| match i {
                Item::Fragment(f) => Some(f),
                Item::Init(_) => None,
            })
            .collect()
    }

    /// Length of the init segment: everything before the first `moof`.
    fn init_len(data: &[u8]) -> usize {
        data.windows(4)
            .position(|w| w == b"moof")
            .expect("has moof")
            - 4
    }

    #[test]
    fn demo_clip_splits_into_init_and_keyframe_fragments() {
        let mut p = Fmp4Parser::new();
        let items = p.push(DEMO).expect("valid");
        p.finish().expect("ends cleanly");
        let Item::Init(init) = &items[0] else {
            panic!("init first")
        };
        assert_eq!(&init[4..8], b"ftyp");
        let frags = fragments(&items);
        assert_eq!(frags.len(), 16);
        assert!(frags.iter().all(|f| f.keyframe));
        assert!(frags.iter().all(|f| f.timescale == 15360));
        // About a second each (the muxer stretches the first frame to cover
        // the AAC priming), and back to back.
        assert!(frags
            .iter()
            .all(|f| f.duration.is_some_and(|d| d.abs_diff(15360) < 512)));
        assert!(frags
            .windows(2)
            .all(|w| w[0].media_time + w[0].duration.unwrap_or(0) == w[1].media_time));
        assert_eq!(p.tracks().len(), 2);
        let video = p.tracks().iter().find(|t| t.video).expect("video track");
        assert_eq!(video.timescale, 15360);
        // The offsets point at the fields they describe.
        for (i, f) in frags.iter().enumerate() {
            for t in &f.tracks {
                let b = &f.bytes[t.tfdt_offset..t.tfdt_offset + 8];
                assert_eq!(u64::from_be_bytes(b.try_into().expect("8 bytes")), t.base);
            }
            let at = f.sequence_offset.expect("mfhd");
            let seq = u32::from_be_bytes(f.bytes[at..at + 4].try_into().expect("4 bytes"));
            assert_eq!(seq as usize, i + 1);
        }
    }

    #[test]
    fn b_frames_and_an_audio_only_tail_keep_one_timeline() {
        let items = split([SMALL]).expect("valid");
        let frags = fragments(&items);
        assert!(frags.len() >= 6, "{}", frags.len());
        assert!(frags.windows(2).all(|w| w[1].media_time > w[0].media_time));
        let (with_video, tail): (Vec<&Fragment>, Vec<&Fragment>) =
            frags.into_iter().partition(|f| f.duration.is_some());
        assert!(with_video.iter().all(|f| f.keyframe));
        assert!(!tail.is_empty(), "the fixture ends with audio alone");
        // ffmpeg ends with audio the video no longer covers: not a start point,
        // but its time is on the video timeline.
        assert!(tail.iter().all(|f| !f.keyframe && f.timescale == 15360));
    }

    #[test]
    fn a_shift_moves_every_track_by_the_same_time_and_back() {
        let mut p = Fmp4Parser::new();
        let items = p.push(SMALL).expect("valid");
        let tracks = p.tracks().to_vec();
        let f = fragments(&items)[1].clone();
        let scale = |id: u32| {
            let t = tracks.iter().find(|t| t.id == id).expect("known track");
            i64::from(t.timescale)
        };
        assert_eq!(f.tracks.len(), 2, "video and audio");
        // 2.5 s: a whole number of ticks in both timescales (15360, 44100).
        let by = 5 * i64::from(f.timescale) / 2;
        let mut g = f.clone();
        g.shift(by, &tracks).expect("in range");
        assert_eq!(g.media_time, f.media_time + by as u64);
        for (a, b) in f.tracks.iter().zip(&g.tracks) {
            assert_eq!((b.base - a.base) as i64, 5 * scale(a.track_id) / 2);
        }
        // The bytes say what the fields say: parsed again, the same fragment.
        let again = split([&SMALL[..init_len(SMALL)], &g.bytes[..]]).expect("valid");
        assert_eq!(fragments(&again), [&g]);
        // Shifting back restores every byte and field.
        g.shift(-by, &tracks).expect("in range");
        assert_eq!(g, f);
        // A time off the end of the timescale's tick grid rounds per track.
        let mut h = f.clone();
        h.shift(1, &tracks).expect("in range");
        let audio = h
            .tracks
            .iter()
            .zip(&f.tracks)
            .find(|(t, _)| scale(t.track_id) == 44100);
        let (moved, was) = audio.expect("an audio track");
        assert_eq!(
            moved.base - was.base,
            3,
            "1/15360 s is 2.87 ticks at 44.1 kHz"
        );

        // Out of range: an error, and the fragment as it was.
        let mut g = f.clone();
        let before = -(f.media_time as i64) - 1;
        assert!(matches!(
            g.shift(before, &tracks),
            Err(Fmp4Error::Malformed(_))
        ));
        assert_eq!(g, f);
        // A 32-bit tfdt (here the low half of the 64-bit field, whose high half
        // is zero) takes a shift that fits and refuses one that does not.
        let mut narrow = f.clone();
        for t in &mut narrow.tracks {
            t.tfdt_offset += 4;
            t.wide = false;
        }
        let mut n = narrow.clone();
        n.shift(by, &tracks).expect("fits in 32 bits");
        let wide_again = split([&SMALL[..init_len(SMALL)], &n.bytes[..]]).expect("valid");
        assert_eq!(
            fragments(&wide_again)[0].media_time,
            f.media_time + by as u64
        );
        let mut n = narrow.clone();
        assert!(n.shift(i64::from(u32::MAX), &tracks).is_err());
        assert_eq!(n, narrow);
    }

    #[test]
    fn chunking_does_not_change_the_result() {
        let whole = split([DEMO]).expect("valid");
        for chunk in [1usize, 7, 1000, 65_536] {
            assert_eq!(split(DEMO.chunks(chunk)).expect("valid"), whole, "{chunk}");
        }
    }

    #[test]
    fn bad_streams_get_typed_errors() {
        assert!(matches!(
            Fmp4Parser::new().push(b"GET / HTTP/1.1\r\n\r\n"),
            Err(Fmp4Error::NotMp4(_))
        ));
        let mut big = ((MAX_BOX + 1) as u32).to_be_bytes().to_vec();
        big.extend_from_slice(b"mdat");
        let head = init_len(DEMO);
        let mut p = Fmp4Parser::new();
        p.push(&DEMO[..head]).expect("init");
        assert!(matches!(p.push(&big), Err(Fmp4Error::TooLarge { .. })));
        // A 64-bit size is read, and checked, too.
        let mut large = 1u32.to_be_bytes().to_vec();
        large.extend_from_slice(b"ftyp");
        large.extend_from_slice(&u64::MAX.to_be_bytes());
        assert!(matches!(
            Fmp4Parser::new().push(&large),
            Err(Fmp4Error::TooLarge { .. })
        ));
        let mut zero = 0u32.to_be_bytes().to_vec();
        zero.extend_from_slice(b"ftyp");
        assert!(matches!(
            Fmp4Parser::new().push(&zero),
            Err(Fmp4Error::Malformed(_))
        ));
        let mut p = Fmp4Parser::new();
        p.push(&DEMO[..DEMO.len() / 2]).expect("prefix is fine");
        assert!(matches!(p.finish(), Err(Fmp4Error::Truncated(_))));
        assert_eq!(split([&b""[..]]), Err(Fmp4Error::NoInit));
        let moof_at = init_len(DEMO);
        assert_eq!(
            Fmp4Parser::new().push(&DEMO[moof_at..]),
            Err(Fmp4Error::FragmentBeforeInit)
        );
    }

    #[test]
    fn other_boxes_are_skipped_without_buffering() {
        let moof_at = init_len(DEMO);
        let mut p = Fmp4Parser::new();
        let mut items = p.push(&DEMO[..moof_at]).expect("init");
        // A 10 MiB free box, streamed: never held in memory.
        let free = 10 * 1024 * 1024u32;
        let mut head = free.to_be_bytes().to_vec();
        head.extend_from_slice(b"free");
        items.extend(p.push(&head).expect("header"));
        let zeros = vec![0u8; 64 * 1024];
        for _ in 0..(free as usize - 8) / zeros.len() {
            items.extend(p.push(&zeros).expect("skipped"));
            assert!(p.buf.len() < 16, "skipped bytes are not buffered");
        }
        items.extend(
            p.push(&zeros[..(free as usize - 8) % zeros.len()])
                .expect("tail"),
        );
        items.extend(p.push(&DEMO[moof_at..]).expect("fragments"));
        p.finish().expect("clean end");
        assert_eq!(items, split([DEMO]).expect("valid"));
    }

    #[test]
    fn a_huge_sample_count_without_a_table_is_cheap() {
        let mut trun = 0u32.to_be_bytes().to_vec(); // version 0, no flags
        trun.extend_from_slice(&u32::MAX.to_be_bytes());
        let run = parse_trun(&trun, 512).expect("valid");
        assert_eq!(run.duration, u64::from(u32::MAX) * 512);
        let mut with_table = 0x100u32.to_be_bytes().to_vec();
        with_table.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_trun(&with_table, 0).is_err());
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(
            data in proptest::collection::vec(any::<u8>(), 0..2000),
            cut in 1usize..64,
        ) {
            let _ = split(data.chunks(cut));
        }

        #[test]
        fn corrupted_streams_never_panic(
            pos in 0usize..20_000,
            val: u8,
            cut in 0usize..DEMO.len(),
            chunk in 1usize..5000,
        ) {
            let mut d = DEMO[..cut.max(8)].to_vec();
            if pos < d.len() {
                d[pos] = val;
            }
            let _ = split(d.chunks(chunk));
        }

        #[test]
        fn any_cut_points_give_the_same_items(cuts in proptest::collection::vec(1usize..40_000, 1..40)) {
            let mut chunks = Vec::new();
            let mut rest = SMALL;
            for c in cuts {
                let (a, b) = rest.split_at(c.min(rest.len()));
                chunks.push(a);
                rest = b;
            }
            chunks.push(rest);
            prop_assert_eq!(split(chunks), split([SMALL]));
        }
    }
}
