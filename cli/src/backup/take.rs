//! `vm-backup`: a new point of a VM's backup chain.
//!
//! The pool snapshots every disk of the VM at one instant (`SnapshotVm`); storaged says
//! which chunks of each disk's snapshot differ from the last point's snapshot
//! (`ListChangedChunks`, or every allocated chunk for the first point); poolctl reads
//! those chunks over iSCSI from the snapshot (`OpenVolumeAccess`, as `vdi-export` does)
//! into the new point. The point is written as `point-NNNN.tmp` and renamed when whole,
//! so a failed backup leaves the chain as it was; only then is the previous point's VM
//! snapshot deleted: the newest one is always the next incremental's base.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use pool_client::new_request_id;
use proto::coordinator as pb;
use proto::storage as spb;

use super::format::{self, ChunkEntry, DiskDelta, Link, Manifest};
use crate::ctl::{Ctl, call};
use crate::transfer::{self, Access};

/// Reads in flight at once.
const IN_FLIGHT: usize = 8;

/// What one backup point holds, for the caller's report.
#[derive(Debug, Clone, Copy, Default)]
pub struct Taken {
    pub point: u32,
    pub chunks: u64,
    pub bytes: u64,
}

pub async fn backup(ctl: &mut Ctl, vm: &str, root: &Path) -> anyhow::Result<Taken> {
    std::fs::create_dir_all(root).with_context(|| format!("creating {}", root.display()))?;
    let _lock = super::lock(root)?;
    // A broken chain is refused before anything is taken.
    let chain = format::load_chain(root)?;
    let vm_id = ctl.vm_id(vm).await?;
    let last = chain.last();
    if let Some(p) = last
        && p.manifest.vm_id != vm_id
    {
        bail!(
            "{} holds backups of VM {} ({}), not of {vm}",
            root.display(),
            p.manifest.vm_name,
            p.manifest.vm_id
        );
    }
    let snapshots = ctl.vm_snapshots(&vm_id).await?;
    let base = match last {
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
    let point = last.map_or(1, |p| p.manifest.point + 1);
    let snap = take_snapshot(ctl, &vm_id, point).await?;
    let tmp = root.join(format!("point-{point:04}.tmp"));
    let written = write_point(ctl, &snap, base.as_ref(), last, point, &tmp).await;
    let taken = match written {
        Ok(t) => t,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            // Not waited for: what failed the backup (storaged gone, say) can hold the
            // deletion up too, and the pool finishes it once it can.
            delete_snapshot(ctl, &snap.id, false).await;
            return Err(e);
        }
    };
    let dir = format::point_dir(root, point);
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
    super::sync_dir(root)?;
    if let Some(b) = base {
        delete_snapshot(ctl, &b.id, true).await;
    }
    Ok(taken)
}

/// Snapshots every disk of the VM at one instant; the pool's record of it.
async fn take_snapshot(ctl: &mut Ctl, vm_id: &str, point: u32) -> anyhow::Result<pb::VmSnapshot> {
    let r = call!(
        ctl.client,
        snapshot_vm,
        pb::SnapshotVmRequest {
            request_id: new_request_id(),
            vm_id: vm_id.to_owned(),
            name: format!("backup-{point}-{}", proto::unix_ms()),
            memory: false,
        }
    )?;
    // The backup needs the snapshot, whatever --no-wait says.
    let wait = std::mem::replace(&mut ctl.wait, true);
    let task = ctl.follow(r).await;
    ctl.wait = wait;
    let task = task?;
    let id = task
        .results
        .get("snapshot_id")
        .cloned()
        .unwrap_or(task.target_id);
    ctl.vm_snapshots(vm_id)
        .await?
        .into_iter()
        .find(|s| s.id == id)
        .with_context(|| format!("the pool lists no VM snapshot {id} after taking it"))
}

/// Deletes a VM snapshot the backup no longer needs; when `wait`, until it is gone. A
/// deletion that fails is a warning: the backup itself stands or fails on its own.
async fn delete_snapshot(ctl: &mut Ctl, id: &str, wait: bool) {
    let r = call!(
        ctl.client,
        delete_vm_snapshot,
        pb::DeleteVmSnapshotRequest {
            request_id: new_request_id(),
            snapshot_id: id.to_owned(),
        }
    );
    let done = match r {
        Ok(r) if !wait => {
            let task = r.task.map(|t| t.id).unwrap_or_default();
            eprintln!("VM snapshot {id} is being deleted (task {task})");
            Ok(())
        }
        Ok(r) => {
            let was = std::mem::replace(&mut ctl.wait, true);
            let done = ctl.follow(r).await.map(|_| ());
            ctl.wait = was;
            done
        }
        Err(e) => Err(e),
    };
    if let Err(e) = done {
        eprintln!("warning: VM snapshot {id} stays: {e:#}");
    }
}

