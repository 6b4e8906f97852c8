//! VM placement: filter the hosts that can take a VM, score those that can, pick the best.
//!
//! Pure code, no I/O and no clock: the leader runs it to choose a host, and the state
//! machine runs the same filters again when the placement commits (two placements raced
//! for the last room on a host → the later one fails and is scheduled again), so a
//! committed placement never overcommits a host and no VM is placed twice.
//!
//! Filters, each with the reason it gives when it rejects a host:
//! - **state**: only enabled hosts take new VMs (disabled, maintenance, unreachable and
//!   fenced hosts do not);
//! - **memory** and **vcpus**: what is allocated plus the VM fits the capacity times the
//!   pool's overcommit percent;
//! - **cpu**: the host has every CPU feature the VM requires;
//! - **anti-affinity**: no VM of the VM's anti-affinity group is on the host;
//! - **affinity**: when some eligible host already runs VMs of the VM's affinity group,
//!   only those hosts remain (a preference that never makes a VM unplaceable);
//! - **storage**: every repository holding the VM's disks is reachable from the host.
//!
//! Scores: **pack** prefers the fullest host after placement (fewer hosts busy), **spread**
//! the emptiest; ties go to the host that sorts first, so the choice is deterministic.

use std::collections::HashMap;

use proto::coordinator::{HostState, PlacementStrategy};

/// How the pool places VMs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub strategy: PlacementStrategy,
    /// 100 = no overcommit.
    pub cpu_overcommit_percent: u32,
    pub memory_overcommit_percent: u32,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            strategy: PlacementStrategy::Spread,
            cpu_overcommit_percent: 100,
            memory_overcommit_percent: 100,
        }
    }
}

/// A host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostCandidate {
    pub id: String,
    pub state: HostState,
    pub memory_bytes: u64,
    pub logical_cpus: u32,
    pub memory_allocated_bytes: u64,
    pub vcpus_allocated: u32,
    pub cpu_features: Vec<String>,
    /// The IP part of hostd's address: a repository that is not shared is reachable only
    /// from a host at the same IP as its storaged.
    pub ip: String,
    /// Affinity and anti-affinity groups of the VMs placed on the host.
    pub groups: Vec<String>,
    /// The NICs the host reported (external networks are bridged onto one of them).
    pub nics: Vec<String>,
}

/// A storage repository as far as reachability goes.
#[derive(Debug, Clone, PartialEq)]
pub struct SrReach {
    pub id: String,
    pub reachable: bool,
    pub shared: bool,
    pub ip: String,
}

/// What a VM needs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Demand {
    pub vcpus: u32,
    pub memory_bytes: u64,
    pub required_cpu_features: Vec<String>,
    pub affinity_group: String,
    pub anti_affinity_group: String,
    /// Repositories holding the VM's disks.
    pub srs: Vec<SrReach>,
    /// What the VM's networks need of a host (private ones need nothing).
    pub networks: Vec<NetReach>,
}

/// What a network needs of a host for a VM on it to run there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetNeed {
    /// An external network: the host NIC it is bridged onto.
    Nic(String),
    /// An internal network: the one host it lives on.
    Host(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetReach {
    /// The network's name.
    pub network: String,
    pub need: NetNeed,
}

/// Why one host was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    State(HostState),
    Memory { needed: u64, free: u64 },
    Vcpus { needed: u32, free: u32 },
    CpuFeatures { missing: Vec<String> },
    AntiAffinity { group: String },
    Affinity { group: String },
    Storage { sr_id: String, why: &'static str },
    Network { network: String, need: NetNeed },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::State(s) => write!(f, "state: host is {}", s.as_str_name()),
            Rejection::Memory { needed, free } => write!(
                f,
                "memory: needs {} MiB, {} MiB free after overcommit",
                needed >> 20,
                free >> 20
            ),
            Rejection::Vcpus { needed, free } => {
                write!(f, "vcpus: needs {needed}, {free} free after overcommit")
            }
            Rejection::CpuFeatures { missing } => {
                write!(f, "cpu: lacks features {}", missing.join(","))
            }
            Rejection::AntiAffinity { group } => {
                write!(f, "anti-affinity: runs a VM of group {group}")
            }
            Rejection::Affinity { group } => {
                write!(f, "affinity: other hosts already run VMs of group {group}")
            }
            Rejection::Storage { sr_id, why } => write!(f, "storage: repository {sr_id} {why}"),
            Rejection::Network {
                network,
                need: NetNeed::Nic(nic),
            } => write!(
                f,
                "network: {network} is bridged onto NIC {nic}, which the host lacks"
            ),
            Rejection::Network {
                network,
                need: NetNeed::Host(h),
            } => write!(f, "network: {network} is internal to host {h}"),
        }
    }
}

