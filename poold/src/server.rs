//! Starting a member: open (or bootstrap) its Raft store, start the node task and the
//! leader-only loops, and serve the gRPC services on a bound listener until shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pool_trust::serve::ServerTls;
use pool_trust::{ClientAuth, Role};
use proto::coordinator::coordinator_peer_service_server::CoordinatorPeerServiceServer;
use proto::coordinator::host_agent_service_server::HostAgentServiceServer;
use proto::coordinator::pool_service_server::PoolServiceServer;
use tokio::net::TcpListener;
use tonic::service::interceptor::InterceptedService;

use crate::consensus::node::{self, NodeConfig};
use crate::consensus::storage::{DiskStorage, StorageOpenError};
use crate::consensus::transport::Faults;
use crate::consensus::transport::member_address;
use crate::coordinator::Coordinator;
use crate::history::{self, History};
use crate::service::{agent, peer, pool};
use crate::state::command::{Op, PoolCaRecord};
use crate::state::{PoolState, snapshot};
use crate::tls::{LiveTls, RequireRole};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] StorageOpenError),
    #[error("bootstrapping the Raft store failed")]
    Bootstrap(#[source] raft::Error),
    #[error("member {id} is not among the initial members {members:?}")]
    NotAMember { id: u64, members: Vec<u64> },
    #[error(
        "the data directory is empty and there are no initial members: give them, or --join an existing pool"
    )]
    NothingToStart,
    #[error("cannot make the data directory private (0700)")]
    DataDir(#[source] std::io::Error),
    #[error("starting the Raft node failed")]
    Node(#[from] node::NodeStartError),
    #[error("serving gRPC failed")]
    Serve(#[source] tonic::transport::Error),
    #[error(
        "the web console is served over HTTPS only: --web-listen needs the member's TLS directory"
    )]
    WebWithoutTls,
    #[error("the TLS directory cannot be served with")]
    Tls(#[from] pool_trust::serve::ServeTlsError),
}

/// What a member needs to start.
#[derive(Debug, Clone)]
pub struct MemberConfig {
    pub node: NodeConfig,
    pub data_dir: PathBuf,
    /// The founding members (id → address). Used only when the data directory is empty
    /// and `join` is false; every founding member must be given the same map.
    pub initial_members: BTreeMap<u64, String>,
    /// Start empty and wait for the leader's snapshot (after AddMember on the pool).
    pub join: bool,
    /// When the pool has no user yet, the leader creates "admin" (pool-admin) with this
    /// password, so the pool is never open. Without one, it generates a password and
    /// writes it to [`ADMIN_PASSWORD_FILE`] in its data directory (0600).
    pub admin_password: Option<String>,
    /// The pool's CA (`--found-ca`): committed once when the pool has none, so the pool
    /// issues joining daemons their certificates.
    pub found_ca: Option<PoolCaRecord>,
    /// This member's TLS directory (`--tls-dir`): the pool's CA bundle and a member
    /// certificate. Every service is served over TLS with it and every call made with it.
    pub tls: Option<pool_trust::DaemonTls>,
    /// Where `tls` was read from: renewed credentials are written there. Without it the
    /// member does not renew (tests of one layer).
    pub tls_dir: Option<PathBuf>,
    /// The directories under which backup schedules may have this member write
    /// (`--backup-root`): it writes as root, so only where its operator allows.
    pub backup_roots: Vec<PathBuf>,
}

/// Where a member that generated the first admin's password leaves it.
pub const ADMIN_PASSWORD_FILE: &str = "admin-password";

pub struct Member {
    pub coordinator: Arc<Coordinator>,
    admin_password: Option<String>,
    found_ca: Option<PoolCaRecord>,
    data_dir: PathBuf,
    tls_dir: Option<PathBuf>,
    web: Option<WebConfig>,
}

/// The web console's port (`--web-listen`, `--web-root`).
pub struct WebConfig {
    pub listener: TcpListener,
    /// The console's built files; without them the port serves the API and a page saying
    /// how to build them.
    pub root: Option<PathBuf>,
}

impl Member {
    /// Opens the store, bootstraps a new group if needed, starts the node task.
    pub fn start(cfg: MemberConfig) -> Result<Member, StartError> {
        let id = cfg.node.id;
        private_dir(&cfg.data_dir).map_err(StartError::DataDir)?;
        let mut storage = DiskStorage::open(&cfg.data_dir, id)?;
        if storage.is_empty() && !cfg.join {
            if cfg.initial_members.is_empty() {
                return Err(StartError::NothingToStart);
            }
            if !cfg.initial_members.contains_key(&id) {
                return Err(StartError::NotAMember {
                    id,
                    members: cfg.initial_members.keys().copied().collect(),
                });
            }
            let state = PoolState::new(&cfg.node.pool_id, cfg.initial_members.clone());
            let voters: Vec<u64> = cfg.initial_members.keys().copied().collect();
            storage
                .bootstrap(&voters, snapshot::encode(&state))
                .map_err(StartError::Bootstrap)?;
            tracing::info!(?voters, "bootstrapped a new pool");
        }
        let faults = Arc::new(Faults::from_env());
        let tls = cfg.tls.map(LiveTls::new);
        let mut node_cfg = cfg.node.clone();
        node_cfg.seeds = cfg.initial_members.clone();
        node_cfg.tls = tls.clone();
        let (history, bad) = History::load(&cfg.data_dir.join(history::FILE));
        if let Some(e) = bad {
            tracing::warn!(error = %proto::error_chain(&e), "starting with empty metrics history");
        }
        let handle = node::start(
            node_cfg,
            storage,
            history,
            tokio::runtime::Handle::current(),
            faults.clone(),
        )?;
        let mut coordinator = Coordinator::new(handle, faults, cfg.initial_members, tls);
        coordinator.backup_roots = cfg.backup_roots.into();
        Ok(Member {
            coordinator: Arc::new(coordinator),
            admin_password: cfg.admin_password,
            found_ca: cfg.found_ca,
            data_dir: cfg.data_dir,
            tls_dir: cfg.tls_dir,
            web: None,
        })
    }

    /// Serves the web console on `web` too (over HTTPS: the member needs its TLS).
    pub fn with_web(mut self, web: WebConfig) -> Member {
        self.web = Some(web);
        self
    }

    /// Serves PoolService, HostAgentService and CoordinatorPeerService on `listener`
    /// until `shutdown` completes.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), StartError> {
        let c = self.coordinator;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let grpc = Arc::new(crate::backend::Grpc::new(c.tls.clone()));
        let env = crate::jobs::Env {
            ledger: c.clone(),
            storage: grpc.clone(),
            hosts: grpc.clone(),
            backup_roots: c.backup_roots.clone(),
        };
        // The leader-only loops; each idles on a follower.
        let loops = vec![
            tokio::spawn(agent::monitor(c.clone(), stop_rx.clone())),
            tokio::spawn(agent::poll_hosts(c.clone(), grpc.clone(), stop_rx.clone())),
            tokio::spawn(crate::reconcile::run(
                c.clone(),
                env.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(crate::jobs::run(c.clone(), env.clone(), stop_rx.clone())),
            tokio::spawn(crate::jobs::ha::run(c.clone(), stop_rx.clone())),
            tokio::spawn(crate::schedules::run(c.clone(), stop_rx.clone())),
            tokio::spawn(crate::jobs::storage::refresh_loop(
                c.clone(),
                env.clone(),
                stop_rx.clone(),
            )),
            tokio::spawn(bootstrap_admin(
                c.clone(),
                self.admin_password.clone(),
                self.data_dir.join(ADMIN_PASSWORD_FILE),
                stop_rx.clone(),
            )),
        ];
        let mut loops = loops;
        let history_saver = tokio::spawn(keep_history_saved(
            c.clone(),
            self.data_dir.join(history::FILE),
            stop_rx.clone(),
        ));
        if let Some(ca) = self.found_ca {
            loops.push(tokio::spawn(commit_found_ca(
                c.clone(),
                ca,
                stop_rx.clone(),
            )));
        }
        let server_tls = match &c.tls {
            Some(tls) => Some(ServerTls::new(&tls.current(), ClientAuth::Optional)?),
            None => None,
        };
        let mut served = server_tls.iter().cloned().collect::<Vec<_>>();
        if let Some(web) = self.web {
            let tls = c.tls.as_ref().ok_or(StartError::WebWithoutTls)?;
            let web_tls = ServerTls::for_browsers(&tls.current())?;
            served.push(web_tls.clone());
            let handler = pool::PoolHandler {
                c: c.clone(),
                hosts: grpc.clone(),
                storage: grpc.clone(),
            };
            let exports = pool::export::Exports::new(self.data_dir.join("exports"))
                .map_err(StartError::DataDir)?;
            loops.push(tokio::spawn(crate::web::serve(
                handler,
                web.root,
                std::sync::Arc::new(exports),
                web.listener,
                web_tls,
                stop_rx.clone(),
            )));
        }
        if let (Some(tls), Some(dir)) = (&c.tls, self.tls_dir)
            && !served.is_empty()
        {
            loops.push(tokio::spawn(keep_renewed(
                c.clone(),
                tls.clone(),
                served,
                dir,
                stop_rx.clone(),
            )));
        }
        let members_only = RequireRole::new(c.tls.as_ref(), &[Role::Member]);
        let hosts_and_members = RequireRole::new(c.tls.as_ref(), &[Role::Host, Role::Member]);
        // `GET /metrics` for a monitor's (or a member's) certificate, as on hostd and
        // storaged; the web port serves the same to a token.
        let scrape = c.tls.as_ref().map(|tls| {
            let node = c.clone();
            let render: pool_trust::scrape::Render = Arc::new(move || {
                let text = crate::consensus::node::encode_scrape(
                    &node.node.status(),
                    &node.node.shared.metrics,
                );
                Box::pin(async move { text })
            });
            pool_trust::scrape::ScrapeLayer::new(tls.pool_id().clone(), "poold", render)
        });
        let router = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .accept_http1(scrape.is_some())
            .layer(tower::util::option_layer(scrape))
            .add_service(
                PoolServiceServer::new(pool::PoolHandler {
                    c: c.clone(),
                    hosts: grpc.clone(),
                    storage: grpc.clone(),
                })
                .max_decoding_message_size(16 << 20),
            )
            .add_service(InterceptedService::new(
                HostAgentServiceServer::new(agent::AgentApi { c: c.clone() }),
                hosts_and_members,
            ))
            .add_service(InterceptedService::new(
                CoordinatorPeerServiceServer::new(peer::PeerApi { c: c.clone() })
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX),
                members_only,
            ));
        // The signal stops the loops at once (the history is saved a last time), and the
        // server drains for at most SHUTDOWN_GRACE: other members' Raft streams to this
        // one do not end by themselves.
        let shutdown = {
            let stop_tx = stop_tx.clone();
            async move {
                shutdown.await;
                let _ = stop_tx.send(true);
            }
        };
        let serve = async {
            match server_tls {
                // The client certificate is optional on this port: people call PoolService
                // with a token; the member and host services require theirs (RequireRole).
                Some(server_tls) => {
                    router
                        .serve_with_incoming_shutdown(server_tls.incoming(listener), shutdown)
                        .await
                }
                None => {
                    let incoming = tonic::transport::server::TcpIncoming::from(listener)
                        .with_nodelay(Some(true));
                    router
                        .serve_with_incoming_shutdown(incoming, shutdown)
                        .await
                }
            }
            .map_err(StartError::Serve)
        };
        let mut stopping = stop_rx.clone();
        let result = tokio::select! {
            r = serve => r,
            _ = async {
                let _ = stopping.wait_for(|stop| *stop).await;
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } => {
                tracing::info!(grace = ?SHUTDOWN_GRACE, "connections still open after the grace; stopping anyway");
                Ok(())
            }
        };
        let _ = stop_tx.send(true);
        for l in loops {
            l.abort();
        }
        // Not aborted: it saves the history a last time on the way out.
        let _ = history_saver.await;
        result
    }
}

/// How long a member stopping waits for its connections to end.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How often a member saves its metrics history.
const HISTORY_SAVE_EVERY: Duration = Duration::from_secs(60);

/// Saves the member's metrics history to `path` every [`HISTORY_SAVE_EVERY`] and once
/// more when `stop` says so.
async fn keep_history_saved(
    c: Arc<Coordinator>,
    path: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut every = tokio::time::interval(HISTORY_SAVE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The first tick is now: nothing new to save yet.
    every.tick().await;
    loop {
        tokio::select! {
            _ = every.tick() => save_history(&c, &path).await,
            _ = stop.changed() => break,
        }
    }
    save_history(&c, &path).await;
}

/// The history is copied under its lock (the Raft task takes that lock to apply reports),
/// then encoded and written on a blocking thread.
async fn save_history(c: &Coordinator, path: &std::path::Path) {
    let copy = c.node.shared.history.lock().expect("history lock").clone();
    let to = path.to_owned();
    match tokio::task::spawn_blocking(move || copy.save(&to)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %proto::error_chain(&e), "cannot save the metrics history")
        }
        Err(e) => tracing::warn!(error = %e, "saving the metrics history failed"),
    }
}

