//! Trust on first use: which CA `poolctl` believes when no `--ca` is given, as ssh does
//! with host keys, and which member addresses it connects to at all (TLS only).
//!
//! Without a CA, poolctl first opens one TLS connection to the first member that answers
//! and sends nothing over it ([`probe`]). A member presents its certificate followed by the
//! pool's CA (`pool_trust::tls::server_chain_pem`); the handshake is accepted only if a CA
//! it sent is a self-signed CA certificate of the pool named in the member's certificate,
//! and the member's certificate is valid, signed by that CA (rustls/webpki, that CA as the
//! only root), names `coordinators.<pool>.pool.internal` and is a member's. The pool's id
//! comes from that certificate, so the user need not know it.
//!
//! The pool is then looked up in the known-pools file ([`known_pools_path`]), which may
//! pin several CAs for a pool (the two of a CA roll):
//! - unknown: its id and CA fingerprint are shown, and it is pinned if the user says so
//!   (asked on a terminal, or `--trust-new-pool` / `POOLCTL_TRUST_NEW_POOL=1`); refused
//!   otherwise, with the fingerprint and how to accept it;
//! - known, its CA pinned: used silently; pinned CAs the member no longer presents (the
//!   old CA of a finished roll) are dropped;
//! - known, another CA, but the member's certificate chains to a pinned CA through a
//!   cross certificate it presented (the new CA's name and key signed by the pinned CA:
//!   `poolctl pool-rotate-ca` under way): the new CA is pinned beside the old, and one line
//!   says so;
//! - known, another CA and no such proof: refused; nothing more is sent to that address.
//!
//! The normal client then trusts the pinned CAs only, exactly as with `--ca`: no token
//! crosses the network before the CA is settled, and only inside TLS checked against it.
//!
//! # The known-pools file
//! `$XDG_CONFIG_HOME/poolctl/known_pools` (or `~/.config/poolctl/known_pools`), 0600 in a
//! 0700 directory, rewritten atomically. One pinned CA per line, three fields separated by
//! spaces: the pool id, the CA's fingerprint (`sha256:` and 64 hex digits, SHA-256 of the
//! DER certificate) and the CA certificate itself, base64 of its DER bytes, inline; a
//! pool with several pinned CAs has several lines. Blank lines and lines starting with `#`
//! are kept as they are. A line whose fingerprint is not that of its certificate, whose
//! certificate is not a CA of that pool, the same CA twice, or more CAs for a pool than a
//! bundle holds makes the whole file refused: poolctl does not guess which line was
//! meant. Removing a pool's lines makes poolctl ask again on the next contact.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use base64::Engine;
use pool_trust::ca::MAX_BUNDLE_CERTS;
use pool_trust::identity::URI_SCHEME;
use pool_trust::leaf::MAX_INTERMEDIATES;
use pool_trust::{CaBundle, CaCert, CertInfo, Fingerprint, Identity, PoolId, Role};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::AsyncWriteExt;

/// How long the first-contact probe may take per member (connect and handshake).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest CA certificate a known-pools line may carry (base64 text).
const MAX_CA_B64_LEN: usize = 16 * 1024;
const HEADER: &str = "# Pools poolctl trusts: pool id, CA fingerprint, CA certificate (base64 DER).\n\
                      # A pool may have several lines (the old and new CA of a roll).\n\
                      # Remove a pool's line to be asked again on the next contact.\n";

/// The member addresses poolctl may connect to: `host:port`, or `https://host:port`.
/// Any other scheme is refused: members serve the pool's API over TLS only, and poolctl
/// sends tokens nowhere else.
pub fn member_addresses(addrs: &[String]) -> anyhow::Result<Vec<String>> {
    addrs
        .iter()
        .map(|a| {
            let a = a.trim();
            let plain = match a.split_once("://") {
                None => a,
                Some(("https", rest)) => rest.trim_end_matches('/'),
                Some((scheme, _)) => bail!(
                    "member address {a:?}: poolctl talks to the pool over TLS only and never \
                     sends a token over {scheme}://; give host:port (members serve https)"
                ),
            };
            tonic::transport::Endpoint::from_shared(format!("https://{plain}"))
                .ok()
                .filter(|_| !plain.is_empty() && !plain.contains('/'))
                .with_context(|| format!("member address {a:?} is not host:port"))?;
            Ok(plain.to_owned())
        })
        .collect()
}

