//! Signaling messages: the JSON spoken over the server's `GET /ws`.
//!
//! Flow: a client that does not state its upload first sends its upload
//! probe as binary frames ([`crate::probe`]); then it sends
//! [`ClientMsg::Join`]; the server answers
//! [`ServerMsg::Welcome`] with the clubs and links it assigned. After that the
//! socket carries SDP and ICE relay ([`ClientMsg::Signal`] → [`ServerMsg::Signal`]),
//! link changes ([`ServerMsg::Link`]) when a peer leaves or fails, heartbeats,
//! bids answered with grants, and reports of bad blocks. Every message is an
//! object with a `type` tag and a version field `v`; unknown or malformed
//! messages get [`ServerMsg::Error`] with a stable [`ErrorCode`].

use serde::{Deserialize, Serialize};

/// Version of the signaling protocol; every message carries it as `v`.
pub const SIGNAL_VERSION: u32 = 1;
/// Largest signaling message the server accepts, in bytes.
pub const MAX_SIGNAL_MESSAGE: usize = 16 * 1024;
/// Peer id the server's seeder uses. Viewers get ids from 1 up.
pub const SEEDER_PEER_ID: u64 = 0;

/// A server-assigned peer id, unique within one server process.
pub type PeerId = u64;

/// What a link is for, seen from the peer that receives the message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum LinkRole {
    /// The remote pushes blocks of `club` (ours) to us; we send it HAVEs.
    Download {
        /// The club.
        club: u16,
    },
    /// We push blocks of `club` (ours) to the remote.
    Upload {
        /// The club.
        club: u16,
    },
    /// The remote, a member of `club`, is our last-hop source for it: it pushes
    /// the blocks with `(seq / clubs) % share_count == share`.
    Source {
        /// The club.
        club: u16,
        /// Which share of the club's blocks this source pushes.
        share: u8,
        /// Into how many shares the club's blocks are split.
        share_count: u8,
    },
    /// We serve the remote, a non-member, as last hop for `club` (ours).
    Subscriber {
        /// The club.
        club: u16,
        /// Which share of the club's blocks we push.
        share: u8,
        /// Into how many shares the club's blocks are split.
        share_count: u8,
    },
}

impl LinkRole {
    /// The club the role is about.
    pub fn club(&self) -> u16 {
        match *self {
            LinkRole::Download { club }
            | LinkRole::Upload { club }
            | LinkRole::Source { club, .. }
            | LinkRole::Subscriber { club, .. } => club,
        }
    }

    /// The same link seen from the remote's side.
    pub fn mirror(&self) -> LinkRole {
        match *self {
            LinkRole::Download { club } => LinkRole::Upload { club },
            LinkRole::Upload { club } => LinkRole::Download { club },
            LinkRole::Source {
                club,
                share,
                share_count,
            } => LinkRole::Subscriber {
                club,
                share,
                share_count,
            },
            LinkRole::Subscriber {
                club,
                share,
                share_count,
            } => LinkRole::Source {
                club,
                share,
                share_count,
            },
        }
    }
}

/// One role on the connection to a remote peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Link {
    /// The remote peer.
    pub peer: PeerId,
    /// What the link is for.
    #[serde(flatten)]
    pub role: LinkRole,
    /// Whether this side makes the WebRTC offer (if no connection is open yet).
    pub offer: bool,
}

/// An on-demand neighbour: a peer watching the same upload of an asset,
/// which trades its blocks both ways (no roles, no clubs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Neighbour {
    /// The remote peer.
    pub peer: PeerId,
    /// Whether this side makes the WebRTC offer (if no connection is open yet).
    pub offer: bool,
}

/// Add or remove a link role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkOp {
    /// Start using the link for this role (connect if needed).
    Add,
    /// Stop using it for this role (close the connection if no role is left).
    Remove,
}

