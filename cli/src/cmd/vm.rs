//! `poolctl vm-*`: VMs: creating and changing them, power, migration, snapshots and the
//! console.

use std::collections::HashMap;

use anyhow::{Context, bail};
use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;
use proto::host as hpb;

use crate::ctl::{Ctl, call};
use crate::lookup::pick;
use crate::output::{Table, enum_name, human_bytes, parse_size, power, ts};

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Create a VM from a template or from existing disks.
    #[command(name = "vm-create")]
    Create {
        name: String,
        #[arg(long, conflicts_with = "disk")]
        template: Option<String>,
        /// Existing disks, in order (vda, vdb, ...).
        #[arg(long)]
        disk: Vec<String>,
        /// The disks in undo mode: the VM runs on a throwaway clone of each, whose changes
        /// vm-undo commits or discards once it is stopped.
        #[arg(long, requires = "disk")]
        undo: bool,
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        #[arg(long, value_parser = parse_size, default_value = "512M")]
        memory: u64,
        /// Kernel image on the hosts (vmlinux, bzImage or a PVH ELF such as guest/).
        #[arg(long)]
        kernel: Option<String>,
        /// Initramfs on the hosts, for a Linux kernel.
        #[arg(long, requires = "kernel")]
        initrd: Option<String>,
        /// How the kernel is entered: auto (PVH when an ELF has the note, else Linux's
        /// 64-bit entry), linux64 or pvh.
        #[arg(long, default_value = "auto", value_parser = boot_protocol, requires = "kernel")]
        boot: i32,
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
        /// A network (name or id) to give the VM an interface on; repeat for more, in
        /// device order. The pool assigns each a MAC.
        #[arg(long)]
        network: Vec<String>,
    },
    /// Change a VM's settings; what is not given stays as it is (vCPUs and memory only
    /// while it is stopped; a new command line takes effect at its next boot).
    #[command(name = "vm-set")]
    Set {
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
    /// Put a stopped VM's disk in undo mode or back in normal mode (not while it has
    /// pending undo changes).
    #[command(name = "vm-disk-mode")]
    DiskMode {
        vm: String,
        /// The disk's id (vda, vdb, ...).
        disk: String,
        #[arg(value_parser = ["normal", "undo"])]
        mode: String,
    },
    /// End a stopped VM's pending undo changes: commit them into its disks' volumes, or
    /// discard them (the volumes are then as before the VM's start).
    #[command(name = "vm-undo")]
    Undo {
        vm: String,
        #[arg(value_parser = ["commit", "discard"])]
        action: String,
    },
    /// VMs and where they run.
    #[command(name = "vm-list")]
    List {
        /// Show the host's id rather than its name, and each VIF's network and MAC
        /// (--json always does).
        #[arg(long)]
        long: bool,
    },
    /// One VM's fields, its saved state's volume among them while it is suspended.
    #[command(name = "vm-show")]
    Show { vm: String },
    /// Where the scheduler would place a VM, and why each host can or cannot take it.
    #[command(name = "vm-explain")]
    Explain { vm: String },
    /// Start a stopped VM.
    #[command(name = "vm-start")]
    Start {
        vm: String,
        /// On this host; by default the scheduler chooses.
        #[arg(long)]
        host: Option<String>,
    },
    /// Save a running VM's memory and device state into a state volume in its first
    /// disk's repository and stop it: it is suspended, on no host, until vm-resume. (A
    /// suspended VM is not started, shut down or live-migrated: resume or destroy it.)
    #[command(name = "vm-suspend")]
    Suspend { vm: String },
    /// Run a suspended VM on from where it was saved (its state volume is then deleted),
    /// or a paused one on.
    #[command(name = "vm-resume")]
    Resume {
        vm: String,
        /// Resume a suspended VM on this host; by default the scheduler chooses.
        #[arg(long)]
        host: Option<String>,
    },
    /// Ask the guest to power off (--force: stop it at once).
    #[command(name = "vm-shutdown")]
    Shutdown {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    /// Ask the guest to reboot (--force: reset it at once).
    #[command(name = "vm-reboot")]
    Reboot {
        vm: String,
        #[arg(long)]
        force: bool,
    },
    /// Remove a stopped VM (its disks stay unless --delete-disks).
    #[command(name = "vm-destroy")]
    Destroy {
        vm: String,
        /// Also delete its disks.
        #[arg(long)]
        delete_disks: bool,
    },
    /// Live-migrate a VM to another host.
    #[command(name = "vm-migrate")]
    Migrate {
        vm: String,
        /// The destination; by default the scheduler chooses.
        #[arg(long)]
        host: Option<String>,
        /// Downtime budget in milliseconds.
        #[arg(long, default_value_t = 300)]
        downtime_ms: u32,
        /// Quick migration, for hosts that cannot live-migrate: suspend here, resume
        /// there (the guest pauses for the save and the restore).
        #[arg(long)]
        quick: bool,
    },
    /// The VM's metadata and crash-consistent snapshots of all its disks, together.
    #[command(name = "vm-snapshot")]
    Snapshot { vm: String, name: String },
    /// A checkpoint of a running or paused VM: its memory and device state saved with
    /// snapshots of its disks at one instant, into its first disk's repository; it runs
    /// on after a short pause (printed). `vm-revert` to it starts it from there.
    #[command(name = "vm-checkpoint")]
    Checkpoint { vm: String, name: String },
    /// Snapshots of a VM, parents before their children: each one's parent is the
    /// snapshot the VM was at when it was taken; CURRENT marks where the VM is now.
    #[command(name = "vm-snapshot-list")]
    SnapshotList { vm: String },
    /// Delete a VM snapshot and its disk snapshots; its children take its parent.
    #[command(name = "vm-snapshot-delete")]
    SnapshotDelete {
        /// The snapshot's id, or its name when only one snapshot has it.
        snapshot: String,
    },
    /// Put a stopped VM back as it was at one of its snapshots (metadata and disks); to
    /// a checkpoint, it then runs on from the saved instant.
    #[command(name = "vm-revert")]
    Revert {
        vm: String,
        /// The snapshot's name or id.
        snapshot: String,
        /// For a checkpoint: the host it runs on (default: the scheduler's choice).
        #[arg(long)]
        host: Option<String>,
    },
    /// A new VM with the spec of this one and clones of its disks.
    #[command(name = "vm-clone")]
    Clone { vm: String, name: String },
    /// Stream a VM's serial console (Ctrl-] leaves).
    #[command(name = "vm-console")]
    Console { vm: String },
    /// A running VM's counters from its host's last heartbeat: the VM's own, each disk's
    /// and each network interface's (named as in pool.host.v1.VmMetrics).
    #[command(name = "vm-metrics")]
    Metrics { vm: String },
    /// Write a stopped VM, or one of its snapshots, as an OVA package: the OVF
    /// descriptor, each disk as a stream-optimized VMDK, a SHA-256 manifest.
    #[command(name = "vm-export")]
    Export {
        vm: String,
        file: std::path::PathBuf,
        /// Export this snapshot (name or id) of the VM instead; the VM may be running.
        #[arg(long)]
        snapshot: Option<String>,
    },
    /// Make a new VM, stopped, with new disks, from an OVA package whose manifest matches
    /// (its disks are copied into a private directory under $TMPDIR while checked).
    #[command(name = "vm-import")]
    Import {
        file: std::path::PathBuf,
        /// Default: the name in the package.
        #[arg(long)]
        name: Option<String>,
        /// The repository for its disks (default: the pool's only one).
        #[arg(long)]
        sr: Option<String>,
    },
}

pub async fn run(ctl: &mut Ctl, command: VmCommand) -> anyhow::Result<()> {
    let checkpoint = matches!(command, VmCommand::Checkpoint { .. });
    match command {
        VmCommand::Create {
            name,
            template,
            disk,
            undo,
            vcpus,
            memory,
            kernel,
            initrd,
            boot,
            cmdline,
            start,
            ha,
            ha_order,
            network,
        } => {
            let mut networks = Vec::new();
            for n in &network {
                networks.push(ctl.network_id(n).await?);
            }
            let mut disks = Vec::new();
            for (i, d) in disk.iter().enumerate() {
                disks.push(pb::VmDisk {
                    disk_id: format!("vd{}", (b'a' + i as u8) as char),
                    volume_id: ctl.vdi_id(d).await?,
                    read_only: false,
                    undo,
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
                    initrd_path: initrd.unwrap_or_default(),
                    command_line: cmdline,
                    protocol: boot,
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
                    networks,
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
        VmCommand::Set {
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
            update_spec(ctl, vm_id, spec).await?;
        }
        VmCommand::DiskMode { vm, disk, mode } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let current = ctl.vms().await?.into_iter().find(|v| v.id == vm_id);
            let mut spec = current
                .and_then(|v| v.spec)
                .with_context(|| format!("VM {vm} has no spec"))?;
            let d = spec
                .disks
                .iter_mut()
                .find(|d| d.disk_id == disk)
                .with_context(|| format!("VM {vm} has no disk {disk}"))?;
            d.undo = mode == "undo";
            update_spec(ctl, vm_id, spec).await?;
        }
        VmCommand::Undo { vm, action } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                undo_vm_changes,
                pb::UndoVmChangesRequest {
                    request_id: new_request_id(),
                    vm_id,
                    commit: action == "commit"
                }
            )?;
            ctl.follow(r).await?;
        }
        VmCommand::Metrics { vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let host_id = call!(
                ctl.client,
                get_vm,
                pb::GetVmRequest {
                    vm_id: vm_id.clone()
                }
            )?
            .host_id;
            let m = if host_id.is_empty() {
                None
            } else {
                call!(ctl.client, get_host, pb::GetHostRequest { host_id })?
                    .last_metrics
                    .and_then(|m| m.vms.into_iter().find(|m| m.vm_id == vm_id))
            };
            let Some(m) = m else {
                bail!(
                    "VM {vm} has no metrics: it is not running, or its host has not reported it yet"
                );
            };
            ctl.print(&metrics_table(&m));
        }
        VmCommand::List { long } => {
            let vms = ctl.vms().await?;
            let hosts = ctl.hosts().await?;
            ctl.print(&vm_table(vms, &hosts, long || ctl.json));
        }
        VmCommand::Explain { vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                explain_placement,
                pb::ExplainPlacementRequest { vm_id, spec: None }
            )?;
            let hosts = ctl.hosts().await?;
            let mut t = Table::new(&["HOST", "NAME", "ELIGIBLE", "CHOSEN", "REASONS"]);
            for h in r.hosts {
                let name = hosts
                    .iter()
                    .find(|x| x.id == h.host_id)
                    .map(|x| x.name.clone());
                t.row(vec![
                    h.host_id.clone().into(),
                    name.unwrap_or_default().into(),
                    h.eligible.into(),
                    (h.host_id == r.chosen_host_id).into(),
                    h.reasons.join("; ").into(),
                ]);
            }
            ctl.print(&t);
        }
        VmCommand::Start { vm, host } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let host_id = ctl.host_id_or_any(host.as_deref()).await?;
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
        VmCommand::Show { vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let v = call!(ctl.client, get_vm, pb::GetVmRequest { vm_id })?;
            let hosts = ctl.hosts().await?;
            ctl.print(&vm_fields(v, &hosts));
        }
        VmCommand::Suspend { vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                suspend_vm,
                pb::VmPowerRequest {
                    request_id: new_request_id(),
                    vm_id,
                    force: false,
                    host_id: String::new()
                }
            )?;
            let task = ctl.follow(r).await?;
            if let Some(v) = task.results.get("state_volume_id") {
                println!("saved in state volume {v}");
            }
        }
        VmCommand::Resume { vm, host } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let host_id = ctl.host_id_or_any(host.as_deref()).await?;
            let r = call!(
                ctl.client,
                resume_vm,
                pb::VmPowerRequest {
                    request_id: new_request_id(),
                    vm_id,
                    force: false,
                    host_id
                }
            )?;
            ctl.follow(r).await?;
        }
        VmCommand::Shutdown { vm, force } => {
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
        VmCommand::Reboot { vm, force } => {
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
        VmCommand::Destroy { vm, delete_disks } => {
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
        VmCommand::Migrate {
            vm,
            host,
            downtime_ms,
            quick,
        } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let destination_host_id = ctl.host_id_or_any(host.as_deref()).await?;
            let r = call!(
                ctl.client,
                migrate_vm,
                pb::MigrateVmRequest {
                    request_id: new_request_id(),
                    vm_id,
                    destination_host_id,
                    downtime_budget_ms: downtime_ms,
                    auto_converge: true,
                    quick,
                }
            )?;
            let task = ctl.follow(r).await?;
            if let Some(d) = task.results.get("downtime_ms") {
                println!("downtime {d} ms");
            }
        }
        VmCommand::Snapshot { vm, name } | VmCommand::Checkpoint { vm, name } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let r = call!(
                ctl.client,
                snapshot_vm,
                pb::SnapshotVmRequest {
                    request_id: new_request_id(),
                    vm_id,
                    name,
                    memory: checkpoint
                }
            )?;
            let task = ctl.follow(r).await?;
            if let Some(ms) = task.results.get("pause_ms") {
                println!("paused {ms} ms");
            }
        }
        VmCommand::SnapshotList { vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let current = call!(
                ctl.client,
                get_vm,
                pb::GetVmRequest {
                    vm_id: vm_id.clone()
                }
            )?
            .current_snapshot_id;
            let snaps = ctl.vm_snapshots(&vm_id).await?;
            ctl.print(&snapshot_table(snaps, &current, ctl.json));
        }
        VmCommand::SnapshotDelete { snapshot } => {
            let snaps = ctl.vm_snapshots("").await?;
            let snapshot_id = pick(
                snaps.iter().map(|s| (s.id.as_str(), s.name.as_str())),
                &snapshot,
                "VM snapshot",
            )?;
            let r = call!(
                ctl.client,
                delete_vm_snapshot,
                pb::DeleteVmSnapshotRequest {
                    request_id: new_request_id(),
                    snapshot_id
                }
            )?;
            ctl.follow(r).await?;
        }
        VmCommand::Revert { vm, snapshot, host } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let host_id = ctl.host_id_or_any(host.as_deref()).await?;
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
                    snapshot_id,
                    host_id
                }
            )?;
            ctl.follow(r).await?;
        }
        VmCommand::Clone { vm, name } => {
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
        VmCommand::Console { vm } => {
            let vm_id = ctl.vm_id(&vm).await?;
            crate::console::console(ctl, vm_id).await?;
        }
        VmCommand::Export { vm, file, snapshot } => {
            crate::image::vm::export(ctl, &vm, snapshot.as_deref(), &file).await?;
            eprintln!("exported {vm} to {}", file.display());
        }
        VmCommand::Import { file, name, sr } => {
            let args = crate::image::vm::ImportArgs {
                file: &file,
                name,
                sr,
            };
            let id = crate::image::vm::import(ctl, args).await?;
            println!("{id}");
        }
    }
    Ok(())
}

