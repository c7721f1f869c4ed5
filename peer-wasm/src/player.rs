//! The JS API (`WasmPlayer`) and the run loop that feeds the [`Session`].
//!
//! Every browser callback (socket, links, MSE, media element, timers, fetches)
//! turns into an [`Input`] and goes through [`deliver`]: it lands in the inbox,
//! and whoever holds the session drains the inbox. A callback that fires while
//! the session is busy (a synchronous event from inside an append) only queues,
//! so the session is never borrowed twice. Events for JavaScript are queued the
//! same way and handed to the `on` callback after the session is released, so a
//! callback may call `stats()` or `destroy()`.
//!
//! The same run loop ([`Hub`]) drives the on-demand player (`crate::vod`):
//! anything that implements [`Driver`].

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::{Rc, Weak};

use wasm_bindgen::prelude::*;
use web_sys::HtmlMediaElement;

use crate::error::JsError;
use crate::session::{Input, Options, Session};

/// Events for JavaScript held while no callback is registered.
pub const MAX_OUTBOX: usize = 256;

/// What a [`Hub`] runs: a session that takes inputs one at a time.
pub(crate) trait Driver {
    /// What its callbacks report.
    type Input;
    /// Handles one input.
    fn handle(&mut self, input: Self::Input);
    /// Runs once the inbox is empty, before the session is released.
    fn settle(&mut self);
    /// The stats object, as JSON text.
    fn stats_json(&self) -> String;
}

impl Driver for Session {
    type Input = Input;
    fn handle(&mut self, input: Input) {
        Session::handle(self, input);
    }
    fn settle(&mut self) {
        Session::settle(self);
    }
    fn stats_json(&self) -> String {
        Session::stats_json(self)
    }
}

/// The live player's [`Hub`].
pub(crate) type Shared = Hub<Session>;

/// State shared between the API object and the callbacks (which hold a `Weak`).
pub(crate) struct Hub<D: Driver> {
    inbox: RefCell<VecDeque<D::Input>>,
    pub(crate) session: RefCell<Option<D>>,
    outbox: RefCell<VecDeque<serde_json::Value>>,
    callback: RefCell<Option<js_sys::Function>>,
    last_stats: RefCell<Option<String>>,
    destroyed: Cell<bool>,
}

impl<D: Driver> Default for Hub<D> {
    fn default() -> Self {
        Hub {
            inbox: RefCell::default(),
            session: RefCell::default(),
            outbox: RefCell::default(),
            callback: RefCell::default(),
            last_stats: RefCell::default(),
            destroyed: Cell::default(),
        }
    }
}

impl<D: Driver> Hub<D> {
    /// Queues an event for the `on` callback.
    pub(crate) fn emit(&self, event: serde_json::Value) {
        let mut out = self.outbox.borrow_mut();
        if out.len() >= MAX_OUTBOX {
            out.pop_front();
        }
        out.push_back(event);
    }

    fn run(&self) {
        loop {
            {
                let Ok(mut guard) = self.session.try_borrow_mut() else {
                    // The holder of the session drains the inbox before it lets go.
                    return;
                };
                if self.destroyed.get() {
                    let gone = guard.take();
                    drop(guard);
                    drop(gone);
                    self.inbox.borrow_mut().clear();
                    return;
                }
                let Some(session) = guard.as_mut() else {
                    self.inbox.borrow_mut().clear();
                    return;
                };
                loop {
                    let next = self.inbox.borrow_mut().pop_front();
                    let Some(input) = next else { break };
                    session.handle(input);
                }
                session.settle();
                *self.last_stats.borrow_mut() = Some(session.stats_json());
            }
            self.flush_outbox();
            if self.inbox.borrow().is_empty() {
                return;
            }
        }
    }

    /// The session's stats as a plain object: fresh if the session is free,
    /// else the last taken.
    pub(crate) fn stats(&self) -> JsValue {
        let fresh = self
            .session
            .try_borrow()
            .ok()
            .and_then(|s| s.as_ref().map(D::stats_json));
        if let Some(text) = &fresh {
            *self.last_stats.borrow_mut() = Some(text.clone());
        }
        let text = fresh
            .or_else(|| self.last_stats.borrow().clone())
            .unwrap_or_else(|| "{}".to_owned());
        js_sys::JSON::parse(&text).unwrap_or(JsValue::NULL)
    }

