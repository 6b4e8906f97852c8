//! VMs: creating them (from a spec or a template), their power state, migration,
//! snapshots (taken, listed, reverted to, deleted) and clones, and where the scheduler
//! would place one.

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Status;

use super::PoolHandler;
use super::request::{need, page};
use crate::auth::Caller;
use crate::scheduler;
use crate::state::command::*;
use crate::state::jobs::{power_name, suspended_refusal, vm_suspended};
use crate::state::undo::undo_disks_without_overlay;

/// A new VM from a spec, or from a template with what the request says of the VM over
/// the template's. A template with disks is cloned by a job; otherwise the VM is
/// committed at once, placed first when it is to start.
pub(super) async fn create(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CreateVmRequest,
) -> Result<pb::Task, Status> {
    if let Some(prev) = svc
        .c
        .read(|s| s.lookup_request(&r.request_id, "vm.create"))
        .await?
    {
        return prev.into_status();
    }
    let vm_id = uuid::Uuid::new_v4().to_string();
    let vifs = super::networks::vifs_on(svc, &r.networks).await?;
    let (spec, template_id) = match r.source {
        Some(pb::create_vm_request::Source::TemplateId(tid)) => {
            let t = svc
                .c
                .read(|s| s.templates.get(&tid).cloned())
                .await?
                .ok_or_else(|| Status::not_found(format!("no template with id {tid}")))?;
            let mut spec = t.spec.clone().unwrap_or_default();
            if let Some(given) = r.spec {
                if !given.name.is_empty() {
                    spec.name = given.name;
                }
                if given.vcpus > 0 {
                    spec.vcpus = given.vcpus;
                }
                if given.memory_bytes > 0 {
                    spec.memory_bytes = given.memory_bytes;
                }
                if given.ha_priority != 0 {
                    spec.ha_priority = given.ha_priority;
                    spec.ha_order = given.ha_order;
                }
                spec.labels.extend(given.labels);
            }
            if !t.disk_volumes.is_empty() {
                // The template's disks are cloned by a job; a start is placed once the VM
                // exists.
                return svc
                    .start_job(
                        who,
                        &r.request_id,
                        JobSpec::VmFromTemplate(VmFromTemplateJob {
                            vm_id,
                            template_id: tid,
                            spec: Some(spec),
                            sr_id: r.sr_id,
                            start: r.start,
                            host_id: r.host_id,
                            request_id: r.request_id.clone(),
                            vifs,
                        }),
                    )
                    .await;
            }
            (spec, tid)
        }
        _ => (
            r.spec
                .ok_or_else(|| Status::invalid_argument("spec is required"))?,
            String::new(),
        ),
    };
    // Undo disks get their overlays from the start: the VM is made stopped, then started.
    let undo = spec.disks.iter().any(|d| d.undo);
    if undo && (r.start || !r.host_id.is_empty()) {
        let op = Op::CreateVm(CreateVm {
            vm_id: vm_id.clone(),
            spec: Some(spec),
            template_id,
            start_on_host: String::new(),
            vifs,
        });
        svc.c.write(who, &r.request_id, op).await?;
        let start = pb::VmPowerRequest {
            request_id: if r.request_id.is_empty() {
                String::new()
            } else {
                format!("{}-start", r.request_id)
            },
            vm_id,
            host_id: r.host_id,
            force: false,
        };
        return set_power(svc, who, start, hpb::PowerState::Running).await;
    }
    if r.start || !r.host_id.is_empty() {
        let networks: Vec<&str> = vifs.iter().map(|v| v.network_id.as_str()).collect();
        return svc
            .c
            .place_and_commit(who, &r.request_id, &spec, &networks, &r.host_id, |host| {
                Op::CreateVm(CreateVm {
                    vm_id: vm_id.clone(),
                    spec: Some(spec.clone()),
                    template_id: template_id.clone(),
                    start_on_host: host,
                    vifs: vifs.clone(),
                })
            })
            .await;
    }
    let op = Op::CreateVm(CreateVm {
        vm_id,
        spec: Some(spec),
        template_id,
        start_on_host: String::new(),
        vifs,
    });
    svc.c.write(who, &r.request_id, op).await
}

