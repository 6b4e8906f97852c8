//! Rolling the pool's CA without downtime: the cross certificate.
//!
//! A roll makes a new CA B ([`PoolCa::roll`]) and has the current CA A sign B's name and
//! key ([`PoolCa::cross_sign`]): the cross certificate X. From then on every leaf is
//! signed by B and carries X after it in its chain ([`crate::leaf::chain_pem`]), and the
//! bundle daemons trust is {A, B}. A peer still trusting A alone accepts a B-signed leaf
//! by the path leaf → X → A; a peer already holding {A, B} finds B directly. When every
//! daemon holds a B-signed certificate, the bundle becomes {B} and new leaves drop X.
//!
//! X names B's subject exactly (webpki matches issuer to subject byte for byte), holds
//! B's key, is a CA of the same pool, and is valid only while both A and B are.

use rcgen::string::PrintableString;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, IsCa, KeyUsagePurpose,
    SanType,
};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ca::{CaCert, CaError, PoolCa, Validity, ia5, random_serial, rcgen_err};
use crate::identity::URI_SCHEME;

impl PoolCa {
    /// The cross certificate of a roll from this CA to `next` (same pool): `next`'s
    /// subject, name and public key, a CA, signed by this CA, valid where both CAs are.
    /// Returned as a [`CaCert`] (its [`CaCert::pem`] is what goes after each new leaf).
    /// Neither CA's key leaves its [`PoolCa`].
    pub fn cross_sign(&self, next: &PoolCa) -> Result<CaCert, CaError> {
        let (mine, theirs) = (&self.cert, &next.cert);
        if theirs.pool_id() != mine.pool_id() {
            return Err(CaError::MixedPools {
                fingerprint: theirs.fingerprint(),
                expected: mine.pool_id().clone(),
                found: theirs.pool_id().clone(),
            });
        }
        if theirs.fingerprint() == mine.fingerprint() {
            return Err(CaError::CrossSignSelf {
                fingerprint: mine.fingerprint(),
            });
        }
        let validity = Validity {
            not_before_ms: mine.info().not_before_ms.max(theirs.info().not_before_ms),
            not_after_ms: mine.info().not_after_ms.min(theirs.info().not_after_ms),
        };
        let mut params = CertificateParams::default();
        params.distinguished_name = subject_of(theirs.der())?;
        params.subject_alt_names = vec![SanType::URI(ia5(&format!(
            "{URI_SCHEME}{}/ca",
            theirs.pool_id()
        ))?)];
        // As the CA itself: it signs leaves only, never another CA.
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        validity.apply(&mut params)?;
        let cert = params
            .signed_by(next.issuer.key(), &self.issuer)
            .map_err(rcgen_err("cross-sign the next CA"))?;
        let cross = CaCert::from_der(cert.der().to_vec())?;
        if cross.info().subject != theirs.info().subject
            || cross.info().public_key != theirs.info().public_key
            || cross.info().issuer != mine.info().subject
        {
            return Err(CaError::CrossMismatch {
                fingerprint: theirs.fingerprint(),
            });
        }
        Ok(cross)
    }
}

/// A certificate's subject as rcgen writes it back: one attribute per RDN, UTF-8 or
/// printable strings (what rcgen itself writes). Anything else is refused rather than
/// re-encoded into a name that would not match.
fn subject_of(der: &[u8]) -> Result<DistinguishedName, CaError> {
    let unreadable =
        || rcgen_err("read the next CA's name")(rcgen::Error::CouldNotParseCertificate);
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| unreadable())?;
    let mut dn = DistinguishedName::new();
    for rdn in cert.subject().iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(unreadable());
        };
        let oid: Vec<u64> = attr.attr_type().iter().ok_or_else(unreadable)?.collect();
        let value = attr.attr_value();
        let text = std::str::from_utf8(value.data).map_err(|_| unreadable())?;
        let value = match value.header.tag() {
            x509_parser::der_parser::asn1_rs::Tag::Utf8String => DnValue::Utf8String(text.into()),
            x509_parser::der_parser::asn1_rs::Tag::PrintableString => {
                DnValue::PrintableString(PrintableString::try_from(text).map_err(|_| unreadable())?)
            }
            _ => return Err(unreadable()),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cert::CertInfo;
    use crate::identity::PoolId;

    const NOW: u64 = 1_800_000_000_000;
    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    #[test]
    fn a_cross_certificate_is_the_next_cas_name_and_key_signed_by_the_current_one() {
        let a = PoolCa::create(PoolId::generate(), Validity::starting(NOW, 365 * DAY)).unwrap();
        let later = NOW + 10 * DAY.as_millis() as u64;
        let b = a.roll(Validity::starting(later, 3650 * DAY)).unwrap();
        let x = a.cross_sign(&b).unwrap();
        let (xi, ai, bi) = (x.info(), a.cert().info(), b.cert().info());
        assert!(xi.is_ca);
        assert_eq!(x.pool_id(), a.pool_id());
        assert_eq!(xi.subject, bi.subject);
        assert_eq!(xi.public_key, bi.public_key);
        assert_eq!(xi.issuer, ai.subject);
        assert_ne!(xi.issuer, bi.subject);
        assert_eq!(xi.uris, bi.uris);
        // Within both CAs' validity: from B's start to A's end.
        assert_eq!(xi.not_before_ms, bi.not_before_ms);
        assert_eq!(xi.not_after_ms, ai.not_after_ms);
        assert_ne!(x.fingerprint(), b.cert().fingerprint());
        // Signed by A's key: x509-parser verifies it under A's public key, not B's.
        fn parse(der: &[u8]) -> X509Certificate<'_> {
            X509Certificate::from_der(der).unwrap().1
        }
        let (xc, ac, bc) = (parse(x.der()), parse(a.cert().der()), parse(b.cert().der()));
        assert!(xc.verify_signature(Some(ac.public_key())).is_ok());
        assert!(xc.verify_signature(Some(bc.public_key())).is_err());
        assert!(CertInfo::parse(x.der()).is_ok());
    }

    #[test]
    fn cross_signing_needs_another_ca_of_the_same_pool_with_overlapping_validity() {
        let a = PoolCa::create(PoolId::generate(), Validity::starting(NOW, DAY)).unwrap();
        assert!(matches!(
            a.cross_sign(&a),
            Err(CaError::CrossSignSelf { .. })
        ));
        let stranger = PoolCa::create(PoolId::generate(), Validity::starting(NOW, DAY)).unwrap();
        assert!(matches!(
            a.cross_sign(&stranger),
            Err(CaError::MixedPools { .. })
        ));
        // B starts after A has ended: no moment where X could be valid.
        let b = a
            .roll(Validity::starting(NOW + 2 * DAY.as_millis() as u64, DAY))
            .unwrap();
        assert!(matches!(
            a.cross_sign(&b),
            Err(CaError::EmptyValidity { .. })
        ));
    }
}
