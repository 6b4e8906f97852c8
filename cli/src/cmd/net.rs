//! `poolctl network-*` and `vif-*`: guest networks and the VMs' interfaces on them.

use clap::Subcommand;
use pool_client::new_request_id;
use proto::coordinator as pb;

use crate::ctl::{Ctl, call};
use crate::lookup::pick;
use crate::output::{Table, enum_name, or_dash, ts};

#[derive(Debug, Subcommand)]
pub enum NetCommand {
    /// Create a guest network: external (bridged onto host NIC --nic on every host),
    /// private (one segment across all hosts) or internal (one host's, --host).
    #[command(name = "network-create")]
    Create {
        name: String,
        #[arg(long, value_parser = network_kind)]
        kind: i32,
        /// External: the host NIC (e.g. eth1) it is bridged onto.
        #[arg(long)]
        nic: Option<String>,
        /// Internal: the host (name or id) it lives on.
        #[arg(long)]
        host: Option<String>,
        /// 802.1Q tag 1-4094; the guests see untagged frames.
        #[arg(long, default_value_t = 0)]
        vlan: u32,
        /// 68-9000; default 1500.
        #[arg(long, default_value_t = 0)]
        mtu: u32,
        /// The IPv4 subnet VIFs' addresses come from (10.0.0.0/24): a VIF made without
        /// --ip gets the lowest free host address, and may hold only host addresses of it.
        #[arg(long)]
        subnet: Option<String>,
        /// The subnet's router, never handed to a VIF.
        #[arg(long)]
        gateway: Option<String>,
        /// Addresses of the subnet the pool owns (10.0.0.100-10.0.0.199, or one address;
        /// repeat for more): it hands out only these, and a VIF may hold only these, so
        /// the other machines on the LAN keep theirs. Needs --subnet; by default, all of
        /// its host addresses but the gateway.
        #[arg(long = "range")]
        ranges: Vec<String>,
        /// Lock each VIF to its own addresses: its guest sends only ARP and IPv4 from
        /// them. Needs --subnet.
        #[arg(long)]
        lock_addresses: bool,
    },
    /// Change a network's address ranges; its VIFs' addresses must lie in the new ones.
    #[command(name = "network-update")]
    Update {
        network: String,
        /// The addresses the pool owns from now on (as network-create's --range), in place
        /// of the old ranges.
        #[arg(long = "range", required_unless_present = "no_ranges")]
        ranges: Vec<String>,
        /// Drop the ranges: every host address of the subnet but the gateway.
        #[arg(long, conflicts_with = "ranges")]
        no_ranges: bool,
    },
    /// Guest networks.
    #[command(name = "network-list")]
    List,
    /// Remove a network no VIF is on.
    #[command(name = "network-destroy")]
    Destroy { network: String },
    /// Give a stopped VM an interface on a network.
    #[command(name = "vif-create")]
    VifCreate {
        vm: String,
        network: String,
        /// A unicast MAC unique in the pool; by default the pool assigns one.
        #[arg(long)]
        mac: Option<String>,
        /// Rate limit in bytes per second, each direction (no limit by default).
        #[arg(long)]
        rate_bytes: Option<u64>,
        /// Rate limit in packets per second, each direction.
        #[arg(long)]
        rate_packets: Option<u64>,
        /// An IPv4 address of the VIF, unique on its network; repeat for more. On a
        /// network with --lock-addresses, the only ones its guest may send from. By
        /// default, a network with a subnet hands out its lowest free one.
        #[arg(long = "ip")]
        ipv4: Vec<String>,
    },
    /// Change a stopped VM's interface: its addresses.
    #[command(name = "vif-update")]
    VifUpdate {
        vif: String,
        /// The VIF's addresses from now on (repeat for more), in place of its old ones.
        #[arg(long = "ip", required_unless_present = "reset_ips")]
        ipv4: Vec<String>,
        /// Drop its addresses; a network with a subnet hands out its lowest free one.
        #[arg(long, conflicts_with = "ipv4")]
        reset_ips: bool,
    },
    /// VIFs, of one VM (--vm) or on one network (--network), or all.
    #[command(name = "vif-list")]
    VifList {
        #[arg(long)]
        vm: Option<String>,
        #[arg(long)]
        network: Option<String>,
    },
    /// Remove a stopped VM's interface.
    #[command(name = "vif-destroy")]
    VifDestroy { vif: String },
}

