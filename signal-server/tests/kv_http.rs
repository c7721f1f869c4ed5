//! The public key-value store through the whole router: puts and gets as a
//! browser makes them, the refusals (forged, stale, malformed, oversized), compare
//! and swap, a full store, a waiting get, and a private slot two parties share.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use axum::Router;
use clubcast_protocol::kv::{KvItem, KvItemJson, KvSecret};
use clubcast_server::app::AppState;
use clubcast_server::config::Config;
use data_encoding::HEXLOWER;
use ed25519_dalek::SigningKey;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use tower::ServiceExt;

fn server(cfg: Config) -> (Router, AppState) {
    common::router(cfg)
}

struct Resp {
    status: StatusCode,
    etag: Option<String>,
    json: serde_json::Value,
}

async fn call(
    app: &Router,
    method: &str,
    uri: &str,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = app
        .clone()
        .oneshot(req.body(Body::from(body)).expect("request"))
        .await
        .expect("infallible");
    let status = r.status();
    let etag = r
        .headers()
        .get("etag")
        .map(|v| v.to_str().expect("ascii").to_owned());
    let bytes = axum::body::to_bytes(r.into_body(), 1 << 20)
        .await
        .expect("body");
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Resp { status, etag, json }
}

async fn put(app: &Router, item: &KvItem, headers: &[(&str, &str)]) -> Resp {
    let body = serde_json::to_vec(&item.to_json()).expect("json");
    call(app, "PUT", &path(&item.key), headers, body).await
}

async fn get(app: &Router, key: &[u8; 32], query: &str) -> Resp {
    call(
        app,
        "GET",
        &format!("{}{query}", path(key)),
        &[],
        Vec::new(),
    )
    .await
}

fn path(key: &[u8; 32]) -> String {
    format!("/kv/{}", HEXLOWER.encode(key))
}

