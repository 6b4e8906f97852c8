//! The daemon's metrics in the Prometheus text format, served as `GET /metrics` on the
//! `StorageService` port (`pool_trust::scrape`: members and monitors only); the names are
//! listed in `docs/metrics.md`.
//!
//! Pools and sessions are read at each scrape. Per-LUN requests, bytes, errors and
//! latencies are counted as they happen by [`Measured`], the wrapper every exported
//! volume is served through: the time is the LUN's own (the thin pool's work), from the
//! target handing it a command to its answer, without the network.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Instant;

use iscsi_target::{BlockDevice, BlockError, Extent, Provisioning};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::export::{ExportRecord, Exports};
use crate::service::Storage;

type Labels = Vec<(&'static str, String)>;

/// The operations a LUN counts.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    Read,
    Write,
    Flush,
    /// Discards and write-zeroes (both free chunks).
    Unmap,
}

impl Op {
    fn as_str(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Unmap => "unmap",
        }
    }
}

/// The counters of every LUN served, kept from export to unexport.
#[derive(Debug)]
pub struct LunMetrics {
    requests: Family<Labels, Counter>,
    bytes: Family<Labels, Counter>,
    errors: Family<Labels, Counter>,
    latency: Family<Labels, Histogram>,
}

impl Default for LunMetrics {
    fn default() -> Self {
        LunMetrics {
            requests: Family::default(),
            bytes: Family::default(),
            errors: Family::default(),
            // 50 µs to 1.6 s: a cached read to a commit on a slow disk.
            latency: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
            }),
        }
    }
}

/// One LUN's handles into [`LunMetrics`], taken once when it is served.
#[derive(Debug, Clone)]
struct OpHandles {
    requests: Counter,
    bytes: Counter,
    errors: Counter,
    latency: Histogram,
}

fn lun_labels(rec: &ExportRecord) -> Labels {
    vec![
        ("sr", rec.pool_id.to_string()),
        ("volume", rec.volume_id.to_string()),
        ("target", rec.target_iqn.clone()),
        ("lun", rec.lun.to_string()),
    ]
}

impl LunMetrics {
    /// `device` served as `rec`'s LUN, counted.
    pub fn measure<D: BlockDevice>(&self, rec: &ExportRecord, device: D) -> Measured<D> {
        let handles = [Op::Read, Op::Write, Op::Flush, Op::Unmap].map(|op| {
            let mut l = lun_labels(rec);
            l.push(("op", op.as_str().to_owned()));
            OpHandles {
                requests: self.requests.get_or_create(&l).clone(),
                bytes: self.bytes.get_or_create(&l).clone(),
                errors: self.errors.get_or_create(&l).clone(),
                latency: self.latency.get_or_create(&l).clone(),
            }
        });
        Measured {
            inner: device,
            ops: Arc::new(handles),
        }
    }

    /// Drops the series of a LUN no longer served.
    pub fn forget(&self, rec: &ExportRecord) {
        for op in [Op::Read, Op::Write, Op::Flush, Op::Unmap] {
            let mut l = lun_labels(rec);
            l.push(("op", op.as_str().to_owned()));
            self.requests.remove(&l);
            self.bytes.remove(&l);
            self.errors.remove(&l);
            self.latency.remove(&l);
        }
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "lun_requests",
            "SCSI commands the LUN executed, by operation.",
            self.requests.clone(),
        );
        r.register(
            "lun_bytes",
            "Bytes the LUN read or wrote.",
            self.bytes.clone(),
        );
        r.register(
            "lun_errors",
            "Commands the LUN failed, by operation.",
            self.errors.clone(),
        );
        r.register(
            "lun_latency_seconds",
            "Time the LUN took to execute a command, by operation (the thin pool's work, without the network).",
            self.latency.clone(),
        );
    }
}

/// A block device whose commands are counted and timed.
pub struct Measured<D> {
    inner: D,
    ops: Arc<[OpHandles; 4]>,
}

impl<D> Measured<D> {
    fn count<T>(
        &self,
        op: Op,
        bytes: u64,
        f: impl FnOnce() -> Result<T, BlockError>,
    ) -> Result<T, BlockError> {
        let h = &self.ops[op as usize];
        let started = Instant::now();
        let result = f();
        h.latency.observe(started.elapsed().as_secs_f64());
        h.requests.inc();
        match &result {
            Ok(_) => {
                h.bytes.inc_by(bytes);
            }
            Err(_) => {
                h.errors.inc();
            }
        }
        result
    }
}

impl<D: BlockDevice> BlockDevice for Measured<D> {
    fn block_size(&self) -> u32 {
        self.inner.block_size()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
        let n = buf.len() as u64;
        self.count(Op::Read, n, || self.inner.read_at(offset, buf))
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), BlockError> {
        self.count(Op::Write, data.len() as u64, || {
            self.inner.write_at(offset, data)
        })
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.count(Op::Flush, 0, || self.inner.flush())
    }

    fn read_only(&self) -> bool {
        self.inner.read_only()
    }

    fn physical_block_size(&self) -> u32 {
        self.inner.physical_block_size()
    }

