//! A VM as an OVA: a VM snapshot taken for the purpose (a running VM is paused for it, so
//! its disks are consistent), each disk snapshot read over iSCSI through a grant to this
//! member's own initiator and made a stream-optimized VMDK by qemu-img, the snapshot
//! deleted whatever happened (`pool_image::package`: descriptor, disks, manifest).

use pool_image::package::Package;
use pool_image::progress::Phase;
use proto::coordinator as pb;
use tonic::Status;

use super::{PoolHandler, Work, cancelled};
use crate::auth::Caller;
use crate::state::command::{DeleteVmSnapshotJob, JobSpec, SnapshotVmJob};

/// How long the export's snapshot jobs may take.
const JOB_WAIT: std::time::Duration = std::time::Duration::from_secs(600);

pub(super) async fn vm(svc: &PoolHandler, vm_id: &str) -> Result<pb::Vm, Status> {
    svc.c
        .read(|s| s.vms.get(vm_id).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no VM with id {vm_id}")))
}

/// Takes the snapshot, reads its disks into the export's directory and deletes it,
/// whatever happened (a cancel included).
pub(super) async fn build(w: &Work<'_>, vm_id: &str) -> Result<Package, Status> {
    let vm = vm(w.svc, vm_id).await?;
    let snapshot_id = uuid::Uuid::new_v4().to_string();
    let name = format!("export-{}", proto::unix_ms());
    let spec = JobSpec::SnapshotVm(SnapshotVmJob {
        snapshot_id: snapshot_id.clone(),
        vm_id: vm_id.to_owned(),
        name,
    });
    // A cancel does not stop the job: the snapshot it makes is deleted below.
    job(w.svc, w.who, spec, "taking the export's snapshot").await?;
    let res = if w.is_cancelled() {
        Err(cancelled())
    } else {
        read_snapshot(w, &vm, &snapshot_id).await
    };
    w.update(|p| p.phase = Phase::Cleanup);
    let spec = JobSpec::DeleteVmSnapshot(DeleteVmSnapshotJob {
        snapshot_id: snapshot_id.clone(),
        vm_id: vm_id.to_owned(),
    });
    if let Err(e) = job(w.svc, w.who, spec, "deleting the export's snapshot").await {
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
async fn read_snapshot(w: &Work<'_>, vm: &pb::Vm, snapshot_id: &str) -> Result<Package, Status> {
    let snap = w
        .svc
        .c
        .read(|s| s.vm_snapshots.get(snapshot_id).cloned())
        .await?
        .ok_or_else(|| Status::aborted("the export's snapshot is gone"))?;
    let spec = snap
        .spec
        .ok_or_else(|| Status::internal("the export's snapshot has no spec"))?;
    let nics = vm.vifs.iter().map(|f| f.network_name.clone()).collect();
    let mut package = Package::new(&spec, nics);
    for (i, d) in spec.disks.iter().enumerate() {
        let volume_id = snap.disk_snapshots.get(&d.disk_id).ok_or_else(|| {
            Status::internal(format!("the snapshot has no copy of disk {}", d.disk_id))
        })?;
        let raw = w.dir.join(format!("{i}.raw"));
        super::disk::read_volume(w, i as u32 + 1, volume_id, &raw).await?;
        w.update(|p| p.phase = Phase::Converting);
        w.unless_cancelled(async {
            package
                .add_raw_disk(&d.disk_id, &raw, w.dir)
                .await
                .map_err(|e| Status::internal(format!("disk {}: {e:#}", d.disk_id)))
        })
        .await?;
    }
    Ok(package)
}
