//! The pool state machine: what every member agrees on, changed only by applying committed
//! commands in log order.

// A rejected command's `CommandResult` is the very value returned to the proposer (and
// stored under its request id); boxing it on this cold path would buy nothing.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Code;

use super::command::*;
use crate::scheduler::{self, Demand, HostCandidate, Policy, SrReach};

/// Finished tasks kept for GetTask/ListTasks; older ones are forgotten first.
pub const TASKS_KEPT: usize = 10_000;
/// How long a request id is remembered: a retry later than this acts again. Clients
/// retry for seconds, not hours.
pub const REQUEST_TTL_MS: u64 = 3600 * 1000;
/// Request ids kept at most, whatever their age.
pub const REQUESTS_KEPT: usize = 100_000;

pub(crate) fn ts(ms: u64) -> Option<proto::prost_types::Timestamp> {
    Some(proto::prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    })
}

/// A remembered request: its kind (a retry must ask the same thing) and its result, with
/// the task's id in place of the task. Kept small on purpose: every write adds one and the
/// map holds up to [`REQUESTS_KEPT`] of them (a whole `CommandResult` made each entry
/// 416 bytes, and growing or rehashing the map moved all of them).
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

/// Per-host totals of what placed VMs hold; derived from `vms`, never persisted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub vm_ids: BTreeSet<String>,
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolState {
    pub pool_id: String,
    pub settings: pb::PoolSettings,
    pub ha: pb::HaSettings,
    /// Coordinator members and their addresses.
    pub members: BTreeMap<u64, String>,
    pub hosts: BTreeMap<String, pb::Host>,
    pub srs: BTreeMap<String, pb::StorageRepository>,
    pub volumes: BTreeMap<String, proto::storage::Volume>,
    pub vms: BTreeMap<String, pb::Vm>,
    pub templates: BTreeMap<String, pb::Template>,
    pub tasks: BTreeMap<String, Box<pb::Task>>,
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
    pub vm_snapshots: BTreeMap<String, pb::VmSnapshot>,
    pub users: BTreeMap<String, UserRecord>,
    /// Key that signs login tokens; set with the first user.
    pub token_key: Vec<u8>,
    /// Newest last; at most [`AUDIT_KEPT`].
    pub audit: VecDeque<pb::AuditEvent>,
    /// VMs whose shutdown was asked with force (cleared once they stop).
    pub force_stop: BTreeSet<String>,
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

pub fn default_settings() -> pb::PoolSettings {
    pb::PoolSettings {
        name: "pool".into(),
        placement: pb::PlacementStrategy::Spread as i32,
        cpu_overcommit_percent: 400,
        memory_overcommit_percent: 100,
        host_heartbeat_timeout_seconds: 30,
        migration_downtime_budget_ms: 300,
    }
}

fn err(code: Code, msg: impl Into<String>) -> CommandResult {
    CommandResult::error(code, msg)
}

/// The IP part of "ip:port" or "\[v6\]:port" (the whole string when there is no port).
pub fn address_ip(addr: &str) -> String {
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return sa.ip().to_string();
    }
    match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches("http://").to_owned(),
        None => addr.to_owned(),
    }
}

impl PoolState {
    pub fn new(pool_id: &str, members: BTreeMap<u64, String>) -> Self {
        let mut s = PoolState {
            pool_id: pool_id.to_owned(),
            settings: default_settings(),
            ha: pb::HaSettings::default(),
            members,
            hosts: BTreeMap::new(),
            srs: BTreeMap::new(),
            volumes: BTreeMap::new(),
            vms: BTreeMap::new(),
            templates: BTreeMap::new(),
            tasks: BTreeMap::new(),
            task_order: VecDeque::new(),
            requests: HashMap::new(),
            request_order: VecDeque::new(),
            applied_index: 0,
            alloc: BTreeMap::new(),
            jobs: BTreeMap::new(),
            vm_snapshots: BTreeMap::new(),
            users: BTreeMap::new(),
            token_key: Vec::new(),
            audit: VecDeque::new(),
            force_stop: BTreeSet::new(),
        };
        s.reserve_windows();
        s
    }

