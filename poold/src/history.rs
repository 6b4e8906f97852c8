//! Metrics history: round-robin tiers of buckets, like XAPI's RRDs, for the metrics the
//! console graphs.
//!
//! Every coordinator member keeps its own history, fed as it applies committed host
//! reports (`consensus/node/apply.rs` hands each applied report to [`History::record`]);
//! the time of a sample is the sample's own `at`, never the member's clock, so the state
//! machine stays free of wall-clock time and members that applied the same log hold the
//! same buckets. A member joining starts with none and fills from the reports it applies
//! from then on; a member that restarts reads back what it saved ([`History::load`]). The
//! leader
//! commits a host's report when something the pool acts on changed or every 30 s
//! (`service/agent.rs`); in between it keeps the first heartbeat sample of each 5 s bucket
//! ([`FineSamples`]) and commits them with the next report, so the 5 s tier is full, at
//! most 30 s behind.
//!
//! Each series (one metric of one host or VM) has four tiers ([`TIERS`]): 5 s buckets for
//! 10 minutes, 1 minute for 2 hours, 1 hour for a week, 1 day for a year. A sample falls
//! into the bucket of each tier that covers its time; a bucket keeps the average and the
//! maximum of the samples that fell in it. Counters (`vcpu_time_ns`, disk and network
//! bytes) are kept as per-second rates between consecutive samples of the same target; a
//! counter that goes back (the VM process restarted) gives no rate for that interval.
//! Gauges are kept as they are.
//!
//! # Bounds
//! A series holds [`BUCKETS_PER_SERIES`] (773) buckets of two `f32`s, allocated in full
//! when the series is made and overwritten in a ring from then on: 6,184 bytes of buckets
//! plus ~420 of bookkeeping, key and map entry, ~6.6 KB the same after a day or after ten
//! years. History is kept for 4 host metrics and 6 VM metrics, so a pool of 1,000 VMs on
//! 50 hosts holds (6,000 + 200) series × ~6.6 KB ≈ 41 MB (38 MB of it buckets). Series
//! whose target is gone from the state are dropped at the next applied report
//! ([`History::prune`]), so the count is bounded by the pool's hosts and VMs.
//!
//! # On disk
//! Each member saves its history to [`FILE`] in its data directory (0600, written
//! atomically) every minute and at a clean shutdown (`server.rs`), and reads it back at
//! start before serving. Little-endian: the magic `POOLHIST`, the version (u32), the tiers
//! (count u32, then width i64 and length u32 each), the series count (u32), each series,
//! and a CRC-32 of all that came before. A series: its target id (u16 length, UTF-8), its
//! metric (u8, the index in [`Metric::ALL`]), its last sample (present u8, at ms i64, raw
//! f64), then per tier the newest bucket number (present u8, i64), the filling bucket's sum
//! (f64) and count (u32), and every slot's average and maximum (f32 each). A series is
//! [`SERIES_FILE_BYTES`] plus its id, so the file is bounded as memory is. The log entries
//! applied again after a restart are those the `last` sample already holds, so they add
//! nothing twice. A file that cannot be read back (truncated, corrupt, another version or
//! other tiers) is renamed `<file>.bad`, replacing an older one, with a warning, and the
//! member starts with empty history.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use proto::host as hpb;

use crate::state::PoolState;

/// One tier: buckets of `width_s` seconds, `len` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tier {
    pub width_s: i64,
    pub len: usize,
}

/// Finest first.
pub const TIERS: [Tier; 4] = [
    Tier {
        width_s: 5,
        len: 120, // 10 minutes
    },
    Tier {
        width_s: 60,
        len: 120, // 2 hours
    },
    Tier {
        width_s: 3600,
        len: 168, // a week
    },
    Tier {
        width_s: 86_400,
        len: 365, // a year
    },
];

/// The finest tier's bucket width: the leader keeps a host's heartbeat samples this far
/// apart for the next committed report ([`FineSamples`]).
pub const FINEST_S: i64 = TIERS[0].width_s;

/// The samples of one host the leader keeps between two committed reports: the first
/// sample of each finest-tier bucket, so reports committed every 30 s still fill every
/// 5 s bucket. At most [`FineSamples::KEPT`], the oldest dropped first; a new leader
/// starts with none (those few seconds stay empty).
#[derive(Debug, Clone, Default)]
pub struct FineSamples {
    kept: Vec<hpb::HostMetrics>,
    /// The time of the newest sample kept or committed (unix ms).
    last_ms: Option<i64>,
}

impl FineSamples {
    /// Two minutes of 5 s samples: reports are committed at least every 30 s.
    pub const KEPT: usize = 24;

    /// Keeps `m` if it is the first sample of a finest-tier bucket newer than the last.
    pub fn offer(&mut self, m: &hpb::HostMetrics) {
        let Some(at) = m.at.as_ref().map(unix_ms) else {
            return;
        };
        let bucket = |ms: i64| ms.div_euclid(FINEST_S * 1000);
        if self.last_ms.is_some_and(|l| bucket(at) <= bucket(l)) {
            return;
        }
        if self.kept.len() == Self::KEPT {
            self.kept.remove(0);
        }
        self.kept.push(m.clone());
        self.last_ms = Some(at);
    }

