//! `vm-backup`: a new point of a VM's backup chain.
//!
//! The pool snapshots every disk of the VM at one instant (`SnapshotVm`); storaged says
//! which chunks of each disk's snapshot differ from the last point's snapshot
//! (`ListChangedChunks`, or every allocated chunk for the first point); poolctl reads
//! those chunks over iSCSI from the snapshot (`OpenVolumeAccess`, as `vdi-export` does)
//! into the new point (`pool_image::backup::write`, through [`Api`]). A failed backup
//! leaves the chain as it was; only after the point is written is the previous point's
//! VM snapshot deleted: the newest one is always the next incremental's base.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use pool_client::new_request_id;
use pool_image::backup::write::{self, Written};
use proto::coordinator as pb;
use proto::storage as spb;

use crate::ctl::{Ctl, call};
use crate::transfer::{self, Access};

/// Where a backup's time went.
#[derive(Debug, Clone, Copy, Default)]
pub struct Took {
    /// The chain read and the VM snapshot taken.
    pub snapshot: Duration,
    /// The changed chunks asked, read over iSCSI and written, synced.
    pub write: Duration,
    /// The base snapshot deleted.
    pub delete: Duration,
}

pub async fn backup(ctl: &mut Ctl, vm: &str, root: &Path) -> anyhow::Result<(Written, Took)> {
    let start = Instant::now();
    let vm_id = ctl.vm_id(vm).await?;
    let snapshots = ctl.vm_snapshots(&vm_id).await?;
    // A broken chain is refused before anything is taken.
    let next = write::next(root, vm, &vm_id, &snapshots, None)?;
    let snap = take_snapshot(ctl, &vm_id, next.point).await?;
    let mut took = Took {
        snapshot: start.elapsed(),
        ..Took::default()
    };
    let written = match next.write(&mut Api(ctl), &snap).await {
        Ok(w) => w,
        Err(e) => {
            // Not waited for: what failed the backup (storaged gone, say) can hold the
            // deletion up too, and the pool finishes it once it can.
            delete_snapshot(ctl, &snap.id, false).await;
            return Err(e);
        }
    };
    took.write = start.elapsed() - took.snapshot;
    if let Some(b) = &written.base_snapshot_id {
        delete_snapshot(ctl, b, true).await;
    }
    took.delete = start.elapsed() - took.snapshot - took.write;
    Ok((written, took))
}

/// Snapshots every disk of the VM at one instant; the pool's record of it.
async fn take_snapshot(ctl: &mut Ctl, vm_id: &str, point: u32) -> anyhow::Result<pb::VmSnapshot> {
    let r = call!(
        ctl.client,
        snapshot_vm,
        pb::SnapshotVmRequest {
            request_id: new_request_id(),
            vm_id: vm_id.to_owned(),
            name: format!("backup-{point}-{}", proto::unix_ms()),
            memory: false,
        }
    )?;
    // The backup needs the snapshot, whatever --no-wait says.
    let wait = std::mem::replace(&mut ctl.wait, true);
    let task = ctl.follow(r).await;
    ctl.wait = wait;
    let task = task?;
    let id = task
        .results
        .get("snapshot_id")
        .cloned()
        .unwrap_or(task.target_id);
    ctl.vm_snapshots(vm_id)
        .await?
        .into_iter()
        .find(|s| s.id == id)
        .with_context(|| format!("the pool lists no VM snapshot {id} after taking it"))
}

/// Deletes a VM snapshot the backup no longer needs; when `wait`, until it is gone. A
/// deletion that fails is a warning: the backup itself stands or fails on its own.
async fn delete_snapshot(ctl: &mut Ctl, id: &str, wait: bool) {
    let r = call!(
        ctl.client,
        delete_vm_snapshot,
        pb::DeleteVmSnapshotRequest {
            request_id: new_request_id(),
            snapshot_id: id.to_owned(),
        }
    );
    let done = match r {
        Ok(r) if !wait => {
            let task = r.task.map(|t| t.id).unwrap_or_default();
            eprintln!("VM snapshot {id} is being deleted (task {task})");
            Ok(())
        }
        Ok(r) => {
            let was = std::mem::replace(&mut ctl.wait, true);
            let done = ctl.follow(r).await.map(|_| ());
            ctl.wait = was;
            done
        }
        Err(e) => Err(e),
    };
    if let Err(e) = done {
        eprintln!("warning: VM snapshot {id} stays: {e:#}");
    }
}

/// The pool through PoolService, as the backup reads it.
struct Api<'a>(&'a mut Ctl);

impl write::Pool for Api<'_> {
    type Access = Access;

    async fn origin(&mut self, snapshot: String) -> anyhow::Result<String> {
        let v = call!(
            self.0.client,
            get_volume,
            pb::GetVolumeRequest {
                volume_id: snapshot.clone()
            }
        )
        .with_context(|| format!("reading snapshot {snapshot}"))?;
        Ok(v.origin_id)
    }

    async fn changed_chunks(
        &mut self,
        r: spb::ListChangedChunksRequest,
    ) -> anyhow::Result<spb::ListChangedChunksResponse> {
        Ok(call!(self.0.client, list_changed_chunks, r)?)
    }

    async fn open(&mut self, volume: String) -> anyhow::Result<Access> {
        transfer::open(&mut self.0.client, &volume).await
    }

    fn lun(access: &Access) -> &iscsi_initiator::Lun {
        &access.lun
    }

    async fn close(&mut self, access: Access) {
        access.close(&mut self.0.client).await
    }
}
