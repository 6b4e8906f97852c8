//! The backup directory (format version 2; DESIGN.md, "VM backups", has the layout):
//! manifests, the chain of points they form, checking every link and digest, and which
//! bytes of which files make each disk at a point. Version 1 (before pruning) is read too.
//!
//! Pure file work: nothing here talks to the pool, so verification runs anywhere.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What `format` says in every manifest.
pub const FORMAT: &str = "poolctl-vm-backup";
/// The version written; every version from 1 up to it is read. Version 2 added pruning:
/// `absorbed`, `replaces` and chunk entries with `at`.
pub const VERSION: u32 = 2;
pub const MANIFEST: &str = "manifest.json";
/// The VM's spec (`pool.v1.VmSpec`, protobuf) as the pool's VM snapshot recorded it.
pub const SPEC_FILE: &str = "vm-spec.pb";
/// Locked (`flock`) by a backup while it writes into the directory.
pub const LOCK_FILE: &str = ".lock";

/// One backup point: `point-NNNN/manifest.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    /// 1 for the full backup, then one more for each incremental.
    pub point: u32,
    pub created_at_ms: u64,
    pub vm_id: String,
    pub vm_name: String,
    /// The pool's VM snapshot this point was read from: the next point's base.
    pub vm_snapshot_id: String,
    /// The point this one builds on; none for point 1.
    pub previous: Option<Link>,
    /// SHA-256 of `vm-spec.pb`.
    pub spec_sha256: String,
    pub disks: Vec<DiskDelta>,
    /// Points pruned into this one: their chunks this point did not change became its
    /// own (entries with `at`); their directories hold only data still read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absorbed: Vec<u32>,
    /// The SHA-256s this manifest had before prunes rewrote it, so that the next point's
    /// link, made before, still names it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replaces: Vec<String>,
}

/// A point's link to the one before: its number and its manifest file's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Link {
    pub point: u32,
    pub manifest_sha256: String,
}

/// One disk at one point: the chunks that changed since the previous point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskDelta {
    /// The disk's name in the VM (`vda`).
    pub disk_id: String,
    /// The VM's volume, and the snapshot of it that was read.
    pub volume_id: String,
    pub snapshot_volume_id: String,
    pub size_bytes: u64,
    pub chunk_size: u64,
    /// Against nothing (every allocated chunk): earlier points do not count for this disk.
    pub full: bool,
    /// The chunks' bytes, concatenated in the order of `chunks`.
    pub data_file: String,
    /// Changed chunks holding data, in chunk order.
    pub chunks: Vec<ChunkEntry>,
    /// Changed chunks that read zeros now (discarded): `[first, count]`.
    pub zero_ranges: Vec<[u64; 2]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkEntry {
    pub index: u64,
    pub sha256: String,
    /// Where the bytes are when not in the disk's own data file: a chunk a pruned point
    /// held. Entries without it follow one another in `data_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<DataRef>,
}

/// Bytes in another point's data file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataRef {
    /// `point-NNNN/NAME`, relative to the chain's directory, of an earlier point.
    pub file: String,
    pub offset: u64,
    pub len: u64,
}

impl DiskDelta {
    /// Bytes of chunk `index`: a whole chunk, or what is left of the disk at its end.
    pub fn chunk_len(&self, index: u64) -> u64 {
        self.chunk_size
            .min(self.size_bytes.saturating_sub(index * self.chunk_size))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{path} is missing: the backup chain is broken there")]
    Missing { path: PathBuf },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a backup manifest")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "{path} is format {format:?} version {version}; this poolctl reads {FORMAT:?} versions 1 to {VERSION}"
    )]
    Version {
        path: PathBuf,
        format: String,
        version: u32,
    },
    #[error("{path} does not belong in this chain: {why}")]
    BadLink { path: PathBuf, why: String },
    #[error("{path} is corrupt: {what}")]
    Corrupt { path: PathBuf, what: String },
    #[error("there is no backup point {point} in {dir} (it holds points {kept})")]
    NoPoint {
        point: u32,
        dir: PathBuf,
        kept: String,
    },
}

