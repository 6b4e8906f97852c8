//! Checkpoints: VM snapshots with memory, as Hyper-V takes them. A checkpoint is a VM
//! snapshot (same record, same tree) whose `state_volume_id` holds the VM's memory and
//! device state at the instant its disks were snapshotted.
//!
//! **Taking one** (`vm.snapshot` with `memory`): a thin state volume is made in the
//! repository of the VM's first disk (refused at once when that repository lacks the
//! room) and granted to the VM's host; `saving` is committed as a step output; the VM is
//! paused, saved with `SaveVm { resume: true }` (hostd leaves it paused), its disks are
//! snapshotted, and it is resumed (`vm::snapshot_disks`). The pause is timed and is the
//! task's `pause_ms`.
//!
//! **Interrupted**: a new leader (or a retry) that finds `saving` cannot tell which disk
//! snapshots match the saved memory, so it keeps nothing: the VM is resumed if the job
//! paused it, every volume the task made is deleted, and the task fails saying so.
//!
//! **Reverting** to a checkpoint (`vm.revert` with a host): the disks go back as for any
//! snapshot, then the VM is restored on the host from the checkpoint's state volume
//! (`suspend::restore_on`), running; the volume stays, so the checkpoint can be reverted
//! to again.

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Code;

use super::storage::{STEP_LABEL, SrLoc, TASK_LABEL, delete_once, sr_loc};
use super::suspend::{STATE_VOLUME, make_state_volume, state_loc, state_volume_access};
use super::vm::host_addr;
use super::{Env, JobError, read};
use crate::state::command::*;

/// The step output that says the VM's state is being saved: from here on, an attempt
/// that does not finish keeps nothing.
const SAVING: &str = "saving";

/// A checkpoint's state volume (as the pool records it), granted to the VM's host.
pub(super) struct Prepared {
    pub volume: proto::storage::Volume,
    loc: SrLoc,
    pub access: hpb::IscsiDisk,
}

/// Makes and grants the state volume of a checkpoint of `vm` and commits [`SAVING`]; an
/// attempt that finds [`SAVING`] already there is abandoned (see the module docs).
pub(super) async fn prepare(env: &Env, job: &Job, vm: &pb::Vm) -> Result<Prepared, JobError> {
    if job.outputs.contains_key(SAVING) {
        let loc = read(&*env.ledger, |s| state_loc(s, vm))?;
        let state = job.outputs.get(STATE_VOLUME).map(|id| (&loc, id.as_str()));
        let why = "it was interrupted while the VM was being saved (a new leader took it over)";
        return Err(abandon(env, job, vm, state, why).await);
    }
    let runs = !vm.host_id.is_empty()
        && matches!(
            vm.power_state(),
            hpb::PowerState::Running | hpb::PowerState::Paused
        );
    if !runs {
        return Err(JobError::refused(
            Code::FailedPrecondition,
            format!(
                "VM {} is not running: a checkpoint saves a running or paused VM's memory (snapshot its disks alone instead)",
                vm.id
            ),
        ));
    }
    let loc = read(&*env.ledger, |s| state_loc(s, vm))?;
    let volume = make_state_volume(env, job, vm, &loc).await?;
    env.step(
        &job.task_id,
        5,
        "granting the state volume",
        &[(STATE_VOLUME, &volume.id)],
    )
    .await?;
    let access = state_volume_access(env, &loc, &volume.id, &vm.host_id).await?;
    env.step(
        &job.task_id,
        10,
        "saving the VM's memory and device state with its disks",
        &[(SAVING, "1")],
    )
    .await?;
    Ok(Prepared {
        volume,
        loc,
        access,
    })
}

/// A checkpoint that failed after [`prepare`]: what it made goes, and the task fails
/// with `e` (a lost leadership is left to the next leader, which abandons it).
pub(super) async fn failed(
    env: &Env,
    job: &Job,
    vm: &pb::Vm,
    made: &Prepared,
    e: JobError,
) -> JobError {
    match e {
        JobError::Commit(_) | JobError::Cancelled => e,
        e => {
            let why = format!("it failed: {}", e.describe());
            let state = (&made.loc, made.volume.id.as_str());
            abandon(env, job, vm, Some(state), &why).await
        }
    }
}

