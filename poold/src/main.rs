use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use poold::config::Config;
use poold::consensus::NodeConfig;
use poold::server::{Member, MemberConfig};

// Each write allocates and frees dozens of strings on the Raft task and the gRPC handlers,
// and glibc's malloc slows as the pool's state churns; mimalloc does not.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The bound on `--api-threads` and on the config file's `api_threads`.
const MAX_API_THREADS: usize = 256;

/// Pool coordinator: a Raft member that keeps the pool's state and serves PoolService.
#[derive(Debug, Parser)]
#[command(name = "poold", version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// This member's Raft id (non-zero).
    #[arg(long)]
    member_id: Option<u64>,
    /// gRPC listen address (PoolService, HostAgentService and the peer transport).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory of the Raft log, hard state and snapshots.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// An initial member, ID=ADDRESS; repeat for each (all founding members get the same list).
    #[arg(long = "member", value_parser = parse_member)]
    members: Vec<(u64, SocketAddr)>,
    /// Pool name; members refuse Raft messages from another pool (default: the pool the
    /// TLS directory's CA names; they must agree).
    #[arg(long)]
    pool_id: Option<String>,
    /// This member's TLS directory (0700): the pool's CA bundle `ca.pem`, and `cert.pem`
    /// and `key.pem` (0600) for this member. Required: every link is mutual TLS.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Start empty and wait to be added to an existing pool (AddMember on the leader).
    #[arg(long)]
    join: bool,
    /// A join file from `poolctl member-join ID --out FILE`: when the TLS directory does
    /// not exist yet, get this member's certificate from the pool with its one-time token
    /// and write the directory; then start empty and wait to be added (implies --join).
    /// Refused once the TLS directory exists.
    #[arg(long, value_name = "FILE")]
    join_file: Option<PathBuf>,
    /// Raft tick in milliseconds.
    #[arg(long)]
    tick_ms: Option<u64>,
    /// Snapshot and compact the log every this many entries.
    #[arg(long)]
    snapshot_interval: Option<u64>,
    /// Entries kept behind a snapshot.
    #[arg(long)]
    snapshot_keep_entries: Option<u64>,
    /// Threads serving gRPC (clients, hosts, peers) and running the Raft task. With one
    /// (the default) the responses a batch of commits completes leave in one write per
    /// connection; with more, each response is written on its own. More helps only a pool
    /// whose clients read much more than they write.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_API_THREADS as i64))]
    api_threads: Option<u16>,
    /// A file holding the first administrator's password: when the pool has no user yet,
    /// user "admin" (pool-admin) is created with it (12 characters or more). Without it,
    /// the leader generates a password and leaves it in DATA_DIR/admin-password (0600).
    #[arg(long)]
    admin_password_file: Option<PathBuf>,
    /// The pool's CA, to keep in the pool's replicated state so the pool issues joining
    /// daemons their certificates (`poolctl host-join`): a directory `PoolCa::save` wrote
    /// (ca-key.pem, ca-cert.pem) or one `poolctl pki-init` made (its `ca/`). Committed
    /// once, when the pool has no CA yet; it must be the CA of this member's TLS directory.
    #[arg(long)]
    found_ca: Option<PathBuf>,
    /// Serve the web console here over HTTPS, with this member's certificate: PoolService
    /// as gRPC-Web and the console's files (--web-root). Off unless given.
    #[arg(long, value_name = "ADDRESS")]
    web_listen: Option<SocketAddr>,
    /// The web console's built files (web/dist after `npm run build` in web/).
    #[arg(long, value_name = "DIR", requires = "web_listen")]
    web_root: Option<PathBuf>,
    /// A directory under which backup schedules may have this member write their chains
    /// (repeatable; it writes as root, so nowhere unless given). In a pool of several
    /// members, a mount they all share at the same path.
    #[arg(long = "backup-root", value_name = "DIR")]
    backup_roots: Vec<PathBuf>,
    /// Log filter, e.g. "info" or "poold=debug" (RUST_LOG wins when set).
    #[arg(long, default_value = "info,raft=warn")]
    log: String,
}

