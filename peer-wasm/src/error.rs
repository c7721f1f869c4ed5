//! Typed form of the values JavaScript throws.
//!
//! Browser APIs fail by throwing (or rejecting with) a `JsValue`, usually a
//! `DOMException` whose `name` says what went wrong. The glue modules turn each
//! such value into a [`JsError`] right at the call site, so the rest of the peer
//! matches on variants instead of on strings.

use wasm_bindgen::{JsCast, JsValue};

/// A JavaScript exception, classified by its `name`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsError {
    /// `QuotaExceededError`: a buffer (SourceBuffer, storage) is full.
    #[error("quota exceeded: {0}")]
    QuotaExceeded(String),
    /// `InvalidStateError`: the object is closed or not in a state that allows the call.
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// `NotSupportedError`: the browser lacks the feature or codec.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// `OperationError`: the operation failed inside the browser (e.g. SDP negotiation).
    #[error("operation failed: {0}")]
    Operation(String),
    /// `NotAllowedError`: the browser or the user refused, e.g. `play()` with
    /// sound before any user gesture (the autoplay policy).
    #[error("not allowed: {0}")]
    NotAllowed(String),
    /// `AbortError`: the operation was aborted, usually by our own `AbortController`.
    #[error("aborted: {0}")]
    Aborted(String),
    /// `NetworkError`, or the `TypeError` that `fetch` rejects with on network failure.
    #[error("network error: {0}")]
    Network(String),
    /// `SyntaxError`: a malformed URL, SDP or candidate.
    #[error("syntax error: {0}")]
    Syntax(String),
    /// `TypeError`: an argument of the wrong type (outside of `fetch`).
    #[error("type error: {0}")]
    Type(String),
    /// Any other `Error` or `DOMException`, with its name.
    #[error("{name}: {message}")]
    Other {
        /// The exception's `name`.
        name: String,
        /// The exception's `message`.
        message: String,
    },
    /// A thrown value that is not an `Error` object, rendered as a string.
    #[error("non-error thrown: {0}")]
    NonError(String),
}

impl JsError {
    /// Classifies a thrown value that came from `fetch`, where `TypeError` means
    /// a network failure rather than a programming error.
    pub fn from_fetch(value: JsValue) -> Self {
        match Self::from(value) {
            JsError::Type(message) => JsError::Network(message),
            other => other,
        }
    }

    /// True for `QuotaExceededError`.
    pub fn is_quota_exceeded(&self) -> bool {
        matches!(self, JsError::QuotaExceeded(_))
    }
}

impl From<JsValue> for JsError {
    fn from(value: JsValue) -> Self {
        // DOMException is not an `Error` subclass in every engine, so read
        // `name` and `message` as plain properties.
        if value.is_object() {
            let name = property(&value, "name");
            let message = property(&value, "message");
            if let Some(name) = name {
                let message = message.unwrap_or_default();
                return classify(&name, message);
            }
        }
        if let Some(text) = value.as_string() {
            return JsError::NonError(text);
        }
        match value.dyn_ref::<js_sys::Object>() {
            Some(object) => JsError::NonError(String::from(object.to_string())),
            None => JsError::NonError(format!("{value:?}")),
        }
    }
}

fn property(value: &JsValue, key: &str) -> Option<String> {
    js_sys::Reflect::get(value, &JsValue::from_str(key))
        .ok()
        .and_then(|v| v.as_string())
}

fn classify(name: &str, message: String) -> JsError {
    match name {
        "QuotaExceededError" => JsError::QuotaExceeded(message),
        "InvalidStateError" => JsError::InvalidState(message),
        "NotSupportedError" => JsError::NotSupported(message),
        "OperationError" => JsError::Operation(message),
        "NotAllowedError" => JsError::NotAllowed(message),
        "AbortError" => JsError::Aborted(message),
        "NetworkError" => JsError::Network(message),
        "SyntaxError" => JsError::Syntax(message),
        "TypeError" => JsError::Type(message),
        _ => JsError::Other {
            name: name.to_owned(),
            message,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_variants() {
        assert_eq!(
            classify("QuotaExceededError", "full".into()),
            JsError::QuotaExceeded("full".into())
        );
        assert!(classify("QuotaExceededError", String::new()).is_quota_exceeded());
        assert_eq!(
            classify("NotAllowedError", "autoplay".into()),
            JsError::NotAllowed("autoplay".into())
        );
        assert_eq!(
            classify("WeirdError", "x".into()),
            JsError::Other {
                name: "WeirdError".into(),
                message: "x".into()
            }
        );
    }
}
