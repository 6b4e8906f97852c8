//! Suspend, resume and quick migration: a VM saved into a state volume (hostd's `SaveVm`)
//! and run on from it (`RestoreVm`), on the same host or another.
//!
//! **Suspend**: a thin state volume of `proto::saved_state::volume_bytes_for(memory)` is
//! made in the repository of the VM's first disk (refused at once when that repository has
//! less free space), its id committed as the step output `state_volume` (so the access
//! reconciler keeps the grant and a new leader finds it), exported and granted to the VM's
//! host like a disk; then `SaveVm` without resume, and the VM is committed SUSPENDED, on
//! no host, with the volume recorded on it. A save that fails leaves the VM running
//! (hostd resumes it) and the volume is deleted.
//!
//! **Resume**: the job's host (placed by the call) is granted the disks and the state
//! volume, `RestoreVm` builds the VM there, `restored` is committed as a step output, the
//! state volume is deleted and the VM is committed running there. A restore that fails
//! leaves the VM SUSPENDED with its state volume: nothing saved is lost, and the error is
//! the task's.
//!
//! **Quick migration** is a suspend whose job goes on to resume on another host; if that
//! restore fails the job fails but keeps the suspend (its effects ride on the failure).
//!
//! A new leader runs the job again from the start: a host that already lists the VM
//! stopped for SUSPENDED (or running, after a restore) counts as the step done.

use proto::coordinator as pb;
use proto::host as hpb;
use proto::storage as spb;
use tonic::Code;

use super::storage::{SrLoc, delete_once, find_made, labels, pooled, sr_loc, volume_loc};
use super::vm::{disk_access, export_of, grant_volume, host_addr, host_initiator, vm_config};
use super::{Env, Finish, JobError, read};
use crate::state::command::*;

/// The step output naming the state volume a suspend made.
pub(super) const STATE_VOLUME: &str = "state_volume";
/// The step output naming the host a resume restored the VM on.
const RESTORED: &str = "restored";

fn vm_of(env: &Env, id: &str) -> Result<pb::Vm, JobError> {
    read(&*env.ledger, |s| s.vms.get(id).cloned())
        .ok_or_else(|| JobError::refused(Code::NotFound, format!("no VM with id {id}")))
}

/// How `host_id` logs in to volume `volume_id` of `loc`: exported, its initiator granted.
pub(super) async fn state_volume_access(
    env: &Env,
    loc: &SrLoc,
    volume_id: &str,
    host_id: &str,
) -> Result<hpb::IscsiDisk, JobError> {
    let chap = read(&*env.ledger, |s| {
        let iqn = host_initiator(s, host_id)?;
        crate::chap::secrets(&s.token_key, &iqn)
            .map_err(|st| JobError::from_status(format!("CHAP for host {host_id}"), st))
    })?;
    let export = export_of(env, loc, volume_id).await?;
    grant_volume(
        env,
        loc,
        &export,
        volume_id,
        &format!("host {host_id}"),
        &chap,
    )
    .await
}

/// Where `vm`'s saved state goes: its first disk's repository.
pub(super) fn state_loc(s: &crate::state::PoolState, vm: &pb::Vm) -> Result<SrLoc, JobError> {
    let sr = s
        .state_volume_sr(vm)
        .map_err(|r| JobError::refused(Code::from(r.code), r.message))?;
    sr_loc(s, &sr)
}

/// The VM as host `addr` lists it, if it does.
async fn listed(env: &Env, addr: &str, vm_id: &str) -> Result<Option<hpb::Vm>, JobError> {
    let vms = env
        .hosts
        .list_vms(addr)
        .await
        .map_err(|s| JobError::from_status(format!("listing the VMs of {addr}"), s))?;
    Ok(vms.into_iter().find(|v| v.id == vm_id))
}

