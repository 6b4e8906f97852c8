//! The rtnetlink requests this module makes, with typed results: the host's devices as
//! [`Device`] values, bridges, VXLAN devices, a port's controller/MTU/state, deletion, and
//! the VXLAN device's all-zero-MAC forwarding entries (one per peer).

use std::net::IpAddr;

use futures_util::TryStreamExt;
use futures_util::stream::StreamExt;
use rtnetlink::packet_core::{
    NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload,
};
use rtnetlink::packet_route::link::{
    InfoData, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::{Handle, LinkBridge, LinkUnspec, LinkVxlan};

use super::NetworkError;

/// The MAC of the VXLAN forwarding entries that flood to a peer (broadcast, unknown
/// unicast and multicast are sent to every such entry's destination).
const FLOOD_MAC: [u8; 6] = [0; 6];
const ENODEV: i32 = libc::ENODEV;
const ENOENT: i32 = libc::ENOENT;

/// One network device of the host, as netlink reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// The interface index.
    pub index: u32,
    /// The interface name.
    pub name: String,
    /// The link kind (`bridge`, `vxlan`, `tun`, `veth`, ...); `None` for a physical NIC.
    pub kind: Option<String>,
    /// The index of the bridge (or other controller) this device is a port of.
    pub controller: Option<u32>,
    /// The MTU.
    pub mtu: u32,
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// A VXLAN device's VNI.
    pub vni: Option<u32>,
    /// A VXLAN device's destination UDP port.
    pub vxlan_port: Option<u16>,
    /// A VXLAN device's local (source) address.
    pub vxlan_local: Option<IpAddr>,
}

