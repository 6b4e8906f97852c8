//! `poolctl`: the command-line tool of the pool (verbs in the spirit of XenServer's `xe`),
//! and `poolctl lab`, the one-machine pool.
//!
//! Every verb is one `PoolService` call (or a few reads to turn names into ids). Listings
//! print as tables, or as JSON with `--json`; mutating verbs wait for their task and show
//! its progress unless `--no-wait` is given.
//!
//! # Layout
//! - `cmd/<noun>.rs`: the verbs of one noun (`vm-*`, `host-*`, ...): arguments and handler.
//! - `ctl.rs`: what every verb works through: the client, `call!`, following a task.
//! - `lookup.rs`: whole listings and names turned into ids.
//! - `output.rs`: tables and JSON, and how values read for people.
//! - `transfer.rs`, `console.rs`: disk images and the serial console, over their own paths.
//! - `backup/`: VM backups (`vm-backup`, `vm-restore`, `vm-backup-verify`,
//!   `vm-backup-prune`).
//! - `image/`: standard image formats and OVA packages, through qemu-img.
//! - `lab.rs`: `poolctl lab`, which starts the daemons as processes.
//! - `pki.rs`: `pki-init`, `pki-issue`: the pool's CA and daemons' TLS directories, offline.
//! - `pin.rs`: without `--ca`, the pool's CA pinned on first contact (as ssh does), and
//!   member addresses refused unless TLS.

mod backup;
mod cmd;
mod console;
mod ctl;
mod image;
mod lab;
mod lookup;
mod output;
mod pin;
mod pki;
mod transfer;

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use pool_client::PoolClient;
use serde::Deserialize;

use crate::ctl::Ctl;

