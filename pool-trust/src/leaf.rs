//! A daemon's side of trust: its key, the request it sends when it joins or renews, the
//! credentials (certificate and key) it serves and calls with, and when to renew them.
//!
//! Credentials live in a directory of their own ([`KEY_FILE`] 0600, [`CERT_FILE`] 0644,
//! the directory 0700). A certificate is renewed past two thirds of its validity
//! ([`renew_at_ms`]): with the default 90 days, a month before it ends, time enough for a
//! coordinator outage to pass without anyone's certificate running out.
//!
//! During a CA roll the certificate file holds the leaf followed by the cross certificate
//! (the new CA signed by the old, [`crate::PoolCa::cross_sign`]): [`Credentials`] keep that
//! chain, present it whole, and read identity and validity from the leaf only.

use std::fmt;
use std::path::Path;

use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use crate::ca::{AltName, CaCert, CaError, ia5};
use crate::cert::{CertError, CertInfo, certs_from_pem};
use crate::files::{self, FileError};
use crate::identity::{Identity, IdentityError, PoolId};

/// The daemon's private key in its credentials directory.
pub const KEY_FILE: &str = "key.pem";
/// The daemon's certificate in its credentials directory (the leaf, then its
/// intermediates).
pub const CERT_FILE: &str = "cert.pem";
/// The most intermediates after a leaf: a roll's cross certificate, and one spare.
pub const MAX_INTERMEDIATES: usize = 2;

/// Errors of a daemon's key and credentials.
#[derive(Debug, thiserror::Error)]
pub enum LeafError {
    /// rcgen refused to generate, read or encode something.
    #[error("cannot {what}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// The identity or a name cannot go into a request.
    #[error("cannot name the request")]
    Name {
        #[source]
        source: Box<CaError>,
    },
    /// An identity that is not valid.
    #[error("invalid identity")]
    InvalidIdentity {
        #[source]
        source: IdentityError,
    },
    /// A certificate that cannot be read.
    #[error("unreadable certificate")]
    Cert {
        #[source]
        source: CertError,
    },
    /// More intermediates after the leaf than [`MAX_INTERMEDIATES`].
    #[error("{count} intermediate certificates after the leaf; at most {max} are kept")]
    TooManyIntermediates { count: usize, max: usize },
    /// An intermediate that is not a CA certificate of the pool.
    #[error("intermediate certificate {position} is not a CA certificate of the pool")]
    Intermediate {
        position: usize,
        #[source]
        source: Box<CaError>,
    },
    /// An intermediate of another pool than the leaf's.
    #[error("intermediate certificate {position} is a CA of pool {found}, not of pool {expected}")]
    IntermediatePool {
        position: usize,
        expected: PoolId,
        found: PoolId,
    },
    /// An intermediate that is not the issuer of the certificate before it: a chain out of
    /// order, or one that does not belong to this leaf.
    #[error("intermediate certificate {position} did not issue the certificate before it")]
    ChainOrder { position: usize },
    /// A certificate whose identity is missing, malformed or of another pool.
    #[error("the certificate's identity is not acceptable")]
    Identity {
        #[source]
        source: IdentityError,
    },
    /// A certificate for another key than ours.
    #[error("the certificate is not for this key")]
    KeyMismatch,
    /// A key or certificate file.
    #[error("credentials file")]
    File {
        #[source]
        source: FileError,
    },
}

/// A daemon's private key (ECDSA P-256). `Debug` never shows it.
pub struct LeafKey(KeyPair);

impl fmt::Debug for LeafKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LeafKey([elided])")
    }
}

impl LeafKey {
    /// A fresh key.
    pub fn generate() -> Result<LeafKey, LeafError> {
        KeyPair::generate()
            .map(LeafKey)
            .map_err(|source| LeafError::Rcgen {
                what: "generate a key",
                source,
            })
    }

