use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hostd::agent::{Agent, AgentConfig};
use hostd::config::Config;
use hostd::console::ConsoleOut;
use hostd::devices::virtio::block::{Disk, FileBackend};
use hostd::service::{HostIdentity, HostServer};
use hostd::supervisor::manager::{Manager, ManagerConfig};
use hostd::vmm::{BootProtocol, BootSpec, Vm, VmExit, VmSpec};

const DEFAULT_LISTEN: &str = "0.0.0.0:7000";
const DEFAULT_RUN_DIR: &str = "/run/hostd";
const DEFAULT_IMAGE_DIR: &str = "/var/lib/hostd/images";
const DEFAULT_RESERVED_MEMORY: u64 = 512 << 20;

/// Host agent: runs KVM guests whose disks are iSCSI volumes and serves HostService.
#[derive(Debug, Parser)]
#[command(name = "hostd", version, about)]
struct Args {
    #[command(subcommand)]
    command: Option<Cmd>,
    /// TOML configuration file.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// gRPC listen address (overrides the config file; default 0.0.0.0:7000).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory for VM processes' sockets and logs (default /run/hostd).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Stop this daemon's VMs when it exits (default: they keep running).
    #[arg(long)]
    tie_vms: bool,
    /// The iSCSI name this host logs in to targets with (overrides the config file).
    #[arg(long)]
    initiator_iqn: Option<String>,
    /// This host's name (default: the config's host_id, else the hostname).
    #[arg(long)]
    host_id: Option<String>,
    /// Join the pool of these coordinator members (comma-separated; adds or replaces the
    /// config's [pool] coordinators).
    #[arg(long, value_delimiter = ',')]
    pool: Vec<String>,
    /// The address the pool reaches this host's HostService at (default: --listen).
    #[arg(long)]
    pool_advertise: Option<String>,
    /// Heartbeat interval in milliseconds until the pool asks for another.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// This host's TLS directory (0700): the pool's CA bundle `ca.pem`, and `cert.pem` and
    /// `key.pem` (0600) naming this host. Required: HostService answers only the pool's
    /// coordinator members, over mutual TLS, and the host calls them with it.
    #[arg(long)]
    tls_dir: Option<PathBuf>,
    /// Join the pool with this join file (`poolctl host-join NAME --out FILE`): when the
    /// TLS directory does not exist yet, make a key, have the pool sign its certificate
    /// request with the file's one-time token, and write the TLS directory; then start as
    /// usual, heartbeating to the file's members unless --pool says otherwise. Refused
    /// once the TLS directory exists (already joined).
    #[arg(long, value_name = "FILE")]
    join: Option<PathBuf>,
    /// A directory VMs' kernels, initrds and file disks may come from (repeat for more;
    /// default /var/lib/hostd/images). Any other host path a client names is refused.
    #[arg(long = "image-dir")]
    image_dirs: Vec<PathBuf>,
    /// Log filter, e.g. "info" or "hostd=debug" (RUST_LOG wins when set).
    #[arg(long, default_value = "info", global = true)]
    log: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one VM in the foreground, its serial console on stdout; exits with the
    /// guest's debug-exit status (or 0 on a plain power-off).
    Run {
        /// Kernel: a PVH ELF (e.g. the test guest), a vmlinux ELF, or a bzImage.
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long, default_value = "")]
        cmdline: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, default_value_t = 128)]
        memory_mib: u64,
        /// A raw disk image; repeat for more disks. Append ",ro" for read-only.
        #[arg(long)]
        disk: Vec<String>,
        /// A network interface on a tap (made if missing, gone when this exits); repeat
        /// for more: `tap=NAME,mac=02:00:00:00:00:01[,mtu=N][,vlan=N][,bps=N][,pps=N]`
        /// `[,poll_us=N]` (busy-poll ceiling after traffic, 0-1000 µs; 50 when absent)
        /// `[,ip=A]...` (locked: only ARP and IPv4 from these addresses leave the guest).
        #[arg(long)]
        net: Vec<String>,
        /// Print to stderr how long it took from start to the first console byte.
        #[arg(long)]
        time_first_byte: bool,
        /// How to enter the kernel: `auto` (PVH when an ELF has the note, else the Linux
        /// 64-bit entry), `linux64`, or `pvh`.
        #[arg(long, value_enum, default_value_t = Entry::Auto)]
        boot: Entry,
    },
    /// Write the test guest built into this binary to a file.
    GuestElf {
        #[arg(long)]
        out: PathBuf,
    },
    /// Internal: the process of one VM, started by the daemon.
    #[command(hide = true)]
    Vmm {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let started = Instant::now();
    let args = Args::parse();
    init_logging(&args.log);
    match args.command {
        Some(Cmd::Vmm { ref dir }) => {
            hostd::supervisor::child::run(dir).context("VM process")?;
            Ok(())
        }
        Some(Cmd::GuestElf { ref out }) => {
            std::fs::write(out, hostd::testguest::ELF)
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(())
        }
        Some(Cmd::Run {
            ref kernel,
            ref initrd,
            ref cmdline,
            vcpus,
            memory_mib,
            ref disk,
            ref net,
            time_first_byte,
            boot,
        }) => run_one(
            started,
            BootSpec {
                kernel: kernel.clone(),
                initrd: initrd.clone(),
                cmdline: cmdline.clone(),
                protocol: boot.into(),
            },
            vcpus,
            memory_mib,
            disk,
            net,
            time_first_byte,
        ),
        None => daemon(args),
    }
}

