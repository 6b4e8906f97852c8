//! Mutual TLS for tonic: server and client configurations built from a daemon's
//! [`Credentials`] and the pool's [`CaBundle`], and the caller's [`Identity`] read from a
//! request.
//!
//! rustls (through tonic's `tls-ring` feature) does the handshake: it checks the peer's
//! chain up to a CA of the bundle, its dates and its key usage. A request handler then reads
//! the identity with [`peer_identity`] and authorizes by it ([`require_role`]).
//!
//! - Daemon-to-daemon listeners (`hostd`, `storaged`) use [`ClientAuth::Required`]: no
//!   certificate, no connection.
//! - `poold` serves `PoolService` (people, by token) beside the member and host services on
//!   one port, so it uses [`ClientAuth::Optional`]: the handshake accepts a client without a
//!   certificate, and each member or host service refuses such a caller in its handler.
//! - A client that knows whom it calls passes that identity to [`client_tls`]: rustls
//!   then accepts only a certificate with the identity's DNS name, whatever address was
//!   dialled; without it, the address in the URI must be one of the server's names.
//! - A server presents its certificate and its intermediates followed by the pool's CAs
//!   ([`server_chain_pem`]), so `poolctl` meeting a pool for the first time gets the CA to
//!   pin in the handshake. A client presents its certificate and intermediates: during a
//!   CA roll the cross certificate, by which a peer trusting only the old CA accepts a
//!   leaf of the new one. Identity is read from the leaf (the first certificate) only.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, ServerTlsConfig};
use tonic::{Request, Status};

use crate::ca::CaBundle;
use crate::identity::{Identity, IdentityError, PoolId, Role};
use crate::leaf::Credentials;

/// How long a TLS handshake may take on a server before the connection is dropped: a
/// client that stalls in the handshake holds nothing longer.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// Credentials of one pool with the CA bundle of another.
    #[error("credentials of pool {credentials} with a CA bundle of pool {bundle}")]
    PoolMismatch { credentials: PoolId, bundle: PoolId },
}

/// Errors reading a caller's identity.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The connection is not TLS, or the client sent no certificate.
    #[error("the caller presented no client certificate")]
    NoCertificate,
    /// The certificate names no acceptable identity.
    #[error("the caller's certificate names no identity of this pool")]
    Identity {
        #[source]
        source: IdentityError,
    },
}

impl From<PeerError> for Status {
    fn from(e: PeerError) -> Status {
        let mut msg = e.to_string();
        let mut cause = std::error::Error::source(&e);
        while let Some(c) = cause {
            msg.push_str(": ");
            msg.push_str(&c.to_string());
            cause = c.source();
        }
        Status::unauthenticated(msg)
    }
}

/// Whether a server demands a client certificate in the handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate signed by the bundle, no connection.
    Required,
    /// A client may connect without one (it must still authenticate otherwise, e.g. by
    /// token); one that sends a certificate must send a valid one.
    Optional,
}

fn same_pool(creds: &Credentials, bundle: &CaBundle) -> Result<(), TlsError> {
    if creds.pool_id() != bundle.pool_id() {
        return Err(TlsError::PoolMismatch {
            credentials: creds.pool_id().clone(),
            bundle: bundle.pool_id().clone(),
        });
    }
    Ok(())
}

/// The chain a server presents: its certificate and intermediates
/// ([`Credentials::cert_pem`]), then every CA of `bundle`. A client that already trusts
/// the pool ignores the CAs; one meeting it for the first time
/// (`poolctl` with no `--ca`) receives in the handshake the CA it is asked to pin, and
/// checks the certificate against it before showing its fingerprint.
pub fn server_chain_pem(creds: &Credentials, bundle: &CaBundle) -> String {
    let mut chain = creds.cert_pem().to_owned();
    if !chain.ends_with('\n') {
        chain.push('\n');
    }
    chain.push_str(&bundle.to_pem());
    chain
}

/// A server configuration: presents `creds` followed by the CAs of `bundle`
/// ([`server_chain_pem`]), checks client certificates against every CA of `bundle`,
/// gives up on a handshake after [`HANDSHAKE_TIMEOUT`].
pub fn server_tls(
    creds: &Credentials,
    bundle: &CaBundle,
    auth: ClientAuth,
) -> Result<ServerTlsConfig, TlsError> {
    same_pool(creds, bundle)?;
    Ok(ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(
            server_chain_pem(creds, bundle),
            creds.key_pem(),
        ))
        .client_ca_root(Certificate::from_pem(bundle.to_pem()))
        .client_auth_optional(auth == ClientAuth::Optional)
        .timeout(HANDSHAKE_TIMEOUT))
}

