//! Playback through Media Source Extensions: one `MediaSource` with one
//! `SourceBuffer` attached to a `<video>` (or `<audio>`) element.
//!
//! The media source is `MediaSource`, or on a browser without it
//! `ManagedMediaSource` (Safari on iOS 17.1 and later), which is the same API;
//! a managed source opens only with the element's remote playback (AirPlay)
//! off, so the sink turns it off. See [`media_source_class`].
//!
//! Bytes go in with [`MseSink::append`], init segment first, then media
//! fragments in decode order. A `SourceBuffer` takes one append at a time, so
//! the sink keeps a bounded queue ([`MAX_QUEUED_BYTES`], [`MAX_QUEUED_SEGMENTS`])
//! and hands the next segment over on each `updateend`. Before appending, it
//! removes what lies more than [`KEEP_BEHIND_SECS`] behind the playhead, so the
//! buffer stays small during a long live session. On `QuotaExceededError` it
//! trims down to [`QUOTA_KEEP_BEHIND_SECS`] and retries the same segment.
//!
//! An on-demand player also sets the duration ([`MseSink::set_duration`]: a
//! seek past the media buffered so far would stop at its end otherwise),
//! removes ranges ([`MseSink::remove`]) and appends again after the end of
//! the stream ([`MseSink::reopen`]), for seeks.
//!
//! All callbacks are closures owned by the sink; dropping it detaches them,
//! detaches the element and revokes the object URL.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use wasm_bindgen::prelude::*;
use web_sys::{Event, HtmlMediaElement, MediaSource, MediaSourceReadyState, SourceBuffer, Url};

use crate::error::JsError;

/// The codecs the demo stream and the test fixture use: H.264 constrained
/// baseline level 3.0 and AAC-LC.
pub const MIME_H264_AAC: &str = "video/mp4; codecs=\"avc1.42C01E, mp4a.40.2\"";
/// Media kept behind the playhead, so a short seek back still plays.
pub const KEEP_BEHIND_SECS: f64 = 10.0;
/// A trim waits until this much more than [`KEEP_BEHIND_SECS`] has built up, so
/// removes are batched instead of running before every append.
pub const TRIM_SLACK_SECS: f64 = 5.0;
/// Media kept behind the playhead when the browser reports the buffer full.
pub const QUOTA_KEEP_BEHIND_SECS: f64 = 1.0;
/// Most bytes waiting to be appended.
pub const MAX_QUEUED_BYTES: usize = 16 * 1024 * 1024;
/// Most segments waiting to be appended.
pub const MAX_QUEUED_SEGMENTS: usize = 1024;
/// Most bytes handed to one `appendBuffer`: queued segments with no reset
/// between them go together, up to this.
pub const MAX_APPEND_BYTES: usize = 1024 * 1024;

const MANAGED_MEDIA_SOURCE: &str = "ManagedMediaSource";

/// The media source constructor this browser has, with its name:
/// `MediaSource`, else `ManagedMediaSource`; `None` without either (Safari on
/// iOS before 17.1).
pub fn media_source_class() -> Option<(js_sys::Function, &'static str)> {
    let global = js_sys::global();
    ["MediaSource", MANAGED_MEDIA_SOURCE]
        .into_iter()
        .find_map(|name| {
            let class = js_sys::Reflect::get(&global, &name.into()).ok()?;
            Some((class.dyn_into::<js_sys::Function>().ok()?, name))
        })
}

