//! TLS for the migration stream: both VM processes speak TLS 1.3 with their hosts' pool
//! certificates (rustls), so guest memory never crosses the network in clear and each
//! end knows which host the other is.
//!
//! The source checks that the destination's certificate names the host the coordinator
//! chose (its identity's DNS name as the server name); the destination requires a client
//! certificate of the pool and accepts the stream only from the source host it was
//! prepared for ([`peer_host`], checked with the Hello).

use std::path::Path;
use std::sync::Arc;

use pool_trust::{DaemonTls, Identity, PoolId};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("loading the host's TLS directory {dir}: {reason}")]
    Load { dir: String, reason: String },
    #[error("the host's TLS directory holds a {0:?} certificate; a VM process needs a host's")]
    NotAHost(Identity),
    #[error("the pool's CA bundle or the host's key")]
    Credentials(#[from] pool_trust::serve::ServeTlsError),
    #[error("building the TLS configuration")]
    Config(#[source] rustls::Error),
    #[error("building the client certificate check")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("{0:?} is not a host name a certificate can carry")]
    BadHost(String),
}

/// This host's side of migration streams, as source or destination.
#[derive(Clone)]
pub struct StreamTls {
    pool: PoolId,
    host: String,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

impl std::fmt::Debug for StreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamTls")
            .field("pool", &self.pool)
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl StreamTls {
    /// Reads a host's TLS directory (read when a migration starts, so a renewed
    /// certificate is used from the next migration on).
    pub fn load(dir: &Path) -> Result<StreamTls, TlsSetupError> {
        let tls = DaemonTls::load(dir).map_err(|e| TlsSetupError::Load {
            dir: dir.display().to_string(),
            reason: proto::error_chain(&e),
        })?;
        StreamTls::new(&tls)
    }

    pub fn new(tls: &DaemonTls) -> Result<StreamTls, TlsSetupError> {
        StreamTls::with_suites(tls, hardware_aes())
    }

    fn with_suites(tls: &DaemonTls, hardware_aes: bool) -> Result<StreamTls, TlsSetupError> {
        let Identity::Host(host) = tls.identity() else {
            return Err(TlsSetupError::NotAHost(tls.identity().clone()));
        };
        let provider = Arc::new(provider(hardware_aes));
        let roots = Arc::new(pool_trust::serve::root_store(&tls.bundle)?);
        // The leaf and, during a CA roll, the new CA cross-signed by the old: a host that
        // has not renewed yet still accepts this one.
        let cert = pool_trust::serve::cert_chain(&tls.creds);
        let key = pool_trust::serve::private_key(&tls.creds)?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.clone(),
            provider.clone(),
        )
        .build()
        .map_err(TlsSetupError::Verifier)?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsSetupError::Config)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(cert.clone(), key.clone_key())
            .map_err(TlsSetupError::Config)?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(TlsSetupError::Config)?
            .with_root_certificates(roots)
            .with_client_auth_cert(cert, key)
            .map_err(TlsSetupError::Config)?;
        Ok(StreamTls {
            pool: tls.pool_id().clone(),
            host: host.clone(),
            server: Arc::new(server),
            client: Arc::new(client),
        })
    }

    /// The host these credentials are of.
    pub fn host(&self) -> &str {
        &self.host
    }

    /// A client session that accepts only `destination_host`'s certificate.
    pub fn connect(&self, destination_host: &str) -> Result<ClientConnection, TlsSetupError> {
        let name = Identity::Host(destination_host.to_owned()).dns_name(&self.pool);
        let name = ServerName::try_from(name)
            .map_err(|_| TlsSetupError::BadHost(destination_host.to_owned()))?;
        ClientConnection::new(self.client.clone(), name).map_err(TlsSetupError::Config)
    }

    /// A server session requiring a client certificate of the pool.
    pub fn accept(&self) -> Result<ServerConnection, TlsSetupError> {
        ServerConnection::new(self.server.clone()).map_err(TlsSetupError::Config)
    }

    /// The host whose verified certificate the client of `conn` presented; `None` for
    /// any other identity (a member's, say) or before the handshake is done.
    pub fn peer_host(&self, conn: &ServerConnection) -> Option<String> {
        let leaf = conn.peer_certificates()?.first()?;
        match Identity::from_peer_cert(leaf, &self.pool).ok()? {
            Identity::Host(h) => Some(h),
            _ => None,
        }
    }
}

