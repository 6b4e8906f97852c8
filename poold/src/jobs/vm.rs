//! VM jobs: templates, snapshots (a tree: each one's parent is the VM's current snapshot
//! when it was taken), reverts, snapshot deletes, clones, destroys, reboots; and what a host
//! needs before it runs a VM: disk access (each disk's volume exported, the host's
//! initiator granted) and the VM's network interfaces on that host ([`HostAccess`]).
//!
//! **Crash consistency.** A VM snapshot (and a clone of a running VM) is a set of volume
//! snapshots that must look like the disks at one instant, as after a power cut: a write
//! the guest saw acknowledged before another is never missing when the other is there.
//! A stopped VM writes nothing, so its disks are snapshotted one after the other. A
//! running VM with more than one disk is paused through hostd first (its vCPUs stop, so
//! the guest issues no new write; every write it saw acknowledged has reached storaged),
//! its disks are snapshotted, and it is resumed; one disk alone needs no pause, since
//! storaged takes each snapshot atomically. The pause is recorded as a step output
//! before it is made, so a new leader that takes the job over resumes the VM.

use std::collections::HashMap;

use proto::coordinator as pb;
use proto::host as hpb;
use proto::storage as spb;
use tonic::Code;

use super::storage::{Make, SrLoc, delete_once, make_once, volume_loc};
use super::{Env, Finish, JobError, read, short};
use crate::scheduler;
use crate::state::PoolState;
use crate::state::command::*;
use crate::state::jobs::{vm_stopped, vm_suspended};

/// A VM's disks with where their volumes live.
fn disks_of(s: &PoolState, spec: &pb::VmSpec) -> Result<Vec<(pb::VmDisk, SrLoc)>, JobError> {
    spec.disks
        .iter()
        .map(|d| Ok((d.clone(), volume_loc(s, &d.volume_id)?)))
        .collect()
}

fn vm_of(s: &PoolState, id: &str) -> Result<pb::Vm, JobError> {
    s.vms
        .get(id)
        .cloned()
        .ok_or_else(|| JobError::refused(Code::NotFound, format!("no VM with id {id}")))
}

pub fn host_addr(s: &PoolState, host_id: &str) -> Result<String, JobError> {
    s.hosts
        .get(host_id)
        .map(|h| h.address.clone())
        .ok_or_else(|| JobError::refused(Code::NotFound, format!("no host with id {host_id}")))
}

/// The name a host's certificate carries (its record's name).
pub fn host_name(s: &PoolState, host_id: &str) -> Result<String, JobError> {
    s.hosts
        .get(host_id)
        .map(|h| h.name.clone())
        .ok_or_else(|| JobError::refused(Code::NotFound, format!("no host with id {host_id}")))
}

/// The initiator name a host logs in with, as it reported it.
pub fn host_initiator(s: &PoolState, host_id: &str) -> Result<String, JobError> {
    let h = s
        .hosts
        .get(host_id)
        .ok_or_else(|| JobError::refused(Code::NotFound, format!("no host with id {host_id}")))?;
    let iqn = h
        .info
        .as_ref()
        .map(|i| i.initiator_iqn.clone())
        .unwrap_or_default();
    if iqn.is_empty() {
        return Err(JobError::refused(
            Code::FailedPrecondition,
            format!(
                "host {} ({}) reports no iSCSI initiator name; set initiator_iqn in its hostd configuration",
                h.name, h.id
            ),
        ));
    }
    Ok(iqn)
}

/// What a host is given to run a VM: its disks, access granted, and its network
/// interfaces as planned for that host.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HostAccess {
    pub disks: Vec<hpb::DiskConfig>,
    pub nets: Vec<hpb::NetConfig>,
}

/// Makes sure the host may reach each disk's volume (exported, its initiator granted) and
/// returns the disks as hostd takes them, with the VM's network interfaces on that host.
pub async fn disk_access(env: &Env, vm: &pb::Vm, host_id: &str) -> Result<HostAccess, JobError> {
    // An undo disk runs on its overlay; one without an overlay never runs (its start makes
    // it first), so its volume is not written.
    if let Some(d) = crate::state::undo::undo_disks_without_overlay(vm).first() {
        return Err(JobError::refused(
            Code::FailedPrecondition,
            format!(
                "VM {}'s undo disk {} has no overlay; start the VM again (its start makes one)",
                vm.id, d.disk_id
            ),
        ));
    }
    let spec = crate::state::undo::running_spec(vm);
    let (disks, pool_initiators, chap) = read(&*env.ledger, |s| {
        let pool: std::collections::BTreeSet<String> = s
            .hosts
            .values()
            .filter_map(|h| h.info.as_ref().map(|i| i.initiator_iqn.clone()))
            .filter(|i| !i.is_empty())
            .collect();
        let iqn = host_initiator(s, host_id)?;
        let chap = crate::chap::secrets(&s.token_key, &iqn)
            .map_err(|st| JobError::from_status(format!("CHAP for host {host_id}"), st))?;
        Ok::<_, JobError>((disks_of(s, &spec)?, pool, chap))
    })?;
    let nets = read(&*env.ledger, |s| super::vifs::nets_on(s, vm, host_id));
    let mut out = Vec::new();
    for (d, loc) in disks {
        let export = export_of(env, &loc, &d.volume_id).await?;
        // The VM takes its volumes over: access opened for a client outside the pool (an
        // import or export, OpenVolumeAccess) ends here, its sessions dropped, so nothing
        // but the VM's host writes the disk while the VM runs.
        for g in &export.grants {
            if pool_initiators.contains(&g.initiator_iqn) {
                continue;
            }
            match env
                .storage
                .revoke(&loc.address, &export.id, &g.initiator_iqn)
                .await
            {
                Ok(sessions) => tracing::warn!(
                    volume = %d.volume_id,
                    initiator = %g.initiator_iqn,
                    sessions,
                    "a VM starts on the volume: revoked a client's access"
                ),
                Err(s) if s.code() == Code::NotFound => {}
                Err(s) => {
                    return Err(JobError::from_status(
                        format!(
                            "revoking {}'s access to volume {}",
                            g.initiator_iqn, d.volume_id
                        ),
                        s,
                    ));
                }
            }
        }
        let grantee = format!("host {host_id}");
        let iscsi = grant_volume(env, &loc, &export, &d.volume_id, &grantee, &chap).await?;
        out.push(hpb::DiskConfig {
            id: d.disk_id.clone(),
            backend: Some(hpb::disk_config::Backend::Iscsi(iscsi)),
            read_only: d.read_only,
        });
    }
    Ok(HostAccess { disks: out, nets })
}

