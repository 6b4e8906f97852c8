//! The state machine's VMs and templates: creating, changing and destroying them, the
//! power state people ask for, and the power state hosts report.

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Code;

use super::command::*;
use super::machine::{Applied, PoolState, err};

/// Whether a `pool.host.v1.PowerState` has the VM live on its host: running, paused, or
/// migrating.
pub fn active(power_state: i32) -> bool {
    matches!(
        hpb::PowerState::try_from(power_state),
        Ok(hpb::PowerState::Running | hpb::PowerState::Paused | hpb::PowerState::Migrating)
    )
}

impl PoolState {
    fn vm_mut(&mut self, id: &str) -> Result<&mut pb::Vm, CommandResult> {
        self.vms
            .get_mut(id)
            .ok_or_else(|| err(Code::NotFound, format!("no VM with id {id}")))
    }

    /// Records a template; the volumes its spec names are its disks.
    pub(super) fn create_template(
        &mut self,
        t: &pb::Template,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        let spec = t
            .spec
            .clone()
            .ok_or_else(|| err(Code::InvalidArgument, "a template needs a spec"))?;
        if t.name.is_empty() {
            return Err(err(Code::InvalidArgument, "a template needs a name"));
        }
        self.validate_spec(&spec)?;
        if let Some(o) = self.templates.values().find(|o| o.name == t.name) {
            return Err(err(
                Code::AlreadyExists,
                format!("template {} is already named {:?}", o.id, t.name),
            ));
        }
        let mut t = t.clone();
        t.created_at = Some(proto::timestamp(at_ms));
        t.disk_volumes = spec
            .disks
            .iter()
            .map(|d| (d.disk_id.clone(), d.volume_id.clone()))
            .collect();
        self.templates.insert(t.id.clone(), t.clone());
        Ok(Applied::done(t.id))
    }

    pub(super) fn delete_template(&mut self, id: &str) -> Result<Applied, CommandResult> {
        if self.templates.remove(id).is_none() {
            return Err(err(Code::NotFound, format!("no template with id {id}")));
        }
        Ok(Applied::done(id))
    }

    /// A new VM, stopped, or started on the host its placement chose (checked again
    /// here: see [`PoolState::check_fits`]).
    pub(super) fn create_vm(&mut self, c: &CreateVm, at_ms: u64) -> Result<Applied, CommandResult> {
        let spec = c
            .spec
            .clone()
            .ok_or_else(|| err(Code::InvalidArgument, "a VM needs a spec"))?;
        self.validate_spec(&spec)?;
        self.check_undo_spec(None, &spec)?;
        if !c.template_id.is_empty() && !self.templates.contains_key(&c.template_id) {
            return Err(err(
                Code::NotFound,
                format!("no template with id {}", c.template_id),
            ));
        }
        if self.vms.contains_key(&c.vm_id) {
            return Err(err(Code::AlreadyExists, format!("VM {} exists", c.vm_id)));
        }
        let vifs = self.new_vifs(&c.vm_id, &c.vifs, true)?;
        let mut vm = pb::Vm {
            id: c.vm_id.clone(),
            spec: Some(spec),
            desired_power_state: hpb::PowerState::Stopped as i32,
            power_state: hpb::PowerState::Stopped as i32,
            template_id: c.template_id.clone(),
            created_at: Some(proto::timestamp(at_ms)),
            last_stop_reason: hpb::StopReason::None as i32,
            vifs,
            ..Default::default()
        };
        let mut applied = Applied::done(&c.vm_id);
        if !c.start_on_host.is_empty() && !super::undo::undo_disks_without_overlay(&vm).is_empty() {
            return Err(err(
                Code::FailedPrecondition,
                "a VM with undo disks is created stopped, then started (its start makes the overlays)",
            ));
        }
        if !c.start_on_host.is_empty() {
            self.check_fits(&vm, &c.start_on_host)?;
            vm.desired_power_state = hpb::PowerState::Running as i32;
            vm.host_id = c.start_on_host.clone();
            applied = Applied::running(&c.vm_id, "");
        }
        self.vms.insert(vm.id.clone(), vm);
        self.rebuild_alloc();
        Ok(applied)
    }

