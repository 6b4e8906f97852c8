//! The pool's certificate authority: created when the pool is founded, it signs every
//! daemon's certificate; and the bundle of CA certificates every daemon trusts.
//!
//! - [`PoolCa`]: an ECDSA P-256 key and its self-signed certificate, which names the pool
//!   (`pool://<pool-id>/ca`). [`PoolCa::save`] / [`PoolCa::load`] keep it in a directory
//!   ([`CA_KEY_FILE`] 0600, [`CA_CERT_FILE`] 0644, the directory 0700);
//!   [`PoolCa::to_pem`] / [`PoolCa::from_pem`] carry it elsewhere (a replicated state).
//! - [`CertificateRequest`]: a joining daemon's CSR, parsed and its signature checked,
//!   naming the identity it asks for. [`PoolCa::sign`] turns it into a leaf certificate for
//!   that identity, its identity DNS name and the addresses the caller allows, valid for the
//!   caller's period (never past the CA's own end). Whether the requester may have that
//!   identity (a join token, or the identity of the connection it renews over) is the
//!   caller's check, made before signing.
//! - [`CaBundle`]: the CA certificates trusted, all of one pool. During a roll
//!   (`pool-rotate-ca`) it holds the old CA and the new one: a certificate of either is
//!   accepted while daemons renew onto the new one; then the old is dropped.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::cert::{CertError, CertInfo, Fingerprint, certs_from_pem, to_pem};
use crate::files::{self, FileError};
use crate::identity::{
    DNS_SUFFIX, Identity, IdentityError, PoolId, Role, URI_SCHEME, coordinators_name,
};
use crate::leaf::{Credentials, LeafError, LeafKey};

/// The CA's private key in its directory.
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// The CA's certificate in its directory.
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// How long a new CA is valid.
pub const DEFAULT_CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 60 * 60);
/// How long a daemon's certificate is valid; it renews past two thirds of that.
pub const DEFAULT_LEAF_VALIDITY: Duration = Duration::from_secs(90 * 24 * 60 * 60);
/// How far back a new certificate's validity starts, so that a peer whose clock is a
/// little behind accepts it at once.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// The longest CSR accepted, in PEM characters (one is well under 1 KiB).
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;
/// The most CA certificates a bundle holds (current, previous, and room for a roll).
pub const MAX_BUNDLE_CERTS: usize = 4;

/// Errors of the CA, its bundle and what it signs.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// rcgen refused to build, sign or load something.
    #[error("cannot {what}")]
    Rcgen {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
    /// A certificate that cannot be read.
    #[error("unreadable certificate")]
    Cert {
        #[source]
        source: CertError,
    },
    /// A certificate in a CA's place that is not a CA.
    #[error("certificate {fingerprint} is not a CA certificate")]
    NotCa { fingerprint: Fingerprint },
    /// A CA certificate without the `pool://<pool-id>/ca` name.
    #[error("CA certificate {fingerprint} names no pool")]
    NoPoolName { fingerprint: Fingerprint },
    /// A malformed pool id in a CA certificate.
    #[error("CA certificate {fingerprint} names an invalid pool")]
    PoolName {
        fingerprint: Fingerprint,
        #[source]
        source: IdentityError,
    },
    /// CA certificates of two pools in one bundle.
    #[error("CA certificate {fingerprint} is of pool {found}, the bundle's is {expected}")]
    MixedPools {
        fingerprint: Fingerprint,
        expected: PoolId,
        found: PoolId,
    },
    /// A bundle with no certificate (or one about to lose its last).
    #[error("a CA bundle needs at least one certificate")]
    EmptyBundle,
    /// A bundle with more certificates than [`MAX_BUNDLE_CERTS`].
    #[error("a CA bundle of {count} certificates; at most {max} are kept")]
    TooManyCerts { count: usize, max: usize },
    /// The same CA twice in a bundle.
    #[error("CA certificate {fingerprint} is in the bundle twice")]
    Duplicate { fingerprint: Fingerprint },
    /// A CA key that is not the one its certificate names.
    #[error("the CA key does not match CA certificate {fingerprint}")]
    KeyMismatch { fingerprint: Fingerprint },
    /// A CSR longer than [`MAX_CSR_PEM_LEN`].
    #[error("a certificate request of {len} characters; at most {max} are accepted")]
    CsrTooLarge { len: usize, max: usize },
    /// A CSR that does not parse, or whose signature does not verify.
    #[error("invalid certificate request")]
    Csr {
        #[source]
        source: rcgen::Error,
    },
    /// A CSR that names no identity, several, or a malformed one.
    #[error("the certificate request's identity is not acceptable")]
    CsrIdentity {
        #[source]
        source: IdentityError,
    },
    /// An address name that is neither an IP address nor a DNS name.
    #[error("invalid certificate name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A validity period that ends before it starts.
    #[error("empty validity period {not_before_ms}..{not_after_ms}")]
    EmptyValidity {
        not_before_ms: u64,
        not_after_ms: u64,
    },
    /// A validity period that ends before the moment of signing.
    #[error("the CA expired at {not_after_ms} (ms since the epoch)")]
    CaExpired { not_after_ms: u64 },
    /// A time X.509 cannot hold.
    #[error("time {ms} ms since the epoch is out of range")]
    Time { ms: u64 },
    /// A key or certificate file.
    #[error("CA file")]
    File {
        #[source]
        source: FileError,
    },
    /// Saving over an existing CA.
    #[error("{path} already holds a CA key; a CA is never overwritten")]
    Exists { path: std::path::PathBuf },
    /// A CA asked to cross-sign itself.
    #[error("CA {fingerprint} cannot cross-sign itself")]
    CrossSignSelf { fingerprint: Fingerprint },
    /// A cross certificate that does not carry the next CA's name and key (a name rcgen
    /// would encode differently).
    #[error("the cross certificate of CA {fingerprint} does not carry its name and key")]
    CrossMismatch { fingerprint: Fingerprint },
    /// Making the leaf credentials of an issued certificate.
    #[error("issued credentials")]
    Leaf {
        #[source]
        source: Box<LeafError>,
    },
}

