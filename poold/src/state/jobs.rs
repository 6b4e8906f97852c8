//! The state machine's side of long operations ([`Job`]s): what is checked when one
//! starts (so a job that cannot succeed is refused before anything is done), how its
//! progress is recorded, and the effects it has when it finishes.
//!
//! A job holds the existing VM it works on ([`Job::busy_vm`]): a second job on the same
//! VM is refused until the first ends, and reconciliation leaves a VM alone while a job
//! pauses or moves it.

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use proto::host as hpb;
use proto::storage as spb;
use tonic::Code;

use super::command::*;
use super::machine::{Applied, PoolState, err};
pub use super::suspend::{power_name, suspended_refusal, vm_suspended};

/// Whether a VM is stopped both in what the pool wants and what its host reported.
pub fn vm_stopped(vm: &pb::Vm) -> bool {
    vm.desired_power_state() == hpb::PowerState::Stopped
        && matches!(
            vm.power_state(),
            hpb::PowerState::Stopped | hpb::PowerState::Unspecified | hpb::PowerState::Crashed
        )
}

impl PoolState {
    pub(super) fn volume(&self, id: &str) -> Result<&spb::Volume, CommandResult> {
        self.volumes
            .get(id)
            .ok_or_else(|| err(Code::NotFound, format!("no volume with id {id}")))
    }

    pub(super) fn vm(&self, id: &str) -> Result<&pb::Vm, CommandResult> {
        self.vms
            .get(id)
            .ok_or_else(|| err(Code::NotFound, format!("no VM with id {id}")))
    }

    /// The VM snapshot `id`, which must be one of VM `vm_id`'s.
    fn snapshot_of(&self, id: &str, vm_id: &str) -> Result<&pb::VmSnapshot, CommandResult> {
        let snap = self
            .vm_snapshots
            .get(id)
            .ok_or_else(|| err(Code::NotFound, format!("no VM snapshot with id {id}")))?;
        if snap.vm_id != vm_id {
            return Err(err(
                Code::InvalidArgument,
                format!("snapshot {id} is of VM {}, not {vm_id}", snap.vm_id),
            ));
        }
        Ok(snap)
    }

    /// Who uses a volume, for people: "disk vda of VM x", "template t", "snapshot s of VM x".
    pub fn volume_user(&self, volume_id: &str) -> Option<String> {
        if let Some(vm) = self
            .vms
            .values()
            .find(|vm| !volume_id.is_empty() && vm.state_volume_id == volume_id)
        {
            return Some(format!("the saved state of suspended VM {}", vm.id));
        }
        // An overlay, or the snapshot it came from (a disk's own volume is named below).
        if let Some((vm, o)) = self.undo_user(volume_id)
            && (o.volume_id == volume_id || o.snapshot_id == volume_id)
        {
            return Some(format!(
                "the undo changes of disk {} of VM {}",
                o.disk_id, vm.id
            ));
        }
        for vm in self.vms.values() {
            if let Some(d) = vm
                .spec
                .as_ref()
                .and_then(|s| s.disks.iter().find(|d| d.volume_id == volume_id))
            {
                return Some(format!("disk {} of VM {}", d.disk_id, vm.id));
            }
        }
        for t in self.templates.values() {
            if t.disk_volumes.values().any(|v| v == volume_id) {
                return Some(format!("template {} ({})", t.id, t.name));
            }
        }
        for s in self.vm_snapshots.values() {
            if s.disk_snapshots.values().any(|v| v == volume_id) {
                return Some(format!("snapshot {} of VM {}", s.id, s.vm_id));
            }
            if !volume_id.is_empty() && s.state_volume_id == volume_id {
                return Some(format!(
                    "the saved state of checkpoint {} of VM {}",
                    s.id, s.vm_id
                ));
            }
        }
        None
    }

    /// A volume a pending delete job is about to remove (so no new user may take it).
    pub fn volume_being_deleted(&self, volume_id: &str) -> Option<&str> {
        self.jobs.values().find_map(|j| match &j.spec {
            Some(JobSpec::Volume(v))
                if v.action == VolumeAction::Delete as i32 && v.volume_id == volume_id =>
            {
                Some(j.task_id.as_str())
            }
            _ => None,
        })
    }

