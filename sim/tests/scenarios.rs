//! Scenario tests: 200 viewers for 60 s of a 2 Mbit/s stream, driven through
//! the unchanged protocol state machines.
//!
//! Most scenarios give every viewer 4× the bitrate of upload and no free riders
//! ("provisioned"). `default_capacity_model_meets_the_goals` runs the default
//! capacity model (mean 1.5×, 20 % free riders at 0.2×), where the relays are
//! asked for about all the upload they have.

use clubcast_sim::config::{Config, Mode};
use clubcast_sim::Run;

fn provisioned(mode: Mode) -> Config {
    Config {
        mode,
        peers: 200,
        seconds: 60,
        upload_mean_x: 4.0,
        free_rider_frac: 0.0,
        seed: 7,
        ..Config::default()
    }
}

fn run(cfg: &Config) -> Run {
    clubcast_sim::run(cfg).expect("valid config")
}

/// Honest viewers that missed a block cut after their startup, after the
/// flash crowd of the first 5 s of stream, and at least 3 s before the end
/// (or their departure).
fn missing_blocks(run: &Run) -> Vec<(usize, Vec<u64>)> {
    let settled = run.stream.start_us + 5_000_000;
    (1..run.metrics.recs.len())
        .filter(|id| !run.metrics.recs[*id].hostile)
        .map(|id| {
            let r = &run.metrics.recs[id];
            let until = r.leave_us.unwrap_or(run.end_us).min(run.end_us) - 3_000_000;
            let missed = run.metrics.never_arrived(id, &run.stream, until);
            let missed: Vec<u64> = missed
                .into_iter()
                .filter(|s| run.stream.ingest_us[*s as usize] >= settled)
                .collect();
            (id, missed)
        })
        .filter(|(_, m)| !m.is_empty())
        .collect()
}

#[test]
fn every_viewer_gets_every_block_in_time_and_the_origin_stays_flat() {
    let r = run(&provisioned(Mode::Clubs));
    let m = &r.report;
    eprintln!("{m:?}");
    assert!(m.continuity >= 0.999, "continuity {}", m.continuity);
    assert!(
        m.origin_egress_ratio <= 3.5,
        "origin egress {} × bitrate",
        m.origin_egress_ratio
    );
    assert!(
        m.p2p_ratio > 0.9,
        "the swarm carries the stream: {}",
        m.p2p_ratio
    );
    assert_eq!(m.corrupt_blocks_played, 0);
    // Every club reaches every viewer: at most 1 in 10,000 (viewer, block)
    // pairs is never received (the strict version, over three seeds, is
    // `every_block_reaches_every_viewer`).
    let missing = missing_blocks(&r);
    let lost: usize = missing.iter().map(|(_, m)| m.len()).sum();
    assert!(
        lost * 10_000 <= 200 * r.stream.len(),
        "viewers missed blocks: {:?}",
        &missing[..missing.len().min(5)]
    );
    let started = (1..r.metrics.recs.len())
        .filter(|id| r.metrics.recs[*id].first_play_us.is_some())
        .count();
    assert_eq!(started, 200, "every viewer started playing");
}

#[test]
fn hostile_relays_are_caught_and_nothing_corrupt_is_played() {
    let cfg = Config {
        hostile: 0.10,
        ..provisioned(Mode::Clubs)
    };
    let r = run(&cfg);
    let m = &r.report;
    eprintln!("{m:?}");
    assert!(m.hostile_viewers > 0);
    assert_eq!(m.corrupt_blocks_played, 0, "a corrupt block was played");
    assert!(
        m.blocks_rejected > 0,
        "corrupt blocks were sent and rejected"
    );
    assert!(
        m.hostile_kicked * 10 >= m.hostile_viewers * 8,
        "hostile peers kicked: {} of {}",
        m.hostile_kicked,
        m.hostile_viewers
    );
    assert_eq!(m.honest_kicked, 0, "no honest peer is kicked");
    assert!(m.continuity >= 0.99, "continuity {}", m.continuity);
}

