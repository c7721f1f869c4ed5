//! Where a player's start went: the first time each milestone was reached.
//!
//! `startup_ms` says how long a start took; this says where the time went, so
//! a slow start can be told apart: a slow server (the welcome), slow media
//! (the init segment, the first block), or a busy machine (media buffered,
//! then the first frame late). `stats().startup_trace` holds each milestone in
//! ms after the player's creation, `null` until reached.

use serde_json::{Map, Value};

/// A milestone of a player's start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mark {
    /// The signaling socket opened (the join is sent).
    SocketOpen,
    /// The welcome arrived.
    Welcome,
    /// The init segment arrived.
    Init,
    /// The first block arrived from the origin.
    OriginBlock,
    /// The first peer link opened.
    LinkOpen,
    /// The core handed the first block to playback.
    FirstBlock,
    /// The element reported buffered media.
    Buffered,
    /// Playback was started (`play()` at the start position).
    Play,
    /// The first frame was shown.
    FirstFrame,
}

impl Mark {
    const ALL: [Mark; 9] = [
        Mark::SocketOpen,
        Mark::Welcome,
        Mark::Init,
        Mark::OriginBlock,
        Mark::LinkOpen,
        Mark::FirstBlock,
        Mark::Buffered,
        Mark::Play,
        Mark::FirstFrame,
    ];

    /// Its key in `startup_trace`.
    pub(crate) fn key(self) -> &'static str {
        match self {
            Mark::SocketOpen => "socket_open",
            Mark::Welcome => "welcome",
            Mark::Init => "init",
            Mark::OriginBlock => "origin_block",
            Mark::LinkOpen => "link_open",
            Mark::FirstBlock => "first_block",
            Mark::Buffered => "buffered",
            Mark::Play => "play",
            Mark::FirstFrame => "first_frame",
        }
    }
}

/// The first time each [`Mark`] was reached (`performance.now()`).
#[derive(Debug, Clone, Default)]
pub(crate) struct StartupTrace {
    at: [Option<f64>; Mark::ALL.len()],
}

impl StartupTrace {
    /// Records `m` at `now`, unless it was reached before.
    pub(crate) fn mark(&mut self, m: Mark, now: f64) {
        self.at[m as usize].get_or_insert(now);
    }

    /// Each milestone in whole ms after `created`, `null` until reached.
    pub(crate) fn to_json(&self, created: f64) -> Value {
        let mut out = Map::new();
        for m in Mark::ALL {
            let v = self.at[m as usize].map(|t| (t - created).round());
            out.insert(m.key().to_owned(), v.into());
        }
        Value::Object(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_first_time_of_each_mark_relative_to_creation() {
        let mut t = StartupTrace::default();
        t.mark(Mark::Welcome, 1_040.4);
        t.mark(Mark::Welcome, 1_900.0);
        t.mark(Mark::FirstFrame, 1_650.6);
        let j = t.to_json(1_000.0);
        assert_eq!(j["welcome"], 40.0);
        assert_eq!(j["first_frame"], 651.0);
        assert!(j["init"].is_null());
        assert_eq!(j.as_object().map(Map::len), Some(Mark::ALL.len()));
        for (i, m) in Mark::ALL.iter().enumerate() {
            assert_eq!(*m as usize, i, "ALL is in declaration order");
        }
    }
}
