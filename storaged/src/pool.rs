//! A thin pool: a data area of fixed-size chunks on a file or block device, the mapping
//! trees of its volumes, and the space map, with metadata in sled.
//!
//! # Concurrency
//! One `RwLock` guards the metadata in memory. Reads, and writes into a chunk that only
//! this volume maps (the common case), take it shared and do their I/O under it, so a
//! chunk cannot be freed or moved while data is in flight to it. Writes that allocate or
//! break sharing, discards and every structural change take it exclusively.
//!
//! # Durability
//! A flush (SYNCHRONIZE CACHE) commits: it collects the metadata changes, `fdatasync`s
//! the data area (so every chunk the new metadata maps holds its data), then writes the
//! changes to sled in one atomic batch and flushes sled. Structural changes (create,
//! snapshot, clone, revert, resize, delete) commit before they return. See `space.rs` for
//! the two rules that keep chunks the committed metadata still maps from being reused.
//! An error while committing puts the pool in a failed state: every later call fails
//! until it is imported again, because what is on disk can no longer be known.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use uuid::Uuid;

use crate::backing::{Backing, BackingError, BackingKind};
use crate::meta::{
    self, META_FORMAT, MetaError, MetaStore, PoolMeta, VolumeKind, VolumeRecord, encode_json,
    encode_node,
};
use crate::space::SpaceMap;
use crate::superblock::{self, Superblock, SuperblockError};
use crate::tree::{
    ChunkId, ChunkRefs, Entries, Forest, MAX_HEIGHT, NO_CHUNK, NO_NODE, Node, NodeId, height_for,
};

pub const DEFAULT_CHUNK_SIZE: u64 = 64 << 10;
pub const DEFAULT_WARNING_PERCENT: u32 = 80;
/// A pool smaller than this many chunks is a mistake, not a pool.
pub const MIN_CHUNKS: u64 = 16;
const MAX_NAME: usize = 128;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error(transparent)]
    Backing(#[from] BackingError),
    #[error(transparent)]
    Meta(#[from] MetaError),
    #[error("{path} does not hold a valid pool superblock")]
    Superblock {
        path: PathBuf,
        #[source]
        source: SuperblockError,
    },
    #[error("{path} already holds pool {pool_id}; import it instead of creating one")]
    AlreadyPool { path: PathBuf, pool_id: Uuid },
    #[error("{path} is not empty; refusing to create a pool over existing data")]
    NotEmpty { path: PathBuf },
    #[error(
        "metadata at {meta_dir} belongs to pool {meta_pool}, but the device holds pool {device_pool}"
    )]
    MetaMismatch {
        meta_dir: PathBuf,
        meta_pool: Uuid,
        device_pool: Uuid,
    },
    #[error("{path} holds pool {found}, not the expected pool {expected}")]
    UnexpectedPool {
        path: PathBuf,
        found: Uuid,
        expected: Uuid,
    },
    #[error("pool metadata is inconsistent: {}", problems.join("; "))]
    Corrupt { problems: Vec<String> },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("no volume, snapshot or clone with id {0}")]
    NoVolume(Uuid),
    #[error("the name {0:?} is already used in this pool")]
    NameTaken(String),
    #[error("{id} is a snapshot and is read-only")]
    ReadOnly { id: Uuid },
    #[error("range out of bounds: offset {offset}, length {len}, volume size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("offset {offset} or length {len} is not a multiple of the block size {block_size}")]
    Misaligned {
        offset: u64,
        len: u64,
        block_size: u32,
    },
    #[error(
        "the thin pool is full: no free chunk for a write that needs one (extend the pool or free space)"
    )]
    NoSpace,
    #[error("shrinking {id} from {from} to {to} bytes discards data; pass force to do it")]
    ShrinkNeedsForce { id: Uuid, from: u64, to: u64 },
    #[error("{snapshot} is not a snapshot of {volume}")]
    NotSnapshotOf { snapshot: Uuid, volume: Uuid },
    #[error("the pool failed after an I/O error while committing metadata; import it again")]
    Failed,
}

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

/// A volume as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    pub id: Uuid,
    pub name: String,
    pub kind: VolumeKind,
    pub origin: Option<Uuid>,
    pub size: u64,
    pub block_size: u32,
    pub allocated_bytes: u64,
    pub exclusive_bytes: u64,
    pub shared_bytes: u64,
    pub created_at: u64,
    pub labels: BTreeMap<String, String>,
}

impl VolumeInfo {
    pub fn read_only(&self) -> bool {
        self.kind == VolumeKind::Snapshot
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    pub chunk_size: u64,
    pub total_chunks: u64,
    pub used_chunks: u64,
    /// Free chunks, including those waiting for the next commit to become reusable.
    pub free_chunks: u64,
    pub pending_free_chunks: u64,
    pub provisioned_bytes: u64,
    pub warning_threshold_percent: u32,
    pub warning: bool,
    pub metadata_bytes: u64,
    pub volume_count: u32,
    pub snapshot_count: u32,
}

impl Usage {
    pub fn total_bytes(&self) -> u64 {
        self.total_chunks * self.chunk_size
    }
    pub fn used_bytes(&self) -> u64 {
        self.used_chunks * self.chunk_size
    }
    pub fn free_bytes(&self) -> u64 {
        self.free_chunks * self.chunk_size
    }
    pub fn used_percent(&self) -> f64 {
        if self.total_chunks == 0 {
            return 100.0;
        }
        self.used_chunks as f64 * 100.0 / self.total_chunks as f64
    }
}

/// What a consistency check found (and, with repair, fixed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    pub chunks_checked: u64,
    /// Chunks counted as used that no mapping references.
    pub leaked_chunks: u64,
    /// Chunks whose stored count differs from the mappings (other than leaks).
    pub refcount_mismatches: u64,
    /// Chunks mapped but counted as free: the dangerous kind.
    pub double_allocations: u64,
    /// Tree nodes no volume reaches.
    pub orphan_nodes: u64,
    pub reclaimed_chunks: u64,
    pub problems: Vec<String>,
}

impl CheckReport {
    pub fn clean(&self) -> bool {
        self.leaked_chunks == 0
            && self.refcount_mismatches == 0
            && self.double_allocations == 0
            && self.orphan_nodes == 0
            && self.problems.is_empty()
    }
}

