//! Send-side byte accounting shared by every stack: what `try_send` admitted and the peer has
//! not yet acknowledged. Kept apart from the stacks so the bound is the same whichever one runs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::{SendError, LOW_BUFFERED_BYTES, MAX_BUFFERED_BYTES};

/// Bytes a link holds for sending, split by where they are.
#[derive(Debug, Default)]
pub(crate) struct SendBudget {
    /// Admitted by `try_send`, not yet handed to the stack.
    queued: AtomicUsize,
    /// Handed to the stack and not yet acknowledged, as last read from it.
    in_flight: AtomicUsize,
    /// A send was refused since the last `Writable`.
    refused: AtomicBool,
}

impl SendBudget {
    /// Everything held: queued plus in flight.
    pub(crate) fn buffered(&self) -> usize {
        self.queued
            .load(Ordering::Acquire)
            .saturating_add(self.in_flight.load(Ordering::Acquire))
    }

    /// Admits `len` more bytes, or refuses if that would pass [`MAX_BUFFERED_BYTES`].
    ///
    /// Safe to call from several threads: the add comes first and is undone on refusal, so
    /// racing callers may be refused early but never push the total over the bound.
    pub(crate) fn try_admit(&self, len: usize) -> Result<(), SendError> {
        let before = self
            .queued
            .fetch_add(len, Ordering::AcqRel)
            .saturating_add(self.in_flight.load(Ordering::Acquire));
        if before.saturating_add(len) > MAX_BUFFERED_BYTES {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            self.refused.store(true, Ordering::Release);
            return Err(SendError::Full { buffered: before });
        }
        Ok(())
    }

    /// Moves `len` bytes from queued to in flight, when the stack has taken them.
    pub(crate) fn handed_over(&self, len: usize) {
        self.in_flight.fetch_add(len, Ordering::AcqRel);
        self.queued.fetch_sub(len, Ordering::AcqRel);
    }

    /// Forgets `len` queued bytes that will never be handed over (the link closed).
    pub(crate) fn discard(&self, len: usize) {
        self.queued.fetch_sub(len, Ordering::AcqRel);
    }

    /// Replaces the in-flight figure with a fresh reading from the stack.
    pub(crate) fn set_in_flight(&self, bytes: usize) {
        self.in_flight.store(bytes, Ordering::Release);
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
