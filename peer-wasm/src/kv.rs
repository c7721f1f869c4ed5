//! Private slots of the public key-value store, for JavaScript
//! (`clubcast.kv` in `web/clubcast.js` wraps these with the HTTP calls).
//!
//! A [`KvSecret`] is one party's X25519 secret; with the other party's public
//! key it gives a [`KvShared`]: the slot both may write (an ed25519 key, the
//! `/kv/{key}` path) and a cipher only they can read. Sealing draws its nonce
//! from the browser's `crypto.getRandomValues`.

use clubcast_protocol::kv::{self, KvItem, KvItemJson};
use rand_core::{CryptoRng, RngCore};
use wasm_bindgen::prelude::*;

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_namespace = crypto, js_name = getRandomValues, catch)]
    fn get_random_values(buf: &mut [u8]) -> Result<JsValue, JsValue>;
}

/// `crypto.getRandomValues` as a `rand_core` RNG. Web Crypto refuses only
/// requests over 65,536 bytes (ours are 24 or 32), or is missing outside a
/// browser; either throws the JS error to the caller.
struct WebCrypto;

impl RngCore for WebCrypto {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        if let Err(e) = get_random_values(dest) {
            wasm_bindgen::throw_val(e);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl CryptoRng for WebCrypto {}

fn js_error(e: impl std::fmt::Display, code: &str) -> JsValue {
    let err = js_sys::Error::new(&format!("clubcast kv: {e}"));
    let _ = js_sys::Reflect::set(&err, &"code".into(), &code.into());
    err.into()
}

fn hex32(hex: &str, field: &'static str) -> Result<[u8; 32], JsValue> {
    kv::parse_hex32(field, hex).map_err(|e| js_error(e, "bad_key"))
}

/// One party's X25519 secret.
#[wasm_bindgen]
pub struct KvSecret(kv::KvSecret);

#[wasm_bindgen]
impl KvSecret {
    /// A fresh secret from `crypto.getRandomValues`.
    #[wasm_bindgen(constructor)]
    pub fn new() -> KvSecret {
        KvSecret(kv::KvSecret::random(&mut WebCrypto))
    }

    /// A secret kept earlier (from [`KvSecret::to_hex`]).
    #[wasm_bindgen(js_name = fromHex)]
    pub fn from_hex(hex: &str) -> Result<KvSecret, JsValue> {
        Ok(KvSecret(kv::KvSecret::from_bytes(hex32(hex, "secret")?)))
    }

    /// The secret as 64 hex digits, to keep (it is the party's identity: keep
    /// it as private as a password).
    #[wasm_bindgen(js_name = toHex)]
    pub fn to_hex(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0.to_bytes())
    }

    /// The public key to give the other party, 64 hex digits.
    #[wasm_bindgen(getter, js_name = publicKey)]
    pub fn public_key(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0.public())
    }

    /// The slot shared with the holder of `their_public` (64 hex digits).
    pub fn shared(&self, their_public: &str) -> Result<KvShared, JsValue> {
        let theirs = hex32(their_public, "their public key")?;
        self.0
            .shared(&theirs)
            .map(KvShared)
            .map_err(|e| js_error(e, "bad_key"))
    }
}

impl Default for KvSecret {
    fn default() -> Self {
        Self::new()
    }
}

/// The keys two parties share.
#[wasm_bindgen]
pub struct KvShared(kv::SharedKeys);

#[wasm_bindgen]
impl KvShared {
    /// The shared slot's ed25519 public key, 64 hex digits: `/kv/{key}`.
    #[wasm_bindgen(getter, js_name = publicKey)]
    pub fn public_key(&self) -> String {
        data_encoding::HEXLOWER.encode(&self.0.public_key())
    }

    /// Seals `plaintext` (at most 960 bytes) as the item of version `seq`
    /// under `salt` (a string, at most 64 bytes of UTF-8); the item's JSON,
    /// ready to `PUT`.
    pub fn seal(&self, salt: &str, seq: f64, plaintext: &[u8]) -> Result<String, JsValue> {
        if !(seq >= 0.0 && seq.fract() == 0.0 && seq <= kv::MAX_SEQ as f64) {
            return Err(js_error(
                format!("seq must be an integer from 0 to {}", kv::MAX_SEQ),
                "bad_item",
            ));
        }
        let item = self
            .0
            .seal(salt.as_bytes(), seq as u64, plaintext, &mut WebCrypto)
            .map_err(|e| js_error(e, "bad_item"))?;
        serde_json::to_string(&item.to_json()).map_err(|e| js_error(e, "bad_item"))
    }

    /// Checks an item's JSON (as `GET /kv/{key}` answers it) and opens it:
    /// the plaintext, or an error with code `bad_item` (malformed),
    /// `wrong_key` (another slot's), `bad_signature` or `not_sealed` (another
    /// key sealed it, or its bytes were altered).
    pub fn open(&self, item_json: &str) -> Result<Vec<u8>, JsValue> {
        let j: KvItemJson = serde_json::from_str(item_json).map_err(|e| js_error(e, "bad_item"))?;
        let item = KvItem::from_json(&j).map_err(|e| js_error(e, "bad_item"))?;
        self.0.open(&item).map_err(|e| {
            let code = match e {
                kv::KvError::WrongKey => "wrong_key",
                kv::KvError::Signature | kv::KvError::Key => "bad_signature",
                kv::KvError::Open => "not_sealed",
                _ => "bad_item",
            };
            js_error(e, code)
        })
    }
}