    /// Registers the one callback for every event.
    pub(crate) fn on(&self, cb: js_sys::Function) {
        *self.callback.borrow_mut() = Some(cb);
        self.flush_outbox();
    }

    /// Drops the session and everything queued. Idempotent.
    pub(crate) fn destroy(&self) {
        self.destroyed.set(true);
        self.inbox.borrow_mut().clear();
        let gone = self
            .session
            .try_borrow_mut()
            .ok()
            .and_then(|mut s| s.take());
        drop(gone);
        self.outbox.borrow_mut().clear();
        self.callback.borrow_mut().take();
    }

    fn flush_outbox(&self) {
        loop {
            let Some(cb) = self.callback.borrow().clone() else {
                return;
            };
            let next = self.outbox.borrow_mut().pop_front();
            let Some(event) = next else { return };
            if let Ok(text) = serde_json::to_string(&event) {
                if let Ok(value) = js_sys::JSON::parse(&text) {
                    if let Err(e) = cb.call1(&JsValue::NULL, &value) {
                        web_sys::console::error_2(&"clubcast: event handler threw".into(), &e);
                    }
                }
            }
        }
    }
}

/// Calls `video.play()`. If the browser refuses it (its autoplay policy:
/// `NotAllowedError`), `refused` goes to the session behind `weak`. Other
/// rejections (an `AbortError` when a seek or a new source interrupts the
/// start) are left to the session's next try.
pub(crate) fn start_playing<D: Driver + 'static>(
    video: &web_sys::HtmlMediaElement,
    weak: Weak<Hub<D>>,
    refused: D::Input,
) where
    D::Input: 'static,
{
    let Ok(p) = video.play() else { return };
    wasm_bindgen_futures::spawn_local(async move {
        if let Err(e) = wasm_bindgen_futures::JsFuture::from(p).await {
            if matches!(JsError::from(e), JsError::NotAllowed(_)) {
                deliver(&weak, refused);
            }
        }
    });
}

/// Hands `input` to the session behind `weak`, if it still exists.
pub(crate) fn deliver<D: Driver>(weak: &Weak<Hub<D>>, input: D::Input) {
    let Some(shared) = weak.upgrade() else {
        return;
    };
    if shared.destroyed.get() {
        return;
    }
    shared.inbox.borrow_mut().push_back(input);
    shared.run();
}

/// A clubcast player bound to one media element. See `web/clubcast.js`.
#[wasm_bindgen]
pub struct WasmPlayer {
    shared: Rc<Shared>,
}

#[wasm_bindgen]
impl WasmPlayer {
    /// Starts playing. `opts_json`: `{server, stream, target_latency_ms,
    /// ice_servers, p2p, upload_kbps, test_corrupt}`; unknown fields are
    /// ignored.
    #[wasm_bindgen(constructor)]
    pub fn new(video: HtmlMediaElement, opts_json: &str) -> Result<WasmPlayer, JsValue> {
        let opts: Options = serde_json::from_str(opts_json)
            .map_err(|e| js_sys::Error::new(&format!("clubcast: bad options: {e}")))?;
        let shared = Rc::new(Shared::default());
        let session = Session::start(Rc::downgrade(&shared), video, opts).map_err(|e| {
            let err = js_sys::Error::new(&format!("clubcast: {e}"));
            // `clubcast.js` passes the code on in its `error` event.
            let _ = js_sys::Reflect::set(&err, &"code".into(), &e.code().into());
            err
        })?;
        *shared.session.borrow_mut() = Some(session);
        Ok(WasmPlayer { shared })
    }

    /// Counters and playback state as a plain object (see `STAT_FIELDS` in
    /// `web/clubcast.js`).
    pub fn stats(&self) -> JsValue {
        self.shared.stats()
    }

    /// Registers the one callback that receives every event `{type, ...}`.
    pub fn on(&self, cb: js_sys::Function) {
        self.shared.on(cb);
    }

    /// Closes links, socket and media source. Idempotent.
    pub fn destroy(&self) {
        self.shared.destroy();
    }
}
