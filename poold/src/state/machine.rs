//! The pool state machine: what every member agrees on, changed only by applying committed
//! commands in log order. This file holds the state itself and [`PoolState::apply`]: the
//! request ids it remembers, the tasks it records, and the dispatch of each operation to
//! the file that owns its objects (see [`super`]).

// A rejected command's `CommandResult` is the very value returned to the proposer (and
// stored under its request id); boxing it on this cold path would buy nothing.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use proto::coordinator as pb;
use tonic::Code;

use super::changes::{FeedMarks, Tracked};
use super::command::*;
use super::placement::Allocation;

/// Finished tasks kept for GetTask/ListTasks; older ones are forgotten first.
pub const TASKS_KEPT: usize = 10_000;
/// How long a request id is remembered: a retry later than this acts again. Clients
/// retry for seconds, not hours.
pub const REQUEST_TTL_MS: u64 = 3600 * 1000;
/// Request ids kept at most, whatever their age.
pub const REQUESTS_KEPT: usize = 100_000;

/// A remembered request: its kind (a retry must ask the same thing) and its result, with
/// the task's id in place of the task. Kept small on purpose: every write adds one, the
/// map holds up to [`REQUESTS_KEPT`] of them, and growing or rehashing it moves them all.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestRecord {
    pub at_ms: u64,
    pub kind: String,
    pub code: i32,
    pub message: String,
    pub task_id: String,
}

impl RequestRecord {
    pub fn new(at_ms: u64, kind: &str, result: &CommandResult) -> Self {
        RequestRecord {
            at_ms,
            kind: kind.to_owned(),
            code: result.code,
            message: result.message.clone(),
            task_id: match &result.task {
                Some(t) => t.id.clone(),
                None => result.task_id.clone(),
            },
        }
    }