/// Renews this member's certificate from the pool (itself first, then the other members)
/// before it expires: the renewed one is served from the next connection on, and every
/// cached connection to members, hosts and storage is made again with it.
async fn keep_renewed(
    c: Arc<Coordinator>,
    tls: LiveTls,
    servers: Vec<ServerTls>,
    dir: PathBuf,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let id = c.node.id;
    let members = {
        let c = c.clone();
        move || {
            let mut ids: Vec<u64> = c
                .node
                .shared
                .state
                .read()
                .expect("state lock")
                .members
                .keys()
                .copied()
                .collect();
            ids.extend(c.seeds.keys());
            ids.sort_by_key(|m| (*m != id, *m));
            ids.dedup();
            ids.into_iter()
                .filter_map(|m| member_address(&c.node.shared, &c.seeds, m))
                .collect()
        }
    };
    let renewed = move |next: &pool_trust::DaemonTls| {
        for server in &servers {
            if let Err(e) = server.reload(next) {
                tracing::warn!(error = %proto::error_chain(&e), "the renewed certificate cannot be served");
                return;
            }
        }
        if let Err(e) = tls.replace(next.clone()) {
            tracing::warn!(error = %e, "the renewed certificate cannot be used");
        }
    };
    let current = c.tls.as_ref().map(|t| (*t.current()).clone());
    if let Some(current) = current {
        pool_client::join::keep_renewed(current, members, dir, renewed, stop).await;
    }
}

