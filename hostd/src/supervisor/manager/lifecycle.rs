//! Creating, starting, pausing, resuming, rebooting, shutting down and destroying VMs.

use std::sync::Arc;
use std::time::Duration;

use proto::host::{PowerState, StopReason, Vm as VmProto, VmConfig};

use super::entry::Entry;
use super::{Arrival, Manager, ManagerError, STOP_GRACE, is_live, power, valid_id};
use crate::supervisor::protocol::{Empty, Polite, VmState, command};
use crate::supervisor::spec;

const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(60);

impl Manager {
    pub async fn create(
        self: &Arc<Self>,
        id: String,
        config: VmConfig,
        start: bool,
    ) -> Result<VmProto, ManagerError> {
        let id = if id.is_empty() {
            uuid::Uuid::new_v4().to_string()
        } else {
            id
        };
        if !valid_id(&id) {
            return Err(ManagerError::BadId(id));
        }
        spec::validate(&config, &self.cfg.initiator_iqn, &self.cfg.image_dirs)?;
        let entry = Entry::new(
            id.clone(),
            config,
            VmState {
                power: PowerState::Stopped as i32,
                last_stop: StopReason::None as i32,
                ..Default::default()
            },
        );
        {
            let mut vms = self.vms.lock().await;
            if vms.contains_key(&id) {
                return Err(ManagerError::AlreadyExists { id });
            }
            vms.insert(id.clone(), entry.clone());
        }
        if start && let Err(e) = self.start(&id).await {
            // A create that cannot start leaves nothing behind.
            self.vms.lock().await.remove(&id);
            let _ = std::fs::remove_dir_all(self.vm_dir(&id));
            return Err(e);
        }
        Ok(entry.to_proto())
    }

    pub async fn start(self: &Arc<Self>, id: &str) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        let state = entry.power();
        if is_live(state) {
            return Err(ManagerError::WrongState {
                id: id.into(),
                state,
                what: "start",
                need: "stopped",
            });
        }
        let config = entry.lock().config.clone();
        spec::validate(&config, &self.cfg.initiator_iqn, &self.cfg.image_dirs)?;
        self.admit_memory(&*self.vms.lock().await, id, config.memory_bytes)?;
        let dir = self.vm_dir(id);
        self.spawn(&entry, &dir, config, Arrival::Boot).await?;
        Ok(entry.to_proto())
    }

    pub async fn pause(&self, id: &str) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(&entry, "pause", "running", |s| s == PowerState::Running).await?;
        entry.command(command::Op::Pause(Empty {})).await?;
        Ok(entry.to_proto())
    }

    pub async fn resume(&self, id: &str) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(&entry, "resume", "paused", |s| s == PowerState::Paused).await?;
        entry.command(command::Op::Resume(Empty {})).await?;
        Ok(entry.to_proto())
    }

    pub async fn reboot(&self, id: &str, force: bool) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        Self::require(&entry, "reboot", "running or paused", |s| {
            matches!(s, PowerState::Running | PowerState::Paused)
        })
        .await?;
        let boots = entry.lock().state.boots;
        entry
            .command(command::Op::Reboot(Polite {
                force,
                timeout_ms: DEFAULT_SHUTDOWN_TIMEOUT.as_millis() as u32,
            }))
            .await?;
        if force {
            entry
                .wait_until(STOP_GRACE, |s| {
                    s.last || (s.boots > boots && power(s) == PowerState::Running)
                })
                .await;
        }
        Ok(entry.to_proto())
    }

    pub async fn shutdown(
        &self,
        id: &str,
        force: bool,
        timeout: Duration,
    ) -> Result<VmProto, ManagerError> {
        let entry = self.get(id).await?;
        let _op = entry.op.lock().await;
        if !is_live(entry.power()) {
            return Ok(entry.to_proto());
        }
        let timeout = if timeout.is_zero() {
            DEFAULT_SHUTDOWN_TIMEOUT
        } else {
            timeout
        };
        let op = if force {
            command::Op::Stop(Empty {})
        } else {
            command::Op::Shutdown(Polite {
                force: false,
                timeout_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
            })
        };
        if let Err(e) = entry.command(op).await {
            tracing::warn!(vm = %id, error = %e, "stop request not answered; killing the VM process");
            self.kill(&entry).await;
        }
        let wait = if force {
            STOP_GRACE
        } else {
            timeout + STOP_GRACE
        };
        if !entry.wait_until(wait, |s| s.last).await {
            self.kill(&entry).await;
        }
        if !is_live(entry.power()) {
            let config = entry.lock().config.clone();
            self.unplug_nets(id, &config).await;
        }
        Ok(entry.to_proto())
    }

    pub async fn destroy(&self, id: &str) -> Result<(), ManagerError> {
        let entry = self.get(id).await?;
        {
            let _op = entry.op.lock().await;
            if is_live(entry.power()) {
                let _ = entry.command(command::Op::Stop(Empty {})).await;
                if !entry.wait_until(STOP_GRACE, |s| s.last).await {
                    self.kill(&entry).await;
                }
            }
        }
        self.vms.lock().await.remove(id);
        let config = entry.lock().config.clone();
        self.unplug_nets(id, &config).await;
        let dir = self.vm_dir(id);
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|source| ManagerError::Io { path: dir, source })?;
        }
        Ok(())
    }

    /// Stops every VM this daemon runs (for a daemon told to take its VMs with it).
    pub async fn stop_all(&self) {
        let ids: Vec<String> = self.vms.lock().await.keys().cloned().collect();
        for id in ids {
            let _ = self.shutdown(&id, true, Duration::ZERO).await;
        }
    }
}
