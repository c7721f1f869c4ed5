//! Items of the public key-value store (`/kv`), and the keys two parties derive
//! to use it privately.
//!
//! The store works as BitTorrent's mutable items (BEP 44): anyone may put a
//! value under an ed25519 public key and a salt, but only with a signature by
//! that key, and only with a higher `seq` than the item stored. The server
//! checks the signature and the order; it cannot forge or roll back an item.
//!
//! The signature covers the same bytes as in BEP 44, with the value as a
//! bencoded byte string (the salt part is left out when the salt is empty):
//!
//! ```text
//! 4:salt<len>:<salt>3:seqi<seq>e1:v<len>:<value>
//! ```
//!
//! Two parties who know each other's X25519 public key share a private slot
//! ([`KvSecret::shared`]): HKDF-SHA256 over their Diffie-Hellman secret and both
//! public keys (in byte order, so both derive the same) gives an ed25519 key pair
//! and an XChaCha20-Poly1305 key. Either party can then [`SharedKeys::seal`] a
//! value under the shared public key and the other can [`SharedKeys::open`] it;
//! the server stores and relays what it can neither read nor alter.
//!
//! Like the rest of this crate, nothing here draws randomness of its own:
//! sealing takes the caller's cryptographic RNG for the nonce.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use data_encoding::{BASE64, HEXLOWER_PERMISSIVE};
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use hkdf::Hkdf;
use rand_core::{CryptoRng, RngCore};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// Longest salt, bytes (as BEP 44).
pub const MAX_SALT: usize = 64;
/// Longest value, bytes (as BEP 44).
pub const MAX_VALUE: usize = 1000;
/// Highest `seq`: 2^53 - 1, so that a JavaScript number holds every `seq` exactly.
pub const MAX_SEQ: u64 = (1 << 53) - 1;
/// Nonce bytes at the front of a sealed value.
pub const NONCE_LEN: usize = 24;
/// Authentication tag bytes at the end of a sealed value.
pub const TAG_LEN: usize = 16;
/// Longest plaintext a sealed value can carry.
pub const MAX_PLAINTEXT: usize = MAX_VALUE - NONCE_LEN - TAG_LEN;

/// HKDF salt, and the prefix of a sealed value's associated data: a new version
/// of the derivation gets a new label.
const LABEL: &[u8] = b"clubcast-kv-v1";

/// Errors of building, checking, sealing and opening items.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// The salt is longer than [`MAX_SALT`].
    #[error("salt of {0} bytes; at most {MAX_SALT}")]
    SaltTooLong(usize),
    /// The value is longer than [`MAX_VALUE`].
    #[error("value of {0} bytes; at most {MAX_VALUE}")]
    ValueTooLong(usize),
    /// `seq` is above [`MAX_SEQ`].
    #[error("seq {0} is above {MAX_SEQ}")]
    SeqTooHigh(u64),
    /// The key is not an ed25519 public key.
    #[error("not an ed25519 public key")]
    Key,
    /// The signature does not verify under the item's key.
    #[error("the signature does not verify under the item's key")]
    Signature,
    /// A field of the JSON form is not valid hex or base64, or has the wrong length.
    #[error("field {field}: {reason}")]
    Encoding {
        /// The JSON field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The plaintext is longer than [`MAX_PLAINTEXT`].
    #[error("plaintext of {0} bytes; at most {MAX_PLAINTEXT}")]
    PlaintextTooLong(usize),
    /// The item is stored under another key than the shared one.
    #[error("the item is not under the shared key")]
    WrongKey,
    /// The value does not open: another key sealed it, or its bytes were altered.
    #[error("the value does not open: sealed with another key, or altered")]
    Open,
    /// The other party's X25519 key gives no shared secret (a low-order point).
    #[error("the other party's X25519 key is of low order")]
    WeakKey,
}

/// A signed item: `value` under (`key`, `salt`) at version `seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvItem {
    /// The ed25519 public key the item is stored under.
    pub key: [u8; 32],
    /// Up to [`MAX_SALT`] bytes; one key has one item per salt.
    pub salt: Vec<u8>,
    /// Version: a put must carry a higher `seq` than the stored item.
    pub seq: u64,
    /// Up to [`MAX_VALUE`] opaque bytes.
    pub value: Vec<u8>,
    /// ed25519 signature by `key` over [`KvItem::signed_message`].
    pub signature: [u8; 64],
}

