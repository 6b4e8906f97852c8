//! `poolctl lab`: the whole pool on one machine — three `poold` members, a `storaged` with
//! a file-backed thin pool, and three `hostd` on 127.0.0.11-13 that join by themselves —
//! with a storage repository, a template made from the test guest and a demo VM.
//!
//! Everything lives under one data directory, and every address is fixed, so running the
//! lab again resumes the same pool (the coordinators' Raft logs, the thin pool and its
//! volumes); what already exists is not created again. The daemons run in process groups
//! of their own, so Ctrl-C reaches only the lab, which stops them in order (hosts, which
//! stop their VMs; storage; coordinators), each by its pid, waiting for each to exit.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Proc, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pool_client::PoolClient;
use pool_trust::{Identity, LocalCa, PoolId};
use proto::coordinator as pb;

use crate::cmd::sr::{self, SrCommand};
use crate::cmd::template::{self, TemplateCommand};
use crate::cmd::vdi::{self, VdiCommand};
use crate::cmd::vm::{self, VmCommand};
use crate::ctl::{Ctl, call};

mod web;

/// The coordinator members, also poolctl's default `--pool`.
pub const MEMBERS: [&str; 3] = ["127.0.0.1:7101", "127.0.0.1:7102", "127.0.0.1:7103"];
/// Each member's web console port (HTTPS; PoolService as gRPC-Web).
pub const CONSOLES: [&str; 3] = ["127.0.0.1:7141", "127.0.0.1:7142", "127.0.0.1:7143"];
const STORAGED: &str = "127.0.0.1:7300";
/// The lab pool's id, in its CA and every certificate.
const POOL_ID: &str = "lab";
/// poolctl's configuration for the lab, in the lab's directory.
const CLIENT_CONFIG: &str = "client.toml";
/// The first admin's password, generated once, in the lab's `pki` directory (0700).
const ADMIN_PASSWORD: &str = "admin-password";
const ISCSI: &str = "127.0.0.1:7360";
const HOST_PORT: u16 = 7000;
const SR: &str = "lab-sr";
const TEMPLATE: &str = "guest";
const DEMO: &str = "demo";
/// How long one daemon may take to start listening, or to stop.
const DAEMON_WAIT: Duration = Duration::from_secs(30);

#[derive(Debug, clap::Args)]
pub struct LabArgs {
    /// Where the lab keeps its state (default ~/.local/share/poolctl-lab); running again
    /// resumes the same pool.
    #[arg(long, alias = "data-dir")]
    dir: Option<PathBuf>,
    /// Number of hosts (127.0.0.11 and up), 1 to 9.
    #[arg(long, default_value_t = 3)]
    hosts: u8,
    /// Size of the thin pool's backing file (sparse) on first start.
    #[arg(long, default_value = "8G")]
    sr_size: String,
    /// Do not create or start the demo VM.
    #[arg(long)]
    no_demo: bool,
    /// Set up the pool, print how long it took, then stop everything (for benchmarks).
    #[arg(long)]
    exit_when_ready: bool,
    /// The web console's built pages (default: this workspace's web/dist, built with npm
    /// when missing or older than its sources).
    #[arg(long)]
    web_root: Option<PathBuf>,
}