/// The verdict on one host.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub host_id: String,
    pub rejections: Vec<Rejection>,
    pub score: f64,
}

impl Verdict {
    pub fn eligible(&self) -> bool {
        self.rejections.is_empty()
    }
}

/// Why no host can take a VM: each host's reasons.
#[derive(Debug, Clone, PartialEq)]
pub struct Unplaceable {
    pub verdicts: Vec<Verdict>,
}

impl std::fmt::Display for Unplaceable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.verdicts.is_empty() {
            return write!(f, "no host is registered in the pool");
        }
        write!(f, "no host can take the VM:")?;
        for v in self.verdicts.iter().take(8) {
            let reasons: Vec<String> = v.rejections.iter().map(|r| r.to_string()).collect();
            write!(f, " [{}: {}]", v.host_id, reasons.join("; "))?;
        }
        if self.verdicts.len() > 8 {
            write!(f, " and {} more hosts", self.verdicts.len() - 8)?;
        }
        Ok(())
    }
}

fn scaled(capacity: u64, percent: u32) -> u64 {
    let percent = if percent == 0 { 100 } else { percent };
    (capacity as u128 * percent as u128 / 100) as u64
}

/// Every hard filter on one host (affinity, which depends on the other hosts, aside).
pub fn hard_filters(h: &HostCandidate, d: &Demand, p: &Policy) -> Vec<Rejection> {
    let mut out = Vec::new();
    if h.state != HostState::Enabled {
        out.push(Rejection::State(h.state));
    }
    let mem_cap = scaled(h.memory_bytes, p.memory_overcommit_percent);
    let mem_free = mem_cap.saturating_sub(h.memory_allocated_bytes);
    if d.memory_bytes > mem_free {
        out.push(Rejection::Memory {
            needed: d.memory_bytes,
            free: mem_free,
        });
    }
    let cpu_cap = scaled(h.logical_cpus as u64, p.cpu_overcommit_percent) as u32;
    let cpu_free = cpu_cap.saturating_sub(h.vcpus_allocated);
    if d.vcpus > cpu_free {
        out.push(Rejection::Vcpus {
            needed: d.vcpus,
            free: cpu_free,
        });
    }
    let missing: Vec<String> = d
        .required_cpu_features
        .iter()
        .filter(|f| !h.cpu_features.iter().any(|g| g == *f))
        .cloned()
        .collect();
    if !missing.is_empty() {
        out.push(Rejection::CpuFeatures { missing });
    }
    if !d.anti_affinity_group.is_empty() && h.groups.contains(&d.anti_affinity_group) {
        out.push(Rejection::AntiAffinity {
            group: d.anti_affinity_group.clone(),
        });
    }
    for sr in &d.srs {
        if !sr.reachable {
            out.push(Rejection::Storage {
                sr_id: sr.id.clone(),
                why: "is unreachable",
            });
        } else if !sr.shared && sr.ip != h.ip {
            out.push(Rejection::Storage {
                sr_id: sr.id.clone(),
                why: "is local to another host",
            });
        }
    }
    for n in &d.networks {
        let reaches = match &n.need {
            NetNeed::Nic(nic) => h.nics.contains(nic),
            NetNeed::Host(id) => h.id == *id,
        };
        if !reaches {
            out.push(Rejection::Network {
                network: n.network.clone(),
                need: n.need.clone(),
            });
        }
    }
    out
}

