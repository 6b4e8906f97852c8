//! `poolctl`: the command-line tool of the pool (verbs in the spirit of XenServer's `xe`),
//! and `poolctl lab`, the one-machine pool.
//!
//! Every verb is one `PoolService` call (or a few reads to turn names into ids). Listings
//! print as tables, or as JSON with `--json`; mutating verbs wait for their task and show
//! its progress unless `--no-wait` is given.

mod output;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use output::{Progress, Table, Value, human_bytes, parse_size};
use poold::client::{PoolClient, new_request_id};
use proto::coordinator as pb;
use proto::host as hpb;
use serde::Deserialize;

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
    /// Token from `poolctl login`, sent on every call (wins over the config file's).
    #[arg(long, global = true, env = "POOLCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Log filter (RUST_LOG wins when set).
    #[arg(long, global = true, default_value = "warn")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a one-machine pool: hosts, coordinator members and a file-backed storage box.
    Lab(lab::LabArgs),
    /// Coordinator members and who leads.
    MemberList,
    /// Move coordinator leadership to another voting member (before maintenance).
    MemberTransfer {
        /// The member id that should lead.
        member: u64,
    },
    /// Hosts of the pool.
    HostList,
    /// Add a host (a running hostd) to the pool.
    HostJoin {
        name: String,
        /// hostd's gRPC address.
        address: String,
    },
    /// Let a host receive VMs again.
    HostEnable { host: String },
    /// Keep a host from receiving new VMs.
    HostDisable { host: String },
    /// Live-migrate every VM away from a host, then put it in maintenance.
    HostEvacuate { host: String },
    /// Add a storage repository: a storaged endpoint and one of its thin pools.
    SrCreate {
        name: String,
        /// storaged's gRPC address.
        address: String,
        /// An existing thin pool of that storaged...
        #[arg(long, conflicts_with = "file")]
        thin_pool: Option<String>,
        /// ...or a new one on this file (on the storage host).
        #[arg(long, requires = "size")]
        file: Option<String>,
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
    },
    /// Storage repositories and their space.
    SrList,
    /// Create a virtual disk (a thin volume).
    VdiCreate {
        name: String,
        #[arg(long)]
        sr: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Copy a raw disk image into a new disk (straight to the storage, over iSCSI).
    VdiImport {
        file: std::path::PathBuf,
        name: String,
        #[arg(long)]
        sr: String,
    },
    /// Copy a disk or snapshot into a new raw image file (zero blocks stay holes).
    VdiExport {
        vdi: String,
        file: std::path::PathBuf,
    },
    /// Virtual disks.
    VdiList {
        #[arg(long)]
        sr: Option<String>,
    },
    /// Take a read-only snapshot of a disk.
    VdiSnapshot { vdi: String, name: String },
    /// Make a writable clone of a disk or snapshot.
    VdiClone { vdi: String, name: String },
    /// Revert a disk to one of its snapshots.
    VdiRevert { vdi: String, snapshot: String },
    /// Delete a disk, snapshot or clone.
    VdiDestroy { vdi: String },
    /// Create a VM from a template or from existing disks.
    VmCreate {
        name: String,
        #[arg(long, conflicts_with = "disk")]
        template: Option<String>,
        /// Existing disks, in order (vda, vdb, ...).
        #[arg(long)]
        disk: Vec<String>,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, value_parser = parse_size, default_value = "512M")]
        memory: u64,
        /// Kernel image on the hosts (vmlinux, bzImage or a PVH ELF such as guest/).
        #[arg(long)]
        kernel: Option<String>,
        #[arg(long, default_value = "")]
        cmdline: String,
        /// Start it at once.
        #[arg(long)]
        start: bool,
        /// HA restart priority: none, best-effort or restart.
        #[arg(long, default_value = "none", value_parser = ha_priority)]
        ha: i32,
        /// HA restart order within its priority: lower restarts first.
        #[arg(long, default_value_t = 0)]
        ha_order: u32,
    },
    /// Change a VM's settings; what is not given stays as it is (vCPUs and memory only
    /// while it is stopped; a new command line takes effect at its next boot).
    VmSet {
        vm: String,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        #[arg(long)]
        cmdline: Option<String>,
        /// HA restart priority: none, best-effort or restart.
        #[arg(long, value_parser = ha_priority)]
        ha: Option<i32>,
        /// HA restart order within its priority: lower restarts first.
        #[arg(long)]
        ha_order: Option<u32>,
    },
    /// VMs and where they run.
    VmList,
    /// Start a stopped VM.
    VmStart {
        vm: String,
        /// On this host; by default the scheduler chooses.
        #[arg(long)]
        host: Option<String>,
    },
    /// Ask the guest to power off (--force: stop it at once).
    VmShutdown {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    /// Ask the guest to reboot (--force: reset it at once).
    VmReboot {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    /// Remove a stopped VM (its disks stay unless --delete-disks).
    VmDestroy {
        vm: String,
        /// Also delete its disks.
        #[arg(long)]
        delete_disks: bool,
    },
    /// Live-migrate a VM to another host.
    VmMigrate {
        vm: String,
        /// The destination; by default the scheduler chooses.
        #[arg(long)]
        host: Option<String>,
        /// Downtime budget in milliseconds.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u32,
    },
    /// The VM's metadata and crash-consistent snapshots of all its disks, together.
    VmSnapshot { vm: String, name: String },
    /// Snapshots of a VM.
    VmSnapshotList { vm: String },
    /// Put a stopped VM back as it was at one of its snapshots (metadata and disks).
    VmRevert {
        vm: String,
        /// The snapshot's name or id.
        snapshot: String,
    },
    /// A new VM with the spec of this one and clones of its disks.
    VmClone { vm: String, name: String },
    /// Stream a VM's serial console (Ctrl-] leaves).
    VmConsole { vm: String },
    /// Make a template of a stopped VM.
    TemplateCreate { name: String, vm: String },
    /// Templates VMs can be created from.
    TemplateList,
    /// Change pool settings; what is not given stays as it is.
    PoolSet {
        /// Seconds without heartbeats before a host counts as unreachable.
        #[arg(long)]
        heartbeat_timeout: Option<u32>,
        /// Default downtime budget of live migrations, in milliseconds.
        #[arg(long)]
        downtime_ms: Option<u32>,
    },
    /// Turn HA on: hosts that stop heartbeating are fenced and their VMs restarted.
    PoolHaEnable {
        /// Host failures to plan room for.
        #[arg(long, default_value_t = 1)]
        failures: u32,
        /// Seconds without heartbeats before a host counts as dead.
        #[arg(long, default_value_t = 15)]
        timeout: u32,
    },
    /// Log in and print a token for --token / POOLCTL_TOKEN / the config file.
    Login {
        user: String,
        #[arg(long, env = "POOLCTL_PASSWORD", hide_env_values = true)]
        password: String,
    },
    /// Add a user with a password and roles.
    UserAdd {
        name: String,
        #[arg(long, env = "POOLCTL_NEW_PASSWORD")]
        password: String,
        #[arg(long, value_parser = role)]
        role: Vec<pb::Role>,
    },
    /// Give a user one more role.
    RoleGrant {
        user: String,
        #[arg(value_parser = role)]
        role: pb::Role,
    },
    /// Who did what, when, and how it ended.
    AuditLog,
    /// Tasks (long operations) and their progress.
    TaskList,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Coordinator members to try, in order, to find the leader.
    #[serde(default)]
    coordinators: Vec<String>,
    /// Token from `Login`, sent on every call.
    token: Option<String>,
}

/// Sends one request (built once, so a retry on another member reuses its request id).
macro_rules! call {
    ($c:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $c.call(|mut p| {
            let req = req.clone();
            async move { p.$method(req).await }
        })
        .await
        .map_err($crate::explain)
    }};
}