/// Grants an initiator (`chap`'s; `grantee` names it in errors, "host h1") access to an
/// exported volume; how it logs in to it.
pub async fn grant_volume(
    env: &Env,
    loc: &SrLoc,
    export: &spb::Export,
    volume_id: &str,
    grantee: &str,
    chap: &crate::chap::Secrets,
) -> Result<hpb::IscsiDisk, JobError> {
    env.storage
        .grant(&loc.address, &export.id, chap)
        .await
        .map_err(|s| {
            JobError::from_status(
                format!("granting {grantee} access to volume {volume_id}"),
                s,
            )
        })?;
    let portal = export.portals.first().cloned().ok_or_else(|| {
        JobError::refused(
            Code::FailedPrecondition,
            format!("storaged at {} lists no iSCSI portal", loc.address),
        )
    })?;
    Ok(hpb::IscsiDisk {
        portal,
        target_iqn: export.target_iqn.clone(),
        lun: export.lun,
        volume_id: volume_id.to_owned(),
        chap_username: chap.initiator.user.clone(),
        chap_secret: chap.initiator.secret.clone(),
        mutual_chap_username: chap.target.user.clone(),
        mutual_chap_secret: chap.target.secret.clone(),
    })
}

/// The volume's export, created when it has none.
pub async fn export_of(env: &Env, loc: &SrLoc, volume_id: &str) -> Result<spb::Export, JobError> {
    let listed = env
        .storage
        .list_exports(&loc.address, volume_id)
        .await
        .map_err(|s| JobError::from_status(format!("listing exports of volume {volume_id}"), s))?;
    if let Some(e) = listed.into_iter().next() {
        return Ok(e);
    }
    match env.storage.create_export(&loc.address, volume_id).await {
        Ok(e) => Ok(e),
        Err(s) if s.code() == Code::AlreadyExists => env
            .storage
            .list_exports(&loc.address, volume_id)
            .await
            .ok()
            .and_then(|l| l.into_iter().next())
            .ok_or_else(|| JobError::from_status(format!("exporting volume {volume_id}"), s)),
        Err(s) => Err(JobError::from_status(
            format!("exporting volume {volume_id}"),
            s,
        )),
    }
}

/// hostd's configuration of a pool VM with what its host was given.
pub fn vm_config(vm: &pb::Vm, access: HostAccess) -> hpb::VmConfig {
    let spec = vm.spec.clone().unwrap_or_default();
    hpb::VmConfig {
        name: spec.name,
        vcpus: spec.vcpus,
        memory_bytes: spec.memory_bytes,
        boot: spec.boot,
        disks: access.disks,
        cpuid_mask: vec![],
        console_buffer_bytes: 1 << 20,
        labels: spec.labels,
        nets: access.nets,
    }
}

/// What [`snapshot_disks`] made: disk id → snapshot volume, and for a checkpoint what its
/// pause took.
#[derive(Default)]
pub(super) struct Snapped {
    pub disks: Vec<(String, spb::Volume)>,
    /// From the pause to the resume, as this member timed it (the calls included).
    pub pause_ms: Option<u64>,
    pub saved: Option<hpb::SaveVmResponse>,
}

/// Crash-consistent snapshots of all of a VM's disks (see the module docs). With `state`
/// (a checkpoint) a running VM is always paused, and its memory and device state are
/// saved into that volume before its disks are snapshotted, so both hold the same
/// instant. `step` prefixes the step names.
pub(super) async fn snapshot_disks(
    env: &Env,
    job: &Job,
    vm: &pb::Vm,
    step: &str,
    label: &str,
    state: Option<hpb::IscsiDisk>,
) -> Result<Snapped, JobError> {
    // What the guest sees: an undo disk's overlay, when it has one.
    let spec = crate::state::undo::running_spec(vm);
    let disks = read(&*env.ledger, |s| disks_of(s, &spec))?;
    let running = !vm.host_id.is_empty()
        && matches!(
            vm.power_state(),
            hpb::PowerState::Running | hpb::PowerState::Paused
        );
    let pause = running
        && (disks.len() > 1 || state.is_some())
        && vm.power_state() == hpb::PowerState::Running;
    let paused_by_us = job.outputs.get("paused").cloned();
    let addr = if running || paused_by_us.is_some() {
        Some(read(&*env.ledger, |s| {
            host_addr(s, paused_by_us.as_deref().unwrap_or(&vm.host_id))
        })?)
    } else {
        None
    };
    if pause && paused_by_us.is_none() {
        env.step(
            &job.task_id,
            10,
            "pausing the VM",
            &[("paused", &vm.host_id)],
        )
        .await?;
    }
    let paused_at = std::time::Instant::now();
    if (pause || paused_by_us.is_some())
        && let Some(addr) = &addr
    {
        match env.hosts.pause_vm(addr, &vm.id).await {
            // Already paused (by this job's previous attempt).
            Ok(_) => {}
            Err(s) if s.code() == Code::FailedPrecondition => {}
            Err(s) => return Err(JobError::from_status(format!("pausing VM {}", vm.id), s)),
        }
    }
    let mut out = Snapped::default();
    let mut result = Ok(());
    if let (Some(disk), Some(addr)) = (state, &addr) {
        // Saved with `resume`: hostd leaves the VM as it found it, paused.
        let r = env
            .hosts
            .save_vm(
                addr,
                hpb::SaveVmRequest {
                    vm_id: vm.id.clone(),
                    state_volume: Some(disk),
                    resume: true,
                },
            )
            .await;
        match r {
            Ok(r) => out.saved = Some(r),
            Err(s) => {
                result = Err(JobError::from_status(
                    format!("saving VM {}'s memory and device state", vm.id),
                    s,
                ))
            }
        }
    }
    for (d, loc) in &disks {
        if result.is_err() {
            break;
        }
        let name = format!(
            "{}.{label}.{}.{}",
            spec.name,
            d.disk_id,
            short(&job.task_id)
        );
        match make_once(
            env,
            loc,
            &job.task_id,
            &format!("{step}:{}", d.disk_id),
            Make::Snapshot,
            &d.volume_id,
            &name,
            &HashMap::new(),
        )
        .await
        {
            Ok(v) => out.disks.push((d.disk_id.clone(), v)),
            Err(e) => result = Err(e),
        }
    }
    if (pause || paused_by_us.is_some())
        && let Some(addr) = &addr
    {
        // Resumed whatever happened to the snapshots.
        match env.hosts.resume_vm(addr, &vm.id).await {
            Ok(_) => {}
            Err(s) if s.code() == Code::FailedPrecondition => {}
            Err(s) => return Err(JobError::from_status(format!("resuming VM {}", vm.id), s)),
        }
        out.pause_ms = Some(paused_at.elapsed().as_millis() as u64);
    }
    result.map(|()| out)
}

