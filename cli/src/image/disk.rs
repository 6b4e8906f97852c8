//! One image into a new disk, and a disk out in a format qemu writes.

use std::path::Path;

use anyhow::{Context, bail};
use pool_client::{PoolClient, new_request_id};
use proto::coordinator as pb;

use super::Reader;
use super::qemu::{self, Format, Image, ScratchDir};
use crate::cmd::vdi::create_vdi;
use crate::ctl::{Ctl, call};
use crate::output::human_bytes;
use crate::transfer;

/// The size of the disk an image goes into: its virtual size in whole MiB (any block
/// size divides it).
pub fn disk_size(img: &Image) -> u64 {
    img.virtual_size.div_ceil(1 << 20).max(1) << 20
}

/// Refuses, before anything is created, images whose disks the repository has no room
/// for: `what` names them in the message.
pub async fn check_room(ctl: &mut Ctl, sr_id: &str, need: u64, what: &str) -> anyhow::Result<()> {
    let sr = call!(
        ctl.client,
        get_storage_repository,
        pb::GetStorageRepositoryRequest {
            sr_id: sr_id.to_owned()
        }
    )?;
    let free = sr.usage.as_ref().map_or(0, |u| u.free_bytes);
    if need > free {
        bail!(
            "{what} has a virtual size of {}, and repository {} has {} free: nothing was \
             created; free space or choose another repository",
            human_bytes(need),
            sr.name,
            human_bytes(free)
        );
    }
    Ok(())
}

/// A new disk `name` in repository `sr_id` holding the image; its volume id. A failure
/// after the volume was made deletes it.
pub async fn import_new(
    ctl: &mut Ctl,
    sr_id: &str,
    name: String,
    img: &Image,
) -> anyhow::Result<String> {
    let task = create_vdi(ctl, sr_id, name, disk_size(img)).await?;
    let volume_id = task.target_id;
    let written = write(&mut ctl.client, &volume_id, img).await;
    if let Err(e) = written {
        delete_volume(ctl, &volume_id).await;
        return Err(e);
    }
    Ok(volume_id)
}

/// Copies the image's data into the volume.
pub async fn write(client: &mut PoolClient, volume_id: &str, img: &Image) -> anyhow::Result<()> {
    let map = qemu::map(img).await?;
    let mut src = Reader::open(img, &map).await?;
    let r = transfer::import(client, volume_id, &mut src, img.virtual_size, &map.data).await;
    src.close().await;
    r.with_context(|| format!("writing {} into volume {volume_id}", img.path.display()))
}

/// Deletes a volume this command made, warning when it stays.
pub async fn delete_volume(ctl: &mut Ctl, volume_id: &str) {
    let r = call!(
        ctl.client,
        delete_volume,
        pb::DeleteVolumeRequest {
            request_id: new_request_id(),
            volume_id: volume_id.to_owned(),
        }
    );
    match r {
        Ok(t) => {
            if let Err(e) = ctl.follow(t).await {
                eprintln!("warning: volume {volume_id} stays: {e:#}");
            }
        }
        Err(e) => eprintln!("warning: volume {volume_id} stays: {e:#}"),
    }
}

/// Reads volume `volume_id` into `file` (which must not exist) in `format`: raw straight
/// from iSCSI with holes for zeros; any other through a raw file (0600, in a private
/// directory beside `file`) that qemu-img converts.
pub async fn export(
    client: &mut PoolClient,
    volume_id: &str,
    file: &Path,
    format: Format,
) -> anyhow::Result<()> {
    if format == Format::Raw {
        return transfer::export(client, volume_id, file).await;
    }
    if file.symlink_metadata().is_ok() {
        bail!("{} exists already", file.display());
    }
    let scratch = ScratchDir::new(file.parent())
        .with_context(|| format!("making a private directory beside {}", file.display()))?;
    let raw = scratch.path().join("disk.raw");
    transfer::export(client, volume_id, &raw).await?;
    qemu::convert_from_raw(&raw, format, file).await?;
    Ok(())
}