pub async fn suspend(env: &Env, job: &Job, j: &SuspendVmJob) -> Result<Finish, JobError> {
    let vm = vm_of(env, &j.vm_id)?;
    if vm.host_id != j.host_id {
        // Fenced (HA restarts it) or moved while the job waited on its host: the VM is
        // no longer this job's to save.
        return Err(JobError::refused(
            Code::Aborted,
            format!(
                "VM {} left host {} while it was being suspended; nothing was saved",
                vm.id, j.host_id
            ),
        ));
    }
    let (addr, loc) = read(&*env.ledger, |s| {
        Ok::<_, JobError>((host_addr(s, &j.host_id)?, state_loc(s, &vm)?))
    })?;
    let volume = make_state_volume(env, job, &vm, &loc).await?;
    env.step(
        &job.task_id,
        10,
        "saving the VM's memory and device state",
        &[(STATE_VOLUME, &volume.id)],
    )
    .await?;
    let disk = state_volume_access(env, &loc, &volume.id, &j.host_id).await?;
    let saved_before = listed(env, &addr, &vm.id).await?.is_some_and(|v| {
        v.power_state() == hpb::PowerState::Stopped
            && v.last_stop_reason() == hpb::StopReason::Suspended
    });
    let mut f = Finish::default()
        .result("state_volume_id", &volume.id)
        .result("state_volume_bytes", volume.virtual_size_bytes);
    if !saved_before {
        let r = env
            .hosts
            .save_vm(
                &addr,
                hpb::SaveVmRequest {
                    vm_id: vm.id.clone(),
                    state_volume: Some(disk),
                    resume: false,
                },
            )
            .await;
        match r {
            Ok(r) => {
                f = f
                    .result("pause_ms", r.pause_ms)
                    .result("bytes_written", r.bytes_written)
            }
            Err(s) if crate::backend::transient(&s) => {
                return Err(JobError::from_status(format!("saving VM {}", vm.id), s));
            }
            Err(s) => {
                // hostd resumed the VM: it runs on, and the volume goes.
                delete_once(env, &loc, &volume.id).await?;
                return Err(JobError::refused(
                    s.code(),
                    format!(
                        "saving VM {} failed: {}; it keeps running and its state volume was deleted",
                        vm.id,
                        s.message()
                    ),
                ));
            }
        }
    }
    f = f
        .effect(EffectKind::PutVolume(volume.clone()))
        .effect(EffectKind::VmSuspended(VmSuspended {
            vm_id: vm.id.clone(),
            state_volume_id: volume.id.clone(),
        }));
    if j.resume_on_host_id.is_empty() {
        return Ok(f);
    }
    // Quick migration: on to the destination. The VM as the restore sees it is the
    // suspended one (the commit is still to come).
    env.step(&job.task_id, 60, "restoring the VM on the destination", &[])
        .await?;
    let mut suspended = vm.clone();
    suspended.host_id.clear();
    suspended.state_volume_id = volume.id.clone();
    match restore(env, job, &suspended, &j.resume_on_host_id, &volume.id).await {
        Ok(done) => Ok(Finish {
            effects: f.effects.into_iter().chain(done.effects).collect(),
            results: f.results.into_iter().chain(done.results).collect(),
            ..Default::default()
        }),
        Err(JobError::Refused { code, message }) => Ok(Finish {
            failed: Some((code, message)),
            ..f
        }),
        Err(e) => Err(e),
    }
}

