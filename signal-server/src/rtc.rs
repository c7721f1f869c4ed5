//! WebRTC transport: one peer connection carrying one data channel, behind our own trait.
//!
//! The server speaks WebRTC to browsers (as the answerer) and to native test peers (as either
//! side). Two stacks implement [`Transport`] and [`Link`]: [`WebrtcRs`] (the `webrtc` crate,
//! pinned at 0.21.1) and [`Str0m`] (`str0m` 0.25, sans-IO, on our own sockets; host
//! candidates only). The seeder takes either (`--seeder-rtc`), and every loopback test runs
//! on both; a third would touch `rtc/<stack>.rs` alone.
//!
//! # Flow
//!
//! ```text
//! answerer (browser offers)              offerer (native test peer)
//! ------------------------               --------------------------
//! offer  <- signaling                    Transport::connect()   -> offer  -> signaling
//! Transport::accept(offer) -> answer     Link::apply_answer(answer)      <- signaling
//! LinkEvent::LocalCandidate -> signaling (trickle only, both sides)
//! Link::add_remote_candidate <- signaling (trickle only, both sides)
//! LinkEvent::Open, then Message(..) / Writable, and at most one Closed, which is last
//! ```
//!
//! A link carries exactly one binary, ordered, reliable data channel labelled
//! [`CHANNEL_LABEL`]. Any other channel the remote opens is closed at once.
//!
//! # Bounds
//!
//! | what | bound | at the bound |
//! |---|---|---|
//! | one message, either way | [`MAX_MESSAGE`] | send: [`SendError::TooLarge`]; receive: link closed with [`CloseReason::Protocol`] |
//! | bytes accepted but not yet acknowledged by the peer | [`MAX_BUFFERED_BYTES`] | [`SendError::Full`]; [`LinkEvent::Writable`] once it drains to [`LOW_BUFFERED_BYTES`] |
//! | events waiting for the consumer | [`MAX_EVENT_QUEUE`] | the link stops reading from SCTP, so the peer's window closes and the *peer* gets `Full` |
//! | remote candidates per link | [`MAX_REMOTE_CANDIDATES`] | [`RtcError::TooManyCandidates`] |
//! | time from creation to open | [`RtcConfig::open_timeout`] | [`CloseReason::Failed`] |
//!
//! # Measured
//!
//! Observations on a 2-core VM with one host interface (both endpoints in one process for the
//! native figures, both on the same stack), release build; no test asserts them.
//!
//! | what | `webrtc` 0.21.1 | `str0m` 0.25.0 | how |
//! |---|---|---|---|
//! | setup native↔native, `connect()` to both `Open`, trickle (median of 10, in each of 5 runs, 2026-12-06) | 606–608 ms | 2.6–2.8 ms | `examples/rtc_bench.rs` |
//! | one channel, 16 KiB messages, 64 MiB, paced on `Full`/`Writable` (5 runs) | 6.6–63.5 MB/s | 10.0–40.8 MB/s | `examples/rtc_bench.rs` |
//! | one channel, 64 KiB messages (5 runs) | 27.2–45.5 MB/s | 17.9–51.0 MB/s | `examples/rtc_bench.rs` |
//! | headless Chromium 156 as offerer, complete gathering, mDNS-only host candidates | connects 3 of 3; channel open 373–564 ms after page start; 50 × 16 KiB echoed intact | | `examples/rtc_echo.rs` |
//! | the seeder's link to headless Chromium through a relay dropping 10 % of datagrams both ways, share of the stream over it (6 runs of 60 s) | 0.12 | 0.25 | `just bench-loss` |
//!
//! Throughput swings several-fold from run to run with both ends and the machine's other
//! work on two cores; either stack carries many times a stream's 0.1–1 MB/s.
//!
//! The `webrtc` crate's setup time is nearly constant, so it is timers, not work: a 50 ms ICE check interval
//! (default 200 ms) cut it to ~455 ms; the rest was not traced. Throughput depends on how
//! quickly the link re-reads the crate's outstanding bytes: the crate's buffered-amount-low
//! event tracks the SCTP stream rather than those bytes, so the link also polls every few
//! milliseconds while anything is in flight (without that, 16 KiB messages ran at 12 MB/s).
//!
//! A consumer that stops reading its [`LinkEvents`] makes the peer's sender hit `Full` after
//! about 12 MiB (our event queue, the crate's 256-message queue and what it retains past it,
//! and the 1 MiB SCTP window): bounded, but that is the per-link receive-side worst case.

mod budget;
mod handle;
pub mod str0m_rs;
pub mod webrtc_rs;

pub use str0m_rs::{Str0m, Str0mLink};
pub use webrtc_rs::{WebrtcRs, WebrtcRsLink};

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// The label of the one data channel a link carries.
pub const CHANNEL_LABEL: &str = "clubcast";

/// Largest message a link sends or accepts, in bytes (the RFC 8841 default that every browser
/// honours without negotiation).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Most bytes a link holds that the peer has not yet acknowledged; beyond it `try_send` says
/// [`SendError::Full`], so a slow peer costs at most this much memory.
pub const MAX_BUFFERED_BYTES: usize = 1024 * 1024;