    /// The compact result as snapshots store it: the task's id instead of the task.
    pub fn result(&self) -> CommandResult {
        CommandResult {
            task: None,
            code: self.code,
            message: self.message.clone(),
            task_id: self.task_id.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolState {
    pub pool_id: String,
    pub settings: pb::PoolSettings,
    pub ha: pb::HaSettings,
    /// Coordinator members and their addresses.
    pub members: BTreeMap<u64, String>,
    pub hosts: Tracked<pb::Host>,
    pub srs: Tracked<pb::StorageRepository>,
    pub volumes: Tracked<proto::storage::Volume>,
    pub vms: Tracked<pb::Vm>,
    pub templates: Tracked<pb::Template>,
    pub tasks: Tracked<Box<pb::Task>>,
    /// Task ids in creation order, for pruning.
    pub task_order: VecDeque<String>,
    /// Looked up on every write (a hash, not a tree of string compares); their order
    /// is `request_order`.
    pub requests: HashMap<String, RequestRecord>,
    pub request_order: VecDeque<(u64, String)>,
    /// Raft index of the last applied entry.
    pub applied_index: u64,
    /// Derived: allocations per host.
    pub alloc: BTreeMap<String, Allocation>,
    /// Long operations the leader carries out, by task id.
    pub jobs: BTreeMap<String, Job>,
    pub vm_snapshots: Tracked<pb::VmSnapshot>,
    /// Each schedule's last run, by schedule name (see [`super::schedules`]).
    pub schedule_runs: BTreeMap<String, ScheduleRun>,
    pub users: Tracked<UserRecord>,
    /// Key that signs login tokens; set with the first user.
    pub token_key: Vec<u8>,
    /// Newest last; at most [`AUDIT_KEPT`].
    pub audit: VecDeque<pb::AuditEvent>,
    /// VMs whose shutdown was asked with force (cleared once they stop).
    pub force_stop: BTreeSet<String>,
    /// The pool's CA, when the pool was founded with it (see [`super::trust`]).
    pub pool_ca: Option<PoolCaRecord>,
    /// Join tokens not yet expired, by id: hashes, never secrets.
    pub join_tokens: BTreeMap<String, JoinTokenRecord>,
    /// The CA roll under way, if any: `pool_ca` is then the new CA.
    pub ca_roll: Option<CaRollRecord>,
    /// The latest certificate the pool issued to each identity, until it expires.
    pub issued: BTreeMap<String, IssuedRecord>,
    /// Guest networks by id (their VIFs live in the VMs).
    pub networks: Tracked<pb::Network>,
    /// Alerts by id (ids sort as raised; at most [`super::alerts::ALERTS_KEPT`]).
    pub alerts: Tracked<pb::Alert>,
    /// The last alert id handed out.
    pub alert_seq: u64,
    /// What the change feed has taken of the settings and the audit log (not part of the
    /// state: see [`super::changes`]).
    pub marks: FeedMarks,
}

/// A user and the hash of their password.
#[derive(Debug, Clone, PartialEq)]
pub struct UserRecord {
    pub user: pb::User,
    pub password_hash: String,
}

/// Audit events kept; older ones are forgotten first.
pub const AUDIT_KEPT: usize = 20_000;

impl Default for PoolState {
    fn default() -> Self {
        PoolState::new("", BTreeMap::new())
    }
}

/// What applying an operation did, for its task: the object it acted on, the state the
/// task is left in, and the task's status line.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Applied {
    pub target: String,
    pub state: pb::TaskState,
    pub message: String,
    /// The code name of a task that failed as it was applied (a scheduled run refused).
    pub error_code: String,
}

impl Applied {
    /// Done when applied: the task succeeds at once.
    pub(crate) fn done(target: impl Into<String>) -> Self {
        Applied {
            target: target.into(),
            state: pb::TaskState::Succeeded,
            message: String::new(),
            error_code: String::new(),
        }
    }

    /// Carried on by a job or a host: the task runs until they report.
    pub(crate) fn running(target: impl Into<String>, message: impl Into<String>) -> Self {
        Applied {
            target: target.into(),
            state: pb::TaskState::Running,
            message: message.into(),
            error_code: String::new(),
        }
    }

    /// Failed when applied: the task records the refusal, which changed nothing else.
    pub(crate) fn failed(target: impl Into<String>, refusal: &CommandResult) -> Self {
        Applied {
            target: target.into(),
            state: pb::TaskState::Failed,
            message: refusal.message.clone(),
            error_code: format!("{:?}", Code::from(refusal.code)),
        }
    }
}

/// A refusal: the command changes nothing and its caller hears `code`.
pub(crate) fn err(code: Code, msg: impl Into<String>) -> CommandResult {
    CommandResult::error(code, msg)
}

pub fn default_settings() -> pb::PoolSettings {
    pb::PoolSettings {
        name: "pool".into(),
        placement: pb::PlacementStrategy::Spread as i32,
        cpu_overcommit_percent: 400,
        memory_overcommit_percent: 100,
        host_heartbeat_timeout_seconds: 30,
        migration_downtime_budget_ms: 300,
        schedules: Vec::new(),
    }
}

impl PoolState {
    pub fn new(pool_id: &str, members: BTreeMap<u64, String>) -> Self {
        let mut s = PoolState {
            pool_id: pool_id.to_owned(),
            settings: default_settings(),
            ha: pb::HaSettings::default(),
            members,
            hosts: Tracked::default(),
            srs: Tracked::default(),
            volumes: Tracked::default(),
            vms: Tracked::default(),
            templates: Tracked::default(),
            tasks: Tracked::default(),
            task_order: VecDeque::new(),
            requests: HashMap::new(),
            request_order: VecDeque::new(),
            applied_index: 0,
            alloc: BTreeMap::new(),
            jobs: BTreeMap::new(),
            vm_snapshots: Tracked::default(),
            schedule_runs: BTreeMap::new(),
            users: Tracked::default(),
            token_key: Vec::new(),
            audit: VecDeque::new(),
            force_stop: BTreeSet::new(),
            pool_ca: None,
            join_tokens: BTreeMap::new(),
            ca_roll: None,
            issued: BTreeMap::new(),
            networks: Tracked::default(),
            alerts: Tracked::default(),
            alert_seq: 0,
            marks: FeedMarks::default(),
        };
        s.reserve_windows();
        s
    }

    /// A copy of the pool's objects (settings, members, hosts, storage, VMs, jobs...)
    /// without the history windows (remembered requests, tasks, audit events) nor the
    /// users nor the pool's trust: what the reconciler reads each round. A full clone would copy every
    /// remembered request, task and audit event under the state lock that the Raft
    /// task's apply waits for.
    pub fn clone_without_history(&self) -> PoolState {
        PoolState {
            pool_id: self.pool_id.clone(),
            settings: self.settings.clone(),
            ha: self.ha,
            members: self.members.clone(),
            hosts: self.hosts.clone(),
            srs: self.srs.clone(),
            volumes: self.volumes.clone(),
            vms: self.vms.clone(),
            templates: self.templates.clone(),
            tasks: Tracked::default(),
            task_order: VecDeque::new(),
            requests: HashMap::new(),
            request_order: VecDeque::new(),
            applied_index: self.applied_index,
            alloc: self.alloc.clone(),
            jobs: self.jobs.clone(),
            vm_snapshots: self.vm_snapshots.clone(),
            schedule_runs: self.schedule_runs.clone(),
            users: Tracked::default(),
            token_key: Vec::new(),
            audit: VecDeque::new(),
            force_stop: self.force_stop.clone(),
            pool_ca: None,
            join_tokens: BTreeMap::new(),
            ca_roll: None,
            issued: BTreeMap::new(),
            networks: self.networks.clone(),
            alerts: Tracked::default(),
            alert_seq: self.alert_seq,
            marks: FeedMarks::default(),
        }
    }

    /// Gives the bounded windows (remembered requests, audit events, task order) their
    /// full size at once, so they never grow: a growth moves the whole window on the Raft
    /// task while every write waits. The request map gets twice its window: the slots its
    /// removals leave behind fill a table sized for the window alone, which would then
    /// grow to twice the size anyway.
    fn reserve_windows(&mut self) {
        fn room(len: usize, kept: usize) -> usize {
            (kept + 1).saturating_sub(len)
        }
        self.requests
            .reserve(room(self.requests.len(), 2 * REQUESTS_KEPT));
        self.request_order
            .reserve(room(self.request_order.len(), REQUESTS_KEPT));
        self.audit.reserve(room(self.audit.len(), AUDIT_KEPT));
        self.task_order
            .reserve(room(self.task_order.len(), TASKS_KEPT));
    }

    /// A copy of the task `id`, while it is kept.
    pub fn task(&self, id: &str) -> Option<pb::Task> {
        self.tasks.get(id).map(|t| (**t).clone())
    }

    /// The earlier result of this request id, if it was already applied. Errors when the
    /// id was used for a different kind of request.
    pub fn lookup_request(&self, request_id: &str, kind: &str) -> Option<CommandResult> {
        if request_id.is_empty() {
            return None;
        }
        self.requests.get(request_id).map(|r| {
            if r.kind == kind {
                let mut res = r.result();
                if res.code == 0 {
                    // The task itself while it is kept; once forgotten it had finished.
                    res.task = Some(self.task(&res.task_id).unwrap_or_else(|| pb::Task {
                        id: res.task_id.clone(),
                        kind: kind.to_owned(),
                        state: pb::TaskState::Succeeded as i32,
                        request_id: request_id.to_owned(),
                        ..Default::default()
                    }));
                    res.task_id.clear();
                }
                res
            } else {
                err(
                    Code::InvalidArgument,
                    format!(
                        "request_id {request_id} was already used for a {} request; \
                         use a new request_id for a {kind} request",
                        r.kind
                    ),
                )
            }
        })
    }

    /// Applies one committed command. Deterministic: the result depends only on the state
    /// and the command.
    pub fn apply(&mut self, index: u64, cmd: &Command) -> CommandResult {
        self.applied_index = index;
        let Some(op) = &cmd.op else {
            return err(Code::InvalidArgument, "empty command");
        };
        let kind = op.kind();
        self.prune(cmd.at_ms);
        if let Some(prev) = self.lookup_request(&cmd.request_id, kind) {
            return prev;
        }
        let result = match self.apply_op(cmd, op) {
            Ok(Applied {
                target,
                state,
                message,
                error_code,
            }) => {
                let ended = state != pb::TaskState::Running;
                let failed = state == pb::TaskState::Failed;
                let task = pb::Task {
                    id: cmd.task_id.clone(),
                    kind: kind.to_owned(),
                    state: state as i32,
                    progress_percent: if state == pb::TaskState::Succeeded {
                        100
                    } else {
                        0
                    },
                    error_message: if failed {
                        message.clone()
                    } else {
                        String::new()
                    },
                    error_code,
                    status_message: message,
                    target_id: target,
                    requested_by: match op {
                        Op::ScheduleJob(j) if cmd.requested_by.is_empty() => {
                            format!("schedule {}", j.schedule)
                        }
                        _ => cmd.requested_by.clone(),
                    },
                    request_id: cmd.request_id.clone(),
                    created_at: Some(proto::timestamp(cmd.at_ms)),
                    started_at: Some(proto::timestamp(cmd.at_ms)),
                    finished_at: ended.then(|| proto::timestamp(cmd.at_ms)),
                    cancellable: !ended
                        && matches!(
                            op,
                            Op::StartJob(Job {
                                spec: Some(JobSpec::MigrateVm(_)),
                                ..
                            })
                        ),
                    ..Default::default()
                };
                if !task.id.is_empty() {
                    self.tasks.insert(task.id.clone(), Box::new(task.clone()));
                    self.task_order.push_back(task.id.clone());
                }
                CommandResult::ok(task)
            }
            Err(e) => e,
        };
        if !cmd.method.is_empty() {
            self.record_audit(cmd, &result);
        }
        if !cmd.request_id.is_empty() && result.code != Code::Aborted as i32 {
            self.requests.insert(
                cmd.request_id.clone(),
                RequestRecord::new(cmd.at_ms, kind, &result),
            );
            self.request_order
                .push_back((cmd.at_ms, cmd.request_id.clone()));
        }
        result
    }

    fn prune(&mut self, now_ms: u64) {
        while let Some((at, _)) = self.request_order.front() {
            let expired = now_ms.saturating_sub(*at) > REQUEST_TTL_MS;
            if !expired && self.request_order.len() <= REQUESTS_KEPT {
                break;
            }
            let (_, id) = self.request_order.pop_front().expect("front exists");
            self.requests.remove(&id);
        }
        // Forget the oldest finished tasks past the limit; running ones stay.
        let mut scanned = 0;
        while self.task_order.len() > TASKS_KEPT && scanned < self.task_order.len() {
            let id = self.task_order.pop_front().expect("non-empty");
            // One search for the common case (finished); a running task goes back.
            if let Some(t) = self.tasks.remove(&id)
                && (t.state == pb::TaskState::Running as i32
                    || t.state == pb::TaskState::Pending as i32)
            {
                self.tasks.insert(id.clone(), t);
                self.task_order.push_back(id);
                scanned += 1;
            }
        }
    }

    /// Applies one operation; each kind of object's file holds its part ([`super::hosts`],
    /// [`super::storage`], [`super::vms`], [`super::jobs`], [`super::users`],
    /// [`super::networks`]).
    fn apply_op(&mut self, cmd: &Command, op: &Op) -> Result<Applied, CommandResult> {
        let at_ms = cmd.at_ms;
        match op {
            Op::UpdateSettings(s) => {
                validate_settings(s)?;
                let mut s = s.clone();
                self.keep_schedules(&mut s)?;
                self.settings = s;
                self.marks.pool_touched = true;
                Ok(Applied::done(&self.pool_id))
            }
            Op::SetHa(h) => {
                self.ha = *h;
                self.marks.pool_touched = true;
                Ok(Applied::done(&self.pool_id))
            }
            Op::JoinHost(j) => self.join_host(j, at_ms),
            Op::SetHostState(s) => self.set_host_state(s),
            Op::RemoveHost(r) => self.remove_host(&r.id, at_ms),
            Op::HostReport(r) => self.host_report(r, at_ms),
            Op::MarkUnreachable(m) => Ok(self.mark_unreachable(m, at_ms)),
            Op::CreateSr(sr) => self.create_sr(sr),
            Op::RemoveSr(r) => self.remove_sr(&r.id),
            Op::CreateVolume(v) => self.create_volume(v, at_ms),
            Op::DeleteVolume(r) => self.delete_volume(&r.id),
            Op::StorageRefresh(r) => {
                self.storage_refresh(r, at_ms);
                Ok(Applied::done(""))
            }
            Op::CreateTemplate(t) => self.create_template(t, at_ms),
            Op::DeleteTemplate(r) => self.delete_template(&r.id),
            Op::CreateVm(c) => self.create_vm(c, at_ms),
            Op::UpdateVm(u) => self.update_vm(u),
            Op::SetVmPower(p) => self.set_vm_power(p, at_ms),
            Op::DestroyVm(r) => self.destroy_vm(&r.id),
            Op::StartJob(j) => self.start_job(j, &cmd.task_id),
            Op::JobStep(st) => self.job_step(st).map(Applied::done),
            Op::FinishJob(f) => self.finish_job(f, at_ms),
            Op::CancelJob(r) => self.cancel_job(&r.id),
            Op::Audit(e) => {
                self.audit_event(e, at_ms);
                Ok(Applied::done(""))
            }
            Op::CreateUser(c) => self.create_user(c, at_ms).map(Applied::done),
            Op::DeleteUser(r) => self.delete_user(&r.id).map(Applied::done),
            Op::SetRole(r) => self.set_role(r).map(Applied::done),
            Op::SetPoolCa(r) => self.set_pool_ca(r),
            Op::CreateJoinToken(r) => self.create_join_token(r, at_ms),
            Op::RedeemJoinToken(r) => self.redeem_join_token(r, at_ms),
            Op::StartCaRoll(r) => self.start_ca_roll(r, at_ms),
            Op::FinishCaRoll(r) => self.finish_ca_roll(r),
            Op::RecordIssued(r) => self.record_issued(r, at_ms),
            Op::CreateNetwork(n) => self.create_network(n, at_ms),
            Op::DestroyNetwork(r) => self.destroy_network(&r.id),
            Op::CreateVif(v) => self.create_vif(v),
            Op::DestroyVif(r) => self.destroy_vif(&r.id),
            Op::UpdateVif(u) => self.update_vif(&u.vif_id, u.ipv4.as_ref().map(|a| &a.ipv4[..])),
            Op::UpdateNetwork(u) => {
                self.update_network(&u.network_id, u.ranges.as_ref().map(|r| &r.ranges[..]))
            }
            Op::DismissAlert(r) => self.dismiss_alert(&r.id, &cmd.requested_by, at_ms),
            Op::SetSchedule(sch) => self.set_schedule(sch, at_ms),
            Op::DeleteSchedule(r) => self.delete_schedule(&r.id),
            Op::ScheduleJob(j) => self.schedule_job(j, &cmd.task_id, at_ms),
        }
    }

    /// Applies a committed membership change's addresses.
    pub fn apply_member_change(
        &mut self,
        index: u64,
        ch: &MemberChange,
        voters_and_learners: &[u64],
    ) {
        self.applied_index = index;
        for m in &ch.members {
            if !m.address.is_empty() {
                self.members.insert(m.id, m.address.clone());
            }
        }
        self.members
            .retain(|id, _| voters_and_learners.contains(id));
        if !ch.task_id.is_empty() {
            let task = pb::Task {
                id: ch.task_id.clone(),
                kind: "pool.member_change".into(),
                state: pb::TaskState::Succeeded as i32,
                progress_percent: 100,
                target_id: ch
                    .members
                    .iter()
                    .map(|m| m.id.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                request_id: ch.request_id.clone(),
                created_at: Some(proto::timestamp(ch.at_ms)),
                finished_at: Some(proto::timestamp(ch.at_ms)),
                ..Default::default()
            };
            self.tasks.insert(task.id.clone(), Box::new(task.clone()));
            self.task_order.push_back(task.id.clone());
            if !ch.request_id.is_empty() {
                self.requests.insert(
                    ch.request_id.clone(),
                    RequestRecord::new(ch.at_ms, "pool.member_change", &CommandResult::ok(task)),
                );
                self.request_order
                    .push_back((ch.at_ms, ch.request_id.clone()));
            }
        }
    }
}

pub fn validate_settings(s: &pb::PoolSettings) -> Result<(), CommandResult> {
    if s.name.is_empty() {
        return Err(err(Code::InvalidArgument, "the pool needs a name"));
    }
    if !(100..=1000).contains(&s.cpu_overcommit_percent) {
        return Err(err(
            Code::InvalidArgument,
            format!(
                "cpu_overcommit_percent must be 100..=1000, not {}",
                s.cpu_overcommit_percent
            ),
        ));
    }
    if !(100..=200).contains(&s.memory_overcommit_percent) {
        return Err(err(
            Code::InvalidArgument,
            format!(
                "memory_overcommit_percent must be 100..=200, not {}",
                s.memory_overcommit_percent
            ),
        ));
    }
    if s.host_heartbeat_timeout_seconds == 0 {
        return Err(err(
            Code::InvalidArgument,
            "host_heartbeat_timeout_seconds must be > 0",
        ));
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use proto::host as hpb;

    use super::*;

    pub(in crate::state) fn cmd(request_id: &str, at_ms: u64, op: Op) -> Command {
        Command {
            request_id: request_id.into(),
            at_ms,
            task_id: format!("task-{request_id}"),
            requested_by: String::new(),
            method: String::new(),
            peer: String::new(),
            op: Some(op),
        }
    }

    pub(in crate::state) fn join(id: &str, addr: &str) -> Op {
        Op::JoinHost(JoinHost {
            host_id: id.into(),
            name: id.into(),
            address: addr.into(),
        })
    }

    pub(in crate::state) fn report(host: &str, mem_gib: u64, cpus: u32) -> Op {
        Op::HostReport(HostReport {
            host_id: host.into(),
            info: Some(hpb::HostInfo {
                memory_total_bytes: mem_gib << 30,
                memory_available_bytes: mem_gib << 30,
                logical_cpus: cpus,
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    pub(in crate::state) fn spec(name: &str, vcpus: u32, mem_gib: u64) -> pb::VmSpec {
        pb::VmSpec {
            name: name.into(),
            vcpus,
            memory_bytes: mem_gib << 30,
            ..Default::default()
        }
    }

    pub(in crate::state) fn create_vm(id: &str, s: pb::VmSpec, host: &str) -> Op {
        Op::CreateVm(CreateVm {
            vm_id: id.into(),
            spec: Some(s),
            template_id: String::new(),
            start_on_host: host.into(),
            vifs: vec![],
        })
    }

    #[test]
    fn the_history_windows_are_sized_once_and_left_out_of_an_object_copy() {
        let mut s = PoolState::new("p", BTreeMap::new());
        let sized = |s: &PoolState| {
            s.requests.capacity() >= 2 * REQUESTS_KEPT
                && s.request_order.capacity() > REQUESTS_KEPT
                && s.audit.capacity() > AUDIT_KEPT
                && s.task_order.capacity() > TASKS_KEPT
        };
        assert!(sized(&s), "a new state has its windows at full size");
        s.apply(2, &cmd("req-1", 10, join("h1", "10.0.0.1:1")));
        s.apply(3, &cmd("req-2", 11, create_vm("vm1", spec("a", 1, 1), "")));
        let mut audited = cmd("req-3", 12, join("h2", "10.0.0.2:1"));
        audited.method = "JoinHost".into();
        s.apply(4, &audited);
        assert!(!s.requests.is_empty() && !s.tasks.is_empty() && !s.audit.is_empty());
        let back = crate::state::snapshot::decode(&crate::state::snapshot::encode(&s)).unwrap();
        assert!(sized(&back), "a state read from a snapshot too");

        let c = s.clone_without_history();
        assert_eq!(c.hosts, s.hosts);
        assert_eq!(c.vms, s.vms);
        assert_eq!(c.alloc, s.alloc);
        assert_eq!(c.jobs, s.jobs);
        assert_eq!(c.applied_index, 4);
        assert!(c.requests.is_empty() && c.tasks.is_empty() && c.audit.is_empty());
        assert!(c.users.is_empty() && c.token_key.is_empty());
    }

    #[test]
    fn retried_request_id_acts_once() {
        let mut s = PoolState::new("p", BTreeMap::new());
        let r1 = s.apply(2, &cmd("req-1", 10, create_vm("vm1", spec("a", 1, 1), "")));
        assert_eq!(r1.code, 0);
        // The same key again, even with another generated VM id: the first result, no new VM.
        let r2 = s.apply(3, &cmd("req-1", 11, create_vm("vm2", spec("a", 1, 1), "")));
        assert_eq!(r2, r1);
        assert_eq!(s.vms.len(), 1);
        // The same key for another kind of request is refused.
        let r3 = s.apply(4, &cmd("req-1", 12, join("h", "10.0.0.1:1")));
        assert_eq!(r3.code, Code::InvalidArgument as i32);
        assert!(s.hosts.is_empty());
        // Past the TTL the key is forgotten.
        let r4 = s.apply(
            5,
            &cmd(
                "req-1",
                12 + REQUEST_TTL_MS + 1,
                create_vm("vm3", spec("b", 1, 1), ""),
            ),
        );
        assert_eq!(r4.code, 0);
        assert_eq!(s.vms.len(), 2);
    }

    #[test]
    fn placement_is_checked_again_at_commit() {
        let mut s = PoolState::new("p", BTreeMap::new());
        s.apply(2, &cmd("j", 1, join("h1", "10.0.0.1:7000")));
        s.apply(3, &cmd("r", 2, report("h1", 4, 4)));
        let ok = s.apply(4, &cmd("a", 3, create_vm("vm1", spec("a", 2, 3), "h1")));
        assert_eq!(ok.code, 0, "{}", ok.message);
        assert_eq!(s.hosts["h1"].memory_allocated_bytes, 3 << 30);
        // A second placement decided on the same stale view no longer fits: refused.
        let late = s.apply(5, &cmd("b", 4, create_vm("vm2", spec("b", 1, 2), "h1")));
        assert_eq!(late.code, Code::Aborted as i32);
        assert!(late.message.contains("memory"), "{}", late.message);
        assert!(!s.vms.contains_key("vm2"));
        // The conflict is not remembered: the retry, placed elsewhere or later, can succeed.
        assert!(!s.requests.contains_key("b"));
    }

    #[test]
    fn unknown_ids_are_clear_errors_and_change_nothing() {
        let mut s = PoolState::new("p", BTreeMap::new());
        let before = s.clone();
        for (i, op) in [
            Op::RemoveHost(ObjectId { id: "nope".into() }),
            Op::DestroyVm(ObjectId { id: "nope".into() }),
            Op::SetVmPower(SetVmPower {
                vm_id: "nope".into(),
                desired: hpb::PowerState::Running as i32,
                host_id: "h".into(),
                force: false,
                reboot: false,
                ha_restart: false,
            }),
            Op::RemoveSr(ObjectId { id: "nope".into() }),
        ]
        .into_iter()
        .enumerate()
        {
            let r = s.apply(2 + i as u64, &cmd("", 1, op));
            assert_eq!(r.code, Code::NotFound as i32);
            assert!(r.message.contains("nope"));
        }
        assert_eq!(s.vms, before.vms);
        assert_eq!(s.hosts, before.hosts);
        assert!(s.tasks.is_empty());
    }

    #[test]
    fn host_report_finishes_start_task_and_stop_frees_the_host() {
        let mut s = PoolState::new("p", BTreeMap::new());
        s.apply(2, &cmd("j", 1, join("h1", "10.0.0.1:7000")));
        s.apply(3, &cmd("r", 2, report("h1", 8, 4)));
        s.apply(4, &cmd("c", 3, create_vm("vm1", spec("a", 1, 1), "h1")));
        assert_eq!(s.tasks["task-c"].state, pb::TaskState::Running as i32);
        let running = ReportedVm {
            vm_id: "vm1".into(),
            power_state: hpb::PowerState::Running as i32,
            last_stop_reason: 0,
            started_at_ms: 0,
        };
        s.apply(
            5,
            &cmd(
                "",
                4,
                Op::HostReport(HostReport {
                    host_id: "h1".into(),
                    vms: vec![running],
                    ..Default::default()
                }),
            ),
        );
        assert_eq!(s.tasks["task-c"].state, pb::TaskState::Succeeded as i32);
        // Destroying a running VM is refused.
        let r = s.apply(
            6,
            &cmd("d", 5, Op::DestroyVm(ObjectId { id: "vm1".into() })),
        );
        assert_eq!(r.code, Code::FailedPrecondition as i32);
        s.apply(
            7,
            &cmd(
                "s",
                6,
                Op::SetVmPower(SetVmPower {
                    vm_id: "vm1".into(),
                    desired: hpb::PowerState::Stopped as i32,
                    ..Default::default()
                }),
            ),
        );
        // Still reserved until the host says it stopped.
        assert_eq!(s.hosts["h1"].vcpus_allocated, 1);
        s.apply(
            8,
            &cmd(
                "",
                7,
                Op::HostReport(HostReport {
                    host_id: "h1".into(),
                    vms: vec![ReportedVm {
                        vm_id: "vm1".into(),
                        power_state: hpb::PowerState::Stopped as i32,
                        last_stop_reason: hpb::StopReason::GuestPoweroff as i32,
                        started_at_ms: 0,
                    }],
                    ..Default::default()
                }),
            ),
        );
        assert_eq!(s.hosts["h1"].vcpus_allocated, 0);
        assert!(s.vms["vm1"].host_id.is_empty());
        assert_eq!(s.tasks["task-s"].state, pb::TaskState::Succeeded as i32);
    }

    /// A guest that powers off stops its VM for good; the stopped definition the host
    /// keeps of that run (until reconciliation removes it) does not stop the VM again when
    /// it is started at once on the same host.
    #[test]
    fn a_guest_poweroff_counts_once_per_run() {
        use hpb::PowerState as P;
        let mut s = PoolState::new("p", BTreeMap::new());
        s.apply(2, &cmd("j", 1, join("h1", "10.0.0.1:7000")));
        s.apply(3, &cmd("r", 2, report("h1", 8, 4)));
        s.apply(4, &cmd("c", 3, create_vm("vm1", spec("a", 1, 1), "h1")));
        let says = |power: P, started_at_ms: u64| {
            let last_stop_reason = if power == P::Stopped {
                hpb::StopReason::GuestPoweroff as i32
            } else {
                0
            };
            Op::HostReport(HostReport {
                host_id: "h1".into(),
                vms: vec![ReportedVm {
                    vm_id: "vm1".into(),
                    power_state: power as i32,
                    last_stop_reason,
                    started_at_ms,
                }],
                ..Default::default()
            })
        };
        let start = |request_id: &str| {
            let op = Op::SetVmPower(SetVmPower {
                vm_id: "vm1".into(),
                desired: P::Running as i32,
                host_id: "h1".into(),
                ..Default::default()
            });
            cmd(request_id, 9, op)
        };
        s.apply(5, &cmd("", 4, says(P::Running, 1000)));
        assert_eq!(s.vms["vm1"].started_at, Some(proto::timestamp(1000)));
        s.apply(6, &cmd("", 5, says(P::Stopped, 1000)));
        assert_eq!(s.vms["vm1"].desired_power_state(), P::Stopped);
        assert!(s.vms["vm1"].host_id.is_empty());

        // Started again at once: the host still reports the run that powered off.
        s.apply(7, &start("s2"));
        s.apply(8, &cmd("", 6, says(P::Stopped, 1000)));
        let vm = &s.vms["vm1"];
        assert_eq!(vm.desired_power_state(), P::Running);
        assert_eq!(vm.host_id, "h1");
        assert_eq!(s.tasks["task-s2"].state, pb::TaskState::Running as i32);
        s.apply(9, &cmd("", 7, says(P::Running, 2000)));
        assert_eq!(s.tasks["task-s2"].state, pb::TaskState::Succeeded as i32);
        assert_eq!(s.vms["vm1"].started_at, Some(proto::timestamp(2000)));

        // A run the pool never saw running (it powered off between two reports) counts.
        s.apply(10, &cmd("", 8, says(P::Stopped, 2000)));
        assert_eq!(s.vms["vm1"].desired_power_state(), P::Stopped);
        s.apply(11, &start("s3"));
        s.apply(12, &cmd("", 9, says(P::Stopped, 3000)));
        assert_eq!(s.vms["vm1"].desired_power_state(), P::Stopped);
        assert!(s.vms["vm1"].host_id.is_empty());
        assert_eq!(s.tasks["task-s3"].state, pb::TaskState::Succeeded as i32);

        // A report from before hosts told their runs apart counts as it always did.
        s.apply(13, &start("s4"));
        s.apply(14, &cmd("", 10, says(P::Stopped, 0)));
        assert_eq!(s.vms["vm1"].desired_power_state(), P::Stopped);
        assert_eq!(s.vms["vm1"].started_at, Some(proto::timestamp(3000)));
    }

    #[test]
    fn a_migrating_report_counts_only_while_a_migration_job_runs() {
        let mut s = PoolState::new("p", BTreeMap::new());
        s.apply(2, &cmd("j1", 1, join("h1", "10.0.0.1:7000")));
        s.apply(3, &cmd("j2", 2, join("h2", "10.0.0.2:7000")));
        s.apply(4, &cmd("r1", 3, report("h1", 8, 4)));
        s.apply(5, &cmd("r2", 4, report("h2", 8, 4)));
        s.apply(6, &cmd("c", 5, create_vm("vm1", spec("a", 1, 1), "h1")));
        let says = |power: hpb::PowerState| {
            Op::HostReport(HostReport {
                host_id: "h1".into(),
                vms: vec![ReportedVm {
                    vm_id: "vm1".into(),
                    power_state: power as i32,
                    last_stop_reason: 0,
                    started_at_ms: 0,
                }],
                ..Default::default()
            })
        };
        s.apply(7, &cmd("", 6, says(hpb::PowerState::Running)));
        // A heartbeat read mid-migration, committed after the job ended: the VM stays
        // running, so the next migration is not refused.
        s.apply(8, &cmd("", 7, says(hpb::PowerState::Migrating)));
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Running);
        let job = Job {
            spec: Some(JobSpec::MigrateVm(MigrateVmJob {
                vm_id: "vm1".into(),
                source_host_id: "h1".into(),
                destination_host_id: "h2".into(),
                ..Default::default()
            })),
            ..Default::default()
        };
        let r = s.apply(9, &cmd("m", 8, Op::StartJob(job)));
        assert_eq!(r.code, 0, "{}", r.message);
        s.apply(10, &cmd("", 9, says(hpb::PowerState::Migrating)));
        assert_eq!(s.vms["vm1"].power_state(), hpb::PowerState::Migrating);
    }

    #[test]
    fn unreachable_host_comes_back_with_a_report() {
        let mut s = PoolState::new("p", BTreeMap::new());
        s.apply(2, &cmd("j", 1, join("h1", "10.0.0.1:7000")));
        s.apply(
            3,
            &cmd(
                "",
                2,
                Op::MarkUnreachable(MarkUnreachable {
                    host_ids: vec!["h1".into()],
                }),
            ),
        );
        assert_eq!(s.hosts["h1"].state(), pb::HostState::Unreachable);
        let r = s.apply(
            4,
            &cmd(
                "e",
                3,
                Op::SetHostState(SetHostState {
                    host_id: "h1".into(),
                    state: pb::HostState::Enabled as i32,
                }),
            ),
        );
        assert_eq!(r.code, Code::FailedPrecondition as i32);
        s.apply(5, &cmd("", 4, report("h1", 8, 4)));
        assert_eq!(s.hosts["h1"].state(), pb::HostState::Enabled);
    }

    #[test]
    fn templates_are_created_used_and_deleted() {
        let mut s = PoolState::new("p", BTreeMap::new());
        let t = pb::Template {
            id: "tpl1".into(),
            name: "small".into(),
            spec: Some(spec("small", 1, 1)),
            ..Default::default()
        };
        assert_eq!(
            s.apply(2, &cmd("t1", 1, Op::CreateTemplate(t.clone())))
                .code,
            0
        );
        assert!(s.templates["tpl1"].created_at.is_some());
        // Same name again: refused.
        let dup = pb::Template {
            id: "tpl2".into(),
            ..t.clone()
        };
        assert_eq!(
            s.apply(3, &cmd("t2", 2, Op::CreateTemplate(dup))).code,
            Code::AlreadyExists as i32
        );
        let mut c = CreateVm {
            vm_id: "vm1".into(),
            spec: Some(spec("from-tpl", 1, 1)),
            template_id: "tpl1".into(),
            start_on_host: String::new(),
            vifs: vec![],
        };
        assert_eq!(s.apply(4, &cmd("v1", 3, Op::CreateVm(c.clone()))).code, 0);
        assert_eq!(s.vms["vm1"].template_id, "tpl1");
        c.vm_id = "vm2".into();
        c.template_id = "nope".into();
        assert_eq!(
            s.apply(5, &cmd("v2", 4, Op::CreateVm(c))).code,
            Code::NotFound as i32
        );
        let del = Op::DeleteTemplate(ObjectId { id: "tpl1".into() });
        assert_eq!(s.apply(6, &cmd("d1", 5, del.clone())).code, 0);
        assert!(s.templates.is_empty());
        assert_eq!(s.apply(7, &cmd("d2", 6, del)).code, Code::NotFound as i32);
    }

    #[test]
    fn finished_tasks_are_pruned_beyond_the_limit() {
        let mut s = PoolState::new("p", BTreeMap::new());
        let mut settings = default_settings();
        for i in 0..(TASKS_KEPT + 50) {
            settings.name = format!("n{i}");
            s.apply(
                i as u64 + 2,
                &cmd(
                    &format!("r{i}"),
                    i as u64,
                    Op::UpdateSettings(settings.clone()),
                ),
            );
            if i == 1 {
                // A task still running (a job's) is kept however old it is.
                s.tasks.get_mut("task-r1").unwrap().state = pb::TaskState::Running as i32;
            }
        }
        assert!(s.tasks.len() <= TASKS_KEPT + 1);
        assert!(!s.tasks.contains_key("task-r0"));
        assert!(s.tasks.contains_key("task-r1"));
        assert!(s.tasks.contains_key(&format!("task-r{}", TASKS_KEPT + 49)));
        assert_eq!(s.task_order.len(), s.tasks.len());
    }
}