/// ring's TLS 1.3 suites, ChaCha20-Poly1305 first on a CPU without AES and carry-less
/// multiply instructions: AES-GCM in portable code is several times slower than ChaCha20,
/// and guest memory is the stream's whole load (an emulated CPU without them moved 2.5
/// MB/s). The source's order decides, as rustls servers follow the client's preference.
fn provider(hardware_aes: bool) -> rustls::crypto::CryptoProvider {
    let mut provider = rustls::crypto::ring::default_provider();
    if !hardware_aes {
        provider
            .cipher_suites
            .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256);
    }
    provider
}

/// Whether this CPU has AES and carry-less multiply instructions (ring uses both for
/// AES-GCM).
fn hardware_aes() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// Credentials of a fresh test pool for each of `hosts`, and one of another pool with
/// the same host names (a stranger).
#[cfg(test)]
pub(crate) fn test_hosts(hosts: &[&str]) -> (Vec<StreamTls>, Vec<StreamTls>) {
    let (ours, theirs) = test_credentials(hosts);
    let streams = |d: Vec<DaemonTls>| d.iter().map(|d| StreamTls::new(d).unwrap()).collect();
    (streams(ours), streams(theirs))
}

#[cfg(test)]
fn test_credentials(hosts: &[&str]) -> (Vec<DaemonTls>, Vec<DaemonTls>) {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let validity = pool_trust::Validity::starting(now_ms, Duration::from_secs(3600));
    let issue = |ca: &pool_trust::PoolCa| {
        hosts
            .iter()
            .map(|h| DaemonTls {
                bundle: ca.bundle(),
                creds: ca
                    .issue(&Identity::Host((*h).into()), &[], validity)
                    .unwrap(),
            })
            .collect()
    };
    let pool = PoolId::parse("migtest").unwrap();
    let ours = pool_trust::PoolCa::create(pool.clone(), validity).unwrap();
    let theirs = pool_trust::PoolCa::create(pool, validity).unwrap();
    (issue(&ours), issue(&theirs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::CipherSuite;
    use std::os::unix::net::UnixStream;

    /// The suite a stream from a source to a destination settles on, each with or
    /// without AES instructions.
    fn negotiated(src_aes: bool, dst_aes: bool) -> CipherSuite {
        let (creds, _) = test_credentials(&["src", "dst"]);
        let src = StreamTls::with_suites(&creds[0], src_aes).unwrap();
        let dst = StreamTls::with_suites(&creds[1], dst_aes).unwrap();
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let mut server = dst.accept().unwrap();
        let accept = std::thread::spawn(move || {
            while server.is_handshaking() {
                server.complete_io(&mut b).unwrap();
            }
            server.negotiated_cipher_suite().unwrap().suite()
        });
        let mut client = src.connect("dst").unwrap();
        while client.is_handshaking() {
            client.complete_io(&mut a).unwrap();
        }
        let ours = client.negotiated_cipher_suite().unwrap().suite();
        assert_eq!(ours, accept.join().unwrap());
        ours
    }

    #[test]
    fn a_source_without_aes_instructions_streams_with_chacha20() {
        use CipherSuite::*;
        assert_eq!(negotiated(false, true), TLS13_CHACHA20_POLY1305_SHA256);
        assert_eq!(negotiated(false, false), TLS13_CHACHA20_POLY1305_SHA256);
        assert_eq!(negotiated(true, true), TLS13_AES_256_GCM_SHA384);
        assert_eq!(negotiated(true, false), TLS13_AES_256_GCM_SHA384);
    }
}
