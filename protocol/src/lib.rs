//! Sans-IO core of clubcast.
#![forbid(unsafe_code)]
