//! The management contract of the pool: every message and service that crosses a process
//! boundary between `poolctl`, `poold`, `hostd` and `storaged`.
//!
//! # Layout
//! - `proto/storage.proto` → [`storage`]: `StorageService` (thin pools, volumes,
//!   snapshots, clones, iSCSI exports and access grants).
//! - `proto/host.proto` → [`host`]: `HostService` (VM lifecycle, console, disks, live
//!   migration, host info and metrics).
//! - `proto/pool.proto` → [`coordinator`]: `PoolService` (the pool as people see it),
//!   `HostAgentService` (hostd's heartbeats) and `CoordinatorPeerService` (Raft transport).
//!
//! The code is generated at build time by `tonic-prost-build` from descriptors that
//! `protox` compiles in-process; no system `protoc` is involved.
//!
//! ```
//! use prost::Message;
//! use proto::storage::CreateVolumeRequest;
//!
//! let req = CreateVolumeRequest { name: "disk0".into(), virtual_size_bytes: 1 << 30, ..Default::default() };
//! let bytes = req.encode_to_vec();
//! assert_eq!(CreateVolumeRequest::decode(bytes.as_slice()).unwrap(), req);
//! ```

/// Generated modules, nested as the protobuf packages are (`pool.v1`, `pool.host.v1`,
/// `pool.storage.v1`) so that the generated cross-package paths resolve. Clippy's style
/// lints are for code people write, not for what prost generates.
#[allow(clippy::all)]
pub mod pool {
    pub mod v1 {
        tonic::include_proto!("pool.v1");
    }
    pub mod host {
        pub mod v1 {
            tonic::include_proto!("pool.host.v1");
        }
    }
    pub mod storage {
        pub mod v1 {
            tonic::include_proto!("pool.storage.v1");
        }
    }
}

pub use pool::host::v1 as host;
pub use pool::storage::v1 as storage;
pub use pool::v1 as coordinator;

/// The size rule of `SaveVm`'s state volume, which `hostd` checks before it writes and
/// `poold` follows when it makes one: the one copy both read.
pub mod saved_state {
    /// The header block before the saved stream.
    pub const HEADER_LEN: u64 = 4096;
    /// A guest page.
    pub const PAGE: u64 = 4096;
    /// A migration frame's header, and the most a page's frame adds at worst.
    pub const FRAME_HEADER_LEN: u64 = 8;
    pub const PAGE_FRAME_OVERHEAD: u64 = 16;
    /// The largest State frame payload and the largest Hello a stream may carry.
    pub const MAX_STATE: u64 = 16 << 20;
    pub const MAX_HELLO: u64 = 256 << 10;

    /// The smallest state volume for a VM of `memory_bytes`: the header, every page with
    /// its frame header at worst, the largest State frame and the Hello, in whole MiB.
    ///
    /// ```
    /// assert_eq!(proto::saved_state::volume_bytes_for(64 << 20), 81 << 20);
    /// ```
    pub fn volume_bytes_for(memory_bytes: u64) -> u64 {
        let pages = memory_bytes.div_ceil(PAGE);
        let worst = HEADER_LEN
            + memory_bytes
            + pages * PAGE_FRAME_OVERHEAD
            + MAX_STATE
            + MAX_HELLO
            + 2 * FRAME_HEADER_LEN;
        worst.div_ceil(1 << 20) << 20
    }
}

/// Milliseconds since the Unix epoch: the one wall clock the daemons and tools read for
/// what they stamp or age (task times, heartbeats, snapshot times). A clock set before
/// 1970 reads as 0.
/// The most IPv4 addresses one VIF may hold: the pool's limit, and hostd's on a lock.
pub const MAX_VIF_ADDRESSES: usize = 64;

/// `s` as an address a VIF may hold: unicast IPv4 (not 0.0.0.0, broadcast or multicast).
pub fn vif_ipv4(s: &str) -> Option<std::net::Ipv4Addr> {
    s.parse().ok().filter(|ip: &std::net::Ipv4Addr| {
        !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast())
    })
}

pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The protobuf `Timestamp` of `unix_ms`, milliseconds since the epoch (as [`unix_ms`]
/// reads them): how the daemons turn their clock into the contract's times.
pub fn timestamp(unix_ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (unix_ms / 1000) as i64,
        nanos: ((unix_ms % 1000) * 1_000_000) as i32,
    }
}

/// Milliseconds since the epoch of a protobuf `Timestamp`, the inverse of [`timestamp`]
/// (0 for a time before the epoch).
pub fn timestamp_ms(t: &prost_types::Timestamp) -> u64 {
    let ms = t
        .seconds
        .saturating_mul(1000)
        .saturating_add(i64::from(t.nanos) / 1_000_000);
    u64::try_from(ms).unwrap_or(0)
}

