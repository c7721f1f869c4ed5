//! On-demand playback: the JS API (`VodPlayer`) for an asset uploaded to the
//! server, played from the origin over HTTP with every byte verified.
//!
//! Flow: `GET <server>/vod/<name>/manifest` is verified under its own key
//! (and must carry the pinned key, if one is given); the init segment
//! (`/init`) must match the manifest's length and SHA-256, and its sample
//! entries name the codecs for the [`MseSink`](crate::mse::MseSink). Then
//! the manifest's [`VodCursor`](clubcast_protocol::vod::VodCursor) plans
//! runs of whole fragments up to [`VodOptions::ahead_s`] past the playhead,
//! each fetched with `GET /blocks?from=&count=`; a run is appended only if
//! every block verifies under the asset key and the seqs are exactly the ones
//! asked for ([`run::accept_run`]). A seek to media that is not buffered
//! drops what is in flight and moves the cursor to the keyframe fragment
//! before the target. The driver is `session::VodSession`, run by the same
//! run loop (`player::Hub`) as the live player.
//!
//! Unless `p2p: false`, the player also joins the swarm of viewers of the
//! same upload (`p2p`): neighbours trade verified blocks over WebRTC data
//! channels, and the HTTP transfer stops once the swarm alone keeps up
//! (the switch-over rule of `clubcast_protocol::vod::swarm`); the origin is
//! then the backstop for blocks about to be due.

mod p2p;
pub mod run;
mod session;

use std::rc::Rc;

use clubcast_protocol::block::StreamKey;
use clubcast_protocol::vod::{valid_name, VodError};
use serde::Deserialize;
use wasm_bindgen::prelude::*;
use web_sys::HtmlMediaElement;

use crate::fetch::FetchError;
use crate::mse::MseError;
use crate::player::Hub;
use crate::playout::InitError;
use crate::rtc::IceServer;

pub use run::{accept_run, RunError};
use session::VodSession;

/// How far past the playhead media is fetched by default, seconds.
pub const DEFAULT_AHEAD_S: f64 = 30.0;
/// Least `ahead_s` accepted, seconds: less would stall between fetches.
pub const MIN_AHEAD_S: f64 = 1.0;
/// Most `ahead_s` accepted, seconds: the source buffer holds about this
/// much (at 8 Mbit/s, 10 minutes is 600 MB, past Chrome's quota).
pub const MAX_AHEAD_S: f64 = 600.0;