/// SDP and ICE payloads relayed between two peers, opaque to the server.
///
/// `conn` names one connection attempt: the offerer picks a number that it
/// has not used towards that peer before, and the answer and every candidate
/// of both sides carry it. A peer drops a signal whose `conn` is not that of
/// its current connection to the sender: after a link fails, both ends may
/// report it and the server may replace the link twice, so the answer to a
/// given-up offer can arrive after a new offer has gone out, and applied to
/// the new connection it broke it (`just bench-loss`). A signal without
/// `conn` (an older client) is taken as it comes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SignalData {
    /// An SDP offer.
    Offer {
        /// The SDP text.
        sdp: String,
        /// The connection attempt (see [`SignalData`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
    },
    /// An SDP answer.
    Answer {
        /// The SDP text.
        sdp: String,
        /// The connection attempt of the offer it answers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
    },
    /// A trickled ICE candidate, as in RTCIceCandidateInit.
    Candidate {
        /// The connection attempt it belongs to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        conn: Option<u64>,
        /// The candidate line (empty for end of candidates).
        candidate: String,
        /// The media stream id.
        #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
        sdp_mid: Option<String>,
        /// The m-line index.
        #[serde(
            rename = "sdpMLineIndex",
            default,
            skip_serializing_if = "Option::is_none"
        )]
        sdp_mline_index: Option<u16>,
    },
}

impl SignalData {
    /// The connection attempt the signal names, if any.
    pub fn conn(&self) -> Option<u64> {
        match self {
            SignalData::Offer { conn, .. }
            | SignalData::Answer { conn, .. }
            | SignalData::Candidate { conn, .. } => *conn,
        }
    }
}

/// Whether a signal naming attempt `signal` belongs to the connection whose
/// attempt is `current`: yes unless both are known and differ (a side that
/// sends no `conn` is taken as it comes).
pub fn same_attempt(signal: Option<u64>, current: Option<u64>) -> bool {
    match (signal, current) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    }
}

/// Messages from a client (browser peer, test peer) to the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMsg {
    /// First message: join a stream's swarm.
    Join {
        /// Protocol version, [`SIGNAL_VERSION`].
        v: u32,
        /// Stream id (URL form of its key) or its name.
        stream: String,
        /// Upload capacity the client offers, kbit/s, if it knows it. Without
        /// it the server plans on the upload probe sent before the join, if
        /// any ([`crate::probe`]), else at the cap.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload_kbps: Option<u32>,
        /// Whether the client relays to peers (false: origin only, for baselines).
        #[serde(default = "default_true")]
        p2p: bool,
        /// The upload probe sent before this join ran dry at the sender (the
        /// client could not queue frames as fast as they left), so its rate is
        /// a lower bound, not the upload: the server plans at the cap.
        #[serde(default, skip_serializing_if = "is_false")]
        probe_limited: bool,
        /// Test only: ask to relay corrupted blocks. Honoured only by a server
        /// built with the `test-hooks` feature and started with
        /// `--allow-test-corruption`; any other server ignores it.
        #[serde(default, skip_serializing_if = "is_false")]
        test_corrupt: bool,
    },
    /// First message of an on-demand viewer: join the swarm of an asset's
    /// current upload. The server answers [`ServerMsg::VodWelcome`] with
    /// the neighbours to connect to, or an error: `unknown_asset` when no
    /// asset has that name, or when its key is not `key` (the asset was
    /// replaced: the viewer's blocks are another upload's).
    JoinVod {
        /// Protocol version.
        v: u32,
        /// The asset's name.
        asset: String,
        /// URL form of the key the viewer's verified manifest names.
        key: String,
    },
    /// Relay SDP or ICE to another peer.
    Signal {
        /// Protocol version.
        v: u32,
        /// The recipient.
        to: PeerId,
        /// The payload.
        data: SignalData,
    },
    /// Keep-alive; answered with [`ServerMsg::Pong`].
    Heartbeat {
        /// Protocol version.
        v: u32,
    },
    /// Bits wanted from the origin in the next interval: a live peer's gap
    /// fill, or an on-demand viewer's runs (when its welcome carried a
    /// `grant_token`; `late` and `up` are then 0).
    Bid {
        /// Protocol version.
        v: u32,
        /// Bits wanted.
        bits: u64,
        /// Pushes this peer's upload could not send in time since its last
        /// bid (`PeerStats::pushes_late`): its upload fell behind. At
        /// [`crate::club::OVERLOAD_LATE`] or more the server counts it as
        /// overloaded, and acts on [`ClientMsg::SlowSource`] reports about it.
        #[serde(default, skip_serializing_if = "is_zero")]
        late: u64,
        /// Bytes this peer handed its data channels since its last bid, every
        /// frame counted. A peer whose bids stay over the planned upload cap
        /// sheds a last-hop share ([`crate::club::UploadStreak`]).
        #[serde(default, skip_serializing_if = "is_zero")]
        up: u64,
    },
    /// A last-hop source leaves its share to the origin
    /// (`PeerEvent::SlowSource`). The server replaces it if it is overloaded
    /// (see [`ClientMsg::Bid`]'s `late`); a source that is merely late,
    /// deep in its club's tree, is kept, as a new one would be no earlier.
    SlowSource {
        /// Protocol version.
        v: u32,
        /// The source.
        peer: PeerId,
    },
    /// A link failed or its peer misbehaved; asks for a replacement.
    LinkFailed {
        /// Protocol version.
        v: u32,
        /// The remote peer.
        peer: PeerId,
    },
    /// The peer sent a block that did not verify.
    Report {
        /// Protocol version.
        v: u32,
        /// The offending peer.
        peer: PeerId,
        /// What was wrong.
        reason: String,
    },
}

