//! This member's TLS: how its outgoing calls connect, and who may call its member and
//! host services.
//!
//! A member serves every service on one port with mutual TLS where the client
//! certificate is optional (people call `PoolService` with a token); the member and host
//! services refuse a caller without the right certificate through [`RequireRole`], which
//! leaves the caller's identity in the request for the handler
//! ([`pool_trust::tls::caller`]). Without a TLS directory (tests of one layer only; the
//! `poold` binary requires one) calls go in clear and nothing is checked here.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use pool_trust::{DaemonTls, Identity, PoolId, Role};
use tonic::service::Interceptor;
use tonic::transport::Endpoint;
use tonic::{Request, Status};

pub use pool_trust::tls::caller;

/// This member's credentials, which a renewal (or a CA roll) replaces while the member
/// runs. Whoever caches a connection made with them keeps the [`LiveTls::generation`] it
/// was made under and makes a new one when that changes: tonic's endpoints hold a fixed
/// TLS configuration.
#[derive(Clone)]
pub struct LiveTls(Arc<Live>);

struct Live {
    pool: PoolId,
    current: RwLock<Arc<DaemonTls>>,
    generation: AtomicU64,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("LiveTls").field(&*self.current()).finish()
    }
}

impl LiveTls {
    pub fn new(tls: DaemonTls) -> LiveTls {
        LiveTls(Arc::new(Live {
            pool: tls.pool_id().clone(),
            current: RwLock::new(Arc::new(tls)),
            generation: AtomicU64::new(0),
        }))
    }

    /// The credentials to use now.
    pub fn current(&self) -> Arc<DaemonTls> {
        self.0.current.read().expect("TLS lock").clone()
    }

    /// Counts replacements: a connection made under another generation is stale.
    pub fn generation(&self) -> u64 {
        self.0.generation.load(Ordering::Acquire)
    }

    /// The pool never changes, whatever the renewals.
    pub fn pool_id(&self) -> &PoolId {
        &self.0.pool
    }

    /// Takes renewed credentials (of the same pool: anything else is a bug upstream and
    /// is refused).
    pub fn replace(&self, next: DaemonTls) -> Result<(), String> {
        if next.pool_id() != &self.0.pool {
            return Err(format!(
                "renewed credentials are of pool {}, not {}",
                next.pool_id(),
                self.0.pool
            ));
        }
        *self.0.current.write().expect("TLS lock") = Arc::new(next);
        self.0.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}

/// The generation of `tls`, 0 without TLS.
pub fn generation(tls: Option<&LiveTls>) -> u64 {
    tls.map_or(0, LiveTls::generation)
}

/// An endpoint for `addr` (host:port): over TLS with this member's current credentials
/// when it has them, accepting only `server`'s certificate when given (else one naming
/// `addr`).
pub fn endpoint(
    addr: &str,
    tls: Option<&LiveTls>,
    server: Option<&Identity>,
) -> Result<Endpoint, Status> {
    let bad = |e: tonic::transport::Error| {
        Status::invalid_argument(format!("cannot call {addr}: {}", proto::error_chain(&e)))
    };
    let Some(tls) = tls.map(LiveTls::current) else {
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
    pub fn new(tls: Option<&LiveTls>, roles: &'static [Role]) -> Self {
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
