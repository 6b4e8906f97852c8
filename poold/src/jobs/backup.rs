//! A backup schedule's point: one of its VM snapshots written as the next point of the
//! chain in its directory (`pool_image::backup`, the format `poolctl vm-backup` writes),
//! then the chain pruned by the schedule's retention.
//!
//! The leader reads the changed chunks over iSCSI, logged in as an initiator of its own
//! (granted for the read, revoked after), and writes into the directory on its own
//! filesystem: in a pool of several members, a mount they all share. A job run again
//! after a leader change waits for the directory's lock (the last leader's writer may
//! still hold it), then finds a point already written from the snapshot and does not
//! write it twice; a point cut short is never in the chain (written aside, renamed
//! whole). A backup that fails is recorded as tried: the schedule's next run tries again.

use std::path::{Path, PathBuf};

use pool_image::backup::{self, write};
use pool_image::volume::{Lun, Session};
use proto::coordinator as pb;
use proto::storage as spb;
use tonic::Code;

use super::storage::{SrLoc, grant_access, revoke_access, volume_loc};
use super::{Env, Finish, JobError, read};
use crate::state::command::*;

/// How long a backup job waits for another writer of its directory.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3600);

pub async fn backup_vm(env: &Env, job: &Job, j: &BackupVmJob) -> Result<Finish, JobError> {
    let (snap, snapshots, vm_name) = read(&*env.ledger, |s| {
        (
            s.vm_snapshots.get(&j.snapshot_id).cloned(),
            s.vm_snapshots
                .values()
                .filter(|x| x.vm_id == j.vm_id)
                .cloned()
                .collect::<Vec<_>>(),
            s.vms
                .get(&j.vm_id)
                .and_then(|v| v.spec.as_ref())
                .map_or_else(|| j.vm_id.clone(), |sp| sp.name.clone()),
        )
    });
    let snap = snap.ok_or_else(|| {
        JobError::refused(
            Code::NotFound,
            format!("VM snapshot {} is gone", j.snapshot_id),
        )
    })?;
    env.step(
        &job.task_id,
        5,
        &format!("writing into {}", j.directory),
        &[],
    )
    .await?;
    let done = match allowed(&env.backup_roots, &j.directory) {
        Err(e) => Err(e),
        // Off the runtime: the writer's file work blocks (a disk's data file is synced
        // whole), and a member may serve everything on one thread.
        Ok(()) => {
            let (env, j, snap, name, handle) = (
                env.clone(),
                j.clone(),
                snap.clone(),
                vm_name.clone(),
                tokio::runtime::Handle::current(),
            );
            tokio::task::spawn_blocking(move || {
                handle.block_on(write_and_prune(&env, &j, &name, &snap, &snapshots))
            })
            .await
            .unwrap_or_else(|e| Err(anyhow::anyhow!("the backup's thread ended: {e}")))
        }
    };
    let record = EffectKind::BackupWritten(BackupWritten {
        schedule: j.schedule.clone(),
        snapshot_id: snap.id.clone(),
        written: done.is_ok(),
    });
    match done {
        Ok((w, p)) => {
            let list = |v: &[u32]| v.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
            Ok(Finish::default()
                .effect(record)
                .result("point", w.point)
                .result("chunks", w.chunks)
                .result("bytes", w.bytes)
                .result("pruned_points", list(&p.removed))
                .result("freed_bytes", p.freed_bytes))
        }
        Err(e) => Ok(Finish {
            failed: Some((
                Code::Aborted,
                format!(
                    "schedule {}: backup of {vm_name} into {}: {e:#}",
                    j.schedule, j.directory
                ),
            )),
            ..Finish::default().effect(record)
        }),
    }
}

/// Writes `snap` as the next point of `j`'s chain (unless the last point is it already),
/// then prunes the chain by `j`'s retention.
async fn write_and_prune(
    env: &Env,
    j: &BackupVmJob,
    vm_name: &str,
    snap: &pb::VmSnapshot,
    snapshots: &[pb::VmSnapshot],
) -> anyhow::Result<(write::Written, backup::Pruned)> {
    let root = Path::new(&j.directory);
    // A job run again by a new leader may find the last leader's writer still at it (a
    // blocking thread outlives its task): it waits, then finds the point written; and
    // waits again for that writer's prune.
    let next = write::next(root, vm_name, &j.vm_id, snapshots, Some(LOCK_WAIT))?;
    let written = match next.holds(&snap.id) {
        Some(point) => {
            // Unlocked before the prune, which locks the directory again.
            drop(next);
            write::Written {
                point,
                ..Default::default()
            }
        }
        None => next.write(&mut Pool { env }, snap).await?,
    };
    let r = j.retention.unwrap_or_default();
    let pruned = if r.keep_last + r.keep_daily + r.keep_weekly == 0 {
        backup::Pruned::default()
    } else {
        backup::prune_waiting(root, &r, LOCK_WAIT)?
    };
    Ok((written, pruned))
}

