//! `poolctl vdi-*`: virtual disks (thin volumes), their snapshots and clones, and copying
//! raw images in and out.

use anyhow::Context;
use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::output::{Table, enum_name, human_bytes, parse_size};
use crate::transfer;

#[derive(Debug, Subcommand)]
pub enum VdiCommand {
    /// Create a virtual disk (a thin volume).
    #[command(name = "vdi-create")]
    Create {
        name: String,
        #[arg(long)]
        sr: String,
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Copy a raw disk image into a new disk (straight to the storage, over iSCSI).
    #[command(name = "vdi-import")]
    Import {
        file: std::path::PathBuf,
        name: String,
        #[arg(long)]
        sr: String,
    },
    /// Copy a disk or snapshot into a new raw image file (zero blocks stay holes).
    #[command(name = "vdi-export")]
    Export {
        vdi: String,
        file: std::path::PathBuf,
    },
    /// Virtual disks.
    #[command(name = "vdi-list")]
    List {
        #[arg(long)]
        sr: Option<String>,
    },
    /// Take a read-only snapshot of a disk.
    #[command(name = "vdi-snapshot")]
    Snapshot { vdi: String, name: String },
    /// Make a writable clone of a disk or snapshot.
    #[command(name = "vdi-clone")]
    Clone { vdi: String, name: String },
    /// Revert a disk to one of its snapshots.
    #[command(name = "vdi-revert")]
    Revert { vdi: String, snapshot: String },
    /// Delete a disk, snapshot or clone.
    #[command(name = "vdi-destroy")]
    Destroy { vdi: String },
}

pub async fn run(ctl: &mut Ctl, command: VdiCommand) -> anyhow::Result<()> {
    match command {
        VdiCommand::Create { name, sr, size } => {
            create_vdi(ctl, &sr, name, size).await?;
        }
        VdiCommand::Import { file, name, sr } => {
            let len = std::fs::metadata(&file)
                .with_context(|| format!("reading {}", file.display()))?
                .len();
            // Whole MiB: any block size divides it.
            let size = len.div_ceil(1 << 20).max(1) << 20;
            let task = create_vdi(ctl, &sr, name, size).await?;
            transfer::import(&mut ctl.client, &task.target_id, &file).await?;
            eprintln!("imported {} ({len} bytes)", file.display());
        }
        VdiCommand::Export { vdi, file } => {
            let volume_id = ctl.vdi_id(&vdi).await?;
            transfer::export(&mut ctl.client, &volume_id, &file).await?;
            eprintln!("exported to {}", file.display());
        }
        VdiCommand::List { sr } => {
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
        VdiCommand::Snapshot { vdi, name } => {
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
        VdiCommand::Clone { vdi, name } => {
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
        VdiCommand::Revert { vdi, snapshot } => {
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
        VdiCommand::Destroy { vdi } => {
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
    }
    Ok(())
}

/// Creates a disk and follows its task to the end.
async fn create_vdi(ctl: &mut Ctl, sr: &str, name: String, size: u64) -> anyhow::Result<pb::Task> {
    let sr_id = ctl.sr_id(sr).await?;
    let r = call!(
        ctl.client,
        create_volume,
        pb::CreateVolumeRequest {
            request_id: new_request_id(),
            sr_id,
            name,
            virtual_size_bytes: size,
            labels: Default::default(),
        }
    )?;
    ctl.follow(r).await
}
