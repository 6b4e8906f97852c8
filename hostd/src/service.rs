//! `HostService` (proto/host.proto) over the [`Manager`]: VM lifecycle, console streams,
//! disks, host information and metrics, live migration (the destination is prepared, the
//! source sends, progress streams back; see [`crate::migration`]).
//!
//! VMs run in their own processes, so a client that disconnects (or a daemon that
//! restarts) leaves them running.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pool_trust::Role;
use pool_trust::serve::ServerTls;
use pool_trust::tls::RequireRole;
use proto::host::host_service_server::{HostService, HostServiceServer};
use proto::host::*;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::interceptor::InterceptedService;
use tonic::{Request, Response, Status, Streaming};

use crate::host::{CpuSampler, cpu_info, hostname, kvm_status, logical_cpus, meminfo};
use crate::supervisor::manager::{Manager, ManagerError, migration_ended};
use crate::supervisor::protocol::MigrateSend;
use crate::supervisor::spec::SpecError;

/// Identity of this host, for `GetHostInfo`.
#[derive(Debug, Clone, Default)]
pub struct HostIdentity {
    pub host_id: String,
    pub initiator_iqn: String,
    pub migration_address: String,
}

pub struct HostServer {
    manager: Arc<Manager>,
    identity: HostIdentity,
    cpu: Mutex<CpuSampler>,
    /// Outgoing migrations started here: migration id to VM id.
    migrations: Mutex<HashMap<String, String>>,
}

impl HostServer {
    pub fn new(manager: Arc<Manager>, identity: HostIdentity) -> Self {
        let mut sampler = CpuSampler::default();
        sampler.sample();
        Self {
            manager,
            identity,
            cpu: Mutex::new(sampler),
            migrations: Mutex::new(HashMap::new()),
        }
    }
}

/// Serves `HostService` on `listener` until `shutdown` completes, over mutual TLS to the
/// pool's coordinator members only (hosts do not call each other's control API, and
/// nobody else may), and `GET /metrics` to members and monitors (`crate::metrics`). `tls` may be reloaded meanwhile (a renewed certificate).
pub async fn serve(
    listener: TcpListener,
    server: HostServer,
    tls: ServerTls,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let pool = tls.pool_id().clone();
    let members_only = RequireRole::new(pool.clone(), &[Role::Member]);
    let (manager, host) = (server.manager.clone(), server.identity.host_id.clone());
    let render: pool_trust::scrape::Render = Arc::new(move || {
        let (manager, host) = (manager.clone(), host.clone());
        Box::pin(async move { crate::metrics::render(&manager, &host).await })
    });
    Ok(tonic::transport::Server::builder()
        // `/metrics` over HTTP/1.1 too, for scrapers that do not speak HTTP/2.
        .accept_http1(true)
        .layer(pool_trust::scrape::ScrapeLayer::new(
            pool.clone(),
            "hostd",
            render,
        ))
        .layer(pool_trust::audit::AuditLayer::new(pool, "hostd"))
        .add_service(InterceptedService::new(
            HostServiceServer::new(server),
            members_only,
        ))
        .serve_with_incoming_shutdown(tls.incoming(listener), shutdown)
        .await?)
}