/// Console output to stdout, noting when the first byte came.
struct Stdout {
    started: Instant,
    report: bool,
    first: std::sync::Once,
}

impl ConsoleOut for Stdout {
    fn write(&self, data: &[u8]) {
        use std::io::Write;
        if self.report {
            self.first.call_once(|| {
                eprintln!(
                    "first console byte after {:.3} ms",
                    self.started.elapsed().as_secs_f64() * 1000.0
                )
            });
        }
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(data);
        let _ = out.flush();
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Entry {
    Auto,
    Linux64,
    Pvh,
}

impl From<Entry> for BootProtocol {
    fn from(e: Entry) -> BootProtocol {
        match e {
            Entry::Auto => BootProtocol::Auto,
            Entry::Linux64 => BootProtocol::Linux64,
            Entry::Pvh => BootProtocol::Pvh,
        }
    }
}

/// SIGTERM/SIGINT seen by `hostd run`: the first asks the guest to shut down, the next
/// stops it.
static STOP_SIGNALS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

extern "C" fn on_stop_signal(_: libc::c_int) {
    STOP_SIGNALS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

/// A `--net` value as the VMM's interface settings (checked where it is opened).
fn parse_net(id: &str, value: &str) -> anyhow::Result<proto::host::NetConfig> {
    let mut n = proto::host::NetConfig {
        id: id.into(),
        ..Default::default()
    };
    for item in value.split(',') {
        let (key, v) = item
            .split_once('=')
            .with_context(|| format!("--net {value:?}: {item:?} is not key=value"))?;
        let num = || -> anyhow::Result<u64> {
            v.parse()
                .with_context(|| format!("--net {value:?}: {key} is not a number"))
        };
        match key {
            "tap" => n.tap = v.into(),
            "mac" => n.mac = v.into(),
            "mtu" => n.mtu = u32::try_from(num()?)?,
            "vlan" => n.vlan = Some(u32::try_from(num()?)?),
            "bps" => n.rate_bytes_per_sec = Some(num()?),
            "pps" => n.rate_packets_per_sec = Some(num()?),
            "poll_us" => n.busy_poll_us = Some(u32::try_from(num()?)?),
            "ip" => n
                .lock
                .get_or_insert_with(Default::default)
                .ipv4
                .push(v.into()),
            _ => anyhow::bail!("--net {value:?}: unknown key {key:?}"),
        }
    }
    Ok(n)
}

fn run_one(
    started: Instant,
    boot: BootSpec,
    vcpus: u32,
    memory_mib: u64,
    disks: &[String],
    nets: &[String],
    time_first_byte: bool,
) -> anyhow::Result<()> {
    let disks = disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let (path, ro) = match d.strip_suffix(",ro") {
                Some(p) => (p, true),
                None => (d.as_str(), false),
            };
            let backend = FileBackend::open(path.as_ref(), ro)?;
            Ok(Disk::new(
                format!("vd{}", (b'a' + i as u8) as char),
                Arc::new(backend),
                ro,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let spec = VmSpec {
        vcpus,
        memory_bytes: memory_mib << 20,
        boot,
        disks,
        nets: nets
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let config = parse_net(&format!("eth{i}"), n)?;
                Ok(hostd::supervisor::spec::open_net(&config, None)?)
            })
            .collect::<anyhow::Result<Vec<_>>>()?,
        cpuid_mask: Vec::new(),
    };
    let out: Arc<dyn ConsoleOut> = Arc::new(Stdout {
        started,
        report: time_first_byte,
        first: std::sync::Once::new(),
    });
    for sig in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: the handler only bumps an atomic counter.
        unsafe { libc::signal(sig, on_stop_signal as *const () as libc::sighandler_t) };
    }
    let mut asked = 0;
    loop {
        let mut vm = Vm::new(&spec, out.clone()).context("building the VM")?;
        vm.start()?;
        let exit = loop {
            if let Some(exit) = vm.wait_exit(Some(std::time::Duration::from_millis(100))) {
                break exit;
            }
            let signals = STOP_SIGNALS.load(std::sync::atomic::Ordering::SeqCst);
            if signals > asked {
                asked = signals;
                if signals == 1 {
                    eprintln!("hostd run: asking the guest to shut down (again to stop it)");
                    vm.request_shutdown();
                } else {
                    vm.stop();
                }
            }
        };
        match exit {
            // A guest reboot by any of its ways (keyboard controller, ACPI reset, or a
            // triple fault as Linux's `reboot=t` makes one) boots it again, unless a stop
            // was asked for.
            VmExit::Reset | VmExit::TripleFault { .. } if asked == 0 => {
                eprintln!("hostd run: guest reset ({exit}), booting again");
            }
            VmExit::Reset | VmExit::TripleFault { .. } => std::process::exit(0),
            VmExit::Poweroff { status } => {
                std::process::exit(i32::from(status.unwrap_or(0)));
            }
            VmExit::Stopped => anyhow::bail!("VM stopped by a second signal"),
            other => anyhow::bail!("VM stopped: {other}"),
        }
    }
}

fn daemon(args: Args) -> anyhow::Result<()> {
    let mut config = match &args.config {
        Some(path) => Config::load(path).context("loading configuration")?,
        None => Config::default(),
    };
    if args.listen.is_some() {
        config.listen = args.listen;
    }
    if args.run_dir.is_some() {
        config.run_dir = args.run_dir.clone();
    }
    if args.tie_vms {
        config.tie_vms_to_daemon = Some(true);
    }
    if args.initiator_iqn.is_some() {
        config.initiator_iqn = args.initiator_iqn.clone();
    }
    if args.host_id.is_some() {
        config.host_id = args.host_id.clone();
    }
    if !args.pool.is_empty() || args.pool_advertise.is_some() || args.heartbeat_ms.is_some() {
        let pool = config.pool.get_or_insert_with(Default::default);
        if !args.pool.is_empty() {
            pool.coordinators = args.pool.clone();
        }
        if args.pool_advertise.is_some() {
            pool.advertise = args.pool_advertise.clone();
        }
        if args.heartbeat_ms.is_some() {
            pool.heartbeat_interval_ms = args.heartbeat_ms;
        }
    }
    if args.tls_dir.is_some() {
        config.tls_dir = args.tls_dir.clone();
    }
    if !args.image_dirs.is_empty() {
        config.image_dirs = args.image_dirs.clone();
    }
    if config.image_dirs.is_empty() {
        std::fs::create_dir_all(DEFAULT_IMAGE_DIR)
            .with_context(|| format!("creating {DEFAULT_IMAGE_DIR}"))?;
        config.image_dirs = vec![DEFAULT_IMAGE_DIR.into()];
    }
    let image_dirs = hostd::supervisor::spec::ImageDirs::new(&config.image_dirs)
        .context("the image directories (--image-dir, image_dirs)")?;
    let host_name = config
        .pool
        .as_ref()
        .and_then(|p| p.name.clone())
        .or_else(|| config.host_id.clone())
        .unwrap_or_else(hostd::host::hostname);
    let tls_dir = config.tls_dir.clone().context(
        "a TLS directory is required (--tls-dir or tls_dir): the pool's CA bundle and this \
         host's certificate and key",
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let identity = pool_trust::Identity::Host(host_name);
    if let Some(file) = &args.join {
        let names = advertised_ip(&config).into_iter().collect::<Vec<_>>();
        // A key made here, its request signed by the pool against the file's one-time
        // token, the TLS directory written in one rename (refused when it exists).
        let joined = pool_client::join::JoinFile::load(file)
            .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))?;
        rt.block_on(pool_client::join::join(
            &joined, &identity, &names, &tls_dir,
        ))
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
        .with_context(|| format!("joining the pool with {} as {identity}", file.display()))?;
        tracing::info!(%identity, dir = %tls_dir.display(), "joined the pool: certificate issued");
        let pool = config.pool.get_or_insert_with(Default::default);
        if pool.coordinators.is_empty() {
            pool.coordinators = joined.members;
        }
    }
    let tls = pool_trust::DaemonTls::load_as(&tls_dir, &identity)
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
        .context("loading the TLS directory")?;
    tracing::info!(config = ?config.redacted(), "hostd starting");
    if let Some(us) = config.vif_busy_poll_us {
        hostd::devices::virtio::net::busy_poll_from_us(u64::from(us))
            .context("vif_busy_poll_us in the config")?;
    }
    // VM processes run the lean hostd-vmm beside this binary when it is there.
    let exe = std::env::current_exe().context("finding the hostd binary")?;
    let lean = exe.with_file_name("hostd-vmm");
    let (vmm_binary, vmm_args) = if lean.exists() {
        (lean, Vec::new())
    } else {
        (exe, vec!["vmm".to_owned()])
    };
    rt.block_on(async move {
        let tie = config.tie_vms_to_daemon.unwrap_or(false);
        let manager = Manager::new(ManagerConfig {
            run_dir: config
                .run_dir
                .clone()
                .unwrap_or_else(|| DEFAULT_RUN_DIR.into()),
            vmm_binary,
            vmm_args,
            reserved_memory_bytes: config
                .reserved_memory_bytes
                .unwrap_or(DEFAULT_RESERVED_MEMORY),
            tie_vms_to_daemon: tie,
            initiator_iqn: config.initiator_iqn.clone().unwrap_or_default(),
            image_dirs,
            tls_dir: tls_dir.clone(),
            // The peers the pool gives a private network are the other hosts' advertised
            // addresses, so this host's VXLAN traffic leaves from its own.
            networks: Some(hostd::network::HostNetConfig {
                vxlan_local: config.vxlan_local.or_else(|| advertised_ip(&config)),
                vxlan_port: config
                    .vxlan_port
                    .unwrap_or(hostd::network::VXLAN_PORT),
            }),
            vif_busy_poll_us: config.vif_busy_poll_us,
        })
        .await?;
        let listen = config
            .listen
            .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("a valid default"));
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        let addr = listener.local_addr()?;
        // Tests and scripts read this line to learn the port when asking for port 0.
        println!("hostd listening on {addr}");
        tracing::info!(%addr, "serving HostService");
        let identity = HostIdentity {
            host_id: config.host_id.clone().unwrap_or_else(hostd::host::hostname),
            initiator_iqn: config.initiator_iqn.clone().unwrap_or_default(),
            migration_address: config
                .migration_listen
                .map(|a| a.to_string())
                .unwrap_or_default(),
        };
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let server_tls = pool_trust::serve::ServerTls::new(&tls, pool_trust::ClientAuth::Required)
            .context("TLS for serving HostService")?;
        // Renewed certificates: served from the next connection on, presented to the
        // coordinators from the next heartbeat on; VM processes read the directory when
        // a migration starts.
        let (to_pool_tx, to_pool_rx) = tokio::sync::watch::channel(None);
        let renewal = match config.pool.as_ref().map(|p| p.coordinators.clone()) {
            Some(members) if !members.is_empty() => {
                let server_tls = server_tls.clone();
                let renewed = move |next: &pool_trust::DaemonTls| {
                    if let Err(e) = server_tls.reload(next) {
                        tracing::warn!(error = %proto::error_chain(&e), "the renewed certificate cannot be served");
                    }
                    match next.coordinators_client() {
                        Ok(c) => {
                            let _ = to_pool_tx.send(Some(c));
                        }
                        Err(e) => tracing::warn!(error = %proto::error_chain(&e), "the renewed certificate cannot call the pool"),
                    }
                };
                Some(tokio::spawn(pool_client::join::keep_renewed(
                    tls.clone(),
                    move || members.clone(),
                    tls_dir.clone(),
                    renewed,
                    stop_rx.clone(),
                )))
            }
            _ => None,
        };
        let agent = match &config.pool {
            Some(pool) => {
                let cfg = AgentConfig::new(pool, addr, &identity.host_id)
                    .context("joining the pool ([pool] section)")?;
                tracing::info!(coordinators = ?cfg.coordinators, address = %cfg.address, "heartbeating to the pool");
                let local = Arc::new(HostServer::new(manager.clone(), identity.clone()));
                let to_pool = tls
                    .coordinators_client()
                    .context("TLS for calling the coordinators")?;
                let agent = Agent::new(cfg, local, Some(&to_pool))
                    .context("joining the pool")?
                    .with_tls_updates(to_pool_rx);
                let mut stop = stop_rx.clone();
                Some(tokio::spawn(agent.run(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })))
            }
            None => None,
        };
        hostd::service::serve(
            listener,
            HostServer::new(manager.clone(), identity),
            server_tls,
            async move {
                shutdown_signal().await;
                let _ = stop_tx.send(true);
            },
        )
        .await
        .context("serving")?;
        if let Some(agent) = agent {
            let _ = agent.await;
        }
        if let Some(renewal) = renewal {
            let _ = renewal.await;
        }
        if tie {
            manager.stop_all().await;
        }
        tracing::info!("hostd stopped");
        Ok(())
    })
}

/// The IP address the pool dials this host at, for its certificate: the advertised one,
/// else the listen address unless it is a wildcard.
fn advertised_ip(config: &Config) -> Option<std::net::IpAddr> {
    let advertised = config.pool.as_ref().and_then(|p| p.advertise.as_deref());
    match advertised {
        Some(a) => a
            .parse::<SocketAddr>()
            .map(|s| s.ip())
            .or_else(|_| a.parse())
            .ok(),
        None => config
            .listen
            .map(|l| l.ip())
            .filter(|ip| !ip.is_unspecified()),
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default))
        .add_directive(
            pool_trust::audit::LOG_DIRECTIVE
                .parse()
                .expect("a valid directive"),
        );
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colour only for a person: not in a journal or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}
