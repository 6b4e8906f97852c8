//! The state machine's hosts: joining and removing them, the states a person sets, and
//! what a host's heartbeat report changes (its facts, its state, its VMs).

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use tonic::Code;

use super::command::*;
use super::machine::{Applied, PoolState, err};

impl PoolState {
    fn host_mut(&mut self, id: &str) -> Result<&mut pb::Host, CommandResult> {
        self.hosts
            .get_mut(id)
            .ok_or_else(|| err(Code::NotFound, format!("no host with id {id}")))
    }

    pub(super) fn join_host(&mut self, j: &JoinHost, at_ms: u64) -> Result<Applied, CommandResult> {
        if j.host_id.is_empty() || j.address.is_empty() {
            return Err(err(
                Code::InvalidArgument,
                "a host needs an id and an address",
            ));
        }
        if let Some(h) = self.hosts.values().find(|h| h.address == j.address) {
            return Err(err(
                Code::AlreadyExists,
                format!("host {} already joined with address {}", h.id, j.address),
            ));
        }
        self.hosts.insert(
            j.host_id.clone(),
            pb::Host {
                id: j.host_id.clone(),
                name: j.name.clone(),
                address: j.address.clone(),
                state: pb::HostState::Enabled as i32,
                last_heartbeat_at: Some(proto::timestamp(at_ms)),
                ..Default::default()
            },
        );
        Ok(Applied::done(&j.host_id))
    }

    /// A state a person sets: enabled, disabled or maintenance. Unreachable and fenced
    /// are the pool's own verdicts, left only by the host's heartbeat.
    pub(super) fn set_host_state(&mut self, s: &SetHostState) -> Result<Applied, CommandResult> {
        let state = pb::HostState::try_from(s.state)
            .ok()
            .filter(|s| {
                matches!(
                    s,
                    pb::HostState::Enabled | pb::HostState::Disabled | pb::HostState::Maintenance
                )
            })
            .ok_or_else(|| err(Code::InvalidArgument, "bad host state"))?;
        let holds = self.alloc.get(&s.host_id).map_or(0, |a| a.vm_ids.len());
        let h = self.host_mut(&s.host_id)?;
        let cur = h.state();
        if state == pb::HostState::Enabled
            && matches!(cur, pb::HostState::Unreachable | pb::HostState::Fenced)
        {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "host {} is {}: it is enabled again by its own heartbeat",
                    s.host_id,
                    cur.as_str_name()
                ),
            ));
        }
        if state == pb::HostState::Maintenance && holds > 0 {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "host {} still holds {holds} VMs; evacuate it first",
                    s.host_id
                ),
            ));
        }
        h.state = state as i32;
        Ok(Applied::done(&s.host_id))
    }

    pub(super) fn remove_host(&mut self, id: &str, at_ms: u64) -> Result<Applied, CommandResult> {
        self.host_mut(id)?;
        if let Some(a) = self.alloc.get(id).filter(|a| !a.vm_ids.is_empty()) {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "host {} holds VMs {}; move or destroy them first",
                    id,
                    a.vm_ids.iter().cloned().collect::<Vec<_>>().join(", ")
                ),
            ));
        }
        if let Some(n) = self.networks.values().find(|n| n.host_id == id) {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "host {id} holds internal network {:?}; destroy it first",
                    n.name
                ),
            ));
        }
        self.clear_alert(pb::AlertKind::HostUnreachable, id, at_ms);
        self.hosts.remove(id);
        self.alloc.remove(id);
        Ok(Applied::done(id))
    }

    /// A heartbeat: the host's facts and metrics, its way back from unreachable or
    /// fenced, and the power states of its VMs (ignored while it is fenced: what a fenced
    /// host says of VMs restarted elsewhere is stale).
    pub(super) fn host_report(
        &mut self,
        r: &HostReport,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        let h = self.host_mut(&r.host_id)?;
        if let Some(info) = &r.info {
            h.info = Some(info.clone());
        }
        if r.metrics.is_some() {
            h.last_metrics = r.metrics.clone();
        }
        if r.nics_known {
            h.nics = r.nics.clone();
        }
        h.last_heartbeat_at = Some(proto::timestamp(at_ms));
        let state = h.state();
        let fencing = self.fence_job(&r.host_id).is_some();
        let runs_something = r.vms.iter().any(|v| super::vms::active(v.power_state));
        let h = self.host_mut(&r.host_id)?;
        match state {
            // Back before it was fenced: nothing was restarted elsewhere.
            pb::HostState::Unreachable if !fencing => h.state = pb::HostState::Enabled as i32,
            // A fenced host rejoins once it runs none of its old VMs.
            pb::HostState::Fenced if !runs_something => h.state = pb::HostState::Enabled as i32,
            _ => {}
        }
        if h.state() != state && h.state() == pb::HostState::Enabled {
            self.clear_alert(pb::AlertKind::HostUnreachable, &r.host_id, at_ms);
        }
        if state != pb::HostState::Fenced {
            for rv in &r.vms {
                self.apply_reported_vm(&r.host_id, rv, at_ms);
            }
        }
        Ok(Applied::done(&r.host_id))
    }

    /// The leader's verdict on hosts whose heartbeats stopped; the task's target lists
    /// them all.
    pub(super) fn mark_unreachable(&mut self, m: &MarkUnreachable, at_ms: u64) -> Applied {
        for id in &m.host_ids {
            if let Some(h) = self.hosts.get_mut(id)
                && matches!(
                    h.state(),
                    pb::HostState::Enabled | pb::HostState::Disabled | pb::HostState::Maintenance
                )
            {
                h.state = pb::HostState::Unreachable as i32;
                let message = format!("host {} stopped heartbeating", self.host_name(id));
                self.raise_alert(
                    pb::AlertKind::HostUnreachable,
                    pb::AlertSeverity::Error,
                    id,
                    message,
                    at_ms,
                );
            }
        }
        Applied::done(m.host_ids.join(","))
    }
}
