//! The state machine's snapshot format: what a member stores when it compacts its log and
//! what a slow follower receives instead of the entries it missed.
//!
//! Layout: the 8-byte magic `POOLSNAP`, a u32 big-endian format version, then one protobuf
//! message ([`SnapshotV1`]; fields added since version 1 was first written — jobs, VM
//! snapshots, users, audit, networks, alerts — decode as empty from older snapshots, so the
//! version stays).
//! The persisted type is separate from the runtime
//! [`PoolState`]: derived data (per-host allocations) is rebuilt on load, not stored.

use prost::Message;
use proto::coordinator as pb;

use super::command::{
    CaRollRecord, CommandResult, IssuedRecord, Job, JoinTokenRecord, MemberRecord, PoolCaRecord,
    ScheduleRun,
};
use super::machine::{PoolState, RequestRecord, UserRecord};

pub const MAGIC: &[u8; 8] = b"POOLSNAP";
pub const VERSION: u32 = 1;
pub const VERSIONS_ACCEPTED: std::ops::RangeInclusive<u32> = 1..=1;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot is {len} bytes, shorter than its 12-byte header")]
    Short { len: usize },
    #[error("snapshot does not start with the POOLSNAP magic")]
    Magic,
    #[error("snapshot format version {found}; this poold reads {accepted:?}")]
    Version {
        found: u32,
        accepted: std::ops::RangeInclusive<u32>,
    },
    #[error("snapshot body does not decode")]
    Decode(#[source] prost::DecodeError),
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct SnapshotV1 {
    #[prost(string, tag = "1")]
    pub pool_id: String,
    #[prost(uint64, tag = "2")]
    pub applied_index: u64,
    #[prost(message, optional, tag = "3")]
    pub settings: Option<pb::PoolSettings>,
    #[prost(message, optional, tag = "4")]
    pub ha: Option<pb::HaSettings>,
    #[prost(message, repeated, tag = "5")]
    pub members: Vec<MemberRecord>,
    #[prost(message, repeated, tag = "6")]
    pub hosts: Vec<pb::Host>,
    #[prost(message, repeated, tag = "7")]
    pub srs: Vec<pb::StorageRepository>,
    #[prost(message, repeated, tag = "8")]
    pub volumes: Vec<proto::storage::Volume>,
    #[prost(message, repeated, tag = "9")]
    pub vms: Vec<pb::Vm>,
    /// In creation order.
    #[prost(message, repeated, tag = "10")]
    pub tasks: Vec<pb::Task>,
    /// In arrival order.
    #[prost(message, repeated, tag = "11")]
    pub requests: Vec<RequestV1>,
    #[prost(message, repeated, tag = "12")]
    pub templates: Vec<pb::Template>,
    #[prost(message, repeated, tag = "13")]
    pub jobs: Vec<Job>,
    #[prost(message, repeated, tag = "14")]
    pub vm_snapshots: Vec<pb::VmSnapshot>,
    #[prost(message, repeated, tag = "15")]
    pub users: Vec<UserV1>,
    #[prost(bytes = "vec", tag = "16")]
    pub token_key: Vec<u8>,
    /// Oldest first.
    #[prost(message, repeated, tag = "17")]
    pub audit: Vec<pb::AuditEvent>,
    #[prost(string, repeated, tag = "18")]
    pub force_stop: Vec<String>,
    /// The pool's CA, key included: snapshots live in the members' 0700 data directories.
    #[prost(message, optional, tag = "19")]
    pub pool_ca: Option<PoolCaRecord>,
    #[prost(message, repeated, tag = "20")]
    pub join_tokens: Vec<JoinTokenRecord>,
    #[prost(message, optional, tag = "21")]
    pub ca_roll: Option<CaRollRecord>,
    #[prost(message, repeated, tag = "22")]
    pub issued: Vec<IssuedRecord>,
    #[prost(message, repeated, tag = "23")]
    pub networks: Vec<pb::Network>,
    #[prost(message, repeated, tag = "24")]
    pub alerts: Vec<pb::Alert>,
    #[prost(uint64, tag = "25")]
    pub alert_seq: u64,
    #[prost(message, repeated, tag = "26")]
    pub schedule_runs: Vec<ScheduleRun>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct UserV1 {
    #[prost(message, optional, tag = "1")]
    pub user: Option<pb::User>,
    #[prost(string, tag = "2")]
    pub password_hash: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestV1 {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(uint64, tag = "2")]
    pub at_ms: u64,
    #[prost(string, tag = "3")]
    pub kind: String,
    #[prost(message, optional, tag = "4")]
    pub result: Option<CommandResult>,
}

/// Encodes the state: the bytes of a [`SnapshotV1`] made from it, written straight from
/// the state's own collections. Building the `SnapshotV1` first would copy every kept task,
/// request and audit event (about a million allocations at 100,000 requests), which was
/// most of the time a snapshot held the Raft task.
pub fn encode(s: &PoolState) -> Vec<u8> {
    let mut out = Vec::with_capacity(1 << 20);
    encode_into(s, &mut out);
    out
}

/// [`encode`] into `out`, replacing what it held. Reusing one buffer spares the page
/// faults of growing a fresh one of many megabytes on every snapshot.
pub fn encode_into(s: &PoolState, out: &mut Vec<u8>) {
    let mut w = Wire(std::mem::take(out));
    w.0.clear();
    w.0.extend_from_slice(MAGIC);
    w.0.extend_from_slice(&VERSION.to_be_bytes());
    // Field by field in tag order, scalars left out when they hold their default value:
    // what prost's derived encoder writes for `SnapshotV1`.
    w.string(1, &s.pool_id);
    w.uint64(2, s.applied_index);
    w.message(3, &s.settings);
    w.message(4, &s.ha);
    for (id, address) in &s.members {
        let m = MemberRecord {
            id: *id,
            address: address.clone(),
        };
        w.message(5, &m);
    }
    s.hosts.values().for_each(|x| w.message(6, x));
    s.srs.values().for_each(|x| w.message(7, x));
    s.volumes.values().for_each(|x| w.message(8, x));
    s.vms.values().for_each(|x| w.message(9, x));
    for id in &s.task_order {
        if let Some(t) = s.tasks.get(id) {
            w.message(10, t.as_ref());
        }
    }
    for (_, id) in &s.request_order {
        if let Some(r) = s.requests.get(id) {
            w.request(11, id, r);
        }
    }
    s.templates.values().for_each(|x| w.message(12, x));
    s.jobs.values().for_each(|x| w.message(13, x));
    s.vm_snapshots.values().for_each(|x| w.message(14, x));
    for u in s.users.values() {
        let u = UserV1 {
            user: Some(u.user.clone()),
            password_hash: u.password_hash.clone(),
        };
        w.message(15, &u);
    }
    w.bytes(16, &s.token_key);
    s.audit.iter().for_each(|x| w.message(17, x));
    // Repeated strings are written even when empty.
    for f in &s.force_stop {
        w.key(18, LEN);
        w.varint(f.len() as u64);
        w.0.extend_from_slice(f.as_bytes());
    }
    if let Some(ca) = &s.pool_ca {
        w.message(19, ca);
    }
    s.join_tokens.values().for_each(|x| w.message(20, x));
    if let Some(roll) = &s.ca_roll {
        w.message(21, roll);
    }
    s.issued.values().for_each(|x| w.message(22, x));
    s.networks.values().for_each(|x| w.message(23, x));
    s.alerts.values().for_each(|x| w.message(24, x));
    w.uint64(25, s.alert_seq);
    s.schedule_runs.values().for_each(|x| w.message(26, x));
    *out = w.0;
}

const VARINT: u64 = 0;
const LEN: u64 = 2;

fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn string_len(tag: u32, v: &str) -> usize {
    if v.is_empty() {
        0
    } else {
        varint_len(u64::from(tag) << 3) + varint_len(v.len() as u64) + v.len()
    }
}

fn int_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        varint_len(u64::from(tag) << 3) + varint_len(v)
    }
}