/// Score of an eligible host: higher is better.
pub fn score(h: &HostCandidate, d: &Demand, p: &Policy) -> f64 {
    let mem_cap = scaled(h.memory_bytes, p.memory_overcommit_percent).max(1) as f64;
    let cpu_cap = scaled(h.logical_cpus as u64, p.cpu_overcommit_percent).max(1) as f64;
    let mem_used = (h.memory_allocated_bytes + d.memory_bytes) as f64 / mem_cap;
    let cpu_used = (h.vcpus_allocated + d.vcpus) as f64 / cpu_cap;
    let used = (mem_used + cpu_used) / 2.0;
    match p.strategy {
        PlacementStrategy::Pack => used,
        _ => 1.0 - used,
    }
}

/// Judges every host and picks the best, or says why none fits.
pub fn explain(hosts: &[HostCandidate], d: &Demand, p: &Policy) -> (Option<usize>, Vec<Verdict>) {
    let mut verdicts: Vec<Verdict> = hosts
        .iter()
        .map(|h| Verdict {
            host_id: h.id.clone(),
            rejections: hard_filters(h, d, p),
            score: 0.0,
        })
        .collect();
    if !d.affinity_group.is_empty() {
        let with_group: Vec<bool> = hosts
            .iter()
            .map(|h| h.groups.contains(&d.affinity_group))
            .collect();
        let any = verdicts
            .iter()
            .zip(&with_group)
            .any(|(v, w)| *w && v.eligible());
        if any {
            for (v, w) in verdicts.iter_mut().zip(&with_group) {
                if !*w {
                    v.rejections.push(Rejection::Affinity {
                        group: d.affinity_group.clone(),
                    });
                }
            }
        }
    }
    let mut best: Option<usize> = None;
    for (i, (v, h)) in verdicts.iter_mut().zip(hosts).enumerate() {
        if v.eligible() {
            v.score = score(h, d, p);
            let better = match best {
                None => true,
                Some(b) => {
                    let bs = score(&hosts[b], d, p);
                    v.score > bs || (v.score == bs && h.id < hosts[b].id)
                }
            };
            if better {
                best = Some(i);
            }
        }
    }
    (best, verdicts)
}

/// Picks a host, or returns every host's reasons.
pub fn place(hosts: &[HostCandidate], d: &Demand, p: &Policy) -> Result<usize, Unplaceable> {
    match explain(hosts, d, p) {
        (Some(i), _) => Ok(i),
        (None, verdicts) => Err(Unplaceable { verdicts }),
    }
}

/// A scheduler for many placements in a row (a host evacuation, HA restarts, a batch of
/// new VMs): hosts are indexed once, CPU features and groups become bit sets,
/// and each placement updates the allocations it made. Gives the same answers as
/// [`place`] placement after placement.
pub struct BatchScheduler {
    policy: Policy,
    /// What every placement reads of every host, compact (the scan walks all of them).
    hosts: Vec<Slot>,
    /// Each host's CPU feature bits, `words` per host, in slot order.
    features: Vec<u64>,
    words: usize,
    /// What only VMs with disks or networks read: ids, addresses, NICs.
    info: Vec<SlotInfo>,
    feature_ids: HashMap<String, usize>,
    /// group → bit set of the hosts (slots) that run at least one VM of it.
    groups: HashMap<String, Vec<u64>>,
}

struct Slot {
    enabled: bool,
    mem_cap: u64,
    mem_alloc: u64,
    cpu_cap: u32,
    cpu_alloc: u32,
}

struct SlotInfo {
    id: String,
    ip: String,
    nics: Vec<String>,
}

fn has_bit(bits: &[u64], i: usize) -> bool {
    bits[i / 64] & (1 << (i % 64)) != 0
}