impl Device {
    fn from_message(message: &LinkMessage) -> Device {
        let mut device = Device {
            index: message.header.index,
            name: String::new(),
            kind: None,
            controller: None,
            mtu: 0,
            up: message.header.flags.contains(LinkFlags::Up),
            vni: None,
            vxlan_port: None,
            vxlan_local: None,
        };
        for attribute in &message.attributes {
            match attribute {
                LinkAttribute::IfName(name) => device.name = name.clone(),
                LinkAttribute::Mtu(mtu) => device.mtu = *mtu,
                LinkAttribute::Controller(index) if *index != 0 => device.controller = Some(*index),
                LinkAttribute::LinkInfo(infos) => {
                    for info in infos {
                        match info {
                            LinkInfo::Kind(kind) => device.kind = Some(kind.to_string()),
                            LinkInfo::Data(InfoData::Vxlan(vxlan)) => {
                                for item in vxlan {
                                    match item {
                                        InfoVxlan::Id(vni) => device.vni = Some(*vni),
                                        InfoVxlan::Port(port) => device.vxlan_port = Some(*port),
                                        InfoVxlan::Local(ip) => {
                                            device.vxlan_local = Some((*ip).into())
                                        }
                                        InfoVxlan::Local6(ip) => {
                                            device.vxlan_local = Some((*ip).into())
                                        }
                                        _ => {}
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        device
    }

    /// Whether this device's link kind is `kind` (`bridge`, `vxlan`, `tun`, ...).
    pub fn kind_is(&self, kind: &str) -> bool {
        self.kind.as_deref() == Some(kind)
    }
}

/// What to change on a device: each `Some` is set, `up` brings it up.
#[derive(Debug, Default, Clone, Copy)]
pub struct LinkChange {
    pub mtu: Option<u32>,
    pub controller: Option<u32>,
    pub up: bool,
}

/// An rtnetlink connection: its socket lives in the network namespace of the thread that
/// made it, and its reader is a task on the current tokio runtime.
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

fn failed(op: &'static str, device: &str) -> impl FnOnce(rtnetlink::Error) -> NetworkError {
    let device = device.to_owned();
    move |source| NetworkError::Netlink { op, device, source }
}

/// An FDB entry's destination: the parser leaves AF_BRIDGE addresses as raw bytes.
fn peer_address(address: &NeighbourAddress) -> Option<IpAddr> {
    match address {
        NeighbourAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        NeighbourAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        NeighbourAddress::Other(bytes) => match bytes.len() {
            4 => <[u8; 4]>::try_from(bytes.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(bytes.as_slice())
                .ok()
                .map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}

fn errno(error: &rtnetlink::Error) -> Option<i32> {
    match error {
        rtnetlink::Error::NetlinkError(message) => Some(message.raw_code().abs()),
        _ => None,
    }
}

impl Netlink {
    /// Opens the socket and spawns its reader; must run inside a tokio runtime.
    pub fn open() -> Result<Netlink, NetworkError> {
        let (connection, handle, _) =
            rtnetlink::new_connection().map_err(NetworkError::Connection)?;
        tokio::spawn(connection);
        Ok(Netlink { handle })
    }

    /// Every device of the namespace.
    pub async fn devices(&self) -> Result<Vec<Device>, NetworkError> {
        let messages: Vec<LinkMessage> = self
            .handle
            .link()
            .get()
            .execute()
            .try_collect()
            .await
            .map_err(failed("listing links", "*"))?;
        Ok(messages.iter().map(Device::from_message).collect())
    }

    /// The device named `name`, if there is one.
    pub async fn device(&self, name: &str) -> Result<Option<Device>, NetworkError> {
        Ok(self.devices().await?.into_iter().find(|d| d.name == name))
    }

    /// Creates a bridge, down; STP stays off (the kernel's default), so ports forward at
    /// once.
    pub async fn add_bridge(&self, name: &str) -> Result<(), NetworkError> {
        let message = LinkBridge::new(name).build();
        self.handle
            .link()
            .add(message)
            .execute()
            .await
            .map_err(failed("creating bridge", name))
    }

    /// Creates a VXLAN device, down, sending from `local` to UDP `port` of the peers in
    /// its forwarding table: no multicast group, and no learning of remote MACs (every
    /// frame to a MAC the bridge has not placed goes to every peer), so a VM that moves
    /// between hosts is reachable as soon as the bridges learn its new port.
    pub async fn add_vxlan(
        &self,
        name: &str,
        vni: u32,
        local: IpAddr,
        port: u16,
        mtu: u32,
    ) -> Result<(), NetworkError> {
        let builder = LinkVxlan::new(name, vni)
            .port(port)
            .learning(false)
            .mtu(mtu);
        let builder = match local {
            IpAddr::V4(ip) => builder.local(ip),
            IpAddr::V6(ip) => builder.local6(ip),
        };
        self.handle
            .link()
            .add(builder.build())
            .execute()
            .await
            .map_err(failed("creating VXLAN device", name))
    }

    /// Applies `change` to the device `index` (named `name`, for errors).
    pub async fn set(
        &self,
        index: u32,
        name: &str,
        change: LinkChange,
    ) -> Result<(), NetworkError> {
        let mut builder = LinkUnspec::new_with_index(index);
        if let Some(mtu) = change.mtu {
            builder = builder.mtu(mtu);
        }
        if let Some(controller) = change.controller {
            builder = builder.controller(controller);
        }
        if change.up {
            builder = builder.up();
        }
        self.handle
            .link()
            .set(builder.build())
            .execute()
            .await
            .map_err(failed("setting MTU, bridge or state of", name))
    }

    /// Deletes the device `index`; one already gone is not an error.
    pub async fn delete(&self, index: u32, name: &str) -> Result<(), NetworkError> {
        match self.handle.link().del(index).execute().await {
            Err(e) if errno(&e) == Some(ENODEV) => Ok(()),
            other => other.map_err(failed("deleting", name)),
        }
    }

    /// The peers the VXLAN device `index` floods to: its all-zero-MAC entries.
    pub async fn flood_peers(&self, index: u32, name: &str) -> Result<Vec<IpAddr>, NetworkError> {
        let entries: Vec<NeighbourMessage> = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .map_err(failed("listing forwarding entries of", name))?;
        let mut peers = Vec::new();
        for entry in entries.iter().filter(|e| e.header.ifindex == index) {
            let mut mac = None;
            let mut destination = None;
            for attribute in &entry.attributes {
                match attribute {
                    NeighbourAttribute::LinkLayerAddress(lla) => mac = Some(lla.as_slice()),
                    NeighbourAttribute::Destination(address) => destination = peer_address(address),
                    _ => {}
                }
            }
            if let (Some(mac), Some(ip)) = (mac, destination)
                && mac == FLOOD_MAC
                && !peers.contains(&ip)
            {
                peers.push(ip);
            }
        }
        Ok(peers)
    }

    fn flood_entry(index: u32, peer: IpAddr) -> NeighbourMessage {
        let mut message = NeighbourMessage::default();
        message.header.family = AddressFamily::Bridge;
        message.header.ifindex = index;
        message.header.state = NeighbourState::Permanent;
        // NTF_SELF: the VXLAN device's own table, not that of the bridge it is a port of.
        message.header.flags = NeighbourFlags::Own;
        message
            .attributes
            .push(NeighbourAttribute::LinkLayerAddress(FLOOD_MAC.to_vec()));
        message
            .attributes
            .push(NeighbourAttribute::Destination(match peer {
                IpAddr::V4(ip) => NeighbourAddress::Inet(ip),
                IpAddr::V6(ip) => NeighbourAddress::Inet6(ip),
            }));
        message
    }

    /// Adds `peer` to the VXLAN device's flood list (`bridge fdb append 00:00:00:00:00:00
    /// dev NAME dst PEER`): NLM_F_APPEND adds a destination to the all-zero entry instead
    /// of replacing it, which rtnetlink's own request cannot ask for.
    pub async fn add_flood_peer(
        &self,
        index: u32,
        name: &str,
        peer: IpAddr,
    ) -> Result<(), NetworkError> {
        let mut request = NetlinkMessage::from(RouteNetlinkMessage::NewNeighbour(
            Self::flood_entry(index, peer),
        ));
        request.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND;
        self.acknowledged(request)
            .await
            .map_err(failed("adding a VXLAN peer to", name))
    }

    /// Removes `peer` from the VXLAN device's flood list; one already gone is not an error.
    pub async fn remove_flood_peer(
        &self,
        index: u32,
        name: &str,
        peer: IpAddr,
    ) -> Result<(), NetworkError> {
        let request = self.handle.neighbours().del(Self::flood_entry(index, peer));
        match request.execute().await {
            Err(e) if errno(&e) == Some(ENOENT) => Ok(()),
            other => other.map_err(failed("removing a VXLAN peer from", name)),
        }
    }

    async fn acknowledged(
        &self,
        request: NetlinkMessage<RouteNetlinkMessage>,
    ) -> Result<(), rtnetlink::Error> {
        let mut handle = self.handle.clone();
        let mut response = handle.request(request)?;
        while let Some(message) = response.next().await {
            if let NetlinkPayload::Error(error) = message.payload
                && error.code.is_some()
            {
                return Err(rtnetlink::Error::NetlinkError(error));
            }
        }
        Ok(())
    }
}