pub(crate) fn rcgen_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> CaError {
    move |source| CaError::Rcgen { what, source }
}

/// A validity period, milliseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

impl Validity {
    /// `length` from `now_ms`, backdated by [`CLOCK_SKEW`].
    pub fn starting(now_ms: u64, length: Duration) -> Validity {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Validity {
            not_before_ms: now_ms.saturating_sub(ms(CLOCK_SKEW)),
            not_after_ms: now_ms.saturating_add(ms(length)),
        }
    }

    fn check(&self) -> Result<(), CaError> {
        if self.not_after_ms <= self.not_before_ms {
            return Err(CaError::EmptyValidity {
                not_before_ms: self.not_before_ms,
                not_after_ms: self.not_after_ms,
            });
        }
        Ok(())
    }

    pub(crate) fn apply(&self, params: &mut CertificateParams) -> Result<(), CaError> {
        self.check()?;
        params.not_before = to_time(self.not_before_ms)?;
        params.not_after = to_time(self.not_after_ms)?;
        Ok(())
    }
}

fn to_time(ms: u64) -> Result<time::OffsetDateTime, CaError> {
    let secs = i64::try_from(ms / 1000).map_err(|_| CaError::Time { ms })?;
    time::OffsetDateTime::from_unix_timestamp(secs).map_err(|_| CaError::Time { ms })
}

/// A certificate name for a daemon's address: what clients that dial it by that address
/// check (authorization never reads these).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AltName {
    Dns(String),
    Ip(IpAddr),
}

impl AltName {
    /// An IP address if `s` is one, else a DNS name (letters, digits, `-` and `.`, at
    /// most 253 characters, no empty label).
    pub fn parse(s: &str) -> Result<AltName, CaError> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(AltName::Ip(ip));
        }
        let bad = |reason| CaError::InvalidName {
            name: s.chars().take(120).collect(),
            reason,
        };
        if s.is_empty() || s.len() > 253 {
            return Err(bad("a DNS name has 1 to 253 characters"));
        }
        for label in s.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(bad("a DNS label has 1 to 63 characters"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                || label.starts_with('-')
                || label.ends_with('-')
            {
                return Err(bad("a DNS label is letters, digits and inner '-'"));
            }
        }
        Ok(AltName::Dns(s.to_ascii_lowercase()))
    }

    /// A DNS name under [`DNS_SUFFIX`]: the identity and coordinator names the CA gives.
    pub fn is_pool_internal(&self) -> bool {
        match self {
            AltName::Dns(name) => name == DNS_SUFFIX || name.ends_with(&format!(".{DNS_SUFFIX}")),
            AltName::Ip(_) => false,
        }
    }

    pub(crate) fn to_san(&self) -> Result<SanType, CaError> {
        Ok(match self {
            AltName::Ip(ip) => SanType::IpAddress(*ip),
            AltName::Dns(name) => SanType::DnsName(ia5(name)?),
        })
    }
}