impl KvItem {
    /// Signs `value` under `signing`'s public key.
    pub fn sign(
        signing: &SigningKey,
        salt: &[u8],
        seq: u64,
        value: &[u8],
    ) -> Result<Self, KvError> {
        check_bounds(salt, seq, value)?;
        let signature = signing.sign(&Self::signed_message(salt, seq, value));
        Ok(KvItem {
            key: signing.verifying_key().to_bytes(),
            salt: salt.to_vec(),
            seq,
            value: value.to_vec(),
            signature: signature.to_bytes(),
        })
    }

    /// Checks the bounds and the signature (strict ed25519: no malleable or
    /// small-order forms).
    pub fn verify(&self) -> Result<(), KvError> {
        check_bounds(&self.salt, self.seq, &self.value)?;
        let key = VerifyingKey::from_bytes(&self.key).map_err(|_| KvError::Key)?;
        key.verify_strict(
            &Self::signed_message(&self.salt, self.seq, &self.value),
            &Signature::from_bytes(&self.signature),
        )
        .map_err(|_| KvError::Signature)
    }

    /// The bytes the signature covers (BEP 44's, with the value as a bencoded
    /// byte string).
    pub fn signed_message(salt: &[u8], seq: u64, value: &[u8]) -> Vec<u8> {
        let mut m = Vec::with_capacity(salt.len() + value.len() + 48);
        if !salt.is_empty() {
            m.extend_from_slice(format!("4:salt{}:", salt.len()).as_bytes());
            m.extend_from_slice(salt);
        }
        m.extend_from_slice(format!("3:seqi{seq}e1:v{}:", value.len()).as_bytes());
        m.extend_from_slice(value);
        m
    }

    /// The JSON form (hex key, salt and signature; base64 value).
    pub fn to_json(&self) -> KvItemJson {
        KvItemJson {
            key: HEXLOWER_PERMISSIVE.encode(&self.key),
            salt: HEXLOWER_PERMISSIVE.encode(&self.salt),
            seq: self.seq,
            value: BASE64.encode(&self.value),
            sig: HEXLOWER_PERMISSIVE.encode(&self.signature),
        }
    }

    /// Parses the JSON form; checks the encodings and the bounds, not the
    /// signature ([`KvItem::verify`]).
    pub fn from_json(j: &KvItemJson) -> Result<Self, KvError> {
        let salt = decode_hex("salt", &j.salt, MAX_SALT)?;
        let value = decode_base64("value", &j.value)?;
        let item = KvItem {
            key: decode_fixed("key", &j.key)?,
            salt,
            seq: j.seq,
            value,
            signature: decode_fixed("sig", &j.sig)?,
        };
        check_bounds(&item.salt, item.seq, &item.value)?;
        Ok(item)
    }
}

/// An item as JSON, as `/kv` takes and answers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvItemJson {
    /// The ed25519 public key, 64 hex digits.
    pub key: String,
    /// The salt, hex (empty for none).
    #[serde(default)]
    pub salt: String,
    /// The version.
    pub seq: u64,
    /// The value, standard base64 with padding.
    pub value: String,
    /// The signature, 128 hex digits.
    pub sig: String,
}

/// Parses a salt given as hex (as in `/kv/{key}?salt=`).
pub fn parse_salt(hex: &str) -> Result<Vec<u8>, KvError> {
    decode_hex("salt", hex, MAX_SALT)
}

/// Parses 32 bytes given as 64 hex digits (an X25519 key or secret);
/// errors name `field`.
pub fn parse_hex32(field: &'static str, hex: &str) -> Result<[u8; 32], KvError> {
    decode_fixed(field, hex)
}

/// Parses an ed25519 public key given as 64 hex digits (as in `/kv/{key}`).
pub fn parse_key(hex: &str) -> Result<[u8; 32], KvError> {
    let key: [u8; 32] = decode_fixed("key", hex)?;
    VerifyingKey::from_bytes(&key).map_err(|_| KvError::Key)?;
    Ok(key)
}

fn check_bounds(salt: &[u8], seq: u64, value: &[u8]) -> Result<(), KvError> {
    if salt.len() > MAX_SALT {
        return Err(KvError::SaltTooLong(salt.len()));
    }
    if value.len() > MAX_VALUE {
        return Err(KvError::ValueTooLong(value.len()));
    }
    if seq > MAX_SEQ {
        return Err(KvError::SeqTooHigh(seq));
    }
    Ok(())
}

