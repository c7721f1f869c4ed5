//! `/kv` items: any JSON body parses to a typed error or to an item whose
//! JSON form reads back the same; checking and opening it never panic.
#![no_main]
use clubcast_protocol::kv::{KvItem, KvItemJson, KvSecret};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(json) = serde_json::from_slice::<KvItemJson>(data) else {
        return;
    };
    let Ok(item) = KvItem::from_json(&json) else {
        return;
    };
    assert_eq!(KvItem::from_json(&item.to_json()).as_ref(), Ok(&item));
    let _ = item.verify();
    let keys = KvSecret::from_bytes([1; 32])
        .shared(&KvSecret::from_bytes([2; 32]).public())
        .expect("two valid secrets share keys");
    let _ = keys.open(&item);
});
