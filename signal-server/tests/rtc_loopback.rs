//! Two native endpoints on the `rtc` wrapper, connected through an in-test signaling channel
//! that carries the same JSON a browser would send. Real sockets on the machine's non-loopback
//! interface; timeouts are generous and no test asserts speed.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use clubcast_server::rtc::{
    CloseReason, Gathering, Handshake, IceCandidate, Link, LinkEvent, LinkEvents, RtcConfig,
    RtcError, SdpKind, SendError, SessionDescription, Str0m, Transport, WebrtcRs,
    MAX_BUFFERED_BYTES, MAX_MESSAGE,
};
use tokio::time::timeout;

/// Long enough for a loaded 2-core CI box; the happy path takes well under a second.
const PATIENCE: Duration = Duration::from_secs(60);
const BLOCK: usize = 16 * 1024;

/// A WebRTC stack under test: every test runs once per stack (see the end of the file).
trait Stack: Transport {
    fn make(config: RtcConfig) -> Self;
}

impl Stack for WebrtcRs {
    fn make(config: RtcConfig) -> Self {
        WebrtcRs::new(config)
    }
}

impl Stack for Str0m {
    fn make(config: RtcConfig) -> Self {
        Str0m::new(config)
    }
}

fn transport<T: Stack>(gathering: Gathering) -> T {
    T::make(RtcConfig {
        gathering,
        ..RtcConfig::default()
    })
}

/// A message whose every byte depends on `seq`, so reordering or corruption shows.
fn block(seq: u32) -> Bytes {
    let mut data = vec![0u8; BLOCK];
    data[..4].copy_from_slice(&seq.to_be_bytes());
    for (i, byte) in data.iter_mut().enumerate().skip(4) {
        *byte = (seq as usize).wrapping_mul(31).wrapping_add(i) as u8;
    }
    Bytes::from(data)
}

/// The in-test signaling server: JSON text in, JSON text out, like `/ws` would carry.
fn relay<T: serde::Serialize + serde::de::DeserializeOwned>(value: &T) -> T {
    let text = serde_json::to_string(value).expect("our types serialise");
    serde_json::from_str(&text).expect("and parse back")
}

struct Pair<L> {
    offerer: L,
    offerer_events: LinkEvents,
    answerer: L,
    answerer_events: LinkEvents,
    /// The answerer's UDP addresses, from its description and its trickled candidates.
    answerer_addrs: Vec<SocketAddr>,
}

/// The UDP address of an ICE candidate line, if it names an IP.
fn candidate_addr(line: &str) -> Option<SocketAddr> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 6 || !fields[2].eq_ignore_ascii_case("udp") {
        return None;
    }
    Some(SocketAddr::new(
        fields[4].parse().ok()?,
        fields[5].parse().ok()?,
    ))
}

/// Offer, answer and trickle until both channels are open.
async fn open_pair<T: Stack>(gathering: Gathering) -> Pair<T::Link> {
    let stack = transport::<T>(gathering);
    open_pair_between(&stack, &stack, gathering).await
}

/// [`open_pair`] with the offer from `offering` and the answer from `answering`, both
/// gathering as `gathering` says.
async fn open_pair_between<T: Stack>(
    offering: &T,
    answering: &T,
    gathering: Gathering,
) -> Pair<T::Link> {
    let Handshake {
        link: offerer,
        local: offer,
        events: mut offerer_events,
    } = offering.connect().await.expect("offer");
    assert_eq!(offer.kind, SdpKind::Offer);
    let Handshake {
        link: answerer,
        local: answer,
        events: mut answerer_events,
    } = answering.accept(relay(&offer)).await.expect("answer");

    assert_eq!(answer.kind, SdpKind::Answer);
    let mut answerer_addrs: Vec<SocketAddr> = answer
        .sdp
        .lines()
        .filter_map(|l| candidate_addr(l.strip_prefix("a=")?))
        .collect();
    offerer
        .apply_answer(relay(&answer))
        .await
        .expect("apply answer");

    let (mut offerer_open, mut answerer_open) = (false, false);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !(offerer_open && answerer_open) {
        let event = tokio::select! {
            Some(event) = offerer_events.next() => (true, event),
            Some(event) = answerer_events.next() => (false, event),
            () = tokio::time::sleep_until(deadline) => panic!("channels did not open"),
        };
        match event {
            (from_offerer, LinkEvent::LocalCandidate(candidate)) => {
                assert_eq!(gathering, Gathering::Trickle, "complete gathering trickled");
                if !from_offerer {
                    answerer_addrs.extend(candidate_addr(&candidate.candidate));
                }
                let to = if from_offerer { &answerer } else { &offerer };
                to.add_remote_candidate(relay(&candidate))
                    .await
                    .expect("candidate accepted");
            }
            (true, LinkEvent::Open) => offerer_open = true,
            (false, LinkEvent::Open) => answerer_open = true,
            (_, other) => panic!("unexpected event before open: {other:?}"),
        }
    }
    assert!(offerer.is_open() && answerer.is_open());
    Pair {
        offerer,
        offerer_events,
        answerer,
        answerer_events,
        answerer_addrs,
    }
}

