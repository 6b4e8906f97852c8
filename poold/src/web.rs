//! The web console's port (`--web-listen`): HTTPS with the member's certificate, asking
//! no client certificate, serving
//! - `PoolService` as gRPC-Web: the same handler, tokens and authorization as the gRPC
//!   port (a browser cannot read HTTP/2 trailers, so plain gRPC cannot come from one);
//! - the console's built files from `--web-root` (`index.html` for any other path
//!   without an extension, so the console's own routes load it), or, when there is none,
//!   a page saying how to build it: the API on this port works either way.
//!
//! Every page goes out with a content security policy that allows only this origin.

use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use pool_trust::serve::ServerTls;
use proto::coordinator::pool_service_server::PoolServiceServer;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tower_layer::Layer;

use crate::service::pool::PoolHandler;

/// Shown where the console's files are missing.
pub const NOT_BUILT: &str = "The web console's pages are not installed with this poold \
(--web-root names their directory). PoolService answers on this port as gRPC-Web.";

const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The console's routes: gRPC-Web for `PoolService`, files for the rest.
pub fn router(handler: PoolHandler, root: Option<PathBuf>) -> axum::Router {
    let api = PoolServiceServer::new(handler).max_decoding_message_size(16 << 20);
    Routes::new(tonic_web::GrpcWebLayer::new().layer(api))
        .prepare()
        .into_axum_router()
        .fallback(move |req: Request<Body>| {
            let root = root.clone();
            async move { file(root.as_deref(), req.method(), req.uri().path()).await }
        })
}

/// Serves the console on `listener` until `stop` turns true.
pub async fn serve(
    handler: PoolHandler,
    root: Option<PathBuf>,
    listener: TcpListener,
    tls: ServerTls,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let routes = Routes::from(router(handler, root));
    let served = tonic::transport::Server::builder()
        .accept_http1(true)
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_routes(routes)
        .serve_with_incoming_shutdown(tls.incoming(listener), async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %proto::error_chain(&e), "the web console's port failed");
    }
}

/// The file `path` names under `root`, resolved as the console expects.
async fn file(root: Option<&Path>, method: &Method, path: &str) -> Response<Body> {
    if method != Method::GET && method != Method::HEAD {
        return page(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    let Some(root) = root.filter(|r| r.join("index.html").is_file()) else {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain; charset=utf-8",
            format!("{NOT_BUILT}\n").into_bytes(),
        );
    };
    let Some(rel) = relative(path) else {
        return page(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
    };
    let mut at = root.join(&rel);
    if !at.is_file() {
        if rel.extension().is_some() {
            return page(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec());
        }
        at = root.join("index.html");
    }
    match tokio::fs::read(&at).await {
        Ok(bytes) => {
            let mut r = page(StatusCode::OK, content_type(&at), bytes);
            // Built files under assets/ carry their content's hash in their names.
            let cache =
                if rel.starts_with("assets") && at.file_name() != Some("index.html".as_ref()) {
                    "public, max-age=31536000, immutable"
                } else {
                    "no-cache"
                };
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
            r
        }
        Err(e) => {
            tracing::warn!(file = %at.display(), error = %e, "reading a console file");
            page(StatusCode::NOT_FOUND, "text/plain", b"not found\n".to_vec())
        }
    }
}

/// The path below the root a request names; `None` for one that would leave it or that
/// is not a plain path (`..`, `\`, `%`, a NUL).
fn relative(path: &str) -> Option<PathBuf> {
    let trimmed = path.trim_start_matches('/');
    if trimmed.contains(['\\', '%', '\0']) {
        return None;
    }
    let rel = if trimmed.is_empty() {
        PathBuf::from("index.html")
    } else {
        PathBuf::from(trimmed)
    };
    rel.components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then_some(rel)
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()).unwrap_or("") {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "json" | "map" => "application/json",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "woff2" => "font/woff2",
        "txt" => "text/plain; charset=utf-8",
        _ => "application/octet-stream",
    }
}

fn page(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_paths_below_the_root_are_files() {
        assert_eq!(relative("/"), Some(PathBuf::from("index.html")));
        assert_eq!(
            relative("/assets/app-1a2b.js"),
            Some(PathBuf::from("assets/app-1a2b.js"))
        );
        assert_eq!(relative("/vms/42"), Some(PathBuf::from("vms/42")));
        for bad in [
            "/../etc/passwd",
            "/assets/../../x",
            "/a\\b",
            "/%2e%2e/x",
            "/./x",
        ] {
            assert_eq!(relative(bad), None, "{bad}");
        }
    }
}
