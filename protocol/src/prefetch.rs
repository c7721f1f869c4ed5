//! Prefetch hints: ask the CPU to start loading a cache line without waiting
//! for it. A prefetch has no effect but on speed, and is a no-op where the
//! target has none (wasm32).
//!
//! A simulator that runs thousands of [`crate::peer::Peer`]s asks for the
//! state of the peers it runs next while it runs the current one, so that
//! their memory arrives in the meantime (the state of 10,000 peers is far
//! larger than any cache). A peer in a browser has no use for it.

/// What to load of a peer's state. Each depth's addresses are read from the
/// memory of the one before, so a depth pays off once that one has arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// The fields of its struct that an event reads first.
    Struct,
    /// The heap memory those fields point at.
    Heap,
    /// The memory the heap memory leads to (a link found in the key list).
    Behind,
}

/// Prefetches the cache line that holds the start of `x`.
#[inline(always)]
pub fn line<T>(x: &T) {
    prefetch_index::prefetch_index(std::slice::from_ref(x), 0);
}

/// Prefetches the cache line that holds the start of `s[i]` (nothing past
/// the end).
#[inline(always)]
pub fn at<T>(s: &[T], i: usize) {
    if i < s.len() {
        prefetch_index::prefetch_index(s, i);
    }
}
