//! [`HostNetworks`]: one host's bridges, VXLAN devices, peers and taps, made, kept and
//! removed from the pool's specs; every call reads the kernel's state afresh.

use std::collections::HashSet;
use std::net::IpAddr;

use super::names::{self, Owned};
use super::netlink::{Device, LinkChange, Netlink};
use super::{HostNetConfig, NetworkError, NetworkKind, NetworkSpec, tap};

/// What [`HostNetworks::set_private_peers`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerChange {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

/// This host's side of the pool's networks (see the module docs). Shareable (`Send +
/// Sync`); its changes run one at a time, so two VMs starting on one network at once do
/// not both create its bridge.
pub struct HostNetworks {
    netlink: Netlink,
    config: HostNetConfig,
    changes: tokio::sync::Mutex<()>,
}

fn find<'a>(devices: &'a [Device], name: &str) -> Option<&'a Device> {
    devices.iter().find(|d| d.name == name)
}

fn expect_kind(device: &Device, kind: &'static str) -> Result<(), NetworkError> {
    if device.kind_is(kind) {
        return Ok(());
    }
    Err(NetworkError::Conflict {
        device: device.name.clone(),
        found: device
            .kind
            .clone()
            .unwrap_or_else(|| "a physical device".into()),
        expected: kind,
    })
}

fn checked_vif(index: u16) -> Result<u8, NetworkError> {
    u8::try_from(index).map_err(|_| NetworkError::InvalidVifIndex { index })
}

impl HostNetworks {
    /// Opens the netlink socket in the calling thread's network namespace; must run inside
    /// a tokio runtime.
    pub fn new(config: HostNetConfig) -> Result<HostNetworks, NetworkError> {
        if config.vxlan_port == 0 {
            return Err(NetworkError::InvalidConfig {
                reason: "VXLAN port 0".into(),
            });
        }
        if let Some(local) = config.vxlan_local
            && (local.is_unspecified() || local.is_multicast())
        {
            return Err(NetworkError::InvalidConfig {
                reason: format!("VXLAN address {local} is not a unicast address"),
            });
        }
        Ok(HostNetworks {
            netlink: Netlink::open()?,
            config,
            changes: tokio::sync::Mutex::new(()),
        })
    }

    /// Every network device of this namespace.
    pub async fn devices(&self) -> Result<Vec<Device>, NetworkError> {
        self.netlink.devices().await
    }

    /// Makes `spec`'s bridge (and for a private network its VXLAN device, for an external
    /// one its NIC as a port) exist, up, with the spec's MTU; returns the bridge's name.
    /// Idempotent. Every input, the NIC and any same-named device are checked before
    /// anything is created, and what a failed call created is removed again. A private
    /// network's VXLAN device made again (its VNI, port or address differed) has no peers:
    /// call [`Self::set_private_peers`] after this.
    pub async fn ensure_network(&self, spec: &NetworkSpec) -> Result<String, NetworkError> {
        spec.validate()?;
        let _serial = self.changes.lock().await;
        let bridge_name = spec.bridge_name();
        let devices = self.netlink.devices().await?;
        let bridge = find(&devices, &bridge_name);
        if let Some(bridge) = bridge {
            expect_kind(bridge, "bridge")?;
        }
        let mut nic = None;
        let mut vxlan = None;
        match &spec.kind {
            NetworkKind::External { nic: nic_name } => {
                let device = find(&devices, nic_name).ok_or_else(|| NetworkError::NicMissing {
                    network: spec.name.clone(),
                    nic: nic_name.clone(),
                })?;
                if let Some(controller) = device.controller
                    && Some(controller) != bridge.map(|b| b.index)
                {
                    let controller = devices
                        .iter()
                        .find(|d| d.index == controller)
                        .map_or_else(|| format!("interface {controller}"), |d| d.name.clone());
                    return Err(NetworkError::NicInUse {
                        network: spec.name.clone(),
                        nic: nic_name.clone(),
                        controller,
                    });
                }
                if device.mtu < spec.mtu {
                    return Err(NetworkError::NicMtuTooSmall {
                        network: spec.name.clone(),
                        nic: nic_name.clone(),
                        nic_mtu: device.mtu,
                        mtu: spec.mtu,
                    });
                }
                if let Some(bridge) = bridge
                    && bridge.mtu != spec.mtu
                    && devices.iter().any(|d| {
                        d.controller == Some(bridge.index)
                            && matches!(names::parse(&d.name), Some(Owned::Tap { .. }))
                    })
                {
                    return Err(NetworkError::SharedMtuMismatch {
                        network: spec.name.clone(),
                        bridge: bridge_name,
                        bridge_mtu: bridge.mtu,
                        mtu: spec.mtu,
                    });
                }
                nic = Some(device.clone());
            }
            NetworkKind::Private => {
                let local = self
                    .config
                    .vxlan_local
                    .ok_or_else(|| NetworkError::NoVxlanLocal {
                        network: spec.name.clone(),
                    })?;
                let name = names::vxlan_name(&spec.name);
                if let Some(device) = find(&devices, &name) {
                    expect_kind(device, "vxlan")?;
                }
                vxlan = Some((name, local));
            }
            NetworkKind::Internal => {}
        }

        let created_bridge = bridge.is_none();
        if created_bridge {
            self.netlink.add_bridge(&bridge_name).await?;
        }
        let result = self.finish_network(spec, &bridge_name, nic, vxlan).await;
        if result.is_err() && created_bridge {
            self.remove_by_name(&bridge_name).await;
        }
        result.map(|()| bridge_name)
    }