/// Where pinned pools are kept: `$XDG_CONFIG_HOME/poolctl/known_pools`, else
/// `~/.config/poolctl/known_pools`.
pub fn known_pools_path() -> anyhow::Result<PathBuf> {
    let absolute = |v: std::ffi::OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .and_then(absolute)
        .or_else(|| {
            std::env::var_os("HOME")
                .and_then(absolute)
                .map(|h| h.join(".config"))
        })
        .context(
            "neither XDG_CONFIG_HOME nor HOME is set, so poolctl has nowhere to pin the \
             pool's CA: pass --ca FILE",
        )?;
    Ok(base.join("poolctl").join("known_pools"))
}

/// A pinned CA of a pool (one line of the file).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pin {
    pub pool: PoolId,
    pub ca: CaCert,
}

impl Pin {
    fn line(&self) -> String {
        format!(
            "{} {} {}\n",
            self.pool,
            self.ca.fingerprint(),
            base64::engine::general_purpose::STANDARD.encode(self.ca.der())
        )
    }
}

/// The known-pools file as read: its text (kept, comments included) and its pins.
#[derive(Debug, Default)]
pub struct KnownPools {
    text: String,
    pins: Vec<Pin>,
}

impl KnownPools {
    /// Parses the file's text; anything but comments and well-formed, consistent pins
    /// is refused, naming the line.
    pub fn parse(text: &str) -> anyhow::Result<KnownPools> {
        let mut pins: Vec<Pin> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let pin = parse_line(line).with_context(|| format!("line {}", i + 1))?;
            if pins.iter().any(|p| p.ca == pin.ca) {
                bail!(
                    "line {}: CA {} of pool {} is listed twice",
                    i + 1,
                    pin.ca.fingerprint(),
                    pin.pool
                );
            }
            if pins.iter().filter(|p| p.pool == pin.pool).count() >= MAX_BUNDLE_CERTS {
                bail!(
                    "line {}: pool {} has more than {MAX_BUNDLE_CERTS} pinned CAs",
                    i + 1,
                    pin.pool
                );
            }
            pins.push(pin);
        }
        Ok(KnownPools {
            text: text.to_owned(),
            pins,
        })
    }

    /// Reads `path`; a missing file is an empty one. A file others may read or write is
    /// refused (someone could have planted a CA in it).
    pub fn load(path: &Path) -> anyhow::Result<KnownPools> {
        if !path.exists() {
            return Ok(KnownPools::default());
        }
        let bytes = pool_trust::files::read_private(path)
            .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
            .context("reading the pools poolctl trusts")?;
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("{} is not UTF-8 text", path.display()))?;
        KnownPools::parse(&text).with_context(|| {
            format!(
                "{} is not a known-pools file (fix or remove the line)",
                path.display()
            )
        })
    }

    /// The CAs pinned for `pool`, in the file's order (none if it is unknown).
    pub fn pinned(&self, pool: &PoolId) -> Vec<CaCert> {
        self.pins
            .iter()
            .filter(|p| p.pool == *pool)
            .map(|p| p.ca.clone())
            .collect()
    }

    /// The file with `pool`'s pins replaced by `cas` (all of that pool), where its first
    /// line was or else at the end; other lines and comments stay as they are.
    pub fn replacing(&self, pool: &PoolId, cas: &[CaCert]) -> KnownPools {
        let lines: String = cas
            .iter()
            .map(|ca| {
                Pin {
                    pool: pool.clone(),
                    ca: ca.clone(),
                }
                .line()
            })
            .collect();
        let is_pool_line = |line: &str| {
            let line = line.trim();
            !line.starts_with('#')
                && line
                    .split_whitespace()
                    .next()
                    .is_some_and(|id| PoolId::parse(id).is_ok_and(|id| id == *pool))
        };
        let mut text = String::with_capacity(self.text.len() + lines.len());
        let mut placed = false;
        for line in self.text.split_inclusive('\n') {
            if !is_pool_line(line) {
                text.push_str(line);
            } else if !placed {
                text.push_str(&lines);
                placed = true;
            }
        }
        if !placed {
            if text.is_empty() {
                text.push_str(HEADER);
            }
            if !text.ends_with('\n') {
                text.push('\n');
            }
            text.push_str(&lines);
        }
        let mut pins: Vec<Pin> = self
            .pins
            .iter()
            .filter(|p| p.pool != *pool)
            .cloned()
            .collect();
        pins.extend(cas.iter().map(|ca| Pin {
            pool: pool.clone(),
            ca: ca.clone(),
        }));
        KnownPools { text, pins }
    }

    #[cfg(test)]
    fn text(&self) -> &str {
        &self.text
    }

    /// Writes the file 0600 in a 0700 directory, atomically.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        pool_trust::files::write_private(path, self.text.as_bytes())
            .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
            .with_context(|| format!("pinning the pool's CA in {}", path.display()))
    }
}

