//! The next point of a chain, from a VM snapshot the caller took.
//!
//! [`next`] locks the directory, reads the chain and finds the last point's VM snapshot
//! among the VM's (the incremental's base); [`Next::write`] asks the pool which chunks of
//! each disk's snapshot differ from the base's, reads those over iSCSI into
//! `point-NNNN.tmp/` and renames it when whole and synced, so a failed write leaves the
//! chain as it was. Taking the snapshot and deleting the base afterwards are the
//! caller's: poolctl does both through PoolService, the coordinator as jobs.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use iscsi_initiator::Lun;
use proto::coordinator as pb;
use proto::storage as spb;

use super::format::{self, ChunkEntry, DiskDelta, Link, Manifest, Point};

/// Reads in flight at once.
const IN_FLIGHT: usize = 8;

/// The pool as a backup reads it.
pub trait Pool {
    /// An open grant on a volume and its logged-in LUN.
    type Access: Send;
    /// The volume a snapshot was taken of.
    // Owned arguments: the futures borrow nothing but the pool.
    fn origin(&mut self, snapshot: String) -> impl Future<Output = anyhow::Result<String>> + Send;
    /// One page of `ListChangedChunks` as asked.
    fn changed_chunks(
        &mut self,
        r: spb::ListChangedChunksRequest,
    ) -> impl Future<Output = anyhow::Result<spb::ListChangedChunksResponse>> + Send;
    fn open(&mut self, volume: String)
    -> impl Future<Output = anyhow::Result<Self::Access>> + Send;
    fn lun(access: &Self::Access) -> &Lun;
    /// Logs out and revokes the grant; a failure is the implementation's to report.
    fn close(&mut self, access: Self::Access) -> impl Future<Output = ()> + Send;
}

/// `ListChangedChunks`' answer, all pages.
#[derive(Debug, Clone, Default)]
struct Changed {
    chunk_size: u64,
    target_size: u64,
    ranges: Vec<spb::ChunkRange>,
}

/// Every chunk range of snapshot `target` that differs from snapshot `base` (from nothing:
/// every allocated chunk) in `volume`'s lineage.
async fn changed<P: Pool>(
    pool: &mut P,
    volume: &str,
    base: Option<&String>,
    target: &str,
) -> anyhow::Result<Changed> {
    let mut out = Changed::default();
    let mut token = String::new();
    loop {
        let r = pool
            .changed_chunks(spb::ListChangedChunksRequest {
                volume_id: volume.to_owned(),
                base_snapshot_id: base.cloned().unwrap_or_default(),
                target_snapshot_id: target.to_owned(),
                page_size: 0,
                page_token: token,
            })
            .await?;
        out.ranges.extend(r.ranges);
        if r.next_page_token.is_empty() {
            out.chunk_size = r.chunk_size_bytes;
            out.target_size = r.target_size_bytes;
            return Ok(out);
        }
        token = r.next_page_token;
    }
}

/// What one written point holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub point: u32,
    pub chunks: u64,
    pub bytes: u64,
    /// The VM snapshot the point builds on: no longer needed once the point is written.
    pub base_snapshot_id: Option<String>,
}

/// A chain locked for its next point.
pub struct Next {
    _lock: std::fs::File,
    root: PathBuf,
    last: Option<Point>,
    base: Option<pb::VmSnapshot>,
    pub point: u32,
}

/// Locks `root` (made if missing; waiting up to `wait` for another writer, none: not at
/// all) and reads its chain for a new point of VM `vm_id` (called `vm` in errors), whose
/// snapshots in the pool are `snapshots`. A broken chain, another VM's chain or a base
/// snapshot gone are refused before anything is taken.
pub fn next(
    root: &Path,
    vm: &str,
    vm_id: &str,
    snapshots: &[pb::VmSnapshot],
    wait: Option<std::time::Duration>,
) -> anyhow::Result<Next> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let lock = match wait {
        Some(limit) => super::lock_waiting(root, limit)?,
        None => super::lock(root)?,
    };
    let last = format::load_chain(root)?.pop();
    if let Some(p) = &last
        && p.manifest.vm_id != vm_id
    {
        bail!(
            "{} holds backups of VM {} ({}), not of {vm}",
            root.display(),
            p.manifest.vm_name,
            p.manifest.vm_id
        );
    }
    let base = match &last {
        None => None,
        Some(p) => Some(
            snapshots
                .iter()
                .find(|s| s.id == p.manifest.vm_snapshot_id)
                .cloned()
                .with_context(|| {
                    format!(
                        "VM snapshot {}, which backup point {} was read from, is gone: no \
                         incremental can follow it; start a new chain in another directory",
                        p.manifest.vm_snapshot_id, p.manifest.point
                    )
                })?,
        ),
    };
    Ok(Next {
        _lock: lock,
        root: root.to_owned(),
        point: last.as_ref().map_or(1, |p| p.manifest.point + 1),
        last,
        base,
    })
}

