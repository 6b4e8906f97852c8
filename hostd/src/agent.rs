//! The host's side of the pool: registering with the coordinators and heartbeating
//! (metrics and the VMs this host runs), and obeying what the pool answers.
//!
//! The pool knows a host by an id it gives at `JoinHost` and by the `HostService` address
//! it reaches the host at (unique in a pool). The agent finds its id by that address
//! (`ListHosts`), joins first when the pool does not know the address yet (unless joining
//! is off), then calls `HostAgentService.Heartbeat` every interval the pool asks for.
//!
//! Any member takes a heartbeat (a follower forwards it to the leader), so the agent keeps
//! using the member that answered last and moves to the next one when it does not answer.
//! When no member answers it backs off (doubling up to [`MAX_BACKOFF`]) and keeps trying;
//! the VMs keep running meanwhile: they are processes of their own and the agent only
//! reads the host's state. What the agent acts on is the pool's answer: VMs it names stale
//! (the pool placed them elsewhere, e.g. after fencing this host) are stopped and
//! forgotten here, so a fenced host rejoins once none of its old VMs runs.
//!
//! The agent reads and changes the host through the `HostService` trait it serves (an
//! in-process call, no network), so it sees exactly what the pool's own polls see.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pool_client::{Auth, Members, MembersError, PassError, new_request_id, pool_stub};
use proto::coordinator as pb;
use proto::coordinator::host_agent_service_client::HostAgentServiceClient;
use proto::host as hpb;
use proto::host::host_service_server::HostService;
use tonic::transport::{Channel, ClientTlsConfig};
use tonic::{Code, Request, Status};

use crate::config::PoolConfig;

/// Heartbeat interval when neither the pool nor the configuration says otherwise.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(1);
/// The longest wait between tries while the pool is unreachable.
pub const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// One call to one member.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Host info (CPU, memory, initiator name) is sent again this often.
const INFO_EVERY: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("[pool] names no coordinator")]
    NoCoordinators,
    #[error("coordinator address {address:?} is not valid")]
    BadCoordinator {
        address: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error(
        "the pool cannot reach this host at the wildcard address {listen}: set [pool] advertise \
         (or --pool-advertise) to the address it should use"
    )]
    NoAdvertise { listen: SocketAddr },
    #[error("[pool] token is not a valid header value")]
    BadToken,
    #[error("the pool refused {what}")]
    Refused {
        what: &'static str,
        #[source]
        status: Status,
    },
    #[error("no coordinator answered {what} (last: {last})")]
    Unreachable { what: &'static str, last: String },
    #[error("the pool knows no host at {address} and joining is off ([pool] join = false)")]
    NotJoined { address: String },
    #[error("joining the pool as {address} failed: {message}")]
    JoinFailed { address: String, message: String },
    #[error("this host's {what} failed")]
    Local {
        what: &'static str,
        #[source]
        status: Status,
    },
}

