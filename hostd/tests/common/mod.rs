//! Shared by the daemon tests: a `HostService` server on loopback over mutual TLS with
//! VMs in real `hostd-vmm` processes, the pool CA its certificates come from, and client
//! helpers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hostd::service::{HostIdentity, HostServer};
use hostd::supervisor::manager::{Manager, ManagerConfig};
use hostd::testguest;
use iscsi_target::{
    BlockDevice, ChapCredentials, FileBlockDevice, InitiatorAccess, LunConfig, ServerOptions,
    TargetConfig, TargetServer, naa_from_serial,
};
use pool_trust::{DaemonTls, Identity, LocalCa, PoolId};
use proto::host::host_service_client::HostServiceClient;
use proto::host::*;
use tokio::sync::oneshot;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

pub const WAIT: Duration = Duration::from_secs(30);
pub const INITIATOR: &str = "iqn.2026-11.lab.pool:test-host";
/// The pool the test CAs are of.
pub const POOL: &str = "hosttest";
/// The host every test daemon runs as (its certificate's identity).
pub const HOST: &str = "test-host";

/// A pool CA of the test's own in a temporary directory, issuing TLS directories there.
pub struct Pki {
    dir: tempfile::TempDir,
    pub ca: LocalCa,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = LocalCa::open_or_create(dir.path(), &PoolId::parse(POOL).unwrap()).unwrap();
        Pki { dir, ca }
    }

    /// Where [`Pki::issue`] puts the TLS directory of `identity`.
    pub fn dir_of(&self, identity: &Identity) -> PathBuf {
        self.dir
            .path()
            .join(identity.dns_name(self.ca.ca().pool_id()))
    }

    /// Issues `identity`, named also by `names`, into a TLS directory of its own.
    pub fn issue(&self, identity: &Identity, names: &[&str]) -> DaemonTls {
        self.ca
            .issue(identity, names, &self.dir_of(identity))
            .unwrap()
    }
}

/// A client of the host [`HOST`] at `addr` over TLS configured by `tls`. A refused
/// handshake shows here or on the first call, depending on who notices first.
pub async fn connect_tls(
    addr: &str,
    tls: ClientTlsConfig,
) -> Result<HostServiceClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .connect_timeout(WAIT)
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(HostServiceClient::new(channel))
}

/// A client of the host [`HOST`] at `addr`, as the holder of `tls`.
pub async fn connect_as(addr: &str, tls: &DaemonTls) -> HostServiceClient<Channel> {
    let config = tls.client(&Identity::Host(HOST.into())).unwrap();
    connect_tls(addr, config).await.unwrap()
}

pub struct Daemon {
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub manager: Arc<Manager>,
    /// The host it runs as (its certificate's identity).
    pub host: String,
    /// The CA of this daemon's pool: its own certificate and [`Daemon::member`]'s.
    pub pki: Arc<Pki>,
    /// Coordinator member 1's TLS: what [`Daemon::client`] calls with.
    pub member: DaemonTls,
}

impl Daemon {
    pub async fn start(run_dir: &Path) -> Daemon {
        Self::start_with(run_dir, 256 << 20).await
    }

    pub async fn start_with(run_dir: &Path, reserved: u64) -> Daemon {
        Self::start_at(run_dir, reserved, "127.0.0.1").await
    }

    /// A daemon serving on `ip` (any 127.0.0.0/8 address works on Linux without setup),
    /// so two daemons in one test look like two hosts.
    pub async fn start_at(run_dir: &Path, reserved: u64, ip: &str) -> Daemon {
        Self::start_host(run_dir, reserved, ip, INITIATOR).await
    }

    /// As [`Daemon::start_at`], logging in to iSCSI targets as `initiator_iqn` (two
    /// hosts on one target need names of their own).
    pub async fn start_host(
        run_dir: &Path,
        reserved: u64,
        ip: &str,
        initiator_iqn: &str,
    ) -> Daemon {
        Self::start_in(
            Arc::new(Pki::new()),
            HOST,
            run_dir,
            reserved,
            ip,
            initiator_iqn,
        )
        .await
    }

