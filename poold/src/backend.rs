//! The daemons the pool acts through, seen from the coordinator: narrow traits over the
//! parts of `StorageService` (storaged) and `HostService` (hostd) that jobs and
//! reconciliation use, and their gRPC implementations.
//!
//! Every method takes the daemon's address, so one value serves every storaged and every
//! host of the pool. Errors are the daemons' own `tonic::Status`, with a failure to
//! connect or a call past its time limit turned into UNAVAILABLE / DEADLINE_EXCEEDED:
//! callers tell "try again later" from "refused" by the code ([`transient`]).
//! Unit tests of jobs and reconciliation put test doubles behind these traits; the daemons
//! themselves are exercised by the end-to-end tests.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::Duration;

use proto::host as hpb;
use proto::host::host_service_client::HostServiceClient;
use proto::storage as spb;
use proto::storage::storage_service_client::StorageServiceClient;
use tonic::codegen::tokio_stream::{Stream, StreamExt};
use tonic::transport::Channel;
use tonic::{Code, Status};

/// A stream of migration progress reports from the source host.
pub type ProgressStream =
    Pin<Box<dyn Stream<Item = Result<hpb::MigrationProgress, Status>> + Send>>;

/// Whether a failed call may succeed if tried again later (the daemon was unreachable,
/// slow, or busy), as opposed to a refusal that will not change by itself.
pub fn transient(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::Unknown
            | Code::Cancelled
    )
}

/// The StorageService calls the pool makes.
#[tonic::async_trait]
pub trait StorageOps: Send + Sync {
    async fn create_pool(
        &self,
        addr: &str,
        r: spb::CreatePoolRequest,
    ) -> Result<spb::ThinPool, Status>;
    async fn list_pools(&self, addr: &str) -> Result<Vec<spb::ThinPool>, Status>;
    async fn pool_usage(&self, addr: &str, pool_id: &str) -> Result<spb::PoolUsage, Status>;
    async fn create_volume(
        &self,
        addr: &str,
        r: spb::CreateVolumeRequest,
    ) -> Result<spb::Volume, Status>;
    async fn get_volume(&self, addr: &str, id: &str) -> Result<spb::Volume, Status>;
    /// Every volume, snapshot and clone of a thin pool.
    async fn list_volumes(&self, addr: &str, pool_id: &str) -> Result<Vec<spb::Volume>, Status>;
    async fn resize_volume(
        &self,
        addr: &str,
        r: spb::ResizeVolumeRequest,
    ) -> Result<spb::Volume, Status>;
    async fn delete_volume(&self, addr: &str, id: &str, force: bool) -> Result<(), Status>;
    async fn snapshot(
        &self,
        addr: &str,
        r: spb::CreateSnapshotRequest,
    ) -> Result<spb::Volume, Status>;
    async fn clone_volume(
        &self,
        addr: &str,
        r: spb::CloneVolumeRequest,
    ) -> Result<spb::Volume, Status>;
    async fn revert(
        &self,
        addr: &str,
        volume_id: &str,
        snapshot_id: &str,
    ) -> Result<spb::Volume, Status>;
    async fn create_export(&self, addr: &str, volume_id: &str) -> Result<spb::Export, Status>;
    /// Exports of one volume, or every export when `volume_id` is empty.
    async fn list_exports(&self, addr: &str, volume_id: &str) -> Result<Vec<spb::Export>, Status>;
    /// Grants `initiator` (logging in with `chap`'s initiator secret; the target answers
    /// with its target secret).
    async fn grant(
        &self,
        addr: &str,
        export_id: &str,
        chap: &crate::chap::Secrets,
    ) -> Result<(), Status>;
    /// Returns once the initiator's sessions are closed and their commands finished.
    async fn revoke(&self, addr: &str, export_id: &str, initiator: &str) -> Result<u32, Status>;
    async fn changed_chunks(
        &self,
        addr: &str,
        r: spb::ListChangedChunksRequest,
    ) -> Result<spb::ListChangedChunksResponse, Status>;
}

