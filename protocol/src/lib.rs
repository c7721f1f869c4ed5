//! Sans-IO core of clubcast.
//!
//! Data flow: the server's [`block::StreamSigner`] cuts and signs blocks; the
//! [`source::Source`] picks which club members the seeder pushes each block to;
//! every viewer runs a [`peer::Peer`], which verifies blocks, relays its own clubs'
//! blocks, serves last-hop subscribers, pulls what is missing and asks the origin
//! for gap fill through [`bid`]s. [`wire`] encodes what peers say to each other;
//! [`signal`] is the JSON spoken with the server; [`club`] assigns clubs and links.
//! [`kv`] signs the public key-value store's items and derives the keys two
//! parties share to use it privately. [`vod`] is an on-demand asset's signed
//! manifest and the cursor that plans its fetches.
//!
//! Nothing here reads a clock, draws randomness of its own, spawns or does I/O:
//! time is an argument ([`Time`]) and randomness comes from an injected RNG.

pub mod bid;
pub mod block;
pub mod club;
pub mod kv;
pub mod peer;
#[cfg(any(test, feature = "fuzzing"))]
pub mod peer_ops;
pub mod prefetch;
pub mod probe;
mod seqmap;
pub mod signal;
pub mod source;
mod time;
mod vecmap;
pub mod vod;
pub mod wire;

pub use time::Time;