fn signer(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn item(n: u8, salt: &[u8], seq: u64, value: &[u8]) -> KvItem {
    KvItem::sign(&signer(n), salt, seq, value).expect("in bounds")
}

fn code(r: &Resp) -> &str {
    r.json["code"].as_str().unwrap_or("")
}

#[tokio::test]
async fn a_put_item_is_served_back_and_only_a_higher_seq_replaces_it() {
    let (app, state) = server(Config::default());
    let first = item(1, b"slot", 1, b"hello");
    let r = put(&app, &first, &[("content-type", "application/json")]).await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.json);
    assert_eq!(r.etag.as_deref(), Some("\"1\""));

    let r = get(&app, &first.key, "?salt=736c6f74").await;
    assert_eq!(r.status, StatusCode::OK);
    let back: KvItemJson = serde_json::from_value(r.json).expect("an item");
    assert_eq!(KvItem::from_json(&back).expect("valid"), first);
    // No salt is another slot.
    assert_eq!(
        get(&app, &first.key, "").await.status,
        StatusCode::NOT_FOUND
    );

    // The same item again refreshes it; an older or a same-seq other one is refused.
    assert_eq!(put(&app, &first, &[]).await.status, StatusCode::OK);
    let r = put(&app, &item(1, b"slot", 1, b"other"), &[]).await;
    assert_eq!((r.status, code(&r)), (StatusCode::CONFLICT, "seq_too_low"));
    let r = put(&app, &item(1, b"slot", 0, b"older"), &[]).await;
    assert_eq!((r.status, code(&r)), (StatusCode::CONFLICT, "seq_too_low"));
    let r = put(&app, &item(1, b"slot", 2, b"newer"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let r = get(&app, &first.key, "?salt=736c6f74").await;
    assert_eq!(r.json["seq"], 2);
    assert_eq!(r.json["value"], "bmV3ZXI=");

    assert_eq!(state.metrics.kv_puts("created"), 1);
    assert_eq!(state.metrics.kv_puts("refreshed"), 1);
    assert_eq!(state.metrics.kv_puts("replaced"), 1);
    assert_eq!(state.metrics.kv_puts("seq_too_low"), 2);
    // The gauge is read from the store at scrape time.
    let r = app
        .clone()
        .oneshot(
            Request::get("/metrics")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    let text = axum::body::to_bytes(r.into_body(), 1 << 20)
        .await
        .expect("body");
    let text = String::from_utf8_lossy(&text);
    assert!(text.contains("clubcast_kv_items 1\n"), "{text}");
}

#[tokio::test]
async fn forged_malformed_and_oversized_puts_are_refused_and_lose_nothing() {
    let (app, state) = server(Config::default());
    let good = item(1, b"", 5, b"kept");
    assert_eq!(put(&app, &good, &[]).await.status, StatusCode::CREATED);

    // Another key's signature over a higher seq: a forgery.
    let mut forged = item(2, b"", 6, b"forged");
    forged.key = good.key;
    let r = put(&app, &forged, &[]).await;
    assert_eq!(
        (r.status, code(&r)),
        (StatusCode::BAD_REQUEST, "bad_signature")
    );
    // A signed item put under another key's path.
    let other = item(3, b"", 1, b"x");
    let r = call(
        &app,
        "PUT",
        &path(&good.key),
        &[],
        serde_json::to_vec(&other.to_json()).expect("json"),
    )
    .await;
    assert_eq!(
        (r.status, code(&r)),
        (StatusCode::BAD_REQUEST, "key_mismatch")
    );

    let k = path(&good.key);
    for (what, body, want) in [
        ("not json", b"{".to_vec(), "bad_item"),
        ("an array", b"[1,2]".to_vec(), "bad_item"),
        (
            "an unknown field",
            serde_json::to_vec(&serde_json::json!({
                "key": HEXLOWER.encode(&good.key), "seq": 9, "value": "", "sig": "00", "x": 1
            }))
            .expect("json"),
            "bad_item",
        ),
        (
            "a short signature",
            serde_json::to_vec(&serde_json::json!({
                "key": HEXLOWER.encode(&good.key), "seq": 9, "value": "", "sig": "00"
            }))
            .expect("json"),
            "bad_item",
        ),
        (
            "a seq past 2^53",
            serde_json::to_vec(&serde_json::json!({
                "key": HEXLOWER.encode(&good.key), "seq": 1u64 << 60, "value": "",
                "sig": "00".repeat(64)
            }))
            .expect("json"),
            "bad_item",
        ),
    ] {
        let r = call(&app, "PUT", &k, &[], body).await;
        assert_eq!(
            (r.status, code(&r)),
            (StatusCode::BAD_REQUEST, want),
            "{what}: {}",
            r.json
        );
    }
    let r = call(&app, "PUT", &k, &[], vec![b' '; 64 << 10]).await;
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    for bad in [
        "/kv/zz",
        "/kv/00",
        &format!("{k}?salt=xyz"),
        &format!("{k}?salt={}", "00".repeat(65)),
        &format!("{k}?after=-1"),
        &format!("{k}?what=1"),
    ] {
        let r = call(&app, "GET", bad, &[], Vec::new()).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{bad}: {}", r.json);
        assert!(
            ["bad_item", "bad_query"].contains(&code(&r)),
            "{bad}: {}",
            r.json
        );
    }

    // The stored item is untouched and the server answers on.
    let r = get(&app, &good.key, "").await;
    assert_eq!(
        (r.status, r.json["value"].as_str()),
        (StatusCode::OK, Some("a2VwdA=="))
    );
    assert_eq!(state.kv.len(), 1);
    assert!(state.metrics.rejects("bad_signature") >= 1);
}

#[tokio::test]
async fn compare_and_swap_through_if_match_and_if_none_match() {
    let (app, _) = server(Config::default());
    let r = put(&app, &item(1, b"", 1, b"a"), &[("if-none-match", "*")]).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let r = put(&app, &item(1, b"", 2, b"b"), &[("if-none-match", "*")]).await;
    assert_eq!(
        (r.status, code(&r)),
        (StatusCode::PRECONDITION_FAILED, "cas_mismatch")
    );
    let r = put(&app, &item(1, b"", 2, b"b"), &[("if-match", "\"7\"")]).await;
    assert_eq!(
        (r.status, code(&r)),
        (StatusCode::PRECONDITION_FAILED, "cas_mismatch")
    );
    let r = put(&app, &item(1, b"", 2, b"b"), &[("if-match", "7")]).await;
    assert_eq!(
        (r.status, code(&r)),
        (StatusCode::BAD_REQUEST, "bad_precondition")
    );
    let r = put(&app, &item(1, b"", 2, b"b"), &[("if-match", "\"1\"")]).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn a_full_store_refuses_new_slots_but_takes_updates() {
    let (app, state) = server(Config {
        kv_max_items: 2,
        ..Config::default()
    });
    assert_eq!(
        put(&app, &item(1, b"", 1, b"a"), &[]).await.status,
        StatusCode::CREATED
    );
    assert_eq!(
        put(&app, &item(2, b"", 1, b"b"), &[]).await.status,
        StatusCode::CREATED
    );
    let r = put(&app, &item(3, b"", 1, b"c"), &[]).await;
    assert_eq!(
        (r.status, code(&r)),
        (StatusCode::INSUFFICIENT_STORAGE, "kv_full")
    );
    assert_eq!(
        put(&app, &item(2, b"", 2, b"b2"), &[]).await.status,
        StatusCode::OK
    );
    assert_eq!(state.metrics.kv_puts("kv_full"), 1);
}

#[tokio::test]
async fn a_waiting_get_answers_with_the_next_seq() {
    let (app, _) = server(Config::default());
    let first = item(1, b"", 1, b"a");
    put(&app, &first, &[]).await;
    let waiter = {
        let app = app.clone();
        let uri = format!("{}?after=1", path(&first.key));
        tokio::spawn(
            async move { call(&app, "GET", &uri, &[("prefer", "wait=20")], Vec::new()).await },
        )
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    put(&app, &item(1, b"", 2, b"b"), &[]).await;
    let r = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("answered at the put, not at the end of the wait")
        .expect("joined");
    assert_eq!(
        (r.status, r.json["seq"].as_u64()),
        (StatusCode::OK, Some(2))
    );
    // Without `Prefer: wait`, an `after` the item does not pass answers at once.
    let r = get(&app, &first.key, "?after=2").await;
    assert_eq!(
        (r.status, r.json["seq"].as_u64()),
        (StatusCode::OK, Some(2))
    );
}

#[tokio::test]
async fn two_parties_exchange_a_sealed_value_the_server_cannot_read() {
    let (app, state) = server(Config::default());
    let mut rng = ChaCha20Rng::seed_from_u64(7);
    let broadcaster = KvSecret::random(&mut rng);
    let viewer = KvSecret::random(&mut rng);
    let secret = b"private stream key: 0123456789abcdef";
    let sealed = broadcaster
        .shared(&viewer.public())
        .expect("shared")
        .seal(b"stream-key", 1, secret, &mut rng)
        .expect("sealed");
    assert_eq!(put(&app, &sealed, &[]).await.status, StatusCode::CREATED);

    // What the server holds carries no plaintext.
    let held = state
        .kv
        .get(&sealed.key, b"stream-key", std::time::Instant::now())
        .expect("stored");
    assert!(!held.value.windows(secret.len()).any(|w| w == secret));

    let keys = viewer.shared(&broadcaster.public()).expect("shared");
    let r = get(
        &app,
        &keys.public_key(),
        &format!("?salt={}", HEXLOWER.encode(b"stream-key")),
    )
    .await;
    let j: KvItemJson = serde_json::from_value(r.json).expect("an item");
    let opened = keys
        .open(&KvItem::from_json(&j).expect("valid"))
        .expect("opens");
    assert_eq!(opened, secret);
}

#[tokio::test]
async fn one_client_address_is_held_to_its_put_rate() {
    let (app, state) = server(Config {
        kv_put_rate: 2,
        ..Config::default()
    });
    let put_from = |client: &str, seq: u64| {
        let app = app.clone();
        let addr: std::net::SocketAddr = format!("{client}:5000").parse().expect("addr");
        let item = item(1, b"", seq, b"v");
        async move {
            let mut req = Request::builder()
                .method("PUT")
                .uri(path(&item.key))
                .body(Body::from(
                    serde_json::to_vec(&item.to_json()).expect("json"),
                ))
                .expect("request");
            // What `into_make_service_with_connect_info` adds in the server.
            req.extensions_mut()
                .insert(axum::extract::ConnectInfo(addr));
            app.oneshot(req).await.expect("infallible")
        }
    };
    // A burst of 5 s at 2/s, then 429 with a time to come back. (A slow
    // machine may earn a token back during the burst, so the refusal is
    // looked for, not expected at exactly the 11th put.)
    let mut accepted = 0;
    let refused = loop {
        let r = put_from("192.0.2.1", accepted + 1).await;
        if r.status() == StatusCode::TOO_MANY_REQUESTS {
            break r;
        }
        assert!(r.status().is_success(), "{}", r.status());
        accepted += 1;
        assert!(accepted < 200, "never refused");
    };
    assert!(accepted >= 10, "the burst is 10 puts: {accepted}");
    assert_eq!(refused.headers()["retry-after"], "1");
    // Another address is not held back by it.
    assert_eq!(
        put_from("192.0.2.2", accepted + 1).await.status(),
        StatusCode::OK
    );
    assert_eq!(state.metrics.kv_puts("rate_limited"), 1);
}
