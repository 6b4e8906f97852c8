//! Creating a pool on a file or block device, and importing one: the superblock, the
//! metadata store, and the in-memory state rebuilt from what the metadata holds.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::check::derive;
use super::unix_secs;
use super::volumes::Volume;
use super::{
    DEFAULT_CHUNK_SIZE, DEFAULT_WARNING_PERCENT, MIN_CHUNKS, PoolError, ThinPool, validate_name,
};
use crate::backing::{Backing, BackingKind};
use crate::meta::{META_FORMAT, MetaStore, PoolMeta};
use crate::space::SpaceMap;
use crate::superblock::{self, Superblock};
use crate::tree::{Forest, NO_CHUNK};

/// What to create a pool on.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    pub name: String,
    pub kind: BackingKind,
    pub path: PathBuf,
    /// A file's size (required for files); for a device, `None` uses the whole device.
    pub size: Option<u64>,
    /// 0 means [`DEFAULT_CHUNK_SIZE`].
    pub chunk_size: u64,
    /// Where sled keeps the metadata; defaults to `<path>.meta` for files.
    pub meta_dir: Option<PathBuf>,
    /// 0 means [`DEFAULT_WARNING_PERCENT`].
    pub warning_threshold_percent: u32,
}

#[derive(Debug, Clone)]
pub struct ImportOptions {
    pub kind: BackingKind,
    pub path: PathBuf,
    /// Overrides the metadata directory the superblock names (e.g. after moving it).
    pub meta_dir: Option<PathBuf>,
    /// Fail unless the superblock names this pool.
    pub expected_id: Option<Uuid>,
}

pub fn valid_chunk_size(size: u64) -> bool {
    size.is_power_of_two() && (64 << 10..=1 << 20).contains(&size)
}

