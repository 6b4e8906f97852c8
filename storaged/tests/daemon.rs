//! The storaged daemon as a process: pools and volumes over gRPC, a volume exported over
//! iSCSI and written and read back by a real initiator (qemu-img through libiscsi), a
//! revoke that cuts the initiator off, and a restart that keeps pool, export and data.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proto::storage::storage_service_client::StorageServiceClient;
use proto::storage::{self as pb};
use tonic::transport::Channel;

const INITIATOR: &str = "iqn.2026-11.org.pool.test:host1";

struct Daemon {
    child: Child,
    grpc: String,
    iscsi: String,
}

impl Daemon {
    fn start(state: &Path) -> Daemon {
        let config = state.join("storaged.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\niscsi_listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n",
                state.join("state").display()
            ),
        )
        .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_storaged"))
            .args(["serve", "--config"])
            .arg(&config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
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
        Daemon { child, grpc, iscsi }
    }

    async fn client(&self) -> StorageServiceClient<Channel> {
        StorageServiceClient::connect(format!("http://{}", self.grpc))
            .await
            .unwrap()
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