impl AgentError {
    fn code(&self) -> Option<Code> {
        match self {
            AgentError::Refused { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}

/// What the agent needs to know, resolved from the `[pool]` section and the daemon's flags.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    pub coordinators: Vec<String>,
    /// The `HostService` address the pool reaches this host at.
    pub address: String,
    /// The name to join under.
    pub name: String,
    pub join: bool,
    /// Until the pool asks for another.
    pub interval: Duration,
    pub token: Option<String>,
}

impl AgentConfig {
    /// `listen` is where `HostService` is bound; it is the advertised address unless the
    /// section names one, and cannot be when it is a wildcard.
    pub fn new(pool: &PoolConfig, listen: SocketAddr, name: &str) -> Result<Self, AgentError> {
        if pool.coordinators.is_empty() {
            return Err(AgentError::NoCoordinators);
        }
        let address = match &pool.advertise {
            Some(a) => a.clone(),
            None if listen.ip().is_unspecified() => {
                return Err(AgentError::NoAdvertise { listen });
            }
            None => listen.to_string(),
        };
        Ok(AgentConfig {
            coordinators: pool.coordinators.clone(),
            address,
            name: pool.name.clone().unwrap_or_else(|| name.to_owned()),
            join: pool.join.unwrap_or(true),
            interval: pool
                .heartbeat_interval_ms
                .map_or(DEFAULT_INTERVAL, Duration::from_millis),
            token: pool.token.clone(),
        })
    }
}

/// The coordinator members (the one that answered last first in line) and the token every
/// call carries.
struct Coordinators {
    members: Members,
    auth: Auth,
}

impl Coordinators {
    fn new(
        addrs: &[String],
        token: Option<&str>,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, AgentError> {
        let members = Members::new(addrs, Duration::from_secs(1), tls).map_err(|e| match e {
            MembersError::NoMembers => AgentError::NoCoordinators,
            MembersError::BadAddress { address, source } => {
                AgentError::BadCoordinator { address, source }
            }
        })?;
        let auth = match token {
            Some(t) => Auth::bearer(t).map_err(|_| AgentError::BadToken)?,
            None => Auth::default(),
        };
        Ok(Coordinators { members, auth })
    }

    /// Runs `f` on each member in turn, from the current one, until one answers; a
    /// refusal that another member would repeat (anything but unavailability) ends it.
    /// One round only: the heartbeat loop backs off between rounds itself.
    async fn call<T, F, Fut>(&mut self, what: &'static str, f: F) -> Result<T, AgentError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.members
            .pass(CALL_TIMEOUT, None, f)
            .await
            .map_err(|e| match e {
                PassError::Refused(status) => AgentError::Refused { what, status },
                PassError::Unreachable { address, last } => AgentError::Unreachable {
                    what,
                    last: format!("{address}: {}", last.message()),
                },
            })
    }
}

/// The heartbeat client of one hostd process.
pub struct Agent<H> {
    cfg: AgentConfig,
    host: Arc<H>,
    coordinators: Coordinators,
    /// A renewed certificate to call the coordinators with from the next heartbeat on.
    tls_updates: Option<tokio::sync::watch::Receiver<Option<ClientTlsConfig>>>,
    /// The pool's id of this host, once known.
    host_id: Option<String>,
    sequence: u64,
    info_sent_at: Option<Instant>,
    state: pb::HostState,
}

impl<H: HostService> Agent<H> {
    /// `tls`: the host's certificate and the pool's CAs, for calling the coordinators
    /// (None only in tests of the agent alone).
    pub fn new(
        cfg: AgentConfig,
        host: Arc<H>,
        tls: Option<&ClientTlsConfig>,
    ) -> Result<Self, AgentError> {
        let coordinators = Coordinators::new(&cfg.coordinators, cfg.token.as_deref(), tls)?;
        Ok(Agent {
            cfg,
            host,
            coordinators,
            tls_updates: None,
            host_id: None,
            sequence: 0,
            info_sent_at: None,
            state: pb::HostState::Unspecified,
        })
    }

    /// Calls the coordinators with each TLS configuration `updates` brings (a renewed
    /// certificate), from the heartbeat after it arrives.
    pub fn with_tls_updates(
        mut self,
        updates: tokio::sync::watch::Receiver<Option<ClientTlsConfig>>,
    ) -> Self {
        self.tls_updates = Some(updates);
        self
    }

    /// Takes a renewed certificate, if one came: new connections to the coordinators
    /// present it (the old one may expire while the daemon runs on).
    fn take_tls_update(&mut self) {
        let Some(rx) = self.tls_updates.as_mut() else {
            return;
        };
        if !rx.has_changed().unwrap_or(false) {
            return;
        }
        let Some(tls) = rx.borrow_and_update().clone() else {
            return;
        };
        match Coordinators::new(
            &self.cfg.coordinators,
            self.cfg.token.as_deref(),
            Some(&tls),
        ) {
            Ok(c) => self.coordinators = c,
            Err(e) => {
                tracing::warn!(error = %proto::error_chain(&e), "the renewed certificate cannot be used to call the pool")
            }
        }
    }

    /// The pool's id of this host, once the agent has found or joined it.
    pub fn host_id(&self) -> Option<&str> {
        self.host_id.as_deref()
    }

    /// The host's state in the pool, as of the last answered heartbeat.
    pub fn state(&self) -> pb::HostState {
        self.state
    }

    /// Heartbeats until `shutdown` completes; never gives up on an unreachable pool.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut wait = Duration::ZERO;
        let mut failures = 0u32;
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tokio::time::sleep(wait) => {}
            }
            self.take_tls_update();
            match self.beat().await {
                Ok(resp) => {
                    if failures > 0 {
                        tracing::info!(
                            host_id = self.host_id.as_deref().unwrap_or(""),
                            "the pool answers again"
                        );
                    }
                    failures = 0;
                    wait = match resp.next_heartbeat_ms {
                        0 => self.cfg.interval,
                        ms => Duration::from_millis(u64::from(ms)).min(self.cfg.interval * 10),
                    };
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    wait = backoff(self.cfg.interval, failures);
                    let msg = proto::error_chain(&e);
                    // The first failure and then one in ten: an outage is not a log flood.
                    if failures == 1 || failures.is_multiple_of(10) {
                        tracing::warn!(failures, retry_in = ?wait, error = %msg, "heartbeat failed; VMs keep running");
                    } else {
                        tracing::debug!(failures, error = %msg, "heartbeat failed");
                    }
                }
            }
        }
    }