mod lab;
mod transfer;

/// `--ha`, checked while the arguments are parsed so a typo fails before any call.
fn ha_priority(name: &str) -> anyhow::Result<i32> {
    Ok(match name {
        "none" => pb::HaRestartPriority::None,
        "best-effort" => pb::HaRestartPriority::BestEffort,
        "restart" => pb::HaRestartPriority::Restart,
        _ => bail!("use none, best-effort or restart"),
    } as i32)
}

/// Turns a gRPC status into an error that says what to do.
fn explain(s: tonic::Status) -> anyhow::Error {
    let hint = match s.code() {
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => {
            "\nhint: no coordinator answered; is the pool running (poolctl lab) and --pool right?"
        }
        tonic::Code::Unauthenticated => "\nhint: log in and pass the token (config file `token`)",
        tonic::Code::PermissionDenied => "\nhint: your role does not allow this; ask a pool-admin",
        tonic::Code::Unimplemented => "\nnote: this coordinator does not offer that yet",
        _ => "",
    };
    anyhow::anyhow!("{:?}: {}{hint}", s.code(), s.message())
}

fn ts(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| {
            let secs = u64::try_from(t.seconds).ok()?;
            let age = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_secs()
                .saturating_sub(secs);
            Some(match age {
                0..=59 => format!("{age}s ago"),
                60..=3599 => format!("{}m ago", age / 60),
                3600..=86399 => format!("{}h ago", age / 3600),
                _ => format!("{}d ago", age / 86400),
            })
        })
        .unwrap_or_else(|| "-".into())
}