impl BatchScheduler {
    pub fn new(hosts: &[HostCandidate], policy: Policy) -> Self {
        let mut feature_ids: HashMap<String, usize> = HashMap::new();
        for h in hosts {
            for f in &h.cpu_features {
                let n = feature_ids.len();
                feature_ids.entry(f.clone()).or_insert(n);
            }
        }
        let words = feature_ids.len().div_ceil(64).max(1);
        let host_words = hosts.len().div_ceil(64).max(1);
        let mut groups: HashMap<String, Vec<u64>> = HashMap::new();
        let mut order: Vec<usize> = (0..hosts.len()).collect();
        order.sort_by(|a, b| hosts[*a].id.cmp(&hosts[*b].id));
        let mut features = vec![0u64; words * hosts.len()];
        let mut slots = Vec::with_capacity(hosts.len());
        let mut info = Vec::with_capacity(hosts.len());
        for (slot, &i) in order.iter().enumerate() {
            let h = &hosts[i];
            for f in &h.cpu_features {
                let b = feature_ids[f];
                features[slot * words + b / 64] |= 1 << (b % 64);
            }
            for g in &h.groups {
                let set = groups
                    .entry(g.clone())
                    .or_insert_with(|| vec![0; host_words]);
                set[slot / 64] |= 1 << (slot % 64);
            }
            slots.push(Slot {
                enabled: h.state == HostState::Enabled,
                mem_cap: scaled(h.memory_bytes, policy.memory_overcommit_percent),
                mem_alloc: h.memory_allocated_bytes,
                cpu_cap: scaled(h.logical_cpus as u64, policy.cpu_overcommit_percent) as u32,
                cpu_alloc: h.vcpus_allocated,
            });
            info.push(SlotInfo {
                id: h.id.clone(),
                ip: h.ip.clone(),
                nics: h.nics.clone(),
            });
        }
        BatchScheduler {
            policy,
            hosts: slots,
            features,
            words,
            info,
            feature_ids,
            groups,
        }
    }