/// `class.isTypeSupported(mime)`; false if the call fails.
fn is_type_supported(class: &js_sys::Function, mime: &str) -> bool {
    js_sys::Reflect::get(class, &"isTypeSupported".into())
        .ok()
        .and_then(|f| f.dyn_into::<js_sys::Function>().ok())
        .and_then(|f| f.call1(class, &mime.into()).ok())
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

/// Errors of the MSE glue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MseError {
    /// A browser call failed; `op` names it.
    #[error("{op}: {source}")]
    Js {
        /// The browser call that failed.
        op: &'static str,
        /// What it threw.
        source: JsError,
    },
    /// The browser has neither `MediaSource` nor `ManagedMediaSource`.
    #[error("this browser has no Media Source Extensions (MediaSource or ManagedMediaSource)")]
    NoMediaSource,
    /// `MediaSource.isTypeSupported` refused the MIME type.
    #[error("unsupported media type {0}")]
    Unsupported(String),
    /// The append queue is at [`MAX_QUEUED_BYTES`] or [`MAX_QUEUED_SEGMENTS`].
    #[error("append queue full")]
    Full,
    /// The media source is closed or ended.
    #[error("media source closed")]
    Closed,
    /// The buffer is full and nothing behind the playhead can be removed yet;
    /// the segment stays queued and is retried on the next append.
    #[error("source buffer full and nothing to trim")]
    QuotaExceeded,
    /// The browser could not parse or decode appended media (`error` event).
    #[error("media decode error")]
    Decode,
}

impl MseError {
    fn js(op: &'static str) -> impl FnOnce(JsValue) -> MseError {
        move |value| MseError::Js {
            op,
            source: JsError::from(value),
        }
    }
}

/// What the sink reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MseEvent {
    /// The source is open and the SourceBuffer exists; appends start flowing.
    Open,
    /// Every queued segment has been appended.
    Drained,
    /// Something failed; see the error.
    Error(MseError),
}

type Handler = Rc<RefCell<dyn FnMut(MseEvent)>>;

struct BufferClosures {
    _on_update_end: Closure<dyn FnMut(Event)>,
    _on_error: Closure<dyn FnMut(Event)>,
}

struct Sink {
    media_source: MediaSource,
    video: HtmlMediaElement,
    mime: String,
    buffer: Option<SourceBuffer>,
    buffer_closures: Option<BufferClosures>,
    queue: VecDeque<Segment>,
    queued_bytes: usize,
    closed: bool,
    /// Set by [`MseSink::reopen`]: an ended source takes appends again.
    reopened: bool,
}

/// One entry of the append queue.
enum Segment {
    /// Bytes to append.
    Media(Vec<u8>),
    /// An init segment to append, after `SourceBuffer.changeType` if its MIME
    /// type differs from the buffer's.
    Init { bytes: Vec<u8>, mime: String },
    /// `SourceBuffer.abort()`: drop the parser's partial state before what follows.
    Reset,
    /// `SourceBuffer.remove(start, end)`, seconds.
    Remove { start: f64, end: f64 },
    /// `MediaSource.duration = secs`.
    Duration(f64),
}

/// A `MediaSource` attached to a media element, fed through a bounded queue.
pub struct MseSink {
    url: String,
    shared: Rc<RefCell<Sink>>,
    handler: Handler,
    _on_source_open: Closure<dyn FnMut(Event)>,
}