fn decode_hex(field: &'static str, s: &str, max: usize) -> Result<Vec<u8>, KvError> {
    // Bound before decoding: a hostile field costs no more than a valid one.
    if s.len() > 2 * max {
        return Err(KvError::Encoding {
            field,
            reason: "too long",
        });
    }
    HEXLOWER_PERMISSIVE
        .decode(s.as_bytes())
        .map_err(|_| KvError::Encoding {
            field,
            reason: "not hex",
        })
}

fn decode_fixed<const N: usize>(field: &'static str, s: &str) -> Result<[u8; N], KvError> {
    decode_hex(field, s, N)?
        .try_into()
        .map_err(|_| KvError::Encoding {
            field,
            reason: "wrong length",
        })
}

fn decode_base64(field: &'static str, s: &str) -> Result<Vec<u8>, KvError> {
    if s.len() > MAX_VALUE.div_ceil(3) * 4 {
        return Err(KvError::ValueTooLong(s.len() / 4 * 3));
    }
    BASE64.decode(s.as_bytes()).map_err(|_| KvError::Encoding {
        field,
        reason: "not base64",
    })
}

/// One party's X25519 secret for shared slots.
pub struct KvSecret(x25519_dalek::StaticSecret);

impl std::fmt::Debug for KvSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("KvSecret").field(&"…").finish()
    }
}

impl KvSecret {
    /// The secret from 32 random bytes (the caller's RNG, or a stored secret).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        KvSecret(x25519_dalek::StaticSecret::from(bytes))
    }

    /// A fresh secret from the caller's cryptographic RNG.
    pub fn random(rng: &mut (impl RngCore + CryptoRng)) -> Self {
        let mut bytes = [0u8; 32];
        rng.fill_bytes(&mut bytes);
        Self::from_bytes(bytes)
    }

    /// The secret's bytes, to keep it.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    /// The public key to give the other party.
    pub fn public(&self) -> [u8; 32] {
        x25519_dalek::PublicKey::from(&self.0).to_bytes()
    }

    /// The keys this party shares with the holder of `their_public`; both sides
    /// derive the same.
    pub fn shared(&self, their_public: &[u8; 32]) -> Result<SharedKeys, KvError> {
        let dh = self
            .0
            .diffie_hellman(&x25519_dalek::PublicKey::from(*their_public));
        if !dh.was_contributory() {
            return Err(KvError::WeakKey);
        }
        let mine = self.public();
        let (lo, hi) = if mine <= *their_public {
            (mine, *their_public)
        } else {
            (*their_public, mine)
        };
        let mut ikm = [0u8; 96];
        ikm[..32].copy_from_slice(dh.as_bytes());
        ikm[32..64].copy_from_slice(&lo);
        ikm[64..].copy_from_slice(&hi);
        let hk = Hkdf::<Sha256>::new(Some(LABEL), &ikm);
        let mut seed = [0u8; 32];
        let mut cipher = [0u8; 32];
        // 32 bytes are far below HKDF-SHA256's 8,160-byte limit.
        hk.expand(b"ed25519 signing key", &mut seed)
            .and_then(|()| hk.expand(b"xchacha20poly1305 key", &mut cipher))
            .map_err(|_| KvError::WeakKey)?;
        Ok(SharedKeys {
            signing: SigningKey::from_bytes(&seed),
            cipher: XChaCha20Poly1305::new(&cipher.into()),
        })
    }
}

/// The keys two parties share: an ed25519 key pair (the slot both may write)
/// and an XChaCha20-Poly1305 key (what only they can read).
pub struct SharedKeys {
    signing: SigningKey,
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for SharedKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedKeys")
            .field(
                "public_key",
                &HEXLOWER_PERMISSIVE.encode(&self.public_key()),
            )
            .finish_non_exhaustive()
    }
}

impl SharedKeys {
    /// The shared ed25519 public key: where the shared items are stored.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// Encrypts `plaintext` (random nonce first, tag last; the salt and `seq`
    /// are authenticated with it) and signs the item under the shared key.
    pub fn seal(
        &self,
        salt: &[u8],
        seq: u64,
        plaintext: &[u8],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<KvItem, KvError> {
        if plaintext.len() > MAX_PLAINTEXT {
            return Err(KvError::PlaintextTooLong(plaintext.len()));
        }
        check_bounds(salt, seq, &[])?;
        let mut nonce = [0u8; NONCE_LEN];
        rng.fill_bytes(&mut nonce);
        let aad = associated_data(salt, seq);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| KvError::PlaintextTooLong(plaintext.len()))?;
        let mut value = Vec::with_capacity(NONCE_LEN + sealed.len());
        value.extend_from_slice(&nonce);
        value.extend_from_slice(&sealed);
        KvItem::sign(&self.signing, salt, seq, &value)
    }

