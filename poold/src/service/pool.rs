//! `PoolService`: the pool as people and tools see it, served by every member.

use std::pin::Pin;
use std::sync::Arc;

use proto::coordinator as pb;
use proto::coordinator::pool_service_server::PoolService;
use proto::host as hpb;
use raft::eraftpb::{ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2};
use tonic::codegen::tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::coordinator::{Coordinator, node_status};
use crate::scheduler;
use crate::state::command::*;

pub struct PoolApi {
    pub c: Arc<Coordinator>,
}

type R<T> = Result<Response<T>, Status>;

fn task(t: pb::Task) -> R<pb::TaskResponse> {
    Ok(Response::new(pb::TaskResponse { task: Some(t) }))
}

fn not_yet(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not served yet: it needs the storaged/hostd calls that reconciliation \
         will make once those daemons serve gRPC"
    ))
}

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

impl PoolApi {
    async fn member_change(
        &self,
        request_id: &str,
        changes: Vec<(ConfChangeType, u64)>,
        members: Vec<MemberRecord>,
    ) -> R<pb::TaskResponse> {
        if let Some(prev) = self
            .c
            .read(|s| s.lookup_request(request_id, "pool.member_change"))
            .await?
        {
            return task(prev.into_status()?);
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
        task(r.into_status()?)
    }

    async fn set_power(
        &self,
        r: pb::VmPowerRequest,
        desired: hpb::PowerState,
        reboot: bool,
    ) -> R<pb::TaskResponse> {
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
                let t = self
                    .c
                    .place_and_commit(&r.request_id, &spec, &r.host_id, |host| {
                        Op::SetVmPower(SetVmPower {
                            vm_id: vm_id.clone(),
                            desired: desired as i32,
                            host_id: host,
                            force: r.force,
                            reboot,
                        })
                    })
                    .await?;
                return task(t);
            }
        }
        task(
            self.c
                .write(
                    &r.request_id,
                    Op::SetVmPower(SetVmPower {
                        vm_id: r.vm_id.clone(),
                        desired: desired as i32,
                        host_id: String::new(),
                        force: r.force,
                        reboot,
                    }),
                )
                .await?,
        )
    }
}

#[tonic::async_trait]
impl PoolService for PoolApi {
    async fn get_pool(&self, _r: Request<pb::GetPoolRequest>) -> R<pb::Pool> {
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
        let r = r.into_inner();
        let s = r
            .settings
            .ok_or_else(|| Status::invalid_argument("settings are required"))?;
        crate::state::machine::validate_settings(&s).map_err(|e| e.into_status().unwrap_err())?;
        task(self.c.write(&r.request_id, Op::UpdateSettings(s)).await?)
    }