    /// A key from PKCS#8 PEM.
    pub fn from_pem(pem: &str) -> Result<LeafKey, LeafError> {
        KeyPair::from_pem(pem)
            .map(LeafKey)
            .map_err(|source| LeafError::Rcgen {
                what: "read the key",
                source,
            })
    }

    /// PKCS#8 PEM: a secret, for a 0600 file.
    pub fn to_pem(&self) -> String {
        self.0.serialize_pem()
    }

    /// A certificate request (PEM) for `identity` in `pool`, with address `names`, signed
    /// by this key: what a joining or renewing daemon sends.
    pub fn csr_pem(
        &self,
        pool: &PoolId,
        identity: &Identity,
        names: &[AltName],
    ) -> Result<String, LeafError> {
        identity
            .validate()
            .map_err(|source| LeafError::InvalidIdentity { source })?;
        let name = |e: CaError| LeafError::Name {
            source: Box::new(e),
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.path());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(ia5(&identity.uri(pool)).map_err(name)?)];
        for n in names {
            params.subject_alt_names.push(n.to_san().map_err(name)?);
        }
        let err = |what| move |source| LeafError::Rcgen { what, source };
        params
            .serialize_request(&self.0)
            .map_err(err("make the certificate request"))?
            .pem()
            .map_err(err("encode the certificate request"))
    }
}

/// A daemon's certificate and key, checked to belong together and to name an identity of
/// the pool, with the intermediates presented after the certificate (a roll's cross
/// certificate), each a CA of the pool that issued the one before it.
#[derive(Clone)]
pub struct Credentials {
    pool: PoolId,
    identity: Identity,
    cert_der: Vec<u8>,
    intermediates: Vec<CaCert>,
    /// The leaf, then the intermediates.
    cert_pem: String,
    key_pem: String,
    info: CertInfo,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("pool", &self.pool)
            .field("identity", &self.identity)
            .field("fingerprint", &self.info.fingerprint)
            .field("not_after_ms", &self.info.not_after_ms)
            .field("intermediates", &self.intermediates.len())
            .field("key", &"[elided]")
            .finish()
    }
}

impl Credentials {
    /// Credentials from the certificate the CA returned (PEM: the leaf, then any
    /// intermediates) and the key the request was made with.
    pub fn new(cert_pem: &str, key: &LeafKey, pool: &PoolId) -> Result<Credentials, LeafError> {
        Credentials::from_pem(cert_pem, &key.to_pem(), pool)
    }

