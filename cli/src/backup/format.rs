//! The backup directory (format version 1; DESIGN.md, "VM backups", has the layout):
//! manifests, the chain of points they form, checking every link and digest, and which
//! bytes of which files make each disk at a point.
//!
//! Pure file work: nothing here talks to the pool, so verification runs anywhere.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What `format` says in every manifest.
pub const FORMAT: &str = "poolctl-vm-backup";
/// The version written, and the only one read so far.
pub const VERSION: u32 = 1;
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
        "{path} is format {format:?} version {version}; this poolctl reads {FORMAT:?} version {VERSION}"
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
    #[error("there is no backup point {point} in {dir} (the last is {last})")]
    NoPoint { point: u32, dir: PathBuf, last: u32 },
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
    root.join(format!("point-{point:04}"))
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
fn point_numbers(root: &Path) -> Result<Vec<u32>, BackupError> {
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
        let name = e.file_name();
        let Some(n) = name.to_str().and_then(|n| n.strip_prefix("point-")) else {
            continue;
        };
        if n.len() == 4
            && let Ok(n) = n.parse::<u32>()
        {
            out.push(n);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Every point of the chain in `root`, in order, each manifest checked against its
/// predecessor; an empty directory is an empty chain.
pub fn load_chain(root: &Path) -> Result<Vec<Point>, BackupError> {
    let numbers = point_numbers(root)?;
    let last = numbers.last().copied().unwrap_or(0);
    let mut chain: Vec<Point> = Vec::new();
    for n in 1..=last {
        let dir = point_dir(root, n);
        let path = dir.join(MANIFEST);
        let bytes = read(&path)?;
        let manifest: Manifest =
            serde_json::from_slice(&bytes).map_err(|source| BackupError::Parse {
                path: path.clone(),
                source,
            })?;
        if manifest.format != FORMAT || manifest.version != VERSION {
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
        match (chain.last(), &manifest.previous) {
            (None, None) => {
                if let Some(d) = manifest.disks.iter().find(|d| !d.full) {
                    return Err(bad(format!(
                        "point 1 must be full, but disk {} is incremental",
                        d.disk_id
                    )));
                }
            }
            (Some(prev), Some(link)) => {
                if link.point != prev.manifest.point
                    || link.manifest_sha256 != prev.manifest_sha256
                    || manifest.vm_id != prev.manifest.vm_id
                {
                    return Err(bad(format!(
                        "it builds on a point {} other than {} (whose manifest was changed or replaced)",
                        link.point,
                        prev.dir.join(MANIFEST).display()
                    )));
                }
            }
            (None, Some(_)) => return Err(bad("point 1 cannot build on another".into())),
            (Some(_), None) => return Err(bad("it does not name the point before it".into())),
        }
        chain.push(Point {
            dir,
            manifest,
            manifest_sha256: sha256_hex(&bytes),
        });
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
            checked += verify_disk(&p.dir, d)?;
        }
    }
    Ok(checked)
}

fn verify_disk(dir: &Path, d: &DiskDelta) -> Result<u64, BackupError> {
    let path = dir.join(&d.data_file);
    let file = std::fs::File::open(&path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => BackupError::Missing { path: path.clone() },
        _ => BackupError::Read {
            path: path.clone(),
            source,
        },
    })?;
    let expected: u64 = d.chunks.iter().map(|c| d.chunk_len(c.index)).sum();
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
    let mut r = std::io::BufReader::with_capacity(1 << 20, file);
    let mut buf = vec![0u8; d.chunk_size as usize];
    let mut offset = 0u64;
    for c in &d.chunks {
        let n = d.chunk_len(c.index) as usize;
        r.read_exact(&mut buf[..n])
            .map_err(|source| BackupError::Read {
                path: path.clone(),
                source,
            })?;
        if sha256_hex(&buf[..n]) != c.sha256 {
            return Err(BackupError::Corrupt {
                path,
                what: format!(
                    "chunk {} of disk {} (bytes {offset}..{}) does not match its SHA-256",
                    c.index,
                    d.disk_id,
                    offset + n as u64
                ),
            });
        }
        offset += n as u64;
    }
    Ok(d.chunks.len() as u64)
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

/// Each disk of the VM at `point`, put together from the chain's points up to it: the
/// last full point of the disk, then every later delta over it.
pub fn disks_at(chain: &[Point], point: u32) -> Result<Vec<DiskImage>, BackupError> {
    let upto = chain
        .iter()
        .position(|p| p.manifest.point == point)
        .ok_or_else(|| BackupError::NoPoint {
            point,
            dir: chain
                .first()
                .and_then(|p| p.dir.parent())
                .map(Path::to_owned)
                .unwrap_or_default(),
            last: chain.last().map_or(0, |p| p.manifest.point),
        })?;
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
            let mut offset = 0;
            for c in &d.chunks {
                let len = d.chunk_len(c.index);
                img.chunks.insert(
                    c.index,
                    Source {
                        file: p.dir.join(&d.data_file),
                        offset,
                        len,
                    },
                );
                offset += len;
            }
        }
        // A disk that shrank keeps no chunk past its end.
        let end = want.size_bytes.div_ceil(want.chunk_size.max(1));
        img.chunks.retain(|&k, _| k < end);
        out.push(img);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 4096;

    /// Writes a point with one disk `vda` of `size` bytes: `chunks` as (index, fill byte).
    fn write_point(
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
            });
            data.extend(bytes);
        }
        std::fs::write(dir.join("disk-vda.data"), &data).unwrap();
        let m = Manifest {
            format: FORMAT.into(),
            version: VERSION,
            point: n,
            created_at_ms: 1,
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
        };
        let bytes = serde_json::to_vec_pretty(&m).unwrap();
        std::fs::write(dir.join(MANIFEST), &bytes).unwrap();
        Point {
            dir,
            manifest: m,
            manifest_sha256: sha256_hex(&bytes),
        }
    }

    fn fills(img: &DiskImage) -> Vec<(u64, u8)> {
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
            Err(BackupError::NoPoint {
                point: 4,
                last: 3,
                ..
            })
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
            text.replace("\"created_at_ms\": 1", "\"created_at_ms\": 2"),
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
