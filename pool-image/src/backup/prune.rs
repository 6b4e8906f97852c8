//! `vm-backup-prune`: drops the points of a chain that a retention no longer keeps,
//! copying no data but what mostly dead files still hold.
//!
//! A point is pruned by folding it into the point after it: that point's manifest takes
//! over the pruned point's chunks it did not change itself (as entries naming the pruned
//! point's data file) and its link to the point before, records the pruned point in
//! `absorbed` and its own earlier digest in `replaces` (so the next point's link still
//! holds), and is written whole and renamed over the old one. A pruned point's data file
//! that kept points read less than half of is compacted: the chunks still read are copied
//! (digests checked on the way) into `carried-point-NNNN-NAME` in the reading point's own
//! directory and its manifest rewritten to name them there, so the dead rest can go. Then
//! what no kept point reads is deleted. A prune cut short leaves either the old manifest
//! or the new one, and a pruned point's leftovers (or a carried file no manifest names
//! yet) are skipped by every reader and deleted by the next prune.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use anyhow::{Context, bail};
use proto::coordinator::Retention;

use super::format::{self, ChunkEntry, DataRef, DiskDelta, Manifest, Point};

/// How a carried file's name starts: the chunks a point took over, copied out of a
/// pruned point's mostly dead data file.
const CARRIED: &str = "carried-";

/// What a prune did (or, dry, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pruned {
    pub kept: Vec<u32>,
    pub removed: Vec<u32>,
    /// Bytes of files deleted.
    pub freed_bytes: u64,
    /// Bytes of pruned points' data files that kept points still read.
    pub held_bytes: u64,
    /// Of those, bytes no kept point reads (chunks rewritten since): freed when the whole
    /// file is, or once they outweigh what is read and the file is compacted.
    pub dead_bytes: u64,
    /// Bytes copied out of mostly dead files into carried ones.
    pub carried_bytes: u64,
}

pub fn prune(root: &Path, r: &Retention, dry_run: bool) -> anyhow::Result<Pruned> {
    prune_with(root, r, dry_run, None)
}

/// As [`prune`], waiting up to `wait` for another writer of the directory: a backup job
/// run again by a new leader may find the last leader's writer still at its own prune.
pub fn prune_waiting(
    root: &Path,
    r: &Retention,
    wait: std::time::Duration,
) -> anyhow::Result<Pruned> {
    prune_with(root, r, false, Some(wait))
}

fn prune_with(
    root: &Path,
    r: &Retention,
    dry_run: bool,
    wait: Option<std::time::Duration>,
) -> anyhow::Result<Pruned> {
    if r.keep_last == 0 && r.keep_daily == 0 && r.keep_weekly == 0 {
        bail!("say what to keep: --keep-last, --keep-daily or --keep-weekly");
    }
    // Before the lock, which makes a file: no `.lock` in a directory that holds no chain.
    if format::point_numbers(root)?.is_empty() {
        bail!("{} holds no backup point", root.display());
    }
    let _lock = match wait {
        Some(limit) => super::lock_waiting(root, limit)?,
        None => super::lock(root)?,
    };
    // Read under the lock: a backup may be adding a point.
    let mut chain = format::load_chain(root)?;
    let items: Vec<(String, u64)> = chain
        .iter()
        .map(|p| {
            (
                format!("{:010}", p.manifest.point),
                p.manifest.created_at_ms,
            )
        })
        .collect();
    let mut keep: BTreeSet<u32> = proto::retention_kept(&items, r)
        .iter()
        .filter_map(|id| id.parse().ok())
        .collect();
    // The newest is the next backup's base.
    keep.extend(chain.last().map(|p| p.manifest.point));
    let mut out = Pruned {
        kept: keep.iter().copied().collect(),
        ..Default::default()
    };
    let mut i = 0;
    while i + 1 < chain.len() {
        if keep.contains(&chain[i].manifest.point) {
            i += 1;
            continue;
        }
        let k = chain.remove(i);
        out.removed.push(k.manifest.point);
        absorb(&k, &mut chain[i], !dry_run)?;
    }
    compact(root, &mut chain, dry_run, &mut out)?;
    collect_garbage(root, &chain, dry_run, &mut out)?;
    Ok(out)
}