pub(crate) fn ia5(s: &str) -> Result<Ia5String, CaError> {
    Ia5String::try_from(s).map_err(rcgen_err("encode a certificate name"))
}

pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive, and its DER encoding stays 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

/// A CA certificate, read and checked: a CA, naming its pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaCert {
    der: Vec<u8>,
    pool: PoolId,
    info: CertInfo,
}

impl CaCert {
    /// Reads a DER CA certificate.
    pub fn from_der(der: Vec<u8>) -> Result<CaCert, CaError> {
        let info = CertInfo::parse(&der).map_err(|source| CaError::Cert { source })?;
        let fingerprint = info.fingerprint;
        if !info.is_ca {
            return Err(CaError::NotCa { fingerprint });
        }
        let mut pools = info.uris.iter().filter_map(|u| {
            u.strip_prefix(URI_SCHEME)
                .and_then(|rest| rest.strip_suffix("/ca"))
        });
        let (Some(pool), None) = (pools.next(), pools.next()) else {
            return Err(CaError::NoPoolName { fingerprint });
        };
        let pool = PoolId::parse(pool).map_err(|source| CaError::PoolName {
            fingerprint,
            source,
        })?;
        Ok(CaCert { der, pool, info })
    }

    /// The DER bytes.
    pub fn der(&self) -> &[u8] {
        &self.der
    }

    /// PEM text.
    pub fn pem(&self) -> String {
        to_pem("CERTIFICATE", &self.der)
    }

    /// The pool it belongs to.
    pub fn pool_id(&self) -> &PoolId {
        &self.pool
    }

    /// SHA-256 of the DER bytes.
    pub fn fingerprint(&self) -> Fingerprint {
        self.info.fingerprint
    }

    /// What was read from it.
    pub fn info(&self) -> &CertInfo {
        &self.info
    }
}

/// The CA certificates a daemon trusts: one or more (during a roll), all of one pool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaBundle {
    certs: Vec<CaCert>,
}

impl CaBundle {
    /// A bundle of these certificates, in order (the newest last, by convention).
    pub fn new(certs: Vec<CaCert>) -> Result<CaBundle, CaError> {
        let first = certs.first().ok_or(CaError::EmptyBundle)?;
        if certs.len() > MAX_BUNDLE_CERTS {
            return Err(CaError::TooManyCerts {
                count: certs.len(),
                max: MAX_BUNDLE_CERTS,
            });
        }
        for (i, c) in certs.iter().enumerate() {
            if c.pool != first.pool {
                return Err(CaError::MixedPools {
                    fingerprint: c.fingerprint(),
                    expected: first.pool.clone(),
                    found: c.pool.clone(),
                });
            }
            if certs[..i]
                .iter()
                .any(|o| o.fingerprint() == c.fingerprint())
            {
                return Err(CaError::Duplicate {
                    fingerprint: c.fingerprint(),
                });
            }
        }
        Ok(CaBundle { certs })
    }

    /// Parses PEM text of one or more CA certificates.
    pub fn from_pem(text: &str) -> Result<CaBundle, CaError> {
        let ders = certs_from_pem(text).map_err(|source| CaError::Cert { source })?;
        if ders.len() > MAX_BUNDLE_CERTS {
            return Err(CaError::TooManyCerts {
                count: ders.len(),
                max: MAX_BUNDLE_CERTS,
            });
        }
        CaBundle::new(
            ders.into_iter()
                .map(CaCert::from_der)
                .collect::<Result<_, _>>()?,
        )
    }

    /// PEM text of every certificate, in order: what rustls is given as trust roots.
    pub fn to_pem(&self) -> String {
        self.certs.iter().map(CaCert::pem).collect()
    }

    /// The pool every certificate belongs to.
    pub fn pool_id(&self) -> &PoolId {
        &self.certs[0].pool
    }

    /// The certificates, in order.
    pub fn certs(&self) -> &[CaCert] {
        &self.certs
    }

    /// Whether a CA with this fingerprint is trusted.
    pub fn contains(&self, fingerprint: &Fingerprint) -> bool {
        self.certs.iter().any(|c| c.fingerprint() == *fingerprint)
    }

