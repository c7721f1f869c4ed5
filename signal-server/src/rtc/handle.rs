//! The half of a link that does not depend on the stack: the [`Link`](super::Link) side's
//! admission of messages and flags, and the link task's way of reporting and shutting down.
//! Both stacks' links wrap a [`LinkHandle`] and their tasks a [`TaskSide`], so the bounds and
//! the order of the last events are the same whichever stack runs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::budget::SendBudget;
use super::{
    CloseReason, LinkEvent, LinkEvents, RtcError, SendError, MAX_EVENT_QUEUE, MAX_MESSAGE,
    MAX_REMOTE_CANDIDATES,
};

/// State the link and its task both see.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Bytes admitted and not yet acknowledged.
    pub(crate) budget: SendBudget,
    /// The channel is open.
    pub(crate) open: AtomicBool,
    /// The task has ended the link.
    pub(crate) closed: AtomicBool,
}

/// The link's side: what [`Link`](super::Link) methods of either stack do alike.
#[derive(Debug)]
pub(crate) struct LinkHandle {
    pub(crate) shared: Arc<Shared>,
    outbound: mpsc::UnboundedSender<Bytes>,
    cancel: CancellationToken,
    task: Option<JoinHandle<()>>,
    remote_candidates: AtomicUsize,
}

/// The task's side: the messages to send, where events go, and the cancellation.
pub(crate) struct TaskSide {
    pub(crate) shared: Arc<Shared>,
    pub(crate) outbound: mpsc::UnboundedReceiver<Bytes>,
    events: mpsc::Sender<LinkEvent>,
    pub(crate) cancel: CancellationToken,
}

/// A new link's two sides and its event stream; `spawn` starts the task with its side.
pub(crate) fn link<F>(spawn: impl FnOnce(TaskSide) -> F) -> (LinkHandle, LinkEvents)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let shared = Arc::new(Shared::default());
    let (outbound_tx, outbound) = mpsc::unbounded_channel();
    let (events_tx, events_rx) = mpsc::channel(MAX_EVENT_QUEUE);
    let cancel = CancellationToken::new();
    let side = TaskSide {
        shared: Arc::clone(&shared),
        outbound,
        events: events_tx,
        cancel: cancel.clone(),
    };
    let task = tokio::spawn(spawn(side));
    let handle = LinkHandle {
        shared,
        outbound: outbound_tx,
        cancel,
        task: Some(task),
        remote_candidates: AtomicUsize::new(0),
    };
    (handle, LinkEvents::new(events_rx))
}

impl LinkHandle {
    /// [`Link::try_send`](super::Link::try_send): checks, admits and queues for the task.
    pub(crate) fn try_send(&self, message: Bytes) -> Result<(), SendError> {
        if self.shared.closed.load(Ordering::Acquire) {
            return Err(SendError::Closed);
        }
        let len = message.len();
        if len > MAX_MESSAGE {
            return Err(SendError::TooLarge { len });
        }
        if !self.shared.open.load(Ordering::Acquire) {
            return Err(SendError::NotOpen);
        }
        self.shared.budget.try_admit(len)?;
        if self.outbound.send(message).is_err() {
            self.shared.budget.discard(len);
            return Err(SendError::Closed);
        }
        Ok(())
    }

    /// [`Link::buffered_amount`](super::Link::buffered_amount).
    pub(crate) fn buffered_amount(&self) -> usize {
        self.shared.budget.buffered()
    }

    /// [`Link::is_open`](super::Link::is_open).
    pub(crate) fn is_open(&self) -> bool {
        self.shared.open.load(Ordering::Acquire) && !self.shared.closed.load(Ordering::Acquire)
    }

    /// Refuses control calls once the task has closed the connection.
    pub(crate) fn check_alive(&self) -> Result<(), RtcError> {
        if self.shared.closed.load(Ordering::Acquire) {
            Err(RtcError::Closed)
        } else {
            Ok(())
        }
    }

    /// Counts one remote candidate against [`MAX_REMOTE_CANDIDATES`].
    pub(crate) fn count_remote_candidate(&self) -> Result<(), RtcError> {
        if self.remote_candidates.fetch_add(1, Ordering::AcqRel) >= MAX_REMOTE_CANDIDATES {
            return Err(RtcError::TooManyCandidates);
        }
        Ok(())
    }

    /// [`Link::close`](super::Link::close): cancels the task and waits for it.
    pub(crate) async fn close(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            if let Err(error) = task.await {
                warn!(%error, "rtc link task ended abnormally");
            }
        }
    }
}

impl Drop for LinkHandle {
    fn drop(&mut self) {
        // The task notices, closes the connection and ends; nothing else holds it.
        self.cancel.cancel();
    }
}

impl TaskSide {
    /// Hands an event to the consumer, waiting while its queue is full — which stops the
    /// task reading the network and so pushes back on the peer. Gives up if the link is
    /// cancelled; an event nobody will read (the receiver was dropped) is discarded.
    pub(crate) async fn emit(&self, event: LinkEvent) {
        tokio::select! {
            biased;
            () = self.cancel.cancelled() => {}
            _ = self.events.send(event) => {}
        }
    }

    /// Ends the link: refuses further sends, forgets the bytes still queued (and `held`
    /// more that the task took but never handed over), and reports `reason` as the last
    /// event (`None`: our side closed it, nobody is told).
    pub(crate) async fn finish(&mut self, reason: Option<CloseReason>, held: usize) {
        self.shared.closed.store(true, Ordering::Release);
        self.shared.open.store(false, Ordering::Release);
        self.outbound.close();
        while let Ok(message) = self.outbound.try_recv() {
            self.shared.budget.discard(message.len());
        }
        self.shared.budget.discard(held);
        if let Some(reason) = reason {
            debug!(?reason, "rtc: link closed");
            self.emit(LinkEvent::Closed(reason)).await;
        }
    }
}
