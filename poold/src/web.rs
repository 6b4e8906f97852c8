//! The web console's port (`--web-listen`): HTTPS with the member's certificate, asking
//! no client certificate, serving
//! - `PoolService` as gRPC-Web: the same handler, tokens and authorization as the gRPC
//!   port (a browser cannot read HTTP/2 trailers, so plain gRPC cannot come from one);
//! - VM serial consoles as websockets (`/console/ws?ticket=...`), opened with a one-shot
//!   ticket from `CreateConsoleTicket` and from this origin's pages only;
//! - a VM as an OVA, a disk as qcow2 or raw: prepared on this member while the page
//!   follows its progress, then downloaded with a one-shot ticket (`/export/...`, with
//!   the caller's token; `service::pool::export`);
//! - this member's metrics for Prometheus (`/metrics`), to a bearer token of a user who
//!   may call `QueryMetrics` (read-only and up);
//! - the console's built files from `--web-root` (`index.html` for any other path
//!   without an extension, so the console's own routes load it), or, when there is none,
//!   a page saying how to build it: the API on this port works either way.
//!
//! Every page goes out with a content security policy that allows only this origin.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use pool_trust::serve::ServerTls;
use proto::coordinator::pool_service_server::PoolServiceServer;
use proto::host as hpb;
use tokio::net::TcpListener;
use tonic::service::Routes;
use tonic::transport::server::TcpConnectInfo;
use tower::ServiceExt;
use tower_layer::Layer;

use crate::service::pool::PoolHandler;
use crate::service::pool::console::{self, ConsoleStream};
use crate::service::pool::export::{self, Exports};

/// Shown where the console's files are missing.
pub const NOT_BUILT: &str = "The web console's pages are not installed with this poold \
(--web-root names their directory). PoolService answers on this port as gRPC-Web.";

const CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
style-src 'self' 'unsafe-inline'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

/// The console's routes: gRPC-Web for `PoolService`, VM consoles' websockets, VM
/// exports, files for the rest.
pub fn router(handler: PoolHandler, root: Option<PathBuf>, exports: Arc<Exports>) -> axum::Router {
    let consoles = handler.clone();
    let (ex_h, ex) = (handler.clone(), exports.clone());
    let (dl_h, dl) = (handler.clone(), exports);
    let api = PoolServiceServer::new(handler).max_decoding_message_size(16 << 20);
    Routes::new(tonic_web::GrpcWebLayer::new().layer(api))
        .prepare()
        .into_axum_router()
        .route(
            pool_trust::scrape::METRICS_PATH,
            axum::routing::get({
                let h = consoles.clone();
                move |parts: Parts| {
                    let h = h.clone();
                    async move { metrics(&h, &parts) }
                }
            }),
        )
        .route(
            console::WEBSOCKET_PATH,
            axum::routing::get(move |ws: WebSocketUpgrade, parts: Parts| {
                let h = consoles.clone();
                async move { console_socket(h, ws, parts).await }
            }),
        )
        .route(
            export::PREPARE_PATH,
            axum::routing::post(export_route(&ex_h, &ex, export::PREPARE_PATH)),
        )
        .route(
            export::STATUS_PATH,
            axum::routing::get(export_route(&ex_h, &ex, export::STATUS_PATH)).delete(export_route(
                &ex_h,
                &ex,
                export::STATUS_PATH,
            )),
        )
        .route(
            export::TICKET_PATH,
            axum::routing::post(export_route(&ex_h, &ex, export::TICKET_PATH)),
        )
        .route(
            export::DOWNLOAD_PATH,
            axum::routing::get(move |parts: Parts| {
                let (h, ex) = (dl_h.clone(), dl.clone());
                async move { export_download(&h, &ex, &parts).await }
            }),
        )
        .fallback(move |req: Request<Body>| {
            let root = root.clone();
            async move { file(root.as_deref(), req.method(), req.uri().path()).await }
        })
}

/// A handler for export route `what` ([`export_call`]).
fn export_route(
    h: &PoolHandler,
    ex: &Arc<Exports>,
    what: &'static str,
) -> impl Fn(Parts) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<Body>> + Send>>
+ Clone
+ Send
+ Sync
+ 'static {
    let (h, ex) = (h.clone(), ex.clone());
    move |parts: Parts| {
        let (h, ex) = (h.clone(), ex.clone());
        Box::pin(async move { export_call(&h, &ex, what, &parts).await })
    }
}

