//! Reading a certificate: the few fields the pool acts on, parsed once from DER (x509-parser)
//! into a typed [`CertInfo`], and the SHA-256 [`Fingerprint`] people compare and pin.
//!
//! Nothing here checks a signature or a date against the clock: rustls does that for a
//! peer during the handshake, and the CA for what it signs. This module only reads.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use sha2::{Digest, Sha256};
use x509_parser::error::X509Error;
use x509_parser::extensions::GeneralName;
use x509_parser::nom;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Errors reading a certificate.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// The bytes are not a DER X.509 certificate.
    #[error("not a DER X.509 certificate")]
    Parse {
        #[source]
        source: X509Error,
    },
    /// A certificate was followed by more bytes.
    #[error("{trailing} bytes follow the certificate")]
    Trailing { trailing: usize },
    /// The subject alternative names extension is malformed or repeated.
    #[error("unreadable subject alternative names")]
    SubjectAltNames {
        #[source]
        source: X509Error,
    },
    /// The basic constraints extension is malformed or repeated.
    #[error("unreadable basic constraints")]
    BasicConstraints {
        #[source]
        source: X509Error,
    },
    /// An IP address SAN that is neither 4 nor 16 bytes long.
    #[error("an IP address name of {len} bytes")]
    IpLength { len: usize },
    /// PEM text that does not decode.
    #[error("malformed PEM")]
    Pem {
        #[source]
        source: pem::PemError,
    },
    /// A PEM block that is not a certificate.
    #[error("a PEM block labelled {label:?} where a CERTIFICATE was expected")]
    PemLabel { label: String },
    /// PEM text without a single certificate.
    #[error("no certificate in the PEM text")]
    NoCertificate,
}

/// The SHA-256 digest of a certificate's DER bytes, shown as `sha256:` and 64 lowercase hex
/// digits: what `poolctl` shows and pins on first contact, as ssh does with host keys.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER certificate.
    pub fn of_der(der: &[u8]) -> Fingerprint {
        Fingerprint(Sha256::digest(der).into())
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("sha256:")?;
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A string that is not a fingerprint as [`Fingerprint`]'s `Display` writes it.
#[derive(Debug, thiserror::Error)]
#[error("not a fingerprint (expected sha256: and 64 hex digits): {input:?}")]
pub struct FingerprintParseError {
    pub input: String,
}

impl FromStr for Fingerprint {
    type Err = FingerprintParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || FingerprintParseError {
            input: s.chars().take(80).collect(),
        };
        let hex = s.strip_prefix("sha256:").ok_or_else(err)?;
        let bytes = crate::hex::decode::<32>(hex).ok_or_else(err)?;
        Ok(Fingerprint(bytes))
    }
}

/// What the pool reads from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    /// URI subject alternative names, in the certificate's order.
    pub uris: Vec<String>,
    /// DNS subject alternative names.
    pub dns_names: Vec<String>,
    /// IP address subject alternative names.
    pub ips: Vec<IpAddr>,
    /// Start of validity, milliseconds since the Unix epoch (0 for earlier times).
    pub not_before_ms: u64,
    /// End of validity, milliseconds since the Unix epoch (0 for earlier times).
    pub not_after_ms: u64,
    /// Whether basic constraints mark it a CA.
    pub is_ca: bool,
    /// The subject public key's bits (for an EC key, the encoded point).
    pub public_key: Vec<u8>,
    /// SHA-256 of the whole DER certificate.
    pub fingerprint: Fingerprint,
    /// The subject's and the issuer's distinguished names, DER. A pool's CAs differ in
    /// name, so the issuer names which CA signed a leaf (a hint: rustls checks the
    /// signature).
    pub subject: Vec<u8>,
    pub issuer: Vec<u8>,
}

