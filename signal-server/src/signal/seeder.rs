//! The in-process seeder's side of signaling: peer [`SEEDER_PEER_ID`] of every swarm.
//!
//! The seeder (WebRTC, wired elsewhere) calls [`Hub::attach_seeder`] once and
//! owns the returned [`SeederHandle`]:
//! - [`SeederHandle::recv`] yields [`SeederEvent`]s: SDP/ICE that peers sent to
//!   peer 0, and link roles of peer 0 added or removed by membership changes.
//! - [`SeederHandle::signal`] sends SDP/ICE back to a peer (`from` = 0).
//! - [`SeederHandle::link_failed`] asks for a replacement when a seed's
//!   connection fails or it is too slow (`SourceEvent::SlowSeed`).
//! - [`SeederHandle::links`] is a snapshot of peer 0's links in one stream, to
//!   resynchronise after attaching late or after missing events.
//!
//! The event queue is bounded ([`SEEDER_QUEUE`]); when it is full, events are
//! dropped, counted as `seeder_queue_full` rejects and logged, and the seeder
//! should resynchronise with [`SeederHandle::links`]. With no seeder attached,
//! peers that signal to peer 0 get `unknown_peer`.

use std::sync::Arc;

use clubcast_protocol::signal::{Link, LinkOp, PeerId, SignalData};
use tokio::sync::mpsc;

use super::{Hub, SignalError};
use crate::stream::Stream;

/// Capacity of the hub → seeder event queue.
pub const SEEDER_QUEUE: usize = 8192;

/// Something the seeder must act on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum SeederEvent {
    /// A peer sent SDP or ICE to the seeder.
    Signal {
        /// The stream whose swarm the peer is in.
        stream: Arc<Stream>,
        /// The peer.
        from: PeerId,
        /// The payload.
        data: SignalData,
    },
    /// A link role of the seeder was added or removed. `link.peer` is the
    /// viewer; `link.role` is the seeder's side (`Upload` to a seed,
    /// `Subscriber` for a club with no members).
    Link {
        /// The stream.
        stream: Arc<Stream>,
        /// Add or remove.
        op: LinkOp,
        /// The link as the seeder sees it.
        link: Link,
    },
}

/// The seeder's end of signaling. Dropping it detaches the seeder.
#[derive(Debug)]
pub struct SeederHandle {
    pub(super) hub: Hub,
    pub(super) rx: mpsc::Receiver<SeederEvent>,
}

impl SeederHandle {
    /// The next event; `None` once the hub shuts down or another seeder attached.
    pub async fn recv(&mut self) -> Option<SeederEvent> {
        self.rx.recv().await
    }

    /// Sends SDP or ICE to `to` in stream `stream` (id or name). The peer must
    /// hold a link with the seeder.
    pub fn signal(&self, stream: &str, to: PeerId, data: SignalData) -> Result<(), SignalError> {
        self.hub.seeder_signal(stream, to, data)
    }

    /// The seeder's connection to `peer` failed or is too slow: replace it.
    pub fn link_failed(&self, stream: &str, peer: PeerId) -> Result<(), SignalError> {
        self.hub.seeder_link_failed(stream, peer)
    }

    /// The seeder's current links in `stream`.
    pub fn links(&self, stream: &str) -> Vec<Link> {
        self.hub.seeder_links(stream)
    }
}