    /// `m` is being committed: the samples kept before it, oldest first, to commit with it.
    pub fn commit(&mut self, m: &hpb::HostMetrics) -> Vec<hpb::HostMetrics> {
        let at = m.at.as_ref().map(unix_ms);
        let kept = std::mem::take(&mut self.kept);
        if at.is_some() {
            self.last_ms = at;
        }
        kept.into_iter()
            .filter(|k| k.at.as_ref().map(unix_ms) < at)
            .collect()
    }
}

/// The buckets of one series over all tiers.
pub const BUCKETS_PER_SERIES: usize = TIERS[0].len + TIERS[1].len + TIERS[2].len + TIERS[3].len;

/// The metrics history is kept for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Metric {
    CpuPercent,
    MemoryUsedBytes,
    MemoryAssignedToVmsBytes,
    VmsRunning,
    VcpuTimeNs,
    RssBytes,
    DiskReadBytes,
    DiskWriteBytes,
    NetRxBytes,
    NetTxBytes,
}

impl Metric {
    /// Every metric; its index here is its code in [`FILE`] (append only).
    pub const ALL: [Metric; 10] = [
        Metric::CpuPercent,
        Metric::MemoryUsedBytes,
        Metric::MemoryAssignedToVmsBytes,
        Metric::VmsRunning,
        Metric::VcpuTimeNs,
        Metric::RssBytes,
        Metric::DiskReadBytes,
        Metric::DiskWriteBytes,
        Metric::NetRxBytes,
        Metric::NetTxBytes,
    ];
    pub const HOST: [Metric; 4] = [
        Metric::CpuPercent,
        Metric::MemoryUsedBytes,
        Metric::MemoryAssignedToVmsBytes,
        Metric::VmsRunning,
    ];
    pub const VM: [Metric; 6] = [
        Metric::VcpuTimeNs,
        Metric::RssBytes,
        Metric::DiskReadBytes,
        Metric::DiskWriteBytes,
        Metric::NetRxBytes,
        Metric::NetTxBytes,
    ];

    /// Its name in `QueryMetricsRequest.metric`.
    pub fn name(self) -> &'static str {
        match self {
            Metric::CpuPercent => "cpu_percent",
            Metric::MemoryUsedBytes => "memory_used_bytes",
            Metric::MemoryAssignedToVmsBytes => "memory_assigned_to_vms_bytes",
            Metric::VmsRunning => "vms_running",
            Metric::VcpuTimeNs => "vcpu_time_ns",
            Metric::RssBytes => "rss_bytes",
            Metric::DiskReadBytes => "disk_read_bytes",
            Metric::DiskWriteBytes => "disk_write_bytes",
            Metric::NetRxBytes => "net_rx_bytes",
            Metric::NetTxBytes => "net_tx_bytes",
        }
    }

    /// The host (`host` true) or VM metric of that name that has history.
    pub fn parse(name: &str, host: bool) -> Option<Metric> {
        let known: &[Metric] = if host { &Metric::HOST } else { &Metric::VM };
        known.iter().copied().find(|m| m.name() == name)
    }

    /// A counter is kept as its rate per second; the rest as values.
    pub fn is_counter(self) -> bool {
        matches!(
            self,
            Metric::VcpuTimeNs
                | Metric::DiskReadBytes
                | Metric::DiskWriteBytes
                | Metric::NetRxBytes
                | Metric::NetTxBytes
        )
    }

    fn of_host(self, m: &hpb::HostMetrics) -> f64 {
        match self {
            Metric::CpuPercent => m.cpu_percent,
            Metric::MemoryUsedBytes => m.memory_used_bytes as f64,
            Metric::MemoryAssignedToVmsBytes => m.memory_assigned_to_vms_bytes as f64,
            Metric::VmsRunning => m.vms_running as f64,
            _ => 0.0,
        }
    }

    fn of_vm(self, m: &hpb::VmMetrics) -> f64 {
        let disks = |f: fn(&hpb::DiskMetrics) -> u64| m.disks.iter().map(f).sum::<u64>() as f64;
        let nics = |f: fn(&hpb::NicMetrics) -> u64| m.nics.iter().map(f).sum::<u64>() as f64;
        match self {
            Metric::VcpuTimeNs => m.vcpu_time_ns as f64,
            Metric::RssBytes => m.rss_bytes as f64,
            Metric::DiskReadBytes => disks(|d| d.read_bytes),
            Metric::DiskWriteBytes => disks(|d| d.write_bytes),
            Metric::NetRxBytes => nics(|n| n.rx_bytes),
            Metric::NetTxBytes => nics(|n| n.tx_bytes),
            _ => 0.0,
        }
    }
}

/// One bucket: the average and the maximum of what fell in it; NaN for none.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    avg: f32,
    max: f32,
}

const EMPTY: Bucket = Bucket {
    avg: f32::NAN,
    max: f32::NAN,
};

/// One tier of one series: a ring of buckets indexed by bucket number (time / width)
/// modulo its length. Only the newest bucket is still filling; its sum and count are
/// kept so that its average is exact.
#[derive(Debug, Clone)]
struct Ring {
    tier: Tier,
    /// The newest bucket's number; None before the first sample.
    newest: Option<i64>,
    sum: f64,
    count: u32,
    slots: Box<[Bucket]>,
}