/// Next event that is not a late candidate.
async fn next_event(events: &mut LinkEvents) -> Option<LinkEvent> {
    loop {
        match events.next().await {
            Some(LinkEvent::LocalCandidate(_)) => continue,
            other => return other,
        }
    }
}

/// Blocks of [`a_burst_past_the_buffer_bound_arrives_intact_and_in_order`]:
/// 16 MiB, past what the buffers between two peers hold.
const BURST: u32 = 1000;

async fn a_burst_past_the_buffer_bound_arrives_intact_and_in_order<T: Stack>() {
    let Pair {
        offerer,
        mut offerer_events,
        answerer,
        mut answerer_events,
        ..
    } = open_pair::<T>(Gathering::Trickle).await;

    // The receiver starts reading only once the sender was refused (or, if
    // it never is, after the burst): how fast an idle receiver drains must
    // not decide whether the bound is reached (200 blocks with the receiver
    // reading: on a loaded machine it drained as fast as the sender offered,
    // and the test failed). A peer that reads nothing absorbs about 710
    // blocks (see the next test), so BURST blocks must meet the bound.
    let (start_tx, start_rx) = tokio::sync::oneshot::channel::<()>();
    let receiver = tokio::spawn(async move {
        let _ = start_rx.await;
        for seq in 0..BURST {
            match next_event(&mut answerer_events).await {
                Some(LinkEvent::Message(message)) => assert!(
                    message == block(seq),
                    "message {seq} corrupt or out of order"
                ),
                other => panic!("expected message {seq}, got {other:?}"),
            }
        }
        answerer
            .try_send(Bytes::from_static(b"done"))
            .expect("reply");
        (answerer, answerer_events)
    });

    let mut refusals = 0;
    let mut start = Some(start_tx);
    for seq in 0..BURST {
        loop {
            match offerer.try_send(block(seq)) {
                Ok(()) => break,
                Err(SendError::Full { buffered }) => {
                    assert!(buffered <= MAX_BUFFERED_BYTES);
                    refusals += 1;
                    if let Some(tx) = start.take() {
                        let _ = tx.send(());
                    }
                    match timeout(PATIENCE, next_event(&mut offerer_events)).await {
                        Ok(Some(LinkEvent::Writable)) => {}
                        other => panic!("waited for Writable, got {other:?}"),
                    }
                }
                Err(error) => panic!("send {seq}: {error}"),
            }
        }
        assert!(offerer.buffered_amount() <= MAX_BUFFERED_BYTES);
    }
    if let Some(tx) = start.take() {
        let _ = tx.send(());
    }
    assert!(refusals > 0, "the burst never reached the buffer bound");

    let (_answerer, _answerer_events) = timeout(PATIENCE, receiver)
        .await
        .expect("all BURST messages arrive")
        .expect("receiver task");
    match timeout(PATIENCE, next_event(&mut offerer_events)).await {
        Ok(Some(LinkEvent::Message(reply))) => assert_eq!(&reply[..], b"done"),
        other => panic!("expected the reply, got {other:?}"),
    }
    offerer.close().await;
}

async fn try_send_refuses_instead_of_growing_when_the_peer_stops_reading<T: Stack>() {
    let Pair {
        offerer,
        mut offerer_events,
        answerer,
        mut answerer_events,
        ..
    } = open_pair::<T>(Gathering::Trickle).await;

    // The answerer's owner reads nothing. Keep offering blocks, waiting for Writable after
    // each refusal; once every buffer between us is full, Writable stops coming.
    let mut admitted = 0usize;
    let stuck = loop {
        match offerer.try_send(block(admitted as u32)) {
            Ok(()) => admitted += 1,
            Err(SendError::Full { .. }) => {
                match timeout(Duration::from_secs(3), next_event(&mut offerer_events)).await {
                    Ok(Some(LinkEvent::Writable)) => {}
                    Err(_) => break true,
                    Ok(other) => panic!("unexpected {other:?}"),
                }
            }
            Err(error) => panic!("send: {error}"),
        }
        assert!(offerer.buffered_amount() <= MAX_BUFFERED_BYTES);
        if admitted * BLOCK > 64 * MAX_BUFFERED_BYTES {
            break false;
        }
    };
    assert!(
        stuck,
        "a peer that reads nothing absorbed {admitted} blocks: memory is not bounded"
    );
    eprintln!(
        "peer not reading: {admitted} blocks admitted, {} bytes buffered",
        offerer.buffered_amount()
    );

    // Once the peer reads again, everything admitted arrives and the sender may go on.
    for seq in 0..admitted as u32 {
        match timeout(PATIENCE, next_event(&mut answerer_events)).await {
            Ok(Some(LinkEvent::Message(message))) => assert!(message == block(seq)),
            other => panic!("expected message {seq}, got {other:?}"),
        }
    }
    match timeout(PATIENCE, next_event(&mut offerer_events)).await {
        Ok(Some(LinkEvent::Writable)) => {}
        other => panic!("expected Writable after the peer drained, got {other:?}"),
    }
    offerer.try_send(block(0)).expect("writable again");
    drop(answerer);
}