/// A point as found on disk.
#[derive(Debug, Clone)]
pub struct Point {
    pub dir: PathBuf,
    pub manifest: Manifest,
    pub manifest_sha256: String,
}

pub fn sha256_hex(data: &[u8]) -> String {
    format!("{:x}", Sha256::digest(data))
}

pub fn point_dir(root: &Path, point: u32) -> PathBuf {
    root.join(point_name(point))
}

pub fn point_name(point: u32) -> String {
    format!("point-{point:04}")
}

/// A file name a manifest may give: no directory, nothing hidden.
fn plain_name(n: &str) -> bool {
    !n.is_empty() && !n.starts_with('.') && !n.contains(['/', '\\', '\0'])
}

/// The point number of a `point-NNNN` directory name.
pub(super) fn point_number(name: &str) -> Option<u32> {
    let n = name.strip_prefix("point-")?;
    (n.len() == 4 && n.bytes().all(|b| b.is_ascii_digit()))
        .then(|| n.parse().ok())
        .flatten()
}

impl Point {
    /// The directory the chain is in.
    pub fn root(&self) -> &Path {
        self.dir.parent().unwrap_or(Path::new("."))
    }

    fn corrupt(&self, what: String) -> BackupError {
        BackupError::Corrupt {
            path: self.dir.join(MANIFEST),
            what,
        }
    }

    /// Where each chunk of `d` (one of this point's disks) is, in the entries' order.
    pub fn locate<'a>(
        &self,
        d: &'a DiskDelta,
    ) -> Result<Vec<(&'a ChunkEntry, DataRef)>, BackupError> {
        if !plain_name(&d.data_file) {
            return Err(self.corrupt(format!(
                "disk {} names the data file {:?}",
                d.disk_id, d.data_file
            )));
        }
        let own = format!("{}/{}", point_name(self.manifest.point), d.data_file);
        let mut offset = 0;
        let mut out = Vec::with_capacity(d.chunks.len());
        for c in &d.chunks {
            let r = match &c.at {
                None => {
                    let len = d.chunk_len(c.index);
                    offset += len;
                    DataRef {
                        file: own.clone(),
                        offset: offset - len,
                        len,
                    }
                }
                Some(r) => {
                    let earlier = r
                        .file
                        .split_once('/')
                        .filter(|(_, name)| plain_name(name))
                        .and_then(|(dir, _)| point_number(dir))
                        // An earlier point's data, or chunks carried into this one's.
                        .is_some_and(|n| n <= self.manifest.point);
                    if !earlier || r.len == 0 || r.len > d.chunk_size {
                        return Err(self.corrupt(format!(
                            "chunk {} of disk {} is at {:?} ({} bytes): not in this or an earlier point's data",
                            c.index, d.disk_id, r.file, r.len
                        )));
                    }
                    r.clone()
                }
            };
            out.push((c, r));
        }
        Ok(out)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, BackupError> {
    std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => BackupError::Missing {
            path: path.to_owned(),
        },
        _ => BackupError::Read {
            path: path.to_owned(),
            source,
        },
    })
}

