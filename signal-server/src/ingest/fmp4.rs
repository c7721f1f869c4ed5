//! Incremental fragmented-MP4 (CMAF) splitter.
//!
//! Bytes arrive in arbitrary chunks from a chunked HTTP body. [`Fmp4Parser::push`]
//! buffers at most one top-level box at a time and yields:
//! - [`Item::Init`]: `ftyp` + `moov` (and any box between them), once;
//! - [`Item::Fragment`]: an optional `styp`, then `moof` + `mdat`.
//!
//! Only top-level boxes are framed here; inside `moov` and `moof` the few fields
//! clubcast needs are read directly: each track's id, timescale and handler, and
//! per fragment each track's `tfdt` (and its byte offset, so the demo source can
//! rewrite it), its duration, and whether the video track starts with a sync
//! sample. A full box-tree crate would decode and re-encode whole boxes, which
//! is more than this splitter needs and gets in the way of in-place rewrites.
//!
//! Every length is checked before it is used; nothing here panics on input.

use bytes::{Buf, Bytes, BytesMut};

/// Largest top-level box accepted (a fragment's `mdat` included).
pub const MAX_BOX: u64 = 16 * 1024 * 1024;
/// Largest init segment accepted.
pub const MAX_INIT: usize = 1024 * 1024;
/// Most tracks per stream.
pub const MAX_TRACKS: usize = 8;

/// `sample_is_non_sync_sample` in ISO BMFF sample flags.
const NON_SYNC: u32 = 0x0001_0000;

/// Errors of the splitter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Fmp4Error {
    /// The stream does not start like an MP4 file.
    #[error("not an MP4 stream: first box is {0:?}")]
    NotMp4(String),
    /// A box is larger than [`MAX_BOX`], or the init segment than [`MAX_INIT`].
    #[error("box {kind:?} of {size} bytes is over the limit")]
    TooLarge {
        /// The box type.
        kind: String,
        /// Its declared size.
        size: u64,
    },
    /// The stream ended inside a box.
    #[error("stream ended inside a box ({0} bytes left over)")]
    Truncated(usize),
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
    /// `baseMediaDecodeTime`.
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
    /// Decode time of the first video sample (or of the first track), in its
    /// track's timescale.
    pub media_time: u64,
    /// Whether the fragment starts with a video sync sample.
    pub keyframe: bool,
    /// Per-track timing.
    pub tracks: Vec<TrackTime>,
}

/// What the splitter produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// The init segment.
    Init(Bytes),
    /// A media fragment.
    Fragment(Fragment),
}

/// Incremental splitter; see the module docs.
#[derive(Debug, Default)]
pub struct Fmp4Parser {
    buf: BytesMut,
    init: Option<BytesMut>,
    tracks: Vec<Track>,
    have_init: bool,
    prefix: Option<Bytes>,
    moof: Option<Bytes>,
    started: bool,
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

    /// Feeds bytes; returns the items they complete.
    pub fn push(&mut self, data: &[u8]) -> Result<Vec<Item>, Fmp4Error> {
        self.buf.extend_from_slice(data);
        let mut out = Vec::new();
        while let Some((kind, size, header)) = self.peek_box()? {
            if (self.buf.len() as u64) < size {
                break;
            }
            let boxed = self.buf.split_to(size as usize).freeze();
            self.handle_box(kind, boxed, header, &mut out)?;
        }
        Ok(out)
    }