async fn write_point(
    ctl: &mut Ctl,
    snap: &pb::VmSnapshot,
    base: Option<&pb::VmSnapshot>,
    last: Option<&format::Point>,
    point: u32,
    dir: &Path,
) -> anyhow::Result<Taken> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir(dir).with_context(|| format!("creating {}", dir.display()))?;
    let spec = snap.spec.clone().context("the VM snapshot has no spec")?;
    let spec_bytes = prost::Message::encode_to_vec(&spec);
    super::write_synced(&dir.join(format::SPEC_FILE), &spec_bytes)?;
    let previous_disks: HashMap<&str, &DiskDelta> = last
        .map(|p| {
            p.manifest
                .disks
                .iter()
                .map(|d| (d.disk_id.as_str(), d))
                .collect()
        })
        .unwrap_or_default();
    let mut taken = Taken {
        point,
        ..Default::default()
    };
    let mut disks = Vec::new();
    for disk in &spec.disks {
        let target = snap
            .disk_snapshots
            .get(&disk.disk_id)
            .with_context(|| format!("the VM snapshot has no copy of disk {}", disk.disk_id))?;
        // The volume the snapshot was taken of: the disk's, or the undo overlay the VM ran
        // on, whose lineage the changed chunks are asked in.
        let of = origin(ctl, target).await?;
        // Incremental only over an earlier snapshot of the same volume (an undo disk's
        // overlay is another one after a commit or discard: a full read then).
        let mut base_volume = previous_disks
            .get(disk.disk_id.as_str())
            .filter(|d| d.volume_id == disk.volume_id)
            .and(base)
            .and_then(|b| b.disk_snapshots.get(&disk.disk_id));
        if let Some(b) = base_volume
            && origin(ctl, b).await? != of
        {
            base_volume = None;
        }
        let delta = read_disk(ctl, disk, &of, base_volume, target, dir).await?;
        taken.chunks += delta.chunks.len() as u64;
        taken.bytes += delta
            .chunks
            .iter()
            .map(|c| delta.chunk_len(c.index))
            .sum::<u64>();
        disks.push(delta);
    }
    let manifest = Manifest {
        format: format::FORMAT.into(),
        version: format::VERSION,
        point,
        created_at_ms: proto::unix_ms(),
        vm_id: snap.vm_id.clone(),
        vm_name: spec.name.clone(),
        vm_snapshot_id: snap.id.clone(),
        previous: last.map(|p| Link {
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
    Ok(taken)
}

/// The volume a snapshot was taken of.
async fn origin(ctl: &mut Ctl, snapshot: &str) -> anyhow::Result<String> {
    let v = call!(
        ctl.client,
        get_volume,
        pb::GetVolumeRequest {
            volume_id: snapshot.to_owned()
        }
    )
    .with_context(|| format!("reading snapshot {snapshot}"))?;
    Ok(v.origin_id)
}

/// Every changed chunk range of `target` against `base`, all pages.
async fn changed(
    ctl: &mut Ctl,
    volume_id: &str,
    base: Option<&String>,
    target: &str,
) -> anyhow::Result<(u64, u64, Vec<spb::ChunkRange>)> {
    let mut ranges = Vec::new();
    let mut token = String::new();
    loop {
        let r = call!(
            ctl.client,
            list_changed_chunks,
            spb::ListChangedChunksRequest {
                volume_id: volume_id.to_owned(),
                base_snapshot_id: base.cloned().unwrap_or_default(),
                target_snapshot_id: target.to_owned(),
                page_size: 0,
                page_token: token.clone(),
            }
        )?;
        ranges.extend(r.ranges);
        if r.next_page_token.is_empty() {
            return Ok((r.chunk_size_bytes, r.target_size_bytes, ranges));
        }
        token = r.next_page_token;
    }
}

async fn read_disk(
    ctl: &mut Ctl,
    disk: &pb::VmDisk,
    lineage: &str,
    base: Option<&String>,
    target: &str,
    dir: &Path,
) -> anyhow::Result<DiskDelta> {
    let (chunk_size, size, ranges) = changed(ctl, lineage, base, target).await?;
    let mut delta = DiskDelta {
        disk_id: disk.disk_id.clone(),
        volume_id: disk.volume_id.clone(),
        snapshot_volume_id: target.to_owned(),
        size_bytes: size,
        chunk_size,
        full: base.is_none(),
        data_file: format!("disk-{}.data", disk.disk_id),
        chunks: Vec::new(),
        zero_ranges: ranges
            .iter()
            .filter(|r| !r.mapped)
            .map(|r| [r.first_chunk, r.chunk_count])
            .collect(),
    };
    let path = dir.join(&delta.data_file);
    let file =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    let mapped: Vec<(u64, u64)> = ranges
        .iter()
        .filter(|r| r.mapped)
        .map(|r| (r.first_chunk, r.chunk_count))
        .collect();
    if !mapped.is_empty() {
        let access = transfer::open(&mut ctl.client, target).await?;
        let r = copy_chunks(&access, &delta, &mapped, &mut out).await;
        access.close(&mut ctl.client).await;
        delta.chunks = r.with_context(|| format!("reading disk {}", disk.disk_id))?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(delta)
}

/// Reads the chunks of `ranges` in order, several requests in flight, appending each to
/// `out` with its digest.
async fn copy_chunks(
    a: &Access,
    d: &DiskDelta,
    ranges: &[(u64, u64)],
    out: &mut impl Write,
) -> anyhow::Result<Vec<ChunkEntry>> {
    let bs = u64::from(a.lun.block_size());
    if !d.chunk_size.is_multiple_of(bs) || (a.chunk() as u64) < d.chunk_size {
        bail!(
            "the disk's chunk size {} does not fit its LUN (block {bs}, largest request {})",
            d.chunk_size,
            a.chunk()
        );
    }
    let per_read = a.chunk() as u64 / d.chunk_size;
    // (first chunk, chunks) of each read, in order.
    let reads = ranges.iter().flat_map(|&(first, count)| {
        (0..count.div_ceil(per_read)).map(move |i| {
            let start = first + i * per_read;
            (start, per_read.min(first + count - start))
        })
    });
    let mut entries = Vec::new();
    let mut in_flight = VecDeque::new();
    let mut reads = reads.peekable();
    while reads.peek().is_some() || !in_flight.is_empty() {
        if in_flight.len() < IN_FLIGHT
            && let Some((first, count)) = reads.next()
        {
            let lun = a.lun.clone();
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