impl CertInfo {
    /// Parses one DER certificate; trailing bytes are refused.
    pub fn parse(der: &[u8]) -> Result<CertInfo, CertError> {
        let (rest, cert) = X509Certificate::from_der(der).map_err(|e| CertError::Parse {
            source: nom_error(e),
        })?;
        if !rest.is_empty() {
            return Err(CertError::Trailing {
                trailing: rest.len(),
            });
        }
        let mut info = CertInfo {
            uris: Vec::new(),
            dns_names: Vec::new(),
            ips: Vec::new(),
            not_before_ms: unix_ms(cert.validity().not_before.timestamp()),
            not_after_ms: unix_ms(cert.validity().not_after.timestamp()),
            is_ca: cert
                .basic_constraints()
                .map_err(|source| CertError::BasicConstraints { source })?
                .is_some_and(|bc| bc.value.ca),
            public_key: cert.public_key().subject_public_key.data.to_vec(),
            fingerprint: Fingerprint::of_der(der),
            subject: cert.subject().as_raw().to_vec(),
            issuer: cert.issuer().as_raw().to_vec(),
        };
        let san = cert
            .subject_alternative_name()
            .map_err(|source| CertError::SubjectAltNames { source })?;
        for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
            match name {
                GeneralName::URI(uri) => info.uris.push((*uri).to_owned()),
                GeneralName::DNSName(dns) => info.dns_names.push((*dns).to_owned()),
                GeneralName::IPAddress(bytes) => info.ips.push(ip_from_bytes(bytes)?),
                _ => {}
            }
        }
        Ok(info)
    }
}

/// The DER bytes of every CERTIFICATE block in PEM text, in order. Any other block, or
/// none at all, is an error.
pub fn certs_from_pem(text: &str) -> Result<Vec<Vec<u8>>, CertError> {
    let blocks = pem::parse_many(text).map_err(|source| CertError::Pem { source })?;
    if blocks.is_empty() {
        return Err(CertError::NoCertificate);
    }
    blocks
        .into_iter()
        .map(|b| {
            if b.tag() == "CERTIFICATE" {
                Ok(b.into_contents())
            } else {
                Err(CertError::PemLabel {
                    label: b.tag().chars().take(40).collect(),
                })
            }
        })
        .collect()
}

/// PEM text of one DER object with the given label, with Unix line endings.
pub(crate) fn to_pem(label: &str, der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new(label, der),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn nom_error(e: nom::Err<X509Error>) -> X509Error {
    match e {
        nom::Err::Error(e) | nom::Err::Failure(e) => e,
        nom::Err::Incomplete(_) => X509Error::InvalidCertificate,
    }
}

fn unix_ms(secs: i64) -> u64 {
    u64::try_from(secs).map_or(0, |s| s.saturating_mul(1000))
}

fn ip_from_bytes(bytes: &[u8]) -> Result<IpAddr, CertError> {
    match bytes.len() {
        4 => {
            let mut a = [0u8; 4];
            a.copy_from_slice(bytes);
            Ok(IpAddr::from(a))
        }
        16 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(bytes);
            Ok(IpAddr::from(a))
        }
        len => Err(CertError::IpLength { len }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_round_trips_through_text() {
        let fp = Fingerprint::of_der(b"not really a certificate");
        let text = fp.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
    }

    #[test]
    fn malformed_fingerprints_are_refused() {
        for bad in [
            "",
            "sha256:",
            "sha1:00",
            &format!("sha256:{}", "0".repeat(63)),
            &format!("sha256:{}", "g".repeat(64)),
            &format!("sha256:{}", "0".repeat(65)),
        ] {
            assert!(bad.parse::<Fingerprint>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn garbage_is_a_typed_error_not_a_panic() {
        for bad in [&b""[..], b"\x30", b"\x30\x03\x02\x01\x01", &[0xffu8; 64]] {
            assert!(matches!(CertInfo::parse(bad), Err(CertError::Parse { .. })));
        }
    }

    #[test]
    fn pem_without_certificates_is_refused() {
        assert!(matches!(certs_from_pem(""), Err(CertError::NoCertificate)));
        let key = to_pem("PRIVATE KEY", b"xx");
        assert!(matches!(
            certs_from_pem(&key),
            Err(CertError::PemLabel { .. })
        ));
        let two = format!(
            "{}{}",
            to_pem("CERTIFICATE", b"a"),
            to_pem("CERTIFICATE", b"b")
        );
        assert_eq!(
            certs_from_pem(&two).unwrap(),
            vec![b"a".to_vec(), b"b".to_vec()]
        );
    }
}