fn default_meta_dir(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(".meta");
    PathBuf::from(s)
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn read_superblock(backing: &Backing) -> Result<Superblock, PoolError> {
    let mut copies = [[0u8; superblock::SIZE]; 2];
    for (copy, &at) in copies.iter_mut().zip(superblock::COPIES.iter()) {
        backing.read_at(at, copy)?;
    }
    Superblock::pick(&copies).map_err(|source| PoolError::Superblock {
        path: backing.path().to_owned(),
        source,
    })
}

fn write_superblock(backing: &Backing, sb: &Superblock) -> Result<(), PoolError> {
    let bytes = sb.write_to().map_err(|source| PoolError::Superblock {
        path: backing.path().to_owned(),
        source,
    })?;
    for &at in &superblock::COPIES {
        backing.write_at(at, &bytes)?;
    }
    backing.sync_all()?;
    Ok(())
}

impl ThinPool {
    /// Creates a pool. Refuses a device or file that already holds a pool or data.
    pub fn create(opts: &CreateOptions) -> Result<ThinPool, PoolError> {
        validate_name(&opts.name)?;
        let chunk_size = if opts.chunk_size == 0 {
            DEFAULT_CHUNK_SIZE
        } else {
            opts.chunk_size
        };
        if !valid_chunk_size(chunk_size) {
            return Err(PoolError::InvalidArgument(format!(
                "chunk size {chunk_size} must be a power of two from 64 KiB to 1 MiB"
            )));
        }
        let warn = match opts.warning_threshold_percent {
            0 => DEFAULT_WARNING_PERCENT,
            p @ 1..=100 => p,
            p => {
                return Err(PoolError::InvalidArgument(format!(
                    "warning threshold {p}% is not a percentage"
                )));
            }
        };
        let meta_dir = match (&opts.meta_dir, opts.kind) {
            (Some(d), _) => absolute(d),
            (None, BackingKind::File) => absolute(&default_meta_dir(&opts.path)),
            (None, BackingKind::BlockDevice) => {
                return Err(PoolError::InvalidArgument(
                    "a pool on a block device needs a metadata directory (meta_dir)".into(),
                ));
            }
        };
        let size = match (opts.kind, opts.size) {
            (BackingKind::File, None) => {
                return Err(PoolError::InvalidArgument(
                    "a file-backed pool needs a size".into(),
                ));
            }
            (_, s) => s,
        };
        if let Some(s) = size {
            let min = superblock::DATA_OFFSET + MIN_CHUNKS * chunk_size;
            if s < min {
                return Err(PoolError::InvalidArgument(format!(
                    "size {s} is below the minimum of {min} bytes ({MIN_CHUNKS} chunks and the superblock area)"
                )));
            }
        }
        let existed = opts.path.exists();
        let backing = Backing::open(&opts.path, opts.kind, true)?;
        let cleanup = |backing: Backing| {
            drop(backing);
            if !existed && opts.kind == BackingKind::File {
                let _ = std::fs::remove_file(&opts.path);
            }
        };
        let current = backing.size()?;
        if current >= superblock::DATA_OFFSET
            && let Ok(sb) = read_superblock(&backing)
        {
            let pool_id = sb.pool_id;
            cleanup(backing);
            return Err(PoolError::AlreadyPool {
                path: opts.path.clone(),
                pool_id,
            });
        }
        if opts.kind == BackingKind::File && current != 0 {
            cleanup(backing);
            return Err(PoolError::NotEmpty {
                path: opts.path.clone(),
            });
        }
        let result = (|| {
            let device_size = match opts.kind {
                BackingKind::File => {
                    let s = size.expect("checked above");
                    backing.grow_file(s)?;
                    s
                }
                BackingKind::BlockDevice => {
                    let dev = backing.size()?;
                    match size {
                        Some(s) if s > dev => {
                            return Err(PoolError::InvalidArgument(format!(
                                "size {s} is larger than the device ({dev} bytes)"
                            )));
                        }
                        Some(s) => s,
                        None => dev,
                    }
                }
            };
            let chunk_count = (device_size.saturating_sub(superblock::DATA_OFFSET)) / chunk_size;
            if chunk_count < MIN_CHUNKS {
                return Err(PoolError::InvalidArgument(format!(
                    "{device_size} bytes hold only {chunk_count} chunks; a pool needs at least {MIN_CHUNKS}"
                )));
            }
            let chunk_count = chunk_count.min(u64::from(NO_CHUNK - 1));
            let id = Uuid::new_v4();
            let created_at = unix_secs();
            let meta = PoolMeta {
                format: META_FORMAT,
                pool_id: id,
                name: opts.name.clone(),
                chunk_size: chunk_size as u32,
                chunk_count,
                next_node_id: 1,
                created_at,
                warning_threshold_percent: warn,
                commit_seq: 0,
            };
            let store = MetaStore::create(&meta_dir, &meta)?;
            let sb = Superblock {
                pool_id: id,
                chunk_size: chunk_size as u32,
                data_offset: superblock::DATA_OFFSET,
                created_at,
                generation: 1,
                name: opts.name.clone(),
                meta_dir: meta_dir.clone(),
            };
            if let Err(e) = write_superblock(&backing, &sb) {
                drop(store);
                let _ = std::fs::remove_dir_all(&meta_dir);
                return Err(e);
            }
            Ok((store, meta))
        })();
        let (store, meta) = match result {
            Ok(v) => v,
            Err(e) => {
                cleanup(backing);
                return Err(e);
            }
        };
        tracing::info!(pool = %meta.pool_id, name = %meta.name, chunks = meta.chunk_count, chunk_size, "created thin pool");
        // A new file reads as zeros; a device's old content is unknown.
        let zeroed = opts.kind == BackingKind::File;
        let space = SpaceMap::new(meta.chunk_count as usize, zeroed);
        Ok(Self::assemble(
            backing,
            store,
            meta,
            Forest::new(),
            space,
            HashMap::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        ))
    }

    /// Opens an existing pool after checking its superblock against its metadata.
    pub fn import(opts: &ImportOptions) -> Result<ThinPool, PoolError> {
        let backing = Backing::open(&opts.path, opts.kind, false)?;
        let sb = read_superblock(&backing)?;
        if let Some(expected) = opts.expected_id
            && sb.pool_id != expected
        {
            return Err(PoolError::UnexpectedPool {
                path: opts.path.clone(),
                found: sb.pool_id,
                expected,
            });
        }
        let meta_dir = opts.meta_dir.clone().unwrap_or_else(|| sb.meta_dir.clone());
        let store = MetaStore::open(&meta_dir)?;
        let loaded = store.load()?;
        if loaded.meta.pool_id != sb.pool_id {
            return Err(PoolError::MetaMismatch {
                meta_dir,
                meta_pool: loaded.meta.pool_id,
                device_pool: sb.pool_id,
            });
        }
        if u64::from(loaded.meta.chunk_size) != u64::from(sb.chunk_size) {
            return Err(PoolError::Corrupt {
                problems: vec![format!(
                    "superblock chunk size {} differs from metadata's {}",
                    sb.chunk_size, loaded.meta.chunk_size
                )],
            });
        }
        let chunk_size = u64::from(sb.chunk_size);
        let needed = sb.data_offset + loaded.meta.chunk_count * chunk_size;
        let have = backing.size()?;
        if have < needed {
            return Err(PoolError::Corrupt {
                problems: vec![format!(
                    "the device has {have} bytes but the pool needs {needed}"
                )],
            });
        }
        let volumes: HashMap<Uuid, Volume> = loaded
            .volumes
            .into_iter()
            .map(|r| (r.id, Volume::from(r)))
            .collect();
        let mut nodes = loaded.nodes;
        // Never hand out an id a stored node has, orphans included: a repair deletes
        // orphans by id.
        let next_node_id = nodes
            .keys()
            .max()
            .map_or(1, |m| m + 1)
            .max(loaded.meta.next_node_id);
        let derived = derive(
            |id| nodes.get(&id),
            &volumes,
            loaded.meta.chunk_count as usize,
        );
        if !derived.fatal.is_empty() {
            return Err(PoolError::Corrupt {
                problems: derived.fatal,
            });
        }
        let mut orphans = Vec::new();
        for (id, node) in nodes.iter_mut() {
            match derived.node_refs.get(id) {
                Some(&r) => node.refs = r,
                None => orphans.push(*id),
            }
        }
        for id in &orphans {
            nodes.remove(id);
        }
        orphans.sort_unstable();
        let mut refs = loaded.refs;
        let mut import_problems = Vec::new();
        for (c, (stored, &mapped)) in refs.iter_mut().zip(derived.chunk_refs.iter()).enumerate() {
            if *stored < mapped {
                // Never hand out a chunk a mapping still uses, whatever the counts say.
                import_problems.push(format!(
                    "chunk {c} is mapped {mapped} times but counted {stored}"
                ));
                *stored = mapped;
            }
        }
        if !import_problems.is_empty() {
            tracing::error!(
                count = import_problems.len(),
                "pool {} had chunks counted below their mappings; raised them",
                sb.pool_id
            );
        }
        let forest = Forest::from_nodes(nodes, next_node_id);
        let mut space = SpaceMap::from_refs(refs, false);
        // Free chunks may hold data of volumes deleted before a crash: punch them now so
        // that a new chunk reads as zeros without being written first.
        if backing.kind() == BackingKind::File {
            let mut all = true;
            for (first, count) in space.free_runs() {
                all &= backing.punch(
                    sb.data_offset + u64::from(first) * chunk_size,
                    u64::from(count) * chunk_size,
                )?;
            }
            if all {
                for (first, count) in space.free_runs() {
                    for c in first..first + count {
                        space.mark_zeroed(c);
                    }
                }
            }
        }
        tracing::info!(pool = %sb.pool_id, name = %sb.name, volumes = volumes.len(), used = space.used(), total = space.total(), "imported thin pool");
        let mut meta = loaded.meta;
        meta.next_node_id = meta.next_node_id.max(forest.next_id());
        // An older format in the accepted range reads as this one; the next commit
        // stamps it.
        meta.format = META_FORMAT;
        Ok(Self::assemble(
            backing,
            store,
            meta,
            forest,
            space,
            volumes,
            orphans,
            import_problems,
            loaded.exports,
        ))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::super::test_utils::{CHUNK, TestPool, assert_err, import_options, options, pattern};
    use super::*;
    use crate::meta::{MetaError, encode_json};

    #[test]
    fn a_pool_reopens_with_its_volumes_and_committed_data() {
        let t = TestPool::new(32);
        let labels = BTreeMap::from([("role".to_owned(), "db".to_owned())]);
        let vol = t
            .pool
            .create_volume("data", 8 * CHUNK, 4096, labels.clone())
            .unwrap()
            .id;
        let data = pattern(1, 3 * CHUNK as usize);
        t.pool.write(vol, CHUNK, &data).unwrap();
        let snap = t.pool.snapshot(vol, "data@1", BTreeMap::new()).unwrap().id;
        let clone = t
            .pool
            .clone_volume(snap, "copy", BTreeMap::new())
            .unwrap()
            .id;
        t.pool.flush().unwrap();
        let (id, before) = (t.pool.id(), t.pool.list_volumes());

        let t = t.reopen();
        assert_eq!(t.pool.id(), id);
        assert_eq!(t.pool.name(), "test");
        assert_eq!(t.pool.chunk_size(), CHUNK);
        assert_eq!(t.pool.list_volumes(), before);
        assert_eq!(t.pool.volume_info(vol).unwrap().labels, labels);
        assert_eq!(t.pool.find_volume("copy"), Some(clone));
        for v in [vol, snap, clone] {
            assert_eq!(t.read(v, CHUNK, data.len()), data, "{v}");
        }
        assert!(t.pool.check(false).unwrap().clean());
    }

    #[test]
    fn structural_changes_are_committed_when_they_return() {
        let t = TestPool::new(32);
        let vol = t.volume("v", 4);
        t.pool.write(vol, 0, &[7; 4096]).unwrap();
        // The snapshot commits, and its commit syncs the data it shares first.
        let snap = t.pool.snapshot(vol, "v@1", BTreeMap::new()).unwrap().id;
        let t = t.reopen();
        assert_eq!(t.read(vol, 0, 4096), vec![7; 4096]);
        assert_eq!(t.read(snap, 0, 4096), vec![7; 4096]);
        assert!(t.pool.check(false).unwrap().clean());
    }

    #[test]
    fn create_refuses_a_pool_or_data_and_bad_options_leave_nothing() {
        let t = TestPool::new(16);
        let id = t.pool.id();
        // An open pool holds its device: even a create over it is refused as in use.
        assert_err(ThinPool::create(&options(t.path.clone(), 16)), |e| {
            matches!(e, PoolError::Backing(_))
        });
        drop(t.pool);
        assert_err(
            ThinPool::create(&options(t.path.clone(), 16)),
            |e| matches!(e, PoolError::AlreadyPool { pool_id, .. } if *pool_id == id),
        );
        // The refused creates left the pool as it was.
        let pool = ThinPool::import(&import_options(t.path.clone())).unwrap();
        assert_eq!((pool.id(), pool.usage().total_chunks), (id, 16));

        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data.img");
        std::fs::write(&data, b"not a pool").unwrap();
        assert_err(ThinPool::create(&options(data.clone(), 16)), |e| {
            matches!(e, PoolError::NotEmpty { .. })
        });
        assert_eq!(std::fs::read(&data).unwrap(), b"not a pool");

        let fresh = dir.path().join("fresh.img");
        let bad = [
            CreateOptions {
                chunk_size: 3 << 10,
                ..options(fresh.clone(), 16)
            },
            CreateOptions {
                size: Some(superblock::DATA_OFFSET + (MIN_CHUNKS - 1) * CHUNK),
                ..options(fresh.clone(), 16)
            },
            CreateOptions {
                size: None,
                ..options(fresh.clone(), 16)
            },
            CreateOptions {
                warning_threshold_percent: 101,
                ..options(fresh.clone(), 16)
            },
            CreateOptions {
                name: String::new(),
                ..options(fresh.clone(), 16)
            },
        ];
        for opts in bad {
            assert_err(ThinPool::create(&opts), |e| {
                matches!(e, PoolError::InvalidArgument(_))
            });
            assert!(!fresh.exists(), "{opts:?} left a file");
            assert!(!default_meta_dir(&fresh).exists(), "{opts:?} left metadata");
        }
    }

    #[test]
    fn import_checks_what_it_finds() {
        let t = TestPool::new(16);
        let id = t.pool.id();
        let path = t.path.clone();
        drop(t.pool);
        let wrong = Uuid::new_v4();
        assert_err(
            ThinPool::import(&ImportOptions {
                expected_id: Some(wrong),
                ..import_options(path.clone())
            }),
            |e| matches!(e, PoolError::UnexpectedPool { found, expected, .. } if *found == id && *expected == wrong),
        );
        let dir = tempfile::tempdir().unwrap();
        let blank = dir.path().join("blank.img");
        std::fs::write(&blank, vec![0u8; 2 << 20]).unwrap();
        assert_err(ThinPool::import(&import_options(blank)), |e| {
            matches!(e, PoolError::Superblock { .. })
        });
        assert!(
            ThinPool::import(&ImportOptions {
                expected_id: Some(id),
                ..import_options(path)
            })
            .is_ok()
        );
    }

    /// Rewrites the stored pool record's format, as another storaged might have left it.
    fn set_format(meta_dir: &Path, format: u32) {
        let store = MetaStore::open(meta_dir).unwrap();
        let mut meta = store.load().unwrap().meta;
        meta.format = format;
        let mut batch = sled::Batch::default();
        batch.insert("meta", encode_json(&meta));
        store.commit(batch).unwrap();
    }

    #[test]
    fn metadata_of_a_newer_format_is_refused_and_accepted_ones_open() {
        let t = TestPool::new(16);
        let vol = t.volume("v", 2);
        t.pool.write(vol, 0, &[3; 512]).unwrap();
        t.pool.flush().unwrap();
        let meta_dir = t.pool.meta_dir().to_owned();
        let path = t.path.clone();
        drop(t.pool);

        for format in crate::meta::META_FORMATS_ACCEPTED {
            set_format(&meta_dir, format);
            let pool = ThinPool::import(&import_options(path.clone())).unwrap();
            let mut buf = [0u8; 512];
            pool.read(vol, 0, &mut buf).unwrap();
            assert_eq!(buf, [3; 512], "format {format}");
            // The next commit stamps this build's format.
            pool.create_volume(&format!("after-{format}"), CHUNK, 512, BTreeMap::new())
                .unwrap();
            drop(pool);
            let store = MetaStore::open(&meta_dir).unwrap();
            assert_eq!(store.load().unwrap().meta.format, META_FORMAT);
        }
        // Last: a store this build refuses cannot be loaded to be rewritten.
        set_format(&meta_dir, META_FORMAT + 1);
        assert_err(
            ThinPool::import(&import_options(path.clone())),
            |e| matches!(e, PoolError::Meta(MetaError::Version { found, .. }) if *found == META_FORMAT + 1),
        );
    }
}
