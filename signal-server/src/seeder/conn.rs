//! One seeder connection to a peer, from the offer to the close.
//!
//! ```text
//! offer -> Queued --(a handshake slot frees)--> Accepting --accept()--> Up{open: false} --Open--> Up{open: true}
//!            |                                     |                         |                      |
//!            +-- expired / refused                 +-- accept failed         +------ Closed --------+
//! ```
//!
//! `Accepting` and `Up{open: false}` count as pending handshakes
//! ([`super::SeederConfig::max_pending_handshakes`]); `Queued` offers wait for a slot
//! ([`super::SeederConfig::max_queued_offers`]). Remote candidates that arrive before the link
//! exists are held, at most [`MAX_REMOTE_CANDIDATES`] of them.

use std::sync::Arc;
use std::time::Instant;

use crate::rtc::{IceCandidate, SessionDescription, MAX_REMOTE_CANDIDATES};
use crate::stream::Stream;

use super::frames::Dialogue;

/// Where a connection is in its life.
pub(crate) enum State<L> {
    /// The offer waits for a handshake slot.
    Queued {
        /// The peer's offer.
        offer: SessionDescription,
        /// When it arrived; it expires after `queued_offer_ttl`.
        since: Instant,
    },
    /// `Transport::accept` runs as task `task`.
    Accepting {
        /// The accept task, to recognise it if it panics.
        task: tokio::task::Id,
    },
    /// The link exists; `open` once its channel opened.
    Up {
        /// The link; the seeder holds the only long-lived reference, so removing the
        /// connection closes it.
        link: Arc<L>,
        /// Whether the channel is open.
        open: bool,
    },
}

/// The seeder's connection to one peer.
pub(crate) struct Conn<L> {
    /// The stream whose swarm the peer is in.
    pub(crate) stream: Arc<Stream>,
    /// Tells this connection's events from those of the one it replaced.
    pub(crate) gen: u64,
    /// The peer's number for this connection attempt, from its offer: the
    /// answer and our candidates carry it, and its candidates for another
    /// attempt are dropped ([`clubcast_protocol::signal::SignalData`]).
    pub(crate) remote_conn: Option<u64>,
    /// Where it is.
    pub(crate) state: State<L>,
    /// Remote candidates held until the link exists.
    pub(crate) candidates: Vec<IceCandidate>,
    /// Hello, ping and want handling.
    pub(crate) dialogue: Dialogue,
}

impl<L> Conn<L> {
    /// Whether the connection holds a handshake slot.
    pub(crate) fn is_pending(&self) -> bool {
        matches!(
            self.state,
            State::Accepting { .. } | State::Up { open: false, .. }
        )
    }

    /// Whether the offer still waits for a slot.
    pub(crate) fn is_queued(&self) -> bool {
        matches!(self.state, State::Queued { .. })
    }

    /// The link, once its channel is open.
    pub(crate) fn open_link(&self) -> Option<&Arc<L>> {
        match &self.state {
            State::Up { link, open: true } => Some(link),
            _ => None,
        }
    }

    /// Holds a remote candidate until the link exists; returns false (and drops it) past
    /// [`MAX_REMOTE_CANDIDATES`].
    pub(crate) fn hold_candidate(&mut self, candidate: IceCandidate) -> bool {
        if self.candidates.len() >= MAX_REMOTE_CANDIDATES {
            return false;
        }
        self.candidates.push(candidate);
        true
    }
}
