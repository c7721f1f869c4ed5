//! The key-value store's private slots in the browser: secrets from Web
//! Crypto, a slot two parties share, and the errors JavaScript sees. Run in
//! headless Chromium by `cargo test -p clubcast-peer --target wasm32-unknown-unknown`.
#![cfg(target_arch = "wasm32")]

use clubcast_peer::kv::KvSecret;
use wasm_bindgen::prelude::*;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

fn code(e: JsValue) -> String {
    js_sys::Reflect::get(&e, &"code".into())
        .ok()
        .and_then(|c| c.as_string())
        .unwrap_or_default()
}

#[wasm_bindgen_test]
fn two_browser_secrets_share_a_slot_and_a_third_cannot_open_it() {
    let alice = KvSecret::new();
    let bob = KvSecret::new();
    // Web Crypto gave two different secrets.
    assert_ne!(alice.to_hex(), bob.to_hex());
    let ab = alice.shared(&bob.public_key()).expect("shared");
    let ba = bob.shared(&alice.public_key()).expect("shared");
    assert_eq!(ab.public_key(), ba.public_key());

    let json = ab.seal("offer", 3.0, b"hello bob").expect("sealed");
    let item: serde_json::Value = serde_json::from_str(&json).expect("item JSON");
    assert_eq!(item["key"], ab.public_key());
    assert_eq!(item["salt"], "6f66666572");
    assert_eq!(item["seq"], 3);
    assert_eq!(ba.open(&json).expect("opens"), b"hello bob");
    // Two seals of the same text differ: a fresh nonce each time.
    assert_ne!(ab.seal("offer", 3.0, b"hello bob").expect("sealed"), json);

    // A secret kept as hex comes back the same.
    let kept = KvSecret::from_hex(&alice.to_hex()).expect("hex");
    assert_eq!(kept.public_key(), alice.public_key());

    let eve = KvSecret::new();
    let ea = eve.shared(&alice.public_key()).expect("shared");
    assert_eq!(code(ea.open(&json).unwrap_err()), "wrong_key");
}

#[wasm_bindgen_test]
fn bad_input_gets_a_coded_error() {
    let a = KvSecret::new();
    let s = a.shared(&KvSecret::new().public_key()).expect("shared");
    assert_eq!(code(a.shared("zz").err().expect("not hex")), "bad_key");
    assert_eq!(
        code(a.shared(&"00".repeat(32)).err().expect("low order")),
        "bad_key"
    );
    assert_eq!(
        code(KvSecret::from_hex("00").err().expect("short")),
        "bad_key"
    );
    for seq in [-1.0, 0.5, f64::NAN, 2f64.powi(53)] {
        assert_eq!(
            code(s.seal("", seq, b"x").unwrap_err()),
            "bad_item",
            "{seq}"
        );
    }
    assert_eq!(code(s.seal("", 1.0, &[0; 961]).unwrap_err()), "bad_item");
    assert_eq!(
        code(s.seal(&"s".repeat(65), 1.0, b"x").unwrap_err()),
        "bad_item"
    );
    assert_eq!(code(s.open("{").unwrap_err()), "bad_item");
    let mut item: serde_json::Value =
        serde_json::from_str(&s.seal("", 1.0, b"x").expect("sealed")).expect("json");
    item["seq"] = 2.into();
    assert_eq!(
        code(s.open(&item.to_string()).unwrap_err()),
        "bad_signature"
    );
}
