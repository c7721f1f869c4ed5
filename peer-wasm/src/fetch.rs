//! HTTP `GET` of whole bodies: init segments, origin blocks, manifests.
//!
//! [`fetch_bytes`] resolves to the status and the body for a 2xx answer and to
//! a typed [`FetchError`] otherwise. A 429 (the origin refusing a fetch beyond
//! the peer's grant) carries the server's `Retry-After`, so the driver can back
//! off and re-bid instead of retrying blindly. Bodies are capped at
//! [`MAX_BODY_BYTES`]. An [`Abort`] cancels a transfer, which is how the
//! download switch-over stops the HTTP side; dropping the `Abort` cancels too.

use std::time::Duration;

use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;
use web_sys::{AbortController, Headers, Request, RequestInit, Response};

use crate::error::JsError;

/// Largest body accepted, in bytes. Blocks are 4 KiB by default and init segments a few
/// KiB; whole files arrive block by block, never as one body.
pub const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

#[wasm_bindgen]
extern "C" {
    // The global `fetch`, so this works in windows and workers alike.
    #[wasm_bindgen(js_name = fetch)]
    fn global_fetch(request: &Request) -> js_sys::Promise;
}

/// Errors of the fetch glue.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// Building the request or reading the body failed; `op` names the call.
    #[error("{op}: {source}")]
    Js {
        /// The browser call that failed.
        op: &'static str,
        /// What it threw.
        source: JsError,
    },
    /// The request never got an HTTP answer (DNS, refused, CORS, offline).
    #[error("network: {0}")]
    Network(JsError),
    /// The transfer was cancelled through its [`Abort`].
    #[error("aborted")]
    Aborted,
    /// The server answered 429; retry after this long if it said.
    #[error("rate limited (retry after {retry_after:?})")]
    RateLimited {
        /// Parsed `Retry-After` (delay-seconds form), if present and valid.
        retry_after: Option<Duration>,
    },
    /// The server answered with a status other than 2xx or 429.
    #[error("HTTP status {0}")]
    Status(u16),
    /// The body (or its announced `Content-Length`) exceeds [`MAX_BODY_BYTES`].
    #[error("body of {len} bytes exceeds {max}")]
    TooLarge {
        /// Size of the body.
        len: usize,
        /// The limit.
        max: usize,
    },
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The HTTP status (2xx).
    pub status: u16,
    /// The whole body.
    pub bytes: Vec<u8>,
}

/// Cancels a transfer. Dropping it cancels too, so a driver stops a transfer
/// by dropping the value it keeps for it.
pub struct Abort {
    controller: AbortController,
}

impl Abort {
    /// A fresh abort handle.
    pub fn new() -> Result<Self, FetchError> {
        let controller = AbortController::new().map_err(|e| FetchError::Js {
            op: "new AbortController",
            source: JsError::from(e),
        })?;
        Ok(Self { controller })
    }

    /// Cancels the transfer (no effect once it has finished).
    pub fn abort(&self) {
        self.controller.abort();
    }
}

impl Drop for Abort {
    fn drop(&mut self) {
        self.controller.abort();
    }
}

/// `GET url` with extra `headers`, cancellable through `abort`.
pub async fn fetch_bytes(
    url: &str,
    headers: &[(&str, &str)],
    abort: Option<&Abort>,
) -> Result<Fetched, FetchError> {
    let js = |op: &'static str| {
        move |e: JsValue| FetchError::Js {
            op,
            source: JsError::from(e),
        }
    };
    let init = RequestInit::new();
    init.set_method("GET");
    let header_map = Headers::new().map_err(js("new Headers"))?;
    for (name, value) in headers {
        header_map
            .append(name, value)
            .map_err(js("Headers.append"))?;
    }
    init.set_headers(&header_map);
    if let Some(abort) = abort {
        init.set_signal(Some(&abort.controller.signal()));
    }
    let request = Request::new_with_str_and_init(url, &init).map_err(js("new Request"))?;

    let response: Response = JsFuture::from(global_fetch(&request))
        .await
        .map_err(network_or_abort)?
        .unchecked_into();
    let status = response.status();
    if status == 429 {
        let retry_after = response
            .headers()
            .get("retry-after")
            .ok()
            .flatten()
            .and_then(|v| parse_retry_after(&v));
        return Err(FetchError::RateLimited { retry_after });
    }
    if !(200..300).contains(&status) {
        return Err(FetchError::Status(status));
    }
    if let Some(len) = response
        .headers()
        .get("content-length")
        .ok()
        .flatten()
        .and_then(|v| v.trim().parse::<usize>().ok())
    {
        check_size(len)?;
    }
    let body = JsFuture::from(
        response
            .array_buffer()
            .map_err(js("Response.arrayBuffer"))?,
    )
    .await
    .map_err(network_or_abort)?;
    let bytes = js_sys::Uint8Array::new(&body);
    check_size(bytes.length() as usize)?;
    Ok(Fetched {
        status,
        bytes: bytes.to_vec(),
    })
}

fn network_or_abort(value: JsValue) -> FetchError {
    match JsError::from_fetch(value) {
        JsError::Aborted(_) => FetchError::Aborted,
        other => FetchError::Network(other),
    }
}

fn check_size(len: usize) -> Result<(), FetchError> {
    if len > MAX_BODY_BYTES {
        return Err(FetchError::TooLarge {
            len,
            max: MAX_BODY_BYTES,
        });
    }
    Ok(())
}

/// Parses the delay-seconds form of `Retry-After`. The HTTP-date form is not
/// used by our origin and yields `None`, as does anything malformed.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    value
        .trim()
        .parse::<u32>()
        .ok()
        .map(|s| Duration::from_secs(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_seconds_parse_and_junk_does_not() {
        assert_eq!(parse_retry_after(" 3 "), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("0"), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(parse_retry_after("-1"), None);
    }

    #[test]
    fn body_cap_is_enforced() {
        assert!(check_size(MAX_BODY_BYTES).is_ok());
        assert_eq!(
            check_size(MAX_BODY_BYTES + 1),
            Err(FetchError::TooLarge {
                len: MAX_BODY_BYTES + 1,
                max: MAX_BODY_BYTES
            })
        );
    }
}