impl MseSink {
    /// Attaches a new `MediaSource` to `video`. The SourceBuffer for `mime` is
    /// created on `sourceopen`, reported as [`MseEvent::Open`]; appends made
    /// before that are queued.
    pub fn attach(
        video: &HtmlMediaElement,
        mime: &str,
        on_event: impl FnMut(MseEvent) + 'static,
    ) -> Result<Self, MseError> {
        let (class, name) = media_source_class().ok_or(MseError::NoMediaSource)?;
        if !is_type_supported(&class, mime) {
            return Err(MseError::Unsupported(mime.to_owned()));
        }
        let media_source: MediaSource = js_sys::Reflect::construct(&class, &js_sys::Array::new())
            .map_err(MseError::js("new MediaSource"))?
            .unchecked_into();
        if name == MANAGED_MEDIA_SOURCE {
            // Best effort: an element without the property has no AirPlay to turn off.
            let _ = js_sys::Reflect::set(video, &"disableRemotePlayback".into(), &JsValue::TRUE);
        }
        let handler: Handler = Rc::new(RefCell::new(on_event));
        let shared = Rc::new(RefCell::new(Sink {
            media_source: media_source.clone(),
            video: video.clone(),
            mime: mime.to_owned(),
            buffer: None,
            buffer_closures: None,
            queue: VecDeque::new(),
            queued_bytes: 0,
            closed: false,
            reopened: false,
        }));

        let weak = Rc::downgrade(&shared);
        let h = Rc::clone(&handler);
        let on_source_open = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
            if let Err(err) = open_buffer(&weak, &h) {
                emit(&h, MseEvent::Error(err));
                return;
            }
            emit(&h, MseEvent::Open);
            pump(&weak, &h);
        });
        media_source.set_onsourceopen(Some(on_source_open.as_ref().unchecked_ref()));

        let url = Url::create_object_url_with_source(&media_source)
            .map_err(MseError::js("URL.createObjectURL"))?;
        video.set_src(&url);
        Ok(Self {
            url,
            shared,
            handler,
            _on_source_open: on_source_open,
        })
    }

    /// Queues `bytes` for appending after everything queued before.
    /// Returns [`MseError::Full`] at the queue's bound (the bytes are not taken)
    /// and [`MseError::Closed`] once the source has ended.
    pub fn append(&self, bytes: Vec<u8>) -> Result<(), MseError> {
        {
            let mut sink = self.shared.borrow_mut();
            if sink.closed {
                return Err(MseError::Closed);
            }
            if sink.queue.len() >= MAX_QUEUED_SEGMENTS
                || sink.queued_bytes + bytes.len() > MAX_QUEUED_BYTES
            {
                return Err(MseError::Full);
            }
            sink.queued_bytes += bytes.len();
            sink.queue.push_back(Segment::Media(bytes));
        }
        pump(&Rc::downgrade(&self.shared), &self.handler);
        Ok(())
    }

    /// Queues another init segment (a publisher came back with other
    /// settings), for the media appended after it. If its `mime` differs from
    /// the buffer's, `SourceBuffer.changeType` switches the codecs first.
    pub fn append_init(&self, bytes: Vec<u8>, mime: &str) -> Result<(), MseError> {
        {
            let mut sink = self.shared.borrow_mut();
            if sink.closed {
                return Err(MseError::Closed);
            }
            if sink.queue.len() >= MAX_QUEUED_SEGMENTS {
                return Err(MseError::Full);
            }
            sink.queued_bytes += bytes.len();
            let mime = mime.to_owned();
            sink.queue.push_back(Segment::Init { bytes, mime });
        }
        pump(&Rc::downgrade(&self.shared), &self.handler);
        Ok(())
    }

    /// Queues a parser reset (`SourceBuffer.abort()`), run once everything
    /// queued before has been appended: the bytes after it start a new media
    /// segment, as after a skip over missing blocks.
    pub fn reset_parser(&self) -> Result<(), MseError> {
        self.enqueue(Segment::Reset)
    }

    /// Queues a step that carries no media bytes, within the queue's bound
    /// on entries, and runs the queue.
    fn enqueue(&self, step: Segment) -> Result<(), MseError> {
        {
            let mut sink = self.shared.borrow_mut();
            if sink.closed {
                return Err(MseError::Closed);
            }
            if sink.queue.len() >= MAX_QUEUED_SEGMENTS {
                return Err(MseError::Full);
            }
            sink.queue.push_back(step);
        }
        pump(&Rc::downgrade(&self.shared), &self.handler);
        Ok(())
    }

    /// Queues the removal of the media from `start` to `end` seconds, run
    /// once everything queued before has been appended. An empty or
    /// malformed span is ignored.
    pub fn remove(&self, start: f64, end: f64) -> Result<(), MseError> {
        if !(start.is_finite() && end.is_finite() && start >= 0.0 && end > start) {
            return Ok(());
        }
        self.enqueue(Segment::Remove { start, end })
    }

    /// Queues setting the media source's duration to `secs` (which must not
    /// be less than what is buffered by then); a non-finite or negative
    /// value is ignored.
    pub fn set_duration(&self, secs: f64) -> Result<(), MseError> {
        if !(secs.is_finite() && secs > 0.0) {
            return Ok(());
        }
        self.enqueue(Segment::Duration(secs))
    }

    /// Takes appends again after [`MseSink::end_of_stream`] (a seek back into
    /// media no longer buffered): the next append reopens the ended source.
    pub fn reopen(&self) {
        let mut sink = self.shared.borrow_mut();
        sink.closed = false;
        sink.reopened = true;
    }

    /// End of the last buffered range, in media seconds (the live edge of what
    /// can play), or `None` before anything is buffered.
    pub fn buffered_end(&self) -> Option<f64> {
        self.buffered().last().map(|&(_, end)| end)
    }

    /// The buffered ranges as `(start, end)` pairs in media seconds.
    pub fn buffered(&self) -> Vec<(f64, f64)> {
        self.shared
            .borrow()
            .buffer
            .as_ref()
            .map(ranges)
            .unwrap_or_default()
    }

    /// Bytes waiting in the queue, not yet handed to the SourceBuffer.
    pub fn queued_bytes(&self) -> usize {
        self.shared.borrow().queued_bytes
    }

    /// True when nothing is queued and no append or remove is running.
    pub fn is_idle(&self) -> bool {
        let sink = self.shared.borrow();
        sink.queue.is_empty() && sink.buffer.as_ref().is_some_and(|b| !b.updating())
    }

    /// Signals the end of the stream once the queue has drained; later
    /// appends are refused with [`MseError::Closed`].
    pub fn end_of_stream(&self) -> Result<(), MseError> {
        let mut sink = self.shared.borrow_mut();
        sink.closed = true;
        if sink.media_source.ready_state() == MediaSourceReadyState::Open
            && sink.queue.is_empty()
            && sink.buffer.as_ref().is_some_and(|b| !b.updating())
        {
            sink.media_source
                .end_of_stream()
                .map_err(MseError::js("MediaSource.endOfStream"))?;
        }
        Ok(())
    }
}