/// Folds `k` into `s`, the point after it; writes `s`'s new manifest when `write`.
fn absorb(k: &Point, s: &mut Point, write: bool) -> anyhow::Result<()> {
    let mut m = s.manifest.clone();
    m.version = format::VERSION;
    m.previous = k.manifest.previous.clone();
    m.absorbed.extend(&k.manifest.absorbed);
    m.absorbed.push(k.manifest.point);
    m.absorbed.sort_unstable();
    m.absorbed.dedup();
    for d in m.disks.iter_mut().filter(|d| !d.full) {
        let kd = k
            .manifest
            .disks
            .iter()
            .find(|x| x.disk_id == d.disk_id)
            .with_context(|| {
                format!(
                    "disk {} of point {} builds on point {}, which has no such disk",
                    d.disk_id, s.manifest.point, k.manifest.point
                )
            })?;
        fold_disk(k, kd, d)?;
    }
    rewrite(s, m, write)
}

/// Replaces `s`'s manifest with `m` (on disk too when `write`: whole, synced, renamed),
/// keeping its earlier digest in `replaces` so the next point's link still holds.
fn rewrite(s: &mut Point, mut m: Manifest, write: bool) -> anyhow::Result<()> {
    if !m.replaces.contains(&s.manifest_sha256) {
        m.replaces.push(s.manifest_sha256.clone());
    }
    let bytes = serde_json::to_vec_pretty(&m)?;
    if write {
        let tmp = s.dir.join(format!("{}.tmp", format::MANIFEST));
        super::write_synced(&tmp, &bytes)?;
        let path = s.dir.join(format::MANIFEST);
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        super::sync_dir(&s.dir)?;
    }
    s.manifest = m;
    s.manifest_sha256 = format::sha256_hex(&bytes);
    Ok(())
}

