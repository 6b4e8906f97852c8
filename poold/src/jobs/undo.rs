//! Undo disks: the start that makes a VM's overlays, and the commit or discard that ends
//! them (see `state::undo` for the model).
//!
//! **Start** (`vm.start` of a VM with an undo disk lacking an overlay): for each such
//! disk, once its repository is seen to have room for the overlay to grow to the disk's
//! size, a snapshot of the disk's volume and a clone of that snapshot, each made once per
//! (task, step) by its labels; the finish records the overlays on the VM and places it on
//! the call's host, where the reconciler boots it on them. A refusal (no room, storaged
//! refusing) deletes what the job made: the VM stays stopped as before.
//!
//! **Discard** deletes each overlay and its snapshot: the disk's volume was never written.
//! **Commit** makes the volume hold the overlay's data without copying: a snapshot of the
//! overlay, then storaged reverts the volume to it (O(1) and atomic: the volume takes
//! the snapshot's chunk tree), then the snapshot, the overlay and the first snapshot
//! are deleted. A disk's revert is recorded as the step output `committed:<disk>` before
//! anything of it is deleted, so a new leader that takes the job over after that goes on
//! with the deletes rather than snapshotting an overlay that may be gone. Reverting again
//! to the same snapshot is harmless, so a crash between the revert and its output only
//! repeats it.

use std::collections::HashMap;

use proto::coordinator as pb;
use proto::storage as spb;
use tonic::Code;

use super::storage::{Make, SrLoc, delete_once, find_made, make_once, volume_loc};
use super::{Env, Finish, JobError, read, short};
use crate::state::command::*;
use crate::state::undo::undo_disks_without_overlay;

/// Step names of a start: the base's snapshot and the overlay cloned from it.
fn base_step(disk: &str) -> String {
    format!("undo-base:{disk}")
}

fn overlay_step(disk: &str) -> String {
    format!("undo-overlay:{disk}")
}

/// Makes the overlays a start needs, then places the VM (see the module docs).
pub async fn start(env: &Env, job: &Job, j: &StartUndoVmJob) -> Result<Finish, JobError> {
    let (vm, disks) = read(&*env.ledger, |s| {
        let vm = s
            .vms
            .get(&j.vm_id)
            .cloned()
            .ok_or_else(|| JobError::refused(Code::NotFound, format!("no VM {}", j.vm_id)))?;
        let mut disks = Vec::new();
        for d in undo_disks_without_overlay(&vm) {
            let size = s
                .volumes
                .get(&d.volume_id)
                .map_or(0, |v| v.virtual_size_bytes);
            disks.push((d.clone(), volume_loc(s, &d.volume_id)?, size));
        }
        Ok::<_, JobError>((vm, disks))
    })?;
    let r = make_overlays(env, job, &vm, &disks).await;
    let made = match r {
        Ok(made) => made,
        Err(e @ JobError::Refused { .. }) => {
            // Nothing is left behind: what this job made goes, the VM stays as it was.
            for (d, loc, _) in &disks {
                for step in [overlay_step(&d.disk_id), base_step(&d.disk_id)] {
                    if let Ok(Some(v)) = find_made(env, loc, &job.task_id, &step).await {
                        delete_once(env, loc, &v.id).await?;
                    }
                }
            }
            return Err(e);
        }
        Err(e) => return Err(e),
    };
    let mut f = Finish {
        target: vm.id.clone(),
        ..Default::default()
    };
    let mut overlays = Vec::new();
    for (disk, snap, overlay) in made {
        overlays.push(pb::UndoOverlay {
            disk_id: disk,
            volume_id: overlay.id.clone(),
            snapshot_id: snap.id.clone(),
        });
        f = f
            .effect(EffectKind::PutVolume(snap))
            .effect(EffectKind::PutVolume(overlay));
    }
    f = f.result(
        "overlays",
        overlays
            .iter()
            .map(|o| format!("{}={}", o.disk_id, o.volume_id))
            .collect::<Vec<_>>()
            .join(","),
    );
    Ok(f.effect(EffectKind::UndoStarted(UndoStarted {
        vm_id: vm.id.clone(),
        overlays,
        host_id: j.host_id.clone(),
    })))
}