fn parse_line(line: &str) -> anyhow::Result<Pin> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    let [pool, fingerprint, b64] = fields[..] else {
        bail!(
            "expected 3 fields (pool id, fingerprint, CA certificate), found {}",
            fields.len()
        );
    };
    let pool = PoolId::parse(pool).map_err(|e| anyhow::anyhow!("pool id: {e}"))?;
    let fingerprint: Fingerprint = fingerprint.parse()?;
    if b64.len() > MAX_CA_B64_LEN {
        bail!("the CA certificate is longer than {MAX_CA_B64_LEN} characters");
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .context("the CA certificate is not base64")?;
    let ca = CaCert::from_der(der).map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))?;
    if ca.fingerprint() != fingerprint {
        bail!(
            "the fingerprint {fingerprint} is not the certificate's ({})",
            ca.fingerprint()
        );
    }
    if *ca.pool_id() != pool {
        bail!("the CA is of pool {}, not of pool {pool}", ca.pool_id());
    }
    Ok(Pin { pool, ca })
}

/// What a member presented on first contact: its pool, the CA that signed it, and the
/// certificates themselves.
#[derive(Clone, Debug)]
pub struct Presented {
    pub address: String,
    pub pool: PoolId,
    /// The self-signed CA of the pool, among those presented, that signed the member's
    /// certificate.
    pub ca: CaCert,
    /// The member's certificate, DER.
    pub leaf: Vec<u8>,
    /// Every certificate it sent after its own, DER, in order: its intermediates (a
    /// roll's cross certificate), then the pool's CAs.
    pub chain: Vec<Vec<u8>>,
}

