//! `poolctl vdi-*`: virtual disks (thin volumes), their snapshots and clones, and copying
//! images in and out (qcow2, VMDK, VHD/VHDX, raw: `crate::image`).

use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::image;
use crate::output::{Table, enum_name, human_bytes, parse_size, ts};

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
    /// Copy a disk image (qcow2, VMDK, VHD, VHDX or raw, as qemu-img finds it) into a
    /// new disk of its virtual size, straight to the storage over iSCSI.
    #[command(name = "vdi-import")]
    Import {
        file: std::path::PathBuf,
        name: String,
        #[arg(long)]
        sr: String,
        /// The image's format, when it should not be probed (raw, qcow2, vmdk, vhd, vhdx).
        #[arg(long, value_parser = image::qemu::format_arg)]
        format: Option<image::qemu::Format>,
    },
    /// Copy a disk or snapshot into a new image file: raw (zero blocks stay holes), or
    /// qcow2, vmdk (stream-optimized), vhd, vhdx.
    #[command(name = "vdi-export")]
    Export {
        vdi: String,
        file: std::path::PathBuf,
        #[arg(long, default_value = "raw", value_parser = image::qemu::format_arg)]
        format: image::qemu::Format,
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
    /// Who may reach a disk over iSCSI: its exports (target, LUN, portals), one row per
    /// initiator granted or logged in, with the pool host it is (never a CHAP secret).
    #[command(name = "vdi-exports", visible_alias = "volume-exports")]
    Exports { vdi: String },
}

pub async fn run(ctl: &mut Ctl, command: VdiCommand) -> anyhow::Result<()> {
    match command {
        VdiCommand::Create { name, sr, size } => {
            create_vdi(ctl, &sr, name, size).await?;
        }
        VdiCommand::Import {
            file,
            name,
            sr,
            format,
        } => {
            // Everything that can refuse does so before the disk is made.
            let img = image::qemu::inspect(&file, format).await?;
            let sr_id = ctl.sr_id(&sr).await?;
            let what = format!("{} ({})", file.display(), img.format.qemu_name());
            image::disk::check_room(ctl, &sr_id, img.virtual_size, &what).await?;
            let volume_id = image::disk::import_new(ctl, &sr_id, name, &img).await?;
            eprintln!(
                "imported {what}, {} bytes, as volume {volume_id}",
                img.virtual_size
            );
        }
        VdiCommand::Export { vdi, file, format } => {
            let volume_id = ctl.vdi_id(&vdi).await?;
            image::disk::export(&mut ctl.client, &volume_id, &file, format).await?;
            eprintln!("exported to {} ({})", file.display(), format.qemu_name());
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
        VdiCommand::Exports { vdi } => {
            let volume_id = ctl.vdi_id(&vdi).await?;
            let r = call!(
                ctl.client,
                list_volume_exports,
                pb::ListVolumeExportsRequest { volume_id }
            )?;
            ctl.print(&exports_table(&r.exports));
        }
    }
    Ok(())
}

/// One row per initiator of each export: those granted (GRANTED says when) and those
/// logged in without a grant (a session outliving its revoke); an export nobody may
/// reach is one row with no initiator.
fn exports_table(exports: &[pb::VolumeExport]) -> Table {
    let mut t = Table::new(&[
        "TARGET",
        "LUN",
        "PORTALS",
        "READ_ONLY",
        "INITIATOR",
        "HOST",
        "GRANTED",
        "SESSIONS",
    ]);
    for e in exports {
        let sessions = |iqn: &str| e.session_initiators.iter().filter(|s| *s == iqn).count() as u64;
        let mut row = |initiator: &str, host: &str, granted: String| {
            t.row(vec![
                e.target_iqn.as_str().into(),
                e.lun.into(),
                e.portals.join(",").into(),
                e.read_only.into(),
                initiator.into(),
                host.into(),
                granted.into(),
                sessions(initiator).into(),
            ]);
        };
        for g in &e.grants {
            row(&g.initiator_iqn, &g.host_name, ts(&g.granted_at));
        }
        let mut ungranted: Vec<&String> = e
            .session_initiators
            .iter()
            .filter(|s| !e.grants.iter().any(|g| g.initiator_iqn == **s))
            .collect();
        ungranted.sort();
        ungranted.dedup();
        for s in &ungranted {
            row(s, "", String::new());
        }
        if e.grants.is_empty() && ungranted.is_empty() {
            row("", "", String::new());
        }
    }
    t
}

/// Creates a disk and follows its task to the end.
pub(crate) async fn create_vdi(
    ctl: &mut Ctl,
    sr: &str,
    name: String,
    size: u64,
) -> anyhow::Result<pb::Task> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::Value;

    #[test]
    fn exports_list_each_initiator_with_its_host_and_sessions() {
        let grant = |iqn: &str, host: &str| pb::VolumeExportGrant {
            initiator_iqn: iqn.into(),
            host_name: host.into(),
            granted_at: None,
        };
        let exports = [
            pb::VolumeExport {
                id: "e1".into(),
                target_iqn: "iqn.t:1".into(),
                lun: 0,
                portals: vec!["a:3260".into(), "b:3260".into()],
                read_only: false,
                grants: vec![grant("iqn.h1", "h1"), grant("iqn.poolctl", "")],
                session_initiators: vec!["iqn.h1".into(), "iqn.h1".into(), "iqn.old".into()],
            },
            pb::VolumeExport {
                id: "e2".into(),
                target_iqn: "iqn.t:2".into(),
                ..Default::default()
            },
        ];
        let t = exports_table(&exports);
        let rows: Vec<(Value, Value, Value, Value)> = t
            .rows
            .iter()
            .map(|r| (r[0].clone(), r[4].clone(), r[5].clone(), r[7].clone()))
            .collect();
        let row = |target: &str, iqn: &str, host: &str, sessions: u64| {
            (
                Value::from(target),
                Value::from(iqn),
                Value::from(host),
                Value::from(sessions),
            )
        };
        assert_eq!(
            rows,
            [
                row("iqn.t:1", "iqn.h1", "h1", 2),
                row("iqn.t:1", "iqn.poolctl", "", 0),
                row("iqn.t:1", "iqn.old", "", 1),
                row("iqn.t:2", "", "", 0),
            ]
        );
        assert_eq!(t.rows[0][2], Value::from("a:3260,b:3260"));
    }
}
