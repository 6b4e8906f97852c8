//! Trust inside a pool: the pool's certificate authority, the identities its certificates
//! name, one-time join tokens, key files at rest, and mutual TLS for the daemons' gRPC
//! links (tonic over rustls; certificates made with rcgen and read with x509-parser).
//!
//! The pool is founded with a CA ([`PoolCa`]). A daemon joins with a one-time token the
//! pool issued for its identity ([`token`]) and a certificate request made with its own
//! key ([`LeafKey::csr_pem`]); the pool checks the token, signs the request, and the daemon
//! keeps the result as its [`Credentials`], renewed past two thirds of their validity. Every
//! link is then mutual TLS against the pool's [`CaBundle`] (old and new CA during a roll),
//! and a service authorizes its caller by the [`Identity`] in the caller's certificate
//! ([`tls::require_role`]).
//!
//! # Layout
//! - `identity.rs`: [`PoolId`], [`Identity`] (`Member(n)`, `Host(id)`, `Storage(id)`,
//!   `Client(name)`, `Monitor(name)`) and its certificate forms: the URI `pool://<pool-id>/<role>/<id>` and a
//!   DNS name; reading it back from a peer's certificate.
//! - `ca.rs`: [`PoolCa`] (create, roll, save/load, sign a [`CertificateRequest`]),
//!   [`CaBundle`], [`Validity`], [`AltName`].
//! - `roll.rs`: the cross certificate of a CA roll ([`PoolCa::cross_sign`]): the new CA's
//!   name and key signed by the current one, sent after each new leaf.
//! - `leaf.rs`: a daemon's [`LeafKey`] and [`Credentials`] (its certificate and the
//!   intermediates after it), and renewal ([`leaf::renew_at_ms`]).
//! - `token.rs`: [`JoinToken`] and the [`TokenRecord`] the pool keeps (hash only; used-once
//!   is a flag the caller persists).
//! - `files.rs`: atomic 0600/0700 writes and refusing key files others can read.
//! - `local.rs`: [`LocalCa`], a CA kept on one machine issuing TLS directories (founding,
//!   the lab, tests).
//! - `tls.rs`: tonic `ServerTlsConfig` / `ClientTlsConfig`, and the caller's identity.
//! - `dir.rs`: a daemon's TLS directory ([`DaemonTls`]): bundle, certificate and key.
//! - `cert.rs`: reading a certificate ([`CertInfo`]) and its [`Fingerprint`].
//! - `serve.rs`: a daemon's TLS listener whose certificate and CA bundle can be reloaded
//!   while it serves ([`serve::ServerTls`]).
//! - `audit.rs`: the audit trail of a daemon's gRPC service (who, what, result).
//! - `scrape.rs`: `GET /metrics` beside a daemon's gRPC services, for members and
//!   monitors ([`scrape::ScrapeLayer`]).
//!
//! ```
//! use std::time::Duration;
//! use pool_trust::{CertificateRequest, Identity, LeafKey, PoolCa, PoolId, Validity, token};
//!
//! let now_ms = 1_800_000_000_000;
//! let day = Duration::from_secs(86_400);
//! // Founding: the pool's CA.
//! let ca = PoolCa::create(PoolId::generate(), Validity::starting(now_ms, 3650 * day))?;
//! let pool = ca.pool_id().clone();
//!
//! // `poolctl host-join`: a token for the host id the pool chose.
//! let host = Identity::Host("7c0e4f7a-8d1b-4c3e-9f2a-1b2c3d4e5f60".into());
//! let (token, mut record) = token::issue(host.clone(), now_ms, token::DEFAULT_TOKEN_TTL)?;
//! let printed = token.reveal();
//!
//! // The new host: its own key and a request for that identity.
//! let key = LeafKey::generate()?;
//! let csr = key.csr_pem(&pool, &host, &[])?;
//!
//! // The pool: parse the request, spend the token for the identity asked, sign.
//! let request = CertificateRequest::from_pem(&csr, &pool)?;
//! record.redeem(&token::JoinToken::parse(&printed)?, request.identity(), now_ms)?;
//! let cert_pem = ca.sign(&request, request.names(), Validity::starting(now_ms, 90 * day))?;
//!
//! // The host keeps its credentials; peers read its identity from the certificate.
//! let creds = pool_trust::Credentials::new(&cert_pem, &key, &pool)?;
//! assert_eq!(Identity::from_peer_cert(creds.cert_der(), &pool)?, host);
//! // A second use of the token is refused.
//! assert!(record.redeem(&token, &host, now_ms).is_err());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod audit;
pub mod ca;
pub mod cert;
pub mod dir;
pub mod files;
pub mod identity;
pub mod leaf;
pub mod local;
pub mod roll;
pub mod scrape;
pub mod serve;
pub mod tls;
pub mod token;

pub use ca::{AltName, CaBundle, CaCert, CaError, CertificateRequest, PoolCa, Validity};
pub use cert::{CertError, CertInfo, Fingerprint};
pub use dir::{BUNDLE_FILE, DaemonTls, TlsDirError};
pub use files::FileError;
pub use identity::{Identity, IdentityError, PoolId, Role, coordinators_name};
pub use leaf::{Credentials, LeafError, LeafKey};
pub use local::LocalCa;
pub use tls::{ClientAuth, PeerError, TlsError};
pub use token::{JoinToken, TokenError, TokenId, TokenRecord};

/// Lowercase hex, for token ids and secrets, fingerprints and file names.
mod hex {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";

    pub(crate) fn encode(bytes: &[u8]) -> String {
        let mut s = String::with_capacity(bytes.len() * 2);
        for b in bytes {
            s.push(char::from(DIGITS[usize::from(b >> 4)]));
            s.push(char::from(DIGITS[usize::from(b & 0xf)]));
        }
        s
    }

    /// Exactly `2 * N` lowercase hex digits into `N` bytes; anything else is `None`.
    pub(crate) fn decode<const N: usize>(s: &str) -> Option<[u8; N]> {
        let s = s.as_bytes();
        if s.len() != 2 * N {
            return None;
        }
        let nibble = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        let mut out = [0u8; N];
        for (i, pair) in s.chunks_exact(2).enumerate() {
            out[i] = (nibble(pair[0])? << 4) | nibble(pair[1])?;
        }
        Some(out)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn hex_round_trips_and_refuses_other_text() {
            let bytes = [0x00, 0x7f, 0x80, 0xff, 0x12];
            assert_eq!(super::encode(&bytes), "007f80ff12");
            assert_eq!(super::decode::<5>("007f80ff12"), Some(bytes));
            for bad in [
                "007f80ff1",
                "007f80ff123",
                "007F80FF12",
                "007f80ff1g",
                "+07f80ff12",
            ] {
                assert_eq!(super::decode::<5>(bad), None, "{bad:?}");
            }
        }
    }
}