    /// This bundle and `cert` (the start of a roll: trust the new CA too).
    pub fn with(&self, cert: CaCert) -> Result<CaBundle, CaError> {
        let mut certs = self.certs.clone();
        certs.push(cert);
        CaBundle::new(certs)
    }

    /// This bundle without the CA of that fingerprint (the end of a roll). The last CA
    /// is never removed.
    pub fn without(&self, fingerprint: &Fingerprint) -> Result<CaBundle, CaError> {
        let certs: Vec<_> = self
            .certs
            .iter()
            .filter(|c| c.fingerprint() != *fingerprint)
            .cloned()
            .collect();
        CaBundle::new(certs)
    }

    /// Writes the bundle as a public (0644) file, atomically.
    pub fn save(&self, path: &Path) -> Result<(), CaError> {
        files::write_public(path, self.to_pem().as_bytes())
            .map_err(|source| CaError::File { source })
    }

    /// Reads a bundle file.
    pub fn load(path: &Path) -> Result<CaBundle, CaError> {
        let bytes = files::read_public(path).map_err(|source| CaError::File { source })?;
        CaBundle::from_pem(&String::from_utf8_lossy(&bytes))
    }
}

/// A joining (or renewing) daemon's certificate request: its public key, proven by the
/// request's signature, and the identity and addresses it asks for.
#[derive(Debug)]
pub struct CertificateRequest {
    identity: Identity,
    names: Vec<AltName>,
    csr: CertificateSigningRequestParams,
}

impl CertificateRequest {
    /// Parses PEM CSR text from the network: size-capped, signature checked, exactly one
    /// identity URI of `pool`. Names other than URI, DNS and IP are ignored.
    pub fn from_pem(text: &str, pool: &PoolId) -> Result<CertificateRequest, CaError> {
        if text.len() > MAX_CSR_PEM_LEN {
            return Err(CaError::CsrTooLarge {
                len: text.len(),
                max: MAX_CSR_PEM_LEN,
            });
        }
        let csr = CertificateSigningRequestParams::from_pem(text)
            .map_err(|source| CaError::Csr { source })?;
        let mut identities = Vec::new();
        let mut names = Vec::new();
        for san in &csr.params.subject_alt_names {
            match san {
                SanType::URI(uri) if uri.as_str().starts_with(URI_SCHEME) => {
                    identities.push(uri.as_str().to_owned())
                }
                SanType::DnsName(name) => names.push(AltName::parse(name.as_str())?),
                SanType::IpAddress(ip) => names.push(AltName::Ip(*ip)),
                _ => {}
            }
        }
        let identity = match identities.as_slice() {
            [one] => Identity::parse_uri(one, pool),
            [] => Err(IdentityError::NoIdentity),
            many => Err(IdentityError::SeveralIdentities { count: many.len() }),
        }
        .map_err(|source| CaError::CsrIdentity { source })?;
        // The identity DNS name the requester may have put in is the CA's to add; any
        // other name under `pool.internal` is refused: a host asking for
        // `member-1.<pool>.pool.internal` would pass for member 1 with clients.
        let own = AltName::Dns(identity.dns_name(pool));
        names.retain(|n| *n != own);
        if let Some(AltName::Dns(name)) = names.iter().find(|n| n.is_pool_internal()) {
            return Err(CaError::InvalidName {
                name: name.clone(),
                reason: "names under pool.internal are given by the pool's CA only",
            });
        }
        Ok(CertificateRequest {
            identity,
            names,
            csr,
        })
    }

    /// The identity asked for.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The address names asked for.
    pub fn names(&self) -> &[AltName] {
        &self.names
    }
}

/// The pool's certificate authority.
pub struct PoolCa {
    pub(crate) cert: CaCert,
    pub(crate) issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for PoolCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoolCa")
            .field("pool", &self.cert.pool)
            .field("fingerprint", &self.cert.fingerprint())
            .field("key", &"[elided]")
            .finish()
    }
}