/// A client configuration: trusts every CA of `bundle` (and nothing else), presents
/// `creds` (the leaf and its intermediates) when given, and when `server` is given
/// accepts only that identity's certificate.
pub fn client_tls(
    bundle: &CaBundle,
    creds: Option<&Credentials>,
    server: Option<&Identity>,
) -> Result<ClientTlsConfig, TlsError> {
    let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(bundle.to_pem()));
    if let Some(creds) = creds {
        same_pool(creds, bundle)?;
        config = config.identity(tonic::transport::Identity::from_pem(
            creds.cert_pem(),
            creds.key_pem(),
        ));
    }
    if let Some(server) = server {
        config = config.domain_name(server.dns_name(bundle.pool_id()));
    }
    Ok(config)
}

/// The identity of the caller of `request`, from the client certificate rustls verified
/// on its connection.
pub fn peer_identity<T>(request: &Request<T>, pool: &PoolId) -> Result<Identity, PeerError> {
    let certs = request.peer_certs().ok_or(PeerError::NoCertificate)?;
    let leaf = certs.first().ok_or(PeerError::NoCertificate)?;
    Identity::from_peer_cert(leaf, pool).map_err(|source| PeerError::Identity { source })
}

/// The caller's identity if its role is one of `roles`: `Unauthenticated` without a
/// usable certificate, `PermissionDenied` for another role.
pub fn require_role<T>(
    request: &Request<T>,
    pool: &PoolId,
    roles: &[Role],
) -> Result<Identity, Status> {
    let identity = peer_identity(request, pool)?;
    if roles.contains(&identity.role()) {
        Ok(identity)
    } else {
        Err(Status::permission_denied(format!(
            "{identity} may not call this service (it is for {})",
            roles
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
}

/// A tonic interceptor that refuses callers whose certificate is not of one of `roles`
/// before a handler runs (logging the refusal), and leaves the caller's [`Identity`] in
/// the request for the handler ([`caller`]). Wrap a service in it with
/// `InterceptedService::new(service, RequireRole::new(pool, roles))`.
#[derive(Clone, Debug)]
pub struct RequireRole {
    pool: PoolId,
    roles: &'static [Role],
}

impl RequireRole {
    pub fn new(pool: PoolId, roles: &'static [Role]) -> Self {
        RequireRole { pool, roles }
    }
}

impl tonic::service::Interceptor for RequireRole {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let identity = require_role(&request, &self.pool, self.roles).inspect_err(|s| {
            tracing::warn!(
                peer = ?request.remote_addr(),
                error = %s.message(),
                "refused a caller"
            )
        })?;
        request.extensions_mut().insert(identity);
        Ok(request)
    }
}

/// The caller's identity, as [`RequireRole`] found it.
pub fn caller<T>(request: &Request<T>) -> Option<&Identity> {
    request.extensions().get::<Identity>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{PoolCa, Validity};

    #[test]
    fn a_request_off_tls_has_no_identity() {
        let pool = PoolId::generate();
        let request = Request::new(());
        assert!(matches!(
            peer_identity(&request, &pool),
            Err(PeerError::NoCertificate)
        ));
        let status = require_role(&request, &pool, &[Role::Member]).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unauthenticated);
    }

    #[test]
    fn credentials_and_bundle_must_share_a_pool() {
        let now = 1_800_000_000_000;
        let v = Validity::starting(now, Duration::from_secs(3600));
        let a = PoolCa::create(PoolId::generate(), v).unwrap();
        let b = PoolCa::create(PoolId::generate(), v).unwrap();
        let creds = a.issue(&Identity::Member(1), &[], v).unwrap();
        assert!(server_tls(&creds, &a.bundle(), ClientAuth::Required).is_ok());
        assert!(matches!(
            server_tls(&creds, &b.bundle(), ClientAuth::Required),
            Err(TlsError::PoolMismatch { .. })
        ));
        assert!(client_tls(&b.bundle(), Some(&creds), None).is_err());
        assert!(client_tls(&b.bundle(), None, Some(&Identity::Member(2))).is_ok());
    }

    #[test]
    fn a_server_presents_its_certificate_then_every_ca_of_its_bundle() {
        let now = 1_800_000_000_000;
        let v = Validity::starting(now, Duration::from_secs(3600));
        let old = PoolCa::create(PoolId::generate(), v).unwrap();
        let new = old.roll(v).unwrap();
        let bundle = old.bundle().with(new.cert().clone()).unwrap();
        let creds = new.issue(&Identity::Member(1), &[], v).unwrap();
        let chain = crate::cert::certs_from_pem(&server_chain_pem(&creds, &bundle)).unwrap();
        assert_eq!(
            chain,
            vec![
                creds.cert_der().to_vec(),
                old.cert().der().to_vec(),
                new.cert().der().to_vec()
            ]
        );
        // Mid-roll: the cross certificate comes between the leaf and the CAs.
        let cross = old.cross_sign(&new).unwrap();
        let creds = creds
            .with_intermediates(std::slice::from_ref(&cross))
            .unwrap();
        let chain = crate::cert::certs_from_pem(&server_chain_pem(&creds, &bundle)).unwrap();
        assert_eq!(
            chain,
            vec![
                creds.cert_der().to_vec(),
                cross.der().to_vec(),
                old.cert().der().to_vec(),
                new.cert().der().to_vec()
            ]
        );
    }
}
