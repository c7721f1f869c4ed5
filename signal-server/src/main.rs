//! clubcast-server.
fn main() {}