/// Takes a VM snapshot: its parent is the snapshot the VM's disks came from (if it still
/// exists), and it becomes the VM's current one.
pub async fn snapshot_vm(env: &Env, job: &Job, j: &SnapshotVmJob) -> Result<Finish, JobError> {
    let (vm, parent_id) = read(&*env.ledger, |s| {
        let vm = vm_of(s, &j.vm_id)?;
        let parent = Some(vm.current_snapshot_id.clone())
            .filter(|p| s.vm_snapshots.contains_key(p))
            .unwrap_or_default();
        Ok::<_, JobError>((vm, parent))
    })?;
    let checkpoint = match j.memory {
        true => Some(super::checkpoint::prepare(env, job, &vm).await?),
        false => None,
    };
    let access = checkpoint.as_ref().map(|c| c.access.clone());
    let snapped = match snapshot_disks(env, job, &vm, "disk", "snap", access).await {
        Ok(s) => s,
        Err(e) => match &checkpoint {
            Some(made) => return Err(super::checkpoint::failed(env, job, &vm, made, e).await),
            None => return Err(e),
        },
    };
    let mut f = Finish {
        target: j.snapshot_id.clone(),
        ..Default::default()
    }
    .result("snapshot_id", &j.snapshot_id);
    if snapped.pause_ms.is_some() && vm.desired_power_state() == hpb::PowerState::Running {
        // Resumed: recorded now, so the next action on it (a migration) does not meet
        // the "paused" its host reported during the snapshot, until its next report.
        f = f.effect(EffectKind::MoveVm(MoveVm {
            vm_id: vm.id.clone(),
            to_host_id: vm.host_id.clone(),
        }));
    }
    let mut map = HashMap::new();
    for (disk, v) in snapped.disks {
        map.insert(disk, v.id.clone());
        f = f.effect(EffectKind::PutVolume(v));
    }
    let mut state_volume_id = String::new();
    if let Some(c) = checkpoint {
        if let Some(ms) = snapped.pause_ms {
            f = f.result("pause_ms", ms);
        }
        if let Some(saved) = &snapped.saved {
            f = f
                .result("save_pause_ms", saved.pause_ms)
                .result("state_bytes", saved.bytes_written);
        }
        state_volume_id = c.volume.id.clone();
        f = f
            .result("state_volume_id", &state_volume_id)
            .effect(EffectKind::PutVolume(c.volume));
    }
    Ok(f.effect(EffectKind::PutVmSnapshot(pb::VmSnapshot {
        id: j.snapshot_id.clone(),
        vm_id: vm.id.clone(),
        name: j.name.clone(),
        spec: vm.spec.clone(),
        disk_snapshots: map,
        created_at: None,
        parent_id,
        state_volume_id,
        schedule: j.schedule.clone(),
    }))
    .effect(EffectKind::SetCurrentSnapshot(SetCurrentSnapshot {
        vm_id: vm.id.clone(),
        snapshot_id: j.snapshot_id.clone(),
    })))
}

pub async fn revert_vm(env: &Env, job: &Job, j: &RevertVmJob) -> Result<Finish, JobError> {
    let (vm, snap) = read(&*env.ledger, |s| {
        let vm = vm_of(s, &j.vm_id)?;
        let snap = s.vm_snapshots.get(&j.snapshot_id).cloned().ok_or_else(|| {
            JobError::refused(Code::NotFound, format!("no VM snapshot {}", j.snapshot_id))
        })?;
        Ok::<_, JobError>((vm, snap))
    })?;
    if !vm_stopped(&vm) {
        return Err(JobError::refused(
            Code::FailedPrecondition,
            format!(
                "VM {} started meanwhile; shut it down and revert again",
                vm.id
            ),
        ));
    }
    let current: HashMap<String, String> = vm
        .spec
        .as_ref()
        .map(|s| {
            s.disks
                .iter()
                .map(|d| (d.disk_id.clone(), d.volume_id.clone()))
                .collect()
        })
        .unwrap_or_default();
    let checkpoint = !snap.state_volume_id.is_empty();
    // An earlier attempt restored the checkpoint's VM already: its disks are reverted and
    // in use, and must not go back again.
    let restored = checkpoint && super::suspend::restored_on(env, job, &vm.id, &j.host_id).await?;
    let mut spec = snap.spec.clone().unwrap_or_default();
    let mut f = Finish::default();
    for d in spec.disks.iter_mut() {
        let snap_vol = snap
            .disk_snapshots
            .get(&d.disk_id)
            .cloned()
            .ok_or_else(|| {
                JobError::refused(
                    Code::FailedPrecondition,
                    format!("snapshot {} has no copy of disk {}", snap.id, d.disk_id),
                )
            })?;
        let loc = read(&*env.ledger, |s| volume_loc(s, &snap_vol))?;
        match current.get(&d.disk_id) {
            Some(vol) if *vol == d.volume_id && restored => {}
            // The same volume still backs the disk: its content goes back.
            Some(vol) if *vol == d.volume_id => {
                let v = env
                    .storage
                    .revert(&loc.address, vol, &snap_vol)
                    .await
                    .map_err(|s| JobError::from_status(format!("reverting volume {vol}"), s))?;
                f = f.effect(EffectKind::PutVolume(super::storage::pooled(v, &loc.sr_id)));
            }
            // The disk was removed or replaced since: a clone of the snapshot backs it.
            _ => {
                let name = format!("{}.{}.{}", spec.name, d.disk_id, short(&job.task_id));
                let v = make_once(
                    env,
                    &loc,
                    &job.task_id,
                    &format!("restore:{}", d.disk_id),
                    Make::Clone,
                    &snap_vol,
                    &name,
                    &HashMap::new(),
                )
                .await?;
                d.volume_id = v.id.clone();
                f = f.effect(EffectKind::PutVolume(v));
            }
        }
    }
    spec.name = vm
        .spec
        .as_ref()
        .map(|s| s.name.clone())
        .unwrap_or(spec.name);
    f = f
        .effect(EffectKind::SetVmSpec(UpdateVm {
            vm_id: vm.id.clone(),
            spec: Some(spec.clone()),
        }))
        .effect(EffectKind::SetCurrentSnapshot(SetCurrentSnapshot {
            vm_id: vm.id.clone(),
            snapshot_id: snap.id.clone(),
        }));
    if !checkpoint {
        return Ok(f);
    }
    // A checkpoint runs on from its saved state; the volume stays for the next revert.
    let at = pb::Vm {
        spec: Some(spec),
        ..vm.clone()
    };
    let loc = read(&*env.ledger, |s| volume_loc(s, &snap.state_volume_id))?;
    let disks: Vec<&str> = at
        .spec
        .iter()
        .flat_map(|s| &s.disks)
        .map(|d| d.volume_id.as_str())
        .collect();
    // The access reconciler keeps the host's grants of these until the finish.
    env.step(
        &job.task_id,
        60,
        "starting the VM from the checkpoint's saved state",
        &[("disks", &disks.join(","))],
    )
    .await?;
    let r = super::suspend::restore_on(env, job, &at, &j.host_id, &loc, &snap.state_volume_id);
    match r.await {
        Ok(()) => Ok(f
            .result("host_id", &j.host_id)
            .effect(EffectKind::VmResumed(MoveVm {
                vm_id: vm.id.clone(),
                to_host_id: j.host_id.clone(),
            }))),
        // The disks are back as they were: that much is kept, and said.
        Err(JobError::Refused { code, message }) => Ok(Finish {
            failed: Some((
                code,
                format!(
                    "{message}; the VM's disks were reverted to checkpoint {} and it stays stopped (start it to boot from them, or revert again)",
                    snap.id
                ),
            )),
            ..f
        }),
        Err(e) => Err(e),
    }
}

