//! The audit trail of a daemon's gRPC service: who called what, and the result.
//!
//! [`AuditLayer`] wraps a tonic server (`Server::builder().layer(..)`). Every call that
//! changes something, every console session and every refused call is written as one
//! `tracing` event with target `audit` (under systemd: the daemon's journal), naming the
//! caller by its certificate's identity (or "no certificate"), its address, the method
//! and the gRPC code. Reads that succeed are not written: they would drown the rest.
//!
//! Each call runs on a task of its own, to its end, whether or not its caller waits for
//! the answer: hyper drops a call's future when the caller's connection goes, and a change
//! cut short between its steps (a target served, its record not yet kept) would be left
//! half made; a caller killed mid-call (a coordinator that dies while storaged is slow)
//! must not do that. The change it asked for is made, and audited, as if it had waited.
//! `poold`'s `PoolService` audits into the replicated log instead (users, not daemons).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::{Identity, PoolId};

/// The log filter directive a daemon adds to whatever level it is told, so its audit
/// trail is never filtered out.
pub const LOG_DIRECTIVE: &str = "audit=info";

/// What audit events carry as `daemon`: hostd, storaged.
#[derive(Clone)]
pub struct AuditLayer {
    pool: PoolId,
    daemon: &'static str,
}

impl AuditLayer {
    pub fn new(pool: PoolId, daemon: &'static str) -> Self {
        Self { pool, daemon }
    }
}

impl<S> tower_layer::Layer<S> for AuditLayer {
    type Service = Audit<S>;

    fn layer(&self, inner: S) -> Audit<S> {
        Audit {
            inner,
            pool: self.pool.clone(),
            daemon: self.daemon,
        }
    }
}

#[derive(Clone)]
pub struct Audit<S> {
    inner: S,
    pool: PoolId,
    daemon: &'static str,
}

/// Whether a call to `method` (`/package.Service/Method`) with gRPC `code` is written.
pub fn audited(method: &str, code: i32) -> bool {
    const PERMISSION_DENIED: i32 = 7;
    const UNAUTHENTICATED: i32 = 16;
    let name = method.rsplit('/').next().unwrap_or(method);
    let read = ["Get", "List", "Check"].iter().any(|p| name.starts_with(p));
    !read || code == PERMISSION_DENIED || code == UNAUTHENTICATED
}

/// The caller as an audit line names it: its certificate's identity, or why none.
fn caller<B>(req: &http::Request<B>, pool: &PoolId) -> (String, String) {
    let Some(info) = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>() else {
        return ("no TLS".into(), String::new());
    };
    let from = info
        .get_ref()
        .remote_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let who = match info.peer_certs() {
        None => "no certificate".into(),
        Some(certs) => match certs.first() {
            None => "no certificate".into(),
            Some(leaf) => match Identity::from_peer_cert(leaf, pool) {
                Ok(id) => id.path(),
                Err(e) => format!("unreadable certificate ({e})"),
            },
        },
    };
    (who, from)
}

impl<S, B, RB> tonic::codegen::Service<http::Request<B>> for Audit<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<RB>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let (who, from) = caller(&req, &self.pool);
        let method = req.uri().path().to_owned();
        let daemon = self.daemon;
        // The clone is the one polled ready; the original stays for the next call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let call = tokio::spawn(async move {
            let resp = inner.call(req).await?;
            // A refused or failed unary call answers with its status in the headers
            // (trailers-only); a call that went ahead has none there.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .unwrap_or(0);
            if audited(&method, code) {
                let result = tonic::Code::from_i32(code);
                tracing::info!(target: "audit", daemon, who = %who, from = %from, call = %method, result = ?result, "audit");
            }
            Ok(resp)
        });
        Box::pin(async move {
            match call.await {
                Ok(answer) => answer,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                // Cancelled: only by the runtime going down, which drops this future too.
                Err(_) => std::future::pending().await,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use tower_layer::Layer;

    /// A call that takes a while, then marks that it made its change.
    #[derive(Clone)]
    struct Slow(Arc<AtomicBool>);

    impl tonic::codegen::Service<http::Request<()>> for Slow {
        type Response = http::Response<()>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let done = self.0.clone();
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                done.store(true, Ordering::SeqCst);
                Ok(http::Response::new(()))
            })
        }
    }

    #[tokio::test]
    async fn a_call_whose_caller_goes_away_still_runs_to_its_end() {
        use tonic::codegen::Service;
        let done = Arc::new(AtomicBool::new(false));
        let mut svc = AuditLayer::new(PoolId::generate(), "test").layer(Slow(done.clone()));
        let req = http::Request::builder()
            .uri("/pool.storage.v1.StorageService/CreateExport")
            .body(())
            .unwrap();
        // The caller gives up (hyper drops the future when the connection goes).
        let gone = tokio::time::timeout(Duration::from_millis(5), svc.call(req)).await;
        assert!(gone.is_err(), "the call was still running when dropped");
        assert!(!done.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            done.load(Ordering::SeqCst),
            "the dropped call made its change"
        );
    }

    #[test]
    fn reads_are_audited_only_when_refused_and_everything_else_always() {
        for m in [
            "/pool.host.v1.HostService/CreateVm",
            "/pool.host.v1.HostService/StreamConsole",
            "/pool.storage.v1.StorageService/GrantAccess",
            "/pool.storage.v1.StorageService/DeleteVolume",
        ] {
            assert!(audited(m, 0), "{m}");
            assert!(audited(m, 7), "{m}");
        }
        for m in [
            "/pool.host.v1.HostService/GetVm",
            "/pool.host.v1.HostService/ListVms",
            "/pool.storage.v1.StorageService/CheckPool",
        ] {
            assert!(!audited(m, 0), "{m}");
            assert!(!audited(m, 5), "{m}");
            assert!(audited(m, 7), "{m}");
            assert!(audited(m, 16), "{m}");
        }
    }
}