/// The HostService calls the pool makes.
#[tonic::async_trait]
pub trait HostOps: Send + Sync {
    async fn info(&self, addr: &str) -> Result<hpb::HostInfo, Status>;
    async fn metrics(&self, addr: &str) -> Result<hpb::HostMetrics, Status>;
    async fn list_vms(&self, addr: &str) -> Result<Vec<hpb::Vm>, Status>;
    async fn create_vm(&self, addr: &str, r: hpb::CreateVmRequest) -> Result<hpb::Vm, Status>;
    async fn start_vm(&self, addr: &str, vm_id: &str) -> Result<hpb::Vm, Status>;
    async fn pause_vm(&self, addr: &str, vm_id: &str) -> Result<hpb::Vm, Status>;
    async fn resume_vm(&self, addr: &str, vm_id: &str) -> Result<hpb::Vm, Status>;
    async fn reboot_vm(&self, addr: &str, vm_id: &str, force: bool) -> Result<hpb::Vm, Status>;
    async fn shutdown_vm(&self, addr: &str, vm_id: &str, force: bool) -> Result<hpb::Vm, Status>;
    async fn destroy_vm(&self, addr: &str, vm_id: &str) -> Result<(), Status>;
    /// Makes a private network's VXLAN peers on the host those `network` names.
    async fn set_network_peers(
        &self,
        addr: &str,
        network: hpb::NetworkAttachment,
    ) -> Result<hpb::SetNetworkPeersResponse, Status>;
    async fn prepare_migration_receive(
        &self,
        addr: &str,
        r: hpb::PrepareMigrationReceiveRequest,
    ) -> Result<hpb::PrepareMigrationReceiveResponse, Status>;
    async fn start_migration_send(
        &self,
        addr: &str,
        r: hpb::StartMigrationSendRequest,
    ) -> Result<ProgressStream, Status>;
    async fn get_migration(
        &self,
        addr: &str,
        migration_id: &str,
    ) -> Result<hpb::MigrationProgress, Status>;
    async fn cancel_migration(&self, addr: &str, migration_id: &str) -> Result<(), Status>;
    /// Writes the VM's memory and device state into a state volume (suspend: it stops).
    async fn save_vm(
        &self,
        addr: &str,
        r: hpb::SaveVmRequest,
    ) -> Result<hpb::SaveVmResponse, Status>;
    /// Starts a VM from a state volume.
    async fn restore_vm(&self, addr: &str, r: hpb::RestoreVmRequest) -> Result<hpb::Vm, Status>;
}

/// gRPC clients of every storaged and hostd the pool talks to, one lazily connected
/// channel per address.
pub struct Grpc {
    /// This member's credentials: storaged and hostd are called over mutual TLS.
    tls: Option<crate::tls::LiveTls>,
    /// The channels, and the TLS generation they were made with.
    channels: Mutex<(u64, HashMap<String, Channel>)>,
    /// Limit of one ordinary call.
    pub call_timeout: Duration,
    /// Limit of a revoke, which waits for the initiator's commands to finish.
    pub revoke_timeout: Duration,
}

impl Grpc {
    pub fn new(tls: Option<crate::tls::LiveTls>) -> Self {
        Grpc {
            tls,
            channels: Mutex::new((0, HashMap::new())),
            call_timeout: Duration::from_secs(15),
            revoke_timeout: Duration::from_secs(60),
        }
    }
}

impl Grpc {
    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut cache = self.channels.lock().expect("channel cache lock");
        let generation = crate::tls::generation(self.tls.as_ref());
        if cache.0 != generation {
            // Renewed credentials: calls already made finish on their connections.
            *cache = (generation, HashMap::new());
        }
        let map = &mut cache.1;
        if let Some(c) = map.get(addr) {
            return Ok(c.clone());
        }
        let c = crate::tls::endpoint(addr, self.tls.as_ref(), None)?.connect_lazy();
        map.insert(addr.to_owned(), c.clone());
        Ok(c)
    }

    fn storage(&self, addr: &str) -> Result<StorageServiceClient<Channel>, Status> {
        Ok(StorageServiceClient::new(self.channel(addr)?))
    }

    fn host(&self, addr: &str) -> Result<HostServiceClient<Channel>, Status> {
        Ok(HostServiceClient::new(self.channel(addr)?))
    }
}

/// Every item of a List call: `page` fetches the page a token names and returns its
/// items and the next token (empty after the last page).
async fn all_pages<T, F, Fut>(mut page: F) -> Result<Vec<T>, Status>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, String), Status>>,
{
    let mut out = Vec::new();
    let mut token = String::new();
    loop {
        let (items, next) = page(token).await?;
        out.extend(items);
        if next.is_empty() {
            return Ok(out);
        }
        token = next;
    }
}

/// Runs one call with a time limit; the answer's body, or its status.
async fn within<T>(
    limit: Duration,
    what: &str,
    addr: &str,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, Status>>,
) -> Result<T, Status> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(unreachable(
            Status::new(s.code(), format!("{what} at {addr}: {}", s.message())),
            addr,
        )),
        Err(_) => Err(unreachable(
            Status::deadline_exceeded(format!("{what} at {addr}: no answer within {limit:?}")),
            addr,
        )),
    }
}