impl PoolCa {
    /// A new CA for `pool`: a fresh key and a self-signed certificate valid for
    /// `validity`. Founding a pool calls it once; a roll calls it again with the same pool.
    pub fn create(pool: PoolId, validity: Validity) -> Result<PoolCa, CaError> {
        let key = KeyPair::generate().map_err(rcgen_err("generate the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        // A roll's two CAs differ in name as well as key, so no verifier confuses them.
        let tag = crate::hex::encode(&rand::random::<[u8; 4]>());
        dn.push(DnType::CommonName, format!("pool {pool} CA {tag}"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(ia5(&format!("{URI_SCHEME}{pool}/ca"))?)];
        // One CA below it at most: the cross certificate of a roll to its successor, so
        // even a verifier that applies path lengths to roots accepts leaf -> cross -> it.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        validity.apply(&mut params)?;
        let cert = params
            .self_signed(&key)
            .map_err(rcgen_err("sign the CA certificate"))?;
        let cert = CaCert::from_der(cert.der().to_vec())?;
        Ok(PoolCa {
            cert,
            issuer: Issuer::new(params, key),
        })
    }

    /// The next CA of a roll: same pool, new key and certificate.
    pub fn roll(&self, validity: Validity) -> Result<PoolCa, CaError> {
        PoolCa::create(self.cert.pool.clone(), validity)
    }

    /// A CA from its certificate and PKCS#8 key, both PEM; the key must be the
    /// certificate's.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<PoolCa, CaError> {
        let der = certs_from_pem(cert_pem).map_err(|source| CaError::Cert { source })?;
        let [der] = <[Vec<u8>; 1]>::try_from(der).map_err(|v| CaError::TooManyCerts {
            count: v.len(),
            max: 1,
        })?;
        let cert = CaCert::from_der(der)?;
        let key = KeyPair::from_pem(key_pem).map_err(rcgen_err("read the CA key"))?;
        if key.public_key_raw() != cert.info.public_key.as_slice() {
            return Err(CaError::KeyMismatch {
                fingerprint: cert.fingerprint(),
            });
        }
        let issuer = Issuer::from_ca_cert_pem(&cert.pem(), key)
            .map_err(rcgen_err("load the CA certificate"))?;
        Ok(PoolCa { cert, issuer })
    }

    /// The certificate and the key as PEM: `(cert, key)`. The key is the pool's root
    /// secret.
    pub fn to_pem(&self) -> (String, String) {
        (self.cert.pem(), self.issuer.key().serialize_pem())
    }

    /// Writes the CA into `dir` (0700): the key 0600, the certificate 0644. An existing
    /// CA key there is never overwritten; a roll saves its new CA in a new directory.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        let key_path = dir.join(CA_KEY_FILE);
        if key_path.exists() {
            return Err(CaError::Exists { path: key_path });
        }
        let (cert, key) = self.to_pem();
        let file = |source| CaError::File { source };
        files::write_private(&key_path, key.as_bytes()).map_err(file)?;
        files::write_public(&dir.join(CA_CERT_FILE), cert.as_bytes()).map_err(file)
    }

    /// Reads a CA saved by [`PoolCa::save`]; a key file others can read is refused.
    pub fn load(dir: &Path) -> Result<PoolCa, CaError> {
        let file = |source| CaError::File { source };
        let key = files::read_private(&dir.join(CA_KEY_FILE)).map_err(file)?;
        let cert = files::read_public(&dir.join(CA_CERT_FILE)).map_err(file)?;
        PoolCa::from_pem(
            &String::from_utf8_lossy(&cert),
            &String::from_utf8_lossy(&key),
        )
    }

    /// The CA's certificate.
    pub fn cert(&self) -> &CaCert {
        &self.cert
    }

    /// The pool this CA belongs to.
    pub fn pool_id(&self) -> &PoolId {
        &self.cert.pool
    }

    /// A bundle trusting this CA only.
    pub fn bundle(&self) -> CaBundle {
        CaBundle {
            certs: vec![self.cert.clone()],
        }
    }

    /// Signs `request` into a leaf certificate (PEM) for its identity: the identity URI
    /// and DNS name, then `names`; usable as TLS server and client; valid for `validity`
    /// cut at the CA's own end. The caller has checked that the requester may have the
    /// identity, and chosen the names (usually [`CertificateRequest::names`]).
    pub fn sign(
        &self,
        request: &CertificateRequest,
        names: &[AltName],
        validity: Validity,
    ) -> Result<String, CaError> {
        let pool = &self.cert.pool;
        let identity = &request.identity;
        let ca_end = self.cert.info.not_after_ms;
        if validity.not_before_ms >= ca_end {
            return Err(CaError::CaExpired {
                not_after_ms: ca_end,
            });
        }
        let validity = Validity {
            not_before_ms: validity.not_before_ms,
            not_after_ms: validity.not_after_ms.min(ca_end),
        };
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, identity.path());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(ia5(&identity.uri(pool))?),
            SanType::DnsName(ia5(&identity.dns_name(pool))?),
        ];
        if identity.role() == Role::Member {
            params
                .subject_alt_names
                .push(SanType::DnsName(ia5(&coordinators_name(pool))?));
        }
        for name in names.iter().filter(|n| !n.is_pool_internal()) {
            params.subject_alt_names.push(name.to_san()?);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        validity.apply(&mut params)?;
        let cert = params
            .signed_by(&request.csr.public_key, &self.issuer)
            .map_err(rcgen_err("sign the certificate"))?;
        Ok(cert.pem())
    }

