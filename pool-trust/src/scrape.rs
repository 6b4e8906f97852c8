//! `GET /metrics` on a daemon's mutual-TLS gRPC port (`hostd`, `storaged`), for a
//! Prometheus that scrapes with a pool certificate.
//!
//! [`ScrapeLayer`] wraps a tonic server (`Server::builder().layer(..)`, outside the audit
//! layer, so scrapes do not fill the audit trail): a request for [`METRICS_PATH`] is
//! answered here with what the daemon renders, every other request goes on to the gRPC
//! services. The handshake already required a certificate of the pool; the scrape is
//! further allowed only to a member or a monitor (`pool://<pool>/monitor/<name>`,
//! `poolctl pki-issue --identity monitor/prom`). A monitor may call nothing else: the gRPC
//! services admit members only.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::codegen::http;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::{Identity, PoolId, Role};

/// Where the metrics are served.
pub const METRICS_PATH: &str = "/metrics";

/// The content type of what `prometheus-client` encodes (OpenMetrics text, which
/// Prometheus reads).
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Who may scrape.
pub const SCRAPERS: &[Role] = &[Role::Member, Role::Monitor];

/// Renders the daemon's metrics, once per scrape.
pub type Render = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

#[derive(Clone)]
pub struct ScrapeLayer {
    pool: PoolId,
    daemon: &'static str,
    render: Render,
}

impl ScrapeLayer {
    pub fn new(pool: PoolId, daemon: &'static str, render: Render) -> Self {
        ScrapeLayer {
            pool,
            daemon,
            render,
        }
    }
}

impl<S> tower_layer::Layer<S> for ScrapeLayer {
    type Service = Scrape<S>;

    fn layer(&self, inner: S) -> Scrape<S> {
        Scrape {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Scrape<S> {
    inner: S,
    layer: ScrapeLayer,
}

/// Why a scrape is refused, as an HTTP status and a line of text.
fn refusal<B>(req: &http::Request<B>, pool: &PoolId) -> Option<(http::StatusCode, String)> {
    if req.method() != http::Method::GET {
        return Some((
            http::StatusCode::METHOD_NOT_ALLOWED,
            "only GET reads the metrics".into(),
        ));
    }
    let leaf = req
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|info| info.peer_certs())
        .and_then(|certs| certs.first().cloned());
    let Some(leaf) = leaf else {
        return Some((
            http::StatusCode::UNAUTHORIZED,
            "no client certificate".into(),
        ));
    };
    match Identity::from_peer_cert(&leaf, pool) {
        Ok(id) if SCRAPERS.contains(&id.role()) => None,
        Ok(id) => Some((
            http::StatusCode::FORBIDDEN,
            format!("{id} may not read the metrics (members and monitors may)"),
        )),
        Err(e) => Some((
            http::StatusCode::FORBIDDEN,
            format!("the certificate names no identity of this pool: {e}"),
        )),
    }
}

fn answer(
    status: http::StatusCode,
    content_type: &str,
    body: String,
) -> http::Response<tonic::body::Body> {
    let mut resp = http::Response::new(tonic::body::Body::new(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_str(content_type).expect("a valid content type"),
    );
    resp
}

impl<S, B> tonic::codegen::Service<http::Request<B>> for Scrape<S>
where
    S: tonic::codegen::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != METRICS_PATH {
            // The clone is the one polled ready; the original stays for the next call.
            let clone = self.inner.clone();
            let mut inner = std::mem::replace(&mut self.inner, clone);
            return Box::pin(inner.call(req));
        }
        if let Some((status, why)) = refusal(&req, &self.layer.pool) {
            tracing::info!(
                target: "audit",
                daemon = self.layer.daemon,
                status = status.as_u16(),
                error = %why,
                "refused a metrics scrape"
            );
            return Box::pin(
                async move { Ok(answer(status, "text/plain; charset=utf-8", why + "\n")) },
            );
        }
        let rendered = (self.layer.render)();
        Box::pin(async move {
            Ok(answer(
                http::StatusCode::OK,
                OPENMETRICS_CONTENT_TYPE,
                rendered.await,
            ))
        })
    }
}