    /// One heartbeat: finds (or joins as) this host first if needed, reports, and stops
    /// the VMs the pool calls stale.
    pub async fn beat(&mut self) -> Result<pb::HeartbeatResponse, AgentError> {
        let host_id = match &self.host_id {
            Some(id) => id.clone(),
            None => {
                let id = self.resolve().await?;
                tracing::info!(host_id = %id, address = %self.cfg.address, "registered with the pool");
                self.host_id = Some(id.clone());
                self.info_sent_at = None;
                id
            }
        };
        let vms = self.local_vms().await?;
        let info = if self.info_sent_at.is_none_or(|t| t.elapsed() >= INFO_EVERY) {
            let mut info = self
                .host
                .get_host_info(Request::new(hpb::GetHostInfoRequest {}))
                .await
                .map_err(|status| AgentError::Local {
                    what: "GetHostInfo",
                    status,
                })?
                .into_inner();
            info.host_id = host_id.clone();
            Some(info)
        } else {
            None
        };
        let metrics = self
            .host
            .get_host_metrics(Request::new(hpb::GetHostMetricsRequest {}))
            .await
            .ok()
            .map(|r| r.into_inner());
        self.sequence += 1;
        let sent_info = info.is_some();
        let msg = pb::HeartbeatRequest {
            host_id,
            info,
            metrics,
            vms,
            sequence: self.sequence,
            nics: host_nics(std::path::Path::new("/sys/class/net")),
            nics_known: true,
        };
        let auth = self.coordinators.auth.clone();
        let res = self
            .coordinators
            .call("the heartbeat", |ch| {
                let mut c = HostAgentServiceClient::with_interceptor(ch, auth.clone());
                let msg = msg.clone();
                async move { c.heartbeat(msg).await }
            })
            .await;
        let resp = match res {
            Ok(r) => r,
            Err(e) => {
                if e.code() == Some(Code::NotFound) {
                    // Removed from the pool (or a new pool): find or join again next time.
                    self.host_id = None;
                }
                return Err(e);
            }
        };
        if sent_info {
            self.info_sent_at = Some(Instant::now());
        }
        let state = pb::HostState::try_from(resp.state).unwrap_or(pb::HostState::Unspecified);
        if state != self.state {
            tracing::info!(from = ?self.state, to = ?state, "host state in the pool");
            self.state = state;
        }
        for vm_id in &resp.stale_vm_ids {
            self.stop_stale(vm_id).await;
        }
        Ok(resp)
    }

    /// Stops and forgets a VM the pool placed elsewhere. Its volumes are logged out; the
    /// pool fenced this host at the storage before restarting it elsewhere, so no write of
    /// ours can reach them anyway.
    async fn stop_stale(&self, vm_id: &str) {
        tracing::warn!(vm_id, "the pool placed this VM elsewhere: stopping it here");
        let req = Request::new(hpb::VmRequest {
            vm_id: vm_id.to_owned(),
        });
        if let Err(s) = self.host.destroy_vm(req).await
            && s.code() != Code::NotFound
        {
            tracing::warn!(vm_id, error = %s.message(), "could not stop a stale VM; will retry at the next heartbeat");
        }
    }

    async fn local_vms(&self) -> Result<Vec<hpb::Vm>, AgentError> {
        let mut out = Vec::new();
        let mut page_token = String::new();
        loop {
            let r = self
                .host
                .list_vms(Request::new(hpb::ListVmsRequest {
                    page_size: 0,
                    page_token: page_token.clone(),
                }))
                .await
                .map_err(|status| AgentError::Local {
                    what: "ListVms",
                    status,
                })?
                .into_inner();
            out.extend(r.vms);
            if r.next_page_token.is_empty() || r.next_page_token == page_token {
                return Ok(out);
            }
            page_token = r.next_page_token;
        }
    }