    /// Checks that `item` is under the shared key and signed by it, and
    /// decrypts its value.
    pub fn open(&self, item: &KvItem) -> Result<Vec<u8>, KvError> {
        if item.key != self.public_key() {
            return Err(KvError::WrongKey);
        }
        item.verify()?;
        if item.value.len() < NONCE_LEN + TAG_LEN {
            return Err(KvError::Open);
        }
        let (nonce, sealed) = item.value.split_at(NONCE_LEN);
        let aad = associated_data(&item.salt, item.seq);
        self.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: &aad,
                },
            )
            .map_err(|_| KvError::Open)
    }
}

fn associated_data(salt: &[u8], seq: u64) -> Vec<u8> {
    let mut aad = Vec::with_capacity(LABEL.len() + 8 + salt.len());
    aad.extend_from_slice(LABEL);
    aad.extend_from_slice(&seq.to_be_bytes());
    aad.extend_from_slice(salt);
    aad
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand_chacha::rand_core::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    fn signing(n: u8) -> SigningKey {
        SigningKey::from_bytes(&[n; 32])
    }

    #[test]
    fn the_signed_message_is_bep44s() {
        // BEP 44's example, with its value "Hello World!" as a byte string.
        assert_eq!(
            KvItem::signed_message(b"foobar", 1, b"Hello World!"),
            b"4:salt6:foobar3:seqi1e1:v12:Hello World!".to_vec()
        );
        assert_eq!(
            KvItem::signed_message(b"", 1, b"Hello World!"),
            b"3:seqi1e1:v12:Hello World!".to_vec()
        );
    }

    #[test]
    fn a_signed_item_verifies_and_any_change_is_caught() {
        let item = KvItem::sign(&signing(1), b"slot", 7, b"value").unwrap();
        item.verify().unwrap();
        let mut other = item.clone();
        other.seq = 8;
        assert_eq!(other.verify(), Err(KvError::Signature));
        let mut other = item.clone();
        other.salt = b"slou".to_vec();
        assert_eq!(other.verify(), Err(KvError::Signature));
        let mut other = item.clone();
        other.value[0] ^= 1;
        assert_eq!(other.verify(), Err(KvError::Signature));
        let mut other = item.clone();
        other.key = signing(2).verifying_key().to_bytes();
        assert_eq!(other.verify(), Err(KvError::Signature));
    }

    #[test]
    fn bounds_are_checked_when_signing_and_parsing() {
        let k = signing(1);
        assert_eq!(
            KvItem::sign(&k, &[0; 65], 1, b"").unwrap_err(),
            KvError::SaltTooLong(65)
        );
        assert_eq!(
            KvItem::sign(&k, b"", 1, &[0; 1001]).unwrap_err(),
            KvError::ValueTooLong(1001)
        );
        assert_eq!(
            KvItem::sign(&k, b"", MAX_SEQ + 1, b"").unwrap_err(),
            KvError::SeqTooHigh(MAX_SEQ + 1)
        );
        KvItem::sign(&k, &[0; 64], MAX_SEQ, &[0; 1000])
            .unwrap()
            .verify()
            .unwrap();
        let mut j = KvItem::sign(&k, b"", 1, b"").unwrap().to_json();
        j.value = BASE64.encode(&[0; 1001]);
        assert_eq!(KvItem::from_json(&j), Err(KvError::ValueTooLong(1001)));
        j.value = "A".repeat(1 << 20);
        assert!(matches!(
            KvItem::from_json(&j),
            Err(KvError::ValueTooLong(_))
        ));
    }

    #[test]
    fn the_json_form_round_trips_and_bad_fields_are_named() {
        let item = KvItem::sign(&signing(3), b"\x00\xff", 42, b"\x01\x02\x03").unwrap();
        let j = item.to_json();
        assert_eq!(j.salt, "00ff");
        assert_eq!(j.value, "AQID");
        let text = serde_json::to_string(&j).unwrap();
        let back: KvItemJson = serde_json::from_str(&text).unwrap();
        assert_eq!(KvItem::from_json(&back).unwrap(), item);
        for (field, edit) in [
            (
                "key",
                (|j: &mut KvItemJson| j.key.push('0')) as fn(&mut KvItemJson),
            ),
            ("key", |j| j.key = "zz".repeat(32)),
            ("sig", |j| j.sig.truncate(126)),
            ("salt", |j| j.salt = "0".into()),
            ("value", |j| j.value = "***".into()),
        ] {
            let mut bad = j.clone();
            edit(&mut bad);
            match KvItem::from_json(&bad) {
                Err(KvError::Encoding { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(serde_json::from_str::<KvItemJson>(
            r#"{"key":"","seq":1,"value":"","sig":"","extra":1}"#
        )
        .is_err());
    }

    #[test]
    fn parse_key_refuses_what_is_not_a_key() {
        let k = signing(4).verifying_key().to_bytes();
        assert_eq!(parse_key(&HEXLOWER_PERMISSIVE.encode(&k)).unwrap(), k);
        assert!(matches!(parse_key("00"), Err(KvError::Encoding { .. })));
        // y = 2 is not on the curve: no point decompresses from it.
        let mut off = [0u8; 32];
        off[0] = 2;
        assert_eq!(
            parse_key(&HEXLOWER_PERMISSIVE.encode(&off)),
            Err(KvError::Key)
        );
    }

    #[test]
    fn two_parties_share_a_slot_that_a_third_cannot_read_or_write() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let alice = KvSecret::random(&mut rng);
        let bob = KvSecret::random(&mut rng);
        let eve = KvSecret::random(&mut rng);
        let ab = alice.shared(&bob.public()).unwrap();
        let ba = bob.shared(&alice.public()).unwrap();
        assert_eq!(ab.public_key(), ba.public_key());

        let item = ab.seal(b"offer", 1, b"v=0 sdp", &mut rng).unwrap();
        item.verify().unwrap();
        assert_eq!(item.key, ab.public_key());
        assert_eq!(ba.open(&item).unwrap(), b"v=0 sdp");
        assert!(!item.value.windows(7).any(|w| w == b"v=0 sdp"));

        // Eve shares another slot with each of them, and can open neither.
        let ea = eve.shared(&alice.public()).unwrap();
        assert_ne!(ea.public_key(), ab.public_key());
        assert_eq!(ea.open(&item), Err(KvError::WrongKey));
        let mut moved = item.clone();
        moved.key = ea.public_key();
        assert_eq!(ea.open(&moved), Err(KvError::Signature));

        // Altered bytes do not open, even when re-signed by the shared key.
        let mut v = item.value.clone();
        *v.last_mut().unwrap() ^= 1;
        let resigned = KvItem::sign(&ab.signing, &item.salt, item.seq, &v).unwrap();
        assert_eq!(ba.open(&resigned), Err(KvError::Open));
        // A sealed value moved to another salt or seq does not open either.
        let moved = KvItem::sign(&ab.signing, b"answer", item.seq, &item.value).unwrap();
        assert_eq!(ba.open(&moved), Err(KvError::Open));
        let replayed = KvItem::sign(&ab.signing, &item.salt, 2, &item.value).unwrap();
        assert_eq!(ba.open(&replayed), Err(KvError::Open));
    }

    #[test]
    fn sealing_bounds_the_plaintext_and_a_low_order_key_is_refused() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let a = KvSecret::random(&mut rng);
        let b = KvSecret::random(&mut rng);
        let s = a.shared(&b.public()).unwrap();
        let full = s.seal(b"", 1, &[7; MAX_PLAINTEXT], &mut rng).unwrap();
        assert_eq!(full.value.len(), MAX_VALUE);
        assert_eq!(
            s.seal(b"", 1, &[7; MAX_PLAINTEXT + 1], &mut rng),
            Err(KvError::PlaintextTooLong(MAX_PLAINTEXT + 1))
        );
        // The identity point: every secret gives the all-zero shared secret.
        assert_eq!(a.shared(&[0; 32]).unwrap_err(), KvError::WeakKey);
    }

    proptest! {
        #[test]
        fn from_json_never_panics(key in ".{0,70}", salt in ".{0,140}", seq: u64,
                                  value in ".{0,1400}", sig in ".{0,130}") {
            let j = KvItemJson { key, salt, seq, value, sig };
            if let Ok(item) = KvItem::from_json(&j) {
                let _ = item.verify();
            }
        }

        #[test]
        fn sign_json_verify_round_trips(n: u8, salt in proptest::collection::vec(any::<u8>(), 0..=64),
                                        seq in 0..=MAX_SEQ,
                                        value in proptest::collection::vec(any::<u8>(), 0..=1000)) {
            let item = KvItem::sign(&signing(n), &salt, seq, &value).unwrap();
            let back = KvItem::from_json(&item.to_json()).unwrap();
            prop_assert_eq!(&back, &item);
            prop_assert!(back.verify().is_ok());
        }
    }
}