/// Errors of on-demand playback; each has a stable [`PlayError::code`] for
/// the `error` event.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlayError {
    /// The options do not parse or are out of range.
    #[error("bad options: {0}")]
    BadOptions(String),
    /// The manifest is signed by another key than the one pinned.
    #[error("the asset's key is {got}, not the pinned {pinned}")]
    WrongKey {
        /// The pinned key (stream id form).
        pinned: String,
        /// The manifest's key.
        got: String,
    },
    /// The manifest does not parse, or its signature or the init segment
    /// does not check out.
    #[error("{0}")]
    Manifest(#[from] VodError),
    /// The init segment names no track or codec the player knows.
    #[error("init segment: {0}")]
    Init(#[from] InitError),
    /// A run of blocks failed its checks; nothing of it was appended.
    #[error("{0}")]
    Run(#[from] RunError),
    /// The server has no asset of that name (404).
    #[error("no on-demand asset {0:?} on this server")]
    UnknownAsset(String),
    /// The asset was replaced while it played (409 `asset_replaced`): its
    /// blocks are now another upload's, under another key.
    #[error("on-demand asset {0:?} was replaced on the server while it played; play it again to get the new upload")]
    Replaced(String),
    /// The server refused a request (a 4xx other than 404 and 429).
    #[error("{what}: HTTP {status}")]
    Http {
        /// What was being fetched.
        what: &'static str,
        /// The status.
        status: u16,
    },
    /// A fetch failed more often than the player retries.
    #[error("{what}: {source} (gave up after {attempts} attempts)")]
    Network {
        /// What was being fetched.
        what: &'static str,
        /// The last failure.
        source: FetchError,
        /// Attempts made.
        attempts: u32,
    },
    /// The browser has no Media Source Extensions.
    #[error("this browser has no Media Source Extensions (MediaSource or ManagedMediaSource), so it cannot play")]
    NoMediaSource,
    /// The media source failed.
    #[error("{0}")]
    Mse(MseError),
    /// Listening on the media element failed, or it reported an error.
    #[error("media element: {0}")]
    Media(String),
}

impl PlayError {
    /// Stable code for the `error` event.
    pub fn code(&self) -> &'static str {
        match self {
            PlayError::BadOptions(_) => "bad_options",
            PlayError::WrongKey { .. } => "wrong_key",
            PlayError::Manifest(e) => e.code(),
            PlayError::Init(_) => "bad_init",
            PlayError::Run(e) => e.code(),
            PlayError::UnknownAsset(_) => "unknown_asset",
            PlayError::Replaced(_) => "asset_replaced",
            PlayError::Http { .. } => "http",
            PlayError::Network { .. } => "network",
            PlayError::NoMediaSource => "no_mse",
            PlayError::Mse(_) => "mse",
            PlayError::Media(_) => "media",
        }
    }
}

/// The options of a `VodPlayer`, as JSON: `{server?, vod, key?, ahead_s?,
/// autoplay_muted?, p2p?, ice_servers?}`; unknown fields are ignored (`clubcast.js` passes the
/// live player's defaults too).
#[derive(Deserialize)]
struct RawOptions {
    #[serde(default)]
    server: Option<String>,
    #[serde(default)]
    vod: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    ahead_s: Option<f64>,
    #[serde(default)]
    autoplay_muted: Option<bool>,
    #[serde(default)]
    p2p: Option<bool>,
    #[serde(default)]
    ice_servers: Vec<IceServer>,
}

/// Checked options of a `VodPlayer`.
#[derive(Debug, Clone, PartialEq)]
pub struct VodOptions {
    /// HTTP base of the server, without a trailing `/`; `None`: the page's origin.
    pub server: Option<String>,
    /// The asset's name.
    pub name: String,
    /// The key the asset must be signed with, if pinned.
    pub key: Option<StreamKey>,
    /// How far past the playhead media is fetched, seconds.
    pub ahead_s: f64,
    /// If the browser refuses to start with sound, mute and start (else wait
    /// for the user).
    pub autoplay_muted: bool,
    /// Trade blocks with other viewers of the upload (false: the origin only).
    pub p2p: bool,
    /// ICE servers; empty: the server's.
    pub ice_servers: Vec<IceServer>,
}

impl VodOptions {
    /// Parses and checks the options JSON.
    pub fn parse(json: &str) -> Result<VodOptions, PlayError> {
        let raw: RawOptions =
            serde_json::from_str(json).map_err(|e| PlayError::BadOptions(e.to_string()))?;
        if !valid_name(&raw.vod) {
            return Err(PlayError::BadOptions(format!(
                "vod {:?} is not an asset name (1-64 of a-z, 0-9, '-', '_')",
                raw.vod
            )));
        }
        let key = match raw.key.as_deref().filter(|k| !k.is_empty()) {
            Some(id) => Some(
                StreamKey::from_id(id).map_err(|e| PlayError::BadOptions(format!("key: {e}")))?,
            ),
            None => None,
        };
        let ahead_s = raw.ahead_s.unwrap_or(DEFAULT_AHEAD_S);
        if !(MIN_AHEAD_S..=MAX_AHEAD_S).contains(&ahead_s) {
            return Err(PlayError::BadOptions(format!(
                "ahead_s must be {MIN_AHEAD_S} to {MAX_AHEAD_S} seconds"
            )));
        }
        let server = raw
            .server
            .filter(|s| !s.is_empty())
            .map(|s| s.trim_end_matches('/').to_owned());
        Ok(VodOptions {
            server,
            name: raw.vod,
            key,
            ahead_s,
            autoplay_muted: raw.autoplay_muted.unwrap_or(true),
            p2p: raw.p2p.unwrap_or(true),
            ice_servers: raw.ice_servers,
        })
    }
}

/// An on-demand player bound to one media element. Same shape as
/// `WasmPlayer`; see `web/clubcast.js`.
#[wasm_bindgen]
pub struct VodPlayer {
    shared: Rc<Hub<VodSession>>,
}

#[wasm_bindgen]
impl VodPlayer {
    /// Starts playing. `opts_json`: `{server, vod, key, ahead_s,
    /// autoplay_muted}`; unknown fields are ignored. Throws an `Error` with a
    /// `code` on bad options.
    #[wasm_bindgen(constructor)]
    pub fn new(video: HtmlMediaElement, opts_json: &str) -> Result<VodPlayer, JsValue> {
        let thrown = |e: PlayError| {
            let err = js_sys::Error::new(&format!("clubcast: {e}"));
            // `clubcast.js` passes the code on in its `error` event.
            let _ = js_sys::Reflect::set(&err, &"code".into(), &e.code().into());
            JsValue::from(err)
        };
        let opts = VodOptions::parse(opts_json).map_err(thrown)?;
        let shared: Rc<Hub<VodSession>> = Rc::new(Hub::default());
        let session = VodSession::start(Rc::downgrade(&shared), video, opts).map_err(thrown)?;
        *shared.session.borrow_mut() = Some(session);
        Ok(VodPlayer { shared })
    }

    /// Counters and playback state as a plain object (`STAT_FIELDS` in
    /// `web/clubcast.js`, plus `position_s` and `duration_s`).
    pub fn stats(&self) -> JsValue {
        self.shared.stats()
    }

    /// Registers the one callback that receives every event `{type, ...}`.
    pub fn on(&self, cb: js_sys::Function) {
        self.shared.on(cb);
    }

    /// Stops fetching and detaches the media source. Idempotent.
    pub fn destroy(&self) {
        self.shared.destroy();
    }
}
