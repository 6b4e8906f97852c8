//! `PoolService`: the pool as people and tools see it, served by every member.
//!
//! Every call is authorized first ([`crate::auth`]: the caller's token and roles against
//! the method); every call that changes the pool is written to the audit log, by the
//! state machine when the change reaches the log, here when it is refused before.
//! Changes that need storaged or hostd start a job ([`crate::jobs`]) and answer with its
//! task, finished when the job took less than [`QUICK`].

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::coordinator as pb;
use proto::coordinator::pool_service_server::PoolService;
use proto::host as hpb;
use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use tonic::codegen::tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::auth::{self, Caller};
use crate::coordinator::{AUDITED, Coordinator, node_status, task_finished};
use crate::scheduler;
use crate::state::command::*;

/// How long a call waits for the job it started before answering with the running task.
pub const QUICK: Duration = Duration::from_secs(3);

/// How long a leadership transfer may take: the new leader must first have the whole log.
const LEADERSHIP_TRANSFER_DEADLINE: Duration = Duration::from_secs(5);

pub struct PoolApi {
    pub c: Arc<Coordinator>,
    pub hosts: Arc<dyn crate::backend::HostOps>,
    pub storage: Arc<dyn crate::backend::StorageOps>,
}

type R<T> = Result<Response<T>, Status>;