/// Opens a TLS connection to the first member of `addrs` that answers and returns what
/// its certificate chain proves (see the module doc). Sends no request; a member whose
/// chain does not hold is refused at once rather than skipped.
pub async fn probe(addrs: &[String]) -> anyhow::Result<Presented> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut unreachable = Vec::new();
    for address in addrs {
        let verifier = Arc::new(FirstContact {
            provider: provider.clone(),
            verdict: Mutex::new(None),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        let handshake = async {
            let tcp = tokio::net::TcpStream::connect(address).await?;
            let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
                .connect(server_name(address), tcp)
                .await?;
            // close_notify: this connection carried nothing and never will.
            let _ = tls.shutdown().await;
            Ok::<_, std::io::Error>(())
        };
        let outcome = tokio::time::timeout(PROBE_TIMEOUT, handshake).await;
        let verdict = verifier.verdict.lock().expect("verdict lock").take();
        match (outcome, verdict) {
            (Ok(Ok(())), Some(Ok(met))) => {
                return Ok(Presented {
                    address: address.clone(),
                    ..met
                });
            }
            (_, Some(Err(reason))) => bail!(
                "member {address}: refusing its certificate: {reason}\nhint: poolctl pins a \
                 pool's CA only if the member's certificate is signed by the CA it presents; \
                 check --pool, or pass the pool's CA bundle with --ca FILE"
            ),
            (Ok(Err(e)), _) => unreachable.push(format!("{address}: {e}")),
            (Err(_), _) => unreachable.push(format!("{address}: no TLS handshake within 5 s")),
            (Ok(Ok(())), None) => unreachable.push(format!("{address}: no certificate")),
        }
    }
    bail!(
        "no coordinator answered to show its certificate ({}); is the pool running and \
         --pool right?",
        unreachable.join("; ")
    )
}

/// The name sent in SNI: the host of `host:port` when it is a DNS name. The verifier
/// ignores it: the certificate must name the coordinators of its own pool instead.
fn server_name(address: &str) -> ServerName<'static> {
    let host = address
        .rsplit_once(':')
        .map_or(address, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    if let Ok(ip) = host.parse::<std::net::IpAddr>() {
        return ServerName::IpAddress(ip.into());
    }
    ServerName::try_from(host.to_owned())
        .unwrap_or_else(|_| ServerName::try_from("pool.internal").expect("a valid DNS name"))
}

/// The verifier of the first-contact probe: accepts a chain only as the module doc says,
/// and leaves what it found (or why it refused) for [`probe`].
#[derive(Debug)]
struct FirstContact {
    provider: Arc<CryptoProvider>,
    verdict: Mutex<Option<Result<Presented, String>>>,
}

impl FirstContact {
    /// What the member presented, its address left empty for [`probe`] to fill.
    fn check(
        &self,
        leaf: &CertificateDer<'_>,
        presented: &[CertificateDer<'_>],
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<Presented, String> {
        let info = CertInfo::parse(leaf).map_err(|e| proto::error_chain(&e))?;
        let pool = pool_of(&info)?;
        let identity =
            Identity::from_cert_info(&info, &pool).map_err(|e| proto::error_chain(&e))?;
        if identity.role() != Role::Member {
            return Err(format!(
                "it is {identity} of pool {pool}, not a coordinator member"
            ));
        }
        if presented.is_empty() {
            return Err(
                "it sent no CA certificate with its own (a member older than this \
                        poolctl?), so there is nothing to pin"
                    .into(),
            );
        }
        // Mid-roll a member sends its cross certificate, then the old and the new CA.
        let most = MAX_BUNDLE_CERTS + MAX_INTERMEDIATES;
        if presented.len() > most {
            return Err(format!(
                "it sent {} certificates after its own, more than a pool's CAs and \
                 intermediates ({most})",
                presented.len()
            ));
        }
        let name = ServerName::try_from(pool_trust::coordinators_name(&pool))
            .map_err(|e| format!("pool id {pool} makes no DNS name: {e}"))?;
        let mut why = Vec::new();
        for der in presented {
            match self.signed_by(leaf, der, &pool, &name, ocsp, now) {
                Ok(ca) => {
                    return Ok(Presented {
                        address: String::new(),
                        pool,
                        ca,
                        leaf: leaf.to_vec(),
                        chain: presented.iter().map(|c| c.to_vec()).collect(),
                    });
                }
                Err(e) => why.push(e),
            }
        }
        Err(format!(
            "no CA it sent signs it as a member of pool {pool}: {}",
            why.join("; ")
        ))
    }

    /// `ca_der` if it is a self-signed CA of `pool` that signed `leaf` for `name`.
    fn signed_by(
        &self,
        leaf: &CertificateDer<'_>,
        ca_der: &CertificateDer<'_>,
        pool: &PoolId,
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<CaCert, String> {
        let fingerprint = Fingerprint::of_der(ca_der);
        let ca = CaCert::from_der(ca_der.to_vec())
            .map_err(|e| format!("{fingerprint}: {}", proto::error_chain(&e)))?;
        if ca.pool_id() != pool {
            return Err(format!("{fingerprint} is a CA of pool {}", ca.pool_id()));
        }
        self_signed(ca_der).map_err(|e| format!("{fingerprint}: {e}"))?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca_der.clone().into_owned())
            .map_err(|e| format!("{fingerprint}: {e}"))?;
        let verifier =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| format!("{fingerprint}: {e}"))?;
        verifier
            .verify_server_cert(leaf, &[], name, ocsp, now)
            .map_err(|e| format!("{fingerprint}: {e}"))?;
        Ok(ca)
    }
}

/// The pool a member's certificate names in its `pool://<pool-id>/...` URI.
fn pool_of(info: &CertInfo) -> Result<PoolId, String> {
    let mut pools = info.uris.iter().filter_map(|u| {
        u.strip_prefix(URI_SCHEME)
            .and_then(|rest| rest.split_once('/'))
            .map(|(pool, _)| pool)
    });
    match (pools.next(), pools.next()) {
        (Some(pool), None) => {
            PoolId::parse(pool).map_err(|e| format!("its pool:// name: {}", proto::error_chain(&e)))
        }
        (None, _) => Err("it names no pool (no pool:// URI): not a pool member".into()),
        (Some(_), Some(_)) => Err("it names several pool:// identities".into()),
    }
}

/// Whether a certificate's signature verifies under its own key (x509-parser with ring).
fn self_signed(der: &[u8]) -> Result<(), String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
        .map_err(|e| format!("unreadable: {e}"))?;
    cert.verify_signature(None)
        .map_err(|e| format!("not self-signed ({e})"))
}

impl ServerCertVerifier for FirstContact {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.check(end_entity, intermediates, ocsp_response, now);
        let result = match &verdict {
            Ok(_) => Ok(ServerCertVerified::assertion()),
            Err(reason) => Err(rustls::Error::General(reason.clone())),
        };
        *self.verdict.lock().expect("verdict lock") = Some(verdict);
        result
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// How poolctl may accept a pool it has not met.
#[derive(Clone, Copy, Debug)]
pub struct FirstUse {
    /// `--trust-new-pool` / `POOLCTL_TRUST_NEW_POOL=1`.
    pub trust_new_pool: bool,
}

/// The CAs to trust for the pool `met` belongs to (see the module doc): the pinned ones
/// as the member's presentation updates them, or `met.ca` once pinned with consent. A
/// changed CA without a cross certificate from a pinned one is refused. The file is
/// rewritten only when the pins change.
pub fn settle(met: &Presented, path: &Path, first_use: FirstUse) -> anyhow::Result<CaBundle> {
    let known = KnownPools::load(path)?;
    let now = met.ca.fingerprint();
    let pinned = known.pinned(&met.pool);
    if pinned.is_empty() {
        return first_contact(met, path, first_use, &known);
    }
    let presented: Vec<Fingerprint> = met.chain.iter().map(|d| Fingerprint::of_der(d)).collect();
    // A CA the pool no longer presents (the old one of a finished roll) is dropped.
    let mut pins: Vec<CaCert> = pinned
        .iter()
        .filter(|ca| presented.contains(&ca.fingerprint()))
        .cloned()
        .collect();
    if !pinned.iter().any(|ca| ca.fingerprint() == now) {
        let Some(from) = pinned.iter().find(|ca| rolled_from(met, ca)) else {
            bail!(
                "the pool's CA changed: pinned {} now {now} (pool {}, member {}), and the member \
                 presents no cross certificate from a pinned CA; poolctl sent nothing to it. \
                 If the CA was rolled on purpose, remove the lines for pool {} from {} or pass \
                 --ca FILE",
                fingerprints(&pinned),
                met.pool,
                met.address,
                met.pool,
                path.display()
            );
        };
        pins.push(met.ca.clone());
        let kept = if pins.iter().any(|ca| ca == from) {
            "both are now pinned"
        } else {
            "the new one is now pinned, the old one, no longer presented, is dropped"
        };
        eprintln!(
            "pool {} rolled its CA from pinned {} to {now} (signed by the pinned CA); {kept} in {}",
            met.pool,
            from.fingerprint(),
            path.display()
        );
    }
    if pins != pinned {
        known.replacing(&met.pool, &pins).save(path)?;
    }
    bundle(pins)
}

/// A pool met for the first time: its CA pinned with the user's consent.
fn first_contact(
    met: &Presented,
    path: &Path,
    first_use: FirstUse,
    known: &KnownPools,
) -> anyhow::Result<CaBundle> {
    let now = met.ca.fingerprint();
    eprintln!(
        "poolctl has not met pool {} before (member {}).\nIts CA fingerprint is {now}",
        met.pool, met.address
    );
    if !first_use.trust_new_pool {
        if !std::io::stdin().is_terminal() {
            bail!(
                "not trusting pool {} (CA {now}) without being told to: compare the \
                 fingerprint with the one `poolctl pki-init` printed where the pool was \
                 founded, then pass --trust-new-pool (or POOLCTL_TRUST_NEW_POOL=1) to pin it \
                 in {}, or give the pool's CA bundle with --ca FILE",
                met.pool,
                path.display()
            );
        }
        eprint!("trust this pool? [y/N] ");
        std::io::stderr().flush()?;
        let mut answer = String::new();
        std::io::stdin().lock().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes") {
            bail!(
                "not trusting pool {} (CA {now}); nothing was sent to it",
                met.pool
            );
        }
    }
    let pins = vec![met.ca.clone()];
    known.replacing(&met.pool, &pins).save(path)?;
    eprintln!("pinned pool {} (CA {now}) in {}", met.pool, path.display());
    bundle(pins)
}

/// Whether the member's certificate, signed by the CA it presented (`met.ca`, not
/// pinned), also chains to the pinned CA `pinned` through a cross certificate it
/// presented: `met.ca`'s name and key, a CA certificate signed by `pinned`. That is what
/// a CA roll of the pool sends, and what nobody without the pinned CA's key can make.
fn rolled_from(met: &Presented, pinned: &CaCert) -> bool {
    let Ok(name) = ServerName::try_from(pool_trust::coordinators_name(&met.pool)) else {
        return false;
    };
    let mut roots = RootCertStore::empty();
    if roots
        .add(CertificateDer::from(pinned.der().to_vec()))
        .is_err()
    {
        return false;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) =
        WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider).build()
    else {
        return false;
    };
    let new = met.ca.info();
    let leaf = CertificateDer::from(met.leaf.as_slice());
    met.chain
        .iter()
        .filter_map(|der| CaCert::from_der(der.clone()).ok())
        .filter(|x| {
            x.fingerprint() != met.ca.fingerprint()
                && x.pool_id() == &met.pool
                && x.info().subject == new.subject
                && x.info().public_key == new.public_key
        })
        .any(|x| {
            let cross = [CertificateDer::from(x.der())];
            verifier
                .verify_server_cert(&leaf, &cross, &name, &[], UnixTime::now())
                .is_ok()
        })
}