impl Ring {
    fn new(tier: Tier) -> Ring {
        Ring {
            tier,
            newest: None,
            sum: 0.0,
            count: 0,
            slots: vec![EMPTY; tier.len].into_boxed_slice(),
        }
    }

    fn slot(&mut self, n: i64) -> &mut Bucket {
        &mut self.slots[n.rem_euclid(self.tier.len as i64) as usize]
    }

    fn add(&mut self, at_s: i64, v: f64) {
        let n = at_s.div_euclid(self.tier.width_s);
        match self.newest {
            // A sample older than the bucket filling now: it is not added to a closed one.
            Some(newest) if n < newest => return,
            Some(newest) if n == newest => {}
            newest => {
                // Buckets skipped since the newest had no samples: clear what they held
                // a lap ago.
                if let Some(newest) = newest {
                    let gap = (n - newest).min(self.tier.len as i64);
                    for k in 0..gap {
                        *self.slot(n - k) = EMPTY;
                    }
                }
                self.newest = Some(n);
                self.sum = 0.0;
                self.count = 0;
            }
        }
        self.sum += v;
        self.count += 1;
        let avg = (self.sum / self.count as f64) as f32;
        let first = self.count == 1;
        let b = self.slot(n);
        b.avg = avg;
        b.max = if first { v as f32 } else { b.max.max(v as f32) };
    }

    /// The start (unix seconds) of the oldest bucket the ring still holds.
    fn reaches_back_to(&self) -> Option<i64> {
        self.newest
            .map(|n| (n - self.tier.len as i64 + 1) * self.tier.width_s)
    }

    /// Buckets with samples, oldest first: (start in unix seconds, bucket).
    fn buckets(&self) -> impl Iterator<Item = (i64, Bucket)> + '_ {
        let len = self.tier.len as i64;
        // Before the first sample: no bucket numbers at all.
        let (first, count) = self.newest.map_or((0, 0), |n| (n - len + 1, len));
        (first..first + count).filter_map(move |n| {
            let b = self.slots[n.rem_euclid(len) as usize];
            (!b.avg.is_nan()).then_some((n * self.tier.width_s, b))
        })
    }
}

/// One metric of one target.
#[derive(Debug, Clone)]
struct Series {
    counter: bool,
    /// The last sample taken (unix ms, raw value): the base of the next rate, and the
    /// guard against a report applied twice.
    last: Option<(i64, f64)>,
    rings: [Ring; 4],
}

impl Series {
    fn new(counter: bool) -> Series {
        Series {
            counter,
            last: None,
            rings: TIERS.map(Ring::new),
        }
    }

    fn record(&mut self, at_ms: i64, raw: f64) {
        let prev = self.last;
        if prev.is_some_and(|(t, _)| at_ms <= t) {
            return;
        }
        self.last = Some((at_ms, raw));
        let v = if self.counter {
            match prev {
                Some((t, p)) if raw >= p => (raw - p) * 1000.0 / (at_ms - t) as f64,
                // The first sample, or a counter that went back: no rate.
                _ => return,
            }
        } else {
            raw
        };
        let at_s = at_ms.div_euclid(1000);
        for r in &mut self.rings {
            r.add(at_s, v);
        }
    }

    /// Heap bytes held by its buckets.
    fn bucket_bytes(&self) -> usize {
        self.rings
            .iter()
            .map(|r| r.slots.len() * std::mem::size_of::<Bucket>())
            .sum()
    }

    /// The tier a query with buckets of `step_s` seconds reading back to `since` reads.
    fn tier_for(&self, step_s: i64, since: Option<i64>) -> &Ring {
        let mut i = TIERS.iter().rposition(|t| t.width_s <= step_s).unwrap_or(0);
        if let Some(since) = since {
            while i + 1 < TIERS.len()
                && self.rings[i]
                    .reaches_back_to()
                    .is_some_and(|oldest| oldest > since)
            {
                i += 1;
            }
        }
        &self.rings[i]
    }
}

/// A bucket as a query answers it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// The bucket's start, unix seconds.
    pub at_s: i64,
    pub width_s: i64,
    pub avg: f64,
    pub max: f64,
}

/// A member's metrics history: every series, by target id and metric.
#[derive(Debug, Default, Clone)]
pub struct History {
    series: HashMap<(String, Metric), Series>,
}

fn unix_ms(t: &proto::prost_types::Timestamp) -> i64 {
    proto::timestamp_ms(t) as i64
}

impl History {
    /// Takes host `host_id`'s applied report: its own metrics at `m.at`, and those of each
    /// VM at the VM's `at` (the host's when the VM has none) for the VMs the state places
    /// on that host (a VM reported by a host it is not placed on, say the destination of
    /// a migration before switchover, is left out: its counters would look like resets).
    pub fn record(&mut self, s: &PoolState, host_id: &str, m: &hpb::HostMetrics) {
        let Some(at) = m.at.as_ref().map(unix_ms) else {
            return;
        };
        for metric in Metric::HOST {
            self.series_mut(host_id, metric)
                .record(at, metric.of_host(m));
        }
        for vm in &m.vms {
            if s.vms.get(&vm.vm_id).is_none_or(|v| v.host_id != host_id) {
                continue;
            }
            let at = vm.at.as_ref().map_or(at, unix_ms);
            for metric in Metric::VM {
                self.series_mut(&vm.vm_id, metric)
                    .record(at, metric.of_vm(vm));
            }
        }
    }

