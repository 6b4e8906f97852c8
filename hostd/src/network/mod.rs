//! The host side of guest networks: the bridges, VXLAN devices, forwarding entries and
//! taps that put a VM's VIFs on the pool's networks, made and removed over rtnetlink.
//!
//! # Model
//! - Every network a host carries is a Linux bridge ([`names`]: `pnb` + a hash, 15
//!   characters). A **private** or **internal** network has a bridge of its own, named
//!   from the network name. **External** networks share the bridge of their host NIC
//!   (named from the NIC), whose one uplink port is that NIC: a NIC can be the port of
//!   one bridge only, and networks over the same NIC differ by VLAN tag.
//! - A **private** network also has a VXLAN device (`pnx` + the bridge's hash) as a port
//!   of its bridge: VNI from the network name ([`names::vni`]), this host's underlay
//!   address as source, UDP port 4789 unless configured, no multicast group and no
//!   learning. It reaches the other hosts through one all-zero-MAC forwarding entry per
//!   peer (`00:00:00:00:00:00 dst PEER`), which [`HostNetworks::set_private_peers`] keeps
//!   equal to the peer set the pool gives.
//! - A **VIF** is a persistent tap (`pnt` + the VM id's hash + the VIF index), a port of its
//!   network's bridge, up, with the bridge's MTU, opened by the VM's virtio-net backend
//!   with [`TAP_FLAGS`]. Persistent: it outlives the VM process, so a migration's
//!   destination plugs it before the switchover and a VMM restart finds it again.
//! - **VLAN tags**: this module makes no 802.1Q devices and turns on no bridge VLAN
//!   filtering (the kernels this runs on have neither). A tagged network's VIF backend
//!   tags what its guest sends and accepts only frames of its tag (access-port
//!   semantics), so frames leave an external NIC tagged; the tag here is recorded and
//!   checked only.
//! - No state of its own: every name is derived from the network or VM, so a restarted
//!   `hostd` finds what it made, and [`HostNetworks::cleanup_stale`] removes what belongs
//!   to no VM or network it still knows. Devices whose names this module would not
//!   generate are never changed, except that a bridge's removal releases its ports.
//!
//! # Namespaces and runtime
//! A [`HostNetworks`] works in the network namespace of the thread that makes it (its
//! netlink socket is opened there) and makes taps in the namespace of the calling thread,
//! so both must be the same (the host's, in `hostd`). It must be made inside a tokio
//! runtime, which runs its netlink reader.
//!
//! # API
//! - [`HostNetworks::new`]`(HostNetConfig)`.
//! - [`HostNetworks::ensure_network`]`(&NetworkSpec) -> bridge name`: creates what is
//!   missing, idempotent; checks every input and the host NIC before creating anything.
//! - [`HostNetworks::set_private_peers`]`(&NetworkSpec, &[IpAddr]) -> PeerChange` and
//!   [`HostNetworks::private_peers`].
//! - [`HostNetworks::plug_tap`]`(&NetworkSpec, vm_id, vif_index) -> tap name`;
//!   [`HostNetworks::unplug`]`(vm_id)`, [`HostNetworks::unplug_vif`].
//! - [`HostNetworks::remove_network_if_unused`]`(&NetworkSpec) -> bool`.
//! - [`HostNetworks::cleanup_stale`]`(known_vms, known_networks) -> removed names`.
//! - [`HostNetworks::devices`]: the namespace's devices, for checks and tests.
//!
//! # Layout
//! - `names.rs`: device names, VNI, checks of names from outside.
//! - `host.rs`: [`HostNetworks`], the operations above.
//! - `netlink.rs`: the rtnetlink requests, typed ([`Device`]).
//! - `tap.rs`: the one thing netlink cannot do, creating a persistent tap.

mod host;
pub mod names;
pub(crate) mod netlink;
mod tap;

use std::io;
use std::net::IpAddr;

pub use host::{HostNetworks, PeerChange};
pub use netlink::Device;
pub use tap::TAP_FLAGS;

