//! The command line, run as a process: a clubs-only run re-runs itself with
//! mimalloc's purge delay off and huge pages on (`tune_allocator` in
//! `main.rs`), and still writes its report; other runs keep the allocator's
//! defaults, and an option the environment sets stays as it is.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Numbers each run's report file: the tests run side by side in one process.
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Runs `clubcast-sim` with `args` and debug output, and the given purge
/// delay in its environment (`None`: unset). Returns its stderr and the JSON
/// report it wrote.
fn sim(args: &[&str], purge: Option<&str>) -> (String, serde_json::Value) {
    let json: PathBuf = std::env::temp_dir().join(format!(
        "clubcast-sim-cli-{}-{}.json",
        std::process::id(),
        RUNS.fetch_add(1, Ordering::Relaxed)
    ));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clubcast-sim"));
    cmd.args(args)
        .args(["--peers", "20", "--seconds", "3", "--json"])
        .arg(&json)
        .env("CLUBCAST_SIM_DEBUG", "1");
    match purge {
        Some(v) => cmd.env("MIMALLOC_PURGE_DELAY", v),
        None => cmd.env_remove("MIMALLOC_PURGE_DELAY"),
    };
    cmd.env_remove("MIMALLOC_ALLOW_LARGE_OS_PAGES");
    let out = cmd.output().expect("clubcast-sim runs");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "clubcast-sim failed: {stderr}");
    let report = std::fs::read_to_string(&json).expect("the report was written");
    std::fs::remove_file(&json).expect("the report is removed");
    (
        stderr,
        serde_json::from_str(&report).expect("the report is JSON"),
    )
}

fn events(report: &serde_json::Value) -> u64 {
    report["events"].as_u64().expect("events is a count")
}

/// Checks the allocator options the run printed (`CLUBCAST_SIM_DEBUG`).
fn assert_options(stderr: &str, purge_delay: &str, large_pages: &str) {
    for line in [
        format!("allocator: MIMALLOC_PURGE_DELAY={purge_delay}"),
        format!("allocator: MIMALLOC_ALLOW_LARGE_OS_PAGES={large_pages}"),
    ] {
        assert!(stderr.lines().any(|l| l == line), "no {line:?} in {stderr}");
    }
}

#[test]
fn a_clubs_run_tunes_the_allocator_and_still_reports() {
    let (stderr, report) = sim(&["--mode", "clubs"], None);
    assert_options(&stderr, "-1", "1");
    assert!(events(&report) > 0);
}

#[test]
fn the_environment_overrides_the_purge_delay() {
    let (stderr, _) = sim(&["--mode", "clubs"], Some("10"));
    assert_options(&stderr, "10", "1");
}

#[test]
fn a_mesh_pull_run_keeps_the_allocator_defaults() {
    let (stderr, report) = sim(&["--mode", "mesh-pull"], None);
    assert_options(&stderr, "unset", "unset");
    assert!(events(&report) > 0);
}