/// Marks a transient failure as the daemon's at `addr`, not this member's: a client that
/// gets it knows the coordinator answered (see `pool_client::UNREACHABLE_BACKEND`).
fn unreachable(mut s: Status, addr: &str) -> Status {
    if transient(&s)
        && let Ok(v) = addr.parse()
    {
        s.metadata_mut().insert(pool_client::UNREACHABLE_BACKEND, v);
    }
    s
}

#[tonic::async_trait]
impl StorageOps for Grpc {
    async fn create_pool(
        &self,
        addr: &str,
        r: spb::CreatePoolRequest,
    ) -> Result<spb::ThinPool, Status> {
        let mut c = self.storage(addr)?;
        within(self.call_timeout, "CreatePool", addr, c.create_pool(r)).await
    }

    async fn list_pools(&self, addr: &str) -> Result<Vec<spb::ThinPool>, Status> {
        let c = self.storage(addr)?;
        all_pages(|page_token| {
            let mut c = c.clone();
            async move {
                let r = spb::ListPoolsRequest {
                    page_size: 0,
                    page_token,
                };
                let r = within(self.call_timeout, "ListPools", addr, c.list_pools(r)).await?;
                Ok((r.pools, r.next_page_token))
            }
        })
        .await
    }

    async fn pool_usage(&self, addr: &str, pool_id: &str) -> Result<spb::PoolUsage, Status> {
        let mut c = self.storage(addr)?;
        let r = spb::GetPoolUsageRequest {
            pool_id: pool_id.to_owned(),
        };
        within(self.call_timeout, "GetPoolUsage", addr, c.get_pool_usage(r)).await
    }

    async fn create_volume(
        &self,
        addr: &str,
        r: spb::CreateVolumeRequest,
    ) -> Result<spb::Volume, Status> {
        let mut c = self.storage(addr)?;
        within(self.call_timeout, "CreateVolume", addr, c.create_volume(r)).await
    }

    async fn get_volume(&self, addr: &str, id: &str) -> Result<spb::Volume, Status> {
        let mut c = self.storage(addr)?;
        let r = spb::GetVolumeRequest {
            volume_id: id.to_owned(),
        };
        within(self.call_timeout, "GetVolume", addr, c.get_volume(r)).await
    }

    async fn list_volumes(&self, addr: &str, pool_id: &str) -> Result<Vec<spb::Volume>, Status> {
        let c = self.storage(addr)?;
        all_pages(|page_token| {
            let mut c = c.clone();
            async move {
                let r = spb::ListVolumesRequest {
                    pool_id: pool_id.to_owned(),
                    page_size: 0,
                    page_token,
                    kind: 0,
                };
                let r = within(self.call_timeout, "ListVolumes", addr, c.list_volumes(r)).await?;
                Ok((r.volumes, r.next_page_token))
            }
        })
        .await
    }

    async fn resize_volume(
        &self,
        addr: &str,
        r: spb::ResizeVolumeRequest,
    ) -> Result<spb::Volume, Status> {
        let mut c = self.storage(addr)?;
        within(self.call_timeout, "ResizeVolume", addr, c.resize_volume(r)).await
    }

    async fn delete_volume(&self, addr: &str, id: &str, force: bool) -> Result<(), Status> {
        let mut c = self.storage(addr)?;
        let r = spb::DeleteVolumeRequest {
            volume_id: id.to_owned(),
            force,
        };
        within(
            self.revoke_timeout,
            "DeleteVolume",
            addr,
            c.delete_volume(r),
        )
        .await
        .map(|_| ())
    }

    async fn snapshot(
        &self,
        addr: &str,
        r: spb::CreateSnapshotRequest,
    ) -> Result<spb::Volume, Status> {
        let mut c = self.storage(addr)?;
        within(
            self.call_timeout,
            "CreateSnapshot",
            addr,
            c.create_snapshot(r),
        )
        .await
    }

    async fn clone_volume(
        &self,
        addr: &str,
        r: spb::CloneVolumeRequest,
    ) -> Result<spb::Volume, Status> {
        let mut c = self.storage(addr)?;
        within(self.call_timeout, "CloneVolume", addr, c.clone_volume(r)).await
    }