    /// This host's id in the pool: found by its address, or given by joining.
    async fn resolve(&mut self) -> Result<String, AgentError> {
        if let Some(id) = self.find_by_address().await? {
            return Ok(id);
        }
        if !self.cfg.join {
            return Err(AgentError::NotJoined {
                address: self.cfg.address.clone(),
            });
        }
        let join = pb::JoinHostRequest {
            request_id: new_request_id(),
            name: self.cfg.name.clone(),
            address: self.cfg.address.clone(),
        };
        let auth = self.coordinators.auth.clone();
        let res = self
            .coordinators
            .call("joining", |ch| {
                let mut p = pool_stub(ch, auth.clone());
                let join = join.clone();
                async move { p.join_host(join).await }
            })
            .await;
        match res {
            Ok(pb::TaskResponse { task: Some(t) })
                if t.state == pb::TaskState::Succeeded as i32 && !t.target_id.is_empty() =>
            {
                return Ok(t.target_id);
            }
            Ok(pb::TaskResponse { task: Some(t) }) if t.error_code != "ALREADY_EXISTS" => {
                return Err(AgentError::JoinFailed {
                    address: self.cfg.address.clone(),
                    message: format!("{}: {}", t.error_code, t.error_message),
                });
            }
            // Someone joined this address meanwhile (or our earlier try committed).
            Err(e) if e.code() != Some(Code::AlreadyExists) => return Err(e),
            _ => {}
        }
        self.find_by_address()
            .await?
            .ok_or_else(|| AgentError::JoinFailed {
                address: self.cfg.address.clone(),
                message: "joined, but the pool does not list the host".into(),
            })
    }

    async fn find_by_address(&mut self) -> Result<Option<String>, AgentError> {
        let mut page_token = String::new();
        loop {
            let req = pb::ListHostsRequest {
                page: Some(pb::PageRequest {
                    page_size: 0,
                    page_token: page_token.clone(),
                }),
                state: 0,
            };
            let auth = self.coordinators.auth.clone();
            let r = self
                .coordinators
                .call("listing hosts", |ch| {
                    let mut p = pool_stub(ch, auth.clone());
                    let req = req.clone();
                    async move { p.list_hosts(req).await }
                })
                .await?;
            if let Some(h) = r.hosts.iter().find(|h| h.address == self.cfg.address) {
                return Ok(Some(h.id.clone()));
            }
            if r.next_page_token.is_empty() || r.next_page_token == page_token {
                return Ok(None);
            }
            page_token = r.next_page_token;
        }
    }
}

/// The wait after `failures` failed heartbeats in a row: the interval, doubled each time,
/// at most [`MAX_BACKOFF`].
/// The NICs an external network can be bridged onto, from `sys_class_net`
/// (`/sys/class/net`): every interface but loopback, bridges, taps and VXLAN devices
/// (those are what hosts make for networks themselves). Sorted; empty when unreadable.
pub fn host_nics(sys_class_net: &std::path::Path) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(sys_class_net) else {
        return Vec::new();
    };
    let mut out: Vec<String> = dir
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let p = e.path();
            let uevent = std::fs::read_to_string(p.join("uevent")).unwrap_or_default();
            let kind = |k: &str| uevent.lines().any(|l| l == format!("DEVTYPE={k}"));
            let made_by_hosts = name == "lo"
                || p.join("bridge").exists()
                || p.join("tun_flags").exists()
                || kind("bridge")
                || kind("vxlan");
            (!made_by_hosts).then_some(name)
        })
        .collect();
    out.sort();
    out
}

