//! The state machine's guest networks and VIFs: creating and destroying networks, the
//! VIFs of VMs on them, the MACs the pool hands out, and what placement needs to know of
//! a VM's networks.
//!
//! VIFs live in their VM (`Vm.vifs`), so they travel with it through migration, HA
//! restarts and snapshots of the state. MACs are unique in the pool. One the pool assigns
//! is `02:pp:pp:xx:xx:xx`: `02` is a locally administered unicast first octet, `pp:pp` the
//! low 16 bits of the FNV-1a hash of the pool id (so two pools on one LAN rarely share
//! the prefix), `xx:xx:xx` the low 24 bits of the FNV-1a hash of the VIF id, moved on by
//! one until free. Both hashes come from the command and the state, so every member
//! assigns the same MAC.

#![allow(clippy::result_large_err)]

use proto::coordinator as pb;
use proto::host as hpb;
use tonic::Code;

use super::command::CommandResult;
use super::machine::{Applied, PoolState, err};
use crate::scheduler::NetReach;

/// The default MTU of a network created without one.
pub const DEFAULT_MTU: u32 = 1500;
/// The MTUs a network may have.
pub const MTUS: std::ops::RangeInclusive<u32> = 68..=9000;
/// 802.1Q tags a network may carry (0 is "untagged", 4095 reserved).
pub const VLANS: std::ops::RangeInclusive<u32> = 1..=4094;
pub use proto::MAX_VIF_ADDRESSES;

/// A VIF's addresses checked and written the one way (unicast IPv4, no repeats).
fn vif_addresses(asked: &[String]) -> Result<Vec<std::net::Ipv4Addr>, CommandResult> {
    let bad = |m: String| Err(err(Code::InvalidArgument, m));
    if asked.len() > MAX_VIF_ADDRESSES {
        return bad(format!(
            "a VIF holds at most {MAX_VIF_ADDRESSES} IPv4 addresses, not {}",
            asked.len()
        ));
    }
    let mut out = Vec::with_capacity(asked.len());
    for a in asked {
        let Some(ip) = proto::vif_ipv4(a) else {
            return bad(format!("{a:?} is not a unicast IPv4 address"));
        };
        if out.contains(&ip) {
            return bad(format!("address {ip} is given twice"));
        }
        out.push(ip);
    }
    Ok(out)
}

/// The prefix lengths a network's subnet may have: at least 2 host addresses, no more
/// than a /8 of them.
pub const SUBNET_PREFIXES: std::ops::RangeInclusive<u8> = 8..=30;

/// A network's IPv4 subnet: its first address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Subnet {
    base: u32,
    prefix: u8,
}

impl Subnet {
    /// "10.0.0.0/24" as a new network's subnet: a prefix in [`SUBNET_PREFIXES`], no host
    /// bits set, unicast addresses only (not 0/8, 127/8 or 224/3).
    pub fn parse(s: &str) -> Result<Subnet, String> {
        let (ip, prefix) = Subnet::parts(s)
            .ok_or_else(|| format!("subnet {s:?} is not an IPv4 network like 10.0.0.0/24"))?;
        if !SUBNET_PREFIXES.contains(&prefix) {
            return Err(format!(
                "subnet {s}: a prefix of /{}-/{} leaves room for VIFs, not /{prefix}",
                SUBNET_PREFIXES.start(),
                SUBNET_PREFIXES.end()
            ));
        }
        let net = Subnet {
            base: u32::from(ip),
            prefix,
        };
        let mask = u32::MAX << (32 - prefix);
        if net.base & !mask != 0 {
            return Err(format!(
                "subnet {s} has host bits set: the network is {}/{prefix}",
                std::net::Ipv4Addr::from(net.base & mask)
            ));
        }
        // A prefix of 8 or more lies in one first octet.
        if matches!(net.base >> 24, 0 | 127 | 224..) {
            return Err(format!(
                "subnet {s} is not for interfaces (0/8, loopback, multicast or reserved)"
            ));
        }
        Ok(net)
    }

    /// A subnet as the state holds it, checked when its network was made: read without
    /// today's rules, so that a stricter check never changes what a replayed log did.
    fn read(s: &str) -> Option<Subnet> {
        let (ip, prefix) = Subnet::parts(s).filter(|(_, p)| (1..=30).contains(p))?;
        Some(Subnet {
            base: u32::from(ip),
            prefix,
        })
    }

    /// "a.b.c.d/n" as its address and prefix length, n at most 32.
    fn parts(s: &str) -> Option<(std::net::Ipv4Addr, u8)> {
        let (ip, len) = s.split_once('/')?;
        let prefix: u8 = len.parse().ok().filter(|p| *p <= 32)?;
        Some((ip.parse().ok()?, prefix))
    }

    /// Its addresses a VIF or a gateway may hold: all but the first and the last.
    fn hosts(self) -> std::ops::RangeInclusive<u32> {
        let last = self.base | (u32::MAX >> self.prefix);
        self.base + 1..=last - 1
    }

    fn holds(self, ip: std::net::Ipv4Addr) -> bool {
        self.hosts().contains(&u32::from(ip))
    }
}

impl std::fmt::Display for Subnet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", std::net::Ipv4Addr::from(self.base), self.prefix)
    }
}

/// The subnet of a network that has one (checked when the network was created).
fn subnet_of(n: &pb::Network) -> Option<Subnet> {
    Subnet::read(&n.subnet)
}

/// The most address ranges a network may have.
pub const MAX_RANGES: usize = 16;

/// "10.0.0.100-10.0.0.199", or one address, as its first and last address.
fn range_parts(s: &str) -> Option<std::ops::RangeInclusive<u32>> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    // ASCII spaces only: what counts as Unicode whitespace must not change a replay.
    let a: std::net::Ipv4Addr = a.trim_ascii().parse().ok()?;
    let b: std::net::Ipv4Addr = b.trim_ascii().parse().ok()?;
    Some(u32::from(a)..=u32::from(b))
}

fn range_text(r: &std::ops::RangeInclusive<u32>) -> String {
    let (a, b) = (
        std::net::Ipv4Addr::from(*r.start()),
        std::net::Ipv4Addr::from(*r.end()),
    );
    if a == b {
        a.to_string()
    } else {
        format!("{a}-{b}")
    }
}

/// A new network's ranges, written the one way and in order: each within the subnet's
/// host addresses, first before last, none holding the gateway or overlapping another.
fn parse_ranges(
    asked: &[String],
    subnet: Subnet,
    gateway: Option<std::net::Ipv4Addr>,
) -> Result<Vec<String>, String> {
    if asked.len() > MAX_RANGES {
        return Err(format!(
            "a network has at most {MAX_RANGES} address ranges, not {}",
            asked.len()
        ));
    }
    let mut ranges = Vec::with_capacity(asked.len());
    for a in asked {
        let r = range_parts(a).ok_or_else(|| {
            format!("range {a:?} is not an address or two like 10.0.0.100-10.0.0.199")
        })?;
        if r.is_empty() {
            return Err(format!("range {a}: its first address comes after its last"));
        }
        let hosts = subnet.hosts();
        if !hosts.contains(r.start()) || !hosts.contains(r.end()) {
            return Err(format!(
                "range {a} is not within the host addresses of subnet {subnet}"
            ));
        }
        if let Some(g) = gateway.filter(|g| r.contains(&u32::from(*g))) {
            return Err(format!("range {a} holds the gateway {g}"));
        }
        ranges.push(r);
    }
    ranges.sort_by_key(|r| *r.start());
    if let Some(w) = ranges.windows(2).find(|w| w[1].start() <= w[0].end()) {
        return Err(format!(
            "ranges {} and {} overlap",
            range_text(&w[0]),
            range_text(&w[1])
        ));
    }
    Ok(ranges.iter().map(range_text).collect())
}

/// The addresses the pool hands out on a network: its ranges, else its subnet's hosts
/// (the gateway is left out by the caller), else none. Stored ranges were checked when
/// the network was made.
fn pool_of(n: &pb::Network, subnet: Subnet) -> Vec<std::ops::RangeInclusive<u32>> {
    if n.ranges.is_empty() {
        vec![subnet.hosts()]
    } else {
        n.ranges.iter().filter_map(|r| range_parts(r)).collect()
    }
}

/// Whether `ip` lies in one of `pool`'s ranges.
fn owns(pool: &[std::ops::RangeInclusive<u32>], ip: std::net::Ipv4Addr) -> bool {
    pool.iter().any(|r| r.contains(&u32::from(ip)))
}

