//! `vm-restore`: a new VM from any point of a backup chain.
//!
//! Everything that can refuse does so before anything is created: the chain up to the
//! point is loaded and every digest checked, and the repository must have room for every
//! chunk. Then a new volume per disk is written over iSCSI (zero chunks are skipped: a new
//! thin volume reads zeros) and the VM is created from the point's spec on them, stopped.
//! A failure after that deletes the volumes it made.

use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, bail};
use pool_client::new_request_id;
use proto::coordinator as pb;
use tokio::task::JoinSet;

use super::format::{self, DiskImage};
use crate::cmd::vdi::create_vdi;
use crate::ctl::{Ctl, call};
use crate::output::human_bytes;
use crate::transfer;

/// Writes in flight at once.
const IN_FLIGHT: usize = 8;

pub struct RestoreArgs<'a> {
    pub root: &'a Path,
    /// None: the last point.
    pub point: Option<u32>,
    /// None: `<vm>-restored-<point>`.
    pub name: Option<String>,
    /// None: the repository of the backed-up VM's first disk.
    pub sr: Option<String>,
}

/// Returns the new VM's id.
pub async fn restore(ctl: &mut Ctl, args: RestoreArgs<'_>) -> anyhow::Result<String> {
    let chain = format::load_chain(args.root)?;
    let Some(last) = chain.last() else {
        bail!("{} holds no backup point", args.root.display());
    };
    let point = args.point.unwrap_or(last.manifest.point);
    let images = format::disks_at(&chain, point)?;
    let upto = &chain[..=format::position(&chain, point)?];
    format::verify(upto)?;
    let at = upto.last().expect("the point is in the chain");
    let spec_path = at.dir.join(format::SPEC_FILE);
    let spec_bytes =
        std::fs::read(&spec_path).with_context(|| format!("reading {}", spec_path.display()))?;
    let mut spec: pb::VmSpec = prost::Message::decode(spec_bytes.as_slice())
        .with_context(|| format!("{} is not a VM spec", spec_path.display()))?;
    let name = args
        .name
        .unwrap_or_else(|| format!("{}-restored-{point}", at.manifest.vm_name));
    if ctl
        .vms()
        .await?
        .iter()
        .any(|v| v.spec.as_ref().is_some_and(|s| s.name == name))
    {
        bail!("a VM named {name:?} exists already; choose another with --name");
    }
    let sr_id = match &args.sr {
        Some(sr) => ctl.sr_id(sr).await?,
        None => original_sr(ctl, &at.manifest).await?,
    };
    let sr = call!(
        ctl.client,
        get_storage_repository,
        pb::GetStorageRepositoryRequest {
            sr_id: sr_id.clone()
        }
    )?;
    let need: u64 = images.iter().map(DiskImage::bytes).sum();
    let free = sr.usage.as_ref().map_or(0, |u| u.free_bytes);
    if need > free {
        bail!(
            "repository {} has {} free, and point {point} needs {} for its disks' data: \
             nothing was created; free space or choose another with --sr",
            sr.name,
            human_bytes(free),
            human_bytes(need)
        );
    }
    let mut created: Vec<String> = Vec::new();
    let made = async {
        for img in &images {
            let task = create_vdi(
                ctl,
                &sr_id,
                format!("{name}-{}", img.disk_id),
                img.size_bytes,
            )
            .await?;
            created.push(task.target_id.clone());
            write_disk(ctl, &task.target_id, img)
                .await
                .with_context(|| format!("writing disk {}", img.disk_id))?;
        }
        for (d, volume) in spec.disks.iter_mut().zip(&created) {
            d.volume_id = volume.clone();
        }
        spec.name = name.clone();
        let r = call!(
            ctl.client,
            create_vm,
            pb::CreateVmRequest {
                request_id: new_request_id(),
                spec: Some(spec.clone()),
                source: Some(pb::create_vm_request::Source::FromDisks(true)),
                sr_id: String::new(),
                start: false,
                host_id: String::new(),
                networks: vec![],
            }
        )?;
        anyhow::Ok(ctl.follow(r).await?.target_id)
    }
    .await;
    match made {
        Ok(vm_id) => Ok(vm_id),
        Err(e) => {
            for volume_id in created {
                let r = call!(
                    ctl.client,
                    delete_volume,
                    pb::DeleteVolumeRequest {
                        request_id: new_request_id(),
                        volume_id: volume_id.clone(),
                    }
                );
                if let Err(d) = r {
                    eprintln!("warning: volume {volume_id} stays: {d:#}");
                }
            }
            Err(e)
        }
    }
}

/// The repository that held the backed-up VM's first disk, while it still exists.
async fn original_sr(ctl: &mut Ctl, m: &format::Manifest) -> anyhow::Result<String> {
    let first = m
        .disks
        .first()
        .context("the backup has no disk; give --sr")?;
    let v = call!(
        ctl.client,
        get_volume,
        pb::GetVolumeRequest {
            volume_id: first.volume_id.clone()
        }
    )
    .with_context(|| {
        format!(
            "finding the repository of the VM's disk {} (give --sr when it is gone)",
            first.volume_id
        )
    })?;
    Ok(v.pool_id)
}

/// Writes the image's chunks into `volume_id`, several writes in flight.
async fn write_disk(ctl: &mut Ctl, volume_id: &str, img: &DiskImage) -> anyhow::Result<()> {
    let access = transfer::open(&mut ctl.client, volume_id).await?;
    let r = async {
        let bs = u64::from(access.lun.block_size());
        let mut tasks = JoinSet::new();
        for (&index, src) in &img.chunks {
            let file = std::fs::File::open(&src.file)
                .with_context(|| format!("opening {}", src.file.display()))?;
            // The last chunk of a disk may end inside a block: padded with zeros.
            let mut buf = vec![0u8; src.len.div_ceil(bs) as usize * bs as usize];
            file.read_exact_at(&mut buf[..src.len as usize], src.offset)
                .with_context(|| format!("reading {}", src.file.display()))?;
            if tasks.len() >= IN_FLIGHT {
                tasks.join_next().await.expect("a task")??;
            }
            let lun = access.lun.clone();
            let lba = index * img.chunk_size / bs;
            tasks.spawn(async move { lun.write(lba, buf.into()).await });
        }
        while let Some(r) = tasks.join_next().await {
            r??;
        }
        access.lun.flush().await.context("flushing the disk")?;
        anyhow::Ok(())
    }
    .await;
    access.close(&mut ctl.client).await;
    r
}