fn enum_name(name: Option<&str>, prefix: &str) -> String {
    name.map(|n| {
        n.trim_start_matches(prefix)
            .to_lowercase()
            .replace('_', "-")
    })
    .unwrap_or_else(|| "?".into())
}

fn host_state(v: i32) -> String {
    enum_name(
        pb::HostState::try_from(v).ok().map(|s| s.as_str_name()),
        "HOST_STATE_",
    )
}

fn power(v: i32) -> String {
    enum_name(
        hpb::PowerState::try_from(v).ok().map(|s| s.as_str_name()),
        "POWER_STATE_",
    )
}

fn task_state(v: i32) -> String {
    enum_name(
        pb::TaskState::try_from(v).ok().map(|s| s.as_str_name()),
        "TASK_STATE_",
    )
}

fn role(name: &str) -> anyhow::Result<pb::Role> {
    let want = format!("ROLE_{}", name.to_uppercase().replace('-', "_"));
    pb::Role::from_str_name(&want).filter(|r| *r != pb::Role::Unspecified).with_context(|| {
        format!("unknown role {name:?}: pool-admin, pool-operator, vm-admin, vm-operator or read-only")
    })
}

struct Ctl {
    client: PoolClient,
    json: bool,
    wait: bool,
}

impl Ctl {
    fn print(&self, t: &Table) {
        print!("{}", t.render(self.json));
    }

    /// Shows the task a change started and, unless told not to, follows it to its end.
    async fn follow(&mut self, resp: pb::TaskResponse) -> anyhow::Result<pb::Task> {
        let mut task = resp
            .task
            .context("the coordinator answered without a task")?;
        let finished = |t: &pb::Task| {
            matches!(
                pb::TaskState::try_from(t.state),
                Ok(pb::TaskState::Succeeded | pb::TaskState::Failed | pb::TaskState::Cancelled)
            )
        };
        let mut bar = Progress::new();
        while self.wait && !finished(&task) {
            if !self.json {
                bar.show(task.progress_percent, &task.status_message);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
            task = call!(
                self.client,
                get_task,
                pb::GetTaskRequest {
                    task_id: task.id.clone()
                }
            )?;
        }
        bar.done();
        if pb::TaskState::try_from(task.state) == Ok(pb::TaskState::Failed) {
            bail!(
                "task {} ({}) failed: {}: {}",
                task.id,
                task.kind,
                task.error_code,
                task.error_message
            );
        }
        if self.json {
            let mut t = Table::new(&["TASK", "KIND", "STATE", "TARGET"]);
            t.row(vec![
                task.id.clone().into(),
                task.kind.clone().into(),
                task_state(task.state).into(),
                task.target_id.clone().into(),
            ]);
            self.print(&t);
        } else {
            println!(
                "{} {} ({}) {}",
                task.kind,
                task_state(task.state),
                task.id,
                task.target_id
            );
        }
        Ok(task)
    }

    async fn hosts(&mut self) -> anyhow::Result<Vec<pb::Host>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_hosts,
                pb::ListHostsRequest {
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                    state: 0,
                }
            )?;
            out.extend(r.hosts);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    async fn vms(&mut self) -> anyhow::Result<Vec<pb::Vm>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_vms,
                pb::ListVmsRequest {
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                    host_id: String::new(),
                }
            )?;
            out.extend(r.vms);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    /// Creates a disk and follows its task to the end.
    async fn create_vdi(&mut self, sr: &str, name: String, size: u64) -> anyhow::Result<pb::Task> {
        let sr_id = self.sr_id(sr).await?;
        let r = call!(
            self.client,
            create_volume,
            pb::CreateVolumeRequest {
                request_id: new_request_id(),
                sr_id,
                name,
                virtual_size_bytes: size,
                labels: Default::default(),
            }
        )?;
        self.follow(r).await
    }

    async fn vm_snapshots(&mut self, vm_id: &str) -> anyhow::Result<Vec<pb::VmSnapshot>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_vm_snapshots,
                pb::ListVmSnapshotsRequest {
                    vm_id: vm_id.to_owned(),
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                }
            )?;
            out.extend(r.snapshots);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    async fn srs(&mut self) -> anyhow::Result<Vec<pb::StorageRepository>> {
        let r = call!(
            self.client,
            list_storage_repositories,
            pb::ListStorageRepositoriesRequest {
                page: Some(pb::PageRequest {
                    page_size: 1000,
                    page_token: String::new()
                }),
            }
        )?;
        Ok(r.repositories)
    }

    async fn vdis(&mut self, sr: &str) -> anyhow::Result<Vec<proto::storage::Volume>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_volumes,
                pb::ListVolumesRequest {
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                    sr_id: sr.to_owned(),
                }
            )?;
            out.extend(r.volumes);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    async fn host_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let hosts = self.hosts().await?;
        pick(
            hosts.iter().map(|h| (h.id.as_str(), h.name.as_str())),
            name_or_id,
            "host",
        )
    }

    async fn vm_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let vms = self.vms().await?;
        pick(
            vms.iter().map(|v| {
                (
                    v.id.as_str(),
                    v.spec.as_ref().map_or("", |s| s.name.as_str()),
                )
            }),
            name_or_id,
            "VM",
        )
    }

    async fn sr_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let srs = self.srs().await?;
        pick(
            srs.iter().map(|s| (s.id.as_str(), s.name.as_str())),
            name_or_id,
            "storage repository",
        )
    }

    async fn vdi_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let vdis = self.vdis("").await?;
        pick(
            vdis.iter().map(|v| (v.id.as_str(), v.name.as_str())),
            name_or_id,
            "disk",
        )
    }

    async fn template_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let r = call!(
            self.client,
            list_templates,
            pb::ListTemplatesRequest { page: None }
        )?;
        pick(
            r.templates.iter().map(|t| (t.id.as_str(), t.name.as_str())),
            name_or_id,
            "template",
        )
    }
}

