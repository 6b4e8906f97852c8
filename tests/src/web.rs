//! The web console's port as a browser uses it, through curl: files, gRPC-Web calls of
//! PoolService (unary and streams), websocket handshakes.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::{free_port, secret_file};

/// A console port as curl reaches it: `base` (https://addr), the CA bundle that trusts
/// it, and a directory for request bodies and header files.
pub struct Web {
    pub base: String,
    pub ca: PathBuf,
    pub dir: PathBuf,
}

impl Web {
    pub fn curl(&self) -> Command {
        let mut c = Command::new("curl");
        c.args(["-sS", "--cacert"]).arg(&self.ca);
        c
    }

    /// Status, lower-case headers and body of a request for `path`.
    pub fn get(&self, args: &[&str], path: &str) -> (u16, String, String) {
        let o = self
            .curl()
            .args(["-i", "--path-as-is"])
            .args(args)
            .arg(format!("{}{path}", self.base))
            .output()
            .expect("running curl");
        let (status, head, body) = response(&o.stdout);
        (status, head.to_lowercase(), body)
    }

    /// Sends `req` to PoolService's `method` as gRPC-Web over HTTP/1.1 (with `token`),
    /// for at most `limit`; the messages that came back, and the status: the trailers'
    /// text, or the headers' for an answer that is only a status.
    pub fn grpc_web(
        &self,
        method: &str,
        req: &[u8],
        token: Option<&str>,
        limit: Duration,
    ) -> (Vec<Vec<u8>>, String) {
        let (child, headers) = self.call(method, req, token, limit);
        let out = child.wait_with_output().unwrap();
        let (msgs, trailers) = frames(&out);
        let headers = std::fs::read_to_string(headers).unwrap_or_default();
        (
            msgs,
            format!("{}{trailers}", headers.to_lowercase()).replace(": ", ":"),
        )
    }

    /// Starts the call; its headers go to the file returned.
    pub fn call(
        &self,
        method: &str,
        req: &[u8],
        token: Option<&str>,
        limit: Duration,
    ) -> (std::process::Child, PathBuf) {
        let n = free_port();
        let headers = self.dir.join(format!("headers-{n}"));
        let body = self.dir.join(format!("req-{n}.bin"));
        let mut framed = vec![0u8];
        framed.extend_from_slice(&(req.len() as u32).to_be_bytes());
        framed.extend_from_slice(req);
        std::fs::write(&body, framed).unwrap();
        let mut c = self.curl();
        c.args(["--http1.1", "-X", "POST", "--max-time"])
            .arg(format!("{}", limit.as_secs_f64()))
            .args([
                "-H",
                "content-type: application/grpc-web+proto",
                "-H",
                "x-grpc-web: 1",
            ])
            .arg("--data-binary")
            .arg(format!("@{}", body.display()))
            .arg("--dump-header")
            .arg(&headers);
        if let Some(t) = token {
            // A header file, not the command line: a token is a secret.
            let h = secret_file(
                &self.dir,
                &format!("auth-{n}"),
                &format!("authorization: Bearer {t}"),
            );
            c.arg("-H").arg(format!("@{h}"));
        }
        c.arg(format!("{}/pool.v1.PoolService/{method}", self.base))
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map(|child| (child, headers))
            .expect("running curl")
    }
}

/// The gRPC-Web frames of a response body: messages, and the trailers' text.
pub fn frames(out: &Output) -> (Vec<Vec<u8>>, String) {
    let mut b = &out.stdout[..];
    let mut msgs = Vec::new();
    let mut trailers = String::new();
    while b.len() >= 5 {
        let flag = b[0];
        let len = u32::from_be_bytes(b[1..5].try_into().unwrap()) as usize;
        let Some(payload) = b.get(5..5 + len) else {
            break;
        };
        if flag & 0x80 != 0 {
            trailers.push_str(&String::from_utf8_lossy(payload));
        } else {
            msgs.push(payload.to_vec());
        }
        b = &b[5 + len..];
    }
    (msgs, trailers.to_lowercase())
}

pub fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

impl Web {
    /// A websocket handshake for `path` (with its query) over HTTP/1.1, from `origin`: the
    /// answer's status and body (101 for a socket opened, which is then dropped). The URL
    /// goes in a config file: a ticket is a secret.
    pub fn websocket(&self, path: &str, origin: Option<&str>) -> (u16, String) {
        let n = free_port();
        let mut text = format!("url = \"{}{path}\"\n", self.base);
        if let Some(o) = origin {
            text.push_str(&format!("header = \"Origin: {o}\"\n"));
        }
        let config = secret_file(&self.dir, &format!("ws-{n}.curl"), &text);
        let o = self
            .curl()
            .args(["-i", "--http1.1", "--max-time", "3"])
            .args(["-H", "Connection: Upgrade", "-H", "Upgrade: websocket"])
            .args(["-H", "Sec-WebSocket-Version: 13"])
            .args(["-H", "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="])
            .arg("-K")
            .arg(&config)
            .output()
            .expect("running curl");
        let (status, _, body) = response(&o.stdout);
        (status, body)
    }
}

/// The status, head and body of what `curl -i` printed.
fn response(out: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(out).replace("\r\n", "\n");
    let (head, body) = text.split_once("\n\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_owned(), body.to_owned())
}