impl Drop for MseSink {
    fn drop(&mut self) {
        let mut sink = self.shared.borrow_mut();
        sink.closed = true;
        sink.queue.clear();
        sink.media_source.set_onsourceopen(None);
        if let Some(buffer) = sink.buffer.take() {
            buffer.set_onupdateend(None);
            buffer.set_onerror(None);
        }
        sink.buffer_closures = None;
        sink.video.remove_attribute("src").ok();
        sink.video.load();
        Url::revoke_object_url(&self.url).ok();
    }
}

fn emit(handler: &Handler, event: MseEvent) {
    // Events come from the browser's event loop, or from `append` outside any
    // handler, so the handler is free; a re-entrant call drops the event
    // rather than panicking.
    if let Ok(mut f) = handler.try_borrow_mut() {
        f(event);
    }
}

fn open_buffer(weak: &Weak<RefCell<Sink>>, handler: &Handler) -> Result<(), MseError> {
    let Some(shared) = weak.upgrade() else {
        return Ok(());
    };
    let mut sink = shared.borrow_mut();
    if sink.buffer.is_some() {
        return Ok(());
    }
    let buffer = sink
        .media_source
        .add_source_buffer(&sink.mime)
        .map_err(MseError::js("MediaSource.addSourceBuffer"))?;

    let w = weak.clone();
    let h = Rc::clone(handler);
    let on_update_end = Closure::<dyn FnMut(Event)>::new(move |_: Event| pump(&w, &h));
    let h = Rc::clone(handler);
    let on_error = Closure::<dyn FnMut(Event)>::new(move |_: Event| {
        emit(&h, MseEvent::Error(MseError::Decode));
    });
    buffer.set_onupdateend(Some(on_update_end.as_ref().unchecked_ref()));
    buffer.set_onerror(Some(on_error.as_ref().unchecked_ref()));
    sink.buffer = Some(buffer);
    sink.buffer_closures = Some(BufferClosures {
        _on_update_end: on_update_end,
        _on_error: on_error,
    });
    Ok(())
}

/// What `pump` decided, acted on after the sink's borrow is released.
enum Step {
    Wait,
    Drained,
    Failed(MseError),
}

/// Starts the next remove or append if the SourceBuffer is free.
fn pump(weak: &Weak<RefCell<Sink>>, handler: &Handler) {
    let Some(shared) = weak.upgrade() else {
        return;
    };
    let step = next_step(&mut shared.borrow_mut());
    match step {
        Step::Wait => {}
        Step::Drained => emit(handler, MseEvent::Drained),
        Step::Failed(err) => emit(handler, MseEvent::Error(err)),
    }
}