/// Protobuf wire format, for the fields [`encode`] writes itself.
struct Wire(Vec<u8>);

impl Wire {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push(v as u8 | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn key(&mut self, tag: u32, wire_type: u64) {
        self.varint(u64::from(tag) << 3 | wire_type);
    }

    fn uint64(&mut self, tag: u32, v: u64) {
        if v != 0 {
            self.key(tag, VARINT);
            self.varint(v);
        }
    }

    fn string(&mut self, tag: u32, v: &str) {
        self.bytes(tag, v.as_bytes());
    }

    fn bytes(&mut self, tag: u32, v: &[u8]) {
        if !v.is_empty() {
            self.key(tag, LEN);
            self.varint(v.len() as u64);
            self.0.extend_from_slice(v);
        }
    }

    fn message(&mut self, tag: u32, m: &impl Message) {
        self.key(tag, LEN);
        self.varint(m.encoded_len() as u64);
        m.encode_raw(&mut self.0);
    }

    /// A [`RequestV1`] from a kept request, its result a [`CommandResult`] without a task.
    fn request(&mut self, tag: u32, id: &str, r: &RequestRecord) {
        // int32 is written as a sign-extended 64-bit varint.
        let code = r.code as i64 as u64;
        let result_len = int_len(2, code) + string_len(3, &r.message) + string_len(4, &r.task_id);
        let len = string_len(1, id)
            + int_len(2, r.at_ms)
            + string_len(3, &r.kind)
            + varint_len(4 << 3)
            + varint_len(result_len as u64)
            + result_len;
        self.key(tag, LEN);
        self.varint(len as u64);
        self.string(1, id);
        self.uint64(2, r.at_ms);
        self.string(3, &r.kind);
        self.key(4, LEN);
        self.varint(result_len as u64);
        self.uint64(2, code);
        self.string(3, &r.message);
        self.string(4, &r.task_id);
    }
}

/// Decodes a snapshot written by [`encode`] (any accepted version).
pub fn decode(bytes: &[u8]) -> Result<PoolState, SnapshotError> {
    if bytes.len() < 12 {
        return Err(SnapshotError::Short { len: bytes.len() });
    }
    if &bytes[..8] != MAGIC {
        return Err(SnapshotError::Magic);
    }
    let found = u32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if !VERSIONS_ACCEPTED.contains(&found) {
        return Err(SnapshotError::Version {
            found,
            accepted: VERSIONS_ACCEPTED,
        });
    }
    let b = SnapshotV1::decode(&bytes[12..]).map_err(SnapshotError::Decode)?;
    let mut s = PoolState::new(
        &b.pool_id,
        b.members.into_iter().map(|m| (m.id, m.address)).collect(),
    );
    s.applied_index = b.applied_index;
    s.settings = b.settings.unwrap_or_else(super::machine::default_settings);
    s.ha = b.ha.unwrap_or_default();
    s.hosts = b.hosts.into_iter().map(|h| (h.id.clone(), h)).collect();
    s.srs = b.srs.into_iter().map(|x| (x.id.clone(), x)).collect();
    s.volumes = b.volumes.into_iter().map(|x| (x.id.clone(), x)).collect();
    s.vms = b.vms.into_iter().map(|x| (x.id.clone(), x)).collect();
    s.templates = b.templates.into_iter().map(|x| (x.id.clone(), x)).collect();
    s.jobs = b.jobs.into_iter().map(|j| (j.task_id.clone(), j)).collect();
    s.vm_snapshots = b
        .vm_snapshots
        .into_iter()
        .map(|x| (x.id.clone(), x))
        .collect();
    s.users = b
        .users
        .into_iter()
        .filter_map(|u| {
            let user = u.user?;
            Some((
                user.id.clone(),
                UserRecord {
                    user,
                    password_hash: u.password_hash,
                },
            ))
        })
        .collect();
    s.token_key = b.token_key;
    // The windows go into the ones `PoolState::new` sized, so they never grow later.
    s.audit.extend(b.audit);
    s.force_stop = b.force_stop.into_iter().collect();
    s.pool_ca = b.pool_ca;
    s.ca_roll = b.ca_roll;
    s.issued = b
        .issued
        .into_iter()
        .map(|i| (i.identity.clone(), i))
        .collect();
    s.networks = b.networks.into_iter().map(|n| (n.id.clone(), n)).collect();
    s.alerts = b.alerts.into_iter().map(|a| (a.id.clone(), a)).collect();
    s.schedule_runs = b
        .schedule_runs
        .into_iter()
        .map(|r| (r.schedule.clone(), r))
        .collect();
    s.alert_seq = b.alert_seq;
    s.join_tokens = b
        .join_tokens
        .into_iter()
        .map(|t| (t.id.clone(), t))
        .collect();
    s.task_order.extend(b.tasks.iter().map(|t| t.id.clone()));
    s.tasks = b
        .tasks
        .into_iter()
        .map(|t| (t.id.clone(), Box::new(t)))
        .collect();
    for r in b.requests {
        s.request_order.push_back((r.at_ms, r.request_id.clone()));
        s.requests.insert(
            r.request_id,
            RequestRecord::new(r.at_ms, &r.kind, &r.result.unwrap_or_default()),
        );
    }
    s.rebuild_alloc();
    s.settle();
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::*;
    use std::collections::BTreeMap;

    #[test]
    fn state_round_trips_with_derived_data_rebuilt() {
        let s = sample_state();
        let bytes = encode(&s);
        let back = decode(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.templates.len(), 1);
        assert_eq!(back.alloc["h1"].vcpus, 2);
        // The snapshot tree: a parent and the VM's current one.
        assert_eq!(back.vm_snapshots["s2"].parent_id, "s1");
        assert_eq!(back.vms["vm1"].current_snapshot_id, "s2");
    }

    /// A host, a template and a VM placed on the host, each made by a command.
    fn sample_state() -> PoolState {
        let mut s = PoolState::new("pool-a", BTreeMap::from([(1, "127.0.0.1:1".to_string())]));
        let ops = [
            Op::JoinHost(JoinHost {
                host_id: "h1".into(),
                name: "one".into(),
                address: "10.0.0.1:7000".into(),
            }),
            Op::HostReport(HostReport {
                host_id: "h1".into(),
                info: Some(proto::host::HostInfo {
                    memory_total_bytes: 8 << 30,
                    logical_cpus: 4,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            Op::CreateTemplate(pb::Template {
                id: "tpl".into(),
                name: "tiny".into(),
                spec: Some(pb::VmSpec {
                    name: "tiny".into(),
                    vcpus: 1,
                    memory_bytes: 64 << 20,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            Op::CreateVm(CreateVm {
                vm_id: "vm1".into(),
                spec: Some(pb::VmSpec {
                    name: "web".into(),
                    vcpus: 2,
                    memory_bytes: 1 << 30,
                    ..Default::default()
                }),
                template_id: String::new(),
                start_on_host: "h1".into(),
                vifs: vec![],
            }),
        ];
        for (i, op) in ops.into_iter().enumerate() {
            let r = s.apply(
                i as u64 + 2,
                &Command {
                    request_id: format!("r{i}"),
                    at_ms: 1000 + i as u64,
                    task_id: format!("t{i}"),
                    requested_by: String::new(),
                    method: String::new(),
                    peer: String::new(),
                    op: Some(op),
                },
            );
            assert_eq!(r.code, 0, "{}", r.message);
        }
        for (id, parent) in [("s1", ""), ("s2", "s1")] {
            s.vm_snapshots.insert(
                id.into(),
                pb::VmSnapshot {
                    id: id.into(),
                    vm_id: "vm1".into(),
                    name: id.into(),
                    parent_id: parent.into(),
                    ..Default::default()
                },
            );
        }
        s.vms.get_mut("vm1").unwrap().current_snapshot_id = "s2".into();
        s.schedule_runs.insert(
            "nightly".into(),
            ScheduleRun {
                last_due_ms: 86_400_000,
                last_task_id: "t9".into(),
                schedule: "nightly".into(),
                backup_snapshot_id: "s1".into(),
                backup_tried_snapshot_id: "s2".into(),
            },
        );
        s
    }

    /// What `encode` must equal: prost's derived encoder over a `SnapshotV1` copied from
    /// the state (how snapshots were written before `encode` wrote them field by field).
    fn encode_through_a_copy(s: &PoolState) -> Vec<u8> {
        let body = SnapshotV1 {
            pool_id: s.pool_id.clone(),
            applied_index: s.applied_index,
            settings: Some(s.settings.clone()),
            ha: Some(s.ha),
            members: s
                .members
                .iter()
                .map(|(id, address)| MemberRecord {
                    id: *id,
                    address: address.clone(),
                })
                .collect(),
            hosts: s.hosts.values().cloned().collect(),
            srs: s.srs.values().cloned().collect(),
            volumes: s.volumes.values().cloned().collect(),
            vms: s.vms.values().cloned().collect(),
            templates: s.templates.values().cloned().collect(),
            jobs: s.jobs.values().cloned().collect(),
            vm_snapshots: s.vm_snapshots.values().cloned().collect(),
            users: s
                .users
                .values()
                .map(|u| UserV1 {
                    user: Some(u.user.clone()),
                    password_hash: u.password_hash.clone(),
                })
                .collect(),
            token_key: s.token_key.clone(),
            audit: s.audit.iter().cloned().collect(),
            force_stop: s.force_stop.iter().cloned().collect(),
            pool_ca: s.pool_ca.clone(),
            join_tokens: s.join_tokens.values().cloned().collect(),
            ca_roll: s.ca_roll.clone(),
            issued: s.issued.values().cloned().collect(),
            networks: s.networks.values().cloned().collect(),
            alerts: s.alerts.values().cloned().collect(),
            alert_seq: s.alert_seq,
            schedule_runs: s.schedule_runs.values().cloned().collect(),
            tasks: s.task_order.iter().filter_map(|id| s.task(id)).collect(),
            requests: s
                .request_order
                .iter()
                .filter_map(|(_, id)| {
                    s.requests.get(id).map(|r| RequestV1 {
                        request_id: id.clone(),
                        at_ms: r.at_ms,
                        kind: r.kind.clone(),
                        result: Some(r.result()),
                    })
                })
                .collect(),
        };
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&VERSION.to_be_bytes());
        body.encode(&mut out).unwrap();
        out
    }

    #[test]
    fn direct_encoding_matches_the_derived_encoder() {
        let mut s = sample_state();
        // Edge cases of the hand-written fields: defaults left out, a negative int32,
        // long strings (two-byte lengths), empty repeated strings, large varints.
        let record = |at_ms, kind: &str, code, message: &str, task_id: &str| RequestRecord {
            at_ms,
            kind: kind.into(),
            code,
            message: message.into(),
            task_id: task_id.into(),
        };
        for (id, r) in [
            ("", record(0, "", 0, "", "")),
            ("neg", record(u64::MAX, "k", -1, "", "t")),
            (
                "long",
                record(1 << 40, &"x".repeat(300), 5, &"m".repeat(20_000), ""),
            ),
        ] {
            s.request_order.push_back((r.at_ms, id.to_owned()));
            s.requests.insert(id.to_owned(), r);
        }
        // An id in the order whose record is gone is skipped, as the derived path did.
        s.request_order.push_back((1, "forgotten".into()));
        s.force_stop.insert(String::new());
        s.force_stop.insert("vm-9".into());
        s.token_key = vec![7; 200];
        s.users.insert(
            "u1".into(),
            UserRecord {
                user: pb::User {
                    id: "u1".into(),
                    name: "ann".into(),
                    ..Default::default()
                },
                password_hash: "h".into(),
            },
        );
        s.audit.push_back(pb::AuditEvent {
            id: "a1".into(),
            method: "CreateVm".into(),
            ..Default::default()
        });
        s.applied_index = 1 << 33;
        s.pool_ca = Some(PoolCaRecord {
            cert_pem: "cert".into(),
            key_pem: "key".into(),
        });
        s.join_tokens.insert(
            "0011223344556677".into(),
            JoinTokenRecord {
                id: "0011223344556677".into(),
                secret_hash: vec![9; 32],
                identity: "host/h1".into(),
                expires_at_ms: 5,
                used: true,
            },
        );
        s.ca_roll = Some(CaRollRecord {
            previous_cert_pem: "old".into(),
            cross_pem: "cross".into(),
            started_at_ms: 3,
        });
        s.issued.insert(
            "host/h1".into(),
            IssuedRecord {
                identity: "host/h1".into(),
                issuer: "sha256:00".into(),
                not_after_ms: 9,
            },
        );
        s.networks.insert(
            "n1".into(),
            pb::Network {
                id: "n1".into(),
                name: "lan".into(),
                kind: pb::NetworkKind::External as i32,
                nic: "eth0".into(),
                vlan: 4094,
                mtu: 1500,
                ..Default::default()
            },
        );
        let first = s.vms.keys().next().cloned().unwrap_or_default();
        if let Some(vm) = s.vms.get_mut(&first) {
            vm.vifs.push(pb::Vif {
                id: "vif1".into(),
                vm_id: vm.id.clone(),
                network_id: "n1".into(),
                mac: "02:00:00:00:00:01".into(),
                rate_packets_per_sec: Some(0),
                ..Default::default()
            });
        }
        let direct = encode(&s);
        assert_eq!(direct, encode_through_a_copy(&s));
        assert_eq!(decode(&direct).unwrap(), s_without_forgotten(s));
        // And an empty state, where nearly every field is a default.
        let empty = PoolState::new("", BTreeMap::new());
        assert_eq!(encode(&empty), encode_through_a_copy(&empty));
    }

    fn s_without_forgotten(mut s: PoolState) -> PoolState {
        s.request_order.retain(|(_, id)| id != "forgotten");
        s
    }

    #[test]
    fn bad_headers_are_refused() {
        assert!(matches!(
            decode(b"short"),
            Err(SnapshotError::Short { len: 5 })
        ));
        assert!(matches!(
            decode(b"NOTASNAP\0\0\0\x01"),
            Err(SnapshotError::Magic)
        ));
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&9u32.to_be_bytes());
        assert!(matches!(
            decode(&v),
            Err(SnapshotError::Version { found: 9, .. })
        ));
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&1u32.to_be_bytes());
        v.extend_from_slice(&[0xff, 0xff, 0xff]);
        assert!(matches!(decode(&v), Err(SnapshotError::Decode(_))));
    }
}