    /// Host `host` of the pool whose CA is `pki` (hosts that migrate VMs between them
    /// must share one: the stream is TLS between their certificates).
    pub async fn start_in(
        pki: Arc<Pki>,
        host: &str,
        run_dir: &Path,
        reserved: u64,
        ip: &str,
        initiator_iqn: &str,
    ) -> Daemon {
        Self::start_networked(pki, host, run_dir, reserved, ip, initiator_iqn, None).await
    }

    /// As [`Daemon::start_in`], plugging VMs' taps onto networks with `networks` (in the
    /// calling thread's network namespace: a test gives it one of its own).
    pub async fn start_networked(
        pki: Arc<Pki>,
        host: &str,
        run_dir: &Path,
        reserved: u64,
        ip: &str,
        initiator_iqn: &str,
        networks: Option<hostd::network::HostNetConfig>,
    ) -> Daemon {
        let identity = Identity::Host(host.into());
        let tls = pki.issue(&identity, &[ip]);
        let manager = Manager::new(ManagerConfig {
            run_dir: run_dir.to_owned(),
            vmm_binary: env!("CARGO_BIN_EXE_hostd-vmm").into(),
            vmm_args: vec![],
            reserved_memory_bytes: reserved,
            tie_vms_to_daemon: true,
            initiator_iqn: initiator_iqn.into(),
            // The test guest, and disk images in temporary directories.
            image_dirs: hostd::supervisor::spec::ImageDirs::new(&[
                std::env::temp_dir(),
                std::path::Path::new(hostd::testguest::ELF_PATH)
                    .parent()
                    .expect("the guest's directory")
                    .to_owned(),
            ])
            .expect("image directories"),
            tls_dir: pki.dir_of(&identity),
            networks,
            vif_busy_poll_us: None,
        })
        .await
        .unwrap();
        let member = pki.issue(&Identity::Member(1), &[]);
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel();
        let server = HostServer::new(
            manager.clone(),
            HostIdentity {
                host_id: host.into(),
                ..Default::default()
            },
        );
        let task = tokio::spawn(async move {
            let tls =
                pool_trust::serve::ServerTls::new(&tls, pool_trust::ClientAuth::Required).unwrap();
            hostd::service::serve(listener, server, tls, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Daemon {
            addr,
            host: host.into(),
            stop: Some(tx),
            task: Some(task),
            manager,
            pki,
            member,
        }
    }

    /// A client as coordinator member 1, over mutual TLS.
    pub async fn client(&self) -> HostServiceClient<Channel> {
        let config = self
            .member
            .client(&Identity::Host(self.host.clone()))
            .unwrap();
        connect_tls(&self.addr.to_string(), config).await.unwrap()
    }

    /// Stops serving; VMs are left running (as a daemon restart would).
    pub async fn stop_serving(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }
}

pub fn config(cmdline: &str) -> VmConfig {
    VmConfig {
        name: "t".into(),
        vcpus: 1,
        memory_bytes: 64 << 20,
        boot: Some(BootSource {
            kernel_path: testguest::ELF_PATH.into(),
            command_line: cmdline.into(),
            ..Default::default()
        }),
        console_buffer_bytes: 1 << 20,
        ..Default::default()
    }
}

pub async fn create(
    c: &mut HostServiceClient<Channel>,
    id: &str,
    cfg: VmConfig,
    start: bool,
) -> Vm {
    c.create_vm(CreateVmRequest {
        vm_id: id.into(),
        config: Some(cfg),
        start,
    })
    .await
    .unwrap()
    .into_inner()
}

pub async fn get(c: &mut HostServiceClient<Channel>, id: &str) -> Vm {
    c.get_vm(VmRequest { vm_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// The console as a stream reader that accumulates everything it has seen.
pub struct ConsoleReader {
    pub text: String,
    pub stream: tonic::Streaming<ConsoleOutput>,
    pub input: tokio::sync::mpsc::Sender<ConsoleInput>,
}

impl ConsoleReader {
    pub async fn open(c: &mut HostServiceClient<Channel>, id: &str) -> ConsoleReader {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tx.send(ConsoleInput {
            vm_id: id.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let stream = c
            .stream_console(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        ConsoleReader {
            text: String::new(),
            stream,
            input: tx,
        }
    }

    /// Reads until `needle` has been seen (counting from `from` bytes on).
    pub async fn wait_for_from(&mut self, needle: &str, from: usize) -> bool {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if self.text.get(from..).is_some_and(|t| t.contains(needle)) {
                return true;
            }
            match tokio::time::timeout_at(deadline, self.stream.message()).await {
                Ok(Ok(Some(out))) => self.text.push_str(&String::from_utf8_lossy(&out.data)),
                _ => return false,
            }
        }
    }

    pub async fn wait_for(&mut self, needle: &str) -> bool {
        self.wait_for_from(needle, 0).await
    }

    /// Reads until a complete heartbeat line has arrived after byte `from`, and returns
    /// the last one (a line still being printed does not count).
    pub async fn heartbeat_after(&mut self, from: usize) -> Option<hostd::testguest::Heartbeat> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(hb) = self
                .text
                .get(from..)
                .and_then(|t| hostd::testguest::heartbeats(t).last().copied())
            {
                return Some(hb);
            }
            match tokio::time::timeout_at(deadline, self.stream.message()).await {
                Ok(Ok(Some(out))) => self.text.push_str(&String::from_utf8_lossy(&out.data)),
                _ => return None,
            }
        }
    }
}

pub async fn wait_state(c: &mut HostServiceClient<Channel>, id: &str, want: PowerState) -> Vm {
    let deadline = Instant::now() + WAIT;
    loop {
        let vm = get(c, id).await;
        if vm.power_state == want as i32 {
            return vm;
        }
        assert!(
            Instant::now() < deadline,
            "VM {id} never became {want:?}: {vm:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn process_alive(pid: u32) -> bool {
    // A zombie is dead for our purposes.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

pub const TARGET_IQN: &str = "iqn.2026-11.lab.pool:vol";
pub const CHAP_USER: &str = "host1";
pub const CHAP_SECRET: &str = "host1-secret-42";

/// An iscsi-target server on loopback with LUNs in files, on a runtime of its own (in its own thread, so
/// that it can be stopped from inside the test's runtime).
pub struct Target {
    pub port: u16,
    pub server: TargetServer,
    pub luns: Vec<PathBuf>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Target {
    /// LUN i is a file of `sizes[i]` bytes; `chap`: the host must log in with CHAP.
    pub fn start(dir: &Path, sizes: &[u64], chap: bool) -> Target {
        let server = TargetServer::in_memory(ServerOptions {
            nop_interval: None,
            ..ServerOptions::default()
        });
        let mut luns = Vec::new();
        let mut configs = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let path = dir.join(format!("lun{i}.img"));
            let device: Arc<dyn BlockDevice> =
                Arc::new(FileBlockDevice::open(&path, Some(*size), 512, false).unwrap());
            let serial = format!("hostd-test-{i}");
            configs.push(LunConfig {
                id: i as u16,
                device,
                naa: naa_from_serial(&serial),
                serial,
            });
            luns.push(path);
        }
        server
            .add_target(TargetConfig {
                iqn: TARGET_IQN.into(),
                alias: None,
                luns: configs,
                allow_any_initiator: !chap,
                initiators: if chap {
                    vec![InitiatorAccess {
                        name: INITIATOR.into(),
                        chap: Some(ChapCredentials {
                            user: CHAP_USER.into(),
                            secret: CHAP_SECRET.as_bytes().to_vec(),
                        }),
                        mutual_chap: None,
                    }]
                } else {
                    Vec::new()
                },
            })
            .unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = server.clone();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                server
                    .run(listener, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
            rt.shutdown_timeout(std::time::Duration::from_secs(5));
        });
        Target {
            port,
            server: handle,
            luns,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    pub fn disk(
        &self,
        id: &str,
        lun: u32,
        read_only: bool,
        chap: Option<(&str, &str)>,
    ) -> DiskConfig {
        DiskConfig {
            id: id.into(),
            backend: Some(disk_config::Backend::Iscsi(IscsiDisk {
                portal: format!("127.0.0.1:{}", self.port),
                target_iqn: TARGET_IQN.into(),
                lun,
                chap_username: chap.map(|c| c.0.to_owned()).unwrap_or_default(),
                chap_secret: chap.map(|c| c.1.to_owned()).unwrap_or_default(),
                volume_id: format!("vol-{lun}"),
                ..Default::default()
            })),
            read_only,
        }
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