/// Buffered amount at or under which a link that refused a send reports
/// [`LinkEvent::Writable`].
pub const LOW_BUFFERED_BYTES: usize = MAX_BUFFERED_BYTES / 4;

/// Events a link queues for its consumer before it stops reading from the network.
pub const MAX_EVENT_QUEUE: usize = 64;

/// Remote ICE candidates a link accepts; a browser sends a handful, so more is abuse.
pub const MAX_REMOTE_CANDIDATES: usize = 64;

/// A session description as the browser's `RTCSessionDescriptionInit` serialises it:
/// `{"type": "offer", "sdp": "v=0..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionDescription {
    /// Whether this is an offer or an answer.
    #[serde(rename = "type")]
    pub kind: SdpKind,
    /// The SDP text.
    pub sdp: String,
}

/// The role of a [`SessionDescription`] in the offer/answer exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SdpKind {
    /// Sent by the side that starts the exchange.
    Offer,
    /// Sent back by the side that received the offer.
    Answer,
}

/// One ICE candidate as the browser's `RTCIceCandidateInit` serialises it:
/// `{"candidate": "candidate:...", "sdpMid": "0", "sdpMLineIndex": 0}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceCandidate {
    /// The `candidate:` attribute line; empty means "end of candidates".
    pub candidate: String,
    /// The media section the candidate belongs to, by `a=mid`.
    #[serde(rename = "sdpMid", default)]
    pub sdp_mid: Option<String>,
    /// The media section the candidate belongs to, by index.
    #[serde(rename = "sdpMLineIndex", default)]
    pub sdp_m_line_index: Option<u16>,
}

/// A STUN or TURN server, as in the browser's `RTCIceServer`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// `stun:host:port`, `turn:host:port?transport=udp`, ...
    pub urls: Vec<String>,
    /// TURN user name; empty for STUN.
    #[serde(default)]
    pub username: String,
    /// TURN password; empty for STUN.
    #[serde(default)]
    pub credential: String,
}

/// How the local side's candidates reach the remote side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Gathering {
    /// The description is returned at once and candidates follow as
    /// [`LinkEvent::LocalCandidate`]: fastest, needs a signaling channel that stays open.
    #[default]
    Trickle,
    /// The description is returned only once gathering is complete and carries every
    /// candidate; no `LocalCandidate` events. One request, one response.
    Complete,
}

/// Settings shared by every link a [`Transport`] makes.
#[derive(Debug, Clone)]
pub struct RtcConfig {
    /// STUN/TURN servers; empty means host candidates only.
    pub ice_servers: Vec<IceServer>,
    /// Local UDP addresses to bind. `0.0.0.0:0` binds every non-loopback IPv4 interface on an
    /// ephemeral port.
    pub udp_bind: Vec<SocketAddr>,
    /// Trickle or complete gathering; see [`Gathering`].
    pub gathering: Gathering,
    /// Longest wait for gathering to complete with [`Gathering::Complete`].
    pub gather_timeout: Duration,
    /// Longest time from creating a link to its channel opening before it is closed as failed.
    pub open_timeout: Duration,
    /// Whether `.local` (mDNS) candidates from the remote are resolved, as Chromium and Safari
    /// send by default. Our own host candidates are always plain IPs.
    pub resolve_mdns: bool,
    /// The address remotes reach our sockets at (a 1:1 NAT's public IP): each socket's host
    /// candidate is signalled at this IP and its own port, in place of its own address.
    /// `None`: as bound. `str0m` only.
    pub public_ip: Option<IpAddr>,
    /// Ports the sockets bind within, inclusive; `None`: ephemeral ports. `str0m` only.
    pub ports: Option<(u16, u16)>,
}

impl Default for RtcConfig {
    fn default() -> Self {
        Self {
            ice_servers: Vec::new(),
            udp_bind: vec![SocketAddr::from(([0, 0, 0, 0], 0))],
            gathering: Gathering::Trickle,
            gather_timeout: Duration::from_secs(5),
            open_timeout: Duration::from_secs(30),
            resolve_mdns: true,
            public_ip: None,
            ports: None,
        }
    }
}

/// Something a link reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkEvent {
    /// A local candidate to relay to the remote through signaling (trickle only).
    LocalCandidate(IceCandidate),
    /// The data channel is open: `try_send` works from now on.
    Open,
    /// One whole message from the remote, at most [`MAX_MESSAGE`] bytes.
    Message(Bytes),
    /// A send was refused with [`SendError::Full`] and the buffer has since drained to
    /// [`LOW_BUFFERED_BYTES`] or less.
    Writable,
    /// The link is gone; this is the last event.
    Closed(CloseReason),
}

/// Why a link closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum CloseReason {
    /// The remote closed the channel or the connection.
    Remote,
    /// ICE or DTLS failed, the connection timed out, or the channel did not open in time.
    Failed,
    /// The remote broke the link's rules (for example a message over [`MAX_MESSAGE`]).
    Protocol,
}