fn parse_member(s: &str) -> Result<(u64, SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=ADDRESS"))?;
    let id: u64 = id.parse().map_err(|e| format!("{id:?}: {e}"))?;
    if id == 0 {
        return Err("member ids are non-zero".into());
    }
    let addr: SocketAddr = addr.parse().map_err(|e| format!("{addr:?}: {e}"))?;
    Ok((id, addr))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    init_logging(&args.log);
    let mut cfg = match &args.config {
        Some(path) => Config::load(path).context("loading configuration")?,
        None => Config::default(),
    };
    if args.member_id.is_some() {
        cfg.member_id = args.member_id;
    }
    if args.listen.is_some() {
        cfg.listen = args.listen;
    }
    if args.data_dir.is_some() {
        cfg.data_dir = args.data_dir.clone();
    }
    if !args.members.is_empty() {
        cfg.initial_members = args.members.iter().copied().collect();
    }
    if args.pool_id.is_some() {
        cfg.pool_id = args.pool_id.clone();
    }
    if args.join {
        cfg.join = Some(true);
    }
    if args.tls_dir.is_some() {
        cfg.tls_dir = args.tls_dir.clone();
    }
    if !args.backup_roots.is_empty() {
        cfg.backup_roots = args.backup_roots.clone();
    }
    let backup_roots = cfg.backup_roots.clone();
    if let Some(bad) = backup_roots.iter().find(|r| !r.is_absolute()) {
        anyhow::bail!("backup root {}: an absolute path is needed", bad.display());
    }
    let id = cfg
        .member_id
        .filter(|id| *id != 0)
        .context("a non-zero member id is required (--member-id or member_id)")?;
    let listen = cfg
        .listen
        .or_else(|| cfg.initial_members.get(&id).copied())
        .context("a listen address is required (--listen, or this member in --member)")?;
    let data_dir = cfg
        .data_dir
        .clone()
        .context("a data directory is required (--data-dir or data_dir)")?;
    let tls_dir = cfg.tls_dir.clone().context(
        "a TLS directory is required (--tls-dir or tls_dir): the pool's CA bundle and this \
         member's certificate and key",
    )?;
    if let Some(file) = &args.join_file {
        let ips: Vec<_> = Some(listen.ip())
            .filter(|ip| !ip.is_unspecified())
            .into_iter()
            .collect();
        // The pool is trusted from the file; the member starts empty and waits to be added.
        let identity = pool_trust::Identity::Member(id);
        let join = pool_client::join::JoinFile::load(file)
            .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))?;
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?
            .block_on(pool_client::join::join(&join, &identity, &ips, &tls_dir))
            .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
            .with_context(|| format!("joining the pool with {} as {identity}", file.display()))?;
        tracing::info!(%identity, dir = %tls_dir.display(), "certificate issued by the pool");
        cfg.join = Some(true);
    }
    let tls = pool_trust::DaemonTls::load_as(&tls_dir, &pool_trust::Identity::Member(id))
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
        .context("loading the TLS directory")?;
    let pool_id = match cfg.pool_id.as_deref() {
        Some(p) if p != tls.pool_id().as_str() => anyhow::bail!(
            "--pool-id {p} is not the pool {} the TLS directory's CA is of",
            tls.pool_id()
        ),
        _ => tls.pool_id().to_string(),
    };
    let mut node = NodeConfig::new(id, &pool_id);
    if let Some(t) = args.tick_ms.or(cfg.tick_ms) {
        node.tick = Duration::from_millis(t.max(1));
    }
    if let Some(n) = args.snapshot_interval.or(cfg.snapshot_interval) {
        node.snapshot_interval = n.max(1);
    }
    if let Some(n) = args.snapshot_keep_entries.or(cfg.snapshot_keep_entries) {
        node.snapshot_keep_entries = n;
    }
    let admin_password = match args.admin_password_file.as_ref() {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading {}", p.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
        )
        .filter(|p| !p.is_empty()),
        None => None,
    };
    if let Some(p) = &admin_password {
        poold::auth::check_new_password(p).context("--admin-password-file")?;
    }
    let found_ca = match &args.found_ca {
        Some(dir) => Some(load_found_ca(dir, &tls)?),
        None => None,
    };
    let initial: BTreeMap<u64, String> = cfg
        .initial_members
        .iter()
        .map(|(k, v)| (*k, v.to_string()))
        .collect();
    let api_threads = args
        .api_threads
        .map(usize::from)
        .or(cfg.api_threads)
        .unwrap_or(1);
    anyhow::ensure!(
        (1..=MAX_API_THREADS).contains(&api_threads),
        "api_threads must be 1..={MAX_API_THREADS}, not {api_threads}"
    );
    let rt = if api_threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(api_threads);
        b
    }
    .enable_all()
    .build()
    .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        let web = match args.web_listen {
            Some(addr) => Some(poold::server::WebConfig {
                listener: tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding the web console's {addr}"))?,
                root: args.web_root.clone(),
            }),
            None => None,
        };
        if let Some(w) = &web {
            tracing::info!(address = %format!("https://{}/", args.web_listen.expect("given")), root = ?w.root, "serving the web console");
        }
        tracing::info!(id, %listen, data_dir = %data_dir.display(), "poold starting");
        let member = Member::start(MemberConfig {
            node,
            data_dir,
            initial_members: initial,
            join: cfg.join.unwrap_or(false),
            admin_password,
            found_ca,
            tls: Some(tls),
            tls_dir: Some(tls_dir),
            backup_roots,
        })
        .context("starting the Raft member")?;
        let member = match web {
            Some(w) => member.with_web(w),
            None => member,
        };
        member
            .run(listener, async {
                // SIGTERM too: what systemd and docker stop with.
                let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
                match term {
                    Ok(mut term) => {
                        tokio::select! {
                            _ = tokio::signal::ctrl_c() => {}
                            _ = term.recv() => {}
                        }
                    }
                    Err(_) => {
                        let _ = tokio::signal::ctrl_c().await;
                    }
                }
                tracing::info!("shutting down");
            })
            .await
            .context("serving")?;
        Ok(())
    })
}

