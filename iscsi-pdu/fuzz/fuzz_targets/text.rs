//! Text parameters as an initiator or target may send them: parsing and every value
//! helper must return a value or an error, and parsed pairs must encode back unchanged.
#![no_main]

use iscsi_pdu::{chap, text};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(pairs) = text::parse(data) else {
        return;
    };
    assert_eq!(text::parse(&text::encode(&pairs)).expect("round trip"), pairs);
    for (k, v) in &pairs {
        let _ = text::parse_number(v);
        let _ = text::parse_bool(v);
        let _ = chap::decode_binary(v);
        let _ = text::negotiate_list(v, &["None", "CRC32C", "CHAP"]);
        if let Some(spec) = text::spec(k) {
            let _ = text::negotiate_number(spec, v, 262_144);
            let _ = text::negotiate_bool(spec, v, true);
        }
    }
});
