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
}

impl VideoEvent {
    const ALL: [VideoEvent; 3] = [VideoEvent::Playing, VideoEvent::Waiting, VideoEvent::Error];

    fn name(self) -> &'static str {
        match self {
            VideoEvent::Playing => "playing",
            VideoEvent::Waiting => "waiting",
            VideoEvent::Error => "error",
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
    /// Listens for every [`VideoEvent`] on `video`.
    pub fn attach(
        video: &HtmlMediaElement,
        on_event: impl Fn(VideoEvent) + 'static,
    ) -> Result<Self, JsError> {
        let on_event = Rc::new(on_event);
        let mut listeners = Vec::new();
        for kind in VideoEvent::ALL {
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