/// A daemon of the lab, stopped by its pid.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn spawn(name: &str, mut cmd: Proc, logs: &Path) -> anyhow::Result<Daemon> {
        use std::os::unix::process::CommandExt;
        let log = logs.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| format!("{}", log.display()))?;
        let err = out.try_clone()?;
        // A group of its own: the terminal's Ctrl-C reaches the lab only, which then stops
        // the daemons in order.
        cmd.stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(Daemon {
            name: name.to_owned(),
            child,
            log,
        })
    }

    /// Waits until `addr` accepts connections, failing when the daemon exits first.
    fn wait_listening(&mut self, addr: &str) -> anyhow::Result<()> {
        let sa: SocketAddr = addr.parse().context("address")?;
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited ({status}) while starting; see {}{}",
                    self.name,
                    self.log.display(),
                    last_lines(&self.log)
                );
            }
            if TcpStream::connect_timeout(&sa, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if start.elapsed() > DAEMON_WAIT {
                bail!(
                    "{} does not listen on {addr} after {DAEMON_WAIT:?}; see {}",
                    self.name,
                    self.log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited after `DAEMON_WAIT`.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // SAFETY: kill(2) with the pid of a child we spawned and have not reaped (try_wait
        // above saw it running), so the pid still names that child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let start = Instant::now();
        while start.elapsed() < DAEMON_WAIT {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{} did not stop within {DAEMON_WAIT:?}: killing it",
            self.name
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn last_lines(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(5);
    if lines.is_empty() {
        String::new()
    } else {
        format!(":\n  {}", lines[from..].join("\n  "))
    }
}

/// The daemons, stopped in reverse order of start when dropped.
#[derive(Default)]
struct Lab {
    daemons: Vec<Daemon>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.daemons.is_empty() {
            return;
        }
        eprintln!("stopping the lab");
        while let Some(mut d) = self.daemons.pop() {
            d.stop();
        }
    }
}

/// A binary of the pool: beside this one (cargo puts a workspace's binaries together),
/// built there when it is missing and cargo is at hand.
fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding poolctl's own path")?;
    let dir = exe.parent().context("poolctl's directory")?;
    let path = dir.join(name);
    if path.exists() {
        return Ok(path);
    }
    let package = if name == "hostd-vmm" { "hostd" } else { name };
    let release = dir.file_name().is_some_and(|d| d == "release");
    let build = format!(
        "cargo build{} -p {package} --bin {name}",
        if release { " --release" } else { "" }
    );
    let Ok(cargo) = std::env::var("CARGO") else {
        bail!(
            "{name} is not next to poolctl ({}); build it: {build}",
            dir.display()
        );
    };
    eprintln!("building {name}: {build}");
    let mut cmd = Proc::new(cargo);
    cmd.args(["build", "-q", "-p", package, "--bin", name]);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().context("running cargo")?;
    if !status.success() || !path.exists() {
        bail!("building {name} failed; run: {build}");
    }
    Ok(path)
}

fn default_dir() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(d).join("poolctl-lab"));
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .context("HOME is not set; pass --dir")?;
    Ok(PathBuf::from(home).join(".local/share/poolctl-lab"))
}

/// The lab's client configuration (members and CA bundle), when a lab has been made in
/// the default directory: what `poolctl` uses when told nothing else.
pub fn client_config() -> Option<PathBuf> {
    let path = default_dir().ok()?.join(CLIENT_CONFIG);
    path.exists().then_some(path)
}

/// The lab's pool CA (`dir/pki`) and every daemon's TLS directory under it: kept from the
/// last start while valid (the daemons renew them, onto a new CA after a roll), issued
/// otherwise. Returns the CA bundle poolctl trusts: member 1's, which follows the pool's.
fn pki(dir: &Path, hosts: u8) -> anyhow::Result<PathBuf> {
    let pki = dir.join("pki");
    let pool = PoolId::parse(POOL_ID).expect("a valid pool id");
    let ca = LocalCa::open_or_create(&pki, &pool)
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
        .context("the lab's CA")?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let issue = |identity: Identity, names: &[&str], into: PathBuf| {
        let kept = pool_trust::DaemonTls::load_as(&into, &identity)
            .is_ok_and(|t| !t.creds.should_renew(now));
        if kept {
            return Ok(());
        }
        ca.issue(&identity, names, &into)
            .map(drop)
            .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
            .with_context(|| format!("issuing {identity}"))
    };
    for id in 1..=MEMBERS.len() as u64 {
        issue(
            Identity::Member(id),
            &["127.0.0.1"],
            pki.join(format!("member-{id}")),
        )?;
    }
    issue(
        Identity::Storage("storaged".into()),
        &["127.0.0.1"],
        pki.join("storaged"),
    )?;
    for i in 1..=hosts {
        let ip = format!("127.0.0.{}", 10 + i);
        issue(
            Identity::Host(format!("h{i}")),
            &[&ip],
            pki.join(format!("h{i}")),
        )?;
    }
    // A Prometheus may scrape every daemon with this one (it can call nothing else).
    issue(
        Identity::Monitor("prometheus".into()),
        &[],
        pki.join("monitor"),
    )?;
    write_prometheus_config(dir, hosts)?;
    // The pool is founded with its first admin, whose password only this directory holds.
    let admin = pki.join(ADMIN_PASSWORD);
    if !admin.exists() {
        let password = format!("{}\n", pool_trust::token::generate_password());
        pool_trust::files::write_private(&admin, password.as_bytes())
            .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))?;
    }
    Ok(pki.join("member-1").join(pool_trust::BUNDLE_FILE))
}

