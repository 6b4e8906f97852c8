//! Suspended VMs in the state machine: what a suspend or a resume job needs when it
//! starts, and what a suspended VM refuses. The jobs are `jobs::suspend`; their effects
//! (`VmSuspended`, `VmResumed`) apply in `state/jobs.rs`.

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Code;

use super::command::*;
use super::machine::{PoolState, err};

/// A power state as people read it ("running", "suspended").
pub fn power_name(p: hpb::PowerState) -> String {
    p.as_str_name()
        .trim_start_matches("POWER_STATE_")
        .to_lowercase()
}

/// Refuses an operation on a suspended VM, saying what to do instead.
pub fn suspended_refusal(vm: &pb::Vm, what: &str) -> CommandResult {
    err(
        Code::FailedPrecondition,
        format!(
            "VM {} is suspended and cannot be {what}: resume it (vm-resume, --host to choose where) or destroy it",
            vm.id
        ),
    )
}

/// Whether a VM is suspended: saved in its state volume, on no host.
pub fn vm_suspended(vm: &pb::Vm) -> bool {
    vm.power_state() == hpb::PowerState::Suspended
}

impl PoolState {
    /// A suspend (or quick migration) can start: the VM runs where the job says, has a
    /// disk whose repository takes the state volume, and fits a quick migration's host.
    pub(super) fn check_suspend(&self, j: &SuspendVmJob) -> Result<String, CommandResult> {
        let vm = self.vm(&j.vm_id)?;
        if vm_suspended(vm) {
            return Err(err(
                Code::FailedPrecondition,
                format!("VM {} is already suspended", vm.id),
            ));
        }
        let runs = matches!(
            vm.power_state(),
            hpb::PowerState::Running | hpb::PowerState::Paused
        ) && matches!(
            vm.desired_power_state(),
            hpb::PowerState::Running | hpb::PowerState::Paused
        );
        if !runs || vm.host_id.is_empty() {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {} is {}: only a running or paused VM is suspended",
                    vm.id,
                    power_name(vm.power_state())
                ),
            ));
        }
        if vm.host_id != j.host_id {
            return Err(err(
                Code::Aborted,
                format!("VM {} moved to host {} meanwhile", vm.id, vm.host_id),
            ));
        }
        self.state_volume_sr(vm)?;
        if !j.resume_on_host_id.is_empty() {
            if j.resume_on_host_id == vm.host_id {
                return Err(err(
                    Code::InvalidArgument,
                    format!("VM {} already runs on host {}", vm.id, vm.host_id),
                ));
            }
            let mut probe = vm.clone();
            probe.host_id.clear();
            self.check_fits(&probe, &j.resume_on_host_id)
                .map_err(|e| CommandResult {
                    code: Code::FailedPrecondition as i32,
                    ..e
                })?;
        }
        Ok(j.vm_id.clone())
    }

    /// The repository a VM's state volume goes to: its first disk's.
    pub fn state_volume_sr(&self, vm: &pb::Vm) -> Result<String, CommandResult> {
        let disk = vm
            .spec
            .as_ref()
            .and_then(|s| s.disks.first())
            .ok_or_else(|| {
                err(
                    Code::FailedPrecondition,
                    format!(
                        "VM {} has no disk: its saved state goes to its first disk's repository",
                        vm.id
                    ),
                )
            })?;
        Ok(self.volume(&disk.volume_id)?.pool_id.clone())
    }

    pub(super) fn check_state_volume(&self, vm: &pb::Vm) -> Result<(), CommandResult> {
        if vm.state_volume_id.is_empty() || !self.volumes.contains_key(&vm.state_volume_id) {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "suspended VM {} has no state volume {:?} in the pool; destroy it",
                    vm.id, vm.state_volume_id
                ),
            ));
        }
        Ok(())
    }

    /// A resume can start: the VM is suspended with its state volume, and fits the host
    /// the call placed it on.
    pub(super) fn check_resume(&self, j: &ResumeVmJob) -> Result<String, CommandResult> {
        let vm = self.vm(&j.vm_id)?;
        if !vm_suspended(vm) {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {} is {}: only a suspended VM is resumed from a state volume",
                    vm.id,
                    power_name(vm.power_state())
                ),
            ));
        }
        self.check_state_volume(vm)?;
        if j.host_id.is_empty() {
            return Err(err(Code::InvalidArgument, "a resume needs a placement"));
        }
        self.check_fits(vm, &j.host_id)?;
        Ok(j.vm_id.clone())
    }

    /// A checkpoint can start: the VM runs or is paused on a host, and has a disk whose
    /// repository takes its saved state.
    pub(super) fn check_checkpoint(&self, j: &SnapshotVmJob) -> Result<String, CommandResult> {
        let vm = self.vm(&j.vm_id)?;
        if vm_suspended(vm) {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {} is suspended: its state is saved already; resume it to checkpoint it, or snapshot its disks alone",
                    vm.id
                ),
            ));
        }
        let runs = matches!(
            vm.power_state(),
            hpb::PowerState::Running | hpb::PowerState::Paused
        );
        if !runs || vm.host_id.is_empty() {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {} is {}: a checkpoint saves a running or paused VM's memory (snapshot its disks alone instead)",
                    vm.id,
                    power_name(vm.power_state())
                ),
            ));
        }
        self.state_volume_sr(vm)?;
        Ok(j.vm_id.clone())
    }

    /// Where a revert to `snap` leaves the VM: a checkpoint runs on `host_id`, which must
    /// be given and take the VM as the checkpoint has it; a disk snapshot leaves it
    /// stopped, on no host.
    pub(super) fn check_revert_placement(
        &self,
        vm: &pb::Vm,
        snap: &pb::VmSnapshot,
        host_id: &str,
    ) -> Result<(), CommandResult> {
        match (snap.state_volume_id.is_empty(), host_id.is_empty()) {
            (true, true) => Ok(()),
            (true, false) => Err(err(
                Code::InvalidArgument,
                format!(
                    "snapshot {} holds the disks alone: the VM stays stopped after the revert, on no host (a host is given for a checkpoint)",
                    snap.id
                ),
            )),
            (false, true) => Err(err(
                Code::InvalidArgument,
                "a revert to a checkpoint needs the host it runs on",
            )),
            (false, false) => {
                if !self.volumes.contains_key(&snap.state_volume_id) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "checkpoint {} has lost its saved state (volume {}); revert to it is impossible",
                            snap.id, snap.state_volume_id
                        ),
                    ));
                }
                let probe = pb::Vm {
                    spec: snap.spec.clone(),
                    host_id: String::new(),
                    ..vm.clone()
                };
                self.check_fits(&probe, host_id)
            }
        }
    }

    /// The effect of a finished suspend: saved, on no host.
    pub(super) fn apply_vm_suspended(&mut self, v: &VmSuspended) {
        if let Some(vm) = self.vms.get_mut(&v.vm_id) {
            vm.host_id.clear();
            vm.desired_power_state = hpb::PowerState::Suspended as i32;
            vm.power_state = hpb::PowerState::Suspended as i32;
            vm.last_stop_reason = hpb::StopReason::Suspended as i32;
            vm.state_volume_id = v.state_volume_id.clone();
        }
        self.force_stop.remove(&v.vm_id);
    }

    /// The effect of a finished resume: running on `to_host_id`, its state volume gone.
    pub(super) fn apply_vm_resumed(&mut self, m: &MoveVm) {
        if let Some(vm) = self.vms.get_mut(&m.vm_id) {
            vm.host_id = m.to_host_id.clone();
            vm.desired_power_state = hpb::PowerState::Running as i32;
            vm.power_state = hpb::PowerState::Running as i32;
            vm.state_volume_id.clear();
        }
    }
}