    /// Credentials from PEM certificate chain (the leaf first, then at most
    /// [`MAX_INTERMEDIATES`] CA certificates of the pool, each the issuer of the one
    /// before it) and key.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        pool: &PoolId,
    ) -> Result<Credentials, LeafError> {
        let mut ders = certs_from_pem(cert_pem)
            .map_err(|source| LeafError::Cert { source })?
            .into_iter();
        let cert_der = ders.next().ok_or(LeafError::Cert {
            source: CertError::NoCertificate,
        })?;
        let rest: Vec<Vec<u8>> = ders.collect();
        if rest.len() > MAX_INTERMEDIATES {
            return Err(LeafError::TooManyIntermediates {
                count: rest.len(),
                max: MAX_INTERMEDIATES,
            });
        }
        let info = CertInfo::parse(&cert_der).map_err(|source| LeafError::Cert { source })?;
        let identity = Identity::from_cert_info(&info, pool)
            .map_err(|source| LeafError::Identity { source })?;
        let mut intermediates = Vec::with_capacity(rest.len());
        let mut issued_by = info.issuer.clone();
        for (i, der) in rest.into_iter().enumerate() {
            let position = i + 1;
            let ca = CaCert::from_der(der).map_err(|e| LeafError::Intermediate {
                position,
                source: Box::new(e),
            })?;
            if ca.pool_id() != pool {
                return Err(LeafError::IntermediatePool {
                    position,
                    expected: pool.clone(),
                    found: ca.pool_id().clone(),
                });
            }
            if ca.info().subject != issued_by {
                return Err(LeafError::ChainOrder { position });
            }
            issued_by = ca.info().issuer.clone();
            intermediates.push(ca);
        }
        let key = LeafKey::from_pem(key_pem)?;
        if key.0.public_key_raw() != info.public_key.as_slice() {
            return Err(LeafError::KeyMismatch);
        }
        Ok(Credentials {
            pool: pool.clone(),
            identity,
            cert_pem: chain_pem(
                &crate::cert::to_pem("CERTIFICATE", &cert_der),
                &intermediates,
            ),
            cert_der,
            intermediates,
            key_pem: key.to_pem(),
            info,
        })
    }

    /// The same leaf and key presented with `intermediates` instead of the present ones
    /// (none: the end of a roll).
    pub fn with_intermediates(&self, intermediates: &[CaCert]) -> Result<Credentials, LeafError> {
        Credentials::from_pem(
            &chain_pem(&self.leaf_pem(), intermediates),
            &self.key_pem,
            &self.pool,
        )
    }

    /// Writes the credentials into `dir` (0700): key 0600, certificate 0644, each
    /// atomically. The key goes first, so a crash between leaves a new key and an old
    /// certificate, which [`Credentials::load`] refuses as mismatched, never a certificate
    /// for a key that is gone.
    pub fn save(&self, dir: &Path) -> Result<(), LeafError> {
        let file = |source| LeafError::File { source };
        files::write_private(&dir.join(KEY_FILE), self.key_pem.as_bytes()).map_err(file)?;
        files::write_public(&dir.join(CERT_FILE), self.cert_pem.as_bytes()).map_err(file)
    }

    /// Reads credentials saved by [`Credentials::save`]; a key file others can read is
    /// refused.
    pub fn load(dir: &Path, pool: &PoolId) -> Result<Credentials, LeafError> {
        let file = |source| LeafError::File { source };
        let key = files::read_private(&dir.join(KEY_FILE)).map_err(file)?;
        let cert = files::read_public(&dir.join(CERT_FILE)).map_err(file)?;
        Credentials::from_pem(
            &String::from_utf8_lossy(&cert),
            &String::from_utf8_lossy(&key),
            pool,
        )
    }

    /// The pool.
    pub fn pool_id(&self) -> &PoolId {
        &self.pool
    }

    /// Who the certificate speaks for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The leaf certificate, DER: what identity and validity are read from.
    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The chain, PEM: the leaf, then the intermediates. What is presented and saved.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The leaf certificate alone, PEM.
    pub fn leaf_pem(&self) -> String {
        crate::cert::to_pem("CERTIFICATE", &self.cert_der)
    }

    /// The intermediates presented after the leaf (a roll's cross certificate), in order.
    pub fn intermediates(&self) -> &[CaCert] {
        &self.intermediates
    }

    /// The chain, DER: the leaf, then the intermediates.
    pub fn chain_der(&self) -> Vec<&[u8]> {
        std::iter::once(self.cert_der.as_slice())
            .chain(self.intermediates.iter().map(CaCert::der))
            .collect()
    }

    /// The private key, PKCS#8 PEM: a secret.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// What was read from the certificate.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }

    /// End of validity, ms since the epoch.
    pub fn not_after_ms(&self) -> u64 {
        self.info.not_after_ms
    }

    /// When to renew: [`renew_at_ms`] of the certificate's validity.
    pub fn renew_at_ms(&self) -> u64 {
        renew_at_ms(self.info.not_before_ms, self.info.not_after_ms)
    }

    /// Whether the certificate is due for renewal at `now_ms`.
    pub fn should_renew(&self, now_ms: u64) -> bool {
        now_ms >= self.renew_at_ms()
    }
}