/// Whether this member may write into `dir`: under one of its `--backup-root`s (it writes
/// as root, so only where its operator said).
fn allowed(roots: &[PathBuf], dir: &str) -> anyhow::Result<()> {
    if roots.iter().any(|r| Path::new(dir).starts_with(r)) {
        return Ok(());
    }
    if roots.is_empty() {
        anyhow::bail!(
            "this member writes no backups: it was started without --backup-root (give \
             each member the directory, a mount they all share, that holds {dir})"
        );
    }
    let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
    anyhow::bail!(
        "{dir} is not under this member's --backup-root ({})",
        list.join(", ")
    )
}

/// The pool as this member reads it for a backup.
struct Pool<'a> {
    env: &'a Env,
}

struct Access {
    loc: SrLoc,
    volume_id: String,
    initiator: String,
    session: Session,
    lun: Lun,
}

impl Pool<'_> {
    fn loc(&self, volume_id: &str) -> Result<SrLoc, JobError> {
        read(&*self.env.ledger, |s| volume_loc(s, volume_id))
    }
}

impl write::Pool for Pool<'_> {
    type Access = Access;

    async fn origin(&mut self, snapshot: String) -> anyhow::Result<String> {
        read(&*self.env.ledger, |s| {
            s.volumes.get(&snapshot).map(|v| v.origin_id.clone())
        })
        .ok_or_else(|| anyhow::anyhow!("no volume with id {snapshot}"))
    }

    async fn changed_chunks(
        &mut self,
        r: spb::ListChangedChunksRequest,
    ) -> anyhow::Result<spb::ListChangedChunksResponse> {
        let loc = self.loc(&r.volume_id)?;
        let what = format!("changed chunks of {}", r.target_snapshot_id);
        self.env
            .storage
            .changed_chunks(&loc.address, r)
            .await
            .map_err(|s| JobError::from_status(what, s).into())
    }

    async fn open(&mut self, volume: String) -> anyhow::Result<Access> {
        let loc = self.loc(&volume)?;
        let size = read(&*self.env.ledger, |s| {
            s.volumes.get(&volume).map_or(0, |v| v.virtual_size_bytes)
        });
        let initiator = format!("iqn.2026-11.org.pool.poold-backup:{}", uuid::Uuid::new_v4());
        let access = grant_access(self.env, &loc, &volume, size, &initiator).await?;
        match pool_image::volume::connect(&access, &initiator).await {
            Ok((session, lun)) => Ok(Access {
                loc,
                volume_id: volume,
                initiator,
                session,
                lun,
            }),
            Err(e) => {
                let _ = revoke_access(self.env, &loc, &volume, &initiator).await;
                Err(e)
            }
        }
    }

    fn lun(access: &Access) -> &Lun {
        &access.lun
    }

    async fn close(&mut self, a: Access) {
        let _ = a.session.logout().await;
        if let Err(e) = revoke_access(self.env, &a.loc, &a.volume_id, &a.initiator).await {
            tracing::warn!(volume = %a.volume_id, initiator = %a.initiator, error = %e.describe(), "a backup's grant stays");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_writes_backups_only_under_its_roots() {
        let roots = [PathBuf::from("/srv/backups"), PathBuf::from("/mnt/nfs")];
        allowed(&roots, "/srv/backups/web").unwrap();
        allowed(&roots, "/mnt/nfs").unwrap();
        let e = allowed(&roots, "/srv/backups-other/web")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not under this member's --backup-root (/srv/backups, /mnt/nfs)"),
            "{e}"
        );
        let e = allowed(&[], "/srv/backups/web").unwrap_err().to_string();
        assert!(e.contains("started without --backup-root"), "{e}");
    }
}