/// Drive a pool of KVM hosts with shared iSCSI thin storage.
#[derive(Debug, Parser)]
#[command(name = "poolctl", version, about)]
struct Args {
    /// TOML configuration file (coordinator addresses, token).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Coordinator members to try, comma-separated (e.g. 127.0.0.1:7101,127.0.0.1:7102).
    #[arg(long, global = true, env = "POOLCTL_POOL", value_delimiter = ',')]
    pool: Vec<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Return as soon as the pool accepted a change instead of waiting for its task.
    #[arg(long, global = true)]
    no_wait: bool,
    /// Refused: a token on the command line is there for every user of the machine to
    /// read (ps, /proc). The token comes from POOLCTL_TOKEN or the config file's `token`.
    #[arg(long, global = true, hide = true)]
    token: Option<String>,
    /// The pool's CA bundle (PEM): only members with a certificate it signed are
    /// believed (wins over the config file's `ca`). Without it, poolctl pins the CA the
    /// pool shows on first contact, as ssh does (see --trust-new-pool).
    #[arg(long, global = true, env = "POOLCTL_CA")]
    ca: Option<PathBuf>,
    /// Pin a pool met for the first time without asking (its CA fingerprint is still
    /// shown); without it poolctl asks on a terminal and refuses otherwise.
    #[arg(
        long,
        global = true,
        env = "POOLCTL_TRUST_NEW_POOL",
        action = clap::ArgAction::SetTrue,
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    trust_new_pool: bool,
    /// Log filter (RUST_LOG wins when set).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

/// Every verb; each noun's verbs come from its module in `cmd/`.
#[derive(Debug, Subcommand)]
enum Command {
    /// Run a one-machine pool: hosts, coordinator members and a file-backed storage box.
    Lab(lab::LabArgs),
    #[command(flatten)]
    Pki(pki::PkiCommand),
    #[command(flatten)]
    Member(cmd::member::MemberCommand),
    #[command(flatten)]
    Host(cmd::host::HostCommand),
    #[command(flatten)]
    Sr(cmd::sr::SrCommand),
    #[command(flatten)]
    Vdi(cmd::vdi::VdiCommand),
    #[command(flatten)]
    Vm(cmd::vm::VmCommand),
    #[command(flatten)]
    Backup(cmd::backup::BackupCommand),
    #[command(flatten)]
    Net(cmd::net::NetCommand),
    #[command(flatten)]
    Template(cmd::template::TemplateCommand),
    #[command(flatten)]
    Pool(cmd::pool::PoolCommand),
    #[command(flatten)]
    Schedule(cmd::schedule::ScheduleCommand),
    #[command(flatten)]
    User(cmd::user::UserCommand),
    #[command(flatten)]
    Task(cmd::task::TaskCommand),
    #[command(flatten)]
    Alert(cmd::alert::AlertCommand),
    #[command(flatten)]
    Events(cmd::events::EventsCommand),
    #[command(flatten)]
    Stats(cmd::stats::StatsCommand),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Coordinator members to try, in order, to find the leader.
    #[serde(default)]
    coordinators: Vec<String>,
    /// Token from `Login`, sent on every call.
    token: Option<String>,
    /// The pool's CA bundle (PEM file).
    ca: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config_path = args.config.clone().or_else(|| {
        // With nothing said, poolctl drives the lab on this machine when there is one.
        (args.pool.is_empty() && args.ca.is_none())
            .then(lab::client_config)
            .flatten()
    });
    let config: Config = match &config_path {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Config::default(),
    };
    let command = match args.command {
        Command::Lab(lab) => return lab::lab(lab),
        Command::Pki(pki) => return pki::run(pki),
        Command::Backup(cmd::backup::BackupCommand::Verify { dir }) => {
            return cmd::backup::verify(&dir);
        }
        Command::Backup(cmd::backup::BackupCommand::Prune(p)) => return cmd::backup::prune(p),
        other => other,
    };
    let members = if !args.pool.is_empty() {
        args.pool.clone()
    } else if !config.coordinators.is_empty() {
        config.coordinators.clone()
    } else {
        vec![
            "127.0.0.1:7101".to_owned(),
            "127.0.0.1:7102".to_owned(),
            "127.0.0.1:7103".to_owned(),
        ]
    };
    let members = pin::member_addresses(&members)?;
    if args.token.is_some() {
        bail!(
            "--token is refused: a token on the command line is there for every user of this \
             machine to read (ps, /proc); put it in POOLCTL_TOKEN or as `token` in the --config file"
        );
    }
    // Token from `poolctl login`, sent on every call (wins over the config file's).
    let token = std::env::var("POOLCTL_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
        .or(config.token.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let ca_file = args.ca.clone().or(config.ca.clone());
    let (tls, pins) = match &ca_file {
        Some(ca) => (client_tls(ca)?, None),
        None => {
            // Before any token leaves: the pool's CA, pinned or accepted now.
            let known = pin::known_pools_path()?;
            let met = runtime.block_on(pin::probe(&members))?;
            let first_use = pin::FirstUse {
                trust_new_pool: args.trust_new_pool,
            };
            let tls = bundle_tls(&pin::settle(&met, &known, first_use)?);
            (tls, Some((members.clone(), known)))
        }
    };
    runtime.block_on(async move {
        let mut client = PoolClient::with_tls(&members, &tls);
        if let Some(t) = &token {
            client.set_token(t.trim())?;
        }
        client.find_leader().await;
        let mut ctl = Ctl {
            client,
            json: args.json,
            wait: !args.no_wait,
            pins,
            ca_file,
        };
        run(&mut ctl, command).await
    })
}

/// TLS toward whichever member answers: a certificate of the pool's CA naming the
/// coordinators, whatever address was dialled.
pub fn client_tls(ca: &std::path::Path) -> anyhow::Result<tonic::transport::ClientTlsConfig> {
    let bundle = pool_trust::CaBundle::load(ca)
        .map_err(|e| anyhow::anyhow!(proto::error_chain(&e)))
        .with_context(|| format!("reading the pool's CA bundle {}", ca.display()))?;
    Ok(bundle_tls(&bundle))
}

fn bundle_tls(bundle: &pool_trust::CaBundle) -> tonic::transport::ClientTlsConfig {
    pool_trust::tls::client_tls(bundle, None, None)
        .expect("no credentials, nothing to mismatch")
        .domain_name(pool_trust::coordinators_name(bundle.pool_id()))
}

async fn run(ctl: &mut Ctl, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Lab(_) | Command::Pki(_) => bail!("this verb runs on its own, not against a pool"),
        Command::Member(c) => cmd::member::run(ctl, c).await,
        Command::Host(c) => cmd::host::run(ctl, c).await,
        Command::Sr(c) => cmd::sr::run(ctl, c).await,
        Command::Vdi(c) => cmd::vdi::run(ctl, c).await,
        Command::Vm(c) => cmd::vm::run(ctl, c).await,
        Command::Backup(c) => cmd::backup::run(ctl, c).await,
        Command::Net(c) => cmd::net::run(ctl, c).await,
        Command::Template(c) => cmd::template::run(ctl, c).await,
        Command::Pool(c) => cmd::pool::run(ctl, c).await,
        Command::Schedule(c) => cmd::schedule::run(ctl, c).await,
        Command::User(c) => cmd::user::run(ctl, c).await,
        Command::Task(c) => cmd::task::run(ctl, c).await,
        Command::Alert(c) => cmd::alert::run(ctl, c).await,
        Command::Events(c) => cmd::events::run(ctl, c).await,
        Command::Stats(c) => cmd::stats::run(ctl, c).await,
    }
}