/// Resumes the VM if this task paused it, deletes the state volume and every volume the
/// task made in the repositories of the VM's disks, and fails the task saying `why`. A
/// cleanup step that fails is retried (the job runs again and comes back here).
async fn abandon(
    env: &Env,
    job: &Job,
    vm: &pb::Vm,
    state: Option<(&SrLoc, &str)>,
    why: &str,
) -> JobError {
    match clean_up(env, job, vm, state).await {
        Ok(()) => JobError::refused(
            Code::Aborted,
            format!(
                "the checkpoint of VM {} was not taken: {why}; nothing of it was kept; take it again",
                vm.id
            ),
        ),
        Err(e) => e,
    }
}

async fn clean_up(
    env: &Env,
    job: &Job,
    vm: &pb::Vm,
    state: Option<(&SrLoc, &str)>,
) -> Result<(), JobError> {
    if let Some(host) = job.outputs.get("paused") {
        let addr = read(&*env.ledger, |s| host_addr(s, host))?;
        match env.hosts.resume_vm(&addr, &vm.id).await {
            Ok(_) => {}
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {}
            Err(s) => return Err(JobError::from_status(format!("resuming VM {}", vm.id), s)),
        }
    }
    if let Some((loc, id)) = state {
        delete_once(env, loc, id).await?;
    }
    // The disk snapshots it made, found by their labels.
    let locs: Vec<SrLoc> = read(&*env.ledger, |s| {
        let spec = vm.spec.clone().unwrap_or_default();
        let mut srs: Vec<String> = spec
            .disks
            .iter()
            .filter_map(|d| s.volumes.get(&d.volume_id).map(|v| v.pool_id.clone()))
            .collect();
        srs.sort();
        srs.dedup();
        srs.iter().filter_map(|sr| sr_loc(s, sr).ok()).collect()
    });
    for loc in &locs {
        let made = env
            .storage
            .list_volumes(&loc.address, &loc.thin_pool_id)
            .await
            .map_err(|s| JobError::from_status(format!("listing volumes of {}", loc.address), s))?;
        for v in made.iter().filter(|v| {
            v.labels.get(TASK_LABEL) == Some(&job.task_id) && v.labels.contains_key(STEP_LABEL)
        }) {
            delete_once(env, loc, &v.id).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use tonic::Status;

    use super::*;
    use crate::jobs::test_utils::{World, position};

    fn checkpoint_job(name: &str) -> Job {
        Job {
            spec: Some(JobSpec::SnapshotVm(SnapshotVmJob {
                snapshot_id: format!("id-{name}"),
                vm_id: "vm1".into(),
                name: name.into(),
                memory: true,
                schedule: String::new(),
            })),
            ..Default::default()
        }
    }

    fn revert_job(snapshot: &str, host: &str) -> Job {
        Job {
            spec: Some(JobSpec::RevertVm(RevertVmJob {
                vm_id: "vm1".into(),
                snapshot_id: snapshot.into(),
                host_id: host.into(),
            })),
            ..Default::default()
        }
    }

    /// Takes checkpoint `name` of vm1 (running on h1); returns its state volume.
    async fn checkpointed(world: &World, name: &str) -> String {
        world.storage.set_free(1 << 40);
        let t = world.start_job(checkpoint_job(name));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Succeeded, "{task:?}");
        task.results["state_volume_id"].clone()
    }

    #[tokio::test]
    async fn a_checkpoint_saves_the_paused_vm_then_snapshots_its_disks_then_resumes_it() {
        let world = World::two_hosts_one_running_vm();
        let vol = checkpointed(&world, "cp1").await;
        let s = world.state();
        let snap = &s.vm_snapshots["id-cp1"];
        assert_eq!(snap.state_volume_id, vol);
        assert_eq!(snap.disk_snapshots.len(), 1);
        assert_eq!(s.vms["vm1"].current_snapshot_id, "id-cp1");
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Running);
        // In the VM's repository, sized by the shared rule, and nobody else's to delete.
        assert_eq!(s.volumes[&vol].pool_id, "sr1");
        assert_eq!(
            s.volumes[&vol].virtual_size_bytes,
            proto::saved_state::volume_bytes_for(256 << 20)
        );
        let user = s.volume_user(&vol).unwrap();
        assert!(user.contains("checkpoint id-cp1"), "{user}");
        // One disk, yet paused: memory and disk are the same instant.
        let hosts = world.hosts.calls();
        let paused = position(&hosts, "pause:h1:7000:vm1").unwrap();
        let saved = position(&hosts, &format!("save:h1:7000:vm1:{vol}:true")).unwrap();
        let resumed = position(&hosts, "resume:h1:7000:vm1").unwrap();
        assert!(paused < saved && saved < resumed, "{hosts:?}");
        let storage = world.storage.calls();
        assert!(
            position(&storage, "create_volume:vm1.state.job-1")
                < position(&storage, "snapshot:vol1"),
            "{storage:?}"
        );
        let results = &world.task("job-1").results;
        assert!(results.contains_key("pause_ms"), "{results:?}");
        assert_eq!(results["save_pause_ms"], "120");
    }

    #[tokio::test]
    async fn the_vm_paused_for_a_checkpoint_is_recorded_running_once_resumed() {
        // The host reported the pause, and the executor that paused it died: the next one
        // resumes it and records it running, not "paused" until the host's next report
        // (a migration asked for right after would be refused).
        let world = World::two_hosts_one_running_vm();
        world.storage.set_free(1 << 40);
        let t = world.start_job(checkpoint_job("cp1"));
        world.record_output(&t, "paused", "h1");
        world.report_power("vm1", hpb::PowerState::Paused);
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
        let hosts = world.hosts.calls();
        assert!(
            position(&hosts, "resume:h1:7000:vm1").is_some(),
            "{hosts:?}"
        );
        let s = world.state();
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Running);
        assert_eq!(s.vms["vm1"].host_id, "h1");
    }

    #[tokio::test]
    async fn a_failed_save_keeps_nothing_and_the_vm_runs_on() {
        let world = World::two_hosts_one_running_vm();
        world.storage.set_free(1 << 40);
        world
            .hosts
            .refuse_save(Status::internal("writing the state volume: I/O error"));
        let t = world.start_job(checkpoint_job("cp1"));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Failed);
        assert_eq!(task.error_code, "Aborted");
        assert!(
            task.error_message.contains("I/O error") && task.error_message.contains("not taken"),
            "{}",
            task.error_message
        );
        assert!(
            world
                .storage
                .calls()
                .contains(&"delete:v-vm1.state.job-1".to_string())
        );
        assert!(
            !world
                .storage
                .calls()
                .iter()
                .any(|c| c.starts_with("snapshot"))
        );
        assert!(
            world
                .hosts
                .calls()
                .contains(&"resume:h1:7000:vm1".to_string())
        );
        let s = world.state();
        assert!(s.vm_snapshots.is_empty());
        assert_eq!(s.volumes.len(), 1);
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Running);
    }

    #[tokio::test]
    async fn a_repository_without_room_refuses_the_checkpoint_before_the_vm_pauses() {
        let world = World::two_hosts_one_running_vm();
        world.storage.set_free(100 << 20);
        let t = world.start_job(checkpoint_job("cp1"));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.error_code, "ResourceExhausted", "{task:?}");
        assert!(task.error_message.contains("100 MiB free"), "{task:?}");
        assert!(world.hosts.calls().iter().all(|c| !c.starts_with("pause")));
        assert!(world.state().vm_snapshots.is_empty());
    }

    /// A new leader cannot tell which disk snapshots go with the saved memory: it resumes
    /// the VM the old one paused, deletes the state volume, and fails the task.
    #[tokio::test]
    async fn an_interrupted_checkpoint_is_abandoned_by_the_next_leader() {
        let world = World::two_hosts_one_running_vm();
        world.storage.set_free(1 << 40);
        let t = world.start_job(checkpoint_job("cp1"));
        world.record_output(&t, STATE_VOLUME, "v-vm1.state.job-1");
        world.record_output(&t, SAVING, "1");
        world.record_output(&t, "paused", "h1");
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Failed);
        assert!(task.error_message.contains("interrupted"), "{task:?}");
        assert!(
            world
                .hosts
                .calls()
                .contains(&"resume:h1:7000:vm1".to_string())
        );
        assert!(!world.hosts.calls().iter().any(|c| c.starts_with("save")));
        assert!(
            world
                .storage
                .calls()
                .contains(&"delete:v-vm1.state.job-1".to_string())
        );
        assert!(world.state().vm_snapshots.is_empty());
    }

    #[tokio::test]
    async fn reverting_to_a_checkpoint_restores_the_vm_running_on_the_given_host() {
        let world = World::two_hosts_one_running_vm();
        let vol = checkpointed(&world, "cp1").await;
        world.stop_vm1();
        let t = world.start_job(revert_job("id-cp1", "h2"));
        // h2 runs the VM before the job's end places it there: not a stale copy to stop
        // (its heartbeat answer would have had it destroyed).
        assert!(world.state().job_moves_vm_on("vm1", "h2"));
        assert!(!world.state().job_moves_vm_on("vm1", "h1"));
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
        assert!(!world.state().job_moves_vm_on("vm1", "h2"));
        let hosts = world.hosts.calls();
        assert!(
            hosts.contains(&format!("restore:h2:7000:vm1:{vol}:disks=1")),
            "{hosts:?}"
        );
        let storage = world.storage.calls();
        let reverted = storage.iter().position(|c| c.starts_with("revert:vol1"));
        assert!(reverted.is_some(), "{storage:?}");
        let s = world.state();
        let vm = &s.vms["vm1"];
        assert_eq!(
            (
                vm.host_id.as_str(),
                vm.power_state(),
                vm.desired_power_state()
            ),
            ("h2", hpb::PowerState::Running, hpb::PowerState::Running)
        );
        assert_eq!(vm.current_snapshot_id, "id-cp1");
        // The checkpoint keeps its saved state for the next revert.
        assert!(s.volumes.contains_key(&vol));
        assert_eq!(s.vm_snapshots["id-cp1"].state_volume_id, vol);
    }

    /// A leader that finds the VM already restored by the old one does not revert its
    /// disks again under the running guest, nor restore it twice.
    #[tokio::test]
    async fn a_revert_whose_restore_was_done_does_not_touch_the_running_disks() {
        let world = World::two_hosts_one_running_vm();
        checkpointed(&world, "cp1").await;
        world.stop_vm1();
        world.hosts.lists(
            "h2:7000",
            hpb::Vm {
                id: "vm1".into(),
                power_state: hpb::PowerState::Running as i32,
                ..Default::default()
            },
        );
        let t = world.start_job(revert_job("id-cp1", "h2"));
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
        assert!(
            !world
                .storage
                .calls()
                .iter()
                .any(|c| c.starts_with("revert"))
        );
        assert!(!world.hosts.calls().iter().any(|c| c.starts_with("restore")));
        assert_eq!(world.state().vms["vm1"].host_id, "h2");
    }

    #[tokio::test]
    async fn a_failed_restore_leaves_the_reverted_vm_stopped_and_says_so() {
        let world = World::two_hosts_one_running_vm();
        checkpointed(&world, "cp1").await;
        world.stop_vm1();
        world
            .hosts
            .refuse_restore(Status::invalid_argument("host h2's CPU lacks avx512f"));
        let t = world.start_job(revert_job("id-cp1", "h2"));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Failed);
        assert!(
            task.error_message.contains("avx512f")
                && task.error_message.contains("disks were reverted"),
            "{}",
            task.error_message
        );
        let s = world.state();
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Stopped);
        assert!(s.vms["vm1"].host_id.is_empty());
        assert_eq!(s.vms["vm1"].current_snapshot_id, "id-cp1");
    }

    #[tokio::test]
    async fn deleting_a_checkpoint_deletes_its_saved_state() {
        let world = World::two_hosts_one_running_vm();
        let vol = checkpointed(&world, "cp1").await;
        let t = world.start_job(Job {
            spec: Some(JobSpec::DeleteVmSnapshot(DeleteVmSnapshotJob {
                snapshot_id: "id-cp1".into(),
                vm_id: "vm1".into(),
            })),
            ..Default::default()
        });
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
        assert!(world.storage.calls().contains(&format!("delete:{vol}")));
        let s = world.state();
        assert!(!s.volumes.contains_key(&vol));
        assert!(s.vm_snapshots.is_empty());
    }

    /// What the state machine refuses at once, changing nothing.
    #[test]
    fn checkpoints_and_reverts_that_cannot_work_are_refused() {
        let world = World::two_hosts_one_running_vm();
        let refused = |job: Job| {
            let mut s = world.ledger.state.lock().unwrap();
            let n = s.applied_index + 1;
            let r = s.apply(
                n,
                &crate::state::command::Command {
                    at_ms: 500,
                    task_id: format!("t{n}"),
                    op: Some(Op::StartJob(job)),
                    ..Default::default()
                },
            );
            assert_ne!(r.code, 0);
            assert!(s.jobs.is_empty());
            r.message
        };
        // A disk snapshot of vm1, to revert to.
        world.ledger.state.lock().unwrap().vm_snapshots.insert(
            "disks".into(),
            pb::VmSnapshot {
                id: "disks".into(),
                vm_id: "vm1".into(),
                ..Default::default()
            },
        );
        let running = refused(revert_job("disks", ""));
        assert!(running.contains("shut it down"), "{running}");
        world.stop_vm1();
        let stopped = refused(checkpoint_job("cp"));
        assert!(stopped.contains("running or paused"), "{stopped}");
        let host = refused(revert_job("disks", "h2"));
        assert!(host.contains("holds the disks alone"), "{host}");
    }
}