    /// Refuses when a job other than task `except` holds VM `vm` (it read the VM when it
    /// began and acts on what it read).
    pub(crate) fn vm_not_busy(&self, vm: &str, except: &str) -> Result<(), CommandResult> {
        match self
            .jobs
            .values()
            .find(|o| o.busy_vm() == Some(vm) && o.task_id != except)
        {
            Some(other) => Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {vm} is busy with task {} ({}); wait for it to end",
                    other.task_id,
                    other.kind()
                ),
            )),
            None => Ok(()),
        }
    }

    /// Checks a job before it starts; returns the task's target id.
    pub(crate) fn check_job(&self, job: &Job) -> Result<String, CommandResult> {
        if let Some(vm) = job.busy_vm() {
            self.vm_not_busy(vm, &job.task_id)?;
        }
        let spec = job
            .spec
            .as_ref()
            .ok_or_else(|| err(Code::InvalidArgument, "empty job"))?;
        match spec {
            JobSpec::CreateSr(j) => {
                let sr =
                    j.sr.as_ref()
                        .ok_or_else(|| err(Code::InvalidArgument, "no repository given"))?;
                if sr.id.is_empty() || sr.name.is_empty() || sr.address.is_empty() {
                    return Err(err(
                        Code::InvalidArgument,
                        "a storage repository needs an id, a name and a storaged address",
                    ));
                }
                if sr.thin_pool_id.is_empty() && j.create_pool.is_none() {
                    return Err(err(
                        Code::InvalidArgument,
                        "give thin_pool_id (adopt an existing pool) or create_pool",
                    ));
                }
                if let Some(o) = self.srs.values().find(|o| o.name == sr.name) {
                    return Err(err(
                        Code::AlreadyExists,
                        format!("repository {} is already named {:?}", o.id, sr.name),
                    ));
                }
                if !sr.thin_pool_id.is_empty()
                    && let Some(o) = self
                        .srs
                        .values()
                        .find(|o| o.address == sr.address && o.thin_pool_id == sr.thin_pool_id)
                {
                    return Err(err(
                        Code::AlreadyExists,
                        format!(
                            "repository {} already uses thin pool {} of {}",
                            o.id, sr.thin_pool_id, sr.address
                        ),
                    ));
                }
                Ok(sr.id.clone())
            }
            JobSpec::Volume(v) => self.check_volume_job(v),
            JobSpec::VmFromTemplate(j) => {
                let t = self.templates.get(&j.template_id).ok_or_else(|| {
                    err(
                        Code::NotFound,
                        format!("no template with id {}", j.template_id),
                    )
                })?;
                if !j.sr_id.is_empty() && !self.srs.contains_key(&j.sr_id) {
                    return Err(err(
                        Code::NotFound,
                        format!("no storage repository {}", j.sr_id),
                    ));
                }
                for (disk, vol) in &t.disk_volumes {
                    if !self.volumes.contains_key(vol) {
                        return Err(err(
                            Code::FailedPrecondition,
                            format!("template {} disk {disk}: its volume {vol} is gone", t.id),
                        ));
                    }
                }
                let mut spec = j.spec.clone().unwrap_or_default();
                spec.disks.clear();
                self.validate_spec(&spec)?;
                if self.vms.contains_key(&j.vm_id) {
                    return Err(err(Code::AlreadyExists, format!("VM {} exists", j.vm_id)));
                }
                Ok(j.vm_id.clone())
            }
            JobSpec::TemplateFromVm(j) => {
                let vm = self.vm(&j.vm_id)?;
                if !vm_stopped(vm) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "VM {} is {}: a template is made from a stopped VM; shut it down first",
                            vm.id,
                            vm.power_state().as_str_name()
                        ),
                    ));
                }
                if j.name.is_empty() {
                    return Err(err(Code::InvalidArgument, "a template needs a name"));
                }
                if let Some(o) = self.templates.values().find(|o| o.name == j.name) {
                    return Err(err(
                        Code::AlreadyExists,
                        format!("template {} is already named {:?}", o.id, j.name),
                    ));
                }
                Ok(j.template_id.clone())
            }
            JobSpec::BackupVm(j) => {
                self.vm(&j.vm_id)?;
                self.snapshot_of(&j.snapshot_id, &j.vm_id)?;
                super::schedules::check_backup_directory(&j.directory)?;
                if let Some(o) = self.jobs.values().find(|o| {
                    o.task_id != job.task_id
                        && matches!(&o.spec, Some(JobSpec::BackupVm(b)) if b.directory == j.directory)
                }) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "task {} is writing into {} already",
                            o.task_id, j.directory
                        ),
                    ));
                }
                Ok(j.vm_id.clone())
            }
            JobSpec::SnapshotVm(j) if j.memory => self.check_checkpoint(j),
            JobSpec::SnapshotVm(j) => {
                self.vm(&j.vm_id)?;
                Ok(j.vm_id.clone())
            }
            JobSpec::RevertVm(j) => {
                let vm = self.vm(&j.vm_id)?;
                let snap = self.snapshot_of(&j.snapshot_id, &j.vm_id)?;
                if vm_suspended(vm) {
                    return Err(suspended_refusal(vm, "reverted"));
                }
                if !vm_stopped(vm) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!("VM {} is running: shut it down before reverting it", vm.id),
                    ));
                }
                if !vm.undo_overlays.is_empty() {
                    return Err(super::undo::pending_refusal(vm, "revert it"));
                }
                self.check_revert_in_place(vm, snap)?;
                self.check_revert_placement(vm, snap, &j.host_id)?;
                Ok(j.vm_id.clone())
            }
            JobSpec::CloneVm(j) => {
                if j.name.is_empty() {
                    return Err(err(Code::InvalidArgument, "the clone needs a name"));
                }
                if !self.vms.contains_key(&j.source_id)
                    && !self.vm_snapshots.contains_key(&j.source_id)
                {
                    return Err(err(
                        Code::NotFound,
                        format!("no VM or VM snapshot with id {}", j.source_id),
                    ));
                }
                if let Some(t) = self.snapshot_being_deleted(&j.source_id) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "VM snapshot {} is being deleted by task {t}; clone another",
                            j.source_id
                        ),
                    ));
                }
                Ok(j.vm_id.clone())
            }
            JobSpec::DeleteVmSnapshot(j) => {
                if j.snapshot_id.is_empty() {
                    return Err(err(Code::InvalidArgument, "snapshot_id is required"));
                }
                let snap = self.snapshot_of(&j.snapshot_id, &j.vm_id)?;
                // A clone reads the snapshot's volumes until it ends.
                if let Some(t) = self.jobs.values().find_map(|o| match &o.spec {
                    Some(JobSpec::CloneVm(c)) if c.source_id == j.snapshot_id => Some(&o.task_id),
                    _ => None,
                }) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "VM snapshot {} is being cloned by task {t}; delete it once that ends",
                            snap.id
                        ),
                    ));
                }
                Ok(j.snapshot_id.clone())
            }
            JobSpec::DestroyVm(j) => {
                let vm = self.vm(&j.vm_id)?;
                // A suspended VM goes with its saved state.
                if !vm_stopped(vm) && !vm_suspended(vm) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "VM {} is {} on host {}: shut it down first",
                            vm.id,
                            vm.power_state().as_str_name(),
                            vm.host_id
                        ),
                    ));
                }
                Ok(j.vm_id.clone())
            }
            JobSpec::MigrateVm(j) => {
                let vm = self.vm(&j.vm_id)?;
                if vm_suspended(vm) {
                    return Err(suspended_refusal(vm, "live-migrated"));
                }
                if vm.desired_power_state() != hpb::PowerState::Running
                    || vm.power_state() != hpb::PowerState::Running
                {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "VM {} is {}: only a running VM is live-migrated",
                            vm.id,
                            vm.power_state().as_str_name()
                        ),
                    ));
                }
                if vm.host_id != j.source_host_id {
                    return Err(err(
                        Code::Aborted,
                        format!("VM {} moved to host {} meanwhile", vm.id, vm.host_id),
                    ));
                }
                if j.destination_host_id == j.source_host_id {
                    return Err(err(
                        Code::InvalidArgument,
                        format!("VM {} already runs on host {}", vm.id, vm.host_id),
                    ));
                }
                let mut probe = vm.clone();
                probe.host_id.clear();
                self.check_fits(&probe, &j.destination_host_id)
                    .map_err(|e| CommandResult {
                        code: Code::FailedPrecondition as i32,
                        ..e
                    })?;
                Ok(j.vm_id.clone())
            }
            JobSpec::FenceHost(j) => {
                let h = self
                    .hosts
                    .get(&j.host_id)
                    .ok_or_else(|| err(Code::NotFound, format!("no host with id {}", j.host_id)))?;
                if h.state() != pb::HostState::Unreachable {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "host {} is {}: only an unreachable host is fenced",
                            h.id,
                            h.state().as_str_name()
                        ),
                    ));
                }
                if let Some(o) = self.fence_job(&j.host_id) {
                    return Err(err(
                        Code::AlreadyExists,
                        format!("host {} is being fenced by task {o}", j.host_id),
                    ));
                }
                Ok(j.host_id.clone())
            }
            JobSpec::RebootVm(j) => {
                let vm = self.vm(&j.vm_id)?;
                if vm.host_id.is_empty() || vm.power_state() != hpb::PowerState::Running {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!("VM {} is not running", vm.id),
                    ));
                }
                Ok(j.vm_id.clone())
            }
            JobSpec::SuspendVm(j) => self.check_suspend(j),
            JobSpec::ResumeVm(j) => self.check_resume(j),
            JobSpec::StartUndoVm(j) => self.check_start_undo(j),
            JobSpec::EndUndo(j) => self.check_end_undo(j),
        }
    }

    /// The task deleting a VM snapshot, if one runs.
    pub fn snapshot_being_deleted(&self, snapshot_id: &str) -> Option<&str> {
        self.jobs.values().find_map(|j| match &j.spec {
            Some(JobSpec::DeleteVmSnapshot(d)) if d.snapshot_id == snapshot_id => {
                Some(j.task_id.as_str())
            }
            _ => None,
        })
    }

    /// The task fencing a host, if one runs.
    pub fn fence_job(&self, host_id: &str) -> Option<&str> {
        self.jobs.values().find_map(|j| match &j.spec {
            Some(JobSpec::FenceHost(f)) if f.host_id == host_id => Some(j.task_id.as_str()),
            _ => None,
        })
    }

    /// Whether a job brings VM `vm_id` onto host `host_id` or moves it off it: a
    /// migration's source or destination, or the host a resume, a quick migration or a
    /// revert to a checkpoint restores it on. That host runs the VM before the job's end
    /// places it there: not a stale copy to stop.
    pub fn job_moves_vm_on(&self, vm_id: &str, host_id: &str) -> bool {
        self.jobs.values().any(|j| match &j.spec {
            Some(JobSpec::MigrateVm(m)) => {
                m.vm_id == vm_id
                    && (m.destination_host_id == host_id || m.source_host_id == host_id)
            }
            Some(JobSpec::ResumeVm(r)) => r.vm_id == vm_id && r.host_id == host_id,
            Some(JobSpec::RevertVm(r)) => r.vm_id == vm_id && r.host_id == host_id,
            Some(JobSpec::SuspendVm(q)) => q.vm_id == vm_id && q.resume_on_host_id == host_id,
            _ => false,
        })
    }

    /// The migration a VM is in, if any.
    pub fn migration_of(&self, vm_id: &str) -> Option<&MigrateVmJob> {
        self.jobs.values().find_map(|j| match &j.spec {
            Some(JobSpec::MigrateVm(m)) if m.vm_id == vm_id => Some(m),
            _ => None,
        })
    }

    fn check_volume_job(&self, v: &VolumeJob) -> Result<String, CommandResult> {
        let action = VolumeAction::try_from(v.action)
            .ok()
            .filter(|a| *a != VolumeAction::Unspecified)
            .ok_or_else(|| err(Code::InvalidArgument, "unknown volume action"))?;
        if action == VolumeAction::Create {
            if !self.srs.contains_key(&v.sr_id) {
                return Err(err(
                    Code::NotFound,
                    format!("no storage repository {}", v.sr_id),
                ));
            }
            if v.name.is_empty() {
                return Err(err(Code::InvalidArgument, "a volume needs a name"));
            }
            if v.size_bytes == 0 || !v.size_bytes.is_multiple_of(512) {
                return Err(err(
                    Code::InvalidArgument,
                    format!(
                        "virtual_size_bytes must be a non-zero multiple of 512, not {}",
                        v.size_bytes
                    ),
                ));
            }
            return Ok(String::new());
        }
        let vol = self.volume(&v.volume_id)?;
        if let Some(t) = self.volume_being_deleted(&v.volume_id) {
            return Err(err(
                Code::FailedPrecondition,
                format!("volume {} is being deleted by task {t}", v.volume_id),
            ));
        }
        let running_user = || {
            self.vms.values().find(|vm| {
                !vm_stopped(vm)
                    && vm
                        .spec
                        .as_ref()
                        .is_some_and(|s| s.disks.iter().any(|d| d.volume_id == v.volume_id))
            })
        };
        match action {
            VolumeAction::Resize => self.check_not_undo_volume(&v.volume_id, "resized")?,
            VolumeAction::Revert => self.check_not_undo_volume(&v.volume_id, "reverted")?,
            VolumeAction::Delete => self.check_not_undo_volume(&v.volume_id, "deleted")?,
            _ => {}
        }
        match action {
            VolumeAction::Resize => {
                if v.size_bytes == 0 || !v.size_bytes.is_multiple_of(512) {
                    return Err(err(
                        Code::InvalidArgument,
                        "new_virtual_size_bytes must be a non-zero multiple of 512",
                    ));
                }
                if v.size_bytes < vol.virtual_size_bytes {
                    if !v.force {
                        return Err(err(
                            Code::FailedPrecondition,
                            format!(
                                "shrinking volume {} from {} to {} bytes discards data; pass force",
                                vol.id, vol.virtual_size_bytes, v.size_bytes
                            ),
                        ));
                    }
                    if let Some(vm) = running_user() {
                        return Err(err(
                            Code::FailedPrecondition,
                            format!(
                                "volume {} is a disk of running VM {}: stop it before shrinking",
                                vol.id, vm.id
                            ),
                        ));
                    }
                }
            }
            VolumeAction::Snapshot | VolumeAction::Clone => {
                if v.name.is_empty() {
                    return Err(err(Code::InvalidArgument, "the new volume needs a name"));
                }
            }
            VolumeAction::Revert => {
                let snap = self.volume(&v.snapshot_id)?;
                if snap.kind != spb::VolumeKind::Snapshot as i32 {
                    return Err(err(
                        Code::InvalidArgument,
                        format!("{} is not a snapshot", v.snapshot_id),
                    ));
                }
                if let Some(vm) = running_user() {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "volume {} is a disk of running VM {}: stop it before reverting",
                            vol.id, vm.id
                        ),
                    ));
                }
            }
            VolumeAction::Delete => {
                if let Some(user) = self.volume_user(&v.volume_id) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!("volume {} is used by {user}; remove that first", vol.id),
                    ));
                }
            }
            VolumeAction::Create | VolumeAction::Unspecified => {}
        }
        Ok(v.volume_id.clone())
    }

    /// Records a job for the leader to carry out, once [`PoolState::check_job`] finds it
    /// can succeed; its task runs until the job finishes.
    pub(super) fn start_job(&mut self, j: &Job, task_id: &str) -> Result<Applied, CommandResult> {
        let mut j = j.clone();
        j.task_id = task_id.to_owned();
        j.outputs.clear();
        j.cancel_requested = false;
        let target = self.check_job(&j)?;
        self.jobs.insert(j.task_id.clone(), j);
        Ok(Applied::running(target, "queued"))
    }

    /// Asks a running migration to stop; the job itself ends it (and its task).
    pub(super) fn cancel_job(&mut self, task_id: &str) -> Result<Applied, CommandResult> {
        let job = self.jobs.get_mut(task_id).ok_or_else(|| {
            err(
                Code::FailedPrecondition,
                format!("task {task_id} is not running (or cannot be cancelled)"),
            )
        })?;
        if !matches!(job.spec, Some(JobSpec::MigrateVm(_))) {
            return Err(err(
                Code::FailedPrecondition,
                format!("task {task_id} ({}) cannot be cancelled", job.kind()),
            ));
        }
        job.cancel_requested = true;
        if let Some(t) = self.tasks.get_mut(task_id) {
            t.status_message = "cancelling".into();
        }
        Ok(Applied::done(task_id))
    }

    /// Applies a finished job: its effects (when it succeeded) and its task's end. The
    /// `FinishJob` command's own task succeeds; the job's task ends as the job did.
    pub(crate) fn finish_job(
        &mut self,
        f: &FinishJob,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        let Some(job) = self.jobs.remove(&f.task_id) else {
            return Err(err(
                Code::FailedPrecondition,
                format!("task {} is not running", f.task_id),
            ));
        };
        let ok = f.code == 0;
        // Results the apply itself decides (a placement that no longer fits), over the job's.
        // A failed job carries effects only for what it did before failing and must keep
        // (a quick migration's suspend, when the restore failed).
        let mut decided = Vec::new();
        for e in &f.effects {
            decided.extend(self.apply_effect(e, at_ms));
        }
        if !f.effects.is_empty() {
            self.rebuild_alloc();
        }
        // The last VM of an evacuation has left: the host enters maintenance.
        if let Some(JobSpec::MigrateVm(m)) = &job.spec
            && !m.evacuating_host_id.is_empty()
        {
            let host = &m.evacuating_host_id;
            let empty = self.alloc.get(host).is_none_or(|a| a.vm_ids.is_empty());
            let others = self.jobs.values().any(
                |j| matches!(&j.spec, Some(JobSpec::MigrateVm(o)) if o.evacuating_host_id == *host),
            );
            if empty
                && !others
                && let Some(h) = self.hosts.get_mut(host)
                && h.state() == pb::HostState::Disabled
            {
                h.state = pb::HostState::Maintenance as i32;
            }
        }
        let task = self.tasks.get_mut(&f.task_id);
        let mut target = f.target_id.clone();
        if let Some(t) = task {
            t.state = if ok {
                pb::TaskState::Succeeded
            } else if f.code == Code::Cancelled as i32 {
                pb::TaskState::Cancelled
            } else {
                pb::TaskState::Failed
            } as i32;
            if ok {
                t.progress_percent = 100;
            }
            t.finished_at = Some(proto::timestamp(at_ms));
            t.cancellable = false;
            if !f.target_id.is_empty() {
                t.target_id = f.target_id.clone();
            }
            target = t.target_id.clone();
            for (k, v) in f.results.iter().chain(decided.iter().map(|(k, v)| (k, v))) {
                t.results.insert(k.clone(), v.clone());
            }
            if !ok {
                t.error_code = format!("{:?}", Code::from(f.code));
                t.error_message = f.message.clone();
                t.status_message = f.message.clone();
            } else {
                t.status_message = "done".into();
            }
        }
        if !ok && f.code != Code::Cancelled as i32 {
            let message = format!("task {} failed: {}", job.kind(), f.message);
            self.raise_alert(
                pb::AlertKind::TaskFailed,
                pb::AlertSeverity::Error,
                &f.task_id,
                message,
                at_ms,
            );
        }
        Ok(Applied::done(target))
    }

    pub(crate) fn job_step(&mut self, s: &JobStep) -> Result<String, CommandResult> {
        let job = self.jobs.get_mut(&s.task_id).ok_or_else(|| {
            err(
                Code::FailedPrecondition,
                format!("task {} is not running", s.task_id),
            )
        })?;
        for (k, v) in &s.outputs {
            job.outputs.insert(k.clone(), v.clone());
        }
        if let Some(t) = self.tasks.get_mut(&s.task_id) {
            t.progress_percent = s.progress_percent.min(99);
            if !s.status_message.is_empty() {
                t.status_message = s.status_message.clone();
            }
            for (k, v) in &s.results {
                t.results.insert(k.clone(), v.clone());
            }
        }
        Ok(s.task_id.clone())
    }

    /// Applies one effect; returns the task results it decided.
    fn apply_effect(&mut self, e: &Effect, at_ms: u64) -> Vec<(String, String)> {
        let Some(kind) = &e.kind else {
            return Vec::new();
        };
        match kind {
            EffectKind::PutVolume(v) => {
                self.volumes.insert(v.id.clone(), v.clone());
            }
            EffectKind::RemoveVolume(id) => {
                self.volumes.remove(id);
            }
            EffectKind::PutSr(sr) => {
                self.srs.insert(sr.id.clone(), sr.clone());
            }
            EffectKind::CreateVm(c) => {
                if self.vms.contains_key(&c.vm_id) {
                    return Vec::new();
                }
                // New MACs, and addresses of their own: a free one where the network
                // has a subnet, else none (on a network that locks them it sends no IP
                // until given some); an effect cannot fail, so a VIF on a network
                // destroyed meanwhile is left out.
                let wanted: Vec<pb::Vif> = c
                    .vifs
                    .iter()
                    .filter(|v| self.networks.contains_key(&v.network_id))
                    .map(|v| pb::Vif {
                        mac: String::new(),
                        ipv4: Vec::new(),
                        ..v.clone()
                    })
                    .collect();
                let vifs = self.new_vifs(&c.vm_id, &wanted, false).unwrap_or_default();
                let mut decided: Vec<(String, String)> = vifs
                    .iter()
                    .filter(|v| v.ipv4.is_empty())
                    .filter_map(|v| {
                        let n = self.networks.get(&v.network_id)?;
                        (!n.subnet.is_empty()).then(|| {
                            (
                                format!("{}.ipv4", v.id),
                                format!(
                                    "none: network {:?}'s {} is full (vif-update --ip)",
                                    n.name,
                                    super::networks::handed_from(n)
                                ),
                            )
                        })
                    })
                    .collect();
                let mut vm = pb::Vm {
                    id: c.vm_id.clone(),
                    spec: c.spec.clone(),
                    vifs,
                    desired_power_state: hpb::PowerState::Stopped as i32,
                    power_state: hpb::PowerState::Stopped as i32,
                    template_id: c.template_id.clone(),
                    created_at: Some(proto::timestamp(at_ms)),
                    last_stop_reason: hpb::StopReason::None as i32,
                    ..Default::default()
                };
                // The job placed it when asked to start it; checked again here, since the
                // host may have filled up while the disks were cloned.
                if !c.start_on_host.is_empty()
                    && !super::undo::undo_disks_without_overlay(&vm).is_empty()
                {
                    // Its undo disks' overlays come from a start of their own.
                    decided.push((
                        "start".into(),
                        "not started: its undo disks get their overlays when it is started".into(),
                    ));
                } else if !c.start_on_host.is_empty() {
                    match self.check_fits(&vm, &c.start_on_host) {
                        Ok(()) => {
                            vm.desired_power_state = hpb::PowerState::Running as i32;
                            vm.host_id = c.start_on_host.clone();
                        }
                        Err(e) => {
                            decided.push(("start".into(), format!("not started: {}", e.message)))
                        }
                    }
                }
                self.vms.insert(c.vm_id.clone(), vm);
                return decided;
            }
            EffectKind::SetVmSpec(u) => {
                if let Some(vm) = self.vms.get_mut(&u.vm_id)
                    && u.spec.is_some()
                {
                    vm.spec = u.spec.clone();
                }
            }
            EffectKind::RemoveVm(id) => {
                self.vms.remove(id);
                self.force_stop.remove(id);
            }
            EffectKind::PutTemplate(t) => {
                let mut t = t.clone();
                if t.created_at.is_none() {
                    t.created_at = Some(proto::timestamp(at_ms));
                }
                self.templates.insert(t.id.clone(), t);
            }
            EffectKind::PutVmSnapshot(s) => {
                let mut s = s.clone();
                if s.created_at.is_none() {
                    s.created_at = Some(proto::timestamp(at_ms));
                }
                // The job read its parent before its commit; a tree has no dangling edge.
                if s.parent_id == s.id || !self.vm_snapshots.contains_key(&s.parent_id) {
                    s.parent_id.clear();
                }
                self.vm_snapshots.insert(s.id.clone(), s);
            }
            EffectKind::RemoveVmSnapshot(id) => {
                if let Some(gone) = self.vm_snapshots.remove(id) {
                    let parent = gone.parent_id;
                    self.vm_snapshots
                        .update_where(|s| s.parent_id == *id, |s| s.parent_id = parent.clone());
                    self.vms.update_where(
                        |v| v.current_snapshot_id == *id,
                        |v| v.current_snapshot_id = parent.clone(),
                    );
                }
            }
            EffectKind::SetCurrentSnapshot(c) => {
                let known = c.snapshot_id.is_empty()
                    || self
                        .vm_snapshots
                        .get(&c.snapshot_id)
                        .is_some_and(|s| s.vm_id == c.vm_id);
                if known
                    && let Some(vm) = self.vms.get_mut(&c.vm_id)
                    && vm.current_snapshot_id != c.snapshot_id
                {
                    vm.current_snapshot_id = c.snapshot_id.clone();
                }
            }
            EffectKind::HostFenced(host_id) => {
                if let Some(h) = self.hosts.get_mut(host_id) {
                    h.state = pb::HostState::Fenced as i32;
                }
                self.vms.update_where(
                    |v| v.host_id == *host_id,
                    |vm| {
                        vm.host_id.clear();
                        vm.power_state = hpb::PowerState::Stopped as i32;
                        vm.last_stop_reason = hpb::StopReason::Fenced as i32;
                        let ha = matches!(
                            vm.spec.as_ref().map(|s| s.ha_priority()),
                            Some(
                                pb::HaRestartPriority::Restart | pb::HaRestartPriority::BestEffort
                            )
                        );
                        if !(ha && vm.desired_power_state() != hpb::PowerState::Stopped) {
                            vm.desired_power_state = hpb::PowerState::Stopped as i32;
                        } else {
                            // A paused HA VM comes back running.
                            vm.desired_power_state = hpb::PowerState::Running as i32;
                        }
                    },
                );
            }
            EffectKind::VmSuspended(v) => self.apply_vm_suspended(v),
            EffectKind::VmResumed(m) => self.apply_vm_resumed(m),
            EffectKind::UndoStarted(u) => return self.apply_undo_started(u).into_iter().collect(),
            EffectKind::UndoEnded(vm_id) => self.apply_undo_ended(vm_id),
            EffectKind::BackupWritten(b) => {
                if let Some(r) = self.schedule_runs.get_mut(&b.schedule) {
                    r.backup_tried_snapshot_id = b.snapshot_id.clone();
                    if b.written {
                        r.backup_snapshot_id = b.snapshot_id.clone();
                    }
                }
            }
            EffectKind::MoveVm(m) => {
                // The migration ended with the VM running on the destination: recorded
                // now, so the next action on it (another migration) does not meet the
                // source's last word, "migrating", until the destination's heartbeat.
                if let Some(vm) = self.vms.get_mut(&m.vm_id) {
                    vm.host_id = m.to_host_id.clone();
                    vm.power_state = hpb::PowerState::Running as i32;
                }
            }
        }
        Vec::new()
    }
}
