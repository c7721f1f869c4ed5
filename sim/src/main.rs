//! clubcast-sim: discrete-event swarm simulator.
fn main() {}