    async fn finish_network(
        &self,
        spec: &NetworkSpec,
        bridge_name: &str,
        nic: Option<Device>,
        vxlan: Option<(String, IpAddr)>,
    ) -> Result<(), NetworkError> {
        let bridge = self.existing(bridge_name).await?;
        // Setting the MTU (rather than creating with it) pins it: the bridge no longer
        // follows its ports' smallest MTU as ports come and go.
        let change = LinkChange {
            mtu: Some(spec.mtu),
            up: true,
            ..LinkChange::default()
        };
        self.netlink.set(bridge.index, bridge_name, change).await?;
        let to_bridge = LinkChange {
            controller: Some(bridge.index),
            up: true,
            ..LinkChange::default()
        };
        if let Some(nic) = nic {
            self.netlink.set(nic.index, &nic.name, to_bridge).await?;
        }
        if let Some((name, local)) = vxlan {
            let vni = names::vni(&spec.name);
            let port = self.config.vxlan_port;
            let existing = self.netlink.device(&name).await?;
            let stale = existing.as_ref().filter(|d| {
                d.vni != Some(vni) || d.vxlan_port != Some(port) || d.vxlan_local != Some(local)
            });
            if let Some(stale) = stale {
                self.netlink.delete(stale.index, &name).await?;
            }
            let created = existing.is_none() || stale.is_some();
            if created {
                self.netlink
                    .add_vxlan(&name, vni, local, port, spec.mtu)
                    .await?;
            }
            let device = self.existing(&name).await?;
            let change = LinkChange {
                mtu: Some(spec.mtu),
                ..to_bridge
            };
            if let Err(e) = self.netlink.set(device.index, &name, change).await {
                if created {
                    self.remove_by_name(&name).await;
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Makes the peers of the private network `spec` exactly `peers` (this host's own
    /// address, if listed, is left out): adds the missing all-zero-MAC forwarding entries
    /// and removes the stale ones. The peers are checked before any change.
    pub async fn set_private_peers(
        &self,
        spec: &NetworkSpec,
        peers: &[IpAddr],
    ) -> Result<PeerChange, NetworkError> {
        let _serial = self.changes.lock().await;
        let (vxlan, local) = self.private_device(spec).await?;
        let mut wanted = Vec::new();
        for &peer in peers {
            let same_family = peer.is_ipv4() == local.is_ipv4();
            if !same_family || peer.is_unspecified() || peer.is_multicast() || peer.is_loopback() {
                return Err(NetworkError::InvalidPeer {
                    network: spec.name.clone(),
                    peer,
                    local,
                });
            }
            if peer != local && !wanted.contains(&peer) {
                wanted.push(peer);
            }
        }
        let current = self.netlink.flood_peers(vxlan.index, &vxlan.name).await?;
        let mut change = PeerChange::default();
        for &peer in wanted.iter().filter(|p| !current.contains(p)) {
            self.netlink
                .add_flood_peer(vxlan.index, &vxlan.name, peer)
                .await?;
            change.added.push(peer);
        }
        for &peer in current.iter().filter(|p| !wanted.contains(p)) {
            self.netlink
                .remove_flood_peer(vxlan.index, &vxlan.name, peer)
                .await?;
            change.removed.push(peer);
        }
        Ok(change)
    }

    /// The peers the private network `spec`'s VXLAN device floods to now.
    pub async fn private_peers(&self, spec: &NetworkSpec) -> Result<Vec<IpAddr>, NetworkError> {
        let (vxlan, _) = self.private_device(spec).await?;
        self.netlink.flood_peers(vxlan.index, &vxlan.name).await
    }

    async fn private_device(&self, spec: &NetworkSpec) -> Result<(Device, IpAddr), NetworkError> {
        spec.validate()?;
        let name = spec.vxlan_name().ok_or_else(|| NetworkError::NotPrivate {
            network: spec.name.clone(),
        })?;
        let local = self
            .config
            .vxlan_local
            .ok_or_else(|| NetworkError::NoVxlanLocal {
                network: spec.name.clone(),
            })?;
        let device =
            self.netlink
                .device(&name)
                .await?
                .ok_or_else(|| NetworkError::NetworkMissing {
                    network: spec.name.clone(),
                    bridge: spec.bridge_name(),
                })?;
        expect_kind(&device, "vxlan")?;
        Ok((device, local))
    }

    /// Makes the tap of VIF `vif_index` (0 to 255) of `vm_id` exist as a port of `spec`'s
    /// bridge, with the bridge's MTU, up; returns its name, which the VM's backend opens
    /// with [`super::TAP_FLAGS`]. A tap that exists already is reused (a VMM restart, a
    /// repeated migration prepare). The network must have been ensured on this host.
    pub async fn plug_tap(
        &self,
        spec: &NetworkSpec,
        vm_id: &str,
        vif_index: u16,
    ) -> Result<String, NetworkError> {
        spec.validate()?;
        names::check_vm_id(vm_id)?;
        let vif = checked_vif(vif_index)?;
        let _serial = self.changes.lock().await;
        let bridge_name = spec.bridge_name();
        let bridge = self.netlink.device(&bridge_name).await?.ok_or_else(|| {
            NetworkError::NetworkMissing {
                network: spec.name.clone(),
                bridge: bridge_name.clone(),
            }
        })?;
        expect_kind(&bridge, "bridge")?;
        let name = names::tap_name(vm_id, vif);
        let created = match self.netlink.device(&name).await? {
            Some(existing) => {
                expect_kind(&existing, "tun")?;
                false
            }
            None => {
                tap::create_persistent(&name).map_err(|source| NetworkError::Tap {
                    tap: name.clone(),
                    source,
                })?;
                true
            }
        };
        let tap = self.existing(&name).await?;
        let change = LinkChange {
            mtu: Some(bridge.mtu),
            controller: Some(bridge.index),
            up: true,
        };
        if let Err(e) = self.netlink.set(tap.index, &name, change).await {
            if created {
                self.remove_by_name(&name).await;
            }
            return Err(e);
        }
        Ok(name)
    }

    /// Removes every tap of `vm_id` on this host; returns their names.
    pub async fn unplug(&self, vm_id: &str) -> Result<Vec<String>, NetworkError> {
        names::check_vm_id(vm_id)?;
        let _serial = self.changes.lock().await;
        let vm = names::vm_hash(vm_id);
        self.remove_where(|owned| matches!(owned, Owned::Tap { vm: v, .. } if v == vm))
            .await
    }

    /// Removes the tap of one VIF of `vm_id`, if it exists; returns whether it did.
    pub async fn unplug_vif(&self, vm_id: &str, vif_index: u16) -> Result<bool, NetworkError> {
        names::check_vm_id(vm_id)?;
        let _serial = self.changes.lock().await;
        let wanted = Owned::Tap {
            vm: names::vm_hash(vm_id),
            vif: checked_vif(vif_index)?,
        };
        Ok(!self.remove_where(|owned| owned == wanted).await?.is_empty())
    }

    /// Removes `spec`'s bridge (and VXLAN device) unless a port other than its uplink (the
    /// NIC, the VXLAN device) is on it: a VIF of this network or, for an external network,
    /// of another network on the same NIC. Removing the bridge releases its NIC, which
    /// stays up. Returns whether the network is now absent from this host.
    pub async fn remove_network_if_unused(&self, spec: &NetworkSpec) -> Result<bool, NetworkError> {
        spec.validate()?;
        let _serial = self.changes.lock().await;
        let devices = self.netlink.devices().await?;
        let vxlan_name = spec.vxlan_name();
        let uplink = match &spec.kind {
            NetworkKind::External { nic } => Some(nic.clone()),
            _ => vxlan_name.clone(),
        };
        if let Some(bridge) = find(&devices, &spec.bridge_name()) {
            expect_kind(bridge, "bridge")?;
            let in_use = devices
                .iter()
                .any(|d| d.controller == Some(bridge.index) && Some(&d.name) != uplink.as_ref());
            if in_use {
                return Ok(false);
            }
        }
        if let Some(vxlan) = vxlan_name.as_deref().and_then(|name| find(&devices, name)) {
            expect_kind(vxlan, "vxlan")?;
            self.netlink.delete(vxlan.index, &vxlan.name).await?;
        }
        if let Some(bridge) = find(&devices, &spec.bridge_name()) {
            self.netlink.delete(bridge.index, &bridge.name).await?;
        }
        Ok(true)
    }

    /// Removes what this module made that belongs to none of `known_vms` and
    /// `known_networks` (for a restarted `hostd`, what a crash left): the taps of other
    /// VMs, then the bridges of other networks with no tap left on them, and the VXLAN
    /// devices of other networks whose bridge is gone or removed. Devices with names this
    /// module would not generate are left alone. Returns the names removed.
    pub async fn cleanup_stale(
        &self,
        known_vms: &[&str],
        known_networks: &[NetworkSpec],
    ) -> Result<Vec<String>, NetworkError> {
        let _serial = self.changes.lock().await;
        let vms: HashSet<u64> = known_vms.iter().map(|vm| names::vm_hash(vm)).collect();
        let mut removed = self
            .remove_where(|owned| matches!(owned, Owned::Tap { vm, .. } if !vms.contains(&vm)))
            .await?;

        let keep_bridges: HashSet<String> =
            known_networks.iter().map(|n| n.bridge_name()).collect();
        let keep_vxlans: HashSet<String> = known_networks
            .iter()
            .filter_map(|n| n.vxlan_name())
            .collect();
        let devices = self.netlink.devices().await?;
        let has_tap = |bridge: &Device| {
            devices.iter().any(|d| {
                d.controller == Some(bridge.index)
                    && matches!(names::parse(&d.name), Some(Owned::Tap { .. }))
            })
        };
        let kept_bridges: HashSet<u32> = devices
            .iter()
            .filter(|d| matches!(names::parse(&d.name), Some(Owned::Bridge(_))))
            .filter(|d| keep_bridges.contains(&d.name) || has_tap(d))
            .map(|d| d.index)
            .collect();
        let stale = devices.iter().filter(|d| match names::parse(&d.name) {
            Some(Owned::Vxlan(_)) => {
                !keep_vxlans.contains(&d.name)
                    && !d.controller.is_some_and(|c| kept_bridges.contains(&c))
            }
            Some(Owned::Bridge(_)) => !kept_bridges.contains(&d.index),
            _ => false,
        });
        // VXLAN devices first, so no VXLAN device is left without its bridge for a moment
        // and then missed.
        let (vxlans, bridges): (Vec<&Device>, Vec<&Device>) =
            stale.partition(|d| matches!(names::parse(&d.name), Some(Owned::Vxlan(_))));
        for device in vxlans.into_iter().chain(bridges) {
            self.netlink.delete(device.index, &device.name).await?;
            removed.push(device.name.clone());
        }
        Ok(removed)
    }

    async fn remove_where(
        &self,
        matches: impl Fn(Owned) -> bool,
    ) -> Result<Vec<String>, NetworkError> {
        let mut removed = Vec::new();
        for device in self.netlink.devices().await? {
            if names::parse(&device.name).is_some_and(&matches) {
                self.netlink.delete(device.index, &device.name).await?;
                removed.push(device.name);
            }
        }
        Ok(removed)
    }

    async fn existing(&self, name: &str) -> Result<Device, NetworkError> {
        self.netlink
            .device(name)
            .await?
            .ok_or_else(|| NetworkError::Vanished {
                device: name.to_owned(),
            })
    }

    /// Best-effort removal on a failed call's way out; the call's own error is the one
    /// reported.
    async fn remove_by_name(&self, name: &str) {
        let removal = async {
            if let Some(device) = self.netlink.device(name).await? {
                self.netlink.delete(device.index, name).await?;
            }
            Ok::<(), NetworkError>(())
        };
        if let Err(e) = removal.await {
            tracing::warn!(
                device = name,
                error = &e as &dyn std::error::Error,
                "undoing a failed network change"
            );
        }
    }
}