/// Each disk's snapshot and overlay: (disk id, snapshot, overlay).
async fn make_overlays(
    env: &Env,
    job: &Job,
    vm: &pb::Vm,
    disks: &[(pb::VmDisk, SrLoc, u64)],
) -> Result<Vec<(String, spb::Volume, spb::Volume)>, JobError> {
    let name = vm.spec.as_ref().map_or(vm.id.as_str(), |s| s.name.as_str());
    // Room for every overlay still to make in a repository to grow to its disk's size
    // (an earlier attempt's overlay got past this check).
    let mut need: HashMap<&str, (u64, &SrLoc)> = HashMap::new();
    for (d, loc, size) in disks {
        if find_made(env, loc, &job.task_id, &overlay_step(&d.disk_id))
            .await?
            .is_none()
        {
            need.entry(loc.sr_id.as_str()).or_insert((0, loc)).0 += size;
        }
    }
    for (sr, (bytes, loc)) in need {
        let usage = env
            .storage
            .pool_usage(&loc.address, &loc.thin_pool_id)
            .await
            .map_err(|s| JobError::from_status(format!("reading repository {sr}'s usage"), s))?;
        if usage.free_bytes < bytes {
            return Err(JobError::refused(
                Code::ResourceExhausted,
                format!(
                    "repository {sr} has {} MiB free; VM {}'s undo overlays may grow to {} MiB (their disks' size); the VM was not started and nothing was changed",
                    usage.free_bytes >> 20,
                    vm.id,
                    bytes >> 20
                ),
            ));
        }
    }
    let mut out = Vec::new();
    for (i, (d, loc, _)) in disks.iter().enumerate() {
        env.step(
            &job.task_id,
            (i * 90 / disks.len().max(1)) as u32,
            &format!("making disk {}'s undo overlay", d.disk_id),
            &[],
        )
        .await?;
        let snap = make_once(
            env,
            loc,
            &job.task_id,
            &base_step(&d.disk_id),
            Make::Snapshot,
            &d.volume_id,
            &format!("{name}.{}.undo-base.{}", d.disk_id, short(&job.task_id)),
            &HashMap::new(),
        )
        .await?;
        let overlay = make_once(
            env,
            loc,
            &job.task_id,
            &overlay_step(&d.disk_id),
            Make::Clone,
            &snap.id,
            &format!("{name}.{}.undo.{}", d.disk_id, short(&job.task_id)),
            &HashMap::new(),
        )
        .await?;
        out.push((d.disk_id.clone(), snap, overlay));
    }
    Ok(out)
}

/// Commits or discards a stopped VM's pending undo changes (see the module docs).
pub async fn end(env: &Env, job: &Job, j: &EndUndoJob) -> Result<Finish, JobError> {
    let (vm, overlays) = read(&*env.ledger, |s| {
        let vm = s
            .vms
            .get(&j.vm_id)
            .cloned()
            .ok_or_else(|| JobError::refused(Code::NotFound, format!("no VM {}", j.vm_id)))?;
        let mut out = Vec::new();
        for o in &vm.undo_overlays {
            let base = vm
                .spec
                .iter()
                .flat_map(|s| &s.disks)
                .find(|d| d.disk_id == o.disk_id)
                .map(|d| d.volume_id.clone())
                .unwrap_or_default();
            out.push((o.clone(), base, volume_loc(s, &o.volume_id)?));
        }
        Ok::<_, JobError>((vm, out))
    })?;
    let name = vm.spec.as_ref().map_or(vm.id.as_str(), |s| s.name.as_str());
    let mut f = Finish {
        target: vm.id.clone(),
        ..Default::default()
    };
    let n = overlays.len().max(1);
    for (i, (o, base, loc)) in overlays.iter().enumerate() {
        let committed = format!("committed:{}", o.disk_id);
        let mut top_id = job.outputs.get(&committed).cloned();
        if j.commit && top_id.is_none() {
            env.step(
                &job.task_id,
                (i * 90 / n) as u32,
                &format!("committing disk {}", o.disk_id),
                &[],
            )
            .await?;
            let top = make_once(
                env,
                loc,
                &job.task_id,
                &format!("undo-commit:{}", o.disk_id),
                Make::Snapshot,
                &o.volume_id,
                &format!("{name}.{}.undo-commit.{}", o.disk_id, short(&job.task_id)),
                &HashMap::new(),
            )
            .await?;
            let v = env
                .storage
                .revert(&loc.address, base, &top.id)
                .await
                .map_err(|s| {
                    JobError::from_status(
                        format!("making volume {base} hold disk {}'s changes", o.disk_id),
                        s,
                    )
                })?;
            env.step(
                &job.task_id,
                (i * 90 / n) as u32,
                &format!("committed disk {}", o.disk_id),
                &[(&committed, &top.id)],
            )
            .await?;
            f = f.effect(EffectKind::PutVolume(super::storage::pooled(v, &loc.sr_id)));
            top_id = Some(top.id);
        }
        // The volume holds the changes now: what held them goes.
        if let Some(top) = top_id {
            delete_once(env, loc, &top).await?;
        }
        for v in [&o.volume_id, &o.snapshot_id] {
            delete_once(env, loc, v).await?;
            f = f.effect(EffectKind::RemoveVolume(v.clone()));
        }
    }
    Ok(f.effect(EffectKind::UndoEnded(vm.id.clone())))
}

