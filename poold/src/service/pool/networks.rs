//! Guest networks and VIFs: creating, listing and destroying them. Names are resolved to
//! ids here; the state machine checks everything else when the change commits
//! ([`crate::state::networks`]).

use proto::coordinator as pb;
use tonic::Status;

use super::PoolHandler;
use super::request::{need, page};
use crate::auth::Caller;
use crate::state::PoolState;
use crate::state::command::{ObjectId, Op, UpdateNetwork, UpdateVif};
use crate::state::networks::{MAX_RANGES, MAX_VIF_ADDRESSES};

fn network_id(s: &PoolState, r: &str) -> Result<String, Status> {
    s.network_by_ref(r)
        .map(|n| n.id.clone())
        .ok_or_else(|| Status::not_found(format!("no network named or with id {r:?}")))
}

/// One VIF on each named network, in order, for a new VM (MACs and ids come at apply).
/// Such a VIF has no addresses: a network with a subnet hands one out, a locked network
/// without one cannot take it.
pub(super) async fn vifs_on(svc: &PoolHandler, names: &[String]) -> Result<Vec<pb::Vif>, Status> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    svc.c
        .read(|s| {
            names
                .iter()
                .map(|n| {
                    let id = network_id(s, n)?;
                    if s.networks
                        .get(&id)
                        .is_some_and(|net| net.lock_addresses && net.subnet.is_empty())
                    {
                        return Err(Status::invalid_argument(format!(
                            "network {n:?} locks each VIF to its own addresses: create the VM \
                             without it, then add the VIF with `vif-create --ip`"
                        )));
                    }
                    Ok(pb::Vif {
                        network_id: id,
                        ..Default::default()
                    })
                })
                .collect()
        })
        .await?
}

/// A job holding the VM (a revert, a resume) plugs its VIFs as they were when it began:
/// none comes or goes meanwhile. (UpdateVif's state check does this; CreateVif and
/// DestroyVif predate it, and the log replays them without it.)
async fn not_busy(svc: &PoolHandler, vm_id: &str) -> Result<(), Status> {
    svc.c
        .read(|s| {
            s.vm_not_busy(vm_id, "")
                .map_err(|r| Status::new(tonic::Code::from(r.code), r.message))
        })
        .await?
}

/// At most this many addresses in one call: checked again when the change commits, here
/// so that a huge list never reaches the log.
fn few_addresses(ipv4: &[String]) -> Result<(), Status> {
    if ipv4.len() > MAX_VIF_ADDRESSES {
        return Err(Status::invalid_argument(format!(
            "a VIF holds at most {MAX_VIF_ADDRESSES} IPv4 addresses, not {}",
            ipv4.len()
        )));
    }
    Ok(())
}

/// At most this many ranges in one call: checked again when the change commits, here so
/// that a huge list never reaches the log.
fn few_ranges(ranges: &[String]) -> Result<(), Status> {
    if ranges.len() > MAX_RANGES {
        return Err(Status::invalid_argument(format!(
            "a network has at most {MAX_RANGES} address ranges, not {}",
            ranges.len()
        )));
    }
    Ok(())
}

pub(super) async fn create(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CreateNetworkRequest,
) -> Result<pb::Task, Status> {
    need("name", &r.name)?;
    // Without a subnet anyone allowed a VIF could claim any address (a router's); the
    // state machine does not refuse it, for networks created before subnets existed.
    if r.lock_addresses && r.subnet.is_empty() {
        return Err(Status::invalid_argument(
            "a network that locks addresses needs a subnet (--subnet) to hand them out from",
        ));
    }
    // An external network's LAN has a router the pool must never hand to a VIF.
    if r.lock_addresses && r.gateway.is_empty() && r.kind == pb::NetworkKind::External as i32 {
        return Err(Status::invalid_argument(
            "an external network that locks addresses needs its router's address (--gateway), \
             so that no VIF is given it",
        ));
    }
    few_ranges(&r.ranges)?;
    let host_id = if r.host_id.is_empty() {
        String::new()
    } else {
        // A host's name or id.
        svc.c
            .read(|s| {
                s.hosts
                    .values()
                    .find(|h| h.id == r.host_id || h.name == r.host_id)
                    .map_or(r.host_id.clone(), |h| h.id.clone())
            })
            .await?
    };
    let op = Op::CreateNetwork(pb::Network {
        id: uuid::Uuid::new_v4().to_string(),
        name: r.name,
        kind: r.kind,
        nic: r.nic,
        host_id,
        vlan: r.vlan,
        mtu: r.mtu,
        lock_addresses: r.lock_addresses,
        subnet: r.subnet,
        gateway: r.gateway,
        ranges: r.ranges,
        ..Default::default()
    });
    svc.c.write(who, &r.request_id, op).await
}

