//! The storaged daemon as a process: pools and volumes over gRPC (mutual TLS, pool
//! members only), a volume exported over iSCSI and written and read back by a real
//! initiator (qemu-img through libiscsi), a revoke that cuts the initiator off, a restart
//! that keeps pool, export and data, and a daemon that will not serve without its TLS
//! directory.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pool_trust::tls::client_tls;
use pool_trust::{DaemonTls, Identity, LocalCa, PoolId};
use proto::storage::storage_service_client::StorageServiceClient;
use proto::storage::{self as pb};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

const INITIATOR: &str = "iqn.2026-11.org.pool.test:host1";
/// The pool of the test CA, and the storage endpoint the daemon runs as.
const POOL: &str = "storetest";
const STORAGED: &str = "storaged";

/// The test pool's CA, kept in the test's directory: a restarted daemon finds its
/// certificate again.
struct Pki {
    ca: LocalCa,
    dir: PathBuf,
}

impl Pki {
    fn open(dir: &Path) -> Pki {
        let ca = LocalCa::open_or_create(dir, &PoolId::parse(POOL).unwrap()).unwrap();
        Pki {
            ca,
            dir: dir.to_owned(),
        }
    }

    fn dir_of(&self, identity: &Identity) -> PathBuf {
        self.dir.join(identity.dns_name(self.ca.ca().pool_id()))
    }

    /// The TLS directory of `identity` (named also by `names`), issued the first time.
    fn tls(&self, identity: &Identity, names: &[&str]) -> DaemonTls {
        let dir = self.dir_of(identity);
        if dir.exists() {
            DaemonTls::load(&dir).unwrap()
        } else {
            self.ca.issue(identity, names, &dir).unwrap()
        }
    }
}

fn storaged_identity() -> Identity {
    Identity::Storage(STORAGED.into())
}

/// The daemon's configuration file in `state`, with `tls_dir` when given.
fn write_config(state: &Path, tls_dir: Option<&Path>) -> PathBuf {
    let config = state.join("storaged.toml");
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\niscsi_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n",
        state.join("state").display()
    );
    if let Some(dir) = tls_dir {
        text.push_str(&format!("tls_dir = \"{}\"\n", dir.display()));
    }
    std::fs::write(&config, text).unwrap();
    config
}

/// A StorageService client of the daemon at `addr` over `tls`; a refused handshake
/// shows here or on the first call.
async fn connect_tls(
    addr: &str,
    tls: ClientTlsConfig,
) -> Result<StorageServiceClient<Channel>, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("https://{addr}"))?
        .connect_timeout(Duration::from_secs(20))
        .tls_config(tls)?
        .connect()
        .await?;
    Ok(StorageServiceClient::new(channel))
}

struct Daemon {
    child: Child,
    grpc: String,
    iscsi: String,
    pki: Pki,
    /// Coordinator member 1's TLS: what [`Daemon::client`] calls with.
    member: DaemonTls,
}

impl Daemon {
    fn start(state: &Path) -> Daemon {
        let pki = Pki::open(&state.join("pki"));
        pki.tls(&storaged_identity(), &["127.0.0.1"]);
        let member = pki.tls(&Identity::Member(1), &[]);
        let config = write_config(state, Some(&pki.dir_of(&storaged_identity())));
        let mut child = Command::new(env!("CARGO_BIN_EXE_storaged"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(state.join("storaged.log")).unwrap())
            .spawn()
            .expect("start storaged");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let (mut grpc, mut iscsi) = (String::new(), String::new());
        while grpc.is_empty() || iscsi.is_empty() {
            let line = lines
                .next()
                .expect("storaged exited before listening")
                .unwrap();
            if let Some(a) = line.strip_prefix("LISTENING ") {
                grpc = a.to_owned();
            } else if let Some(a) = line.strip_prefix("ISCSI ") {
                iscsi = a.to_owned();
            }
        }
        Daemon {
            child,
            grpc,
            iscsi,
            pki,
            member,
        }
    }

    /// A client as coordinator member 1, over mutual TLS.
    async fn client(&self) -> StorageServiceClient<Channel> {
        self.client_as(&self.member).await
    }

    async fn client_as(&self, tls: &DaemonTls) -> StorageServiceClient<Channel> {
        let config = tls.client(&storaged_identity()).unwrap();
        connect_tls(&self.grpc, config).await.unwrap()
    }

    /// SIGTERM, then wait: the daemon commits its pools before it exits.
    fn stop(mut self) {
        // SAFETY: kill(2) on the pid of a child this test started and has not reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "storaged exited with {status}");
                return;
            }
            if std::time::Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("storaged did not stop within 20 s of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn image_opts(portal: &str, iqn: &str) -> String {
    format!(
        "driver=iscsi,transport=tcp,portal={portal},target={iqn},lun=0,initiator-name={INITIATOR}"
    )
}

fn qemu_img(args: &[&str]) -> std::process::Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img runs")
}

fn qemu_has_iscsi() -> bool {
    let listed = Command::new("qemu-img")
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("iscsi"))
        .unwrap_or(false);
    // `--help` lists the driver even when its module is not installed; opening an image
    // through it tells (nothing listens on port 1, so the open fails either way).
    listed
        && Command::new("qemu-img")
            .args([
                "info",
                "--image-opts",
                "driver=iscsi,transport=tcp,portal=127.0.0.1:1,target=iqn.2000-01.org.example:t,lun=0",
            ])
            .output()
            .map(|o| !String::from_utf8_lossy(&o.stderr).contains("Unknown driver"))
            .unwrap_or(false)
}

