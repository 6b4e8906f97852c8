//! Live migration as the daemon drives it: preparing a VM process to receive a VM,
//! starting a send and following its progress, cancelling, and forgetting a VM that left.

use std::sync::Arc;

use proto::host::{MigrationPhase, MigrationProgress, PowerState, StopReason, VmConfig};
use tokio::sync::watch;

use super::{Arrival, Manager, ManagerError, STOP_GRACE};
use crate::supervisor::protocol::{Empty, IncomingRecord, MigrateSend, command};
use crate::supervisor::spec;

/// Whether a migration in this phase is over.
pub fn migration_ended(p: &MigrationProgress) -> bool {
    matches!(
        MigrationPhase::try_from(p.phase),
        Ok(MigrationPhase::Completed | MigrationPhase::Failed | MigrationPhase::Cancelled)
    )
}

impl Manager {
    /// Prepares to receive VM `id` by live migration: starts its process, which opens
    /// the disks (logging in to iSCSI volumes) and listens on `listen_ip` for host
    /// `source_host` (over TLS, by its certificate) presenting `token`. Returns the
    /// listener's host:port. A stopped VM of the same id
    /// (a failed earlier attempt) is replaced; a live one is refused.
    pub async fn prepare_incoming(
        self: &Arc<Self>,
        id: &str,
        config: VmConfig,
        token: &str,
        source_host: &str,
        listen_ip: &str,
    ) -> Result<String, ManagerError> {
        spec::validate(&config, &self.cfg.initiator_iqn, &self.cfg.image_dirs)?;
        let entry = self
            .claim_slot(
                id,
                &config,
                PowerState::Migrating,
                "receiving it by migration",
            )
            .await?;
        let dir = self.vm_dir(id);
        let incoming = IncomingRecord {
            token: token.to_owned(),
            listen_ip: listen_ip.to_owned(),
            wait_seconds: 0,
            source_host: source_host.to_owned(),
            tls_dir: self.cfg.tls_dir.display().to_string(),
        };
        let _op = entry.op.lock().await;
        match self
            .spawn(&entry, &dir, config.clone(), Arrival::Migration(incoming))
            .await
        {
            Ok(()) => {
                let s = entry.lock().state.clone();
                if s.last {
                    self.unplug_nets(id, &config).await;
                    return Err(ManagerError::StartFailed {
                        id: id.into(),
                        detail: s.detail,
                    });
                }
                Ok(s.migration_address)
            }
            Err(e) => {
                self.release_slot(&entry).await;
                Err(e)
            }
        }
    }

    /// Starts sending VM `id` to another host (over TLS with this host's certificate,
    /// set here); progress arrives on the returned receiver until a phase that ends it.
    pub async fn migrate_send(
        &self,
        id: &str,
        mut m: MigrateSend,
    ) -> Result<watch::Receiver<Option<MigrationProgress>>, ManagerError> {
        m.tls_dir = self.cfg.tls_dir.display().to_string();
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(&entry, "live migration", "running", |s| {
            s == PowerState::Running
        })
        .await?;
        if let Some(p) = entry.migration.borrow().as_ref()
            && !migration_ended(p)
        {
            return Err(ManagerError::Command {
                id: id.into(),
                detail: format!("migration {} is under way", p.migration_id),
            });
        }
        entry.migration.send_replace(Some(MigrationProgress {
            migration_id: m.migration_id.clone(),
            vm_id: id.into(),
            phase: MigrationPhase::Preparing as i32,
            memory_total_bytes: entry.lock().config.memory_bytes,
            ..Default::default()
        }));
        let rx = entry.migration.subscribe();
        if let Err(e) = entry.command(command::Op::MigrateSend(m)).await {
            entry.migration.send_modify(|p| {
                if let Some(p) = p {
                    p.phase = MigrationPhase::Failed as i32;
                    p.error = proto::error_chain(&e);
                }
            });
            return Err(e);
        }
        Ok(rx)
    }

    /// The latest progress of VM `id`'s migration.
    pub async fn migration(&self, id: &str) -> Result<Option<MigrationProgress>, ManagerError> {
        Ok(self.get(id).await?.migration.borrow().clone())
    }

    /// Asks VM `id`'s process to cancel its migration (it answers at once; the outcome
    /// comes as progress: Cancelled, or Completed if the switchover was already
    /// committed).
    pub async fn cancel_migration(&self, id: &str) -> Result<(), ManagerError> {
        let entry = self.get(id).await?;
        entry
            .command(command::Op::CancelMigration(Empty {}))
            .await
            .map(|_| ())
    }

    /// Forgets VM `id` once its process has ended after migrating away (its directory
    /// goes too: the VM lives on another host now).
    pub async fn forget_migrated(&self, id: &str) {
        let Ok(entry) = self.get(id).await else {
            return;
        };
        let gone = entry
            .wait_until(STOP_GRACE, |s| {
                s.last && s.last_stop == StopReason::MigratedAway as i32
            })
            .await;
        if gone {
            // The table stays locked until the taps are gone, so the VM coming back here
            // by another migration plugs its taps after this removes the old ones.
            let mut vms = self.vms.lock().await;
            if vms.get(id).is_some_and(|e| Arc::ptr_eq(e, &entry)) {
                vms.remove(id);
                let _ = std::fs::remove_dir_all(self.vm_dir(id));
                let config = entry.lock().config.clone();
                self.unplug_nets(id, &config).await;
            }
        }
    }
}
