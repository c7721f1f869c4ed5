//! Send-side byte accounting shared by every stack: what `try_send` admitted and the peer has
//! not yet acknowledged. Kept apart from the stacks so the bound is the same whichever one runs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::{SendError, LOW_BUFFERED_BYTES, MAX_BUFFERED_BYTES};

/// Bytes a link holds for sending: everything admitted and not yet acknowledged, and how
/// much of it the stack holds.
///
/// Admission checks one counter, `total`, so no reading of it counts a message twice or
/// not at all while the message moves from the link's queue to the stack.
#[derive(Debug, Default)]
pub(crate) struct SendBudget {
    /// Admitted by `try_send` and not yet acknowledged: queued plus in flight.
    total: AtomicUsize,
    /// Handed to the stack and not yet acknowledged, as last read from it. Written only by
    /// the link's own I/O loop.
    in_flight: AtomicUsize,
    /// A send was refused since the last `Writable`.
    refused: AtomicBool,
}

impl SendBudget {
    /// Everything held: queued plus in flight.
    pub(crate) fn buffered(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }

    /// Admits `len` more bytes, or refuses if that would pass [`MAX_BUFFERED_BYTES`].
    ///
    /// Safe to call from several threads: the add comes first and is undone on refusal, so
    /// racing callers may be refused early but never push the total over the bound.
    pub(crate) fn try_admit(&self, len: usize) -> Result<(), SendError> {
        let before = self.total.fetch_add(len, Ordering::AcqRel);
        if before.saturating_add(len) > MAX_BUFFERED_BYTES {
            self.total.fetch_sub(len, Ordering::AcqRel);
            self.refused.store(true, Ordering::Release);
            return Err(SendError::Full { buffered: before });
        }
        Ok(())
    }

    /// Counts `len` queued bytes as in flight, when the stack has taken them; the total
    /// does not change.
    pub(crate) fn handed_over(&self, len: usize) {
        self.in_flight.fetch_add(len, Ordering::AcqRel);
    }

    /// Forgets `len` queued bytes that will never be handed over (the link closed).
    pub(crate) fn discard(&self, len: usize) {
        self.total.fetch_sub(len, Ordering::AcqRel);
    }

    /// Replaces the in-flight figure with a fresh reading from the stack; the total moves
    /// by the difference (what the peer acknowledged since).
    pub(crate) fn set_in_flight(&self, bytes: usize) {
        let old = self.in_flight.swap(bytes, Ordering::AcqRel);
        if bytes >= old {
            self.total.fetch_add(bytes - old, Ordering::AcqRel);
        } else {
            self.total.fetch_sub(old - bytes, Ordering::AcqRel);
        }
    }

    /// The in-flight figure as last read.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// True once after a refusal, when the buffer has drained to [`LOW_BUFFERED_BYTES`].
    pub(crate) fn take_writable(&self) -> bool {
        self.buffered() <= LOW_BUFFERED_BYTES && self.refused.swap(false, Ordering::AcqRel)
    }

    /// Whether a refused sender is waiting for `Writable`.
    pub(crate) fn has_refused(&self) -> bool {
        self.refused.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rtc::MAX_MESSAGE;

    #[test]
    fn refuses_at_the_bound_and_never_passes_it() {
        let budget = SendBudget::default();
        let mut admitted = 0;
        while budget.try_admit(MAX_MESSAGE).is_ok() {
            admitted += MAX_MESSAGE;
        }
        assert_eq!(admitted, MAX_BUFFERED_BYTES);
        assert_eq!(budget.buffered(), MAX_BUFFERED_BYTES);
        assert_eq!(
            budget.try_admit(1),
            Err(SendError::Full {
                buffered: MAX_BUFFERED_BYTES
            })
        );
        assert_eq!(budget.buffered(), MAX_BUFFERED_BYTES);
    }

    #[test]
    fn a_message_handed_to_the_stack_is_counted_once() {
        let budget = SendBudget::default();
        budget.try_admit(1000).expect("room");
        budget.handed_over(1000);
        assert_eq!(budget.buffered(), 1000, "moved, not added");
        budget.try_admit(500).expect("room");
        budget.set_in_flight(400); // the peer acknowledged 600
        assert_eq!(budget.buffered(), 900);
        assert_eq!(budget.in_flight(), 400);
        budget.discard(500);
        budget.set_in_flight(0);
        assert_eq!(budget.buffered(), 0);
    }

    #[test]
    fn writable_once_after_refusal_when_drained() {
        let budget = SendBudget::default();
        assert!(!budget.take_writable(), "no refusal, no Writable");
        while budget.try_admit(MAX_MESSAGE).is_ok() {}
        budget.handed_over(MAX_BUFFERED_BYTES);
        budget.set_in_flight(MAX_BUFFERED_BYTES);
        assert!(!budget.take_writable(), "still full");
        budget.set_in_flight(LOW_BUFFERED_BYTES);
        assert!(budget.take_writable());
        assert!(!budget.take_writable(), "reported once");
        assert!(budget.try_admit(MAX_MESSAGE).is_ok());
    }
}
