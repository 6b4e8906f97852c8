//! A VM as an OVA download on the web console's port. A browser cannot speak iSCSI, so
//! the member reads the disks: it takes a VM snapshot for the purpose (a running VM is
//! paused for it, so its disks are consistent), grants its own initiator each disk
//! snapshot and reads it over iSCSI (mutual CHAP, `pool_image::volume`), has qemu-img
//! make it a stream-optimized VMDK in a private directory, deletes the snapshot and
//! streams the package (`pool_image::package`: descriptor, disks, manifest).
//!
//! A download cannot carry a header, so it is opened with a one-shot ticket that a
//! caller with a token asks for first (`POST` [`TICKET_PATH`]); the caller's token is
//! checked again when the ticket is spent. An export needs what `poolctl vm-export
//! --snapshot` needs: [`METHODS`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pool_image::package::Package;
use pool_image::qemu::ScratchDir;
use proto::coordinator as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::Status;

use super::PoolHandler;
use super::console::Tickets;
use crate::auth::Caller;
use crate::state::command::{DeleteVmSnapshotJob, JobSpec, SnapshotVmJob};

/// Where a ticket is asked for (`POST`, `?vm=<id>`, with the caller's token).
pub const TICKET_PATH: &str = "/export/ticket";
/// Where the package is downloaded (`GET`, `?ticket=`).
pub const DOWNLOAD_PATH: &str = "/export/download";
/// The calls an export makes on the caller's behalf: each must be the caller's to make.
pub const METHODS: [&str; 3] = ["SnapshotVm", "OpenVolumeAccess", "DeleteVmSnapshot"];
/// Exports one member prepares at once (each reads whole disks and runs qemu-img).
const AT_ONCE: usize = 2;
/// How long the export's snapshot jobs may take.
const JOB_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

/// This member's export tickets and scratch space.
pub struct Exports {
    tickets: Tickets,
    /// A private directory under the data directory: disks are read and converted here.
    scratch: PathBuf,
    running: Arc<Semaphore>,
}

impl Exports {
    /// Exports that work under `scratch` (made 0700; emptied: what is there was left by
    /// a member stopped in the middle of an export).
    pub fn new(scratch: PathBuf) -> std::io::Result<Exports> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::remove_dir_all(&scratch) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&scratch)?;
        Ok(Exports {
            tickets: Tickets::default(),
            scratch,
            running: Arc::new(Semaphore::new(AT_ONCE)),
        })
    }

    pub fn scratch(&self) -> &Path {
        &self.scratch
    }
}

/// The request a ticket stands for, for [`PoolHandler::authorize`].
fn request(header: Option<&str>, peer: Option<std::net::SocketAddr>) -> tonic::Request<()> {
    let mut req = tonic::Request::new(());
    if let Some(h) = header.and_then(|h| h.parse().ok()) {
        req.metadata_mut().insert("authorization", h);
    }
    req.extensions_mut()
        .insert(tonic::transport::server::TcpConnectInfo {
            local_addr: None,
            remote_addr: peer,
        });
    req
}

/// The caller, if it may make every one of [`METHODS`].
fn authorize(svc: &PoolHandler, req: &tonic::Request<()>) -> Result<Caller, Status> {
    let mut who = None;
    for m in METHODS {
        who = Some(svc.authorize(req, m)?);
    }
    let mut who = who.expect("METHODS is not empty");
    who.method = "ExportVm".into();
    Ok(who)
}

/// A ticket for downloading VM `vm_id`, for the caller whose `authorization` header
/// this is; refused as the calls it stands for would be, or for a VM without disks.
pub async fn ticket(
    svc: &PoolHandler,
    ex: &Exports,
    header: Option<&str>,
    peer: Option<std::net::SocketAddr>,
    vm_id: &str,
) -> Result<String, Status> {
    let who = authorize(svc, &request(header, peer))?;
    let vm = vm(svc, vm_id).await?;
    if vm.spec.as_ref().is_none_or(|s| s.disks.is_empty()) {
        return Err(Status::failed_precondition(format!(
            "VM {vm_id} has no disks to export"
        )));
    }
    ex.tickets.issue(&who, header.map(str::to_owned), vm_id)
}