    async fn revert(
        &self,
        addr: &str,
        volume_id: &str,
        snapshot_id: &str,
    ) -> Result<spb::Volume, Status> {
        let mut c = self.storage(addr)?;
        let r = spb::RevertVolumeRequest {
            volume_id: volume_id.to_owned(),
            snapshot_id: snapshot_id.to_owned(),
        };
        within(self.call_timeout, "RevertVolume", addr, c.revert_volume(r)).await
    }

    async fn create_export(&self, addr: &str, volume_id: &str) -> Result<spb::Export, Status> {
        let mut c = self.storage(addr)?;
        let r = spb::CreateExportRequest {
            volume_id: volume_id.to_owned(),
            ..Default::default()
        };
        within(self.call_timeout, "CreateExport", addr, c.create_export(r)).await
    }

    async fn list_exports(&self, addr: &str, volume_id: &str) -> Result<Vec<spb::Export>, Status> {
        let c = self.storage(addr)?;
        all_pages(|page_token| {
            let mut c = c.clone();
            async move {
                let r = spb::ListExportsRequest {
                    volume_id: volume_id.to_owned(),
                    page_size: 0,
                    page_token,
                };
                let r = within(self.call_timeout, "ListExports", addr, c.list_exports(r)).await?;
                Ok((r.exports, r.next_page_token))
            }
        })
        .await
    }

    async fn grant(
        &self,
        addr: &str,
        export_id: &str,
        chap: &crate::chap::Secrets,
    ) -> Result<(), Status> {
        let mut c = self.storage(addr)?;
        let r = spb::GrantAccessRequest {
            export_id: export_id.to_owned(),
            initiator_iqn: chap.initiator.user.clone(),
            chap: Some(chap.initiator.to_proto()),
            mutual_chap: Some(chap.target.to_proto()),
        };
        within(self.call_timeout, "GrantAccess", addr, c.grant_access(r))
            .await
            .map(|_| ())
    }

    async fn revoke(&self, addr: &str, export_id: &str, initiator: &str) -> Result<u32, Status> {
        let mut c = self.storage(addr)?;
        let r = spb::RevokeAccessRequest {
            export_id: export_id.to_owned(),
            initiator_iqn: initiator.to_owned(),
        };
        within(
            self.revoke_timeout,
            "RevokeAccess",
            addr,
            c.revoke_access(r),
        )
        .await
        .map(|r| r.sessions_dropped)
    }

    async fn changed_chunks(
        &self,
        addr: &str,
        r: spb::ListChangedChunksRequest,
    ) -> Result<spb::ListChangedChunksResponse, Status> {
        let mut c = self.storage(addr)?;
        within(
            self.call_timeout,
            "ListChangedChunks",
            addr,
            c.list_changed_chunks(r),
        )
        .await
    }
}

#[tonic::async_trait]
impl HostOps for Grpc {
    async fn info(&self, addr: &str) -> Result<hpb::HostInfo, Status> {
        let mut c = self.host(addr)?;
        within(
            Duration::from_secs(2),
            "GetHostInfo",
            addr,
            c.get_host_info(hpb::GetHostInfoRequest {}),
        )
        .await
    }

    async fn metrics(&self, addr: &str) -> Result<hpb::HostMetrics, Status> {
        let mut c = self.host(addr)?;
        within(
            Duration::from_secs(2),
            "GetHostMetrics",
            addr,
            c.get_host_metrics(hpb::GetHostMetricsRequest {}),
        )
        .await
    }

    async fn list_vms(&self, addr: &str) -> Result<Vec<hpb::Vm>, Status> {
        let c = self.host(addr)?;
        all_pages(|page_token| {
            let mut c = c.clone();
            async move {
                let r = hpb::ListVmsRequest {
                    page_size: 0,
                    page_token,
                };
                let r = within(Duration::from_secs(2), "ListVms", addr, c.list_vms(r)).await?;
                Ok((r.vms, r.next_page_token))
            }
        })
        .await
    }

    async fn create_vm(&self, addr: &str, r: hpb::CreateVmRequest) -> Result<hpb::Vm, Status> {
        let mut c = self.host(addr)?;
        within(self.call_timeout, "CreateVm", addr, c.create_vm(r)).await
    }

    async fn start_vm(&self, addr: &str, vm_id: &str) -> Result<hpb::Vm, Status> {
        let mut c = self.host(addr)?;
        let r = hpb::VmRequest {
            vm_id: vm_id.to_owned(),
        };
        within(self.call_timeout, "StartVm", addr, c.start_vm(r)).await
    }

    async fn pause_vm(&self, addr: &str, vm_id: &str) -> Result<hpb::Vm, Status> {
        let mut c = self.host(addr)?;
        let r = hpb::VmRequest {
            vm_id: vm_id.to_owned(),
        };
        within(self.call_timeout, "PauseVm", addr, c.pause_vm(r)).await
    }

