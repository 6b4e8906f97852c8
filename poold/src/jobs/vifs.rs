//! A VM's network interfaces as a host gets them: the pool's VIF plans for that host
//! (`PoolState::vif_plans`) as hostd's `NetConfig`s, each naming its network for hostd
//! to plug a tap onto.

use proto::coordinator as pb;
use proto::host as hpb;

use crate::state::PoolState;

/// The network interfaces of `vm` on `host_id`, in VIF order (`eth0`, `eth1`, ...), each
/// with an empty tap for hostd to plug onto the network the attachment describes.
pub fn nets_on(s: &PoolState, vm: &pb::Vm, host_id: &str) -> Vec<hpb::NetConfig> {
    s.vif_plans(vm, host_id)
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let kind = match p.network.kind() {
                pb::NetworkKind::External => hpb::AttachmentKind::External,
                pb::NetworkKind::Private => hpb::AttachmentKind::Private,
                pb::NetworkKind::Internal => hpb::AttachmentKind::Internal,
                pb::NetworkKind::Unspecified => hpb::AttachmentKind::Unspecified,
            };
            hpb::NetConfig {
                id: format!("eth{i}"),
                tap: String::new(),
                mac: p.vif.mac.clone(),
                mtu: p.network.mtu,
                rate_bytes_per_sec: p.vif.rate_bytes_per_sec,
                rate_packets_per_sec: p.vif.rate_packets_per_sec,
                vlan: (p.network.vlan != 0).then_some(p.network.vlan),
                // The VMM's own ceiling: the pool has no setting for it.
                busy_poll_us: None,
                lock: p.network.lock_addresses.then(|| hpb::AddressLock {
                    ipv4: p.vif.ipv4.clone(),
                }),
                network: Some(hpb::NetworkAttachment {
                    network_id: p.network.id.clone(),
                    name: p.network.name.clone(),
                    kind: kind as i32,
                    nic: p.network.nic.clone(),
                    vlan: p.network.vlan,
                    mtu: p.network.mtu,
                    vni: p.network.vni,
                    peers: p.peers,
                }),
            }
        })
        .collect()
}