pub fn valid_chunk_size(size: u64) -> bool {
    size.is_power_of_two() && (64 << 10..=1 << 20).contains(&size)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[derive(Debug)]
struct State {
    forest: Forest,
    space: SpaceMap,
    volumes: HashMap<Uuid, VolumeRecord>,
    dirty_volumes: HashSet<Uuid>,
    deleted_volumes: HashSet<Uuid>,
    meta: PoolMeta,
    meta_dirty: bool,
    /// Other records to write at the next commit (key, value or None to delete).
    records: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// Nodes found unreachable at import (reported and removed by a repairing check).
    orphans: Vec<NodeId>,
    /// Problems found at import and tolerated (stored counts below the mappings).
    import_problems: Vec<String>,
    warned: bool,
}

impl State {
    fn volume(&self, id: Uuid) -> Result<&VolumeRecord, PoolError> {
        self.volumes.get(&id).ok_or(PoolError::NoVolume(id))
    }

    fn name_taken(&self, name: &str) -> bool {
        self.volumes.values().any(|v| v.name == name)
    }

    fn has_changes(&self) -> bool {
        self.meta_dirty
            || !self.dirty_volumes.is_empty()
            || !self.deleted_volumes.is_empty()
            || !self.records.is_empty()
    }
}

#[derive(Debug)]
struct Inner {
    id: Uuid,
    name: String,
    chunk_size: u64,
    data_offset: u64,
    backing: Backing,
    meta: MetaStore,
    state: RwLock<State>,
    /// Serialises commits, so at most one is in flight.
    commit_lock: Mutex<()>,
    /// Data written since the last `fdatasync`.
    data_dirty: AtomicBool,
    /// Writes into freshly allocated chunks whose mapping is already in place but whose
    /// data is still being written without the state lock (see [`ThinPool::write`]).
    unlocked_writes: Mutex<usize>,
    unlocked_done: Condvar,
    failed: AtomicBool,
    /// Records other layers keep in this pool's metadata, as found at import.
    imported_records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// A thin pool. Cheap to clone: clones share the pool.
#[derive(Debug, Clone)]
pub struct ThinPool {
    inner: Arc<Inner>,
}

/// Where a piece of a write goes.
#[derive(Debug, Clone, Copy)]
struct Placed {
    pos: u64,
    /// A chunk allocated for this piece that reads zeros: until the data lands, readers of
    /// it see what the unmapped range held, so the data may be written without the lock.
    fresh: bool,
}

/// Widens the window between placing a fresh chunk and writing its data, for tests that
/// race other operations against it: debug builds read `STORAGED_TEST_UNLOCKED_WRITE_DELAY_US`.
fn unlocked_write_delay() {
    #[cfg(debug_assertions)]
    {
        static DELAY: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        let us = *DELAY.get_or_init(|| {
            std::env::var("STORAGED_TEST_UNLOCKED_WRITE_DELAY_US")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        });
        if us > 0 {
            std::thread::sleep(std::time::Duration::from_micros(us));
        }
    }
}

/// Counts writes in flight into fresh chunks, from their placement until their data is
/// written (or failed); [`ThinPool::write_state`] waits for the count to reach zero.
struct UnlockedWrites<'a> {
    inner: &'a Inner,
    n: usize,
}

impl<'a> UnlockedWrites<'a> {
    /// Called with the state lock held, before it is released.
    fn start(inner: &'a Inner, n: usize) -> Self {
        if n > 0 {
            *inner
                .unlocked_writes
                .lock()
                .unwrap_or_else(|p| p.into_inner()) += n;
        }
        UnlockedWrites { inner, n }
    }
}

impl Drop for UnlockedWrites<'_> {
    fn drop(&mut self) {
        if self.n == 0 {
            return;
        }
        let mut n = self
            .inner
            .unlocked_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        *n -= self.n;
        if *n == 0 {
            self.inner.unlocked_done.notify_all();
        }
    }
}

/// The part of a write or read that falls in one chunk.
#[derive(Debug, Clone, Copy)]
struct Piece {
    vchunk: u64,
    /// Offset inside the chunk.
    within: u64,
    /// Offset inside the caller's buffer.
    at: usize,
    len: usize,
}

fn pieces(offset: u64, len: usize, chunk_size: u64) -> impl Iterator<Item = Piece> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        if at >= len {
            return None;
        }
        let pos = offset + at as u64;
        let within = pos % chunk_size;
        let n = ((chunk_size - within) as usize).min(len - at);
        let piece = Piece {
            vchunk: pos / chunk_size,
            within,
            at,
            len: n,
        };
        at += n;
        Some(piece)
    })
}

/// Ranges of the data area `(position, offset in the caller's buffer, length)`, merged
/// when both are contiguous, so neighbouring chunks cost one system call.
#[derive(Debug, Default)]
struct Segments(Vec<(u64, usize, usize)>);

impl Segments {
    fn push(&mut self, pos: u64, at: usize, len: usize) {
        if let Some(last) = self.0.last_mut()
            && last.0 + last.2 as u64 == pos
            && last.1 + last.2 == at
        {
            last.2 += len;
            return;
        }
        self.0.push((pos, at, len));
    }
}

fn validate_name(name: &str) -> Result<(), PoolError> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(|c| c.is_control()) {
        return Err(PoolError::InvalidArgument(format!(
            "name {name:?} must be 1 to {MAX_NAME} bytes without control characters"
        )));
    }
    Ok(())
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

/// Node reference counts and chunk reference counts as the mappings imply them, with the
/// problems that make the trees unusable (dangling pointers, wrong levels, bad chunks).
struct Derived {
    node_refs: HashMap<NodeId, u32>,
    chunk_refs: Vec<u32>,
    fatal: Vec<String>,
}