/// Where a network with a subnet hands VIF addresses out from, in words: "subnet S", or
/// "ranges (A-B, C)".
pub(super) fn handed_from(n: &pb::Network) -> String {
    if n.ranges.is_empty() {
        format!("subnet {}", n.subnet)
    } else {
        format!("ranges ({})", n.ranges.join(", "))
    }
}

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

/// A MAC as six bytes from "aa:bb:cc:dd:ee:ff" (or with '-'), case-insensitive.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    let bad = || format!("MAC {s:?} is not six hex octets like 02:00:00:00:00:01");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut mac = [0u8; 6];
    for (o, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(bad());
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(mac)
}

pub fn format_mac(m: [u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A network name: 1-64 of letters, digits, '.', '_' and '-'.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// A Linux interface name: 1-15 bytes, no '/', ':' or whitespace, not "." or "..".
fn valid_nic(n: &str) -> bool {
    !n.is_empty()
        && n.len() < 16
        && n != "."
        && n != ".."
        && n.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'/' && b != b':')
}

impl PoolState {
    /// The first three octets of the MACs this pool assigns.
    pub fn mac_prefix(&self) -> [u8; 3] {
        let h = fnv1a(self.pool_id.as_bytes());
        [0x02, (h >> 8) as u8, h as u8]
    }

    /// Every MAC a VIF of the pool holds.
    fn macs_in_use(&self) -> std::collections::BTreeSet<String> {
        self.vms
            .values()
            .flat_map(|vm| vm.vifs.iter().map(|v| v.mac.clone()))
            .collect()
    }

    /// The network with this id, or else this name.
    pub fn network_by_ref(&self, r: &str) -> Option<&pb::Network> {
        self.networks
            .get(r)
            .or_else(|| self.networks.values().find(|n| n.name == r))
    }

    pub(super) fn create_network(
        &mut self,
        n: &pb::Network,
        at_ms: u64,
    ) -> Result<Applied, CommandResult> {
        let bad = |m: String| Err(err(Code::InvalidArgument, m));
        if n.id.is_empty() {
            return bad("a network needs an id".into());
        }
        if !valid_name(&n.name) {
            return bad(format!(
                "network name {:?}: use 1-64 letters, digits, '.', '_' or '-'",
                n.name
            ));
        }
        if self.networks.contains_key(&n.id) {
            return Err(err(Code::AlreadyExists, format!("network {} exists", n.id)));
        }
        if let Some(o) = self.networks.values().find(|o| o.name == n.name) {
            return Err(err(
                Code::AlreadyExists,
                format!("network name {:?} is taken by network {}", n.name, o.id),
            ));
        }
        if n.vlan != 0 && !VLANS.contains(&n.vlan) {
            return bad(format!("VLAN tag {} is outside 1-4094", n.vlan));
        }
        let mtu = if n.mtu == 0 { DEFAULT_MTU } else { n.mtu };
        if !MTUS.contains(&mtu) {
            return bad(format!(
                "MTU {mtu} is outside {}-{}",
                MTUS.start(),
                MTUS.end()
            ));
        }
        let mut n = n.clone();
        n.mtu = mtu;
        if !n.subnet.is_empty() {
            let net = Subnet::parse(&n.subnet).map_err(|e| err(Code::InvalidArgument, e))?;
            n.subnet = net.to_string();
            if !n.gateway.is_empty() {
                match n.gateway.parse::<std::net::Ipv4Addr>() {
                    Ok(g) if net.holds(g) => n.gateway = g.to_string(),
                    _ => {
                        return bad(format!(
                            "gateway {:?} is not a host address of subnet {net}",
                            n.gateway
                        ));
                    }
                }
            }
            n.ranges = parse_ranges(&n.ranges, net, n.gateway.parse().ok())
                .map_err(|e| err(Code::InvalidArgument, e))?;
        } else if !n.gateway.is_empty() {
            return bad(format!(
                "gateway {} needs the network's subnet (--subnet)",
                n.gateway
            ));
        } else if !n.ranges.is_empty() {
            return bad(format!(
                "address ranges ({}) need the network's subnet (--subnet)",
                n.ranges.join(", ")
            ));
        }
        n.created_at = Some(proto::timestamp(at_ms));
        n.vni = 0;
        match n.kind() {
            pb::NetworkKind::External => {
                if !valid_nic(&n.nic) {
                    return bad(format!(
                        "an external network needs a host NIC name (1-15 characters, no '/'), not {:?}",
                        n.nic
                    ));
                }
                if let Some(o) = self.networks.values().find(|o| {
                    o.kind() == pb::NetworkKind::External && o.nic == n.nic && o.vlan == n.vlan
                }) {
                    return Err(err(
                        Code::AlreadyExists,
                        format!(
                            "network {:?} already bridges NIC {} with VLAN tag {}",
                            o.name, n.nic, n.vlan
                        ),
                    ));
                }
                n.host_id.clear();
            }
            pb::NetworkKind::Internal => {
                if !self.hosts.contains_key(&n.host_id) {
                    return Err(err(
                        Code::NotFound,
                        format!(
                            "an internal network lives on one host of the pool; no host with id {:?}",
                            n.host_id
                        ),
                    ));
                }
                n.nic.clear();
            }
            pb::NetworkKind::Private => {
                // The lowest VXLAN id no private network holds.
                let used: std::collections::BTreeSet<u32> =
                    self.networks.values().map(|o| o.vni).collect();
                n.vni = (1..).find(|v| !used.contains(v)).expect("a free VNI");
                n.nic.clear();
                n.host_id.clear();
            }
            pb::NetworkKind::Unspecified => {
                return bad("a network's kind is external, private or internal".into());
            }
        }
        self.networks.insert(n.id.clone(), n.clone());
        Ok(Applied::done(n.id))
    }

    /// A network's ranges change (`None`: unchanged). Every address its VIFs hold must lie
    /// in the new ones: a VIF outside them would hold an address the pool says it does
    /// not own.
    pub(super) fn update_network(
        &mut self,
        id: &str,
        ranges: Option<&[String]>,
    ) -> Result<Applied, CommandResult> {
        let n = self
            .networks
            .get(id)
            .ok_or_else(|| err(Code::NotFound, format!("no network with id {id:?}")))?;
        let Some(asked) = ranges else {
            return Ok(Applied::done(id));
        };
        // Clearing what is not there changes nothing, subnet or not.
        if asked.is_empty() && n.ranges.is_empty() {
            return Ok(Applied::done(id));
        }
        let Some(subnet) = subnet_of(n) else {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "network {:?} has no subnet for address ranges to lie in",
                    n.name
                ),
            ));
        };
        let ranges = parse_ranges(asked, subnet, n.gateway.parse().ok())
            .map_err(|e| err(Code::InvalidArgument, e))?;
        let changed = pb::Network {
            ranges,
            ..n.clone()
        };
        let pool = pool_of(&changed, subnet);
        for vm in self.vms.values() {
            for v in vm.vifs.iter().filter(|v| v.network_id == id) {
                let outside = v.ipv4.iter().find(|a| {
                    a.parse::<std::net::Ipv4Addr>()
                        .is_ok_and(|ip| !owns(&pool, ip))
                });
                if let Some(a) = outside {
                    return Err(err(
                        Code::FailedPrecondition,
                        format!(
                            "VIF {} (VM {}) holds {a}, outside the new ranges: give it an \
                             address in them first (vif-update)",
                            v.id, vm.id
                        ),
                    ));
                }
            }
        }
        self.networks.insert(id.to_owned(), changed);
        Ok(Applied::done(id))
    }

    pub(super) fn destroy_network(&mut self, id: &str) -> Result<Applied, CommandResult> {
        let n = self
            .networks
            .get(id)
            .ok_or_else(|| err(Code::NotFound, format!("no network with id {id}")))?;
        if let Some((vm, vif)) = self
            .vms
            .values()
            .find_map(|vm| vm.vifs.iter().find(|v| v.network_id == id).map(|v| (vm, v)))
        {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "network {:?} is in use by VIF {} of VM {} ({}): destroy the VIF first",
                    n.name,
                    vif.id,
                    vm.id,
                    vm.spec.as_ref().map_or("", |s| s.name.as_str())
                ),
            ));
        }
        self.networks.remove(id);
        Ok(Applied::done(id))
    }

    /// Checks new VIFs of VM `vm_id` and completes them: the network's name, a MAC where
    /// none was given, an id `<vm id>-vif<n>` where none was given. Changes nothing.
    /// `given` VIFs come from a user, who must name a VIF's addresses on a network that
    /// locks them; a clone's come without (the addresses are its source's).
    pub(crate) fn new_vifs(
        &self,
        vm_id: &str,
        vifs: &[pb::Vif],
        given: bool,
    ) -> Result<Vec<pb::Vif>, CommandResult> {
        let mut taken = self.macs_in_use();
        let mut ids: std::collections::BTreeSet<String> = self
            .vms
            .values()
            .flat_map(|vm| vm.vifs.iter().map(|v| v.id.clone()))
            .collect();
        let existing = self.vms.get(vm_id).map_or(0, |vm| vm.vifs.len());
        let mut out = Vec::with_capacity(vifs.len());
        for (i, v) in vifs.iter().enumerate() {
            let net = self.networks.get(&v.network_id).ok_or_else(|| {
                err(
                    Code::NotFound,
                    format!("no network with id {:?}", v.network_id),
                )
            })?;
            for (what, r) in [
                ("bytes/s", v.rate_bytes_per_sec),
                ("packets/s", v.rate_packets_per_sec),
            ] {
                if r == Some(0) {
                    return Err(err(
                        Code::InvalidArgument,
                        format!(
                            "a rate limit of 0 {what} would stop the VIF; leave it out for no limit"
                        ),
                    ));
                }
            }
            let mut v = v.clone();
            v.ipv4 = self.vif_ipv4s(net, &v.ipv4, "", &out, given)?;
            v.vm_id = vm_id.to_owned();
            v.network_name = net.name.clone();
            if v.id.is_empty() {
                v.id = format!("{vm_id}-vif{}", existing + i);
            }
            if !ids.insert(v.id.clone()) {
                return Err(err(Code::AlreadyExists, format!("VIF {} exists", v.id)));
            }
            v.mac = if v.mac.is_empty() {
                let p = self.mac_prefix();
                let start = fnv1a(v.id.as_bytes());
                (0..1u32 << 24)
                    .map(|k| {
                        let x = start.wrapping_add(k);
                        format_mac([p[0], p[1], p[2], (x >> 16) as u8, (x >> 8) as u8, x as u8])
                    })
                    .find(|m| !taken.contains(m))
                    .ok_or_else(|| err(Code::ResourceExhausted, "the pool's MAC prefix is full"))?
            } else {
                let m = parse_mac(&v.mac).map_err(|e| err(Code::InvalidArgument, e))?;
                if m[0] & 1 == 1 {
                    return Err(err(
                        Code::InvalidArgument,
                        format!(
                            "MAC {} is a multicast address; a VIF needs a unicast one (even first octet)",
                            v.mac
                        ),
                    ));
                }
                if m == [0; 6] {
                    return Err(err(
                        Code::InvalidArgument,
                        "MAC 00:00:00:00:00:00 is not an address",
                    ));
                }
                let m = format_mac(m);
                if taken.contains(&m) {
                    return Err(err(
                        Code::AlreadyExists,
                        format!("MAC {m} is already used by another VIF of the pool"),
                    ));
                }
                m
            };
            taken.insert(v.mac.clone());
            out.push(v);
        }
        Ok(out)
    }

    /// The addresses a VIF on `net` ends with, from those `asked`: each unicast and given
    /// once; with a subnet, a host address of it other than the gateway, in one of the
    /// network's ranges where it has some; held by no other VIF on the network (`skip` is
    /// the VIF being changed, `pending` VIFs not yet in the state). None asked on a network
    /// with a subnet: its lowest free address of those (for a clone's VIF, none if there is
    /// none). A user (`given`) must name some on a locked
    /// network without a subnet.
    fn vif_ipv4s(
        &self,
        net: &pb::Network,
        asked: &[String],
        skip: &str,
        pending: &[pb::Vif],
        given: bool,
    ) -> Result<Vec<String>, CommandResult> {
        let mut ips = vif_addresses(asked)?;
        let subnet = subnet_of(net);
        // The ranges a given address must lie in, where the network has some.
        let owned = subnet
            .filter(|_| !net.ranges.is_empty())
            .map(|sub| pool_of(net, sub));
        let gateway: Option<std::net::Ipv4Addr> = net.gateway.parse().ok();
        let others: Vec<&pb::Vif> = self
            .vms
            .values()
            .flat_map(|vm| vm.vifs.iter())
            .chain(pending)
            .filter(|o| o.network_id == net.id && (skip.is_empty() || o.id != skip))
            .collect();
        for ip in &ips {
            if let Some(sub) = subnet
                && !sub.holds(*ip)
            {
                return Err(err(
                    Code::InvalidArgument,
                    format!(
                        "address {ip} is not a host address of network {:?}'s subnet {sub}",
                        net.name
                    ),
                ));
            }
            if gateway == Some(*ip) {
                return Err(err(
                    Code::InvalidArgument,
                    format!("address {ip} is network {:?}'s gateway", net.name),
                ));
            }
            if let Some(owned) = &owned
                && !owns(owned, *ip)
            {
                return Err(err(
                    Code::InvalidArgument,
                    format!(
                        "address {ip} is outside network {:?}'s ranges ({}): the pool does not own it",
                        net.name,
                        net.ranges.join(", ")
                    ),
                ));
            }
            let a = ip.to_string();
            if let Some(o) = others.iter().find(|o| o.ipv4.contains(&a)) {
                return Err(err(
                    Code::AlreadyExists,
                    format!(
                        "address {a} is VIF {}'s (VM {}) on network {:?}",
                        o.id, o.vm_id, net.name
                    ),
                ));
            }
        }
        if ips.is_empty() {
            if let Some(sub) = subnet {
                let held: std::collections::BTreeSet<u32> = others
                    .iter()
                    .flat_map(|o| o.ipv4.iter())
                    .filter_map(|a| a.parse::<std::net::Ipv4Addr>().ok())
                    .map(u32::from)
                    .chain(gateway.map(u32::from))
                    .collect();
                let free = pool_of(net, sub)
                    .into_iter()
                    .flatten()
                    .find(|a| !held.contains(a));
                match free {
                    Some(free) => ips.push(free.into()),
                    // A clone is made by an effect, which cannot fail: its VIF comes
                    // without an address, as it would on a network with no subnet.
                    None if !given => {}
                    None => {
                        return Err(err(
                            Code::ResourceExhausted,
                            format!(
                                "network {:?}'s {} has no free address left",
                                net.name,
                                handed_from(net)
                            ),
                        ));
                    }
                }
            } else if given && net.lock_addresses {
                return Err(err(
                    Code::InvalidArgument,
                    format!(
                        "network {:?} locks each VIF to its own addresses: give this one at least one (vif-create --ip)",
                        net.name
                    ),
                ));
            }
        }
        Ok(ips.iter().map(ToString::to_string).collect())
    }

    fn stopped_vm(&self, vm_id: &str, what: &str) -> Result<&pb::Vm, CommandResult> {
        let vm = self
            .vms
            .get(vm_id)
            .ok_or_else(|| err(Code::NotFound, format!("no VM with id {vm_id}")))?;
        let stopped = vm.desired_power_state() == hpb::PowerState::Stopped
            && vm.power_state() == hpb::PowerState::Stopped
            && vm.host_id.is_empty();
        if !stopped {
            return Err(err(
                Code::FailedPrecondition,
                format!(
                    "VM {vm_id} is {}: {what} only while it is stopped (shut it down first)",
                    vm.power_state().as_str_name()
                ),
            ));
        }
        Ok(vm)
    }

    pub(super) fn create_vif(&mut self, v: &pb::Vif) -> Result<Applied, CommandResult> {
        if v.id.is_empty() {
            return Err(err(Code::InvalidArgument, "a VIF needs an id"));
        }
        self.stopped_vm(&v.vm_id, "VIFs are added")?;
        let vif = self
            .new_vifs(&v.vm_id, std::slice::from_ref(v), true)?
            .pop()
            .expect("one VIF");
        let vm = self.vms.get_mut(&v.vm_id).expect("checked above");
        vm.vifs.push(vif);
        Ok(Applied::done(&v.id))
    }

    /// A stopped VM's VIF gets new addresses (`None`: unchanged).
    pub(super) fn update_vif(
        &mut self,
        id: &str,
        ipv4: Option<&[String]>,
    ) -> Result<Applied, CommandResult> {
        let (vm_id, vif) = self
            .vms
            .values()
            .find_map(|vm| vm.vifs.iter().find(|v| v.id == id).map(|v| (&vm.id, v)))
            .ok_or_else(|| err(Code::NotFound, format!("no VIF with id {id}")))?;
        let vm_id = vm_id.clone();
        self.stopped_vm(&vm_id, "a VIF's addresses change")?;
        // A job (a revert, a resume) read the VIF when it began and plugs it as it was.
        self.vm_not_busy(&vm_id, "")?;
        let net = self.networks.get(&vif.network_id).ok_or_else(|| {
            err(
                Code::NotFound,
                format!("no network with id {:?}", vif.network_id),
            )
        })?;
        let ipv4 = match ipv4 {
            Some(asked) => Some(self.vif_ipv4s(net, asked, id, &[], true)?),
            None => None,
        };
        let vif = self
            .vms
            .get_mut(&vm_id)
            .and_then(|vm| vm.vifs.iter_mut().find(|v| v.id == id))
            .expect("found above");
        if let Some(ipv4) = ipv4 {
            vif.ipv4 = ipv4;
        }
        Ok(Applied::done(id))
    }

    pub(super) fn destroy_vif(&mut self, id: &str) -> Result<Applied, CommandResult> {
        let vm_id = self
            .vms
            .values()
            .find(|vm| vm.vifs.iter().any(|v| v.id == id))
            .map(|vm| vm.id.clone())
            .ok_or_else(|| err(Code::NotFound, format!("no VIF with id {id}")))?;
        self.stopped_vm(&vm_id, "VIFs are removed")?;
        let vm = self.vms.get_mut(&vm_id).expect("found above");
        vm.vifs.retain(|v| v.id != id);
        Ok(Applied::done(id))
    }

    /// What a host must offer for these networks to reach a VM on it.
    pub fn network_reach<'a>(
        &self,
        network_ids: impl IntoIterator<Item = &'a str>,
    ) -> Vec<NetReach> {
        let mut out: Vec<NetReach> = Vec::new();
        for id in network_ids {
            let Some(n) = self.networks.get(id) else {
                continue;
            };
            if out.iter().any(|r| r.network == n.name) {
                continue;
            }
            let need = match n.kind() {
                pb::NetworkKind::External => Some(NetNeed::Nic(n.nic.clone())),
                pb::NetworkKind::Internal => Some(NetNeed::Host(n.host_id.clone())),
                _ => None,
            };
            if let Some(need) = need {
                out.push(NetReach {
                    network: n.name.clone(),
                    need,
                });
            }
        }
        out
    }
}

