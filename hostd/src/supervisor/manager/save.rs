//! Saving a VM into a state volume (suspend, checkpoint) and starting one from such a
//! volume (resume, quick migration, revert), as the daemon drives them.

use std::sync::Arc;
use std::time::Duration;

use proto::host::{IscsiDisk, PowerState, Vm as VmProto, VmConfig};

use super::{Arrival, Manager, ManagerError, STOP_GRACE};
use crate::supervisor::protocol::{Save, Saved, command};
use crate::supervisor::spec;

/// How long a save may take: writing the VM's whole memory over iSCSI.
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);

impl Manager {
    /// Saves VM `id` (running or paused) into `volume`; with `resume` it runs on, else
    /// it stops (its last stop: suspended) and its taps go. A save that fails leaves it
    /// as it was.
    pub async fn save(
        &self,
        id: &str,
        volume: IscsiDisk,
        resume: bool,
    ) -> Result<(VmProto, Saved), ManagerError> {
        spec::validate_state_volume(&volume, &self.cfg.initiator_iqn)?;
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(&entry, "saving it", "running or paused", |s| {
            matches!(s, PowerState::Running | PowerState::Paused)
        })
        .await?;
        let reply = entry
            .command_within(
                command::Op::Save(Save {
                    state_volume: Some(volume),
                    resume,
                }),
                SAVE_TIMEOUT,
            )
            .await?;
        let saved = reply.saved.unwrap_or_default();
        if !resume {
            if !entry.wait_until(STOP_GRACE, |s| s.last).await {
                self.kill(&entry).await;
            }
            let config = entry.lock().config.clone();
            self.unplug_nets(id, &config).await;
        }
        Ok((entry.to_proto(), saved))
    }

    /// Starts VM `id` with `config` from the state saved in `volume`. A stopped VM of
    /// the same id is replaced; a live one is refused. If the state cannot be restored
    /// nothing runs and the VM is not kept.
    pub async fn restore(
        self: &Arc<Self>,
        id: &str,
        config: VmConfig,
        volume: IscsiDisk,
    ) -> Result<VmProto, ManagerError> {
        spec::validate(&config, &self.cfg.initiator_iqn, &self.cfg.image_dirs)?;
        spec::validate_state_volume(&volume, &self.cfg.initiator_iqn)?;
        // Arriving, as by migration: a host that listed it stopped while its state is read
        // would have the pool's reconciler, once the resume commits, boot it afresh over
        // the restored guest (and a second restore could replace it).
        let entry = self
            .claim_slot(id, &config, PowerState::Migrating, "restoring it")
            .await?;
        let dir = self.vm_dir(id);
        let _op = entry.op.lock().await;
        match self
            .spawn(&entry, &dir, config, Arrival::Restore(volume))
            .await
        {
            Ok(()) => Ok(entry.to_proto()),
            Err(e) => {
                self.release_slot(&entry).await;
                Err(e)
            }
        }
    }
}