/// The id of the one object whose id or name is `key`.
fn pick<'a>(
    items: impl Iterator<Item = (&'a str, &'a str)>,
    key: &str,
    what: &str,
) -> anyhow::Result<String> {
    let matches: Vec<&str> = items
        .filter(|(id, name)| *id == key || *name == key)
        .map(|(id, _)| id)
        .collect();
    match matches.as_slice() {
        [one] => Ok((*one).to_owned()),
        [] => bail!(
            "no {what} named {key:?}; list them with poolctl {}-list",
            what_verb(what)
        ),
        many => bail!(
            "{} {what}s are named {key:?}; use an id: {}",
            many.len(),
            many.join(", ")
        ),
    }
}

fn what_verb(what: &str) -> &'static str {
    match what {
        "host" => "host",
        "VM" => "vm",
        "disk" => "vdi",
        "template" => "template",
        _ => "sr",
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let config: Config = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        }
        None => Config::default(),
    };
    if let Command::Lab(lab) = args.command {
        return lab::lab(lab);
    }
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
    let token = args.token.clone().or(config.token.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let mut client = PoolClient::new(&members);
        if let Some(t) = &token {
            client.set_token(t.trim())?;
        }
        client.find_leader().await;
        let mut ctl = Ctl {
            client,
            json: args.json,
            wait: !args.no_wait,
        };
        run(&mut ctl, args.command).await
    })
}

