//! The seeder end to end: the real app on a loopback port, a stream publishing ~20 blocks/s,
//! and native peers on our rtc wrapper that join over `/ws`, offer to the seeder (peer 0) and
//! receive blocks over a data channel. Real sockets; generous timeouts; nothing asserts speed.

mod seeder_common;

use std::time::Duration;

use clubcast_server::config::{Config, SeederRtc};
use clubcast_server::seeder::SeederConfig;
use seeder_common::{publish, run_peer, start_on, start_server, PeerOptions, PeerUpdate, Server};
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};

/// Long enough for a loaded 2-core CI box; the happy path takes about a second.
const PATIENCE: Duration = Duration::from_secs(90);

struct Peer {
    updates: mpsc::Receiver<PeerUpdate>,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

fn join(server: &Server, loss: Option<f64>, stall: bool) -> Peer {
    join_with(server, loss, stall, false)
}

fn join_with(server: &Server, loss: Option<f64>, stall: bool, stale_offer_first: bool) -> Peer {
    let (tx, updates) = mpsc::channel(4096);
    let opts = PeerOptions {
        ws_url: server.ws_url(),
        stream: server.stream.name.clone(),
        loss,
        stall_after_first_block: stall,
        stale_offer_first,
    };
    let task = tokio::spawn(run_peer(opts, tx, server.shutdown.child_token()));
    Peer { updates, task }
}

/// Waits for `n` verified blocks; checks they come in increasing seq order and returns the
/// seqs, the number of times the channel opened, and whether the seeder said HELLO.
async fn blocks(peer: &mut Peer, n: usize, patience: Duration) -> (Vec<u64>, usize, bool) {
    let deadline = Instant::now() + patience;
    let (mut seqs, mut opens, mut hello) = (Vec::new(), 0, false);
    while seqs.len() < n {
        let update = tokio::select! {
            u = peer.updates.recv() => u,
            () = tokio::time::sleep_until(deadline) => {
                panic!("only {} of {n} blocks within {patience:?}", seqs.len())
            }
        };
        match update.expect("the peer ended early") {
            PeerUpdate::Welcome { seeder_links, .. } => {
                assert!(seeder_links > 0, "a lone peer gets the seeder as a link");
            }
            PeerUpdate::Open => opens += 1,
            PeerUpdate::Hello => hello = true,
            PeerUpdate::Block { seq, .. } => {
                if let Some(last) = seqs.last() {
                    assert!(
                        seq > *last,
                        "seq {seq} after {last}: not in increasing order"
                    );
                }
                seqs.push(seq);
            }
            PeerUpdate::BadBlock(e) => panic!("a block did not verify: {e}"),
            PeerUpdate::Closed => {}
        }
    }
    (seqs, opens, hello)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_peer_receives_verified_blocks_in_order_from_the_seeder() {
    receives_verified_blocks_in_order(SeederRtc::WebrtcRs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_native_peer_receives_verified_blocks_in_order_from_a_str0m_seeder() {
    receives_verified_blocks_in_order(SeederRtc::Str0m).await;
}

/// A lone native peer (on the `webrtc` stack) gets every block from a seeder on `stack`.
async fn receives_verified_blocks_in_order(stack: SeederRtc) {
    let server = start_on(stack, "seedtest").await;
    let publisher = publish(server.stream.clone(), 20, 8 * 1024, server.shutdown.clone());
    let mut peer = join(&server, None, false);

    let (seqs, opens, hello) = blocks(&mut peer, 40, PATIENCE).await;
    assert!(opens >= 1);
    assert!(hello, "the seeder answers HELLO with its own");
    // A lone peer is a seed of its clubs and the seeder is its last hop for every other club,
    // so after the channel opens it gets every block.
    let tail = &seqs[seqs.len() - 20..];
    assert!(
        tail.windows(2).all(|w| w[1] == w[0] + 1),
        "no block missing once steady: {tail:?}"
    );
    let metrics = server.state.metrics.render();
    let seeded = metrics
        .lines()
        .find_map(|l| l.strip_prefix("clubcast_bytes_seeded_total "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("the seeded-bytes counter is exported");
    assert!(
        seeded >= 40 * 8 * 1024,
        "seeded bytes are counted: {seeded}"
    );

    server.shutdown.cancel();
    let _ = timeout(PATIENCE, peer.task).await;
    let _ = publisher.await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_gives_up_its_first_offer_connects_on_the_second() {
    // The native peer ends with an error if a seeder signal does not name its
    // attempt (`conn`), and drops those that name the given-up one.
    let server = start_server(Config::default(), SeederConfig::default(), "stale").await;
    let publisher = publish(server.stream.clone(), 20, 8 * 1024, server.shutdown.clone());
    let mut peer = join_with(&server, None, false, true);

    let (seqs, opens, hello) = blocks(&mut peer, 40, PATIENCE).await;
    assert_eq!(opens, 1, "one channel, on the second offer");
    assert!(hello);
    assert!(seqs.windows(2).all(|w| w[1] > w[0]));
    assert!(!peer.task.is_finished(), "the peer is still running");

    server.shutdown.cancel();
    let result = timeout(PATIENCE, peer.task).await;
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "the peer ended cleanly: {result:?}"
    );
    let _ = publisher.await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_beyond_max_connections_are_refused_and_the_first_peer_keeps_its_blocks() {
    let seeder_cfg = SeederConfig {
        max_connections: 1,
        ..SeederConfig::default()
    };
    let server = start_server(Config::default(), seeder_cfg, "seedfull").await;
    let publisher = publish(server.stream.clone(), 20, 4 * 1024, server.shutdown.clone());
    let mut first = join(&server, None, false);
    blocks(&mut first, 10, PATIENCE).await;

    let mut second = join(&server, None, false);
    let deadline = Instant::now() + PATIENCE;
    while server.state.metrics.rejects("seeder_full") == 0 {
        assert!(
            Instant::now() < deadline,
            "the second offer was never refused"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The first peer is still served, and the second never gets a channel to the seeder.
    blocks(&mut first, 20, PATIENCE).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    while let Ok(update) = second.updates.try_recv() {
        assert!(
            !matches!(update, PeerUpdate::Open | PeerUpdate::Block { .. }),
            "a connection over the bound was served: {update:?}"
        );
    }

    server.shutdown.cancel();
    let _ = timeout(PATIENCE, first.task).await;
    let _ = timeout(PATIENCE, second.task).await;
    let _ = publisher.await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_seed_is_reported_slow_and_handed_back() {
    let server = start_server(Config::default(), SeederConfig::default(), "seedslow").await;
    // ~3 MB/s, so the stalled receiver's buffers (about 12 MiB, see `rtc`) fill in seconds.
    let publisher = publish(
        server.stream.clone(),
        50,
        60 * 1024,
        server.shutdown.clone(),
    );
    let mut peer = join(&server, None, true);
    blocks(&mut peer, 1, PATIENCE).await;

    let deadline = Instant::now() + PATIENCE;
    while server.state.metrics.rejects("seeder_slow_seed") == 0 {
        assert!(
            Instant::now() < deadline,
            "a stalled seed was never reported as slow"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    server.shutdown.cancel();
    let _ = timeout(PATIENCE, peer.task).await;
    let _ = publisher.await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_keep_arriving_verified_and_in_order_through_a_lossy_path() {
    through_a_lossy_path(SeederRtc::WebrtcRs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocks_from_a_str0m_seeder_keep_arriving_through_a_lossy_path() {
    through_a_lossy_path(SeederRtc::Str0m).await;
}

/// 60 blocks reach a native peer through a path that drops 2 % of packets each way.
async fn through_a_lossy_path(stack: SeederRtc) {
    let server = start_on(stack, "seedloss").await;
    let publisher = publish(
        server.stream.clone(),
        20,
        16 * 1024,
        server.shutdown.clone(),
    );
    // 2 % of packets dropped each way. SCTP stalls; the seeder replaces the stalled link and
    // the peer reconnects (see `examples/seeder_bench.rs loss` for the figures).
    let mut peer = join(&server, Some(0.02), false);
    let (seqs, opens, _) = blocks(&mut peer, 60, Duration::from_secs(180)).await;
    assert_eq!(seqs.len(), 60);
    assert!(opens >= 1);

    server.shutdown.cancel();
    let _ = timeout(PATIENCE, peer.task).await;
    let _ = publisher.await;
    server.stop().await;
}