#[test]
fn churn_strands_nobody() {
    let cfg = Config {
        churn_per_min: 0.3,
        ..provisioned(Mode::Clubs)
    };
    let r = run(&cfg);
    let m = &r.report;
    eprintln!("{m:?}");
    assert!(m.viewers > 250, "viewers joined and left: {}", m.viewers);
    assert_eq!(m.stranded_viewers, 0);
    // Every joiner that stayed 5 s started playing and kept up.
    for id in 1..r.metrics.recs.len() {
        let rec = &r.metrics.recs[id];
        let stayed = rec.leave_us.unwrap_or(r.end_us).min(r.end_us) - rec.join_us;
        if stayed < 5_000_000 {
            continue;
        }
        assert!(rec.first_play_us.is_some(), "viewer {id} never played");
        let (eligible, ok) = r.metrics.continuity_of(id, &r.stream, r.end_us);
        assert!(
            ok * 100 >= eligible * 98,
            "viewer {id} stranded: {ok} of {eligible} in time"
        );
    }
    assert!(m.continuity >= 0.995, "continuity {}", m.continuity);
}

#[test]
fn baselines_bracket_the_clubs() {
    let cfg = |mode| Config {
        seconds: 20,
        ..provisioned(mode)
    };
    let server = run(&cfg(Mode::ServerOnly)).report;
    assert!(
        server.origin_egress_ratio > 190.0,
        "server-only sends N copies"
    );
    assert_eq!(server.p2p_ratio, 0.0);
    assert!(server.continuity >= 0.999);
    let mesh = run(&cfg(Mode::MeshPull)).report;
    assert!(mesh.p2p_ratio > 0.5, "the mesh relays: {}", mesh.p2p_ratio);
    assert!(mesh.origin_egress_ratio < 10.0);
    assert!(mesh.upload_x_bitrate.p50 > 0.3);
    assert_eq!(mesh.upload_x_bitrate.viewers, 200, "every viewer measured");
}

#[test]
fn a_run_too_short_to_measure_upload_says_so() {
    // 20 viewers for `seconds`: the report and its table row.
    let twenty = |seconds| {
        let report = run(&Config {
            peers: 20,
            seconds,
            ..provisioned(Mode::Clubs)
        })
        .report;
        let row = clubcast_sim::report::Row {
            label: "N=20".into(),
            report: report.clone(),
        };
        (report, clubcast_sim::report::table(&[row]))
    };
    let (short, table) = twenty(5);
    assert_eq!(short.upload_x_bitrate.viewers, 0);
    assert!(table.contains("| n/a |"), "{table}");
    let (long, table) = twenty(12);
    assert_eq!(long.upload_x_bitrate.viewers, 20);
    let (p50, p99) = (long.upload_x_bitrate.p50, long.upload_x_bitrate.p99);
    assert!(table.contains(&format!("| {p50:.2}/{p99:.2} |")), "{table}");
    assert!(!table.contains("n/a"), "{table}");
}

fn assert_deterministic(modes: &[Mode]) {
    for &mode in modes {
        let cfg = Config {
            peers: 60,
            seconds: 10,
            churn_per_min: 0.5,
            hostile: 0.05,
            ..provisioned(mode)
        };
        let a = run(&cfg).report;
        let b = run(&cfg).report;
        let strip = |mut r: clubcast_sim::metrics::Report| {
            r.wall_seconds = 0.0;
            r.max_rss_mib = 0.0;
            r
        };
        assert_eq!(strip(a), strip(b), "{mode:?} is deterministic");
    }
}

#[test]
fn a_run_is_a_function_of_its_seed() {
    assert_deterministic(&[Mode::ServerOnly, Mode::MeshPull]);
}

#[test]
fn a_clubs_run_is_a_function_of_its_seed() {
    assert_deterministic(&[Mode::Clubs]);
}