async fn vm(svc: &PoolHandler, vm_id: &str) -> Result<pb::Vm, Status> {
    svc.c
        .read(|s| s.vms.get(vm_id).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no VM with id {vm_id}")))
}

/// A package ready to stream: its files in a private directory that goes with it.
pub struct Ready {
    pub package: Package,
    pub size: u64,
    _scratch: ScratchDir,
    _permit: OwnedSemaphorePermit,
}

/// Spends `ticket` and prepares its VM's package. The work runs as a task of its own, so
/// a caller that leaves meanwhile still has the snapshot deleted and the files removed.
pub async fn prepare(
    svc: &PoolHandler,
    ex: &Exports,
    ticket: &str,
    peer: Option<std::net::SocketAddr>,
) -> Result<Ready, Status> {
    let t = ex.tickets.redeem(ticket).ok_or_else(|| {
        Status::permission_denied("unknown, used or expired export ticket: ask for another")
    })?;
    // A token revoked since the ticket was issued exports nothing.
    let who = authorize(svc, &request(t.header.as_deref(), peer))?;
    let permit = ex.running.clone().try_acquire_owned().map_err(|_| {
        Status::resource_exhausted(format!(
            "{AT_ONCE} exports are being prepared on this member; retry when one is done"
        ))
    })?;
    let scratch = ScratchDir::new(Some(&ex.scratch))
        .map_err(|e| Status::internal(format!("making a private directory: {e}")))?;
    let svc = svc.clone();
    let vm_id = t.vm_id;
    let res = tokio::spawn(async move {
        let res = build(&svc, &who, &vm_id, scratch.path()).await;
        let detail = match &res {
            Ok(_) => Status::ok(format!("export of VM {vm_id} (web, from {})", who.peer)),
            Err(s) => s.clone(),
        };
        svc.audit(&who, &detail);
        res.map(|package| (package, scratch))
    })
    .await
    .map_err(|e| Status::internal(format!("the export stopped: {e}")))?;
    let (package, scratch) = res?;
    let size = package
        .size()
        .map_err(|e| Status::internal(format!("{e:#}")))?;
    Ok(Ready {
        package,
        size,
        _scratch: scratch,
        _permit: permit,
    })
}

/// Takes the snapshot, reads its disks into `dir` and deletes it, whatever happened.
async fn build(
    svc: &PoolHandler,
    who: &Caller,
    vm_id: &str,
    dir: &Path,
) -> Result<Package, Status> {
    let vm = vm(svc, vm_id).await?;
    let snapshot_id = uuid::Uuid::new_v4().to_string();
    let name = format!("export-{}", proto::unix_ms());
    let spec = JobSpec::SnapshotVm(SnapshotVmJob {
        memory: false,
        snapshot_id: snapshot_id.clone(),
        vm_id: vm_id.to_owned(),
        name,
    });
    let taken = job(svc, who, spec, "taking the export's snapshot").await;
    let res = match taken {
        Ok(()) => read_snapshot(svc, &vm, &snapshot_id, dir).await,
        Err(e) => return Err(e),
    };
    let spec = JobSpec::DeleteVmSnapshot(DeleteVmSnapshotJob {
        snapshot_id: snapshot_id.clone(),
        vm_id: vm_id.to_owned(),
    });
    if let Err(e) = job(svc, who, spec, "deleting the export's snapshot").await {
        tracing::warn!(%vm_id, %snapshot_id, error = %e.message(), "the export's snapshot stays");
    }
    res
}

/// Runs a job to its end.
async fn job(svc: &PoolHandler, who: &Caller, spec: JobSpec, what: &str) -> Result<(), Status> {
    let id = uuid::Uuid::new_v4().to_string();
    let task = svc.start_job(who, &id, spec).await?;
    let task = svc.c.wait_task(task, JOB_WAIT).await;
    match pb::TaskState::try_from(task.state) {
        Ok(pb::TaskState::Succeeded) => Ok(()),
        Ok(pb::TaskState::Failed | pb::TaskState::Cancelled) => Err(Status::aborted(format!(
            "{what} failed: {}",
            task.error_message
        ))),
        _ => Err(Status::deadline_exceeded(format!(
            "{what} did not end within {} s (task {})",
            JOB_WAIT.as_secs(),
            task.id
        ))),
    }
}

/// Reads each disk of snapshot `snapshot_id` of `vm` into the package.
async fn read_snapshot(
    svc: &PoolHandler,
    vm: &pb::Vm,
    snapshot_id: &str,
    dir: &Path,
) -> Result<Package, Status> {
    let snap = svc
        .c
        .read(|s| s.vm_snapshots.get(snapshot_id).cloned())
        .await?
        .ok_or_else(|| Status::aborted("the export's snapshot is gone"))?;
    let spec = snap
        .spec
        .ok_or_else(|| Status::internal("the export's snapshot has no spec"))?;
    let nics = vm.vifs.iter().map(|f| f.network_name.clone()).collect();
    let mut package = Package::new(&spec, nics);
    for d in &spec.disks {
        let volume_id = snap.disk_snapshots.get(&d.disk_id).ok_or_else(|| {
            Status::internal(format!("the snapshot has no copy of disk {}", d.disk_id))
        })?;
        let raw = dir.join(format!("{}.raw", package.descriptor.disks.len()));
        read_volume(svc, volume_id, &raw).await?;
        package
            .add_raw_disk(&d.disk_id, &raw, dir)
            .await
            .map_err(|e| Status::internal(format!("disk {}: {e:#}", d.disk_id)))?;
    }
    Ok(package)
}

/// Reads a volume into `raw` through a grant to this member's own initiator name,
/// revoked afterwards whatever happened.
async fn read_volume(svc: &PoolHandler, volume_id: &str, raw: &Path) -> Result<(), Status> {
    let r = pb::VolumeAccessRequest {
        volume_id: volume_id.to_owned(),
        initiator_iqn: format!("iqn.2026-11.org.pool.poold-export:{}", uuid::Uuid::new_v4()),
    };
    let access = super::storage::open_access(svc, &r).await?;
    let read = async {
        let (session, lun) = pool_image::volume::connect(&access, &r.initiator_iqn).await?;
        let res = pool_image::volume::read_to_file(&lun, raw, |_| {}).await;
        let _ = session.logout().await;
        res
    }
    .await;
    if let Err(e) = super::storage::close_access(svc, &r).await {
        tracing::warn!(%volume_id, initiator = %r.initiator_iqn, error = %e.message(), "an export's grant stays");
    }
    read.map_err(|e| Status::unavailable(format!("reading volume {volume_id}: {e:#}")))
}
