//! Shared fixtures: a target on a loopback port with file-backed LUNs, the peer tools
//! (libiscsi utilities, qemu-img, qemu-io) and a small raw initiator built on iscsi-pdu
//! for the protocol cases no tool can produce.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use iscsi_pdu::bhs::{Header, LoginRequest, RESERVED_TAG, ScsiCommand, login_status, stage};
use iscsi_pdu::frame::{self, FrameConfig, RawPdu};
use iscsi_pdu::{chap, text};
use iscsi_target::{
    FileBlockDevice, InitiatorAccess, LunConfig, PrStore, ServerOptions, TargetConfig,
    TargetServer, naa_from_serial,
};

pub const INIT_A: &str = "iqn.2024-01.org.pool.test:host-a";
pub const INIT_B: &str = "iqn.2024-01.org.pool.test:host-b";

/// A target served on 127.0.0.1:<random port> by a runtime of its own.
pub struct Harness {
    pub server: TargetServer,
    pub addr: SocketAddr,
    pub iqn: String,
    pub dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    done: Option<std::sync::mpsc::Receiver<()>>,
}

impl Harness {
    /// One LUN of `size` bytes; `access` lists the initiators (any initiator when empty).
    pub fn start(size: u64, access: Vec<InitiatorAccess>) -> Self {
        Self::start_with(size, access, None)
    }

    pub fn start_with(
        size: u64,
        access: Vec<InitiatorAccess>,
        store: Option<Arc<dyn PrStore>>,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, size, access, store)
    }

    pub fn start_in(
        dir: tempfile::TempDir,
        size: u64,
        access: Vec<InitiatorAccess>,
        store: Option<Arc<dyn PrStore>>,
    ) -> Self {
        let opts = ServerOptions {
            nop_interval: None,
            ..ServerOptions::default()
        };
        Self::start_full(dir, size, access, store, opts)
    }

    /// Like [`Harness::start`], with server options of the test's choosing.
    pub fn start_with_options(
        size: u64,
        access: Vec<InitiatorAccess>,
        opts: ServerOptions,
    ) -> Self {
        Self::start_full(tempfile::tempdir().unwrap(), size, access, None, opts)
    }

    fn start_full(
        dir: tempfile::TempDir,
        size: u64,
        access: Vec<InitiatorAccess>,
        store: Option<Arc<dyn PrStore>>,
        opts: ServerOptions,
    ) -> Self {
        let iqn = "iqn.2024-01.org.pool.test:lun".to_string();
        let dev =
            FileBlockDevice::open(&dir.path().join("lun0.img"), Some(size), 512, false).unwrap();
        let server = match store {
            Some(s) => TargetServer::new(opts, s),
            None => TargetServer::in_memory(opts),
        };
        server
            .add_target(TargetConfig {
                iqn: iqn.clone(),
                alias: None,
                luns: vec![LunConfig {
                    id: 0,
                    device: Arc::new(dev),
                    serial: "interop-serial-0".into(),
                    naa: naa_from_serial("interop-serial-0"),
                }],
                allow_any_initiator: access.is_empty(),
                initiators: access,
            })
            .unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let addr = listener.local_addr().unwrap();
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
        Self {
            server,
            addr,
            iqn,
            dir,
            rt,
            stop: Some(stop),
            done: Some(done),
        }
    }

    pub fn url(&self) -> String {
        format!("iscsi://127.0.0.1:{}/{}/0", self.addr.port(), self.iqn)
    }

    pub fn lun_path(&self) -> PathBuf {
        self.dir.path().join("lun0.img")
    }

    /// Stops the server and waits for it; returns the temporary directory.
    pub fn stop(mut self) -> tempfile::TempDir {
        self.shutdown();
        let dir = tempfile::tempdir().unwrap();
        std::mem::replace(&mut self.dir, dir)
    }

    fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            let _ = d.recv_timeout(Duration::from_secs(20));
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The path of a peer tool, or `None` after printing why the test is skipped.
pub fn tool(name: &str, package: &str) -> Option<PathBuf> {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return Some(p);
        }
    }
    eprintln!("SKIPPED: {name} is not installed (Debian package {package})");
    None
}

/// Whether this qemu-img was built with the iSCSI block driver (qemu-block-extra).
pub fn qemu_has_iscsi(qemu_img: &Path) -> bool {
    let out = Command::new(qemu_img).arg("--help").output().unwrap();
    let ok = String::from_utf8_lossy(&out.stdout).contains("iscsi");
    if !ok {
        eprintln!(
            "SKIPPED: qemu-img lacks the iscsi driver (install qemu-utils and qemu-block-extra of the same version)"
        );
    }
    ok
}