    async fn list_members(
        &self,
        _r: Request<pb::ListMembersRequest>,
    ) -> R<pb::ListMembersResponse> {
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
        let r = r.into_inner();
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
            &r.request_id,
            changes,
            vec![MemberRecord {
                id: r.member_id,
                address: r.address,
            }],
        )
        .await
    }

    async fn remove_member(&self, r: Request<pb::RemoveMemberRequest>) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        self.member_change(
            &r.request_id,
            vec![(ConfChangeType::RemoveNode, r.member_id)],
            vec![],
        )
        .await
    }

    async fn join_host(&self, r: Request<pb::JoinHostRequest>) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        need("address", &r.address)?;
        let name = if r.name.is_empty() {
            r.address.clone()
        } else {
            r.name
        };
        task(
            self.c
                .write(
                    &r.request_id,
                    Op::JoinHost(JoinHost {
                        host_id: uuid::Uuid::new_v4().to_string(),
                        name,
                        address: r.address,
                    }),
                )
                .await?,
        )
    }

    async fn get_host(&self, r: Request<pb::GetHostRequest>) -> R<pb::Host> {
        let id = r.into_inner().host_id;
        self.c
            .read(|s| s.hosts.get(&id).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no host with id {id}")))
    }

    async fn list_hosts(&self, r: Request<pb::ListHostsRequest>) -> R<pb::ListHostsResponse> {
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
        let r = r.into_inner();
        let op = Op::SetHostState(SetHostState {
            host_id: r.host_id,
            state: pb::HostState::Enabled as i32,
        });
        task(self.c.write(&r.request_id, op).await?)
    }

    async fn disable_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        let op = Op::SetHostState(SetHostState {
            host_id: r.host_id,
            state: pb::HostState::Disabled as i32,
        });
        task(self.c.write(&r.request_id, op).await?)
    }

    async fn evacuate_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        // A host with no VMs goes to maintenance at once; moving running VMs needs live
        // migration through hostd, which the state machine refuses to pretend.
        let r = r.into_inner();
        let op = Op::SetHostState(SetHostState {
            host_id: r.host_id,
            state: pb::HostState::Maintenance as i32,
        });
        task(self.c.write(&r.request_id, op).await?)
    }

    async fn remove_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        task(
            self.c
                .write(&r.request_id, Op::RemoveHost(ObjectId { id: r.host_id }))
                .await?,
        )
    }

    async fn create_storage_repository(
        &self,
        r: Request<pb::CreateStorageRepositoryRequest>,
    ) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        need("name", &r.name)?;
        need("address", &r.address)?;
        if r.thin_pool_id.is_empty() {
            return Err(not_yet(
                "creating a thin pool through CreateStorageRepository (give thin_pool_id of an existing pool)",
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
        task(self.c.write(&r.request_id, Op::CreateSr(sr)).await?)
    }

    async fn get_storage_repository(
        &self,
        r: Request<pb::GetStorageRepositoryRequest>,
    ) -> R<pb::StorageRepository> {
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
        let r = r.into_inner();
        task(
            self.c
                .write(&r.request_id, Op::RemoveSr(ObjectId { id: r.sr_id }))
                .await?,
        )
    }

    async fn create_volume(&self, r: Request<pb::CreateVolumeRequest>) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        need("sr_id", &r.sr_id)?;
        need("name", &r.name)?;
        let op = Op::CreateVolume(CreateVolume {
            volume_id: uuid::Uuid::new_v4().to_string(),
            sr_id: r.sr_id,
            name: r.name,
            virtual_size_bytes: r.virtual_size_bytes,
            labels: r.labels,
        });
        task(self.c.write(&r.request_id, op).await?)
    }

    async fn get_volume(&self, r: Request<pb::GetVolumeRequest>) -> R<proto::storage::Volume> {
        let id = r.into_inner().volume_id;
        self.c
            .read(|s| s.volumes.get(&id).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no volume with id {id}")))
    }

    async fn list_volumes(&self, r: Request<pb::ListVolumesRequest>) -> R<pb::ListVolumesResponse> {
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

    async fn resize_volume(&self, _r: Request<pb::ResizeVolumeRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("ResizeVolume"))
    }

    async fn snapshot_volume(&self, _r: Request<pb::SnapshotVolumeRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("SnapshotVolume"))
    }

    async fn clone_volume(&self, _r: Request<pb::CloneVolumeRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("CloneVolume"))
    }

    async fn revert_volume(&self, _r: Request<pb::RevertVolumeRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("RevertVolume"))
    }

    async fn delete_volume(&self, r: Request<pb::DeleteVolumeRequest>) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        task(
            self.c
                .write(
                    &r.request_id,
                    Op::DeleteVolume(ObjectId { id: r.volume_id }),
                )
                .await?,
        )
    }

    async fn create_vm(&self, r: Request<pb::CreateVmRequest>) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        let (spec, template_id) = match r.source {
            Some(pb::create_vm_request::Source::TemplateId(tid)) => {
                let t = self
                    .c
                    .read(|s| s.templates.get(&tid).cloned())
                    .await?
                    .ok_or_else(|| Status::not_found(format!("no template with id {tid}")))?;
                if !t.disk_volumes.is_empty() {
                    return Err(not_yet(
                        "CreateVm from a template with disks (cloning them)",
                    ));
                }
                let mut spec = t.spec.unwrap_or_default();
                // The VM's own name, when given, replaces the template's.
                if let Some(name) = r.spec.map(|s| s.name).filter(|n| !n.is_empty()) {
                    spec.name = name;
                }
                (spec, tid)
            }
            _ => (
                r.spec
                    .ok_or_else(|| Status::invalid_argument("spec is required"))?,
                String::new(),
            ),
        };
        if let Some(prev) = self
            .c
            .read(|s| s.lookup_request(&r.request_id, "vm.create"))
            .await?
        {
            return task(prev.into_status()?);
        }
        let vm_id = uuid::Uuid::new_v4().to_string();
        if r.start || !r.host_id.is_empty() {
            let t = self
                .c
                .place_and_commit(&r.request_id, &spec, &r.host_id, |host| {
                    Op::CreateVm(CreateVm {
                        vm_id: vm_id.clone(),
                        spec: Some(spec.clone()),
                        template_id: template_id.clone(),
                        start_on_host: host,
                    })
                })
                .await?;
            return task(t);
        }
        let op = Op::CreateVm(CreateVm {
            vm_id,
            spec: Some(spec),
            template_id,
            start_on_host: String::new(),
        });
        task(self.c.write(&r.request_id, op).await?)
    }

    async fn get_vm(&self, r: Request<pb::GetVmRequest>) -> R<pb::Vm> {
        let id = r.into_inner().vm_id;
        self.c
            .read(|s| s.vms.get(&id).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no VM with id {id}")))
    }

    async fn list_vms(&self, r: Request<pb::ListVmsRequest>) -> R<pb::ListVmsResponse> {
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
        let r = r.into_inner();
        need("vm_id", &r.vm_id)?;
        task(
            self.c
                .write(
                    &r.request_id,
                    Op::UpdateVm(UpdateVm {
                        vm_id: r.vm_id,
                        spec: r.spec,
                    }),
                )
                .await?,
        )
    }

    async fn start_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        self.set_power(r.into_inner(), hpb::PowerState::Running, false)
            .await
    }

    async fn shutdown_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        self.set_power(r.into_inner(), hpb::PowerState::Stopped, false)
            .await
    }

    async fn reboot_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        self.set_power(r.into_inner(), hpb::PowerState::Running, true)
            .await
    }

    async fn pause_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        self.set_power(r.into_inner(), hpb::PowerState::Paused, false)
            .await
    }

    async fn resume_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        self.set_power(r.into_inner(), hpb::PowerState::Running, false)
            .await
    }

    async fn destroy_vm(&self, r: Request<pb::DestroyVmRequest>) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        if r.delete_disks {
            return Err(not_yet("DestroyVm with delete_disks"));
        }
        task(
            self.c
                .write(&r.request_id, Op::DestroyVm(ObjectId { id: r.vm_id }))
                .await?,
        )
    }

    async fn migrate_vm(&self, _r: Request<pb::MigrateVmRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("MigrateVm"))
    }

    async fn snapshot_vm(&self, _r: Request<pb::SnapshotVmRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("SnapshotVm"))
    }

    async fn list_vm_snapshots(
        &self,
        _r: Request<pb::ListVmSnapshotsRequest>,
    ) -> R<pb::ListVmSnapshotsResponse> {
        Err(not_yet("ListVmSnapshots"))
    }

    async fn revert_vm(&self, _r: Request<pb::RevertVmRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("RevertVm"))
    }

    async fn clone_vm(&self, _r: Request<pb::CloneVmRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("CloneVm"))
    }

    type StreamVmConsoleStream =
        Pin<Box<dyn Stream<Item = Result<hpb::ConsoleOutput, Status>> + Send + 'static>>;

    async fn stream_vm_console(
        &self,
        _r: Request<tonic::Streaming<hpb::ConsoleInput>>,
    ) -> R<Self::StreamVmConsoleStream> {
        Err(not_yet("StreamVmConsole"))
    }

    async fn explain_placement(
        &self,
        r: Request<pb::ExplainPlacementRequest>,
    ) -> R<pb::ExplainPlacementResponse> {
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
        let r = r.into_inner();
        need("name", &r.name)?;
        let spec = match r.source {
            Some(pb::create_template_request::Source::Spec(spec)) => spec,
            Some(pb::create_template_request::Source::VmId(_)) => {
                return Err(not_yet("CreateTemplate from a VM (snapshotting its disks)"));
            }
            None => return Err(Status::invalid_argument("give a spec or a vm_id")),
        };
        let t = pb::Template {
            id: uuid::Uuid::new_v4().to_string(),
            name: r.name,
            spec: Some(spec),
            disk_volumes: Default::default(),
            created_at: None,
        };
        task(self.c.write(&r.request_id, Op::CreateTemplate(t)).await?)
    }

    async fn get_template(&self, r: Request<pb::GetTemplateRequest>) -> R<pb::Template> {
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
        let r = r.into_inner();
        task(
            self.c
                .write(
                    &r.request_id,
                    Op::DeleteTemplate(ObjectId { id: r.template_id }),
                )
                .await?,
        )
    }

    async fn get_ha_settings(&self, _r: Request<pb::GetHaSettingsRequest>) -> R<pb::HaSettings> {
        Ok(Response::new(self.c.read(|s| s.ha).await?))
    }

    async fn set_ha_settings(&self, r: Request<pb::SetHaSettingsRequest>) -> R<pb::TaskResponse> {
        let r = r.into_inner();
        let h = r
            .settings
            .ok_or_else(|| Status::invalid_argument("settings are required"))?;
        task(self.c.write(&r.request_id, Op::SetHa(h)).await?)
    }

    async fn get_task(&self, r: Request<pb::GetTaskRequest>) -> R<pb::Task> {
        let id = r.into_inner().task_id;
        self.c
            .read(|s| s.tasks.get(&id).cloned())
            .await?
            .map(Response::new)
            .ok_or_else(|| {
                Status::not_found(format!(
                    "no task with id {id} (finished tasks are kept for a while, not forever)"
                ))
            })
    }

    async fn list_tasks(&self, r: Request<pb::ListTasksRequest>) -> R<pb::ListTasksResponse> {
        let r = r.into_inner();
        let (tasks, next) = self
            .c
            .read(|s| {
                page(
                    s.tasks
                        .iter()
                        .filter(|(_, t)| r.state == 0 || t.state == r.state)
                        .filter(|(_, t)| r.target_id.is_empty() || t.target_id == r.target_id)
                        .map(|(k, v)| (k.clone(), v.clone())),
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

    async fn watch_task(&self, _r: Request<pb::GetTaskRequest>) -> R<Self::WatchTaskStream> {
        Err(not_yet("WatchTask (poll GetTask meanwhile)"))
    }

    async fn cancel_task(&self, _r: Request<pb::CancelTaskRequest>) -> R<pb::Task> {
        Err(not_yet("CancelTask"))
    }

    async fn login(&self, _r: Request<pb::LoginRequest>) -> R<pb::LoginResponse> {
        Err(not_yet("Login (users and roles)"))
    }

    async fn create_user(&self, _r: Request<pb::CreateUserRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("CreateUser"))
    }

    async fn list_users(&self, _r: Request<pb::ListUsersRequest>) -> R<pb::ListUsersResponse> {
        Err(not_yet("ListUsers"))
    }

    async fn delete_user(&self, _r: Request<pb::DeleteUserRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("DeleteUser"))
    }

    async fn grant_role(&self, _r: Request<pb::GrantRoleRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("GrantRole"))
    }

    async fn revoke_role(&self, _r: Request<pb::RevokeRoleRequest>) -> R<pb::TaskResponse> {
        Err(not_yet("RevokeRole"))
    }

    async fn list_roles(&self, _r: Request<pb::ListRolesRequest>) -> R<pb::ListRolesResponse> {
        Err(not_yet("ListRoles"))
    }

    async fn list_audit_events(
        &self,
        _r: Request<pb::ListAuditEventsRequest>,
    ) -> R<pb::ListAuditEventsResponse> {
        Err(not_yet("ListAuditEvents"))
    }

    async fn query_metrics(
        &self,
        _r: Request<pb::QueryMetricsRequest>,
    ) -> R<pb::QueryMetricsResponse> {
        Err(not_yet("QueryMetrics"))
    }
}