/// Deletes a VM snapshot: each of its disk snapshots on storaged (one already gone counts
/// as deleted; one something else uses is kept), then its record, whose removal re-parents
/// its children and the VM that had it current (see `EffectKind::RemoveVmSnapshot`).
pub async fn delete_vm_snapshot(
    env: &Env,
    job: &Job,
    j: &DeleteVmSnapshotJob,
) -> Result<Finish, JobError> {
    let snap = read(&*env.ledger, |s| {
        s.vm_snapshots.get(&j.snapshot_id).cloned()
    })
    .ok_or_else(|| {
        JobError::refused(Code::NotFound, format!("no VM snapshot {}", j.snapshot_id))
    })?;
    let mut disks: Vec<(&String, &String)> = snap.disk_snapshots.iter().collect();
    disks.sort();
    let mut f = Finish::default();
    let mut deleted = 0;
    for (i, (disk, volume_id)) in disks.iter().enumerate() {
        let (user, loc) = read(&*env.ledger, |s| {
            if !s.volumes.contains_key(*volume_id) {
                return (None, None);
            }
            (
                other_user(s, &snap.id, volume_id),
                Some(volume_loc(s, volume_id)),
            )
        });
        // Unknown to the pool: an earlier attempt deleted it and its removal committed.
        let Some(loc) = loc else { continue };
        if let Some(user) = user {
            tracing::warn!(
                snapshot = %snap.id,
                volume = %volume_id,
                %user,
                "a disk snapshot in use elsewhere is kept"
            );
            continue;
        }
        let loc = loc?;
        env.step(
            &job.task_id,
            (i * 90 / disks.len().max(1)) as u32,
            &format!("deleting the snapshot of disk {disk}"),
            &[],
        )
        .await?;
        delete_once(env, &loc, volume_id).await?;
        deleted += 1;
        f = f.effect(EffectKind::RemoveVolume((*volume_id).clone()));
    }
    // A checkpoint's saved state is its alone.
    let state = Some(&snap.state_volume_id).filter(|v| !v.is_empty());
    if let Some(loc) = state.and_then(|v| read(&*env.ledger, |s| volume_loc(s, v)).ok()) {
        env.step(&job.task_id, 95, "deleting the saved state", &[])
            .await?;
        delete_once(env, &loc, &snap.state_volume_id).await?;
        deleted += 1;
        f = f.effect(EffectKind::RemoveVolume(snap.state_volume_id.clone()));
    }
    Ok(f.result("volumes_deleted", deleted)
        .effect(EffectKind::RemoveVmSnapshot(snap.id.clone())))
}

/// What else uses a VM snapshot's volume, if anything: a VM's disk, a template, or
/// another VM snapshot.
fn other_user(s: &PoolState, snapshot_id: &str, volume_id: &str) -> Option<String> {
    if let Some(vm) = s.vms.values().find(|vm| {
        vm.spec
            .as_ref()
            .is_some_and(|sp| sp.disks.iter().any(|d| d.volume_id == volume_id))
    }) {
        return Some(format!("a disk of VM {}", vm.id));
    }
    if let Some(t) = s
        .templates
        .values()
        .find(|t| t.disk_volumes.values().any(|v| v == volume_id))
    {
        return Some(format!("template {}", t.id));
    }
    s.vm_snapshots
        .values()
        .find(|o| o.id != snapshot_id && o.disk_snapshots.values().any(|v| v == volume_id))
        .map(|o| format!("snapshot {} of VM {}", o.id, o.vm_id))
}