/// Runs a command with a time limit; panics with its output when it cannot start.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(_status) = child.try_wait().unwrap() {
            return child.wait_with_output().unwrap();
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} ran past {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn text_of(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A minimal initiator: login (optionally CHAP), SCSI commands with immediate data.
pub struct RawInitiator {
    pub stream: TcpStream,
    buf: BytesMut,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    itt: u32,
}

/// Text keys of a login response.
type Keys = Vec<(String, String)>;

/// What a login ended with.
#[derive(Debug, PartialEq, Eq)]
pub enum LoginResult {
    Ok,
    Refused(u8, u8),
}

impl RawInitiator {
    pub fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        Self {
            stream,
            buf: BytesMut::new(),
            cmd_sn: 1,
            exp_stat_sn: 0,
            itt: 1,
        }
    }

    pub fn send(&mut self, header: &Header, data: &[u8]) {
        let mut out = Vec::new();
        frame::encode(header, &[], data, &FrameConfig::default(), &mut out).unwrap();
        self.stream.write_all(&out).unwrap();
    }

    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next PDU, or `None` when the target closed the connection.
    pub fn recv(&mut self) -> Option<RawPdu> {
        let cfg = FrameConfig {
            max_recv_data_segment: 1 << 20,
            ..FrameConfig::default()
        };
        loop {
            if let Some(p) = frame::decode(&mut self.buf, &cfg).unwrap() {
                if let Ok(h) = p.header() {
                    let sn = match h {
                        Header::ScsiResponse(r) => Some(r.stat_sn),
                        Header::LoginResponse(r) => Some(r.stat_sn),
                        Header::NopIn(r) => Some(r.stat_sn),
                        Header::TaskMgmtResponse(r) => Some(r.stat_sn),
                        Header::DataIn(d) if d.has_status => Some(d.stat_sn),
                        _ => None,
                    };
                    if let Some(sn) = sn {
                        self.exp_stat_sn = sn.wrapping_add(1);
                    }
                }
                return Some(p);
            }
            let mut chunk = [0u8; 65536];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("reading from the target: {e}"),
            }
        }
    }

    fn next_itt(&mut self) -> u32 {
        self.itt += 1;
        self.itt
    }

    /// Logs in to `target` as `initiator` with ISID `isid`; `chap` = (user, secret) and
    /// the optional mutual secret the target must prove.
    pub fn login(
        &mut self,
        initiator: &str,
        target: &str,
        isid: [u8; 6],
        chap: Option<(&str, &[u8])>,
        mutual: Option<&[u8]>,
    ) -> LoginResult {
        let itt = self.next_itt();
        let mut req = LoginRequest {
            transit: true,
            csg: stage::SECURITY,
            nsg: stage::OPERATIONAL,
            isid,
            itt,
            cmd_sn: self.cmd_sn,
            ..Default::default()
        };
        let method = if chap.is_some() { "CHAP" } else { "None" };
        let first = text::encode(&[
            ("InitiatorName", initiator),
            ("SessionType", "Normal"),
            ("TargetName", target),
            ("AuthMethod", method),
        ]);
        req.transit = chap.is_none();
        self.send(&Header::LoginRequest(req), &first);
        let r = self.login_response();
        if let Err(s) = r.0 {
            return LoginResult::Refused(s.0, s.1);
        }
        if let Some((user, secret)) = chap {
            req.transit = false;
            req.exp_stat_sn = self.exp_stat_sn;
            self.send(
                &Header::LoginRequest(req),
                &text::encode(&[("CHAP_A", "5")]),
            );
            let (res, keys) = self.login_response();
            if let Err(s) = res {
                return LoginResult::Refused(s.0, s.1);
            }
            let get = |k: &str| {
                keys.iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
            };
            let id: u8 = get("CHAP_I").unwrap().parse().unwrap();
            let c = chap::decode_binary(&get("CHAP_C").unwrap()).unwrap();
            let resp = chap::encode_hex(&chap::response(id, secret, &c));
            let my_challenge = [7u8; 16];
            let mut pairs = vec![
                ("CHAP_N".to_string(), user.to_string()),
                ("CHAP_R".into(), resp),
            ];
            if mutual.is_some() {
                pairs.push(("CHAP_I".into(), "9".into()));
                pairs.push(("CHAP_C".into(), chap::encode_hex(&my_challenge)));
            }
            req.transit = true;
            req.exp_stat_sn = self.exp_stat_sn;
            self.send(&Header::LoginRequest(req), &text::encode(&pairs));
            let (res, keys) = self.login_response();
            if let Err(s) = res {
                return LoginResult::Refused(s.0, s.1);
            }
            if let Some(secret) = mutual {
                let get = |k: &str| {
                    keys.iter()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.clone())
                };
                let r = chap::decode_binary(&get("CHAP_R").expect("mutual CHAP answer")).unwrap();
                if !chap::verify(9, secret, &my_challenge, &r) {
                    return LoginResult::Refused(0xff, 0xff);
                }
            }
        }
        let mut op = LoginRequest {
            transit: true,
            csg: stage::OPERATIONAL,
            nsg: stage::FULL_FEATURE,
            isid,
            itt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ..Default::default()
        };
        op.exp_stat_sn = self.exp_stat_sn;
        let keys = text::encode(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
            ("FirstBurstLength", "65536"),
            ("MaxBurstLength", "262144"),
        ]);
        self.send(&Header::LoginRequest(op), &keys);
        match self.login_response().0 {
            Ok(()) => LoginResult::Ok,
            Err(s) => LoginResult::Refused(s.0, s.1),
        }
    }

    /// Logs in to a discovery session as `initiator`.
    pub fn login_discovery(&mut self, initiator: &str, isid: [u8; 6]) -> LoginResult {
        let itt = self.next_itt();
        let req = LoginRequest {
            transit: true,
            csg: stage::SECURITY,
            nsg: stage::OPERATIONAL,
            isid,
            itt,
            cmd_sn: self.cmd_sn,
            ..Default::default()
        };
        let first = text::encode(&[
            ("InitiatorName", initiator),
            ("SessionType", "Discovery"),
            ("AuthMethod", "None"),
        ]);
        self.send(&Header::LoginRequest(req), &first);
        if let Err(s) = self.login_response().0 {
            return LoginResult::Refused(s.0, s.1);
        }
        let op = LoginRequest {
            transit: true,
            csg: stage::OPERATIONAL,
            nsg: stage::FULL_FEATURE,
            isid,
            itt,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ..Default::default()
        };
        let keys = text::encode(&[
            ("HeaderDigest", "None"),
            ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "262144"),
        ]);
        self.send(&Header::LoginRequest(op), &keys);
        match self.login_response().0 {
            Ok(()) => LoginResult::Ok,
            Err(s) => LoginResult::Refused(s.0, s.1),
        }
    }

    /// SendTargets=All in a discovery session: the keys of the answer, or `None` when
    /// the target closed the connection.
    pub fn send_targets(&mut self) -> Option<Keys> {
        let itt = self.next_itt();
        let req = iscsi_pdu::bhs::TextRequest {
            final_: true,
            itt,
            ttt: RESERVED_TAG,
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            ..Default::default()
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(
            &Header::TextRequest(req),
            &text::encode(&[("SendTargets", "All")]),
        );
        loop {
            let p = self.recv()?;
            match p.header().unwrap() {
                Header::TextResponse(r) => {
                    self.exp_stat_sn = r.stat_sn.wrapping_add(1);
                    return Some(text::parse(&p.data).unwrap());
                }
                Header::NopIn(_) | Header::AsyncMessage(_) => {}
                other => panic!("expected a text response, got {other:?}"),
            }
        }
    }

    fn login_response(&mut self) -> (Result<(), (u8, u8)>, Keys) {
        let Some(p) = self.recv() else {
            return (Err((0xff, 0)), Vec::new());
        };
        match p.header().unwrap() {
            Header::LoginResponse(r) => {
                let keys = text::parse(&p.data).unwrap();
                if (r.status_class, r.status_detail) == login_status::SUCCESS {
                    (Ok(()), keys)
                } else {
                    (Err((r.status_class, r.status_detail)), keys)
                }
            }
            other => panic!("expected a login response, got {other:?}"),
        }
    }

    /// Sends a SCSI command (data, if any, as immediate data) and collects Data-In and
    /// the status. Returns (status, data, sense).
    pub fn command(
        &mut self,
        cdb: &[u8],
        read_len: u32,
        write: &[u8],
    ) -> Option<(u8, Vec<u8>, Vec<u8>)> {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        let itt = self.next_itt();
        let cmd = ScsiCommand {
            immediate: false,
            final_: true,
            read: read_len > 0,
            write: !write.is_empty(),
            attr: 1,
            lun: 0,
            itt,
            expected_data_len: if write.is_empty() {
                read_len
            } else {
                write.len() as u32
            },
            cmd_sn: self.cmd_sn,
            exp_stat_sn: self.exp_stat_sn,
            cdb: c,
        };
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        self.send(&Header::ScsiCommand(cmd), write);
        let mut data = Vec::new();
        loop {
            let p = self.recv()?;
            match p.header().unwrap() {
                Header::DataIn(d) => {
                    data.extend_from_slice(&p.data);
                    if d.has_status {
                        return Some((d.status, data, Vec::new()));
                    }
                }
                Header::ScsiResponse(r) => {
                    let sense = if p.data.len() >= 2 {
                        p.data[2..].to_vec()
                    } else {
                        Vec::new()
                    };
                    return Some((r.status, data, sense));
                }
                Header::NopIn(_) | Header::AsyncMessage(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    pub fn test_unit_ready(&mut self) -> Option<u8> {
        self.command(&[0, 0, 0, 0, 0, 0], 0, &[]).map(|r| r.0)
    }

    /// Waits until the target closes the connection; true if it did within `limit`.
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.stream.set_read_timeout(Some(limit)).unwrap();
        loop {
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
        }
    }
}

pub const NO_TAG: u32 = RESERVED_TAG;