    /// Checks that the stream ended on a box boundary.
    pub fn finish(&self) -> Result<(), Fmp4Error> {
        let left = self.buf.len() + self.moof.as_ref().map_or(0, Bytes::len);
        if left > 0 {
            return Err(Fmp4Error::Truncated(left));
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
                b"ftyp" | b"styp" | b"moov" | b"free" | b"skip" | b"moof"
            ) {
                return Err(Fmp4Error::NotMp4(printable(&kind)));
            }
            self.started = true;
        }
        if !kind.iter().all(|c| c.is_ascii_graphic() || *c == b' ') {
            return Err(Fmp4Error::Malformed("box type is not printable"));
        }
        let (size, header) = match size32 {
            0 => return Err(Fmp4Error::Malformed("box extends to end of file (size 0)")),
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
            return Err(Fmp4Error::TooLarge {
                kind: printable(&kind),
                size,
            });
        }
        Ok(Some((kind, size, header)))
    }

    fn handle_box(
        &mut self,
        kind: [u8; 4],
        boxed: Bytes,
        header: usize,
        out: &mut Vec<Item>,
    ) -> Result<(), Fmp4Error> {
        match &kind {
            b"ftyp" => {
                let mut init = BytesMut::new();
                init.extend_from_slice(&boxed);
                self.init = Some(init);
            }
            b"moov" => {
                let mut init = self.init.take().unwrap_or_default();
                init.extend_from_slice(&boxed);
                if init.len() > MAX_INIT {
                    return Err(Fmp4Error::TooLarge {
                        kind: "init".into(),
                        size: init.len() as u64,
                    });
                }
                self.tracks = parse_moov(&boxed[header..])?;
                self.have_init = true;
                out.push(Item::Init(init.freeze()));
            }
            b"styp" => self.prefix = Some(boxed),
            b"moof" => {
                if !self.have_init {
                    return Err(Fmp4Error::FragmentBeforeInit);
                }
                self.moof = Some(boxed);
            }
            b"mdat" => {
                let Some(moof) = self.moof.take() else {
                    return Err(Fmp4Error::Malformed("mdat without moof"));
                };
                let prefix = self.prefix.take();
                let lead = prefix.as_ref().map_or(0, Bytes::len);
                let mut bytes = BytesMut::with_capacity(lead + moof.len() + boxed.len());
                if let Some(p) = &prefix {
                    bytes.extend_from_slice(p);
                }
                bytes.extend_from_slice(&moof);
                bytes.extend_from_slice(&boxed);
                let moof_header = if moof.len() >= 16 && moof[..4] == [0, 0, 0, 1] {
                    16
                } else {
                    8
                };
                let frag = parse_moof(&moof[moof_header..], lead + moof_header, &self.tracks)?;
                let video = self.tracks.iter().find(|t| t.video).map(|t| t.id);
                let first = frag
                    .iter()
                    .find(|f| Some(f.0.track_id) == video)
                    .or(frag.first());
                let (media_time, keyframe) = match first {
                    Some((tt, sync)) => (tt.base, video.is_none() || *sync),
                    None => (0, video.is_none()),
                };
                out.push(Item::Fragment(Fragment {
                    bytes: bytes.freeze(),
                    media_time,
                    keyframe,
                    tracks: frag.into_iter().map(|(t, _)| t).collect(),
                }));
            }
            // ftyp/moov may be preceded or followed by boxes MSE does not need.
            _ => {
                if let Some(init) = self.init.as_mut() {
                    if !self.have_init && matches!(&kind, b"free" | b"skip" | b"uuid") {
                        init.extend_from_slice(&boxed);
                    }
                }
            }
        }
        Ok(())
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
    while off + 8 <= data.len() {
        let size =
            u32::from_be_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]]) as usize;
        let kind = [data[off + 4], data[off + 5], data[off + 6], data[off + 7]];
        let (size, header) = if size == 1 {
            if off + 16 > data.len() {
                return Err(Fmp4Error::Malformed("truncated large box header"));
            }
            let mut b = &data[off + 8..off + 16];
            (
                usize::try_from(b.get_u64()).map_err(|_| Fmp4Error::Malformed("box size"))?,
                16,
            )
        } else {
            (size, 8)
        };
        if size < header || off + size > data.len() {
            return Err(Fmp4Error::Malformed("child box overruns its parent"));
        }
        out.push((kind, &data[off + header..off + size], off + header));
        off += size;
        if out.len() > 4096 {
            return Err(Fmp4Error::Malformed("too many child boxes"));
        }
    }
    Ok(out)
}

fn be32(d: &[u8], at: usize) -> Result<u32, Fmp4Error> {
    d.get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or(Fmp4Error::Malformed("field past end of box"))
}