impl Next {
    /// The VM snapshot the next point builds on.
    pub fn base_snapshot_id(&self) -> Option<&str> {
        self.base.as_ref().map(|b| b.id.as_str())
    }

    /// The chain's last point, if it was read from `snapshot_id` already: a write that
    /// finished although its caller did not learn so.
    pub fn holds(&self, snapshot_id: &str) -> Option<u32> {
        self.last
            .as_ref()
            .filter(|p| p.manifest.vm_snapshot_id == snapshot_id)
            .map(|p| p.manifest.point)
    }

    /// Writes `snap` (a VM snapshot of the chain's VM) as the next point.
    pub async fn write<P: Pool>(
        self,
        pool: &mut P,
        snap: &pb::VmSnapshot,
    ) -> anyhow::Result<Written> {
        let tmp = self.root.join(format!("point-{:04}.tmp", self.point));
        let written = self.write_into(pool, snap, &tmp).await;
        let written = match written {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
        };
        let dir = format::point_dir(&self.root, self.point);
        std::fs::rename(&tmp, &dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        super::sync_dir(&self.root)?;
        Ok(written)
    }

    async fn write_into<P: Pool>(
        &self,
        pool: &mut P,
        snap: &pb::VmSnapshot,
        dir: &Path,
    ) -> anyhow::Result<Written> {
        if dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
        let spec = snap.spec.clone().context("the VM snapshot has no spec")?;
        let spec_bytes = prost::Message::encode_to_vec(&spec);
        super::write_synced(&dir.join(format::SPEC_FILE), &spec_bytes)?;
        // Each disk's volume at the last point.
        let previous_volumes: HashMap<String, String> = self
            .last
            .iter()
            .flat_map(|p| &p.manifest.disks)
            .map(|d| (d.disk_id.clone(), d.volume_id.clone()))
            .collect();
        let mut written = Written {
            point: self.point,
            base_snapshot_id: self.base_snapshot_id().map(str::to_owned),
            ..Default::default()
        };
        let mut disks = Vec::new();
        for disk in &spec.disks {
            let target = snap
                .disk_snapshots
                .get(&disk.disk_id)
                .with_context(|| format!("the VM snapshot has no copy of disk {}", disk.disk_id))?;
            // The volume the snapshot was taken of: the disk's, or the undo overlay the VM
            // ran on, whose lineage the changed chunks are asked in.
            let of = pool.origin(target.clone()).await?;
            // Incremental only over an earlier snapshot of the same volume (an undo disk's
            // overlay is another one after a commit or discard: a full read then).
            let mut base_volume = previous_volumes
                .get(&disk.disk_id)
                .filter(|v| **v == disk.volume_id)
                .and(self.base.as_ref())
                .and_then(|b| b.disk_snapshots.get(&disk.disk_id))
                .cloned();
            if let Some(b) = &base_volume
                && pool.origin(b.clone()).await? != of
            {
                base_volume = None;
            }
            let delta = read_disk(pool, disk, &of, base_volume.as_ref(), target, dir).await?;
            written.chunks += delta.chunks.len() as u64;
            written.bytes += delta
                .chunks
                .iter()
                .map(|c| delta.chunk_len(c.index))
                .sum::<u64>();
            disks.push(delta);
        }
        let manifest = Manifest {
            format: format::FORMAT.into(),
            version: format::VERSION,
            point: self.point,
            created_at_ms: proto::unix_ms(),
            vm_id: snap.vm_id.clone(),
            vm_name: spec.name.clone(),
            vm_snapshot_id: snap.id.clone(),
            previous: self.last.as_ref().map(|p| Link {
                point: p.manifest.point,
                manifest_sha256: p.manifest_sha256.clone(),
            }),
            spec_sha256: format::sha256_hex(&spec_bytes),
            disks,
            absorbed: vec![],
            replaces: vec![],
        };
        let json = serde_json::to_vec_pretty(&manifest)?;
        super::write_synced(&dir.join(format::MANIFEST), &json)?;
        super::sync_dir(dir)?;
        Ok(written)
    }
}

async fn read_disk<P: Pool>(
    pool: &mut P,
    disk: &pb::VmDisk,
    lineage: &str,
    base: Option<&String>,
    target: &str,
    dir: &Path,
) -> anyhow::Result<DiskDelta> {
    let changed = changed(pool, lineage, base, target).await?;
    let mut delta = DiskDelta {
        disk_id: disk.disk_id.clone(),
        volume_id: disk.volume_id.clone(),
        snapshot_volume_id: target.to_owned(),
        size_bytes: changed.target_size,
        chunk_size: changed.chunk_size,
        full: base.is_none(),
        data_file: format!("disk-{}.data", disk.disk_id),
        chunks: Vec::new(),
        zero_ranges: changed
            .ranges
            .iter()
            .filter(|r| !r.mapped)
            .map(|r| [r.first_chunk, r.chunk_count])
            .collect(),
    };
    let path = dir.join(&delta.data_file);
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mapped: Vec<(u64, u64)> = changed
        .ranges
        .iter()
        .filter(|r| r.mapped)
        .map(|r| (r.first_chunk, r.chunk_count))
        .collect();
    if !mapped.is_empty() {
        let access = pool.open(target.to_owned()).await?;
        let r = copy_chunks(P::lun(&access), &delta, &mapped, &mut out).await;
        pool.close(access).await;
        delta.chunks = r.with_context(|| format!("reading disk {}", disk.disk_id))?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(delta)
}

/// Reads the chunks of `ranges` in order, several requests in flight, appending each to
/// `out` with its digest.
async fn copy_chunks(
    lun: &Lun,
    d: &DiskDelta,
    ranges: &[(u64, u64)],
    out: &mut impl Write,
) -> anyhow::Result<Vec<ChunkEntry>> {
    let bs = u64::from(lun.block_size());
    let largest = crate::volume::chunk(lun) as u64;
    if !d.chunk_size.is_multiple_of(bs) || largest < d.chunk_size {
        bail!(
            "the disk's chunk size {} does not fit its LUN (block {bs}, largest request {largest})",
            d.chunk_size,
        );
    }
    let per_read = largest / d.chunk_size;
    // (first chunk, chunks) of each read, in order; collected, as closures held across the
    // awaits below would keep the future from being `Send`.
    let reads: Vec<(u64, u64)> = ranges
        .iter()
        .flat_map(|&(first, count)| {
            (0..count.div_ceil(per_read)).map(move |i| {
                let start = first + i * per_read;
                (start, per_read.min(first + count - start))
            })
        })
        .collect();
    let mut entries = Vec::new();
    let mut in_flight = VecDeque::new();
    let mut reads = reads.into_iter().peekable();
    while reads.peek().is_some() || !in_flight.is_empty() {
        if in_flight.len() < IN_FLIGHT
            && let Some((first, count)) = reads.next()
        {
            let lun = lun.clone();
            let start = first * d.chunk_size;
            let len: u64 = (first..first + count).map(|c| d.chunk_len(c)).sum();
            let blocks = len.div_ceil(bs) as u32;
            in_flight.push_back((
                first,
                count,
                tokio::spawn(async move { lun.read(start / bs, blocks).await }),
            ));
            continue;
        }
        let (first, count, task) = in_flight.pop_front().expect("a read in flight");
        let data = task.await??;
        let mut at = 0usize;
        for c in first..first + count {
            let n = d.chunk_len(c) as usize;
            let bytes = data
                .get(at..at + n)
                .context("the LUN answered a short read")?;
            out.write_all(bytes)?;
            entries.push(ChunkEntry {
                index: c,
                sha256: format::sha256_hex(bytes),
                at: None,
            });
            at += n;
        }
    }
    Ok(entries)
}