    fn provisioning(&self) -> Provisioning {
        self.inner.provisioning()
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), BlockError> {
        self.count(Op::Unmap, 0, || self.inner.discard(offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<(), BlockError> {
        self.count(Op::Unmap, 0, || self.inner.write_zeroes(offset, len, unmap))
    }

    fn compare_and_write(
        &self,
        offset: u64,
        expected: &[u8],
        new: &[u8],
    ) -> Result<(), BlockError> {
        self.count(Op::Write, new.len() as u64, || {
            self.inner.compare_and_write(offset, expected, new)
        })
    }

    fn extents(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BlockError> {
        self.inner.extents(offset, len)
    }

    fn clone_range_from(
        &self,
        src: &dyn BlockDevice,
        src_offset: u64,
        dst_offset: u64,
        len: u64,
    ) -> Result<bool, BlockError> {
        self.inner
            .clone_range_from(src, src_offset, dst_offset, len)
    }

    // The volume itself, so that a copy between two LUNs finds both thin volumes.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        self.inner.as_any()
    }
}

/// The scrape of this daemon now.
pub async fn render(storage: &Storage, exports: &Exports) -> String {
    let mut r = Registry::with_prefix("storaged");
    let gauge = |r: &mut Registry, name: &str, help: &str| {
        let f = Family::<Labels, Gauge>::default();
        r.register(name, help, f.clone());
        f
    };
    let size = gauge(
        &mut r,
        "pool_size_bytes",
        "Space of the thin pool's backing file or device.",
    );
    let used = gauge(
        &mut r,
        "pool_used_bytes",
        "Space of the thin pool given to volumes and snapshots.",
    );
    let provisioned = gauge(
        &mut r,
        "pool_provisioned_bytes",
        "Sum of the sizes of the thin pool's volumes (snapshots left out): what they may grow to.",
    );
    let metadata = gauge(
        &mut r,
        "pool_metadata_bytes",
        "Size of the thin pool's metadata on disk.",
    );
    let volumes = gauge(
        &mut r,
        "pool_volumes",
        "Volumes of the thin pool (snapshots left out).",
    );
    let snapshots = gauge(
        &mut r,
        "pool_snapshots",
        "Snapshots of the thin pool's volumes.",
    );
    let sessions = gauge(
        &mut r,
        "pool_iscsi_sessions",
        "iSCSI sessions logged in to targets that serve the thin pool's volumes.",
    );
    let luns = gauge(
        &mut r,
        "pool_luns",
        "Volumes of the thin pool served as iSCSI LUNs.",
    );

    let records = exports.list().await;
    let live = exports.server().sessions();
    for pool in storage.pools() {
        let u = pool.usage();
        let l: Labels = vec![("sr", pool.id().to_string())];
        let set = |f: &Family<Labels, Gauge>, v: u64| {
            f.get_or_create(&l)
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set(&size, u.total_bytes());
        set(&used, u.used_bytes());
        set(&provisioned, u.provisioned_bytes);
        set(&metadata, u.metadata_bytes);
        set(&volumes, u64::from(u.volume_count));
        set(&snapshots, u64::from(u.snapshot_count));
        let targets: BTreeSet<&str> = records
            .iter()
            .filter(|e| e.pool_id == pool.id())
            .map(|e| e.target_iqn.as_str())
            .collect();
        set(
            &luns,
            records.iter().filter(|e| e.pool_id == pool.id()).count() as u64,
        );
        set(
            &sessions,
            live.iter()
                .filter(|s| targets.contains(s.target.as_str()))
                .count() as u64,
        );
    }
    let per_target = gauge(
        &mut r,
        "iscsi_sessions",
        "iSCSI sessions logged in, by target.",
    );
    let mut by_target = BTreeMap::<&str, u64>::new();
    for s in &live {
        *by_target.entry(s.target.as_str()).or_default() += 1;
    }
    for (target, n) in by_target {
        per_target
            .get_or_create(&vec![("target", target.to_owned())])
            .set(n as i64);
    }
    exports.lun_metrics().register(&mut r);
    let mut out = String::new();
    encode(&mut out, &r).expect("writing to a String cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use iscsi_target::FileBlockDevice;
    use uuid::Uuid;

    use super::*;

    #[test]
    fn a_luns_commands_are_counted_timed_and_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let rec = ExportRecord {
            id: Uuid::new_v4(),
            pool_id: Uuid::new_v4(),
            volume_id: Uuid::new_v4(),
            target_iqn: "iqn.2026-01.test:t".into(),
            lun: 0,
            read_only: false,
            serial: "s".into(),
            grants: vec![],
        };
        let m = LunMetrics::default();
        let dev = m.measure(
            &rec,
            FileBlockDevice::open(&path, None, 512, false).unwrap(),
        );
        dev.write_at(0, &[1u8; 4096]).unwrap();
        let mut buf = [0u8; 512];
        dev.read_at(512, &mut buf).unwrap();
        dev.read_at(1 << 30, &mut buf).unwrap_err();
        let mut r = Registry::with_prefix("storaged");
        m.register(&mut r);
        let mut text = String::new();
        encode(&mut text, &r).unwrap();
        let series = |name: &str, op: &str| {
            format!(
                r#"{name}{{sr="{}",volume="{}",target="iqn.2026-01.test:t",lun="0",op="{op}"}}"#,
                rec.pool_id, rec.volume_id
            )
        };
        for line in [
            format!("{} 2", series("storaged_lun_requests_total", "read")),
            format!("{} 1", series("storaged_lun_errors_total", "read")),
            format!("{} 512", series("storaged_lun_bytes_total", "read")),
            format!("{} 4096", series("storaged_lun_bytes_total", "write")),
            format!(
                "{} 1",
                series("storaged_lun_latency_seconds_count", "write")
            ),
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
        m.forget(&rec);
        let mut r = Registry::default();
        m.register(&mut r);
        let mut text = String::new();
        encode(&mut text, &r).unwrap();
        assert!(!text.contains(&rec.volume_id.to_string()), "{text}");
    }
}