/// The state volume of this job: the one an earlier attempt made (found by its labels),
/// else a new one, once the repository is seen to have room for it.
pub(super) async fn make_state_volume(
    env: &Env,
    job: &Job,
    vm: &pb::Vm,
    loc: &SrLoc,
) -> Result<spb::Volume, JobError> {
    if let Some(v) = find_made(env, loc, &job.task_id, STATE_VOLUME).await? {
        return Ok(pooled(v, &loc.sr_id));
    }
    let spec = vm.spec.clone().unwrap_or_default();
    let need = proto::saved_state::volume_bytes_for(spec.memory_bytes);
    let usage = env
        .storage
        .pool_usage(&loc.address, &loc.thin_pool_id)
        .await
        .map_err(|s| {
            JobError::from_status(format!("reading repository {}'s usage", loc.sr_id), s)
        })?;
    if usage.free_bytes < need {
        return Err(JobError::refused(
            Code::ResourceExhausted,
            format!(
                "repository {} has {} MiB free; VM {}'s saved state needs up to {} MiB (its memory and a few MiB); nothing was changed",
                loc.sr_id,
                usage.free_bytes >> 20,
                vm.id,
                need >> 20
            ),
        ));
    }
    let name = format!(
        "{}.state.{}",
        spec.name,
        job.task_id.get(..8).unwrap_or(&job.task_id)
    );
    let r = env
        .storage
        .create_volume(
            &loc.address,
            spb::CreateVolumeRequest {
                pool_id: loc.thin_pool_id.clone(),
                name: name.clone(),
                virtual_size_bytes: need,
                block_size_bytes: 0,
                labels: labels(&job.task_id, STATE_VOLUME, &Default::default()),
            },
        )
        .await;
    match r {
        Ok(v) => Ok(pooled(v, &loc.sr_id)),
        Err(s) if s.code() == Code::AlreadyExists => {
            find_made(env, loc, &job.task_id, STATE_VOLUME)
                .await?
                .map(|v| pooled(v, &loc.sr_id))
                .ok_or_else(|| JobError::from_status(format!("creating state volume {name}"), s))
        }
        Err(s) => Err(JobError::from_status(
            format!("creating state volume {name}"),
            s,
        )),
    }
}

pub async fn resume(env: &Env, job: &Job, j: &ResumeVmJob) -> Result<Finish, JobError> {
    let vm = vm_of(env, &j.vm_id)?;
    if vm.power_state() != hpb::PowerState::Suspended {
        return Err(JobError::refused(
            Code::FailedPrecondition,
            format!("VM {} is no longer suspended", vm.id),
        ));
    }
    let volume = vm.state_volume_id.clone();
    restore(env, job, &vm, &j.host_id, &volume).await
}

/// Restores suspended `vm` on `host_id` from `volume_id`, then deletes the volume; the
/// finish commits it running there.
async fn restore(
    env: &Env,
    job: &Job,
    vm: &pb::Vm,
    host_id: &str,
    volume_id: &str,
) -> Result<Finish, JobError> {
    let loc = read(&*env.ledger, |s| volume_loc(s, volume_id));
    // A quick migration's volume is not in the pool state yet: it is in the repository
    // of the VM's first disk.
    let loc = match loc {
        Ok(l) => l,
        Err(_) => read(&*env.ledger, |s| state_loc(s, vm))?,
    };
    restore_on(env, job, vm, host_id, &loc, volume_id)
        .await
        .map_err(|e| match e {
            JobError::Refused { code, message } => JobError::Refused {
                code,
                message: format!("{message}; it stays suspended with its state volume {volume_id}"),
            },
            e => e,
        })?;
    env.step(&job.task_id, 90, "deleting the state volume", &[])
        .await?;
    delete_once(env, &loc, volume_id).await?;
    Ok(Finish::default()
        .result("host_id", host_id)
        .effect(EffectKind::VmResumed(MoveVm {
            vm_id: vm.id.clone(),
            to_host_id: host_id.to_owned(),
        }))
        .effect(EffectKind::RemoveVolume(volume_id.to_owned())))
}