/// The civil (proleptic Gregorian) date of a day count since 1970-01-01, as (year,
/// month 1-12, day 1-31): H. Hinnant's algorithm, for clocks shown to people or guests.
pub fn civil_from_days(days: i64) -> (i64, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

const DAY_MS: i64 = 86_400_000;

/// What a retention keeps of `(id, taken at ms)` (a schedule's snapshots, a backup chain's
/// points): the newest `keep_last`, and the
/// newest of each of the last `keep_daily` days and `keep_weekly` weeks (UTC, weeks from
/// Monday) that have one. A retention of all zeros keeps everything.
pub fn retention_kept(
    snaps: &[(String, u64)],
    r: &coordinator::Retention,
) -> std::collections::BTreeSet<String> {
    if r.keep_last == 0 && r.keep_daily == 0 && r.keep_weekly == 0 {
        return snaps.iter().map(|(id, _)| id.clone()).collect();
    }
    let mut newest_first: Vec<&(String, u64)> = snaps.iter().collect();
    newest_first.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let mut keep: std::collections::BTreeSet<String> = newest_first
        .iter()
        .take(r.keep_last as usize)
        .map(|(id, _)| id.clone())
        .collect();
    let day = |ms: u64| (ms as i64).div_euclid(DAY_MS);
    // 1970-01-05 was a Monday: day 4.
    let week = |ms: u64| (day(ms) - 4).div_euclid(7);
    for (period, n) in [
        (&day as &dyn Fn(u64) -> i64, r.keep_daily),
        (&week, r.keep_weekly),
    ] {
        let mut seen = std::collections::HashSet::new();
        for (id, at) in &newest_first {
            if seen.len() == n as usize {
                break;
            }
            if seen.insert(period(*at)) {
                keep.insert(id.clone());
            }
        }
    }
    keep
}

/// An error and its causes, "outer: inner: innermost": the message of a gRPC status made
/// from an error, so the caller reads why, not only what. A cause whose text the outer
/// message already ends with is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let msg = c.to_string();
        if !out.ends_with(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        cause = c.source();
    }
    out
}

