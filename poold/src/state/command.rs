//! The commands the Raft log carries, and their results: protobuf messages declared here
//! with prost's derive (no `.proto` file: they never leave the coordinator group).
//!
//! A command carries everything its apply needs that is not in the state: the time the
//! proposer stamped, the ids it generated, the host a placement chose. Apply never reads a
//! clock or a random source, so every member reaches the same state from the same log.
//!
//! Field numbers are the format: new fields get new numbers, none is reused.

use proto::coordinator as pb;
use proto::host as hpb;

mod jobs;
mod trust;
mod users;
pub use jobs::{
    BackupVmJob, BackupWritten, CloneVmJob, CreateSrJob, DeleteVmSnapshotJob, DestroyVmJob, Effect,
    EffectKind, EndUndoJob, FenceHostJob, FinishJob, Job, JobSpec, JobStep, MigrateVmJob, MoveVm,
    RebootVmJob, ResumeVmJob, RevertVmJob, ScheduleJob, ScheduleRun, SetCurrentSnapshot,
    SnapshotVmJob, StartUndoVmJob, SuspendVmJob, TemplateFromVmJob, UndoStarted, VmFromTemplateJob,
    VmSuspended, VolumeAction, VolumeJob,
};
pub use trust::{
    CaRollRecord, FinishCaRoll, IssuedRecord, JoinTokenRecord, PoolCaRecord, RedeemJoinToken,
    StartCaRoll,
};
pub use users::{CreateUser, SetRole, UserChange};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Command {
    /// The client's idempotency key; empty for internal commands.
    #[prost(string, tag = "1")]
    pub request_id: String,
    /// Milliseconds since the Unix epoch, from the proposer's clock.
    #[prost(uint64, tag = "2")]
    pub at_ms: u64,
    /// The task this command starts.
    #[prost(string, tag = "3")]
    pub task_id: String,
    #[prost(string, tag = "4")]
    pub requested_by: String,
    /// The gRPC method a person called (e.g. "StartVm"); empty for internal commands.
    /// A command with a method is written to the audit log when it is applied.
    #[prost(string, tag = "5")]
    pub method: String,
    /// The caller's address, for the audit log.
    #[prost(string, tag = "6")]
    pub peer: String,
    #[prost(
        oneof = "Op",
        tags = "10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51"
    )]
    pub op: Option<Op>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Op {
    #[prost(message, tag = "10")]
    UpdateSettings(pb::PoolSettings),
    #[prost(message, tag = "11")]
    SetHa(pb::HaSettings),
    #[prost(message, tag = "12")]
    JoinHost(JoinHost),
    #[prost(message, tag = "13")]
    SetHostState(SetHostState),
    #[prost(message, tag = "14")]
    RemoveHost(ObjectId),
    #[prost(message, tag = "15")]
    HostReport(HostReport),
    #[prost(message, tag = "16")]
    MarkUnreachable(MarkUnreachable),
    #[prost(message, tag = "17")]
    CreateSr(pb::StorageRepository),
    #[prost(message, tag = "18")]
    RemoveSr(ObjectId),
    #[prost(message, tag = "19")]
    CreateVm(CreateVm),
    #[prost(message, tag = "20")]
    UpdateVm(UpdateVm),
    #[prost(message, tag = "21")]
    SetVmPower(SetVmPower),
    #[prost(message, tag = "22")]
    DestroyVm(ObjectId),
    #[prost(message, tag = "23")]
    CreateVolume(CreateVolume),
    #[prost(message, tag = "24")]
    DeleteVolume(ObjectId),
    #[prost(message, tag = "25")]
    CreateTemplate(pb::Template),
    #[prost(message, tag = "26")]
    DeleteTemplate(ObjectId),
    /// Starts a long operation that the leader carries out (see `crate::jobs`).
    #[prost(message, tag = "27")]
    StartJob(Job),
    /// A job's progress and the outputs of the steps it finished.
    #[prost(message, tag = "28")]
    JobStep(JobStep),
    /// A job's end: its effects on the pool state, or its error.
    #[prost(message, tag = "29")]
    FinishJob(FinishJob),
    #[prost(message, tag = "30")]
    CancelJob(ObjectId),
    /// A call refused before it reached the log (permission, bad input), kept for audit.
    #[prost(message, tag = "31")]
    Audit(pb::AuditEvent),
    #[prost(message, tag = "32")]
    CreateUser(CreateUser),
    #[prost(message, tag = "33")]
    DeleteUser(ObjectId),
    /// A change to one user: a role, a password, or a revocation of its tokens.
    #[prost(message, tag = "34")]
    SetRole(SetRole),
    /// Figures storaged reported: repository usage and reachability, volume allocation.
    #[prost(message, tag = "35")]
    StorageRefresh(StorageRefresh),
    /// The pool's CA, committed once by the member founded with it (`--found-ca`).
    #[prost(message, tag = "36")]
    SetPoolCa(PoolCaRecord),
    /// A new join token's record (its secret went to the pool-admin who asked, only).
    #[prost(message, tag = "37")]
    CreateJoinToken(JoinTokenRecord),
    /// A join token spent, before its certificate is signed.
    #[prost(message, tag = "38")]
    RedeemJoinToken(RedeemJoinToken),
    #[prost(message, tag = "39")]
    StartCaRoll(StartCaRoll),
    #[prost(message, tag = "40")]
    FinishCaRoll(FinishCaRoll),
    /// A certificate signed at a join or renewal, recorded after signing.
    #[prost(message, tag = "41")]
    RecordIssued(IssuedRecord),
    /// A network with its proposer-made id (the VNI of a private one is chosen at apply).
    #[prost(message, tag = "42")]
    CreateNetwork(pb::Network),
    #[prost(message, tag = "43")]
    DestroyNetwork(ObjectId),
    /// A VIF with its proposer-made id; an empty MAC is assigned at apply.
    #[prost(message, tag = "44")]
    CreateVif(pb::Vif),
    #[prost(message, tag = "45")]
    DestroyVif(ObjectId),
    /// An alert taken off the open list by a person.
    #[prost(message, tag = "46")]
    DismissAlert(ObjectId),
    /// A schedule added or replaced (by name) in the settings.
    #[prost(message, tag = "47")]
    SetSchedule(pb::Schedule),
    /// A schedule removed by name (`id`); its snapshots stay.
    #[prost(message, tag = "48")]
    DeleteSchedule(ObjectId),
    /// A job a schedule starts: a run (recorded even when refused) or a retention delete.
    #[prost(message, tag = "49")]
    ScheduleJob(ScheduleJob),
    #[prost(message, tag = "50")]
    UpdateVif(UpdateVif),
    #[prost(message, tag = "51")]
    UpdateNetwork(UpdateNetwork),
}

