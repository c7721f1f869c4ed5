//! On-demand assets through the whole router: an upload as curl or a script
//! makes it (with and without the token, over the size limit, onto an existing
//! name), the reads a player makes (list, summary, manifest, init, runs of
//! blocks, which verify under the manifest's key), the refusals, and delete.

mod common;

use std::path::PathBuf;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use bytes::Bytes;
use clubcast_protocol::block::{Block, BlockFlags, BlockVerifier as _};
use clubcast_protocol::vod::{SignedManifest, MAX_RUN_BLOCKS};
use clubcast_server::app::AppState;
use clubcast_server::config::Config;
use clubcast_server::demo::CLIP;
use tower::ServiceExt;

const TOKEN: &str = "vod-test-token";

/// A server with its data dir in a fresh temp dir named after `tag`.
fn server(tag: &str, cfg: Config) -> (Router, AppState, PathBuf) {
    let dir = std::env::temp_dir().join(format!("clubcast-vod-http-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (app, state) = server_at(&dir, cfg);
    (app, state, dir)
}

/// A server on the data dir `dir`.
fn server_at(dir: &std::path::Path, cfg: Config) -> (Router, AppState) {
    let cfg = Config {
        data_dir: dir.to_path_buf(),
        publish_token: Some(TOKEN.into()),
        ..cfg
    };
    common::router(cfg)
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Resp {
    fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    fn code(&self) -> String {
        self.json()["code"].as_str().unwrap_or("").to_owned()
    }

    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    }
}

async fn call(app: &Router, method: &str, uri: &str, headers: &[(&str, &str)], body: Body) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = app
        .clone()
        .oneshot(req.body(body).expect("request"))
        .await
        .expect("infallible");
    let status = r.status();
    let headers = r.headers().clone();
    let body = axum::body::to_bytes(r.into_body(), 64 << 20)
        .await
        .expect("body");
    Resp {
        status,
        headers,
        body,
    }
}

async fn get(app: &Router, uri: &str) -> Resp {
    call(app, "GET", uri, &[], Body::empty()).await
}

/// `file` as a streamed (chunked, no length) request body.
fn streamed(file: &'static [u8]) -> Body {
    let chunks = file
        .chunks(32 * 1024)
        .map(|c| Ok::<_, std::io::Error>(Bytes::from_static(c)));
    Body::from_stream(futures_util::stream::iter(chunks))
}

const AUTH: (&str, &str) = ("authorization", "Bearer vod-test-token");

async fn upload(app: &Router, uri: &str, file: &'static [u8]) -> Resp {
    call(app, "PUT", uri, &[AUTH], streamed(file)).await
}

#[tokio::test]
async fn an_uploaded_file_plays_back_block_by_verified_block() {
    let (app, state, dir) = server("play", Config::default());
    let r = upload(&app, "/vod/talk", CLIP).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let summary = r.json();
    assert_eq!(summary["name"], "talk");
    let blocks = summary["blocks"].as_u64().expect("blocks");
    assert!(blocks > MAX_RUN_BLOCKS, "more than one run: {blocks}");
    assert!(summary["duration_s"].as_f64().expect("duration") > 10.0);
    assert_eq!(state.metrics.vod_uploads("created"), 1);

    // The list and the summary say the same.
    let list = get(&app, "/vod").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.json(), serde_json::json!([summary.clone()]));
    assert_eq!(get(&app, "/vod/talk").await.json(), summary);

    // The manifest verifies, names the listed key, and vouches for the init.
    let m = get(&app, "/vod/talk/manifest").await;
    assert_eq!(m.status, StatusCode::OK);
    assert_eq!(m.header("content-type"), "application/json");
    let signed = SignedManifest::from_json(std::str::from_utf8(&m.body).expect("utf-8"))
        .expect("a signed manifest");
    let manifest = signed.manifest();
    assert_eq!(manifest.key.to_id(), summary["key"].as_str().expect("key"));
    assert_eq!(manifest.blocks, blocks);
    let init = get(&app, "/vod/talk/init").await;
    assert_eq!(init.status, StatusCode::OK);
    assert_eq!(init.header("content-type"), "video/mp4");
    signed
        .verify_init(&init.body)
        .expect("the init segment matches");

    // Every block, run by run, verifies under the manifest's key, in order.
    let mut from = 0;
    let mut served = 0u64;
    while from < blocks {
        let r = get(
            &app,
            &format!("/vod/talk/blocks?from={from}&count={MAX_RUN_BLOCKS}"),
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header("content-type"), "application/octet-stream");
        let n: u64 = r.header("x-clubcast-blocks").parse().expect("count");
        assert_eq!(n, MAX_RUN_BLOCKS.min(blocks - from));
        served += r.body.len() as u64;
        for (i, b) in Block::decode_run(r.body, n as usize)
            .expect("decodes")
            .into_iter()
            .enumerate()
        {
            let b = manifest.key.verify(b).expect("signed by the asset key");
            assert_eq!(b.seq(), from + i as u64);
            let start = manifest.fragments.iter().any(|f| f.seq == b.seq());
            assert_eq!(b.header().flags.contains(BlockFlags::FRAGMENT_START), start);
        }
        from += n;
    }
    assert_eq!(served, manifest.bytes);
    assert_eq!(state.metrics.vod_bytes_total(), manifest.bytes);
    let metrics = get(&app, "/metrics").await;
    let text = std::str::from_utf8(&metrics.body).expect("utf-8");
    assert!(text.contains("clubcast_vod_assets 1\n"), "{text}");
    assert!(text.contains(&format!("clubcast_vod_bytes_total {}\n", manifest.bytes)));
    assert!(text.contains("clubcast_vod_uploads_total{result=\"created\"} 1\n"));
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn uploads_need_the_publish_token() {
    let (app, state, dir) = server("token", Config::default());
    let none = call(&app, "PUT", "/vod/talk", &[], streamed(CLIP)).await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED);
    assert_eq!(none.code(), "unauthorized");
    let wrong = [("authorization", "Bearer nope")];
    let r = call(&app, "PUT", "/vod/talk", &wrong, streamed(CLIP)).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&app, "/vod/talk").await.status, StatusCode::NOT_FOUND);
    assert_eq!(state.metrics.vod_uploads("unauthorized"), 2);
    // The token in the URL, for a client that cannot set a header.
    let r = call(
        &app,
        "PUT",
        "/vod/talk?token=vod-test-token",
        &[],
        streamed(CLIP),
    )
    .await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    // Deletes need it too.
    let r = call(&app, "DELETE", "/vod/talk", &[], Body::empty()).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(get(&app, "/vod/talk").await.status, StatusCode::OK);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn an_existing_name_takes_replace_true_and_runs_of_the_old_upload_are_refused() {
    let (app, state, dir) = server("replace", Config::default());
    let first = upload(&app, "/vod/talk", CLIP).await.json();
    let r = upload(&app, "/vod/talk", CLIP).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "asset_exists");
    assert_eq!(get(&app, "/vod/talk").await.json(), first, "untouched");

    // A failed replace leaves the old asset.
    let r = upload(&app, "/vod/talk?replace=true", &CLIP[..CLIP.len() - 7]).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "truncated");
    assert_eq!(get(&app, "/vod/talk").await.json(), first, "untouched");

    let r = upload(&app, "/vod/talk?replace=true", CLIP).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let second = r.json();
    assert_ne!(second["key"], first["key"], "a fresh asset key");
    assert_eq!(get(&app, "/vod/talk").await.json(), second);
    let m = get(&app, "/vod/talk/manifest").await;
    let signed =
        SignedManifest::from_json(std::str::from_utf8(&m.body).expect("utf-8")).expect("verifies");
    assert_eq!(
        Some(signed.manifest().key.to_id().as_str()),
        second["key"].as_str()
    );
    assert_eq!(state.metrics.vod_uploads("replaced"), 1);
    // A player that names the upload it verified learns of the replace.
    let (old_key, new_key) = (first["key"].as_str(), second["key"].as_str());
    let (old_key, new_key) = (old_key.expect("a key"), new_key.expect("a key"));
    let r = get(
        &app,
        &format!("/vod/talk/blocks?from=0&count=2&key={old_key}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert_eq!(r.code(), "asset_replaced");
    let r = get(
        &app,
        &format!("/vod/talk/blocks?from=0&count=2&key={new_key}"),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    let r = upload(&app, "/vod/talk?replace=maybe", CLIP).await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(r.code(), "bad_query");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn uploads_over_the_size_limit_get_413_and_leave_nothing() {
    let cfg = Config {
        vod_max_bytes: (CLIP.len() / 2) as u64,
        ..Config::default()
    };
    let (app, state, dir) = server("large", cfg);
    // Streamed: refused when the count passes the limit.
    let r = upload(&app, "/vod/big", CLIP).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(r.code(), "too_large");
    // With a Content-Length: refused before the body is read.
    let r = call(
        &app,
        "PUT",
        "/vod/big",
        &[AUTH, ("content-length", &CLIP.len().to_string())],
        Body::from(CLIP),
    )
    .await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(get(&app, "/vod/big").await.status, StatusCode::NOT_FOUND);
    assert_eq!(state.metrics.vod_uploads("too_large"), 2);
    let left: Vec<_> = std::fs::read_dir(dir.join("vod"))
        .map(|e| e.filter_map(Result::ok).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "left behind: {left:?}");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn bad_files_get_clear_errors_and_the_server_goes_on() {
    let (app, _state, dir) = server("bad", Config::default());
    let twice: &'static [u8] = [CLIP, CLIP].concat().leak();
    for (file, status, code) in [
        (twice, StatusCode::BAD_REQUEST, "bad_media"),
        (
            &b"not a video"[..],
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "not_mp4",
        ),
        (
            &CLIP[..CLIP.len() / 3],
            StatusCode::BAD_REQUEST,
            "truncated",
        ),
        (&b""[..], StatusCode::BAD_REQUEST, "no_init"),
    ] {
        let r = upload(&app, "/vod/talk", file).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{:?}",
            r.json()
        );
        assert!(r.json()["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let r = upload(&app, "/vod/talk", twice).await;
    assert_eq!(
        r.json()["message"],
        "an on-demand asset has one init segment"
    );
    // A plain MP4's shape (media data with no fragment header): the answer
    // says how to make a file the server takes.
    let box_len = |at: usize| u32::from_be_bytes(CLIP[at..at + 4].try_into().unwrap()) as usize;
    let init_len = box_len(0) + box_len(box_len(0));
    let mut plain = CLIP[..init_len].to_vec();
    plain.extend_from_slice(&[0, 0, 0, 16, b'm', b'd', b'a', b't', 0, 0, 0, 0, 0, 0, 0, 0]);
    let r = upload(&app, "/vod/talk", plain.leak()).await;
    assert_eq!(r.code(), "malformed_mp4", "{:?}", r.json());
    let message = r.json()["message"].as_str().unwrap_or_default().to_owned();
    assert!(
        message.contains("-movflags frag_keyframe+empty_moov"),
        "{message}"
    );
    let r = upload(&app, "/vod/Not%20Valid", CLIP).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::BAD_REQUEST, "bad_name")
    );
    assert_eq!(get(&app, "/vod").await.json(), serde_json::json!([]));
    let r = upload(&app, "/vod/talk", CLIP).await;
    assert_eq!(r.status, StatusCode::CREATED, "still serving");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn reads_of_unknown_assets_and_ranges_are_refused() {
    let (app, _state, dir) = server("reads", Config::default());
    for uri in [
        "/vod/nope",
        "/vod/nope/manifest",
        "/vod/nope/init",
        "/vod/nope/blocks?from=0",
    ] {
        let r = get(&app, uri).await;
        assert_eq!(r.status, StatusCode::NOT_FOUND, "{uri}");
        assert_eq!(r.code(), "unknown_asset", "{uri}");
    }
    let blocks = upload(&app, "/vod/talk", CLIP).await.json()["blocks"]
        .as_u64()
        .expect("blocks");
    let r = get(&app, &format!("/vod/talk/blocks?from={blocks}&count=1")).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.code(), "out_of_range");
    // A run past the end is cut short at it; one over the cap, at the cap.
    let r = get(
        &app,
        &format!("/vod/talk/blocks?from={}&count=10", blocks - 2),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header("x-clubcast-blocks"), "2");
    assert_eq!(Block::decode_run(r.body, 2).expect("two").len(), 2);
    let r = get(&app, "/vod/talk/blocks?from=0&count=100000").await;
    assert_eq!(r.header("x-clubcast-blocks"), MAX_RUN_BLOCKS.to_string());
    for q in ["", "?count=3", "?from=x", "?from=0&count=0", "?from=-1"] {
        let r = get(&app, &format!("/vod/talk/blocks{q}")).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_REQUEST, "bad_run"),
            "{q}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn answers_revalidate_and_other_sites_may_read() {
    let (app, state, dir) = server("cache", Config::default());
    upload(&app, "/vod/talk", CLIP).await;
    let origin = ("origin", "https://elsewhere.example");
    for uri in [
        "/vod/talk/manifest",
        "/vod/talk/init",
        "/vod/talk/blocks?from=0&count=4",
    ] {
        let r = call(&app, "GET", uri, &[origin], Body::empty()).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}");
        assert_eq!(r.header("access-control-allow-origin"), "*", "{uri}");
        assert_eq!(r.header("cache-control"), "no-cache", "{uri}");
        let etag = r.header("etag").to_owned();
        assert!(!etag.is_empty(), "{uri}");
        let again = call(&app, "GET", uri, &[("if-none-match", &etag)], Body::empty()).await;
        assert_eq!(again.status, StatusCode::NOT_MODIFIED, "{uri}");
        assert!(again.body.is_empty());
    }
    let r = call(&app, "GET", "/vod", &[origin], Body::empty()).await;
    assert_eq!(r.header("access-control-allow-origin"), "*");
    // HEAD says how long a run is without sending (or counting) it.
    let uri = "/vod/talk/blocks?from=0&count=4";
    let full = get(&app, uri).await;
    let served = state.metrics.vod_bytes_total();
    let head = call(&app, "HEAD", uri, &[], Body::empty()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-length"), full.body.len().to_string());
    assert_eq!(head.header("x-clubcast-blocks"), "4");
    assert_eq!(state.metrics.vod_bytes_total(), served);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_deleted_asset_is_gone_from_the_list_and_the_disk() {
    let (app, _state, dir) = server("delete", Config::default());
    upload(&app, "/vod/talk", CLIP).await;
    assert!(dir.join("vod/talk/blocks.bin").exists());
    let r = call(&app, "DELETE", "/vod/talk", &[AUTH], Body::empty()).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(get(&app, "/vod/talk").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(&app, "/vod").await.json(), serde_json::json!([]));
    assert!(!dir.join("vod/talk").exists());
    let r = call(&app, "DELETE", "/vod/talk", &[AUTH], Body::empty()).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::NOT_FOUND, "unknown_asset")
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_store_is_bounded_by_vod_max_assets() {
    let cfg = Config {
        vod_max_assets: 1,
        ..Config::default()
    };
    let (app, _state, dir) = server("full", cfg);
    assert_eq!(
        upload(&app, "/vod/one", CLIP).await.status,
        StatusCode::CREATED
    );
    let r = upload(&app, "/vod/two", CLIP).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, "vod_full")
    );
    let r = upload(&app, "/vod/one?replace=true", CLIP).await;
    assert_eq!(r.status, StatusCode::CREATED, "replacing goes on");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn the_demo_clip_is_the_builtin_asset_demo() {
    let (app, state, dir) = server("demo", Config::default());
    // As `main` opens the library at start.
    assert_eq!(state.open_vod(), clubcast_server::vod::Loaded::default());
    let r = get(&app, "/vod/demo").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.json()["duration_s"].as_f64().expect("duration") > 10.0);
    let r = get(&app, "/vod/demo/blocks?from=0&count=1").await;
    assert_eq!(r.header("x-clubcast-blocks"), "1");
    let r = upload(&app, "/vod/demo?replace=true", CLIP).await;
    assert_eq!(
        (r.status, r.code().as_str()),
        (StatusCode::CONFLICT, "builtin_asset")
    );
    let r = call(&app, "DELETE", "/vod/demo", &[AUTH], Body::empty()).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    // Without the demo source, no demo asset.
    let (app, state, dir2) = server(
        "nodemo",
        Config {
            no_demo: true,
            ..Config::default()
        },
    );
    state.open_vod();
    assert_eq!(get(&app, "/vod/demo").await.status, StatusCode::NOT_FOUND);
    let _ = std::fs::remove_dir_all(dir);
    let _ = std::fs::remove_dir_all(dir2);
}

#[tokio::test]
async fn stored_assets_are_served_again_after_a_restart() {
    let (app, _state, dir) = server("restart", Config::default());
    let first = upload(&app, "/vod/talk", CLIP).await.json();
    let run = get(&app, "/vod/talk/blocks?from=3&count=5").await.body;
    // A new server on the same data dir.
    let cfg = Config {
        no_demo: true,
        ..Config::default()
    };
    let (app, state) = server_at(&dir, cfg);
    assert_eq!(state.open_vod().assets, 1);
    assert_eq!(get(&app, "/vod/talk").await.json(), first);
    assert_eq!(get(&app, "/vod/talk/blocks?from=3&count=5").await.body, run);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn a_long_file_streams_in_past_any_body_buffer() {
    // Three laps of the demo clip, times running on: about 4.7 MB, over
    // axum's 2-MB default body limit and several of the upload's batches.
    let clip = clubcast_server::demo::Clip::parse(CLIP).expect("parses");
    let mut file = clip.init.to_vec();
    for lap in 0..3 {
        for i in 0..clip.fragments.len() {
            file.extend_from_slice(&clip.fragment(lap, i).expect("a fragment").bytes);
        }
    }
    let file: &'static [u8] = file.leak();
    let (app, _state, dir) = server("long", Config::default());
    let r = upload(&app, "/vod/long", file).await;
    assert_eq!(r.status, StatusCode::CREATED, "{:?}", r.json());
    let s = r.json();
    assert_eq!(
        s["fragments"].as_u64(),
        Some(3 * clip.fragments.len() as u64)
    );
    let lap = clip.duration().as_secs_f64();
    let duration = s["duration_s"].as_f64().expect("duration");
    assert!((duration - 3.0 * lap).abs() < 0.1, "{duration} s");
    let _ = std::fs::remove_dir_all(dir);
}

/// The encoded length of blocks `0..n` of `name`, each from a `HEAD` of its
/// one-block run (not metered).
async fn block_lens(app: &Router, name: &str, n: u64) -> Vec<u64> {
    let mut lens = Vec::new();
    for seq in 0..n {
        let uri = format!("/vod/{name}/blocks?from={seq}&count=1");
        let r = call(app, "HEAD", &uri, &[], Body::empty()).await;
        assert_eq!(r.status, StatusCode::OK);
        lens.push(r.header("content-length").parse().expect("a length"));
    }
    lens
}

#[tokio::test]
async fn without_metering_runs_are_served_whole_whatever_the_authorization() {
    let cfg = Config {
        vod_budget_kbps: 0,
        ..common::metered(2)
    };
    let (app, state, dir) = server("unmetered", cfg);
    assert!(state.vod_grants.is_none());
    upload(&app, "/vod/talk", CLIP).await;
    let uri = format!("/vod/talk/blocks?from=0&count={MAX_RUN_BLOCKS}");
    // Far over the budget a metered server would have, and over again.
    for auth in [None, Some("Bearer nope"), Some("Basic abc"), None] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("authorization", a)).into_iter().collect();
        let r = call(&app, "GET", &uri, &headers, Body::empty()).await;
        assert_eq!(r.status, StatusCode::OK, "{auth:?}: {:?}", r.json());
        assert_eq!(r.header("x-clubcast-blocks"), MAX_RUN_BLOCKS.to_string());
        assert_eq!(r.header("cache-control"), "no-cache");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn anonymous_runs_share_the_anonymous_budget_cut_then_refused_until_the_next_interval() {
    let (app, state, dir) = server("anonymous", common::metered(10));
    let ledger = state.vod_grants.clone().expect("metered");
    upload(&app, "/vod/talk", CLIP).await;
    let count = 16;
    let lens = block_lens(&app, "talk", count).await;
    // The leading blocks whose bits fit the anonymous share: about 2 blocks.
    let budget = ledger.anonymous_budget();
    let fits = lens
        .iter()
        .scan(0, |sum, len| {
            *sum += len * 8;
            Some(*sum)
        })
        .take_while(|&bits| bits <= budget)
        .count() as u64;
    assert!((1..count).contains(&fits), "{fits} of {lens:?}");
    let uri = format!("/vod/talk/blocks?from=0&count={count}");
    let full_tag = call(&app, "HEAD", &uri, &[], Body::empty()).await;
    let full_tag = full_tag.header("etag").to_owned();

    // The run is cut to what fits, and says so.
    let r = get(&app, &uri).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert_eq!(r.header("x-clubcast-blocks"), fits.to_string());
    assert_eq!(r.header("cache-control"), "no-store");
    let cut_uri = format!("/vod/talk/blocks?from=0&count={fits}");
    let cut_tag = call(&app, "HEAD", &cut_uri, &[], Body::empty()).await;
    assert_eq!(
        r.header("etag"),
        cut_tag.header("etag"),
        "the shorter run's"
    );
    assert_ne!(r.header("etag"), full_tag);
    let blocks = Block::decode_run(r.body.clone(), count as usize).expect("decodes");
    let seqs: Vec<u64> = blocks.iter().map(|b| b.header.seq).collect();
    assert_eq!(seqs, (0..fits).collect::<Vec<_>>());
    assert_eq!(
        r.body.len() as u64,
        lens[..fits as usize].iter().sum::<u64>()
    );

    // The next block did not fit, so the run that starts with it is refused.
    let next = format!("/vod/talk/blocks?from={fits}&count={count}");
    let r = get(&app, &next).await;
    assert_eq!(r.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(r.code(), "over_anonymous_budget");
    assert_eq!(r.header("retry-after"), "1");
    assert_eq!(r.header("cache-control"), "no-store");
    assert!(r.json()["message"].as_str().is_some_and(|m| !m.is_empty()));
    // HEAD and a 304 are not metered: they pass with the share spent.
    let head = call(&app, "HEAD", &uri, &[], Body::empty()).await;
    assert_eq!(head.status, StatusCode::OK);
    assert_eq!(head.header("x-clubcast-blocks"), count.to_string());
    let again = call(
        &app,
        "GET",
        &uri,
        &[("if-none-match", &full_tag)],
        Body::empty(),
    )
    .await;
    assert_eq!(again.status, StatusCode::NOT_MODIFIED);
    // Nor the manifest and the init segment.
    assert_eq!(get(&app, "/vod/talk/manifest").await.status, StatusCode::OK);
    assert_eq!(get(&app, "/vod/talk/init").await.status, StatusCode::OK);
    assert_eq!(get(&app, &next).await.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(state.metrics.vod_refused("over_anonymous_budget"), 2);
    let text = std::str::from_utf8(&get(&app, "/metrics").await.body)
        .expect("utf-8")
        .to_owned();
    assert!(
        text.contains("clubcast_vod_refused_total{code=\"over_anonymous_budget\"} 2\n"),
        "{text}"
    );

    // The live gap-fill budget is a ledger of its own, untouched by all this.
    let live = &state.grants;
    assert!(live
        .debit(None, live.anonymous_budget(), std::time::Instant::now())
        .is_ok());
    // A new interval refills the share.
    state.hub.run_bid_interval(std::time::Instant::now());
    let r = get(&app, &next).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.header("x-clubcast-blocks").parse::<u64>().expect("n") >= 1);
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test]
async fn unknown_tokens_get_401_and_malformed_authorization_400() {
    let (app, state, dir) = server("tokens", common::metered(10));
    upload(&app, "/vod/talk", CLIP).await;
    let uri = "/vod/talk/blocks?from=0&count=2";
    let r = call(
        &app,
        "GET",
        uri,
        &[("authorization", "Bearer nope")],
        Body::empty(),
    )
    .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.code(), "unknown_token");
    assert_eq!(r.header("retry-after"), "", "waiting does not help");
    for bad in ["Basic abc", "Bearer ", "Bearer", "nope"] {
        let r = call(&app, "GET", uri, &[("authorization", bad)], Body::empty()).await;
        assert_eq!(
            (r.status, r.code().as_str()),
            (StatusCode::BAD_REQUEST, "bad_authorization"),
            "{bad:?}"
        );
    }
    // A token the ledger knows draws on the spare bid budget before any grant.
    let ledger = state.vod_grants.clone().expect("metered");
    let token = ledger.register(7);
    let auth = format!("Bearer {token}");
    let r = call(&app, "GET", uri, &[("authorization", &auth)], Body::empty()).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.json());
    assert_eq!(r.header("x-clubcast-blocks"), "2");
    assert_eq!(r.header("cache-control"), "no-cache", "served whole");
    assert_eq!(state.metrics.vod_refused("unknown_token"), 1);
    assert_eq!(state.metrics.rejects("bad_authorization"), 4);
    // Players on other sites may send the token.
    let preflight = call(
        &app,
        "OPTIONS",
        uri,
        &[
            ("origin", "https://elsewhere.example"),
            ("access-control-request-method", "GET"),
            ("access-control-request-headers", "authorization"),
        ],
        Body::empty(),
    )
    .await;
    assert!(preflight.status.is_success(), "{}", preflight.status);
    assert!(preflight
        .header("access-control-allow-headers")
        .contains("authorization"));
    let r = call(
        &app,
        "GET",
        uri,
        &[("origin", "https://elsewhere.example")],
        Body::empty(),
    )
    .await;
    assert!(r
        .header("access-control-expose-headers")
        .contains("retry-after"));
    let _ = std::fs::remove_dir_all(dir);
}