fn next_step(sink: &mut Sink) -> Step {
    let Some(buffer) = sink.buffer.clone() else {
        return Step::Wait;
    };
    let state = sink.media_source.ready_state();
    // An ended source opens again with the next append or remove, which only
    // an on-demand player asks for (`reopen`).
    let ready = state == MediaSourceReadyState::Open
        || (state == MediaSourceReadyState::Ended && sink.reopened && !sink.closed);
    if buffer.updating() || !ready {
        return Step::Wait;
    }
    let now = sink.video.current_time();
    let buffered = ranges(&buffer);
    if let Some((start, end)) = trim_range(&buffered, now, KEEP_BEHIND_SECS, TRIM_SLACK_SECS) {
        return match buffer.remove(start, end) {
            Ok(()) => Step::Wait,
            Err(e) => Step::Failed(MseError::js("SourceBuffer.remove")(e)),
        };
    }
    while let Some(Segment::Reset) = sink.queue.front() {
        sink.queue.pop_front();
        // Not updating (checked above), so this only resets the parser.
        if let Err(e) = buffer.abort() {
            return Step::Failed(MseError::js("SourceBuffer.abort")(e));
        }
    }
    if let Some(&Segment::Duration(secs)) = sink.queue.front() {
        sink.queue.pop_front();
        // Through `Reflect` so that a throw (a value below what is buffered)
        // is an error, not an exception through the wasm stack.
        let set = js_sys::Reflect::set(&sink.media_source, &"duration".into(), &secs.into());
        if let Err(e) = set {
            return Step::Failed(MseError::js("MediaSource.duration")(e));
        }
        return next_step(sink);
    }
    if let Some(&Segment::Remove { start, end }) = sink.queue.front() {
        sink.queue.pop_front();
        return match buffer.remove(start, end) {
            Ok(()) => Step::Wait,
            Err(e) => Step::Failed(MseError::js("SourceBuffer.remove")(e)),
        };
    }
    if let Some(Segment::Init { mime, .. }) = sink.queue.front() {
        if *mime != sink.mime {
            let mime = mime.clone();
            if let Err(e) = buffer.change_type(&mime) {
                return Step::Failed(MseError::js("SourceBuffer.changeType")(e));
            }
            sink.mime = mime;
        }
        // From here on it is bytes like any other, parsed in order.
        if let Some(Segment::Init { bytes, .. }) = sink.queue.pop_front() {
            sink.queue.push_front(Segment::Media(bytes));
        }
    }
    coalesce_front(&mut sink.queue, MAX_APPEND_BYTES);
    let Some(Segment::Media(front)) = sink.queue.front_mut() else {
        if sink.closed {
            // `end_of_stream` was asked for while appends were still queued.
            sink.media_source.end_of_stream().ok();
        }
        return Step::Drained;
    };
    match buffer.append_buffer_with_u8_array(front) {
        Ok(()) => {
            if let Some(Segment::Media(done)) = sink.queue.pop_front() {
                sink.queued_bytes -= done.len();
            }
            Step::Wait
        }
        Err(e) => {
            let err = JsError::from(e);
            if !err.is_quota_exceeded() {
                return Step::Failed(MseError::Js {
                    op: "SourceBuffer.appendBuffer",
                    source: err,
                });
            }
            // Keep the segment at the front; retry after the remove completes.
            match trim_range(&buffered, now, QUOTA_KEEP_BEHIND_SECS, 0.0) {
                Some((start, end)) => match buffer.remove(start, end) {
                    Ok(()) => Step::Wait,
                    Err(e) => Step::Failed(MseError::js("SourceBuffer.remove")(e)),
                },
                None => Step::Failed(MseError::QuotaExceeded),
            }
        }
    }
}