pub async fn clone_vm(env: &Env, job: &Job, j: &CloneVmJob) -> Result<Finish, JobError> {
    enum Source {
        Vm(pb::Vm),
        Snapshot(pb::VmSnapshot),
    }
    // The clone's VIFs are on its source's networks (a snapshot's: those of its VM now),
    // each with a new id and MAC.
    let vifs: Vec<pb::Vif> = read(&*env.ledger, |s| {
        let vm_id = s
            .vm_snapshots
            .get(&j.source_id)
            .map_or(j.source_id.as_str(), |x| x.vm_id.as_str());
        s.vms
            .get(vm_id)
            .map(|vm| vm.vifs.clone())
            .unwrap_or_default()
    })
    .into_iter()
    .map(|v| pb::Vif {
        network_id: v.network_id,
        rate_bytes_per_sec: v.rate_bytes_per_sec,
        rate_packets_per_sec: v.rate_packets_per_sec,
        ..Default::default()
    })
    .collect();
    let source = read(&*env.ledger, |s| {
        if let Some(vm) = s.vms.get(&j.source_id) {
            Ok(Source::Vm(vm.clone()))
        } else if let Some(snap) = s.vm_snapshots.get(&j.source_id) {
            Ok(Source::Snapshot(snap.clone()))
        } else {
            Err(JobError::refused(
                Code::NotFound,
                format!("no VM or VM snapshot {}", j.source_id),
            ))
        }
    })?;
    let mut f = Finish {
        target: j.vm_id.clone(),
        ..Default::default()
    }
    .result("vm_id", &j.vm_id);
    // Disk id → the volume to clone from, and temporary snapshots to drop afterwards.
    let (mut spec, from, temporary): (pb::VmSpec, HashMap<String, String>, Vec<spb::Volume>) =
        match source {
            Source::Snapshot(snap) => (
                snap.spec.clone().unwrap_or_default(),
                snap.disk_snapshots.clone(),
                vec![],
            ),
            Source::Vm(vm) if vm_stopped(&vm) => {
                let spec = vm.spec.clone().unwrap_or_default();
                let from = spec
                    .disks
                    .iter()
                    .map(|d| (d.disk_id.clone(), d.volume_id.clone()))
                    .collect();
                (spec, from, vec![])
            }
            Source::Vm(vm) => {
                let snaps = snapshot_disks(env, job, &vm, "tmp", "clone-src", None)
                    .await?
                    .disks;
                let from = snaps
                    .iter()
                    .map(|(d, v)| (d.clone(), v.id.clone()))
                    .collect();
                (
                    vm.spec.clone().unwrap_or_default(),
                    from,
                    snaps.into_iter().map(|(_, v)| v).collect(),
                )
            }
        };
    spec.name = j.name.clone();
    for d in spec.disks.iter_mut() {
        let src = from.get(&d.disk_id).cloned().ok_or_else(|| {
            JobError::refused(
                Code::FailedPrecondition,
                format!("the source has no copy of disk {}", d.disk_id),
            )
        })?;
        let loc = read(&*env.ledger, |s| volume_loc(s, &src)).or_else(|e| {
            // A temporary snapshot is not in the pool state: its repository is the
            // original volume's.
            temporary
                .iter()
                .find(|t| t.id == src)
                .map(|t| read(&*env.ledger, |s| super::storage::sr_loc(s, &t.pool_id)))
                .unwrap_or(Err(e))
        })?;
        let name = format!("{}.{}.{}", j.name, d.disk_id, short(&job.task_id));
        let v = make_once(
            env,
            &loc,
            &job.task_id,
            &format!("clone:{}", d.disk_id),
            Make::Clone,
            &src,
            &name,
            &HashMap::new(),
        )
        .await?;
        d.volume_id = v.id.clone();
        f = f.effect(EffectKind::PutVolume(v));
    }
    for t in &temporary {
        let loc = read(&*env.ledger, |s| super::storage::sr_loc(s, &t.pool_id))?;
        delete_once(env, &loc, &t.id).await?;
    }
    Ok(f.effect(EffectKind::CreateVm(CreateVm {
        vm_id: j.vm_id.clone(),
        spec: Some(spec),
        template_id: String::new(),
        start_on_host: String::new(),
        vifs,
    })))
}

pub async fn template_from_vm(
    env: &Env,
    job: &Job,
    j: &TemplateFromVmJob,
) -> Result<Finish, JobError> {
    let vm = read(&*env.ledger, |s| vm_of(s, &j.vm_id))?;
    if !vm_stopped(&vm) {
        return Err(JobError::refused(
            Code::FailedPrecondition,
            format!("VM {} started meanwhile; shut it down first", vm.id),
        ));
    }
    let snaps = snapshot_disks(env, job, &vm, "tpl", "template", None)
        .await?
        .disks;
    let mut spec = vm.spec.clone().unwrap_or_default();
    spec.name = j.name.clone();
    let mut f = Finish {
        target: j.template_id.clone(),
        ..Default::default()
    }
    .result("template_id", &j.template_id);
    let mut map = HashMap::new();
    for d in spec.disks.iter_mut() {
        if let Some((_, v)) = snaps.iter().find(|(id, _)| *id == d.disk_id) {
            d.volume_id = v.id.clone();
            map.insert(d.disk_id.clone(), v.id.clone());
            f = f.effect(EffectKind::PutVolume(v.clone()));
        }
    }
    Ok(f.effect(EffectKind::PutTemplate(pb::Template {
        id: j.template_id.clone(),
        name: j.name.clone(),
        spec: Some(spec),
        disk_volumes: map,
        created_at: None,
    })))
}

pub async fn from_template(
    env: &Env,
    job: &Job,
    j: &VmFromTemplateJob,
) -> Result<Finish, JobError> {
    let t = read(&*env.ledger, |s| s.templates.get(&j.template_id).cloned()).ok_or_else(|| {
        JobError::refused(Code::NotFound, format!("no template {}", j.template_id))
    })?;
    let mut spec = j.spec.clone().unwrap_or_default();
    spec.disks = t.spec.clone().unwrap_or_default().disks;
    let mut f = Finish {
        target: j.vm_id.clone(),
        ..Default::default()
    }
    .result("vm_id", &j.vm_id);
    for d in spec.disks.iter_mut() {
        let src = t
            .disk_volumes
            .get(&d.disk_id)
            .cloned()
            .unwrap_or(d.volume_id.clone());
        let loc = read(&*env.ledger, |s| volume_loc(s, &src))?;
        if !j.sr_id.is_empty() && j.sr_id != loc.sr_id {
            return Err(JobError::refused(
                Code::InvalidArgument,
                format!(
                    "template disk {} lives in repository {}; clones stay in their source's repository (omit sr_id)",
                    d.disk_id, loc.sr_id
                ),
            ));
        }
        let name = format!("{}.{}.{}", spec.name, d.disk_id, short(&job.task_id));
        let v = make_once(
            env,
            &loc,
            &job.task_id,
            &format!("clone:{}", d.disk_id),
            Make::Clone,
            &src,
            &name,
            &HashMap::new(),
        )
        .await?;
        d.volume_id = v.id.clone();
        d.read_only = false;
        f = f.effect(EffectKind::PutVolume(v));
    }
    // Placed here and started by the commit that creates it (reconciliation boots it); a
    // VM no host has room for is created stopped, and the task says why.
    let mut start_on_host = String::new();
    if j.start {
        let placed = read(&*env.ledger, |s| {
            let hosts = s.candidates();
            let networks: Vec<&str> = j.vifs.iter().map(|v| v.network_id.as_str()).collect();
            let demand = s.demand_on(&spec, &networks);
            scheduler::place(&hosts, &demand, &s.policy()).map(|i| hosts[i].id.clone())
        });
        match placed {
            Ok(host) => {
                f = f.result("start", format!("placed on host {host}"));
                start_on_host = host;
            }
            Err(u) => f = f.result("start", format!("not started: {u}")),
        }
    }
    Ok(f.effect(EffectKind::CreateVm(CreateVm {
        vm_id: j.vm_id.clone(),
        spec: Some(spec),
        template_id: j.template_id.clone(),
        start_on_host,
        vifs: j.vifs.clone(),
    })))
}