/// The smallest MTU a network may have (IPv4's minimum).
pub const MIN_MTU: u32 = 68;
/// The largest MTU a network may have (jumbo frames).
pub const MAX_MTU: u32 = 9000;
/// The VXLAN UDP port unless configured (IANA's).
pub const VXLAN_PORT: u16 = 4789;

/// What kind of network, and what it needs from this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetworkKind {
    /// Bridged onto the host NIC of this name on every host.
    External { nic: String },
    /// One L2 segment across all hosts, over VXLAN between them.
    Private,
    /// One host's bridge, with no uplink.
    Internal,
}

/// A pool network, as this host needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSpec {
    /// The pool's name for the network (1 to 64 bytes, no control characters).
    pub name: String,
    pub kind: NetworkKind,
    /// The VLAN tag (1 to 4094) the VIF backends apply; recorded and checked here only.
    pub vlan: Option<u16>,
    /// The MTU of the bridge and of every port this module makes.
    pub mtu: u32,
}

impl NetworkSpec {
    /// Checks every field; nothing else is done with a spec that fails.
    pub fn validate(&self) -> Result<(), NetworkError> {
        names::check_network_name(&self.name)?;
        if !(MIN_MTU..=MAX_MTU).contains(&self.mtu) {
            return Err(NetworkError::InvalidMtu {
                network: self.name.clone(),
                mtu: self.mtu,
            });
        }
        if let Some(vlan) = self.vlan
            && !(1..=4094).contains(&vlan)
        {
            return Err(NetworkError::InvalidVlan {
                network: self.name.clone(),
                vlan,
            });
        }
        if let NetworkKind::External { nic } = &self.kind {
            names::check_nic_name(nic)?;
        }
        Ok(())
    }

    /// The bridge that carries this network on a host.
    pub fn bridge_name(&self) -> String {
        match &self.kind {
            NetworkKind::External { nic } => names::nic_bridge_name(nic),
            NetworkKind::Private | NetworkKind::Internal => names::bridge_name(&self.name),
        }
    }

    /// The VXLAN device of a private network; `None` for other kinds.
    pub fn vxlan_name(&self) -> Option<String> {
        (self.kind == NetworkKind::Private).then(|| names::vxlan_name(&self.name))
    }
}

/// This host's settings for private networks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostNetConfig {
    /// The underlay address VXLAN packets leave from and the other hosts send to; private
    /// networks are refused without one.
    pub vxlan_local: Option<IpAddr>,
    /// The VXLAN UDP port, the same on every host of the pool.
    pub vxlan_port: u16,
}

impl Default for HostNetConfig {
    fn default() -> Self {
        HostNetConfig {
            vxlan_local: None,
            vxlan_port: VXLAN_PORT,
        }
    }
}

