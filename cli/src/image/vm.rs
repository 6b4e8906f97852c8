//! `vm-export` and `vm-import`: a VM as an OVA package and back.
//!
//! Export reads each disk (of a stopped VM, or of one of its snapshots) over iSCSI into a
//! raw file in a private directory beside the package, has qemu-img make a
//! stream-optimized VMDK of it, and writes descriptor, disks and manifest. Import checks
//! every digest, looks at every disk image and the repository's room before it creates
//! anything; then a new disk per image and the VM on them, stopped. A failure after the
//! first disk was made deletes what was made.

use std::path::Path;

use anyhow::{Context, bail};
use pool_client::new_request_id;
use proto::coordinator as pb;
use proto::host as hpb;

use pool_image::package::{Package, protocol_value};

use super::disk;
use super::ova;
use super::qemu::{self, ScratchDir};
use crate::ctl::{Ctl, call};
use crate::lookup::pick;

/// Writes VM `vm` (stopped), or its snapshot `snapshot`, as an OVA at `file`.
pub async fn export(
    ctl: &mut Ctl,
    vm: &str,
    snapshot: Option<&str>,
    file: &Path,
) -> anyhow::Result<()> {
    let vm_id = ctl.vm_id(vm).await?;
    let v = call!(
        ctl.client,
        get_vm,
        pb::GetVmRequest {
            vm_id: vm_id.clone()
        }
    )?;
    let (spec, volumes) = match snapshot {
        Some(s) => {
            let snaps = ctl.vm_snapshots(&vm_id).await?;
            let id = pick(
                snaps.iter().map(|s| (s.id.as_str(), s.name.as_str())),
                s,
                "snapshot of this VM",
            )?;
            let snap = snaps.into_iter().find(|x| x.id == id).expect("picked");
            let spec = snap.spec.context("the snapshot has no spec")?;
            let volumes = spec
                .disks
                .iter()
                .map(|d| {
                    snap.disk_snapshots
                        .get(&d.disk_id)
                        .cloned()
                        .with_context(|| format!("the snapshot has no copy of disk {}", d.disk_id))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            (spec, volumes)
        }
        None => {
            let stopped = hpb::PowerState::Stopped as i32;
            if v.power_state != stopped || v.desired_power_state != stopped {
                bail!(
                    "VM {vm} is not stopped: shut it down, or export one of its snapshots \
                     with --snapshot"
                );
            }
            let spec = v.spec.clone().context("the VM has no spec")?;
            let volumes = spec.disks.iter().map(|d| d.volume_id.clone()).collect();
            (spec, volumes)
        }
    };
    if file.symlink_metadata().is_ok() {
        bail!("{} exists already", file.display());
    }
    let scratch = ScratchDir::new(file.parent())
        .with_context(|| format!("making a private directory beside {}", file.display()))?;
    let nics = v.vifs.iter().map(|f| f.network_name.clone()).collect();
    let mut pkg = Package::new(&spec, nics);
    for (d, volume_id) in spec.disks.iter().zip(&volumes) {
        let raw = scratch
            .path()
            .join(format!("{}.raw", pkg.descriptor.disks.len()));
        crate::transfer::export(&mut ctl.client, volume_id, &raw).await?;
        pkg.add_raw_disk(&d.disk_id, &raw, scratch.path()).await?;
    }
    let written = ova::create_file(file).and_then(|f| ova::sync(pkg.write(f)?));
    if written.is_err() {
        let _ = std::fs::remove_file(file);
    }
    written
}

pub struct ImportArgs<'a> {
    pub file: &'a Path,
    /// None: the descriptor's.
    pub name: Option<String>,
    /// None: the only repository, when there is one.
    pub sr: Option<String>,
}

/// Makes a new VM, stopped, from the OVA; returns its id.
pub async fn import(ctl: &mut Ctl, args: ImportArgs<'_>) -> anyhow::Result<String> {
    let scratch = ScratchDir::new(None).context("making a private directory")?;
    let pkg = ova::open_verified(args.file, scratch.path())?;
    let d = &pkg.descriptor;
    let mut images = Vec::new();
    for (disk, path) in d.disks.iter().zip(&pkg.disks) {
        let img = qemu::inspect(path, None).await.with_context(|| {
            format!(
                "disk {} ({}) of {}",
                disk.disk_id,
                disk.href,
                args.file.display()
            )
        })?;
        images.push(img);
    }
    let name = args.name.unwrap_or_else(|| d.name.clone());
    if ctl
        .vms()
        .await?
        .iter()
        .any(|v| v.spec.as_ref().is_some_and(|s| s.name == name))
    {
        bail!("a VM named {name:?} exists already; choose another with --name");
    }
    let sr_id = match &args.sr {
        Some(s) => ctl.sr_id(s).await?,
        None => match ctl.srs().await?.as_slice() {
            [one] => one.id.clone(),
            _ => bail!("the pool has several storage repositories: choose one with --sr"),
        },
    };
    let need: u64 = images.iter().map(disk::disk_size).sum();
    let what = format!("{} ({} disks)", args.file.display(), images.len());
    disk::check_room(ctl, &sr_id, need, &what).await?;
    let pool_networks = ctl.networks().await?;
    let mut networks = Vec::new();
    for n in &d.nics {
        match pool_networks.iter().find(|p| &p.name == n) {
            Some(p) => networks.push(p.id.clone()),
            None => eprintln!("warning: the pool has no network {n:?}: that interface is left out"),
        }
    }
    let mut created: Vec<String> = Vec::new();
    let made = async {
        let mut vm_disks = Vec::new();
        for (i, (disk, img)) in d.disks.iter().zip(&images).enumerate() {
            let disk_id = format!("vd{}", (b'a' + (i as u8 % 26)) as char);
            let volume_id = disk::import_new(ctl, &sr_id, format!("{name}-{disk_id}"), img)
                .await
                .with_context(|| format!("importing disk {}", disk.href))?;
            created.push(volume_id.clone());
            vm_disks.push(pb::VmDisk {
                disk_id,
                volume_id,
                read_only: false,
                undo: false,
            });
        }
        let spec = pb::VmSpec {
            name: name.clone(),
            vcpus: d.vcpus.max(1),
            memory_bytes: d.memory_bytes,
            boot: d
                .boot
                .as_ref()
                .filter(|b| !b.kernel.is_empty())
                .map(|b| hpb::BootSource {
                    kernel_path: b.kernel.clone(),
                    initrd_path: b.initrd.clone(),
                    command_line: b.cmdline.clone(),
                    protocol: protocol_value(&b.protocol),
                }),
            disks: vm_disks,
            ..Default::default()
        };
        let r = call!(
            ctl.client,
            create_vm,
            pb::CreateVmRequest {
                request_id: new_request_id(),
                spec: Some(spec),
                source: Some(pb::create_vm_request::Source::FromDisks(true)),
                sr_id: String::new(),
                start: false,
                host_id: String::new(),
                networks: networks.clone(),
            }
        )?;
        anyhow::Ok(ctl.follow(r).await?.target_id)
    }
    .await;
    match made {
        Ok(id) => Ok(id),
        Err(e) => {
            for v in created {
                disk::delete_volume(ctl, &v).await;
            }
            Err(e)
        }
    }
}