    /// Credentials made here, for a daemon on this machine (the founding member) or a
    /// test: a new key, its request, signed at once.
    pub fn issue(
        &self,
        identity: &Identity,
        names: &[AltName],
        validity: Validity,
    ) -> Result<Credentials, CaError> {
        let leaf = |e: LeafError| CaError::Leaf {
            source: Box::new(e),
        };
        let key = LeafKey::generate().map_err(leaf)?;
        let csr = key.csr_pem(self.pool_id(), identity, names).map_err(leaf)?;
        let request = CertificateRequest::from_pem(&csr, self.pool_id())?;
        let cert = self.sign(&request, request.names(), validity)?;
        Credentials::new(&cert, &key, self.pool_id()).map_err(leaf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000_000;
    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    fn ca() -> PoolCa {
        PoolCa::create(PoolId::generate(), Validity::starting(NOW, 365 * DAY)).unwrap()
    }

    #[test]
    fn a_csr_signed_names_its_identity_and_addresses() {
        let ca = ca();
        let pool = ca.pool_id().clone();
        let key = LeafKey::generate().unwrap();
        let host = Identity::Host(uuid::Uuid::new_v4().to_string());
        let asked = [
            AltName::parse("10.0.0.7").unwrap(),
            AltName::parse("host7.example").unwrap(),
        ];
        let csr = key.csr_pem(&pool, &host, &asked).unwrap();
        let request = CertificateRequest::from_pem(&csr, &pool).unwrap();
        assert_eq!(request.identity(), &host);
        assert_eq!(request.names(), &asked);

        let pem = ca
            .sign(&request, request.names(), Validity::starting(NOW, 30 * DAY))
            .unwrap();
        let creds = Credentials::new(&pem, &key, &pool).unwrap();
        assert_eq!(creds.identity(), &host);
        let info = CertInfo::parse(creds.cert_der()).unwrap();
        assert!(!info.is_ca);
        assert_eq!(info.uris, vec![host.uri(&pool)]);
        assert_eq!(
            info.dns_names,
            vec![host.dns_name(&pool), "host7.example".to_string()]
        );
        assert_eq!(info.ips, vec!["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(info.not_before_ms, NOW - 300_000);
        assert_eq!(info.not_after_ms, NOW + 30 * 86_400_000);
        assert_eq!(
            Identity::from_peer_cert(creds.cert_der(), &pool).unwrap(),
            host
        );
        // Another pool's id does not read it.
        assert!(matches!(
            Identity::from_peer_cert(creds.cert_der(), &PoolId::generate()),
            Err(IdentityError::WrongPool { .. })
        ));
    }

    #[test]
    fn a_leaf_never_outlives_its_ca() {
        let ca = PoolCa::create(PoolId::generate(), Validity::starting(NOW, DAY)).unwrap();
        let creds = ca
            .issue(&Identity::Member(1), &[], Validity::starting(NOW, 10 * DAY))
            .unwrap();
        assert_eq!(creds.not_after_ms(), ca.cert().info().not_after_ms);
        assert!(matches!(
            ca.issue(
                &Identity::Member(1),
                &[],
                Validity::starting(NOW + 2 * DAY.as_millis() as u64, DAY)
            ),
            Err(CaError::CaExpired { .. })
        ));
    }

    #[test]
    fn csrs_are_checked() {
        let ca = ca();
        let pool = ca.pool_id();
        let key = LeafKey::generate().unwrap();
        // Of another pool.
        let csr = key
            .csr_pem(&PoolId::generate(), &Identity::Member(2), &[])
            .unwrap();
        assert!(matches!(
            CertificateRequest::from_pem(&csr, pool),
            Err(CaError::CsrIdentity { .. })
        ));
        // Tampered: a byte of the signed body changed.
        let csr = key.csr_pem(pool, &Identity::Member(2), &[]).unwrap();
        let mut der = pem::parse(&csr).unwrap().into_contents();
        let mid = der.len() / 2;
        der[mid] ^= 1;
        let tampered = to_pem("CERTIFICATE REQUEST", &der);
        assert!(CertificateRequest::from_pem(&tampered, pool).is_err());
        // Too large, and garbage.
        assert!(matches!(
            CertificateRequest::from_pem(&"x".repeat(MAX_CSR_PEM_LEN + 1), pool),
            Err(CaError::CsrTooLarge { .. })
        ));
        assert!(matches!(
            CertificateRequest::from_pem(
                "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                pool
            ),
            Err(CaError::Csr { .. })
        ));
    }

    #[test]
    fn the_ca_saves_and_loads_with_private_modes() {
        use std::os::unix::fs::PermissionsExt;
        let ca = ca();
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("ca");
        ca.save(&dir).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
        assert_eq!(mode(&dir.join(CA_CERT_FILE)), 0o644);
        assert!(matches!(ca.save(&dir), Err(CaError::Exists { .. })));

        let loaded = PoolCa::load(&dir).unwrap();
        assert_eq!(loaded.cert(), ca.cert());
        // The loaded CA signs certificates that name the same pool.
        let creds = loaded
            .issue(&Identity::Member(4), &[], Validity::starting(NOW, DAY))
            .unwrap();
        assert_eq!(creds.identity(), &Identity::Member(4));

        // A key file others can read is refused.
        std::fs::set_permissions(
            dir.join(CA_KEY_FILE),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        assert!(matches!(
            PoolCa::load(&dir),
            Err(CaError::File {
                source: FileError::KeyTooOpen { .. }
            })
        ));
    }

    #[test]
    fn a_ca_key_must_match_its_certificate() {
        let (a, b) = (ca(), ca());
        let (cert, _) = a.to_pem();
        let (_, key) = b.to_pem();
        assert!(matches!(
            PoolCa::from_pem(&cert, &key),
            Err(CaError::KeyMismatch { .. })
        ));
    }

    #[test]
    fn a_bundle_holds_one_pools_cas() {
        let old = ca();
        let new = old.roll(Validity::starting(NOW, 365 * DAY)).unwrap();
        assert_eq!(new.pool_id(), old.pool_id());
        assert_ne!(new.cert().fingerprint(), old.cert().fingerprint());

        let rolling = old.bundle().with(new.cert().clone()).unwrap();
        assert_eq!(rolling.certs().len(), 2);
        let parsed = CaBundle::from_pem(&rolling.to_pem()).unwrap();
        assert_eq!(parsed, rolling);
        assert!(parsed.contains(&old.cert().fingerprint()));

        let done = rolling.without(&old.cert().fingerprint()).unwrap();
        assert_eq!(done.certs(), std::slice::from_ref(new.cert()));
        assert!(matches!(
            done.without(&new.cert().fingerprint()),
            Err(CaError::EmptyBundle)
        ));
        assert!(matches!(
            rolling.with(old.cert().clone()),
            Err(CaError::Duplicate { .. })
        ));
        assert!(matches!(
            old.bundle().with(ca().cert().clone()),
            Err(CaError::MixedPools { .. })
        ));

        // A leaf certificate is no CA.
        let leaf = old
            .issue(&Identity::Member(1), &[], Validity::starting(NOW, DAY))
            .unwrap();
        assert!(matches!(
            CaBundle::from_pem(leaf.cert_pem()),
            Err(CaError::NotCa { .. })
        ));

        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("trust").join("ca-bundle.pem");
        rolling.save(&path).unwrap();
        assert_eq!(CaBundle::load(&path).unwrap(), rolling);
    }

    #[test]
    fn address_names_are_checked() {
        assert_eq!(
            AltName::parse("::1").unwrap(),
            AltName::Ip("::1".parse().unwrap())
        );
        assert_eq!(
            AltName::parse("Node-1.Lab").unwrap(),
            AltName::Dns("node-1.lab".into())
        );
        for bad in ["", "a..b", "-a", "a-", "a_b", "a b", &"a".repeat(64), "é"] {
            assert!(AltName::parse(bad).is_err(), "{bad:?} accepted");
        }
    }
}