    async fn resume_vm(&self, addr: &str, vm_id: &str) -> Result<hpb::Vm, Status> {
        let mut c = self.host(addr)?;
        let r = hpb::VmRequest {
            vm_id: vm_id.to_owned(),
        };
        within(self.call_timeout, "ResumeVm", addr, c.resume_vm(r)).await
    }

    async fn reboot_vm(&self, addr: &str, vm_id: &str, force: bool) -> Result<hpb::Vm, Status> {
        let mut c = self.host(addr)?;
        let r = hpb::RebootVmRequest {
            vm_id: vm_id.to_owned(),
            force,
        };
        within(self.call_timeout, "RebootVm", addr, c.reboot_vm(r)).await
    }

    async fn shutdown_vm(&self, addr: &str, vm_id: &str, force: bool) -> Result<hpb::Vm, Status> {
        let mut c = self.host(addr)?;
        let r = hpb::ShutdownVmRequest {
            vm_id: vm_id.to_owned(),
            force,
            timeout_seconds: if force { 0 } else { 60 },
        };
        within(
            Duration::from_secs(90),
            "ShutdownVm",
            addr,
            c.shutdown_vm(r),
        )
        .await
    }

    async fn destroy_vm(&self, addr: &str, vm_id: &str) -> Result<(), Status> {
        let mut c = self.host(addr)?;
        let r = hpb::VmRequest {
            vm_id: vm_id.to_owned(),
        };
        within(self.call_timeout, "DestroyVm", addr, c.destroy_vm(r))
            .await
            .map(|_| ())
    }

    async fn set_network_peers(
        &self,
        addr: &str,
        network: hpb::NetworkAttachment,
    ) -> Result<hpb::SetNetworkPeersResponse, Status> {
        let mut c = self.host(addr)?;
        let r = hpb::SetNetworkPeersRequest {
            network: Some(network),
        };
        within(
            self.call_timeout,
            "SetNetworkPeers",
            addr,
            c.set_network_peers(r),
        )
        .await
    }

    async fn prepare_migration_receive(
        &self,
        addr: &str,
        r: hpb::PrepareMigrationReceiveRequest,
    ) -> Result<hpb::PrepareMigrationReceiveResponse, Status> {
        let mut c = self.host(addr)?;
        within(
            self.call_timeout,
            "PrepareMigrationReceive",
            addr,
            c.prepare_migration_receive(r),
        )
        .await
    }

    async fn start_migration_send(
        &self,
        addr: &str,
        r: hpb::StartMigrationSendRequest,
    ) -> Result<ProgressStream, Status> {
        let mut c = self.host(addr)?;
        let s = within(
            self.call_timeout,
            "StartMigrationSend",
            addr,
            c.start_migration_send(r),
        )
        .await?;
        Ok(Box::pin(s.map(|m| m)))
    }

    async fn get_migration(
        &self,
        addr: &str,
        migration_id: &str,
    ) -> Result<hpb::MigrationProgress, Status> {
        let mut c = self.host(addr)?;
        let r = hpb::GetMigrationRequest {
            migration_id: migration_id.to_owned(),
        };
        within(self.call_timeout, "GetMigration", addr, c.get_migration(r)).await
    }

    async fn cancel_migration(&self, addr: &str, migration_id: &str) -> Result<(), Status> {
        let mut c = self.host(addr)?;
        let r = hpb::CancelMigrationRequest {
            migration_id: migration_id.to_owned(),
        };
        within(
            self.call_timeout,
            "CancelMigration",
            addr,
            c.cancel_migration(r),
        )
        .await
        .map(|_| ())
    }

    async fn save_vm(
        &self,
        addr: &str,
        r: hpb::SaveVmRequest,
    ) -> Result<hpb::SaveVmResponse, Status> {
        let mut c = self.host(addr)?;
        within(STATE_COPY_LIMIT, "SaveVm", addr, c.save_vm(r)).await
    }

    async fn restore_vm(&self, addr: &str, r: hpb::RestoreVmRequest) -> Result<hpb::Vm, Status> {
        let mut c = self.host(addr)?;
        within(STATE_COPY_LIMIT, "RestoreVm", addr, c.restore_vm(r)).await
    }
}

/// How long a save or a restore may take: the VM's whole memory over iSCSI (hostd gives a
/// save 10 minutes itself).
const STATE_COPY_LIMIT: Duration = Duration::from_secs(660);
