//! The text a joining daemon presents beside its request: the join token (from a file or
//! a command line), and the token id, identity, address names and CA fingerprint that
//! travel with it. Every parser returns a value or an error, never a panic, and what
//! parses prints back to the text it came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pool_trust::token::{JoinToken, TokenId};
use pool_trust::{AltName, Fingerprint, Identity, PoolId};

const POOL: &str = "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(token) = JoinToken::parse(text) {
        assert_eq!(token.reveal(), text.trim());
        assert_eq!(
            JoinToken::parse(&token.reveal()).expect("round trip"),
            token
        );
    }
    if let Ok(id) = TokenId::parse(text) {
        assert_eq!(id.to_string(), text);
    }
    if let Ok(identity) = Identity::parse_path(text) {
        identity.validate().expect("a parsed identity is valid");
        assert_eq!(identity.path(), text);
    }
    let pool = PoolId::parse(POOL).expect("pool id");
    if let Ok(identity) = Identity::parse_uri(text, &pool) {
        assert_eq!(identity.uri(&pool), text);
    }
    if let Ok(id) = PoolId::parse(text) {
        assert_eq!(id.as_str(), text);
    }
    if let Ok(AltName::Dns(name)) = AltName::parse(text) {
        assert!(matches!(AltName::parse(&name), Ok(AltName::Dns(again)) if again == name));
    }
    if let Ok(fp) = text.parse::<Fingerprint>() {
        assert_eq!(
            fp.to_string().parse::<Fingerprint>().expect("round trip"),
            fp
        );
    }
});