fn fingerprints(cas: &[CaCert]) -> String {
    cas.iter()
        .map(|ca| ca.fingerprint().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

fn bundle(cas: Vec<CaCert>) -> anyhow::Result<CaBundle> {
    CaBundle::new(cas).map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pool_trust::{PoolCa, Validity};

    fn validity() -> Validity {
        Validity::starting(proto::unix_ms(), Duration::from_secs(3600))
    }

    fn ca(pool: &PoolId) -> PoolCa {
        PoolCa::create(pool.clone(), validity()).unwrap()
    }

    #[test]
    fn pins_round_trip_and_comments_are_kept() {
        let (p1, p2) = (PoolId::generate(), PoolId::generate());
        let (a, b) = (ca(&p1), ca(&p2));
        let a2 = a.roll(validity()).unwrap();
        let known = KnownPools::parse("# mine\n\n").unwrap();
        let known = known.replacing(&p1, std::slice::from_ref(a.cert()));
        let known = known.replacing(&p2, std::slice::from_ref(b.cert()));
        assert!(known.text().starts_with("# mine\n"));
        assert!(known.text().contains(&a.cert().fingerprint().to_string()));
        let again = KnownPools::parse(known.text()).unwrap();
        assert_eq!(again.pinned(&p1), [a.cert().clone()]);
        assert_eq!(again.pinned(&p2), [b.cert().clone()]);
        assert!(again.pinned(&PoolId::generate()).is_empty());

        // Two CAs for p1, in place of its line: p2's line stays after them.
        let both = again.replacing(&p1, &[a.cert().clone(), a2.cert().clone()]);
        let lines: Vec<&str> = both.text().lines().collect();
        assert_eq!(lines.len(), 5, "{}", both.text());
        assert!(lines[2].contains(&a.cert().fingerprint().to_string()));
        assert!(lines[3].contains(&a2.cert().fingerprint().to_string()));
        assert!(lines[4].starts_with(&p2.to_string()));
        let again = KnownPools::parse(both.text()).unwrap();
        assert_eq!(again.pinned(&p1), [a.cert().clone(), a2.cert().clone()]);
        assert_eq!(again.pinned(&p2), [b.cert().clone()]);
        // And back to one.
        let one = again.replacing(&p1, std::slice::from_ref(a2.cert()));
        assert_eq!(
            KnownPools::parse(one.text()).unwrap().pinned(&p1),
            [a2.cert().clone()]
        );
        assert_eq!(one.text().lines().count(), 4);

        let fresh = KnownPools::default().replacing(&p1, std::slice::from_ref(a.cert()));
        assert!(fresh.text().starts_with("# Pools poolctl trusts"));
        assert_eq!(KnownPools::parse(fresh.text()).unwrap().pins.len(), 1);
    }

    #[test]
    fn garbage_and_inconsistent_lines_are_refused() {
        let (p1, p2) = (PoolId::generate(), PoolId::generate());
        let (a, b) = (ca(&p1), ca(&p2));
        let good = Pin {
            pool: p1.clone(),
            ca: a.cert().clone(),
        }
        .line();
        let b64 = |c: &PoolCa| base64::engine::general_purpose::STANDARD.encode(c.cert().der());
        let cases = [
            ("hello".to_owned(), "expected 3 fields"),
            (format!("{} extra", good.trim()), "found 4"),
            (format!("{p1} sha256:00 {}", b64(&a)), "not a fingerprint"),
            (
                format!("{p1} {} !!notbase64", a.cert().fingerprint()),
                "not base64",
            ),
            (
                format!("{p1} {} {}", b.cert().fingerprint(), b64(&a)),
                "is not the certificate's",
            ),
            (
                format!("{p1} {} {}", b.cert().fingerprint(), b64(&b)),
                "not of pool",
            ),
            (
                format!("bad/pool {} {}", a.cert().fingerprint(), b64(&a)),
                "pool id",
            ),
            (format!("{good}{good}"), "listed twice"),
            (
                [
                    &a,
                    &a.roll(validity()).unwrap(),
                    &a.roll(validity()).unwrap(),
                    &a.roll(validity()).unwrap(),
                    &a.roll(validity()).unwrap(),
                ]
                .iter()
                .map(|c| {
                    Pin {
                        pool: p1.clone(),
                        ca: c.cert().clone(),
                    }
                    .line()
                })
                .collect::<String>(),
                "more than 4 pinned CAs",
            ),
            (
                format!(
                    "{p1} {} {}",
                    a.cert().fingerprint(),
                    "A".repeat(MAX_CA_B64_LEN + 4)
                ),
                "longer than",
            ),
        ];
        for (text, says) in cases {
            let err = format!("{:#}", KnownPools::parse(&text).unwrap_err());
            assert!(err.contains(says), "{text:?}: wanted {says:?} in {err}");
        }
        // A leaf certificate is not a CA to pin.
        let v = Validity::starting(proto::unix_ms(), Duration::from_secs(3600));
        let leaf = a.issue(&Identity::Member(1), &[], v).unwrap();
        let text = format!(
            "{p1} {} {}",
            Fingerprint::of_der(leaf.cert_der()),
            base64::engine::general_purpose::STANDARD.encode(leaf.cert_der())
        );
        assert!(KnownPools::parse(&text).is_err());
    }

    #[test]
    fn only_tls_member_addresses_are_taken() {
        let ok = member_addresses(&[
            "127.0.0.1:7101".into(),
            " https://pool.example:7101/ ".into(),
            "[::1]:7101".into(),
        ])
        .unwrap();
        assert_eq!(ok, ["127.0.0.1:7101", "pool.example:7101", "[::1]:7101"]);
        for (bad, says) in [
            ("http://127.0.0.1:7101", "TLS only"),
            ("grpc://127.0.0.1:7101", "TLS only"),
            ("127.0.0.1:7101/path", "not host:port"),
            ("", "not host:port"),
        ] {
            let err = format!("{:#}", member_addresses(&[bad.to_owned()]).unwrap_err());
            assert!(err.contains(says), "{bad:?}: wanted {says:?} in {err}");
        }
    }

    #[test]
    fn the_pool_comes_from_the_member_certificate() {
        let pool = PoolId::generate();
        let v = Validity::starting(proto::unix_ms(), Duration::from_secs(3600));
        let creds = ca(&pool).issue(&Identity::Member(2), &[], v).unwrap();
        assert_eq!(pool_of(creds.info()).unwrap(), pool);
        let mut none = creds.info().clone();
        none.uris.clear();
        assert!(pool_of(&none).unwrap_err().contains("names no pool"));
    }

    /// A member of `ca` with `intermediates` after its certificate.
    fn member(ca: &PoolCa, n: u64, intermediates: &[CaCert]) -> pool_trust::Credentials {
        ca.issue(&Identity::Member(n), &[], validity())
            .unwrap()
            .with_intermediates(intermediates)
            .unwrap()
    }

    /// What the probe makes of a member presenting `creds` (its certificate and
    /// intermediates), then the CAs `cas`.
    fn met(creds: &pool_trust::Credentials, cas: &[&CaCert]) -> Presented {
        let chain: Vec<CertificateDer<'static>> = creds.chain_der()[1..]
            .iter()
            .copied()
            .chain(cas.iter().map(|c| c.der()))
            .map(|d| CertificateDer::from(d.to_vec()))
            .collect();
        let probe = FirstContact {
            provider: Arc::new(rustls::crypto::ring::default_provider()),
            verdict: Mutex::new(None),
        };
        let leaf = CertificateDer::from(creds.cert_der());
        let mut met = probe.check(&leaf, &chain, &[], UnixTime::now()).unwrap();
        met.address = "127.0.0.1:7101".into();
        met
    }

    fn fps(cas: &[CaCert]) -> Vec<Fingerprint> {
        cas.iter().map(CaCert::fingerprint).collect()
    }

    /// Settles `met` against the file at `path`: the fingerprints of the bundle returned.
    fn settled(met: &Presented, path: &Path) -> anyhow::Result<Vec<Fingerprint>> {
        let first_use = FirstUse {
            trust_new_pool: true,
        };
        settle(met, path, first_use).map(|b| fps(b.certs()))
    }

    fn pinned(path: &Path, pool: &PoolId) -> Vec<Fingerprint> {
        fps(&KnownPools::load(path).unwrap().pinned(pool))
    }

    #[test]
    fn a_roll_is_followed_through_its_cross_certificate_and_its_end_drops_the_old_ca() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("poolctl").join("known_pools");
        let pool = PoolId::generate();
        let a = ca(&pool);
        let fa = a.cert().fingerprint();
        let text = || std::fs::read_to_string(&path).unwrap();

        // First contact pins A; meeting it again changes nothing.
        let before_roll = met(&member(&a, 1, &[]), &[a.cert()]);
        assert_eq!(settled(&before_roll, &path).unwrap(), [fa]);
        assert_eq!(pinned(&path, &pool), [fa]);
        let first = text();
        assert_eq!(settled(&before_roll, &path).unwrap(), [fa]);
        assert_eq!(text(), first);

        // The roll starts: the bundle is {A, B}. A member not yet renewed presents
        // [A, B]: B is not proven by anything yet, so only A stays pinned.
        let b = a.roll(validity()).unwrap();
        let fb = b.cert().fingerprint();
        let x = a.cross_sign(&b).unwrap();
        let not_renewed = met(&member(&a, 1, &[]), &[a.cert(), b.cert()]);
        assert_eq!(settled(&not_renewed, &path).unwrap(), [fa]);
        assert_eq!(text(), first);

        // A renewed member presents its B certificate, X, then A and B: X proves the roll.
        let renewed = met(
            &member(&b, 2, std::slice::from_ref(&x)),
            &[a.cert(), b.cert()],
        );
        assert_eq!(renewed.ca, *b.cert(), "the CA that signs the leaf directly");
        assert_eq!(settled(&renewed, &path).unwrap(), [fa, fb]);
        assert_eq!(pinned(&path, &pool), [fa, fb]);
        let rolling = text();
        assert_eq!(
            rolling
                .lines()
                .filter(|l| l.starts_with(&pool.to_string()))
                .count(),
            2
        );
        // Both kinds of member are accepted now, and nothing is rewritten.
        assert_eq!(settled(&renewed, &path).unwrap(), [fa, fb]);
        assert_eq!(settled(&not_renewed, &path).unwrap(), [fa, fb]);
        assert_eq!(text(), rolling);

        // The roll finishes: members present B only; A is dropped.
        let after_roll = met(&member(&b, 3, &[]), &[b.cert()]);
        assert_eq!(settled(&after_roll, &path).unwrap(), [fb]);
        assert_eq!(pinned(&path, &pool), [fb]);
        // A member left on A is refused from now on.
        let stale = met(&member(&a, 1, &[]), &[a.cert()]);
        let err = format!("{:#}", settled(&stale, &path).unwrap_err());
        assert!(err.contains("the pool's CA changed"), "{err}");
        assert_eq!(pinned(&path, &pool), [fb]);
    }

    #[test]
    fn a_changed_ca_without_a_cross_certificate_from_a_pinned_ca_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("poolctl").join("known_pools");
        let pool = PoolId::generate();
        let a = ca(&pool);
        let first = met(&member(&a, 1, &[]), &[a.cert()]);
        settled(&first, &path).unwrap();
        let pinned_text = std::fs::read_to_string(&path).unwrap();
        let b = a.roll(validity()).unwrap();
        let x = a.cross_sign(&b).unwrap();
        let impostor = ca(&pool);

        let cases = [
            // A roll without X: B's leaf next to A and B.
            (
                "roll without X",
                met(&member(&b, 2, &[]), &[a.cert(), b.cert()]),
            ),
            // An attacker's own CA for the pool, with A's certificate next to its leaf...
            (
                "attacker with A",
                met(&member(&impostor, 1, &[]), &[a.cert(), impostor.cert()]),
            ),
            // ...and with the real (public) X as well: X carries B's key, not the attacker's.
            (
                "attacker with the real X",
                met(&member(&impostor, 1, &[]), &[&x, a.cert(), impostor.cert()]),
            ),
            // B's name and key cross-signed by a CA that was never pinned.
            (
                "cross certificate of another CA",
                met(
                    &member(&b, 2, &[impostor.cross_sign(&b).unwrap()]),
                    &[a.cert(), b.cert()],
                ),
            ),
        ];
        for (what, met) in cases {
            let err = format!("{:#}", settled(&met, &path).unwrap_err());
            assert!(err.contains("the pool's CA changed"), "{what}: {err}");
            assert!(
                err.contains(&a.cert().fingerprint().to_string()),
                "{what}: {err}"
            );
            assert_eq!(
                std::fs::read_to_string(&path).unwrap(),
                pinned_text,
                "{what}"
            );
        }
        // The real roll still goes through afterwards.
        let renewed = met(
            &member(&b, 2, std::slice::from_ref(&x)),
            &[a.cert(), b.cert()],
        );
        assert_eq!(
            settled(&renewed, &path).unwrap(),
            [a.cert().fingerprint(), b.cert().fingerprint()]
        );
    }
}