/// The clubs driver runs viewers on several threads in windows of the
/// lookahead; equal times and loss do not depend on which thread ran what, so
/// one, two and three threads give the same report.
#[test]
fn a_clubs_run_does_not_depend_on_its_thread_count() {
    let cfg = Config {
        peers: 200,
        seconds: 10,
        churn_per_min: 0.5,
        hostile: 0.05,
        seed: 11,
        ..Config::default()
    };
    let reports: Vec<_> = [1, 2, 3]
        .iter()
        .map(|&threads| {
            let mut r = run(&Config {
                threads,
                ..cfg.clone()
            })
            .report;
            assert_eq!(r.threads, threads);
            r.wall_seconds = 0.0;
            r.max_rss_mib = 0.0;
            r.threads = 0;
            r
        })
        .collect();
    assert!(reports[0].events > 100_000, "{:?}", reports[0]);
    assert_eq!(reports[0], reports[1], "one thread against two");
    assert_eq!(reports[0], reports[2], "one thread against three");
}

/// Within a window no viewer's event reaches another, so running each
/// viewer's events together (the default) gives the report that running the
/// window in time order gives, on one thread and on two.
#[test]
fn a_clubs_run_is_the_same_viewer_by_viewer_and_in_time_order() {
    let cfg = Config {
        peers: 200,
        seconds: 10,
        churn_per_min: 0.5,
        hostile: 0.05,
        seed: 12,
        ..Config::default()
    };
    let report = |threads, time_order| {
        let mut r = run(&Config {
            threads,
            time_order,
            ..cfg.clone()
        })
        .report;
        r.wall_seconds = 0.0;
        r.max_rss_mib = 0.0;
        r
    };
    for threads in [1, 2] {
        let by_peer = report(threads, false);
        assert!(by_peer.events > 100_000, "{by_peer:?}");
        assert_eq!(by_peer, report(threads, true), "{threads} thread(s)");
    }
}

#[test]
fn a_clubs_run_is_the_same_with_server_events_run_after_windows() {
    // Block cuts and joins that fall in a window run after it; ending every
    // window at each of them gives the same run. Every viewer is near the
    // server, so that a seeder push would land in the window it was held
    // from if the window were too long.
    let cfg = Config {
        peers: 200,
        seconds: 10,
        churn_per_min: 0.5,
        hostile: 0.05,
        seed: 13,
        threads: 2,
        latency_min_ms: 10,
        latency_max_ms: 12,
        ..Config::default()
    };
    let report = |cut_at_server_events| {
        let mut r = run(&Config {
            cut_at_server_events,
            ..cfg.clone()
        })
        .report;
        r.wall_seconds = 0.0;
        r.max_rss_mib = 0.0;
        r
    };
    let held = report(false);
    assert!(held.events > 100_000, "{held:?}");
    assert_eq!(held, report(true));
}

#[test]
fn churn_and_hostile_relays_keep_continuity() {
    // The bench's hard scenario at test size: 10 %/min churn and 5 % hostile
    // relays on the default capacity model. Seed 1 gives 0.9997 (0.9985
    // before orphaned last-hop blocks were pulled and deadlines learnt the
    // block rate from real blocks); seeds 1 to 6: 0.9989 (seed 5) to 0.9999.
    let r = run(&Config {
        peers: 200,
        seconds: 60,
        churn_per_min: 0.1,
        hostile: 0.05,
        ..Config::default()
    });
    let m = &r.report;
    eprintln!("{m:?}");
    assert_eq!(m.corrupt_blocks_played, 0);
    assert!(m.continuity >= 0.999, "continuity {}", m.continuity);
}

