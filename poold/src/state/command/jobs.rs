//! The long operations the log carries: a job's spec (one kind per operation), its steps
//! and its end, with the effects a finished job makes on the state. Declared here so
//! `command.rs` stays a table of the log's commands; the apply is in `state/jobs.rs`.

use proto::coordinator as pb;

use super::{CreateVm, UpdateVm};

/// A long operation: what was asked, and what its finished steps produced. Kept in the
/// state while it runs, so a new leader resumes it (every step is idempotent).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Job {
    #[prost(string, tag = "1")]
    pub task_id: String,
    /// Step outputs committed so far (step name → value, e.g. a volume id).
    #[prost(map = "string, string", tag = "2")]
    pub outputs: std::collections::HashMap<String, String>,
    #[prost(bool, tag = "3")]
    pub cancel_requested: bool,
    #[prost(
        oneof = "JobSpec",
        tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26"
    )]
    pub spec: Option<JobSpec>,
}

impl Job {
    pub fn kind(&self) -> &'static str {
        match &self.spec {
            Some(JobSpec::CreateSr(_)) => "sr.create",
            Some(JobSpec::Volume(v)) => match VolumeAction::try_from(v.action) {
                Ok(VolumeAction::Create) => "volume.create",
                Ok(VolumeAction::Resize) => "volume.resize",
                Ok(VolumeAction::Snapshot) => "volume.snapshot",
                Ok(VolumeAction::Clone) => "volume.clone",
                Ok(VolumeAction::Revert) => "volume.revert",
                Ok(VolumeAction::Delete) => "volume.delete",
                _ => "volume.unknown",
            },
            Some(JobSpec::VmFromTemplate(_)) => "vm.create",
            Some(JobSpec::TemplateFromVm(_)) => "template.create",
            Some(JobSpec::SnapshotVm(_)) => "vm.snapshot",
            Some(JobSpec::RevertVm(_)) => "vm.revert",
            Some(JobSpec::DeleteVmSnapshot(_)) => "vm.snapshot.delete",
            Some(JobSpec::CloneVm(_)) => "vm.clone",
            Some(JobSpec::DestroyVm(_)) => "vm.destroy",
            Some(JobSpec::MigrateVm(_)) => "vm.migrate",
            Some(JobSpec::FenceHost(_)) => "host.fence",
            Some(JobSpec::RebootVm(_)) => "vm.reboot",
            Some(JobSpec::SuspendVm(j)) if !j.resume_on_host_id.is_empty() => "vm.migrate.quick",
            Some(JobSpec::SuspendVm(_)) => "vm.suspend",
            Some(JobSpec::ResumeVm(_)) => "vm.resume",
            Some(JobSpec::StartUndoVm(_)) => "vm.start",
            Some(JobSpec::EndUndo(j)) if j.commit => "vm.undo.commit",
            Some(JobSpec::EndUndo(_)) => "vm.undo.discard",
            Some(JobSpec::BackupVm(_)) => "vm.backup",
            None => "job.empty",
        }
    }

    /// The existing VM this job holds: no other job may work on it meanwhile, and
    /// reconciliation leaves it alone (a snapshot pauses it, a migration moves it).
    pub fn busy_vm(&self) -> Option<&str> {
        match &self.spec {
            Some(JobSpec::TemplateFromVm(j)) => Some(&j.vm_id),
            Some(JobSpec::SnapshotVm(j)) => Some(&j.vm_id),
            Some(JobSpec::RevertVm(j)) => Some(&j.vm_id),
            Some(JobSpec::DeleteVmSnapshot(j)) => Some(&j.vm_id),
            Some(JobSpec::DestroyVm(j)) => Some(&j.vm_id),
            Some(JobSpec::MigrateVm(j)) => Some(&j.vm_id),
            Some(JobSpec::RebootVm(j)) => Some(&j.vm_id),
            Some(JobSpec::CloneVm(j)) => Some(&j.source_id),
            Some(JobSpec::SuspendVm(j)) => Some(&j.vm_id),
            Some(JobSpec::ResumeVm(j)) => Some(&j.vm_id),
            Some(JobSpec::StartUndoVm(j)) => Some(&j.vm_id),
            Some(JobSpec::EndUndo(j)) => Some(&j.vm_id),
            _ => None,
        }
    }

    /// Whether reconciliation must leave the VM alone while this job runs (it pauses the
    /// VM, moves it between hosts, or saves or restores it: a suspended VM's host reports
    /// it stopped, a resumed one's, or one reverted to a checkpoint, runs it before the
    /// pool places it there).
    pub fn holds_vm_still(&self) -> bool {
        matches!(
            &self.spec,
            Some(JobSpec::SnapshotVm(_))
                | Some(JobSpec::MigrateVm(_))
                | Some(JobSpec::CloneVm(_))
                | Some(JobSpec::RebootVm(_))
                | Some(JobSpec::SuspendVm(_))
                | Some(JobSpec::ResumeVm(_))
                | Some(JobSpec::RevertVm(_))
        )
    }
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum JobSpec {
    #[prost(message, tag = "10")]
    CreateSr(CreateSrJob),
    #[prost(message, tag = "11")]
    Volume(VolumeJob),
    #[prost(message, tag = "12")]
    VmFromTemplate(VmFromTemplateJob),
    #[prost(message, tag = "13")]
    TemplateFromVm(TemplateFromVmJob),
    #[prost(message, tag = "14")]
    SnapshotVm(SnapshotVmJob),
    #[prost(message, tag = "15")]
    RevertVm(RevertVmJob),
    #[prost(message, tag = "16")]
    CloneVm(CloneVmJob),
    #[prost(message, tag = "17")]
    DestroyVm(DestroyVmJob),
    #[prost(message, tag = "18")]
    MigrateVm(MigrateVmJob),
    #[prost(message, tag = "19")]
    FenceHost(FenceHostJob),
    #[prost(message, tag = "20")]
    RebootVm(RebootVmJob),
    #[prost(message, tag = "21")]
    DeleteVmSnapshot(DeleteVmSnapshotJob),
    #[prost(message, tag = "22")]
    SuspendVm(SuspendVmJob),
    #[prost(message, tag = "23")]
    ResumeVm(ResumeVmJob),
    #[prost(message, tag = "24")]
    StartUndoVm(StartUndoVmJob),
    #[prost(message, tag = "25")]
    EndUndo(EndUndoJob),
    #[prost(message, tag = "26")]
    BackupVm(BackupVmJob),
}

