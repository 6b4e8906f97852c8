//! Changing a stopped VM's disks.

use proto::host::{DiskConfig, Vm as VmProto};

use super::{Manager, ManagerError, is_live};
use crate::supervisor::spec;

impl Manager {
    /// Attaches a disk to a stopped VM: disks are announced to the guest at boot, so a
    /// running VM gets new disks on its next start, not live.
    pub async fn attach_disk(&self, id: &str, disk: DiskConfig) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(
            &entry,
            "attaching a disk",
            "stopped (disks are announced at boot)",
            |s| !is_live(s),
        )
        .await?;
        spec::validate_disk(&disk, &self.cfg.initiator_iqn, &self.cfg.image_dirs)?;
        let mut config = entry.lock().config.clone();
        if config.disks.iter().any(|d| d.id == disk.id) {
            return Err(ManagerError::Disk {
                id: id.into(),
                disk: disk.id,
                what: "already attached to",
            });
        }
        config.disks.push(disk);
        spec::validate(&config, &self.cfg.initiator_iqn, &self.cfg.image_dirs)?;
        entry.lock().config = config;
        Ok(entry.to_proto())
    }

    pub async fn detach_disk(&self, id: &str, disk_id: &str) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(
            &entry,
            "detaching a disk",
            "stopped (disks are announced at boot)",
            |s| !is_live(s),
        )
        .await?;
        let mut r = entry.lock();
        let before = r.config.disks.len();
        r.config.disks.retain(|d| d.id != disk_id);
        if r.config.disks.len() == before {
            return Err(ManagerError::Disk {
                id: id.into(),
                disk: disk_id.into(),
                what: "not attached to",
            });
        }
        drop(r);
        Ok(entry.to_proto())
    }
}
