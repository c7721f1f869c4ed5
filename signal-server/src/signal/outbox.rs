//! A peer's outbound queue: bounded, filled with `try_send` under the swarm
//! lock, drained by the peer's connection task.
//!
//! It does what a bounded `tokio::sync::mpsc` channel did here, in less
//! resident memory: every connection holds one for its whole life, and an idle
//! tokio channel keeps a 32-slot block and a cache-padded head, about 1.3 KiB,
//! where this keeps under 100 bytes and a `VecDeque` sized by what was queued.
//!
//! Dropping the [`Sender`] closes the queue: the receiver still gets what was
//! queued, then `None`. Dropping the [`Receiver`] makes every later send fail.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Poll, Waker};

/// Slots an emptied queue keeps; a burst grows it up to the bound, and the
/// memory goes back once the burst is drained.
const KEEP_CAPACITY: usize = 4;

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum OutboxError {
    /// The queue holds its bound of messages.
    #[error("the outbound queue is full")]
    Full,
    /// The receiver is gone.
    #[error("the outbound queue is closed")]
    Closed,
}

struct State {
    queue: VecDeque<String>,
    /// The receiver's task, while it waits on an empty queue.
    waker: Option<Waker>,
    /// The sender or the receiver is gone.
    closed: bool,
}

struct Shared {
    state: Mutex<State>,
    bound: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Neither side panics while holding the lock with a half-done change.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn close(&self) {
        let waker = {
            let mut s = self.lock();
            s.closed = true;
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// The swarm's end of a peer's queue.
pub(crate) struct Sender(Arc<Shared>);

/// The connection task's end of a peer's queue.
pub(crate) struct Receiver(Arc<Shared>);

/// A queue that holds at most `bound` messages.
pub(crate) fn outbox(bound: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            waker: None,
            closed: false,
        }),
        bound,
    });
    (Sender(shared.clone()), Receiver(shared))
}

impl Sender {
    /// Queues `msg` unless the queue is full or its receiver gone; never waits.
    pub(crate) fn try_send(&self, msg: String) -> Result<(), OutboxError> {
        let waker = {
            let mut s = self.0.lock();
            if s.closed {
                return Err(OutboxError::Closed);
            }
            if s.queue.len() >= self.0.bound {
                return Err(OutboxError::Full);
            }
            s.queue.push_back(msg);
            s.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Receiver {
    /// The next message; `None` once the sender is gone and the queue drained.
    /// Cancel-safe: a message is taken only by the poll that returns it.
    pub(crate) async fn recv(&mut self) -> Option<String> {
        poll_fn(|cx| {
            let mut s = self.0.lock();
            if let Some(msg) = s.queue.pop_front() {
                if s.queue.is_empty() && s.queue.capacity() > KEEP_CAPACITY {
                    // A burst is over: give back what it grew.
                    s.queue = VecDeque::new();
                }
                return Poll::Ready(Some(msg));
            }
            if s.closed {
                return Poll::Ready(None);
            }
            match &mut s.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                slot => *slot = Some(cx.waker().clone()),
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
impl Receiver {
    /// The next queued message, if any, without waiting.
    pub(crate) fn try_recv(&mut self) -> Option<String> {
        self.0.lock().queue.pop_front()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.0.close();
        // Nobody will read them.
        self.0.lock().queue = VecDeque::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn messages_arrive_in_order_and_the_bound_refuses_more() {
        let (tx, mut rx) = outbox(2);
        tx.try_send("a".into()).expect("room");
        tx.try_send("b".into()).expect("room");
        assert_eq!(tx.try_send("c".into()), Err(OutboxError::Full));
        assert_eq!(rx.recv().await.as_deref(), Some("a"));
        tx.try_send("d".into()).expect("room again");
        assert_eq!(rx.recv().await.as_deref(), Some("b"));
        assert_eq!(rx.recv().await.as_deref(), Some("d"));
    }

    #[tokio::test]
    async fn a_drained_burst_gives_its_memory_back() {
        let (tx, mut rx) = outbox(256);
        for i in 0..200 {
            tx.try_send(i.to_string()).expect("room");
        }
        for _ in 0..200 {
            rx.recv().await.expect("queued");
        }
        assert!(rx.0.lock().queue.capacity() <= KEEP_CAPACITY);
    }

    #[tokio::test]
    async fn a_dropped_sender_ends_the_queue_after_what_was_queued() {
        let (tx, mut rx) = outbox(8);
        tx.try_send("last".into()).expect("room");
        drop(tx);
        assert_eq!(rx.recv().await.as_deref(), Some("last"));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn a_dropped_receiver_fails_sends() {
        let (tx, rx) = outbox(8);
        drop(rx);
        assert_eq!(tx.try_send("x".into()), Err(OutboxError::Closed));
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_for_a_send_and_for_a_close() {
        let (tx, mut rx) = outbox(8);
        let reader = tokio::spawn(async move {
            let first = rx.recv().await;
            let end = rx.recv().await;
            (first, end)
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        tx.try_send("hello".into()).expect("room");
        tokio::time::sleep(Duration::from_millis(20)).await;
        drop(tx);
        let (first, end) = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("woken in time")
            .expect("reader ran");
        assert_eq!(first.as_deref(), Some("hello"));
        assert_eq!(end, None);
    }

    #[tokio::test]
    async fn an_abandoned_recv_loses_nothing() {
        let (tx, mut rx) = outbox(8);
        // A select! that picks another branch drops a pending recv like this.
        let waited = tokio::time::timeout(Duration::from_millis(10), rx.recv()).await;
        assert!(waited.is_err(), "nothing was queued");
        tx.try_send("kept".into()).expect("room");
        assert_eq!(rx.recv().await.as_deref(), Some("kept"));
    }
}