impl Op {
    /// The task kind people see, e.g. "vm.create".
    pub fn kind(&self) -> &'static str {
        match self {
            Op::UpdateSettings(_) => "pool.update_settings",
            Op::SetHa(_) => "pool.set_ha",
            Op::JoinHost(_) => "host.join",
            Op::SetHostState(s) => match pb::HostState::try_from(s.state) {
                Ok(pb::HostState::Enabled) => "host.enable",
                Ok(pb::HostState::Disabled) => "host.disable",
                Ok(pb::HostState::Maintenance) => "host.maintenance",
                _ => "host.set_state",
            },
            Op::RemoveHost(_) => "host.remove",
            Op::HostReport(_) => "host.report",
            Op::MarkUnreachable(_) => "host.mark_unreachable",
            Op::CreateSr(_) => "sr.create",
            Op::RemoveSr(_) => "sr.remove",
            Op::CreateVm(_) => "vm.create",
            Op::UpdateVm(_) => "vm.update",
            Op::SetVmPower(p) => match hpb::PowerState::try_from(p.desired) {
                Ok(hpb::PowerState::Running) if p.ha_restart => "vm.ha_restart",
                Ok(hpb::PowerState::Running) if p.reboot => "vm.reboot",
                Ok(hpb::PowerState::Running) => "vm.start",
                Ok(hpb::PowerState::Stopped) => "vm.shutdown",
                Ok(hpb::PowerState::Paused) => "vm.pause",
                _ => "vm.power",
            },
            Op::DestroyVm(_) => "vm.destroy",
            Op::CreateVolume(_) => "volume.create",
            Op::DeleteVolume(_) => "volume.delete",
            Op::CreateTemplate(_) => "template.create",
            Op::DeleteTemplate(_) => "template.delete",
            Op::StartJob(j) => j.kind(),
            Op::JobStep(_) => "job.step",
            Op::FinishJob(_) => "job.finish",
            Op::CancelJob(_) => "task.cancel",
            Op::Audit(_) => "audit",
            Op::CreateUser(_) => "user.create",
            Op::DeleteUser(_) => "user.delete",
            Op::SetRole(r) => match r.change() {
                UserChange::Role { grant: true, .. } => "user.grant_role",
                UserChange::Role { .. } => "user.revoke_role",
                UserChange::Password { .. } => "user.set_password",
                UserChange::RevokeTokens { .. } => "user.revoke_tokens",
            },
            Op::StorageRefresh(_) => "sr.refresh",
            Op::SetPoolCa(_) => "pool.set_ca",
            Op::CreateJoinToken(_) => "pool.create_join_token",
            Op::RedeemJoinToken(_) => "pool.join",
            Op::StartCaRoll(_) => "pool.rotate_ca",
            Op::FinishCaRoll(_) => "pool.finish_ca_roll",
            Op::RecordIssued(_) => "pool.certificate_issued",
            Op::CreateNetwork(_) => "network.create",
            Op::DestroyNetwork(_) => "network.destroy",
            Op::CreateVif(_) => "vif.create",
            Op::DestroyVif(_) => "vif.destroy",
            Op::UpdateVif(_) => "vif.update",
            Op::UpdateNetwork(_) => "network.update",
            Op::DismissAlert(_) => "alert.dismiss",
            Op::SetSchedule(_) => "schedule.set",
            Op::DeleteSchedule(_) => "schedule.delete",
            Op::ScheduleJob(j) => j.job.as_ref().map_or("job.empty", Job::kind),
        }
    }
}

