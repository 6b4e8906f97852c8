//! The state machine's storage: storage repositories (a storaged's thin pool), the
//! volumes in them, and the figures storaged reports of both.

#![allow(clippy::result_large_err)]

use tonic::Code;

use super::command::*;
use super::machine::{Applied, PoolState, err};

impl PoolState {
    pub(super) fn create_sr(
        &mut self,
        sr: &proto::coordinator::StorageRepository,
    ) -> Result<Applied, CommandResult> {
        if sr.id.is_empty() || sr.address.is_empty() {
            return Err(err(
                Code::InvalidArgument,
                "a storage repository needs an id and a storaged address",
            ));
        }
        if let Some(o) = self
            .srs
            .values()
            .find(|o| o.address == sr.address && o.thin_pool_id == sr.thin_pool_id)
        {
            return Err(err(
                Code::AlreadyExists,
                format!(
                    "repository {} already uses thin pool {:?} of {}",
                    o.id, sr.thin_pool_id, sr.address
                ),
            ));
        }
        self.srs.insert(sr.id.clone(), sr.clone());
        Ok(Applied::done(&sr.id))
    }

    pub(super) fn remove_sr(&mut self, id: &str) -> Result<Applied, CommandResult> {
        if !self.srs.contains_key(id) {
            return Err(err(Code::NotFound, format!("no storage repository {id}")));
        }
        if let Some(v) = self.volumes.values().find(|v| v.pool_id == id) {
            return Err(err(
                Code::FailedPrecondition,
                format!("repository {id} still holds volume {}", v.id),
            ));
        }
        self.srs.remove(id);
        Ok(Applied::done(id))
    }

    /// Records a volume; its task runs until storaged has made it.
    pub(super) fn create_volume(
        &mut self,
        v: &CreateVolume,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        if !self.srs.contains_key(&v.sr_id) {
            return Err(err(
                Code::NotFound,
                format!("no storage repository {}", v.sr_id),
            ));
        }
        if v.virtual_size_bytes == 0 {
            return Err(err(Code::InvalidArgument, "a volume needs a non-zero size"));
        }
        self.volumes.insert(
            v.volume_id.clone(),
            proto::storage::Volume {
                id: v.volume_id.clone(),
                pool_id: v.sr_id.clone(),
                name: v.name.clone(),
                kind: proto::storage::VolumeKind::Volume as i32,
                virtual_size_bytes: v.virtual_size_bytes,
                block_size_bytes: 512,
                created_at: Some(proto::timestamp(at_ms)),
                labels: v.labels.clone(),
                ..Default::default()
            },
        );
        Ok(Applied::running(&v.volume_id, "waiting for storaged"))
    }

    pub(super) fn delete_volume(&mut self, id: &str) -> Result<Applied, CommandResult> {
        if !self.volumes.contains_key(id) {
            return Err(err(Code::NotFound, format!("no volume {id}")));
        }
        if let Some(vm) = self.vms.values().find(|vm| {
            vm.spec
                .as_ref()
                .is_some_and(|s| s.disks.iter().any(|d| d.volume_id == id))
        }) {
            return Err(err(
                Code::FailedPrecondition,
                format!("volume {id} is a disk of VM {}", vm.id),
            ));
        }
        self.volumes.remove(id);
        Ok(Applied::done(id))
    }

    /// What storaged reports: reachability, usage and portals of each repository, and
    /// the current figures of the volumes the pool knows in it.
    pub(super) fn storage_refresh(&mut self, r: &StorageRefresh, at_ms: u64) {
        for f in &r.srs {
            let Some(sr) = self.srs.get_mut(&f.sr_id) else {
                continue;
            };
            sr.reachable = f.reachable;
            if f.usage.is_some() {
                sr.usage = f.usage;
            }
            if !f.portals.is_empty() {
                sr.portals = f.portals.clone();
            }
            for v in &f.volumes {
                if let Some(mine) = self.volumes.get_mut(&v.id)
                    && mine.pool_id == f.sr_id
                {
                    let mut v = v.clone();
                    v.pool_id = f.sr_id.clone();
                    *mine = v;
                }
            }
            self.check_sr_space(&f.sr_id, at_ms);
        }
    }
}