/// Joins the media segments at the front of `queue`, up to the first reset
/// and to `max` bytes, into one. A `SourceBuffer` parses appends as one byte
/// stream, so this changes nothing but the number of appends: a startup
/// backlog of 4-KiB blocks went as one append per block, each waiting for the
/// previous one's `updateend`, which on a busy machine took half a second.
fn coalesce_front(queue: &mut VecDeque<Segment>, max: usize) {
    let Some(Segment::Media(first)) = queue.front_mut() else {
        return;
    };
    let mut joined = std::mem::take(first);
    queue.pop_front();
    while let Some(Segment::Media(next)) = queue.front() {
        if joined.len() + next.len() > max {
            break;
        }
        joined.extend_from_slice(next);
        queue.pop_front();
    }
    queue.push_front(Segment::Media(joined));
}

fn ranges(buffer: &SourceBuffer) -> Vec<(f64, f64)> {
    let Ok(ranges) = buffer.buffered() else {
        return Vec::new();
    };
    (0..ranges.length())
        .filter_map(|i| Some((ranges.start(i).ok()?, ranges.end(i).ok()?)))
        .collect()
}

/// The span to remove so that at most `keep` seconds stay behind `now`, or
/// `None` while less than `keep + slack` seconds are behind it.
fn trim_range(buffered: &[(f64, f64)], now: f64, keep: f64, slack: f64) -> Option<(f64, f64)> {
    let start = buffered.first()?.0;
    let cut = now - keep;
    (cut - start > slack && cut > start).then_some((start, cut))
}

#[cfg(test)]
mod tests {
    use super::{coalesce_front, trim_range, Segment};
    use std::collections::VecDeque;

    fn shape(q: &VecDeque<Segment>) -> Vec<Option<Vec<u8>>> {
        q.iter()
            .map(|s| match s {
                Segment::Media(b) => Some(b.clone()),
                Segment::Reset
                | Segment::Init { .. }
                | Segment::Remove { .. }
                | Segment::Duration(_) => None,
            })
            .collect()
    }

    #[test]
    fn joins_front_media_up_to_a_reset_and_the_byte_cap() {
        let mut q: VecDeque<Segment> = [
            Segment::Media(vec![1, 2]),
            Segment::Media(vec![3]),
            Segment::Media(vec![4, 5]),
            Segment::Media(vec![6, 7]),
            Segment::Reset,
            Segment::Media(vec![8]),
        ]
        .into();
        coalesce_front(&mut q, 5);
        assert_eq!(
            shape(&q),
            [
                Some(vec![1, 2, 3, 4, 5]),
                Some(vec![6, 7]),
                None,
                Some(vec![8])
            ]
        );
        q.pop_front();
        coalesce_front(&mut q, 5);
        assert_eq!(
            shape(&q),
            [Some(vec![6, 7]), None, Some(vec![8])],
            "a reset is a wall"
        );
        let mut q: VecDeque<Segment> = [Segment::Reset, Segment::Media(vec![1])].into();
        coalesce_front(&mut q, 5);
        assert_eq!(shape(&q), [None, Some(vec![1])], "a reset in front stays");
        let init = || Segment::Init {
            bytes: vec![2],
            mime: "video/mp4".into(),
        };
        let mut q: VecDeque<Segment> =
            [Segment::Media(vec![1]), init(), Segment::Media(vec![3])].into();
        coalesce_front(&mut q, 5);
        assert_eq!(
            q.len(),
            3,
            "an init is a wall: what is before it goes first"
        );
        assert!(matches!(q[1], Segment::Init { .. }));
        let mut q: VecDeque<Segment> = [Segment::Media(vec![0; 9]), Segment::Media(vec![1])].into();
        coalesce_front(&mut q, 5);
        assert_eq!(q.len(), 2, "a segment over the cap goes alone");
    }

    #[test]
    fn trims_only_past_keep_plus_slack() {
        let buffered = [(0.0, 30.0)];
        assert_eq!(trim_range(&buffered, 12.0, 10.0, 5.0), None);
        assert_eq!(trim_range(&buffered, 16.0, 10.0, 5.0), Some((0.0, 6.0)));
        assert_eq!(trim_range(&buffered, 0.5, 1.0, 0.0), None);
        assert_eq!(trim_range(&buffered, 3.0, 1.0, 0.0), Some((0.0, 2.0)));
        assert_eq!(trim_range(&[], 30.0, 1.0, 0.0), None);
    }
}