/// Serves the console on `listener` until `stop` turns true: HTTP/2 by ALPN (gRPC-Web and
/// files), HTTP/1.1 for the rest and for websockets, which tonic's own server cannot
/// upgrade to.
pub async fn serve(
    handler: PoolHandler,
    root: Option<PathBuf>,
    exports: Arc<Exports>,
    listener: TcpListener,
    tls: ServerTls,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let app = router(handler, root, exports);
    let mut incoming = tls.incoming(listener);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    http.http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Some(Duration::from_secs(10)));
    loop {
        let next = tokio::select! {
            next = incoming.next() => next,
            _ = stop.wait_for(|s| *s) => break,
        };
        let stream = match next {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "a console connection failed its handshake");
                continue;
            }
            None => break,
        };
        let tcp = stream.get_ref().0;
        // Where tonic's requests look for the peer (the audit log's address).
        let info = TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: tcp.peer_addr().ok(),
        };
        // The one router for every connection (a clone is a reference count), each request
        // given its connection's addresses.
        let svc = TowerToHyperService::new(app.clone().map_request(move |mut r: Request<_>| {
            r.extensions_mut().insert(info.clone());
            r
        }));
        let conn = http
            .serve_connection_with_upgrades(TokioIo::new(stream), svc)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "a console connection ended");
            }
        });
    }
    // Streams (a followed feed, a console) would hold the shutdown forever.
    let _ = tokio::time::timeout(Duration::from_secs(2), graceful.shutdown()).await;
}

/// Scraping reads what `QueryMetrics` reads, so it is held to that call's rule.
const METRICS_METHOD: &str = "QueryMetrics";

/// `GET /metrics`: this member's Raft metrics (`consensus::node::encode_scrape`), for a
/// caller whose token may call [`METRICS_METHOD`].
fn metrics(h: &PoolHandler, parts: &Parts) -> Response<Body> {
    let peer = parts
        .extensions
        .get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let header = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let decided = crate::auth::authorize(
        &h.c.node.state(),
        header,
        METRICS_METHOD,
        &peer,
        proto::unix_ms(),
    );
    if let Err(e) = decided {
        tracing::warn!(%peer, error = %e, "refused a metrics scrape");
        let status = match e {
            crate::auth::AuthError::Denied { .. } => StatusCode::FORBIDDEN,
            _ => StatusCode::UNAUTHORIZED,
        };
        let mut r = page(
            status,
            "text/plain; charset=utf-8",
            format!("{e}\n").into_bytes(),
        );
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return r;
    }
    let text = crate::consensus::node::encode_scrape(&h.c.node.status(), &h.c.node.shared.metrics);
    page(
        StatusCode::OK,
        pool_trust::scrape::OPENMETRICS_CONTENT_TYPE,
        text.into_bytes(),
    )
}

/// Opens a VM's console as a websocket: the ticket spent, its caller checked again, the
/// relay to the VM's host open; then bytes both ways as binary messages until either side
/// ends.
async fn console_socket(h: PoolHandler, ws: WebSocketUpgrade, parts: Parts) -> Response<Body> {
    let text = |status, msg: &str| {
        page(
            status,
            "text/plain; charset=utf-8",
            format!("{msg}\n").into_bytes(),
        )
    };
    // Another site's page could open a websocket here with the browser's help; only this
    // origin's pages may (a ticket is secret too, but the check costs nothing).
    if !same_origin(&parts) {
        return text(
            StatusCode::FORBIDDEN,
            "a console opens only from this console's own pages",
        );
    }
    match console::open_ticket(&h, query(&parts, "ticket"), peer_of(&parts)).await {
        Ok((out, input)) => ws.on_upgrade(move |socket| relay(socket, input, out)),
        // A websocket has no login to go back to: a token no longer valid is a refusal.
        Err(s) if s.code() == tonic::Code::Unauthenticated => {
            text(StatusCode::FORBIDDEN, s.message())
        }
        Err(s) => text(http_status(&s), s.message()),
    }
}

/// A refusal's HTTP status.
fn http_status(s: &tonic::Status) -> StatusCode {
    match s.code() {
        tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::FailedPrecondition | tonic::Code::Aborted => StatusCode::CONFLICT,
        tonic::Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    }
}

