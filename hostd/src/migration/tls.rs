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
        let Identity::Host(host) = tls.identity() else {
            return Err(TlsSetupError::NotAHost(tls.identity().clone()));
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
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

/// Credentials of a fresh test pool for each of `hosts`, and one of another pool with
/// the same host names (a stranger).
#[cfg(test)]
pub(crate) fn test_hosts(hosts: &[&str]) -> (Vec<StreamTls>, Vec<StreamTls>) {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let validity = pool_trust::Validity::starting(now_ms, Duration::from_secs(3600));
    let issue = |ca: &pool_trust::PoolCa| {
        hosts
            .iter()
            .map(|h| {
                let creds = ca
                    .issue(&Identity::Host((*h).into()), &[], validity)
                    .unwrap();
                StreamTls::new(&DaemonTls {
                    bundle: ca.bundle(),
                    creds,
                })
                .unwrap()
            })
            .collect()
    };
    let pool = PoolId::parse("migtest").unwrap();
    let ours = pool_trust::PoolCa::create(pool.clone(), validity).unwrap();
    let theirs = pool_trust::PoolCa::create(pool, validity).unwrap();
    (issue(&ours), issue(&theirs))
}