    /// A new spec; what the host reserves for the VM (vcpus, memory, disks) changes only
    /// while it is stopped.
    pub(super) fn update_vm(&mut self, u: &UpdateVm) -> Result<Applied, CommandResult> {
        let spec = u
            .spec
            .clone()
            .ok_or_else(|| err(Code::InvalidArgument, "UpdateVm needs a spec"))?;
        self.validate_spec(&spec)?;
        self.check_undo_spec(Some(self.vm(&u.vm_id)?), &spec)?;
        let vm = self.vm_mut(&u.vm_id)?;
        let old = vm.spec.clone().unwrap_or_default();
        let stopped = vm.desired_power_state() == hpb::PowerState::Stopped
            && vm.power_state() == hpb::PowerState::Stopped;
        if !stopped
            && (old.vcpus != spec.vcpus
                || old.memory_bytes != spec.memory_bytes
                || old.disks != spec.disks)
        {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {}: vcpus, memory and disks change only while it is stopped",
                    u.vm_id
                ),
            ));
        }
        vm.spec = Some(spec);
        self.rebuild_alloc();
        Ok(Applied::done(&u.vm_id))
    }

    /// The power state a person (or HA) wants; its task runs until the host reports it
    /// reached.
    pub(super) fn set_vm_power(
        &mut self,
        p: &SetVmPower,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        let desired = hpb::PowerState::try_from(p.desired)
            .map_err(|_| err(Code::InvalidArgument, "bad power state"))?;
        let vm = self
            .vms
            .get(&p.vm_id)
            .cloned()
            .ok_or_else(|| err(Code::NotFound, format!("no VM with id {}", p.vm_id)))?;
        // A start would boot it afresh and lose the saved guest: resuming is the way on.
        if super::jobs::vm_suspended(&vm) {
            let what = match desired {
                hpb::PowerState::Running => "started",
                hpb::PowerState::Paused => "paused",
                _ => "shut down",
            };
            return Err(super::jobs::suspended_refusal(&vm, what));
        }
        match desired {
            hpb::PowerState::Running => {
                if vm.host_id.is_empty() {
                    if p.host_id.is_empty() {
                        return Err(err(Code::InvalidArgument, "a start needs a placement"));
                    }
                    if !super::undo::undo_disks_without_overlay(&vm).is_empty() {
                        return Err(err(
                            Code::FailedPrecondition,
                            format!(
                                "VM {} has undo disks without an overlay: its start (StartVm) makes them first",
                                vm.id
                            ),
                        ));
                    }
                    self.check_fits(&vm, &p.host_id)?;
                } else if vm.desired_power_state() == hpb::PowerState::Stopped
                    && !p.host_id.is_empty()
                    && p.host_id != vm.host_id
                {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "VM {} is still on host {} while it stops",
                            vm.id, vm.host_id
                        ),
                    ));
                }
                let v = self.vm_mut(&p.vm_id)?;
                if v.host_id.is_empty() {
                    v.host_id = p.host_id.clone();
                }
                v.desired_power_state = desired as i32;
                if p.ha_restart {
                    let message = format!(
                        "HA restarts VM {} on host {} after its host was fenced",
                        vm.spec.as_ref().map_or(vm.id.as_str(), |s| s.name.as_str()),
                        self.host_name(&p.host_id)
                    );
                    self.raise_alert(
                        pb::AlertKind::HaRestart,
                        pb::AlertSeverity::Warning,
                        &p.vm_id,
                        message,
                        at_ms,
                    );
                }
            }
            hpb::PowerState::Stopped | hpb::PowerState::Paused => {
                if desired == hpb::PowerState::Paused && vm.host_id.is_empty() {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!("VM {} is not running", vm.id),
                    ));
                }
                let v = self.vm_mut(&p.vm_id)?;
                v.desired_power_state = desired as i32;
                if desired == hpb::PowerState::Stopped
                    && v.power_state() == hpb::PowerState::Stopped
                {
                    v.host_id.clear();
                }
                if desired == hpb::PowerState::Stopped && p.force && !v.host_id.is_empty() {
                    self.force_stop.insert(p.vm_id.clone());
                }
            }
            _ => {
                return Err(err(
                    Code::InvalidArgument,
                    "desired state must be running, stopped or paused",
                ));
            }
        }
        self.rebuild_alloc();
        let done = {
            let v = &self.vms[&p.vm_id];
            v.desired_power_state == v.power_state && !p.reboot
        };
        Ok(if done {
            Applied::done(&p.vm_id)
        } else {
            Applied::running(&p.vm_id, "")
        })
    }

    pub(super) fn destroy_vm(&mut self, id: &str) -> Result<Applied, CommandResult> {
        let vm = self
            .vms
            .get(id)
            .ok_or_else(|| err(Code::NotFound, format!("no VM with id {id}")))?;
        if vm.power_state() != hpb::PowerState::Stopped
            && vm.power_state() != hpb::PowerState::Unspecified
        {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {} is {} on host {}: shut it down first",
                    id,
                    vm.power_state().as_str_name(),
                    vm.host_id
                ),
            ));
        }
        self.vms.remove(id);
        self.rebuild_alloc();
        Ok(Applied::done(id))
    }

    /// Whether a host's word on a VM's power state counts. Not for a VM the pool placed
    /// elsewhere (a stale copy on a host it moved away from, or a stopped VM's leftover
    /// definition; reconciliation removes those). Nor "migrating" with no migration job: a
    /// state read before a switchover and committed after the job ended, which set the
    /// VM's state itself.
    pub(crate) fn takes_report(&self, host_id: &str, vm_id: &str, power_state: i32) -> bool {
        let placed_here = self.vms.get(vm_id).is_some_and(|vm| vm.host_id == host_id);
        let stale_migrating =
            power_state == hpb::PowerState::Migrating as i32 && self.migration_of(vm_id).is_none();
        placed_here && !stale_migrating
    }

    /// A host reported one of its VMs: record what it runs and finish the power tasks
    /// whose goal is reached.
    pub(super) fn apply_reported_vm(&mut self, host_id: &str, rv: &ReportedVm, at_ms: u64) {
        if !self.takes_report(host_id, rv.vm_id.as_str(), rv.power_state) {
            return;
        }
        let Some(vm) = self.vms.get_mut(&rv.vm_id) else {
            return;
        };
        // A stop the pool has not taken yet: one it saw the VM run before, or a run it
        // never saw running. Not the stopped definition of a run the pool already took
        // the stop of, which a host reports until reconciliation removes it (a VM started
        // again at once, on the same host, reads as powered off by its guest otherwise).
        let known_run = rv.started_at_ms != 0
            && vm.started_at.as_ref().map(proto::timestamp_ms) == Some(rv.started_at_ms);
        let new_stop = !known_run || active(vm.power_state);
        vm.power_state = rv.power_state;
        vm.last_stop_reason = rv.last_stop_reason;
        if rv.started_at_ms != 0 {
            vm.started_at = Some(proto::timestamp(rv.started_at_ms));
        }
        let stopped = matches!(
            vm.power_state(),
            hpb::PowerState::Stopped | hpb::PowerState::Crashed
        );
        // The guest powered itself off: the pool takes that as the VM's wish (a crash,
        // by contrast, is restarted).
        if new_stop
            && vm.power_state() == hpb::PowerState::Stopped
            && vm.last_stop_reason() == hpb::StopReason::GuestPoweroff
            && vm.desired_power_state() == hpb::PowerState::Running
        {
            vm.desired_power_state = hpb::PowerState::Stopped as i32;
        }
        if stopped && vm.desired_power_state() == hpb::PowerState::Stopped {
            vm.host_id.clear();
            vm.power_state = hpb::PowerState::Stopped as i32;
        }
        if stopped {
            self.force_stop.remove(&rv.vm_id);
        }
        let Some(vm) = self.vms.get(&rv.vm_id) else {
            return;
        };
        if vm.power_state == vm.desired_power_state {
            let vm_id = vm.id.clone();
            let jobs = &self.jobs;
            self.tasks.update_where(
                |t| {
                    t.target_id == vm_id
                        && t.state == pb::TaskState::Running as i32
                        && t.kind.starts_with("vm.")
                        && !jobs.contains_key(&t.id)
                },
                |t| {
                    t.state = pb::TaskState::Succeeded as i32;
                    t.progress_percent = 100;
                    t.finished_at = Some(proto::timestamp(at_ms));
                },
            );
        }
        // A VM that stopped left its host: every host's allocation is derived again.
        self.rebuild_alloc();
    }

    pub(crate) fn validate_spec(&self, spec: &pb::VmSpec) -> Result<(), CommandResult> {
        if spec.name.is_empty() {
            return Err(err(Code::InvalidArgument, "a VM needs a name"));
        }
        if spec.vcpus == 0 || spec.vcpus > 256 {
            return Err(err(
                Code::InvalidArgument,
                format!("vcpus must be 1..=256, not {}", spec.vcpus),
            ));
        }
        if spec.memory_bytes < (16 << 20) {
            return Err(err(
                Code::InvalidArgument,
                format!(
                    "memory must be at least 16 MiB, not {} bytes",
                    spec.memory_bytes
                ),
            ));
        }
        for d in &spec.disks {
            if !self.volumes.contains_key(&d.volume_id) {
                return Err(err(
                    Code::NotFound,
                    format!("disk {}: no volume {}", d.disk_id, d.volume_id),
                ));
            }
            if let Some(t) = self.volume_being_deleted(&d.volume_id) {
                return Err(err(
                    Code::FailedPrecondition,
                    format!(
                        "disk {}: volume {} is being deleted by task {t}",
                        d.disk_id, d.volume_id
                    ),
                ));
            }
        }
        Ok(())
    }
}