fn network_kind(s: &str) -> Result<i32, String> {
    Ok(match s {
        "external" => pb::NetworkKind::External,
        "private" => pb::NetworkKind::Private,
        "internal" => pb::NetworkKind::Internal,
        other => return Err(format!("{other:?}: one of external, private, internal")),
    } as i32)
}

pub async fn run(ctl: &mut Ctl, command: NetCommand) -> anyhow::Result<()> {
    match command {
        NetCommand::Create {
            name,
            kind,
            nic,
            host,
            vlan,
            mtu,
            subnet,
            gateway,
            ranges,
            lock_addresses,
        } => {
            let host_id = ctl.host_id_or_any(host.as_deref()).await?;
            let r = call!(
                ctl.client,
                create_network,
                pb::CreateNetworkRequest {
                    request_id: new_request_id(),
                    name,
                    kind,
                    nic: nic.unwrap_or_default(),
                    host_id,
                    vlan,
                    mtu,
                    lock_addresses,
                    subnet: subnet.unwrap_or_default(),
                    gateway: gateway.unwrap_or_default(),
                    ranges,
                }
            )?;
            ctl.follow(r).await?;
        }
        NetCommand::List => {
            let networks = ctl.networks().await?;
            let hosts = ctl.hosts().await?;
            ctl.print(&network_table(networks, &hosts, ctl.json));
        }
        NetCommand::Destroy { network } => {
            let network_id = ctl.network_id(&network).await?;
            let r = call!(
                ctl.client,
                destroy_network,
                pb::DestroyNetworkRequest {
                    request_id: new_request_id(),
                    network_id,
                }
            )?;
            ctl.follow(r).await?;
        }
        NetCommand::Update {
            network,
            ranges,
            no_ranges: _,
        } => {
            // Without --range, --no-ranges was given (clap requires one of them).
            let network_id = ctl.network_id(&network).await?;
            let r = call!(
                ctl.client,
                update_network,
                pb::UpdateNetworkRequest {
                    request_id: new_request_id(),
                    network_id,
                    ranges: Some(pb::NetworkRanges { ranges }),
                }
            )?;
            ctl.follow(r).await?;
        }
        NetCommand::VifCreate {
            vm,
            network,
            mac,
            rate_bytes,
            rate_packets,
            ipv4,
        } => {
            let vm_id = ctl.vm_id(&vm).await?;
            let network = ctl.network_id(&network).await?;
            let r = call!(
                ctl.client,
                create_vif,
                pb::CreateVifRequest {
                    request_id: new_request_id(),
                    vm_id,
                    network,
                    mac: mac.unwrap_or_default(),
                    rate_bytes_per_sec: rate_bytes,
                    rate_packets_per_sec: rate_packets,
                    ipv4,
                }
            )?;
            ctl.follow(r).await?;
        }
        NetCommand::VifList { vm, network } => {
            let vm_id = match vm {
                Some(v) => ctl.vm_id(&v).await?,
                None => String::new(),
            };
            let network = match network {
                Some(n) => ctl.network_id(&n).await?,
                None => String::new(),
            };
            let mut vifs = Vec::new();
            let mut token = String::new();
            loop {
                let r = call!(
                    ctl.client,
                    list_vifs,
                    pb::ListVifsRequest {
                        vm_id: vm_id.clone(),
                        network: network.clone(),
                        page: Some(pb::PageRequest {
                            page_size: 1000,
                            page_token: token.clone(),
                        }),
                    }
                )?;
                vifs.extend(r.vifs);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            ctl.print(&vif_table(vifs));
        }
        NetCommand::VifUpdate {
            vif,
            ipv4,
            reset_ips: _,
        } => {
            // Without --ip, --reset-ips was given (clap requires one of them).
            let r = call!(
                ctl.client,
                update_vif,
                pb::UpdateVifRequest {
                    request_id: new_request_id(),
                    vif_id: vif,
                    ipv4: Some(pb::VifAddresses { ipv4 }),
                }
            )?;
            ctl.follow(r).await?;
        }
        NetCommand::VifDestroy { vif } => {
            let r = call!(
                ctl.client,
                destroy_vif,
                pb::DestroyVifRequest {
                    request_id: new_request_id(),
                    vif_id: vif,
                }
            )?;
            ctl.follow(r).await?;
        }
    }
    Ok(())
}

impl Ctl {
    pub async fn networks(&mut self) -> anyhow::Result<Vec<pb::Network>> {
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let r = call!(
                self.client,
                list_networks,
                pb::ListNetworksRequest {
                    page: Some(pb::PageRequest {
                        page_size: 1000,
                        page_token: token.clone()
                    }),
                }
            )?;
            out.extend(r.networks);
            if r.next_page_token.is_empty() {
                return Ok(out);
            }
            token = r.next_page_token;
        }
    }

    pub async fn network_id(&mut self, name_or_id: &str) -> anyhow::Result<String> {
        let networks = self.networks().await?;
        pick(
            networks.iter().map(|n| (n.id.as_str(), n.name.as_str())),
            name_or_id,
            "network",
        )
    }
}