#[cfg(test)]
mod tests {
    use proto::host as hpb;

    use super::*;
    use crate::jobs::test_utils::{World, position};
    use crate::jobs::vm::disk_access;

    const BASE_SNAP: &str = "snap-vm1.vda.undo-base.job-1";
    const OVERLAY: &str = "clone-snap-vm1.vda.undo-base.job-1";

    /// vm1 stopped on no host, its disk vda (vol1) in undo mode, room in the repository.
    fn undo_world() -> World {
        let world = World::two_hosts_one_running_vm();
        world.stop_vm1();
        world.storage.set_free(1 << 40);
        let mut s = world.ledger.state.lock().unwrap();
        let vm = s.vms.get_mut("vm1").unwrap();
        vm.spec.as_mut().unwrap().disks[0].undo = true;
        drop(s);
        world
    }

    fn job(spec: JobSpec) -> Job {
        Job {
            spec: Some(spec),
            ..Default::default()
        }
    }

    fn start_job(host: &str) -> Job {
        job(JobSpec::StartUndoVm(StartUndoVmJob {
            vm_id: "vm1".into(),
            host_id: host.into(),
        }))
    }

    fn end_job(commit: bool) -> Job {
        job(JobSpec::EndUndo(EndUndoJob {
            vm_id: "vm1".into(),
            commit,
        }))
    }