fn peer_of(parts: &Parts) -> Option<std::net::SocketAddr> {
    parts
        .extensions
        .get::<TcpConnectInfo>()
        .and_then(|i| i.remote_addr)
}

fn query<'a>(parts: &'a Parts, key: &str) -> &'a str {
    parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or("")
}

fn plain(status: StatusCode, msg: &str) -> Response<Body> {
    page(
        status,
        "text/plain; charset=utf-8",
        format!("{msg}\n").into_bytes(),
    )
}

fn authorization(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// A small answer the page reads (JSON or a path): never cached.
fn answer(content_type: &'static str, body: String) -> Response<Body> {
    let mut r = page(StatusCode::OK, content_type, body.into_bytes());
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// The export routes but the download: `POST /export/prepare?vm=|volume=&format=`
/// (`{"id":…}`), `GET|DELETE /export/status?id=` (the progress as JSON; cancel),
/// `POST /export/ticket?id=` (the download's path with its ticket). Each with the
/// caller's token; those that change something from this origin's pages only (a
/// same-origin GET carries no `Origin`).
async fn export_call(
    h: &PoolHandler,
    ex: &Arc<Exports>,
    what: &str,
    parts: &Parts,
) -> Response<Body> {
    if parts.method != Method::GET && !same_origin(parts) {
        return plain(
            StatusCode::FORBIDDEN,
            "an export is asked for only from this console's own pages",
        );
    }
    let (auth, peer, id) = (authorization(parts), peer_of(parts), query(parts, "id"));
    let res = match (what, &parts.method) {
        (export::PREPARE_PATH, _) => {
            match export::target(
                query(parts, "vm"),
                query(parts, "volume"),
                query(parts, "format"),
            ) {
                Ok(t) => export::start(h, ex, auth, peer, t)
                    .await
                    .map(|id| answer("application/json", format!("{{\"id\":\"{id}\"}}"))),
                Err(s) => Err(s),
            }
        }
        (export::STATUS_PATH, &Method::DELETE) => {
            export::cancel(h, ex, auth, peer, id).map(|()| answer("text/plain", String::new()))
        }
        (export::STATUS_PATH, _) => {
            export::status(h, ex, auth, peer, id).map(|p| answer("application/json", p.to_json()))
        }
        _ => export::ticket(h, ex, auth, peer, id).map(|t| {
            answer(
                "text/plain; charset=utf-8",
                format!("{}?ticket={t}", export::DOWNLOAD_PATH),
            )
        }),
    };
    res.unwrap_or_else(|s| plain(http_status(&s), s.message()))
}

/// `GET /export/download?ticket=`: the prepared file, with its length; its files go when
/// it is sent (or the browser leaves).
async fn export_download(h: &PoolHandler, ex: &Exports, parts: &Parts) -> Response<Body> {
    let ready = match export::download(h, ex, query(parts, "ticket"), peer_of(parts)) {
        Ok(r) => r,
        Err(s) => return plain(http_status(&s), s.message()),
    };
    let name = ready.prepared.file_name();
    let size = ready.size;
    let content_type = if name.ends_with(".ova") {
        "application/x-tar"
    } else {
        "application/octet-stream"
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    // The file is written by blocking code: on a thread of its own, into the body.
    tokio::task::spawn_blocking(move || {
        let out = BodyWriter {
            tx: tx.clone(),
            buf: Vec::with_capacity(BODY_CHUNK),
        };
        if let Err(e) = ready.prepared.write(out) {
            tracing::warn!(error = %format!("{e:#}"), "an export's download ended early");
            let _ = tx.blocking_send(Err(std::io::Error::other("the export ended early")));
        }
        // The export's files go with `ready`.
        drop(ready);
    });
    let body = Body::from_stream(tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(
        rx,
    ));
    let mut r = Response::new(body);
    let hs = r.headers_mut();
    hs.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    hs.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    // The name holds only letters, digits, `.`, `_` and `-` (`file_stem`).
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{name}\"")) {
        hs.insert(header::CONTENT_DISPOSITION, v);
    }
    hs.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    hs.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

/// Bytes a download's body takes at a time.
const BODY_CHUNK: usize = 256 << 10;

/// The download's body as `Write`: chunks to the response; an error once the browser
/// left, which ends the writing.
struct BodyWriter {
    tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl Write for BodyWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= BODY_CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(
            &mut self.buf,
            Vec::with_capacity(BODY_CHUNK),
        ));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the browser left"))
    }
}