    fn series_mut(&mut self, target: &str, metric: Metric) -> &mut Series {
        self.series
            .entry((target.to_owned(), metric))
            .or_insert_with(|| Series::new(metric.is_counter()))
    }

    /// Drops the series of hosts and VMs the state no longer holds.
    pub fn prune(&mut self, s: &PoolState) {
        self.series
            .retain(|(id, _), _| s.hosts.contains_key(id) || s.vms.contains_key(id));
    }

    /// The buckets of `metric` of `target` that overlap `[since, until]` (unix seconds,
    /// either open), oldest first, from the tier with the widest buckets not wider than
    /// `step_s` (the finest when `step_s` is under 5 s) or, when that tier no longer
    /// reaches back to `since`, the finest coarser one that does (the coarsest at worst).
    pub fn query(
        &self,
        target: &str,
        metric: Metric,
        step_s: i64,
        since: Option<i64>,
        until: Option<i64>,
    ) -> Vec<Point> {
        let Some(series) = self.series.get(&(target.to_owned(), metric)) else {
            return Vec::new();
        };
        let ring = series.tier_for(step_s, since);
        let width_s = ring.tier.width_s;
        ring.buckets()
            .filter(|(at, _)| since.is_none_or(|s| at + width_s > s))
            .filter(|(at, _)| until.is_none_or(|u| *at <= u))
            .map(|(at_s, b)| Point {
                at_s,
                width_s,
                avg: f64::from(b.avg),
                max: f64::from(b.max),
            })
            .collect()
    }

    /// How many series it holds.
    pub fn len(&self) -> usize {
        self.series.len()
    }

    pub fn is_empty(&self) -> bool {
        self.series.is_empty()
    }

    /// Heap bytes of the buckets of one target's `metric`; None without that series.
    pub fn bucket_bytes(&self, target: &str, metric: Metric) -> Option<usize> {
        self.series
            .get(&(target.to_owned(), metric))
            .map(Series::bucket_bytes)
    }
}

/// The file each member keeps its history in, in its data directory.
pub const FILE: &str = "metrics-history.bin";
const MAGIC: &[u8; 8] = b"POOLHIST";
const VERSION: u32 = 1;
/// The bytes of one series in [`FILE`] besides its target id.
pub const SERIES_FILE_BYTES: usize =
    2 + 1 + 17 + TIERS.len() * (9 + 8 + 4) + BUCKETS_PER_SERIES * 8;

/// Why a saved history cannot be read back.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a metrics history file")]
    Magic,
    #[error("version {0}; this poold reads version {VERSION}")]
    Version(u32),
    #[error("its tiers are not this poold's")]
    Tiers,
    #[error("truncated")]
    Truncated,
    #[error("checksum mismatch")]
    Checksum,
    #[error("{0}")]
    Malformed(&'static str),
}

/// Why [`History::load`] started empty.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot decode {path}")]
    Decode {
        path: PathBuf,
        #[source]
        source: DecodeError,
    },
}

fn put_opt_i64(out: &mut Vec<u8>, v: Option<i64>) {
    out.push(u8::from(v.is_some()));
    out.extend_from_slice(&v.unwrap_or(0).to_le_bytes());
}

/// Reads a saved history front to back.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let (head, rest) = self
            .0
            .split_first_chunk::<N>()
            .ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(*head)
    }
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let (head, rest) = self.0.split_at_checked(n).ok_or(DecodeError::Truncated)?;
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn i64(&mut self) -> Result<i64, DecodeError> {
        Ok(i64::from_le_bytes(self.take()?))
    }
    fn f64(&mut self) -> Result<f64, DecodeError> {
        Ok(f64::from_le_bytes(self.take()?))
    }
    fn f32(&mut self) -> Result<f32, DecodeError> {
        Ok(f32::from_le_bytes(self.take()?))
    }
    fn opt_i64(&mut self) -> Result<Option<i64>, DecodeError> {
        let present = self.u8()?;
        let v = self.i64()?;
        match present {
            0 => Ok(None),
            1 => Ok(Some(v)),
            _ => Err(DecodeError::Malformed("a presence flag is neither 0 nor 1")),
        }
    }
}

