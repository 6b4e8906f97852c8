//! A daemon's TLS listener whose certificate and CA bundle can change while it serves
//! ([`ServerTls::reload`]): new connections get what is current, established ones keep
//! what they were made with. This is what lets a daemon take a renewed certificate, or
//! trust a new CA during a roll, without a restart; tonic fixes a `ServerTlsConfig` for a
//! server's life, so the daemons serve the already-handshaken streams of
//! [`ServerTls::incoming`] instead (tonic reads the caller's certificate from them as it
//! does from its own).
//!
//! Handshakes run beside each other, each bounded by [`HANDSHAKE_TIMEOUT`], and at most
//! [`MAX_HANDSHAKES`] at once: a client stalling in its handshake holds one slot for ten
//! seconds and never holds up the others.

use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::CaBundle;
use crate::dir::DaemonTls;
use crate::leaf::Credentials;
use crate::tls::{ClientAuth, HANDSHAKE_TIMEOUT};

/// Handshakes in progress at once; one more waits for a slot.
pub const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ServeTlsError {
    #[error("credentials of pool {credentials} with a CA bundle of pool {bundle}")]
    PoolMismatch {
        credentials: crate::PoolId,
        bundle: crate::PoolId,
    },
    #[error("the CA bundle")]
    Bundle(#[source] rustls::Error),
    #[error("the daemon's key")]
    Key(#[source] rustls::pki_types::pem::Error),
    #[error("building the client certificate check")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    #[error("building the TLS configuration")]
    Config(#[source] rustls::Error),
}

/// The current server configuration of a daemon, shared by its listener.
#[derive(Clone)]
pub struct ServerTls {
    pool: crate::PoolId,
    peers: Peers,
    current: Arc<RwLock<Arc<rustls::ServerConfig>>>,
}

/// Who connects to a listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peers {
    /// Daemons and tools over gRPC (HTTP/2), with or without a client certificate, and
    /// scrapers of `/metrics` (HTTP/2 or HTTP/1.1).
    Daemons(ClientAuth),
    /// Web browsers: no client certificate asked for (a browser would offer the user a
    /// certificate picker), HTTP/2 or HTTP/1.1.
    Browsers,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn new(tls: &DaemonTls, auth: ClientAuth) -> Result<ServerTls, ServeTlsError> {
        ServerTls::serving(tls, Peers::Daemons(auth))
    }

    /// A listener for web browsers (the web console): the same certificate, no client
    /// certificate, HTTP/2 or HTTP/1.1. Its callers authenticate by token.
    pub fn for_browsers(tls: &DaemonTls) -> Result<ServerTls, ServeTlsError> {
        ServerTls::serving(tls, Peers::Browsers)
    }

    fn serving(tls: &DaemonTls, peers: Peers) -> Result<ServerTls, ServeTlsError> {
        Ok(ServerTls {
            pool: tls.pool_id().clone(),
            peers,
            current: Arc::new(RwLock::new(Arc::new(config(tls, peers)?))),
        })
    }

    /// The pool whose CA the listener trusts.
    pub fn pool_id(&self) -> &crate::PoolId {
        &self.pool
    }

    /// From now on, new connections are served with `tls` (a renewed certificate, a CA
    /// bundle with a new CA). A `tls` that cannot be served changes nothing.
    pub fn reload(&self, tls: &DaemonTls) -> Result<(), ServeTlsError> {
        if tls.pool_id() != &self.pool {
            return Err(ServeTlsError::PoolMismatch {
                credentials: tls.pool_id().clone(),
                bundle: self.pool.clone(),
            });
        }
        let next = Arc::new(config(tls, self.peers)?);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
        Ok(())
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(config)
    }

    /// The connections `listener` accepts, once their handshake is done, for tonic's
    /// `serve_with_incoming`. Ends when the listener fails or the server stops reading.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let tls = self.clone();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let (tcp, peer) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of descriptors, say: wait a little rather than spin.
                            tracing::warn!(error = %e, "accepting a connection");
                            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            continue;
                        }
                    },
                    () = tx.closed() => return,
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tls.acceptor();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send(Ok(stream)).await;
                        }
                        // In the audit trail: who was turned away before any request.
                        Ok(Err(e)) => {
                            tracing::info!(target: "audit", from = %peer, error = %e, "TLS handshake refused")
                        }
                        Err(_) => {
                            tracing::info!(target: "audit", from = %peer, "TLS handshake timed out")
                        }
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }
}

fn config(tls: &DaemonTls, peers: Peers) -> Result<rustls::ServerConfig, ServeTlsError> {
    if tls.creds.pool_id() != tls.bundle.pool_id() {
        return Err(ServeTlsError::PoolMismatch {
            credentials: tls.creds.pool_id().clone(),
            bundle: tls.bundle.pool_id().clone(),
        });
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(root_store(&tls.bundle)?),
        provider.clone(),
    );
    let verifier = match peers {
        Peers::Daemons(ClientAuth::Required) => Some(verifier),
        Peers::Daemons(ClientAuth::Optional) => Some(verifier.allow_unauthenticated()),
        Peers::Browsers => None,
    }
    .map(|v| v.build().map_err(ServeTlsError::Verifier))
    .transpose()?;
    // The certificate and its intermediates, then the CAs: a client meeting the pool for
    // the first time gets the CA it is asked to pin in the handshake (`poolctl`).
    let chain = cert_chain(&tls.creds)
        .into_iter()
        .chain(
            tls.bundle
                .certs()
                .iter()
                .map(|c| CertificateDer::from(c.der().to_vec())),
        )
        .collect();
    let key = private_key(&tls.creds)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(ServeTlsError::Config)?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(ServeTlsError::Config)?;
    // HTTP/1.1 for browsers and for scrapers of a daemon's `/metrics` (`scrape.rs`); gRPC
    // clients ask for h2.
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The pool's CAs as rustls roots: the only ones a peer's chain may end in.
pub fn root_store(bundle: &CaBundle) -> Result<rustls::RootCertStore, ServeTlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in bundle.certs() {
        roots
            .add(CertificateDer::from(ca.der().to_vec()))
            .map_err(ServeTlsError::Bundle)?;
    }
    Ok(roots)
}

/// A daemon's certificate chain as rustls presents it: the leaf, then its intermediates
/// (during a CA roll, the cross certificate that lets peers trusting only the old CA
/// accept a leaf of the new one).
pub fn cert_chain(creds: &Credentials) -> Vec<CertificateDer<'static>> {
    creds
        .chain_der()
        .into_iter()
        .map(|der| CertificateDer::from(der.to_vec()))
        .collect()
}

/// A daemon's key as rustls takes it.
pub fn private_key(creds: &Credentials) -> Result<PrivateKeyDer<'static>, ServeTlsError> {
    PrivateKeyDer::from_pem_slice(creds.key_pem().as_bytes()).map_err(ServeTlsError::Key)
}

/// A rustls client trusting `bundle` only and presenting `creds` (with its intermediates)
/// when given, for TLS streams that are not gRPC (the migration stream's strangers in
/// tests, probes).
pub fn client_config(
    bundle: &CaBundle,
    creds: Option<&Credentials>,
) -> Result<rustls::ClientConfig, ServeTlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(ServeTlsError::Config)?
    .with_root_certificates(root_store(bundle)?);
    match creds {
        None => Ok(builder.with_no_client_auth()),
        Some(c) => builder
            .with_client_auth_cert(cert_chain(c), private_key(c)?)
            .map_err(ServeTlsError::Config),
    }
}
