//! clubcast server library.
//!
//! Data flow: ingest (or the demo source) parses fragmented MP4, cuts it into
//! blocks and publishes them to a [`stream::Stream`], which signs and stores them
//! in a bounded [`store::BlockStore`]. The seeder pushes each new block to club
//! members over WebRTC ([`rtc`]); signaling over `/ws` assigns clubs and links and
//! relays SDP; the origin serves blocks over HTTP within the grants of the bid
//! allocator. RTMP publishers ([`rtmp`]) are remuxed to fragmented MP4 and
//! take the same ingest path. [`kv`] is the public key-value store, `/kv`.
//! [`vod`] stores uploaded fragmented MP4 files as signed on-demand assets
//! (cut into blocks like live ingest) and serves them over `/vod`.

pub mod app;
pub mod config;
pub mod demo;
pub mod grants;
pub mod ingest;
pub mod kv;
pub mod metrics;
pub mod origin;
pub mod resume;
pub mod rtc;
pub mod rtmp;
pub mod seeder;
pub mod signal;
pub mod store;
pub mod stream;
pub mod vod;
