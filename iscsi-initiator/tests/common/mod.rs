//! Shared fixtures: the two targets every feature is tested against, started on loopback
//! by the test itself.
//!
//! - [`Tgt`]: a `tgtd` process (Linux SCSI target framework) with its own IPC socket and
//!   port, one file-backed LUN (LUN 1; LUN 0 is its controller), optional CHAP accounts.
//!   It can be killed (SIGKILL: tgtd ignores SIGTERM) and started again on the same port
//!   and file.
//! - [`Ours`]: `iscsi-target`'s `TargetServer` on a runtime of its own in this process,
//!   serving a file-backed LUN 0 over real TCP; it can be stopped (it asks initiators to
//!   log out first) and started again on the same port and file.
//!
//! [`Peer`] puts both behind one face so that each test body runs against both.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use iscsi_initiator::{Chap, SessionConfig};
use iscsi_target::{
    BlockDevice, ChapCredentials, FileBlockDevice, InitiatorAccess, LunConfig, ServerOptions,
    TargetConfig, TargetServer, naa_from_serial,
};

pub const INITIATOR: &str = "iqn.2024-01.org.pool.test:initiator";
pub const INITIATOR_B: &str = "iqn.2024-01.org.pool.test:initiator-b";
pub const CHAP_USER: &str = "hostuser";
pub const CHAP_SECRET: &str = "host-secret-123";
pub const MUTUAL_USER: &str = "targetuser";
pub const MUTUAL_SECRET: &str = "target-secret-45";

/// Runs an async test body on a fresh runtime, with a hard limit so that no test can
/// hang the suite.
pub fn run<F: Future<Output = ()>>(limit: Duration, f: F) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(limit, f)
            .await
            .unwrap_or_else(|_| panic!("test body ran past {limit:?}"))
    });
    rt.shutdown_timeout(Duration::from_secs(5));
}

/// A free loopback port (bound then released: good enough for tests).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// What a peer target is set up with.
#[derive(Clone)]
pub struct PeerOptions {
    pub size: u64,
    /// Initiators must authenticate with CHAP (CHAP_USER / CHAP_SECRET).
    pub chap: bool,
    /// The target answers mutual CHAP as MUTUAL_USER / MUTUAL_SECRET.
    pub mutual: bool,
    /// Our target only: its server options.
    pub server: ServerOptions,
    /// Our target only: serve this device instead of a file.
    pub device: Option<Arc<dyn BlockDevice>>,
}

impl Default for PeerOptions {
    fn default() -> Self {
        Self {
            size: 64 << 20,
            chap: false,
            mutual: false,
            server: ServerOptions {
                nop_interval: None,
                ..ServerOptions::default()
            },
            device: None,
        }
    }
}

