//! A VM as an OVA: a VM snapshot taken for the purpose (a running VM is paused for it, so
//! its disks are consistent), each disk snapshot read over iSCSI through a grant to this
//! member's own initiator and made a stream-optimized VMDK by qemu-img, the snapshot
//! deleted whatever happened (`pool_image::package`: descriptor, disks, manifest).

use std::time::Duration;

use pool_image::package::Package;
use pool_image::progress::Phase;
use proto::coordinator as pb;
use tonic::Status;

use super::{PoolHandler, Work, cancelled};
use crate::auth::Caller;
use crate::state::command::{DeleteVmSnapshotJob, JobSpec, SnapshotVmJob};

/// How long the export's snapshot jobs may take.
const JOB_WAIT: Duration = Duration::from_secs(600);
/// How often a job's note (what it waits on) is copied into the export's status.
const NOTE_EVERY: Duration = Duration::from_secs(1);

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
        memory: false,
        schedule: String::new(),
    });
    let delete = JobSpec::DeleteVmSnapshot(DeleteVmSnapshotJob {
        snapshot_id: snapshot_id.clone(),
        vm_id: vm_id.to_owned(),
    });
    let id = uuid::Uuid::new_v4().to_string();
    let task = w.svc.start_job(w.who, &id, spec).await?;
    match follow(w, task, "taking the export's snapshot").await {
        Followed::Ended(r) => r?,
        Followed::Cancelled(task) => {
            // The job goes on (it may wait long on a storaged that is away): its snapshot
            // is deleted when it ends, so the export's place and files go now.
            let (svc, who, vm_id) = (w.svc.clone(), w.who.clone(), vm_id.to_owned());
            tokio::spawn(async move {
                let task = svc.c.wait_task(*task, JOB_WAIT).await;
                if task.state == pb::TaskState::Succeeded as i32 {
                    delete_snapshot(&svc, &who, &vm_id, &snapshot_id, delete).await;
                }
            });
            return Err(cancelled());
        }
    }
    let res = if w.is_cancelled() {
        Err(cancelled())
    } else {
        read_snapshot(w, &vm, &snapshot_id).await
    };
    w.update(|p| p.phase = Phase::Cleanup);
    delete_snapshot(w.svc, w.who, vm_id, &snapshot_id, delete).await;
    res
}

async fn delete_snapshot(
    svc: &PoolHandler,
    who: &Caller,
    vm_id: &str,
    snapshot_id: &str,
    spec: JobSpec,
) {
    let id = uuid::Uuid::new_v4().to_string();
    let res = match svc.start_job(who, &id, spec).await {
        Ok(task) => ended(
            svc.c.wait_task(task, JOB_WAIT).await,
            "deleting the export's snapshot",
        ),
        Err(e) => Err(e),
    };
    if let Err(e) = res {
        tracing::warn!(%vm_id, %snapshot_id, error = %e.message(), "the export's snapshot stays");
    }
}

enum Followed {
    Ended(Result<(), Status>),
    /// The export was cancelled first: the job's task, still running.
    Cancelled(Box<pb::Task>),
}

/// Follows a job's task to its end, or until the export is cancelled. What it waits on
/// meanwhile (a storaged away: the job retries) shows in the export's status, so the
/// page does not only say "taking a snapshot".
async fn follow(w: &Work<'_>, mut task: pb::Task, what: &str) -> Followed {
    let deadline = tokio::time::Instant::now() + JOB_WAIT;
    loop {
        task = w.svc.c.wait_task(task, NOTE_EVERY).await;
        if finished(&task) || tokio::time::Instant::now() >= deadline {
            break;
        }
        if w.is_cancelled() {
            return Followed::Cancelled(Box::new(task));
        }
        w.update(|p| p.note = task.status_message.clone());
    }
    w.update(|p| p.note.clear());
    Followed::Ended(ended(task, what))
}

fn finished(task: &pb::Task) -> bool {
    matches!(
        pb::TaskState::try_from(task.state),
        Ok(pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Cancelled)
    )
}

/// How a task followed for `what` ended.
fn ended(task: pb::Task, what: &str) -> Result<(), Status> {
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