fn need(field: &str, v: &str) -> Result<(), Status> {
    if v.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

/// Pagination over an ordered list: the token is the last id of the previous page.
fn page<T: Clone>(
    items: impl Iterator<Item = (String, T)>,
    p: Option<&pb::PageRequest>,
) -> (Vec<T>, String) {
    let size = p.map_or(0, |p| p.page_size).clamp(0, 1000);
    let size = if size == 0 { 1000 } else { size as usize };
    let after = p.map(|p| p.page_token.clone()).unwrap_or_default();
    let mut out = Vec::new();
    let mut last = String::new();
    let mut more = false;
    for (id, v) in items {
        if !after.is_empty() && id <= after {
            continue;
        }
        if out.len() == size {
            more = true;
            break;
        }
        last = id;
        out.push(v);
    }
    (out, if more { last } else { String::new() })
}

fn job(spec: JobSpec) -> Op {
    Op::StartJob(Job {
        spec: Some(spec),
        ..Default::default()
    })
}

/// A job-layer refusal as the call's answer.
fn job_status(e: crate::jobs::JobError) -> Status {
    match e {
        crate::jobs::JobError::Refused { code, message } => Status::new(code, message),
        crate::jobs::JobError::Transient { what, source } => {
            Status::new(source.code(), format!("{what}: {}", source.message()))
        }
        other => Status::unavailable(other.to_string()),
    }
}

impl PoolApi {
    fn env(&self) -> crate::jobs::Env {
        crate::jobs::Env {
            ledger: self.c.clone(),
            storage: self.storage.clone(),
            hosts: self.hosts.clone(),
        }
    }

    /// Audits a grant or a revoke, whichever way it went.
    fn audit_access<T>(&self, who: &Caller, r: &pb::VolumeAccessRequest, res: &Result<T, Status>) {
        let ok = Status::ok(format!("{} for {}", r.volume_id, r.initiator_iqn));
        self.audit(who, res.as_ref().err().unwrap_or(&ok));
    }

    /// Where a volume is and its size; refused while a VM that is not stopped uses it
    /// (blocks written under a running guest would corrupt its disk).
    async fn volume_for_access(
        &self,
        volume_id: &str,
    ) -> Result<(crate::jobs::storage::SrLoc, u64), Status> {
        self.c
            .read(|s| {
                let loc = crate::jobs::storage::volume_loc(s, volume_id).map_err(job_status)?;
                let size = s.volumes[volume_id].virtual_size_bytes;
                let user = s.vms.values().find(|vm| {
                    let uses = vm
                        .spec
                        .as_ref()
                        .is_some_and(|sp| sp.disks.iter().any(|d| d.volume_id == volume_id));
                    let stopped = vm.desired_power_state() == hpb::PowerState::Stopped
                        && vm.power_state() == hpb::PowerState::Stopped;
                    uses && !stopped
                });
                if let Some(vm) = user {
                    return Err(Status::failed_precondition(format!(
                        "volume {volume_id} is a disk of VM {} which is not stopped: shut it \
                         down, or export a snapshot of the volume",
                        vm.spec.as_ref().map_or(vm.id.as_str(), |s| s.name.as_str())
                    )));
                }
                Ok((loc, size))
            })
            .await?
    }
    /// Authorizes a call; a refused change is audited.
    fn who<T>(&self, r: &Request<T>, method: &str) -> Result<Caller, Status> {
        let header = r
            .metadata()
            .get(auth::HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let peer = r.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let decided = auth::authorize(
            &self.c.node.state(),
            header.as_deref(),
            method,
            &peer,
            crate::consensus::node::stamp(),
        );
        decided.map_err(|e| {
            let name = match &e {
                auth::AuthError::Denied { user, .. } => user.clone(),
                _ => "(not logged in)".into(),
            };
            let s = Status::from(e);
            if auth::rule(method).1 {
                let who = Caller {
                    name,
                    level: auth::Level::ReadOnly,
                    method: method.to_owned(),
                    peer,
                };
                self.audit(&who, &s);
            }
            s
        })
    }

    /// Writes a refusal that never reached the log to the audit log (in the background:
    /// the caller hears the refusal at once).
    fn audit(&self, who: &Caller, s: &Status) {
        let c = self.c.clone();
        let e = pb::AuditEvent {
            user_name: who.name.clone(),
            method: who.method.clone(),
            result: if s.code() == tonic::Code::Ok {
                "OK".into()
            } else {
                format!("{:?}", s.code())
            },
            detail: s.message().to_owned(),
            peer_address: who.peer.clone(),
            ..Default::default()
        };
        tokio::spawn(async move {
            let cmd = c.command(&Caller::internal(), "", Op::Audit(e));
            if let Err(err) = c.submit(&cmd).await {
                tracing::warn!(error = %err, "audit event not recorded");
            }
        });
    }

    /// The answer of a change: its task, or its refusal (audited unless the state machine
    /// already did).
    fn done(&self, who: &Caller, r: Result<pb::Task, Status>) -> R<pb::TaskResponse> {
        match r {
            Ok(t) => Ok(Response::new(pb::TaskResponse { task: Some(t) })),
            Err(s) => {
                if !s.metadata().contains_key(AUDITED) {
                    self.audit(who, &s);
                }
                Err(s)
            }
        }
    }

    async fn start_job(
        &self,
        who: &Caller,
        request_id: &str,
        spec: JobSpec,
    ) -> Result<pb::Task, Status> {
        self.c
            .write_and_wait(who, request_id, job(spec), QUICK)
            .await
    }

    async fn member_change(
        &self,
        who: &Caller,
        request_id: &str,
        changes: Vec<(ConfChangeType, u64)>,
        members: Vec<MemberRecord>,
    ) -> Result<pb::Task, Status> {
        if let Some(prev) = self
            .c
            .read(|s| s.lookup_request(request_id, "pool.member_change"))
            .await?
        {
            return prev.into_status();
        }
        let mut cc = ConfChangeV2::default();
        for (t, id) in &changes {
            let mut one = ConfChangeSingle::default();
            one.change_type = *t;
            one.node_id = *id;
            cc.changes.push(one);
        }
        // More than one change (a replacement) goes through joint consensus, left
        // automatically once the joint configuration commits.
        cc.transition = ConfChangeTransition::Auto;
        let ch = MemberChange {
            members,
            request_id: request_id.to_owned(),
            task_id: uuid::Uuid::new_v4().to_string(),
            at_ms: crate::consensus::node::stamp(),
        };
        cc.context = prost::Message::encode_to_vec(&ch).into();
        if !self.c.is_leader() {
            let st = self.c.node.status();
            return Err(Status::unavailable(format!(
                "membership changes are made on the leader (member {}); retry there",
                st.leader_id
            )));
        }
        let (r, _) = self.c.node.conf_change(cc).await.map_err(node_status)?;
        let t = r.into_status()?;
        // A membership change is not a state-machine command: audit it here.
        self.audit(who, &Status::new(tonic::Code::Ok, format!("task {}", t.id)));
        Ok(t)
    }

    async fn set_power(
        &self,
        who: &Caller,
        r: pb::VmPowerRequest,
        desired: hpb::PowerState,
    ) -> Result<pb::Task, Status> {
        need("vm_id", &r.vm_id)?;
        if desired == hpb::PowerState::Running {
            let vm = self
                .c
                .read(|s| s.vms.get(&r.vm_id).cloned())
                .await?
                .ok_or_else(|| Status::not_found(format!("no VM with id {}", r.vm_id)))?;
            if vm.host_id.is_empty() {
                let spec = vm.spec.clone().unwrap_or_default();
                let vm_id = r.vm_id.clone();
                return self
                    .c
                    .place_and_commit(who, &r.request_id, &spec, &r.host_id, |host| {
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
        self.c.write(who, &r.request_id, op).await
    }

    fn volume_job(&self, action: VolumeAction) -> VolumeJob {
        VolumeJob {
            action: action as i32,
            ..Default::default()
        }
    }

    async fn create_vm_inner(
        &self,
        who: &Caller,
        r: pb::CreateVmRequest,
    ) -> Result<pb::Task, Status> {
        if let Some(prev) = self
            .c
            .read(|s| s.lookup_request(&r.request_id, "vm.create"))
            .await?
        {
            return prev.into_status();
        }
        let vm_id = uuid::Uuid::new_v4().to_string();
        let (spec, template_id) = match r.source {
            Some(pb::create_vm_request::Source::TemplateId(tid)) => {
                let t = self
                    .c
                    .read(|s| s.templates.get(&tid).cloned())
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no template with id {tid}")))?;
                let mut spec = t.spec.clone().unwrap_or_default();
                // What the request says of the VM replaces the template's.
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
                    // The template's disks are cloned by a job; a start is placed once
                    // the VM exists.
                    return self
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
        if r.start || !r.host_id.is_empty() {
            return self
                .c
                .place_and_commit(who, &r.request_id, &spec, &r.host_id, |host| {
                    Op::CreateVm(CreateVm {
                        vm_id: vm_id.clone(),
                        spec: Some(spec.clone()),
                        template_id: template_id.clone(),
                        start_on_host: host,
                    })
                })
                .await;
        }
        let op = Op::CreateVm(CreateVm {
            vm_id,
            spec: Some(spec),
            template_id,
            start_on_host: String::new(),
        });
        self.c.write(who, &r.request_id, op).await
    }

    async fn migrate_inner(
        &self,
        who: &Caller,
        r: pb::MigrateVmRequest,
    ) -> Result<pb::Task, Status> {
        need("vm_id", &r.vm_id)?;
        if let Some(prev) = self
            .c
            .read(|s| s.lookup_request(&r.request_id, "vm.migrate"))
            .await?
        {
            return prev.into_status();
        }
        let (vm, budget) = self
            .c
            .read(|s| {
                (
                    s.vms.get(&r.vm_id).cloned(),
                    s.settings.migration_downtime_budget_ms,
                )
            })
            .await?;
        let vm = vm.ok_or_else(|| Status::not_found(format!("no VM with id {}", r.vm_id)))?;
        let dest = self.destination(&vm, &r.destination_host_id).await?;
        self.start_job(
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
    async fn destination(&self, vm: &pb::Vm, given: &str) -> Result<String, Status> {
        if !given.is_empty() {
            return Ok(given.to_owned());
        }
        let spec = vm.spec.clone().unwrap_or_default();
        self.c
            .read(|s| {
                let hosts: Vec<_> = s
                    .candidates()
                    .into_iter()
                    .filter(|h| h.id != vm.host_id)
                    .collect();
                scheduler::place(&hosts, &s.demand(&spec), &s.policy())
                    .map(|i| hosts[i].id.clone())
                    .map_err(|u| Status::resource_exhausted(u.to_string()))
            })
            .await?
    }
}

#[tonic::async_trait]
impl PoolService for PoolApi {
    async fn get_pool(&self, r: Request<pb::GetPoolRequest>) -> R<pb::Pool> {
        self.who(&r, "GetPool")?;
        let st = self.c.node.status();
        let p = self
            .c
            .read(|s| pb::Pool {
                id: s.pool_id.clone(),
                settings: Some(s.settings.clone()),
                leader_member_id: st.leader_id.to_string(),
                raft_term: st.term,
                commit_index: st.commit_index,
                host_count: s.hosts.len() as u32,
                vm_count: s.vms.len() as u32,
                ha: Some(s.ha),
            })
            .await?;
        Ok(Response::new(p))
    }

    async fn update_pool_settings(
        &self,
        r: Request<pb::UpdatePoolSettingsRequest>,
    ) -> R<pb::TaskResponse> {
        let who = self.who(&r, "UpdatePoolSettings")?;
        let r = r.into_inner();
        let res = async {
            let s = r
                .settings
                .ok_or_else(|| Status::invalid_argument("settings are required"))?;
            crate::state::machine::validate_settings(&s)
                .map_err(|e| e.into_status().unwrap_err())?;
            self.c
                .write(&who, &r.request_id, Op::UpdateSettings(s))
                .await
        }
        .await;
        self.done(&who, res)
    }

    async fn list_members(&self, r: Request<pb::ListMembersRequest>) -> R<pb::ListMembersResponse> {
        self.who(&r, "ListMembers")?;
        let st = self.c.node.status();
        let members = self.c.read(|s| s.members.clone()).await?;
        let mut ids: Vec<u64> = st
            .voters
            .iter()
            .chain(&st.learners)
            .chain(&st.voters_outgoing)
            .copied()
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let out = ids
            .into_iter()
            .map(|id| {
                let (matched, active) = st.progress.get(&id).copied().unwrap_or((0, id == st.id));
                pb::Member {
                    id,
                    address: members.get(&id).cloned().unwrap_or_default(),
                    role: if st.learners.contains(&id) {
                        pb::MemberRole::Learner
                    } else {
                        pb::MemberRole::Voter
                    } as i32,
                    leader: id == st.leader_id,
                    reachable: active,
                    match_index: matched,
                }
            })
            .collect();
        Ok(Response::new(pb::ListMembersResponse { members: out }))
    }

    async fn add_member(&self, r: Request<pb::AddMemberRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "AddMember")?;
        let r = r.into_inner();
        let res = async {
            if r.member_id == 0 {
                return Err(Status::invalid_argument("member_id must be non-zero"));
            }
            r.address
                .parse::<std::net::SocketAddr>()
                .map_err(|e| Status::invalid_argument(format!("address {:?}: {e}", r.address)))?;
            let learner = r.role == pb::MemberRole::Learner as i32;
            let mut changes = vec![(
                if learner {
                    ConfChangeType::AddLearnerNode
                } else {
                    ConfChangeType::AddNode
                },
                r.member_id,
            )];
            if r.replaces_member_id != 0 {
                if r.replaces_member_id == r.member_id {
                    return Err(Status::invalid_argument("a member cannot replace itself"));
                }
                changes.push((ConfChangeType::RemoveNode, r.replaces_member_id));
            }
            self.member_change(
                &who,
                &r.request_id,
                changes,
                vec![MemberRecord {
                    id: r.member_id,
                    address: r.address.clone(),
                }],
            )
            .await
        }
        .await;
        self.done(&who, res)
    }

    async fn remove_member(&self, r: Request<pb::RemoveMemberRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "RemoveMember")?;
        let r = r.into_inner();
        let res = self
            .member_change(
                &who,
                &r.request_id,
                vec![(ConfChangeType::RemoveNode, r.member_id)],
                vec![],
            )
            .await;
        self.done(&who, res)
    }

    async fn open_volume_access(&self, r: Request<pb::VolumeAccessRequest>) -> R<pb::VolumeAccess> {
        let who = self.who(&r, "OpenVolumeAccess")?;
        let r = r.into_inner();
        let res = async {
            need("volume_id", &r.volume_id)?;
            need("initiator_iqn", &r.initiator_iqn)?;
            let (loc, size) = self.volume_for_access(&r.volume_id).await?;
            let env = self.env();
            let export = crate::jobs::vm::export_of(&env, &loc, &r.volume_id)
                .await
                .map_err(job_status)?;
            self.storage
                .grant(&loc.address, &export.id, &r.initiator_iqn)
                .await?;
            let portal = export.portals.first().cloned().ok_or_else(|| {
                Status::failed_precondition(format!(
                    "storaged at {} lists no iSCSI portal",
                    loc.address
                ))
            })?;
            Ok(pb::VolumeAccess {
                portal,
                target_iqn: export.target_iqn,
                lun: export.lun,
                size_bytes: size,
            })
        }
        .await;
        self.audit_access(&who, &r, &res);
        res.map(Response::new)
    }

    async fn close_volume_access(
        &self,
        r: Request<pb::VolumeAccessRequest>,
    ) -> R<pb::CloseVolumeAccessResponse> {
        let who = self.who(&r, "CloseVolumeAccess")?;
        let r = r.into_inner();
        let res = async {
            need("volume_id", &r.volume_id)?;
            need("initiator_iqn", &r.initiator_iqn)?;
            let loc = self
                .c
                .read(|s| crate::jobs::storage::volume_loc(s, &r.volume_id))
                .await?
                .map_err(job_status)?;
            let mut dropped = 0;
            for e in self
                .storage
                .list_exports(&loc.address, &r.volume_id)
                .await?
            {
                dropped += self
                    .storage
                    .revoke(&loc.address, &e.id, &r.initiator_iqn)
                    .await?;
            }
            Ok(pb::CloseVolumeAccessResponse {
                sessions_dropped: dropped,
            })
        }
        .await;
        self.audit_access(&who, &r, &res);
        res.map(Response::new)
    }

    async fn transfer_leadership(
        &self,
        r: Request<pb::TransferLeadershipRequest>,
    ) -> R<pb::TransferLeadershipResponse> {
        let who = self.who(&r, "TransferLeadership")?;
        let to = r.into_inner().member_id;
        let res = async {
            if to == 0 {
                return Err(Status::invalid_argument("member_id must be non-zero"));
            }
            // Not the leader: Unavailable, and the client retries on the leader.
            self.c.node.transfer_leader(to).await.map_err(node_status)?;
            let deadline = tokio::time::Instant::now() + LEADERSHIP_TRANSFER_DEADLINE;
            loop {
                let (mut leader, mut term) = {
                    let st = self.c.node.shared.status.lock().expect("status lock");
                    (st.leader_id, st.term)
                };
                // A leader that is leaving the group hears nothing from its successor, so
                // ask the successor itself.
                if leader != to
                    && let Ok(mut p) = self.c.peer_client(to)
                    && let Ok(Ok(st)) = tokio::time::timeout(
                        Duration::from_millis(500),
                        p.get_member_status(pb::MemberStatusRequest {}),
                    )
                    .await
                {
                    let st = st.into_inner();
                    if st.leader_id == to {
                        (leader, term) = (to, st.term);
                    }
                }
                if leader == to {
                    return Ok(pb::TransferLeadershipResponse {
                        leader_id: leader,
                        term,
                    });
                }
                if tokio::time::Instant::now() >= deadline {
                    return Err(Status::deadline_exceeded(format!(
                        "member {to} did not take over within {LEADERSHIP_TRANSFER_DEADLINE:?} \
                         (leader now {leader}); it may be behind or unreachable: check \
                         ListMembers and try again"
                    )));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        .await;
        if let Err(s) = &res {
            self.audit(&who, s);
        } else {
            self.audit(
                &who,
                &Status::ok(format!("leadership moved to member {to}")),
            );
        }
        res.map(Response::new)
    }

    async fn join_host(&self, r: Request<pb::JoinHostRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "JoinHost")?;
        let r = r.into_inner();
        let res = async {
            need("address", &r.address)?;
            let name = if r.name.is_empty() {
                r.address.clone()
            } else {
                r.name
            };
            let op = Op::JoinHost(JoinHost {
                host_id: uuid::Uuid::new_v4().to_string(),
                name,
                address: r.address,
            });
            self.c.write(&who, &r.request_id, op).await
        }
        .await;
        self.done(&who, res)
    }

    async fn get_host(&self, r: Request<pb::GetHostRequest>) -> R<pb::Host> {
        self.who(&r, "GetHost")?;
        let id = r.into_inner().host_id;
        self.c
            .read(|s| s.hosts.get(&id).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no host with id {id}")))
    }

    async fn list_hosts(&self, r: Request<pb::ListHostsRequest>) -> R<pb::ListHostsResponse> {
        self.who(&r, "ListHosts")?;
        let r = r.into_inner();
        let (hosts, next) = self
            .c
            .read(|s| {
                page(
                    s.hosts
                        .iter()
                        .filter(|(_, h)| r.state == 0 || h.state == r.state)
                        .map(|(k, v)| (k.clone(), v.clone())),
                    r.page.as_ref(),
                )
            })
            .await?;
        Ok(Response::new(pb::ListHostsResponse {
            hosts,
            next_page_token: next,
        }))
    }

    async fn enable_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "EnableHost")?;
        let r = r.into_inner();
        let op = Op::SetHostState(SetHostState {
            host_id: r.host_id,
            state: pb::HostState::Enabled as i32,
        });
        let res = self.c.write(&who, &r.request_id, op).await;
        self.done(&who, res)
    }

    async fn disable_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "DisableHost")?;
        let r = r.into_inner();
        let op = Op::SetHostState(SetHostState {
            host_id: r.host_id,
            state: pb::HostState::Disabled as i32,
        });
        let res = self.c.write(&who, &r.request_id, op).await;
        self.done(&who, res)
    }

    async fn evacuate_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "EvacuateHost")?;
        let r = r.into_inner();
        let res = async {
            need("host_id", &r.host_id)?;
            let vms: Vec<pb::Vm> = self
                .c
                .read(|s| {
                    s.vms
                        .values()
                        .filter(|v| v.host_id == r.host_id)
                        .cloned()
                        .collect()
                })
                .await?;
            if vms.is_empty() {
                let op = Op::SetHostState(SetHostState {
                    host_id: r.host_id.clone(),
                    state: pb::HostState::Maintenance as i32,
                });
                return self.c.write(&who, &r.request_id, op).await;
            }
            // No new VM lands here meanwhile; each VM is live-migrated by a job of its
            // own; the last one to finish puts the host in maintenance.
            let op = Op::SetHostState(SetHostState {
                host_id: r.host_id.clone(),
                state: pb::HostState::Disabled as i32,
            });
            self.c
                .write(&who, &format!("{}-disable", r.request_id), op)
                .await?;
            let budget = self
                .c
                .read(|s| s.settings.migration_downtime_budget_ms)
                .await?;
            let mut first = None;
            for vm in vms {
                let dest = self.destination(&vm, "").await?;
                let t = self
                    .c
                    .write(
                        &who,
                        &format!("{}-{}", r.request_id, vm.id),
                        job(JobSpec::MigrateVm(MigrateVmJob {
                            vm_id: vm.id.clone(),
                            source_host_id: r.host_id.clone(),
                            destination_host_id: dest,
                            downtime_budget_ms: budget,
                            auto_converge: true,
                            token: uuid::Uuid::new_v4().simple().to_string(),
                            evacuating_host_id: r.host_id.clone(),
                        })),
                    )
                    .await?;
                first.get_or_insert(t);
            }
            Ok(first.expect("at least one VM"))
        }
        .await;
        self.done(&who, res)
    }

    async fn remove_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "RemoveHost")?;
        let r = r.into_inner();
        let res = self
            .c
            .write(
                &who,
                &r.request_id,
                Op::RemoveHost(ObjectId { id: r.host_id }),
            )
            .await;
        self.done(&who, res)
    }

    async fn create_storage_repository(
        &self,
        r: Request<pb::CreateStorageRepositoryRequest>,
    ) -> R<pb::TaskResponse> {
        let who = self.who(&r, "CreateStorageRepository")?;
        let r = r.into_inner();
        let res = async {
            need("name", &r.name)?;
            need("address", &r.address)?;
            if r.thin_pool_id.is_empty() && r.create_pool.is_none() {
                return Err(Status::invalid_argument(
                    "give thin_pool_id (adopt an existing thin pool of that storaged) or create_pool",
                ));
            }
            let sr = pb::StorageRepository {
                id: uuid::Uuid::new_v4().to_string(),
                name: r.name,
                address: r.address,
                thin_pool_id: r.thin_pool_id,
                portals: vec![],
                usage: None,
                shared: true,
                reachable: true,
            };
            self.start_job(
                &who,
                &r.request_id,
                JobSpec::CreateSr(CreateSrJob {
                    sr: Some(sr),
                    create_pool: r.create_pool,
                }),
            )
            .await
        }
        .await;
        self.done(&who, res)
    }

    async fn get_storage_repository(
        &self,
        r: Request<pb::GetStorageRepositoryRequest>,
    ) -> R<pb::StorageRepository> {
        self.who(&r, "GetStorageRepository")?;
        let id = r.into_inner().sr_id;
        self.c
            .read(|s| s.srs.get(&id).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no storage repository with id {id}")))
    }

    async fn list_storage_repositories(
        &self,
        r: Request<pb::ListStorageRepositoriesRequest>,
    ) -> R<pb::ListStorageRepositoriesResponse> {
        self.who(&r, "ListStorageRepositories")?;
        let r = r.into_inner();
        let (repositories, next) = self
            .c
            .read(|s| {
                page(
                    s.srs.iter().map(|(k, v)| (k.clone(), v.clone())),
                    r.page.as_ref(),
                )
            })
            .await?;
        Ok(Response::new(pb::ListStorageRepositoriesResponse {
            repositories,
            next_page_token: next,
        }))
    }

    async fn remove_storage_repository(
        &self,
        r: Request<pb::RemoveStorageRepositoryRequest>,
    ) -> R<pb::TaskResponse> {
        let who = self.who(&r, "RemoveStorageRepository")?;
        let r = r.into_inner();
        let res = self
            .c
            .write(&who, &r.request_id, Op::RemoveSr(ObjectId { id: r.sr_id }))
            .await;
        self.done(&who, res)
    }

    async fn create_volume(&self, r: Request<pb::CreateVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "CreateVolume")?;
        let r = r.into_inner();
        let res = async {
            need("sr_id", &r.sr_id)?;
            need("name", &r.name)?;
            let v = VolumeJob {
                sr_id: r.sr_id,
                name: r.name,
                size_bytes: r.virtual_size_bytes,
                labels: r.labels,
                ..self.volume_job(VolumeAction::Create)
            };
            self.start_job(&who, &r.request_id, JobSpec::Volume(v))
                .await
        }
        .await;
        self.done(&who, res)
    }

    async fn get_volume(&self, r: Request<pb::GetVolumeRequest>) -> R<proto::storage::Volume> {
        self.who(&r, "GetVolume")?;
        let id = r.into_inner().volume_id;
        self.c
            .read(|s| s.volumes.get(&id).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no volume with id {id}")))
    }

    async fn list_volumes(&self, r: Request<pb::ListVolumesRequest>) -> R<pb::ListVolumesResponse> {
        self.who(&r, "ListVolumes")?;
        let r = r.into_inner();
        let (volumes, next) = self
            .c
            .read(|s| {
                page(
                    s.volumes
                        .iter()
                        .filter(|(_, v)| r.sr_id.is_empty() || v.pool_id == r.sr_id)
                        .map(|(k, v)| (k.clone(), v.clone())),
                    r.page.as_ref(),
                )
            })
            .await?;
        Ok(Response::new(pb::ListVolumesResponse {
            volumes,
            next_page_token: next,
        }))
    }

    async fn resize_volume(&self, r: Request<pb::ResizeVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "ResizeVolume")?;
        let r = r.into_inner();
        let v = VolumeJob {
            volume_id: r.volume_id,
            size_bytes: r.new_virtual_size_bytes,
            force: r.force,
            ..self.volume_job(VolumeAction::Resize)
        };
        let res = self
            .start_job(&who, &r.request_id, JobSpec::Volume(v))
            .await;
        self.done(&who, res)
    }

    async fn snapshot_volume(&self, r: Request<pb::SnapshotVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "SnapshotVolume")?;
        let r = r.into_inner();
        let v = VolumeJob {
            volume_id: r.volume_id,
            name: r.name,
            ..self.volume_job(VolumeAction::Snapshot)
        };
        let res = self
            .start_job(&who, &r.request_id, JobSpec::Volume(v))
            .await;
        self.done(&who, res)
    }

    async fn clone_volume(&self, r: Request<pb::CloneVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "CloneVolume")?;
        let r = r.into_inner();
        let v = VolumeJob {
            volume_id: r.source_id,
            name: r.name,
            ..self.volume_job(VolumeAction::Clone)
        };
        let res = self
            .start_job(&who, &r.request_id, JobSpec::Volume(v))
            .await;
        self.done(&who, res)
    }

    async fn revert_volume(&self, r: Request<pb::RevertVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "RevertVolume")?;
        let r = r.into_inner();
        let v = VolumeJob {
            volume_id: r.volume_id,
            snapshot_id: r.snapshot_id,
            ..self.volume_job(VolumeAction::Revert)
        };
        let res = self
            .start_job(&who, &r.request_id, JobSpec::Volume(v))
            .await;
        self.done(&who, res)
    }

    async fn delete_volume(&self, r: Request<pb::DeleteVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "DeleteVolume")?;
        let r = r.into_inner();
        let v = VolumeJob {
            volume_id: r.volume_id,
            ..self.volume_job(VolumeAction::Delete)
        };
        let res = self
            .start_job(&who, &r.request_id, JobSpec::Volume(v))
            .await;
        self.done(&who, res)
    }

    async fn create_vm(&self, r: Request<pb::CreateVmRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "CreateVm")?;
        let res = self.create_vm_inner(&who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn get_vm(&self, r: Request<pb::GetVmRequest>) -> R<pb::Vm> {
        self.who(&r, "GetVm")?;
        let id = r.into_inner().vm_id;
        self.c
            .read(|s| s.vms.get(&id).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no VM with id {id}")))
    }

    async fn list_vms(&self, r: Request<pb::ListVmsRequest>) -> R<pb::ListVmsResponse> {
        self.who(&r, "ListVms")?;
        let r = r.into_inner();
        let (vms, next) = self
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
        Ok(Response::new(pb::ListVmsResponse {
            vms,
            next_page_token: next,
        }))
    }

    async fn update_vm(&self, r: Request<pb::UpdateVmRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "UpdateVm")?;
        let r = r.into_inner();
        let res = async {
            need("vm_id", &r.vm_id)?;
            let op = Op::UpdateVm(UpdateVm {
                vm_id: r.vm_id,
                spec: r.spec,
            });
            self.c.write(&who, &r.request_id, op).await
        }
        .await;
        self.done(&who, res)
    }

    async fn start_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "StartVm")?;
        let res = self
            .set_power(&who, r.into_inner(), hpb::PowerState::Running)
            .await;
        self.done(&who, res)
    }

    async fn shutdown_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "ShutdownVm")?;
        let res = self
            .set_power(&who, r.into_inner(), hpb::PowerState::Stopped)
            .await;
        self.done(&who, res)
    }

    async fn reboot_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "RebootVm")?;
        let r = r.into_inner();
        let res = self
            .start_job(
                &who,
                &r.request_id,
                JobSpec::RebootVm(RebootVmJob {
                    vm_id: r.vm_id,
                    force: r.force,
                }),
            )
            .await;
        self.done(&who, res)
    }

    async fn pause_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "PauseVm")?;
        let res = self
            .set_power(&who, r.into_inner(), hpb::PowerState::Paused)
            .await;
        self.done(&who, res)
    }

    async fn resume_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "ResumeVm")?;
        let res = self
            .set_power(&who, r.into_inner(), hpb::PowerState::Running)
            .await;
        self.done(&who, res)
    }

    async fn destroy_vm(&self, r: Request<pb::DestroyVmRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "DestroyVm")?;
        let r = r.into_inner();
        let res = self
            .start_job(
                &who,
                &r.request_id,
                JobSpec::DestroyVm(DestroyVmJob {
                    vm_id: r.vm_id,
                    delete_disks: r.delete_disks,
                }),
            )
            .await;
        self.done(&who, res)
    }

    async fn migrate_vm(&self, r: Request<pb::MigrateVmRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "MigrateVm")?;
        let res = self.migrate_inner(&who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn snapshot_vm(&self, r: Request<pb::SnapshotVmRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "SnapshotVm")?;
        let r = r.into_inner();
        let res = async {
            need("vm_id", &r.vm_id)?;
            need("name", &r.name)?;
            self.start_job(
                &who,
                &r.request_id,
                JobSpec::SnapshotVm(SnapshotVmJob {
                    snapshot_id: uuid::Uuid::new_v4().to_string(),
                    vm_id: r.vm_id,
                    name: r.name,
                }),
            )
            .await
        }
        .await;
        self.done(&who, res)
    }

    async fn list_vm_snapshots(
        &self,
        r: Request<pb::ListVmSnapshotsRequest>,
    ) -> R<pb::ListVmSnapshotsResponse> {
        self.who(&r, "ListVmSnapshots")?;
        let r = r.into_inner();
        let (snapshots, next) = self
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
        Ok(Response::new(pb::ListVmSnapshotsResponse {
            snapshots,
            next_page_token: next,
        }))
    }

    async fn revert_vm(&self, r: Request<pb::RevertVmRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "RevertVm")?;
        let r = r.into_inner();
        let res = self
            .start_job(
                &who,
                &r.request_id,
                JobSpec::RevertVm(RevertVmJob {
                    vm_id: r.vm_id,
                    snapshot_id: r.snapshot_id,
                }),
            )
            .await;
        self.done(&who, res)
    }

    async fn clone_vm(&self, r: Request<pb::CloneVmRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "CloneVm")?;
        let r = r.into_inner();
        let res = async {
            need("source_id", &r.source_id)?;
            need("name", &r.name)?;
            self.start_job(
                &who,
                &r.request_id,
                JobSpec::CloneVm(CloneVmJob {
                    vm_id: uuid::Uuid::new_v4().to_string(),
                    source_id: r.source_id,
                    name: r.name,
                }),
            )
            .await
        }
        .await;
        self.done(&who, res)
    }

    type StreamVmConsoleStream =
        Pin<Box<dyn Stream<Item = Result<hpb::ConsoleOutput, Status>> + Send + 'static>>;

    async fn stream_vm_console(
        &self,
        r: Request<tonic::Streaming<hpb::ConsoleInput>>,
    ) -> R<Self::StreamVmConsoleStream> {
        self.who(&r, "StreamVmConsole")?;
        let mut input = r.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the first message must name the VM"))?;
        let vm_id = first.vm_id.clone();
        let addr = self
            .c
            .read(|s| {
                let vm = s
                    .vms
                    .get(&vm_id)
                    .ok_or_else(|| Status::not_found(format!("no VM with id {vm_id}")))?;
                s.hosts
                    .get(&vm.host_id)
                    .map(|h| h.address.clone())
                    .ok_or_else(|| {
                        Status::failed_precondition(format!(
                            "VM {vm_id} is not on any host; start it first"
                        ))
                    })
            })
            .await??;
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::internal(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .connect()
            .await
            .map_err(|e| Status::unavailable(format!("host {addr}: {e}")))?;
        // The host's stream: the first message, then the client's input as it comes.
        let rest = input.take_while(|m| m.is_ok()).filter_map(|m| m.ok());
        let upstream = tonic::codegen::tokio_stream::iter(vec![first]).chain(rest);
        let out = hpb::host_service_client::HostServiceClient::new(ch)
            .stream_console(upstream)
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(out)))
    }

    async fn explain_placement(
        &self,
        r: Request<pb::ExplainPlacementRequest>,
    ) -> R<pb::ExplainPlacementResponse> {
        self.who(&r, "ExplainPlacement")?;
        let r = r.into_inner();
        let resp = self
            .c
            .read(|s| {
                let spec = if !r.vm_id.is_empty() {
                    s.vms
                        .get(&r.vm_id)
                        .and_then(|v| v.spec.clone())
                        .ok_or_else(|| Status::not_found(format!("no VM with id {}", r.vm_id)))?
                } else {
                    r.spec.clone().ok_or_else(|| {
                        Status::invalid_argument("give a vm_id or a spec to place")
                    })?
                };
                let hosts = s.candidates();
                let (best, verdicts) = scheduler::explain(&hosts, &s.demand(&spec), &s.policy());
                Ok::<_, Status>(pb::ExplainPlacementResponse {
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
            .await??;
        Ok(Response::new(resp))
    }

    async fn create_template(&self, r: Request<pb::CreateTemplateRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "CreateTemplate")?;
        let r = r.into_inner();
        let res = async {
            need("name", &r.name)?;
            match r.source {
                Some(pb::create_template_request::Source::Spec(spec)) => {
                    let t = pb::Template {
                        id: uuid::Uuid::new_v4().to_string(),
                        name: r.name,
                        spec: Some(spec),
                        disk_volumes: Default::default(),
                        created_at: None,
                    };
                    self.c
                        .write(&who, &r.request_id, Op::CreateTemplate(t))
                        .await
                }
                Some(pb::create_template_request::Source::VmId(vm_id)) => {
                    self.start_job(
                        &who,
                        &r.request_id,
                        JobSpec::TemplateFromVm(TemplateFromVmJob {
                            template_id: uuid::Uuid::new_v4().to_string(),
                            vm_id,
                            name: r.name,
                        }),
                    )
                    .await
                }
                None => Err(Status::invalid_argument("give a spec or a vm_id")),
            }
        }
        .await;
        self.done(&who, res)
    }

    async fn get_template(&self, r: Request<pb::GetTemplateRequest>) -> R<pb::Template> {
        self.who(&r, "GetTemplate")?;
        let id = r.into_inner().template_id;
        self.c
            .read(|s| s.templates.get(&id).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no template with id {id}")))
    }

    async fn list_templates(
        &self,
        r: Request<pb::ListTemplatesRequest>,
    ) -> R<pb::ListTemplatesResponse> {
        self.who(&r, "ListTemplates")?;
        let r = r.into_inner();
        let (templates, next) = self
            .c
            .read(|s| {
                page(
                    s.templates.iter().map(|(k, v)| (k.clone(), v.clone())),
                    r.page.as_ref(),
                )
            })
            .await?;
        Ok(Response::new(pb::ListTemplatesResponse {
            templates,
            next_page_token: next,
        }))
    }

    async fn delete_template(&self, r: Request<pb::DeleteTemplateRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "DeleteTemplate")?;
        let r = r.into_inner();
        let res = self
            .c
            .write(
                &who,
                &r.request_id,
                Op::DeleteTemplate(ObjectId { id: r.template_id }),
            )
            .await;
        self.done(&who, res)
    }

    async fn get_ha_settings(&self, r: Request<pb::GetHaSettingsRequest>) -> R<pb::HaSettings> {
        self.who(&r, "GetHaSettings")?;
        Ok(Response::new(self.c.read(|s| s.ha).await?))
    }

    async fn set_ha_settings(&self, r: Request<pb::SetHaSettingsRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "SetHaSettings")?;
        let r = r.into_inner();
        let res = async {
            let h = r
                .settings
                .ok_or_else(|| Status::invalid_argument("settings are required"))?;
            if h.failure_timeout_seconds > 3600 {
                return Err(Status::invalid_argument(
                    "failure_timeout_seconds must be at most 3600",
                ));
            }
            self.c.write(&who, &r.request_id, Op::SetHa(h)).await
        }
        .await;
        self.done(&who, res)
    }

    async fn get_task(&self, r: Request<pb::GetTaskRequest>) -> R<pb::Task> {
        self.who(&r, "GetTask")?;
        let id = r.into_inner().task_id;
        self.c
            .read(|s| s.task(&id))
            .await?
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no task with id {id} (finished tasks are kept for a while, not forever)"
                ))
            })
    }

    async fn list_tasks(&self, r: Request<pb::ListTasksRequest>) -> R<pb::ListTasksResponse> {
        self.who(&r, "ListTasks")?;
        let r = r.into_inner();
        let (tasks, next) = self
            .c
            .read(|s| {
                page(
                    s.tasks
                        .iter()
                        .filter(|(_, t)| r.state == 0 || t.state == r.state)
                        .filter(|(_, t)| r.target_id.is_empty() || t.target_id == r.target_id)
                        .map(|(k, v)| (k.clone(), (**v).clone())),
                    r.page.as_ref(),
                )
            })
            .await?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks,
            next_page_token: next,
        }))
    }

    type WatchTaskStream = Pin<Box<dyn Stream<Item = Result<pb::Task, Status>> + Send + 'static>>;

    async fn watch_task(&self, r: Request<pb::GetTaskRequest>) -> R<Self::WatchTaskStream> {
        self.who(&r, "WatchTask")?;
        let id = r.into_inner().task_id;
        let first = self
            .c
            .read(|s| s.task(&id))
            .await?
            .ok_or_else(|| Status::not_found(format!("no task with id {id}")))?;
        let c = self.c.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut applied = c.node.shared.applied.subscribe();
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() {
                return;
            }
            while !task_finished(&last) {
                // A change is applied on this member first; a slow one is re-read at
                // least every second.
                let _ = tokio::time::timeout(Duration::from_secs(1), applied.changed()).await;
                let now = c.node.state().task(&last.id);
                match now {
                    Some(t) if t != last => {
                        last = t;
                        if tx.send(Ok(last.clone())).await.is_err() {
                            return;
                        }
                    }
                    Some(_) => {}
                    None => {
                        let _ = tx
                            .send(Err(Status::not_found("the task was forgotten")))
                            .await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tonic::codegen::tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn cancel_task(&self, r: Request<pb::CancelTaskRequest>) -> R<pb::Task> {
        let who = self.who(&r, "CancelTask")?;
        let id = r.into_inner().task_id;
        let res = self
            .c
            .write(&who, "", Op::CancelJob(ObjectId { id: id.clone() }))
            .await;
        match self.done(&who, res) {
            Ok(_) => self
                .c
                .read(|s| s.task(&id))
                .await?
                .map(Response::new)
                .ok_or_else(|| Status::not_found(format!("no task with id {id}"))),
            Err(s) => Err(s),
        }
    }

    async fn login(&self, r: Request<pb::LoginRequest>) -> R<pb::LoginResponse> {
        let peer = r.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let r = r.into_inner();
        let (user, key) = self
            .c
            .read(|s| (s.user_by_name(&r.user_name).cloned(), s.token_key.clone()))
            .await?;
        let ok = user
            .as_ref()
            .is_some_and(|u| auth::check_password(&u.password_hash, &r.password));
        let Some(u) = user.filter(|_| ok) else {
            let who = Caller {
                name: r.user_name.clone(),
                level: auth::Level::ReadOnly,
                method: "Login".into(),
                peer,
            };
            let s = Status::unauthenticated("wrong user name or password");
            self.audit(&who, &s);
            return Err(s);
        };
        let expires = crate::consensus::node::stamp() + auth::TOKEN_TTL.as_millis() as u64;
        Ok(Response::new(pb::LoginResponse {
            token: auth::issue_token(&key, &u.user.id, expires),
            expires_at: crate::state::machine::ts(expires),
            user: Some(u.user),
        }))
    }

    async fn create_user(&self, r: Request<pb::CreateUserRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "CreateUser")?;
        let r = r.into_inner();
        let res = async {
            need("name", &r.name)?;
            if r.password.len() < 8 {
                return Err(Status::invalid_argument(
                    "a password needs at least 8 characters",
                ));
            }
            if let Some(prev) = self
                .c
                .read(|s| s.lookup_request(&r.request_id, "user.create"))
                .await?
            {
                return prev.into_status();
            }
            let op = Op::CreateUser(CreateUser {
                user: Some(pb::User {
                    id: uuid::Uuid::new_v4().to_string(),
                    name: r.name,
                    roles: r.roles,
                    created_at: None,
                }),
                password_hash: auth::hash_password(&r.password),
                token_key: rand::random::<[u8; 32]>().to_vec(),
            });
            self.c.write(&who, &r.request_id, op).await
        }
        .await;
        self.done(&who, res)
    }

    async fn list_users(&self, r: Request<pb::ListUsersRequest>) -> R<pb::ListUsersResponse> {
        self.who(&r, "ListUsers")?;
        let r = r.into_inner();
        let (users, next) = self
            .c
            .read(|s| {
                page(
                    s.users.iter().map(|(k, v)| (k.clone(), v.user.clone())),
                    r.page.as_ref(),
                )
            })
            .await?;
        Ok(Response::new(pb::ListUsersResponse {
            users,
            next_page_token: next,
        }))
    }

    async fn delete_user(&self, r: Request<pb::DeleteUserRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "DeleteUser")?;
        let r = r.into_inner();
        let res = self
            .c
            .write(
                &who,
                &r.request_id,
                Op::DeleteUser(ObjectId { id: r.user_id }),
            )
            .await;
        self.done(&who, res)
    }

    async fn grant_role(&self, r: Request<pb::GrantRoleRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "GrantRole")?;
        let r = r.into_inner();
        let op = Op::SetRole(SetRole {
            user_id: r.user_id,
            role: r.role,
            grant: true,
        });
        let res = self.c.write(&who, &r.request_id, op).await;
        self.done(&who, res)
    }

    async fn revoke_role(&self, r: Request<pb::RevokeRoleRequest>) -> R<pb::TaskResponse> {
        let who = self.who(&r, "RevokeRole")?;
        let r = r.into_inner();
        let op = Op::SetRole(SetRole {
            user_id: r.user_id,
            role: r.role,
            grant: false,
        });
        let res = self.c.write(&who, &r.request_id, op).await;
        self.done(&who, res)
    }

    async fn list_roles(&self, r: Request<pb::ListRolesRequest>) -> R<pb::ListRolesResponse> {
        self.who(&r, "ListRoles")?;
        Ok(Response::new(pb::ListRolesResponse {
            roles: auth::describe_roles(),
        }))
    }

    async fn list_audit_events(
        &self,
        r: Request<pb::ListAuditEventsRequest>,
    ) -> R<pb::ListAuditEventsResponse> {
        self.who(&r, "ListAuditEvents")?;
        let r = r.into_inner();
        let since = r.since.map_or(i64::MIN, |t| t.seconds);
        let (events, next) = self
            .c
            .read(|s| {
                // Oldest first; event ids are sequence numbers in fixed-width hex, so they
                // order as the events do and serve as page tokens.
                page(
                    s.audit
                        .iter()
                        .filter(|e| r.user_name.is_empty() || e.user_name == r.user_name)
                        .filter(|e| e.at.as_ref().map_or(i64::MIN, |t| t.seconds) >= since)
                        .map(|e| (e.id.clone(), e.clone())),
                    r.page.as_ref(),
                )
            })
            .await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events,
            next_page_token: next,
        }))
    }

    async fn query_metrics(
        &self,
        r: Request<pb::QueryMetricsRequest>,
    ) -> R<pb::QueryMetricsResponse> {
        self.who(&r, "QueryMetrics")?;
        let r = r.into_inner();
        need("target_id", &r.target_id)?;
        let sample = self
            .c
            .read(|s| {
                if let Some(h) = s.hosts.get(&r.target_id) {
                    let m = h.last_metrics.clone().unwrap_or_default();
                    let v = match r.metric.as_str() {
                        "cpu_percent" => m.cpu_percent,
                        "memory_used_bytes" => m.memory_used_bytes as f64,
                        "memory_assigned_to_vms_bytes" => m.memory_assigned_to_vms_bytes as f64,
                        "vms_running" => m.vms_running as f64,
                        other => {
                            return Err(Status::invalid_argument(format!(
                                "unknown host metric {other:?}: cpu_percent, memory_used_bytes, memory_assigned_to_vms_bytes, vms_running"
                            )));
                        }
                    };
                    return Ok(m.at.map(|at| pb::MetricSample { at: Some(at), value: v }));
                }
                let vm = s
                    .vms
                    .get(&r.target_id)
                    .ok_or_else(|| Status::not_found(format!("no host or VM {}", r.target_id)))?;
                let m = s
                    .hosts
                    .get(&vm.host_id)
                    .and_then(|h| h.last_metrics.as_ref())
                    .and_then(|m| m.vms.iter().find(|x| x.vm_id == vm.id).cloned());
                let Some(m) = m else { return Ok(None) };
                let disks = |f: fn(&hpb::DiskMetrics) -> u64| m.disks.iter().map(f).sum::<u64>() as f64;
                let v = match r.metric.as_str() {
                    "vcpu_time_ns" => m.vcpu_time_ns as f64,
                    "rss_bytes" => m.rss_bytes as f64,
                    "disk_read_bytes" => disks(|d| d.read_bytes),
                    "disk_write_bytes" => disks(|d| d.write_bytes),
                    other => {
                        return Err(Status::invalid_argument(format!(
                            "unknown VM metric {other:?}: vcpu_time_ns, rss_bytes, disk_read_bytes, disk_write_bytes"
                        )));
                    }
                };
                Ok(m.at.map(|at| pb::MetricSample { at: Some(at), value: v }))
            })
            .await??;
        // The pool keeps the latest sample of each host's report, not a history.
        Ok(Response::new(pb::QueryMetricsResponse {
            samples: sample.into_iter().collect(),
            next_page_token: String::new(),
        }))
    }
}