pub async fn destroy_vm(env: &Env, job: &Job, j: &DestroyVmJob) -> Result<Finish, JobError> {
    let vm = read(&*env.ledger, |s| vm_of(s, &j.vm_id))?;
    if !vm_stopped(&vm) && !vm_suspended(&vm) {
        return Err(JobError::refused(
            Code::FailedPrecondition,
            format!("VM {} started meanwhile; shut it down first", vm.id),
        ));
    }
    let mut f = Finish::default();
    // Pending undo changes go with it: nothing else uses an overlay or its snapshot.
    for o in &vm.undo_overlays {
        let Ok(loc) = read(&*env.ledger, |s| volume_loc(s, &o.volume_id)) else {
            continue;
        };
        env.step(
            &job.task_id,
            2,
            &format!("deleting disk {}'s undo changes", o.disk_id),
            &[],
        )
        .await?;
        for v in [&o.volume_id, &o.snapshot_id] {
            delete_once(env, &loc, v).await?;
            f = f.effect(EffectKind::RemoveVolume(v.clone()));
        }
    }
    // A suspended VM's saved state goes with it.
    if !vm.state_volume_id.is_empty()
        && let Ok(loc) = read(&*env.ledger, |s| volume_loc(s, &vm.state_volume_id))
    {
        env.step(&job.task_id, 5, "deleting the saved state", &[])
            .await?;
        delete_once(env, &loc, &vm.state_volume_id).await?;
        f = f.effect(EffectKind::RemoveVolume(vm.state_volume_id.clone()));
    }
    if j.delete_disks {
        let spec = vm.spec.clone().unwrap_or_default();
        let mut deleted = 0;
        for (i, d) in spec.disks.iter().enumerate() {
            // Shared with another VM, a template or a snapshot: kept.
            let (shared, loc) = read(&*env.ledger, |s| {
                let shared = s.vms.values().any(|o| {
                    o.id != vm.id
                        && o.spec
                            .as_ref()
                            .is_some_and(|x| x.disks.iter().any(|x| x.volume_id == d.volume_id))
                }) || s
                    .templates
                    .values()
                    .any(|t| t.disk_volumes.values().any(|v| *v == d.volume_id))
                    || s.vm_snapshots
                        .values()
                        .any(|t| t.disk_snapshots.values().any(|v| *v == d.volume_id));
                (shared, volume_loc(s, &d.volume_id))
            });
            let Ok(loc) = loc else { continue };
            if shared {
                continue;
            }
            env.step(
                &job.task_id,
                (i * 90 / spec.disks.len().max(1)) as u32,
                &format!("deleting disk {}", d.disk_id),
                &[],
            )
            .await?;
            delete_once(env, &loc, &d.volume_id).await?;
            deleted += 1;
            f = f.effect(EffectKind::RemoveVolume(d.volume_id.clone()));
        }
        f = f.result("disks_deleted", deleted);
    }
    Ok(f.effect(EffectKind::RemoveVm(vm.id.clone())))
}

pub async fn reboot_vm(env: &Env, j: &RebootVmJob) -> Result<Finish, JobError> {
    let (vm, addr) = read(&*env.ledger, |s| {
        let vm = vm_of(s, &j.vm_id)?;
        let addr = host_addr(s, &vm.host_id)?;
        Ok::<_, JobError>((vm, addr))
    })?;
    env.hosts
        .reboot_vm(&addr, &vm.id, j.force)
        .await
        .map_err(|s| JobError::from_status(format!("rebooting VM {}", vm.id), s))?;
    Ok(Finish::default())
}

#[cfg(test)]
mod tests {
    use tonic::Status;

    use super::*;
    use crate::jobs::test_utils::World;
    use crate::state::command::Command;

    /// Access opened for a client outside the pool ends when a VM starts on the volume;
    /// pool hosts' grants are the reconciler's to manage.
    #[tokio::test]
    async fn a_vm_starting_on_a_volume_revokes_a_clients_access_first() {
        let world = World::two_hosts_one_running_vm();
        world.storage.grant_now("e-vol1", "iqn.h1");
        world
            .storage
            .grant_now("e-vol1", "iqn.2026-11.lab:poolctl-import");
        let vm = world.state().vms["vm1"].clone();
        let access = disk_access(&world.env(), &vm, "h2").await.unwrap();
        assert_eq!(access.disks.len(), 1);
        let calls = world.storage.calls();
        let revoke = world
            .storage
            .position("revoke:e-vol1:iqn.2026-11.lab:poolctl-import")
            .unwrap_or_else(|| panic!("the client's grant stayed: {calls:?}"));
        let grant = world.storage.position("grant:e-vol1:iqn.h2").unwrap();
        assert!(revoke < grant, "{calls:?}");
        assert!(
            !calls.iter().any(|c| c == "revoke:e-vol1:iqn.h1"),
            "{calls:?}"
        );
    }