/// The pruned points' data files (outside `chain`'s directories) that `chain` reads less
/// of than it does not: their chunks still read are copied into carried files of the
/// points that read them, so the files can go. Dry: counted, not copied.
fn compact(
    root: &Path,
    chain: &mut [Point],
    dry_run: bool,
    out: &mut Pruned,
) -> anyhow::Result<()> {
    let live: BTreeSet<u32> = chain.iter().map(|p| p.manifest.point).collect();
    let mut read: HashMap<String, u64> = HashMap::new();
    for p in chain.iter() {
        for d in &p.manifest.disks {
            for c in &d.chunks {
                if let Some(r) = &c.at {
                    *read.entry(r.file.clone()).or_default() += r.len;
                }
            }
        }
    }
    let mut sparse = BTreeSet::new();
    for (file, used) in read {
        let pruned = file
            .split_once('/')
            .and_then(|(dir, _)| format::point_number(dir))
            .is_some_and(|n| !live.contains(&n));
        if !pruned {
            continue;
        }
        let path = root.join(&file);
        let len = std::fs::metadata(&path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        if len.saturating_sub(used) > used {
            sparse.insert(file);
        }
    }
    if sparse.is_empty() {
        return Ok(());
    }
    for p in chain.iter_mut() {
        let mut m = p.manifest.clone();
        let mut carried = false;
        for d in &mut m.disks {
            // (entry, where) of each chunk read from a sparse file, by file and offset.
            let mut moves: Vec<(usize, DataRef)> = d
                .chunks
                .iter()
                .enumerate()
                .filter_map(|(i, c)| {
                    c.at.clone()
                        .filter(|r| sparse.contains(&r.file))
                        .map(|r| (i, r))
                })
                .collect();
            moves.sort_by(|a, b| (&a.1.file, a.1.offset).cmp(&(&b.1.file, b.1.offset)));
            for group in moves.chunk_by(|a, b| a.1.file == b.1.file) {
                let from = &group[0].1.file;
                let name = format!("{CARRIED}{}", from.replace('/', "-"));
                let rel = format!("{}/{name}", format::point_name(m.point));
                let mut offset = 0;
                for (i, r) in group {
                    d.chunks[*i].at = Some(DataRef {
                        file: rel.clone(),
                        offset,
                        len: r.len,
                    });
                    offset += r.len;
                }
                if !dry_run {
                    copy_chunks(root, &p.dir.join(&name), d, group)?;
                }
                out.carried_bytes += offset;
                carried = true;
            }
        }
        if carried {
            rewrite(p, m, !dry_run)?;
        }
    }
    Ok(())
}

/// Copies the chunks `group` names (entries of `d` at their old places, all in one file,
/// in offset order) into `to`, checking each one's digest: a corrupt chunk is not carried
/// on as if it were good.
fn copy_chunks(
    root: &Path,
    to: &Path,
    d: &DiskDelta,
    group: &[(usize, DataRef)],
) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::FileExt;
    let src = root.join(&group[0].1.file);
    let f = std::fs::File::open(&src).with_context(|| format!("opening {}", src.display()))?;
    let out = std::fs::File::create(to).with_context(|| format!("creating {}", to.display()))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, out);
    let mut buf = vec![0u8; d.chunk_size as usize];
    for (i, r) in group {
        let c = &d.chunks[*i];
        let bytes = buf.get_mut(..r.len as usize).with_context(|| {
            format!(
                "chunk {} of disk {} is longer than a chunk",
                c.index, d.disk_id
            )
        })?;
        f.read_exact_at(bytes, r.offset).with_context(|| {
            format!(
                "reading chunk {} of disk {} in {}",
                c.index,
                d.disk_id,
                src.display()
            )
        })?;
        if format::sha256_hex(bytes) != c.sha256 {
            bail!(
                "{}: chunk {} of disk {} does not match its digest: not carried on, the file \
                 stays (vm-backup-verify names every bad chunk)",
                src.display(),
                c.index,
                d.disk_id
            );
        }
        out.write_all(bytes)?;
    }
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()
        .with_context(|| format!("syncing {}", to.display()))?;
    Ok(())
}

/// `d` (incremental) takes over what `kd`, the same disk a point earlier, held and `d`
/// did not change: chunks by reference, zero ranges as they are.
fn fold_disk(k: &Point, kd: &DiskDelta, d: &mut DiskDelta) -> anyhow::Result<()> {
    if kd.chunk_size != d.chunk_size {
        bail!(
            "disk {} changes chunk size after point {}",
            d.disk_id,
            k.manifest.point
        );
    }
    let changed = intervals(d);
    let mut chunks: Vec<ChunkEntry> = k
        .locate(kd)?
        .into_iter()
        .filter(|(c, _)| !covers(&changed, c.index))
        .map(|(c, r)| ChunkEntry {
            index: c.index,
            sha256: c.sha256.clone(),
            at: Some(r),
        })
        .collect();
    chunks.append(&mut d.chunks);
    // Stable: d's own entries keep their order, which places them in its data file.
    chunks.sort_by_key(|c| c.index);
    d.chunks = chunks;
    let mut zeros: Vec<[u64; 2]> = kd
        .zero_ranges
        .iter()
        .flat_map(|&[first, count]| minus((first, first.saturating_add(count)), &changed))
        .map(|(a, b)| [a, b - a])
        .collect();
    zeros.append(&mut d.zero_ranges);
    zeros.sort_unstable();
    d.zero_ranges = zeros;
    d.full = kd.full;
    Ok(())
}

/// The chunks a delta sets, data or zeros, as sorted disjoint `[start, end)` intervals.
fn intervals(d: &DiskDelta) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = d
        .chunks
        .iter()
        .map(|c| (c.index, c.index + 1))
        .chain(d.zero_ranges.iter().map(|&[f, n]| (f, f.saturating_add(n))))
        .filter(|(a, b)| a < b)
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

fn covers(iv: &[(u64, u64)], i: u64) -> bool {
    let k = iv.partition_point(|&(a, _)| a <= i);
    k > 0 && iv[k - 1].1 > i
}