/// Reads `--found-ca` (a CA directory, or a `pki-init` directory holding one in `ca/`) and
/// checks it is the CA this member's TLS directory trusts, of the same pool.
fn load_found_ca(
    dir: &std::path::Path,
    tls: &pool_trust::DaemonTls,
) -> anyhow::Result<poold::state::command::PoolCaRecord> {
    let nested = dir.join("ca");
    let ca_dir = if dir.join(pool_trust::ca::CA_KEY_FILE).exists() || !nested.is_dir() {
        dir.to_owned()
    } else {
        nested
    };
    let ca = pool_trust::PoolCa::load(&ca_dir)
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
        .with_context(|| format!("--found-ca: reading the CA in {}", ca_dir.display()))?;
    anyhow::ensure!(
        ca.pool_id() == tls.pool_id(),
        "--found-ca: the CA in {} is of pool {}, but this member's TLS directory is of pool {}",
        ca_dir.display(),
        ca.pool_id(),
        tls.pool_id()
    );
    anyhow::ensure!(
        tls.bundle.contains(&ca.cert().fingerprint()),
        "--found-ca: the CA in {} ({}) is not one this member's TLS directory trusts",
        ca_dir.display(),
        ca.cert().fingerprint()
    );
    let (cert_pem, key_pem) = ca.to_pem();
    Ok(poold::state::command::PoolCaRecord { cert_pem, key_pem })
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