/// The numbers of the points in `root` (`point-NNNN`; unfinished `.tmp` ones are not).
pub fn point_numbers(root: &Path) -> Result<Vec<u32>, BackupError> {
    let entries = match std::fs::read_dir(root) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(source) => {
            return Err(BackupError::Read {
                path: root.to_owned(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|source| BackupError::Read {
            path: root.to_owned(),
            source,
        })?;
        if let Some(n) = e.file_name().to_str().and_then(point_number) {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Reads and checks one point's manifest on its own.
fn read_point(root: &Path, n: u32) -> Result<Point, BackupError> {
    let dir = point_dir(root, n);
    let path = dir.join(MANIFEST);
    let bytes = read(&path)?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|source| BackupError::Parse {
            path: path.clone(),
            source,
        })?;
    if manifest.format != FORMAT || !(1..=VERSION).contains(&manifest.version) {
        return Err(BackupError::Version {
            path,
            format: manifest.format,
            version: manifest.version,
        });
    }
    let bad = |why: String| BackupError::BadLink {
        path: path.clone(),
        why,
    };
    if manifest.point != n {
        return Err(bad(format!("it says it is point {}", manifest.point)));
    }
    if let Some(a) = manifest.absorbed.iter().find(|&&a| a >= n) {
        return Err(bad(format!("it says it absorbed the later point {a}")));
    }
    Ok(Point {
        dir,
        manifest,
        manifest_sha256: sha256_hex(&bytes),
    })
}

/// Every point of the chain in `root`, in order, each manifest checked against its
/// predecessor; an empty directory is an empty chain. A point that a later one absorbed
/// (pruned) is not in it, whatever its directory still holds.
pub fn load_chain(root: &Path) -> Result<Vec<Point>, BackupError> {
    let mut pruned = BTreeSet::new();
    let mut newest_first = Vec::new();
    for n in point_numbers(root)?.into_iter().rev() {
        if pruned.contains(&n) {
            continue;
        }
        let p = read_point(root, n)?;
        pruned.extend(p.manifest.absorbed.iter().copied());
        newest_first.push(p);
    }
    let mut chain: Vec<Point> = Vec::with_capacity(newest_first.len());
    for p in newest_first.into_iter().rev() {
        let path = p.dir.join(MANIFEST);
        let bad = |why: String| BackupError::BadLink {
            path: path.clone(),
            why,
        };
        let gone = |link: &Link| {
            if link.point < p.manifest.point && !pruned.contains(&link.point) {
                BackupError::Missing {
                    path: point_dir(root, link.point).join(MANIFEST),
                }
            } else {
                bad(format!(
                    "it builds on point {}, which cannot be",
                    link.point
                ))
            }
        };
        match (chain.last(), &p.manifest.previous) {
            (None, None) => {
                if let Some(d) = p.manifest.disks.iter().find(|d| !d.full) {
                    return Err(bad(format!(
                        "the first point must be full, but disk {} is incremental",
                        d.disk_id
                    )));
                }
            }
            (Some(prev), Some(link)) if link.point == prev.manifest.point => {
                let known = link.manifest_sha256 == prev.manifest_sha256
                    || prev.manifest.replaces.contains(&link.manifest_sha256);
                if !known || p.manifest.vm_id != prev.manifest.vm_id {
                    return Err(bad(format!(
                        "it builds on a point {} other than {} (whose manifest was changed or replaced)",
                        link.point,
                        prev.dir.join(MANIFEST).display()
                    )));
                }
            }
            (Some(prev), Some(link)) if link.point > prev.manifest.point => return Err(gone(link)),
            (None, Some(link)) => return Err(gone(link)),
            (Some(_), Some(link)) => {
                return Err(bad(format!(
                    "it builds on point {}, before the point before it",
                    link.point
                )));
            }
            (Some(_), None) => return Err(bad("it does not name the point before it".into())),
        }
        chain.push(p);
    }
    Ok(chain)
}

/// Re-reads every file of `points` and checks every digest; the first mismatch is named.
/// Returns the chunks checked.
pub fn verify(points: &[Point]) -> Result<u64, BackupError> {
    let mut checked = 0;
    for p in points {
        let spec = p.dir.join(SPEC_FILE);
        if sha256_hex(&read(&spec)?) != p.manifest.spec_sha256 {
            return Err(BackupError::Corrupt {
                path: spec,
                what: "its SHA-256 differs from the manifest's".into(),
            });
        }
        for d in &p.manifest.disks {
            checked += verify_disk(p, d)?;
        }
    }
    Ok(checked)
}

fn open(path: &Path) -> Result<std::fs::File, BackupError> {
    std::fs::File::open(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => BackupError::Missing {
            path: path.to_owned(),
        },
        _ => BackupError::Read {
            path: path.to_owned(),
            source,
        },
    })
}

/// Checks the disk's own data file (its whole length, read in order) and each chunk it
/// takes from an earlier point's file.
fn verify_disk(p: &Point, d: &DiskDelta) -> Result<u64, BackupError> {
    let located = p.locate(d)?;
    let path = p.dir.join(&d.data_file);
    let file = open(&path)?;
    let expected: u64 = d
        .chunks
        .iter()
        .filter(|c| c.at.is_none())
        .map(|c| d.chunk_len(c.index))
        .sum();
    let len = file
        .metadata()
        .map_err(|source| BackupError::Read {
            path: path.clone(),
            source,
        })?
        .len();
    if len != expected {
        return Err(BackupError::Corrupt {
            path,
            what: format!("it holds {len} bytes, its chunks {expected}"),
        });
    }
    let mut own = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = vec![0u8; d.chunk_size as usize];
    let mut others: Vec<(&ChunkEntry, DataRef)> = Vec::new();
    for (c, r) in located {
        if c.at.is_some() {
            others.push((c, r));
            continue;
        }
        let n = r.len as usize;
        own.read_exact(&mut buf[..n])
            .map_err(|source| BackupError::Read {
                path: path.clone(),
                source,
            })?;
        check_chunk(&path, d, c, &r, &buf[..n])?;
    }
    // Each other file opened once, read in offset order.
    others.sort_by(|a, b| (&a.1.file, a.1.offset).cmp(&(&b.1.file, b.1.offset)));
    let mut current: Option<(String, std::fs::File)> = None;
    for (c, r) in others {
        let path = p.root().join(&r.file);
        if current.as_ref().is_none_or(|(f, _)| *f != r.file) {
            current = Some((r.file.clone(), open(&path)?));
        }
        let (_, f) = current.as_ref().expect("opened above");
        let n = r.len as usize;
        f.read_exact_at(&mut buf[..n], r.offset)
            .map_err(|source| BackupError::Read {
                path: path.clone(),
                source,
            })?;
        check_chunk(&path, d, c, &r, &buf[..n])?;
    }
    Ok(d.chunks.len() as u64)
}

fn check_chunk(
    path: &Path,
    d: &DiskDelta,
    c: &ChunkEntry,
    r: &DataRef,
    bytes: &[u8],
) -> Result<(), BackupError> {
    if sha256_hex(bytes) == c.sha256 {
        return Ok(());
    }
    Err(BackupError::Corrupt {
        path: path.to_owned(),
        what: format!(
            "chunk {} of disk {} (bytes {}..{}) does not match its SHA-256",
            c.index,
            d.disk_id,
            r.offset,
            r.offset + r.len
        ),
    })
}

/// Where a chunk's bytes are in the backup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub file: PathBuf,
    pub offset: u64,
    pub len: u64,
}

/// One disk as it was at a point: its size and its non-zero chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskImage {
    pub disk_id: String,
    pub size_bytes: u64,
    pub chunk_size: u64,
    pub chunks: BTreeMap<u64, Source>,
}

impl DiskImage {
    pub fn bytes(&self) -> u64 {
        self.chunks.values().map(|s| s.len).sum()
    }
}

/// Where `point` is in `chain`; a point not there (never taken, or pruned) is an error
/// that lists the points kept.
pub fn position(chain: &[Point], point: u32) -> Result<usize, BackupError> {
    chain
        .iter()
        .position(|p| p.manifest.point == point)
        .ok_or_else(|| BackupError::NoPoint {
            point,
            dir: chain
                .first()
                .map(|p| p.root().to_owned())
                .unwrap_or_default(),
            kept: chain
                .iter()
                .map(|p| p.manifest.point.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

/// Each disk of the VM at `point`, put together from the chain's points up to it: the
/// last full point of the disk, then every later delta over it.
pub fn disks_at(chain: &[Point], point: u32) -> Result<Vec<DiskImage>, BackupError> {
    let upto = position(chain, point)?;
    let target = &chain[upto];
    let mut out = Vec::new();
    for want in &target.manifest.disks {
        let mut img = DiskImage {
            disk_id: want.disk_id.clone(),
            size_bytes: want.size_bytes,
            chunk_size: want.chunk_size,
            chunks: BTreeMap::new(),
        };
        for p in &chain[..=upto] {
            let Some(d) = p.manifest.disks.iter().find(|d| d.disk_id == want.disk_id) else {
                continue;
            };
            if d.full {
                img.chunks.clear();
            } else if d.chunk_size != img.chunk_size {
                return Err(BackupError::BadLink {
                    path: p.dir.join(MANIFEST),
                    why: format!("disk {} changes chunk size", d.disk_id),
                });
            }
            img.chunk_size = d.chunk_size;
            for &[first, count] in &d.zero_ranges {
                let end = first.saturating_add(count);
                let gone: Vec<u64> = img.chunks.range(first..end).map(|(k, _)| *k).collect();
                for k in gone {
                    img.chunks.remove(&k);
                }
            }
            for (c, r) in p.locate(d)? {
                img.chunks.insert(
                    c.index,
                    Source {
                        file: p.root().join(&r.file),
                        offset: r.offset,
                        len: r.len,
                    },
                );
            }
        }
        // A disk that shrank keeps no chunk past its end.
        let end = want.size_bytes.div_ceil(want.chunk_size.max(1));
        img.chunks.retain(|&k, _| k < end);
        out.push(img);
    }
    Ok(out)
}

/// Chains written by hand, for the tests of this module and of pruning.
#[cfg(test)]
pub mod test_utils {
    use super::*;

    pub const CS: u64 = 4096;

    /// Writes a point with one disk `vda` of `size` bytes: `chunks` as (index, fill byte).
    pub fn write_point(
        root: &Path,
        n: u32,
        prev: Option<&Point>,
        size: u64,
        chunks: &[(u64, u8)],
        zeros: &[[u64; 2]],
    ) -> Point {
        let dir = point_dir(root, n);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(SPEC_FILE), b"spec").unwrap();
        let mut data = Vec::new();
        let mut entries = Vec::new();
        for &(index, fill) in chunks {
            let len = CS.min(size - index * CS) as usize;
            let bytes = vec![fill; len];
            entries.push(ChunkEntry {
                index,
                sha256: sha256_hex(&bytes),
                at: None,
            });
            data.extend(bytes);
        }
        std::fs::write(dir.join("disk-vda.data"), &data).unwrap();
        let m = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            point: n,
            created_at_ms: u64::from(n) * 43_200_000,
            vm_id: "vm1".into(),
            vm_name: "web".into(),
            vm_snapshot_id: format!("snap{n}"),
            previous: prev.map(|p| Link {
                point: p.manifest.point,
                manifest_sha256: p.manifest_sha256.clone(),
            }),
            spec_sha256: sha256_hex(b"spec"),
            disks: vec![DiskDelta {
                disk_id: "vda".into(),
                volume_id: "vol".into(),
                snapshot_volume_id: format!("sv{n}"),
                size_bytes: size,
                chunk_size: CS,
                full: prev.is_none(),
                data_file: "disk-vda.data".into(),
                chunks: entries,
                zero_ranges: zeros.to_vec(),
            }],
            absorbed: vec![],
            replaces: vec![],
        };
        let bytes = serde_json::to_vec_pretty(&m).unwrap();
        std::fs::write(dir.join(MANIFEST), &bytes).unwrap();
        Point {
            dir,
            manifest: m,
            manifest_sha256: sha256_hex(&bytes),
        }
    }

    pub fn fills(img: &DiskImage) -> Vec<(u64, u8)> {
        img.chunks
            .iter()
            .map(|(&k, s)| {
                let data = std::fs::read(&s.file).unwrap();
                let bytes = &data[s.offset as usize..(s.offset + s.len) as usize];
                assert!(bytes.iter().all(|&b| b == bytes[0]));
                (k, bytes[0])
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_utils::*;
    use super::*;

    fn chain3(root: &Path) -> Vec<Point> {
        let p1 = write_point(root, 1, None, 10 * CS, &[(0, 1), (1, 1), (5, 1)], &[]);
        let p2 = write_point(root, 2, Some(&p1), 10 * CS, &[(1, 2), (7, 2)], &[[5, 1]]);
        // Shrunk to 8 chunks and a half: chunk 8 is short.
        let p3 = write_point(root, 3, Some(&p2), 8 * CS + 512, &[(8, 3)], &[]);
        vec![p1, p2, p3]
    }

    #[test]
    fn each_point_is_its_full_backup_plus_the_deltas_after_it() {
        let dir = tempfile::tempdir().unwrap();
        chain3(dir.path());
        let chain = load_chain(dir.path()).unwrap();
        assert_eq!(chain.len(), 3);
        assert_eq!(verify(&chain).unwrap(), 6);
        let at = |n| disks_at(&chain, n).unwrap().remove(0);
        assert_eq!(fills(&at(1)), [(0, 1), (1, 1), (5, 1)]);
        assert_eq!(fills(&at(2)), [(0, 1), (1, 2), (7, 2)]);
        let p3 = at(3);
        assert_eq!(fills(&p3), [(0, 1), (1, 2), (7, 2), (8, 3)]);
        assert_eq!((p3.size_bytes, p3.bytes()), (8 * CS + 512, 3 * CS + 512));
        assert!(matches!(
            disks_at(&chain, 4),
            Err(BackupError::NoPoint { point: 4, kept, .. }) if kept == "1, 2, 3"
        ));
        // A directory with no point is an empty chain.
        assert!(load_chain(&dir.path().join("none")).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_chunk_is_named_with_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain3(dir.path());
        let data = chain[1].dir.join("disk-vda.data");
        let mut bytes = std::fs::read(&data).unwrap();
        bytes[CS as usize + 9] ^= 0xff;
        std::fs::write(&data, &bytes).unwrap();
        let err = verify(&load_chain(dir.path()).unwrap()).unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, BackupError::Corrupt { path, .. } if *path == data),
            "{text}"
        );
        assert!(text.contains("chunk 7 of disk vda"), "{text}");
        // Points before the corrupt one still verify.
        verify(&load_chain(dir.path()).unwrap()[..1]).unwrap();
        std::fs::write(&data, &bytes[..10]).unwrap();
        assert!(matches!(
            verify(&load_chain(dir.path()).unwrap()),
            Err(BackupError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_missing_or_changed_link_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let chain = chain3(dir.path());
        // A changed manifest of point 2 no longer matches what point 3 recorded.
        let m2 = chain[1].dir.join(MANIFEST);
        let text = std::fs::read_to_string(&m2).unwrap();
        std::fs::write(
            &m2,
            text.replace("\"vm_name\": \"web\"", "\"vm_name\": \"web2\""),
        )
        .unwrap();
        let err = load_chain(dir.path()).unwrap_err();
        assert!(
            matches!(&err, BackupError::BadLink { path, .. } if *path == chain[2].dir.join(MANIFEST)),
            "{err}"
        );
        std::fs::write(&m2, "{").unwrap();
        assert!(matches!(
            load_chain(dir.path()),
            Err(BackupError::Parse { path, .. }) if path == m2
        ));
        std::fs::remove_dir_all(&chain[1].dir).unwrap();
        assert!(matches!(
            load_chain(dir.path()),
            Err(BackupError::Missing { path }) if path == m2
        ));
        std::fs::remove_file(chain[0].dir.join(SPEC_FILE)).unwrap();
        assert!(matches!(
            verify(&chain[..1]),
            Err(BackupError::Missing { path }) if path == chain[0].dir.join(SPEC_FILE)
        ));
    }
}