/// `[a, b)` less the intervals `iv`.
fn minus((mut a, b): (u64, u64), iv: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let from = iv.partition_point(|&(_, e)| e <= a);
    for &(s, e) in &iv[from..] {
        if s >= b {
            break;
        }
        if s > a {
            out.push((a, s));
        }
        a = a.max(e);
    }
    if a < b {
        out.push((a, b));
    }
    out
}

/// Deletes (dry: counts) every file in a pruned point's directory that no point of
/// `chain` reads, and the directory once empty.
fn collect_garbage(
    root: &Path,
    chain: &[Point],
    dry_run: bool,
    out: &mut Pruned,
) -> anyhow::Result<()> {
    let live: BTreeSet<u32> = chain.iter().map(|p| p.manifest.point).collect();
    let mut read: HashMap<String, u64> = HashMap::new();
    for p in chain {
        for d in &p.manifest.disks {
            for (_, r) in p.locate(d)? {
                *read.entry(r.file).or_default() += r.len;
            }
        }
    }
    for n in format::point_numbers(root)? {
        if live.contains(&n) {
            remove_stray_carried(root, n, &read, dry_run, out)?;
            continue;
        }
        let dir = format::point_dir(root, n);
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?;
        for e in entries {
            let e = e?;
            let len = e.metadata()?.len();
            let name = e.file_name();
            let rel = format!("{}/{}", format::point_name(n), name.to_string_lossy());
            if let Some(used) = read.get(&rel) {
                out.held_bytes += len;
                out.dead_bytes += len.saturating_sub(*used);
                continue;
            }
            out.freed_bytes += len;
            if !dry_run {
                std::fs::remove_file(e.path())
                    .with_context(|| format!("removing {}", e.path().display()))?;
            }
        }
        if !dry_run && std::fs::read_dir(&dir)?.next().is_none() {
            std::fs::remove_dir(&dir).with_context(|| format!("removing {}", dir.display()))?;
        }
    }
    if !dry_run {
        super::sync_dir(root)?;
    }
    Ok(())
}

