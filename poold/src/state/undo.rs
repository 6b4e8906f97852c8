//! Undo disks in the state machine: which volume a VM's disk runs on, what the start and
//! end jobs need when they start, and what pending undo changes refuse. The jobs are
//! `jobs::undo`; their effects (`UndoStarted`, `UndoEnded`) apply here.
//!
//! A disk in undo mode (`VmDisk.undo`) is never written while the VM runs: a start that
//! finds no overlay makes one (a thin clone of a snapshot of the disk's volume) and the VM
//! runs on it. The overlays (`Vm.undo_overlays`) stay across stops, migrations, suspends
//! and HA restarts until the user commits or discards them with the VM stopped.

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Code;

use super::command::*;
use super::jobs::{vm_stopped, vm_suspended};
use super::machine::{PoolState, err};

/// The spec a host runs: each undo disk's volume is its overlay, where it has one.
pub fn running_spec(vm: &pb::Vm) -> pb::VmSpec {
    let mut spec = vm.spec.clone().unwrap_or_default();
    for d in spec.disks.iter_mut() {
        if let Some(o) = vm.undo_overlays.iter().find(|o| o.disk_id == d.disk_id) {
            d.volume_id = o.volume_id.clone();
        }
    }
    spec
}

/// The undo disks of a VM that have no overlay yet: a start must make them first.
pub fn undo_disks_without_overlay(vm: &pb::Vm) -> Vec<&pb::VmDisk> {
    vm.spec
        .iter()
        .flat_map(|s| &s.disks)
        .filter(|d| d.undo && !vm.undo_overlays.iter().any(|o| o.disk_id == d.disk_id))
        .collect()
}

/// Refuses a change to a VM's disks while it has pending undo changes.
pub fn pending_refusal(vm: &pb::Vm, what: &str) -> CommandResult {
    err(
        Code::FailedPrecondition,
        format!(
            "VM {} has pending undo changes: commit or discard them first (vm-undo {} commit|discard), then {what}",
            vm.id, vm.id
        ),
    )
}

impl PoolState {
    /// The VM whose pending undo changes involve `volume_id` (a disk's volume, its
    /// overlay or the snapshot the overlay came from), with the disk.
    pub fn undo_user(&self, volume_id: &str) -> Option<(&pb::Vm, &pb::UndoOverlay)> {
        self.vms.values().find_map(|vm| {
            vm.undo_overlays.iter().find_map(|o| {
                let base = vm
                    .spec
                    .iter()
                    .flat_map(|s| &s.disks)
                    .any(|d| d.disk_id == o.disk_id && d.volume_id == volume_id);
                (base || o.volume_id == volume_id || o.snapshot_id == volume_id).then_some((vm, o))
            })
        })
    }

    /// Refuses a delete, resize or revert of a volume pending undo changes involve.
    pub(super) fn check_not_undo_volume(
        &self,
        volume_id: &str,
        what: &str,
    ) -> Result<(), CommandResult> {
        match self.undo_user(volume_id) {
            Some((vm, o)) => Err(err(
                Code::FailedPrecondition,
                format!(
                    "volume {volume_id} has pending undo changes (disk {} of VM {}): commit or discard them (vm-undo) before it is {what}",
                    o.disk_id, vm.id
                ),
            )),
            None => Ok(()),
        }
    }

    /// A start of an undo VM can begin: the VM is stopped, has undo disks without an
    /// overlay, and fits the host the call placed it on.
    pub(super) fn check_start_undo(&self, j: &StartUndoVmJob) -> Result<String, CommandResult> {
        let vm = self.vm(&j.vm_id)?;
        if vm_suspended(vm) {
            return Err(super::jobs::suspended_refusal(vm, "started"));
        }
        if !vm_stopped(vm) || !vm.host_id.is_empty() {
            return Err(err(
                Code::FailedPrecondition,
                format!("VM {} is not stopped", vm.id),
            ));
        }
        if undo_disks_without_overlay(vm).is_empty() {
            return Err(err(
                Code::FailedPrecondition,
                format!("VM {} has no undo disk without an overlay", vm.id),
            ));
        }
        if j.host_id.is_empty() {
            return Err(err(Code::InvalidArgument, "a start needs a placement"));
        }
        self.check_fits(vm, &j.host_id)?;
        Ok(j.vm_id.clone())
    }

