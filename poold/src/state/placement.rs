//! What the scheduler sees of the state: each host as a [`HostCandidate`] with what its
//! VMs hold ([`Allocation`], derived from `vms`), a VM's [`Demand`], the pool's
//! [`Policy`]; and the check that a placement still fits when it commits.

#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};

use proto::coordinator as pb;
use tonic::Code;

use super::command::CommandResult;
use super::machine::{PoolState, err};
use crate::scheduler::{self, Demand, HostCandidate, Policy, SrReach};

/// Per-host totals of what placed VMs hold; derived from `vms`, never persisted.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Allocation {
    pub memory_bytes: u64,
    pub vcpus: u32,
    pub vm_ids: BTreeSet<String>,
    pub groups: Vec<String>,
}

/// The IP part of "ip:port" or "\[v6\]:port" (the whole string when there is no port).
pub fn address_ip(addr: &str) -> String {
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return sa.ip().to_string();
    }
    match addr.rsplit_once(':') {
        Some((h, _)) => h.trim_start_matches("http://").to_owned(),
        None => addr.to_owned(),
    }
}

impl PoolState {
    /// The same filters the scheduler ran, run again at commit time.
    pub(crate) fn check_fits(&self, vm: &pb::Vm, host_id: &str) -> Result<(), CommandResult> {
        let h = self
            .hosts
            .get(host_id)
            .ok_or_else(|| err(Code::NotFound, format!("no host with id {host_id}")))?;
        let cand = self.candidate(h);
        let demand = self.vm_demand(vm);
        let r = scheduler::hard_filters(&cand, &demand, &self.policy());
        if r.is_empty() {
            Ok(())
        } else {
            // ABORTED: the placement was decided on a view this log has moved past; the
            // caller schedules again. Not remembered under the request id (see `apply`).
            Err(err(
                Code::Aborted,
                format!(
                    "host {host_id} cannot take VM {}: {}",
                    vm.id,
                    r.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ))
        }
    }

    pub fn policy(&self) -> Policy {
        Policy {
            strategy: pb::PlacementStrategy::try_from(self.settings.placement)
                .unwrap_or(pb::PlacementStrategy::Spread),
            cpu_overcommit_percent: self.settings.cpu_overcommit_percent,
            memory_overcommit_percent: self.settings.memory_overcommit_percent,
        }
    }

    pub fn candidate(&self, h: &pb::Host) -> HostCandidate {
        let info = h.info.clone().unwrap_or_default();
        let a = self.alloc.get(&h.id).cloned().unwrap_or_default();
        HostCandidate {
            id: h.id.clone(),
            state: h.state(),
            memory_bytes: if info.memory_available_bytes > 0 {
                info.memory_available_bytes
            } else {
                info.memory_total_bytes
            },
            logical_cpus: info.logical_cpus,
            memory_allocated_bytes: a.memory_bytes,
            vcpus_allocated: a.vcpus,
            cpu_features: info.cpu.map(|c| c.features).unwrap_or_default(),
            ip: address_ip(&h.address),
            groups: a.groups,
            nics: h.nics.clone(),
        }
    }

    pub fn candidates(&self) -> Vec<HostCandidate> {
        self.hosts.values().map(|h| self.candidate(h)).collect()
    }

    pub fn demand(&self, spec: &pb::VmSpec) -> Demand {
        let mut srs: Vec<SrReach> = Vec::new();
        for d in &spec.disks {
            if let Some(v) = self.volumes.get(&d.volume_id)
                && let Some(sr) = self.srs.get(&v.pool_id)
                && !srs.iter().any(|s| s.id == sr.id)
            {
                srs.push(SrReach {
                    id: sr.id.clone(),
                    reachable: sr.reachable,
                    shared: sr.shared,
                    ip: address_ip(&sr.address),
                });
            }
        }
        Demand {
            vcpus: spec.vcpus,
            memory_bytes: spec.memory_bytes,
            required_cpu_features: spec.required_cpu_features.clone(),
            affinity_group: spec.affinity_group.clone(),
            anti_affinity_group: spec.anti_affinity_group.clone(),
            srs,
            networks: Vec::new(),
        }
    }

    /// What a VM needs: its spec's demand and its VIFs' networks.
    pub fn vm_demand(&self, vm: &pb::Vm) -> Demand {
        let spec = vm.spec.clone().unwrap_or_default();
        let ids: Vec<&str> = vm.vifs.iter().map(|v| v.network_id.as_str()).collect();
        self.demand_on(&spec, &ids)
    }

    /// A spec's demand on these networks (ids).
    pub fn demand_on(&self, spec: &pb::VmSpec, network_ids: &[&str]) -> Demand {
        Demand {
            networks: self.network_reach(network_ids.iter().copied()),
            ..self.demand(spec)
        }
    }

    /// Recomputes what every host holds from the VMs (after any VM change), and copies
    /// the totals into the hosts.
    pub fn rebuild_alloc(&mut self) {
        let mut alloc: BTreeMap<String, Allocation> = BTreeMap::new();
        for vm in self.vms.values() {
            if vm.host_id.is_empty() {
                continue;
            }
            let spec = vm.spec.clone().unwrap_or_default();
            let a = alloc.entry(vm.host_id.clone()).or_default();
            a.memory_bytes += spec.memory_bytes;
            a.vcpus += spec.vcpus;
            a.vm_ids.insert(vm.id.clone());
            for g in [spec.affinity_group, spec.anti_affinity_group] {
                if !g.is_empty() && !a.groups.contains(&g) {
                    a.groups.push(g);
                }
            }
        }
        let ids: Vec<String> = self.hosts.keys().cloned().collect();
        for id in ids {
            let a = alloc.get(&id).cloned().unwrap_or_default();
            let vm_ids: Vec<String> = a.vm_ids.iter().cloned().collect();
            let h = &self.hosts[&id];
            // Only a host whose figures move counts as changed.
            if (h.memory_allocated_bytes, h.vcpus_allocated, &h.vm_ids)
                == (a.memory_bytes, a.vcpus, &vm_ids)
            {
                continue;
            }
            if let Some(h) = self.hosts.get_mut(&id) {
                h.memory_allocated_bytes = a.memory_bytes;
                h.vcpus_allocated = a.vcpus;
                h.vm_ids = vm_ids;
            }
        }
        self.alloc = alloc;
    }
}