/// Writes a VM snapshot as the next point of a backup chain (a backup schedule's; see
/// `jobs::backup`). It holds no VM: the snapshot is read while the VM carries on.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BackupVmJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub snapshot_id: String,
    /// The chain's directory, on the leader.
    #[prost(string, tag = "3")]
    pub directory: String,
    #[prost(string, tag = "4")]
    pub schedule: String,
    /// Which points stay after this one is written.
    #[prost(message, optional, tag = "5")]
    pub retention: Option<pb::Retention>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateSrJob {
    /// The repository as it will be recorded (thin_pool_id empty until created).
    #[prost(message, optional, tag = "1")]
    pub sr: Option<pb::StorageRepository>,
    #[prost(message, optional, tag = "2")]
    pub create_pool: Option<proto::storage::CreatePoolRequest>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum VolumeAction {
    Unspecified = 0,
    Create = 1,
    Resize = 2,
    Snapshot = 3,
    Clone = 4,
    Revert = 5,
    Delete = 6,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VolumeJob {
    #[prost(enumeration = "VolumeAction", tag = "1")]
    pub action: i32,
    /// The volume acted on (resize, snapshot, clone source, revert, delete).
    #[prost(string, tag = "2")]
    pub volume_id: String,
    /// Create: the repository.
    #[prost(string, tag = "3")]
    pub sr_id: String,
    /// Create, snapshot, clone: the new volume's name.
    #[prost(string, tag = "4")]
    pub name: String,
    /// Create, resize.
    #[prost(uint64, tag = "5")]
    pub size_bytes: u64,
    #[prost(map = "string, string", tag = "6")]
    pub labels: std::collections::HashMap<String, String>,
    /// Revert: the snapshot.
    #[prost(string, tag = "7")]
    pub snapshot_id: String,
    /// Resize: allow shrinking.
    #[prost(bool, tag = "8")]
    pub force: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VmFromTemplateJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub template_id: String,
    /// The template's spec with the VM's name; disks are filled in by the job.
    #[prost(message, optional, tag = "3")]
    pub spec: Option<pb::VmSpec>,
    /// Repository of the cloned disks; empty: each template disk's own.
    #[prost(string, tag = "4")]
    pub sr_id: String,
    #[prost(bool, tag = "5")]
    pub start: bool,
    #[prost(string, tag = "6")]
    pub host_id: String,
    /// The client's request id, from which the start's own id is derived.
    #[prost(string, tag = "7")]
    pub request_id: String,
    /// The VM's VIFs, as in [`CreateVm::vifs`].
    #[prost(message, repeated, tag = "8")]
    pub vifs: Vec<pb::Vif>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct TemplateFromVmJob {
    #[prost(string, tag = "1")]
    pub template_id: String,
    #[prost(string, tag = "2")]
    pub vm_id: String,
    #[prost(string, tag = "3")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotVmJob {
    #[prost(string, tag = "1")]
    pub snapshot_id: String,
    #[prost(string, tag = "2")]
    pub vm_id: String,
    #[prost(string, tag = "3")]
    pub name: String,
    /// A checkpoint: memory and device state saved too (see `jobs::checkpoint`).
    #[prost(bool, tag = "4")]
    pub memory: bool,
    /// The schedule taking it (its retention may delete it later); empty for a person's.
    #[prost(string, tag = "5")]
    pub schedule: String,
}

/// A job a schedule starts (see `crate::schedules`). A run (`due_at_ms` set) is recorded
/// as the schedule's last even when the job is refused, which then shows as a failed task:
/// a schedule whose VM cannot be snapshotted says so once per period, not once a second.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScheduleJob {
    #[prost(string, tag = "1")]
    pub schedule: String,
    /// The instant the run was due; 0 for a retention delete or a run asked for by a person.
    #[prost(uint64, tag = "2")]
    pub due_at_ms: u64,
    /// A run a person asked for (RunSchedule): recorded as the last task, not as the last due.
    #[prost(bool, tag = "3")]
    pub manual: bool,
    #[prost(message, optional, tag = "4")]
    pub job: Option<Job>,
}

/// A schedule's last run.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScheduleRun {
    #[prost(uint64, tag = "1")]
    pub last_due_ms: u64,
    #[prost(string, tag = "2")]
    pub last_task_id: String,
    #[prost(string, tag = "3")]
    pub schedule: String,
    /// A backup schedule's snapshot that its chain's newest point was read from: the
    /// next point's base, which its retention never deletes.
    #[prost(string, tag = "4")]
    pub backup_snapshot_id: String,
    /// The last snapshot a backup job was run for, written or not: each is tried once.
    #[prost(string, tag = "5")]
    pub backup_tried_snapshot_id: String,
}

/// A backup job's end, for its schedule's record.
#[derive(Clone, PartialEq, prost::Message)]
pub struct BackupWritten {
    #[prost(string, tag = "1")]
    pub schedule: String,
    #[prost(string, tag = "2")]
    pub snapshot_id: String,
    #[prost(bool, tag = "3")]
    pub written: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RevertVmJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub snapshot_id: String,
    /// A checkpoint's VM is restored here (placed by the call); empty for a disk snapshot.
    #[prost(string, tag = "3")]
    pub host_id: String,
}

/// Deletes a VM snapshot and its disk snapshots; its children take its parent.
#[derive(Clone, PartialEq, prost::Message)]
pub struct DeleteVmSnapshotJob {
    #[prost(string, tag = "1")]
    pub snapshot_id: String,
    /// The snapshot's VM (held while the job runs, as a revert holds it); checked against
    /// the snapshot when the job starts.
    #[prost(string, tag = "2")]
    pub vm_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CloneVmJob {
    /// The new VM.
    #[prost(string, tag = "1")]
    pub vm_id: String,
    /// A VM or a VM snapshot.
    #[prost(string, tag = "2")]
    pub source_id: String,
    #[prost(string, tag = "3")]
    pub name: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct DestroyVmJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(bool, tag = "2")]
    pub delete_disks: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MigrateVmJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub source_host_id: String,
    #[prost(string, tag = "3")]
    pub destination_host_id: String,
    #[prost(uint32, tag = "4")]
    pub downtime_budget_ms: u32,
    #[prost(bool, tag = "5")]
    pub auto_converge: bool,
    /// One-time token the source presents to the destination.
    #[prost(string, tag = "6")]
    pub token: String,
    /// Part of a host evacuation: after the last VM, the host enters maintenance.
    #[prost(string, tag = "7")]
    pub evacuating_host_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FenceHostJob {
    #[prost(string, tag = "1")]
    pub host_id: String,
    /// The initiator whose access is revoked (the host's, as it last reported it).
    #[prost(string, tag = "2")]
    pub initiator_iqn: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RebootVmJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(bool, tag = "2")]
    pub force: bool,
}

/// Saves a running VM into a new state volume and stops it: it becomes SUSPENDED. With
/// `resume_on_host_id` (quick migration) it is then restored there, as [`ResumeVmJob`].
#[derive(Clone, PartialEq, prost::Message)]
pub struct SuspendVmJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    /// Where it runs when the job starts (checked then).
    #[prost(string, tag = "2")]
    pub host_id: String,
    #[prost(string, tag = "3")]
    pub resume_on_host_id: String,
}