fn default_true() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_true(b: &bool) -> bool {
    *b
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_zero_u32(n: &u32) -> bool {
    *n == 0
}

/// The stream as the welcome describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamInfo {
    /// URL form of the stream key.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Path of the init segment, relative to the server.
    pub init_url: String,
    /// Path prefix of blocks: append the seq.
    pub blocks_url: String,
    /// Number of clubs C.
    pub clubs: u16,
    /// Bitrate estimate, kbit/s.
    pub bitrate_kbps: u32,
}

/// An ICE server for RTCPeerConnection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    /// STUN or TURN URLs.
    pub urls: Vec<String>,
    /// TURN user name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// TURN credential.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Stable error codes of [`ServerMsg::Error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not JSON, or not a known message shape.
    BadMessage,
    /// A message type this server does not know.
    UnknownType,
    /// The `v` field names an unsupported version.
    BadVersion,
    /// The message is over [`MAX_SIGNAL_MESSAGE`].
    TooLarge,
    /// Too many messages per second.
    RateLimited,
    /// A message other than join came before join, or join came twice.
    NotJoined,
    /// No such stream.
    UnknownStream,
    /// The stream has its maximum number of peers.
    StreamFull,
    /// The stream ended: its publisher stayed away longer than the server
    /// waits (`--publisher-wait-seconds`). Its viewers are told, then closed.
    StreamEnded,
    /// The recipient of a signal is not in the swarm (or, on demand, not a
    /// neighbour).
    UnknownPeer,
    /// No on-demand asset has that name and key.
    UnknownAsset,
    /// The server is shutting down or failed internally.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire and in metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadVersion => "bad_version",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::UnknownStream => "unknown_stream",
            ErrorCode::StreamFull => "stream_full",
            ErrorCode::StreamEnded => "stream_ended",
            ErrorCode::UnknownPeer => "unknown_peer",
            ErrorCode::UnknownAsset => "unknown_asset",
            ErrorCode::Internal => "internal",
        }
    }
}

