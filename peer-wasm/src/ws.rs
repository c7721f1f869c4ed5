//! The signaling WebSocket: JSON text messages in and out.
//!
//! [`SignalSocket::connect`] opens the socket and reports [`WsEvent`]s to one
//! handler: `Open`, each text `Message`, and finally `Closed` with the close
//! code. Outgoing messages are refused, not buffered without end, once the
//! browser holds [`MAX_BUFFERED_BYTES`] unsent. Incoming messages above
//! [`MAX_MESSAGE_BYTES`] and binary frames are reported as errors and dropped,
//! mirroring the server's own limits. Binary frames go out only as the upload
//! probe before the join ([`SignalSocket::send_bytes`]). Closures are owned by the socket; dropping
//! it detaches them and closes the connection.

use std::cell::RefCell;
use std::rc::Rc;

use serde::Serialize;
use wasm_bindgen::prelude::*;
use web_sys::{CloseEvent, Event, MessageEvent, WebSocket};

use crate::error::JsError;

/// Largest signaling message sent or accepted, in bytes (SDP with candidates fits easily).
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Sends are refused while the browser holds this many unsent bytes.
pub const MAX_BUFFERED_BYTES: u32 = 1024 * 1024;
/// Close code for a normal close initiated by us.
pub const CLOSE_NORMAL: u16 = 1000;
/// Close code of a server that closed for a policy reason (kicked for bad
/// blocks, too many bad messages, too slow to read): not worth reopening.
pub const CLOSE_POLICY: u16 = 1008;

/// Errors of the WebSocket glue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WsError {
    /// A browser call failed; `op` names it.
    #[error("{op}: {source}")]
    Js {
        /// The browser call that failed.
        op: &'static str,
        /// What it threw.
        source: JsError,
    },
    /// The socket is not open (still connecting, or closed).
    #[error("websocket not open")]
    NotOpen,
    /// A message is larger than [`MAX_MESSAGE_BYTES`].
    #[error("message of {len} bytes exceeds {max}")]
    TooLarge {
        /// Size of the message.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The browser already holds [`MAX_BUFFERED_BYTES`] unsent.
    #[error("send buffer full")]
    Full,
    /// A binary frame arrived; signaling is text only.
    #[error("unexpected binary message")]
    Binary,
    /// An outgoing value could not be serialized.
    #[error("json: {0}")]
    Json(String),
}

/// What the socket reports to its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WsEvent {
    /// The connection is open; sends go through.
    Open,
    /// A text message arrived (not parsed: the protocol owns the message types).
    Message(String),
    /// An incoming message was dropped; the connection stays open.
    Rejected(WsError),
    /// The connection closed; no more events follow.
    Closed {
        /// The close code (1006 for an abnormal close).
        code: u16,
        /// The close reason sent by the server.
        reason: String,
        /// Whether the closing handshake completed.
        clean: bool,
    },
}

type Handler = Rc<RefCell<dyn FnMut(WsEvent)>>;

/// A WebSocket carrying JSON text messages.
pub struct SignalSocket {
    socket: WebSocket,
    _on_open: Closure<dyn FnMut(Event)>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
}

