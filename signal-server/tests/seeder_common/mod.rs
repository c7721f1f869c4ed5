//! Shared by the seeder tests and `examples/seeder_bench.rs`: the real app with a seeder on a
//! loopback port, a block publisher, a native test peer built on our rtc wrapper, and a lossy
//! UDP proxy.
//!
//! The native peer speaks `/ws` like a browser: join, read the welcome, offer to the seeder
//! (peer 0) for as long as it holds a role with it, trickle ICE, send HELLO on open, answer
//! link changes, heartbeat, and report a link that closes with `link_failed`. It verifies every
//! block under the stream key and reports it on a channel.
//!
//! Through the proxy (`PeerOptions::loss`), the peer rewrites the seeder's first host candidate
//! to the proxy's address and keeps its own candidates to itself, so the seeder learns the
//! peer's address only from the proxy (a peer-reflexive candidate) and every packet of the
//! pair crosses the proxy, which drops each with probability `loss`, both ways.
#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use clubcast_protocol::block::{BlockFlags, BlockVerifier, StreamKey};
use clubcast_protocol::signal::{
    same_attempt, ClientMsg, LinkOp, LinkRole, ServerMsg, SignalData, SEEDER_PEER_ID,
};
use clubcast_protocol::wire::{Frame, WIRE_VERSION};
use clubcast_server::app::{app, AppState};
use clubcast_server::config::{Config, SeederRtc};
use clubcast_server::rtc::{
    IceCandidate, Link, LinkEvent, LinkEvents, RtcConfig, SdpKind, SessionDescription, Transport,
    WebrtcRs, WebrtcRsLink,
};
use clubcast_server::seeder::{self, SeederConfig};
use clubcast_server::stream::{StoreConfig, Stream, Streams};
use futures_util::{SinkExt, StreamExt};
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

/// The server under test: app, hub and seeder on `127.0.0.1:0`.
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its shared state (metrics, hub).
    pub state: AppState,
    /// The stream the tests publish into.
    pub stream: Arc<Stream>,
    /// Cancels the server, the seeder and the publisher.
    pub shutdown: CancellationToken,
    seeder: tokio::task::JoinHandle<()>,
}

impl Server {
    /// `ws://…/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Stops everything and waits for the seeder to close its links.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.seeder).await;
    }
}

/// [`start_server`] with the default options but the seeder on `stack`.
pub async fn start_on(stack: SeederRtc, name: &str) -> Server {
    let config = Config {
        seeder_rtc: stack,
        ..Config::default()
    };
    start_server(config, SeederConfig::default(), name).await
}

/// Starts the app with a seeder on the stack `config.seeder_rtc` names and a stream named `name`.
pub async fn start_server(config: Config, seeder_cfg: SeederConfig, name: &str) -> Server {
    let streams = Arc::new(Streams::new(
        None,
        StoreConfig {
            store_seconds: 60,
            max_bytes: 256 << 20,
        },
    ));
    let stream = streams.get_or_create(name).expect("valid stream name");
    let shutdown = CancellationToken::new();
    let state = AppState::new(config.clone(), streams.clone(), shutdown.clone());
    let seeder =
        seeder::spawn_configured(&state.hub, streams, &config, seeder_cfg, shutdown.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("bound");
    let router = app(state.clone());
    let stop = shutdown.clone();
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await;
    });
    Server {
        addr,
        state,
        stream,
        shutdown,
        seeder,
    }
}

/// Publishes `per_sec` blocks of `bytes` payload bytes into `stream` until `stop`; every
/// 20th block starts a fragment with a keyframe, as an encoder's GOP would.
pub fn publish(
    stream: Arc<Stream>,
    per_sec: u32,
    bytes: usize,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1) / per_sec.max(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut n = 0u64;
        loop {
            tokio::select! {
                () = stop.cancelled() => return n,
                _ = tick.tick() => {}
            }
            let flags = if n % 20 == 0 {
                BlockFlags::FRAGMENT_START.union(BlockFlags::KEYFRAME)
            } else {
                BlockFlags::empty()
            };
            let payload = Bytes::from(vec![(n % 251) as u8; bytes]);
            stream
                .publish(flags, n * 3000, unix_ms(), payload)
                .expect("publish a test block");
            n += 1;
        }
    })
}

