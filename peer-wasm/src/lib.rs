//! clubcast browser peer.
//!
//! Data flow: the signaling socket ([`ws`]) brings club and link assignments;
//! each link is an [`rtc::RtcLink`] whose verified blocks feed the protocol
//! core (`clubcast-protocol`), which decides what to relay and what to play;
//! playable bytes go to [`mse::MseSink`]; gaps are filled over [`fetch`]; the
//! core's `poll_timeout` arms a [`timer::Timer`]. These modules are the thin,
//! owned-closure glue to the browser; JS errors become typed errors ([`error`]).
//! [`kv`] gives JavaScript the key-value store's private slots. [`vod`] plays
//! an on-demand asset from the origin, verified against its signed manifest.

// `stats()` is one `json!` object of many keys.
#![recursion_limit = "256"]

pub mod clock;
pub mod error;
pub mod fetch;
pub mod kv;
mod links;
pub mod mse;
mod player;
pub mod playout;
pub mod rtc;
mod session;
pub mod timer;
pub mod video;
pub mod vod;
pub mod ws;

pub use kv::{KvSecret, KvShared};
pub use player::WasmPlayer;
pub use vod::VodPlayer;