pub fn backoff(interval: Duration, failures: u32) -> Duration {
    let doubled = interval.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    doubled.min(MAX_BACKOFF.max(interval))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nics_leave_out_loopback_bridges_taps_and_vxlan() {
        let dir = tempfile::tempdir().unwrap();
        let dev = |name: &str, uevent: &str, marker: Option<&str>| {
            let d = dir.path().join(name);
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join("uevent"), uevent).unwrap();
            if let Some(m) = marker {
                std::fs::create_dir(d.join(m)).unwrap();
            }
        };
        dev("lo", "INTERFACE=lo\nIFINDEX=1\n", None);
        dev("eth0", "INTERFACE=eth0\nIFINDEX=2\n", None);
        dev(
            "br-net1",
            "DEVTYPE=bridge\nINTERFACE=br-net1\n",
            Some("bridge"),
        );
        dev("tap3", "INTERFACE=tap3\n", Some("tun_flags"));
        dev("vx5", "DEVTYPE=vxlan\nINTERFACE=vx5\n", None);
        dev("veth-a", "INTERFACE=veth-a\n", None);
        assert_eq!(host_nics(dir.path()), ["eth0", "veth-a"]);
        assert!(host_nics(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let i = Duration::from_millis(500);
        assert_eq!(backoff(i, 1), i);
        assert_eq!(backoff(i, 2), i * 2);
        assert_eq!(backoff(i, 3), i * 4);
        assert_eq!(backoff(i, 100), MAX_BACKOFF);
        // An interval longer than the cap is never shortened.
        assert_eq!(backoff(Duration::from_secs(30), 5), Duration::from_secs(30));
    }

    /// A coordinator that takes heartbeats and counts them.
    struct Counting(Arc<std::sync::atomic::AtomicU32>);

    #[tonic::async_trait]
    impl proto::coordinator::host_agent_service_server::HostAgentService for Counting {
        async fn heartbeat(
            &self,
            r: Request<pb::HeartbeatRequest>,
        ) -> Result<tonic::Response<pb::HeartbeatResponse>, Status> {
            if r.into_inner().host_id != "h1" {
                return Err(Status::not_found("no such host"));
            }
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(tonic::Response::new(pb::HeartbeatResponse {
                state: pb::HostState::Enabled as i32,
                stale_vm_ids: vec![],
                next_heartbeat_ms: 100,
            }))
        }
    }

    #[tokio::test]
    async fn calls_move_past_a_dead_member_and_stay_with_the_live_one() {
        use proto::coordinator::host_agent_service_server::HostAgentServiceServer;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = listener.local_addr().unwrap().to_string();
        let count = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let server = tonic::transport::Server::builder()
            .add_service(HostAgentServiceServer::new(Counting(count.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let server = tokio::spawn(server);
        // A port nobody listens on: bound, then closed.
        let dead = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().to_string()
        };
        let mut m = Coordinators::new(&[dead.clone(), live.clone()], None, None).unwrap();
        let beat = |host: &'static str| {
            move |ch: Channel| async move {
                HostAgentServiceClient::new(ch)
                    .heartbeat(pb::HeartbeatRequest {
                        host_id: host.into(),
                        ..Default::default()
                    })
                    .await
            }
        };
        let r = m.call("the heartbeat", beat("h1")).await.unwrap();
        assert_eq!(r.state, pb::HostState::Enabled as i32);
        assert_eq!(
            m.members.current(),
            1,
            "the live member is first in line now"
        );
        m.call("the heartbeat", beat("h1")).await.unwrap();
        assert_eq!(count.load(std::sync::atomic::Ordering::SeqCst), 2);
        // A refusal is final: not retried on the dead member, and its code is kept.
        let e = m.call("the heartbeat", beat("nobody")).await.unwrap_err();
        assert_eq!(e.code(), Some(Code::NotFound));
        assert_eq!(m.members.current(), 1);
        // With every member gone the error says which was tried last.
        server.abort();
        let _ = server.await;
        let mut m = Coordinators::new(std::slice::from_ref(&dead), None, None).unwrap();
        match m.call("the heartbeat", beat("h1")).await {
            Err(AgentError::Unreachable { last, .. }) => assert!(last.contains(&dead), "{last}"),
            other => panic!("expected Unreachable, got {other:?}"),
        }
    }

    #[test]
    fn config_from_the_pool_section() {
        let listen: SocketAddr = "127.0.0.11:7000".parse().unwrap();
        let mut pool = PoolConfig::default();
        assert!(matches!(
            AgentConfig::new(&pool, listen, "h1"),
            Err(AgentError::NoCoordinators)
        ));
        pool.coordinators = vec!["127.0.0.1:7101".into()];
        let cfg = AgentConfig::new(&pool, listen, "h1").unwrap();
        assert_eq!(cfg.address, "127.0.0.11:7000");
        assert_eq!(cfg.name, "h1");
        assert!(cfg.join);
        assert_eq!(cfg.interval, DEFAULT_INTERVAL);
        let wild: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        assert!(matches!(
            AgentConfig::new(&pool, wild, "h1"),
            Err(AgentError::NoAdvertise { .. })
        ));
        pool.advertise = Some("10.0.0.5:7000".into());
        pool.join = Some(false);
        let cfg = AgentConfig::new(&pool, wild, "h1").unwrap();
        assert_eq!(cfg.address, "10.0.0.5:7000");
        assert!(!cfg.join);
    }
}