    /// Starts vm1 through its undo start (task job-1), then stops it: pending changes.
    async fn started_and_stopped(world: &World) {
        let t = world.start_job(start_job("h2"));
        assert_eq!(t, "job-1");
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Succeeded, "{task:?}");
        world.stop_vm1();
    }

    #[tokio::test]
    async fn a_start_snapshots_the_disk_clones_the_snapshot_and_runs_the_vm_on_the_clone() {
        let world = undo_world();
        let t = world.start_job(start_job("h2"));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Succeeded, "{task:?}");
        assert_eq!(task.kind, "vm.start");
        let calls = world.storage.calls();
        let snap = position(&calls, "snapshot:vol1").unwrap();
        let clone = position(&calls, &format!("clone:{BASE_SNAP}")).unwrap();
        assert!(
            position(&calls, "usage").unwrap() < snap && snap < clone,
            "{calls:?}"
        );
        let s = world.state();
        let vm = &s.vms["vm1"];
        assert_eq!(vm.host_id, "h2");
        assert_eq!(vm.desired_power_state(), hpb::PowerState::Running);
        assert_eq!(
            vm.undo_overlays,
            [pb::UndoOverlay {
                disk_id: "vda".into(),
                volume_id: OVERLAY.into(),
                snapshot_id: BASE_SNAP.into(),
            }]
        );
        assert_eq!(vm.spec.as_ref().unwrap().disks[0].volume_id, "vol1");
        assert!(s.volumes.contains_key(OVERLAY) && s.volumes.contains_key(BASE_SNAP));

        // The host is granted the overlay, never the base.
        let access = disk_access(&world.env(), vm, "h2").await.unwrap();
        let Some(hpb::disk_config::Backend::Iscsi(disk)) = &access.disks[0].backend else {
            panic!("not an iSCSI disk: {access:?}")
        };
        assert_eq!(disk.volume_id, OVERLAY);
        let calls = world.storage.calls();
        assert!(calls.contains(&format!("export:{OVERLAY}")), "{calls:?}");
        assert!(!calls.contains(&"export:vol1".to_string()), "{calls:?}");
    }

    #[tokio::test]
    async fn a_start_without_room_for_the_overlay_fails_and_changes_nothing() {
        let world = undo_world();
        world.storage.set_free(100 << 20);
        let t = world.start_job(start_job("h2"));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Failed);
        assert_eq!(task.error_code, "ResourceExhausted");
        assert!(task.error_message.contains("100 MiB free"), "{task:?}");
        let s = world.state();
        assert!(s.vms["vm1"].undo_overlays.is_empty());
        assert!(s.vms["vm1"].host_id.is_empty());
        assert_eq!(s.volumes.len(), 1);
        let calls = world.storage.calls();
        assert!(
            !calls
                .iter()
                .any(|c| c.starts_with("snapshot") || c.starts_with("clone")),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn an_undo_vm_is_not_placed_to_run_without_its_overlay() {
        let world = undo_world();
        let r = world.apply(Op::SetVmPower(SetVmPower {
            vm_id: "vm1".into(),
            desired: hpb::PowerState::Running as i32,
            host_id: "h1".into(),
            ..Default::default()
        }));
        assert_eq!(r.code, Code::FailedPrecondition as i32, "{r:?}");
        assert!(r.message.contains("without an overlay"), "{}", r.message);
        // Nor granted to a host (a defence: the reconciler never gets such a VM).
        let vm = world.state().vms["vm1"].clone();
        let e = disk_access(&world.env(), &vm, "h1").await.unwrap_err();
        assert!(e.to_string().contains("has no overlay"), "{e}");
        assert!(world.storage.calls().is_empty());
    }

    #[tokio::test]
    async fn a_discard_deletes_the_overlay_and_its_snapshot_and_leaves_the_base_alone() {
        let world = undo_world();
        started_and_stopped(&world).await;
        let t = world.start_job(end_job(false));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Succeeded, "{task:?}");
        assert_eq!(task.kind, "vm.undo.discard");
        let calls = world.storage.calls();
        let ov = position(&calls, &format!("delete:{OVERLAY}")).unwrap();
        let snap = position(&calls, &format!("delete:{BASE_SNAP}")).unwrap();
        assert!(ov < snap, "{calls:?}");
        assert!(!calls.iter().any(|c| c.starts_with("revert")), "{calls:?}");
        let s = world.state();
        assert!(s.vms["vm1"].undo_overlays.is_empty());
        assert!(!s.volumes.contains_key(OVERLAY) && !s.volumes.contains_key(BASE_SNAP));
        assert!(s.volumes.contains_key("vol1"));
    }

    #[tokio::test]
    async fn a_commit_reverts_the_base_to_a_snapshot_of_the_overlay_then_deletes_them() {
        let world = undo_world();
        started_and_stopped(&world).await;
        let t = world.start_job(end_job(true));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Succeeded, "{task:?}");
        assert_eq!(task.kind, "vm.undo.commit");
        let top = format!("snap-vm1.vda.undo-commit.{t}");
        let calls = world.storage.calls();
        let order: Vec<usize> = [
            format!("snapshot:{OVERLAY}"),
            format!("revert:vol1:{top}"),
            format!("delete:{top}"),
            format!("delete:{OVERLAY}"),
            format!("delete:{BASE_SNAP}"),
        ]
        .iter()
        .map(|c| position(&calls, c).unwrap_or_else(|| panic!("no {c} in {calls:?}")))
        .collect();
        assert!(order.is_sorted(), "{calls:?}");
        let s = world.state();
        assert!(s.vms["vm1"].undo_overlays.is_empty());
        assert_eq!(
            s.vms["vm1"].spec.as_ref().unwrap().disks[0].volume_id,
            "vol1"
        );
        assert!(!s.volumes.contains_key(OVERLAY));
    }

    /// A new leader that takes a commit over after a disk's revert was recorded deletes
    /// what is left; it does not snapshot the overlay (maybe gone) or revert again.
    #[tokio::test]
    async fn a_commit_taken_over_after_the_revert_only_deletes() {
        let world = undo_world();
        started_and_stopped(&world).await;
        let t = world.start_job(end_job(true));
        world.record_output(&t, "committed:vda", "top1");
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
        let calls = world.storage.calls();
        let after_start = position(&calls, &format!("clone:{BASE_SNAP}")).unwrap();
        let commit_calls = &calls[after_start + 1..];
        assert_eq!(
            commit_calls,
            [
                "delete:top1".to_string(),
                format!("delete:{OVERLAY}"),
                format!("delete:{BASE_SNAP}"),
            ]
        );
        assert!(world.state().vms["vm1"].undo_overlays.is_empty());
    }

    #[tokio::test]
    async fn commit_and_discard_refuse_a_running_vm_or_one_with_nothing_pending() {
        let world = undo_world();
        for commit in [true, false] {
            let r = world.apply(Op::StartJob(end_job(commit)));
            assert_eq!(r.code, Code::FailedPrecondition as i32);
            assert!(
                r.message.contains("no pending undo changes"),
                "{}",
                r.message
            );
        }
        let t = world.start_job(start_job("h2"));
        world.drive(&t).await;
        // Running on h2 now, with its overlay.
        let r = world.apply(Op::StartJob(end_job(true)));
        assert_eq!(r.code, Code::FailedPrecondition as i32);
        assert!(r.message.contains("shut it down first"), "{}", r.message);
        assert_eq!(world.state().vms["vm1"].undo_overlays.len(), 1);
    }

    #[tokio::test]
    async fn pending_changes_keep_the_base_overlay_and_disks_as_they_are() {
        let world = undo_world();
        started_and_stopped(&world).await;
        let volume_job = |action: VolumeAction, id: &str| {
            Op::StartJob(job(JobSpec::Volume(VolumeJob {
                action: action as i32,
                volume_id: id.into(),
                size_bytes: 2 << 30,
                snapshot_id: BASE_SNAP.into(),
                ..Default::default()
            })))
        };
        for (action, id) in [
            (VolumeAction::Delete, "vol1"),
            (VolumeAction::Resize, "vol1"),
            (VolumeAction::Revert, "vol1"),
            (VolumeAction::Delete, OVERLAY),
            (VolumeAction::Delete, BASE_SNAP),
        ] {
            let r = world.apply(volume_job(action, id));
            assert_eq!(r.code, Code::FailedPrecondition as i32, "{action:?} {id}");
            assert!(r.message.contains("pending undo changes"), "{}", r.message);
        }
        let mut spec = world.state().vms["vm1"].spec.clone().unwrap();
        spec.disks[0].undo = false;
        let r = world.apply(Op::UpdateVm(UpdateVm {
            vm_id: "vm1".into(),
            spec: Some(spec),
        }));
        assert_eq!(r.code, Code::FailedPrecondition as i32);
        assert!(
            r.message.contains("vm-undo vm1 commit|discard"),
            "{}",
            r.message
        );
    }

    #[tokio::test]
    async fn a_read_only_disk_is_refused_undo_mode() {
        let world = undo_world();
        let mut spec = world.state().vms["vm1"].spec.clone().unwrap();
        spec.disks[0].read_only = true;
        let r = world.apply(Op::UpdateVm(UpdateVm {
            vm_id: "vm1".into(),
            spec: Some(spec),
        }));
        assert_eq!(r.code, Code::InvalidArgument as i32);
        assert!(r.message.contains("writable"), "{}", r.message);
        assert!(!world.state().vms["vm1"].spec.as_ref().unwrap().disks[0].read_only);
    }

    #[tokio::test]
    async fn a_snapshot_of_the_overlay_is_not_reverted_to_in_place_once_it_is_discarded() {
        let world = undo_world();
        started_and_stopped(&world).await;
        let t = world.start_job(job(JobSpec::SnapshotVm(SnapshotVmJob {
            snapshot_id: "s1".into(),
            vm_id: "vm1".into(),
            name: "in-undo".into(),
            memory: false,
            ..Default::default()
        })));
        world.drive(&t).await;
        let t = world.start_job(end_job(false));
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
        let r = world.apply(Op::StartJob(job(JobSpec::RevertVm(RevertVmJob {
            vm_id: "vm1".into(),
            snapshot_id: "s1".into(),
            host_id: String::new(),
        }))));
        assert_eq!(r.code, Code::FailedPrecondition as i32);
        assert!(r.message.contains("vm-clone"), "{}", r.message);
        assert!(
            !world
                .storage
                .calls()
                .iter()
                .any(|c| c.starts_with("revert"))
        );
    }

    #[tokio::test]
    async fn a_snapshot_of_an_undo_vm_reads_the_overlay_and_a_destroy_deletes_it() {
        let world = undo_world();
        started_and_stopped(&world).await;
        let t = world.start_job(job(JobSpec::SnapshotVm(SnapshotVmJob {
            snapshot_id: "s1".into(),
            vm_id: "vm1".into(),
            name: "before".into(),
            memory: false,
            ..Default::default()
        })));
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
        let calls = world.storage.calls();
        assert!(calls.contains(&format!("snapshot:{OVERLAY}")), "{calls:?}");
        assert_eq!(
            calls.iter().filter(|c| *c == "snapshot:vol1").count(),
            1,
            "only the start's: {calls:?}"
        );

        let t = world.start_job(job(JobSpec::DestroyVm(DestroyVmJob {
            vm_id: "vm1".into(),
            delete_disks: false,
        })));
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
        let calls = world.storage.calls();
        assert!(calls.contains(&format!("delete:{OVERLAY}")), "{calls:?}");
        assert!(calls.contains(&format!("delete:{BASE_SNAP}")), "{calls:?}");
        assert!(!calls.contains(&"delete:vol1".to_string()), "{calls:?}");
        let s = world.state();
        assert!(!s.vms.contains_key("vm1"));
        assert!(!s.volumes.contains_key(OVERLAY));
    }
}