/// Whether `vm_id` already runs on `host_id` from an earlier attempt's restore (recorded
/// as [`RESTORED`], or listed running there). One still under way is waited for: a
/// second would be refused, and failing would leave a guest running that the pool does
/// not place there.
pub(super) async fn restored_on(
    env: &Env,
    job: &Job,
    vm_id: &str,
    host_id: &str,
) -> Result<bool, JobError> {
    if job.outputs.get(RESTORED).is_some_and(|h| h == host_id) {
        return Ok(true);
    }
    let addr = read(&*env.ledger, |s| host_addr(s, host_id))?;
    match listed(env, &addr, vm_id).await?.map(|v| v.power_state()) {
        Some(hpb::PowerState::Running | hpb::PowerState::Paused) => Ok(true),
        Some(hpb::PowerState::Migrating) => Err(JobError::Transient {
            what: format!("VM {vm_id} is still being restored on host {host_id}"),
            source: tonic::Status::unavailable("a restore is under way"),
        }),
        _ => Ok(false),
    }
}

/// Restores `vm` (its spec as given) on `host_id` from the state in `volume_id` of
/// `loc`, unless [`restored_on`] finds it done; commits [`RESTORED`]. The volume stays.
pub(super) async fn restore_on(
    env: &Env,
    job: &Job,
    vm: &pb::Vm,
    host_id: &str,
    loc: &SrLoc,
    volume_id: &str,
) -> Result<(), JobError> {
    if !restored_on(env, job, &vm.id, host_id).await? {
        let addr = read(&*env.ledger, |s| host_addr(s, host_id))?;
        let access = disk_access(env, vm, host_id).await?;
        let state = state_volume_access(env, loc, volume_id, host_id).await?;
        env.hosts
            .restore_vm(
                &addr,
                hpb::RestoreVmRequest {
                    vm_id: vm.id.clone(),
                    config: Some(vm_config(vm, access)),
                    state_volume: Some(state),
                },
            )
            .await
            .map_err(|s| {
                JobError::from_status(format!("restoring VM {} on host {host_id}", vm.id), s)
            })?;
    }
    env.step(
        &job.task_id,
        85,
        "restored from the saved state",
        &[(RESTORED, host_id)],
    )
    .await
}

#[cfg(test)]
mod tests {
    use tonic::Status;

    use super::*;
    use crate::jobs::test_utils::{World, migrate_job, position};

    fn suspend_job(to: &str) -> Job {
        Job {
            spec: Some(JobSpec::SuspendVm(SuspendVmJob {
                vm_id: "vm1".into(),
                host_id: "h1".into(),
                resume_on_host_id: to.into(),
            })),
            ..Default::default()
        }
    }

    fn resume_job(host: &str) -> Job {
        Job {
            spec: Some(JobSpec::ResumeVm(ResumeVmJob {
                vm_id: "vm1".into(),
                host_id: host.into(),
            })),
            ..Default::default()
        }
    }