/// Deletes the carried files in kept point `n`'s directory that no manifest names (a
/// compaction cut short before its manifest was written).
fn remove_stray_carried(
    root: &Path,
    n: u32,
    read: &HashMap<String, u64>,
    dry_run: bool,
    out: &mut Pruned,
) -> anyhow::Result<()> {
    let dir = format::point_dir(root, n);
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        let rel = format!("{}/{name}", format::point_name(n));
        if !name.starts_with(CARRIED) || read.contains_key(&rel) {
            continue;
        }
        out.freed_bytes += e.metadata()?.len();
        if !dry_run {
            std::fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::format::test_utils::*;
    use super::*;
    use format::{BackupError, disks_at, load_chain, point_dir, verify};

    fn keep(last: u32, daily: u32) -> Retention {
        Retention {
            keep_last: last,
            keep_daily: daily,
            keep_weekly: 0,
        }
    }

    /// Five points of one disk of 12 chunks, 12 hours apart (points 1; 2 and 3; 4 and 5
    /// fall on three days): rewrites, discards, a shrink and a regrowth.
    fn chain5(root: &Path) -> Vec<Point> {
        let p1 = write_point(
            root,
            1,
            None,
            12 * CS,
            &[(0, 1), (1, 1), (2, 1), (9, 1)],
            &[],
        );
        let p2 = write_point(root, 2, Some(&p1), 12 * CS, &[(1, 2), (4, 2)], &[[9, 1]]);
        let p3 = write_point(root, 3, Some(&p2), 12 * CS, &[(5, 3)], &[[2, 2]]);
        // Shrunk to 7 chunks and a half, then grown back.
        let p4 = write_point(root, 4, Some(&p3), 7 * CS + 100, &[(7, 4)], &[[0, 1]]);
        let p5 = write_point(root, 5, Some(&p4), 12 * CS, &[(11, 5)], &[]);
        vec![p1, p2, p3, p4, p5]
    }

    /// A point's number, its disk's chunks as (index, fill byte), its disk's bytes.
    type Image = (u32, Vec<(u64, u8)>, u64);

    fn images(chain: &[Point]) -> Vec<Image> {
        chain
            .iter()
            .map(|p| {
                let img = disks_at(chain, p.manifest.point).unwrap().remove(0);
                (p.manifest.point, fills(&img), img.bytes())
            })
            .collect()
    }

    #[test]
    fn pruned_points_fold_into_the_next_and_every_kept_point_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let written = chain5(root);
        let before = images(&load_chain(root).unwrap());
        assert_eq!(before[4].1, [(1, 2), (4, 2), (5, 3), (7, 4), (11, 5)]);

        let dry = prune(root, &keep(2, 0), true).unwrap();
        assert_eq!(
            (dry.kept.clone(), dry.removed.clone()),
            (vec![4, 5], vec![1, 2, 3])
        );
        assert_eq!(
            load_chain(root).unwrap().len(),
            5,
            "a dry run changes nothing"
        );

        let r = prune(root, &keep(2, 0), false).unwrap();
        assert_eq!((r.kept, r.removed), (dry.kept, dry.removed));
        // Manifests rewritten on the way (3's, before 3 goes too) make the two differ.
        assert_eq!(
            (r.held_bytes, r.dead_bytes),
            (dry.held_bytes, dry.dead_bytes)
        );
        assert!(dry.freed_bytes > 4 * CS && dry.freed_bytes <= r.freed_bytes);
        let chain = load_chain(root).unwrap();
        assert_eq!(
            chain.iter().map(|p| p.manifest.point).collect::<Vec<_>>(),
            [4, 5]
        );
        assert_eq!(verify(&chain).unwrap(), 5);
        assert_eq!(images(&chain), before[3..]);
        // Point 4 took over what 1 to 3 held and it kept: full now, chunks by reference.
        let d4 = &chain[0].manifest.disks[0];
        assert!(d4.full && chain[0].manifest.previous.is_none());
        assert_eq!(chain[0].manifest.absorbed, [1, 2, 3]);
        // Rewritten once, so point 5's link to it still holds.
        assert_eq!(
            chain[0].manifest.replaces,
            [written[3].manifest_sha256.clone()]
        );
        // Point 2's file stays (chunks 1 and 4 are read), 1's is read for nothing now,
        // 3's for chunk 5: manifests and specs of 1 to 3 go, and point 1 whole.
        assert!(!point_dir(root, 1).exists());
        let mut left: Vec<String> = ["point-0002", "point-0003"]
            .iter()
            .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
            .map(|e| {
                e.unwrap()
                    .path()
                    .strip_prefix(root)
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["point-0002/disk-vda.data", "point-0003/disk-vda.data"]
        );
        assert_eq!(r.held_bytes, 3 * CS);
        assert_eq!(r.dead_bytes, 0);
        // Files: 4 chunks, manifests and specs of 1-3, no more.
        assert!(r.freed_bytes > 4 * CS, "{}", r.freed_bytes);
        assert!(matches!(
            disks_at(&chain, 2),
            Err(BackupError::NoPoint { point: 2, kept, .. }) if kept == "4, 5"
        ));

        // The next backup links to the rewritten manifest; pruning down to it leaves it
        // reading what it read before.
        let p6 = write_point(root, 6, chain.last(), 12 * CS, &[(4, 6)], &[]);
        let before = images(&load_chain(root).unwrap());
        let r = prune(root, &keep(1, 0), false).unwrap();
        assert_eq!(r.removed, [4, 5]);
        let chain = load_chain(root).unwrap();
        assert_eq!(chain.len(), 1);
        // 4 folded into 5, then 5 (with 4's) into 6: 6 rewritten once.
        assert_eq!(chain[0].manifest.replaces, [p6.manifest_sha256]);
        assert_eq!(chain[0].manifest.absorbed, [1, 2, 3, 4, 5]);
        assert_eq!(images(&chain), before[2..]);
        verify(&chain).unwrap();
        // Held: 2's file (chunk 1; chunk 4, rewritten at 6, dead), 3's (chunk 5), 4's
        // (chunk 7, 100 bytes since the shrink) and 5's (chunk 11).
        assert_eq!((r.held_bytes, r.dead_bytes), (4 * CS + 100, CS));
    }

    #[test]
    fn a_daily_retention_prunes_points_between_kept_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        chain5(root);
        let before = images(&load_chain(root).unwrap());
        let r = prune(root, &keep(0, 3), false).unwrap();
        assert_eq!((r.kept, r.removed), (vec![1, 3, 5], vec![2, 4]));
        let chain = load_chain(root).unwrap();
        verify(&chain).unwrap();
        let want: Vec<_> = [0, 2, 4].iter().map(|&i| before[i].clone()).collect();
        assert_eq!(images(&chain), want);
        assert_eq!(chain[1].manifest.absorbed, [2]);
        assert_eq!(chain[1].manifest.previous.as_ref().unwrap().point, 1);
        // Nothing more to drop: a second prune changes nothing.
        let again = prune(root, &keep(0, 3), false).unwrap();
        assert!(again.removed.is_empty() && again.freed_bytes == 0);
    }

    #[test]
    fn a_prune_cut_short_leaves_a_readable_chain_and_the_next_finishes_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut chain = chain5(root);
        let before = images(&chain);
        // Point 2 folded into 3 and written; then the process died: 2 is all still there.
        let k = chain.remove(1);
        absorb(&k, &mut chain[1], true).unwrap();
        let loaded = load_chain(root).unwrap();
        assert_eq!(loaded.len(), 4, "point 2's leftovers are not a point");
        let mut want = before.clone();
        want.remove(1);
        assert_eq!(images(&loaded), want);
        verify(&loaded).unwrap();
        // The next prune deletes what is left of 2 besides the data 3 reads.
        prune(root, &keep(5, 0), false).unwrap();
        let left: Vec<_> = std::fs::read_dir(point_dir(root, 2))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["disk-vda.data"]);
    }

    #[test]
    fn a_bad_reference_or_corrupt_shared_data_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        chain5(root);
        prune(root, &keep(1, 0), false).unwrap();
        let chain = load_chain(root).unwrap();
        let shared = point_dir(root, 2).join("disk-vda.data");
        let mut bytes = std::fs::read(&shared).unwrap();
        bytes[5] ^= 1;
        std::fs::write(&shared, &bytes).unwrap();
        let err = verify(&chain).unwrap_err();
        assert!(
            matches!(&err, BackupError::Corrupt { path, .. } if *path == shared),
            "{err}"
        );
        assert!(err.to_string().contains("chunk 1 of disk vda"), "{err}");
        // A manifest may not send a reader outside the chain's points.
        let m = chain[0].dir.join(format::MANIFEST);
        let text = std::fs::read_to_string(&m).unwrap();
        std::fs::write(&m, text.replace("point-0002/", "../point-0002/")).unwrap();
        let chain = load_chain(root).unwrap();
        let err = verify(&chain).unwrap_err().to_string();
        assert!(
            err.contains("not in this or an earlier point's data"),
            "{err}"
        );
    }

    #[test]
    fn a_prune_is_refused_when_it_cannot_be_done() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let err = prune(root, &keep(1, 0), false).unwrap_err().to_string();
        assert!(err.contains("no backup point"), "{err}");
        chain5(root);
        let err = prune(root, &keep(0, 0), false).unwrap_err().to_string();
        assert!(err.contains("say what to keep"), "{err}");
        let held = super::super::lock(root).unwrap();
        let err = prune(root, &keep(1, 0), false).unwrap_err().to_string();
        assert!(err.contains("another vm-backup"), "{err}");
        drop(held);
        assert_eq!(load_chain(root).unwrap().len(), 5);
    }

    /// A full point of 8 chunks, 6 of them rewritten by point 2 and one more by 3.
    fn mostly_rewritten(root: &Path) -> Vec<Point> {
        let all: Vec<(u64, u8)> = (0..8).map(|c| (c, 1)).collect();
        let p1 = write_point(root, 1, None, 8 * CS, &all, &[]);
        let six: Vec<(u64, u8)> = (0..6).map(|c| (c, 2)).collect();
        let p2 = write_point(root, 2, Some(&p1), 8 * CS, &six, &[]);
        let p3 = write_point(root, 3, Some(&p2), 8 * CS, &[(0, 3)], &[]);
        vec![p1, p2, p3]
    }

    #[test]
    fn a_mostly_dead_file_is_compacted_into_the_point_that_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let written = mostly_rewritten(root);
        let before = images(&load_chain(root).unwrap());

        let dry = prune(root, &keep(1, 0), true).unwrap();
        assert_eq!(dry.carried_bytes, 2 * CS);
        assert!(
            !point_dir(root, 3)
                .join("carried-point-0001-disk-vda.data")
                .exists()
        );

        let r = prune(root, &keep(1, 0), false).unwrap();
        assert_eq!((r.kept, r.removed), (vec![3], vec![1, 2]));
        // Point 1's file: 2 of its 8 chunks still read, so carried; point 2's: 5 of 6, kept.
        assert_eq!(r.carried_bytes, 2 * CS);
        assert_eq!((r.held_bytes, r.dead_bytes), (6 * CS, CS));
        assert!(!point_dir(root, 1).exists(), "point 1 is freed whole");
        let carried = point_dir(root, 3).join("carried-point-0001-disk-vda.data");
        assert_eq!(std::fs::metadata(&carried).unwrap().len(), 2 * CS);
        let chain = load_chain(root).unwrap();
        assert_eq!(verify(&chain).unwrap(), 8);
        assert_eq!(images(&chain), before[2..]);
        let at: Vec<_> = chain[0].manifest.disks[0]
            .chunks
            .iter()
            .map(|c| c.at.as_ref().map(|r| (r.file.as_str(), r.offset)))
            .collect();
        assert_eq!(
            at[5..],
            [
                Some(("point-0002/disk-vda.data", 5 * CS)),
                Some(("point-0003/carried-point-0001-disk-vda.data", 0)),
                Some(("point-0003/carried-point-0001-disk-vda.data", CS))
            ]
        );
        // Point 4's link, made before the prune, still holds; so does one made after it.
        assert!(
            chain[0]
                .manifest
                .replaces
                .contains(&written[2].manifest_sha256)
        );
        write_point(root, 4, chain.last(), 8 * CS, &[(7, 4)], &[]);
        verify(&load_chain(root).unwrap()).unwrap();

        // A carried file no manifest names (a compaction cut short) goes with the next prune.
        let stray = point_dir(root, 3).join("carried-point-0002-disk-vda.data");
        std::fs::write(&stray, b"half written").unwrap();
        assert_eq!(load_chain(root).unwrap().len(), 2);
        prune(root, &keep(5, 0), false).unwrap();
        assert!(!stray.exists());
        assert!(carried.exists());
    }

    #[test]
    fn a_corrupt_chunk_is_not_carried_on() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        mostly_rewritten(root);
        let file = point_dir(root, 1).join("disk-vda.data");
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[6 * CS as usize + 3] ^= 1;
        std::fs::write(&file, &bytes).unwrap();
        let err = prune(root, &keep(1, 0), false).unwrap_err().to_string();
        assert!(
            err.contains("chunk 6 of disk vda does not match its digest"),
            "{err}"
        );
        assert!(err.contains("point-0001/disk-vda.data"), "{err}");
        // Folded, not compacted: the file stays and the chain still reads (verify names it).
        assert!(file.exists());
        let chain = load_chain(root).unwrap();
        assert_eq!(chain.len(), 1);
        let err = verify(&chain).unwrap_err();
        assert!(
            matches!(&err, BackupError::Corrupt { path, .. } if *path == file),
            "{err}"
        );
    }
}
