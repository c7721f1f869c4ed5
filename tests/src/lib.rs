//! Headless-Chromium swarm test harness for clubcast.
