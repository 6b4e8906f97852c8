//! The daemon: loads its configuration, imports its pools, serves `StorageService` over
//! gRPC and commits every pool periodically (so freed space becomes reusable and data
//! reaches the disk even when no client flushes). Stops cleanly on SIGINT/SIGTERM,
//! committing every pool before it exits.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::export::Exports;
use crate::pool::PoolError;
use crate::service::{RegistryError, Storage, StorageApi};

/// Why the daemon did not start, or stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot read the configuration {path}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot parse the configuration {path}")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },
    #[error("[[pools]] entry {number} needs exactly one of file and device")]
    PoolEntry { number: usize },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot import the pool on {path}")]
    Import {
        path: PathBuf,
        #[source]
        source: PoolError,
    },
    #[error("cannot bind the {what} address {addr}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the reservation store")]
    Reservations(#[source] iscsi_target::PrStoreError),
    #[error(
        "a TLS directory is required (tls_dir): the pool's CA bundle and this storage \
         endpoint's certificate and key"
    )]
    NoTlsDir,
    #[error("cannot use the TLS directory")]
    TlsDir(#[source] pool_trust::TlsDirError),
    #[error("joining the pool: {0}")]
    Join(String),
    #[error("the certificate in {dir} is for {identity}, not a storage endpoint")]
    NotStorage {
        dir: PathBuf,
        identity: pool_trust::Identity,
    },
    #[error("the TLS directory cannot be served with")]
    Tls(#[from] pool_trust::serve::ServeTlsError),
    #[error("serving gRPC failed")]
    Serve(#[source] tonic::transport::Error),
    #[error("a blocking task of the daemon failed")]
    Task(#[source] tokio::task::JoinError),
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// gRPC address of `StorageService`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the daemon keeps the list of its pools.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Seconds between background commits of every pool.
    #[serde(default = "default_commit_interval")]
    pub commit_interval_seconds: u64,
    /// Address of the iSCSI target.
    #[serde(default = "default_iscsi_listen")]
    pub iscsi_listen: SocketAddr,
    /// Portals exports advertise (host:port); empty means the iSCSI listen address.
    #[serde(default)]
    pub portals: Vec<String>,
    /// Pools to import at start besides those the daemon already knows.
    #[serde(default)]
    pub pools: Vec<PoolConfig>,
    /// Prefix of the target names derived from volume ids.
    #[serde(default = "default_iqn_prefix")]
    pub iqn_prefix: String,
    /// The TLS directory (0700): the pool's CA bundle `ca.pem`, and `cert.pem` and
    /// `key.pem` (0600) naming this storage endpoint. Required: `StorageService` answers
    /// only the pool's coordinator members, over mutual TLS.
    pub tls_dir: Option<PathBuf>,
    /// A join file from `poolctl storage-join NAME` (0600): while `tls_dir` does not
    /// exist, the endpoint gets its certificate from the pool with the file's one-time
    /// token and writes `tls_dir`.
    pub join_file: Option<PathBuf>,
    /// Coordinator members (`host:port`) to renew the certificate with before it expires;
    /// when empty, those of the join file (if any). None: the certificate is not renewed.
    #[serde(default)]
    pub coordinators: Vec<String>,
}

/// A pool named in the configuration file.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// A backing file...
    pub file: Option<PathBuf>,
    /// ...or a block device.
    pub device: Option<PathBuf>,
    /// Where the metadata is, when not where the superblock says.
    pub meta_dir: Option<PathBuf>,
}

fn default_iscsi_listen() -> SocketAddr {
    "127.0.0.1:3260".parse().expect("valid address")
}

fn default_iqn_prefix() -> String {
    "iqn.2026-11.org.pool.storaged".into()
}

fn default_listen() -> SocketAddr {
    "127.0.0.1:7300".parse().expect("valid address")
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/storaged")
}

fn default_commit_interval() -> u64 {
    5
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: default_listen(),
            state_dir: default_state_dir(),
            commit_interval_seconds: default_commit_interval(),
            iscsi_listen: default_iscsi_listen(),
            portals: Vec::new(),
            pools: Vec::new(),
            iqn_prefix: default_iqn_prefix(),
            tls_dir: None,
            join_file: None,
            coordinators: Vec::new(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, DaemonError> {
        let text = std::fs::read_to_string(path).map_err(|source| DaemonError::ReadConfig {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| DaemonError::ParseConfig {
            path: path.to_owned(),
            source,
        })
    }
}

pub fn run(config: Option<&Path>) -> Result<(), DaemonError> {
    let config = match config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(DaemonError::Runtime)?;
    runtime.block_on(serve(config))
}

/// With a join file and no TLS directory yet: joins the pool as the file's storage
/// identity (named by the gRPC listen address, which the coordinators dial) and writes
/// the directory. Returns the file's members, to renew with.
async fn join(config: &Config) -> Result<Vec<String>, DaemonError> {
    let (Some(file), Some(dir)) = (&config.join_file, &config.tls_dir) else {
        return Ok(Vec::new());
    };
    let fail = |e: &dyn std::error::Error| DaemonError::Join(proto::error_chain(e));
    let join = pool_client::join::JoinFile::load(file).map_err(|e| fail(&e))?;
    if dir.exists() {
        return Ok(join.members);
    }
    let identity = pool_trust::Identity::parse_path(&join.identity).map_err(|e| fail(&e))?;
    if identity.role() != pool_trust::Role::Storage {
        return Err(DaemonError::Join(format!(
            "the join file is for {identity}, not a storage endpoint"
        )));
    }
    let ip = config.listen.ip();
    let ips: Vec<_> = (!ip.is_unspecified()).then_some(ip).into_iter().collect();
    pool_client::join::join(&join, &identity, &ips, dir)
        .await
        .map_err(|e| fail(&e))?;
    tracing::info!(%identity, dir = %dir.display(), "joined the pool: certificate issued");
    Ok(join.members)
}

/// The storage endpoint's TLS directory: it must name a storage identity.
fn load_tls(config: &Config) -> Result<pool_trust::DaemonTls, DaemonError> {
    let dir = config.tls_dir.as_deref().ok_or(DaemonError::NoTlsDir)?;
    let tls = pool_trust::DaemonTls::load(dir).map_err(DaemonError::TlsDir)?;
    if tls.identity().role() != pool_trust::Role::Storage {
        return Err(DaemonError::NotStorage {
            dir: dir.to_owned(),
            identity: tls.identity().clone(),
        });
    }
    Ok(tls)
}

async fn serve(config: Config) -> Result<(), DaemonError> {
    let joined_members = join(&config).await?;
    let tls = load_tls(&config)?;
    let storage = {
        let dir = config.state_dir.clone();
        let pools = config.pools.clone();
        tokio::task::spawn_blocking(move || -> Result<_, DaemonError> {
            let storage = Storage::open(Some(&dir))?;
            for (i, p) in pools.into_iter().enumerate() {
                let (kind, path) = match (p.file, p.device) {
                    (Some(f), None) => (crate::BackingKind::File, f),
                    (None, Some(d)) => (crate::BackingKind::BlockDevice, d),
                    _ => return Err(DaemonError::PoolEntry { number: i + 1 }),
                };
                if storage.pools().iter().any(|q| q.backing_path() == path) {
                    continue;
                }
                let pool = crate::ThinPool::import(&crate::ImportOptions {
                    kind,
                    path: path.clone(),
                    meta_dir: p.meta_dir,
                    expected_id: None,
                })
                .map_err(|source| DaemonError::Import { path, source })?;
                storage.add(pool);
            }
            Ok(storage)
        })
        .await
        .map_err(DaemonError::Task)??
    };
    let bind_error = |what, addr| move |source| DaemonError::Bind { what, addr, source };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(bind_error("gRPC", config.listen))?;
    let addr = listener
        .local_addr()
        .map_err(bind_error("gRPC", config.listen))?;
    let iscsi_listener = tokio::net::TcpListener::bind(config.iscsi_listen)
        .await
        .map_err(bind_error("iSCSI", config.iscsi_listen))?;
    let iscsi_addr = iscsi_listener
        .local_addr()
        .map_err(bind_error("iSCSI", config.iscsi_listen))?;

    // Persistent reservations survive restarts in the state directory.
    let pr_store = iscsi_target::FilePrStore::new(config.state_dir.join("reservations"))
        .map_err(DaemonError::Reservations)?;
    let target = iscsi_target::TargetServer::new(
        iscsi_target::ServerOptions::default(),
        std::sync::Arc::new(pr_store),
    );
    let portals = if config.portals.is_empty() {
        vec![iscsi_addr.to_string()]
    } else {
        config.portals.clone()
    };
    let exports = Exports::new(target.clone(), config.iqn_prefix.clone(), portals);
    for pool in storage.pools() {
        exports.load(&pool).await;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let iscsi = {
        let target = target.clone();
        let mut stop = stop_rx.clone();
        tokio::spawn(async move {
            let stopped = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = target.run(iscsi_listener, stopped).await {
                tracing::error!(error = &e as &dyn std::error::Error, "iSCSI target stopped");
            }
        })
    };
    tracing::info!(%addr, %iscsi_addr, pools = storage.pools().len(), "storaged serving StorageService and iSCSI");
    // The signal handlers are in place before the ports are announced: a SIGTERM sent as
    // soon as a test reads them stops the daemon cleanly instead of killing it.
    let shutdown = shutdown_signal();
    // Tests and tools read these lines to learn the bound ports.
    println!("LISTENING {addr}");
    println!("ISCSI {iscsi_addr}");

    let committer = {
        let storage = storage.clone();
        let every = Duration::from_secs(config.commit_interval_seconds.max(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let s = storage.clone();
                let _ = tokio::task::spawn_blocking(move || s.flush_all()).await;
            }
        })
    };

    let server_tls = pool_trust::serve::ServerTls::new(&tls, pool_trust::ClientAuth::Required)?;
    let incoming = server_tls.incoming(listener);
    // The certificate renews itself before it expires; new connections get the new one.
    let members = if config.coordinators.is_empty() {
        joined_members
    } else {
        config.coordinators.clone()
    };
    let renewal = match (&config.tls_dir, members.is_empty()) {
        (Some(dir), false) => {
            let server_tls = server_tls.clone();
            Some(tokio::spawn(pool_client::join::keep_renewed(
                tls.clone(),
                move || members.clone(),
                dir.clone(),
                move |next| {
                    if let Err(e) = server_tls.reload(next) {
                        tracing::warn!(error = %proto::error_chain(&e), "the renewed certificate cannot be served");
                    }
                },
                stop_rx.clone(),
            )))
        }
        _ => {
            tracing::info!("no coordinators configured: the certificate will not be renewed");
            None
        }
    };
    let members_only =
        pool_trust::tls::RequireRole::new(tls.pool_id().clone(), &[pool_trust::Role::Member]);
    let render: pool_trust::scrape::Render = {
        let (storage, exports) = (storage.clone(), exports.clone());
        std::sync::Arc::new(move || {
            let (storage, exports) = (storage.clone(), exports.clone());
            Box::pin(async move { crate::metrics::render(&storage, &exports).await })
        })
    };
    tonic::transport::Server::builder()
        // `/metrics` over HTTP/1.1 too, for scrapers that do not speak HTTP/2.
        .accept_http1(true)
        .layer(pool_trust::scrape::ScrapeLayer::new(
            tls.pool_id().clone(),
            "storaged",
            render,
        ))
        .layer(pool_trust::audit::AuditLayer::new(
            tls.pool_id().clone(),
            "storaged",
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            proto::storage::storage_service_server::StorageServiceServer::new(StorageApi::new(
                storage.clone(),
                exports,
            )),
            members_only,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(DaemonError::Serve)?;
    // The target stops after gRPC, so no request is left half done; sessions are closed
    // and their commands finished before the pools' last commit below.
    let _ = stop_tx.send(true);
    let _ = iscsi.await;
    if let Some(r) = renewal {
        let _ = r.await;
    }
    committer.abort();
    let s: Arc<Storage> = storage;
    tokio::task::spawn_blocking(move || s.flush_all())
        .await
        .map_err(DaemonError::Task)?;
    tracing::info!("storaged stopped");
    Ok(())
}

/// SIGINT or SIGTERM, with both handlers registered now (not when first polled).
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_unknown_fields() {
        let c: Config = toml::from_str("listen = \"127.0.0.1:0\"").unwrap();
        assert_eq!(c.commit_interval_seconds, 5);
        assert!(toml::from_str::<Config>("lsten = 1").is_err());
    }

    #[test]
    fn config_errors_name_the_file_and_keep_their_cause() {
        use std::error::Error;
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.toml");
        let err = Config::load(&missing).unwrap_err();
        assert!(matches!(&err, DaemonError::ReadConfig { path, .. } if *path == missing));
        assert!(err.source().is_some());

        let bad = dir.path().join("bad.toml");
        std::fs::write(&bad, "lsten = 1").unwrap();
        let err = Config::load(&bad).unwrap_err();
        assert!(matches!(&err, DaemonError::ParseConfig { path, .. } if *path == bad));
        let cause = err.source().unwrap().to_string();
        assert!(cause.contains("lsten"), "{cause}");
        assert!(
            !err.to_string().contains("lsten"),
            "the cause is not repeated"
        );
    }
}