pub use crate::scheduler::NetNeed;

/// What a host needs to plug one VIF of a VM it runs: the VIF (MAC, rate limits), its
/// network (kind, NIC, VLAN tag, MTU, VNI) and, for a private network, the other hosts'
/// IPs (those of their hostd addresses) its VXLAN device forwards to.
#[derive(Debug, Clone, PartialEq)]
pub struct VifPlan {
    pub vif: pb::Vif,
    pub network: pb::Network,
    pub peers: Vec<String>,
}

impl PoolState {
    /// The plans of every VIF of `vm` on `host_id`, in device order; a VIF whose network
    /// is gone (it cannot be, while the VIF holds it) is left out.
    pub fn vif_plans(&self, vm: &pb::Vm, host_id: &str) -> Vec<VifPlan> {
        vm.vifs
            .iter()
            .filter_map(|v| {
                let network = self.networks.get(&v.network_id)?.clone();
                let mut peers: Vec<String> = if network.kind() == pb::NetworkKind::Private {
                    self.hosts
                        .values()
                        .filter(|h| h.id != host_id)
                        .map(|h| super::placement::address_ip(&h.address))
                        .collect()
                } else {
                    Vec::new()
                };
                peers.sort();
                peers.dedup();
                Some(VifPlan {
                    vif: v.clone(),
                    network,
                    peers,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::state::command::*;

    fn apply(s: &mut PoolState, op: Op) -> CommandResult {
        let n = s.applied_index + 1;
        s.apply(
            n,
            &Command {
                request_id: format!("r{n}"),
                at_ms: 1000 + n,
                task_id: format!("t{n}"),
                op: Some(op),
                ..Default::default()
            },
        )
    }

    fn ok(s: &mut PoolState, op: Op) {
        let r = apply(s, op);
        assert_eq!(r.code, 0, "{}", r.message);
    }

    /// Applies `op`, which must be refused with `code` and a message containing `says`,
    /// and checks that it changed no object.
    fn refused(s: &mut PoolState, op: Op, code: Code, says: &str) {
        let before = s.clone_without_history();
        let r = apply(s, op);
        assert_eq!(r.code, code as i32, "{}", r.message);
        assert!(r.message.contains(says), "{:?} lacks {says:?}", r.message);
        let mut after = s.clone_without_history();
        after.applied_index = before.applied_index;
        assert_eq!(after, before, "a refused command changed the state");
    }

    fn net(id: &str, kind: pb::NetworkKind) -> pb::Network {
        pb::Network {
            id: id.into(),
            name: id.into(),
            kind: kind as i32,
            nic: if kind == pb::NetworkKind::External {
                "eth1".into()
            } else {
                String::new()
            },
            host_id: if kind == pb::NetworkKind::Internal {
                "h1".into()
            } else {
                String::new()
            },
            ..Default::default()
        }
    }

    fn on(network: &str) -> pb::Vif {
        pb::Vif {
            network_id: network.into(),
            ..Default::default()
        }
    }

    fn vm(id: &str, vifs: Vec<pb::Vif>) -> Op {
        Op::CreateVm(CreateVm {
            vm_id: id.into(),
            spec: Some(pb::VmSpec {
                name: id.into(),
                vcpus: 1,
                memory_bytes: 64 << 20,
                ..Default::default()
            }),
            vifs,
            ..Default::default()
        })
    }

    fn host(s: &mut PoolState, id: &str, nics: &[&str]) {
        ok(
            s,
            Op::JoinHost(JoinHost {
                host_id: id.into(),
                name: id.into(),
                address: format!("10.0.0.{}:7000", s.hosts.len() + 1),
            }),
        );
        ok(
            s,
            Op::HostReport(HostReport {
                host_id: id.into(),
                info: Some(hpb::HostInfo {
                    memory_total_bytes: 8 << 30,
                    logical_cpus: 4,
                    ..Default::default()
                }),
                nics: nics.iter().map(|n| n.to_string()).collect(),
                nics_known: true,
                ..Default::default()
            }),
        );
    }

    /// Starts task "clone": VM `vm` cloned from `source` (which the job then holds).
    fn start_clone(s: &mut PoolState, vm: &str, source: &str) {
        let job = Job {
            spec: Some(JobSpec::CloneVm(CloneVmJob {
                vm_id: vm.into(),
                source_id: source.into(),
                name: vm.into(),
            })),
            ..Default::default()
        };
        let n = s.applied_index + 1;
        let r = s.apply(
            n,
            &Command {
                task_id: "clone".into(),
                at_ms: 5000,
                op: Some(Op::StartJob(job)),
                ..Default::default()
            },
        );
        assert_eq!(r.code, 0, "{}", r.message);
    }

    /// Ends the clone `start_clone` began: VM `vm`, with the spec of `source` and `vifs`.
    fn finish_clone(s: &mut PoolState, vm: &str, source: &str, vifs: Vec<pb::Vif>) {
        let spec = s.vms[source].spec.clone();
        ok(
            s,
            Op::FinishJob(FinishJob {
                task_id: "clone".into(),
                effects: vec![Effect {
                    kind: Some(EffectKind::CreateVm(CreateVm {
                        vm_id: vm.into(),
                        spec,
                        vifs,
                        ..Default::default()
                    })),
                }],
                ..Default::default()
            }),
        );
    }

    /// A pool with hosts h1 (NICs eth0, eth1) and h2 (eth0) and one network of each kind.
    fn pool() -> PoolState {
        let mut s = PoolState::new("pool-a", BTreeMap::new());
        host(&mut s, "h1", &["eth0", "eth1"]);
        host(&mut s, "h2", &["eth0"]);
        for (id, kind) in [
            ("ext", pb::NetworkKind::External),
            ("priv", pb::NetworkKind::Private),
            ("int", pb::NetworkKind::Internal),
        ] {
            ok(&mut s, Op::CreateNetwork(net(id, kind)));
        }
        s
    }

    #[test]
    fn networks_are_created_with_defaults_and_a_vni_for_private_ones() {
        let mut s = pool();
        assert_eq!(s.networks["ext"].mtu, DEFAULT_MTU);
        assert_eq!(s.networks["priv"].vni, 1);
        assert_eq!(s.networks["ext"].vni, 0);
        let mut p2 = net("priv2", pb::NetworkKind::Private);
        p2.mtu = 9000;
        p2.vlan = 4094;
        ok(&mut s, Op::CreateNetwork(p2));
        assert_eq!(
            (s.networks["priv2"].vni, s.networks["priv2"].mtu),
            (2, 9000)
        );
        // The same NIC with another tag is another network.
        let mut tagged = net("ext10", pb::NetworkKind::External);
        tagged.vlan = 10;
        ok(&mut s, Op::CreateNetwork(tagged));
        assert_eq!(s.network_by_ref("ext10").unwrap().vlan, 10);
        assert!(s.network_by_ref("nope").is_none());
    }

    #[test]
    fn bad_networks_are_refused_and_change_nothing() {
        let mut s = pool();
        let with = |f: &dyn Fn(&mut pb::Network)| {
            let mut n = net("new", pb::NetworkKind::External);
            n.nic = "eth2".into();
            f(&mut n);
            Op::CreateNetwork(n)
        };
        let cases: Vec<(Op, Code, &str)> = vec![
            (
                with(&|n| n.name = "ext".into()),
                Code::AlreadyExists,
                "name \"ext\" is taken",
            ),
            (
                with(&|n| n.vlan = 4095),
                Code::InvalidArgument,
                "VLAN tag 4095 is outside 1-4094",
            ),
            (
                with(&|n| n.vlan = 70000),
                Code::InvalidArgument,
                "outside 1-4094",
            ),
            (with(&|n| n.mtu = 20000), Code::InvalidArgument, "MTU 20000"),
            (
                with(&|n| n.name = "bad name".into()),
                Code::InvalidArgument,
                "network name",
            ),
            (
                with(&|n| n.nic = String::new()),
                Code::InvalidArgument,
                "host NIC",
            ),
            (
                with(&|n| n.nic = "eth1".into()),
                Code::AlreadyExists,
                "already bridges NIC eth1",
            ),
            (
                with(&|n| n.kind = pb::NetworkKind::Unspecified as i32),
                Code::InvalidArgument,
                "external, private or internal",
            ),
            (
                with(&|n| {
                    n.kind = pb::NetworkKind::Internal as i32;
                    n.host_id = "h9".into();
                }),
                Code::NotFound,
                "no host with id \"h9\"",
            ),
        ];
        for (op, code, says) in cases {
            refused(&mut s, op, code, says);
        }
    }

    #[test]
    fn the_pool_assigns_unique_macs_from_its_prefix_and_checks_given_ones() {
        let mut s = pool();
        ok(&mut s, vm("a", vec![on("ext"), on("priv"), on("priv")]));
        let vifs = s.vms["a"].vifs.clone();
        assert_eq!(vifs.len(), 3);
        let p = s.mac_prefix();
        assert_eq!(p[0], 0x02, "locally administered, unicast");
        for (i, v) in vifs.iter().enumerate() {
            assert_eq!(v.id, format!("a-vif{i}"));
            assert_eq!(v.vm_id, "a");
            let m = parse_mac(&v.mac).unwrap();
            assert_eq!(m[..3], p, "{}", v.mac);
        }
        assert_eq!(vifs[1].network_name, "priv");
        let macs: std::collections::BTreeSet<_> = vifs.iter().map(|v| &v.mac).collect();
        assert_eq!(macs.len(), 3);
        // Another pool's prefix differs.
        assert_ne!(PoolState::new("pool-b", BTreeMap::new()).mac_prefix(), p);

        // A given MAC: unicast and unique, kept as written in lower case.
        let given = |mac: &str| pb::Vif {
            mac: mac.into(),
            ..on("ext")
        };
        ok(&mut s, vm("b", vec![given("0A:00:27:00:00:01")]));
        assert_eq!(s.vms["b"].vifs[0].mac, "0a:00:27:00:00:01");
        let taken = vifs[0].mac.to_uppercase();
        refused(
            &mut s,
            vm("c", vec![given(&taken)]),
            Code::AlreadyExists,
            "already used",
        );
        refused(
            &mut s,
            vm("c", vec![given("0a:00:27:00:00:01")]),
            Code::AlreadyExists,
            "already used",
        );
        refused(
            &mut s,
            vm("c", vec![given("01:00:5e:00:00:01")]),
            Code::InvalidArgument,
            "multicast",
        );
        refused(
            &mut s,
            vm("c", vec![given("02:00:00:00:01")]),
            Code::InvalidArgument,
            "six hex octets",
        );
        refused(
            &mut s,
            vm(
                "c",
                vec![given("02:00:00:00:00:01"), given("02:00:00:00:00:01")],
            ),
            Code::AlreadyExists,
            "already used",
        );
        refused(
            &mut s,
            vm("c", vec![on("nope")]),
            Code::NotFound,
            "no network with id \"nope\"",
        );
        let zero = |f: fn(&mut pb::Vif)| {
            let mut v = on("ext");
            f(&mut v);
            vm("c", vec![v])
        };
        refused(
            &mut s,
            zero(|v| v.rate_bytes_per_sec = Some(0)),
            Code::InvalidArgument,
            "rate limit of 0 bytes/s",
        );
        refused(
            &mut s,
            zero(|v| v.rate_packets_per_sec = Some(0)),
            Code::InvalidArgument,
            "rate limit of 0 packets/s",
        );
        ok(&mut s, zero(|v| v.rate_packets_per_sec = Some(1000)));
        assert_eq!(s.vms["c"].vifs[0].rate_packets_per_sec, Some(1000));
    }

    #[test]
    fn addresses_are_unicast_unique_on_their_network_and_required_where_locked() {
        let mut s = pool();
        let mut locked = net("locked", pb::NetworkKind::Private);
        locked.lock_addresses = true;
        ok(&mut s, Op::CreateNetwork(locked));
        assert!(s.networks["locked"].lock_addresses);
        let at = |network: &str, ips: &[&str]| pb::Vif {
            ipv4: ips.iter().map(|a| a.to_string()).collect(),
            ..on(network)
        };
        ok(
            &mut s,
            vm("a", vec![at("locked", &["10.0.0.2", "10.0.0.3"])]),
        );
        assert_eq!(s.vms["a"].vifs[0].ipv4, ["10.0.0.2", "10.0.0.3"]);
        // The same address on another network is another address.
        ok(&mut s, vm("b", vec![at("priv", &["10.0.0.2"])]));
        let cases: Vec<(Op, Code, &str)> = vec![
            (
                vm("c", vec![at("locked", &[])]),
                Code::InvalidArgument,
                "locks each VIF to its own addresses",
            ),
            (
                vm("c", vec![at("locked", &["10.0.0.3"])]),
                Code::AlreadyExists,
                "address 10.0.0.3 is VIF a-vif0's (VM a)",
            ),
            (
                vm(
                    "c",
                    vec![at("priv", &["10.0.0.9"]), at("priv", &["10.0.0.9"])],
                ),
                Code::AlreadyExists,
                "address 10.0.0.9 is VIF c-vif0's",
            ),
            (
                vm("c", vec![at("priv", &["10.0.0.4", "10.0.0.4"])]),
                Code::InvalidArgument,
                "given twice",
            ),
            (
                vm("c", vec![at("priv", &["10.0.0.256"])]),
                Code::InvalidArgument,
                "\"10.0.0.256\" is not a unicast IPv4 address",
            ),
            (
                vm("c", vec![at("priv", &["224.0.0.5"])]),
                Code::InvalidArgument,
                "not a unicast IPv4 address",
            ),
            (
                vm("c", vec![at("priv", &["0.0.0.0"])]),
                Code::InvalidArgument,
                "not a unicast IPv4 address",
            ),
        ];
        for (op, code, says) in cases {
            refused(&mut s, op, code, says);
        }
        let many: Vec<String> = (0..=MAX_VIF_ADDRESSES)
            .map(|i| format!("10.1.0.{i}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        refused(
            &mut s,
            vm("c", vec![at("priv", &many)]),
            Code::InvalidArgument,
            "at most 64",
        );
        // An address is written plainly: no blanks around it.
        refused(
            &mut s,
            vm("c", vec![at("priv", &[" 10.0.0.5"])]),
            Code::InvalidArgument,
            "not a unicast",
        );
    }

    #[test]
    fn a_subnet_is_a_network_address_and_its_gateway_one_of_its_hosts() {
        let mut s = pool();
        let with = |subnet: &str, gateway: &str| {
            let mut n = net("lan", pb::NetworkKind::Private);
            n.subnet = subnet.into();
            n.gateway = gateway.into();
            Op::CreateNetwork(n)
        };
        let cases: Vec<(Op, &str)> = vec![
            (with("10.0.0.0", ""), "not an IPv4 network like 10.0.0.0/24"),
            (with("10.0.0.0/33", ""), "not an IPv4 network"),
            (with("10.0.0.0/31", ""), "/8-/30 leaves room"),
            (with("10.0.0.0/7", ""), "not /7"),
            (with("10.0.0.0/x", ""), "not an IPv4 network"),
            (
                with("10.0.1.0/16", ""),
                "host bits set: the network is 10.0.0.0/16",
            ),
            (
                with("10.0.0.0/24", "10.0.1.1"),
                "not a host address of subnet 10.0.0.0/24",
            ),
            (with("10.0.0.0/24", "10.0.0.0"), "not a host address"),
            (with("10.0.0.0/24", "10.0.0.255"), "not a host address"),
            (with("10.0.0.0/24", "gw"), "not a host address"),
            (with("", "10.0.0.1"), "needs the network's subnet"),
            (with("224.0.0.0/8", ""), "not for interfaces"),
            (with("239.1.0.0/16", ""), "not for interfaces"),
            (with("240.0.0.0/8", ""), "not for interfaces"),
            (with("127.0.0.0/8", ""), "not for interfaces"),
            (with("0.0.0.0/8", ""), "not for interfaces"),
        ];
        for (op, says) in cases {
            refused(&mut s, op, Code::InvalidArgument, says);
        }
        ok(&mut s, with("192.168.8.0/30", "192.168.8.1"));
        assert_eq!(s.networks["lan"].subnet, "192.168.8.0/30");
        assert_eq!(s.networks["lan"].gateway, "192.168.8.1");
        // The edges of the address space: the first and last host addresses.
        for (subnet, first, last) in [
            ("10.0.0.0/8", "10.0.0.1", "10.255.255.254"),
            ("223.255.255.252/30", "223.255.255.253", "223.255.255.254"),
        ] {
            let sub = Subnet::parse(subnet).unwrap();
            let ip = |a: u32| std::net::Ipv4Addr::from(a).to_string();
            assert_eq!(ip(*sub.hosts().start()), first);
            assert_eq!(ip(*sub.hosts().end()), last);
        }
    }

    #[test]
    fn a_clone_on_a_full_subnet_says_its_vif_has_no_address_and_its_source_keeps_its_own() {
        let mut s = pool();
        let mut lan = net("lan", pb::NetworkKind::Private);
        lan.subnet = "10.9.0.0/30".into();
        ok(&mut s, Op::CreateNetwork(lan));
        ok(&mut s, vm("a", vec![on("lan")]));
        ok(&mut s, vm("b", vec![on("lan")]));
        assert_eq!(s.vms["b"].vifs[0].ipv4, ["10.9.0.2"], "the subnet is full");
        start_clone(&mut s, "c", "a");
        // The job read a's VIFs when it began: they stay as they are until it ends.
        let update = |ips: &[&str]| {
            Op::UpdateVif(UpdateVif {
                vif_id: "a-vif0".into(),
                ipv4: Some(pb::VifAddresses {
                    ipv4: ips.iter().map(|a| a.to_string()).collect(),
                }),
            })
        };
        refused(
            &mut s,
            update(&[]),
            Code::FailedPrecondition,
            "VM a is busy with task clone (vm.clone)",
        );
        finish_clone(&mut s, "c", "a", vec![on("lan")]);
        assert!(s.vms["c"].vifs[0].ipv4.is_empty());
        let said = &s.tasks["clone"].results;
        assert_eq!(
            said.get("c-vif0.ipv4").map(String::as_str),
            Some("none: network \"lan\"'s subnet 10.9.0.0/30 is full (vif-update --ip)"),
            "{said:?}"
        );
        ok(&mut s, update(&["10.9.0.1"]));
    }

    #[test]
    fn a_subnet_hands_out_its_lowest_free_host_address_and_bounds_given_ones() {
        let mut s = pool();
        let mut lan = net("lan", pb::NetworkKind::Private);
        lan.subnet = "10.9.0.0/29".into();
        lan.gateway = "10.9.0.1".into();
        lan.lock_addresses = true;
        ok(&mut s, Op::CreateNetwork(lan));
        let at = |ips: &[&str]| pb::Vif {
            ipv4: ips.iter().map(|a| a.to_string()).collect(),
            ..on("lan")
        };
        // .1 is the gateway: the first VIF gets .2, a VM's two VIFs .3 and .5 around a
        // given .4.
        ok(&mut s, vm("a", vec![at(&[])]));
        assert_eq!(s.vms["a"].vifs[0].ipv4, ["10.9.0.2"]);
        ok(&mut s, vm("b", vec![at(&[]), at(&["10.9.0.4"]), at(&[])]));
        let b: Vec<_> = s.vms["b"].vifs.iter().map(|v| v.ipv4.join(",")).collect();
        assert_eq!(b, ["10.9.0.3", "10.9.0.4", "10.9.0.5"]);
        let cases: Vec<(Op, Code, &str)> = vec![
            (
                vm("c", vec![at(&["10.9.0.1"])]),
                Code::InvalidArgument,
                "address 10.9.0.1 is network \"lan\"'s gateway",
            ),
            (
                vm("c", vec![at(&["10.9.0.7"])]),
                Code::InvalidArgument,
                "10.9.0.7 is not a host address of network \"lan\"'s subnet 10.9.0.0/29",
            ),
            (
                vm("c", vec![at(&["10.9.0.0"])]),
                Code::InvalidArgument,
                "not a host address",
            ),
            (
                vm("c", vec![at(&["10.8.0.2"])]),
                Code::InvalidArgument,
                "not a host address",
            ),
            (
                vm("c", vec![at(&["10.9.0.4"])]),
                Code::AlreadyExists,
                "address 10.9.0.4 is VIF b-vif1's (VM b)",
            ),
        ];
        for (op, code, says) in cases {
            refused(&mut s, op, code, says);
        }
        ok(&mut s, vm("c", vec![at(&[])]));
        assert_eq!(s.vms["c"].vifs[0].ipv4, ["10.9.0.6"]);
        // Six host addresses, one the gateway's: the subnet is full.
        refused(
            &mut s,
            vm("d", vec![at(&[])]),
            Code::ResourceExhausted,
            "subnet 10.9.0.0/29 has no free address left",
        );
        // A clone's VIFs come without addresses and get free ones, or none when the
        // subnet is full (an effect cannot fail).
        assert!(
            s.new_vifs("d", &[on("lan")], false).unwrap()[0]
                .ipv4
                .is_empty()
        );
        ok(&mut s, Op::DestroyVm(ObjectId { id: "c".into() }));
        let clone = s.new_vifs("d", &[on("lan")], false).unwrap();
        assert_eq!(clone[0].ipv4, ["10.9.0.6"]);
    }

    #[test]
    fn ranges_are_checked_written_in_order_and_bound_every_address() {
        let mut s = pool();
        let before = s.networks.len();
        let with = |gateway: &str, ranges: &[&str]| {
            let mut n = net("lan", pb::NetworkKind::External);
            n.nic = "eth1".into();
            n.vlan = 7;
            n.subnet = "192.168.1.0/24".into();
            n.gateway = gateway.into();
            n.ranges = ranges.iter().map(|r| r.to_string()).collect();
            Op::CreateNetwork(n)
        };
        let many: Vec<String> = (0..=MAX_RANGES)
            .map(|i| format!("192.168.1.{}", i + 2))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let cases: Vec<(Op, &str)> = vec![
            (with("", &["192.168.1.x"]), "not an address or two"),
            (with("", &["192.168.1.9-"]), "not an address or two"),
            (
                with("", &["192.168.1.20-192.168.1.10"]),
                "first address comes after its last",
            ),
            (
                with("", &["192.168.1.0-192.168.1.9"]),
                "not within the host addresses of subnet 192.168.1.0/24",
            ),
            (
                with("", &["192.168.1.250-192.168.1.255"]),
                "not within the host addresses",
            ),
            (with("", &["192.168.2.5"]), "not within the host addresses"),
            (
                with("192.168.1.1", &["192.168.1.1-192.168.1.9"]),
                "holds the gateway 192.168.1.1",
            ),
            (
                with(
                    "",
                    &["192.168.1.50-192.168.1.60", "192.168.1.10-192.168.1.50"],
                ),
                "ranges 192.168.1.10-192.168.1.50 and 192.168.1.50-192.168.1.60 overlap",
            ),
            (with("", &many), "at most 16 address ranges"),
        ];
        for (op, says) in cases {
            refused(&mut s, op, Code::InvalidArgument, says);
        }
        let mut bare = net("bare", pb::NetworkKind::Private);
        bare.ranges = vec!["10.0.0.5-10.0.0.9".into()];
        refused(
            &mut s,
            Op::CreateNetwork(bare),
            Code::InvalidArgument,
            "address ranges (10.0.0.5-10.0.0.9) need the network's subnet",
        );
        assert_eq!(s.networks.len(), before, "nothing refused was made");

        // Written the one way, in order: a single address stands alone.
        ok(
            &mut s,
            with(
                "192.168.1.1",
                &[
                    "192.168.1.200 - 192.168.1.201",
                    "192.168.1.100-192.168.1.100",
                ],
            ),
        );
        assert_eq!(
            s.networks["lan"].ranges,
            ["192.168.1.100", "192.168.1.200-192.168.1.201"]
        );
        let at = |ips: &[&str]| pb::Vif {
            ipv4: ips.iter().map(|a| a.to_string()).collect(),
            ..on("lan")
        };
        // Handed out from the ranges only, lowest first, across the gap between them.
        ok(&mut s, vm("a", vec![at(&[]), at(&[])]));
        let a: Vec<_> = s.vms["a"].vifs.iter().map(|v| v.ipv4.join(",")).collect();
        assert_eq!(a, ["192.168.1.100", "192.168.1.200"]);
        // A NAS at .10 is outside every range: nobody is given it.
        refused(
            &mut s,
            vm("b", vec![at(&["192.168.1.10"])]),
            Code::InvalidArgument,
            "address 192.168.1.10 is outside network \"lan\"'s ranges (192.168.1.100, 192.168.1.200-192.168.1.201)",
        );
        ok(&mut s, vm("b", vec![at(&["192.168.1.201"])]));
        refused(
            &mut s,
            vm("c", vec![at(&[])]),
            Code::ResourceExhausted,
            "network \"lan\"'s ranges (192.168.1.100, 192.168.1.200-192.168.1.201) has no free address left",
        );
        // Changing a VIF's addresses keeps to the ranges too.
        let vif = s.vms["b"].vifs[0].id.clone();
        refused(
            &mut s,
            Op::UpdateVif(UpdateVif {
                vif_id: vif,
                ipv4: Some(pb::VifAddresses {
                    ipv4: vec!["192.168.1.150".into()],
                }),
            }),
            Code::InvalidArgument,
            "outside network \"lan\"'s ranges",
        );
        // A clone gets none, and its task says which ranges are full.
        start_clone(&mut s, "c", "b");
        finish_clone(&mut s, "c", "b", vec![on("lan")]);
        assert!(s.vms["c"].vifs[0].ipv4.is_empty());
        assert_eq!(
            s.tasks["clone"]
                .results
                .get("c-vif0.ipv4")
                .map(String::as_str),
            Some(
                "none: network \"lan\"'s ranges (192.168.1.100, 192.168.1.200-192.168.1.201) is full (vif-update --ip)"
            )
        );
        assert_eq!(s.vms["b"].vifs[0].ipv4, ["192.168.1.201"]);
    }

    #[test]
    fn a_networks_ranges_change_only_around_the_addresses_its_vifs_hold() {
        let mut s = pool();
        let mut lan = net("lan", pb::NetworkKind::Private);
        lan.subnet = "10.9.0.0/24".into();
        lan.gateway = "10.9.0.1".into();
        ok(&mut s, Op::CreateNetwork(lan));
        ok(&mut s, vm("a", vec![on("lan")]));
        assert_eq!(s.vms["a"].vifs[0].ipv4, ["10.9.0.2"]);
        let update = |id: &str, ranges: &[&str]| {
            Op::UpdateNetwork(UpdateNetwork {
                network_id: id.into(),
                ranges: Some(pb::NetworkRanges {
                    ranges: ranges.iter().map(|r| r.to_string()).collect(),
                }),
            })
        };
        refused(
            &mut s,
            update("lan", &["10.9.0.100-10.9.0.199"]),
            Code::FailedPrecondition,
            "VIF a-vif0 (VM a) holds 10.9.0.2, outside the new ranges",
        );
        refused(
            &mut s,
            update("lan", &["10.9.0.1-10.9.0.5"]),
            Code::InvalidArgument,
            "holds the gateway 10.9.0.1",
        );
        refused(
            &mut s,
            update("nope", &[]),
            Code::NotFound,
            "no network with id \"nope\"",
        );
        refused(
            &mut s,
            update("priv", &["10.0.0.5"]),
            Code::FailedPrecondition,
            "network \"priv\" has no subnet",
        );
        ok(&mut s, update("priv", &[]));
        assert!(
            s.networks["lan"].ranges.is_empty(),
            "nothing refused changed it"
        );
        ok(
            &mut s,
            update("lan", &["10.9.0.100-10.9.0.199", "10.9.0.2"]),
        );
        assert_eq!(
            s.networks["lan"].ranges,
            ["10.9.0.2", "10.9.0.100-10.9.0.199"]
        );
        // The next VIF comes from the new ranges.
        ok(&mut s, vm("b", vec![on("lan")]));
        assert_eq!(s.vms["b"].vifs[0].ipv4, ["10.9.0.100"]);
        // No ranges: the whole subnet again.
        ok(&mut s, update("lan", &[]));
        ok(&mut s, vm("c", vec![on("lan")]));
        assert_eq!(s.vms["c"].vifs[0].ipv4, ["10.9.0.3"]);
    }

    #[test]
    fn a_stopped_vms_vif_changes_its_addresses_within_the_rules() {
        let mut s = pool();
        let mut lan = net("lan", pb::NetworkKind::Private);
        lan.subnet = "10.9.0.0/24".into();
        lan.gateway = "10.9.0.1".into();
        ok(&mut s, Op::CreateNetwork(lan));
        ok(&mut s, vm("a", vec![on("lan"), on("priv")]));
        ok(&mut s, vm("b", vec![on("lan")]));
        assert_eq!(s.vms["a"].vifs[0].ipv4, ["10.9.0.2"]);
        assert!(
            s.vms["a"].vifs[1].ipv4.is_empty(),
            "no subnet: none handed out"
        );
        let update = |id: &str, ips: Option<&[&str]>| {
            Op::UpdateVif(UpdateVif {
                vif_id: id.into(),
                ipv4: ips.map(|ips| pb::VifAddresses {
                    ipv4: ips.iter().map(|a| a.to_string()).collect(),
                }),
            })
        };
        ok(&mut s, update("a-vif0", Some(&["10.9.0.20", "10.9.0.21"])));
        assert_eq!(s.vms["a"].vifs[0].ipv4, ["10.9.0.20", "10.9.0.21"]);
        // Its own addresses again: not "taken" by itself.
        ok(&mut s, update("a-vif0", Some(&["10.9.0.21"])));
        assert_eq!(s.vms["a"].vifs[0].ipv4, ["10.9.0.21"]);
        // Nothing asked on a subnet: the lowest free one (.2 was given back).
        ok(&mut s, update("a-vif0", Some(&[])));
        assert_eq!(s.vms["a"].vifs[0].ipv4, ["10.9.0.2"]);
        ok(&mut s, update("a-vif1", Some(&["192.0.2.7"])));
        assert_eq!(s.vms["a"].vifs[1].ipv4, ["192.0.2.7"]);
        ok(&mut s, update("a-vif1", Some(&[])));
        assert!(s.vms["a"].vifs[1].ipv4.is_empty());
        let mac = s.vms["a"].vifs[0].mac.clone();
        ok(&mut s, update("a-vif0", None));
        assert_eq!(s.vms["a"].vifs[0].ipv4, ["10.9.0.2"]);
        assert_eq!(
            s.vms["a"].vifs[0].mac, mac,
            "an address change keeps the MAC"
        );
        let cases: Vec<(Op, Code, &str)> = vec![
            (
                update("a-vif0", Some(&["10.9.0.3"])),
                Code::AlreadyExists,
                "address 10.9.0.3 is VIF b-vif0's (VM b)",
            ),
            (
                update("a-vif0", Some(&["10.9.0.1"])),
                Code::InvalidArgument,
                "gateway",
            ),
            (
                update("a-vif0", Some(&["10.9.1.1"])),
                Code::InvalidArgument,
                "not a host address",
            ),
            (
                update("a-vif0", Some(&["10.9.0.9", "10.9.0.9"])),
                Code::InvalidArgument,
                "given twice",
            ),
            (
                update("ghost", Some(&[])),
                Code::NotFound,
                "no VIF with id ghost",
            ),
        ];
        for (op, code, says) in cases {
            refused(&mut s, op, code, says);
        }
        ok(
            &mut s,
            Op::SetVmPower(SetVmPower {
                vm_id: "a".into(),
                desired: hpb::PowerState::Running as i32,
                host_id: "h1".into(),
                ..Default::default()
            }),
        );
        refused(
            &mut s,
            update("a-vif0", Some(&["10.9.0.30"])),
            Code::FailedPrecondition,
            "only while it is stopped",
        );
    }

    #[test]
    fn a_locked_network_without_a_subnet_still_takes_given_addresses_only() {
        // Networks made before subnets existed: the log replays them as it did.
        let mut s = pool();
        let mut old = net("old", pb::NetworkKind::Private);
        old.lock_addresses = true;
        ok(&mut s, Op::CreateNetwork(old));
        refused(
            &mut s,
            vm("a", vec![on("old")]),
            Code::InvalidArgument,
            "locks each VIF to its own addresses",
        );
        ok(
            &mut s,
            vm(
                "a",
                vec![pb::Vif {
                    ipv4: vec!["10.0.0.9".into()],
                    ..on("old")
                }],
            ),
        );
        refused(
            &mut s,
            Op::UpdateVif(UpdateVif {
                vif_id: "a-vif0".into(),
                ipv4: Some(pb::VifAddresses::default()),
            }),
            Code::InvalidArgument,
            "locks each VIF to its own addresses",
        );
    }

    #[test]
    fn vifs_change_only_on_a_stopped_vm_and_keep_their_network() {
        let mut s = pool();
        ok(&mut s, vm("a", vec![]));
        let vif = |id: &str, network: &str| {
            Op::CreateVif(pb::Vif {
                id: id.into(),
                vm_id: "a".into(),
                ..on(network)
            })
        };
        ok(&mut s, vif("v1", "ext"));
        assert_eq!(s.vms["a"].vifs[0].id, "v1");
        refused(
            &mut s,
            vif("v1", "priv"),
            Code::AlreadyExists,
            "VIF v1 exists",
        );
        refused(
            &mut s,
            Op::CreateVif(pb::Vif {
                id: "v9".into(),
                vm_id: "ghost".into(),
                ..on("ext")
            }),
            Code::NotFound,
            "no VM with id ghost",
        );
        refused(
            &mut s,
            Op::DestroyNetwork(ObjectId { id: "ext".into() }),
            Code::FailedPrecondition,
            "in use by VIF v1 of VM a",
        );
        // Started on h1: no VIF comes or goes until it stops.
        ok(
            &mut s,
            Op::SetVmPower(SetVmPower {
                vm_id: "a".into(),
                desired: hpb::PowerState::Running as i32,
                host_id: "h1".into(),
                ..Default::default()
            }),
        );
        refused(
            &mut s,
            vif("v2", "priv"),
            Code::FailedPrecondition,
            "only while it is stopped",
        );
        refused(
            &mut s,
            Op::DestroyVif(ObjectId { id: "v1".into() }),
            Code::FailedPrecondition,
            "only while it is stopped",
        );
        ok(
            &mut s,
            Op::SetVmPower(SetVmPower {
                vm_id: "a".into(),
                desired: hpb::PowerState::Stopped as i32,
                ..Default::default()
            }),
        );
        ok(
            &mut s,
            Op::HostReport(HostReport {
                host_id: "h1".into(),
                vms: vec![ReportedVm {
                    vm_id: "a".into(),
                    power_state: hpb::PowerState::Stopped as i32,
                    last_stop_reason: 0,
                    started_at_ms: 0,
                }],
                ..Default::default()
            }),
        );
        ok(&mut s, Op::DestroyVif(ObjectId { id: "v1".into() }));
        assert!(s.vms["a"].vifs.is_empty());
        refused(
            &mut s,
            Op::DestroyVif(ObjectId { id: "v1".into() }),
            Code::NotFound,
            "no VIF with id v1",
        );
        ok(&mut s, Op::DestroyNetwork(ObjectId { id: "ext".into() }));
        refused(
            &mut s,
            Op::DestroyNetwork(ObjectId { id: "ext".into() }),
            Code::NotFound,
            "no network",
        );
        // The host of an internal network stays while the network does.
        refused(
            &mut s,
            Op::RemoveHost(ObjectId { id: "h1".into() }),
            Code::FailedPrecondition,
            "holds internal network \"int\"",
        );
        ok(&mut s, Op::DestroyNetwork(ObjectId { id: "int".into() }));
        ok(&mut s, Op::RemoveHost(ObjectId { id: "h1".into() }));
    }

    #[test]
    fn placement_needs_the_nic_of_an_external_network_and_the_host_of_an_internal_one() {
        let mut s = pool();
        ok(&mut s, vm("a", vec![on("ext")]));
        ok(&mut s, vm("b", vec![on("int"), on("priv")]));
        ok(&mut s, vm("c", vec![on("priv")]));
        let start = |vm: &str, host: &str| {
            Op::SetVmPower(SetVmPower {
                vm_id: vm.into(),
                desired: hpb::PowerState::Running as i32,
                host_id: host.into(),
                ..Default::default()
            })
        };
        refused(
            &mut s,
            start("a", "h2"),
            Code::Aborted,
            "network: ext is bridged onto NIC eth1, which the host lacks",
        );
        refused(
            &mut s,
            start("b", "h2"),
            Code::Aborted,
            "network: int is internal to host h1",
        );
        // What ExplainPlacement shows: only h1 can take a or b; c goes anywhere.
        let verdicts = |s: &PoolState, vm: &str| {
            let (_, v) =
                crate::scheduler::explain(&s.candidates(), &s.vm_demand(&s.vms[vm]), &s.policy());
            v.into_iter()
                .map(|v| {
                    (
                        v.host_id.clone(),
                        v.rejections
                            .iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>(),
                    )
                })
                .collect::<Vec<_>>()
        };
        let a = verdicts(&s, "a");
        assert!(a[0].1.is_empty(), "{a:?}");
        assert!(a[1].1.iter().any(|r| r.contains("NIC eth1")), "{a:?}");
        assert!(verdicts(&s, "c").iter().all(|(_, r)| r.is_empty()));
        ok(&mut s, start("a", "h1"));
        ok(&mut s, start("c", "h2"));
        // A heartbeat that does not know the NICs (the leader's poll) keeps them; one that
        // does replaces them.
        let report = |nics: &[&str], known: bool| {
            Op::HostReport(HostReport {
                host_id: "h2".into(),
                nics: nics.iter().map(|n| n.to_string()).collect(),
                nics_known: known,
                ..Default::default()
            })
        };
        ok(&mut s, report(&[], false));
        assert_eq!(s.hosts["h2"].nics, ["eth0"]);
        ok(&mut s, report(&["eth0", "eth1"], true));
        assert_eq!(s.hosts["h2"].nics, ["eth0", "eth1"]);
        assert!(verdicts(&s, "a").iter().all(|(_, r)| r.is_empty()));
    }

    #[test]
    fn a_hosts_plan_has_each_vif_its_network_and_a_private_networks_peers() {
        let mut s = pool();
        host(&mut s, "h3", &[]);
        ok(&mut s, vm("a", vec![on("priv"), on("ext")]));
        let plans = s.vif_plans(&s.vms["a"], "h2");
        assert_eq!(plans.len(), 2);
        assert_eq!(plans[0].vif, s.vms["a"].vifs[0]);
        assert_eq!(plans[0].network.vni, 1);
        assert_eq!(plans[0].peers, ["10.0.0.1", "10.0.0.3"]);
        assert_eq!(plans[1].network.nic, "eth1");
        assert!(plans[1].peers.is_empty());
    }

    #[test]
    fn vifs_survive_a_snapshot_and_a_clone_gets_new_macs() {
        let mut s = pool();
        ok(&mut s, vm("a", vec![on("ext"), on("priv")]));
        let back = crate::state::snapshot::decode(&crate::state::snapshot::encode(&s)).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.vms["a"].vifs, s.vms["a"].vifs);
        assert_eq!(back.networks, s.networks);
        // A clone's CreateVm effect carries the source's VIFs; each gets a new MAC, and a
        // network destroyed meanwhile is left out.
        let mut gone = s.vms["a"].vifs.clone();
        gone.push(on("vanished"));
        start_clone(&mut s, "b", "a");
        finish_clone(
            &mut s,
            "b",
            "a",
            gone.iter()
                .map(|v| pb::Vif {
                    network_id: v.network_id.clone(),
                    ..Default::default()
                })
                .collect(),
        );
        let (a, b) = (&s.vms["a"].vifs, &s.vms["b"].vifs);
        assert_eq!(b.len(), 2);
        for (x, y) in a.iter().zip(b) {
            assert_eq!(x.network_id, y.network_id);
            assert_ne!(x.mac, y.mac);
            assert_eq!(y.vm_id, "b");
        }
    }
}
