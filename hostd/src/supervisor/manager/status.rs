//! What the daemon reports of its VMs: one, a page of them, their metrics, and what they
//! hold of the host.

use std::sync::Arc;

use proto::host::{Vm as VmProto, VmMetrics};

use super::entry::Entry;
use super::{Manager, ManagerError, is_live};
use crate::supervisor::protocol::{Empty, command};

impl Manager {
    pub async fn get_vm(&self, id: &str) -> Result<VmProto, ManagerError> {
        Ok(self.get(id).await?.to_proto())
    }

    /// VMs in id order, `page_size` at a time (0: all), after `page_token` (an id).
    pub async fn list(&self, page_size: usize, page_token: &str) -> (Vec<VmProto>, String) {
        let vms = self.vms.lock().await;
        // Ids are never empty, so an empty token excludes nothing.
        let mut out: Vec<VmProto> = vms
            .range::<str, _>((
                std::ops::Bound::Excluded(page_token),
                std::ops::Bound::Unbounded,
            ))
            .map(|(_, e)| e.to_proto())
            .collect();
        if page_size > 0 && out.len() > page_size {
            out.truncate(page_size);
            let next = out.last().map(|v| v.id.clone()).unwrap_or_default();
            return (out, next);
        }
        (out, String::new())
    }

    pub async fn metrics(&self, id: &str) -> Result<VmMetrics, ManagerError> {
        let entry = self.get(id).await?;
        if !is_live(entry.power()) {
            return Ok(VmMetrics {
                vm_id: id.into(),
                at: Some(proto::timestamp(proto::unix_ms())),
                ..Default::default()
            });
        }
        let reply = entry.command(command::Op::Metrics(Empty {})).await?;
        Ok(reply.metrics.unwrap_or_default())
    }

    /// Metrics of every running VM, in id order. The VM processes are asked all at once:
    /// one asked after another, a busy host's scheduler delay would add up over its VMs.
    pub async fn all_metrics(&self) -> Vec<VmMetrics> {
        let entries: Vec<Arc<Entry>> = self.vms.lock().await.values().cloned().collect();
        let asked = entries
            .iter()
            .filter(|e| is_live(e.power()))
            .map(|e| e.command(command::Op::Metrics(Empty {})));
        futures_util::future::join_all(asked)
            .await
            .into_iter()
            .filter_map(|r| r.ok().and_then(|r| r.metrics))
            .collect()
    }

    /// (VMs running, vCPUs and memory assigned to them).
    pub async fn usage(&self) -> (u32, u32, u64) {
        let vms = self.vms.lock().await;
        vms.values()
            .filter(|e| is_live(e.power()))
            .fold((0, 0, 0), |(n, c, m), e| {
                let r = e.lock();
                (n + 1, c + r.config.vcpus, m + r.config.memory_bytes)
            })
    }

    /// Memory VMs may still be given.
    pub async fn memory_available(&self) -> u64 {
        self.memory_free(&*self.vms.lock().await, "")
    }
}