/// Runs a command with a time limit; panics with its output on failure.
fn must(cmd: &mut Command) {
    let out = run_limited(cmd, Duration::from_secs(20));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn run_limited(cmd: &mut Command, limit: Duration) -> std::process::Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let deadline = Instant::now() + limit;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} ran past {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A tgtd of our own.
pub struct Tgt {
    dir: tempfile::TempDir,
    pub port: u16,
    pub iqn: String,
    opts: PeerOptions,
    child: Option<Child>,
}

impl Tgt {
    /// `None` (after saying why) when tgtd is not installed.
    pub fn start(opts: PeerOptions) -> Option<Self> {
        if !Path::new("/usr/sbin/tgtd").exists() {
            eprintln!("SKIPPED: tgtd is not installed (Debian package tgt)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("lun.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(opts.size)
            .unwrap();
        let mut t = Self {
            dir,
            port: free_port(),
            iqn: "iqn.2024-01.org.pool.test:tgt".into(),
            opts,
            child: None,
        };
        t.launch();
        Some(t)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("tgtd.sock")
    }

    pub fn lun_path(&self) -> PathBuf {
        self.dir.path().join("lun.img")
    }

    fn adm(&self) -> Command {
        let mut c = Command::new("tgtadm");
        c.env("TGT_IPC_SOCKET", self.socket());
        c
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("tgtd.log")).unwrap();
        let child = Command::new("tgtd")
            .args(["-f", "--iscsi", &format!("portal=127.0.0.1:{}", self.port)])
            .env("TGT_IPC_SOCKET", self.socket())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting tgtd");
        self.child = Some(child);
        assert!(
            wait_port(self.port, Duration::from_secs(10)),
            "tgtd did not listen on {}",
            self.port
        );
        // The IPC socket appears a moment after the portal.
        let sock = self.dir.path().join("tgtd.sock.0");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let lun = self.lun_path();
        must(self.adm().args([
            "--lld", "iscsi", "--op", "new", "--mode", "target", "--tid", "1", "-T", &self.iqn,
        ]));
        must(self.adm().args([
            "--lld",
            "iscsi",
            "--op",
            "new",
            "--mode",
            "logicalunit",
            "--tid",
            "1",
            "--lun",
            "1",
            "-b",
            lun.to_str().unwrap(),
        ]));
        // tgt negotiates digests only when the target offers them.
        self.set_param("HeaderDigest", "CRC32C,None");
        self.set_param("DataDigest", "CRC32C,None");
        if self.opts.chap {
            must(self.adm().args([
                "--lld",
                "iscsi",
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                CHAP_USER,
                "--password",
                CHAP_SECRET,
            ]));
            must(self.adm().args([
                "--lld", "iscsi", "--op", "bind", "--mode", "account", "--tid", "1", "--user",
                CHAP_USER,
            ]));
        }
        if self.opts.mutual {
            must(self.adm().args([
                "--lld",
                "iscsi",
                "--op",
                "new",
                "--mode",
                "account",
                "--user",
                MUTUAL_USER,
                "--password",
                MUTUAL_SECRET,
            ]));
            must(self.adm().args([
                "--lld",
                "iscsi",
                "--op",
                "bind",
                "--mode",
                "account",
                "--tid",
                "1",
                "--user",
                MUTUAL_USER,
                "--outgoing",
            ]));
        }
        must(self.adm().args([
            "--lld", "iscsi", "--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL",
        ]));
    }

    /// Sets a target parameter (`nop_interval`, `nop_count`...).
    pub fn set_param(&self, name: &str, value: &str) {
        must(self.adm().args([
            "--lld", "iscsi", "--op", "update", "--mode", "target", "--tid", "1", "-n", name, "-v",
            value,
        ]));
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(self.dir.path().join("tgtd.sock.0"));
        let _ = std::fs::remove_file(self.dir.path().join("tgtd.sock.0.lock"));
    }

    /// Kills tgtd and starts it again, same port, same file, same accounts.
    pub fn restart(&mut self, down_for: Duration) {
        self.kill();
        std::thread::sleep(down_for);
        self.launch();
    }
}

impl Drop for Tgt {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Our target, in this process on a runtime of its own.
pub struct Ours {
    dir: tempfile::TempDir,
    pub port: u16,
    pub iqn: String,
    opts: PeerOptions,
    device: Arc<dyn BlockDevice>,
    pub server: Option<TargetServer>,
    rt: Option<tokio::runtime::Runtime>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::sync::mpsc::Receiver<()>>,
}

impl Ours {
    pub fn start(opts: PeerOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let device: Arc<dyn BlockDevice> = match &opts.device {
            Some(d) => d.clone(),
            None => Arc::new(
                FileBlockDevice::open(&dir.path().join("lun.img"), Some(opts.size), 512, false)
                    .unwrap(),
            ),
        };
        let mut o = Self {
            dir,
            port: 0,
            iqn: "iqn.2024-01.org.pool.test:ours".into(),
            opts,
            device,
            server: None,
            rt: None,
            stop: None,
            done: None,
        };
        o.launch();
        o
    }

    pub fn lun_path(&self) -> PathBuf {
        self.dir.path().join("lun.img")
    }

    fn launch(&mut self) {
        let server = TargetServer::in_memory(self.opts.server.clone());
        let creds = |u: &str, s: &str| ChapCredentials {
            user: u.into(),
            secret: s.as_bytes().to_vec(),
        };
        let access = |name: &str| InitiatorAccess {
            name: name.into(),
            chap: self.opts.chap.then(|| creds(CHAP_USER, CHAP_SECRET)),
            mutual_chap: self.opts.mutual.then(|| creds(MUTUAL_USER, MUTUAL_SECRET)),
        };
        let initiators = if self.opts.chap {
            vec![access(INITIATOR), access(INITIATOR_B)]
        } else {
            Vec::new()
        };
        server
            .add_target(TargetConfig {
                iqn: self.iqn.clone(),
                alias: Some("ours".into()),
                luns: vec![LunConfig {
                    id: 0,
                    device: self.device.clone(),
                    serial: "initiator-test".into(),
                    naa: naa_from_serial("initiator-test"),
                }],
                allow_any_initiator: initiators.is_empty(),
                initiators,
            })
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let addr = format!("127.0.0.1:{}", self.port);
        let listener = rt.block_on(tokio::net::TcpListener::bind(&addr)).unwrap();
        self.port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (done_tx, done) = std::sync::mpsc::channel();
        let s = server.clone();
        rt.spawn(async move {
            s.run(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
            let _ = done_tx.send(());
        });
        self.server = Some(server);
        self.rt = Some(rt);
        self.stop = Some(stop);
        self.done = Some(done);
    }

    /// Stops the server (initiators are asked to log out first) and waits for it.
    pub fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = d.recv_timeout(Duration::from_secs(20));
        }
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
        self.server = None;
    }

    /// Starts a stopped server again on the same port with the same LUN.
    pub fn start_again(&mut self) {
        assert!(self.server.is_none(), "already running");
        self.launch();
    }

    /// Stops the server and starts it again on the same port with the same LUN.
    pub fn restart(&mut self, down_for: Duration) {
        self.stop();
        std::thread::sleep(down_for);
        self.launch();
    }

    pub fn sessions(&self) -> Vec<iscsi_target::SessionInfo> {
        self.server
            .as_ref()
            .map(|s| s.sessions())
            .unwrap_or_default()
    }
}

impl Drop for Ours {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A session config with short timeouts suited to tests.
pub fn test_config(portal: impl Into<String>, iqn: &str) -> SessionConfig {
    let mut c = SessionConfig::new(portal, iqn, INITIATOR);
    c.timeouts.connect = Duration::from_secs(2);
    c.timeouts.login = Duration::from_secs(5);
    c.timeouts.command = Duration::from_secs(10);
    c.timeouts.task_management = Duration::from_secs(5);
    c.timeouts.replacement = Duration::from_secs(30);
    c.timeouts.max_backoff = Duration::from_millis(500);
    c
}

/// Either target, for tests that run against both.
pub enum Peer {
    Tgt(Tgt),
    Ours(Ours),
}

impl Peer {
    pub fn tgt(opts: PeerOptions) -> Option<Self> {
        Tgt::start(opts).map(Self::Tgt)
    }

    pub fn ours(opts: PeerOptions) -> Self {
        Self::Ours(Ours::start(opts))
    }

    pub fn name(&self) -> &'static str {
        match self {
            Self::Tgt(_) => "tgt",
            Self::Ours(_) => "ours",
        }
    }

    pub fn portal(&self) -> String {
        let port = match self {
            Self::Tgt(t) => t.port,
            Self::Ours(o) => o.port,
        };
        format!("127.0.0.1:{port}")
    }

    pub fn iqn(&self) -> &str {
        match self {
            Self::Tgt(t) => &t.iqn,
            Self::Ours(o) => &o.iqn,
        }
    }

    /// The LUN that holds the disk.
    pub fn lun(&self) -> u16 {
        match self {
            Self::Tgt(_) => 1,
            Self::Ours(_) => 0,
        }
    }

    pub fn lun_path(&self) -> PathBuf {
        match self {
            Self::Tgt(t) => t.lun_path(),
            Self::Ours(o) => o.lun_path(),
        }
    }

    pub fn url(&self) -> String {
        format!("iscsi://{}/{}/{}", self.portal(), self.iqn(), self.lun())
    }

    /// A session config with short timeouts suited to tests.
    pub fn config(&self) -> SessionConfig {
        test_config(self.portal(), self.iqn())
    }

    /// The config with the CHAP credentials the peer expects.
    pub fn chap_config(&self) -> SessionConfig {
        let mut c = self.config();
        c.chap = Some(Chap::new(CHAP_USER, CHAP_SECRET));
        c
    }

    /// Restarts the target: tgt is killed, ours stopped; both come back on the same port
    /// with the same data after `down_for`.
    pub fn restart(&mut self, down_for: Duration) {
        match self {
            Self::Tgt(t) => t.restart(down_for),
            Self::Ours(o) => o.restart(down_for),
        }
    }
}

/// A deterministic pattern for block `lba` written in round `round`.
pub fn pattern(lba: u64, round: u64, len: usize) -> Vec<u8> {
    let mut x =
        lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ round.wrapping_mul(0xd1b5_4a32_d192_ed03) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Generates `mod $name { fn tgt(), fn ours() }` running `$body(peer)` against each
/// target, with `$opts` as the peer options.
#[macro_export]
macro_rules! against_both {
    ($name:ident, $opts:expr, $body:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            #[test]
            fn tgt() {
                if let Some(p) = common::Peer::tgt($opts) {
                    $body(p);
                }
            }

            #[test]
            fn ours() {
                $body(common::Peer::ours($opts));
            }
        }
    };
}

/// A TCP relay between the initiator and a target that can be frozen: while paused it
/// accepts connections but moves no bytes, as a hung target (or a black-holed network)
/// would.
pub struct Proxy {
    pub port: u16,
    paused: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Relays 127.0.0.1:<port> to `to`; must be called within a runtime.
    pub async fn start(to: String) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (paused, rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let to = to.clone();
                let rx = rx.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(&to).await else {
                        return;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::join!(relay(cr, sw, rx.clone()), relay(sr, cw, rx));
                });
            }
        });
        Self { port, paused, task }
    }

    pub fn portal(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn pause(&self, on: bool) {
        self.paused.send_replace(on);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        // While paused, read nothing: the bytes stay in the socket buffers.
        while *paused.borrow_and_update() {
            if paused.changed().await.is_err() {
                return;
            }
        }
        let n = tokio::select! {
            r = from.read(&mut buf) => match r {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = paused.changed() => continue,
        };
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