/// Messages from the server to a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerMsg {
    /// Answer to join.
    Welcome {
        /// Protocol version.
        v: u32,
        /// The id the server gave this peer.
        peer_id: PeerId,
        /// The stream.
        stream: StreamInfo,
        /// The clubs this peer is a member of.
        clubs: Vec<u16>,
        /// The link roles assigned to this peer.
        links: Vec<Link>,
        /// Newest block seq produced so far.
        live_edge: u64,
        /// Block to start playback at: a fragment start at least the target
        /// latency behind the edge.
        start_seq: u64,
        /// Oldest block the origin still serves or will serve: the blocks
        /// before it are gone (evicted, or held by a server process that
        /// restarted). A rejoin whose next block is before it starts over
        /// at `start_seq`. Absent from older servers.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        first_seq: Option<u64>,
        /// Server wall clock (Unix ms) when the welcome was sent.
        server_time_ms: u64,
        /// Target live latency the player should hold, ms.
        target_latency_ms: u32,
        /// How often to send heartbeats, ms.
        heartbeat_ms: u32,
        /// ICE servers for RTCPeerConnection.
        ice_servers: Vec<IceServer>,
        /// Secret the peer sends as `Authorization: Bearer` on origin block
        /// fetches, which count against its grant.
        grant_token: String,
        /// Length of a bid interval, ms: bid this often.
        bid_interval_ms: u32,
        /// The upload the server measured from the client's probe and plans
        /// it on, kbit/s ([`crate::probe`]); `None` if there was no probe,
        /// it could not be timed, or the client stated its upload. The
        /// player shows it in its stats (a rejoin probes again).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        upload_probe_kbps: Option<u32>,
        /// Whether a publisher is sending the stream now; left out when it
        /// is (and read as true when absent). Changes come as
        /// [`ServerMsg::Publisher`].
        #[serde(default = "default_true", skip_serializing_if = "is_true")]
        publisher_connected: bool,
        /// Test only: the server allowed this peer to relay corrupted blocks
        /// (see [`ClientMsg::Join`]). Always false in production.
        #[serde(default, skip_serializing_if = "is_false")]
        test_corrupt: bool,
    },
    /// Answer to [`ClientMsg::JoinVod`].
    VodWelcome {
        /// Protocol version.
        v: u32,
        /// The id the server gave this peer.
        peer_id: PeerId,
        /// The asset's name.
        asset: String,
        /// URL form of the asset key (the one the join named).
        key: String,
        /// Peers of the same upload to connect to now.
        neighbours: Vec<Neighbour>,
        /// ICE servers for RTCPeerConnection.
        ice_servers: Vec<IceServer>,
        /// How often to send heartbeats, ms.
        heartbeat_ms: u32,
        /// Secret the viewer sends as `Authorization: Bearer` on its origin
        /// runs (`/vod/{name}/blocks`), which then count against its grant;
        /// absent when the server does not meter on-demand runs
        /// (`--vod-budget-kbps 0`), and then there is nothing to bid for.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        grant_token: Option<String>,
        /// Length of a bid interval, ms: with a `grant_token`, bid this often
        /// ([`ClientMsg::Bid`], answered by [`ServerMsg::Grant`]).
        #[serde(default, skip_serializing_if = "is_zero_u32")]
        bid_interval_ms: u32,
    },
    /// An on-demand neighbour was added (connect) or removed (close).
    Neighbour {
        /// Protocol version.
        v: u32,
        /// Add or remove.
        op: LinkOp,
        /// The neighbour.
        neighbour: Neighbour,
    },
    /// A link role was added or removed (replacement after a leave or failure).
    Link {
        /// Protocol version.
        v: u32,
        /// Add or remove.
        op: LinkOp,
        /// The link.
        link: Link,
    },
    /// SDP or ICE from another peer.
    Signal {
        /// Protocol version.
        v: u32,
        /// The sender.
        from: PeerId,
        /// The payload.
        data: SignalData,
    },
    /// A publisher connected to the stream or sent again, or the one sending
    /// it left (ended its upload) or went silent long enough to be taken
    /// over (its connection may have died without a word). Sent to
    /// every peer of the stream when that changes; the welcome says how it
    /// stood at the join. While no publisher is connected the live edge
    /// stands still: a player at the edge is waiting, not rebuffering.
    Publisher {
        /// Protocol version.
        v: u32,
        /// Whether a publisher is connected now.
        connected: bool,
    },
    /// Answer to a heartbeat.
    Pong {
        /// Protocol version.
        v: u32,
        /// Server wall clock (Unix ms).
        server_time_ms: u64,
        /// Newest block seq produced so far.
        live_edge: u64,
    },
    /// Answer to a bid: bits this peer may fetch from the origin.
    Grant {
        /// Protocol version.
        v: u32,
        /// Bits granted for the interval.
        bits: u64,
        /// Length of the interval, ms.
        interval_ms: u32,
    },
    /// Something was wrong with the client's message.
    Error {
        /// Protocol version.
        v: u32,
        /// Stable machine-readable code.
        code: ErrorCode,
        /// Human-readable explanation.
        message: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn join_parses_from_the_documented_form() {
        let m: ClientMsg =
            serde_json::from_str(r#"{"type":"join","v":1,"stream":"demo"}"#).expect("parses");
        assert_eq!(
            m,
            ClientMsg::Join {
                v: 1,
                stream: "demo".into(),
                upload_kbps: None,
                p2p: true,
                probe_limited: false,
                test_corrupt: false,
            }
        );
    }

    #[test]
    fn bid_late_is_optional_and_slow_source_is_flat() {
        let old: ClientMsg =
            serde_json::from_str(r#"{"type":"bid","v":1,"bits":8}"#).expect("parses");
        assert_eq!(
            old,
            ClientMsg::Bid {
                v: 1,
                bits: 8,
                late: 0,
                up: 0
            }
        );
        assert_eq!(
            serde_json::to_string(&old).expect("serializes"),
            r#"{"type":"bid","v":1,"bits":8}"#
        );
        let m = ClientMsg::Bid {
            v: 1,
            bits: 8,
            late: 3,
            up: 250_000,
        };
        let s = serde_json::to_string(&m).expect("serializes");
        assert_eq!(s, r#"{"type":"bid","v":1,"bits":8,"late":3,"up":250000}"#);
        assert_eq!(serde_json::from_str::<ClientMsg>(&s).expect("parses"), m);
        let m = ClientMsg::SlowSource { v: 1, peer: 9 };
        let s = serde_json::to_string(&m).expect("serializes");
        assert_eq!(s, r#"{"type":"slow_source","v":1,"peer":9}"#);
        assert_eq!(serde_json::from_str::<ClientMsg>(&s).expect("parses"), m);
    }

    #[test]
    fn publisher_is_flat_json_and_a_welcome_without_it_means_connected() {
        let m = ServerMsg::Publisher {
            v: 1,
            connected: false,
        };
        let s = serde_json::to_string(&m).expect("serializes");
        assert_eq!(s, r#"{"type":"publisher","v":1,"connected":false}"#);
        assert_eq!(serde_json::from_str::<ServerMsg>(&s).expect("parses"), m);

        let welcome = |publisher_connected| ServerMsg::Welcome {
            v: 1,
            peer_id: 7,
            stream: StreamInfo {
                id: "k".into(),
                name: "cam".into(),
                init_url: "/streams/k/init".into(),
                blocks_url: "/streams/k/blocks/".into(),
                clubs: 8,
                bitrate_kbps: 2000,
            },
            clubs: vec![1, 5],
            links: Vec::new(),
            live_edge: 9,
            start_seq: 3,
            first_seq: Some(0),
            server_time_ms: 1,
            target_latency_ms: 1500,
            heartbeat_ms: 5000,
            ice_servers: Vec::new(),
            grant_token: "t".into(),
            bid_interval_ms: 1000,
            upload_probe_kbps: None,
            publisher_connected,
            test_corrupt: false,
        };
        // Connected is the usual case, and what an older server meant.
        let s = serde_json::to_string(&welcome(true)).expect("serializes");
        assert!(!s.contains("publisher_connected"), "{s}");
        assert_eq!(
            serde_json::from_str::<ServerMsg>(&s).expect("parses"),
            welcome(true)
        );
        let s = serde_json::to_string(&welcome(false)).expect("serializes");
        assert!(s.contains(r#""publisher_connected":false"#), "{s}");
        assert_eq!(
            serde_json::from_str::<ServerMsg>(&s).expect("parses"),
            welcome(false)
        );
    }

    #[test]
    fn on_demand_messages_are_flat_json() {
        let m: ClientMsg =
            serde_json::from_str(r#"{"type":"join_vod","v":1,"asset":"demo","key":"k"}"#)
                .expect("parses");
        assert_eq!(
            m,
            ClientMsg::JoinVod {
                v: 1,
                asset: "demo".into(),
                key: "k".into()
            }
        );
        let m = ServerMsg::Neighbour {
            v: 1,
            op: LinkOp::Add,
            neighbour: Neighbour {
                peer: 4,
                offer: true,
            },
        };
        let s = serde_json::to_string(&m).expect("serializes");
        assert_eq!(
            s,
            r#"{"type":"neighbour","v":1,"op":"add","neighbour":{"peer":4,"offer":true}}"#
        );
        assert_eq!(serde_json::from_str::<ServerMsg>(&s).expect("parses"), m);
        assert_eq!(ErrorCode::UnknownAsset.as_str(), "unknown_asset");
        // Without metering the welcome names no token and no interval.
        let welcome = |grant_token: Option<String>, bid_interval_ms| ServerMsg::VodWelcome {
            v: 1,
            peer_id: 2,
            asset: "a".into(),
            key: "k".into(),
            neighbours: Vec::new(),
            ice_servers: Vec::new(),
            heartbeat_ms: 5000,
            grant_token,
            bid_interval_ms,
        };
        let plain = r#"{"type":"vod_welcome","v":1,"peer_id":2,"asset":"a","key":"k","neighbours":[],"ice_servers":[],"heartbeat_ms":5000}"#;
        assert_eq!(
            serde_json::to_string(&welcome(None, 0)).expect("serializes"),
            plain
        );
        assert_eq!(
            serde_json::from_str::<ServerMsg>(plain).expect("parses"),
            welcome(None, 0)
        );
        let metered = welcome(Some("t".into()), 1000);
        let s = serde_json::to_string(&metered).expect("serializes");
        assert!(
            s.ends_with(r#""grant_token":"t","bid_interval_ms":1000}"#),
            "{s}"
        );
        assert_eq!(
            serde_json::from_str::<ServerMsg>(&s).expect("parses"),
            metered
        );
    }

    #[test]
    fn link_is_flat_json() {
        let l = Link {
            peer: 3,
            role: LinkRole::Source {
                club: 2,
                share: 0,
                share_count: 2,
            },
            offer: true,
        };
        let s = serde_json::to_string(&l).expect("serializes");
        assert_eq!(
            s,
            r#"{"peer":3,"role":"source","club":2,"share":0,"share_count":2,"offer":true}"#
        );
        assert_eq!(serde_json::from_str::<Link>(&s).expect("parses"), l);
        assert_eq!(l.role.mirror().mirror(), l.role);
    }

    #[test]
    fn error_serializes_with_code() {
        let e = ServerMsg::Error {
            v: 1,
            code: ErrorCode::BadMessage,
            message: "x".into(),
        };
        assert_eq!(
            serde_json::to_string(&e).expect("serializes"),
            r#"{"type":"error","v":1,"code":"bad_message","message":"x"}"#
        );
    }

    #[test]
    fn signal_conn_is_optional_and_round_trips() {
        let old: SignalData =
            serde_json::from_str(r#"{"kind":"answer","sdp":"v=0"}"#).expect("parses");
        assert_eq!(
            old,
            SignalData::Answer {
                sdp: "v=0".into(),
                conn: None
            }
        );
        assert_eq!(
            serde_json::to_string(&old).expect("serializes"),
            r#"{"kind":"answer","sdp":"v=0"}"#
        );
        let new = SignalData::Offer {
            sdp: "v=0".into(),
            conn: Some(7),
        };
        let text = serde_json::to_string(&new).expect("serializes");
        assert_eq!(text, r#"{"kind":"offer","sdp":"v=0","conn":7}"#);
        assert_eq!(
            serde_json::from_str::<SignalData>(&text).expect("parses"),
            new
        );
        assert!(
            serde_json::from_str::<SignalData>(r#"{"kind":"offer","sdp":"v=0","conn":-1}"#)
                .is_err()
        );
    }

    #[test]
    fn only_a_different_known_attempt_is_stale() {
        assert!(same_attempt(Some(2), Some(2)));
        assert!(!same_attempt(Some(1), Some(2)));
        assert!(same_attempt(None, Some(2)));
        assert!(same_attempt(Some(1), None));
        let c = SignalData::Candidate {
            conn: Some(4),
            candidate: String::new(),
            sdp_mid: None,
            sdp_mline_index: None,
        };
        assert_eq!(c.conn(), Some(4));
    }

    #[test]
    fn candidate_uses_browser_field_names() {
        let d: SignalData = serde_json::from_str(
            r#"{"kind":"candidate","candidate":"candidate:1 1 udp 1 1.2.3.4 5 typ host","sdpMid":"0","sdpMLineIndex":0}"#,
        )
        .expect("parses");
        assert!(matches!(
            d,
            SignalData::Candidate {
                sdp_mline_index: Some(0),
                ..
            }
        ));
    }
}