impl History {
    /// The history in the format of [`FILE`] (see the module's doc).
    pub fn encode(&self) -> Vec<u8> {
        let ids: usize = self.series.keys().map(|(id, _)| id.len()).sum();
        let mut out = Vec::with_capacity(64 + self.series.len() * SERIES_FILE_BYTES + ids);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(TIERS.len() as u32).to_le_bytes());
        for t in TIERS {
            out.extend_from_slice(&t.width_s.to_le_bytes());
            out.extend_from_slice(&(t.len as u32).to_le_bytes());
        }
        // Target ids are UUIDs; one too long for the format is left out rather than cut.
        // In order, so that the same history always makes the same bytes.
        let mut kept: Vec<_> = self
            .series
            .iter()
            .filter(|((id, _), _)| id.len() <= usize::from(u16::MAX))
            .map(|((id, metric), series)| {
                let code = Metric::ALL
                    .iter()
                    .position(|m| m == metric)
                    .expect("in ALL");
                (id, code as u8, series)
            })
            .collect();
        kept.sort_unstable_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        out.extend_from_slice(&(kept.len() as u32).to_le_bytes());
        for (id, code, series) in kept {
            out.extend_from_slice(&(id.len() as u16).to_le_bytes());
            out.extend_from_slice(id.as_bytes());
            out.push(code);
            let (at, raw) = series.last.unzip();
            put_opt_i64(&mut out, at);
            out.extend_from_slice(&raw.unwrap_or(0.0).to_le_bytes());
            for ring in &series.rings {
                put_opt_i64(&mut out, ring.newest);
                out.extend_from_slice(&ring.sum.to_le_bytes());
                out.extend_from_slice(&ring.count.to_le_bytes());
                for b in &ring.slots {
                    out.extend_from_slice(&b.avg.to_le_bytes());
                    out.extend_from_slice(&b.max.to_le_bytes());
                }
            }
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads back what [`History::encode`] wrote.
    pub fn decode(data: &[u8]) -> Result<History, DecodeError> {
        let mut r = Reader(data);
        if &r.take::<8>()? != MAGIC {
            return Err(DecodeError::Magic);
        }
        let version = r.u32()?;
        if version != VERSION {
            return Err(DecodeError::Version(version));
        }
        let (body, crc) = data
            .split_last_chunk::<4>()
            .filter(|(body, _)| body.len() >= 12 + 4 + TIERS.len() * 12 + 4)
            .ok_or(DecodeError::Truncated)?;
        // A file cut short past its header shows as a mismatch too.
        if crc32fast::hash(body) != u32::from_le_bytes(*crc) {
            return Err(DecodeError::Checksum);
        }
        let mut r = Reader(&body[12..]);
        if r.u32()? as usize != TIERS.len() {
            return Err(DecodeError::Tiers);
        }
        for t in TIERS {
            if r.i64()? != t.width_s || r.u32()? as usize != t.len {
                return Err(DecodeError::Tiers);
            }
        }
        let count = r.u32()? as usize;
        // Bounded by what the file holds, whatever the count says.
        let mut series = HashMap::with_capacity(count.min(r.0.len() / SERIES_FILE_BYTES));
        for _ in 0..count {
            let len = usize::from(r.u16()?);
            let id = std::str::from_utf8(r.bytes(len)?)
                .map_err(|_| DecodeError::Malformed("a target id is not UTF-8"))?
                .to_owned();
            let metric = *Metric::ALL
                .get(usize::from(r.u8()?))
                .ok_or(DecodeError::Malformed("an unknown metric"))?;
            let at = r.opt_i64()?;
            let raw = r.f64()?;
            let mut s = Series::new(metric.is_counter());
            s.last = at.map(|at| (at, raw));
            for ring in &mut s.rings {
                ring.newest = r.opt_i64()?;
                ring.sum = r.f64()?;
                ring.count = r.u32()?;
                for b in ring.slots.iter_mut() {
                    b.avg = r.f32()?;
                    b.max = r.f32()?;
                }
            }
            if series.insert((id, metric), s).is_some() {
                return Err(DecodeError::Malformed("a series appears twice"));
            }
        }
        if !r.0.is_empty() {
            return Err(DecodeError::Malformed("bytes after the last series"));
        }
        Ok(History { series })
    }

    /// Writes the history to `path` (0600, atomically: a temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), pool_trust::files::FileError> {
        pool_trust::files::write_private(path, &self.encode())
    }