    /// A copy of the pool's objects (settings, members, hosts, storage, VMs, jobs...)
    /// without the history windows (remembered requests, tasks, audit events) nor the
    /// users: what the reconciler reads each round. A full clone copies ~130,000 strings
    /// once the windows are full, tens of milliseconds under the state lock that the
    /// Raft task's apply waits for.
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
            tasks: BTreeMap::new(),
            task_order: VecDeque::new(),
            requests: HashMap::new(),
            request_order: VecDeque::new(),
            applied_index: self.applied_index,
            alloc: self.alloc.clone(),
            jobs: self.jobs.clone(),
            vm_snapshots: self.vm_snapshots.clone(),
            users: BTreeMap::new(),
            token_key: Vec::new(),
            audit: VecDeque::new(),
            force_stop: self.force_stop.clone(),
        }
    }

    /// Gives the bounded windows (remembered requests, audit events, task order) their
    /// full size at once. Grown by doubling, each growth moved the whole window on the
    /// Raft task while every write waited (20-100 ms for the request map). The request
    /// map gets twice its window: the slots its removals leave behind fill a table sized
    /// for the window alone, which then grows to twice the size anyway (once, ~150,000
    /// writes in: 25 ms in isolation, up to 150 ms on a busy member).
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
            Ok((target, state, message)) => {
                let task = pb::Task {
                    id: cmd.task_id.clone(),
                    kind: kind.to_owned(),
                    state: state as i32,
                    progress_percent: if state == pb::TaskState::Succeeded {
                        100
                    } else {
                        0
                    },
                    status_message: message,
                    target_id: target,
                    requested_by: cmd.requested_by.clone(),
                    request_id: cmd.request_id.clone(),
                    created_at: ts(cmd.at_ms),
                    started_at: ts(cmd.at_ms),
                    finished_at: if state == pb::TaskState::Succeeded {
                        ts(cmd.at_ms)
                    } else {
                        None
                    },
                    cancellable: matches!(
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

    fn host_mut(&mut self, id: &str) -> Result<&mut pb::Host, CommandResult> {
        self.hosts
            .get_mut(id)
            .ok_or_else(|| err(Code::NotFound, format!("no host with id {id}")))
    }

    fn vm_mut(&mut self, id: &str) -> Result<&mut pb::Vm, CommandResult> {
        self.vms
            .get_mut(id)
            .ok_or_else(|| err(Code::NotFound, format!("no VM with id {id}")))
    }

    fn apply_op(
        &mut self,
        cmd: &Command,
        op: &Op,
    ) -> Result<(String, pb::TaskState, String), CommandResult> {
        use pb::TaskState::{Running, Succeeded};
        match op {
            Op::UpdateSettings(s) => {
                validate_settings(s)?;
                self.settings = s.clone();
                Ok((self.pool_id.clone(), Succeeded, String::new()))
            }
            Op::SetHa(h) => {
                self.ha = *h;
                Ok((self.pool_id.clone(), Succeeded, String::new()))
            }
            Op::JoinHost(j) => {
                if j.host_id.is_empty() || j.address.is_empty() {
                    return Err(err(
                        Code::InvalidArgument,
                        "a host needs an id and an address",
                    ));
                }
                if let Some(h) = self.hosts.values().find(|h| h.address == j.address) {
                    return Err(err(
                        Code::AlreadyExists,
                        format!("host {} already joined with address {}", h.id, j.address),
                    ));
                }
                self.hosts.insert(
                    j.host_id.clone(),
                    pb::Host {
                        id: j.host_id.clone(),
                        name: j.name.clone(),
                        address: j.address.clone(),
                        state: pb::HostState::Enabled as i32,
                        last_heartbeat_at: ts(cmd.at_ms),
                        ..Default::default()
                    },
                );
                Ok((j.host_id.clone(), Succeeded, String::new()))
            }
            Op::SetHostState(s) => {
                let state = pb::HostState::try_from(s.state)
                    .ok()
                    .filter(|s| {
                        matches!(
                            s,
                            pb::HostState::Enabled
                                | pb::HostState::Disabled
                                | pb::HostState::Maintenance
                        )
                    })
                    .ok_or_else(|| err(Code::InvalidArgument, "bad host state"))?;
                let holds = self.alloc.get(&s.host_id).map_or(0, |a| a.vm_ids.len());
                let h = self.host_mut(&s.host_id)?;
                let cur = h.state();
                if state == pb::HostState::Enabled
                    && matches!(cur, pb::HostState::Unreachable | pb::HostState::Fenced)
                {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "host {} is {}: it is enabled again by its own heartbeat",
                            s.host_id,
                            cur.as_str_name()
                        ),
                    ));
                }
                if state == pb::HostState::Maintenance && holds > 0 {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "host {} still holds {holds} VMs; evacuate it first",
                            s.host_id
                        ),
                    ));
                }
                h.state = state as i32;
                Ok((s.host_id.clone(), Succeeded, String::new()))
            }
            Op::RemoveHost(r) => {
                self.host_mut(&r.id)?;
                if let Some(a) = self.alloc.get(&r.id).filter(|a| !a.vm_ids.is_empty()) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "host {} holds VMs {}; move or destroy them first",
                            r.id,
                            a.vm_ids.iter().cloned().collect::<Vec<_>>().join(", ")
                        ),
                    ));
                }
                self.hosts.remove(&r.id);
                self.alloc.remove(&r.id);
                Ok((r.id.clone(), Succeeded, String::new()))
            }
            Op::HostReport(r) => {
                let h = self.host_mut(&r.host_id)?;
                if let Some(info) = &r.info {
                    h.info = Some(info.clone());
                }
                if r.metrics.is_some() {
                    h.last_metrics = r.metrics.clone();
                }
                h.last_heartbeat_at = ts(cmd.at_ms);
                let state = h.state();
                let fencing = self.fence_job(&r.host_id).is_some();
                let runs_something = r.vms.iter().any(|v| {
                    matches!(
                        hpb::PowerState::try_from(v.power_state),
                        Ok(hpb::PowerState::Running
                            | hpb::PowerState::Paused
                            | hpb::PowerState::Migrating)
                    )
                });
                let h = self.host_mut(&r.host_id)?;
                match state {
                    // Back before it was fenced: nothing was restarted elsewhere.
                    pb::HostState::Unreachable if !fencing => {
                        h.state = pb::HostState::Enabled as i32
                    }
                    // A fenced host rejoins once it runs none of its old VMs.
                    pb::HostState::Fenced if !runs_something => {
                        h.state = pb::HostState::Enabled as i32
                    }
                    _ => {}
                }
                if state != pb::HostState::Fenced {
                    for rv in &r.vms {
                        self.apply_reported_vm(&r.host_id, rv, cmd.at_ms);
                    }
                }
                Ok((r.host_id.clone(), Succeeded, String::new()))
            }
            Op::MarkUnreachable(m) => {
                for id in &m.host_ids {
                    if let Some(h) = self.hosts.get_mut(id)
                        && matches!(
                            h.state(),
                            pb::HostState::Enabled
                                | pb::HostState::Disabled
                                | pb::HostState::Maintenance
                        )
                    {
                        h.state = pb::HostState::Unreachable as i32;
                    }
                }
                Ok((m.host_ids.join(","), Succeeded, String::new()))
            }
            Op::CreateSr(sr) => {
                if sr.id.is_empty() || sr.address.is_empty() {
                    return Err(err(
                        Code::InvalidArgument,
                        "a storage repository needs an id and a storaged address",
                    ));
                }
                if let Some(o) = self
                    .srs
                    .values()
                    .find(|o| o.address == sr.address && o.thin_pool_id == sr.thin_pool_id)
                {
                    return Err(err(
                        Code::AlreadyExists,
                        format!(
                            "repository {} already uses thin pool {:?} of {}",
                            o.id, sr.thin_pool_id, sr.address
                        ),
                    ));
                }
                self.srs.insert(sr.id.clone(), sr.clone());
                Ok((sr.id.clone(), Succeeded, String::new()))
            }
            Op::RemoveSr(r) => {
                if !self.srs.contains_key(&r.id) {
                    return Err(err(
                        Code::NotFound,
                        format!("no storage repository {}", r.id),
                    ));
                }
                if let Some(v) = self.volumes.values().find(|v| v.pool_id == r.id) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!("repository {} still holds volume {}", r.id, v.id),
                    ));
                }
                self.srs.remove(&r.id);
                Ok((r.id.clone(), Succeeded, String::new()))
            }
            Op::CreateVolume(v) => {
                if !self.srs.contains_key(&v.sr_id) {
                    return Err(err(
                        Code::NotFound,
                        format!("no storage repository {}", v.sr_id),
                    ));
                }
                if v.virtual_size_bytes == 0 {
                    return Err(err(Code::InvalidArgument, "a volume needs a non-zero size"));
                }
                self.volumes.insert(
                    v.volume_id.clone(),
                    proto::storage::Volume {
                        id: v.volume_id.clone(),
                        pool_id: v.sr_id.clone(),
                        name: v.name.clone(),
                        kind: proto::storage::VolumeKind::Volume as i32,
                        virtual_size_bytes: v.virtual_size_bytes,
                        block_size_bytes: 512,
                        created_at: ts(cmd.at_ms),
                        labels: v.labels.clone(),
                        ..Default::default()
                    },
                );
                Ok((v.volume_id.clone(), Running, "waiting for storaged".into()))
            }
            Op::DeleteVolume(r) => {
                if !self.volumes.contains_key(&r.id) {
                    return Err(err(Code::NotFound, format!("no volume {}", r.id)));
                }
                if let Some(vm) = self.vms.values().find(|vm| {
                    vm.spec
                        .as_ref()
                        .is_some_and(|s| s.disks.iter().any(|d| d.volume_id == r.id))
                }) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!("volume {} is a disk of VM {}", r.id, vm.id),
                    ));
                }
                self.volumes.remove(&r.id);
                Ok((r.id.clone(), Succeeded, String::new()))
            }
            Op::CreateTemplate(t) => {
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
                t.created_at = ts(cmd.at_ms);
                t.disk_volumes = spec
                    .disks
                    .iter()
                    .map(|d| (d.disk_id.clone(), d.volume_id.clone()))
                    .collect();
                self.templates.insert(t.id.clone(), t.clone());
                Ok((t.id, Succeeded, String::new()))
            }
            Op::DeleteTemplate(r) => {
                if self.templates.remove(&r.id).is_none() {
                    return Err(err(Code::NotFound, format!("no template with id {}", r.id)));
                }
                Ok((r.id.clone(), Succeeded, String::new()))
            }
            Op::CreateVm(c) => {
                let spec = c
                    .spec
                    .clone()
                    .ok_or_else(|| err(Code::InvalidArgument, "a VM needs a spec"))?;
                self.validate_spec(&spec)?;
                if !c.template_id.is_empty() && !self.templates.contains_key(&c.template_id) {
                    return Err(err(
                        Code::NotFound,
                        format!("no template with id {}", c.template_id),
                    ));
                }
                if self.vms.contains_key(&c.vm_id) {
                    return Err(err(Code::AlreadyExists, format!("VM {} exists", c.vm_id)));
                }
                let mut vm = pb::Vm {
                    id: c.vm_id.clone(),
                    spec: Some(spec),
                    desired_power_state: hpb::PowerState::Stopped as i32,
                    power_state: hpb::PowerState::Stopped as i32,
                    template_id: c.template_id.clone(),
                    created_at: ts(cmd.at_ms),
                    last_stop_reason: hpb::StopReason::None as i32,
                    ..Default::default()
                };
                let mut state = Succeeded;
                if !c.start_on_host.is_empty() {
                    self.check_fits(&vm, &c.start_on_host)?;
                    vm.desired_power_state = hpb::PowerState::Running as i32;
                    vm.host_id = c.start_on_host.clone();
                    state = Running;
                }
                self.vms.insert(vm.id.clone(), vm);
                self.rebuild_alloc();
                Ok((c.vm_id.clone(), state, String::new()))
            }
            Op::UpdateVm(u) => {
                let spec = u
                    .spec
                    .clone()
                    .ok_or_else(|| err(Code::InvalidArgument, "UpdateVm needs a spec"))?;
                self.validate_spec(&spec)?;
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
                Ok((u.vm_id.clone(), Succeeded, String::new()))
            }
            Op::SetVmPower(p) => {
                let desired = hpb::PowerState::try_from(p.desired)
                    .map_err(|_| err(Code::InvalidArgument, "bad power state"))?;
                let vm = self
                    .vms
                    .get(&p.vm_id)
                    .cloned()
                    .ok_or_else(|| err(Code::NotFound, format!("no VM with id {}", p.vm_id)))?;
                match desired {
                    hpb::PowerState::Running => {
                        if vm.host_id.is_empty() {
                            if p.host_id.is_empty() {
                                return Err(err(
                                    Code::InvalidArgument,
                                    "a start needs a placement",
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
                Ok((
                    p.vm_id.clone(),
                    if done { Succeeded } else { Running },
                    String::new(),
                ))
            }
            Op::StartJob(j) => {
                let mut j = j.clone();
                j.task_id = cmd.task_id.clone();
                j.outputs.clear();
                j.cancel_requested = false;
                let target = self.check_job(&j)?;
                self.jobs.insert(j.task_id.clone(), j);
                Ok((target, Running, "queued".into()))
            }
            Op::JobStep(st) => Ok((self.job_step(st)?, Succeeded, String::new())),
            Op::FinishJob(f) => self.finish_job(f, cmd.at_ms),
            Op::CancelJob(r) => {
                let job = self.jobs.get_mut(&r.id).ok_or_else(|| {
                    err(
                        Code::FailedPrecondition,
                        format!("task {} is not running (or cannot be cancelled)", r.id),
                    )
                })?;
                if !matches!(job.spec, Some(JobSpec::MigrateVm(_))) {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!("task {} ({}) cannot be cancelled", r.id, job.kind()),
                    ));
                }
                job.cancel_requested = true;
                if let Some(t) = self.tasks.get_mut(&r.id) {
                    t.status_message = "cancelling".into();
                }
                Ok((r.id.clone(), Succeeded, String::new()))
            }
            Op::Audit(e) => {
                let mut e = e.clone();
                e.at = ts(cmd.at_ms);
                self.push_audit(e);
                Ok((String::new(), Succeeded, String::new()))
            }
            Op::CreateUser(c) => Ok((self.create_user(c, cmd.at_ms)?, Succeeded, String::new())),
            Op::DeleteUser(r) => Ok((self.delete_user(&r.id)?, Succeeded, String::new())),
            Op::SetRole(r) => Ok((self.set_role(r)?, Succeeded, String::new())),
            Op::StorageRefresh(r) => {
                self.storage_refresh(r);
                Ok((String::new(), Succeeded, String::new()))
            }
            Op::DestroyVm(r) => {
                let vm = self
                    .vms
                    .get(&r.id)
                    .ok_or_else(|| err(Code::NotFound, format!("no VM with id {}", r.id)))?;
                if vm.power_state() != hpb::PowerState::Stopped
                    && vm.power_state() != hpb::PowerState::Unspecified
                {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "VM {} is {} on host {}: shut it down first",
                            r.id,
                            vm.power_state().as_str_name(),
                            vm.host_id
                        ),
                    ));
                }
                self.vms.remove(&r.id);
                self.rebuild_alloc();
                Ok((r.id.clone(), Succeeded, String::new()))
            }
        }
    }

    /// A host reported one of its VMs: record what it runs and finish the power tasks
    /// whose goal is reached.
    fn apply_reported_vm(&mut self, host_id: &str, rv: &ReportedVm, at_ms: u64) {
        let Some(vm) = self.vms.get_mut(&rv.vm_id) else {
            return;
        };
        if vm.host_id != host_id {
            // A stale copy on a host the pool moved the VM away from (or a stopped VM's
            // leftover definition); reconciliation removes it.
            return;
        }
        vm.power_state = rv.power_state;
        vm.last_stop_reason = rv.last_stop_reason;
        let stopped = matches!(
            vm.power_state(),
            hpb::PowerState::Stopped | hpb::PowerState::Crashed
        );
        // The guest powered itself off: the pool takes that as the VM's wish (a crash,
        // by contrast, is restarted).
        if vm.power_state() == hpb::PowerState::Stopped
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
            for t in self.tasks.values_mut() {
                if t.target_id == vm_id
                    && t.state == pb::TaskState::Running as i32
                    && t.kind.starts_with("vm.")
                    && !self.jobs.contains_key(&t.id)
                {
                    t.state = pb::TaskState::Succeeded as i32;
                    t.progress_percent = 100;
                    t.finished_at = ts(at_ms);
                }
            }
        }
        self.rebuild_alloc_host(host_id);
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

    /// The same filters the scheduler ran, run again at commit time.
    pub(crate) fn check_fits(&self, vm: &pb::Vm, host_id: &str) -> Result<(), CommandResult> {
        let h = self
            .hosts
            .get(host_id)
            .ok_or_else(|| err(Code::NotFound, format!("no host with id {host_id}")))?;
        let cand = self.candidate(h);
        let demand = self.demand(vm.spec.as_ref().unwrap_or(&pb::VmSpec::default()));
        let r = scheduler::hard_filters(&cand, &demand, &self.policy());
        if r.is_empty() {
            Ok(())
        } else {
            // ABORTED: the placement was decided on a view this log has moved past; the
            // caller schedules again. Not remembered under the request id (see `apply`).
            Err(err(
                Code::Aborted,
                format!(
                    "host {host_id} cannot take VM {}: {}",
                    vm.id,
                    r.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ))
        }
    }

    pub fn policy(&self) -> Policy {
        Policy {
            strategy: pb::PlacementStrategy::try_from(self.settings.placement)
                .unwrap_or(pb::PlacementStrategy::Spread),
            cpu_overcommit_percent: self.settings.cpu_overcommit_percent,
            memory_overcommit_percent: self.settings.memory_overcommit_percent,
        }
    }

    pub fn candidate(&self, h: &pb::Host) -> HostCandidate {
        let info = h.info.clone().unwrap_or_default();
        let a = self.alloc.get(&h.id).cloned().unwrap_or_default();
        HostCandidate {
            id: h.id.clone(),
            state: h.state(),
            memory_bytes: if info.memory_available_bytes > 0 {
                info.memory_available_bytes
            } else {
                info.memory_total_bytes
            },
            logical_cpus: info.logical_cpus,
            memory_allocated_bytes: a.memory_bytes,
            vcpus_allocated: a.vcpus,
            cpu_features: info.cpu.map(|c| c.features).unwrap_or_default(),
            ip: address_ip(&h.address),
            groups: a.groups,
        }
    }

    pub fn candidates(&self) -> Vec<HostCandidate> {
        self.hosts.values().map(|h| self.candidate(h)).collect()
    }

    pub fn demand(&self, spec: &pb::VmSpec) -> Demand {
        let mut srs: Vec<SrReach> = Vec::new();
        for d in &spec.disks {
            if let Some(v) = self.volumes.get(&d.volume_id)
                && let Some(sr) = self.srs.get(&v.pool_id)
                && !srs.iter().any(|s| s.id == sr.id)
            {
                srs.push(SrReach {
                    id: sr.id.clone(),
                    reachable: sr.reachable,
                    shared: sr.shared,
                    ip: address_ip(&sr.address),
                });
            }
        }
        Demand {
            vcpus: spec.vcpus,
            memory_bytes: spec.memory_bytes,
            required_cpu_features: spec.required_cpu_features.clone(),
            affinity_group: spec.affinity_group.clone(),
            anti_affinity_group: spec.anti_affinity_group.clone(),
            srs,
        }
    }

    /// Recomputes what each host holds from the VMs (after any VM change).
    pub fn rebuild_alloc(&mut self) {
        let mut alloc: BTreeMap<String, Allocation> = BTreeMap::new();
        for vm in self.vms.values() {
            if vm.host_id.is_empty() {
                continue;
            }
            let spec = vm.spec.clone().unwrap_or_default();
            let a = alloc.entry(vm.host_id.clone()).or_default();
            a.memory_bytes += spec.memory_bytes;
            a.vcpus += spec.vcpus;
            a.vm_ids.insert(vm.id.clone());
            for g in [spec.affinity_group, spec.anti_affinity_group] {
                if !g.is_empty() && !a.groups.contains(&g) {
                    a.groups.push(g);
                }
            }
        }
        for (id, h) in self.hosts.iter_mut() {
            let a = alloc.get(id).cloned().unwrap_or_default();
            h.memory_allocated_bytes = a.memory_bytes;
            h.vcpus_allocated = a.vcpus;
            h.vm_ids = a.vm_ids.iter().cloned().collect();
        }
        self.alloc = alloc;
    }

    fn rebuild_alloc_host(&mut self, _host_id: &str) {
        self.rebuild_alloc();
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
                created_at: ts(ch.at_ms),
                finished_at: ts(ch.at_ms),
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
mod tests {
    use super::*;

    fn cmd(request_id: &str, at_ms: u64, op: Op) -> Command {
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

    fn join(id: &str, addr: &str) -> Op {
        Op::JoinHost(JoinHost {
            host_id: id.into(),
            name: id.into(),
            address: addr.into(),
        })
    }

    fn report(host: &str, mem_gib: u64, cpus: u32) -> Op {
        Op::HostReport(HostReport {
            host_id: host.into(),
            info: Some(hpb::HostInfo {
                memory_total_bytes: mem_gib << 30,
                memory_available_bytes: mem_gib << 30,
                logical_cpus: cpus,
                ..Default::default()
            }),
            metrics: None,
            vms: vec![],
        })
    }

    fn spec(name: &str, vcpus: u32, mem_gib: u64) -> pb::VmSpec {
        pb::VmSpec {
            name: name.into(),
            vcpus,
            memory_bytes: mem_gib << 30,
            ..Default::default()
        }
    }

    fn create_vm(id: &str, s: pb::VmSpec, host: &str) -> Op {
        Op::CreateVm(CreateVm {
            vm_id: id.into(),
            spec: Some(s),
            template_id: String::new(),
            start_on_host: host.into(),
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
                    }],
                    ..Default::default()
                }),
            ),
        );
        assert_eq!(s.hosts["h1"].vcpus_allocated, 0);
        assert!(s.vms["vm1"].host_id.is_empty());
        assert_eq!(s.tasks["task-s"].state, pb::TaskState::Succeeded as i32);
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
