//! Saving the VM into a state volume in the VM process, and starting one from such a
//! volume instead of booting (see [`crate::migration::saved`]).

use std::time::{Duration, Instant};

use proto::host::{IscsiDisk, PowerState, StopReason};

use super::Runner;
use crate::migration::saved;
use crate::supervisor::protocol::{Save, Saved};
use crate::supervisor::spec;
use crate::vmm::{Vm, VmSpec};

/// How long a paused vCPU may take to stop.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

impl Runner {
    /// Saves `vm` (running or paused) into the state volume `s` names: the volume is
    /// logged in to and its header cleared while the guest still runs; then the vCPUs
    /// pause, in-flight disk requests finish, memory and state are written and made
    /// durable. With `resume` the VM goes back to how it was; otherwise it stays paused
    /// for the caller to stop. On error it goes back to how it was too.
    pub(super) fn save(&mut self, vm: &Vm, s: &Save) -> Result<Saved, String> {
        let Some(v) = &s.state_volume else {
            return Err("no state volume given".into());
        };
        let vol =
            spec::open_state_volume(v, &self.initiator_iqn).map_err(|e| proto::error_chain(&e))?;
        saved::prepare(&*vol, vm.memory_bytes()).map_err(|e| proto::error_chain(&e))?;
        let was_paused = vm.is_paused();
        let paused_at = Instant::now();
        vm.pause(PAUSE_TIMEOUT).map_err(|e| e.to_string())?;
        let result = saved::save(vm, &self.id, vol);
        if (s.resume || result.is_err())
            && !was_paused
            && let Err(e) = vm.resume()
        {
            tracing::error!(error = %e, "cannot resume the VM after saving it");
        }
        let pause = paused_at.elapsed();
        let bytes_written = result.map_err(|e| {
            let error = proto::error_chain(&e);
            tracing::warn!(%error, "save failed; the VM goes on");
            error
        })?;
        tracing::info!(?pause, bytes_written, resume = s.resume, "VM saved");
        Ok(Saved {
            pause_ms: pause.as_millis().min(u128::from(u32::MAX)) as u32,
            bytes_written,
        })
    }

    /// Builds the VM from the state saved in `v` and starts it; `None` if it cannot be
    /// (the reason is published as the last state, and nothing ran).
    pub(super) fn restore(&mut self, spec: &VmSpec, v: &IscsiDisk) -> Option<Vm> {
        let started = Instant::now();
        let restored = spec::open_state_volume(v, &self.initiator_iqn)
            .map_err(|e| proto::error_chain(&e))
            .and_then(|vol| {
                saved::restore(&*vol, &self.id, spec, self.console.clone())
                    .map_err(|e| proto::error_chain(&e))
            })
            .and_then(|mut vm| vm.start().map(|()| vm).map_err(|e| e.to_string()));
        match restored {
            Ok(vm) => {
                tracing::info!(took = ?started.elapsed(), "VM restored from its saved state");
                Some(vm)
            }
            Err(e) => {
                let detail = format!("cannot restore the VM from its state volume: {e}");
                tracing::warn!(%detail);
                self.finish(PowerState::Stopped, StopReason::VmmError, detail);
                None
            }
        }
    }
}