/// `--ha`, checked while the arguments are parsed so a typo fails before any call.
fn boot_protocol(s: &str) -> Result<i32, String> {
    Ok(match s {
        "auto" => hpb::BootProtocol::Auto,
        "linux64" => hpb::BootProtocol::Linux64,
        "pvh" => hpb::BootProtocol::Pvh,
        other => return Err(format!("{other:?}: one of auto, linux64, pvh")),
    } as i32)
}

fn ha_priority(name: &str) -> anyhow::Result<i32> {
    Ok(match name {
        "none" => pb::HaRestartPriority::None,
        "best-effort" => pb::HaRestartPriority::BestEffort,
        "restart" => pb::HaRestartPriority::Restart,
        _ => bail!("use none, best-effort or restart"),
    } as i32)
}

/// Why a VM last stopped ("guest-poweroff", "forced"), or "-".
fn stop_reason(reason: i32) -> String {
    match hpb::StopReason::try_from(reason) {
        Ok(hpb::StopReason::Unspecified | hpb::StopReason::None) => "-".into(),
        r => enum_name(r.ok().map(|r| r.as_str_name()), "STOP_REASON_"),
    }
}

/// The vm-list table. Where a VM runs reads as the host's name for people, and as its id
/// with `ids` (`--long`, `--json`), which scripts match against `host-list`.
fn vm_table(vms: Vec<pb::Vm>, hosts: &[pb::Host], ids: bool) -> Table {
    let names: HashMap<&str, &str> = hosts
        .iter()
        .map(|h| (h.id.as_str(), h.name.as_str()))
        .collect();
    let mut columns = vec![
        "ID", "NAME", "POWER", "WANTED", "HOST", "VCPUS", "MEMORY", "DISKS", "STOPPED",
    ];
    if ids {
        columns.push("VIFS");
        columns.push("UNDO");
    }
    let mut t = Table::new(&columns);
    for v in vms {
        let vifs = super::net::vifs_cell(&v.vifs);
        let undo = undo_cell(&v);
        let spec = v.spec.unwrap_or_default();
        let disks: Vec<&str> = spec.disks.iter().map(|d| d.volume_id.as_str()).collect();
        let host = match names.get(v.host_id.as_str()) {
            Some(name) if !ids && !name.is_empty() => (*name).to_owned(),
            _ => v.host_id,
        };
        let mut row = vec![
            v.id.into(),
            spec.name.into(),
            power(v.power_state).into(),
            power(v.desired_power_state).into(),
            host.into(),
            spec.vcpus.into(),
            human_bytes(spec.memory_bytes).into(),
            disks.join(",").into(),
            stop_reason(v.last_stop_reason).into(),
        ];
        if ids {
            row.push(vifs.into());
            row.push(undo.into());
        }
        t.row(row);
    }
    t
}

