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
//!
//! # Layout
//! - `open.rs`: creating a pool on a file or device, and importing one.
//! - `io.rs`: the data path: reads, writes (copy on write, allocation), discards, clones
//!   of ranges, extents.
//! - `commit.rs`: flushes: data sync, then one atomic metadata batch.
//! - `volumes.rs`: volumes, snapshots and clones: create, derive, revert, resize, delete.
//! - `capacity.rs`: usage and growing the pool.
//! - `changes.rs`: the chunks two points of a volume's lineage hold differently.
//! - `check.rs`: deriving reference counts from the trees, and fsck.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use uuid::Uuid;

use crate::backing::{Backing, BackingError, BackingKind};
use crate::meta::{MetaError, MetaStore, PoolMeta};
use crate::space::SpaceMap;
use crate::superblock::{self, SuperblockError};
use crate::tree::{ChunkId, Forest, NodeId};

mod capacity;
mod changes;
mod check;
mod commit;
mod io;
mod open;
mod volumes;

pub use capacity::Usage;
pub use changes::{ChangedChunks, ChunkRange};
pub use check::CheckReport;
pub use open::{CreateOptions, ImportOptions, valid_chunk_size};
use volumes::Volume;
pub use volumes::VolumeInfo;

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
    #[error("{id} is neither volume {volume} nor derived from it (not of the same lineage)")]
    NotSameLineage { id: Uuid, volume: Uuid },
    #[error("{snapshot} is not a snapshot of {volume} or of a volume derived from it")]
    NotSnapshotOf { snapshot: Uuid, volume: Uuid },
    #[error("the pool failed after an I/O error while committing metadata; import it again")]
    Failed,
}

#[derive(Debug)]
struct State {
    forest: Forest,
    space: SpaceMap,
    volumes: HashMap<Uuid, Volume>,
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
    fn volume(&self, id: Uuid) -> Result<&Volume, PoolError> {
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

/// Seconds since the Unix epoch: what the superblock and the records store.
fn unix_secs() -> u64 {
    proto::unix_ms() / 1000
}

fn validate_name(name: &str) -> Result<(), PoolError> {
    if name.is_empty() || name.len() > MAX_NAME || name.chars().any(|c| c.is_control()) {
        return Err(PoolError::InvalidArgument(format!(
            "name {name:?} must be 1 to {MAX_NAME} bytes without control characters"
        )));
    }
    Ok(())
}

impl ThinPool {
    #[allow(clippy::too_many_arguments)]
    fn assemble(
        backing: Backing,
        meta_store: MetaStore,
        meta: PoolMeta,
        forest: Forest,
        space: SpaceMap,
        volumes: HashMap<Uuid, Volume>,
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

    /// Records other layers stored in this pool's metadata (exports), read at import.
    pub fn imported_records(&self) -> &[(Vec<u8>, Vec<u8>)] {
        &self.inner.imported_records
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

    fn fail(&self, what: &str, err: &(dyn std::error::Error + 'static)) {
        tracing::error!(pool = %self.inner.id, error = err, "{what} failed; the pool is now failed and must be imported again");
        self.inner.failed.store(true, Ordering::Release);
    }

    fn data_pos(&self, chunk: ChunkId) -> u64 {
        self.inner.data_offset + u64::from(chunk) * self.inner.chunk_size
    }

    fn check_io(rec: &Volume, offset: u64, len: u64) -> Result<(), PoolError> {
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
}

#[cfg(test)]
mod test_utils;