/// The network-list table; an internal network's host reads as its name for people and
/// as its id in JSON.
fn network_table(networks: Vec<pb::Network>, hosts: &[pb::Host], ids: bool) -> Table {
    let mut t = Table::new(&[
        "ID", "NAME", "KIND", "NIC", "HOST", "VLAN", "MTU", "VNI", "SUBNET", "GATEWAY", "RANGES",
        "LOCKED", "CREATED",
    ]);
    for n in networks {
        let host = match hosts.iter().find(|h| h.id == n.host_id) {
            Some(h) if !ids => h.name.clone(),
            _ => n.host_id.clone(),
        };
        t.row(vec![
            n.id.clone().into(),
            n.name.clone().into(),
            enum_name(n.kind().as_str_name().into(), "NETWORK_KIND_").into(),
            n.nic.clone().into(),
            host.into(),
            n.vlan.into(),
            n.mtu.into(),
            n.vni.into(),
            or_dash(n.subnet.clone()).into(),
            or_dash(n.gateway.clone()).into(),
            or_dash(n.ranges.join(",")).into(),
            n.lock_addresses.into(),
            ts(&n.created_at).into(),
        ]);
    }
    t
}

fn vif_table(vifs: Vec<pb::Vif>) -> Table {
    let mut t = Table::new(&[
        "ID",
        "VM",
        "NETWORK",
        "MAC",
        "IPV4",
        "RATE_BYTES",
        "RATE_PACKETS",
    ]);
    let limit = |r: Option<u64>| r.map_or("-".to_owned(), |r| r.to_string());
    for v in vifs {
        t.row(vec![
            v.id.into(),
            v.vm_id.into(),
            v.network_name.into(),
            v.mac.into(),
            or_dash(v.ipv4.join(",")).into(),
            limit(v.rate_bytes_per_sec).into(),
            limit(v.rate_packets_per_sec).into(),
        ]);
    }
    t
}

/// A VM's VIFs for `vm-list --long`: `network=mac`, comma-separated, in device order.
pub fn vifs_cell(vifs: &[pb::Vif]) -> String {
    vifs.iter()
        .map(|v| format!("{}={}", v.network_name, v.mac))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_parse_and_unknown_ones_are_named() {
        assert_eq!(network_kind("private"), Ok(pb::NetworkKind::Private as i32));
        assert!(network_kind("bridge").unwrap_err().contains("external"));
    }

    #[test]
    fn tables_show_kind_host_and_vifs() {
        let hosts = vec![pb::Host {
            id: "h-1".into(),
            name: "rack1".into(),
            ..Default::default()
        }];
        let n = pb::Network {
            id: "n-1".into(),
            name: "lab".into(),
            kind: pb::NetworkKind::Internal as i32,
            host_id: "h-1".into(),
            mtu: 1500,
            ..Default::default()
        };
        let people = network_table(vec![n.clone()], &hosts, false).render(false);
        assert!(
            people.contains("internal") && people.contains("rack1"),
            "{people}"
        );
        let json = network_table(vec![n], &hosts, true).render(true);
        assert!(json.contains("\"host\": \"h-1\""), "{json}");
        let vifs = vec![
            pb::Vif {
                network_name: "lab".into(),
                mac: "02:00:00:00:00:01".into(),
                ..Default::default()
            },
            pb::Vif {
                network_name: "wan".into(),
                mac: "02:00:00:00:00:02".into(),
                rate_packets_per_sec: Some(1000),
                ipv4: vec!["10.0.0.2".into(), "10.0.0.3".into()],
                ..Default::default()
            },
        ];
        assert_eq!(
            vifs_cell(&vifs),
            "lab=02:00:00:00:00:01,wan=02:00:00:00:00:02"
        );
        let t = vif_table(vifs).render(true);
        assert!(
            t.contains("\"rate_packets\": 1000") || t.contains("\"rate_packets\": \"1000\""),
            "{t}"
        );
        assert!(t.contains("\"ipv4\": \"10.0.0.2,10.0.0.3\""), "{t}");
    }
}
