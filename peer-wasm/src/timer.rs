//! One-shot timer over `setTimeout`, and the monotonic clock the driver feeds
//! into the sans-IO core.
//!
//! The core reports its next wakeup through `poll_timeout`; the driver arms one
//! [`Timer`] for it and re-arms it after every round of `handle_*` calls. The
//! timer owns its closure, so dropping it both cancels the pending call and
//! frees the closure: nothing is leaked to JavaScript.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use wasm_bindgen::prelude::*;

use crate::error::JsError;

/// The longest delay `setTimeout` honours (2^31 - 1 ms); longer ones fire at once.
pub const MAX_DELAY: Duration = Duration::from_millis(i32::MAX as u64);

#[wasm_bindgen]
extern "C" {
    // Bound on the global object so the timer works in windows and workers alike.
    #[wasm_bindgen(js_name = setTimeout, catch)]
    fn set_timeout(callback: &js_sys::Function, delay_ms: i32) -> Result<i32, JsValue>;

    #[wasm_bindgen(js_name = clearTimeout)]
    fn clear_timeout(handle: i32);

    #[wasm_bindgen(js_namespace = performance, js_name = now)]
    fn performance_now() -> f64;
}

/// Errors of the timer module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TimerError {
    /// `setTimeout` threw (no timer support in this global scope).
    #[error("setTimeout failed: {0}")]
    Js(#[from] JsError),
}

/// Milliseconds since the page's time origin, from the monotonic
/// `performance.now()` clock (never goes backwards, unlike `Date.now()`).
pub fn now() -> Duration {
    Duration::from_secs_f64(performance_now().max(0.0) / 1000.0)
}

/// A re-armable one-shot timer. At most one call is pending at a time.
#[derive(Default)]
pub struct Timer {
    pending: Option<Pending>,
}

struct Pending {
    handle: i32,
    fired: Rc<Cell<bool>>,
    // Owned so the JS function stays valid until it fires or is cancelled,
    // and is freed with the timer.
    _closure: Closure<dyn FnMut()>,
}

impl Timer {
    /// A timer with nothing pending.
    pub fn new() -> Self {
        Self::default()
    }

    /// Calls `callback` once after `delay` (clamped to [`MAX_DELAY`]), replacing
    /// any call that is still pending.
    pub fn set(
        &mut self,
        delay: Duration,
        callback: impl FnOnce() + 'static,
    ) -> Result<(), TimerError> {
        self.cancel();
        let fired = Rc::new(Cell::new(false));
        let flag = Rc::clone(&fired);
        let mut callback = Some(callback);
        let closure = Closure::<dyn FnMut()>::new(move || {
            flag.set(true);
            if let Some(callback) = callback.take() {
                callback();
            }
        });
        let delay_ms = i32::try_from(delay.min(MAX_DELAY).as_millis()).unwrap_or(i32::MAX);
        let handle =
            set_timeout(closure.as_ref().unchecked_ref(), delay_ms).map_err(JsError::from)?;
        self.pending = Some(Pending {
            handle,
            fired,
            _closure: closure,
        });
        Ok(())
    }

    /// Cancels the pending call, if any. Safe to call from inside the callback.
    pub fn cancel(&mut self) {
        if let Some(pending) = self.pending.take() {
            if !pending.fired.get() {
                clear_timeout(pending.handle);
            }
        }
    }

    /// True while a call is armed and has not fired yet.
    pub fn is_pending(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| !p.fired.get())
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.cancel();
    }
}