/// Unix time, ms.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// How a native peer behaves.
#[derive(Clone, Debug, Default)]
pub struct PeerOptions {
    /// `ws://host:port/ws`.
    pub ws_url: String,
    /// Stream id or name.
    pub stream: String,
    /// Route the seeder link through a proxy that drops this fraction of packets each way.
    pub loss: Option<f64>,
    /// Stop reading the link after the first block (a stalled receiver).
    pub stall_after_first_block: bool,
    /// Send an offer and give it up at once for a second one, as a browser
    /// does when a link is replaced twice: the seeder's signals of the first
    /// attempt must be told apart (`conn`) and dropped.
    pub stale_offer_first: bool,
}

/// What a native peer reports.
#[derive(Debug, Clone)]
pub enum PeerUpdate {
    /// The welcome: our id and the seeder roles we got.
    Welcome {
        /// Our peer id.
        peer_id: u64,
        /// Links with the seeder in the welcome.
        seeder_links: usize,
    },
    /// The channel to the seeder opened.
    Open,
    /// A block that verified under the stream key.
    Block {
        /// Its seq.
        seq: u64,
        /// Payload bytes.
        len: usize,
        /// When it arrived.
        at: Instant,
        /// Arrival wall clock minus ingest wall clock, ms.
        delay_ms: i64,
    },
    /// A block that did not verify (a test failure).
    BadBlock(String),
    /// The channel to the seeder closed.
    Closed,
    /// The seeder answered our HELLO.
    Hello,
}

/// Proxy counters.
#[derive(Debug, Default)]
pub struct ProxyStats {
    /// Packets forwarded.
    pub forwarded: AtomicU64,
    /// Packets dropped on purpose.
    pub dropped: AtomicU64,
}

/// A UDP proxy between one client and `upstream` that drops packets at random.
pub async fn lossy_proxy(
    ip: IpAddr,
    upstream: SocketAddr,
    loss: f64,
    seed: u64,
    stats: Arc<ProxyStats>,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let front = UdpSocket::bind((ip, 0)).await?;
    let back = UdpSocket::bind((ip, 0)).await?;
    let addr = front.local_addr()?;
    tokio::spawn(async move {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut client: Option<SocketAddr> = None;
        let (mut a, mut b) = (vec![0u8; 65536], vec![0u8; 65536]);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                r = front.recv_from(&mut a) => {
                    let Ok((n, from)) = r else { continue };
                    client = Some(from);
                    if rng.gen_bool(loss) {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.forwarded.fetch_add(1, Ordering::Relaxed);
                        let _ = back.send_to(&a[..n], upstream).await;
                    }
                }
                r = back.recv_from(&mut b) => {
                    let Ok((n, from)) = r else { continue };
                    let Some(to) = client.filter(|_| from == upstream) else { continue };
                    if rng.gen_bool(loss) {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    } else {
                        stats.forwarded.fetch_add(1, Ordering::Relaxed);
                        let _ = front.send_to(&b[..n], to).await;
                    }
                }
            }
        }
    });
    Ok(addr)
}

/// The `ip port` of a UDP host candidate line.
fn host_udp_addr(candidate: &str) -> Option<SocketAddr> {
    let t: Vec<&str> = candidate.split_whitespace().collect();
    if t.len() < 8 || !t[2].eq_ignore_ascii_case("udp") || t[7] != "host" {
        return None;
    }
    Some(SocketAddr::new(t[4].parse().ok()?, t[5].parse().ok()?))
}

/// The SDP without candidate lines, so that only trickled (and rewritten) candidates count.
fn without_candidates(sdp: &str) -> String {
    sdp.split_inclusive('\n')
        .filter(|line| !line.starts_with("a=candidate"))
        .collect()
}