    /// The host a VM starts or lands on gets its VIFs: MAC, MTU, rate and VLAN, the
    /// network to plug each onto, and for a private network the other hosts as peers.
    #[tokio::test]
    async fn a_hosts_vm_config_carries_the_vms_vifs_and_their_networks() {
        let world = World::two_hosts_one_running_vm();
        {
            let mut s = world.ledger.state.lock().unwrap();
            let net = |id: &str, kind: pb::NetworkKind, vlan: u32, vni: u32| pb::Network {
                id: id.into(),
                name: format!("{id}-name"),
                kind: kind as i32,
                vlan,
                mtu: 1400,
                vni,
                ..Default::default()
            };
            let mut locked = net("n1", pb::NetworkKind::Private, 0, 7);
            locked.lock_addresses = true;
            s.networks.insert("n1".into(), locked);
            s.networks
                .insert("n2".into(), net("n2", pb::NetworkKind::Internal, 12, 0));
            let vm = s.vms.get_mut("vm1").unwrap();
            vm.vifs = vec![
                pb::Vif {
                    id: "v1".into(),
                    vm_id: "vm1".into(),
                    network_id: "n1".into(),
                    network_name: "n1-name".into(),
                    mac: "02:00:00:00:00:01".into(),
                    rate_bytes_per_sec: Some(1 << 20),
                    ipv4: vec!["10.0.0.2".into()],
                    ..Default::default()
                },
                pb::Vif {
                    id: "v2".into(),
                    vm_id: "vm1".into(),
                    network_id: "n2".into(),
                    network_name: "n2-name".into(),
                    mac: "02:00:00:00:00:02".into(),
                    ipv4: vec!["10.0.0.3".into()],
                    ..Default::default()
                },
            ];
        }
        let vm = world.state().vms["vm1"].clone();
        let config = vm_config(&vm, disk_access(&world.env(), &vm, "h2").await.unwrap());
        assert_eq!(config.disks.len(), 1);
        let [eth0, eth1] = &config.nets[..] else {
            panic!("two VIFs, not {:?}", config.nets);
        };
        assert_eq!(
            (eth0.id.as_str(), eth0.mac.as_str(), eth0.mtu, eth0.vlan),
            ("eth0", "02:00:00:00:00:01", 1400, None)
        );
        assert_eq!(eth0.rate_bytes_per_sec, Some(1 << 20));
        assert_eq!(
            eth0.lock.as_ref().map(|l| &l.ipv4[..]),
            Some(&["10.0.0.2".to_string()][..]),
            "locked to its addresses, as its network says"
        );
        assert_eq!(
            eth1.lock, None,
            "an unlocked network's VIF: its addresses are notes"
        );
        assert!(eth0.tap.is_empty(), "hostd plugs the tap");
        let a = eth0.network.as_ref().unwrap();
        assert_eq!(a.kind(), hpb::AttachmentKind::Private);
        assert_eq!((a.name.as_str(), a.vni, a.mtu), ("n1-name", 7, 1400));
        // h2's peers are the other hosts: h1 only.
        assert_eq!(a.peers, ["h1"]);
        assert_eq!(
            (eth1.id.as_str(), eth1.mac.as_str(), eth1.vlan),
            ("eth1", "02:00:00:00:00:02", Some(12))
        );
        let b = eth1.network.as_ref().unwrap();
        assert_eq!((b.kind(), b.vlan), (hpb::AttachmentKind::Internal, 12));
        assert!(b.peers.is_empty());
        // On h1, the peer is h2.
        let on_h1 = vm_config(&vm, disk_access(&world.env(), &vm, "h1").await.unwrap());
        assert_eq!(on_h1.nets[0].network.as_ref().unwrap().peers, ["h2"]);
        assert_eq!(on_h1.nets[0].mac, eth0.mac);
    }

    /// Takes a snapshot of vm1 named `name` through its job; returns its id.
    async fn take_snapshot(world: &World, name: &str) -> String {
        let id = format!("id-{name}");
        let task = world.start_job(Job {
            spec: Some(JobSpec::SnapshotVm(SnapshotVmJob {
                snapshot_id: id.clone(),
                vm_id: "vm1".into(),
                name: name.into(),
                memory: false,
                schedule: String::new(),
            })),
            ..Default::default()
        });
        world.drive(&task).await;
        let s = world.state();
        assert_eq!(s.tasks[&task].state(), pb::TaskState::Succeeded, "{name}");
        id
    }

    async fn revert_to(world: &World, snapshot_id: &str) {
        let task = world.start_job(Job {
            spec: Some(JobSpec::RevertVm(RevertVmJob {
                vm_id: "vm1".into(),
                snapshot_id: snapshot_id.into(),
                host_id: String::new(),
            })),
            ..Default::default()
        });
        world.drive(&task).await;
        assert_eq!(world.state().tasks[&task].state(), pb::TaskState::Succeeded);
    }

    fn delete_job(snapshot_id: &str) -> Job {
        Job {
            spec: Some(JobSpec::DeleteVmSnapshot(DeleteVmSnapshotJob {
                snapshot_id: snapshot_id.into(),
                vm_id: "vm1".into(),
            })),
            ..Default::default()
        }
    }

    fn parent(world: &World, id: &str) -> String {
        world.state().vm_snapshots[id].parent_id.clone()
    }

    fn current(world: &World) -> String {
        world.state().vms["vm1"].current_snapshot_id.clone()
    }

    /// Each snapshot's parent is the VM's current one when it is taken; taking one makes
    /// it current, and so does reverting to one (the next snapshot branches from there).
    #[tokio::test]
    async fn snapshots_form_a_tree_rooted_where_the_vm_was_reverted_to() {
        let world = World::two_hosts_one_running_vm();
        let s1 = take_snapshot(&world, "s1").await;
        assert_eq!(parent(&world, &s1), "");
        assert_eq!(current(&world), s1);
        let s2 = take_snapshot(&world, "s2").await;
        assert_eq!(parent(&world, &s2), s1);
        assert_eq!(current(&world), s2);

        world.stop_vm1();
        revert_to(&world, &s1).await;
        assert_eq!(current(&world), s1);
        let s3 = take_snapshot(&world, "s3").await;
        assert_eq!(parent(&world, &s3), s1, "a branch beside s2");
        assert_eq!(parent(&world, &s2), s1);
        assert_eq!(current(&world), s3);
    }

    /// Deleting a snapshot deletes its disk snapshots and its record; its children and
    /// the VM that had it current take its parent, and the change feed says so.
    #[tokio::test]
    async fn deleting_a_snapshot_deletes_its_volumes_and_reparents_what_pointed_at_it() {
        let world = World::two_hosts_one_running_vm();
        let s1 = take_snapshot(&world, "s1").await;
        let s2 = take_snapshot(&world, "s2").await;
        let s3 = take_snapshot(&world, "s3").await;
        world.stop_vm1();
        revert_to(&world, &s2).await;
        let s2_volume = world.state().vm_snapshots[&s2].disk_snapshots["vda"].clone();
        assert!(world.state().volumes.contains_key(&s2_volume));
        world.ledger.state.lock().unwrap().take_events(1);

        let task = world.start_job(delete_job(&s2));
        world.drive(&task).await;
        let s = world.state();
        assert_eq!(s.tasks[&task].state(), pb::TaskState::Succeeded);
        assert_eq!(s.tasks[&task].results["volumes_deleted"], "1");
        assert!(
            world
                .storage
                .position(&format!("delete:{s2_volume}"))
                .is_some()
        );
        assert!(!s.vm_snapshots.contains_key(&s2));
        assert!(!s.volumes.contains_key(&s2_volume));
        assert_eq!(parent(&world, &s3), s1, "s3 takes s2's parent");
        assert_eq!(current(&world), s1, "the VM's current one was s2");
        // The other snapshots' volumes stay.
        assert!(
            s.volumes
                .contains_key(&s.vm_snapshots[&s1].disk_snapshots["vda"])
        );

        let events = world.ledger.state.lock().unwrap().take_events(2);
        let changed = |kind: &str, id: &str, deleted: bool| {
            events
                .iter()
                .any(|e| e.kind == kind && e.id == id && e.deleted == deleted)
        };
        assert!(changed("vm", "vm1", false), "{events:?}");
        assert!(changed("vm_snapshot", &s3, false), "{events:?}");
        assert!(changed("vm_snapshot", &s2, true), "{events:?}");
        assert!(changed("volume", &s2_volume, true), "{events:?}");
        assert!(!changed("vm_snapshot", &s1, false), "{events:?}");
    }