async fn run(ctl: &mut Ctl, command: Command) -> anyhow::Result<()> {
    match command {
        Command::Lab(_) => bail!("poolctl lab runs on its own, not against a pool"),
        Command::MemberList => {
            let r = call!(ctl.client, list_members, pb::ListMembersRequest {})?;
            let mut t = Table::new(&["ID", "ADDRESS", "ROLE", "LEADER", "REACHABLE"]);
            for m in r.members {
                let role = enum_name(
                    pb::MemberRole::try_from(m.role)
                        .ok()
                        .map(|r| r.as_str_name()),
                    "MEMBER_ROLE_",
                );
                t.row(vec![
                    m.id.into(),
                    m.address.into(),
                    role.into(),
                    m.leader.into(),
                    m.reachable.into(),
                ]);
            }
            ctl.print(&t);
        }
        Command::MemberTransfer { member } => {
            let r = call!(
                ctl.client,
                transfer_leadership,
                pb::TransferLeadershipRequest { member_id: member }
            )?;
            let mut t = Table::new(&["LEADER", "TERM"]);
            t.row(vec![r.leader_id.into(), r.term.into()]);
            ctl.print(&t);
        }
        Command::HostList => {
            let hosts = ctl.hosts().await?;
            let mut t = Table::new(&[
                "ID",
                "NAME",
                "ADDRESS",
                "STATE",
                "VMS",
                "MEMORY USED",
                "MEMORY",
                "HEARTBEAT",
            ]);
            for h in hosts {
                let total = h.info.as_ref().map_or(0, |i| i.memory_total_bytes);
                t.row(vec![
                    h.id.into(),
                    h.name.into(),
                    h.address.into(),
                    host_state(h.state).into(),
                    (h.vm_ids.len() as u64).into(),
                    human_bytes(h.memory_allocated_bytes).into(),
                    human_bytes(total).into(),
                    ts(&h.last_heartbeat_at).into(),
                ]);
            }
            ctl.print(&t);
        }
        Command::HostJoin { name, address } => {
            let r = call!(
                ctl.client,
                join_host,
                pb::JoinHostRequest {
                    request_id: new_request_id(),
                    name,
                    address
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::HostEnable { host } => {
            let req = pb::HostRef {
                request_id: new_request_id(),
                host_id: ctl.host_id(&host).await?,
            };
            let r = call!(ctl.client, enable_host, req)?;
            ctl.follow(r).await?;
        }
        Command::HostDisable { host } => {
            let req = pb::HostRef {
                request_id: new_request_id(),
                host_id: ctl.host_id(&host).await?,
            };
            let r = call!(ctl.client, disable_host, req)?;
            ctl.follow(r).await?;
        }
        Command::HostEvacuate { host } => {
            let req = pb::HostRef {
                request_id: new_request_id(),
                host_id: ctl.host_id(&host).await?,
            };
            let r = call!(ctl.client, evacuate_host, req)?;
            ctl.follow(r).await?;
        }
        Command::SrCreate {
            name,
            address,
            thin_pool,
            file,
            size,
        } => {
            let create_pool = file.map(|f| proto::storage::CreatePoolRequest {
                name: name.clone(),
                backing_kind: proto::storage::BackingKind::File as i32,
                backing_path: f,
                size_bytes: size.unwrap_or(0),
                chunk_size_bytes: 0,
                warning_threshold_percent: 0,
            });
            if thin_pool.is_none() && create_pool.is_none() {
                bail!(
                    "give --thin-pool (an existing pool of that storaged) or --file and --size (a new one)"
                );
            }
            let r = call!(
                ctl.client,
                create_storage_repository,
                pb::CreateStorageRepositoryRequest {
                    request_id: new_request_id(),
                    name,
                    address,
                    thin_pool_id: thin_pool.unwrap_or_default(),
                    create_pool,
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::SrList => {
            let srs = ctl.srs().await?;
            let mut t = Table::new(&[
                "ID",
                "NAME",
                "ADDRESS",
                "USED",
                "SIZE",
                "PROVISIONED",
                "REACHABLE",
            ]);
            for s in srs {
                let u = s.usage.unwrap_or_default();
                t.row(vec![
                    s.id.into(),
                    s.name.into(),
                    s.address.into(),
                    human_bytes(u.used_bytes).into(),
                    human_bytes(u.total_bytes).into(),
                    human_bytes(u.provisioned_bytes).into(),
                    s.reachable.into(),
                ]);
            }
            ctl.print(&t);
        }
        Command::VdiCreate { name, sr, size } => {
            ctl.create_vdi(&sr, name, size).await?;
        }
        Command::VdiImport { file, name, sr } => {
            let len = std::fs::metadata(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            // Whole MiB: any block size divides it.
            let size = len.div_ceil(1 << 20).max(1) << 20;
            let task = ctl.create_vdi(&sr, name, size).await?;
            transfer::import(&mut ctl.client, &task.target_id, &file).await?;
            eprintln!("imported {} ({len} bytes)", file.display());
        }
        Command::VdiExport { vdi, file } => {
            let volume_id = ctl.vdi_id(&vdi).await?;
            transfer::export(&mut ctl.client, &volume_id, &file).await?;
            eprintln!("exported to {}", file.display());
        }
        Command::VdiList { sr } => {
            let sr_id = match sr {
                Some(s) => ctl.sr_id(&s).await?,
                None => String::new(),
            };
            let vdis = ctl.vdis(&sr_id).await?;
            let mut t = Table::new(&[
                "ID",
                "NAME",
                "KIND",
                "SIZE",
                "ALLOCATED",
                "EXCLUSIVE",
                "ORIGIN",
            ]);
            for v in vdis {
                let kind = enum_name(
                    proto::storage::VolumeKind::try_from(v.kind)
                        .ok()
                        .map(|k| k.as_str_name()),
                    "VOLUME_KIND_",
                );
                t.row(vec![
                    v.id.into(),
                    v.name.into(),
                    kind.into(),
                    human_bytes(v.virtual_size_bytes).into(),
                    human_bytes(v.allocated_bytes).into(),
                    human_bytes(v.exclusive_bytes).into(),
                    v.origin_id.into(),
                ]);
            }
            ctl.print(&t);
        }
        Command::VdiSnapshot { vdi, name } => {
            let volume_id = ctl.vdi_id(&vdi).await?;
            let r = call!(
                ctl.client,
                snapshot_volume,
                pb::SnapshotVolumeRequest {
                    request_id: new_request_id(),
                    volume_id,
                    name
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VdiClone { vdi, name } => {
            let source_id = ctl.vdi_id(&vdi).await?;
            let r = call!(
                ctl.client,
                clone_volume,
                pb::CloneVolumeRequest {
                    request_id: new_request_id(),
                    source_id,
                    name
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VdiRevert { vdi, snapshot } => {
            let volume_id = ctl.vdi_id(&vdi).await?;
            let snapshot_id = ctl.vdi_id(&snapshot).await?;
            let r = call!(
                ctl.client,
                revert_volume,
                pb::RevertVolumeRequest {
                    request_id: new_request_id(),
                    volume_id,
                    snapshot_id
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VdiDestroy { vdi } => {
            let volume_id = ctl.vdi_id(&vdi).await?;
            let r = call!(
                ctl.client,
                delete_volume,
                pb::DeleteVolumeRequest {
                    request_id: new_request_id(),
                    volume_id
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VmCreate {
            name,
            template,
            disk,
            vcpus,
            memory,
            kernel,
            cmdline,
            start,
            ha,
            ha_order,
        } => {
            let mut disks = Vec::new();
            for (i, d) in disk.iter().enumerate() {
                disks.push(pb::VmDisk {
                    disk_id: format!("vd{}", (b'a' + i as u8) as char),
                    volume_id: ctl.vdi_id(d).await?,
                    read_only: false,
                });
            }
            let source = match template {
                Some(t) => Some(pb::create_vm_request::Source::TemplateId(
                    ctl.template_id(&t).await?,
                )),
                None => Some(pb::create_vm_request::Source::FromDisks(true)),
            };
            let spec = pb::VmSpec {
                name,
                vcpus,
                memory_bytes: memory,
                boot: kernel.map(|k| hpb::BootSource {
                    kernel_path: k,
                    initrd_path: String::new(),
                    command_line: cmdline,
                    protocol: hpb::BootProtocol::Auto as i32,
                }),
                disks,
                ha_priority: ha,
                ha_order,
                ..Default::default()
            };
            let r = call!(
                ctl.client,
                create_vm,
                pb::CreateVmRequest {
                    request_id: new_request_id(),
                    spec: Some(spec),
                    source,
                    sr_id: String::new(),
                    start,
                    host_id: String::new(),
                }
            )?;
            let task = ctl.follow(r).await?;
            // A VM made from a template is created, placed and started by a job that clones
            // its disks first; when no host has room it is created stopped.
            if let Some(note) = task
                .results
                .get("start")
                .filter(|n| n.starts_with("not started"))
            {
                eprintln!("{note}\nhint: free room on a host, then `poolctl vm-start`");
            }
        }
        Command::VmSet {
            vm,
            vcpus,
            memory,
            cmdline,
            ha,
            ha_order,
        } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let current = ctl.vms().await?.into_iter().find(|v| v.id == vm_id);
            let mut spec = current
                .and_then(|v| v.spec)
                .with_context(|| format!("VM {vm} has no spec"))?;
            if let Some(n) = vcpus {
                spec.vcpus = n;
            }
            if let Some(m) = memory {
                spec.memory_bytes = m;
            }
            if let Some(h) = ha {
                spec.ha_priority = h;
            }
            if let Some(o) = ha_order {
                spec.ha_order = o;
            }
            if let Some(c) = cmdline {
                spec.boot
                    .as_mut()
                    .context("the VM has no kernel to give a command line to")?
                    .command_line = c;
            }
            let r = call!(
                ctl.client,
                update_vm,
                pb::UpdateVmRequest {
                    request_id: new_request_id(),
                    vm_id,
                    spec: Some(spec)
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VmList => {
            let vms = ctl.vms().await?;
            let mut t = Table::new(&[
                "ID", "NAME", "POWER", "WANTED", "HOST", "VCPUS", "MEMORY", "DISKS",
            ]);
            for v in vms {
                let spec = v.spec.unwrap_or_default();
                let disks: Vec<&str> = spec.disks.iter().map(|d| d.volume_id.as_str()).collect();
                t.row(vec![
                    v.id.into(),
                    spec.name.into(),
                    power(v.power_state).into(),
                    power(v.desired_power_state).into(),
                    v.host_id.into(),
                    spec.vcpus.into(),
                    human_bytes(spec.memory_bytes).into(),
                    disks.join(",").into(),
                ]);
            }
            ctl.print(&t);
        }
        Command::VmStart { vm, host } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let host_id = match host {
                Some(h) => ctl.host_id(&h).await?,
                None => String::new(),
            };
            let r = call!(
                ctl.client,
                start_vm,
                pb::VmPowerRequest {
                    request_id: new_request_id(),
                    vm_id,
                    force: false,
                    host_id
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VmShutdown { vm, force } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                shutdown_vm,
                pb::VmPowerRequest {
                    request_id: new_request_id(),
                    vm_id,
                    force,
                    host_id: String::new()
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VmReboot { vm, force } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                reboot_vm,
                pb::VmPowerRequest {
                    request_id: new_request_id(),
                    vm_id,
                    force,
                    host_id: String::new()
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VmDestroy { vm, delete_disks } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                destroy_vm,
                pb::DestroyVmRequest {
                    request_id: new_request_id(),
                    vm_id,
                    delete_disks
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VmMigrate {
            vm,
            host,
            downtime_ms,
        } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let destination_host_id = match host {
                Some(h) => ctl.host_id(&h).await?,
                None => String::new(),
            };
            let r = call!(
                ctl.client,
                migrate_vm,
                pb::MigrateVmRequest {
                    request_id: new_request_id(),
                    vm_id,
                    destination_host_id,
                    downtime_budget_ms: downtime_ms,
                    auto_converge: true,
                }
            )?;
            let task = ctl.follow(r).await?;
            if let Some(d) = task.results.get("downtime_ms") {
                println!("downtime {d} ms");
            }
        }
        Command::VmSnapshot { vm, name } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                snapshot_vm,
                pb::SnapshotVmRequest {
                    request_id: new_request_id(),
                    vm_id,
                    name
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VmSnapshotList { vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let mut t = Table::new(&["ID", "NAME", "DISKS", "CREATED"]);
            for s in ctl.vm_snapshots(&vm_id).await? {
                t.row(vec![
                    s.id.into(),
                    s.name.into(),
                    (s.disk_snapshots.len() as u64).into(),
                    ts(&s.created_at).into(),
                ]);
            }
            ctl.print(&t);
        }
        Command::VmRevert { vm, snapshot } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let snaps = ctl.vm_snapshots(&vm_id).await?;
            let snapshot_id = pick(
                snaps.iter().map(|s| (s.id.as_str(), s.name.as_str())),
                &snapshot,
                "snapshot of this VM",
            )?;
            let r = call!(
                ctl.client,
                revert_vm,
                pb::RevertVmRequest {
                    request_id: new_request_id(),
                    vm_id,
                    snapshot_id
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VmClone { vm, name } => {
            let source_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                clone_vm,
                pb::CloneVmRequest {
                    request_id: new_request_id(),
                    source_id,
                    name
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::VmConsole { vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            console(ctl, vm_id).await?;
        }
        Command::TemplateCreate { name, vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                create_template,
                pb::CreateTemplateRequest {
                    request_id: new_request_id(),
                    name,
                    source: Some(pb::create_template_request::Source::VmId(vm_id)),
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::TemplateList => {
            let r = call!(
                ctl.client,
                list_templates,
                pb::ListTemplatesRequest { page: None }
            )?;
            let mut t = Table::new(&["ID", "NAME", "VCPUS", "MEMORY", "DISKS"]);
            for tpl in r.templates {
                let spec = tpl.spec.unwrap_or_default();
                t.row(vec![
                    tpl.id.into(),
                    tpl.name.into(),
                    spec.vcpus.into(),
                    human_bytes(spec.memory_bytes).into(),
                    (tpl.disk_volumes.len() as u64).into(),
                ]);
            }
            ctl.print(&t);
        }
        Command::PoolSet {
            heartbeat_timeout,
            downtime_ms,
        } => {
            let pool = call!(ctl.client, get_pool, pb::GetPoolRequest {})?;
            let mut settings = pool.settings.unwrap_or_default();
            if let Some(t) = heartbeat_timeout {
                settings.host_heartbeat_timeout_seconds = t;
            }
            if let Some(d) = downtime_ms {
                settings.migration_downtime_budget_ms = d;
            }
            let r = call!(
                ctl.client,
                update_pool_settings,
                pb::UpdatePoolSettingsRequest {
                    request_id: new_request_id(),
                    settings: Some(settings),
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::PoolHaEnable { failures, timeout } => {
            let r = call!(
                ctl.client,
                set_ha_settings,
                pb::SetHaSettingsRequest {
                    request_id: new_request_id(),
                    settings: Some(pb::HaSettings {
                        enabled: true,
                        host_failures_to_tolerate: failures,
                        failure_timeout_seconds: timeout
                    }),
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::Login { user, password } => {
            let r = call!(
                ctl.client,
                login,
                pb::LoginRequest {
                    user_name: user,
                    password
                }
            )?;
            if ctl.json {
                println!("{{\"token\": {}}}", output::json_string(&r.token));
            } else {
                println!("{}", r.token);
                eprintln!("pass it as --token, POOLCTL_TOKEN or `token` in the config file");
            }
        }
        Command::UserAdd {
            name,
            password,
            role: roles,
        } => {
            let roles = roles.into_iter().map(|r| r as i32).collect();
            let r = call!(
                ctl.client,
                create_user,
                pb::CreateUserRequest {
                    request_id: new_request_id(),
                    name,
                    password,
                    roles
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::RoleGrant { user, role } => {
            let role = role as i32;
            let users = call!(ctl.client, list_users, pb::ListUsersRequest { page: None })?;
            let user_id = pick(
                users.users.iter().map(|u| (u.id.as_str(), u.name.as_str())),
                &user,
                "user",
            )?;
            let r = call!(
                ctl.client,
                grant_role,
                pb::GrantRoleRequest {
                    request_id: new_request_id(),
                    user_id,
                    role
                }
            )?;
            ctl.follow(r).await?;
        }
        Command::AuditLog => {
            let r = call!(
                ctl.client,
                list_audit_events,
                pb::ListAuditEventsRequest::default()
            )?;
            let mut t = Table::new(&["WHEN", "USER", "METHOD", "TARGET", "RESULT"]);
            for e in r.events {
                t.row(vec![
                    ts(&e.at).into(),
                    e.user_name.into(),
                    e.method.into(),
                    e.target_id.into(),
                    e.result.into(),
                ]);
            }
            ctl.print(&t);
        }
        Command::TaskList => {
            let r = call!(ctl.client, list_tasks, pb::ListTasksRequest::default())?;
            let mut t = Table::new(&[
                "ID", "KIND", "STATE", "PROGRESS", "TARGET", "CREATED", "ERROR",
            ]);
            for task in r.tasks {
                t.row(vec![
                    task.id.into(),
                    task.kind.into(),
                    task_state(task.state).into(),
                    Value::Int(i128::from(task.progress_percent)),
                    task.target_id.into(),
                    ts(&task.created_at).into(),
                    task.error_message.into(),
                ]);
            }
            ctl.print(&t);
        }
    }
    Ok(())
}

/// Streams a VM's console to stdout and stdin to the VM until Ctrl-] or the stream ends.
async fn console(ctl: &mut Ctl, vm_id: String) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (tx, rx) = tokio::sync::mpsc::channel::<hpb::ConsoleInput>(16);
    tx.send(hpb::ConsoleInput {
        vm_id,
        data: Vec::new(),
        live_only: false,
    })
    .await?;
    // A console stream cannot be replayed on another member once it has started, so it
    // goes to one member (the leader found at start), without the client's retries.
    let mut p = ctl.client.current_api();
    let mut outputs = p
        .stream_vm_console(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .map_err(explain)?
        .into_inner();
    let mut stdout = tokio::io::stdout();
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            msg = outputs.message() => match msg.map_err(explain)? {
                Some(out) => {
                    stdout.write_all(&out.data).await?;
                    stdout.flush().await?;
                }
                None => return Ok(()),
            },
            n = stdin.read(&mut buf) => {
                let n = n?;
                if n == 0 || buf[..n].contains(&0x1d) {
                    return Ok(());
                }
                let _ = tx.send(hpb::ConsoleInput { vm_id: String::new(), data: buf[..n].to_vec(), live_only: false }).await;
            }
        }
    }
}