/// A stopped VM's VIF changed: its addresses where `ipv4` is present.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateVif {
    #[prost(string, tag = "1")]
    pub vif_id: String,
    #[prost(message, optional, tag = "2")]
    pub ipv4: Option<pb::VifAddresses>,
}

/// A network changed: its address ranges where `ranges` is present.
#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateNetwork {
    #[prost(string, tag = "1")]
    pub network_id: String,
    #[prost(message, optional, tag = "2")]
    pub ranges: Option<pb::NetworkRanges>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ObjectId {
    #[prost(string, tag = "1")]
    pub id: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct JoinHost {
    #[prost(string, tag = "1")]
    pub host_id: String,
    #[prost(string, tag = "2")]
    pub name: String,
    #[prost(string, tag = "3")]
    pub address: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetHostState {
    #[prost(string, tag = "1")]
    pub host_id: String,
    /// A `pool.v1.HostState`.
    #[prost(int32, tag = "2")]
    pub state: i32,
}

/// What a heartbeat changed, committed by the leader (heartbeats that change nothing stay
/// in the leader's memory).
#[derive(Clone, PartialEq, prost::Message)]
pub struct HostReport {
    #[prost(string, tag = "1")]
    pub host_id: String,
    #[prost(message, optional, tag = "2")]
    pub info: Option<hpb::HostInfo>,
    #[prost(message, optional, tag = "3")]
    pub metrics: Option<hpb::HostMetrics>,
    #[prost(message, repeated, tag = "4")]
    pub vms: Vec<ReportedVm>,
    /// The host's NICs, taken when `nics_known` (see `pool.v1.HeartbeatRequest`).
    #[prost(string, repeated, tag = "5")]
    pub nics: Vec<String>,
    #[prost(bool, tag = "6")]
    pub nics_known: bool,
    /// Samples taken between the previous committed report and this one, oldest first,
    /// for the metrics history's finest tier (`history.rs`); `metrics` is the newest.
    #[prost(message, repeated, tag = "7")]
    pub earlier_metrics: Vec<hpb::HostMetrics>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ReportedVm {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    /// A `pool.host.v1.PowerState`.
    #[prost(int32, tag = "2")]
    pub power_state: i32,
    #[prost(int32, tag = "3")]
    pub last_stop_reason: i32,
    /// When the host's run of the VM began (unix ms, the host's clock; 0: never ran
    /// there, or a report from before the field). Tells a stop the pool already took from
    /// a new one.
    #[prost(uint64, tag = "4")]
    pub started_at_ms: u64,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct MarkUnreachable {
    #[prost(string, repeated, tag = "1")]
    pub host_ids: Vec<String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateVm {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(message, optional, tag = "2")]
    pub spec: Option<pb::VmSpec>,
    #[prost(string, tag = "3")]
    pub template_id: String,
    /// Non-empty: start at once on this host (placed by the leader before proposing).
    #[prost(string, tag = "4")]
    pub start_on_host: String,
    /// Its VIFs: network ids, and MACs, ids and limits where given (see
    /// `PoolState::new_vifs`).
    #[prost(message, repeated, tag = "5")]
    pub vifs: Vec<pb::Vif>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UpdateVm {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    #[prost(message, optional, tag = "2")]
    pub spec: Option<pb::VmSpec>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SetVmPower {
    #[prost(string, tag = "1")]
    pub vm_id: String,
    /// A `pool.host.v1.PowerState`: RUNNING, STOPPED or PAUSED.
    #[prost(int32, tag = "2")]
    pub desired: i32,
    /// For a start: the host the scheduler chose (checked again at apply).
    #[prost(string, tag = "3")]
    pub host_id: String,
    #[prost(bool, tag = "4")]
    pub force: bool,
    #[prost(bool, tag = "5")]
    pub reboot: bool,
    /// Placed by HA after its host was fenced.
    #[prost(bool, tag = "6")]
    pub ha_restart: bool,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct CreateVolume {
    #[prost(string, tag = "1")]
    pub volume_id: String,
    #[prost(string, tag = "2")]
    pub sr_id: String,
    #[prost(string, tag = "3")]
    pub name: String,
    #[prost(uint64, tag = "4")]
    pub virtual_size_bytes: u64,
    #[prost(map = "string, string", tag = "5")]
    pub labels: std::collections::HashMap<String, String>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct StorageRefresh {
    #[prost(message, repeated, tag = "1")]
    pub srs: Vec<SrFigures>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SrFigures {
    #[prost(string, tag = "1")]
    pub sr_id: String,
    #[prost(bool, tag = "2")]
    pub reachable: bool,
    #[prost(message, optional, tag = "3")]
    pub usage: Option<proto::storage::PoolUsage>,
    #[prost(string, repeated, tag = "4")]
    pub portals: Vec<String>,
    /// Volumes as storaged reports them (only those the pool knows are updated).
    #[prost(message, repeated, tag = "5")]
    pub volumes: Vec<proto::storage::Volume>,
}

/// The outcome of one command, returned to the proposer and kept under the request id.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CommandResult {
    #[prost(message, optional, tag = "1")]
    pub task: Option<pb::Task>,
    /// A `tonic::Code` as i32; 0 = OK.
    #[prost(int32, tag = "2")]
    pub code: i32,
    #[prost(string, tag = "3")]
    pub message: String,
    /// In a remembered result: the task's id, stored instead of the task itself (which
    /// lives in the task list while it is kept).
    #[prost(string, tag = "4")]
    pub task_id: String,
}

impl CommandResult {
    pub fn ok(task: pb::Task) -> Self {
        CommandResult {
            task: Some(task),
            code: 0,
            message: String::new(),
            task_id: String::new(),
        }
    }

    pub fn error(code: tonic::Code, message: impl Into<String>) -> Self {
        CommandResult {
            task: None,
            code: code as i32,
            message: message.into(),
            task_id: String::new(),
        }
    }

    pub fn into_status(self) -> Result<pb::Task, tonic::Status> {
        if self.code == 0 {
            Ok(self.task.unwrap_or_default())
        } else {
            Err(tonic::Status::new(
                tonic::Code::from(self.code),
                self.message,
            ))
        }
    }
}

/// A member's address, carried in the context of a conf change entry.
#[derive(Clone, PartialEq, prost::Message)]
pub struct MemberChange {
    #[prost(message, repeated, tag = "1")]
    pub members: Vec<MemberRecord>,
    #[prost(string, tag = "2")]
    pub request_id: String,
    #[prost(string, tag = "3")]
    pub task_id: String,
    #[prost(uint64, tag = "4")]
    pub at_ms: u64,
}

#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct MemberRecord {
    #[prost(uint64, tag = "1")]
    pub id: u64,
    #[prost(string, tag = "2")]
    pub address: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn command_round_trips() {
        let c = Command {
            request_id: "r".into(),
            at_ms: 42,
            task_id: "t".into(),
            requested_by: "admin".into(),
            method: String::new(),
            peer: String::new(),
            op: Some(Op::SetVmPower(SetVmPower {
                vm_id: "vm".into(),
                desired: hpb::PowerState::Running as i32,
                host_id: "h".into(),
                force: false,
                reboot: false,
                ha_restart: false,
            })),
        };
        let back = Command::decode(c.encode_to_vec().as_slice()).unwrap();
        assert_eq!(back, c);
        assert_eq!(back.op.unwrap().kind(), "vm.start");
    }

    /// Every job and effect variant survives the log: a oneof's `tags` list left behind
    /// decodes a new variant as nothing ("empty job").
    #[test]
    fn the_newest_job_and_effect_round_trip() {
        let job = Op::ScheduleJob(ScheduleJob {
            schedule: "nb".into(),
            job: Some(Job {
                spec: Some(JobSpec::BackupVm(BackupVmJob {
                    vm_id: "vm".into(),
                    snapshot_id: "s".into(),
                    directory: "/b".into(),
                    schedule: "nb".into(),
                    retention: None,
                })),
                ..Default::default()
            }),
            ..Default::default()
        });
        let finish = Op::FinishJob(FinishJob {
            task_id: "t".into(),
            effects: vec![Effect {
                kind: Some(EffectKind::BackupWritten(BackupWritten {
                    schedule: "nb".into(),
                    snapshot_id: "s".into(),
                    written: true,
                })),
            }],
            ..Default::default()
        });
        for op in [job, finish] {
            let c = Command {
                op: Some(op),
                ..Default::default()
            };
            assert_eq!(Command::decode(c.encode_to_vec().as_slice()).unwrap(), c);
        }
    }

    /// An `Op` variant whose tag the `Command.op` list lacks decodes as nothing ("empty
    /// command") after it crossed the log.
    #[test]
    fn every_op_is_in_the_commands_tag_list() {
        use prost::encoding::{DecodeContext, WireType, encode_key};
        let mut ops = 0;
        for tag in 1..=100u32 {
            // The derive panics on a tag it does not know.
            let known = std::panic::catch_unwind(|| {
                let mut op = None;
                let mut empty: &[u8] = &[0];
                Op::merge(
                    &mut op,
                    tag,
                    WireType::LengthDelimited,
                    &mut empty,
                    DecodeContext::default(),
                )
                .is_ok()
            })
            .unwrap_or(false);
            if !known {
                continue;
            }
            ops += 1;
            let mut bytes = Vec::new();
            encode_key(tag, WireType::LengthDelimited, &mut bytes);
            bytes.push(0);
            let c = Command::decode(bytes.as_slice()).unwrap();
            assert!(
                c.op.is_some(),
                "Op tag {tag} is missing from Command's list"
            );
        }
        assert!(ops > 40, "found {ops} Op variants");
    }

    /// `SetRole` as logs written before passwords and tokens could change held it.
    #[derive(Clone, PartialEq, prost::Message)]
    struct OldSetRole {
        #[prost(string, tag = "1")]
        user_id: String,
        #[prost(int32, tag = "2")]
        role: i32,
        #[prost(bool, tag = "3")]
        grant: bool,
    }

    #[test]
    fn user_changes_decode_old_entries_as_role_changes() {
        let old = OldSetRole {
            user_id: "u".into(),
            role: pb::Role::VmAdmin as i32,
            grant: true,
        };
        let r = SetRole::decode(old.encode_to_vec().as_slice()).unwrap();
        assert_eq!(
            r.change(),
            UserChange::Role {
                role: pb::Role::VmAdmin as i32,
                grant: true
            }
        );
        let kinds = [
            (SetRole::default(), "user.revoke_role"),
            (
                SetRole {
                    credential: "c".into(),
                    ..Default::default()
                },
                "user.set_password",
            ),
            (
                SetRole {
                    token_stamp: "s".into(),
                    ..Default::default()
                },
                "user.revoke_tokens",
            ),
        ];
        for (r, kind) in kinds {
            let back = SetRole::decode(r.encode_to_vec().as_slice()).unwrap();
            assert_eq!(Op::SetRole(back).kind(), kind);
        }
    }
}