    /// A commit or discard can begin: the VM is stopped with pending undo changes.
    pub(super) fn check_end_undo(&self, j: &EndUndoJob) -> Result<String, CommandResult> {
        let vm = self.vm(&j.vm_id)?;
        let what = if j.commit { "committed" } else { "discarded" };
        if vm_suspended(vm) {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {} is suspended: its undo changes are {what} only while it is stopped; resume and shut it down first",
                    vm.id
                ),
            ));
        }
        if !vm_stopped(vm) || !vm.host_id.is_empty() {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {} is {}: its undo changes are {what} only while it is stopped; shut it down first",
                    vm.id,
                    super::jobs::power_name(vm.power_state())
                ),
            ));
        }
        if vm.undo_overlays.is_empty() {
            return Err(err(
                Code::FailedPrecondition,
                format!("VM {} has no pending undo changes", vm.id),
            ));
        }
        Ok(j.vm_id.clone())
    }

    /// A VM snapshot taken while an undo disk ran on its overlay holds a snapshot of the
    /// overlay, not of the disk's volume; once the overlay is committed or discarded, that
    /// volume cannot be reverted to it in place (storaged reverts a volume only to its own
    /// lineage, which the gone overlay no longer links).
    pub(super) fn check_revert_in_place(
        &self,
        vm: &pb::Vm,
        snap: &pb::VmSnapshot,
    ) -> Result<(), CommandResult> {
        let current = vm.spec.iter().flat_map(|s| &s.disks);
        for d in snap.spec.iter().flat_map(|s| &s.disks) {
            let same_volume = current
                .clone()
                .any(|c| c.disk_id == d.disk_id && c.volume_id == d.volume_id);
            let of = snap
                .disk_snapshots
                .get(&d.disk_id)
                .and_then(|v| self.volumes.get(v))
                .map(|v| v.origin_id.as_str())
                .unwrap_or_default();
            if same_volume && !of.is_empty() && of != d.volume_id {
                return Err(err(
                    Code::FailedPrecondition,
                    format!(
                        "VM snapshot {} holds disk {} as its undo overlay {of} had it, and that overlay's changes were since committed or discarded: volume {} cannot be reverted to it in place; clone the snapshot (vm-clone) to get that disk back",
                        snap.id, d.disk_id, d.volume_id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A spec change of a VM with pending undo changes keeps its disks as they are; and
    /// an undo disk must be writable.
    pub(super) fn check_undo_spec(
        &self,
        vm: Option<&pb::Vm>,
        spec: &pb::VmSpec,
    ) -> Result<(), CommandResult> {
        if let Some(d) = spec.disks.iter().find(|d| d.undo && d.read_only) {
            return Err(err(
                Code::InvalidArgument,
                format!(
                    "disk {}: undo mode is for a writable disk (a read-only one is never written, so it has nothing to undo)",
                    d.disk_id
                ),
            ));
        }
        if let Some(vm) = vm
            && !vm.undo_overlays.is_empty()
            && vm.spec.as_ref().map(|s| &s.disks) != Some(&spec.disks)
        {
            return Err(pending_refusal(vm, "change its disks"));
        }
        Ok(())
    }

    /// The effect of a finished undo start: the overlays recorded; the VM placed to run
    /// when it is still stopped and fits (checked again: the host may have filled up).
    pub(super) fn apply_undo_started(&mut self, u: &UndoStarted) -> Option<(String, String)> {
        let vm = self.vms.get(&u.vm_id)?.clone();
        let mut overlays = vm.undo_overlays.clone();
        for o in &u.overlays {
            if !overlays.iter().any(|x| x.disk_id == o.disk_id) {
                overlays.push(o.clone());
            }
        }
        let mut decided = None;
        let start = !u.host_id.is_empty() && vm_stopped(&vm) && vm.host_id.is_empty();
        let fits = start && {
            match self.check_fits(&vm, &u.host_id) {
                Ok(()) => true,
                Err(e) => {
                    decided = Some(("start".into(), format!("not started: {}", e.message)));
                    false
                }
            }
        };
        let v = self.vms.get_mut(&u.vm_id)?;
        v.undo_overlays = overlays;
        if fits {
            v.host_id = u.host_id.clone();
            v.desired_power_state = hpb::PowerState::Running as i32;
        }
        decided
    }

    pub(super) fn apply_undo_ended(&mut self, vm_id: &str) {
        if let Some(vm) = self.vms.get_mut(vm_id)
            && !vm.undo_overlays.is_empty()
        {
            vm.undo_overlays.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(disks: &[(&str, &str, bool)], overlays: &[(&str, &str)]) -> pb::Vm {
        pb::Vm {
            id: "vm1".into(),
            spec: Some(pb::VmSpec {
                disks: disks
                    .iter()
                    .map(|(d, v, undo)| pb::VmDisk {
                        disk_id: (*d).into(),
                        volume_id: (*v).into(),
                        undo: *undo,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            undo_overlays: overlays
                .iter()
                .map(|(d, v)| pb::UndoOverlay {
                    disk_id: (*d).into(),
                    volume_id: (*v).into(),
                    snapshot_id: format!("s-{v}"),
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_host_runs_each_undo_disk_on_its_overlay_and_the_others_on_their_volume() {
        let v = vm(
            &[("vda", "base", true), ("vdb", "data", false)],
            &[("vda", "ov")],
        );
        let vols: Vec<_> = running_spec(&v)
            .disks
            .into_iter()
            .map(|d| d.volume_id)
            .collect();
        assert_eq!(vols, ["ov", "data"]);
        assert!(undo_disks_without_overlay(&v).is_empty());
        let fresh = vm(&[("vda", "base", true), ("vdb", "data", false)], &[]);
        assert_eq!(running_spec(&fresh).disks[0].volume_id, "base");
        let missing: Vec<_> = undo_disks_without_overlay(&fresh)
            .iter()
            .map(|d| d.disk_id.as_str())
            .collect();
        assert_eq!(missing, ["vda"]);
    }
}