/// Re-exported so users of the contract name one version of each.
pub use prost;
pub use prost_types;
pub use tonic;

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use std::collections::{BTreeSet, HashMap};

    #[test]
    fn timestamps_split_milliseconds_into_seconds_and_nanos() {
        let t = timestamp(1_700_000_123_456);
        assert_eq!((t.seconds, t.nanos), (1_700_000_123, 456_000_000));
        let t = timestamp(0);
        assert_eq!((t.seconds, t.nanos), (0, 0));
    }

    #[test]
    fn an_error_chain_names_every_cause_once() {
        #[derive(Debug)]
        struct E(&'static str, Option<Box<E>>);
        impl std::fmt::Display for E {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.0)
            }
        }
        impl std::error::Error for E {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                self.1.as_deref().map(|e| e as _)
            }
        }
        let inner = E("disk on fire", None);
        let mid = E("write failed: disk on fire", Some(Box::new(inner)));
        let top = E("commit failed", Some(Box::new(mid)));
        assert_eq!(
            error_chain(&top),
            "commit failed: write failed: disk on fire"
        );
    }

    fn round_trip<M: Message + Default + PartialEq + std::fmt::Debug>(msg: M) {
        let bytes = msg.encode_to_vec();
        assert!(
            !bytes.is_empty(),
            "a populated message encodes to some bytes"
        );
        let back = M::decode(bytes.as_slice()).expect("decodes");
        assert_eq!(back, msg);
    }

    fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
        Some(prost_types::Timestamp { seconds, nanos: 7 })
    }

    #[test]
    fn storage_messages_round_trip() {
        round_trip(storage::CreatePoolRequest {
            name: "sr0".into(),
            backing_kind: storage::BackingKind::File as i32,
            backing_path: "/var/lib/pool/sr0.img".into(),
            size_bytes: 20 << 30,
            chunk_size_bytes: 64 << 10,
            warning_threshold_percent: 80,
        });
        round_trip(storage::Volume {
            id: "7f1c0d7e-5a44-4c4f-9a52-0f5d2b1e9a10".into(),
            pool_id: "p".into(),
            name: "disk".into(),
            kind: storage::VolumeKind::Snapshot as i32,
            origin_id: "o".into(),
            virtual_size_bytes: u64::MAX,
            allocated_bytes: 1,
            exclusive_bytes: 2,
            shared_bytes: 3,
            read_only: true,
            block_size_bytes: 4096,
            created_at: ts(1_700_000_000),
            labels: HashMap::from([("owner".into(), "lab".into())]),
        });
        round_trip(storage::GrantAccessRequest {
            export_id: "e".into(),
            initiator_iqn: "iqn.2026-11.lab.pool:host1".into(),
            chap: Some(storage::ChapCredentials {
                username: "u".into(),
                secret: "s".into(),
            }),
            mutual_chap: None,
        });
    }

    #[test]
    fn host_messages_round_trip() {
        round_trip(host::CreateVmRequest {
            vm_id: "vm".into(),
            config: Some(host::VmConfig {
                name: "demo".into(),
                vcpus: 2,
                memory_bytes: 512 << 20,
                boot: Some(host::BootSource {
                    kernel_path: "guest.elf".into(),
                    initrd_path: String::new(),
                    command_line: "mode=heartbeat".into(),
                    protocol: host::BootProtocol::Pvh as i32,
                }),
                disks: vec![host::DiskConfig {
                    id: "vda".into(),
                    backend: Some(host::disk_config::Backend::Iscsi(host::IscsiDisk {
                        portal: "127.0.0.1:3260".into(),
                        target_iqn: "iqn.2026-11.lab.pool:vol".into(),
                        lun: 0,
                        ..Default::default()
                    })),
                    read_only: false,
                }],
                cpuid_mask: vec![host::CpuidEntry {
                    function: 1,
                    index: 0,
                    eax: 1,
                    ebx: 2,
                    ecx: 3,
                    edx: 4,
                }],
                console_buffer_bytes: 65536,
                labels: HashMap::new(),
                nets: vec![host::NetConfig {
                    id: "eth0".into(),
                    tap: "pnt0123456789a0".into(),
                    mac: "02:1a:2b:3c:4d:5e".into(),
                    mtu: 1500,
                    rate_bytes_per_sec: Some(1 << 20),
                    rate_packets_per_sec: None,
                    vlan: Some(42),
                    busy_poll_us: Some(20),
                    lock: Some(host::AddressLock {
                        ipv4: vec!["10.0.0.2".into()],
                    }),
                    network: None,
                }],
            }),
            start: true,
        });
        round_trip(host::MigrationProgress {
            migration_id: "m".into(),
            vm_id: "vm".into(),
            phase: host::MigrationPhase::DirtyRounds as i32,
            round: 3,
            bytes_sent: 1 << 29,
            downtime_ms: 12,
            ..Default::default()
        });
    }

    #[test]
    fn pool_messages_round_trip() {
        round_trip(coordinator::MigrateVmRequest {
            request_id: "r1".into(),
            vm_id: "vm".into(),
            destination_host_id: "h2".into(),
            downtime_budget_ms: 300,
            auto_converge: true,
            quick: true,
        });
        round_trip(coordinator::TaskResponse {
            task: Some(coordinator::Task {
                id: "t".into(),
                kind: "vm.migrate".into(),
                state: coordinator::TaskState::Running as i32,
                progress_percent: 40,
                created_at: ts(1),
                results: HashMap::from([("downtime_ms".into(), "31".into())]),
                ..Default::default()
            }),
        });
        round_trip(coordinator::CreateVmRequest {
            request_id: "r2".into(),
            spec: Some(coordinator::VmSpec {
                name: "web".into(),
                vcpus: 1,
                memory_bytes: 1 << 30,
                ha_priority: coordinator::HaRestartPriority::Restart as i32,
                ..Default::default()
            }),
            source: Some(coordinator::create_vm_request::Source::TemplateId(
                "tpl".into(),
            )),
            sr_id: String::new(),
            start: true,
            host_id: String::new(),
            networks: vec!["lan".into()],
        });
    }

    #[test]
    fn enums_have_unspecified_zero() {
        assert_eq!(
            storage::VolumeKind::default(),
            storage::VolumeKind::Unspecified
        );
        assert_eq!(host::PowerState::default(), host::PowerState::Unspecified);
        assert_eq!(coordinator::Role::default(), coordinator::Role::Unspecified);
        assert_eq!(
            coordinator::TaskState::default(),
            coordinator::TaskState::Unspecified
        );
    }

    const HOUR: u64 = 3_600_000;
    const DAY: u64 = 24 * HOUR;
    /// 2026-12-01 00:00 UTC, a Tuesday.
    const DEC_1: u64 = 1_796_083_200_000;

    fn retention(last: u32, daily: u32, weekly: u32) -> coordinator::Retention {
        coordinator::Retention {
            keep_last: last,
            keep_daily: daily,
            keep_weekly: weekly,
        }
    }

    #[test]
    fn retention_keeps_the_newest_of_each_rule_and_their_union() {
        // One a day at 02:00 for 30 days, then a second on the last day at 14:00.
        let mut snaps: Vec<(String, u64)> = (0..30)
            .map(|d| (format!("d{:02}", d + 1), DEC_1 + d * DAY + 2 * HOUR))
            .collect();
        snaps.push(("d30b".into(), DEC_1 + 29 * DAY + 14 * HOUR));
        let ids = |k: BTreeSet<String>| k.into_iter().collect::<Vec<_>>();
        assert_eq!(
            ids(retention_kept(&snaps, &retention(2, 0, 0))),
            ["d30", "d30b"]
        );
        // The newest of each of the last 3 days: the 30th's later one.
        assert_eq!(
            ids(retention_kept(&snaps, &retention(0, 3, 0))),
            ["d28", "d29", "d30b"]
        );
        // Weeks from Monday: the 28th-30th, the 21st-27th, the 14th-20th.
        assert_eq!(
            ids(retention_kept(&snaps, &retention(0, 0, 3))),
            ["d20", "d27", "d30b"]
        );
        assert_eq!(
            ids(retention_kept(&snaps, &retention(1, 2, 2))),
            ["d27", "d29", "d30b"]
        );
        assert_eq!(
            retention_kept(&snaps, &retention(0, 0, 0)).len(),
            31,
            "no rule keeps all"
        );
        assert!(retention_kept(&[], &retention(3, 3, 3)).is_empty());
    }
}
