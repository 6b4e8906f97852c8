//! The tonic `PoolService` impl: each call authorizes its caller, hands the request to
//! the file of its resource, and turns the outcome into the answer (a change's refusal is
//! audited by [`PoolHandler::done`]).

use proto::coordinator as pb;
use proto::coordinator::pool_service_server::PoolService;
use proto::host as hpb;
use proto::host::PowerState::{Paused, Running, Stopped};
use proto::storage as spb;
use tonic::{Request, Response, Status};

use super::authorize::{header_of, peer_of};
use super::{
    PoolHandler, alerts, console, events, hosts, join, members, metrics, networks, roll, settings,
    storage, tasks, templates, users, vms,
};

type R<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl PoolService for PoolHandler {
    // The pool and its Raft group.

    async fn get_pool(&self, r: Request<pb::GetPoolRequest>) -> R<pb::Pool> {
        self.authorize(&r, "GetPool")?;
        settings::get_pool(self).await.map(Response::new)
    }

    async fn update_pool_settings(
        &self,
        r: Request<pb::UpdatePoolSettingsRequest>,
    ) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "UpdatePoolSettings")?;
        let res = settings::update(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn get_ha_settings(&self, r: Request<pb::GetHaSettingsRequest>) -> R<pb::HaSettings> {
        self.authorize(&r, "GetHaSettings")?;
        settings::get_ha(self).await.map(Response::new)
    }

    async fn set_ha_settings(&self, r: Request<pb::SetHaSettingsRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "SetHaSettings")?;
        let res = settings::set_ha(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn set_schedule(&self, r: Request<pb::SetScheduleRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "SetSchedule")?;
        let res = settings::set_schedule(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn delete_schedule(&self, r: Request<pb::DeleteScheduleRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DeleteSchedule")?;
        let res = settings::delete_schedule(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn run_schedule(&self, r: Request<pb::RunScheduleRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "RunSchedule")?;
        let res = settings::run_schedule(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn list_schedules(
        &self,
        r: Request<pb::ListSchedulesRequest>,
    ) -> R<pb::ListSchedulesResponse> {
        self.authorize(&r, "ListSchedules")?;
        settings::list_schedules(self).await.map(Response::new)
    }

    async fn list_members(&self, r: Request<pb::ListMembersRequest>) -> R<pb::ListMembersResponse> {
        self.authorize(&r, "ListMembers")?;
        members::list(self).await.map(Response::new)
    }

    async fn add_member(&self, r: Request<pb::AddMemberRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "AddMember")?;
        let res = members::add(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn remove_member(&self, r: Request<pb::RemoveMemberRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "RemoveMember")?;
        let res = members::remove(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn transfer_leadership(
        &self,
        r: Request<pb::TransferLeadershipRequest>,
    ) -> R<pb::TransferLeadershipResponse> {
        let who = self.authorize(&r, "TransferLeadership")?;
        let to = r.into_inner().member_id;
        members::transfer_leadership(self, &who, to)
            .await
            .map(Response::new)
    }

    // Joining.

    async fn create_join_token(
        &self,
        r: Request<pb::CreateJoinTokenRequest>,
    ) -> R<pb::CreateJoinTokenResponse> {
        let who = self.authorize(&r, "CreateJoinToken")?;
        let res = join::create_token(self, &who, r.into_inner()).await;
        // A token committed was audited when applied; a refusal before the log is here.
        if let Err(s) = &res
            && !s.metadata().contains_key(crate::coordinator::AUDITED)
        {
            self.audit(&who, s);
        }
        res.map(Response::new)
    }

    /// No user token: the join token is the credential.
    async fn join(&self, r: Request<pb::JoinRequest>) -> R<pb::JoinResponse> {
        let peer = join::peer(&r);
        join::join(self, peer, r.into_inner())
            .await
            .map(Response::new)
    }

    /// No user token: the caller's certificate is the credential.
    async fn renew_certificate(
        &self,
        r: Request<pb::RenewCertificateRequest>,
    ) -> R<pb::JoinResponse> {
        join::renew(self, r).await.map(Response::new)
    }

    async fn get_trust(&self, r: Request<pb::GetTrustRequest>) -> R<pb::Trust> {
        roll::get_trust(self, &r).await.map(Response::new)
    }

    async fn rotate_ca(&self, r: Request<pb::RotateCaRequest>) -> R<pb::CaRoll> {
        let who = self.authorize(&r, "RotateCa")?;
        let res = roll::rotate_ca(self, &who, r.into_inner()).await;
        if let Err(s) = &res
            && !s.metadata().contains_key(crate::coordinator::AUDITED)
        {
            self.audit(&who, s);
        }
        res.map(Response::new)
    }

    // Hosts.

    async fn join_host(&self, r: Request<pb::JoinHostRequest>) -> R<pb::TaskResponse> {
        let (who, host) = self.authorize_host(&r, "JoinHost")?;
        let r = r.into_inner();
        if let Some(host) = host
            && r.name != host
        {
            let s = Status::permission_denied(format!(
                "host {host} may join only as itself, not as {:?}",
                r.name
            ));
            self.audit(&who, &s);
            return Err(s);
        }
        let res = hosts::join(self, &who, r).await;
        self.done(&who, res)
    }

    async fn get_host(&self, r: Request<pb::GetHostRequest>) -> R<pb::Host> {
        self.authorize(&r, "GetHost")?;
        hosts::get(self, r.into_inner().host_id)
            .await
            .map(Response::new)
    }

    async fn list_hosts(&self, r: Request<pb::ListHostsRequest>) -> R<pb::ListHostsResponse> {
        self.authorize_host(&r, "ListHosts")?;
        hosts::list(self, r.into_inner()).await.map(Response::new)
    }

    async fn enable_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "EnableHost")?;
        let res = hosts::set_state(self, &who, r.into_inner(), pb::HostState::Enabled).await;
        self.done(&who, res)
    }

    async fn disable_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DisableHost")?;
        let res = hosts::set_state(self, &who, r.into_inner(), pb::HostState::Disabled).await;
        self.done(&who, res)
    }

    async fn evacuate_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "EvacuateHost")?;
        let res = hosts::evacuate(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn remove_host(&self, r: Request<pb::HostRef>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "RemoveHost")?;
        let res = hosts::remove(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn query_metrics(
        &self,
        r: Request<pb::QueryMetricsRequest>,
    ) -> R<pb::QueryMetricsResponse> {
        self.authorize(&r, "QueryMetrics")?;
        metrics::query(self, r.into_inner())
            .await
            .map(Response::new)
    }

    // Storage.

    async fn create_storage_repository(
        &self,
        r: Request<pb::CreateStorageRepositoryRequest>,
    ) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "CreateStorageRepository")?;
        let res = storage::create_sr(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn get_storage_repository(
        &self,
        r: Request<pb::GetStorageRepositoryRequest>,
    ) -> R<pb::StorageRepository> {
        self.authorize(&r, "GetStorageRepository")?;
        storage::get_sr(self, r.into_inner().sr_id)
            .await
            .map(Response::new)
    }

    async fn list_storage_repositories(
        &self,
        r: Request<pb::ListStorageRepositoriesRequest>,
    ) -> R<pb::ListStorageRepositoriesResponse> {
        self.authorize(&r, "ListStorageRepositories")?;
        storage::list_srs(self, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn remove_storage_repository(
        &self,
        r: Request<pb::RemoveStorageRepositoryRequest>,
    ) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "RemoveStorageRepository")?;
        let res = storage::remove_sr(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn create_volume(&self, r: Request<pb::CreateVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "CreateVolume")?;
        let res = storage::create_volume(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn get_volume(&self, r: Request<pb::GetVolumeRequest>) -> R<proto::storage::Volume> {
        self.authorize(&r, "GetVolume")?;
        storage::get_volume(self, r.into_inner().volume_id)
            .await
            .map(Response::new)
    }

    async fn list_volumes(&self, r: Request<pb::ListVolumesRequest>) -> R<pb::ListVolumesResponse> {
        self.authorize(&r, "ListVolumes")?;
        storage::list_volumes(self, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn resize_volume(&self, r: Request<pb::ResizeVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "ResizeVolume")?;
        let res = storage::resize_volume(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn snapshot_volume(&self, r: Request<pb::SnapshotVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "SnapshotVolume")?;
        let res = storage::snapshot_volume(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn clone_volume(&self, r: Request<pb::CloneVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "CloneVolume")?;
        let res = storage::clone_volume(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn revert_volume(&self, r: Request<pb::RevertVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "RevertVolume")?;
        let res = storage::revert_volume(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn delete_volume(&self, r: Request<pb::DeleteVolumeRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DeleteVolume")?;
        let res = storage::delete_volume(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn list_changed_chunks(
        &self,
        r: Request<spb::ListChangedChunksRequest>,
    ) -> R<spb::ListChangedChunksResponse> {
        self.authorize(&r, "ListChangedChunks")?;
        storage::changed_chunks(self, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn open_volume_access(&self, r: Request<pb::VolumeAccessRequest>) -> R<pb::VolumeAccess> {
        let who = self.authorize(&r, "OpenVolumeAccess")?;
        let r = r.into_inner();
        let res = storage::open_access(self, &r).await;
        self.audit_access(&who, &r, &res);
        res.map(Response::new)
    }

    async fn close_volume_access(
        &self,
        r: Request<pb::VolumeAccessRequest>,
    ) -> R<pb::CloseVolumeAccessResponse> {
        let who = self.authorize(&r, "CloseVolumeAccess")?;
        let r = r.into_inner();
        let res = storage::close_access(self, &r).await;
        self.audit_access(&who, &r, &res);
        res.map(Response::new)
    }

    async fn list_volume_exports(
        &self,
        r: Request<pb::ListVolumeExportsRequest>,
    ) -> R<pb::ListVolumeExportsResponse> {
        self.authorize(&r, "ListVolumeExports")?;
        storage::list_exports(self, r.into_inner())
            .await
            .map(Response::new)
    }

    // VMs.

    async fn create_vm(&self, r: Request<pb::CreateVmRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "CreateVm")?;
        let res = vms::create(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn get_vm(&self, r: Request<pb::GetVmRequest>) -> R<pb::Vm> {
        self.authorize(&r, "GetVm")?;
        vms::get(self, r.into_inner().vm_id)
            .await
            .map(Response::new)
    }

    async fn list_vms(&self, r: Request<pb::ListVmsRequest>) -> R<pb::ListVmsResponse> {
        self.authorize(&r, "ListVms")?;
        vms::list(self, r.into_inner()).await.map(Response::new)
    }

    async fn update_vm(&self, r: Request<pb::UpdateVmRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "UpdateVm")?;
        let res = vms::update(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn start_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "StartVm")?;
        let res = vms::set_power(self, &who, r.into_inner(), Running).await;
        self.done(&who, res)
    }

    async fn shutdown_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "ShutdownVm")?;
        let res = vms::set_power(self, &who, r.into_inner(), Stopped).await;
        self.done(&who, res)
    }

    async fn reboot_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "RebootVm")?;
        let res = vms::reboot(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn pause_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "PauseVm")?;
        let res = vms::set_power(self, &who, r.into_inner(), Paused).await;
        self.done(&who, res)
    }

    async fn resume_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "ResumeVm")?;
        let res = vms::resume(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn suspend_vm(&self, r: Request<pb::VmPowerRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "SuspendVm")?;
        let res = vms::suspend(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn destroy_vm(&self, r: Request<pb::DestroyVmRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DestroyVm")?;
        let res = vms::destroy(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn migrate_vm(&self, r: Request<pb::MigrateVmRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "MigrateVm")?;
        let res = vms::migrate(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn snapshot_vm(&self, r: Request<pb::SnapshotVmRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "SnapshotVm")?;
        let res = vms::snapshot(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn list_vm_snapshots(
        &self,
        r: Request<pb::ListVmSnapshotsRequest>,
    ) -> R<pb::ListVmSnapshotsResponse> {
        self.authorize(&r, "ListVmSnapshots")?;
        vms::list_snapshots(self, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn undo_vm_changes(&self, r: Request<pb::UndoVmChangesRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "UndoVmChanges")?;
        let res = vms::undo_changes(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn revert_vm(&self, r: Request<pb::RevertVmRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "RevertVm")?;
        let res = vms::revert(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn delete_vm_snapshot(
        &self,
        r: Request<pb::DeleteVmSnapshotRequest>,
    ) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DeleteVmSnapshot")?;
        let res = vms::delete_snapshot(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn clone_vm(&self, r: Request<pb::CloneVmRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "CloneVm")?;
        let res = vms::clone(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn explain_placement(
        &self,
        r: Request<pb::ExplainPlacementRequest>,
    ) -> R<pb::ExplainPlacementResponse> {
        self.authorize(&r, "ExplainPlacement")?;
        vms::explain_placement(self, r.into_inner())
            .await
            .map(Response::new)
    }

    // Guest networks and VIFs.

    async fn create_network(&self, r: Request<pb::CreateNetworkRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "CreateNetwork")?;
        let res = networks::create(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn get_network(&self, r: Request<pb::GetNetworkRequest>) -> R<pb::Network> {
        self.authorize(&r, "GetNetwork")?;
        networks::get(self, r.into_inner().network_id)
            .await
            .map(Response::new)
    }

    async fn list_networks(
        &self,
        r: Request<pb::ListNetworksRequest>,
    ) -> R<pb::ListNetworksResponse> {
        self.authorize(&r, "ListNetworks")?;
        networks::list(self, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn destroy_network(&self, r: Request<pb::DestroyNetworkRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DestroyNetwork")?;
        let res = networks::destroy(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn update_network(&self, r: Request<pb::UpdateNetworkRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "UpdateNetwork")?;
        let res = networks::update(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn create_vif(&self, r: Request<pb::CreateVifRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "CreateVif")?;
        let res = networks::create_vif(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn list_vifs(&self, r: Request<pb::ListVifsRequest>) -> R<pb::ListVifsResponse> {
        self.authorize(&r, "ListVifs")?;
        networks::list_vifs(self, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn update_vif(&self, r: Request<pb::UpdateVifRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "UpdateVif")?;
        let res = networks::update_vif(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn destroy_vif(&self, r: Request<pb::DestroyVifRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DestroyVif")?;
        let res = networks::destroy_vif(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    type StreamVmConsoleStream = console::ConsoleStream;

    async fn stream_vm_console(
        &self,
        r: Request<tonic::Streaming<hpb::ConsoleInput>>,
    ) -> R<Self::StreamVmConsoleStream> {
        let who = self.authorize(&r, "StreamVmConsole")?;
        // Console sessions are audited, opened or refused (a session can type into the
        // guest as its operator would).
        let res = console::stream(self, r.into_inner()).await;
        let opened = res
            .as_ref()
            .map(|(vm, _)| Status::ok(format!("console session of VM {vm}")));
        self.audit(&who, opened.as_ref().unwrap_or_else(|e| e));
        res.map(|(_, out)| Response::new(out))
    }

    async fn create_console_ticket(
        &self,
        r: Request<pb::CreateConsoleTicketRequest>,
    ) -> R<pb::ConsoleTicket> {
        let who = self.authorize(&r, "CreateConsoleTicket")?;
        let header = header_of(&r);
        console::ticket(self, &who, header, r.into_inner().vm_id)
            .await
            .map(Response::new)
    }

    // Templates.

    async fn create_template(&self, r: Request<pb::CreateTemplateRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "CreateTemplate")?;
        let res = templates::create(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn get_template(&self, r: Request<pb::GetTemplateRequest>) -> R<pb::Template> {
        self.authorize(&r, "GetTemplate")?;
        templates::get(self, r.into_inner().template_id)
            .await
            .map(Response::new)
    }

    async fn list_templates(
        &self,
        r: Request<pb::ListTemplatesRequest>,
    ) -> R<pb::ListTemplatesResponse> {
        self.authorize(&r, "ListTemplates")?;
        templates::list(self, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn delete_template(&self, r: Request<pb::DeleteTemplateRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DeleteTemplate")?;
        let res = templates::delete(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    // Tasks.

    async fn get_task(&self, r: Request<pb::GetTaskRequest>) -> R<pb::Task> {
        self.authorize(&r, "GetTask")?;
        tasks::get(self, r.into_inner().task_id)
            .await
            .map(Response::new)
    }

    async fn list_tasks(&self, r: Request<pb::ListTasksRequest>) -> R<pb::ListTasksResponse> {
        self.authorize(&r, "ListTasks")?;
        tasks::list(self, r.into_inner()).await.map(Response::new)
    }

    type WatchTaskStream = tasks::TaskStream;

    async fn watch_task(&self, r: Request<pb::GetTaskRequest>) -> R<Self::WatchTaskStream> {
        self.authorize(&r, "WatchTask")?;
        tasks::watch(self, r.into_inner().task_id)
            .await
            .map(Response::new)
    }

    type WatchEventsStream = events::EventStream;

    async fn watch_events(&self, r: Request<pb::WatchEventsRequest>) -> R<Self::WatchEventsStream> {
        self.authorize(&r, "WatchEvents")?;
        let credentials = (header_of(&r), peer_of(&r));
        events::watch(self, credentials, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn cancel_task(&self, r: Request<pb::CancelTaskRequest>) -> R<pb::Task> {
        let who = self.authorize(&r, "CancelTask")?;
        let id = r.into_inner().task_id;
        tasks::cancel(self, &who, id).await.map(Response::new)
    }

    async fn list_alerts(&self, r: Request<pb::ListAlertsRequest>) -> R<pb::ListAlertsResponse> {
        self.authorize(&r, "ListAlerts")?;
        alerts::list(self, r.into_inner()).await.map(Response::new)
    }

    async fn dismiss_alert(&self, r: Request<pb::DismissAlertRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DismissAlert")?;
        let res = alerts::dismiss(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    // Users, roles and the audit log.

    async fn login(&self, r: Request<pb::LoginRequest>) -> R<pb::LoginResponse> {
        // The one call without a token to authorize.
        let peer = peer_of(&r);
        users::login(self, peer, r.into_inner())
            .await
            .map(Response::new)
    }

    async fn create_user(&self, r: Request<pb::CreateUserRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "CreateUser")?;
        let res = users::create(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn list_users(&self, r: Request<pb::ListUsersRequest>) -> R<pb::ListUsersResponse> {
        self.authorize(&r, "ListUsers")?;
        users::list(self, r.into_inner()).await.map(Response::new)
    }

    async fn delete_user(&self, r: Request<pb::DeleteUserRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "DeleteUser")?;
        let res = users::delete(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn grant_role(&self, r: Request<pb::GrantRoleRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "GrantRole")?;
        let r = r.into_inner();
        let res = users::set_role(self, &who, &r.request_id, r.user_id, r.role, true).await;
        self.done(&who, res)
    }

    async fn revoke_role(&self, r: Request<pb::RevokeRoleRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "RevokeRole")?;
        let r = r.into_inner();
        let res = users::set_role(self, &who, &r.request_id, r.user_id, r.role, false).await;
        self.done(&who, res)
    }

    async fn change_password(&self, r: Request<pb::ChangePasswordRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "ChangePassword")?;
        let res = users::change_password(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn revoke_tokens(&self, r: Request<pb::RevokeTokensRequest>) -> R<pb::TaskResponse> {
        let who = self.authorize(&r, "RevokeTokens")?;
        let res = users::revoke_tokens(self, &who, r.into_inner()).await;
        self.done(&who, res)
    }

    async fn list_roles(&self, r: Request<pb::ListRolesRequest>) -> R<pb::ListRolesResponse> {
        self.authorize(&r, "ListRoles")?;
        Ok(Response::new(users::roles()))
    }

    async fn list_audit_events(
        &self,
        r: Request<pb::ListAuditEventsRequest>,
    ) -> R<pb::ListAuditEventsResponse> {
        self.authorize(&r, "ListAuditEvents")?;
        users::audit_events(self, r.into_inner())
            .await
            .map(Response::new)
    }
}