/// `prometheus.yml`: one job per kind of daemon, each scraped with the lab's monitor
/// certificate (`docs/metrics.md`). Paths, no secrets: the key stays 0600 in `pki/monitor`.
fn write_prometheus_config(dir: &Path, hosts: u8) -> anyhow::Result<()> {
    let tls = dir.join("pki").join("monitor");
    let tls_config = format!(
        "    scheme: https\n    tls_config:\n      ca_file: {:?}\n      cert_file: {:?}\n      key_file: {:?}\n",
        tls.join(pool_trust::BUNDLE_FILE),
        tls.join("cert.pem"),
        tls.join("key.pem"),
    );
    let job = |name: &str, targets: Vec<String>| {
        format!(
            "  - job_name: {name}\n{tls_config}    static_configs:\n      - targets: [{}]\n",
            targets
                .iter()
                .map(|t| format!("{t:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let hosts = (1..=hosts)
        .map(|i| format!("127.0.0.{}:{HOST_PORT}", 10 + i))
        .collect();
    let text = format!(
        "# Written by `poolctl lab`: scrapes the lab's daemons with its monitor certificate.\n\
         # Issued by the lab's CA: after `poolctl pool-rotate-ca` the daemons no longer take it.\n\
         scrape_configs:\n{}{}{}",
        job(
            "pool-members",
            MEMBERS.iter().map(|m| m.to_string()).collect()
        ),
        job("pool-hosts", hosts),
        job("pool-storage", vec![STORAGED.to_string()]),
    );
    std::fs::write(dir.join("prometheus.yml"), text)
        .with_context(|| format!("writing {}", dir.join("prometheus.yml").display()))
}

/// Logs in as the lab's admin and writes poolctl's configuration for the lab (members,
/// CA, the token: 0600).
async fn log_in(ctl: &mut Ctl, dir: &Path, bundle: &Path) -> anyhow::Result<()> {
    let password = std::fs::read_to_string(dir.join("pki").join(ADMIN_PASSWORD))?
        .trim_end()
        .to_owned();
    // The leader creates the admin a moment after its election; until then the pool
    // answers anyone. Logging in before would count as failures against the throttle.
    let start = Instant::now();
    loop {
        let r = ctl
            .client
            .call(|mut p| async move { p.list_members(pb::ListMembersRequest {}).await })
            .await;
        match r {
            Err(s) if s.code() == tonic::Code::Unauthenticated => break,
            _ if start.elapsed() > Duration::from_secs(60) => {
                bail!(
                    "the coordinators elected no leader, or it made no first admin, within \
                     60 s; see the poold logs"
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let login = pb::LoginRequest {
        user_name: "admin".into(),
        password,
    };
    let token = call!(ctl.client, login, login.clone())
        .context("logging in as the lab's admin")?
        .token;
    ctl.client.set_token(&token)?;
    let members: Vec<String> = MEMBERS.iter().map(|m| format!("{m:?}")).collect();
    let client = dir.join(CLIENT_CONFIG);
    let text = format!(
        "# poolctl's configuration for this lab (written by `poolctl lab`; the token is the\n\
         # lab admin's, renewed at each start).\n\
         coordinators = [{}]\nca = {:?}\ntoken = {token:?}\n",
        members.join(", "),
        bundle
    );
    pool_trust::files::write_atomic(&client, text.as_bytes(), 0o600)
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))?;
    Ok(())
}

pub fn lab(args: LabArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    if !(1..=9).contains(&args.hosts) {
        bail!("--hosts {}: from 1 to 9", args.hosts);
    }
    let sr_size = crate::output::parse_size(&args.sr_size)
        .map_err(|e| anyhow::anyhow!("--sr-size {}: {e}", args.sr_size))?;
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => default_dir()?,
    };
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let dir = dir
        .canonicalize()
        .with_context(|| format!("{}", dir.display()))?;
    let logs = dir.join("logs");
    let resumed = dir.join("poold-1").exists();
    eprintln!(
        "{} the lab in {}",
        if resumed { "resuming" } else { "creating" },
        dir.display()
    );
    let poold = binary("poold")?;
    let storaged = binary("storaged")?;
    let hostd = binary("hostd")?;
    let _ = binary("hostd-vmm");

    let web_root = web::root(args.web_root.as_deref(), &logs)?;
    let bundle = pki(&dir, args.hosts)?;
    let mut lab = Lab::default();
    for (i, addr) in MEMBERS.iter().enumerate() {
        let id = i + 1;
        let mut cmd = Proc::new(&poold);
        cmd.args(["--member-id", &id.to_string(), "--listen", addr])
            .args(["--pool-id", POOL_ID])
            .arg("--data-dir")
            .arg(dir.join(format!("poold-{id}")))
            .arg("--tls-dir")
            .arg(dir.join(format!("pki/member-{id}")))
            .arg("--admin-password-file")
            .arg(dir.join("pki").join(ADMIN_PASSWORD))
            // The lab's backup schedules write under its directory (one machine: shared).
            .arg("--backup-root")
            .arg(dir.join("backups"));
        // The pool keeps its CA, so `poolctl host-join` can add hosts to the lab; founded
        // once (after a CA roll the lab's own CA is no longer the pool's).
        if !dir.join(format!("poold-{id}")).exists() {
            cmd.arg("--found-ca").arg(dir.join("pki"));
        }
        for (j, a) in MEMBERS.iter().enumerate() {
            cmd.arg("--member").arg(format!("{}={a}", j + 1));
        }
        cmd.args(["--web-listen", CONSOLES[i]]);
        if let Some(root) = &web_root {
            cmd.arg("--web-root").arg(root);
        }
        lab.daemons
            .push(Daemon::spawn(&format!("poold-{id}"), cmd, &logs)?);
    }
    for (d, addr) in lab.daemons.iter_mut().zip(MEMBERS) {
        d.wait_listening(addr)?;
    }

    let sdir = dir.join("storaged");
    std::fs::create_dir_all(&sdir)?;
    let sconf = sdir.join("storaged.toml");
    std::fs::write(
        &sconf,
        format!(
            "listen = \"{STORAGED}\"\niscsi_listen = \"{ISCSI}\"\nstate_dir = {:?}\n\
             tls_dir = {:?}\ncoordinators = [{}]\n",
            sdir.join("state"),
            dir.join("pki/storaged"),
            // Renews its certificate there (and onto a new CA in a roll).
            MEMBERS
                .iter()
                .map(|m| format!("{m:?}"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
    )?;
    let mut cmd = Proc::new(&storaged);
    cmd.args(["--log", "info", "serve", "--config"]).arg(&sconf);
    let mut s = Daemon::spawn("storaged", cmd, &logs)?;
    s.wait_listening(STORAGED)?;
    lab.daemons.push(s);

    let pool_arg = MEMBERS.join(",");
    let mut host_addrs = Vec::new();
    for i in 1..=args.hosts {
        let name = format!("h{i}");
        let addr = format!("127.0.0.{}:{HOST_PORT}", 10 + i);
        let run_dir = dir.join(&name);
        std::fs::create_dir_all(&run_dir)?;
        let mut cmd = Proc::new(&hostd);
        cmd.args(["--listen", &addr, "--tie-vms", "--host-id", &name])
            .arg("--run-dir")
            .arg(&run_dir)
            .arg("--tls-dir")
            .arg(dir.join("pki").join(&name))
            // The test guest the lab writes, and nothing else of this machine's.
            .arg("--image-dir")
            .arg(&dir)
            .args([
                "--initiator-iqn",
                &format!("iqn.2026-11.org.pool.lab:{name}"),
            ])
            .args(["--pool", &pool_arg]);
        let mut h = Daemon::spawn(&name, cmd, &logs)?;
        h.wait_listening(&addr)?;
        lab.daemons.push(h);
        host_addrs.push(addr);
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let guest = dir.join("guest.elf");
    let out = Proc::new(&hostd)
        .args(["guest-elf", "--out"])
        .arg(&guest)
        .output()
        .context("running hostd guest-elf")?;
    if !out.status.success() {
        bail!(
            "writing the test guest: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    rt.block_on(setup(&args, &dir, &guest, sr_size, &host_addrs, &bundle))?;
    let ready = started.elapsed();
    println!(
        "\nThe lab is ready ({:.1} s): {} coordinators, {} hosts, storage at {STORAGED} \
         (iSCSI {ISCSI}); logs in {}.\n\n\
         Every link is mutual TLS under the lab's CA ({}).\n\
         Use it from another terminal{}:\n\
         \x20 poolctl host-list\n\
         \x20 poolctl vm-list\n\
         \x20 poolctl vm-console {DEMO}        # Ctrl-] leaves\n\
         \x20 poolctl vm-create vm2 --template {TEMPLATE} --memory 64M --start\n\
         \x20 poolctl vm-migrate {DEMO}\n\
         \x20 poolctl events --follow        # each change as it is committed\n\n\
         Prometheus: {} scrapes every daemon's /metrics with the lab's monitor certificate.\n\n\
         The web console: https://{}/ (every member serves it, ports 7141-7143), {}; its \
         certificate is under the lab's CA (trust {} in the browser). Log in as admin with \
         the password in {}.\n\n\
         Ctrl-C stops the lab; `poolctl lab{}` again resumes it.",
        ready.as_secs_f64(),
        MEMBERS.len(),
        args.hosts,
        logs.display(),
        bundle.display(),
        match &args.dir {
            Some(_) => format!(" with --config {}", dir.join(CLIENT_CONFIG).display()),
            None => String::new(),
        },
        dir.join("prometheus.yml").display(),
        CONSOLES[0],
        if web_root.is_some() {
            "live from the pool's change feed"
        } else {
            "without its pages (see above): PoolService answers there as gRPC-Web"
        },
        bundle.display(),
        dir.join("pki").join(ADMIN_PASSWORD).display(),
        args.dir
            .as_ref()
            .map(|d| format!(" --dir {}", d.display()))
            .unwrap_or_default(),
    );
    println!("LAB READY {:.3}", ready.as_secs_f64());
    if args.exit_when_ready {
        return Ok(());
    }
    rt.block_on(watch(&mut lab))
}

/// Until Ctrl-C or SIGTERM, or until a daemon dies.
async fn watch(lab: &mut Lab) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = tick.tick() => {}
        }
        let mut gone = Vec::new();
        for (i, d) in lab.daemons.iter_mut().enumerate() {
            if let Some(status) = d.child.try_wait()? {
                gone.push((i, status));
            }
        }
        for (i, status) in gone.into_iter().rev() {
            let d = lab.daemons.remove(i);
            let what = format!("{} exited ({status}); see {}", d.name, d.log.display());
            // What a pool outlives, the lab does too, so a host can be killed to watch HA
            // and a member to watch Raft: a host (the pool fences it and restarts its HA
            // VMs elsewhere) and a minority of members. Not storage, nor a majority.
            let members_left = lab
                .daemons
                .iter()
                .filter(|d| d.name.starts_with("poold-"))
                .count();
            let host = d
                .name
                .strip_prefix('h')
                .is_some_and(|n| n.parse::<u8>().is_ok());
            let survives =
                host || (d.name.starts_with("poold-") && members_left * 2 > MEMBERS.len());
            if !survives {
                bail!("{what}{}", last_lines(&d.log));
            }
            eprintln!("{what}; the pool goes on without it");
        }
    }
}

/// What the lab needs in the pool, created only when missing.
async fn setup(
    args: &LabArgs,
    dir: &Path,
    guest: &Path,
    sr_size: u64,
    host_addrs: &[String],
    bundle: &Path,
) -> anyhow::Result<()> {
    let mut client = PoolClient::with_tls(MEMBERS, &crate::client_tls(bundle)?);
    client.deadline = Duration::from_secs(60);
    let mut ctl = Ctl {
        client,
        json: false,
        wait: true,
        pins: None,
        ca_file: Some(bundle.to_owned()),
    };
    // Logged in first: once the pool has made its admin, it answers nobody else.
    log_in(&mut ctl, dir, bundle).await?;
    let start = Instant::now();
    while !ctl.client.find_leader().await {
        if start.elapsed() > Duration::from_secs(60) {
            bail!("the coordinators elected no leader within 60 s; see the poold logs");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The hosts join by themselves; wait until every one is in and enabled.
    let start = Instant::now();
    loop {
        let hosts = ctl.hosts().await?;
        let up = host_addrs
            .iter()
            .filter(|a| {
                hosts
                    .iter()
                    .any(|h| h.address == **a && h.state == pb::HostState::Enabled as i32)
            })
            .count();
        if up == host_addrs.len() {
            break;
        }
        if start.elapsed() > Duration::from_secs(60) {
            bail!(
                "{up} of {} hosts joined within 60 s; see the hN logs",
                host_addrs.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if !ctl.srs().await?.iter().any(|s| s.name == SR) {
        sr::run(
            &mut ctl,
            SrCommand::Create {
                name: SR.into(),
                address: STORAGED.into(),
                thin_pool: None,
                file: Some(dir.join("lab-sr.img").display().to_string()),
                size: Some(sr_size),
            },
        )
        .await
        .context("creating the storage repository")?;
    }
    let templates = call!(
        ctl.client,
        list_templates,
        pb::ListTemplatesRequest { page: None }
    )?;
    if !templates.templates.iter().any(|t| t.name == TEMPLATE) {
        let vms = ctl.vms().await?;
        let base = "guest-base";
        if !vms
            .iter()
            .any(|v| v.spec.as_ref().is_some_and(|s| s.name == base))
        {
            let vdis = ctl.vdis("").await?;
            if !vdis.iter().any(|v| v.name == "guest-disk") {
                vdi::run(
                    &mut ctl,
                    VdiCommand::Create {
                        name: "guest-disk".into(),
                        sr: SR.into(),
                        size: 16 << 20,
                    },
                )
                .await?;
            }
            vm::run(
                &mut ctl,
                VmCommand::Create {
                    name: base.into(),
                    template: None,
                    disk: vec!["guest-disk".into()],
                    undo: false,
                    vcpus: 1,
                    memory: 64 << 20,
                    kernel: Some(guest.display().to_string()),
                    initrd: None,
                    boot: proto::host::BootProtocol::Auto as i32,
                    cmdline: "seed=1 blk=rw mode=heartbeat hb_ms=1000".into(),
                    start: false,
                    ha: pb::HaRestartPriority::None as i32,
                    ha_order: 0,
                    network: vec![],
                },
            )
            .await?;
        }
        template::run(
            &mut ctl,
            TemplateCommand::Create {
                name: TEMPLATE.into(),
                vm: base.into(),
            },
        )
        .await?;
    }
    if !args.no_demo
        && !ctl
            .vms()
            .await?
            .iter()
            .any(|v| v.spec.as_ref().is_some_and(|s| s.name == DEMO))
    {
        vm::run(
            &mut ctl,
            VmCommand::Create {
                name: DEMO.into(),
                template: Some(TEMPLATE.into()),
                disk: vec![],
                undo: false,
                vcpus: 1,
                memory: 64 << 20,
                kernel: None,
                initrd: None,
                boot: proto::host::BootProtocol::Auto as i32,
                cmdline: String::new(),
                start: true,
                ha: pb::HaRestartPriority::Restart as i32,
                ha_order: 0,
                network: vec![],
            },
        )
        .await?;
    }
    Ok(())
}