    /// Suspends vm1 on h1 through its job; returns its state volume's id.
    async fn suspended(world: &World) -> String {
        world.storage.set_free(1 << 40);
        let t = world.start_job(suspend_job(""));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Succeeded, "{task:?}");
        task.results["state_volume_id"].clone()
    }

    #[tokio::test]
    async fn a_suspend_saves_the_vm_into_a_granted_state_volume_and_leaves_no_host_holding_it() {
        let world = World::two_hosts_one_running_vm();
        let vol = suspended(&world).await;
        let s = world.state();
        let vm = &s.vms["vm1"];
        assert_eq!(vm.power_state(), hpb::PowerState::Suspended);
        assert_eq!(vm.desired_power_state(), hpb::PowerState::Suspended);
        assert_eq!(vm.last_stop_reason(), hpb::StopReason::Suspended);
        assert!(vm.host_id.is_empty(), "{vm:?}");
        assert_eq!(vm.state_volume_id, vol);
        // Recorded in the VM's repository, sized by the shared rule for 256 MiB.
        assert_eq!(s.volumes[&vol].pool_id, "sr1");
        assert_eq!(
            s.volumes[&vol].virtual_size_bytes,
            proto::saved_state::volume_bytes_for(256 << 20)
        );
        assert!(s.hosts["h1"].vm_ids.is_empty(), "h1 holds nothing for it");
        // The volume was made, then granted to h1, then the VM saved into it and stopped.
        let storage = world.storage.calls();
        let made = position(&storage, "create_volume:vm1.state.job-1").unwrap();
        let granted = world.storage.position(&format!("grant:e-{vol}:iqn.h1"));
        assert!(granted.is_some_and(|g| made < g), "{storage:?}");
        assert!(
            world
                .hosts
                .calls()
                .contains(&format!("save:h1:7000:vm1:{vol}:false")),
            "{:?}",
            world.hosts.calls()
        );
        // The saved state is no volume anyone may delete.
        let user = s.volume_user(&vol).unwrap();
        assert!(user.contains("suspended VM vm1"), "{user}");
    }

    #[tokio::test]
    async fn a_repository_without_room_refuses_the_suspend_and_nothing_changes() {
        let world = World::two_hosts_one_running_vm();
        world.storage.set_free(100 << 20);
        let t = world.start_job(suspend_job(""));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Failed);
        assert_eq!(task.error_code, "ResourceExhausted");
        assert!(
            task.error_message.contains("100 MiB free"),
            "{}",
            task.error_message
        );
        let s = world.state();
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Running);
        assert_eq!(s.vms["vm1"].host_id, "h1");
        assert_eq!(s.volumes.len(), 1, "no state volume");
        assert!(
            !world
                .storage
                .calls()
                .iter()
                .any(|c| c.starts_with("create_volume"))
        );
        assert!(!world.hosts.calls().iter().any(|c| c.starts_with("save")));
    }

    #[tokio::test]
    async fn a_failed_save_deletes_the_state_volume_and_the_vm_runs_on() {
        let world = World::two_hosts_one_running_vm();
        world.storage.set_free(1 << 40);
        world
            .hosts
            .refuse_save(Status::internal("writing the state volume: no space"));
        let t = world.start_job(suspend_job(""));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Failed);
        assert!(
            task.error_message.contains("keeps running"),
            "{}",
            task.error_message
        );
        assert!(
            world
                .storage
                .calls()
                .contains(&"delete:v-vm1.state.job-1".to_string())
        );
        let s = world.state();
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Running);
        assert!(s.vms["vm1"].state_volume_id.is_empty());
        assert_eq!(s.volumes.len(), 1);
    }

    /// A host that dies while the job waits on it is fenced: the VM leaves it (HA
    /// restarts it elsewhere), and the suspend ends instead of holding the VM.
    #[tokio::test]
    async fn a_suspend_whose_host_was_fenced_meanwhile_ends() {
        let world = World::two_hosts_one_running_vm();
        world.storage.set_free(1 << 40);
        let t = world.start_job(suspend_job(""));
        {
            let mut s = world.ledger.state.lock().unwrap();
            let vm = s.vms.get_mut("vm1").unwrap();
            vm.host_id.clear();
            vm.power_state = hpb::PowerState::Stopped as i32;
            vm.last_stop_reason = hpb::StopReason::Fenced as i32;
        }
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Failed);
        assert!(task.error_message.contains("left host h1"), "{task:?}");
        assert!(world.state().jobs.is_empty(), "the VM is free for HA");
        assert!(!world.hosts.calls().iter().any(|c| c.starts_with("save")));
        assert_eq!(world.state().volumes.len(), 1);
    }

    /// A leader that takes the job over after hostd saved the VM finds it stopped for
    /// SUSPENDED and does not save again (the VM is no longer running to save).
    #[tokio::test]
    async fn a_new_leader_finds_the_save_done() {
        let world = World::two_hosts_one_running_vm();
        world.hosts.lists(
            "h1:7000",
            hpb::Vm {
                id: "vm1".into(),
                power_state: hpb::PowerState::Stopped as i32,
                last_stop_reason: hpb::StopReason::Suspended as i32,
                ..Default::default()
            },
        );
        suspended(&world).await;
        assert!(!world.hosts.calls().iter().any(|c| c.starts_with("save")));
        assert_eq!(
            world.state().vms["vm1"].power_state(),
            hpb::PowerState::Suspended
        );
    }

    #[tokio::test]
    async fn a_resume_restores_on_the_placed_host_then_deletes_the_state_volume() {
        let world = World::two_hosts_one_running_vm();
        let vol = suspended(&world).await;
        let t = world.start_job(resume_job("h2"));
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
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
        assert!(vm.state_volume_id.is_empty());
        assert!(!s.volumes.contains_key(&vol));
        assert_eq!(s.hosts["h2"].vm_ids, ["vm1"]);
        // h2 got the disk and the state volume before the restore; the volume went after.
        let restore = format!("restore:h2:7000:vm1:{vol}:disks=1");
        assert!(
            world.hosts.calls().contains(&restore),
            "{:?}",
            world.hosts.calls()
        );
        assert!(world.storage.position("grant:e-vol1:iqn.h2").is_some());
        assert!(
            world
                .storage
                .position(&format!("grant:e-{vol}:iqn.h2"))
                .is_some()
        );
        assert!(world.storage.position(&format!("delete:{vol}")).is_some());
    }

    /// Nothing saved is lost: a restore that fails leaves the VM suspended with its
    /// state volume, and the task says why.
    #[tokio::test]
    async fn a_failed_restore_leaves_the_vm_suspended_with_its_state_volume() {
        let world = World::two_hosts_one_running_vm();
        let vol = suspended(&world).await;
        world.hosts.refuse_restore(Status::failed_precondition(
            "the host lacks CPU feature avx512f the guest was shown",
        ));
        let t = world.start_job(resume_job("h2"));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Failed);
        assert!(task.error_message.contains("avx512f"), "{task:?}");
        assert!(task.error_message.contains("stays suspended"), "{task:?}");
        let s = world.state();
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Suspended);
        assert_eq!(s.vms["vm1"].state_volume_id, vol);
        assert!(s.volumes.contains_key(&vol));
        assert!(world.storage.position(&format!("delete:{vol}")).is_none());
    }

    #[tokio::test]
    async fn a_quick_migration_suspends_here_and_resumes_there() {
        let world = World::two_hosts_one_running_vm();
        world.storage.set_free(1 << 40);
        let t = world.start_job(suspend_job("h2"));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.kind, "vm.migrate.quick");
        assert_eq!(task.state(), pb::TaskState::Succeeded, "{task:?}");
        let s = world.state();
        assert_eq!(s.vms["vm1"].host_id, "h2");
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Running);
        assert_eq!(s.volumes.len(), 1, "the state volume is gone");
        let calls = world.hosts.calls();
        let save = calls.iter().position(|c| c.starts_with("save:h1:7000:vm1"));
        let restore = calls
            .iter()
            .position(|c| c.starts_with("restore:h2:7000:vm1"));
        assert!(save.is_some() && save < restore, "{calls:?}");
    }

    /// A quick migration whose restore fails keeps its suspend: the task fails, the VM
    /// stays suspended with its state volume, so it can be resumed elsewhere.
    #[tokio::test]
    async fn a_quick_migration_that_cannot_restore_leaves_the_vm_suspended() {
        let world = World::two_hosts_one_running_vm();
        world.storage.set_free(1 << 40);
        world
            .hosts
            .refuse_restore(Status::invalid_argument("no such kernel on this host"));
        let t = world.start_job(suspend_job("h2"));
        world.drive(&t).await;
        let task = world.task(&t);
        assert_eq!(task.state(), pb::TaskState::Failed);
        assert!(task.error_message.contains("stays suspended"), "{task:?}");
        let s = world.state();
        let vm = &s.vms["vm1"];
        assert_eq!(vm.power_state(), hpb::PowerState::Suspended);
        assert!(vm.host_id.is_empty());
        assert!(s.volumes.contains_key(&vm.state_volume_id), "{vm:?}");
    }

    /// Bad input changes nothing: a suspend of a stopped VM, a resume of a running one;
    /// and a suspended VM is not started, shut down, live-migrated or suspended again.
    #[tokio::test]
    async fn power_changes_that_do_not_fit_the_vms_state_are_refused() {
        fn refused(world: &World, op: Op, needle: &str) {
            let before = world.state().vms["vm1"].clone();
            let r = world.apply(op);
            assert_eq!(
                Code::from(r.code),
                Code::FailedPrecondition,
                "{}",
                r.message
            );
            assert!(r.message.contains(needle), "{needle}: {}", r.message);
            assert_eq!(world.state().vms["vm1"], before);
            assert!(world.state().jobs.is_empty());
        }
        let world = World::two_hosts_one_running_vm();
        refused(
            &world,
            Op::StartJob(resume_job("h2")),
            "only a suspended VM",
        );

        suspended(&world).await;
        let power = |desired: hpb::PowerState| {
            Op::SetVmPower(SetVmPower {
                vm_id: "vm1".into(),
                desired: desired as i32,
                host_id: "h2".into(),
                ..Default::default()
            })
        };
        refused(&world, power(hpb::PowerState::Running), "cannot be started");
        refused(
            &world,
            power(hpb::PowerState::Stopped),
            "cannot be shut down",
        );
        refused(
            &world,
            Op::StartJob(migrate_job("vm1", "", "h2")),
            "cannot be live-migrated",
        );
        refused(&world, Op::StartJob(suspend_job("")), "already suspended");

        // A stopped VM has nothing to save.
        let world = World::two_hosts_one_running_vm();
        {
            let mut s = world.ledger.state.lock().unwrap();
            let vm = s.vms.get_mut("vm1").unwrap();
            vm.host_id.clear();
            vm.desired_power_state = hpb::PowerState::Stopped as i32;
            vm.power_state = hpb::PowerState::Stopped as i32;
        }
        refused(
            &world,
            Op::StartJob(suspend_job("")),
            "only a running or paused VM is suspended",
        );
    }

    #[tokio::test]
    async fn destroying_a_suspended_vm_deletes_its_state_volume() {
        let world = World::two_hosts_one_running_vm();
        let vol = suspended(&world).await;
        let t = world.start_job(Job {
            spec: Some(JobSpec::DestroyVm(DestroyVmJob {
                vm_id: "vm1".into(),
                delete_disks: false,
            })),
            ..Default::default()
        });
        world.drive(&t).await;
        assert_eq!(world.task(&t).state(), pb::TaskState::Succeeded);
        let s = world.state();
        assert!(!s.vms.contains_key("vm1"));
        assert!(!s.volumes.contains_key(&vol));
        assert!(s.volumes.contains_key("vol1"), "its disk stays");
        assert!(world.storage.position(&format!("delete:{vol}")).is_some());
    }

    /// HA restarts what was running on a fenced host; a suspended VM runs nowhere, so
    /// fencing the host it was saved on leaves it suspended.
    #[tokio::test]
    async fn fencing_the_host_a_vm_was_suspended_on_leaves_it_suspended() {
        let world = World::two_hosts_one_running_vm();
        let vol = suspended(&world).await;
        world.mark_unreachable("h1");
        let t = world.start_job(Job {
            spec: Some(JobSpec::FenceHost(FenceHostJob {
                host_id: "h1".into(),
                initiator_iqn: "iqn.h1".into(),
            })),
            ..Default::default()
        });
        world.drive(&t).await;
        let s = world.state();
        assert_eq!(s.hosts["h1"].state(), pb::HostState::Fenced);
        let vm = &s.vms["vm1"];
        assert_eq!(vm.desired_power_state(), hpb::PowerState::Suspended);
        assert_eq!(vm.last_stop_reason(), hpb::StopReason::Suspended);
        assert_eq!(vm.state_volume_id, vol);
    }
}