/// What went wrong with a network operation; input errors are found before any change.
#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{what} {name:?} is invalid: {reason}")]
    InvalidName {
        what: &'static str,
        name: String,
        reason: &'static str,
    },
    #[error("network {network:?}: MTU {mtu} is outside {MIN_MTU}..={MAX_MTU}")]
    InvalidMtu { network: String, mtu: u32 },
    #[error("network {network:?}: VLAN tag {vlan} is outside 1..=4094")]
    InvalidVlan { network: String, vlan: u16 },
    #[error("VIF index {index} is above {max}", max = names::MAX_VIF_INDEX)]
    InvalidVifIndex { index: u16 },
    #[error("host network configuration: {reason}")]
    InvalidConfig { reason: String },
    #[error("network {network:?}: host NIC {nic:?} does not exist on this host")]
    NicMissing { network: String, nic: String },
    #[error("network {network:?}: host NIC {nic:?} is already a port of {controller:?}")]
    NicInUse {
        network: String,
        nic: String,
        controller: String,
    },
    #[error("network {network:?}: host NIC {nic:?} has MTU {nic_mtu}, below the network's {mtu}")]
    NicMtuTooSmall {
        network: String,
        nic: String,
        nic_mtu: u32,
        mtu: u32,
    },
    #[error(
        "network {network:?}: bridge {bridge} carries MTU {bridge_mtu} for the other \
         networks on its NIC, not {mtu}; networks sharing a NIC must share its MTU"
    )]
    SharedMtuMismatch {
        network: String,
        bridge: String,
        bridge_mtu: u32,
        mtu: u32,
    },
    #[error(
        "private network {network:?} needs this host's VXLAN address (vxlan_local), and none is set"
    )]
    NoVxlanLocal { network: String },
    #[error("network {network:?} is not a private network, so it has no VXLAN peers")]
    NotPrivate { network: String },
    #[error(
        "network {network:?}: peer {peer} is not a unicast address of the family of this host's {local}"
    )]
    InvalidPeer {
        network: String,
        peer: IpAddr,
        local: IpAddr,
    },
    #[error("network {network:?} has no bridge {bridge} on this host (ensure_network first)")]
    NetworkMissing { network: String, bridge: String },
    #[error("device {device} exists but is {found}, not {expected}; it is left alone")]
    Conflict {
        device: String,
        found: String,
        expected: &'static str,
    },
    #[error("device {device} vanished while being set up (removed by someone else)")]
    Vanished { device: String },
    #[error("netlink: {op} {device}")]
    Netlink {
        op: &'static str,
        device: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("creating tap {tap}")]
    Tap {
        tap: String,
        #[source]
        source: io::Error,
    },
    #[error("opening a netlink socket")]
    Connection(#[source] io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: NetworkKind) -> NetworkSpec {
        NetworkSpec {
            name: "lan".into(),
            kind,
            vlan: None,
            mtu: 1500,
        }
    }

    #[test]
    fn validate_refuses_each_bad_field() {
        assert!(spec(NetworkKind::Internal).validate().is_ok());
        let nic = |n: &str| NetworkKind::External { nic: n.into() };
        assert!(spec(nic("eth0")).validate().is_ok());
        let cases = [
            NetworkSpec {
                mtu: 67,
                ..spec(NetworkKind::Private)
            },
            NetworkSpec {
                mtu: 9001,
                ..spec(NetworkKind::Private)
            },
            NetworkSpec {
                vlan: Some(0),
                ..spec(NetworkKind::Private)
            },
            NetworkSpec {
                vlan: Some(4095),
                ..spec(NetworkKind::Private)
            },
            NetworkSpec {
                name: String::new(),
                ..spec(NetworkKind::Private)
            },
            spec(nic("an-interface-name")),
            spec(nic("")),
        ];
        for case in cases {
            assert!(case.validate().is_err(), "{case:?}");
        }
        assert!(
            NetworkSpec {
                vlan: Some(4094),
                ..spec(NetworkKind::Private)
            }
            .validate()
            .is_ok()
        );
    }

    /// `hostd` keeps one in an `Arc` and calls it from spawned tasks.
    #[allow(dead_code)]
    fn host_networks_work_from_spawned_tasks(networks: &HostNetworks, spec: &NetworkSpec) {
        fn send<T: Send>(_: T) {}
        send(networks.ensure_network(spec));
        send(networks.set_private_peers(spec, &[]));
        send(networks.plug_tap(spec, "vm", 0));
        send(networks.unplug("vm"));
        send(networks.remove_network_if_unused(spec));
        send(networks.cleanup_stale(&[], &[]));
        let _: &(dyn Sync + Send) = networks;
    }

    #[test]
    fn external_networks_share_their_nic_bridge() {
        let a = NetworkSpec {
            name: "vlan10".into(),
            vlan: Some(10),
            ..spec(NetworkKind::External { nic: "eth1".into() })
        };
        let b = NetworkSpec {
            name: "vlan20".into(),
            vlan: Some(20),
            ..a.clone()
        };
        assert_eq!(a.bridge_name(), b.bridge_name());
        assert_eq!(a.vxlan_name(), None);
        let p = spec(NetworkKind::Private);
        let i = NetworkSpec {
            name: "other".into(),
            ..spec(NetworkKind::Internal)
        };
        assert_ne!(p.bridge_name(), i.bridge_name());
        assert_eq!(p.vxlan_name(), Some(names::vxlan_name("lan")));
    }
}