    /// Places one VM and records its allocation; `None` when no host fits (use
    /// [`explain`] for the reasons).
    pub fn place(&mut self, d: &Demand) -> Option<&str> {
        let words = self.words;
        let mut need = vec![0u64; words];
        for f in &d.required_cpu_features {
            match self.feature_ids.get(f) {
                Some(&b) => need[b / 64] |= 1 << (b % 64),
                None => return None,
            }
        }
        let group = |g: &str| (!g.is_empty()).then(|| self.groups.get(g)).flatten();
        let anti = group(&d.anti_affinity_group);
        let affine = group(&d.affinity_group);
        let pack = self.policy.strategy == PlacementStrategy::Pack;
        let (features, info) = (&self.features, &self.info);
        let fits = |i: usize, s: &Slot| -> bool {
            s.enabled
                && s.mem_alloc + d.memory_bytes <= s.mem_cap
                && s.cpu_alloc + d.vcpus <= s.cpu_cap
                && features[i * words..(i + 1) * words]
                    .iter()
                    .zip(&need)
                    .all(|(h, n)| h & n == *n)
                && !anti.is_some_and(|a| has_bit(a, i))
                && d.srs
                    .iter()
                    .all(|sr| sr.reachable && (sr.shared || sr.ip == info[i].ip))
                && d.networks.iter().all(|n| match &n.need {
                    NetNeed::Nic(nic) => info[i].nics.contains(nic),
                    NetNeed::Host(id) => info[i].id == *id,
                })
        };
        let score = |s: &Slot| {
            let mem = (s.mem_alloc + d.memory_bytes) as f64 / s.mem_cap.max(1) as f64;
            let cpu = (s.cpu_alloc + d.vcpus) as f64 / s.cpu_cap.max(1) as f64;
            let used = (mem + cpu) / 2.0;
            if pack { used } else { 1.0 - used }
        };
        let hosts = &self.hosts;
        let scan = |best: &mut Option<(usize, f64)>, i: usize| {
            let s = &hosts[i];
            if !fits(i, s) {
                return;
            }
            let sc = score(s);
            // Slots are sorted by host id, so a strict comparison keeps the first on ties.
            if best.is_none_or(|(_, b)| sc > b) {
                *best = Some((i, sc));
            }
        };
        let mut best: Option<(usize, f64)> = None;
        // Affinity: only the hosts that hold the group (in slot order), when any fits.
        if let Some(a) = affine {
            for i in (0..hosts.len()).filter(|&i| has_bit(a, i)) {
                scan(&mut best, i);
            }
        }
        if best.is_none() {
            for i in 0..hosts.len() {
                scan(&mut best, i);
            }
        }
        let (i, _) = best?;
        let s = &mut self.hosts[i];
        s.mem_alloc += d.memory_bytes;
        s.cpu_alloc += d.vcpus;
        let host_words = self.hosts.len().div_ceil(64).max(1);
        for g in [&d.affinity_group, &d.anti_affinity_group] {
            if !g.is_empty() {
                let set = self
                    .groups
                    .entry(g.clone())
                    .or_insert_with(|| vec![0; host_words]);
                set[i / 64] |= 1 << (i % 64);
            }
        }
        Some(&self.info[i].id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn host(id: &str) -> HostCandidate {
        HostCandidate {
            id: id.into(),
            state: HostState::Enabled,
            memory_bytes: 16 * GIB,
            logical_cpus: 8,
            memory_allocated_bytes: 0,
            vcpus_allocated: 0,
            cpu_features: vec!["sse4_2".into(), "avx2".into()],
            ip: "10.0.0.1".into(),
            groups: vec![],
            nics: vec!["eth0".into()],
        }
    }

    fn vm(vcpus: u32, gib: u64) -> Demand {
        Demand {
            vcpus,
            memory_bytes: gib * GIB,
            ..Default::default()
        }
    }

    fn spread() -> Policy {
        Policy::default()
    }

    struct Case {
        name: &'static str,
        host: HostCandidate,
        demand: Demand,
        policy: Policy,
        /// The filter that must reject, or None when the host must pass.
        rejected_by: Option<fn(&Rejection) -> bool>,
    }

    #[test]
    fn every_filter_accepts_and_rejects() {
        let net = |need| NetReach {
            network: "n1".into(),
            need,
        };
        let sr = |shared: bool, reachable: bool, ip: &str| SrReach {
            id: "sr1".into(),
            reachable,
            shared,
            ip: ip.into(),
        };
        let cases = vec![
            Case {
                name: "enabled host passes",
                host: host("a"),
                demand: vm(2, 4),
                policy: spread(),
                rejected_by: None,
            },
            Case {
                name: "disabled host is rejected",
                host: HostCandidate {
                    state: HostState::Disabled,
                    ..host("a")
                },
                demand: vm(1, 1),
                policy: spread(),
                rejected_by: Some(|r| matches!(r, Rejection::State(HostState::Disabled))),
            },
            Case {
                name: "unreachable host is rejected",
                host: HostCandidate {
                    state: HostState::Unreachable,
                    ..host("a")
                },
                demand: vm(1, 1),
                policy: spread(),
                rejected_by: Some(|r| matches!(r, Rejection::State(HostState::Unreachable))),
            },
            Case {
                name: "maintenance host is rejected",
                host: HostCandidate {
                    state: HostState::Maintenance,
                    ..host("a")
                },
                demand: vm(1, 1),
                policy: spread(),
                rejected_by: Some(|r| matches!(r, Rejection::State(HostState::Maintenance))),
            },
            Case {
                name: "memory exactly full passes",
                host: HostCandidate {
                    memory_allocated_bytes: 12 * GIB,
                    ..host("a")
                },
                demand: vm(1, 4),
                policy: spread(),
                rejected_by: None,
            },
            Case {
                name: "memory one byte over is rejected",
                host: HostCandidate {
                    memory_allocated_bytes: 12 * GIB + 1,
                    ..host("a")
                },
                demand: vm(1, 4),
                policy: spread(),
                rejected_by: Some(|r| matches!(r, Rejection::Memory { .. })),
            },
            Case {
                name: "memory overcommit 150% makes room",
                host: HostCandidate {
                    memory_allocated_bytes: 16 * GIB,
                    ..host("a")
                },
                demand: vm(1, 8),
                policy: Policy {
                    memory_overcommit_percent: 150,
                    ..spread()
                },
                rejected_by: None,
            },
            Case {
                name: "vcpus over capacity are rejected",
                host: HostCandidate {
                    vcpus_allocated: 7,
                    ..host("a")
                },
                demand: vm(2, 1),
                policy: spread(),
                rejected_by: Some(|r| matches!(r, Rejection::Vcpus { needed: 2, free: 1 })),
            },
            Case {
                name: "cpu overcommit 400% makes room",
                host: HostCandidate {
                    vcpus_allocated: 30,
                    ..host("a")
                },
                demand: vm(2, 1),
                policy: Policy {
                    cpu_overcommit_percent: 400,
                    ..spread()
                },
                rejected_by: None,
            },
            Case {
                name: "required cpu feature present passes",
                host: host("a"),
                demand: Demand {
                    required_cpu_features: vec!["avx2".into()],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: None,
            },
            Case {
                name: "missing cpu feature is rejected",
                host: host("a"),
                demand: Demand {
                    required_cpu_features: vec!["avx512f".into()],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: Some(
                    |r| matches!(r, Rejection::CpuFeatures { missing } if missing == &["avx512f"]),
                ),
            },
            Case {
                name: "anti-affinity group already on host is rejected",
                host: HostCandidate {
                    groups: vec!["db".into()],
                    ..host("a")
                },
                demand: Demand {
                    anti_affinity_group: "db".into(),
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: Some(|r| matches!(r, Rejection::AntiAffinity { .. })),
            },
            Case {
                name: "anti-affinity other group passes",
                host: HostCandidate {
                    groups: vec!["web".into()],
                    ..host("a")
                },
                demand: Demand {
                    anti_affinity_group: "db".into(),
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: None,
            },
            Case {
                name: "shared reachable repository passes",
                host: host("a"),
                demand: Demand {
                    srs: vec![sr(true, true, "10.9.9.9")],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: None,
            },
            Case {
                name: "unreachable repository is rejected",
                host: host("a"),
                demand: Demand {
                    srs: vec![sr(true, false, "10.9.9.9")],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: Some(
                    |r| matches!(r, Rejection::Storage { why, .. } if why.contains("unreachable")),
                ),
            },
            Case {
                name: "external network on a NIC the host has passes",
                host: host("a"),
                demand: Demand {
                    networks: vec![net(NetNeed::Nic("eth0".into()))],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: None,
            },
            Case {
                name: "external network on a NIC the host lacks is rejected",
                host: host("a"),
                demand: Demand {
                    networks: vec![net(NetNeed::Nic("eth7".into()))],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: Some(|r| {
                    matches!(r, Rejection::Network { need: NetNeed::Nic(n), .. } if n == "eth7")
                        && r.to_string().contains("NIC eth7")
                }),
            },
            Case {
                name: "internal network of this host passes",
                host: host("a"),
                demand: Demand {
                    networks: vec![net(NetNeed::Host("a".into()))],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: None,
            },
            Case {
                name: "internal network of another host is rejected",
                host: host("a"),
                demand: Demand {
                    networks: vec![net(NetNeed::Host("b".into()))],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: Some(|r| r.to_string() == "network: n1 is internal to host b"),
            },
            Case {
                name: "local repository of another host is rejected",
                host: host("a"),
                demand: Demand {
                    srs: vec![sr(false, true, "10.9.9.9")],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: Some(
                    |r| matches!(r, Rejection::Storage { why, .. } if why.contains("local")),
                ),
            },
            Case {
                name: "local repository of this host passes",
                host: host("a"),
                demand: Demand {
                    srs: vec![sr(false, true, "10.0.0.1")],
                    ..vm(1, 1)
                },
                policy: spread(),
                rejected_by: None,
            },
        ];
        for c in cases {
            let r = hard_filters(&c.host, &c.demand, &c.policy);
            match c.rejected_by {
                None => assert!(r.is_empty(), "{}: unexpected {r:?}", c.name),
                Some(pred) => {
                    assert_eq!(r.len(), 1, "{}: expected one rejection, got {r:?}", c.name);
                    assert!(pred(&r[0]), "{}: wrong rejection {r:?}", c.name);
                    assert!(!r[0].to_string().is_empty());
                }
            }
            // The batch scheduler agrees with the reference filters.
            let mut b = BatchScheduler::new(std::slice::from_ref(&c.host), c.policy);
            assert_eq!(b.place(&c.demand).is_some(), r.is_empty(), "{}", c.name);
        }
    }

    #[test]
    fn affinity_keeps_group_together_only_while_it_fits() {
        let hosts = vec![
            host("a"),
            HostCandidate {
                groups: vec!["web".into()],
                memory_allocated_bytes: 8 * GIB,
                ..host("b")
            },
        ];
        let d = Demand {
            affinity_group: "web".into(),
            ..vm(1, 4)
        };
        // Spread alone would pick the empty host a; affinity keeps the VM with its group.
        let (best, verdicts) = explain(&hosts, &d, &spread());
        assert_eq!(best, Some(1));
        assert!(matches!(
            verdicts[0].rejections[..],
            [Rejection::Affinity { .. }]
        ));
        // When the group's host is full, affinity gives way instead of failing.
        let d = Demand {
            affinity_group: "web".into(),
            ..vm(1, 12)
        };
        assert_eq!(place(&hosts, &d, &spread()).unwrap(), 0);
        let mut b = BatchScheduler::new(&hosts, spread());
        assert_eq!(b.place(&d), Some("a"));
    }

    /// Over more hosts than one bit-set word holds, VMs with features, groups, repositories
    /// and networks: the batch scheduler places each where [`place`] does, given the
    /// allocations and groups of the placements before it.
    #[test]
    fn the_batch_scheduler_agrees_with_place_placement_after_placement() {
        let hosts: Vec<HostCandidate> = (0..150)
            .map(|i| {
                let mut h = host(&format!("h{:03}", (i * 37) % 150));
                h.memory_bytes = (8 + (i as u64 % 5) * 8) * GIB;
                h.logical_cpus = 4 + (i % 3) * 4;
                h.ip = format!("10.0.0.{}", i % 7);
                if i % 4 == 0 {
                    h.cpu_features.push("avx512f".into());
                }
                if i % 9 == 0 {
                    h.state = HostState::Disabled;
                }
                if i % 6 == 0 {
                    h.nics.push("eth1".into());
                }
                h
            })
            .collect();
        let demands: Vec<Demand> = (0..600u64)
            .map(|i| Demand {
                required_cpu_features: if i % 11 == 0 {
                    vec!["avx512f".into()]
                } else {
                    vec![]
                },
                affinity_group: if i % 7 == 0 {
                    format!("aff-{}", i % 21)
                } else {
                    String::new()
                },
                anti_affinity_group: if i % 5 == 0 {
                    format!("anti-{}", i % 15)
                } else {
                    String::new()
                },
                srs: if i % 13 == 0 {
                    vec![SrReach {
                        id: "local".into(),
                        reachable: true,
                        shared: false,
                        ip: format!("10.0.0.{}", i % 7),
                    }]
                } else {
                    vec![]
                },
                networks: match i % 17 {
                    0 => vec![NetReach {
                        network: "lan".into(),
                        need: NetNeed::Nic("eth1".into()),
                    }],
                    1 => vec![NetReach {
                        network: "inside".into(),
                        need: NetNeed::Host("h042".into()),
                    }],
                    _ => vec![],
                },
                ..vm(1 + (i % 4) as u32, 1 + i % 6)
            })
            .collect();
        for policy in [
            spread(),
            Policy {
                strategy: PlacementStrategy::Pack,
                ..spread()
            },
        ] {
            let mut reference = hosts.clone();
            let mut batch = BatchScheduler::new(&hosts, policy);
            let mut placed = 0;
            for (n, d) in demands.iter().enumerate() {
                let want = place(&reference, d, &policy).ok();
                let got = batch.place(d).map(str::to_owned);
                assert_eq!(
                    got,
                    want.map(|i| reference[i].id.clone()),
                    "placement {n} ({d:?}) under {:?}",
                    policy.strategy
                );
                if let Some(i) = want {
                    placed += 1;
                    let h = &mut reference[i];
                    h.memory_allocated_bytes += d.memory_bytes;
                    h.vcpus_allocated += d.vcpus;
                    for g in [&d.affinity_group, &d.anti_affinity_group] {
                        if !g.is_empty() && !h.groups.contains(g) {
                            h.groups.push(g.clone());
                        }
                    }
                }
            }
            assert!(
                placed > 100 && placed < demands.len(),
                "{placed} placed: some must not fit"
            );
        }
    }

    struct ScoreCase {
        strategy: PlacementStrategy,
        expect: &'static str,
    }

    #[test]
    fn pack_fills_the_fullest_host_and_spread_the_emptiest() {
        let hosts = vec![
            HostCandidate {
                memory_allocated_bytes: 2 * GIB,
                vcpus_allocated: 1,
                ..host("a")
            },
            HostCandidate {
                memory_allocated_bytes: 10 * GIB,
                vcpus_allocated: 5,
                ..host("b")
            },
            HostCandidate {
                memory_allocated_bytes: 6 * GIB,
                vcpus_allocated: 3,
                ..host("c")
            },
        ];
        for case in [
            ScoreCase {
                strategy: PlacementStrategy::Pack,
                expect: "b",
            },
            ScoreCase {
                strategy: PlacementStrategy::Spread,
                expect: "a",
            },
        ] {
            let p = Policy {
                strategy: case.strategy,
                ..spread()
            };
            let i = place(&hosts, &vm(1, 2), &p).unwrap();
            assert_eq!(hosts[i].id, case.expect, "{:?}", case.strategy);
            let mut b = BatchScheduler::new(&hosts, p);
            assert_eq!(b.place(&vm(1, 2)), Some(case.expect));
        }
    }

    #[test]
    fn pack_and_spread_over_a_sequence() {
        let hosts = vec![host("a"), host("b")];
        let mut pack = BatchScheduler::new(
            &hosts,
            Policy {
                strategy: PlacementStrategy::Pack,
                ..spread()
            },
        );
        let placed: Vec<String> = (0..4)
            .map(|_| pack.place(&vm(2, 4)).unwrap().to_owned())
            .collect();
        assert_eq!(placed, ["a", "a", "a", "a"]);
        assert_eq!(pack.place(&vm(2, 4)), Some("b"));
        let mut sp = BatchScheduler::new(&hosts, spread());
        let placed: Vec<String> = (0..4)
            .map(|_| sp.place(&vm(2, 4)).unwrap().to_owned())
            .collect();
        assert_eq!(placed, ["a", "b", "a", "b"]);
        for _ in 0..4 {
            assert!(sp.place(&vm(2, 4)).is_some());
        }
        // Both hosts full: nothing more fits.
        assert_eq!(sp.place(&vm(2, 4)), None);
    }

    #[test]
    fn ties_go_to_the_first_host_id() {
        let hosts = vec![host("z"), host("m"), host("c")];
        assert_eq!(hosts[place(&hosts, &vm(1, 1), &spread()).unwrap()].id, "c");
    }

    #[test]
    fn vm_larger_than_any_host_is_explained() {
        let hosts = vec![host("a"), host("b")];
        let err = place(&hosts, &vm(64, 512), &spread()).unwrap_err();
        assert_eq!(err.verdicts.len(), 2);
        let text = err.to_string();
        assert!(text.contains("memory: needs 524288 MiB"), "{text}");
        assert!(text.contains("vcpus: needs 64"), "{text}");
        assert!(
            place(&[], &vm(1, 1), &spread())
                .unwrap_err()
                .to_string()
                .contains("no host")
        );
    }
}