fn write_random(path: &PathBuf, len: usize) -> Vec<u8> {
    let mut rng = storaged::exercise::Rng::new(99);
    let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
    std::fs::write(path, &data).unwrap();
    data
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_volumes_exports_over_grpc_and_iscsi() {
    if !qemu_has_iscsi() {
        println!(
            "SKIPPED: qemu-img here has no iscsi driver (install qemu-block-extra); no real initiator to test with"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.client().await;

    let pool = c
        .create_pool(pb::CreatePoolRequest {
            name: "sr0".into(),
            backing_kind: pb::BackingKind::File as i32,
            backing_path: dir.path().join("sr0.img").display().to_string(),
            size_bytes: 256 << 20,
            chunk_size_bytes: 0,
            warning_threshold_percent: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(pool.chunk_size_bytes, 64 << 10);
    // Bad input: a clear code, nothing changed.
    let err = c
        .create_volume(pb::CreateVolumeRequest {
            pool_id: pool.id.clone(),
            name: "bad".into(),
            virtual_size_bytes: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    let err = c
        .get_volume(pb::GetVolumeRequest {
            volume_id: uuid::Uuid::new_v4().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    let vol = c
        .create_volume(pb::CreateVolumeRequest {
            pool_id: pool.id.clone(),
            name: "disk0".into(),
            virtual_size_bytes: 64 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let export = c
        .create_export(pb::CreateExportRequest {
            volume_id: vol.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(export.portals, vec![daemon.iscsi.clone()]);
    c.grant_access(pb::GrantAccessRequest {
        export_id: export.id.clone(),
        initiator_iqn: INITIATOR.into(),
        chap: None,
        mutual_chap: None,
    })
    .await
    .unwrap();

    // A real initiator writes 8 MiB and reads them back.
    let src = dir.path().join("src.img");
    let data = write_random(&src, 8 << 20);
    let target = image_opts(&daemon.iscsi, &export.target_iqn);
    let out = qemu_img(&[
        "convert",
        "-n",
        "-f",
        "raw",
        src.to_str().unwrap(),
        "--target-image-opts",
        &target,
    ]);
    assert!(
        out.status.success(),
        "qemu-img write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let back = dir.path().join("back.img");
    let read_back = |to: &Path| {
        qemu_img(&[
            "convert",
            "--image-opts",
            &target,
            "-O",
            "raw",
            to.to_str().unwrap(),
        ])
    };
    let out = read_back(&back);
    assert!(
        out.status.success(),
        "qemu-img read: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got = std::fs::read(&back).unwrap();
    assert_eq!(got.len(), 64 << 20);
    assert!(got[..data.len()] == data[..], "data read back differs");
    assert!(
        got[data.len()..].iter().all(|&b| b == 0),
        "unwritten space reads zeros"
    );

    let info = c
        .get_volume(pb::GetVolumeRequest {
            volume_id: vol.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        info.allocated_bytes,
        8 << 20,
        "thin: only what was written is allocated"
    );

    // Deleting an exported volume needs force.
    let err = c
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.id.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    // Revoke: the initiator can no longer log in.
    c.revoke_access(pb::RevokeAccessRequest {
        export_id: export.id.clone(),
        initiator_iqn: INITIATOR.into(),
    })
    .await
    .unwrap();
    let out = read_back(&dir.path().join("denied.img"));
    assert!(
        !out.status.success(),
        "a revoked initiator must not read the volume"
    );

    // Restart: pool, volume, export and data are all still there.
    daemon.stop();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.client().await;
    let exports = c
        .list_exports(pb::ListExportsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .exports;
    assert_eq!(exports.len(), 1);
    assert_eq!(exports[0].target_iqn, export.target_iqn);
    assert_eq!(
        exports[0].naa_id, export.naa_id,
        "LUN identity is stable across restarts"
    );
    assert!(exports[0].grants.is_empty(), "the revoke was kept");
    c.grant_access(pb::GrantAccessRequest {
        export_id: export.id.clone(),
        initiator_iqn: INITIATOR.into(),
        chap: None,
        mutual_chap: None,
    })
    .await
    .unwrap();
    let target = image_opts(&daemon.iscsi, &export.target_iqn);
    let again = dir.path().join("again.img");
    let out = qemu_img(&[
        "convert",
        "--image-opts",
        &target,
        "-O",
        "raw",
        again.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "qemu-img read after restart: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::read(&again).unwrap()[..data.len()] == data[..]);
    let deleted = c
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.id.clone(),
            force: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.freed_bytes, 8 << 20);
    daemon.stop();
}

/// The gRPC side alone, which needs no initiator: status codes for bad input, volumes,
/// snapshots, exports and grants, and a restart that reimports the pool from the
/// daemon's registry with its volumes and exports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_volumes_and_exports_over_grpc_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.client().await;
    let pool = c
        .create_pool(pb::CreatePoolRequest {
            name: "sr1".into(),
            backing_kind: pb::BackingKind::File as i32,
            backing_path: dir.path().join("sr1.img").display().to_string(),
            size_bytes: 64 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = c
        .create_pool(pb::CreatePoolRequest {
            backing_kind: pb::BackingKind::File as i32,
            backing_path: dir.path().join("sr1.img").display().to_string(),
            size_bytes: 64 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    let vol = c
        .create_volume(pb::CreateVolumeRequest {
            pool_id: pool.id.clone(),
            name: "disk".into(),
            virtual_size_bytes: 1 << 30,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let err = c
        .create_volume(pb::CreateVolumeRequest {
            pool_id: pool.id.clone(),
            name: "disk".into(),
            virtual_size_bytes: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err}");
    let snap = c
        .create_snapshot(pb::CreateSnapshotRequest {
            volume_id: vol.id.clone(),
            name: "disk@1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(snap.read_only);
    assert_eq!(snap.origin_id, vol.id);
    let export = c
        .create_export(pb::CreateExportRequest {
            volume_id: vol.id.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let grant = c
        .grant_access(pb::GrantAccessRequest {
            export_id: export.id.clone(),
            initiator_iqn: INITIATOR.into(),
            chap: Some(pb::ChapCredentials {
                username: "host1".into(),
                secret: "twelve-bytes-or-more".into(),
            }),
            mutual_chap: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(grant.chap.unwrap().secret, "", "secrets are write-only");
    let err = c
        .grant_access(pb::GrantAccessRequest {
            export_id: export.id.clone(),
            initiator_iqn: "not an iqn".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");

    daemon.stop();
    let daemon = Daemon::start(dir.path());
    let mut c = daemon.client().await;
    let pools = c
        .list_pools(pb::ListPoolsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .pools;
    assert_eq!(pools.len(), 1);
    assert_eq!(
        (pools[0].id.as_str(), pools[0].name.as_str()),
        (pool.id.as_str(), "sr1")
    );
    let volumes = c
        .list_volumes(pb::ListVolumesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .volumes;
    let mut names: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["disk", "disk@1"]);
    let exports = c
        .list_exports(pb::ListExportsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .exports;
    assert_eq!(exports.len(), 1);
    assert_eq!(exports[0].id, export.id);
    assert_eq!(exports[0].grants.len(), 1);
    assert_eq!(exports[0].grants[0].initiator_iqn, INITIATOR);
    let err = c
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: vol.id.clone(),
            force: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    daemon.stop();
}

/// ListPools at `addr` over `tls`: the number of pools, or why not (a refused connection
/// reads as `Unavailable` with the transport error).
async fn list_pools(addr: &str, tls: ClientTlsConfig) -> Result<usize, tonic::Status> {
    let call = async {
        let mut c = connect_tls(addr, tls)
            .await
            .map_err(|e| tonic::Status::unavailable(format!("connecting: {e:?}")))?;
        let pools = c.list_pools(pb::ListPoolsRequest::default()).await?;
        Ok(pools.into_inner().pools.len())
    };
    tokio::time::timeout(Duration::from_secs(20), call)
        .await
        .expect("the call ends either way")
}

/// A failure in the transport (a refused TLS handshake: the client sees the server's
/// alert or, when its request was already on the way, a closed stream or a cancelled
/// call); the service's interceptor, which would say Unauthenticated or
/// PermissionDenied, never saw a call.
fn assert_handshake_refused(what: &str, r: Result<usize, tonic::Status>) {
    let err = r.expect_err(what);
    assert!(
        !matches!(
            err.code(),
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
        ) && format!("{err:?}").contains("tonic::transport::Error(Transport"),
        "{what}: {err:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_service_answers_pool_members_and_nobody_else() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::start(dir.path());
    let me = storaged_identity();
    let bundle = &daemon.member.bundle;

    // No client certificate: the handshake is refused before the service sees a call.
    let anonymous = client_tls(bundle, None, Some(&me)).unwrap();
    let r = list_pools(&daemon.grpc, anonymous).await;
    assert_handshake_refused("no client certificate", r);
    // A member certificate of another CA of the same pool name.
    let forger = Pki::open(&dir.path().join("forger"));
    let forged = forger.tls(&Identity::Member(1), &[]);
    let cfg = client_tls(bundle, Some(&forged.creds), Some(&me)).unwrap();
    let r = list_pools(&daemon.grpc, cfg).await;
    assert_handshake_refused("another CA's member", r);

    // Hosts (and the storage endpoint itself) are of the pool but not members.
    for other in [Identity::Host("h1".into()), me.clone()] {
        let tls = daemon.pki.tls(&other, &[]);
        let err = list_pools(&daemon.grpc, tls.client(&me).unwrap())
            .await
            .expect_err("only members may call");
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "{other}: {err:?}"
        );
        assert!(err.message().contains("may not call"), "{other}: {err:?}");
        let err = daemon
            .client_as(&tls)
            .await
            .list_changed_chunks(pb::ListChangedChunksRequest::default())
            .await
            .expect_err("only members may ask what changed");
        assert_eq!(
            err.code(),
            tonic::Code::PermissionDenied,
            "{other}: {err:?}"
        );
    }

    let mut c = daemon.client().await;
    let pools = c.list_pools(pb::ListPoolsRequest::default()).await.unwrap();
    assert!(pools.into_inner().pools.is_empty());
    let m2 = daemon.pki.tls(&Identity::Member(2), &[]);
    let mut c = daemon.client_as(&m2).await;
    c.list_pools(pb::ListPoolsRequest::default()).await.unwrap();
    let unknown = "00000000-0000-4000-8000-000000000027".to_owned();
    let missing = c
        .list_changed_chunks(pb::ListChangedChunksRequest {
            volume_id: unknown.clone(),
            target_snapshot_id: unknown,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound, "{missing:?}");
    let err = c
        .delete_volume(pb::DeleteVolumeRequest {
            volume_id: "no-such-volume".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    daemon.stop();

    // The audit trail: the refused calls by whom, the change a member tried with its
    // result, not the reads that went through.
    let log = std::fs::read_to_string(dir.path().join("storaged.log")).unwrap();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains(" audit:")).collect();
    for who in ["host/h1", "storage/"] {
        assert!(
            audit.iter().any(|l| l.contains(&format!("who={who}"))
                && l.contains("ListPools")
                && l.contains("result=PermissionDenied")),
            "{who}: {log}"
        );
    }
    assert!(
        audit.iter().any(|l| l.contains("who=member/2")
            && l.contains("call=/pool.storage.v1.StorageService/DeleteVolume")
            && l.contains(&format!("result={:?}", err.code()))),
        "{log}"
    );
    assert!(
        !audit
            .iter()
            .any(|l| l.contains("result=Ok") && l.contains("ListPools")),
        "{log}"
    );
}

/// `storaged serve` with `tls_dir` (if any) in its configuration, expected to refuse to
/// start: its stderr. Its state directory stays uncreated.
fn refused_serve(state: &Path, tls_dir: Option<&Path>) -> String {
    let config = write_config(state, tls_dir);
    let mut child = Command::new(env!("CARGO_BIN_EXE_storaged"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start storaged");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("storaged served with TLS directory {tls_dir:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        !state.join("state").exists(),
        "a refused start made its state directory: {stderr}"
    );
    stderr
}

#[test]
fn serve_refuses_to_start_without_a_private_storage_tls_directory() {
    let dir = tempfile::tempdir().unwrap();
    let err = refused_serve(dir.path(), None);
    assert!(err.contains("a TLS directory is required"), "{err}");

    let pki = Pki::open(&dir.path().join("pki"));
    let host = Identity::Host("h1".into());
    pki.tls(&host, &["127.0.0.1"]);
    let err = refused_serve(dir.path(), Some(&pki.dir_of(&host)));
    assert!(err.contains("not a storage endpoint"), "{err}");

    let tls_dir = pki.dir_of(&storaged_identity());
    pki.tls(&storaged_identity(), &["127.0.0.1"]);
    std::fs::set_permissions(&tls_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let err = refused_serve(dir.path(), Some(&tls_dir));
    assert!(err.contains("has mode 0755"), "{err}");
}
