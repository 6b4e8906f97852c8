//! This member's TLS: how its outgoing calls connect, and who may call its member and
//! host services.
//!
//! A member serves every service on one port with mutual TLS where the client
//! certificate is optional (people call `PoolService` with a token); the member and host
//! services refuse a caller without the right certificate through [`RequireRole`], which
//! leaves the caller's identity in the request for the handler
//! ([`pool_trust::tls::caller`]). Without a TLS directory (tests of one layer only; the
//! `poold` binary requires one) calls go in clear and nothing is checked here.

use std::time::Duration;

use pool_trust::{DaemonTls, Identity, Role};
use tonic::service::Interceptor;
use tonic::transport::Endpoint;
use tonic::{Request, Status};

pub use pool_trust::tls::caller;

/// An endpoint for `addr` (host:port): over TLS as this member when it has credentials,
/// accepting only `server`'s certificate when given (else one naming `addr`).
pub fn endpoint(
    addr: &str,
    tls: Option<&DaemonTls>,
    server: Option<&Identity>,
) -> Result<Endpoint, Status> {
    let bad = |e: tonic::transport::Error| {
        Status::invalid_argument(format!("cannot call {addr}: {}", proto::error_chain(&e)))
    };
    let Some(tls) = tls else {
        return Endpoint::from_shared(format!("http://{addr}"))
            .map_err(bad)
            .map(|e| e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true));
    };
    let config = match server {
        Some(server) => tls.client(server),
        None => pool_trust::tls::client_tls(&tls.bundle, Some(&tls.creds), None),
    }
    .map_err(|e| Status::internal(format!("TLS for {addr}: {e}")))?;
    Endpoint::from_shared(format!("https://{addr}"))
        .map_err(bad)?
        .tls_config(config)
        .map_err(bad)
        .map(|e| e.connect_timeout(Duration::from_secs(1)).tcp_nodelay(true))
}

/// [`pool_trust::tls::RequireRole`] when this member has TLS; lets every caller through
/// without (tests of one layer).
#[derive(Clone)]
pub struct RequireRole(Option<pool_trust::tls::RequireRole>);

impl RequireRole {
    pub fn new(tls: Option<&DaemonTls>, roles: &'static [Role]) -> Self {
        RequireRole(tls.map(|t| pool_trust::tls::RequireRole::new(t.pool_id().clone(), roles)))
    }
}

impl Interceptor for RequireRole {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        match &mut self.0 {
            Some(check) => check.call(request),
            None => Ok(request),
        }
    }
}