impl SignalSocket {
    /// Opens a connection to `url` (`ws://` or `wss://`).
    pub fn connect(url: &str, on_event: impl FnMut(WsEvent) + 'static) -> Result<Self, WsError> {
        let socket = WebSocket::new(url).map_err(|e| WsError::Js {
            op: "new WebSocket",
            source: JsError::from(e),
        })?;
        socket.set_binary_type(web_sys::BinaryType::Arraybuffer);
        let handler: Handler = Rc::new(RefCell::new(on_event));

        let h = Rc::clone(&handler);
        let on_open = Closure::<dyn FnMut(Event)>::new(move |_: Event| emit(&h, WsEvent::Open));
        let h = Rc::clone(&handler);
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |ev: MessageEvent| {
            let event = match ev.data().as_string() {
                Some(text) if text.len() > MAX_MESSAGE_BYTES => {
                    WsEvent::Rejected(WsError::TooLarge {
                        len: text.len(),
                        max: MAX_MESSAGE_BYTES,
                    })
                }
                Some(text) => WsEvent::Message(text),
                None => WsEvent::Rejected(WsError::Binary),
            };
            emit(&h, event);
        });
        let h = Rc::clone(&handler);
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |ev: CloseEvent| {
            emit(
                &h,
                WsEvent::Closed {
                    code: ev.code(),
                    reason: ev.reason(),
                    clean: ev.was_clean(),
                },
            );
        });
        socket.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        socket.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        socket.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        Ok(Self {
            socket,
            _on_open: on_open,
            _on_message: on_message,
            _on_close: on_close,
        })
    }

    /// Sends one text message.
    pub fn send_text(&self, text: &str) -> Result<(), WsError> {
        if text.len() > MAX_MESSAGE_BYTES {
            return Err(WsError::TooLarge {
                len: text.len(),
                max: MAX_MESSAGE_BYTES,
            });
        }
        self.writable()?;
        sent(self.socket.send_with_str(text))
    }

    /// Sends one binary frame (the upload probe, before the join).
    pub fn send_bytes(&self, bytes: &[u8]) -> Result<(), WsError> {
        self.writable()?;
        sent(self.socket.send_with_u8_array(bytes))
    }

    /// Whether a message may go now: the socket is open and holds less than
    /// [`MAX_BUFFERED_BYTES`] unsent.
    fn writable(&self) -> Result<(), WsError> {
        if self.socket.ready_state() != WebSocket::OPEN {
            return Err(WsError::NotOpen);
        }
        if self.socket.buffered_amount() >= MAX_BUFFERED_BYTES {
            return Err(WsError::Full);
        }
        Ok(())
    }

    /// Bytes the browser holds unsent.
    pub fn buffered_amount(&self) -> u32 {
        self.socket.buffered_amount()
    }

    /// Serializes `message` to JSON and sends it.
    pub fn send_json<T: Serialize + ?Sized>(&self, message: &T) -> Result<(), WsError> {
        let text = serde_json::to_string(message).map_err(|e| WsError::Json(e.to_string()))?;
        self.send_text(&text)
    }

    /// True while the connection is open.
    pub fn is_open(&self) -> bool {
        self.socket.ready_state() == WebSocket::OPEN
    }

    /// Starts a normal close; the `Closed` event follows.
    pub fn close(&self, reason: &str) {
        self.socket
            .close_with_code_and_reason(CLOSE_NORMAL, reason)
            .ok();
    }
}

impl Drop for SignalSocket {
    fn drop(&mut self) {
        self.socket.set_onopen(None);
        self.socket.set_onmessage(None);
        self.socket.set_onclose(None);
        self.socket.close_with_code(CLOSE_NORMAL).ok();
    }
}

fn emit(handler: &Handler, event: WsEvent) {
    // Dispatched from the event loop only, so the handler is never borrowed
    // twice; a re-entrant event would be dropped rather than panic.
    if let Ok(mut f) = handler.try_borrow_mut() {
        f(event);
    }
}

/// The signaling URL for a server's HTTP base URL: `http(s)://host/…` becomes
/// `ws(s)://host/ws`.
pub fn signal_url(server: &str) -> String {
    let base = server.trim_end_matches('/');
    let base = if let Some(rest) = base.strip_prefix("https://") {
        format!("wss://{rest}")
    } else if let Some(rest) = base.strip_prefix("http://") {
        format!("ws://{rest}")
    } else {
        base.to_owned()
    };
    format!("{base}/ws")
}

/// The result of a `WebSocket.send`.
fn sent(r: Result<(), JsValue>) -> Result<(), WsError> {
    r.map_err(|e| WsError::Js {
        op: "WebSocket.send",
        source: JsError::from(e),
    })
}

#[cfg(test)]
mod tests {
    use super::signal_url;

    #[test]
    fn http_base_becomes_ws_endpoint() {
        assert_eq!(
            signal_url("http://127.0.0.1:8080"),
            "ws://127.0.0.1:8080/ws"
        );
        assert_eq!(signal_url("https://example.org/"), "wss://example.org/ws");
        assert_eq!(signal_url("ws://h:1"), "ws://h:1/ws");
    }
}
