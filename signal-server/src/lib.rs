//! clubcast server library.

pub mod rtc;
