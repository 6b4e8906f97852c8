//! A disk or disk snapshot as one image file, as `poolctl vdi-export` makes it: the
//! volume read over iSCSI into a sparse raw file, which is the download or which qemu-img
//! makes a qcow2. A VM's disk is read only while the VM is stopped (`OpenVolumeAccess`
//! refuses it otherwise); a snapshot of it any time.

use std::path::Path;

use pool_image::package::file_stem;
use pool_image::progress::Phase;
use pool_image::qemu::{self, Format};
use proto::coordinator as pb;
use tonic::Status;

use super::{PoolHandler, Prepared, Work};

/// The formats a disk downloads as: what a browser's user most often takes elsewhere.
pub const FORMATS: [Format; 2] = [Format::Qcow2, Format::Raw];

/// Volume `volume_id`'s name.
pub(super) async fn volume(svc: &PoolHandler, volume_id: &str) -> Result<String, Status> {
    svc.c
        .read(|s| s.volumes.get(volume_id).map(|v| v.name.clone()))
        .await?
        .ok_or_else(|| Status::not_found(format!("no volume with id {volume_id}")))
}

pub(super) async fn build(
    w: &Work<'_>,
    volume_id: &str,
    format: Format,
) -> Result<Prepared, Status> {
    let stem = file_stem(&volume(w.svc, volume_id).await?);
    let raw = w.dir.join("disk.raw");
    read_volume(w, 1, volume_id, &raw).await?;
    let name = format!("{stem}.{}", format.qemu_name());
    if format == Format::Raw {
        return Ok(Prepared::File { path: raw, name });
    }
    w.update(|p| p.phase = Phase::Converting);
    let path = w.dir.join(format!("disk.{}", format.qemu_name()));
    w.unless_cancelled(async {
        qemu::convert_from_raw(&raw, format, &path)
            .await
            .map_err(|e| Status::internal(format!("qemu-img: {e}")))
    })
    .await?;
    std::fs::remove_file(&raw)
        .map_err(|e| Status::internal(format!("removing the raw copy: {e}")))?;
    Ok(Prepared::File { path, name })
}

/// Reads volume `volume_id` (disk `disk` of the export) into `raw` through a grant to
/// this member's own initiator name, revoked afterwards whatever happened.
pub(super) async fn read_volume(
    w: &Work<'_>,
    disk: u32,
    volume_id: &str,
    raw: &Path,
) -> Result<(), Status> {
    w.update(|p| p.reading(disk, 0));
    let r = pb::VolumeAccessRequest {
        volume_id: volume_id.to_owned(),
        initiator_iqn: format!("iqn.2026-11.org.pool.poold-export:{}", uuid::Uuid::new_v4()),
    };
    let access = crate::service::pool::storage::open_access(w.svc, &r).await?;
    let read = w.unless_cancelled(async {
        let res = async {
            let (session, lun) = pool_image::volume::connect(&access, &r.initiator_iqn).await?;
            w.update(|p| p.total = lun.size());
            let res =
                pool_image::volume::read_to_file(&lun, raw, |done| w.update(|p| p.read = done))
                    .await;
            let _ = session.logout().await;
            res
        }
        .await;
        res.map_err(|e| Status::unavailable(format!("reading volume {volume_id}: {e:#}")))
    });
    let read = read.await;
    if let Err(e) = crate::service::pool::storage::close_access(w.svc, &r).await {
        tracing::warn!(%volume_id, initiator = %r.initiator_iqn, error = %e.message(), "an export's grant stays");
    }
    read
}

/// The format `?format=` names, of [`FORMATS`].
pub fn format(name: &str) -> Result<Format, Status> {
    FORMATS
        .into_iter()
        .find(|f| f.qemu_name() == name)
        .ok_or_else(|| Status::invalid_argument(format!("format {name:?}: qcow2 or raw")))
}
