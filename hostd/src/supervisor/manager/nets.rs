//! The host side of a VM's network interfaces: the taps this host plugs onto the pool's
//! networks before a VM process starts (a boot, or a migration's incoming side before
//! the switchover), and removes when the VM stops, is destroyed or has left.
//!
//! A `NetConfig` with an empty tap and a network is this host's to plug; the entry keeps
//! it that way, and only the VM process's record gets the tap's name.

use proto::host::{NetworkAttachment, VmConfig};

use super::{Manager, ManagerError};
use crate::network::{NetworkError, NetworkKind, NetworkSpec, PeerChange};
use crate::supervisor::spec;

/// The networks `config`'s host-plugged interfaces are on (checked by `spec::validate`
/// already; one that fails here is left out).
pub(super) fn network_specs(config: &VmConfig) -> Vec<NetworkSpec> {
    config
        .nets
        .iter()
        .filter(|n| n.tap.is_empty())
        .filter_map(|n| Some(spec::attachment(&n.id, n.network.as_ref()?).ok()?.0))
        .collect()
}

/// `config` as a client gave it: the taps this host filled in for the VM process
/// emptied again (a record read back after a daemon restart).
pub(super) fn as_given(mut config: VmConfig) -> VmConfig {
    for n in &mut config.nets {
        if n.network.is_some() {
            n.tap.clear();
        }
    }
    config
}

impl Manager {
    /// Plugs VM `id`'s interfaces that have no tap onto their networks (made here if
    /// missing, a private network's peers set to the pool's) and returns `config` with
    /// the taps filled in. On failure nothing this call could have made is left.
    pub(super) async fn plug_nets(
        &self,
        id: &str,
        mut config: VmConfig,
    ) -> Result<VmConfig, ManagerError> {
        if config.nets.iter().all(|n| !n.tap.is_empty()) {
            return Ok(config);
        }
        let Some(networks) = &self.networks else {
            return Err(ManagerError::NoHostNetworks { id: id.into() });
        };
        let mut result = Ok(());
        for (index, n) in config.nets.iter_mut().enumerate() {
            let Some(a) = n.network.as_ref().filter(|_| n.tap.is_empty()) else {
                continue;
            };
            let step = async {
                let (net, peers) = spec::attachment(&n.id, a)?;
                let fail = |source| ManagerError::Network {
                    id: id.into(),
                    nic: n.id.clone(),
                    source: Box::new(source),
                };
                networks.ensure_network(&net).await.map_err(fail)?;
                if net.kind == NetworkKind::Private {
                    networks
                        .set_private_peers(&net, &peers)
                        .await
                        .map_err(fail)?;
                }
                let index = u16::try_from(index).unwrap_or(u16::MAX);
                networks.plug_tap(&net, id, index).await.map_err(fail)
            };
            match step.await {
                Ok(tap) => n.tap = tap,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        match result {
            Ok(()) => Ok(config),
            Err(e) => {
                self.unplug_nets(id, &as_given(config)).await;
                Err(e)
            }
        }
    }

    /// Removes VM `id`'s taps and the networks of `config` no other VM here is on.
    /// Best effort: what fails is logged (a restarted daemon cleans it).
    pub(super) async fn unplug_nets(&self, id: &str, config: &VmConfig) {
        let Some(networks) = &self.networks else {
            return;
        };
        let specs = network_specs(config);
        if specs.is_empty() {
            return;
        }
        if let Err(e) = networks.unplug(id).await {
            tracing::warn!(vm = %id, error = %proto::error_chain(&e), "removing the VM's taps");
        }
        for net in &specs {
            if let Err(e) = networks.remove_network_if_unused(net).await {
                tracing::warn!(vm = %id, network = %net.name, error = %proto::error_chain(&e), "removing an unused network");
            }
        }
    }

    /// Makes the private network `a`'s peers on this host exactly `a.peers`, if this host
    /// carries the network now (`None` when it does not: nothing changes).
    pub async fn set_network_peers(
        &self,
        a: &NetworkAttachment,
    ) -> Result<Option<PeerChange>, ManagerError> {
        let networks = self
            .networks
            .as_ref()
            .ok_or(ManagerError::HostNetworkingOff)?;
        let (net, peers) = spec::attachment(&a.name, a)?;
        let fail = |source| ManagerError::NetworkPeers {
            network: a.name.clone(),
            source: Box::new(source),
        };
        if net.kind != NetworkKind::Private {
            return Err(fail(NetworkError::NotPrivate {
                network: a.name.clone(),
            }));
        }
        let devices = networks.devices().await.map_err(fail)?;
        let vxlan = net.vxlan_name().unwrap_or_default();
        if !devices.iter().any(|d| d.name == vxlan) {
            return Ok(None);
        }
        networks
            .set_private_peers(&net, &peers)
            .await
            .map(Some)
            .map_err(fail)
    }

    /// After a restart: removes the taps of VMs this daemon does not know and the
    /// networks none of its VMs is on (what a crash left).
    pub(super) async fn cleanup_stale_nets(&self) {
        let Some(networks) = &self.networks else {
            return;
        };
        let (ids, specs): (Vec<String>, Vec<NetworkSpec>) = {
            let vms = self.vms.lock().await;
            let specs = vms
                .values()
                .flat_map(|e| network_specs(&e.lock().config))
                .collect();
            (vms.keys().cloned().collect(), specs)
        };
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        match networks.cleanup_stale(&ids, &specs).await {
            Ok(removed) if !removed.is_empty() => {
                tracing::info!(?removed, "removed network devices a previous daemon left")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %proto::error_chain(&e), "cleaning stale network devices")
            }
        }
    }
}