async fn dropping_one_side_closes_the_other<T: Stack>() {
    let Pair {
        offerer,
        offerer_events: _offerer_events,
        answerer,
        mut answerer_events,
        ..
    } = open_pair::<T>(Gathering::Trickle).await;
    drop(offerer);
    match timeout(PATIENCE, next_event(&mut answerer_events)).await {
        Ok(Some(LinkEvent::Closed(reason))) => {
            assert!(matches!(reason, CloseReason::Remote | CloseReason::Failed));
        }
        other => panic!("expected Closed, got {other:?}"),
    }
    assert_eq!(
        timeout(PATIENCE, answerer_events.next()).await.ok(),
        Some(None),
        "Closed is the last event"
    );
    assert_eq!(answerer.try_send(block(0)), Err(SendError::Closed));
}

async fn datagrams_from_a_stranger_leave_an_open_link_working<T: Stack>() {
    let Pair {
        offerer,
        offerer_events: _offerer_events,
        answerer: _answerer,
        mut answerer_events,
        answerer_addrs,
    } = open_pair::<T>(Gathering::Trickle).await;
    assert!(!answerer_addrs.is_empty(), "the answerer named its address");
    // Whoever learns a link's port can send it anything: noise, and datagrams shaped like
    // STUN (first byte 0 or 1, the magic cookie) and DTLS (content types 20–23, version
    // 1.2) that no handshake produced.
    let stranger = tokio::net::UdpSocket::bind("0.0.0.0:0")
        .await
        .expect("bind");
    let mut stun = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42];
    stun.extend_from_slice(&[7; 12]);
    let mut shaped = vec![stun];
    for content_type in 20..=23u8 {
        let mut dtls = vec![content_type, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 40];
        dtls.extend_from_slice(&[content_type; 40]);
        shaped.push(dtls);
    }
    for addr in &answerer_addrs {
        for round in 0..50u8 {
            for datagram in &shaped {
                let _ = stranger.send_to(datagram, addr).await;
            }
            let noise: Vec<u8> = (0..200u32)
                .map(|i| (i as u8).wrapping_mul(round | 1))
                .collect();
            let _ = stranger.send_to(&noise, addr).await;
        }
    }
    offerer.try_send(block(3)).expect("the link is still open");
    match timeout(PATIENCE, next_event(&mut answerer_events)).await {
        Ok(Some(LinkEvent::Message(message))) => assert!(message == block(3)),
        other => panic!("expected the message after the stranger's datagrams, got {other:?}"),
    }
    offerer.close().await;
}

async fn complete_gathering_connects_without_trickle<T: Stack>() {
    // open_pair asserts no candidate is trickled on this path.
    let Pair {
        offerer,
        answerer,
        mut answerer_events,
        ..
    } = open_pair::<T>(Gathering::Complete).await;
    offerer.try_send(block(7)).expect("send");
    match timeout(PATIENCE, next_event(&mut answerer_events)).await {
        Ok(Some(LinkEvent::Message(message))) => assert!(message == block(7)),
        other => panic!("expected a message, got {other:?}"),
    }
    answerer.close().await;
    offerer.close().await;
}

async fn bad_input_gets_typed_errors<T: Stack>() {
    let stack = transport::<T>(Gathering::Trickle);
    let not_an_offer = SessionDescription {
        kind: SdpKind::Answer,
        sdp: "v=0".into(),
    };
    assert!(matches!(
        stack.accept(not_an_offer).await,
        Err(RtcError::WrongSdpKind { .. })
    ));
    let garbage = SessionDescription {
        kind: SdpKind::Offer,
        sdp: "this is not sdp".into(),
    };
    assert!(matches!(
        stack.accept(garbage).await,
        Err(RtcError::BadDescription(_))
    ));

    let Handshake { link, local, .. } = stack.connect().await.expect("offer");
    assert!(local.sdp.contains("m=application"));
    assert_eq!(link.try_send(block(0)), Err(SendError::NotOpen));
    assert_eq!(
        link.try_send(Bytes::from(vec![0; MAX_MESSAGE + 1])),
        Err(SendError::TooLarge {
            len: MAX_MESSAGE + 1
        })
    );
    let bogus = IceCandidate {
        candidate: "candidate:nonsense".into(),
        sdp_mid: None,
        sdp_m_line_index: Some(0),
    };
    assert!(link.add_remote_candidate(bogus).await.is_err());
    link.close().await;
}