/// The receiving end of a link's events; see [`LinkEvent`].
#[derive(Debug)]
pub struct LinkEvents(mpsc::Receiver<LinkEvent>);

impl LinkEvents {
    /// Wraps a receiver fed by a stack implementation.
    pub(crate) fn new(rx: mpsc::Receiver<LinkEvent>) -> Self {
        Self(rx)
    }

    /// The next event, or `None` after [`LinkEvent::Closed`] or once the link is dropped.
    pub async fn next(&mut self) -> Option<LinkEvent> {
        self.0.recv().await
    }

    /// The next event if one is waiting, without blocking.
    pub fn try_next(&mut self) -> Option<LinkEvent> {
        self.0.try_recv().ok()
    }
}

/// A newly made link, the description to send to the remote, and the link's events.
#[derive(Debug)]
pub struct Handshake<L> {
    /// The link itself; dropping it closes the connection.
    pub link: L,
    /// Our offer (from [`Transport::connect`]) or answer (from [`Transport::accept`]).
    pub local: SessionDescription,
    /// Where the link reports candidates, open, messages and close.
    pub events: LinkEvents,
}

/// A WebRTC stack that makes [`Link`]s.
pub trait Transport: Send + Sync + 'static {
    /// The link type this stack makes.
    type Link: Link;

    /// Answers a remote offer (the browser case) and returns our answer.
    fn accept(
        &self,
        offer: SessionDescription,
    ) -> impl Future<Output = Result<Handshake<Self::Link>, RtcError>> + Send;

    /// Creates the data channel and returns our offer; finish with [`Link::apply_answer`].
    fn connect(&self) -> impl Future<Output = Result<Handshake<Self::Link>, RtcError>> + Send;
}

/// One peer connection with its one data channel. Dropping it closes the connection.
pub trait Link: Send + Sync + 'static {
    /// Applies the remote answer to the offer made by [`Transport::connect`].
    fn apply_answer(
        &self,
        answer: SessionDescription,
    ) -> impl Future<Output = Result<(), RtcError>> + Send;

    /// Adds a candidate the remote trickled; an empty `candidate` (end of candidates) is a
    /// no-op.
    fn add_remote_candidate(
        &self,
        candidate: IceCandidate,
    ) -> impl Future<Output = Result<(), RtcError>> + Send;

    /// Queues one message without waiting; refuses rather than buffer past
    /// [`MAX_BUFFERED_BYTES`].
    fn try_send(&self, message: Bytes) -> Result<(), SendError>;

    /// Bytes accepted by `try_send` that the peer has not yet acknowledged.
    fn buffered_amount(&self) -> usize;

    /// Whether the channel is open (after [`LinkEvent::Open`], before close).
    fn is_open(&self) -> bool;

    /// Closes the connection and waits until its tasks have stopped.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Why a control-plane call on a link or transport failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RtcError {
    /// A description was an answer where an offer was expected, or the reverse.
    #[error("expected an SDP {expected:?}, got {got:?}")]
    WrongSdpKind {
        /// The kind the call needs.
        expected: SdpKind,
        /// The kind it was given.
        got: SdpKind,
    },
    /// The remote description could not be parsed or applied.
    #[error("bad remote description: {0}")]
    BadDescription(String),
    /// A remote candidate could not be parsed or applied.
    #[error("bad remote candidate: {0}")]
    BadCandidate(String),
    /// The remote sent more than [`MAX_REMOTE_CANDIDATES`] candidates.
    #[error("more than {MAX_REMOTE_CANDIDATES} remote candidates")]
    TooManyCandidates,
    /// `apply_answer` was called on a link that answered rather than offered.
    #[error("this link did not make an offer")]
    NotOfferer,
    /// ICE gathering did not finish within [`RtcConfig::gather_timeout`].
    #[error("ICE gathering did not complete in time")]
    GatherTimeout,
    /// The link is already closed.
    #[error("link closed")]
    Closed,
    /// The WebRTC stack failed for a reason of its own (socket, certificate, internal state).
    #[error("webrtc stack: {0}")]
    Stack(String),
}

/// Why [`Link::try_send`] refused a message. Cheap to make and to match on: it is on the hot
/// path of every block pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SendError {
    /// The link already holds close to [`MAX_BUFFERED_BYTES`]; wait for
    /// [`LinkEvent::Writable`] or drop the message.
    #[error("send buffer full ({buffered} bytes buffered)")]
    Full {
        /// Bytes buffered when the message was refused.
        buffered: usize,
    },
    /// The message is over [`MAX_MESSAGE`] bytes.
    #[error("message of {len} bytes is over the {MAX_MESSAGE}-byte limit")]
    TooLarge {
        /// The message's length.
        len: usize,
    },
    /// The channel has not opened yet.
    #[error("channel not open yet")]
    NotOpen,
    /// The link is closed.
    #[error("link closed")]
    Closed,
}
