//! A peer's certificate as the pool reads it: the identity a caller's certificate names
//! (`Identity::from_peer_cert`, the authorization input of every service), a CA
//! certificate offered for a bundle, PEM certificate text, and the renewal date. rustls
//! has verified a peer's chain before this runs, but the parser must not rely on it:
//! any bytes are a value or an error, never a panic, and an identity read is valid and
//! of the pool asked for.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pool_trust::cert::{self, CertInfo};
use pool_trust::{CaCert, Identity, PoolId, leaf};

/// The pool the seeds' certificates are for (`seeds/peer_cert`).
const POOL: &str = "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f";
const NOW_MS: u64 = 1_800_000_000_000;

fuzz_target!(|data: &[u8]| {
    let pool = PoolId::parse(POOL).expect("pool id");
    if let Ok(identity) = Identity::from_peer_cert(data, &pool) {
        identity.validate().expect("a parsed identity is valid");
        let info = CertInfo::parse(data).expect("parsed once, parses again");
        assert!(!info.is_ca);
        assert!(info.uris.contains(&identity.uri(&pool)));
    }
    if let Ok(ca) = CaCert::from_der(data.to_vec()) {
        assert!(ca.info().is_ca);
        assert_eq!(ca.der(), data);
    }
    let _ = leaf::should_renew(data, NOW_MS);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = cert::certs_from_pem(text);
    }
});