#[test]
fn default_capacity_model_meets_the_goals() {
    // With 16 KiB blocks this gave 0.996 and was ignored; with 8 KiB blocks,
    // seed 1 gave 0.99998 and seeds 1 to 6 0.9982 (seed 5) to 1.0; with 4 KiB
    // blocks and slow-source reports, seeds 1 to 6 give 0.99999 to 1.0.
    let r = run(&Config {
        peers: 200,
        seconds: 60,
        ..Config::default()
    });
    let m = &r.report;
    eprintln!("{m:?}");
    assert!(m.continuity >= 0.999, "continuity {}", m.continuity);
    assert!(m.origin_egress_ratio <= 3.5);
}

/// 200 viewers × 60 s on seeds 1 and 2, none stating its upload, with or
/// without the upload probe: continuity at least `continuity`, and upload
/// p99 at most 2× the bitrate.
fn unstated_runs(upload_probe: bool, continuity: f64) {
    for seed in [1, 2] {
        let r = run(&Config {
            peers: 200,
            seconds: 60,
            stated_upload: 0.0,
            upload_probe,
            seed,
            ..Config::default()
        });
        let m = &r.report;
        eprintln!("{m:?}");
        assert!(
            m.continuity >= continuity,
            "seed {seed}: continuity {}",
            m.continuity
        );
        assert!(
            m.upload_x_bitrate.p99 <= 2.0,
            "seed {seed}: {:?}",
            m.upload_x_bitrate
        );
    }
}

#[test]
fn viewers_that_state_no_upload_are_planned_on_what_they_send() {
    // No viewer states its upload (a page that sets no `upload_kbps`) and
    // none runs the upload probe: each is planned at the cap until a bid says
    // it falls behind, then on the upload that bid measured
    // (`Membership::learn_capacity`). Planned at 150 % and never corrected,
    // seeds 1 to 3 gave continuity 0.873, 0.896 and 0.907; learning, 0.99719,
    // 0.99857 and 0.99829 (every viewer stating it: 1.0).
    unstated_runs(false, 0.995);
}

#[test]
fn viewers_that_state_no_upload_are_planned_on_their_upload_probe() {
    // As above, but every viewer runs the upload probe before it joins
    // (`clubcast_protocol::probe`: up to 500 ms of its upload), each reading
    // off by up to ±20 %. Seeds 1 to 3: continuity 1.0, 1.0 and 1.0, against
    // 0.99719, 0.99857 and 0.99829 on the bids alone (the test above).
    unstated_runs(true, 0.999);
}

#[test]
fn a_last_hop_source_too_busy_for_its_share_is_replaced() {
    // Seed 5 is the draw where one relay (3 Mbit/s, 98 % of it used) was the
    // last-hop source of many peers and left their share to the origin, which
    // refused most gap fills: continuity 0.99344 with 4 KiB blocks. Its
    // subscribers now ask for another source (`PeerEvent::SlowSource`): 0.99999.
    // Since the cap on planned upload and replacing only after 5 reports about
    // one source: 0.9994 (0.968 never replacing). Since a report replaces only
    // a source whose bids say it stays behind (`OVERLOAD_LATE`): 0.9996.
    // Since in-club parents keep racing unless one lags by 150 ms
    // (`PRUNE_LAG_MS`), the relay's in-club pushes cost it more: 0.9995.
    // Since a relay running late yields races it loses (`YIELD_LATE_MS`):
    // 0.9996.
    let r = run(&Config {
        peers: 200,
        seconds: 60,
        seed: 5,
        ..Config::default()
    });
    let m = &r.report;
    eprintln!("{m:?}");
    assert!(m.continuity >= 0.999, "continuity {}", m.continuity);
}

#[test]
fn every_block_reaches_every_viewer() {
    // Seeds 1 to 8 all passed after the membership fixes of 2026-12-02; the
    // test was ignored before them ("now and then one viewer never gets one
    // block").
    for seed in [7, 1, 2] {
        let r = run(&Config {
            seed,
            ..provisioned(Mode::Clubs)
        });
        let missing = missing_blocks(&r);
        assert!(
            missing.is_empty(),
            "seed {seed}: viewers missed blocks: {missing:?}"
        );
    }
}