/// Restores a SUSPENDED VM on `host_id` from its state volume, then deletes the volume.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResumeVmJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub host_id: String,
}

/// Starts a stopped VM whose undo disks lack an overlay: each gets one (a snapshot of its
/// volume, cloned), then the VM is placed on `host_id` to run (see `jobs::undo`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct StartUndoVmJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    /// Where it runs, placed by the call (checked again when the job ends).
    #[prost(string, tag = "2")]
    pub host_id: String,
}

/// Ends a stopped VM's pending undo changes: commits them into the disks' volumes, or
/// discards them; the overlays go either way.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EndUndoJob {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(bool, tag = "2")]
    pub commit: bool,
}

/// A start made the VM's undo overlays: recorded on the VM, which then runs on `host_id`
/// when that still fits (else it stays stopped, its overlays kept).
#[derive(Clone, PartialEq, prost::Message)]
pub struct UndoStarted {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(message, repeated, tag = "2")]
    pub overlays: Vec<pb::UndoOverlay>,
    #[prost(string, tag = "3")]
    pub host_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct JobStep {
    #[prost(string, tag = "1")]
    pub task_id: String,
    #[prost(uint32, tag = "2")]
    pub progress_percent: u32,
    #[prost(string, tag = "3")]
    pub status_message: String,
    #[prost(map = "string, string", tag = "4")]
    pub outputs: std::collections::HashMap<String, String>,
    /// Figures for the task's results (e.g. a migration's round).
    #[prost(map = "string, string", tag = "5")]
    pub results: std::collections::HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct FinishJob {
    #[prost(string, tag = "1")]
    pub task_id: String,
    /// A `tonic::Code` as i32; 0: succeeded and the effects apply.
    #[prost(int32, tag = "2")]
    pub code: i32,
    #[prost(string, tag = "3")]
    pub message: String,
    #[prost(message, repeated, tag = "4")]
    pub effects: Vec<Effect>,
    #[prost(map = "string, string", tag = "5")]
    pub results: std::collections::HashMap<String, String>,
    /// Non-empty: the object the task created (its target from now on).
    #[prost(string, tag = "6")]
    pub target_id: String,
}

/// One change a finished job makes to the pool state. Effects are built so that applying
/// them cannot fail: upserts, and removals that tolerate absence.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Effect {
    #[prost(
        oneof = "EffectKind",
        tags = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17"
    )]
    pub kind: Option<EffectKind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum EffectKind {
    /// Inserts or replaces a volume (its `pool_id` is the repository id).
    #[prost(message, tag = "1")]
    PutVolume(proto::storage::Volume),
    #[prost(string, tag = "2")]
    RemoveVolume(String),
    #[prost(message, tag = "3")]
    PutSr(pb::StorageRepository),
    /// A new VM (stopped).
    #[prost(message, tag = "4")]
    CreateVm(CreateVm),
    /// Replaces a VM's spec (revert).
    #[prost(message, tag = "5")]
    SetVmSpec(UpdateVm),
    #[prost(string, tag = "6")]
    RemoveVm(String),
    #[prost(message, tag = "7")]
    PutTemplate(pb::Template),
    /// Inserts or replaces a VM snapshot; a `parent_id` no longer in the state is cleared.
    #[prost(message, tag = "8")]
    PutVmSnapshot(pb::VmSnapshot),
    /// Removes a VM snapshot and re-parents what pointed at it: its children, and a VM
    /// whose current snapshot it was, take its `parent_id`.
    #[prost(string, tag = "9")]
    RemoveVmSnapshot(String),
    /// The host is cut off at the storage: it becomes FENCED and its VMs leave it (HA
    /// ones wait for a new placement, the others are stopped).
    #[prost(string, tag = "10")]
    HostFenced(String),
    /// A migration switched over: the VM now runs on `to`.
    #[prost(message, tag = "11")]
    MoveVm(MoveVm),
    /// The snapshot a VM's disks now come from (taken or reverted to); ignored when the
    /// VM or the snapshot is gone.
    #[prost(message, tag = "12")]
    SetCurrentSnapshot(SetCurrentSnapshot),
    /// The VM was saved into `state_volume_id` and stopped: SUSPENDED, on no host.
    #[prost(message, tag = "13")]
    VmSuspended(VmSuspended),
    /// The suspended VM runs on `to_host_id` again; it no longer has a state volume.
    #[prost(message, tag = "14")]
    VmResumed(MoveVm),
    /// A start made undo overlays (see [`UndoStarted`]).
    #[prost(message, tag = "15")]
    UndoStarted(UndoStarted),
    /// The VM's undo changes were committed or discarded: it has no overlay any more.
    #[prost(string, tag = "16")]
    UndoEnded(String),
    /// A backup job ended: its schedule tried the snapshot, and wrote it or not.
    #[prost(message, tag = "17")]
    BackupWritten(BackupWritten),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct VmSuspended {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub state_volume_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MoveVm {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub to_host_id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetCurrentSnapshot {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(string, tag = "2")]
    pub snapshot_id: String,
}