/// The candidate line with its address replaced by `addr`.
fn rewrite(candidate: &str, addr: SocketAddr) -> String {
    let mut t: Vec<String> = candidate.split_whitespace().map(str::to_owned).collect();
    t[4] = addr.ip().to_string();
    t[5] = addr.port().to_string();
    t.join(" ")
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn send(ws: &mut futures_util::stream::SplitSink<Ws, Message>, msg: &ClientMsg) {
    let text = serde_json::to_string(msg).expect("client messages serialise");
    let _ = ws.send(Message::Text(text.into())).await;
}

/// One connection attempt to the seeder.
struct SeederConn {
    link: WebrtcRsLink,
    events: LinkEvents,
    proxied: bool,
    /// This connection attempt's number, carried by every signal of it.
    id: u64,
}

/// Connection attempt numbers of the native peers (unique in the process).
static ATTEMPTS: AtomicU64 = AtomicU64::new(1);

/// Runs a native peer until `stop` or until the server closes the socket.
pub async fn run_peer(
    opts: PeerOptions,
    updates: mpsc::Sender<PeerUpdate>,
    stop: CancellationToken,
) -> Result<(), String> {
    let (ws, _) = tokio_tungstenite::connect_async(opts.ws_url.as_str())
        .await
        .map_err(|e| format!("ws connect: {e}"))?;
    let (mut sink, mut source) = ws.split();
    send(
        &mut sink,
        &ClientMsg::Join {
            v: 1,
            stream: opts.stream.clone(),
            upload_kbps: None,
            p2p: true,
            probe_limited: false,
            test_corrupt: false,
        },
    )
    .await;
    let welcome = tokio::time::timeout(Duration::from_secs(30), source.next())
        .await
        .map_err(|_| "no welcome".to_owned())?
        .ok_or("socket closed before welcome")?
        .map_err(|e| format!("ws: {e}"))?;
    let Message::Text(text) = welcome else {
        return Err("welcome not text".into());
    };
    let Ok(ServerMsg::Welcome {
        peer_id,
        stream,
        links,
        heartbeat_ms,
        ..
    }) = serde_json::from_str::<ServerMsg>(&text)
    else {
        return Err(format!("not a welcome: {text}"));
    };
    let key = StreamKey::from_id(&stream.id).map_err(|e| format!("stream id: {e}"))?;
    let mut roles: Vec<LinkRole> = links
        .iter()
        .filter(|l| l.peer == SEEDER_PEER_ID)
        .map(|l| l.role)
        .collect();
    let _ = updates
        .send(PeerUpdate::Welcome {
            peer_id,
            seeder_links: roles.len(),
        })
        .await;
    let transport = WebrtcRs::new(RtcConfig::default());
    let proxy_stop = stop.child_token();
    let mut conn: Option<SeederConn> = None;
    let mut stalled = false;
    let mut heartbeat =
        tokio::time::interval(Duration::from_millis(u64::from(heartbeat_ms.max(100))));
    let mut proxy_seed = peer_id;
    if !roles.is_empty() {
        if opts.stale_offer_first {
            // Dropping the link closes it; its attempt number stays in flight.
            drop(offer(&transport, &mut sink, opts.loss.is_some()).await?);
        }
        conn = Some(offer(&transport, &mut sink, opts.loss.is_some()).await?);
    }
    loop {
        let link_event = async {
            match conn.as_mut() {
                Some(c) if !stalled => c.events.next().await,
                _ => std::future::pending().await,
            }
        };
        tokio::select! {
            () = stop.cancelled() => break,
            _ = heartbeat.tick() => send(&mut sink, &ClientMsg::Heartbeat { v: 1 }).await,
            msg = source.next() => {
                let Some(Ok(msg)) = msg else { break };
                let Message::Text(text) = msg else { continue };
                let Ok(msg) = serde_json::from_str::<ServerMsg>(&text) else { continue };
                match msg {
                    ServerMsg::Signal { from: SEEDER_PEER_ID, data, .. } => {
                        let Some(c) = conn.as_mut() else { continue };
                        if data.conn().is_none() {
                            return Err(format!("the seeder's {data:?} does not name our attempt"));
                        }
                        match data {
                            // Signals of an attempt we have given up.
                            _ if !same_attempt(data.conn(), Some(c.id)) => {}
                            SignalData::Answer { sdp, .. } => {
                                let sdp = if opts.loss.is_some() { without_candidates(&sdp) } else { sdp };
                                let answer = SessionDescription { kind: SdpKind::Answer, sdp };
                                if c.link.apply_answer(answer).await.is_err() {
                                    // An answer to an offer we have replaced: start over.
                                    conn = None;
                                    let _ = updates.send(PeerUpdate::Closed).await;
                                    send(&mut sink, &ClientMsg::LinkFailed { v: 1, peer: SEEDER_PEER_ID }).await;
                                }
                            }
                            SignalData::Candidate { candidate, sdp_mid, sdp_mline_index, .. } => {
                                let mut candidate = IceCandidate {
                                    candidate,
                                    sdp_mid,
                                    sdp_m_line_index: sdp_mline_index,
                                };
                                if let Some(loss) = opts.loss {
                                    let Some(upstream) = host_udp_addr(&candidate.candidate) else { continue };
                                    if c.proxied {
                                        continue;
                                    }
                                    proxy_seed += 1;
                                    let stats = Arc::new(ProxyStats::default());
                                    let addr = lossy_proxy(upstream.ip(), upstream, loss, proxy_seed, stats, proxy_stop.clone())
                                        .await
                                        .map_err(|e| format!("proxy: {e}"))?;
                                    candidate.candidate = rewrite(&candidate.candidate, addr);
                                    c.proxied = true;
                                }
                                let _ = c.link.add_remote_candidate(candidate).await;
                            }
                            SignalData::Offer { .. } => {}
                        }
                    }
                    ServerMsg::Link { op, link, .. } if link.peer == SEEDER_PEER_ID => {
                        match op {
                            LinkOp::Add => {
                                if !roles.contains(&link.role) {
                                    roles.push(link.role);
                                }
                                if conn.is_none() {
                                    conn = Some(offer(&transport, &mut sink, opts.loss.is_some()).await?);
                                    stalled = false;
                                }
                            }
                            LinkOp::Remove => {
                                roles.retain(|r| *r != link.role);
                                if roles.is_empty() && conn.take().is_some() {
                                    let _ = updates.send(PeerUpdate::Closed).await;
                                }
                            }
                        }
                    }
                    _ => {}
                }
            }
            event = link_event => {
                let Some(event) = event else {
                    conn = None;
                    continue;
                };
                match event {
                    // Through the proxy the seeder must learn our address from it alone.
                    LinkEvent::LocalCandidate(c) if opts.loss.is_none() => {
                        send(&mut sink, &ClientMsg::Signal {
                            v: 1,
                            to: SEEDER_PEER_ID,
                            data: SignalData::Candidate {
                                conn: conn.as_ref().map(|c| c.id),
                                candidate: c.candidate,
                                sdp_mid: c.sdp_mid,
                                sdp_mline_index: c.sdp_m_line_index,
                            },
                        }).await;
                    }
                    LinkEvent::Open => {
                        if let Some(c) = conn.as_ref() {
                            let hello = Frame::Hello { version: WIRE_VERSION, peer_id, clubs: vec![] };
                            let _ = c.link.try_send(hello.encode());
                        }
                        let _ = updates.send(PeerUpdate::Open).await;
                    }
                    LinkEvent::Message(bytes) => match Frame::decode(bytes) {
                        Ok(Frame::Block(block)) => {
                            let len = block.payload.len();
                            let ingest = block.header.ingest_time_ms;
                            match key.verify(block) {
                                Ok(v) => {
                                    let _ = updates.send(PeerUpdate::Block {
                                        seq: v.seq(),
                                        len,
                                        at: Instant::now(),
                                        delay_ms: unix_ms() as i64 - ingest as i64,
                                    }).await;
                                    stalled = opts.stall_after_first_block;
                                }
                                Err(e) => {
                                    let _ = updates.send(PeerUpdate::BadBlock(e.to_string())).await;
                                }
                            }
                        }
                        Ok(Frame::Hello { peer_id: SEEDER_PEER_ID, .. }) => {
                            let _ = updates.send(PeerUpdate::Hello).await;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = updates.send(PeerUpdate::BadBlock(e.to_string())).await;
                        }
                    },
                    LinkEvent::Closed(_) => {
                        conn = None;
                        let _ = updates.send(PeerUpdate::Closed).await;
                        if !roles.is_empty() {
                            send(&mut sink, &ClientMsg::LinkFailed { v: 1, peer: SEEDER_PEER_ID }).await;
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    proxy_stop.cancel();
    if let Some(c) = conn {
        c.link.close().await;
    }
    Ok(())
}

/// Offers a new connection to the seeder.
async fn offer(
    transport: &WebrtcRs,
    sink: &mut futures_util::stream::SplitSink<Ws, Message>,
    proxied: bool,
) -> Result<SeederConn, String> {
    let handshake = transport
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let id = ATTEMPTS.fetch_add(1, Ordering::Relaxed);
    send(
        sink,
        &ClientMsg::Signal {
            v: 1,
            to: SEEDER_PEER_ID,
            data: SignalData::Offer {
                sdp: if proxied {
                    without_candidates(&handshake.local.sdp)
                } else {
                    handshake.local.sdp
                },
                conn: Some(id),
            },
        },
    )
    .await;
    Ok(SeederConn {
        link: handshake.link,
        events: handshake.events,
        proxied: false,
        id,
    })
}