fn derive<'a>(
    nodes: impl Fn(NodeId) -> Option<&'a Node>,
    volumes: &HashMap<Uuid, VolumeRecord>,
    chunk_count: usize,
) -> Derived {
    let mut node_refs: HashMap<NodeId, u32> = HashMap::new();
    let mut chunk_refs = vec![0u32; chunk_count];
    let mut fatal = Vec::new();
    // Level at which each node was first reached; a node is expanded only once however
    // many parents share it, so each of its entries is counted once.
    let mut level_of: HashMap<NodeId, u8> = HashMap::new();
    let mut stack: Vec<(NodeId, u8, String)> = Vec::new();
    for v in volumes.values() {
        if v.height == 0 || v.height > MAX_HEIGHT {
            fatal.push(format!("volume {} has height {}", v.id, v.height));
            continue;
        }
        if v.root != NO_NODE {
            stack.push((v.root, v.height - 1, format!("volume {}", v.id)));
        }
    }
    while let Some((id, level, parent)) = stack.pop() {
        *node_refs.entry(id).or_default() += 1;
        if let Some(&seen) = level_of.get(&id) {
            if seen != level {
                fatal.push(format!("node {id} is reached at levels {seen} and {level}"));
            }
            continue;
        }
        level_of.insert(id, level);
        let Some(node) = nodes(id) else {
            fatal.push(format!("{parent} references missing node {id}"));
            continue;
        };
        match (&node.entries, level) {
            (Entries::Leaf(entries), 0) => {
                for &c in entries.iter().filter(|&&c| c != NO_CHUNK) {
                    match chunk_refs.get_mut(c as usize) {
                        Some(r) => *r += 1,
                        None => fatal.push(format!(
                            "node {id} maps chunk {c} beyond the pool's {chunk_count} chunks"
                        )),
                    }
                }
            }
            (Entries::Interior(children), l) if l > 0 => {
                for &c in children.iter().filter(|&&c| c != NO_NODE) {
                    stack.push((c, l - 1, format!("node {id}")));
                }
            }
            _ => fatal.push(format!(
                "node {id} is a {} at level {level}",
                if node.is_leaf() {
                    "leaf"
                } else {
                    "interior node"
                }
            )),
        }
    }
    Derived {
        node_refs,
        chunk_refs,
        fatal,
    }
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
            let created_at = now();
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

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        backing: Backing,
        meta_store: MetaStore,
        meta: PoolMeta,
        forest: Forest,
        space: SpaceMap,
        volumes: HashMap<Uuid, VolumeRecord>,
        orphans: Vec<NodeId>,
        import_problems: Vec<String>,
        imported_records: Vec<(Vec<u8>, Vec<u8>)>,
    ) -> ThinPool {
        ThinPool {
            inner: Arc::new(Inner {
                id: meta.pool_id,
                name: meta.name.clone(),
                chunk_size: u64::from(meta.chunk_size),
                data_offset: superblock::DATA_OFFSET,
                backing,
                meta: meta_store,
                state: RwLock::new(State {
                    forest,
                    space,
                    volumes,
                    dirty_volumes: HashSet::new(),
                    deleted_volumes: HashSet::new(),
                    meta,
                    meta_dirty: false,
                    records: Vec::new(),
                    orphans,
                    import_problems,
                    warned: false,
                }),
                commit_lock: Mutex::new(()),
                data_dirty: AtomicBool::new(false),
                unlocked_writes: Mutex::new(0),
                unlocked_done: Condvar::new(),
                failed: AtomicBool::new(false),
                imported_records,
            }),
        }
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
        let volumes: HashMap<Uuid, VolumeRecord> =
            loaded.volumes.into_iter().map(|v| (v.id, v)).collect();
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

    pub fn id(&self) -> Uuid {
        self.inner.id
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn chunk_size(&self) -> u64 {
        self.inner.chunk_size
    }

    pub fn backing_path(&self) -> &Path {
        self.inner.backing.path()
    }

    pub fn backing_kind(&self) -> BackingKind {
        self.inner.backing.kind()
    }

    pub fn meta_dir(&self) -> &Path {
        self.inner.meta.path()
    }

    fn read_state(&self) -> RwLockReadGuard<'_, State> {
        self.inner.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The state, exclusively, once no unlocked write is in flight: whoever takes it may
    /// share, free or copy any chunk. New unlocked writes start only under this lock, so
    /// the wait ends (those writes need no lock to finish).
    fn write_state(&self) -> RwLockWriteGuard<'_, State> {
        let st = self.write_state_for_allocation();
        let mut n = self
            .inner
            .unlocked_writes
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        while *n > 0 {
            n = self
                .inner
                .unlocked_done
                .wait(n)
                .unwrap_or_else(|p| p.into_inner());
        }
        drop(n);
        st
    }

    /// The state, exclusively, with unlocked writes possibly in flight: only for placing
    /// new pieces of a write, which neither shares, frees nor reads any chunk they touch.
    fn write_state_for_allocation(&self) -> RwLockWriteGuard<'_, State> {
        self.inner.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn check_failed(&self) -> Result<(), PoolError> {
        if self.inner.failed.load(Ordering::Acquire) {
            return Err(PoolError::Failed);
        }
        Ok(())
    }

    fn fail(&self, what: &str, err: &dyn std::error::Error) {
        tracing::error!(pool = %self.inner.id, "{what} failed: {err}; the pool is now failed and must be imported again");
        self.inner.failed.store(true, Ordering::Release);
    }

    fn data_pos(&self, chunk: ChunkId) -> u64 {
        self.inner.data_offset + u64::from(chunk) * self.inner.chunk_size
    }

    fn check_io(rec: &VolumeRecord, offset: u64, len: u64) -> Result<(), PoolError> {
        let bs = u64::from(rec.block_size);
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) {
            return Err(PoolError::Misaligned {
                offset,
                len,
                block_size: rec.block_size,
            });
        }
        match offset.checked_add(len) {
            Some(end) if end <= rec.size => Ok(()),
            _ => Err(PoolError::OutOfRange {
                offset,
                len,
                size: rec.size,
            }),
        }
    }

    // ---------------------------------------------------------------------------------
    // Data path

    /// Reads `buf.len()` bytes at `offset`; unmapped ranges read as zeros.
    pub fn read(&self, volume: Uuid, offset: u64, buf: &mut [u8]) -> Result<(), PoolError> {
        self.check_failed()?;
        let st = self.read_state();
        let rec = st.volume(volume)?;
        Self::check_io(rec, offset, buf.len() as u64)?;
        let mut segs = Segments::default();
        for p in pieces(offset, buf.len(), self.inner.chunk_size) {
            match st.forest.lookup(rec.root, rec.height, p.vchunk).chunk {
                Some(c) => segs.push(self.data_pos(c) + p.within, p.at, p.len),
                None => buf[p.at..p.at + p.len].fill(0),
            }
        }
        for &(pos, at, len) in &segs.0 {
            self.inner.backing.read_at(pos, &mut buf[at..at + len])?;
        }
        Ok(())
    }

    /// Writes `data` at `offset`. Durable at the next [`ThinPool::flush`].
    pub fn write(&self, volume: Uuid, offset: u64, data: &[u8]) -> Result<(), PoolError> {
        self.check_failed()?;
        let mut slow = Vec::new();
        {
            let st = self.read_state();
            let rec = st.volume(volume)?;
            if rec.read_only() {
                return Err(PoolError::ReadOnly { id: volume });
            }
            Self::check_io(rec, offset, data.len() as u64)?;
            let mut segs = Segments::default();
            for p in pieces(offset, data.len(), self.inner.chunk_size) {
                let l = st.forest.lookup(rec.root, rec.height, p.vchunk);
                match l.chunk {
                    Some(c) if l.exclusive_path && st.space.writable_in_place(c) => {
                        segs.push(self.data_pos(c) + p.within, p.at, p.len);
                    }
                    _ => slow.push(p),
                }
            }
            // Under the shared lock: no chunk written here can be freed meanwhile.
            self.write_segments(&segs, data)?;
        }
        if !slow.is_empty() {
            // Pieces landing in fresh, zeroed chunks are written after the lock is
            // released, so allocating writers do not queue behind each other's I/O: until
            // the data lands a reader of the new mapping sees zeros, which is what the
            // range held. Every other piece is written under the lock, so nobody reads a
            // new mapping before its data is there.
            let mut fresh = Segments::default();
            let unlocked = {
                let mut st = self.write_state_for_allocation();
                let mut segs = Segments::default();
                let mut placed = Ok(());
                for p in slow {
                    match self.place_piece_locked(&mut st, volume, p, &data[p.at..p.at + p.len]) {
                        Ok(Some(Placed { pos, fresh: true })) => fresh.push(pos, p.at, p.len),
                        Ok(Some(Placed { pos, fresh: false })) => segs.push(pos, p.at, p.len),
                        Ok(None) => {}
                        Err(e) => {
                            placed = Err(e);
                            break;
                        }
                    }
                }
                // Pieces placed before an error are mapped: their data goes out either way.
                let under_lock = self.write_segments(&segs, data);
                let guard = UnlockedWrites::start(&self.inner, fresh.0.len());
                (placed, under_lock, guard)
            };
            let (placed, under_lock, guard) = unlocked;
            unlocked_write_delay();
            let result = self.write_segments(&fresh, data);
            drop(guard);
            placed?;
            under_lock?;
            result?;
        }
        // After the data is written: a flush that starts after this write returns will
        // see the flag and sync it.
        self.inner.data_dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn write_segments(&self, segs: &Segments, data: &[u8]) -> Result<(), PoolError> {
        for &(pos, at, len) in &segs.0 {
            self.inner.backing.write_at(pos, &data[at..at + len])?;
        }
        Ok(())
    }

    /// Writes one piece with the metadata lock held.
    fn write_piece_locked(
        &self,
        st: &mut State,
        volume: Uuid,
        p: Piece,
        data: &[u8],
    ) -> Result<(), PoolError> {
        if let Some(Placed { pos, .. }) = self.place_piece_locked(st, volume, p, data)? {
            self.inner.backing.write_at(pos, data)?;
        }
        Ok(())
    }

    /// Writes one piece, or returns where its data must go, with the metadata lock held:
    /// in place, into a new chunk, or by copying a shared chunk first (done here, before
    /// the new mapping exists).
    fn place_piece_locked(
        &self,
        st: &mut State,
        volume: Uuid,
        p: Piece,
        data: &[u8],
    ) -> Result<Option<Placed>, PoolError> {
        let State {
            forest,
            space,
            volumes,
            dirty_volumes,
            meta,
            warned,
            ..
        } = st;
        let rec = volumes
            .get_mut(&volume)
            .ok_or(PoolError::NoVolume(volume))?;
        // The volume may have shrunk between the locks.
        Self::check_io(
            rec,
            p.vchunk * self.inner.chunk_size + p.within,
            data.len() as u64,
        )?;
        let l = forest.lookup(rec.root, rec.height, p.vchunk);
        if let Some(c) = l.chunk
            && l.exclusive_path
            && space.writable_in_place(c)
        {
            return Ok(Some(Placed {
                pos: self.data_pos(c) + p.within,
                fresh: false,
            }));
        }
        if space.available() == 0 {
            return Err(PoolError::NoSpace);
        }
        let mut root = rec.root;
        let leaf = forest.leaf_for_write(&mut root, rec.height, p.vchunk, space);
        if root != rec.root {
            rec.root = root;
            dirty_volumes.insert(volume);
        }
        let old = forest.leaf_get(leaf, p.vchunk);
        if let Some(c) = old
            && space.writable_in_place(c)
        {
            return Ok(Some(Placed {
                pos: self.data_pos(c) + p.within,
                fresh: false,
            }));
        }
        let (new, zeroed) = space.allocate().ok_or(PoolError::NoSpace)?;
        let cs = self.inner.chunk_size as usize;
        let whole = p.within == 0 && data.len() == cs;
        let deferred = whole || (old.is_none() && zeroed);
        if !deferred {
            // The rest of the chunk must hold the old data (copy on write) or zeros.
            let mut buf = vec![0u8; cs];
            let result = match old {
                Some(c) => self.inner.backing.read_at(self.data_pos(c), &mut buf),
                None => Ok(()),
            }
            .and_then(|()| {
                buf[p.within as usize..p.within as usize + data.len()].copy_from_slice(data);
                self.inner.backing.write_at(self.data_pos(new), &buf)
            });
            if let Err(e) = result {
                space.decref(new);
                return Err(e.into());
            }
        }
        forest.leaf_set(leaf, p.vchunk, new);
        match old {
            Some(c) => space.decref(c),
            None => {
                rec.mapped += 1;
                dirty_volumes.insert(volume);
            }
        }
        let used_pct = space.used() * 100 / space.total().max(1);
        if used_pct >= u64::from(meta.warning_threshold_percent) {
            if !*warned {
                tracing::warn!(pool = %meta.pool_id, used_pct, threshold = meta.warning_threshold_percent, "thin pool above its space warning threshold");
                *warned = true;
            }
        } else {
            *warned = false;
        }
        Ok(deferred.then(|| Placed {
            pos: self.data_pos(new) + p.within,
            fresh: old.is_none() && zeroed,
        }))
    }

    /// Frees whole chunks of the range (reference-aware) and zeroes partial ones; the
    /// range reads as zeros afterwards.
    pub fn discard(&self, volume: Uuid, offset: u64, len: u64) -> Result<(), PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        let mut st = self.write_state();
        let rec = st.volume(volume)?;
        if rec.read_only() {
            return Err(PoolError::ReadOnly { id: volume });
        }
        Self::check_io(rec, offset, len)?;
        let end = offset + len;
        let first_full = offset.div_ceil(cs);
        let end_full = end / cs;
        // Partial chunks at either end: zero the range where something is mapped.
        let mut partial = Vec::new();
        if first_full > end_full {
            partial.push((offset, len));
        } else {
            if offset < first_full * cs {
                partial.push((offset, first_full * cs - offset));
            }
            if end > end_full * cs && end_full * cs >= offset {
                partial.push((end_full * cs, end - end_full * cs));
            }
        }
        for (at, n) in partial {
            let rec = st.volume(volume)?;
            if st
                .forest
                .lookup(rec.root, rec.height, at / cs)
                .chunk
                .is_some()
            {
                let mut buf = Vec::new();
                let zeros = iscsi_target::block::page_aligned_zeros(&mut buf, n as usize);
                self.write_piece_locked(
                    &mut st,
                    volume,
                    Piece {
                        vchunk: at / cs,
                        within: at % cs,
                        at: 0,
                        len: n as usize,
                    },
                    zeros,
                )?;
            }
        }
        if first_full < end_full {
            let State {
                forest,
                space,
                volumes,
                dirty_volumes,
                ..
            } = &mut *st;
            let rec = volumes.get_mut(&volume).expect("checked above");
            let mut root = rec.root;
            for (v, _) in forest.mapped_range(root, rec.height, first_full, end_full) {
                forest.unmap(&mut root, rec.height, v, space);
                rec.mapped -= 1;
                dirty_volumes.insert(volume);
            }
            rec.root = root;
        }
        self.inner.data_dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Makes `len` bytes of `dst` at `dst_offset` hold what `src` holds at `src_offset`
    /// by sharing chunks instead of copying them: whole chunks are mapped into `dst` with
    /// one more reference (copy on write keeps the two apart afterwards); a partial chunk
    /// at the end is copied. Returns `false`, changing nothing, when the offsets are not
    /// chunk-aligned (the caller copies instead).
    pub fn clone_range(
        &self,
        src: Uuid,
        src_offset: u64,
        dst: Uuid,
        dst_offset: u64,
        len: u64,
    ) -> Result<bool, PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        if !src_offset.is_multiple_of(cs) || !dst_offset.is_multiple_of(cs) {
            return Ok(false);
        }
        let whole = len / cs;
        let tail = len % cs;
        {
            let mut st = self.write_state();
            let s = st.volume(src)?.clone();
            let d = st.volume(dst)?;
            if d.read_only() {
                return Err(PoolError::ReadOnly { id: dst });
            }
            Self::check_io(&s, src_offset, len)?;
            Self::check_io(d, dst_offset, len)?;
            let State {
                forest,
                space,
                volumes,
                dirty_volumes,
                ..
            } = &mut *st;
            for i in 0..whole {
                let from = forest.lookup(s.root, s.height, src_offset / cs + i).chunk;
                let to_v = dst_offset / cs + i;
                let d = volumes.get_mut(&dst).expect("checked");
                let mut root = d.root;
                match from {
                    Some(c) => {
                        let leaf = forest.leaf_for_write(&mut root, d.height, to_v, space);
                        let old = forest.leaf_get(leaf, to_v);
                        if old != Some(c) {
                            space.incref(c);
                            forest.leaf_set(leaf, to_v, c);
                            match old {
                                Some(o) => space.decref(o),
                                None => d.mapped += 1,
                            }
                        }
                    }
                    None => {
                        if forest.unmap(&mut root, d.height, to_v, space).is_some() {
                            d.mapped -= 1;
                        }
                    }
                }
                d.root = root;
                dirty_volumes.insert(dst);
            }
        }
        if tail > 0 {
            let mut buf = vec![0u8; tail as usize];
            self.read(src, src_offset + whole * cs, &mut buf)?;
            self.write(dst, dst_offset + whole * cs, &buf)?;
        }
        self.inner.data_dirty.store(true, Ordering::Release);
        Ok(true)
    }

    /// Which chunks of the range are mapped: `(offset, len, mapped)` runs.
    pub fn extents(
        &self,
        volume: Uuid,
        offset: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, bool)>, PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        let st = self.read_state();
        let rec = st.volume(volume)?;
        Self::check_io(rec, offset, len)?;
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        let end = offset + len;
        let mapped: HashSet<u64> = st
            .forest
            .mapped_range(rec.root, rec.height, offset / cs, end.div_ceil(cs))
            .into_iter()
            .map(|(v, _)| v)
            .collect();
        let mut pos = offset;
        while pos < end {
            let v = pos / cs;
            let next = ((v + 1) * cs).min(end);
            let m = mapped.contains(&v);
            match out.last_mut() {
                Some(last) if last.2 == m => last.1 += next - pos,
                _ => out.push((pos, next - pos, m)),
            }
            pos = next;
        }
        Ok(out)
    }

    /// Makes every write acknowledged before this call durable, and commits metadata.
    pub fn flush(&self) -> Result<(), PoolError> {
        self.check_failed()?;
        let _serial = self
            .inner
            .commit_lock
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        self.check_failed()?;
        // 1. Collect the metadata changes. Data they point to was written before they were
        //    made, so the data sync below covers it.
        let (batch, freed) = {
            let mut st = self.write_state();
            let forest_changes = st.forest.take_changes();
            let space_changes = st.space.take_changes();
            let any = st.has_changes()
                || !forest_changes.dirty.is_empty()
                || !forest_changes.freed.is_empty()
                || !space_changes.pages.is_empty()
                || !space_changes.freed.is_empty();
            if any {
                let mut batch = sled::Batch::default();
                for id in &forest_changes.dirty {
                    let node = st.forest.node(*id).expect("dirty nodes exist");
                    batch.insert(&meta::node_key(*id), encode_node(node));
                }
                for id in &forest_changes.freed {
                    batch.remove(&meta::node_key(*id));
                }
                for (page, refs) in &space_changes.pages {
                    let bytes: Vec<u8> = refs.iter().flat_map(|r| r.to_le_bytes()).collect();
                    batch.insert(&meta::page_key(*page), bytes);
                }
                for id in std::mem::take(&mut st.dirty_volumes) {
                    if let Some(rec) = st.volumes.get(&id) {
                        batch.insert(meta::volume_key(&id), encode_json(rec));
                    }
                }
                for id in std::mem::take(&mut st.deleted_volumes) {
                    batch.remove(meta::volume_key(&id));
                }
                for (key, value) in std::mem::take(&mut st.records) {
                    match value {
                        Some(v) => batch.insert(key, v),
                        None => batch.remove(key),
                    }
                }
                st.meta.next_node_id = st.forest.next_id();
                st.meta.commit_seq += 1;
                st.meta_dirty = false;
                batch.insert("meta", encode_json(&st.meta));
                (Some(batch), space_changes.freed)
            } else {
                (None, space_changes.freed)
            }
        };
        // 2. The data the new metadata maps must be on disk before the metadata is.
        let data_dirty = self.inner.data_dirty.swap(false, Ordering::AcqRel);
        if (data_dirty || batch.is_some())
            && let Err(e) = self.inner.backing.sync_data()
        {
            self.fail("data sync", &e);
            return Err(e.into());
        }
        // 3. The metadata, atomically and durably.
        if let Some(batch) = batch
            && let Err(e) = self.inner.meta.commit(batch)
        {
            self.fail("metadata commit", &e);
            return Err(e.into());
        }
        // 4. Chunks freed by this commit may now be reused; punch them so they read zeros.
        let zeroed = self.punch_chunks(&freed);
        self.write_state().space.commit_done(&freed, zeroed);
        Ok(())
    }

    fn punch_chunks(&self, chunks: &[ChunkId]) -> bool {
        if chunks.is_empty() || self.inner.backing.kind() != BackingKind::File {
            return false;
        }
        let mut sorted = chunks.to_vec();
        sorted.sort_unstable();
        let cs = self.inner.chunk_size;
        let mut all = true;
        let mut i = 0;
        while i < sorted.len() {
            let mut j = i + 1;
            while j < sorted.len() && sorted[j] == sorted[j - 1] + 1 {
                j += 1;
            }
            let ok = self
                .inner
                .backing
                .punch(self.data_pos(sorted[i]), (j - i) as u64 * cs)
                .unwrap_or_else(|e| {
                    tracing::warn!("cannot punch freed chunks: {e}");
                    false
                });
            all &= ok;
            i = j;
        }
        all
    }

    // ---------------------------------------------------------------------------------
    // Volumes

    fn info(&self, st: &State, rec: &VolumeRecord) -> VolumeInfo {
        let cs = self.inner.chunk_size;
        let (mut allocated, mut exclusive) = (0u64, 0u64);
        st.forest.walk(
            rec.root,
            rec.height,
            |c| st.space.refs(c),
            |_, _, shared| {
                allocated += 1;
                if !shared {
                    exclusive += 1;
                }
            },
        );
        VolumeInfo {
            id: rec.id,
            name: rec.name.clone(),
            kind: rec.kind,
            origin: rec.origin.filter(|o| st.volumes.contains_key(o)),
            size: rec.size,
            block_size: rec.block_size,
            allocated_bytes: allocated * cs,
            exclusive_bytes: exclusive * cs,
            shared_bytes: (allocated - exclusive) * cs,
            created_at: rec.created_at,
            labels: rec.labels.clone(),
        }
    }

    /// A volume's size and whether it is read-only, without walking its tree.
    pub fn volume_size(&self, id: Uuid) -> Result<(u64, bool), PoolError> {
        let st = self.read_state();
        let rec = st.volume(id)?;
        Ok((rec.size, rec.read_only()))
    }

    pub fn volume_info(&self, id: Uuid) -> Result<VolumeInfo, PoolError> {
        let st = self.read_state();
        let rec = st.volume(id)?;
        Ok(self.info(&st, rec))
    }

    /// Every volume, snapshot and clone, sorted by creation time then name.
    pub fn list_volumes(&self) -> Vec<VolumeInfo> {
        let st = self.read_state();
        let mut out: Vec<VolumeInfo> = st.volumes.values().map(|r| self.info(&st, r)).collect();
        out.sort_by(|a, b| (a.created_at, &a.name, a.id).cmp(&(b.created_at, &b.name, b.id)));
        out
    }

    pub fn find_volume(&self, name: &str) -> Option<Uuid> {
        self.read_state()
            .volumes
            .values()
            .find(|v| v.name == name)
            .map(|v| v.id)
    }

    /// Creates a thin volume; its size may exceed the pool (overcommit).
    pub fn create_volume(
        &self,
        name: &str,
        size: u64,
        block_size: u32,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeInfo, PoolError> {
        self.check_failed()?;
        validate_name(name)?;
        let block_size = if block_size == 0 { 512 } else { block_size };
        if block_size != 512 && block_size != 4096 {
            return Err(PoolError::InvalidArgument(format!(
                "block size {block_size} must be 512 or 4096"
            )));
        }
        if size == 0 || !size.is_multiple_of(u64::from(block_size)) {
            return Err(PoolError::InvalidArgument(format!(
                "size {size} must be a non-zero multiple of the block size {block_size}"
            )));
        }
        let id = {
            let mut st = self.write_state();
            if st.name_taken(name) {
                return Err(PoolError::NameTaken(name.to_owned()));
            }
            let rec = VolumeRecord {
                id: Uuid::new_v4(),
                name: name.to_owned(),
                kind: VolumeKind::Volume,
                origin: None,
                size,
                block_size,
                root: NO_NODE,
                height: height_for(size.div_ceil(self.inner.chunk_size)),
                mapped: 0,
                created_at: now(),
                labels,
            };
            let id = rec.id;
            st.volumes.insert(id, rec);
            st.dirty_volumes.insert(id);
            id
        };
        self.flush()?;
        tracing::info!(pool = %self.inner.id, volume = %id, name, size, "created volume");
        self.volume_info(id)
    }

    fn derive_volume(
        &self,
        source: Uuid,
        name: &str,
        kind: VolumeKind,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeInfo, PoolError> {
        self.check_failed()?;
        validate_name(name)?;
        let rec = {
            let mut st = self.write_state();
            if st.name_taken(name) {
                return Err(PoolError::NameTaken(name.to_owned()));
            }
            let src = st.volume(source)?;
            let rec = VolumeRecord {
                id: Uuid::new_v4(),
                name: name.to_owned(),
                kind,
                origin: Some(source),
                size: src.size,
                block_size: src.block_size,
                root: src.root,
                height: src.height,
                mapped: src.mapped,
                created_at: now(),
                labels,
            };
            // O(1): one more reference on the root, whatever the volume holds.
            st.forest.incref(rec.root);
            st.volumes.insert(rec.id, rec.clone());
            st.dirty_volumes.insert(rec.id);
            rec
        };
        // The commit syncs data first, so the snapshot's chunks hold what was written.
        self.flush()?;
        tracing::info!(pool = %self.inner.id, source = %source, id = %rec.id, ?kind, name, "derived volume");
        // Just taken, it shares every chunk with its source: no walk needed to say so.
        let allocated = rec.mapped * self.inner.chunk_size;
        Ok(VolumeInfo {
            id: rec.id,
            name: rec.name,
            kind: rec.kind,
            origin: rec.origin,
            size: rec.size,
            block_size: rec.block_size,
            allocated_bytes: allocated,
            exclusive_bytes: 0,
            shared_bytes: allocated,
            created_at: rec.created_at,
            labels: rec.labels,
        })
    }

    /// A read-only, point-in-time copy of a volume (or clone).
    pub fn snapshot(
        &self,
        source: Uuid,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeInfo, PoolError> {
        self.derive_volume(source, name, VolumeKind::Snapshot, labels)
    }

    /// A writable copy of a volume, clone or snapshot.
    pub fn clone_volume(
        &self,
        source: Uuid,
        name: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<VolumeInfo, PoolError> {
        self.derive_volume(source, name, VolumeKind::Clone, labels)
    }

    /// Makes `volume` read what `snapshot` (a snapshot of it) holds.
    pub fn revert(&self, volume: Uuid, snapshot: Uuid) -> Result<VolumeInfo, PoolError> {
        self.check_failed()?;
        {
            let mut st = self.write_state();
            let vol = st.volume(volume)?.clone();
            let snap = st.volume(snapshot)?.clone();
            if vol.read_only() {
                return Err(PoolError::ReadOnly { id: volume });
            }
            if snap.kind != VolumeKind::Snapshot || snap.origin != Some(volume) {
                return Err(PoolError::NotSnapshotOf { snapshot, volume });
            }
            let State {
                forest,
                space,
                volumes,
                dirty_volumes,
                ..
            } = &mut *st;
            forest.incref(snap.root);
            forest.decref(vol.root, space);
            let rec = volumes.get_mut(&volume).expect("checked");
            rec.root = snap.root;
            rec.height = snap.height;
            rec.mapped = snap.mapped;
            rec.size = snap.size;
            dirty_volumes.insert(volume);
        }
        self.flush()?;
        tracing::info!(pool = %self.inner.id, %volume, %snapshot, "reverted volume");
        self.volume_info(volume)
    }

    /// Changes a volume's size. Shrinking discards data past the new end and needs `force`.
    pub fn resize(
        &self,
        volume: Uuid,
        new_size: u64,
        force: bool,
    ) -> Result<VolumeInfo, PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        {
            let mut st = self.write_state();
            let rec = st.volume(volume)?.clone();
            if rec.read_only() {
                return Err(PoolError::ReadOnly { id: volume });
            }
            if new_size == 0 || !new_size.is_multiple_of(u64::from(rec.block_size)) {
                return Err(PoolError::InvalidArgument(format!(
                    "size {new_size} must be a non-zero multiple of the block size {}",
                    rec.block_size
                )));
            }
            if new_size < rec.size {
                if !force {
                    return Err(PoolError::ShrinkNeedsForce {
                        id: volume,
                        from: rec.size,
                        to: new_size,
                    });
                }
                // Zero the tail of the last chunk so a later grow reads zeros there.
                if !new_size.is_multiple_of(cs)
                    && st
                        .forest
                        .lookup(rec.root, rec.height, new_size / cs)
                        .chunk
                        .is_some()
                {
                    let n = (cs - new_size % cs).min(rec.size - new_size);
                    let mut buf = Vec::new();
                    let zeros = iscsi_target::block::page_aligned_zeros(&mut buf, n as usize);
                    let piece = Piece {
                        vchunk: new_size / cs,
                        within: new_size % cs,
                        at: 0,
                        len: n as usize,
                    };
                    self.write_piece_locked(&mut st, volume, piece, zeros)?;
                }
                let State {
                    forest,
                    space,
                    volumes,
                    ..
                } = &mut *st;
                let rec = volumes.get_mut(&volume).expect("checked");
                let mut root = rec.root;
                for (v, _) in forest.mapped_range(root, rec.height, new_size.div_ceil(cs), u64::MAX)
                {
                    forest.unmap(&mut root, rec.height, v, space);
                    rec.mapped -= 1;
                }
                rec.root = root;
                rec.size = new_size;
            } else {
                let State {
                    forest, volumes, ..
                } = &mut *st;
                let rec = volumes.get_mut(&volume).expect("checked");
                let height = height_for(new_size.div_ceil(cs));
                if height > rec.height {
                    let mut root = rec.root;
                    forest.grow(&mut root, rec.height, height);
                    rec.root = root;
                    rec.height = height;
                }
                rec.size = new_size;
            }
            st.dirty_volumes.insert(volume);
        }
        self.flush()?;
        tracing::info!(pool = %self.inner.id, %volume, new_size, "resized volume");
        self.volume_info(volume)
    }

    /// Deletes a volume, snapshot or clone. Returns the bytes freed (chunks no one else
    /// referenced).
    pub fn delete_volume(&self, volume: Uuid) -> Result<u64, PoolError> {
        self.check_failed()?;
        let freed = {
            let mut st = self.write_state();
            let rec = st.volume(volume)?.clone();
            let before = st.space.used();
            let State {
                forest,
                space,
                volumes,
                dirty_volumes,
                deleted_volumes,
                ..
            } = &mut *st;
            forest.decref(rec.root, space);
            volumes.remove(&volume);
            dirty_volumes.remove(&volume);
            deleted_volumes.insert(volume);
            (before - st.space.used()) * self.inner.chunk_size
        };
        self.flush()?;
        tracing::info!(pool = %self.inner.id, %volume, freed, "deleted volume");
        Ok(freed)
    }

    // ---------------------------------------------------------------------------------
    // Pool

    pub fn usage(&self) -> Usage {
        let st = self.read_state();
        let total = st.space.total();
        let used = st.space.used();
        let warning = used * 100 >= total * u64::from(st.meta.warning_threshold_percent);
        Usage {
            chunk_size: self.inner.chunk_size,
            total_chunks: total,
            used_chunks: used,
            free_chunks: total - used,
            pending_free_chunks: st.space.pending_free(),
            provisioned_bytes: st
                .volumes
                .values()
                .filter(|v| v.kind != VolumeKind::Snapshot)
                .map(|v| v.size)
                .sum(),
            warning_threshold_percent: st.meta.warning_threshold_percent,
            warning,
            metadata_bytes: self.inner.meta.size_on_disk(),
            volume_count: st
                .volumes
                .values()
                .filter(|v| v.kind != VolumeKind::Snapshot)
                .count() as u32,
            snapshot_count: st
                .volumes
                .values()
                .filter(|v| v.kind == VolumeKind::Snapshot)
                .count() as u32,
        }
    }

    /// Grows the pool. For a file, to `new_size` bytes; for a device, to what it now
    /// offers (`new_size` may cap it).
    pub fn extend(&self, new_size: Option<u64>) -> Result<Usage, PoolError> {
        self.check_failed()?;
        let cs = self.inner.chunk_size;
        {
            let _serial = self
                .inner
                .commit_lock
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let backing = &self.inner.backing;
            let current = backing.size()?;
            let target = match (backing.kind(), new_size) {
                (BackingKind::File, Some(s)) => s,
                (BackingKind::File, None) => {
                    return Err(PoolError::InvalidArgument(
                        "extending a file-backed pool needs the new size".into(),
                    ));
                }
                (BackingKind::BlockDevice, Some(s)) if s > current => {
                    return Err(PoolError::InvalidArgument(format!(
                        "{s} bytes is more than the device's {current}"
                    )));
                }
                (BackingKind::BlockDevice, s) => s.unwrap_or(current),
            };
            let chunks =
                ((target.saturating_sub(self.inner.data_offset)) / cs).min(u64::from(NO_CHUNK - 1));
            let old = self.read_state().meta.chunk_count;
            if chunks <= old {
                return Err(PoolError::InvalidArgument(format!(
                    "{target} bytes hold {chunks} chunks, no more than the pool's {old}"
                )));
            }
            if backing.kind() == BackingKind::File && target > current {
                backing.grow_file(target)?;
            }
            let mut st = self.write_state();
            st.space
                .extend(chunks as usize, backing.kind() == BackingKind::File);
            st.meta.chunk_count = chunks;
            st.meta_dirty = true;
            st.warned = false;
        }
        self.flush()?;
        tracing::info!(pool = %self.inner.id, "extended pool");
        Ok(self.usage())
    }

    /// Checks every mapping against the reference counts and the free map; with `repair`,
    /// sets counts to what the mappings imply (reclaiming leaked chunks) and removes
    /// unreachable nodes.
    pub fn check(&self, repair: bool) -> Result<CheckReport, PoolError> {
        self.check_failed()?;
        let mut report = CheckReport::default();
        {
            let mut st = self.write_state();
            let derived = derive(
                |id| st.forest.node(id),
                &st.volumes,
                st.space.total() as usize,
            );
            let mut mapped_fixes = Vec::new();
            for v in st.volumes.values() {
                let mut walked = 0u64;
                st.forest
                    .walk(v.root, v.height, |_| 0, |_, _, _| walked += 1);
                if walked != v.mapped {
                    report.problems.push(format!(
                        "volume {} records {} mapped chunks, its tree maps {walked}",
                        v.id, v.mapped
                    ));
                    mapped_fixes.push((v.id, walked));
                }
            }
            if repair {
                for (id, walked) in mapped_fixes {
                    st.volumes.get_mut(&id).expect("listed above").mapped = walked;
                    st.dirty_volumes.insert(id);
                }
            }
            report.problems.extend(derived.fatal.iter().cloned());
            report.problems.extend(st.import_problems.iter().cloned());
            report.double_allocations = st.import_problems.len() as u64;
            report.chunks_checked = st.space.total();
            for (id, node) in st.forest.nodes() {
                let expected = derived.node_refs.get(id).copied().unwrap_or(0);
                if node.refs != expected {
                    report.problems.push(format!(
                        "node {id} has {} references, the trees give {expected}",
                        node.refs
                    ));
                }
            }
            report.orphan_nodes = st.orphans.len() as u64;
            let mut fixes = Vec::new();
            for (c, (&stored, &mapped)) in st
                .space
                .all_refs()
                .iter()
                .zip(derived.chunk_refs.iter())
                .enumerate()
            {
                if stored == mapped {
                    continue;
                }
                if mapped == 0 {
                    report.leaked_chunks += 1;
                } else if stored == 0 {
                    report.double_allocations += 1;
                    report
                        .problems
                        .push(format!("chunk {c} is mapped but free"));
                } else {
                    report.refcount_mismatches += 1;
                    report.problems.push(format!(
                        "chunk {c} is counted {stored} but mapped {mapped} times"
                    ));
                }
                fixes.push((c as ChunkId, mapped));
            }
            if repair {
                for &(c, r) in &fixes {
                    if r == 0 {
                        report.reclaimed_chunks += 1;
                    }
                    st.space.set_refs(c, r);
                }
                let orphans = std::mem::take(&mut st.orphans);
                for id in orphans {
                    st.records.push((meta::node_key(id).to_vec(), None));
                }
                st.import_problems.clear();
                st.meta_dirty = true;
            }
        }
        if repair {
            self.flush()?;
        }
        Ok(report)
    }

    /// Adds a record to the next commit (`None` deletes it); used by the service layer for
    /// export records, so they change atomically with the pool.
    pub fn stage_record(&self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.write_state().records.push((key, value));
    }

    /// Records other layers stored in this pool's metadata (exports), read at import.
    pub fn imported_records(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.inner.imported_records
    }
}