pub(super) async fn get(svc: &PoolHandler, id: String) -> Result<pb::Vm, Status> {
    svc.c
        .read(|s| s.vms.get(&id).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no VM with id {id}")))
}

pub(super) async fn list(
    svc: &PoolHandler,
    r: pb::ListVmsRequest,
) -> Result<pb::ListVmsResponse, Status> {
    let (vms, next) = svc
        .c
        .read(|s| {
            page(
                s.vms
                    .iter()
                    .filter(|(_, v)| r.host_id.is_empty() || v.host_id == r.host_id)
                    .map(|(k, v)| (k.clone(), v.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListVmsResponse {
        vms,
        next_page_token: next,
    })
}

pub(super) async fn update(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::UpdateVmRequest,
) -> Result<pb::Task, Status> {
    need("vm_id", &r.vm_id)?;
    let op = Op::UpdateVm(UpdateVm {
        vm_id: r.vm_id,
        spec: r.spec,
    });
    svc.c.write(who, &r.request_id, op).await
}

/// Start, shut down, pause or resume: the power state the pool wants. Starting a VM
/// that is on no host places it first.
pub(super) async fn set_power(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::VmPowerRequest,
    desired: hpb::PowerState,
) -> Result<pb::Task, Status> {
    need("vm_id", &r.vm_id)?;
    if desired == hpb::PowerState::Running {
        let vm = svc
            .c
            .read(|s| s.vms.get(&r.vm_id).cloned())
            .await?
            .ok_or_else(|| Status::not_found(format!("no VM with id {}", r.vm_id)))?;
        // Refused before placing it (apply refuses it too): a fresh boot would lose the
        // saved guest.
        if vm_suspended(&vm) {
            let r = suspended_refusal(&vm, "started");
            return Err(Status::new(tonic::Code::from(r.code), r.message));
        }
        if vm.host_id.is_empty() && !undo_disks_without_overlay(&vm).is_empty() {
            // Its undo disks' overlays are made first (a job), which then places it.
            if let Some(prev) = svc
                .c
                .read(|s| s.lookup_request(&r.request_id, "vm.start"))
                .await?
            {
                return prev.into_status();
            }
            let spec = vm.spec.clone().unwrap_or_default();
            let networks: Vec<&str> = vm.vifs.iter().map(|v| v.network_id.as_str()).collect();
            let host_id = svc.c.schedule(&spec, &networks, &r.host_id).await?;
            let job = JobSpec::StartUndoVm(StartUndoVmJob {
                vm_id: vm.id.clone(),
                host_id,
            });
            return svc.start_job(who, &r.request_id, job).await;
        }
        if vm.host_id.is_empty() {
            let spec = vm.spec.clone().unwrap_or_default();
            let vm_id = r.vm_id.clone();
            let networks: Vec<&str> = vm.vifs.iter().map(|v| v.network_id.as_str()).collect();
            return svc
                .c
                .place_and_commit(who, &r.request_id, &spec, &networks, &r.host_id, |host| {
                    Op::SetVmPower(SetVmPower {
                        vm_id: vm_id.clone(),
                        desired: desired as i32,
                        host_id: host,
                        force: r.force,
                        reboot: false,
                        ha_restart: false,
                    })
                })
                .await;
        }
    }
    let op = Op::SetVmPower(SetVmPower {
        vm_id: r.vm_id.clone(),
        desired: desired as i32,
        host_id: String::new(),
        force: r.force,
        reboot: false,
        ha_restart: false,
    });
    svc.c.write(who, &r.request_id, op).await
}

pub(super) async fn reboot(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::VmPowerRequest,
) -> Result<pb::Task, Status> {
    let spec = JobSpec::RebootVm(RebootVmJob {
        vm_id: r.vm_id,
        force: r.force,
    });
    svc.start_job(who, &r.request_id, spec).await
}

pub(super) async fn destroy(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::DestroyVmRequest,
) -> Result<pb::Task, Status> {
    let spec = JobSpec::DestroyVm(DestroyVmJob {
        vm_id: r.vm_id,
        delete_disks: r.delete_disks,
    });
    svc.start_job(who, &r.request_id, spec).await
}

/// Commits or discards a stopped VM's pending undo changes (a job; see `jobs::undo`).
pub(super) async fn undo_changes(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::UndoVmChangesRequest,
) -> Result<pb::Task, Status> {
    need("vm_id", &r.vm_id)?;
    let job = JobSpec::EndUndo(EndUndoJob {
        vm_id: r.vm_id,
        commit: r.commit,
    });
    svc.start_job(who, &r.request_id, job).await
}

/// Suspends a running or paused VM into a state volume (a job; see `jobs::suspend`).
pub(super) async fn suspend(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::VmPowerRequest,
) -> Result<pb::Task, Status> {
    need("vm_id", &r.vm_id)?;
    // A retry after the suspend committed finds the VM on no host: answer the first task.
    if let Some(prev) = svc
        .c
        .read(|s| s.lookup_request(&r.request_id, "vm.suspend"))
        .await?
    {
        return prev.into_status();
    }
    let host_id = svc
        .c
        .read(|s| s.vms.get(&r.vm_id).map(|v| v.host_id.clone()))
        .await?
        .ok_or_else(|| Status::not_found(format!("no VM with id {}", r.vm_id)))?;
    let spec = JobSpec::SuspendVm(SuspendVmJob {
        vm_id: r.vm_id,
        host_id,
        resume_on_host_id: String::new(),
    });
    svc.start_job(who, &r.request_id, spec).await
}

/// A paused VM runs on; a suspended one is restored (a job) on the request's host or the
/// scheduler's choice. Any other VM is refused: there is nothing to resume.
pub(super) async fn resume(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::VmPowerRequest,
) -> Result<pb::Task, Status> {
    need("vm_id", &r.vm_id)?;
    let vm = svc
        .c
        .read(|s| s.vms.get(&r.vm_id).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no VM with id {}", r.vm_id)))?;
    if !vm_suspended(&vm) {
        let paused = vm.power_state() == hpb::PowerState::Paused
            || vm.desired_power_state() == hpb::PowerState::Paused;
        if !paused {
            // A retry of a resume that already ran finds the VM running: its first task.
            if let Some(prev) = svc
                .c
                .read(|s| s.lookup_request(&r.request_id, "vm.resume"))
                .await?
            {
                return prev.into_status();
            }
            return Err(Status::failed_precondition(format!(
                "VM {} is {}: only a paused or suspended VM is resumed",
                vm.id,
                power_name(vm.power_state())
            )));
        }
        return set_power(svc, who, r, hpb::PowerState::Running).await;
    }
    let spec = vm.spec.clone().unwrap_or_default();
    let networks: Vec<&str> = vm.vifs.iter().map(|v| v.network_id.as_str()).collect();
    let host_id = svc.c.schedule(&spec, &networks, &r.host_id).await?;
    let job = JobSpec::ResumeVm(ResumeVmJob {
        vm_id: vm.id.clone(),
        host_id,
    });
    svc.start_job(who, &r.request_id, job).await
}

/// Live-migrates a VM to the given host or the scheduler's choice, within the request's
/// downtime budget or the pool's; a quick migration suspends it here and resumes it there.
pub(super) async fn migrate(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::MigrateVmRequest,
) -> Result<pb::Task, Status> {
    need("vm_id", &r.vm_id)?;
    let kind = if r.quick {
        "vm.migrate.quick"
    } else {
        "vm.migrate"
    };
    if let Some(prev) = svc
        .c
        .read(|s| s.lookup_request(&r.request_id, kind))
        .await?
    {
        return prev.into_status();
    }
    let (vm, budget) = svc
        .c
        .read(|s| {
            (
                s.vms.get(&r.vm_id).cloned(),
                s.settings.migration_downtime_budget_ms,
            )
        })
        .await?;
    let vm = vm.ok_or_else(|| Status::not_found(format!("no VM with id {}", r.vm_id)))?;
    if vm_suspended(&vm) {
        let what = if r.quick { "migrated" } else { "live-migrated" };
        let r = suspended_refusal(&vm, what);
        return Err(Status::new(tonic::Code::from(r.code), r.message));
    }
    let dest = destination(svc, &vm, &r.destination_host_id).await?;
    if r.quick {
        let job = JobSpec::SuspendVm(SuspendVmJob {
            vm_id: vm.id.clone(),
            host_id: vm.host_id.clone(),
            resume_on_host_id: dest,
        });
        return svc.start_job(who, &r.request_id, job).await;
    }
    svc.start_job(
        who,
        &r.request_id,
        JobSpec::MigrateVm(MigrateVmJob {
            vm_id: vm.id.clone(),
            source_host_id: vm.host_id.clone(),
            destination_host_id: dest,
            downtime_budget_ms: if r.downtime_budget_ms > 0 {
                r.downtime_budget_ms
            } else {
                budget
            },
            auto_converge: r.auto_converge,
            token: uuid::Uuid::new_v4().simple().to_string(),
            evacuating_host_id: String::new(),
        }),
    )
    .await
}

/// Where a VM should move: the given host, or the scheduler's choice among the others.
pub(super) async fn destination(
    svc: &PoolHandler,
    vm: &pb::Vm,
    given: &str,
) -> Result<String, Status> {
    if !given.is_empty() {
        return Ok(given.to_owned());
    }
    svc.c
        .read(|s| {
            let hosts: Vec<_> = s
                .candidates()
                .into_iter()
                .filter(|h| h.id != vm.host_id)
                .collect();
            scheduler::place(&hosts, &s.vm_demand(vm), &s.policy())
                .map(|i| hosts[i].id.clone())
                .map_err(|u| Status::resource_exhausted(u.to_string()))
        })
        .await?
}

pub(super) async fn snapshot(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::SnapshotVmRequest,
) -> Result<pb::Task, Status> {
    need("vm_id", &r.vm_id)?;
    need("name", &r.name)?;
    let spec = JobSpec::SnapshotVm(SnapshotVmJob {
        snapshot_id: uuid::Uuid::new_v4().to_string(),
        vm_id: r.vm_id,
        name: r.name,
        memory: r.memory,
        schedule: String::new(),
    });
    svc.start_job(who, &r.request_id, spec).await
}

pub(super) async fn list_snapshots(
    svc: &PoolHandler,
    r: pb::ListVmSnapshotsRequest,
) -> Result<pb::ListVmSnapshotsResponse, Status> {
    let (snapshots, next) = svc
        .c
        .read(|s| {
            page(
                s.vm_snapshots
                    .iter()
                    .filter(|(_, x)| r.vm_id.is_empty() || x.vm_id == r.vm_id)
                    .map(|(k, v)| (k.clone(), v.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListVmSnapshotsResponse {
        snapshots,
        next_page_token: next,
    })
}

pub(super) async fn revert(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::RevertVmRequest,
) -> Result<pb::Task, Status> {
    need("vm_id", &r.vm_id)?;
    need("snapshot_id", &r.snapshot_id)?;
    if let Some(prev) = svc
        .c
        .read(|s| s.lookup_request(&r.request_id, "vm.revert"))
        .await?
    {
        return prev.into_status();
    }
    // A checkpoint runs on from its saved state: placed here, as a resume is.
    let (snap, vm) = svc
        .c
        .read(|s| {
            (
                s.vm_snapshots.get(&r.snapshot_id).cloned(),
                s.vms.get(&r.vm_id).cloned(),
            )
        })
        .await?;
    let host_id = match (snap, vm) {
        (Some(snap), Some(vm)) if !snap.state_volume_id.is_empty() => {
            let spec = snap.spec.clone().unwrap_or_default();
            let networks: Vec<&str> = vm.vifs.iter().map(|v| v.network_id.as_str()).collect();
            svc.c.schedule(&spec, &networks, &r.host_id).await?
        }
        // The state machine refuses what does not fit (a host for a disk snapshot).
        _ => r.host_id,
    };
    let spec = JobSpec::RevertVm(RevertVmJob {
        vm_id: r.vm_id,
        snapshot_id: r.snapshot_id,
        host_id,
    });
    svc.start_job(who, &r.request_id, spec).await
}

/// Deletes a VM snapshot (a job: its disk snapshots go from storaged first). The snapshot
/// is looked up here for its VM, which the job holds as a revert does.
pub(super) async fn delete_snapshot(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::DeleteVmSnapshotRequest,
) -> Result<pb::Task, Status> {
    need("snapshot_id", &r.snapshot_id)?;
    // A retry after the snapshot is gone answers with the task that deleted it.
    if let Some(prev) = svc
        .c
        .read(|s| s.lookup_request(&r.request_id, "vm.snapshot.delete"))
        .await?
    {
        return prev.into_status();
    }
    let vm_id = svc
        .c
        .read(|s| s.vm_snapshots.get(&r.snapshot_id).map(|x| x.vm_id.clone()))
        .await?
        .ok_or_else(|| Status::not_found(format!("no VM snapshot with id {}", r.snapshot_id)))?;
    let spec = JobSpec::DeleteVmSnapshot(DeleteVmSnapshotJob {
        snapshot_id: r.snapshot_id,
        vm_id,
    });
    svc.start_job(who, &r.request_id, spec).await
}

pub(super) async fn clone(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CloneVmRequest,
) -> Result<pb::Task, Status> {
    need("source_id", &r.source_id)?;
    need("name", &r.name)?;
    let spec = JobSpec::CloneVm(CloneVmJob {
        vm_id: uuid::Uuid::new_v4().to_string(),
        source_id: r.source_id,
        name: r.name,
    });
    svc.start_job(who, &r.request_id, spec).await
}

/// Where the scheduler would place a VM (or a spec), and why each host was or was not
/// a candidate.
pub(super) async fn explain_placement(
    svc: &PoolHandler,
    r: pb::ExplainPlacementRequest,
) -> Result<pb::ExplainPlacementResponse, Status> {
    svc.c
        .read(|s| {
            // A VM's networks count too: a host without an external network's NIC, or
            // not the host of an internal one, is rejected with the network named.
            let demand =
                if !r.vm_id.is_empty() {
                    s.vms
                        .get(&r.vm_id)
                        .map(|v| s.vm_demand(v))
                        .ok_or_else(|| Status::not_found(format!("no VM with id {}", r.vm_id)))?
                } else {
                    s.demand(r.spec.as_ref().ok_or_else(|| {
                        Status::invalid_argument("give a vm_id or a spec to place")
                    })?)
                };
            let hosts = s.candidates();
            let (best, verdicts) = scheduler::explain(&hosts, &demand, &s.policy());
            Ok(pb::ExplainPlacementResponse {
                chosen_host_id: best.map(|i| hosts[i].id.clone()).unwrap_or_default(),
                hosts: verdicts
                    .into_iter()
                    .map(|v| pb::HostVerdict {
                        eligible: v.eligible(),
                        reasons: v.rejections.iter().map(|x| x.to_string()).collect(),
                        host_id: v.host_id,
                        score: v.score,
                    })
                    .collect(),
            })
        })
        .await?
}
