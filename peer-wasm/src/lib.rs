//! clubcast browser peer.
