//! Measures the `rtc` wrapper native to native on this machine, on each stack in turn (the
//! `webrtc` crate, then `str0m`, both ends on the same stack): connection setup time and the
//! throughput of one channel. Run with
//! `cargo run --release -p clubcast-server --example rtc_bench`.
//!
//! Setup time is from `connect()` until both sides report `Open`, with candidates trickled
//! through an in-process relay (no network latency in the signaling). Throughput is the
//! receiver's count of payload bytes over the time from the first send to the last message,
//! with the sender pacing on `Full` / `Writable`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use clubcast_server::rtc::{
    Gathering, Handshake, Link, LinkEvent, LinkEvents, RtcConfig, SendError, Str0m, Transport,
    WebrtcRs,
};

const SETUPS: usize = 10;
const TOTAL_BYTES: usize = 64 * 1024 * 1024;

async fn open_pair<T: Transport>(
    stack: &T,
) -> Result<(T::Link, LinkEvents, T::Link, LinkEvents), String> {
    let Handshake {
        link: a,
        local: offer,
        events: mut a_events,
    } = stack.connect().await.map_err(|e| e.to_string())?;
    let Handshake {
        link: b,
        local: answer,
        events: mut b_events,
    } = stack.accept(offer).await.map_err(|e| e.to_string())?;
    a.apply_answer(answer).await.map_err(|e| e.to_string())?;
    let (mut a_open, mut b_open) = (false, false);
    while !(a_open && b_open) {
        let (from_a, event) = tokio::select! {
            Some(e) = a_events.next() => (true, e),
            Some(e) = b_events.next() => (false, e),
            () = tokio::time::sleep(Duration::from_secs(60)) => return Err("no open".into()),
        };
        match (from_a, event) {
            (true, LinkEvent::LocalCandidate(c)) => {
                b.add_remote_candidate(c).await.map_err(|e| e.to_string())?
            }
            (false, LinkEvent::LocalCandidate(c)) => {
                a.add_remote_candidate(c).await.map_err(|e| e.to_string())?
            }
            (true, LinkEvent::Open) => a_open = true,
            (false, LinkEvent::Open) => b_open = true,
            (_, other) => return Err(format!("unexpected {other:?}")),
        }
    }
    Ok((a, a_events, b, b_events))
}

async fn throughput<T: Transport>(stack: &T, message: usize) -> Result<f64, String> {
    let (a, mut a_events, b, mut b_events) = open_pair(stack).await?;
    let count = TOTAL_BYTES / message;
    let payload = Bytes::from(vec![0x5a; message]);
    let receiver = tokio::spawn(async move {
        let mut got = 0usize;
        while got < count {
            match b_events.next().await {
                Some(LinkEvent::Message(_)) => got += 1,
                Some(LinkEvent::LocalCandidate(_)) => {}
                other => return Err(format!("receiver saw {other:?}")),
            }
        }
        drop(b);
        Ok(Instant::now())
    });
    let start = Instant::now();
    let mut sent = 0;
    while sent < count {
        match a.try_send(payload.clone()) {
            Ok(()) => sent += 1,
            Err(SendError::Full { .. }) => loop {
                match a_events.next().await {
                    Some(LinkEvent::Writable) => break,
                    Some(LinkEvent::LocalCandidate(_)) => {}
                    other => return Err(format!("sender saw {other:?}")),
                }
            },
            Err(e) => return Err(e.to_string()),
        }
    }
    let end = receiver
        .await
        .map_err(|e| e.to_string())??
        .duration_since(start);
    a.close().await;
    Ok(TOTAL_BYTES as f64 / end.as_secs_f64() / 1e6)
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let config = RtcConfig {
        gathering: Gathering::Trickle,
        ..RtcConfig::default()
    };
    println!("webrtc 0.21.1:");
    measure(&WebrtcRs::new(config.clone())).await?;
    println!("str0m 0.25.0:");
    measure(&Str0m::new(config)).await
}

/// Setup times and throughput of one stack, both ends on it.
async fn measure<T: Transport>(stack: &T) -> Result<(), String> {
    let mut setups = Vec::new();
    for _ in 0..SETUPS {
        let start = Instant::now();
        let (a, _ae, b, _be) = open_pair(stack).await?;
        setups.push(start.elapsed());
        a.close().await;
        b.close().await;
    }
    setups.sort();
    println!(
        "setup native<->native over {SETUPS} runs: min {:?}, median {:?}, max {:?}",
        setups[0],
        setups[SETUPS / 2],
        setups[SETUPS - 1]
    );
    for message in [16 * 1024, 64 * 1024] {
        let mbps = throughput(stack, message).await?;
        println!(
            "one channel, {} KiB messages, {} MiB: {mbps:.1} MB/s ({:.0} Mbit/s)",
            message / 1024,
            TOTAL_BYTES >> 20,
            mbps * 8.0
        );
    }
    Ok(())
}