fn be64(d: &[u8], at: usize) -> Result<u64, Fmp4Error> {
    Ok((u64::from(be32(d, at)?) << 32) | u64::from(be32(d, at + 4)?))
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
                            let v = *b.first().ok_or(Fmp4Error::Malformed("tkhd"))?;
                            id = Some(be32(b, if v == 1 { 20 } else { 12 })?);
                        }
                        b"mdia" => {
                            for (k2, b2, _) in children(b)? {
                                match &k2 {
                                    b"mdhd" => {
                                        let v = *b2.first().ok_or(Fmp4Error::Malformed("mdhd"))?;
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

/// Per traf: timing and whether its first sample is a sync sample. `base` is
/// the offset of the moof body within the fragment bytes.
fn parse_moof(
    moof: &[u8],
    base: usize,
    tracks: &[Track],
) -> Result<Vec<(TrackTime, bool)>, Fmp4Error> {
    let mut out = Vec::new();
    for (kind, body, off) in children(moof)? {
        if &kind != b"traf" {
            continue;
        }
        let mut track_id = None;
        let mut default_duration = None;
        let mut default_flags = None;
        let mut tfdt = None;
        let mut duration = 0u64;
        let mut first_flags = None;
        for (k, b, boff) in children(body)? {
            match &k {
                b"tfhd" => {
                    let flags = be32(b, 0)? & 0x00FF_FFFF;
                    track_id = Some(be32(b, 4)?);
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
                    let v = *b.first().ok_or(Fmp4Error::Malformed("tfdt"))?;
                    let field = base + off + boff + 4;
                    tfdt = Some(if v == 1 {
                        (be64(b, 4)?, field, true)
                    } else {
                        (u64::from(be32(b, 4)?), field, false)
                    });
                }
                b"trun" => {
                    let flags = be32(b, 0)? & 0x00FF_FFFF;
                    let count = be32(b, 4)? as usize;
                    let mut at = 8;
                    if flags & 0x01 != 0 {
                        at += 4;
                    }
                    let first = if flags & 0x04 != 0 {
                        let f = be32(b, at)?;
                        at += 4;
                        Some(f)
                    } else {
                        None
                    };
                    let per = [0x100u32, 0x200, 0x400, 0x800]
                        .iter()
                        .filter(|bit| flags & **bit != 0)
                        .count()
                        * 4;
                    if count.checked_mul(per).is_none_or(|n| at + n > b.len()) {
                        return Err(Fmp4Error::Malformed("trun overruns its box"));
                    }
                    let track_default = tracks
                        .iter()
                        .find(|t| Some(t.id) == track_id)
                        .map_or(0, |t| t.default_duration);
                    for i in 0..count {
                        let mut f = at + i * per;
                        let dur = if flags & 0x100 != 0 {
                            let d = be32(b, f)?;
                            f += 4;
                            d
                        } else {
                            default_duration.unwrap_or(track_default)
                        };
                        duration += u64::from(dur);
                        if flags & 0x200 != 0 {
                            f += 4;
                        }
                        if i == 0 && first_flags.is_none() {
                            first_flags = first.or(if flags & 0x400 != 0 {
                                Some(be32(b, f)?)
                            } else {
                                None
                            });
                        }
                    }
                }
                _ => {}
            }
        }
        let Some(track_id) = track_id else {
            return Err(Fmp4Error::Malformed("traf without tfhd"));
        };
        let (tfdt_base, tfdt_offset, wide) =
            tfdt.ok_or(Fmp4Error::Malformed("traf without tfdt"))?;
        let trex_flags = tracks
            .iter()
            .find(|t| t.id == track_id)
            .map_or(0, |t| t.default_flags);
        let flags = first_flags.or(default_flags).unwrap_or(trex_flags);
        out.push((
            TrackTime {
                track_id,
                base: tfdt_base,
                duration,
                tfdt_offset,
                wide,
            },
            flags & NON_SYNC == 0,
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DEMO: &[u8] = include_bytes!("../../assets/demo.mp4");

    fn split_all(data: &[u8], chunk: usize) -> Result<Vec<Item>, Fmp4Error> {
        let mut p = Fmp4Parser::new();
        let mut items = Vec::new();
        for c in data.chunks(chunk.max(1)) {
            items.extend(p.push(c)?);
        }
        Ok(items)
    }

    #[test]
    fn demo_clip_splits_into_init_and_keyframe_fragments() {
        let mut p = Fmp4Parser::new();
        let items = p.push(DEMO).expect("valid");
        assert!(matches!(items[0], Item::Init(_)));
        let frags: Vec<_> = items
            .iter()
            .filter_map(|i| match i {
                Item::Fragment(f) => Some(f),
                Item::Init(_) => None,
            })
            .collect();
        assert_eq!(frags.len(), 16);
        assert!(frags.iter().all(|f| f.keyframe));
        assert!(frags.windows(2).all(|w| w[1].media_time > w[0].media_time));
        assert_eq!(p.tracks().len(), 2);
        let video = p.tracks().iter().find(|t| t.video).expect("video track");
        assert_eq!(video.timescale, 15360);
        // The tfdt offsets point at the fields they describe.
        let f = frags[1];
        for t in &f.tracks {
            let b = &f.bytes[t.tfdt_offset..t.tfdt_offset + 8];
            assert_eq!(u64::from_be_bytes(b.try_into().expect("8 bytes")), t.base);
        }
    }

    #[test]
    fn chunking_does_not_change_the_result() {
        let whole = split_all(DEMO, DEMO.len()).expect("valid");
        for chunk in [1usize, 7, 1000, 65_536] {
            assert_eq!(
                split_all(DEMO, chunk).expect("valid"),
                whole,
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn bad_streams_get_typed_errors() {
        assert!(matches!(
            Fmp4Parser::new().push(b"GET / HTTP/1.1\r\n\r\n"),
            Err(Fmp4Error::NotMp4(_))
        ));
        let mut big = vec![0, 0, 0, 0];
        big.extend_from_slice(b"ftyp");
        big[..4].copy_from_slice(&((MAX_BOX + 1) as u32).to_be_bytes());
        assert!(matches!(
            Fmp4Parser::new().push(&big),
            Err(Fmp4Error::TooLarge { .. })
        ));
        let mut p = Fmp4Parser::new();
        p.push(&DEMO[..DEMO.len() / 2]).expect("prefix is fine");
        assert!(matches!(p.finish(), Err(Fmp4Error::Truncated(_))));
        // A moof before any moov.
        let moof_at = DEMO
            .windows(4)
            .position(|w| w == b"moof")
            .expect("has moof")
            - 4;
        let mut p = Fmp4Parser::new();
        assert_eq!(p.push(&DEMO[moof_at..]), Err(Fmp4Error::FragmentBeforeInit));
    }

    proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut p = Fmp4Parser::new();
            let _ = p.push(&data);
            let _ = p.finish();
        }

        #[test]
        fn corrupted_demo_never_panics(pos in 0usize..20_000, val: u8, cut in 0usize..DEMO.len()) {
            let mut d = DEMO[..cut.max(8)].to_vec();
            if pos < d.len() {
                d[pos] = val;
            }
            let mut p = Fmp4Parser::new();
            let _ = p.push(&d);
        }
    }
}