/// Each undo disk and whether it has changes pending ("vda:pending,vdb:none").
fn undo_cell(v: &pb::Vm) -> String {
    let disks = v.spec.iter().flat_map(|s| &s.disks).filter(|d| d.undo);
    disks
        .map(|d| {
            let pending = v.undo_overlays.iter().any(|o| o.disk_id == d.disk_id);
            format!("{}:{}", d.disk_id, if pending { "pending" } else { "none" })
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// vm-show: one row per field, the host by name.
fn vm_fields(v: pb::Vm, hosts: &[pb::Host]) -> Table {
    let undo = undo_cell(&v);
    let overlays: Vec<String> = v
        .undo_overlays
        .iter()
        .map(|o| format!("{}={}", o.disk_id, o.volume_id))
        .collect();
    let spec = v.spec.unwrap_or_default();
    let host = hosts
        .iter()
        .find(|h| h.id == v.host_id)
        .map_or(v.host_id.clone(), |h| h.name.clone());
    let disks: Vec<String> = spec
        .disks
        .iter()
        .map(|d| {
            let mode = if d.undo { " (undo)" } else { "" };
            format!("{}={}{mode}", d.disk_id, d.volume_id)
        })
        .collect();
    let mut t = Table::new(&["FIELD", "VALUE"]);
    for (k, val) in [
        ("id", v.id),
        ("name", spec.name),
        ("power", power(v.power_state)),
        ("wanted", power(v.desired_power_state)),
        ("host", host),
        ("vcpus", spec.vcpus.to_string()),
        ("memory", human_bytes(spec.memory_bytes)),
        ("disks", disks.join(",")),
        ("undo_disks", undo),
        ("undo_overlays", overlays.join(",")),
        ("stopped", stop_reason(v.last_stop_reason)),
        ("started", ts(&v.started_at)),
        ("state_volume", v.state_volume_id),
        ("current_snapshot", v.current_snapshot_id),
        ("created", ts(&v.created_at)),
    ] {
        t.row(vec![k.into(), val.into()]);
    }
    t
}

/// vm-metrics: one row per counter, `DEVICE` empty for the VM's own, the counters' names
/// those of the proto (so scripts read them as the pool's API names them).
fn metrics_table(m: &hpb::VmMetrics) -> Table {
    let mut t = Table::new(&["DEVICE", "METRIC", "VALUE"]);
    let mut add = |device: &str, metric: &str, value: crate::output::Value| {
        t.row(vec![device.into(), metric.into(), value]);
    };
    add("", "at", ts(&m.at).into());
    add("", "vcpu_time_ns", m.vcpu_time_ns.into());
    add("", "rss_bytes", m.rss_bytes.into());
    add("", "guest_resident_bytes", m.guest_resident_bytes.into());
    for d in &m.disks {
        for (name, v) in [
            ("read_ops", d.read_ops),
            ("write_ops", d.write_ops),
            ("flush_ops", d.flush_ops),
            ("discard_ops", d.discard_ops),
            ("read_bytes", d.read_bytes),
            ("write_bytes", d.write_bytes),
            ("read_latency_us", d.read_latency_us),
            ("write_latency_us", d.write_latency_us),
            ("read_time_us", d.read_time_us),
            ("write_time_us", d.write_time_us),
            ("errors", d.errors),
        ] {
            add(&d.disk_id, name, v.into());
        }
    }
    for n in &m.nics {
        add(&n.nic_id, "mac", n.mac.as_str().into());
        for (name, v) in [
            ("rx_packets", n.rx_packets),
            ("rx_bytes", n.rx_bytes),
            ("rx_dropped", n.rx_dropped),
            ("tx_packets", n.tx_packets),
            ("tx_bytes", n.tx_bytes),
            ("tx_dropped", n.tx_dropped),
            ("tx_spoofed", n.tx_spoofed),
            ("tx_throttled", n.tx_throttled),
            ("rx_errors", n.rx_errors),
            ("tx_errors", n.tx_errors),
            ("invalid", n.invalid),
            ("announces", n.announces),
            ("tx_batched", n.tx_batched),
        ] {
            add(&n.nic_id, name, v.into());
        }
    }
    t
}

/// A VM's snapshots as a tree: depth first from the roots, siblings oldest first; for
/// people each name is indented under its parent's, for scripts PARENT says it.
/// Replaces VM `vm_id`'s spec (the VM stopped) and follows the task.
async fn update_spec(ctl: &mut Ctl, vm_id: String, spec: pb::VmSpec) -> anyhow::Result<()> {
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
    Ok(())
}

fn snapshot_table(snaps: Vec<pb::VmSnapshot>, current: &str, json: bool) -> Table {
    let known: std::collections::HashSet<&str> = snaps.iter().map(|s| s.id.as_str()).collect();
    let mut children: HashMap<&str, Vec<&pb::VmSnapshot>> = HashMap::new();
    for s in &snaps {
        // A parent outside the listing: shown as a root.
        let parent = if known.contains(s.parent_id.as_str()) {
            s.parent_id.as_str()
        } else {
            ""
        };
        children.entry(parent).or_default().push(s);
    }
    let created = |s: &pb::VmSnapshot| {
        s.created_at
            .as_ref()
            .map_or((0, 0), |t| (t.seconds, t.nanos))
    };
    for list in children.values_mut() {
        list.sort_by_key(|s| (created(s), s.id.clone()));
    }
    let mut t = Table::new(&[
        "ID", "NAME", "PARENT", "CURRENT", "DISKS", "MEMORY", "CREATED", "SCHEDULE",
    ]);
    let mut stack: Vec<(&pb::VmSnapshot, usize)> = children
        .get("")
        .map(|l| l.iter().rev().map(|s| (*s, 0)).collect())
        .unwrap_or_default();
    while let Some((s, depth)) = stack.pop() {
        let name = if json {
            s.name.clone()
        } else {
            format!("{}{}", "  ".repeat(depth), s.name)
        };
        t.row(vec![
            s.id.clone().into(),
            name.into(),
            s.parent_id.clone().into(),
            (s.id == current).into(),
            (s.disk_snapshots.len() as u64).into(),
            // A checkpoint: reverting to it runs the VM on from there.
            (!s.state_volume_id.is_empty()).into(),
            ts(&s.created_at).into(),
            // Taken by a schedule, whose retention may delete it.
            s.schedule.clone().into(),
        ]);
        if let Some(kids) = children.get(s.id.as_str()) {
            stack.extend(kids.iter().rev().map(|k| (*k, depth + 1)));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::Value;

    #[test]
    fn vm_metrics_name_each_counter_by_its_device_and_proto_field() {
        let m = hpb::VmMetrics {
            vm_id: "a".into(),
            vcpu_time_ns: 7,
            disks: vec![hpb::DiskMetrics {
                disk_id: "vda".into(),
                read_ops: 3,
                ..Default::default()
            }],
            nics: vec![hpb::NicMetrics {
                nic_id: "eth0".into(),
                mac: "02:00:00:00:00:01".into(),
                tx_spoofed: 20,
                tx_dropped: 21,
                ..Default::default()
            }],
            ..Default::default()
        };
        let t = metrics_table(&m);
        let get = |device: &str, metric: &str| {
            t.rows
                .iter()
                .find(|r| r[0] == Value::from(device) && r[1] == Value::from(metric))
                .map(|r| r[2].clone())
        };
        assert_eq!(get("", "vcpu_time_ns"), Some(Value::from(7u64)));
        assert_eq!(get("vda", "read_ops"), Some(Value::from(3u64)));
        assert_eq!(get("eth0", "mac"), Some(Value::from("02:00:00:00:00:01")));
        assert_eq!(get("eth0", "tx_spoofed"), Some(Value::from(20u64)));
        assert_eq!(get("eth0", "tx_dropped"), Some(Value::from(21u64)));
        assert_eq!(get("eth1", "tx_spoofed"), None);
        let json = t.render(true);
        assert!(
            json.contains("\"device\": \"eth0\", \"metric\": \"tx_spoofed\", \"value\": 20"),
            "{json}"
        );
    }

    #[test]
    fn vm_list_names_the_host_and_keeps_its_id_for_scripts() {
        let hosts = vec![pb::Host {
            id: "h-1111".into(),
            name: "rack1".into(),
            ..Default::default()
        }];
        let vm = |id: &str, host: &str| pb::Vm {
            id: id.into(),
            host_id: host.into(),
            spec: Some(pb::VmSpec {
                name: format!("vm-{id}"),
                ..Default::default()
            }),
            ..Default::default()
        };
        let vms = vec![vm("a", "h-1111"), vm("b", ""), vm("c", "h-gone")];
        let host_col = |t: &Table| -> Vec<Value> { t.rows.iter().map(|r| r[4].clone()).collect() };
        let people = vm_table(vms.clone(), &hosts, false);
        // A host the listing does not know (removed meanwhile) still shows its id.
        assert_eq!(
            host_col(&people),
            [Value::from("rack1"), Value::from(""), Value::from("h-gone")]
        );
        let scripts = vm_table(vms, &hosts, true);
        assert_eq!(
            host_col(&scripts),
            [
                Value::from("h-1111"),
                Value::from(""),
                Value::from("h-gone")
            ]
        );
        assert!(scripts.render(true).contains("\"host\": \"h-1111\""));
    }

    #[test]
    fn vm_show_and_long_list_name_undo_disks_and_their_pending_changes() {
        let disk = |id: &str, undo: bool| pb::VmDisk {
            disk_id: id.into(),
            volume_id: format!("vol-{id}"),
            undo,
            ..Default::default()
        };
        let v = pb::Vm {
            id: "a".into(),
            spec: Some(pb::VmSpec {
                name: "vm-a".into(),
                disks: vec![disk("vda", true), disk("vdb", false), disk("vdc", true)],
                ..Default::default()
            }),
            undo_overlays: vec![pb::UndoOverlay {
                disk_id: "vda".into(),
                volume_id: "ov1".into(),
                snapshot_id: "s1".into(),
            }],
            ..Default::default()
        };
        assert_eq!(undo_cell(&v), "vda:pending,vdc:none");
        let t = vm_fields(v.clone(), &[]);
        let field = |k: &str| {
            t.rows
                .iter()
                .find(|r| r[0] == Value::from(k))
                .map(|r| r[1].clone())
                .unwrap()
        };
        assert_eq!(
            field("disks"),
            Value::from("vda=vol-vda (undo),vdb=vol-vdb,vdc=vol-vdc (undo)")
        );
        assert_eq!(field("undo_overlays"), Value::from("vda=ov1"));
        let long = vm_table(vec![v], &[], true);
        assert_eq!(
            long.rows[0].last().cloned(),
            Some(Value::from("vda:pending,vdc:none"))
        );
    }

    #[test]
    fn vm_snapshots_list_as_a_tree_with_the_current_one_marked() {
        let snap = |id: &str, parent: &str, at: i64| pb::VmSnapshot {
            id: id.into(),
            name: format!("n{id}"),
            parent_id: parent.into(),
            created_at: Some(prost_types::Timestamp {
                seconds: at,
                nanos: 0,
            }),
            ..Default::default()
        };
        // s1 -> {s2 -> s4, s3}; s5's parent is not listed (a root).
        let snaps = vec![
            snap("s4", "s2", 4),
            snap("s3", "s1", 3),
            snap("s1", "", 1),
            snap("s5", "gone", 5),
            snap("s2", "s1", 2),
        ];
        let t = snapshot_table(snaps.clone(), "s4", false);
        let rows: Vec<(Value, Value, Value)> = t
            .rows
            .iter()
            .map(|r| (r[1].clone(), r[2].clone(), r[3].clone()))
            .collect();
        let row = |name: &str, parent: &str, current: bool| {
            (Value::from(name), Value::from(parent), Value::from(current))
        };
        assert_eq!(
            rows,
            [
                row("ns1", "", false),
                row("  ns2", "s1", false),
                row("    ns4", "s2", true),
                row("  ns3", "s1", false),
                row("ns5", "gone", false),
            ]
        );
        // Scripts get the names as they are.
        let t = snapshot_table(snaps, "s4", true);
        assert_eq!(t.rows[2][1], Value::from("ns4"));
    }
}