    /// The history saved at `path`; empty when there is none. A file that cannot be read
    /// back leaves an empty history and the error; the caller warns. One that cannot be
    /// decoded is moved aside to `<path>.bad` (replacing an older one) so that what went
    /// wrong can still be looked at after the next save.
    pub fn load(path: &Path) -> (History, Option<LoadError>) {
        let data = match std::fs::read(path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return (History::default(), None);
            }
            Err(source) => {
                let e = LoadError::Read {
                    path: path.to_owned(),
                    source,
                };
                return (History::default(), Some(e));
            }
        };
        match History::decode(&data) {
            Ok(h) => (h, None),
            Err(source) => {
                let mut bad = path.as_os_str().to_owned();
                bad.push(".bad");
                let _ = std::fs::rename(path, bad);
                let e = LoadError::Decode {
                    path: path.to_owned(),
                    source,
                };
                (History::default(), Some(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::coordinator as pb;

    /// Midnight UTC, so that every tier's bucket starts there.
    const T0: i64 = 19_000 * 86_400;

    fn ts(at_ms: i64) -> Option<proto::prost_types::Timestamp> {
        Some(proto::prost_types::Timestamp {
            seconds: at_ms.div_euclid(1000),
            nanos: (at_ms.rem_euclid(1000) * 1_000_000) as i32,
        })
    }

    /// Host h1 with vm1 placed on it.
    fn pool() -> PoolState {
        let mut s = PoolState::default();
        s.hosts.insert(
            "h1".into(),
            pb::Host {
                id: "h1".into(),
                ..Default::default()
            },
        );
        for vm in ["vm1", "vm2"] {
            s.vms.insert(
                vm.into(),
                pb::Vm {
                    id: vm.into(),
                    host_id: "h1".into(),
                    ..Default::default()
                },
            );
        }
        s
    }

    /// h1's report at `t` seconds after T0 (plus `ms`): its CPU, and vm1's vCPU time.
    fn report(t: i64, ms: i64, cpu: f64, vcpu_ns: u64) -> hpb::HostMetrics {
        let at = (T0 + t) * 1000 + ms;
        hpb::HostMetrics {
            at: ts(at),
            cpu_percent: cpu,
            vms: vec![hpb::VmMetrics {
                vm_id: "vm1".into(),
                at: ts(at),
                vcpu_time_ns: vcpu_ns,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// (seconds after T0, avg, max) of each bucket.
    fn points(h: &History, target: &str, m: Metric, step: i64) -> Vec<(i64, f64, f64)> {
        h.query(target, m, step, None, None)
            .into_iter()
            .map(|p| (p.at_s - T0, p.avg, p.max))
            .collect()
    }

    #[test]
    fn heartbeats_between_commits_fill_every_5_s_bucket() {
        let s = pool();
        let mut fine = FineSamples::default();
        let mut h = History::default();
        // A heartbeat a second, the report committed at 0 s and 30 s only.
        for t in 0..=30 {
            let m = report(t, 0, t as f64, 0);
            if t % 30 == 0 {
                for earlier in fine.commit(&m) {
                    h.record(&s, "h1", &earlier);
                }
                h.record(&s, "h1", &m);
            } else {
                fine.offer(&m);
            }
        }
        // The first sample of each bucket rode on the report at 30 s.
        let at: Vec<i64> = points(&h, "h1", Metric::CpuPercent, 5)
            .into_iter()
            .map(|(t, avg, _)| {
                assert_eq!(avg, t as f64, "bucket {t} holds its first sample");
                t
            })
            .collect();
        assert_eq!(at, [0, 5, 10, 15, 20, 25, 30]);

        // Nothing more is kept from the bucket just committed; the next bucket's first is.
        for t in 31..35 {
            fine.offer(&report(t, 0, 0.0, 0));
        }
        fine.offer(&report(35, 0, 0.0, 0));
        fine.offer(&report(36, 0, 0.0, 0));
        let kept = fine.commit(&report(37, 0, 0.0, 0));
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].at, report(35, 0, 0.0, 0).at);
    }

    #[test]
    fn the_samples_kept_between_commits_are_bounded() {
        let mut fine = FineSamples::default();
        for b in 0..100 {
            fine.offer(&report(b * FINEST_S, 0, b as f64, 0));
        }
        let kept = fine.commit(&report(100 * FINEST_S, 0, 0.0, 0));
        assert_eq!(kept.len(), FineSamples::KEPT);
        // The newest are kept, oldest first.
        assert_eq!(kept[0].cpu_percent, (100 - FineSamples::KEPT) as f64);
        assert_eq!(kept[FineSamples::KEPT - 1].cpu_percent, 99.0);
        // A kept sample newer than the one committed (a clock that went back) is dropped.
        fine.offer(&report(101 * FINEST_S, 0, 0.0, 0));
        assert!(
            fine.commit(&report(100 * FINEST_S + 1, 0, 0.0, 0))
                .is_empty()
        );
    }

    #[test]
    fn a_gauge_falls_into_a_bucket_of_every_tier_with_its_average_and_maximum() {
        let s = pool();
        let mut h = History::default();
        for (t, cpu) in [(0, 10.0), (1, 20.0), (5, 30.0), (61, 40.0)] {
            h.record(&s, "h1", &report(t, 0, cpu, 0));
        }
        let cpu = Metric::CpuPercent;
        assert_eq!(
            points(&h, "h1", cpu, 5),
            [(0, 15.0, 20.0), (5, 30.0, 30.0), (60, 40.0, 40.0)]
        );
        // The widest tier not wider than the step: 60 s for 60 and 300.
        for step in [60, 300, 3595] {
            assert_eq!(
                points(&h, "h1", cpu, step),
                [(0, 20.0, 30.0), (60, 40.0, 40.0)],
                "step {step}"
            );
        }
        assert_eq!(points(&h, "h1", cpu, 3600), [(0, 25.0, 40.0)]);
        assert_eq!(points(&h, "h1", cpu, 86_400), [(0, 25.0, 40.0)]);
        assert_eq!(points(&h, "h1", cpu, 604_800), [(0, 25.0, 40.0)]);
        // A tier that no longer reaches back to `since` gives way to one that does.
        let late = 3 * 3600;
        h.record(&s, "h1", &report(late, 0, 50.0, 0));
        let p = h.query("h1", cpu, 5, Some(T0), None);
        assert_eq!(
            p.iter().map(|p| p.width_s).collect::<Vec<_>>(),
            [3600, 3600]
        );
        assert_eq!((p[0].avg, p[1].avg), (25.0, 50.0));
        // ... and `since` and `until` bound the buckets (those that overlap).
        let p = h.query("h1", cpu, 5, Some(T0 + late - 5), Some(T0 + late));
        assert_eq!(p.len(), 1);
        assert_eq!((p[0].at_s, p[0].width_s, p[0].avg), (T0 + late, 5, 50.0));
        assert!(
            h.query("h1", cpu, 60, Some(T0 + late + 61), None)
                .is_empty()
        );
    }

    #[test]
    fn counters_become_rates_per_second_and_a_counter_that_goes_back_gives_none() {
        let s = pool();
        let mut h = History::default();
        // 5 s of vCPU time in the first 10 s (ms in the timestamps count), then 1 s in 10,
        // then the VM restarts (the counter goes back), then 2 s in 10.
        for (t, ms, ns) in [
            (0, 500, 0),
            (10, 500, 5_000_000_000),
            (20, 500, 6_000_000_000),
            (30, 500, 1_000_000_000),
            (40, 500, 3_000_000_000),
        ] {
            h.record(&s, "h1", &report(t, ms, 0.0, ns));
        }
        let vcpu = Metric::VcpuTimeNs;
        assert_eq!(
            points(&h, "vm1", vcpu, 5),
            [(10, 5e8, 5e8), (20, 1e8, 1e8), (40, 2e8, 2e8)]
        );
        let p = points(&h, "vm1", vcpu, 60);
        assert_eq!(p.len(), 1);
        assert!((p[0].1 - 8e8 / 3.0).abs() < 1e2, "{p:?}");
        assert_eq!(p[0].2, 5e8);
        // The same report applied twice (or an older one) changes nothing.
        h.record(&s, "h1", &report(40, 500, 0.0, 3_000_000_000));
        h.record(&s, "h1", &report(35, 0, 0.0, 0));
        assert_eq!(points(&h, "vm1", vcpu, 5).len(), 3);
    }

    #[test]
    fn old_buckets_are_overwritten_in_rings_of_a_fixed_size() {
        let s = pool();
        let mut h = History::default();
        // 15 minutes every 5 s: the 5 s tier keeps the last 10.
        for i in 0..180 {
            h.record(&s, "h1", &report(i * 5, 0, i as f64, 0));
        }
        let p = points(&h, "h1", Metric::CpuPercent, 5);
        assert_eq!(p.len(), 120);
        assert_eq!(p[0], (300, 60.0, 60.0));
        assert_eq!(p[119], (895, 179.0, 179.0));
        let bytes = h.bucket_bytes("h1", Metric::CpuPercent);
        assert_eq!(bytes, Some(BUCKETS_PER_SERIES * 8));
        // After a silence of more than a lap, nothing of the lap before is left.
        h.record(&s, "h1", &report(895 + 5 * 121, 0, 1.0, 0));
        assert_eq!(
            points(&h, "h1", Metric::CpuPercent, 5),
            [(895 + 5 * 121, 1.0, 1.0)]
        );
        assert_eq!(h.bucket_bytes("h1", Metric::CpuPercent), bytes);
    }

    #[test]
    fn a_series_holds_the_same_memory_after_a_year_of_samples() {
        assert_eq!(BUCKETS_PER_SERIES, 773);
        assert_eq!(std::mem::size_of::<Bucket>(), 8);
        // The figure of the module's doc: 1,000 VMs on 50 hosts stay under 40 MB of buckets.
        assert!(
            (1000 * Metric::VM.len() + 50 * Metric::HOST.len()) * BUCKETS_PER_SERIES * 8
                < 40_000_000
        );
        let mut series = Series::new(true);
        let before = series.bucket_bytes();
        // 400 days, a sample a minute, of a counter growing 1,000 a second.
        let minutes = 400 * 1440;
        for i in 0..=minutes {
            series.record((T0 + i * 60) * 1000, (i * 60_000) as f64);
        }
        assert_eq!(series.bucket_bytes(), before);
        for (ring, tier) in series.rings.iter().zip(TIERS) {
            assert_eq!(ring.slots.len(), tier.len);
            let buckets: Vec<_> = ring.buckets().collect();
            // The 5 s tier sees one sample a minute: 10 of its buckets have one.
            let expected = if tier.width_s == 5 { 10 } else { tier.len };
            assert_eq!(buckets.len(), expected, "tier {tier:?}");
            assert!(
                buckets
                    .iter()
                    .all(|(_, b)| b.avg == 1000.0 && b.max == 1000.0)
            );
            assert_eq!(
                buckets.last().unwrap().0,
                T0 + minutes * 60 - (minutes * 60) % tier.width_s
            );
        }
    }

    #[test]
    fn series_go_with_their_targets_and_vms_count_only_on_their_own_host() {
        let mut s = pool();
        let mut h = History::default();
        let mut m = report(0, 0, 1.0, 1);
        m.vms.push(hpb::VmMetrics {
            vm_id: "vm2".into(),
            ..Default::default()
        });
        // vm3 is not in the state, and vm2 is placed on another host after this report.
        m.vms.push(hpb::VmMetrics {
            vm_id: "vm3".into(),
            ..Default::default()
        });
        h.record(&s, "h1", &m);
        assert_eq!(h.len(), 4 + 2 * 6);
        s.vms.get_mut("vm2").unwrap().host_id = "h2".into();
        h.record(&s, "h1", &report(5, 0, 1.0, 1));
        h.prune(&s);
        assert_eq!(h.len(), 4 + 2 * 6);
        s.vms.remove("vm2");
        h.prune(&s);
        assert_eq!(h.len(), 4 + 6);
        assert!(h.bucket_bytes("vm2", Metric::RssBytes).is_none());
        s.vms.remove("vm1");
        s.hosts.remove("h1");
        h.prune(&s);
        assert!(h.is_empty());
    }

    /// A history with samples in every tier: h1's CPU and vm1's vCPU rate over two days,
    /// some buckets with several samples (so average and maximum differ).
    fn aged_history() -> History {
        let s = pool();
        let mut h = History::default();
        for i in 0..600 {
            let t = i * 317;
            let cpu = (i % 37) as f64 * 1.5;
            h.record(
                &s,
                "h1",
                &report(t, i % 1000, cpu, (i * i) as u64 * 1_000_000),
            );
        }
        h
    }

    #[test]
    fn saved_history_reads_back_with_every_tier_its_maxima_and_positions() {
        let h = aged_history();
        let bytes = h.encode();
        let back = History::decode(&bytes).unwrap();
        assert_eq!(back.len(), h.len());
        // Every field, ring positions and the filling buckets' sums included.
        assert_eq!(back.encode(), bytes);
        for (target, metric) in [("h1", Metric::CpuPercent), ("vm1", Metric::VcpuTimeNs)] {
            for step in TIERS.map(|t| t.width_s) {
                let p = h.query(target, metric, step, None, None);
                assert!(!p.is_empty(), "{target} {step}");
                // Reports come every 317 s: hours and days hold several.
                if step >= 3600 {
                    assert!(p.iter().any(|p| p.max > p.avg), "{target} {step}");
                }
                assert_eq!(back.query(target, metric, step, None, None), p);
            }
        }
        // It goes on as if it had never stopped: a report applied again adds nothing,
        // the next one extends the filling buckets and the counter's rate.
        let s = pool();
        let (mut a, mut b) = (h, back);
        for h in [&mut a, &mut b] {
            h.record(&s, "h1", &report(599 * 317, 599, 0.0, 0));
            h.record(&s, "h1", &report(600 * 317, 0, 99.0, 1 << 50));
        }
        assert_eq!(a.encode(), b.encode());
        // Empty history too.
        let empty = History::default().encode();
        assert!(History::decode(&empty).unwrap().is_empty());
    }

    #[test]
    fn a_truncated_corrupt_or_other_version_file_leaves_empty_history_and_an_error() {
        let bytes = aged_history().encode();
        for len in 0..bytes.len() {
            assert!(History::decode(&bytes[..len]).is_err(), "cut at {len}");
        }
        assert_eq!(
            History::decode(&bytes[..20]).err(),
            Some(DecodeError::Truncated)
        );
        assert_eq!(
            History::decode(&bytes[..bytes.len() - 1]).err(),
            Some(DecodeError::Checksum)
        );
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 0x10;
        assert_eq!(History::decode(&flipped).err(), Some(DecodeError::Checksum));
        let mut other = bytes.clone();
        other[8..12].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(History::decode(&other).err(), Some(DecodeError::Version(2)));
        assert_eq!(
            History::decode(b"not history at all").err(),
            Some(DecodeError::Magic)
        );

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE);
        let (h, err) = History::load(&path);
        assert!(h.is_empty() && err.is_none(), "no file is no error");
        std::fs::write(&path, &bytes[..bytes.len() / 3]).unwrap();
        let (h, err) = History::load(&path);
        assert!(h.is_empty());
        let err = err.expect("an error");
        assert!(err.to_string().contains(FILE), "{err}");
        assert!(!path.exists());
        let bad = dir.path().join(format!("{FILE}.bad"));
        assert_eq!(std::fs::read(&bad).unwrap().len(), bytes.len() / 3);
    }

    #[test]
    fn the_file_is_written_0600_and_bounded_by_the_series_it_holds() {
        use std::os::unix::fs::PermissionsExt;
        let mut s = PoolState::default();
        let mut h = History::default();
        let vms: Vec<String> = (0..20).map(|i| format!("{i:036}")).collect();
        for (i, vm) in vms.iter().enumerate() {
            s.vms.insert(
                vm.clone(),
                pb::Vm {
                    id: vm.clone(),
                    host_id: "h1".into(),
                    ..Default::default()
                },
            );
            for m in Metric::VM {
                h.series_mut(vm, m).record(T0 * 1000 + i as i64, 1.0);
            }
        }
        let header = 8 + 4 + 4 + TIERS.len() * 12 + 4;
        let size = |h: &History| h.encode().len();
        let expected = header + 20 * 6 * (SERIES_FILE_BYTES + 36) + 4;
        assert_eq!(size(&h), expected);
        // A year of samples later, the same size.
        for day in 0..400 {
            let mut m = hpb::HostMetrics {
                at: ts((T0 + day * 86_400) * 1000),
                ..Default::default()
            };
            m.vms = vms
                .iter()
                .map(|id| hpb::VmMetrics {
                    vm_id: id.clone(),
                    vcpu_time_ns: day as u64,
                    ..Default::default()
                })
                .collect();
            h.record(&s, "h1", &m);
        }
        h.prune(&s);
        assert_eq!(size(&h), expected);
        // The module doc's pool of 1,000 VMs on 50 hosts: under 40 MB on disk.
        assert!(header + 6_200 * (SERIES_FILE_BYTES + 36) + 4 < 40_000_000);

        let dir = tempfile::tempdir().unwrap();
        // As a member's data directory is.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let path = dir.path().join(FILE);
        h.save(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let (back, err) = History::load(&path);
        assert!(err.is_none());
        assert_eq!(back.encode(), h.encode());
    }
}