pub(super) async fn get(svc: &PoolHandler, id: String) -> Result<pb::Network, Status> {
    need("network_id", &id)?;
    svc.c
        .read(|s| s.network_by_ref(&id).cloned())
        .await?
        .ok_or_else(|| Status::not_found(format!("no network named or with id {id:?}")))
}

pub(super) async fn list(
    svc: &PoolHandler,
    r: pb::ListNetworksRequest,
) -> Result<pb::ListNetworksResponse, Status> {
    let (networks, next) = svc
        .c
        .read(|s| {
            page(
                s.networks.iter().map(|(k, v)| (k.clone(), v.clone())),
                r.page.as_ref(),
            )
        })
        .await?;
    Ok(pb::ListNetworksResponse {
        networks,
        next_page_token: next,
    })
}

pub(super) async fn destroy(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::DestroyNetworkRequest,
) -> Result<pb::Task, Status> {
    need("network_id", &r.network_id)?;
    let id = svc.c.read(|s| network_id(s, &r.network_id)).await??;
    svc.c
        .write(who, &r.request_id, Op::DestroyNetwork(ObjectId { id }))
        .await
}

pub(super) async fn create_vif(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::CreateVifRequest,
) -> Result<pb::Task, Status> {
    need("vm_id", &r.vm_id)?;
    need("network", &r.network)?;
    few_addresses(&r.ipv4)?;
    let network_id = svc.c.read(|s| network_id(s, &r.network)).await??;
    not_busy(svc, &r.vm_id).await?;
    let op = Op::CreateVif(pb::Vif {
        id: uuid::Uuid::new_v4().to_string(),
        vm_id: r.vm_id,
        network_id,
        mac: r.mac,
        rate_bytes_per_sec: r.rate_bytes_per_sec,
        rate_packets_per_sec: r.rate_packets_per_sec,
        ipv4: r.ipv4,
        ..Default::default()
    });
    svc.c.write(who, &r.request_id, op).await
}

pub(super) async fn list_vifs(
    svc: &PoolHandler,
    r: pb::ListVifsRequest,
) -> Result<pb::ListVifsResponse, Status> {
    let (vifs, next) = svc
        .c
        .read(|s| {
            let network = if r.network.is_empty() {
                None
            } else {
                Some(network_id(s, &r.network)?)
            };
            Ok::<_, Status>(page(
                s.vms
                    .values()
                    .filter(|vm| r.vm_id.is_empty() || vm.id == r.vm_id)
                    .flat_map(|vm| vm.vifs.iter())
                    .filter(|v| network.as_ref().is_none_or(|n| *n == v.network_id))
                    .map(|v| (v.id.clone(), v.clone()))
                    .collect::<std::collections::BTreeMap<_, _>>()
                    .into_iter(),
                r.page.as_ref(),
            ))
        })
        .await??;
    Ok(pb::ListVifsResponse {
        vifs,
        next_page_token: next,
    })
}

pub(super) async fn update(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::UpdateNetworkRequest,
) -> Result<pb::Task, Status> {
    need("network_id", &r.network_id)?;
    let Some(ranges) = r.ranges else {
        return Err(Status::invalid_argument(
            "nothing to change: give the network's ranges",
        ));
    };
    few_ranges(&ranges.ranges)?;
    let network_id = svc.c.read(|s| network_id(s, &r.network_id)).await??;
    let op = Op::UpdateNetwork(UpdateNetwork {
        network_id,
        ranges: Some(ranges),
    });
    svc.c.write(who, &r.request_id, op).await
}

pub(super) async fn update_vif(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::UpdateVifRequest,
) -> Result<pb::Task, Status> {
    need("vif_id", &r.vif_id)?;
    let Some(ipv4) = r.ipv4 else {
        return Err(Status::invalid_argument(
            "nothing to change: give the VIF's addresses",
        ));
    };
    few_addresses(&ipv4.ipv4)?;
    let op = Op::UpdateVif(UpdateVif {
        vif_id: r.vif_id,
        ipv4: Some(ipv4),
    });
    svc.c.write(who, &r.request_id, op).await
}

pub(super) async fn destroy_vif(
    svc: &PoolHandler,
    who: &Caller,
    r: pb::DestroyVifRequest,
) -> Result<pb::Task, Status> {
    need("vif_id", &r.vif_id)?;
    let vm_id = svc
        .c
        .read(|s| {
            s.vms
                .values()
                .find(|vm| vm.vifs.iter().any(|v| v.id == r.vif_id))
                .map(|vm| vm.id.clone())
        })
        .await?;
    if let Some(vm_id) = vm_id {
        not_busy(svc, &vm_id).await?;
    }
    svc.c
        .write(
            who,
            &r.request_id,
            Op::DestroyVif(ObjectId { id: r.vif_id }),
        )
        .await
}
