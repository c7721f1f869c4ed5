//! Listeners on the media element: the few events the player steers by.
//!
//! The closures are owned by [`VideoEvents`]; dropping it removes the
//! listeners from the element and frees them.

use std::rc::Rc;

use wasm_bindgen::prelude::*;
use web_sys::{Event, HtmlMediaElement};

use crate::error::JsError;

/// A media element event the player reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VideoEvent {
    /// `playing`: frames are being shown (first frame, or end of a stall).
    Playing,
    /// `waiting`: playback stopped for lack of data.
    Waiting,
    /// `error`: the element failed (see `video.error`).
    Error,
    /// `seeking`: a seek began (`currentTime` is its target).
    Seeking,
    /// `seeked`: a seek finished.
    Seeked,
    /// `ended`: playback reached the end of the media.
    Ended,
}

impl VideoEvent {
    /// What the live player listens for.
    pub const LIVE: [VideoEvent; 3] = [VideoEvent::Playing, VideoEvent::Waiting, VideoEvent::Error];
    /// What the on-demand player listens for.
    pub const ON_DEMAND: [VideoEvent; 6] = [
        VideoEvent::Playing,
        VideoEvent::Waiting,
        VideoEvent::Error,
        VideoEvent::Seeking,
        VideoEvent::Seeked,
        VideoEvent::Ended,
    ];

    fn name(self) -> &'static str {
        match self {
            VideoEvent::Playing => "playing",
            VideoEvent::Waiting => "waiting",
            VideoEvent::Error => "error",
            VideoEvent::Seeking => "seeking",
            VideoEvent::Seeked => "seeked",
            VideoEvent::Ended => "ended",
        }
    }
}

type Listener = Closure<dyn FnMut(Event)>;

/// The element's listeners, removed on drop.
pub struct VideoEvents {
    video: HtmlMediaElement,
    listeners: Vec<(VideoEvent, Listener)>,
}

impl VideoEvents {
    /// Listens for the live player's events ([`VideoEvent::LIVE`]) on `video`.
    pub fn attach(
        video: &HtmlMediaElement,
        on_event: impl Fn(VideoEvent) + 'static,
    ) -> Result<Self, JsError> {
        Self::attach_kinds(video, &VideoEvent::LIVE, on_event)
    }

    /// Listens for `kinds` on `video`.
    pub fn attach_kinds(
        video: &HtmlMediaElement,
        kinds: &[VideoEvent],
        on_event: impl Fn(VideoEvent) + 'static,
    ) -> Result<Self, JsError> {
        let on_event = Rc::new(on_event);
        let mut listeners = Vec::new();
        for &kind in kinds {
            let f = Rc::clone(&on_event);
            let closure: Listener = Closure::new(move |_: Event| f(kind));
            video
                .add_event_listener_with_callback(kind.name(), closure.as_ref().unchecked_ref())?;
            listeners.push((kind, closure));
        }
        Ok(VideoEvents {
            video: video.clone(),
            listeners,
        })
    }
}

impl Drop for VideoEvents {
    fn drop(&mut self) {
        for (kind, closure) in &self.listeners {
            self.video
                .remove_event_listener_with_callback(kind.name(), closure.as_ref().unchecked_ref())
                .ok();
        }
    }
}

/// What the element's `error` says, for an `error` event: its code and
/// message, or just "media error" when it has none.
pub fn media_error_message(video: &HtmlMediaElement) -> String {
    video
        .error()
        .map(|e| format!("media error {}: {}", e.code(), e.message()))
        .unwrap_or_else(|| "media error".to_owned())
}