async fn closing_links_leaves_no_tasks_behind<T: Stack>() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let baseline = metrics.num_alive_tasks();
    let pair = open_pair::<T>(Gathering::Trickle).await;
    assert!(metrics.num_alive_tasks() > baseline);
    pair.offerer.close().await;
    drop(pair.answerer);
    drop((pair.offerer_events, pair.answerer_events));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while metrics.num_alive_tasks() > baseline {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} tasks still alive after close (baseline {baseline})",
            metrics.num_alive_tasks()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// This machine's address on its default route (no datagram is sent: a UDP `connect` only
/// picks the route).
fn default_route_ip() -> std::net::IpAddr {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("bind");
    socket.connect("192.0.2.1:9").expect("a default route");
    socket.local_addr().expect("local address").ip()
}

/// A `str0m` answerer behind a 1:1 NAT (`--rtc-public-ip`) binding within a port range
/// (`--rtc-ports`): every candidate it signals, in its answer and trickled, names the public
/// address and a port of the range, and none names an address of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn str0m_signals_its_public_address_and_binds_within_a_port_range() {
    // TEST-NET-1: nothing answers there, so the link is not opened.
    let public: std::net::IpAddr = "192.0.2.77".parse().expect("an address");
    let ports = (41_000, 41_009);
    let offering = Str0m::new(RtcConfig::default());
    let answering = Str0m::new(RtcConfig {
        public_ip: Some(public),
        ports: Some(ports),
        ..RtcConfig::default()
    });
    let offer = offering.connect().await.expect("offer");
    let Handshake {
        link,
        local: answer,
        mut events,
    } = answering.accept(relay(&offer.local)).await.expect("answer");
    let mut addrs: Vec<SocketAddr> = answer
        .sdp
        .lines()
        .filter_map(|l| candidate_addr(l.strip_prefix("a=")?))
        .collect();
    let in_answer = addrs.len();
    while let Ok(Some(LinkEvent::LocalCandidate(c))) =
        timeout(Duration::from_millis(200), events.next()).await
    {
        addrs.extend(candidate_addr(&c.candidate));
    }
    assert!(
        in_answer > 0 && addrs.len() > in_answer,
        "{addrs:?}\n{}",
        answer.sdp
    );
    for addr in &addrs {
        assert_eq!(addr.ip(), public, "{addrs:?}");
        assert!((ports.0..=ports.1).contains(&addr.port()), "{addrs:?}");
    }
    link.close().await;
    offer.link.close().await;
}

/// The same answerer with its own address as the public one (no NAT is available here to
/// test through): the link opens on a port of the range and carries data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn str0m_behind_an_identity_mapping_connects_within_a_port_range() {
    let own = default_route_ip();
    let ports = (41_010, 41_019);
    let offering = Str0m::new(RtcConfig::default());
    let answering = Str0m::new(RtcConfig {
        public_ip: Some(own),
        ports: Some(ports),
        ..RtcConfig::default()
    });
    let Pair {
        offerer,
        answerer,
        mut answerer_events,
        answerer_addrs,
        ..
    } = open_pair_between(&offering, &answering, Gathering::Trickle).await;
    assert!(
        answerer_addrs
            .iter()
            .all(|a| (ports.0..=ports.1).contains(&a.port())),
        "{answerer_addrs:?}"
    );
    offerer.try_send(block(3)).expect("send");
    match timeout(PATIENCE, next_event(&mut answerer_events)).await {
        Ok(Some(LinkEvent::Message(message))) => assert!(message == block(3)),
        other => panic!("expected a message, got {other:?}"),
    }
    answerer.close().await;
    offerer.close().await;
}

/// Runs each named test once on each stack, as `webrtc_rs::<name>` and `str0m::<name>`.
macro_rules! on_every_stack {
    ($($name:ident),* $(,)?) => {
        mod webrtc_rs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<super::WebrtcRs>().await;
                }
            )*
        }
        mod str0m {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name::<super::Str0m>().await;
                }
            )*
        }
    };
}

on_every_stack!(
    datagrams_from_a_stranger_leave_an_open_link_working,
    a_burst_past_the_buffer_bound_arrives_intact_and_in_order,
    try_send_refuses_instead_of_growing_when_the_peer_stops_reading,
    dropping_one_side_closes_the_other,
    complete_gathering_connects_without_trickle,
    bad_input_gets_typed_errors,
    closing_links_leaves_no_tasks_behind
);
