//! A certificate request as a joining or renewing daemon sends it, before anyone knows
//! who it is: the first byte picks PEM text as sent, or the rest as the DER inside a
//! `CERTIFICATE REQUEST` block (to reach the DER and signature parsers past the PEM
//! layer). Any input is a request or an error, never a panic; a request that parses
//! names a valid identity of the pool it was parsed for, no name under `pool.internal`,
//! and the CA signs it into a certificate that names the same identity.
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use pool_trust::{CertificateRequest, Identity, PoolCa, PoolId, Validity};

/// The pool the seeds' requests are for (`seeds/csr`).
const POOL: &str = "6f1c2d3e-4a5b-4c6d-8e7f-9a0b1c2d3e4f";
const NOW_MS: u64 = 1_800_000_000_000;
const DAY: Duration = Duration::from_secs(86_400);

fn ca() -> &'static PoolCa {
    static CA: OnceLock<PoolCa> = OnceLock::new();
    CA.get_or_init(|| {
        let pool = PoolId::parse(POOL).expect("pool id");
        PoolCa::create(pool, Validity::starting(NOW_MS, 3650 * DAY)).expect("CA")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = if mode & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        text.to_owned()
    } else {
        pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", rest.to_vec()))
    };
    let ca = ca();
    let pool = ca.pool_id();
    let Ok(request) = CertificateRequest::from_pem(&text, pool) else {
        return;
    };
    let identity = request.identity();
    identity.validate().expect("a parsed identity is valid");
    assert_eq!(
        Identity::parse_uri(&identity.uri(pool), pool).expect("its URI parses"),
        *identity
    );
    assert!(request.names().iter().all(|n| !n.is_pool_internal()));
    let cert = ca
        .sign(&request, request.names(), Validity::starting(NOW_MS, DAY))
        .expect("a parsed request signs");
    let der = pem::parse(&cert)
        .expect("the CA's PEM parses")
        .into_contents();
    assert_eq!(
        Identity::from_peer_cert(&der, pool).expect("the signed certificate names it"),
        *identity
    );
});