/// A certificate chain as PEM text: `leaf_pem` (one or more certificates, as a CA's
/// [`crate::PoolCa::sign`] returns them), then each of `intermediates`. What a signer
/// returns during a roll: the new leaf, then the cross certificate.
pub fn chain_pem(leaf_pem: &str, intermediates: &[CaCert]) -> String {
    let mut chain = leaf_pem.to_owned();
    for ca in intermediates {
        if !chain.is_empty() && !chain.ends_with('\n') {
            chain.push('\n');
        }
        chain.push_str(&ca.pem());
    }
    chain
}

/// The moment two thirds of the way from `not_before_ms` to `not_after_ms`, when a
/// certificate should be renewed. An empty or inverted period is due at once
/// (`not_before_ms`).
pub fn renew_at_ms(not_before_ms: u64, not_after_ms: u64) -> u64 {
    let span = u128::from(not_after_ms.saturating_sub(not_before_ms));
    not_before_ms.saturating_add((span * 2 / 3) as u64)
}

/// Whether the DER certificate `cert_der` is due for renewal at `now_ms`.
pub fn should_renew(cert_der: &[u8], now_ms: u64) -> Result<bool, CertError> {
    let info = CertInfo::parse(cert_der)?;
    Ok(now_ms >= renew_at_ms(info.not_before_ms, info.not_after_ms))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::{PoolCa, Validity};

    const NOW: u64 = 1_800_000_000_000;
    const DAY_MS: u64 = 86_400_000;

    #[test]
    fn renewal_is_due_past_two_thirds() {
        let cases = [
            // (not_before, not_after, now, due)
            (0, 90, 59, false),
            (0, 90, 60, true),
            (1000, 1000 + 90 * DAY_MS, 1000 + 60 * DAY_MS - 1, false),
            (1000, 1000 + 90 * DAY_MS, 1000 + 60 * DAY_MS, true),
            (500, 500, 500, true),
            (500, 100, 500, true),
            (0, u64::MAX, u64::MAX / 3 * 2 - 1, false),
            (0, u64::MAX, u64::MAX, true),
        ];
        for (nb, na, now, due) in cases {
            assert_eq!(now >= renew_at_ms(nb, na), due, "{nb}..{na} at {now}");
        }
    }

    #[test]
    fn credentials_know_when_to_renew() {
        let ca = PoolCa::create(
            PoolId::generate(),
            Validity::starting(NOW, Duration::from_secs(3650 * 86_400)),
        )
        .unwrap();
        let creds = ca
            .issue(
                &Identity::Storage("sr-1".into()),
                &[],
                Validity {
                    not_before_ms: NOW,
                    not_after_ms: NOW + 90 * DAY_MS,
                },
            )
            .unwrap();
        assert_eq!(creds.renew_at_ms(), NOW + 60 * DAY_MS);
        assert!(!creds.should_renew(NOW + 59 * DAY_MS));
        assert!(creds.should_renew(NOW + 60 * DAY_MS));
        assert!(!should_renew(creds.cert_der(), NOW + DAY_MS).unwrap());
        assert!(should_renew(creds.cert_der(), NOW + 61 * DAY_MS).unwrap());
        assert!(should_renew(b"junk", NOW).is_err());
    }

    #[test]
    fn credentials_save_load_and_refuse_a_foreign_key() {
        use std::os::unix::fs::PermissionsExt;
        let ca = PoolCa::create(
            PoolId::generate(),
            Validity::starting(NOW, Duration::from_secs(86_400)),
        )
        .unwrap();
        let creds = ca
            .issue(
                &Identity::Member(7),
                &[],
                Validity::starting(NOW, Duration::from_secs(3600)),
            )
            .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("member-7");
        creds.save(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(KEY_FILE)), 0o600);
        let loaded = Credentials::load(&dir, ca.pool_id()).unwrap();
        assert_eq!(loaded.identity(), &Identity::Member(7));
        assert_eq!(loaded.cert_der(), creds.cert_der());

        let other = LeafKey::generate().unwrap();
        assert!(matches!(
            Credentials::new(creds.cert_pem(), &other, ca.pool_id()),
            Err(LeafError::KeyMismatch)
        ));
        assert!(matches!(
            Credentials::from_pem(creds.cert_pem(), creds.key_pem(), &PoolId::generate()),
            Err(LeafError::Identity { .. })
        ));
        assert!(!format!("{creds:?}").contains("PRIVATE KEY"));
        assert!(!format!("{other:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn a_chain_keeps_the_leaf_first_and_refuses_bad_intermediates() {
        let v = Validity::starting(NOW, Duration::from_secs(86_400));
        let a = PoolCa::create(PoolId::generate(), v).unwrap();
        let b = a.roll(v).unwrap();
        let x = a.cross_sign(&b).unwrap();
        let pool = a.pool_id();
        let plain = b.issue(&Identity::Member(3), &[], v).unwrap();
        assert!(plain.intermediates().is_empty());

        // The signer's side: the leaf as `sign` returns it, then X.
        let pem = chain_pem(plain.cert_pem(), std::slice::from_ref(&x));
        let chained = Credentials::from_pem(&pem, plain.key_pem(), pool).unwrap();
        assert_eq!(chained.cert_der(), plain.cert_der());
        assert_eq!(chained.identity(), &Identity::Member(3));
        assert_eq!(chained.info(), plain.info());
        assert_eq!(chained.intermediates(), std::slice::from_ref(&x));
        assert_eq!(chained.chain_der(), vec![plain.cert_der(), x.der()]);
        assert_eq!(chained.cert_pem(), pem);
        assert_eq!(chained.leaf_pem(), plain.cert_pem());
        let same = plain.with_intermediates(std::slice::from_ref(&x)).unwrap();
        assert_eq!(same.cert_pem(), chained.cert_pem());
        // Dropping X at the end of the roll.
        assert_eq!(
            chained.with_intermediates(&[]).unwrap().cert_pem(),
            plain.cert_pem()
        );

        // Saved and loaded whole.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("member-3");
        chained.save(&dir).unwrap();
        let loaded = Credentials::load(&dir, pool).unwrap();
        assert_eq!(loaded.chain_der(), chained.chain_der());

        // Refused: too many, not a CA, another pool's CA, a CA that did not issue the leaf.
        let three = chain_pem(plain.cert_pem(), &[x.clone(), x.clone(), x.clone()]);
        assert!(matches!(
            Credentials::from_pem(&three, plain.key_pem(), pool),
            Err(LeafError::TooManyIntermediates { count: 3, max: 2 })
        ));
        let other_leaf = a.issue(&Identity::Member(4), &[], v).unwrap();
        let not_ca = format!("{}{}", plain.cert_pem(), other_leaf.cert_pem());
        let err = Credentials::from_pem(&not_ca, plain.key_pem(), pool).unwrap_err();
        assert!(
            matches!(&err, LeafError::Intermediate { position: 1, source } if matches!(**source, CaError::NotCa { .. })),
            "{err:?}"
        );
        let stranger = PoolCa::create(PoolId::generate(), v).unwrap();
        let foreign = chain_pem(plain.cert_pem(), std::slice::from_ref(stranger.cert()));
        assert!(matches!(
            Credentials::from_pem(&foreign, plain.key_pem(), pool),
            Err(LeafError::IntermediatePool { position: 1, .. })
        ));
        // X names B: it cannot follow a leaf of A, nor follow itself.
        let a_leaf = a.issue(&Identity::Member(5), &[], v).unwrap();
        assert!(matches!(
            a_leaf.with_intermediates(std::slice::from_ref(&x)),
            Err(LeafError::ChainOrder { position: 1 })
        ));
        assert!(matches!(
            plain.with_intermediates(&[x.clone(), x.clone()]),
            Err(LeafError::ChainOrder { position: 2 })
        ));
        assert!(matches!(
            Credentials::from_pem(&x.pem(), plain.key_pem(), pool),
            Err(LeafError::Identity { .. })
        ));
    }
}