/// Why [`serve`] stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("serving HostService failed")]
    Transport(#[from] tonic::transport::Error),
    #[error("the TLS directory cannot be served with")]
    Tls(#[from] pool_trust::serve::ServeTlsError),
}

fn status(e: ManagerError) -> Status {
    let msg = proto::error_chain(&e);
    match e {
        ManagerError::NotFound(_) => Status::not_found(msg),
        ManagerError::AlreadyExists { .. } => Status::already_exists(msg),
        ManagerError::BadId(_) => Status::invalid_argument(msg),
        ManagerError::Spec(SpecError::NoInitiatorName { .. }) => Status::failed_precondition(msg),
        ManagerError::Spec(SpecError::OutsideImages { .. }) => Status::permission_denied(msg),
        ManagerError::Spec(s) if s.is_not_found() => Status::not_found(msg),
        ManagerError::Spec(_) => Status::invalid_argument(msg),
        ManagerError::WrongState { .. } | ManagerError::Disk { .. } => {
            Status::failed_precondition(msg)
        }
        ManagerError::NoMemory { .. } => Status::resource_exhausted(msg),
        ManagerError::StartFailed { .. } | ManagerError::Command { .. } => {
            Status::failed_precondition(msg)
        }
        ManagerError::Unresponsive { .. } => Status::unavailable(msg),
        // The host lacks what the network needs (its NIC, a VXLAN address) or a device
        // of that name is someone else's: this host cannot run the VM as asked.
        ManagerError::NoHostNetworks { .. }
        | ManagerError::Network { .. }
        | ManagerError::HostNetworkingOff
        | ManagerError::NetworkPeers { .. } => Status::failed_precondition(msg),
        ManagerError::Io { .. } | ManagerError::Spawn { .. } | ManagerError::HostNetworks(_) => {
            Status::internal(msg)
        }
    }
}

#[tonic::async_trait]
impl HostService for HostServer {
    async fn get_host_info(
        &self,
        _: Request<GetHostInfoRequest>,
    ) -> Result<Response<HostInfo>, Status> {
        let (kvm_available, notes) = kvm_status();
        Ok(Response::new(HostInfo {
            host_id: self.identity.host_id.clone(),
            hostname: hostname(),
            version: env!("CARGO_PKG_VERSION").into(),
            initiator_iqn: self.identity.initiator_iqn.clone(),
            cpu: Some(cpu_info()),
            memory_total_bytes: meminfo().total_bytes,
            memory_available_bytes: self.manager.memory_available().await,
            logical_cpus: logical_cpus(),
            migration_address: self.identity.migration_address.clone(),
            kvm_available,
            notes,
        }))
    }

    async fn get_host_metrics(
        &self,
        _: Request<GetHostMetricsRequest>,
    ) -> Result<Response<HostMetrics>, Status> {
        let cpu_percent = self.cpu.lock().unwrap_or_else(|p| p.into_inner()).sample();
        let mem = meminfo();
        let (vms_running, vcpus_assigned, memory_assigned) = self.manager.usage().await;
        Ok(Response::new(HostMetrics {
            at: Some(proto::timestamp(proto::unix_ms())),
            cpu_percent,
            memory_total_bytes: mem.total_bytes,
            memory_used_bytes: mem.total_bytes.saturating_sub(mem.available_bytes),
            memory_assigned_to_vms_bytes: memory_assigned,
            vms_running,
            vcpus_assigned,
            vms: self.manager.all_metrics().await,
        }))
    }

    async fn create_vm(&self, req: Request<CreateVmRequest>) -> Result<Response<Vm>, Status> {
        let req = req.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        self.manager
            .create(req.vm_id, config, req.start)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn save_vm(
        &self,
        req: Request<SaveVmRequest>,
    ) -> Result<Response<SaveVmResponse>, Status> {
        let req = req.into_inner();
        let volume = req
            .state_volume
            .ok_or_else(|| Status::invalid_argument("state_volume is required"))?;
        let (vm, saved) = self
            .manager
            .save(&req.vm_id, volume, req.resume)
            .await
            .map_err(status)?;
        Ok(Response::new(SaveVmResponse {
            vm: Some(vm),
            pause_ms: saved.pause_ms,
            bytes_written: saved.bytes_written,
        }))
    }

    async fn restore_vm(&self, req: Request<RestoreVmRequest>) -> Result<Response<Vm>, Status> {
        let req = req.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        let volume = req
            .state_volume
            .ok_or_else(|| Status::invalid_argument("state_volume is required"))?;
        self.manager
            .restore(&req.vm_id, config, volume)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn start_vm(&self, req: Request<VmRequest>) -> Result<Response<Vm>, Status> {
        self.manager
            .start(&req.into_inner().vm_id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn pause_vm(&self, req: Request<VmRequest>) -> Result<Response<Vm>, Status> {
        self.manager
            .pause(&req.into_inner().vm_id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn resume_vm(&self, req: Request<VmRequest>) -> Result<Response<Vm>, Status> {
        self.manager
            .resume(&req.into_inner().vm_id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn reboot_vm(&self, req: Request<RebootVmRequest>) -> Result<Response<Vm>, Status> {
        let req = req.into_inner();
        self.manager
            .reboot(&req.vm_id, req.force)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn shutdown_vm(&self, req: Request<ShutdownVmRequest>) -> Result<Response<Vm>, Status> {
        let req = req.into_inner();
        self.manager
            .shutdown(
                &req.vm_id,
                req.force,
                Duration::from_secs(u64::from(req.timeout_seconds)),
            )
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn destroy_vm(
        &self,
        req: Request<VmRequest>,
    ) -> Result<Response<DestroyVmResponse>, Status> {
        self.manager
            .destroy(&req.into_inner().vm_id)
            .await
            .map(|()| Response::new(DestroyVmResponse {}))
            .map_err(status)
    }

    async fn get_vm(&self, req: Request<VmRequest>) -> Result<Response<Vm>, Status> {
        self.manager
            .get_vm(&req.into_inner().vm_id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn list_vms(
        &self,
        req: Request<ListVmsRequest>,
    ) -> Result<Response<ListVmsResponse>, Status> {
        let req = req.into_inner();
        let (vms, next_page_token) = self
            .manager
            .list(req.page_size as usize, &req.page_token)
            .await;
        Ok(Response::new(ListVmsResponse {
            vms,
            next_page_token,
        }))
    }

    async fn get_vm_metrics(&self, req: Request<VmRequest>) -> Result<Response<VmMetrics>, Status> {
        self.manager
            .metrics(&req.into_inner().vm_id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    type StreamConsoleStream = ReceiverStream<Result<ConsoleOutput, Status>>;

    async fn stream_console(
        &self,
        req: Request<Streaming<ConsoleInput>>,
    ) -> Result<Response<Self::StreamConsoleStream>, Status> {
        let mut input = req.into_inner();
        let first = input
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the first message must name the VM"))?;
        let vm_id = first.vm_id.clone();
        let console = self.manager.console(&vm_id).await.map_err(status)?;
        let sub = console.subscribe();
        let (tx, rx) = mpsc::channel(256);
        if !first.live_only {
            let history = ConsoleOutput {
                data: sub.history,
                dropped_bytes: sub.dropped_bytes,
            };
            let _ = tx.send(Ok(history)).await;
        }
        if !first.data.is_empty() {
            self.manager
                .console_input(&vm_id, first.data)
                .await
                .map_err(status)?;
        }
        let mut live = sub.live;
        let out = tx.clone();
        tokio::spawn(async move {
            loop {
                let msg = match live.recv().await {
                    Ok(data) => ConsoleOutput {
                        data: data.to_vec(),
                        dropped_bytes: 0,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => ConsoleOutput {
                        data: Vec::new(),
                        dropped_bytes: n,
                    },
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                };
                if out.send(Ok(msg)).await.is_err() {
                    break;
                }
            }
        });
        let manager = self.manager.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = input.message().await {
                if msg.data.is_empty() {
                    continue;
                }
                if let Err(e) = manager.console_input(&vm_id, msg.data).await {
                    let _ = tx.send(Err(status(e))).await;
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn attach_disk(&self, req: Request<AttachDiskRequest>) -> Result<Response<Vm>, Status> {
        let req = req.into_inner();
        let disk = req
            .disk
            .ok_or_else(|| Status::invalid_argument("disk is required"))?;
        self.manager
            .attach_disk(&req.vm_id, disk)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn detach_disk(&self, req: Request<DetachDiskRequest>) -> Result<Response<Vm>, Status> {
        let req = req.into_inner();
        self.manager
            .detach_disk(&req.vm_id, &req.disk_id)
            .await
            .map(Response::new)
            .map_err(status)
    }

    async fn set_network_peers(
        &self,
        req: Request<SetNetworkPeersRequest>,
    ) -> Result<Response<SetNetworkPeersResponse>, Status> {
        let network = req
            .into_inner()
            .network
            .ok_or_else(|| Status::invalid_argument("network is required"))?;
        let change = self
            .manager
            .set_network_peers(&network)
            .await
            .map_err(status)?;
        let names = |ips: Vec<std::net::IpAddr>| ips.iter().map(|ip| ip.to_string()).collect();
        Ok(Response::new(match change {
            Some(c) => SetNetworkPeersResponse {
                present: true,
                added: names(c.added),
                removed: names(c.removed),
            },
            None => SetNetworkPeersResponse::default(),
        }))
    }

    async fn prepare_migration_receive(
        &self,
        req: Request<PrepareMigrationReceiveRequest>,
    ) -> Result<Response<PrepareMigrationReceiveResponse>, Status> {
        let local = req.local_addr();
        let req = req.into_inner();
        let config = req
            .config
            .ok_or_else(|| Status::invalid_argument("config is required"))?;
        if req.token.len() < 8 {
            return Err(Status::invalid_argument(
                "the migration token must be at least 8 characters",
            ));
        }
        if req.source_host.is_empty() {
            return Err(Status::invalid_argument(
                "source_host is required: the migration stream is taken only from that host's certificate",
            ));
        }
        let ip = self.migration_ip(local);
        let address = self
            .manager
            .prepare_incoming(&req.vm_id, config, &req.token, &req.source_host, &ip)
            .await
            .map_err(status)?;
        Ok(Response::new(PrepareMigrationReceiveResponse {
            address,
            migration_id: format!("in-{}", req.vm_id),
            stream_version: u32::from(crate::migration::wire::VERSION),
        }))
    }

    type StartMigrationSendStream = ReceiverStream<Result<MigrationProgress, Status>>;

    async fn start_migration_send(
        &self,
        req: Request<StartMigrationSendRequest>,
    ) -> Result<Response<Self::StartMigrationSendStream>, Status> {
        let req = req.into_inner();
        if req.destination_address.is_empty()
            || req.token.is_empty()
            || req.destination_host.is_empty()
        {
            return Err(Status::invalid_argument(
                "destination_address, destination_host and token are required",
            ));
        }
        let migration_id = uuid::Uuid::new_v4().to_string();
        let mut progress = self
            .manager
            .migrate_send(
                &req.vm_id,
                MigrateSend {
                    migration_id: migration_id.clone(),
                    destination: req.destination_address,
                    token: req.token,
                    downtime_budget_ms: req.downtime_budget_ms,
                    max_rounds: req.max_rounds,
                    timeout_seconds: req.timeout_seconds,
                    auto_converge: req.auto_converge,
                    bandwidth_limit_bytes_per_second: req.bandwidth_limit_bytes_per_second,
                    destination_host: req.destination_host,
                    // Set by the manager: the host's own TLS directory.
                    tls_dir: String::new(),
                    destination_stream_version: req.destination_stream_version,
                },
            )
            .await
            .map_err(status)?;
        self.migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(migration_id.clone(), req.vm_id.clone());
        let (tx, rx) = mpsc::channel(64);
        let manager = self.manager.clone();
        let vm_id = req.vm_id;
        tokio::spawn(async move {
            // Runs to the migration's end even if the client goes away: GetMigration
            // answers from the same state.
            let mut client = true;
            loop {
                let p = progress.borrow_and_update().clone();
                if let Some(p) = p {
                    let ended = migration_ended(&p);
                    if client && tx.send(Ok(p.clone())).await.is_err() {
                        client = false;
                    }
                    if ended {
                        if p.phase == MigrationPhase::Completed as i32 {
                            manager.forget_migrated(&vm_id).await;
                        }
                        break;
                    }
                }
                if progress.changed().await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_migration(
        &self,
        req: Request<GetMigrationRequest>,
    ) -> Result<Response<MigrationProgress>, Status> {
        let mid = req.into_inner().migration_id;
        let vm_id = self.migration_vm(&mid)?;
        match self.manager.migration(&vm_id).await {
            Ok(Some(p)) if p.migration_id == mid => Ok(Response::new(p)),
            // The VM left this host when the migration completed.
            Err(ManagerError::NotFound(_)) => Ok(Response::new(MigrationProgress {
                migration_id: mid,
                vm_id,
                phase: MigrationPhase::Completed as i32,
                ..Default::default()
            })),
            Ok(_) => Err(Status::not_found(format!("no migration {mid}"))),
            Err(e) => Err(status(e)),
        }
    }

    async fn cancel_migration(
        &self,
        req: Request<CancelMigrationRequest>,
    ) -> Result<Response<MigrationProgress>, Status> {
        let mid = req.into_inner().migration_id;
        let vm_id = self.migration_vm(&mid)?;
        let current = self.manager.migration(&vm_id).await.map_err(status)?;
        match current {
            Some(p) if p.migration_id == mid && migration_ended(&p) => {
                return Err(Status::failed_precondition(format!(
                    "migration {mid} has already ended ({})",
                    MigrationPhase::try_from(p.phase)
                        .map(|x| x.as_str_name())
                        .unwrap_or("?")
                )));
            }
            Some(p) if p.migration_id == mid => {}
            _ => return Err(Status::not_found(format!("no migration {mid}"))),
        }
        self.manager
            .cancel_migration(&vm_id)
            .await
            .map_err(status)?;
        // The outcome: Cancelled, or Completed if the switchover was committed first.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.manager.migration(&vm_id).await {
                Ok(Some(p)) if migration_ended(&p) => return Ok(Response::new(p)),
                Ok(_) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Ok(p) => return Ok(Response::new(p.unwrap_or_default())),
                Err(ManagerError::NotFound(_)) => {
                    return Ok(Response::new(MigrationProgress {
                        migration_id: mid,
                        vm_id,
                        phase: MigrationPhase::Completed as i32,
                        ..Default::default()
                    }));
                }
                Err(e) => return Err(status(e)),
            }
        }
    }
}

impl HostServer {
    /// The address incoming VMs listen on: the configured migration address's host,
    /// else the address the request came in on (so the source reaches it the way it
    /// reached this service), else loopback.
    fn migration_ip(&self, local: Option<std::net::SocketAddr>) -> String {
        if let Ok(a) = self
            .identity
            .migration_address
            .parse::<std::net::SocketAddr>()
        {
            return a.ip().to_string();
        }
        if let Some(ip) = self
            .identity
            .migration_address
            .rsplit_once(':')
            .map(|(h, _)| h.to_owned())
            .filter(|h| !h.is_empty())
        {
            return ip;
        }
        local
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "127.0.0.1".into())
    }

    fn migration_vm(&self, mid: &str) -> Result<String, Status> {
        self.migrations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(mid)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no migration {mid} on this host")))
    }
}