    /// A leader that takes the job over after its deletes on storaged finds the volumes
    /// gone: not found counts as deleted, and the job ends as the first would have.
    #[tokio::test]
    async fn a_disk_snapshot_already_gone_counts_as_deleted() {
        let world = World::two_hosts_one_running_vm();
        let s1 = take_snapshot(&world, "s1").await;
        let s2 = take_snapshot(&world, "s2").await;
        world.storage.fail_with(Status::not_found("no such volume"));
        let task = world.start_job(delete_job(&s1));
        world.drive(&task).await;
        let s = world.state();
        assert_eq!(
            s.tasks[&task].state(),
            pb::TaskState::Succeeded,
            "{}",
            s.tasks[&task].error_message
        );
        assert!(!s.vm_snapshots.contains_key(&s1));
        assert_eq!(parent(&world, &s2), "");
        assert_eq!(current(&world), s2);
    }

    /// Refused before anything is done: no id, an unknown id, another job on the VM.
    #[test]
    fn a_snapshot_delete_is_refused_when_it_cannot_start() {
        let world = World::two_hosts_one_running_vm();
        world.ledger.state.lock().unwrap().vm_snapshots.insert(
            "s1".into(),
            pb::VmSnapshot {
                id: "s1".into(),
                vm_id: "vm1".into(),
                ..Default::default()
            },
        );
        let refusal = |job: Job| {
            let mut s = world.ledger.state.lock().unwrap();
            let n = s.applied_index + 1;
            let r = s.apply(
                n,
                &Command {
                    at_ms: 700,
                    task_id: format!("t{n}"),
                    op: Some(Op::StartJob(job)),
                    ..Default::default()
                },
            );
            (Code::from(r.code), r.message)
        };
        assert_eq!(refusal(delete_job("")).0, Code::InvalidArgument);
        let (code, message) = refusal(delete_job("nope"));
        assert_eq!(code, Code::NotFound, "{message}");
        assert!(message.contains("nope"), "{message}");
        let mut other_vm = delete_job("s1");
        if let Some(JobSpec::DeleteVmSnapshot(d)) = &mut other_vm.spec {
            d.vm_id = "vm2".into();
        }
        assert_eq!(refusal(other_vm).0, Code::InvalidArgument);

        // A reboot holds vm1: the delete waits for it.
        world.start_job(Job {
            spec: Some(JobSpec::RebootVm(RebootVmJob {
                vm_id: "vm1".into(),
                force: false,
            })),
            ..Default::default()
        });
        let (code, message) = refusal(delete_job("s1"));
        assert_eq!(code, Code::FailedPrecondition, "{message}");
        assert!(message.contains("busy"), "{message}");
    }

    /// A VM from a template with start was placed by its job; the host filled up while
    /// the disks were cloned, so the commit creates it stopped and the task says why.
    #[test]
    fn a_vm_that_no_longer_fits_at_commit_is_created_stopped() {
        let world = World::two_hosts_one_running_vm();
        let spec = |name: &str, gib: u64| pb::VmSpec {
            name: name.into(),
            vcpus: 1,
            memory_bytes: gib << 30,
            ..Default::default()
        };
        {
            let mut s = world.ledger.state.lock().unwrap();
            s.templates.insert(
                "t1".into(),
                pb::Template {
                    id: "t1".into(),
                    name: "t1".into(),
                    spec: Some(spec("t1", 6)),
                    disk_volumes: [("vda".to_string(), "vol1".to_string())].into(),
                    ..Default::default()
                },
            );
        }
        let start = |vm: &str| {
            world.start_job(Job {
                spec: Some(JobSpec::VmFromTemplate(VmFromTemplateJob {
                    vm_id: vm.into(),
                    template_id: "t1".into(),
                    spec: Some(spec(vm, 6)),
                    start: true,
                    ..Default::default()
                })),
                ..Default::default()
            })
        };
        let finish = |task: &str, vm: &str, host: &str| {
            let mut s = world.ledger.state.lock().unwrap();
            let n = s.applied_index + 1;
            let f = FinishJob {
                task_id: task.into(),
                effects: vec![Effect {
                    kind: Some(EffectKind::CreateVm(CreateVm {
                        vm_id: vm.into(),
                        spec: Some(spec(vm, 6)),
                        template_id: "t1".into(),
                        start_on_host: host.into(),
                        vifs: vec![],
                    })),
                }],
                results: [("start".to_string(), format!("placed on host {host}"))].into(),
                ..Default::default()
            };
            let r = s.apply(
                n,
                &Command {
                    at_ms: 900,
                    op: Some(Op::FinishJob(f)),
                    ..Default::default()
                },
            );
            assert_eq!(r.code, 0, "{}", r.message);
        };

        // Both placed on h2 (8 GiB, empty) by their jobs; the first commit takes 6 GiB.
        let (t2, t3) = (start("vm2"), start("vm3"));
        finish(&t2, "vm2", "h2");
        finish(&t3, "vm3", "h2");
        let s = world.state();
        assert_eq!(s.vms["vm2"].desired_power_state(), hpb::PowerState::Running);
        assert_eq!(s.vms["vm2"].host_id, "h2");
        let vm3 = &s.vms["vm3"];
        assert_eq!(vm3.desired_power_state(), hpb::PowerState::Stopped);
        assert!(vm3.host_id.is_empty(), "{vm3:?}");
        let task = &s.tasks[&t3];
        assert_eq!(task.state(), pb::TaskState::Succeeded);
        let said = &task.results["start"];
        assert!(said.starts_with("not started:"), "{said}");
        assert!(said.contains("memory"), "{said}");
        // The host's allocation counts only the VM that runs there.
        let h2: u64 = s
            .vms
            .values()
            .filter(|v| v.host_id == "h2")
            .map(|v| v.spec.as_ref().map_or(0, |s| s.memory_bytes))
            .sum();
        assert_eq!(h2, 6 << 30);
    }
}