/// The page that asks comes from this origin: `Origin` is `https://` and the host asked
/// (`Host` over HTTP/1.1, the `:authority` over HTTP/2).
fn same_origin(parts: &Parts) -> bool {
    let get = |h| {
        parts
            .headers
            .get(h)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let host = get(header::HOST).or_else(|| parts.uri.authority().map(|a| a.as_str()));
    match (get(header::ORIGIN), host) {
        (Some(origin), Some(host)) => origin.strip_prefix("https://") == Some(host),
        _ => false,
    }
}

/// How often an idle console's websocket is pinged (proxies close quiet connections).
const PING_EVERY: Duration = Duration::from_secs(30);

async fn relay(
    socket: WebSocket,
    input: tokio::sync::mpsc::Sender<hpb::ConsoleInput>,
    mut out: ConsoleStream,
) {
    let (mut to_browser, mut from_browser) = socket.split();
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.tick().await;
    let close = |code, reason: &str| {
        // A close frame's reason holds 123 bytes.
        let mut end = reason.len().min(123);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        Message::Close(Some(CloseFrame {
            code,
            reason: reason[..end].into(),
        }))
    };
    loop {
        tokio::select! {
            m = from_browser.next() => {
                let data = match m {
                    Some(Ok(Message::Binary(b))) => b.to_vec(),
                    Some(Ok(Message::Text(t))) => t.as_bytes().to_vec(),
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    _ => break,
                };
                let msg = hpb::ConsoleInput { data, ..Default::default() };
                if input.send(msg).await.is_err() {
                    break;
                }
            }
            o = out.next() => {
                let msg = match o {
                    Some(Ok(chunk)) => {
                        let mut data = Vec::new();
                        if chunk.dropped_bytes > 0 {
                            data.extend_from_slice(
                                format!("\r\n[{} bytes of history dropped]\r\n", chunk.dropped_bytes)
                                    .as_bytes(),
                            );
                        }
                        data.extend_from_slice(&chunk.data);
                        Message::Binary(data.into())
                    }
                    Some(Err(s)) => {
                        let _ = to_browser.send(close(1011, s.message())).await;
                        break;
                    }
                    None => {
                        let _ = to_browser.send(close(1000, "the VM's console ended")).await;
                        break;
                    }
                };
                if to_browser.send(msg).await.is_err() {
                    break;
                }
            }
            _ = ping.tick() => {
                if to_browser.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
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

    #[test]
    fn the_same_origin_is_told_by_host_or_by_authority() {
        let parts = |uri: &str, headers: &[(&str, &str)]| {
            let mut b = Request::builder().uri(uri);
            for (k, v) in headers {
                b = b.header(*k, *v);
            }
            b.body(()).unwrap().into_parts().0
        };
        let me = "https://10.0.0.1:7141";
        // HTTP/1.1: the Host header; HTTP/2: the request's authority.
        assert!(same_origin(&parts(
            "/x",
            &[("host", "10.0.0.1:7141"), ("origin", me)]
        )));
        assert!(same_origin(&parts(
            "https://10.0.0.1:7141/x",
            &[("origin", me)]
        )));
        assert!(!same_origin(&parts(
            "https://10.0.0.1:7141/x",
            &[("origin", "https://evil.example")]
        )));
        assert!(!same_origin(&parts("https://10.0.0.1:7141/x", &[])));
        assert!(!same_origin(&parts("/x", &[("origin", me)])));
    }

    #[test]
    fn a_query_value_is_found_by_its_whole_key() {
        let parts = |uri: &str| Request::builder().uri(uri).body(()).unwrap().into_parts().0;
        let p = parts("/export/download?xticket=a&ticket=b&vm=c");
        assert_eq!(query(&p, "ticket"), "b");
        assert_eq!(query(&p, "vm"), "c");
        assert_eq!(query(&parts("/export/download"), "ticket"), "");
        assert_eq!(query(&parts("/export/download?ticket"), "ticket"), "");
    }
}