/// Creates the first user ("admin", pool-admin) when the pool has none, once a leader is
/// elected; a fixed request id makes the members that try it act once. Without a given
/// password the leader makes one up and leaves it, once, in `generated_to` (0600): the
/// pool is never open to whoever connects first.
async fn bootstrap_admin(
    c: Arc<Coordinator>,
    password: Option<String>,
    generated_to: PathBuf,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let generated = password.is_none();
    let password = password.unwrap_or_else(pool_trust::token::generate_password);
    loop {
        if !c.node.state().users.is_empty() {
            return;
        }
        if c.is_leader() {
            let op = crate::state::command::Op::CreateUser(crate::state::command::CreateUser {
                user: Some(proto::coordinator::User {
                    id: uuid::Uuid::new_v4().to_string(),
                    name: "admin".into(),
                    roles: vec![proto::coordinator::Role::PoolAdmin as i32],
                    created_at: None,
                }),
                password_hash: match crate::auth::hash_password_blocking(password.clone()).await {
                    Ok(h) => h,
                    Err(e) => {
                        tracing::error!(error = %e.message(), "cannot hash the first admin's password");
                        return;
                    }
                },
                token_key: rand::random::<[u8; 32]>().to_vec(),
            });
            let caller = crate::auth::Caller {
                name: "bootstrap".into(),
                method: "CreateUser".into(),
                ..crate::auth::Caller::internal()
            };
            match c.write(&caller, "bootstrap-admin", op).await {
                Ok(_) if generated => {
                    match pool_trust::files::write_atomic(
                        &generated_to,
                        format!("{password}\n").as_bytes(),
                        0o600,
                    ) {
                        Ok(()) => tracing::info!(
                            file = %generated_to.display(),
                            "created the first user, admin, with a generated password in this \
                             file (0600): log in with it and change it"
                        ),
                        Err(e) => tracing::error!(
                            error = %proto::error_chain(&e),
                            "created the first user, admin, but cannot save its generated \
                             password; start again with --admin-password-file"
                        ),
                    }
                    return;
                }
                Ok(_) => {
                    tracing::info!("created the first user, admin");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "could not create the first user yet"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Commits the pool's CA given at founding (`--found-ca`) until the pool has one; a
/// fixed request id makes retries act once. A pool that already has another CA keeps it.
async fn commit_found_ca(
    c: Arc<Coordinator>,
    ca: PoolCaRecord,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        match &c.node.state().pool_ca {
            Some(have) if have.cert_pem == ca.cert_pem => return,
            Some(_) => {
                tracing::warn!(
                    "the pool already has another CA in its state; --found-ca is ignored"
                );
                return;
            }
            None => {}
        }
        let caller = crate::auth::Caller {
            name: "founding".into(),
            method: "FoundPoolCa".into(),
            ..crate::auth::Caller::internal()
        };
        match c
            .write(&caller, "found-pool-ca", Op::SetPoolCa(ca.clone()))
            .await
        {
            Ok(_) => {
                tracing::info!(
                    "the pool's CA is in its state: it issues joining daemons their certificates"
                );
                return;
            }
            Err(e) => tracing::debug!(error = %e.message(), "could not commit the pool's CA yet"),
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Creates `dir` 0700, or narrows an existing one to 0700: it holds password hashes, the
/// token key and (for a while) a generated password.
fn private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        tracing::warn!(dir = %dir.display(), mode = format!("{mode:o}"), "narrowing the data directory to 0700");
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}
